//! Stick tables at runtime, HAProxy's `show table` / `set table` / `clear table`: the admin
//! API's table endpoints, the text form of table keys, and a small HTTP client for the
//! `portcullis table` command.
//!
//! Reads (`GET /api/v1/tables...`) change nothing and are not audited, but need the admin
//! token like the rest of the API. Every change is a [`Command`] through [`control::apply`],
//! which validates, audits, applies and logs it.
//!
//! Keys are written as [`crate::table_keys`] says.

use crate::control::table_key;
use crate::control::{self, Command, ControlError, Principal};
use crate::limits::TableRt;
use crate::table_keys::{entry_json, key_to_text, millis, numeric, shorten};
use crate::Runtime;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use portcullis_limits::{Clock, Kind, MonotonicClock};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Entries `GET /api/v1/tables/{name}` lists when `top` is not given.
pub const DEFAULT_TOP: usize = 20;
/// The most entries it lists.
pub const MAX_TOP: usize = 1000;

// ---------------------------------------------------------------------------------------------
// Tables and entries as JSON
// ---------------------------------------------------------------------------------------------

/// What `GET /api/v1/tables` says of one table.
fn table_json(def: &portcullis_config::StickTable, t: &TableRt) -> Value {
    let spec = t.table.spec();
    let key = match &def.key {
        portcullis_config::TableKey::One(p) => json!(p),
        portcullis_config::TableKey::Tuple(v) => json!(v),
    };
    json!({
        "name": t.name,
        "key": key,
        "size": spec.size(),
        "expire": duration_text(spec.expire()),
        "expire_ms": millis(spec.expire()),
        "store": spec.store().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "entries": t.table.len(),
        "memory_bytes": t.table.memory().bytes,
    })
}

/// `10m`, `1h`, `90s`, `1500ms`: the largest unit that divides the duration.
fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= scale && ms / scale * scale == ms {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}

/// The table `name` as the serving config defines it, with its running state.
fn lookup(
    rt: &Runtime,
    name: &str,
) -> Result<(portcullis_config::StickTable, Arc<TableRt>), ControlError> {
    let snap = rt.shared.snapshot.load_full();
    let t = control::find_table(&snap, &rt.shared.limits, name)?;
    let def = snap
        .config
        .stick_tables
        .iter()
        .find(|d| d.name == name)
        .cloned()
        .ok_or_else(|| ControlError::NotFound(format!("no stick table `{name}`")))?;
    Ok((def, t))
}

// ---------------------------------------------------------------------------------------------
// The admin API's table endpoints
// ---------------------------------------------------------------------------------------------

/// The table endpoints, to merge into the admin API before its authentication layer.
pub fn routes() -> Router<Arc<Runtime>> {
    Router::new()
        .route("/api/v1/tables", get(list))
        .route("/api/v1/tables/{name}", get(show).delete(clear_table))
        .route(
            "/api/v1/tables/{name}/entries/{key}",
            get(entry).post(set_entry).delete(clear_entry),
        )
}

/// `GET /api/v1/tables`: every table of the serving config.
async fn list(State(rt): State<Arc<Runtime>>) -> Response {
    let snap = rt.shared.snapshot.load_full();
    let tables: Vec<Value> = snap
        .config
        .stick_tables
        .iter()
        .filter_map(|def| Some(table_json(def, &*rt.shared.limits.get(&def.name)?)))
        .collect();
    Json(json!({ "tables": tables })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopQuery {
    top: Option<usize>,
    by: Option<String>,
}

/// The counter to sort by: `http_req_rate` or `http_req_rate(10s)`; default the table's first
/// numeric counter.
fn sort_kind(t: &TableRt, by: Option<&str>) -> Result<Kind, ControlError> {
    let stored = || {
        numeric(t)
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(by) = by else {
        return numeric(t).next().ok_or_else(|| {
            ControlError::NotStored(format!(
                "stick table `{}` stores no counter to sort its entries by",
                t.name
            ))
        });
    };
    let name = by.split_once('(').map_or(by, |(n, _)| n).trim();
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.name() == name && *k != Kind::Tags)
        .ok_or_else(|| {
            ControlError::Invalid(format!(
                "`by`: `{}` is not a counter to sort by; this table stores {}",
                shorten(by),
                stored()
            ))
        })?;
    if !t.table.spec().stores(kind) {
        return Err(ControlError::NotStored(format!(
            "stick table `{}` does not store `{kind}`; sort by one of {}",
            t.name,
            stored()
        )));
    }
    Ok(kind)
}

/// `GET /api/v1/tables/{name}?top=N&by=C`: the table and its top `N` entries by `C`.
async fn show(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
    q: Result<Query<TopQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return bad_request(format!(
            "the query takes `top` (1..{MAX_TOP}) and `by` (a counter the table stores)"
        ));
    };
    let n = q.top.unwrap_or(DEFAULT_TOP);
    if !(1..=MAX_TOP).contains(&n) {
        return bad_request(format!("`top` must be between 1 and {MAX_TOP}"));
    }
    let listed = match &rt.shared.limits.fleet {
        Some(f) => fleet_top(&rt, f, &name, n, q.by.as_deref(), FLEET_SCAN_MAX).await,
        None => top(&rt, &name, n, q.by.as_deref()),
    };
    match listed {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Keys of one table read from Redis for one listing of the API, at most.
const FLEET_SCAN_MAX: usize = 100_000;

/// In a fleet: the table's top `n` entries across every replica, read from Redis (at most
/// `max_keys` keys), with `conn_cur` from this process. By `conn_cur`, which is per
/// process, the listing is this process's own.
pub(crate) async fn fleet_top(
    rt: &Runtime,
    f: &crate::limits::Fleet,
    name: &str,
    n: usize,
    by: Option<&str>,
    max_keys: usize,
) -> Result<Value, ControlError> {
    let (def, t) = lookup(rt, name)?;
    let kind = sort_kind(&t, by)?;
    if kind == Kind::ConnCur {
        return top(rt, name, n, by);
    }
    let found = f
        .store
        .top(&t.name, t.table.spec(), kind, n, max_keys)
        .await
        .map_err(|e| ControlError::StoreUnavailable(e.to_string()))?;
    let now = MonotonicClock.now();
    let entries: Vec<Value> = found
        .entries
        .iter()
        .map(|(k, shared)| {
            let mut s = shared.clone();
            if let Some(here) = t.table.get(k, now) {
                s.conn_cur = here.conn_cur;
            }
            entry_json(&t, k, &s)
        })
        .collect();
    Ok(json!({
        "table": table_json(&def, &t),
        "by": kind.name(),
        "entries": entries,
        "source": "redis",
        "scanned": found.scanned,
        "truncated": found.truncated,
    }))
}

/// The table `name` with its top `n` entries by the counter `by` (default its first).
pub fn top(rt: &Runtime, name: &str, n: usize, by: Option<&str>) -> Result<Value, ControlError> {
    let (def, t) = lookup(rt, name)?;
    let by = sort_kind(&t, by)?;
    let now = MonotonicClock.now();
    let top = t
        .table
        .top(n, by, now)
        .map_err(|e| ControlError::NotStored(e.to_string()))?;
    let entries: Vec<Value> = top.iter().map(|(k, s)| entry_json(&t, k, s)).collect();
    Ok(json!({ "table": table_json(&def, &t), "by": by.name(), "entries": entries }))
}

/// `GET /api/v1/tables/{name}/entries/{key}`: one entry, 404 when absent.
async fn entry(
    State(rt): State<Arc<Runtime>>,
    Path((name, key)): Path<(String, String)>,
) -> Response {
    let t = match lookup(&rt, &name) {
        Ok((_, t)) => t,
        Err(e) => return e.into_response(),
    };
    let now = MonotonicClock.now();
    let k = match table_key(&t, &key, now) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let local = t.table.get(&k, now);
    // In a fleet the counts and tags are in Redis; `conn_cur` stays in this process.
    let found = match &rt.shared.limits.fleet {
        None => local,
        Some(f) => match f.store.get(&t.name, t.table.spec(), &k).await {
            Ok(shared) => shared.map(|mut s| {
                if let Some(l) = &local {
                    s.conn_cur = l.conn_cur;
                }
                s
            }),
            Err(e) => return ControlError::StoreUnavailable(e.to_string()).into_response(),
        },
    };
    match found {
        Some(s) => {
            let mut e = entry_json(&t, &k, &s);
            e["table"] = json!(t.name);
            Json(e).into_response()
        }
        None => ControlError::NotFound(format!(
            "no entry `{}` in stick table `{}`",
            key_to_text(&t.parts, &k),
            t.name
        ))
        .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryBody {
    gpc0: Option<u64>,
    tag: Option<String>,
    untag: Option<String>,
}

const ENTRY_BODY: &str =
    "body must be JSON with `gpc0` (a number), `tag` and/or `untag` (a tag), like {\"gpc0\": 1}\n";

/// `POST /api/v1/tables/{name}/entries/{key}`: `untag`, then `gpc0`, then `tag`, each one
/// command. All are validated before any is applied; answers the entry after them.
async fn set_entry(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
    Path((table, key)): Path<(String, String)>,
    body: Result<Json<EntryBody>, JsonRejection>,
) -> Response {
    let b = match body {
        Ok(Json(b)) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return crate::admin_body::refused(&e, ENTRY_BODY)
        }
        Err(_) => return bad_request(ENTRY_BODY.trim_end().to_string()),
    };
    let mut cmds = Vec::new();
    if let Some(tag) = b.untag {
        cmds.push(Command::RemoveTableTag {
            table: table.clone(),
            key: key.clone(),
            tag,
        });
    }
    if let Some(value) = b.gpc0 {
        cmds.push(Command::SetTableGpc {
            table: table.clone(),
            key: key.clone(),
            value,
        });
    }
    if let Some(tag) = b.tag {
        cmds.push(Command::SetTableTag {
            table: table.clone(),
            key: key.clone(),
            tag,
        });
    }
    if cmds.is_empty() {
        return bad_request(ENTRY_BODY.trim_end().to_string());
    }
    {
        let snap = rt.shared.snapshot.load_full();
        for c in &cmds {
            if let Err(e) = control::resolve(&snap, &rt.shared.limits, c.clone()) {
                return e.into_response();
            }
        }
    }
    let mut last = Value::Null;
    for c in cmds {
        match control::apply(&rt, &by, c).await {
            Ok(v) => last = v,
            Err(e) => return e.into_response(),
        }
    }
    if last.is_null() {
        return ControlError::NotFound(format!("no entry `{key}` in stick table `{table}`"))
            .into_response();
    }
    Json(last).into_response()
}

/// `DELETE /api/v1/tables/{name}/entries/{key}`: forgets the entry (204, present or not).
async fn clear_entry(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
    Path((table, key)): Path<(String, String)>,
) -> Response {
    no_content(control::apply(&rt, &by, Command::ClearTableKey { table, key }).await)
}

/// `DELETE /api/v1/tables/{name}`: forgets every entry (204).
async fn clear_table(
    State(rt): State<Arc<Runtime>>,
    axum::Extension(by): axum::Extension<Principal>,
    Path(table): Path<String>,
) -> Response {
    no_content(control::apply(&rt, &by, Command::ClearTable { table }).await)
}

fn no_content(r: Result<Value, ControlError>) -> Response {
    match r {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response()
}

// ---------------------------------------------------------------------------------------------
// A client of the admin API, for `portcullis table`
// ---------------------------------------------------------------------------------------------

/// A plain-HTTP client of the admin API (the admin listener has no TLS): one request per
/// connection, with the bearer token.
pub mod client {
    use bytes::Bytes;
    use http::{header, Method, Request, Uri};
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use std::time::Duration;

    /// How long one call may take, connect to last byte.
    pub const TIMEOUT: Duration = Duration::from_secs(30);

    /// Percent-encodes `s` as one path segment (everything but unreserved characters).
    pub fn segment(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// Sends `method path` (path and query, starting with `/`) to the admin API at `base`
    /// (`http://host:port`, with an optional path prefix), with `body` as JSON. Returns the
    /// status and the body as text.
    pub async fn call(
        base: &str,
        token: &str,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), String> {
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("admin URL `{base}`: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(s) => {
                return Err(format!(
                    "admin URL `{base}`: scheme `{s}` is not supported; the admin listener \
                     speaks plain HTTP (`http://127.0.0.1:9901`)"
                ))
            }
            None => return Err(format!("admin URL `{base}`: give it as `http://host:port`")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("admin URL `{base}` has no host"))?
            .clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let prefix = uri.path().trim_end_matches('/');
        let target = format!("{prefix}{path}");
        let payload = match body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(&target)
            .header(header::HOST, authority.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(payload))
            .map_err(|e| format!("request: {e}"))?;
        let exchange = async {
            let stream = tokio::net::TcpStream::connect((host, port))
                .await
                .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("{authority}: {e}"))?;
            let conn = tokio::spawn(conn);
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("{authority}: {e}"))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{authority}: {e}"))?
                .to_bytes();
            conn.abort();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("{authority}: no answer within {}s", TIMEOUT.as_secs()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Part;
    use crate::limits::{build_key, KeyFacts};
    use crate::table_keys::*;
    use http::{HeaderMap, HeaderName, HeaderValue};
    use portcullis_identity::{AuthMethod, Identity};
    use portcullis_limits::{Key, Moment};

    fn parts(ps: &[&str]) -> Vec<Part> {
        ps.iter().map(|p| Part::parse(p).unwrap()).collect()
    }

    fn alice() -> Identity {
        Identity {
            provider: "dev".into(),
            method: AuthMethod::Jwt,
            subject: "alice".into(),
            user: "alice".into(),
            email: None,
            groups: vec![],
            claims: json!({ "org": { "id": "acme" }, "n": 7 }),
            expires_at: None,
        }
    }

    /// The key `build_key` makes for a client at `ip` with header `x-tenant: tenant`.
    fn built(ps: &[Part], ip: &str, tenant: &[u8]) -> Key {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("x-tenant"),
            HeaderValue::from_bytes(tenant).unwrap(),
        );
        let id = alice();
        let f = KeyFacts {
            ip: ip.parse().unwrap(),
            identity: Some(&id),
            route: "default/app",
            headers: &headers,
            trusted: true,
        };
        build_key(ps, &f).unwrap()
    }

    #[test]
    fn keys_read_as_text_and_back() {
        let cases: &[(&[&str], &str, &[u8], &str)] = &[
            (&["src"], "192.0.2.7", b"t", "192.0.2.7"),
            (&["src"], "2001:db8::1", b"t", "2001:db8::1"),
            (&["src/24"], "192.0.2.77", b"t", "192.0.2.0/24"),
            (
                &["src/64"],
                "2001:db8:1:2:3:4:5:6",
                b"t",
                "2001:db8:1:2::/64",
            ),
            // An IPv4 client keeps its 32 bits under a longer prefix.
            (&["src/64"], "192.0.2.7", b"t", "192.0.2.7"),
            (&["principal"], "192.0.2.7", b"t", "dev/alice"),
            (&["route"], "192.0.2.7", b"t", "default/app"),
            (&["claim:org.id"], "192.0.2.7", b"t", "acme"),
            (&["claim:n"], "192.0.2.7", b"t", "7"),
            (&["header:x-tenant"], "192.0.2.7", b"acme", "acme"),
            (&["header:x-tenant"], "192.0.2.7", b"", "\"\""),
            (&["header:x-tenant"], "192.0.2.7", b"0xcafe", "\"0xcafe\""),
            (&["header:x-tenant"], "192.0.2.7", b"[x]", "\"[x]\""),
            (
                &["header:x-tenant"],
                "192.0.2.7",
                b"sha256:ab",
                "\"sha256:ab\"",
            ),
            (
                &["header:x-tenant"],
                "192.0.2.7",
                b"a \"b\" | c",
                "a \"b\" | c",
            ),
            // Not UTF-8: the bytes.
            (&["header:x-tenant"], "192.0.2.7", b"caf\xe9", "0x636166e9"),
            (
                &["src", "header:x-tenant"],
                "192.0.2.7",
                b"acme",
                r#"["192.0.2.7","acme"]"#,
            ),
            (
                &["src/24", "principal"],
                "192.0.2.7",
                b"t",
                r#"["192.0.2.0/24","dev/alice"]"#,
            ),
            (
                &["header:x-tenant", "src"],
                "2001:db8::1f",
                b"a,b",
                r#"["a,b","2001:db8::1f"]"#,
            ),
            // An address whose octets hold the separator byte, then a text part.
            (
                &["src", "header:x-tenant"],
                "31.31.31.31",
                b"x",
                r#"["31.31.31.31","x"]"#,
            ),
            (
                &["src", "route"],
                "2001:db8:1f1f::1f",
                b"x",
                r#"["2001:db8:1f1f::1f","default/app"]"#,
            ),
        ];
        for (ps, ip, tenant, text) in cases {
            let ps = parts(ps);
            let key = built(&ps, ip, tenant);
            assert_eq!(key_to_text(&ps, &key), *text, "{ps:?} {ip}");
            assert_eq!(key_from_text(&ps, text).as_ref(), Ok(&key), "{text}");
            // And the raw bytes name the same key.
            let raw = format!("0x{}", hex(key.as_bytes()));
            assert_eq!(key_from_text(&ps, &raw).as_ref(), Ok(&key), "{raw}");
        }
    }

    #[test]
    fn other_spellings_name_the_same_key() {
        let src24 = parts(&["src/24"]);
        let want = key_from_text(&src24, "192.0.2.0/24").unwrap();
        for t in [
            "192.0.2.99",
            "192.0.2.99/24",
            " 192.0.2.0 /24",
            "\"192.0.2.0/24\"",
            "[\"192.0.2.1\"]",
        ] {
            assert_eq!(key_from_text(&src24, t).as_ref(), Ok(&want), "{t}");
        }
        let src = parts(&["src"]);
        assert_eq!(
            key_from_text(&src, "192.0.2.7/32").unwrap(),
            key_from_text(&src, "192.0.2.7").unwrap()
        );
        // The IPv4-mapped spelling (from dual-stack tools) is the IPv4 client's key.
        for t in ["::ffff:192.0.2.7", "::FFFF:c000:207"] {
            assert_eq!(
                key_from_text(&src, t).unwrap(),
                key_from_text(&src, "192.0.2.7").unwrap(),
                "{t}"
            );
        }
        assert_eq!(key_from_text(&src24, "::ffff:192.0.2.99").unwrap(), want);
        let tenant = parts(&["header:x-tenant"]);
        assert_eq!(
            key_from_text(&tenant, "\"acme\"").unwrap(),
            Key::from("acme")
        );
    }

    #[test]
    fn bad_keys_say_what_to_write() {
        let err = |ps: &[&str], t: &str| key_from_text(&parts(ps), t).unwrap_err();
        assert!(err(&["src"], "nope").contains("not an IP address"));
        assert!(err(&["src/24"], "192.0.2.0/16").contains("keyed by `src/24`"));
        assert!(err(&["src"], "192.0.2.0/24").contains("keyed by `src`"));
        let e = err(&["src", "header:x-tenant"], "192.0.2.7,acme");
        assert!(e.contains("JSON array of 2 strings"), "{e}");
        assert!(e.contains("src, header:x-tenant"), "{e}");
        assert!(err(&["src", "route"], r#"["192.0.2.7"]"#).contains("JSON array of 2"));
        assert!(err(&["principal"], "0xzz").contains("quote it as a JSON string"));
        assert!(err(&["principal"], "sha256:00").contains("hashed key"));
        let hashed = format!("sha256:{}", "ab".repeat(22));
        assert!(err(&["principal"], &hashed).contains("already in a table"));
        assert!(err(&["principal"], "\"unterminated").contains("not a JSON string"));
    }

    #[test]
    fn long_keys_are_shown_by_their_digest() {
        let ps = parts(&["header:x-tenant"]);
        let long = "x".repeat(300);
        let key = key_from_text(&ps, &long).unwrap();
        assert!(key.is_hashed());
        let text = key_to_text(&ps, &key);
        assert_eq!(text, key.to_string());
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 44,
            "{text}"
        );
        assert_eq!(
            parse_key(&ps, &text),
            Ok(KeyText::Hashed(key.as_bytes().to_vec()))
        );
    }

    #[test]
    fn a_hashed_key_is_found_in_its_table() {
        let def: portcullis_config::StickTable = serde_json::from_value(json!({
            "name": "t", "key": "header:x-tenant", "size": 100, "store": ["http_req_cnt"]
        }))
        .unwrap();
        let reg = crate::limits::Registry::default();
        let t = reg.table(&def).unwrap();
        let now = Moment::ZERO;
        let long = Key::new(&[b'y'; 400]);
        t.table.record_request(&long, now);
        t.table.record_request(&Key::from("short"), now);
        let text = key_to_text(&t.parts, &long);
        assert_eq!(table_key(&t, &text, now).unwrap(), long);
        let other = format!("sha256:{}", "00".repeat(22));
        let e = table_key(&t, &other, now).unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_FOUND, "{e}");
        assert_eq!(table_key(&t, "short", now).unwrap(), Key::from("short"));
    }

    #[test]
    fn durations_and_segments_are_written_plainly() {
        assert_eq!(duration_text(Duration::from_secs(600)), "10m");
        assert_eq!(duration_text(Duration::from_secs(90)), "90s");
        assert_eq!(duration_text(Duration::from_secs(7200)), "2h");
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(client::segment("192.0.2.0/24"), "192.0.2.0%2F24");
        assert_eq!(client::segment(r#"["a","b"]"#), "%5B%22a%22%2C%22b%22%5D");
    }
}
