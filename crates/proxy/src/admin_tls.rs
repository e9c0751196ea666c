//! The admin listener over TLS (`admin.tls`): each connection's handshake, then the admin
//! router with the peer's address and, when it presented one that the configured CA
//! verified, its client certificate ([`ClientCert`]), which an `mtls` provider of
//! `admin.auth` turns into an identity.

use crate::Runtime;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::Arc;
use std::time::Duration;

use crate::admin_authz::ClientCert;

/// How long a client has to finish its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves the admin router on `l` with `tls`, until the listener fails.
pub async fn serve(
    rt: Arc<Runtime>,
    l: tokio::net::TcpListener,
    tls: &portcullis_config::model::ListenerTls,
) -> Result<(), crate::edge::tls::TlsError> {
    let (cfg, _resolver) =
        crate::edge::tls::server_config(tls, &[portcullis_config::model::Protocol::Http1])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let app = crate::admin::router(rt);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match l.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
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
                let mut app = app.layer(axum::Extension(ConnectInfo(peer)));
                if let Some(c) = cert {
                    app = app.layer(axum::Extension(c));
                }
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                    .await;
                if let Err(e) = conn {
                    tracing::debug!(%peer, error = %e, "admin connection ended with an error");
                }
            });
        }
    });
    Ok(())
}
