//! `brokers = "embedded"`: an in-process Kafka for trying timbridge out.
//!
//! It is librdkafka's mock cluster (the broker librdkafka tests itself
//! against): real Kafka protocol on 127.0.0.1, so `kcat -b ADDR` can read
//! what the gateway wrote. It keeps everything in memory and forgets it at
//! exit: never for production.
//!
//! The mock cluster is not `Send`, so it lives on a thread of its own for
//! as long as the handle does.

use std::sync::mpsc;
use std::thread;

use rdkafka::mocking::MockCluster;

/// Partitions per topic in the embedded cluster.
pub const PARTITIONS: i32 = 4;

pub struct EmbeddedKafka {
    bootstrap: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EmbeddedKafka {
    /// Starts a one-broker cluster with `topics` created.
    pub fn start(topics: &[String]) -> anyhow::Result<EmbeddedKafka> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let topics = topics.to_vec();
        let thread = thread::Builder::new()
            .name("embedded-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot start the mock cluster: {e}")));
                        return;
                    }
                };
                for t in &topics {
                    if let Err(e) = cluster.create_topic(t, PARTITIONS, 1) {
                        let _ = ready_tx.send(Err(format!("cannot create topic {t}: {e}")));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Hold the cluster until the handle is dropped.
                let _ = stop_rx.recv();
                drop(cluster);
            })?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("embedded Kafka thread ended before it started"))?
            .map_err(anyhow::Error::msg)?;
        Ok(EmbeddedKafka {
            bootstrap,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `host:port` of the broker, for the producer and for `kcat -b`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
