//! Claim mapping: find the user, email and groups in a claim set. Paths are dotted
//! (`realm_access.roles`); groups may be an array or a space-separated string.

use serde_json::Value;

/// The value at a dotted path. A key containing dots is also tried whole first.
pub fn lookup<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let mut cur = claims;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    Some(cur)
}

/// A scalar claim as a string.
pub fn string(claims: &Value, path: &str) -> Option<String> {
    match lookup(claims, path)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Groups from an array of strings or a space-separated string.
pub fn groups(claims: &Value, path: &str) -> Vec<String> {
    match lookup(claims, path) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_groups_and_strings() {
        let c = json!({"sub": "u1", "realm_access": {"roles": ["a", "b"]}, "scope": "x y", "n": 5});
        assert_eq!(groups(&c, "realm_access.roles"), vec!["a", "b"]);
        assert_eq!(groups(&c, "scope"), vec!["x", "y"]);
        assert!(groups(&c, "missing").is_empty());
        assert_eq!(string(&c, "n").as_deref(), Some("5"));
    }
}
