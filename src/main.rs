//! The `timbridge` command line. The gateway itself is the library; see
//! `lib.rs` for how a callback travels.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use timbridge::config::Config;
use timbridge::{Gateway, logging, send, spool};

/// Tencent Cloud Chat read-receipt callbacks in, Kafka records out.
///
/// timbridge answers Tencent's callbacks once they are safe in a local
/// spool, then publishes them as `read_receipt.v1` events to Kafka, keyed by
/// conversation. Start with `timbridge serve` on the shipped config.toml: it
/// uses an embedded Kafka, so nothing else needs to be installed.
#[derive(Parser)]
#[command(name = "timbridge", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C (a second one exits at once).
    Serve {
        /// The config file.
        #[arg(long, env = "TIMBRIDGE_CONFIG", default_value = "config.toml")]
        config: PathBuf,
        /// Overrides server.listen, e.g. 0.0.0.0:8080.
        #[arg(long, env = "TIMBRIDGE_LISTEN")]
        listen: Option<String>,
        /// Overrides kafka.brokers: host:port[,host:port] or "embedded".
        #[arg(long, env = "TIMBRIDGE_BROKERS")]
        brokers: Option<String>,
    },
    /// Load and validate the config, print it with secrets redacted.
    CheckConfig {
        #[arg(long, env = "TIMBRIDGE_CONFIG", default_value = "config.toml")]
        config: PathBuf,
    },
    /// POST one callback body as Tencent would, and print the status and answer.
    ///
    /// Exits 0 when the answer is 200, 1 otherwise.
    Send {
        /// The callback URL, e.g. http://127.0.0.1:8080/callback.
        #[arg(long)]
        url: String,
        /// The SdkAppid to send in the query string.
        #[arg(long)]
        sdkappid: u64,
        /// Sign the request with this token (Sign + RequestTime).
        #[arg(long)]
        token: Option<String>,
        /// The CallbackCommand; defaults to the body's own.
        #[arg(long)]
        command: Option<String>,
        /// The JSON body to post.
        file: PathBuf,
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
        #[arg(long, env = "TIMBRIDGE_CONFIG", default_value = "config.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            brokers,
        } => {
            let mut cfg = Config::load(&config)?;
            if let Some(l) = listen {
                cfg.server.listen = l;
            }
            if let Some(b) = brokers {
                cfg.kafka.brokers = b;
            }
            // Overrides are validated like the file.
            let cfg = Config::parse(&toml::to_string(&cfg)?)?;
            logging::init(&cfg.log)?;
            serve(cfg).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            cfg.resolve_apps()?;
            print!("{}", cfg.redacted_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Send {
            url,
            sdkappid,
            token,
            command,
            file,
        } => {
            let body = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let out = send::send(send::SendArgs {
                url: &url,
                sdk_app_id: sdkappid,
                token: token.as_deref(),
                command: command.as_deref(),
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
        Command::Materialize { config } => {
            let cfg = Config::load(&config)?;
            logging::init(&cfg.log)?;
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

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let gateway = Gateway::start(cfg).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: finishing in-flight requests (a second signal exits at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        // Everything answered OK is in the spool already (written, and
        // synced per spool.fsync): exiting now loses nothing acknowledged.
        tracing::warn!("second signal: exiting now; undelivered records stay in the spool");
        std::process::exit(130);
    });
    gateway.shutdown().await
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
