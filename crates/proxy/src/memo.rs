//! The per-connection credential memo: the last bearer token a client connection presented
//! on a route, the identity it was verified as, and the Cedar decision for that identity and
//! method. A client that keeps a connection open (a service, an agent, a browser's API
//! calls) sends the same token on every request; the memo answers the identify and
//! authorize stages for it with a few comparisons, where the shared caches would hash the
//! token, take a lock and build a key on every request, and make the worker threads share
//! their cache lines.
//!
//! The limit phase keeps there, too, the plan the identity is on and its caller key, which
//! it would otherwise find and build (hash) again on every request.
//!
//! It only ever repeats what the shared caches would answer:
//! - the identity while the provider's [`Proof`] holds (the token cache entry would still be
//!   unexpired, the key set unchanged and no token revoked since), for the same
//!   configuration snapshot and route;
//! - the decision only on routes whose policies read nothing of the request but the method
//!   ([`decided_by_identity_and_method`](portcullis_policy::Engine::decided_by_identity_and_method)),
//!   for the same identity, method, route and snapshot, and only a decision without errors;
//! - the plan and caller key for the same identity, route and snapshot (a plan's assignment
//!   reads only the identity and the route's configuration).
//!
//! A reload makes a new snapshot, so nothing remembered under the old one is used again.
//! The memo is never waited for: if two HTTP/2 streams of one connection reach it at once,
//! the second goes to the shared caches.

use crate::snapshot::{RouteRt, Snapshot};
use http::Method;
use parking_lot::Mutex;
use portcullis_identity::jwt::Proof;
use portcullis_identity::Identity;
use portcullis_limits::Key;
use portcullis_policy::Decision;
use std::sync::{Arc, Weak};
use std::time::Instant;

/// Longer tokens are not remembered (the memo lives as long as its connection).
const MAX_TOKEN: usize = 4096;

#[derive(Default)]
pub struct Memo(Mutex<Option<Entry>>);

struct Entry {
    /// The snapshot it was made under. Weak, so an idle connection does not keep an old
    /// configuration alive (only the identity, its provider's key source and the decision,
    /// until the connection's next request or its end); it still keeps the address from
    /// being reused.
    snap: Weak<Snapshot>,
    /// The route, by address within that snapshot (only compared).
    route: usize,
    token: Box<[u8]>,
    identity: Arc<Identity>,
    proof: Proof,
    decision: Option<(Method, Arc<Decision>)>,
    /// The limit phase's: the index of the identity's plan on this route (`None`: no plan
    /// applies) and its caller key.
    caller: Option<(Option<usize>, Key)>,
}

fn addr(route: &RouteRt) -> usize {
    route as *const RouteRt as usize
}

impl Entry {
    fn is_for(&self, snap: &Arc<Snapshot>, route: &RouteRt) -> bool {
        std::ptr::eq(self.snap.as_ptr(), Arc::as_ptr(snap)) && self.route == addr(route)
    }
}

impl Memo {
    /// The identity `token` was verified as on this route, if it was the last token here and
    /// its proof still holds at `at` (the request's arrival). For identify.
    pub fn identity(
        &self,
        snap: &Arc<Snapshot>,
        route: &RouteRt,
        token: &[u8],
        at: Instant,
    ) -> Option<Arc<Identity>> {
        let g = self.0.try_lock()?;
        let e = g.as_ref()?;
        (e.is_for(snap, route) && *e.token == *token && e.proof.holds(at))
            .then(|| e.identity.clone())
    }

    /// The decision remembered for `identity` (the memo's own, by address) and `method` on
    /// this route. For authorize.
    pub fn decision(
        &self,
        snap: &Arc<Snapshot>,
        route: &RouteRt,
        identity: &Arc<Identity>,
        method: &Method,
    ) -> Option<Arc<Decision>> {
        let g = self.0.try_lock()?;
        let e = g.as_ref()?;
        if !(e.is_for(snap, route) && Arc::ptr_eq(&e.identity, identity)) {
            return None;
        }
        match &e.decision {
            Some((m, d)) if m == method => Some(d.clone()),
            _ => None,
        }
    }

    /// Remembers a token and what the shared cache said about it, replacing what was there.
    pub fn remember(
        &self,
        snap: &Arc<Snapshot>,
        route: &RouteRt,
        token: &str,
        identity: &Arc<Identity>,
        proof: Proof,
    ) {
        if token.len() > MAX_TOKEN {
            return;
        }
        let Some(mut g) = self.0.try_lock() else {
            return;
        };
        // Keep the token's buffer when the new one has the same length (a refreshed token).
        let token_buf = match g.take() {
            Some(old) if old.token.len() == token.len() => {
                let mut b = old.token;
                b.copy_from_slice(token.as_bytes());
                b
            }
            _ => token.as_bytes().into(),
        };
        *g = Some(Entry {
            snap: Arc::downgrade(snap),
            route: addr(route),
            token: token_buf,
            identity: identity.clone(),
            proof,
            decision: None,
            caller: None,
        });
    }

    /// Remembers the decision for the memo's identity, if `identity` is that one and the
    /// route's policies read nothing but the method. The caller has checked the latter.
    pub fn remember_decision(
        &self,
        snap: &Arc<Snapshot>,
        route: &RouteRt,
        identity: &Arc<Identity>,
        method: &Method,
        decision: &Arc<Decision>,
    ) {
        if !decision.errors.is_empty() {
            return;
        }
        let Some(mut g) = self.0.try_lock() else {
            return;
        };
        if let Some(e) = g.as_mut() {
            if e.is_for(snap, route) && Arc::ptr_eq(&e.identity, identity) {
                e.decision = Some((method.clone(), decision.clone()));
            }
        }
    }

    /// The plan and caller key remembered for `identity` (the memo's own, by address) on
    /// this route. For the limit phase.
    pub fn caller(
        &self,
        snap: &Arc<Snapshot>,
        route: &RouteRt,
        identity: &Arc<Identity>,
    ) -> Option<(Option<usize>, Key)> {
        let g = self.0.try_lock()?;
        let e = g.as_ref()?;
        if !(e.is_for(snap, route) && Arc::ptr_eq(&e.identity, identity)) {
            return None;
        }
        e.caller.clone()
    }

    /// Remembers the plan and caller key of the memo's identity, if `identity` is that one.
    pub fn remember_caller(
        &self,
        snap: &Arc<Snapshot>,
        route: &RouteRt,
        identity: &Arc<Identity>,
        plan: Option<usize>,
        key: &Key,
    ) {
        let Some(mut g) = self.0.try_lock() else {
            return;
        };
        if let Some(e) = g.as_mut() {
            if e.is_for(snap, route) && Arc::ptr_eq(&e.identity, identity) {
                e.caller = Some((plan, key.clone()));
            }
        }
    }
}
