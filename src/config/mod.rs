//! Configuration: the TOML model, validation that reports *every* problem at once, and the
//! resolved, immutable snapshot (`Config`) the rest of the proxy reads.
//!
//! A `Config` is shared as `Arc<Config>` and never mutated, so a reload can build a new one and
//! swap it in. This module opens no sockets and keeps no statics.

pub mod duration;
pub mod model;
mod resolve;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use model::{AuthMethod, LogFormat, PoolMode, RawConfig, RawShared, SessionState};

use crate::auth::secret::{ScramVerifier, Secret};

/// Why a config could not be loaded: every problem found, not just the first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse into the model (syntax, unknown key, wrong type).
    #[error("{0}")]
    Parse(String),
    /// The model parsed but some values cannot work together.
    #[error("{} configuration problem(s):\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Where a database's backend lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// TCP `host:port`.
    Tcp {
        /// Host name or IP.
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix socket `dir/.s.PGSQL.port`.
    Unix {
        /// Socket directory.
        dir: PathBuf,
        /// Port (part of the socket file name).
        port: u16,
    },
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Tcp { host, port } => write!(f, "{host}:{port}"),
            Backend::Unix { dir, port } => write!(f, "{}/.s.PGSQL.{port}", dir.display()),
        }
    }
}

/// A database clients may name in their startup packet.
#[derive(Debug, Clone)]
pub struct Database {
    /// Name clients use.
    pub name: String,
    /// Where the backend is.
    pub backend: Backend,
    /// Database name on the backend.
    pub dbname: String,
    /// Hard cap on server connections to it, all pools together (its slots); `None`: only
    /// the pool sizes cap it.
    pub max_db_connections: Option<u32>,
    /// New server connections opened at once.
    pub server_connect_concurrency: u32,
    /// Backend credentials forced for every client of this database.
    pub server_credentials: Option<(String, String)>,
    /// The user the notification hub's listener connection logs in as (`None`: its first
    /// subscriber's).
    pub listen_user: Option<String>,
    /// Pool settings this database overrides.
    pub shared: RawShared,
}

/// A group of users sharing limits and a share of each database's slots. A user without a
/// `tenant` key forms a tenant of its own, named after it, with the default share.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// Its name (a user's name for a user's own tenant).
    pub name: String,
    /// Declared in `[tenants.NAME]` (false: a user's own tenant).
    pub declared: bool,
    /// Slots of each database guaranteed while it has clients waiting.
    pub min_server_conn: u32,
    /// Most slots of each database it may hold (`None`: no cap of its own).
    pub max_server_conn: Option<u32>,
    /// Share of the slots between the guaranteed minimums.
    pub weight: u32,
    /// Clients that may wait for a server connection at once (`None`: no cap).
    pub max_queue: Option<u32>,
    /// Client connections of its users together (`None`: no cap of its own).
    pub max_client_conn: Option<u32>,
    /// Its clients pinned at once across its pools (`None`: no cap of its own).
    pub max_pinned: Option<u32>,
    /// Pool settings this tenant overrides.
    pub shared: RawShared,
}

/// A user allowed to connect.
#[derive(Debug, Clone)]
pub struct User {
    /// User name.
    pub name: String,
    /// How the client authenticates.
    pub auth: AuthMethod,
    /// The configured secret (absent only with `trust`).
    pub secret: Option<Secret>,
    /// SCRAM verifier used to check clients: the configured one, or derived from a plaintext
    /// password once at load time (PBKDF2 is too expensive to run per login).
    pub scram: Option<ScramVerifier>,
    /// Plaintext password usable to log in to the backend, if any.
    pub server_password: Option<String>,
    /// Its tenant.
    pub tenant: Arc<Tenant>,
    /// Client connections of this user (`None`: no cap of its own).
    pub max_client_conn: Option<u32>,
    /// Pool settings this user overrides.
    pub shared: RawShared,
}

/// How one (database, user) pool behaves, resolved with precedence
/// user > tenant > database > global.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// Maximum server connections.
    pub pool_size: u32,
    /// Transaction or session pooling.
    pub pool_mode: PoolMode,
    /// Transaction mode: what becomes of statements that leave session state.
    pub session_state: SessionState,
    /// Server connections kept open even when idle.
    pub min_pool_size: u32,
    /// Extra connections allowed once a client waited `reserve_pool_timeout`.
    pub reserve_pool_size: u32,
    /// Wait after which the reserve may be used.
    pub reserve_pool_timeout: Option<Duration>,
    /// Bound on waiting for a server connection.
    pub query_wait_timeout: Option<Duration>,
    /// Wait after which a queued client gets a NOTICE.
    pub query_wait_notify: Option<Duration>,
    /// Bound on client startup + authentication.
    pub client_login_timeout: Option<Duration>,
    /// Idle client (outside a transaction) disconnected after this (57P05).
    pub client_idle_timeout: Option<Duration>,
    /// A pinned client idle this long is disconnected (transaction mode).
    pub pinned_idle_timeout: Option<Duration>,
    /// Clients of the pool pinned at once (`None`: no cap).
    pub max_pinned: Option<u32>,
    /// Client idle inside a transaction disconnected after this (25P03).
    pub idle_transaction_timeout: Option<Duration>,
    /// Query cancelled after this; its server connection closed if it does not stop.
    pub query_timeout: Option<Duration>,
    /// Bound on connect + login to the backend.
    pub server_connect_timeout: Option<Duration>,
    /// Idle server connections above `min_pool_size` closed after this.
    pub server_idle_timeout: Option<Duration>,
    /// Server connections retired (when idle) after about this.
    pub server_lifetime: Option<Duration>,
    /// Idle time after which a connection is checked with a round trip before handout.
    pub server_check_delay: Option<Duration>,
}

impl PoolSettings {
    /// The built-in defaults (overridden by the global keys, then the scopes).
    pub fn builtin() -> PoolSettings {
        use model::defaults as d;
        PoolSettings {
            pool_size: d::DEFAULT_POOL_SIZE,
            pool_mode: d::POOL_MODE,
            session_state: d::SESSION_STATE,
            min_pool_size: d::MIN_POOL_SIZE,
            reserve_pool_size: d::RESERVE_POOL_SIZE,
            reserve_pool_timeout: d::RESERVE_POOL_TIMEOUT,
            query_wait_timeout: d::QUERY_WAIT_TIMEOUT,
            query_wait_notify: d::QUERY_WAIT_NOTIFY,
            client_login_timeout: d::CLIENT_LOGIN_TIMEOUT,
            client_idle_timeout: d::CLIENT_IDLE_TIMEOUT,
            pinned_idle_timeout: d::PINNED_IDLE_TIMEOUT,
            max_pinned: None,
            idle_transaction_timeout: d::IDLE_TRANSACTION_TIMEOUT,
            query_timeout: d::QUERY_TIMEOUT,
            server_connect_timeout: d::SERVER_CONNECT_TIMEOUT,
            server_idle_timeout: d::SERVER_IDLE_TIMEOUT,
            server_lifetime: d::SERVER_LIFETIME,
            server_check_delay: d::SERVER_CHECK_DELAY,
        }
    }

    /// These (global) settings with the scopes of the (db, user) pool laid over them:
    /// user > tenant > database > global.
    pub fn for_pool(&self, db: &Database, user: &User) -> PoolSettings {
        self.overlay(&db.shared)
            .overlay(&user.tenant.shared)
            .overlay(&user.shared)
    }

    /// These settings with what one scope sets laid over them.
    pub fn overlay(&self, o: &RawShared) -> PoolSettings {
        PoolSettings {
            pool_size: o.pool_size.unwrap_or(self.pool_size),
            pool_mode: o.pool_mode.unwrap_or(self.pool_mode),
            session_state: o.session_state.unwrap_or(self.session_state),
            min_pool_size: o.min_pool_size.unwrap_or(self.min_pool_size),
            reserve_pool_size: o.reserve_pool_size.unwrap_or(self.reserve_pool_size),
            reserve_pool_timeout: o.reserve_pool_timeout.unwrap_or(self.reserve_pool_timeout),
            query_wait_timeout: o.query_wait_timeout.unwrap_or(self.query_wait_timeout),
            query_wait_notify: o.query_wait_notify.unwrap_or(self.query_wait_notify),
            client_login_timeout: o.client_login_timeout.unwrap_or(self.client_login_timeout),
            client_idle_timeout: o.client_idle_timeout.unwrap_or(self.client_idle_timeout),
            pinned_idle_timeout: o.pinned_idle_timeout.unwrap_or(self.pinned_idle_timeout),
            max_pinned: o.max_pinned.or(self.max_pinned),
            idle_transaction_timeout: o
                .idle_transaction_timeout
                .unwrap_or(self.idle_transaction_timeout),
            query_timeout: o.query_timeout.unwrap_or(self.query_timeout),
            server_connect_timeout: o.server_connect_timeout.unwrap_or(self.server_connect_timeout),
            server_idle_timeout: o.server_idle_timeout.unwrap_or(self.server_idle_timeout),
            server_lifetime: o.server_lifetime.unwrap_or(self.server_lifetime),
            server_check_delay: o.server_check_delay.unwrap_or(self.server_check_delay),
        }
    }
}

/// The resolved configuration snapshot.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where clients connect.
    pub listen_addr: SocketAddr,
    /// Where the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`) listens, if anywhere.
    pub metrics_listen_addr: Option<SocketAddr>,
    /// Whether metrics carry a `user` label.
    pub metrics_user_label: bool,
    /// Bound on a graceful stop (`None`: wait for every client).
    pub shutdown_timeout: Option<std::time::Duration>,
    /// How log lines are written.
    pub log_format: model::LogFormat,
    /// Cap on client connections.
    pub max_client_conn: u32,
    /// Largest client message accepted.
    pub max_packet_size: u32,
    /// Named prepared statements kept per server connection; 0 disables tracking.
    pub max_prepared_statements: u32,
    /// Session-mode reset query; empty means none.
    pub server_reset_query: String,
    /// Default client authentication method (also used for unknown users).
    pub auth_type: AuthMethod,
    /// The global pool settings (built-in defaults with the global keys applied).
    pub defaults: PoolSettings,
    /// Databases by client-facing name.
    pub databases: BTreeMap<String, Arc<Database>>,
    /// Declared tenants by name (users' own tenants hang off the users).
    pub tenants: BTreeMap<String, Arc<Tenant>>,
    /// Users by name.
    pub users: BTreeMap<String, Arc<User>>,
    /// Non-fatal observations for `--check` (e.g. pools that need a client present to log in).
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        resolve::resolve(raw)
    }

    /// Pool behaviour for (database, user): user > tenant > database > global.
    pub fn pool_settings(&self, db: &Database, user: &User) -> PoolSettings {
        self.defaults.for_pool(db, user)
    }
}
