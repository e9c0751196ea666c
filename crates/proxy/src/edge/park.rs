//! Parks idle HTTP/1.1 keep-alive connections. For the whole life of a connection, hyper
//! keeps an 8 KiB read buffer, an 8 KiB write buffer, the slot of the request future and a
//! header map for reuse, most of the 27 KiB an idle keep-alive connection cost
//! (BENCHMARKS.md, memory). Here, once a connection is idle after a request (at once, or
//! after `PARK_AFTER` for a client that sends its requests one after the other), hyper's
//! connection is taken apart and freed: the connection keeps only its socket and the small
//! layers around it (the idle timer, the smuggling guard) until the client sends its next
//! bytes, and then a new hyper connection serves them. HAProxy and nginx release the buffers
//! of idle connections the same way.
//!
//! hyper has no API for this; it is built from public ones:
//! - *hyper waits for a head*: with a header read timeout configured, hyper asks its timer
//!   for a sleep each time it starts to read a request head. [`HeadTimer`] notes that and
//!   hands back a sleep that never ends (the header timeout itself is `smuggle::Guard`'s).
//! - *the bytes so far end on a message boundary*: `smuggle::Flags::between_messages`.
//! - *parking*: when both hold after a request was served (for `PARK_AFTER`, if the client
//!   came back quickly after it was last parked), the connection is shut down gracefully. hyper closes an idle connection at once,
//!   flushes what it has buffered, and as its last step shuts the IO down; [`Parkable`]
//!   answers that shutdown without closing the socket, and `into_parts` gives the IO back.
//!
//! The idle and header timeouts keep running while a connection is parked ([`ReadReady`]).
//! Connections that were upgraded, or on which the guard stopped watching, are not parked.
//!
//! Written by hand because no crate does this for hyper's server connections.

use crate::edge::linger::{Linger, LINGER};
use crate::edge::passthrough::delegate_async_write;
use crate::edge::ready::ReadReady;
use crate::edge::smuggle::Flags;
use crate::upstream::body::RespBody;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// Where hyper's current connection is in its exchanges, as far as parking is concerned.
const FRESH: u8 = 0;
/// It has handed a request to the service.
const BUSY: u8 = 1;
/// After a request, it has started to read the next head.
const AWAITING: u8 = 2;

/// What the driver, the timer, the service and the IO share about one connection.
#[derive(Default)]
struct Rest {
    phase: AtomicU8,
    /// Requests handed to the service (wrapping).
    dispatched: AtomicU32,
    /// The driver asked hyper to close in order to park: its shutdown of the IO parks it.
    parking: AtomicBool,
    /// hyper's shutdown of the IO was answered by parking.
    parked: AtomicBool,
}

impl Rest {
    fn head_awaited(&self) {
        // Only after a request: then hyper's keep-alive state is idle, and a graceful
        // shutdown closes the connection at once. On a fresh connection it would only do so
        // with nothing buffered, and otherwise answer the next request with `close`.
        let _ = self
            .phase
            .compare_exchange(BUSY, AWAITING, Relaxed, Relaxed);
    }
}

/// hyper's timer for its header read timeout, used only to learn when hyper starts to read a
/// head. Its sleeps never end, and allocate nothing (a boxed zero-sized type).
struct HeadTimer {
    rest: Arc<Rest>,
    /// What `now` answers: hyper only adds the timeout to it for `sleep_until`.
    epoch: Instant,
}

/// The header read timeout hyper is given: any value; its sleep never ends.
const HEAD_WATCH: Duration = Duration::from_secs(3600);

struct Never;

impl Future for Never {
    type Output = ();
    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }
}

impl hyper::rt::Sleep for Never {}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, _: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Never)
    }
    fn sleep_until(&self, _: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.rest.head_awaited();
        Box::pin(Never)
    }
    fn now(&self) -> Instant {
        self.epoch
    }
}

/// The service, noting each request it is handed.
struct Noted<S> {
    inner: S,
    rest: Arc<Rest>,
}

impl<S: Service<Request<Incoming>>> Service<Request<Incoming>> for Noted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.rest.phase.store(BUSY, Relaxed);
        self.rest.dispatched.fetch_add(1, Relaxed);
        self.inner.call(req)
    }
}

/// The IO as hyper holds it: its shutdown parks the connection while the driver parks it,
/// and is a lingering close when the client is in the middle of a message
/// ([`crate::edge::linger`]).
struct Parkable<T> {
    inner: T,
    rest: Arc<Rest>,
    flags: Arc<Flags>,
    linger: Option<Linger>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Parkable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Parkable<T> {
    delegate_async_write!(inner: poll_write, poll_write_vectored, is_write_vectored, poll_flush);
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.rest.parking.load(Relaxed) {
            self.rest.parked.store(true, Relaxed);
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        if this.linger.is_none() {
            if this.flags.between_messages() {
                return Pin::new(&mut this.inner).poll_shutdown(cx);
            }
            this.linger = Some(Linger::new(LINGER));
        }
        match &mut this.linger {
            Some(l) => l.poll_close(&mut this.inner, cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

type Conn<T, S> = http1::UpgradeableConnection<TokioIo<Parkable<T>>, Noted<S>>;

/// Serves a client connection with hyper's HTTP/1 server, parking it whenever it is idle
/// between requests, until it closes, fails, or `stop` asks for a graceful shutdown.
pub async fn serve<T, S>(
    io: T,
    mut builder: http1::Builder,
    service: S,
    flags: &Arc<Flags>,
    stop: &mut watch::Receiver<bool>,
) -> hyper::Result<()>
where
    T: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<RespBody>, Error = Infallible>
        + Send
        + Unpin
        + 'static,
    S::Future: Send + 'static,
{
    let rest = Arc::new(Rest::default());
    builder
        .timer(HeadTimer {
            rest: rest.clone(),
            epoch: Instant::now(),
        })
        .header_read_timeout(HEAD_WATCH);
    let mut io = Parkable {
        inner: io,
        rest: rest.clone(),
        flags: flags.clone(),
        linger: None,
    };
    let mut service = Noted {
        inner: service,
        rest: rest.clone(),
    };
    let mut eager = true;
    loop {
        // Boxed, so that hyper's connection state is freed while the connection is parked.
        let mut conn = Box::pin(
            builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        if !run(conn.as_mut(), &rest, flags, eager, stop).await? {
            return Ok(());
        }
        (io, service) = match take_apart(conn) {
            Some(p) => p,
            None => return Ok(()),
        };
        rest.phase.store(FRESH, Relaxed);
        rest.parking.store(false, Relaxed);
        rest.parked.store(false, Relaxed);
        let parked_at = Instant::now();
        let woke = tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| Pin::new(&mut io.inner).poll_read_ready(cx)) => r,
            _ = stop.changed() => {
                let _ = io.inner.shutdown().await;
                return Ok(());
            }
        };
        if let Err(e) = woke {
            // The idle or header timeout, or a failed socket: closed as hyper closes it.
            tracing::debug!(error = %e, "parked client connection ended");
            return Ok(());
        }
        eager = parked_at.elapsed() >= PARK_AFTER;
    }
}

/// Takes a parked hyper connection apart, freeing its buffers, and gives back the IO and the
/// service; None if hyper had read bytes past the message boundary that are not blank lines.
fn take_apart<T, S>(conn: Pin<Box<Conn<T, S>>>) -> Option<(Parkable<T>, Noted<S>)>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<RespBody>, Error = Infallible> + Unpin,
{
    let parts = Pin::into_inner(conn)
        .into_parts()
        .expect("a parked connection has not been upgraded");
    // The guard saw a message boundary, so what hyper read past it can only be blank lines,
    // which it would have skipped; anything else is not served.
    if parts.read_buf.iter().any(|b| !matches!(b, b'\r' | b'\n')) {
        tracing::debug!(
            bytes = parts.read_buf.len(),
            "unexpected bytes buffered at a message boundary; closing"
        );
        return None;
    }
    #[cfg(test)]
    tests::PARKS.with(|p| p.set(p.get() + 1));
    Some((parts.io.into_inner(), parts.service))
}

/// A connection is parked as soon as it is idle after a request, unless its client came back
/// within this time the last time it was parked: then it is parked only once it has been
/// idle this long (between this and twice this). Parking after every request cost 2.2 µs of
/// CPU per request on the benchmark's plain route (+13%, 64 connections sending requests one
/// after the other; 7,400 more instructions, callgrind): such a client pays it once, not for
/// each request, and one that pauses gives its buffers back at once.
const PARK_AFTER: Duration = Duration::from_millis(100);

/// Runs hyper's connection until it ends (false) or is parked (true); on `stop`, shuts it
/// down gracefully.
async fn run<T, S>(
    mut conn: Pin<&mut Conn<T, S>>,
    rest: &Rest,
    flags: &Flags,
    eager: bool,
    stop: &mut watch::Receiver<bool>,
) -> hyper::Result<bool>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<RespBody>, Error = Infallible>,
{
    let mut settle = Settle {
        eager,
        ..Settle::default()
    };
    tokio::select! {
        biased;
        r = std::future::poll_fn(|cx| poll_until_rest(conn.as_mut(), rest, flags, &mut settle, cx)) => return r,
        _ = stop.changed() => {}
    }
    // Shutting down: a real close, even if parking had begun.
    rest.parking.store(false, Relaxed);
    conn.as_mut().graceful_shutdown();
    conn.await.map(|()| false)
}

/// The wait of an idle connection before it is parked, unless `eager`. Armed when the
/// connection is first seen idle, and not re-armed for each request after it: when it fires,
/// the connection is parked if no request came since it was armed, and otherwise armed again.
/// So a busy connection costs one timer event per `PARK_AFTER`, not one per request.
#[derive(Default)]
struct Settle {
    /// Park at once (see `PARK_AFTER`).
    eager: bool,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The requests dispatched when it was armed.
    mark: u32,
}

impl Settle {
    fn arm(&mut self, dispatched: u32, cx: &mut Context<'_>) {
        let at = tokio::time::Instant::now() + PARK_AFTER;
        let t = match &mut self.timer {
            Some(t) => {
                t.as_mut().reset(at);
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        // Registers the timer (it cannot have elapsed yet).
        let _ = t.as_mut().poll(cx);
        self.mark = dispatched;
    }

    /// Whether the connection, idle now, has been idle for `PARK_AFTER`.
    fn due(&mut self, dispatched: u32, cx: &mut Context<'_>) -> bool {
        if self.eager {
            return true;
        }
        let Some(t) = &mut self.timer else {
            self.arm(dispatched, cx);
            return false;
        };
        // Polled when armed, so it wakes this task when it fires; checked without a poll
        // after each request until then.
        if !t.is_elapsed() {
            return false;
        }
        if self.mark == dispatched {
            return true;
        }
        self.arm(dispatched, cx);
        false
    }
}

fn poll_until_rest<T, S>(
    mut conn: Pin<&mut Conn<T, S>>,
    rest: &Rest,
    flags: &Flags,
    settle: &mut Settle,
    cx: &mut Context<'_>,
) -> Poll<hyper::Result<bool>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<RespBody>, Error = Infallible>,
{
    loop {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r.map(|()| rest.parked.load(Relaxed)));
        }
        let idle = rest.phase.load(Relaxed) == AWAITING && flags.between_messages();
        if rest.parking.load(Relaxed) || !idle || !settle.due(rest.dispatched.load(Relaxed), cx) {
            return Poll::Pending;
        }
        // hyper is idle after a request (its keep-alive state is idle), so this closes it at
        // once; poll again to let it flush and shut down.
        rest.parking.store(true, Relaxed);
        conn.as_mut().graceful_shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::smuggle::Guard;
    use crate::upstream::body::full;
    use std::cell::Cell;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    thread_local! {
        /// Connections parked on this thread (a test's runtime and its server task share it).
        pub(super) static PARKS: Cell<usize> = const { Cell::new(0) };
    }

    fn parks() -> usize {
        PARKS.with(Cell::get)
    }

    /// Answers with the request's path; `/ws` upgrades to an echo of what follows.
    fn service() -> impl Service<
        Request<Incoming>,
        Response = Response<RespBody>,
        Error = Infallible,
        Future: Send,
    > + Send
           + Unpin
           + 'static {
        hyper::service::service_fn(|mut req: Request<Incoming>| async move {
            let path = req.uri().path().to_string();
            if path == "/ws" {
                let on = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let mut io = TokioIo::new(on.await.expect("upgraded"));
                    let mut buf = [0u8; 64];
                    let n = io.read(&mut buf).await.expect("a read");
                    io.write_all(&buf[..n]).await.expect("a write");
                });
                let r = Response::builder()
                    .status(101)
                    .header("connection", "upgrade")
                    .header("upgrade", "echo")
                    .body(full(""));
                return Ok::<_, Infallible>(r.expect("a response"));
            }
            Ok(Response::new(full(path)))
        })
    }

    struct Client {
        tcp: TcpStream,
        stop: watch::Sender<bool>,
        server: tokio::task::JoinHandle<hyper::Result<()>>,
    }

    /// A client connected to `serve` behind the smuggling guard (header timeout 1 s).
    async fn connect() -> Client {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let flags = Arc::new(Flags::default());
        let io = Guard::new(s, flags.clone(), Duration::from_secs(1));
        let (stop, mut rx) = watch::channel(false);
        let server = tokio::spawn(async move {
            serve(io, http1::Builder::new(), service(), &flags, &mut rx).await
        });
        Client { tcp, stop, server }
    }

    impl Client {
        async fn send(&mut self, bytes: &[u8]) {
            self.tcp.write_all(bytes).await.unwrap();
        }

        /// Everything the server sends within 200 ms (until it closes, if it does).
        async fn read(&mut self) -> String {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let until = tokio::time::Instant::now() + Duration::from_millis(200);
            while let Ok(Ok(n)) = tokio::time::timeout_at(until, self.tcp.read(&mut buf)).await {
                if n == 0 {
                    got.extend_from_slice(b"<closed>");
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&got).into_owned()
        }
    }

    /// Long enough for an idle connection to be parked.
    async fn settle() {
        tokio::time::sleep(PARK_AFTER * 2 + Duration::from_millis(50)).await;
    }

    impl Client {
        /// Reads until what was read ends with `end` (no waiting after it).
        async fn read_to(&mut self, end: &str) -> String {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(end.as_bytes()) {
                let n = self.tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&got).into_owned()
        }
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
    }

    fn answers(got: &str) -> Vec<&str> {
        got.split("HTTP/1.1 ").skip(1).collect()
    }

    #[tokio::test]
    async fn an_idle_connection_is_parked_between_requests() {
        let before = parks();
        let mut c = connect().await;
        for (i, path) in ["/a", "/b", "/c"].into_iter().enumerate() {
            c.send(&get(path)).await;
            let got = c.read().await;
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
            assert!(got.ends_with(path), "{got}");
            assert!(!got.contains("close"), "{got}");
            settle().await;
            assert_eq!(parks() - before, i + 1);
        }
        // Blank lines between requests are skipped, as hyper skips them.
        c.send(b"\r\n").await;
        c.send(&get("/d")).await;
        assert!(c.read().await.ends_with("/d"));
        // Requests one after the other: parked after the first (the client had paused
        // before), then kept until the client pauses again.
        let before = parks();
        for path in ["/e", "/f", "/g", "/h"] {
            c.send(&get(path)).await;
            let until = tokio::time::Instant::now() + PARK_AFTER / 2;
            c.read_to(path).await;
            tokio::time::sleep_until(until).await;
        }
        assert_eq!(parks() - before, 1);
        settle().await;
        assert_eq!(parks() - before, 2);
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let mut c = connect().await;
        c.send(&[get("/1"), get("/2"), get("/3")].concat()).await;
        let got = c.read().await;
        let a = answers(&got);
        assert_eq!(a.len(), 3, "{got}");
        for (a, want) in a.iter().zip(["/1", "/2", "/3"]) {
            assert!(a.ends_with(want), "{got}");
        }
    }

    #[tokio::test]
    async fn a_head_begun_is_finished_by_the_same_connection_or_timed_out() {
        let mut c = connect().await;
        c.send(&get("/a")).await;
        assert!(c.read().await.ends_with("/a"));
        settle().await;
        let before = parks();
        // Half a head, then a pause: not parked; the rest is answered.
        c.send(b"GET /b HTTP/1.1\r\nHo").await;
        settle().await;
        assert_eq!(parks(), before);
        c.send(b"st: x\r\n\r\n").await;
        assert!(c.read().await.ends_with("/b"));
        settle().await;
        assert_eq!(parks() - before, 1);
        // Half a head after parking: the header timeout (1 s) closes the connection.
        c.send(b"GET /c HTTP/1.1\r\n").await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(c.read().await, "<closed>");
    }

    /// A body the service left unread is never read as a request, whenever it arrives.
    #[tokio::test]
    async fn an_unread_body_is_never_taken_for_a_request() {
        let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        let head = format!(
            "POST /post HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            smuggled.len()
        );
        // The body later: hyper cannot drain it and closes the connection.
        let mut c = connect().await;
        c.send(head.as_bytes()).await;
        assert!(c.read().await.contains("/post"));
        c.send(smuggled).await;
        let got = c.read().await;
        assert!(!got.contains("smuggled"), "{got}");
        // The body with the head: drained, and the connection goes on.
        let mut c = connect().await;
        c.send(&[head.as_bytes(), smuggled].concat()).await;
        let got = c.read().await;
        assert!(!got.contains("smuggled"), "{got}");
        c.send(&get("/after")).await;
        assert!(c.read().await.ends_with("/after"));
    }

    #[tokio::test]
    async fn a_parked_connection_can_upgrade() {
        let mut c = connect().await;
        c.send(&get("/a")).await;
        assert!(c.read().await.ends_with("/a"));
        settle().await;
        c.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
            .await;
        assert!(c.read().await.starts_with("HTTP/1.1 101"));
        c.send(b"ping").await;
        assert!(c.read().await.starts_with("ping"));
    }

    #[tokio::test]
    async fn connections_close_when_asked_or_stopped() {
        // The client asks.
        let mut c = connect().await;
        c.send(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        assert!(c.read().await.ends_with("<closed>"));
        c.server.await.unwrap().unwrap();
        // The listener stops while the connection is parked.
        let mut c = connect().await;
        c.send(&get("/a")).await;
        assert!(c.read().await.ends_with("/a"));
        settle().await;
        c.stop.send(true).unwrap();
        assert_eq!(c.read().await, "<closed>");
        c.server.await.unwrap().unwrap();
        // The listener stops before the connection is parked.
        let mut c = connect().await;
        c.send(&get("/a")).await;
        assert!(c.read().await.ends_with("/a"));
        c.stop.send(true).unwrap();
        assert_eq!(c.read().await, "<closed>");
        c.server.await.unwrap().unwrap();
    }
}
