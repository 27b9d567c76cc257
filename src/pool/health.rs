//! Is the backend up? What a pool knows about its backend's availability: marked down by
//! failed logins (connection refused, "starting up", 08xxx), a crash
//! (57P02), or a changed identity; probed back with exponential backoff and jitter, one attempt
//! at a time. A generation number retires every connection from before a failure.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::proto::sqlstate;
use crate::server::ServerError;
use crate::sync::{lock, InFlight};

/// First pause between probes of a down backend.
pub const BACKOFF_START: Duration = Duration::from_millis(25);
/// Longest pause between probes.
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Whether a failed login means "try again soon" (the backend is restarting, overloaded or
/// unreachable) rather than a configuration error to report at once.
pub fn is_transient(e: &ServerError) -> bool {
    match e {
        ServerError::Io { .. } | ServerError::ConnectTimeout { .. } | ServerError::Closed => true,
        ServerError::LoginRefused(err) | ServerError::Fatal(err) => {
            let code = err.code();
            code == sqlstate::CANNOT_CONNECT_NOW
                || code == sqlstate::ADMIN_SHUTDOWN
                || code == sqlstate::CRASH_SHUTDOWN
                || code.starts_with("08")
        }
        ServerError::AuthUnsupported(_)
        | ServerError::Scram(_)
        | ServerError::Protocol(_)
        | ServerError::Unexpected(_) => false,
    }
}

/// Whether a failed login means the backend is up but has no room for another connection
/// (53300 "too many clients already", or a role's connection limit): a capacity signal, not
/// an outage. Clients keep waiting while logins back off.
pub fn is_backend_full(e: &ServerError) -> bool {
    matches!(e, ServerError::LoginRefused(err) | ServerError::Fatal(err)
        if err.code() == sqlstate::TOO_MANY_CONNECTIONS)
}

/// The SQLSTATE a transient failure should be reported with at a client's deadline: 57P03
/// when the backend's last answer was "starting up", else 08006.
fn reported_code(e: &ServerError) -> &'static str {
    match e {
        ServerError::LoginRefused(err) | ServerError::Fatal(err)
            if err.code() == sqlstate::CANNOT_CONNECT_NOW =>
        {
            sqlstate::CANNOT_CONNECT_NOW
        }
        _ => sqlstate::CONNECTION_FAILURE,
    }
}

/// Why the backend is considered down, for the error clients get at their deadline.
#[derive(Debug, Clone)]
pub struct Outage {
    /// When it was marked down.
    pub since: Instant,
    /// SQLSTATE to report (57P03 or 08006).
    pub code: &'static str,
    /// The last failure, for the message.
    pub last_error: String,
}

#[derive(Debug)]
struct State {
    outage: Option<Outage>,
    backoff: Backoff,
    next_probe: Instant,
    identity: Option<String>,
}

/// A pool's view of its backend.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    /// Read on every checkout and release, so it lives outside the lock; bumped under it.
    generation: std::sync::atomic::AtomicU64,
    /// Verifications in progress: a server connection was lost and a fresh login tells
    /// whether it was that connection alone or the whole backend going away.
    verifying: InFlight,
    /// Held by the one task probing a down backend.
    pub probe: tokio::sync::Mutex<()>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Mutex::new(State {
                outage: None,
                backoff: Backoff::default(),
                next_probe: Instant::now(),
                identity: None,
            }),
            generation: std::sync::atomic::AtomicU64::new(0),
            probe: tokio::sync::Mutex::new(()),
            verifying: InFlight::default(),
        }
    }
}

impl Health {
    /// A verification starts.
    pub fn begin_verify(&self) {
        self.verifying.begin();
    }

    /// A verification ended.
    pub fn end_verify(&self) {
        self.verifying.end();
    }

    /// Waits (at most `limit`, at most until `deadline`) while a verification is in progress,
    /// so no idle connection of a backend that may be going away is handed out meanwhile.
    pub async fn wait_verified(&self, limit: Duration, deadline: Option<Instant>) {
        let limit = Instant::now() + limit;
        self.verifying
            .wait_idle_until(deadline.map_or(limit, |d| d.min(limit)))
            .await;
    }

    /// Whether a verification is in progress (cheap check on every checkout).
    pub fn verifying(&self) -> bool {
        self.verifying.busy()
    }

    /// The current outage, if the backend is down.
    pub fn outage(&self) -> Option<Outage> {
        lock(&self.state).outage.clone()
    }

    /// Whether the backend is down (without copying the outage).
    pub fn is_down(&self) -> bool {
        lock(&self.state).outage.is_some()
    }

    /// The generation new connections belong to.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn next_generation(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// A login failed transiently. Returns true when this marks the backend down (it was up):
    /// then every existing connection is from an older generation and must be retired.
    pub fn login_failed(&self, e: &ServerError) -> bool {
        let mut st = lock(&self.state);
        let now = Instant::now();
        let newly_down = st.outage.is_none();
        if newly_down {
            self.next_generation();
        }
        let pause = st.backoff.after_failure(newly_down);
        let since = st.outage.as_ref().map_or(now, |o| o.since);
        st.outage = Some(Outage {
            since,
            code: reported_code(e),
            last_error: e.to_string(),
        });
        st.next_probe = now + pause;
        newly_down
    }

    /// A crash (57P02) or an operator's reconnect: retire every existing connection.
    pub fn retire_all(&self) {
        self.next_generation();
    }

    /// When the next probe of a down backend may start.
    pub fn next_probe(&self) -> Instant {
        lock(&self.state).next_probe
    }

    /// A login succeeded against a backend whose identity (postmaster start time) is
    /// `identity`. Returns true when the backend was down, or restarted unnoticed (its identity
    /// changed): older connections must be retired.
    pub fn login_succeeded(&self, identity: Option<String>) -> bool {
        let mut st = lock(&self.state);
        let was_down = st.outage.take().is_some();
        st.backoff.reset();
        let restarted = match (&st.identity, &identity) {
            (Some(old), Some(new)) => old != new,
            _ => false,
        };
        if identity.is_some() {
            st.identity = identity;
        }
        if restarted && !was_down {
            self.next_generation();
        }
        was_down || restarted
    }
}

/// Exponential backoff between attempts: `BACKOFF_START` after a first failure, doubling up
/// to `BACKOFF_CAP` while failures continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(BACKOFF_START)
    }
}

impl Backoff {
    /// The pause after a failure (`first` of a run, or a further one), with jitter.
    pub fn after_failure(&mut self, first: bool) -> Duration {
        self.0 = if first {
            BACKOFF_START
        } else {
            (self.0 * 2).min(BACKOFF_CAP)
        };
        jitter(self.0)
    }

    /// Back to the start after a success.
    pub fn reset(&mut self) {
        self.0 = BACKOFF_START;
    }
}

/// Up to ±25% of `d`, so many pools (or proxies) do not probe in lockstep.
fn jitter(d: Duration) -> Duration {
    let quarter = d / 4;
    let nanos = u64::try_from(quarter.as_nanos()).unwrap_or(u64::MAX).max(1);
    d - quarter + Duration::from_nanos(rand::random::<u64>() % (2 * nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::backend::{PgError, Severity};

    fn refused(code: &str) -> ServerError {
        ServerError::LoginRefused(PgError::new(Severity::Fatal, code, "x"))
    }

    #[test]
    fn classifies_login_failures() {
        assert!(is_transient(&refused("57P03")));
        assert!(!is_transient(&refused("53300")));
        assert!(is_backend_full(&refused("53300")));
        assert!(is_transient(&refused("08006")));
        assert!(is_transient(&ServerError::Closed));
        assert!(!is_transient(&refused("28P01")));
        assert!(!is_transient(&refused("3D000")));
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let h = Health::default();
        assert!(h.login_failed(&refused("57P03")));
        assert_eq!(h.generation(), 1);
        assert_eq!(h.outage().map(|o| o.code), Some("57P03"));
        for _ in 0..20 {
            assert!(!h.login_failed(&ServerError::Closed));
        }
        assert_eq!(h.outage().map(|o| o.code), Some("08006"));
        assert_eq!(lock(&h.state).backoff, Backoff(BACKOFF_CAP));
        assert!(h.login_succeeded(Some("t1".into())));
        assert!(h.outage().is_none());
        assert!(!h.login_succeeded(Some("t1".into())));
        assert!(
            h.login_succeeded(Some("t2".into())),
            "identity change is a restart"
        );
        assert_eq!(h.generation(), 2);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(
                j >= Duration::from_millis(75) && j <= Duration::from_millis(125),
                "{j:?}"
            );
        }
    }
}
