//! The authorize stage, shorthand form: a route's `allow` rules (groups, users, emails,
//! providers, methods). Any rule that matches allows; within a rule every listed condition
//! must hold; a route with no rules allows any authenticated identity. A pure function of
//! the route and the identity.

use crate::snapshot::RouteRt;
use portcullis_identity::Identity;

pub fn allowed(route: &RouteRt, id: &Identity, method: &http::Method) -> bool {
    if route.allow.is_empty() {
        return true;
    }
    route.allow.iter().any(|r| {
        (r.groups.is_empty() || r.groups.iter().any(|g| id.groups.contains(g)))
            && (r.users.is_empty() || r.users.iter().any(|u| u == &id.user || u == &id.subject))
            && (r.emails.is_empty()
                || id
                    .email
                    .as_ref()
                    .is_some_and(|e| r.emails.iter().any(|x| x.eq_ignore_ascii_case(e))))
            && (r.providers.is_empty() || r.providers.contains(&id.provider))
            && (r.methods.is_empty() || r.methods.iter().any(|m| m == method.as_str()))
    })
}
