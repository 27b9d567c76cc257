//! Session state that cannot be replayed pins its client to its server connection in
//! transaction mode: temporary tables, session advisory locks, WITH HOLD cursors, SQL-level
//! PREPARE, LISTEN, SET among other statements. Another client never sees it, the client sees
//! it on every transaction, and once it is gone (or the client leaves, cleanly or not) the
//! connection goes back to the pool clean.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pgsluice::app::Proxy;
use pgsluice::pool::Pool;
use support::raw::Raw;
use support::{cluster, connect, start_proxy, value, TestDb};

const LIMIT: Duration = Duration::from_secs(60);

async fn proxy(db: &TestDb, pool_size: u32) -> Proxy {
    start_proxy(&db.config(&format!("default_pool_size = {pool_size}"), "auth = \"trust\"")).await
}

fn pool(proxy: &Proxy) -> Arc<Pool> {
    proxy.pools().all()[0].clone()
}

fn pinned(proxy: &Proxy) -> u64 {
    pool(proxy).stats.pinned_clients.load(Ordering::Relaxed)
}

/// What of a session's state a client can see on the connection serving it.
const STATE: &str = "select (select count(*) from pg_class where relnamespace = pg_my_temp_schema()) \
    || ' ' || (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()) \
    || ' ' || (select count(*) from pg_cursors where is_holdable) \
    || ' ' || (select count(*) from pg_prepared_statements where from_sql) \
    || ' ' || (select count(*) from pg_listening_channels())";
const CLEAN: &str = "0 0 0 0 0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_state_pins_until_it_is_gone() {
    let db = TestDb::new("pin_kinds");
    let proxy = proxy(&db, 2).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    let cases: [(&str, &str, &str, &str); 6] = [
        (
            "create temp table t (x int)",
            "select count(*) from t",
            "drop table t",
            "1 0 0 0 0",
        ),
        (
            "select pg_advisory_lock(42)",
            "select 1",
            "select pg_advisory_unlock(42)",
            "0 1 0 0 0",
        ),
        (
            "declare c cursor with hold for select generate_series(1, 3)",
            "fetch 1 from c",
            "close c",
            "0 0 1 0 0",
        ),
        ("prepare q as select 7", "execute q", "deallocate q", "0 0 0 1 0"),
        // A LISTEN the proxy's hub cannot serve (here: inside a multi-statement query).
        ("select 1; listen jobs", "select 1", "unlisten jobs", "0 0 0 0 1"),
        (
            "select pg_advisory_lock(1, 2)",
            "select 1",
            "select pg_advisory_unlock_all()",
            "0 1 0 0 0",
        ),
    ];
    for (make, use_it, end, seen) in cases {
        a.simple_query(make).await.unwrap();
        assert_eq!(pinned(&proxy), 1, "{make}");
        for _ in 0..3 {
            // a keeps its connection: its state is there on every transaction...
            a.simple_query(use_it).await.unwrap();
            assert_eq!(value(&a, STATE).await, seen, "{make}");
            // ... and b, on the other connection, never sees it.
            assert_eq!(value(&b, STATE).await, CLEAN, "{make}");
        }
        a.simple_query(end).await.unwrap();
        assert_eq!(pinned(&proxy), 0, "{make} then {end}");
        assert_eq!(value(&a, STATE).await, CLEAN);
    }
    assert_eq!(pool(&proxy).stats.pins.load(Ordering::Relaxed), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_ends_with_the_transaction_does_not_pin() {
    let db = TestDb::new("pin_none");
    let proxy = proxy(&db, 1).await;
    let a = connect(&db.url(&proxy)).await;
    for sql in [
        "begin; create temp table t (x int) on commit drop; commit",
        "begin; select pg_advisory_xact_lock(5); commit",
        "select pg_advisory_xact_lock_shared(1, 2)",
        "select pg_try_advisory_lock(9) where false",
        "begin; declare c cursor for select 1; commit",
        "set work_mem = '5MB'",
        "begin; create temp table t2 (x int); rollback",
    ] {
        a.simple_query(sql).await.unwrap();
        assert_eq!(pinned(&proxy), 0, "{sql}");
    }
    // A try-lock that someone else holds takes nothing.
    let other = support::direct_to(&db.user).await;
    other.simple_query("select pg_advisory_lock(77)").await.unwrap();
    assert_eq!(value(&a, "select pg_try_advisory_lock(77)").await, "f");
    assert_eq!(pinned(&proxy), 0);
    // Re-entrant: two locks need two unlocks.
    a.simple_query("select pg_advisory_lock(3)").await.unwrap();
    a.simple_query("select pg_advisory_lock(3)").await.unwrap();
    a.simple_query("select pg_advisory_unlock(3)").await.unwrap();
    assert_eq!(pinned(&proxy), 1);
    a.simple_query("select pg_advisory_unlock(3)").await.unwrap();
    assert_eq!(pinned(&proxy), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_among_other_statements_pins_until_discard_all() {
    let db = TestDb::new("pin_set");
    let proxy = proxy(&db, 2).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query("set work_mem = '9MB'; select 1").await.unwrap();
    assert_eq!(pinned(&proxy), 1);
    for _ in 0..3 {
        assert_eq!(value(&a, "show work_mem").await, "9MB");
        assert_eq!(value(&b, "show work_mem").await, "4MB");
    }
    a.simple_query("DISCARD ALL").await.unwrap();
    assert_eq!(pinned(&proxy), 0);
    assert_eq!(value(&a, "show work_mem").await, "4MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_leaving_leaves_a_clean_connection() {
    let db = TestDb::new("pin_leave");
    // One connection: whatever the leaver left, the next client would get.
    let proxy = proxy(&db, 1).await;
    let url = db.url(&proxy);
    for abrupt in [false, true] {
        let make = "create temp table t (x int); select pg_advisory_lock(1); \
                    declare c cursor with hold for select 1; prepare q as select 1; listen ch";
        if abrupt {
            let mut r = Raw::connect(proxy.addr()).await;
            r.login_trust(&db.user, &db.user).await;
            r.send(&support::raw::query(make)).await;
            r.recv_until(b'Z').await;
            assert_eq!(pinned(&proxy), 1);
            drop(r); // no Terminate
        } else {
            let a = connect(&url).await;
            a.simple_query(make).await.unwrap();
            assert_eq!(pinned(&proxy), 1);
            drop(a);
        }
        let b = connect(&url).await;
        assert_eq!(value(&b, STATE).await, CLEAN, "abrupt: {abrupt}");
        assert_eq!(pinned(&proxy), 0);
        drop(b);
    }
    assert_eq!(
        pool(&proxy).stats.servers_closed.load(Ordering::Relaxed),
        0,
        "reset, not closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_lock_job_queue_on_a_small_pool() {
    let db = TestDb::new("pin_jobs");
    let proxy = proxy(&db, 5).await;
    let url = db.url(&proxy);
    let claimed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..50u64 {
        let url = url.clone();
        let claimed = claimed.clone();
        workers.push(tokio::spawn(async move {
            let c = connect(&url).await;
            for round in 0..6u64 {
                let job = (w * 7 + round * 13) % 20;
                let got = value(&c, &format!("select pg_try_advisory_lock({job})")).await;
                if got != "t" {
                    continue;
                }
                claimed.fetch_add(1, Ordering::Relaxed);
                // The claim holds over several transactions, on the worker's own connection.
                for _ in 0..3 {
                    let held = value(
                        &c,
                        &format!("select count(*) from pg_locks where locktype = 'advisory' and objid = {job} and pid = pg_backend_pid()"),
                    )
                    .await;
                    assert_eq!(held, "1", "worker {w} lost its claim on job {job}");
                }
                assert_eq!(value(&c, &format!("select pg_advisory_unlock({job})")).await, "t");
            }
        }));
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .expect("workers finish")
            .unwrap();
    }
    assert!(claimed.load(Ordering::Relaxed) > 0);
    assert_eq!(pinned(&proxy), 0);
    let left = cluster()
        .psql(
            "postgres",
            &format!("select count(*) from pg_locks l join pg_stat_activity a using (pid) where l.locktype = 'advisory' and a.usename = '{}'", db.user),
        )
        .unwrap();
    assert_eq!(left, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_whose_server_dies_loses_its_session() {
    let db = TestDb::new("pin_lost");
    let proxy = proxy(&db, 2).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query("create temp table t (x int)").await.unwrap();
    let pid = value(&a, "select pg_backend_pid()").await;
    cluster()
        .psql("postgres", &format!("select pg_terminate_backend({pid})"))
        .unwrap();
    // Its temporary table is gone: as with PostgreSQL, the session ends, and the idle client
    // hears of it at once (FATAL 08006), without sending anything.
    assert!(
        support::eventually(LIMIT, || a.is_closed()).await,
        "the client's connection is closed"
    );
    assert!(a.simple_query("select count(*) from t").await.is_err());
    assert_eq!(value(&b, "select 1").await, "1");
    assert_eq!(pinned(&proxy), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_listener_gets_notifications_while_idle() {
    use futures_util::StreamExt;
    let db = TestDb::new("pin_notify");
    let proxy = proxy(&db, 2).await;
    let url = db.url(&proxy);
    let (a, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    // Inside a multi-statement query, LISTEN runs on the client's server connection and pins.
    a.simple_query("SELECT 1; LISTEN jobs").await.unwrap();
    assert_eq!(pinned(&proxy), 1);
    let b = connect(&url).await;
    for i in 0..5 {
        b.simple_query(&format!("NOTIFY jobs, 'job {i}'")).await.unwrap();
    }
    for i in 0..5 {
        let got = tokio::time::timeout(LIMIT, rx.recv()).await.unwrap().unwrap();
        assert_eq!(got, ("jobs".to_string(), format!("job {i}")));
    }
    a.simple_query("UNLISTEN jobs").await.unwrap();
    assert_eq!(pinned(&proxy), 0);
    assert_eq!(
        value(&a, "select count(*) from pg_listening_channels()").await,
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_reject_refuses_what_would_pin() {
    let db = TestDb::new("pin_reject");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1",
        "auth = \"trust\"\nsession_state = \"reject\"",
    ))
    .await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    for sql in [
        "create temp table t (x int)",
        "select pg_advisory_lock(42)",
        "declare c cursor with hold for select 1",
        "prepare q as select 1",
        "select 1; set work_mem = '8MB'",
    ] {
        let e = a.simple_query(sql).await.unwrap_err();
        assert_eq!(support::sqlstate(&e).as_deref(), Some("0A000"), "{sql}");
        let db_error = e.as_db_error().unwrap();
        assert!(
            db_error.message().contains("session_state = reject"),
            "{db_error:?}"
        );
        assert!(db_error.hint().unwrap().contains("session"), "{db_error:?}");
    }
    // Through the extended protocol too, and the client's next statement runs.
    let e = a
        .query("select pg_advisory_lock($1)", &[&1i64])
        .await
        .unwrap_err();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("0A000"));
    // Inside a block, the refusal fails the block as any error would.
    a.simple_query("begin").await.unwrap();
    let e = a.simple_query("create temp table t (x int)").await.unwrap_err();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("0A000"));
    let e = a.simple_query("select 1").await.unwrap_err();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("25P02"));
    a.simple_query("rollback").await.unwrap();
    // What carries or ends with the transaction still works: SET, xact locks, ON COMMIT
    // DROP, and LISTEN through the proxy's hub.
    a.simple_query("set work_mem = '8MB'").await.unwrap();
    a.simple_query(
        "begin; select pg_advisory_xact_lock(1); create temp table d (x int) on commit drop; commit",
    )
    .await
    .unwrap();
    a.simple_query("listen jobs").await.unwrap();
    assert_eq!(value(&a, "show work_mem").await, "8MB");
    assert_eq!(pinned(&proxy), 0);
    assert_eq!(value(&b, STATE).await, CLEAN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_allow_leaves_state_on_the_pool_as_pgbouncer_does() {
    let db = TestDb::new("pin_allow");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\nsession_state = \"allow\"",
        "auth = \"trust\"",
    ))
    .await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query("select pg_advisory_lock(42)").await.unwrap();
    assert_eq!(pinned(&proxy), 0);
    // The one server connection of the pool now serves b, lock included: the unsafe
    // behaviour this setting asks for.
    assert_eq!(value(&b, STATE).await, "0 1 0 0 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_idle_past_pinned_idle_timeout_is_closed() {
    let db = TestDb::new("pin_idle");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\npinned_idle_timeout = \"1s\"",
        "auth = \"trust\"",
    ))
    .await;
    let mut a = Raw::connect(proxy.addr()).await;
    a.login_trust(&db.user, &db.user).await;
    a.send(&support::raw::query("select pg_advisory_lock(5)")).await;
    a.recv_until(b'Z').await;
    // Idle and pinned: closed with 57P05 naming the limit and what it held.
    let m = a.recv().await.expect("an error before the close");
    assert_eq!(m.tag, b'E');
    assert_eq!(m.code(), "57P05");
    let message = m.field(b'M').unwrap();
    assert!(message.contains("pinned_idle_timeout = 1s"), "{message}");
    assert!(message.contains("advisory lock"), "{message}");
    a.expect_closed().await;
    // Its server connection went back to the pool reset.
    let b = connect(&db.url(&proxy)).await;
    assert_eq!(value(&b, STATE).await, CLEAN);
    assert_eq!(pinned(&proxy), 0);
    assert_eq!(pool(&proxy).stats.pinned_idle_timeouts.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pinned_refuses_the_statement_that_would_pin_with_53300() {
    let db = TestDb::new("pin_max");
    let proxy = start_proxy(&db.config("default_pool_size = 3\nmax_pinned = 1", "auth = \"trust\"")).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query("select pg_advisory_lock(1)").await.unwrap();
    assert_eq!(pinned(&proxy), 1);
    let refused = |err: tokio_postgres::Error| {
        assert_eq!(support::sqlstate(&err).as_deref(), Some("53300"), "{err}");
        let msg = err.as_db_error().unwrap().message().to_string();
        assert!(msg.contains("max_pinned = 1") && msg.contains("pin_max"), "{msg}");
    };
    // Simple query, inside a block (which then fails as with any error), and through the
    // extended protocol, named and unnamed.
    refused(b.simple_query("select pg_advisory_lock(2)").await.unwrap_err());
    refused(b.simple_query("create temp table t (x int)").await.unwrap_err());
    b.simple_query("begin").await.unwrap();
    refused(
        b.simple_query("declare c cursor with hold for select 1")
            .await
            .unwrap_err(),
    );
    let err = b.simple_query("select 1").await.unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("25P02"), "{err}");
    b.simple_query("rollback").await.unwrap();
    refused(
        b.query("select pg_try_advisory_lock($1)", &[&3i64])
            .await
            .unwrap_err(),
    );
    refused(
        b.query_typed(
            "select pg_advisory_lock($1)",
            &[(&4i64, tokio_postgres::types::Type::INT8)],
        )
        .await
        .unwrap_err(),
    );
    // What does not pin still runs, transaction-level locks included, and b is not pinned.
    b.simple_query("select pg_advisory_xact_lock(5)").await.unwrap();
    assert_eq!(value(&b, STATE).await, CLEAN);
    assert_eq!(pinned(&proxy), 1);
    // The pinned client itself may take more; once it lets go, b may pin.
    a.simple_query("select pg_advisory_lock(6)").await.unwrap();
    a.simple_query("select pg_advisory_unlock_all()").await.unwrap();
    assert_eq!(pinned(&proxy), 0);
    b.simple_query("select pg_advisory_lock(2)").await.unwrap();
    assert_eq!(pinned(&proxy), 1);
    refused(a.simple_query("select pg_advisory_lock(1)").await.unwrap_err());
    // Counted once each (collected after the refused request's transaction).
    assert!(
        support::eventually(LIMIT, || pool(&proxy).stats.pin_refusals.load(Ordering::Relaxed)
            == 6)
        .await
    );
    // A pinned client leaving gives its place back.
    drop(b);
    let c = connect(&url).await;
    assert!(support::eventually(LIMIT, || pinned(&proxy) == 0).await);
    c.simple_query("select pg_advisory_lock(7)").await.unwrap();
    assert_eq!(pinned(&proxy), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_max_pinned_spans_its_pools() {
    let db = TestDb::new("pin_tenant");
    let c = cluster();
    let alias = format!("{}_alias", db.user);
    let proxy = start_proxy(&db.config(
        &format!(
            "default_pool_size = 3\n[tenants.jobs]\nmax_pinned = 1\n\
             [databases.{alias}]\nhost = \"{}\"\nport = {}\ndbname = \"{}\"",
            c.host(),
            c.port(),
            db.user
        ),
        "auth = \"trust\"\ntenant = \"jobs\"",
    ))
    .await;
    let a = connect(&db.url(&proxy)).await;
    let b = connect(
        &db.url(&proxy)
            .replace(&format!("dbname={}", db.user), &format!("dbname={alias}")),
    )
    .await;
    a.simple_query("create temp table t (x int)").await.unwrap();
    let err = b.simple_query("create temp table t (x int)").await.unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("53300"), "{err}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("tenant jobs") && msg.contains("max_pinned = 1"),
        "{msg}"
    );
    a.simple_query("drop table t").await.unwrap();
    b.simple_query("create temp table t (x int)").await.unwrap();
}
