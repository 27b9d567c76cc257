//! Accepting client connections: bind, accept with backoff on errors (e.g. out of
//! descriptors), count clients against `max_client_conn`, spawn one task per client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::client::{self, ClientContext};

/// Counts connected clients; the slot is given back when the guard drops.
#[derive(Debug, Default)]
pub struct ClientCount {
    current: AtomicU32,
    /// Woken when the last client leaves.
    none_left: tokio::sync::Notify,
}

impl ClientCount {
    /// Clients connected now.
    pub fn get(&self) -> u32 {
        self.current.load(Ordering::Relaxed)
    }

    /// Returns once no client is connected.
    pub async fn all_gone(&self) {
        loop {
            let woken = self.none_left.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.current.load(Ordering::Acquire) == 0 {
                return;
            }
            woken.await;
        }
    }
}

struct Slot(Arc<ClientCount>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.current.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

/// Accepts until `stop` turns true.
pub async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ClientContext>,
    clients: Arc<ClientCount>,
    mut stop: watch::Receiver<bool>,
) {
    let max = ctx.pools.config().max_client_conn;
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let (stream, peer): (_, SocketAddr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        let _ = stream.set_nodelay(true);
        let admitted = clients.current.fetch_add(1, Ordering::Relaxed) < max;
        let slot = Slot(clients.clone());
        let ctx = ctx.clone();
        let span = tracing::debug_span!("client", %peer);
        tokio::spawn(
            async move {
                client::serve(stream, ctx, admitted).await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}
