//! SQLSTATE codes the proxy itself produces (DESIGN.md §4 maps conditions to them).

/// A five-character SQLSTATE.
pub type SqlState = &'static str;

/// protocol_violation: malformed message.
pub const PROTOCOL_VIOLATION: SqlState = "08P01";
/// feature_not_supported: protocol version, replication.
pub const FEATURE_NOT_SUPPORTED: SqlState = "0A000";
/// invalid_password: wrong password or unknown user.
pub const INVALID_PASSWORD: SqlState = "28P01";
/// invalid_authorization_specification: user not allowed / auth method mismatch.
pub const INVALID_AUTHORIZATION: SqlState = "28000";
/// invalid_catalog_name: unknown database.
pub const INVALID_CATALOG_NAME: SqlState = "3D000";
/// too_many_connections: client cap, queue full, wait timeout with the backend up.
pub const TOO_MANY_CONNECTIONS: SqlState = "53300";
/// cannot_connect_now: backend starting up.
pub const CANNOT_CONNECT_NOW: SqlState = "57P03";
/// connection_failure: backend unreachable or lost.
pub const CONNECTION_FAILURE: SqlState = "08006";
/// sqlclient_unable_to_establish_sqlconnection: backend refused the connection.
pub const UNABLE_TO_CONNECT: SqlState = "08001";
/// admin_shutdown: proxy shutting down.
pub const ADMIN_SHUTDOWN: SqlState = "57P01";
/// program_limit_exceeded: message too large.
pub const PROGRAM_LIMIT_EXCEEDED: SqlState = "54000";
/// query_canceled.
pub const QUERY_CANCELED: SqlState = "57014";
/// internal_error: a bug in pgsluice.
pub const INTERNAL_ERROR: SqlState = "XX000";
/// idle_session_timeout.
pub const IDLE_SESSION_TIMEOUT: SqlState = "57P05";
/// idle_in_transaction_session_timeout.
pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = "25P03";
/// successful_completion: the code of a NOTICE the proxy sends.
pub const SUCCESSFUL_COMPLETION: SqlState = "00000";
/// duplicate_prepared_statement.
pub const DUPLICATE_PSTATEMENT: SqlState = "42P05";
/// invalid_sql_statement_name: no such prepared statement.
pub const INVALID_SQL_STATEMENT_NAME: SqlState = "26000";
/// in_failed_sql_transaction: a command inside a failed transaction block.
pub const IN_FAILED_SQL_TRANSACTION: SqlState = "25P02";
/// crash_shutdown: the backend went down with another backend's crash.
pub const CRASH_SHUTDOWN: SqlState = "57P02";
