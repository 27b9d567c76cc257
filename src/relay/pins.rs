//! Whether a transaction-mode client must keep its server connection between transactions
//! (*pinned*): it left session state there that cannot be replayed elsewhere. The relay notes
//! what each request's text may do (`proto::effects`); after the transaction the session
//! probes the backend when that may have changed the state (`PROBE_QUERY`), and keeps or
//! releases the connection by the answer.

use crate::config::SessionState;
use crate::pool::pin_budget::{PinBudget, PinLimit, PinSlot};
use crate::proto::effects::Effects;

/// One query the proxy runs on a server connection after a transaction that may have created
/// or ended session state: a bit per kind of state that is there now.
pub const PROBE_QUERY: &str = "SELECT \
     (CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) THEN 1 ELSE 0 END) \
     + (CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()) THEN 2 ELSE 0 END) \
     + (CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_cursors WHERE is_holdable) THEN 4 ELSE 0 END) \
     + (CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_statements WHERE from_sql) THEN 8 ELSE 0 END) \
     + (CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_listening_channels()) THEN 16 ELSE 0 END)";

/// The kinds of state `PROBE_QUERY` reports, by bit.
const KINDS: [(u32, &str); 5] = [
    (1, "advisory locks"),
    (2, "temporary tables"),
    (4, "WITH HOLD cursors"),
    (8, "prepared statements (SQL PREPARE)"),
    (16, "LISTEN"),
];

/// A client's pinning state.
#[derive(Debug, Default)]
pub struct Pins {
    /// What the requests of the current transaction may have done.
    pending: Effects,
    /// State the probe found, as its bits (0: none).
    held: u32,
    /// State the proxy cannot observe was left (pinned until DISCARD ALL).
    untracked: bool,
    /// A library was loaded (`LOAD`): the connection is closed, not reused, when the client
    /// leaves.
    loaded: bool,
    /// `session_state`: what becomes of statements that leave session state.
    policy: SessionState,
    /// `max_pinned` of the client's pool and tenant.
    budget: PinBudget,
    /// The client's place in `budget`: taken before a statement that may pin runs, kept
    /// while pinned.
    slot: Option<PinSlot>,
}

impl Pins {
    /// Applies `session_state` to the client's requests from now on.
    pub fn set_policy(&mut self, policy: SessionState) {
        self.policy = policy;
    }

    /// `session_state = "reject"`: statements that would leave session state are refused.
    pub fn rejects(&self) -> bool {
        self.policy == SessionState::Reject
    }

    /// Counts the client's pins against `budget` from now on.
    pub fn set_budget(&mut self, budget: PinBudget) {
        self.budget = budget;
    }

    /// Before a request that may pin runs: takes the client's place among the pinned clients
    /// of its pool and tenant, unless a `max_pinned` is reached (then the request is refused
    /// with 53300). Texts not read (`Effects::UNREAD`) are let through: the probe decides.
    pub fn admit(&mut self, effects: Effects) -> Result<(), PinLimit> {
        if self.policy != SessionState::Pin
            || self.slot.is_some()
            || !effects.leaves_state()
            || effects.has(Effects::UNREAD)
        {
            return Ok(());
        }
        self.slot = Some(self.budget.try_take()?);
        Ok(())
    }

    /// After the transaction's probe: a pinned client keeps its place (taking one past the
    /// caps if it had none); an unpinned one gives it back.
    pub fn settled(&mut self) {
        if !self.pinned() {
            self.slot = None;
        } else if self.slot.is_none() {
            self.slot = Some(self.budget.take_anyway());
        }
    }

    /// The client is leaving: its place among the pinned clients is given back.
    pub fn left(&mut self) {
        self.slot = None;
    }

    /// A request's text may have these effects (`session_state = "allow"`: ignored, nothing
    /// pins).
    pub fn note(&mut self, effects: Effects) {
        if self.policy == SessionState::Allow {
            return;
        }
        self.pending |= effects;
    }

    /// Whether the client holds its server connection across transactions.
    pub fn pinned(&self) -> bool {
        self.held != 0 || self.untracked
    }

    /// Whether the transaction just ended may have changed what `pinned` depends on, so the
    /// session must be probed before the connection is released or kept.
    pub fn needs_probe(&self) -> bool {
        self.pending.has(Effects::STATE) || (self.held != 0 && self.pending.has(Effects::RELEASE))
    }

    /// The transaction ended: what it did that needs no probe takes effect.
    pub fn transaction_ended(&mut self) {
        if self.pending.has(Effects::UNTRACKED) {
            self.untracked = true;
        }
        if self.pending.has(Effects::LOAD) {
            self.loaded = true;
        }
        self.pending = Effects::NONE;
    }

    /// The probe's answer (its bit set).
    pub fn probed(&mut self, held: u32) {
        self.held = held;
    }

    /// The probe could not be read: assume everything is held (stay pinned).
    pub fn probe_failed(&mut self) {
        self.held = KINDS.iter().fold(0, |acc, (bit, _)| acc | bit);
    }

    /// `DISCARD ALL` completed: the backend dropped every kind of session state but a loaded
    /// library.
    pub fn discarded(&mut self) {
        self.held = 0;
        self.untracked = false;
        self.pending = Effects::NONE;
    }

    /// Whether the server connection must be reset (DISCARD ALL) before another client uses
    /// it: the client is pinned, or its last transaction may have left state.
    pub fn needs_reset(&self) -> bool {
        self.pinned() || self.pending.has(Effects::STATE | Effects::UNTRACKED)
    }

    /// Whether the server connection must be closed rather than reset when the client leaves:
    /// a library was loaded into the backend, and nothing unloads it.
    pub fn must_close(&self) -> bool {
        self.loaded || self.pending.has(Effects::LOAD)
    }

    /// What pins the client, for logs and errors ("temporary tables, advisory locks").
    pub fn describe(&self) -> String {
        let mut parts: Vec<&str> = KINDS
            .iter()
            .filter(|(bit, _)| self.held & bit != 0)
            .map(|(_, name)| *name)
            .collect();
        if self.loaded {
            parts.push("a loaded library (LOAD)");
        } else if self.untracked {
            parts.push("session state set outside a single SET statement");
        }
        parts.join(", ")
    }
}

/// The probe's answer as bits; anything unreadable counts as everything.
pub fn parse_probe(answer: Option<&str>) -> Option<u32> {
    answer.and_then(|a| a.trim().parse().ok())
}
