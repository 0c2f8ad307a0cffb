//! The read-state fold gives the same state for any order of the same
//! events, with any of them repeated: what makes at-least-once input,
//! several gateway replicas and a rebalance mid-stream safe. Also: folding
//! what is already in changes nothing (so nothing is written), and two
//! processes' partial folds joined (a rebuild) equal one process's fold.

mod common;

use std::collections::BTreeMap;

use common::rng::Rng;

use timbridge::materialize::fold::{ReadEvent, ReadState};

/// Few readers per message, so the cap (`MAX_READERS`) is exercised.
const MAX_READERS: usize = 4;

/// A random event set over a few messages of each kind.
fn events(rng: &mut Rng) -> Vec<ReadEvent> {
    let mut out = Vec::new();
    let n = 5 + rng.below(40);
    for _ in 0..n {
        let t = 1_700_000_000_000 + rng.below(100_000);
        let readers: Vec<String> = (0..rng.below(4))
            .map(|_| format!("\"u{}\"", rng.below(9)))
            .collect();
        let readers = readers.join(",");
        let json = match rng.below(3) {
            0 => format!(
                r#"{{"schema":"read_receipt.v1","kind":"group_message","sdk_app_id":1,"conversation_id":"g{g}","group_id":"g{g}","msg_seq":{s},"read_count":{r},"unread_count":{u},"readers":[{readers}],"event_time_ms":{t}}}"#,
                g = rng.below(2),
                s = rng.below(3),
                r = rng.below(20),
                u = rng.below(20),
            ),
            1 => format!(
                r#"{{"schema":"read_receipt.v1","kind":"c2c_message","sdk_app_id":1,"conversation_id":"c2c:a:b","msg_key":"k{}","readers":["a"],"event_time_ms":{t}}}"#,
                rng.below(3)
            ),
            _ => format!(
                r#"{{"schema":"read_receipt.v1","kind":"c2c_watermark","sdk_app_id":1,"conversation_id":"c2c:a:b","readers":["{}"],"read_up_to_ms":{},"event_time_ms":{t}}}"#,
                ["a", "b"][rng.below(2) as usize],
                rng.below(1_000_000) * 1000
            ),
        };
        out.push(ReadEvent::parse(json.as_bytes()).expect("a valid event"));
    }
    out
}

/// Folds events in order, as one materializer would; counts the writes.
fn fold(events: &[&ReadEvent]) -> (BTreeMap<String, ReadState>, usize) {
    let mut states: BTreeMap<String, ReadState> = BTreeMap::new();
    let mut writes = 0;
    for e in events {
        let changed = match states.get_mut(&e.key()) {
            Some(s) => s.fold(e, MAX_READERS),
            None => {
                states.insert(e.key(), ReadState::of_event(e, MAX_READERS));
                true
            }
        };
        writes += changed as usize;
    }
    (states, writes)
}

#[test]
fn any_order_with_any_duplicates_folds_to_the_same_state() {
    let mut rng = Rng(0x7ead_57a7e);
    for case in 0..300 {
        let set = events(&mut rng);
        let reference = fold(&set.iter().collect::<Vec<_>>()).0;
        for _ in 0..8 {
            // A permutation in which every event appears one to three times.
            let mut seq: Vec<&ReadEvent> = set
                .iter()
                .flat_map(|e| std::iter::repeat_n(e, 1 + rng.below(3) as usize))
                .collect();
            rng.shuffle(&mut seq);
            let (states, writes) = fold(&seq);
            assert_eq!(
                states, reference,
                "case {case}: the order changed the state"
            );
            // A write per change at most, never one per duplicate.
            assert!(
                writes <= set.len(),
                "case {case}: {writes} writes for {} events",
                set.len()
            );

            // Folding anything already in changes nothing: nothing to write.
            let mut again = states.clone();
            for e in &set {
                assert!(
                    !again.get_mut(&e.key()).unwrap().fold(e, MAX_READERS),
                    "case {case}: a duplicate changed the state"
                );
            }

            // Two processes each fold part of the input (a rebalance
            // mid-stream, with overlap), and one rebuilds from the other's
            // states: the same state again.
            let cut = rng.below(seq.len() as u64 + 1) as usize;
            let overlap = rng.below(4) as usize;
            let (mut first, _) = fold(&seq[..cut]);
            let (second, _) = fold(&seq[cut.saturating_sub(overlap)..]);
            for (k, s) in second {
                match first.get_mut(&k) {
                    Some(f) => {
                        f.join(&s, MAX_READERS);
                    }
                    None => {
                        first.insert(k, s);
                    }
                }
            }
            assert_eq!(first, reference, "case {case}: joined partial folds differ");
        }
        for s in reference.values() {
            assert!(s.readers.len() <= MAX_READERS);
        }
    }
}

#[test]
fn readers_past_the_cap_are_the_same_whatever_the_order() {
    // Ten readers, cap four: the four smallest, flagged, in every order.
    let mut rng = Rng(11);
    let set: Vec<ReadEvent> = (0..10)
        .map(|i| {
            ReadEvent::parse(format!(
                r#"{{"schema":"read_receipt.v1","kind":"group_message","sdk_app_id":1,"conversation_id":"g","msg_seq":1,"read_count":{i},"unread_count":1,"readers":["r{i}"],"event_time_ms":{i}}}"#
            ).as_bytes())
            .unwrap()
        })
        .collect();
    for _ in 0..50 {
        let mut seq: Vec<&ReadEvent> = set.iter().collect();
        rng.shuffle(&mut seq);
        let (states, _) = fold(&seq);
        let s = &states["1/g/1"];
        assert_eq!(
            s.readers.iter().map(String::as_str).collect::<Vec<_>>(),
            ["r0", "r1", "r2", "r3"]
        );
        assert!(s.readers_truncated);
        assert_eq!(s.read_count, Some(9));
    }
}

/// Different messages (or watermarks) never share a state key, whatever
/// characters their ids hold: a MsgKey shaped like a watermark ref, a
/// GroupId shaped like a one-to-one conversation, ids holding `/` or `%`.
#[test]
fn different_messages_never_share_a_state_key() {
    let ids = [
        "bob",
        "watermark/bob",
        "watermark%2Fbob",
        "c2c:alice:bob",
        "c2c:alice:bob/watermark",
        "c2c%3Aalice%3Abob",
        "a/b",
        "a%2Fb",
        "1",
    ];
    let mut events = Vec::new();
    for id in ids {
        let id = serde_json::to_string(id).unwrap();
        events.push(format!(
            r#"{{"schema":"read_receipt.v1","kind":"group_message","sdk_app_id":1,"conversation_id":{id},"group_id":{id},"msg_seq":1,"event_time_ms":1}}"#
        ));
        events.push(format!(
            r#"{{"schema":"read_receipt.v1","kind":"c2c_message","sdk_app_id":1,"conversation_id":"c2c:alice:bob","msg_key":{id},"readers":["bob"],"event_time_ms":1}}"#
        ));
        events.push(format!(
            r#"{{"schema":"read_receipt.v1","kind":"c2c_watermark","sdk_app_id":1,"conversation_id":"c2c:alice:bob","readers":[{id}],"read_up_to_ms":1000,"event_time_ms":1}}"#
        ));
    }
    let mut seen = BTreeMap::new();
    for json in &events {
        let e = ReadEvent::parse(json.as_bytes()).unwrap();
        if let Some(other) = seen.insert(e.key(), json) {
            panic!("{json}\nand\n{other}\nshare the key {}", e.key());
        }
    }
}
