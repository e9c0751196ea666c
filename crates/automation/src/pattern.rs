//! Patterns for matching event types, subjects and data values.
//!
//! * `*` matches any run of characters, including none and including `/` and `.`:
//!   `dev.portcullis.server.*`, `billing/*`, `*-standby`, `*`.
//! * A leading `!` negates the rest: `!billing/*` matches everything outside `billing/`.
//! * `\*`, `\\` and a leading `\!` stand for a literal `*`, `\` and `!`.
//! * Matching is exact and case-sensitive otherwise.
//!
//! A value the event does not have (no subject, a missing or `null` data field) matches no
//! positive pattern, not even `*`, and every negated one: `data: { reason: "*" }` means "has a
//! reason", and `data: { reason: "!timeout" }` also matches an event without one.

use std::fmt;

/// A compiled pattern. Build it with [`Pattern::parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    negate: bool,
    /// The literal pieces between the `*`s: one piece means no `*`.
    parts: Vec<String>,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let (negate, body) = match text.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if body.is_empty() {
            return Err(if negate {
                "`!` needs a pattern after it, like `!billing/*`".to_string()
            } else {
                "empty pattern: write `*` to match any value, or the exact value".to_string()
            });
        }
        let mut parts = vec![String::new()];
        let mut chars = body.chars().enumerate();
        while let Some((i, c)) = chars.next() {
            match c {
                '*' => parts.push(String::new()),
                '\\' => match chars.next() {
                    Some((_, e @ ('*' | '\\'))) => push(&mut parts, e),
                    Some((_, '!')) if i == 0 => push(&mut parts, '!'),
                    _ => {
                        return Err(format!(
                            "`\\` in pattern `{text}` escapes only `*`, `\\` and a leading `!`: write `\\*` for a literal `*`"
                        ))
                    }
                },
                c => push(&mut parts, c),
            }
        }
        Ok(Pattern {
            text: text.to_string(),
            negate,
            parts,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `value` (`None`: the event does not have it) matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match value {
            None => self.negate,
            Some(v) => self.glob(v) != self.negate,
        }
    }

    fn glob(&self, v: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(x) => x,
            None => return v.is_empty(),
        };
        let Some((last, middle)) = rest.split_last() else {
            return v == first;
        };
        if v.len() < first.len() + last.len()
            || !v.starts_with(first.as_str())
            || !v.ends_with(last.as_str())
        {
            return false;
        }
        let mut inner = &v[first.len()..v.len() - last.len()];
        for m in middle {
            match inner.find(m.as_str()) {
                Some(at) => inner = &inner[at + m.len()..],
                None => return false,
            }
        }
        true
    }
}

fn push(parts: &mut [String], c: char) {
    if let Some(p) = parts.last_mut() {
        p.push(c);
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, v: &str) -> bool {
        Pattern::parse(p).unwrap().matches(Some(v))
    }

    #[test]
    fn wildcards() {
        assert!(m("*", ""));
        assert!(m("billing/*", "billing/billing-v2/s1"));
        assert!(!m("billing/*", "shop/billing/x"));
        assert!(m("*/s1", "billing/v2/s1"));
        assert!(m("dev.*.server.*", "dev.portcullis.server.down"));
        assert!(!m("dev.*.server.*", "dev.portcullis.route.down"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "a-b-b-c"));
        assert!(!m("ab*ba", "aba"), "prefix and suffix may not overlap");
        assert!(m("exact", "exact") && !m("exact", "exactly"));
    }

    #[test]
    fn negation_and_escapes() {
        assert!(m("!billing/*", "shop/x"));
        assert!(!m("!billing/*", "billing/x"));
        assert!(m("\\!bang", "!bang"));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "axb"));
        assert!(Pattern::parse("!").is_err());
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::parse("a\\b").unwrap_err().contains("escapes only"));
    }

    #[test]
    fn absent_values_match_only_negations() {
        assert!(!Pattern::parse("*").unwrap().matches(None));
        assert!(Pattern::parse("!timeout").unwrap().matches(None));
    }
}
