//! The Kafka headers of a record: what a consumer can route or deduplicate
//! on without parsing the value (see the README's "Kafka records").

use rdkafka::message::{Header, OwnedHeaders};

use crate::event::SCHEMA;
use crate::record::RecordRef;

/// `timbridge-event-id` and `timbridge-schema` for normalized events, then
/// the callback command, the SdkAppid and the content type for every record.
pub fn headers(record: &RecordRef<'_>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(5);
    if let Some(id) = &record.event_id {
        headers = headers
            .insert(Header {
                key: "timbridge-event-id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "timbridge-schema",
                value: Some(SCHEMA),
            });
    }
    let sdk_app_id = record.sdk_app_id.to_string();
    headers
        .insert(Header {
            key: "tim-callback-command",
            value: Some(record.command),
        })
        .insert(Header {
            key: "tim-sdkappid",
            value: Some(sdk_app_id.as_str()),
        })
        .insert(Header {
            key: "content-type",
            value: Some("application/json"),
        })
}
