//! The limits' text parsers: a stick table's counter as the config writes it
//! (`http_req_rate(10s)`), and a table key as the admin API, the control path and
//! `portcullis table` take it (`192.0.2.0/24`, `["192.0.2.7","acme"]`, `0x…`, `sha256:…`).

use portcullis_limits::Counter;
use portcullis_proxy::limits::Part;
use portcullis_proxy::table_keys::{key_from_text, key_to_text, parse_key, KeyText};

/// The parts a table may be keyed by, chosen by the input's first byte.
const PARTS: &[&str] = &[
    "src",
    "src/24",
    "src/64",
    "src/128",
    "principal",
    "api_key",
    "route",
    "header:x-tenant",
    "claim:org",
];

/// Input: a byte choosing the table's parts (one, or a tuple of two), then lines: a counter
/// expression, then a key's text (the rest).
///
/// Asserts: a counter that parses writes out as text that parses back equal; a key text that
/// parses is a key whose text form parses back to the same key, or for a long (hashed) key to
/// its digest (so what the API shows can be given back to it), and never panics however the
/// text is broken.
pub fn limits(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let a = PARTS[usize::from(sel & 0x0f) % PARTS.len()];
    let b = PARTS[usize::from(sel >> 4) % PARTS.len()];
    let parts: Vec<Part> = if sel & 0x80 != 0 { vec![a, b] } else { vec![a] }
        .into_iter()
        .filter_map(Part::parse)
        .collect();
    let text = String::from_utf8_lossy(rest);
    let (counter, key) = text.split_once('\n').unwrap_or((&text, ""));
    if let Ok(c) = Counter::parse(counter) {
        let again = Counter::parse(&c.to_string());
        assert_eq!(
            again.as_ref().ok(),
            Some(&c),
            "`{counter}` wrote out as `{c}`"
        );
        let _ = c.context_name();
    }
    match parse_key(&parts, key) {
        Ok(KeyText::Key(k)) if k.is_hashed() => {
            // A long key is stored as its digest: its text names the digest, which the API
            // then finds among a table's entries.
            let shown = key_to_text(&parts, &k);
            match parse_key(&parts, &shown) {
                Ok(KeyText::Hashed(d)) => assert_eq!(d, k.as_bytes(), "`{shown}`"),
                other => panic!("`{key}` shown as `{shown}` reads back as {other:?}"),
            }
        }
        Ok(KeyText::Key(k)) => {
            let shown = key_to_text(&parts, &k);
            let back = key_from_text(&parts, &shown)
                .unwrap_or_else(|e| panic!("`{key}` shown as `{shown}` does not parse: {e}"));
            assert_eq!(back, k, "`{key}` shown as `{shown}` names another key");
        }
        Ok(KeyText::Hashed(d)) => assert_eq!(d.len(), portcullis_limits::key::INLINE_LEN),
        Err(e) => assert!(!e.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_hold() {
        for case in [
            &b"\x00http_req_rate(10s)\n192.0.2.7"[..],
            b"\x01conn_cur\n192.0.2.77",
            b"\x02bytes_in_rate(1m)\n2001:db8::1",
            b"\x84gpc0\n[\"192.0.2.7\",\"acme\"]",
            b"\x07http_err_cnt\n\"0xcafe\"",
            b"\x05tags\n0xdeadbeef",
            b"\x04x\nsha256:00",
            b"\x08http_req_rate(0s)\n[1,2]",
        ] {
            limits(case);
        }
    }
}
