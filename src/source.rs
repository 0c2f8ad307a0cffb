//! Which addresses may post callbacks: `server.allow_from` and
//! `server.trusted_proxies`.
//!
//! Tencent's `Sign` covers only the token and the second, not the body, so
//! whoever sees one request may post any body for a minute; and an app
//! without a token accepts anything from anyone. An allow-list of the
//! addresses callbacks come from (Tencent's egress, or the load balancer in
//! front) closes that door whatever the token.
//!
//! The client is the connection's peer, unless the peer is a trusted proxy:
//! then it is the right-most `X-Forwarded-For` entry that is not a trusted
//! proxy. Right-most, because each proxy appends the address it saw and
//! anything to the left of the last trusted hop was written by the client
//! and may be forged. An entry may carry a port (`192.0.2.1:5678`,
//! `[2001:db8::1]:443`), as some proxies write it. An entry that is not an
//! IP address ends the walk and
//! is the client as it stands: it matches no range, so it is refused (unless
//! `allow_from` is unset), since a proxy we trust would not write one.
//!
//! The CIDR parsing is ours: a few dozen lines that treat IPv4-mapped IPv6
//! addresses as the IPv4 addresses they are, which is what a dual-stack
//! listener (`[::]:8080`) sees for IPv4 clients. So `::/0` is every IPv6
//! address and no IPv4 one: a client's family does not depend on the
//! listener's, and `0.0.0.0/0` says "every IPv4" as plainly.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::ServerConfig;

/// One address range, `10.0.0.0/8` or `2001:db8::/32`; a bare address is
/// its own /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `text`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| {
            format!("{text:?} is not an address range: write it like \"10.0.0.0/8\", \"192.0.2.7\" or \"2001:db8::/32\"")
        })?;
        // An IPv4-mapped range (::ffff:192.0.2.0/120) is the IPv4 range it maps.
        let mapped = net.to_canonical() != net;
        let net = net.to_canonical();
        let (max, written_max) = match (net.is_ipv4(), mapped) {
            (true, true) => (32, 128),
            (true, false) => (32, 32),
            (false, _) => (128, 128),
        };
        // The bits of the written address that are not the IPv4 one's.
        let skip = written_max - max;
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if (skip..=written_max).contains(&n) && !p.starts_with('+') => n - skip,
                _ => {
                    return Err(format!(
                        "{text:?} has a prefix length that is not {skip} to {written_max}"
                    ));
                }
            },
        };
        if masked(net, prefix) != net {
            return Err(format!(
                "{text:?} has bits set past its /{prefix}: write {}/{prefix} (or a longer prefix)",
                masked(net, prefix)
            ));
        }
        Ok(Cidr { net, prefix })
    }

    /// Whether the two ranges share an address.
    fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.net) || other.contains(self.net)
    }

    /// Whether `ip` (IPv4-mapped IPv6 taken as IPv4) is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.net.is_ipv4() && masked(ip, self.prefix) == self.net
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// The client a request is taken to come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    Ip(IpAddr),
    /// An `X-Forwarded-For` entry that is not an address, as written.
    Unparsable(String),
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Client::Ip(ip) => write!(f, "{ip}"),
            Client::Unparsable(s) => {
                write!(f, "{s:?} (an X-Forwarded-For entry that is no address)")
            }
        }
    }
}

/// `server.allow_from` and `server.trusted_proxies`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceRules {
    /// `None`: any address may post.
    allow: Option<Vec<Cidr>>,
    trusted: Vec<Cidr>,
}

impl SourceRules {
    /// The rules of `server`; the error names the key and the entry.
    pub fn from_config(server: &ServerConfig) -> Result<SourceRules, String> {
        let parse = |key: &str, list: &[String]| -> Result<Vec<Cidr>, String> {
            list.iter()
                .enumerate()
                .map(|(i, t)| Cidr::parse(t.trim()).map_err(|e| format!("server.{key}[{i}]: {e}")))
                .collect()
        };
        if server.allow_from.as_ref().is_some_and(|l| l.is_empty()) {
            // Almost always a mistake for "any": say so rather than answer
            // every callback 403.
            return Err("server.allow_from = [] would refuse every callback: remove the key to allow any address, or list the ranges callbacks come from".into());
        }
        Ok(SourceRules {
            allow: match &server.allow_from {
                Some(list) => Some(parse("allow_from", list)?),
                None => None,
            },
            trusted: parse("trusted_proxies", &server.trusted_proxies)?,
        })
    }

    /// Nobody may post: what rules that cannot be parsed fall back to.
    pub fn deny_all() -> SourceRules {
        SourceRules {
            allow: Some(Vec::new()),
            trusted: Vec::new(),
        }
    }

    /// Rules that parse but are probably not what was meant, one line each
    /// (check-config prints them, start and reload log them).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for t in &self.trusted {
            if t.prefix == 0 {
                out.push(format!("server.trusted_proxies has {t}: every client is then trusted to name any address in X-Forwarded-For; list only the load balancer's (ingress controller's) addresses"));
            }
        }
        for a in self.allow.iter().flatten() {
            for t in self.trusted.iter().filter(|t| t.overlaps(a)) {
                out.push(format!("server.allow_from {a} and server.trusted_proxies {t} overlap: a request from there without X-Forwarded-For counts as the proxy itself and is allowed, and behind the proxy the client is the forwarded address, which must be in allow_from; allow_from is normally Tencent's egress ranges and trusted_proxies only the load balancer's"));
            }
        }
        out
    }

    /// Whether every address may post (no `allow_from`): nothing to check.
    pub fn allows_any(&self) -> bool {
        self.allow.is_none()
    }

    /// `Err(client)` when the client of a request from `peer` carrying
    /// `forwarded_for` (every `X-Forwarded-For` header, in order) is not
    /// allowed.
    pub fn check<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> Result<(), Client> {
        if self.allows_any() {
            return Ok(());
        }
        let client = self.client(peer, forwarded_for);
        if self.allows(&client) {
            Ok(())
        } else {
            Err(client)
        }
    }

    /// Whether `client`, as [`SourceRules::client`] resolved it, may post:
    /// for a caller that needs the client for more than this check and
    /// resolves it once.
    pub fn allows(&self, client: &Client) -> bool {
        match (&self.allow, client) {
            (None, _) => true,
            (Some(allow), Client::Ip(ip)) => allow.iter().any(|c| c.contains(*ip)),
            (Some(_), Client::Unparsable(_)) => false,
        }
    }

    /// The client address: the peer's, or through trusted proxies the
    /// right-most forwarded entry that is not one of them.
    pub fn client<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> Client {
        let trusted = |ip: IpAddr| self.trusted.iter().any(|c| c.contains(ip));
        if !trusted(peer) {
            return Client::Ip(peer.to_canonical());
        }
        // Headers right to left, and the entries of each right to left.
        let mut client = peer.to_canonical();
        for header in forwarded_for.rev() {
            for entry in header.rsplit(',') {
                let entry = entry.trim();
                match forwarded_address(entry) {
                    Some(ip) if trusted(ip) => client = ip.to_canonical(),
                    Some(ip) => return Client::Ip(ip.to_canonical()),
                    None => return Client::Unparsable(entry.chars().take(64).collect()),
                }
            }
        }
        // Every hop is trusted: the left-most is as far as we can see.
        Client::Ip(client)
    }
}

/// The address of an `X-Forwarded-For` entry: a bare address, or as some
/// proxies write it with the client's port (`192.0.2.1:5678`,
/// `[2001:db8::1]:443`) or bracketed (`[2001:db8::1]`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    // Digits only: u16's parser would also take "+80".
    let port_ok = |p: &str| {
        p.is_empty()
            || p.strip_prefix(':').is_some_and(|n| {
                !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u16>().is_ok()
            })
    };
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        return port_ok(after)
            .then(|| inside.parse::<Ipv6Addr>().ok().map(IpAddr::V6))
            .flatten();
    }
    let (host, port) = entry.rsplit_once(':')?;
    let v4: Ipv4Addr = host.parse().ok()?;
    (!port.is_empty() && port_ok(&entry[host.len()..])).then_some(IpAddr::V4(v4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rules(allow: Option<&[&str]>, trusted: &[&str]) -> SourceRules {
        let server = ServerConfig {
            allow_from: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
            trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
            ..ServerConfig::default()
        };
        SourceRules::from_config(&server).unwrap()
    }

    #[test]
    fn cidrs_parse_and_match_v4_v6_and_mapped_v4() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.255.1.2")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "mapped v4 is v4");
        let c = Cidr::parse("::ffff:192.0.2.0/120").unwrap();
        assert_eq!(c, Cidr::parse("192.0.2.0/24").unwrap());
        assert!(c.contains(ip("192.0.2.200")) && !c.contains(ip("192.0.3.1")));
        let e = Cidr::parse("::ffff:192.0.2.0/64").unwrap_err();
        assert!(e.contains("96 to 128"), "{e}");
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains(ip("2001:db8:ffff::1")));
        assert!(!c.contains(ip("2001:db9::1")));
        assert!(!c.contains(ip("10.0.0.1")));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("::1/128").unwrap().contains(ip("::1")));
        assert!(
            Cidr::parse("192.0.2.7/32")
                .unwrap()
                .contains(ip("192.0.2.7"))
        );
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(!Cidr::parse("0.0.0.0/0").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        assert_eq!(
            Cidr::parse("10.1.2.3/32").unwrap().to_string(),
            "10.1.2.3/32"
        );
    }

    #[test]
    fn bad_cidrs_say_what_to_write() {
        for (bad, says) in [
            ("10.0.0.0/33", "0 to 32"),
            ("2001:db8::/129", "0 to 128"),
            ("10.0.0.1/8", "write 10.0.0.0/8"),
            ("example.com", "not an address range"),
            ("10.0.0.0/", "prefix"),
            ("10.0.0.0/+8", "prefix"),
            ("", "not an address range"),
        ] {
            let e = Cidr::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let server = ServerConfig {
            trusted_proxies: vec!["10.0.0.0/8".into(), "nope".into()],
            ..ServerConfig::default()
        };
        let e = SourceRules::from_config(&server).unwrap_err();
        assert!(e.contains("server.trusted_proxies[1]"), "{e}");
    }

    #[test]
    fn overlaps_catch_all_proxies_and_empty_lists_are_named() {
        let w = rules(Some(&["10.0.0.0/8"]), &["10.1.0.0/16"]).warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("10.0.0.0/8") && w[0].contains("overlap"),
            "{w:?}"
        );
        let w = rules(Some(&["192.0.2.0/24"]), &["0.0.0.0/0", "::/0"]).warnings();
        assert_eq!(
            w.iter().filter(|l| l.contains("every client")).count(),
            2,
            "{w:?}"
        );
        assert!(w.iter().any(|l| l.contains("overlap")), "{w:?}");
        assert!(
            rules(Some(&["192.0.2.0/24", "2001:db8::/32"]), &["10.0.0.0/8"])
                .warnings()
                .is_empty()
        );
        let server = ServerConfig {
            allow_from: Some(Vec::new()),
            ..ServerConfig::default()
        };
        let e = SourceRules::from_config(&server).unwrap_err();
        assert!(e.contains("remove the key to allow any address"), "{e}");
    }

    #[test]
    fn forwarded_entries_with_ports_and_brackets_are_addresses() {
        for (entry, want) in [
            ("192.0.2.1", Some("192.0.2.1")),
            ("192.0.2.1:5678", Some("192.0.2.1")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("192.0.2.1:", None),
            ("192.0.2.1:99999", None),
            ("192.0.2.1:+80", None),
            ("192.0.2.1:x", None),
            ("[2001:db8::1]x", None),
            ("[192.0.2.1]", None),
            ("[2001:db8::1", None),
            ("unknown", None),
        ] {
            assert_eq!(forwarded_address(entry), want.map(ip), "{entry}");
        }
        let r = rules(Some(&["203.0.113.0/24", "2001:db8::/32"]), &["10.0.0.0/8"]);
        assert_eq!(
            r.check(ip("10.0.0.1"), ["203.0.113.9:5678"].into_iter()),
            Ok(())
        );
        assert_eq!(
            r.check(
                ip("10.0.0.1"),
                ["[2001:db8::7]:443, 10.0.0.2:80"].into_iter()
            ),
            Ok(())
        );
        assert_eq!(
            r.check(ip("10.0.0.1"), ["198.51.100.1:443"].into_iter()),
            Err(Client::Ip(ip("198.51.100.1")))
        );
    }

    #[test]
    fn a_client_resolved_once_is_allowed_exactly_when_check_allows_it() {
        let cases: [(&str, &[&str]); 6] = [
            ("192.0.2.5", &[]),
            ("198.51.100.1", &["192.0.2.5"]),
            ("10.0.0.1", &["192.0.2.5"]),
            ("10.0.0.1", &["192.0.2.5, 198.51.100.7"]),
            ("10.0.0.1", &["not-an-ip"]),
            ("10.0.0.1", &[]),
        ];
        for r in [
            rules(Some(&["192.0.2.0/24"]), &["10.0.0.0/8"]),
            rules(None, &["10.0.0.0/8"]),
        ] {
            for (peer, xff) in cases {
                let client = r.client(ip(peer), xff.iter().copied());
                assert_eq!(
                    r.allows(&client),
                    r.check(ip(peer), xff.iter().copied()).is_ok(),
                    "{peer} {xff:?}"
                );
            }
        }
    }

    #[test]
    fn no_allow_list_allows_everyone() {
        let r = rules(None, &["10.0.0.0/8"]);
        assert!(r.allows_any());
        assert_eq!(r.check(ip("203.0.113.9"), ["garbage"].into_iter()), Ok(()));
    }

    #[test]
    fn the_peer_decides_unless_it_is_a_trusted_proxy() {
        let r = rules(Some(&["192.0.2.0/24"]), &[]);
        assert_eq!(r.check(ip("192.0.2.5"), [].into_iter()), Ok(()));
        assert_eq!(r.check(ip("::ffff:192.0.2.5"), [].into_iter()), Ok(()));
        // An untrusted peer's X-Forwarded-For is ignored: it could say anything.
        assert_eq!(
            r.check(ip("198.51.100.1"), ["192.0.2.5"].into_iter()),
            Err(Client::Ip(ip("198.51.100.1")))
        );
    }

    #[test]
    fn through_trusted_proxies_the_rightmost_untrusted_entry_is_the_client() {
        let r = rules(Some(&["192.0.2.0/24"]), &["10.0.0.0/8", "::1"]);
        // The client prepends a forged allowed address; the proxy appends the real one.
        assert_eq!(
            r.client(ip("10.0.0.1"), ["192.0.2.5, 198.51.100.7"].into_iter()),
            Client::Ip(ip("198.51.100.7"))
        );
        assert!(
            r.check(ip("10.0.0.1"), ["192.0.2.5, 198.51.100.7"].into_iter())
                .is_err()
        );
        // Two proxies, two headers: concatenated in order, walked from the right.
        assert_eq!(
            r.check(
                ip("::1"),
                ["198.51.100.7, 192.0.2.9", "10.1.1.1"].into_iter()
            ),
            Ok(())
        );
        // No header: the proxy itself is the client.
        assert_eq!(
            r.client(ip("10.0.0.1"), [].into_iter()),
            Client::Ip(ip("10.0.0.1"))
        );
        // Every hop trusted: the left-most.
        assert_eq!(
            r.client(ip("10.0.0.1"), ["10.9.9.9,10.8.8.8"].into_iter()),
            Client::Ip(ip("10.9.9.9"))
        );
        // Garbage where an address should be is the client, and matches nothing.
        assert_eq!(
            r.check(ip("10.0.0.1"), ["192.0.2.5, not-an-ip"].into_iter()),
            Err(Client::Unparsable("not-an-ip".into()))
        );
        assert_eq!(
            r.check(ip("10.0.0.1"), ["192.0.2.5,,"].into_iter()),
            Err(Client::Unparsable("".into()))
        );
        // Garbage to the left of the client is never reached.
        assert_eq!(
            r.check(ip("10.0.0.1"), ["junk, 192.0.2.5"].into_iter()),
            Ok(())
        );
    }
}
