//! A real webhook receiver for the tests: an axum server on a loopback port that checks
//! each request's Standard Webhooks signature itself (recomputing the HMAC, not calling the
//! crate), reads the CloudEvent in either mode, dedups by id, and can be told to fail.

#![allow(dead_code)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde_json::Value;
use sha2::Sha256;
use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 32 bytes, base64.
pub const SECRET: &str = "whsec_c2VjcmV0LWZvci10aGUtd2ViaG9vay10ZXN0cy0zMmI=";

/// An event as the receiver read it.
#[derive(Clone, Debug, PartialEq)]
pub struct Received {
    pub id: String,
    pub type_: String,
    pub source: String,
    pub subject: Option<String>,
    pub time: String,
    pub data: Value,
    /// `structured` or `binary`.
    pub mode: &'static str,
    /// The request's path: each path is one endpoint, deduping on its own.
    pub path: String,
}

#[derive(Default)]
pub struct Log {
    /// Answer 500 to this many next requests (after checking them).
    pub fail_next: u32,
    /// Hang this many next requests for 3 s (past the sender's timeout), then answer 500.
    pub hang_next: u32,
    /// Answer 422 to events of these types.
    pub reject_types: Vec<String>,
    pub requests: u32,
    pub bad_signatures: u32,
    pub duplicates: u32,
    /// Accepted events, first delivery of each id (per path) only.
    pub events: Vec<Received>,
    seen: HashSet<(String, String)>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    secret: Vec<u8>,
    log: Arc<Mutex<Log>>,
}

impl Receiver {
    /// Listens on `127.0.0.1:port` (0: any free port).
    pub async fn start(port: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let secret = STANDARD
            .decode(SECRET.strip_prefix("whsec_").unwrap())
            .unwrap();
        let shared = Arc::new(Shared {
            secret,
            log: log.clone(),
        });
        let app = Router::new()
            .route("/{*path}", post(hook))
            .with_state(shared);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver { addr, log, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    pub fn events(&self) -> Vec<Received> {
        self.log.lock().events.clone()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Standard Webhooks, by hand: `v1,` + base64(HMAC-SHA256(secret, "{id}.{ts}.{body}")).
fn signature_ok(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    let (Some(id), Some(ts), Some(sigs)) = (
        header(headers, "webhook-id"),
        header(headers, "webhook-timestamp"),
        header(headers, "webhook-signature"),
    ) else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    match ts.parse::<i64>() {
        Ok(t) if (now - t).abs() <= 300 => {}
        _ => return false,
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    sigs.split(' ').any(|s| s == expected)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Reads the CloudEvent in either mode; `None` if it is not one.
fn read_event(headers: &HeaderMap, body: &[u8]) -> Option<Received> {
    let ct = header(headers, "content-type").unwrap_or("");
    if ct.starts_with("application/cloudevents+json") {
        let v: Value = serde_json::from_slice(body).ok()?;
        if v["specversion"] != "1.0" {
            return None;
        }
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        return Some(Received {
            id: s("id")?,
            type_: s("type")?,
            source: s("source")?,
            subject: s("subject"),
            time: s("time")?,
            data: v.get("data").cloned().unwrap_or(Value::Null),
            mode: "structured",
            path: String::new(),
        });
    }
    if header(headers, "ce-specversion")? != "1.0" {
        return None;
    }
    let h = |k: &str| header(headers, k).map(percent_decode);
    Some(Received {
        id: h("ce-id")?,
        type_: h("ce-type")?,
        source: h("ce-source")?,
        subject: h("ce-subject"),
        time: h("ce-time")?,
        data: if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body).ok()?
        },
        mode: "binary",
        path: String::new(),
    })
}

async fn hook(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let hang = {
        let mut log = shared.log.lock();
        log.requests += 1;
        if !signature_ok(&shared.secret, &headers, &body) {
            log.bad_signatures += 1;
            return StatusCode::UNAUTHORIZED;
        }
        let Some(mut event) = read_event(&headers, &body) else {
            return StatusCode::BAD_REQUEST;
        };
        event.path = uri.path().to_owned();
        if header(&headers, "webhook-id") != Some(event.id.as_str()) {
            return StatusCode::BAD_REQUEST;
        }
        if log.hang_next > 0 {
            log.hang_next -= 1;
            true
        } else if log.fail_next > 0 {
            log.fail_next -= 1;
            return StatusCode::INTERNAL_SERVER_ERROR;
        } else if log.reject_types.contains(&event.type_) {
            return StatusCode::UNPROCESSABLE_ENTITY;
        } else {
            if log.seen.insert((event.path.clone(), event.id.clone())) {
                log.events.push(event);
            } else {
                log.duplicates += 1;
            }
            return StatusCode::NO_CONTENT;
        }
    };
    if hang {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    StatusCode::INTERNAL_SERVER_ERROR
}

/// Polls `check` every 10 ms until it is true or `limit` passes; says `what` on failure.
pub async fn wait_until<F: FnMut() -> bool>(limit: Duration, what: &str, mut check: F) {
    let start = std::time::Instant::now();
    while !check() {
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`], for an async check.
pub async fn wait_until_async<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[path = "../../../../tests/ports.rs"]
mod ports;
#[allow(unused_imports)] // not every test file that includes this module uses it
pub use ports::free_port;
