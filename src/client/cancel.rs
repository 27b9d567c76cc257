//! Cancel routing: clients get proxy-issued BackendKeyData; a CancelRequest carrying one is
//! forwarded, with the server's own key, to the backend currently running that client's query.
//! Nothing is sent when the client holds no server connection, so a late cancel never reaches
//! another client's query; and the server connection stays out of the pool until the cancel
//! connection to the postmaster has closed (see `CancelGate`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::config::Backend;
use crate::proto::frontend;
use crate::server::{CancelGate, ServerConn};

/// Bound on the whole forwarded cancel (connect, send, wait for the postmaster to close).
const CANCEL_FORWARD_LIMIT: Duration = Duration::from_secs(10);

/// Where a client's query is running right now.
#[derive(Debug, Clone)]
struct Target {
    backend: Arc<Backend>,
    pid: u32,
    secret: u32,
    gate: Arc<CancelGate>,
}

/// A client's current target, behind its own lock: attach/detach on every transaction touch
/// only this, never the registry's map.
type Slot = Arc<Mutex<Option<Target>>>;

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    /// task, so a client that closes its cancel socket at once still gets its query cancelled.
    pub fn cancel(&self, pid: u32, secret: u32) {
        let target = {
            let entries = lock(&self.entries);
            match entries.get(&pid) {
                Some(e) if bool::from(e.secret.ct_eq(&secret)) => lock(&e.slot).clone(),
                _ => None,
            }
        };
        let Some(t) = target else {
            tracing::debug!(pid, "cancel request for no running query; ignored");
            return;
        };
        t.gate.begin();
        tokio::spawn(async move {
            if tokio::time::timeout(CANCEL_FORWARD_LIMIT, forward(&t))
                .await
                .is_err()
            {
                tracing::warn!(backend = %t.backend, "forwarding a cancel request timed out");
            }
            t.gate.end();
        });
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

async fn forward(t: &Target) {
    let mut msg = BytesMut::with_capacity(16);
    frontend::cancel_request(&mut msg, t.pid, t.secret);
    let result = match &*t.backend {
        Backend::Tcp { host, port } => match TcpStream::connect((host.as_str(), *port)).await {
            Ok(mut s) => send_and_wait_close(&mut s, &msg).await,
            Err(e) => Err(e),
        },
        Backend::Unix { dir, port } => {
            match UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await {
                Ok(mut s) => send_and_wait_close(&mut s, &msg).await,
                Err(e) => Err(e),
            }
        }
    };
    if let Err(e) = result {
        tracing::warn!(backend = %t.backend, error = %e, "could not forward a cancel request");
    }
}

async fn send_and_wait_close<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &[u8],
) -> std::io::Result<()> {
    s.write_all(msg).await?;
    // The postmaster closes the connection once it has signalled the backend.
    let mut sink = [0u8; 64];
    while s.read(&mut sink).await? > 0 {}
    Ok(())
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
        let target = Target {
            backend: server.backend.clone(),
            pid: server.backend_key.0,
            secret: server.backend_key.1,
            gate: server.cancel_gate.clone(),
        };
        *lock(&self.slot) = Some(target);
    }

    /// The client holds no server: cancels are ignored.
    pub fn detach(&self) {
        *lock(&self.slot) = None;
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        lock(&self.registry.entries).remove(&self.pid);
    }
}
