//! Checkout: take an idle connection, open a new one within the pool size, or queue (FIFO)
//! until one is handed over, bounded by the caller's deadline.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::guard::Pooled;
use super::state::{Grant, Take};
use super::{lock, Pool, PoolKey, PoolStats};
use crate::server::{self, ServerConn, ServerError};

/// Why a checkout produced no connection.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The deadline passed while queued.
    #[error("timed out after {waited} waiting for a server connection (pool {pool})")]
    WaitTimeout {
        /// The pool.
        pool: PoolKey,
        /// How long the client waited, formatted.
        waited: String,
    },
    /// Opening a new server connection failed.
    #[error("could not open a server connection for pool {pool}: {source}")]
    Connect {
        /// The pool.
        pool: PoolKey,
        /// What went wrong.
        #[source]
        source: ServerError,
    },
}

impl Pool {
    /// A server connection for the caller, waiting in FIFO order at most until `deadline`.
    /// Idle connections are checked for liveness first; a dead one is closed and replaced
    /// without the caller noticing.
    pub async fn checkout(self: &Arc<Self>, deadline: Option<Instant>) -> Result<Pooled, CheckoutError> {
        PoolStats::bump(&self.stats.checkouts);
        let started = Instant::now();
        loop {
            let step = {
                let mut st = lock(&self.state);
                match st.take() {
                    Take::Idle(c) => Step::Use(c),
                    Take::Connect => Step::Connect,
                    Take::Wait => {
                        let (id, rx) = st.enqueue();
                        Step::Wait(WaitGuard {
                            pool: self.clone(),
                            id,
                            rx: Some(rx),
                        })
                    }
                }
            };
            let grant = match step {
                Step::Use(c) => Grant::Conn(c),
                Step::Connect => Grant::Slot,
                Step::Wait(guard) => {
                    PoolStats::bump(&self.stats.queued);
                    let grant = guard.wait(deadline).await;
                    let waited = started.elapsed();
                    self.stats.wait_us_total.fetch_add(
                        u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    match grant {
                        Some(g) => g,
                        None => {
                            PoolStats::bump(&self.stats.wait_timeouts);
                            return Err(CheckoutError::WaitTimeout {
                                pool: self.key.clone(),
                                waited: fmt_secs(waited),
                            });
                        }
                    }
                }
            };
            match grant {
                Grant::Conn(c) if c.rbuf.is_empty() && c.stream.is_quiet() => {
                    return Ok(Pooled::new(self.clone(), c));
                }
                Grant::Conn(c) => {
                    tracing::debug!(pool = %self.key, server = c.id, "idle server connection is dead; replacing it");
                    PoolStats::bump(&self.stats.dead_on_checkout);
                    self.close(c);
                }
                Grant::Slot => return self.open_new().await,
            }
        }
    }

    /// Opens a connection in a slot already reserved for it.
    async fn open_new(self: &Arc<Self>) -> Result<Pooled, CheckoutError> {
        match server::connect(&self.target, &self.credentials(), self.connect_timeout).await {
            Ok(conn) => {
                PoolStats::bump(&self.stats.server_logins);
                *lock(&self.params) = Some(conn.login_params.clone());
                lock(&self.state).connected();
                tracing::debug!(pool = %self.key, server = conn.id, "server connection opened");
                Ok(Pooled::new(self.clone(), conn))
            }
            Err(source) => {
                PoolStats::bump(&self.stats.server_login_failures);
                lock(&self.state).slot_freed(true);
                tracing::warn!(pool = %self.key, error = %source, "server login failed");
                Err(CheckoutError::Connect {
                    pool: self.key.clone(),
                    source,
                })
            }
        }
    }
}

// Lives on the stack for one loop turn; boxing would allocate on every checkout.
#[allow(clippy::large_enum_variant)]
enum Step {
    Use(ServerConn),
    Connect,
    Wait(WaitGuard),
}

/// A queued waiter. Dropping it (timeout, client gone, task cancelled) leaves the queue; a grant
/// that raced in is passed on, so nothing is lost.
struct WaitGuard {
    pool: Arc<Pool>,
    id: u64,
    rx: Option<oneshot::Receiver<Grant<ServerConn>>>,
}

impl WaitGuard {
    async fn wait(mut self, deadline: Option<Instant>) -> Option<Grant<ServerConn>> {
        let rx = self.rx.as_mut()?;
        let res = match deadline {
            None => rx.await.ok(),
            Some(d) => tokio::time::timeout_at(d, rx).await.ok().and_then(Result::ok),
        };
        if res.is_some() {
            self.rx = None;
        }
        res
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut st = lock(&self.pool.state);
        if st.remove_waiter(self.id) {
            return;
        }
        // Served between the deadline and now: pass the grant on.
        match rx.try_recv() {
            Ok(Grant::Conn(c)) => st.give_back(c),
            Ok(Grant::Slot) => st.slot_freed(true),
            Err(_) => {}
        }
    }
}

fn fmt_secs(d: std::time::Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
