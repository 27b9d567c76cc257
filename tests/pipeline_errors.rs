//! An error inside an extended-protocol pipeline (no Sync yet): the backend skips everything
//! up to the client's Sync and answers it with ReadyForQuery, and so must the proxy, whichever
//! arrives first: the backend's ErrorResponse or the client's trailing messages. These are the
//! exchanges of psycopg's `executemany`, node-postgres's `pg-cursor` and asyncpg's
//! `executemany`, in both pool modes; none may cost a connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;
use std::time::Duration;

use pgsluice::app::Proxy;
use pgsluice::pool::PoolStats;
use support::raw::{self, bind_with, describe, flush, show, tags, values, Msg, Raw};
use support::{direct, start_proxy, unique, TestDb};

const LIMIT: Duration = Duration::from_secs(120);
const MODES: [&str; 2] = ["transaction", "session"];

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn proxy(db: &TestDb, mode: &str, pool_size: u32) -> Proxy {
    let global = format!("pool_mode = \"{mode}\"\ndefault_pool_size = {pool_size}");
    start_proxy(&db.config(&global, "auth = \"trust\"")).await
}

async fn login(proxy: &Proxy, db: &TestDb) -> Raw {
    let mut r = Raw::connect(proxy.addr()).await;
    let msgs = r.login_trust(&db.user, &db.user).await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "login: {}", show(&msgs));
    r
}

/// Parse (unnamed), Bind (unnamed portal), Describe portal, Execute of `sql`.
fn statement(sql: &str) -> Vec<u8> {
    [
        raw::parse("", sql),
        raw::bind(""),
        describe(b'P', ""),
        raw::execute(),
    ]
    .concat()
}

/// Receives one message and checks its type.
async fn recv_tag(r: &mut Raw, want: u8) -> Msg {
    let m = within("a message", r.recv()).await.expect("connection closed");
    assert_eq!(
        m.tag as char,
        want as char,
        "got {}",
        show(std::slice::from_ref(&m))
    );
    m
}

/// The connection still works: a simple query answers, with no error.
async fn still_usable(r: &mut Raw, mode: &str) {
    r.send(&raw::query("select 41 + 1")).await;
    let seg = within("select after the pipeline", r.recv_until(b'Z')).await;
    assert_eq!(tags(&seg), "TDCZ", "{mode}: {}", show(&seg));
    assert_eq!(values(&seg), ["42"]);
}

fn servers_closed(proxy: &Proxy) -> u64 {
    proxy
        .pools()
        .all()
        .iter()
        .map(|p| PoolStats::get(&p.stats.servers_closed))
        .sum()
}

/// psycopg's pipeline: two statements, the second fails at Parse, Flush; the client reads the
/// error before it sends the rest of its pipeline and the Sync. Everything after the error is
/// skipped: the Sync is answered by ReadyForQuery alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_relayed_before_the_clients_tail_skips_the_tail() {
    let db = TestDb::new("pipe_before");
    for mode in MODES {
        let proxy = proxy(&db, mode, 2).await;
        let mut r = login(&proxy, &db).await;
        for round in 0..5 {
            let head = [
                statement("select 1"),
                statement("select * from doesnotexist"),
                flush(),
            ]
            .concat();
            r.send(&head).await;
            let mut got = Vec::new();
            for t in *b"12TDC" {
                got.push(recv_tag(&mut r, t).await);
            }
            let e = recv_tag(&mut r, b'E').await;
            assert_eq!(e.code(), "42P01", "{mode}");
            // Only now the tail, as a client streaming its pipeline sends it.
            r.send(&[statement("select 2"), flush()].concat()).await;
            r.send(&raw::sync()).await;
            let seg = within("the Sync's answer", r.recv_until(b'Z')).await;
            assert_eq!(tags(&seg), "Z", "{mode} round {round}: {}", show(&seg));
            assert_eq!(seg[0].body, b"I");
            still_usable(&mut r, mode).await;
        }
        assert_eq!(servers_closed(&proxy), 0, "{mode}: no server connection lost");
    }
}

/// The same pipeline, but the backend answers only after the proxy has read the client's
/// whole tail: the first statement waits on a lock held elsewhere, and is released once the
/// backend is seen waiting (by then the proxy has read and forwarded the single write that
/// carried the tail). With and without the Sync in that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_relayed_after_the_clients_tail_skips_the_tail() {
    let db = TestDb::new("pipe_after");
    let key: i64 = i64::from(std::process::id()) * 1000 + 7;
    for mode in MODES {
        let proxy = proxy(&db, mode, 2).await;
        let mut r = login(&proxy, &db).await;
        for sync_in_tail in [true, false] {
            // Advisory locks are per database: the holder works in the test's database.
            let holder = support::direct_to(&db.user).await;
            holder.batch_execute("begin").await.unwrap();
            holder
                .execute("select pg_advisory_xact_lock($1)", &[&key])
                .await
                .unwrap();
            let mut bytes = [
                statement(&format!("select pg_advisory_xact_lock({key})")),
                statement("select 1/0"),
                statement("select 2"),
                flush(),
            ]
            .concat();
            if sync_in_tail {
                bytes.extend(raw::sync());
            }
            r.send(&bytes).await;
            wait_for_lock_waiter(&db.user).await;
            holder.batch_execute("commit").await.unwrap();
            let mut got = Vec::new();
            for t in *b"12TDC" {
                got.push(recv_tag(&mut r, t).await);
            }
            got.extend(within("the error", r.recv_until(b'E')).await);
            let e = got.last().unwrap();
            assert_eq!(e.code(), "22012", "{mode}: {}", show(&got));
            if !sync_in_tail {
                r.send(&raw::sync()).await;
            }
            let seg = within("the Sync's answer", r.recv_until(b'Z')).await;
            assert_eq!(
                tags(&seg),
                "Z",
                "{mode}, sync in tail {sync_in_tail}: {}",
                show(&seg)
            );
            still_usable(&mut r, mode).await;
        }
        assert_eq!(servers_closed(&proxy), 0, "{mode}: no server connection lost");
    }
}

/// Waits until a backend of `db` waits on a lock.
async fn wait_for_lock_waiter(db: &str) {
    let d = direct().await;
    let seen = within("a backend waiting on the lock", async {
        for _ in 0..6000 {
            let row = d
                .query_one(
                    "select count(*) from pg_stat_activity where datname = $1 and wait_event_type = 'Lock'",
                    &[&db],
                )
                .await
                .unwrap();
            if row.get::<_, i64>(0) > 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    })
    .await;
    assert!(seen, "the pipeline's first statement never waited on the lock");
}

/// pg-cursor: Parse of invalid SQL, Bind, Describe portal, Flush; the ErrorResponse; then
/// the Sync. Also with the Parse alone first (as a client writing one message at a time may
/// be read), so the backend's error comes before the Bind and Describe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_error_then_sync_keeps_the_connection() {
    let db = TestDb::new("pipe_cursor");
    for mode in MODES {
        let proxy = proxy(&db, mode, 2).await;
        let mut r = login(&proxy, &db).await;
        for round in 0..20 {
            let rest = [raw::bind(""), describe(b'P', ""), flush()].concat();
            if round % 2 == 0 {
                r.send(&[raw::parse("", "selec oops"), rest].concat()).await;
                assert_eq!(recv_tag(&mut r, b'E').await.code(), "42601");
            } else {
                r.send(&[raw::parse("", "selec oops"), flush()].concat()).await;
                assert_eq!(recv_tag(&mut r, b'E').await.code(), "42601");
                r.send(&rest).await;
            }
            r.send(&raw::sync()).await;
            let seg = within("the Sync's answer", r.recv_until(b'Z')).await;
            assert_eq!(tags(&seg), "Z", "{mode} round {round}: {}", show(&seg));
            still_usable(&mut r, mode).await;
        }
        assert_eq!(servers_closed(&proxy), 0, "{mode}: no server connection lost");
    }
}

/// asyncpg's `executemany`: 128 rows in one pipeline with a single Sync, the second repeating
/// the first's key and the rest 32 KiB each, so the backend's error comes back while the
/// client is still streaming megabytes of Bind/Execute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_while_the_client_streams_megabytes_of_binds() {
    let db = TestDb::new("pipe_stream");
    let table = unique("t");
    for mode in MODES {
        let proxy = proxy(&db, mode, 2).await;
        let mut r = login(&proxy, &db).await;
        r.send(&raw::query(&format!(
            "drop table if exists {table}; create table {table} (id int primary key, pad text)"
        )))
        .await;
        within("create table", r.recv_until(b'Z')).await;
        let pad = "x".repeat(32 * 1024);
        let mut bytes = raw::parse("", &format!("insert into {table} values ($1, $2)"));
        for i in 0..128 {
            let id = if i == 1 { "0".to_string() } else { i.to_string() };
            let p = if i < 2 { "small" } else { pad.as_str() };
            bytes.extend(bind_with("", "", &[&id, p]));
            bytes.extend(raw::execute());
        }
        bytes.extend(raw::sync());
        assert!(bytes.len() > 4_000_000);
        let got = within("the pipeline's answers", r.send_while_reading(&bytes, 1)).await;
        assert_eq!(tags(&got), "12C2EZ", "{mode}: {}", show(&got));
        assert_eq!(got[4].code(), "23505", "{mode}");
        r.send(&raw::query(&format!("select count(*) from {table}")))
            .await;
        let seg = within("count", r.recv_until(b'Z')).await;
        assert_eq!(
            values(&seg),
            ["0"],
            "{mode}: the implicit transaction rolled back"
        );
        still_usable(&mut r, mode).await;
        assert_eq!(servers_closed(&proxy), 0, "{mode}: no server connection lost");
    }
}

/// 20 clients run the failing `executemany` pattern 200 times each, the client's tail sent
/// with the head, just after it, or after the error: no connection breaks, and the backend
/// holds the same connections at the end as after the warm-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_batches_under_concurrency_break_nothing() {
    const CLIENTS: usize = 20;
    const ROUNDS: usize = 200;
    for mode in MODES {
        let db = TestDb::new("pipe_stress");
        // Session mode: a server per client. Transaction mode: a pool opened in full up
        // front, so the count of logins cannot grow unless one is lost.
        let (pool, warm_up) = match mode {
            "session" => (CLIENTS as u64, String::new()),
            _ => (5, "min_pool_size = 5".to_string()),
        };
        let global = format!("pool_mode = \"{mode}\"\ndefault_pool_size = {pool}\n{warm_up}");
        let proxy = start_proxy(&db.config(&global, "auth = \"trust\"")).await;
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let mut r = login(&proxy, &db).await;
            failing_batch(&mut r, 0).await;
            clients.push(r);
        }
        let logins = || -> u64 {
            proxy
                .pools()
                .all()
                .iter()
                .map(|p| PoolStats::get(&p.stats.server_logins))
                .sum()
        };
        assert!(
            support::eventually(LIMIT, || logins() == pool).await,
            "{mode}: the pool reached {pool} connections ({} logins)",
            logins()
        );
        let warm = db.backend_connections();
        assert_eq!(
            u64::from(warm),
            pool,
            "{mode}: backend connections after the warm-up"
        );
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut r| {
                tokio::spawn(async move {
                    for round in 0..ROUNDS {
                        failing_batch(&mut r, round).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            within("a client's rounds", t).await.unwrap();
        }
        assert_eq!(servers_closed(&proxy), 0, "{mode}: no server connection lost");
        assert_eq!(logins(), pool, "{mode}: no server connection replaced");
        assert_eq!(db.backend_connections(), warm, "{mode}: backend connections");
    }
}

/// One round of psycopg's failing `executemany` (insert into a missing table, two rows), then
/// `rollback` and a query, the tail sent in one of three ways.
async fn failing_batch(r: &mut Raw, round: usize) {
    let sql = "insert into nosuchtable values ($1, $2)";
    let first = [
        raw::parse("", sql),
        bind_with("", "", &["10", "a"]),
        describe(b'P', ""),
        raw::execute(),
    ]
    .concat();
    let second = [
        bind_with("", "", &["20", "b"]),
        describe(b'P', ""),
        raw::execute(),
        raw::sync(),
    ]
    .concat();
    match round % 3 {
        0 => r.send(&[first, second].concat()).await,
        1 => {
            r.send(&[first, flush()].concat()).await;
            tokio::task::yield_now().await;
            r.send(&second).await;
        }
        _ => {
            r.send(&[first, flush()].concat()).await;
            assert_eq!(recv_tag(r, b'E').await.code(), "42P01");
            r.send(&second).await;
        }
    }
    let seg = within("the batch's answer", r.recv_until(b'Z')).await;
    let want = if round % 3 == 2 { "Z" } else { "EZ" };
    assert_eq!(tags(&seg), want, "round {round}: {}", show(&seg));
    r.send(&raw::query("rollback")).await;
    let seg = within("rollback", r.recv_until(b'Z')).await;
    assert!(seg.iter().all(|m| m.tag != b'E'), "rollback: {}", show(&seg));
    r.send(&raw::query("select 1")).await;
    let seg = within("select", r.recv_until(b'Z')).await;
    assert_eq!(values(&seg), ["1"], "round {round}: {}", show(&seg));
}

/// An ErrorResponse too large for the relay to inspect (a 100 kB RAISE message, as asyncpg's
/// suite sends) still fails its request: the client gets it whole, then ReadyForQuery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_too_large_to_inspect_still_ends_the_request() {
    let db = TestDb::new("pipe_bigerr");
    let msg = "0".repeat(100 * 1024);
    let sql = format!("DO language plpgsql $$ BEGIN RAISE EXCEPTION '{msg}'; END $$");
    for mode in MODES {
        let proxy = proxy(&db, mode, 2).await;
        let mut r = login(&proxy, &db).await;
        for tail_first in [false, true] {
            let head = [raw::parse("big", &sql), raw::bind("big"), raw::execute()].concat();
            if tail_first {
                r.send(&[head, raw::sync()].concat()).await;
            } else {
                r.send(&[head, flush()].concat()).await;
                recv_tag(&mut r, b'1').await;
                recv_tag(&mut r, b'2').await;
                let e = recv_tag(&mut r, b'E').await;
                assert_eq!(e.field(b'M').as_deref(), Some(msg.as_str()));
                r.send(&[raw::bind("big"), raw::execute(), raw::sync()].concat())
                    .await;
            }
            let seg = within("the answers", r.recv_until(b'Z')).await;
            let want = if tail_first { "12EZ" } else { "Z" };
            assert_eq!(tags(&seg), want, "{mode}: {}", show(&seg));
            if tail_first {
                assert_eq!(seg[2].code(), "P0001");
            }
            r.send(&raw::sync()).await;
            within("a lone Sync", r.recv_until(b'Z')).await;
            // The client's statement stays (a failed Execute does not undo its Parse).
            r.send(&[raw::close(b'S', "big"), raw::sync()].concat()).await;
            let seg = within("close", r.recv_until(b'Z')).await;
            assert_eq!(tags(&seg), "3Z", "{mode}: {}", show(&seg));
            still_usable(&mut r, mode).await;
        }
        assert_eq!(servers_closed(&proxy), 0, "{mode}: no server connection lost");
    }
}
