//! Recording: Prometheus metrics and the access log. Request-path code only bumps
//! pre-resolved counters, draws the access log's sample, and hands a record to a bounded
//! channel; formatting (JSON, CLF or HAProxy's httplog, see [`format`]) and buffered I/O
//! happen on a writer thread, so logging never blocks a request.

use portcullis_config::AccessLogFormat;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

pub mod format;

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
    /// Successful requests the access log's `sample` left out.
    pub access_log_sampled_out: Counter,
    pub audit_failures: Counter,
    /// 1 while the audit writer holds records until the disk has space again
    /// (`on_overload: wait`); set at each scrape (`sync_metrics` in the audit module).
    pub audit_waiting_for_disk: Gauge,
    /// Times the audit writer started waiting for disk space; brought up at each scrape.
    pub audit_disk_waits: Counter,
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
    /// Policy decisions on routes that require identity, by route and decision.
    pub decisions: Family<Labels, Counter>,
    /// HTTP/2 abuse at the edge, by what the proxy did: `closed` (a connection closed with
    /// `ENHANCE_YOUR_CALM`, its address flagged), `paced` (a new connection from a flagged
    /// address made to wait its turn), `refused` (one closed: too many waited).
    pub h2_abuse: Family<Labels, Counter>,
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
            access_log_sampled_out: Counter::default(), "access_log_sampled_out",
                "Successful requests not written to the access log because of access_log.sample (errors are always written)";
            audit_failures: Counter::default(), "audit_write_failures",
                "Audit records that could not be written (the request was refused)";
            audit_waiting_for_disk: Gauge::default(), "audit_waiting_for_disk",
                "1 while the audit disk is full and the writer holds records until there is space (on_overload: wait); their requests wait";
            audit_disk_waits: Counter::default(), "audit_disk_full_waits",
                "Times the audit writer started waiting for disk space (on_overload: wait)";
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
            decisions: Family::default(), "decisions",
                "Policy decisions on routes that require identity, by route and decision (allow, deny, would_deny)";
            h2_abuse: Family::default(), "h2_abuse",
                "HTTP/2 abuse at the edge, by action: closed (a connection closed with ENHANCE_YOUR_CALM and its address flagged), paced (a new connection from a flagged address made to wait), refused (closed: too many waited)";
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
        listener: &Arc<str>,
        client: SocketAddr,
        parts: &http::request::Parts,
    ) -> Self {
        AccessRecord {
            request_id: rid.to_string(),
            listener: listener.clone().into(),
            client,
            method: parts.method.clone(),
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
/// writer (when there is an access log, and the sample keeps it). Nothing is formatted
/// here: the writer thread does that.
pub fn finish(
    shared: &crate::Shared,
    mut rec: AccessRecord,
    start: std::time::Instant,
    status: u16,
    bytes_out: u64,
    error: Option<String>,
) {
    let access = &shared.access;
    if !access.enabled() {
        return;
    }
    if !access.keeps(status, error.is_some()) {
        shared.metrics.access_log_sampled_out.inc();
        return;
    }
    rec.status = status;
    rec.bytes_out = bytes_out;
    rec.total_ms = start.elapsed().as_secs_f64() * 1000.0;
    rec.time = SystemTime::now();
    rec.error = error;
    access.log(rec, &shared.metrics.access_log_dropped);
}

pub fn status_class(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A name that the snapshot or the connection already holds (a route id, a listener): the
/// record shares it instead of copying it. Empty until set, without touching any shared
/// count (a default `Arc<str>` would bump one static count from every core).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Name(Option<Arc<str>>);

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }
}

impl From<Arc<str>> for Name {
    fn from(s: Arc<str>) -> Name {
        Name(Some(s))
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name(Some(s.into()))
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        **self == *other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
}

/// One access log line. The request path only moves values in (no formatting); the writer
/// thread turns it into a line of the configured format (see [`format`]). The JSON line
/// has these fields, in this order.
#[derive(Serialize, Debug)]
pub struct AccessRecord {
    /// When the answer ended; an HTTP date in the JSON line.
    #[serde(serialize_with = "http_date")]
    pub time: SystemTime,
    pub request_id: String,
    pub listener: Name,
    /// The TCP peer; the JSON and CLF lines have its IP, the HAProxy line its port too.
    #[serde(serialize_with = "ip_only")]
    pub client: SocketAddr,
    #[serde(serialize_with = "method_name")]
    pub method: http::Method,
    pub host: String,
    pub path: String,
    pub protocol: &'static str,
    pub status: u16,
    pub route: Name,
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
    /// `Referer` and `User-Agent`, kept (as shared header bytes, not copies) for the `clf`
    /// format only; never in the JSON line.
    #[serde(skip)]
    pub referer: Option<http::HeaderValue>,
    #[serde(skip)]
    pub user_agent: Option<http::HeaderValue>,
}

impl Default for AccessRecord {
    fn default() -> Self {
        AccessRecord {
            time: SystemTime::UNIX_EPOCH,
            request_id: String::new(),
            listener: Name::default(),
            client: SocketAddr::from(([0, 0, 0, 0], 0)),
            method: http::Method::GET,
            host: String::new(),
            path: String::new(),
            protocol: "",
            status: 0,
            route: Name::default(),
            backend: String::new(),
            server: String::new(),
            user: String::new(),
            provider: String::new(),
            decision: "",
            attempts: 0,
            bytes_in: 0,
            bytes_out: 0,
            total_ms: 0.0,
            connect_ms: 0.0,
            first_byte_ms: 0.0,
            error: None,
            limit: String::new(),
            referer: None,
            user_agent: None,
        }
    }
}

fn http_date<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    // Never before 1970: the record's time is `now` or the epoch.
    s.collect_str(&httpdate::HttpDate::from((*t).max(SystemTime::UNIX_EPOCH)))
}

fn ip_only<S: serde::Serializer>(c: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&c.ip())
}

fn method_name<S: serde::Serializer>(m: &http::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

/// The most records waiting for the writer; beyond it, lines are dropped (and counted).
const QUEUE: usize = 65_536;
/// The writer's buffer: a write reaches the file when it is full, or at the latest
/// [`FLUSH_EVERY`] after the oldest line in it was written.
const BUFFER: usize = 64 * 1024;
/// How long a line may wait in the writer's buffer, so `tail -f` stays live when traffic
/// is light.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// What the writer thread is sent.
// A record travels by value: boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Line(AccessRecord),
    /// Write out everything buffered, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The access log: a bounded queue to a writer thread, the format it writes, and the
/// sample of successful requests it keeps.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<Msg>>,
    format: AccessLogFormat,
    /// Successful requests are kept when a random `u64` is below this; `None` keeps all.
    keep_below: Option<u64>,
    /// How many times the writer was woken from waiting on an empty queue (read by tests).
    #[cfg_attr(not(test), allow(dead_code))]
    wakes: Arc<std::sync::atomic::AtomicU64>,
}

impl AccessLog {
    pub fn off() -> Self {
        AccessLog {
            tx: None,
            format: AccessLogFormat::Json,
            keep_below: None,
            wakes: Default::default(),
        }
    }

    /// Starts the writer thread. `path` is `stdout`, `off` or a file path (appended to).
    pub fn start(cfg: &portcullis_config::AccessLog) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match cfg.path.as_str() {
            "off" => return Ok(Self::off()),
            "stdout" => Box::new(std::io::stdout()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        Self::to_writer(out, cfg.format, cfg.sample)
    }

    /// Starts the writer thread on `out`, writing `format` lines and keeping the fraction
    /// `sample` (0 to 1) of successful requests.
    pub fn to_writer(
        out: Box<dyn Write + Send>,
        format: AccessLogFormat,
        sample: f64,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Msg>(QUEUE);
        let wakes = Arc::<std::sync::atomic::AtomicU64>::default();
        let woken = wakes.clone();
        // The writer waits for records with a deadline (the flush), so it runs a small
        // runtime of its own, off the request path's workers.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || rt.block_on(write_lines(rx, out, format, woken)))?;
        Ok(AccessLog {
            tx: Some(tx),
            format,
            keep_below: (sample < 1.0).then(|| (sample.max(0.0) * 2f64.powi(64)) as u64),
            wakes,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// The record of a request as it arrives ([`AccessRecord::start`]), with what this
    /// log's format needs besides: `Referer` and `User-Agent` for `clf`.
    pub fn begin(
        &self,
        rid: &str,
        listener: &Arc<str>,
        client: SocketAddr,
        parts: &http::request::Parts,
    ) -> AccessRecord {
        let mut r = AccessRecord::start(rid, listener, client, parts);
        if self.format == AccessLogFormat::Clf {
            r.referer = parts.headers.get(http::header::REFERER).cloned();
            r.user_agent = parts.headers.get(http::header::USER_AGENT).cloned();
        }
        r
    }

    /// Whether an answer is logged: always on an error (status 400 or more, or an error
    /// set); a success with the probability `sample`, drawn from a per-thread generator.
    pub fn keeps(&self, status: u16, error: bool) -> bool {
        match self.keep_below {
            None => true,
            Some(_) if status >= 400 || error => true,
            Some(below) => random_u64() < below,
        }
    }

    pub fn log(&self, r: AccessRecord, dropped: &Counter) {
        if let Some(tx) = &self.tx {
            if tx.try_send(Msg::Line(r)).is_err() {
                dropped.inc();
            }
        }
    }

    /// Waits until every line handed over so far is written out (at shutdown).
    pub async fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done, flushed) = tokio::sync::oneshot::channel();
            if tx.send(Msg::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        }
    }
}

/// A xorshift64* generator per thread, seeded once from the OS: a sampling draw is a few
/// instructions, with no lock and no shared cache line.
fn random_u64() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// How long the writer rests after taking a batch before it takes the next one. Under
/// load records pile up meanwhile and are taken together; a writer waiting on the queue
/// instead would be woken (a futex call and a context switch) by every single record.
const TICK: Duration = Duration::from_millis(10);
/// How many records the writer takes from a backlog between looks at its flush deadline.
const BATCH: usize = 1024;

/// The writer thread: formats each record into a reused line buffer, writes whole lines
/// into a buffered writer, and flushes it when it fills, [`FLUSH_EVERY`] after the oldest
/// line not yet flushed, when asked, and when the log closes.
///
/// It waits on the queue only when the queue is empty after a rest of [`TICK`]; while
/// records keep coming it takes them with `try_recv`, which registers no waker, so the
/// request threads hand a record over without waking anyone.
async fn write_lines(
    mut rx: mpsc::Receiver<Msg>,
    out: Box<dyn Write + Send>,
    format: AccessLogFormat,
    wakes: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut w = LineWriter {
        out: std::io::BufWriter::with_capacity(BUFFER, out),
        lines: format::Formatter::new(format),
        line: Vec::with_capacity(1024),
        unflushed: None,
    };
    loop {
        // Idle: wait for the next message, at most until the buffered lines are due.
        let msg = match w.unflushed {
            None => rx.recv().await,
            Some(since) => match tokio::time::timeout_at(since + FLUSH_EVERY, rx.recv()).await {
                Ok(msg) => msg,
                Err(_) => {
                    w.flush();
                    continue;
                }
            },
        };
        let Some(msg) = msg else { return w.flush() };
        wakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        w.take(msg);
        // Busy: rest, then take what arrived meanwhile, until a rest brings nothing.
        loop {
            tokio::time::sleep(TICK).await;
            let mut taken = 0;
            loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        w.take(msg);
                        taken += 1;
                        // A long backlog: see to the flush deadline now and then.
                        if taken % BATCH == 0 {
                            w.flush_if_due();
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return w.flush(),
                }
            }
            w.flush_if_due();
            if taken == 0 {
                break;
            }
        }
    }
}

/// The writer thread's state: the buffered output, the formatter and its line buffer,
/// and when the oldest line not yet flushed was written.
struct LineWriter {
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    lines: format::Formatter,
    line: Vec<u8>,
    unflushed: Option<tokio::time::Instant>,
}

impl LineWriter {
    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Line(r) => {
                self.line.clear();
                self.lines.write(&r, &mut self.line);
                // A whole line at a time: what reaches the file is only ever whole lines.
                let _ = self.out.write_all(&self.line);
                if self.unflushed.is_none() {
                    self.unflushed = Some(tokio::time::Instant::now());
                }
            }
            Msg::Flush(done) => {
                self.flush();
                let _ = done.send(());
            }
        }
    }

    fn flush_if_due(&mut self) {
        if let Some(since) = self.unflushed {
            if since.elapsed() >= FLUSH_EVERY {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
        self.unflushed = None;
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
        const FAMILIES: [(&str, &str); 27] = [
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
            ("access_log_sampled_out", "counter"),
            ("audit_write_failures", "counter"),
            ("audit_waiting_for_disk", "gauge"),
            ("audit_disk_full_waits", "counter"),
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
            ("decisions", "counter"),
            ("h2_abuse", "counter"),
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
        use crate::record::{AccessLog, AccessRecord};
        use crate::testkit::Kit;
        use http::Request;
        use portcullis_config::AccessLogFormat;
        use prometheus_client::metrics::counter::Counter;
        use std::sync::Arc;
        use std::time::Duration;

        const CONFIG: &str = r#"
backends:
  - { name: b, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - { name: api, match: { host: example.com, path_prefix: /api/ }, backend: b, public: true }
"#;

        /// A request whose client went away before any answer (the exchange dropped
        /// unanswered, as when hyper drops a request's future) is in the log as 499, once.
        #[tokio::test]
        async fn an_unanswered_exchange_is_written_as_499() {
            let kit = Kit::new(CONFIG).await;
            let x = kit
                .routed(Request::get("/api/slow").header("host", "example.com"))
                .await;
            let rid = x.rid.to_string();
            drop(x);
            let log = kit.access_log(1);
            assert_eq!(log.len(), 1, "{log:?}");
            assert_eq!(log[0]["status"], 499);
            assert_eq!(log[0]["request_id"], &*rid);
            assert_eq!(log[0]["route"], "default/api");
            assert!(log[0]["error"].as_str().unwrap().contains("went away"));
        }

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
                .header("user-agent", "curl/8.5.0")
                .body(())
                .unwrap()
                .into_parts();
            let web: std::sync::Arc<str> = "web".into();
            let client = "192.0.2.7:52114".parse().unwrap();
            let r = AccessRecord::start("rid-1", &web, client, &parts);
            assert_eq!(r.request_id, "rid-1");
            assert_eq!(r.listener, "web");
            assert_eq!(r.client, client);
            assert_eq!(r.method, "POST");
            // The path as sent, until check puts it into canonical form.
            assert_eq!(r.path, "/a/../b");
            assert_eq!(r.protocol, "HTTP/2");
            assert_eq!(r.status, 0);
            // The headers only the Combined Log Format writes are kept for it alone.
            assert!(r.user_agent.is_none());
            let clf =
                AccessLog::to_writer(Box::new(std::io::sink()), AccessLogFormat::Clf, 1.0).unwrap();
            let r = clf.begin("rid-1", &web, client, &parts);
            assert_eq!(r.user_agent.unwrap(), "curl/8.5.0");
            assert!(r.referer.is_none());
        }

        /// A kit whose access log has these settings (`path` is `access.log`).
        async fn kit_with(settings: &str) -> Kit {
            Kit::from_yaml(&format!(
                "listeners: [{{ name: web, bind: \"127.0.0.1:0\" }}]\naccess_log: {{ path: access.log, {settings} }}\naudit: {{ sink: off }}\n{CONFIG}"
            ))
            .await
        }

        /// Finishes one request to `path` with `status` and `error`.
        async fn answer(kit: &Kit, path: &str, status: u16, error: Option<&str>) {
            let mut x = kit
                .routed(Request::get(path).header("host", "example.com"))
                .await;
            x.finish(status, error.map(str::to_string));
        }

        const SAMPLED_OUT: &str = "portcullis_access_log_sampled_out_total";

        #[tokio::test]
        async fn a_sample_of_zero_logs_only_errors() {
            let kit = kit_with("sample: 0").await;
            answer(&kit, "/api/ok", 200, None).await;
            answer(&kit, "/api/missing", 404, None).await;
            answer(&kit, "/api/moved", 302, None).await;
            answer(&kit, "/api/aborted", 200, Some("response aborted")).await;
            answer(&kit, "/api/empty", 204, None).await;
            answer(&kit, "/api/down", 503, None).await;
            let log = kit.access_log(3);
            let paths: Vec<&str> = log.iter().map(|r| r["path"].as_str().unwrap()).collect();
            assert_eq!(
                paths,
                ["/api/missing", "/api/aborted", "/api/down"],
                "{log:?}"
            );
            assert_eq!(log[1]["error"], "response aborted");
            assert_eq!(kit.metric(SAMPLED_OUT), 3.0);
        }

        #[tokio::test]
        async fn a_sample_of_one_logs_every_request() {
            let kit = Kit::new(CONFIG).await;
            for (i, status) in [200, 204, 302, 404, 200].into_iter().enumerate() {
                answer(&kit, &format!("/api/{i}"), status, None).await;
            }
            let log = kit.access_log(5);
            assert_eq!(log.len(), 5, "{log:?}");
            assert_eq!(kit.metric(SAMPLED_OUT), 0.0);
            assert!(kit.metrics().contains(&format!("{SAMPLED_OUT} 0")));
        }

        #[test]
        fn a_fraction_keeps_about_that_share_of_successes() {
            let log = AccessLog::to_writer(Box::new(std::io::sink()), AccessLogFormat::Json, 0.25)
                .unwrap();
            let kept = (0..100_000).filter(|_| log.keeps(200, false)).count();
            // 25,000 ± 2,000: more than ten standard deviations.
            assert!((23_000..27_000).contains(&kept), "{kept}");
            assert!((0..1000).all(|_| log.keeps(500, false) && log.keeps(200, true)));
        }

        /// A line reaches the file within the flush interval, with no traffic after it.
        #[tokio::test]
        async fn a_line_is_flushed_without_more_traffic() {
            let kit = Kit::new(CONFIG).await;
            let t = std::time::Instant::now();
            answer(&kit, "/api/only", 200, None).await;
            let path = kit.dir.path().join("access.log");
            while !std::fs::read_to_string(&path).is_ok_and(|s| s.ends_with("\n")) {
                assert!(t.elapsed() < Duration::from_secs(2), "not flushed");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(kit.access_log(1)[0]["path"], "/api/only");
        }

        /// A writer that counts the writes it is given.
        #[derive(Clone, Default)]
        struct Counted(Arc<parking_lot::Mutex<(usize, Vec<u8>)>>);

        impl std::io::Write for Counted {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let mut c = self.0.lock();
                c.0 += 1;
                c.1.extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        /// Lines are buffered: a burst becomes a few writes of whole lines, and `flush`
        /// (at shutdown) writes out what is left.
        #[tokio::test]
        async fn lines_are_buffered_and_flushed_on_request() {
            let out = Counted::default();
            let log =
                AccessLog::to_writer(Box::new(out.clone()), AccessLogFormat::Clf, 1.0).unwrap();
            let dropped = Counter::default();
            for i in 0..2000 {
                let r = AccessRecord {
                    path: format!("/burst/{i}"),
                    ..Default::default()
                };
                log.log(r, &dropped);
            }
            log.flush().await;
            let (writes, bytes) = out.0.lock().clone();
            let text = String::from_utf8(bytes).unwrap();
            assert_eq!(text.lines().count(), 2000);
            assert!(text.lines().all(|l| l.ends_with("\"-\" \"-\"")), "{text}");
            assert!(writes < 100, "{writes} writes for 2000 lines");
            assert_eq!(dropped.get(), 0);
        }

        /// Records arriving one by one, faster than the writer's rest, do not wake the
        /// writer one by one: it takes them a batch per rest, and none is lost.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_steady_stream_wakes_the_writer_once_per_batch() {
            let out = Counted::default();
            let log =
                AccessLog::to_writer(Box::new(out.clone()), AccessLogFormat::Clf, 1.0).unwrap();
            let sender = log.clone();
            tokio::task::spawn_blocking(move || {
                let dropped = Counter::default();
                for i in 0..600 {
                    let r = AccessRecord {
                        path: format!("/steady/{i}"),
                        ..Default::default()
                    };
                    sender.log(r, &dropped);
                    std::thread::sleep(Duration::from_micros(250));
                }
            })
            .await
            .unwrap();
            log.flush().await;
            let text = String::from_utf8(out.0.lock().1.clone()).unwrap();
            assert_eq!(text.lines().count(), 600);
            assert!(text.lines().nth(599).unwrap().contains("/steady/599"));
            let wakes = log.wakes.load(std::sync::atomic::Ordering::Relaxed);
            assert!(
                wakes < 60,
                "the writer was woken {wakes} times for 600 records"
            );
        }

        #[tokio::test]
        async fn the_clf_format_is_written_with_the_callers_headers() {
            let kit = kit_with("format: clf").await;
            let mut x = kit
                .routed(
                    Request::get("/api/items")
                        .header("host", "example.com")
                        .header("referer", "https://example.com/")
                        .header("user-agent", "curl/8.5.0"),
                )
                .await;
            x.finish(200, None);
            kit.shared.access.flush().await;
            let text = std::fs::read_to_string(kit.dir.path().join("access.log")).unwrap();
            let line = text.lines().next().unwrap_or_default();
            assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
            assert!(
                line.ends_with(
                    "] \"GET /api/items HTTP/1.1\" 200 - \"https://example.com/\" \"curl/8.5.0\""
                ),
                "{line}"
            );
        }
    }
}
