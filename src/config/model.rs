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

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// What transaction mode does with a statement that leaves session state the proxy cannot
/// carry to another server connection (temporary tables, session advisory locks, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// The client keeps its server connection until the state is gone.
    Pin,
    /// The statement is refused with 0A000.
    Reject,
    /// Nothing: the state stays on the pooled connection for whoever gets it next (PgBouncer's
    /// behaviour; unsafe).
    Allow,
}

impl Default for SessionState {
    fn default() -> SessionState {
        defaults::SESSION_STATE
    }
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

/// Declares a `Raw*` table struct: its own fields, plus the keys every scope shares (global,
/// `[databases.*]`, `[tenants.*]`, `[users.*]`), resolved with precedence
/// user > tenant > database > global. Written once here so the four scopes cannot drift.
macro_rules! scope_table {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            /// Transaction or session pooling.
            pub pool_mode: Option<PoolMode>,
            /// Transaction mode: pin, reject or allow statements that leave session state.
            pub session_state: Option<SessionState>,
            /// Server connections kept open per pool even when idle (pre-warmed).
            pub min_pool_size: Option<u32>,
            /// Extra server connections a pool may open once a client has waited
            /// `reserve_pool_timeout`.
            pub reserve_pool_size: Option<u32>,
            /// Wait after which the reserve may be used.
            #[serde(default, deserialize_with = "de_timeout")]
            pub reserve_pool_timeout: Option<Option<Duration>>,
            /// Bound on waiting for a server connection.
            #[serde(default, deserialize_with = "de_timeout")]
            pub query_wait_timeout: Option<Option<Duration>>,
            /// A client that has waited this long for a server connection gets a NOTICE.
            #[serde(default, deserialize_with = "de_timeout")]
            pub query_wait_notify: Option<Option<Duration>>,
            /// Bound on a client's login (startup + authentication).
            #[serde(default, deserialize_with = "de_timeout")]
            pub client_login_timeout: Option<Option<Duration>>,
            /// A client idle (outside a transaction) this long is disconnected (57P05).
            #[serde(default, deserialize_with = "de_timeout")]
            pub client_idle_timeout: Option<Option<Duration>>,
            /// A pinned client (transaction mode) idle this long is disconnected (57P05).
            #[serde(default, deserialize_with = "de_timeout")]
            pub pinned_idle_timeout: Option<Option<Duration>>,
            /// Clients of one pool that may be pinned at once (transaction mode); in
            /// `[tenants.*]` also the tenant's pinned clients across its pools.
            pub max_pinned: Option<u32>,
            /// A client idle inside a transaction this long is disconnected (25P03).
            #[serde(default, deserialize_with = "de_timeout")]
            pub idle_transaction_timeout: Option<Option<Duration>>,
            /// A query running this long is cancelled; if it does not stop, its server connection
            /// is closed.
            #[serde(default, deserialize_with = "de_timeout")]
            pub query_timeout: Option<Option<Duration>>,
            /// Bound on connecting + logging in to the backend.
            #[serde(default, deserialize_with = "de_timeout")]
            pub server_connect_timeout: Option<Option<Duration>>,
            /// Idle server connections above `min_pool_size` are closed after this long.
            #[serde(default, deserialize_with = "de_timeout")]
            pub server_idle_timeout: Option<Option<Duration>>,
            /// Server connections are retired (when idle) after about this long.
            #[serde(default, deserialize_with = "de_timeout")]
            pub server_lifetime: Option<Option<Duration>>,
            /// Idle time after which a server connection is checked with a round trip before
            /// reuse.
            #[serde(default, deserialize_with = "de_timeout")]
            pub server_check_delay: Option<Option<Duration>>,
        }

        impl $name {
            /// The shared keys this table sets (pool size excepted: its key differs by scope).
            pub fn shared(&self) -> RawShared {
                RawShared {
                    pool_size: None,
                    pool_mode: self.pool_mode,
                    session_state: self.session_state,
                    min_pool_size: self.min_pool_size,
                    reserve_pool_size: self.reserve_pool_size,
                    reserve_pool_timeout: self.reserve_pool_timeout,
                    query_wait_timeout: self.query_wait_timeout,
                    query_wait_notify: self.query_wait_notify,
                    client_login_timeout: self.client_login_timeout,
                    client_idle_timeout: self.client_idle_timeout,
                    pinned_idle_timeout: self.pinned_idle_timeout,
                    max_pinned: self.max_pinned,
                    idle_transaction_timeout: self.idle_transaction_timeout,
                    query_timeout: self.query_timeout,
                    server_connect_timeout: self.server_connect_timeout,
                    server_idle_timeout: self.server_idle_timeout,
                    server_lifetime: self.server_lifetime,
                    server_check_delay: self.server_check_delay,
                }
            }
        }
    };
}

/// The keys every scope may set, as one table wrote them (`None`: not set there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct RawShared {
    pub pool_size: Option<u32>,
    pub pool_mode: Option<PoolMode>,
    pub session_state: Option<SessionState>,
    pub min_pool_size: Option<u32>,
    pub reserve_pool_size: Option<u32>,
    pub reserve_pool_timeout: Option<Option<Duration>>,
    pub query_wait_timeout: Option<Option<Duration>>,
    pub query_wait_notify: Option<Option<Duration>>,
    pub client_login_timeout: Option<Option<Duration>>,
    pub client_idle_timeout: Option<Option<Duration>>,
    pub pinned_idle_timeout: Option<Option<Duration>>,
    pub max_pinned: Option<u32>,
    pub idle_transaction_timeout: Option<Option<Duration>>,
    pub query_timeout: Option<Option<Duration>>,
    pub server_connect_timeout: Option<Option<Duration>>,
    pub server_idle_timeout: Option<Option<Duration>>,
    pub server_lifetime: Option<Option<Duration>>,
    pub server_check_delay: Option<Option<Duration>>,
}

scope_table! {
/// The whole file.
pub struct RawConfig {
    /// Address clients connect to, `host:port`.
    pub listen_addr: Option<String>,
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); unset: none.
    pub metrics_listen_addr: Option<String>,
    /// Whether metrics carry a `user` label (false: pools of one database and tenant are
    /// summed).
    pub metrics_user_label: Option<bool>,
    /// Server connections per (database, user) pool unless overridden.
    pub default_pool_size: Option<u32>,
    /// Maximum client connections across the proxy.
    pub max_client_conn: Option<u32>,
    /// Server connections per database unless overridden (unset: no cap beyond pool sizes).
    pub max_db_connections: Option<u32>,
    /// New server connections opened at once per database unless overridden.
    pub server_connect_concurrency: Option<u32>,
    /// Clients each tenant may have waiting for a server connection (unset: no cap).
    pub max_queue: Option<u32>,
    /// Largest message accepted from a client, in bytes.
    pub max_packet_size: Option<u32>,
    /// Named prepared statements kept per server connection (transaction mode); 0 disables
    /// statement tracking.
    pub max_prepared_statements: Option<u32>,
    /// Default client authentication method.
    pub auth_type: Option<AuthMethod>,
    /// Query run on a server connection before reuse in session mode.
    pub server_reset_query: Option<String>,
    /// How log lines are written (`text` or `json`).
    pub log_format: Option<LogFormat>,
    /// Bound on a graceful stop (SIGTERM, SIGINT): what still runs then is ended.
    #[serde(default, deserialize_with = "de_timeout")]
    pub shutdown_timeout: Option<Option<Duration>>,
    /// Backends, by the name clients use.
    #[serde(default)]
    pub databases: BTreeMap<String, RawDatabase>,
    /// Groups of users sharing limits and server-connection slots.
    #[serde(default)]
    pub tenants: BTreeMap<String, RawTenant>,
    /// Users allowed to connect.
    #[serde(default)]
    pub users: BTreeMap<String, RawUser>,
}
}

impl RawConfig {
    /// The global keys every scope may override, `default_pool_size` included.
    pub fn shared_global(&self) -> RawShared {
        let mut s = self.shared();
        s.pool_size = self.default_pool_size;
        s
    }
}

scope_table! {
/// One `[databases.NAME]` table.
pub struct RawDatabase {
    /// Host name or IP; a value starting with `/` is a Unix socket directory.
    pub host: Option<String>,
    /// Backend port.
    pub port: Option<u16>,
    /// Database name on the backend (defaults to the table's name).
    pub dbname: Option<String>,
    /// Pool size for this database's pools.
    pub pool_size: Option<u32>,
    /// Hard cap on server connections to this database, all pools together: its slots.
    pub max_db_connections: Option<u32>,
    /// New server connections opened at once for this database.
    pub server_connect_concurrency: Option<u32>,
    /// Log in to the backend as this user for every client of this database.
    pub server_user: Option<String>,
    /// Password for `server_user`.
    pub server_password: Option<String>,
    /// The `[users.NAME]` whose credentials the database's notification listener logs in
    /// with (unset: the first subscriber's user).
    pub listen_user: Option<String>,
}
}

scope_table! {
/// One `[tenants.NAME]` table: a group of users (a workload) with its own limits.
pub struct RawTenant {
    /// Slots of each database guaranteed to this tenant while it has clients waiting.
    pub min_server_conn: Option<u32>,
    /// Most slots of each database this tenant may hold.
    pub max_server_conn: Option<u32>,
    /// Share of the slots between the guaranteed minimums, relative to other tenants.
    pub weight: Option<u32>,
    /// Clients of this tenant that may wait for a server connection; the next is refused.
    pub max_queue: Option<u32>,
    /// Client connections of this tenant's users together.
    pub max_client_conn: Option<u32>,
    /// Pool size for this tenant's pools.
    pub pool_size: Option<u32>,
}
}

scope_table! {
/// One `[users.NAME]` table.
pub struct RawUser {
    /// Plaintext password, `md5…` hash, or `SCRAM-SHA-256$…` verifier.
    pub password: Option<String>,
    /// Client authentication method for this user.
    pub auth: Option<AuthMethod>,
    /// The tenant this user belongs to (unset: a tenant of its own).
    pub tenant: Option<String>,
    /// Client connections of this user.
    pub max_client_conn: Option<u32>,
    /// Pool size for this user's pools.
    pub pool_size: Option<u32>,
    /// Plaintext password for the backend when `password` is a hash or verifier.
    pub server_password: Option<String>,
}
}

/// Defaults, one place, mirrored in `proxy.toml.example`.
pub mod defaults {
    use std::time::Duration;

    use super::{AuthMethod, PoolMode, SessionState};

    /// `pool_mode`
    pub const POOL_MODE: PoolMode = PoolMode::Transaction;
    /// `session_state`
    pub const SESSION_STATE: SessionState = SessionState::Pin;
    /// `auth_type`
    pub const AUTH_TYPE: AuthMethod = AuthMethod::ScramSha256;
    /// `databases.*.host`
    pub const HOST: &str = "127.0.0.1";
    /// `listen_addr`
    pub const LISTEN_ADDR: &str = "127.0.0.1:6432";
    /// `metrics_user_label`
    pub const METRICS_USER_LABEL: bool = true;
    /// `shutdown_timeout`
    pub const SHUTDOWN_TIMEOUT: Option<Duration> = Some(Duration::from_secs(30));
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
    /// `server_connect_concurrency`
    pub const SERVER_CONNECT_CONCURRENCY: u32 = 4;
    /// `min_pool_size`
    pub const MIN_POOL_SIZE: u32 = 0;
    /// `reserve_pool_size`
    pub const RESERVE_POOL_SIZE: u32 = 0;
    /// `reserve_pool_timeout`
    pub const RESERVE_POOL_TIMEOUT: Option<Duration> = Some(Duration::from_secs(5));
    /// `query_wait_notify`
    pub const QUERY_WAIT_NOTIFY: Option<Duration> = Some(Duration::from_secs(5));
    /// `pinned_idle_timeout`
    pub const PINNED_IDLE_TIMEOUT: Option<Duration> = None;
    /// `client_idle_timeout`
    pub const CLIENT_IDLE_TIMEOUT: Option<Duration> = None;
    /// `idle_transaction_timeout`
    pub const IDLE_TRANSACTION_TIMEOUT: Option<Duration> = None;
    /// `query_timeout`
    pub const QUERY_TIMEOUT: Option<Duration> = None;
    /// `server_idle_timeout`
    pub const SERVER_IDLE_TIMEOUT: Option<Duration> = Some(Duration::from_secs(600));
    /// `server_lifetime`
    pub const SERVER_LIFETIME: Option<Duration> = Some(Duration::from_secs(3600));
    /// `tenants.*.weight`
    pub const WEIGHT: u32 = 1;
    /// `tenants.*.min_server_conn`
    pub const MIN_SERVER_CONN: u32 = 0;
}
