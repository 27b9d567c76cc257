//! Small synchronisation helpers shared by the pool, server and client modules: a
//! poison-tolerant mutex lock, a sleep until an optional instant, and a count of operations in
//! flight that others can wait out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

/// Locks `m`. A panic while holding one of the proxy's locks leaves plain bookkeeping
/// behind, so a poisoned lock is used as is: keep serving.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sleeps until `at`, or forever when there is no `at` (an optional branch of a `select!`).
pub async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Counts operations in flight (forwarded cancels of a server connection, verification logins
/// of a pool) so that others can wait, bounded, until none is left.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    done: Notify,
}

impl InFlight {
    /// One more operation started.
    pub fn begin(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// One operation ended; waiters are woken when none is left.
    pub fn end(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
        }
    }

    /// Whether any operation is in flight (a cheap check).
    pub fn busy(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// Waits until none is in flight, at most until `deadline`; returns whether none is.
    pub async fn wait_idle_until(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.done.notified();
            if !self.busy() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return !self.busy();
            }
        }
    }
}
