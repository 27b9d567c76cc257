//! Roles and replayed settings in transaction mode: `SET ROLE` and `SET SESSION AUTHORIZATION`
//! follow their client from one server connection to the next and never reach another client;
//! read-only reported parameters (`is_superuser`) are never replayed; a setting the backend
//! refuses to replay costs the client one ERROR naming it, never a loop or another client's
//! query.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::Ordering;

use pgsluice::app::Proxy;
use support::{cluster, connect, sqlstate, start_proxy, value, TestDb};

/// One server connection, so every client takes turns on it and any leftover shows.
async fn one_connection(db: &TestDb) -> Proxy {
    start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await
}

fn admin(sql: &str) {
    cluster().psql("postgres", sql).unwrap();
}

/// A NOLOGIN role granted to `db`'s user.
fn granted_role(db: &TestDb, suffix: &str) -> String {
    let role = format!("{}_{suffix}", db.user);
    admin(&format!(
        "CREATE ROLE {role} NOLOGIN; GRANT {role} TO {}",
        db.user
    ));
    role
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_role_follows_its_client_and_never_poisons_the_pool() {
    let db = TestDb::new("role_follow");
    // As a superuser (the usual pool user), SET ROLE to a plain role changes is_superuser,
    // which the backend reports.
    admin(&format!("ALTER ROLE {} SUPERUSER", db.user));
    let role = granted_role(&db, "r");
    let proxy = one_connection(&db).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query(&format!("SET ROLE {role}")).await.unwrap();
    for round in 0..5 {
        // The one server connection alternates between them: each transaction of each
        // client replays (or undoes) the role.
        assert_eq!(value(&b, "select current_user").await, db.user, "round {round}");
        assert_eq!(value(&a, "select current_user").await, role, "round {round}");
        assert_eq!(value(&b, "show is_superuser").await, "on");
        assert_eq!(value(&a, "show is_superuser").await, "off");
    }
    // The backend reported is_superuser when the role changed; replaying it would fail every
    // later client with 55P02.
    drop(a);
    for _ in 0..10 {
        assert_eq!(value(&b, "select current_user").await, db.user);
    }
    let c = connect(&url).await;
    assert_eq!(value(&c, "select current_user, session_user").await, db.user);
    let pool = proxy.pools().all()[0].clone();
    assert_eq!(pool.stats.settings_refused.load(Ordering::Relaxed), 0);
    assert_eq!(pool.stats.servers_closed.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_changes_in_blocks_and_resets() {
    let db = TestDb::new("role_blocks");
    let role = granted_role(&db, "r");
    let proxy = one_connection(&db).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    // Rolled back: never happened.
    // (Statement by statement: SET among other statements in one string pins the client.)
    a.simple_query("BEGIN").await.unwrap();
    a.simple_query(&format!("SET ROLE {role}")).await.unwrap();
    a.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(value(&b, "select 1").await, "1");
    assert_eq!(value(&a, "select current_user").await, db.user);
    // Committed: carried. SET LOCAL ROLE lasts only its transaction.
    a.simple_query("BEGIN").await.unwrap();
    a.simple_query(&format!("SET ROLE {role}")).await.unwrap();
    a.simple_query("COMMIT").await.unwrap();
    assert_eq!(value(&b, "select current_user").await, db.user);
    assert_eq!(value(&a, "select current_user").await, role);
    a.simple_query(&format!("BEGIN; SET LOCAL ROLE {}; COMMIT", db.user))
        .await
        .unwrap();
    assert_eq!(value(&b, "select 1").await, "1");
    assert_eq!(value(&a, "select current_user").await, role);
    // RESET ALL leaves the role alone, as PostgreSQL does; the settings go.
    a.simple_query("SET work_mem = '7MB'").await.unwrap();
    a.simple_query("RESET ALL").await.unwrap();
    assert_eq!(value(&b, "show work_mem").await, "4MB");
    assert_eq!(value(&a, "select current_user").await, role);
    assert_eq!(value(&a, "show work_mem").await, "4MB");
    // RESET ROLE, SET ROLE NONE and DISCARD ALL end it.
    a.simple_query("RESET ROLE").await.unwrap();
    assert_eq!(value(&b, "select 1").await, "1");
    assert_eq!(value(&a, "select current_user").await, db.user);
    a.simple_query(&format!("SET ROLE {role}")).await.unwrap();
    a.simple_query("SET ROLE NONE").await.unwrap();
    assert_eq!(value(&b, "select 1").await, "1");
    assert_eq!(value(&a, "select current_user").await, db.user);
    a.simple_query(&format!("SET ROLE {role}")).await.unwrap();
    a.simple_query("DISCARD ALL").await.unwrap();
    assert_eq!(value(&b, "select 1").await, "1");
    assert_eq!(value(&a, "select current_user").await, db.user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_authorization_and_superuser_settings_replay_in_order() {
    let db = TestDb::new("role_auth");
    admin(&format!("ALTER ROLE {} SUPERUSER", db.user));
    let plain = format!("{}_plain", db.user);
    admin(&format!("CREATE ROLE {plain} NOLOGIN"));
    let proxy = one_connection(&db).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query(&format!("SET SESSION AUTHORIZATION {plain}"))
        .await
        .unwrap();
    assert_eq!(value(&b, "select session_user").await, db.user);
    assert_eq!(
        value(&a, "select session_user || ' ' || current_user").await,
        format!("{plain} {plain}")
    );
    a.simple_query("RESET SESSION AUTHORIZATION").await.unwrap();
    assert_eq!(value(&b, "select 1").await, "1");
    assert_eq!(value(&a, "select session_user").await, db.user);
    // A superuser-only setting made before SET ROLE: replayed with the session user's rights,
    // and the role after it.
    a.simple_query("SET session_replication_role = replica")
        .await
        .unwrap();
    a.simple_query(&format!("SET ROLE {plain}")).await.unwrap();
    for _ in 0..3 {
        assert_eq!(value(&b, "show session_replication_role").await, "origin");
        assert_eq!(
            value(
                &a,
                "select current_user || ' ' || current_setting('session_replication_role')"
            )
            .await,
            format!("{plain} replica")
        );
    }
    // Leaving: the role goes first, so the superuser-only setting can be reset.
    drop(a);
    assert_eq!(value(&b, "show session_replication_role").await, "origin");
    assert_eq!(value(&b, "select current_user").await, db.user);
    let pool = proxy.pools().all()[0].clone();
    assert_eq!(pool.stats.settings_refused.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_the_backend_refuses_is_dropped_with_one_error() {
    let db = TestDb::new("role_dropped");
    let role = granted_role(&db, "gone");
    let proxy = one_connection(&db).await;
    let url = db.url(&proxy);
    let a = connect(&url).await;
    let b = connect(&url).await;
    a.simple_query(&format!("SET ROLE {role}")).await.unwrap();
    a.simple_query("SET work_mem = '6MB'").await.unwrap();
    assert_eq!(value(&a, "select current_user").await, role);
    // b takes the connection (undoing a's role), then the role disappears.
    assert_eq!(value(&b, "select current_user").await, db.user);
    admin(&format!("DROP ROLE {role}"));
    let err = a.simple_query("select current_user").await.unwrap_err();
    let msg = err.as_db_error().unwrap().message().to_string();
    assert_eq!(sqlstate(&err).as_deref(), Some("22023"), "{msg}");
    assert!(
        msg.contains("\"role\"") && msg.contains("no longer part of this session"),
        "{msg}"
    );
    // Once: the role is gone from a's session, the rest of it stays.
    assert_eq!(value(&a, "select current_user").await, db.user);
    assert_eq!(value(&a, "show work_mem").await, "6MB");
    assert_eq!(value(&b, "show work_mem").await, "4MB");
    let pool = proxy.pools().all()[0].clone();
    assert_eq!(pool.stats.settings_refused.load(Ordering::Relaxed), 2);
    assert_eq!(pool.stats.settings_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(
        pool.stats.servers_closed.load(Ordering::Relaxed),
        0,
        "the connection stays usable"
    );
}
