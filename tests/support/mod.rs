//! Shared test support: one throwaway PostgreSQL per test binary, fresh roles and databases per
//! test, an in-process pgsluice on 127.0.0.1:0, and small raw-protocol helpers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod raw;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pgsluice::app::Proxy;
use pgsluice::config::Config;
use pgsluice::devpg::{ClusterOptions, TempCluster};

/// The binary's shared cluster (SCRAM over TCP, as production backends are).
pub fn cluster() -> &'static TempCluster {
    static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        raise_fd_limit();
        TempCluster::start(ClusterOptions {
            max_connections: 300,
            ..ClusterOptions::default()
        })
        .expect("start a throwaway PostgreSQL")
    })
}

/// Tests hold hundreds of sockets: lift the soft descriptor limit to the hard one.
pub fn raise_fd_limit() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
}

/// A unique lowercase name for this test's role or database.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh login role with a password (stored as SCRAM by the backend) and its own database.
pub struct TestDb {
    /// Role name (also the database name).
    pub user: String,
    /// Its password.
    pub password: String,
}

impl TestDb {
    /// Creates role + database on the shared cluster.
    pub fn new(prefix: &str) -> TestDb {
        let user = unique(prefix);
        let password = format!("pw-{user}");
        let c = cluster();
        c.psql(
            "postgres",
            &format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'"),
        )
        .unwrap();
        c.psql("postgres", &format!("CREATE DATABASE {user} OWNER {user}"))
            .unwrap();
        TestDb { user, password }
    }

    /// The role's SCRAM verifier as stored in pg_authid.
    pub fn verifier(&self) -> String {
        cluster()
            .psql(
                "postgres",
                &format!(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = '{}'",
                    self.user
                ),
            )
            .unwrap()
    }

    /// Connections the backend holds for this role right now (from pg_stat_activity).
    pub fn backend_connections(&self) -> u32 {
        cluster()
            .psql(
                "postgres",
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}'",
                    self.user
                ),
            )
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A minimal config: this database and user, plaintext password, listening on port 0.
    /// `extra_global` goes before the tables, `extra_user` into the user's table.
    pub fn config(&self, extra_global: &str, extra_user: &str) -> String {
        let c = cluster();
        format!(
            "listen_addr = \"127.0.0.1:0\"\n{extra_global}\n\n[databases.{db}]\nhost = \"{host}\"\nport = {port}\n\n[users.{user}]\npassword = \"{pw}\"\n{extra_user}\n",
            db = self.user,
            host = c.host(),
            port = c.port(),
            user = self.user,
            pw = self.password,
        )
    }

    /// A tokio-postgres connection string through `proxy`.
    pub fn url(&self, proxy: &Proxy) -> String {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname={} connect_timeout=30",
            proxy.addr().port(),
            self.user,
            self.password,
            self.user
        )
    }
}

/// A superuser connection straight to the shared cluster, for observing the backend.
pub async fn direct() -> tokio_postgres::Client {
    direct_to("postgres").await
}

/// A superuser connection straight to database `db` of the shared cluster.
pub async fn direct_to(db: &str) -> tokio_postgres::Client {
    let c = cluster();
    connect(&format!(
        "host={} port={} user={} password={} dbname={db}",
        c.host(),
        c.port(),
        c.superuser(),
        c.superuser_password()
    ))
    .await
}

/// Starts pgsluice in-process with a config text. Set `PGSLUICE_TEST_LOG=debug` to see its log.
pub async fn start_proxy(toml: &str) -> Proxy {
    if let Ok(filter) = std::env::var("PGSLUICE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let config = Config::parse(toml).unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
    Proxy::start(config).await.unwrap()
}

/// Connects tokio-postgres and drives its connection in a task.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Polls `cond` until it holds, for at most `limit` (a bounded wait for a condition, not a
/// sleep standing in for one).
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first column of every row of a simple query's answer (NULLs left out).
pub fn first_column(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}

/// The first column of the first row, if any.
pub fn first_value(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    first_column(msgs).into_iter().next()
}

/// The first value a simple query returns ("" for none); panics, naming the query, if it
/// fails or takes over a minute.
pub async fn value(c: &tokio_postgres::Client, sql: &str) -> String {
    let res = tokio::time::timeout(Duration::from_secs(60), c.simple_query(sql))
        .await
        .unwrap_or_else(|_| panic!("{sql}: no answer within 60 s"));
    first_value(&res.unwrap_or_else(|e| panic!("{sql}: {e:?}"))).unwrap_or_default()
}

/// The SQLSTATE of a tokio-postgres error, if the server (or proxy) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// Samples, until stopped, how many backend connections a role has (pg_stat_activity), to
/// check a cap held throughout a load.
pub struct BackendSampler {
    done: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(i64, u32)>,
}

impl BackendSampler {
    /// Starts sampling `role` on its own direct connection.
    pub fn start(role: &str) -> BackendSampler {
        let done = Arc::new(AtomicBool::new(false));
        let role = role.to_string();
        let stop = done.clone();
        let task = tokio::spawn(async move {
            let d = direct().await;
            let (mut max, mut samples) = (0i64, 0u32);
            // Bounded in count; paced so the sampler does not compete with the load.
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let row = d
                    .query_one(
                        "select count(*) from pg_stat_activity where usename = $1",
                        &[&role],
                    )
                    .await
                    .unwrap();
                max = max.max(row.get::<_, i64>(0));
                samples += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (max, samples)
        });
        BackendSampler { done, task }
    }

    /// Stops and returns (most connections seen, number of samples); asserts it sampled at all.
    pub async fn stop(self) -> i64 {
        self.done.store(true, Ordering::Relaxed);
        let (max, samples) = self.task.await.unwrap();
        assert!(
            samples > 3,
            "sampled the backend during the run ({samples} samples)"
        );
        max
    }
}

/// A client whose notifications (channel, payload) arrive on the receiver.
pub async fn listener(
    url: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    use futures_util::StreamExt;
    let (c, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    (c, rx)
}

/// The next notification of a `listener`, within a minute.
pub async fn next_notification(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) -> (String, String) {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("no notification in time")
        .expect("connection ended")
}
