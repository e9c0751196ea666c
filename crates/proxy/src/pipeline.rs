//! The request path, as the phases run it:
//!
//! ```text
//! check → route → identify → authorize → limit → forward (balance per attempt) → record
//! ```
//!
//! The limit phase runs after authorize, except that on a route whose policies read
//! `context.limits` it counts the request in the route's stick tables just before authorize,
//! so that the policies see counters that include it.
//!
//! Each phase reads and fills one [`Exchange`]; the first that answers ends the run. `record`
//! is not a step of its own: each answer is recorded where it is made (a streamed response
//! when its body ends), and a short refusal here.

use crate::edge::conn::ConnInfo;
use crate::exchange::{local, Exchange, Flow};
use crate::phase::{authorize, check, forward, identify, limit, route};
use crate::upstream::body::RespBody;
use crate::Shared;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Instant;

/// The entry point for every proxied request.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let snap = shared.snapshot.load_full();
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let h1 = parts.version < http::Version::HTTP_2;
    let head = parts.method == http::Method::HEAD;
    let mut x = Exchange::new(&shared, &snap, &conn, parts, start);
    let mut r = match run(&mut x, body).await {
        Flow::Respond(r) => r,
        Flow::Refuse(status, msg) => refusal(&mut x, status, msg),
        // The forward phase always answers.
        Flow::Next => refusal(&mut x, StatusCode::BAD_GATEWAY, "no response\n"),
    };
    // A connection the smuggling guard stopped watching (an upgrade that opened no tunnel,
    // a CONNECT) serves no further request: one would have neither the guard nor the
    // header timeout (`edge::smuggle`). (An h2 connection has its own framing, and the
    // guard, which reads only HTTP/1, stops at its preface.)
    if h1 && conn.smuggle.blind() && r.status() != StatusCode::SWITCHING_PROTOCOLS {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if head && !h1 {
        without_content(&mut r);
    }
    r
}

/// An answer to HEAD carries no content (RFC 9110 §9.3.2). hyper drops it on HTTP/1.1, but
/// on h2 it would send portcullis's own answers' bodies (a 401, a 400, a 502) as DATA, and
/// clients reset the stream (`PROTOCOL_ERROR`) instead of reading the status. The
/// `Content-Length` stays what a GET would have had.
fn without_content(r: &mut Response<RespBody>) {
    use http_body::Body;
    if r.body().is_end_stream() {
        return;
    }
    if let Some(len) = r.body().size_hint().exact() {
        r.headers_mut()
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(len));
    }
    *r.body_mut() = crate::upstream::body::empty();
}

/// The answer of a phase that refused the request (or of a run no phase answered), recorded.
fn refusal(x: &mut Exchange<'_>, status: StatusCode, msg: &'static str) -> Response<RespBody> {
    let mut r = local(status, msg, &x.rid);
    x.rate_headers(r.headers_mut());
    x.count(status.as_u16());
    x.finish(status.as_u16(), Some(msg.trim_end().to_string()));
    r
}

async fn run(x: &mut Exchange<'_>, body: Incoming) -> Flow {
    macro_rules! phase {
        ($e:expr) => {
            match $e {
                Flow::Next => {}
                answer => return answer,
            }
        };
    }
    phase!(check::run(x));
    phase!(route::run(x).await);
    phase!(identify::run(x).await);
    if x.route.is_some_and(|r| r.reads_limits) {
        phase!(limit::count(x).await);
    }
    phase!(authorize::run(x).await);
    phase!(limit::run(x).await);
    forward::run(x, body).await
}

#[cfg(test)]
mod tests {
    use crate::testkit::future_size;

    /// hyper moves the request's future when it starts it (into the connection's slot for
    /// HTTP/1, into a task of its own per HTTP/2 stream), and an HTTP/1 connection keeps
    /// room for one for its whole life, idle or not. Rare paths (connecting, key fetches,
    /// external authorizers, uploads, retries, queues, limits) are boxed where they are
    /// awaited so that they do not size it: it was 10.5 KiB before they were.
    #[test]
    fn the_request_future_stays_small() {
        let size = future_size(super::handle);
        eprintln!("pipeline::handle future: {size} bytes");
        assert!(
            size <= 6 * 1024,
            "pipeline::handle's future grew to {size} bytes"
        );
    }
}
