//! THE FLOOR: the least a callback endpoint can do, for the load harness
//! (`bench/`) to measure timbridge against.
//!
//! A bare hyper 1 HTTP/1.1 server set up like the gateway (tokio's default
//! multi-thread runtime, keep-alive, `TCP_NODELAY`, a timer for the header
//! timeout) that reads each request body to its end, checks that it is JSON
//! and answers Tencent's OK answer. No query parsing, no signature, no
//! spool, no Kafka: whatever the gateway costs beyond this is timbridge's own.
//!
//! ```text
//! floor [--listen 127.0.0.1:0] [--parse ignored|value]
//! ```
//!
//! `--parse ignored` (the default) walks the whole document with
//! `serde::de::IgnoredAny` (full syntax check, no allocation);
//! `--parse value` builds a `serde_json::Value` tree. A body that is not
//! JSON gets a 400, like the gateway's. The first line on stdout is
//! `LISTEN=<address>`; the server runs until killed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

const OK_BODY: &[u8] = br#"{"ActionStatus":"OK","ErrorCode":0,"ErrorInfo":""}"#;
const FAIL_BODY: &[u8] = br#"{"ActionStatus":"FAIL","ErrorCode":1,"ErrorInfo":"body is not JSON"}"#;
/// The gateway's default `max_body_bytes`.
const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Clone, Copy)]
enum Parse {
    Ignored,
    Value,
}

fn parse_args() -> Result<(SocketAddr, Parse), String> {
    let mut listen: SocketAddr = "127.0.0.1:0".parse().expect("a valid address");
    let mut parse = Parse::Ignored;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => {
                let v = value()?;
                listen = v
                    .parse()
                    .map_err(|_| format!("--listen wants host:port, got {v:?}"))?;
            }
            "--parse" => {
                parse = match value()?.as_str() {
                    "ignored" => Parse::Ignored,
                    "value" => Parse::Value,
                    other => return Err(format!("--parse wants ignored or value, got {other:?}")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok((listen, parse))
}

fn is_json(body: &[u8], parse: Parse) -> bool {
    match parse {
        Parse::Ignored => serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok(),
        Parse::Value => serde_json::from_slice::<serde_json::Value>(body).is_ok(),
    }
}

async fn answer(req: Request<Incoming>, parse: Parse) -> Response<Full<Bytes>> {
    let read = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await;
    let (status, body) = match read.map(|c| c.to_bytes()) {
        Ok(bytes) if is_json(&bytes, parse) => (StatusCode::OK, OK_BODY),
        _ => (StatusCode::BAD_REQUEST, FAIL_BODY),
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

async fn serve(listener: TcpListener, parse: Parse) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .keep_alive(true);
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| async move { Ok::<_, Infallible>(answer(req, parse).await) }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn main() -> ExitCode {
    let (listen, parse) = match parse_args() {
        Ok(a) => a,
        Err(message) => {
            eprintln!("floor: {message}\nusage: floor [--listen ADDR] [--parse ignored|value]");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("floor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("floor: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(addr) => println!("LISTEN={addr}"),
            Err(e) => {
                eprintln!("floor: {e}");
                return ExitCode::FAILURE;
            }
        }
        serve(listener, parse).await;
        ExitCode::SUCCESS
    })
}
