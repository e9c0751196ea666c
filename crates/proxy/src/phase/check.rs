//! The check phase: refuse what no route may see (a smuggling conflict, an oversized head, a
//! CONNECT tunnel), and put the target into its one canonical form (`canon`): the host and
//! path that every later phase, the audit record and the origin see.

use crate::edge::canon::{self, Refusal};
use crate::exchange::{Exchange, Flow, Host};
use http::header::{self, HeaderValue};
use http::{Method, StatusCode, Version};

pub fn run(x: &mut Exchange<'_>) -> Flow {
    // Request smuggling guard: hyper accepts both headers (dropping Content-Length and
    // using chunked); we refuse. See `smuggle` for how the dropped header is noticed.
    let parts = &x.parts;
    if x.conn.smuggle.next_request_conflicts()
        || (parts.headers.contains_key(header::TRANSFER_ENCODING)
            && parts.headers.contains_key(header::CONTENT_LENGTH))
    {
        return Flow::Refuse(
            StatusCode::BAD_REQUEST,
            "conflicting Content-Length and Transfer-Encoding\n",
        );
    }
    if parts.version != Version::HTTP_2
        && canon::head_size(&parts.method, &parts.uri, &parts.headers)
            > x.conn.rules.max_header_size
    {
        return refuse_with(
            x,
            "header_size",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request header section too large\n",
        );
    }
    // portcullis is no forward proxy: a CONNECT tunnel would carry requests that no route
    // or policy sees.
    if parts.method == Method::CONNECT {
        return refuse_with(
            x,
            "connect",
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported\n",
        );
    }
    let raw_host = match request_host(parts) {
        Ok(h) => h,
        Err(msg) => return Flow::Refuse(StatusCode::BAD_REQUEST, msg),
    };
    let t = match canon::target(&parts.uri, &raw_host, &x.conn.rules) {
        Ok(t) => t,
        Err(r) => return refuse(x, r),
    };
    let host = t.host.map(|h| Host {
        name: h.name.into_owned(),
        authority: h.authority,
    });
    let path = match t.path.path {
        std::borrow::Cow::Owned(p) => Some(p),
        std::borrow::Cow::Borrowed(_) => None,
    };
    x.escaped_slash = t.path.escaped_slash;
    x.host = host;
    x.path = path;
    if x.log {
        x.record.host = x.host_name().to_string();
        x.record.path = x.path().to_string();
    }
    Flow::Next
}

/// Counts and logs a request refused for its form, and the answer it gets.
pub fn refuse(x: &Exchange<'_>, r: Refusal) -> Flow {
    refuse_with(x, r.reason(), StatusCode::BAD_REQUEST, r.message())
}

pub fn refuse_with(
    x: &Exchange<'_>,
    reason: &'static str,
    status: StatusCode,
    msg: &'static str,
) -> Flow {
    x.shared
        .metrics
        .refuse(&x.conn.listener, x.conn.peer.ip(), reason);
    Flow::Refuse(status, msg)
}

/// The host a request names. HTTP/2's `:authority`, and the authority of an HTTP/1
/// absolute-form target, win over the `Host` header (RFC 9112 §3.2.2), so routing and
/// forwarding agree on one host; HTTP/1.1 still requires a `Host` header. Empty when an
/// HTTP/1.0 request names none.
fn request_host(parts: &http::request::Parts) -> Result<HeaderValue, &'static str> {
    if parts.headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err("more than one Host header\n");
    }
    match parts.uri.authority() {
        Some(a)
            if parts.version != Version::HTTP_11 || parts.headers.contains_key(header::HOST) =>
        {
            HeaderValue::from_str(a.as_str()).map_err(|_| "invalid Host header\n")
        }
        _ => match parts.headers.get(header::HOST) {
            Some(h) => Ok(h.clone()),
            None if parts.version == Version::HTTP_11 => Err("missing Host header\n"),
            None => Ok(HeaderValue::from_static("")),
        },
    }
}
