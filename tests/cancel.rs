//! Cancel requests: forwarded to the backend running the client's query with the server's own
//! key; unknown keys ignored; a late cancel never hits another client's query.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::raw::Raw;
use support::{connect, sqlstate, start_proxy, TestDb};
use tokio_postgres::NoTls;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_token_cancels_the_running_query() {
    let db = TestDb::new("cancel_run");
    let proxy = start_proxy(&db.config("default_pool_size = 2", "")).await;
    let c = connect(&db.url(&proxy)).await;
    let token = c.cancel_token();
    let pool = proxy.pools().all()[0].clone();
    let query = tokio::spawn(async move { c.simple_query("select pg_sleep(30)").await });
    // Once the query holds a server connection, cancel it. tokio-postgres sends the
    // CancelRequest and closes its socket at once.
    assert!(support::eventually(LIMIT, || pool.counts().active == 1).await);
    // ... and the backend is actually running it (a cancel reaching an idle backend is void).
    await_running(&db).await;
    token.cancel_query(NoTls).await.unwrap();
    let res = tokio::time::timeout(LIMIT, query)
        .await
        .expect("query ended")
        .unwrap();
    assert_eq!(sqlstate(&res.unwrap_err()).as_deref(), Some("57014"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_ignored() {
    let db = TestDb::new("cancel_wrong");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let mut r = Raw::connect(proxy.addr()).await;
    let login = r.login_trust(&db.user, &db.user).await;
    let key = login.iter().find(|m| m.tag == b'K').unwrap();
    let pid = u32::from_be_bytes(key.body[0..4].try_into().unwrap());
    let secret = u32::from_be_bytes(key.body[4..8].try_into().unwrap());
    r.send(&support::raw::query("select pg_sleep(1)")).await;
    // The cancel must arrive while the query runs, or it would prove nothing.
    await_running(&db).await;
    let mut cancel = Raw::connect(proxy.addr()).await;
    let mut pkt = 16u32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&80877102u32.to_be_bytes());
    pkt.extend_from_slice(&pid.to_be_bytes());
    pkt.extend_from_slice(&secret.wrapping_add(1).to_be_bytes());
    cancel.send(&pkt).await;
    cancel.expect_closed().await;
    let msgs = tokio::time::timeout(LIMIT, r.recv_until(b'Z')).await.unwrap();
    assert!(
        msgs.iter().all(|m| m.tag != b'E'),
        "query was not cancelled: {msgs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_cancel_does_not_hit_the_next_client() {
    let db = TestDb::new("cancel_late");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "")).await;
    let a = connect(&db.url(&proxy)).await;
    a.simple_query("select 1").await.unwrap();
    let token = a.cancel_token();
    // a is idle (no server connection); b now runs on the only server connection.
    let b = connect(&db.url(&proxy)).await;
    let pool = proxy.pools().all()[0].clone();
    let query = tokio::spawn(async move { b.simple_query("select pg_sleep(1), 'done'").await });
    assert!(support::eventually(LIMIT, || pool.counts().active == 1).await);
    // b's query is running on the backend a's cancel would reach if it were misrouted.
    await_running(&db).await;
    token.cancel_query(NoTls).await.unwrap();
    let res = tokio::time::timeout(LIMIT, query).await.unwrap().unwrap();
    assert!(res.is_ok(), "b's query must not be cancelled: {res:?}");
}

/// Waits until the backend runs one of `db`'s `pg_sleep` queries: a cancel reaching an idle
/// backend is void, so a test's cancel must land inside the query to prove anything.
async fn await_running(db: &TestDb) {
    let running = format!(
        "select count(*) from pg_stat_activity where usename = '{}' and state = 'active' and query like 'select pg_sleep%'",
        db.user
    );
    assert!(
        support::eventually(LIMIT, || support::cluster().psql("postgres", &running).unwrap()
            == "1")
        .await,
        "the query never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_socket_closes_once_the_cancel_is_delivered() {
    // asyncpg cancels after a failed COPY and waits for its cancel socket to close before the
    // next query; PostgreSQL closes it once the backend is signalled, so that query is never
    // hit. In session mode the client's server stays attached while idle, so a forwarded
    // cancel still in flight when the socket closed would cancel the next query.
    let db = TestDb::new("cancel_close");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1\npool_mode = \"session\"",
        "auth = \"trust\"",
    ))
    .await;
    let mut r = Raw::connect(proxy.addr()).await;
    let login = r.login_trust(&db.user, &db.user).await;
    let key = login.iter().find(|m| m.tag == b'K').unwrap();
    let pid = u32::from_be_bytes(key.body[0..4].try_into().unwrap());
    let secret = u32::from_be_bytes(key.body[4..8].try_into().unwrap());
    for round in 0..5 {
        r.send(&support::raw::query("select 1")).await;
        r.recv_until(b'Z').await;
        let mut cancel = Raw::connect(proxy.addr()).await;
        let mut pkt = 16u32.to_be_bytes().to_vec();
        pkt.extend_from_slice(&80877102u32.to_be_bytes());
        pkt.extend_from_slice(&pid.to_be_bytes());
        pkt.extend_from_slice(&secret.to_be_bytes());
        cancel.send(&pkt).await;
        cancel.expect_closed().await;
        r.send(&support::raw::query("select pg_sleep(0.2)")).await;
        let msgs = tokio::time::timeout(LIMIT, r.recv_until(b'Z')).await.unwrap();
        assert!(
            msgs.iter().all(|m| m.tag != b'E'),
            "round {round}: the query after the closed cancel socket was cancelled: {}",
            support::raw::show(&msgs)
        );
    }
}
