//! `proxy.toml.example` cannot rot: it must parse, every key of the config model must be
//! documented in it, and every default it writes out must be the code's default. Also checks
//! config validation itself: all problems at once, unknown keys rejected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use pgsluice::auth::md5::password_hash;
use pgsluice::auth::secret::{ScramVerifier, Secret};
use pgsluice::config::model::{defaults, RawDatabase, RawTenant, RawUser};
use pgsluice::config::{AuthMethod, Backend, Config, ConfigError, PoolMode, RawConfig};

const EXAMPLE: &str = include_str!("../proxy.toml.example");

/// The field names of a `Raw*` struct, as strings. The destructuring pattern is exhaustive, so
/// a field added to the model does not compile here until it is listed, and then
/// `every_model_key_is_documented` demands that the example documents it.
macro_rules! keys_of {
    ($ty:ident; $($field:ident),* $(,)?) => {{
        #[allow(dead_code)]
        fn exhaustive(v: $ty) {
            let $ty { $($field: _),* } = v;
        }
        &[$(stringify!($field)),*]
    }};
}

/// Names as strings.
macro_rules! names {
    ($($field:ident),* $(,)?) => {
        &[$(stringify!($field)),*]
    };
}

/// Calls `$m!` with the given tokens followed by the keys every scope shares (the model's
/// `scope_table!` fields), so they are listed once.
macro_rules! with_shared_keys {
    ($m:ident!($($pre:tt)*)) => {
        $m!($($pre)*
            pool_mode,
            session_state,
            min_pool_size,
            reserve_pool_size,
            reserve_pool_timeout,
            query_wait_timeout,
            query_wait_notify,
            client_login_timeout,
            client_idle_timeout,
            pinned_idle_timeout,
            max_pinned,
            idle_transaction_timeout,
            query_timeout,
            server_connect_timeout,
            server_idle_timeout,
            server_lifetime,
            server_check_delay,
        )
    };
}

const GLOBAL_KEYS: &[&str] = with_shared_keys!(keys_of!(RawConfig;
    listen_addr,
    metrics_listen_addr,
    metrics_user_label,
    default_pool_size,
    max_client_conn,
    max_db_connections,
    server_connect_concurrency,
    max_queue,
    max_packet_size,
    max_prepared_statements,
    auth_type,
    server_reset_query,
    shutdown_timeout,
    log_format,
    databases,
    tenants,
    users,
));

const DATABASE_KEYS: &[&str] = with_shared_keys!(keys_of!(RawDatabase;
    host,
    port,
    dbname,
    pool_size,
    max_db_connections,
    server_connect_concurrency,
    server_user,
    server_password,
    listen_user,
));

const TENANT_KEYS: &[&str] = with_shared_keys!(keys_of!(RawTenant;
    min_server_conn,
    max_server_conn,
    weight,
    max_queue,
    max_client_conn,
    pool_size,
));

const USER_KEYS: &[&str] = with_shared_keys!(keys_of!(RawUser;
    password,
    auth,
    tenant,
    max_client_conn,
    pool_size,
    server_password,
));

/// Keys every scope shares (documented once, in the global section, with their precedence).
const SHARED_KEYS: &[&str] = with_shared_keys!(names!());

/// Global keys that are tables rather than `key = value` lines.
const TABLE_KEYS: &[&str] = &["databases", "tenants", "users"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Global,
    Database,
    Tenant,
    User,
}

impl Section {
    fn keys(self) -> &'static [&'static str] {
        match self {
            Section::Global => GLOBAL_KEYS,
            Section::Database => DATABASE_KEYS,
            Section::Tenant => TENANT_KEYS,
            Section::User => USER_KEYS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `key = value`: set for real.
    Set,
    /// `# key = value`: the default, written out.
    Default,
    /// `# e.g. key = value`: an illustration.
    Example,
}

/// One `key = value` line of the example, whatever its kind.
#[derive(Debug, Clone)]
struct KeyLine {
    index: usize,
    section: Section,
    kind: Kind,
    key: String,
    /// The line as TOML, comment markers removed.
    toml: String,
}

fn section_of(header: &str) -> Section {
    if header.starts_with("[databases.") {
        Section::Database
    } else if header.starts_with("[tenants.") {
        Section::Tenant
    } else if header.starts_with("[users.") {
        Section::User
    } else {
        panic!("unexpected table header in the example: {header}")
    }
}

/// `key = ...` → `key`, when the text starts with an identifier followed by ` =`.
fn key_of(text: &str) -> Option<&str> {
    let (key, _) = text.split_once(" = ")?;
    let ident = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
    ident.then_some(key)
}

fn key_lines(text: &str) -> Vec<KeyLine> {
    let mut section = Section::Global;
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.starts_with('[') {
            section = section_of(line);
            continue;
        }
        let (kind, rest) = if let Some(r) = line.strip_prefix("# e.g. ") {
            (Kind::Example, r)
        } else if let Some(r) = line.strip_prefix("# ") {
            (Kind::Default, r)
        } else {
            (Kind::Set, line)
        };
        let Some(key) = key_of(rest) else { continue };
        // Prose in a comment that merely looks like `word = ...` is not a key line.
        if kind == Kind::Default && !section.keys().contains(&key) {
            continue;
        }
        out.push(KeyLine {
            index,
            section,
            kind,
            key: key.to_string(),
            toml: rest.to_string(),
        });
    }
    out
}

/// The example with the chosen kinds of commented key lines turned into real ones.
fn uncomment(kinds: &[Kind]) -> String {
    let mut lines: Vec<String> = EXAMPLE.lines().map(str::to_string).collect();
    for kl in key_lines(EXAMPLE) {
        if kinds.contains(&kl.kind) {
            lines[kl.index] = kl.toml;
        }
    }
    lines.join("\n")
}

fn parse(text: &str) -> Config {
    match Config::parse(text) {
        Ok(c) => c,
        Err(e) => panic!("config does not parse: {e}\n---\n{text}"),
    }
}

fn invalid(text: &str) -> Vec<String> {
    match Config::parse(text) {
        Err(ConfigError::Invalid(problems)) => problems,
        other => panic!("expected ConfigError::Invalid, got {other:?}"),
    }
}

const MINIMAL: &str = "[databases.app]\n[users.u]\npassword = \"pw\"\n";

#[test]
fn example_parses_as_written() {
    let cfg = parse(EXAMPLE);
    let app = &cfg.databases["app"];
    assert_eq!(
        app.backend,
        Backend::Tcp {
            host: "127.0.0.1".into(),
            port: 5432
        }
    );
    assert_eq!(app.dbname, "app");
    assert_eq!(cfg.databases.len(), 1);

    let api = &cfg.users["app_api"];
    assert!(matches!(api.secret, Some(Secret::Plain(_))));
    assert_eq!(api.auth, AuthMethod::ScramSha256);
    assert_eq!(api.server_password.as_deref(), Some("change-me"));

    let legacy = &cfg.users["app_legacy"];
    assert_eq!(legacy.auth, AuthMethod::Md5);
    assert_eq!(
        legacy.secret,
        Some(Secret::Md5(password_hash(
            "app_legacy",
            "legacy-example-password"
        )))
    );
    assert_eq!(legacy.server_password.as_deref(), Some("legacy-example-password"));

    let workers = &cfg.users["app_workers"];
    let Some(Secret::Scram(v)) = &workers.secret else {
        panic!("app_workers should have a SCRAM verifier");
    };
    // The verifier really belongs to the password the comment names.
    assert_eq!(
        *v,
        ScramVerifier::from_password("workers-example-password", &v.salt, v.iterations)
    );
    assert_eq!(v.iterations, 4096);
    assert_eq!(workers.server_password, None);
    assert_eq!(cfg.users.len(), 3);

    // One declared tenant, with app_workers in it and the default share; the other users form
    // tenants of their own, named after them.
    assert_eq!(cfg.tenants.len(), 1);
    let batch = &cfg.tenants["batch"];
    assert!(batch.declared);
    assert_eq!(batch.min_server_conn, defaults::MIN_SERVER_CONN);
    assert_eq!(batch.weight, defaults::WEIGHT);
    assert_eq!(batch.max_server_conn, None);
    assert_eq!(batch.max_queue, None);
    assert_eq!(workers.tenant.name, "batch");
    for own in ["app_api", "app_legacy"] {
        let t = &cfg.users[own].tenant;
        assert_eq!(t.name, own);
        assert!(!t.declared);
    }
    assert_eq!(app.max_db_connections, None);
    assert_eq!(
        app.server_connect_concurrency,
        defaults::SERVER_CONNECT_CONCURRENCY
    );

    // The only pool without a password for the backend is the SCRAM pass-through one (the
    // tenant has a user, so it draws no warning).
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(cfg.warnings[0].contains("app_workers"), "{:?}", cfg.warnings);
}

#[test]
fn example_passes_pgsluice_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml.example");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .args(["--config", path, "--check"])
        .env("PGSLUICE_LOG", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
}

#[test]
fn every_model_key_is_documented() {
    let lines = key_lines(EXAMPLE);
    for (section, keys) in [
        (Section::Global, GLOBAL_KEYS),
        (Section::Database, DATABASE_KEYS),
        (Section::Tenant, TENANT_KEYS),
        (Section::User, USER_KEYS),
    ] {
        // The shared keys are documented once, in the global section.
        let own = |k: &&&str| section == Section::Global || !SHARED_KEYS.contains(k);
        for key in keys.iter().filter(|k| !TABLE_KEYS.contains(k)).filter(own) {
            assert!(
                lines.iter().any(|l| l.section == section && l.key == *key),
                "{section:?} key {key:?} is not documented in proxy.toml.example"
            );
        }
    }
    assert!(EXAMPLE.contains("\n[databases."), "no [databases.NAME] table");
    assert!(EXAMPLE.contains("\n[users."), "no [users.NAME] table");
    assert!(EXAMPLE.contains("\n[tenants."), "no [tenants.NAME] table");
}

#[test]
fn every_documented_key_exists_in_the_model() {
    for l in key_lines(EXAMPLE) {
        assert!(
            l.section.keys().contains(&l.key.as_str()) && !TABLE_KEYS.contains(&l.key.as_str()),
            "proxy.toml.example line {} documents {:?}, which is not a {:?} key",
            l.index + 1,
            l.key,
            l.section
        );
    }
}

#[test]
fn every_global_key_has_its_default_written_out() {
    let lines = key_lines(EXAMPLE);
    for key in GLOBAL_KEYS.iter().filter(|k| !TABLE_KEYS.contains(k)) {
        // Caps that are unset by default have no value to write out: an illustration instead.
        let kind = if UNSET_BY_DEFAULT.contains(key) {
            Kind::Example
        } else {
            Kind::Default
        };
        assert!(
            lines
                .iter()
                .any(|l| l.section == Section::Global && l.kind == kind && l.key == *key),
            "global key {key:?} has no `# {key} = <default>` line (or `# e.g.` for a cap unset by default)"
        );
    }
}

/// Global caps whose default is "no cap".
const UNSET_BY_DEFAULT: &[&str] = &["max_db_connections", "max_queue", "metrics_listen_addr"];

#[test]
fn written_defaults_equal_the_code_defaults() {
    let written = parse(&uncomment(&[Kind::Default]));
    let as_is = parse(EXAMPLE);
    let implicit = parse(MINIMAL);
    for cfg in [&written, &as_is, &implicit] {
        assert_eq!(
            cfg.listen_addr,
            defaults::LISTEN_ADDR.parse::<SocketAddr>().unwrap()
        );
        let d = &cfg.defaults;
        assert_eq!(d.pool_size, defaults::DEFAULT_POOL_SIZE);
        assert_eq!(cfg.max_client_conn, defaults::MAX_CLIENT_CONN);
        assert_eq!(cfg.max_packet_size, defaults::MAX_PACKET_SIZE);
        assert_eq!(cfg.metrics_listen_addr, None);
        assert_eq!(cfg.metrics_user_label, defaults::METRICS_USER_LABEL);
        assert_eq!(cfg.shutdown_timeout, defaults::SHUTDOWN_TIMEOUT);
        assert_eq!(cfg.log_format, pgsluice::config::model::LogFormat::Text);
        assert_eq!(cfg.max_prepared_statements, defaults::MAX_PREPARED_STATEMENTS);
        assert_eq!(cfg.server_reset_query, defaults::SERVER_RESET_QUERY);
        assert_eq!(d.server_connect_timeout, defaults::SERVER_CONNECT_TIMEOUT);
        assert_eq!(d.query_wait_timeout, defaults::QUERY_WAIT_TIMEOUT);
        assert_eq!(d.server_check_delay, defaults::SERVER_CHECK_DELAY);
        assert_eq!(d.client_login_timeout, defaults::CLIENT_LOGIN_TIMEOUT);
        assert_eq!(d.min_pool_size, defaults::MIN_POOL_SIZE);
        assert_eq!(d.reserve_pool_size, defaults::RESERVE_POOL_SIZE);
        assert_eq!(d.reserve_pool_timeout, defaults::RESERVE_POOL_TIMEOUT);
        assert_eq!(d.query_wait_notify, defaults::QUERY_WAIT_NOTIFY);
        assert_eq!(d.client_idle_timeout, defaults::CLIENT_IDLE_TIMEOUT);
        assert_eq!(d.idle_transaction_timeout, defaults::IDLE_TRANSACTION_TIMEOUT);
        assert_eq!(d.query_timeout, defaults::QUERY_TIMEOUT);
        assert_eq!(d.server_idle_timeout, defaults::SERVER_IDLE_TIMEOUT);
        assert_eq!(d.server_lifetime, defaults::SERVER_LIFETIME);
        assert_eq!(d.pool_mode, defaults::POOL_MODE);
        assert_eq!(
            cfg.databases["app"].server_connect_concurrency,
            defaults::SERVER_CONNECT_CONCURRENCY
        );
        // Defaults that live in resolve.rs rather than in `defaults`: compare with a config
        // that leaves them out.
        assert_eq!(cfg.auth_type, implicit.auth_type);
    }
    assert_eq!(implicit.defaults.pool_mode, PoolMode::Transaction);
    assert_eq!(implicit.auth_type, AuthMethod::ScramSha256);

    // Per-database defaults: `dbname` is the table's name, host and port as a bare table gets.
    let app = &written.databases["app"];
    assert_eq!(app.dbname, "app");
    assert_eq!(app.backend, implicit.databases["app"].backend);
    assert_eq!(
        app.backend,
        Backend::Tcp {
            host: "127.0.0.1".into(),
            port: defaults::PORT
        }
    );
    // Unset pool overrides inherit the global values.
    for user in written.users.values() {
        let s = written.pool_settings(app, user);
        assert_eq!(s.pool_size, defaults::DEFAULT_POOL_SIZE);
        assert_eq!(s.pool_mode, PoolMode::Transaction);
    }
}

#[test]
fn illustrated_values_are_valid() {
    // Every `# e.g.` line, uncommented together with the defaults, still makes a valid file:
    // the key names are accepted by the model and the values by validation.
    let cfg = parse(&uncomment(&[Kind::Default, Kind::Example]));
    let app = &cfg.databases["app"];
    assert_eq!(app.shared.pool_size, Some(10));
    assert!(app.server_credentials.is_some());
    assert_eq!(app.max_db_connections, Some(20));
    assert_eq!(app.server_connect_concurrency, 2);
    let api = &cfg.users["app_api"];
    assert_eq!(api.max_client_conn, Some(100));
    // user > tenant > database > global.
    let s = cfg.pool_settings(app, api);
    assert_eq!((s.pool_size, s.pool_mode), (5, PoolMode::Session));
    assert_eq!(s.idle_transaction_timeout, Some(Duration::from_secs(60)));
    let batch = &cfg.tenants["batch"];
    assert_eq!(batch.max_server_conn, Some(8));
    assert_eq!(batch.max_queue, Some(400));
    assert_eq!(batch.max_client_conn, Some(500));
    // app_workers sets no pool keys: its tenant's pool_size and wait bound win over the
    // database's and the global ones.
    let workers = &cfg.users["app_workers"];
    let s = cfg.pool_settings(app, workers);
    assert_eq!(s.pool_size, 8);
    assert_eq!(s.query_wait_timeout, Some(Duration::from_secs(60)));
    assert_eq!(s.pool_mode, PoolMode::Transaction);
    // A user's own tenant takes the global max_queue.
    assert_eq!(cfg.users["app_legacy"].tenant.max_queue, Some(500));
}

#[test]
fn durations_accept_off_and_zero() {
    let cfg = parse(&format!(
        "server_connect_timeout = \"off\"\nquery_wait_timeout = \"0\"\nclient_login_timeout = \"250ms\"\n{MINIMAL}"
    ));
    assert_eq!(cfg.defaults.server_connect_timeout, None);
    assert_eq!(cfg.defaults.query_wait_timeout, None);
    assert_eq!(
        cfg.defaults.client_login_timeout,
        Some(Duration::from_millis(250))
    );
    let bad = Config::parse(&format!("query_wait_timeout = \"soon\"\n{MINIMAL}"));
    assert!(
        matches!(bad, Err(ConfigError::Parse(ref m)) if m.contains("soon")),
        "{bad:?}"
    );
}

#[test]
fn validation_reports_every_problem_at_once() {
    let text = r#"
listen_addr = "localhost"
metrics_listen_addr = "localhost:9930"
default_pool_size = 0
max_client_conn = 0
max_packet_size = 10

[databases.a]
server_user = "x"

[databases.b]
host = ""

[users.nopass]

[users.md5_with_scram]
password = "md5c095921fd6ddb9ed2a90a6789928d9a5"

[users.bad_verifier]
password = "SCRAM-SHA-256$4096:c2FsdA==$nope"

[users.zero]
password = "pw"
pool_size = 0
"#;
    let problems = invalid(text);
    let expected = [
        "listen_addr \"localhost\"",
        "metrics_listen_addr",
        "max_packet_size",
        "default_pool_size = 0",
        "max_client_conn = 0",
        "databases.a.server_user is set without server_password",
        "databases.b.host is empty",
        "users.nopass: no password",
        "users.md5_with_scram: an md5 hash cannot verify SCRAM-SHA-256",
        "users.bad_verifier.password",
        "users.zero.pool_size = 0",
    ];
    for want in expected {
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "no problem mentions {want:?}: {problems:#?}"
        );
    }
    assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    // The error message lists them all.
    let msg = ConfigError::Invalid(problems).to_string();
    assert!(msg.starts_with("11 configuration problem(s)"), "{msg}");
}

#[test]
fn listen_user_must_be_a_configured_user() {
    let problems = invalid("[databases.app]\nlisten_user = \"nobody\"\n[users.u]\npassword = \"pw\"\n");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("databases.app.listen_user = \"nobody\""),
        "{problems:?}"
    );
    let cfg = parse("[databases.app]\nlisten_user = \"u\"\n[users.u]\npassword = \"pw\"\n");
    assert_eq!(cfg.databases["app"].listen_user.as_deref(), Some("u"));
}

#[test]
fn empty_config_lacks_databases_and_users() {
    let problems = invalid("");
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("[databases.NAME]"));
    assert!(problems[1].contains("[users.NAME]"));
}

#[test]
fn unknown_keys_are_rejected_everywhere() {
    for text in [
        format!("pool_size = 5\n{MINIMAL}"),
        format!("{MINIMAL}[databases.other]\nhots = \"db\"\n"),
        format!("{MINIMAL}[users.v]\npasword = \"pw\"\n"),
    ] {
        match Config::parse(&text) {
            Err(ConfigError::Parse(m)) => assert!(m.contains("unknown field"), "{m}"),
            other => panic!("unknown key accepted: {other:?}\n{text}"),
        }
    }
    // Wrong value types and enum values are parse errors too.
    for text in [
        format!("pool_mode = \"statement\"\n{MINIMAL}"),
        format!("auth_type = \"password\"\n{MINIMAL}"),
        format!("default_pool_size = \"20\"\n{MINIMAL}"),
    ] {
        assert!(
            matches!(Config::parse(&text), Err(ConfigError::Parse(_))),
            "{text}"
        );
    }
}
