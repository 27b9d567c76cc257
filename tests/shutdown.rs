//! Graceful stop (what SIGTERM runs): `/readyz` turns 503, new logins get 57P03 while cancel
//! requests still work, a transaction in flight commits and its client is told 57P01 after
//! it, idle clients are told at once, and at `shutdown_timeout` whatever still runs is told
//! 57P01 and closed, its transaction rolled back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::raw::{query, show, Raw};
use support::{cluster, connect, start_proxy, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(60);

async fn readyz(addr: std::net::SocketAddr) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut a = String::new();
    tokio::time::timeout(LIMIT, s.read_to_string(&mut a))
        .await
        .unwrap()
        .unwrap();
    a.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Reads until the connection closes: the messages before that.
async fn until_closed(raw: &mut Raw) -> String {
    let mut seen = Vec::new();
    while let Some(m) = tokio::time::timeout(LIMIT, raw.recv())
        .await
        .expect("closed in time")
    {
        seen.push(m);
    }
    show(&seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_the_transaction_in_flight_commit_then_tells_every_client() {
    let db = TestDb::new("drain");
    let proxy = Arc::new(
        start_proxy(&db.config(
            "metrics_listen_addr = \"127.0.0.1:0\"\ndefault_pool_size = 2",
            "auth = \"trust\"",
        ))
        .await,
    );
    cluster()
        .psql(
            &db.user,
            &format!("CREATE TABLE t (x int); ALTER TABLE t OWNER TO {}", db.user),
        )
        .unwrap();
    let mut busy = Raw::connect(proxy.addr()).await;
    busy.login_trust(&db.user, &db.user).await;
    let mut idle = Raw::connect(proxy.addr()).await;
    idle.login_trust(&db.user, &db.user).await;
    busy.send(&query("BEGIN")).await;
    busy.recv_until(b'Z').await;
    busy.send(&query("INSERT INTO t VALUES (1)")).await;
    busy.recv_until(b'Z').await;
    // A long query in another client, to cancel during the drain.
    let url = db.url(&proxy);
    let sleeper = connect(&url).await;
    let cancel = sleeper.cancel_token();
    let sleeping = tokio::spawn(async move { sleeper.simple_query("select pg_sleep(60)").await });
    // It runs on the backend before the drain begins (an idle client would be told at once).
    let running = || {
        cluster()
            .psql(
                "postgres",
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = '{}' AND query = 'select pg_sleep(60)' AND state = 'active'",
                    db.user
                ),
            )
            .unwrap()
            == "1"
    };
    assert!(support::eventually(LIMIT, running).await);

    let metrics = proxy.metrics_addr().unwrap();
    assert_eq!(readyz(metrics).await, 200);
    let draining = tokio::spawn({
        let proxy = proxy.clone();
        async move { proxy.drain(Some(LIMIT)).await }
    });
    // The idle client is told at once, and closed.
    assert_eq!(
        until_closed(&mut idle).await,
        "E(57P01 terminating connection due to administrator command)"
    );
    assert_eq!(readyz(metrics).await, 503);
    // New logins are refused.
    let e = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    // Cancel requests still reach the running query.
    cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = sleeping.await.unwrap().unwrap_err();
    assert_eq!(support::sqlstate(&e).as_deref(), Some("57014"), "{e}");
    // The transaction in flight commits; then its client is told.
    busy.send(&query("COMMIT")).await;
    assert_eq!(
        until_closed(&mut busy).await,
        "C Z E(57P01 terminating connection due to administrator command)"
    );
    assert!(
        tokio::time::timeout(LIMIT, draining).await.unwrap().unwrap(),
        "every client left"
    );
    assert_eq!(cluster().psql(&db.user, "SELECT count(*) FROM t").unwrap(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_timeout_what_still_runs_is_told_and_rolled_back() {
    let db = TestDb::new("drain_timeout");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    cluster()
        .psql(
            &db.user,
            &format!("CREATE TABLE t (x int); ALTER TABLE t OWNER TO {}", db.user),
        )
        .unwrap();
    let mut stuck = Raw::connect(proxy.addr()).await;
    stuck.login_trust(&db.user, &db.user).await;
    stuck.send(&query("BEGIN")).await;
    stuck.recv_until(b'Z').await;
    stuck.send(&query("INSERT INTO t VALUES (1)")).await;
    stuck.recv_until(b'Z').await;
    // The client never ends its block: the drain ends it.
    assert!(!proxy.drain(Some(Duration::from_millis(200))).await);
    assert_eq!(
        until_closed(&mut stuck).await,
        "E(57P01 terminating connection due to administrator command)"
    );
    assert_eq!(proxy.clients(), 0);
    assert_eq!(cluster().psql(&db.user, "SELECT count(*) FROM t").unwrap(), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_mode_client_is_told_between_its_transactions() {
    let db = TestDb::new("drain_session");
    let proxy = start_proxy(&db.config("pool_mode = \"session\"", "auth = \"trust\"")).await;
    let mut a = Raw::connect(proxy.addr()).await;
    a.login_trust(&db.user, &db.user).await;
    a.send(&query("BEGIN")).await;
    a.recv_until(b'Z').await;
    let draining = tokio::spawn(async move { proxy.drain(Some(LIMIT)).await });
    // Inside its block the session goes on; at the block's end it is told.
    a.send(&query("SELECT 1")).await;
    assert_eq!(show(&a.recv_until(b'Z').await), "T D C Z");
    a.send(&query("COMMIT")).await;
    assert_eq!(
        until_closed(&mut a).await,
        "C Z E(57P01 terminating connection due to administrator command)"
    );
    assert!(tokio::time::timeout(LIMIT, draining).await.unwrap().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_tells_systemd_it_is_ready_and_drains_on_sigterm() {
    let db = TestDb::new("drain_binary");
    let dir = std::env::temp_dir().join(support::unique("sd_notify"));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("notify.sock");
    let notify = tokio::net::UnixDatagram::bind(&socket).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        db.config("log_format = \"json\"", "auth = \"trust\"")
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket)
        .env("PGSLUICE_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let next = || async {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(LIMIT, notify.recv(&mut buf))
            .await
            .expect("a notification in time")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next().await;
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=serving on"),
        "{ready}"
    );
    let mut client = Raw::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    client.login_trust(&db.user, &db.user).await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopping = next().await;
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    assert_eq!(
        until_closed(&mut client).await,
        "E(57P01 terminating connection due to administrator command)"
    );
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    // log_format = "json": every line is one JSON object with a level and a message.
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.iter().any(|l| l.contains("draining")), "{log}");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v["fields"].get("message").is_some(),
            "{line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
