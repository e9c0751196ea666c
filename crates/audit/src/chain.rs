//! The hash chain: the canonical form of a record, its hash, and how each record links to the
//! one before it.
//!
//! A line in an audit file is one JSON object: the fields of a [`Record`] plus `time`, `seq`,
//! `instance`, `prev_hash` and `hash`, followed by `\n`.
//!
//! **Canonical form.** UTF-8 JSON with no whitespace, object keys sorted by their UTF-8 bytes
//! (the same as Unicode code point order) at every depth, strings escaped as serde_json does
//! (only `"`, `\` and the control characters U+0000..U+001F are escaped: `\b \t \n \f \r`,
//! others as `\u00xx` with lower-case hex; everything else, including `/` and non-ASCII, is
//! written as is), integers in plain decimal, floats in their shortest round-trip form.
//!
//! **Hash.** `hash` = lower-case hex SHA-256 of the canonical form of the object *without* its
//! `hash` key (and with `prev_hash`). `prev_hash` is the previous record's `hash`, or
//! [`GENESIS`] (64 zeros) for the very first record. The line itself is the canonical form of
//! the whole object, `hash` included, so any changed byte either changes the parsed record (the
//! hash no longer matches) or makes the line non-canonical. `jq -cjS 'del(.hash)' | sha256sum`
//! reproduces the hash for records without floats or U+007F.

use crate::record::{AuthorizerNote, Decision, Kind, Principal, Record};
use crate::Error;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
#[cfg(test)]
use std::time::SystemTime;

/// `prev_hash` of the very first record: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The canonical serialization of `v` (see the module doc).
pub fn canonical(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    canonical_into(v, &mut out);
    out
}

fn canonical_into(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => canonical_object(m, None, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_into(x, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

/// An object in canonical form, leaving out the key `skip`.
fn canonical_object(m: &Map<String, Value>, skip: Option<&str>, out: &mut Vec<u8>) {
    canonical_object_at(m, skip, out);
}

/// Like `canonical_object`, and returns the offset in `out` where the key `skip` would go
/// (the start of the first key that sorts after it, or the closing brace).
fn canonical_object_at(m: &Map<String, Value>, skip: Option<&str>, out: &mut Vec<u8>) -> usize {
    let mut keys: Vec<&String> = m.keys().filter(|k| Some(k.as_str()) != skip).collect();
    keys.sort_unstable();
    out.push(b'{');
    let mut at = None;
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if at.is_none() && skip.is_some_and(|s| k.as_str() > s) {
            at = Some(out.len());
        }
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, k.as_str());
        out.push(b':');
        canonical_into(&m[k], out);
    }
    let at = at.unwrap_or(out.len());
    out.push(b'}');
    at
}

fn write_scalar(v: &Value, out: &mut Vec<u8>) {
    // Writing a scalar into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of a SHA-256 digest, without allocating.
fn hex32(bytes: &[u8]) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().take(32).enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 15) as usize];
    }
    out
}

/// `bare` (a canonical object without `hash`) with `"hash":"<hash>"` inserted at `at`, the
/// offset `canonical_object_at` gave for that key: the canonical form of the whole object.
fn splice_hash(bare: &[u8], at: usize, hash: &str, line: &mut Vec<u8>) {
    line.reserve(bare.len() + hash.len() + 12);
    line.extend_from_slice(&bare[..at]);
    let before_close = at == bare.len() - 1;
    if before_close && at > 1 {
        line.push(b',');
    }
    line.extend_from_slice(b"\"hash\":\"");
    line.extend_from_slice(hash.as_bytes());
    line.push(b'"');
    if !before_close {
        line.push(b',');
    }
    line.extend_from_slice(&bare[at..]);
}

/// The hash of a record object: hex SHA-256 over its canonical form without the `hash` key.
pub fn record_hash(obj: &Map<String, Value>) -> String {
    let mut out = Vec::with_capacity(512);
    canonical_object(obj, Some("hash"), &mut out);
    hex(&Sha256::digest(out))
}

/// The position of the writer in the chain. Cheap to clone (the writer keeps a copy to roll
/// back to when a write fails): the hash is inline and the instance name shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chain {
    pub next_seq: u64,
    /// The lower-case hex `hash` of the last record (ASCII, so always valid UTF-8).
    prev_hash: [u8; 64],
    instance: Arc<str>,
}

impl Chain {
    pub fn new(instance: &str) -> Chain {
        let mut prev_hash = [0u8; 64];
        prev_hash.copy_from_slice(GENESIS.as_bytes());
        Chain {
            next_seq: 1,
            prev_hash,
            instance: instance.into(),
        }
    }

    /// The `hash` of the last record sealed ([`GENESIS`] before the first one).
    pub fn prev_hash(&self) -> &str {
        // Only ever filled from `GENESIS`, `hex32` or a checked 64-digit hex string.
        std::str::from_utf8(&self.prev_hash).unwrap_or(GENESIS)
    }

    /// Continues the chain after a record whose hash is `hash` (64 hex digits, as
    /// `check_line` accepts them).
    pub fn set_prev_hash(&mut self, hash: &str) {
        if hash.len() == 64 && hash.is_ascii() {
            self.prev_hash.copy_from_slice(hash.as_bytes());
        }
    }

    /// Adds the chain fields to `rec`, hashes it, advances the chain, and returns the seq and
    /// the line (with its `\n`).
    #[cfg(test)]
    pub fn seal(&mut self, rec: &Record, now: SystemTime) -> Result<(u64, Vec<u8>), Error> {
        let time = humantime::format_rfc3339_millis(now).to_string();
        let mut line = Vec::new();
        let seq = self.seal_into(rec, &time, &mut line)?;
        Ok((seq, line))
    }

    /// Adds the chain fields to `rec` (`time` is the seal time, RFC 3339 with milliseconds),
    /// hashes it, advances the chain, and appends the line (with its `\n`) to `out`. Returns
    /// the record's seq. On an error nothing is appended and the chain does not move.
    pub fn seal_into(&mut self, rec: &Record, time: &str, out: &mut Vec<u8>) -> Result<u64, Error> {
        if rec.detail.is_none() {
            return Ok(self.seal_direct(rec, time, out));
        }
        self.seal_general(rec, time, out)
    }

    /// The fast path for records without free-form `detail` (every request's record): the
    /// fields are serialized straight from two structs whose fields are declared in sorted
    /// key order, the keys before `hash` and the keys after it, which gives the canonical
    /// form without building a JSON tree first, and serializes each field once. A test checks
    /// it gives the same bytes as `seal_general`.
    fn seal_direct(&mut self, rec: &Record, time: &str, out: &mut Vec<u8>) -> u64 {
        let seq = self.next_seq;
        let head = Head {
            app: rec.app.as_deref(),
            authorizer: rec.authorizer.as_ref().map(|a| SortedAuthorizer {
                cached: a.cached,
                name: &a.name,
                result: &a.result,
            }),
            client_ip: rec.client_ip.as_deref(),
            decision: rec.decision,
        };
        let tail = Tail {
            host: rec.host.as_deref(),
            instance: &self.instance,
            kind: rec.kind,
            latency_us: rec.latency_us,
            method: rec.method.as_deref(),
            path: rec.path.as_deref(),
            prev_hash: self.prev_hash(),
            principal: rec.principal.as_ref().map(|p| SortedPrincipal {
                groups: &p.groups,
                provider: &p.provider,
                subject: &p.subject,
                user: &p.user,
            }),
            query_keys: &rec.query_keys,
            reasons: &rec.reasons,
            request_id: rec.request_id.as_deref(),
            route: rec.route.as_deref(),
            seq,
            time,
        };
        let start = out.len();
        // Serializing plain data into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &head);
        out.pop(); // the head's `}`
        if out.len() > start + 1 {
            out.push(b',');
        }
        // `{` + the head's fields and a comma if any; the tail's `{` is where `hash` goes.
        let tail_at = out.len();
        let _ = serde_json::to_writer(&mut *out, &tail);
        let mut h = Sha256::new();
        h.update(&out[start..tail_at]);
        h.update(&out[tail_at + 1..]);
        let hash = hex32(&h.finalize());
        let mut field = [0u8; 64 + 10];
        field[..8].copy_from_slice(b"\"hash\":\"");
        field[8..72].copy_from_slice(&hash);
        field[72..].copy_from_slice(b"\",");
        out.splice(tail_at..tail_at + 1, field);
        out.push(b'\n');
        self.next_seq = seq + 1;
        self.prev_hash = hash;
        seq
    }

    fn seal_general(&mut self, rec: &Record, time: &str, out: &mut Vec<u8>) -> Result<u64, Error> {
        let mut obj = match serde_json::to_value(rec) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(Error::Write("a record must be a JSON object".into())),
            Err(e) => return Err(Error::Write(format!("cannot serialize the record: {e}"))),
        };
        let seq = self.next_seq;
        obj.insert("time".into(), Value::String(time.to_string()));
        obj.insert("seq".into(), Value::from(seq));
        obj.insert("instance".into(), Value::String(self.instance.to_string()));
        obj.insert(
            "prev_hash".into(),
            Value::String(self.prev_hash().to_string()),
        );
        // One canonical pass: hash the form without `hash`, then splice `"hash":"…"` in at
        // its sorted place to get the line (the same bytes as serializing the whole object).
        let mut bare = Vec::with_capacity(768);
        let at = canonical_object_at(&obj, Some("hash"), &mut bare);
        let hash = hex32(&Sha256::digest(&bare));
        // ASCII hex digits.
        splice_hash(
            &bare,
            at,
            std::str::from_utf8(&hash).unwrap_or(GENESIS),
            out,
        );
        out.push(b'\n');
        self.next_seq = seq + 1;
        self.prev_hash = hash;
        Ok(seq)
    }
}

/// The keys of a record that sort before `hash`, declared in sorted order (see
/// `Chain::seal_direct`). With [`Tail`], keep it in step with `Record`, `Principal` and
/// `AuthorizerNote`.
#[derive(Serialize)]
struct Head<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    app: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorizer: Option<SortedAuthorizer<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decision: Option<Decision>,
}

/// The keys of a record (and its chain fields) that sort after `hash`, in sorted order.
#[derive(Serialize)]
struct Tail<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    instance: &'a str,
    kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    prev_hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    principal: Option<SortedPrincipal<'a>>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    query_keys: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    reasons: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
    seq: u64,
    time: &'a str,
}

#[derive(Serialize)]
struct SortedPrincipal<'a> {
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
    provider: &'a str,
    subject: &'a str,
    user: &'a str,
}

#[derive(Serialize)]
struct SortedAuthorizer<'a> {
    cached: bool,
    name: &'a str,
    result: &'a str,
}

// The sorted views must cover every field; these fail to compile when a field is added.
#[allow(dead_code)]
fn _views_cover_every_field(r: Record, p: Principal, a: AuthorizerNote) {
    let Record {
        kind: _,
        request_id: _,
        app: _,
        route: _,
        principal: _,
        client_ip: _,
        method: _,
        host: _,
        path: _,
        query_keys: _,
        decision: _,
        reasons: _,
        authorizer: _,
        latency_us: _,
        detail: _,
    } = r;
    let Principal {
        user: _,
        provider: _,
        groups: _,
        subject: _,
    } = p;
    let AuthorizerNote {
        name: _,
        result: _,
        cached: _,
    } = a;
}

/// The chain fields of one checked line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub seq: u64,
    pub prev_hash: String,
    pub hash: String,
}

/// What is wrong with a line, and the seq it claims if it could be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BadLine {
    pub seq: Option<u64>,
    pub reason: String,
}

/// Parses one line (without its `\n`) and checks its own integrity: a JSON object with `seq`,
/// `prev_hash` and `hash`, in canonical form, whose hash matches. Linking to the previous
/// record is the caller's job.
pub(crate) fn check_line(line: &[u8]) -> Result<(Link, Map<String, Value>), BadLine> {
    let bad = |seq, reason: &str| BadLine {
        seq,
        reason: reason.to_string(),
    };
    let obj = match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(bad(None, "not a JSON object (record modified)")),
        Err(_) => return Err(bad(None, "not valid JSON (record modified or corrupted)")),
    };
    let seq = obj.get("seq").and_then(Value::as_u64);
    let Some(seq_v) = seq else {
        return Err(bad(None, "no `seq` field (record modified)"));
    };
    let get_hex = |k: &str| {
        obj.get(k)
            .and_then(Value::as_str)
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string)
    };
    let Some(prev_hash) = get_hex("prev_hash") else {
        return Err(bad(
            seq,
            "missing or malformed `prev_hash` (record modified)",
        ));
    };
    let Some(hash) = get_hex("hash") else {
        return Err(bad(seq, "missing or malformed `hash` (record modified)"));
    };
    if record_hash(&obj) != hash {
        return Err(bad(seq, "hash mismatch (record modified)"));
    }
    let mut again = Vec::with_capacity(line.len());
    canonical_object(&obj, None, &mut again);
    if again != line {
        return Err(bad(seq, "not in canonical form (record modified)"));
    }
    Ok((
        Link {
            seq: seq_v,
            prev_hash,
            hash,
        },
        obj,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Decision, Kind};
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn canonical_sorts_keys_at_every_depth_without_whitespace() {
        let v = json!({"b": 1, "a": {"z": [1, {"y": "é/\n", "x": null}], "c": true}, "A": -2.5});
        assert_eq!(
            String::from_utf8(canonical(&v)).unwrap(),
            r#"{"A":-2.5,"a":{"c":true,"z":[1,{"x":null,"y":"é/\n"}]},"b":1}"#
        );
    }

    #[test]
    fn spliced_hash_matches_the_canonical_form_of_the_whole_record() {
        let mut c = Chain::new("i");
        let (_, line) = c.seal(&rec(), UNIX_EPOCH + Duration::from_secs(7)).unwrap();
        let v: Value = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
        let mut whole = canonical(&v);
        whole.push(b'\n');
        assert_eq!(line, whole);
        // `hash` first, last and alone among the keys.
        for m in [json!({"z": 1}), json!({"a": 1}), json!({})] {
            let m = m.as_object().unwrap().clone();
            let mut bare = Vec::new();
            let at = canonical_object_at(&m, Some("hash"), &mut bare);
            let mut with = m.clone();
            with.insert("hash".into(), json!("h"));
            let expect = canonical(&Value::Object(with));
            let mut got = Vec::new();
            splice_hash(&bare, at, "h", &mut got);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(expect).unwrap()
            );
        }
    }

    #[test]
    fn direct_and_general_seals_write_the_same_bytes() {
        let full = Record {
            kind: Kind::Decision,
            request_id: Some("r\"1\\\u{1}é/".into()),
            app: Some("app".into()),
            route: Some("route".into()),
            principal: Some(Principal {
                user: "alice".into(),
                provider: "corp".into(),
                groups: vec!["eng".into(), "ops\n".into()],
                subject: "s".into(),
            }),
            client_ip: Some("::1".into()),
            method: Some("GET".into()),
            host: Some("h".into()),
            path: Some("/p?\u{7f}".into()),
            query_keys: vec!["a".into(), "b".into()],
            decision: Some(Decision::WouldDeny),
            reasons: vec!["policy:x".into()],
            authorizer: Some(AuthorizerNote {
                name: "authz".into(),
                result: "allow".into(),
                cached: true,
            }),
            latency_us: Some(u64::MAX),
            detail: None,
        };
        let no_groups = Record {
            principal: Some(Principal {
                groups: vec![],
                ..full.principal.clone().unwrap()
            }),
            ..full.clone()
        };
        let plain = Record {
            detail: None,
            ..rec()
        };
        for r in [full, no_groups, plain, Record::default()] {
            let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
            let mut a = Chain::new("inst\"x");
            let mut b = a.clone();
            for _ in 0..2 {
                let time = humantime::format_rfc3339_millis(now).to_string();
                let (mut la, mut lb) = (b"x".to_vec(), b"x".to_vec());
                let sa = a.seal_direct(&r, &time, &mut la);
                let sb = b.seal_general(&r, &time, &mut lb).unwrap();
                assert_eq!(sa, sb);
                assert_eq!(
                    String::from_utf8(la).unwrap(),
                    String::from_utf8(lb).unwrap()
                );
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
        assert_eq!(GENESIS.len(), 64);
    }

    fn rec() -> Record {
        Record {
            kind: Kind::Decision,
            decision: Some(Decision::Allow),
            detail: Some(json!({"ratio": 0.1, "n": 3})),
            ..Record::default()
        }
    }

    #[test]
    fn sealed_records_link_and_check() {
        let mut c = Chain::new("i-1");
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let (s1, l1) = c.seal(&rec(), now).unwrap();
        let (s2, l2) = c.seal(&rec(), now).unwrap();
        assert_eq!((s1, s2), (1, 2));
        assert!(l1.ends_with(b"\n"));
        let (a, obj) = check_line(&l1[..l1.len() - 1]).unwrap();
        let (b, _) = check_line(&l2[..l2.len() - 1]).unwrap();
        assert_eq!(a.prev_hash, GENESIS);
        assert_eq!(b.prev_hash, a.hash);
        assert_eq!(c.prev_hash(), b.hash);
        assert_eq!(obj["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(obj["instance"], "i-1");
    }

    #[test]
    fn check_line_finds_changes() {
        let mut c = Chain::new("i");
        let (_, l) = c.seal(&rec(), SystemTime::now()).unwrap();
        let line = &l[..l.len() - 1];
        let text = String::from_utf8(line.to_vec()).unwrap();

        let changed = text.replace("\"allow\"", "\"deny\"");
        let e = check_line(changed.as_bytes()).unwrap_err();
        assert_eq!(e.seq, Some(1));
        assert!(e.reason.contains("hash mismatch"), "{}", e.reason);

        // Same value, different bytes: an escaped letter.
        let escaped = text.replace("\"allow\"", "\"\\u0061llow\"");
        let e = check_line(escaped.as_bytes()).unwrap_err();
        assert!(e.reason.contains("canonical"), "{}", e.reason);

        let e = check_line(&line[..line.len() - 2]).unwrap_err();
        assert_eq!(e.seq, None);
    }
}
