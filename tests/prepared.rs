//! Named prepared statements under transaction pooling: client names mapped to proxy-wide
//! server statements, Parse injected on connections that lack a statement (its ParseComplete
//! swallowed), Close and DEALLOCATE answered from the client's view, errors skipping to Sync as
//! the backend does, LRU eviction, tracking disabled, and real drivers (sqlx, tokio-postgres)
//! under concurrency. Every expectation is what PostgreSQL itself answers on one connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgsluice::app::Proxy;
use pgsluice::pool::PoolStats;
use support::raw::{self, bind_with, close, describe, execute_portal, flush, show, tags, values, Msg, Raw};
use support::{connect, direct, start_proxy, TestDb};

const LIMIT: Duration = Duration::from_secs(120);

/// Bounds a wait.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---- frontend messages the shared helpers lack ----

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

// ---- reading answers ----

fn show_all(segs: &[Vec<Msg>]) -> String {
    segs.iter().map(|s| show(s)).collect::<Vec<_>>().join(" | ")
}

/// Reads the answers to `n` Syncs (or simple queries), one Vec per ReadyForQuery.
async fn segments(r: &mut Raw, n: usize) -> Vec<Vec<Msg>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(r.recv_until(b'Z').await);
    }
    out
}

fn command_tag(m: &Msg) -> String {
    assert_eq!(
        m.tag,
        b'C',
        "not a CommandComplete: {}",
        show(std::slice::from_ref(m))
    );
    String::from_utf8_lossy(m.body.split(|&b| b == 0).next().unwrap()).into_owned()
}

fn error_of(msgs: &[Msg]) -> &Msg {
    msgs.iter()
        .find(|m| m.tag == b'E')
        .unwrap_or_else(|| panic!("no ErrorResponse in {}", show(msgs)))
}

/// Sends `bytes` and expects exactly `want` as the tags of each ReadyForQuery-ended segment.
async fn expect_tags(r: &mut Raw, bytes: &[u8], want: &[&str]) -> Vec<Vec<Msg>> {
    r.send(bytes).await;
    let got = segments(r, want.len()).await;
    let got_tags: Vec<String> = got.iter().map(|s| tags(s)).collect();
    assert_eq!(got_tags, want, "answers: {}", show_all(&got));
    got
}

/// Bind (unnamed portal, no parameters), Execute and Sync of statement `stmt`.
fn run(stmt: &str) -> Vec<u8> {
    cat(&[raw::bind(stmt), raw::execute(), raw::sync()])
}

/// Parse of `sql` as `stmt`, then `run(stmt)`.
fn prepare_and_run(stmt: &str, sql: &str) -> Vec<u8> {
    cat(&[raw::parse(stmt, sql), run(stmt)])
}

/// Runs `stmt` (unnamed portal, no parameters): its first values, or the error.
async fn run_named(r: &mut Raw, stmt: &str) -> Result<Vec<String>, Msg> {
    r.send(&run(stmt)).await;
    let seg = r.recv_until(b'Z').await;
    match seg.iter().find(|m| m.tag == b'E') {
        Some(e) => {
            assert_eq!(tags(&seg), "EZ", "a failed Bind is answered by E, Z only");
            Err(e.clone())
        }
        None => {
            assert_eq!(tags(&seg), "2DCZ", "{}", show(&seg));
            Ok(values(&seg))
        }
    }
}

async fn simple(r: &mut Raw, sql: &str) -> Vec<Msg> {
    r.send(&raw::query(sql)).await;
    r.recv_until(b'Z').await
}

// ---- setup ----

fn proxy_config(db: &TestDb, global: &str) -> String {
    db.config(global, "auth = \"trust\"")
}

async fn login(proxy: &Proxy, db: &TestDb) -> Raw {
    let mut r = Raw::connect(proxy.addr()).await;
    let msgs = r.login_trust(&db.user, &db.user).await;
    assert!(
        msgs.iter().all(|m| m.tag != b'E'),
        "login failed: {}",
        show(&msgs)
    );
    r
}

fn stat(proxy: &Proxy, f: impl Fn(&PoolStats) -> &AtomicU64) -> u64 {
    PoolStats::get(f(&proxy.pools().all()[0].stats))
}

/// The backend pid of the server connection that serves `r`'s next transaction (pool of 1).
async fn server_pid(r: &mut Raw) -> i32 {
    let seg = simple(r, "select pg_backend_pid()").await;
    values(&seg)[0].parse().unwrap()
}

/// Kills the (idle) backend `pid` and waits until it is gone: the proxy then finds the pooled
/// connection dead at the next checkout and replaces it with a fresh one, which holds no
/// prepared statements.
async fn kill_backend(pid: i32) {
    let d = direct().await;
    let row = within(
        "pg_terminate_backend",
        d.query_one("select pg_terminate_backend($1, 30000)", &[&pid]),
    )
    .await
    .unwrap();
    assert!(row.get::<_, bool>(0), "backend {pid} did not terminate");
}

/// Names of the prepared statements the server connection serving `r` holds (pool of 1).
async fn server_statements(r: &mut Raw) -> Vec<String> {
    let seg = simple(r, "select name from pg_prepared_statements order by name").await;
    values(&seg)
}

// ---- 1, 2: statement missing on a fresh server connection ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_before_bind_on_a_fresh_server_swallows_the_injected_parse_complete() {
    let db = TestDb::new("prep_desc");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut r = login(&proxy, &db).await;
    expect_tags(
        &mut r,
        &cat(&[raw::parse("s1", "select $1::int4 + 1 as n"), raw::sync()]),
        &["1Z"],
    )
    .await;
    let pid = server_pid(&mut r).await;
    kill_backend(pid).await;

    // Describe first: the proxy prepares s1 on the new connection behind the client's back.
    let seg = expect_tags(&mut r, &cat(&[describe(b'S', "s1"), raw::sync()]), &["tTZ"]).await;
    let t = &seg[0][0];
    assert_eq!(&t.body[..2], &1u16.to_be_bytes(), "one parameter");
    assert_eq!(&t.body[2..6], &23u32.to_be_bytes(), "of type int4");
    let seg = expect_tags(
        &mut r,
        &cat(&[bind_with("", "s1", &["41"]), raw::execute(), raw::sync()]),
        &["2DCZ"],
    )
    .await;
    assert_eq!(values(&seg[0]), ["42"]);
    assert_ne!(
        server_pid(&mut r).await,
        pid,
        "the server connection was replaced"
    );
    assert_eq!(stat(&proxy, |s| &s.dead_on_checkout), 1);
    assert!(stat(&proxy, |s| &s.prepared_misses) >= 2, "prepared twice");
    // Describe + Flush (no Sync) on yet another fresh connection: the answers come at once,
    // still without the injected Parse's ParseComplete.
    let pid = server_pid(&mut r).await;
    kill_backend(pid).await;
    r.send(&cat(&[describe(b'S', "s1"), flush()])).await;
    let first = [r.recv().await.unwrap(), r.recv().await.unwrap()];
    assert_eq!(tags(&first), "tT", "{}", show(&first));
    let seg = expect_tags(
        &mut r,
        &cat(&[bind_with("", "s1", &["1"]), raw::execute(), raw::sync()]),
        &["2DCZ"],
    )
    .await;
    assert_eq!(values(&seg[0]), ["2"]);
    assert_eq!(stat(&proxy, |s| &s.dead_on_checkout), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_on_a_fresh_server_swallows_the_injected_parse_complete() {
    let db = TestDb::new("prep_bind");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut r = login(&proxy, &db).await;
    expect_tags(
        &mut r,
        &cat(&[raw::parse("s1", "select $1::int4 * 2 as n"), raw::sync()]),
        &["1Z"],
    )
    .await;
    let pid = server_pid(&mut r).await;
    kill_backend(pid).await;

    let seg = expect_tags(
        &mut r,
        &cat(&[bind_with("", "s1", &["21"]), raw::execute(), raw::sync()]),
        &["2DCZ"],
    )
    .await;
    assert_eq!(values(&seg[0]), ["42"]);
    assert_eq!(command_tag(&seg[0][2]), "SELECT 1");
    // Once more on the same (new) connection: now a hit, still no stray ParseComplete.
    let seg = expect_tags(
        &mut r,
        &cat(&[bind_with("", "s1", &["5"]), raw::execute(), raw::sync()]),
        &["2DCZ"],
    )
    .await;
    assert_eq!(values(&seg[0]), ["10"]);
    assert_eq!(stat(&proxy, |s| &s.dead_on_checkout), 1);
    // The server holds it under the proxy-wide name only.
    let names = server_statements(&mut r).await;
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("pgsluice_"), "{names:?}");
}

// ---- 3: pipelines ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_with_several_syncs_is_answered_in_order() {
    let db = TestDb::new("prep_pipe");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 2")).await;
    let mut r = login(&proxy, &db).await;
    let bytes = cat(&[
        prepare_and_run("a", "select 1 as a"),
        raw::parse("b", "select 2 as b"),
        describe(b'S', "b"),
        run("b"),
        close(b'S', "a"),
        raw::sync(),
    ]);
    let seg = expect_tags(&mut r, &bytes, &["12DCZ", "1tT2DCZ", "3Z"]).await;
    assert_eq!(values(&seg[0]), ["1"]);
    assert_eq!(values(&seg[1]), ["2"]);
    // A statement without result columns describes as NoData.
    let bytes = cat(&[
        raw::parse("c", "create temp table if not exists tt (x int)"),
        describe(b'S', "c"),
        raw::sync(),
    ]);
    expect_tags(&mut r, &bytes, &["1tnZ"]).await;
    // a is gone for this client, b still there.
    assert_eq!(run_named(&mut r, "a").await.unwrap_err().code(), "26000");
    assert_eq!(run_named(&mut r, "b").await.unwrap(), ["2"]);
    // The same pipeline again from a second client (the statements are now hits somewhere).
    let mut r2 = login(&proxy, &db).await;
    let bytes = cat(&[
        prepare_and_run("a", "select 1 as a"),
        raw::parse("b", "select 2 as b"),
        describe(b'S', "b"),
        run("b"),
        close(b'S', "a"),
        raw::sync(),
    ]);
    expect_tags(&mut r2, &bytes, &["12DCZ", "1tT2DCZ", "3Z"]).await;
}

// ---- 4: errors mid-pipeline ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_mid_pipeline_skips_to_sync_and_forgets_the_failed_statement() {
    let db = TestDb::new("prep_err");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 2")).await;
    let mut r = login(&proxy, &db).await;
    let bytes = cat(&[
        prepare_and_run("g", "select 'good'"),
        prepare_and_run("x", "selec oops"),
        run("g"),
    ]);
    let seg = expect_tags(&mut r, &bytes, &["12DCZ", "EZ", "2DCZ"]).await;
    assert_eq!(values(&seg[0]), ["good"]);
    assert_eq!(error_of(&seg[1]).code(), "42601");
    assert_eq!(values(&seg[2]), ["good"]);
    let e = run_named(&mut r, "x").await.unwrap_err();
    assert_eq!(e.code(), "26000");
    assert_eq!(
        e.field(b'M').as_deref(),
        Some("prepared statement \"x\" does not exist")
    );
    // Describe of an unknown statement, too; and the name x is free again.
    let seg = expect_tags(&mut r, &cat(&[describe(b'S', "x"), raw::sync()]), &["EZ"]).await;
    assert_eq!(error_of(&seg[0]).code(), "26000");
    expect_tags(
        &mut r,
        &cat(&[raw::parse("x", "select 'x now'"), raw::sync()]),
        &["1Z"],
    )
    .await;
    assert_eq!(run_named(&mut r, "x").await.unwrap(), ["x now"]);
    // A proxy-side error (unknown statement) in the middle of forwarded requests: the earlier
    // answers come first, everything after it up to Sync is skipped.
    let bytes = cat(&[
        raw::parse("y", "select 'y'"),
        raw::bind("nosuch"),
        raw::execute(),
        raw::parse("z", "select 'z'"),
        raw::sync(),
        run("y"),
    ]);
    let seg = expect_tags(&mut r, &bytes, &["1EZ", "2DCZ"]).await;
    assert_eq!(error_of(&seg[0]).code(), "26000");
    assert_eq!(values(&seg[1]), ["y"]);
    assert_eq!(run_named(&mut r, "z").await.unwrap_err().code(), "26000");
}

/// Requests the backend skipped after an error must leave no trace: a Parse that the proxy
/// answered itself (the server already had the text) must not create the name, and a Close
/// that was skipped must not remove it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_skipped_after_an_error_do_not_change_the_clients_statements() {
    let db = TestDb::new("prep_skip");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut r = login(&proxy, &db).await;
    expect_tags(
        &mut r,
        &cat(&[raw::parse("g", "select 10"), raw::sync()]),
        &["1Z"],
    )
    .await;
    let bytes = cat(&[
        raw::parse("x", "selec oops"),
        raw::parse("g2", "select 10"), // same text as g: the server already has it
        close(b'S', "g"),
        raw::sync(),
    ]);
    let seg = expect_tags(&mut r, &bytes, &["EZ"]).await;
    assert_eq!(error_of(&seg[0]).code(), "42601");
    let mut problems = Vec::new();
    if let Err(e) = run_named(&mut r, "g").await {
        problems.push(format!(
            "the Close of g was skipped by the backend, so g must still exist; Bind g got {}",
            show(&[e])
        ));
    }
    if let Ok(v) = run_named(&mut r, "g2").await {
        problems.push(format!(
            "the Parse of g2 was skipped by the backend, so Bind g2 must be 26000; it returned {v:?}"
        ));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A later Sync segment of the same pipeline must not rely on statements an earlier, failed
/// segment was going to prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_of_a_failed_segment_are_not_assumed_by_the_next_segment() {
    let db = TestDb::new("prep_seg");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut r = login(&proxy, &db).await;
    let mut problems = Vec::new();
    // A Parse the client sent, skipped after an error; the next segment parses the same text.
    let bytes = cat(&[
        raw::parse("x", "selec oops"),
        raw::parse("a", "select 11"), // skipped by the backend
        raw::sync(),
        raw::parse("b", "select 11"), // same text as a
        run("b"),
    ]);
    r.send(&bytes).await;
    let seg = segments(&mut r, 2).await;
    if tags(&seg[0]) != "EZ" || tags(&seg[1]) != "12DCZ" || values(&seg[1]) != ["11"] {
        problems.push(format!(
            "skipped client Parse: want EZ | 1 2 D C Z, got {}",
            show_all(&seg)
        ));
    }
    // A Parse the proxy injected for a Bind (the statement was prepared on another, now dead,
    // connection), skipped after an error; the next segment binds the same statement.
    expect_tags(
        &mut r,
        &cat(&[raw::parse("s", "select 12"), raw::sync()]),
        &["1Z"],
    )
    .await;
    let pid = server_pid(&mut r).await;
    kill_backend(pid).await;
    let bytes = cat(&[
        raw::parse("x2", "selec oops"),
        raw::bind("s"), // skipped, and so is the Parse injected before it
        raw::execute(),
        raw::sync(),
        run("s"),
    ]);
    r.send(&bytes).await;
    let seg = segments(&mut r, 2).await;
    if tags(&seg[0]) != "EZ" || tags(&seg[1]) != "2DCZ" || values(&seg[1]) != ["12"] {
        problems.push(format!(
            "skipped injected Parse: want EZ | 2 D C Z, got {}",
            show_all(&seg)
        ));
    }
    // Either way the client's session is still usable afterwards.
    assert_eq!(
        run_named(&mut r, "s").await.map_err(|e| show(&[e])),
        Ok(vec!["12".to_string()])
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---- 5: duplicate Parse ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_parse_is_42p05_and_keeps_the_first_statement() {
    let db = TestDb::new("prep_dup");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 2")).await;
    let mut r = login(&proxy, &db).await;
    let bytes = cat(&[
        prepare_and_run("d", "select 'first'"),
        prepare_and_run("d", "select 'second'"),
        run("d"),
    ]);
    let seg = expect_tags(&mut r, &bytes, &["12DCZ", "EZ", "2DCZ"]).await;
    assert_eq!(values(&seg[0]), ["first"]);
    let e = error_of(&seg[1]);
    assert_eq!(e.code(), "42P05");
    assert_eq!(
        e.field(b'M').as_deref(),
        Some("prepared statement \"d\" already exists")
    );
    assert_eq!(values(&seg[2]), ["first"]);
    // Twice in one segment: the first one's ParseComplete, then the error.
    let bytes = cat(&[
        raw::parse("e", "select 'e1'"),
        prepare_and_run("e", "select 'e2'"),
    ]);
    let seg = expect_tags(&mut r, &bytes, &["1EZ"]).await;
    assert_eq!(error_of(&seg[0]).code(), "42P05");
    assert_eq!(run_named(&mut r, "e").await.unwrap(), ["e1"]);
    // Same text, same name: still a duplicate.
    let seg = expect_tags(
        &mut r,
        &cat(&[raw::parse("e", "select 'e1'"), raw::sync()]),
        &["EZ"],
    )
    .await;
    assert_eq!(error_of(&seg[0]).code(), "42P05");
    assert_eq!(run_named(&mut r, "d").await.unwrap(), ["first"]);
}

// ---- 6: Close ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_statement_only_affects_the_closing_client() {
    let db = TestDb::new("prep_close");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut a = login(&proxy, &db).await;
    let mut b = login(&proxy, &db).await;
    let p = cat(&[raw::parse("c", "select 42 as c"), raw::sync()]);
    expect_tags(&mut a, &p, &["1Z"]).await;
    let hits = stat(&proxy, |s| &s.prepared_hits);
    expect_tags(&mut b, &p, &["1Z"]).await;
    assert!(
        stat(&proxy, |s| &s.prepared_hits) > hits,
        "B's Parse reused A's server statement"
    );
    expect_tags(&mut a, &cat(&[close(b'S', "c"), raw::sync()]), &["3Z"]).await;
    assert_eq!(run_named(&mut b, "c").await.unwrap(), ["42"]);
    assert_eq!(run_named(&mut a, "c").await.unwrap_err().code(), "26000");
    // Closing a name never prepared is not an error.
    expect_tags(&mut a, &cat(&[close(b'S', "never"), raw::sync()]), &["3Z"]).await;
    // The name is free again, for another text.
    expect_tags(
        &mut a,
        &cat(&[raw::parse("c", "select 43 as c"), raw::sync()]),
        &["1Z"],
    )
    .await;
    assert_eq!(run_named(&mut a, "c").await.unwrap(), ["43"]);
    assert_eq!(run_named(&mut b, "c").await.unwrap(), ["42"]);
    // Close of a portal passes through to the backend.
    let bytes = cat(&[
        bind_with("p1", "c", &[]),
        describe(b'P', "p1"),
        close(b'P', "p1"),
        execute_portal("p1"),
        raw::sync(),
    ]);
    let seg = expect_tags(&mut b, &bytes, &["2T3EZ"]).await;
    assert_eq!(error_of(&seg[0]).code(), "34000");
    let bytes = cat(&[
        bind_with("p2", "c", &[]),
        execute_portal("p2"),
        close(b'P', "p2"),
        close(b'P', "not_a_portal"),
        raw::sync(),
    ]);
    let seg = expect_tags(&mut b, &bytes, &["2DC33Z"]).await;
    assert_eq!(values(&seg[0]), ["42"]);
}

// ---- 7: DEALLOCATE ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_only_affects_the_clients_names() {
    let db = TestDb::new("prep_dealloc");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut a = login(&proxy, &db).await;
    let mut b = login(&proxy, &db).await;
    let p1 = cat(&[raw::parse("s1", "select 7"), raw::sync()]);
    expect_tags(&mut a, &p1, &["1Z"]).await;
    expect_tags(&mut b, &p1, &["1Z"]).await;

    let seg = simple(&mut a, "DEALLOCATE s1").await;
    assert_eq!(tags(&seg), "CZ", "{}", show(&seg));
    assert_eq!(command_tag(&seg[0]), "DEALLOCATE");
    assert_eq!(run_named(&mut a, "s1").await.unwrap_err().code(), "26000");
    assert_eq!(run_named(&mut b, "s1").await.unwrap(), ["7"]);

    let seg = simple(&mut a, "DEALLOCATE nosuch").await;
    assert_eq!(tags(&seg), "EZ", "{}", show(&seg));
    assert_eq!(error_of(&seg).code(), "26000");
    assert_eq!(
        error_of(&seg).field(b'M').as_deref(),
        Some("prepared statement \"nosuch\" does not exist")
    );

    let bytes = cat(&[
        raw::parse("s1", "select 7"),
        raw::parse("s2", "select 8"),
        raw::parse("s3", "select 9"),
        raw::sync(),
    ]);
    expect_tags(&mut a, &bytes, &["111Z"]).await;
    let seg = simple(&mut a, "deallocate prepare s3;").await;
    assert_eq!(command_tag(&seg[0]), "DEALLOCATE");
    let seg = simple(&mut a, "DEALLOCATE ALL").await;
    assert_eq!(tags(&seg), "CZ", "{}", show(&seg));
    assert_eq!(command_tag(&seg[0]), "DEALLOCATE ALL");
    for name in ["s1", "s2", "s3"] {
        assert_eq!(
            run_named(&mut a, name).await.unwrap_err().code(),
            "26000",
            "{name}"
        );
    }
    // The other client's identical statement still works: the server dropped it with the
    // DEALLOCATE ALL, and it is prepared again transparently.
    assert_eq!(run_named(&mut b, "s1").await.unwrap(), ["7"]);
    // Inside a transaction block DEALLOCATE keeps the block's status.
    let seg = simple(&mut b, "begin").await;
    assert_eq!(seg.last().unwrap().body, b"T");
    let seg = simple(&mut b, "DEALLOCATE s1").await;
    assert_eq!(tags(&seg), "CZ", "{}", show(&seg));
    assert_eq!(seg[1].body, b"T");
    let seg = simple(&mut b, "commit").await;
    assert_eq!(seg.last().unwrap().body, b"I");
    assert_eq!(run_named(&mut b, "s1").await.unwrap_err().code(), "26000");
    // DISCARD ALL drops every statement of the client that sent it, and the server's: the
    // other client's statement is prepared again transparently.
    let p9 = cat(&[raw::parse("s9", "select 9"), raw::sync()]);
    expect_tags(&mut a, &p9, &["1Z"]).await;
    expect_tags(&mut b, &p9, &["1Z"]).await;
    let seg = simple(&mut a, "DISCARD ALL").await;
    assert_eq!(command_tag(&seg[0]), "DISCARD ALL");
    assert_eq!(run_named(&mut a, "s9").await.unwrap_err().code(), "26000");
    assert_eq!(run_named(&mut b, "s9").await.unwrap(), ["9"]);
}

/// DEALLOCATE names are SQL identifiers: unquoted ones fold to lower case, quoted ones are
/// taken literally (`"all"` is a statement called all, `""` inside quotes is one quote).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_names_follow_identifier_rules() {
    let db = TestDb::new("prep_dname");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut r = login(&proxy, &db).await;
    let bytes = cat(&[
        raw::parse("MyStmt", "select 'my'"),
        raw::parse("all", "select 'all'"),
        raw::parse("a\"b", "select 'quote'"),
        raw::parse("keep", "select 'keep'"),
        raw::sync(),
    ]);
    expect_tags(&mut r, &bytes, &["1111Z"]).await;
    let mut problems = Vec::new();
    let mut check = |sql: &str, got: Vec<Msg>, want: &str| {
        let ok = match want {
            "26000" => tags(&got) == "EZ" && got[0].code() == "26000",
            tag => tags(&got) == "CZ" && command_tag(&got[0]) == tag,
        };
        if !ok {
            problems.push(format!("{sql}: want {want}, got {}", show(&got)));
        }
    };
    // Unquoted: folded to mystmt, which does not exist.
    check(
        "DEALLOCATE MyStmt",
        simple(&mut r, "DEALLOCATE MyStmt").await,
        "26000",
    );
    check(
        "DEALLOCATE \"MyStmt\"",
        simple(&mut r, "DEALLOCATE \"MyStmt\"").await,
        "DEALLOCATE",
    );
    check(
        "DEALLOCATE \"all\"",
        simple(&mut r, "DEALLOCATE \"all\"").await,
        "DEALLOCATE",
    );
    check(
        "DEALLOCATE \"a\"\"b\"",
        simple(&mut r, "DEALLOCATE \"a\"\"b\"").await,
        "DEALLOCATE",
    );
    if let Err(e) = run_named(&mut r, "keep").await {
        problems.push(format!(
            "after DEALLOCATE \"all\" (one statement) keep must still exist; Bind keep got {}",
            show(&[e])
        ));
    }
    for gone in ["MyStmt", "all", "a\"b"] {
        if let Ok(v) = run_named(&mut r, gone).await {
            problems.push(format!("{gone} was deallocated, yet Bind returned {v:?}"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Drivers send DEALLOCATE through the extended protocol too (tokio-postgres `execute`): it
/// must act on the client's names exactly like the simple-query form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_through_the_extended_protocol() {
    let db = TestDb::new("prep_dext");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut a = login(&proxy, &db).await;
    let mut b = login(&proxy, &db).await;
    let p = cat(&[
        raw::parse("s1", "select 1"),
        raw::parse("s2", "select 2"),
        raw::sync(),
    ]);
    expect_tags(&mut a, &p, &["11Z"]).await;
    expect_tags(&mut b, &p, &["11Z"]).await;
    let unnamed = |sql: &str| cat(&[raw::parse("", sql), raw::bind(""), raw::execute(), raw::sync()]);
    let mut problems = Vec::new();
    a.send(&unnamed("DEALLOCATE s1")).await;
    let seg = a.recv_until(b'Z').await;
    if tags(&seg) != "12CZ" || command_tag(&seg[2]) != "DEALLOCATE" {
        problems.push(format!(
            "extended DEALLOCATE s1: want 1 2 C(DEALLOCATE) Z, got {}",
            show(&seg)
        ));
    }
    if let Ok(v) = run_named(&mut a, "s1").await {
        problems.push(format!("s1 was deallocated, yet Bind s1 returned {v:?}"));
    }
    a.send(&unnamed("DEALLOCATE ALL")).await;
    let seg = a.recv_until(b'Z').await;
    if tags(&seg) != "12CZ" || command_tag(&seg[2]) != "DEALLOCATE ALL" {
        problems.push(format!(
            "extended DEALLOCATE ALL: want 1 2 C(DEALLOCATE ALL) Z, got {}",
            show(&seg)
        ));
    }
    if let Ok(v) = run_named(&mut a, "s2").await {
        problems.push(format!("DEALLOCATE ALL ran, yet Bind s2 returned {v:?}"));
    }
    // The other client is unaffected either way.
    assert_eq!(
        run_named(&mut b, "s1").await.map_err(|e| show(&[e])),
        Ok(vec!["1".to_string()])
    );
    assert_eq!(
        run_named(&mut b, "s2").await.map_err(|e| show(&[e])),
        Ok(vec!["2".to_string()])
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

/// A named statement with a text larger than the proxy holds for replay (1 MiB) must still
/// behave like any other: usable by its client, invisible to other clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_named_statement_is_usable_and_private() {
    let db = TestDb::new("prep_big");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut a = login(&proxy, &db).await;
    let mut b = login(&proxy, &db).await;
    let sql = format!("select 'big' /* {} */", "x".repeat(1024 * 1024 + 100));
    let p = cat(&[raw::parse("big", &sql), raw::sync()]);
    expect_tags(&mut a, &p, &["1Z"]).await;
    let mut problems = Vec::new();
    match run_named(&mut a, "big").await {
        Ok(v) if v == ["big"] => {}
        other => problems.push(format!(
            "A: Bind of its own large statement: {:?}",
            other.map_err(|e| show(&[e]))
        )),
    }
    // B never prepared "big": for B the name is free and unknown.
    match run_named(&mut b, "big").await {
        Err(e) if e.code() == "26000" => {}
        other => problems.push(format!(
            "B: Bind of A's statement name must be 26000: {:?}",
            other.map_err(|e| show(&[e]))
        )),
    }
    b.send(&p).await;
    let seg = b.recv_until(b'Z').await;
    if tags(&seg) != "1Z" {
        problems.push(format!(
            "B: Parse of the name \"big\" (never used by B) must succeed: {}",
            show(&seg)
        ));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---- 8: LRU eviction ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_reprepares_transparently() {
    let db = TestDb::new("prep_lru");
    let proxy = start_proxy(&proxy_config(
        &db,
        "default_pool_size = 1\nmax_prepared_statements = 3",
    ))
    .await;
    let mut r = login(&proxy, &db).await;
    let names: Vec<String> = (1..=5).map(|i| format!("q{i}")).collect();
    let mut parses: Vec<Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| raw::parse(n, &format!("select {} as {n}", i + 1)))
        .collect();
    parses.push(raw::sync());
    expect_tags(&mut r, &cat(&parses), &["11111Z"]).await;
    for _round in 0..2 {
        for (i, n) in names.iter().enumerate() {
            assert_eq!(run_named(&mut r, n).await.unwrap(), [(i + 1).to_string()]);
        }
    }
    // All five in one segment (each evicts one bound earlier in the same pipeline).
    let mut bytes = Vec::new();
    for n in names.iter().rev() {
        bytes.extend(raw::bind(n));
        bytes.extend(raw::execute());
    }
    bytes.extend(raw::sync());
    let seg = expect_tags(&mut r, &bytes, &["2DC2DC2DC2DC2DCZ"]).await;
    assert_eq!(values(&seg[0]), ["5", "4", "3", "2", "1"]);
    assert!(stat(&proxy, |s| &s.prepared_evictions) > 0);
    assert_eq!(run_named(&mut r, "q1").await.unwrap(), ["1"]);
    let held = server_statements(&mut r).await;
    assert!(held.len() <= 3, "server holds {held:?}");
    assert!(held.iter().all(|n| n.starts_with("pgsluice_")), "{held:?}");
}

// ---- 9: tracking disabled ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_passes_named_statements_through() {
    let db = TestDb::new("prep_sess");
    let proxy = start_proxy(&db.config(
        "default_pool_size = 1",
        "auth = \"trust\"\npool_mode = \"session\"",
    ))
    .await;
    let mut r = login(&proxy, &db).await;
    let bytes = cat(&[raw::parse("s1", "select 5"), describe(b'S', "s1"), run("s1")]);
    let seg = expect_tags(&mut r, &bytes, &["1tT2DCZ"]).await;
    assert_eq!(values(&seg[0]), ["5"]);
    assert_eq!(server_statements(&mut r).await, ["s1"]);
    let seg = simple(&mut r, "DEALLOCATE s1").await;
    assert_eq!(command_tag(&seg[0]), "DEALLOCATE");
    assert!(server_statements(&mut r).await.is_empty());
    assert_eq!(stat(&proxy, |s| &s.prepared_misses), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_prepared_statements_zero_passes_named_statements_through() {
    let db = TestDb::new("prep_off");
    let proxy = start_proxy(&proxy_config(
        &db,
        "default_pool_size = 1\nmax_prepared_statements = 0",
    ))
    .await;
    let mut r = login(&proxy, &db).await;
    expect_tags(
        &mut r,
        &cat(&[raw::parse("s1", "select 6"), raw::sync()]),
        &["1Z"],
    )
    .await;
    // Untouched: the server holds it under the client's own name.
    assert_eq!(server_statements(&mut r).await, ["s1"]);
    assert_eq!(run_named(&mut r, "s1").await.unwrap(), ["6"]);
    // The backend's own answers: duplicate name, Close.
    let seg = expect_tags(
        &mut r,
        &cat(&[raw::parse("s1", "select 6"), raw::sync()]),
        &["EZ"],
    )
    .await;
    assert_eq!(error_of(&seg[0]).code(), "42P05");
    expect_tags(
        &mut r,
        &cat(&[raw::parse("s2", "select 66"), raw::sync()]),
        &["1Z"],
    )
    .await;
    expect_tags(&mut r, &cat(&[close(b'S', "s2"), raw::sync()]), &["3Z"]).await;
    assert_eq!(server_statements(&mut r).await, ["s1"]);
    assert_eq!(stat(&proxy, |s| &s.prepared_misses), 0);
    assert_eq!(stat(&proxy, |s| &s.prepared_hits), 0);
    // DEALLOCATE goes to the backend too (the proxy tracks nothing it could answer from).
    let seg = simple(&mut r, "DEALLOCATE s1").await;
    assert_eq!(
        tags(&seg),
        "CZ",
        "DEALLOCATE of a statement the server has: {}",
        show(&seg)
    );
    assert_eq!(command_tag(&seg[0]), "DEALLOCATE");
    assert!(server_statements(&mut r).await.is_empty());
}

// ---- 10: sqlx ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_pool_with_statement_cache_under_load() {
    use sqlx::postgres::PgPoolOptions;
    use sqlx::Row;

    let db = TestDb::new("prep_sqlx");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 5")).await;
    let setup = connect(&db.url(&proxy)).await;
    within(
        "create table",
        setup.simple_query("create table t (id serial primary key, v int not null)"),
    )
    .await
    .unwrap();
    let url = format!(
        "postgres://{}@127.0.0.1:{}/{}?sslmode=disable",
        db.user,
        proxy.addr().port(),
        db.user
    );
    let pool = within(
        "sqlx pool",
        PgPoolOptions::new()
            .max_connections(20)
            .acquire_timeout(LIMIT)
            .connect(&url),
    )
    .await
    .unwrap();
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let committed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        let pool = pool.clone();
        let errors = errors.clone();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            let fail = |e: String| errors.lock().unwrap().push(e);
            for j in 0..10i32 {
                let v = i * 10 + j;
                match sqlx::query("select $1::int4 + 1").bind(v).fetch_one(&pool).await {
                    Ok(row) => {
                        let got: i32 = row.get(0);
                        if got != v + 1 {
                            fail(format!("select {v} + 1 returned {got}"));
                        }
                    }
                    Err(e) => fail(format!("select: {e}")),
                }
            }
            let tx = async {
                let mut tx = pool.begin().await?;
                sqlx::query("insert into t (v) values ($1)")
                    .bind(i)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            };
            match tx.await {
                Ok(()) => {
                    committed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => fail(format!("transaction: {e}")),
            }
        }));
    }
    within("sqlx tasks", async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} errors, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let count: i64 = within("count", sqlx::query("select count(*) from t").fetch_one(&pool))
        .await
        .unwrap()
        .get(0);
    assert_eq!(u64::try_from(count).unwrap(), committed.load(Ordering::Relaxed));
    assert_eq!(count, 200);
    assert!(stat(&proxy, |s| &s.prepared_hits) > 0);
    within("close pool", pool.close()).await;
}

// ---- 11: tokio-postgres, nothing acknowledged is lost ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_transactions_lose_nothing() {
    let db = TestDb::new("prep_tp");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 5")).await;
    let url = db.url(&proxy);
    let setup = connect(&url).await;
    within(
        "create table",
        setup.simple_query("create table t (task int not null, seq int not null, primary key (task, seq))"),
    )
    .await
    .unwrap();
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for task in 0..200i32 {
        let url = url.clone();
        let errors = errors.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let fail = |e: String| errors.lock().unwrap().push(e);
            let (mut c, conn) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok(x) => x,
                Err(e) => return fail(format!("connect: {e}")),
            };
            tokio::spawn(async move {
                let _ = conn.await;
            });
            const INSERT: &str = "insert into t (task, seq) values ($1, $2)";
            // Prepared outside any transaction: used later on whichever server connection.
            let mut outer = match c.prepare(INSERT).await {
                Ok(s) => Some(s),
                Err(e) => return fail(format!("prepare: {e}")),
            };
            let mut kept = Vec::new();
            for seq in 0..10i32 {
                let res: Result<(), tokio_postgres::Error> = async {
                    let tx = c.transaction().await?;
                    if seq % 2 == 0 {
                        let st = match outer.take() {
                            Some(s) => s,
                            None => tx.prepare(INSERT).await?,
                        };
                        tx.execute(&st, &[&task, &seq]).await?;
                        if seq % 4 == 0 {
                            drop(st); // Close inside the transaction
                        } else {
                            outer = Some(st);
                        }
                    } else {
                        let st = tx.prepare(INSERT).await?;
                        tx.execute(&st, &[&task, &seq]).await?;
                        let check = tx.prepare("select count(*) from t where task = $1").await?;
                        let n: i64 = tx.query_one(&check, &[&task]).await?.get(0);
                        if n != i64::from(seq) + 1 {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("task {task} seq {seq}: sees {n} rows"));
                        }
                        kept.push(st);
                    }
                    tx.commit().await
                }
                .await;
                match res {
                    Ok(()) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => fail(format!("task {task} seq {seq}: {e}")),
                }
                if seq % 3 == 0 {
                    kept.clear(); // Close between transactions
                }
            }
        }));
    }
    within("tokio-postgres tasks", async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} errors, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let count: i64 = within("count", setup.query_one("select count(*) from t", &[]))
        .await
        .unwrap()
        .get(0);
    assert_eq!(u64::try_from(count).unwrap(), acked.load(Ordering::Relaxed));
    assert_eq!(count, 2000);
    assert!(stat(&proxy, |s| &s.prepared_hits) > 0);
}

/// Inside a failed transaction block, DEALLOCATE is refused as PostgreSQL refuses it (25P02),
/// and the statement stays; after ROLLBACK it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_in_a_failed_block_is_refused_like_any_command() {
    let db = TestDb::new("prep_dabort");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut r = login(&proxy, &db).await;
    let bytes = cat(&[raw::parse("s", "select 's'"), raw::sync()]);
    expect_tags(&mut r, &bytes, &["1Z"]).await;
    let begun = simple(&mut r, "BEGIN").await;
    assert_eq!(tags(&begun), "CZ", "{}", show(&begun));
    let failed = simple(&mut r, "SELECT 1/0").await;
    assert_eq!(tags(&failed), "EZ", "{}", show(&failed));
    let refused = simple(&mut r, "DEALLOCATE s").await;
    assert_eq!(tags(&refused), "EZ", "{}", show(&refused));
    assert_eq!(refused[0].code(), "25P02", "{}", show(&refused));
    assert_eq!(refused[1].body, b"E", "still in the failed block");
    let rolled = simple(&mut r, "ROLLBACK").await;
    assert_eq!(tags(&rolled), "CZ", "{}", show(&rolled));
    let done = simple(&mut r, "DEALLOCATE s").await;
    assert_eq!(
        tags(&done),
        "CZ",
        "the statement survived the refused DEALLOCATE: {}",
        show(&done)
    );
}

// ---- plans made stale by DDL ----

/// Parse, Bind (text parameters), Execute and Sync of named statement `stmt`.
fn prepare_bind_run(stmt: &str, sql: &str, params: &[&str]) -> Vec<u8> {
    cat(&[
        raw::parse(stmt, sql),
        bind_with("", stmt, params),
        raw::execute(),
        raw::sync(),
    ])
}

async fn simple_ok(r: &mut Raw, sql: &str) -> Vec<Msg> {
    let seg = simple(r, sql).await;
    assert!(seg.iter().all(|m| m.tag != b'E'), "{sql}: {}", show(&seg));
    seg
}

/// psycopg's `prepare_threshold = 0` after `DROP TYPE` + `CREATE TYPE` of the same name: it
/// sends `DEALLOCATE ALL`, then prepares the same text again, which must be planned afresh
/// (not mapped onto the shared statement that refers to the dropped type: XX000 cache lookup
/// failed for type). The session then shows no statements; another client's statement of the
/// same text keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_all_after_drop_type_plans_afresh() {
    let db = TestDb::new("prep_type");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut a = login(&proxy, &db).await;
    let mut b = login(&proxy, &db).await;
    let ddl = "CREATE TYPE prepenum AS ENUM ('foo', 'bar'); CREATE TABLE preptable (bar prepenum[])";
    let insert = "INSERT INTO preptable (bar) VALUES ($1::prepenum[])";
    simple_ok(&mut a, ddl).await;
    expect_tags(&mut a, &prepare_bind_run("_pg3_0", insert, &["{foo}"]), &["12CZ"]).await;
    expect_tags(&mut b, &prepare_bind_run("b0", insert, &["{bar}"]), &["12CZ"]).await;
    simple_ok(&mut a, "DROP TABLE preptable; DROP TYPE prepenum").await;
    simple_ok(&mut a, ddl).await;
    let seg = simple_ok(&mut a, "DEALLOCATE ALL").await;
    assert_eq!(command_tag(&seg[0]), "DEALLOCATE ALL");
    assert_eq!(
        server_statements(&mut a).await,
        Vec::<String>::new(),
        "pg_prepared_statements after DEALLOCATE ALL"
    );
    let seg = expect_tags(&mut a, &prepare_bind_run("_pg3_0", insert, &["{foo}"]), &["12CZ"]).await;
    assert_eq!(command_tag(&seg[0][2]), "INSERT 0 1");
    // b's statement predates the DDL; it was dropped from the server with the DEALLOCATE ALL
    // and is prepared again, now against the new type.
    b.send(&cat(&[
        bind_with("", "b0", &["{bar}"]),
        raw::execute(),
        raw::sync(),
    ]))
    .await;
    let seg = b.recv_until(b'Z').await;
    assert_eq!(tags(&seg), "2CZ", "{}", show(&seg));
    let seg = simple_ok(&mut a, "select count(*) from preptable").await;
    assert_eq!(values(&seg), ["2"]);
}

/// `ALTER TABLE` changes a statement's result type: a client whose statement predates it gets
/// PostgreSQL's `0A000 cached plan must not change result type`, as it would directly, but no
/// client preparing the same text later may be handed that stale statement; and after
/// `DEALLOCATE ALL` the altering client's own Parse is planned afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_plan_is_never_handed_to_a_later_parse() {
    let db = TestDb::new("prep_alter");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut a = login(&proxy, &db).await;
    let mut b = login(&proxy, &db).await;
    let select = "SELECT * FROM testalter ORDER BY id";
    simple_ok(
        &mut a,
        "CREATE TABLE testalter (id serial primary key, data text); INSERT INTO testalter (data) VALUES ('foo')",
    )
    .await;
    expect_tags(&mut a, &prepare_bind_run("s", select, &[]), &["12DCZ"]).await;
    expect_tags(&mut b, &prepare_bind_run("s", select, &[]), &["12DCZ"]).await;
    simple_ok(&mut a, "ALTER TABLE testalter ADD data2 text").await;
    let e = run_named(&mut b, "s").await.unwrap_err();
    assert_eq!(e.code(), "0A000", "{}", show(std::slice::from_ref(&e)));
    // A client preparing the same text now gets a statement planned afresh.
    let mut c = login(&proxy, &db).await;
    let seg = expect_tags(&mut c, &prepare_bind_run("s", select, &[]), &["12DCZ"]).await;
    assert_eq!(values(&seg[0]), ["1"]);
    // So does the altering client after DEALLOCATE ALL (psycopg sends it after ALTER).
    simple_ok(&mut a, "DEALLOCATE ALL").await;
    expect_tags(&mut a, &prepare_bind_run("s", select, &[]), &["12DCZ"]).await;
    // A failed DEALLOCATE ALL (inside a failed block) keeps the client's statements.
    simple_ok(&mut a, "BEGIN").await;
    let seg = simple(&mut a, "select 1/0").await;
    assert_eq!(error_of(&seg).code(), "22012");
    let seg = simple(&mut a, "DEALLOCATE ALL").await;
    assert_eq!(error_of(&seg).code(), "25P02");
    simple_ok(&mut a, "ROLLBACK").await;
    assert_eq!(run_named(&mut a, "s").await.unwrap(), ["1"]);
}

/// A Parse pipelined right behind `DEALLOCATE ALL` survives it: the statements dropped are
/// those sent before it, not the one prepared after it in the same write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_pipelined_after_deallocate_all_survives_it() {
    let db = TestDb::new("prep_dpipe");
    let proxy = start_proxy(&proxy_config(&db, "default_pool_size = 1")).await;
    let mut a = login(&proxy, &db).await;
    expect_tags(
        &mut a,
        &cat(&[raw::parse("s1", "select 4"), raw::sync()]),
        &["1Z"],
    )
    .await;
    let bytes = cat(&[
        raw::query("DEALLOCATE ALL"),
        raw::parse("s1", "select 5"),
        raw::sync(),
    ]);
    expect_tags(&mut a, &bytes, &["CZ", "1Z"]).await;
    for _ in 0..2 {
        assert_eq!(run_named(&mut a, "s1").await.unwrap(), ["5"]);
    }
    assert_eq!(server_statements(&mut a).await.len(), 1);
}
