//! What to do about a Kafka error: the one place that decides it.
//!
//! Both failure paths ask [`classify`]: `produce()` refusing a record at
//! once, and a negative delivery report later. The rule is that a record
//! leaves the spool without reaching Kafka only when Kafka can never accept
//! *that record*; anything an operator can fix (a missing topic, an ACL, a
//! SASL secret) or that passes by itself (a broker away, a leader moving)
//! is retried, with backoff, for as long as it lasts. Waiting costs spool
//! space, which is bounded and alerted on; dead-lettering costs a manual
//! replay of events that were never at fault.
//!
//! | librdkafka error | reason label | action |
//! |---|---|---|
//! | `MSG_SIZE_TOO_LARGE`, `INVALID_MSG_SIZE` | `too_large` | dead letter (from the broker: after one more attempt alone) |
//! | `INVALID_RECORD`, `_BAD_MSG` | `invalid_record` | dead letter (from the broker: after one more attempt alone) |
//! | `_FATAL` (the producer is fatally failed) | `fatal` | rebuild the producer, send again |
//! | `OUT_OF_ORDER_SEQUENCE_NUMBER`, `INVALID_PRODUCER_EPOCH`, `PRODUCER_FENCED` | `fatal` | retry with backoff; librdkafka bumps the epoch itself, or declares the producer fatally failed (`_FATAL`, above) |
//! | `TOPIC_AUTHORIZATION_FAILED`, `CLUSTER_AUTHORIZATION_FAILED`, `TRANSACTIONAL_ID_AUTHORIZATION_FAILED` | `not_authorized` | retry with backoff |
//! | `SASL_AUTHENTICATION_FAILED`, `_AUTHENTICATION`, `_SSL` | `authentication` | retry with backoff |
//! | `UNKNOWN_TOPIC_OR_PART`, `_UNKNOWN_TOPIC`, `_UNKNOWN_PARTITION`, `TOPIC_EXCEPTION` (invalid topic) | `unknown_topic` | retry with backoff |
//! | `_MSG_TIMED_OUT` | `timed_out` | retry with backoff |
//! | `_TRANSPORT`, `_ALL_BROKERS_DOWN`, `_RESOLVE`, `NETWORK_EXCEPTION`, `REQUEST_TIMED_OUT` | `transport` | retry with backoff |
//! | `_PURGE_QUEUE`, `_PURGE_INFLIGHT` (a failed producer's leftovers) | `purged` | retry with backoff |
//! | `_QUEUE_FULL` (from `produce()`) | `queue_full` | wait a moment, hand it over again |
//! | anything else (`NOT_LEADER_FOR_PARTITION`, `CORRUPT_MESSAGE`, `RECORD_LIST_TOO_LARGE`, …) | `other` | retry with backoff |
//!
//! The README's "Kafka errors" table is this table; keep them in step.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The fate of a record whose delivery failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send it again after a pause that grows while nothing gets through.
    /// The label says why, for `timbridge_kafka_errors_total{reason}`.
    Retry(&'static str),
    /// librdkafka's own queue is full: hand the record over again shortly.
    Wait,
    /// Kafka will never take this record: to the dead-letter file (and
    /// topic), so that it does not block the records behind it. From a
    /// delivery report, only once the record was refused in a request of
    /// its own: the broker judges whole batches.
    DeadLetter(&'static str),
    /// The producer is fatally failed and refuses everything from now on:
    /// build a new one, then send the record again.
    Rebuild,
}

impl Action {
    /// The `reason` label of `timbridge_kafka_errors_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Action::Retry(reason) | Action::DeadLetter(reason) => reason,
            Action::Wait => "queue_full",
            Action::Rebuild => "fatal",
        }
    }
}

/// Decides what a Kafka error means for the record it came with; see the
/// module doc for the rules and why.
pub fn classify(err: &KafkaError) -> Action {
    use RDKafkaErrorCode as E;
    let Some(code) = err.rdkafka_error_code() else {
        return Action::Retry("other");
    };
    match code {
        E::MessageSizeTooLarge | E::InvalidMessageSize => Action::DeadLetter("too_large"),
        E::InvalidRecord | E::BadMessage => Action::DeadLetter("invalid_record"),
        E::Fatal => Action::Rebuild,
        // The idempotent producer's state: librdkafka recovers by itself
        // (an epoch bump) or says the producer is fatally failed, with
        // `_FATAL`; a rebuild for each report would throw away a producer
        // that was about to recover.
        E::OutOfOrderSequenceNumber | E::InvalidProducerEpoch | E::ProducerFenced => {
            Action::Retry("fatal")
        }
        E::TopicAuthorizationFailed
        | E::ClusterAuthorizationFailed
        | E::TransactionalIdAuthorizationFailed => Action::Retry("not_authorized"),
        E::SaslAuthenticationFailed | E::Authentication | E::SSL => Action::Retry("authentication"),
        E::UnknownTopicOrPartition | E::UnknownTopic | E::UnknownPartition | E::InvalidTopic => {
            Action::Retry("unknown_topic")
        }
        E::MessageTimedOut => Action::Retry("timed_out"),
        E::BrokerTransportFailure
        | E::AllBrokersDown
        | E::Resolve
        | E::NetworkException
        | E::RequestTimedOut => Action::Retry("transport"),
        E::PurgeQueue | E::PurgeInflight => Action::Retry("purged"),
        E::QueueFull => Action::Wait,
        _ => Action::Retry("other"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode as E;

    fn delivery(code: RDKafkaErrorCode) -> Action {
        classify(&KafkaError::MessageProduction(code))
    }

    #[test]
    fn only_records_kafka_can_never_take_are_dead_lettered() {
        for code in [
            E::MessageSizeTooLarge,
            E::InvalidMessageSize,
            E::InvalidRecord,
            E::BadMessage,
        ] {
            assert!(matches!(delivery(code), Action::DeadLetter(_)), "{code:?}");
        }
    }

    #[test]
    fn conditions_an_operator_can_fix_are_retried() {
        for (code, reason) in [
            (E::TopicAuthorizationFailed, "not_authorized"),
            (E::ClusterAuthorizationFailed, "not_authorized"),
            (E::SaslAuthenticationFailed, "authentication"),
            (E::Authentication, "authentication"),
            (E::UnknownTopicOrPartition, "unknown_topic"),
            (E::UnknownTopic, "unknown_topic"),
            (E::UnknownPartition, "unknown_topic"),
            (E::InvalidTopic, "unknown_topic"),
            // Kafka treats CORRUPT_MESSAGE as retriable (a bad network copy).
            (E::InvalidMessage, "other"),
            (E::NotLeaderForPartition, "other"),
            (E::MessageTimedOut, "timed_out"),
            (E::AllBrokersDown, "transport"),
            (E::PurgeQueue, "purged"),
        ] {
            assert_eq!(delivery(code), Action::Retry(reason), "{code:?}");
        }
    }

    #[test]
    fn a_fatally_failed_producer_is_rebuilt() {
        assert_eq!(delivery(E::Fatal), Action::Rebuild);
        // Only once librdkafka says so: it often recovers by itself.
        for code in [
            E::OutOfOrderSequenceNumber,
            E::InvalidProducerEpoch,
            E::ProducerFenced,
        ] {
            assert_eq!(delivery(code), Action::Retry("fatal"), "{code:?}");
        }
        assert_eq!(
            classify(&KafkaError::Global(E::Fatal)),
            Action::Rebuild,
            "produce() on a failed producer"
        );
    }

    #[test]
    fn every_reason_has_a_label_value() {
        for code in (-200..130)
            .filter_map(|c| rdkafka::types::RDKafkaRespErr::try_from(c).ok())
            .map(RDKafkaErrorCode::from)
        {
            let reason = delivery(code).reason();
            assert!(
                crate::metrics::KAFKA_ERROR_LABELS.contains(&reason),
                "{code:?}: {reason}"
            );
        }
    }
}
