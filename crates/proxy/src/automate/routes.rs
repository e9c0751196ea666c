//! Route switches: which routes a `switch_route` sent to another backend, kept by route id
//! so a reload keeps them (like the server state of `crate::state`), and pushed into each
//! snapshot's routes ([`RouteRt::switched`](crate::snapshot::RouteRt)) where the request path
//! reads them with one atomic load.
//!
//! A switch holds until `restore_route` (or a restart: switches live in memory). A reload
//! keeps every switch whose route and backend still exist, and drops, with a warning, one
//! whose route or backend the new config lacks.

use crate::snapshot::Snapshot;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// Switched routes: route id → backend id.
#[derive(Default)]
pub struct RouteSwitches {
    map: Mutex<BTreeMap<String, String>>,
}

impl RouteSwitches {
    /// Sends `route`'s traffic to `backend` (`None`: back to its own), in `snap` (the serving
    /// snapshot, which must define both) and in every later one. Returns the backend the
    /// route was switched to before, if any.
    pub fn set(
        &self,
        current: &arc_swap::ArcSwap<Snapshot>,
        route: &str,
        backend: Option<&str>,
    ) -> Option<String> {
        let mut map = self.map.lock();
        let before = match backend {
            Some(b) => map.insert(route.to_string(), b.to_string()),
            None => map.remove(route),
        };
        // Under the lock, so a reload that installs a new snapshot meanwhile sees this
        // switch, or installs its snapshot before this load and is updated here.
        push(&map, &current.load());
        before
    }

    /// Pushes the switches into `snap` (a new snapshot, before or after it is installed),
    /// dropping those whose route or backend it lacks.
    pub fn apply(&self, snap: &Snapshot) {
        let mut map = self.map.lock();
        map.retain(|route, backend| {
            let keep = snap.routes.iter().any(|r| &*r.id == route) && snap.backend(backend).is_some();
            if !keep {
                tracing::warn!(%route, %backend, "the route's switch ends: the new config lacks the route or the backend; its requests go to its own backend");
            }
            keep
        });
        push(&map, snap);
    }

    /// The switched routes and their backends.
    pub fn list(&self) -> Vec<(String, String)> {
        self.map
            .lock()
            .iter()
            .map(|(r, b)| (r.clone(), b.clone()))
            .collect()
    }
}

fn push(map: &BTreeMap<String, String>, snap: &Snapshot) {
    for r in &snap.routes {
        let n = map
            .get(&*r.id)
            .and_then(|b| snap.backends.iter().position(|x| &x.id == b))
            .map_or(0, |i| i + 1);
        r.switched.store(n, Ordering::Relaxed);
    }
}
