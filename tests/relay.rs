//! Everything a session does relays correctly: simple and extended query, transactions, errors,
//! COPY both ways, notices, empty queries, FunctionCall, large results, pipelines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use support::raw::{self, Raw};
use support::{connect, sqlstate, start_proxy, TestDb};
use tokio_postgres::types::Type;
use tokio_postgres::SimpleQueryMessage;

fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<String>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries() {
    let db = TestDb::new("relay_q");
    let proxy = start_proxy(&db.config("default_pool_size = 2", "")).await;
    let c = connect(&db.url(&proxy)).await;
    let r = c
        .simple_query("select 1 as a, 'x' as b; select generate_series(1,3)")
        .await
        .unwrap();
    assert_eq!(rows(&r), vec![vec!["1", "x"], vec!["1"], vec!["2"], vec!["3"]]);
    // Unnamed extended protocol with parameters.
    let r = c
        .query_typed(
            "select $1::int4 + $2::int4",
            &[(&40i32, Type::INT4), (&2i32, Type::INT4)],
        )
        .await
        .unwrap();
    assert_eq!(r[0].get::<_, i32>(0), 42);
    // Empty query.
    let r = c.simple_query("").await.unwrap();
    assert!(rows(&r).is_empty());
    // Pipelined extended queries on one connection (tokio-postgres sends them back to back).
    let futs = (0..20i32).map(|i| {
        let c = &c;
        async move {
            c.query_typed("select $1::int4 * 2", &[(&i, Type::INT4)])
                .await
                .unwrap()[0]
                .get::<_, i32>(0)
        }
    });
    let got = futures_util::future::join_all(futs).await;
    assert_eq!(got, (0..20).map(|i| i * 2).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_and_errors_inside_them() {
    let db = TestDb::new("relay_tx");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "")).await;
    let mut c = connect(&db.url(&proxy)).await;
    c.simple_query("create table t (id int primary key)")
        .await
        .unwrap();
    let tx = c.transaction().await.unwrap();
    tx.simple_query("insert into t values (1)").await.unwrap();
    let err = tx.simple_query("insert into t values (1)").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("23505"));
    // Inside an aborted transaction every statement fails until ROLLBACK (status 'E').
    let err = tx.simple_query("select 1").await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("25P02"));
    tx.rollback().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.simple_query("insert into t values (2)").await.unwrap();
    tx.commit().await.unwrap();
    let r = c.simple_query("select id from t order by id").await.unwrap();
    assert_eq!(rows(&r), vec![vec!["2"]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_stream_large_data() {
    let db = TestDb::new("relay_copy");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "")).await;
    let c = connect(&db.url(&proxy)).await;
    c.simple_query("create table big (id int, pad text)")
        .await
        .unwrap();
    let sink = c.copy_in("copy big from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    let pad = "p".repeat(200);
    let n = 50_000;
    for chunk in 0..50 {
        let mut data = String::new();
        for i in 0..n / 50 {
            data.push_str(&format!("{}\t{pad}\n", chunk * (n / 50) + i));
        }
        sink.send(bytes::Bytes::from(data)).await.unwrap();
    }
    let written = sink.finish().await.unwrap();
    assert_eq!(written, n as u64);
    let stream = c.copy_out("copy big to stdout").await.unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let lines = chunks
        .iter()
        .map(|b| b.iter().filter(|&&x| x == b'\n').count())
        .sum::<usize>();
    assert_eq!(lines, n);
    // A failed COPY (bad data) leaves the session usable.
    let sink = c.copy_in("copy big from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    assert!(sink.finish().await.is_err());
    let r = c.simple_query("select count(*) from big").await.unwrap();
    assert_eq!(rows(&r), vec![vec![n.to_string()]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_result_set_streams_through() {
    let db = TestDb::new("relay_large");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "")).await;
    let c = connect(&db.url(&proxy)).await;
    // ~100 MB of rows, consumed as a stream, plus one 20 MB value in a single DataRow.
    let stream = c
        .query_raw(
            "select repeat('x', 1000) from generate_series(1, 100000)",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut count = 0;
    while let Some(row) = stream.next().await {
        assert_eq!(row.unwrap().get::<_, &str>(0).len(), 1000);
        count += 1;
    }
    assert_eq!(count, 100_000);
    let r = c.query_one("select repeat('y', 20000000)", &[]).await.unwrap();
    assert_eq!(r.get::<_, &str>(0).len(), 20_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_function_call_and_pipelines_with_raw_bytes() {
    let db = TestDb::new("relay_raw");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "auth = \"trust\"")).await;
    let mut r = Raw::connect(proxy.addr()).await;
    let login = r.login_trust(&db.user, &db.user).await;
    assert!(login.iter().any(|m| m.tag == b'K'), "BackendKeyData at login");

    // NoticeResponse arrives before ReadyForQuery.
    r.send(&raw::query(
        "do $$ begin raise notice 'hello from plpgsql'; end $$",
    ))
    .await;
    let msgs = r.recv_until(b'Z').await;
    let notice = msgs.iter().find(|m| m.tag == b'N').expect("notice relayed");
    assert_eq!(notice.field(b'M').as_deref(), Some("hello from plpgsql"));

    // FunctionCall (int4pl(40, 2)) with binary arguments.
    r.send(&raw::query("select 'int4pl'::regproc::oid")).await;
    let msgs = r.recv_until(b'Z').await;
    let row = msgs.iter().find(|m| m.tag == b'D').unwrap();
    let oid: u32 = String::from_utf8_lossy(&row.body[6..]).parse().unwrap();
    let mut body = oid.to_be_bytes().to_vec();
    body.extend_from_slice(&1u16.to_be_bytes()); // one format code
    body.extend_from_slice(&1u16.to_be_bytes()); // binary
    body.extend_from_slice(&2u16.to_be_bytes()); // two args
    for v in [40i32, 2] {
        body.extend_from_slice(&4i32.to_be_bytes());
        body.extend_from_slice(&v.to_be_bytes());
    }
    body.extend_from_slice(&1u16.to_be_bytes()); // binary result
    r.send(&raw::msg(b'F', &body)).await;
    let msgs = r.recv_until(b'Z').await;
    let v = msgs.iter().find(|m| m.tag == b'V').expect("FunctionCallResponse");
    assert_eq!(&v.body[4..8], &42i32.to_be_bytes());

    // Several Syncs in flight in one write: each gets its ReadyForQuery, in order, and an
    // error in the middle one skips only to its own Sync.
    let mut batch = Vec::new();
    for sql in ["select 1", "select 1/0", "select 3"] {
        batch.extend(raw::parse("", sql));
        batch.extend(raw::bind(""));
        batch.extend(raw::execute());
        batch.extend(raw::sync());
    }
    r.send(&batch).await;
    let mut tags = Vec::new();
    for _ in 0..3 {
        let msgs = r.recv_until(b'Z').await;
        tags.push(msgs.iter().map(|m| m.tag as char).collect::<String>());
    }
    // 1/0 of constants is folded while planning, so the error comes at Bind.
    assert_eq!(tags, vec!["12DCZ", "1EZ", "12DCZ"]);
    // Many Parse/Bind/Execute before one Sync.
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend(raw::parse("", &format!("select {i}")));
        batch.extend(raw::bind(""));
        batch.extend(raw::execute());
    }
    batch.extend(raw::sync());
    r.send(&batch).await;
    let msgs = r.recv_until(b'Z').await;
    assert_eq!(msgs.iter().filter(|m| m.tag == b'C').count(), 50);
    // Empty query: EmptyQueryResponse.
    r.send(&raw::query("")).await;
    let msgs = r.recv_until(b'Z').await;
    assert_eq!(msgs[0].tag, b'I');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_across_server_connections() {
    let db = TestDb::new("relay_set");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "")).await;
    let mut cfg: tokio_postgres::Config = db.url(&proxy).parse().unwrap();
    cfg.application_name("app-one")
        .options("-c statement_timeout=4321 -c search_path=public");
    let (a, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let mut cfg2: tokio_postgres::Config = db.url(&proxy).parse().unwrap();
    cfg2.application_name("app-two");
    let (b, conn) = cfg2.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // Both clients share the pool's single server connection, alternating.
    for _ in 0..3 {
        let r = a
            .simple_query("show application_name; show statement_timeout")
            .await
            .unwrap();
        assert_eq!(rows(&r), vec![vec!["app-one"], vec!["4321ms"]]);
        let r = b
            .simple_query("show application_name; show statement_timeout")
            .await
            .unwrap();
        assert_eq!(rows(&r), vec![vec!["app-two"], vec!["0"]]);
    }
    let stats = &proxy.pools().all()[0].stats;
    assert_eq!(pgsluice::pool::PoolStats::get(&stats.server_logins), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_setting_changes_stay_with_their_client() {
    let db = TestDb::new("relay_report");
    let proxy = start_proxy(&db.config("default_pool_size = 1", "")).await;
    let mut cfg: tokio_postgres::Config = db.url(&proxy).parse().unwrap();
    cfg.application_name("a");
    let (a, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let b = connect(&db.url(&proxy)).await;
    // `a` changes reported settings (ParameterStatus) on the pool's only server connection.
    // (One statement each: SET among other statements pins the client, see session_pins.)
    a.simple_query("set application_name = 'changed-by-a'")
        .await
        .unwrap();
    a.simple_query("set datestyle = 'German'").await.unwrap();
    let r = b
        .simple_query("show application_name; show datestyle")
        .await
        .unwrap();
    assert_eq!(
        rows(&r),
        vec![vec![""], vec!["ISO, MDY"]],
        "b must not see a's settings"
    );
    let r = a
        .simple_query("show application_name; show datestyle")
        .await
        .unwrap();
    assert_eq!(
        rows(&r),
        vec![vec!["changed-by-a"], vec!["German, DMY"]],
        "a keeps its own settings"
    );
    // Rolled back inside a transaction: the backend reports the old value again.
    a.simple_query("begin; set application_name = 'rolled-back'; rollback")
        .await
        .unwrap();
    let r = a.simple_query("show application_name").await.unwrap();
    assert_eq!(rows(&r), vec![vec!["changed-by-a"]]);
}
