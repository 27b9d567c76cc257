//! Composition root: config → pools → listener. Owns everything that lives as long as the
//! proxy: no globals, so tests run many proxies in one process.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{CancelRegistry, ClientContext};
use crate::config::Config;
use crate::listener::{accept_loop, ClientCount};
use crate::metrics::{ProxyState, State};
use crate::pool::Pools;
use crate::shutdown::Shutdown;

/// How long killed sessions get to write their 57P01 and close.
const KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    state: Arc<ProxyState>,
    shutdown: Shutdown,
    pools: Arc<Pools>,
    listeners: Arc<crate::notify::Listeners>,
    clients: Arc<ClientCount>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Binds `config.listen_addr` (and `metrics_listen_addr`, if set) and starts accepting.
    pub async fn start(config: Config) -> std::io::Result<Proxy> {
        let state = Arc::new(ProxyState::default());
        let metrics_listener = match config.metrics_listen_addr {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        let listener = TcpListener::bind(config.listen_addr).await?;
        let addr = listener.local_addr()?;
        let pools = Arc::new(Pools::new(Arc::new(config)));
        pools.prewarm();
        let mut proxy_secret = [0u8; 32];
        rand::fill(&mut proxy_secret);
        let listeners = Arc::new(crate::notify::Listeners::new(pools.clone()));
        let shutdown = Shutdown::default();
        let ctx = Arc::new(ClientContext {
            pools: pools.clone(),
            cancels: Arc::new(CancelRegistry::default()),
            listeners: listeners.clone(),
            proxy_secret,
            shutdown: shutdown.clone(),
            state: state.clone(),
        });
        let clients = Arc::new(ClientCount::default());
        let (stop, stop_rx) = watch::channel(false);
        let metrics_addr = match metrics_listener {
            Some(l) => {
                let a = l.local_addr()?;
                let sources = crate::metrics::http::Sources {
                    pools: pools.clone(),
                    state: state.clone(),
                    clients: clients.clone(),
                };
                tokio::spawn(crate::metrics::http::serve(l, sources, stop_rx.clone()));
                tracing::info!(addr = %a, "metrics endpoint listening");
                Some(a)
            }
            None => None,
        };
        let task = tokio::spawn(accept_loop(listener, ctx, clients.clone(), stop_rx));
        state.set(State::Serving);
        tracing::info!(%addr, "pgsluice listening");
        Ok(Proxy {
            addr,
            metrics_addr,
            state,
            shutdown,
            pools,
            listeners,
            clients,
            stop,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the HTTP endpoint (`/metrics`) listens, if configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The `/metrics` page as a scrape would get it now.
    pub fn metrics(&self) -> String {
        crate::metrics::render(&self.pools, &self.state, self.clients.get())
    }

    /// The pools (for inspection: counts, stats).
    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    /// Client connections open now.
    pub fn clients(&self) -> u32 {
        self.clients.get()
    }

    /// Pauses every pool (SIGUSR1): transactions in flight finish, new ones wait within their
    /// wait timeout, then all server connections are closed. Returns when that is done.
    pub async fn pause_all(&self) {
        // Every pool stops handing out connections first (pools created meanwhile start
        // paused); then each drains.
        self.state.set(State::Paused);
        for p in self.pools.begin_pause_all() {
            p.pause().await;
        }
    }

    /// Resumes every pool (SIGUSR2).
    pub fn resume_all(&self) {
        self.pools.resume_all();
        self.state.set(State::Serving);
    }

    /// Retires every server connection (idle ones now, busy ones as they come back).
    pub fn reconnect_all(&self) {
        for p in self.pools.all() {
            p.reconnect();
        }
    }

    /// Drains (SIGTERM): `/readyz` turns 503, new logins get 57P03 (cancel requests are still
    /// served), each client is told 57P01 at its next transaction boundary (at once if idle)
    /// and closed. Returns `true` once every client is gone, or, at `timeout`, tells what still
    /// runs 57P01, closes it (waiting at most `KILL_GRACE` for that) and returns `false`.
    pub async fn drain(&self, timeout: Option<std::time::Duration>) -> bool {
        self.state.set(State::Draining);
        self.shutdown.drain();
        let all_left = match timeout {
            None => {
                self.clients.all_gone().await;
                true
            }
            Some(t) => tokio::time::timeout(t, self.clients.all_gone()).await.is_ok(),
        };
        if !all_left {
            tracing::warn!(
                clients = self.clients.get(),
                "shutdown_timeout passed; ending the clients still connected"
            );
            self.shutdown.kill();
            let _ = tokio::time::timeout(KILL_GRACE, self.clients.all_gone()).await;
        }
        all_left
    }

    /// Stops accepting and closes idle server connections (and each notification hub's
    /// listener connection once its last subscriber left). Connected clients keep running
    /// until they leave.
    pub async fn stop(self) {
        self.state.set(State::Draining);
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.listeners.stop();
        for pool in self.pools.all() {
            pool.close_idle();
        }
    }
}
