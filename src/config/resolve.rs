//! Turns the raw model into a `Config`, collecting every problem instead of stopping at the first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::model::{defaults, AuthMethod, RawConfig, RawDatabase, RawUser};
use super::{Backend, Config, ConfigError, Database, User};
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
    let max_packet_size = raw.max_packet_size.unwrap_or(defaults::MAX_PACKET_SIZE);
    if max_packet_size < 1024 {
        problems.push(format!(
            "max_packet_size = {max_packet_size}: must be at least 1024 bytes"
        ));
    }
    let default_pool_size = raw.default_pool_size.unwrap_or(defaults::DEFAULT_POOL_SIZE);
    check_pool_size("default_pool_size", Some(default_pool_size), &mut problems);
    let max_client_conn = raw.max_client_conn.unwrap_or(defaults::MAX_CLIENT_CONN);
    if max_client_conn == 0 {
        problems.push("max_client_conn = 0: no client could ever connect".to_string());
    }
    let default_auth = raw.auth_type.unwrap_or(defaults::AUTH_TYPE);

    if raw.databases.is_empty() {
        problems.push("no [databases.NAME] table: clients would have nowhere to go".to_string());
    }
    let mut databases = BTreeMap::new();
    for (name, d) in &raw.databases {
        if let Some(db) = resolve_database(name, d, &mut problems) {
            databases.insert(name.clone(), Arc::new(db));
        }
    }
    if raw.users.is_empty() {
        problems.push("no [users.NAME] table: no client could log in".to_string());
    }
    let mut users = BTreeMap::new();
    for (name, u) in &raw.users {
        if let Some(user) = resolve_user(name, u, default_auth, &mut problems) {
            users.insert(name.clone(), Arc::new(user));
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
        max_client_conn,
        max_packet_size,
        max_prepared_statements: raw
            .max_prepared_statements
            .unwrap_or(defaults::MAX_PREPARED_STATEMENTS),
        server_connect_timeout: raw
            .server_connect_timeout
            .unwrap_or(defaults::SERVER_CONNECT_TIMEOUT),
        server_check_delay: raw.server_check_delay.unwrap_or(defaults::SERVER_CHECK_DELAY),
        query_wait_timeout: raw.query_wait_timeout.unwrap_or(defaults::QUERY_WAIT_TIMEOUT),
        client_login_timeout: raw.client_login_timeout.unwrap_or(defaults::CLIENT_LOGIN_TIMEOUT),
        server_reset_query: raw
            .server_reset_query
            .unwrap_or_else(|| defaults::SERVER_RESET_QUERY.to_string()),
        default_pool_size,
        pool_mode: raw.pool_mode.unwrap_or(defaults::POOL_MODE),
        auth_type: default_auth,
        databases,
        users,
        warnings,
    })
}

fn check_pool_size(what: &str, size: Option<u32>, problems: &mut Vec<String>) {
    if size == Some(0) {
        problems.push(format!("{what} = 0: a pool needs at least one server connection"));
    }
}

fn resolve_database(name: &str, d: &RawDatabase, problems: &mut Vec<String>) -> Option<Database> {
    let before = problems.len();
    check_pool_size(&format!("databases.{name}.pool_size"), d.pool_size, problems);
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
    Some(Database {
        name: name.to_string(),
        backend,
        dbname: d.dbname.clone().unwrap_or_else(|| name.to_string()),
        pool_size: d.pool_size,
        pool_mode: d.pool_mode,
        server_credentials,
    })
}

fn resolve_user(
    name: &str,
    u: &RawUser,
    default_auth: AuthMethod,
    problems: &mut Vec<String>,
) -> Option<User> {
    let before = problems.len();
    check_pool_size(&format!("users.{name}.pool_size"), u.pool_size, problems);
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
    Some(User {
        name: name.to_string(),
        auth,
        secret,
        scram,
        server_password,
        pool_size: u.pool_size,
        pool_mode: u.pool_mode,
    })
}
