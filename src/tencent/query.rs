//! The query string Tencent appends to the configured callback URL.
//!
//! `SdkAppid=…&CallbackCommand=…&contenttype=json&ClientIP=…&OptPlatform=…`
//! and, when authentication is on, `Sign=…&RequestTime=…`. Parameter names are
//! matched exactly as Tencent spells them.

use std::borrow::Cow;

/// The parameters timbridge uses; the rest (`contenttype`) are ignored.
/// Values borrow from the request line unless they needed decoding.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CallbackQuery<'a> {
    pub sdk_app_id: Option<Cow<'a, str>>,
    pub callback_command: Option<Cow<'a, str>>,
    pub sign: Option<Cow<'a, str>>,
    pub request_time: Option<Cow<'a, str>>,
    pub client_ip: Option<Cow<'a, str>>,
    pub platform: Option<Cow<'a, str>>,
    /// The first of these parameters that came more than once. Tencent
    /// sends each once; a repeat is refused (see `Intake::authenticate`),
    /// because timbridge reads the first value and many app frameworks the
    /// last: `SdkAppid=<app without a token>&...&SdkAppid=<app with one>`
    /// would pass here as one app and reach the app behind it as another.
    pub repeated: Option<&'static str>,
}

/// The parameters timbridge reads, as Tencent spells them; a repeat of any
/// is refused. `parse` fills the fields in this order.
pub const KNOWN: [&str; 6] = [
    "SdkAppid",
    "CallbackCommand",
    "Sign",
    "RequestTime",
    "ClientIP",
    "OptPlatform",
];

impl<'a> CallbackQuery<'a> {
    /// Parses a raw query string (without the `?`), percent-decoding values.
    /// A repeated parameter keeps its first value.
    pub fn parse(raw: &'a str) -> CallbackQuery<'a> {
        let mut q = CallbackQuery::default();
        let mut repeated = None;
        // Which of the parameters came already, their names compared without
        // case: an app framework that reads names that way (ASP.NET) would
        // take `sdkappid=` after `SdkAppid=` as the same parameter.
        let mut seen = [false; KNOWN.len()];
        let mut put = |name: &str, value: Cow<'a, str>| {
            let Some(i) = KNOWN.iter().position(|k| k.eq_ignore_ascii_case(name)) else {
                return;
            };
            if std::mem::replace(&mut seen[i], true) {
                repeated = repeated.or(Some(KNOWN[i]));
            }
            // The value is only the name as Tencent spells it.
            if name != KNOWN[i] {
                return;
            }
            let slot = match i {
                0 => &mut q.sdk_app_id,
                1 => &mut q.callback_command,
                2 => &mut q.sign,
                3 => &mut q.request_time,
                4 => &mut q.client_ip,
                _ => &mut q.platform,
            };
            if slot.is_none() {
                *slot = Some(value);
            }
        };
        // Tencent's values need no decoding (digits, hex, dotted names, IPs):
        // then split in place; decode only a query that has escapes.
        if raw.bytes().any(|b| b == b'%' || b == b'+') {
            for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
                put(&name, value);
            }
        } else {
            for pair in raw.split('&').filter(|p| !p.is_empty()) {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                put(name, Cow::Borrowed(value));
            }
        }
        q.repeated = repeated;
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tencent_parameters() {
        let q = CallbackQuery::parse(
            "SdkAppid=1400000000&CallbackCommand=Group.CallbackAfterReadReceipt&contenttype=json&ClientIP=127.0.0.1&OptPlatform=iOS&Sign=abc&RequestTime=1669872112",
        );
        assert_eq!(q.sdk_app_id.as_deref(), Some("1400000000"));
        assert_eq!(
            q.callback_command.as_deref(),
            Some("Group.CallbackAfterReadReceipt")
        );
        assert_eq!(q.client_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(q.platform.as_deref(), Some("iOS"));
        assert_eq!(q.sign.as_deref(), Some("abc"));
        assert_eq!(q.request_time.as_deref(), Some("1669872112"));
    }

    #[test]
    fn a_repeated_parameter_is_named_escaped_or_not() {
        for raw in [
            "SdkAppid=1&CallbackCommand=X&SdkAppid=2",
            "SdkAppid=1&CallbackCommand=X&Sdk%41ppid=2",
        ] {
            let q = CallbackQuery::parse(raw);
            assert_eq!(q.repeated, Some("SdkAppid"), "{raw}");
            assert_eq!(q.sdk_app_id.as_deref(), Some("1"), "{raw}");
        }
        let q = CallbackQuery::parse("Sign=a&RequestTime=1&Sign=b&RequestTime=2");
        assert_eq!(q.repeated, Some("Sign"));
        // Names compared without case, as some frameworks read them; the
        // value is still only the exact name's.
        let q = CallbackQuery::parse("sdkappid=2&SdkAppid=1");
        assert_eq!(q.repeated, Some("SdkAppid"));
        assert_eq!(q.sdk_app_id.as_deref(), Some("1"));
        let q = CallbackQuery::parse("sdkappid=2&CallbackCommand=X");
        assert_eq!((q.repeated, q.sdk_app_id), (None, None));
        // Parameters timbridge does not read may repeat.
        let q = CallbackQuery::parse("SdkAppid=1&contenttype=json&contenttype=json&x=1&x=2");
        assert_eq!(q.repeated, None);
    }

    #[test]
    fn optional_parameters_may_be_absent_and_values_are_decoded() {
        let q = CallbackQuery::parse("SdkAppid=1&ClientIP=%3A%3A1&foo=bar");
        assert_eq!(q.client_ip.as_deref(), Some("::1"));
        assert_eq!(q.platform, None);
        assert_eq!(q.sign, None);
        assert_eq!(CallbackQuery::parse(""), CallbackQuery::default());
    }

    #[test]
    fn names_are_case_sensitive_as_tencent_sends_them() {
        let q = CallbackQuery::parse("sdkappid=1");
        assert_eq!(q.sdk_app_id, None);
    }
}
