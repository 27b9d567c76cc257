//! LISTEN/NOTIFY in transaction mode without pinning: a client's LISTEN subscribes it through
//! its database's one listener connection, owned by the proxy; notifications reach every
//! subscriber in order while it is idle, many listeners share a small pool, and UNLISTEN,
//! DISCARD ALL, disconnects and slow readers are handled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgsluice::app::Proxy;
use support::raw::{query, Raw};
use support::{
    cluster, connect, eventually, listener, next_notification as next, start_proxy, value, TestDb,
};

const LIMIT: Duration = Duration::from_secs(60);

async fn proxy(db: &TestDb, pool_size: u32) -> Proxy {
    start_proxy(&db.config(&format!("default_pool_size = {pool_size}"), "auth = \"trust\"")).await
}

fn pair(channel: &str, payload: &str) -> (String, String) {
    (channel.to_string(), payload.to_string())
}

/// Backends of `db`'s role whose last statement was a LISTEN: the listener connection.
fn listener_backends(db: &TestDb) -> u32 {
    cluster()
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND query LIKE 'LISTEN%'",
                db.user
            ),
        )
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_listeners_on_a_pool_of_five_get_every_notification_in_order() {
    let db = TestDb::new("listen_many");
    let proxy = proxy(&db, 5).await;
    let url = db.url(&proxy);
    let mut listeners = Vec::new();
    for i in 0..200 {
        let (c, rx) = listener(&url).await;
        let channel = if i % 2 == 0 { "jobs" } else { "\"Jobs Done\"" };
        c.simple_query(&format!("LISTEN {channel}")).await.unwrap();
        listeners.push((c, rx, i % 2 == 0));
    }
    let pool = proxy.pools().all()[0].clone();
    assert_eq!(
        pool.stats.pinned_clients.load(Ordering::Relaxed),
        0,
        "LISTEN pins nobody"
    );
    // The pool's connections plus the one listener connection, whatever the number of listeners.
    assert!(
        db.backend_connections() <= 6,
        "{} backends",
        db.backend_connections()
    );
    assert_eq!(listener_backends(&db), 1);

    let notifier = connect(&url).await;
    // Another client of the pool sees no LISTEN on its server connection.
    assert_eq!(
        value(&notifier, "select count(*) from pg_listening_channels()").await,
        "0"
    );
    for i in 0..20 {
        notifier
            .simple_query(&format!(
                "NOTIFY jobs, 'job {i}'; NOTIFY \"Jobs Done\", 'done {i}'"
            ))
            .await
            .unwrap();
    }
    for (c, rx, even) in &mut listeners {
        for i in 0..20 {
            let want = if *even {
                pair("jobs", &format!("job {i}"))
            } else {
                pair("Jobs Done", &format!("done {i}"))
            };
            assert_eq!(next(rx).await, want);
        }
        // The listener's own queries still run through the pool.
        assert_eq!(value(c, "select 1").await, "1");
    }
    drop(listeners);
    // With no subscriber left, the listener connection is closed.
    assert!(eventually(LIMIT, || listener_backends(&db) == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisten_discard_and_disconnect_end_delivery() {
    let db = TestDb::new("listen_end");
    let proxy = proxy(&db, 1).await;
    let url = db.url(&proxy);
    let (a, mut rx) = listener(&url).await;
    let (b, mut rx_b) = listener(&url).await;
    a.simple_query("LISTEN x").await.unwrap();
    a.simple_query("LISTEN y").await.unwrap();
    a.simple_query("LISTEN y").await.unwrap();
    b.simple_query("LISTEN x").await.unwrap();
    let n = connect(&url).await;
    n.simple_query("NOTIFY x, '1'").await.unwrap();
    assert_eq!(next(&mut rx).await, pair("x", "1"));
    assert_eq!(next(&mut rx_b).await, pair("x", "1"));

    // UNLISTEN x: a gets y only (notifications arrive in order, so x was skipped).
    a.simple_query("UNLISTEN x").await.unwrap();
    n.simple_query("NOTIFY x, '2'").await.unwrap();
    n.simple_query("NOTIFY y, '3'").await.unwrap();
    assert_eq!(next(&mut rx).await, pair("y", "3"));
    assert_eq!(next(&mut rx_b).await, pair("x", "2"));

    // DISCARD ALL ends a's LISTENs; it can listen again afterwards.
    a.simple_query("DISCARD ALL").await.unwrap();
    a.simple_query("LISTEN z").await.unwrap();
    n.simple_query("NOTIFY y, '4'").await.unwrap();
    n.simple_query("NOTIFY z, '5'").await.unwrap();
    assert_eq!(next(&mut rx).await, pair("z", "5"));

    // UNLISTEN * ends them all.
    a.simple_query("UNLISTEN *").await.unwrap();
    a.simple_query("LISTEN w").await.unwrap();
    n.simple_query("NOTIFY z, '6'").await.unwrap();
    n.simple_query("NOTIFY w, '7'").await.unwrap();
    assert_eq!(next(&mut rx).await, pair("w", "7"));

    // An UNLISTEN inside a transaction block ends the subscription when the block commits,
    // not when it rolls back.
    a.simple_query("LISTEN v").await.unwrap();
    for end in ["rollback", "commit"] {
        a.simple_query("begin").await.unwrap();
        a.simple_query("unlisten w").await.unwrap();
        a.simple_query(end).await.unwrap();
    }
    n.simple_query("NOTIFY w, '7b'").await.unwrap();
    n.simple_query("NOTIFY v, '7c'").await.unwrap();
    assert_eq!(next(&mut rx).await, pair("v", "7c"));
    a.simple_query("LISTEN w").await.unwrap();

    // b disconnects abruptly; a still gets its notifications, and nothing is left over.
    drop(b);
    n.simple_query("NOTIFY x, '8'").await.unwrap();
    n.simple_query("NOTIFY w, '9'").await.unwrap();
    assert_eq!(next(&mut rx).await, pair("w", "9"));
    assert_eq!(
        value(&n, "select count(*) from pg_listening_channels()").await,
        "0"
    );
    // Invalid LISTENs still get the backend's own error.
    let e = a.simple_query("LISTEN").await.unwrap_err();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("42601"));
    assert_eq!(value(&a, "select 2").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_notifications_is_closed() {
    let db = TestDb::new("listen_slow");
    let proxy = proxy(&db, 2).await;
    let url = db.url(&proxy);
    let mut slow = Raw::connect(proxy.addr()).await;
    slow.login_trust(&db.user, &db.user).await;
    slow.send(&query("LISTEN big")).await;
    let answer = slow.recv_until(b'Z').await;
    assert!(answer.iter().all(|m| m.tag != b'E'), "{answer:?}");
    let (_fast, mut fast_rx) = listener(&url).await;
    _fast.simple_query("LISTEN big").await.unwrap();

    // 3,000 notifications of 7 kB (21 MB), more than the socket buffers and the cap hold, in
    // batches that the reading client takes before the next is sent.
    let n = connect(&url).await;
    for batch in 0..30 {
        n.simple_query(&format!(
            "select count(pg_notify('big', g::text || repeat('x', 7000))) from generate_series({}, {}) g",
            batch * 100 + 1,
            batch * 100 + 100
        ))
        .await
        .unwrap();
        for i in batch * 100 + 1..=batch * 100 + 100 {
            let (ch, payload) = next(&mut fast_rx).await;
            assert_eq!(ch, "big");
            assert!(payload.starts_with(&format!("{i}x")), "notification {i}");
        }
    }
    // The one that does not is closed: what it reads now ends before the last notification,
    // with 54000 if the error could still be written.
    let mut seen = 0;
    loop {
        match slow.recv().await {
            None => break,
            Some(m) if m.tag == b'A' => seen += 1,
            Some(m) if m.tag == b'E' => {
                assert_eq!(m.code(), "54000");
                assert!(slow.recv().await.is_none());
                break;
            }
            Some(m) => panic!("unexpected {m:?}"),
        }
        assert!(seen < 3000, "every notification was delivered");
    }
    assert!(seen < 3000);
    assert_eq!(value(&n, "select 1").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_logs_in_as_listen_user() {
    let db = TestDb::new("listen_user");
    let role = format!("{}_hub", db.user);
    cluster()
        .psql("postgres", &format!("CREATE ROLE {role} LOGIN PASSWORD 'hub-pw'"))
        .unwrap();
    let config = db
        .config(
            &format!("default_pool_size = 2\n[users.{role}]\npassword = \"hub-pw\""),
            "auth = \"trust\"",
        )
        .replace(
            &format!("[databases.{}]\n", db.user),
            &format!("[databases.{}]\nlisten_user = \"{role}\"\n", db.user),
        );
    let proxy = start_proxy(&config).await;
    let url = db.url(&proxy);
    let (c, mut rx) = listener(&url).await;
    c.simple_query("LISTEN jobs").await.unwrap();
    let notifier = connect(&url).await;
    notifier.simple_query("NOTIFY jobs, 'one'").await.unwrap();
    assert_eq!(next(&mut rx).await, pair("jobs", "one"));
    let listening_as = |user: &str| {
        cluster()
            .psql(
                "postgres",
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' AND query LIKE 'LISTEN%'"
                ),
            )
            .unwrap()
    };
    assert_eq!(listening_as(&role), "1");
    assert_eq!(listener_backends(&db), 0);
}

/// The channel and payload of a NotificationResponse read by a raw client.
fn raw_notification(m: &support::raw::Msg) -> (String, String) {
    assert_eq!(m.tag, b'A', "{m:?}");
    let rest = &m.body[4..];
    let mut parts = rest
        .split(|&b| b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_inside_a_block_and_through_the_extended_protocol_pins_nobody() {
    use support::raw::{bind, describe, execute, parse, show, sync};
    let db = TestDb::new("listen_block");
    let proxy = proxy(&db, 2).await;
    let url = db.url(&proxy);
    let pool = || proxy.pools().all()[0].clone();
    let (a, mut rx) = listener(&url).await;
    let n = connect(&url).await;
    let nobody_else_listens = || async {
        assert_eq!(
            pool().stats.pinned_clients.load(Ordering::Relaxed),
            0,
            "LISTEN pins nobody"
        );
        // Both server connections of the pool: n holds one, the other is checked by b.
        assert_eq!(
            value(&n, "select count(*) from pg_listening_channels()").await,
            "0"
        );
    };

    // Committed: subscribed; nothing runs on a server connection.
    a.simple_query("BEGIN").await.unwrap();
    a.simple_query("LISTEN blk").await.unwrap();
    assert_eq!(
        value(&a, "select count(*) from pg_listening_channels()").await,
        "0"
    );
    a.simple_query("COMMIT").await.unwrap();
    nobody_else_listens().await;
    n.simple_query("NOTIFY blk, '1'").await.unwrap();
    assert_eq!(next(&mut rx).await, pair("blk", "1"));

    // Rolled back, or rolled back to a savepoint before it: not subscribed. UNLISTEN then
    // LISTEN in one block: still subscribed.
    for sql in [
        "BEGIN; ROLLBACK",
        "BEGIN; LISTEN rb; ROLLBACK",
        "BEGIN; SAVEPOINT s; LISTEN sp; ROLLBACK TO s; LISTEN sp2; COMMIT",
        "BEGIN; UNLISTEN blk; LISTEN blk; COMMIT",
        "BEGIN; LISTEN gone; UNLISTEN gone; COMMIT",
    ] {
        for statement in sql.split("; ") {
            a.simple_query(statement).await.unwrap();
        }
    }
    nobody_else_listens().await;
    for (channel, payload) in [
        ("rb", "2"),
        ("sp", "3"),
        ("gone", "4"),
        ("sp2", "5"),
        ("blk", "6"),
    ] {
        n.simple_query(&format!("NOTIFY {channel}, '{payload}'"))
            .await
            .unwrap();
    }
    assert_eq!(next(&mut rx).await, pair("sp2", "5"));
    assert_eq!(next(&mut rx).await, pair("blk", "6"));

    // Pipelined (BEGIN, LISTEN, COMMIT in one write), and the extended-protocol form drivers
    // send for a one-off statement (psycopg 3, pgjdbc), outside and inside a block.
    let mut raw = Raw::connect(proxy.addr()).await;
    raw.login_trust(&db.user, &db.user).await;
    let mut pipelined = query("BEGIN");
    pipelined.extend(query("LISTEN piped"));
    pipelined.extend(query("COMMIT"));
    raw.send(&pipelined).await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.extend(raw.recv_until(b'Z').await);
    }
    assert_eq!(show(&answers), "C Z C Z C Z");
    let mut ext = parse("", "LISTEN ext1");
    ext.extend(bind(""));
    ext.extend(describe(b'P', ""));
    ext.extend(execute());
    ext.extend(sync());
    raw.send(&ext).await;
    assert_eq!(support::raw::tags(&raw.recv_until(b'Z').await), "12nCZ");
    raw.send(&query("BEGIN")).await;
    raw.recv_until(b'Z').await;
    let mut ext = parse("", "LISTEN ext2");
    ext.extend(bind(""));
    ext.extend(execute());
    ext.extend(sync());
    raw.send(&ext).await;
    let answer = raw.recv_until(b'Z').await;
    assert_eq!(support::raw::tags(&answer), "12CZ");
    assert_eq!(answer.last().unwrap().body, b"T");
    raw.send(&query("COMMIT")).await;
    raw.recv_until(b'Z').await;
    nobody_else_listens().await;
    for channel in ["piped", "ext1", "ext2"] {
        n.simple_query(&format!("NOTIFY {channel}, 'x'")).await.unwrap();
        let m = raw.recv().await.unwrap();
        assert_eq!(raw_notification(&m), pair(channel, "x"));
    }
    assert_eq!(listener_backends(&db), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_the_hub_refuses_inside_a_block_fails_the_block() {
    let db = TestDb::new("listen_refused");
    let proxy = proxy(&db, 1).await;
    let url = db.url(&proxy);
    let (a, _rx) = listener(&url).await;
    for i in 0..pgsluice::notify::MAX_CHANNELS {
        a.simple_query(&format!("LISTEN c{i}")).await.unwrap();
    }
    let e = a.simple_query("LISTEN one_more").await.unwrap_err();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("54000"));
    a.simple_query("BEGIN").await.unwrap();
    let e = a.simple_query("LISTEN one_more").await.unwrap_err();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("54000"), "{e:?}");
    // The backend's block failed with it, as it would have directly.
    let e = a.simple_query("select 1").await.unwrap_err();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("25P02"));
    let done = a.simple_query("COMMIT").await.unwrap();
    let tag = done.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::CommandComplete(_) => Some(()),
        _ => None,
    });
    assert!(tag.is_some());
    assert_eq!(value(&a, "select 2").await, "2");
    assert_eq!(
        proxy.pools().all()[0]
            .stats
            .pinned_clients
            .load(Ordering::Relaxed),
        0
    );
}
