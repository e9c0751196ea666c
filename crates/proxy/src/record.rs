//! Recording: Prometheus metrics and the JSON access log. Request-path code only bumps
//! pre-resolved counters and hands a record to a bounded channel; serialization and I/O happen
//! on a separate task, so logging never blocks a request.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::io::Write;
use std::sync::atomic::AtomicU64;
use tokio::sync::mpsc;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<Labels, Counter>,
    pub duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub connect: Family<Labels, Histogram, fn() -> Histogram>,
    pub server_up: Family<Labels, Gauge>,
    pub server_active: Family<Labels, Gauge>,
    pub active_connections: Family<Labels, Gauge>,
    pub retries: Family<Labels, Counter>,
    pub ejections: Family<Labels, Counter>,
    pub reloads: Family<Labels, Counter>,
    pub health_checks: Family<Labels, Counter>,
    pub access_log_dropped: Counter,
    pub audit_failures: Counter,
    pub authorizer_cache: Family<Labels, Counter>,
    /// Requests refused at the edge for their form (canonicalization, method override,
    /// upgrades, header size), by listener and reason.
    pub refused: Family<Labels, Counter>,
    /// Requests refused by a limit, by route and `by` (a table name or `plan:<name>`).
    pub limit_rejections: Family<Labels, Counter>,
    /// Requests marked by a limit rule, by route and table.
    pub limit_marks: Family<Labels, Counter>,
    /// Requests checked by the limit phase, by route.
    pub limit_checks: Family<Labels, Counter>,
    /// Requests a `queue` rule held and then let through, by route and table.
    pub limit_queued: Family<Labels, Counter>,
    /// Checks the shared limit store did not answer in time, by result (`timeout`,
    /// `unavailable`, `error`) and what happened (`allow`, `deny`, `local`).
    pub limit_store_errors: Family<Labels, Counter>,
    /// Round-trip time of checks against the shared limit store.
    pub limit_store_rtt: Histogram,
    /// What happened to events at each sink of the bus, by sink and result: brought up to
    /// the bus's own counters at each scrape ([`Metrics::sync_events`]).
    pub events: Family<Labels, Counter>,
    /// Events waiting in a durable webhook's outbox, by sink (read at each scrape).
    pub events_outbox: Family<Labels, Gauge>,
    refusal_log: RefusalLog,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let latency = || Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        // `field: metric, name, help;` makes each metric and registers it under its name.
        macro_rules! metrics {
            ($($field:ident: $metric:expr, $name:literal, $help:literal;)*) => {
                Metrics {
                    $($field: {
                        let metric = $metric;
                        registry.register($name, $help, metric.clone());
                        metric
                    },)*
                    refusal_log: RefusalLog::default(),
                    registry,
                }
            };
        }
        // In the order of the scraped output.
        metrics! {
            requests: Family::default(), "requests",
                "Requests by route, backend and status class";
            duration: latency(), "request_duration_seconds",
                "Time from request to response headers, by route";
            connect: latency(), "upstream_connect_duration_seconds",
                "Time to open an upstream connection, by backend";
            server_up: Family::default(), "server_up",
                "1 when the server may take traffic (healthy, not ejected, not in maintenance)";
            server_active: Family::default(), "server_active_requests",
                "Requests in flight to a server";
            active_connections: Family::default(), "active_connections",
                "Open client connections by listener";
            retries: Family::default(), "retries",
                "Upstream retries by backend";
            ejections: Family::default(), "ejections",
                "Outlier ejections by backend";
            reloads: Family::default(), "config_reloads",
                "Config reloads by result";
            health_checks: Family::default(), "health_checks",
                "Active health checks by backend and result";
            access_log_dropped: Counter::default(), "access_log_dropped",
                "Access log lines dropped because the writer fell behind";
            audit_failures: Counter::default(), "audit_write_failures",
                "Audit records that could not be written (the request was refused)";
            authorizer_cache: Family::default(), "authorizer_cache_lookups",
                "External authorizer decision cache lookups by authorizer and result (hit or miss)";
            refused: Family::default(), "requests_refused",
                "Requests refused for their form before routing (canonical path and host, method override, upgrades, header size), by listener and reason";
            limit_rejections: Family::default(), "limit_rejections",
                "Requests refused by a limit (429 or a rule's status), by route and by (a stick table, or plan:<name>)";
            limit_marks: Family::default(), "limit_marks",
                "Requests marked for the origin by a limit rule, by route and table";
            limit_checks: Family::default(), "limit_checks",
                "Requests checked by the limit phase, by route";
            limit_queued: Family::default(), "limit_queued",
                "Requests a queue rule held and then let through, by route and table";
            limit_store_errors: Family::default(), "limit_store_errors",
                "Checks the shared limit store (Redis) did not answer, by error and by what on_store_error did";
            limit_store_rtt: Histogram::new(exponential_buckets(0.0001, 2.0, 12)), "limit_store_rtt_seconds",
                "Round-trip time of checks against the shared limit store (Redis)";
            events: Family::default(), "events",
                "Events by sink and result: published (queued for the sink), dropped (its queue was full), delivered, failed (given up on), retried (an attempt to be made again), evicted (pushed out of a full outbox)";
            events_outbox: Family::default(), "events_outbox_pending",
                "Events waiting in a durable webhook's outbox, by sink";
        }
    }
}

/// Remembers when each client was last logged for a refusal, so that a refusal, which can be
/// an attack, is logged once per client per minute and a flood of them is not. Bounded: when
/// full, it starts afresh (a client then may be logged once more within its minute).
#[derive(Default)]
struct RefusalLog {
    seen: parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, std::time::Instant>>,
}

const REFUSAL_LOG_CLIENTS: usize = 4096;

impl RefusalLog {
    fn due(&self, client: std::net::IpAddr, now: std::time::Instant) -> bool {
        let mut seen = self.seen.lock();
        match seen.get(&client) {
            Some(t) if now.duration_since(*t) < std::time::Duration::from_secs(60) => false,
            _ => {
                if seen.len() >= REFUSAL_LOG_CLIENTS {
                    seen.clear();
                }
                seen.insert(client, now);
                true
            }
        }
    }
}

impl Metrics {
    /// Counts a request refused at the edge, and logs it once per client per minute.
    pub fn refuse(&self, listener: &str, client: std::net::IpAddr, reason: &'static str) {
        self.refused
            .get_or_create(&vec![
                ("listener", listener.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
        if self.refusal_log.due(client, std::time::Instant::now()) {
            tracing::warn!(target: "portcullis::edge", %client, listener, reason, "request refused for its form (further refusals from this client are counted, not logged, for a minute)");
        }
    }

    /// Brings `portcullis_events_total` up to each sink's counters on the bus. Callers
    /// serialize calls (one scrape at a time), so two cannot add the same difference.
    pub fn sync_events(&self, sinks: &[(std::sync::Arc<str>, portcullis_events::SinkCounts)]) {
        for (sink, c) in sinks {
            for (result, total) in [
                ("published", c.published),
                ("dropped", c.dropped),
                ("delivered", c.delivered),
                ("failed", c.failed),
                ("retried", c.retried),
                ("evicted", c.evicted),
            ] {
                let counter = self
                    .events
                    .get_or_create(&vec![("sink", sink.to_string()), ("result", result.into())]);
                let cur = counter.get();
                if total > cur {
                    counter.inc_by(total - cur);
                }
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }
}

impl AccessRecord {
    /// The record of a request as it arrives: its id, listener, client, method, path as sent
    /// and protocol. Later phases fill in the rest.
    pub fn start(
        rid: &str,
        listener: &str,
        client: std::net::IpAddr,
        parts: &http::request::Parts,
    ) -> Self {
        AccessRecord {
            request_id: rid.to_string(),
            listener: listener.to_string(),
            client: client.to_string(),
            method: parts.method.as_str().to_string(),
            path: parts.uri.path().to_string(),
            protocol: match parts.version {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            ..Default::default()
        }
    }
}

/// Finishes an access record with the answer's status, bytes and error, and hands it to the
/// writer (when there is an access log).
pub fn finish(
    shared: &crate::Shared,
    mut rec: AccessRecord,
    start: std::time::Instant,
    status: u16,
    bytes_out: u64,
    error: Option<String>,
) {
    if !shared.access.enabled() {
        return;
    }
    rec.status = status;
    rec.bytes_out = bytes_out;
    rec.total_ms = start.elapsed().as_secs_f64() * 1000.0;
    rec.time = httpdate::fmt_http_date(std::time::SystemTime::now());
    rec.error = error;
    shared.access.log(rec, &shared.metrics.access_log_dropped);
}

pub fn status_class(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One access log line.
#[derive(Serialize, Default, Debug)]
pub struct AccessRecord {
    pub time: String,
    pub request_id: String,
    pub listener: String,
    pub client: String,
    pub method: String,
    pub host: String,
    pub path: String,
    pub protocol: &'static str,
    pub status: u16,
    pub route: String,
    pub backend: String,
    pub server: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub provider: String,
    /// `allow`, `deny` or `would_deny` on routes that require identity.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub decision: &'static str,
    pub attempts: u32,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub total_ms: f64,
    pub connect_ms: f64,
    pub first_byte_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What refused the request, on a limit's refusal: a stick table's name, or
    /// `plan:<name>`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub limit: String,
}

#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<AccessRecord>>,
}

pub static ACCESS_DROPPED: AtomicU64 = AtomicU64::new(0);

impl AccessLog {
    pub fn off() -> Self {
        AccessLog { tx: None }
    }

    /// Starts the writer task. `path` is `stdout`, `off` or a file path (appended to).
    pub fn start(path: &str) -> std::io::Result<Self> {
        if path == "off" {
            return Ok(Self::off());
        }
        let mut out: Box<dyn Write + Send> = if path == "stdout" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )
        };
        let (tx, mut rx) = mpsc::channel::<AccessRecord>(65_536);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Some(r) = rx.blocking_recv() {
                    let _ = serde_json::to_writer(&mut buf, &r);
                    buf.push(b'\n');
                    while let Ok(r) = rx.try_recv() {
                        let _ = serde_json::to_writer(&mut buf, &r);
                        buf.push(b'\n');
                        if buf.len() > 60 * 1024 {
                            break;
                        }
                    }
                    let _ = out.write_all(&buf);
                    let _ = out.flush();
                    buf.clear();
                }
            })?;
        Ok(AccessLog { tx: Some(tx) })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, r: AccessRecord, dropped: &Counter) {
        if let Some(tx) = &self.tx {
            if tx.try_send(r).is_err() {
                dropped.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_named_the_prometheus_way() {
        let m = Metrics::default();
        m.requests
            .get_or_create(&vec![
                ("route", "default/a".into()),
                ("backend", "default/b".into()),
                ("code", "2xx".into()),
            ])
            .inc();
        let s = m.encode();
        assert!(s.contains("portcullis_requests_total{route=\"default/a\",backend=\"default/b\",code=\"2xx\"} 1"), "{s}");
        assert!(s.contains("# TYPE portcullis_request_duration_seconds histogram"));
    }

    /// Every metric family registered before the registrations became a table, with its type
    /// and in the same order: a scrape of a fresh registry still shows each of them.
    #[test]
    fn every_metric_family_is_still_scraped() {
        const FAMILIES: [(&str, &str); 22] = [
            ("requests", "counter"),
            ("request_duration_seconds", "histogram"),
            ("upstream_connect_duration_seconds", "histogram"),
            ("server_up", "gauge"),
            ("server_active_requests", "gauge"),
            ("active_connections", "gauge"),
            ("retries", "counter"),
            ("ejections", "counter"),
            ("config_reloads", "counter"),
            ("health_checks", "counter"),
            ("access_log_dropped", "counter"),
            ("audit_write_failures", "counter"),
            ("authorizer_cache_lookups", "counter"),
            ("requests_refused", "counter"),
            ("limit_rejections", "counter"),
            ("limit_marks", "counter"),
            ("limit_checks", "counter"),
            ("limit_queued", "counter"),
            ("limit_store_errors", "counter"),
            ("limit_store_rtt_seconds", "histogram"),
            ("events", "counter"),
            ("events_outbox_pending", "gauge"),
        ];
        let s = Metrics::default().encode();
        let types: Vec<&str> = s
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE portcullis_"))
            .collect();
        let want: Vec<String> = FAMILIES.iter().map(|(n, t)| format!("{n} {t}")).collect();
        assert_eq!(types, want, "{s}");
        for (name, _) in FAMILIES {
            assert!(
                s.contains(&format!("# HELP portcullis_{name} ")),
                "{name}: {s}"
            );
        }
    }

    #[test]
    fn event_counts_follow_the_bus() {
        let m = Metrics::default();
        let mut c = portcullis_events::SinkCounts {
            published: 5,
            dropped: 2,
            ..Default::default()
        };
        let sinks = |c| vec![(std::sync::Arc::from("hooks"), c)];
        m.sync_events(&sinks(c));
        c.published = 7;
        c.delivered = 6;
        m.sync_events(&sinks(c));
        m.sync_events(&sinks(c));
        let s = m.encode();
        for line in [
            "portcullis_events_total{sink=\"hooks\",result=\"published\"} 7",
            "portcullis_events_total{sink=\"hooks\",result=\"dropped\"} 2",
            "portcullis_events_total{sink=\"hooks\",result=\"delivered\"} 6",
            "portcullis_events_total{sink=\"hooks\",result=\"failed\"} 0",
        ] {
            assert!(s.contains(line), "{line}: {s}");
        }
    }

    #[test]
    fn classes() {
        assert_eq!(CLASSES[status_class(204)], "2xx");
        assert_eq!(CLASSES[status_class(503)], "5xx");
        assert_eq!(CLASSES[status_class(99)], "1xx");
    }

    #[test]
    fn refusals_are_logged_once_per_client_per_minute() {
        let log = RefusalLog::default();
        let t0 = std::time::Instant::now();
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        assert!(log.due(a, t0));
        assert!(!log.due(a, t0 + std::time::Duration::from_secs(59)));
        assert!(log.due(b, t0));
        assert!(log.due(a, t0 + std::time::Duration::from_secs(61)));
        // Bounded: a flood of clients never grows it past its size.
        for i in 0..(REFUSAL_LOG_CLIENTS as u32 * 2) {
            log.due(std::net::IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(log.seen.lock().len() <= REFUSAL_LOG_CLIENTS);
    }

    mod access_log {
        use crate::record::AccessRecord;
        use crate::testkit::Kit;
        use http::Request;

        const CONFIG: &str = r#"
backends:
  - { name: b, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - { name: api, match: { host: example.com, path_prefix: /api/ }, backend: b, public: true }
"#;

        #[tokio::test]
        async fn a_finished_exchange_is_written_to_the_access_log() {
            let kit = Kit::new(CONFIG).await;
            let mut x = kit
                .routed(Request::get("/%61pi/items?page=2").header("host", "Example.com"))
                .await;
            x.count(204);
            x.finish(204, None);
            let log = kit.access_log(1);
            assert_eq!(log.len(), 1, "{log:?}");
            let r = &log[0];
            assert_eq!(r["request_id"], &*x.rid);
            assert_eq!(r["listener"], "web");
            assert_eq!(r["client"], "127.0.0.1");
            assert_eq!(r["method"], "GET");
            // The canonical host and path, as every phase saw them; never the query.
            assert_eq!(r["host"], "example.com");
            assert_eq!(r["path"], "/api/items");
            assert_eq!(r["protocol"], "HTTP/1.1");
            assert_eq!(r["status"], 204);
            assert_eq!(r["route"], "default/api");
            assert_eq!(r["backend"], "default/b");
            assert!(
                r["time"].as_str().is_some_and(|t| t.ends_with("GMT")),
                "{r}"
            );
            // Empty facts are left out: no identity, no decision, no error.
            for absent in ["user", "provider", "decision", "error"] {
                assert!(r.get(absent).is_none(), "{absent}: {r}");
            }
            assert_eq!(
                kit.metric("portcullis_requests_total{route=\"default/api\",backend=\"default/b\",code=\"2xx\"}"),
                1.0
            );
        }

        #[tokio::test]
        async fn a_refusal_is_written_with_its_error() {
            let kit = Kit::new(CONFIG).await;
            let mut x = kit.exchange(Request::get("/elsewhere").header("host", "example.com"));
            assert!(crate::testkit::is_next(&crate::phase::check::run(&mut x)));
            let flow = crate::phase::route::run(&mut x).await;
            let (status, msg) = crate::testkit::refusal(flow);
            // What the pipeline does with a short refusal.
            x.finish(status.as_u16(), Some(msg.trim_end().to_string()));
            let log = kit.access_log(1);
            assert_eq!(log[0]["status"], 404);
            assert_eq!(log[0]["error"], "no route");
            assert_eq!(log[0]["route"], "");
            assert_eq!(log[0]["path"], "/elsewhere");
        }

        #[tokio::test]
        async fn without_an_access_log_nothing_is_kept() {
            let kit = Kit::from_yaml(&format!(
                "listeners: [{{ name: web, bind: \"127.0.0.1:0\" }}]\naccess_log: {{ path: \"off\" }}\naudit: {{ sink: off }}\n{CONFIG}"
            ))
            .await;
            let mut x = kit
                .routed(Request::get("/api/items").header("host", "example.com"))
                .await;
            assert!(!x.log);
            // The record's strings are never filled.
            assert!(x.record.request_id.is_empty() && x.record.route.is_empty());
            x.finish(200, None);
            assert!(!kit.dir.path().join("access.log").exists());
        }

        #[test]
        fn a_record_starts_with_what_is_known_on_arrival() {
            let (parts, ()) = Request::post("/a/../b?x=1")
                .version(http::Version::HTTP_2)
                .body(())
                .unwrap()
                .into_parts();
            let r = AccessRecord::start("rid-1", "web", "192.0.2.7".parse().unwrap(), &parts);
            assert_eq!(r.request_id, "rid-1");
            assert_eq!(r.listener, "web");
            assert_eq!(r.client, "192.0.2.7");
            assert_eq!(r.method, "POST");
            // The path as sent, until check puts it into canonical form.
            assert_eq!(r.path, "/a/../b");
            assert_eq!(r.protocol, "HTTP/2");
            assert_eq!(r.status, 0);
        }
    }
}
