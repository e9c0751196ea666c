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
    permit: Option<crate::state::Slot>,
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
                    let gate = &backend.slots[i].state.gate;
                    gate.limited() && gate.full()
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
    let gate = &state.gate;
    let permit = match gate.limited() {
        false => None,
        true => match gate.try_take() {
            Some(p) => Some(p),
            None => {
                // Counted while waiting, however the wait ends: a client that goes away
                // drops this future mid-wait.
                let _queued = Queued::enter(&state.queued);
                // Boxed: a rare wait, whose future inline would size every request's.
                let r = Box::pin(tokio::time::timeout(backend.queue_timeout, gate.take())).await;
                drop(_queued);
                match r {
                    Ok(p) => Some(p),
                    Err(_) => return Err((StatusCode::SERVICE_UNAVAILABLE, "queue timeout\n")),
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

/// A request waiting for a slot, in its server's `queued` count until dropped.
struct Queued<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Queued<'a> {
    fn enter(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Queued(count)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Exchange;
    use crate::state::AdminState;
    use crate::testkit::Kit;
    use http::Request;

    const CONFIG: &str = r#"
backends:
  - name: b
    sticky: { cookie: srv }
    servers:
      - { name: s1, address: "builtin:echo" }
      - { name: s2, address: "builtin:echo" }
  - name: capped
    queue_timeout: 50ms
    servers:
      - { name: c1, address: "builtin:echo", max_connections: 1 }
      - { name: c2, address: "builtin:echo", max_connections: 1 }
  - name: hashed
    balance: { hash: "header:x-tenant" }
    servers:
      - { name: h1, address: "builtin:echo" }
      - { name: h2, address: "builtin:echo" }
      - { name: h3, address: "builtin:echo" }
routes:
  - { name: r, match: { path_prefix: / }, backend: b, public: true }
"#;

    async fn kit() -> Kit {
        Kit::new(CONFIG).await
    }

    fn backend<'k>(kit: &'k Kit, name: &str) -> &'k BackendRt {
        kit.snap
            .backend(&format!("default/{name}"))
            .expect("the backend")
    }

    async fn exchange<'k>(kit: &'k Kit, req: http::request::Builder) -> Exchange<'k> {
        kit.routed(req.header("host", "example.com")).await
    }

    /// The name of the server that a first attempt of `x` is sent to (its slot is given back
    /// at once).
    async fn pick_name(x: &mut Exchange<'_>, b: &BackendRt) -> Result<String, Refused> {
        let plan = plan(x.conn, b, &x.parts.headers, "/");
        let (i, _slot) = pick(x, b, &plan, &[], 1).await?;
        assert_eq!(x.record.server, b.servers[i].name);
        Ok(b.servers[i].name.clone())
    }

    async fn picks(kit: &Kit, b: &BackendRt, n: usize) -> Vec<String> {
        let mut x = exchange(kit, Request::get("/")).await;
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(pick_name(&mut x, b).await.expect("a server"));
        }
        out
    }

    #[tokio::test]
    async fn round_robin_over_two_servers_alternates() {
        let kit = kit().await;
        let b = backend(&kit, "b");
        assert_eq!(picks(&kit, b, 4).await, ["s1", "s2", "s1", "s2"]);
    }

    #[tokio::test]
    async fn a_retry_avoids_the_servers_already_tried() {
        let kit = kit().await;
        let b = backend(&kit, "b");
        let mut x = exchange(&kit, Request::get("/")).await;
        let plan = plan(x.conn, b, &x.parts.headers, "/");
        for tried in [0, 1] {
            let (i, _slot) = pick(&mut x, b, &plan, &[tried], 2).await.unwrap();
            assert_ne!(i, tried);
        }
    }

    #[tokio::test]
    async fn drained_and_maintained_servers_are_skipped() {
        let kit = kit().await;
        let b = backend(&kit, "b");
        b.slots[0].state.set_admin_state(AdminState::Drain);
        assert_eq!(picks(&kit, b, 3).await, ["s2", "s2", "s2"]);
        b.slots[0].state.set_admin_state(AdminState::Maint);
        assert_eq!(picks(&kit, b, 3).await, ["s2", "s2", "s2"]);
        // An unhealthy server is skipped too.
        b.slots[0].state.set_admin_state(AdminState::Ready);
        b.slots[1].state.set_healthy(false);
        assert_eq!(picks(&kit, b, 3).await, ["s1", "s1", "s1"]);
    }

    #[tokio::test]
    async fn no_available_server_is_503() {
        let kit = kit().await;
        let b = backend(&kit, "b");
        b.slots[0].state.set_admin_state(AdminState::Maint);
        b.slots[1].state.set_admin_state(AdminState::Drain);
        let mut x = exchange(&kit, Request::get("/")).await;
        assert_eq!(
            pick_name(&mut x, b).await,
            Err((StatusCode::SERVICE_UNAVAILABLE, "no server available\n"))
        );
    }

    #[tokio::test]
    async fn a_sticky_cookie_picks_its_server_even_while_it_drains() {
        let kit = kit().await;
        let b = backend(&kit, "b");
        let cookie = format!("theme=dark; srv={}", b.servers[1].sticky_id);
        let mut x = exchange(&kit, Request::get("/").header("cookie", cookie)).await;
        let p = plan(x.conn, b, &x.parts.headers, "/");
        assert_eq!(p.sticky, Some(1));
        for _ in 0..3 {
            assert_eq!(pick_name(&mut x, b).await.unwrap(), "s2");
        }
        // Drain keeps the sessions a server has; maintenance does not.
        b.slots[1].state.set_admin_state(AdminState::Drain);
        assert_eq!(pick_name(&mut x, b).await.unwrap(), "s2");
        b.slots[1].state.set_admin_state(AdminState::Maint);
        assert_eq!(pick_name(&mut x, b).await.unwrap(), "s1");
        // An unknown cookie sticks to nothing.
        let x = exchange(&kit, Request::get("/").header("cookie", "srv=0123")).await;
        assert_eq!(plan(x.conn, b, &x.parts.headers, "/").sticky, None);
    }

    #[tokio::test]
    async fn a_hash_key_keeps_a_tenant_on_one_server() {
        let kit = kit().await;
        let b = backend(&kit, "hashed");
        for tenant in ["acme", "globex", "initech"] {
            let mut x = exchange(&kit, Request::get("/").header("x-tenant", tenant)).await;
            let first = pick_name(&mut x, b).await.unwrap();
            for _ in 0..5 {
                assert_eq!(pick_name(&mut x, b).await.unwrap(), first, "{tenant}");
            }
        }
    }

    #[tokio::test]
    async fn the_slot_is_held_until_the_guard_drops() {
        let kit = kit().await;
        let b = backend(&kit, "b");
        let mut x = exchange(&kit, Request::get("/")).await;
        let p = plan(x.conn, b, &x.parts.headers, "/");
        let (i, guard) = pick(&mut x, b, &p, &[], 1).await.unwrap();
        let state = &b.slots[i].state;
        assert_eq!(state.active.load(Ordering::Relaxed), 1);
        assert_eq!(state.total.load(Ordering::Relaxed), 1);
        drop(guard);
        assert_eq!(state.active.load(Ordering::Relaxed), 0);
        assert_eq!(state.total.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_full_server_is_passed_over_and_when_all_are_full_the_request_queues() {
        let kit = kit().await;
        let b = backend(&kit, "capped");
        let mut x = exchange(&kit, Request::get("/")).await;
        let p = plan(x.conn, b, &x.parts.headers, "/");
        let (first, held) = pick(&mut x, b, &p, &[], 1).await.unwrap();
        // The server at max_connections is passed over while the other has room...
        for _ in 0..3 {
            let (i, _slot) = pick(&mut x, b, &p, &[], 1).await.unwrap();
            assert_ne!(i, first);
        }
        // ...and when both are full, the request waits in the queue for up to
        // queue_timeout, then gets 503.
        let (_, also_held) = pick(&mut x, b, &p, &[], 1).await.unwrap();
        let r = pick(&mut x, b, &p, &[], 1).await.map(|(i, _)| i);
        assert_eq!(r, Err((StatusCode::SERVICE_UNAVAILABLE, "queue timeout\n")));
        assert_eq!(b.slots[first].state.queued.load(Ordering::Relaxed), 0);
        // A slot given back lets the next request in.
        drop(held);
        let (i, _slot) = pick(&mut x, b, &p, &[], 1).await.unwrap();
        assert_eq!(i, first);
        drop(also_held);
    }
}
