//! The route phase: serve portcullis's own paths (`/.portcullis/…`, the assertion JWKS),
//! find the request's route in the compiled table, apply the route's rules for encoded
//! slashes and method overrides, note the upgrade it allows, and remove the hop-by-hop
//! headers before any later phase adds one of its own.

pub mod router;

use crate::edge::canon::{self, Refusal};
use crate::exchange::{Exchange, Flow};
use crate::phase::check::refuse;
use http::StatusCode;
use portcullis_config::{EscapedSlashes, Protocol};

pub async fn run(x: &mut Exchange<'_>) -> Flow {
    let snap = x.snap;
    let path = x.path();
    if path.starts_with("/.portcullis/") || path == "/.well-known/portcullis/jwks.json" {
        let authority = x.authority().and_then(|a| a.to_str().ok()).unwrap_or("");
        let r = crate::phase::identify::credentials::endpoints(
            snap,
            x.conn,
            &x.parts.headers,
            path,
            x.query().unwrap_or(""),
            authority,
        )
        .await;
        if let Some(r) = r {
            x.finish(r.status().as_u16(), None);
            return Flow::Respond(r);
        }
    }
    let Some(idx) = find(x, x.path()) else {
        return Flow::Refuse(StatusCode::NOT_FOUND, "no route\n");
    };
    // An encoded slash was kept opaque for routing; the route decides what it gets.
    if x.escaped_slash {
        match snap.routes[idx]
            .escaped_slashes
            .unwrap_or(x.conn.rules.escaped_slashes)
        {
            EscapedSlashes::Keep => {}
            EscapedSlashes::Reject => return refuse(x, Refusal::EscapedSlash),
            EscapedSlashes::Decode => match decode(x, idx) {
                Ok(d) => {
                    if x.log {
                        x.record.path = d.clone();
                    }
                    x.path = Some(d);
                }
                Err(r) => return refuse(x, r),
            },
        }
    }
    let route = &snap.routes[idx];
    x.route = Some(route);
    if x.log {
        x.record.route = route.id.to_string();
        x.record.backend = route.backend.id.clone();
    }
    // The method that policy, audit and the log see: the request's own, or an override.
    let mode = route
        .method_override
        .unwrap_or(x.conn.rules.method_override);
    match canon::method_override(&mut x.parts.headers, mode) {
        Ok(m) => x.method = m,
        Err(r) => return refuse(x, r),
    }
    if x.log && x.method.is_some() {
        x.record.method = x.method().as_str().to_string();
    }
    // Upgrades the route allows, read before hop-by-hop headers go; then they go, before
    // anything portcullis adds, so that `Connection` cannot name a header portcullis sets.
    if x.parts.headers.contains_key(http::header::UPGRADE) {
        let allowed = route.upgrades.as_deref().unwrap_or(&x.conn.rules.upgrades);
        x.upgrade = crate::upstream::upgrade::requested(x.parts.version, &x.parts.headers, allowed);
    }
    let h2_up = route.backend.connector.protocol == Protocol::Http2;
    crate::upstream::head::strip_hop_by_hop(&mut x.parts.headers, h2_up);
    Flow::Next
}

/// The route for `path` (canonical), by host, path without parameters, method, headers and
/// listener.
fn find(x: &Exchange<'_>, path: &str) -> Option<usize> {
    x.snap.router.route(
        x.host_name(),
        &canon::match_path(path),
        &x.parts.method,
        &x.parts.headers,
        &x.conn.listener,
    )
}

/// The path with its kept encoded slashes decoded, for a route that says `decode`. The
/// decoded path must route to the same route, or an encoded slash could have steered the
/// request past the route that the origin will serve.
fn decode(x: &Exchange<'_>, idx: usize) -> Result<String, Refusal> {
    let d = canon::path(x.path(), x.conn.rules.merge_slashes, EscapedSlashes::Decode)?
        .path
        .into_owned();
    if find(x, &d) != Some(idx) {
        return Err(Refusal::EscapedSlash);
    }
    Ok(d)
}
