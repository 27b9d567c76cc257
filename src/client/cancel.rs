//! Cancel routing: clients get proxy-issued BackendKeyData; a CancelRequest carrying one is
//! forwarded, with the server's own key, to the backend currently running that client's query.
//! Nothing is sent when the client holds no server connection, so a late cancel never reaches
//! another client's query; and the server connection stays out of the pool until the cancel
//! connection to the postmaster has closed (see `CancelGate`). The client's cancel socket is
//! closed only then too, as PostgreSQL's own is: a driver that waits for that close before its
//! next query (asyncpg does) never has that query hit by its own late cancel. A client still
//! queued for a server connection is taken out of the queue instead (57014).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use subtle::ConstantTimeEq;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::server::{CancelTarget, ServerConn};
use crate::sync::lock;

/// A client's cancel state, behind its own lock: attach/detach on every transaction touch
/// only this, never the registry's map. While the client is queued for a server connection,
/// a cancel ends its wait instead.
#[derive(Debug, Default)]
struct SlotState {
    target: Mutex<Option<CancelTarget>>,
    waiting: AtomicBool,
    cancelled: AtomicBool,
    wake: Notify,
}

type Slot = Arc<SlotState>;
#[derive(Debug)]
struct Entry {
    secret: u32,
    slot: Slot,
}

/// All live clients' cancel keys. Owned by the app, shared with every client task.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    entries: Mutex<HashMap<u32, Entry>>,
}

impl CancelRegistry {
    /// Issues a fresh (pid, secret) for a client.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let mut entries = lock(&self.entries);
        loop {
            let pid = rand::random::<u32>() & 0x7fff_ffff;
            if pid == 0 || entries.contains_key(&pid) {
                continue;
            }
            let secret = rand::random::<u32>();
            let slot = Slot::default();
            entries.insert(
                pid,
                Entry {
                    secret,
                    slot: slot.clone(),
                },
            );
            return CancelHandle {
                registry: self.clone(),
                pid,
                secret,
                slot,
            };
        }
    }

    /// Handles a CancelRequest: forwards it if the key matches a client that is running
    /// something. Unknown keys are ignored, as PostgreSQL does. The forward runs in its own
    /// task, so a client that closes its cancel socket at once still gets its query cancelled;
    /// the returned handle resolves once the postmaster has taken the forwarded request
    /// (`None`: nothing was forwarded, the cancel is already dealt with).
    pub fn cancel(&self, pid: u32, secret: u32) -> Option<JoinHandle<()>> {
        let slot = {
            let entries = lock(&self.entries);
            match entries.get(&pid) {
                Some(e) if bool::from(e.secret.ct_eq(&secret)) => e.slot.clone(),
                _ => {
                    tracing::debug!(pid, "cancel request with an unknown key; ignored");
                    return None;
                }
            }
        };
        let target = lock(&slot.target).clone();
        match target {
            Some(t) => return Some(t.send()),
            None if slot.waiting.load(Ordering::Acquire) => {
                slot.cancelled.store(true, Ordering::Release);
                slot.wake.notify_waiters();
            }
            None => tracing::debug!(pid, "cancel request for no running query; ignored"),
        }
        None
    }

    /// Number of registered clients.
    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    /// Whether no client is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A client's registration; removed on drop.
#[derive(Debug)]
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    /// Proxy-issued pid.
    pub pid: u32,
    /// Proxy-issued secret.
    pub secret: u32,
    slot: Slot,
}

impl CancelHandle {
    /// The client now runs on `server`: cancels go there.
    pub fn attach(&self, server: &ServerConn) {
        *lock(&self.slot.target) = Some(CancelTarget::of(server));
    }

    /// The client holds no server: cancels are ignored.
    pub fn detach(&self) {
        *lock(&self.slot.target) = None;
    }

    /// The client is queued for a server connection: a cancel now ends the wait.
    pub fn begin_wait(&self) {
        self.slot.cancelled.store(false, Ordering::Release);
        self.slot.waiting.store(true, Ordering::Release);
    }

    /// The wait is over (served or not): later cancels go to the query, if any.
    pub fn end_wait(&self) {
        self.slot.waiting.store(false, Ordering::Release);
        self.slot.cancelled.store(false, Ordering::Release);
    }

    /// Resolves when a cancel arrives during the wait.
    pub async fn cancelled(&self) {
        loop {
            let woken = self.slot.wake.notified();
            if self.slot.cancelled.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        lock(&self.registry.entries).remove(&self.pid);
    }
}
