//! The HTTP endpoint on `metrics_listen_addr`, served by hyper: `GET /metrics` (Prometheus
//! text format 0.0.4), `/healthz` (200 while the process runs) and `/readyz` (200 while the
//! proxy accepts clients, 503 before its client listener is up and once it is stopping).
//! None needs credentials. At most `MAX_CONNECTIONS` HTTP connections are served at once,
//! each within `CONNECTION_LIMIT`, so a scraper cannot tie up the proxy.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::ProxyState;
use crate::listener::ClientCount;
use crate::pool::Pools;

/// HTTP connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// Bound on one HTTP connection (keep-alive included).
const CONNECTION_LIMIT: Duration = Duration::from_secs(60);
/// Bound on reading a request's headers.
const HEADER_LIMIT: Duration = Duration::from_secs(10);

/// What the endpoint reports on.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The pools.
    pub pools: Arc<Pools>,
    /// The proxy's state.
    pub state: Arc<ProxyState>,
    /// Client connections open.
    pub clients: Arc<ClientCount>,
}

/// Serves HTTP on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, sources: Sources, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Duration::from_millis(5);
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        let sources = sources.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = respond(&sources, &req);
                async move { Ok::<_, Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_LIMIT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIMIT, conn).await;
            drop(permit);
        });
    }
}

fn respond(sources: &Sources, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let page = super::render(&sources.pools, &sources.state, sources.clients.get());
            let mut r = Response::new(Full::new(Bytes::from(page)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(prometheus::TEXT_FORMAT),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let state = sources.state.get();
            if sources.state.ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    match state {
                        super::State::Draining => "not ready: stopping\n",
                        _ => "not ready: starting\n",
                    },
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz and /readyz are served\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
