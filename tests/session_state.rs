//! Session state follows the client under transaction pooling, and never leaks to another
//! client on the same server connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{connect, first_column, start_proxy, TestDb};

const LIMIT: Duration = Duration::from_secs(120);

async fn show(c: &tokio_postgres::Client, names: &[&str]) -> Vec<String> {
    let sql: Vec<String> = names.iter().map(|n| format!("show {n}")).collect();
    first_column(&c.simple_query(&sql.join(";")).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_set_never_leaks_to_others() {
    let db = TestDb::new("state_leak");
    let proxy = start_proxy(&db.config("default_pool_size = 2", "auth = \"trust\"")).await;
    let url = db.url(&proxy);
    let setter = connect(&url).await;
    setter.simple_query("create schema other").await.unwrap();
    setter
        .simple_query("SET search_path = other, public")
        .await
        .unwrap();
    setter
        .simple_query("SET statement_timeout TO '4s'")
        .await
        .unwrap();
    setter.simple_query("set work_mem = '5MB'").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = connect(&url).await;
            let mut seen = Vec::new();
            for _ in 0..5 {
                seen.push(show(&c, &["search_path", "statement_timeout", "work_mem"]).await);
            }
            seen
        }));
    }
    // The setter keeps running transactions meanwhile, on whichever connection it gets.
    for _ in 0..20 {
        assert_eq!(
            show(&setter, &["search_path", "statement_timeout", "work_mem"]).await,
            ["other, public", "4s", "5MB"]
        );
    }
    for t in tasks {
        for seen in tokio::time::timeout(LIMIT, t).await.unwrap().unwrap() {
            assert_eq!(
                seen,
                ["\"$user\", public", "0", "4MB"],
                "another client's settings leaked"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_in_a_block_takes_effect_at_commit_only() {
    let db = TestDb::new("state_block");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query("begin").await.unwrap();
    a.simple_query("set statement_timeout = 1111").await.unwrap();
    a.simple_query("rollback").await.unwrap();
    b.simple_query("select 1").await.unwrap(); // the connection serves someone else in between
    assert_eq!(show(&a, &["statement_timeout"]).await, ["0"]);
    a.simple_query("begin").await.unwrap();
    a.simple_query("set statement_timeout = 2222").await.unwrap();
    a.simple_query("commit").await.unwrap();
    assert_eq!(show(&b, &["statement_timeout"]).await, ["0"]);
    assert_eq!(show(&a, &["statement_timeout"]).await, ["2222ms"]);
    // SET LOCAL lasts only for its transaction.
    a.simple_query("begin; set local statement_timeout = 3333")
        .await
        .unwrap();
    assert_eq!(show(&a, &["statement_timeout"]).await, ["3333ms"]);
    a.simple_query("commit").await.unwrap();
    assert_eq!(show(&a, &["statement_timeout"]).await, ["2222ms"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_returns_to_the_clients_startup_values() {
    let db = TestDb::new("state_reset");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let mut cfg: tokio_postgres::Config = db.url(&proxy).parse().unwrap();
    cfg.application_name("boot-name")
        .options("-c statement_timeout=1234");
    let (a, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let b = connect(&db.url(&proxy)).await;
    a.simple_query("set statement_timeout = 5000").await.unwrap();
    a.simple_query("set application_name = 'changed'").await.unwrap();
    b.simple_query("select 1").await.unwrap();
    assert_eq!(
        show(&a, &["statement_timeout", "application_name"]).await,
        ["5s", "changed"]
    );
    a.simple_query("reset statement_timeout").await.unwrap();
    b.simple_query("select 1").await.unwrap();
    assert_eq!(
        show(&a, &["statement_timeout", "application_name"]).await,
        ["1234ms", "changed"]
    );
    a.simple_query("reset all").await.unwrap();
    b.simple_query("select 1").await.unwrap();
    assert_eq!(
        show(&a, &["statement_timeout", "application_name"]).await,
        ["1234ms", "boot-name"]
    );
    assert_eq!(
        show(&b, &["statement_timeout", "application_name"]).await,
        ["0", ""]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_through_the_extended_protocol_is_tracked() {
    let db = TestDb::new("state_ext");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    // tokio-postgres `execute` prepares a named statement, then binds and executes it.
    a.execute("SET statement_timeout = 7000", &[]).await.unwrap();
    a.execute("SET search_path TO pg_catalog", &[]).await.unwrap();
    assert_eq!(
        show(&b, &["statement_timeout", "search_path"]).await,
        ["0", "\"$user\", public"]
    );
    assert_eq!(
        show(&a, &["statement_timeout", "search_path"]).await,
        ["7s", "pg_catalog"]
    );
    // DISCARD ALL from the client resets its session (and its statements) to the startup state.
    let stmt = a.prepare("select 41 + 1").await.unwrap();
    a.simple_query("discard all").await.unwrap();
    assert_eq!(
        show(&a, &["statement_timeout", "search_path"]).await,
        ["0", "\"$user\", public"]
    );
    let err = a.query(&stmt, &[]).await.unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("26000"));
}
