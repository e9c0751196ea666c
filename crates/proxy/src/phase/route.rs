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
        // Boxed: portcullis's own endpoints are rare, and their future inline would size
        // every request's future (see `pipeline::handle`).
        let r = Box::pin(crate::phase::identify::credentials::endpoints(
            x.shared,
            snap,
            x.conn,
            &x.parts.headers,
            path,
            x.query().unwrap_or(""),
            authority,
        ))
        .await;
        if let Some(r) = r {
            x.finish(r.status().as_u16(), None);
            return Flow::Respond(r);
        }
    }
    let Some(idx) = find(x, x.path()) else {
        // A path with an encoded slash that no route takes as it is: refused as the
        // listener's rule refuses one (the decoded path might be some route's), not 404.
        if x.escaped_slash && x.conn.rules.escaped_slashes == EscapedSlashes::Reject {
            return refuse(x, Refusal::EscapedSlash);
        }
        return Flow::Refuse(StatusCode::NOT_FOUND, "no route\n");
    };
    // An encoded slash was kept opaque for routing; the route decides what it gets.
    if x.escaped_slash {
        match snap.routes[idx]
            .escaped_slashes
            .unwrap_or(x.conn.rules.escaped_slashes)
        {
            // Kept as sent, but an origin that decodes `%2F` serves the decoded path: it
            // must be one this route takes too (`/files/private%2Fx` is not the public
            // `/files/` route's when `/files/private/` is a route of its own).
            EscapedSlashes::Keep => {
                if let Err(r) = decode(x, idx) {
                    return refuse(x, r);
                }
            }
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
    let backend = route.current_backend(snap);
    x.route = Some(route);
    x.backend = Some(backend);
    if x.log {
        x.record.route = route.id.clone().into();
        x.record.backend = backend.id.clone();
    }
    // The method that policy, audit and the log see: the request's own, or an override.
    let mode = route
        .method_override
        .unwrap_or(x.conn.rules.method_override);
    match canon::overrides(&mut x.parts.headers, &mut x.parts.uri, mode) {
        Ok(m) => x.method = m,
        Err(r) => return refuse(x, r),
    }
    if x.log && x.method.is_some() {
        x.record.method = x.method().clone();
    }
    // Upgrades the route allows, read before hop-by-hop headers go; then they go, before
    // anything portcullis adds, so that `Connection` cannot name a header portcullis sets.
    if x.parts.headers.contains_key(http::header::UPGRADE) {
        let allowed = route.upgrades.as_deref().unwrap_or(&x.conn.rules.upgrades);
        x.upgrade = crate::upstream::upgrade::requested(x.parts.version, &x.parts.headers, allowed);
    }
    let h2_up = backend.connector.protocol == Protocol::Http2;
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

/// The path with its kept encoded slashes decoded, for a route that says `decode` (or
/// `keep`, to check it). The decoded path must route to the same route, or an encoded slash
/// could have steered the request past the route that an origin which decodes it serves.
fn decode(x: &Exchange<'_>, idx: usize) -> Result<String, Refusal> {
    let d = canon::path(x.path(), x.conn.rules.merge_slashes, EscapedSlashes::Decode)?
        .path
        .into_owned();
    if find(x, &d) != Some(idx) {
        return Err(Refusal::EscapedSlash);
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{describe, is_next, refusal, Kit};
    use http::{Method, Request};

    const CONFIG: &str = r#"
backends:
  - { name: api, servers: [{ name: a1, address: "builtin:echo" }] }
  - { name: www, servers: [{ name: w1, address: "builtin:echo" }] }
routes:
  - { name: api, match: { host: api.example.com, path_prefix: /v1/ }, backend: api, public: true }
  - { name: site, match: { host: www.example.com, path_prefix: / }, backend: www, public: true }
  # Encoded slashes: the listener rejects them; these routes keep or decode them.
  - name: files
    match: { host: www.example.com, path_prefix: /files/ }
    backend: www
    public: true
    normalize: { escaped_slashes: keep }
  - { name: private, match: { host: www.example.com, path_prefix: /files/private/ }, backend: api, public: true }
  - name: raw
    match: { host: www.example.com, path_prefix: /raw/ }
    backend: www
    public: true
    normalize: { escaped_slashes: decode }
  # Method overrides: the listener strips them; these routes reject or honor them.
  - { name: strict, match: { host: www.example.com, path_prefix: /strict/ }, backend: www, public: true, method_override: reject }
  - { name: legacy, match: { host: www.example.com, path_prefix: /legacy/ }, backend: www, public: true, method_override: honor }
  # Upgrades: the listener allows WebSocket; this route allows none.
  - { name: plain, match: { host: www.example.com, path_prefix: /plain/ }, backend: www, public: true, upgrades: [] }
"#;

    /// An exchange for `req` that passed the check phase.
    fn checked<'k>(kit: &'k Kit, req: http::request::Builder) -> crate::exchange::Exchange<'k> {
        let mut x = kit.exchange(req);
        let f = crate::phase::check::run(&mut x);
        assert!(is_next(&f), "check: {}", describe(&f));
        x
    }

    fn get(host: &str, path: &str) -> http::request::Builder {
        Request::get(path).header("host", host)
    }

    #[tokio::test]
    async fn the_route_is_found_by_host_and_path() {
        let kit = Kit::new(CONFIG).await;
        for (host, path, route, backend) in [
            ("api.example.com", "/v1/users", "default/api", "default/api"),
            (
                "www.example.com",
                "/v1/users",
                "default/site",
                "default/www",
            ),
            (
                "www.example.com",
                "/files/report.pdf",
                "default/files",
                "default/www",
            ),
            ("WWW.example.com:80", "/", "default/site", "default/www"),
        ] {
            let mut x = checked(&kit, get(host, path));
            let f = run(&mut x).await;
            assert!(is_next(&f), "{host}{path}: {}", describe(&f));
            assert_eq!(x.route.map(|r| &*r.id), Some(route), "{host}{path}");
            assert_eq!(x.route.unwrap().backend.id, backend);
            // The access record names them too.
            assert_eq!(x.record.route, route);
            assert_eq!(x.record.backend, backend);
        }
    }

    #[tokio::test]
    async fn a_request_no_route_matches_is_not_found() {
        let kit = Kit::new(CONFIG).await;
        let mut x = checked(&kit, get("other.example.com", "/v1/users"));
        assert_eq!(
            refusal(run(&mut x).await),
            (StatusCode::NOT_FOUND, "no route\n")
        );
        assert!(x.route.is_none());
    }

    #[tokio::test]
    async fn each_route_decides_what_an_encoded_slash_gets() {
        let kit = Kit::new(CONFIG).await;
        // The listener's rule (reject) on a route without its own.
        let mut x = checked(&kit, get("www.example.com", "/docs/a%2Fb"));
        assert_eq!(
            refusal(run(&mut x).await),
            (
                StatusCode::BAD_REQUEST,
                "encoded slash or backslash in the request path\n"
            )
        );
        assert_eq!(kit.refused("escaped_slash"), 1.0, "{}", kit.metrics());

        // keep: the slash stays encoded, for the origin to read.
        let mut x = checked(&kit, get("www.example.com", "/files/a%2Fb"));
        let f = run(&mut x).await;
        assert!(is_next(&f), "{}", describe(&f));
        assert_eq!(x.route.map(|r| &*r.id), Some("default/files"));
        assert_eq!(x.path(), "/files/a%2Fb");
        // keep, but the decoded path is another route's: an origin that decodes `%2F`
        // would serve `/files/private/x`, which this route does not take.
        let mut x = checked(&kit, get("www.example.com", "/files/private%2Fx"));
        assert_eq!(
            refusal(run(&mut x).await),
            (
                StatusCode::BAD_REQUEST,
                "encoded slash or backslash in the request path\n"
            )
        );
        assert_eq!(kit.refused("escaped_slash"), 2.0);

        // decode: the path is decoded, and must still lead to the same route.
        let mut x = checked(&kit, get("www.example.com", "/raw/a%2Fb"));
        let f = run(&mut x).await;
        assert!(is_next(&f), "{}", describe(&f));
        assert_eq!(x.route.map(|r| &*r.id), Some("default/raw"));
        assert_eq!(x.path(), "/raw/a/b");
        assert_eq!(x.record.path, "/raw/a/b");
        assert_eq!(kit.refused("escaped_slash"), 2.0);

        // No route takes the path as it is: 400 as the listener refuses encoded slashes,
        // not 404.
        let mut x = checked(&kit, get("nowhere.example.com", "/%2Fadmin/x"));
        assert_eq!(refusal(run(&mut x).await).0, StatusCode::BAD_REQUEST);
        assert_eq!(kit.refused("escaped_slash"), 3.0);
    }

    #[tokio::test]
    async fn a_method_override_is_stripped_rejected_or_honored_as_the_route_says() {
        let kit = Kit::new(CONFIG).await;
        let post = |path: &str| {
            Request::post(path)
                .header("host", "www.example.com")
                .header("x-http-method-override", "DELETE")
        };

        // strip (the listener's default): policy sees POST, the origin no override.
        let mut x = checked(&kit, post("/things/1"));
        assert!(is_next(&run(&mut x).await));
        assert_eq!(x.method(), Method::POST);
        assert!(!x.parts.headers.contains_key("x-http-method-override"));

        // reject: 400, counted.
        let mut x = checked(&kit, post("/strict/things/1"));
        assert_eq!(
            refusal(run(&mut x).await),
            (
                StatusCode::BAD_REQUEST,
                "method override headers are not accepted\n"
            )
        );
        assert_eq!(kit.refused("method_override"), 1.0, "{}", kit.metrics());

        // honor: policy, audit and the log see DELETE; the origin gets the header.
        let mut x = checked(&kit, post("/legacy/things/1"));
        assert!(is_next(&run(&mut x).await));
        assert_eq!(x.method(), Method::DELETE);
        assert_eq!(x.parts.method, Method::POST);
        assert_eq!(x.record.method, "DELETE");
        assert_eq!(x.parts.headers["x-http-method-override"], "DELETE");

        // The `_method` parameter is an override too: stripped from what the origin is sent,
        // refused, or believed.
        let param = |path: &str| Request::post(path).header("host", "www.example.com");
        let mut x = checked(&kit, param("/things/1?a=1&_method=DELETE"));
        assert!(is_next(&run(&mut x).await));
        assert_eq!(x.method(), Method::POST);
        assert_eq!(x.origin_target(), "/things/1?a=1");
        let mut x = checked(&kit, param("/strict/things/1?%5Fmethod=DELETE"));
        assert_eq!(refusal(run(&mut x).await).0, StatusCode::BAD_REQUEST);
        let mut x = checked(&kit, param("/legacy/things/1?_method=delete"));
        assert!(is_next(&run(&mut x).await));
        assert_eq!(x.method(), Method::DELETE);
        assert_eq!(x.origin_target(), "/legacy/things/1?_method=delete");
    }

    #[tokio::test]
    async fn an_allowed_upgrade_is_noted_before_hop_by_hop_headers_go() {
        let kit = Kit::new(CONFIG).await;
        let ws = |path: &str, protocol: &str| {
            get("www.example.com", path)
                .header("connection", "Upgrade")
                .header("upgrade", protocol)
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        };

        let mut x = checked(&kit, ws("/chat", "websocket"));
        assert!(is_next(&run(&mut x).await));
        let up = x.upgrade.as_ref().expect("the upgrade is allowed");
        assert_eq!(up.protocols, "websocket");
        // The request's own Upgrade and Connection are gone: forward sets them from `upgrade`.
        assert!(!x.parts.headers.contains_key("upgrade"));
        assert!(!x.parts.headers.contains_key("connection"));

        // h2c never; and a route that allows no upgrade gets an ordinary request.
        let mut x = checked(&kit, ws("/chat", "h2c"));
        assert!(is_next(&run(&mut x).await));
        assert!(x.upgrade.is_none());
        let mut x = checked(&kit, ws("/plain/chat", "websocket"));
        assert!(is_next(&run(&mut x).await));
        assert!(x.upgrade.is_none());
        assert!(!x.parts.headers.contains_key("upgrade"));
    }

    #[tokio::test]
    async fn hop_by_hop_headers_are_removed() {
        let kit = Kit::new(CONFIG).await;
        let mut x = checked(
            &kit,
            get("www.example.com", "/")
                .header("connection", "keep-alive, x-hop")
                .header("x-hop", "only for the next hop")
                .header("keep-alive", "timeout=5")
                .header("te", "gzip")
                .header("proxy-authorization", "Basic Zm9vOmJhcg==")
                .header("x-kept", "yes"),
        );
        assert!(is_next(&run(&mut x).await));
        let mut names: Vec<&str> = x.parts.headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "x-kept"]);
    }
}
