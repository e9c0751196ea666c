//! The `events:` config block, as plain serde structs (every struct rejects unknown keys;
//! durations are written `250ms`, `10s`, `2m`):
//!
//! ```yaml
//! events:
//!   sinks:
//!     - name: hooks                       # unique; also names the sink's outbox rows
//!       webhook:
//!         url: https://hooks.example/portcullis
//!         secret: ${file:secrets/hook.key}   # whsec_<base64>: Standard Webhooks signatures
//!         mode: structured                # or binary (ce-* headers, data as the body)
//!         timeout: 10s                    # per attempt
//!         max_attempts: 20                # then the event is dropped and counted as failed
//!         backoff: { min: 1s, max: 5m }   # exponential, with jitter
//!         durable: true                   # the outbox lives in the embedded store
//!         outbox_max: 100000              # rows kept for this sink; the oldest go first
//!       types: ["dev.portcullis.server.*", "dev.portcullis.backend.*"]   # default: all
//!       queue: 10000                      # the bus's queue in front of the sink
//!     - { name: bus, nats: { url: "nats://127.0.0.1:4222", subject: "portcullis.events.{type}", jetstream: false } }
//!     - { name: log, file: { path: /var/log/portcullis/events.jsonl } }
//!     - { name: console, stdout: {} }
//! ```

use crate::error::EventsError;
use crate::http::Mode;
use crate::signature::WebhookSecret;
use serde::{Deserialize, Deserializer};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

/// The `events:` block.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsCfg {
    #[serde(default)]
    pub sinks: Vec<SinkCfg>,
}

/// One sink: a name, exactly one kind, the types it takes and its queue.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "RawSink")]
pub struct SinkCfg {
    pub name: String,
    pub kind: SinkKind,
    /// Glob patterns of the event types this sink takes; empty: every type.
    pub types: Vec<String>,
    /// Events the bus queues for this sink before dropping (and counting) more.
    pub queue: usize,
}

/// What a sink is.
#[derive(Clone, Debug)]
pub enum SinkKind {
    Webhook(WebhookCfg),
    Nats(NatsCfg),
    /// JSON lines appended to a file.
    File(FileCfg),
    /// JSON lines on standard output.
    Stdout,
}

/// The default queue in front of a sink.
pub const DEFAULT_QUEUE: usize = 10_000;

/// How a sink is written in YAML: `name`, one of the kind keys, and the common keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    /// Default: the kind's name (`webhook`, `nats`, `file`, `stdout`), which suits a config
    /// with one sink of each kind.
    name: Option<String>,
    webhook: Option<WebhookCfg>,
    nats: Option<NatsCfg>,
    file: Option<FileCfg>,
    stdout: Option<StdoutCfg>,
    #[serde(default)]
    types: Vec<String>,
    #[serde(default = "default_queue")]
    queue: usize,
}

/// `stdout: {}` takes no settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StdoutCfg {}

fn default_queue() -> usize {
    DEFAULT_QUEUE
}

impl TryFrom<RawSink> for SinkCfg {
    type Error = String;

    fn try_from(raw: RawSink) -> Result<SinkCfg, String> {
        let kind_name = [
            (raw.webhook.is_some(), "webhook"),
            (raw.nats.is_some(), "nats"),
            (raw.file.is_some(), "file"),
            (raw.stdout.is_some(), "stdout"),
        ]
        .iter()
        .find(|(set, _)| *set)
        .map_or("sink", |(_, n)| *n);
        let raw = RawSink {
            name: Some(raw.name.clone().unwrap_or_else(|| kind_name.to_string())),
            ..raw
        };
        let name = raw.name.clone().unwrap_or_default();
        let mut kinds = Vec::new();
        if let Some(w) = raw.webhook {
            kinds.push(SinkKind::Webhook(w));
        }
        if let Some(n) = raw.nats {
            kinds.push(SinkKind::Nats(n));
        }
        if let Some(f) = raw.file {
            kinds.push(SinkKind::File(f));
        }
        if raw.stdout.is_some() {
            kinds.push(SinkKind::Stdout);
        }
        if kinds.len() != 1 {
            return Err(format!(
                "events sink `{}` needs exactly one of `webhook`, `nats`, `file`, `stdout` \
                 (found {})",
                name,
                kinds.len()
            ));
        }
        if raw.queue == 0 {
            return Err(format!(
                "events sink `{}`: `queue` must be at least 1",
                name
            ));
        }
        Ok(SinkCfg {
            name,
            kind: kinds.remove(0),
            types: raw.types,
            queue: raw.queue,
        })
    }
}

/// An HTTP webhook: each event POSTed, signed, retried, through an outbox.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookCfg {
    pub url: String,
    #[serde(default)]
    pub mode: Mode,
    /// `whsec_<base64>`: signs each request per Standard Webhooks. Without one, requests
    /// carry `webhook-id` and `webhook-timestamp` but no signature.
    #[serde(default, deserialize_with = "secret")]
    pub secret: Option<WebhookSecret>,
    /// The longest one attempt may take.
    #[serde(default = "ten_seconds", with = "duration")]
    pub timeout: Duration,
    /// Attempts per event, the first included.
    #[serde(default = "twenty")]
    pub max_attempts: u32,
    #[serde(default)]
    pub backoff: Backoff,
    /// Keep the outbox in the embedded store, so pending events survive a crash.
    #[serde(default = "yes")]
    pub durable: bool,
    /// The most events this sink's outbox holds; past it, the oldest are evicted (counted).
    #[serde(default = "outbox_max")]
    pub outbox_max: usize,
}

impl WebhookCfg {
    /// A webhook with every default.
    pub fn new(url: impl Into<String>) -> WebhookCfg {
        WebhookCfg {
            url: url.into(),
            mode: Mode::Structured,
            secret: None,
            timeout: ten_seconds(),
            max_attempts: twenty(),
            backoff: Backoff::default(),
            durable: true,
            outbox_max: outbox_max(),
        }
    }
}

/// The wait before attempt `n + 1` is `min · 2^(n-1)`, capped at `max`, then jittered to a
/// random point in its upper half. A `Retry-After` from the receiver waits at least that
/// (up to `max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(with = "duration")]
    pub min: Duration,
    #[serde(with = "duration")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

/// NATS: each event published as a structured CloudEvent on a subject.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsCfg {
    /// `nats://host:port` (several comma-separated).
    pub url: String,
    /// The subject; `{type}` is replaced with the event's type
    /// (`portcullis.events.dev.portcullis.server.down`).
    #[serde(default = "nats_subject")]
    pub subject: String,
    /// Publish to JetStream and wait for its ack (a stream must take the subjects);
    /// otherwise core NATS, fire and forget.
    #[serde(default)]
    pub jetstream: bool,
    /// The longest a publish (and a JetStream ack) may take.
    #[serde(default = "five_seconds", with = "duration")]
    pub timeout: Duration,
}

/// JSON lines appended to a file (opened for each batch, so a rotated file is followed).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCfg {
    pub path: PathBuf,
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
fn twenty() -> u32 {
    20
}
fn yes() -> bool {
    true
}
fn outbox_max() -> usize {
    100_000
}
fn nats_subject() -> String {
    "portcullis.events.{type}".into()
}

fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<WebhookSecret>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    text.map(|t| WebhookSecret::parse(&t).map_err(serde::de::Error::custom))
        .transpose()
}

/// Durations as `250ms`, `10s`, `2m`, `1h`.
pub mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration (write it like 250ms, 10s, 2m): {e}"
            ))
        })
    }
}

impl EventsCfg {
    /// Checks what serde cannot: unique sink names, usable values, type patterns.
    pub fn validate(&self) -> Result<(), EventsError> {
        let mut names = HashSet::new();
        for s in &self.sinks {
            let bad = |reason: String| EventsError::Config {
                sink: s.name.clone(),
                reason,
            };
            if s.name.is_empty() {
                return Err(EventsError::Events("a sink has an empty `name`".into()));
            }
            if !names.insert(s.name.as_str()) {
                return Err(EventsError::Events(format!(
                    "two sinks are named `{}`: names must be unique (a webhook's outbox rows are \
                     kept under its name); give each a `name` (a sink without one is named after \
                     its kind)",
                    s.name
                )));
            }
            crate::bus::TypeFilter::new(&s.types).map_err(bad)?;
            match &s.kind {
                SinkKind::Webhook(w) => {
                    let url = reqwest::Url::parse(&w.url).map_err(|e| {
                        bad(format!(
                            "webhook url `{}`: {e}",
                            portcullis_config::redact_url(&w.url)
                        ))
                    })?;
                    if !matches!(url.scheme(), "http" | "https") {
                        return Err(bad(format!(
                            "webhook url `{}` is not http(s)",
                            portcullis_config::redact_url(&w.url)
                        )));
                    }
                    if w.max_attempts == 0 {
                        return Err(bad("`max_attempts` must be at least 1".into()));
                    }
                    if w.timeout.is_zero() {
                        return Err(bad("`timeout` must be more than 0".into()));
                    }
                    if w.backoff.min.is_zero() || w.backoff.max < w.backoff.min {
                        return Err(bad("`backoff` needs 0 < min <= max".into()));
                    }
                    if w.outbox_max == 0 {
                        return Err(bad("`outbox_max` must be at least 1".into()));
                    }
                }
                SinkKind::Nats(n) => {
                    if n.url.trim().is_empty() {
                        return Err(bad("nats `url` is empty".into()));
                    }
                    if n.subject.trim().is_empty() || n.subject.contains(char::is_whitespace) {
                        return Err(bad(format!(
                            "nats subject `{}` must be non-empty, without spaces",
                            n.subject
                        )));
                    }
                }
                SinkKind::File(f) => {
                    if f.path.as_os_str().is_empty() {
                        return Err(bad("file `path` is empty".into()));
                    }
                }
                SinkKind::Stdout => {}
            }
        }
        Ok(())
    }
}
