//! Every label value a `timbridge_` series takes, each spelled once.
//!
//! The stages name what happened with these enums; only `metrics` (and the
//! events' `kind` field) turn them into text. A value seen on a dashboard
//! greps to exactly one line here, and `ALL` is what `metrics` resolves at
//! start, so a series exists before its first increment and the hot path
//! finds it by index.
//!
//! `limit` (of `timbridge_callbacks_over_limit_total`) is
//! [`crate::limits::Limit`], whose values are the `[limits]` keys.

/// A label whose values are a closed enum, so that `metrics` can resolve
/// each series once at start and find it by [`LabelValue::index`] on the
/// hot path, instead of hashing label strings under a lock per increment.
pub trait LabelValue: Copy + 'static {
    /// Every value; a value's [`LabelValue::index`] is its place here.
    const VALUES: &'static [Self];

    /// The label value as it appears in `/metrics`.
    fn label(self) -> &'static str;

    /// The value's place in [`LabelValue::VALUES`].
    fn index(self) -> usize;
}

/// An enum whose variants are label values: `as_str()` and `ALL`.
macro_rules! label_values {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:expr),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in the order the metrics list them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl LabelValue for $name {
            const VALUES: &'static [$name] = $name::ALL;

            fn label(self) -> &'static str {
                self.as_str()
            }

            fn index(self) -> usize {
                // `ALL` lists the variants in declaration order, and they
                // carry no explicit discriminants.
                self as usize
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_values! {
    /// The `command` label of `timbridge_callbacks_total`: the three
    /// read-receipt commands, or `other` (the label must stay bounded, and
    /// any string may arrive as a command).
    pub enum Command {
        GroupReadReceipt => crate::tencent::GROUP_READ_RECEIPT,
        C2cReadReceipt => crate::tencent::C2C_READ_RECEIPT,
        C2cReport => crate::tencent::C2C_REPORT,
        Other => "other",
    }
}

impl Command {
    /// The label of the command a callback names.
    pub fn of(command: &str) -> Command {
        use crate::tencent::{C2C_READ_RECEIPT, C2C_REPORT, GROUP_READ_RECEIPT};
        match command {
            GROUP_READ_RECEIPT => Command::GroupReadReceipt,
            C2C_READ_RECEIPT => Command::C2cReadReceipt,
            C2C_REPORT => Command::C2cReport,
            _ => Command::Other,
        }
    }
}

label_values! {
    /// The `outcome` label of `timbridge_callbacks_total`.
    pub enum Outcome {
        Accepted => "accepted",
        Duplicate => "duplicate",
        Ignored => "ignored",
        Forwarded => "forwarded",
        Proxied => "proxied",
        UpstreamFailed => "upstream_failed",
        Invalid => "invalid",
        Unauthorized => "unauthorized",
        UnknownApp => "unknown_app",
        ForbiddenSource => "forbidden_source",
        TooLarge => "too_large",
        Overloaded => "overloaded",
    }
}

label_values! {
    /// The `kind` label of `timbridge_events_total`: what a record written
    /// to the spool carries, a `read_receipt.v1` event of one of its kinds
    /// or another command's raw body.
    pub enum RecordKind {
        GroupMessage => crate::event::Kind::GroupMessage.as_str(),
        C2cMessage => crate::event::Kind::C2cMessage.as_str(),
        C2cWatermark => crate::event::Kind::C2cWatermark.as_str(),
        Raw => "raw",
    }
}

impl From<crate::event::Kind> for RecordKind {
    fn from(kind: crate::event::Kind) -> RecordKind {
        use crate::event::Kind;
        match kind {
            Kind::GroupMessage => RecordKind::GroupMessage,
            Kind::C2cMessage => RecordKind::C2cMessage,
            Kind::C2cWatermark => RecordKind::C2cWatermark,
        }
    }
}

label_values! {
    /// The `reason` label of `timbridge_kafka_errors_total`; which Kafka
    /// error gives which is `publish::classify`'s table.
    pub enum KafkaErrorReason {
        TimedOut => "timed_out",
        TooLarge => "too_large",
        InvalidRecord => "invalid_record",
        NotAuthorized => "not_authorized",
        Authentication => "authentication",
        UnknownTopic => "unknown_topic",
        QueueFull => "queue_full",
        Transport => "transport",
        Fatal => "fatal",
        Purged => "purged",
        Unconfirmed => "unconfirmed",
        Other => "other",
    }
}

label_values! {
    /// The `listener` label of the connection metrics.
    pub enum Listener {
        Callback => "callback",
        Admin => "admin",
    }
}

label_values! {
    /// The `stage` label of `timbridge_connections_timed_out_total`: the
    /// request head did not arrive in time, or the client did not take its
    /// answer in time.
    pub enum TimeoutStage {
        Head => "head",
        Answer => "answer",
    }
}

label_values! {
    /// The `outcome` label of `timbridge_upstream_requests_total`.
    pub enum UpstreamOutcome {
        /// The app answered, with any status.
        Answered => "answered",
        Unreachable => "unreachable",
        Timeout => "timeout",
        BadAnswer => "bad_answer",
        /// Refused at `max_in_flight`, never sent.
        Busy => "busy",
    }
}

label_values! {
    /// The `reason` label of `timbridge_upstream_forward_dropped_total`.
    pub enum UpstreamDrop {
        QueueFull => "queue_full",
        /// Retried until its Sign went stale.
        Expired => "expired",
    }
}

label_values! {
    /// The `result` label of `timbridge_config_reloads_total`.
    pub enum ReloadResult {
        Success => "success",
        Error => "error",
    }
}

label_values! {
    /// The `source` label of `timbridge_spool_records_read_total`: where
    /// the publisher took spooled records from.
    pub enum ReadSource {
        Disk => "disk",
        Memory => "memory",
    }
}

label_values! {
    /// The `reason` label of `timbridge_tls_handshakes_failed_total`.
    pub enum HandshakeFailure {
        Timeout => "timeout",
        Error => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indexes_are_places<L: LabelValue + std::fmt::Debug>() {
        for (i, v) in L::VALUES.iter().enumerate() {
            assert_eq!(v.index(), i, "{v:?}");
        }
    }

    #[test]
    fn every_label_value_is_found_at_its_index() {
        indexes_are_places::<Command>();
        indexes_are_places::<Outcome>();
        indexes_are_places::<RecordKind>();
        indexes_are_places::<KafkaErrorReason>();
        indexes_are_places::<Listener>();
        indexes_are_places::<TimeoutStage>();
        indexes_are_places::<UpstreamOutcome>();
        indexes_are_places::<UpstreamDrop>();
        indexes_are_places::<ReloadResult>();
        indexes_are_places::<HandshakeFailure>();
        indexes_are_places::<crate::limits::Limit>();
    }
}
