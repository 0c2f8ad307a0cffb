//! Tencent Cloud Chat's side of the wire: the query string Tencent appends to
//! the callback URL, the `Sign`/`RequestTime` check, the typed bodies of the
//! three read-receipt callbacks, and the JSON answer Tencent expects.
//!
//! Nothing here knows about Kafka or the spool; it turns an HTTP request into
//! either a checked [`payload::Callback`] or a [`answer::Rejection`].

pub mod answer;
pub mod auth;
pub mod payload;
pub mod query;

/// The callback commands timbridge turns into `read_receipt.v1` events.
pub const GROUP_READ_RECEIPT: &str = "Group.CallbackAfterReadReceipt";
pub const C2C_READ_RECEIPT: &str = "C2C.CallbackAfterMsgReadReceipt";
pub const C2C_REPORT: &str = "C2C.CallbackAfterMsgReport";
