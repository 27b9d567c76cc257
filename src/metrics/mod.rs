//! What operators watch: the `/metrics` page (Prometheus text format, through the
//! `prometheus` crate's encoder) and the HTTP endpoint serving it with `/healthz` and
//! `/readyz` (`http.rs`).
//!
//! Nothing here is on the hot path but the histograms' `observe` (a few atomic adds): every
//! counter and gauge already lives in the pools (`PoolStats`, slot counts, tenant counts) and
//! is read at scrape time (`export.rs`), with no per-client work, so a scrape costs the same
//! with 10 clients or 10,000.

mod export;
pub mod http;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

pub use export::render;

/// Histogram buckets (upper bounds), in microseconds: 50 µs to 60 s.
pub const BUCKETS_US: [u64; 20] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 20_000_000, 30_000_000, 60_000_000,
];

/// A latency histogram: one counter per bucket (and one past the last) and the sum, in
/// microseconds. Observing is two relaxed atomic adds, no clock read of its own; the page
/// turns it into a Prometheus histogram in seconds (`export.rs`).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last counts those above every bound.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let us = d
            .as_secs()
            .saturating_mul(1_000_000)
            .saturating_add(u64::from(d.subsec_micros()));
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// (observations per bucket, cumulative, one per bound; count of all; sum in seconds).
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(BUCKETS_US.len());
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Ordering::Relaxed);
            if i < BUCKETS_US.len() {
                cumulative.push(total);
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (cumulative, total, sum)
    }
}

/// A pool's latency histograms.
#[derive(Debug, Default)]
pub struct Timings {
    /// Waits for a server connection (every checkout, served or not).
    pub wait: Histogram,
    /// Transactions (transaction mode) or sessions (session mode), from getting the server
    /// connection to giving it back.
    pub transaction: Histogram,
    /// Server logins, from connect to a usable connection.
    pub server_connect: Histogram,
    /// Client logins, from accepting the connection to its first ReadyForQuery.
    pub login: Histogram,
}

/// The proxy's own state, as `/readyz` and `pgsluice_state` tell it, and what it counts
/// outside any pool.
#[derive(Debug, Default)]
pub struct ProxyState {
    state: AtomicU8,
    /// Logins refused, by reason (indexed like `LOGIN_FAILURES`).
    login_failures: [AtomicU64; LOGIN_FAILURES.len()],
}

/// Why a login was refused, as `pgsluice_login_failures_total` labels it.
pub const LOGIN_FAILURES: [&str; 8] = [
    "auth",
    "auth_protocol",
    "unknown_database",
    "client_limit",
    "timeout",
    "protocol",
    "server",
    "shutting_down",
];

/// What the proxy is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not accepting clients yet.
    Starting,
    /// Accepting clients.
    Serving,
    /// Every pool paused (SIGUSR1).
    Paused,
    /// Stopping: no new clients.
    Draining,
}

impl State {
    const ALL: [State; 4] = [State::Starting, State::Serving, State::Paused, State::Draining];

    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Paused => "paused",
            State::Draining => "draining",
        }
    }
}

impl ProxyState {
    /// Now in `state`.
    pub fn set(&self, state: State) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// A login was refused for `reason` (one of `LOGIN_FAILURES`; others are not counted).
    pub fn login_failed(&self, reason: &str) {
        if let Some(i) = LOGIN_FAILURES.iter().position(|r| *r == reason) {
            if let Some(c) = self.login_failures.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Logins refused, by reason.
    pub fn login_failures(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        LOGIN_FAILURES
            .iter()
            .zip(&self.login_failures)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
    }

    /// The state now.
    pub fn get(&self) -> State {
        let n = self.state.load(Ordering::Acquire);
        State::ALL
            .into_iter()
            .find(|s| *s as u8 == n)
            .unwrap_or(State::Starting)
    }

    /// Whether `/readyz` says ready: accepting clients (paused pools still accept them;
    /// they wait in the queue).
    pub fn ready(&self) -> bool {
        matches!(self.get(), State::Serving | State::Paused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_into_their_buckets_and_states_round_trip() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(51));
        h.observe(Duration::from_secs(61));
        let (cumulative, count, sum) = h.snapshot();
        assert_eq!(count, 3);
        assert_eq!(&cumulative[..3], &[1, 2, 2]);
        assert_eq!(cumulative.last(), Some(&2));
        assert!((sum - 61.000_101).abs() < 1e-9);
        let s = ProxyState::default();
        assert!(!s.ready());
        for state in State::ALL {
            s.set(state);
            assert_eq!(s.get(), state);
        }
        s.set(State::Paused);
        assert!(s.ready());
    }
}
