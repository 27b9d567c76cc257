//! Pooling: the backend never sees more than the pool size, waiters are served FIFO, server
//! connections go back at transaction boundaries (transaction mode) or at disconnect after a
//! reset (session mode), and a dirty server connection is never reused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::raw::{self, Raw};
use support::{
    cluster, connect, direct, eventually, first_value, sqlstate, start_proxy, BackendSampler, TestDb,
};
use tokio_postgres::SimpleQueryMessage;

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_clients_share_five_server_connections() {
    let db = TestDb::new("pool_load");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 5\nmax_client_conn = 2000",
        "auth = \"trust\"",
    ))
    .await;
    let url = db.url(&proxy);
    let setup = connect(&url).await;
    setup
        .simple_query("create table hits (client int, n int)")
        .await
        .unwrap();
    drop(setup);

    // Sample pg_stat_activity for this role throughout the run.
    let sampler = BackendSampler::start(&db.user);
    let clients = 500;
    let mut tasks = Vec::new();
    for id in 0..clients {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await;
            for n in 0..20 {
                c.simple_query(&format!("begin; insert into hits values ({id}, {n}); commit"))
                    .await
                    .unwrap();
            }
        }));
    }
    tokio::time::timeout(LIMIT, async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await
    .expect("load finished in time");
    let max_seen = sampler.stop().await;
    assert!(max_seen <= 5, "backend saw {max_seen} connections from the proxy");
    let counts = proxy.pools().all()[0].counts();
    assert!(
        counts.high_water <= 5,
        "pool high-water mark {}",
        counts.high_water
    );
    let check = connect(&url).await;
    let total = first_value(&check.simple_query("select count(*) from hits").await.unwrap());
    assert_eq!(total.as_deref(), Some("10000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_fifo_order() {
    let db = TestDb::new("pool_fifo");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let url = db.url(&proxy);
    let holder = connect(&url).await;
    holder
        .simple_query("create table served (id serial, i int)")
        .await
        .unwrap();
    holder.simple_query("begin; select 1").await.unwrap();
    let pool = proxy.pools().all()[0].clone();
    let mut tasks = Vec::new();
    for i in 0..5u32 {
        let c = connect(&url).await;
        // The order of service is recorded by the backend itself (one server connection runs
        // them one after another), not by the clients' tasks, which race to note it.
        tasks.push(tokio::spawn(async move {
            c.simple_query(&format!("insert into served (i) values ({i})"))
                .await
                .unwrap();
        }));
        // Queue them one after another, so their arrival order is known.
        assert!(eventually(LIMIT, || pool.counts().waiting == i + 1).await);
    }
    holder.simple_query("commit").await.unwrap();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    let order = first_value(
        &holder
            .simple_query("select string_agg(i::text, ',' order by id) from served")
            .await
            .unwrap(),
    );
    let order: Vec<u32> = order
        .unwrap_or_default()
        .split(',')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_answers_53300_and_the_client_stays_usable() {
    let db = TestDb::new("pool_wait");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\nquery_wait_timeout = \"300ms\"",
        "auth = \"trust\"",
    ))
    .await;
    let url = db.url(&proxy);
    let holder = connect(&url).await;
    holder.simple_query("begin; select 1").await.unwrap();
    let waiter = connect(&url).await;
    let err = waiter.simple_query("select 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"));
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("waiting for a server connection") && msg.contains(&db.user),
        "{msg}"
    );
    // Extended protocol too: the error ends the request cleanly.
    let err = waiter.query("select $1::int", &[&1i32]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"));
    holder.simple_query("commit").await.unwrap();
    let r = waiter.simple_query("select 7").await.unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("7"));
    let stats = &proxy.pools().all()[0].stats;
    assert_eq!(pgsluice::pool::PoolStats::get(&stats.wait_timeouts), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_holds_the_server_and_resets_it() {
    let db = TestDb::new("pool_session");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\npool_mode = \"session\"\nquery_wait_timeout = \"300ms\"",
        "auth = \"trust\"",
    ))
    .await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    a.simple_query("set work_mem = '7MB'").await.unwrap();
    // Named prepared statements work in session mode.
    let stmt = a.prepare("select $1::int + 1").await.unwrap();
    assert_eq!(a.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, i32>(0), 2);
    let b = connect(&url).await;
    let err = b.simple_query("select 1").await.unwrap_err();
    assert_eq!(
        sqlstate(&err).as_deref(),
        Some("53300"),
        "a holds the only server connection"
    );
    drop(stmt);
    drop(a);
    // After a leaves, b gets the same server connection, reset by DISCARD ALL.
    let pool = proxy.pools().all()[0].clone();
    assert!(eventually(LIMIT, || pool.counts().idle == 1).await);
    let r = b.simple_query("show work_mem").await.unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("4MB"));
    assert_eq!(pgsluice::pool::PoolStats::get(&pool.stats.server_logins), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_transaction_never_leaves_a_dirty_server() {
    let db = TestDb::new("pool_dirty");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let url = db.url(&proxy);
    let setup = connect(&url).await;
    setup.simple_query("create table t (v text)").await.unwrap();
    drop(setup);
    let pool = proxy.pools().all()[0].clone();

    // Mid-transaction: the client's socket just closes.
    let mut r = Raw::connect(proxy.addr()).await;
    r.login_trust(&db.user, &db.user).await;
    r.send(&raw::query("begin; insert into t values ('lost')")).await;
    r.recv_until(b'Z').await;
    drop(r);
    assert!(
        eventually(LIMIT, || pgsluice::pool::PoolStats::get(
            &pool.stats.servers_closed
        ) == 1)
        .await
    );

    // Mid-COPY: same.
    let mut r = Raw::connect(proxy.addr()).await;
    r.login_trust(&db.user, &db.user).await;
    r.send(&raw::query("copy t from stdin")).await;
    let m = r.recv().await.unwrap();
    assert_eq!(m.tag, b'G', "CopyInResponse");
    r.send(&raw::msg(b'd', b"half\n")).await;
    drop(r);
    assert!(
        eventually(LIMIT, || pgsluice::pool::PoolStats::get(
            &pool.stats.servers_closed
        ) == 2)
        .await
    );

    let c = connect(&url).await;
    let r = c.simple_query("select count(*) from t").await.unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("0"));
    let r = c
        .simple_query("select txid_current_if_assigned() is null")
        .await
        .unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("t"));

    // A client that leaves between transactions returns its server connection clean.
    let before = pgsluice::pool::PoolStats::get(&pool.stats.servers_closed);
    let mut r = Raw::connect(proxy.addr()).await;
    r.login_trust(&db.user, &db.user).await;
    r.send(&raw::query("select 1")).await;
    r.recv_until(b'Z').await;
    r.send(&raw::msg(b'X', b"")).await;
    r.expect_closed().await;
    let c2 = connect(&url).await;
    c2.simple_query("select 1").await.unwrap();
    assert_eq!(pgsluice::pool::PoolStats::get(&pool.stats.servers_closed), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_connection_killed_by_the_backend_is_replaced_transparently() {
    let db = TestDb::new("pool_dead");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let url = db.url(&proxy);
    let c = connect(&url).await;
    let pid = first_value(&c.simple_query("select pg_backend_pid()").await.unwrap()).unwrap();
    let d = direct().await;
    d.simple_query(&format!("select pg_terminate_backend({pid})"))
        .await
        .unwrap();
    let pool = proxy.pools().all()[0].clone();
    // pg_terminate_backend only signals: wait until the backend process is really gone.
    let gone = format!("select count(*) from pg_stat_activity where pid = {pid}");
    assert!(eventually(LIMIT, || cluster().psql("postgres", &gone).unwrap() == "0").await);
    // The idle connection is found dead (at checkout or by the pool's watch) and replaced;
    // the client sees no error.
    let new_pid = first_value(&c.simple_query("select pg_backend_pid()").await.unwrap()).unwrap();
    assert_ne!(pid, new_pid);
    assert_eq!(pgsluice::pool::PoolStats::get(&pool.stats.dead_on_checkout), 1);
    assert_eq!(
        pgsluice::pool::PoolStats::get(&pool.stats.restarts_detected),
        0,
        "one backend, not a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_lost_with_its_server_connection_ends_only_with_rollback() {
    let db = TestDb::new("pool_lostblock");
    let proxy = start_proxy(&db.config("default_pool_size = 2", "auth = \"trust\"")).await;
    let c = connect(&db.url(&proxy)).await;
    c.simple_query("create table t (v int)").await.unwrap();
    c.simple_query("begin").await.unwrap();
    c.simple_query("insert into t values (1)").await.unwrap();
    let pid = first_value(&c.simple_query("select pg_backend_pid()").await.unwrap()).unwrap();
    let d = direct().await;
    d.simple_query(&format!("select pg_terminate_backend({pid})"))
        .await
        .unwrap();
    let gone = format!("select count(*) from pg_stat_activity where pid = {pid}");
    assert!(eventually(LIMIT, || cluster().psql("postgres", &gone).unwrap() == "0").await);
    // The backend's own error, as an ERROR: the client stays connected.
    let err = c.simple_query("insert into t values (2)").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    assert!(!c.is_closed());
    // Until the client ends the block, nothing runs (no accidental autocommit).
    let err = c.simple_query("insert into t values (3)").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"));
    let r = c.simple_query("rollback").await.unwrap();
    assert!(r
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(_))));
    c.simple_query("insert into t values (4)").await.unwrap();
    let r = c
        .simple_query("select coalesce(string_agg(v::text, ','), '') from t")
        .await
        .unwrap();
    assert_eq!(
        first_value(&r).as_deref(),
        Some("4"),
        "only the row after the block"
    );
    let pool = proxy.pools().all()[0].clone();
    assert_eq!(
        pgsluice::pool::PoolStats::get(&pool.stats.restarts_detected),
        0,
        "one backend, not a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_created_while_everything_is_paused_starts_paused() {
    let db = TestDb::new("pause_new");
    let proxy = Arc::new(start_proxy(&db.config("query_wait_notify = \"off\"", "")).await);
    // Paused before the pool exists (no client yet).
    proxy.pause_all().await;
    let url = db.url(&proxy);
    let login = tokio::spawn(async move { connect(&url).await });
    // The client's login needs a server connection: it waits in the new, paused pool.
    assert!(
        eventually(LIMIT, || proxy
            .pools()
            .all()
            .first()
            .is_some_and(|p| p.paused() && p.counts().waiting == 1))
        .await
    );
    assert_eq!(db.backend_connections(), 0);
    proxy.resume_all();
    let client = tokio::time::timeout(LIMIT, login).await.unwrap().unwrap();
    let r = client.simple_query("SELECT 1").await.unwrap();
    assert_eq!(first_value(&r).as_deref(), Some("1"));
}
