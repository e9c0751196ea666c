//! The balance phase: pick the server for each attempt. It owns the whole choice: the hash
//! key (`balance: { hash: … }`), the sticky cookie, passing over servers at their
//! `max_connections` while another has room, HAProxy's queue when every server is full, and
//! the slot the attempt holds until its response ends ([`ActiveGuard`]).

pub mod balancer;

use crate::edge::conn::ConnInfo;
use crate::exchange::{Exchange, Refused};
use crate::phase::identify::credentials::cookie;
use crate::snapshot::BackendRt;
use crate::state::ServerState;
use http::header::HeaderMap;
use http::StatusCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

/// What one request's attempts pick by: its hash key and its sticky server.
pub struct Plan {
    key: Option<u64>,
    /// The server named by the request's sticky cookie.
    pub sticky: Option<usize>,
}

/// The plan of a request, from its upstream head and target.
pub fn plan(conn: &ConnInfo, backend: &BackendRt, headers: &HeaderMap, pq: &str) -> Plan {
    let key = backend
        .balancer
        .hash_on()
        .map(|on| hash_key(on, headers, conn, pq));
    let sticky = backend.sticky_cookie.as_ref().and_then(|name| {
        let id = cookie(headers, name)?;
        backend.servers.iter().position(|s| s.sticky_id == id)
    });
    Plan { key, sticky }
}

/// Holds a server's in-flight count (and its max_connections slot) until the response ends.
pub struct ActiveGuard {
    state: Arc<ServerState>,
    #[allow(dead_code)]
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks a server for attempt number `attempt` (1-based), avoiding those already `tried`,
/// and takes its slot, waiting in its queue if it is full.
pub async fn pick(
    x: &mut Exchange<'_>,
    backend: &BackendRt,
    plan: &Plan,
    tried: &[usize],
    attempt: u32,
) -> Result<(usize, ActiveGuard), Refused> {
    let pick = match plan.sticky {
        Some(i) if attempt == 1 && backend.slots[i].state.available_sticky() => Some(i),
        _ => {
            // A server at max_connections is passed over while another has room: the
            // queue is for when every server is full.
            let full: Vec<usize> = (0..backend.servers.len())
                .filter(|&i| {
                    backend.servers[i].max_connections.is_some()
                        && backend.slots[i]
                            .state
                            .gate
                            .lock()
                            .as_ref()
                            .is_some_and(|(_, sem)| sem.available_permits() == 0)
                })
                .collect();
            if full.is_empty() {
                backend.balancer.pick(&backend.slots, plan.key, tried)
            } else {
                let avoid: Vec<usize> = tried.iter().chain(&full).copied().collect();
                backend.balancer.pick(&backend.slots, plan.key, &avoid)
            }
        }
    };
    let Some(si) = pick else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "no server available\n"));
    };
    let server = &backend.servers[si];
    let state = &backend.slots[si].state;
    if x.log {
        x.record.server = server.name.clone();
    }
    // HAProxy's maxconn: wait in the queue for a slot, up to queue_timeout.
    let permit = match state.gate_for(server.max_connections) {
        None => None,
        Some(sem) => match sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                state.queued.fetch_add(1, Ordering::Relaxed);
                let r = tokio::time::timeout(backend.queue_timeout, sem.acquire_owned()).await;
                state.queued.fetch_sub(1, Ordering::Relaxed);
                match r {
                    Ok(Ok(p)) => Some(p),
                    _ => return Err((StatusCode::SERVICE_UNAVAILABLE, "queue timeout\n")),
                }
            }
        },
    };
    state.active.fetch_add(1, Ordering::Relaxed);
    state.total.fetch_add(1, Ordering::Relaxed);
    Ok((
        si,
        ActiveGuard {
            state: state.clone(),
            permit,
        },
    ))
}

fn hash_key(on: &portcullis_config::HashOn, headers: &HeaderMap, conn: &ConnInfo, pq: &str) -> u64 {
    use crate::phase::balance::balancer::hash64;
    use portcullis_config::HashOn;
    match on {
        HashOn::Header(h) => hash64(
            headers
                .get(h.as_str())
                .map(|v| v.as_bytes())
                .unwrap_or_default(),
        ),
        HashOn::Cookie(c) => hash64(cookie(headers, c).unwrap_or_default().as_bytes()),
        HashOn::ClientIp => hash64(conn.peer.ip().to_string().as_bytes()),
        HashOn::Path => hash64(pq.split('?').next().unwrap_or("/").as_bytes()),
    }
}
