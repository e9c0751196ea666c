//! The HTTP/1.1 client for upstream connections: writes a request head and streams its body,
//! reads the response head and frames the response body (Content-Length, chunked, or until
//! close), and hands a connection back for reuse only when the exchange ended cleanly.
//!
//! Why not hyper's client connection: hyper's `SendRequest` passes every request through a
//! channel to a connection future, answers through a oneshot, and consumes the request, so a
//! retry needs a copy of every header. On the benchmark's plain route that machinery was a
//! third of portcullis's user-space CPU per request (see BENCHMARKS.md). Here the request is
//! written straight from the borrowed head, on the request's own task. hyper still serves
//! clients, and still runs h2 upstreams. Parsing is httparse's, as in hyper.
//!
//! What the origin sends is checked as strictly as what clients send: a response with both
//! Content-Length and Transfer-Encoding, conflicting lengths, or malformed chunks fails the
//! request (502) and the connection is closed, so a confused origin cannot desynchronize a
//! pooled connection.

use crate::upstream::body::{BoxError, ReqBody};
use crate::upstream::stream::Stream;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest response head accepted from an origin.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) or trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;
/// How much room a read asks for: it starts small, so that the buffers of many connections
/// stay in the CPU caches, and doubles while reads fill it (a large body), up to the maximum.
const READ_MIN: usize = 4 * 1024;
const READ_MAX: usize = 64 * 1024;

/// One HTTP/1.1 connection to an origin.
pub struct Conn {
    io: Stream,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// The request head being written (kept for its capacity).
    out: Vec<u8>,
    /// The room the next read asks for (see `READ_MIN`).
    read_size: usize,
}

/// Why a request failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the origin (the connection was already closed): as safe to retry as a
    /// connect failure. The request body is handed back.
    NotSent(ReqBody),
    /// The client's request body failed or grew past the route's limit.
    Body(BoxError),
    /// The origin or the connection failed.
    Upstream(String),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

fn upstream(what: impl std::fmt::Display) -> SendError {
    SendError::Upstream(what.to_string())
}

/// Reads more bytes into the connection's buffer; 0 means the connection was closed.
fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    let want = conn.read_size;
    if conn.buf.capacity() - conn.buf.len() < want / 4 {
        // Reuses the same memory once the bytes handed out earlier have been dropped.
        conn.buf.reserve(want);
    }
    let room = conn.buf.capacity() - conn.buf.len();
    let n = ready!(tokio_util::io::poll_read_buf(
        Pin::new(&mut conn.io),
        cx,
        &mut conn.buf
    ))?;
    conn.read_size = if n == room {
        (want * 2).min(READ_MAX)
    } else if n < want / 4 {
        (want / 2).max(READ_MIN)
    } else {
        want
    };
    Poll::Ready(Ok(n))
}

async fn fill(conn: &mut Conn) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_fill(conn, cx)).await
}

impl Conn {
    pub fn new(io: Stream) -> Self {
        Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::new(),
            read_size: READ_MIN,
        }
    }

    /// Whether an idle connection can take a request: the origin has not closed it or sent
    /// anything unasked. Costs no system call while the socket has nothing to read.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        let mut rb = ReadBuf::uninit(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut rb),
            Poll::Pending
        )
    }

    /// Sends one request and reads the response head. `target` is the origin-form request
    /// target; `headers` must already be the upstream headers (hop-by-hop fields removed,
    /// Host set). On success the response body owns the connection and returns it to `pool`
    /// once the exchange has ended cleanly.
    pub async fn send(
        mut self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        mut body: ReqBody,
        pool: Arc<dyn Home>,
    ) -> Result<Response<UpBody>, SendError> {
        let has_body = !body.is_end_stream();
        let length = if !has_body {
            None
        } else if let Some(v) = headers.get(header::CONTENT_LENGTH) {
            Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| SendError::Body("invalid Content-Length".into()))?,
            )
        } else {
            body.size_hint().exact()
        };
        // The head: request line, the headers as given, and the body's framing.
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        // With a body, its length line is written below, from what was checked above.
        put_fields(out, headers, has_body);
        match (has_body, length) {
            (false, _) => {}
            (true, Some(n)) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            (true, None) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        out.extend_from_slice(b"\r\n");

        // A write that fails before any byte went out means the origin never saw the request.
        match self.io.write(&self.out).await {
            Ok(0) | Err(_) => return Err(SendError::NotSent(body)),
            Ok(n) if n < self.out.len() => {
                let rest = &self.out[n..];
                self.io.write_all(rest).await.map_err(upstream)?;
            }
            Ok(_) => {}
        }

        // Boxed: only a request with a body uploads, and that future inline would size
        // every request's future (see `pipeline::handle`).
        let sent_all = !has_body || Box::pin(self.upload(&mut body, length.is_none())).await?;
        self.read_response(method, sent_all, has_body, pool).await
    }

    /// Sends the request body while the origin is watched: an origin that refuses the
    /// request (4xx/5xx) before reading all of it, such as a 413 for an upload over its
    /// limit, is answered at once instead of when the upload stalls. Its connection is then
    /// closed, not reused. An early 1xx or 2xx/3xx does not stop the upload. Whether all of
    /// the body went out before any answer arrived (else the connection is not reused).
    async fn upload(&mut self, body: &mut ReqBody, chunked: bool) -> Result<bool, SendError> {
        let Conn { io, buf, .. } = self;
        let (mut rd, mut wr) = tokio::io::split(io);
        let (result, answered) = {
            let upload = send_body(&mut wr, body, chunked);
            let watch = early_answer(&mut rd, buf);
            tokio::pin!(upload, watch);
            let result = tokio::select! {
                biased;
                r = &mut upload => Some(r),
                refused = &mut watch => if refused { None } else { Some(upload.await) },
            };
            // Whether an answer had begun to arrive while the body went out: polled once
            // more now. `early_answer` is cancel-safe: what it read stays in `buf`.
            let answered = matches!(result, Some(Ok(())))
                && std::future::poll_fn(|cx| {
                    Poll::Ready(std::future::Future::poll(watch.as_mut(), cx).is_ready())
                })
                .await;
            (result, answered)
        };
        match result {
            // An answer that arrived before the body was all sent (any status: an origin that
            // answers 200 from the head alone has not read the body either) leaves the
            // connection unfit for reuse.
            Some(Ok(())) => Ok(!answered),
            Some(Err(SendError::Upstream(e))) => {
                // The origin may have answered early and closed: use its answer if it is
                // already here.
                tracing::debug!(error = %e, "upstream stopped reading the request body");
                Ok(false)
            }
            Some(Err(e)) => Err(e),
            None => {
                tracing::debug!("upstream refused the request before its body was sent");
                Ok(false)
            }
        }
    }

    /// Reads the response head (skipping interim 1xx responses other than 101) and works out
    /// how the body is framed.
    async fn read_response(
        mut self,
        method: &Method,
        sent_all: bool,
        had_body: bool,
        pool: Arc<dyn Home>,
    ) -> Result<Response<UpBody>, SendError> {
        loop {
            let parsed = loop {
                if !self.buf.is_empty() {
                    if let Some(p) = parse_head(&mut self.buf)? {
                        break p;
                    }
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(upstream("response head too large"));
                }
                match fill(&mut self).await {
                    Ok(0) => return Err(upstream("connection closed before the response")),
                    Ok(_) => {}
                    Err(e) => return Err(upstream(e)),
                }
            };
            let Head {
                status,
                headers,
                framing,
                keep_alive,
            } = parsed;
            if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                continue;
            }
            // A 204 may not have a body (RFC 9110 §15.3.5); one whose head frames a body will
            // send bytes nobody reads, perhaps after the connection has gone back to the pool.
            let stray_body = status == StatusCode::NO_CONTENT
                && matches!(framing, Framing::Chunked | Framing::Length(1..));
            let kind = if status == StatusCode::SWITCHING_PROTOCOLS {
                Kind::Upgraded
            } else if method == Method::HEAD
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED
            {
                Kind::Length(0)
            } else {
                match framing {
                    Framing::Length(n) => Kind::Length(n),
                    Framing::Chunked => Kind::Chunked(Chunk::Size),
                    Framing::Close => Kind::Close,
                }
            };
            // An origin that refuses a request with a body (401, 413, 415…) may have answered
            // from the head alone and left the body unread on the connection, where it would
            // be read as the next request, and a later client's request answered with what
            // that body asked for. Not knowing whether it read the body, portcullis closes
            // the connection.
            let refused_body = had_body && status.as_u16() >= 400;
            // A body on a method that gives it no meaning (RFC 9110 §9.3): many origins
            // never read it, and then read it as the next request on the connection, which
            // would carry a request portcullis never routed, or swallow another client's.
            let unread_body = had_body && body_unread_by_some(method);
            let reusable = keep_alive
                && sent_all
                && !refused_body
                && !unread_body
                && !stray_body
                && !matches!(kind, Kind::Close | Kind::Upgraded);
            let mut resp = Response::new(UpBody {
                conn: Some(self),
                kind,
                reusable,
                pool,
            });
            *resp.status_mut() = status;
            *resp.version_mut() = Version::HTTP_11;
            *resp.headers_mut() = headers;
            resp.body_mut().finish_if_ended();
            return Ok(resp);
        }
    }
}

/// Methods whose request body has no defined meaning (RFC 9110 §9.3.1, §9.3.2, §9.3.5,
/// §9.3.7, §9.3.8): an origin may answer them without reading a body.
fn body_unread_by_some(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// Where a connection goes back once its exchange has ended cleanly: the server's pool. A
/// trait, so that this client does not depend on the pool that depends on it.
pub trait Home: Send + Sync {
    fn put_back(&self, c: Conn);
}

/// Streams a request body to the origin, chunked (with trailers) or as is.
async fn send_body<W: AsyncWrite + Unpin>(
    w: &mut W,
    body: &mut ReqBody,
    chunked: bool,
) -> Result<(), SendError> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(SendError::Body)?;
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) if chunked => {
                let size = format!("{:x}\r\n", data.len());
                let mut b = size.as_bytes().chain(data).chain(&b"\r\n"[..]);
                w.write_all_buf(&mut b).await.map_err(upstream)?;
            }
            Ok(mut data) => w.write_all_buf(&mut data).await.map_err(upstream)?,
            Err(frame) => {
                if let (true, Ok(trailers)) = (chunked, frame.into_trailers()) {
                    let mut t = b"0\r\n".to_vec();
                    put_fields(&mut t, &trailers, true);
                    t.extend_from_slice(b"\r\n");
                    w.write_all(&t).await.map_err(upstream)?;
                    return Ok(());
                }
            }
        }
    }
    if chunked {
        w.write_all(b"0\r\n\r\n").await.map_err(upstream)?;
    }
    Ok(())
}

/// Reads what the origin sends while the request body is still going out, into `buf` (where
/// `read_response` finds it). Resolves with `true` once the origin has refused the request:
/// a final response head with a 4xx or 5xx status, a malformed head, or a closed or failed
/// connection; with `false` once a final head with another status has arrived; and never
/// while only interim (1xx) responses have come. Cancel-safe: a read either completes into
/// `buf` or reads nothing.
async fn early_answer<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> bool {
    loop {
        let mut at = 0;
        while at < buf.len() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf[at..]) {
                Ok(httparse::Status::Complete(n)) => match resp.code {
                    Some(c) if (100..200).contains(&c) && c != 101 => at += n,
                    Some(c) => return c >= 400,
                    None => return true,
                },
                Ok(httparse::Status::Partial) => break,
                Err(_) => return true,
            }
        }
        if buf.len() >= MAX_HEAD {
            return true;
        }
        buf.reserve(READ_MIN);
        match tokio::io::AsyncReadExt::read_buf(r, buf).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
}

/// Writes header fields as `name: value` lines; `Content-Length` is left out if `skip_length`.
fn put_fields(out: &mut Vec<u8>, fields: &HeaderMap, skip_length: bool) {
    for (k, v) in fields {
        if skip_length && k == header::CONTENT_LENGTH {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

enum Framing {
    Length(u64),
    Chunked,
    Close,
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

/// Header fields about one connection, never passed on (RFC 9110 §7.6.1). `Trailer` is
/// end to end (§6.6.2): it names the trailers that follow, which an HTTP/1.1 client is sent
/// only when they are named.
fn is_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == header::TRANSFER_ENCODING
        || n == header::TE
        || n == header::PROXY_AUTHENTICATE
        || n.as_str() == "keep-alive"
        || n.as_str() == "proxy-connection"
}

/// Parses a complete response head off the front of `buf`; `None` while it is incomplete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, SendError> {
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut r, buf, &mut raw)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(upstream(format_args!("invalid response head: {e}"))),
    };
    let status = StatusCode::from_u16(r.code.unwrap_or(0))
        .map_err(|_| upstream("invalid response status"))?;
    let http11 = r.version == Some(1);

    // First pass: framing and the Connection header's options.
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut te = false;
    let mut close = !http11;
    let mut named: Vec<HeaderName> = Vec::new();
    // Where each field's name and value are in `buf`, to share its bytes after the split.
    let base = buf.as_ptr() as usize;
    // (Inline for the usual head, so nothing is zeroed or allocated per response.)
    let mut spans: smallvec::SmallVec<[(u32, u32, u32, u32); 32]> = smallvec::SmallVec::new();
    let count = r.headers.len();
    for h in r.headers.iter() {
        spans.push((
            (h.name.as_ptr() as usize - base) as u32,
            h.name.len() as u32,
            (h.value.as_ptr() as usize - base) as u32,
            h.value.len() as u32,
        ));
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| upstream("invalid Content-Length in response"))?;
            if length.is_some_and(|l| l != n) {
                return Err(upstream("conflicting Content-Length in response"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked`, alone: portcullis removes the framing it decodes, and a coding
            // under it (`gzip, chunked`) would reach the client as bytes nothing says are
            // compressed. No origin framework sends one unasked (a request never has `TE`
            // with another coding from portcullis).
            // (Empty list elements, as in `chunked,`, are no codings: RFC 9110 §5.6.1.)
            let only_chunked = !te
                && std::str::from_utf8(h.value).is_ok_and(|v| {
                    let mut codings = v.split(',').map(str::trim).filter(|c| !c.is_empty());
                    codings
                        .next()
                        .is_some_and(|c| c.eq_ignore_ascii_case("chunked"))
                        && codings.next().is_none()
                });
            if !only_chunked {
                return Err(upstream(
                    "response has a transfer coding other than chunked",
                ));
            }
            te = true;
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in std::str::from_utf8(h.value).unwrap_or("").split(',') {
                let t = t.trim();
                if t.eq_ignore_ascii_case("close") {
                    close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    if !http11 {
                        close = false;
                    }
                } else if t.eq_ignore_ascii_case("upgrade") {
                    // Kept on a 101 (the tunnel needs it); removed otherwise.
                } else if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                    named.push(n);
                }
            }
        }
    }
    if te && length.is_some() {
        return Err(upstream(
            "response has both Content-Length and Transfer-Encoding",
        ));
    }
    let framing = match (te, chunked, length) {
        (true, true, _) => Framing::Chunked,
        (true, false, _) => Framing::Close,
        (false, _, Some(n)) => Framing::Length(n),
        (false, _, None) => Framing::Close,
    };
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;

    // Second pass: the header map, sharing the head's bytes.
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(ns, nl, vs, vl) in &spans {
        let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
        let name = HeaderName::from_bytes(&head[ns..ns + nl])
            .map_err(|_| upstream("invalid header name in response"))?;
        if (is_hop(&name) && !(upgrade && name == header::CONNECTION))
            || (name == header::UPGRADE && !upgrade)
            || named.contains(&name)
        {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
            .map_err(|_| upstream("invalid header value in response"))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        headers,
        framing,
        keep_alive: !close,
    }))
}

/// Where a chunked body's decoder is.
#[derive(Clone, Copy)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, with this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, up to an empty line.
    Trailers,
}

enum Kind {
    Length(u64),
    Chunked(Chunk),
    Close,
    /// A 101 response: the connection now belongs to the tunnel.
    Upgraded,
    Done,
}

/// A response body read from an origin connection.
pub struct UpBody {
    conn: Option<Conn>,
    kind: Kind,
    reusable: bool,
    pool: Arc<dyn Home>,
}

impl UpBody {
    /// The connection of a 101 response, with any bytes the origin already sent past it.
    pub fn take_upgraded(&mut self) -> Option<(Stream, Bytes)> {
        if !matches!(self.kind, Kind::Upgraded) {
            return None;
        }
        self.kind = Kind::Done;
        let c = self.conn.take()?;
        Some((c.io, c.buf.freeze()))
    }

    /// Once the body has ended, a reusable connection goes back to the pool.
    fn finish_if_ended(&mut self) {
        if matches!(self.kind, Kind::Length(0)) {
            self.kind = Kind::Done;
        }
        if matches!(self.kind, Kind::Done) {
            if let Some(c) = self.conn.take() {
                if self.reusable && c.buf.is_empty() {
                    self.pool.put_back(c);
                }
            }
        }
    }

    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.kind = Kind::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e.into())))
    }
}

/// Decodes as much of a chunked body as is buffered: a data frame, trailers, the end, or
/// `None` when more bytes are needed.
fn decode_chunk(
    kind: &mut Kind,
    buf: &mut BytesMut,
) -> Result<Option<Option<Frame<Bytes>>>, BoxError> {
    loop {
        let Kind::Chunked(state) = *kind else {
            return Ok(Some(None));
        };
        match state {
            Chunk::Size => {
                // The limit holds however the line arrives: in one read or in many (a trailing
                // CR may be the start of the line's end). Found by fuzzing: a 5 KiB line was
                // taken whole but refused when it came in pieces.
                let Some(end) = find_crlf(buf) else {
                    if buf.len() - usize::from(buf.ends_with(b"\r")) > MAX_CHUNK_LINE {
                        return Err("chunk size line too long".into());
                    }
                    return Ok(None);
                };
                if end > MAX_CHUNK_LINE {
                    return Err("chunk size line too long".into());
                }
                let line = &buf[..end];
                let digits = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                let rest = &line[digits..];
                // Extensions (`;name=value`) are ignored; nothing else may follow.
                if digits == 0
                    || digits > 15
                    || !(rest.is_empty() || matches!(rest[0], b';' | b' ' | b'\t'))
                    || rest.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0)
                {
                    return Err("invalid chunk size".into());
                }
                let size =
                    u64::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap_or("x"), 16)
                        .map_err(|_| "invalid chunk size")?;
                buf.advance(end + 2);
                *kind = Kind::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                });
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (buf.len() as u64).min(left) as usize;
                let data = buf.split_to(n).freeze();
                *kind = Kind::Chunked(if n as u64 == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n as u64)
                });
                return Ok(Some(Some(Frame::data(data))));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("missing CRLF after chunk data".into());
                }
                buf.advance(2);
                *kind = Kind::Chunked(Chunk::Size);
            }
            Chunk::Trailers => {
                if buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    *kind = Kind::Done;
                    return Ok(Some(None));
                }
                // As for chunk-size lines: the same limit in one read or in many.
                let Some(end) = find_double_crlf(buf) else {
                    if buf.len() >= MAX_TRAILERS {
                        return Err("trailer section too large".into());
                    }
                    return Ok(None);
                };
                if end + 4 > MAX_TRAILERS {
                    return Err("trailer section too large".into());
                }
                let section = buf.split_to(end + 4);
                *kind = Kind::Done;
                let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let fields = match httparse::parse_headers(&section, &mut raw) {
                    Ok(httparse::Status::Complete((_, h))) => h,
                    _ => return Err("invalid trailer section".into()),
                };
                let mut trailers = HeaderMap::new();
                for f in fields.iter() {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(f.name.as_bytes()),
                        HeaderValue::from_bytes(f.value),
                    ) {
                        trailers.append(k, v);
                    }
                }
                return Ok(Some(Some(Frame::trailers(trailers))));
            }
        }
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn find_double_crlf(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n")
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let frame = match this.kind {
                Kind::Done | Kind::Upgraded => None,
                Kind::Length(0) => {
                    this.finish_if_ended();
                    None
                }
                Kind::Length(left) => {
                    let Some(conn) = this.conn.as_mut() else {
                        return this.fail("connection gone");
                    };
                    if conn.buf.is_empty() {
                        match ready!(poll_fill(conn, cx)) {
                            Ok(0) => return this.fail("origin closed the connection mid-body"),
                            Ok(_) => {}
                            Err(e) => return this.fail(e),
                        }
                    }
                    let n = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    this.kind = Kind::Length(left - n as u64);
                    this.finish_if_ended();
                    Some(Frame::data(data))
                }
                Kind::Close => {
                    let Some(conn) = this.conn.as_mut() else {
                        return this.fail("connection gone");
                    };
                    if conn.buf.is_empty() {
                        match ready!(poll_fill(conn, cx)) {
                            Ok(0) => {
                                this.kind = Kind::Done;
                                this.conn = None;
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return this.fail(e),
                        }
                    }
                    Some(Frame::data(conn.buf.split().freeze()))
                }
                Kind::Chunked(_) => match this
                    .conn
                    .as_mut()
                    .ok_or_else(|| BoxError::from("connection gone"))
                    .and_then(|c| decode_chunk(&mut this.kind, &mut c.buf))
                {
                    Err(e) => return this.fail(e),
                    Ok(Some(f)) => {
                        this.finish_if_ended();
                        f
                    }
                    Ok(None) => {
                        let Some(conn) = this.conn.as_mut() else {
                            return this.fail("connection gone");
                        };
                        match ready!(poll_fill(conn, cx)) {
                            Ok(0) => return this.fail("origin closed the connection mid-body"),
                            Ok(_) => continue,
                            Err(e) => return this.fail(e),
                        }
                    }
                },
            };
            return Poll::Ready(frame.map(Ok));
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Done | Kind::Upgraded | Kind::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.kind {
            Kind::Length(n) => SizeHint::with_exact(n),
            Kind::Done | Kind::Upgraded => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<Head>, SendError> {
        parse_head(&mut BytesMut::from(s))
    }

    #[test]
    fn heads_frame_the_body() {
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert!(matches!(h.framing, Framing::Length(5)) && h.keep_alive);
        assert!(h.headers.get("connection").is_none() && h.headers.get("x-a").is_some());
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Chunked));
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: , chunked,\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.framing, Framing::Chunked));
        assert!(h.headers.get("transfer-encoding").is_none());
        // Another coding would reach the client as bytes nothing says are coded.
        for te in [
            "gzip, chunked",
            "gzip",
            "chunked, gzip",
            "identity",
            "chunked\r\nTransfer-Encoding: chunked",
        ] {
            let r = head(&format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n"
            ));
            assert!(r.is_err(), "{te}");
        }
        let h = head("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(matches!(h.framing, Framing::Close) && !h.keep_alive);
        let h = head("HTTP/1.1 200 OK\r\nConnection: close, x-hop\r\nx-hop: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive && h.headers.get("x-hop").is_none());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")
            .unwrap()
            .is_none());
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").is_err());
        assert!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
                .is_err()
        );
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").is_ok());
    }

    fn chunked(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        let mut kind = Kind::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(input);
        let (mut data, mut trailers) = (Vec::new(), None);
        loop {
            match decode_chunk(&mut kind, &mut buf)? {
                Some(Some(f)) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Some(None) => return Ok((data, trailers)),
                None => return Err("incomplete".into()),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode() {
        let (d, t) = chunked(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n").unwrap();
        assert_eq!(d, b"hello world");
        assert!(t.is_none());
        let (d, t) = chunked(b"3\r\nabc\r\n0\r\nx-checksum: 9\r\n\r\n").unwrap();
        assert_eq!(d, b"abc");
        assert_eq!(t.unwrap().get("x-checksum").unwrap(), "9");
        assert!(chunked(b"3\r\nabcd\r\n0\r\n\r\n").is_err());
        assert!(chunked(b"zz\r\nabc\r\n0\r\n\r\n").is_err());
        assert!(chunked(b"ffffffffffffffffff\r\n").is_err());
        assert!(chunked(b"-3\r\nabc\r\n").is_err());
    }
}

/// Entry points for the fuzz targets (`crates/fuzz-targets`) into the private response-head
/// parser and chunked decoder. Not an API.
#[doc(hidden)]
pub mod fuzz {
    use super::*;

    /// A parsed response head, flattened: the status, the fields passed on, the body's
    /// framing (`length N`, `chunked` or `close`), keep-alive, and the bytes the head took.
    #[derive(Debug, PartialEq, Eq)]
    pub struct ResponseHead {
        pub status: u16,
        pub headers: HeaderMap,
        pub framing: String,
        pub keep_alive: bool,
        pub consumed: usize,
    }

    /// What `parse_head` makes of `bytes`: `Ok(None)` while incomplete.
    pub fn response_head(bytes: &[u8]) -> Result<Option<ResponseHead>, String> {
        let mut buf = BytesMut::from(bytes);
        match parse_head(&mut buf) {
            Ok(Some(h)) => Ok(Some(ResponseHead {
                status: h.status.as_u16(),
                headers: h.headers,
                framing: match h.framing {
                    Framing::Length(n) => format!("length {n}"),
                    Framing::Chunked => "chunked".into(),
                    Framing::Close => "close".into(),
                },
                keep_alive: h.keep_alive,
                consumed: bytes.len() - buf.len(),
            })),
            Ok(None) => Ok(None),
            Err(SendError::Upstream(e)) => Err(e),
            Err(_) => Err("another error".into()),
        }
    }

    /// A chunked body decoded as it arrives in `reads`: `Ok(Some((data, trailers, left)))`
    /// once it ends (`left`: the bytes after it), `Ok(None)` while incomplete, or the error.
    #[allow(clippy::type_complexity)]
    pub fn chunked(
        reads: &[&[u8]],
    ) -> Result<Option<(Vec<u8>, Option<HeaderMap>, Vec<u8>)>, String> {
        let mut kind = Kind::Chunked(Chunk::Size);
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        for (i, r) in reads.iter().enumerate() {
            buf.extend_from_slice(r);
            loop {
                match decode_chunk(&mut kind, &mut buf).map_err(|e| e.to_string())? {
                    Some(Some(f)) => match f.into_data() {
                        Ok(d) => data.extend_from_slice(&d),
                        Err(f) => trailers = f.into_trailers().ok(),
                    },
                    Some(None) => {
                        let left = [&buf[..], &reads[i + 1..].concat()].concat();
                        return Ok(Some((data, trailers, left)));
                    }
                    None => break,
                }
            }
        }
        Ok(None)
    }
}
