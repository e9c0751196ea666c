//! The admin listener's static tokens (`admin.tokens`, break-glass and scripts): each
//! configured as its SHA-256 (`sha256:<hex>`) or as itself, and a presented token checked
//! against all of them in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 of a configured token: given as `sha256:<hex>`, or hashed from the token.
pub fn token_digest(t: &str) -> [u8; 32] {
    if let Some(hex) = t.strip_prefix("sha256:") {
        let mut out = [0u8; 32];
        let nibble = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        for (o, pair) in out.iter_mut().zip(hex.as_bytes().chunks(2)) {
            *o = (nibble(pair[0]) << 4) | pair.get(1).map_or(0, |c| nibble(*c));
        }
        return out;
    }
    Sha256::digest(t.as_bytes()).into()
}

/// Checks the bearer token against every configured token (or its digest) in constant
/// time: the presented token is hashed, and every configured digest compared.
pub fn check_token(presented: &[u8], tokens: &[String]) -> Option<usize> {
    let p = Sha256::digest(presented);
    let mut found = None;
    for (i, t) in tokens.iter().enumerate() {
        let t = token_digest(t);
        if bool::from(p.ct_eq(&t)) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_exactly() {
        let tokens = vec![
            "0123456789abcdef".to_string(),
            "fedcba9876543210".to_string(),
        ];
        assert_eq!(check_token(b"fedcba9876543210", &tokens), Some(1));
        assert_eq!(check_token(b"fedcba987654321", &tokens), None);
        assert_eq!(check_token(b"", &tokens), None);
        let hashed = vec![
            format!("sha256:{}", "0".repeat(64)),
            "fedcba9876543210".into(),
        ];
        assert_eq!(check_token(b"fedcba9876543210", &hashed), Some(1));
    }
}
