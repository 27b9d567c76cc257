//! `Pooled`: the RAII handle on a checked-out server connection. `release` returns a clean
//! connection; `discard` (or dropping the handle) closes it, so a connection whose state is
//! unknown is never reused.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use super::Pool;
use crate::server::ServerConn;

/// How long a released connection may wait for a forwarded cancel to finish before it is
/// closed instead of reused.
const CANCEL_SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// A checked-out server connection.
#[derive(Debug)]
pub struct Pooled {
    pool: Arc<Pool>,
    conn: Option<ServerConn>,
    handed_out: tokio::time::Instant,
}

impl Pooled {
    pub(super) fn new(pool: Arc<Pool>, conn: ServerConn, handed_out: tokio::time::Instant) -> Self {
        Pooled {
            pool,
            conn: Some(conn),
            handed_out,
        }
    }

    /// When the checkout handed it out.
    pub fn handed_out(&self) -> tokio::time::Instant {
        self.handed_out
    }

    pub(super) fn set_handed_out(&mut self, at: tokio::time::Instant) {
        self.handed_out = at;
    }

    /// The pool it came from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Returns a clean connection (ReadyForQuery 'I', nothing outstanding) to the pool. If a
    /// cancel forwarded to its backend is still in flight, it rejoins only once that is over.
    pub fn release(self) {
        self.release_at(tokio::time::Instant::now());
    }

    /// `release`, with the time it happens (`now`) already read.
    pub fn release_at(mut self, now: tokio::time::Instant) {
        let Some(mut conn) = self.conn.take() else { return };
        conn.last_used = now;
        if conn.generation != self.pool.health.generation() {
            // From before a backend failure or an operator's reconnect: retire it.
            self.pool.close(conn);
            return;
        }
        if conn.retire_at.is_some_and(|at| conn.last_used >= at) {
            // Past `server_lifetime`, and idle now: retire it.
            super::PoolStats::bump(&self.pool.stats.servers_retired);
            self.pool.close(conn);
            return;
        }
        if !conn.rbuf.is_empty() {
            // Bytes after the final ReadyForQuery: the connection is out of step; never reuse.
            self.pool.close(conn);
            return;
        }
        if conn.cancel_gate.busy() {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                let settled = tokio::time::Instant::now() + CANCEL_SETTLE_LIMIT;
                if conn.cancel_gate.wait_idle_until(settled).await {
                    pool.checkin(conn);
                } else {
                    pool.close(conn);
                }
            });
            return;
        }
        self.pool.checkin(conn);
    }

    /// The connection failed while serving a client (`err`: what the backend said, if
    /// anything). Its slot is used at once for a fresh login that tells whether the backend
    /// itself is going away (a restart) or only this connection was (pg_terminate_backend).
    pub fn failed(mut self, err: Option<&crate::proto::backend::PgError>) {
        let Some(conn) = self.conn.take() else { return };
        self.pool.replace_failed(conn, err);
    }

    /// Closes the connection (state unknown or broken).
    pub fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.close(conn);
        }
    }
}

impl Deref for Pooled {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        match &self.conn {
            Some(c) => c,
            None => unreachable!("Pooled holds its connection until release or discard consumes it"),
        }
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut ServerConn {
        match &mut self.conn {
            Some(c) => c,
            None => unreachable!("Pooled holds its connection until release or discard consumes it"),
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.close(conn);
        }
    }
}
