//! Tenants against a real PostgreSQL: fair sharing of a database's slots between an API and a
//! worker fleet (the README's worked example, verbatim), the hard cap the backend sees under a
//! 1,000-client burst with paced logins, and load shedding at `max_queue`. Plus the config
//! rules for tenants (precedence, `--check`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgsluice::config::{Config, ConfigError};
use pgsluice::pool::grants::How;
use pgsluice::pool::PoolStats;
use support::{cluster, connect, eventually, sqlstate, start_proxy, BackendSampler, TestDb};

const LIMIT: Duration = Duration::from_secs(60);

/// The TOML between the README's tenants-example markers.
fn readme_example() -> String {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- tenants-example:start -->")
        .expect("README has the tenants example");
    let end = readme.find("<!-- tenants-example:end -->").unwrap();
    let block = &readme[start..end];
    let body_start = block.find("```toml\n").unwrap() + "```toml\n".len();
    let body_end = block[body_start..].find("```").unwrap() + body_start;
    block[body_start..body_end].to_string()
}

/// The README example pointed at the test cluster, listening on a free port.
fn example_for_test_cluster() -> String {
    let c = cluster();
    let text = readme_example();
    for needle in [
        "listen_addr = \"127.0.0.1:6432\"",
        "host = \"127.0.0.1\"",
        "port = 5432",
    ] {
        assert!(text.contains(needle), "README example lacks {needle:?}");
    }
    text.replace(
        "listen_addr = \"127.0.0.1:6432\"",
        "listen_addr = \"127.0.0.1:0\"",
    )
    .replace("host = \"127.0.0.1\"", &format!("host = \"{}\"", c.host()))
    .replace("port = 5432", &format!("port = {}", c.port()))
}

/// The API tenant's share of the example's 10 slots when both tenants are saturated:
/// its minimum (4) plus its weight's part (1 of 3) of the 6 slots above the minimums.
const API_SHARE: u32 = 6;
const DB_SLOTS: u32 = 10;
const WORKERS_MAX: u32 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keeps_its_share_while_300_workers_saturate_the_database() {
    let c = cluster();
    for (role, pw) in [
        ("jobs_api", "api-example-password"),
        ("jobs_worker", "worker-example-password"),
    ] {
        c.psql("postgres", &format!("CREATE ROLE {role} LOGIN PASSWORD '{pw}'"))
            .unwrap();
    }
    c.psql("postgres", "CREATE DATABASE jobs OWNER jobs_worker")
        .unwrap();
    let proxy = start_proxy(&example_for_test_cluster()).await;
    let pools = proxy.pools().clone();
    let slots = pools.database(&pools.config().databases["jobs"]);
    slots.record_grants(500_000);
    let port = proxy.addr().port();
    let url = |user: &str, pw: &str| {
        format!("host=127.0.0.1 port={port} user={user} password={pw} dbname=jobs connect_timeout=30")
    };

    // 300 workers: transactions holding a connection for 50 ms, until the API is done.
    let stop = Arc::new(AtomicBool::new(false));
    let worker_tx = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..300 {
        let u = url("jobs_worker", "worker-example-password");
        let stop = stop.clone();
        let done = worker_tx.clone();
        workers.push(tokio::spawn(async move {
            let w = connect(&u).await;
            let started = tokio::time::Instant::now();
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > LIMIT {
                    break;
                }
                w.batch_execute("BEGIN; SELECT pg_sleep(0.05); COMMIT")
                    .await
                    .unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // The workers saturate what they may hold (8 of 10 slots) and queue.
    let worker_pool = || pools.all().into_iter().find(|p| p.key.user == "jobs_worker");
    assert!(
        eventually(LIMIT, || worker_pool()
            .is_some_and(|p| p.counts().waiting > 50 && slots.used() >= WORKERS_MAX))
        .await,
        "workers did not saturate their slots"
    );

    // 20 API clients, 50 short queries each: every one must complete.
    let mut api = Vec::new();
    for _ in 0..20 {
        let u = url("jobs_api", "api-example-password");
        api.push(tokio::spawn(async move {
            let a = connect(&u).await;
            for _ in 0..50 {
                a.simple_query("SELECT 1").await.unwrap();
            }
        }));
    }
    for a in api {
        tokio::time::timeout(LIMIT, a).await.unwrap().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        tokio::time::timeout(LIMIT, w).await.unwrap().unwrap();
    }
    assert!(worker_tx.load(Ordering::Relaxed) > 0);

    // The record of grants shows the rules held, event by event.
    let records = slots.grant_records();
    assert!(records.len() < 500_000, "record overflowed");
    let mut worker_grants_while_api_waited = 0;
    for (i, r) in records.iter().enumerate() {
        let (api_used, api_waiting) = r.load_of("api");
        let (workers_used, _) = r.load_of("workers");
        assert!(
            api_used + workers_used <= DB_SLOTS,
            "event {i}: over the database's slots: {r:?}"
        );
        assert!(
            workers_used <= WORKERS_MAX,
            "event {i}: workers over max_server_conn: {r:?}"
        );
        if &*r.tenant == "workers" && r.is_grant() && api_waiting > 0 {
            worker_grants_while_api_waited += 1;
            assert!(
                api_used >= API_SHARE,
                "event {i}: a worker got a connection while an API client waited and the API held \
                 only {api_used} of its {API_SHARE} slots: {r:?}"
            );
        }
    }
    // Not vacuous: slots really moved from the workers to the API.
    let moved_to_api = records
        .iter()
        .filter(|r| &*r.tenant == "api" && r.how == How::Moved)
        .count();
    assert!(
        moved_to_api >= 1,
        "no slot moved to the API: {:?}",
        &records[..records.len().min(50)]
    );
    let api_pool = pools
        .all()
        .into_iter()
        .find(|p| p.key.user == "jobs_api")
        .unwrap();
    assert_eq!(PoolStats::get(&api_pool.stats.wait_timeouts), 0);
    eprintln!(
        "{} events, {moved_to_api} slots moved to the API, {worker_grants_while_api_waited} worker grants while the API (at its share) waited, {} worker transactions",
        records.len(),
        worker_tx.load(Ordering::Relaxed)
    );
    let backend: u32 = c
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'jobs'",
        )
        .unwrap()
        .parse()
        .unwrap();
    assert!(backend <= DB_SLOTS, "{backend}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_never_sees_more_than_max_db_connections_under_a_1000_client_burst() {
    let db = TestDb::new("burst");
    let proxy = start_proxy(&db.config(
        "max_client_conn = 2000\nmax_db_connections = 20\nserver_connect_concurrency = 2\nquery_wait_timeout = \"60s\"\nquery_wait_notify = \"off\"",
        "auth = \"trust\"\npool_size = 50",
    ))
    .await;
    let url = format!(
        "host=127.0.0.1 port={} user={} dbname={} connect_timeout=60",
        proxy.addr().port(),
        db.user,
        db.user
    );
    // Sample what the backend sees for this role while the burst runs.
    let sampler = BackendSampler::start(&db.user);
    let clients: Vec<_> = (0..1000)
        .map(|i| {
            let u = url.clone();
            tokio::spawn(async move {
                let (cl, conn) = tokio_postgres::connect(&u, tokio_postgres::NoTls)
                    .await
                    .unwrap_or_else(|e| panic!("client {i} could not log in: {e:?}"));
                tokio::spawn(conn);
                cl.simple_query("SELECT pg_sleep(0.01)")
                    .await
                    .unwrap_or_else(|e| panic!("client {i}: {e:?}"));
            })
        })
        .collect();
    for cl in clients {
        tokio::time::timeout(LIMIT, cl).await.unwrap().unwrap();
    }
    let max_seen = sampler.stop().await;
    let pool = proxy.pools().all().pop().unwrap();
    let slots = pool.db.clone();
    assert!(max_seen <= 20, "the backend saw {max_seen} connections");
    assert!(pool.counts().high_water <= 20, "{:?}", pool.counts());
    assert!(pool.counts().high_water >= 2, "{:?}", pool.counts());
    let logins_at_once = slots.stats.logins_high_water.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&logins_at_once),
        "{logins_at_once} logins at once with server_connect_concurrency = 2"
    );
    assert!(db.backend_connections() <= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_over_max_queue_is_refused_at_once_with_53300() {
    let db = TestDb::new("maxq");
    let proxy = start_proxy(&db.config(
        "query_wait_notify = \"off\"\n[tenants.batch]\nmax_queue = 2\npool_size = 1",
        "tenant = \"batch\"",
    ))
    .await;
    let url = db.url(&proxy);
    let holder = connect(&url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    let pool = proxy.pools().all().pop().unwrap();
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let u = url.clone();
            tokio::spawn(async move {
                let c = connect(&u).await;
                c.simple_query("SELECT 1").await.unwrap();
            })
        })
        .collect();
    assert!(eventually(LIMIT, || pool.counts().waiting == 2).await);
    let third = connect(&url).await;
    let err = third.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(
        msg.contains("tenant batch") && msg.contains("max_queue = 2"),
        "{msg}"
    );
    // Refused without waiting for a server: the two queued clients are still queued behind the
    // open transaction.
    assert_eq!(pool.counts().waiting, 2);
    assert_eq!(PoolStats::get(&pool.stats.queue_full), 1);
    holder.batch_execute("COMMIT").await.unwrap();
    for q in queued {
        tokio::time::timeout(LIMIT, q).await.unwrap().unwrap();
    }
    // Once the queue drained, the same client is served.
    third.simple_query("SELECT 1").await.unwrap();
}

const MINIMAL: &str = "[databases.app]\n";

#[test]
fn settings_resolve_user_over_tenant_over_database_over_global() {
    let text = format!(
        "query_timeout = \"1s\"\nidle_transaction_timeout = \"1s\"\nclient_idle_timeout = \"1s\"\nserver_lifetime = \"1s\"\n\
         {MINIMAL}query_timeout = \"2s\"\nidle_transaction_timeout = \"2s\"\nclient_idle_timeout = \"2s\"\n\
         [tenants.t]\nquery_timeout = \"3s\"\nidle_transaction_timeout = \"3s\"\npool_size = 7\n\
         [users.u]\npassword = \"pw\"\ntenant = \"t\"\nquery_timeout = \"4s\"\n\
         [users.v]\npassword = \"pw\"\n"
    );
    let cfg = Config::parse(&text).unwrap();
    let db = &cfg.databases["app"];
    let u = cfg.pool_settings(db, &cfg.users["u"]);
    assert_eq!(u.query_timeout, Some(Duration::from_secs(4)), "user wins");
    assert_eq!(
        u.idle_transaction_timeout,
        Some(Duration::from_secs(3)),
        "then tenant"
    );
    assert_eq!(
        u.client_idle_timeout,
        Some(Duration::from_secs(2)),
        "then database"
    );
    assert_eq!(u.server_lifetime, Some(Duration::from_secs(1)), "then global");
    assert_eq!(u.pool_size, 7);
    // A user without a tenant is its own tenant, with the default share.
    let v = &cfg.users["v"];
    assert_eq!(v.tenant.name, "v");
    assert!(!v.tenant.declared);
    assert_eq!(
        cfg.pool_settings(db, v).query_timeout,
        Some(Duration::from_secs(2))
    );
}

#[test]
fn check_rejects_tenant_minimums_above_the_database_slots() {
    let text = "max_db_connections = 10\n[databases.app]\n\
        [tenants.a]\nmin_server_conn = 6\n[tenants.b]\nmin_server_conn = 5\nweight = 0\n\
        [tenants.c]\nmin_server_conn = 3\nmax_server_conn = 2\n\
        [users.u]\npassword = \"pw\"\ntenant = \"a\"\n[users.w]\npassword = \"pw\"\ntenant = \"nope\"\n";
    let problems = match Config::parse(text) {
        Err(ConfigError::Invalid(p)) => p,
        other => panic!("accepted: {other:?}"),
    };
    for want in [
        "weight = 0",
        "min_server_conn = 3 is above max_server_conn = 2",
        "tenant = \"nope\"",
    ] {
        assert!(problems.iter().any(|p| p.contains(want)), "{want}: {problems:#?}");
    }
    // b and c are invalid themselves; a's 6 alone fit. With them valid, the sum is checked.
    let text = "max_db_connections = 10\n[databases.app]\n\
        [tenants.a]\nmin_server_conn = 6\n[tenants.b]\nmin_server_conn = 5\n\
        [users.u]\npassword = \"pw\"\ntenant = \"a\"\n[users.w]\npassword = \"pw\"\ntenant = \"b\"\n";
    match Config::parse(text) {
        Err(ConfigError::Invalid(p)) => {
            assert!(p.iter().any(|p| p.contains("add up to 11")), "{p:#?}")
        }
        other => panic!("accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_of_a_tenant_at_max_server_conn_share_its_one_slot() {
    let db = TestDb::new("tmax");
    let other = format!("{}_b", db.user);
    let c = cluster();
    c.psql(
        "postgres",
        &format!("CREATE ROLE {other} LOGIN PASSWORD '{}'", db.password),
    )
    .unwrap();
    let text = format!(
        "listen_addr = \"127.0.0.1:0\"\nquery_wait_timeout = \"30s\"\nquery_wait_notify = \"off\"\n\
         [databases.{d}]\nhost = \"{h}\"\nport = {p}\n\
         [tenants.batch]\nmax_server_conn = 1\n\
         [users.{d}]\npassword = \"{pw}\"\ntenant = \"batch\"\n\
         [users.{other}]\npassword = \"{pw}\"\ntenant = \"batch\"\n",
        d = db.user,
        h = c.host(),
        p = c.port(),
        pw = db.password,
    );
    let proxy = start_proxy(&text).await;
    let url_of = |user: &str| {
        format!(
            "host=127.0.0.1 port={} user={user} password={} dbname={} connect_timeout=30",
            proxy.addr().port(),
            db.password,
            db.user
        )
    };
    // The first user's pool takes the tenant's only slot; its connection then sits idle.
    let first = connect(&url_of(&db.user)).await;
    first.simple_query("SELECT 1").await.unwrap();
    // The second user's pool takes that slot over at once (the idle connection is closed).
    let second = connect(&url_of(&other)).await;
    second.simple_query("SELECT 1").await.unwrap();
    let pools = proxy.pools().all();
    let pool_of = |user: &str| pools.iter().find(|p| p.key.user == user).unwrap().clone();
    assert_eq!(
        PoolStats::get(&pool_of(&other).stats.slots_taken_over),
        1,
        "taken over at checkout, not left to wait"
    );
    // Both users alternate on the one slot; the backend never sees two of their connections.
    for _ in 0..5 {
        first.simple_query("SELECT 1").await.unwrap();
        second.simple_query("SELECT 1").await.unwrap();
    }
    for p in &pools {
        assert!(p.counts().high_water <= 1, "{:?}", p.counts());
    }
    let both: u32 = c
        .psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('{}', '{other}')",
                db.user
            ),
        )
        .unwrap()
        .parse()
        .unwrap();
    assert!(both <= 1, "{both}");
}
