//! Quotas per day, week or month (API Gateway's usage-plan quotas), and daily usage counts
//! for reports. Pure: the wall-clock time comes from the caller (see [`crate::wall`]), and
//! nothing here reads a file or a socket; the durable copy lives in `portcullis-store`, fed
//! through [`Quotas::dirty`], [`Quotas::load`] and [`DailyUsage::drain`].
//!
//! # Periods
//!
//! A [`QuotaSpec`] is `limit` units per [`Per`] day, week or month, the period starting at a
//! [`ResetAt`] time of day in UTC (and for weeks on a weekday, Monday unless told). A period
//! is a half-open span of Unix seconds `[start, end)`: with `reset: "09:30 UTC"`, the daily
//! period containing 2026-12-06 08:00 UTC started on 2026-12-05 at 09:30. Months have their
//! real lengths (2028-02-29 exists, 2027-02-29 does not). Civil dates are computed with
//! Howard Hinnant's `days_from_civil` and `civil_from_days` (public domain), not a date crate:
//! `chrono` and `time` are only in `Cargo.lock` as other crates' dependencies, and UTC needs
//! no time-zone database.
//!
//! ```
//! use portcullis_limits::quota::{days_from_civil, Per, QuotaSpec, Quotas, ResetAt};
//! use portcullis_limits::wall::{ManualWallClock, WallClock};
//! use portcullis_limits::Key;
//! use std::time::Duration;
//!
//! let spec = QuotaSpec::new(3, Per::Day, ResetAt::parse("09:30 UTC")?)?;
//! let plan = Quotas::new(spec, 10_000);
//! // 2026-12-06 09:00 UTC: half an hour before the reset.
//! let clock = ManualWallClock::from_unix_secs(days_from_civil(2026, 12, 6) * 86_400 + 9 * 3600);
//! let alice = Key::from("alice");
//! assert!(plan.check(&alice, clock.unix_nanos(), 3).allowed);
//! let v = plan.check(&alice, clock.unix_nanos(), 1);
//! assert!(!v.allowed);
//! assert_eq!(v.remaining, 0);
//! assert_eq!(v.reset_after, Duration::from_secs(30 * 60));
//! clock.advance(v.reset_after);
//! assert_eq!(plan.check(&alice, clock.unix_nanos(), 1).remaining, 2);
//! # Ok::<(), portcullis_limits::Error>(())
//! ```
//!
//! # Keys that survive a restart
//!
//! A [`Key`] longer than 256 bytes is kept as a SHA-256 prefix, and a `Key` cannot be rebuilt
//! from that prefix: `Key::new(prefix)` is a different, literal key. So what is persisted is a
//! [`StoredKey`], which remembers whether its bytes are a digest, and whose
//! [`StoredKey::to_bytes`] form (a tag byte, then the bytes) is what the store keeps.
//! [`Quotas`] and [`DailyUsage`] index hashed keys by their digest, so a quota loaded for a
//! hashed key applies to the long key it came from.
//!
//! # Bounds, and what happens when full
//!
//! [`Quotas`] holds at most `capacity` keys, in up to 16 shards (one `parking_lot::Mutex`
//! each, held for one map operation). Forgetting a key's use in the current period would
//! hand it a fresh quota, so eviction never does that:
//!
//! * entries of past periods (and entries that used nothing) go first: they change no
//!   verdict. A shard drops them once per period, when it is first full in that period;
//! * if the shard is still full, a key not yet tracked is **refused** (fail closed), with
//!   [`QuotaVerdict::table_full`] set so the caller can log and count it; keys already tracked
//!   are unaffected. (Its `reset_after` is still the period's end; a `Retry-After` for it
//!   is the caller's choice.) Size `capacity` for the keys a plan really has (quota keys are
//!   API keys and principals, not client addresses).
//! * **Memory:** about 60 bytes a key (the [`Key`] 24, period, count and flag 24, the map's
//!   slot and control byte, at most 7/8 full), plus the key's heap bytes for keys of 23 to
//!   256 bytes; and about 40 bytes more per key used since the last drain of its daily
//!   counts. A million keys is about 100 MB at most.
//!
//! [`DailyUsage`] holds the counts since its last [`DailyUsage::drain`], at most `capacity`
//! (key, day) pairs; when full, a new pair's requests are not counted, and
//! [`DailyUsage::dropped`] says how many were missed. Drain it every few seconds.
//!
//! # Durability
//!
//! * At start, the proxy reads the store's rows for the current period and [`Quotas::load`]s
//!   them: the larger of the loaded and the in-memory count wins.
//! * Every sync interval, [`Quotas::dirty`] hands over the entries changed since the last
//!   call and [`DailyUsage::drain`] the new counts; the proxy writes both in one transaction.
//!   If that write fails, [`Quotas::mark_dirty`] and [`DailyUsage::put_back`] return them.
//! * A crash loses at most one sync interval of use: a caller may get that much more.

use crate::key::{Key, INLINE_LEN};
use crate::wall::NANOS_PER_SEC;
use crate::Error;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Seconds in a (UTC, leap-second-free) day.
pub const SECS_PER_DAY: i64 = 86_400;
const NANOS_PER_DAY: i64 = SECS_PER_DAY * NANOS_PER_SEC;
/// Instants are clamped to ±2^45 seconds (about a million years), so that no calendar
/// arithmetic can overflow whatever a caller passes.
const MAX_SECS: i64 = 1 << 45;
/// Years are clamped to ±10^9 in [`days_from_civil`], for the same reason.
const MAX_YEAR: i64 = 1_000_000_000;

/// The most shards a map is split into.
const MAX_SHARDS: usize = 16;
/// The fewest keys per shard (small maps have one shard).
const MIN_SHARD: usize = 64;

// ---------------------------------------------------------------------------------------
// Civil dates (proleptic Gregorian, UTC)
// ---------------------------------------------------------------------------------------

/// The day number (days since 1970-01-01) of a civil date. `month` is 1 to 12; a `day` past
/// the month's end rolls over into the next month. Howard Hinnant's algorithm.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let month = i64::from(month.clamp(1, 12));
    let day = i64::from(day);
    let y = year.clamp(-MAX_YEAR, MAX_YEAR) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400); // [0, 399]
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1; // March is month 0
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date `(year, month, day)` of a day number (days since 1970-01-01).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days.clamp(-MAX_YEAR * 366, MAX_YEAR * 366) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March is 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Whether `year` has a February 29th.
pub fn is_leap_year(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

/// Days in `month` (1 to 12) of `year`.
pub fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The UTC day number (days since 1970-01-01) of an instant in Unix nanoseconds.
pub fn day_of(unix_nanos: i64) -> i64 {
    unix_nanos.div_euclid(NANOS_PER_DAY)
}

/// A day number as `YYYY-MM-DD` (UTC), e.g. `2026-12-06`.
pub fn day_string(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Parses `YYYY-MM-DD` (a UTC day, years 0000 to 9999) into a day number.
pub fn parse_day(text: &str) -> Result<i64, Error> {
    let bad = |fix: String| Error::BadDay {
        given: text.to_string(),
        fix,
    };
    let t = text.trim();
    let b = t.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape {
        return Err(bad(
            "write a UTC day as `YYYY-MM-DD`, e.g. `2026-12-06`".into()
        ));
    }
    let num = |r: std::ops::Range<usize>| t[r].parse::<u32>().unwrap_or(0);
    let (y, m, d) = (i64::from(num(0..4)), num(5..7), num(8..10));
    if !(1..=12).contains(&m) {
        return Err(bad(format!(
            "there is no month {m:02}: months are 01 to 12"
        )));
    }
    let last = days_in_month(y, m);
    if d == 0 || d > last {
        return Err(bad(format!(
            "{y:04}-{m:02} has days 01 to {last}{}",
            if m == 2 && last == 28 {
                " (not a leap year)"
            } else {
                ""
            }
        )));
    }
    Ok(days_from_civil(y, m, d))
}

// ---------------------------------------------------------------------------------------
// The spec: limit, per, reset
// ---------------------------------------------------------------------------------------

/// A day of the week.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Weekday {
    #[default]
    Monday,
    Tuesday,
    Wednesday,
    Thursday,
    Friday,
    Saturday,
    Sunday,
}

impl Weekday {
    /// Monday first, as ISO 8601 counts.
    pub const ALL: [Weekday; 7] = [
        Weekday::Monday,
        Weekday::Tuesday,
        Weekday::Wednesday,
        Weekday::Thursday,
        Weekday::Friday,
        Weekday::Saturday,
        Weekday::Sunday,
    ];

    /// The weekday of a day number (1970-01-01 was a Thursday).
    pub fn of_day(day: i64) -> Weekday {
        Weekday::ALL[(day + 3).rem_euclid(7) as usize]
    }

    /// 0 for Monday to 6 for Sunday.
    pub fn index(self) -> i64 {
        self as i64
    }

    pub fn name(self) -> &'static str {
        match self {
            Weekday::Monday => "Monday",
            Weekday::Tuesday => "Tuesday",
            Weekday::Wednesday => "Wednesday",
            Weekday::Thursday => "Thursday",
            Weekday::Friday => "Friday",
            Weekday::Saturday => "Saturday",
            Weekday::Sunday => "Sunday",
        }
    }

    /// `Monday` or `Mon`, in any case.
    pub fn parse(text: &str) -> Option<Weekday> {
        let t = text.trim().to_ascii_lowercase();
        Weekday::ALL.into_iter().find(|d| {
            let name = d.name().to_ascii_lowercase();
            t == name || t == name[..3]
        })
    }
}

impl fmt::Display for Weekday {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The length of a quota period.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Per {
    Day,
    Week,
    Month,
}

impl Per {
    /// `day`, `week` or `month`.
    pub fn parse(text: &str) -> Result<Per, Error> {
        match text.trim().to_ascii_lowercase().as_str() {
            "day" => Ok(Per::Day),
            "week" => Ok(Per::Week),
            "month" => Ok(Per::Month),
            _ => Err(Error::BadQuota {
                given: text.to_string(),
                fix: "a quota is per `day`, `week` or `month`".into(),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Per::Day => "day",
            Per::Week => "week",
            Per::Month => "month",
        }
    }
}

impl FromStr for Per {
    type Err = Error;
    fn from_str(s: &str) -> Result<Per, Error> {
        Per::parse(s)
    }
}

impl fmt::Display for Per {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// When a quota period starts: a time of day in UTC, to the minute, and for weekly quotas the
/// weekday (Monday unless told). The default is Monday 00:00 UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResetAt {
    /// Minutes after 00:00 UTC, below 1440.
    minutes: u16,
    week_start: Weekday,
}

impl ResetAt {
    /// 00:00 UTC, weeks starting on Monday.
    pub const MIDNIGHT: ResetAt = ResetAt {
        minutes: 0,
        week_start: Weekday::Monday,
    };

    /// `hour:minute` UTC (hour 0 to 23, minute 0 to 59), weeks starting on Monday.
    pub fn new(hour: u32, minute: u32) -> Result<ResetAt, Error> {
        if hour > 23 || minute > 59 {
            return Err(Error::BadQuota {
                given: format!("{hour:02}:{minute:02}"),
                fix: "hours are 00 to 23 and minutes 00 to 59 (midnight is `00:00 UTC`)".into(),
            });
        }
        Ok(ResetAt {
            minutes: (hour * 60 + minute) as u16,
            week_start: Weekday::Monday,
        })
    }

    /// The same time, weeks starting on `day`.
    pub fn with_week_start(self, day: Weekday) -> ResetAt {
        ResetAt {
            week_start: day,
            ..self
        }
    }

    /// Minutes after 00:00 UTC.
    pub fn minutes(self) -> u32 {
        u32::from(self.minutes)
    }

    /// The weekday a weekly quota's period starts on.
    pub fn week_start(self) -> Weekday {
        self.week_start
    }

    fn offset_secs(self) -> i64 {
        i64::from(self.minutes) * 60
    }

    /// Parses `HH:MM UTC` or `HH:MM` (UTC either way), optionally with the weekday a weekly
    /// quota starts on: `Sunday 00:00 UTC`. Other time zones are refused, with a fix: a quota
    /// that resets at local midnight would move with daylight saving time.
    pub fn parse(text: &str) -> Result<ResetAt, Error> {
        let bad = |fix: String| Error::BadQuota {
            given: text.to_string(),
            fix,
        };
        const FORM: &str = "write the reset as `HH:MM UTC` (24-hour, e.g. `00:00 UTC` or `09:30 UTC`), \
                            optionally after the weekday a weekly quota starts on (`Sunday 00:00 UTC`)";
        let (mut time, mut weekday, mut utc) = (None, None, false);
        for token in text.split_whitespace() {
            if token.eq_ignore_ascii_case("utc") && !utc {
                utc = true;
            } else if let Some(day) = Weekday::parse(token) {
                if weekday.replace(day).is_some() {
                    return Err(bad(format!("two weekdays: {FORM}")));
                }
            } else if time.is_none() && token.starts_with(|c: char| c.is_ascii_digit()) {
                time = Some(token);
            } else if looks_like_a_zone(token) {
                return Err(bad(format!(
                    "quotas reset in UTC only, so that a day is always 24 hours: convert the time \
                     to UTC and write `HH:MM UTC` (for example 09:30 in `{token}` is not the same \
                     UTC time in summer and in winter; pick the one you mean)"
                )));
            } else {
                return Err(bad(format!("unexpected `{token}`: {FORM}")));
            }
        }
        let Some(time) = time else {
            return Err(bad(FORM.into()));
        };
        let parts: Vec<&str> = time.split(':').collect();
        let two_digits = |s: &str| s.len() == 2 && s.bytes().all(|c| c.is_ascii_digit());
        let hour_ok = |s: &str| (1..=2).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_digit());
        let (hour, minute) = match parts.as_slice() {
            [h, m] if hour_ok(h) && two_digits(m) => {
                (h.parse().unwrap_or(99), m.parse().unwrap_or(99))
            }
            [_, _, _] => return Err(bad(format!("`{time}`: a reset is to the minute: {FORM}"))),
            _ if time.to_ascii_lowercase().ends_with("am")
                || time.to_ascii_lowercase().ends_with("pm") =>
            {
                return Err(bad(format!("`{time}`: use the 24-hour clock: {FORM}")))
            }
            _ => return Err(bad(format!("`{time}` is not a time: {FORM}"))),
        };
        let reset = ResetAt::new(hour, minute).map_err(|_| {
            bad("hours are 00 to 23 and minutes 00 to 59 (midnight is `00:00 UTC`)".into())
        })?;
        Ok(reset.with_week_start(weekday.unwrap_or_default()))
    }
}

/// A token that is probably a time zone: letters (CET, PST, GMT), an offset (+02:00, -0500,
/// Z) or a tz database name (Europe/Paris).
fn looks_like_a_zone(token: &str) -> bool {
    let t = token.trim_end_matches(',');
    t.starts_with(['+', '-'])
        || t.contains('/')
        || t.eq_ignore_ascii_case("z")
        || ((2..=5).contains(&t.len()) && t.bytes().all(|c| c.is_ascii_alphabetic()))
}

impl FromStr for ResetAt {
    type Err = Error;
    fn from_str(s: &str) -> Result<ResetAt, Error> {
        ResetAt::parse(s)
    }
}

/// `09:30 UTC`, with the weekday first when weeks do not start on Monday.
impl fmt::Display for ResetAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.week_start != Weekday::Monday {
            write!(f, "{} ", self.week_start)?;
        }
        write!(f, "{:02}:{:02} UTC", self.minutes / 60, self.minutes % 60)
    }
}

/// `limit` units per day, week or month, reset at `reset`. See the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuotaSpec {
    pub limit: u64,
    pub per: Per,
    pub reset: ResetAt,
}

impl QuotaSpec {
    /// A checked spec: `limit` at least 1, and a weekday other than Monday only for weeks.
    pub fn new(limit: u64, per: Per, reset: ResetAt) -> Result<QuotaSpec, Error> {
        if limit == 0 {
            return Err(Error::BadLimit {
                fix: "a quota's limit must be at least 1 (to shut a plan's callers out, deny \
                      them in policy)"
                    .into(),
            });
        }
        if per != Per::Week && reset.week_start != Weekday::Monday {
            return Err(Error::BadQuota {
                given: reset.to_string(),
                fix: format!(
                    "a weekday only applies to `per: week`; a {per} quota resets every {per} \
                     at the time alone: write `{:02}:{:02} UTC`",
                    reset.minutes / 60,
                    reset.minutes % 60
                ),
            });
        }
        Ok(QuotaSpec { limit, per, reset })
    }

    /// The period containing the instant `unix_secs`: `(start, end)` in Unix seconds, start
    /// included, end excluded.
    pub fn period(&self, unix_secs: i64) -> (i64, i64) {
        let t = unix_secs.clamp(-MAX_SECS, MAX_SECS);
        let offset = self.reset.offset_secs();
        // The day whose reset time is the last one at or before `t`.
        let day = (t - offset).div_euclid(SECS_PER_DAY);
        let (first, next) = match self.per {
            Per::Day => (day, day + 1),
            Per::Week => {
                let back =
                    (Weekday::of_day(day).index() - self.reset.week_start.index()).rem_euclid(7);
                (day - back, day - back + 7)
            }
            Per::Month => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1), days_from_civil(ny, nm, 1))
            }
        };
        (first * SECS_PER_DAY + offset, next * SECS_PER_DAY + offset)
    }
}

/// `10000 per month from 00:00 UTC`.
impl fmt::Display for QuotaSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {} from {}", self.limit, self.per, self.reset)
    }
}

// ---------------------------------------------------------------------------------------
// Keys as stored
// ---------------------------------------------------------------------------------------

/// The tag byte of a literal key in [`StoredKey::to_bytes`].
const TAG_LITERAL: u8 = 0;
/// The tag byte of a hashed key (a SHA-256 prefix) in [`StoredKey::to_bytes`].
const TAG_HASHED: u8 = 1;

/// A [`Key`] in the form that survives a restart: its bytes, and whether they are a digest.
/// See the [module docs](self#keys-that-survive-a-restart).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoredKey(Stored);

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Stored {
    Literal(Key),
    Hashed([u8; INLINE_LEN]),
}

impl StoredKey {
    pub fn of(key: &Key) -> StoredKey {
        KeyRef::of(key).to_stored()
    }

    /// The key, for a literal one; `None` for a hashed one, which cannot be rebuilt.
    pub fn to_key(&self) -> Option<Key> {
        match &self.0 {
            Stored::Literal(k) => Some(k.clone()),
            Stored::Hashed(_) => None,
        }
    }

    /// The key as counters know it: a hashed key is rebuilt from its digest
    /// ([`Key::from_digest`]), which equals the long key it came from.
    pub fn key(&self) -> Key {
        match &self.0 {
            Stored::Literal(k) => k.clone(),
            Stored::Hashed(d) => Key::from_digest(*d),
        }
    }

    /// Whether this is the SHA-256 prefix of a key longer than 256 bytes.
    pub fn is_hashed(&self) -> bool {
        matches!(self.0, Stored::Hashed(_))
    }

    /// The bytes of the key (for a hashed key, the digest prefix): [`Key::as_bytes`].
    pub fn key_bytes(&self) -> &[u8] {
        match &self.0 {
            Stored::Literal(k) => k.as_bytes(),
            Stored::Hashed(d) => d,
        }
    }

    /// Whether this is the stored form of `key`.
    pub fn matches(&self, key: &Key) -> bool {
        key.is_hashed() == self.is_hashed() && key.as_bytes() == self.key_bytes()
    }

    /// The persistent form: a tag byte (0 for a literal key, 1 for a SHA-256 prefix), then
    /// [`StoredKey::key_bytes`]. This is the `key` column of `portcullis-store`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let tag = if self.is_hashed() {
            TAG_HASHED
        } else {
            TAG_LITERAL
        };
        let mut out = Vec::with_capacity(1 + self.key_bytes().len());
        out.push(tag);
        out.extend_from_slice(self.key_bytes());
        out
    }

    /// Reads [`StoredKey::to_bytes`] back; `None` for bytes that are not that form.
    pub fn from_bytes(bytes: &[u8]) -> Option<StoredKey> {
        match bytes.split_first()? {
            (&TAG_LITERAL, rest) if rest.len() <= crate::key::MAX_KEY_LEN => {
                Some(StoredKey(Stored::Literal(Key::new(rest))))
            }
            (&TAG_HASHED, rest) => Some(StoredKey(Stored::Hashed(rest.try_into().ok()?))),
            _ => None,
        }
    }
}

impl From<&Key> for StoredKey {
    fn from(key: &Key) -> StoredKey {
        StoredKey::of(key)
    }
}

impl From<Key> for StoredKey {
    fn from(key: Key) -> StoredKey {
        if key.is_hashed() {
            StoredKey::of(&key)
        } else {
            StoredKey(Stored::Literal(key))
        }
    }
}

/// As [`Key`] shows itself: text, `0x` and hex, or `sha256:` and hex.
impl fmt::Display for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Stored::Literal(k) => fmt::Display::fmt(k, f),
            Stored::Hashed(d) => {
                f.write_str("sha256:")?;
                d.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoredKey({self})")
    }
}

/// A key to look up without cloning it: a borrowed literal key, or a digest.
#[derive(Clone, Copy)]
enum KeyRef<'a> {
    Literal(&'a Key),
    Hashed([u8; INLINE_LEN]),
}

impl<'a> KeyRef<'a> {
    fn of(key: &'a Key) -> KeyRef<'a> {
        match key.as_bytes().try_into() {
            Ok(digest) if key.is_hashed() => KeyRef::Hashed(digest),
            _ => KeyRef::Literal(key),
        }
    }

    fn stored(key: &'a StoredKey) -> KeyRef<'a> {
        match &key.0 {
            Stored::Literal(k) => KeyRef::Literal(k),
            Stored::Hashed(d) => KeyRef::Hashed(*d),
        }
    }

    fn to_stored(self) -> StoredKey {
        match self {
            KeyRef::Literal(k) => StoredKey(Stored::Literal(k.clone())),
            KeyRef::Hashed(d) => StoredKey(Stored::Hashed(d)),
        }
    }

    fn hash(self, hasher: &Hasher) -> u64 {
        match self {
            // The key's own hash, made once with the key.
            KeyRef::Literal(k) => hasher.hash_one(k.hash64()),
            KeyRef::Hashed(d) => hasher.hash_one((true, &d[..])),
        }
    }
}

type Hasher = foldhash::fast::RandomState;

/// A map from keys, with hashed keys indexed by their digest.
struct KeyMap<V> {
    literal: HashMap<Key, V, Hasher>,
    hashed: HashMap<[u8; INLINE_LEN], V, Hasher>,
}

impl<V> KeyMap<V> {
    fn new(hasher: &Hasher) -> KeyMap<V> {
        KeyMap {
            literal: HashMap::with_hasher(hasher.clone()),
            hashed: HashMap::with_hasher(hasher.clone()),
        }
    }

    fn len(&self) -> usize {
        self.literal.len() + self.hashed.len()
    }

    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.hashed.is_empty()
    }

    fn get_mut(&mut self, key: KeyRef<'_>) -> Option<&mut V> {
        match key {
            KeyRef::Literal(k) => self.literal.get_mut(k),
            KeyRef::Hashed(d) => self.hashed.get_mut(&d),
        }
    }

    fn insert(&mut self, key: KeyRef<'_>, value: V) {
        match key {
            KeyRef::Literal(k) => self.literal.insert(k.clone(), value),
            KeyRef::Hashed(d) => self.hashed.insert(d, value),
        };
    }

    fn retain(&mut self, mut keep: impl FnMut(&mut V) -> bool) {
        self.literal.retain(|_, v| keep(v));
        self.hashed.retain(|_, v| keep(v));
    }

    fn for_each_mut(&mut self, mut f: impl FnMut(KeyRef<'_>, &mut V)) {
        for (k, v) in self.literal.iter_mut() {
            f(KeyRef::Literal(k), v);
        }
        for (d, v) in self.hashed.iter_mut() {
            f(KeyRef::Hashed(*d), v);
        }
    }

    fn into_entries(self) -> impl Iterator<Item = (StoredKey, V)> {
        let literal = self
            .literal
            .into_iter()
            .map(|(k, v)| (StoredKey(Stored::Literal(k)), v));
        let hashed = self
            .hashed
            .into_iter()
            .map(|(d, v)| (StoredKey(Stored::Hashed(d)), v));
        literal.chain(hashed)
    }
}

/// `capacity` split into shards of at least [`MIN_SHARD`], at most [`MAX_SHARDS`] of them;
/// the first shards take the remainder, so the caps add up to `capacity`.
fn shard_caps(capacity: usize) -> impl Iterator<Item = usize> {
    let capacity = capacity.max(1);
    let n = (capacity / MIN_SHARD).clamp(1, MAX_SHARDS);
    (0..n).map(move |i| capacity / n + usize::from(i < capacity % n))
}

fn pick<'s, T>(shards: &'s [Mutex<T>], hasher: &Hasher, key: KeyRef<'_>) -> &'s Mutex<T> {
    // The top bits: the maps themselves use the low ones.
    let i = ((key.hash(hasher) >> 32) as usize) % shards.len();
    &shards[i]
}

// ---------------------------------------------------------------------------------------
// Quotas
// ---------------------------------------------------------------------------------------

/// The answer to one [`Quotas::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaVerdict {
    /// Whether the request fits (and its cost was taken).
    pub allowed: bool,
    /// Units used in the period, after this check.
    pub used: u64,
    pub limit: u64,
    /// `limit - used`, at least 0.
    pub remaining: u64,
    /// Time until the period ends and the quota is whole again: the `Retry-After` of a
    /// refusal, to the nanosecond (waiting exactly this long is enough).
    pub reset_after: Duration,
    /// The period's start, in Unix seconds.
    pub period_start: i64,
    /// The request was refused only because the key is new and the map is full of keys using
    /// their quota this period (see the [module docs](self#bounds-and-what-happens-when-full)).
    pub table_full: bool,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    period_start: i64,
    used: u64,
    /// Changed since the last [`Quotas::dirty`].
    dirty: bool,
}

struct QuotaShard {
    map: KeyMap<Entry>,
    cap: usize,
    /// The period in which this shard last dropped its past entries.
    purged_for: Option<i64>,
}

impl QuotaShard {
    /// Drops the entries that change no verdict: those of periods before `current_start`, and
    /// those that used nothing.
    fn purge(&mut self, current_start: i64) -> usize {
        let before = self.map.len();
        self.map
            .retain(|e| e.period_start >= current_start && e.used > 0);
        before - self.map.len()
    }

    /// Whether a new key fits, after dropping past entries (once per period).
    fn make_room(&mut self, current_start: i64) -> bool {
        if self.map.len() < self.cap {
            return true;
        }
        if self.purged_for != Some(current_start) {
            self.purged_for = Some(current_start);
            self.purge(current_start);
        }
        self.map.len() < self.cap
    }
}

/// One plan's quota: a [`QuotaSpec`] and the use of each key, bounded, with the hooks a
/// flusher needs. Also counts each key's daily use in a [`DailyUsage`]. See the
/// [module docs](self).
pub struct Quotas {
    spec: QuotaSpec,
    capacity: usize,
    shards: Box<[Mutex<QuotaShard>]>,
    hasher: Hasher,
    daily: Arc<DailyUsage>,
}

impl fmt::Debug for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field("spec", &self.spec)
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl Quotas {
    /// A quota of `spec` for up to `capacity` keys (at least 1), counting daily use for up to
    /// `capacity` keys between drains.
    pub fn new(spec: QuotaSpec, capacity: usize) -> Quotas {
        Quotas::with_daily(spec, capacity, Arc::new(DailyUsage::new(capacity)))
    }

    /// A quota that counts daily use into `daily` (shared, say, with the plan's previous
    /// `Quotas` across a reload).
    pub fn with_daily(spec: QuotaSpec, capacity: usize, daily: Arc<DailyUsage>) -> Quotas {
        Quotas::build(spec, capacity, daily, Hasher::default())
    }

    fn build(spec: QuotaSpec, capacity: usize, daily: Arc<DailyUsage>, hasher: Hasher) -> Quotas {
        let shards = shard_caps(capacity)
            .map(|cap| {
                Mutex::new(QuotaShard {
                    map: KeyMap::new(&hasher),
                    cap,
                    purged_for: None,
                })
            })
            .collect();
        Quotas {
            spec,
            capacity: capacity.max(1),
            shards,
            hasher,
            daily,
        }
    }

    pub fn spec(&self) -> &QuotaSpec {
        &self.spec
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The daily use this quota counts into.
    pub fn daily(&self) -> &Arc<DailyUsage> {
        &self.daily
    }

    fn shard(&self, key: KeyRef<'_>) -> &Mutex<QuotaShard> {
        pick(&self.shards, &self.hasher, key)
    }

    /// Checks a request of `cost` units for `key` at `now_unix_nanos`, taking the cost only
    /// if it fits in what is left of the period; a refused request takes nothing. A cost of 0
    /// only reads. What is taken is also counted in [`Quotas::daily`].
    pub fn check(&self, key: &Key, now_unix_nanos: i64, cost: u64) -> QuotaVerdict {
        let k = KeyRef::of(key);
        let current = self.spec.period(now_unix_nanos.div_euclid(NANOS_PER_SEC));
        let verdict = {
            let mut shard = self.shard(k).lock();
            match shard.map.get_mut(k) {
                Some(entry) => self.charge(entry, current, now_unix_nanos, cost),
                None => {
                    let mut entry = Entry {
                        period_start: current.0,
                        used: 0,
                        dirty: false,
                    };
                    let mut verdict = self.charge(&mut entry, current, now_unix_nanos, cost);
                    if entry.used > 0 {
                        if shard.make_room(current.0) {
                            shard.map.insert(k, entry);
                        } else {
                            verdict.allowed = false;
                            verdict.used = 0;
                            verdict.remaining = self.spec.limit;
                            verdict.table_full = true;
                        }
                    }
                    verdict
                }
            }
        };
        if verdict.allowed && cost > 0 {
            self.daily.record(key, now_unix_nanos, cost);
        }
        verdict
    }

    /// Takes `cost` from `entry` if it fits, first moving it into the `current` period if it
    /// is from an earlier one. An entry from a later period (the clock stepped back) keeps
    /// its period: forgetting its use would hand out a fresh quota.
    fn charge(&self, entry: &mut Entry, current: (i64, i64), now: i64, cost: u64) -> QuotaVerdict {
        let (start, end) = if entry.period_start < current.0 {
            entry.period_start = current.0;
            entry.used = 0;
            current
        } else if entry.period_start > current.0 {
            self.spec.period(entry.period_start)
        } else {
            current
        };
        let limit = self.spec.limit;
        let allowed = entry.used.checked_add(cost).is_some_and(|u| u <= limit);
        if allowed && cost > 0 {
            entry.used += cost;
            entry.dirty = true;
        }
        let reset_after = i128::from(end) * i128::from(NANOS_PER_SEC) - i128::from(now);
        QuotaVerdict {
            allowed,
            used: entry.used,
            limit,
            remaining: limit.saturating_sub(entry.used),
            reset_after: Duration::from_nanos(
                u64::try_from(reset_after.max(0)).unwrap_or(u64::MAX),
            ),
            period_start: start,
            table_full: false,
        }
    }

    /// Merges a count read from the store: `used` units in the period starting at
    /// `period_start`. A later period replaces an earlier one; in the same period the larger
    /// count wins; an earlier period is ignored. A loaded entry is not dirty (the store has
    /// it). Returns false if the key is new and there is no room for it.
    pub fn load(&self, key: &StoredKey, period_start: i64, used: u64) -> bool {
        if used == 0 {
            return true; // the same as a key never seen
        }
        let k = KeyRef::stored(key);
        let mut shard = self.shard(k).lock();
        match shard.map.get_mut(k) {
            Some(e) if period_start > e.period_start => {
                e.period_start = period_start;
                e.used = used;
            }
            Some(e) if period_start == e.period_start => e.used = e.used.max(used),
            Some(_) => {}
            None => {
                if shard.map.len() >= shard.cap {
                    // Entries older than a loaded one are from past periods.
                    shard.purge(period_start);
                    if shard.map.len() >= shard.cap {
                        return false;
                    }
                }
                shard.purged_for = None;
                shard.map.insert(
                    k,
                    Entry {
                        period_start,
                        used,
                        dirty: false,
                    },
                );
            }
        }
        true
    }

    /// The entries changed since the last call, as `(key, period_start, used)`, clearing their
    /// dirty flag: what a flusher writes to the store.
    pub fn dirty(&self) -> Vec<(StoredKey, i64, u64)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            shard.lock().map.for_each_mut(|k, e| {
                if e.dirty {
                    e.dirty = false;
                    out.push((k.to_stored(), e.period_start, e.used));
                }
            });
        }
        out
    }

    /// Marks these keys dirty again (after a failed write of what [`Quotas::dirty`] returned),
    /// so the next call returns their current counts.
    pub fn mark_dirty<'k>(&self, keys: impl IntoIterator<Item = &'k StoredKey>) {
        for key in keys {
            let k = KeyRef::stored(key);
            if let Some(e) = self.shard(k).lock().map.get_mut(k) {
                e.dirty = true;
            }
        }
    }

    /// Drops every entry of a period before the one containing `now_unix_nanos` (for a
    /// periodic task; never needed for correctness). Returns how many went.
    pub fn purge(&self, now_unix_nanos: i64) -> usize {
        let (start, _) = self.spec.period(now_unix_nanos.div_euclid(NANOS_PER_SEC));
        self.shards.iter().map(|s| s.lock().purge(start)).sum()
    }

    /// The use of `key` in the period containing `now_unix_nanos`, without changing anything.
    pub fn used(&self, key: &Key, now_unix_nanos: i64) -> u64 {
        let k = KeyRef::of(key);
        let (start, _) = self.spec.period(now_unix_nanos.div_euclid(NANOS_PER_SEC));
        self.shard(k)
            .lock()
            .map
            .get_mut(k)
            .filter(|e| e.period_start >= start)
            .map_or(0, |e| e.used)
    }

    /// The same use under a new spec (a reload changed the limit, period or reset time): each
    /// key's use in the period containing `now_unix_nanos` carries over to the new spec's
    /// current period, and earlier periods are dropped. Daily counts are shared, not copied.
    pub fn respec(&self, spec: QuotaSpec, now_unix_nanos: i64) -> Quotas {
        // The same hasher and capacity: every key lands in the shard of the same index.
        let next = Quotas::build(spec, self.capacity, self.daily.clone(), self.hasher.clone());
        let now_secs = now_unix_nanos.div_euclid(NANOS_PER_SEC);
        let (old_start, _) = self.spec.period(now_secs);
        let (new_start, _) = spec.period(now_secs);
        for shard in self.shards.iter() {
            shard.lock().map.for_each_mut(|k, e| {
                if e.period_start >= old_start && e.used > 0 {
                    // No room check: the shard of the same index had room for it.
                    next.shard(k).lock().map.insert(
                        k,
                        Entry {
                            period_start: new_start,
                            used: e.used,
                            dirty: e.dirty || e.period_start != new_start,
                        },
                    );
                }
            });
        }
        next
    }

    /// Keys held (including entries of past periods not yet dropped).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`DailyUsage::drain`] of [`Quotas::daily`].
    pub fn drain_daily(&self) -> Vec<(StoredKey, i64, u64)> {
        self.daily.drain()
    }
}

// ---------------------------------------------------------------------------------------
// Daily usage
// ---------------------------------------------------------------------------------------

struct DailyShard {
    /// The UTC days seen since the last drain (usually one; two around midnight), each with
    /// its counts per key.
    days: Vec<(i64, KeyMap<u64>)>,
    len: usize,
    cap: usize,
}

impl DailyShard {
    fn add(&mut self, hasher: &Hasher, key: KeyRef<'_>, day: i64, n: u64, bounded: bool) -> bool {
        let i = match self.days.iter().position(|(d, _)| *d == day) {
            Some(i) => i,
            None => {
                self.days.push((day, KeyMap::new(hasher)));
                self.days.len() - 1
            }
        };
        let map = &mut self.days[i].1;
        if let Some(count) = map.get_mut(key) {
            *count = count.saturating_add(n);
            return true;
        }
        if bounded && self.len >= self.cap {
            if map.is_empty() {
                self.days.swap_remove(i);
            }
            return false;
        }
        map.insert(key, n);
        self.len += 1;
        true
    }
}

/// Units used per key and UTC day, as deltas since the last [`DailyUsage::drain`], for reports
/// like API Gateway's `GetUsage`. A [`Quotas`] counts into one; a plan without a quota uses
/// one alone. Bounded: see the [module docs](self#bounds-and-what-happens-when-full).
///
/// ```
/// use portcullis_limits::quota::{day_string, DailyUsage, StoredKey};
/// use portcullis_limits::Key;
///
/// let usage = DailyUsage::new(10_000);
/// let noon = 1_796_558_400 * 1_000_000_000; // 2026-12-06 12:00 UTC
/// usage.record(&Key::from("alice"), noon, 1);
/// usage.record(&Key::from("alice"), noon, 2);
/// let rows = usage.drain();
/// assert_eq!(rows, vec![(StoredKey::of(&Key::from("alice")), rows[0].1, 3)]);
/// assert_eq!(day_string(rows[0].1), "2026-12-06");
/// assert!(usage.drain().is_empty());
/// ```
pub struct DailyUsage {
    shards: Box<[Mutex<DailyShard>]>,
    hasher: Hasher,
    dropped: AtomicU64,
}

impl fmt::Debug for DailyUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DailyUsage")
            .field("len", &self.len())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl DailyUsage {
    /// Counts for up to `capacity` (key, day) pairs between drains (at least 1).
    pub fn new(capacity: usize) -> DailyUsage {
        DailyUsage {
            shards: shard_caps(capacity)
                .map(|cap| {
                    Mutex::new(DailyShard {
                        days: Vec::new(),
                        len: 0,
                        cap,
                    })
                })
                .collect(),
            hasher: Hasher::default(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Counts `n` units for `key` on the UTC day of `now_unix_nanos`. Returns false (and adds
    /// `n` to [`DailyUsage::dropped`]) if the pair is new and the counts are full.
    pub fn record(&self, key: &Key, now_unix_nanos: i64, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let k = KeyRef::of(key);
        let counted = pick(&self.shards, &self.hasher, k).lock().add(
            &self.hasher,
            k,
            day_of(now_unix_nanos),
            n,
            true,
        );
        if !counted {
            self.dropped.fetch_add(n, Ordering::Relaxed);
        }
        counted
    }

    /// The counts since the last drain, as `(key, day, delta)`, leaving none.
    pub fn drain(&self) -> Vec<(StoredKey, i64, u64)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let days = {
                let mut s = shard.lock();
                s.len = 0;
                std::mem::take(&mut s.days)
            };
            for (day, map) in days {
                out.extend(map.into_entries().map(|(k, n)| (k, day, n)));
            }
        }
        out
    }

    /// Adds drained rows back (after a failed write), beyond the bound if need be: at worst
    /// the counts hold twice their capacity until the next successful drain.
    pub fn put_back(&self, rows: impl IntoIterator<Item = (StoredKey, i64, u64)>) {
        for (key, day, n) in rows {
            if n == 0 {
                continue;
            }
            let k = KeyRef::stored(&key);
            pick(&self.shards, &self.hasher, k)
                .lock()
                .add(&self.hasher, k, day, n, false);
        }
    }

    /// Units not counted because the counts were full, since this was made.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// (key, day) pairs held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wall::{ManualWallClock, WallClock};

    const S: i64 = NANOS_PER_SEC;

    /// Unix seconds of a UTC date and time.
    fn at(y: i64, mo: u32, d: u32, h: i64, mi: i64) -> i64 {
        days_from_civil(y, mo, d) * SECS_PER_DAY + h * 3600 + mi * 60
    }

    fn spec(limit: u64, per: Per, reset: &str) -> QuotaSpec {
        QuotaSpec::new(limit, per, ResetAt::parse(reset).unwrap()).unwrap()
    }

    #[test]
    fn civil_dates_round_trip_and_match_known_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2026, 12, 6), 20_793);
        assert_eq!(days_from_civil(2028, 2, 29), 21_243);
        assert_eq!(
            days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28),
            2
        );
        assert_eq!(
            days_from_civil(1900, 3, 1) - days_from_civil(1900, 2, 28),
            1
        );
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        for day in -800_000..800_000 {
            let (y, m, d) = civil_from_days(day);
            assert!((1..=12).contains(&m) && d >= 1 && d <= days_in_month(y, m));
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(Weekday::of_day(0), Weekday::Thursday);
        assert_eq!(Weekday::of_day(20_793), Weekday::Sunday); // 2026-12-06
        assert_eq!(Weekday::of_day(-4), Weekday::Sunday); // 1969-12-28
                                                          // Extremes clamp instead of overflowing.
        let _ = days_from_civil(i64::MAX, 12, u32::MAX);
        let _ = civil_from_days(i64::MIN);
        let _ = spec(1, Per::Month, "00:00").period(i64::MIN);
        let _ = spec(1, Per::Week, "23:59").period(i64::MAX);
    }

    #[test]
    fn days_print_and_parse_as_yyyy_mm_dd() {
        assert_eq!(day_string(20_793), "2026-12-06");
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(parse_day("2026-12-06"), Ok(20_793));
        assert_eq!(parse_day("2028-02-29"), Ok(21_243));
        assert_eq!(day_of(20_793 * NANOS_PER_DAY + 5), 20_793);
        assert_eq!(day_of(-1), -1);
        for (bad, says) in [
            ("2027-02-29", "not a leap year"),
            ("2026-13-01", "months are 01 to 12"),
            ("2026-04-31", "days 01 to 30"),
            ("2026-4-3", "YYYY-MM-DD"),
            ("06/12/2026", "YYYY-MM-DD"),
            ("", "YYYY-MM-DD"),
        ] {
            let err = parse_day(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn resets_parse_in_utc_only_with_fixes() {
        assert_eq!(ResetAt::parse("00:00 UTC").unwrap(), ResetAt::MIDNIGHT);
        let r = ResetAt::parse("09:30 UTC").unwrap();
        assert_eq!((r.minutes(), r.week_start()), (570, Weekday::Monday));
        assert_eq!(ResetAt::parse("9:30").unwrap(), r);
        assert_eq!(r.to_string(), "09:30 UTC");
        let r = ResetAt::parse("sunday 23:59 utc").unwrap();
        assert_eq!(
            (r.minutes(), r.week_start()),
            (23 * 60 + 59, Weekday::Sunday)
        );
        assert_eq!(r.to_string(), "Sunday 23:59 UTC");
        assert_eq!(ResetAt::parse(&r.to_string()).unwrap(), r);
        assert_eq!(
            ResetAt::parse("Sat 06:00").unwrap().week_start(),
            Weekday::Saturday
        );

        for (bad, says) in [
            ("09:30 CET", "UTC only"),
            ("09:30 +02:00", "UTC only"),
            ("09:30 Europe/Paris", "UTC only"),
            ("24:00 UTC", "hours are 00 to 23"),
            ("09:60", "minutes 00 to 59"),
            ("9am", "24-hour"),
            ("09:30:15 UTC", "to the minute"),
            ("UTC", "HH:MM UTC"),
            ("", "HH:MM UTC"),
            ("09:30 UTC tomorrow", "unexpected `tomorrow`"),
            ("Mon Tue 00:00", "two weekdays"),
        ] {
            let err = ResetAt::parse(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
            assert!(err.contains(&format!("`{bad}`")), "{bad:?}: {err}");
        }
        assert_eq!(Per::parse("Month"), Ok(Per::Month));
        assert!(Per::parse("year")
            .unwrap_err()
            .to_string()
            .contains("`day`, `week` or `month`"));
        assert!(QuotaSpec::new(0, Per::Day, ResetAt::MIDNIGHT).is_err());
        let err = QuotaSpec::new(5, Per::Day, ResetAt::parse("Sunday 00:00").unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("only applies to `per: week`"),
            "{err}"
        );
    }

    #[test]
    fn daily_periods_start_at_the_reset_time() {
        let q = spec(1, Per::Day, "00:00 UTC");
        let day = at(2026, 12, 6, 0, 0);
        assert_eq!(q.period(day), (day, day + SECS_PER_DAY));
        assert_eq!(q.period(day + SECS_PER_DAY - 1), (day, day + SECS_PER_DAY));
        assert_eq!(q.period(day - 1), (day - SECS_PER_DAY, day));

        let q = spec(1, Per::Day, "09:30 UTC");
        let reset = at(2026, 12, 6, 9, 30);
        assert_eq!(q.period(reset), (reset, reset + SECS_PER_DAY));
        // Before 09:30 the period began yesterday at 09:30.
        assert_eq!(q.period(reset - 1), (reset - SECS_PER_DAY, reset));
        assert_eq!(
            q.period(at(2026, 12, 6, 0, 0)),
            (reset - SECS_PER_DAY, reset)
        );
        // Before 1970 too.
        let old = at(1969, 12, 31, 9, 30);
        assert_eq!(q.period(old + 1), (old, old + SECS_PER_DAY));
    }

    #[test]
    fn weekly_periods_start_on_the_start_weekday() {
        // 2026-11-30 is a Monday, 2026-12-06 a Sunday.
        let q = spec(1, Per::Week, "00:00 UTC");
        let monday = at(2026, 11, 30, 0, 0);
        let next = at(2026, 12, 7, 0, 0);
        assert_eq!(q.period(monday), (monday, next));
        assert_eq!(q.period(at(2026, 12, 6, 23, 59)), (monday, next));
        assert_eq!(q.period(next), (next, next + 7 * SECS_PER_DAY));
        assert_eq!(q.period(monday - 1), (monday - 7 * SECS_PER_DAY, monday));

        let q = spec(1, Per::Week, "Sunday 09:30 UTC");
        let sunday = at(2026, 12, 6, 9, 30);
        assert_eq!(q.period(sunday), (sunday, sunday + 7 * SECS_PER_DAY));
        assert_eq!(q.period(sunday - 1), (sunday - 7 * SECS_PER_DAY, sunday));
        assert_eq!(
            q.period(at(2026, 12, 12, 12, 0)),
            (sunday, sunday + 7 * SECS_PER_DAY)
        );
    }

    #[test]
    fn monthly_periods_have_the_real_month_lengths() {
        let q = spec(1, Per::Month, "00:00 UTC");
        // February of a leap year: 29 days, and 2028-02-29 is inside it.
        let feb = at(2028, 2, 1, 0, 0);
        let mar = at(2028, 3, 1, 0, 0);
        assert_eq!(mar - feb, 29 * SECS_PER_DAY);
        assert_eq!(q.period(at(2028, 2, 29, 23, 59)), (feb, mar));
        assert_eq!(q.period(mar), (mar, at(2028, 4, 1, 0, 0)));
        // February of a common year: 28 days; 02-28 23:59 is the last minute.
        let (f, m) = (at(2027, 2, 1, 0, 0), at(2027, 3, 1, 0, 0));
        assert_eq!(q.period(at(2027, 2, 28, 23, 59)), (f, m));
        assert_eq!(m - f, 28 * SECS_PER_DAY);
        // December to January crosses the year.
        let dec = at(2026, 12, 1, 0, 0);
        let jan = at(2027, 1, 1, 0, 0);
        assert_eq!(q.period(jan - 1), (dec, jan));
        assert_eq!(q.period(jan), (jan, at(2027, 2, 1, 0, 0)));

        // With a 09:30 reset, the month starts on the 1st at 09:30: 1 January 08:00 is still
        // in December's period.
        let q = spec(1, Per::Month, "09:30 UTC");
        let dec = at(2026, 12, 1, 9, 30);
        let jan = at(2027, 1, 1, 9, 30);
        assert_eq!(q.period(at(2027, 1, 1, 8, 0)), (dec, jan));
        assert_eq!(q.period(jan), (jan, at(2027, 2, 1, 9, 30)));
        assert_eq!(
            q.period(at(2028, 3, 1, 9, 29)),
            (at(2028, 2, 1, 9, 30), at(2028, 3, 1, 9, 30))
        );
    }

    #[test]
    fn a_quota_runs_out_and_says_exactly_when_it_resets() {
        let plan = Quotas::new(spec(10, Per::Day, "09:30 UTC"), 100);
        let k = Key::from("alice");
        // 2026-12-06 09:00:00.25 UTC: 30 minutes minus a quarter second before the reset.
        let now = at(2026, 12, 6, 9, 0) * S + 250_000_000;
        let v = plan.check(&k, now, 4);
        assert_eq!(
            v,
            QuotaVerdict {
                allowed: true,
                used: 4,
                limit: 10,
                remaining: 6,
                reset_after: Duration::from_secs(1800) - Duration::from_millis(250),
                period_start: at(2026, 12, 5, 9, 30),
                table_full: false,
            }
        );
        assert!(plan.check(&k, now, 6).allowed);
        let v = plan.check(&k, now, 1);
        assert!(!v.allowed);
        assert_eq!((v.used, v.remaining), (10, 0));
        assert_eq!(
            v.reset_after,
            Duration::from_secs(1800) - Duration::from_millis(250)
        );
        // One nanosecond before the reset: still refused. At the reset: a fresh period.
        let reset = at(2026, 12, 6, 9, 30) * S;
        assert!(!plan.check(&k, reset - 1, 1).allowed);
        let v = plan.check(&k, reset, 1);
        assert!(v.allowed);
        assert_eq!((v.used, v.period_start), (1, reset / S));
        assert_eq!(v.reset_after, Duration::from_secs(86_400));
    }

    #[test]
    fn the_quota_resets_at_the_boundary_on_a_manual_wall_clock() {
        let plan = Quotas::new(spec(2, Per::Month, "00:00 UTC"), 100);
        let k = Key::from("bob");
        let clock = ManualWallClock::from_unix_secs(at(2028, 2, 29, 23, 59));
        assert!(plan.check(&k, clock.unix_nanos(), 2).allowed);
        let v = plan.check(&k, clock.unix_nanos(), 1);
        assert!(!v.allowed);
        assert_eq!(v.reset_after, Duration::from_secs(60));
        clock.advance(v.reset_after - Duration::from_nanos(1));
        assert!(!plan.check(&k, clock.unix_nanos(), 1).allowed);
        clock.advance(Duration::from_nanos(1));
        let v = plan.check(&k, clock.unix_nanos(), 1);
        assert!(v.allowed);
        assert_eq!(v.period_start, at(2028, 3, 1, 0, 0));
        assert_eq!(v.reset_after, Duration::from_secs(31 * 86_400));
    }

    #[test]
    fn refused_requests_take_nothing() {
        let plan = Quotas::new(spec(10, Per::Day, "00:00"), 100);
        let k = Key::from("carol");
        let now = at(2026, 12, 6, 12, 0) * S;
        // Too big for the whole quota: refused, nothing stored.
        let v = plan.check(&k, now, 11);
        assert!(!v.allowed);
        assert_eq!((v.used, v.remaining), (0, 10));
        assert!(plan.is_empty());
        assert!(plan.check(&k, now, 7).allowed);
        // 4 more do not fit; 3 still do.
        assert!(!plan.check(&k, now, 4).allowed);
        assert!(!plan.check(&k, now, u64::MAX).allowed);
        let v = plan.check(&k, now, 3);
        assert!(v.allowed);
        assert_eq!(v.used, 10);
        // A read takes nothing.
        assert_eq!(plan.check(&Key::from("dave"), now, 0).remaining, 10);
        assert_eq!(plan.len(), 1);
        // The daily count has only what was taken.
        let rows = plan.drain_daily();
        assert_eq!(rows, vec![(StoredKey::of(&k), day_of(now), 10)]);
    }

    #[test]
    fn load_keeps_the_larger_count_and_the_later_period() {
        let plan = Quotas::new(spec(100, Per::Day, "00:00"), 100);
        let k = Key::from("erin");
        let sk = StoredKey::of(&k);
        let now = at(2026, 12, 6, 12, 0) * S;
        let today = at(2026, 12, 6, 0, 0);
        assert!(plan.check(&k, now, 10).allowed);
        plan.dirty();

        assert!(plan.load(&sk, today, 5)); // smaller: memory wins
        assert_eq!(plan.used(&k, now), 10);
        assert!(plan.load(&sk, today, 40)); // larger: the store wins
        assert_eq!(plan.used(&k, now), 40);
        assert!(plan.load(&sk, today - SECS_PER_DAY, 99)); // yesterday: ignored
        assert_eq!(plan.check(&k, now, 1).used, 41);
        assert!(plan.dirty().iter().all(|(_, _, used)| *used == 41));

        // A new key loaded from the store counts from the loaded value, and is not dirty.
        let frank = Key::from("frank");
        assert!(plan.load(&StoredKey::of(&frank), today, 100));
        assert!(plan.dirty().is_empty());
        let v = plan.check(&frank, now, 1);
        assert!(!v.allowed);
        assert_eq!(v.used, 100);
        // A later period replaces an earlier one.
        let plan = Quotas::new(spec(100, Per::Day, "00:00"), 100);
        assert!(plan.check(&k, now - SECS_PER_DAY * S, 50).allowed);
        assert!(plan.load(&sk, today, 3));
        assert_eq!(plan.used(&k, now), 3);
    }

    #[test]
    fn dirty_returns_each_change_once() {
        let plan = Quotas::new(spec(100, Per::Week, "00:00"), 100);
        let now = at(2026, 12, 6, 12, 0) * S;
        let week = at(2026, 11, 30, 0, 0);
        let (a, b) = (Key::from("a"), Key::from("b"));
        plan.check(&a, now, 1);
        plan.check(&a, now, 2);
        plan.check(&b, now, 5);
        plan.check(&b, now, 500); // refused: no change
        let mut rows = plan.dirty();
        rows.sort();
        assert_eq!(
            rows,
            vec![(StoredKey::of(&a), week, 3), (StoredKey::of(&b), week, 5)]
        );
        assert!(plan.dirty().is_empty());
        plan.check(&b, now, 1);
        assert_eq!(plan.dirty(), vec![(StoredKey::of(&b), week, 6)]);
        // After a failed write, marking them dirty again returns them again.
        plan.mark_dirty([&StoredKey::of(&a)]);
        assert_eq!(plan.dirty(), vec![(StoredKey::of(&a), week, 3)]);
    }

    #[test]
    fn daily_usage_counts_per_utc_day_and_drains_deltas() {
        let usage = DailyUsage::new(100);
        let (a, b) = (Key::from("a"), Key::from("b"));
        let late = at(2026, 12, 6, 23, 59) * S;
        let early = at(2026, 12, 7, 0, 1) * S;
        usage.record(&a, late, 2);
        usage.record(&a, early, 1);
        usage.record(&b, early, 4);
        usage.record(&b, early, 0);
        let mut rows = usage.drain();
        rows.sort();
        let (d6, d7) = (
            parse_day("2026-12-06").unwrap(),
            parse_day("2026-12-07").unwrap(),
        );
        assert_eq!(
            rows,
            vec![
                (StoredKey::of(&a), d6, 2),
                (StoredKey::of(&a), d7, 1),
                (StoredKey::of(&b), d7, 4)
            ]
        );
        assert!(usage.drain().is_empty() && usage.is_empty());
        usage.record(&a, early, 1);
        usage.put_back(rows);
        let mut again = usage.drain();
        again.sort();
        assert_eq!(again[1], (StoredKey::of(&a), d7, 2));
        assert_eq!(again.len(), 3);

        // Bounded: a full set of counts drops new pairs and says how much it missed.
        let small = DailyUsage::new(2);
        assert!(small.record(&a, early, 1));
        assert!(small.record(&b, early, 1));
        assert!(!small.record(&Key::from("c"), early, 7));
        assert!(small.record(&a, early, 1), "a known pair still counts");
        assert_eq!((small.len(), small.dropped()), (2, 7));
    }

    #[test]
    fn hashed_keys_survive_the_round_trip_through_storage() {
        let long = Key::new(&[b'x'; 1000]);
        let sk = StoredKey::of(&long);
        assert!(sk.is_hashed() && sk.matches(&long) && sk.to_key().is_none());
        let bytes = sk.to_bytes();
        assert_eq!(bytes.len(), 1 + INLINE_LEN);
        let back = StoredKey::from_bytes(&bytes).unwrap();
        assert_eq!(back, sk);
        assert_eq!(back.to_string(), long.to_string());
        // A literal key with the digest's bytes is a different stored key.
        let literal = StoredKey::of(&Key::new(long.as_bytes()));
        assert_ne!(literal, sk);
        assert_ne!(literal.to_bytes(), bytes);
        assert_eq!(StoredKey::from_bytes(&literal.to_bytes()), Some(literal));
        assert_eq!(StoredKey::from_bytes(b""), None);
        assert_eq!(StoredKey::from_bytes(&[1, 2, 3]), None);
        assert_eq!(StoredKey::from_bytes(&[9, 2, 3]), None);
        assert_eq!(StoredKey::of(&Key::from("alice")).to_bytes(), b"\0alice");

        // A quota loaded for the stored form applies to the long key.
        let plan = Quotas::new(spec(10, Per::Day, "00:00"), 100);
        let now = at(2026, 12, 6, 12, 0) * S;
        assert!(plan.load(&back, at(2026, 12, 6, 0, 0), 10));
        assert!(!plan.check(&long, now, 1).allowed);
        assert!(plan.check(&Key::new(long.as_bytes()), now, 1).allowed);
    }

    #[test]
    fn a_full_map_drops_past_periods_then_refuses_new_keys() {
        let plan = Quotas::new(spec(10, Per::Day, "00:00"), 64);
        let day1 = at(2026, 12, 6, 12, 0) * S;
        let day2 = day1 + SECS_PER_DAY * S;
        for i in 0..64u32 {
            assert!(plan.check(&Key::new(&i.to_be_bytes()), day1, 1).allowed);
        }
        let v = plan.check(&Key::from("late"), day1, 1);
        assert!(!v.allowed && v.table_full, "no current entry is forgotten");
        assert!(plan.check(&Key::new(&5u32.to_be_bytes()), day1, 1).allowed);
        // The next day, yesterday's entries make room.
        let v = plan.check(&Key::from("late"), day2, 1);
        assert!(v.allowed && !v.table_full);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan.purge(day2 + SECS_PER_DAY * S), 1);
    }

    #[test]
    fn a_clock_stepped_back_does_not_hand_out_a_fresh_quota() {
        let plan = Quotas::new(spec(5, Per::Day, "00:00"), 100);
        let k = Key::from("k");
        let day2 = at(2026, 12, 7, 0, 0) * S;
        assert!(plan.check(&k, day2, 5).allowed);
        let v = plan.check(&k, day2 - S, 1);
        assert!(!v.allowed);
        assert_eq!(v.period_start, day2 / S);
        assert_eq!(v.reset_after, Duration::from_secs(86_401));
    }

    #[test]
    fn respec_carries_this_periods_use() {
        let plan = Quotas::new(spec(5, Per::Day, "00:00"), 100);
        let k = Key::from("k");
        let now = at(2026, 12, 6, 12, 0) * S;
        plan.check(&k, now, 5);
        plan.check(&Key::from("old"), now - SECS_PER_DAY * S, 1);
        plan.dirty();
        let bigger = plan.respec(spec(8, Per::Month, "00:00"), now);
        let v = bigger.check(&k, now, 1);
        assert!(v.allowed);
        assert_eq!((v.used, v.period_start), (6, at(2026, 12, 1, 0, 0)));
        assert_eq!(bigger.len(), 1);
        assert_eq!(bigger.dirty().len(), 1);
        assert!(Arc::ptr_eq(bigger.daily(), plan.daily()));
    }

    #[test]
    fn threads_charging_one_key_never_exceed_the_limit() {
        let plan = Arc::new(Quotas::new(spec(1_000, Per::Day, "00:00"), 1_000));
        let now = at(2026, 12, 6, 12, 0) * S;
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let plan = plan.clone();
                std::thread::spawn(move || {
                    let k = Key::from("shared");
                    (0..500).filter(|_| plan.check(&k, now, 1).allowed).count()
                })
            })
            .collect();
        let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(admitted, 1_000);
        assert_eq!(plan.used(&Key::from("shared"), now), 1_000);
        assert_eq!(plan.drain_daily()[0].2, 1_000);
    }
}
