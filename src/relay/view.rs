//! What the relay keeps about a client's session across transactions: its settings as they
//! should be, its named statements, and the effects of session commands.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::expect::Expect;
use super::pins::Pins;
use crate::prepared::{PlanEpoch, Statement};
use crate::proto::effects::Effects;
use crate::proto::sql::SessionCommand;
use crate::proto::sql::{ROLE, SESSION_AUTHORIZATION};
use crate::server::ServerConn;
use crate::settings::{survives_reset_all, SettingValue, Settings};

/// Session commands followed inside one transaction block.
const MAX_IN_BLOCK: usize = 4096;
/// Savepoints followed inside one transaction block.
const MAX_SAVEPOINTS: usize = 4096;

/// The LISTEN / UNLISTEN commands that took effect, as their net effect per channel (the
/// last command on a channel wins; `UNLISTEN *` ends every channel before it).
#[derive(Debug, Default)]
pub struct ListenChanges {
    /// An `UNLISTEN *` ran: every channel not in `listen` ends.
    pub all_ended: bool,
    /// Channels whose last command was LISTEN.
    pub listen: HashSet<String>,
    /// Channels whose last command was UNLISTEN (not kept after an `UNLISTEN *`); at most
    /// `notify::MAX_CHANNELS`, as many as a client can listen on.
    pub unlisten: HashSet<String>,
}

/// The SQLSTATE class of `code` (its first two characters), `??` when it has none.
pub fn sqlstate_class(code: &str) -> [u8; 2] {
    match code.as_bytes() {
        [a, b, ..] if a.is_ascii_alphanumeric() && b.is_ascii_alphanumeric() => [*a, *b],
        _ => *b"??",
    }
}

impl StatementCounters {
    /// An ErrorResponse with SQLSTATE `code` went to the client.
    pub fn error(&mut self, code: &str) {
        let class = sqlstate_class(code);
        let class = if self.errors.len() >= MAX_ERROR_CLASSES && !self.errors.iter().any(|(c, _)| *c == class)
        {
            *b"??"
        } else {
            class
        };
        match self.errors.iter_mut().find(|(c, _)| *c == class) {
            Some((_, n)) => *n += 1,
            None => self.errors.push((class, 1)),
        }
    }
}

impl ListenChanges {
    fn listened(&mut self, channel: String) {
        self.unlisten.remove(&channel);
        if self.listen.len() < crate::notify::MAX_CHANNELS {
            self.listen.insert(channel);
        }
    }

    fn unlistened(&mut self, channel: Option<String>) {
        match channel {
            None => {
                self.all_ended = true;
                self.listen.clear();
                self.unlisten.clear();
            }
            Some(c) => {
                self.listen.remove(&c);
                if !self.all_ended && self.unlisten.len() < crate::notify::MAX_CHANNELS {
                    self.unlisten.insert(c);
                }
            }
        }
    }
}

/// Distinct SQLSTATE classes counted in one transaction; past that they count as unknown.
const MAX_ERROR_CLASSES: usize = 32;

/// What the relay counted since the session last collected it (once per transaction).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StatementCounters {
    /// Bytes read from the server.
    pub server_bytes: u64,
    /// ErrorResponses sent to the client, by SQLSTATE class (`??`: unknown).
    pub errors: Vec<([u8; 2], u64)>,
    /// A statement the server already had.
    pub hits: u64,
    /// A statement that had to be prepared on the server (first use, or another connection).
    pub misses: u64,
    /// Statements closed on a server to stay within `max_prepared_statements`.
    pub evictions: u64,
    /// Queries cancelled by `query_timeout`.
    pub query_timeouts: u64,
    /// Statements refused because a `max_pinned` was reached.
    pub pin_refusals: u64,
}

/// A client's session as the proxy keeps it.
#[derive(Debug, Default)]
pub struct SessionView {
    /// Settings from the startup packet and `options` (what RESET returns to).
    pub startup: Settings,
    /// Settings the client's session should see now.
    pub settings: Settings,
    /// The client's named statements.
    pub statements: HashMap<String, Arc<Statement>>,
    /// Transaction status the client last saw.
    pub tx_status: u8,
    /// Cache counters, collected by the session.
    pub counters: StatementCounters,
    /// The client's transaction block was lost with its server connection: it is told 'E'
    /// until it ends the block, which the proxy answers itself.
    pub lost_block: bool,
    /// The backend's error that ended the block, not yet told to the client: the answer to
    /// its next request.
    pub lost_error: Option<crate::proto::backend::PgError>,
    /// The client ran DISCARD ALL: its LISTENs through the proxy's hub end too.
    pub discarded_all: bool,
    /// LISTEN / UNLISTEN that took effect (committed) since the session last looked: LISTENs
    /// the hub served inside a block, UNLISTENs that ran on a server connection; the session
    /// applies them to the client's subscription.
    pub listen_changes: ListenChanges,
    /// Session commands run inside the open transaction block: they take effect at COMMIT.
    /// At most `MAX_IN_BLOCK`; past that the client is pinned (its view no longer matters).
    pub(super) in_block: Vec<SessionCommand>,
    /// The block's savepoints, oldest first, each with the length of `in_block` when it was
    /// set (a `ROLLBACK TO` undoes the commands after it); at most `MAX_SAVEPOINTS`.
    pub(super) savepoints: Vec<(String, usize)>,
    /// Whether a transaction block is open (from BEGIN/COMMIT/ROLLBACK tags and ReadyForQuery).
    pub(super) block_open: bool,
    /// After RESET ALL / DISCARD ALL, the backend reports the defaults; the client's startup
    /// values win over those reports until the next ReadyForQuery.
    pub(super) resetting: bool,
    /// Responses still owed for requests forwarded or answered by the proxy, in order, each
    /// with the sequence number of the client message that owes it.
    pub(super) expect: VecDeque<(u64, Expect)>,
    /// Sequence number of the last client message.
    pub(super) seq: u64,
    /// Syncs the client has sent: numbers the Sync segments of its pipeline.
    pub(super) syncs: u64,
    /// Sequence numbers of CopyDone/CopyFail messages not yet matched to a COPY.
    pub(super) copy_ends: VecDeque<u64>,
    /// The backend is in COPY-in mode and the client has not ended it yet: its Syncs are
    /// ignored by the backend, so none is owed for them.
    pub(super) copy_in: bool,
    /// The pool's plan epoch, naming the statements this client prepares.
    pub plans: Arc<PlanEpoch>,
    /// Session command of the unnamed statement and of the unnamed portal.
    pub(super) unnamed_statement: Option<SessionCommand>,
    pub(super) unnamed_portal: Option<SessionCommand>,
    /// What executing the unnamed statement may leave on the session.
    pub(super) unnamed_effects: Effects,
    /// Whether the client must keep its server connection between transactions.
    pub pins: Pins,
}

impl SessionView {
    /// A session of a pool with plan epoch `plans` that starts with these settings.
    pub fn new(startup: Settings, plans: Arc<PlanEpoch>) -> Self {
        SessionView {
            settings: startup.clone(),
            startup,
            plans,
            tx_status: b'I',
            ..Default::default()
        }
    }

    /// The client ended a block the proxy answered for (after its server connection was lost).
    pub fn block_ended(&mut self) {
        self.lost_block = false;
        self.lost_error = None;
        self.tx_status = b'I';
    }

    /// Queues an owed response for the client message just read.
    pub(super) fn owe(&mut self, e: Expect) {
        self.seq += 1;
        self.expect.push_back((self.seq, e));
    }

    /// The owed response at the head of the queue.
    pub(super) fn head(&self) -> Option<&Expect> {
        self.expect.front().map(|(_, e)| e)
    }

    /// A CopyDone or CopyFail from the client.
    pub(super) fn copy_end(&mut self) {
        self.seq += 1;
        if self.copy_in {
            self.copy_in = false;
        } else {
            // Not matched yet: the backend's CopyInResponse may still be on its way.
            if self.copy_ends.len() >= 64 {
                self.copy_ends.pop_front();
            }
            self.copy_ends.push_back(self.seq);
        }
    }

    /// The backend entered COPY-in mode for the request at the head of the queue: it ignores
    /// the Syncs the client sent between that request and its CopyDone/CopyFail.
    pub(super) fn copy_in_started(&mut self) {
        let Some(&(head_seq, _)) = self.expect.front() else {
            return;
        };
        while self.copy_ends.front().is_some_and(|&s| s < head_seq) {
            self.copy_ends.pop_front();
        }
        let end = self.copy_ends.pop_front();
        let ignored = |seq: u64| seq > head_seq && end.is_none_or(|e| seq < e);
        self.expect
            .retain(|(seq, e)| !(matches!(e, Expect::Sync) && ignored(*seq)));
        self.copy_in = end.is_none();
    }

    /// The server connection died mid-request: the client is told `status`, and whatever its
    /// open block did on that server is gone with it.
    pub fn server_lost(&mut self, status: u8) {
        self.tx_status = status;
        self.lost_block = status == b'E';
        self.in_block.clear();
        self.savepoints.clear();
        self.block_open = false;
        self.resetting = false;
        self.clear_owed();
    }

    /// Forgets everything owed (a new relay, or the old one ended abnormally).
    pub(super) fn clear_owed(&mut self) {
        self.expect.clear();
        self.copy_ends.clear();
        self.copy_in = false;
    }

    /// A value the backend reported with ParameterStatus: the server has it now, and the client
    /// sees it (unless a RESET ALL is bringing back its startup values). Read-only and identity
    /// parameters (`is_superuser`, `session_authorization`, …) are not settings: never replayed.
    pub(super) fn reported(&mut self, server: &mut ServerConn, name: String, value: String) {
        if !server.replayable.contains(&name) {
            return;
        }
        let v = SettingValue::Text(value);
        if !self.resetting {
            self.settings.insert(name.clone(), v.clone());
        }
        server.stale.remove(&name);
        server.applied.insert(name, v);
    }

    /// A session command completed (CommandComplete); outside a block it takes effect now,
    /// inside one at COMMIT.
    pub(super) fn completed(&mut self, server: &mut ServerConn, cmd: SessionCommand) {
        if self.block_open {
            if self.in_block.len() < MAX_IN_BLOCK {
                self.in_block.push(cmd);
            } else {
                self.pins.note(Effects::UNTRACKED);
            }
        } else {
            self.apply(server, cmd);
        }
    }

    /// A `SAVEPOINT` completed inside the block (`None`: one whose name the proxy did not
    /// read, in a multi-statement query).
    pub(super) fn savepoint(&mut self, name: Option<String>) {
        if self.savepoints.len() < MAX_SAVEPOINTS {
            self.savepoints
                .push((name.unwrap_or_default(), self.in_block.len()));
        } else {
            // Too many to follow: a later ROLLBACK TO it is not found, and pins.
            self.pins.note(Effects::UNTRACKED);
        }
    }

    /// `RELEASE name` completed: that savepoint and the later ones are gone, what ran since
    /// them stays part of the block.
    pub(super) fn released(&mut self, name: &str) {
        if let Some(i) = self.savepoints.iter().rposition(|(n, _)| n == name) {
            self.savepoints.truncate(i);
        }
    }

    /// `ROLLBACK TO name` completed: the block's session commands since that savepoint are
    /// undone by the backend; the savepoint stays, later ones are gone. A savepoint the proxy
    /// did not follow leaves it not knowing which commands survived: the client is pinned.
    pub(super) fn rolled_back_to(&mut self, name: &str) {
        match self.savepoints.iter().rposition(|(n, _)| n == name) {
            Some(i) => {
                let mark = self.savepoints.get(i).map_or(0, |(_, m)| *m);
                self.savepoints.truncate(i + 1);
                self.in_block.truncate(mark);
            }
            None if !self.in_block.is_empty() => self.pins.note(Effects::UNTRACKED),
            None => {}
        }
    }

    /// Whether a LISTEN inside the open block may be served by the hub: the backend's block
    /// is healthy and there is room to follow it.
    pub(super) fn block_may_listen(&self) -> bool {
        self.block_open && self.tx_status == b'T' && self.in_block.len() < MAX_IN_BLOCK && !self.pins.pinned()
    }

    /// The hub served a `LISTEN channel` inside the open block: it takes effect at COMMIT,
    /// and is undone by ROLLBACK (or ROLLBACK TO an earlier savepoint).
    pub fn listened_in_block(&mut self, channel: String) {
        if self.in_block.len() < MAX_IN_BLOCK {
            self.in_block.push(SessionCommand::Listen(channel));
        }
    }

    /// The open block committed: its session commands take effect.
    pub(super) fn committed(&mut self, server: &mut ServerConn) {
        self.savepoints.clear();
        for cmd in std::mem::take(&mut self.in_block) {
            self.apply(server, cmd);
        }
        self.block_open = false;
    }

    /// The open block rolled back: the backend undid its commands itself.
    pub(super) fn rolled_back(&mut self) {
        self.in_block.clear();
        self.savepoints.clear();
        self.block_open = false;
    }

    fn apply(&mut self, server: &mut ServerConn, cmd: SessionCommand) {
        match cmd {
            SessionCommand::Set { name, value } => {
                if name == SESSION_AUTHORIZATION {
                    self.role_reset(server);
                }
                server.stale.remove(&name);
                server.applied.insert(name.clone(), value.clone());
                self.settings.insert(name, value);
            }
            SessionCommand::Reset { name } => {
                if name == SESSION_AUTHORIZATION {
                    self.role_reset(server);
                }
                server.stale.remove(&name);
                server.applied.remove(&name);
                match self.startup.get(&name) {
                    Some(v) => self.settings.insert(name, v.clone()),
                    None => self.settings.remove(&name),
                };
            }
            SessionCommand::ResetAll => self.reset_all(server),
            SessionCommand::DiscardAll => {
                self.pins.discarded();
                self.discarded_all = true;
                self.reset_all(server);
                // DISCARD ALL also resets the session user, and with it the role.
                server.applied.clear();
                server.stale.clear();
                self.settings.retain(|name, _| !survives_reset_all(name));
                self.statements.clear();
                server.prepared.clear();
            }
            // A parameterised set_config is resolved at Bind; DEALLOCATE is the relay's.
            // Savepoints are followed from their tags (expect.rs).
            SessionCommand::Deallocate(_)
            | SessionCommand::SetConfig(_)
            | SessionCommand::Savepoint(_)
            | SessionCommand::RollbackTo(_)
            | SessionCommand::Release(_) => {}
            SessionCommand::Unlisten(channel) => self.listen_changes.unlistened(channel),
            SessionCommand::Listen(channel) => self.listen_changes.listened(channel),
        }
    }

    /// Changing the session user resets the role (`SET ROLE NONE`) on the backend.
    fn role_reset(&mut self, server: &mut ServerConn) {
        server.stale.remove(ROLE);
        server.applied.remove(ROLE);
        self.settings.remove(ROLE);
    }

    /// RESET ALL: every setting back to the client's startup values, except the role and
    /// session user, which it leaves alone as PostgreSQL does.
    fn reset_all(&mut self, server: &mut ServerConn) {
        server.applied.retain(|name, _| survives_reset_all(name));
        server.stale.retain(|name| survives_reset_all(name));
        let kept: Vec<_> = self
            .settings
            .iter()
            .filter(|(name, _)| survives_reset_all(name))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        self.settings = self.startup.clone();
        self.settings.extend(kept);
        self.resetting = true;
    }
}
