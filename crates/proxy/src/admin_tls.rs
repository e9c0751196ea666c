//! The admin listener's connections, plain or over TLS (`admin.tls`): each connection's
//! handshake, then the admin router with the peer's address and, when it presented one that
//! the configured CA verified, its client certificate ([`ClientCert`]), which an `mtls`
//! provider of `admin.auth` turns into an identity.
//!
//! The admin listener answers anyone who can reach it (a refusal is an answer too), so it
//! bounds what a client that is no caller can hold: at most [`MAX_CONNECTIONS`] connections
//! at once (more are closed as they come), [`HANDSHAKE`] to finish a TLS handshake, and
//! [`HEADER_TIMEOUT`] to send each request head (a connection that sends nothing, and idle
//! keep-alive connections, included), over HTTP/1.1 only. A
//! response being streamed (the console's and the events' server-sent events) is not cut.

use crate::Runtime;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

use crate::admin_authz::ClientCert;

/// How long a client has to finish its handshake.
pub const HANDSHAKE: Duration = Duration::from_secs(10);
/// How long a client has to send a request head, from the connection's start or the end of
/// the previous response.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most admin connections open at once: enough for operators, consoles and tools, and
/// far from the process's file descriptor limit, so that the admin listener cannot take the
/// data plane's descriptors.
pub const MAX_CONNECTIONS: usize = 256;

/// Serves the admin router on `l`, over TLS with `tls`, until the process ends.
pub fn serve(
    rt: Arc<Runtime>,
    l: tokio::net::TcpListener,
    tls: Option<&portcullis_config::model::ListenerTls>,
) -> Result<(), crate::edge::tls::TlsError> {
    let acceptor = match tls {
        Some(tls) => {
            let (cfg, _resolver) =
                crate::edge::tls::server_config(tls, &[portcullis_config::model::Protocol::Http1])?;
            Some(tokio_rustls::TlsAcceptor::from(cfg))
        }
        None => None,
    };
    let app = crate::admin::router(rt);
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut last_full_warning: Option<tokio::time::Instant> = None;
        loop {
            let (tcp, peer) = match l.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = open.clone().try_acquire_owned() else {
                // Closed at once; said at most once a minute.
                if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    last_full_warning = Some(tokio::time::Instant::now());
                    tracing::warn!(%peer, max = MAX_CONNECTIONS, "admin listener: too many connections, closing new ones");
                }
                drop(tcp);
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let app = app.layer(axum::Extension(ConnectInfo(peer)));
                let Some(acceptor) = acceptor else {
                    return serve_connection(tcp, app, peer).await;
                };
                let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| ClientCert(Arc::new(c.as_ref().to_vec())));
                match cert {
                    Some(c) => serve_connection(tls, app.layer(axum::Extension(c)), peer).await,
                    None => serve_connection(tls, app, peer).await,
                }
            });
        }
    });
    Ok(())
}

/// One connection: HTTP/1.1 only (the TLS side offers nothing else), each request head due
/// within [`HEADER_TIMEOUT`] from the connection's start or the previous response's end.
/// (HTTP/2 with prior knowledge was served too, and neither a connection that sent nothing
/// yet, nor an HTTP/2 one without streams, had any deadline: a few hundred such sockets held
/// every admin slot for as long as their client liked.)
async fn serve_connection<IO>(io: IO, app: axum::Router, peer: std::net::SocketAddr)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    if let Err(e) = b
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await
    {
        tracing::debug!(%peer, error = %e, "admin connection ended with an error");
    }
}
