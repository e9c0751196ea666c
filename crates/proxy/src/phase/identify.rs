//! The identify phase: turn the request's credential into the caller's identity through the
//! route's providers (see `crate::phase::identify::credentials`), or answer 401 or a login redirect. A refusal
//! is answered only once its audit record is written.

pub mod credentials;

use crate::exchange::{Exchange, Flow};
use crate::snapshot::RouteRt;
use crate::upstream::body::RespBody;
use credentials::Step;
use http::{Response, StatusCode};

pub async fn run(x: &mut Exchange<'_>) -> Flow {
    let Some(route) = x.route else {
        return Flow::Next;
    };
    if route.public {
        // No identity to find (identify would say so at once): no future to box.
        return Flow::Next;
    }
    // Field by field, so that the headers can be borrowed mutably beside them.
    let target = crate::exchange::origin_target(&x.path, &x.parts.uri);
    let authority = x.host.as_ref().and_then(|h| h.authority.to_str().ok());
    let method = x.method.as_ref().unwrap_or(&x.parts.method);
    // Boxed: identification may fetch keys or talk to an identity provider, and that
    // future inline would size every request's future (see `pipeline::handle`).
    let step = Box::pin(credentials::identify(
        x.snap,
        route,
        x.conn,
        &mut x.parts.headers,
        method,
        (authority.unwrap_or(""), &target),
        &x.rid,
        x.start,
    ))
    .await;
    match step {
        Step::Continue {
            identity,
            set_cookie,
        } => {
            x.set_cookie = set_cookie;
            if let (Some(id), true) = (&identity, x.log) {
                x.record.user = id.user.clone();
                x.record.provider = id.provider.clone();
            }
            x.identity = identity;
            Flow::Next
        }
        Step::Respond(r, reason) => Box::pin(refused(x, route, r, reason)).await,
    }
}

/// A request identification refused: recorded, counted, and answered. Boxed by the caller,
/// as a rare path.
async fn refused(
    x: &mut Exchange<'_>,
    route: &RouteRt,
    r: Response<RespBody>,
    reason: String,
) -> Flow {
    // Like a decision, a refusal is only answered once it is recorded.
    let written = match x.facts() {
        Some(facts) => {
            crate::audit::write_with(x.shared, || crate::audit::auth_failure(&facts, &reason)).await
        }
        None => true,
    };
    if !written {
        return Flow::Refuse(StatusCode::SERVICE_UNAVAILABLE, "audit trail unavailable\n");
    }
    let status = r.status().as_u16();
    if status == 401 {
        // For `auth.failure_burst`: a count per route and client, no event per request.
        x.shared.events.auth_failed(&route.id, x.conn.peer.ip());
        if let Some(limited) = crate::phase::limit::auth_failed(x, route).await {
            return limited;
        }
    }
    // At debug: the access log and the audit trail have every refusal, and a line per
    // refused request at info would let anyone fill the process log.
    tracing::debug!(target: "portcullis::auth", request_id = %x.rid, route = %route.id, status, %reason, "request refused by identity");
    x.count(status);
    x.finish(status, Some(reason));
    Flow::Respond(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{describe, is_next, response, Kit};
    use http::{header, Request};

    const CONFIG: &str = r#"
identity:
  providers:
    - { name: dev, kind: dev_issuer }
backends:
  - { name: b, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - name: app
    match: { path_prefix: / }
    backend: b
    auth: [dev]
    allow: [{ groups: [eng] }]
    headers:
      upstream:
        X-User: "{identity.user}"
        X-Groups: "{identity.groups}"
  - { name: status, match: { path: /status }, backend: b, public: true }
"#;

    fn get(path: &str) -> http::request::Builder {
        Request::get(path).header("host", "example.com")
    }

    #[tokio::test]
    async fn no_credentials_get_401_with_a_challenge_once_recorded() {
        let kit = Kit::new(CONFIG).await;
        let mut x = kit.routed(get("/hello")).await;
        let r = response(run(&mut x).await);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"portcullis\""
        );
        assert_eq!(r.headers()["x-request-id"], &*x.rid);
        assert!(x.identity.is_none());

        // Refused, audited, logged.
        let audit = kit.audit();
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!(audit[0]["kind"], "auth_failure");
        assert_eq!(audit[0]["decision"], "deny");
        assert_eq!(audit[0]["route"], "app");
        assert_eq!(audit[0]["reasons"][0], "authentication: no credentials");
        let log = kit.access_log(1);
        assert_eq!(log[0]["status"], 401);
        assert_eq!(log[0]["route"], "default/app");
        assert_eq!(log[0]["error"], "no credentials");
    }

    #[tokio::test]
    async fn an_invalid_token_gets_401_saying_why() {
        let kit = Kit::new(CONFIG).await;
        let mut x = kit
            .routed(get("/hello").header("authorization", "Bearer not-a-token"))
            .await;
        let r = response(run(&mut x).await);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let challenge = r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer realm=\"portcullis\", error=\"invalid_token\""),
            "{challenge}"
        );
    }

    #[tokio::test]
    async fn a_valid_token_gives_the_identity_and_its_headers() {
        let kit = Kit::new(CONFIG).await;
        let token = kit.token("dev", "alice", &["eng", "ops"]);
        let mut x = kit
            .routed(
                get("/hello")
                    .header("authorization", format!("Bearer {token}"))
                    // A client cannot say who it is: this one goes.
                    .header("x-user", "mallory"),
            )
            .await;
        let f = run(&mut x).await;
        assert!(is_next(&f), "{}", describe(&f));
        let id = x.identity.as_ref().expect("an identity");
        assert_eq!(id.user, "alice");
        assert_eq!(id.provider, "dev");
        assert_eq!(id.groups, ["eng", "ops"]);
        let h = &x.parts.headers;
        assert_eq!(h["x-user"], "alice");
        assert_eq!(h.get_all("x-user").iter().count(), 1);
        assert!(h["x-groups"].to_str().unwrap().contains("eng"), "{h:?}");
        // The credential stays at the edge.
        assert!(!h.contains_key(header::AUTHORIZATION));
        assert_eq!(x.record.user, "alice");
        assert_eq!(x.record.provider, "dev");
        // Identify decides nothing and records nothing: authorize does.
        assert!(kit.audit().is_empty());
    }

    /// A request with two credentials of one kind is refused (400): whoever reads it after
    /// portcullis could pick the other one.
    #[tokio::test]
    async fn two_authorization_or_api_key_fields_are_refused() {
        let kit = Kit::new(CONFIG).await;
        let alice = kit.token("dev", "alice", &["eng"]);
        let bob = kit.token("dev", "bob", &["eng"]);
        for req in [
            get("/hello")
                .header("authorization", format!("Bearer {alice}"))
                .header("authorization", format!("Bearer {bob}")),
            get("/hello")
                .header("x-api-key", "one")
                .header("x-api-key", "two"),
        ] {
            let mut x = kit.routed(req).await;
            let f = run(&mut x).await;
            assert_eq!(
                crate::testkit::response(f).status(),
                http::StatusCode::BAD_REQUEST
            );
        }
    }

    #[tokio::test]
    async fn a_public_route_goes_on_without_identity_and_without_forged_headers() {
        let kit = Kit::new(CONFIG).await;
        let mut x = kit
            .routed(
                get("/status")
                    .header("x-user", "mallory")
                    .header("X_User", "mallory")
                    .header("X.User", "mallory"),
            )
            .await;
        assert_eq!(x.route.map(|r| &*r.id), Some("default/status"));
        let f = run(&mut x).await;
        assert!(is_next(&f), "{}", describe(&f));
        assert!(x.identity.is_none());
        assert!(!x.parts.headers.contains_key("x-user"));
        assert!(!x.parts.headers.contains_key("x_user"));
        assert!(!x.parts.headers.contains_key("x.user"));
    }
}
