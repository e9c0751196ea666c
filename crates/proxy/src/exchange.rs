//! One request's facts, filled in phase by phase (see `pipeline`): the connection and the
//! request id, the canonical host and path, the route, the method that policy sees, the
//! identity, and the access record that `record` writes at the end. Policy, the authorizers
//! and the audit trail read views of it ([`Exchange::facts`]); there is one description of
//! a request.

use crate::edge::conn::ConnInfo;
use crate::record::AccessRecord;
use crate::snapshot::{RouteRt, Snapshot};
use crate::upstream::body::{full, RespBody};
use crate::Shared;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use portcullis_identity::Identity;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The IETF rate-limit headers (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The request facts an audit record needs: a view of an [`Exchange`].
pub struct Facts<'a> {
    pub request_id: &'a str,
    pub app: &'a str,
    pub route: &'a str,
    pub conn: &'a ConnInfo,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// What the authorize phase decided, for the audit record and the answer.
pub struct Outcome {
    /// Let the request through (true in shadow mode even when the policies deny).
    pub pass: bool,
    /// `allow`, `deny` or `would_deny`.
    pub decision: &'static str,
    /// Why. Left empty for an allowed request when nobody will read it (no audit trail):
    /// formatting them costs more than a cached decision.
    pub reasons: Vec<String>,
    /// The last authorizer consulted: (name, allowed, cached).
    pub authorizer: Option<(String, bool, bool)>,
    /// Headers the authorizers asked to add upstream.
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    /// Time spent deciding (0 when there is no audit trail to report it in).
    pub latency_us: u64,
}

/// A short refusal: the status and the body of a local answer.
pub type Refused = (StatusCode, &'static str);

/// What a phase tells the pipeline.
pub enum Flow {
    /// Go on to the next phase.
    Next,
    /// Answer with this response; the phase has recorded it.
    Respond(Response<RespBody>),
    /// Answer with a short local response (`local`); `record` counts and logs it.
    Refuse(StatusCode, &'static str),
}

/// A request id, kept as the header value sent upstream and to the client; read as text
/// where it is logged or written into a record.
pub struct Rid(pub HeaderValue);

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

impl Rid {
    /// The id of a request: a trusted peer's `X-Request-Id` when it is 1 to 128 visible ASCII
    /// characters, else a new random UUID (formatted without an intermediate string).
    pub fn of(headers: &http::HeaderMap, trusted: bool) -> Rid {
        match headers.get(&X_REQUEST_ID) {
            Some(v) if trusted && valid_request_id(v) => Rid(v.clone()),
            _ => {
                let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
                let s = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
                Rid(HeaderValue::from_str(s)
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid")))
            }
        }
    }
}

fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// The canonical host of a request (`canon::host`), owned.
pub struct Host {
    pub name: String,
    pub authority: HeaderValue,
}

/// One request, from its arrival to its answer.
pub struct Exchange<'s> {
    pub shared: &'s Arc<Shared>,
    pub snap: &'s Arc<Snapshot>,
    pub conn: &'s ConnInfo,
    /// The peer is one of `trusted_proxies`.
    pub trusted: bool,
    pub start: Instant,
    pub rid: Rid,
    /// Whether an access log is written (if not, the record's strings stay empty).
    pub log: bool,
    pub record: AccessRecord,
    /// The request head; its headers become the upstream head.
    pub parts: http::request::Parts,
    // check
    /// None when the request named no host (HTTP/1.0 without `Host`).
    pub host: Option<Host>,
    /// The canonical path when it differs from the path as sent.
    pub path: Option<String>,
    /// The path holds an encoded slash, kept encoded for routing.
    pub escaped_slash: bool,
    // route
    pub route: Option<&'s RouteRt>,
    /// The backend the route's requests go to now (its own, or a `switch_route`'s), read
    /// once by the route phase.
    pub backend: Option<&'s crate::snapshot::BackendRt>,
    /// The overridden method, when the route honors a method override.
    pub method: Option<Method>,
    /// The upgrade asked for and allowed.
    pub upgrade: Option<crate::upstream::upgrade::Upgrade>,
    // identify and authorize
    pub identity: Option<Arc<Identity>>,
    /// A refreshed session cookie to set on the response.
    pub set_cookie: Option<HeaderValue>,
    // limit
    /// The stick-table entries this request counts in, for the end of its response (errors,
    /// bytes, `conn_cur`); dropping it ends `conn_cur`.
    pub usage: Option<crate::limits::Usage>,
    /// The counters of each tracked table after this request was counted (by the index in
    /// the route's `limits.track`; `None` where the request lacks the table's key): what
    /// `context.limits` and the rules read.
    pub seen: crate::limits::Seen,
    /// `RateLimit-Policy` and `RateLimit`, on a route with a usage plan: every answer carries
    /// them.
    pub ratelimit: Option<[HeaderValue; 2]>,
}

impl<'s> Exchange<'s> {
    pub fn new(
        shared: &'s Arc<Shared>,
        snap: &'s Arc<Snapshot>,
        conn: &'s ConnInfo,
        parts: http::request::Parts,
        start: Instant,
    ) -> Exchange<'s> {
        let trusted =
            !snap.trusted.is_empty() && snap.trusted.iter().any(|n| n.contains(&conn.peer.ip()));
        let rid = Rid::of(&parts.headers, trusted);
        let log = shared.access.enabled();
        let record = if log {
            shared.access.begin(&rid, &conn.listener, conn.peer, &parts)
        } else {
            AccessRecord::default()
        };
        Exchange {
            shared,
            snap,
            conn,
            trusted,
            start,
            rid,
            log,
            record,
            parts,
            host: None,
            path: None,
            escaped_slash: false,
            route: None,
            backend: None,
            method: None,
            upgrade: None,
            identity: None,
            set_cookie: None,
            usage: None,
            seen: Default::default(),
            ratelimit: None,
        }
    }

    /// The canonical path.
    pub fn path(&self) -> &str {
        match &self.path {
            Some(p) => p,
            None => match self.parts.uri.path() {
                "" => "/",
                p => p,
            },
        }
    }

    /// The query, as sent.
    pub fn query(&self) -> Option<&str> {
        self.parts.uri.query()
    }

    /// The canonical host name (lower case, no port), or "" when the request named none.
    pub fn host_name(&self) -> &str {
        self.host.as_ref().map_or("", |h| &h.name)
    }

    /// The canonical host with a non-default port: what the origin is sent as `Host`.
    pub fn authority(&self) -> Option<&HeaderValue> {
        self.host.as_ref().map(|h| &h.authority)
    }

    /// The method that policy, limits, audit and the log see.
    pub fn method(&self) -> &Method {
        self.method.as_ref().unwrap_or(&self.parts.method)
    }

    /// What the origin is sent as the request target: the canonical path and the query as
    /// sent.
    pub fn origin_target(&self) -> Cow<'_, str> {
        origin_target(&self.path, &self.parts.uri)
    }

    /// The view of this request that audit records describe.
    pub fn facts(&self) -> Option<Facts<'_>> {
        let route = self.route?;
        Some(Facts {
            request_id: &self.rid,
            app: &route.app,
            route: &route.id,
            conn: self.conn,
            method: self.method().as_str(),
            host: self.host_name(),
            path: self.path(),
            query: self.query(),
        })
    }

    /// Counts this response in the route's status classes, when a route was found.
    pub fn count(&self, status: u16) {
        if let Some(route) = self.route {
            route.by_class[crate::record::status_class(status)].inc();
        }
    }

    /// Adds `RateLimit-Policy` and `RateLimit` to an answer, on a route with a usage plan.
    /// An exchange answers once, so they are moved into it.
    pub fn rate_headers(&mut self, headers: &mut http::HeaderMap) {
        if let Some([policy, now]) = self.ratelimit.take() {
            headers.insert(RATELIMIT_POLICY.clone(), policy);
            headers.insert(RATELIMIT.clone(), now);
        }
    }

    /// Writes the access record for an answer without a streamed body.
    pub fn finish(&mut self, status: u16, error: Option<String>) {
        crate::record::finish(
            self.shared,
            std::mem::take(&mut self.record),
            self.start,
            status,
            0,
            error,
        );
    }
}

/// A request that was never answered (its client went away, or the connection was closed
/// under it, before an answer was made) is still in the access log: as 499, nginx's
/// "client closed request". Each answer takes the record when it is made, so this finds one
/// only when none was.
impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        if self.log && !self.record.request_id.is_empty() {
            self.finish(499, Some("the client went away before the answer".into()));
        }
    }
}

/// What the origin is sent as the request target: the canonical path (`path`, or the path
/// as sent when it was already canonical) and the query as sent.
pub fn origin_target<'a>(path: &'a Option<String>, uri: &'a http::Uri) -> Cow<'a, str> {
    match path {
        // An absolute-form target with an empty path (`http://host?q`, or an h2 `:path` of
        // `?q`) is routed as `/`, and must reach the origin as `/?q`, not as `?q`.
        None => match uri.path_and_query().map(|p| p.as_str()) {
            Some(pq) if pq.starts_with('?') => Cow::Owned(format!("/{pq}")),
            Some(pq) if !pq.is_empty() => Cow::Borrowed(pq),
            _ => Cow::Borrowed("/"),
        },
        Some(p) => Cow::Owned(match uri.query() {
            Some(q) => format!("{p}?{q}"),
            None => p.clone(),
        }),
    }
}

/// A short local answer (400, 404, 413, 502, 503, 504), with the request id.
pub fn local(status: StatusCode, msg: &'static str, rid: &str) -> Response<RespBody> {
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
