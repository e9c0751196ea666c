//! Standard Webhooks signatures (<https://www.standardwebhooks.com>): the sender puts the
//! message id in `webhook-id`, the Unix time of the attempt in `webhook-timestamp`, and in
//! `webhook-signature` the value `v1,` + base64(HMAC-SHA256(secret, `{id}.{timestamp}.{body}`)).
//! The secret is written `whsec_` followed by its bytes in base64.
//!
//! ```
//! use portcullis_events::WebhookSecret;
//!
//! let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
//! let sig = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
//! assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
//! assert!(secret.verify("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", &sig, br#"{"test": 2432232314}"#));
//! # Ok::<(), String>(())
//! ```

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of a secret's text form.
pub const PREFIX: &str = "whsec_";

/// A webhook signing secret. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    /// Reads `whsec_<base64>`; the secret must be 16 to 64 bytes (Standard Webhooks advises
    /// 24 to 64).
    pub fn parse(text: &str) -> Result<WebhookSecret, String> {
        let b64 = text.trim().strip_prefix(PREFIX).ok_or_else(|| {
            format!("a webhook secret is `{PREFIX}` followed by base64 (generate one with `echo {PREFIX}$(head -c 32 /dev/urandom | base64)`)")
        })?;
        let bytes = STANDARD
            .decode(b64)
            .map_err(|e| format!("the webhook secret after `{PREFIX}` is not base64: {e}"))?;
        if !(16..=64).contains(&bytes.len()) {
            return Err(format!(
                "the webhook secret is {} bytes; use 16 to 64 random bytes (32 is good)",
                bytes.len()
            ));
        }
        Ok(WebhookSecret(bytes))
    }

    /// The secret from raw bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> WebhookSecret {
        WebhookSecret(bytes)
    }

    /// The `whsec_` text form.
    pub fn to_text(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(&self.0))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        // HMAC takes a key of any length.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }

    /// Whether any `v1,` signature in `signatures` (space-separated) matches, compared in
    /// constant time. Checking the timestamp's age is the caller's.
    pub fn verify(&self, id: &str, timestamp: &str, signatures: &str, body: &[u8]) -> bool {
        signatures.split(' ').any(|sig| {
            let Some(b64) = sig.strip_prefix("v1,") else {
                return false;
            };
            let Ok(tag) = STANDARD.decode(b64) else {
                return false;
            };
            self.mac(id, timestamp, body).verify_slice(&tag).is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_secrets_say_what_a_secret_is() {
        assert!(WebhookSecret::parse("hunter2")
            .unwrap_err()
            .contains("whsec_"));
        assert!(WebhookSecret::parse("whsec_!!!")
            .unwrap_err()
            .contains("not base64"));
        assert!(WebhookSecret::parse("whsec_c2hvcnQ=")
            .unwrap_err()
            .contains("5 bytes"));
        let s = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(s.to_text(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert_eq!(format!("{s:?}"), "WebhookSecret(..)");
    }

    #[test]
    fn verify_takes_any_of_several_signatures_and_rejects_tampering() {
        let s = WebhookSecret::from_bytes(vec![7; 32]);
        let sig = s.sign("id", 100, b"body");
        assert!(s.verify("id", "100", &format!("v1,bm9wZQ== {sig}"), b"body"));
        assert!(!s.verify("id", "101", &sig, b"body"));
        assert!(!s.verify("id", "100", &sig, b"bodY"));
        assert!(!s.verify("id", "100", "v2,abc", b"body"));
    }
}
