//! The authorize phase: decide with the route's policies and external authorizers (see
//! `crate::phase::authorize::decide`), write the decision's audit record before anything else happens, and
//! answer a denial with 403 itself. An allowed request may carry headers an authorizer added,
//! never ones that say who the caller is.

pub mod decide;

use crate::exchange::{Exchange, Flow, X_REQUEST_ID};
use http::header::{self, HeaderName};
use http::StatusCode;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

pub async fn run(x: &mut Exchange<'_>) -> Flow {
    let (Some(route), Some(id)) = (x.route, x.identity.clone()) else {
        // Public routes make no decision.
        return Flow::Next;
    };
    let remembered = x.remembered.take();
    let out = crate::phase::authorize::decide::authorize(
        x.snap,
        route,
        x.conn,
        &id,
        x.method(),
        x.host_name(),
        x.path(),
        x.query(),
        &x.parts.headers,
        &x.rid,
        x.shared.audit.is_some(),
        remembered,
    )
    .await;
    x.record.decision = out.decision;
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
        // An authorizer may add context, never overwrite identity or credentials.
        if x.snap.strip_headers.contains(&k)
            || k == header::AUTHORIZATION
            || k == header::COOKIE
            || k == X_FORWARDED_FOR
            || k == X_REQUEST_ID
        {
            continue;
        }
        x.parts.headers.insert(k, v);
    }
    Flow::Next
}
