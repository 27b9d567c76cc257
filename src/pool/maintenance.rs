//! The pool's background task: watches idle server connections and closes the ones that
//! died (EOF, or an unsolicited FATAL such as an administrator's shutdown) or belong to a
//! retired generation, so dead connections are gone before anyone asks for one.

use std::sync::Weak;
use std::time::Duration;

use super::{lock, Pool, PoolStats};

/// How often idle connections are checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Runs until the pool is dropped.
pub async fn run(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        evict_dead_idle(&pool);
    }
}

/// Closes idle connections that are readable (EOF or an unsolicited message) or retired.
fn evict_dead_idle(pool: &Pool) {
    let generation = pool.health.generation();
    // A non-blocking peek per idle connection: cheap enough to run under the lock.
    let dead = lock(&pool.state)
        .take_idle_where(|c| c.generation != generation || !c.rbuf.is_empty() || !c.stream.is_quiet());
    for c in dead {
        tracing::debug!(pool = %pool.key, server = c.id, "idle server connection died; closing it");
        PoolStats::bump(&pool.stats.dead_on_checkout);
        pool.close(c);
    }
}
