//! The Cedar entity model of portcullis, generated as a Cedar schema. Policies are validated
//! against it at load time, so a typo in an attribute or entity type is a config error.
//!
//! - principals: `Portcullis::User` (people: tokens and sessions) and `Portcullis::Agent`
//!   (API keys and mTLS machines), members of `Portcullis::Group`s. Attributes: `user`,
//!   `subject`, `provider`, `auth_method`, optional `email`. Claims are entity tags
//!   (`principal.hasTag("dept") && principal.getTag("dept") == "sales"`), because a Cedar
//!   schema cannot declare an open record.
//! - actions: the HTTP method (`Portcullis::Action::"GET"`), in the groups `read` (GET, HEAD,
//!   OPTIONS, TRACE) and `write` (everything else).
//! - resource: `Portcullis::Route::"app/route"` with `name`, `app`, `host`, `path`.
//! - context: `path`, `query` (a set of `name=value`), `query_keys`, `headers` (the
//!   configured `policy.context_headers`, lower-cased, each optional), `ip` (ipaddr), `time`
//!   (`timestamp` in seconds, UTC `hour`, `weekday` like "mon"), `tls` (`client_cert`,
//!   optional `client_subject`), `request_id`, `method`, and `limits`: one record per stick
//!   table, with one `Long` per stored counter (named as [`portcullis_limits::Counter::context_name`]
//!   names them, like `http_req_rate_10s`) and `tags` as a set. A table the route does not
//!   track, or whose key the request lacks, reads as zeros.

pub const READ_METHODS: [&str; 4] = ["GET", "HEAD", "OPTIONS", "TRACE"];
pub const WRITE_METHODS: [&str; 6] = ["POST", "PUT", "PATCH", "DELETE", "CONNECT", "OTHER"];

fn quote(s: &str) -> String {
    format!("\"{}\"", s.escape_default())
}

/// A stick table as the context shows it: its name and its counters' attribute names
/// (`tags` is a set of strings, every other counter a `Long`).
pub type TableAttrs = (String, Vec<String>);

/// The schema text for the given context headers and stick tables.
pub fn schema_text(context_headers: &[String], tables: &[TableAttrs]) -> String {
    let headers: Vec<String> = context_headers
        .iter()
        .map(|h| format!("{}?: String", quote(&h.to_ascii_lowercase())))
        .collect();
    let limits: Vec<String> = tables
        .iter()
        .map(|(name, attrs)| {
            let fields: Vec<String> = attrs
                .iter()
                .map(|a| {
                    let ty = if a == "tags" { "Set<String>" } else { "Long" };
                    format!("{}: {ty}", quote(a))
                })
                .collect();
            format!("{}: {{ {} }}", quote(name), fields.join(", "))
        })
        .collect();
    let principal_attrs =
        "{ user: String, subject: String, provider: String, auth_method: String, email?: String }";
    let list = |ms: &[&str]| ms.iter().map(|m| quote(m)).collect::<Vec<_>>().join(", ");
    format!(
        r#"namespace Portcullis {{
  entity Group;
  entity User in [Group] {principal_attrs} tags String;
  entity Agent in [Group] {principal_attrs} tags String;
  entity Route {{ name: String, app: String, host: String, path: String }};
  type Time = {{ timestamp: Long, hour: Long, weekday: String }};
  type Tls = {{ client_cert: Bool, client_subject?: String }};
  type RequestContext = {{
    path: String,
    route_path: String,
    method: String,
    query: Set<String>,
    query_keys: Set<String>,
    headers: {{ {headers} }},
    ip: ipaddr,
    time: Time,
    tls: Tls,
    request_id: String,
    limits: {{ {limits} }},
  }};
  action "read", "write";
  action {read} in ["read"] appliesTo {{ principal: [User, Agent], resource: [Route], context: RequestContext }};
  action {write} in ["write"] appliesTo {{ principal: [User, Agent], resource: [Route], context: RequestContext }};
}}
"#,
        headers = headers.join(", "),
        limits = limits.join(", "),
        read = list(&READ_METHODS),
        write = list(&WRITE_METHODS),
    )
}

/// The Cedar action for an HTTP method.
pub fn action_for(method: &str) -> &'static str {
    READ_METHODS
        .iter()
        .chain(WRITE_METHODS.iter())
        .find(|m| **m == method)
        .copied()
        .unwrap_or("OTHER")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_parses() {
        let text = schema_text(
            &["x-tenant".into()],
            &[(
                "per-ip".into(),
                vec!["http_req_rate_10s".into(), "tags".into()],
            )],
        );
        let _ = cedar_policy::Schema::from_cedarschema_str(&text).unwrap().0;
        assert_eq!(action_for("PROPFIND"), "OTHER");
    }
}
