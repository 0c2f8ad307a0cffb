//! `timbridge send`: posts one callback body the way Tencent would, signed
//! when a token is given, and returns the status and answer. For trying the
//! gateway by hand and in scripts.
//!
//! `https://` URLs are verified against the Mozilla root certificates
//! compiled in (webpki-roots), so the same command works against a gateway
//! behind a TLS-terminating load balancer, as Tencent reaches it.

use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::tencent::auth;

pub struct SendArgs<'a> {
    pub url: &'a str,
    pub sdk_app_id: u64,
    pub token: Option<&'a str>,
    pub command: Option<&'a str>,
    /// Sent as `ClientIP`, as Tencent does with the app user's address.
    pub client_ip: Option<&'a str>,
    /// Sent as `OptPlatform` (iOS, Android, Web...).
    pub platform: Option<&'a str>,
    pub body: Vec<u8>,
}

pub struct SendOutcome {
    pub status: hyper::StatusCode,
    pub body: Bytes,
}

/// The query string Tencent would append: SdkAppid, CallbackCommand,
/// contenttype and, with a token, Sign and RequestTime.
pub fn tencent_query(
    sdk_app_id: u64,
    command: &str,
    token: Option<&str>,
    request_time: u64,
) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("SdkAppid", &sdk_app_id.to_string())
        .append_pair("CallbackCommand", command)
        .append_pair("contenttype", "json");
    if let Some(token) = token {
        let t = request_time.to_string();
        q.append_pair("Sign", &auth::sign(token, &t))
            .append_pair("RequestTime", &t);
    }
    q.finish()
}

pub async fn send(args: SendArgs<'_>) -> anyhow::Result<SendOutcome> {
    let command = match args.command {
        Some(c) => c.to_owned(),
        None => {
            #[derive(serde::Deserialize)]
            struct Cmd {
                #[serde(rename = "CallbackCommand")]
                command: Option<String>,
            }
            serde_json::from_slice::<Cmd>(&args.body)
                .ok()
                .and_then(|c| c.command)
                .context("the body has no CallbackCommand to take: pass --command CMD")?
        }
    };
    let uri: hyper::Uri = args.url.parse().with_context(|| {
        format!(
            "{:?} is not a URL like http://127.0.0.1:8080/callback",
            args.url
        )
    })?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => bail!(
            "{:?}: only http:// and https:// URLs are supported",
            args.url
        ),
    };
    let host = uri.host().context("the URL has no host")?;
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let now = crate::clock::now_s();
    let mut query = tencent_query(args.sdk_app_id, &command, args.token, now);
    {
        let mut extra = form_urlencoded::Serializer::new(String::new());
        if let Some(ip) = args.client_ip {
            extra.append_pair("ClientIP", ip);
        }
        if let Some(p) = args.platform {
            extra.append_pair("OptPlatform", p);
        }
        let extra = extra.finish();
        if !extra.is_empty() {
            query = format!("{query}&{extra}");
        }
    }
    let path_and_query = match uri.query() {
        Some(existing) => format!("{}?{existing}&{query}", uri.path()),
        None => format!("{}?{query}", uri.path()),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}: is the gateway running?"))?;
    let req = Request::post(path_and_query)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(args.body)))?;
    if !tls {
        return exchange(stream, req).await;
    }
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS setup failed")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
        .with_context(|| format!("{host:?} is not a valid TLS server name"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .with_context(|| format!("TLS handshake with {host}:{port} failed"))?;
    exchange(stream, req).await
}

/// One request and its answer on an established connection.
async fn exchange<S>(stream: S, req: Request<Full<Bytes>>) -> anyhow::Result<SendOutcome>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake failed")?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.context("request failed")?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("reading the answer failed")?
        .to_bytes();
    Ok(SendOutcome { status, body })
}
