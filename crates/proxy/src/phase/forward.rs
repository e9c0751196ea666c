//! The forward phase: send the request over a pooled upstream connection (plain, TLS or
//! mTLS; HTTP/1.1 or h2), with retries, budgets, backoff and timeouts, and stream the
//! response back. Each attempt asks the balance phase for a server. A tunnel opens only for
//! an allowed upgrade whose 101 proves itself (see `upgrade`). Every failure becomes a short,
//! clear answer (413, 502, 503, 504); nothing here panics on client input.

use crate::exchange::{origin_target, Exchange, Flow, Refused, X_REQUEST_ID};
use crate::phase::balance::{self, ActiveGuard};
use crate::record::{status_class, AccessRecord};
use crate::snapshot::{BackendRt, RouteRt};
use crate::state::ServerState;
use crate::upstream::body::{
    empty, BodyFailure, BodyWait, ClientBody, Limited, OnDone, Prepend, ReqBody, RespBody,
    SlowBody, TooLarge, Tracked,
};
use crate::upstream::head::{strip_hop_by_hop, Head};
use crate::upstream::pool::{ConnectError, Sender};
use crate::Shared;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One request's upstream side, fixed before its first attempt.
struct Trip<'a> {
    route: &'a RouteRt,
    backend: &'a BackendRt,
    /// The method sent: the request's own (an honored override is sent as a header).
    method: Method,
    pq: &'a str,
    head: Head,
    replayable: bool,
    deadline: Option<Instant>,
    per_try: Duration,
    /// Request body bytes read, when there is a body.
    seen: Option<Arc<AtomicU64>>,
    /// Whether that body waits on its client (see [`within`]).
    body_wait: Option<BodyWait>,
    plan: balance::Plan,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// What changes from one attempt to the next.
struct Tries {
    body: Option<ReqBody>,
    tried: smallvec::SmallVec<[usize; 4]>,
    attempts: u32,
    /// This request's place in the retry budget while a retry of it is outstanding.
    retry_slot: Option<Decr>,
    connect_ms: f64,
}

/// How one attempt ended.
enum Attempt {
    Retry,
    Done(Flow),
}

pub async fn run(x: &mut Exchange<'_>, body: Incoming) -> Flow {
    let Some(route) = x.route else {
        return Flow::Refuse(StatusCode::NOT_FOUND, "no route\n");
    };
    // The route phase read the route's current backend (a `switch_route` may have changed it).
    let backend = x.backend.unwrap_or(&route.backend);
    if let Some(limit) = route.max_body {
        let declared = x
            .parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Flow::Refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
        }
    }
    let client_upgrade = if x.upgrade.is_some() {
        x.parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    // The origin's target; this phase owns it from here on.
    let uri = std::mem::take(&mut x.parts.uri);
    let path = x.path.take();
    let pq = origin_target(&path, &uri);
    let head = match crate::upstream::head::build(x, backend, &pq) {
        Ok(h) => h,
        Err((status, msg)) => return Flow::Refuse(status, msg),
    };
    let method = x.parts.method.clone();
    let idempotent = matches!(
        method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let body_empty = body.is_end_stream();
    let replayable = body_empty && (idempotent || route.retry_non_idempotent);
    // A request without a body (most GETs) skips the limit and byte count.
    let seen = (!body_empty).then(|| Arc::new(AtomicU64::new(0)));
    if let Some(u) = &mut x.usage {
        u.bytes_in = seen.clone();
    }
    let wait = seen.as_ref().map(|_| BodyWait::default());
    let body = match request_body(x, route, &head.headers, body, seen.as_ref(), &wait).await {
        Ok(b) => b,
        Err((status, msg)) => return Flow::Refuse(status, msg),
    };
    let plan = balance::plan(x.conn, backend, &head.headers, &pq);
    let trip = Trip {
        route,
        backend,
        method,
        pq: &pq,
        head,
        replayable,
        deadline: route.timeout.map(|t| x.start + t),
        per_try: backend
            .retries
            .per_try_timeout
            .map_or(backend.response_timeout, |p| {
                p.0.min(backend.response_timeout)
            }),
        seen,
        body_wait: wait,
        plan,
        client_upgrade,
    };
    let tries = Tries {
        body: Some(body),
        tried: smallvec::SmallVec::new(),
        attempts: 0,
        retry_slot: None,
        connect_ms: 0.0,
    };
    attempts(x, trip, tries).await
}

/// The body sent upstream: limited to the route's `max_body_size`, counted, with the route's
/// rule for trailers. A chunked HTTP/1 body is checked before a server is picked: a
/// malformed (or oversized) first chunk gets 400 (or 413) here, and never reaches an origin.
async fn request_body(
    x: &Exchange<'_>,
    route: &RouteRt,
    headers: &HeaderMap,
    body: Incoming,
    seen: Option<&Arc<AtomicU64>>,
    wait: &Option<BodyWait>,
) -> Result<ReqBody, Refused> {
    let Some(seen) = seen else {
        return Ok(empty_req_body());
    };
    // A body on a GET, HEAD or TRACE, which the route does not forward (`get_body`).
    let bodiless = route.get_body == portcullis_config::GetBody::Reject
        && matches!(x.parts.method, Method::GET | Method::HEAD | Method::TRACE);
    if bodiless && body.size_hint().exact().is_some_and(|n| n > 0) {
        return Err((StatusCode::BAD_REQUEST, NO_GET_BODY));
    }
    let chunked = x.parts.version != Version::HTTP_2 && body.size_hint().exact().is_none();
    let trailers = if route.request_trailers || is_grpc(headers) {
        crate::upstream::body::Trailers::Keep(Box::new(crate::upstream::body::Kept {
            protected: x.snap.unforgeable.clone(),
            head: headers.keys().cloned().collect(),
        }))
    } else {
        crate::upstream::body::Trailers::Drop
    };
    let mut b = Limited::new(body, route.max_body, seen.clone(), trailers)
        .with_idle_timeout(x.conn.body_timeout)
        .with_wait(wait.clone().unwrap_or_default())
        .boxed_unsync();
    if bodiless {
        return no_body(b).await;
    }
    if !chunked {
        return Ok(b);
    }
    match b.frame().await {
        None => Ok(empty_req_body()),
        Some(Ok(f)) => Ok(Prepend::new(f, b).boxed_unsync()),
        Some(Err(e)) if e.is::<TooLarge>() => {
            Err((StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"))
        }
        Some(Err(e)) if e.is::<SlowBody>() => {
            Err((StatusCode::REQUEST_TIMEOUT, "request body timed out\n"))
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "invalid request body");
            Err((StatusCode::BAD_REQUEST, "invalid request body\n"))
        }
    }
}

const NO_GET_BODY: &str = "a GET, HEAD or TRACE request may not have a body\n";

/// The body of a GET, HEAD or TRACE whose length was not declared (chunked, or HTTP/2 DATA
/// frames): refused (400) if it holds a byte, else none is sent.
async fn no_body(mut b: ReqBody) -> Result<ReqBody, Refused> {
    loop {
        match b.frame().await {
            None => return Ok(empty_req_body()),
            Some(Ok(f)) => match f.data_ref() {
                Some(d) if !d.is_empty() => return Err((StatusCode::BAD_REQUEST, NO_GET_BODY)),
                Some(_) => continue,
                // Trailers end the body; a bodiless request sends none.
                None => return Ok(empty_req_body()),
            },
            Some(Err(e)) if e.is::<SlowBody>() => {
                return Err((StatusCode::REQUEST_TIMEOUT, "request body timed out\n"))
            }
            Some(Err(_)) => return Err((StatusCode::BAD_REQUEST, "invalid request body\n")),
        }
    }
}

/// A gRPC request, whose trailers are part of the protocol.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Attempts until one answers, or no retry is left.
async fn attempts(x: &mut Exchange<'_>, mut trip: Trip<'_>, mut tries: Tries) -> Flow {
    let backend = trip.backend;
    backend.in_flight.fetch_add(1, Ordering::Relaxed);
    let _inflight = Decr(backend.in_flight.clone());
    loop {
        tries.attempts += 1;
        x.record.attempts = tries.attempts;
        let (si, active) =
            match balance::pick(x, backend, &trip.plan, &tries.tried, tries.attempts).await {
                Ok(p) => p,
                Err((status, msg)) => return Flow::Refuse(status, msg),
            };
        tries.tried.push(si);
        if backend.servers[si].echo {
            // Boxed, as the rare paths below: inline, their futures would size every
            // request's future, which hyper moves per request (see `pipeline::handle`).
            return Box::pin(echo(x, &trip, &mut tries, si, active)).await;
        }
        match once(x, &mut trip, &mut tries, si, active).await {
            Attempt::Retry => continue,
            Attempt::Done(flow) => return flow,
        }
    }
}

/// The built-in echo origin answers in process.
async fn echo(
    x: &mut Exchange<'_>,
    trip: &Trip<'_>,
    tries: &mut Tries,
    si: usize,
    active: ActiveGuard,
) -> Flow {
    let mut req = Request::new(attempt_body(
        &mut tries.body,
        trip.replayable,
        tries.attempts,
    ));
    *req.method_mut() = trip.method.clone();
    *req.uri_mut() = match &trip.head.h2_uri {
        Some(u) => u.clone(),
        None => trip.pq.parse().unwrap_or_default(),
    };
    *req.headers_mut() = trip.head.headers.clone();
    let resp = crate::upstream::echo::respond(req, &x.rid).await;
    Flow::Respond(respond(
        x,
        trip.route,
        si,
        resp,
        active,
        tries.connect_ms,
        false,
    ))
}

/// One attempt on server `si`: connect (or reuse), send, and read the response head.
async fn once(
    x: &mut Exchange<'_>,
    trip: &mut Trip<'_>,
    tries: &mut Tries,
    si: usize,
    active: ActiveGuard,
) -> Attempt {
    let backend = trip.backend;
    let server = &backend.servers[si];
    let state = &backend.slots[si].state;
    // Connect (nothing has been sent yet, so a failure here is always safe to retry).
    let remaining = trip
        .deadline
        .map(|d| d.saturating_duration_since(Instant::now()));
    // The route's time ran out before anything was sent (in the queue for a slot, or in
    // earlier attempts): 504 without sending it, and nothing held against the server.
    if remaining.is_some_and(|r| r.is_zero()) {
        return Attempt::Done(Flow::Refuse(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream timeout\n",
        ));
    }
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
            if backend.retry_connect && retry(trip, tries).await {
                return Attempt::Retry;
            }
            return Attempt::Done(if timeout {
                Flow::Refuse(StatusCode::GATEWAY_TIMEOUT, "upstream connect timeout\n")
            } else {
                Flow::Refuse(StatusCode::BAD_GATEWAY, "upstream connect failed\n")
            });
        }
    };
    if !checkout.reused {
        backend
            .connect_hist
            .observe(checkout.connect_time.as_secs_f64());
        tries.connect_ms = checkout.connect_time.as_secs_f64() * 1000.0;
    }
    x.record.connect_ms = tries.connect_ms;
    let try_timeout = remaining.map_or(trip.per_try, |r| r.min(trip.per_try));
    let req_body = attempt_body(&mut tries.body, trip.replayable, tries.attempts);
    let result = match checkout.sender {
        Sender::H1(c) => {
            let f = c.send(
                &trip.method,
                trip.pq,
                &trip.head.headers,
                req_body,
                state.pool.clone(),
            );
            tokio::time::timeout(try_timeout, f)
                .await
                .map_err(|_| late(trip))
                .map(|r| r.map(Up::H1).map_err(Failed::from_h1))
        }
        Sender::H2(mut s) => {
            let mut req = Request::new(req_body);
            *req.method_mut() = trip.method.clone();
            *req.uri_mut() = trip.head.h2_uri.clone().unwrap_or_default();
            *req.headers_mut() = trip.head.headers.clone();
            *req.version_mut() = Version::HTTP_2;
            let f = s.try_send_request(req);
            let r = tokio::time::timeout(try_timeout, f).await;
            let closed = s.is_closed();
            r.map_err(|_| late(trip)).map(|r| {
                r.map(Up::H2)
                    .map_err(|e| Failed::from_h2(e, state, trip.body_wait.as_ref(), closed))
            })
        }
    };
    match result {
        Ok(Ok(up)) => answered(x, trip, tries, si, active, up).await,
        // The time ran out while the client was still sending its body: the client's
        // delay, not the server's (no retry, no ejection).
        Err(Late::Client) => Attempt::Done(Flow::Refuse(
            StatusCode::REQUEST_TIMEOUT,
            "request body timed out\n",
        )),
        Err(Late::Server) => {
            drop(active);
            // Held against the server only when its own time ran out (`timeouts.response`,
            // `per_try_timeout`), not what was left of the route's `timeout`.
            if remaining.is_none_or(|r| r >= trip.per_try) {
                note_outcome(backend, si, true, false);
            }
            if trip.replayable && backend.retry_status.contains(&504) && retry(trip, tries).await {
                return Attempt::Retry;
            }
            Attempt::Done(Flow::Refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream timeout\n",
            ))
        }
        Ok(Err(failed)) => Box::pin(not_answered(trip, tries, si, active, failed)).await,
    }
}

/// Whose delay ended an attempt without a response.
enum Late {
    Server,
    Client,
}

/// Whose delay it was when an attempt (sending the request, its body included, and reading
/// the response's head) ran out of time. While the request body still waits on its client
/// (a body that trickles in, each piece within `timeouts.client_body`), the delay is the
/// client's: the attempt ends with 408 and the server is not blamed, so that slow clients
/// cannot make a healthy server time out and be ejected. (A plain function, not a wrapper
/// future: the attempt's future is large, and each wrapper moves it once more.)
fn late(trip: &Trip<'_>) -> Late {
    if trip.body_wait.as_ref().is_some_and(BodyWait::on_client) {
        Late::Client
    } else {
        Late::Server
    }
}

/// An attempt that got no response.
async fn not_answered(
    trip: &Trip<'_>,
    tries: &mut Tries,
    si: usize,
    active: ActiveGuard,
    failed: Failed,
) -> Attempt {
    let backend = trip.backend;
    match failed {
        Failed::NotSent(b) => {
            // Not sent (a stale pooled connection): as safe to retry as a connect failure.
            drop(active);
            if !trip.replayable {
                tries.body = Some(b);
            }
            if retry(trip, tries).await {
                return Attempt::Retry;
            }
            Attempt::Done(Flow::Refuse(
                StatusCode::BAD_GATEWAY,
                "upstream connection failed\n",
            ))
        }
        Failed::TooLarge => Attempt::Done(Flow::Refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large\n",
        )),
        Failed::SlowBody => {
            // The client stalled its body (a slow POST), not the server: no retry, no
            // outlier penalty; the server's connection is not reused.
            tracing::debug!("request body timed out");
            Attempt::Done(Flow::Refuse(
                StatusCode::REQUEST_TIMEOUT,
                "request body timed out\n",
            ))
        }
        Failed::ClientBody(err) => {
            // The client's body broke, not the server: no retry, no outlier penalty.
            tracing::debug!(error = %err, "invalid request body");
            Attempt::Done(Flow::Refuse(
                StatusCode::BAD_REQUEST,
                "invalid request body\n",
            ))
        }
        Failed::Upstream(err) => {
            drop(active);
            note_outcome(backend, si, true, false);
            tracing::debug!(server = %backend.servers[si].address, error = %err, "upstream request failed");
            if trip.replayable && backend.retry_status.contains(&502) && retry(trip, tries).await {
                return Attempt::Retry;
            }
            Attempt::Done(Flow::Refuse(
                StatusCode::BAD_GATEWAY,
                "upstream request failed\n",
            ))
        }
    }
}

/// An attempt that got a response head: retry on a retryable status, open a tunnel on a
/// valid 101, or stream the response back.
async fn answered(
    x: &mut Exchange<'_>,
    trip: &mut Trip<'_>,
    tries: &mut Tries,
    si: usize,
    active: ActiveGuard,
    up: Up,
) -> Attempt {
    let backend = trip.backend;
    let status = up.status();
    note_outcome(backend, si, status >= 500, false);
    if trip.replayable && backend.retry_status.contains(&status) && retry(trip, tries).await {
        drop(up);
        drop(active);
        return Attempt::Retry;
    }
    x.record.bytes_in = trip.seen.as_ref().map_or(0, |s| s.load(Ordering::Relaxed));
    let set_sticky = trip.plan.sticky != Some(si);
    let resp = match up {
        Up::H1(mut resp) if status == 101 => {
            // A tunnel only for the protocol asked for and allowed, and for WebSocket only
            // with the handshake's proof: anything else would carry requests that no route
            // or policy sees.
            let io = resp.body_mut().take_upgraded();
            match (trip.client_upgrade.take(), io, &x.upgrade) {
                (Some(client_up), Some(io), Some(asked)) if asked.accepts(resp.headers()) => {
                    tunnel(x, resp, client_up, io, active)
                }
                _ => bad_upgrade(x),
            }
        }
        Up::H1(resp) => respond(
            x,
            trip.route,
            si,
            resp,
            active,
            tries.connect_ms,
            set_sticky,
        ),
        Up::H2(resp) => respond(
            x,
            trip.route,
            si,
            resp,
            active,
            tries.connect_ms,
            set_sticky,
        ),
    };
    Attempt::Done(Flow::Respond(resp))
}

/// Whether another attempt may follow (see `may_retry`).
async fn retry(trip: &Trip<'_>, tries: &mut Tries) -> bool {
    // Boxed: a retry is rare, and its backoff's timer inline would size every request's
    // future (see `pipeline::handle`).
    Box::pin(may_retry(
        trip.backend,
        tries.attempts,
        trip.deadline,
        &mut tries.retry_slot,
    ))
    .await
}

/// The answer to a 101 that may not open a tunnel (see `upgrade`): 502, and the client
/// connection closes, so nothing it sends next is read as a tunnel's bytes.
fn bad_upgrade(x: &mut Exchange<'_>) -> Response<RespBody> {
    x.shared
        .metrics
        .refuse(&x.conn.listener, x.conn.peer.ip(), "upgrade_response");
    let route = x.route.map_or("", |r| &r.id);
    tracing::warn!(request_id = %x.rid, route, "origin answered 101 with a protocol or handshake that was not asked for; refused");
    x.count(502);
    x.finish(502, Some("invalid upgrade response".into()));
    let mut r = crate::exchange::local(
        StatusCode::BAD_GATEWAY,
        "invalid upgrade response\n",
        &x.rid,
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
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
    H1(Response<crate::upstream::h1::UpBody>),
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
    SlowBody,
    ClientBody(String),
    Upstream(String),
}

impl Failed {
    fn from_h1(e: crate::upstream::h1::SendError) -> Self {
        use crate::upstream::h1::SendError;
        match e {
            SendError::NotSent(b) => Failed::NotSent(b),
            SendError::Body(e) if e.is::<TooLarge>() => Failed::TooLarge,
            SendError::Body(e) if e.is::<SlowBody>() => Failed::SlowBody,
            SendError::Body(e) => Failed::ClientBody(e.to_string()),
            SendError::Upstream(e) => Failed::Upstream(e),
        }
    }

    /// A failed HTTP/2 exchange. The connection sends the request body from a task of its
    /// own, so a body that failed by its client's doing shows here only as the stream reset
    /// it caused: `wait` says so, and the server is then not blamed, nor its connection
    /// (still good for the other streams) dropped, unless it is `closed`.
    fn from_h2(
        mut e: hyper::client::conn::TrySendError<Request<ReqBody>>,
        state: &ServerState,
        wait: Option<&BodyWait>,
        closed: bool,
    ) -> Self {
        let by_client = wait.and_then(BodyWait::failed);
        if closed || by_client.is_none() {
            state.pool.drop_h2();
        }
        if let Some(r) = e.take_message() {
            return Failed::NotSent(r.into_body());
        }
        let err = e.into_error();
        match by_client {
            Some(BodyFailure::TooLarge) => return Failed::TooLarge,
            Some(BodyFailure::Slow) => return Failed::SlowBody,
            Some(BodyFailure::Client) => return Failed::ClientBody(err.to_string()),
            None => {}
        }
        if is_too_large(&err) {
            Failed::TooLarge
        } else if caused_by::<SlowBody>(&err) {
            Failed::SlowBody
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

/// Passive outlier detection: eject after consecutive failures, within the backend's cap.
fn note_outcome(backend: &BackendRt, si: usize, failed_5xx: bool, connect_failure: bool) {
    let state = &backend.slots[si].state;
    if failed_5xx || connect_failure {
        state.note_error();
    }
    let Some(o) = &backend.outlier else { return };
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

/// Finishes a proxied response: strips hop-by-hop headers, sets the sticky cookie, and wraps
/// the body so the slot, the pooled connection and the access log are handled when it ends.
#[allow(clippy::too_many_arguments)]
fn respond<B>(
    x: &mut Exchange<'_>,
    route: &RouteRt,
    si: usize,
    resp: Response<B>,
    active: ActiveGuard,
    connect_ms: f64,
    set_sticky: bool,
) -> Response<RespBody>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<crate::upstream::body::BoxError>,
{
    let backend = x.backend.unwrap_or(&route.backend);
    let (mut parts, body) = resp.into_parts();
    // `Trailer` says which trailers follow; it is end to end (RFC 9110 §6.6.2), and an
    // HTTP/1.1 client is sent trailers only when it names them.
    let trailer = parts.headers.remove(header::TRAILER);
    strip_hop_by_hop(&mut parts.headers, false);
    if let Some(t) = trailer {
        parts.headers.insert(header::TRAILER, t);
    }
    if parts.headers.contains_key(header::SET_COOKIE) {
        let session = &x.snap.identity.session.cookie;
        crate::upstream::head::drop_own_set_cookies(session, &mut parts.headers);
    }
    parts.headers.insert(X_REQUEST_ID.clone(), x.rid.0.clone());
    if let Some(c) = x.set_cookie.take() {
        parts.headers.append(header::SET_COOKIE, c);
    }
    x.rate_headers(&mut parts.headers);
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
    let elapsed = x.start.elapsed();
    route.by_class[status_class(status)].inc();
    route.duration.observe(elapsed.as_secs_f64());
    let mut record = std::mem::take(&mut x.record);
    record.first_byte_ms = elapsed.as_secs_f64() * 1000.0;
    record.connect_ms = connect_ms;
    record.status = status;
    let done = Done {
        shared: x.shared.clone(),
        _active: active,
        record,
        start: x.start,
        usage: x.usage.take(),
    };
    let body = Tracked::watched(body, done, &x.conn.sending);
    Response::from_parts(parts, body.boxed_unsync())
}

/// Finishes the access record when the response body ends (the pooled connection, if any,
/// goes back to the pool from `pool::H1Body`).
struct Done {
    shared: Arc<Shared>,
    _active: ActiveGuard,
    record: AccessRecord,
    start: Instant,
    /// The stick-table entries the request counts in: the origin's errors and the bytes are
    /// recorded here, and `conn_cur` ends when this drops.
    usage: Option<crate::limits::Usage>,
}

impl OnDone for Done {
    fn done(self, complete: bool, bytes: u64) {
        let this = self;
        let status = this.record.status;
        if let Some(u) = &this.usage {
            u.finish(status, bytes);
        }
        let err = (!complete).then(|| "response aborted".to_string());
        crate::record::finish(&this.shared, this.record, this.start, status, bytes, err);
    }
}

/// Joins the client's and the origin's upgraded connections (WebSocket and the like).
fn tunnel(
    x: &mut Exchange<'_>,
    resp: Response<crate::upstream::h1::UpBody>,
    client: hyper::upgrade::OnUpgrade,
    (mut origin, early): (crate::upstream::stream::Stream, Bytes),
    active: ActiveGuard,
) -> Response<RespBody> {
    use tokio::io::AsyncWriteExt;
    x.count(101);
    let record = std::mem::take(&mut x.record);
    let shared2 = x.shared.clone();
    let start = x.start;
    // Tracked by the listener, whose stop waits for it up to the grace period and then
    // ends it (`edge::conn::Life`).
    let life = x.conn.life.clone();
    // The connection's place in its listener's count goes with the tunnel: a tunnel is still
    // a client connection for `max_connections`.
    let held = x.conn.held.lock().take();
    life.tunnels.clone().spawn(async move {
        let _active = active;
        let _held = held;
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
            Ok(()) => tokio::select! {
                r = tokio::io::copy_bidirectional(&mut c, &mut origin) => r,
                _ = life.end.cancelled() => Err(std::io::Error::other("the listener's grace period ended")),
            },
            Err(e) => Err(e),
        };
        let bytes = res.as_ref().map(|(_, down)| *down).unwrap_or(0) + early.len() as u64;
        crate::record::finish(
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
    if parts.headers.contains_key(header::SET_COOKIE) {
        let session = &x.snap.identity.session.cookie;
        crate::upstream::head::drop_own_set_cookies(session, &mut parts.headers);
    }
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
    use crate::phase::identify::credentials::cookie;

    #[test]
    fn cookies_are_found() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; srv=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, "srv"), Some("abc"));
        assert_eq!(cookie(&h, "zz"), None);
    }
}
