//! The pool's background task, once a second: closes idle connections that died (EOF, or an
//! unsolicited FATAL such as an administrator's shutdown), belong to a retired generation,
//! reached `server_lifetime`, or sat idle past `server_idle_timeout` above `min_pool_size`;
//! hands the slots of idle connections to other pools whose clients wait; then opens
//! connections up to `min_pool_size`, one at a time, when a slot is free.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{Pool, PoolStats};

/// How often idle connections are checked.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Runs until the pool is dropped.
pub async fn run(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        evict_idle(&pool);
        hand_over_idle(&pool);
        warm_up(&pool).await;
    }
}

/// Why an idle connection is closed.
enum Evict {
    Dead,
    Retired,
    IdleTooLong,
}

/// Closes idle connections that are readable (EOF or an unsolicited message), retired, past
/// their lifetime, or idle too long.
fn evict_idle(pool: &Pool) {
    let generation = pool.health.generation();
    let now = Instant::now();
    let idle_limit = pool.settings.server_idle_timeout;
    let mut evicted = Vec::new();
    {
        let mut st = pool.db.lock();
        let counts = st.counts(pool.idx);
        let open = counts.idle + counts.active + counts.connecting;
        // Idle-timeout closes stop at min_pool_size.
        let mut may_close_idle = open.saturating_sub(pool.settings.min_pool_size);
        // A non-blocking peek per idle connection: cheap enough to run under the lock.
        let rejected = st.take_idle_where(pool.idx, |c| {
            let why = if c.generation != generation || !c.rbuf.is_empty() || !c.stream.is_quiet() {
                Some(Evict::Dead)
            } else if c.retire_at.is_some_and(|at| now >= at) {
                Some(Evict::Retired)
            } else if may_close_idle > 0 && idle_limit.is_some_and(|l| now.duration_since(c.last_used) >= l) {
                may_close_idle -= 1;
                Some(Evict::IdleTooLong)
            } else {
                None
            };
            match why {
                Some(w) => {
                    evicted.push(w);
                    true
                }
                None => false,
            }
        });
        drop(st);
        for (c, why) in rejected.into_iter().zip(evicted) {
            match why {
                Evict::Dead => {
                    tracing::debug!(pool = %pool.key, server = c.id, "idle server connection died; closing it");
                    PoolStats::bump(&pool.stats.dead_on_checkout);
                }
                Evict::Retired => {
                    tracing::debug!(pool = %pool.key, server = c.id, "server connection reached server_lifetime; closing it");
                    PoolStats::bump(&pool.stats.servers_retired);
                }
                Evict::IdleTooLong => {
                    tracing::debug!(pool = %pool.key, server = c.id, "server connection idle past server_idle_timeout; closing it");
                    PoolStats::bump(&pool.stats.servers_idle_closed);
                }
            }
            pool.close(c);
        }
    }
}

/// Gives the slots of connections idle for a whole tick to pools of the database whose
/// clients wait for one, whatever the shares: a quiet tenant's connections do not sit idle
/// while others wait, and a busy tenant's connection kept between two of its transactions is
/// left alone.
fn hand_over_idle(pool: &Pool) {
    let idle_a_whole_tick = |c: &crate::server::ServerConn| c.last_used.elapsed() >= WATCH_INTERVAL;
    let taken_over = pool.db.lock().hand_over_idle(Some(&idle_a_whole_tick));
    for c in taken_over {
        PoolStats::bump(&pool.stats.slots_given_up);
        pool.terminate(c);
    }
}

/// Opens connections up to `min_pool_size` while the backend is up and nobody else waits for
/// a slot, one at a time.
async fn warm_up(pool: &Arc<Pool>) {
    let min = pool.settings.min_pool_size;
    while min > 0 && !pool.health.is_down() && !pool.db.is_full() {
        let c = pool.counts();
        if c.idle + c.active + c.connecting >= min || !pool.db.lock().reserve_for_warmup(pool.idx) {
            return;
        }
        match pool.login().await {
            Ok(conn) => {
                pool.db.lock().connected(pool.idx);
                PoolStats::bump(&pool.stats.servers_warmed);
                pool.checkin(conn);
            }
            Err(e) => {
                tracing::debug!(pool = %pool.key, error = %e, "could not pre-warm a server connection");
                PoolStats::bump(&pool.stats.server_login_failures);
                pool.free_slot(true);
                return;
            }
        }
    }
}
