//! The `pgsluice` binary: command line, logging, runtime, exit code. All logic is in the library.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pgsluice::app::Proxy;
use pgsluice::config::{Config, LogFormat};
use pgsluice::devpg::{ClusterOptions, TempCluster};
use sd_notify::NotifyState;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// A PostgreSQL connection-pooling proxy.
#[derive(Debug, Parser)]
#[command(name = "pgsluice", version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, pgsluice starts a throwaway local PostgreSQL and
    /// serves it on `--listen`, for trying things out.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration, print every problem, and exit (non-zero when invalid).
    #[arg(long, requires = "config")]
    check: bool,
    /// Listen address in throwaway mode (no `--config`; with a config, `listen_addr` says it).
    #[arg(long, default_value = "127.0.0.1:6432", conflicts_with = "config")]
    listen: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The log format comes from the config; a config that does not load is reported below.
    let format = cli
        .config
        .as_deref()
        .and_then(|p| Config::load(p).ok())
        .map_or(LogFormat::Text, |c| c.log_format);
    init_logging(format);
    if cli.check {
        return check(&cli);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgsluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `PGSLUICE_LOG`'s level (default `info`), as text or one JSON object per
/// line.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check(cli: &Cli) -> ExitCode {
    let Some(path) = &cli.config else {
        return ExitCode::FAILURE;
    };
    match Config::load(path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            println!("{}: configuration OK", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Kept alive for the whole run in throwaway mode; dropping it removes the cluster.
    let mut throwaway = None;
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => {
            eprintln!("pgsluice: no --config given: starting a throwaway PostgreSQL for you...");
            let cluster =
                TempCluster::start(ClusterOptions::default()).context("starting a throwaway PostgreSQL")?;
            let cfg = Config::parse(&throwaway_config(&cluster, &cli.listen))?;
            throwaway = Some(cluster);
            cfg
        }
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let announce = throwaway.is_some();
    let shutdown_timeout = config.shutdown_timeout;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let mut signals = Signals::new()?;
        let proxy = Proxy::start(config).await.context("starting the listener")?;
        if announce {
            println!(
                "\npgsluice is ready. Connect with:\n\n  psql postgres://postgres:postgres@{addr}/postgres\n\n  DATABASE_URL=postgres://postgres:postgres@{addr}/postgres\n\nCtrl-C stops the proxy and removes the throwaway database.\n",
                addr = proxy.addr()
            );
        }
        let status = format!("serving on {}", proxy.addr());
        notify_systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
        if signals.wait_for_stop(&proxy).await == Stop::Graceful {
            tracing::info!(timeout = ?shutdown_timeout, "draining: new logins refused, clients told 57P01 at their next transaction boundary");
            let status = format!("draining: {} clients connected", proxy.clients());
            notify_systemd(&[NotifyState::Stopping, NotifyState::Status(&status)]);
            tokio::select! {
                all_left = proxy.drain(shutdown_timeout) => {
                    if all_left {
                        tracing::info!("drained: every client left");
                    }
                }
                () = signals.any_stop() => tracing::warn!("second stop signal: stopping at once"),
            }
        } else {
            notify_systemd(&[NotifyState::Stopping]);
        }
        tracing::info!("shutting down");
        proxy.stop().await;
        anyhow::Ok(())
    })?;
    drop(throwaway);
    Ok(())
}

/// Tells systemd (`Type=notify`); does nothing outside systemd.
fn notify_systemd(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// How a stop was asked for.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// SIGTERM or SIGINT: drain.
    Graceful,
    /// SIGQUIT: at once.
    Immediate,
}

/// The signals pgsluice serves.
struct Signals {
    int: Signal,
    term: Signal,
    quit: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// The next SIGTERM, SIGINT or SIGQUIT.
    async fn any_stop(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.quit.recv() => {}
        }
    }

    /// Serves signals until a stop: SIGUSR1 pauses every pool (for maintenance), SIGUSR2
    /// resumes them.
    async fn wait_for_stop(&mut self, proxy: &Proxy) -> Stop {
        loop {
            tokio::select! {
                _ = self.int.recv() => return Stop::Graceful,
                _ = self.term.recv() => return Stop::Graceful,
                _ = self.quit.recv() => return Stop::Immediate,
                _ = self.usr2.recv() => proxy.resume_all(),
                _ = self.usr1.recv() => {
                    tracing::info!("SIGUSR1: pausing all pools");
                    let pause = proxy.pause_all();
                    tokio::pin!(pause);
                    let mut paused = false;
                    loop {
                        tokio::select! {
                            () = &mut pause, if !paused => {
                                paused = true;
                                tracing::info!("all pools paused: no server connections open");
                            }
                            _ = self.usr2.recv() => break,
                            _ = self.int.recv() => return Stop::Graceful,
                            _ = self.term.recv() => return Stop::Graceful,
                            _ = self.quit.recv() => return Stop::Immediate,
                        }
                    }
                    tracing::info!("SIGUSR2: resuming all pools");
                    proxy.resume_all();
                }
            }
        }
    }
}

/// A config serving a throwaway cluster: database `postgres`, user `postgres`/`postgres`.
fn throwaway_config(cluster: &TempCluster, listen: &str) -> String {
    format!(
        r#"listen_addr = "{listen}"
default_pool_size = 10

[databases.postgres]
host = "{host}"
port = {port}

[users.{user}]
password = "{password}"
"#,
        host = cluster.host(),
        port = cluster.port(),
        user = cluster.superuser(),
        password = cluster.superuser_password(),
    )
}
