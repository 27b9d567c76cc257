//! A bounded record of what a database's slots handed out and to whom, with every tenant's
//! load right after each event. Off by default; tests and the admin console turn it on to
//! check that the sharing rules held.

use std::collections::VecDeque;
use std::sync::Arc;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// A client took an idle connection of its pool.
    Idle,
    /// A client got a free slot to open a connection.
    Slot,
    /// A client got a slot taken from another pool (its connection closed).
    Moved,
    /// A released connection went straight to a queued client.
    Handoff,
    /// A client joined its pool's queue.
    Queued,
    /// A queued client gave up (timeout, cancel, disconnect).
    Left,
}

/// One event.
#[derive(Debug, Clone)]
pub struct GrantRecord {
    /// The tenant of the client concerned.
    pub tenant: Arc<str>,
    /// Index of its pool within the database.
    pub pool: usize,
    /// What happened.
    pub how: How,
    /// Every tenant right after: (name, slots held, clients waiting).
    pub loads: Vec<(Arc<str>, u32, u32)>,
}

impl GrantRecord {
    /// Whether this event gave the client a server connection (or a slot for one).
    pub fn is_grant(&self) -> bool {
        matches!(self.how, How::Idle | How::Slot | How::Moved | How::Handoff)
    }

    /// (slots held, clients waiting) of `tenant` right after the event.
    pub fn load_of(&self, tenant: &str) -> (u32, u32) {
        self.loads
            .iter()
            .find(|(n, _, _)| &**n == tenant)
            .map_or((0, 0), |(_, used, waiting)| (*used, *waiting))
    }
}

/// The record, keeping the newest `capacity` events.
#[derive(Debug, Default)]
pub struct GrantLog {
    capacity: usize,
    records: VecDeque<GrantRecord>,
}

impl GrantLog {
    /// Whether events are recorded.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Records the newest `capacity` events from now on (0 turns recording off).
    pub fn enable(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.records.clear();
    }

    /// Adds an event, dropping the oldest beyond the capacity.
    pub fn push(&mut self, tenant: Arc<str>, pool: usize, how: How, loads: Vec<(Arc<str>, u32, u32)>) {
        if self.capacity == 0 {
            return;
        }
        if self.records.len() >= self.capacity {
            self.records.pop_front();
        }
        self.records.push_back(GrantRecord {
            tenant,
            pool,
            how,
            loads,
        });
    }

    /// The events recorded so far, oldest first.
    pub fn records(&self) -> Vec<GrantRecord> {
        self.records.iter().cloned().collect()
    }
}
