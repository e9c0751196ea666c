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
    refusal_log: RefusalLog,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            connect: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            server_up: Family::default(),
            server_active: Family::default(),
            active_connections: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            reloads: Family::default(),
            health_checks: Family::default(),
            access_log_dropped: Counter::default(),
            audit_failures: Counter::default(),
            authorizer_cache: Family::default(),
            refused: Family::default(),
            refusal_log: RefusalLog::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by route, backend and status class",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers, by route",
            m.duration.clone(),
        );
        registry.register(
            "upstream_connect_duration_seconds",
            "Time to open an upstream connection, by backend",
            m.connect.clone(),
        );
        registry.register(
            "server_up",
            "1 when the server may take traffic (healthy, not ejected, not in maintenance)",
            m.server_up.clone(),
        );
        registry.register(
            "server_active_requests",
            "Requests in flight to a server",
            m.server_active.clone(),
        );
        registry.register(
            "active_connections",
            "Open client connections by listener",
            m.active_connections.clone(),
        );
        registry.register("retries", "Upstream retries by backend", m.retries.clone());
        registry.register(
            "ejections",
            "Outlier ejections by backend",
            m.ejections.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "health_checks",
            "Active health checks by backend and result",
            m.health_checks.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written (the request was refused)",
            m.audit_failures.clone(),
        );
        registry.register(
            "authorizer_cache_lookups",
            "External authorizer decision cache lookups by authorizer and result (hit or miss)",
            m.authorizer_cache.clone(),
        );
        registry.register(
            "requests_refused",
            "Requests refused for their form before routing (canonical path and host, method override, upgrades, header size), by listener and reason",
            m.refused.clone(),
        );
        Metrics { registry, ..m }
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
}
