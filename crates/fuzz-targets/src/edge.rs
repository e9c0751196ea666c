//! Edge targets: the HTTP/1 request head as the edge reads it, and the smuggling guard.
//!
//! hyper parses client request heads (with httparse); portcullis's own code then
//! canonicalizes the target, the host and the method overrides (`edge::canon`), and the
//! smuggling guard (`edge::smuggle`) follows message boundaries in the raw bytes, with a quick
//! look at line starts that spares a second full parse of most heads. `http1_head` parses a
//! head as hyper does and runs it through all of that; `smuggle_guard` streams bytes through
//! the guard, in one read and in many, and compares what it flags with a strict reading of
//! the same bytes.

use crate::support::{noop_waker, reads};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use portcullis_config::{EscapedSlashes, MethodOverride};
use portcullis_proxy::edge::canon::{self, Rules};
use portcullis_proxy::edge::smuggle::{self, Flags, Guard};
use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};

/// hyper's default limit of header fields in a request head.
const HYPER_MAX_HEADERS: usize = 100;

/// The framing headers of a head: any `Content-Length`, `Transfer-Encoding` or `Upgrade`,
/// or a `CONNECT`.
fn frames(req: &httparse::Request<'_, '_>) -> bool {
    req.method == Some("CONNECT")
        || req.headers.iter().any(|h| {
            ["content-length", "transfer-encoding", "upgrade"]
                .iter()
                .any(|f| h.name.eq_ignore_ascii_case(f))
        })
}

/// The canonical path must be a fixed point: canonical again, unchanged, with the same
/// escaped-slash flag, and free of what canonicalization removes or refuses.
fn check_canonical_path(p: &canon::Path<'_>, merge: bool, slashes: EscapedSlashes) {
    let s: &str = &p.path;
    assert!(s.starts_with('/'), "not absolute: {s:?}");
    assert!(
        s.bytes().all(|b| b.is_ascii_graphic() && b != b'\\'),
        "raw byte in a canonical path: {s:?}"
    );
    if merge {
        assert!(!s.contains("//"), "unmerged slashes: {s:?}");
    }
    for seg in s.split('/') {
        let name = seg.split(';').next().unwrap_or("");
        assert!(name != "." && name != "..", "dot segment in {s:?}");
    }
    let again = canon::path(s, merge, slashes)
        .unwrap_or_else(|r| panic!("canonical path {s:?} refused when read again: {r:?}"));
    assert_eq!(again.path, s, "canonical path changed when read again");
    assert_eq!(again.escaped_slash, p.escaped_slash, "{s:?}");
    let matched = canon::match_path(s);
    assert!(matched.starts_with('/'), "{matched:?}");
}

/// A canonical host must be one: read again, it gives the same name and authority.
fn check_canonical_host(h: &canon::Host<'_>, default_port: u16) {
    assert!(
        !h.name.is_empty() && !h.name.bytes().any(|b| b.is_ascii_uppercase()),
        "{:?}",
        h.name
    );
    let again = canon::host(&h.authority, default_port)
        .unwrap_or_else(|| panic!("canonical authority {:?} refused", h.authority));
    assert_eq!(again.name, h.name);
    assert_eq!(again.authority, h.authority);
}

/// A request head, parsed as hyper parses it (httparse, 100 fields), then canonicalized by
/// every listener rule: the quick look of the smuggling guard must agree with the full parse,
/// and whatever is canonical must stay so when read again.
pub fn http1_head(data: &[u8]) {
    // The guard's quick look against the full parse (see `smuggle::unframed_head_len`). The
    // guard skips blank lines between messages before it looks, and so does httparse.
    let skip = data
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let data = &data[skip..];
    let quick = smuggle::unframed_head_len(data);
    let mut fields = [httparse::EMPTY_HEADER; HYPER_MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(len)) = req.parse(data) else {
        return;
    };
    if let Some(q) = quick {
        assert_eq!(
            q, len,
            "the quick look and httparse end the head at different bytes"
        );
        assert!(!frames(&req), "the quick look missed a framing header");
    }
    if frames(&req) {
        assert_eq!(
            quick, None,
            "the quick look answered for a head with framing"
        );
    }

    // What hyper hands the handler: a method, a URI and a header map.
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(uri) = path.parse::<Uri>() else {
        return;
    };
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        headers.append(n, v);
    }
    let _ = canon::head_size(&method, &uri, &headers);
    let raw_host = uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| headers.get(http::header::HOST).cloned())
        .unwrap_or_else(|| HeaderValue::from_static(""));

    for (merge, slashes, default_port) in [
        (true, EscapedSlashes::Reject, 80),
        (true, EscapedSlashes::Keep, 443),
        (true, EscapedSlashes::Decode, 80),
        (false, EscapedSlashes::Keep, 80),
        (false, EscapedSlashes::Decode, 443),
    ] {
        let rules = Rules {
            merge_slashes: merge,
            escaped_slashes: slashes,
            default_port,
            ..Rules::default()
        };
        if let Ok(t) = canon::target(&uri, &raw_host, &rules) {
            // `target` keeps escaped slashes (or decodes them); refusing them is the route's.
            let kept = match slashes {
                EscapedSlashes::Decode => EscapedSlashes::Decode,
                _ => EscapedSlashes::Keep,
            };
            check_canonical_path(&t.path, merge, kept);
            if let Some(h) = &t.host {
                check_canonical_host(h, default_port);
            }
            if let Some(q) = t.query {
                assert!(canon::query(q).is_ok());
            }
        }
        // The path on its own, under the strictest rule too.
        if let Ok(p) = canon::path(uri.path(), merge, slashes) {
            check_canonical_path(&p, merge, slashes);
            if matches!(p.path, Cow::Borrowed(_)) {
                assert_eq!(p.path, uri.path(), "a borrowed path is the input");
            }
        }
    }
    for mode in [
        MethodOverride::Strip,
        MethodOverride::Reject,
        MethodOverride::Honor,
    ] {
        let mut h = headers.clone();
        if let (MethodOverride::Strip, Ok(m)) = (mode, canon::method_override(&mut h, mode)) {
            assert_eq!(m, None);
            assert!(!h.contains_key("x-http-method-override"));
            assert!(!h.contains_key("x-http-method"));
            assert!(!h.contains_key("x-method-override"));
        }
    }
}

/// Bytes handed to the guard in the given reads, never pending.
struct Reads<'a> {
    reads: Vec<&'a [u8]>,
    next: usize,
}

impl AsyncRead for Reads<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(r) = self.reads.get(self.next) {
            // Reads are at most 16 bytes, or the whole input when given in one.
            let n = r.len().min(buf.remaining());
            buf.put_slice(&r[..n]);
            let rest = &r[n..];
            if rest.is_empty() {
                self.next += 1;
            } else {
                let i = self.next;
                self.reads[i] = rest;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Which request of the stream the guard flags as having both `Content-Length` and
/// `Transfer-Encoding` (1-based; 0 for none), given the stream in these reads.
fn guard_verdict(reads: Vec<&[u8]>) -> u64 {
    let total: usize = reads.iter().map(|r| r.len()).sum();
    let flags = Arc::new(Flags::default());
    let mut g = Guard::new(
        Reads { reads, next: 0 },
        flags.clone(),
        Duration::from_secs(3600),
    );
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut storage = vec![0u8; total.max(1)];
    let mut seen = 0;
    while seen < total {
        let mut buf = ReadBuf::new(&mut storage);
        match Pin::new(&mut g).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => seen += buf.filled().len(),
            _ => break,
        }
    }
    flags.conflict_at.load(Ordering::Relaxed)
}

/// What a strict server makes of a stream of requests, as far as it can tell for sure.
#[derive(Debug, PartialEq)]
struct Reading {
    /// Requests read in full, head and body, before the reading stopped.
    complete: u64,
    /// The request that had both `Content-Length` and `Transfer-Encoding`, if one did.
    conflict: Option<u64>,
}

/// A strict chunked body at the start of `b` (RFC 9112 §7.1, hyper's limits): its length,
/// or None when it is malformed, incomplete, or anything a lenient reader could take another
/// way.
fn strict_chunked(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut ext_total = 0usize;
    loop {
        let line_end = i + b[i..].windows(2).position(|w| w == b"\r\n")?;
        let line = &b[i..line_end];
        let digits = line.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 15 {
            return None;
        }
        let rest = &line[digits..];
        if !rest.is_empty() {
            // Only `;extension` (no CR, LF or NUL), as hyper reads it.
            if rest[0] != b';' || rest.iter().any(|&c| c == b'\r' || c == b'\n' || c == 0) {
                return None;
            }
            ext_total += rest.len();
            if ext_total >= 16 * 1024 {
                return None;
            }
        }
        let size = usize::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            break;
        }
        let end = i.checked_add(size)?;
        if b.len() < end + 2 || &b[end..end + 2] != b"\r\n" {
            return None;
        }
        i = end + 2;
    }
    // Trailer fields, each `name: value` on its own CRLF line, then an empty line.
    let mut trailers = 0usize;
    loop {
        let line_end = i + b[i..].windows(2).position(|w| w == b"\r\n")?;
        let line = &b[i..line_end];
        i = line_end + 2;
        if line.is_empty() {
            return Some(i);
        }
        trailers += line.len();
        let colon = line.iter().position(|&c| c == b':')?;
        if colon == 0
            || trailers > 16 * 1024
            || line.iter().any(|&c| c == b'\r' || c == b'\n' || c == 0)
            || !line[..colon]
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_".contains(c))
        {
            return None;
        }
    }
}

/// Reads `stream` as a strict HTTP/1.1 server would, stopping at the first thing it is not
/// sure about (a malformed or incomplete message, an upgrade, a framing it would refuse).
fn strict_reading(stream: &[u8]) -> Reading {
    let mut pos = 0;
    let mut n = 0;
    loop {
        while pos < stream.len() && matches!(stream[pos], b'\r' | b'\n') {
            pos += 1;
        }
        if pos >= stream.len() {
            return Reading {
                complete: n,
                conflict: None,
            };
        }
        let mut fields = [httparse::EMPTY_HEADER; HYPER_MAX_HEADERS];
        let mut req = httparse::Request::new(&mut fields);
        let stop = Reading {
            complete: n,
            conflict: None,
        };
        let Ok(httparse::Status::Complete(len)) = req.parse(&stream[pos..]) else {
            return stop;
        };
        let mut cl: Vec<&[u8]> = Vec::new();
        let mut te: Vec<&[u8]> = Vec::new();
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te.push(h.value);
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if !cl.is_empty() && !te.is_empty() {
            return Reading {
                complete: n,
                conflict: Some(n + 1),
            };
        }
        if upgrade || req.method == Some("CONNECT") || req.version != Some(1) {
            return stop;
        }
        let body_start = pos + len;
        let body_len = if !te.is_empty() {
            let all = te.join(&b","[..]);
            let Ok(all) = std::str::from_utf8(&all) else {
                return stop;
            };
            let codings: Vec<String> = all
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .collect();
            if codings != ["chunked"] {
                return stop;
            }
            match strict_chunked(&stream[body_start..]) {
                Some(l) => l,
                None => return stop,
            }
        } else if let Some(first) = cl.first() {
            if first.is_empty()
                || first.len() > 15
                || !first.iter().all(u8::is_ascii_digit)
                || cl.iter().any(|v| v != first)
            {
                return stop;
            }
            let Some(l) = std::str::from_utf8(first)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
            else {
                return stop;
            };
            l
        } else {
            0
        };
        if stream.len() - body_start < body_len {
            return stop;
        }
        n += 1;
        pos = body_start + body_len;
    }
}

/// A byte stream from a client: the first byte chooses how it is cut into reads, the rest is
/// the stream. The guard must flag the same request whether the stream comes in one read or
/// in many, and it must agree with a strict reading: the request a strict server finds with
/// both framing headers is the one flagged, and no request before a strict server would stop
/// reading is.
pub fn smuggle_guard(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = guard_verdict(vec![stream]);
    let cut = guard_verdict(reads(stream, seed));
    let strict = strict_reading(stream);
    for (how, got) in [("in one read", whole), ("in many reads", cut)] {
        match strict.conflict {
            Some(k) => assert_eq!(
                got, k,
                "{how}: request {k} has both Content-Length and Transfer-Encoding, the guard \
                 flagged {got} ({strict:?})"
            ),
            None => assert!(
                got == 0 || got > strict.complete,
                "{how}: the guard flagged request {got}, which a strict reading finds \
                 well-framed ({strict:?})"
            ),
        }
    }
}
