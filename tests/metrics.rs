//! The HTTP endpoint: `/metrics` in Prometheus text format with exact counters and
//! histograms, gauges that follow a saturated pool and pinned clients, `/healthz`, `/readyz`,
//! and `promtool check metrics` accepting the page when promtool is installed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use pgsluice::app::Proxy;
use support::{connect, start_proxy, value, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(60);

async fn proxy(db: &TestDb, extra: &str) -> Proxy {
    start_proxy(&db.config(
        &format!("metrics_listen_addr = \"127.0.0.1:0\"\n{extra}"),
        "auth = \"trust\"",
    ))
    .await
}

/// A GET over HTTP/1.1: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(LIMIT, s.read_to_string(&mut answer))
        .await
        .expect("an HTTP answer in time")
        .unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn scrape(proxy: &Proxy) -> String {
    let (status, body) = get(proxy.metrics_addr().unwrap(), "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the series `name{labels}` (labels as written on the page, in order), 0 if
/// the page has none.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn labels(db: &TestDb) -> String {
    format!(
        "database=\"{d}\",user=\"{d}\",tenant=\"{d}\",pool_mode=\"transaction\"",
        d = db.user
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_move_by_exactly_the_transactions_run() {
    let db = TestDb::new("metrics_exact");
    let proxy = proxy(&db, "default_pool_size = 2").await;
    let c = connect(&db.url(&proxy)).await;
    assert_eq!(value(&c, "select 1").await, "1");
    let l = labels(&db);
    let before = scrape(&proxy).await;
    const N: u32 = 25;
    for i in 0..N {
        assert_eq!(value(&c, &format!("select {i}")).await, i.to_string());
    }
    let after = scrape(&proxy).await;
    for series in [
        format!("pgsluice_transactions_total{{{l}}}"),
        format!("pgsluice_checkouts_total{{{l}}}"),
        format!("pgsluice_transaction_duration_seconds_count{{{l}}}"),
        format!("pgsluice_wait_seconds_count{{{l}}}"),
        format!("pgsluice_wait_seconds_bucket{{{l},le=\"+Inf\"}}"),
    ] {
        assert_eq!(
            sample(&after, &series) - sample(&before, &series),
            f64::from(N),
            "{series}\n{after}"
        );
    }
    assert!(
        sample(
            &after,
            &format!("pgsluice_transaction_duration_seconds_sum{{{l}}}")
        ) > 0.0
    );
    assert_eq!(
        sample(&after, &format!("pgsluice_login_duration_seconds_count{{{l}}}")),
        1.0
    );
    assert!(sample(&after, &format!("pgsluice_server_connect_seconds_count{{{l}}}")) >= 1.0);
    assert_eq!(
        sample(&after, &format!("pgsluice_pool_clients{{{l},state=\"idle\"}}")),
        1.0
    );
    assert_eq!(sample(&after, &format!("pgsluice_pool_size{{{l}}}")), 2.0);
    assert_eq!(sample(&after, "pgsluice_clients"), 1.0);
    assert_eq!(sample(&after, "pgsluice_state{state=\"serving\"}"), 1.0);
    assert_eq!(
        sample(
            &after,
            &format!("pgsluice_backend_state{{database=\"{}\",state=\"up\"}}", db.user)
        ),
        1.0
    );
    let version = format!("pgsluice_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&after, &version), 1.0);
    // No client address, application name or query text in any label.
    assert!(
        !after.contains("127.0.0.1") && !after.contains("select"),
        "{after}"
    );

    // Every byte the client sent: N Query messages (tag, length, text, NUL).
    let sent: usize = (0..N).map(|i| 1 + 4 + format!("select {i}").len() + 1).sum();
    let bytes = format!("pgsluice_client_bytes_total{{{l}}}");
    assert_eq!(sample(&after, &bytes) - sample(&before, &bytes), sent as f64);
    let bytes = format!("pgsluice_server_bytes_total{{{l}}}");
    assert!(sample(&after, &bytes) > sample(&before, &bytes));

    // Errors by SQLSTATE class: the backend's (22012) and pgsluice's own (26000, a Bind of a
    // statement the client never prepared); logins refused by reason.
    assert!(c.simple_query("select 1/0").await.is_err());
    let mut raw = support::raw::Raw::connect(proxy.addr()).await;
    raw.login_trust(&db.user, &db.user).await;
    let mut bind = support::raw::bind("nope");
    bind.extend(support::raw::sync());
    raw.send(&bind).await;
    raw.recv_until(b'Z').await;
    let e = tokio_postgres::connect(
        &db.url(&proxy)
            .replace(&format!("dbname={}", db.user), "dbname=nosuchdb"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("3D000"));
    let page = scrape(&proxy).await;
    assert_eq!(
        sample(&page, &format!("pgsluice_errors_total{{{l},class=\"22\"}}")),
        1.0,
        "{page}"
    );
    assert_eq!(
        sample(&page, &format!("pgsluice_errors_total{{{l},class=\"26\"}}")),
        1.0
    );
    assert_eq!(
        sample(
            &page,
            "pgsluice_login_failures_total{reason=\"unknown_database\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&page, "pgsluice_login_failures_total{reason=\"auth\"}"),
        0.0
    );

    let addr = proxy.metrics_addr().unwrap();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    assert_eq!(get(addr, "/nothing").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_shows_its_waiting_client_and_the_wait_lands_in_the_histogram() {
    let db = TestDb::new("metrics_wait");
    let proxy = proxy(&db, "default_pool_size = 1").await;
    let url = db.url(&proxy);
    let holder = connect(&url).await;
    let waiter = connect(&url).await;
    let l = labels(&db);
    holder.simple_query("BEGIN").await.unwrap();
    let before = scrape(&proxy).await;
    let queued = tokio::spawn(async move { value(&waiter, "select 'served'").await });
    let waiting = format!("pgsluice_pool_clients{{{l},state=\"waiting\"}}");
    // Scraped until the page shows the waiting client (bounded by LIMIT).
    let deadline = tokio::time::Instant::now() + LIMIT;
    let oldest = loop {
        let page = scrape(&proxy).await;
        let oldest = sample(&page, &format!("pgsluice_pool_oldest_wait_seconds{{{l}}}"));
        if sample(&page, &waiting) == 1.0 && oldest > 0.0 {
            break oldest;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no waiting client shown\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let page = scrape(&proxy).await;
    assert_eq!(
        sample(&page, &format!("pgsluice_pool_clients{{{l},state=\"active\"}}")),
        1.0
    );
    assert_eq!(
        sample(
            &page,
            &format!("pgsluice_pool_server_connections{{{l},state=\"active\"}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &page,
            &format!(
                "pgsluice_tenant_waiting_clients{{database=\"{0}\",tenant=\"{0}\"}}",
                db.user
            )
        ),
        1.0
    );
    holder.simple_query("COMMIT").await.unwrap();
    assert_eq!(queued.await.unwrap(), "served");
    let after = scrape(&proxy).await;
    assert_eq!(sample(&after, &waiting), 0.0);
    assert_eq!(sample(&after, &format!("pgsluice_queued_total{{{l}}}")), 1.0);
    // The wait the page showed is in the histogram's sum.
    let sum = format!("pgsluice_wait_seconds_sum{{{l}}}");
    assert!(
        sample(&after, &sum) - sample(&before, &sum) >= oldest,
        "{oldest}\n{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_clients_are_counted_while_pinned() {
    let db = TestDb::new("metrics_pinned");
    let proxy = proxy(&db, "default_pool_size = 2").await;
    let c = connect(&db.url(&proxy)).await;
    let l = labels(&db);
    let pinned = format!("pgsluice_pool_clients_pinned{{{l}}}");
    c.simple_query("CREATE TEMP TABLE t (x int)").await.unwrap();
    let page = scrape(&proxy).await;
    assert_eq!(sample(&page, &pinned), 1.0);
    assert_eq!(sample(&page, &format!("pgsluice_pins_total{{{l}}}")), 1.0);
    c.simple_query("DROP TABLE t").await.unwrap();
    assert_eq!(sample(&scrape(&proxy).await, &pinned), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_user_label_the_pools_of_a_tenant_are_summed() {
    let db = TestDb::new("metrics_nouser");
    let other = format!("{}_b", db.user);
    support::cluster()
        .psql(
            "postgres",
            &format!(
                "CREATE ROLE {other} LOGIN PASSWORD 'pw-b'; GRANT ALL ON DATABASE {} TO {other}",
                db.user
            ),
        )
        .unwrap();
    let config = db.config(
        "metrics_listen_addr = \"127.0.0.1:0\"\nmetrics_user_label = false\n[tenants.shared]",
        &format!(
            "auth = \"trust\"\ntenant = \"shared\"\n[users.{other}]\npassword = \"pw-b\"\nauth = \"trust\"\ntenant = \"shared\""
        ),
    );
    let proxy = start_proxy(&config).await;
    let a = connect(&db.url(&proxy)).await;
    let b_url = db
        .url(&proxy)
        .replace(&format!("user={}", db.user), &format!("user={other}"));
    let b = connect(&b_url).await;
    for i in 0..3 {
        value(&a, &format!("select {i}")).await;
        value(&b, &format!("select {i}")).await;
    }
    let page = scrape(&proxy).await;
    let l = format!(
        "database=\"{}\",tenant=\"shared\",pool_mode=\"transaction\"",
        db.user
    );
    assert_eq!(
        sample(&page, &format!("pgsluice_transactions_total{{{l}}}")),
        6.0,
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            &format!("pgsluice_transaction_duration_seconds_count{{{l}}}")
        ),
        6.0
    );
    assert!(!page.contains("user=\""), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_page() {
    let Ok(out) = std::process::Command::new("promtool").arg("--version").output() else {
        eprintln!("SKIPPED: promtool is not installed (Debian package prometheus)");
        return;
    };
    assert!(out.status.success());
    let db = TestDb::new("metrics_promtool");
    let proxy = proxy(&db, "").await;
    let c = connect(&db.url(&proxy)).await;
    value(&c, "select 1").await;
    let page = scrape(&proxy).await;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{page}"
    );
}
