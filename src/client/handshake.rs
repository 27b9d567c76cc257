//! The front door: startup packet (SSL/GSS refusal, cancel requests, protocol negotiation),
//! authentication, then login. Any failure here is FATAL and closes the connection.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::authenticate::authenticate;
use super::cancel::CancelHandle;
use super::io::{read_startup, Gone};
use super::login::{prepare_session, write_welcome};
use super::{ClientContext, ClientError};
use crate::auth::secret::Secret;
use crate::pool::tenant::Ticket;
use crate::pool::Pool;
use crate::proto::backend::{self, auth_code, Severity};
use crate::proto::startup::{self, StartupRequest};
use crate::relay::{ClientIo, SessionView};
use crate::settings::SettingValue;

/// A client that logged in.
#[derive(Debug)]
pub struct LoggedIn {
    /// Its pool.
    pub pool: Arc<Pool>,
    /// Its session as the proxy keeps it (settings, named statements).
    pub view: SessionView,
    /// Its cancel key registration.
    pub cancel: CancelHandle,
    /// The notification hubs, for its LISTENs in transaction mode.
    pub listeners: Arc<crate::notify::Listeners>,
    /// Its place under the tenant's and the user's `max_client_conn`, held while connected.
    pub _tickets: [Ticket; 2],
    /// The proxy's stop signals.
    pub watch: crate::shutdown::Watch,
}

/// A startup packet that asks to log in.
#[derive(Debug)]
struct LoginRequest {
    user_name: String,
    database: String,
    settings: BTreeMap<String, String>,
}

/// What the connection turned out to be.
#[derive(Debug)]
pub enum Opened {
    /// A logged-in session (boxed: once per connection, and it is large).
    Session(Box<LoggedIn>),
    /// A cancel request (handled) or a refused login (answered): close the connection.
    Done,
}

/// Runs the handshake; failures are answered with FATAL here.
pub async fn handshake<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    ctx: &ClientContext,
    admitted: bool,
) -> Result<Opened, Gone> {
    let config = ctx.pools.config().clone();
    let started = Instant::now();
    // Until the startup packet names the user and database, the global bound applies; then
    // theirs (user > tenant > database > global), still counted from the connection's start.
    let global = config.defaults.client_login_timeout;
    let result = match within(started, global, startup(io, ctx, admitted)).await? {
        Ok(None) => Ok(Opened::Done),
        Ok(Some(req)) => {
            let limit = match (
                config.users.get(&req.user_name),
                config.databases.get(&req.database),
            ) {
                (Some(user), Some(db)) => config.pool_settings(db, user).client_login_timeout,
                _ => global,
            };
            within(started, limit, login(io, ctx, req)).await?
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(opened) => Ok(opened),
        Err(e) => {
            tracing::info!(error = %e, "login refused");
            ctx.state.login_failed(e.login_failure());
            e.to_pg_error(Severity::Fatal).write_error(&mut io.out);
            io.flush().await?;
            Ok(Opened::Done)
        }
    }
}

/// Runs `step`, bounded by `limit` counted from `started`.
async fn within<T>(
    started: Instant,
    limit: Option<std::time::Duration>,
    step: impl std::future::Future<Output = Result<Result<T, ClientError>, Gone>>,
) -> Result<Result<T, ClientError>, Gone> {
    match limit {
        None => step.await,
        Some(t) => match tokio::time::timeout_at(started + t, step).await {
            Ok(r) => r,
            Err(_) => Ok(Err(ClientError::LoginTimeout(t))),
        },
    }
}

/// Reads the startup packet (answering SSL/GSS requests and cancel requests); `None` when the
/// connection was a cancel request.
async fn startup<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    ctx: &ClientContext,
    admitted: bool,
) -> Result<Result<Option<LoginRequest>, ClientError>, Gone> {
    let mut encryption_requests = 0;
    let (major, minor, params) = loop {
        let body = match read_startup(&mut io.stream).await? {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        match startup::parse(&body) {
            Err(e) => return Ok(Err(e.into())),
            Ok(StartupRequest::Ssl | StartupRequest::GssEnc) if encryption_requests < 2 => {
                encryption_requests += 1;
                io.out.extend_from_slice(b"N");
                io.flush().await?;
            }
            Ok(StartupRequest::Ssl | StartupRequest::GssEnc) => {
                return Ok(Err(crate::proto::ProtoError::Invalid(
                    "repeated encryption request",
                )
                .into()))
            }
            Ok(StartupRequest::Cancel { pid, secret }) => {
                if let Some(delivered) = ctx.cancels.cancel(pid, secret) {
                    // Bounded by the forward's own limit; the task runs on if this one ends.
                    let _ = delivered.await;
                }
                return Ok(Ok(None));
            }
            Ok(StartupRequest::Startup { major, minor, params }) => break (major, minor, params),
        }
    };
    if major != 3 {
        return Ok(Err(ClientError::UnsupportedProtocol { major, minor }));
    }
    let unrecognised: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if minor > 0 || !unrecognised.is_empty() {
        backend::negotiate_protocol_version(&mut io.out, 0, &unrecognised);
    }
    let mut user_name = None;
    let mut database = None;
    let mut settings = BTreeMap::new();
    for (k, v) in &params {
        match k.as_str() {
            "user" => user_name = Some(v.clone()),
            "database" => database = Some(v.clone()),
            "replication" if startup::is_replication(v) => return Ok(Err(ClientError::Replication)),
            "replication" => {}
            "options" => match startup::parse_options(v) {
                Ok(opts) => settings.extend(opts.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v))),
                Err(e) => return Ok(Err(ClientError::BadOptions(e))),
            },
            k if k.starts_with("_pq_.") => {}
            // Setting names are case-insensitive, as in PostgreSQL.
            _ => {
                settings.insert(k.to_ascii_lowercase(), v.clone());
            }
        }
    }
    let Some(user_name) = user_name.filter(|u| !u.is_empty()) else {
        return Ok(Err(ClientError::NoUser));
    };
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user_name.clone());
    if ctx.shutdown.draining() {
        return Ok(Err(ClientError::ShuttingDown));
    }
    if !admitted {
        return Ok(Err(ClientError::TooManyClients(
            ctx.pools.config().max_client_conn,
        )));
    }
    Ok(Ok(Some(LoginRequest {
        user_name,
        database,
        settings,
    })))
}

/// Authenticates, admits the client under its tenant's and user's caps, finds its pool and
/// prepares its session.
async fn login<C: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<C>,
    ctx: &ClientContext,
    req: LoginRequest,
) -> Result<Result<Opened, ClientError>, Gone> {
    let LoginRequest {
        user_name,
        database,
        settings,
    } = req;
    let config = ctx.pools.config().clone();
    let user = config.users.get(&user_name);
    let authed = match authenticate(io, &user_name, user, config.auth_type, &ctx.proxy_secret).await? {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    let Some(user) = user else {
        return Ok(Err(ClientError::AuthFailed(user_name)));
    };
    backend::auth(&mut io.out, auth_code::OK, &[]);
    let Some(db) = config.databases.get(&database) else {
        return Ok(Err(ClientError::UnknownDatabase(database)));
    };
    let tenant = ctx.pools.tenant(&user.tenant);
    let tenant_ticket = match Ticket::take(&tenant.clients) {
        Ok(t) => t,
        Err(max) => {
            return Ok(Err(ClientError::TenantClients {
                tenant: user.tenant.name.clone(),
                max,
            }))
        }
    };
    let user_ticket = match Ticket::take(&ctx.pools.user_clients(user)) {
        Ok(t) => t,
        Err(max) => {
            return Ok(Err(ClientError::UserClients {
                user: user.name.clone(),
                max,
            }))
        }
    };
    let pool = ctx.pools.get(db, user);
    if let (Some((client_key, server_key)), Some(Secret::Scram(_))) = (authed.scram_keys, &user.secret) {
        pool.learn_scram_keys(client_key, server_key);
    }
    // Tell the client it is in while we may wait for a first server login.
    io.flush().await?;
    let deadline = pool.settings.query_wait_timeout.map(|t| Instant::now() + t);
    let params = match prepare_session(&pool, &settings, deadline).await {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let cancel = ctx.cancels.register();
    write_welcome(io, &params, &cancel);
    io.flush().await?;
    tracing::debug!(pool = %pool.key, "client logged in");
    let startup = settings
        .into_iter()
        .map(|(k, v)| (k, SettingValue::Text(v)))
        .collect();
    Ok(Ok(Opened::Session(Box::new(LoggedIn {
        view: SessionView::new(startup, pool.plans.clone()),
        pool,
        cancel,
        listeners: ctx.listeners.clone(),
        _tickets: [tenant_ticket, user_ticket],
        watch: ctx.shutdown.watch(),
    }))))
}
