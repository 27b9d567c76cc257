//! Every failure a client can see, and the ONE mapping from it to an ErrorResponse with a
//! precise SQLSTATE. The match is exhaustive on purpose: a new variant must choose its code.

use std::time::Duration;

use crate::config::duration::fmt_duration;
use crate::notify::ListenError;
use crate::pool::CheckoutError;
use crate::proto::backend::{PgError, Severity};
use crate::proto::sqlstate as code;
use crate::proto::ProtoError;
use crate::server::ServerError;

/// A failure to report to the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Malformed or oversized message.
    #[error("{0}")]
    Protocol(#[from] ProtoError),
    /// Protocol major version other than 3.
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol {
        /// Requested major version.
        major: u16,
        /// Requested minor version.
        minor: u16,
    },
    /// A replication connection was requested.
    #[error("replication connections are not supported")]
    Replication,
    /// The startup packet named no user.
    #[error("no user name in startup packet")]
    NoUser,
    /// A startup `options` value pgsluice cannot apply.
    #[error("{0}")]
    BadOptions(String),
    /// Wrong password or unknown user (the same answer, on purpose).
    #[error("password authentication failed for user {0:?}")]
    AuthFailed(String),
    /// The client did not follow the authentication exchange.
    #[error("authentication exchange broken: {0}")]
    AuthProtocol(String),
    /// No such database in the config (reported only after authentication).
    #[error("database {0:?} does not exist")]
    UnknownDatabase(String),
    /// `max_client_conn` reached.
    #[error("too many client connections (max_client_conn = {0})")]
    TooManyClients(u32),
    /// The tenant's `max_client_conn` reached.
    #[error("too many client connections for tenant {tenant} (max_client_conn = {max})")]
    TenantClients {
        /// The tenant.
        tenant: String,
        /// Its cap.
        max: u32,
    },
    /// The user's `max_client_conn` reached.
    #[error("too many client connections for user {user:?} (max_client_conn = {max})")]
    UserClients {
        /// The user.
        user: String,
        /// Its cap.
        max: u32,
    },
    /// A CancelRequest arrived while the client was queued for a server connection.
    #[error("canceling statement due to user request (while waiting for a server connection)")]
    WaitCanceled,
    /// `client_idle_timeout` passed with the client idle.
    #[error("terminating connection due to idle-session timeout (client_idle_timeout = {})", fmt_duration(*.0))]
    IdleTimeout(Duration),
    /// `pinned_idle_timeout` passed with a pinned client idle.
    #[error("terminating connection due to idle-session timeout while holding a pinned server connection for its {state} (pinned_idle_timeout = {})", fmt_duration(*.limit))]
    PinnedIdleTimeout {
        /// The limit.
        limit: Duration,
        /// What the client held.
        state: String,
    },
    /// `idle_transaction_timeout` passed with the client idle inside a transaction.
    #[error("terminating connection due to idle-in-transaction timeout (idle_transaction_timeout = {})", fmt_duration(*.0))]
    IdleInTransaction(Duration),
    /// `query_timeout` passed and the query did not stop after its cancel: its server
    /// connection was closed.
    #[error("canceling statement due to query_timeout ({}): the query did not stop after a cancel, so its server connection was closed", fmt_duration(*.0))]
    QueryTimeout(Duration),
    /// `client_login_timeout` passed.
    #[error("login timed out")]
    LoginTimeout(Duration),
    /// No server connection could be had.
    #[error("{0}")]
    Checkout(#[from] CheckoutError),
    /// The backend refused a session setting (reported at login with its own error).
    #[error("{0}")]
    Setting(PgError),
    /// The backend refused some of the client's session settings on two server connections:
    /// they were dropped from its session (each with the backend's error).
    #[error("{}", settings_dropped(.0))]
    SettingsDropped(Vec<(String, PgError)>),
    /// The server connection of a pinned client broke: the session state it held is gone.
    #[error("server connection lost, and with it this session's {0}")]
    PinnedServerLost(String),
    /// The server connection broke while serving this client, with nothing sent by the backend.
    #[error("server connection lost")]
    ServerLost,
    /// A LISTEN failed.
    #[error("{0}")]
    Listen(#[from] crate::notify::ListenError),
    /// The client's undelivered notifications passed the cap.
    #[error("terminating connection: more than {} bytes of notifications waited for this client (it does not read them)", .0)]
    NotificationsOverflow(usize),
    /// The proxy is stopping: no new logins.
    #[error("pgsluice is shutting down: it accepts no new connections")]
    ShuttingDown,
    /// The proxy is stopping: the client's session ends (at its transaction boundary, or at
    /// `shutdown_timeout`).
    #[error("terminating connection due to administrator command")]
    Terminated,
    /// A request inside a transaction block that was lost with its server connection.
    #[error("current transaction is aborted, commands ignored until end of transaction block (its server connection was lost)")]
    TransactionAborted,
}

impl ClientError {
    /// Why a login failed, as the metrics label it (`metrics::LOGIN_FAILURES`).
    pub fn login_failure(&self) -> &'static str {
        match self {
            ClientError::AuthFailed(_) => "auth",
            ClientError::AuthProtocol(_) => "auth_protocol",
            ClientError::UnknownDatabase(_) => "unknown_database",
            ClientError::TooManyClients(_)
            | ClientError::TenantClients { .. }
            | ClientError::UserClients { .. } => "client_limit",
            ClientError::LoginTimeout(_) => "timeout",
            ClientError::Protocol(_)
            | ClientError::UnsupportedProtocol { .. }
            | ClientError::NoUser
            | ClientError::BadOptions(_)
            | ClientError::Replication => "protocol",
            ClientError::ShuttingDown => "shutting_down",
            _ => "server",
        }
    }

    /// The ErrorResponse for this failure.
    pub fn to_pg_error(&self, severity: Severity) -> PgError {
        let msg = self.to_string();
        match self {
            ClientError::Protocol(ProtoError::TooLarge { .. }) => {
                PgError::new(severity, code::PROGRAM_LIMIT_EXCEEDED, msg).with_hint("raise max_packet_size")
            }
            ClientError::Protocol(
                ProtoError::BadLength(_) | ProtoError::Truncated(_) | ProtoError::Invalid(_),
            ) => PgError::new(severity, code::PROTOCOL_VIOLATION, msg),
            ClientError::UnsupportedProtocol { .. } => PgError::new(
                severity,
                code::FEATURE_NOT_SUPPORTED,
                format!("{msg}: server supports 3.0 to 3.0"),
            ),
            ClientError::Replication => PgError::new(severity, code::FEATURE_NOT_SUPPORTED, msg),
            ClientError::NoUser => PgError::new(severity, code::INVALID_AUTHORIZATION, msg),
            ClientError::BadOptions(_) => PgError::new(severity, code::FEATURE_NOT_SUPPORTED, msg),
            ClientError::AuthFailed(_) => PgError::new(severity, code::INVALID_PASSWORD, msg),
            ClientError::AuthProtocol(_) => PgError::new(severity, code::PROTOCOL_VIOLATION, msg),
            ClientError::UnknownDatabase(_) => PgError::new(severity, code::INVALID_CATALOG_NAME, msg),
            ClientError::TooManyClients(_) => PgError::new(severity, code::TOO_MANY_CONNECTIONS, msg),
            ClientError::LoginTimeout(d) => PgError::new(
                severity,
                code::QUERY_CANCELED,
                format!(
                    "canceling authentication due to timeout (client_login_timeout = {})",
                    fmt_duration(*d)
                ),
            ),
            ClientError::TenantClients { .. } | ClientError::UserClients { .. } => {
                PgError::new(severity, code::TOO_MANY_CONNECTIONS, msg)
            }
            ClientError::WaitCanceled | ClientError::QueryTimeout(_) => {
                PgError::new(severity, code::QUERY_CANCELED, msg)
            }
            ClientError::ShuttingDown => PgError::new(severity, code::CANNOT_CONNECT_NOW, msg),
            ClientError::Terminated => PgError::new(severity, code::ADMIN_SHUTDOWN, msg),
            ClientError::IdleTimeout(_) | ClientError::PinnedIdleTimeout { .. } => {
                PgError::new(severity, code::IDLE_SESSION_TIMEOUT, msg)
            }
            ClientError::IdleInTransaction(_) => {
                PgError::new(severity, code::IDLE_IN_TRANSACTION_TIMEOUT, msg)
            }
            ClientError::Checkout(CheckoutError::WaitTimeout { .. } | CheckoutError::QueueFull { .. }) => {
                PgError::new(severity, code::TOO_MANY_CONNECTIONS, msg)
            }
            ClientError::Checkout(CheckoutError::BackendDown { code, .. }) => {
                PgError::new(severity, code, msg)
            }
            ClientError::Checkout(CheckoutError::Connect { pool, source }) => match source {
                // The backend's own answer (e.g. 28P01 from a wrong server_password, 3D000, 57P03)
                // keeps its code; the message says it came from the backend.
                ServerError::LoginRefused(e) => PgError::new(
                    severity,
                    e.code(),
                    format!("backend refused login for pool {pool}: {}", e.message()),
                ),
                ServerError::Fatal(e) => PgError::new(severity, e.code(), e.message().to_string()),
                ServerError::ConnectTimeout { .. }
                | ServerError::Io { .. }
                | ServerError::Closed
                | ServerError::Protocol(_)
                | ServerError::Unexpected(_) => PgError::new(severity, code::CONNECTION_FAILURE, msg),
                ServerError::AuthUnsupported(_) | ServerError::Scram(_) => {
                    PgError::new(severity, code::INVALID_AUTHORIZATION, msg)
                }
            },
            ClientError::Setting(e) => e.clone().with_severity(severity),
            ClientError::SettingsDropped(dropped) => match dropped.first() {
                Some((_, e)) => PgError::new(severity, e.code(), msg),
                None => PgError::new(severity, code::INTERNAL_ERROR, msg),
            },
            ClientError::ServerLost | ClientError::PinnedServerLost(_) => {
                PgError::new(severity, code::CONNECTION_FAILURE, msg)
            }
            ClientError::TransactionAborted => PgError::new(severity, code::IN_FAILED_SQL_TRANSACTION, msg),
            ClientError::Listen(ListenError::TooManyChannels(_)) | ClientError::NotificationsOverflow(_) => {
                PgError::new(severity, code::PROGRAM_LIMIT_EXCEEDED, msg)
            }
            ClientError::Listen(ListenError::Refused(e)) => e.clone().with_severity(severity),
            ClientError::Listen(ListenError::HubGone) => {
                PgError::new(severity, code::CONNECTION_FAILURE, msg)
            }
        }
    }
}

/// "could not restore setting "role" on a server connection (role "x" does not exist); it is
/// no longer part of this session".
fn settings_dropped(dropped: &[(String, PgError)]) -> String {
    let list: Vec<String> = dropped
        .iter()
        .map(|(name, e)| format!("\"{name}\" ({})", e.message()))
        .collect();
    let (noun, pronoun) = if dropped.len() == 1 {
        ("setting", "it is")
    } else {
        ("settings", "they are")
    };
    format!(
        "could not restore {noun} {} on a server connection; {pronoun} no longer part of this session",
        list.join(", ")
    )
}
