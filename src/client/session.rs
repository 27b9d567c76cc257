//! The session loop of a logged-in client: wait for its next request, get a server connection
//! (checkout + settings), relay until the transaction or session ends, release or discard.
//! Failures inside a session are ERROR + ReadyForQuery, and the client stays connected
//! whenever that is safe.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::cancel::CancelHandle;
use super::handshake::LoggedIn;
use super::io::Gone;
use super::restore;
use super::ClientError;
use crate::config::duration::fmt_duration;
use crate::config::PoolMode;
use crate::notify::request::{self as listen_request, Found};
use crate::notify::{Delivery, Subscription};
use crate::pool::{Gauged, Pool, PoolStats, Pooled};
use crate::proto::backend::{self, PgError, Severity};
use crate::proto::frame::parse_header;
use crate::proto::sql::ListenCommand;
use crate::relay::pins::{parse_probe, Pins, PROBE_QUERY};
use crate::relay::{relay, ClientIo, Mode, Outcome, SessionView, Timers};
use crate::sync::until;

/// Bound on writing a FATAL to a client that was idle.
const FATAL_FLUSH_LIMIT: Duration = Duration::from_secs(1);
/// Bound on the proxy's own statements on a server connection (session settings, the
/// session-mode reset query, the cleanup after a timeout).
pub(super) const RESET_LIMIT: Duration = Duration::from_secs(10);

/// Serves a logged-in client until it leaves. A server connection the client was pinned to
/// is reset (DISCARD ALL) and goes back to the pool then, however the client left.
pub async fn run<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    mut s: LoggedIn,
) -> Result<(), Gone> {
    let mut pinned = Pinned::default();
    let mut listen = None;
    let result = serve(io, &mut s, &mut pinned, &mut listen).await;
    drop(listen);
    // The client is gone: no longer counted as pinned, whatever its connection's reset takes.
    pinned.leave(&mut s.view.pins);
    let Pinned { server, .. } = pinned;
    if let Some(server) = server {
        finish_pinned(server, &s.view.pins).await;
    }
    result
}

/// The server connection a pinned client keeps between its transactions, and its place in
/// the pool's gauge of pinned clients.
#[derive(Default)]
struct Pinned {
    server: Option<Pooled>,
    counted: Option<Gauged>,
}

impl Pinned {
    /// The client is leaving: it no longer counts as pinned (in the gauge or against
    /// `max_pinned`), whatever its connection's reset takes.
    fn leave(&mut self, pins: &mut Pins) {
        pins.left();
        self.counted = None;
    }

    /// Keeps the pool's gauge of pinned clients right: counted while `pinned`.
    fn count(&mut self, pool: &Arc<Pool>, pinned: bool) {
        if !pinned {
            self.counted = None;
        } else if self.counted.is_none() {
            PoolStats::bump(&pool.stats.pins);
            self.counted = Some(Gauged::new(pool, |s| &s.pinned_clients));
        }
    }
}

async fn serve<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    s: &mut LoggedIn,
    pinned: &mut Pinned,
    listen: &mut Option<Subscription>,
) -> Result<(), Gone> {
    let mode = match s.pool.settings.pool_mode {
        PoolMode::Transaction => Mode::Transaction,
        PoolMode::Session => Mode::Session,
    };
    let limits = s.pool.settings.clone();
    s.view.pins.set_policy(limits.session_state);
    s.view.pins.set_budget(s.pool.pin_budget.clone());
    // In transaction mode the client is idle here, between transactions; in session mode the
    // relay runs for the whole session and times its idleness itself.
    let mut timers = Timers::new(
        limits.idle_transaction_timeout,
        limits.query_timeout,
        (mode == Mode::Session)
            .then_some(limits.client_idle_timeout)
            .flatten(),
    );
    // Channels the hub started listening on for LISTENs inside the open block (at most
    // `notify::MAX_CHANNELS`): the block's end decides whether they stay.
    let mut block_added: Vec<String> = Vec::new();
    loop {
        if s.watch.draining() {
            // The proxy stops: the client's session ends at this transaction boundary.
            return fatal_within(io, ClientError::Terminated).await;
        }
        // Idle: wait for the start of the client's next request.
        let idle_until = limits.client_idle_timeout.map(|t| Instant::now() + t);
        let pinned_until = limits
            .pinned_idle_timeout
            .filter(|_| pinned.server.is_some())
            .map(|t| Instant::now() + t);
        let tag = loop {
            match parse_header(&io.inbuf, io.max_body) {
                Err(e) => return fatal(io, ClientError::Protocol(e)).await,
                Ok(Some(h)) => break h.tag,
                Ok(None) => {
                    if s.watch.draining() {
                        // A client between transactions while the proxy stops: its session
                        // ends here.
                        return fatal_within(io, ClientError::Terminated).await;
                    }
                    let woke = if pinned.server.is_none() && listen.is_none() {
                        // The usual case: only the client (or the proxy stopping) can end the
                        // wait.
                        tokio::select! {
                            biased;
                            r = io.fill() => Woke::Client(r),
                            () = s.watch.drained() => Woke::Drain,
                            () = until(idle_until) => Woke::IdleTimeout,
                        }
                    } else {
                        // A pinned client's server may speak while the client is idle
                        // (notices, its end), and notifications of its LISTENs arrive.
                        let take = io.out.len() < NOTIFY_OUT_MARK
                            || listen.as_ref().is_some_and(Subscription::overflowed);
                        let server = pinned.server.as_mut();
                        let sub = listen.as_mut().filter(|_| take);
                        tokio::select! {
                            r = read_or_flush(io) => Woke::Client(r),
                            () = until(idle_until) => Woke::IdleTimeout,
                            () = until(pinned_until) => Woke::PinnedIdleTimeout,
                            m = pinned_message(server) => Woke::Server(m),
                            d = next_delivery(sub) => Woke::Notification(d),
                            () = s.watch.drained() => Woke::Drain,
                        }
                    };
                    match woke {
                        Woke::Client(r) => r?,
                        Woke::Drain => return fatal_within(io, ClientError::Terminated).await,
                        Woke::IdleTimeout => {
                            PoolStats::bump(&s.pool.stats.client_idle_timeouts);
                            let limit = limits.client_idle_timeout.unwrap_or_default();
                            return fatal(io, ClientError::IdleTimeout(limit)).await;
                        }
                        Woke::PinnedIdleTimeout => {
                            PoolStats::bump(&s.pool.stats.pinned_idle_timeouts);
                            let e = ClientError::PinnedIdleTimeout {
                                limit: limits.pinned_idle_timeout.unwrap_or_default(),
                                state: s.view.pins.describe(),
                            };
                            return fatal_within(io, e).await;
                        }
                        Woke::Notification(d) => {
                            if !take_delivery(io, listen, d) {
                                return fatal_within(io, overflowed()).await;
                            }
                        }
                        Woke::Server(m) => {
                            if let Err(why) = pass_on_idle_message(io, m).await? {
                                tracing::warn!(pool = %s.pool.key, error = %why, "a pinned client's server connection ended");
                                if let Some(server) = pinned.server.take() {
                                    server.failed(None);
                                }
                                return fatal(io, ClientError::PinnedServerLost(s.view.pins.describe()))
                                    .await;
                            }
                        }
                    }
                }
            }
        };
        if tag == b'X' {
            return Ok(());
        }
        if matches!(tag, b'd' | b'c' | b'f') {
            // COPY messages after a failed COPY: the backend ignores them, and so do we.
            discard_message(io).await?;
            continue;
        }
        if s.view.lost_block {
            // The transaction died with its server connection: answer until the client ends
            // it, so nothing it sends meanwhile runs in autocommit by accident.
            answer_lost_block(io, &mut s.view).await?;
            continue;
        }
        if matches!(tag, b'Q' | b'P')
            && mode == Mode::Transaction
            && pinned.server.is_none()
            && !matches!(listen_request::find(&io.inbuf), Found::No)
        {
            match take_listen_request(io, idle_until).await? {
                Taken::Listen(cmd) => {
                    answer_listen(io, s, listen, cmd).await?;
                    continue;
                }
                Taken::IdleTimeout => {
                    PoolStats::bump(&s.pool.stats.client_idle_timeouts);
                    let limit = limits.client_idle_timeout.unwrap_or_default();
                    return fatal(io, ClientError::IdleTimeout(limit)).await;
                }
                Taken::Other => {}
            }
        }
        // When the transaction began: the checkout's hand-out (already read), or now for a
        // pinned client's kept connection.
        let (mut server, began) = match pinned.server.take() {
            Some(server) => (server, Instant::now()),
            None => {
                let deadline = limits.query_wait_timeout.map(|t| Instant::now() + t);
                let waited = wait_for_server(
                    io,
                    &s.pool,
                    &s.cancel,
                    restore::checkout(&s.pool, &mut s.view, deadline),
                )
                .await?;
                match waited {
                    Ok(server) => {
                        let began = server.handed_out();
                        (server, began)
                    }
                    Err(e) => {
                        tracing::info!(pool = %s.pool.key, error = %e, "request failed before reaching a server");
                        let e = e.to_pg_error(Severity::Error);
                        s.pool
                            .stats
                            .count_errors(&[(crate::relay::sqlstate_class(e.code()), 1)]);
                        fail_request(io, &e, b'I').await?;
                        continue;
                    }
                }
            }
        };
        s.cancel.attach(&server);
        let outcome = loop {
            match relay(io, &mut server, mode, &mut s.view, timers.as_mut(), &s.watch).await {
                Outcome::Listen(req) => {
                    listen_in_block(io, s, listen, &mut server, *req, &mut block_added).await
                }
                outcome => break outcome,
            }
        };
        s.cancel.detach();
        let ended = Instant::now();
        s.pool
            .timings
            .transaction
            .observe(ended.saturating_duration_since(began));
        collect_counters(&s.pool, &mut s.view);
        PoolStats::add(&s.pool.stats.client_bytes, std::mem::take(&mut io.read_bytes));
        tracing::trace!(pool = %s.pool.key, ?outcome, "relay ended");
        PoolStats::bump(&s.pool.stats.transactions);
        match outcome {
            Outcome::Released => {
                let was_pinned = s.view.pins.pinned();
                let settled = settle_pins(&mut server, &mut s.view).await;
                pinned.count(&s.pool, matches!(settled, Ok(true)));
                match settled {
                    Ok(true) => {
                        if !was_pinned {
                            tracing::debug!(pool = %s.pool.key, state = %s.view.pins.describe(), "client pinned to its server connection");
                        }
                        pinned.server = Some(server);
                    }
                    Ok(false) => {
                        if was_pinned {
                            tracing::debug!(pool = %s.pool.key, "client unpinned");
                        }
                        server.release_at(ended);
                    }
                    Err(why) => {
                        tracing::warn!(pool = %s.pool.key, error = %why, "server connection lost after a transaction");
                        server.failed(None);
                        if was_pinned || s.view.pins.pinned() {
                            return fatal(io, ClientError::PinnedServerLost(s.view.pins.describe())).await;
                        }
                    }
                }
                settle_listens(&mut s.view, listen, &mut block_added);
                // Notifications that waited go out right after the ReadyForQuery.
                while io.out.len() < NOTIFY_OUT_MARK {
                    let Some(d) = listen.as_mut().and_then(Subscription::try_next) else {
                        break;
                    };
                    if !take_delivery(io, listen, d) {
                        return fatal_within(io, overflowed()).await;
                    }
                }
                io.flush().await?;
            }
            Outcome::ClientGone { server_clean } => {
                pinned.leave(&mut s.view.pins);
                finish_server(server, server_clean, mode, &s.view.pins).await;
                return Ok(());
            }
            Outcome::ClientProtocol(e) => {
                server.discard();
                return fatal(io, ClientError::Protocol(e)).await;
            }
            Outcome::Killed => {
                // Mid-transaction at shutdown_timeout: its transaction is rolled back with the
                // server connection.
                pinned.leave(&mut s.view.pins);
                server.discard();
                return fatal_within(io, ClientError::Terminated).await;
            }
            Outcome::Drained => {
                let told = fatal_within(io, ClientError::Terminated).await;
                pinned.leave(&mut s.view.pins);
                finish_server(server, true, mode, &s.view.pins).await;
                return told;
            }
            // Served in the loop around the relay; never reaches here.
            Outcome::Listen(_) => {
                server.discard();
                return Ok(());
            }
            Outcome::IdleInTransaction { server_clean } => {
                PoolStats::bump(&s.pool.stats.idle_transaction_timeouts);
                let limit = limits.idle_transaction_timeout.unwrap_or_default();
                // The client hears first; then the server is cleaned (or closed).
                let told = fatal_within(io, ClientError::IdleInTransaction(limit)).await;
                if server_clean {
                    clean_server(server).await;
                } else {
                    server.discard();
                }
                return told;
            }
            Outcome::ClientIdle { server_clean } => {
                PoolStats::bump(&s.pool.stats.client_idle_timeouts);
                let limit = limits.client_idle_timeout.unwrap_or_default();
                let told = fatal_within(io, ClientError::IdleTimeout(limit)).await;
                pinned.leave(&mut s.view.pins);
                finish_server(server, server_clean, mode, &s.view.pins).await;
                return told;
            }
            Outcome::ServerGone {
                error_sent,
                undelivered,
                pending,
                tx_status,
                client_skip,
                unsynced,
                timed_out,
            } => {
                let lost = if timed_out {
                    // Alive but stuck in a query that ignored its cancel: close it.
                    PoolStats::bump(&s.pool.stats.query_timeout_closes);
                    server.discard();
                    tracing::warn!(pool = %s.pool.key, pending, "query did not stop after its query_timeout cancel; closed its server connection");
                    ClientError::QueryTimeout(limits.query_timeout.unwrap_or_default())
                } else {
                    server.failed(error_sent.as_ref());
                    tracing::warn!(pool = %s.pool.key, pending, unsynced, error = ?error_sent.as_ref().map(ToString::to_string), "server connection lost while serving a client");
                    ClientError::ServerLost
                };
                if mode == Mode::Session {
                    if error_sent.is_none() {
                        lost.to_pg_error(Severity::Fatal).write_error(&mut io.out);
                    }
                    io.flush().await?;
                    return Ok(());
                }
                if s.view.pins.pinned() {
                    // Its session state (temporary tables, locks, ...) went with the
                    // connection: as PostgreSQL, the client loses its session.
                    skip_bytes(io, client_skip).await?;
                    return fatal(io, ClientError::PinnedServerLost(s.view.pins.describe())).await;
                }
                skip_bytes(io, client_skip).await?;
                let status = if matches!(tx_status, b'T' | b'E') {
                    b'E'
                } else {
                    b'I'
                };
                s.view.server_lost(status);
                settle_listens(&mut s.view, listen, &mut block_added);
                // What the client has not been told yet.
                let untold = match error_sent {
                    Some(_) if !undelivered => None,
                    Some(e) => Some(e.with_severity(Severity::Error)),
                    None => Some(lost.to_pg_error(Severity::Error)),
                };
                if pending == 0 && !unsynced {
                    // Nothing was pending (the client sat idle in its block): an error now would
                    // be unsolicited. Its next request gets it.
                    if status == b'E' {
                        s.view.lost_error = untold;
                    }
                    continue;
                }
                if let Some(e) = untold {
                    e.write_error(&mut io.out);
                }
                let mut owed = pending;
                if owed > 0 {
                    backend::ready_for_query(&mut io.out, status);
                    owed -= 1;
                }
                for _ in 0..owed {
                    ClientError::ServerLost
                        .to_pg_error(Severity::Error)
                        .write_error(&mut io.out);
                    backend::ready_for_query(&mut io.out, status);
                }
                io.flush().await?;
                if unsynced {
                    skip_to_sync(io, status).await?;
                }
            }
        }
    }
}

/// Waits for `checkout` while the client may cancel its wait (57014) and, after
/// `query_wait_notify`, tells it with a NOTICE that it is waiting, as PgBouncer does.
async fn wait_for_server<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    pool: &Pool,
    cancel: &CancelHandle,
    checkout: impl std::future::Future<Output = Result<Pooled, ClientError>>,
) -> Result<Result<Pooled, ClientError>, Gone> {
    tokio::pin!(checkout);
    let mut notify_at = pool.settings.query_wait_notify.map(|t| Instant::now() + t);
    cancel.begin_wait();
    let result = loop {
        tokio::select! {
            biased;
            r = &mut checkout => break Ok(r),
            () = cancel.cancelled() => {
                PoolStats::bump(&pool.stats.wait_cancelled);
                break Ok(Err(ClientError::WaitCanceled));
            }
            () = until(notify_at) => {
                notify_at = None;
                PoolStats::bump(&pool.stats.wait_notices);
                let waited = pool.settings.query_wait_notify.unwrap_or_default();
                PgError::new(
                    Severity::Notice,
                    crate::proto::sqlstate::SUCCESSFUL_COMPLETION,
                    format!(
                        "no server connection available yet (pool {}, tenant {}): waiting for one, {} so far",
                        pool.key,
                        pool.tenant,
                        fmt_duration(waited)
                    ),
                )
                .write_notice(&mut io.out);
            }
            // The NOTICE goes out while the checkout is still polled: a client that does not
            // read cannot hold up a connection handed to it (what is left goes with the answer).
            r = io.flush(), if !io.out.is_empty() => {
                if r.is_err() {
                    break Err(Gone);
                }
            }
        }
    };
    cancel.end_wait();
    result
}

/// Brings back a server connection whose client was disconnected inside a transaction: rolls
/// the transaction back and resets the session (the client's SET LOCALs and the like are
/// unknown), so the next client finds it clean. Closed instead if that fails.
async fn clean_server(server: Pooled) {
    reset_and_release(server, &["ROLLBACK", "DISCARD ALL"]).await;
}

/// Runs the proxy's own cleanup statements on a server connection, each bounded by
/// `RESET_LIMIT`, and returns it to the pool in its login state; closes it if one fails.
async fn reset_and_release(mut server: Pooled, statements: &[&str]) {
    for sql in statements {
        if !matches!(
            tokio::time::timeout(RESET_LIMIT, server.simple_query(sql)).await,
            Ok(Ok(None))
        ) {
            server.discard();
            return;
        }
    }
    server.discarded();
    server.release();
}

/// Answers one request of a client whose transaction block was lost with its server
/// connection: ROLLBACK (and COMMIT, which PostgreSQL also answers with ROLLBACK in a failed
/// block) ends it; anything else gets 25P02, as inside any failed transaction block.
async fn answer_lost_block<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    view: &mut SessionView,
) -> Result<(), Gone> {
    let (tag, body) = match io.read_message(io.max_body.min(64 * 1024)).await? {
        Ok(m) => m,
        Err(_) => {
            // Too large to be a transaction-control statement: refused like any other request.
            let e = view
                .lost_error
                .take()
                .unwrap_or_else(|| aborted_error().to_pg_error(Severity::Error));
            return fail_request(io, &e, b'E').await;
        }
    };
    let ends_block = tag == b'Q'
        && std::str::from_utf8(body.strip_suffix(&[0]).unwrap_or(&body))
            .is_ok_and(crate::proto::sql::ends_transaction_block);
    if ends_block {
        backend::command_complete(&mut io.out, "ROLLBACK");
        view.block_ended();
        backend::ready_for_query(&mut io.out, b'I');
        return io.flush().await;
    }
    match view.lost_error.take() {
        Some(e) => e.write_error(&mut io.out),
        None => aborted_error()
            .to_pg_error(Severity::Error)
            .write_error(&mut io.out),
    }
    match tag {
        b'Q' | b'F' | b'S' => {
            backend::ready_for_query(&mut io.out, b'E');
            io.flush().await
        }
        b'd' | b'c' | b'f' | b'H' => io.flush().await,
        _ => {
            io.flush().await?;
            skip_to_sync(io, b'E').await
        }
    }
}

fn aborted_error() -> ClientError {
    ClientError::TransactionAborted
}

/// Adds the relay's prepared-statement counters to the pool's.
fn collect_counters(pool: &Pool, view: &mut SessionView) {
    let c = std::mem::take(&mut view.counters);
    PoolStats::add(&pool.stats.prepared_hits, c.hits);
    PoolStats::add(&pool.stats.prepared_misses, c.misses);
    PoolStats::add(&pool.stats.prepared_evictions, c.evictions);
    PoolStats::add(&pool.stats.query_timeouts, c.query_timeouts);
    PoolStats::add(&pool.stats.pin_refusals, c.pin_refusals);
    PoolStats::add(&pool.stats.server_bytes, c.server_bytes);
    if !c.errors.is_empty() {
        pool.stats.count_errors(&c.errors);
    }
}

/// Returns or closes the server connection of a client that left.
async fn finish_server(server: Pooled, clean: bool, mode: Mode, pins: &Pins) {
    if !clean {
        // Mid-transaction or mid-COPY: its state is unknown, never reuse it.
        server.discard();
        return;
    }
    if mode == Mode::Transaction && pins.needs_reset() {
        // The client may have left session state on it (it was pinned, or its last
        // transaction may have created some).
        return finish_pinned(server, pins).await;
    }
    if mode == Mode::Session && !server.pool().reset_query.is_empty() {
        let sql = server.pool().reset_query.clone();
        return reset_and_release(server, &[&sql]).await;
    }
    server.release();
}

/// What ended an idle wait.
enum Woke {
    /// The client's bytes arrived (or it left).
    Client(Result<(), Gone>),
    /// `client_idle_timeout` passed.
    IdleTimeout,
    /// `pinned_idle_timeout` passed with the client pinned.
    PinnedIdleTimeout,
    /// A pinned client's server connection sent something (or failed).
    Server(Result<(u8, bytes::Bytes), crate::server::ServerError>),
    /// A notification for the client's LISTENs (or the end of its subscription).
    Notification(Delivery),
    /// The proxy started draining.
    Drain,
}

/// Notifications are taken from the hub's queue only while less than this waits to be written
/// to the client; one that does not read is closed when its queue overflows.
const NOTIFY_OUT_MARK: usize = 64 * 1024;

/// Reads from the client, or, while output waits for it, writes that first (the client may
/// not read until it is written; it is not read meanwhile).
async fn read_or_flush<C: AsyncRead + AsyncWrite + Unpin>(io: &mut ClientIo<C>) -> Result<(), Gone> {
    if io.out.is_empty() {
        io.fill().await
    } else {
        io.flush().await
    }
}

/// The next message of a pinned client's idle server connection (never, with none).
async fn pinned_message(
    server: Option<&mut Pooled>,
) -> Result<(u8, bytes::Bytes), crate::server::ServerError> {
    match server {
        Some(s) => s.read_message().await,
        None => std::future::pending().await,
    }
}

/// The next delivery of the client's subscription (never, with none).
async fn next_delivery(sub: Option<&mut Subscription>) -> Delivery {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Writes a delivered notification to the client's output; `false` when the client must be
/// closed (its queue overflowed).
fn take_delivery<C>(io: &mut ClientIo<C>, listen: &mut Option<Subscription>, d: Delivery) -> bool {
    match d {
        Delivery::Notification(body) => {
            crate::proto::frame::write_message(&mut io.out, b'A', |o| o.extend_from_slice(&body));
            true
        }
        Delivery::Overflowed => false,
        Delivery::HubGone => {
            *listen = None;
            true
        }
    }
}

/// The error that closes a client whose notification queue overflowed.
fn overflowed() -> ClientError {
    ClientError::NotificationsOverflow(crate::notify::MAX_QUEUED_BYTES)
}

/// What `take_listen_request` found.
enum Taken {
    /// A LISTEN / UNLISTEN for the hub (consumed).
    Listen(listen_request::Request),
    /// Something else, left for the relay.
    Other,
    /// The rest of the request did not come within `client_idle_timeout`.
    IdleTimeout,
}

/// Takes the client's next request if it is a `LISTEN` / `UNLISTEN` the hub serves (it is
/// then consumed); anything else is left for the relay. The rest of a request that may be
/// one is awaited until `idle_until`, as an idle client is.
async fn take_listen_request<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    idle_until: Option<Instant>,
) -> Result<Taken, Gone> {
    loop {
        match listen_request::find(&io.inbuf) {
            Found::No => return Ok(Taken::Other),
            Found::Request(r) => {
                bytes::Buf::advance(&mut io.inbuf, r.len);
                return Ok(Taken::Listen(r));
            }
            Found::Partial => match idle_until {
                None => io.fill().await?,
                Some(at) => match tokio::time::timeout_at(at, io.fill()).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(Taken::IdleTimeout),
                },
            },
        }
    }
}

/// Serves a client's LISTEN / UNLISTEN through its database's hub and answers it.
async fn answer_listen<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    s: &mut LoggedIn,
    listen: &mut Option<Subscription>,
    req: listen_request::Request,
) -> Result<(), Gone> {
    let done = match req.cmd {
        ListenCommand::Listen(channel) => subscribe(s, listen, channel).await.map(|_| "LISTEN"),
        ListenCommand::Unlisten(channel) => {
            if let Some(sub) = listen.as_mut() {
                sub.unlisten(channel.as_deref());
            }
            Ok("UNLISTEN")
        }
    };
    let err;
    let result = match done {
        Ok(tag) => Ok(tag),
        Err(e) => {
            tracing::info!(pool = %s.pool.key, error = %e, "LISTEN failed");
            err = ClientError::from(e).to_pg_error(Severity::Error);
            Err(&err)
        }
    };
    listen_request::answer(&mut io.out, req.form, result, b'I');
    if listen.as_ref().is_some_and(|l| !l.listening()) {
        *listen = None;
    }
    io.flush().await
}

/// Serves a LISTEN the relay took from inside a transaction block: the hub listens at once
/// (so nothing notified before the client's COMMIT is lost); the block's end decides whether
/// the channel stays (`settle_listens`). A failure fails the block, raised by the backend.
async fn listen_in_block<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    s: &mut LoggedIn,
    listen: &mut Option<Subscription>,
    server: &mut Pooled,
    req: listen_request::Request,
    block_added: &mut Vec<String>,
) {
    let ListenCommand::Listen(channel) = req.cmd.clone() else {
        return;
    };
    match subscribe(s, listen, channel.clone()).await {
        Ok(added) => {
            if added {
                block_added.push(channel.clone());
            }
            crate::relay::answer_listen(io, &mut s.view, &req, channel);
        }
        Err(e) => {
            tracing::info!(pool = %s.pool.key, error = %e, "LISTEN failed");
            let err = ClientError::from(e).to_pg_error(Severity::Error);
            crate::relay::refuse_listen(io, &mut s.view, server, &req, &err);
        }
    }
}

/// Applies to the client's subscription what its transaction did to its LISTENs: DISCARD
/// ALL and UNLISTEN that ran on a server connection (in a block, among other statements, or
/// while pinned) end channels; LISTENs the hub served inside the block stay if the block
/// committed them, and end otherwise.
fn settle_listens(view: &mut SessionView, listen: &mut Option<Subscription>, block_added: &mut Vec<String>) {
    let changes = std::mem::take(&mut view.listen_changes);
    if std::mem::take(&mut view.discarded_all) {
        *listen = None;
    }
    let Some(sub) = listen.as_mut() else {
        block_added.clear();
        return;
    };
    let ended: Vec<String> = if changes.all_ended {
        sub.channels()
            .filter(|c| !changes.listen.contains(*c))
            .cloned()
            .collect()
    } else {
        let rolled_back = block_added.iter().filter(|c| !changes.listen.contains(*c));
        changes.unlisten.iter().chain(rolled_back).cloned().collect()
    };
    block_added.clear();
    for channel in ended {
        sub.unlisten(Some(&channel));
    }
    if !sub.listening() {
        *listen = None;
    }
}

/// Subscribes the client to `channel` through its database's hub (starting its
/// subscription if needed); `Ok(true)` if it was not listening there before.
async fn subscribe(
    s: &LoggedIn,
    listen: &mut Option<Subscription>,
    channel: String,
) -> Result<bool, crate::notify::ListenError> {
    if listen.is_none() {
        *listen = s.listeners.subscribe(&s.pool);
    }
    match listen.as_mut() {
        Some(sub) => sub.listen(channel).await,
        None => Err(crate::notify::ListenError::HubGone),
    }
}

/// Passes what an idle pinned server connection sent on to the client: a notification, a
/// notice or a parameter report. Anything else (its FATAL, its end) means the connection is
/// gone: `Err` with why.
async fn pass_on_idle_message<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    m: Result<(u8, bytes::Bytes), crate::server::ServerError>,
) -> Result<Result<(), String>, Gone> {
    match m {
        Ok((tag @ (b'A' | b'N' | b'S'), body)) => {
            crate::proto::frame::write_message(&mut io.out, tag, |o| o.extend_from_slice(&body));
            io.flush().await?;
            Ok(Ok(()))
        }
        Ok((b'E', body)) => Ok(Err(
            PgError::parse(&body).map_or_else(|e| e.to_string(), |e| e.to_string())
        )),
        Ok((tag, _)) => Ok(Err(format!(
            "unexpected message {:?} from an idle backend",
            char::from(tag)
        ))),
        Err(e) => Ok(Err(e.to_string())),
    }
}

/// After a transaction in transaction mode: whether the client keeps its server connection.
/// Probes the backend's session state first when the transaction may have changed it.
/// `Err`: the connection failed (the transaction itself had completed).
async fn settle_pins(server: &mut Pooled, view: &mut SessionView) -> Result<bool, String> {
    let probe = view.pins.needs_probe();
    view.pins.transaction_ended();
    let probed = if probe {
        match tokio::time::timeout(RESET_LIMIT, server.query_text(PROBE_QUERY)).await {
            Ok(Ok(answer)) => {
                match parse_probe(answer.as_deref()) {
                    Some(bits) => view.pins.probed(bits),
                    None => view.pins.probe_failed(),
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer to the session probe within {}",
                fmt_duration(RESET_LIMIT)
            )),
        }
    } else {
        Ok(())
    };
    // Keeps or gives back the client's place among its pool's pinned clients.
    view.pins.settled();
    probed.map(|()| view.pins.pinned())
}

/// A client with session state on its server connection is gone: the connection is reset
/// (`DISCARD ALL` drops temporary tables, advisory locks, cursors, prepared statements and
/// LISTENs) and goes back to the pool; closed instead if the reset fails or a library was
/// loaded into the backend.
async fn finish_pinned(server: Pooled, pins: &Pins) {
    if pins.must_close() {
        server.discard();
    } else {
        reset_and_release(server, &["DISCARD ALL"]).await;
    }
}

/// Answers a request that could not reach a server: ERROR, then the client's messages up to the
/// end of the request are consumed (as the backend skips to Sync after an error), then
/// ReadyForQuery.
async fn fail_request<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    e: &PgError,
    status: u8,
) -> Result<(), Gone> {
    e.write_error(&mut io.out);
    let tag = match parse_header(&io.inbuf, io.max_body) {
        Ok(Some(h)) => h.tag,
        Ok(None) | Err(_) => return io.flush().await,
    };
    if matches!(tag, b'Q' | b'F' | b'S') {
        discard_message(io).await?;
        backend::ready_for_query(&mut io.out, status);
        return io.flush().await;
    }
    io.flush().await?;
    skip_to_sync(io, status).await
}

/// Drops client messages through the next Sync, then sends ReadyForQuery.
async fn skip_to_sync<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    status: u8,
) -> Result<(), Gone> {
    loop {
        let tag = loop {
            match parse_header(&io.inbuf, io.max_body) {
                Err(e) => return fatal(io, ClientError::Protocol(e)).await.and(Err(Gone)),
                Ok(Some(h)) => break h.tag,
                Ok(None) => io.fill().await?,
            }
        };
        if tag == b'X' {
            return Err(Gone);
        }
        discard_message(io).await?;
        if tag == b'S' {
            backend::ready_for_query(&mut io.out, status);
            return io.flush().await;
        }
    }
}

/// Drops the client message at the front of `inbuf`, streaming past a large body.
async fn discard_message<C: AsyncRead + AsyncWrite + Unpin>(io: &mut ClientIo<C>) -> Result<(), Gone> {
    let total = match parse_header(&io.inbuf, io.max_body) {
        Ok(Some(h)) => h.total_len(),
        Ok(None) | Err(_) => return Ok(()),
    };
    skip_bytes(io, total).await
}

async fn skip_bytes<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    mut n: usize,
) -> Result<(), Gone> {
    while n > 0 {
        if io.inbuf.is_empty() {
            io.fill().await?;
        }
        let k = n.min(io.inbuf.len());
        bytes::Buf::advance(&mut io.inbuf, k);
        n -= k;
    }
    Ok(())
}

/// Sends a FATAL to a client that may not be reading (it was idle), for at most a second: the
/// server connection it held must not wait on it.
async fn fatal_within<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    e: ClientError,
) -> Result<(), Gone> {
    tokio::time::timeout(FATAL_FLUSH_LIMIT, fatal(io, e))
        .await
        .unwrap_or(Err(Gone))
}

/// Sends a FATAL and ends the session.
async fn fatal<C: AsyncRead + AsyncWrite + Unpin>(io: &mut ClientIo<C>, e: ClientError) -> Result<(), Gone> {
    tracing::info!(error = %e, "closing client connection");
    e.to_pg_error(Severity::Fatal).write_error(&mut io.out);
    io.flush().await
}
