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

pub use model::{AuthMethod, PoolMode, RawConfig};

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
    /// Pool size override.
    pub pool_size: Option<u32>,
    /// Pool mode override.
    pub pool_mode: Option<PoolMode>,
    /// Backend credentials forced for every client of this database.
    pub server_credentials: Option<(String, String)>,
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
    /// Pool size override.
    pub pool_size: Option<u32>,
    /// Pool mode override.
    pub pool_mode: Option<PoolMode>,
}

/// How one (database, user) pool behaves, resolved with precedence user > database > global.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// Maximum server connections.
    pub pool_size: u32,
    /// Transaction or session pooling.
    pub pool_mode: PoolMode,
}

/// The resolved configuration snapshot.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where clients connect.
    pub listen_addr: SocketAddr,
    /// Cap on client connections.
    pub max_client_conn: u32,
    /// Largest client message accepted.
    pub max_packet_size: u32,
    /// Named prepared statements kept per server connection; 0 disables tracking.
    pub max_prepared_statements: u32,
    /// Bound on connect + login to the backend.
    pub server_connect_timeout: Option<Duration>,
    /// Idle time after which a server connection is checked with a round trip before reuse.
    pub server_check_delay: Option<Duration>,
    /// Bound on waiting for a server connection.
    pub query_wait_timeout: Option<Duration>,
    /// Bound on client startup + authentication.
    pub client_login_timeout: Option<Duration>,
    /// Session-mode reset query; empty means none.
    pub server_reset_query: String,
    /// Global pool defaults.
    pub default_pool_size: u32,
    /// Global default pool mode.
    pub pool_mode: PoolMode,
    /// Default client authentication method (also used for unknown users).
    pub auth_type: AuthMethod,
    /// Databases by client-facing name.
    pub databases: BTreeMap<String, Arc<Database>>,
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

    /// Pool behaviour for (database, user): user > database > global.
    pub fn pool_settings(&self, db: &Database, user: &User) -> PoolSettings {
        PoolSettings {
            pool_size: user.pool_size.or(db.pool_size).unwrap_or(self.default_pool_size),
            pool_mode: user.pool_mode.or(db.pool_mode).unwrap_or(self.pool_mode),
        }
    }
}
