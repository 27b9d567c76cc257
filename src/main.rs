//! The `pgsluice` binary: command line, logging, runtime, exit code. All logic is in the library.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pgsluice::app::Proxy;
use pgsluice::config::Config;
use pgsluice::devpg::{ClusterOptions, TempCluster};

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGSLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
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
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let proxy = Proxy::start(config).await.context("starting the listener")?;
        if announce {
            println!(
                "\npgsluice is ready. Connect with:\n\n  psql postgres://postgres:postgres@{addr}/postgres\n\n  DATABASE_URL=postgres://postgres:postgres@{addr}/postgres\n\nCtrl-C stops the proxy and removes the throwaway database.\n",
                addr = proxy.addr()
            );
        }
        wait_for_stop(&proxy).await?;
        tracing::info!("shutting down");
        proxy.stop().await;
        anyhow::Ok(())
    })?;
    drop(throwaway);
    Ok(())
}

/// Serves signals until SIGINT or SIGTERM: SIGUSR1 pauses every pool (for maintenance),
/// SIGUSR2 resumes them.
async fn wait_for_stop(proxy: &Proxy) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    loop {
        tokio::select! {
            _ = int.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = usr2.recv() => proxy.resume_all(),
            _ = usr1.recv() => {
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
                        _ = usr2.recv() => break,
                        _ = int.recv() => return Ok(()),
                        _ = term.recv() => return Ok(()),
                    }
                }
                tracing::info!("SIGUSR2: resuming all pools");
                proxy.resume_all();
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
