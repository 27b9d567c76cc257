//! LISTEN/NOTIFY in transaction mode without pinning: one listener server connection per
//! database (`hub.rs`), owned by the proxy, LISTENs on the union of the channels its clients
//! want; each client's `Subscription` receives the notifications of its channels through a
//! bounded queue, and the session loop delivers them while the client is idle outside a
//! transaction block.
//!
//! Bounds: a client has at most `MAX_CHANNELS` channels and one LISTEN in flight (it waits
//! for the hub's answer), so the hub's command queue holds at most a few commands per
//! client; a client's undelivered notifications are capped at `MAX_QUEUED_BYTES`, past which
//! it is closed with 54000.

mod hub;
pub mod request;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::pool::{Pool, Pools};
use crate::proto::backend::PgError;
use crate::sync::lock;

/// Channels one client may listen on at once.
pub const MAX_CHANNELS: usize = 4096;
/// Notification bytes waiting for one client, at most (PostgreSQL's payloads are below 8 kB:
/// some 500 of the largest, or tens of thousands of typical job ids).
pub const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;

/// Why a client's LISTEN failed (its SQLSTATE is chosen in `client/error.rs`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ListenError {
    /// The client listens on `MAX_CHANNELS` channels already.
    #[error("too many channels: a client of pgsluice may listen on at most {0} at once")]
    TooManyChannels(usize),
    /// The listener connection could not be had, or its backend refused the LISTEN.
    #[error("{0}")]
    Refused(PgError),
    /// The hub is gone (the proxy is stopping).
    #[error("the proxy's notification listener is shutting down")]
    HubGone,
}

/// The notification hubs of one config snapshot, one per database, started on first LISTEN.
#[derive(Debug)]
pub struct Listeners {
    pools: Arc<Pools>,
    hubs: Mutex<BTreeMap<String, Arc<Hub>>>,
}

/// A running hub: how clients reach its task.
#[derive(Debug)]
struct Hub {
    tx: mpsc::UnboundedSender<hub::Cmd>,
    next_id: AtomicU64,
}

impl Listeners {
    /// No hub yet.
    pub fn new(pools: Arc<Pools>) -> Listeners {
        Listeners {
            pools,
            hubs: Mutex::new(BTreeMap::new()),
        }
    }

    /// A subscription (listening on nothing yet) for a client of `pool`. The database's hub
    /// is started if needed; its listener connection logs in as the database's
    /// `listen_user`, or else as `pool`'s user, the first subscriber's. `None` if the pool's
    /// database or user is not in the config.
    pub fn subscribe(&self, pool: &Arc<Pool>) -> Option<Subscription> {
        let hub = {
            let mut hubs = lock(&self.hubs);
            match hubs.get(&pool.key.database) {
                Some(h) => h.clone(),
                None => {
                    let config = self.pools.config();
                    let db = config.databases.get(&pool.key.database)?;
                    let listener = match &db.listen_user {
                        // The configured listen_user: its own credentials (and the SCRAM
                        // keys its pool learned, if a client of it logged in).
                        Some(name) if *name != pool.key.user => {
                            let user = config.users.get(name)?;
                            let own = self.pools.get(db, user);
                            self.pools.dedicated(db, user, &own)
                        }
                        _ => {
                            let user = config.users.get(&pool.key.user)?;
                            self.pools.dedicated(db, user, pool)
                        }
                    };
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(hub::run(listener, rx));
                    let h = Arc::new(Hub {
                        tx,
                        next_id: AtomicU64::new(1),
                    });
                    hubs.insert(pool.key.database.clone(), h.clone());
                    h
                }
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue::default());
        Some(Subscription {
            id: hub.next_id.fetch_add(1, Ordering::Relaxed),
            hub,
            sink: Sink {
                tx,
                queue: queue.clone(),
            },
            rx,
            queue,
            channels: HashSet::new(),
        })
    }

    /// Stops the hubs: each ends, closing its listener connection, once its last
    /// subscriber has left.
    pub fn stop(&self) {
        lock(&self.hubs).clear();
    }
}

/// What a subscriber's queue holds beyond the notifications: its size and whether it
/// overflowed.
#[derive(Debug, Default)]
struct Queue {
    bytes: AtomicUsize,
    overflowed: AtomicBool,
}

/// The hub's end of a subscriber's queue.
#[derive(Debug, Clone)]
struct Sink {
    tx: mpsc::UnboundedSender<Bytes>,
    queue: Arc<Queue>,
}

impl Sink {
    /// Queues one NotificationResponse body; `false` if that overflows the queue (it is then
    /// marked overflowed, and nothing more is queued). A subscriber that is gone already
    /// (its `Leave` on the way) takes nothing.
    fn push(&self, body: &Bytes) -> bool {
        let before = self.queue.bytes.fetch_add(body.len(), Ordering::AcqRel);
        if before + body.len() > MAX_QUEUED_BYTES {
            self.queue.overflowed.store(true, Ordering::Release);
            return false;
        }
        let _ = self.tx.send(body.clone());
        true
    }
}

/// What a subscriber receives next.
#[derive(Debug)]
pub enum Delivery {
    /// A NotificationResponse body (notifying backend's pid, channel, payload).
    Notification(Bytes),
    /// More than `MAX_QUEUED_BYTES` waited for the client: it must be closed.
    Overflowed,
    /// The hub is gone (the proxy is stopping).
    HubGone,
}

/// One client's LISTENs through its database's hub. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    id: u64,
    sink: Sink,
    rx: mpsc::UnboundedReceiver<Bytes>,
    queue: Arc<Queue>,
    /// The channels the client listens on, as it sees them: notifications of others (an
    /// UNLISTEN racing them) are not delivered.
    channels: HashSet<String>,
}

impl Subscription {
    /// Subscribes to `channel`; returns once the listener connection's LISTEN has committed
    /// (at once if it listens there already): `true` if the client did not listen there
    /// before. The error is the client's answer.
    pub async fn listen(&mut self, channel: String) -> Result<bool, ListenError> {
        if self.channels.contains(&channel) {
            return Ok(false);
        }
        if self.channels.len() >= MAX_CHANNELS {
            return Err(ListenError::TooManyChannels(MAX_CHANNELS));
        }
        let (ack, answer) = oneshot::channel();
        let cmd = hub::Cmd::Listen(hub::Waiting {
            sub: self.id,
            channel: channel.clone(),
            sink: self.sink.clone(),
            ack,
        });
        if self.hub.tx.send(cmd).is_err() {
            return Err(ListenError::HubGone);
        }
        answer.await.unwrap_or(Err(ListenError::HubGone))?;
        self.channels.insert(channel);
        Ok(true)
    }

    /// Unsubscribes from `channel`, or from every channel (`None`). Nothing of it is delivered
    /// from now on.
    pub fn unlisten(&mut self, channel: Option<&str>) {
        let removed = match channel {
            Some(c) => self.channels.remove(c),
            None => {
                let any = !self.channels.is_empty();
                self.channels.clear();
                any
            }
        };
        if removed {
            let _ = self.hub.tx.send(hub::Cmd::Unlisten {
                sub: self.id,
                channel: channel.map(str::to_string),
            });
        }
    }

    /// The channels the client listens on.
    pub fn channels(&self) -> impl Iterator<Item = &String> {
        self.channels.iter()
    }

    /// Whether the client listens on anything.
    pub fn listening(&self) -> bool {
        !self.channels.is_empty()
    }

    /// Whether its queue overflowed (the client must be closed).
    pub fn overflowed(&self) -> bool {
        self.queue.overflowed.load(Ordering::Acquire)
    }

    /// The next delivery, waiting for one.
    pub async fn next(&mut self) -> Delivery {
        loop {
            if self.queue.overflowed.load(Ordering::Acquire) {
                return Delivery::Overflowed;
            }
            let Some(body) = self.rx.recv().await else {
                return Delivery::HubGone;
            };
            if let Some(d) = self.accept(body) {
                return d;
            }
        }
    }

    /// The next delivery if one is waiting.
    pub fn try_next(&mut self) -> Option<Delivery> {
        loop {
            if self.queue.overflowed.load(Ordering::Acquire) {
                return Some(Delivery::Overflowed);
            }
            let body = self.rx.try_recv().ok()?;
            if let Some(d) = self.accept(body) {
                return Some(d);
            }
        }
    }

    /// A queued notification, if its channel is still one of the client's.
    fn accept(&mut self, body: Bytes) -> Option<Delivery> {
        self.queue.bytes.fetch_sub(body.len(), Ordering::AcqRel);
        let channel = notification_channel(&body)?;
        self.channels
            .contains(channel)
            .then_some(Delivery::Notification(body))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.hub.tx.send(hub::Cmd::Leave { sub: self.id });
    }
}

/// The channel of a NotificationResponse body.
fn notification_channel(body: &[u8]) -> Option<&str> {
    let mut r = crate::proto::Reader::new(body);
    r.i32("pid").ok()?;
    std::str::from_utf8(r.cstr("channel").ok()?).ok()
}
