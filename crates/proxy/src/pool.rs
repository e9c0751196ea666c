//! Upstream connections: connect (TCP, optional TLS) with a timeout, then an HTTP/1.1 or h2
//! handshake, and keep finished HTTP/1.1 connections in a per-server idle pool (h2 shares one
//! multiplexed connection). Connecting is a separate step from sending, so a connect failure
//! is known to have sent nothing and can always be retried on another server.
//!
//! hyper-util's pooled `Client` hides the connect step and the connection it used, which we
//! need for connect-failure retries, connect-time metrics and per-server limits, so the pool
//! is written here on top of hyper's connection API.
//!
//! An HTTP/1.1 connection has no task of its own: its connection future ([`H1Link`]) is
//! polled by the task of the request using it, while the request is sent and while the
//! response body streams ([`H1Body`]). Request, response and body then never cross tasks,
//! which saves several wake-ups per request. An idle pooled connection is polled once when
//! it is put back and once when it is taken, which notices a connection the server closed.

use crate::body::{BoxError, ReqBody};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use portcullis_config::Protocol;
use rustls_pki_types::ServerName;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// How to reach the servers of one backend.
#[derive(Clone)]
pub struct Connector {
    pub protocol: Protocol,
    pub tls: Option<(Arc<rustls::ClientConfig>, Option<String>)>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

pub enum Sender {
    H1(H1Link),
    H2(http2::SendRequest<ReqBody>),
}

type ConnFuture = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// One HTTP/1.1 upstream connection: the request sender and the connection future that
/// reads and writes the socket. Whoever holds the link polls the future (see the module
/// doc); `H1Link::background` hands it to a task of its own (for upgrades).
pub struct H1Link {
    sender: http1::SendRequest<ReqBody>,
    conn: ConnFuture,
    ended: bool,
}

impl H1Link {
    /// Runs the connection's I/O as far as it can go; false once the connection has ended.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if self.ended {
            return false;
        }
        match self.conn.as_mut().poll(cx) {
            Poll::Pending => true,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection closed");
                }
                self.ended = true;
                false
            }
        }
    }

    /// Polls an idle connection without a task to wake (nothing is waiting on it): lets it
    /// finish the previous exchange, and notices a close by the server.
    fn drive_idle(&mut self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        self.drive(&mut cx)
    }

    /// Sends a request and waits for the response head, driving the connection meanwhile.
    pub async fn send(
        &mut self,
        req: http::Request<ReqBody>,
    ) -> Result<http::Response<Incoming>, hyper::client::conn::TrySendError<http::Request<ReqBody>>>
    {
        let fut = self.sender.try_send_request(req);
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            self.drive(cx);
            fut.as_mut().poll(cx)
        })
        .await
    }

    /// Lets a task of its own run the connection from now on (an upgraded connection is
    /// handed over when the connection future completes).
    pub fn background(self) {
        if !self.ended {
            tokio::spawn(async move {
                if let Err(e) = self.conn.await {
                    tracing::debug!(error = %e, "upstream connection closed");
                }
            });
        }
    }
}

/// The response body of an HTTP/1.1 upstream connection. Polling it drives the connection;
/// once the body has been read to its end, dropping it returns the connection to the pool.
pub struct H1Body {
    inner: Incoming,
    link: Option<H1Link>,
    ended: bool,
    pool: Arc<Pool>,
}

impl H1Body {
    pub fn new(inner: Incoming, link: H1Link, pool: Arc<Pool>) -> Self {
        H1Body {
            inner,
            link: Some(link),
            ended: false,
            pool,
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(link) = &mut this.link {
            if !link.drive(cx) {
                this.link = None;
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(r)) => Poll::Ready(Some(r.map_err(Into::into))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        if self.ended || self.inner.is_end_stream() {
            if let Some(link) = self.link.take() {
                self.pool.put_back(link);
            }
        }
    }
}

/// A connection ready for one request.
pub struct Checkout {
    pub sender: Sender,
    pub reused: bool,
    pub connect_time: Duration,
}

/// Most idle HTTP/1.1 connections kept per server.
const MAX_IDLE: usize = 256;

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<(H1Link, Instant)>>,
    h2: Mutex<Option<http2::SendRequest<ReqBody>>>,
}

impl Pool {
    pub async fn checkout(&self, addr: &str, c: &Connector) -> Result<Checkout, ConnectError> {
        match c.protocol {
            Protocol::Http1 => {
                loop {
                    let Some((mut link, at)) = self.idle.lock().pop() else {
                        break;
                    };
                    if at.elapsed() < c.idle_timeout && link.drive_idle() && link.sender.is_ready()
                    {
                        return Ok(Checkout {
                            sender: Sender::H1(link),
                            reused: true,
                            connect_time: Duration::ZERO,
                        });
                    }
                }
                let start = Instant::now();
                let s = connect_h1(addr, c).await?;
                Ok(Checkout {
                    sender: Sender::H1(s),
                    reused: false,
                    connect_time: start.elapsed(),
                })
            }
            Protocol::Http2 => {
                if let Some(s) = self.h2.lock().as_ref() {
                    if s.is_ready() {
                        return Ok(Checkout {
                            sender: Sender::H2(s.clone()),
                            reused: true,
                            connect_time: Duration::ZERO,
                        });
                    }
                }
                let start = Instant::now();
                let s = connect_h2(addr, c).await?;
                *self.h2.lock() = Some(s.clone());
                Ok(Checkout {
                    sender: Sender::H2(s),
                    reused: false,
                    connect_time: start.elapsed(),
                })
            }
        }
    }

    /// Returns a finished HTTP/1.1 connection for reuse.
    pub fn put_back(&self, mut s: H1Link) {
        if !s.drive_idle() || s.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push((s, Instant::now()));
        }
    }

    /// Forgets a broken h2 connection so the next request reconnects.
    pub fn drop_h2(&self) {
        *self.h2.lock() = None;
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().len() + usize::from(self.h2.lock().is_some())
    }
}

async fn tcp(addr: &str, c: &Connector) -> Result<TcpStream, ConnectError> {
    let s = tokio::time::timeout(c.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout)??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

fn server_name(addr: &str, sni: &Option<String>) -> Result<ServerName<'static>, ConnectError> {
    let host = match sni {
        Some(s) => s.clone(),
        None => {
            let h = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
            h.trim_start_matches('[').trim_end_matches(']').to_string()
        }
    };
    ServerName::try_from(host)
        .map_err(|e| ConnectError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))
}

/// A connected upstream transport: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects, and runs the TLS handshake when the backend uses TLS, within the connect timeout.
async fn open(addr: &str, c: &Connector) -> Result<Stream, ConnectError> {
    let stream = tcp(addr, c).await?;
    let Some((cfg, sni)) = &c.tls else {
        return Ok(Stream::Plain(stream));
    };
    let name = server_name(addr, sni)?;
    let tls = tokio::time::timeout(
        c.connect_timeout,
        tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, stream),
    )
    .await
    .map_err(|_| ConnectError::Timeout)?
    .map_err(ConnectError::Tls)?;
    Ok(Stream::Tls(Box::new(tls)))
}

async fn connect_h1(addr: &str, c: &Connector) -> Result<H1Link, ConnectError> {
    match open(addr, c).await? {
        Stream::Plain(s) => handshake_h1(s).await,
        Stream::Tls(s) => handshake_h1(*s).await,
    }
}

async fn handshake_h1<T>(io: T) -> Result<H1Link, ConnectError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake::<_, ReqBody>(TokioIo::new(io))
        .await?;
    Ok(H1Link {
        sender,
        conn: Box::pin(conn.with_upgrades()),
        ended: false,
    })
}

async fn connect_h2(
    addr: &str,
    c: &Connector,
) -> Result<http2::SendRequest<ReqBody>, ConnectError> {
    match open(addr, c).await? {
        Stream::Plain(s) => handshake_h2(s).await,
        Stream::Tls(s) => handshake_h2(*s).await,
    }
}

async fn handshake_h2<T>(io: T) -> Result<http2::SendRequest<ReqBody>, ConnectError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .handshake::<_, ReqBody>(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream h2 connection closed");
        }
    });
    Ok(sender)
}
