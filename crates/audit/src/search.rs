//! `portcullis audit search`: finds records by principal, decision, route, kind and time.
//! It reads the files in chain order and returns the matching records as they are stored
//! (chain fields included). It does not check the chain; `verify` does.

use crate::files;
use crate::record::{Decision, Kind};
use crate::Error;
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::SystemTime;

/// What to look for. Every field that is set must match.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// The principal's `user` or `subject`, exactly.
    pub principal: Option<String>,
    pub decision: Option<Decision>,
    /// The route name, or `app/route`.
    pub route: Option<String>,
    /// Records at or after this time.
    pub since: Option<SystemTime>,
    pub kind: Option<Kind>,
}

impl Filter {
    /// Whether the stored record `v` matches.
    pub fn matches(&self, v: &Value) -> bool {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        if let Some(p) = &self.principal {
            let pr = v.get("principal");
            let field = |k: &str| pr.and_then(|x| x.get(k)).and_then(Value::as_str);
            if field("user") != Some(p.as_str()) && field("subject") != Some(p.as_str()) {
                return false;
            }
        }
        if let Some(d) = self.decision {
            if v.get("decision") != Some(&serde_json::json!(d)) {
                return false;
            }
        }
        if let Some(k) = self.kind {
            if v.get("kind") != Some(&serde_json::json!(k)) {
                return false;
            }
        }
        if let Some(r) = &self.route {
            let full = match (s("app"), s("route")) {
                (Some(a), Some(rt)) => Some(format!("{a}/{rt}")),
                _ => None,
            };
            if s("route") != Some(r.as_str()) && full.as_deref() != Some(r.as_str()) {
                return false;
            }
        }
        if let Some(since) = self.since {
            match s("time").and_then(|t| humantime::parse_rfc3339(t).ok()) {
                Some(t) if t >= since => {}
                _ => return false,
            }
        }
        true
    }
}

/// The records in `paths` (files in any order, or directories) that match `f`, oldest first.
/// A torn final line (no newline) is skipped; any other line that is not a JSON object is an
/// error.
pub fn search(paths: &[PathBuf], f: &Filter) -> Result<Vec<Value>, Error> {
    let mut out = Vec::new();
    for path in files::expand(paths)? {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut line = 0;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::io(&path, e))?;
            if n == 0 {
                break;
            }
            line += 1;
            if buf.pop() != Some(b'\n') {
                break;
            }
            let v: Value = match serde_json::from_slice(&buf) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return Err(Error::Corrupt {
                        file: path.clone(),
                        line,
                        reason: "not a JSON object".into(),
                    })
                }
            };
            if f.matches(&v) {
                out.push(v);
            }
        }
    }
    Ok(out)
}

/// Parses `--since`: a duration back from now (`1h`, `30m`, `2days`), or a time
/// (`2024-05-01T12:00:00Z`).
pub fn parse_since(s: &str) -> Result<SystemTime, Error> {
    let t = s.trim();
    let bad = |reason: String| Error::Since {
        input: s.to_string(),
        reason,
    };
    if let Ok(d) = humantime::parse_duration(t) {
        return SystemTime::now()
            .checked_sub(d)
            .ok_or_else(|| bad("too far back".into()));
    }
    humantime::parse_rfc3339_weak(t).map_err(|_| {
        bad("write a duration like `1h` or `30m`, or a time like `2024-05-01T12:00:00Z`".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    fn stored() -> Value {
        json!({
            "kind": "decision", "time": "2024-05-01T12:00:00.000Z", "seq": 7,
            "app": "billing", "route": "api", "decision": "deny",
            "principal": {"user": "alice", "provider": "corp", "subject": "u-1"}
        })
    }

    #[test]
    fn every_set_field_must_match() {
        let v = stored();
        assert!(Filter::default().matches(&v));
        let f = |f: Filter| f.matches(&v);
        assert!(f(Filter {
            principal: Some("alice".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            principal: Some("u-1".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            principal: Some("bob".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            decision: Some(Decision::Deny),
            kind: Some(Kind::Decision),
            route: Some("billing/api".into()),
            ..Filter::default()
        }));
        assert!(f(Filter {
            route: Some("api".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            decision: Some(Decision::WouldDeny),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            kind: Some(Kind::Admin),
            ..Filter::default()
        }));
        let noon = UNIX_EPOCH + Duration::from_secs(1_714_564_800);
        assert!(f(Filter {
            since: Some(noon),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            since: Some(noon + Duration::from_millis(1)),
            ..Filter::default()
        }));
    }

    #[test]
    fn since_takes_durations_and_times() {
        let t = parse_since("1h").unwrap();
        let ago = SystemTime::now().duration_since(t).unwrap();
        assert!(ago >= Duration::from_secs(3600) && ago < Duration::from_secs(3700));
        assert_eq!(
            parse_since("2024-05-01T12:00:00Z").unwrap(),
            UNIX_EPOCH + Duration::from_secs(1_714_564_800)
        );
        let e = parse_since("yesterday-ish").unwrap_err();
        assert!(e.to_string().contains("`1h`"), "{e}");
    }
}
