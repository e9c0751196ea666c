//! Stick-table keys: bytes with a bound on what they can cost.
//!
//! A key is whatever the route's rule extracts: an IP address or prefix, a principal, an API
//! key id, a header value, a claim, or a tuple of these encoded by the caller. Some of those
//! are chosen by the client, so a key's memory is bounded here, once, when the [`Key`] is made:
//!
//! * up to [`INLINE_LEN`] (22) bytes: stored inline in the 24-byte `Key`, no allocation
//!   (IPv4 and IPv6 addresses, short ids);
//! * up to [`MAX_KEY_LEN`] (256) bytes: stored as given, in one heap allocation;
//! * longer: replaced by the first 22 bytes (176 bits) of its SHA-256, stored inline. A 100 KB
//!   header value therefore costs the same as a short one, and two long values collide only
//!   with probability about 2^-88 per pair. A hashed key never equals a literal key, even one
//!   with the same bytes, and [`Key::is_hashed`] tells them apart for display.
//!
//! Make the `Key` once per request and pass it to every table call: the SHA-256 of a long
//! value is computed once, not per call, and so is the key's hash. A `Key` carries a 64-bit
//! hash of its bytes, seeded at random once per process (so a client cannot choose keys that
//! collide), and hashes as that one word: the tables, buckets and daily counts a request
//! touches each find their entry without reading the key's bytes again.
//!
//! ```
//! use portcullis_limits::Key;
//!
//! let ip = Key::from(std::net::IpAddr::from([192, 0, 2, 7]));
//! assert_eq!(ip.as_bytes(), &[192, 0, 2, 7]);
//!
//! let huge = Key::new(&vec![b'a'; 100_000]);
//! assert!(huge.is_hashed());
//! assert_eq!(huge.as_bytes().len(), 22);
//! assert_eq!(huge.heap_bytes(), 0);
//! ```

use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::LazyLock;

/// Keys up to this many bytes are stored inside the `Key` itself.
pub const INLINE_LEN: usize = 22;
/// Keys longer than this are replaced by a SHA-256 prefix of [`INLINE_LEN`] bytes.
pub const MAX_KEY_LEN: usize = 256;

/// The seed of every key's hash: random, once per process.
static SEED: LazyLock<foldhash::fast::RandomState> = LazyLock::new(Default::default);

/// A bounded stick-table key. See the [module docs](self).
///
/// Equal keys have equal hashes, so comparing the hash first only skips unequal keys early.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    hash: u64,
    repr: Repr,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Repr {
    /// `len` bytes at the front of the buffer; the rest are zero.
    Inline { len: u8, buf: [u8; INLINE_LEN] },
    /// 23..=256 bytes.
    Heap(Box<[u8]>),
    /// The first bytes of the SHA-256 of a key longer than [`MAX_KEY_LEN`].
    Hashed([u8; INLINE_LEN]),
}

impl Key {
    pub fn new(bytes: &[u8]) -> Key {
        if bytes.len() <= INLINE_LEN {
            let mut buf = [0; INLINE_LEN];
            buf[..bytes.len()].copy_from_slice(bytes);
            Key::of(Repr::Inline {
                len: bytes.len() as u8,
                buf,
            })
        } else if bytes.len() <= MAX_KEY_LEN {
            Key::of(Repr::Heap(bytes.into()))
        } else {
            let digest = Sha256::digest(bytes);
            let mut buf = [0; INLINE_LEN];
            buf.copy_from_slice(&digest[..INLINE_LEN]);
            Key::of(Repr::Hashed(buf))
        }
    }

    /// The key of `repr`, with its hash. A hashed key and a literal key of the same bytes
    /// hash alike, and differ when compared.
    fn of(repr: Repr) -> Key {
        let mut k = Key { hash: 0, repr };
        k.hash = SEED.hash_one(k.as_bytes());
        k
    }

    /// The hashed key whose stored digest prefix is `digest` (as [`Key::as_bytes`] gives
    /// it for a hashed key): for reading keys back from a store.
    pub fn from_digest(digest: [u8; INLINE_LEN]) -> Key {
        Key::of(Repr::Hashed(digest))
    }

    /// The key's hash: of its stored bytes, under this process's random seed.
    pub fn hash64(&self) -> u64 {
        self.hash
    }

    /// The stored bytes: the key itself, or for a hashed key the digest prefix.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.repr {
            Repr::Inline { len, buf } => &buf[..usize::from(*len)],
            Repr::Heap(b) => b,
            Repr::Hashed(d) => d,
        }
    }

    /// Whether the key was longer than [`MAX_KEY_LEN`] and is stored as a digest.
    pub fn is_hashed(&self) -> bool {
        matches!(self.repr, Repr::Hashed(_))
    }

    /// Bytes this key holds on the heap (0 for inline and hashed keys), for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        match &self.repr {
            Repr::Heap(b) => b.len(),
            _ => 0,
        }
    }
}

/// The key's hash alone: one word for the hasher of whatever map holds it.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// By the stored bytes (literal keys before hashed ones of the same bytes), not by hash.
impl Ord for Key {
    fn cmp(&self, other: &Key) -> Ordering {
        self.repr.cmp(&other.repr)
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl From<&[u8]> for Key {
    fn from(b: &[u8]) -> Key {
        Key::new(b)
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Key {
        Key::new(s.as_bytes())
    }
}

/// The address's octets: 4 bytes for IPv4, 16 for IPv6 (both inline).
impl From<IpAddr> for Key {
    fn from(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => Key::new(&v4.octets()),
            IpAddr::V6(v6) => Key::new(&v6.octets()),
        }
    }
}

/// Printable UTF-8 as itself; other bytes as `0x` and hex; hashed keys as `sha256:` and the
/// hex of the stored prefix.
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.as_bytes();
        let hex = |f: &mut fmt::Formatter<'_>| bytes.iter().try_for_each(|b| write!(f, "{b:02x}"));
        if self.is_hashed() {
            f.write_str("sha256:")?;
            return hex(f);
        }
        match std::str::from_utf8(bytes) {
            Ok(s) if !s.is_empty() && !s.chars().any(char::is_control) => f.write_str(s),
            _ => {
                f.write_str("0x")?;
                hex(f)
            }
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Key>(), 32);
    }

    #[test]
    fn equal_keys_hash_alike_and_keys_order_by_their_bytes() {
        let (a, b) = (Key::from("alice"), Key::from("bob"));
        assert_eq!(a.hash64(), Key::from("alice").hash64());
        assert_ne!(a.hash64(), b.hash64());
        // Inline keys order by length, then bytes, whatever their hashes.
        assert!(b < a && a < Key::from("bobby") && Key::from("") < b);
        let long = Key::new(&[b'x'; MAX_KEY_LEN + 1]);
        let literal = Key::new(long.as_bytes());
        // Same bytes, same hash; still two keys.
        assert_eq!(long.hash64(), literal.hash64());
        assert_ne!(long, literal);
        assert_eq!(
            Key::from_digest(literal.as_bytes().try_into().unwrap()),
            long
        );
    }

    #[test]
    fn short_keys_are_inline_and_shown_as_text() {
        let k = Key::from("alice@example.com");
        assert_eq!(k.as_bytes(), b"alice@example.com");
        assert_eq!(k.heap_bytes(), 0);
        assert_eq!(k.to_string(), "alice@example.com");
        assert_eq!(
            Key::from(IpAddr::from([10, 0, 0, 1])).to_string(),
            "0x0a000001"
        );
    }

    #[test]
    fn medium_keys_are_kept_verbatim() {
        let text = "x".repeat(MAX_KEY_LEN);
        let k = Key::from(text.as_str());
        assert!(!k.is_hashed());
        assert_eq!(k.as_bytes(), text.as_bytes());
        assert_eq!(k.heap_bytes(), MAX_KEY_LEN);
    }

    #[test]
    fn long_keys_are_hashed_so_a_100kb_header_costs_nothing_extra() {
        let a = Key::new(&vec![b'a'; 100_000]);
        let b = Key::new(&vec![b'b'; 100_000]);
        assert!(a.is_hashed());
        assert_ne!(a, b);
        assert_eq!(a, Key::new(&vec![b'a'; 100_000]));
        assert_eq!(a.heap_bytes(), 0);
        assert!(a.to_string().starts_with("sha256:"));
        assert_eq!(a.to_string().len(), "sha256:".len() + 2 * INLINE_LEN);

        // A literal key with the same bytes as a digest is a different key.
        let literal = Key::new(a.as_bytes());
        assert_ne!(literal, a);
        // 257 bytes is past the bound.
        assert!(Key::new(&[0; MAX_KEY_LEN + 1]).is_hashed());
    }
}
