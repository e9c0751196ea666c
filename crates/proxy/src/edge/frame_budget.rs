//! A budget of HTTP/2 control frames per client connection: PING, SETTINGS, PRIORITY,
//! WINDOW_UPDATE and frames of unknown types. A connection that sends more of them than
//! its budget is told so with `GOAWAY` `ENHANCE_YOUR_CALM` (as h2 does for the floods it
//! counts itself) and closed, and its address is paced like any other abuser's (`abuse`).
//!
//! h2 answers each PING and SETTINGS frame and keeps at most one answer pending, so a client
//! that never reads stalls itself; but one that reads its answers can flood without end
//! (CVE-2019-9512, CVE-2019-9515, and the PRIORITY loop of CVE-2019-9513), each frame costing
//! the proxy a read, a parse and usually a write, and nothing in h2 counts them. Measured
//! with a release build, such a flood on one connection left other clients 38–72 % of their
//! rate. nginx closes such a connection ("http2 flood detected"), HAProxy counts such frames
//! as glitches, and gRPC servers count a PING as a strike only when they have sent no data
//! since the last one. This budget is of the same kind:
//!
//! - every connection starts with [`BURST`] frames, and earns [`PER_SECOND`] more a second,
//!   up to [`BURST`], so keep-alive PINGs and a client's opening SETTINGS never come near it;
//! - each request (a HEADERS frame from the client) earns one more, for the PRIORITY frames
//!   some browsers send with their requests;
//! - each HEADERS or DATA frame the proxy sends earns [`PER_FRAME_SENT`]: the WINDOW_UPDATEs
//!   (stream and connection) a client may send as it takes a response body, and the PING
//!   that gRPC clients send as data arrives to size their windows, even after every frame.
//!   The answers to PINGs and SETTINGS earn nothing.
//!
//! The layer reads frame headers only (9 bytes each, payloads skipped), in both directions,
//! as the bytes pass between the client and h2, and turns itself off for a connection that
//! does not open with the h2 preface. It is hand-written because it only watches: h2's own
//! codec is private, and a second full decoder would cost more than the frames it guards
//! against. The clock is read only when the budget runs out.
//!
//! Since it already sees every frame header, it also keeps the two timeouts that h2 has no
//! bytes-level view of:
//!
//! - `timeouts.client_header` for each client header block: from the read in which a client
//!   HEADERS frame begins to the end of the payload of the frame carrying END_HEADERS. The
//!   HTTP/1 guard (`smuggle`) stops at the h2 preface, and every trickled byte resets the
//!   idle timer, so without this a client could hold a ~62 KB header block open for hours
//!   at a byte a minute. A block that arrives within one read (the usual case) arms nothing;
//!   one that does not is given a deadline, and its timer is polled only while the block is
//!   open. When it passes, the connection is closed (GOAWAY `NO_ERROR`, naming the last
//!   request before the block, when it can go between two frames). nginx applies
//!   `client_header_timeout` to h2 header reading the same way.
//! - what `timeouts.idle` counts on an h2 connection ([`Streams`], read by the connection's
//!   idle timer in `listen`): the requests in flight (a client HEADERS on a new stream, until
//!   the proxy's END_STREAM on it or a RST_STREAM either way), and whether a HEADERS, DATA or
//!   RST_STREAM frame passed. PING, SETTINGS, WINDOW_UPDATE and PRIORITY are not activity:
//!   the proxy's own keep-alive PING every 20 s, and a client's answer, kept a connection
//!   without a stream open for ever. Like Envoy's `idle_timeout`, which counts time with no
//!   active stream.

use crate::edge::passthrough::delegate_async_write;
use crate::edge::sending::{Sending, Streams};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Control frames a connection may send at once.
pub const BURST: u32 = 1000;
/// Control frames a connection earns a second, up to [`BURST`].
pub const PER_SECOND: u32 = 100;
/// Control frames each HEADERS or DATA frame the proxy sends earns.
pub const PER_FRAME_SENT: u32 = 3;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
/// RFC 9113's error code for a peer that is generating excessive load.
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// RFC 9113's error code for a close that is no error: a timeout.
const NO_ERROR: u32 = 0x0;
/// The flag that ends a stream (DATA, HEADERS) and the one that ends a header block
/// (HEADERS, CONTINUATION).
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// Requests in flight followed on one connection, at most: twice the listener's
/// `max_concurrent_streams`, since h2 refuses the streams over it with a RST_STREAM the
/// client may leave unread. Streams past it are not counted as in flight.
const MAX_FOLLOWED: usize = 512;
const WINDOW_UPDATE: u8 = 0x8;
/// The last frame type RFC 9113 defines; types past it are extensions, ignored by h2.
const CONTINUATION: u8 = 0x9;

/// Where a reader is in one direction's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// This many bytes of the client preface seen so far.
    Preface(u8),
    /// This many bytes of a frame header seen so far (kept in `Frames::head`).
    Head(u8),
    /// This many payload bytes left to skip.
    Payload(u32),
    /// Not h2, or already over budget: nothing more is looked at.
    Off,
}

/// The frame boundaries of one direction of an h2 connection.
#[derive(Debug)]
struct Frames {
    scan: Scan,
    head: [u8; 9],
}

impl Frames {
    fn new(scan: Scan) -> Self {
        Frames { scan, head: [0; 9] }
    }

    /// Follows the frames in `bytes`, the next bytes of the stream, calling `frame` with the
    /// type, flags and stream id of each frame as its header completes: false as soon as
    /// `frame` returns false (and the reader is off from then on).
    fn follow(&mut self, mut bytes: &[u8], mut frame: impl FnMut(u8, u8, u32) -> bool) -> bool {
        while !bytes.is_empty() {
            match self.scan {
                Scan::Off => return true,
                Scan::Preface(seen) => {
                    let seen = usize::from(seen);
                    let n = bytes.len().min(PREFACE.len() - seen);
                    if bytes[..n] != PREFACE[seen..seen + n] {
                        self.scan = Scan::Off;
                        return true;
                    }
                    bytes = &bytes[n..];
                    self.scan = if seen + n == PREFACE.len() {
                        Scan::Head(0)
                    } else {
                        Scan::Preface((seen + n) as u8)
                    };
                }
                Scan::Head(have) => {
                    let have = usize::from(have);
                    let n = bytes.len().min(9 - have);
                    self.head[have..have + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if have + n < 9 {
                        self.scan = Scan::Head((have + n) as u8);
                        continue;
                    }
                    let h = &self.head;
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if !frame(h[3], h[4], stream) {
                        self.scan = Scan::Off;
                        return false;
                    }
                    let len = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]);
                    self.scan = Scan::Payload(len);
                }
                Scan::Payload(left) => {
                    let n = bytes.len().min(left as usize);
                    bytes = &bytes[n..];
                    self.scan = match left - n as u32 {
                        0 => Scan::Head(0),
                        left => Scan::Payload(left),
                    };
                }
            }
        }
        // A frame with an empty payload ends exactly at its header.
        if self.scan == Scan::Payload(0) {
            self.scan = Scan::Head(0);
        }
        true
    }

    /// Whether the frame being read is a part of a header block whose payload has not all
    /// arrived.
    fn in_header_payload(&self) -> bool {
        matches!(self.scan, Scan::Payload(_)) && matches!(self.head[3], HEADERS | CONTINUATION)
    }
}

/// The client's requests as its frames tell them, for the connection's timeouts.
#[derive(Debug, Default)]
struct Requests {
    /// The streams of the requests in flight (a few; at most [`MAX_FOLLOWED`]).
    open: Vec<u32>,
    /// The highest stream a request (HEADERS) from the client opened.
    last: u32,
    /// The highest stream before the open header block's: nothing past it was asked.
    before_block: u32,
    /// Between a HEADERS frame without END_HEADERS and the CONTINUATION that ends the block.
    in_block: bool,
    /// A HEADERS frame began in the bytes being followed.
    block_began: bool,
}

impl Requests {
    /// A frame from the client has begun.
    fn received(&mut self, ty: u8, flags: u8, stream: u32, streams: &Streams) {
        match ty {
            HEADERS => {
                streams.moved();
                self.block_began = true;
                self.in_block = flags & END_HEADERS == 0;
                self.before_block = self.last;
                // Stream ids only grow, so a higher one is a new request (a lower one is
                // trailers, or an error h2 closes the connection for).
                if stream > self.last {
                    self.last = stream;
                    if self.open.len() < MAX_FOLLOWED {
                        self.open.push(stream);
                        streams
                            .in_flight
                            .store(self.open.len() as u32, Ordering::Relaxed);
                    }
                }
            }
            CONTINUATION if flags & END_HEADERS != 0 => self.in_block = false,
            DATA => streams.moved(),
            RST_STREAM => {
                streams.moved();
                self.ended(stream, streams);
            }
            _ => {}
        }
    }

    /// A frame to the client has begun: a response's end, or a reset, ends its request.
    fn sent(&mut self, ty: u8, flags: u8, stream: u32, streams: &Streams) {
        match ty {
            HEADERS | DATA => {
                streams.moved();
                if flags & END_STREAM != 0 {
                    self.ended(stream, streams);
                }
            }
            RST_STREAM => {
                streams.moved();
                self.ended(stream, streams);
            }
            _ => {}
        }
    }

    /// The request on `stream` is over (if it was still counted: a stream may be ended, then
    /// reset).
    fn ended(&mut self, stream: u32, streams: &Streams) {
        if let Some(i) = self.open.iter().position(|s| *s == stream) {
            self.open.swap_remove(i);
            streams
                .in_flight
                .store(self.open.len() as u32, Ordering::Relaxed);
        }
    }
}

/// A GOAWAY frame: the last stream the proxy may have acted on, and why it closes.
fn goaway(last_stream: u32, code: u32) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[..9].copy_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
    f[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f[13..].copy_from_slice(&code.to_be_bytes());
    f
}

/// What is left of a connection's budget.
#[derive(Debug)]
struct Budget {
    tokens: u32,
    /// When the tokens were last topped up by time.
    refilled: Instant,
}

impl Budget {
    fn new(now: Instant) -> Self {
        Budget {
            tokens: BURST,
            refilled: now,
        }
    }

    fn earn(&mut self, n: u32) {
        self.tokens = self.tokens.saturating_add(n).min(BURST);
    }

    /// One control frame: false when the budget is spent, even after what time earned.
    fn spend(&mut self, now: impl FnOnce() -> Instant) -> bool {
        if self.tokens == 0 {
            let now = now();
            let earned =
                now.saturating_duration_since(self.refilled).as_secs_f64() * f64::from(PER_SECOND);
            if earned < 1.0 {
                return false;
            }
            self.earn(earned.min(f64::from(BURST)) as u32);
            self.refilled = now;
        }
        self.tokens -= 1;
        true
    }

    /// A frame of type `ty` from the client has begun: false when it is a control frame over
    /// the budget.
    fn received(&mut self, ty: u8) -> bool {
        match ty {
            HEADERS => {
                self.earn(1);
                true
            }
            PRIORITY | SETTINGS | PING | WINDOW_UPDATE => self.spend(Instant::now),
            t if t > CONTINUATION => self.spend(Instant::now),
            _ => true,
        }
    }

    /// A frame of type `ty` to the client has begun.
    fn sent(&mut self, ty: u8) -> bool {
        if ty == DATA || ty == HEADERS {
            self.earn(PER_FRAME_SENT);
        }
        true
    }
}

/// The client connection with its control-frame budget and its h2 timeouts. `flooded` is set
/// when the budget ran out and the connection was closed for it.
pub struct FrameBudget<T> {
    inner: T,
    from_client: Frames,
    to_client: Frames,
    budget: Budget,
    flooded: Arc<AtomicBool>,
    requests: Requests,
    /// The connection's responses in flight, and the [`Streams`] its idle timer reads.
    watch: Arc<Sending>,
    /// Whether h2 has sent a whole frame (its SETTINGS come first; a GOAWAY may not).
    sent_frame: bool,
    /// `timeouts.client_header`: how long a header block may stay open.
    client_header: Duration,
    /// When the open header block must have ended; `None` when no block is open.
    block_by: Option<tokio::time::Instant>,
    /// Made for the first header block that outlives its read, and kept for later ones.
    header_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> FrameBudget<T> {
    pub fn new(
        inner: T,
        flooded: Arc<AtomicBool>,
        watch: Arc<Sending>,
        client_header: Duration,
    ) -> Self {
        FrameBudget {
            inner,
            from_client: Frames::new(Scan::Preface(0)),
            to_client: Frames::new(Scan::Head(0)),
            budget: Budget::new(Instant::now()),
            flooded,
            requests: Requests::default(),
            watch,
            sent_frame: false,
            client_header,
            block_by: None,
            header_timer: None,
        }
    }

    /// Follows the frames in `bytes`, the next bytes the client sent: false when a control
    /// frame among them is over the budget.
    fn follow(&mut self, bytes: &[u8]) -> bool {
        let was_preface = matches!(self.from_client.scan, Scan::Preface(_));
        let (budget, requests, streams) =
            (&mut self.budget, &mut self.requests, &self.watch.streams);
        requests.block_began = false;
        let ok = self.from_client.follow(bytes, |ty, flags, stream| {
            requests.received(ty, flags, stream, streams);
            budget.received(ty)
        });
        match self.from_client.scan {
            // Not h2: the other direction need not be read. (Over budget, it is still
            // followed, to tell whether a GOAWAY can go between two frames.)
            Scan::Off if ok => self.to_client.scan = Scan::Off,
            Scan::Off => {}
            Scan::Preface(_) => {}
            _ if was_preface => streams.h2.store(true, Ordering::Relaxed),
            _ => {}
        }
        self.time_header_block();
        ok
    }

    /// Gives a header block still open after the read that began it its deadline, and
    /// forgets the deadline of one that has ended. Reads the clock only for a block that
    /// outlived its first read.
    fn time_header_block(&mut self) {
        let open = self.requests.in_block || self.from_client.in_header_payload();
        if !open {
            self.block_by = None;
        } else if self.block_by.is_none() || self.requests.block_began {
            self.block_by = Some(tokio::time::Instant::now() + self.client_header);
        }
    }

    /// Whether the open header block (if any) is past its deadline. Its timer is armed here,
    /// so that the task is woken when the deadline passes even if no byte comes.
    fn header_late(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(by) = self.block_by else {
            return false;
        };
        let timer = match &mut self.header_timer {
            Some(t) => {
                if t.deadline() != by {
                    t.as_mut().reset(by);
                }
                t
            }
            None => self
                .header_timer
                .insert(Box::pin(tokio::time::sleep_until(by))),
        };
        timer.as_mut().poll(cx).is_ready()
    }

    /// Follows the frames in the first `n` bytes of `bufs`, written to the client.
    fn wrote(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        if self.to_client.scan == Scan::Off {
            return;
        }
        for b in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(b.len());
            let (budget, sent) = (&mut self.budget, &mut self.sent_frame);
            let (requests, streams) = (&mut self.requests, &self.watch.streams);
            self.to_client.follow(&b[..take], |ty, flags, stream| {
                *sent = true;
                requests.sent(ty, flags, stream, streams);
                budget.sent(ty)
            });
            n -= take;
        }
    }

    fn over_budget(&self) -> io::Error {
        self.flooded.store(true, Ordering::Relaxed);
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "HTTP/2 control frames over the connection's budget",
        )
    }

    /// The GOAWAY that tells the client why the connection closes, if it can go between two
    /// of h2's frames, and after its SETTINGS; else (mid-frame) the connection is closed
    /// without one.
    fn goaway_between_frames(&self, last_stream: u32, code: u32) -> Option<[u8; 17]> {
        (self.sent_frame && self.to_client.scan == Scan::Head(0)).then(|| goaway(last_stream, code))
    }
}

impl<T: AsyncWrite + Unpin> FrameBudget<T> {
    /// Writes `frame` once, without waiting: a connection that cannot take 17 bytes now is
    /// closed without them. (A part written ends the stream mid-frame, which the client reads
    /// as the connection's end all the same.)
    fn say(&mut self, cx: &mut Context<'_>, frame: Option<[u8; 17]>) {
        if let Some(frame) = frame {
            if let Poll::Ready(Ok(_)) = Pin::new(&mut self.inner).poll_write(cx, &frame) {
                let _ = Pin::new(&mut self.inner).poll_flush(cx);
            }
        }
    }
}

// Reading needs the writer too: the GOAWAY of a connection closed for its frames or a
// timeout is written from the read that finds it so.
impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for FrameBudget<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.from_client.scan == Scan::Off {
            return r;
        }
        match r {
            Poll::Ready(Ok(())) => {
                if !self.follow(&buf.filled()[before..]) {
                    let frame = self.goaway_between_frames(self.requests.last, ENHANCE_YOUR_CALM);
                    self.say(cx, frame);
                    return Poll::Ready(Err(self.over_budget()));
                }
            }
            // The idle timeout (`listen::IdleIo`) closes the connection: said with GOAWAY.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                let frame = self.goaway_between_frames(self.requests.last, NO_ERROR);
                self.say(cx, frame);
                return Poll::Ready(Err(e));
            }
            Poll::Ready(Err(_)) => return r,
            Poll::Pending => {}
        }
        // Checked after reads that bring bytes too: a client that keeps sending (a block of
        // many CONTINUATION frames) may never leave the read waiting.
        if self.header_late(cx) {
            let frame = self.goaway_between_frames(self.requests.before_block, NO_ERROR);
            self.say(cx, frame);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP/2 client header timeout",
            )));
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FrameBudget<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(&[io::IoSlice::new(buf)], n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.wrote(bufs, n);
        }
        r
    }

    delegate_async_write!(inner: is_write_vectored, poll_flush, poll_shutdown);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(out: &mut Vec<u8>, ty: u8, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[ty, 0, 0, 0, 0, 0]);
        out.extend_from_slice(payload);
    }

    /// A frame with `flags`, on `stream`.
    fn frame_on(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        frame(out, ty, payload);
        let at = out.len() - payload.len() - 5;
        out[at] = flags;
        out[at + 1..at + 5].copy_from_slice(&stream.to_be_bytes());
    }

    fn pings(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n as u64 {
            frame(&mut out, PING, &i.to_be_bytes());
        }
        out
    }

    /// A layer whose budget time does not refill while the test runs, however slowly.
    fn layer() -> FrameBudget<()> {
        let mut l = FrameBudget::new((), Arc::default(), Arc::default(), Duration::from_secs(10));
        l.budget.refilled += Duration::from_secs(3600);
        l
    }

    /// Feeds `bytes` from the client in pieces of `step`: whether every piece passed.
    fn feed(l: &mut FrameBudget<()>, bytes: &[u8], step: usize) -> bool {
        bytes.chunks(step).all(|c| l.follow(c))
    }

    /// `bytes` written to the client in pieces of `step`, some of them vectored.
    fn send(l: &mut FrameBudget<()>, bytes: &[u8], step: usize) {
        for c in bytes.chunks(step) {
            let (a, b) = c.split_at(c.len() / 2);
            l.wrote(&[io::IoSlice::new(a), io::IoSlice::new(b)], c.len());
        }
    }

    fn opened() -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        frame(&mut bytes, SETTINGS, &[0, 3, 0, 0, 0, 100]);
        bytes
    }

    #[test]
    fn a_flood_of_pings_is_over_budget_after_the_burst_however_it_is_cut() {
        for step in [1, 7, 9, 17, 4096] {
            let mut l = layer();
            let mut bytes = opened();
            bytes.extend(pings(BURST as usize - 1));
            assert!(feed(&mut l, &bytes, step), "step {step}");
            assert!(!feed(&mut l, &pings(1), step), "step {step}");
            assert_eq!(l.from_client.scan, Scan::Off);
        }
    }

    /// Over its budget, the client is told why before the connection closes: GOAWAY with
    /// ENHANCE_YOUR_CALM and the last request's stream, right after h2's last whole frame;
    /// never inside a frame h2 is part way through, nor before h2's SETTINGS.
    #[tokio::test]
    async fn over_the_budget_a_goaway_goes_out_between_frames_only() {
        for (case, server) in [
            ("between", 0usize),
            ("mid-frame", 5),
            ("before settings", 1),
        ] {
            let (client, proxy) = tokio::io::duplex(1 << 20);
            let (mut client_rd, mut client_wr) = tokio::io::split(client);
            let mut l = FrameBudget::new(
                proxy,
                Arc::default(),
                Arc::default(),
                Duration::from_secs(10),
            );
            l.budget.refilled += Duration::from_secs(3600);
            // What h2 has sent: its SETTINGS (whole, or part of it), or nothing.
            let mut settings = Vec::new();
            frame(&mut settings, SETTINGS, &[0, 4, 0, 1, 0, 0]);
            let sent = match server {
                0 => &settings[..],
                1 => &[][..],
                n => &settings[..n],
            };
            l.write_all(sent).await.unwrap();
            let mut bytes = opened();
            for stream in [1u32, 3] {
                let mut req = Vec::new();
                frame(&mut req, HEADERS, &[0x82]);
                req[5..9].copy_from_slice(&stream.to_be_bytes());
                bytes.extend(req);
            }
            bytes.extend(pings(BURST as usize + 3));
            client_wr.write_all(&bytes).await.unwrap();
            let mut sink = vec![0u8; 1 << 20];
            let err = loop {
                match l.read(&mut sink).await {
                    Ok(n) => assert!(n > 0, "{case}: ended before the budget"),
                    Err(e) => break e,
                }
            };
            assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{case}");
            drop(l);
            let mut got = Vec::new();
            client_rd.read_to_end(&mut got).await.unwrap();
            let mut want = sent.to_vec();
            if server == 0 {
                want.extend(goaway(3, ENHANCE_YOUR_CALM));
                assert_eq!(&got[got.len() - 8..], &[0, 0, 0, 3, 0, 0, 0, 0x0b]);
            }
            assert_eq!(got, want, "{case}");
        }
    }

    #[test]
    fn settings_priority_window_updates_and_unknown_frames_count_data_and_resets_do_not() {
        for ty in [SETTINGS, PRIORITY, WINDOW_UPDATE, 0x0b, 0xff] {
            let mut l = layer();
            let mut bytes = PREFACE.to_vec();
            for _ in 0..BURST {
                frame(&mut bytes, ty, &[0; 5]);
                frame(&mut bytes, DATA, &[b'x'; 100]);
                frame(&mut bytes, 0x3, &[0; 4]);
            }
            assert!(feed(&mut l, &bytes, 512));
            let mut one = Vec::new();
            frame(&mut one, ty, &[]);
            assert!(!feed(&mut l, &one, 512), "type {ty:#x}");
        }
    }

    #[test]
    fn requests_and_the_frames_the_proxy_sends_earn_control_frames() {
        let mut l = layer();
        let mut bytes = opened();
        bytes.extend(pings(BURST as usize - 1));
        assert!(feed(&mut l, &bytes, 100));
        let mut req = Vec::new();
        frame(&mut req, HEADERS, &[0x82]);
        assert!(feed(&mut l, &req, 100));
        assert!(feed(&mut l, &pings(1), 100), "a request earned one");
        // The proxy's SETTINGS, a response's HEADERS and two DATA frames of 16 KiB, cut
        // anywhere: nine control frames (three per frame sent), and its PING answers nothing.
        let mut out = Vec::new();
        frame(&mut out, SETTINGS, &[0, 4, 0, 1, 0, 0]);
        frame(&mut out, HEADERS, &[0x88]);
        frame(&mut out, DATA, &[b'x'; 16384]);
        frame(&mut out, DATA, &[b'x'; 16384]);
        for _ in 0..50 {
            frame(&mut out, PING, &[0; 8]);
        }
        send(&mut l, &out, 1000);
        assert_eq!(l.budget.tokens, 3 * PER_FRAME_SENT);
        assert!(feed(&mut l, &pings(9), 100));
        assert!(!feed(&mut l, &pings(1), 100));
    }

    #[test]
    fn a_grpc_client_pinging_after_each_message_stays_within_it() {
        // grpc-go sends a PING as data arrives to size its window, and WINDOW_UPDATEs as it
        // reads: at worst all three after every small message, for long after the burst is
        // spent.
        let mut l = layer();
        assert!(feed(&mut l, &opened(), 64));
        let mut out = Vec::new();
        frame(&mut out, HEADERS, &[0x88]);
        send(&mut l, &out, 64);
        for _ in 0..100_000 {
            let mut msg = Vec::new();
            frame(&mut msg, DATA, &[0; 40]);
            send(&mut l, &msg, 64);
            let mut back = Vec::new();
            frame(&mut back, PING, &[0; 8]);
            frame(&mut back, WINDOW_UPDATE, &[0, 0, 0, 40]);
            frame(&mut back, WINDOW_UPDATE, &[0, 0, 0, 40]);
            assert!(feed(&mut l, &back, 64));
        }
    }

    #[test]
    fn any_bytes_cut_anywhere_read_as_they_do_in_one_piece() {
        // Hostile or broken streams (random frame headers, lengths up to 16 MiB, cut at
        // random points): no panic, and the same verdict and state as read whole.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..500 {
            let mut bytes = if case % 5 == 0 {
                Vec::new()
            } else {
                PREFACE.to_vec()
            };
            let n = (next() % 3000) as usize;
            bytes.extend((0..n).map(|_| {
                let r = next();
                // Mostly small values, so that lengths end inside the stream.
                if r % 3 == 0 {
                    (r >> 8) as u8
                } else {
                    (r >> 8) as u8 % 4
                }
            }));
            let (mut whole, mut cut) = (layer(), layer());
            let verdict = whole.follow(&bytes);
            let mut rest = &bytes[..];
            let mut pieces = true;
            while !rest.is_empty() {
                let k = 1 + (next() as usize % 64).min(rest.len() - 1);
                pieces &= cut.follow(&rest[..k]);
                rest = &rest[k..];
            }
            assert_eq!(verdict, pieces, "case {case}");
            assert_eq!(whole.from_client.scan, cut.from_client.scan, "case {case}");
            assert_eq!(whole.budget.tokens, cut.budget.tokens, "case {case}");
        }
    }

    #[test]
    fn time_refills_the_budget_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        for _ in 0..BURST {
            assert!(b.spend(|| unreachable!("no clock while tokens are left")));
        }
        assert!(!b.spend(|| t0 + Duration::from_millis(5)));
        assert!(b.spend(|| t0 + Duration::from_millis(50)), "5 earned");
        for _ in 0..4 {
            assert!(b.spend(|| unreachable!()));
        }
        assert!(b.spend(|| t0 + Duration::from_secs(3600)));
        assert_eq!(b.tokens, BURST - 1, "capped at the burst");
    }

    #[test]
    fn keep_alive_pings_for_a_day_stay_within_it() {
        // A PING every second, more often than any client's keep-alive.
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        for s in 0..86_400u64 {
            assert!(b.spend(|| t0 + Duration::from_secs(s)), "second {s}");
        }
    }

    #[test]
    fn not_h2_is_not_looked_at_in_either_direction() {
        let mut l = layer();
        assert!(l.follow(b"GET / HTTP/1.1\r\n"));
        assert_eq!(l.from_client.scan, Scan::Off);
        assert_eq!(l.to_client.scan, Scan::Off);
        send(&mut l, b"HTTP/1.1 200 OK\r\n\r\n", 4);
        assert_eq!(l.budget.tokens, BURST);
        let mut l = layer();
        assert!(l.follow(b"PRI * HTTP/2.0\r\n"));
        assert_eq!(l.from_client.scan, Scan::Preface(16));
        assert!(l.follow(b"\r\nXX"));
        assert_eq!(l.from_client.scan, Scan::Off);
    }

    #[test]
    fn a_frame_with_an_empty_payload_ends_at_its_header() {
        let mut l = layer();
        let mut bytes = PREFACE.to_vec();
        frame(&mut bytes, SETTINGS, &[]);
        assert!(l.follow(&bytes));
        assert_eq!(l.from_client.scan, Scan::Head(0));
        assert_eq!(l.budget.tokens, BURST - 1);
    }

    #[tokio::test]
    async fn over_budget_the_read_fails_and_says_so() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let flooded = Arc::new(AtomicBool::new(false));
        let mut l = FrameBudget::new(
            server,
            flooded.clone(),
            Arc::default(),
            Duration::from_secs(10),
        );
        l.budget.refilled += Duration::from_secs(3600);
        let mut bytes = opened();
        bytes.extend(pings(BURST as usize));
        client.write_all(&bytes).await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut err = None;
        for _ in 0..100 {
            match l.read(&mut buf).await {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(
            err.map(|e| e.kind()),
            Some(io::ErrorKind::ConnectionAborted)
        );
        assert!(flooded.load(Ordering::Relaxed));
        // What the proxy writes still passes through.
        l.write_all(b"bye").await.unwrap();
        let mut got = [0u8; 3];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"bye");
    }

    /// What the idle timer would find now: (a stream frame moved, a request in flight).
    fn tick(l: &FrameBudget<()>) -> (bool, bool) {
        let t = l.watch.streams.tick().expect("an h2 connection");
        (t.moved, t.in_flight)
    }

    #[test]
    fn requests_are_in_flight_from_their_headers_to_their_end_or_reset() {
        for step in [1, 7, 4096] {
            let mut l = layer();
            assert_eq!(l.watch.streams.tick(), None, "not h2 before the preface");
            assert!(feed(&mut l, &opened(), step));
            assert_eq!(tick(&l), (false, false), "SETTINGS are not activity");
            // Two requests, the second with a body and trailers (which open nothing).
            let mut c = Vec::new();
            frame_on(&mut c, HEADERS, END_HEADERS | END_STREAM, 1, &[0x82]);
            frame_on(&mut c, HEADERS, END_HEADERS, 3, &[0x83]);
            frame_on(&mut c, DATA, 0, 3, b"body");
            frame_on(&mut c, HEADERS, END_HEADERS | END_STREAM, 3, &[0x40]);
            assert!(feed(&mut l, &c, step));
            assert_eq!(l.requests.open, [1, 3], "step {step}");
            assert_eq!(tick(&l), (true, true));
            // Control frames either way, while both are in flight: no activity.
            let mut ctl = pings(3);
            frame(&mut ctl, WINDOW_UPDATE, &[0, 0, 1, 0]);
            frame(&mut ctl, PRIORITY, &[0, 0, 0, 0, 16]);
            assert!(feed(&mut l, &ctl, step));
            send(&mut l, &ctl, step);
            assert_eq!(tick(&l), (false, true));
            // The first answered in two frames, the second reset by the proxy and then by
            // the client too: none left, and none counted twice.
            let mut out = Vec::new();
            frame_on(&mut out, HEADERS, END_HEADERS, 1, &[0x88]);
            frame_on(&mut out, DATA, END_STREAM, 1, b"ok");
            frame_on(&mut out, RST_STREAM, 0, 3, &[0, 0, 0, 8]);
            send(&mut l, &out, step);
            let mut rst = Vec::new();
            frame_on(&mut rst, RST_STREAM, 0, 3, &[0, 0, 0, 8]);
            frame_on(&mut rst, RST_STREAM, 0, 1, &[0, 0, 0, 8]);
            assert!(feed(&mut l, &rst, step));
            assert_eq!(tick(&l), (true, false), "step {step}");
            assert_eq!(l.watch.streams.in_flight.load(Ordering::Relaxed), 0);
            // A request the client resets itself.
            let mut c = Vec::new();
            frame_on(&mut c, HEADERS, END_HEADERS, 5, &[0x82]);
            assert!(feed(&mut l, &c, step));
            assert_eq!(tick(&l), (true, true));
            let mut rst = Vec::new();
            frame_on(&mut rst, RST_STREAM, 0, 5, &[0, 0, 0, 8]);
            assert!(feed(&mut l, &rst, step));
            assert_eq!(tick(&l), (true, false));
        }
    }

    #[test]
    fn a_header_block_is_timed_only_when_it_outlives_its_read() {
        let mut l = layer();
        assert!(l.follow(&opened()));
        // Whole in one read, in one frame or with a CONTINUATION: nothing armed.
        let mut whole = Vec::new();
        frame_on(&mut whole, HEADERS, END_HEADERS, 1, &[0x82; 40]);
        frame_on(&mut whole, HEADERS, 0, 3, &[0x82; 40]);
        frame_on(&mut whole, CONTINUATION, END_HEADERS, 3, &[0x82; 40]);
        assert!(l.follow(&whole));
        assert_eq!((l.block_by, l.requests.last), (None, 3));
        // Cut inside a HEADERS payload, between HEADERS and CONTINUATION, and inside the
        // payload of the frame that ends the block: open until that payload has all come.
        let mut split = Vec::new();
        frame_on(&mut split, HEADERS, 0, 5, &[0x82; 40]);
        frame_on(&mut split, CONTINUATION, END_HEADERS, 5, &[0x82; 40]);
        for cut in [20, 49, 9 + 40 + 9 + 1, split.len() - 1] {
            let mut l = layer();
            assert!(l.follow(&opened()));
            assert!(l.follow(&whole));
            assert!(l.follow(&split[..cut]));
            let by = l.block_by.expect("open after the first part");
            assert_eq!(l.requests.before_block, 3, "cut {cut}");
            assert!(l.follow(&split[cut..cut + 1]));
            if cut + 1 < split.len() {
                assert_eq!(l.block_by, Some(by), "the same block's deadline, cut {cut}");
                assert!(l.follow(&split[cut + 1..]));
            }
            assert_eq!(l.block_by, None, "cut {cut}");
            assert!(l.header_timer.is_none(), "armed only by a read that waits");
        }
        // A PING after the end of a block opens nothing.
        assert!(l.follow(&pings(1)[..5]));
        assert_eq!(l.block_by, None);
    }

    /// A client trickling a header block (a byte every 40 ms) is cut when the block has been
    /// open for `client_header` (here 300 ms), with GOAWAY NO_ERROR naming the last request
    /// before the block; one that ends its block in time is served on.
    #[tokio::test]
    async fn a_header_block_open_past_client_header_closes_the_connection() {
        let timeout = Duration::from_millis(300);
        let (client, proxy) = tokio::io::duplex(1 << 20);
        let (mut client_rd, mut client_wr) = tokio::io::split(client);
        let mut l = FrameBudget::new(proxy, Arc::default(), Arc::default(), timeout);
        let mut settings = Vec::new();
        frame(&mut settings, SETTINGS, &[0, 4, 0, 1, 0, 0]);
        l.write_all(&settings).await.unwrap();
        let mut first = opened();
        frame_on(&mut first, HEADERS, END_HEADERS | END_STREAM, 1, &[0x82]);
        let mut slow = Vec::new();
        frame_on(&mut slow, HEADERS, 0, 3, &[0x82; 10]);
        frame_on(&mut slow, CONTINUATION, END_HEADERS, 3, &[0x82; 10]);
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            let start = tokio::time::Instant::now();
            loop {
                match l.read(&mut sink).await {
                    Ok(n) => assert!(n > 0, "ended before the timeout"),
                    Err(e) => return (e, start.elapsed()),
                }
            }
        });
        client_wr.write_all(&first).await.unwrap();
        // In time: the block in pieces over 200 ms, then well past the timeout.
        for piece in slow.chunks(slow.len() / 4 + 1) {
            client_wr.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(timeout * 2).await;
        assert!(!reader.is_finished(), "a block ended in time is not cut");
        // Too slow: a byte every 40 ms, never ending (for 1.6 s at most).
        let start = tokio::time::Instant::now();
        let mut trickle = Vec::new();
        frame_on(&mut trickle, HEADERS, 0, 5, &[0x82; 100]);
        for b in trickle.chunks(1).take(40) {
            if reader.is_finished() || client_wr.write_all(b).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let ended = tokio::time::timeout(Duration::from_millis(100), reader).await;
        let (err, _) = ended.expect("cut").unwrap();
        let took = start.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(took >= timeout && took < timeout * 3, "{took:?}");
        drop(client_wr);
        let mut got = Vec::new();
        client_rd.read_to_end(&mut got).await.unwrap();
        let mut want = settings.clone();
        want.extend(goaway(3, NO_ERROR));
        assert_eq!(got, want);
    }

    /// The timer also runs when no byte comes at all after the block's first read.
    #[tokio::test]
    async fn a_silent_open_header_block_is_cut_too() {
        let timeout = Duration::from_millis(200);
        let (mut client, proxy) = tokio::io::duplex(1 << 20);
        let mut l = FrameBudget::new(proxy, Arc::default(), Arc::default(), timeout);
        let mut bytes = opened();
        frame_on(&mut bytes, HEADERS, 0, 1, &[0x82; 10]);
        client.write_all(&bytes).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut sink = vec![0u8; 1 << 16];
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(5), l.read(&mut sink)).await {
                Ok(Ok(n)) => assert!(n > 0),
                Ok(Err(e)) => break e,
                Err(_) => panic!("not cut"),
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= timeout, "{:?}", start.elapsed());
    }
}
