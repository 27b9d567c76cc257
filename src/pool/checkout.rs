//! Checkout: take an idle connection, open a new one in a free slot, or queue (FIFO within
//! the pool, fair across tenants) until one is handed over, bounded by the caller's deadline.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::guard::Pooled;
use super::slots::{Grant, QueueFull, Take};
use super::{health, Pool, PoolKey, PoolStats};
use crate::config::duration::fmt_duration;
use crate::server::{self, ServerConn, ServerError};
use crate::settings::Replayable;
use crate::sync::{lock, until};

/// Why a checkout produced no connection.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The deadline passed while queued.
    #[error("timed out after {waited} waiting for a server connection (pool {pool}, tenant {tenant}){}",
        if *.backend_full { "; the backend refuses new connections: too many clients already" } else { "" })]
    WaitTimeout {
        /// The pool.
        pool: PoolKey,
        /// Its tenant.
        tenant: String,
        /// How long the client waited, formatted.
        waited: String,
        /// The backend's last answer to a login was "too many clients".
        backend_full: bool,
    },
    /// The tenant's queue is full (`max_queue`): refused at once.
    #[error("too many clients waiting for a server connection: tenant {tenant} has {max_queue} queued (max_queue = {max_queue}, pool {pool})")]
    QueueFull {
        /// The pool.
        pool: PoolKey,
        /// Its tenant.
        tenant: String,
        /// The tenant's `max_queue`.
        max_queue: u32,
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
        let got = self.checkout_from(started, deadline).await;
        let ended = match &got {
            Ok(c) => c.handed_out(),
            Err(_) => Instant::now(),
        };
        self.timings
            .wait
            .observe(ended.saturating_duration_since(started));
        got
    }

    async fn checkout_from(
        self: &Arc<Self>,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<Pooled, CheckoutError> {
        if self.health.verifying() {
            self.health.wait_verified(self.connect_limit(), deadline).await;
        }
        loop {
            let step = {
                let mut st = self.db.lock();
                match st.take(self.idx) {
                    Take::Idle(c) => Step::Use(c),
                    Take::Connect => Step::Connect,
                    Take::Replace(victim) => Step::Replace(victim),
                    Take::Wait => match st.enqueue(self.idx) {
                        Ok((id, rx)) => Step::Wait(WaitGuard {
                            pool: self.clone(),
                            id,
                            since: Instant::now(),
                            rx: Some(rx),
                        }),
                        Err(QueueFull { max_queue }) => Step::Full(max_queue),
                    },
                }
            };
            let grant = match step {
                Step::Use(c) => Grant::Conn(c),
                Step::Connect => Grant::Slot,
                Step::Replace(victim) => {
                    // An idle connection of another pool gave up its slot for this one.
                    PoolStats::bump(&self.stats.slots_taken_over);
                    self.terminate(victim);
                    Grant::Slot
                }
                Step::Full(max_queue) => {
                    PoolStats::bump(&self.stats.queue_full);
                    return Err(CheckoutError::QueueFull {
                        pool: self.key.clone(),
                        tenant: self.tenant.to_string(),
                        max_queue,
                    });
                }
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
                            if self.health.is_down() {
                                return Err(self.outage_error(started));
                            }
                            return Err(self.wait_timeout(started));
                        }
                    }
                }
            };
            match grant {
                Grant::Conn(c) => {
                    // Owned by a guard from here: if this checkout is dropped mid-check, the
                    // connection is closed and its slot freed.
                    let mut conn = Pooled::new(self.clone(), c, started);
                    if let Some(now) = self.vet(&mut conn).await {
                        conn.set_handed_out(now);
                        return Ok(conn);
                    }
                    conn.discard();
                }
                Grant::Slot => return self.open_new(deadline, started).await,
            }
        }
    }

    /// Runs a login step within `server_connect_timeout` (unbounded when that is off).
    async fn within_connect_timeout<T>(
        &self,
        step: impl std::future::Future<Output = Result<T, ServerError>>,
    ) -> Result<T, ServerError> {
        let Some(limit) = self.settings.server_connect_timeout else {
            return step.await;
        };
        tokio::time::timeout(limit, step).await.unwrap_or_else(|_| {
            Err(ServerError::ConnectTimeout {
                addr: self.target.backend.to_string(),
                after: fmt_duration(limit),
            })
        })
    }

    /// Bound on the proxy's own waits around a login (a verification in progress, the
    /// liveness round trip at checkout): `server_connect_timeout`, or 5 s when it is off.
    fn connect_limit(&self) -> std::time::Duration {
        self.settings
            .server_connect_timeout
            .unwrap_or(std::time::Duration::from_secs(5))
    }

    /// The error for a client whose wait ended while the backend is up.
    fn wait_timeout(&self, started: Instant) -> CheckoutError {
        CheckoutError::WaitTimeout {
            pool: self.key.clone(),
            tenant: self.tenant.to_string(),
            waited: fmt_secs(started.elapsed()),
            backend_full: self.db.is_full(),
        }
    }

    /// Checks an idle connection before handing it out: not from before a backend failure,
    /// nothing unsolicited to read (EOF or a FATAL), and — after `server_check_delay` of
    /// idleness — answering a round trip. False for a dead one: the caller closes it and takes
    /// another, and the client never notices.
    /// Whether an idle connection may be handed out: `Some` with the time it was found good.
    async fn vet(self: &Arc<Self>, c: &mut ServerConn) -> Option<Instant> {
        if self.health.verifying() {
            // Another connection just failed: learn whether the backend is going away (then
            // this one is retired below) before handing this one out.
            self.health.wait_verified(self.connect_limit(), None).await;
        }
        let now = Instant::now();
        let retired = c.retire_at.is_some_and(|at| now >= at);
        let alive =
            !retired && c.generation == self.health.generation() && c.rbuf.is_empty() && c.stream.is_quiet();
        let suspicion = self.suspicion();
        let must_answer = c.checked_at < suspicion
            || self
                .settings
                .server_check_delay
                .is_some_and(|d| now.saturating_duration_since(c.last_used) >= d);
        let alive = alive
            && (!must_answer
                || matches!(
                    tokio::time::timeout(self.connect_limit(), c.simple_query("")).await,
                    Ok(Ok(None))
                ));
        if alive {
            c.checked_at = suspicion;
            return Some(if must_answer { Instant::now() } else { now });
        }
        if retired {
            PoolStats::bump(&self.stats.servers_retired);
        } else {
            self.suspect_idle();
            PoolStats::bump(&self.stats.dead_on_checkout);
        }
        tracing::debug!(pool = %self.key, server = c.id, "idle server connection is dead or retired; replacing it");
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
        // Freed on every way out but success, including this future being dropped.
        let reservation = Reservation {
            pool: self,
            armed: true,
        };
        let mut held = false;
        loop {
            let probe = if self.health.is_down() {
                if !held {
                    held = true;
                    PoolStats::bump(&self.stats.clients_held);
                }
                let guard = match deadline {
                    None => self.health.probe.lock().await,
                    Some(d) => match tokio::time::timeout_at(d, self.health.probe.lock()).await {
                        Ok(g) => g,
                        Err(_) => return Err(self.outage_error(started)),
                    },
                };
                if !self.health.is_down() {
                    continue;
                }
                let at = self.health.next_probe();
                if deadline.is_some_and(|d| at >= d) {
                    if let Some(d) = deadline {
                        tokio::time::sleep_until(d).await;
                    }
                    return Err(self.outage_error(started));
                }
                tokio::time::sleep_until(at).await;
                PoolStats::bump(&self.stats.reconnect_attempts);
                Some(guard)
            } else {
                None
            };
            let attempt = match deadline {
                None => self.login().await,
                Some(d) => match tokio::time::timeout_at(d, self.login()).await {
                    Ok(r) => r,
                    // Waiting for a login turn, or the login itself, outlasted the deadline.
                    Err(_) => return Err(self.outage_error(started)),
                },
            };
            match attempt {
                Ok(conn) => {
                    drop(probe);
                    reservation.connected();
                    return Ok(Pooled::new(self.clone(), conn, Instant::now()));
                }
                Err(e) if health::is_backend_full(&e) => {
                    // The backend is up but full: not an outage, and not the client's error.
                    // Keep the slot, space the attempts out, and give up at the deadline.
                    drop(probe);
                    PoolStats::bump(&self.stats.server_login_failures);
                    self.db.backend_full();
                    tracing::warn!(pool = %self.key, error = %e, "backend has no room for another connection; backing off");
                    if let Some(until) = self.db.full_until() {
                        if deadline.is_some_and(|d| until >= d) {
                            if let Some(d) = deadline {
                                tokio::time::sleep_until(d).await;
                            }
                            return Err(self.wait_timeout(started));
                        }
                        tokio::time::sleep_until(until).await;
                    }
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
                        return Err(self.outage_error(started));
                    }
                }
                Err(source) => {
                    drop(probe);
                    PoolStats::bump(&self.stats.server_login_failures);
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
        let turn = self.db.login_turn().await;
        // Once it is this login's turn, everything up to a usable connection is bounded by
        // `server_connect_timeout` (the connect and authentication, and the proxy's own round
        // trips after them), so a hung backend cannot hold a login turn.
        let connecting = Instant::now();
        let opened = self
            .within_connect_timeout(async {
                let limit = self.settings.server_connect_timeout;
                let mut conn = server::connect(&self.target, &self.credentials(), limit).await?;
                let identity = conn.query_text(IDENTITY_QUERY).await?;
                conn.replayable = self.replayable_settings(&mut conn, &identity).await?;
                Ok((conn, identity))
            })
            .await;
        drop(turn);
        let (mut conn, identity) = opened?;
        self.timings.server_connect.observe(connecting.elapsed());
        self.db.backend_has_room();
        if self.suspicion() != suspicion {
            // Another connection died while this one logged in (a restart signals every
            // backend at once): prove this one survived before a client uses it.
            if let Some(err) = self.within_connect_timeout(conn.simple_query("")).await? {
                return Err(ServerError::Fatal(err));
            }
        }
        if self.health.login_succeeded(identity) {
            tracing::info!(pool = %self.key, "backend available again");
            self.close_idle();
        }
        conn.generation = self.health.generation();
        conn.checked_at = suspicion;
        conn.retire_at = self
            .settings
            .server_lifetime
            .map(|l| Instant::now() + lifetime_jitter(l));
        PoolStats::bump(&self.stats.server_logins);
        *lock(&self.params) = Some(conn.login_params.clone());
        tracing::debug!(pool = %self.key, server = conn.id, "server connection opened");
        Ok(conn)
    }

    /// The settings this backend lets a session change, read from `pg_settings` by the first
    /// login to each backend instance (`identity`). A backend that cannot say gets an empty
    /// set for this connection: then nothing it reports is replayed.
    async fn replayable_settings(
        &self,
        conn: &mut ServerConn,
        identity: &Option<String>,
    ) -> Result<Arc<Replayable>, ServerError> {
        if let Some((known, set)) = &*lock(&self.replayable) {
            if known == identity {
                return Ok(set.clone());
            }
        }
        let Some(listed) = conn.query_text(REPLAYABLE_QUERY).await? else {
            tracing::warn!(pool = %self.key, "could not read pg_settings; no reported parameter will be replayed");
            return Ok(Arc::default());
        };
        let set = Arc::new(Replayable::parse(&listed));
        *lock(&self.replayable) = Some((identity.clone(), set.clone()));
        Ok(set)
    }

    /// The error for a client whose wait (or attempt to open a connection) ended while the
    /// backend is (or was just) down: 57P03 if it last said it is starting up, else 08006.
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
            None => self.wait_timeout(started),
        }
    }
}

/// The settings a session may change, which the proxy may therefore replay on another
/// connection: every one but the `internal` (read-only) ones. `is_superuser`, `role` and
/// `session_authorization` are not listed in `pg_settings` at all.
const REPLAYABLE_QUERY: &str = "SELECT pg_catalog.string_agg(pg_catalog.lower(name), ',') \
     FROM pg_catalog.pg_settings WHERE context <> 'internal'";

/// How a new connection learns which backend instance it reached: a restart changes it.
const IDENTITY_QUERY: &str = "SELECT pg_catalog.pg_postmaster_start_time()::text";

// Lives on the stack for one loop turn; boxing would allocate on every checkout.
#[allow(clippy::large_enum_variant)]
enum Step {
    Use(ServerConn),
    Connect,
    Replace(ServerConn),
    Full(u32),
    Wait(WaitGuard),
}

/// A queued waiter. Dropping it (timeout, client gone, task cancelled) leaves the queue; a grant
/// that raced in is passed on, so nothing is lost.
struct WaitGuard {
    pool: Arc<Pool>,
    id: u64,
    since: Instant,
    rx: Option<oneshot::Receiver<Grant<ServerConn>>>,
}

impl WaitGuard {
    async fn wait(mut self, deadline: Option<Instant>) -> Option<Grant<ServerConn>> {
        let settings = &self.pool.settings;
        let mut reserve_at = match (settings.reserve_pool_size, settings.reserve_pool_timeout) {
            (0, _) | (_, None) => None,
            (_, Some(t)) => Some(self.since + t),
        };
        let rx = self.rx.as_mut()?;
        let res = loop {
            tokio::select! {
                biased;
                r = &mut *rx => break r.ok(),
                () = until(deadline) => break None,
                () = until(reserve_at) => {
                    // Waited long enough: the pool may grow into its reserve.
                    reserve_at = None;
                    let taken_over = self.pool.db.lock().open_reserve(self.pool.idx, self.since);
                    for c in taken_over {
                        self.pool.terminate(c);
                    }
                }
            }
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
        let mut st = self.pool.db.lock();
        if st.remove_waiter(self.pool.idx, self.id) {
            return;
        }
        // Served between the deadline and now: pass the grant on.
        match rx.try_recv() {
            Ok(Grant::Conn(c)) => {
                if let Some(c) = st.give_back(self.pool.idx, c) {
                    drop(st);
                    self.pool.terminate(c);
                }
            }
            Ok(Grant::Slot) => {
                drop(st);
                self.pool.free_slot(true);
            }
            Err(_) => {}
        }
    }
}

/// A slot reserved for a connection being opened. Dropped without `connected` (an error, the
/// deadline, or the checkout itself dropped: a client gone, a cancel, a login timeout), it
/// frees the slot for the next waiter.
struct Reservation<'a> {
    pool: &'a Pool,
    armed: bool,
}

impl Reservation<'_> {
    /// The connection is logged in: its slot stays taken.
    fn connected(mut self) {
        self.armed = false;
        self.pool.db.lock().connected(self.pool.idx);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.free_slot(true);
        }
    }
}

/// A connection's lifetime: `server_lifetime` minus up to a tenth, so connections opened
/// together are not all retired together.
fn lifetime_jitter(d: std::time::Duration) -> std::time::Duration {
    let tenth = u64::try_from((d / 10).as_nanos()).unwrap_or(u64::MAX);
    if tenth == 0 {
        return d;
    }
    d - std::time::Duration::from_nanos(rand::random::<u64>() % tenth)
}

fn fmt_secs(d: std::time::Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
