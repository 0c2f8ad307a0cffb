//! HTTPS on the callback listener: `server.tls_cert_file` and
//! `server.tls_key_file`.
//!
//! Tencent's `Sign` is not over the body, so anyone who reads one request
//! in plain text may post arbitrary bodies for a minute; TLS keeps the
//! request unread. rustls with ring: no OpenSSL on the request path.
//!
//! Certificates are renewed while callbacks keep coming, so the listener
//! never holds a certificate itself: it asks [`CertStore`] at every
//! handshake, and a reload swaps the store's `Arc<CertifiedKey>`. Open
//! connections keep the session they have; new handshakes get the new
//! certificate.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;

/// The certificate new handshakes get; swapped whole by a reload.
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertStore")
    }
}

impl CertStore {
    pub fn new(key: CertifiedKey) -> Arc<CertStore> {
        Arc::new(CertStore {
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// New handshakes use `key` from now on; sessions already open keep theirs.
    pub fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }

    /// The certificate new handshakes get now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The acceptor of the callback listener, asking this store at each handshake.
    pub fn acceptor(self: &Arc<Self>) -> anyhow::Result<TlsAcceptor> {
        // An explicit provider: the process-wide default would be ambiguous
        // if another dependency enabled a second one.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("rustls has no usable protocol versions: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        // The listener speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The certificate and key `server` names, read and checked, or `None`
/// without TLS. Errors name the key and say what to fix; they never quote
/// the files (the key file is a secret).
pub fn load(server: &ServerConfig) -> Result<Option<CertifiedKey>, String> {
    let (Some(cert), Some(key)) = (&server.tls_cert_file, &server.tls_key_file) else {
        return Ok(None);
    };
    load_pair(cert, key).map(Some)
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, String> {
    let shown = cert_path.display();
    let certs = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| unreadable("server.tls_cert_file", cert_path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            format!("server.tls_cert_file {shown} is not valid PEM: give the certificate, then its chain, each as -----BEGIN CERTIFICATE-----")
        })?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls_cert_file {shown} holds no certificate: give a PEM file starting with -----BEGIN CERTIFICATE-----"
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| match e {
        rustls_pki_types::pem::Error::Io(_) => unreadable("server.tls_key_file", key_path, e),
        _ => format!(
            "server.tls_key_file {} holds no PEM private key: give the certificate's key (PKCS#8, PKCS#1 or SEC1, e.g. -----BEGIN PRIVATE KEY-----)",
            key_path.display()
        ),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "server.tls_key_file {} is not the key of server.tls_cert_file {shown}: their public keys differ; give the key the certificate was issued for (the first certificate in the file is the server's)",
            key_path.display()
        ),
        other => format!(
            "server.tls_cert_file {shown} and server.tls_key_file {} cannot be used together ({other}); give an RSA, ECDSA or Ed25519 key and its certificate",
            key_path.display()
        ),
    })
}

/// A warning when the server's certificate is not valid at `now`: clients
/// refuse every handshake then. A warning, not a refusal: at start the
/// gateway would not run at all, and a refused reload keeps the certificate
/// that is in force, which is no better (and the clock may be the one wrong).
pub fn validity_warning(
    server: &ServerConfig,
    key: &CertifiedKey,
    now: std::time::SystemTime,
) -> Option<String> {
    let shown = server.tls_cert_file.as_deref()?.display();
    let (not_before, not_after) = validity(key.cert.first()?)?;
    let now = i64::try_from(now.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs()).ok()?;
    if now < not_before {
        Some(format!(
            "server.tls_cert_file {shown}: the certificate becomes valid only in {}: clients refuse it until then; check the issuer's clock and this host's",
            span(not_before - now)
        ))
    } else if now > not_after {
        Some(format!(
            "server.tls_cert_file {shown}: the certificate expired {} ago: clients refuse it; renew it and send SIGHUP",
            span(now - not_after)
        ))
    } else {
        None
    }
}

fn span(seconds: i64) -> String {
    match seconds {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3_600 => format!("{} hours", s / 3_600),
        s => format!("{} minutes", s / 60 + 1),
    }
}

/// A certificate's notBefore and notAfter as Unix seconds, read straight
/// from its DER (TBSCertificate: optional version, serial, signature
/// algorithm, issuer, then validity): a few lines instead of an X.509
/// parser dependency. `None` when the DER is not what that expects.
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (_, validity, _) = tlv(rest)?;
    let (tag_before, before, after_rest) = tlv(validity)?;
    let (tag_after, after, _) = tlv(after_rest)?;
    Some((der_time(tag_before, before)?, der_time(tag_after, after)?))
}

/// One DER element: its tag, its contents, and what follows it.
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = d.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = rest
            .get(..n)?
            .iter()
            .fold(0usize, |l, &b| l << 8 | usize::from(b));
        (len, &rest[n..])
    };
    Some((tag, rest.get(..len)?, &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = text.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        digits
            .get(r)?
            .iter()
            .try_fold(0i64, |n, &b| Some(n * 10 + i64::from(b - b'0')))
    };
    let (year, at) = match (tag, digits.len()) {
        (0x17, 12) => (
            num(0..2).map(|y| if y >= 50 { 1900 + y } else { 2000 + y })?,
            2,
        ),
        (0x18, 14) => (num(0..4)?, 4),
        _ => return None,
    };
    let field = |i: usize| num(at + 2 * i..at + 2 * i + 2);
    let days = days_from_civil(year, field(0)?, field(1)?);
    Some(days * 86_400 + field(2)? * 3_600 + field(3)? * 60 + field(4)?)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn unreadable(key: &str, path: &Path, e: rustls_pki_types::pem::Error) -> String {
    let why = match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        _ => "not readable".into(),
    };
    format!(
        "cannot read {key} {}: {why}; check the path and that the gateway's user may read it",
        path.display()
    )
}

/// Bytes of TLS a connection may hold unsent (rustls's default is 64 KiB).
const SEND_BUFFER_LIMIT: usize = 16 * 1024;

/// The connection as it will carry HTTP: through a TLS handshake when the
/// listener has TLS, finished within `within`, or as it is.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    tls: Option<&TlsAcceptor>,
    io: S,
    within: Duration,
) -> io::Result<MaybeTls<S>> {
    let Some(tls) = tls else {
        return Ok(MaybeTls::Plain(io));
    };
    // rustls would otherwise buffer up to 64 KiB of encrypted answer for a
    // client that stops reading; 16 KiB is one full record, so writes still
    // go out in whole records.
    let accepting = tls.accept_with(io, |conn| conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT)));
    match tokio::time::timeout(within, accepting).await {
        Ok(Ok(stream)) => Ok(MaybeTls::Tls(Box::new(stream))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the TLS handshake did not finish within server.header_read_timeout",
        )),
    }
}

/// A callback connection, plain or TLS, for one code path in the server.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn server(cert: &Path, key: &Path) -> ServerConfig {
        ServerConfig {
            tls_cert_file: Some(cert.to_owned()),
            tls_key_file: Some(key.to_owned()),
            ..ServerConfig::default()
        }
    }

    /// A client that handshakes and then stops reading: how much of an
    /// answer the server's TLS layer takes on before it must wait.
    #[tokio::test]
    async fn a_client_that_stops_reading_holds_at_most_the_send_limit() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "one");
        let store = CertStore::new(load(&server(&c, &k)).unwrap().unwrap());
        let acceptor = store.acceptor().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&c).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        // A small pipe stands in for the socket, so what piles up is rustls's.
        let (client_io, server_io) = tokio::io::duplex(1024);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(
            connector.connect(name, client_io),
            accept(Some(&acceptor), server_io, Duration::from_secs(5))
        );
        let (_client, mut server) = (client.unwrap(), server.unwrap());
        let chunk = [b'x'; 1024];
        let mut taken = 0;
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), server.write(&chunk)).await
        {
            taken += n;
            assert!(taken < 256 * 1024, "the server never stopped taking bytes");
        }
        assert!(
            taken <= SEND_BUFFER_LIMIT + 2 * 1024,
            "{taken} bytes taken on by a client that reads nothing"
        );
    }

    #[test]
    fn certificates_outside_their_validity_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let pair = |name: &str, from: (i32, u8, u8), to: (i32, u8, u8)| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
            params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
            params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
            let cert = params.self_signed(&key).unwrap();
            let (c, k) = (
                dir.path().join(format!("{name}.crt")),
                dir.path().join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            let s = server(&c, &k);
            let loaded = load(&s).unwrap().unwrap();
            (s, loaded)
        };
        // 2030-01-01T00:00:00Z.
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_893_456_000);
        let (s, k) = pair("expired", (2020, 1, 1), (2029, 12, 20));
        let w = validity_warning(&s, &k, now).unwrap();
        assert!(
            w.contains("expired 12 days ago") && w.contains("expired.crt"),
            "{w}"
        );
        let (s, k) = pair("early", (2030, 1, 5), (2031, 1, 1));
        let w = validity_warning(&s, &k, now).unwrap();
        assert!(w.contains("valid only in 4 days"), "{w}");
        // 2049 is UTCTime, 2050 on GeneralizedTime: both read.
        let (s, k) = pair("fine", (2029, 6, 1), (2050, 1, 1));
        assert_eq!(validity_warning(&s, &k, now), None);
        assert_eq!(validity(&[0x30, 0x03, 0x30, 0x01]), None);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn a_matching_pair_loads_and_mistakes_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = write_pair(dir.path(), "one");
        let (_, k2) = write_pair(dir.path(), "two");
        assert!(load(&server(&c1, &k1)).unwrap().is_some());
        assert!(load(&ServerConfig::default()).unwrap().is_none());

        let e = load(&server(&c1, &k2)).unwrap_err();
        assert!(e.contains("is not the key of server.tls_cert_file"), "{e}");
        let e = load(&server(&dir.path().join("missing.crt"), &k1)).unwrap_err();
        assert!(e.contains("cannot read server.tls_cert_file"), "{e}");
        // A key where the certificate should be, and the other way round.
        let e = load(&server(&k1, &k1)).unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
        let e = load(&server(&c1, &c1)).unwrap_err();
        assert!(e.contains("holds no PEM private key"), "{e}");
        // The key's text is never quoted.
        let key_text = std::fs::read_to_string(&k2).unwrap();
        let body = key_text.lines().nth(1).unwrap();
        assert!(!load(&server(&c1, &k2)).unwrap_err().contains(body));
    }
}
