//! Named prepared statements under transaction pooling.
//!
//! A client's statement names are its own; on the server every statement gets a proxy-wide
//! name derived from its text and parameter types, so identical statements from many clients
//! share one server-side statement. Each server connection remembers which of those it holds
//! (an LRU bounded by `max_prepared_statements`; evicted ones are closed on the server).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::proto::backend::put_cstr;
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
}

impl Statement {
    /// Builds the statement for `query` and the raw parameter-type section of a Parse body
    /// (the int16 count and the OIDs, as the client sent them).
    pub fn new(query: &[u8], param_types: &[u8], command: Option<SessionCommand>) -> Statement {
        let mut h = Sha256::new();
        h.update(query);
        h.update([0]);
        h.update(param_types);
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
    used: HashMap<Arc<str>, u64>,
    /// Statements whose Parse is not confirmed yet, with the Sync segment it was sent in.
    pending: HashMap<Arc<str>, u64>,
    tick: u64,
    capacity: usize,
    /// Statements whose presence is unknown (a Close of them was skipped after an error):
    /// closed before they are prepared again.
    unknown: HashSet<Arc<str>>,
}

impl PreparedCache {
    /// A cache of at most `capacity` statements; 0 disables statement tracking.
    pub fn new(capacity: usize) -> Self {
        PreparedCache {
            used: HashMap::new(),
            pending: HashMap::new(),
            tick: 0,
            capacity,
            unknown: HashSet::new(),
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
            Some(t) => {
                *t = self.tick;
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
            if let Some(oldest) = self.used.iter().min_by_key(|(_, t)| **t).map(|(n, _)| n.clone()) {
                self.used.remove(&oldest);
                self.pending.remove(&oldest);
                evicted = Some(oldest);
            }
        }
        self.pending.insert(name.clone(), segment);
        self.used.insert(name, self.tick);
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
        self.unknown.insert(name);
    }

    /// Whether `name` may be on the server without being tracked (then it must be closed
    /// before it is prepared again); clears the mark.
    pub fn take_unknown(&mut self, name: &str) -> bool {
        self.unknown.remove(name)
    }

    /// The server dropped every statement (DISCARD ALL, DEALLOCATE ALL).
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
        let a = Statement::new(b"select $1", &[0, 1, 0, 0, 0, 23], None);
        let b = Statement::new(b"select $1", &[0, 1, 0, 0, 0, 23], None);
        let c = Statement::new(b"select $1", &[0, 0], None);
        assert_eq!(a.name, b.name);
        assert_ne!(a.name, c.name);
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
}
