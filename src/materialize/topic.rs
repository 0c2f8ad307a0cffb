//! The start-up check of the state topic: present (created if missing,
//! compacted), with at least as many partitions as the input topics, since
//! input partition p writes to state partition p.

use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::metadata::Metadata;

use crate::config::Config;

const METADATA_TIMEOUT: Duration = Duration::from_secs(15);

fn partitions(md: &Metadata, topic: &str) -> Option<usize> {
    md.topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0)
}

/// Checks (and if need be creates) the state topic; returns the number of
/// input partitions per topic.
pub async fn ensure_state_topic(base: &ClientConfig, config: &Config) -> anyhow::Result<usize> {
    let admin: AdminClient<DefaultClientContext> = base.create().context(
        "cannot create a Kafka admin client: check [kafka.properties] and [read_state.properties]",
    )?;
    let md = admin
        .inner()
        .fetch_metadata(None, METADATA_TIMEOUT)
        .with_context(|| {
            format!(
                "cannot read the cluster's metadata from {}: is Kafka reachable?",
                config.kafka.brokers
            )
        })?;
    let mut need = 0;
    for topic in [&config.kafka.group_topic, &config.kafka.c2c_topic] {
        let n = partitions(&md, topic).with_context(|| {
            format!("input topic {topic} does not exist: create it, or start the gateway first")
        })?;
        need = need.max(n);
    }
    let state = &config.read_state.topic;
    match partitions(&md, state) {
        Some(have) if have < need => bail!(
            "state topic {state} has {have} partitions but the input topics have {need}: \
             input partition p writes to state partition p, so add partitions \
             (kafka-topics --alter --topic {state} --partitions {need})"
        ),
        Some(have) => {
            tracing::info!(topic = %state, partitions = have, input_partitions = need, "state topic found");
            check_compacted(&admin, state).await;
        }
        None => {
            let replication = md.brokers().len().clamp(1, 3) as i32;
            let topic = NewTopic::new(state, need as i32, TopicReplication::Fixed(replication))
                .set("cleanup.policy", "compact");
            let opts = AdminOptions::new()
                .operation_timeout(Some(METADATA_TIMEOUT))
                .request_timeout(Some(METADATA_TIMEOUT));
            let created = admin
                .create_topics([&topic], &opts)
                .await
                .map_err(anyhow::Error::from)
                .and_then(|mut r| match r.pop() {
                    Some(Err((_, e))) => Err(anyhow::anyhow!("{e}")),
                    _ => Ok(()),
                });
            if let Err(e) = created {
                bail!(
                    "state topic {state} does not exist and cannot be created ({e}): create it with \
                     kafka-topics --create --topic {state} --partitions {need} --config cleanup.policy=compact"
                );
            }
            tracing::info!(topic = %state, partitions = need, replication, "state topic created, compacted");
        }
    }
    Ok(need)
}

/// Says whether the state topic is compacted. Not fatal: an operator may
/// want `compact,delete`, and some brokers do not answer the question.
async fn check_compacted(admin: &AdminClient<DefaultClientContext>, topic: &str) {
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    let answer = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await;
    let policy = match answer {
        Ok(mut r) => match r.pop() {
            Some(Ok(res)) => res
                .get("cleanup.policy")
                .and_then(|e| e.value.clone())
                .unwrap_or_default(),
            Some(Err(e)) => {
                tracing::warn!(%topic, error = %e, "cannot check the state topic's cleanup.policy: make sure it is compact");
                return;
            }
            None => return,
        },
        Err(e) => {
            tracing::warn!(%topic, error = %e, "cannot check the state topic's cleanup.policy: make sure it is compact");
            return;
        }
    };
    if policy.split(',').any(|p| p.trim() == "compact") {
        tracing::info!(%topic, cleanup_policy = %policy, "state topic is compacted");
    } else {
        tracing::warn!(
            %topic,
            cleanup_policy = %policy,
            "the state topic is not compacted: it will keep every version and rebuilds will read them all; \
             set cleanup.policy=compact (kafka-configs --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact)"
        );
    }
}
