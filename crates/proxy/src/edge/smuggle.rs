//! A request-smuggling guard for HTTP/1.1 client connections. hyper resolves a request that
//! carries both `Content-Length` and `Transfer-Encoding` by dropping `Content-Length` (and
//! closing the connection afterwards), so the handler cannot see the conflict. This wrapper
//! watches the bytes the client sends, follows message boundaries (heads, fixed-length and
//! chunked bodies), and records which request on the connection had both headers, so the
//! handler can answer 400 and never forward it.
//!
//! It only reads what passes through; hyper still does the real parsing. On anything it does
//! not understand (an h2 preface, an upgrade, a malformed head) it stops watching, since
//! hyper then either rejects the request itself or leaves HTTP/1.1. A connection it no
//! longer watches serves no further request: the answer to the request that blinded it
//! (a refused upgrade, a CONNECT) closes it ([`Flags::blind`], `pipeline::handle`), unless
//! it opened a tunnel; else a later request would have neither this guard nor its header
//! timeout.
//!
//! Because it knows where heads start and end, it also enforces `timeouts.client_header`
//! (the slowloris guard): from accept until the first head is complete, and from the first
//! byte of each later head until that head is complete. An idle keep-alive connection
//! waiting for its next request is therefore governed by `timeouts.idle` alone, and a head
//! that arrives in one read (the usual case) arms no timer at all.
//!
//! It also tells `park` whether the bytes read so far end on a message boundary: an idle
//! connection is only parked then.

use crate::edge::passthrough::delegate_async_write;
use crate::edge::ready::ReadReady;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the wrapper, the request handler and the connection's driver.
#[derive(Default, Debug)]
pub struct Flags {
    /// 1-based index of the first request that had both headers; 0 if none.
    pub conflict_at: AtomicU64,
    /// Requests the handler has seen on this connection.
    pub handled: AtomicU64,
    /// Whether the bytes read so far end where a message ends (see `between_messages`).
    between: AtomicBool,
    /// Set when the guard stops watching (see `blind`).
    blind: AtomicBool,
}

impl Flags {
    /// Called once per request by the handler: is this the conflicting request?
    pub fn next_request_conflicts(&self) -> bool {
        let n = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
        self.conflict_at.load(Ordering::Relaxed) == n
    }

    /// Whether every message the guard has seen is complete (head and body) and no byte of
    /// the next one has arrived, other than blank lines. False once the guard stops watching.
    /// `park` parks a connection only then.
    pub fn between_messages(&self) -> bool {
        self.between.load(Ordering::Relaxed)
    }

    /// Whether the guard has stopped watching this connection (an upgrade, a CONNECT, a head
    /// it could not read). It stops as it reads the head that makes it stop, before hyper
    /// hands that request over, so the request's handler sees it set, and its answer must
    /// close the connection unless it opens a tunnel.
    pub fn blind(&self) -> bool {
        self.blind.load(Ordering::Relaxed)
    }
}

enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers,
    Done,
}

/// Heads larger than this are hyper's problem (it answers 431); stop watching.
const MAX_HEAD: usize = 256 * 1024;
/// A chunk-size line (with its extensions) or a trailer line longer than this: stop watching.
/// It must be more than hyper accepts (16 KiB of chunk extensions per body, 16 KiB of
/// trailers), so that hyper has refused the body before the guard looks away: at 4 KiB, a
/// 5 KiB extension sent over a few reads blinded the guard to the next request on the
/// connection (found by the `smuggle_guard` fuzz target, docs/reliability.md).
const MAX_LINE: usize = 64 * 1024;

pub struct Guard<T> {
    inner: T,
    state: State,
    head: Vec<u8>,
    line: Vec<u8>,
    seen: u64,
    flags: Arc<Flags>,
    header_timeout: Duration,
    /// Running while a head is awaited (see the module doc).
    header_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Guard<T> {
    pub fn new(inner: T, flags: Arc<Flags>, header_timeout: Duration) -> Self {
        flags.between.store(true, Ordering::Relaxed);
        Guard {
            inner,
            state: State::Head,
            head: Vec::new(),
            line: Vec::new(),
            seen: 0,
            flags,
            header_timeout,
            header_timer: None,
        }
    }

    /// Makes the first head due by `deadline` (the connection's accept time plus the header
    /// timeout) rather than a full header timeout after the first read.
    pub fn first_head_by(mut self, deadline: tokio::time::Instant) -> Self {
        self.header_timer = Some(Box::pin(tokio::time::sleep_until(deadline)));
        self
    }

    /// Stops watching, and says so in the flags.
    fn stop(&mut self) {
        self.state = State::Done;
        self.flags.blind.store(true, Ordering::Relaxed);
    }

    /// Whether a head is being awaited: the first one (nothing complete yet) or one whose
    /// first bytes have arrived.
    fn awaiting_head(&self) -> bool {
        matches!(self.state, State::Head) && (self.seen == 0 || !self.head.is_empty())
    }

    /// Arms or disarms the header timer after a read; true if it has expired.
    fn poll_header_timer(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.awaiting_head() {
            self.header_timer = None;
            return false;
        }
        let t = self
            .header_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(self.header_timeout)));
        std::future::Future::poll(t.as_mut(), cx).is_ready()
    }

    /// Adds `data` to a head begun in an earlier read: how much of `data` the head took, when
    /// it is complete now; None when it is not (or the guard stopped watching).
    fn extend_head(&mut self, data: &[u8]) -> Option<usize> {
        let before = self.head.len();
        self.head.extend_from_slice(data);
        // A head ends at an empty line. Until one may have arrived, a parse can only say
        // "incomplete": parsing all of it again on each read would cost a head sent a byte
        // at a time the square of its length.
        let parsed = if may_end_a_head(&self.head[before.saturating_sub(2)..]) {
            let head = std::mem::take(&mut self.head);
            let parsed = self.parse_head(&head);
            self.head = head;
            parsed
        } else {
            Some(None)
        };
        match parsed {
            Some(Some(used)) => {
                self.head.clear();
                Some(used - before)
            }
            Some(None) => {
                if self.head.len() > MAX_HEAD {
                    self.stop();
                }
                None
            }
            None => {
                self.stop();
                None
            }
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return,
                State::Head => {
                    // Skip blank lines between messages (RFC 9112 §2.2).
                    if self.head.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    // Fast path: the whole head arrived in this read (the usual case), so
                    // parse it in place instead of copying it into `head` first.
                    if self.head.is_empty() {
                        match self.parse_head(data) {
                            Some(Some(used)) => {
                                data = &data[used..];
                                continue;
                            }
                            Some(None) => {}
                            None => {
                                self.stop();
                                return;
                            }
                        }
                    }
                    match self.extend_head(data) {
                        Some(used) => data = &data[used..],
                        None => return,
                    }
                }
                State::Body(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    if *n == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkSize | State::Trailers => {
                    let Some(i) = data.iter().position(|b| *b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > MAX_LINE {
                            self.stop();
                        }
                        return;
                    };
                    self.line.extend_from_slice(&data[..i]);
                    data = &data[i + 1..];
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    if matches!(self.state, State::Trailers) {
                        if line.is_empty() {
                            self.state = State::Head;
                        }
                        continue;
                    }
                    let hex: Vec<u8> = line
                        .iter()
                        .take_while(|b| b.is_ascii_hexdigit())
                        .copied()
                        .collect();
                    match std::str::from_utf8(&hex)
                        .ok()
                        .and_then(|h| u64::from_str_radix(h, 16).ok())
                    {
                        Some(0) => self.state = State::Trailers,
                        Some(n) => self.state = State::ChunkData(n),
                        None => self.stop(),
                    }
                }
                State::ChunkData(n) => {
                    let take = (*n).min(data.len() as u64);
                    *n -= take;
                    data = &data[take as usize..];
                    if *n == 0 {
                        self.state = State::ChunkDataEnd(2);
                    }
                }
                State::ChunkDataEnd(k) => {
                    // The CRLF after chunk data.
                    let take = (*k as usize).min(data.len());
                    data = &data[take..];
                    *k -= take as u8;
                    if *k == 0 {
                        self.state = State::ChunkSize;
                    }
                }
            }
        }
    }

    /// Some(Some(len)) = complete head of `len` bytes; Some(None) = need more; None = stop.
    fn parse_head(&mut self, buf: &[u8]) -> Option<Option<usize>> {
        #[cfg(test)]
        tests::PARSES.with(|p| p.set(p.get() + 1));
        // Most heads frame no body and upgrade nothing: for them, a look at the line starts
        // is enough, and hyper does the real parse.
        if let Some(len) = unframed_head_len(buf) {
            self.seen += 1;
            self.state = State::Head;
            return Some(Some(len));
        }
        // Uninitialised header slots: zeroing 512 of them would cost more than the parse.
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 512];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Some(None),
            Err(_) => return None,
        };
        self.seen += 1;
        let mut cl: Option<u64> = None;
        let mut te = false;
        let mut chunked = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .or(Some(0));
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
                chunked = h.value.to_ascii_lowercase().ends_with(b"chunked");
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if te && cl.is_some() {
            let _ = self.flags.conflict_at.compare_exchange(
                0,
                self.seen,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            // hyper closes the connection after this request: nothing more to follow.
            self.stop();
            return Some(Some(len));
        }
        if upgrade || req.method == Some("CONNECT") || (te && !chunked) {
            self.stop();
            return Some(Some(len));
        }
        self.state = if chunked {
            State::ChunkSize
        } else {
            match cl {
                Some(0) | None => State::Head,
                Some(n) => State::Body(n),
            }
        };
        Some(Some(len))
    }
}

/// The length of a complete head that has no `Content-Length`, `Transfer-Encoding` or
/// `Upgrade` header and is not a `CONNECT`; None if the head is incomplete or has one of
/// them (then `parse_head` parses it in full with httparse).
///
/// Written by hand, and deliberately this narrow, to spare a second full parse of every head
/// (hyper parses and validates each one anyway; a kilobyte bearer token took a tenth of a
/// microsecond to validate twice). It is sound because in any head hyper accepts, each
/// header is one line that starts with its name and a colon (httparse refuses whitespace
/// before the colon and folded lines in requests), so a framing header cannot escape a look
/// at the line starts; and the head ends at the first empty line, as httparse's does. A head
/// hyper refuses gets a 400 and a closed connection, whatever this says about it.
///
/// Public only for the fuzz targets (`crates/fuzz-targets`), which check that claim.
#[doc(hidden)]
pub fn unframed_head_len(buf: &[u8]) -> Option<usize> {
    const FRAMING: [&[u8]; 3] = [b"content-length:", b"transfer-encoding:", b"upgrade:"];
    let mut newlines = memchr::memchr_iter(b'\n', buf);
    let request_line_end = newlines.next()?;
    if buf.starts_with(b"CONNECT ") {
        return None;
    }
    let mut start = request_line_end + 1;
    for end in newlines {
        let line = &buf[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Some(end + 1);
        }
        if FRAMING
            .iter()
            .any(|name| line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name))
        {
            return None;
        }
        start = end + 1;
    }
    None
}

/// Whether `bytes` hold an empty line's end: `\n\n` or `\n\r\n`.
fn may_end_a_head(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', bytes).any(|i| match bytes.get(i + 1) {
        Some(b'\n') => true,
        Some(b'\r') => bytes.get(i + 2) == Some(&b'\n'),
        _ => false,
    })
}

impl<T: AsyncRead + Unpin> AsyncRead for Guard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(this.state, State::Done) {
            this.header_timer = None;
            return r;
        }
        match r {
            Poll::Ready(Ok(())) => {
                this.feed(&buf.filled()[before..]);
                if !this.awaiting_head() {
                    this.header_timer = None;
                }
                let between = matches!(this.state, State::Head) && this.head.is_empty();
                this.flags.between.store(between, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.poll_header_timer(cx) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client header timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

/// Writes pass straight through; the guard only watches what the client sends.
impl<T: AsyncWrite + Unpin> AsyncWrite for Guard<T> {
    delegate_async_write!(inner);
}

/// A parked connection waits here: the header timeout runs while a head is awaited, as it
/// does while hyper reads.
impl<T: ReadReady + Unpin> ReadReady for Guard<T> {
    fn poll_read_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read_ready(cx) {
            Poll::Pending if this.poll_header_timer(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client header timeout",
            ))),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> u64 {
        let flags = Arc::new(Flags::default());
        let mut g = Guard::new((), flags.clone(), Duration::from_secs(1));
        for c in chunks {
            g.feed(c);
        }
        flags.conflict_at.load(Ordering::Relaxed)
    }

    thread_local! {
        /// Parses of a head, counted in tests.
        pub static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_trickled_head_is_parsed_once_it_can_be_complete() {
        assert!(may_end_a_head(b"x\n\n"));
        assert!(may_end_a_head(b"\n\r\n"));
        assert!(!may_end_a_head(b"a\r\nb\r\n\r"));
        assert!(!may_end_a_head(b"\n\r"));
        // A 60 KiB head a byte at a time: parsed when it can be complete, not once a byte
        // (the whole head again each time, seconds of CPU per megabyte).
        let mut head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 60_000));
        head.extend_from_slice(b"\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        PARSES.with(|p| p.set(0));
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert_eq!(run(&bytes), 1, "the conflicting head is still found");
        // The first byte (on its own), then the end of the head.
        assert_eq!(PARSES.with(|p| p.get()), 2);
    }

    #[test]
    fn finds_the_conflicting_request_across_pipelined_messages() {
        let a = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let b = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let c = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";
        let all = [&a[..], &b[..], &c[..]].concat();
        assert_eq!(run(&[&all]), 3);
        // Byte by byte, the same answer.
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(run(&bytes), 3);
        assert_eq!(run(&[&a[..], &b[..]]), 0);
        // A body that merely contains header-like text is not a head.
        let d = b"POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 49\r\n\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(run(&[&d[..]]), 0);
        // Heads without a body between them (the quick look) keep the count right.
        let g = b"GET /g HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\nAuthorization: Bearer abc\r\n\r\n";
        let all = [&g[..], &g[..], &c[..]].concat();
        assert_eq!(run(&[&all]), 3);
        let bytes: Vec<&[u8]> = all.chunks(7).collect();
        assert_eq!(run(&bytes), 3);
    }

    /// What the full parse finds: the head's length, and whether it frames a body or asks
    /// for an upgrade (None if httparse refuses it or it is incomplete).
    fn full(buf: &[u8]) -> Option<(usize, bool)> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            _ => return None,
        };
        let framing = req.method == Some("CONNECT")
            || req.headers.iter().any(|h| {
                ["content-length", "transfer-encoding", "upgrade"]
                    .iter()
                    .any(|f| h.name.eq_ignore_ascii_case(f))
            });
        Some((n, framing))
    }

    /// Wherever the quick look answers, it agrees with httparse: same length, and httparse
    /// finds no framing header either (or refuses the head, which hyper then answers 400).
    /// Wherever a framing header is present in a head httparse accepts, it does not answer.
    #[test]
    fn the_quick_look_agrees_with_the_full_parse() {
        let heads: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"GET / HTTP/1.1\r\nHost: x\nAccept: */*\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nUser-Agent: u\r\nUpgrade-Insecure-Requests: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Content-Length: 5\r\nX: content-length: 5\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET / HTTP/1.1\r\ncontent-LENGTH:5\r\n\r\nhello",
            b"POST / HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade:h2c\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            // Malformed: hyper refuses these, whatever the quick look says.
            b"GET / HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello",
            b"GET / HTTP/1.1\r\nX: a\r\n Content-Length: 5\r\n\r\nhello",
            b"GET / HTTP/1.1\r\n\tTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\r\n\r\n",
            // Incomplete.
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r",
            b"GET / HTT",
        ];
        for head in heads {
            let quick = unframed_head_len(head);
            if let (Some(q), Some((n, framing))) = (quick, full(head)) {
                assert_eq!(q, n, "{:?}", String::from_utf8_lossy(head));
                assert!(!framing, "{:?}", String::from_utf8_lossy(head));
            }
            if let Some((_, true)) = full(head) {
                assert_eq!(quick, None, "{:?}", String::from_utf8_lossy(head));
            }
        }
        // Every prefix of a good head with a framing header: never a quick answer.
        let framed = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
        for i in 0..=framed.len() {
            assert_eq!(unframed_head_len(&framed[..i]), None, "prefix {i}");
        }
        assert_eq!(
            unframed_head_len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest"),
            Some(27)
        );
    }
}
