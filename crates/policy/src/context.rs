//! Which parts of the request context a route's policies read, found once at build time by
//! walking each policy's JSON (EST) form, and the per-request work that follows from it:
//! building a Cedar `Context` with only those attributes, and writing the bytes of a
//! decision-cache key from exactly the values those attributes are built from.
//!
//! Soundness: an attribute is left out of the context only if no policy of the route can
//! observe it. A policy observes `context.x` only through attribute access (`.x`, `["x"]`)
//! or `has x` on the `context` variable; any other use of `context` (compared, passed whole,
//! put in a set, ...) makes the route build the full context and never be cached. Within
//! `headers` and `time` the same walk records which members are read, so that `headers`
//! holds only the read headers and a route reading only `time.hour`/`time.weekday` keys its
//! cache on the hour rather than the second. The cache key always contains every value the
//! built context is made from, so two requests with the same key get the same context.

use crate::RequestInfo;
use cedar_policy::{Context, RestrictedExpression};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::SystemTime;

/// Top-level context attributes, one bit each.
const PATH: u16 = 1 << 0;
const METHOD: u16 = 1 << 1;
const QUERY: u16 = 1 << 2;
const QUERY_KEYS: u16 = 1 << 3;
const HEADERS: u16 = 1 << 4;
const IP: u16 = 1 << 5;
const TIME: u16 = 1 << 6;
const TLS: u16 = 1 << 7;
const REQUEST_ID: u16 = 1 << 8;
const LIMITS: u16 = 1 << 9;
const ROUTE_PATH: u16 = 1 << 10;
const ALL: u16 = (1 << 11) - 1;

fn bit(attr: &str) -> u16 {
    match attr {
        "path" => PATH,
        "method" => METHOD,
        "query" => QUERY,
        "query_keys" => QUERY_KEYS,
        "headers" => HEADERS,
        "ip" => IP,
        "time" => TIME,
        "tls" => TLS,
        "request_id" => REQUEST_ID,
        "limits" => LIMITS,
        "route_path" => ROUTE_PATH,
        // Not in the schema, so no validated policy reads it; nothing to build.
        _ => 0,
    }
}

/// What one policy (or, merged, a route's policies) reads of `context`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Use {
    /// `context` used other than by attribute access: build everything, never cache.
    pub whole: bool,
    /// Top-level attributes read.
    attrs: u16,
    /// `headers` members read; `None` (with the `HEADERS` bit) means the record is used whole.
    headers: Option<BTreeSet<String>>,
    /// `time` members read; `None` (with the `TIME` bit) means the record is used whole.
    time: Option<BTreeSet<String>>,
    /// `resource` appears in a condition (not only in the scope), so the route entity must
    /// be in the entity store. Scope tests (`==`, `in`, `is`) do not need it: a route has no
    /// parents, and Cedar treats an entity missing from the store as having none.
    pub resource: bool,
}

impl Use {
    /// Everything: the fallback when a policy's form cannot be analysed.
    pub fn everything() -> Use {
        Use {
            whole: true,
            resource: true,
            ..Use::default()
        }
    }

    /// What `policy` reads, from its JSON form.
    pub fn of_policy(policy: &cedar_policy::Policy) -> Use {
        match policy.to_json() {
            Ok(json) => {
                let mut u = Use::default();
                walk(&json, &mut u);
                u
            }
            Err(_) => Use::everything(),
        }
    }

    pub fn merge(&mut self, other: &Use) {
        self.whole |= other.whole;
        self.resource |= other.resource;
        merge_members(
            &mut self.headers,
            self.attrs & HEADERS,
            &other.headers,
            other.attrs & HEADERS,
        );
        merge_members(
            &mut self.time,
            self.attrs & TIME,
            &other.time,
            other.attrs & TIME,
        );
        self.attrs |= other.attrs;
    }

    fn read_attr(&mut self, attr: &str, member: Option<&str>) {
        let b = bit(attr);
        let slot = match b {
            HEADERS => Some(&mut self.headers),
            TIME => Some(&mut self.time),
            _ => None,
        };
        if let Some(slot) = slot {
            let first = self.attrs & b == 0;
            match (member, first) {
                (Some(m), true) => *slot = Some(BTreeSet::from([m.to_string()])),
                (Some(m), false) => {
                    if let Some(s) = slot {
                        s.insert(m.to_string());
                    }
                }
                // `context has headers`: present, no member observed.
                (None, true) => *slot = Some(BTreeSet::new()),
                (None, false) => {}
            }
        }
        self.attrs |= b;
    }

    fn read_whole_attr(&mut self, attr: &str) {
        let b = bit(attr);
        match b {
            HEADERS => self.headers = None,
            TIME => self.time = None,
            _ => {}
        }
        self.attrs |= b;
    }
}

/// Merges two member sets of one record attribute, each of which may be absent (`present`
/// is 0) or used whole (`None`).
fn merge_members(
    mine: &mut Option<BTreeSet<String>>,
    mine_present: u16,
    theirs: &Option<BTreeSet<String>>,
    theirs_present: u16,
) {
    if theirs_present == 0 {
        return;
    }
    if mine_present == 0 {
        *mine = theirs.clone();
        return;
    }
    match (mine.as_mut(), theirs) {
        (Some(m), Some(t)) => m.extend(t.iter().cloned()),
        _ => *mine = None,
    }
}

fn is_var(v: &Value, var: &str) -> bool {
    v.as_object()
        .is_some_and(|m| m.len() == 1 && m.get("Var").and_then(Value::as_str) == Some(var))
}

fn is_context(v: &Value) -> bool {
    is_var(v, "context")
}

/// The attribute names of a `.` or `has` node: one for `.` and simple `has`, several for the
/// extended `has` (`e has a.b`).
fn attr_names(attr: &Value) -> Option<Vec<&str>> {
    match attr {
        Value::String(s) => Some(vec![s.as_str()]),
        Value::Array(a) if !a.is_empty() => a.iter().map(Value::as_str).collect(),
        _ => None,
    }
}

/// `{".": {"left": L, "attr": A}}` or `{"has": ...}` on `context` or on `context.x`: records
/// the read and returns true. Anything else returns false and is walked generically.
fn access(op: &str, body: &Value, u: &mut Use) -> bool {
    let Some(b) = body.as_object() else {
        return false;
    };
    let (Some(left), Some(names)) = (b.get("left"), b.get("attr").and_then(attr_names)) else {
        return false;
    };
    if is_context(left) {
        if op == "has" {
            // `context has x` (presence only) or `context has x.m` (x, member m).
            u.read_attr(names[0], names.get(1).copied());
        } else {
            // `context.x` not under another access: a value, all of `x`.
            u.read_whole_attr(names[0]);
        }
        return true;
    }
    // `context.x.m`, `context.x["m"]`, `context.x has m`.
    let inner = left
        .as_object()
        .filter(|m| m.len() == 1)
        .and_then(|m| m.get("."))
        .and_then(Value::as_object);
    if let Some(inner) = inner {
        if let (Some(l), Some(Value::String(x))) = (inner.get("left"), inner.get("attr")) {
            if is_context(l) {
                u.read_attr(x, Some(names[0]));
                return true;
            }
        }
    }
    false
}

fn walk(v: &Value, u: &mut Use) {
    match v {
        Value::Object(m) => {
            if is_context(v) {
                u.whole = true;
                return;
            }
            if is_var(v, "resource") {
                u.resource = true;
                return;
            }
            for (k, body) in m {
                if (k == "." || k == "has") && access(k, body, u) {
                    continue;
                }
                walk(body, u);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| walk(x, u)),
        _ => {}
    }
}

/// How a route builds its context and its cache key, from the merged `Use` of its policies.
#[derive(Debug, Clone)]
pub struct Plan {
    attrs: u16,
    /// Indexes into the engine's `context_headers` of the headers the record holds.
    headers: Vec<usize>,
    /// The policies read `time` only through `hour` and `weekday`, which change with the
    /// hour: the key holds the hour, not the second.
    time_by_hour: bool,
    /// Decisions can be cached: `context` is never used whole, and neither `request_id`
    /// (unique per request) nor `limits` (counters that move with every request) is read.
    pub cacheable: bool,
}

impl Plan {
    /// Whether the built context holds `limits` (so the caller must count the request in
    /// the route's stick tables before it asks for a decision).
    pub fn reads_limits(&self) -> bool {
        self.attrs & LIMITS != 0
    }

    /// Whether the built context holds `time` (so the decision needs the current time).
    pub fn reads_time(&self) -> bool {
        self.attrs & TIME != 0
    }

    /// Whether a decision depends on nothing in the request but the method: the context
    /// holds at most `method`, so the principal, the action and the route decide it.
    pub fn method_only(&self) -> bool {
        self.cacheable && self.attrs & !METHOD == 0
    }

    pub fn new(u: &Use, context_headers: &[http::HeaderName]) -> Plan {
        let attrs = if u.whole { ALL } else { u.attrs };
        let headers = match (&u.headers, u.whole) {
            (Some(names), false) => context_headers
                .iter()
                .enumerate()
                .filter(|(_, h)| names.contains(h.as_str()))
                .map(|(i, _)| i)
                .collect(),
            _ => (0..context_headers.len()).collect(),
        };
        let time_by_hour = !u.whole
            && u.time
                .as_ref()
                .is_some_and(|m| m.iter().all(|x| x == "hour" || x == "weekday"));
        Plan {
            attrs,
            headers,
            time_by_hour,
            cacheable: !u.whole && attrs & (REQUEST_ID | LIMITS) == 0,
        }
    }

    /// Appends to `key` every value the context of this request is built from (the method
    /// always: it also picks the action). Variable-length values are length-prefixed, so
    /// different inputs never give the same bytes.
    pub fn write_key(&self, r: &RequestInfo<'_>, headers: &[http::HeaderName], key: &mut Vec<u8>) {
        fn bytes(key: &mut Vec<u8>, b: &[u8]) {
            key.extend_from_slice(&(b.len() as u32).to_le_bytes());
            key.extend_from_slice(b);
        }
        fn opt(key: &mut Vec<u8>, b: Option<&[u8]>) {
            match b {
                Some(b) => {
                    key.push(1);
                    bytes(key, b);
                }
                None => key.push(0),
            }
        }
        bytes(key, r.method.as_bytes());
        let a = self.attrs;
        if a & PATH != 0 {
            bytes(key, r.path.as_bytes());
        }
        if a & ROUTE_PATH != 0 {
            bytes(key, r.route_path.as_bytes());
        }
        if a & (QUERY | QUERY_KEYS) != 0 {
            opt(key, r.query.map(str::as_bytes));
        }
        if a & HEADERS != 0 {
            for &i in &self.headers {
                opt(
                    key,
                    header_text(r.headers, &headers[i])
                        .as_deref()
                        .map(str::as_bytes),
                );
            }
        }
        if a & IP != 0 {
            match r.client_ip {
                IpAddr::V4(v4) => {
                    key.push(4);
                    key.extend_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    key.push(6);
                    key.extend_from_slice(&v6.octets());
                }
            }
        }
        if a & TIME != 0 {
            let secs = seconds(r);
            let t = if self.time_by_hour { secs / 3600 } else { secs };
            key.extend_from_slice(&t.to_le_bytes());
        }
        if a & TLS != 0 {
            key.push(r.tls_client_cert as u8);
            opt(key, r.tls_client_subject.map(str::as_bytes));
        }
        if a & REQUEST_ID != 0 {
            bytes(key, r.request_id.as_bytes());
        }
    }

    /// The context of this request, with only the attributes the route's policies read.
    pub fn build(
        &self,
        r: &RequestInfo<'_>,
        context_headers: &[http::HeaderName],
        tables: &[ContextTable],
    ) -> Result<Context, String> {
        let a = self.attrs;
        if a == 0 {
            return Ok(Context::empty());
        }
        let mut pairs: Vec<(String, RestrictedExpression)> = Vec::with_capacity(9);
        if a & PATH != 0 {
            pairs.push((
                "path".into(),
                RestrictedExpression::new_string(r.path.into()),
            ));
        }
        if a & ROUTE_PATH != 0 {
            pairs.push((
                "route_path".into(),
                RestrictedExpression::new_string(r.route_path.into()),
            ));
        }
        if a & METHOD != 0 {
            pairs.push((
                "method".into(),
                RestrictedExpression::new_string(r.method.into()),
            ));
        }
        if a & (QUERY | QUERY_KEYS) != 0 {
            let parts = r.query.unwrap_or("").split('&').filter(|kv| !kv.is_empty());
            if a & QUERY != 0 {
                let q = parts
                    .clone()
                    .map(|kv| RestrictedExpression::new_string(kv.into()));
                pairs.push(("query".into(), RestrictedExpression::new_set(q)));
            }
            if a & QUERY_KEYS != 0 {
                let k = parts.map(|kv| {
                    RestrictedExpression::new_string(kv.split('=').next().unwrap_or("").into())
                });
                pairs.push(("query_keys".into(), RestrictedExpression::new_set(k)));
            }
        }
        if a & HEADERS != 0 {
            let headers = self.headers.iter().filter_map(|&i| {
                let h = &context_headers[i];
                let v = header_text(r.headers, h)?;
                Some((
                    h.as_str().to_string(),
                    RestrictedExpression::new_string(v.into_owned()),
                ))
            });
            pairs.push((
                "headers".into(),
                RestrictedExpression::new_record(headers).map_err(|e| e.to_string())?,
            ));
        }
        if a & IP != 0 {
            pairs.push(("ip".into(), ip_expression(r.client_ip)));
        }
        if a & TIME != 0 {
            let secs = seconds(r);
            const DAYS: [&str; 7] = ["thu", "fri", "sat", "sun", "mon", "tue", "wed"];
            let time = RestrictedExpression::new_record([
                (
                    "timestamp".to_string(),
                    RestrictedExpression::new_long(secs as i64),
                ),
                (
                    "hour".to_string(),
                    RestrictedExpression::new_long(((secs / 3600) % 24) as i64),
                ),
                (
                    "weekday".to_string(),
                    RestrictedExpression::new_string(DAYS[((secs / 86400) % 7) as usize].into()),
                ),
            ])
            .map_err(|e| e.to_string())?;
            pairs.push(("time".into(), time));
        }
        if a & TLS != 0 {
            let mut tls = vec![(
                "client_cert".to_string(),
                RestrictedExpression::new_bool(r.tls_client_cert),
            )];
            if let Some(s) = r.tls_client_subject {
                tls.push((
                    "client_subject".into(),
                    RestrictedExpression::new_string(s.into()),
                ));
            }
            pairs.push((
                "tls".into(),
                RestrictedExpression::new_record(tls).map_err(|e| e.to_string())?,
            ));
        }
        if a & REQUEST_ID != 0 {
            pairs.push((
                "request_id".into(),
                RestrictedExpression::new_string(r.request_id.into()),
            ));
        }
        if a & LIMITS != 0 {
            pairs.push(("limits".into(), limits_record(r, tables)?));
        }
        Context::from_pairs(pairs).map_err(|e| e.to_string())
    }
}

/// A stick table as `context.limits` shows it: its name and, per stored counter, the
/// attribute name and the kind (`Kind::Tags` is the set of tags).
pub type ContextTable = (String, Vec<(String, portcullis_limits::Kind)>);

/// `context.limits`: every table, with this request's values, or zeros where the request
/// was not counted (the route does not track the table, or the request lacks its key).
fn limits_record(
    r: &RequestInfo<'_>,
    tables: &[ContextTable],
) -> Result<RestrictedExpression, String> {
    let records = tables.iter().map(|(name, attrs)| {
        let fields = attrs.iter().map(|(attr, kind)| {
            let v = if *kind == portcullis_limits::Kind::Tags {
                let tags = r.limits.map(|l| l.tags(name)).unwrap_or_default();
                RestrictedExpression::new_set(
                    tags.into_iter().map(RestrictedExpression::new_string),
                )
            } else {
                let n = r.limits.and_then(|l| l.value(name, *kind)).unwrap_or(0);
                RestrictedExpression::new_long(i64::try_from(n).unwrap_or(i64::MAX))
            };
            (attr.clone(), v)
        });
        RestrictedExpression::new_record(fields)
            .map(|rec| (name.clone(), rec))
            .map_err(|e| e.to_string())
    });
    let records = records.collect::<Result<Vec<_>, _>>()?;
    RestrictedExpression::new_record(records).map_err(|e| e.to_string())
}

/// A header as `context.headers` holds it: every value the request carries (and the origin
/// receives), joined with `, ` in order, so that a second value cannot hide behind a
/// first; bytes that are not UTF-8 read as U+FFFD rather than leaving the header out.
/// `None` only when the request has no such header.
fn header_text<'h>(
    headers: &'h http::HeaderMap,
    name: &http::HeaderName,
) -> Option<std::borrow::Cow<'h, str>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let text = |v: &'h http::HeaderValue| String::from_utf8_lossy(v.as_bytes());
    let mut out = text(first);
    for v in values {
        let o = out.to_mut();
        o.push_str(", ");
        o.push_str(&text(v));
    }
    Some(out)
}

fn seconds(r: &RequestInfo<'_>) -> u64 {
    // `decide` fills `now` in before the key and the context are built, so both see the
    // same second; the fallback only serves direct callers of this module.
    r.now
        .unwrap_or_else(SystemTime::now)
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `ip("…")` for a client address. Building it makes Cedar parse the extension's name, which
/// costs more than the rest of the context; addresses repeat, so each thread keeps the last
/// ones it built.
fn ip_expression(ip: IpAddr) -> RestrictedExpression {
    const KEEP: usize = 1024;
    thread_local! {
        static MEMO: std::cell::RefCell<HashMap<IpAddr, RestrictedExpression>> =
            std::cell::RefCell::new(HashMap::new());
    }
    MEMO.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(e) = m.get(&ip) {
            return e.clone();
        }
        let e = RestrictedExpression::new_ip(ip.to_string());
        if m.len() >= KEEP {
            m.clear();
        }
        m.insert(ip, e.clone());
        e
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_of(src: &str) -> Use {
        Use::of_policy(&cedar_policy::Policy::parse(None, src).unwrap())
    }

    #[test]
    fn attribute_reads_are_found() {
        let u = use_of(
            r#"permit(principal, action, resource) when { context.path like "/a/*" && context.ip.isInRange(ip("10.0.0.0/8")) };"#,
        );
        assert!(!u.whole);
        assert_eq!(u.attrs, PATH | IP);
        let u = use_of(
            r#"forbid(principal, action, resource) when { context.headers has "x-tenant" && context.headers["x-tenant"] == "b" && context.time.hour < 6 };"#,
        );
        assert_eq!(u.attrs, HEADERS | TIME);
        assert_eq!(u.headers, Some(BTreeSet::from(["x-tenant".to_string()])));
        assert_eq!(u.time, Some(BTreeSet::from(["hour".to_string()])));
        let u = use_of(
            r#"permit(principal, action, resource) when { context has tls.client_subject };"#,
        );
        assert_eq!(u.attrs, TLS);
        let u = use_of(r#"permit(principal, action, resource);"#);
        assert_eq!(u, Use::default());
        let u = use_of(
            r#"permit(principal, action, resource in Portcullis::Route::"a/b") when { resource == Portcullis::Route::"a/b" };"#,
        );
        assert!(u.resource);
        let u = use_of(r#"permit(principal, action, resource == Portcullis::Route::"a/b");"#);
        assert!(!u.resource, "the scope does not need the entity");
    }

    #[test]
    fn whole_uses_are_found() {
        assert!(use_of(r#"permit(principal, action, resource) when { context == {} };"#).whole);
        assert!(
            use_of(r#"permit(principal, action, resource) when { [context].isEmpty() };"#).whole
        );
        let u = use_of(r#"permit(principal, action, resource) when { context.headers == {} };"#);
        assert!(!u.whole);
        assert_eq!((u.attrs, &u.headers), (HEADERS, &None));
        let u = use_of(
            r#"permit(principal, action, resource) when { context.time.hour == 1 && context.time == {timestamp: 1, hour: 1, weekday: "thu"} };"#,
        );
        assert_eq!((u.attrs, &u.time), (TIME, &None));
        let mut m =
            use_of(r#"permit(principal, action, resource) when { context.time.hour == 1 };"#);
        m.merge(&u);
        assert_eq!(m.time, None, "whole wins over members when merged");
    }

    #[test]
    fn plans() {
        let h = [
            http::HeaderName::from_static("x-a"),
            http::HeaderName::from_static("x-b"),
        ];
        let mut u = use_of(
            r#"permit(principal, action, resource) when { context.headers has "x-b" && context.time.weekday == "sun" };"#,
        );
        let p = Plan::new(&u, &h);
        assert_eq!(p.headers, vec![1]);
        assert!(p.time_by_hour && p.cacheable);
        u.merge(&use_of(r#"permit(principal, action, resource) when { context.time.timestamp > 0 && context.request_id == "x" };"#));
        let p = Plan::new(&u, &h);
        assert!(!p.time_by_hour && !p.cacheable);
        assert!(!p.method_only());
        let p = Plan::new(&Use::everything(), &h);
        assert_eq!((p.attrs, p.headers.len(), p.cacheable), (ALL, 2, false));
        assert!(!p.method_only());
    }

    #[test]
    fn method_only_plans_read_nothing_else() {
        let h = [http::HeaderName::from_static("x-a")];
        let plan = |src: &str| Plan::new(&use_of(src), &h);
        assert!(
            plan(r#"permit(principal in Portcullis::Group::"eng", action, resource);"#)
                .method_only()
        );
        assert!(
            plan(r#"permit(principal, action, resource) when { context.method == "GET" };"#)
                .method_only()
        );
        for reads in [
            "context.path == \"/\"",
            "context.query_keys.contains(\"a\")",
            "context.headers has \"x-a\"",
            "context.ip.isLoopback()",
            "context.time.hour == 1",
            "context has tls",
            "context.request_id == \"r\"",
        ] {
            let src = format!("permit(principal, action, resource) when {{ {reads} }};");
            assert!(!plan(&src).method_only(), "{reads}");
        }
    }
}
