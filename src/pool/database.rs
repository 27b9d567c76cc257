//! What the pools of one database share: its slots (`max_db_connections`, tenant shares,
//! every pool's queue), the pace of new server logins (`server_connect_concurrency`), and
//! the backoff after the backend answered a login with "too many clients".

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::grants::GrantRecord;
use super::health::Backoff;
use super::slots::{Share, Slots};
use super::tenant::TenantState;
use crate::config::{Database, PoolSettings, Tenant};
use crate::server::ServerConn;
use crate::sync::lock;

/// Counters and gauges of one database.
#[derive(Debug, Default)]
pub struct DbStats {
    /// Server logins in progress now.
    pub logins_in_flight: AtomicU32,
    /// Most server logins ever in progress at once.
    pub logins_high_water: AtomicU32,
    /// Logins the backend refused with 53300 (too many clients).
    pub backend_full: AtomicU64,
}

#[derive(Debug)]
struct FullBackoff {
    backoff: Backoff,
    until: Option<Instant>,
}

/// The slots of one database and what paces its logins.
#[derive(Debug)]
pub struct DbSlots {
    /// The database's client-facing name.
    pub name: String,
    slots: Mutex<Slots<ServerConn>>,
    connects: Semaphore,
    full: Mutex<FullBackoff>,
    /// Counters.
    pub stats: DbStats,
}

impl DbSlots {
    /// Empty slots for `db`.
    pub fn new(db: &Database) -> DbSlots {
        let concurrency = usize::try_from(db.server_connect_concurrency.max(1)).unwrap_or(1);
        DbSlots {
            name: db.name.clone(),
            slots: Mutex::new(Slots::new(db.max_db_connections.unwrap_or(u32::MAX))),
            connects: Semaphore::new(concurrency),
            full: Mutex::new(FullBackoff {
                backoff: Backoff::default(),
                until: None,
            }),
            stats: DbStats::default(),
        }
    }

    /// The slots, locked (never across an `.await`).
    pub fn lock(&self) -> MutexGuard<'_, Slots<ServerConn>> {
        lock(&self.slots)
    }

    /// Registers a pool of `tenant` with `settings`; returns its index.
    pub fn add_pool(&self, tenant: &Tenant, state: Arc<TenantState>, settings: &PoolSettings) -> usize {
        let share = Share {
            name: Arc::from(tenant.name.as_str()),
            min: tenant.min_server_conn,
            max: tenant.max_server_conn.unwrap_or(u32::MAX),
            weight: tenant.weight,
        };
        self.lock()
            .add_pool(share, state, settings.pool_size, settings.reserve_pool_size)
    }

    /// Waits for a turn to open a server connection: at most `server_connect_concurrency` at
    /// once.
    pub async fn login_turn(&self) -> LoginTurn<'_> {
        let permit = self.connects.acquire().await.ok();
        let now = self.stats.logins_in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.stats.logins_high_water.fetch_max(now, Ordering::AcqRel);
        LoginTurn {
            db: self,
            _permit: permit,
        }
    }

    /// The backend refused a login with 53300: space the next logins out (doubling, with a
    /// cap) instead of hammering it.
    pub fn backend_full(&self) {
        self.stats.backend_full.fetch_add(1, Ordering::Relaxed);
        let mut f = lock(&self.full);
        let now = Instant::now();
        if f.until.is_some_and(|u| u > now) {
            return;
        }
        // Jittered, so the pools' waiting logins do not all retry at the same instant.
        let first = f.until.is_none();
        let pause = f.backoff.after_failure(first);
        f.until = Some(now + pause);
    }

    /// A login succeeded: the backend has room again.
    pub fn backend_has_room(&self) {
        let mut f = lock(&self.full);
        f.until = None;
        f.backoff.reset();
    }

    /// Whether the backend's last answer to a login was "too many clients".
    pub fn is_full(&self) -> bool {
        lock(&self.full).until.is_some()
    }

    /// When the next login may try again after a "too many clients" answer.
    pub fn full_until(&self) -> Option<Instant> {
        lock(&self.full).until
    }

    /// Records the newest `capacity` slot events (0: stop recording).
    pub fn record_grants(&self, capacity: usize) {
        self.lock().log.enable(capacity);
    }

    /// The slot events recorded so far.
    pub fn grant_records(&self) -> Vec<GrantRecord> {
        self.lock().log.records()
    }

    /// Slots in use now, across the database's pools.
    pub fn used(&self) -> u32 {
        self.lock().used()
    }
}

/// A turn to log in; ends on drop.
#[derive(Debug)]
pub struct LoginTurn<'a> {
    db: &'a DbSlots,
    _permit: Option<SemaphorePermit<'a>>,
}

impl Drop for LoginTurn<'_> {
    fn drop(&mut self) {
        self.db.stats.logins_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
