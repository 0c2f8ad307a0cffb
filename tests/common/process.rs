//! The real `timbridge` binary as a child process, for what only a process
//! can show: SIGKILL, SIGTERM, restarts on the same spool, stderr logs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_timbridge");

/// The `config.toml` shipped at the repository's root.
pub const SHIPPED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");

/// The shipped config's spool directory line.
const SHIPPED_SPOOL: &str = "dir = \"data/spool\"";

/// Writes `text` to `dir/name`; returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `timbridge check-config --config PATH`, run to its end, on the file
/// alone (no `TIMBRIDGE_*` override from the environment of the test run).
pub fn check_config(path: &Path) -> Output {
    super::fork::output(
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(path)
            .env_remove("TIMBRIDGE_BROKERS")
            .env_remove("TIMBRIDGE_LISTEN"),
    )
    .unwrap()
}

/// What a finished command printed, stdout then stderr.
pub fn output_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

pub struct GatewayProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    /// Writes `config` next to the spool and serves it on a free port;
    /// returns once the gateway logs that it listens.
    pub fn start(dir: &Path, config: &str) -> GatewayProcess {
        Self::start_with(dir, config, |_| {})
    }

    pub fn start_with(
        dir: &Path,
        config: &str,
        tweak: impl FnOnce(&mut Command),
    ) -> GatewayProcess {
        let path = dir.join("config.toml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(&path)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        tweak(&mut cmd);
        spawn_until_listening(cmd, "timbridge listening")
    }

    /// The shipped `config.toml` as it is, but for its spool, which goes to
    /// `dir/spool`; served on a free port with the publisher's delivery
    /// lines (debug) in the log. Its Kafka is the embedded broker, whose
    /// address [`GatewayProcess::embedded_bootstrap`] reads from the log.
    pub fn start_shipped(dir: &Path) -> GatewayProcess {
        let shipped = std::fs::read_to_string(SHIPPED_CONFIG).unwrap();
        let spool = format!("dir = \"{}\"", dir.join("spool").display());
        assert!(
            shipped.contains(SHIPPED_SPOOL),
            "config.toml no longer sets {SHIPPED_SPOOL}: update the test harness"
        );
        let config = shipped.replace(SHIPPED_SPOOL, &spool);
        Self::start_with(dir, &config, |cmd| {
            cmd.env("RUST_LOG", "info,timbridge::publish=debug");
        })
    }

    /// The bootstrap address of the embedded Kafka, from its start-up
    /// warning.
    pub fn embedded_bootstrap(&mut self) -> String {
        let line = self.wait_for_log("EMBEDDED KAFKA", Duration::from_secs(30));
        assert!(line.contains("NOT FOR PRODUCTION"), "{line}");
        field(&line, "bootstrap=")
    }

    /// Waits for a log line containing `needle`; panics with the whole log
    /// if it does not come, or if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader thread catch up with the last lines.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "gateway exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line {needle:?} within {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin listener's address, from the line that announces it.
    pub fn admin_addr(&mut self) -> std::net::SocketAddr {
        let line = self.wait_for_log("admin listener", Duration::from_secs(5));
        field(&line, "admin=").parse().unwrap()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends the named signal (`"TERM"`, `"HUP"`, ...).
    pub fn signal(&self, sig: &str) {
        let sig = match sig {
            "TERM" => libc::SIGTERM,
            "INT" => libc::SIGINT,
            "HUP" => libc::SIGHUP,
            "KILL" => libc::SIGKILL,
            other => panic!("no signal named {other} in the tests"),
        };
        // SAFETY: a plain system call on our own child's pid.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// SIGKILL: no chance to flush or sync anything.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits for the process to exit by itself, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `name` (e.g. `addr=`) in a log line, pretty or JSON.
pub fn field(line: &str, name: &str) -> String {
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_str(line) {
        let key = name.trim_end_matches('=');
        if let Some(v) = o.get(key) {
            return v
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string());
        }
    }
    let start = line
        .find(name)
        .map(|i| i + name.len())
        .unwrap_or(line.len());
    let rest = line[start..].trim_start_matches('"');
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"')
        .unwrap_or(rest.len());
    rest[..end].to_owned()
}

/// `[read_state.properties]` for a test where a materializer joins or
/// leaves a running group: the mock cluster finishes a rebalance only when
/// max.poll.interval.ms runs out, and drops a killed member after
/// session.timeout.ms, so both are short.
pub const QUICK_REBALANCE: &str = "[read_state.properties]\n\"session.timeout.ms\" = 6000\n\"max.poll.interval.ms\" = 8000\n\"heartbeat.interval.ms\" = 500\n";

/// `timbridge materialize` on `config` (written to `dir/<name>.toml`) as a
/// child process; returns once it serves its admin listener, whose address
/// is `addr`.
pub fn start_materializer(dir: &Path, name: &str, config: &str) -> GatewayProcess {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["materialize", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    spawn_until_listening(cmd, "materializer listening")
}

/// Starts `cmd` (stderr piped), collects its log lines, and waits for the
/// line containing `listening`, whose `addr=` field is where it serves.
fn spawn_until_listening(mut cmd: Command, listening: &str) -> GatewayProcess {
    // Dropping the handle kills the process, but a test run that aborts
    // (a librdkafka assertion, SIGKILL) skips drop, and the gateway would
    // run on, holding its port and spool. The kernel ends it with the
    // thread that started it: the test's own, which outlives the handle.
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = super::fork::spawn(&mut cmd).unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(strip_ansi(&line));
        }
    });
    let mut p = GatewayProcess {
        child,
        addr: "127.0.0.1:1".parse().unwrap(),
        log,
    };
    let line = p.wait_for_log(listening, Duration::from_secs(30));
    p.addr = field(&line, "addr=").parse().unwrap();
    p
}

impl super::Setup {
    /// The crash every recovery test starts from: with Kafka down, a
    /// gateway process on `config` spools callbacks for groups
    /// `{prefix}-{i}` (none can be delivered) and is SIGKILLed. Returns
    /// the groups, in the order they were spooled.
    pub async fn spool_then_kill(
        &self,
        config: &str,
        prefix: &str,
        range: std::ops::Range<u64>,
    ) -> Vec<String> {
        super::broker_down(&self.cluster, 1);
        let gw = GatewayProcess::start(self.dir.path(), config);
        let groups = super::post_groups(gw.addr, prefix, range).await;
        gw.kill9();
        groups
    }

    /// After [`Setup::spool_then_kill`]: Kafka back, and a new gateway
    /// process on the same spool.
    pub fn restart_with_kafka(&self, config: &str) -> GatewayProcess {
        self.cluster.broker_up(1).unwrap();
        GatewayProcess::start(self.dir.path(), config)
    }

    /// The spool's segment files, oldest first.
    pub fn segments(&self) -> Vec<PathBuf> {
        let mut segments: Vec<_> = std::fs::read_dir(self.dir.path().join("spool"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segments.sort();
        segments
    }

    /// The newest segment file, the one a crash leaves torn.
    pub fn last_segment(&self) -> PathBuf {
        self.segments().pop().expect("a segment file")
    }
}
