//! The decision-cache key. A cached decision may only be reused for a request that the
//! authorizer would see as identical, so the key covers everything the authorizer is sent
//! (the authorizer name, the whole identity summary, the route, method, host, path and every
//! `send` header) plus every extra attribute listed in `cache.key` (`header:NAME`,
//! `query:NAME`, `claim:PATH`). Each component is length-prefixed before it goes into one
//! SHA-256 digest, so no two different component lists can produce the same byte stream.

use crate::Error;
use portcullis_identity::Identity;
use sha2::{Digest, Sha256};

/// A SHA-256 digest identifying one decision.
pub type Key = [u8; 32];

/// An extra attribute of the cache key, parsed from a `cache.key` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAttr {
    /// `header:NAME`: every value of that request header (name lower-cased).
    Header(String),
    /// `query:NAME`: every value of that (decoded) query parameter.
    Query(String),
    /// `claim:PATH`: the claim value, by exact top-level name first, then by dotted path.
    Claim(String),
}

impl KeyAttr {
    /// Parses `header:NAME`, `query:NAME` or `claim:PATH`.
    pub fn parse(s: &str) -> Result<KeyAttr, Error> {
        let bad = || Error::CacheKey(s.to_string());
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match kind {
            "header" => {
                let name = rest.to_ascii_lowercase();
                http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
                Ok(KeyAttr::Header(name))
            }
            "query" => Ok(KeyAttr::Query(rest.to_string())),
            "claim" => Ok(KeyAttr::Claim(rest.to_string())),
            _ => Err(bad()),
        }
    }
}

/// Accumulates length-prefixed components into a SHA-256 digest.
pub struct KeyBuilder(Sha256);

impl Default for KeyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyBuilder {
    /// Starts a key; the domain tag keeps these digests apart from any other SHA-256 use.
    pub fn new() -> Self {
        let mut h = Sha256::new();
        h.update(b"portcullis/authorizer/cache-key/v1");
        KeyBuilder(h)
    }

    /// One byte string, prefixed by its length.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.update((b.len() as u64).to_be_bytes());
        self.0.update(b);
        self
    }

    /// One string, prefixed by its length.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// An optional value: a presence byte, then the value if present, so that "absent" and
    /// "empty" differ.
    pub fn opt(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.0.update([0u8]),
            Some(b) => {
                self.0.update([1u8]);
                self.bytes(b);
            }
        }
        self
    }

    /// A list: its item count, then each item length-prefixed.
    pub fn list<'a, I>(&mut self, items: I) -> &mut Self
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let items: Vec<&[u8]> = items.into_iter().collect();
        self.0.update((items.len() as u64).to_be_bytes());
        for b in items {
            self.bytes(b);
        }
        self
    }

    /// The digest.
    pub fn finish(self) -> Key {
        self.0.finalize().into()
    }
}

/// Adds the identity summary the authorizer is sent: provider and subject (the principal), then
/// user, email and groups, so that a change of any of them is a different decision.
pub fn add_identity(k: &mut KeyBuilder, id: &Identity) {
    k.str(&id.provider)
        .str(&id.subject)
        .str(&id.user)
        .opt(id.email.as_deref().map(str::as_bytes))
        .list(id.groups.iter().map(|g| g.as_bytes()));
}

/// Every value of a query parameter, decoded, in order.
pub fn query_values(query: Option<&str>, name: &str) -> Vec<String> {
    let Some(q) = query else {
        return Vec::new();
    };
    form_urlencoded::parse(q.as_bytes())
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// A claim by exact top-level name, or else by dotted path (`org.id`).
pub fn claim_value<'a>(claims: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let mut cur = claims;
    for part in path.split('.') {
        cur = match cur {
            serde_json::Value::Object(m) => m.get(part)?,
            serde_json::Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Adds one extra attribute: a tag naming its kind and name, then its value(s).
pub fn add_attr(
    k: &mut KeyBuilder,
    attr: &KeyAttr,
    id: &Identity,
    headers: &http::HeaderMap,
    query: Option<&str>,
) {
    match attr {
        KeyAttr::Header(name) => {
            k.str("header").str(name);
            k.list(headers.get_all(name.as_str()).iter().map(|v| v.as_bytes()));
        }
        KeyAttr::Query(name) => {
            k.str("query").str(name);
            let vals = query_values(query, name);
            k.list(vals.iter().map(|v| v.as_bytes()));
        }
        KeyAttr::Claim(path) => {
            k.str("claim").str(path);
            let v = claim_value(&id.claims, path).map(|v| v.to_string());
            k.opt(v.as_deref().map(str::as_bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_identity::AuthMethod;

    fn id(provider: &str, subject: &str) -> Identity {
        Identity {
            provider: provider.into(),
            method: AuthMethod::Jwt,
            subject: subject.into(),
            user: "alice".into(),
            email: None,
            groups: vec![],
            claims: serde_json::json!({ "org": { "id": "acme" }, "a.b": 1, "list": [10, 20] }),
            expires_at: None,
        }
    }

    fn key_of(f: impl FnOnce(&mut KeyBuilder)) -> Key {
        let mut k = KeyBuilder::new();
        f(&mut k);
        k.finish()
    }

    #[test]
    fn framing_is_unambiguous() {
        // "ab" + "c" and "a" + "bc" concatenate to the same bytes, but not the same key.
        let a = key_of(|k| {
            k.str("ab").str("c");
        });
        let b = key_of(|k| {
            k.str("a").str("bc");
        });
        assert_ne!(a, b);
        // Absent differs from empty.
        assert_ne!(
            key_of(|k| {
                k.opt(None);
            }),
            key_of(|k| {
                k.opt(Some(b""));
            })
        );
        // A list boundary cannot be shifted into the next field.
        let l1 = key_of(|k| {
            k.list([b"x".as_slice()]).str("y");
        });
        let l2 = key_of(|k| {
            k.list([b"x".as_slice(), b"y".as_slice()]);
        });
        assert_ne!(l1, l2);
    }

    #[test]
    fn principals_differ() {
        let k = |i: &Identity| key_of(|k| add_identity(k, i));
        assert_eq!(k(&id("corp", "1")), k(&id("corp", "1")));
        assert_ne!(k(&id("corp", "1")), k(&id("corp", "2")));
        assert_ne!(k(&id("corp", "1")), k(&id("partner", "1")));
        // provider/subject boundary: "co"+"rp1" vs "corp"+"1".
        assert_ne!(k(&id("co", "rp1")), k(&id("corp", "1")));
    }

    #[test]
    fn parses_attrs() {
        assert_eq!(
            KeyAttr::parse("header:X-Tenant").unwrap(),
            KeyAttr::Header("x-tenant".into())
        );
        assert_eq!(
            KeyAttr::parse("query:q").unwrap(),
            KeyAttr::Query("q".into())
        );
        assert_eq!(
            KeyAttr::parse("claim:org.id").unwrap(),
            KeyAttr::Claim("org.id".into())
        );
        assert!(KeyAttr::parse("header:bad name").is_err());
        assert!(KeyAttr::parse("cookie:x").is_err());
        assert!(KeyAttr::parse("header:").is_err());
        assert!(KeyAttr::parse("nothing").is_err());
    }

    #[test]
    fn query_and_claims() {
        assert_eq!(
            query_values(Some("a=1&b=x%20y&a=2"), "a"),
            vec!["1".to_string(), "2".to_string()]
        );
        assert_eq!(query_values(Some("b=x%20y"), "b"), vec!["x y".to_string()]);
        assert!(query_values(None, "a").is_empty());
        let i = id("corp", "1");
        assert_eq!(
            claim_value(&i.claims, "org.id"),
            Some(&serde_json::json!("acme"))
        );
        assert_eq!(claim_value(&i.claims, "a.b"), Some(&serde_json::json!(1)));
        assert_eq!(
            claim_value(&i.claims, "list.1"),
            Some(&serde_json::json!(20))
        );
        assert_eq!(claim_value(&i.claims, "org.nope"), None);
    }

    #[test]
    fn attrs_separate_values() {
        let i = id("corp", "1");
        let mut h1 = http::HeaderMap::new();
        h1.insert("x-tenant", "a".parse().unwrap());
        let mut h2 = http::HeaderMap::new();
        h2.insert("x-tenant", "b".parse().unwrap());
        let attr = KeyAttr::Header("x-tenant".into());
        let k = |h: &http::HeaderMap, q: Option<&str>, a: &KeyAttr| {
            key_of(|k| add_attr(k, a, &i, h, q))
        };
        assert_ne!(k(&h1, None, &attr), k(&h2, None, &attr));
        assert_ne!(k(&h1, None, &attr), k(&http::HeaderMap::new(), None, &attr));
        let q = KeyAttr::Query("t".into());
        assert_ne!(k(&h1, Some("t=1"), &q), k(&h1, Some("t=2"), &q));
        assert_eq!(k(&h1, Some("t=1"), &q), k(&h2, Some("t=1&u=3"), &q));
        let c = KeyAttr::Claim("org.id".into());
        let c2 = KeyAttr::Claim("org.other".into());
        assert_ne!(k(&h1, None, &c), k(&h1, None, &c2));
    }
}
