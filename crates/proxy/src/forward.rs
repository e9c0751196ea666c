//! The request path: check the request, route it, pick a server, forward it over a pooled
//! connection with retries and timeouts, and stream the response back. Every failure becomes
//! a short, clear response (400, 404, 413, 502, 503, 504); nothing on this path panics on
//! client input.

use crate::body::{
    empty, full, ClientBody, Limited, OnDone, Prepend, ReqBody, RespBody, TooLarge, Tracked,
};
use crate::canon::{target, Refusal, Target};
use crate::conn::ConnInfo;
use crate::identify::cookie;
use crate::pool::{ConnectError, Sender};
use crate::record::{status_class, AccessRecord};
use crate::snapshot::{BackendRt, RouteRt, Snapshot};
use crate::state::ServerState;
use crate::Shared;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use portcullis_config::EscapedSlashes;
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn is_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
        || n == header::PROXY_AUTHENTICATE
        || n == header::PROXY_AUTHORIZATION
        || n == header::TE
        || n == header::TRAILER
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
fn strip_hop_by_hop(h: &mut HeaderMap, keep_te_trailers: bool) {
    // Fast path: one pass over the names, no hashing; most messages carry none.
    if !h.keys().any(is_hop) {
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let te_trailers = keep_te_trailers
        && h.get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn local(status: StatusCode, msg: &'static str, rid: &str) -> Response<RespBody> {
    let mut r = Response::new(full(Bytes::from_static(msg.as_bytes())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(rid) {
        h.insert(X_REQUEST_ID.clone(), v);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// A request id, kept as the header value sent upstream and to the client; read as text
/// where it is logged or written into a record.
struct Rid(HeaderValue);

impl std::ops::Deref for Rid {
    type Target = str;
    fn deref(&self) -> &str {
        // Only ASCII is ever stored (a UUID, or a checked propagated id).
        std::str::from_utf8(self.0.as_bytes()).unwrap_or("")
    }
}

impl std::fmt::Display for Rid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// A new request id: a random UUID, formatted without an intermediate string.
fn new_rid() -> Rid {
    let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
    let s = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
    Rid(HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid")))
}

struct Ctx {
    start: Instant,
    /// Whether an access log is being written (if not, the record's strings stay empty).
    log: bool,
    rid: Rid,
    record: AccessRecord,
    /// A refreshed session cookie to set on the response.
    set_cookie: Option<HeaderValue>,
}

/// The entry point for every proxied request.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let snap = shared.snapshot.load_full();
    let start = Instant::now();
    let trusted =
        !snap.trusted.is_empty() && snap.trusted.iter().any(|n| n.contains(&conn.peer.ip()));
    let rid = match req.headers().get(&X_REQUEST_ID) {
        Some(v) if trusted && valid_request_id(v) => Rid(v.clone()),
        _ => new_rid(),
    };
    // The access record's strings are only built when there is an access log to write.
    let log = shared.access.enabled();
    let mut ctx = Ctx {
        start,
        log,
        record: if log {
            AccessRecord {
                request_id: rid.to_string(),
                listener: conn.listener.to_string(),
                client: conn.peer.ip().to_string(),
                method: req.method().as_str().to_string(),
                path: req.uri().path().to_string(),
                protocol: match req.version() {
                    Version::HTTP_2 => "HTTP/2",
                    Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                },
                ..Default::default()
            }
        } else {
            AccessRecord::default()
        },
        rid,
        set_cookie: None,
    };
    let resp = proxy(&shared, &snap, &conn, trusted, req, &mut ctx).await;
    match resp {
        Ok(r) => r,
        Err((status, msg, route)) => {
            let r = local(status, msg, &ctx.rid);
            if let Some(route) = route {
                route.by_class[status_class(status.as_u16())].inc();
            }
            finish_log(
                &shared,
                ctx.record,
                ctx.start,
                status.as_u16(),
                0,
                Some(msg.trim_end().to_string()),
            );
            r
        }
    }
}

fn finish_log(
    shared: &Shared,
    mut rec: AccessRecord,
    start: Instant,
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

type Fail<'a> = (StatusCode, &'static str, Option<&'a RouteRt>);

/// Counts and logs a request refused at the edge for its form, and the answer it gets.
fn refuse(shared: &Shared, conn: &ConnInfo, r: Refusal) -> Fail<'static> {
    refuse_with(
        shared,
        conn,
        r.reason(),
        StatusCode::BAD_REQUEST,
        r.message(),
    )
}

fn refuse_with(
    shared: &Shared,
    conn: &ConnInfo,
    reason: &'static str,
    status: StatusCode,
    msg: &'static str,
) -> Fail<'static> {
    shared
        .metrics
        .refuse(&conn.listener, conn.peer.ip(), reason);
    (status, msg, None)
}

/// The host a request names. HTTP/2's `:authority`, and the authority of an HTTP/1
/// absolute-form target, win over the `Host` header (RFC 9112 §3.2.2), so routing and
/// forwarding agree on one host; HTTP/1.1 still requires a `Host` header. Empty when an
/// HTTP/1.0 request names none.
fn request_host(parts: &http::request::Parts) -> Result<HeaderValue, Fail<'static>> {
    if parts.headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err((StatusCode::BAD_REQUEST, "more than one Host header\n", None));
    }
    match parts.uri.authority() {
        Some(a)
            if parts.version != Version::HTTP_11 || parts.headers.contains_key(header::HOST) =>
        {
            HeaderValue::from_str(a.as_str())
                .map_err(|_| (StatusCode::BAD_REQUEST, "invalid Host header\n", None))
        }
        _ => match parts.headers.get(header::HOST) {
            Some(h) => Ok(h.clone()),
            None if parts.version == Version::HTTP_11 => {
                Err((StatusCode::BAD_REQUEST, "missing Host header\n", None))
            }
            None => Ok(HeaderValue::from_static("")),
        },
    }
}

fn head_size(parts: &http::request::Parts) -> u64 {
    crate::canon::head_size(&parts.method, &parts.uri, &parts.headers)
}

/// The path with its kept encoded slashes decoded, for a route that says `decode`. The
/// decoded path must route to the same route, or an encoded slash could have steered the
/// request past the route that the origin will serve.
fn decode_for_route(
    snap: &Snapshot,
    conn: &ConnInfo,
    parts: &http::request::Parts,
    host: &str,
    path: &str,
    idx: usize,
) -> Result<String, Refusal> {
    let d = crate::canon::path(path, conn.rules.merge_slashes, EscapedSlashes::Decode)?
        .path
        .into_owned();
    let again = snap.router.route(
        host,
        &crate::canon::match_path(&d),
        &parts.method,
        &parts.headers,
        &conn.listener,
    );
    if again != Some(idx) {
        return Err(Refusal::EscapedSlash);
    }
    Ok(d)
}

/// Applies the route's (or else the listener's) method-override rule.
fn method_override(
    route: &RouteRt,
    conn: &ConnInfo,
    headers: &mut HeaderMap,
) -> Result<Option<Method>, Refusal> {
    let mode = route.method_override.unwrap_or(conn.rules.method_override);
    crate::canon::method_override(headers, mode)
}

/// The upgrade a request asks for that its route (or else its listener) allows.
fn requested_upgrade(
    parts: &http::request::Parts,
    route: &RouteRt,
    conn: &ConnInfo,
) -> Option<crate::upgrade::Upgrade> {
    if parts.version != Version::HTTP_11 || !parts.headers.contains_key(header::UPGRADE) {
        return None;
    }
    let allowed = route.upgrades.as_deref().unwrap_or(&conn.rules.upgrades);
    crate::upgrade::requested(parts.version, &parts.headers, allowed)
}

/// A gRPC request, whose trailers are part of the protocol.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The answer to a 101 that may not open a tunnel (see `upgrade`): 502, and the client
/// connection closes, so nothing it sends next is read as a tunnel's bytes.
fn bad_upgrade(
    shared: &Shared,
    conn: &ConnInfo,
    route: &RouteRt,
    ctx: &mut Ctx,
) -> Response<RespBody> {
    shared
        .metrics
        .refuse(&conn.listener, conn.peer.ip(), "upgrade_response");
    tracing::warn!(request_id = %ctx.rid, route = %route.id, "origin answered 101 with a protocol or handshake that was not asked for; refused");
    route.by_class[status_class(502)].inc();
    finish_log(
        shared,
        std::mem::take(&mut ctx.record),
        ctx.start,
        502,
        0,
        Some("invalid upgrade response".into()),
    );
    let mut r = local(
        StatusCode::BAD_GATEWAY,
        "invalid upgrade response\n",
        &ctx.rid,
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn proxy<'a>(
    shared: &Arc<Shared>,
    snap: &'a Arc<Snapshot>,
    conn: &ConnInfo,
    trusted: bool,
    req: Request<Incoming>,
    ctx: &mut Ctx,
) -> Result<Response<RespBody>, Fail<'a>> {
    let (mut parts, body) = req.into_parts();

    // Request smuggling guard: hyper accepts both headers (dropping Content-Length and
    // using chunked); we refuse. See `smuggle` for how the dropped header is noticed.
    let conflict = conn.smuggle.next_request_conflicts();
    if conflict
        || (parts.headers.contains_key(header::TRANSFER_ENCODING)
            && parts.headers.contains_key(header::CONTENT_LENGTH))
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "conflicting Content-Length and Transfer-Encoding\n",
            None,
        ));
    }
    if parts.version != Version::HTTP_2 && head_size(&parts) > conn.rules.max_header_size {
        return Err(refuse_with(
            shared,
            conn,
            "header_size",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header section too large\n",
        ));
    }
    // portcullis is no forward proxy: a CONNECT tunnel would carry requests that no route
    // or policy sees.
    if parts.method == Method::CONNECT {
        return Err(refuse_with(
            shared,
            conn,
            "connect",
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported\n",
        ));
    }
    // The one canonical form of the target that everything after this sees.
    let raw_host = request_host(&parts)?;
    let Target { host, path, query } =
        target(&parts.uri, &raw_host, &conn.rules).map_err(|r| refuse(shared, conn, r))?;
    let host_name: &str = host.as_ref().map_or("", |h| &h.name);
    if ctx.log {
        ctx.record.host = host_name.to_string();
        ctx.record.path = path.path.to_string();
    }
    let path_str: &str = &path.path;
    let authority: Option<&HeaderValue> = host.as_ref().map(|h| &h.authority);
    let authority_str = authority.and_then(|a| a.to_str().ok()).unwrap_or("");

    if path_str.starts_with("/.portcullis/") || path_str == "/.well-known/portcullis/jwks.json" {
        let r = crate::identify::endpoints(
            snap,
            conn,
            &parts.headers,
            path_str,
            query.unwrap_or(""),
            authority_str,
        )
        .await;
        if let Some(r) = r {
            finish_log(
                shared,
                std::mem::take(&mut ctx.record),
                ctx.start,
                r.status().as_u16(),
                0,
                None,
            );
            return Ok(r);
        }
    }
    let matched = crate::canon::match_path(path_str);
    let Some(idx) = snap.router.route(
        host_name,
        &matched,
        &parts.method,
        &parts.headers,
        &conn.listener,
    ) else {
        return Err((StatusCode::NOT_FOUND, "no route\n", None));
    };
    // An encoded slash was kept opaque for routing; the route decides what it gets.
    let mut decoded = None;
    if path.escaped_slash {
        match snap.routes[idx]
            .escaped_slashes
            .unwrap_or(conn.rules.escaped_slashes)
        {
            EscapedSlashes::Keep => {}
            EscapedSlashes::Reject => {
                return Err(refuse(shared, conn, Refusal::EscapedSlash));
            }
            EscapedSlashes::Decode => {
                let d = decode_for_route(snap, conn, &parts, host_name, path_str, idx)
                    .map_err(|r| refuse(shared, conn, r))?;
                if ctx.log {
                    ctx.record.path = d.clone();
                }
                decoded = Some(d);
            }
        }
    }
    let path_str: &str = decoded.as_deref().unwrap_or(path_str);
    let route = &snap.routes[idx];
    let backend = &route.backend;
    if ctx.log {
        ctx.record.route = route.id.to_string();
        ctx.record.backend = backend.id.clone();
    }
    // The method that policy, audit and the log see: the request's own, or an override.
    let overridden = method_override(route, conn, &mut parts.headers)
        .map_err(|r| (refuse(shared, conn, r).0, r.message(), Some(route)))?;
    let method: &Method = overridden.as_ref().unwrap_or(&parts.method);
    if ctx.log && overridden.is_some() {
        ctx.record.method = method.as_str().to_string();
    }
    // What the origin is sent as the target: the canonical path and the query as sent.
    let pq: std::borrow::Cow<'_, str> =
        if decoded.is_none() && matches!(path.path, std::borrow::Cow::Borrowed(_)) {
            std::borrow::Cow::Borrowed(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
        } else {
            std::borrow::Cow::Owned(match query {
                Some(q) => format!("{path_str}?{q}"),
                None => path_str.to_string(),
            })
        };
    let pq: &str = &pq;
    // Upgrades the route allows, read before hop-by-hop headers go; then they go, before
    // anything portcullis adds, so that `Connection` cannot name a header portcullis sets.
    let upgrade = requested_upgrade(&parts, route, conn);
    let h2_up = backend.connector.protocol == portcullis_config::Protocol::Http2;
    strip_hop_by_hop(&mut parts.headers, h2_up);

    // Identify before anything reaches an origin.
    match crate::identify::identify(
        snap,
        route,
        conn,
        &mut parts.headers,
        method,
        authority_str,
        pq,
        &ctx.rid,
        ctx.start,
    )
    .await
    {
        crate::identify::Step::Continue {
            identity,
            set_cookie,
            remembered,
        } => {
            ctx.set_cookie = set_cookie;
            if let Some(id) = &identity {
                if ctx.log {
                    ctx.record.user = id.user.clone();
                }
                if ctx.log {
                    ctx.record.provider = id.provider.clone();
                }
                let out = crate::authorize::authorize(
                    snap,
                    route,
                    conn,
                    id,
                    method,
                    host_name,
                    path_str,
                    query,
                    &parts.headers,
                    &ctx.rid,
                    shared.audit.is_some(),
                    remembered,
                )
                .await;
                ctx.record.decision = out.decision;
                let facts = crate::audit::Facts {
                    request_id: &ctx.rid,
                    app: &route.app,
                    route: &route.id,
                    conn,
                    method: method.as_str(),
                    host: host_name,
                    path: path_str,
                    query,
                };
                if !crate::audit::write_with(shared, || crate::audit::decision(&facts, id, &out))
                    .await
                {
                    return Err((
                        StatusCode::SERVICE_UNAVAILABLE,
                        "audit trail unavailable\n",
                        Some(route),
                    ));
                }
                if !out.pass {
                    let reason = format!(
                        "{} for {}: {}",
                        out.decision,
                        id.user,
                        out.reasons.join(", ")
                    );
                    tracing::info!(target: "portcullis::auth", request_id = %ctx.rid, route = %route.id, user = %id.user, reasons = ?out.reasons, "request denied by policy");
                    route.by_class[status_class(403)].inc();
                    finish_log(
                        shared,
                        std::mem::take(&mut ctx.record),
                        ctx.start,
                        403,
                        0,
                        Some(reason),
                    );
                    return Ok(crate::identify::forbidden(&ctx.rid));
                }
                if out.decision == "would_deny" {
                    tracing::info!(target: "portcullis::auth", request_id = %ctx.rid, route = %route.id, user = %id.user, reasons = ?out.reasons, "shadow mode: request would be denied");
                }
                for (k, v) in out.add_headers {
                    // An authorizer may add context, never overwrite identity or credentials.
                    if snap.strip_headers.contains(&k)
                        || k == header::AUTHORIZATION
                        || k == header::COOKIE
                        || k == X_FORWARDED_FOR
                        || k == X_REQUEST_ID
                    {
                        continue;
                    }
                    parts.headers.insert(k, v);
                }
            }
        }
        crate::identify::Step::Respond(r, reason) => {
            let facts = crate::audit::Facts {
                request_id: &ctx.rid,
                app: &route.app,
                route: &route.id,
                conn,
                method: method.as_str(),
                host: host_name,
                path: path_str,
                query,
            };
            // Like a decision, a refusal is only answered once it is recorded.
            if !crate::audit::write_with(shared, || crate::audit::auth_failure(&facts, &reason))
                .await
            {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit trail unavailable\n",
                    Some(route),
                ));
            }
            let status = r.status().as_u16();
            tracing::info!(target: "portcullis::auth", request_id = %ctx.rid, route = %route.id, status, %reason, "request refused by identity");
            route.by_class[status_class(status)].inc();
            finish_log(
                shared,
                std::mem::take(&mut ctx.record),
                ctx.start,
                status,
                0,
                Some(reason),
            );
            return Ok(r);
        }
    }

    if let Some(limit) = route.max_body {
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large\n",
                Some(route),
            ));
        }
    }

    let client_upgrade = if upgrade.is_some() {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };

    // Build the upstream head: hop-by-hop headers went before identify added its own.
    let mut headers = std::mem::take(&mut parts.headers);
    crate::identify::strip_own_cookies(snap, &mut headers);
    headers.remove(header::EXPECT);
    if let Some(u) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u.protocols.clone());
    }
    if !trusted {
        // Other ways of claiming a client address are only believed from trusted proxies.
        headers.remove(header::FORWARDED);
        headers.remove(HeaderName::from_static("x-real-ip"));
    }
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if trusted => HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok(),
        _ => Some(conn.peer_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
    }
    let keep_forwarded_host = trusted && headers.contains_key(&X_FORWARDED_HOST);
    if let (Some(a), false) = (authority, keep_forwarded_host) {
        headers.insert(X_FORWARDED_HOST.clone(), a.clone());
    }
    headers.insert(X_REQUEST_ID.clone(), ctx.rid.0.clone());
    let authority = match (&backend.host, authority) {
        (Some(h), _) => h.clone(),
        (None, Some(a)) => a.clone(),
        (None, None) => HeaderValue::from_static("localhost"),
    };
    // HTTP/1.1 upstreams get the origin-form target (`pq`) written as is; h2 needs a URI.
    let h2_uri: Option<Uri> = if h2_up {
        headers.remove(header::HOST);
        let scheme = if backend.connector.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let uri = format!(
            "{scheme}://{}{pq}",
            authority.to_str().unwrap_or("localhost")
        )
        .parse()
        .map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                "invalid request target\n",
                Some(route),
            )
        })?;
        Some(uri)
    } else {
        headers.insert(header::HOST, authority);
        None
    };

    let method = parts.method.clone();
    let idempotent = matches!(
        method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let body_empty = body.is_end_stream();
    let chunked =
        !body_empty && parts.version != Version::HTTP_2 && body.size_hint().exact().is_none();
    let replayable = body_empty && (idempotent || route.retry_non_idempotent);
    // A request without a body (most GETs) skips the limit and byte count.
    let seen = (!body_empty).then(|| Arc::new(AtomicU64::new(0)));
    let mut body: Option<ReqBody> = Some(match &seen {
        Some(seen) => {
            let trailers = if route.request_trailers || is_grpc(&headers) {
                crate::body::Trailers::Keep(snap.strip_headers.clone())
            } else {
                crate::body::Trailers::Drop
            };
            Limited::new(body, route.max_body, seen.clone(), trailers).boxed_unsync()
        }
        None => empty_req_body(),
    });
    // A chunked HTTP/1 body is checked before a server is picked: a malformed (or oversized)
    // first chunk gets 400 (or 413) here, and never reaches an origin.
    if chunked {
        if let Some(mut b) = body.take() {
            body = Some(match b.frame().await {
                None => empty_req_body(),
                Some(Ok(f)) => Prepend::new(f, b).boxed_unsync(),
                Some(Err(e)) if e.is::<TooLarge>() => {
                    return Err((
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "request body too large\n",
                        Some(route),
                    ));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "invalid request body");
                    return Err((
                        StatusCode::BAD_REQUEST,
                        "invalid request body\n",
                        Some(route),
                    ));
                }
            });
        }
    }

    // Hash key and sticky server.
    let key = backend
        .balancer
        .hash_on()
        .map(|on| hash_key(on, &headers, conn, pq));
    let sticky = backend.sticky_cookie.as_ref().and_then(|name| {
        let id = cookie(&headers, name)?;
        backend.servers.iter().position(|s| s.sticky_id == id)
    });

    backend.in_flight.fetch_add(1, Ordering::Relaxed);
    let _inflight = Decr(backend.in_flight.clone());
    let deadline = route.timeout.map(|t| ctx.start + t);
    let per_try = backend
        .retries
        .per_try_timeout
        .map_or(backend.response_timeout, |p| {
            p.0.min(backend.response_timeout)
        });

    let mut tried: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
    let mut attempts = 0u32;
    // This request's place in the retry budget while a retry of it is outstanding.
    let mut retry_slot: Option<Decr> = None;
    let mut connect_ms = 0.0;
    loop {
        attempts += 1;
        ctx.record.attempts = attempts;
        let pick = match sticky {
            Some(i) if attempts == 1 && backend.slots[i].state.available_sticky() => Some(i),
            _ => {
                // A server at max_connections is passed over while another has room: the
                // queue is for when every server is full.
                let full: Vec<usize> = (0..backend.servers.len())
                    .filter(|&i| {
                        backend.servers[i].max_connections.is_some()
                            && backend.slots[i]
                                .state
                                .gate
                                .lock()
                                .as_ref()
                                .is_some_and(|(_, sem)| sem.available_permits() == 0)
                    })
                    .collect();
                if full.is_empty() {
                    backend.balancer.pick(&backend.slots, key, &tried)
                } else {
                    let avoid: Vec<usize> = tried.iter().chain(&full).copied().collect();
                    backend.balancer.pick(&backend.slots, key, &avoid)
                }
            }
        };
        let Some(si) = pick else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "no server available\n",
                Some(route),
            ));
        };
        tried.push(si);
        let server = &backend.servers[si];
        let state = &backend.slots[si].state;
        if ctx.log {
            ctx.record.server = server.name.clone();
        }

        // HAProxy's maxconn: wait in the queue for a slot, up to queue_timeout.
        let permit = match state.gate_for(server.max_connections) {
            None => None,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    state.queued.fetch_add(1, Ordering::Relaxed);
                    let r = tokio::time::timeout(backend.queue_timeout, sem.acquire_owned()).await;
                    state.queued.fetch_sub(1, Ordering::Relaxed);
                    match r {
                        Ok(Ok(p)) => Some(p),
                        _ => {
                            return Err((
                                StatusCode::SERVICE_UNAVAILABLE,
                                "queue timeout\n",
                                Some(route),
                            ))
                        }
                    }
                }
            },
        };
        state.active.fetch_add(1, Ordering::Relaxed);
        state.total.fetch_add(1, Ordering::Relaxed);
        let active = ActiveGuard {
            state: state.clone(),
            permit,
        };

        if server.echo {
            let mut req = Request::new(attempt_body(&mut body, replayable, attempts));
            *req.method_mut() = method.clone();
            *req.uri_mut() = match &h2_uri {
                Some(u) => u.clone(),
                None => pq.parse().unwrap_or_default(),
            };
            *req.headers_mut() = headers.clone();
            let resp = crate::echo::respond(req, &ctx.rid).await;
            return Ok(respond(
                shared, route, backend, si, resp, active, ctx, connect_ms, false,
            ));
        }

        // Connect (nothing has been sent yet, so a failure here is always safe to retry).
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let checkout = match state
            .pool
            .checkout(&server.address, &backend.connector)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                drop(active);
                let timeout = matches!(e, ConnectError::Timeout);
                tracing::debug!(server = %server.address, error = %e, "upstream connect failed");
                note_outcome(backend, si, false, true);
                if backend.retry_connect
                    && may_retry(backend, attempts, deadline, &mut retry_slot).await
                {
                    continue;
                }
                return Err(if timeout {
                    (
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream connect timeout\n",
                        Some(route),
                    )
                } else {
                    (
                        StatusCode::BAD_GATEWAY,
                        "upstream connect failed\n",
                        Some(route),
                    )
                });
            }
        };
        if !checkout.reused {
            backend
                .connect_hist
                .observe(checkout.connect_time.as_secs_f64());
            connect_ms = checkout.connect_time.as_secs_f64() * 1000.0;
        }
        ctx.record.connect_ms = connect_ms;

        let try_timeout = remaining.map_or(per_try, |r| r.min(per_try));
        let req_body = attempt_body(&mut body, replayable, attempts);
        let result = match checkout.sender {
            Sender::H1(c) => {
                let f = c.send(&method, pq, &headers, req_body, state.pool.clone());
                tokio::time::timeout(try_timeout, f)
                    .await
                    .map(|r| r.map(Up::H1).map_err(Failed::from_h1))
            }
            Sender::H2(mut s) => {
                let mut req = Request::new(req_body);
                *req.method_mut() = method.clone();
                *req.uri_mut() = h2_uri.clone().unwrap_or_default();
                *req.headers_mut() = headers.clone();
                *req.version_mut() = Version::HTTP_2;
                let f = s.try_send_request(req);
                tokio::time::timeout(try_timeout, f)
                    .await
                    .map(|r| r.map(Up::H2).map_err(|e| Failed::from_h2(e, state)))
            }
        };
        match result {
            Err(_elapsed) => {
                drop(active);
                note_outcome(backend, si, true, false);
                if replayable
                    && backend.retry_status.contains(&504)
                    && may_retry(backend, attempts, deadline, &mut retry_slot).await
                {
                    continue;
                }
                return Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream timeout\n",
                    Some(route),
                ));
            }
            Ok(Err(Failed::NotSent(b))) => {
                // Not sent (a stale pooled connection): as safe to retry as a connect failure.
                drop(active);
                if !replayable {
                    body = Some(b);
                }
                if may_retry(backend, attempts, deadline, &mut retry_slot).await {
                    continue;
                }
                return Err((
                    StatusCode::BAD_GATEWAY,
                    "upstream connection failed\n",
                    Some(route),
                ));
            }
            Ok(Err(Failed::TooLarge)) => {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large\n",
                    Some(route),
                ));
            }
            Ok(Err(Failed::ClientBody(err))) => {
                // The client's body broke, not the server: no retry, no outlier penalty.
                tracing::debug!(error = %err, "invalid request body");
                return Err((
                    StatusCode::BAD_REQUEST,
                    "invalid request body\n",
                    Some(route),
                ));
            }
            Ok(Err(Failed::Upstream(err))) => {
                drop(active);
                note_outcome(backend, si, true, false);
                tracing::debug!(server = %server.address, error = %err, "upstream request failed");
                if replayable
                    && backend.retry_status.contains(&502)
                    && may_retry(backend, attempts, deadline, &mut retry_slot).await
                {
                    continue;
                }
                return Err((
                    StatusCode::BAD_GATEWAY,
                    "upstream request failed\n",
                    Some(route),
                ));
            }
            Ok(Ok(up)) => {
                let status = up.status();
                note_outcome(backend, si, status >= 500, false);
                if replayable
                    && backend.retry_status.contains(&status)
                    && may_retry(backend, attempts, deadline, &mut retry_slot).await
                {
                    drop(up);
                    drop(active);
                    continue;
                }
                ctx.record.bytes_in = seen.as_ref().map_or(0, |s| s.load(Ordering::Relaxed));
                let set_sticky = sticky != Some(si);
                return Ok(match up {
                    Up::H1(mut resp) => {
                        if status == 101 {
                            // A tunnel only for the protocol asked for and allowed, and for
                            // WebSocket only with the handshake's proof: anything else would
                            // carry requests that no route or policy sees.
                            let io = resp.body_mut().take_upgraded();
                            return Ok(match (client_upgrade, io, &upgrade) {
                                (Some(client_up), Some(io), Some(asked))
                                    if asked.accepts(resp.headers()) =>
                                {
                                    tunnel(shared, route, resp, client_up, io, active, ctx)
                                }
                                _ => bad_upgrade(shared, conn, route, ctx),
                            });
                        }
                        respond(
                            shared, route, backend, si, resp, active, ctx, connect_ms, set_sticky,
                        )
                    }
                    Up::H2(resp) => respond(
                        shared, route, backend, si, resp, active, ctx, connect_ms, set_sticky,
                    ),
                });
            }
        }
    }
}

/// The request body for one attempt: a replayed attempt (only body-less requests are
/// replayed) sends none.
fn attempt_body(body: &mut Option<ReqBody>, replayable: bool, attempts: u32) -> ReqBody {
    match (replayable, attempts) {
        (true, n) if n > 1 => empty_req_body(),
        _ => body.take().unwrap_or_else(empty_req_body),
    }
}

/// An origin's response, from an HTTP/1.1 or an h2 connection.
enum Up {
    H1(Response<crate::h1::UpBody>),
    H2(Response<Incoming>),
}

impl Up {
    fn status(&self) -> u16 {
        match self {
            Up::H1(r) => r.status().as_u16(),
            Up::H2(r) => r.status().as_u16(),
        }
    }
}

/// Why an attempt failed, whichever protocol it used.
enum Failed {
    /// Nothing reached the origin; the body is handed back.
    NotSent(ReqBody),
    TooLarge,
    ClientBody(String),
    Upstream(String),
}

impl Failed {
    fn from_h1(e: crate::h1::SendError) -> Self {
        use crate::h1::SendError;
        match e {
            SendError::NotSent(b) => Failed::NotSent(b),
            SendError::Body(e) if e.is::<TooLarge>() => Failed::TooLarge,
            SendError::Body(e) => Failed::ClientBody(e.to_string()),
            SendError::Upstream(e) => Failed::Upstream(e),
        }
    }

    fn from_h2(
        mut e: hyper::client::conn::TrySendError<Request<ReqBody>>,
        state: &ServerState,
    ) -> Self {
        state.pool.drop_h2();
        if let Some(r) = e.take_message() {
            return Failed::NotSent(r.into_body());
        }
        let err = e.into_error();
        if is_too_large(&err) {
            Failed::TooLarge
        } else if caused_by::<ClientBody>(&err) {
            Failed::ClientBody(err.to_string())
        } else {
            Failed::Upstream(err.to_string())
        }
    }
}

fn empty_req_body() -> ReqBody {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|e| match e {})
        .boxed_unsync()
}

fn caused_by<T: std::error::Error + 'static>(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<T>() {
            return true;
        }
        src = s.source();
    }
    false
}

fn is_too_large(e: &hyper::Error) -> bool {
    caused_by::<TooLarge>(e)
}

struct Decr(Arc<std::sync::atomic::AtomicUsize>);
impl Drop for Decr {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds a server's in-flight count (and its max_connections slot) until the response ends.
struct ActiveGuard {
    state: Arc<ServerState>,
    #[allow(dead_code)]
    permit: Option<OwnedSemaphorePermit>,
}
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Passive outlier detection: eject after consecutive failures, within the backend's cap.
fn note_outcome(backend: &BackendRt, si: usize, failed_5xx: bool, connect_failure: bool) {
    let Some(o) = &backend.outlier else { return };
    let state = &backend.slots[si].state;
    if state.record_outcome(
        failed_5xx,
        connect_failure,
        o.consecutive_5xx,
        o.consecutive_connect_failures,
    ) {
        // Count and eject under one lock, so concurrent failures on different servers cannot
        // pass the cap together. Only reached past a failure threshold, so rarely contended.
        static EJECT: parking_lot::Mutex<()> = parking_lot::const_mutex(());
        let _g = EJECT.lock();
        let n = backend.slots.len();
        let cap = ((n as u32 * o.max_ejected_percent) / 100).max(1) as usize;
        let ejected = backend.slots.iter().filter(|s| s.state.ejected()).count();
        if ejected < cap && !state.ejected() {
            let d = state.eject(o.eject_for.0);
            backend.ejection_counter.inc();
            tracing::warn!(backend = %backend.id, server = %backend.servers[si].name, eject_for_ms = d.as_millis() as u64, "server ejected after consecutive failures");
        }
    }
}

/// Decides whether another attempt is allowed (attempt count, deadline, retry budget), and
/// sleeps the backoff if so. An allowed retry keeps its place in the budget (in `slot`)
/// until the request's next retry decision or its end, so the budget bounds the retries
/// actually outstanding at the origin, not just those backing off.
async fn may_retry(
    backend: &BackendRt,
    attempts: u32,
    deadline: Option<Instant>,
    slot: &mut Option<Decr>,
) -> bool {
    let r = &backend.retries;
    if attempts > r.attempts {
        return false;
    }
    // The previous retry of this request is over: give its place back before asking again.
    *slot = None;
    let in_flight = backend.in_flight.load(Ordering::Relaxed);
    let budget =
        ((in_flight as u64 * r.budget_percent as u64) / 100).max(r.min_retries_in_flight as u64);
    let current = backend.retries_in_flight.fetch_add(1, Ordering::Relaxed) as u64;
    let g = Decr(backend.retries_in_flight.clone());
    if current >= budget {
        tracing::debug!(backend = %backend.id, "retry budget exhausted");
        return false;
    }
    let cap = r
        .backoff_base
        .0
        .saturating_mul(1 << (attempts - 1).min(16))
        .min(r.backoff_max.0);
    let sleep = Duration::from_micros(rand::rng().random_range(0..=cap.as_micros() as u64));
    if let Some(d) = deadline {
        if Instant::now() + sleep >= d {
            return false;
        }
    }
    backend.retry_counter.inc();
    tokio::time::sleep(sleep).await;
    *slot = Some(g);
    true
}

fn hash_key(on: &portcullis_config::HashOn, headers: &HeaderMap, conn: &ConnInfo, pq: &str) -> u64 {
    use crate::balance::hash64;

    use portcullis_config::HashOn;
    match on {
        HashOn::Header(h) => hash64(
            headers
                .get(h.as_str())
                .map(|v| v.as_bytes())
                .unwrap_or_default(),
        ),
        HashOn::Cookie(c) => hash64(cookie(headers, c).unwrap_or_default().as_bytes()),
        HashOn::ClientIp => hash64(conn.peer.ip().to_string().as_bytes()),
        HashOn::Path => hash64(pq.split('?').next().unwrap_or("/").as_bytes()),
    }
}

/// Finishes a proxied response: strips hop-by-hop headers, sets the sticky cookie, and wraps
/// the body so the slot, the pooled connection and the access log are handled when it ends.
#[allow(clippy::too_many_arguments)]
fn respond<B>(
    shared: &Arc<Shared>,
    route: &RouteRt,
    backend: &BackendRt,
    si: usize,
    resp: Response<B>,
    active: ActiveGuard,
    ctx: &mut Ctx,
    connect_ms: f64,
    set_sticky: bool,
) -> Response<RespBody>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    parts
        .headers
        .insert(X_REQUEST_ID.clone(), ctx.rid.0.clone());
    if let Some(c) = ctx.set_cookie.take() {
        parts.headers.append(header::SET_COOKIE, c);
    }
    if let (Some(name), true) = (&backend.sticky_cookie, set_sticky) {
        let c = format!(
            "{name}={}; Path=/; HttpOnly; SameSite=Lax",
            backend.servers[si].sticky_id
        );
        if let Ok(v) = HeaderValue::from_str(&c) {
            parts.headers.append(header::SET_COOKIE, v);
        }
    }
    let status = parts.status.as_u16();
    let elapsed = ctx.start.elapsed();
    route.by_class[status_class(status)].inc();
    route.duration.observe(elapsed.as_secs_f64());
    let mut record = std::mem::take(&mut ctx.record);
    record.first_byte_ms = elapsed.as_secs_f64() * 1000.0;
    record.connect_ms = connect_ms;
    record.status = status;
    let done = Done {
        shared: shared.clone(),
        _active: active,
        record,
        start: ctx.start,
    };
    Response::from_parts(parts, Tracked::new(body, done).boxed_unsync())
}

/// Finishes the access record when the response body ends (the pooled connection, if any,
/// goes back to the pool from `pool::H1Body`).
struct Done {
    shared: Arc<Shared>,
    _active: ActiveGuard,
    record: AccessRecord,
    start: Instant,
}

impl OnDone for Done {
    fn done(self, complete: bool, bytes: u64) {
        let this = self;
        let status = this.record.status;
        let err = (!complete).then(|| "response aborted".to_string());
        finish_log(&this.shared, this.record, this.start, status, bytes, err);
    }
}

/// Joins the client's and the origin's upgraded connections (WebSocket and the like).
fn tunnel(
    shared: &Arc<Shared>,
    route: &RouteRt,
    resp: Response<crate::h1::UpBody>,
    client: hyper::upgrade::OnUpgrade,
    (mut origin, early): (crate::stream::Stream, Bytes),
    active: ActiveGuard,
    ctx: &mut Ctx,
) -> Response<RespBody> {
    use tokio::io::AsyncWriteExt;
    route.by_class[status_class(101)].inc();
    let record = std::mem::take(&mut ctx.record);
    let shared2 = shared.clone();
    let start = ctx.start;
    tokio::spawn(async move {
        let _active = active;
        let c = match client.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut c = hyper_util::rt::TokioIo::new(c);
        // Bytes the origin sent right behind its 101 go first.
        let res = match c.write_all(&early).await {
            Ok(()) => tokio::io::copy_bidirectional(&mut c, &mut origin).await,
            Err(e) => Err(e),
        };
        let bytes = res.as_ref().map(|(_, down)| *down).unwrap_or(0) + early.len() as u64;
        finish_log(
            &shared2,
            record,
            start,
            101,
            bytes,
            res.err().map(|e| e.to_string()),
        );
    });
    let (mut parts, _) = resp.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers, false);
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(u) = upgrade {
        parts.headers.insert(header::UPGRADE, u);
    }
    Response::from_parts(parts, empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("x-secret-hop").is_none() && h.get("keep-alive").is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn cookies_are_found() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; srv=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, "srv"), Some("abc"));
        assert_eq!(cookie(&h, "zz"), None);
    }
}
