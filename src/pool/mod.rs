//! Server-connection pools, one per (database, user): where a client waits for a server.
//!
//! `checkout` hands out a `Pooled` guard owning a `ServerConn`; the guard returns it on
//! `release` (clean) or closes it on `discard`/drop. The pools of one database share its
//! slots (`slots.rs`: idle lists, FIFO queues, tenant shares) behind one sync mutex that is
//! never held across an `.await`; waiters are cancel-safe. No protocol I/O happens under the
//! lock.

mod checkout;
pub mod database;
pub mod grants;
mod guard;
pub mod health;
pub mod key;
mod maintenance;
pub mod pin_budget;
pub mod slots;
pub mod stats;
pub mod tenant;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use crate::sync::lock;

pub use checkout::CheckoutError;
pub use database::DbSlots;
pub use guard::Pooled;
pub use key::PoolKey;
pub use slots::Counts;
pub use stats::PoolStats;

use crate::auth::secret::Secret;
use crate::config::{Config, Database, PoolSettings, Tenant, User};
use crate::proto::backend::PgError;
use crate::server::{LoginCredentials, ServerConn, ServerParams, ServerTarget};
use crate::settings::Replayable;
use tenant::{Capped, TenantState};

/// One unit of a pool's gauge (`PoolStats::clients`, `pinned_clients`), counted while it
/// lives.
#[derive(Debug)]
pub struct Gauged {
    pool: Arc<Pool>,
    gauge: fn(&PoolStats) -> &std::sync::atomic::AtomicU64,
}

impl Gauged {
    /// Counts one more in `gauge` of `pool`'s stats, until dropped.
    pub fn new(pool: &Arc<Pool>, gauge: fn(&PoolStats) -> &std::sync::atomic::AtomicU64) -> Gauged {
        PoolStats::bump(gauge(&pool.stats));
        Gauged {
            pool: pool.clone(),
            gauge,
        }
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        (self.gauge)(&self.pool.stats).fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

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
    /// Size, mode, timeouts.
    pub settings: PoolSettings,
    /// Its tenant's name.
    pub tenant: std::sync::Arc<str>,
    /// The slots it shares with the other pools of its database.
    pub db: Arc<DbSlots>,
    /// Its index in `db`'s slots.
    idx: usize,
    target: ServerTarget,
    configured_creds: LoginCredentials,
    /// Credentials learned from a client's SCRAM proof (pass-through), when none are configured.
    learned_creds: Mutex<Option<LoginCredentials>>,
    /// The backend's availability.
    pub health: health::Health,
    /// Bumped whenever a server connection is lost: idle connections verified before it are
    /// checked with a round trip before their next handout (one loss often means more).
    suspicion: std::sync::atomic::AtomicU64,
    /// Woken when a connection comes back or closes while the pool is paused.
    released: tokio::sync::Notify,
    /// Query run before a session-mode connection is reused.
    pub reset_query: String,
    /// Counters.
    pub stats: PoolStats,
    /// Latency histograms.
    pub timings: crate::metrics::Timings,
    /// Its `max_pinned` and its tenant's.
    pub pin_budget: pin_budget::PinBudget,
    /// The plan epoch naming its clients' shared prepared statements.
    pub plans: Arc<crate::prepared::PlanEpoch>,
    params: Mutex<Option<Arc<ServerParams>>>,
    /// The settings the backend lets a session change (see `ServerConn::replayable`), with
    /// the backend identity they were read from: read again after a restart (an upgrade
    /// changes them).
    replayable: Mutex<Option<(Option<String>, Arc<Replayable>)>>,
    verdicts: Mutex<HashMap<(String, String), Verdict>>,
}

impl Pool {
    /// Builds the pool for (db, user) from the config snapshot, joining `slots` (the
    /// database's) as a pool of `tenant`.
    pub fn new(
        config: &Config,
        db: &Database,
        user: &User,
        slots: Arc<DbSlots>,
        tenant: Arc<TenantState>,
    ) -> Pool {
        Pool::with_settings(config, db, user, slots, tenant, config.pool_settings(db, user))
    }

    /// `new` with the given settings instead of the config's.
    fn with_settings(
        config: &Config,
        db: &Database,
        user: &User,
        slots: Arc<DbSlots>,
        tenant: Arc<TenantState>,
        settings: PoolSettings,
    ) -> Pool {
        let tenant_name: Arc<str> = Arc::from(user.tenant.name.as_str());
        let pin_budget = pin_budget::PinBudget::new(
            settings.max_pinned,
            &format!("{}/{}", db.name, user.name),
            tenant.pinned.clone(),
            &user.tenant.name,
        );
        let idx = slots.add_pool(&user.tenant, tenant, &settings);
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
            settings,
            tenant: tenant_name,
            db: slots,
            idx,
            target: ServerTarget {
                backend: Arc::new(db.backend.clone()),
                dbname: db.dbname.clone(),
                user: server_user,
                max_prepared: usize::try_from(config.max_prepared_statements).unwrap_or(usize::MAX),
            },
            configured_creds: creds,
            learned_creds: Mutex::new(None),
            health: health::Health::default(),
            released: tokio::sync::Notify::new(),
            suspicion: std::sync::atomic::AtomicU64::new(0),
            reset_query: config.server_reset_query.clone(),
            stats: PoolStats::default(),
            timings: crate::metrics::Timings::default(),
            pin_budget,
            plans: Arc::default(),
            params: Mutex::new(None),
            replayable: Mutex::new(None),
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
        self.db.lock().counts(self.idx)
    }

    /// Closes every idle connection (shutdown, reconnect).
    pub fn close_idle(&self) {
        let conns = self.db.lock().drain_idle(self.idx);
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
        self.db.lock().set_paused(self.idx, true);
    }

    /// Ends a pause: waiting clients are served in order.
    pub fn resume(&self) {
        let closed = self.db.lock().set_paused(self.idx, false);
        for c in closed {
            self.terminate(c);
        }
    }

    /// Whether the pool is paused.
    pub fn paused(&self) -> bool {
        self.db.lock().paused(self.idx)
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
        if err.is_some_and(|e| e.code() == crate::proto::sqlstate::CRASH_SHUTDOWN) {
            PoolStats::bump(&self.stats.restarts_detected);
            self.reconnect();
        }
    }

    /// A checked-out connection failed: close it and, in its slot, verify the backend with a
    /// fresh login. Until that verdict, checkouts wait (briefly) instead of taking idle
    /// connections that may be dying too. A transient failure marks the backend down and
    /// retires every older connection; a success puts the new connection in the pool.
    fn replace_failed(self: &Arc<Self>, conn: ServerConn, err: Option<&PgError>) {
        self.terminate(conn);
        self.server_failed(err);
        self.health.begin_verify();
        // The dead connection's slot now counts as a connection being opened.
        self.db.lock().reopening(self.idx);
        let pool = self.clone();
        tokio::spawn(async move {
            match pool.login().await {
                Ok(conn) => {
                    pool.db.lock().connected(pool.idx);
                    pool.checkin(conn);
                }
                Err(e) => {
                    PoolStats::bump(&pool.stats.server_login_failures);
                    if health::is_transient(&e) && pool.health.login_failed(&e) {
                        PoolStats::bump(&pool.stats.restarts_detected);
                        tracing::warn!(pool = %pool.key, error = %e, "backend unavailable; holding clients and probing with backoff");
                        pool.close_idle();
                    }
                    pool.free_slot(true);
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

    /// Closes a connection and frees its slot for whoever needs it next.
    fn close(&self, conn: ServerConn) {
        self.terminate(conn);
        self.free_slot(false);
    }

    /// A slot of this pool is free (a connection closed, or one being opened was not): it goes
    /// to whoever needs it next, and a pause waiting for the pool to drain is told.
    fn free_slot(&self, was_connecting: bool) {
        let paused = {
            let mut st = self.db.lock();
            st.slot_freed(self.idx, was_connecting);
            st.paused(self.idx)
        };
        if paused {
            self.released.notify_waiters();
        }
    }

    /// Closes a connection whose slot is already accounted for.
    fn terminate(&self, mut conn: ServerConn) {
        conn.terminate_nowait();
        drop(conn);
        PoolStats::bump(&self.stats.servers_closed);
    }

    /// A clean connection goes back: to another pool if its slot should move there, to the
    /// first waiter, or to the idle list.
    fn checkin(&self, conn: ServerConn) {
        let (closed, paused) = {
            let mut st = self.db.lock();
            let closed = st.give_back(self.idx, conn);
            (closed, st.paused(self.idx))
        };
        if let Some(c) = closed {
            PoolStats::bump(&self.stats.slots_given_up);
            self.terminate(c);
        }
        if paused {
            self.released.notify_waiters();
        }
    }
}

/// All pools of one config snapshot, created on first use, with what they share: each
/// database's slots, each tenant's and user's counters.
#[derive(Debug)]
pub struct Pools {
    config: Arc<Config>,
    pools: Mutex<BTreeMap<PoolKey, Arc<Pool>>>,
    databases: Mutex<BTreeMap<String, Arc<DbSlots>>>,
    tenants: Mutex<BTreeMap<String, Arc<TenantState>>>,
    users: Mutex<BTreeMap<String, Arc<Capped>>>,
    /// Every pool is paused (SIGUSR1): pools created meanwhile start paused too. Read and
    /// written under the `pools` lock.
    all_paused: std::sync::atomic::AtomicBool,
}

impl Pools {
    /// An empty registry for `config`.
    pub fn new(config: Arc<Config>) -> Pools {
        Pools {
            config,
            pools: Mutex::new(BTreeMap::new()),
            databases: Mutex::new(BTreeMap::new()),
            tenants: Mutex::new(BTreeMap::new()),
            users: Mutex::new(BTreeMap::new()),
            all_paused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Pauses every pool, and the ones created from now on, until `resume_all`; returns the
    /// existing pools (to wait for them to drain).
    pub fn begin_pause_all(&self) -> Vec<Arc<Pool>> {
        let pools = lock(&self.pools);
        self.all_paused.store(true, std::sync::atomic::Ordering::Release);
        let all: Vec<Arc<Pool>> = pools.values().cloned().collect();
        for p in &all {
            p.begin_pause();
        }
        all
    }

    /// Ends `begin_pause_all`: every pool resumes, each database's pools together (so the
    /// free slots are shared by the rules, not taken by the first pool resumed).
    pub fn resume_all(&self) {
        let all: Vec<Arc<Pool>> = {
            let pools = lock(&self.pools);
            self.all_paused.store(false, std::sync::atomic::Ordering::Release);
            pools.values().cloned().collect()
        };
        let mut by_db: BTreeMap<String, Vec<Arc<Pool>>> = BTreeMap::new();
        for p in all {
            by_db.entry(p.db.name.clone()).or_default().push(p);
        }
        for pools in by_db.values() {
            let Some(first) = pools.first() else { continue };
            let idxs: Vec<usize> = pools.iter().map(|p| p.idx).collect();
            let closed = first.db.lock().set_paused_many(&idxs, false);
            for c in closed {
                first.terminate(c);
            }
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
        if let Some(p) = pools.get(&key) {
            return p.clone();
        }
        let slots = self.database(db);
        let tenant = self.tenant(&user.tenant);
        let pool = Arc::new(Pool::new(&self.config, db, user, slots, tenant));
        if self.all_paused.load(std::sync::atomic::Ordering::Acquire) {
            pool.begin_pause();
        }
        tokio::spawn(maintenance::run(Arc::downgrade(&pool)));
        pools.insert(key, pool.clone());
        pool
    }

    /// A pool of one server connection for (db, user), outside the registry, for a
    /// connection the proxy keeps for itself (the notification hub's listener): it takes a
    /// slot of `db` like any pool, counted against `max_db_connections` and the tenant's
    /// share, but never one of the (db, user) pool's own `pool_size`.
    /// It logs in as `like` does (its configured password, or the SCRAM keys it learned from
    /// a client).
    pub fn dedicated(&self, db: &Database, user: &User, like: &Pool) -> Arc<Pool> {
        let mut settings = self.config.pool_settings(db, user);
        settings.pool_size = 1;
        settings.min_pool_size = 0;
        settings.reserve_pool_size = 0;
        settings.pool_mode = crate::config::PoolMode::Session;
        let slots = self.database(db);
        let tenant = self.tenant(&user.tenant);
        let pool = Pool::with_settings(&self.config, db, user, slots, tenant, settings);
        *lock(&pool.learned_creds) = lock(&like.learned_creds).clone();
        Arc::new(pool)
    }

    /// The slots of database `db`, created if needed.
    pub fn database(&self, db: &Database) -> Arc<DbSlots> {
        lock(&self.databases)
            .entry(db.name.clone())
            .or_insert_with(|| Arc::new(DbSlots::new(db)))
            .clone()
    }

    /// The shared counters of `tenant`, created if needed.
    pub fn tenant(&self, tenant: &Tenant) -> Arc<TenantState> {
        lock(&self.tenants)
            .entry(tenant.name.clone())
            .or_insert_with(|| {
                Arc::new(TenantState::with_caps(
                    tenant.max_queue,
                    tenant.max_client_conn,
                    tenant.max_pinned,
                ))
            })
            .clone()
    }

    /// The client count of `user`, against its `max_client_conn`.
    pub fn user_clients(&self, user: &User) -> Arc<Capped> {
        lock(&self.users)
            .entry(user.name.clone())
            .or_insert_with(|| Arc::new(Capped::new(user.max_client_conn)))
            .clone()
    }

    /// Every pool, for inspection.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }

    /// Every tenant's shared counters (those that had a client), for inspection.
    pub fn tenant_states(&self) -> Vec<(String, Arc<TenantState>)> {
        lock(&self.tenants)
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    }

    /// Every database's slots, for inspection.
    pub fn databases(&self) -> Vec<Arc<DbSlots>> {
        lock(&self.databases).values().cloned().collect()
    }

    /// Creates the pools that keep connections open with no client (`min_pool_size`), where
    /// the proxy can log in on its own (a configured password).
    pub fn prewarm(&self) {
        let config = self.config.clone();
        for db in config.databases.values() {
            for user in config.users.values() {
                let s = config.pool_settings(db, user);
                let can_login = db.server_credentials.is_some()
                    || user.server_password.is_some()
                    || matches!(user.secret, Some(Secret::Md5(_)));
                if s.min_pool_size > 0 && can_login {
                    self.get(db, user);
                }
            }
        }
    }
}
