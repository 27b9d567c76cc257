//! pgsluice: a PostgreSQL connection-pooling proxy.
//!
//! Clients speak the PostgreSQL protocol to it as to a server; it authenticates them, and runs
//! their transactions over a small pool of server connections per (database, user). See
//! README.md for operation and `ARCHITECTURE.md` for where things live.

pub mod app;
pub mod auth;
pub mod client;
pub mod config;
pub mod devpg;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod prepared;
pub mod proto;
pub mod relay;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod sync;
