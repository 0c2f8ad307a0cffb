//! An out-of-process Kafka-protocol broker for the end-to-end suite
//! (`tests/e2e/`) and the load harness.
//!
//! The in-process integration tests hold librdkafka's mock cluster
//! (`rdkafka::mocking::MockCluster`) inside the test binary. The end-to-end
//! suite cannot: it runs the real `timbridge` binary and reads the topics back
//! with independent clients (Debian's `kcat`, Python's `aiokafka`), so the
//! broker has to live in a process of its own that speaks real Kafka protocol
//! over TCP on 127.0.0.1. No Apache Kafka or Redpanda can be installed here;
//! this wraps the broker implementation librdkafka tests itself against.
//!
//! ```text
//! mock_broker [--brokers N] [--topic NAME:PARTITIONS]...
//! ```
//!
//! It creates the cluster and the topics (replication factor 1), prints exactly
//! one line `BOOTSTRAP=<bootstrap servers>` on stdout, then reads one command
//! per line on stdin and answers each with one line, `ok` or `error <text>`:
//!
//! | command | effect |
//! |---|---|
//! | `down <broker_id>` | disconnect the broker and refuse new connections (`-1`: all) |
//! | `up <broker_id>` | accept connections again (`-1`: all) |
//! | `rtt <broker_id> <ms>` | delay every answer of the broker by `ms` milliseconds |
//! | `quit` | destroy the cluster and exit; so does EOF on stdin |
//!
//! Broker ids start at 1. A fault is therefore injected by the test that
//! owns the process, at the moment it chooses, by writing to a pipe.

use std::io::{self, BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use rdkafka::mocking::MockCluster;

const USAGE: &str = "usage: mock_broker [--brokers N] [--topic NAME:PARTITIONS]...";

/// What the command line asked for.
struct Args {
    brokers: i32,
    topics: Vec<(String, i32)>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        brokers: 1,
        topics: Vec::new(),
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--brokers" => {
                let text = value("--brokers")?;
                parsed.brokers =
                    text.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        format!("--brokers wants a positive integer, got {text:?}")
                    })?;
            }
            "--topic" => {
                let text = value("--topic")?;
                let (name, partitions) = text
                    .rsplit_once(':')
                    .ok_or_else(|| format!("--topic wants NAME:PARTITIONS, got {text:?}"))?;
                let partitions = partitions.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    format!("--topic {text:?}: partitions must be a positive integer")
                })?;
                if name.is_empty() {
                    return Err(format!("--topic {text:?}: empty topic name"));
                }
                parsed.topics.push((name.to_owned(), partitions));
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

fn parse_broker_id(word: Option<&str>) -> Result<i32, String> {
    let word = word.ok_or("missing broker id")?;
    word.parse()
        .map_err(|_| format!("broker id must be an integer, got {word:?}"))
}

/// Carries out one stdin command; `Ok(true)` means stop.
fn execute<C: rdkafka::ClientContext>(
    cluster: &MockCluster<'_, C>,
    line: &str,
) -> Result<bool, String> {
    let mut words = line.split_whitespace();
    let Some(command) = words.next() else {
        return Err("empty command".into());
    };
    let result = match command {
        "quit" => return Ok(true),
        "down" => cluster.broker_down(parse_broker_id(words.next())?),
        "up" => cluster.broker_up(parse_broker_id(words.next())?),
        "rtt" => {
            let broker = parse_broker_id(words.next())?;
            let ms = words.next().ok_or("missing milliseconds")?;
            let ms: u64 = ms
                .parse()
                .map_err(|_| format!("milliseconds must be a non-negative integer, got {ms:?}"))?;
            cluster.broker_round_trip_time(broker, Duration::from_millis(ms))
        }
        other => return Err(format!("unknown command {other:?} (down, up, rtt, quit)")),
    };
    if let Some(extra) = words.next() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    result.map(|()| false).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("mock_broker: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(if message.is_empty() { 0 } else { 2 });
        }
    };

    // MockCluster is not Send: it stays on this thread for the whole run.
    let cluster = match MockCluster::new(args.brokers) {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("mock_broker: cannot create the mock cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (topic, partitions) in &args.topics {
        if let Err(e) = cluster.create_topic(topic, *partitions, 1) {
            eprintln!("mock_broker: cannot create topic {topic:?}: {e}");
            return ExitCode::FAILURE;
        }
    }

    let mut stdout = io::stdout().lock();
    let announced =
        writeln!(stdout, "BOOTSTRAP={}", cluster.bootstrap_servers()).and_then(|()| stdout.flush());
    if announced.is_err() {
        // Nobody is listening for the address: there is no point in running.
        return ExitCode::FAILURE;
    }

    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let (answer, stop) = match execute(&cluster, &line) {
            Ok(stop) => ("ok".to_owned(), stop),
            Err(message) => (format!("error {message}"), false),
        };
        if writeln!(stdout, "{answer}")
            .and_then(|()| stdout.flush())
            .is_err()
            || stop
        {
            break;
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn defaults_to_one_broker_and_no_topics() {
        let parsed = args(&[]).unwrap();
        assert_eq!(parsed.brokers, 1);
        assert!(parsed.topics.is_empty());
    }

    #[test]
    fn reads_brokers_and_repeated_topics() {
        let parsed = args(&["--brokers", "3", "--topic", "a.b:4", "--topic=c:1"]).unwrap();
        assert_eq!(parsed.brokers, 3);
        assert_eq!(
            parsed.topics,
            vec![("a.b".to_owned(), 4), ("c".to_owned(), 1)]
        );
    }

    #[test]
    fn rejects_bad_values() {
        assert!(args(&["--brokers", "0"]).is_err());
        assert!(args(&["--topic", "nopartitions"]).is_err());
        assert!(args(&["--topic", "t:x"]).is_err());
        assert!(args(&["--bogus"]).is_err());
    }
}
