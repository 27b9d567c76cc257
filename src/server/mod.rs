//! Server connections: connect and log in to PostgreSQL, the connection's tracked state
//! (ParameterStatus, BackendKeyData, settings applied on it), liveness, and the proxy's own
//! small queries on it (settings, reset). Knows nothing about clients or pools.

mod cancel;
mod conn;
mod connect;
mod error;
mod login;
mod stream;

pub use cancel::CancelTarget;
pub use conn::{CancelGate, ServerConn, ServerParams};
pub use connect::{connect, LoginCredentials, ServerTarget};
pub use error::ServerError;
pub use stream::ServerStream;
