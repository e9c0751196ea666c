//! portcullis limits: the counters behind the `limit` phase. Pure: counters and verdicts in,
//! no HTTP types, no config parsing, and no I/O or background tasks except in the [`redis`]
//! module, the one part that talks to a server. Every call outside it takes the current
//! [`Moment`] from the caller, so tests control time exactly.
//!
//! * [`clock`]: the injectable clock ([`Moment`], [`Clock`], [`ManualClock`]).
//! * [`window`]: sliding-window counters, HAProxy's `http_req_rate(10s)`, with a documented
//!   error bound and without the fixed-window burst.
//! * [`gcra`]: token buckets (rate plus burst) as GCRA, one timestamp per key, with the values
//!   `Retry-After` and the IETF `RateLimit` header need.
//! * [`buckets`]: a bounded, sharded store of GCRA states, one per key, for usage plans.
//! * [`quota`]: quotas per day, week or month with a UTC reset time (API Gateway's usage-plan
//!   quotas), daily usage counts for reports, and the hooks that persist both; the wall-clock
//!   time comes from [`wall`].
//! * [`table`]: stick tables: per-key counters in a sharded, size-bounded LRU with idle expiry,
//!   and the documented, measured memory per entry.
//! * [`counter`], [`units`], [`key`]: counter names as the config writes them
//!   (`http_req_rate(10s)`), periods and rates, and bounded keys.
//! * [`redis`]: the same counters, plan buckets and quotas kept in Redis, so that several
//!   portcullis processes enforce one global limit: one Lua script, one round trip per
//!   request, bounded by a timeout, with a local deny cache and batched end-of-response counts.
//!
//! ```
//! use portcullis_limits::{gcra::Bucket, ManualClock, Clock, Key, Rate, Table, TableSpec};
//! use std::time::Duration;
//!
//! let clock = ManualClock::new();
//! let per_key = Table::new(TableSpec::parse(
//!     100_000,
//!     Duration::from_secs(600),
//!     ["http_req_rate(10s)", "http_err_rate(1m)", "conn_cur"],
//! )?);
//! let mut plan = Bucket::new(Rate::per_second(10), 20)?;
//!
//! let key = Key::from("agent-7");
//! let seen = per_key.record_request(&key, clock.now());
//! let verdict = plan.check(clock.now(), 1);
//! assert!(verdict.allowed && seen.http_req_rate == Some(1));
//! # Ok::<(), portcullis_limits::Error>(())
//! ```

pub mod buckets;
pub mod clock;
pub mod counter;
pub mod gcra;
pub mod key;
pub mod quota;
pub mod redis;
pub mod table;
pub mod units;
pub mod wall;
pub mod window;

pub use self::redis::{RedisConfig, RedisStore, StoreError};
pub use buckets::Buckets;
pub use clock::{Clock, ManualClock, Moment, MonotonicClock};
pub use counter::{Counter, Kind, Kinds};
pub use gcra::{Bucket, Gcra, GcraState, Verdict};
pub use key::Key;
pub use quota::{DailyUsage, Per, QuotaSpec, QuotaVerdict, Quotas, ResetAt, StoredKey};
pub use table::{Entry, Memory, Snapshot, Table, TableSpec};
pub use units::{Period, Rate};
pub use wall::{ManualWallClock, SystemWallClock, WallClock};
pub use window::{SlidingWindow, WindowState};

/// Everything that can be wrong with what a caller asks of this crate. Each message names
/// the input and says what to write instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("unknown counter `{given}`: {fix}")]
    UnknownCounter { given: String, fix: String },
    #[error("counter `{given}`: {fix}")]
    BadCounter { given: String, fix: String },
    #[error("bad period `{given}`: {fix}")]
    BadPeriod { given: String, fix: String },
    #[error("bad limit: {fix}")]
    BadLimit { fix: String },
    #[error("bad table: {fix}")]
    BadTable { fix: String },
    #[error("this table does not store `{kind}`: {fix}")]
    NotStored { kind: Kind, fix: String },
    #[error("bad tag `{tag}`: {fix}")]
    BadTag { tag: String, fix: String },
    #[error("bad quota `{given}`: {fix}")]
    BadQuota { given: String, fix: String },
    #[error("bad day `{given}`: {fix}")]
    BadDay { given: String, fix: String },
}
