//! portcullis audit trail: a tamper-evident, hash-chained log of authentication failures,
//! authorization decisions, admin actions and config reloads.
//!
//! * [`Auditor`] queues records to a dedicated writer thread, which chains, writes, syncs and
//!   rotates the files, and acknowledges each record under the `audit.fsync` policy
//!   ([`writer`]). With `on_overload: wait`, a full disk is waited out rather than failed
//!   (`disk`).
//! * [`verify`] checks the chain and names the first broken seq, file and line; [`search`]
//!   finds records; both are pure functions over files, for the CLI.
//!
//! Each record is one line of canonical JSON (keys sorted at every depth, no whitespace,
//! serde_json escaping) with `seq`, `prev_hash` and `hash` = hex SHA-256 of the canonical form
//! without `hash`; see [`chain`] for the exact rules, and `docs/audit.md` for a worked example
//! that can be checked with `jq` and `sha256sum`.

pub mod chain;
mod disk;
mod error;
pub mod files;
pub mod record;
pub mod search;
pub mod verify;
pub mod writer;

pub use error::Error;
pub use record::{AuthorizerNote, Decision, Kind, Principal, Record, Stats};
pub use search::{parse_since, search, Filter};
pub use verify::{verify, VerifyError, VerifyReport};
pub use writer::Auditor;
