//! Per-tenant and per-user counters that span databases: clients connected (against
//! `max_client_conn`) and clients queued (against `max_queue`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::slots::QueueFull;

/// A count with an optional cap, taken and given back atomically.
#[derive(Debug, Default)]
pub struct Capped {
    current: AtomicU32,
    cap: Option<u32>,
}

impl Capped {
    /// A counter capped at `cap` (`None`: no cap).
    pub fn new(cap: Option<u32>) -> Capped {
        Capped {
            current: AtomicU32::new(0),
            cap,
        }
    }

    /// Counts one more, unless the cap is reached (then returns the cap).
    pub fn try_add(&self) -> Result<(), u32> {
        let cap = self.cap.unwrap_or(u32::MAX);
        self.current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| cap)
    }

    /// Counts one more, cap or not.
    pub fn add(&self) {
        self.current.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts one less.
    pub fn sub(&self) {
        let _ = self
            .current
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// The count now.
    pub fn get(&self) -> u32 {
        self.current.load(Ordering::Acquire)
    }

    /// The cap, if any.
    pub fn cap(&self) -> Option<u32> {
        self.cap
    }
}

/// One unit of a `Capped` count, given back on drop.
#[derive(Debug)]
pub struct Ticket(Arc<Capped>);

impl Ticket {
    /// Takes a unit of `c`, unless its cap is reached.
    pub fn take(c: &Arc<Capped>) -> Result<Ticket, u32> {
        c.try_add()?;
        Ok(Ticket(c.clone()))
    }

    /// Takes a unit of `c` even past its cap (for what is already there).
    pub fn force(c: &Arc<Capped>) -> Ticket {
        c.add();
        Ticket(c.clone())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.sub();
    }
}

/// What a tenant shares across databases.
#[derive(Debug)]
pub struct TenantState {
    /// Its clients queued for a server connection, against `max_queue`.
    pub queued: Capped,
    /// Its clients connected, against its `max_client_conn`.
    pub clients: Arc<Capped>,
    /// Its clients pinned (or running a statement that may pin), against its `max_pinned`.
    pub pinned: Arc<Capped>,
}

impl TenantState {
    /// A tenant allowing `max_queue` queued clients (`None`: no cap).
    pub fn new(max_queue: Option<u32>) -> TenantState {
        TenantState::with_caps(max_queue, None, None)
    }

    /// A tenant with its caps on queued, connected and pinned clients.
    pub fn with_caps(
        max_queue: Option<u32>,
        max_client_conn: Option<u32>,
        max_pinned: Option<u32>,
    ) -> TenantState {
        TenantState {
            queued: Capped::new(max_queue),
            clients: Arc::new(Capped::new(max_client_conn)),
            pinned: Arc::new(Capped::new(max_pinned)),
        }
    }

    /// One more client queued, unless `max_queue` is reached.
    pub fn try_enqueue(&self) -> Result<(), QueueFull> {
        self.queued.try_add().map_err(|max_queue| QueueFull { max_queue })
    }

    /// A queued client left the queue (served or gave up).
    pub fn dequeued(&self) {
        self.queued.sub();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tickets_respect_the_cap_and_come_back_on_drop() {
        let c = Arc::new(Capped::new(Some(2)));
        let a = Ticket::take(&c).unwrap();
        let _b = Ticket::take(&c).unwrap();
        assert_eq!(Ticket::take(&c).unwrap_err(), 2);
        drop(a);
        let _c = Ticket::take(&c).unwrap();
        assert_eq!(c.get(), 2);
    }
}
