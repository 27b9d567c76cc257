//! Stopping gracefully: the proxy's two stop signals, seen by every session.
//!
//! *Drain*: no new logins (57P03), each client is told 57P01 at its next transaction
//! boundary (at once if it is idle), transactions in flight finish. *Kill*, at
//! `shutdown_timeout`: whatever still runs is told 57P01 and closed.
//!
//! Each session holds a `Watch`, registered once; watching costs an atomic waker registration
//! per poll (no lock), so it can sit on the relay's hot path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;

use crate::sync::lock;

/// The proxy's stop signals.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    drain: AtomicBool,
    kill: AtomicBool,
    next: AtomicU64,
    /// The sessions' wakers, woken once per signal.
    watchers: Mutex<HashMap<u64, Weak<AtomicWaker>>>,
}

/// One session's view of the signals; deregisters on drop.
#[derive(Debug)]
pub struct Watch {
    inner: Arc<Inner>,
    id: u64,
    waker: Arc<AtomicWaker>,
}

impl Shutdown {
    /// A watch for one session.
    pub fn watch(&self) -> Watch {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let waker = Arc::new(AtomicWaker::new());
        lock(&self.inner.watchers).insert(id, Arc::downgrade(&waker));
        Watch {
            inner: self.inner.clone(),
            id,
            waker,
        }
    }

    /// Starts draining: every watch wakes.
    pub fn drain(&self) {
        self.inner.drain.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Ends what still runs: every watch wakes.
    pub fn kill(&self) {
        self.inner.drain.store(true, Ordering::Release);
        self.inner.kill.store(true, Ordering::Release);
        self.wake_all();
    }

    /// Whether draining started.
    pub fn draining(&self) -> bool {
        self.inner.drain.load(Ordering::Acquire)
    }

    fn wake_all(&self) {
        let wakers: Vec<Arc<AtomicWaker>> = lock(&self.inner.watchers)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for w in wakers {
            w.wake();
        }
    }
}

impl Watch {
    /// Whether draining started.
    pub fn draining(&self) -> bool {
        self.inner.drain.load(Ordering::Acquire)
    }

    /// Ready once draining starts (registering `cx`'s task to be woken for it).
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.draining() {
            return Poll::Ready(());
        }
        self.register(cx);
        if self.draining() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Has the task of `cx` woken by the next signal (a wake takes the registration). The
    /// relay registers once, then reads the flags on every poll (its task's waker does not
    /// change meanwhile), and registers again on every poll once draining has begun.
    pub fn register(&self, cx: &Context<'_>) {
        self.waker.register(cx.waker());
    }

    /// Whether the session must end whatever it is doing.
    pub fn killed(&self) -> bool {
        self.inner.kill.load(Ordering::Acquire)
    }

    /// Waits until draining starts.
    pub async fn drained(&self) {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.inner.watchers).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watches_wake_on_drain_and_kill() {
        let s = Shutdown::default();
        let w = s.watch();
        assert!(!w.draining());
        let waiting = tokio::spawn({
            let s = s.clone();
            async move {
                let w = s.watch();
                w.drained().await;
                std::future::poll_fn(|cx| {
                    w.register(cx);
                    if w.killed() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await;
            }
        });
        tokio::task::yield_now().await;
        s.drain();
        assert!(w.draining());
        s.kill();
        assert!(waiting.await.is_ok());
        assert_eq!(lock(&s.inner.watchers).len(), 1);
        drop(w);
        assert!(lock(&s.inner.watchers).is_empty());
    }
}
