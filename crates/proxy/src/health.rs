//! Active health checks with HAProxy's semantics: every `interval` (with ±10% jitter) each
//! server is probed over a fresh connection (TCP connect, or an HTTP request whose status must
//! fall in `expect`). `rise` consecutive successes mark a down server up, `fall` consecutive
//! failures mark an up server down. Servers in maintenance are not checked. Checks are
//! reconciled on reload: a server whose check is unchanged keeps its task and its state.
//! Each verdict that changes a server's health is told to the registry's watcher
//! ([`crate::state::Change::Up`] or `Down`, with the last failure's cause), once.

use crate::record::Metrics;
use crate::snapshot::Snapshot;
use crate::state::{AdminState, Change, ServerState};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use portcullis_config::HealthCheck;
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

#[derive(Default)]
pub struct HealthChecks {
    tasks: Mutex<HashMap<String, (String, JoinHandle<()>)>>,
}

impl HealthChecks {
    /// Starts, keeps or stops check tasks to match the snapshot.
    pub fn reconcile(&self, snap: &Snapshot, metrics: &Arc<Metrics>) {
        let mut tasks = self.tasks.lock();
        let mut wanted = HashMap::new();
        for b in &snap.backends {
            let Some(hc) = &b.health else {
                for s in &b.slots {
                    s.state.set_healthy(true);
                }
                continue;
            };
            for (srv, slot) in b.servers.iter().zip(&b.slots) {
                if srv.echo {
                    continue;
                }
                let fp = format!("{:?}|{}|{}", hc, srv.address, b.connector.tls.is_some());
                wanted.insert(
                    slot.state.key.clone(),
                    (
                        fp,
                        slot.state.clone(),
                        hc.clone(),
                        b.id.clone(),
                        b.connector.tls.clone(),
                    ),
                );
            }
        }
        tasks.retain(|key, (fp, handle)| {
            let keep = wanted.get(key).is_some_and(|w| &w.0 == fp);
            if !keep {
                handle.abort();
            }
            keep
        });
        for (key, (fp, state, hc, backend, tls)) in wanted {
            if tasks.contains_key(&key) {
                continue;
            }
            let metrics = metrics.clone();
            let h = tokio::spawn(run(state, hc, backend, tls, metrics));
            tasks.insert(key, (fp, h));
        }
    }

    pub fn stop_all(&self) {
        for (_, (_, h)) in self.tasks.lock().drain() {
            h.abort();
        }
    }
}

async fn run(
    state: Arc<ServerState>,
    hc: HealthCheck,
    backend: String,
    tls: Option<(Arc<rustls::ClientConfig>, Option<String>)>,
    metrics: Arc<Metrics>,
) {
    let interval = hc.interval.0;
    // Spread the first checks so a large backend is not probed all at once.
    let first = rand::rng().random_range(0..=interval.as_millis() as u64 / 2);
    tokio::time::sleep(Duration::from_millis(first)).await;
    loop {
        if state.admin_state() != AdminState::Maint {
            let outcome = probe(&state.address, &hc, &tls).await;
            let ok = outcome.is_ok();
            state.set_check(ok, outcome.as_ref().err().cloned().unwrap_or_default());
            let result = if ok { "success" } else { "failure" };
            metrics
                .health_checks
                .get_or_create(&vec![
                    ("backend", backend.clone()),
                    ("result", result.to_string()),
                ])
                .inc();
            if let Some(n) = apply(&state, ok, hc.rise, hc.fall, &backend) {
                let reason = match &outcome {
                    Ok(()) => format!("{n} passed health checks"),
                    Err(e) => format!("{n} failed health checks: {e}"),
                };
                state.notify(if ok { Change::Up } else { Change::Down }, &reason);
            }
        }
        let jitter = interval.as_millis() as i64 / 10;
        let j = rand::rng().random_range(-jitter..=jitter);
        let next = (interval.as_millis() as i64 + j).max(10) as u64;
        tokio::time::sleep(Duration::from_millis(next)).await;
    }
}

/// Applies one check result with rise/fall hysteresis. Returns the streak that changed the
/// server's health, if this result did.
pub fn apply(state: &ServerState, ok: bool, rise: u32, fall: u32, backend: &str) -> Option<u32> {
    let healthy = state.healthy();
    if ok == healthy {
        state.check_streak.store(0, Ordering::Relaxed);
        return None;
    }
    let n = state.check_streak.fetch_add(1, Ordering::Relaxed) + 1;
    let needed = if healthy { fall } else { rise };
    if n >= needed {
        state.set_healthy(ok);
        state.check_streak.store(0, Ordering::Relaxed);
        if ok {
            tracing::info!(backend, server = %state.key, "server is UP (health check passed {n} times)");
        } else {
            tracing::warn!(backend, server = %state.key, "server is DOWN (health check failed {n} times)");
        }
        return Some(n);
    }
    None
}

/// One check: `Ok`, or why it failed, in words (`connection refused`, `status 503`).
async fn probe(
    addr: &str,
    hc: &HealthCheck,
    tls: &Option<(Arc<rustls::ClientConfig>, Option<String>)>,
) -> Result<(), String> {
    let timeout = hc.timeout.0;
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| connect_error(&e))?;
        let Some(http) = &hc.http else {
            return Ok(());
        };
        let host = http.host.clone().unwrap_or_else(|| addr.to_string());
        let req = http::Request::get(http.path.as_str())
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, "portcullis-health-check")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let status = match tls {
            None => send(stream, req).await,
            Some((cfg, sni)) => {
                let name = sni
                    .clone()
                    .unwrap_or_else(|| addr.rsplit_once(':').map_or(addr, |x| x.0).to_string());
                let name = rustls_pki_types::ServerName::try_from(name)
                    .map_err(|e| format!("TLS server name: {e}"))?;
                let s = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                send(s, req).await
            }
        }
        .ok_or("no HTTP response")?;
        if http.expect.contains(status) {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {}ms", timeout.as_millis())),
    }
}

fn connect_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        _ => format!("connect: {e}"),
    }
}

async fn send<T>(io: T, req: http::Request<Empty<Bytes>>) -> Option<u16>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .ok()?;
    let c = tokio::spawn(conn);
    let r = s.send_request(req).await.ok()?;
    c.abort();
    Some(r.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateRegistry;

    #[test]
    fn rise_and_fall() {
        let r = StateRegistry::default();
        let s = r.server("b/s", "x:1");
        assert!(s.healthy());
        assert_eq!(apply(&s, false, 2, 3, "b"), None);
        apply(&s, false, 2, 3, "b");
        assert!(s.healthy(), "two failures of three");
        apply(&s, true, 2, 3, "b");
        apply(&s, false, 2, 3, "b");
        apply(&s, false, 2, 3, "b");
        assert!(s.healthy(), "a success resets the streak");
        assert_eq!(
            apply(&s, false, 2, 3, "b"),
            Some(3),
            "the verdict is told once"
        );
        assert!(!s.healthy());
        assert_eq!(apply(&s, false, 2, 3, "b"), None);
        apply(&s, true, 2, 3, "b");
        assert!(!s.healthy());
        assert_eq!(apply(&s, true, 2, 3, "b"), Some(2));
        assert!(s.healthy());
    }
}
