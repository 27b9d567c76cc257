//! Server-connection pools, one per (database, user): where a client waits for a server.
//!
//! `checkout` hands out a `Pooled` guard owning a `ServerConn`; the guard returns it on
//! `release` (clean) or closes it on `discard`/drop. The state lives behind a sync mutex that is
//! never held across an `.await`; waiters are FIFO and cancel-safe. No protocol I/O happens
//! under the lock.

mod checkout;
mod guard;
pub mod health;
pub mod key;
mod maintenance;
pub mod state;
pub mod stats;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use checkout::CheckoutError;
pub use guard::Pooled;
pub use key::PoolKey;
pub use state::Counts;
pub use stats::PoolStats;

use crate::auth::secret::Secret;
use crate::config::{Config, Database, PoolSettings, User};
use crate::proto::backend::PgError;
use crate::server::{LoginCredentials, ServerConn, ServerParams, ServerTarget};
use state::PoolState;

/// Whether a (name, value) session setting is accepted by the backend, learned once.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Valid; the value as the backend reports it (normalised), when it reports it.
    Ok(Option<String>),
    /// Refused with this error.
    Refused(PgError),
}

/// One (database, user) pool.
#[derive(Debug)]
pub struct Pool {
    /// Its identity.
    pub key: PoolKey,
    /// Size and mode.
    pub settings: PoolSettings,
    target: ServerTarget,
    configured_creds: LoginCredentials,
    /// Credentials learned from a client's SCRAM proof (pass-through), when none are configured.
    learned_creds: Mutex<Option<LoginCredentials>>,
    connect_timeout: Option<Duration>,
    /// Idle time after which a connection is checked with a round trip before handout.
    check_delay: Option<Duration>,
    /// The backend's availability.
    pub health: health::Health,
    /// Bumped whenever a server connection is lost: idle connections verified before it are
    /// checked with a round trip before their next handout (one loss often means more).
    suspicion: std::sync::atomic::AtomicU64,
    /// Woken when a connection comes back or closes while the pool is paused.
    released: tokio::sync::Notify,
    /// Bound on waiting for a server connection.
    pub query_wait_timeout: Option<Duration>,
    /// Query run before a session-mode connection is reused.
    pub reset_query: String,
    state: Mutex<PoolState<ServerConn>>,
    /// Counters.
    pub stats: PoolStats,
    params: Mutex<Option<Arc<ServerParams>>>,
    verdicts: Mutex<HashMap<(String, String), Verdict>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a pool lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pool {
    /// Builds the pool for (db, user) from the config snapshot.
    pub fn new(config: &Config, db: &Database, user: &User) -> Pool {
        let settings = config.pool_settings(db, user);
        let (server_user, creds) = match (&db.server_credentials, &user.server_password) {
            (Some((u, p)), _) => (u.clone(), LoginCredentials::Password(p.clone())),
            (None, Some(p)) => (user.name.clone(), LoginCredentials::Password(p.clone())),
            (None, None) => match &user.secret {
                Some(Secret::Md5(hash)) => (user.name.clone(), LoginCredentials::Md5Hash(hash.clone())),
                _ => (user.name.clone(), LoginCredentials::None),
            },
        };
        Pool {
            key: PoolKey {
                database: db.name.clone(),
                user: user.name.clone(),
            },
            state: Mutex::new(PoolState::new(settings.pool_size)),
            settings,
            target: ServerTarget {
                backend: Arc::new(db.backend.clone()),
                dbname: db.dbname.clone(),
                user: server_user,
                max_prepared: usize::try_from(config.max_prepared_statements).unwrap_or(usize::MAX),
            },
            configured_creds: creds,
            learned_creds: Mutex::new(None),
            connect_timeout: config.server_connect_timeout,
            query_wait_timeout: config.query_wait_timeout,
            check_delay: config.server_check_delay,
            health: health::Health::default(),
            released: tokio::sync::Notify::new(),
            suspicion: std::sync::atomic::AtomicU64::new(0),
            reset_query: config.server_reset_query.clone(),
            stats: PoolStats::default(),
            params: Mutex::new(None),
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers SCRAM keys recovered from a client's proof, used to log in when no password
    /// is configured (pass-through).
    pub fn learn_scram_keys(&self, client_key: [u8; 32], server_key: [u8; 32]) {
        if matches!(self.configured_creds, LoginCredentials::None) {
            *lock(&self.learned_creds) = Some(LoginCredentials::ScramKeys {
                client_key,
                server_key,
            });
        }
    }

    fn credentials(&self) -> LoginCredentials {
        match &self.configured_creds {
            LoginCredentials::None => lock(&self.learned_creds)
                .clone()
                .unwrap_or(LoginCredentials::None),
            c => c.clone(),
        }
    }

    /// ParameterStatus values of the most recent server login, if any login happened yet.
    pub fn cached_params(&self) -> Option<Arc<ServerParams>> {
        lock(&self.params).clone()
    }

    /// What the pool knows about a session setting.
    pub fn verdict(&self, name: &str, value: &str) -> Option<Verdict> {
        lock(&self.verdicts)
            .get(&(name.to_string(), value.to_string()))
            .cloned()
    }

    /// Records whether a session setting is valid.
    pub fn record_verdict(&self, name: &str, value: &str, verdict: Verdict) {
        lock(&self.verdicts).insert((name.to_string(), value.to_string()), verdict);
    }

    /// Connection counts now.
    pub fn counts(&self) -> Counts {
        lock(&self.state).counts()
    }

    /// Closes every idle connection (shutdown, reconnect).
    pub fn close_idle(&self) {
        let conns = lock(&self.state).drain_idle();
        for c in conns {
            self.close(c);
        }
    }

    /// Pauses the pool for maintenance: new transactions wait (within their wait timeout),
    /// transactions in flight finish, then every server connection is closed. Returns once
    /// no server connection is left.
    pub async fn pause(&self) {
        self.begin_pause();
        loop {
            let released = self.released.notified();
            let c = self.counts();
            self.close_idle();
            if c.active == 0 && c.connecting == 0 {
                return;
            }
            released.await;
        }
    }

    /// Stops handing out connections at once (what `pause` starts with), so several pools can
    /// be paused together before waiting for each to drain.
    pub fn begin_pause(&self) {
        lock(&self.state).set_paused(true);
    }

    /// Ends a pause: waiting clients are served in order.
    pub fn resume(&self) {
        lock(&self.state).set_paused(false);
    }

    /// Whether the pool is paused.
    pub fn paused(&self) -> bool {
        lock(&self.state).paused()
    }

    /// Retires every server connection: idle ones now, busy ones when they come back (an
    /// operator's reconnect, or a crash every backend process goes down with).
    pub fn reconnect(&self) {
        self.health.retire_all();
        self.close_idle();
    }

    /// A server connection failed while serving a client with `err` (if the backend said
    /// anything). A crash (57P02) takes every backend process down: retire them all. Anything
    /// else retires only that connection (an operator's pg_terminate_backend hits one).
    pub fn server_failed(&self, err: Option<&PgError>) {
        self.suspect_idle();
        if err.is_some_and(|e| e.code() == "57P02") {
            PoolStats::bump(&self.stats.restarts_detected);
            self.reconnect();
        }
    }

    /// A checked-out connection failed: close it and, in its slot, verify the backend with a
    /// fresh login. Until that verdict, checkouts wait (briefly) instead of taking idle
    /// connections that may be dying too. A transient failure marks the backend down and
    /// retires every older connection; a success puts the new connection in the pool.
    fn replace_failed(self: &Arc<Self>, mut conn: ServerConn, err: Option<&PgError>) {
        conn.terminate_nowait();
        drop(conn);
        PoolStats::bump(&self.stats.servers_closed);
        self.server_failed(err);
        self.health.begin_verify();
        // The dead connection's slot now counts as a connection being opened.
        lock(&self.state).reopening();
        let pool = self.clone();
        tokio::spawn(async move {
            match pool.login().await {
                Ok(conn) => {
                    lock(&pool.state).connected();
                    pool.checkin(conn);
                }
                Err(e) => {
                    PoolStats::bump(&pool.stats.server_login_failures);
                    if health::is_transient(&e) && pool.health.login_failed(&e) {
                        PoolStats::bump(&pool.stats.restarts_detected);
                        tracing::warn!(pool = %pool.key, error = %e, "backend unavailable; holding clients and probing with backoff");
                        pool.close_idle();
                    }
                    lock(&pool.state).slot_freed(true);
                }
            }
            pool.health.end_verify();
        });
    }

    /// Makes every idle connection prove itself with a round trip before its next handout:
    /// a restart kills all backends within milliseconds, faster than their FATALs arrive.
    fn suspect_idle(&self) {
        self.suspicion.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The current suspicion level, recorded by connections that passed a check.
    fn suspicion(&self) -> u64 {
        self.suspicion.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes a connection and frees its slot for the next waiter.
    fn close(&self, mut conn: ServerConn) {
        conn.terminate_nowait();
        drop(conn);
        PoolStats::bump(&self.stats.servers_closed);
        let paused = {
            let mut st = lock(&self.state);
            st.slot_freed(false);
            st.paused()
        };
        if paused {
            self.released.notify_waiters();
        }
    }

    /// A clean connection goes back: to the first waiter, or the idle list.
    fn checkin(&self, conn: ServerConn) {
        let paused = {
            let mut st = lock(&self.state);
            st.give_back(conn);
            st.paused()
        };
        if paused {
            self.released.notify_waiters();
        }
    }
}

/// All pools of one config snapshot, created on first use.
#[derive(Debug)]
pub struct Pools {
    config: Arc<Config>,
    pools: Mutex<BTreeMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    /// An empty registry for `config`.
    pub fn new(config: Arc<Config>) -> Pools {
        Pools {
            config,
            pools: Mutex::new(BTreeMap::new()),
        }
    }

    /// The config snapshot these pools were built from.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The pool for (db, user), created if needed.
    pub fn get(&self, db: &Database, user: &User) -> Arc<Pool> {
        let key = PoolKey {
            database: db.name.clone(),
            user: user.name.clone(),
        };
        let mut pools = lock(&self.pools);
        pools
            .entry(key)
            .or_insert_with(|| {
                let pool = Arc::new(Pool::new(&self.config, db, user));
                tokio::spawn(maintenance::run(Arc::downgrade(&pool)));
                pool
            })
            .clone()
    }

    /// Every pool, for inspection.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }
}
