//! The authorize phase: decide with the route's policies and external authorizers (see
//! `crate::phase::authorize::decide`), write the decision's audit record before anything else happens, and
//! answer a denial with 403 itself. An allowed request may carry headers an authorizer added,
//! never ones that say who the caller is.

pub mod decide;

use crate::exchange::{Exchange, Flow};
use http::StatusCode;

pub async fn run(x: &mut Exchange<'_>) -> Flow {
    let (Some(route), Some(id)) = (x.route, x.identity.clone()) else {
        // Public routes make no decision.
        return Flow::Next;
    };
    let out = decide::authorize(x, route, &id).await;
    x.record.decision = out.decision;
    let i = match out.decision {
        "deny" => 1,
        "would_deny" => 2,
        _ => 0,
    };
    route.decisions[i].inc();
    let written = match x.facts() {
        Some(facts) => {
            crate::audit::write_with(x.shared, || crate::audit::decision(&facts, &id, &out)).await
        }
        None => true,
    };
    if !written {
        return Flow::Refuse(StatusCode::SERVICE_UNAVAILABLE, "audit trail unavailable\n");
    }
    if !out.pass {
        // For `auth.denial_burst`: a count per route and client, no event per request.
        x.shared.events.denied(&route.id, x.conn.peer.ip());
        let reason = format!(
            "{} for {}: {}",
            out.decision,
            id.user,
            out.reasons.join(", ")
        );
        tracing::info!(target: "portcullis::auth", request_id = %x.rid, route = %route.id, user = %id.user, reasons = ?out.reasons, "request denied by policy");
        x.count(403);
        x.finish(403, Some(reason));
        return Flow::Respond(crate::phase::identify::credentials::forbidden(&x.rid));
    }
    if out.decision == "would_deny" {
        tracing::info!(target: "portcullis::auth", request_id = %x.rid, route = %route.id, user = %id.user, reasons = ?out.reasons, "shadow mode: request would be denied");
    }
    for (k, v) in out.add_headers {
        // An authorizer may add context, never overwrite identity, credentials, framing,
        // the method or where the request came from (the fields portcullis owns), nor add
        // a name with `_` (or `.`, ...), which CGI-style origins read as the `-` name
        // (`x_user`).
        if x.snap.strip_headers.contains(&k)
            || crate::fields::is_owned(k.as_str())
            || crate::fields::is_unusual(k.as_str())
        {
            continue;
        }
        x.parts.headers.insert(k, v);
    }
    Flow::Next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Exchange;
    use crate::testkit::{describe, is_next, response, Kit};
    use http::Request;

    const ROUTES: &str = r#"
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
    headers: { upstream: { X-User: "{identity.user}" } }
  - name: beta
    match: { path_prefix: /beta/ }
    backend: b
    auth: [dev]
    allow: [{ groups: [eng] }]
    enforce: false
"#;

    /// An exchange for a GET of `path` by `user` in `groups`, through check, route and
    /// identify.
    async fn identified<'k>(kit: &'k Kit, path: &str, user: &str, groups: &[&str]) -> Exchange<'k> {
        let token = kit.token("dev", user, groups);
        let mut x = kit
            .routed(
                Request::get(path)
                    .header("host", "example.com")
                    .header("authorization", format!("Bearer {token}")),
            )
            .await;
        let f = crate::phase::identify::run(&mut x).await;
        assert!(is_next(&f), "identify: {}", describe(&f));
        x
    }

    #[tokio::test]
    async fn an_allowed_request_goes_on_with_its_decision_recorded() {
        let kit = Kit::new(ROUTES).await;
        let mut x = identified(&kit, "/reports", "alice", &["eng"]).await;
        let f = run(&mut x).await;
        assert!(is_next(&f), "{}", describe(&f));
        assert_eq!(x.record.decision, "allow");
        // The decision is in the audit trail before the request goes on.
        let audit = kit.audit();
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!(audit[0]["kind"], "decision");
        assert_eq!(audit[0]["decision"], "allow");
        assert_eq!(audit[0]["principal"]["user"], "alice");
        assert_eq!(audit[0]["route"], "app");
        assert_eq!(audit[0]["path"], "/reports");
    }

    #[tokio::test]
    async fn a_denied_request_gets_403_and_a_deny_record() {
        let kit = Kit::new(ROUTES).await;
        let mut x = identified(&kit, "/reports", "bob", &["sales"]).await;
        let r = response(run(&mut x).await);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()["x-request-id"], &*x.rid);

        let audit = kit.audit();
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!(audit[0]["decision"], "deny");
        assert_eq!(audit[0]["principal"]["user"], "bob");
        let reasons = audit[0]["reasons"].to_string();
        assert!(reasons.contains("default deny"), "{reasons}");
        // The access record says so too (authorize wrote it: the exchange is finished).
        let log = kit.access_log(1);
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!(log[0]["status"], 403);
        assert_eq!(log[0]["decision"], "deny");
        assert_eq!(log[0]["user"], "bob");
        assert_eq!(
            kit.metric("portcullis_requests_total{route=\"default/app\",backend=\"default/b\",code=\"4xx\"}"),
            1.0
        );
    }

    #[tokio::test]
    async fn shadow_mode_records_would_deny_and_lets_the_request_through() {
        let kit = Kit::new(ROUTES).await;
        let mut x = identified(&kit, "/beta/x", "bob", &["sales"]).await;
        assert_eq!(x.route.map(|r| &*r.id), Some("default/beta"));
        let f = run(&mut x).await;
        assert!(is_next(&f), "{}", describe(&f));
        assert_eq!(x.record.decision, "would_deny");
        assert_eq!(kit.audit()[0]["decision"], "would_deny");
    }

    /// An authorizer on 127.0.0.1 that allows everything and answers `body`.
    async fn authorizer(body: &'static str) -> String {
        use hyper::service::service_fn;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/check", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let svc = service_fn(move |_req| async move {
                    let mut r = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(body.as_bytes()),
                    ));
                    r.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(r)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
                );
            }
        });
        url
    }

    #[tokio::test]
    async fn an_authorizer_adds_context_but_never_identity_or_credentials() {
        let url = authorizer(
            r#"{"headers": {"x-tenant": "acme", "x-user": "mallory", "authorization": "Bearer forged", "x-request-id": "forged", "x_user": "mallory", "x_portcullis_assertion": "forged", "x-http-method-override": "DELETE", "content-type": "text/evil", "content-encoding": "gzip", "via": "x", "max-forwards": "0", "x-real-ip": "10.0.0.1"}}"#,
        )
        .await;
        let kit = Kit::new(&format!(
            "authorizers: [{{ name: ctx, url: \"{url}\", timeout: 5s }}]\n{}",
            ROUTES.replace(
                "allow: [{ groups: [eng] }]\n    headers",
                "allow: [{ groups: [eng] }]\n    authorize_with: [ctx]\n    headers"
            )
        ))
        .await;
        assert_eq!(kit.snap.routes[0].authorize_with.len(), 1);
        let mut x = identified(&kit, "/reports", "alice", &["eng"]).await;
        let f = run(&mut x).await;
        assert!(is_next(&f), "{}", describe(&f));
        let h = &x.parts.headers;
        assert_eq!(h["x-tenant"], "acme");
        assert_eq!(h["x-user"], "alice");
        assert!(!h.contains_key("authorization"), "{h:?}");
        assert!(!h.contains_key("x-request-id"), "{h:?}");
        // Nothing portcullis owns, nor a name a CGI-style origin reads as one.
        for owned in [
            "x_user",
            "x_portcullis_assertion",
            "x-http-method-override",
            "content-type",
            "content-encoding",
            "via",
            "max-forwards",
            "x-real-ip",
        ] {
            assert!(!h.contains_key(owned), "{owned}: {h:?}");
        }
        assert_eq!(kit.audit()[0]["authorizer"]["name"], "ctx");
    }

    /// With `upstream_headers`, an authorizer sets only those, and a client's own values of
    /// them are removed on every route, also when the answer sets none.
    #[tokio::test]
    async fn an_authorizers_declared_headers_cannot_come_from_the_client() {
        let url = authorizer(r#"{"headers": {"x-plan": "gold", "x-other": "1"}}"#).await;
        let kit = Kit::new(&format!(
            "authorizers: [{{ name: ctx, url: \"{url}\", timeout: 5s, upstream_headers: [X-Plan, x-tenant-id] }}]\n{}",
            ROUTES.replace(
                "allow: [{ groups: [eng] }]\n    headers",
                "allow: [{ groups: [eng] }]\n    authorize_with: [ctx]\n    headers"
            )
        ))
        .await;
        let token = kit.token("dev", "alice", &["eng"]);
        let mut x = kit
            .routed(
                http::Request::get("/reports")
                    .header("host", "example.com")
                    .header("authorization", format!("Bearer {token}"))
                    .header("x-plan", "platinum")
                    .header("X_Tenant_Id", "99")
                    .header("x-tenant-id", "99"),
            )
            .await;
        assert!(!x.parts.headers.contains_key("x-tenant-id"));
        assert!(!x.parts.headers.contains_key("x_tenant_id"));
        assert!(!x.parts.headers.contains_key("x-plan"));
        let f = crate::phase::identify::run(&mut x).await;
        assert!(is_next(&f), "{}", describe(&f));
        let f = run(&mut x).await;
        assert!(is_next(&f), "{}", describe(&f));
        let h = &x.parts.headers;
        assert_eq!(h["x-plan"], "gold");
        assert!(!h.contains_key("x-other"), "not declared: {h:?}");
        assert!(!h.contains_key("x-tenant-id"), "the client's value: {h:?}");
    }
}
