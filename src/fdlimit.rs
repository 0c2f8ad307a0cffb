//! The open-file limit: every connection, listener, spool segment and Kafka
//! socket is a file descriptor. Containers often start with a soft limit of
//! 1024, below the connections the gateway is configured to serve; past it
//! `accept` fails with EMFILE on both listeners (the admin probes with it,
//! so the pod is restarted) and spool files cannot be opened. So at startup
//! the soft limit is raised to the hard one (which any process may do), and
//! a limit still too low for the configured budgets is reported.

use crate::config::Config;

/// Descriptors beyond the connection budgets: listeners, spool segments and
/// the dead-letter file, Kafka broker sockets and librdkafka's own pipes,
/// log output, a metrics scrape reading /proc.
pub const HEADROOM: u64 = 128;

/// File descriptors the configuration may use at once: every connection of
/// both listeners, the refusals in flight, with `[upstream]` the
/// connections to the app (one per proxied callback, each of which holds a
/// connection of its own, and the read-receipt forwarders), and
/// [`HEADROOM`].
pub fn needed(config: &Config) -> u64 {
    let admin = if config.server.admin_listen.is_some() {
        crate::server::ADMIN_MAX_CONNECTIONS
    } else {
        0
    };
    let upstream = config.upstream.as_ref().map_or(0, |u| {
        let forwarders = if u.forward_read_receipts {
            crate::upstream::FORWARD_CONCURRENCY
        } else {
            0
        };
        u.max_in_flight.min(config.server.max_connections) + forwarders
    });
    (config.server.max_connections + admin + crate::server::REFUSALS_AT_ONCE + upstream) as u64
        + HEADROOM
}

/// What to tell the operator when `limit` descriptors are not enough for
/// `needed`; `None` when they are.
pub fn shortfall(needed: u64, limit: u64, max_connections: usize) -> Option<String> {
    (needed > limit).then(|| {
        format!(
            "the open-file limit is {limit} but server.max_connections = {max_connections} with the admin \
             listener, refusals, connections to the [upstream] app and files needs up to {needed}: past the limit new connections \
             (health probes included) and spool files fail; raise the limit (ulimit -n, LimitNOFILE=, \
             the container runtime's nofile ulimit) or lower server.max_connections"
        )
    })
}

/// Raises the soft open-file limit to the hard limit and returns the limit
/// now in force (`None` where it cannot be read).
#[cfg(unix)]
pub fn raise() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    // RLIM_INFINITY is the largest value: effectively unlimited. rlim_t is
    // u64 on Linux but not on every unix.
    #[allow(clippy::unnecessary_cast)]
    Some(lim.rlim_cur as u64)
}

#[cfg(not(unix))]
pub fn raise() -> Option<u64> {
    None
}

/// [`raise`], then a warning when the limit is still below what `config`
/// needs.
pub fn raise_and_check(config: &Config) {
    let Some(limit) = raise() else {
        return;
    };
    let needed = needed(config);
    match shortfall(needed, limit, config.server.max_connections) {
        Some(warning) => tracing::warn!(limit, needed, "{warning}"),
        None => tracing::debug!(limit, needed, "open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_below_the_connection_budgets_is_reported() {
        // The defaults (4096 connections) against a container's usual 1024.
        let needed = 4096 + 64 + 256 + HEADROOM;
        let warning = shortfall(needed, 1024, 4096).expect("1024 is too few");
        assert!(warning.contains("1024"), "{warning}");
        assert!(
            warning.contains("server.max_connections = 4096"),
            "{warning}"
        );
        assert!(warning.contains(&needed.to_string()), "{warning}");
        assert_eq!(shortfall(needed, needed, 4096), None);
        assert_eq!(shortfall(needed, u64::MAX, 4096), None);
    }

    #[test]
    fn needed_counts_both_listeners_refusals_and_headroom() {
        let dir = tempfile::tempdir().unwrap();
        let text = |extra: &str| {
            format!(
                "[server]\nmax_connections = 100\n{extra}\n[[apps]]\nsdk_app_id = 1\ntoken = \"0123456789abcdef\"\n\
                 [kafka]\nbrokers = \"127.0.0.1:9092\"\n[spool]\ndir = {:?}\n",
                dir.path()
            )
        };
        let plain = Config::parse(&text("")).unwrap();
        assert_eq!(needed(&plain), 100 + 256 + HEADROOM);
        let admin = Config::parse(&text("admin_listen = \"127.0.0.1:0\"")).unwrap();
        assert_eq!(needed(&admin), 100 + 64 + 256 + HEADROOM);
        // A connection to the app per proxied callback (at most one per
        // client connection), and the forwarders.
        let proxy = |up: &str| {
            Config::parse(&(text("") + &format!("[upstream]\nurl = \"http://127.0.0.1:9\"\n{up}")))
                .unwrap()
        };
        assert_eq!(needed(&proxy("")), 100 + 256 + 100 + HEADROOM);
        assert_eq!(
            needed(&proxy("max_in_flight = 10\nforward_read_receipts = true")),
            100 + 256 + 10 + 8 + HEADROOM
        );
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let limit = raise().expect("a unix limit");
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads into the struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        #[allow(clippy::unnecessary_cast)]
        let soft = lim.rlim_cur as u64;
        assert_eq!(limit, soft);
    }
}
