//! The queue of responses still owed to the client, one entry per request, in order. It is how
//! the relay knows which server message answers which request: to swallow the answers to
//! messages the proxy injected, to emit answers the proxy gives itself at the right point, to
//! skip to Sync after an error exactly as the backend does, and to learn when a session command
//! completed.

use std::sync::Arc;

use bytes::BytesMut;

use super::view::SessionView;
use crate::prepared::Statement;
use crate::proto::backend::{self, PgError};
use crate::proto::sql::SessionCommand;
use crate::proto::sqlstate;
use crate::server::ServerConn;

/// Client statement mappings to put back if an answer the proxy gave is skipped (an earlier
/// request in its Sync segment failed, so PostgreSQL would not have run it): (name, what the
/// name mapped to before).
pub type Restore = Vec<(String, Option<Arc<Statement>>)>;

/// A Parse sent to the server: the server name, the Sync segment it went out in, and the
/// client name it was for (none when the proxy injected it).
#[derive(Debug)]
pub struct Sent {
    /// Client's name, for the client's own Parse.
    pub client: Option<String>,
    /// Proxy-wide name.
    pub name: Arc<str>,
    /// Sync segment.
    pub segment: u64,
}

/// What the proxy answers itself.
#[derive(Debug)]
pub enum Synth {
    /// ParseComplete for a statement the server already has.
    ParseComplete,
    /// CloseComplete for a statement only the client's view held.
    CloseComplete,
    /// An ERROR in the extended protocol (the client then gets nothing until its Sync).
    Error(PgError),
    /// An Execute answered by the proxy: CommandComplete with this tag.
    Tag(&'static str),
    /// A simple query answered by the proxy: CommandComplete with this tag, ReadyForQuery.
    QueryDone(&'static str),
    /// A simple query refused by the proxy: ErrorResponse, ReadyForQuery.
    QueryError(PgError),
}

/// One owed response.
#[derive(Debug)]
pub enum Expect {
    /// Parse: the client's own unnamed one (`None`), or a named one sent under its proxy-wide
    /// name (undone if it fails).
    Parse(Option<Sent>),
    /// Bind.
    Bind,
    /// Describe (statement or portal).
    Describe,
    /// Execute, with the session command its portal runs.
    Execute(Option<SessionCommand>),
    /// Close of a portal or the unnamed statement.
    Close,
    /// Sync.
    Sync,
    /// Simple query, with the session command it is.
    Query(Option<SessionCommand>),
    /// FunctionCall.
    Function,
    /// A Parse the proxy injected: its ParseComplete is swallowed.
    InjectedParse(Sent),
    /// A Close the proxy injected (evicting a statement): its CloseComplete is swallowed.
    InjectedClose(Arc<str>),
    /// The client's `DEALLOCATE ALL`, run on the server too (so its session shows no
    /// statements): a simple query (`query`) or an Execute. `restore` puts the client's names
    /// back if it fails; `mark` is the server cache's clock when it was sent (statements sent
    /// before are gone once it completes).
    DeallocateAll {
        /// Sent as a simple query (ends with ReadyForQuery) rather than an Execute.
        query: bool,
        /// The client's statements before it.
        restore: Restore,
        /// `PreparedCache::mark` when it was sent.
        mark: u64,
    },
    /// An answer the proxy gives itself, emitted when its turn comes.
    Synthetic(Synth, Restore),
}

impl Expect {
    /// Whether this request ends with ReadyForQuery.
    pub fn ends_with_ready(&self) -> bool {
        matches!(
            self,
            Expect::Sync | Expect::Query(_) | Expect::Function | Expect::DeallocateAll { query: true, .. }
        )
    }

    /// Whether an ERROR ends this request and makes the backend skip to Sync.
    fn extended(&self) -> bool {
        matches!(
            self,
            Expect::Parse(_)
                | Expect::Bind
                | Expect::Describe
                | Expect::Execute(_)
                | Expect::Close
                | Expect::InjectedParse(_)
                | Expect::InjectedClose(_)
                | Expect::DeallocateAll { query: false, .. }
        )
    }
}

/// The CommandComplete tags that change what the proxy tracks; read without copying the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    /// BEGIN / START TRANSACTION.
    Begin,
    /// COMMIT.
    Commit,
    /// ROLLBACK (also what COMMIT of a failed block answers).
    Rollback,
    /// DISCARD ALL.
    DiscardAll,
    /// UNLISTEN.
    Unlisten,
    /// DEALLOCATE ALL.
    DeallocateAll,
    /// DISCARD PLANS.
    DiscardPlans,
    /// SET.
    Set,
    /// RESET.
    Reset,
    /// `SELECT 1`: what a `SELECT set_config(…)` answers.
    SelectOne,
    /// SAVEPOINT.
    Savepoint,
    /// RELEASE (a savepoint).
    Release,
    /// Anything else.
    Other,
}

impl Tag {
    /// Classifies a CommandComplete tag.
    pub fn of(tag: &[u8]) -> Tag {
        match tag {
            b"BEGIN" | b"START TRANSACTION" => Tag::Begin,
            b"COMMIT" => Tag::Commit,
            b"ROLLBACK" => Tag::Rollback,
            b"DISCARD ALL" => Tag::DiscardAll,
            b"UNLISTEN" => Tag::Unlisten,
            b"DEALLOCATE ALL" => Tag::DeallocateAll,
            b"DISCARD PLANS" => Tag::DiscardPlans,
            b"SET" => Tag::Set,
            b"RESET" => Tag::Reset,
            b"SELECT 1" => Tag::SelectOne,
            b"SAVEPOINT" => Tag::Savepoint,
            b"RELEASE" => Tag::Release,
            _ => Tag::Other,
        }
    }
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Copy it to the client.
    Forward,
    /// Drop it (the answer to an injected message).
    Swallow,
}

/// Matches a server message other than ErrorResponse (`tag`, and its CommandComplete tag if
/// any) against the queue and updates the session.
pub fn on_server_message(
    view: &mut SessionView,
    server: &mut ServerConn,
    tag: u8,
    command_tag: Option<Tag>,
) -> Route {
    let Some(head) = view.head() else {
        return Route::Forward;
    };
    match (tag, head) {
        (b'1', Expect::InjectedParse(_) | Expect::Parse(_)) => {
            let Some((_, e)) = view.expect.pop_front() else {
                return Route::Forward;
            };
            match e {
                Expect::InjectedParse(sent) => {
                    server.prepared.confirm(&sent.name, sent.segment);
                    Route::Swallow
                }
                Expect::Parse(Some(sent)) => {
                    server.prepared.confirm(&sent.name, sent.segment);
                    Route::Forward
                }
                _ => Route::Forward,
            }
        }
        (b'C', Expect::DeallocateAll { query, mark, .. }) => {
            let (query, mark) = (*query, *mark);
            server.prepared.forget_until(mark);
            if !query {
                view.expect.pop_front();
            }
            Route::Forward
        }
        (b'3', Expect::InjectedClose(_)) => {
            view.expect.pop_front();
            Route::Swallow
        }
        (b'2', Expect::Bind) | (b'3', Expect::Close) => {
            view.expect.pop_front();
            Route::Forward
        }
        (b'T' | b'n', Expect::Describe) => {
            view.expect.pop_front();
            Route::Forward
        }
        (b'C', Expect::Execute(_) | Expect::Query(_)) => {
            let cmd = match view.expect.front_mut().map(|(_, e)| e) {
                Some(Expect::Execute(cmd)) => {
                    let c = cmd.take();
                    view.expect.pop_front();
                    c
                }
                Some(Expect::Query(cmd)) => cmd.take(),
                _ => None,
            };
            on_command_complete(view, server, command_tag.unwrap_or(Tag::Other), cmd);
            Route::Forward
        }
        (b'I' | b's', Expect::Execute(_)) => {
            view.expect.pop_front();
            Route::Forward
        }
        (b'G', Expect::Execute(_) | Expect::Query(_)) => {
            view.copy_in_started();
            Route::Forward
        }
        _ => Route::Forward,
    }
}

/// What an ErrorResponse did to the client's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorEffect {
    /// It ended the request: a simple query, a Sync, or an extended-protocol request whose
    /// Sync the backend has already been sent (what the backend skips up to it is forgotten,
    /// the Sync is still owed).
    Ended,
    /// It failed an extended-protocol request whose Sync has not been sent yet: the backend
    /// now discards every message up to that Sync, so nothing may be owed for the client's
    /// messages until then.
    AwaitingSync,
}

/// A (non-fatal) ErrorResponse with SQLSTATE `code` arrived: the request at the head of the
/// queue failed. In the extended protocol the backend then ignores everything up to the next
/// Sync, so the owed answers up to it are undone, newest first (mappings come back as they
/// were).
pub fn on_error(view: &mut SessionView, server: &mut ServerConn, code: &str) -> ErrorEffect {
    match view.expect.front_mut() {
        Some((
            _,
            Expect::DeallocateAll {
                query: true, restore, ..
            },
        )) => {
            // Its ReadyForQuery still ends it; the client keeps its statements.
            let restore = std::mem::take(restore);
            restore_names(view, restore);
            return ErrorEffect::Ended;
        }
        Some((_, head)) if head.extended() => {}
        _ => return ErrorEffect::Ended,
    }
    if code == sqlstate::FEATURE_NOT_SUPPORTED {
        // "cached plan must not change result type" (whatever the server's language): the
        // shared statement is stale, so no later Parse may be mapped onto it.
        view.plans.advance();
    }
    let mut gone = Vec::new();
    if let Some((_, f)) = view.expect.pop_front() {
        gone.push(f);
    }
    while view.head().is_some_and(|e| !matches!(e, Expect::Sync)) {
        if let Some((_, e)) = view.expect.pop_front() {
            gone.push(e);
        }
    }
    for e in gone.into_iter().rev() {
        undo(view, server, e);
    }
    // An error ends COPY-in mode: the backend no longer ignores Syncs.
    view.copy_in = false;
    if view.expect.is_empty() {
        ErrorEffect::AwaitingSync
    } else {
        ErrorEffect::Ended
    }
}

/// ReadyForQuery arrived: ends the request at the head of the queue.
pub fn on_ready(view: &mut SessionView, status: u8) -> bool {
    let ended = view.head().is_some_and(Expect::ends_with_ready);
    if ended {
        view.expect.pop_front();
    }
    view.tx_status = status;
    view.resetting = false;
    if status == b'I' {
        // Anything still pending from a block that ended without COMMIT is gone.
        view.in_block.clear();
        view.savepoints.clear();
        view.block_open = false;
    } else {
        view.block_open = true;
    }
    ended
}

fn on_command_complete(
    view: &mut SessionView,
    server: &mut ServerConn,
    tag: Tag,
    cmd: Option<SessionCommand>,
) {
    match tag {
        Tag::Begin => view.block_open = true,
        Tag::Commit => view.committed(server),
        // ROLLBACK TO SAVEPOINT answers ROLLBACK too, and keeps the block open.
        Tag::Rollback => match &cmd {
            Some(SessionCommand::RollbackTo(name)) => view.rolled_back_to(name),
            _ => view.rolled_back(),
        },
        Tag::Savepoint => view.savepoint(match &cmd {
            Some(SessionCommand::Savepoint(name)) => Some(name.clone()),
            _ => None,
        }),
        Tag::Release => {
            if let Some(SessionCommand::Release(name)) = &cmd {
                view.released(name);
            }
        }
        // Whoever sent it, the server's state is back to its login state.
        Tag::DiscardAll => {
            server.discarded();
            view.plans.advance();
        }
        // Not one the proxy recognised (the client's own is `Expect::DeallocateAll`), say in
        // a multi-statement query: every statement is gone.
        Tag::DeallocateAll => {
            server.prepared.clear();
            view.plans.advance();
        }
        Tag::DiscardPlans => view.plans.advance(),
        Tag::Set | Tag::Reset | Tag::SelectOne | Tag::Unlisten | Tag::Other => {}
    }
    if let Some(cmd) = cmd {
        let ok = matches!(
            (&cmd, tag),
            (
                SessionCommand::Set { .. } | SessionCommand::Reset { .. } | SessionCommand::ResetAll,
                Tag::Set | Tag::Reset | Tag::SelectOne
            ) | (SessionCommand::DiscardAll, Tag::DiscardAll)
                | (SessionCommand::Unlisten(_), Tag::Unlisten)
        );
        if ok {
            view.completed(server, cmd);
        }
    }
}

/// An owed response that will never come (its request failed or was skipped): undo what the
/// proxy assumed when it sent the request.
fn undo(view: &mut SessionView, server: &mut ServerConn, e: Expect) {
    match e {
        Expect::Parse(Some(sent)) | Expect::InjectedParse(sent) => {
            server.prepared.failed(&sent.name, sent.segment);
            if let Some(client) = sent.client {
                if view.statements.get(&client).is_some_and(|s| s.name == sent.name) {
                    view.statements.remove(&client);
                }
            }
        }
        Expect::InjectedClose(name) => server.prepared.mark_unknown(name),
        Expect::Synthetic(_, restore) | Expect::DeallocateAll { restore, .. } => {
            restore_names(view, restore);
        }
        _ => {}
    }
}

/// Puts the client's statement names back as they were before a request that did not run.
fn restore_names(view: &mut SessionView, restore: Restore) {
    for (name, before) in restore.into_iter().rev() {
        match before {
            Some(stmt) => view.statements.insert(name, stmt),
            None => view.statements.remove(&name),
        };
    }
}

/// Emits the proxy's own answers that are now at the head of the queue.
pub fn emit_synthetic(view: &mut SessionView, out: &mut BytesMut) {
    while let Some(Expect::Synthetic(..)) = view.head() {
        let Some((_, Expect::Synthetic(s, _))) = view.expect.pop_front() else {
            break;
        };
        match s {
            Synth::ParseComplete => crate::proto::frame::write_message(out, b'1', |_| {}),
            Synth::CloseComplete => crate::proto::frame::write_message(out, b'3', |_| {}),
            Synth::Error(e) => {
                view.counters.error(e.code());
                e.write_error(out);
            }
            Synth::Tag(tag) => backend::command_complete(out, tag),
            Synth::QueryDone(tag) => {
                backend::command_complete(out, tag);
                backend::ready_for_query(out, view.tx_status);
            }
            Synth::QueryError(e) => {
                view.counters.error(e.code());
                e.write_error(out);
                backend::ready_for_query(out, view.tx_status);
            }
        }
    }
}
