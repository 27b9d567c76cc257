//! The hub of one database: a task owning the listener server connection. It LISTENs on the
//! union of its subscribers' channels, UNLISTENs a channel when its last subscriber leaves,
//! hands every NotificationResponse to each subscriber of its channel, and after losing the
//! connection (a backend restart) logs in again and LISTENs anew. Notifications sent while
//! it was down are lost, as for a client that reconnects.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{notification_channel, ListenError, Sink};
use crate::client::ClientError;
use crate::pool::{Pool, Pooled};
use crate::proto::backend::{PgError, Severity};
use crate::server::ServerError;
use crate::sync::until;

/// How long one attempt to get the listener connection may wait, when the pool has no
/// `query_wait_timeout`.
const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// Pause after a failed attempt, while subscribers remain.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Bound on one LISTEN/UNLISTEN round trip.
const QUERY_LIMIT: Duration = Duration::from_secs(10);

/// What a subscriber asks of the hub.
pub(super) enum Cmd {
    /// Subscribe a client to a channel; its `ack` once the listener listens there.
    Listen(Waiting),
    /// Unsubscribe `sub` from `channel`, or from all (`None`).
    Unlisten { sub: u64, channel: Option<String> },
    /// `sub` is gone.
    Leave { sub: u64 },
}

/// A client's LISTEN, until the hub has served it.
pub(super) struct Waiting {
    pub(super) sub: u64,
    pub(super) channel: String,
    pub(super) sink: Sink,
    pub(super) ack: oneshot::Sender<Result<(), ListenError>>,
}

struct Hub {
    pool: Arc<Pool>,
    conn: Option<Pooled>,
    /// Channel → its subscribers (an empty set: UNLISTEN pending).
    channels: HashMap<String, HashSet<u64>>,
    /// Subscriber → its queue and channels.
    subs: HashMap<u64, (Sink, HashSet<String>)>,
    /// LISTENs waiting for the connection.
    waiting: Vec<Waiting>,
    /// When to try for a connection again.
    retry_at: Option<Instant>,
}

/// Runs the hub of `pool`'s database until every subscriber and the registry have let go.
pub(super) async fn run(pool: Arc<Pool>, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let mut hub = Hub {
        pool,
        conn: None,
        channels: HashMap::new(),
        subs: HashMap::new(),
        waiting: Vec::new(),
        retry_at: None,
    };
    loop {
        let wants_connection = !hub.waiting.is_empty() || !hub.channels.is_empty();
        let connect_at =
            (hub.conn.is_none() && wants_connection).then(|| hub.retry_at.unwrap_or_else(Instant::now));
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => hub.apply(cmd).await,
                None => break,
            },
            m = next_message(&mut hub.conn) => hub.on_message(m),
            () = until(connect_at), if connect_at.is_some() => hub.connect().await,
        }
        hub.prune().await;
    }
    if let Some(conn) = hub.conn.take() {
        conn.discard();
    }
}

async fn next_message(conn: &mut Option<Pooled>) -> Result<(u8, Bytes), ServerError> {
    match conn {
        Some(c) => c.read_message().await,
        None => std::future::pending().await,
    }
}

/// `name` as a quoted identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Hub {
    async fn apply(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Listen(w) => self.serve(w).await,
            Cmd::Unlisten { sub, channel } => self.remove(sub, channel.as_deref()),
            Cmd::Leave { sub } => {
                self.remove(sub, None);
                self.subs.remove(&sub);
            }
        }
    }

    /// Subscribes a LISTEN: at once to a channel the connection listens on, after a LISTEN
    /// round trip to a new one, or once there is a connection.
    async fn serve(&mut self, w: Waiting) {
        if self.conn.is_none() {
            self.waiting.push(w);
        } else if self.channels.contains_key(&w.channel) {
            self.add(w.sub, w.channel, w.sink);
            let _ = w.ack.send(Ok(()));
        } else {
            self.listen_new(w).await;
        }
    }

    /// LISTENs on a channel nobody listens on yet, then subscribes the waiter.
    async fn listen_new(&mut self, w: Waiting) {
        match self.query(&format!("LISTEN {}", quote_ident(&w.channel))).await {
            Ok(None) => {
                self.add(w.sub, w.channel, w.sink);
                let _ = w.ack.send(Ok(()));
            }
            Ok(Some(e)) => {
                let _ = w.ack.send(Err(ListenError::Refused(e)));
            }
            // Lost: it waits for the next connection.
            Err(()) => self.waiting.push(w),
        }
    }

    fn add(&mut self, sub: u64, channel: String, sink: Sink) {
        self.channels.entry(channel.clone()).or_default().insert(sub);
        self.subs
            .entry(sub)
            .or_insert_with(|| (sink, HashSet::new()))
            .1
            .insert(channel);
    }

    /// Unsubscribes `sub` from `channel` (or all); channels left without subscribers are
    /// UNLISTENed by `prune`.
    fn remove(&mut self, sub: u64, channel: Option<&str>) {
        self.waiting
            .retain(|w| w.sub != sub || channel.is_some_and(|c| c != w.channel));
        let Some((_, chans)) = self.subs.get_mut(&sub) else {
            return;
        };
        let gone: Vec<String> = match channel {
            Some(c) => chans.take(c).into_iter().collect(),
            None => chans.drain().collect(),
        };
        for c in gone {
            if let Some(s) = self.channels.get_mut(&c) {
                s.remove(&sub);
            }
        }
    }

    /// UNLISTENs channels nobody listens on; closes the connection when none is left.
    async fn prune(&mut self) {
        let empty: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, s)| s.is_empty())
            .map(|(c, _)| c.clone())
            .collect();
        for c in empty {
            self.channels.remove(&c);
            if self.conn.is_some() {
                // A refusal cannot leave it listening; a loss ends the connection anyway.
                let _ = self.query(&format!("UNLISTEN {}", quote_ident(&c))).await;
            }
        }
        if self.channels.is_empty() && self.waiting.is_empty() {
            self.retry_at = None;
            if let Some(conn) = self.conn.take() {
                tracing::debug!(pool = %self.pool.key, "no channel left: listener connection closed");
                conn.discard();
            }
        }
    }

    /// Gets the listener connection, LISTENs on every subscribed channel, then serves the
    /// waiting LISTENs. On failure the waiting LISTENs get the error, and the hub tries again
    /// after a pause while subscribers remain.
    async fn connect(&mut self) {
        let wait = self.pool.settings.query_wait_timeout.unwrap_or(CONNECT_WAIT);
        match self.pool.checkout(Some(Instant::now() + wait)).await {
            Ok(conn) => {
                self.retry_at = None;
                self.conn = Some(conn);
                if !self.channels.is_empty() {
                    let sql: Vec<String> = self
                        .channels
                        .keys()
                        .map(|c| format!("LISTEN {};", quote_ident(c)))
                        .collect();
                    match self.query(&sql.concat()).await {
                        Ok(None) => {
                            tracing::info!(pool = %self.pool.key, channels = self.channels.len(), "listener connection back; listening again (notifications sent meanwhile are lost)");
                        }
                        Ok(Some(e)) => {
                            tracing::warn!(pool = %self.pool.key, error = %e, "listener connection could not listen again");
                        }
                        Err(()) => return,
                    }
                }
                for w in std::mem::take(&mut self.waiting) {
                    self.serve(w).await;
                }
            }
            Err(e) => {
                tracing::warn!(pool = %self.pool.key, error = %e, "no listener connection for LISTEN");
                let err = ClientError::Checkout(e).to_pg_error(Severity::Error);
                for w in self.waiting.drain(..) {
                    let _ = w.ack.send(Err(ListenError::Refused(err.clone())));
                }
                self.retry_at = Some(Instant::now() + RETRY_PAUSE);
            }
        }
    }

    /// A message from the idle listener connection.
    fn on_message(&mut self, m: Result<(u8, Bytes), ServerError>) {
        let why = match m {
            Ok((b'A', body)) => {
                self.dispatch(&body);
                return;
            }
            Ok((b'N' | b'S', _)) => return,
            Ok((b'E', body)) => PgError::parse(&body).map_or_else(|e| e.to_string(), |e| e.to_string()),
            Ok((tag, _)) => format!("unexpected message {:?}", char::from(tag)),
            Err(e) => e.to_string(),
        };
        self.lost(&why, None);
    }

    /// Hands a notification to each subscriber of its channel; one whose queue overflows is
    /// dropped (its client is closed when it looks).
    fn dispatch(&mut self, body: &Bytes) {
        let Some(channel) = notification_channel(body) else {
            return;
        };
        let Some(subs) = self.channels.get(channel) else {
            return;
        };
        let mut overflowed = Vec::new();
        for sub in subs {
            if let Some((sink, _)) = self.subs.get(sub) {
                if !sink.push(body) {
                    overflowed.push(*sub);
                }
            }
        }
        for sub in overflowed {
            tracing::warn!(pool = %self.pool.key, "a client's undelivered notifications passed the cap; closing it");
            self.remove(sub, None);
            self.subs.remove(&sub);
        }
    }

    fn lost(&mut self, why: &str, err: Option<&PgError>) {
        tracing::warn!(pool = %self.pool.key, error = why, "listener connection lost; logging in again");
        if let Some(conn) = self.conn.take() {
            conn.failed(err);
        }
        self.retry_at = None;
    }

    /// One LISTEN/UNLISTEN round trip on the connection, delivering notifications that
    /// arrive meanwhile. `Ok(Some)`: the backend's ERROR; `Err`: the connection was lost.
    async fn query(&mut self, sql: &str) -> Result<Option<PgError>, ()> {
        let Some(mut conn) = self.conn.take() else {
            return Err(());
        };
        let r = tokio::time::timeout(QUERY_LIMIT, self.round_trip(&mut conn, sql)).await;
        match r {
            Ok(Ok(e)) => {
                self.conn = Some(conn);
                Ok(e)
            }
            Ok(Err((why, err))) => {
                self.conn = Some(conn);
                self.lost(&why, err.as_ref());
                Err(())
            }
            Err(_) => {
                conn.discard();
                self.lost("no answer to LISTEN in time", None);
                Err(())
            }
        }
    }

    async fn round_trip(
        &mut self,
        conn: &mut Pooled,
        sql: &str,
    ) -> Result<Option<PgError>, (String, Option<PgError>)> {
        crate::proto::frontend::query(&mut conn.wbuf, sql);
        conn.flush_wbuf().await.map_err(|e| (e.to_string(), None))?;
        let mut first = None;
        loop {
            let (tag, body) = conn.read_message().await.map_err(|e| (e.to_string(), None))?;
            match tag {
                b'Z' => return Ok(first),
                b'A' => self.dispatch(&body),
                b'E' => {
                    let e = PgError::parse(&body).map_err(|e| (e.to_string(), None))?;
                    if e.is_fatal() {
                        return Err((e.to_string(), Some(e)));
                    }
                    first.get_or_insert(e);
                }
                b'C' | b'N' | b'S' => {}
                t => return Err((format!("unexpected message {:?}", char::from(t)), None)),
            }
        }
    }
}
