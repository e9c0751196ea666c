//! The call to an external decision function: the JSON request body, the POST with its
//! timeout, and reading the answer. A 2xx allows, 401 or 403 denies, and anything else is an
//! [`Error`]. The answer may carry a `reason` and `headers` to add upstream; headers that
//! could change framing or forge portcullis' own headers are dropped. `Cache-Control` from the
//! answer becomes a [`CacheHint`].

use crate::cache::Decision;
use crate::Error;
use http::{HeaderName, HeaderValue};
use portcullis_identity::Identity;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// The largest answer body read; a longer one is an error.
pub const MAX_BODY: usize = 64 * 1024;
/// The longest `Cache-Control: max-age` honoured.
pub const MAX_AGE_CAP: Duration = Duration::from_secs(3600);
/// At most this many headers are taken from one answer.
pub const MAX_HEADERS: usize = 32;
/// A longer `reason` is cut to this many characters.
pub const MAX_REASON: usize = 1024;

/// The identity summary sent to the authorizer.
#[derive(Debug, Serialize)]
pub struct IdentityBody<'a> {
    pub provider: &'a str,
    pub subject: &'a str,
    pub user: &'a str,
    pub email: Option<&'a str>,
    pub groups: &'a [String],
}

/// The JSON request body.
#[derive(Debug, Serialize)]
pub struct RequestBody<'a> {
    pub identity: IdentityBody<'a>,
    pub route: &'a str,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub headers: BTreeMap<&'a str, String>,
}

impl<'a> RequestBody<'a> {
    /// The body for one request; `send` holds lower-cased header names. A header sent several
    /// times is joined with `, `; a header that is absent is left out.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        identity: &'a Identity,
        route: &'a str,
        method: &'a str,
        host: &'a str,
        path: &'a str,
        headers: &http::HeaderMap,
        send: &'a [String],
    ) -> Self {
        let mut sent = BTreeMap::new();
        for name in send {
            let vals: Vec<String> = headers
                .get_all(name.as_str())
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            if !vals.is_empty() {
                sent.insert(name.as_str(), vals.join(", "));
            }
        }
        RequestBody {
            identity: IdentityBody {
                provider: &identity.provider,
                subject: &identity.subject,
                user: &identity.user,
                email: identity.email.as_deref(),
                groups: &identity.groups,
            },
            route,
            method,
            host,
            path,
            headers: sent,
        }
    }
}

/// What the answer says about caching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheHint {
    /// No directive: use the configured allow or deny TTL.
    Default,
    /// `no-store` (or `no-cache`): do not cache.
    NoStore,
    /// `max-age=N`, already capped at [`MAX_AGE_CAP`].
    MaxAge(Duration),
}

/// A decision and its caching hint.
#[derive(Debug, Clone)]
pub struct Answer {
    pub decision: Decision,
    pub hint: CacheHint,
}

/// POSTs `body` (JSON) to `url` and reads the answer within `timeout` overall.
pub async fn call(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
    body: Vec<u8>,
) -> Result<Answer, Error> {
    let fut = async {
        let mut resp = client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| transport(e, timeout))?;
        let status = resp.status();
        let allowed = if status.is_success() {
            true
        } else if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN
        {
            false
        } else {
            return Err(Error::Status(status.as_u16()));
        };
        let hint = cache_hint(resp.headers());
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| transport(e, timeout))? {
            if buf.len() + chunk.len() > MAX_BODY {
                return Err(Error::BodyTooLarge);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Answer {
            decision: parse_body(allowed, &buf),
            hint,
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout(timeout)),
    }
}

fn transport(e: reqwest::Error, timeout: Duration) -> Error {
    if e.is_timeout() {
        Error::Timeout(timeout)
    } else {
        // Walk the sources: reqwest's own message ("error sending request") says little.
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        Error::Transport(msg)
    }
}

/// Reads `Cache-Control`: `no-store` and `no-cache` win over `max-age`; `max-age` is capped.
pub fn cache_hint(headers: &http::HeaderMap) -> CacheHint {
    let mut max_age = None;
    for v in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else {
            // An unreadable directive could be `no-store`: do not cache.
            return CacheHint::NoStore;
        };
        for d in v.split(',') {
            let (name, arg) = match d.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (d.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return CacheHint::NoStore;
            }
            if name.eq_ignore_ascii_case("max-age") && max_age.is_none() {
                match arg.and_then(|a| a.parse::<u64>().ok()) {
                    Some(n) => max_age = Some(Duration::from_secs(n).min(MAX_AGE_CAP)),
                    // A malformed max-age is treated as stale (RFC 9111 §4.2.1).
                    None => return CacheHint::NoStore,
                }
            }
        }
    }
    match max_age {
        Some(d) if d.is_zero() => CacheHint::NoStore,
        Some(d) => CacheHint::MaxAge(d),
        None => CacheHint::Default,
    }
}

/// Headers an authorizer may never set upstream: hop-by-hop and framing headers, `host`, and
/// portcullis' own `x-portcullis-*` namespace.
pub fn forbidden_header(name: &HeaderName) -> bool {
    const DENY: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    ];
    let n = name.as_str();
    DENY.contains(&n) || n.starts_with("x-portcullis-")
}

/// Reads `reason` and (for an allow) `headers` from the answer body. The body is optional: an
/// empty or non-JSON body still carries the status' decision.
pub fn parse_body(allowed: bool, body: &[u8]) -> Decision {
    let mut d = Decision {
        allowed,
        reason: None,
        headers: Vec::new(),
    };
    if body.iter().all(u8::is_ascii_whitespace) {
        return d;
    }
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(error = %e, "authorizer answer is not JSON; using its status only");
            return d;
        }
    };
    if let Some(r) = v.get("reason").and_then(|r| r.as_str()) {
        d.reason = Some(r.chars().take(MAX_REASON).collect());
    }
    if allowed {
        if let Some(h) = v.get("headers").and_then(|h| h.as_object()) {
            for (name, value) in h {
                if d.headers.len() >= MAX_HEADERS {
                    break;
                }
                let Some(value) = value.as_str() else {
                    continue;
                };
                let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) else {
                    continue;
                };
                if forbidden_header(&name) {
                    tracing::debug!(header = %name, "authorizer may not set this header; ignored");
                    continue;
                }
                d.headers.push((name, value));
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_identity::AuthMethod;

    fn hm(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn body_shape() {
        let id = Identity {
            provider: "corp".into(),
            method: AuthMethod::Jwt,
            subject: "u1".into(),
            user: "alice".into(),
            email: Some("a@x".into()),
            groups: vec!["eng".into()],
            claims: serde_json::json!({"secret": "not sent"}),
            expires_at: None,
        };
        let headers = hm(&[
            ("x-tenant", "acme"),
            ("accept", "a"),
            ("accept", "b"),
            ("cookie", "nope"),
        ]);
        let send = vec![
            "x-tenant".to_string(),
            "accept".to_string(),
            "x-none".to_string(),
        ];
        let b = RequestBody::new(&id, "app/r", "GET", "h.example", "/p", &headers, &send);
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "identity": {"provider": "corp", "subject": "u1", "user": "alice", "email": "a@x", "groups": ["eng"]},
                "route": "app/r", "method": "GET", "host": "h.example", "path": "/p",
                "headers": {"x-tenant": "acme", "accept": "a, b"}
            })
        );
    }

    #[test]
    fn cache_control() {
        assert_eq!(cache_hint(&hm(&[])), CacheHint::Default);
        assert_eq!(
            cache_hint(&hm(&[("cache-control", "private, max-age=7")])),
            CacheHint::MaxAge(Duration::from_secs(7))
        );
        assert_eq!(
            cache_hint(&hm(&[("cache-control", "max-age=\"9\"")])),
            CacheHint::MaxAge(Duration::from_secs(9))
        );
        assert_eq!(
            cache_hint(&hm(&[("cache-control", "max-age=99999999")])),
            CacheHint::MaxAge(MAX_AGE_CAP)
        );
        assert_eq!(
            cache_hint(&hm(&[
                ("cache-control", "max-age=7"),
                ("cache-control", "No-Store")
            ])),
            CacheHint::NoStore
        );
        assert_eq!(
            cache_hint(&hm(&[("cache-control", "no-cache")])),
            CacheHint::NoStore
        );
        assert_eq!(
            cache_hint(&hm(&[("cache-control", "max-age=0")])),
            CacheHint::NoStore
        );
        assert_eq!(
            cache_hint(&hm(&[("cache-control", "max-age=x")])),
            CacheHint::NoStore
        );
        assert_eq!(
            cache_hint(&hm(&[("cache-control", "public")])),
            CacheHint::Default
        );
    }

    #[test]
    fn forbidden() {
        for n in [
            "connection",
            "transfer-encoding",
            "host",
            "x-portcullis-user",
            "te",
            "upgrade",
        ] {
            assert!(forbidden_header(&HeaderName::from_static(n)), "{n}");
        }
        for n in ["x-user", "authorization", "x-portcullisx"] {
            assert!(!forbidden_header(&HeaderName::from_static(n)), "{n}");
        }
    }

    #[test]
    fn parses_answers() {
        let d = parse_body(
            true,
            br#"{"reason":"ok","headers":{"X-Tenant":"acme","Connection":"close","x-portcullis-user":"root","bad name":"v","x-bad-value":"a\nb","x-num":5}}"#,
        );
        assert!(d.allowed);
        assert_eq!(d.reason.as_deref(), Some("ok"));
        assert_eq!(
            d.headers,
            vec![(
                HeaderName::from_static("x-tenant"),
                HeaderValue::from_static("acme")
            )]
        );
        // Deny: reason kept, headers ignored.
        let d = parse_body(false, br#"{"reason":"no","headers":{"x-a":"b"}}"#);
        assert!(!d.allowed);
        assert_eq!(d.reason.as_deref(), Some("no"));
        assert!(d.headers.is_empty());
        // Empty and non-JSON bodies keep the status' decision.
        assert!(parse_body(true, b"").allowed);
        assert!(parse_body(true, b"OK").reason.is_none());
        assert!(!parse_body(false, b"  \n").allowed);
        // Non-string reason ignored; long reason cut.
        assert!(parse_body(true, br#"{"reason":5}"#).reason.is_none());
        let long = format!(r#"{{"reason":"{}"}}"#, "x".repeat(5000));
        assert_eq!(
            parse_body(true, long.as_bytes()).reason.unwrap().len(),
            MAX_REASON
        );
    }
}
