//! The webhook sink: each event POSTed to a URL as a CloudEvent (structured or binary mode),
//! signed per Standard Webhooks, delivered at least once through an outbox.
//!
//! * **Outbox first.** A batch off the bus queue is written to the outbox (the embedded
//!   store when durable, memory otherwise) before any attempt. A delivery loop leases due
//!   rows, POSTs each, deletes it on a 2xx and reschedules it on a failure. At start, every
//!   row left from before (a crash, a restart) is due at once. The event `id` never changes,
//!   and is the `webhook-id`: the receiver's dedup key.
//! * **Headers.** `webhook-id` (the event id), `webhook-timestamp` (Unix seconds of this
//!   attempt), `webhook-signature` (`v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}`,
//!   when a secret is set).
//! * **Retries.** A 5xx, a 408, a 429, a timeout or a connection error is retried after an
//!   exponential backoff with jitter (and at least the `Retry-After` the receiver asked
//!   for), up to `max_attempts`. Another 4xx (or a 3xx: redirects are not followed) means
//!   the receiver will never take it: the event is dropped, counted as failed, and logged.
//! * **One at a time.** After a retryable failure the whole sink pauses for the backoff, so
//!   a receiver that is down gets one probe per backoff, not the whole outbox.

use super::outbox::Outbox;
use crate::bus::{BoxFuture, Sink, SinkContext, SinkStats};
use crate::config::{Backoff, WebhookCfg};
use crate::error::EventsError;
use crate::event::Event;
use crate::http::{encode, Mode};
use crate::signature::WebhookSecret;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use portcullis_store::Store;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// Rows leased per pass of the delivery loop.
const LEASE_BATCH: usize = 64;
/// How long the loop sleeps with nothing due and nothing new (new events wake it).
const IDLE: Duration = Duration::from_secs(60);

/// See the [module docs](self).
pub struct WebhookSink {
    shared: Arc<Shared>,
    outbox: Outbox,
    wake: Arc<Notify>,
}

struct Shared {
    client: reqwest::Client,
    url: reqwest::Url,
    mode: Mode,
    secret: Option<WebhookSecret>,
    timeout: Duration,
    max_attempts: u32,
    backoff: Backoff,
    outbox_max: usize,
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl WebhookSink {
    /// A webhook sink; with `store`, its outbox is durable there (rows under `name`).
    pub fn new(name: &str, cfg: &WebhookCfg, store: Option<Store>) -> Result<Self, EventsError> {
        let bad = |reason: String| EventsError::Config {
            sink: name.to_owned(),
            reason,
        };
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| {
            bad(format!(
                "webhook url `{}`: {e}",
                portcullis_config::redact_url(&cfg.url)
            ))
        })?;
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(format!("cannot build the HTTP client: {e}")))?;
        Ok(WebhookSink {
            shared: Arc::new(Shared {
                client,
                url,
                mode: cfg.mode,
                secret: cfg.secret.clone(),
                timeout: cfg.timeout,
                max_attempts: cfg.max_attempts.max(1),
                backoff: cfg.backoff,
                outbox_max: cfg.outbox_max.max(1),
            }),
            outbox: store.map_or_else(Outbox::memory, Outbox::Durable),
            wake: Arc::new(Notify::new()),
        })
    }
}

impl Sink for WebhookSink {
    fn start(&mut self, ctx: &SinkContext) {
        ctx.spawn(deliver(
            self.shared.clone(),
            self.outbox.clone(),
            self.wake.clone(),
            ctx.clone(),
        ));
    }

    fn send<'a>(
        &'a mut self,
        events: &'a [Arc<Event>],
        ctx: &'a SinkContext,
    ) -> BoxFuture<'a, Vec<usize>> {
        Box::pin(async move {
            let rows: Vec<_> = events
                .iter()
                .map(|e| (e.id.clone(), e.to_json_string()))
                .collect();
            let n = rows.len();
            match self
                .outbox
                .enqueue(&ctx.name, rows, now_ms(), self.shared.outbox_max)
                .await
            {
                Ok(put) => {
                    SinkStats::add(&ctx.stats.evicted, put.evicted as usize);
                    if put.evicted > 0 {
                        tracing::warn!(sink = %ctx.name, evicted = put.evicted,
                            "events outbox full: the oldest events were dropped");
                    }
                    self.wake.notify_one();
                    Vec::new()
                }
                Err(e) => {
                    SinkStats::add(&ctx.stats.failed, n);
                    tracing::error!(sink = %ctx.name, error = %e, events = n,
                        "cannot write events to the outbox: they are lost");
                    (0..n).collect()
                }
            }
        })
    }
}

/// How one attempt went.
enum Attempt {
    Delivered,
    /// Worth another try, not before `after` if the receiver said so.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The receiver will not take it.
    Reject(String),
}

impl Shared {
    /// The wait before the attempt after `attempts` failed ones: exponential, capped, and
    /// jittered over its upper half.
    fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let full = self
            .backoff
            .min
            .saturating_mul(1 << exp)
            .min(self.backoff.max);
        let half = full / 2;
        half + rand::rng().random_range(Duration::ZERO..=full - half)
    }

    async fn attempt(&self, event: &Event) -> Attempt {
        let (mut headers, body) = encode(event, self.mode);
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), v);
            }
        };
        put("webhook-id", event.id.clone());
        put("webhook-timestamp", timestamp.to_string());
        if let Some(secret) = &self.secret {
            put(
                "webhook-signature",
                secret.sign(&event.id, timestamp, &body),
            );
        }
        let sent = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            // Without the URL, which may carry a secret (its path, or a password): the
            // reason is logged and kept with the event.
            Err(e) if e.is_builder() => return Attempt::Reject(e.without_url().to_string()),
            Err(e) => {
                let reason = if e.is_timeout() {
                    format!("no answer within {:?}", self.timeout)
                } else {
                    error_chain(&e.without_url())
                };
                return Attempt::Retry {
                    reason,
                    after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Delivered;
        }
        let code = status.as_u16();
        if status.is_server_error() || code == 429 || code == 408 {
            let after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Attempt::Retry {
                reason: format!("the receiver answered {status}"),
                after,
            };
        }
        Attempt::Reject(format!("the receiver answered {status}"))
    }
}

/// An error with its causes, so "connection refused" shows.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The delivery loop; see the [module docs](self).
async fn deliver(shared: Arc<Shared>, outbox: Outbox, wake: Arc<Notify>, ctx: SinkContext) {
    let name = ctx.name.clone();
    let stats = ctx.stats.clone();
    let mut shutdown = ctx.shutdown_signal();
    match outbox.release(&name, now_ms()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(sink = %name, pending = n, "delivering events left in the outbox"),
        Err(e) => tracing::error!(sink = %name, error = %e, "cannot read the events outbox"),
    }
    // Failed attempts in a row, across events: the sink's own backoff.
    let mut failures = 0u32;
    while !ctx.is_shutting_down() {
        let now = now_ms();
        // A lease long enough for every attempt of the batch to time out.
        let lease = ms(shared.timeout) * LEASE_BATCH as i64 + 30_000;
        let rows = match outbox.lease(&name, now, now + lease, LEASE_BATCH).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(sink = %name, error = %e, "cannot read the events outbox");
                vec![]
            }
        };
        if rows.is_empty() {
            let wait = match outbox.next_due(&name).await {
                Ok(Some(at)) => Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)),
                Ok(None) => IDLE,
                Err(_) => Duration::from_secs(1),
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait.min(IDLE)) => {}
                _ = crate::bus::stopped(&mut shutdown) => break,
            }
            continue;
        }
        let mut acks = Vec::new();
        let mut later = Vec::new();
        let mut pause: Option<Duration> = None;
        for row in rows {
            if let Some(p) = pause {
                later.push((row.seq, row.attempts, now_ms() + ms(p)));
                continue;
            }
            if ctx.is_shutting_down() {
                later.push((row.seq, row.attempts, now_ms()));
                continue;
            }
            let event = match Event::from_json(row.payload.as_bytes(), usize::MAX) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(sink = %name, id = %row.event_id, error = %e,
                        "an outbox row is not an event; dropped");
                    SinkStats::add(&stats.failed, 1);
                    acks.push(row.seq);
                    continue;
                }
            };
            match shared.attempt(&event).await {
                Attempt::Delivered => {
                    failures = 0;
                    SinkStats::add(&stats.delivered, 1);
                    acks.push(row.seq);
                }
                Attempt::Reject(reason) => {
                    failures = 0;
                    tracing::warn!(sink = %name, id = %event.id, type_ = %event.type_, %reason,
                        "webhook refused the event; dropped, not retried");
                    SinkStats::add(&stats.failed, 1);
                    acks.push(row.seq);
                }
                Attempt::Retry { reason, after } => {
                    let attempts = row.attempts.saturating_add(1);
                    failures = failures.saturating_add(1);
                    let floor = after.unwrap_or_default().min(shared.backoff.max);
                    if attempts >= shared.max_attempts {
                        tracing::warn!(sink = %name, id = %event.id, attempts, %reason,
                            "webhook delivery failed; out of attempts, event dropped");
                        SinkStats::add(&stats.failed, 1);
                        acks.push(row.seq);
                    } else {
                        let wait = shared.backoff(attempts).max(floor);
                        tracing::debug!(sink = %name, id = %event.id, attempts, %reason,
                            retry_in = ?wait, "webhook delivery failed; will retry");
                        SinkStats::add(&stats.retried, 1);
                        later.push((row.seq, attempts, now_ms() + ms(wait)));
                    }
                    pause = Some(shared.backoff(failures).max(floor));
                }
            }
        }
        if let Err(e) = outbox.settle(&name, acks, later).await {
            tracing::error!(sink = %name, error = %e, "cannot update the events outbox");
        }
        if let Some(p) = pause {
            tokio::select! {
                _ = tokio::time::sleep(p) => {}
                _ = crate::bus::stopped(&mut shutdown) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_stops_at_max() {
        let mut cfg = WebhookCfg::new("http://127.0.0.1:1/");
        cfg.backoff = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let sink = WebhookSink::new("t", &cfg, None).unwrap();
        let s = &sink.shared;
        for _ in 0..50 {
            let b1 = s.backoff(1);
            assert!(
                b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100),
                "{b1:?}"
            );
            let b3 = s.backoff(3);
            assert!(
                b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400),
                "{b3:?}"
            );
            let b9 = s.backoff(40);
            assert!(
                b9 >= Duration::from_millis(500) && b9 <= Duration::from_secs(1),
                "{b9:?}"
            );
        }
    }
}
