//! The relay: one client ⇄ one server until the transaction (or session) ends.
//!
//! Frames by the 5-byte header and copies bytes through, looking only at what decides when the
//! server connection can go back to the pool and what keeps a session right under transaction
//! pooling: every request's owed response is queued (`expect`), named prepared statements are
//! mapped to proxy-wide ones (`requests`), and ParameterStatus and session commands update the
//! client's `SessionView`. Both directions run in one poll loop, so a client streaming COPY
//! data while the server streams rows can never deadlock, and each burst read becomes one
//! write. Large messages stream through: memory does not grow with message size.
//!
//! Knows nothing about pools or metrics: it returns what happened.

mod expect;
pub mod pins;
mod requests;
mod timers;
mod view;

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

pub use timers::Timers;
pub use view::{sqlstate_class, ListenChanges, SessionView, StatementCounters};

use crate::config::duration::fmt_duration;
use crate::notify::request::{self as listen_request, Found};
use crate::proto::backend::{parse_parameter_status, PgError, Severity};
use crate::proto::frame::{parse_header, HEADER_LEN};
use crate::proto::sql::ListenCommand;
use crate::proto::sqlstate;
use crate::proto::{ProtoError, Reader};
use crate::server::{CancelTarget, ServerConn};
use crate::shutdown::Watch;
use expect::{ErrorEffect, Route};
use requests::{Flags, Segment, Skip, Step};
use timers::{Expired, Phase};

/// Bytes reserved per read.
const READ_CHUNK: usize = 32 * 1024;
/// Stop reading a side while this much is waiting to be written to the other (backpressure).
const HIGH_WATER: usize = 256 * 1024;
/// Server messages the relay inspects (E, S, C) are read whole up to this size; larger ones
/// stream through uninspected.
const INSPECT_LIMIT: usize = 64 * 1024;
/// Server messages are bounded only by the protocol.
const MAX_SERVER_BODY: usize = u32::MAX as usize;

/// When the server connection goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// At ReadyForQuery 'I' with nothing outstanding; statements and settings are tracked.
    Transaction,
    /// Only when the client leaves; everything passes through untouched.
    Session,
}

/// What ended a relay.
#[derive(Debug)]
pub enum Outcome {
    /// Transaction boundary: the server is clean and can be released.
    Released,
    /// The client sent Terminate or closed its socket. `server_clean` says whether the server
    /// connection is idle with nothing outstanding.
    ClientGone {
        /// Safe to reuse as is.
        server_clean: bool,
    },
    /// The server connection failed.
    ServerGone {
        /// The backend's FATAL (forwarded to the client unless `undelivered`; lowered to ERROR
        /// in transaction mode); `None` if the backend said nothing.
        error_sent: Option<PgError>,
        /// The FATAL came while no request was pending, so it was kept for the client's next
        /// request instead of being sent unsolicited.
        undelivered: bool,
        /// Client requests (Query/Sync/FunctionCall) still waiting for ReadyForQuery.
        pending: u32,
        /// The last transaction status the client saw ('I', 'T', 'E').
        tx_status: u8,
        /// Body bytes of a client message that was partly forwarded; the rest must be dropped.
        client_skip: usize,
        /// Extended-protocol messages were forwarded after the last Sync.
        unsynced: bool,
        /// The relay gave up on it: a query ran past `query_timeout` and did not stop after a
        /// cancel. The connection is alive but busy: close it.
        timed_out: bool,
    },
    /// The client sat idle past `idle_transaction_timeout` while holding the server
    /// connection: inside a transaction block, or (transaction mode) in the middle of a
    /// request it never finished.
    IdleInTransaction {
        /// Nothing outstanding, no partial message: a ROLLBACK can clean it. Otherwise it
        /// must be closed.
        server_clean: bool,
    },
    /// A session-mode client sat idle past `client_idle_timeout`.
    ClientIdle {
        /// Nothing outstanding, no partial message: the reset query can clean it.
        server_clean: bool,
    },
    /// The client broke the protocol or sent an oversized message.
    ClientProtocol(ProtoError),
    /// The proxy is stopping and its `shutdown_timeout` passed: the session ends now, whatever
    /// it was doing (its server connection must be closed).
    Killed,
    /// The proxy is draining and this session-mode client is idle between transactions: its
    /// session ends (the server connection is clean).
    Drained,
    /// A `LISTEN` inside a transaction block, with nothing owed before it: taken from the
    /// client's buffer for the session to serve through the notification hub (`answer_listen`
    /// or `refuse_listen`), then the relay resumes on the same server connection.
    Listen(Box<listen_request::Request>),
}

/// Answers a LISTEN the hub served inside the block (the relay resumes after it).
pub fn answer_listen<C>(
    client: &mut ClientIo<C>,
    view: &mut SessionView,
    req: &listen_request::Request,
    channel: String,
) {
    view.listened_in_block(channel);
    listen_request::answer(&mut client.out, req.form, Ok("LISTEN"), b'T');
}

/// Fails a LISTEN inside the block with `err`: the backend raises it, so the block fails as
/// it would have there.
pub fn refuse_listen<C>(
    client: &mut ClientIo<C>,
    view: &mut SessionView,
    server: &mut ServerConn,
    req: &listen_request::Request,
    err: &PgError,
) {
    listen_request::answer_head(&mut client.out, req.form);
    requests::raise(view, server, err);
}

/// The client's side of a session: its stream and buffers, kept across transactions.
#[derive(Debug)]
pub struct ClientIo<C> {
    /// The client's stream.
    pub stream: C,
    /// Bytes read from the client, not yet forwarded.
    pub inbuf: BytesMut,
    /// Bytes to write to the client.
    pub out: BytesMut,
    /// Largest client message body accepted.
    pub max_body: usize,
    /// Bytes read from the client since the session last collected them (for metrics).
    pub read_bytes: u64,
}

/// Relays until the outcome, keeping `view` (the client's session) up to date and enforcing
/// the `timers`' limits.
pub async fn relay<C>(
    client: &mut ClientIo<C>,
    server: &mut ServerConn,
    mode: Mode,
    view: &mut SessionView,
    mut timers: Option<&mut Timers>,
    watch: &Watch,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(t) = timers.as_deref_mut() {
        t.start();
    }
    let mut st = State {
        mode,
        flags: Flags {
            track: mode == Mode::Transaction,
            segment: Segment::Synced,
            skip: Skip::No,
        },
        c_skip: 0,
        c_drop: false,
        s_skip: 0,
        handled: false,
        fatal: None,
        undelivered: false,
        client_active: false,
        view,
        timers,
        watch,
        watching: false,
    };
    poll_fn(|cx| st.poll(cx, client, server)).await
}

struct State<'v> {
    mode: Mode,
    flags: Flags,
    /// Body bytes of a client message still to pass through (or drop, with `c_drop`).
    c_skip: usize,
    c_drop: bool,
    /// Body bytes of a server message still streaming through.
    s_skip: usize,
    /// Whether any client request was handled in this relay.
    handled: bool,
    fatal: Option<PgError>,
    /// The FATAL was kept back (no request pending).
    undelivered: bool,
    /// Bytes came from the client since the timers last looked (an idle client is one that
    /// sends nothing).
    client_active: bool,
    view: &'v mut SessionView,
    timers: Option<&'v mut Timers>,
    /// The proxy's stop signals, and whether this relay's task is registered with them.
    watch: &'v Watch,
    watching: bool,
}

enum Scan {
    Continue,
    Release,
}

/// What becomes of a possible LISTEN at the front of the client's buffer.
enum HubListen {
    /// Not one for the hub: handled as any request.
    No,
    /// Not decided yet: wait for more bytes, or for what is owed before it.
    Wait,
    /// Taken for the hub.
    Take(Box<listen_request::Request>),
}

/// What the client's messages led to.
enum ClientScan {
    Continue,
    /// Terminate.
    Gone,
    /// A LISTEN for the hub (taken from the buffer).
    Listen(Box<listen_request::Request>),
}

impl State<'_> {
    /// Quiescent and outside any transaction: reusable as is.
    fn clean(&self, server: &ServerConn) -> bool {
        self.quiescent(server) && self.view.tx_status == b'I'
    }

    fn releasable(&self, server: &ServerConn) -> bool {
        self.mode == Mode::Transaction && self.handled && self.clean(server)
    }

    fn server_gone(&mut self) -> Poll<Outcome> {
        self.server_outcome(false)
    }

    /// What the timers measure right now.
    fn phase(&self) -> Phase {
        // Extended-protocol messages with neither Sync nor Flush after them, and nothing synced
        // still owed ahead of them: the server holds its answers until the client finishes
        // the request, so nothing runs on its behalf.
        let awaiting_client =
            self.flags.segment == Segment::Open && !self.view.expect.iter().any(|(_, e)| e.ends_with_ready());
        if self.s_skip > 0 || (!self.view.expect.is_empty() && !awaiting_client) {
            Phase::Busy
        } else if self.view.tx_status == b'I' && self.mode == Mode::Session {
            Phase::Idle
        } else {
            // Inside a block, or (transaction mode, where an idle client has no server) holding
            // one with a request left unfinished: a partial message, or no Sync yet.
            Phase::IdleInTransaction
        }
    }

    /// Idle with nothing outstanding and no partial message either way (the transaction
    /// status aside).
    fn quiescent(&self, server: &ServerConn) -> bool {
        self.view.expect.is_empty()
            && !self.flags.segment.unsynced()
            && self.c_skip == 0
            && self.s_skip == 0
            && server.wbuf.is_empty()
    }

    /// Checks the timeouts before waiting; `Some` ends the relay.
    fn poll_timers(&mut self, cx: &mut Context<'_>, server: &ServerConn) -> Option<Poll<Outcome>> {
        let phase = self.phase();
        let active = std::mem::take(&mut self.client_active);
        let timers = self.timers.as_deref_mut()?;
        loop {
            match timers.poll(cx, phase, active) {
                Poll::Pending => return None,
                Poll::Ready(Expired::QueryCancel) => {
                    tracing::info!(server = server.id, "query_timeout passed; cancelling the query");
                    self.view.counters.query_timeouts += 1;
                    drop(CancelTarget::of(server).send());
                    // Loop: arms the grace period.
                }
                Poll::Ready(Expired::QueryGiveUp) => return Some(self.server_outcome(true)),
                Poll::Ready(Expired::IdleInTransaction) => {
                    let server_clean = self.quiescent(server);
                    self.view.clear_owed();
                    return Some(Poll::Ready(Outcome::IdleInTransaction { server_clean }));
                }
                Poll::Ready(Expired::ClientIdle) => {
                    let server_clean = self.clean(server);
                    self.view.clear_owed();
                    return Some(Poll::Ready(Outcome::ClientIdle { server_clean }));
                }
            }
        }
    }

    fn server_outcome(&mut self, timed_out: bool) -> Poll<Outcome> {
        let pending = self
            .view
            .expect
            .iter()
            .filter(|(_, e)| e.ends_with_ready())
            .count();
        self.view.clear_owed();
        Poll::Ready(Outcome::ServerGone {
            error_sent: self.fatal.take(),
            undelivered: self.undelivered,
            pending: u32::try_from(pending).unwrap_or(u32::MAX),
            tx_status: self.view.tx_status,
            client_skip: self.c_skip,
            unsynced: self.flags.segment.unsynced(),
            timed_out,
        })
    }

    fn client_gone(&mut self, server: &ServerConn) -> Poll<Outcome> {
        let server_clean = self.clean(server);
        self.view.clear_owed();
        Poll::Ready(Outcome::ClientGone { server_clean })
    }

    fn poll<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut ClientIo<C>,
        server: &mut ServerConn,
    ) -> Poll<Outcome> {
        loop {
            // Frame what was read: client → server buffer, server → client buffer. After a
            // FATAL the backend reads nothing more: the client's next requests stay buffered
            // for a healthy connection instead of being sent to a dying one.
            if !client.inbuf.is_empty() && self.fatal.is_none() {
                match self.scan_client(client, server) {
                    Ok(ClientScan::Continue) => {}
                    Ok(ClientScan::Gone) => return self.client_gone(server),
                    Ok(ClientScan::Listen(req)) => return Poll::Ready(Outcome::Listen(req)),
                    Err(e) => {
                        self.view.clear_owed();
                        return Poll::Ready(Outcome::ClientProtocol(e));
                    }
                }
                if self.releasable(server) {
                    return Poll::Ready(Outcome::Released);
                }
            }
            if !server.rbuf.is_empty() {
                match self.scan_server(client, server) {
                    Ok(Scan::Release) => return Poll::Ready(Outcome::Released),
                    Ok(Scan::Continue) => {}
                    Err(_) => return self.server_gone(),
                }
            }
            let mut progress = false;
            // Flush towards the server.
            while !server.wbuf.is_empty() && self.fatal.is_none() {
                match Pin::new(&mut server.stream).poll_write(cx, &server.wbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return self.server_gone(),
                    Poll::Ready(Ok(n)) => {
                        server.wbuf.advance(n);
                        progress = true;
                    }
                    Poll::Pending => break,
                }
            }
            // Flush towards the client.
            while !client.out.is_empty() {
                match Pin::new(&mut client.stream).poll_write(cx, &client.out) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.view.clear_owed();
                        return Poll::Ready(Outcome::ClientGone { server_clean: false });
                    }
                    Poll::Ready(Ok(n)) => {
                        client.out.advance(n);
                        progress = true;
                    }
                    Poll::Pending => break,
                }
            }
            // Read more, unless the other side is not keeping up (backpressure).
            if server.wbuf.len() < HIGH_WATER && self.fatal.is_none() {
                reserve_read(&mut client.inbuf);
                match poll_read_buf(Pin::new(&mut client.stream), cx, &mut client.inbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return self.client_gone(server),
                    Poll::Ready(Ok(n)) => {
                        progress = true;
                        self.client_active = true;
                        client.read_bytes += n as u64;
                    }
                    Poll::Pending => {}
                }
            }
            if client.out.len() < HIGH_WATER {
                reserve_read(&mut server.rbuf);
                match poll_read_buf(Pin::new(&mut server.stream), cx, &mut server.rbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return self.server_gone(),
                    Poll::Ready(Ok(n)) => {
                        progress = true;
                        self.view.counters.server_bytes += n as u64;
                    }
                    Poll::Pending => {}
                }
            }
            if !progress {
                // Registered once per relay; a wake takes the registration, so once draining
                // has begun (its wake took it) every poll registers again, for the kill.
                if !self.watching || self.watch.draining() {
                    self.watch.register(cx);
                    self.watching = true;
                }
                if self.watch.killed() {
                    self.view.clear_owed();
                    return Poll::Ready(Outcome::Killed);
                }
                if self.mode == Mode::Session
                    && self.watch.draining()
                    && client.inbuf.is_empty()
                    && self.clean(server)
                {
                    return Poll::Ready(Outcome::Drained);
                }
                if self.fatal.is_none() {
                    if let Some(done) = self.poll_timers(cx, server) {
                        return done;
                    }
                }
                return Poll::Pending;
            }
        }
    }

    /// Handles complete client messages (streaming large bodies through), up to a Terminate
    /// or a LISTEN for the hub.
    fn scan_client<C>(
        &mut self,
        client: &mut ClientIo<C>,
        server: &mut ServerConn,
    ) -> Result<ClientScan, ProtoError> {
        let inbuf = &mut client.inbuf;
        loop {
            if self.c_skip > 0 {
                let n = self.c_skip.min(inbuf.len());
                if n == 0 {
                    break;
                }
                if !self.c_drop {
                    server.wbuf.extend_from_slice(&inbuf[..n]);
                }
                inbuf.advance(n);
                self.c_skip -= n;
                continue;
            }
            let Some(h) = parse_header(inbuf, client.max_body)? else {
                break;
            };
            if h.tag == b'X' {
                inbuf.clear();
                return Ok(ClientScan::Gone);
            }
            if matches!(h.tag, b'Q' | b'P') && self.flags.track && self.flags.skip == Skip::No {
                match self.hub_listen(inbuf) {
                    HubListen::No => {}
                    HubListen::Wait => break,
                    HubListen::Take(req) => return Ok(ClientScan::Listen(req)),
                }
            }
            match requests::handle(h, inbuf, self.view, server, &mut self.flags)? {
                Step::NeedMore(want) => {
                    inbuf.reserve(want.saturating_sub(inbuf.len()));
                    break;
                }
                Step::Done { stream } => {
                    self.c_skip = stream;
                    self.c_drop = false;
                }
                Step::Dropped { drop } => {
                    self.c_skip = drop;
                    self.c_drop = true;
                }
            }
            self.handled = true;
        }
        if self.s_skip == 0 {
            expect::emit_synthetic(self.view, &mut client.out);
        }
        Ok(ClientScan::Continue)
    }

    /// Whether the request at the front of `inbuf` is a LISTEN inside a transaction block
    /// for the notification hub. Looked at only while a block is open or something is owed
    /// that may open one (a pipelined BEGIN): then a possible LISTEN waits until nothing is
    /// owed before it and the block's state is known.
    fn hub_listen(&self, inbuf: &mut BytesMut) -> HubListen {
        let owed = !self.view.expect.is_empty();
        if !(owed || self.view.block_open) || self.view.pins.pinned() || self.flags.segment.unsynced() {
            return HubListen::No;
        }
        match listen_request::find(inbuf) {
            Found::No => HubListen::No,
            Found::Request(r) if !matches!(r.cmd, ListenCommand::Listen(_)) => HubListen::No,
            Found::Partial | Found::Request(_) if owed || self.s_skip > 0 => HubListen::Wait,
            _ if !self.view.block_may_listen() => HubListen::No,
            Found::Partial => HubListen::Wait,
            Found::Request(r) => {
                inbuf.advance(r.len);
                HubListen::Take(Box::new(r))
            }
        }
    }

    /// A (non-fatal) ErrorResponse with SQLSTATE `code` failed the request at the head of the
    /// queue.
    fn on_error(&mut self, server: &mut ServerConn, code: &str) {
        if expect::on_error(self.view, server, code) == ErrorEffect::AwaitingSync {
            // The backend discards the client's messages up to its Sync: they are forwarded
            // with nothing owed for them.
            self.flags.skip = Skip::Forward;
        }
    }

    /// Moves complete server messages to the client's buffer, matching them to what is owed.
    /// Stops right after the ReadyForQuery that makes the server releasable, leaving anything
    /// after it in the server's buffer.
    fn scan_server<C>(
        &mut self,
        client: &mut ClientIo<C>,
        server: &mut ServerConn,
    ) -> Result<Scan, ProtoError> {
        loop {
            if self.s_skip > 0 {
                let n = self.s_skip.min(server.rbuf.len());
                if n == 0 {
                    return Ok(Scan::Continue);
                }
                client.out.extend_from_slice(&server.rbuf[..n]);
                server.rbuf.advance(n);
                self.s_skip -= n;
                continue;
            }
            expect::emit_synthetic(self.view, &mut client.out);
            let Some(h) = parse_header(&server.rbuf, MAX_SERVER_BODY)? else {
                return Ok(Scan::Continue);
            };
            let inspect = matches!(h.tag, b'Z' | b'S' | b'E' | b'C') && h.body_len <= INSPECT_LIMIT;
            if h.tag == b'Z' && h.body_len != 1 {
                return Err(ProtoError::Invalid("ReadyForQuery length"));
            }
            let body = if inspect {
                match server.rbuf.get(HEADER_LEN..h.total_len()) {
                    Some(b) => Some(b),
                    None => {
                        let missing = h.total_len().saturating_sub(server.rbuf.len());
                        server.rbuf.reserve(missing);
                        return Ok(Scan::Continue);
                    }
                }
            } else {
                None
            };
            let route = match (h.tag, body) {
                (b'Z', Some(b)) => {
                    let status = b.first().copied().unwrap_or(b'I');
                    if !expect::on_ready(self.view, status) {
                        return Err(ProtoError::Invalid("unsolicited ReadyForQuery"));
                    }
                    Route::Forward
                }
                (b'S', Some(b)) => {
                    let (name, value) = parse_parameter_status(b)?;
                    if self.flags.track {
                        self.view
                            .reported(server, name.to_ascii_lowercase(), value.clone());
                    }
                    server.params.insert(name, value);
                    Route::Forward
                }
                (b'E', Some(b)) => {
                    let err = PgError::parse(b)?;
                    self.view.counters.error(err.code());
                    if err.is_fatal() {
                        if self.mode == Mode::Session {
                            client.out.extend_from_slice(&server.rbuf[..h.total_len()]);
                        } else if self.view.expect.is_empty() {
                            // Nothing is pending: an ErrorResponse now would be unsolicited
                            // (drivers drop the connection). The session answers the client's
                            // next request with it instead.
                            self.undelivered = true;
                        } else {
                            // The client's connection outlives this server connection.
                            err.clone()
                                .with_severity(Severity::Error)
                                .write_error(&mut client.out);
                        }
                        server.rbuf.advance(h.total_len());
                        self.fatal = Some(err);
                        continue;
                    }
                    self.on_error(server, err.code());
                    let limit = self.timers.as_deref().and_then(Timers::cancelled_after);
                    if let (Some(limit), sqlstate::QUERY_CANCELED) = (limit, err.code()) {
                        // The cancel was pgsluice's own: say so instead of "user request".
                        PgError::new(
                            Severity::Error,
                            sqlstate::QUERY_CANCELED,
                            format!(
                                "canceling statement due to query_timeout ({})",
                                fmt_duration(limit)
                            ),
                        )
                        .write_error(&mut client.out);
                        server.rbuf.advance(h.total_len());
                        continue;
                    }
                    Route::Forward
                }
                (b'C', Some(b)) => {
                    let tag = expect::Tag::of(Reader::new(b).cstr("command tag")?);
                    expect::on_server_message(self.view, server, b'C', Some(tag))
                }
                (b'E', None) => {
                    // Too large to inspect (a long RAISE message): its code is unknown, but it
                    // fails the request all the same.
                    self.view.counters.error("");
                    self.on_error(server, "");
                    Route::Forward
                }
                (tag, _) => expect::on_server_message(self.view, server, tag, None),
            };
            match route {
                Route::Swallow => {
                    let n = h.total_len().min(server.rbuf.len());
                    server.rbuf.advance(n);
                    self.s_skip = 0;
                    if n < h.total_len() {
                        return Err(ProtoError::Invalid("swallowed message split"));
                    }
                }
                Route::Forward => {
                    let n = h.total_len().min(server.rbuf.len());
                    client.out.extend_from_slice(&server.rbuf[..n]);
                    server.rbuf.advance(n);
                    self.s_skip = h.total_len() - n;
                }
            }
            if h.tag == b'Z' {
                expect::emit_synthetic(self.view, &mut client.out);
                if self.releasable(server) {
                    return Ok(Scan::Release);
                }
            }
        }
    }
}

/// Ensures room for a read; `reserve` reuses the allocation once earlier bytes were consumed,
/// so a steady stream does not allocate.
fn reserve_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}
