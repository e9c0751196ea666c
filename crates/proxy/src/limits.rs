//! Limits state that outlives a snapshot: the stick tables and the usage plans' buckets,
//! keyed by name (as server state is, see `state`), and the table keys a request is counted
//! under.
//!
//! * A reload keeps a table whose definition (key, size, expire, store) is unchanged, counts
//!   and all, and starts a table whose shape changed afresh, saying so in the log. Tables no
//!   longer defined are dropped (once the last snapshot using them is gone). Plans are kept
//!   the same way, by name, rate and burst.
//! * Keys: each part of a table's key is taken from the request; a tuple joins the parts with
//!   a 0x1F byte. When a part is missing (no identity, no such header or claim), the request is
//!   not counted in that table.
//!
//! This module knows nothing of the exchange or the phases: the `limit` phase reads it.

pub use crate::plans::ceil_secs;
use http::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;
use portcullis_config::{StickTable, TableKey};
use portcullis_identity::{AuthMethod, Identity};
use portcullis_limits::{Key, Kind, Table, TableSpec};
use prometheus_client::metrics::counter::Counter;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The byte between the parts of a tuple key.
pub const TUPLE_SEP: u8 = 0x1F;

/// One part of a table key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// The client IP: the TCP peer (never a forwarded-for header).
    Src,
    /// The client IP masked to this many bits (at most 32 for IPv4, 128 for IPv6).
    SrcMask(u8),
    /// `provider/subject` of the identity.
    Principal,
    /// The identity's subject, when it authenticated with an API key.
    ApiKey,
    /// The route's id.
    Route,
    /// The first value of a request header, as bytes.
    Header(HeaderName),
    /// A claim of the identity, as text (`portcullis_identity::claims::lookup`).
    Claim(String),
}

impl Part {
    /// A part as the config writes it (validated there).
    pub fn parse(p: &str) -> Option<Part> {
        Some(match p {
            "src" => Part::Src,
            "principal" => Part::Principal,
            "api_key" => Part::ApiKey,
            "route" => Part::Route,
            _ => {
                if let Some(bits) = p.strip_prefix("src/") {
                    Part::SrcMask(bits.parse().ok().filter(|b| (1..=128).contains(b))?)
                } else if let Some(h) = p.strip_prefix("header:") {
                    Part::Header(HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok()?)
                } else {
                    Part::Claim(p.strip_prefix("claim:")?.to_string())
                }
            }
        })
    }

    /// Whether the part comes from the identity (so a request without one is not counted).
    pub fn needs_identity(&self) -> bool {
        matches!(self, Part::Principal | Part::ApiKey | Part::Claim(_))
    }
}

/// What a key is built from: the request's facts, borrowed.
pub struct KeyFacts<'a> {
    pub ip: IpAddr,
    pub identity: Option<&'a Identity>,
    pub route: &'a str,
    pub headers: &'a HeaderMap,
    /// The peer is a trusted proxy: a header part that says where the request came from
    /// (see [`forwarded_field`]) is believed only then.
    pub trusted: bool,
}

/// Whether `h` says where a request came from (`x-forwarded-*`, `forwarded`, `x-real-ip`,
/// `cf-connecting-ip`...): believed only from a trusted proxy, and removed or rewritten for
/// the origin otherwise (see `upstream::head`).
fn forwarded_field(h: &HeaderName) -> bool {
    let n = h.as_str();
    n.starts_with("x-forwarded-") || portcullis_config::FORWARDED_FIELDS.contains(&n)
}

/// The address a plan counts a caller without identity under (a public route): an IPv4
/// client's address, an IPv6 client's /64, the usual allocation of one host or home, any
/// address of which the client may pick for each request.
pub fn anonymous_caller(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(a) & !((1u128 << 64) - 1),
        )),
        v4 => v4,
    }
}

/// The key of `parts` for this request, or None when a part is missing.
pub fn build_key(parts: &[Part], f: &KeyFacts<'_>) -> Option<Key> {
    let mut buf: SmallVec<[u8; 64]> = SmallVec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            buf.push(TUPLE_SEP);
        }
        match p {
            Part::Src => push_ip(&mut buf, f.ip, 128),
            Part::SrcMask(n) => push_ip(&mut buf, f.ip, *n),
            Part::Principal => {
                let id = f.identity?;
                buf.extend_from_slice(id.provider.as_bytes());
                buf.push(b'/');
                buf.extend_from_slice(id.subject.as_bytes());
            }
            Part::ApiKey => match f.identity? {
                id if id.method == AuthMethod::ApiKey => {
                    buf.extend_from_slice(id.subject.as_bytes())
                }
                _ => return None,
            },
            Part::Route => buf.extend_from_slice(f.route.as_bytes()),
            // From an untrusted peer, such a header is the client's claim, which the origin
            // never sees: the part is the peer's address, where the request came from.
            Part::Header(h) if !f.trusted && forwarded_field(h) => push_ip(&mut buf, f.ip, 128),
            Part::Header(h) => buf.extend_from_slice(f.headers.get(h)?.as_bytes()),
            Part::Claim(path) => {
                match portcullis_identity::claims::lookup(&f.identity?.claims, path)? {
                    serde_json::Value::Null => return None,
                    serde_json::Value::String(s) => buf.extend_from_slice(s.as_bytes()),
                    v => buf.extend_from_slice(v.to_string().as_bytes()),
                }
            }
        }
    }
    Some(Key::new(&buf))
}

/// The address's bytes, masked to `bits` (an IPv4 address keeps at most 32).
fn push_ip(buf: &mut SmallVec<[u8; 64]>, ip: IpAddr, bits: u8) {
    let mut octets = [0u8; 16];
    let len = match ip {
        IpAddr::V4(a) => {
            octets[..4].copy_from_slice(&a.octets());
            4
        }
        IpAddr::V6(a) => {
            octets = a.octets();
            16
        }
    };
    let bits = usize::from(bits).min(len * 8);
    for (i, o) in octets[..len].iter_mut().enumerate() {
        let keep = bits.saturating_sub(i * 8).min(8);
        *o &= if keep == 0 { 0 } else { 0xFFu8 << (8 - keep) };
    }
    buf.extend_from_slice(&octets[..len]);
}

/// A stick table as the request path uses it.
pub struct TableRt {
    pub name: String,
    pub parts: Vec<Part>,
    pub table: Table,
    /// No part needs an identity (so an authentication failure can be counted).
    pub anonymous: bool,
    /// Stores `conn_cur`: a request holds it until its response ends.
    pub conn: bool,
    /// Stores `http_err_cnt` or `http_err_rate`.
    pub errs: bool,
    /// Stores `bytes_in_rate` or `bytes_out_rate`.
    pub bytes: bool,
    /// Stores `tags`.
    pub tags: bool,
    /// The definition's key, to tell whether a reload changed the shape.
    key: TableKey,
}

/// The long-lived limits state: tables and plans by name. See the [module docs](self).
#[derive(Default)]
pub struct Registry {
    tables: Mutex<HashMap<String, Arc<TableRt>>>,
    pub plans: crate::plans::PlanRegistry,
    /// The shared store, when `limits.store` is Redis (made at start; a reload does not
    /// change it).
    pub fleet: Option<Fleet>,
}

/// The shared limit store and what a check does when it fails.
pub struct Fleet {
    pub store: portcullis_limits::RedisStore,
    pub on_error: portcullis_config::OnStoreError,
    /// The request path's wait for the store (`limits.store.redis.timeout`).
    pub timeout: std::time::Duration,
}

impl Fleet {
    /// The store `config` names, if it names Redis.
    pub fn of(config: &portcullis_config::Config) -> Result<Option<Fleet>, String> {
        let portcullis_config::LimitStore::Redis(r) = &config.limits.store else {
            return Ok(None);
        };
        let store = portcullis_limits::RedisStore::new(portcullis_limits::RedisConfig {
            url: r.url.clone(),
            timeout: r.timeout.0,
            prefix: r.prefix.clone(),
            connections: r.connections,
            sync_interval: r.sync_interval.0,
            batch: r.batch.map(|b| b.0),
            ..portcullis_limits::RedisConfig::new(r.url.clone())
        })
        // The URL may carry a password: never in a message.
        .map_err(|e| {
            e.to_string()
                .replace(&r.url, &portcullis_config::redact_url(&r.url))
        })?;
        Ok(Some(Fleet {
            store,
            on_error: config.limits.on_store_error,
            timeout: r.timeout.0,
        }))
    }
}

impl Registry {
    pub fn new(plans: crate::plans::PlanRegistry, fleet: Option<Fleet>) -> Registry {
        Registry {
            tables: Mutex::default(),
            plans,
            fleet,
        }
    }

    /// The table for `def`: the running one when its shape is unchanged, else a new one.
    pub fn table(&self, def: &StickTable) -> Result<Arc<TableRt>, String> {
        let spec = TableSpec::parse(def.size, def.expire.0, def.store.iter().map(String::as_str))
            .map_err(|e| format!("stick table `{}`: {e}", def.name))?;
        let mut tables = self.tables.lock();
        if let Some(t) = tables.get(&def.name) {
            if t.key == def.key && *t.table.spec() == spec {
                return Ok(t.clone());
            }
            tracing::info!(target: "portcullis::limits", table = %def.name, "stick table `{}` changed; starting it afresh", def.name);
        }
        let parts = def
            .key
            .parts()
            .iter()
            .map(|p| {
                Part::parse(p)
                    .ok_or_else(|| format!("stick table `{}`: invalid key part `{p}`", def.name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let t = Arc::new(TableRt {
            name: def.name.clone(),
            anonymous: !parts.iter().any(Part::needs_identity),
            parts,
            conn: spec.stores(Kind::ConnCur),
            errs: spec.stores(Kind::HttpErrCnt) || spec.stores(Kind::HttpErrRate),
            bytes: spec.stores(Kind::BytesInRate) || spec.stores(Kind::BytesOutRate),
            tags: spec.stores(Kind::Tags),
            table: Table::new(spec),
            key: def.key.clone(),
        });
        tables.insert(def.name.clone(), t.clone());
        Ok(t)
    }

    /// Forgets the tables and plans that `config` no longer defines (after a reload).
    pub fn retain(&self, config: &portcullis_config::Config) {
        self.tables
            .lock()
            .retain(|n, _| config.stick_tables.iter().any(|t| &t.name == n));
        self.plans.retain(config);
    }

    /// The running table of this name.
    pub fn get(&self, name: &str) -> Option<Arc<TableRt>> {
        self.tables.lock().get(name).cloned()
    }
}

/// Each tracked table's counters for one request, by track index.
pub type Seen = SmallVec<[Option<portcullis_limits::Snapshot>; 2]>;

/// A request's counters as `context.limits` reads them: the route's tracked tables and
/// what the request saw in each.
pub struct LimitView<'a> {
    pub track: &'a [Arc<TableRt>],
    pub seen: &'a Seen,
}

impl LimitView<'_> {
    fn of(&self, table: &str) -> Option<&portcullis_limits::Snapshot> {
        let i = self.track.iter().position(|t| t.name == table)?;
        self.seen.get(i)?.as_ref()
    }
}

impl portcullis_policy::LimitValues for LimitView<'_> {
    fn value(&self, table: &str, kind: Kind) -> Option<u64> {
        self.of(table)?.get(kind)
    }
    fn tags(&self, table: &str) -> Vec<String> {
        self.of(table).map(|s| s.tags.clone()).unwrap_or_default()
    }
}

/// What a rule does when its counter is over the threshold.
pub enum Action {
    Deny,
    Tarpit(Duration),
    Mark(HeaderName),
    Queue(Queue),
}

/// A `queue` rule's bounds, and how many requests it holds now.
pub struct Queue {
    /// Requests held, then let through.
    pub passed: Counter,
    pub max_wait: Duration,
    pub max_queue: usize,
    pub waiting: std::sync::atomic::AtomicUsize,
}

/// A route's rule, compiled.
pub struct Rule {
    /// Index into [`RouteLimits::track`].
    pub table: usize,
    pub kind: Kind,
    pub above: u64,
    pub action: Action,
    pub status: http::StatusCode,
    /// `Retry-After`: a rate counter's period, rounded up to seconds; 1 for other counters.
    pub retry_after: HeaderValue,
    /// Rejections (deny, tarpit) or marks, by route and table.
    pub counter: Counter,
}

/// The usage plans of a route: which plan a caller is on, the route's default, and the
/// route's rejection counter per plan.
pub struct PlanUse {
    pub assignment: Arc<crate::plans::Assignment>,
    pub default: Option<usize>,
    /// By plan index.
    pub rejected: Vec<Counter>,
}

/// What a route counts and limits, compiled (None on a route without `limits`).
pub struct RouteLimits {
    /// Requests checked on this route.
    pub checks: Counter,
    pub track: Vec<Arc<TableRt>>,
    /// By track index: the counters this route reads in the table (its rules', or all of
    /// them when its policies read `context.limits`); the others are not computed.
    pub read: Vec<portcullis_limits::Kinds>,
    pub rules: Vec<Rule>,
    /// A rule may wait (`tarpit`, `queue`).
    pub waits: bool,
    pub plan: Option<PlanUse>,
    /// Headers `mark` rules set: a client's own values of them are removed.
    pub marks: Vec<HeaderName>,
}

/// What a request counted in, for the end of its response: errors and bytes recorded then,
/// and `conn_cur` ended when this is dropped (with the response, or with an early answer).
#[derive(Default)]
pub struct Usage {
    pub entries: SmallVec<[(Arc<TableRt>, Key); 2]>,
    /// The shared store the request was counted in (errors and bytes go there too); `None`
    /// when it was counted in this process.
    pub fleet: Option<portcullis_limits::RedisStore>,
    /// Request body bytes read (the forward phase's count), when there is a body.
    pub bytes_in: Option<Arc<AtomicU64>>,
}

impl Usage {
    /// The key this request counts under in `t`, if it counts there.
    pub fn key_of(&self, t: &Arc<TableRt>) -> Option<Key> {
        self.entries
            .iter()
            .find(|(e, _)| Arc::ptr_eq(e, t))
            .map(|(_, k)| k.clone())
    }

    /// The origin answered `status` with `bytes_out` bytes. Errors count 4xx and 5xx from the
    /// origin (404 included: a scanner's misses are errors it caused); portcullis's own
    /// refusals are never counted here.
    pub fn finish(&self, status: u16, bytes_out: u64) {
        // Read only when an entry changes: a success on a table of errors changes nothing.
        let mut now = None;
        let bytes_in = self
            .bytes_in
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        for (t, key) in &self.entries {
            let err = t.errs && status >= 400;
            if let Some(f) = &self.fleet {
                if err || t.bytes {
                    f.finish(&t.name, t.table.spec(), key, err, bytes_in, bytes_out);
                }
                continue;
            }
            if err || t.bytes {
                let now = *now.get_or_insert_with(|| {
                    portcullis_limits::Clock::now(&portcullis_limits::MonotonicClock)
                });
                t.table.with_entry(key, now, |e| {
                    if err {
                        e.add_error();
                    }
                    e.add_bytes_in(bytes_in);
                    e.add_bytes_out(bytes_out);
                });
            }
        }
    }
}

impl Drop for Usage {
    fn drop(&mut self) {
        if !self.entries.iter().any(|(t, _)| t.conn) {
            return;
        }
        let now = portcullis_limits::Clock::now(&portcullis_limits::MonotonicClock);
        for (t, key) in &self.entries {
            if t.conn {
                t.table.conn_end(key, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_prefix_only() {
        let mut b = SmallVec::new();
        push_ip(&mut b, "192.0.2.77".parse().unwrap(), 24);
        assert_eq!(&b[..], &[192, 0, 2, 0]);
        let mut b = SmallVec::new();
        push_ip(&mut b, "192.0.2.77".parse().unwrap(), 20);
        assert_eq!(&b[..], &[192, 0, 0, 0]);
        // A v4 address under a v6-sized prefix keeps all 32 bits.
        let mut b = SmallVec::new();
        push_ip(&mut b, "192.0.2.77".parse().unwrap(), 64);
        assert_eq!(&b[..], &[192, 0, 2, 77]);
        let mut b = SmallVec::new();
        push_ip(&mut b, "2001:db8:1:2:3:4:5:6".parse().unwrap(), 64);
        let want: std::net::Ipv6Addr = "2001:db8:1:2::".parse().unwrap();
        assert_eq!(&b[..], &want.octets());
    }

    #[test]
    fn parts_parse_as_the_config_writes_them() {
        assert_eq!(Part::parse("src"), Some(Part::Src));
        assert_eq!(Part::parse("src/24"), Some(Part::SrcMask(24)));
        assert_eq!(
            Part::parse("header:X-Tenant"),
            Some(Part::Header(HeaderName::from_static("x-tenant")))
        );
        assert_eq!(
            Part::parse("claim:org.id"),
            Some(Part::Claim("org.id".into()))
        );
        assert_eq!(Part::parse("src/0"), None);
        assert_eq!(Part::parse("nope"), None);
    }
}
