//! Tencent's callback authentication: `Sign = hex(sha256(Token + RequestTime))`.
//!
//! It is plain SHA-256 of the concatenation, not an HMAC, and the body is not
//! covered; what stops a captured URL from being replayed much later is the
//! 60 s window on `RequestTime`. The comparison is constant-time so that the
//! answer's timing says nothing about how much of a guessed Sign was right.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How far `RequestTime` may be from our clock, either way.
pub const MAX_CLOCK_SKEW_SECS: i64 = 60;

/// Why a request failed authentication; the text goes into ErrorInfo and the
/// log, so it never contains the token or the Sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Sign is missing (this app has a token: authentication is required)")]
    MissingSign,
    #[error("RequestTime is missing (this app has a token: authentication is required)")]
    MissingRequestTime,
    #[error("RequestTime is not Unix seconds")]
    BadRequestTime,
    #[error(
        "RequestTime is {0} s from the gateway's clock (at most 60 s allowed): check both clocks"
    )]
    Stale(i64),
    #[error("Sign does not match: check the token configured for this SdkAppid")]
    BadSign,
}

/// The length of a Sign: a SHA-256 in hex.
const SIGN_LEN: usize = 64;

/// The lower-case hex Sign Tencent computes for `token` and `request_time`.
pub fn sign(token: &str, request_time: &str) -> String {
    String::from_utf8(sign_bytes(token, request_time).to_vec()).expect("hex is ASCII")
}

/// [`sign`] on the stack: checking a callback allocates nothing.
fn sign_bytes(token: &str, request_time: &str) -> [u8; SIGN_LEN] {
    let mut h = Sha256::new();
    h.update(token.as_bytes());
    h.update(request_time.as_bytes());
    let mut out = [0u8; SIGN_LEN];
    hex::encode_to_slice(h.finalize(), &mut out).expect("a SHA-256 is 32 bytes");
    out
}

/// Checks `Sign` and `RequestTime` against the app's token and `now` (Unix seconds).
pub fn verify(
    token: &str,
    sign_param: Option<&str>,
    request_time: Option<&str>,
    now: i64,
) -> Result<(), AuthError> {
    verify_rotating(token, None, sign_param, request_time, now).map(|_| ())
}

/// Which of an app's tokens a Sign was made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMatch {
    Current,
    /// `previous_token`: the operator watches these to know when it can go.
    Previous,
}

impl TokenMatch {
    /// The `token` label of `timbridge_auth_token_matches_total`.
    pub fn label(self) -> &'static str {
        match self {
            TokenMatch::Current => "current",
            TokenMatch::Previous => "previous",
        }
    }
}

/// [`verify`] against the current token and, during a rotation, the
/// previous one. Both are compared, each in constant time, whichever
/// matches: the answer's timing tells nothing about which one did.
pub fn verify_rotating(
    token: &str,
    previous: Option<&str>,
    sign_param: Option<&str>,
    request_time: Option<&str>,
    now: i64,
) -> Result<TokenMatch, AuthError> {
    let sign_param = sign_param.ok_or(AuthError::MissingSign)?;
    let request_time = request_time.ok_or(AuthError::MissingRequestTime)?;
    let t: i64 = request_time
        .parse()
        .map_err(|_| AuthError::BadRequestTime)?;
    let skew = now.saturating_sub(t);
    if skew.abs() > MAX_CLOCK_SKEW_SECS {
        return Err(AuthError::Stale(skew));
    }
    // Tencent sends lower-case hex; accept upper case too rather than fail a
    // correct signature on its spelling. Lower-cased on the stack; a Sign
    // of any other length matches nothing (its length is no secret).
    let mut given = [0u8; SIGN_LEN];
    let well_formed = sign_param.len() == SIGN_LEN;
    if well_formed {
        given.copy_from_slice(sign_param.as_bytes());
        given.make_ascii_lowercase();
    }
    let well_formed = subtle::Choice::from(u8::from(well_formed));
    let matches = |token: &str| sign_bytes(token, request_time)[..].ct_eq(&given[..]) & well_formed;
    let current = matches(token);
    let old = previous.map_or(subtle::Choice::from(0), matches);
    if bool::from(current) {
        Ok(TokenMatch::Current)
    } else if bool::from(old) {
        Ok(TokenMatch::Previous)
    } else {
        Err(AuthError::BadSign)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR_SIGN: &str = "17773bc39a671d7b9aa835458704d2a6db81360a5940292b587d6d760d484061";

    #[test]
    fn tencent_test_vector() {
        assert_eq!(sign("xxxxyyyy", "1669872112"), VECTOR_SIGN);
    }

    #[test]
    fn accepts_the_vector_within_the_window() {
        let t = 1669872112;
        for now in [t, t - 60, t + 60] {
            assert_eq!(
                verify("xxxxyyyy", Some(VECTOR_SIGN), Some("1669872112"), now),
                Ok(())
            );
        }
        let upper = VECTOR_SIGN.to_ascii_uppercase();
        assert_eq!(
            verify("xxxxyyyy", Some(&upper), Some("1669872112"), t),
            Ok(())
        );
    }

    #[test]
    fn rejects_outside_the_window() {
        let t = 1669872112;
        assert_eq!(
            verify("xxxxyyyy", Some(VECTOR_SIGN), Some("1669872112"), t + 61),
            Err(AuthError::Stale(61))
        );
        assert_eq!(
            verify("xxxxyyyy", Some(VECTOR_SIGN), Some("1669872112"), t - 61),
            Err(AuthError::Stale(-61))
        );
    }

    #[test]
    fn rejects_wrong_or_missing_parts() {
        let t = 1669872112;
        assert_eq!(
            verify("other", Some(VECTOR_SIGN), Some("1669872112"), t),
            Err(AuthError::BadSign)
        );
        assert_eq!(
            verify("xxxxyyyy", Some(&VECTOR_SIGN[..63]), Some("1669872112"), t),
            Err(AuthError::BadSign)
        );
        assert_eq!(
            verify("xxxxyyyy", None, Some("1669872112"), t),
            Err(AuthError::MissingSign)
        );
        assert_eq!(
            verify("xxxxyyyy", Some(VECTOR_SIGN), None, t),
            Err(AuthError::MissingRequestTime)
        );
        assert_eq!(
            verify("xxxxyyyy", Some(VECTOR_SIGN), Some("yesterday"), t),
            Err(AuthError::BadRequestTime)
        );
    }

    #[test]
    fn signs_of_another_length_or_value_match_nothing() {
        let t = 1669872112;
        for sign in [format!("{VECTOR_SIGN}0"), String::new(), "0".repeat(64)] {
            assert_eq!(
                verify("xxxxyyyy", Some(&sign), Some("1669872112"), t),
                Err(AuthError::BadSign),
                "{sign}"
            );
        }
    }

    #[test]
    fn either_token_of_a_rotation_is_accepted_and_told_apart() {
        let t = 1669872112;
        let v = |tok: &str, prev: Option<&str>| {
            verify_rotating(tok, prev, Some(VECTOR_SIGN), Some("1669872112"), t)
        };
        assert_eq!(v("xxxxyyyy", Some("new")), Ok(TokenMatch::Current));
        assert_eq!(v("new", Some("xxxxyyyy")), Ok(TokenMatch::Previous));
        assert_eq!(v("new", None), Err(AuthError::BadSign));
        assert_eq!(v("new", Some("other")), Err(AuthError::BadSign));
    }

    #[test]
    fn error_texts_carry_no_secret() {
        let e = verify("xxxxyyyy", Some("deadbeef"), Some("1669872112"), 1669872112)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("xxxxyyyy") && !e.contains("deadbeef"), "{e}");
    }
}
