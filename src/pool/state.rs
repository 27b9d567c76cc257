//! The pool's bookkeeping under its mutex: idle connections, slots, and the FIFO queue of
//! waiters. Pure and synchronous (generic over the connection type, so it is unit tested
//! without sockets); the caller never holds the lock across an `.await`.

use std::collections::VecDeque;

use tokio::sync::oneshot;

/// What a queued waiter receives.
#[derive(Debug)]
pub enum Grant<T> {
    /// A ready connection.
    Conn(T),
    /// Permission to open a new connection (a slot is reserved for it).
    Slot,
}

/// What a checkout may do right now.
#[derive(Debug)]
pub enum Take<T> {
    /// An idle connection to use.
    Idle(T),
    /// A slot was reserved: open a connection.
    Connect,
    /// Everything is busy: queue up.
    Wait,
}

#[derive(Debug)]
struct Waiter<T> {
    id: u64,
    tx: oneshot::Sender<Grant<T>>,
}

/// Idle list, slot accounting and waiters of one pool.
#[derive(Debug)]
pub struct PoolState<T> {
    idle: Vec<T>,
    /// Slots in use: connections logged in (idle or busy) plus connections being opened.
    open: u32,
    connecting: u32,
    waiters: VecDeque<Waiter<T>>,
    next_waiter: u64,
    max_size: u32,
    high_water: u32,
    /// Paused by an operator: nothing is handed out; connections coming back stay idle.
    paused: bool,
}

impl<T> PoolState<T> {
    /// An empty pool of at most `max_size` connections.
    pub fn new(max_size: u32) -> Self {
        PoolState {
            idle: Vec::new(),
            open: 0,
            connecting: 0,
            waiters: VecDeque::new(),
            next_waiter: 0,
            max_size,
            high_water: 0,
            paused: false,
        }
    }

    /// Takes an idle connection (most recently used first: its caches are warm), or reserves a
    /// slot, or says to wait. Never jumps the queue: with waiters queued, a newcomer waits too.
    pub fn take(&mut self) -> Take<T> {
        if !self.waiters.is_empty() || self.paused {
            return Take::Wait;
        }
        if let Some(c) = self.idle.pop() {
            return Take::Idle(c);
        }
        if self.open < self.max_size {
            self.reserve_slot();
            return Take::Connect;
        }
        Take::Wait
    }

    fn reserve_slot(&mut self) {
        self.open += 1;
        self.connecting += 1;
        self.high_water = self.high_water.max(self.open);
    }

    /// Queues a waiter at the back; it is served in FIFO order.
    pub fn enqueue(&mut self) -> (u64, oneshot::Receiver<Grant<T>>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next_waiter;
        self.next_waiter += 1;
        self.waiters.push_back(Waiter { id, tx });
        (id, rx)
    }

    /// Removes a waiter that gave up; false if it was already served.
    pub fn remove_waiter(&mut self, id: u64) -> bool {
        let before = self.waiters.len();
        self.waiters.retain(|w| w.id != id);
        self.waiters.len() != before
    }

    /// A connection's slot is reused to open a replacement.
    pub fn reopening(&mut self) {
        self.connecting += 1;
    }

    /// A connection being opened is now logged in (its slot stays taken).
    pub fn connected(&mut self) {
        self.connecting = self.connecting.saturating_sub(1);
    }

    /// A clean connection comes back: to the first waiter, else to the idle list.
    pub fn give_back(&mut self, mut conn: T) {
        while let Some(w) = (!self.paused).then(|| self.waiters.pop_front()).flatten() {
            match w.tx.send(Grant::Conn(conn)) {
                Ok(()) => return,
                Err(Grant::Conn(c)) => conn = c,
                Err(Grant::Slot) => return,
            }
        }
        self.idle.push(conn);
    }

    /// A connection was closed, or an attempt to open one failed (`was_connecting`): its slot
    /// is free, and goes straight to the first waiter as permission to connect.
    pub fn slot_freed(&mut self, was_connecting: bool) {
        if was_connecting {
            self.connecting = self.connecting.saturating_sub(1);
        }
        self.open = self.open.saturating_sub(1);
        if self.paused {
            return;
        }
        self.grant_free_slots();
    }

    /// Pauses or resumes handing out connections. On resume, queued waiters get the free slots.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
        if !paused {
            for conn in std::mem::take(&mut self.idle) {
                self.give_back(conn);
            }
            self.grant_free_slots();
        }
    }

    /// Whether an operator paused the pool.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Gives free slots (below the pool size) to waiters, first come first served.
    fn grant_free_slots(&mut self) {
        while self.open < self.max_size {
            let Some(w) = self.waiters.pop_front() else { return };
            self.reserve_slot();
            if w.tx.send(Grant::Slot).is_err() {
                self.open -= 1;
                self.connecting -= 1;
            }
        }
    }

    /// Takes out the idle connections `keep` rejects (to close them).
    pub fn take_idle_where(&mut self, mut reject: impl FnMut(&T) -> bool) -> Vec<T> {
        let (rejected, kept): (Vec<T>, Vec<T>) = std::mem::take(&mut self.idle)
            .into_iter()
            .partition(|c| reject(c));
        self.idle = kept;
        rejected
    }

    /// Takes every idle connection out (to close them).
    pub fn drain_idle(&mut self) -> Vec<T> {
        std::mem::take(&mut self.idle)
    }

    /// Counts for SHOW POOLS and gauges.
    pub fn counts(&self) -> Counts {
        let idle = u32::try_from(self.idle.len()).unwrap_or(u32::MAX);
        Counts {
            idle,
            connecting: self.connecting,
            active: self.open.saturating_sub(idle).saturating_sub(self.connecting),
            waiting: u32::try_from(self.waiters.len()).unwrap_or(u32::MAX),
            high_water: self.high_water,
            max_size: self.max_size,
        }
    }
}

/// A snapshot of a pool's connection counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Logged in, in the idle list.
    pub idle: u32,
    /// Being opened.
    pub connecting: u32,
    /// Serving a client.
    pub active: u32,
    /// Clients queued for a connection.
    pub waiting: u32,
    /// Most slots ever in use at once.
    pub high_water: u32,
    /// Pool size.
    pub max_size: u32,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn fills_up_then_queues_fifo() {
        let mut s = PoolState::<u32>::new(2);
        assert!(matches!(s.take(), Take::Connect));
        assert!(matches!(s.take(), Take::Connect));
        s.connected();
        s.connected();
        assert!(matches!(s.take(), Take::Wait));
        let (_, mut r1) = s.enqueue();
        let (_, mut r2) = s.enqueue();
        s.give_back(7);
        assert!(matches!(r1.try_recv().unwrap(), Grant::Conn(7)));
        assert!(r2.try_recv().is_err());
        // A newcomer must not overtake the queued waiter.
        assert!(matches!(s.take(), Take::Wait));
        s.give_back(8);
        assert!(matches!(r2.try_recv().unwrap(), Grant::Conn(8)));
        assert_eq!(s.counts().high_water, 2);
    }

    #[test]
    fn paused_pool_queues_everyone_and_resume_serves_them() {
        let mut s = PoolState::<u32>::new(2);
        assert!(matches!(s.take(), Take::Connect));
        s.connected();
        s.set_paused(true);
        assert!(matches!(s.take(), Take::Wait));
        let (_, mut r1) = s.enqueue();
        let (_, mut r2) = s.enqueue();
        s.give_back(1);
        assert!(r1.try_recv().is_err(), "nothing handed out while paused");
        assert_eq!(s.counts().idle, 1);
        s.set_paused(false);
        assert!(matches!(r1.try_recv().unwrap(), Grant::Conn(1)));
        assert!(matches!(r2.try_recv().unwrap(), Grant::Slot));
    }

    #[test]
    fn freed_slot_goes_to_waiter_and_skips_gone_ones() {
        let mut s = PoolState::<u32>::new(1);
        assert!(matches!(s.take(), Take::Connect));
        let (id1, r1) = s.enqueue();
        let (_, mut r2) = s.enqueue();
        drop(r1);
        s.slot_freed(true);
        assert!(matches!(r2.try_recv().unwrap(), Grant::Slot));
        assert_eq!(s.counts().connecting, 1);
        assert!(!s.remove_waiter(id1));
        s.connected();
        s.give_back(1);
        assert_eq!(
            s.counts(),
            Counts {
                idle: 1,
                connecting: 0,
                active: 0,
                waiting: 0,
                high_water: 1,
                max_size: 1
            }
        );
    }
}
