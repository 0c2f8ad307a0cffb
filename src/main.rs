//! The `timbridge` command line. The gateway itself is the library; see
//! `lib.rs` for how a callback travels.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use timbridge::config::Config;
use timbridge::effective::{Overrides, Source};
use timbridge::{Gateway, logging, send, spool};

/// The version with the commit it was built from (see build.rs), so that a
/// bug report names the exact code.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TIMBRIDGE_COMMIT"),
    ")"
);

/// Tencent Cloud Chat read-receipt callbacks in, Kafka records out.
///
/// timbridge answers Tencent's callbacks once they are safe in a local
/// spool, then publishes them as `read_receipt.v1` events to Kafka, keyed by
/// conversation. Start with `timbridge serve` on the shipped config.toml: it
/// uses an embedded Kafka, so nothing else needs to be installed.
#[derive(Parser)]
#[command(name = "timbridge", version = VERSION, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C (a second one exits at once).
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Load and validate the config, and print the effective config: the
    /// file with flags and environment applied, secrets redacted, each
    /// overridden value marked with where it came from.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// POST one callback body as Tencent would, and print the status and answer.
    ///
    /// Exits 0 when the answer is 200, 1 when it is another status, and 2
    /// when there is no answer (unreadable file, bad URL, no connection).
    Send {
        #[command(flatten)]
        args: SendCli,
    },
    /// Print a shell completion script, e.g.
    /// `timbridge completions bash > /etc/bash_completion.d/timbridge`.
    Completions {
        /// bash, elvish, fish, powershell or zsh.
        shell: clap_complete::Shell,
    },
    /// Fold the read-receipt topics into the read state of every message.
    ///
    /// Joins the consumer group read_state.group_id over kafka.group_topic
    /// and kafka.c2c_topic, and writes each message's current read state
    /// (read_state.v1) to the compacted topic read_state.topic. Run as many
    /// as there are input partitions; they share the work. Serves /metrics,
    /// /healthz and /readyz on read_state.listen. Stops on SIGTERM.
    Materialize {
        #[arg(long, env = "TIMBRIDGE_CONFIG", default_value = "config.toml")]
        config: PathBuf,
    },
    /// Look at a spool directory.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Pending events, bytes, oldest age and segments of a (stopped) gateway's spool.
    Stat {
        /// The config file naming the spool (spool.dir).
        #[arg(long, env = "TIMBRIDGE_CONFIG", default_value = "config.toml")]
        config: PathBuf,
    },
}

/// The config file and the values that override it; `serve` and
/// `check-config` take the same, so that check-config shows what serve runs.
#[derive(clap::Args)]
struct ConfigArgs {
    /// The config file.
    #[arg(long, env = "TIMBRIDGE_CONFIG", default_value = "config.toml")]
    config: PathBuf,
    /// Overrides server.listen, e.g. 0.0.0.0:8080.
    #[arg(long, env = "TIMBRIDGE_LISTEN")]
    listen: Option<String>,
    /// Overrides kafka.brokers: host:port[,host:port] or "embedded".
    #[arg(long, env = "TIMBRIDGE_BROKERS")]
    brokers: Option<String>,
    /// Refuse to start when a configured topic is missing from the cluster
    /// (sets kafka.require_topics).
    #[arg(long, env = "TIMBRIDGE_REQUIRE_TOPICS")]
    require_topics: bool,
}

impl ConfigArgs {
    /// The overrides given, each with its source (flag or environment).
    fn overrides(&self, m: &ArgMatches) -> Overrides {
        let source = |id: &str, flag: &'static str, env: &'static str| match m.value_source(id) {
            Some(ValueSource::EnvVariable) => Source::Env(env),
            _ => Source::Flag(flag),
        };
        Overrides {
            listen: self
                .listen
                .clone()
                .map(|v| (v, source("listen", "--listen", "TIMBRIDGE_LISTEN"))),
            brokers: self
                .brokers
                .clone()
                .map(|v| (v, source("brokers", "--brokers", "TIMBRIDGE_BROKERS"))),
            require_topics: self.require_topics.then(|| {
                source(
                    "require_topics",
                    "--require-topics",
                    "TIMBRIDGE_REQUIRE_TOPICS",
                )
            }),
        }
    }

    /// Where the config file's name came from, for check-config.
    fn file_source(&self, m: &ArgMatches) -> &'static str {
        match m.value_source("config") {
            Some(ValueSource::EnvVariable) => "TIMBRIDGE_CONFIG",
            Some(ValueSource::CommandLine) => "--config",
            _ => "the default",
        }
    }

    fn load(&self, m: &ArgMatches) -> anyhow::Result<(Config, Vec<timbridge::effective::Applied>)> {
        Ok(self.overrides(m).load(&self.config)?)
    }
}

/// jemalloc serves every allocation, librdkafka's included (it replaces
/// `malloc` itself, not just Rust's allocator). The gateway allocates a
/// record's buffers, headers and librdkafka message on a runtime thread and
/// frees them on the Kafka polling thread once delivered; glibc's malloc
/// serialized those frees on the allocating thread's arena lock (futex
/// waits and wake-ups were about 4% of the samples under load). Under wrk,
/// alternated with the glibc build three times: 25% more callbacks per
/// second and 24% less CPU per callback, for about 1 MiB more peak RSS
/// (25.3 against 24.0 MiB, with the settings below).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its first allocation (the `MALLOC_CONF`
/// environment variable still overrides any of them). One arena, whatever
/// the host's CPU count (which a container's CPU limit does not change):
/// the threads' own caches take nearly every allocation, and memory, not
/// lock contention, is what a sidecar runs out of. Draining a 100k-event
/// spool peaked at 27.4-28.1 MiB with one arena against 30.6-31.4 with two,
/// at the same speed. Freed pages go back to the system after about a
/// second instead of ten (jemalloc does that as it allocates, so an idle
/// gateway keeps a burst's pages until traffic resumes); at once
/// (`dirty_decay_ms:0`) cost 20% more CPU per callback.
#[cfg(target_os = "linux")]
#[unsafe(export_name = "malloc_conf")]
static MALLOC_CONF: MallocConf =
    MallocConf(c"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc can read as its `malloc_conf`.
#[cfg(target_os = "linux")]
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a 'static C string that nothing writes.
#[cfg(target_os = "linux")]
unsafe impl Sync for MallocConf {}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, &matches)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The arguments of `timbridge send`.
#[derive(Debug, clap::Args)]
struct SendCli {
    /// The callback URL, e.g. http://127.0.0.1:8080/callback (https:// works too).
    #[arg(long)]
    url: String,
    /// The SdkAppid to send in the query string.
    #[arg(long)]
    sdkappid: u64,
    /// Sign the request with this token (Sign + RequestTime). Prefer
    /// TIMBRIDGE_TOKEN or --token-env: an argument is visible in `ps`.
    #[arg(long, env = "TIMBRIDGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Sign with the token held by this environment variable.
    #[arg(long, value_name = "VAR", conflicts_with = "token")]
    token_env: Option<String>,
    /// The CallbackCommand; defaults to the body's own.
    #[arg(long)]
    command: Option<String>,
    /// Sent as ClientIP in the query string, as Tencent does (the event's client_ip).
    #[arg(long, value_name = "IP")]
    client_ip: Option<String>,
    /// Sent as OptPlatform in the query string, e.g. iOS, Android, Web (the event's platform).
    #[arg(long)]
    platform: Option<String>,
    /// The JSON body to post.
    file: PathBuf,
}

/// The error and its causes, each said once: a message that already
/// quotes its cause (the config file's "No such file or directory") is not
/// followed by the same text again.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<ExitCode> {
    // The subcommand's own matches: where each value came from.
    let sub = matches.subcommand().map(|(_, m)| m).unwrap_or(matches);
    match cli.command {
        Command::Serve { config } => {
            let (cfg, _) = config.load(sub)?;
            logging::init(&cfg.log)?;
            // SIGHUP reads the same file with the same flags and environment.
            let (overrides, path) = (config.overrides(sub), config.config.clone());
            serve(cfg, move || overrides.load(&path).map(|(c, _)| c)).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let (cfg, applied) = config.load(sub)?;
            cfg.resolve_apps()?;
            // What serve would read at start besides the file.
            let cert = timbridge::tls::load(&cfg.server).map_err(anyhow::Error::msg)?;
            if let Some(w) = cert.and_then(|k| {
                timbridge::tls::validity_warning(&cfg.server, &k, std::time::SystemTime::now())
            }) {
                eprintln!("warning: {w}");
            }
            logging::check_level(&cfg.log.level).map_err(anyhow::Error::msg)?;
            for w in timbridge::source::SourceRules::from_config(&cfg.server)
                .map(|r| r.warnings())
                .unwrap_or_default()
            {
                eprintln!("warning: {w}");
            }
            print!(
                "{}",
                timbridge::effective::render(
                    &cfg,
                    &config.config,
                    config.file_source(sub),
                    &applied
                )
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "timbridge",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Send { args } => send_callback(args).await,
        Command::Materialize { config } => {
            let cfg = Config::load(&config)?;
            logging::init(&cfg.log)?;
            ignore_hangups()?;
            timbridge::materialize::run(cfg, wait_for_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Spool {
            command: SpoolCommand::Stat { config },
        } => {
            let cfg = Config::load(&config)?;
            print_spool_stat(&cfg.spool.dir)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `timbridge send`: exit 0 on a 200, 1 on another status.
async fn send_callback(args: SendCli) -> anyhow::Result<ExitCode> {
    let SendCli {
        url,
        sdkappid,
        token,
        token_env,
        command,
        client_ip,
        platform,
        file,
    } = args;
    let body =
        std::fs::read(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let token = match token_env {
        Some(var) => Some(
            std::env::var(&var)
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!("--token-env names {var}, which is not set or empty: export it")
                })?,
        ),
        None => token,
    };
    let out = send::send(send::SendArgs {
        url: &url,
        sdk_app_id: sdkappid,
        token: token.as_deref(),
        command: command.as_deref(),
        client_ip: client_ip.as_deref(),
        platform: platform.as_deref(),
        body,
    })
    .await?;
    println!("{}", out.status);
    println!("{}", String::from_utf8_lossy(&out.body));
    Ok(if out.status == hyper::StatusCode::OK {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn serve(
    cfg: Config,
    reload: impl Fn() -> Result<Config, timbridge::config::ConfigError> + Send + 'static,
) -> anyhow::Result<()> {
    // Before the gateway says it listens: SIGHUP's default action is to exit.
    #[cfg(unix)]
    let hangups = timbridge::reload::hangup_signal()?;
    // Listening from now on for both stop signals (see `Stops`).
    let mut stops = Stops::new();
    let gateway = Gateway::start(cfg).await?;
    #[cfg(unix)]
    tokio::spawn(timbridge::reload::on_sighup(
        hangups,
        gateway.reloader(),
        reload,
    ));
    #[cfg(not(unix))]
    drop(reload);
    stops.next().await;
    tracing::info!("shutting down: finishing in-flight requests (a second signal exits at once)");
    tokio::spawn(async move {
        stops.next().await;
        // Everything answered OK is in the spool already (written, and
        // synced per spool.fsync): exiting now loses nothing acknowledged.
        tracing::warn!("second signal: exiting now; undelivered records stay in the spool");
        std::process::exit(130);
    });
    gateway.shutdown().await
}

/// `materialize` does not reload: SIGHUP, whose default action would end
/// it mid-batch, says so instead (a `kill -HUP` meant for every timbridge
/// process must not stop the fold).
fn ignore_hangups() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::warn!(
                    "SIGHUP: timbridge materialize does not reload its config; restart it to apply a change"
                );
            }
        });
    }
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C), listened to from start until the process
/// ends. A listener made after the first signal misses a second one sent
/// before it exists: the gateway ignored a second SIGTERM sent right after
/// the first (a test caught it, under load), and went on waiting for Kafka.
struct Stops {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Stops {
    fn new() -> Stops {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            // Without them (no signal handlers: never seen), each wait
            // falls back to a listener of its own, as before.
            let streams = signal(SignalKind::terminate())
                .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
                .ok();
            Stops { streams }
        }
        #[cfg(not(unix))]
        Stops {}
    }

    /// The next SIGTERM or SIGINT, counting those since [`Stops::new`].
    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = self.streams.as_mut() {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        wait_for_signal().await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn print_spool_stat(dir: &Path) -> anyhow::Result<()> {
    if spool_in_use(dir) {
        eprintln!(
            "warning: a running timbridge holds this spool (its LOCK file is locked): \
             these figures are a snapshot that changes as it works; /metrics has the live ones"
        );
    }
    let s = spool::stat_dir(dir)?;
    println!("spool:          {}", dir.display());
    println!("pending events: {}", s.pending_events);
    println!("bytes:          {}", s.bytes);
    println!("segments:       {}", s.segments);
    match s.oldest_pending_age {
        Some(age) => println!("oldest pending: {:.1} s ago", age.as_secs_f64()),
        None => println!("oldest pending: -"),
    }
    Ok(())
}

/// Whether another process holds the spool's lock. Trying takes the lock
/// for an instant at most (released when `file` drops at return).
fn spool_in_use(dir: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("LOCK"))
    else {
        return false;
    };
    matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}
