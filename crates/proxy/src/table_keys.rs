//! Stick-table keys as text, both ways, and an entry as JSON: what the admin API, the
//! control path and the `portcullis table` command show and accept.
//!
//! # Keys as text
//!
//! A table's key is bytes built by [`crate::limits::build_key`] from its parts. Its text form,
//! both in answers and in requests ([`key_to_text`], [`key_from_text`]):
//!
//! | key | text |
//! |---|---|
//! | `src` | the address: `192.0.2.7`, `2001:db8::1` |
//! | `src/24`, `src/64` | the prefix: `192.0.2.0/24`, `2001:db8:1:2::/64`. An address is accepted too, and masked (`192.0.2.77` → `192.0.2.0/24`). An IPv4 client under a prefix longer than 32 is its address. |
//! | `principal`, `api_key`, `route`, `header:…`, `claim:…` | the text itself: `dev/alice`, `acme` |
//! | a tuple (`[src, "header:x-tenant"]`) | a JSON array with one string per part: `["192.0.2.7","acme"]` |
//! | a key longer than 256 bytes (stored hashed) | `sha256:` and the hex of the stored digest |
//! | bytes that are none of the above (a header value that is not UTF-8, a control character) | `0x` and the hex of the stored bytes |
//!
//! So that a text key is never mistaken for one of the other forms, a single text part that
//! is empty or starts with `"`, `[`, `0x` or `sha256:` is written as a JSON string
//! (`"0xcafe"`), and a JSON string is accepted for any single part. A `sha256:` key names an
//! entry already in the table (it is found among the table's entries: a hashed key cannot be
//! rebuilt from its digest); to create an entry for a long key, give its full text.

use crate::limits::{Part, TableRt, TUPLE_SEP};
use portcullis_limits::{Key, Kind, Snapshot};
use serde_json::{json, Map, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// The most entries a table may hold for a `sha256:` key to be looked up in it (the lookup
/// scans the whole table).
pub const HASHED_SCAN_MAX: usize = 100_000;

// ---------------------------------------------------------------------------------------------
// Keys as text
// ---------------------------------------------------------------------------------------------

/// A key as given in text: a key, or the digest of a hashed key (see [`table_key`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyText {
    Key(Key),
    Hashed(Vec<u8>),
}

/// The text form of `key`, a key of a table keyed by `parts`. See the [module docs](self).
pub fn key_to_text(parts: &[Part], key: &Key) -> String {
    let bytes = key.as_bytes();
    if key.is_hashed() {
        return format!("sha256:{}", hex(bytes));
    }
    let mut texts = Vec::with_capacity(parts.len());
    if !decode(parts, bytes, &mut texts) {
        return format!("0x{}", hex(bytes));
    }
    match (parts, texts.as_slice()) {
        ([Part::Src | Part::SrcMask(_)], [t]) => t.clone(),
        ([_], [t]) if reserved(t) => Value::from(t.as_str()).to_string(),
        ([_], [t]) => t.clone(),
        _ => Value::from(texts).to_string(),
    }
}

/// The key of a table keyed by `parts` that `text` names. See the [module docs](self). A
/// `sha256:` key is an error here: look it up in its table with [`table_key`].
pub fn key_from_text(parts: &[Part], text: &str) -> Result<Key, String> {
    match parse_key(parts, text)? {
        KeyText::Key(k) => Ok(k),
        KeyText::Hashed(_) => Err(
            "a `sha256:` key names an entry already in a table; give the key's full text to \
             make one"
                .into(),
        ),
    }
}

/// Parses `text` as a key of a table keyed by `parts`: a key, or a hashed key's digest.
pub fn parse_key(parts: &[Part], text: &str) -> Result<KeyText, String> {
    if let Some(h) = text.strip_prefix("sha256:") {
        let d = unhex(h)
            .filter(|d| d.len() == portcullis_limits::key::INLINE_LEN)
            .ok_or_else(|| {
                format!(
                    "`{}` is not a hashed key: `sha256:` and {} hex digits",
                    shorten(text),
                    2 * portcullis_limits::key::INLINE_LEN
                )
            })?;
        return Ok(KeyText::Hashed(d));
    }
    if let Some(h) = text.strip_prefix("0x") {
        let b = unhex(h).ok_or_else(|| {
            format!(
                "`{}` is not hex bytes; to give a text starting with `0x`, quote it as a JSON \
                 string: `\"{}\"`",
                shorten(text),
                shorten(text)
            )
        })?;
        return Ok(KeyText::Key(Key::new(&b)));
    }
    let mut buf = Vec::new();
    match parts {
        [part] => {
            let value = if text.starts_with('"') {
                serde_json::from_str::<String>(text)
                    .map_err(|e| format!("`{}` is not a JSON string: {e}", shorten(text)))?
            } else if text.starts_with('[') {
                match serde_json::from_str::<Vec<String>>(text) {
                    Ok(v) if v.len() == 1 => v.into_iter().next().unwrap_or_default(),
                    _ => {
                        return Err(format!(
                            "`{}`: this table's key has one part ({}); give its text, or a JSON \
                             string to quote it",
                            shorten(text),
                            describe(parts)
                        ))
                    }
                }
            } else {
                text.to_string()
            };
            encode(part, &value, false, &mut buf)?;
        }
        _ => {
            let values: Vec<String> = serde_json::from_str(text)
                .ok()
                .filter(|v: &Vec<String>| v.len() == parts.len())
                .ok_or_else(|| {
                    format!(
                        "`{}`: this table's key is a tuple ({}); give a JSON array of {} \
                         strings, like {}",
                        shorten(text),
                        describe(parts),
                        parts.len(),
                        example(parts)
                    )
                })?;
            for (i, (p, v)) in parts.iter().zip(&values).enumerate() {
                if i > 0 {
                    buf.push(TUPLE_SEP);
                }
                encode(p, v, true, &mut buf)?;
            }
        }
    }
    Ok(KeyText::Key(Key::new(&buf)))
}

/// Whether a single text part must be quoted to be read back as itself.
fn reserved(t: &str) -> bool {
    t.is_empty()
        || t.starts_with('"')
        || t.starts_with('[')
        || t.starts_with("0x")
        || t.starts_with("sha256:")
}

/// Decodes `bytes` as a key of `parts`, pushing each part's text; false when the bytes are
/// not such a key. An address part is 4 or 16 bytes; a text part is UTF-8 without control
/// characters (so it holds no separator). Every decoding re-encodes to the same bytes.
fn decode(parts: &[Part], bytes: &[u8], out: &mut Vec<String>) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return bytes.is_empty();
    };
    let last = rest.is_empty();
    match first {
        Part::Src | Part::SrcMask(_) => {
            for len in [16, 4] {
                if bytes.len() < len {
                    continue;
                }
                let (head, tail) = bytes.split_at(len);
                let tail = match (last, tail.split_first()) {
                    (true, None) => tail,
                    (false, Some((&TUPLE_SEP, t))) => t,
                    _ => continue,
                };
                if let Some(text) = ip_text(first, head) {
                    out.push(text);
                    if decode(rest, tail, out) {
                        return true;
                    }
                    out.pop();
                }
            }
            false
        }
        _ => {
            let (head, tail) = if last {
                (bytes, &[][..])
            } else {
                match bytes.iter().position(|b| *b == TUPLE_SEP) {
                    Some(i) => (&bytes[..i], &bytes[i + 1..]),
                    None => return false,
                }
            };
            let Ok(s) = std::str::from_utf8(head) else {
                return false;
            };
            if s.chars().any(char::is_control) {
                return false;
            }
            out.push(s.to_string());
            if decode(rest, tail, out) {
                return true;
            }
            out.pop();
            false
        }
    }
}

/// An address part's text, when `b` is what `build_key` stores for it.
fn ip_text(part: &Part, b: &[u8]) -> Option<String> {
    let ip = match b.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => return None,
    };
    let full = full_bits(ip);
    let bits = match part {
        Part::SrcMask(n) => (*n).min(full),
        _ => full,
    };
    if masked(ip, bits) != ip {
        return None;
    }
    Some(if bits == full {
        ip.to_string()
    } else {
        format!("{ip}/{bits}")
    })
}

/// Appends the bytes of one part given as `text`.
fn encode(part: &Part, text: &str, tuple: bool, buf: &mut Vec<u8>) -> Result<(), String> {
    match part {
        Part::Src | Part::SrcMask(_) => {
            let (addr, len) = match text.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (text, None),
            };
            let ip: IpAddr = addr.trim().parse().map_err(|_| {
                format!(
                    "`{}` is not an IP address, like `192.0.2.7` or `2001:db8::1`",
                    shorten(text)
                )
            })?;
            // `::ffff:a.b.c.d` is the IPv4 client, as requests are keyed (`ConnInfo::new`).
            let ip = ip.to_canonical();
            let full = full_bits(ip);
            let bits = match part {
                Part::SrcMask(n) => (*n).min(full),
                _ => full,
            };
            if let Some(l) = len {
                if l.trim().parse::<u8>().ok() != Some(bits) {
                    let want = match part {
                        Part::SrcMask(n) => format!("src/{n}"),
                        _ => "src".into(),
                    };
                    return Err(format!(
                        "`{}`: this table is keyed by `{want}`: give an address, or a /{bits} \
                         prefix",
                        shorten(text)
                    ));
                }
            }
            match masked(ip, bits) {
                IpAddr::V4(a) => buf.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => buf.extend_from_slice(&a.octets()),
            }
        }
        _ => {
            if tuple && text.as_bytes().contains(&TUPLE_SEP) {
                return Err("a part of a tuple key cannot hold the byte 0x1F".into());
            }
            buf.extend_from_slice(text.as_bytes());
        }
    }
    Ok(())
}

fn full_bits(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `ip` with only its first `bits` bits kept (as `build_key` masks it).
fn masked(ip: IpAddr, bits: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(bits.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(bits.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// A key definition as the config writes it: `src, header:x-tenant`.
fn describe(parts: &[Part]) -> String {
    parts.iter().map(part_name).collect::<Vec<_>>().join(", ")
}

fn part_name(p: &Part) -> String {
    match p {
        Part::Src => "src".into(),
        Part::SrcMask(n) => format!("src/{n}"),
        Part::Principal => "principal".into(),
        Part::ApiKey => "api_key".into(),
        Part::Route => "route".into(),
        Part::Header(h) => format!("header:{h}"),
        Part::Claim(c) => format!("claim:{c}"),
    }
}

/// An example key of a tuple: `["192.0.2.7","…"]`.
fn example(parts: &[Part]) -> String {
    let v: Vec<&str> = parts
        .iter()
        .map(|p| match p {
            Part::Src => "192.0.2.7",
            Part::SrcMask(_) => "192.0.2.0/24",
            Part::Principal => "dev/alice",
            _ => "…",
        })
        .collect();
    Value::from(v).to_string()
}

/// At most 80 characters of `s`, for error messages.
pub(crate) fn shorten(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Lower-case hex of `b`.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of an even-length hex string.
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    s.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [h, l] => {
                Some((char::from(*h).to_digit(16)? * 16 + char::from(*l).to_digit(16)?) as u8)
            }
            _ => None,
        })
        .collect()
}

/// The numeric counters `t` stores, in its `store` order.
pub fn numeric(t: &TableRt) -> impl Iterator<Item = Kind> + '_ {
    t.table
        .spec()
        .store()
        .iter()
        .map(|c| c.kind())
        .filter(|k| *k != Kind::Tags)
}

/// One entry: its key as text, its counters by name (those the table stores), its tags (when
/// the table stores them) and the time until it expires unused.
pub fn entry_json(t: &TableRt, key: &Key, s: &Snapshot) -> Value {
    let counters: Map<String, Value> = numeric(t)
        .filter_map(|k| Some((k.name().to_string(), Value::from(s.get(k)?))))
        .collect();
    let mut e = json!({
        "key": key_to_text(&t.parts, key),
        "counters": counters,
    });
    if t.table.spec().stores(Kind::Tags) {
        e["tags"] = json!(s.tags);
    }
    e["expires_in_ms"] = json!(millis(s.expires_in));
    e
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
