//! The two small value types the counters are defined with:
//!
//! * a [`Period`], the span of a sliding window, written `<whole number><unit>` with unit
//!   `ms`, `s`, `m`, `h` or `d` (`10s`, `1m`, `1h`), between 1ms and 30 days. This crate parses
//!   it itself (for counter names like `http_req_rate(10s)`), because it must not depend on
//!   the config crate.
//! * a [`Rate`], `count` events per `per` (100 per second), for [`crate::gcra`]. The config
//!   crate parses the text form (`100/s`); here it is only a value.
//!
//! ```
//! use portcullis_limits::{Period, Rate};
//! use std::time::Duration;
//!
//! let p: Period = "1m".parse()?;
//! assert_eq!(p.as_duration(), Duration::from_secs(60));
//! assert_eq!(p.to_string(), "1m");
//! assert_eq!(Period::parse("90s")?.to_string(), "90s");
//!
//! let err = Period::parse("10 seconds").unwrap_err().to_string();
//! assert!(err.contains("e.g. `10s`"), "{err}");
//!
//! let r = Rate::new(5000, Duration::from_secs(3600))?;
//! assert_eq!(r.to_string(), "5000/h");
//! assert!(Rate::new(0, Duration::from_secs(1)).is_err());
//! # Ok::<(), portcullis_limits::Error>(())
//! ```

use crate::clock::duration_nanos;
use crate::Error;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

const MS: u64 = 1_000_000;
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000 * MS),
    ("h", 3_600_000 * MS),
    ("m", 60_000 * MS),
    ("s", 1_000 * MS),
    ("ms", MS),
];

/// The span of a sliding window: at least 1ms, at most 30 days.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    nanos: u64,
}

impl Period {
    pub const MIN: Duration = Duration::from_millis(1);
    pub const MAX: Duration = Duration::from_secs(30 * 86_400);

    /// A period of `d`, which must be within [`Period::MIN`]..=[`Period::MAX`].
    pub fn new(d: Duration) -> Result<Period, Error> {
        if d < Self::MIN {
            return Err(Error::BadPeriod {
                given: format!("{d:?}"),
                fix: "a period must be at least 1ms, e.g. `10s`".into(),
            });
        }
        if d > Self::MAX {
            return Err(Error::BadPeriod {
                given: format!("{d:?}"),
                fix: "a period is at most 30d; count longer spans with a quota".into(),
            });
        }
        Ok(Period {
            nanos: duration_nanos(d),
        })
    }

    /// Parses `10s`, `1m`, `1h`, `250ms` or `1d`: a whole number, then a unit, no space.
    pub fn parse(text: &str) -> Result<Period, Error> {
        let bad = |fix: &str| Error::BadPeriod {
            given: text.to_string(),
            fix: fix.to_string(),
        };
        let t = text.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        let (num, unit) = t.split_at(digits);
        if num.is_empty() {
            return Err(bad(
                "write a whole number followed by ms, s, m, h or d, e.g. `10s`",
            ));
        }
        let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
            return Err(bad(if unit.is_empty() {
                "add a unit: ms, s, m, h or d, e.g. `10s`"
            } else {
                "write a whole number followed by ms, s, m, h or d, e.g. `10s`"
            }));
        };
        let n: u64 = num
            .parse()
            .map_err(|_| bad("the number is too large; a period is at most 30d"))?;
        let nanos = n
            .checked_mul(scale)
            .ok_or_else(|| bad("the number is too large; a period is at most 30d"))?;
        Period::new(Duration::from_nanos(nanos)).map_err(|e| match e {
            Error::BadPeriod { fix, .. } => bad(&fix),
            other => other,
        })
    }

    pub fn as_duration(self) -> Duration {
        Duration::from_nanos(self.nanos)
    }

    pub(crate) fn as_nanos(self) -> u64 {
        self.nanos
    }
}

impl FromStr for Period {
    type Err = Error;
    fn from_str(s: &str) -> Result<Period, Error> {
        Period::parse(s)
    }
}

/// The shortest exact form: `60s` prints as `1m`, `90s` as `90s`. Sub-millisecond remainders
/// (only possible through [`Period::new`]) print as a `Duration` debug value.
impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match UNITS.iter().find(|(_, scale)| self.nanos % scale == 0) {
            Some((unit, scale)) => write!(f, "{}{unit}", self.nanos / scale),
            None => write!(f, "{:?}", self.as_duration()),
        }
    }
}

/// `count` events per `per`: the steady rate of a [`crate::gcra::Gcra`] bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    count: u64,
    per: Duration,
}

impl Rate {
    /// `count` per `per`; both must be non-zero.
    pub fn new(count: u64, per: Duration) -> Result<Rate, Error> {
        if count == 0 {
            return Err(Error::BadLimit {
                fix: "a rate's count must be at least 1; to block everything, deny the route"
                    .into(),
            });
        }
        if per.is_zero() {
            return Err(Error::BadLimit {
                fix: "a rate's period must be longer than zero, e.g. 100 per 1s".into(),
            });
        }
        Ok(Rate { count, per })
    }

    /// `count` per second. Panics if `count` is zero; meant for literals.
    pub fn per_second(count: u64) -> Rate {
        Rate::new(count, Duration::from_secs(1)).expect("a rate of zero per second")
    }

    pub fn count(self) -> u64 {
        self.count
    }

    pub fn per(self) -> Duration {
        self.per
    }
}

/// `100/s`, `5000/h`, `7/10s`: the config's form where it has one.
impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Period::new(self.per) {
            Ok(p) => {
                let p = p.to_string();
                let p = p
                    .strip_prefix('1')
                    .filter(|u| u.starts_with(|c: char| c.is_ascii_alphabetic()))
                    .unwrap_or(&p);
                write!(f, "{}/{p}", self.count)
            }
            _ => write!(f, "{}/{:?}", self.count, self.per),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_read_like_the_config() {
        for (text, secs) in [
            ("10s", 10),
            ("1m", 60),
            ("1h", 3600),
            ("1d", 86_400),
            ("30d", 2_592_000),
        ] {
            assert_eq!(
                Period::parse(text).unwrap().as_duration(),
                Duration::from_secs(secs)
            );
        }
        assert_eq!(
            Period::parse("250ms").unwrap().as_duration(),
            Duration::from_millis(250)
        );
        assert_eq!(Period::parse(" 10s ").unwrap().to_string(), "10s");
        assert_eq!(Period::parse("120s").unwrap().to_string(), "2m");
        assert_eq!(Period::parse("1500ms").unwrap().to_string(), "1500ms");
    }

    #[test]
    fn bad_periods_say_how_to_fix_them() {
        let cases = [
            ("10", "add a unit"),
            ("s", "whole number"),
            ("1.5s", "whole number"),
            ("10 s", "whole number"),
            ("10x", "whole number"),
            ("2w", "whole number"),
            ("0s", "at least 1ms"),
            ("31d", "at most 30d"),
            ("99999999999999999999s", "too large"),
        ];
        for (text, fix) in cases {
            let err = Period::parse(text).unwrap_err().to_string();
            assert!(err.contains(fix), "{text}: {err}");
            assert!(err.contains(&format!("`{text}`")), "names the input: {err}");
        }
    }

    #[test]
    fn rates_must_be_positive() {
        assert!(Rate::new(0, Duration::from_secs(1)).is_err());
        assert!(Rate::new(1, Duration::ZERO).is_err());
        assert_eq!(Rate::per_second(100).to_string(), "100/s");
        assert_eq!(
            Rate::new(5000, Duration::from_secs(3600))
                .unwrap()
                .to_string(),
            "5000/h"
        );
        assert_eq!(
            Rate::new(7, Duration::from_secs(10)).unwrap().to_string(),
            "7/10s"
        );
    }
}
