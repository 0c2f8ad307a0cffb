//! `check-config` reads what `serve` reads at start besides the file: a
//! certificate that cannot be read, a key that is not the certificate's and
//! a range that is no range are each named with what to fix, and the key's
//! text is never printed.

mod common;

use std::process::Command;

use common::process::{BIN, check_config};
use common::reload::{TestCa, tls_config};
use common::*;

#[test]
fn check_config_names_what_is_wrong_with_a_certificate_pair() {
    let s = setup();
    let ca = TestCa::new();
    let (cert, key) = ca.issue_into(s.dir.path());
    let path = s.dir.path().join("config.toml");
    let check = |config: &str| {
        std::fs::write(&path, config).unwrap();
        let out = check_config(&path);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let good = tls_config(&s);
    let (ok, err) = check(&good);
    assert!(ok, "{err}");

    // A key of another certificate.
    let other = tempfile::tempdir().unwrap();
    let (_, other_key) = TestCa::new().issue_into(other.path());
    std::fs::copy(&other_key, &key).unwrap();
    let (ok, err) = check(&good);
    assert!(
        !ok && err.contains("is not the key of server.tls_cert_file"),
        "{err}"
    );
    let key_text = std::fs::read_to_string(&key).unwrap();
    assert!(!err.contains(key_text.lines().nth(1).unwrap()), "{err}");

    // An unreadable certificate.
    std::fs::remove_file(&cert).unwrap();
    let (ok, err) = check(&good);
    assert!(
        !ok && err.contains("cannot read server.tls_cert_file"),
        "{err}"
    );

    // A range that is no range.
    let (ok, err) = check(&s.config_text(&[(
        "server",
        "trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.1/40\"]",
    )]));
    assert!(!ok && err.contains("server.trusted_proxies[1]"), "{err}");
}

/// The shipped example once put the same range in both lists: every real
/// callback behind the ingress was refused, and any pod sending no header
/// passed as "the proxy". check-config names such rules; `[]` is refused.
#[test]
fn check_config_warns_on_doubtful_source_rules() {
    let s = setup();
    let path = s.dir.path().join("config.toml");
    let check = |server: &str| {
        std::fs::write(&path, s.config_text(&[("server", server)])).unwrap();
        let out = check_config(&path);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) =
        check("allow_from = [\"10.0.0.0/8\"]\ntrusted_proxies = [\"10.0.0.0/8\", \"::/0\"]");
    assert!(ok, "{err}");
    assert!(
        err.contains(
            "warning: server.allow_from 10.0.0.0/8 and server.trusted_proxies 10.0.0.0/8 overlap"
        ),
        "{err}"
    );
    assert!(err.contains("server.trusted_proxies has ::/0"), "{err}");

    let (ok, err) = check("allow_from = [\"198.51.100.0/24\"]\ntrusted_proxies = [\"10.0.0.0/8\"]");
    assert!(ok && !err.contains("warning"), "{err}");

    let (ok, err) = check("allow_from = []");
    assert!(
        !ok && err.contains("remove the key to allow any address"),
        "{err}"
    );
}

/// An expired certificate still loads (the gateway runs on it) but is named:
/// every client refuses it.
#[test]
fn check_config_warns_on_an_expired_certificate() {
    let s = setup();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(s.dir.path().join("server.crt"), cert.pem()).unwrap();
    std::fs::write(s.dir.path().join("server.key"), key.serialize_pem()).unwrap();
    let path = s.dir.path().join("config.toml");
    std::fs::write(&path, tls_config(&s)).unwrap();
    let out = common::fork::output(
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("TIMBRIDGE_BROKERS")
            .env_remove("TIMBRIDGE_LISTEN"),
    )
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: server.tls_cert_file") && err.contains("the certificate expired"),
        "{err}"
    );
}
