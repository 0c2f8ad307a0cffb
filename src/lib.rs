//! timbridge: Tencent Cloud Chat read-receipt callbacks in, `read_receipt.v1`
//! records on Kafka out.

pub mod config;
pub mod dedup;
pub mod event;
pub mod record;
pub mod spool;
pub mod tencent;
pub mod throttle;
