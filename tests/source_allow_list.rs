//! `server.allow_from` decides who may post callbacks, by the connection's
//! peer or, behind a trusted proxy, by the right-most `X-Forwarded-For`
//! entry that is not a trusted proxy. Outside the list: 403, ErrorCode 7,
//! outcome `forbidden_source`, before the app is even looked at. 127.0.0.1
//! and 127.0.0.2 are two distinct peers of a 127.0.0.1 listener.

mod common;

use std::net::IpAddr;

use common::process::GatewayProcess;
use common::reload::{REFUSED, RELOADED, reload, request_from};
use common::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_from_outside_the_allow_list_are_refused_by_peer_and_through_proxies() {
    let s = setup();
    let rules =
        "allow_from = [\"127.0.0.2/32\", \"203.0.113.0/24\"]\ntrusted_proxies = [\"127.0.0.1\"]";
    let config = s.config_text(&[("server", rules)]);
    let mut p = GatewayProcess::start(s.dir.path(), &config);
    let (addr, cb) = (p.addr, group_callback());
    let body = |g: &str| group_body(g, 1).into_bytes();

    // By peer: 127.0.0.2 is allowed and not a proxy, so its own header is ignored.
    assert_ok(&request_from(ip("127.0.0.2"), addr, &cb, &body("peer-ok"), &[]).await);
    let a = request_from(
        ip("127.0.0.2"),
        addr,
        &cb,
        &body("peer-xff"),
        &[("x-forwarded-for", "198.51.100.1")],
    )
    .await;
    assert_ok(&a);

    // Through the trusted proxy 127.0.0.1: the client it forwarded decides.
    let fwd = |xff: &'static str| [("x-forwarded-for", xff)];
    assert_ok(
        &request_from(
            ip("127.0.0.1"),
            addr,
            &cb,
            &body("proxy-ok"),
            &fwd("203.0.113.9"),
        )
        .await,
    );
    // A forged allowed address to the left of the real one does not help.
    let a = request_from(
        ip("127.0.0.1"),
        addr,
        &cb,
        &body("forged"),
        &fwd("203.0.113.9, 198.51.100.1"),
    )
    .await;
    let info = assert_fail(&a, 403);
    assert_eq!(a.json["ErrorCode"], 7, "{}", a.json);
    // The answer does not tell the sender how it was seen; the log does.
    assert_eq!(info, "the source address is not in server.allow_from");
    // Two headers are one list, in order.
    assert_ok(
        &request_from(
            ip("127.0.0.1"),
            addr,
            &cb,
            &body("two"),
            &[
                ("x-forwarded-for", "198.51.100.1"),
                ("x-forwarded-for", "203.0.113.9, 127.0.0.1"),
            ],
        )
        .await,
    );
    // Garbage where the client should be is refused.
    let a = request_from(
        ip("127.0.0.1"),
        addr,
        &cb,
        &body("junk"),
        &fwd("203.0.113.9, not-an-address"),
    )
    .await;
    assert_fail(&a, 403);
    // No header: the proxy itself is the client, and it is not allowed.
    assert_fail(
        &request_from(ip("127.0.0.1"), addr, &cb, &body("bare"), &[]).await,
        403,
    );
    // Before the app: an unknown app from outside is 403 for its source (code 7), not 3.
    let a = request_from(
        ip("127.0.0.1"),
        addr,
        "/callback?SdkAppid=1&CallbackCommand=x",
        b"{}",
        &[],
    )
    .await;
    assert_eq!(a.json["ErrorCode"], 7, "{}", a.json);

    let (_, metrics) = get_text(addr, "/metrics").await;
    let refused: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("timbridge_callbacks_total") && l.contains("outcome=\"forbidden_source\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, 4.0, "{metrics}");
    p.wait_for_log("callback rejected", std::time::Duration::from_secs(5));
    let log = p.log_text();
    let refused_line = log
        .lines()
        .find(|l| l.contains("callback rejected") && l.contains("client=198.51.100.1"))
        .unwrap_or_else(|| panic!("no rejection line naming the forged client: {log}"));
    assert!(
        refused_line.contains("status=403") && refused_line.contains("server.allow_from"),
        "{refused_line}"
    );

    // The rules are live: SIGHUP with 127.0.0.1 allowed.
    let opened = s.config_text(&[("server", "allow_from = [\"127.0.0.1\"]")]);
    reload(&mut p, s.dir.path(), &opened, RELOADED);
    assert_ok(&request_from(ip("127.0.0.1"), addr, &cb, &body("now-ok"), &[]).await);
    assert_fail(
        &request_from(ip("127.0.0.2"), addr, &cb, &body("now-not"), &[]).await,
        403,
    );

    // Doubtful rules are applied but named; `[]` is refused and changes nothing.
    let overlap = s.config_text(&[(
        "server",
        "allow_from = [\"127.0.0.0/8\"]\ntrusted_proxies = [\"127.0.0.1\"]",
    )]);
    reload(&mut p, s.dir.path(), &overlap, RELOADED);
    let log = p.log_text();
    assert!(
        log.contains(
            "server.allow_from 127.0.0.0/8 and server.trusted_proxies 127.0.0.1/32 overlap"
        ),
        "{log}"
    );
    let empty = s.config_text(&[("server", "allow_from = []")]);
    let refused = reload(&mut p, s.dir.path(), &empty, REFUSED);
    assert!(refused.contains("remove the key"), "{refused}");
    assert_ok(&request_from(ip("127.0.0.2"), addr, &cb, &body("still"), &[]).await);
}

/// An IPv6 peer (`::1`) is matched by IPv6 ranges, and not by `0.0.0.0/0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_peer_is_checked_against_ipv6_ranges() {
    let s = setup();
    let v6 = |allow: &str| {
        let text = s
            .config_text(&[("server", &format!("allow_from = [{allow}]"))])
            .replace("listen = \"127.0.0.1:0\"", "listen = \"[::1]:0\"");
        timbridge::config::Config::parse(&text).unwrap()
    };
    for (allow, allowed) in [
        ("\"::1/128\"", true),
        ("\"2001:db8::/32\", \"0.0.0.0/0\"", false),
    ] {
        let gw = timbridge::Gateway::start(v6(allow)).await.unwrap();
        let addr = gw.local_addr();
        assert!(addr.is_ipv6(), "{addr}");
        let a = post(addr, &group_callback(), group_body("v6", 1).as_bytes()).await;
        if allowed {
            assert_ok(&a);
        } else {
            assert_eq!(
                assert_fail(&a, 403),
                "the source address is not in server.allow_from"
            );
        }
        gw.shutdown().await.unwrap();
    }
}
