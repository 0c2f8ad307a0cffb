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
//! | a success report without an offset (librdkafka's "implicit ack"; decided in `delivery.rs`, not here) | `unconfirmed` | retry with backoff |
//!
//! The README's "Kafka errors" table is this table; keep them in step.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::labels::KafkaErrorReason as Reason;

/// The fate of a record whose delivery failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send it again after a pause that grows while nothing gets through.
    /// The label says why, for `timbridge_kafka_errors_total{reason}`.
    Retry(Reason),
    /// librdkafka's own queue is full: hand the record over again shortly.
    Wait,
    /// Kafka will never take this record: to the dead-letter file (and
    /// topic), so that it does not block the records behind it. From a
    /// delivery report, only once the record was refused in a request of
    /// its own: the broker judges whole batches.
    DeadLetter(Reason),
    /// The producer is fatally failed and refuses everything from now on:
    /// build a new one, then send the record again.
    Rebuild,
}

impl Action {
    /// The `reason` label of `timbridge_kafka_errors_total`.
    pub fn reason(self) -> Reason {
        match self {
            Action::Retry(reason) | Action::DeadLetter(reason) => reason,
            Action::Wait => Reason::QueueFull,
            Action::Rebuild => Reason::Fatal,
        }
    }
}

/// Decides what a Kafka error means for the record it came with; see the
/// module doc for the rules and why.
pub fn classify(err: &KafkaError) -> Action {
    use RDKafkaErrorCode as E;
    let Some(code) = err.rdkafka_error_code() else {
        return Action::Retry(Reason::Other);
    };
    match code {
        E::MessageSizeTooLarge | E::InvalidMessageSize => Action::DeadLetter(Reason::TooLarge),
        E::InvalidRecord | E::BadMessage => Action::DeadLetter(Reason::InvalidRecord),
        E::Fatal => Action::Rebuild,
        // The idempotent producer's state: librdkafka recovers by itself
        // (an epoch bump) or says the producer is fatally failed, with
        // `_FATAL`; a rebuild for each report would throw away a producer
        // that was about to recover.
        E::OutOfOrderSequenceNumber | E::InvalidProducerEpoch | E::ProducerFenced => {
            Action::Retry(Reason::Fatal)
        }
        E::TopicAuthorizationFailed
        | E::ClusterAuthorizationFailed
        | E::TransactionalIdAuthorizationFailed => Action::Retry(Reason::NotAuthorized),
        E::SaslAuthenticationFailed | E::Authentication | E::SSL => {
            Action::Retry(Reason::Authentication)
        }
        E::UnknownTopicOrPartition | E::UnknownTopic | E::UnknownPartition | E::InvalidTopic => {
            Action::Retry(Reason::UnknownTopic)
        }
        E::MessageTimedOut => Action::Retry(Reason::TimedOut),
        E::BrokerTransportFailure
        | E::AllBrokersDown
        | E::Resolve
        | E::NetworkException
        | E::RequestTimedOut => Action::Retry(Reason::Transport),
        E::PurgeQueue | E::PurgeInflight => Action::Retry(Reason::Purged),
        E::QueueFull => Action::Wait,
        _ => Action::Retry(Reason::Other),
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
            (E::TopicAuthorizationFailed, Reason::NotAuthorized),
            (E::ClusterAuthorizationFailed, Reason::NotAuthorized),
            (E::SaslAuthenticationFailed, Reason::Authentication),
            (E::Authentication, Reason::Authentication),
            (E::UnknownTopicOrPartition, Reason::UnknownTopic),
            (E::UnknownTopic, Reason::UnknownTopic),
            (E::UnknownPartition, Reason::UnknownTopic),
            (E::InvalidTopic, Reason::UnknownTopic),
            // Kafka treats CORRUPT_MESSAGE as retriable (a bad network copy).
            (E::InvalidMessage, Reason::Other),
            (E::NotLeaderForPartition, Reason::Other),
            (E::MessageTimedOut, Reason::TimedOut),
            (E::AllBrokersDown, Reason::Transport),
            (E::PurgeQueue, Reason::Purged),
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
            assert_eq!(delivery(code), Action::Retry(Reason::Fatal), "{code:?}");
        }
        assert_eq!(
            classify(&KafkaError::Global(E::Fatal)),
            Action::Rebuild,
            "produce() on a failed producer"
        );
    }
}
