//! Human units in the config: durations (`250ms`, `1s`, `2m`, `1h`), sizes (`64KiB`, `10MB`)
//! and rates (`100/s`, `5000/h`). Each parser returns a message that says what was expected,
//! so the config error can tell the user how to fix the value.

use serde::{de, Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// A duration written as `<number><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

/// A size in bytes written as `<number>[unit]`: `B`, `KB`, `MB`, `GB` (powers of 1000) or
/// `KiB`, `MiB`, `GiB` (powers of 1024). A bare number is bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Size(pub u64);

/// A rate written `<count>/<unit>` where unit is `s`, `m`, `h` or `d`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!(
            "invalid duration `{s}`: write a number and a unit, like `250ms`, `1s`, `2m` or `1h`"
        )
    })?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        "" => {
            return Err(format!(
                "duration `{s}` has no unit: write `{s}s` for seconds or `{s}ms` for milliseconds"
            ))
        }
        u => {
            return Err(format!(
                "unknown duration unit `{u}` in `{s}`: use ms, s, m, h or d"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration `{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("invalid size `{s}`: write a number and a unit, like `64KiB`, `10MiB` or `1GB`")
    })?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" | "K" | "k" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(format!(
                "unknown size unit `{u}` in `{s}`: use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || !(0.0..=1e18).contains(&v) {
        return Err(format!("size `{s}` is out of range"));
    }
    Ok(v as u64)
}

/// The largest count a rate, burst or quota may have: a Structured Field integer, which the
/// `RateLimit` and `RateLimit-Policy` headers carry them as, has at most 15 digits (RFC 9651
/// §3.3.1), and a client must refuse the whole field for a longer one.
pub const MAX_COUNT: u64 = 999_999_999_999_999;
/// [`MAX_COUNT`] as written in errors.
pub const MAX_COUNT_TEXT: &str = "999,999,999,999,999";

pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let err =
        || format!("invalid rate `{s}`: write a count per unit, like `100/s`, `600/m` or `5000/h`");
    let (count, unit) = s.trim().split_once('/').ok_or_else(err)?;
    let count: u64 = count.trim().parse().map_err(|_| err())?;
    if count > MAX_COUNT {
        return Err(format!(
            "rate `{s}` counts more than {MAX_COUNT_TEXT}, the largest integer a `RateLimit` header can carry"
        ));
    }
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86400),
        _ => return Err(err()),
    };
    Ok(Rate { count, per })
}

/// Accepts a YAML string or number and hands its text to `f`.
struct TextVisitor<F>(F, &'static str);

impl<'de, T, F: Fn(&str) -> Result<T, String>> de::Visitor<'de> for TextVisitor<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor(
            |s: &str| parse_duration(s).map(Dur),
            "a duration like `250ms`, `1s` or `2m`",
        ))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor(
            |s: &str| parse_size(s).map(Size),
            "a size like `64KiB` or `10MiB`",
        ))
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor(parse_rate, "a rate like `100/s` or `5000/h`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("3 weeks")
            .unwrap_err()
            .contains("unknown duration unit"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn rates() {
        let r = parse_rate("5000/h").unwrap();
        assert_eq!(r.count, 5000);
        assert_eq!(r.per, Duration::from_secs(3600));
        assert!(parse_rate("fast").is_err());
    }
}
