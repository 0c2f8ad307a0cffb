//! Input limits: how much one callback may ask of the gateway.
//!
//! The port faces the internet, and one request used to be able to ask for
//! gigabytes of records (a long GroupId copied into each of thousands of
//! items). Every string and list copied into the records is bounded here, and
//! the bounds are checked while the body is parsed, so an oversized callback
//! is answered 400 before anything is built for it.
//!
//! The defaults sit well above what Tencent documents (see the README's
//! "Limits" section for each source), so that genuine callbacks never reach
//! them: a genuine callback refused is lost, Tencent does not retry it.

use serde::{Deserialize, Serialize};

/// The bytes one callback may add to the spool, per byte of its request
/// (query string + body). Each item becomes a record of about 560 bytes
/// plus its strings, so a genuine callback of items without readers adds
/// 14 to 16 bytes per byte; an amplification attack asked for hundreds.
pub const OUTPUT_BYTES_PER_REQUEST_BYTE: usize = 16;

/// What any callback may add to the spool on top of its 16 bytes per byte:
/// 50 items without readers under a 48-byte GroupId and an IPv6 ClientIP
/// take about 38 KB, a little over 16 times their 2.3 KB, and must not be
/// refused for it. Added, not a floor: a 64 KiB floor let a sub-kilobyte
/// c2c callback (accounts full of `:`, each escaped to `%3A` in both key and
/// conversation id) take 72 times its size.
pub const OUTPUT_BYTES_ALLOWANCE: usize = 8 * 1024;

/// The `[limits]` section of the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// `GroupId`: Tencent allows 48 bytes for a custom group ID.
    pub group_id_bytes: usize,
    /// Any account (`Member_Account`, `Operator_Account`, …): Tencent's
    /// UserID is at most 32 bytes.
    pub account_bytes: usize,
    /// `MsgKey` (`MsgSeq_MsgRandom_MsgTime`, three integers) and `MsgId`.
    pub msg_key_bytes: usize,
    /// `Type`: Tencent's group types are short words (`Public`, `Work`, …).
    pub group_type_bytes: usize,
    /// Items in `GroupMsgReceiptList` or `C2CMsgInfo`.
    pub receipt_items: usize,
    /// `ReadReceiptMembers` of one item: groups have at most 6,000 members.
    pub readers_per_item: usize,
    /// `ClientIP` in the query string (an IPv6 address is at most 45 bytes).
    pub client_ip_bytes: usize,
    /// `OptPlatform` in the query string.
    pub platform_bytes: usize,
    /// `CallbackCommand` in the query string; at most 65,535 (the record
    /// format stores its length in two bytes).
    pub command_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        group_id_bytes: 128,
        account_bytes: 128,
        msg_key_bytes: 128,
        group_type_bytes: 32,
        receipt_items: 1000,
        readers_per_item: 10_000,
        client_ip_bytes: 64,
        platform_bytes: 32,
        command_bytes: 256,
    };

    /// The value of one limit.
    pub fn get(&self, limit: Limit) -> usize {
        match limit {
            Limit::GroupIdBytes => self.group_id_bytes,
            Limit::AccountBytes => self.account_bytes,
            Limit::MsgKeyBytes => self.msg_key_bytes,
            Limit::GroupTypeBytes => self.group_type_bytes,
            Limit::ReceiptItems => self.receipt_items,
            Limit::ReadersPerItem => self.readers_per_item,
            Limit::ClientIpBytes => self.client_ip_bytes,
            Limit::PlatformBytes => self.platform_bytes,
            Limit::CommandBytes => self.command_bytes,
            Limit::OutputBytes => usize::MAX,
        }
    }

    /// Checks the values, naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        for &limit in Limit::CONFIGURED {
            if self.get(limit) == 0 {
                return Err(format!(
                    "limits.{} must be at least 1 (remove the key for the default, {})",
                    limit.key(),
                    Limits::DEFAULT.get(limit)
                ));
            }
        }
        if self.command_bytes > u16::MAX as usize {
            return Err(format!(
                "limits.command_bytes must be at most {} (the spool record stores the command's length in two bytes)",
                u16::MAX
            ));
        }
        Ok(())
    }
}

/// One limit, as named in errors and in the `limit` label of
/// `timbridge_callbacks_over_limit_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    GroupIdBytes,
    AccountBytes,
    MsgKeyBytes,
    GroupTypeBytes,
    ReceiptItems,
    ReadersPerItem,
    ClientIpBytes,
    PlatformBytes,
    CommandBytes,
    /// The records would take more than [`OUTPUT_BYTES_PER_REQUEST_BYTE`]
    /// times the request's bytes.
    OutputBytes,
}

impl Limit {
    /// Every value of the `limit` metric label.
    pub const ALL: [Limit; 10] = [
        Limit::GroupIdBytes,
        Limit::AccountBytes,
        Limit::MsgKeyBytes,
        Limit::GroupTypeBytes,
        Limit::ReceiptItems,
        Limit::ReadersPerItem,
        Limit::ClientIpBytes,
        Limit::PlatformBytes,
        Limit::CommandBytes,
        Limit::OutputBytes,
    ];

    /// The limits set in `[limits]`: all but `OutputBytes`, which is the
    /// spool budget, not a key.
    pub const CONFIGURED: &[Limit] = Limit::ALL.split_at(Limit::ALL.len() - 1).0;

    /// The key in `[limits]`, which is also the metric label.
    pub fn key(self) -> &'static str {
        match self {
            Limit::GroupIdBytes => "group_id_bytes",
            Limit::AccountBytes => "account_bytes",
            Limit::MsgKeyBytes => "msg_key_bytes",
            Limit::GroupTypeBytes => "group_type_bytes",
            Limit::ReceiptItems => "receipt_items",
            Limit::ReadersPerItem => "readers_per_item",
            Limit::ClientIpBytes => "client_ip_bytes",
            Limit::PlatformBytes => "platform_bytes",
            Limit::CommandBytes => "command_bytes",
            Limit::OutputBytes => "output_bytes",
        }
    }
}

impl crate::labels::LabelValue for Limit {
    const VALUES: &'static [Limit] = &Limit::ALL;

    fn label(self) -> &'static str {
        self.key()
    }

    fn index(self) -> usize {
        // `ALL` lists the variants in declaration order.
        self as usize
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary: for quoting attacker-sized strings in errors and logs.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zero_or_oversized_values_are_not() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let zero = Limits {
            receipt_items: 0,
            ..Limits::DEFAULT
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .contains("limits.receipt_items")
        );
        let big = Limits {
            command_bytes: 70_000,
            ..Limits::DEFAULT
        };
        assert!(big.validate().unwrap_err().contains("limits.command_bytes"));
    }

    #[test]
    fn clip_never_splits_a_character() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("abc", 2), "ab");
        assert_eq!(clip("éé", 3), "é");
        assert_eq!(clip("é", 1), "");
    }
}
