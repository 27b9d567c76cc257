//! Named prepared statements under transaction pooling.
//!
//! A client's statement names are its own; on the server every statement gets a proxy-wide
//! name derived from its text, parameter types and the pool's plan epoch, so identical
//! statements from many clients share one server-side statement. Each server connection
//! remembers which of those it holds (an LRU bounded by `max_prepared_statements`; evicted ones
//! are closed on the server).
//!
//! The epoch moves on when a client drops its plans (`DEALLOCATE ALL`, `DISCARD ALL`,
//! `DISCARD PLANS`) or a shared statement turns out stale (`0A000 cached plan must not change
//! result type`): every later Parse then gets a name no server holds, so the server plans it
//! afresh, while statements clients already hold keep working. The older epochs' statements
//! are never handed out again and age out of the servers' LRUs.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::proto::backend::put_cstr;
use crate::proto::effects::{effects, Effects};
use crate::proto::frame::write_message;
use crate::proto::sql::SessionCommand;

/// Prefix of proxy-wide statement names on servers.
pub const NAME_PREFIX: &str = "pgsluice_";

/// A statement as the proxy replays it on any server connection.
#[derive(Debug)]
pub struct Statement {
    /// Proxy-wide name: prefix + 24 hex digits of SHA-256(text, parameter types).
    pub name: Arc<str>,
    /// The complete Parse message under that name, ready to send.
    pub parse: Bytes,
    /// The session command its text is, if any (e.g. a prepared `SET`).
    pub command: Option<SessionCommand>,
    /// What executing it may leave on the session (see `proto::effects`).
    pub effects: Effects,
}

/// A pool's plan epoch: part of every proxy-wide statement name (see the module docs).
#[derive(Debug, Default)]
pub struct PlanEpoch(AtomicU64);

impl PlanEpoch {
    /// The epoch new statements are named in.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Moves on: no statement named before is handed to a later Parse.
    pub fn advance(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Statement {
    /// Builds the statement for `query` and the raw parameter-type section of a Parse body
    /// (the int16 count and the OIDs, as the client sent them), named in plan epoch `epoch`.
    pub fn new(query: &[u8], param_types: &[u8], command: Option<SessionCommand>, epoch: u64) -> Statement {
        let effects = effects(query);
        let mut h = Sha256::new();
        h.update(query);
        h.update([0]);
        h.update(param_types);
        h.update(epoch.to_le_bytes());
        let digest = h.finalize();
        let mut name = String::with_capacity(NAME_PREFIX.len() + 24);
        name.push_str(NAME_PREFIX);
        for b in digest.iter().take(12) {
            // Infallible into a String; no allocation per byte.
            let _ = write!(name, "{b:02x}");
        }
        let mut parse = BytesMut::with_capacity(query.len() + param_types.len() + name.len() + 8);
        write_message(&mut parse, b'P', |o| {
            put_cstr(o, name.as_bytes());
            put_cstr(o, query);
            o.put_slice(param_types);
        });
        Statement {
            name: name.into(),
            parse: parse.freeze(),
            command,
            effects,
        }
    }
}

/// Whether a server connection has a statement, as far as the proxy knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// It has it (or its Parse went out in the current Sync segment: if that Parse fails, the
    /// backend skips the rest of the segment anyway).
    Ready,
    /// It does not.
    Absent,
    /// Its Parse went out in an earlier segment and is not confirmed yet: it may have failed.
    /// Close and prepare it again to be sure.
    Uncertain,
}

/// The statements one server connection holds, least recently used first out.
#[derive(Debug)]
pub struct PreparedCache {
    /// Each statement's last use and the tick its Parse was sent at.
    used: HashMap<Arc<str>, Entry>,
    /// Statements whose Parse is not confirmed yet, with the Sync segment it was sent in.
    pending: HashMap<Arc<str>, u64>,
    /// The cache's clock: advances with every lookup and insert.
    tick: u64,
    capacity: usize,
    /// Statements whose presence is unknown (a Close of them was skipped after an error),
    /// with the tick they became unknown at: closed before they are prepared again.
    unknown: HashMap<Arc<str>, u64>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_used: u64,
    sent: u64,
}

impl PreparedCache {
    /// A cache of at most `capacity` statements; 0 disables statement tracking.
    pub fn new(capacity: usize) -> Self {
        PreparedCache {
            used: HashMap::new(),
            pending: HashMap::new(),
            tick: 0,
            capacity,
            unknown: HashMap::new(),
        }
    }

    /// Whether named statements are tracked at all.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Whether the server has `name`, for a use in Sync segment `segment`; marks it used.
    pub fn lookup(&mut self, name: &Arc<str>, segment: u64) -> Presence {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some(e) => {
                e.last_used = self.tick;
                match self.pending.get(name) {
                    Some(&sent) if sent < segment => Presence::Uncertain,
                    _ => Presence::Ready,
                }
            }
            None => Presence::Absent,
        }
    }

    /// Records that `name` is being prepared in segment `segment`; returns the statement
    /// evicted to make room.
    pub fn insert(&mut self, name: Arc<str>, segment: u64) -> Option<Arc<str>> {
        self.tick += 1;
        let mut evicted = None;
        if self.used.len() >= self.capacity && !self.used.contains_key(&name) {
            let oldest = self
                .used
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            if let Some(oldest) = oldest {
                self.used.remove(&oldest);
                self.pending.remove(&oldest);
                evicted = Some(oldest);
            }
        }
        self.pending.insert(name.clone(), segment);
        let entry = Entry {
            last_used: self.tick,
            sent: self.tick,
        };
        self.used.insert(name, entry);
        evicted
    }

    /// The Parse of `name` sent in `segment` completed.
    pub fn confirm(&mut self, name: &str, segment: u64) {
        if self.pending.get(name) == Some(&segment) {
            self.pending.remove(name);
        }
    }

    /// The Parse of `name` sent in `segment` failed or was skipped: forget the statement,
    /// unless it has been prepared again since.
    pub fn failed(&mut self, name: &str, segment: u64) {
        if self.pending.get(name) == Some(&segment) {
            self.pending.remove(name);
            self.used.remove(name);
        }
    }

    /// Marks `name` as possibly present on the server.
    pub fn mark_unknown(&mut self, name: Arc<str>) {
        self.used.remove(&name);
        self.pending.remove(&name);
        // After any mark taken so far: a DEALLOCATE ALL in flight keeps it unknown (a Close
        // before the next Parse is right either way).
        self.tick += 1;
        self.unknown.insert(name, self.tick);
    }

    /// Whether `name` may be on the server without being tracked (then it must be closed
    /// before it is prepared again); clears the mark.
    pub fn take_unknown(&mut self, name: &str) -> bool {
        self.unknown.remove(name).is_some()
    }

    /// The cache's clock now: what `forget_until` takes to forget everything sent so far.
    pub fn mark(&self) -> u64 {
        self.tick
    }

    /// A `DEALLOCATE ALL` sent when the clock read `mark` completed: every statement sent
    /// (or made unknown) up to then is gone; those prepared after it, in the same pipeline,
    /// are kept.
    pub fn forget_until(&mut self, mark: u64) {
        self.used.retain(|_, e| e.sent > mark);
        let used = &self.used;
        self.pending.retain(|n, _| used.contains_key(n));
        self.unknown.retain(|_, t| *t > mark);
    }

    /// The server dropped every statement (DISCARD ALL, a `DEALLOCATE ALL` the proxy did not
    /// send itself).
    pub fn clear(&mut self) {
        self.used.clear();
        self.pending.clear();
        self.unknown.clear();
    }

    /// How many statements the server holds.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn same_text_and_types_share_a_name() {
        let a = Statement::new(b"select $1", &[0, 1, 0, 0, 0, 23], None, 0);
        let b = Statement::new(b"select $1", &[0, 1, 0, 0, 0, 23], None, 0);
        let c = Statement::new(b"select $1", &[0, 0], None, 0);
        let later = Statement::new(b"select $1", &[0, 1, 0, 0, 0, 23], None, 1);
        assert_eq!(a.name, b.name);
        assert_ne!(a.name, c.name);
        assert_ne!(a.name, later.name, "a new plan epoch names statements anew");
        assert!(a.name.starts_with(NAME_PREFIX) && a.name.len() < 64);
        let w = crate::proto::frame::whole_message(&a.parse, 1000)
            .unwrap()
            .unwrap();
        assert_eq!(w.tag, b'P');
        assert!(w.body.starts_with(a.name.as_bytes()));
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut c = PreparedCache::new(2);
        let (x, y, z): (Arc<str>, Arc<str>, Arc<str>) = ("x".into(), "y".into(), "z".into());
        assert_eq!(c.insert(x.clone(), 0), None);
        assert_eq!(c.insert(y.clone(), 0), None);
        assert_eq!(c.lookup(&x, 0), Presence::Ready);
        assert_eq!(c.insert(z.clone(), 0), Some(y.clone()));
        assert_eq!(c.lookup(&y, 0), Presence::Absent);
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn unconfirmed_statements_from_an_earlier_segment_are_uncertain() {
        let mut c = PreparedCache::new(10);
        let x: Arc<str> = "x".into();
        c.insert(x.clone(), 1);
        assert_eq!(c.lookup(&x, 1), Presence::Ready, "same segment");
        assert_eq!(c.lookup(&x, 2), Presence::Uncertain, "its Parse may have failed");
        c.insert(x.clone(), 2);
        c.failed(&x, 1);
        assert_eq!(c.lookup(&x, 2), Presence::Ready, "prepared again since: kept");
        c.confirm(&x, 2);
        assert_eq!(c.lookup(&x, 5), Presence::Ready);
        c.insert("y".into(), 3);
        c.failed("y", 3);
        assert_eq!(c.lookup(&"y".into(), 3), Presence::Absent);
    }

    #[test]
    fn deallocate_all_forgets_only_what_was_sent_before_it() {
        let mut c = PreparedCache::new(10);
        let (x, y, z): (Arc<str>, Arc<str>, Arc<str>) = ("x".into(), "y".into(), "z".into());
        c.insert(x.clone(), 0);
        c.confirm(&x, 0);
        c.mark_unknown(z.clone());
        let mark = c.mark();
        c.insert(y.clone(), 1);
        assert_eq!(
            c.lookup(&x, 1),
            Presence::Ready,
            "used after the mark, sent before"
        );
        c.forget_until(mark);
        assert_eq!(c.lookup(&x, 1), Presence::Absent);
        assert_eq!(c.lookup(&y, 1), Presence::Ready);
        assert!(!c.take_unknown(&z), "gone with the DEALLOCATE ALL");
        assert_eq!(c.len(), 1);
    }
}
