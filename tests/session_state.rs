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

/// `current_setting(name, true)` as the client sees it ("" for a placeholder that was reset,
/// NULL where it was never set: both mean unset).
async fn custom(c: &tokio_postgres::Client, name: &str) -> String {
    let row = c
        .query_one("select coalesce(current_setting($1, true), '')", &[&name])
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_is_carried_like_set_without_pinning() {
    use tokio_postgres::types::Type;
    let db = TestDb::new("state_set_config");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    let pinned = || {
        proxy.pools().all()[0]
            .stats
            .pinned_clients
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Literal arguments, simple query, the way row-level-security code sets its context.
    a.simple_query("SELECT set_config('app.tenant', '42', false)")
        .await
        .unwrap();
    // Parameters through a named statement (tokio-postgres prepares one) ...
    a.query(
        "select pg_catalog.set_config($1, $2, false)",
        &[&"app.user", &"alice"],
    )
    .await
    .unwrap();
    // ... and through the unnamed statement, with a binary boolean.
    a.query_typed(
        "SELECT set_config($1, $2, $3)",
        &[
            (&"app.role", Type::TEXT),
            (&"admin", Type::TEXT),
            (&false, Type::BOOL),
        ],
    )
    .await
    .unwrap();
    // Transaction-local: gone after the transaction, nothing to carry.
    a.simple_query("begin; select set_config('app.local', 'x', true); commit")
        .await
        .unwrap();
    assert_eq!(pinned(), 0, "a carried set_config must not pin");
    // b runs on the pool's one connection in between, and sees none of it.
    for name in ["app.tenant", "app.user", "app.role", "app.local"] {
        assert_eq!(custom(&b, name).await, "", "{name} leaked");
    }
    assert_eq!(custom(&a, "app.tenant").await, "42");
    assert_eq!(custom(&a, "app.user").await, "alice");
    assert_eq!(custom(&a, "app.role").await, "admin");
    assert_eq!(custom(&a, "app.local").await, "");
    // A NULL value resets; a rolled-back block undoes.
    a.query("select set_config($1, $2, false)", &[&"app.user", &None::<&str>])
        .await
        .unwrap();
    a.simple_query("begin").await.unwrap();
    a.simple_query("select set_config('app.tenant', '43', false)")
        .await
        .unwrap();
    a.simple_query("rollback").await.unwrap();
    assert_eq!(custom(&b, "app.tenant").await, "");
    assert_eq!(custom(&a, "app.user").await, "");
    assert_eq!(custom(&a, "app.tenant").await, "42");
    // A value the proxy cannot know pins the client until it leaves; then the connection is
    // reset before b gets it.
    a.simple_query("select set_config('app.who', current_user, false)")
        .await
        .unwrap();
    assert_eq!(pinned(), 1);
    let me: String = a
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(custom(&a, "app.who").await, me);
    drop(a);
    let seen = tokio::time::timeout(LIMIT, custom(&b, "app.who")).await.unwrap();
    assert_eq!(seen, "");
    assert_eq!(custom(&b, "app.tenant").await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_undo_only_what_ran_after_them() {
    let db = TestDb::new("state_savepoint");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    let names = ["statement_timeout", "work_mem", "search_path"];
    for sql in [
        "begin",
        "set statement_timeout = 1111",
        "savepoint s",
        "set work_mem = '7MB'",
        "rollback to savepoint s",
        "commit",
    ] {
        a.simple_query(sql).await.unwrap();
    }
    // The SET before the savepoint committed: a has it on every connection, b never.
    assert_eq!(show(&b, &names).await, ["0", "4MB", "\"$user\", public"]);
    assert_eq!(show(&a, &names).await, ["1111ms", "4MB", "\"$user\", public"]);
    // RELEASE keeps what ran after the savepoint; a rollback to an outer savepoint undoes an
    // inner one's commands too. Through the extended protocol this time.
    for sql in [
        "begin",
        "savepoint outer_sp",
        "set search_path = pg_catalog",
        "savepoint inner_sp",
        "set work_mem = '6MB'",
        "release savepoint inner_sp",
        "rollback to outer_sp",
        "set work_mem = '5MB'",
        "savepoint again",
        "set statement_timeout = 2222",
        "release again",
        "commit",
    ] {
        a.execute(sql, &[]).await.unwrap();
    }
    assert_eq!(show(&b, &names).await, ["0", "4MB", "\"$user\", public"]);
    assert_eq!(show(&a, &names).await, ["2222ms", "5MB", "\"$user\", public"]);
}
