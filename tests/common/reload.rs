//! What the reload, HTTPS and allow-list tests share: SIGHUP with its
//! outcome awaited, requests from a chosen loopback address, and a CA that
//! issues the gateway's certificates.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

use super::Answer;
use super::process::GatewayProcess;

/// The line a successful reload logs.
pub const RELOADED: &str = "configuration reloaded";
/// The line a refused reload logs.
pub const REFUSED: &str = "configuration reload refused";

/// Lines of `p`'s log containing `needle` so far.
pub fn count_lines(p: &GatewayProcess, needle: &str) -> usize {
    p.log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Writes `config` over the file `p` started with, sends SIGHUP and waits
/// for the reload's outcome line (`RELOADED` or `REFUSED`); returns it.
pub fn reload(p: &mut GatewayProcess, dir: &Path, config: &str, outcome: &str) -> String {
    std::fs::write(dir.join("config.toml"), config).unwrap();
    hup(p, outcome)
}

/// SIGHUP, then the `outcome` line it causes.
pub fn hup(p: &mut GatewayProcess, outcome: &str) -> String {
    let before = count_lines(p, outcome);
    let pid = p.child.id() as libc::pid_t;
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "kill -HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let lines: Vec<String> = p
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(outcome))
            .cloned()
            .collect();
        if lines.len() > before {
            return lines[before].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {outcome:?} line after SIGHUP:\n{}",
            p.log_text()
        );
        if let Ok(Some(s)) = p.child.try_wait() {
            panic!("gateway exited ({s}) on SIGHUP:\n{}", p.log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A query signed with `token` for `app`, as Tencent sends it.
pub fn query_signed_with(app: u64, token: Option<&str>, command: &str) -> String {
    format!(
        "/callback?{}",
        timbridge::send::tencent_query(app, command, token, super::now_s())
    )
}

/// One request on a fresh connection whose source address is `from`
/// (any 127.x.y.z reaches a 127.0.0.1 listener, as a distinct peer).
pub async fn request_from(
    from: IpAddr,
    addr: SocketAddr,
    path_and_query: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Answer {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let stream = socket.connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send(&mut sender, addr, path_and_query, body, headers)
        .await
        .expect("an answer")
}

/// POSTs on an open HTTP/1 connection; `None` when it fails.
pub async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    path_and_query: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Option<Answer> {
    super::send_on(
        sender,
        addr,
        "POST",
        path_and_query,
        Bytes::copy_from_slice(body),
        headers,
    )
    .await
}

/// A self-signed CA that issues certificates for 127.0.0.1 and localhost.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Not rcgen's default name, which the server certificate also has:
        // OpenSSL would take that one for self-signed.
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "timbridge test CA");
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// Writes a server certificate (followed by the CA's, as a chain) and
    /// its key to `dir/server.crt` and `dir/server.key`; returns the paths.
    pub fn issue_into(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "timbridge test server");
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
        std::fs::write(&c, cert.pem() + &self.pem).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// A client that trusts this CA only.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        roots
            .add(rustls_pki_types::CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }
}

/// An HTTPS connection to `addr` trusting `ca` only; the error when the
/// handshake fails (an untrusted certificate).
pub async fn https_connect(
    ca: &TestCa,
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = ca
        .connector()
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A config whose callback listener speaks TLS with the `server.crt` and
/// `server.key` a [`TestCa`] issued into the set-up's directory, and whose
/// admin listener is plain HTTP on a port of its own.
pub fn tls_config(s: &super::Setup) -> String {
    let dir = s.dir.path().display();
    s.config_text(&[(
        "server",
        &format!(
            "admin_listen = \"127.0.0.1:0\"\ntls_cert_file = \"{dir}/server.crt\"\ntls_key_file = \"{dir}/server.key\""
        ),
    )])
}
