//! The `/metrics` page: every pool, tenant and database read at scrape time and encoded by the
//! `prometheus` crate's text encoder (format 0.0.4). Series with the same labels are summed
//! (pools of one database and tenant, when `metrics_user_label = false`).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

use super::{Histogram, ProxyState, State};
use crate::config::{Config, PoolMode};
use crate::pool::{Pool, PoolStats, Pools};

/// Label names and values of one series, in order.
type Labels = Vec<(&'static str, String)>;

/// A series' value.
enum Value {
    Number(f64),
    Histogram {
        count: u64,
        sum: f64,
        /// Cumulative counts, one per bound of `super::BUCKETS_US`.
        buckets: Vec<u64>,
    },
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    series: BTreeMap<Labels, Value>,
}

/// The page being built.
#[derive(Default)]
struct Page {
    families: Vec<Family>,
}

impl Page {
    fn family(&mut self, name: &'static str, help: &'static str, kind: MetricType) -> &mut Family {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name,
                    help,
                    kind,
                    series: BTreeMap::new(),
                });
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: &Labels, v: f64) {
        self.number(name, help, MetricType::GAUGE, labels, v);
    }

    fn counter(&mut self, name: &'static str, help: &'static str, labels: &Labels, v: u64) {
        #[allow(clippy::cast_precision_loss)]
        self.number(name, help, MetricType::COUNTER, labels, v as f64);
    }

    fn number(&mut self, name: &'static str, help: &'static str, kind: MetricType, labels: &Labels, v: f64) {
        let f = self.family(name, help, kind);
        match f.series.entry(labels.clone()).or_insert(Value::Number(0.0)) {
            Value::Number(n) => *n += v,
            Value::Histogram { .. } => {}
        }
    }

    fn histogram(&mut self, name: &'static str, help: &'static str, labels: &Labels, h: &Histogram) {
        let (cumulative, n, total) = h.snapshot();
        let f = self.family(name, help, MetricType::HISTOGRAM);
        let entry = f
            .series
            .entry(labels.clone())
            .or_insert_with(|| Value::Histogram {
                count: 0,
                sum: 0.0,
                buckets: vec![0; super::BUCKETS_US.len()],
            });
        if let Value::Histogram { count, sum, buckets } = entry {
            *count += n;
            *sum += total;
            for (acc, b) in buckets.iter_mut().zip(cumulative) {
                *acc += b;
            }
        }
    }

    fn into_families(self) -> Vec<MetricFamily> {
        self.families
            .into_iter()
            .filter(|f| !f.series.is_empty())
            .map(|f| {
                let mut mf = MetricFamily::default();
                mf.set_name(f.name.to_string());
                mf.set_help(f.help.to_string());
                mf.set_field_type(f.kind);
                let metrics = f
                    .series
                    .into_iter()
                    .map(|(labels, value)| series(f.kind, labels, value))
                    .collect();
                mf.set_metric(metrics);
                mf
            })
            .collect()
    }
}

fn series(kind: MetricType, labels: Labels, value: Value) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(
        labels
            .into_iter()
            .map(|(k, v)| {
                let mut l = proto::LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v);
                l
            })
            .collect(),
    );
    match value {
        Value::Number(n) if kind == MetricType::COUNTER => {
            let mut c = proto::Counter::default();
            c.set_value(n);
            m.set_counter(c);
        }
        Value::Number(n) => {
            let mut g = proto::Gauge::default();
            g.set_value(n);
            m.set_gauge(g);
        }
        Value::Histogram { count, sum, buckets } => {
            let mut h = proto::Histogram::default();
            h.set_sample_count(count);
            h.set_sample_sum(sum);
            h.set_bucket(
                super::BUCKETS_US
                    .iter()
                    .zip(buckets)
                    .map(|(&upper, n)| {
                        let mut b = proto::Bucket::default();
                        #[allow(clippy::cast_precision_loss)]
                        b.set_upper_bound(upper as f64 / 1e6);
                        b.set_cumulative_count(n);
                        b
                    })
                    .collect(),
            );
            m.set_histogram(h);
        }
    }
    m
}

/// The page: every metric of `pools`, the proxy's `state` and its `clients` connected now.
pub fn render(pools: &Pools, state: &ProxyState, clients: u32) -> String {
    let config = pools.config().clone();
    let mut page = Page::default();
    proxy_metrics(&mut page, &config, state, clients);
    for pool in pools.all() {
        pool_metrics(&mut page, &config, &pool);
    }
    database_metrics(&mut page, &config, pools);
    tenant_metrics(&mut page, pools);
    let mut out = Vec::new();
    // Encoding into memory fails only on invalid UTF-8, which the names here are not.
    if TextEncoder::new()
        .encode(&page.into_families(), &mut out)
        .is_err()
    {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

fn proxy_metrics(page: &mut Page, config: &Config, state: &ProxyState, clients: u32) {
    let none = Labels::new();
    page.gauge(
        "pgsluice_build_info",
        "pgsluice's version (the value is always 1)",
        &vec![("version", env!("CARGO_PKG_VERSION").to_string())],
        1.0,
    );
    let now = state.get();
    for s in State::ALL {
        page.gauge(
            "pgsluice_state",
            "What the proxy is doing: 1 for the current state (starting, serving, paused, draining)",
            &vec![("state", s.name().to_string())],
            if s == now { 1.0 } else { 0.0 },
        );
    }
    page.gauge(
        "pgsluice_clients",
        "Client connections open now",
        &none,
        f64::from(clients),
    );
    for (reason, n) in state.login_failures() {
        page.counter(
            "pgsluice_login_failures_total",
            "Logins refused, by reason: auth (wrong password or unknown user), auth_protocol, unknown_database, client_limit (a max_client_conn), timeout (client_login_timeout), protocol, server (no server connection or settings for the session), shutting_down",
            &vec![("reason", reason.to_string())],
            n,
        );
    }
    page.gauge(
        "pgsluice_max_client_conn",
        "The cap on client connections (max_client_conn)",
        &none,
        f64::from(config.max_client_conn),
    );
}

fn pool_labels(config: &Config, pool: &Pool) -> Labels {
    let mut labels = vec![("database", pool.key.database.clone())];
    if config.metrics_user_label {
        labels.push(("user", pool.key.user.clone()));
    }
    labels.push(("tenant", pool.tenant.to_string()));
    let mode = match pool.settings.pool_mode {
        PoolMode::Transaction => "transaction",
        PoolMode::Session => "session",
    };
    labels.push(("pool_mode", mode.to_string()));
    labels
}

fn with(labels: &Labels, name: &'static str, value: &str) -> Labels {
    let mut l = labels.clone();
    l.push((name, value.to_string()));
    l
}

/// Each pool counter: (metric name, help, the counter).
fn pool_counters(s: &PoolStats) -> [(&'static str, &'static str, &AtomicU64); 24] {
    [
        ("pgsluice_transactions_total", "Transactions relayed (transaction mode) or sessions (session mode)", &s.transactions),
        ("pgsluice_checkouts_total", "Server connections handed to clients", &s.checkouts),
        ("pgsluice_queued_total", "Checkouts that had to wait in the queue", &s.queued),
        ("pgsluice_wait_timeouts_total", "Waits for a server connection that ended at query_wait_timeout", &s.wait_timeouts),
        ("pgsluice_queue_rejections_total", "Clients refused at once because their tenant's queue was full (max_queue)", &s.queue_full),
        ("pgsluice_wait_cancels_total", "Queued clients that cancelled their wait", &s.wait_cancelled),
        ("pgsluice_server_connects_total", "Server logins that succeeded", &s.server_logins),
        ("pgsluice_server_connect_failures_total", "Server logins that failed", &s.server_login_failures),
        ("pgsluice_server_connections_closed_total", "Server connections closed", &s.servers_closed),
        ("pgsluice_server_connections_dead_total", "Idle server connections found dead or retired and replaced before a client saw them", &s.dead_on_checkout),
        ("pgsluice_server_connections_retired_total", "Server connections retired after server_lifetime", &s.servers_retired),
        ("pgsluice_server_connections_idle_closed_total", "Idle server connections closed after server_idle_timeout", &s.servers_idle_closed),
        ("pgsluice_backend_restarts_detected_total", "Backend failures detected (the backend went down, or was found restarted)", &s.restarts_detected),
        ("pgsluice_clients_held_total", "Checkouts held while the backend was down, instead of failing", &s.clients_held),
        ("pgsluice_transparent_retries_total", "Requests moved to another server connection because theirs died before any of their bytes were sent", &s.transparent_retries),
        ("pgsluice_settings_replay_failures_total", "Times the backend refused to bring a server connection to a client's settings", &s.settings_refused),
        ("pgsluice_settings_dropped_total", "Client settings dropped after the backend refused them twice", &s.settings_dropped),
        ("pgsluice_prepared_statement_hits_total", "Prepared statements a server connection already had", &s.prepared_hits),
        ("pgsluice_prepared_statement_misses_total", "Prepared statements prepared on a server connection (first use there)", &s.prepared_misses),
        ("pgsluice_prepared_statement_evictions_total", "Prepared statements closed on a server connection to stay within max_prepared_statements", &s.prepared_evictions),
        ("pgsluice_pins_total", "Times a transaction-mode client was pinned to its server connection", &s.pins),
        ("pgsluice_pin_refusals_total", "Statements refused because a max_pinned was reached", &s.pin_refusals),
        ("pgsluice_query_timeouts_total", "Queries cancelled by query_timeout", &s.query_timeouts),
        ("pgsluice_query_timeout_closes_total", "Server connections closed because a query did not stop after its query_timeout cancel", &s.query_timeout_closes),
    ]
}

fn pool_metrics(page: &mut Page, config: &Config, pool: &Arc<Pool>) {
    let labels = pool_labels(config, pool);
    let c = pool.counts();
    let s = &pool.stats;
    let connected = u32::try_from(PoolStats::get(&s.clients)).unwrap_or(u32::MAX);
    let idle_clients = connected.saturating_sub(c.active).saturating_sub(c.waiting);
    const CLIENTS: &str = "Client connections of the pool: active (holding a server connection), waiting (queued for one), idle (neither)";
    for (state, n) in [
        ("active", c.active.min(connected)),
        ("waiting", c.waiting),
        ("idle", idle_clients),
    ] {
        page.gauge(
            "pgsluice_pool_clients",
            CLIENTS,
            &with(&labels, "state", state),
            f64::from(n),
        );
    }
    #[allow(clippy::cast_precision_loss)]
    page.gauge(
        "pgsluice_pool_clients_pinned",
        "Clients pinned to their server connection (among the active and idle clients)",
        &labels,
        PoolStats::get(&s.pinned_clients) as f64,
    );
    const SERVERS: &str =
        "Server connections of the pool: active (serving a client), idle, login (being opened)";
    for (state, n) in [("active", c.active), ("idle", c.idle), ("login", c.connecting)] {
        page.gauge(
            "pgsluice_pool_server_connections",
            SERVERS,
            &with(&labels, "state", state),
            f64::from(n),
        );
    }
    page.gauge(
        "pgsluice_pool_size",
        "The pool's size (pool_size)",
        &labels,
        f64::from(c.max_size),
    );
    page.gauge(
        "pgsluice_pool_oldest_wait_seconds",
        "How long the longest-waiting client of the pool has waited for a server connection (0: none waits)",
        &labels,
        c.oldest_wait.map_or(0.0, |since| since.elapsed().as_secs_f64()),
    );
    for (name, help, counter) in pool_counters(s) {
        page.counter(name, help, &labels, PoolStats::get(counter));
    }
    const TIMEOUTS: &str = "Clients disconnected by a timeout: idle (client_idle_timeout), idle_transaction (idle_transaction_timeout), pinned_idle (pinned_idle_timeout)";
    for (kind, counter) in [
        ("idle", &s.client_idle_timeouts),
        ("idle_transaction", &s.idle_transaction_timeouts),
        ("pinned_idle", &s.pinned_idle_timeouts),
    ] {
        page.counter(
            "pgsluice_client_timeouts_total",
            TIMEOUTS,
            &with(&labels, "timeout", kind),
            PoolStats::get(counter),
        );
    }
    page.counter(
        "pgsluice_client_bytes_total",
        "Bytes read from the pool's clients",
        &labels,
        PoolStats::get(&s.client_bytes),
    );
    page.counter(
        "pgsluice_server_bytes_total",
        "Bytes read from the pool's server connections",
        &labels,
        PoolStats::get(&s.server_bytes),
    );
    for (class, n) in s.errors() {
        let class = std::str::from_utf8(&class)
            .ok()
            .filter(|c| c.bytes().all(|b| b.is_ascii_alphanumeric()))
            .unwrap_or("unknown");
        page.counter(
            "pgsluice_errors_total",
            "ErrorResponses sent to the pool's clients in their transactions (the backend's, forwarded, and pgsluice's own), by SQLSTATE class",
            &with(&labels, "class", class),
            n,
        );
    }
    let t = &pool.timings;
    page.histogram(
        "pgsluice_wait_seconds",
        "Time clients waited for a server connection (every checkout, served or not)",
        &labels,
        &t.wait,
    );
    page.histogram(
        "pgsluice_transaction_duration_seconds",
        "Transactions (transaction mode) or sessions (session mode), from getting the server connection to giving it back",
        &labels,
        &t.transaction,
    );
    page.histogram(
        "pgsluice_server_connect_seconds",
        "Server logins, from connect to a usable connection",
        &labels,
        &t.server_connect,
    );
    page.histogram(
        "pgsluice_login_duration_seconds",
        "Client logins, from accepting the connection to its first ReadyForQuery",
        &labels,
        &t.login,
    );
}

fn database_metrics(page: &mut Page, config: &Config, pools: &Pools) {
    let all = pools.all();
    for db in pools.databases() {
        let labels = vec![("database", db.name.clone())];
        page.gauge(
            "pgsluice_database_server_connections",
            "Server connections of the database, every pool together",
            &labels,
            f64::from(db.used()),
        );
        if let Some(max) = config.databases.get(&db.name).and_then(|d| d.max_db_connections) {
            page.gauge(
                "pgsluice_database_max_server_connections",
                "The cap on the database's server connections (max_db_connections)",
                &labels,
                f64::from(max),
            );
        }
        page.counter(
            "pgsluice_backend_full_total",
            "Server logins the backend refused with 53300 (too many clients)",
            &labels,
            PoolStats::get(&db.stats.backend_full),
        );
        let outage = all
            .iter()
            .filter(|p| p.key.database == db.name)
            .find_map(|p| p.health.outage());
        let now = match outage {
            Some(o) if o.code == crate::proto::sqlstate::CANNOT_CONNECT_NOW => "restarting",
            Some(_) => "down",
            None if db.is_full() => "refusing_connections",
            None => "up",
        };
        for state in ["up", "restarting", "refusing_connections", "down"] {
            page.gauge(
                "pgsluice_backend_state",
                "The backend as pgsluice sees it: 1 for the current state (up, restarting, refusing_connections: it said too many clients, down)",
                &with(&labels, "state", state),
                if state == now { 1.0 } else { 0.0 },
            );
        }
        for load in db.lock().tenant_shares() {
            let tl = with(&labels, "tenant", &load.name);
            page.gauge(
                "pgsluice_tenant_server_connections",
                "Server connections of the database the tenant holds",
                &tl,
                f64::from(load.held),
            );
            page.gauge(
                "pgsluice_tenant_waiting_clients",
                "The tenant's clients queued for a server connection of the database",
                &tl,
                f64::from(load.waiting),
            );
            page.gauge(
                "pgsluice_tenant_guaranteed_server_connections",
                "Server connections of the database guaranteed to the tenant while it has clients waiting (min_server_conn)",
                &tl,
                f64::from(load.min),
            );
            if let Some(max) = load.max {
                page.gauge(
                    "pgsluice_tenant_max_server_connections",
                    "The cap on the tenant's server connections of the database (max_server_conn)",
                    &tl,
                    f64::from(max),
                );
            }
        }
    }
}

fn tenant_metrics(page: &mut Page, pools: &Pools) {
    for (name, t) in pools.tenant_states() {
        let labels = vec![("tenant", name)];
        page.gauge(
            "pgsluice_tenant_clients",
            "Client connections of the tenant's users",
            &labels,
            f64::from(t.clients.get()),
        );
        page.gauge(
            "pgsluice_tenant_pinned_clients",
            "The tenant's clients pinned (or running a statement that may pin), against its max_pinned",
            &labels,
            f64::from(t.pinned.get()),
        );
    }
}
