//! Timeouts and limits: waiting for a server connection (`query_wait_timeout`,
//! `query_wait_notify`, cancel while queued, the reserve pool, a backend that refuses logins),
//! clients idle between or inside transactions, queries running too long (`query_timeout`,
//! cancel then give up), the server connections' own lifecycle (`server_idle_timeout`,
//! `server_lifetime`, `min_pool_size`), and the per-user and per-tenant client caps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use pgsluice::pool::{Pool, PoolStats};
use support::raw::{self, Raw};
use support::{cluster, connect, eventually, first_value, sqlstate, start_proxy, TestDb};
use tokio_postgres::{Client, NoTls};

const LIMIT: Duration = Duration::from_secs(30);

/// Reads a pool counter.
fn stat(counter: &AtomicU64) -> u64 {
    PoolStats::get(counter)
}

/// The proxy's only pool (it exists once a client logged in, or at start with `min_pool_size`).
fn only_pool(proxy: &pgsluice::app::Proxy) -> Arc<Pool> {
    let pools = proxy.pools().all();
    assert_eq!(pools.len(), 1, "exactly one pool");
    pools[0].clone()
}

/// Connects tokio-postgres, returning the login error instead of panicking.
async fn try_connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Connects, retrying while the proxy still refuses (a cap's place is given back when the
/// leaving client's task ends, shortly after its socket closed). Bounded in time and count.
async fn connect_within(url: &str, limit: Duration) -> Client {
    let deadline = tokio::time::Instant::now() + limit;
    let mut last = None;
    for _ in 0..500 {
        match try_connect(url).await {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not connect within {limit:?}: {last:?}");
}

/// Whether the backend with this pid is still in pg_stat_activity.
fn backend_alive(pid: &str) -> bool {
    cluster()
        .psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        )
        .unwrap()
        != "0"
}

/// Sends SIGCONT to a stopped backend when dropped, so a failing test never leaves one stopped.
struct Continue(String);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

/// A raw client logged in with trust auth (the config must set `auth = "trust"`).
async fn raw_login(proxy: &pgsluice::app::Proxy, db: &TestDb) -> Raw {
    let mut r = Raw::connect(proxy.addr()).await;
    let login = r.login_trust(&db.user, &db.user).await;
    assert!(login.iter().all(|m| m.tag != b'E'), "login failed: {login:?}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_client_gets_53300_at_its_wait_timeout_and_stays_usable() {
    let db = TestDb::new("to_wait");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\nquery_wait_timeout = \"300ms\"\nquery_wait_notify = \"off\"",
        "",
    ))
    .await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query("begin; select 1").await.unwrap();
    let err = b.simple_query("select 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("timed out"), "{msg}");
    // A user without a tenant key is a tenant of its own, named after it.
    assert!(msg.contains(&format!("tenant {}", db.user)), "{msg}");
    assert!(!b.is_closed(), "an ERROR, not a FATAL: b stays connected");
    a.simple_query("commit").await.unwrap();
    let r = b.simple_query("select 1").await.unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("1"));
    let pool = only_pool(&proxy);
    assert_eq!(stat(&pool.stats.wait_timeouts), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_client_is_told_once_with_a_notice_then_served() {
    let db = TestDb::new("to_notify");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\nquery_wait_notify = \"200ms\"",
        "auth = \"trust\"",
    ))
    .await;
    let a = connect(&db.url(&proxy)).await;
    let mut r = raw_login(&proxy, &db).await;
    a.simple_query("begin; select 1").await.unwrap();
    r.send(&raw::query("select 42")).await;
    // The first thing the queued client hears is the NOTICE.
    let n = r.recv().await.expect("a message, not EOF");
    assert_eq!(n.tag, b'N', "NoticeResponse first, got {n:?}");
    assert_eq!(n.field(b'S').as_deref(), Some("NOTICE"));
    assert_eq!(n.code(), "00000");
    let text = n.field(b'M').unwrap();
    assert!(
        text.starts_with(&format!(
            "no server connection available yet (pool {0}/{0}, tenant {0})",
            db.user
        )),
        "{text}"
    );
    // Keep it queued for a few more notify intervals: a window in which a repeated NOTICE
    // would arrive (an observation window, not a synchronisation).
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.simple_query("commit").await.unwrap();
    let msgs = tokio::time::timeout(LIMIT, r.recv_until(b'Z')).await.unwrap();
    assert!(
        msgs.iter().all(|m| m.tag != b'N' && m.tag != b'E'),
        "one notice per wait, then the answer: {msgs:?}"
    );
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a DataRow");
    assert!(row.body.ends_with(b"42"), "{row:?}");
    assert_eq!(msgs.last().unwrap().body, b"I");
    assert_eq!(stat(&only_pool(&proxy).stats.wait_notices), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_is_disconnected_with_fatal_57p05() {
    let db = TestDb::new("to_cidle");
    let proxy = start_proxy(&db.config("client_idle_timeout = \"300ms\"", "auth = \"trust\"")).await;
    let mut r = raw_login(&proxy, &db).await;
    let m = r.recv().await.expect("an ErrorResponse before EOF");
    assert_eq!(m.tag, b'E', "{m:?}");
    assert_eq!(m.field(b'S').as_deref(), Some("FATAL"));
    assert_eq!(m.code(), "57P05");
    let text = m.field(b'M').unwrap();
    assert!(
        text.contains("idle-session timeout") && text.contains("client_idle_timeout"),
        "{text}"
    );
    assert!(
        r.recv().await.is_none(),
        "the connection is closed after the FATAL"
    );
    assert_eq!(stat(&only_pool(&proxy).stats.client_idle_timeouts), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_timeout_counts_from_the_last_request_not_from_login() {
    let db = TestDb::new("to_cbusy");
    let proxy = start_proxy(&db.config("client_idle_timeout = \"1s\"", "")).await;
    let c = connect(&db.url(&proxy)).await;
    // 15 requests spaced a tenth of the timeout apart: together longer than the timeout, but
    // never idle anywhere near it.
    for i in 0..15 {
        let r = c.simple_query(&format!("select {i}")).await.unwrap();
        assert_eq!(first_value(&r), Some(i.to_string()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!c.is_closed());
    assert_eq!(stat(&only_pool(&proxy).stats.client_idle_timeouts), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_in_transaction_client_gets_25p03_and_its_server_comes_back_clean() {
    let db = TestDb::new("to_itx");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\nidle_transaction_timeout = \"300ms\"",
        "auth = \"trust\"",
    ))
    .await;
    let url = db.url(&proxy);
    let b = connect(&url).await;
    b.simple_query("create table t (v int)").await.unwrap();
    let mut a = raw_login(&proxy, &db).await;
    a.send(&raw::query("begin; insert into t values (1)")).await;
    let msgs = a.recv_until(b'Z').await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    assert_eq!(msgs.last().unwrap().body, b"T", "inside the block");
    // Now a sits idle inside its transaction.
    let m = a.recv().await.expect("an ErrorResponse before EOF");
    assert_eq!(m.tag, b'E', "{m:?}");
    assert_eq!(m.field(b'S').as_deref(), Some("FATAL"));
    assert_eq!(m.code(), "25P03");
    assert!(
        m.field(b'M').unwrap().contains("idle-in-transaction timeout"),
        "{m:?}"
    );
    assert!(
        a.recv().await.is_none(),
        "the connection is closed after the FATAL"
    );
    // b gets the same (only) server connection: rolled back, no block open.
    let r = b.simple_query("select count(*) from t").await.unwrap();
    assert_eq!(
        first_value(&r).as_deref(),
        Some("0"),
        "the uncommitted row is gone"
    );
    let err = b.simple_query("savepoint s").await.unwrap_err();
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("25P01"),
        "no transaction open: {err}"
    );
    let pool = only_pool(&proxy);
    assert_eq!(stat(&pool.stats.idle_transaction_timeouts), 1);
    assert_eq!(
        stat(&pool.stats.server_logins),
        1,
        "the server connection was cleaned and reused, not replaced"
    );
    assert_eq!(stat(&pool.stats.servers_closed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_past_query_timeout_is_cancelled_and_the_client_continues() {
    let db = TestDb::new("to_query");
    let proxy = start_proxy(&db.config("default_pool_size = 1\nquery_timeout = \"500ms\"", "")).await;
    let url = db.url(&proxy);
    let c = connect(&url).await;
    let d = connect(&url).await;
    let err = tokio::time::timeout(LIMIT, c.simple_query("select pg_sleep(30)"))
        .await
        .expect("the query was stopped")
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("canceling statement due to query_timeout (500ms)"),
        "{msg}"
    );
    let r = c.simple_query("select 1").await.unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("1"));
    // The same (only) server connection, with no transaction left open.
    let err = d.simple_query("savepoint s").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P01"), "{err}");
    let pool = only_pool(&proxy);
    assert!(eventually(LIMIT, || stat(&pool.stats.query_timeouts) >= 1).await);
    assert_eq!(stat(&pool.stats.query_timeout_closes), 0);
    assert_eq!(
        stat(&pool.stats.server_logins),
        1,
        "a cancelled query keeps its server connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_that_ignores_its_cancel_loses_its_server_connection_not_the_client() {
    let db = TestDb::new("to_giveup");
    let proxy = start_proxy(&db.config("default_pool_size = 2\nquery_timeout = \"500ms\"", "")).await;
    let c = connect(&db.url(&proxy)).await;
    // So that the backend, once resumed, notices at once that the proxy closed its connection
    // instead of first sleeping through the query that was sent to it.
    c.simple_query("set client_connection_check_interval = '100ms'")
        .await
        .unwrap();
    let row = c
        .query_one(
            "select pg_backend_pid()::text, current_setting('client_connection_check_interval')",
            &[],
        )
        .await
        .unwrap();
    let pid: String = row.get(0);
    assert_eq!(row.get::<_, String>(1), "100ms");
    let pool = only_pool(&proxy);
    // One server connection, idle: c's next request goes to it.
    assert!(
        eventually(LIMIT, || {
            let n = pool.counts();
            n.idle == 1 && n.active == 0 && n.connecting == 0
        })
        .await
    );
    // Stop the backend before the query reaches it, so it cannot answer the cancel (a stopped
    // process keeps the SIGINT pending), with no race against the 500ms timeout.
    let guard = Continue(pid.clone());
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(stopped.success(), "kill -STOP {pid}");
    let err = tokio::time::timeout(LIMIT, c.simple_query("select pg_sleep(20)"))
        .await
        .expect("the proxy gave up on the query")
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("did not stop after a cancel"), "{msg}");
    assert!(!c.is_closed());
    assert_eq!(stat(&pool.stats.query_timeout_closes), 1);
    assert!(stat(&pool.stats.query_timeouts) >= 1);
    // The client goes on, on another server connection.
    let new_pid = first_value(&c.simple_query("select pg_backend_pid()").await.unwrap()).unwrap();
    assert_ne!(new_pid, pid);
    drop(guard);
    // Resumed, the backend finds its connection closed and exits.
    assert!(
        eventually(LIMIT, || !backend_alive(&pid)).await,
        "backend {pid} exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_takes_a_queued_client_out_of_the_queue() {
    let db = TestDb::new("to_qcancel");
    let proxy = start_proxy(&db.config("default_pool_size = 1\nquery_wait_notify = \"off\"", "")).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query("begin; select 1").await.unwrap();
    let pool = only_pool(&proxy);
    let token = b.cancel_token();
    let query = tokio::spawn(async move {
        let r = b.simple_query("select 1").await;
        (b, r)
    });
    assert!(eventually(LIMIT, || pool.counts().waiting == 1).await);
    token.cancel_query(NoTls).await.unwrap();
    let (b, res) = tokio::time::timeout(LIMIT, query)
        .await
        .expect("the wait ended")
        .unwrap();
    let err = res.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("waiting for a server connection"), "{msg}");
    assert_eq!(pool.counts().waiting, 0, "out of the queue");
    assert_eq!(stat(&pool.stats.wait_cancelled), 1);
    a.simple_query("commit").await.unwrap();
    let r = b.simple_query("select 1").await.unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("1"));
    assert_eq!(stat(&pool.stats.wait_timeouts), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connection_is_closed_after_server_idle_timeout() {
    let db = TestDb::new("to_sidle");
    let proxy = start_proxy(&db.config("server_idle_timeout = \"1s\"", "")).await;
    let c = connect(&db.url(&proxy)).await;
    c.simple_query("select 1").await.unwrap();
    let pool = only_pool(&proxy);
    let n = pool.counts();
    assert_eq!(
        (n.idle, n.active),
        (1, 0),
        "one idle server connection after the query"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            pool.counts().idle == 0
                && stat(&pool.stats.servers_idle_closed) >= 1
                && db.backend_connections() == 0
        })
        .await,
        "counts {:?}, servers_idle_closed {}, backend connections {}",
        pool.counts(),
        stat(&pool.stats.servers_idle_closed),
        db.backend_connections()
    );
    // The client is still there and gets a fresh server connection.
    let r = c.simple_query("select 2").await.unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_lifetime_retires_a_connection_only_once_it_is_idle() {
    let db = TestDb::new("to_life");
    let proxy = start_proxy(&db.config("server_lifetime = \"1s\"\nserver_idle_timeout = \"off\"", "")).await;
    let c = connect(&db.url(&proxy)).await;
    let pool = only_pool(&proxy);
    c.simple_query("begin").await.unwrap();
    let pid = first_value(&c.simple_query("select pg_backend_pid()").await.unwrap()).unwrap();
    // (Counted from here: on a slow machine the login's connection may already have been
    // retired at BEGIN's checkout.)
    let retired = stat(&pool.stats.servers_retired);
    c.simple_query("select pg_sleep(1.5)").await.unwrap();
    // Past its lifetime, but under a running transaction: not retired.
    let same = first_value(&c.simple_query("select pg_backend_pid()").await.unwrap()).unwrap();
    assert_eq!(same, pid);
    assert_eq!(stat(&pool.stats.servers_retired), retired);
    c.simple_query("commit").await.unwrap();
    assert!(
        eventually(LIMIT, || stat(&pool.stats.servers_retired) > retired).await,
        "retired once idle"
    );
    let new_pid = first_value(&c.simple_query("select pg_backend_pid()").await.unwrap()).unwrap();
    assert_ne!(new_pid, pid);
    assert!(
        eventually(LIMIT, || !backend_alive(&pid)).await,
        "backend {pid} closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_opens_server_connections_with_no_client() {
    let db = TestDb::new("to_warm");
    let proxy = start_proxy(&db.config("default_pool_size = 5\nmin_pool_size = 3", "")).await;
    let pool = only_pool(&proxy);
    assert!(
        eventually(LIMIT, || db.backend_connections() == 3
            && stat(&pool.stats.servers_warmed) == 3)
        .await,
        "backend connections {}, servers_warmed {}",
        db.backend_connections(),
        stat(&pool.stats.servers_warmed)
    );
    assert_eq!(proxy.clients(), 0);
    assert_eq!(pool.counts().idle, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_pool_serves_a_client_that_waited_reserve_pool_timeout() {
    let db = TestDb::new("to_reserve");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\nreserve_pool_size = 1\nreserve_pool_timeout = \"200ms\"\n\
         query_wait_timeout = \"30s\"\nquery_wait_notify = \"off\"",
        "",
    ))
    .await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query("begin").await.unwrap();
    let a_pid = first_value(&a.simple_query("select pg_backend_pid()").await.unwrap()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), b.simple_query("select pg_backend_pid()"))
        .await
        .expect("b served from the reserve while a holds its transaction")
        .unwrap();
    let b_pid = first_value(&r).unwrap();
    assert_ne!(a_pid, b_pid);
    let pool = only_pool(&proxy);
    assert_eq!(pool.counts().high_water, 2);
    assert_eq!(stat(&pool.stats.wait_timeouts), 0);
    // a's transaction was never disturbed.
    let again = first_value(&a.simple_query("select pg_backend_pid()").await.unwrap()).unwrap();
    assert_eq!(again, a_pid);
    a.simple_query("commit").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_max_client_conn_refuses_the_next_client_until_one_leaves() {
    let db = TestDb::new("to_ucap");
    let proxy = start_proxy(&db.config("", "max_client_conn = 2")).await;
    let url = db.url(&proxy);
    let c1 = connect(&url).await;
    let c2 = connect(&url).await;
    let Err(err) = try_connect(&url).await else {
        panic!("the third client is refused")
    };
    let e = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(e.code().code(), "53300");
    assert_eq!(e.severity(), "FATAL");
    assert!(
        e.message().contains("max_client_conn = 2") && e.message().contains(&format!("user \"{}\"", db.user)),
        "{}",
        e.message()
    );
    drop(c1);
    let c3 = connect_within(&url, LIMIT).await;
    for c in [&c2, &c3] {
        c.simple_query("select 1").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_max_client_conn_refuses_the_next_client_until_one_leaves() {
    let db = TestDb::new("to_tcap");
    // The tenant table must come last in extra_global: it is followed by the other tables.
    let proxy = start_proxy(&db.config("[tenants.t1]\nmax_client_conn = 1", "tenant = \"t1\"")).await;
    let url = db.url(&proxy);
    let c1 = connect(&url).await;
    let Err(err) = try_connect(&url).await else {
        panic!("the second client is refused")
    };
    let e = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(e.code().code(), "53300");
    assert_eq!(e.severity(), "FATAL");
    assert!(
        e.message().contains("tenant t1") && e.message().contains("max_client_conn = 1"),
        "{}",
        e.message()
    );
    drop(c1);
    let c2 = connect_within(&url, LIMIT).await;
    c2.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_refusing_logins_holds_the_client_then_answers_53300() {
    let db = TestDb::new("to_full");
    cluster()
        .psql("postgres", &format!("ALTER ROLE {} CONNECTION LIMIT 0", db.user))
        .unwrap();
    let proxy = start_proxy(&db.config("query_wait_timeout = \"1s\"", "")).await;
    let url = db.url(&proxy);
    let Err(err) = try_connect(&url).await else {
        panic!("no server connection: login fails")
    };
    let e = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(e.code().code(), "53300", "{}", e.message());
    assert_eq!(e.severity(), "FATAL");
    assert!(
        e.message().contains("timed out") && e.message().contains("too many clients already"),
        "the proxy's own answer, not the backend's: {}",
        e.message()
    );
    let dbs = proxy.pools().databases();
    assert_eq!(dbs.len(), 1);
    assert!(PoolStats::get(&dbs[0].stats.backend_full) >= 1);
    assert_eq!(db.backend_connections(), 0);
    cluster()
        .psql("postgres", &format!("ALTER ROLE {} CONNECTION LIMIT -1", db.user))
        .unwrap();
    let c = connect(&url).await;
    let r = c.simple_query("select 1").await.unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_abandoned_while_opening_a_server_connection_frees_its_slot() {
    let db = TestDb::new("to_leak");
    cluster()
        .psql("postgres", &format!("ALTER ROLE {} CONNECTION LIMIT 0", db.user))
        .unwrap();
    // The login needs a server connection; the backend refuses it; the client's own login
    // timeout ends the attempt long before its wait would.
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\nquery_wait_timeout = \"60s\"\nclient_login_timeout = \"500ms\"",
        "auth = \"trust\"",
    ))
    .await;
    let Err(err) = try_connect(&db.url(&proxy)).await else {
        panic!("the login cannot succeed")
    };
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("57014"), "{err}");
    // The slot reserved for that connection is free again, not held by nobody forever.
    let pool = only_pool(&proxy);
    assert!(
        eventually(LIMIT, || {
            let c = pool.counts();
            c.connecting + c.active + c.idle == 0
        })
        .await,
        "{:?}",
        pool.counts()
    );
    assert_eq!(pool.db.used(), 0);
    cluster()
        .psql("postgres", &format!("ALTER ROLE {} CONNECTION LIMIT -1", db.user))
        .unwrap();
}

/// A client logs in, sends `unfinished` (a request it never completes) and goes quiet: it gets
/// FATAL 25P03 from `idle_transaction_timeout` and is closed, and the pool's only server
/// connection serves the next client. Returns the pool, for the caller's own checks.
async fn unfinished_request_is_cut_off(prefix: &str, unfinished: &[u8]) -> Arc<Pool> {
    let db = TestDb::new(prefix);
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\nidle_transaction_timeout = \"300ms\"",
        "auth = \"trust\"",
    ))
    .await;
    let b = connect(&db.url(&proxy)).await;
    b.simple_query("select 1").await.unwrap();
    let mut a = raw_login(&proxy, &db).await;
    a.send(unfinished).await;
    let mut before = Vec::new();
    let fatal = loop {
        let m = a.recv().await.expect("an ErrorResponse before EOF");
        if m.tag == b'E' {
            break m;
        }
        before.push(m.tag);
    };
    assert_eq!(fatal.code(), "25P03", "{fatal:?} after {before:?}");
    assert!(a.recv().await.is_none(), "closed after the FATAL");
    let r = tokio::time::timeout(LIMIT, b.simple_query("select 2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("2"));
    let pool = only_pool(&proxy);
    assert_eq!(stat(&pool.stats.idle_transaction_timeouts), 1);
    pool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_message_is_cut_off_by_idle_transaction_timeout() {
    // A Query header announcing 100 bytes, then only 3 of them.
    let mut partial = vec![b'Q'];
    partial.extend_from_slice(&104u32.to_be_bytes());
    partial.extend_from_slice(b"sel");
    let pool = unfinished_request_is_cut_off("to_stall", &partial).await;
    // None of it reached the server connection: cleaned and kept, not closed.
    assert_eq!(stat(&pool.stats.servers_closed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_left_without_sync_is_cut_off_and_its_server_closed() {
    // Parse, Bind, Execute reach the server, but neither Sync nor Flush follows.
    let mut pipeline = raw::parse("", "select 1");
    pipeline.extend(raw::bind(""));
    pipeline.extend(raw::execute());
    let pool = unfinished_request_is_cut_off("to_nosync", &pipeline).await;
    // Mid-request, the connection cannot be cleaned with a ROLLBACK: it was closed.
    assert_eq!(stat(&pool.stats.servers_closed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_waiting_on_a_running_query_is_not_idle() {
    let db = TestDb::new("to_pipe");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\nidle_transaction_timeout = \"300ms\"",
        "auth = \"trust\"",
    ))
    .await;
    let mut a = raw_login(&proxy, &db).await;
    // A synced request running for a while, then the next request pipelined without its Sync
    // yet (as libpq's pipeline mode does): the client waits for the server, it is not idle.
    let mut bytes = raw::parse("", "select pg_sleep(1)");
    bytes.extend(raw::bind(""));
    bytes.extend(raw::execute());
    bytes.extend(raw::sync());
    bytes.extend(raw::parse("", "select 2"));
    bytes.extend(raw::bind(""));
    bytes.extend(raw::execute());
    a.send(&bytes).await;
    let first = a.recv_until(b'Z').await;
    assert!(
        first.iter().all(|m| m.tag != b'E'),
        "the first request ran to its end: {first:?}"
    );
    a.send(&raw::sync()).await;
    let second = a.recv_until(b'Z').await;
    assert!(second.iter().all(|m| m.tag != b'E'), "{second:?}");
    assert!(second.iter().any(|m| m.tag == b'D'), "{second:?}");
    assert_eq!(stat(&only_pool(&proxy).stats.idle_transaction_timeouts), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_idle_client_is_disconnected_and_its_server_reset_for_the_next() {
    let db = TestDb::new("to_sidle");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\npool_mode = \"session\"\nclient_idle_timeout = \"300ms\"",
        "auth = \"trust\"",
    ))
    .await;
    let mut a = raw_login(&proxy, &db).await;
    a.send(&raw::query("set application_name = 'left_behind'")).await;
    let set = a.recv_until(b'Z').await;
    assert!(set.iter().all(|m| m.tag != b'E'), "{set:?}");
    // Idle, holding the pool's only server connection for its session.
    let m = a.recv().await.expect("an ErrorResponse before EOF");
    assert_eq!((m.tag, m.code()), (b'E', "57P05".to_string()), "{m:?}");
    assert!(a.recv().await.is_none(), "closed after the FATAL");
    // The next client gets that same connection, reset (server_reset_query), not closed.
    let b = connect(&db.url(&proxy)).await;
    let r = b.simple_query("show application_name").await.unwrap();
    assert_ne!(first_value(&r).as_deref(), Some("left_behind"));
    let pool = only_pool(&proxy);
    assert_eq!(stat(&pool.stats.client_idle_timeouts), 1);
    assert_eq!(stat(&pool.stats.servers_closed), 0);
    assert_eq!(stat(&pool.stats.server_logins), 1);
}
