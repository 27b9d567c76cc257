//! Getting a server connection for a client's next transaction and bringing it to the client's
//! session settings. Usually the connection already has them (no round trip) or one
//! simple query sets them. When the backend refuses that (a role dropped since the client set
//! it, a value the connection's session user may not set), the connection is reset to its login
//! state (it stays usable) and the transaction tries once more on a fresh checkout. Refused
//! again, each differing setting is tried on its own: the ones the backend refuses are dropped
//! from the client's session, and the client gets one ERROR naming them. Never a loop through
//! the pool, never another statement's error.

use std::sync::Arc;

use tokio::time::Instant;

use super::session::RESET_LIMIT;
use super::ClientError;
use crate::config::duration::fmt_duration;
use crate::pool::{Pool, PoolStats, Pooled};
use crate::proto::backend::PgError;
use crate::proto::sql::SESSION_AUTHORIZATION;
use crate::relay::SessionView;
use crate::server::ServerError;
use crate::settings::Settings;

/// A backstop on replacing server connections that die before any client byte reached them
/// (the client's deadline is the real bound).
const MAX_TRANSPARENT_RETRIES: usize = 1000;

/// Checks out a server connection and brings it to the client's settings. A connection that
/// dies before any client byte was written to it is replaced transparently, as often as needed
/// within the client's deadline (in a restart every idle connection dies at once).
pub(super) async fn checkout(
    pool: &Arc<Pool>,
    view: &mut SessionView,
    deadline: Option<Instant>,
) -> Result<Pooled, ClientError> {
    let mut attempts = 0;
    let mut refused = false;
    loop {
        attempts += 1;
        let mut server = pool.checkout(deadline).await?;
        if server.settings_in_sync(&view.settings) {
            // The usual case: no round trip, so no timer either.
            return Ok(server);
        }
        let why = match bounded(server.sync_settings(&view.settings)).await {
            Ok(None) => return Ok(server),
            Ok(Some(err)) => {
                PoolStats::bump(&pool.stats.settings_refused);
                tracing::info!(pool = %pool.key, error = %err, retry = !refused, "the backend refused a client's session settings");
                if refused {
                    return drop_refused(pool, server, view, err).await;
                }
                refused = true;
                reset_and_release(server).await;
                continue;
            }
            Err(Stuck::Failed(e)) => {
                server.failed(None);
                e.to_string()
            }
            Err(Stuck::NoAnswer) => {
                // Alive but not answering: close it rather than wait on it.
                server.discard();
                Stuck::NoAnswer.to_string()
            }
        };
        let expired = deadline.is_some_and(|d| Instant::now() >= d);
        if expired || attempts >= MAX_TRANSPARENT_RETRIES {
            return Err(ClientError::ServerLost);
        }
        PoolStats::bump(&pool.stats.transparent_retries);
        tracing::debug!(pool = %pool.key, error = %why, "server failed before the request reached it; retrying");
    }
}

/// A refused setting on the second connection too: finds which settings the backend refuses
/// by applying them one at a time (the session user first: the role and other settings may
/// depend on it), drops those from the client's session (startup values included, so a RESET
/// cannot bring them back) and answers the request with one ERROR naming them. If every
/// setting is accepted on its own, the connection has them all and serves the request.
async fn drop_refused(
    pool: &Pool,
    mut server: Pooled,
    view: &mut SessionView,
    first: PgError,
) -> Result<Pooled, ClientError> {
    let lost = |server: Pooled, why: String| {
        tracing::warn!(pool = %pool.key, error = %why, "server failed while restoring a client's settings");
        server.discard();
        ClientError::ServerLost
    };
    match bounded(server.reset_session()).await {
        Ok(None) => {}
        Ok(Some(e)) => return Err(lost(server, e.to_string())),
        Err(e) => return Err(lost(server, e.to_string())),
    }
    let order = view
        .settings
        .iter()
        .filter(|(name, _)| *name == SESSION_AUTHORIZATION)
        .chain(
            view.settings
                .iter()
                .filter(|(name, _)| *name != SESSION_AUTHORIZATION),
        );
    let mut accepted = Settings::new();
    let mut dropped: Vec<(String, PgError)> = Vec::new();
    for (name, value) in order {
        let mut wanted = accepted.clone();
        wanted.insert(name.clone(), value.clone());
        match bounded(server.sync_settings(&wanted)).await {
            Ok(None) => accepted = wanted,
            Ok(Some(e)) => dropped.push((name.clone(), e)),
            Err(e) => return Err(lost(server, e.to_string())),
        }
    }
    if dropped.is_empty() {
        tracing::info!(pool = %pool.key, error = %first, "the client's settings were accepted one by one");
        return Ok(server);
    }
    PoolStats::add(&pool.stats.settings_dropped, dropped.len() as u64);
    for (name, _) in &dropped {
        view.settings.remove(name);
        view.startup.remove(name);
    }
    tracing::warn!(pool = %pool.key, settings = ?dropped.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), "dropped session settings the backend refuses");
    server.release();
    Err(ClientError::SettingsDropped(dropped))
}

/// Resets a connection whose settings were refused (`SET SESSION AUTHORIZATION DEFAULT;
/// RESET ALL`: its login state) and returns it to the pool; closed if that fails too.
async fn reset_and_release(mut server: Pooled) {
    match bounded(server.reset_session()).await {
        Ok(None) => server.release(),
        Ok(Some(_)) | Err(_) => server.discard(),
    }
}

/// Why one of the proxy's own round trips on a server connection did not complete.
#[derive(Debug, thiserror::Error)]
enum Stuck {
    #[error("{0}")]
    Failed(ServerError),
    #[error("no answer to the session settings within {}", fmt_duration(RESET_LIMIT))]
    NoAnswer,
}

/// One of the proxy's own round trips, bounded by `RESET_LIMIT`.
async fn bounded<T>(f: impl std::future::Future<Output = Result<T, ServerError>>) -> Result<T, Stuck> {
    match tokio::time::timeout(RESET_LIMIT, f).await {
        Ok(r) => r.map_err(Stuck::Failed),
        Err(_) => Err(Stuck::NoAnswer),
    }
}
