//! Why a server connection could not be opened or used.

use crate::auth::AuthError;
use crate::proto::backend::PgError;
use crate::proto::ProtoError;

/// A failure talking to the backend.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TCP/Unix connect or I/O failed.
    #[error("cannot reach backend {addr}: {source}")]
    Io {
        /// Backend address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `server_connect_timeout` passed during connect + login.
    #[error("timed out connecting to backend {addr} after {after}")]
    ConnectTimeout {
        /// Backend address.
        addr: String,
        /// The timeout, formatted.
        after: String,
    },
    /// The backend answered the login with an error (wrong password, starting up, too many
    /// clients, unknown database, ...).
    #[error("backend refused login: {0}")]
    LoginRefused(PgError),
    /// The backend asked for an authentication method the proxy cannot answer.
    #[error("backend asks for {0}, which pgsluice cannot answer with the credentials it has")]
    AuthUnsupported(String),
    /// SCRAM with the backend failed on our side.
    #[error("SCRAM with the backend failed: {0}")]
    Scram(#[source] AuthError),
    /// The backend sent something malformed.
    #[error("protocol error from backend: {0}")]
    Protocol(#[source] ProtoError),
    /// The backend sent a message that makes no sense at this point.
    #[error("unexpected message {0:?} from backend")]
    Unexpected(char),
    /// The backend closed the connection.
    #[error("backend closed the connection")]
    Closed,
    /// A FATAL error on an established connection.
    #[error("backend connection failed: {0}")]
    Fatal(PgError),
}

impl From<ProtoError> for ServerError {
    fn from(e: ProtoError) -> Self {
        ServerError::Protocol(e)
    }
}
