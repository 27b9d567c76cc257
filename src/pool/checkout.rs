//! Checkout: take an idle connection, open a new one within the pool size, or queue (FIFO)
//! until one is handed over, bounded by the caller's deadline.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::guard::Pooled;
use super::state::{Grant, Take};
use super::{health, lock, Pool, PoolKey, PoolStats};
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
    /// The backend is down (restarting, crashed, unreachable) and did not come back in time.
    #[error("backend {backend} unavailable for {down_for} (pool {pool}): {last_error}")]
    BackendDown {
        /// The pool.
        pool: PoolKey,
        /// The backend's address.
        backend: String,
        /// 57P03 if its last login answer was "starting up", else 08006.
        code: &'static str,
        /// How long it has been down, formatted.
        down_for: String,
        /// The last failure.
        last_error: String,
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
        if self.health.verifying() {
            let limit = self.connect_timeout.unwrap_or(std::time::Duration::from_secs(5));
            self.health.wait_verified(limit, deadline).await;
        }
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
                            if self.health.outage().is_some() {
                                return Err(self.outage_error(started));
                            }
                            return Err(CheckoutError::WaitTimeout {
                                pool: self.key.clone(),
                                waited: fmt_secs(waited),
                            });
                        }
                    }
                }
            };
            match grant {
                Grant::Conn(c) => {
                    if let Some(c) = self.vet(c).await {
                        return Ok(Pooled::new(self.clone(), c));
                    }
                }
                Grant::Slot => return self.open_new(deadline, started).await,
            }
        }
    }

    /// Checks an idle connection before handing it out: not from before a backend failure,
    /// nothing unsolicited to read (EOF or a FATAL), and — after `server_check_delay` of
    /// idleness — answering a round trip. A dead one is closed and `None` returned: the caller
    /// takes another, and the client never notices.
    async fn vet(self: &Arc<Self>, mut c: ServerConn) -> Option<ServerConn> {
        if self.health.verifying() {
            // Another connection just failed: learn whether the backend is going away (then
            // this one is retired below) before handing this one out.
            let limit = self.connect_timeout.unwrap_or(std::time::Duration::from_secs(5));
            self.health.wait_verified(limit, None).await;
        }
        let alive = c.generation == self.health.generation() && c.rbuf.is_empty() && c.stream.is_quiet();
        let suspicion = self.suspicion();
        let must_answer =
            c.checked_at < suspicion || self.check_delay.is_some_and(|d| c.last_used.elapsed() >= d);
        let alive = alive && (!must_answer || matches!(c.simple_query("").await, Ok(None)));
        if alive {
            c.checked_at = suspicion;
            return Some(c);
        }
        self.suspect_idle();
        tracing::debug!(pool = %self.key, server = c.id, "idle server connection is dead or retired; replacing it");
        PoolStats::bump(&self.stats.dead_on_checkout);
        self.close(c);
        None
    }

    /// Opens a connection in a slot already reserved for it. While the backend is down, this
    /// waits for its turn to probe (one probe at a time, paced by backoff) until `deadline`,
    /// so clients are held instead of failed.
    async fn open_new(
        self: &Arc<Self>,
        deadline: Option<Instant>,
        started: Instant,
    ) -> Result<Pooled, CheckoutError> {
        let mut held = false;
        loop {
            let probe = if self.health.outage().is_some() {
                if !held {
                    held = true;
                    PoolStats::bump(&self.stats.clients_held);
                }
                let guard = match deadline {
                    None => self.health.probe.lock().await,
                    Some(d) => match tokio::time::timeout_at(d, self.health.probe.lock()).await {
                        Ok(g) => g,
                        Err(_) => return Err(self.give_up(started)),
                    },
                };
                if self.health.outage().is_none() {
                    continue;
                }
                let at = self.health.next_probe();
                if deadline.is_some_and(|d| at >= d) {
                    if let Some(d) = deadline {
                        tokio::time::sleep_until(d).await;
                    }
                    return Err(self.give_up(started));
                }
                tokio::time::sleep_until(at).await;
                PoolStats::bump(&self.stats.reconnect_attempts);
                Some(guard)
            } else {
                None
            };
            match self.login().await {
                Ok(conn) => {
                    drop(probe);
                    lock(&self.state).connected();
                    return Ok(Pooled::new(self.clone(), conn));
                }
                Err(e) if health::is_transient(&e) => {
                    PoolStats::bump(&self.stats.server_login_failures);
                    if probe.is_some() {
                        PoolStats::bump(&self.stats.reconnect_failures);
                    }
                    if self.health.login_failed(&e) {
                        PoolStats::bump(&self.stats.restarts_detected);
                        tracing::warn!(pool = %self.key, error = %e, "backend unavailable; holding clients and probing with backoff");
                        self.close_idle();
                    } else {
                        tracing::debug!(pool = %self.key, error = %e, "backend still unavailable");
                    }
                    drop(probe);
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(self.give_up(started));
                    }
                }
                Err(source) => {
                    drop(probe);
                    PoolStats::bump(&self.stats.server_login_failures);
                    lock(&self.state).slot_freed(true);
                    tracing::warn!(pool = %self.key, error = %source, "server login failed");
                    return Err(CheckoutError::Connect {
                        pool: self.key.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// Connects, logs in and learns the backend's identity; a changed identity (or a backend
    /// that was down) retires every older connection.
    pub(super) async fn login(self: &Arc<Self>) -> Result<ServerConn, ServerError> {
        let suspicion = self.suspicion();
        let mut conn = server::connect(&self.target, &self.credentials(), self.connect_timeout).await?;
        let identity = conn.query_text(IDENTITY_QUERY).await?;
        if self.suspicion() != suspicion {
            // Another connection died while this one logged in (a restart signals every
            // backend at once): prove this one survived before a client uses it.
            if let Some(err) = conn.simple_query("").await? {
                return Err(ServerError::Fatal(err));
            }
        }
        if self.health.login_succeeded(identity) {
            tracing::info!(pool = %self.key, "backend available again");
            self.close_idle();
        }
        conn.generation = self.health.generation();
        conn.checked_at = suspicion;
        PoolStats::bump(&self.stats.server_logins);
        *lock(&self.params) = Some(conn.login_params.clone());
        tracing::debug!(pool = %self.key, server = conn.id, "server connection opened");
        Ok(conn)
    }

    /// The slot reserved for a connection that will not be opened goes back; the error names
    /// the outage (57P03 if the backend last said it is starting up, else 08006).
    fn give_up(&self, started: Instant) -> CheckoutError {
        lock(&self.state).slot_freed(true);
        self.outage_error(started)
    }

    /// The error for a client whose wait ended while the backend is (or was just) down.
    fn outage_error(&self, started: Instant) -> CheckoutError {
        match self.health.outage() {
            Some(o) => CheckoutError::BackendDown {
                pool: self.key.clone(),
                backend: self.target.backend.to_string(),
                code: o.code,
                down_for: fmt_secs(o.since.elapsed()),
                last_error: o.last_error,
            },
            // Back up just now: the client still waited its whole wait.
            None => CheckoutError::WaitTimeout {
                pool: self.key.clone(),
                waited: fmt_secs(started.elapsed()),
            },
        }
    }
}

/// How a new connection learns which backend instance it reached: a restart changes it.
const IDENTITY_QUERY: &str = "SELECT pg_catalog.pg_postmaster_start_time()::text";

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
