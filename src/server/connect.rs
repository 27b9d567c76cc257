//! Opening a server connection: socket, StartupMessage, authentication, ParameterStatus and
//! BackendKeyData, all bounded by `server_connect_timeout`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use super::conn::{CancelGate, ServerConn};
use super::{login, ServerError, ServerStream};
use crate::config::duration::fmt_duration;
use crate::config::Backend;

/// How the proxy proves itself to the backend.
#[derive(Clone)]
pub enum LoginCredentials {
    /// A plaintext password (answers SCRAM, md5 and cleartext).
    Password(String),
    /// SCRAM pass-through: the ClientKey recovered from a client's proof and the verifier's
    /// ServerKey. Answers SCRAM only.
    ScramKeys {
        /// ClientKey.
        client_key: [u8; 32],
        /// ServerKey.
        server_key: [u8; 32],
    },
    /// The user's stored md5 hash (`md5` + hex): answers an md5 challenge only.
    Md5Hash(String),
    /// Nothing: works only where the backend trusts us.
    None,
}

impl std::fmt::Debug for LoginCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoginCredentials::Password(_) => "Password(..)",
            LoginCredentials::ScramKeys { .. } => "ScramKeys(..)",
            LoginCredentials::Md5Hash(_) => "Md5Hash(..)",
            LoginCredentials::None => "None",
        })
    }
}

/// Everything needed to open a server connection for one pool.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    /// Where the backend is.
    pub backend: Arc<Backend>,
    /// Database name on the backend.
    pub dbname: String,
    /// Role to log in as.
    pub user: String,
    /// Prepared statements each connection keeps (0: not tracked).
    pub max_prepared: usize,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Connects and logs in, bounded by `timeout`.
pub async fn connect(
    target: &ServerTarget,
    creds: &LoginCredentials,
    timeout: Option<Duration>,
) -> Result<ServerConn, ServerError> {
    let attempt = connect_unbounded(target, creds);
    match timeout {
        None => attempt.await,
        Some(t) => tokio::time::timeout(t, attempt).await.unwrap_or_else(|_| {
            Err(ServerError::ConnectTimeout {
                addr: target.backend.to_string(),
                after: fmt_duration(t),
            })
        }),
    }
}

async fn connect_unbounded(
    target: &ServerTarget,
    creds: &LoginCredentials,
) -> Result<ServerConn, ServerError> {
    let io = |source| ServerError::Io {
        addr: target.backend.to_string(),
        source,
    };
    let stream = match &*target.backend {
        Backend::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await.map_err(io)?;
            s.set_nodelay(true).map_err(io)?;
            ServerStream::Tcp(s)
        }
        Backend::Unix { dir, port } => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            ServerStream::Unix(UnixStream::connect(path).await.map_err(io)?)
        }
    };
    let mut conn = ServerConn {
        stream,
        rbuf: BytesMut::with_capacity(16 * 1024),
        wbuf: BytesMut::with_capacity(1024),
        params: BTreeMap::new(),
        login_params: Arc::default(),
        backend_key: (0, 0),
        applied: BTreeMap::new(),
        stale: Default::default(),
        prepared: crate::prepared::PreparedCache::new(target.max_prepared),
        backend: target.backend.clone(),
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        last_used: Instant::now(),
        retire_at: None,
        generation: 0,
        checked_at: 0,
        cancel_gate: Arc::new(CancelGate::default()),
        replayable: Arc::default(),
    };
    login::login(&mut conn, target, creds).await?;
    conn.login_params = Arc::new(conn.params.clone());
    Ok(conn)
}
