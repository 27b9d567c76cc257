//! Client requests, one message at a time: forwarded untouched (with the response they are
//! owed queued), or — in transaction mode — rewritten so named prepared statements work on any
//! server connection: statement names mapped to proxy-wide ones, a Parse injected where the
//! current server lacks the statement, Close and DEALLOCATE answered from the client's view.

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};

use super::expect::{Expect, Restore, Sent, Synth};
use super::view::SessionView;
use crate::pool::pin_budget::{PinLimit, PIN_LIMIT_HINT};
use crate::prepared::{Presence, Statement};
use crate::proto::backend::{put_cstr, PgError, Severity};
use crate::proto::effects::{effects, Effects};
use crate::proto::frame::{Header, HEADER_LEN};
use crate::proto::set_config::{self, Resolved};
use crate::proto::sql::{classify, SessionCommand};
use crate::proto::sqlstate;
use crate::proto::{ProtoError, Reader};
use crate::server::ServerConn;

/// Simple queries and unnamed Parse texts up to this size are checked for session commands;
/// longer ones cannot be one and stream through.
const CLASSIFY_LIMIT: usize = 4096;
/// Bind/Describe/Execute heads (portal and statement names) are looked for in this many bytes.
const HEAD_LIMIT: usize = 1024;

/// What became of the message at the front of the buffer.
pub enum Step {
    /// This many bytes of the message must be buffered before it can be handled (at most
    /// the message itself, which `max_packet_size` bounds).
    NeedMore(usize),
    /// Handled; `stream` body bytes of it remain to be copied through as they arrive.
    Done {
        /// Bytes still to copy to the server.
        stream: usize,
    },
    /// Dropped; `drop` body bytes remain to be discarded as they arrive.
    Dropped {
        /// Bytes still to discard.
        drop: usize,
    },
}

/// Per-relay flags the request side needs.
pub struct Flags {
    /// Rewrite statements and track session commands (transaction mode).
    pub track: bool,
    /// Where the client's extended-protocol request stands.
    pub segment: Segment,
    /// An error ended the client's request: what becomes of its messages up to its Sync.
    pub skip: Skip,
}

/// The client's messages after an error, up to its Sync: the backend would ignore them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No error: every message is handled.
    No,
    /// The proxy answered the error itself: they are dropped.
    Drop,
    /// The backend's error: they still go to the backend, which discards them, so a client
    /// streaming a large pipeline is paced by the backend as it would be directly (drivers
    /// notice the error when their writes block), and nothing is owed for them.
    Forward,
}

/// Where the client's current extended-protocol request (up to its Sync) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Nothing forwarded since the last Sync.
    Synced,
    /// Messages forwarded, no Sync yet; the server holds its answers.
    Open,
    /// Messages forwarded and a Flush last: the client waits for the answers so far.
    Flushed,
}

impl Segment {
    /// Extended-protocol messages were forwarded after the last Sync.
    pub fn unsynced(self) -> bool {
        self != Segment::Synced
    }
}

/// Handles the message whose header is `h` at the front of `buf`.
pub fn handle(
    h: Header,
    buf: &mut BytesMut,
    view: &mut SessionView,
    server: &mut ServerConn,
    flags: &mut Flags,
) -> Result<Step, ProtoError> {
    match flags.skip {
        Skip::Drop if h.tag != b'S' => return Ok(drop_message(buf, h)),
        Skip::Forward if h.tag != b'S' => return Ok(forward(buf, h, server)),
        _ => {}
    }
    let whole = buf.get(HEADER_LEN..h.total_len());
    match h.tag {
        b'Q' => {
            if h.body_len > CLASSIFY_LIMIT {
                if flags.track {
                    // Too long to look at: it may create state, so the session is probed.
                    view.pins.note(Effects::STATE | Effects::UNREAD);
                }
                view.owe(Expect::Query(None));
                return Ok(forward(buf, h, server));
            }
            let Some(body) = whole else {
                return Ok(Step::NeedMore(h.total_len()));
            };
            let cmd = if flags.track {
                let text = Reader::new(body).cstr("query")?;
                let fx = effects(text);
                // A refusal is raised by the backend itself, so a transaction block fails with
                // it exactly as it would with any error.
                let refusal = if view.pins.rejects() && fx.leaves_state() {
                    Some(reject_query())
                } else {
                    view.pins.admit(fx).err().map(|limit| {
                        view.counters.pin_refusals += 1;
                        pin_limit_query(&limit)
                    })
                };
                if let Some(raise) = refusal {
                    buf.advance(h.total_len());
                    crate::proto::frontend::query(&mut server.wbuf, &raise);
                    view.owe(Expect::Query(None));
                    return Ok(Step::Done { stream: 0 });
                }
                view.pins.note(fx);
                classify(&String::from_utf8_lossy(text))
            } else {
                None
            };
            if let (Some(SessionCommand::Deallocate(name)), true) = (&cmd, server.prepared.enabled()) {
                let synth = match deallocate(view, server, name.as_deref(), true) {
                    Deallocated::Answer(Ok(tag), restore) => {
                        Expect::Synthetic(Synth::QueryDone(tag), restore)
                    }
                    Deallocated::Answer(Err(e), _) => Expect::Synthetic(Synth::QueryError(e), Vec::new()),
                    Deallocated::Forward(expect) => {
                        view.owe(expect);
                        return Ok(forward(buf, h, server));
                    }
                };
                buf.advance(h.total_len());
                view.owe(synth);
                return Ok(Step::Done { stream: 0 });
            }
            view.owe(Expect::Query(cmd));
            Ok(forward(buf, h, server))
        }
        b'S' => {
            flags.skip = Skip::No;
            flags.segment = Segment::Synced;
            view.syncs += 1;
            if view.copy_in {
                // The backend ignores Sync in COPY-in mode: nothing is owed for it.
                view.seq += 1;
            } else {
                view.owe(Expect::Sync);
            }
            Ok(forward(buf, h, server))
        }
        b'F' => {
            view.owe(Expect::Function);
            Ok(forward(buf, h, server))
        }
        b'H' => {
            flags.segment = Segment::Flushed;
            Ok(forward(buf, h, server))
        }
        b'd' => Ok(forward(buf, h, server)),
        b'c' | b'f' => {
            view.copy_end();
            Ok(forward(buf, h, server))
        }
        b'P' | b'B' | b'D' | b'E' | b'C' => {
            flags.segment = Segment::Open;
            extended(h, buf, view, server, flags)
        }
        _ => Err(ProtoError::Invalid("frontend message type")),
    }
}

fn extended(
    h: Header,
    buf: &mut BytesMut,
    view: &mut SessionView,
    server: &mut ServerConn,
    flags: &mut Flags,
) -> Result<Step, ProtoError> {
    let track = flags.track && server.prepared.enabled();
    let head_len = h.body_len.min(HEAD_LIMIT);
    let Some(head) = buf.get(HEADER_LEN..HEADER_LEN + head_len) else {
        return Ok(Step::NeedMore(HEADER_LEN + head_len));
    };
    let mut r = Reader::new(head);
    match h.tag {
        b'P' => {
            let named = !r.cstr("statement name")?.is_empty();
            if !named {
                if h.body_len <= CLASSIFY_LIMIT && flags.track {
                    let Some(body) = buf.get(HEADER_LEN..h.total_len()) else {
                        return Ok(Step::NeedMore(h.total_len()));
                    };
                    let mut r = Reader::new(body);
                    r.cstr("statement name")?;
                    let text = r.cstr("query")?;
                    view.unnamed_effects = effects(text);
                    if view.pins.rejects() && view.unnamed_effects.leaves_state() {
                        view.unnamed_effects = Effects::NONE;
                        view.unnamed_statement = None;
                        buf.advance(h.total_len());
                        return Ok(refuse(view, flags, state_refused()));
                    }
                    view.unnamed_statement = classify(&String::from_utf8_lossy(text));
                } else {
                    view.unnamed_statement = None;
                    view.unnamed_effects = if flags.track {
                        Effects::STATE | Effects::UNREAD
                    } else {
                        Effects::NONE
                    };
                }
                view.owe(Expect::Parse(None));
                return Ok(forward(buf, h, server));
            }
            if !track {
                view.owe(Expect::Parse(None));
                return Ok(forward(buf, h, server));
            }
            let Some(body) = buf.get(HEADER_LEN..h.total_len()) else {
                return Ok(Step::NeedMore(h.total_len()));
            };
            let mut r = Reader::new(body);
            let client_name = String::from_utf8_lossy(r.cstr("statement name")?).into_owned();
            let query = r.cstr("query")?;
            let types = r.rest();
            if view.statements.contains_key(&client_name) {
                buf.advance(h.total_len());
                return Ok(refuse(
                    view,
                    flags,
                    sqlstate_error(
                        sqlstate::DUPLICATE_PSTATEMENT,
                        format!("prepared statement \"{client_name}\" already exists"),
                    ),
                ));
            }
            let cmd = classify(&String::from_utf8_lossy(query));
            let stmt = Arc::new(Statement::new(query, types, cmd, view.plans.current()));
            buf.advance(h.total_len());
            if view.pins.rejects() && stmt.effects.leaves_state() {
                return Ok(refuse(view, flags, state_refused()));
            }
            view.statements.insert(client_name.clone(), stmt.clone());
            match prepare_on(view, server, &stmt) {
                None => view.owe(Expect::Synthetic(Synth::ParseComplete, vec![(client_name, None)])),
                Some(sent) => {
                    view.owe(Expect::Parse(Some(Sent {
                        client: Some(client_name),
                        ..sent
                    })));
                }
            }
            Ok(Step::Done { stream: 0 })
        }
        b'B' => {
            let portal = r.cstr("portal name")?;
            let stmt_name = r.cstr("statement name")?;
            let portal_unnamed = portal.is_empty();
            if stmt_name.is_empty() || !track {
                let (bound, effects) = if stmt_name.is_empty() {
                    let bound = bound_command(view.unnamed_statement.as_ref(), h, buf);
                    (bound, view.unnamed_effects)
                } else if flags.track {
                    // A named statement the proxy does not map (`max_prepared_statements = 0`):
                    // its text was not read, so it may create state.
                    (Some(Bound::Command(None)), Effects::STATE | Effects::UNREAD)
                } else {
                    (Some(Bound::Command(None)), Effects::NONE)
                };
                if let Err(stop) = bind_portal(view, portal_unnamed, bound, effects) {
                    return Ok(stop.answer(view, flags, buf, h));
                }
                view.owe(Expect::Bind);
                return Ok(forward(buf, h, server));
            }
            // Looked up without allocating: Bind is on every execution's path.
            let found = std::str::from_utf8(stmt_name)
                .ok()
                .and_then(|n| view.statements.get(n))
                .cloned();
            let Some(stmt) = found else {
                let err = missing_statement(&String::from_utf8_lossy(stmt_name));
                let step = drop_message(buf, h);
                refuse(view, flags, err);
                return Ok(step);
            };
            let bound = bound_command(stmt.command.as_ref(), h, buf);
            if let Err(stop) = bind_portal(view, portal_unnamed, bound, stmt.effects) {
                return Ok(stop.answer(view, flags, buf, h));
            }
            ensure_prepared(view, server, &stmt);
            // Rewrite the head (portal, statement name); the parameters stream through.
            let old_head = portal.len() + 1 + stmt_name.len() + 1;
            let rest = h.body_len - old_head;
            let new_len = 4 + portal.len() + 1 + stmt.name.len() + 1 + rest;
            server.wbuf.put_u8(b'B');
            server
                .wbuf
                .put_u32(u32::try_from(new_len).map_err(|_| ProtoError::Invalid("Bind length"))?);
            put_cstr(&mut server.wbuf, portal);
            put_cstr(&mut server.wbuf, stmt.name.as_bytes());
            buf.advance(HEADER_LEN + old_head);
            view.owe(Expect::Bind);
            Ok(copy_available(buf, rest, server))
        }
        b'D' | b'C' => {
            let kind = r.u8("describe/close kind")?;
            let name = r.cstr("name")?;
            let is_describe = h.tag == b'D';
            if kind != b'S' || name.is_empty() || !track {
                view.owe(if is_describe {
                    Expect::Describe
                } else {
                    Expect::Close
                });
                return Ok(forward(buf, h, server));
            }
            let client_name = String::from_utf8_lossy(name);
            if !is_describe {
                let client_name = client_name.into_owned();
                let step = drop_message(buf, h);
                // Closing a statement only drops the client's name: the server keeps the shared
                // statement for other clients. Closing an unknown name is not an error.
                let before = view.statements.remove(&client_name);
                view.owe(Expect::Synthetic(
                    Synth::CloseComplete,
                    vec![(client_name, before)],
                ));
                return Ok(step);
            }
            // Looked up before the message (which the name borrows) is dropped: no copy of the
            // name on this path.
            let found = match view.statements.get(client_name.as_ref()) {
                Some(stmt) => Ok(stmt.clone()),
                None => Err(missing_statement(&client_name)),
            };
            let step = drop_message(buf, h);
            let stmt = match found {
                Ok(stmt) => stmt,
                Err(e) => {
                    refuse(view, flags, e);
                    return Ok(step);
                }
            };
            ensure_prepared(view, server, &stmt);
            crate::proto::frame::write_message(&mut server.wbuf, b'D', |o| {
                o.put_u8(b'S');
                put_cstr(o, stmt.name.as_bytes());
            });
            view.owe(Expect::Describe);
            Ok(step)
        }
        _ => {
            // Execute: the portal decides which session command (if any) runs.
            let portal = r.cstr("portal name")?;
            let cmd = if portal.is_empty() {
                view.unnamed_portal.clone()
            } else {
                None
            };
            if let (Some(SessionCommand::Deallocate(name)), true) = (&cmd, track) {
                // DEALLOCATE through the extended protocol: as the simple-query form.
                match deallocate(view, server, name.as_deref(), false) {
                    Deallocated::Forward(expect) => {
                        view.owe(expect);
                        return Ok(forward(buf, h, server));
                    }
                    Deallocated::Answer(Ok(tag), restore) => {
                        view.owe(Expect::Synthetic(Synth::Tag(tag), restore));
                    }
                    Deallocated::Answer(Err(e), _) => {
                        refuse(view, flags, e);
                    }
                }
                return Ok(drop_message(buf, h));
            }
            view.owe(Expect::Execute(cmd));
            Ok(forward(buf, h, server))
        }
    }
}

/// The session command a Bind gives its portal, from its statement's.
enum Bound {
    Command(Option<SessionCommand>),
    /// A setting whose value the proxy cannot know: the client is pinned.
    Untracked,
}

/// The statement's command as the portal runs it: a parameterised `set_config` resolved from
/// the Bind's values (the whole message is read, when it is small enough to look at; `None`
/// until it has arrived).
fn bound_command(command: Option<&SessionCommand>, h: Header, buf: &BytesMut) -> Option<Bound> {
    let Some(SessionCommand::SetConfig(call)) = command else {
        return Some(Bound::Command(command.cloned()));
    };
    if h.body_len > CLASSIFY_LIMIT {
        return Some(Bound::Untracked);
    }
    let body = buf.get(HEADER_LEN..h.total_len())?;
    Some(match call.resolve(|n| set_config::bind_param(body, n)) {
        Resolved::Session(cmd) => Bound::Command(Some(cmd)),
        Resolved::Local => Bound::Command(None),
        Resolved::Unknown => Bound::Untracked,
    })
}

/// Why a Bind is not forwarded (yet).
enum BindStop {
    /// The whole message is needed to read its parameters.
    NeedMore,
    /// Refused: a `max_pinned` is reached.
    Refused(PgError),
}

impl BindStop {
    /// The step that answers the Bind instead of forwarding it.
    fn answer(self, view: &mut SessionView, flags: &mut Flags, buf: &mut BytesMut, h: Header) -> Step {
        match self {
            BindStop::NeedMore => Step::NeedMore(h.total_len()),
            BindStop::Refused(e) => {
                let step = drop_message(buf, h);
                refuse(view, flags, e);
                step
            }
        }
    }
}

/// A Bind of a statement whose text may have `effects` (`bound`: its portal's command,
/// `None` until the whole message arrived): refused with 53300 when it may pin and a
/// `max_pinned` is reached; otherwise its effects are noted and the portal's command recorded
/// (only the unnamed portal's is followed to its Execute; a command in another one pins).
fn bind_portal(
    view: &mut SessionView,
    portal_unnamed: bool,
    bound: Option<Bound>,
    effects: Effects,
) -> Result<(), BindStop> {
    let bound = bound.ok_or(BindStop::NeedMore)?;
    if let Err(limit) = view.pins.admit(effects) {
        view.counters.pin_refusals += 1;
        return Err(BindStop::Refused(limit.to_pg_error()));
    }
    view.pins.note(effects);
    let command = match bound {
        Bound::Command(c) => c,
        Bound::Untracked => {
            view.pins.note(Effects::UNTRACKED);
            None
        }
    };
    if portal_unnamed {
        view.unnamed_portal = command;
    } else if command.is_some() {
        view.pins.note(Effects::UNTRACKED);
    }
    Ok(())
}

/// Makes sure the current server has `stmt`, injecting its Parse (whose ParseComplete the
/// client never sees) when it does not.
fn ensure_prepared(view: &mut SessionView, server: &mut ServerConn, stmt: &Statement) {
    if let Some(sent) = prepare_on(view, server, stmt) {
        view.owe(Expect::InjectedParse(sent));
    }
}

/// Sends `stmt`'s Parse to the server unless it has it; returns what was sent (the caller
/// queues the response it is owed), `None` for a cache hit.
fn prepare_on(view: &mut SessionView, server: &mut ServerConn, stmt: &Statement) -> Option<Sent> {
    let segment = view.syncs;
    match server.prepared.lookup(&stmt.name, segment) {
        Presence::Ready => {
            view.counters.hits += 1;
            return None;
        }
        Presence::Uncertain => {
            // Its Parse went out in an earlier Sync segment and may have failed: Close (a
            // no-op if absent) and prepare again, which is right either way.
            inject_close(view, server, stmt.name.clone());
            server.prepared.insert(stmt.name.clone(), segment);
        }
        Presence::Absent => make_room(view, server, &stmt.name, segment),
    }
    view.counters.misses += 1;
    server.wbuf.extend_from_slice(&stmt.parse);
    Some(Sent {
        client: None,
        name: stmt.name.clone(),
        segment,
    })
}

/// Records `name` in the server's cache, closing the statement it evicts (and a stale copy of
/// `name` itself, if one may linger).
fn make_room(view: &mut SessionView, server: &mut ServerConn, name: &Arc<str>, segment: u64) {
    if server.prepared.take_unknown(name) {
        inject_close(view, server, name.clone());
    }
    if let Some(evicted) = server.prepared.insert(name.clone(), segment) {
        view.counters.evictions += 1;
        inject_close(view, server, evicted);
    }
}

fn inject_close(view: &mut SessionView, server: &mut ServerConn, name: Arc<str>) {
    crate::proto::frame::write_message(&mut server.wbuf, b'C', |o| {
        o.put_u8(b'S');
        put_cstr(o, name.as_bytes());
    });
    view.owe(Expect::InjectedClose(name));
}

/// What becomes of a client's `DEALLOCATE`.
enum Deallocated {
    /// Answered by the proxy from the client's view (a name: the shared statement stays on
    /// the servers for other clients), or refused: the tag or error, and how to undo it.
    Answer(Result<&'static str, PgError>, Restore),
    /// `DEALLOCATE ALL`: run on the server too, owing this.
    Forward(Expect),
}

/// `DEALLOCATE name` drops only the client's name. `DEALLOCATE ALL` also runs on the server,
/// so the session the client sees holds no statements, and moves the pool's plan epoch on, so
/// the client's next Parse of any text is planned afresh (after DDL, which is why drivers send
/// it) on whichever server connection serves it; other clients keep their statements.
fn deallocate(view: &mut SessionView, server: &ServerConn, name: Option<&str>, query: bool) -> Deallocated {
    if view.tx_status == b'E' {
        // Inside a failed block PostgreSQL refuses every command but the block's end.
        let msg = "current transaction is aborted, commands ignored until end of transaction block";
        return Deallocated::Answer(
            Err(sqlstate_error(
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                msg.to_string(),
            )),
            Vec::new(),
        );
    }
    match name {
        None => {
            view.plans.advance();
            Deallocated::Forward(Expect::DeallocateAll {
                query,
                restore: view.statements.drain().map(|(n, s)| (n, Some(s))).collect(),
                mark: server.prepared.mark(),
            })
        }
        Some(n) => match view.statements.remove(n) {
            Some(s) => Deallocated::Answer(Ok("DEALLOCATE"), vec![(n.to_string(), Some(s))]),
            // Not a protocol-level name: a SQL-level PREPARE's (the client is pinned while it
            // has one), or nothing, which the backend says itself.
            None if query => Deallocated::Forward(Expect::Query(None)),
            None => Deallocated::Forward(Expect::Execute(None)),
        },
    }
}

fn missing_statement(name: &str) -> PgError {
    sqlstate_error(
        sqlstate::INVALID_SQL_STATEMENT_NAME,
        format!("prepared statement \"{name}\" does not exist"),
    )
}

/// Why `session_state = "reject"` refuses a statement.
const STATE_REFUSED: &str = "this statement would leave session state (a temporary table, a session advisory lock, a WITH HOLD cursor, a prepared statement, a LISTEN or a setting pgsluice cannot carry) on a pooled server connection, which this transaction-mode pool refuses (session_state = reject)";
/// The hint that goes with it.
const STATE_REFUSED_HINT: &str = "use a session-mode pool (pool_mode = \"session\") for this client";

/// The refusal of `session_state = "reject"`, as an error the proxy answers itself.
fn state_refused() -> PgError {
    sqlstate_error(sqlstate::FEATURE_NOT_SUPPORTED, STATE_REFUSED.to_string()).with_hint(STATE_REFUSED_HINT)
}

/// The refusal of `session_state = "reject"`, as a query that makes the backend raise it.
fn reject_query() -> String {
    raise_query("feature_not_supported", STATE_REFUSED, STATE_REFUSED_HINT)
}

/// A `max_pinned` refusal, as a query that makes the backend raise it.
fn pin_limit_query(limit: &PinLimit) -> String {
    raise_query("too_many_connections", &limit.message(), PIN_LIMIT_HINT)
}

/// A query whose only effect is the backend raising this error (`condition`: a PL/pgSQL
/// condition name or a SQLSTATE).
fn raise_query(condition: &str, message: &str, hint: &str) -> String {
    let literal = |s: &str| s.replace('\'', "''").replace("$pgsluice$", "$ pgsluice$");
    let hint = if hint.is_empty() {
        String::new()
    } else {
        format!(", HINT = '{}'", literal(hint))
    };
    format!(
        "DO $pgsluice$BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = '{}'{hint}; END$pgsluice$",
        literal(condition),
        literal(message),
    )
}

/// Makes the backend raise `err` (its SQLSTATE, message and hint) as the answer to a request
/// the proxy took from the client: a transaction block fails with it as it would have on the
/// backend.
pub(super) fn raise(view: &mut SessionView, server: &mut ServerConn, err: &PgError) {
    let query = raise_query(err.code(), err.message(), err.hint().unwrap_or_default());
    crate::proto::frontend::query(&mut server.wbuf, &query);
    view.owe(Expect::Query(None));
}

fn sqlstate_error(code: &str, message: String) -> PgError {
    PgError::new(Severity::Error, code, message)
}

/// Answers an extended-protocol request with an error and skips to Sync, as the backend would.
fn refuse(view: &mut SessionView, flags: &mut Flags, err: PgError) -> Step {
    view.owe(Expect::Synthetic(Synth::Error(err), Vec::new()));
    flags.skip = Skip::Drop;
    Step::Done { stream: 0 }
}

/// Moves the message to the server buffer as far as it has arrived.
fn forward(buf: &mut BytesMut, h: Header, server: &mut ServerConn) -> Step {
    copy_available(buf, h.total_len(), server)
}

fn copy_available(buf: &mut BytesMut, len: usize, server: &mut ServerConn) -> Step {
    let n = len.min(buf.len());
    server.wbuf.extend_from_slice(&buf[..n]);
    buf.advance(n);
    Step::Done { stream: len - n }
}

fn drop_message(buf: &mut BytesMut, h: Header) -> Step {
    let n = h.total_len().min(buf.len());
    buf.advance(n);
    Step::Dropped {
        drop: h.total_len() - n,
    }
}
