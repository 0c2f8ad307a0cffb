//! The answer Tencent expects: `{"ActionStatus","ErrorCode","ErrorInfo"}`,
//! all three mandatory, with the HTTP status from the README's table ("HTTP").
//!
//! Tencent counts a delivery as failed when the status is not 200 or the body
//! is not JSON, and ignores the codes of "after" callbacks; the statuses and
//! codes are for people and monitors reading the traffic.

use hyper::StatusCode;

use crate::labels::Outcome;

/// Why a callback was not accepted. Each maps to one row of the README's
/// answer table and to one `outcome` label of `timbridge_callbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// Body not JSON, missing fields, wrong types: 400.
    Invalid,
    /// Sign/RequestTime missing, wrong or stale: 401.
    Unauthorized,
    /// SdkAppid missing or not configured: 403.
    UnknownApp,
    /// Body over max_body_bytes: 413.
    TooLarge,
    /// Spool full, disk error or shutting down: 503.
    Overloaded,
    /// The client did not send the body in time: 408.
    Timeout,
    /// [upstream] unreachable, or its answer broken or too large: 502.
    UpstreamUnreachable,
    /// [upstream] did not answer within its timeout: 504.
    UpstreamTimeout,
    /// [upstream] already has max_in_flight requests: 503.
    UpstreamBusy,
    /// The client address is outside `server.allow_from`: 403.
    ForbiddenSource,
}

impl RejectKind {
    pub fn status(self) -> StatusCode {
        match self {
            RejectKind::Invalid => StatusCode::BAD_REQUEST,
            RejectKind::Unauthorized => StatusCode::UNAUTHORIZED,
            RejectKind::UnknownApp => StatusCode::FORBIDDEN,
            RejectKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RejectKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            RejectKind::Timeout => StatusCode::REQUEST_TIMEOUT,
            RejectKind::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            RejectKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            RejectKind::UpstreamBusy => StatusCode::SERVICE_UNAVAILABLE,
            RejectKind::ForbiddenSource => StatusCode::FORBIDDEN,
        }
    }

    /// A stable, distinct non-zero ErrorCode per kind, so a log reader can
    /// tell them apart without the status line. (The C2C pages say 1 means
    /// error; Tencent ignores the value for after-callbacks.)
    pub fn error_code(self) -> u32 {
        match self {
            RejectKind::Invalid => 1,
            RejectKind::Unauthorized => 2,
            RejectKind::UnknownApp => 3,
            RejectKind::TooLarge => 4,
            RejectKind::Overloaded => 5,
            RejectKind::Timeout => 6,
            RejectKind::ForbiddenSource => 7,
            RejectKind::UpstreamUnreachable => 8,
            RejectKind::UpstreamTimeout => 9,
            RejectKind::UpstreamBusy => 10,
        }
    }

    /// The `outcome` label of `timbridge_callbacks_total`.
    pub fn outcome(self) -> Outcome {
        match self {
            RejectKind::Invalid | RejectKind::Timeout => Outcome::Invalid,
            RejectKind::Unauthorized => Outcome::Unauthorized,
            RejectKind::UnknownApp => Outcome::UnknownApp,
            RejectKind::TooLarge => Outcome::TooLarge,
            RejectKind::Overloaded => Outcome::Overloaded,
            RejectKind::UpstreamUnreachable
            | RejectKind::UpstreamTimeout
            | RejectKind::UpstreamBusy => Outcome::UpstreamFailed,
            RejectKind::ForbiddenSource => Outcome::ForbiddenSource,
        }
    }
}

/// A rejection with the text that goes into ErrorInfo (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectKind,
    pub info: String,
    /// The client address, for the log line only: the answer does not
    /// tell a refused sender how it was seen.
    pub client: Option<String>,
}

impl Rejection {
    pub fn new(kind: RejectKind, info: impl Into<String>) -> Rejection {
        Rejection {
            kind,
            info: info.into(),
            client: None,
        }
    }

    /// The same, naming `client` in the log line (not in the answer).
    pub fn with_client(mut self, client: impl std::fmt::Display) -> Rejection {
        self.client = Some(client.to_string());
        self
    }
}

/// The body of an OK answer; a constant, so the hot path does not build it.
pub const OK_BODY: &[u8] = br#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#;

/// A FAIL answer's fields, in alphabetical order: the bytes a `json!` map
/// gave, which clients may have come to expect, without building a map of
/// values (and a copy of the reason) per rejection.
#[derive(serde::Serialize)]
struct Fail<'a> {
    #[serde(rename = "ActionStatus")]
    action_status: &'static str,
    #[serde(rename = "ErrorCode")]
    error_code: u32,
    #[serde(rename = "ErrorInfo")]
    error_info: &'a str,
}

/// The body of a FAIL answer.
pub fn fail_body(r: &Rejection) -> Vec<u8> {
    let fail = Fail {
        action_status: "FAIL",
        error_code: r.kind.error_code(),
        error_info: &r.info,
    };
    serde_json::to_vec(&fail)
        // Serializing strings and a number cannot fail; never answer OK by
        // accident if it did.
        .unwrap_or_else(|_| br#"{"ActionStatus":"FAIL","ErrorCode":1,"ErrorInfo":""}"#.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_body_is_tencents_format() {
        let v: serde_json::Value = serde_json::from_slice(OK_BODY).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""})
        );
    }

    #[test]
    fn fail_bodies_are_the_bytes_a_json_map_gave() {
        for info in ["", "why \"quoted\"", "line\nbreak \u{1} é \\ </script>"] {
            let r = Rejection::new(RejectKind::UpstreamBusy, info);
            let map = serde_json::to_vec(&serde_json::json!({
                "ActionStatus": "FAIL",
                "ErrorCode": r.kind.error_code(),
                "ErrorInfo": r.info,
            }))
            .unwrap();
            assert_eq!(fail_body(&r), map, "{info:?}");
        }
    }

    #[test]
    fn fail_bodies_carry_non_zero_codes_and_the_reason() {
        for kind in [
            RejectKind::Invalid,
            RejectKind::Unauthorized,
            RejectKind::UnknownApp,
            RejectKind::TooLarge,
            RejectKind::Overloaded,
            RejectKind::Timeout,
            RejectKind::UpstreamUnreachable,
            RejectKind::UpstreamTimeout,
            RejectKind::UpstreamBusy,
            RejectKind::ForbiddenSource,
        ] {
            let body = fail_body(&Rejection::new(kind, "why \"quoted\""));
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["ActionStatus"], "FAIL");
            assert_ne!(v["ErrorCode"], 0);
            assert_eq!(v["ErrorInfo"], "why \"quoted\"");
            assert!(kind.status().is_client_error() || kind.status().is_server_error());
        }
    }
}
