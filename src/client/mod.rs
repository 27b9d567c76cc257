//! One task per client: handshake (startup, auth, login), then the session loop that waits for
//! a server connection and relays. This is the one place where errors become ErrorResponses.

mod authenticate;
pub mod cancel;
mod error;
mod handshake;
mod io;
mod login;
mod restore;
mod session;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

pub use cancel::CancelRegistry;
pub use error::ClientError;

use crate::pool::Pools;

/// What every client task shares: pools, cancel keys, and the key for fake SCRAM verifiers.
#[derive(Debug)]
pub struct ClientContext {
    /// Pools of the current config snapshot.
    pub pools: Arc<Pools>,
    /// Proxy-issued cancel keys.
    pub cancels: Arc<CancelRegistry>,
    /// The notification hubs (LISTEN in transaction mode).
    pub listeners: Arc<crate::notify::Listeners>,
    /// Random per process; makes unknown users' fake SCRAM salts unpredictable.
    pub proxy_secret: [u8; 32],
    /// The proxy's stop signals.
    pub shutdown: crate::shutdown::Shutdown,
    /// The proxy's state and its counters outside any pool.
    pub state: Arc<crate::metrics::ProxyState>,
}

/// Serves one client connection to the end. `admitted` is false when `max_client_conn` is
/// reached: the client then gets 53300 after its startup packet.
pub async fn serve<C: AsyncRead + AsyncWrite + Unpin>(stream: C, ctx: Arc<ClientContext>, admitted: bool) {
    let max_body = usize::try_from(ctx.pools.config().max_packet_size).unwrap_or(usize::MAX);
    let mut io = io::client_io(stream, max_body);
    let accepted = tokio::time::Instant::now();
    let session = match handshake::handshake(&mut io, &ctx, admitted).await {
        Ok(handshake::Opened::Session(s)) => s,
        Ok(handshake::Opened::Done) | Err(io::Gone) => return,
    };
    let pool = session.pool.clone();
    pool.timings.login.observe(accepted.elapsed());
    let _connected = crate::pool::Gauged::new(&pool, |s| &s.clients);
    if session::run(&mut io, *session).await.is_err() {
        tracing::debug!(pool = %pool.key, "client connection closed");
    }
}
