//! Upstream connections: connect (TCP, optional TLS) with a timeout, then an HTTP/1.1 or h2
//! handshake, and keep finished HTTP/1.1 connections in a per-server idle pool (h2 shares one
//! multiplexed connection). Connecting is a separate step from sending, so a connect failure
//! is known to have sent nothing and can always be retried on another server.
//!
//! hyper-util's pooled `Client` hides the connect step and the connection it used, which we
//! need for connect-failure retries, connect-time metrics and per-server limits, so the pool
//! is written here.
//!
//! An HTTP/1.1 connection ([`Conn`], see `h1`) has no task of its own: the request using it
//! writes and reads it, and the response body returns it here once the exchange has ended
//! cleanly. A connection taken from the pool is first checked (without a system call) for a
//! close or stray bytes from the server. h2 connections use hyper's client, in a task each.

use crate::upstream::body::ReqBody;
pub use crate::upstream::h1::Conn;
pub use crate::upstream::stream::Stream;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use portcullis_config::Protocol;
use rustls_pki_types::ServerName;
use std::sync::Arc;
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
    H1(Conn),
    H2(http2::SendRequest<ReqBody>),
}

/// A connection ready for one request.
pub struct Checkout {
    pub sender: Sender,
    pub reused: bool,
    pub connect_time: Duration,
}

/// Most idle HTTP/1.1 connections kept per server. It must be above the requests one server
/// has in flight at a peak: HTTP/1.1 carries one request per connection, so a burst of
/// answers from a busy server (16 HTTP/2 clients with 100 streams each are 1,600 requests in
/// flight) returns that many connections at once, and each one over the cap is closed, only
/// to be opened again for the next burst. At 256, connecting and closing took a third of the
/// proxy's CPU under that load (BENCHMARKS.md, "HTTPS"). HAProxy keeps every idle server
/// connection by default (`pool-max-conn -1`). An idle connection costs a descriptor and its
/// buffers (a few KiB), and one idle longer than the backend's `timeouts.idle` is closed
/// when it is next taken.
const MAX_IDLE: usize = 4096;

#[derive(Default)]
pub struct Pool {
    idle: Mutex<Vec<(Conn, Instant)>>,
    h2: Mutex<Option<http2::SendRequest<ReqBody>>>,
}

impl Pool {
    pub async fn checkout(&self, addr: &str, c: &Connector) -> Result<Checkout, ConnectError> {
        match c.protocol {
            Protocol::Http1 => {
                loop {
                    let Some((mut conn, at)) = self.idle.lock().pop() else {
                        break;
                    };
                    if at.elapsed() < c.idle_timeout && conn.is_usable() {
                        return Ok(Checkout {
                            sender: Sender::H1(conn),
                            reused: true,
                            connect_time: Duration::ZERO,
                        });
                    }
                }
                let start = Instant::now();
                // Boxed, as below: a new connection's future (TCP, TLS handshake) is several
                // KiB, and inline it would size every request's future, which hyper moves
                // per request (and per stream, for HTTP/2 clients).
                let s = Conn::new(Box::pin(open(addr, c)).await?);
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
                let s = Box::pin(connect_h2(addr, c)).await?;
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
    fn put_back_conn(&self, s: Conn) {
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

impl crate::upstream::h1::Home for Pool {
    fn put_back(&self, c: Conn) {
        self.put_back_conn(c);
    }
}
