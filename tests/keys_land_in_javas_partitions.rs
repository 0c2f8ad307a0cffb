//! Records land in the partition Java's default partitioner picks for their
//! key (murmur2 of the key bytes, made positive, modulo the partition
//! count), so that a consumer joining these topics with others keyed by
//! GroupId from a Java, Kafka Streams, ksqlDB or Flink producer finds the
//! same key in the same partition (co-partitioning). librdkafka's default
//! partitioner (CRC32) would put most of these keys elsewhere.

mod common;

use std::time::Duration;

use common::*;

/// Kafka's `Utils.murmur2` (the Java client), written out from its source
/// independently of librdkafka's implementation.
fn java_murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    const SEED: u32 = 0x9747_b28c;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() == 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// `Utils.toPositive(Utils.murmur2(key)) % numPartitions`.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    ((java_murmur2(key) & 0x7fff_ffff) % partitions as u32) as i32
}

#[test]
fn the_java_algorithm_as_written_here_matches_kafkas_published_values() {
    // Kafka's own UtilsTest.testMurmur2 vectors (as signed Java ints).
    for (key, want) in [
        ("21", -973932308i32),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
        ),
    ] {
        assert_eq!(java_murmur2(key.as_bytes()) as i32, want, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_and_c2c_records_use_javas_partition_for_their_key() {
    let s = setup();
    let gw = s.gateway(&[]).await;
    let groups = post_groups(gw.local_addr(), "@TGS#part", 0..24).await;
    let recs = read_topic(
        &s.bootstrap,
        GROUP_TOPIC,
        groups.len(),
        Duration::from_secs(30),
    );
    assert_eq!(recs.len(), groups.len());
    let mut used = std::collections::HashSet::new();
    for r in &recs {
        let want = java_partition(&r.key, PARTITIONS);
        assert_eq!(
            r.partition,
            want,
            "key {:?} is in partition {}, Java would put it in {want}",
            String::from_utf8_lossy(&r.key),
            r.partition
        );
        used.insert(r.partition);
    }
    // The keys spread: the check above is not one partition by chance.
    assert_eq!(used.len(), PARTITIONS as usize);

    assert_ok(
        &post(
            gw.local_addr(),
            &format!(
                "/callback?{}",
                signed_query("C2C.CallbackAfterMsgReadReceipt")
            ),
            C2C_RECEIPT_BODY.as_bytes(),
        )
        .await,
    );
    let recs = read_topic(&s.bootstrap, C2C_TOPIC, 2, Duration::from_secs(30));
    assert!(!recs.is_empty());
    for r in &recs {
        assert_eq!(
            r.partition,
            java_partition(&r.key, PARTITIONS),
            "{:?}",
            r.key
        );
    }
    gw.shutdown().await.unwrap();
}
