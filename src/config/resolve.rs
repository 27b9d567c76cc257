//! Turns the raw model into a `Config`, collecting every problem instead of stopping at the first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::model::{defaults, AuthMethod, RawConfig, RawDatabase, RawShared, RawTenant, RawUser};
use super::{Backend, Config, ConfigError, Database, PoolSettings, Tenant, User};
use crate::auth::secret::{ScramVerifier, Secret};

pub(super) fn resolve(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();

    let listen_text = raw.listen_addr.as_deref().unwrap_or(defaults::LISTEN_ADDR);
    let listen_addr = match listen_text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(e) => {
            problems.push(format!(
                "listen_addr {listen_text:?}: {e} (want host:port, e.g. \"127.0.0.1:6432\")"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    let metrics_listen_addr =
        raw.metrics_listen_addr
            .as_deref()
            .and_then(|text| match text.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(e) => {
                    problems.push(format!(
                        "metrics_listen_addr {text:?}: {e} (want host:port, e.g. \"127.0.0.1:9930\")"
                    ));
                    None
                }
            });
    let max_packet_size = raw.max_packet_size.unwrap_or(defaults::MAX_PACKET_SIZE);
    if max_packet_size < 1024 {
        problems.push(format!(
            "max_packet_size = {max_packet_size}: must be at least 1024 bytes"
        ));
    }
    let global = raw.shared_global();
    check_pool_size("default_pool_size", global.pool_size, &mut problems);
    let defaults = PoolSettings::builtin().overlay(&global);
    let max_client_conn = raw.max_client_conn.unwrap_or(defaults::MAX_CLIENT_CONN);
    if max_client_conn == 0 {
        problems.push("max_client_conn = 0: no client could ever connect".to_string());
    }
    check_nonzero("max_db_connections", raw.max_db_connections, &mut problems);
    check_nonzero(
        "server_connect_concurrency",
        raw.server_connect_concurrency,
        &mut problems,
    );
    let default_auth = raw.auth_type.unwrap_or(defaults::AUTH_TYPE);

    if raw.databases.is_empty() {
        problems.push("no [databases.NAME] table: clients would have nowhere to go".to_string());
    }
    let mut databases = BTreeMap::new();
    for (name, d) in &raw.databases {
        if let Some(db) = resolve_database(name, d, &raw, &mut problems) {
            databases.insert(name.clone(), Arc::new(db));
        }
    }
    let mut tenants = BTreeMap::new();
    for (name, t) in &raw.tenants {
        if let Some(tenant) = resolve_tenant(name, t, &raw, &mut problems) {
            tenants.insert(name.clone(), Arc::new(tenant));
        }
    }
    if raw.users.is_empty() {
        problems.push("no [users.NAME] table: no client could log in".to_string());
    }
    let mut users = BTreeMap::new();
    for (name, u) in &raw.users {
        if let Some(user) = resolve_user(name, u, default_auth, &raw, &tenants, &mut problems) {
            users.insert(name.clone(), Arc::new(user));
        }
    }
    check_tenants(
        &raw,
        &defaults,
        &databases,
        &tenants,
        &users,
        &mut problems,
        &mut warnings,
    );
    for db in databases.values() {
        if let Some(u) = &db.listen_user {
            if !users.contains_key(u) && !raw.users.contains_key(u) {
                problems.push(format!(
                    "databases.{}.listen_user = {u:?}: no [users.{u}] table (the listener logs in with a configured user's credentials)",
                    db.name
                ));
            }
        }
    }
    for db in databases.values() {
        for user in users.values() {
            let s = defaults.for_pool(db, user);
            if s.min_pool_size > s.pool_size {
                problems.push(format!(
                    "pool {}/{}: min_pool_size = {} is above its pool_size = {}",
                    db.name, user.name, s.min_pool_size, s.pool_size
                ));
            }
        }
    }
    for user in users.values() {
        if user.server_password.is_some() {
            continue;
        }
        for db in databases.values() {
            if db.server_credentials.is_some() {
                continue;
            }
            let how = match &user.secret {
                Some(Secret::Scram(_)) => "logs in to the backend by SCRAM pass-through, which needs a client that authenticated since start: set server_password for logins with no client present",
                Some(Secret::Md5(_)) => "has only an md5 hash, which answers a backend's md5 challenge but not SCRAM or cleartext: set server_password if the backend asks for those",
                Some(Secret::Plain(_)) => continue,
                None => "has no password: backend logins work only where the backend trusts it",
            };
            warnings.push(format!(
                "pool {}/{}: user {:?} {how}",
                db.name, user.name, user.name
            ));
        }
    }

    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }
    Ok(Config {
        listen_addr,
        metrics_listen_addr,
        metrics_user_label: raw.metrics_user_label.unwrap_or(defaults::METRICS_USER_LABEL),
        shutdown_timeout: raw.shutdown_timeout.unwrap_or(defaults::SHUTDOWN_TIMEOUT),
        log_format: raw.log_format.unwrap_or_default(),
        max_client_conn,
        max_packet_size,
        max_prepared_statements: raw
            .max_prepared_statements
            .unwrap_or(defaults::MAX_PREPARED_STATEMENTS),
        server_reset_query: raw
            .server_reset_query
            .clone()
            .unwrap_or_else(|| defaults::SERVER_RESET_QUERY.to_string()),
        auth_type: default_auth,
        defaults,
        databases,
        tenants,
        users,
        warnings,
    })
}

fn check_nonzero(what: &str, value: Option<u32>, problems: &mut Vec<String>) {
    if value == Some(0) {
        problems.push(format!(
            "{what} = 0: must be at least 1 (leave it out for no cap)"
        ));
    }
}

/// Tenant shares must fit the databases' slots; a share no pool could ever use is reported.
fn check_tenants(
    raw: &RawConfig,
    defaults: &PoolSettings,
    databases: &BTreeMap<String, Arc<Database>>,
    tenants: &BTreeMap<String, Arc<Tenant>>,
    users: &BTreeMap<String, Arc<User>>,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    let min_sum: u64 = tenants.values().map(|t| u64::from(t.min_server_conn)).sum();
    for db in databases.values() {
        if let Some(cap) = db.max_db_connections {
            if min_sum > u64::from(cap) {
                problems.push(format!(
                    "the tenants' min_server_conn add up to {min_sum}, above max_db_connections = {cap} of database {}: the guarantees cannot all be kept",
                    db.name
                ));
            }
        }
    }
    for (name, t) in tenants {
        if raw.users.contains_key(name) && raw.users[name].tenant.as_deref() != Some(name) {
            problems.push(format!(
                "tenants.{name}: a user {name:?} is not in it, and an ungrouped user forms a tenant named after itself; rename the tenant"
            ));
        }
        let members: Vec<&Arc<User>> = users.values().filter(|u| u.tenant.name == *name).collect();
        if members.is_empty() {
            warnings.push(format!("tenants.{name}: no user has tenant = {name:?}"));
            continue;
        }
        if t.min_server_conn == 0 {
            continue;
        }
        for db in databases.values() {
            let reachable: u64 = members
                .iter()
                .map(|u| {
                    let s = defaults.for_pool(db, u);
                    u64::from(s.pool_size) + u64::from(s.reserve_pool_size)
                })
                .sum();
            if reachable < u64::from(t.min_server_conn) {
                warnings.push(format!(
                    "tenants.{name}: min_server_conn = {} but its pools on database {} hold at most {reachable} connections (pool_size + reserve_pool_size of its users)",
                    t.min_server_conn, db.name
                ));
            }
        }
    }
}

fn resolve_tenant(name: &str, t: &RawTenant, raw: &RawConfig, problems: &mut Vec<String>) -> Option<Tenant> {
    let before = problems.len();
    check_pool_size(&format!("tenants.{name}.pool_size"), t.pool_size, problems);
    check_nonzero(
        &format!("tenants.{name}.max_server_conn"),
        t.max_server_conn,
        problems,
    );
    check_nonzero(
        &format!("tenants.{name}.max_client_conn"),
        t.max_client_conn,
        problems,
    );
    let weight = t.weight.unwrap_or(defaults::WEIGHT);
    if weight == 0 {
        problems.push(format!("tenants.{name}.weight = 0: weights start at 1"));
    }
    let min_server_conn = t.min_server_conn.unwrap_or(defaults::MIN_SERVER_CONN);
    if let Some(max) = t.max_server_conn {
        if min_server_conn > max {
            problems.push(format!(
                "tenants.{name}: min_server_conn = {min_server_conn} is above max_server_conn = {max}"
            ));
        }
    }
    if problems.len() > before {
        return None;
    }
    let mut shared = t.shared();
    shared.pool_size = t.pool_size;
    Some(Tenant {
        name: name.to_string(),
        declared: true,
        min_server_conn,
        max_server_conn: t.max_server_conn,
        weight,
        max_queue: t.max_queue.or(raw.max_queue),
        max_client_conn: t.max_client_conn,
        max_pinned: t.max_pinned,
        shared,
    })
}

fn check_pool_size(what: &str, size: Option<u32>, problems: &mut Vec<String>) {
    if size == Some(0) {
        problems.push(format!("{what} = 0: a pool needs at least one server connection"));
    }
}

fn resolve_database(
    name: &str,
    d: &RawDatabase,
    raw: &RawConfig,
    problems: &mut Vec<String>,
) -> Option<Database> {
    let before = problems.len();
    check_pool_size(&format!("databases.{name}.pool_size"), d.pool_size, problems);
    check_nonzero(
        &format!("databases.{name}.max_db_connections"),
        d.max_db_connections,
        problems,
    );
    check_nonzero(
        &format!("databases.{name}.server_connect_concurrency"),
        d.server_connect_concurrency,
        problems,
    );
    let port = d.port.unwrap_or(defaults::PORT);
    let host = d.host.clone().unwrap_or_else(|| defaults::HOST.to_string());
    let backend = if host.starts_with('/') {
        Backend::Unix {
            dir: PathBuf::from(host),
            port,
        }
    } else if host.is_empty() {
        problems.push(format!("databases.{name}.host is empty"));
        return None;
    } else {
        Backend::Tcp { host, port }
    };
    let server_credentials = match (&d.server_user, &d.server_password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        (None, None) => None,
        (Some(_), None) => {
            problems.push(format!(
                "databases.{name}.server_user is set without server_password"
            ));
            None
        }
        (None, Some(_)) => {
            problems.push(format!(
                "databases.{name}.server_password is set without server_user"
            ));
            None
        }
    };
    if problems.len() > before {
        return None;
    }
    let mut shared = d.shared();
    shared.pool_size = d.pool_size;
    Some(Database {
        name: name.to_string(),
        backend,
        dbname: d.dbname.clone().unwrap_or_else(|| name.to_string()),
        max_db_connections: d.max_db_connections.or(raw.max_db_connections),
        server_connect_concurrency: d
            .server_connect_concurrency
            .or(raw.server_connect_concurrency)
            .unwrap_or(defaults::SERVER_CONNECT_CONCURRENCY),
        server_credentials,
        listen_user: d.listen_user.clone(),
        shared,
    })
}

fn resolve_user(
    name: &str,
    u: &RawUser,
    default_auth: AuthMethod,
    raw: &RawConfig,
    tenants: &BTreeMap<String, Arc<Tenant>>,
    problems: &mut Vec<String>,
) -> Option<User> {
    let before = problems.len();
    check_pool_size(&format!("users.{name}.pool_size"), u.pool_size, problems);
    check_nonzero(
        &format!("users.{name}.max_client_conn"),
        u.max_client_conn,
        problems,
    );
    let tenant = match &u.tenant {
        Some(t) => match tenants.get(t) {
            Some(t) => t.clone(),
            None => {
                if !raw.tenants.contains_key(t) {
                    problems.push(format!("users.{name}.tenant = {t:?}: no [tenants.{t}] table"));
                }
                return None;
            }
        },
        None => Arc::new(Tenant {
            name: name.to_string(),
            declared: false,
            min_server_conn: defaults::MIN_SERVER_CONN,
            max_server_conn: None,
            weight: defaults::WEIGHT,
            max_queue: raw.max_queue,
            max_client_conn: None,
            max_pinned: None,
            shared: RawShared::default(),
        }),
    };
    let auth = u.auth.unwrap_or(default_auth);
    let secret = match u.password.as_deref().map(Secret::parse) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            problems.push(format!("users.{name}.password: {e}"));
            None
        }
    };
    match (auth, &secret) {
        (AuthMethod::Trust, _) => {}
        (_, None) if u.password.is_none() => problems.push(format!(
            "users.{name}: no password, and auth is not \"trust\" (set password, or auth = \"trust\")"
        )),
        (AuthMethod::ScramSha256, Some(Secret::Md5(_))) => problems.push(format!(
            "users.{name}: an md5 hash cannot verify SCRAM-SHA-256 clients (use auth = \"md5\", a plaintext password or a SCRAM verifier)"
        )),
        _ => {}
    }
    let scram = match &secret {
        Some(Secret::Scram(v)) => Some(v.clone()),
        Some(Secret::Plain(p)) => Some(ScramVerifier::generate(p)),
        _ => None,
    };
    let server_password = u.server_password.clone().or(match &secret {
        Some(Secret::Plain(p)) => Some(p.clone()),
        _ => None,
    });
    if problems.len() > before {
        return None;
    }
    let mut shared = u.shared();
    shared.pool_size = u.pool_size;
    Some(User {
        name: name.to_string(),
        auth,
        secret,
        scram,
        server_password,
        tenant,
        max_client_conn: u.max_client_conn,
        shared,
    })
}
