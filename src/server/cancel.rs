//! Sending a CancelRequest for the query a server connection is running: a separate
//! connection to the postmaster with the backend's own key. Used for a client's cancel
//! (routed by the proxy-issued key) and for `query_timeout`. The connection's `CancelGate`
//! keeps it out of the pool until the cancel has been delivered.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::task::JoinHandle;

use super::{CancelGate, ServerConn};
use crate::config::Backend;
use crate::proto::frontend;

/// Bound on the whole forwarded cancel (connect, send, wait for the postmaster to close).
const CANCEL_FORWARD_LIMIT: Duration = Duration::from_secs(10);

/// Where to send a cancel for one server connection's running query.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    backend: Arc<Backend>,
    pid: u32,
    secret: u32,
    gate: Arc<CancelGate>,
}

impl CancelTarget {
    /// The target for `server`'s current query.
    pub fn of(server: &ServerConn) -> CancelTarget {
        CancelTarget {
            backend: server.backend.clone(),
            pid: server.backend_key.0,
            secret: server.backend_key.1,
            gate: server.cancel_gate.clone(),
        }
    }

    /// Sends the cancel in its own task (a client that closes its cancel socket at once still
    /// gets its query cancelled); the gate is held until it is delivered or fails. The handle
    /// resolves at the same moment, for a caller that reports delivery (dropping it does not
    /// stop the task).
    pub fn send(self) -> JoinHandle<()> {
        self.gate.begin();
        tokio::spawn(async move {
            if tokio::time::timeout(CANCEL_FORWARD_LIMIT, forward(&self))
                .await
                .is_err()
            {
                tracing::warn!(backend = %self.backend, "forwarding a cancel request timed out");
            }
            self.gate.end();
        })
    }
}

async fn forward(t: &CancelTarget) {
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
