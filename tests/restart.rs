//! Backend restarts and failures: clients are held instead of failed, keep their connections,
//! and the only errors are for transactions in flight at the moment of the failure. Every test
//! restarts or kills its own PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgsluice::app::Proxy;
use pgsluice::devpg::{ClusterOptions, StopMode, TempCluster};
use pgsluice::pool::PoolStats;
use support::{eventually, raise_fd_limit, sqlstate, start_proxy};
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(120);

/// A cluster of this test's own with role/database `app` and a table `t`.
fn own_cluster() -> TempCluster {
    raise_fd_limit();
    let c = TempCluster::start(ClusterOptions {
        max_connections: 60,
        // An acknowledged commit must survive a crash: with asynchronous commit a kill -9
        // loses WAL still in shared memory, whatever the proxy does.
        extra_conf: vec![("synchronous_commit".into(), "on".into())],
        ..ClusterOptions::default()
    })
    .unwrap();
    c.psql("postgres", "CREATE ROLE app LOGIN PASSWORD 'app-pw'")
        .unwrap();
    c.psql("postgres", "CREATE DATABASE app OWNER app").unwrap();
    c.psql(
        "app",
        "CREATE TABLE t (client int, n int); ALTER TABLE t OWNER TO app",
    )
    .unwrap();
    c
}

async fn proxy_for(c: &TempCluster, extra: &str) -> Proxy {
    start_proxy(&format!(
        "listen_addr = \"127.0.0.1:0\"\ndefault_pool_size = 10\n{extra}\n\n\
         [databases.app]\nhost = \"{}\"\nport = {}\n\n[users.app]\nauth = \"trust\"\npassword = \"app-pw\"\n",
        c.host(),
        c.port()
    ))
    .await
}

fn url(p: &Proxy) -> String {
    format!(
        "host=127.0.0.1 port={} user=app dbname=app connect_timeout=30",
        p.addr().port()
    )
}

fn rows(c: &TempCluster) -> u64 {
    c.psql("app", "select count(*) from t").unwrap().parse().unwrap()
}

/// Clients looping short write transactions, each on one connection for the whole test.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<(u64, tokio_postgres::Client)>>,
    messages: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Load {
    async fn start(p: &Proxy, clients: i32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let messages = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for id in 0..clients {
            let c = support::connect(&url(p)).await;
            let (stop, acked, messages) = (stop.clone(), acked.clone(), messages.clone());
            tasks.push(tokio::spawn(async move {
                let mut errors = 0;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 100_000 {
                    n += 1;
                    match c.simple_query(&format!("insert into t values ({id}, {n})")).await {
                        Ok(_) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert!(!c.is_closed(), "client connection must survive: {e}");
                            errors += 1;
                            let text = match e.as_db_error() {
                                Some(d) => format!("client {id}: {} {}", d.code().code(), d.message()),
                                None => format!("client {id}: {e}"),
                            };
                            messages.lock().unwrap().push(text);
                        }
                    }
                }
                (errors, c)
            }));
        }
        Load {
            stop,
            acked,
            tasks,
            messages,
        }
    }

    async fn wait_for_acks(&self, more: u64) {
        let target = self.acked.load(Ordering::Relaxed) + more;
        assert!(
            eventually(LIMIT, || self.acked.load(Ordering::Relaxed) >= target).await,
            "load made progress"
        );
    }

    /// Stops the load; returns (acknowledged, errors per client), after checking that every
    /// client still works on its same connection. The errors' texts go to stderr.
    async fn finish(self) -> (u64, Vec<u64>) {
        for m in self.messages.lock().unwrap().iter() {
            eprintln!("{m}");
        }
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.tasks {
            let (e, c) = tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
            c.simple_query("select 1")
                .await
                .expect("client continues on its connection");
            errors.push(e);
        }
        (self.acked.load(Ordering::Relaxed), errors)
    }
}

/// The accounting every failure test shares: errors only for transactions in flight (at most
/// one per client), and every acknowledged commit is in the table.
fn check_accounting(c: &TempCluster, acked: u64, errors: &[u64]) {
    let in_table = rows(c);
    let total_errors: u64 = errors.iter().sum();
    assert!(
        errors.iter().all(|&e| e <= 1),
        "at most one error per client (its in-flight transaction): {errors:?}"
    );
    assert!(
        acked <= in_table,
        "acknowledged {acked} commits but only {in_table} rows"
    );
    assert!(
        in_table <= acked + total_errors,
        "{in_table} rows for {acked} acks and {total_errors} errors"
    );
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_restart_under_load() {
    let c = Arc::new(own_cluster());
    let p = proxy_for(&c, "query_wait_timeout = \"60s\"").await;
    let load = Load::start(&p, 100).await;
    load.wait_for_acks(500).await;
    let cc = c.clone();
    blocking(move || cc.restart(StopMode::Fast).unwrap()).await;
    load.wait_for_acks(1000).await;
    let (acked, errors) = load.finish().await;
    check_accounting(&c, acked, &errors);
    let stats = &p.pools().all()[0].stats;
    assert!(PoolStats::get(&stats.restarts_detected) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_killed_and_started_again() {
    let c = Arc::new(own_cluster());
    let p = proxy_for(&c, "query_wait_timeout = \"60s\"").await;
    let load = Load::start(&p, 100).await;
    load.wait_for_acks(500).await;
    let cc = c.clone();
    blocking(move || {
        cc.kill_postmaster().unwrap();
        cc.start_again().unwrap();
    })
    .await;
    load.wait_for_acks(1000).await;
    let (acked, errors) = load.finish().await;
    check_accounting(&c, acked, &errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backend_killed_means_crash_recovery() {
    let c = Arc::new(own_cluster());
    let p = proxy_for(&c, "query_wait_timeout = \"60s\"").await;
    let load = Load::start(&p, 100).await;
    load.wait_for_acks(500).await;
    let pid = c
        .psql(
            "postgres",
            "select pid from pg_stat_activity where usename = 'app' limit 1",
        )
        .unwrap();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    load.wait_for_acks(1000).await;
    let (acked, errors) = load.finish().await;
    check_accounting(&c, acked, &errors);
    assert!(PoolStats::get(&p.pools().all()[0].stats.restarts_detected) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_held_while_the_backend_is_down() {
    let c = Arc::new(own_cluster());
    let p = proxy_for(&c, "query_wait_timeout = \"30s\"").await;
    let u = url(&p);
    let clients: Vec<_> = futures_util::future::join_all((0..10).map(|_| support::connect(&u))).await;
    for cl in &clients {
        cl.simple_query("select 1").await.unwrap();
    }
    let cc = c.clone();
    blocking(move || cc.stop(StopMode::Fast).unwrap()).await;
    let pool = p.pools().all()[0].clone();
    let queries: Vec<_> = clients
        .into_iter()
        .map(|cl| {
            tokio::spawn(async move { cl.simple_query("insert into t values (0, 0)").await.map(|_| cl) })
        })
        .collect();
    // Every client is held (the backend refuses connections), none has failed yet.
    assert!(eventually(LIMIT, || PoolStats::get(&pool.stats.clients_held) >= 1).await);
    // The backend stays down for a while: part of the scenario, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        queries.iter().all(|q| !q.is_finished()),
        "nobody failed while the backend was down"
    );
    let cc = c.clone();
    blocking(move || cc.start_again().unwrap()).await;
    for q in queries {
        let cl = tokio::time::timeout(LIMIT, q)
            .await
            .unwrap()
            .unwrap()
            .expect("held client succeeds");
        cl.simple_query("select 1").await.unwrap();
    }
    assert_eq!(rows(&c), 10);
    assert!(PoolStats::get(&pool.stats.reconnect_attempts) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_outage_fails_at_the_deadline_not_before() {
    let c = Arc::new(own_cluster());
    let p = proxy_for(&c, "query_wait_timeout = \"2s\"").await;
    let cl = support::connect(&url(&p)).await;
    cl.simple_query("select 1").await.unwrap();
    let cc = c.clone();
    blocking(move || cc.stop(StopMode::Fast).unwrap()).await;
    let started = Instant::now();
    let err = tokio::time::timeout(LIMIT, cl.simple_query("select 1"))
        .await
        .unwrap()
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "failed after {waited:?}, before its deadline"
    );
    let code = sqlstate(&err).unwrap();
    assert!(code == "08006" || code == "57P03", "{code}");
    let msg = err.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("unavailable for"), "{msg}");
    // The client is still connected, and works once the backend is back.
    let cc = c.clone();
    blocking(move || cc.start_again().unwrap()).await;
    cl.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_restart_resume_shows_clients_no_error() {
    let c = Arc::new(own_cluster());
    let p = proxy_for(&c, "query_wait_timeout = \"60s\"").await;
    let load = Load::start(&p, 50).await;
    load.wait_for_acks(300).await;
    tokio::time::timeout(LIMIT, p.pause_all()).await.unwrap();
    assert_eq!(
        p.pools().all()[0].counts().idle + p.pools().all()[0].counts().active,
        0
    );
    let cc = c.clone();
    blocking(move || cc.restart(StopMode::Fast).unwrap()).await;
    p.resume_all();
    load.wait_for_acks(500).await;
    let (acked, errors) = load.finish().await;
    assert_eq!(
        errors.iter().sum::<u64>(),
        0,
        "no client saw an error: {errors:?}"
    );
    assert_eq!(rows(&c), acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_refused_with_too_many_clients_are_retried() {
    let c = Arc::new(own_cluster());
    // Every backend login as `app` now gets 53300 "too many connections for role": the
    // backend is up but full, a capacity signal, not an outage.
    c.psql("postgres", "ALTER ROLE app CONNECTION LIMIT 0").unwrap();
    let p = proxy_for(&c, "query_wait_timeout = \"60s\"").await;
    // The pool has no cached parameters yet, so this client's own login needs a server
    // connection: it is held, not refused.
    let u = url(&p);
    let login = tokio::spawn(async move { support::connect(&u).await });
    assert!(
        eventually(LIMIT, || p
            .pools()
            .all()
            .first()
            .is_some_and(|pool| PoolStats::get(&pool.db.stats.backend_full) >= 2))
        .await
    );
    assert!(
        !login.is_finished(),
        "the client is held while logins are refused"
    );
    c.psql("postgres", "ALTER ROLE app CONNECTION LIMIT -1").unwrap();
    let cl = tokio::time::timeout(LIMIT, login).await.unwrap().unwrap();
    cl.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_idle_connection_after_a_restart() {
    let c = Arc::new(own_cluster());
    let p = proxy_for(&c, "query_wait_timeout = \"60s\"").await;
    let u = url(&p);
    let clients: Vec<_> = futures_util::future::join_all((0..5).map(|_| support::connect(&u))).await;
    for cl in &clients {
        cl.simple_query("select 1").await.unwrap();
    }
    let cc = c.clone();
    blocking(move || cc.restart(StopMode::Fast).unwrap()).await;
    // Idle clients see no error on their first query after the restart.
    for cl in &clients {
        cl.simple_query("select 1")
            .await
            .expect("no stale connection handed out");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_keep_listening_across_a_restart() {
    let c = Arc::new(own_cluster());
    let p = proxy_for(&c, "").await;
    let (a, mut rx) = support::listener(&url(&p)).await;
    a.simple_query("LISTEN jobs").await.unwrap();
    let n = support::connect(&url(&p)).await;
    n.simple_query("NOTIFY jobs, 'before'").await.unwrap();
    assert_eq!(support::next_notification(&mut rx).await.1, "before");

    let cc = c.clone();
    blocking(move || cc.restart(StopMode::Fast).unwrap()).await;
    // The proxy's listener connection logs in again and LISTENs anew; the client, which
    // was idle, never noticed.
    let listening = || {
        c.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND query LIKE 'LISTEN%'",
        )
        .is_ok_and(|n| n == "1")
    };
    assert!(eventually(LIMIT, listening).await);
    n.simple_query("NOTIFY jobs, 'after'").await.unwrap();
    assert_eq!(support::next_notification(&mut rx).await.1, "after");
    assert_eq!(support::value(&a, "select 1").await, "1");
}
