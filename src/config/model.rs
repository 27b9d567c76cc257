//! The serde model of `proxy.toml`: exactly what an operator writes, nothing derived.
//!
//! Unknown keys are rejected (`deny_unknown_fields`) so a typo never silently does nothing.
//! Defaults live in `defaults` below and in `proxy.toml.example`; a test keeps them in step.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::duration::de_timeout;

/// How long a server connection stays with one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Released at the end of every transaction (ReadyForQuery 'I').
    Transaction,
    /// Held until the client disconnects, then reset with `server_reset_query`.
    Session,
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    /// SCRAM-SHA-256 (the default).
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// MD5 challenge; runs SCRAM instead when the secret is a SCRAM verifier, as PostgreSQL does.
    #[serde(rename = "md5")]
    Md5,
    /// No password at all; opt-in per user or globally.
    #[serde(rename = "trust")]
    Trust,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address clients connect to, `host:port`.
    pub listen_addr: Option<String>,
    /// Default pool mode.
    pub pool_mode: Option<PoolMode>,
    /// Server connections per (database, user) pool unless overridden.
    pub default_pool_size: Option<u32>,
    /// Maximum client connections across the proxy.
    pub max_client_conn: Option<u32>,
    /// Largest message accepted from a client, in bytes.
    pub max_packet_size: Option<u32>,
    /// Named prepared statements kept per server connection (transaction mode); 0 disables
    /// statement tracking.
    pub max_prepared_statements: Option<u32>,
    /// Default client authentication method.
    pub auth_type: Option<AuthMethod>,
    /// Query run on a server connection before reuse in session mode.
    pub server_reset_query: Option<String>,
    /// Bound on connecting + logging in to the backend.
    #[serde(default, deserialize_with = "de_timeout")]
    pub server_connect_timeout: Option<Option<Duration>>,
    /// Idle time after which a server connection is checked with a round trip before reuse.
    #[serde(default, deserialize_with = "de_timeout")]
    pub server_check_delay: Option<Option<Duration>>,
    /// Bound on waiting for a server connection.
    #[serde(default, deserialize_with = "de_timeout")]
    pub query_wait_timeout: Option<Option<Duration>>,
    /// Bound on a client's login (startup + authentication).
    #[serde(default, deserialize_with = "de_timeout")]
    pub client_login_timeout: Option<Option<Duration>>,
    /// Backends, by the name clients use.
    #[serde(default)]
    pub databases: BTreeMap<String, RawDatabase>,
    /// Users allowed to connect.
    #[serde(default)]
    pub users: BTreeMap<String, RawUser>,
}

/// One `[databases.NAME]` table.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    /// Host name or IP; a value starting with `/` is a Unix socket directory.
    pub host: Option<String>,
    /// Backend port.
    pub port: Option<u16>,
    /// Database name on the backend (defaults to the table's name).
    pub dbname: Option<String>,
    /// Pool size for this database's pools.
    pub pool_size: Option<u32>,
    /// Pool mode for this database.
    pub pool_mode: Option<PoolMode>,
    /// Log in to the backend as this user for every client of this database.
    pub server_user: Option<String>,
    /// Password for `server_user`.
    pub server_password: Option<String>,
}

/// One `[users.NAME]` table.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    /// Plaintext password, `md5…` hash, or `SCRAM-SHA-256$…` verifier.
    pub password: Option<String>,
    /// Client authentication method for this user.
    pub auth: Option<AuthMethod>,
    /// Pool size for this user's pools.
    pub pool_size: Option<u32>,
    /// Pool mode for this user.
    pub pool_mode: Option<PoolMode>,
    /// Plaintext password for the backend when `password` is a hash or verifier.
    pub server_password: Option<String>,
}

/// Defaults, one place, mirrored in `proxy.toml.example`.
pub mod defaults {
    use std::time::Duration;

    use super::{AuthMethod, PoolMode};

    /// `pool_mode`
    pub const POOL_MODE: PoolMode = PoolMode::Transaction;
    /// `auth_type`
    pub const AUTH_TYPE: AuthMethod = AuthMethod::ScramSha256;
    /// `databases.*.host`
    pub const HOST: &str = "127.0.0.1";
    /// `listen_addr`
    pub const LISTEN_ADDR: &str = "127.0.0.1:6432";
    /// `default_pool_size`
    pub const DEFAULT_POOL_SIZE: u32 = 20;
    /// `max_client_conn`
    pub const MAX_CLIENT_CONN: u32 = 1000;
    /// `max_prepared_statements`
    pub const MAX_PREPARED_STATEMENTS: u32 = 200;
    /// `max_packet_size`: PostgreSQL's own limit for one message.
    pub const MAX_PACKET_SIZE: u32 = 1024 * 1024 * 1024 - 1;
    /// `server_reset_query`
    pub const SERVER_RESET_QUERY: &str = "DISCARD ALL";
    /// `server_connect_timeout`
    pub const SERVER_CONNECT_TIMEOUT: Option<Duration> = Some(Duration::from_secs(5));
    /// `server_check_delay`
    pub const SERVER_CHECK_DELAY: Option<Duration> = Some(Duration::from_secs(30));
    /// `query_wait_timeout`
    pub const QUERY_WAIT_TIMEOUT: Option<Duration> = Some(Duration::from_secs(120));
    /// `client_login_timeout`
    pub const CLIENT_LOGIN_TIMEOUT: Option<Duration> = Some(Duration::from_secs(60));
    /// `databases.*.port`
    pub const PORT: u16 = 5432;
}
