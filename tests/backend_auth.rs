//! Server logins against backends that ask for md5 or nothing (trust), over TCP and a Unix
//! socket. Each test starts its own cluster with the authentication method it needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use pgsluice::devpg::{ClusterOptions, HostAuth, TempCluster};
use support::{raise_fd_limit, start_proxy};

fn cluster_with(auth: HostAuth) -> TempCluster {
    raise_fd_limit();
    let c = TempCluster::start(ClusterOptions {
        host_auth: auth,
        max_connections: 20,
        ..ClusterOptions::default()
    })
    .unwrap();
    c.psql(
        "postgres",
        "SET password_encryption = 'md5'; CREATE ROLE app LOGIN PASSWORD 'app-pw'",
    )
    .unwrap();
    c.psql("postgres", "CREATE DATABASE app OWNER app").unwrap();
    c
}

async fn run_query(port: u16, user: &str, password: &str) -> String {
    let url = format!("host=127.0.0.1 port={port} user={user} password={password} dbname=app");
    let c = support::connect(&url).await;
    let rows = c
        .simple_query("select current_user || '@' || current_database()")
        .await
        .unwrap();
    support::first_value(&rows).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_backend_with_a_plaintext_or_md5_hash_secret() {
    let c = cluster_with(HostAuth::Md5);
    let hash = c
        .psql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
        )
        .unwrap();
    assert!(hash.starts_with("md5"), "the backend stores an md5 hash: {hash}");
    // One user with the plaintext password, one whose only secret is the md5 hash: both answer
    // the backend's md5 challenge.
    for (secret, auth) in [("app-pw", "scram-sha-256"), (hash.as_str(), "md5")] {
        let proxy = start_proxy(&format!(
            "listen_addr = \"127.0.0.1:0\"\n[databases.app]\nhost = \"{}\"\nport = {}\n\n[users.app]\npassword = \"{secret}\"\nauth = \"{auth}\"\n",
            c.host(),
            c.port()
        ))
        .await;
        assert_eq!(run_query(proxy.addr().port(), "app", "app-pw").await, "app@app");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_backend_over_a_unix_socket() {
    let c = cluster_with(HostAuth::Trust);
    // Local (Unix socket) connections are trusted: no server password at all.
    let proxy = start_proxy(&format!(
        "listen_addr = \"127.0.0.1:0\"\n[databases.app]\nhost = \"{}\"\nport = {}\n\n[users.app]\nauth = \"trust\"\n",
        c.socket_dir().display(),
        c.port()
    ))
    .await;
    assert_eq!(run_query(proxy.addr().port(), "app", "anything").await, "app@app");
    // A wrong server password still gets the backend's own answer, as an error naming the pool.
    let proxy = start_proxy(&format!(
        "listen_addr = \"127.0.0.1:0\"\n[databases.app]\nhost = \"{}\"\nport = {}\nserver_user = \"nosuchrole\"\nserver_password = \"x\"\n\n[users.app]\nauth = \"trust\"\n",
        c.socket_dir().display(),
        c.port()
    ))
    .await;
    let url = format!("host=127.0.0.1 port={} user=app dbname=app", proxy.addr().port());
    let err = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .map(|_| ())
        .unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse, not a bare close");
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert!(
        db.message().contains("backend refused login for pool app/app"),
        "{}",
        db.message()
    );
}
