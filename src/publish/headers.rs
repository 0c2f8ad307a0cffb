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
                // The bytes themselves: they are ASCII hex (checked when the
                // record was decoded), and a header value is bytes anyway.
                value: Some(&id.0[..]),
            })
            .insert(Header {
                key: "timbridge-schema",
                value: Some(SCHEMA),
            });
    }
    // Formatted on the stack: this runs for every record published.
    let mut sdk_app_id = itoa::Buffer::new();
    let sdk_app_id = sdk_app_id.format(record.sdk_app_id);
    headers
        .insert(Header {
            key: "tim-callback-command",
            value: Some(record.command),
        })
        .insert(Header {
            key: "tim-sdkappid",
            value: Some(sdk_app_id),
        })
        .insert(Header {
            key: "content-type",
            value: Some("application/json"),
        })
}
