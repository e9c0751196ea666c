//! Upstream header templates: `{identity.user}`, `{identity.email}`, `{identity.groups}`
//! (comma-separated), `{identity.provider}`, `{identity.subject}` and `{claims.<path>}`.
//!
//! Rendering is lossless. An origin reads these headers plainly: it trims the optional
//! whitespace around a header value, splits lists such as `X-Groups` on `,`, and compares
//! bytes. Such a reading must never give another user or another set of groups than the one
//! portcullis verified, so every *interpolated* value is percent-encoded where a header
//! cannot carry it exactly:
//!
//! - `%` becomes `%25`, so an encoded value never reads as a different encoded value
//!   (`a%00b` and `a\0b` stay distinct);
//! - `,` becomes `%2C`, so one group `eng,admins` is not the two groups `eng` and `admins`;
//! - control characters (NUL, CR, LF, tab, DEL, ...) and every byte of a non-ASCII character
//!   become `%XX` of their UTF-8 bytes, in upper-case hex: they could not be sent, would be
//!   dropped (`ad\0min` read as `admin`), or would be read differently by different parsers;
//! - a space at either end of a value becomes `%20` (a tab is always `%09`), because header
//!   parsers trim it (` admin` read as `admin`). Inner spaces stay: `Alice Smith` is unchanged.
//!
//! `{identity.groups}` and claim arrays join their encoded elements with `,`. Ordinary values
//! (`alice`, `a@x.io`, `eng`) come out unchanged. The literal text of the template, which comes
//! from the configuration, is copied as is.

use crate::{claims, Identity};
use std::fmt::Write;

/// Renders template `t` for `id` into one `String`.
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
            "identity.user" => encode(&mut out, &id.user),
            "identity.email" => encode(&mut out, id.email.as_deref().unwrap_or("")),
            "identity.groups" => {
                for (n, g) in id.groups.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    encode(&mut out, g);
                }
            }
            "identity.provider" => encode(&mut out, &id.provider),
            "identity.subject" => encode(&mut out, &id.subject),
            v => {
                if let Some(path) = v.strip_prefix("claims.") {
                    match claims::lookup(&id.claims, path) {
                        Some(serde_json::Value::Array(a)) => {
                            for (n, x) in a.iter().enumerate() {
                                if n > 0 {
                                    out.push(',');
                                }
                                encode_json(&mut out, x);
                            }
                        }
                        Some(other) => encode_json(&mut out, other),
                        None => {}
                    }
                }
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Appends `s` to `out`, encoded.
fn encode(out: &mut String, s: &str) {
    let mut e = Encoder::new(out);
    e.push_str(s);
    e.finish();
}

/// Appends a claim value, encoded: a string as itself, anything else as its JSON text
/// (written straight into `out`, without an intermediate string).
fn encode_json(out: &mut String, v: &serde_json::Value) {
    let mut e = Encoder::new(out);
    match v {
        serde_json::Value::String(s) => e.push_str(s),
        other => {
            // Writing into a String cannot fail.
            let _ = write!(e, "{other}");
        }
    }
    e.finish();
}

/// Encodes one value into `out` as it is written. Spaces are held back until the next other
/// character (or the end) shows whether they are inner spaces or at an edge of the value.
struct Encoder<'a> {
    out: &'a mut String,
    /// Whether anything other than a space has been written.
    started: bool,
    /// Spaces seen and not yet written.
    spaces: usize,
}

impl<'a> Encoder<'a> {
    fn new(out: &'a mut String) -> Self {
        Encoder {
            out,
            started: false,
            spaces: 0,
        }
    }

    fn push_str(&mut self, s: &str) {
        for b in s.bytes() {
            self.push_byte(b);
        }
    }

    fn push_byte(&mut self, b: u8) {
        if b == b' ' {
            self.spaces += 1;
            return;
        }
        if self.spaces > 0 {
            let space = if self.started { " " } else { "%20" };
            for _ in 0..self.spaces {
                self.out.push_str(space);
            }
            self.spaces = 0;
        }
        self.started = true;
        if b == b'%' || b == b',' || b.is_ascii_control() || !b.is_ascii() {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            self.out.push('%');
            self.out.push(HEX[usize::from(b >> 4)] as char);
            self.out.push(HEX[usize::from(b & 0xF)] as char);
        } else {
            self.out.push(b as char);
        }
    }

    /// Writes trailing spaces (or a value made only of spaces) encoded.
    fn finish(self) {
        for _ in 0..self.spaces {
            self.out.push_str("%20");
        }
    }
}

impl Write for Encoder<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push_str(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthMethod;
    use serde_json::json;

    fn identity(user: &str, groups: &[&str], claims: serde_json::Value) -> Identity {
        Identity {
            provider: "corp".into(),
            method: AuthMethod::Jwt,
            subject: "u1".into(),
            user: user.into(),
            email: Some("a@x.io".into()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            claims,
            expires_at: None,
        }
    }

    /// Percent-decodes `s` (what a careful origin would do with one value).
    fn decode(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    /// The groups an origin reads from a rendered `{identity.groups}`: split on `,`, each
    /// element trimmed as header list parsers do.
    fn plain_groups(s: &str) -> Vec<&str> {
        if s.is_empty() {
            return Vec::new();
        }
        s.split(',').map(|g| g.trim_matches([' ', '\t'])).collect()
    }

    #[test]
    fn renders_identity_and_claims() {
        let id = identity(
            "alice",
            &["eng", "ops"],
            json!({"tenant": {"id": "t-9"}, "n": 3, "ok": true, "roles": ["a", "b"]}),
        );
        assert_eq!(
            render("{identity.user} <{identity.email}>", &id),
            "alice <a@x.io>"
        );
        assert_eq!(render("{identity.groups}", &id), "eng,ops");
        assert_eq!(render("{claims.tenant.id}", &id), "t-9");
        assert_eq!(render("n={claims.n}", &id), "n=3");
        assert_eq!(render("{claims.ok}", &id), "true");
        assert_eq!(render("{claims.roles}", &id), "a,b");
        assert_eq!(render("{claims.missing}", &id), "");
        assert_eq!(
            render("{identity.provider}:{identity.subject}", &id),
            "corp:u1"
        );
        // Unknown variables render as nothing; an unclosed brace is literal text.
        assert_eq!(render("[{nope}] {identity.user", &id), "[] {identity.user");
    }

    #[test]
    fn ordinary_values_are_unchanged() {
        let id = identity(
            "Alice Smith",
            &["eng", "team-a_b.c~d", "role:admin/read"],
            json!({}),
        );
        assert_eq!(render("{identity.user}", &id), "Alice Smith");
        assert_eq!(render("{identity.email}", &id), "a@x.io");
        assert_eq!(
            render("{identity.groups}", &id),
            "eng,team-a_b.c~d,role:admin/read"
        );
    }

    #[test]
    fn values_that_a_header_cannot_carry_exactly_are_encoded() {
        let cases = [
            ("ad\0min", "ad%00min"),
            ("t-9\r\nX-Evil: 1", "t-9%0D%0AX-Evil: 1"),
            ("a\tb", "a%09b"),
            ("del\x7f", "del%7F"),
            ("100%", "100%25"),
            ("a%00b", "a%2500b"),
            ("eng,admins", "eng%2Cadmins"),
            (" admin", "%20admin"),
            ("admin  ", "admin%20%20"),
            ("\tadmin", "%09admin"),
            ("  ", "%20%20"),
            ("a  b", "a  b"),
            ("José", "Jos%C3%A9"),
            ("日本", "%E6%97%A5%E6%9C%AC"),
            ("\u{85}", "%C2%85"),
            ("", ""),
        ];
        for (raw, want) in cases {
            let id = identity(raw, &[raw], json!({ "c": raw, "a": [raw, raw] }));
            assert_eq!(render("{identity.user}", &id), want, "user {raw:?}");
            assert_eq!(render("{identity.groups}", &id), want, "groups {raw:?}");
            assert_eq!(render("{claims.c}", &id), want, "claim {raw:?}");
            assert_eq!(
                render("{claims.a}", &id),
                format!("{want},{want}"),
                "claim array {raw:?}"
            );
            // Every rendered value is a valid header value with nothing to trim, and
            // decodes back to exactly what was verified.
            let got = render("{identity.user}", &id);
            assert!(http::HeaderValue::from_str(&got).is_ok(), "{got:?}");
            assert_eq!(got.trim(), got, "{raw:?}");
            assert_eq!(decode(&got), raw.as_bytes(), "{raw:?}");
        }
    }

    #[test]
    fn non_string_claims_are_encoded_as_json() {
        let id = identity(
            "u",
            &[],
            json!({"o": {"a": 1, "b": "x,y"}, "n": null, "mixed": ["a,b", 2, ["c", "d"]]}),
        );
        assert_eq!(render("{claims.o}", &id), "{\"a\":1%2C\"b\":\"x%2Cy\"}");
        assert_eq!(render("{claims.n}", &id), "null");
        assert_eq!(render("{claims.mixed}", &id), "a%2Cb,2,[\"c\"%2C\"d\"]");
    }

    #[test]
    fn literal_template_text_is_kept() {
        let id = identity("a,b", &[], json!({}));
        assert_eq!(render("x, y % {identity.user} ,", &id), "x, y % a%2Cb ,");
    }

    /// Distinct identities never render to the same header, nor to the same plain reading.
    #[test]
    fn rendering_is_injective_on_tricky_pairs() {
        let users = [
            ("ad\0min", "admin"),
            ("a%00b", "a\0b"),
            (" admin", "admin"),
            ("admin ", "admin"),
            ("admin\t", "admin"),
            ("ad\r\nmin", "admin"),
            ("%61dmin", "admin"),
            ("a%2Cb", "a,b"),
            ("admin\u{200b}", "admin"),
            ("ａdmin", "admin"),
        ];
        for (a, b) in users {
            let (ra, rb) = (
                render("{identity.user}", &identity(a, &[], json!({}))),
                render("{identity.user}", &identity(b, &[], json!({}))),
            );
            assert_ne!(ra, rb, "users {a:?} and {b:?}");
            assert_ne!(ra.trim(), rb.trim(), "users {a:?} and {b:?}");
            assert_ne!(decode(&ra), decode(&rb), "users {a:?} and {b:?}");
        }

        let groups: [(&[&str], &[&str]); 6] = [
            (&["eng,admins"], &["eng", "admins"]),
            (&["eng", " admins"], &["eng", "admins"]),
            (&["eng%2Cadmins"], &["eng,admins"]),
            (&["eng\0", "admins"], &["eng", "admins"]),
            (&["a,b", "c"], &["a", "b,c"]),
            (&["admins"], &["admins\n"]),
        ];
        for (a, b) in groups {
            let (ra, rb) = (
                render("{identity.groups}", &identity("u", a, json!({}))),
                render("{identity.groups}", &identity("u", b, json!({}))),
            );
            assert_ne!(ra, rb, "groups {a:?} and {b:?}");
            assert_ne!(
                plain_groups(&ra),
                plain_groups(&rb),
                "groups {a:?} and {b:?}"
            );
            // Each side reads back, element by element, as exactly its own groups.
            for (r, want) in [(&ra, a), (&rb, b)] {
                let read: Vec<Vec<u8>> = plain_groups(r).iter().map(|g| decode(g)).collect();
                let want: Vec<Vec<u8>> = want.iter().map(|g| g.as_bytes().to_vec()).collect();
                assert_eq!(read, want, "{r:?}");
            }
        }
        // A group that contains a comma is one group to a plain reader.
        let r = render(
            "{identity.groups}",
            &identity("u", &["eng,admins"], json!({})),
        );
        assert_eq!(plain_groups(&r), ["eng%2Cadmins"]);
    }
}
