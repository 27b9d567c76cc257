//! The relay's timeouts: a client idle inside a transaction (`idle_transaction_timeout`), a
//! query running too long (`query_timeout`: cancel, then give up after a grace period), and a
//! session-mode client idle outside a transaction (`client_idle_timeout`). One `Sleep` per
//! client, re-armed only when what is being timed changes; nothing at all when all are off.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Longest wait for a cancelled query to stop before its server connection is closed.
const CANCEL_GRACE_CAP: Duration = Duration::from_secs(5);

/// What the relay is doing, as far as timeouts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A request is outstanding (a query runs, or results stream).
    Busy,
    /// Inside a transaction block, nothing outstanding: the client holds the connection.
    IdleInTransaction,
    /// Outside a transaction, nothing outstanding (session mode).
    Idle,
}

/// A limit that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// `query_timeout` passed: send a cancel.
    QueryCancel,
    /// The cancelled query did not stop within the grace period: close its connection.
    QueryGiveUp,
    /// `idle_transaction_timeout` passed.
    IdleInTransaction,
    /// `client_idle_timeout` passed (session mode).
    ClientIdle,
}

/// The limits and the one timer that enforces them.
#[derive(Debug)]
pub struct Timers {
    sleep: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    phase: Option<(Phase, Instant)>,
    cancel_sent: Option<Instant>,
    idle_transaction: Option<Duration>,
    query: Option<Duration>,
    client_idle: Option<Duration>,
}

impl Timers {
    /// Timers for these limits; `None` when every one is off (the relay then costs nothing).
    pub fn new(
        idle_transaction: Option<Duration>,
        query: Option<Duration>,
        client_idle: Option<Duration>,
    ) -> Option<Timers> {
        if idle_transaction.is_none() && query.is_none() && client_idle.is_none() {
            return None;
        }
        Some(Timers {
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(86_400))),
            armed: None,
            phase: None,
            cancel_sent: None,
            idle_transaction,
            query,
            client_idle,
        })
    }

    /// `query_timeout`, if this relay sent a cancel because of it.
    pub fn cancelled_after(&self) -> Option<Duration> {
        self.cancel_sent.and(self.query)
    }

    /// A new relay starts: nothing is being timed yet.
    pub fn start(&mut self) {
        self.phase = None;
        self.cancel_sent = None;
    }

    /// Called when the relay is about to wait, in `phase` (`client_active`: the client sent
    /// something since the last call, which restarts an idle clock): ready with what expired,
    /// if a limit passed; otherwise the timer is armed to wake the relay.
    pub fn poll(&mut self, cx: &mut Context<'_>, phase: Phase, client_active: bool) -> Poll<Expired> {
        let idle_again = client_active && phase != Phase::Busy;
        let since = match self.phase {
            Some((p, since)) if p == phase && !idle_again => since,
            _ => {
                let now = Instant::now();
                self.phase = Some((phase, now));
                self.cancel_sent = None;
                now
            }
        };
        let deadline = match phase {
            Phase::Busy => match (self.query, self.cancel_sent) {
                (Some(q), None) => Some(since + q),
                (Some(q), Some(at)) => Some(at + q.min(CANCEL_GRACE_CAP)),
                (None, _) => None,
            },
            Phase::IdleInTransaction => self.idle_transaction.map(|d| since + d),
            Phase::Idle => self.client_idle.map(|d| since + d),
        };
        let Some(deadline) = deadline else {
            return Poll::Pending;
        };
        if self.armed != Some(deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.armed = None;
        Poll::Ready(match phase {
            Phase::Busy if self.cancel_sent.is_none() => {
                self.cancel_sent = Some(Instant::now());
                Expired::QueryCancel
            }
            Phase::Busy => Expired::QueryGiveUp,
            Phase::IdleInTransaction => Expired::IdleInTransaction,
            Phase::Idle => Expired::ClientIdle,
        })
    }
}
