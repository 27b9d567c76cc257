//! Counters of everything a pool does, kept so metrics and the admin console can export them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters of one pool.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Server logins that succeeded.
    pub server_logins: AtomicU64,
    /// Server logins that failed.
    pub server_login_failures: AtomicU64,
    /// Server connections closed (dirty, dead, or on shutdown).
    pub servers_closed: AtomicU64,
    /// Idle connections found dead or retired (at checkout, or by the idle watch) and closed
    /// without any client noticing.
    pub dead_on_checkout: AtomicU64,
    /// Checkouts served.
    pub checkouts: AtomicU64,
    /// Checkouts that had to queue.
    pub queued: AtomicU64,
    /// Checkouts that gave up at their wait deadline.
    pub wait_timeouts: AtomicU64,
    /// Total microseconds clients spent queued.
    pub wait_us_total: AtomicU64,
    /// Transactions relayed (transaction mode) or sessions (session mode).
    pub transactions: AtomicU64,
    /// Backend failures detected (the backend marked down, or found restarted).
    pub restarts_detected: AtomicU64,
    /// Probes of a down backend.
    pub reconnect_attempts: AtomicU64,
    /// Probes that failed.
    pub reconnect_failures: AtomicU64,
    /// Checkouts held while the backend was down (instead of failing).
    pub clients_held: AtomicU64,
    /// Requests moved to another server connection because theirs died before any of their
    /// bytes were sent.
    pub transparent_retries: AtomicU64,
    /// Times the backend refused to bring a server connection to a client's session settings
    /// (the connection was reset, and the client's transaction tried once more).
    pub settings_refused: AtomicU64,
    /// Session settings dropped from a client's session because the backend refused them on
    /// two server connections.
    pub settings_dropped: AtomicU64,
    /// Times a transaction-mode client got pinned to its server connection (it left session
    /// state there: temporary tables, advisory locks, ...).
    pub pins: AtomicU64,
    /// Gauge, not a counter: clients of the pool connected now.
    pub clients: AtomicU64,
    /// Gauge, not a counter: clients pinned to their server connection now.
    pub pinned_clients: AtomicU64,
    /// Server connections retired after `server_lifetime`.
    pub servers_retired: AtomicU64,
    /// Idle server connections closed after `server_idle_timeout`.
    pub servers_idle_closed: AtomicU64,
    /// Server connections opened ahead of demand (`min_pool_size`).
    pub servers_warmed: AtomicU64,
    /// Connections closed on release so their slot could go to another pool.
    pub slots_given_up: AtomicU64,
    /// Checkouts that took over the slot of another pool's idle connection.
    pub slots_taken_over: AtomicU64,
    /// Clients refused at once because their tenant's queue was full (`max_queue`).
    pub queue_full: AtomicU64,
    /// Queued clients that cancelled their wait (CancelRequest).
    pub wait_cancelled: AtomicU64,
    /// Waiting clients sent a `query_wait_notify` NOTICE.
    pub wait_notices: AtomicU64,
    /// Queries cancelled by `query_timeout`.
    pub query_timeouts: AtomicU64,
    /// Server connections closed because a query did not stop after its cancel.
    pub query_timeout_closes: AtomicU64,
    /// Clients disconnected by `idle_transaction_timeout`.
    pub idle_transaction_timeouts: AtomicU64,
    /// Clients disconnected by `client_idle_timeout`.
    pub client_idle_timeouts: AtomicU64,
    /// Pinned clients disconnected by `pinned_idle_timeout`.
    pub pinned_idle_timeouts: AtomicU64,
    /// Statements refused because the pool's or its tenant's `max_pinned` was reached.
    pub pin_refusals: AtomicU64,
    /// Prepared statements a server connection already had.
    pub prepared_hits: AtomicU64,
    /// Prepared statements that had to be (re-)prepared on a server connection.
    pub prepared_misses: AtomicU64,
    /// Prepared statements closed on a server to stay within `max_prepared_statements`.
    pub prepared_evictions: AtomicU64,
    /// Bytes read from clients (relayed to server connections, or answered by pgsluice).
    pub client_bytes: AtomicU64,
    /// Bytes read from server connections.
    pub server_bytes: AtomicU64,
    /// ErrorResponses sent to clients in their transactions (forwarded or pgsluice's own), by
    /// SQLSTATE class (`??`: unknown); at most 36 x 36 + 1 entries.
    pub errors: std::sync::Mutex<std::collections::BTreeMap<[u8; 2], u64>>,
}

impl PoolStats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds errors by SQLSTATE class.
    pub fn count_errors(&self, errors: &[([u8; 2], u64)]) {
        let mut map = crate::sync::lock(&self.errors);
        for (class, n) in errors {
            *map.entry(*class).or_insert(0) += n;
        }
    }

    /// Errors by SQLSTATE class so far.
    pub fn errors(&self) -> Vec<([u8; 2], u64)> {
        crate::sync::lock(&self.errors)
            .iter()
            .map(|(c, n)| (*c, *n))
            .collect()
    }
}
