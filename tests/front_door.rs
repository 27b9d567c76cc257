//! The front door: startup packets (protocol versions, negotiation, SSL/GSS refusal,
//! replication, size limits), authentication (SCRAM, md5, verifiers, trust), client caps,
//! startup parameters as session settings, login timeout, and `--check`.
//! Every refusal during startup is FATAL with a precise SQLSTATE, and the connection closes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::str::FromStr;
use std::time::Duration;

use md5::{Digest as _, Md5};
use support::raw::{self, Msg, Raw};
use support::{cluster, connect, eventually, start_proxy, TestDb};
use tokio::time::timeout;
use tokio_postgres::error::DbError;
use tokio_postgres::{NoTls, SimpleQueryMessage};

const LIMIT: Duration = Duration::from_secs(30);

/// A config with this database and a user table written by the test (no default password).
fn config_with_user(db: &TestDb, extra_global: &str, user_table: &str) -> String {
    let c = cluster();
    format!(
        "listen_addr = \"127.0.0.1:0\"\n{extra_global}\n\n[databases.{db}]\nhost = \"{host}\"\nport = {port}\n\n[users.{db}]\n{user_table}\n",
        db = db.user,
        host = c.host(),
        port = c.port(),
    )
}

/// A tokio-postgres config for `user`/`password`/`dbname` through the proxy.
fn pg_config(
    proxy: &pgsluice::app::Proxy,
    user: &str,
    password: &str,
    dbname: &str,
) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::from_str(&format!(
        "host=127.0.0.1 port={} connect_timeout=30",
        proxy.addr().port()
    ))
    .unwrap();
    cfg.user(user).password(password).dbname(dbname);
    cfg
}

/// Connects with `cfg`, drives the connection in a task.
async fn connect_cfg(cfg: &tokio_postgres::Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = timeout(LIMIT, cfg.connect(NoTls))
        .await
        .expect("login timed out")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Expects the login with `cfg` to fail with a FATAL `code`; returns the error.
async fn login_fails(cfg: &tokio_postgres::Config, code: &str) -> DbError {
    let err = match connect_cfg(cfg).await {
        Ok(_) => panic!("login succeeded, expected FATAL {code}"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err:?}"))
        .clone();
    assert_eq!(
        db.code().code(),
        code,
        "unexpected SQLSTATE; message: {}",
        db.message()
    );
    assert_eq!(db.severity(), "FATAL", "startup errors are FATAL: {db:?}");
    db
}

/// Reads the next message, which must be a FATAL ErrorResponse with `code`, then expects EOF.
async fn expect_fatal(r: &mut Raw, code: &str) -> Msg {
    let m = timeout(LIMIT, r.recv())
        .await
        .expect("timed out waiting for an ErrorResponse")
        .expect("connection closed without an ErrorResponse");
    assert_eq!(
        m.tag, b'E',
        "expected ErrorResponse, got {:?}: {:?}",
        m.tag as char, m
    );
    assert_eq!(
        m.code(),
        code,
        "unexpected SQLSTATE; message: {:?}",
        m.field(b'M')
    );
    assert_eq!(m.field(b'S').as_deref(), Some("FATAL"), "{:?}", m.field(b'M'));
    r.expect_closed().await;
    m
}

/// The proxy closes the connection (EOF) with nothing more to say.
/// Runs `sql` on a logged-in raw connection and returns the first column of every DataRow.
async fn raw_query(r: &mut Raw, sql: &str) -> Vec<String> {
    r.send(&raw::query(sql)).await;
    let msgs = timeout(LIMIT, r.recv_until(b'Z')).await.expect("query timed out");
    assert!(
        msgs.iter().all(|m| m.tag != b'E'),
        "query {sql:?} failed: {:?}",
        msgs.iter().find(|m| m.tag == b'E').and_then(|m| m.field(b'M'))
    );
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| first_column(&m.body))
        .collect()
}

/// The first column of a DataRow body, as text.
fn first_column(body: &[u8]) -> String {
    let n = u16::from_be_bytes([body[0], body[1]]);
    assert!(n >= 1);
    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
    let len = usize::try_from(len).expect("NULL column");
    String::from_utf8_lossy(&body[6..6 + len]).into_owned()
}

/// Raw trust login: everything up to and including ReadyForQuery.
async fn raw_login(r: &mut Raw, db: &TestDb) -> Vec<Msg> {
    timeout(LIMIT, r.login_trust(&db.user, &db.user))
        .await
        .expect("login timed out")
}

/// Splits a ParameterStatus body into (name, value).
fn parameter_status(m: &Msg) -> (String, String) {
    let mut parts = m.body.split(|&b| b == 0);
    let name = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
    let value = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
    (name, value)
}

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

async fn show(c: &tokio_postgres::Client, name: &str) -> String {
    let r = timeout(LIMIT, c.simple_query(&format!("SHOW {name}")))
        .await
        .unwrap()
        .unwrap();
    simple_rows(&r).remove(0)
}

/// `"md5" + hex(md5(password + user))`.
fn md5_secret(user: &str, password: &str) -> String {
    let digest = Md5::digest(format!("{password}{user}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("md5{hex}")
}

// 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_versions_are_refused() {
    let db = TestDb::new("fd_proto");
    let proxy = start_proxy(&db.config("", "auth = \"trust\"")).await;
    for version in [0x0002_0000u32, (1234 << 16) | 5690] {
        let mut r = Raw::connect(proxy.addr()).await;
        r.startup(version, &[("user", &db.user), ("database", &db.user)])
            .await;
        let m = expect_fatal(&mut r, "0A000").await;
        let text = m.field(b'M').unwrap();
        assert!(
            text.contains("unsupported frontend protocol"),
            "version {version:#x}: {text}"
        );
    }
}

// 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_minor_and_pq_options_are_negotiated_down() {
    let db = TestDb::new("fd_nego");
    let proxy = start_proxy(&db.config("", "auth = \"trust\"")).await;
    let mut r = Raw::connect(proxy.addr()).await;
    r.startup(
        0x0003_0002,
        &[("user", &db.user), ("database", &db.user), ("_pq_.foo", "bar")],
    )
    .await;
    let msgs = timeout(LIMIT, r.recv_until(b'Z')).await.unwrap();
    let v = &msgs[0];
    assert_eq!(
        v.tag, b'v',
        "first message must be NegotiateProtocolVersion: {msgs:?}"
    );
    let version = u32::from_be_bytes(v.body[0..4].try_into().unwrap());
    // Newest minor supported is 0 (PostgreSQL and libpq put it as the whole 3.0 code).
    assert_eq!(version & 0xffff, 0, "newest minor");
    assert_eq!(version, 0x0003_0000, "PostgreSQL sends PG_PROTOCOL(3, 0)");
    let count = u32::from_be_bytes(v.body[4..8].try_into().unwrap());
    assert_eq!(count, 1);
    assert_eq!(&v.body[8..], b"_pq_.foo\0");
    assert!(
        msgs.iter().any(|m| m.tag == b'R'),
        "AuthenticationOk expected: {msgs:?}"
    );
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    assert_eq!(raw_query(&mut r, "select 40 + 2").await, vec!["42"]);
}

// 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_declined_then_startup_works() {
    let db = TestDb::new("fd_ssl");
    let proxy = start_proxy(&db.config("", "auth = \"trust\"")).await;
    for code in [80_877_103u32, 80_877_104] {
        let mut r = Raw::connect(proxy.addr()).await;
        let mut req = 8u32.to_be_bytes().to_vec();
        req.extend_from_slice(&code.to_be_bytes());
        r.send(&req).await;
        let answer = timeout(LIMIT, r.read_raw(1)).await.unwrap();
        assert_eq!(answer, b"N", "request code {code}");
        raw_login(&mut r, &db).await;
        assert_eq!(
            raw_query(&mut r, "select 'plain'").await,
            vec!["plain"],
            "after {code}"
        );
    }
}

// 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connections_are_refused() {
    let db = TestDb::new("fd_repl");
    let proxy = start_proxy(&db.config("", "auth = \"trust\"")).await;
    for value in ["true", "on", "database"] {
        let mut r = Raw::connect(proxy.addr()).await;
        r.startup(
            196_608,
            &[("user", &db.user), ("database", &db.user), ("replication", value)],
        )
        .await;
        let m = expect_fatal(&mut r, "0A000").await;
        assert!(m.field(b'M').unwrap().contains("replication"), "{m:?}");
    }
    let mut r = Raw::connect(proxy.addr()).await;
    r.startup(
        196_608,
        &[
            ("user", &db.user),
            ("database", &db.user),
            ("replication", "false"),
        ],
    )
    .await;
    let msgs = timeout(LIMIT, r.recv_until(b'Z')).await.unwrap();
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    assert_eq!(raw_query(&mut r, "select 1").await, vec!["1"]);
}

// 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packet_length_is_checked_before_reading() {
    let db = TestDb::new("fd_len");
    let proxy = start_proxy(&db.config("", "auth = \"trust\"")).await;
    // A length prefix below the minimum of 8.
    let mut r = Raw::connect(proxy.addr()).await;
    r.send(&4u32.to_be_bytes()).await;
    expect_fatal(&mut r, "08P01").await;
    // Announces 20,000 bytes (over PostgreSQL's 10,000), sends a few: refused at once with
    // PostgreSQL's "invalid length of startup packet" code, not after waiting for the rest.
    let mut r = Raw::connect(proxy.addr()).await;
    let mut b = 20_000u32.to_be_bytes().to_vec();
    b.extend_from_slice(&196_608u32.to_be_bytes());
    b.extend_from_slice(b"user\0");
    r.send(&b).await;
    // (A proxy waiting for the rest would answer nothing, then 57014 at its login timeout.)
    expect_fatal(&mut r, "08P01").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_before_the_startup_packet_closes_quietly() {
    // node-postgres's `client.connect(); client.end()` may write Terminate before its startup
    // packet. PostgreSQL closes without an ErrorResponse (which node would raise as an
    // unhandled error); so must the proxy.
    let db = TestDb::new("fd_term");
    let proxy = start_proxy(&db.config("", "auth = \"trust\"")).await;
    let mut r = Raw::connect(proxy.addr()).await;
    let mut b = vec![b'X', 0, 0, 0, 4];
    b.extend_from_slice(&raw::startup_packet(196_608, &[("user", &db.user)]));
    r.send(&b).await;
    timeout(LIMIT, r.expect_closed()).await.unwrap();
}

// 6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_after_login_is_fatal_54000() {
    let db = TestDb::new("fd_big");
    let proxy = start_proxy(&db.config("max_packet_size = 1024", "auth = \"trust\"")).await;
    let mut r = Raw::connect(proxy.addr()).await;
    raw_login(&mut r, &db).await;
    let sql = format!("select '{}'", "x".repeat(5000 - 10));
    let q = raw::query(&sql);
    assert_eq!(q.len(), 5 + 5000);
    r.send(&q).await;
    let m = expect_fatal(&mut r, "54000").await;
    assert!(m.field(b'M').unwrap().contains("1024"), "{m:?}");
    // The proxy is unharmed.
    let mut r = Raw::connect(proxy.addr()).await;
    raw_login(&mut r, &db).await;
    assert_eq!(raw_query(&mut r, "select 'still here'").await, vec!["still here"]);
}

// 7.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_frontend_message_after_login_is_fatal_08p01() {
    let db = TestDb::new("fd_tag");
    let proxy = start_proxy(&db.config("", "auth = \"trust\"")).await;
    let mut r = Raw::connect(proxy.addr()).await;
    raw_login(&mut r, &db).await;
    r.send(&raw::msg(b'#', b"junk")).await;
    expect_fatal(&mut r, "08P01").await;
    // Still serving others.
    let mut r = Raw::connect(proxy.addr()).await;
    raw_login(&mut r, &db).await;
    assert_eq!(raw_query(&mut r, "select 1").await, vec!["1"]);
}

// 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_do_not_reveal_users_or_databases() {
    let db = TestDb::new("fd_auth");
    let proxy = start_proxy(&db.config("", "")).await;
    let shape = |user: &str| format!("password authentication failed for user \"{user}\"");

    let e = login_fails(&pg_config(&proxy, &db.user, "wrong", &db.user), "28P01").await;
    assert_eq!(e.message(), shape(&db.user));

    let ghost = format!("{}_ghost", db.user);
    let e = login_fails(&pg_config(&proxy, &ghost, "wrong", &db.user), "28P01").await;
    assert_eq!(e.message(), shape(&ghost));

    let e = login_fails(&pg_config(&proxy, &db.user, &db.password, "no_such_db"), "3D000").await;
    assert!(e.message().contains("no_such_db"), "{}", e.message());

    // The database is checked only after authentication.
    let e = login_fails(&pg_config(&proxy, &db.user, "wrong", "no_such_db"), "28P01").await;
    assert_eq!(e.message(), shape(&db.user));

    // And the right credentials still work.
    let c = connect(&db.url(&proxy)).await;
    let r = c.simple_query("select 7").await.unwrap();
    assert_eq!(simple_rows(&r), vec!["7"]);
}

// 9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_auth_with_plaintext_and_hashed_secrets() {
    // Plaintext secret.
    let db = TestDb::new("fd_md5p");
    let proxy = start_proxy(&db.config("", "auth = \"md5\"")).await;
    let c = connect(&db.url(&proxy)).await;
    assert_eq!(simple_rows(&c.simple_query("select 1").await.unwrap()), vec!["1"]);
    login_fails(&pg_config(&proxy, &db.user, "wrong", &db.user), "28P01").await;

    // Hashed secret, plaintext only as server_password.
    let db = TestDb::new("fd_md5h");
    let secret = md5_secret(&db.user, &db.password);
    let proxy = start_proxy(&config_with_user(
        &db,
        "",
        &format!(
            "auth = \"md5\"\npassword = \"{secret}\"\nserver_password = \"{}\"",
            db.password
        ),
    ))
    .await;
    let c = connect(&db.url(&proxy)).await;
    assert_eq!(
        simple_rows(&c.simple_query("select current_user").await.unwrap()),
        vec![db.user.clone()]
    );
    let e = login_fails(&pg_config(&proxy, &db.user, "wrong", &db.user), "28P01").await;
    assert_eq!(
        e.message(),
        format!("password authentication failed for user \"{}\"", db.user)
    );
}

// 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_verifier_secret_passes_through() {
    let db = TestDb::new("fd_scram");
    let verifier = db.verifier();
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let proxy = start_proxy(&config_with_user(&db, "", &format!("password = \"{verifier}\""))).await;
    let c = connect(&db.url(&proxy)).await;
    assert_eq!(
        simple_rows(&c.simple_query("select current_user").await.unwrap()),
        vec![db.user.clone()]
    );
    assert_eq!(
        simple_rows(&c.simple_query("select 1 + 1").await.unwrap()),
        vec!["2"]
    );
    let e = login_fails(&pg_config(&proxy, &db.user, "wrong", &db.user), "28P01").await;
    assert_eq!(
        e.message(),
        format!("password authentication failed for user \"{}\"", db.user)
    );
}

// 11.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_user_logs_in_with_any_password() {
    let db = TestDb::new("fd_trust");
    let proxy = start_proxy(&config_with_user(
        &db,
        "",
        &format!("auth = \"trust\"\nserver_password = \"{}\"", db.password),
    ))
    .await;
    let mut no_password = tokio_postgres::Config::from_str(&format!(
        "host=127.0.0.1 port={} connect_timeout=30",
        proxy.addr().port()
    ))
    .unwrap();
    no_password.user(&db.user).dbname(&db.user);
    let c = connect_cfg(&no_password).await.unwrap();
    assert_eq!(
        simple_rows(&c.simple_query("select current_user").await.unwrap()),
        vec![db.user.clone()]
    );
    let c = connect_cfg(&pg_config(&proxy, &db.user, "anything at all", &db.user))
        .await
        .unwrap();
    assert_eq!(simple_rows(&c.simple_query("select 3").await.unwrap()), vec!["3"]);
}

// 12.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_client_conn_refuses_extra_clients_with_53300() {
    let db = TestDb::new("fd_cap");
    let proxy = start_proxy(&db.config("max_client_conn = 2", "")).await;
    let a = connect(&db.url(&proxy)).await;
    let b = connect(&db.url(&proxy)).await;
    a.simple_query("select 1").await.unwrap();
    b.simple_query("select 1").await.unwrap();
    let cfg = pg_config(&proxy, &db.user, &db.password, &db.user);
    let e = login_fails(&cfg, "53300").await;
    assert!(e.message().contains("max_client_conn"), "{}", e.message());
    drop(a);
    assert!(
        eventually(LIMIT, || proxy.clients() <= 1).await,
        "the slot of a client that left was not given back: {} clients",
        proxy.clients()
    );
    let c = connect_cfg(&cfg).await.unwrap();
    assert_eq!(simple_rows(&c.simple_query("select 2").await.unwrap()), vec!["2"]);
    b.simple_query("select 1").await.unwrap();
}

// 13.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_become_session_settings() {
    let db = TestDb::new("fd_set");
    let proxy = start_proxy(&db.config("", "auth = \"trust\"")).await;

    // What the client is told at login.
    let mut r = Raw::connect(proxy.addr()).await;
    r.startup(
        196_608,
        &[
            ("user", &db.user),
            ("database", &db.user),
            ("application_name", "foo"),
            ("options", "-c statement_timeout=1234"),
        ],
    )
    .await;
    let msgs = timeout(LIMIT, r.recv_until(b'Z')).await.unwrap();
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    let params: Vec<(String, String)> = msgs
        .iter()
        .filter(|m| m.tag == b'S')
        .map(parameter_status)
        .collect();
    assert!(
        params.contains(&("application_name".to_string(), "foo".to_string())),
        "ParameterStatus seen: {params:?}"
    );
    assert_eq!(raw_query(&mut r, "SHOW application_name").await, vec!["foo"]);
    assert_eq!(raw_query(&mut r, "SHOW statement_timeout").await, vec!["1234ms"]);

    // The same through a driver.
    let mut cfg = pg_config(&proxy, &db.user, &db.password, &db.user);
    cfg.application_name("foo").options("-c statement_timeout=1234");
    let c = connect_cfg(&cfg).await.unwrap();
    assert_eq!(show(&c, "application_name").await, "foo");
    assert_eq!(show(&c, "statement_timeout").await, "1234ms");

    // An invalid value fails at login with PostgreSQL's own code, every time.
    let mut bad = pg_config(&proxy, &db.user, &db.password, &db.user);
    bad.options("-c statement_timeout=banana");
    for attempt in 0..2 {
        let e = login_fails(&bad, "22023").await;
        assert!(
            e.message().contains("statement_timeout"),
            "attempt {attempt}: {}",
            e.message()
        );
    }
    // An unknown setting name.
    let mut unknown = pg_config(&proxy, &db.user, &db.password, &db.user);
    unknown.options("-c no_such_setting=1");
    let e = login_fails(&unknown, "42704").await;
    assert!(e.message().contains("no_such_setting"), "{}", e.message());
    // Good logins are not affected.
    let c = connect(&db.url(&proxy)).await;
    assert_eq!(show(&c, "statement_timeout").await, "0");
}

// 14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_hits_client_login_timeout() {
    let db = TestDb::new("fd_tmo");
    let proxy = start_proxy(&db.config("client_login_timeout = \"300ms\"", "")).await;
    let mut r = Raw::connect(proxy.addr()).await;
    let m = timeout(Duration::from_secs(10), expect_fatal(&mut r, "57014"))
        .await
        .unwrap();
    let text = m.field(b'M').unwrap();
    assert!(text.contains("client_login_timeout"), "{text}");
}

// 15.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_problem() {
    let dir = std::env::temp_dir().join(support::unique("fd_check"));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen_addr = \"nonsense\"\n\n[databases.x]\nhost = \"127.0.0.1\"\npool_size = 0\n\n[users.nopass]\n",
    )
    .unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "listen_addr = \"127.0.0.1:6432\"\n\n[databases.x]\nhost = \"127.0.0.1\"\n\n[users.u]\npassword = \"secret\"\n",
    )
    .unwrap();

    let run = |path: std::path::PathBuf| async move {
        let out = timeout(
            LIMIT,
            tokio::process::Command::new(env!("CARGO_BIN_EXE_pgsluice"))
                .arg("--check")
                .arg("--config")
                .arg(&path)
                .output(),
        )
        .await
        .expect("pgsluice --check timed out")
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    };

    let (status, text) = run(bad).await;
    assert!(!status.success(), "invalid config accepted:\n{text}");
    assert!(
        text.contains("listen_addr"),
        "listen_addr problem missing:\n{text}"
    );
    assert!(text.contains("users.nopass"), "password problem missing:\n{text}");
    assert!(
        text.contains("databases.x.pool_size"),
        "pool_size problem missing:\n{text}"
    );

    let (status, text) = run(good).await;
    assert!(status.success(), "valid config refused:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
