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
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// `timbridge_tls_handshakes_failed_total{reason}`, registered on `metrics`
/// with both reasons at zero, so that `rate()` sees the first failure.
pub fn register_handshake_failures(metrics: &crate::metrics::Metrics) -> prometheus::IntCounterVec {
    let counter = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "timbridge_tls_handshakes_failed_total",
            "TLS handshakes on the callback listener that failed, by reason (timeout: not finished within server.header_read_timeout; error: plain HTTP, an unsupported client, a certificate the client refused).",
        ),
        &["reason"],
    )
    .expect("valid metric");
    for reason in ["timeout", "error"] {
        counter.with_label_values(&[reason]);
    }
    if let Err(e) = metrics.registry.register(Box::new(counter.clone())) {
        tracing::error!(error = %e, "cannot register the TLS metrics");
    }
    counter
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
