//! Two small helpers every task-sharing module uses: a poison-tolerant mutex lock and a sleep
//! until an optional instant.

use std::sync::{Mutex, MutexGuard};

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
