//! After authentication: find the pool, validate the client's session settings once per pool,
//! and send ParameterStatus, BackendKeyData and ReadyForQuery.
//!
//! Every non-protocol startup parameter (and every `-c name=value` in `options`) is a session
//! setting, applied on whichever server connection serves the client. A (name, value) pair is
//! validated on a real server connection the first time the pool sees it, and the verdict is
//! remembered, so a bad value fails at login with PostgreSQL's own error and good ones cost no
//! round trip later.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::cancel::CancelHandle;
use super::session::RESET_LIMIT;
use super::ClientError;
use crate::pool::{Pool, Verdict};
use crate::proto::backend;
use crate::relay::ClientIo;
use crate::server::ServerParams;
use crate::settings::SettingValue;

/// Validates `settings` on `pool` and returns the ParameterStatus set the client should see:
/// the pool's cached server values overlaid with the client's own (as the backend reports them).
pub async fn prepare_session(
    pool: &Arc<Pool>,
    settings: &BTreeMap<String, String>,
    deadline: Option<Instant>,
) -> Result<ServerParams, ClientError> {
    let mut unknown = Vec::new();
    for (name, value) in settings {
        match pool.verdict(name, value) {
            Some(Verdict::Refused(e)) => return Err(ClientError::Setting(e)),
            Some(Verdict::Ok(_)) => {}
            None => unknown.push((name.clone(), value.clone())),
        }
    }
    if pool.cached_params().is_none() || !unknown.is_empty() {
        let mut server = pool.checkout(deadline).await?;
        for (name, value) in unknown {
            let mut wanted = server.applied.clone();
            wanted.insert(name.clone(), SettingValue::Text(value.clone()));
            let checked = tokio::time::timeout(RESET_LIMIT, server.sync_settings(&wanted)).await;
            match checked.unwrap_or(Err(crate::server::ServerError::Closed)) {
                Ok(None) => {
                    let reported = lookup(&server.params, &name).map(|(_, v)| v.clone());
                    pool.record_verdict(&name, &value, Verdict::Ok(reported));
                }
                Ok(Some(err)) => {
                    pool.record_verdict(&name, &value, Verdict::Refused(err.clone()));
                    server.release();
                    return Err(ClientError::Setting(err));
                }
                Err(e) => {
                    tracing::warn!(pool = %pool.key, error = %e, "server failed while validating a setting");
                    server.discard();
                    return Err(ClientError::ServerLost);
                }
            }
        }
        server.release();
    }
    let mut params: ServerParams = pool.cached_params().map(|p| (*p).clone()).unwrap_or_default();
    for (name, value) in settings {
        if let Some(Verdict::Ok(Some(reported))) = pool.verdict(name, value) {
            let key = lookup(&params, name)
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| name.clone());
            params.insert(key, reported);
        }
    }
    Ok(params)
}

/// GUC names are case-insensitive: `DateStyle` and `datestyle` are one setting.
fn lookup<'a>(params: &'a ServerParams, name: &str) -> Option<(&'a String, &'a String)> {
    params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name))
}

/// Writes the end of a successful login: AuthenticationOk was sent already.
pub fn write_welcome<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    params: &ServerParams,
    cancel: &CancelHandle,
) {
    for (name, value) in params {
        backend::parameter_status(&mut io.out, name, value);
    }
    backend::backend_key_data(&mut io.out, cancel.pid, cancel.secret);
    backend::ready_for_query(&mut io.out, b'I');
}
