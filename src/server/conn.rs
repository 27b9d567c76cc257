//! One logged-in server connection and everything the proxy tracks about it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{ServerError, ServerStream};
use crate::config::Backend;
use crate::prepared::PreparedCache;
use crate::proto::backend::{parse_parameter_status, PgError};
use crate::proto::frame::whole_message;
use crate::proto::frontend;
use crate::settings::{settings_sql, Replayable, Settings};

/// ParameterStatus values a backend reported, by name.
pub type ServerParams = BTreeMap<String, String>;

/// Largest message the proxy reads whole from a server on its own behalf (login, its own
/// queries). The relay streams everything else and never needs this.
const MAX_OWN_MESSAGE: usize = 16 * 1024 * 1024;

/// Cancel requests forwarded to a server connection's backend that have not finished: the
/// connection stays out of the pool until no late cancel can hit another client.
pub type CancelGate = crate::sync::InFlight;

/// A server connection, owned by whoever is using it (a client task, or the pool's idle list).
#[derive(Debug)]
pub struct ServerConn {
    /// The socket.
    pub stream: ServerStream,
    /// Bytes read from the server and not yet consumed; kept to reuse its allocation.
    pub rbuf: BytesMut,
    /// Scratch buffer for what the proxy writes itself.
    pub wbuf: BytesMut,
    /// Current ParameterStatus values.
    pub params: ServerParams,
    /// ParameterStatus values as they were right after login.
    pub login_params: Arc<ServerParams>,
    /// The backend's own BackendKeyData (pid, secret).
    pub backend_key: (u32, u32),
    /// Settings the proxy knows are set on top of the login state (lowercased names).
    /// Compared with a client's settings at checkout.
    pub applied: Settings,
    /// Settings whose value on this connection is unknown (changed, then rolled back, by a
    /// client): always re-applied or reset at the next checkout.
    pub stale: BTreeSet<String>,
    /// Prepared statements this connection holds.
    pub prepared: PreparedCache,
    /// Where the backend is (for cancel requests); shared, so handing it around never allocates.
    pub backend: Arc<Backend>,
    /// Process-unique id, for logs.
    pub id: u64,
    /// When it last went back to the pool.
    pub last_used: Instant,
    /// When the pool retires it (`server_lifetime`, with jitter); checked when idle.
    pub retire_at: Option<Instant>,
    /// The pool's backend generation it belongs to: connections from before a backend
    /// failure are retired instead of reused.
    pub generation: u64,
    /// The pool's suspicion level when this connection last proved alive (see
    /// `Pool::suspect_idle`).
    pub checked_at: u64,
    /// Cancels forwarded to this connection's backend process.
    pub cancel_gate: Arc<CancelGate>,
    /// The settings a client may change and the proxy may therefore replay (`pg_settings`
    /// minus the `internal` ones), read once per pool and backend instance. A reported
    /// parameter outside it (`is_superuser`, `server_version`, `session_authorization`, …) is
    /// never replayed.
    pub replayable: Arc<Replayable>,
}

impl ServerConn {
    /// Reads one whole message for the proxy's own use: (tag, body).
    pub async fn read_message(&mut self) -> Result<(u8, Bytes), ServerError> {
        loop {
            if let Some(w) = whole_message(&self.rbuf, MAX_OWN_MESSAGE)? {
                let tag = w.tag;
                let mut msg = self.rbuf.split_to(w.total);
                let body = msg.split_off(crate::proto::frame::HEADER_LEN).freeze();
                return Ok((tag, body));
            }
            self.rbuf.reserve(8192);
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(ServerError::Closed);
            }
        }
    }

    /// Writes and flushes `wbuf`.
    pub async fn flush_wbuf(&mut self) -> Result<(), ServerError> {
        let buf = self.wbuf.split();
        self.stream.write_all(&buf).await.map_err(|e| self.io(e))?;
        Ok(())
    }

    /// Best-effort Terminate before the socket is dropped, so the backend logs a clean exit.
    /// Never waits: a full socket buffer just means the backend sees EOF instead.
    pub fn terminate_nowait(&mut self) {
        let msg = [b'X', 0, 0, 0, 4];
        let _ = match &self.stream {
            ServerStream::Tcp(s) => s.try_write(&msg),
            ServerStream::Unix(s) => s.try_write(&msg),
        };
    }

    fn io(&self, source: std::io::Error) -> ServerError {
        ServerError::Io {
            addr: self.backend.to_string(),
            source,
        }
    }

    /// Runs a simple query for the proxy itself, discarding rows. Returns the backend's ERROR,
    /// if any (the connection is still usable then); a FATAL or I/O failure is `Err`.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Option<PgError>, ServerError> {
        self.run_query(sql).await.map(|(error, _)| error)
    }

    /// Runs a one-value query for the proxy itself: the first column of the first row as
    /// text (`None` for no row or NULL). A backend ERROR is `None` too: this is for facts the
    /// proxy can do without.
    pub async fn query_text(&mut self, sql: &str) -> Result<Option<String>, ServerError> {
        self.run_query(sql).await.map(|(_, value)| value)
    }

    /// Runs a simple query to its ReadyForQuery: (the first ERROR, the first row's first
    /// column). A FATAL or I/O failure is `Err`; COPY is refused.
    async fn run_query(&mut self, sql: &str) -> Result<(Option<PgError>, Option<String>), ServerError> {
        frontend::query(&mut self.wbuf, sql);
        self.flush_wbuf().await?;
        let mut first_error = None;
        let mut value = None;
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'Z' => return Ok((first_error, value)),
                b'S' => {
                    let (name, v) = parse_parameter_status(&body)?;
                    self.params.insert(name, v);
                }
                b'E' => {
                    let err = PgError::parse(&body)?;
                    if err.is_fatal() {
                        return Err(ServerError::Fatal(err));
                    }
                    first_error.get_or_insert(err);
                }
                b'D' if value.is_none() => {
                    let mut r = crate::proto::Reader::new(&body);
                    if r.i16("column count")? > 0 {
                        if let Ok(len) = usize::try_from(r.i32("column length")?) {
                            value = Some(String::from_utf8_lossy(r.bytes(len, "column")?).into_owned());
                        }
                    }
                }
                b'G' | b'H' | b'W' => return Err(ServerError::Unexpected(char::from(tag))),
                // Other rows, command tags, notices: nothing to keep.
                _ => {}
            }
        }
    }

    /// Whether the connection already has exactly `wanted` applied (no round trip needed).
    pub fn settings_in_sync(&self, wanted: &Settings) -> bool {
        self.stale.is_empty() && &self.applied == wanted
    }

    /// Brings the connection's settings to `wanted`, in one round trip, only when they differ
    /// from what is applied. On success `applied == wanted`. A backend ERROR (an invalid value)
    /// is returned and nothing is applied: the statements run as one implicit transaction.
    pub async fn sync_settings(&mut self, wanted: &Settings) -> Result<Option<PgError>, ServerError> {
        if self.settings_in_sync(wanted) {
            return Ok(None);
        }
        let sql = settings_sql(&self.applied, &self.stale, wanted);
        if !sql.is_empty() {
            if let Some(err) = self.simple_query(&sql).await? {
                return Ok(Some(err));
            }
        }
        self.applied.clone_from(wanted);
        self.stale.clear();
        Ok(None)
    }

    /// Brings the connection back to its login settings (`SET SESSION AUTHORIZATION DEFAULT`,
    /// which also resets the role, then `RESET ALL`), keeping its prepared statements: what
    /// the proxy does when the backend refused a client's settings. A backend ERROR is
    /// returned and nothing is known to be applied then.
    pub async fn reset_session(&mut self) -> Result<Option<PgError>, ServerError> {
        let err = self
            .simple_query("SET SESSION AUTHORIZATION DEFAULT; RESET ALL")
            .await?;
        if err.is_none() {
            self.applied.clear();
            self.stale.clear();
        }
        Ok(err)
    }

    /// The backend ran DISCARD ALL (the session-mode reset, a cleanup, or a client's own):
    /// its session is back at its login state, with no settings applied and no statements.
    pub fn discarded(&mut self) {
        self.applied.clear();
        self.stale.clear();
        self.prepared.clear();
    }
}
