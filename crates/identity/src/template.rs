//! Upstream header templates: `{identity.user}`, `{identity.email}`, `{identity.groups}`
//! (comma-separated), `{identity.provider}`, `{identity.subject}` and `{claims.<path>}`.
//! Control characters are dropped so a claim can never inject a header line.

use crate::{claims, Identity};

pub fn render(t: &str, id: &Identity) -> String {
    let mut out = String::with_capacity(t.len() + 16);
    let mut rest = t;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[i..]);
            rest = "";
            break;
        };
        let var = &after[..end];
        match var {
            "identity.user" => out.push_str(&id.user),
            "identity.email" => out.push_str(id.email.as_deref().unwrap_or("")),
            "identity.groups" => out.push_str(&id.groups.join(",")),
            "identity.provider" => out.push_str(&id.provider),
            "identity.subject" => out.push_str(&id.subject),
            v => {
                if let Some(path) = v.strip_prefix("claims.") {
                    match claims::lookup(&id.claims, path) {
                        Some(serde_json::Value::String(s)) => out.push_str(s),
                        Some(serde_json::Value::Array(a)) => {
                            let parts: Vec<String> = a
                                .iter()
                                .map(|x| {
                                    x.as_str()
                                        .map(String::from)
                                        .unwrap_or_else(|| x.to_string())
                                })
                                .collect();
                            out.push_str(&parts.join(","));
                        }
                        Some(other) => out.push_str(&other.to_string()),
                        None => {}
                    }
                }
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out.retain(|c| !c.is_control());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthMethod;

    #[test]
    fn renders_identity_and_claims_without_control_characters() {
        let id = Identity {
            provider: "corp".into(),
            method: AuthMethod::Jwt,
            subject: "u1".into(),
            user: "alice".into(),
            email: Some("a@x.io".into()),
            groups: vec!["eng".into(), "ops".into()],
            claims: serde_json::json!({"tenant": {"id": "t-9\r\nX-Evil: 1"}, "n": 3}),
            expires_at: None,
        };
        assert_eq!(
            render("{identity.user} <{identity.email}>", &id),
            "alice <a@x.io>"
        );
        assert_eq!(render("{identity.groups}", &id), "eng,ops");
        assert_eq!(render("{claims.tenant.id}", &id), "t-9X-Evil: 1");
        assert_eq!(render("n={claims.n}", &id), "n=3");
    }
}
