//! The identify phase: turn the request's credential into the caller's identity through the
//! route's providers (see `crate::phase::identify::credentials`), or answer 401 or a login redirect. A refusal
//! is answered only once its audit record is written.

pub mod credentials;

use crate::exchange::{Exchange, Flow};
use crate::phase::identify::credentials::Step;
use http::StatusCode;

pub async fn run(x: &mut Exchange<'_>) -> Flow {
    let Some(route) = x.route else {
        return Flow::Next;
    };
    // Field by field, so that the headers can be borrowed mutably beside them.
    let target = crate::exchange::origin_target(&x.path, &x.parts.uri);
    let authority = x.host.as_ref().and_then(|h| h.authority.to_str().ok());
    let method = x.method.as_ref().unwrap_or(&x.parts.method);
    let step = crate::phase::identify::credentials::identify(
        x.snap,
        route,
        x.conn,
        &mut x.parts.headers,
        method,
        authority.unwrap_or(""),
        &target,
        &x.rid,
        x.start,
    )
    .await;
    match step {
        Step::Continue {
            identity,
            set_cookie,
            remembered,
        } => {
            x.set_cookie = set_cookie;
            if let (Some(id), true) = (&identity, x.log) {
                x.record.user = id.user.clone();
                x.record.provider = id.provider.clone();
            }
            x.identity = identity;
            x.remembered = remembered;
            Flow::Next
        }
        Step::Respond(r, reason) => {
            // Like a decision, a refusal is only answered once it is recorded.
            let written = match x.facts() {
                Some(facts) => {
                    crate::audit::write_with(x.shared, || {
                        crate::audit::auth_failure(&facts, &reason)
                    })
                    .await
                }
                None => true,
            };
            if !written {
                return Flow::Refuse(StatusCode::SERVICE_UNAVAILABLE, "audit trail unavailable\n");
            }
            let status = r.status().as_u16();
            tracing::info!(target: "portcullis::auth", request_id = %x.rid, route = %route.id, status, %reason, "request refused by identity");
            x.count(status);
            x.finish(status, Some(reason));
            Flow::Respond(r)
        }
    }
}
