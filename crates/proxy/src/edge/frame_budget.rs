//! A budget of HTTP/2 control frames per client connection: PING, SETTINGS, PRIORITY,
//! WINDOW_UPDATE and frames of unknown types. A connection that sends more of them than
//! its budget is closed, and its address is paced like any other abuser's (`abuse`).
//!
//! h2 answers each PING and SETTINGS frame and keeps at most one answer pending, so a client
//! that never reads stalls itself; but one that reads its answers can flood without end
//! (CVE-2019-9512, CVE-2019-9515, and the PRIORITY loop of CVE-2019-9513), each frame costing
//! the proxy a read, a parse and usually a write, and nothing in h2 counts them. Measured
//! with a release build, such a flood on one connection left other clients 38–72 % of their
//! rate. nginx closes such a connection ("http2 flood detected") and HAProxy counts such
//! frames as glitches; this is the same idea:
//!
//! - every connection starts with [`BURST`] frames of budget, and earns [`PER_SECOND`] more
//!   a second, up to [`BURST`], so keep-alive PINGs and a client's opening SETTINGS and
//!   WINDOW_UPDATEs never come near it;
//! - each request (a HEADERS frame) earns one more, for the PRIORITY frames some browsers
//!   send with their requests;
//! - each KiB the proxy writes earns one more, for the WINDOW_UPDATEs that a client sends
//!   as it takes response bodies (clients send one per several KiB); the answers to PINGs
//!   and SETTINGS, 17 and 9 bytes, earn a flooder almost nothing.
//!
//! The layer reads frame headers only (9 bytes each, skipping payloads) as the bytes pass
//! to h2, and turns itself off for a connection that does not open with the h2 preface. It
//! is hand-written because it only watches: h2's own codec is private, and a second full
//! decoder would cost more than the frames it guards against. The clock is read only when
//! the budget runs out.

use crate::edge::passthrough::delegate_async_write;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Control frames a connection may send at once.
pub const BURST: u32 = 1000;
/// Control frames a connection earns a second, up to [`BURST`].
pub const PER_SECOND: u32 = 100;
/// Bytes the proxy writes to the client that earn one control frame.
const WRITTEN_PER_FRAME: u64 = 1024;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
/// The last frame type RFC 9113 defines; types past it are extensions, ignored by h2.
const CONTINUATION: u8 = 0x9;

/// Where the reader is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// This many bytes of the preface seen so far.
    Preface(u8),
    /// This many bytes of a frame header seen so far (kept in `head`).
    Head(u8),
    /// This many payload bytes left to skip.
    Payload(u32),
    /// Not h2, or already over budget: nothing more is looked at.
    Off,
}

/// The frames counted, and what is left of the budget.
#[derive(Debug)]
struct Budget {
    tokens: u32,
    /// When the tokens were last topped up by time.
    refilled: Instant,
    /// Bytes written that have not earned a frame yet.
    written: u64,
}

impl Budget {
    fn new(now: Instant) -> Self {
        Budget {
            tokens: BURST,
            refilled: now,
            written: 0,
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

    fn wrote(&mut self, n: usize) {
        self.written += n as u64;
        if self.written >= WRITTEN_PER_FRAME {
            let frames = self.written / WRITTEN_PER_FRAME;
            self.written %= WRITTEN_PER_FRAME;
            self.earn(frames.min(u64::from(BURST)) as u32);
        }
    }
}

/// The client connection with its control-frame budget. `flooded` is set when the budget
/// ran out and the connection was closed for it.
pub struct FrameBudget<T> {
    inner: T,
    scan: Scan,
    head: [u8; 9],
    budget: Budget,
    flooded: Arc<AtomicBool>,
}

impl<T> FrameBudget<T> {
    pub fn new(inner: T, flooded: Arc<AtomicBool>) -> Self {
        FrameBudget {
            inner,
            scan: Scan::Preface(0),
            head: [0; 9],
            budget: Budget::new(Instant::now()),
            flooded,
        }
    }

    /// Follows the frames in `bytes`, the next bytes the client sent: false when a control
    /// frame among them is over the budget.
    fn follow(&mut self, mut bytes: &[u8]) -> bool {
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
                    if !self.frame(self.head[3]) {
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

    /// A frame of type `ty` has begun: false when it is a control frame over the budget.
    fn frame(&mut self, ty: u8) -> bool {
        match ty {
            HEADERS => {
                self.budget.earn(1);
                true
            }
            PRIORITY | SETTINGS | PING | WINDOW_UPDATE => self.budget.spend(Instant::now),
            t if t > CONTINUATION => self.budget.spend(Instant::now),
            _ => true,
        }
    }

    fn over_budget(&self) -> io::Error {
        self.flooded.store(true, Ordering::Relaxed);
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "HTTP/2 control frames over the connection's budget",
        )
    }

    fn wrote(&mut self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = &r {
            self.budget.wrote(*n);
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FrameBudget<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if self.scan != Scan::Off && !self.follow(&buf.filled()[before..]) {
                return Poll::Ready(Err(self.over_budget()));
            }
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
        self.wrote(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(r)
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

    fn pings(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..n as u64 {
            frame(&mut out, PING, &i.to_be_bytes());
        }
        out
    }

    /// A layer whose budget time does not refill while the test runs, however slowly.
    fn layer() -> (FrameBudget<()>, Arc<AtomicBool>) {
        let flooded = Arc::new(AtomicBool::new(false));
        let mut l = FrameBudget::new((), flooded.clone());
        l.budget.refilled += Duration::from_secs(3600);
        (l, flooded)
    }

    /// Feeds `bytes` in pieces of `step`: whether every piece passed.
    fn feed(l: &mut FrameBudget<()>, bytes: &[u8], step: usize) -> bool {
        bytes.chunks(step).all(|c| l.follow(c))
    }

    #[test]
    fn a_flood_of_pings_is_over_budget_after_the_burst_however_it_is_cut() {
        for step in [1, 7, 9, 17, 4096] {
            let (mut l, _) = layer();
            let mut bytes = PREFACE.to_vec();
            frame(&mut bytes, SETTINGS, &[0, 3, 0, 0, 0, 100]);
            bytes.extend(pings(BURST as usize - 1));
            assert!(feed(&mut l, &bytes, step), "step {step}");
            assert!(!feed(&mut l, &pings(1), step), "step {step}");
            assert_eq!(l.scan, Scan::Off);
        }
    }

    #[test]
    fn settings_priority_window_updates_and_unknown_frames_count_data_does_not() {
        for ty in [SETTINGS, PRIORITY, WINDOW_UPDATE, 0x0b, 0xff] {
            let (mut l, _) = layer();
            let mut bytes = PREFACE.to_vec();
            for _ in 0..BURST {
                frame(&mut bytes, ty, &[0; 5]);
                frame(&mut bytes, 0x0, &[b'x'; 100]);
                frame(&mut bytes, 0x3, &[0; 4]);
            }
            assert!(feed(&mut l, &bytes, 512));
            let mut one = Vec::new();
            frame(&mut one, ty, &[]);
            assert!(!feed(&mut l, &one, 512), "type {ty:#x}");
        }
    }

    #[test]
    fn requests_and_bytes_written_earn_frames() {
        let (mut l, _) = layer();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(pings(BURST as usize));
        assert!(feed(&mut l, &bytes, 100));
        let mut req = Vec::new();
        frame(&mut req, HEADERS, &[0x82]);
        assert!(feed(&mut l, &req, 100));
        assert!(feed(&mut l, &pings(1), 100), "a request earned one");
        l.budget.wrote(3 * 1024 + 1000);
        assert!(feed(&mut l, &pings(3), 100), "3 KiB written earned three");
        // The answers to PINGs, 17 bytes each, earn one frame per 60 or so.
        for _ in 0..59 {
            l.budget.wrote(17);
        }
        assert!(feed(&mut l, &pings(1), 100));
        assert!(!feed(&mut l, &pings(1), 100));
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
        // A PING every second (gRPC's most eager keep-alive), a SETTINGS now and then.
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        for s in 0..86_400u64 {
            assert!(b.spend(|| t0 + Duration::from_secs(s)), "second {s}");
        }
    }

    #[test]
    fn not_h2_is_not_looked_at() {
        let (mut l, _) = layer();
        assert!(l.follow(b"GET / HTTP/1.1\r\n"));
        assert_eq!(l.scan, Scan::Off);
        let (mut l, _) = layer();
        assert!(l.follow(b"PRI * HTTP/2.0\r\n"));
        assert_eq!(l.scan, Scan::Preface(16));
        assert!(l.follow(b"\r\nXX"));
        assert_eq!(l.scan, Scan::Off);
    }

    #[test]
    fn a_frame_with_an_empty_payload_ends_at_its_header() {
        let (mut l, _) = layer();
        let mut bytes = PREFACE.to_vec();
        frame(&mut bytes, SETTINGS, &[]);
        assert!(l.follow(&bytes));
        assert_eq!(l.scan, Scan::Head(0));
        assert_eq!(l.budget.tokens, BURST - 1);
    }

    #[tokio::test]
    async fn over_budget_the_read_fails_and_says_so() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let flooded = Arc::new(AtomicBool::new(false));
        let mut l = FrameBudget::new(server, flooded.clone());
        l.budget.refilled += Duration::from_secs(3600);
        let mut c = client;
        let mut bytes = PREFACE.to_vec();
        bytes.extend(pings(BURST as usize + 1));
        c.write_all(&bytes).await.unwrap();
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
        // What the proxy writes passes through and earns budget.
        l.write_all(&[0u8; 2048]).await.unwrap();
        assert_eq!(l.budget.written, 0);
    }
}
