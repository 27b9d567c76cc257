//! Bounded memory: the pgsluice binary's peak resident memory stays small while hundreds of
//! megabytes of rows, one very large value and a large COPY stream through it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::{cluster, connect, eventually, TestDb};

/// Kills the proxy process when the test ends, whatever happens.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_memory_does_not_grow_with_message_or_result_size() {
    let db = TestDb::new("mem");
    cluster();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("pgsluice-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("proxy.toml");
    let text = db
        .config("default_pool_size = 2", "")
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&cfg, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pgsluice"))
        .arg("--config")
        .arg(&cfg)
        .env("PGSLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc(child);
    let pid = proc.0.id();
    assert!(
        eventually(Duration::from_secs(30), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok())
        .await,
        "proxy listening"
    );
    let url = format!(
        "host=127.0.0.1 port={port} user={} password={} dbname={}",
        db.user, db.password, db.user
    );
    let c = connect(&url).await;
    c.simple_query("select 1").await.unwrap();
    let baseline = peak_rss_kib(pid);

    // ~300 MB of rows.
    let stream = c
        .query_raw(
            "select repeat('x', 3000) from generate_series(1, 100000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut n = 0;
    while let Some(r) = stream.next().await {
        r.unwrap();
        n += 1;
    }
    assert_eq!(n, 100_000);
    // One 64 MB value, each way.
    let big = c
        .query_one("select repeat('y', 64 * 1024 * 1024)", &[])
        .await
        .unwrap();
    assert_eq!(big.get::<_, &str>(0).len(), 64 * 1024 * 1024);
    let param = "z".repeat(64 * 1024 * 1024);
    let len = c.query_one("select length($1::text)", &[&param]).await.unwrap();
    assert_eq!(len.get::<_, i32>(0), 64 * 1024 * 1024);
    drop(param);
    // ~100 MB of COPY data.
    c.simple_query("create unlogged table sink (v text)")
        .await
        .unwrap();
    let sink = c.copy_in("copy sink from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let line = format!("{}\n", "c".repeat(999));
    let chunk = bytes::Bytes::from(line.repeat(1000));
    for _ in 0..100 {
        sink.send(chunk.clone()).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 100_000);

    let peak = peak_rss_kib(pid);
    let grown = peak.saturating_sub(baseline);
    eprintln!("proxy peak RSS: baseline {baseline} KiB, after {peak} KiB");
    assert!(
        grown < 32 * 1024,
        "proxy peak RSS grew by {grown} KiB (baseline {baseline} KiB, peak {peak} KiB)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
