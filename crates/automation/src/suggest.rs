//! "Did you mean …?": the known name closest to a mistyped one, for config problems
//! (trigger fields and actions, workflow fields, Choice operators, error names).

/// The name of `names` that `k` most plausibly mistypes: the same name in another case, or the
/// nearest by edit distance when it is close enough (at most 2, or a quarter of its length).
pub fn nearest<'n>(k: &str, names: &[&'n str]) -> Option<&'n str> {
    if let Some(n) = names.iter().find(|n| n.eq_ignore_ascii_case(k)) {
        return Some(n);
    }
    names
        .iter()
        .map(|n| (edit_distance(k, n), *n))
        .filter(|(d, n)| *d <= 2.max(n.len() / 4) && *d < n.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// The Levenshtein distance between `a` and `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_name_and_strangers_none() {
        assert_eq!(
            nearest("stringequals", &["StringEquals", "NumericEquals"]),
            Some("StringEquals")
        );
        assert_eq!(nearest("Nxt", &["Next", "End"]), Some("Next"));
        assert_eq!(nearest("frobnicate", &["Next", "End"]), None);
    }
}
