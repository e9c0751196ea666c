//! Listeners: accept TCP (and TLS, with ALPN choosing h2 or http/1.1), serve HTTP/1.1 and h2
//! with hyper (idle HTTP/1.1 connections parked by `park`), enforce client-side limits and
//! timeouts, and shut down gracefully. On reload a listener whose bind address is unchanged
//! keeps its socket and picks up new settings; added listeners are bound and removed ones
//! closed, without touching the others.

use crate::edge::abuse::{self, Admit};
use crate::edge::conn::ConnInfo;
use crate::edge::frame_budget::FrameBudget;
use crate::edge::passthrough::delegate_async_write;
use crate::edge::ready::ReadReady;
use crate::Shared;
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use parking_lot::Mutex;
use portcullis_config::{Listener as ListenerCfg, Protocol};
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listener `{name}`: cannot bind {bind}: {source}")]
    Bind {
        name: String,
        bind: String,
        source: io::Error,
    },
    #[error("listener `{name}`: {source}")]
    Tls {
        name: String,
        source: crate::edge::tls::TlsError,
    },
}

/// Settings a running listener reads for each new connection.
pub struct Settings {
    pub cfg: ListenerCfg,
    /// The canonicalization rules of this listener's requests.
    pub rules: Arc<crate::edge::canon::Rules>,
    pub tls: Option<(
        tokio_rustls::TlsAcceptor,
        Arc<crate::edge::tls::SniResolver>,
    )>,
}

struct Running {
    bind: String,
    settings: Arc<ArcSwap<Settings>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

#[derive(Default)]
pub struct Listeners {
    running: Mutex<HashMap<String, Running>>,
}

/// A bound but not yet serving listener, so a reload can fail before anything changes.
pub struct Prepared {
    name: String,
    listener: Option<TcpListener>,
    settings: Settings,
}

pub fn settings(cfg: &ListenerCfg) -> Result<Settings, ListenError> {
    let tls = match &cfg.tls {
        Some(t) => {
            let (sc, resolver) =
                crate::edge::tls::server_config(t, &cfg.protocols).map_err(|source| {
                    ListenError::Tls {
                        name: cfg.name.clone(),
                        source,
                    }
                })?;
            Some((tokio_rustls::TlsAcceptor::from(sc), resolver))
        }
        None => None,
    };
    Ok(Settings {
        cfg: cfg.clone(),
        rules: Arc::new(crate::edge::canon::Rules::new(cfg)),
        tls,
    })
}

fn bind(cfg: &ListenerCfg) -> Result<TcpListener, ListenError> {
    let err = |source| ListenError::Bind {
        name: cfg.name.clone(),
        bind: cfg.bind.clone(),
        source,
    };
    let addr: SocketAddr = cfg.bind.parse().map_err(|_| {
        err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "invalid address",
        ))
    })?;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(4096).map_err(err)?;
    TcpListener::from_std(sock.into()).map_err(err)
}

impl Listeners {
    /// Binds what the new config adds or moves, and prepares settings for the rest.
    pub fn prepare(&self, cfgs: &[ListenerCfg]) -> Result<Vec<Prepared>, ListenError> {
        let running = self.running.lock();
        let mut out = Vec::new();
        for cfg in cfgs {
            let settings = settings(cfg)?;
            let listener = match running.get(&cfg.name) {
                Some(r) if r.bind == cfg.bind => None,
                _ => Some(bind(cfg)?),
            };
            out.push(Prepared {
                name: cfg.name.clone(),
                listener,
                settings,
            });
        }
        Ok(out)
    }

    /// Starts prepared listeners, updates kept ones, and stops the ones no longer configured.
    pub fn commit(&self, prepared: Vec<Prepared>, shared: &Arc<Shared>, grace: Duration) {
        let mut running = self.running.lock();
        let mut keep = std::collections::HashSet::new();
        for p in prepared {
            keep.insert(p.name.clone());
            match p.listener {
                None => {
                    if let Some(r) = running.get(&p.name) {
                        r.settings.store(Arc::new(p.settings));
                    }
                }
                Some(l) => {
                    if let Some(old) = running.remove(&p.name) {
                        let _ = old.stop.send(true);
                    }
                    let bind = p.settings.cfg.bind.clone();
                    let settings = Arc::new(ArcSwap::from_pointee(p.settings));
                    let (stop, rx) = watch::channel(false);
                    let task = tokio::spawn(accept_loop(
                        l,
                        p.name.clone(),
                        settings.clone(),
                        shared.clone(),
                        rx,
                        grace,
                    ));
                    tracing::info!(listener = %p.name, %bind, "listening");
                    running.insert(
                        p.name,
                        Running {
                            bind,
                            settings,
                            stop,
                            task,
                        },
                    );
                }
            }
        }
        running.retain(|name, r| {
            let k = keep.contains(name);
            if !k {
                tracing::info!(listener = %name, "listener removed; draining");
                let _ = r.stop.send(true);
            }
            k
        });
    }

    /// Stops accepting everywhere and waits for in-flight connections to drain.
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut running = self.running.lock();
            running
                .drain()
                .map(|(_, r)| {
                    let _ = r.stop.send(true);
                    r.task
                })
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Re-reads changed certificate files of every TLS listener.
    pub fn refresh_certs(&self) {
        for (name, r) in self.running.lock().iter() {
            if let Some((_, resolver)) = &r.settings.load().tls {
                match resolver.refresh() {
                    Ok(true) => tracing::info!(listener = %name, "certificates reloaded from disk"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(listener = %name, error = %e, "certificate reload failed; keeping the previous certificates")
                    }
                }
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.running.lock().keys().cloned().collect()
    }
}

async fn accept_loop(
    listener: TcpListener,
    name: String,
    settings: Arc<ArcSwap<Settings>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let life = Arc::new(crate::edge::conn::Life::default());
    let name: Arc<str> = Arc::from(name.as_str());
    let gauge = shared
        .metrics
        .active_connections
        .get_or_create(&vec![("listener", name.to_string())])
        .clone();
    let open = Arc::new(Open::default());
    loop {
        if !open.room(&settings, &mut stop).await {
            break;
        }
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let s = settings.load_full();
        let shared = shared.clone();
        let name = name.clone();
        let watch = Watch {
            watcher: graceful.watcher(),
            stop: stop.clone(),
        };
        let gauge = gauge.clone();
        let life = life.clone();
        let counted = Counted::new(&open);
        tokio::spawn(async move {
            gauge.inc();
            let held: Box<dyn Send> = Box::new((GaugeGuard(gauge), counted));
            if !paced(&shared, peer.ip()).await {
                return;
            }
            let end = life.end.clone();
            // Dropped when the grace period is over, which closes the connection.
            let accepted = Accepted {
                peer,
                listener: name,
                first_head_by: tokio::time::Instant::now() + s.cfg.timeouts.client_header.0,
                life,
                held,
            };
            tokio::select! {
                _ = serve(tcp, accepted, s, shared, watch) => {}
                _ = end.cancelled() => {}
            }
        });
    }
    drop(listener);
    life.tunnels.close();
    let drained = async {
        graceful.shutdown().await;
        life.tunnels.wait().await;
    };
    tokio::select! {
        _ = drained => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(listener = %name, "grace period over; closing remaining connections");
        }
    }
    life.end.cancel();
}

/// The client connections a listener has open, for its `max_connections`.
#[derive(Default)]
struct Open {
    count: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::Notify,
}

impl Open {
    /// Waits until the listener may accept one more connection: at once without a limit or
    /// under it; at the limit, until a connection closes (new clients wait in the kernel's
    /// accept queue meanwhile, as with HAProxy's `maxconn`). The limit is read again each
    /// second, so a reload that raises it applies to a listener waiting at the old one.
    /// False when the listener stops.
    async fn room(&self, settings: &ArcSwap<Settings>, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            let Some(max) = settings.load().cfg.max_connections else {
                return true;
            };
            if self.count.load(std::sync::atomic::Ordering::Acquire) < max {
                return true;
            }
            tokio::select! {
                _ = stop.changed() => return false,
                _ = self.closed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// One accepted connection, counted in its listener's [`Open`] until it is dropped.
struct Counted(Arc<Open>);

impl Counted {
    fn new(open: &Arc<Open>) -> Counted {
        open.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Counted(open.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.closed.notify_one();
    }
}

/// Whether a new connection from `ip` may be served, after waiting its turn if its address
/// abused HTTP/2 lately (see [`crate::edge::abuse`]).
async fn paced(shared: &Shared, ip: std::net::IpAddr) -> bool {
    let action = match shared.abusers.admit(ip, std::time::Instant::now()) {
        Admit::Now => return true,
        Admit::After(wait) => {
            tokio::time::sleep(wait).await;
            "paced"
        }
        Admit::Refuse => "refused",
    };
    shared
        .metrics
        .h2_abuse
        .get_or_create(&vec![("action", action.into())])
        .inc();
    action == "paced"
}

struct GaugeGuard(Gauge);
impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve(
    tcp: tokio::net::TcpStream,
    accepted: Accepted,
    s: Arc<Settings>,
    shared: Arc<Shared>,
    watch: Watch,
) {
    match &s.tls {
        None => serve_plain(tcp, accepted, &s, shared, watch).await,
        // Boxed: the handshake's and rustls' state would otherwise size every connection's
        // task, plain ones included, for the connection's whole life.
        Some((acceptor, _)) => {
            Box::pin(serve_tls(tcp, acceptor, accepted, &s, shared, watch)).await
        }
    }
}

/// What is known of a connection when it is accepted.
struct Accepted {
    peer: SocketAddr,
    listener: Arc<str>,
    /// The first request's head is due by then, TLS handshake included.
    first_head_by: tokio::time::Instant,
    life: Arc<crate::edge::conn::Life>,
    /// Its listener's count of it (see `ConnInfo::held`).
    held: Box<dyn Send>,
}

impl Accepted {
    /// The connection's facts for the request path, and its I/O layers: the idle timer and
    /// the smuggling guard (which also enforces the header timeout).
    fn layers<T>(
        self,
        io: T,
        s: &Settings,
        client_cert: Option<Arc<Vec<u8>>>,
    ) -> (Arc<ConnInfo>, crate::edge::smuggle::Guard<IdleIo<T>>) {
        let cfg = &s.cfg;
        let smuggle = Arc::new(crate::edge::smuggle::Flags::default());
        let mut conn = ConnInfo::new(
            self.peer,
            self.listener,
            s.tls.is_some(),
            s.rules.clone(),
            client_cert,
            smuggle.clone(),
        );
        conn.body_timeout = cfg.timeouts.client_body.0;
        conn.life = self.life;
        conn.held = parking_lot::Mutex::new(Some(self.held));
        let mut idle = IdleIo::new(io, cfg.timeouts.idle.0);
        idle.sending = Some(conn.sending.clone());
        let io = crate::edge::smuggle::Guard::new(idle, smuggle, cfg.timeouts.client_header.0)
            .first_head_by(self.first_head_by);
        (Arc::new(conn), io)
    }
}

async fn serve_plain(
    tcp: tokio::net::TcpStream,
    accepted: Accepted,
    s: &Settings,
    shared: Arc<Shared>,
    mut watch: Watch,
) {
    // Silence ends the connection after the header or the idle timeout, whichever comes
    // first, as it does once hyper reads.
    let idle = s.cfg.timeouts.idle.0;
    let silent_until = accepted
        .first_head_by
        .min(tokio::time::Instant::now() + idle);
    let spoken = tokio::select! {
        biased;
        r = tokio::time::timeout_at(silent_until, sniff(&tcp)) => match r {
            Ok(Some(p)) => p,
            // Closed or failed before a byte arrived, or silent too long: closed without a
            // response, as a late head is.
            Ok(None) | Err(_) => return,
        },
        // Shutting down: nothing was asked, so nothing is owed.
        _ = watch.stop.changed() => return,
    };
    let (conn, io) = accepted.layers(tcp, s, None);
    run_http(io, conn, s, spoken, shared, watch).await
}

async fn serve_tls(
    tcp: tokio::net::TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    accepted: Accepted,
    s: &Settings,
    shared: Arc<Shared>,
    watch: Watch,
) {
    let peer = accepted.peer;
    let hs = tokio::time::timeout_at(accepted.first_head_by, acceptor.accept(tcp)).await;
    let tls = match hs {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let spoken = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Spoken::H2,
        Some(b"http/1.1") => Spoken::H1,
        _ => Spoken::Unsure,
    };
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Arc::new(c.to_vec()));
    let (conn, io) = accepted.layers(tls, s, client_cert);
    run_http(io, conn, s, spoken, shared, watch).await
}

/// The protocol a client connection speaks, when known before hyper reads from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spoken {
    H1,
    H2,
    /// Left to hyper's own detection (it reads up to the 24-byte h2 preface first).
    Unsure,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells an h2 prior-knowledge connection from HTTP/1 by peeking at its first bytes, which
/// stay in the socket. hyper-util's detection reads them into a 24-byte buffer and replays
/// them, so hyper's first read of an HTTP/1 head returned only those 24 bytes, and hyper grew
/// its read buffer from 8 to 16 KiB for the life of the connection (5 KiB more per idle
/// connection, measured). `None` when the client closed without sending anything.
async fn sniff(tcp: &tokio::net::TcpStream) -> Option<Spoken> {
    let mut buf = [0u8; 24];
    let n = tcp.peek(&mut buf).await.ok()?;
    (n > 0).then(|| spoken_by(&buf[..n]))
}

fn spoken_by(first: &[u8]) -> Spoken {
    if first.len() >= H2_PREFACE.len() && first[..H2_PREFACE.len()] == *H2_PREFACE {
        Spoken::H2
    } else if H2_PREFACE.starts_with(first) {
        // A prefix of the preface so far ("PRI * HT"...): hyper reads on and decides.
        Spoken::Unsure
    } else {
        Spoken::H1
    }
}

async fn run_http<IO>(
    io: IO,
    conn: Arc<ConnInfo>,
    s: &Settings,
    spoken: Spoken,
    shared: Arc<Shared>,
    watch: Watch,
) where
    IO: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
{
    let cfg = &s.cfg;
    let (flags, sending) = (conn.smuggle.clone(), conn.sending.clone());
    let (ip, edge) = (conn.peer.ip(), shared.clone());
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(crate::pipeline::handle(shared, conn, req).await) }
    });
    let h1 = cfg.protocols.contains(&Protocol::Http1);
    let h2 = cfg.protocols.contains(&Protocol::Http2);
    // Set when an h2 connection is closed for its control frames (HTTP/1 needs none).
    let mut flooded: Option<Arc<std::sync::atomic::AtomicBool>> = None;
    let ended = if h1 && (!h2 || spoken == Spoken::H1) {
        // Known HTTP/1 goes straight to hyper's HTTP/1 server: the auto builder would read
        // the first 24 bytes to detect the protocol, even when told it is HTTP/1.
        let mut b = hyper::server::conn::http1::Builder::new();
        b.apply(cfg);
        // hyper-util's graceful watcher takes no upgradeable HTTP/1 connection, so this
        // one is told of the shutdown directly; holding the watcher until the connection
        // ends makes the listener's shutdown wait for it all the same.
        let Watch { watcher, mut stop } = watch;
        let r = crate::edge::park::serve(io, b, svc, &flags, &mut stop).await;
        drop(watcher);
        r.map_err(Into::into)
    } else {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1().apply(cfg);
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_size.0.min(u32::MAX as u64) as u32)
            .max_concurrent_streams(256)
            // Abuse limits, set here rather than left to h2's and hyper's defaults (the same
            // values today), so that a dependency update cannot loosen them unnoticed: a
            // connection whose client resets more than 20 streams before they are served
            // (rapid reset, CVE-2023-44487), or makes the proxy reset more than 200 of its
            // streams for protocol errors (CVE-2025-8671; h2's default is 1024, which let
            // each attacking connection carry five times the work, and no honest client
            // sends even one such stream), is closed with GOAWAY (ENHANCE_YOUR_CALM).
            // tests/h2_abuse.rs measures both.
            .max_pending_accept_reset_streams(20)
            .max_local_error_reset_streams(200)
            .keep_alive_interval(Some(Duration::from_secs(20)))
            .keep_alive_timeout(Duration::from_secs(20));
        // PING, SETTINGS, PRIORITY and WINDOW_UPDATE floods: a budget per connection
        // (`frame_budget`; it looks at nothing on a connection that turns out HTTP/1).
        // It also times h2 header blocks (`timeouts.client_header`) and tells the idle timer
        // which frames are activity (`timeouts.idle`).
        let io = FrameBudget::new(
            io,
            flooded.insert(Arc::default()).clone(),
            sending,
            cfg.timeouts.client_header.0,
        );
        // Boxed, so that this rarer branch's larger state does not size every connection's
        // task (an idle HTTP/1 connection keeps its task for its whole life).
        if h2 && (!h1 || spoken == Spoken::H2) {
            // h2 alone (ALPN chose it, or the listener has no http1): `serve_connection`,
            // since `serve_connection_with_upgrades` ignores `http2_only` and would serve an
            // HTTP/1.1 request. h2 has no HTTP/1 upgrades to lose. tests/h2_abuse.rs `alpn`.
            let c = b
                .http2_only()
                .serve_connection(TokioIo::new(io), svc)
                .into_owned();
            Box::pin(watch.watcher.watch(c)).await
        } else {
            let c = b.serve_connection_with_upgrades(TokioIo::new(io), svc);
            Box::pin(watch.watcher.watch(c.into_owned())).await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "client connection ended with an error");
        if abuse::is_abuse(e.as_ref())
            || flooded.is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
        {
            edge.abusers.flag(ip, std::time::Instant::now());
            edge.metrics
                .h2_abuse
                .get_or_create(&vec![("action", "closed".into())])
                .inc();
        }
    }
}

/// What a connection needs to take part in its listener's graceful shutdown: the watcher
/// that the shutdown waits for, and the stop signal.
struct Watch {
    watcher: hyper_util::server::graceful::Watcher,
    stop: watch::Receiver<bool>,
}

/// The HTTP/1 settings shared by the plain and the auto-detecting paths.
trait Http1Settings {
    fn apply(&mut self, cfg: &ListenerCfg);
}

macro_rules! http1_settings {
    ($t:ty) => {
        impl Http1Settings for $t {
            fn apply(&mut self, cfg: &ListenerCfg) {
                self.timer(TokioTimer::new())
                    // The header timeout is enforced by `smuggle::Guard`, which knows when a
                    // head starts: hyper's also runs while a keep-alive connection waits for
                    // its next request, and allocates a timer per request.
                    .header_read_timeout(None)
                    .max_buf_size((cfg.max_header_size.0 as usize).max(8192));
                // hyper's default is 100; setting it explicitly makes hyper fill a header
                // array on every parse, so only set a different limit.
                if cfg.max_headers != 100 {
                    self.max_headers(cfg.max_headers);
                }
            }
        }
    };
}
http1_settings!(hyper::server::conn::http1::Builder);
http1_settings!(auto::Http1Builder<'_, TokioExecutor>);

/// Closes a client connection when nothing has been read or written for `idle`, like
/// HAProxy's `timeout client`. I/O only sets a flag (no clock read per call); a timer that
/// fires every `idle / QUIET_TICKS` clears it, and the connection is closed after
/// `QUIET_TICKS` ticks in a row without activity, i.e. between `idle` and `idle × 9/8`
/// after the last byte.
///
/// On an h2 connection bytes are not what counts (see [`IdleIo::busy`]): the proxy's
/// keep-alive PING and its answer, every 20 s, would keep a connection with nothing to do for
/// ever, and a request waiting on a slow origin moves no byte at all.
struct IdleIo<T> {
    inner: T,
    tick: Duration,
    active: bool,
    /// The last write waited on the client (it reads nothing), and none has moved since.
    blocked: bool,
    quiet: u32,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The connection's responses in flight: one that waits on the client for the idle
    /// timeout is cut, whatever else moves on the connection (pings, other streams).
    sending: Option<Arc<crate::edge::sending::Sending>>,
}

const QUIET_TICKS: u32 = 8;

/// Vectored writes up to this size are sent as one buffer (see `poll_write_vectored`).
const COALESCE_MAX: usize = 16 * 1024;

thread_local! {
    /// The buffer small vectored writes are joined in, one per runtime thread.
    static COALESCE: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(COALESCE_MAX));
}

impl<T> IdleIo<T> {
    fn new(inner: T, idle: Duration) -> Self {
        let tick = (idle / QUIET_TICKS).max(Duration::from_millis(1));
        IdleIo {
            inner,
            tick,
            active: false,
            blocked: false,
            quiet: 0,
            sleep: Box::pin(tokio::time::sleep(tick)),
            sending: None,
        }
    }

    fn touch(&mut self) {
        self.active = true;
    }

    /// Marks activity when a write has moved bytes, and hands its result back. A write the
    /// client holds up (it reads nothing) runs the idle timer too: a client that stops
    /// reading after sending a byte more is not read from either, and would never time out.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                    self.blocked = false;
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                self.blocked = true;
                match self.check_idle(cx) {
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    _ => Poll::Pending,
                }
            }
            r => r,
        }
    }

    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if let Some(s) = &self.sending {
                s.cut_stalled(QUIET_TICKS);
            }
            if self.busy() {
                self.quiet = 0;
            } else {
                self.quiet += 1;
                if self.quiet >= QUIET_TICKS {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client idle timeout",
                    )));
                }
            }
            let next = tokio::time::Instant::now() + self.tick;
            self.sleep.as_mut().reset(next);
        }
    }

    /// Whether the connection did something since the last tick. On HTTP/1, any byte moved.
    /// On h2, a HEADERS, DATA or RST_STREAM frame, either way; or, while a request is in
    /// flight, anything but a write waiting on the client: a request whose origin is slow
    /// moves nothing and is the backend timeouts' to end, as Envoy's `idle_timeout` counts
    /// only time without a stream, while a client that takes nothing is still timed (its
    /// stalled responses are cut by `cut_stalled` all the same).
    fn busy(&mut self) -> bool {
        let bytes = std::mem::take(&mut self.active);
        match self.sending.as_deref().and_then(|s| s.streams.tick()) {
            None => bytes,
            Some(t) => t.moved || (t.in_flight && (bytes || !self.blocked)),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => self.check_idle(cx),
        }
    }
}

/// A parked connection waits here: the idle timeout runs as it does while hyper reads.
impl<T: ReadReady + Unpin> ReadReady for IdleIo<T> {
    fn poll_read_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_read_ready(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => self.check_idle(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(cx, r)
    }
    /// hyper hands a response's head and body over as separate slices. Small ones are copied
    /// together and go out in one `send`: on Linux a `writev` on a socket costs more in the
    /// kernel than a `send` of the same bytes (it goes through the VFS layer first), and an
    /// interleaved A/B on the benchmark's plain route measured −0.35 µs per request. Large
    /// writes stay vectored, so big bodies are not copied.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let this = &mut *self;
        let r = if bufs.len() > 1 && total <= COALESCE_MAX {
            COALESCE.with_borrow_mut(|joined| {
                joined.clear();
                for b in bufs {
                    joined.extend_from_slice(b);
                }
                Pin::new(&mut this.inner).poll_write(cx, joined)
            })
        } else {
            Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
        };
        this.wrote(cx, r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.check_idle(cx),
            r => r,
        }
    }
    delegate_async_write!(inner: is_write_vectored, poll_shutdown);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn vectored_writes_arrive_whole_and_in_order() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut io = IdleIo::new(tcp, Duration::from_secs(60));
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n".to_vec();
        let big = vec![b'x'; COALESCE_MAX + 1];
        let mut want = Vec::new();
        // Small (joined into one send) and large (left vectored) writes.
        for body in [&b"ok\n"[..], &big[..]] {
            let mut parts = [io::IoSlice::new(&head), io::IoSlice::new(body)];
            let mut slices = &mut parts[..];
            while !slices.is_empty() {
                let n = io.write_vectored(slices).await.unwrap();
                io::IoSlice::advance_slices(&mut slices, n);
            }
            want.extend_from_slice(&head);
            want.extend_from_slice(body);
        }
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), want);
    }

    #[test]
    fn the_first_bytes_tell_h2_from_http1() {
        assert_eq!(spoken_by(b"GET / HTTP/1.1\r\nHost: x\r\n"), Spoken::H1);
        assert_eq!(spoken_by(b"G"), Spoken::H1);
        assert_eq!(spoken_by(b"\r\n"), Spoken::H1);
        assert_eq!(spoken_by(b"PRIX"), Spoken::H1);
        assert_eq!(spoken_by(H2_PREFACE), Spoken::H2);
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(b"\0\0\x12\x04");
        assert_eq!(spoken_by(&more), Spoken::H2);
        // Every proper prefix of the preface leaves the choice to hyper.
        for n in 1..H2_PREFACE.len() {
            assert_eq!(spoken_by(&H2_PREFACE[..n]), Spoken::Unsure, "{n}");
        }
    }

    /// A parked connection is still closed by the idle timeout (here 300 ms, checked every
    /// 300/8 ms), with no answer.
    #[tokio::test]
    async fn the_idle_timeout_closes_a_parked_connection() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        let flags = Arc::new(crate::edge::smuggle::Flags::default());
        let io = crate::edge::smuggle::Guard::new(
            IdleIo::new(s, Duration::from_millis(300)),
            flags.clone(),
            Duration::from_secs(5),
        );
        let svc = service_fn(|_| async {
            Ok::<_, Infallible>(http::Response::new(crate::upstream::body::full("ok")))
        });
        let (_stop, mut rx) = watch::channel(false);
        let server = tokio::spawn(async move {
            let b = hyper::server::conn::http1::Builder::new();
            crate::edge::park::serve(io, b, svc, &flags, &mut rx).await
        });
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].ends_with(b"ok"));
        let start = std::time::Instant::now();
        // Parked at once (its first idle moment); then closed by the idle timeout.
        assert_eq!(c.read(&mut buf).await.unwrap(), 0);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(290), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        server.await.unwrap().unwrap();
    }

    /// A connection's task lives as long as the connection, idle or not, so what it holds
    /// stays small: the TLS handshake and HTTP/2 are boxed, and hyper's HTTP/1 state is
    /// boxed and freed while the connection is parked (`park`). It was 8.7 KiB before.
    #[test]
    fn a_connection_task_stays_small() {
        fn size<A, B, C, D, E, F: Future>(_: fn(A, B, C, D, E) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        type Tcp = tokio::net::TcpStream;
        let n = size::<Tcp, Accepted, Arc<Settings>, Arc<Shared>, Watch, _>(serve);
        assert!(n <= 3 * 1024, "{n} bytes");
    }

    #[tokio::test]
    async fn sniffing_leaves_the_bytes_for_hyper() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let req = b"GET /a-long-enough-path HTTP/1.1\r\nHost: x\r\n\r\n";
        c.write_all(req).await.unwrap();
        assert_eq!(sniff(&s).await, Some(Spoken::H1));
        let mut got = vec![0u8; req.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &req[..]);
        // A client that closes without a byte is not served at all.
        drop(c);
        assert_eq!(sniff(&s).await, None);
    }

    /// On h2 the idle timer (here 300 ms) goes by requests, not bytes: a request whose origin
    /// is slow (nothing moves for 1 s) keeps the connection, and once it is answered, PINGs
    /// every 50 ms do not.
    #[tokio::test]
    async fn on_h2_pings_do_not_keep_a_connection_and_a_request_in_flight_does() {
        fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
            out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
            out.extend_from_slice(&[ty, flags]);
            out.extend_from_slice(&stream.to_be_bytes());
            out.extend_from_slice(payload);
        }
        let (client, server) = tokio::io::duplex(1 << 20);
        let (_client_rd, mut client_wr) = tokio::io::split(client);
        let sending = Arc::new(crate::edge::sending::Sending::default());
        let mut idle = IdleIo::new(server, Duration::from_millis(300));
        idle.sending = Some(sending.clone());
        let l = FrameBudget::new(idle, Arc::default(), sending, Duration::from_secs(10));
        let (mut rd, mut wr) = tokio::io::split(l);
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            loop {
                match rd.read(&mut sink).await {
                    Ok(n) => assert!(n > 0, "ended"),
                    Err(e) => return (e, tokio::time::Instant::now()),
                }
            }
        });
        let mut hello = H2_PREFACE.to_vec();
        frame(&mut hello, 0x4, 0, 0, &[]);
        frame(&mut hello, 0x1, 0x4 | 0x1, 1, &[0x82]);
        client_wr.write_all(&hello).await.unwrap();
        let mut ping = Vec::new();
        frame(&mut ping, 0x6, 0, 0, &[0; 8]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !reader.is_finished(),
            "cut while its request waited on the origin"
        );
        let mut answer = Vec::new();
        frame(&mut answer, 0x1, 0x4 | 0x1, 1, &[0x88]);
        wr.write_all(&answer).await.unwrap();
        let answered = tokio::time::Instant::now();
        for _ in 0..40 {
            if reader.is_finished() {
                break;
            }
            let _ = client_wr.write_all(&ping).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (err, at) = reader.await.unwrap();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let after = at - answered;
        assert!(after >= Duration::from_millis(290), "{after:?}");
        assert!(after < Duration::from_millis(900), "{after:?}");
    }
}
