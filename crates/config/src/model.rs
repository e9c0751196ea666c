//! The YAML model users write (DESIGN.md §3). Every struct rejects unknown keys, and every
//! default lives here, next to the field it belongs to, so `docs/configuration.md` can be
//! checked against one place.

use crate::units::{Dur, Size};
use ipnet::IpNet;
use serde::{de, Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::time::Duration;

/// The root config file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RootFile {
    /// Worker threads; default one per CPU core.
    pub workers: Option<usize>,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    pub admin: Option<Admin>,
    #[serde(default)]
    pub access_log: AccessLog,
    /// Peers whose `X-Forwarded-*` and `X-Request-Id` headers are trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// How long in-flight requests may take to finish on shutdown.
    #[serde(default = "d30s")]
    pub shutdown_grace: Dur,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub routes: Vec<Route>,
    pub apps: Option<Apps>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Apps {
    #[serde(default)]
    pub include: Vec<String>,
}

/// An app bundle: one file of backends and routes, namespaced by `name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    pub name: String,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub bind: String,
    pub tls: Option<ListenerTls>,
    /// Largest request header section; larger gets 431.
    #[serde(default = "d64k")]
    pub max_header_size: Size,
    /// Most request headers; more gets 431.
    #[serde(default = "d100")]
    pub max_headers: usize,
    #[serde(default)]
    pub timeouts: ListenerTimeouts,
    /// Protocols offered: `http1`, `http2`. Default both.
    #[serde(default = "both_protocols")]
    pub protocols: Vec<Protocol>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTimeouts {
    /// Time allowed to receive a complete request header section (slowloris guard).
    #[serde(default = "d10s")]
    pub client_header: Dur,
    /// How long an idle client keep-alive connection is kept open.
    #[serde(default = "d60s")]
    pub idle: Dur,
}

impl Default for ListenerTimeouts {
    fn default() -> Self {
        ListenerTimeouts {
            client_header: d10s(),
            idle: d60s(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    pub certificates: Vec<CertPair>,
    pub client_auth: Option<ClientAuth>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    pub ca: String,
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "admin_bind")]
    pub bind: String,
    /// Bearer tokens accepted by the admin API (use `${file:...}` or `${env:...}`).
    #[serde(default)]
    pub tokens: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// `stdout`, `off`, or a file path.
    #[serde(default = "stdout")]
    pub path: String,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog { path: stdout() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    #[serde(default)]
    pub balance: Balance,
    /// Cookie stickiness: the server is remembered in this cookie.
    pub sticky: Option<Sticky>,
    pub servers: Vec<Server>,
    /// Upstream protocol: `http1` (default) or `http2` (needed for gRPC).
    #[serde(default = "http1")]
    pub protocol: Protocol,
    /// Host header sent upstream; default keeps the client's.
    pub host: Option<String>,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<Outlier>,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default)]
    pub timeouts: BackendTimeouts,
    /// How long a request may wait for a server slot when every server is at `max_connections`.
    #[serde(default = "d5s")]
    pub queue_timeout: Dur,
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    Random,
    Hash(HashOn),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(String),
    Cookie(String),
    ClientIp,
    Path,
}

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Hash { hash: String },
        }
        let msg = "balance must be `round_robin`, `least_conn`, `random` or `{ hash: header:NAME | cookie:NAME | client_ip | path }`";
        match Raw::deserialize(d).map_err(|_| de::Error::custom(msg))? {
            Raw::Name(n) => match n.as_str() {
                "round_robin" => Ok(Balance::RoundRobin),
                "least_conn" => Ok(Balance::LeastConn),
                "random" => Ok(Balance::Random),
                _ => Err(de::Error::custom(format!("unknown balance `{n}`: {msg}"))),
            },
            Raw::Hash { hash } => {
                let on = match hash.split_once(':') {
                    Some(("header", h)) if !h.is_empty() => HashOn::Header(h.to_ascii_lowercase()),
                    Some(("cookie", c)) if !c.is_empty() => HashOn::Cookie(c.to_string()),
                    None if hash == "client_ip" => HashOn::ClientIp,
                    None if hash == "path" => HashOn::Path,
                    _ => {
                        return Err(de::Error::custom(format!(
                            "unknown hash key `{hash}`: {msg}"
                        )))
                    }
                };
                Ok(Balance::Hash(on))
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    #[serde(default = "sticky_cookie")]
    pub cookie: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Stable name used by the admin API and metrics; default is the address.
    pub name: Option<String>,
    /// `host:port`, or `builtin:echo` for the built-in echo origin.
    pub address: String,
    #[serde(default = "d1u32")]
    pub weight: u32,
    /// Most concurrent requests sent to this server; more wait in the backend queue.
    pub max_connections: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub http: Option<HttpCheck>,
    #[serde(default)]
    pub tcp: bool,
    #[serde(default = "d2s")]
    pub interval: Dur,
    #[serde(default = "d1s")]
    pub timeout: Dur,
    #[serde(default = "d2u32")]
    pub rise: u32,
    #[serde(default = "d3u32")]
    pub fall: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    #[serde(default = "slash")]
    pub path: String,
    #[serde(default)]
    pub expect: StatusRange,
    pub host: Option<String>,
}

/// A status (`200`) or an inclusive range (`"200-399"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub lo: u16,
    pub hi: u16,
}

impl Default for StatusRange {
    fn default() -> Self {
        StatusRange { lo: 200, hi: 399 }
    }
}

impl StatusRange {
    pub fn contains(&self, s: u16) -> bool {
        (self.lo..=self.hi).contains(&s)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        let msg = "expect must be a status like `200` or a range like `\"200-399\"`";
        let r = match Raw::deserialize(d).map_err(|_| de::Error::custom(msg))? {
            Raw::N(n) => StatusRange { lo: n, hi: n },
            Raw::S(s) => {
                let (a, b) = s.split_once('-').unwrap_or((&s, &s));
                let lo = a.trim().parse().map_err(|_| de::Error::custom(msg))?;
                let hi = b.trim().parse().map_err(|_| de::Error::custom(msg))?;
                StatusRange { lo, hi }
            }
        };
        if r.lo < 100 || r.hi > 599 || r.lo > r.hi {
            return Err(de::Error::custom(msg));
        }
        Ok(r)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    #[serde(default = "d5u32")]
    pub consecutive_5xx: u32,
    #[serde(default = "d5u32")]
    pub consecutive_connect_failures: u32,
    #[serde(default = "d30s")]
    pub eject_for: Dur,
    #[serde(default = "d50u32")]
    pub max_ejected_percent: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Extra attempts after the first.
    #[serde(default = "d2u32")]
    pub attempts: u32,
    #[serde(default = "default_retry_on")]
    pub on: Vec<RetryOn>,
    /// Retries may add at most this percentage of the backend's requests in flight.
    #[serde(default = "d20u32")]
    pub budget_percent: u32,
    /// Retries always allowed regardless of the budget, so a quiet backend can still retry.
    #[serde(default = "d3u32")]
    pub min_retries_in_flight: u32,
    pub per_try_timeout: Option<Dur>,
    #[serde(default = "d25ms")]
    pub backoff_base: Dur,
    #[serde(default = "d250ms")]
    pub backoff_max: Dur,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 2,
            on: default_retry_on(),
            budget_percent: 20,
            min_retries_in_flight: 3,
            per_try_timeout: None,
            backoff_base: d25ms(),
            backoff_max: d250ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    ConnectFailure,
    Status(u16),
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        let msg = "retries.on entries are `connect_failure` or a status such as 502, 503, 504";
        match Raw::deserialize(d).map_err(|_| de::Error::custom(msg))? {
            Raw::N(n) if (500..=599).contains(&n) || n == 429 => Ok(RetryOn::Status(n)),
            Raw::S(s) if s == "connect_failure" => Ok(RetryOn::ConnectFailure),
            _ => Err(de::Error::custom(msg)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTimeouts {
    #[serde(default = "d1s")]
    pub connect: Dur,
    /// Time from sending the request to receiving the response headers.
    #[serde(default = "d30s")]
    pub response: Dur,
    /// How long an idle pooled upstream connection is kept.
    #[serde(default = "d60s")]
    pub idle: Dur,
}

impl Default for BackendTimeouts {
    fn default() -> Self {
        BackendTimeouts {
            connect: d1s(),
            response: d30s(),
            idle: d60s(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    #[serde(default = "yes")]
    pub verify: bool,
    /// CA bundle; default is the Mozilla root set.
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    /// Server name to send and verify; default is the server's host.
    pub sni: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: Match,
    /// Listeners the route belongs to; default all.
    pub listeners: Option<Vec<String>>,
    pub backend: String,
    /// Largest request body; larger gets 413. Default unlimited.
    pub max_body_size: Option<Size>,
    /// Whole-request deadline, from the request's arrival to the end of the response headers.
    pub timeout: Option<Dur>,
    /// Allow status-based retries of non-idempotent methods (POST, PATCH).
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// Exact host (`api.example.com`) or wildcard (`*.example.com`).
    pub host: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    pub methods: Option<Vec<String>>,
    /// Header name to exact value; `"*"` means present with any value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn d30s() -> Dur {
    Dur(Duration::from_secs(30))
}
fn d60s() -> Dur {
    Dur(Duration::from_secs(60))
}
fn d10s() -> Dur {
    Dur(Duration::from_secs(10))
}
fn d5s() -> Dur {
    Dur(Duration::from_secs(5))
}
fn d2s() -> Dur {
    Dur(Duration::from_secs(2))
}
fn d1s() -> Dur {
    Dur(Duration::from_secs(1))
}
fn d25ms() -> Dur {
    Dur(Duration::from_millis(25))
}
fn d250ms() -> Dur {
    Dur(Duration::from_millis(250))
}
fn d64k() -> Size {
    Size(64 * 1024)
}
fn d100() -> usize {
    100
}
fn d1u32() -> u32 {
    1
}
fn d2u32() -> u32 {
    2
}
fn d3u32() -> u32 {
    3
}
fn d5u32() -> u32 {
    5
}
fn d20u32() -> u32 {
    20
}
fn d50u32() -> u32 {
    50
}
fn yes() -> bool {
    true
}
fn slash() -> String {
    "/".into()
}
fn stdout() -> String {
    "stdout".into()
}
fn sticky_cookie() -> String {
    "portcullis_server".into()
}
fn admin_bind() -> String {
    "127.0.0.1:9901".into()
}
fn http1() -> Protocol {
    Protocol::Http1
}
fn both_protocols() -> Vec<Protocol> {
    vec![Protocol::Http1, Protocol::Http2]
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Status(502),
        RetryOn::Status(503),
        RetryOn::Status(504),
    ]
}
