//! What a stick table stores per key: the counters named in its `store:` list, with HAProxy's
//! names. [`Counter::parse`] reads one name as written in the config, and its errors say what
//! to write instead.
//!
//! | counter | meaning |
//! |---|---|
//! | `http_req_rate(<period>)` | requests in the last period (sliding window) |
//! | `http_req_cnt` | requests since the entry was created |
//! | `http_err_rate(<period>)` | errors in the last period: only those the origin or the client's authentication caused, never a policy denial (the caller decides what it records) |
//! | `http_err_cnt` | errors since the entry was created |
//! | `conn_cur` | requests or connections in progress now |
//! | `bytes_in_rate(<period>)` | request bytes in the last period |
//! | `bytes_out_rate(<period>)` | response bytes in the last period |
//! | `gpc0` | a general-purpose counter that rules, the admin API and automation set |
//! | `tags` | a small set of strings that rules, the admin API and automation set |
//!
//! ```
//! use portcullis_limits::{Counter, Kind};
//!
//! let c = Counter::parse("http_req_rate(10s)")?;
//! assert_eq!(c.kind(), Kind::HttpReqRate);
//! assert_eq!(c.to_string(), "http_req_rate(10s)");
//! assert_eq!(c.context_name(), "http_req_rate_10s");
//!
//! let err = Counter::parse("http_req_rat(10s)").unwrap_err().to_string();
//! assert!(err.contains("did you mean `http_req_rate(10s)`?"), "{err}");
//! # Ok::<(), portcullis_limits::Error>(())
//! ```

use crate::{Error, Period};
use std::fmt;
use std::str::FromStr;

/// A counter's kind, without its period: what [`crate::Table::top`] sorts by and
/// [`crate::Snapshot::get`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    HttpReqRate,
    HttpReqCnt,
    HttpErrRate,
    HttpErrCnt,
    ConnCur,
    BytesInRate,
    BytesOutRate,
    Gpc0,
    Tags,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::HttpReqRate,
        Kind::HttpReqCnt,
        Kind::HttpErrRate,
        Kind::HttpErrCnt,
        Kind::ConnCur,
        Kind::BytesInRate,
        Kind::BytesOutRate,
        Kind::Gpc0,
        Kind::Tags,
    ];

    /// The name as written in the config, without a period.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::HttpReqRate => "http_req_rate",
            Kind::HttpReqCnt => "http_req_cnt",
            Kind::HttpErrRate => "http_err_rate",
            Kind::HttpErrCnt => "http_err_cnt",
            Kind::ConnCur => "conn_cur",
            Kind::BytesInRate => "bytes_in_rate",
            Kind::BytesOutRate => "bytes_out_rate",
            Kind::Gpc0 => "gpc0",
            Kind::Tags => "tags",
        }
    }

    /// Whether the counter is a sliding-window rate and so needs a period.
    pub const fn has_period(self) -> bool {
        matches!(
            self,
            Kind::HttpReqRate | Kind::HttpErrRate | Kind::BytesInRate | Kind::BytesOutRate
        )
    }

    /// How the config writes it: `http_req_rate(10s)` for rates, the bare name otherwise.
    fn example(self) -> String {
        if self.has_period() {
            format!("{}(10s)", self.name())
        } else {
            self.name().to_string()
        }
    }
}

/// A set of [`Kind`]s: which counters a reader needs, so that a table computes only those
/// (a rate is a few divisions; a route's rules usually read one counter of several).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kinds(u16);

impl Kinds {
    pub const NONE: Kinds = Kinds(0);
    pub const ALL: Kinds = Kinds((1 << Kind::ALL.len()) - 1);

    /// This set and `kind`.
    pub const fn with(self, kind: Kind) -> Kinds {
        Kinds(self.0 | 1 << kind as u16)
    }

    pub const fn has(self, kind: Kind) -> bool {
        self.0 & (1 << kind as u16) != 0
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of a table's `store:` list: a [`Kind`], with a [`Period`] for the rates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    HttpReqRate(Period),
    HttpReqCnt,
    HttpErrRate(Period),
    HttpErrCnt,
    ConnCur,
    BytesInRate(Period),
    BytesOutRate(Period),
    Gpc0,
    Tags,
}

impl Counter {
    pub fn kind(self) -> Kind {
        match self {
            Counter::HttpReqRate(_) => Kind::HttpReqRate,
            Counter::HttpReqCnt => Kind::HttpReqCnt,
            Counter::HttpErrRate(_) => Kind::HttpErrRate,
            Counter::HttpErrCnt => Kind::HttpErrCnt,
            Counter::ConnCur => Kind::ConnCur,
            Counter::BytesInRate(_) => Kind::BytesInRate,
            Counter::BytesOutRate(_) => Kind::BytesOutRate,
            Counter::Gpc0 => Kind::Gpc0,
            Counter::Tags => Kind::Tags,
        }
    }

    /// The sliding-window period, for rates.
    pub fn period(self) -> Option<Period> {
        match self {
            Counter::HttpReqRate(p)
            | Counter::HttpErrRate(p)
            | Counter::BytesInRate(p)
            | Counter::BytesOutRate(p) => Some(p),
            _ => None,
        }
    }

    fn from_parts(kind: Kind, period: Option<Period>) -> Counter {
        match (kind, period) {
            (Kind::HttpReqRate, Some(p)) => Counter::HttpReqRate(p),
            (Kind::HttpErrRate, Some(p)) => Counter::HttpErrRate(p),
            (Kind::BytesInRate, Some(p)) => Counter::BytesInRate(p),
            (Kind::BytesOutRate, Some(p)) => Counter::BytesOutRate(p),
            (Kind::HttpReqCnt, _) => Counter::HttpReqCnt,
            (Kind::HttpErrCnt, _) => Counter::HttpErrCnt,
            (Kind::ConnCur, _) => Counter::ConnCur,
            (Kind::Gpc0, _) => Counter::Gpc0,
            (Kind::Tags, _) => Counter::Tags,
            (k, None) => unreachable!("{k} needs a period"),
        }
    }

    /// Parses one counter as the config writes it: `http_req_rate(10s)`, `conn_cur`, ….
    pub fn parse(text: &str) -> Result<Counter, Error> {
        let t = text.trim();
        let bad = |fix: String| Error::BadCounter {
            given: text.to_string(),
            fix,
        };
        let (name, arg) = match t.split_once('(') {
            None => (t, None),
            Some((name, rest)) => {
                let Some(arg) = rest.strip_suffix(')') else {
                    return Err(bad(format!("close the parenthesis: `{t})`")));
                };
                (name.trim(), Some(arg.trim()))
            }
        };
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.name() == name) else {
            let fix = match closest(name) {
                Some(k) => {
                    let written = match (k.has_period(), arg) {
                        (true, Some(a)) => format!("{}({a})", k.name()),
                        _ => k.example(),
                    };
                    format!("did you mean `{written}`?")
                }
                None => format!(
                    "a table can store {}",
                    Kind::ALL
                        .iter()
                        .map(|k| format!("`{}`", k.example()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Err(Error::UnknownCounter {
                given: text.to_string(),
                fix,
            });
        };
        match (kind.has_period(), arg) {
            (true, None) => Err(bad(format!(
                "`{kind}` is a rate and needs a period: write `{kind}(10s)`"
            ))),
            (false, Some(_)) => Err(bad(format!("`{kind}` takes no period: write `{kind}`"))),
            (false, None) => Ok(Counter::from_parts(kind, None)),
            (true, Some(arg)) => {
                let period = Period::parse(arg).map_err(|e| match e {
                    Error::BadPeriod { fix, .. } => bad(format!("bad period `{arg}`: {fix}")),
                    other => other,
                })?;
                Ok(Counter::from_parts(kind, Some(period)))
            }
        }
    }

    /// A name for the counter that is a valid identifier, for policy contexts:
    /// `http_req_rate(10s)` is `http_req_rate_10s`, `conn_cur` is `conn_cur`.
    pub fn context_name(self) -> String {
        match self.period() {
            Some(p) => format!("{}_{p}", self.kind()),
            None => self.kind().name().to_string(),
        }
    }
}

impl FromStr for Counter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Counter, Error> {
        Counter::parse(s)
    }
}

/// The canonical config form, which [`Counter::parse`] reads back.
impl fmt::Display for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period() {
            Some(p) => write!(f, "{}({p})", self.kind()),
            None => f.write_str(self.kind().name()),
        }
    }
}

/// The known name closest to `name` by edit distance, if it is close enough to be a typo.
fn closest(name: &str) -> Option<Kind> {
    let name = name.to_ascii_lowercase();
    Kind::ALL
        .into_iter()
        .map(|k| (edit_distance(&name, k.name()), k))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_reads_back_what_it_prints() {
        for text in [
            "http_req_rate(10s)",
            "http_req_cnt",
            "http_err_rate(1m)",
            "http_err_cnt",
            "conn_cur",
            "bytes_in_rate(1h)",
            "bytes_out_rate(250ms)",
            "gpc0",
            "tags",
        ] {
            let c = Counter::parse(text).unwrap();
            assert_eq!(c.to_string(), text);
            assert_eq!(text.parse::<Counter>().unwrap(), c);
        }
        assert_eq!(
            Counter::parse(" http_err_rate( 60s ) ").unwrap(),
            Counter::HttpErrRate(Period::parse("1m").unwrap())
        );
        assert_eq!(
            Counter::parse("bytes_out_rate(1m)").unwrap().context_name(),
            "bytes_out_rate_1m"
        );
    }

    #[test]
    fn mistakes_are_named_with_their_fix() {
        let cases = [
            ("http_req_rat(10s)", "unknown counter `http_req_rat(10s)`: did you mean `http_req_rate(10s)`?"),
            ("http_req_count", "unknown counter `http_req_count`: did you mean `http_req_cnt`?"),
            ("sessions", "unknown counter `sessions`: a table can store `http_req_rate(10s)`, `http_req_cnt`,"),
            ("http_req_rate", "`http_req_rate` is a rate and needs a period: write `http_req_rate(10s)`"),
            ("conn_cur(10s)", "`conn_cur` takes no period: write `conn_cur`"),
            ("http_req_rate(10x)", "bad period `10x`: write a whole number followed by ms, s, m, h or d, e.g. `10s`"),
            ("http_req_rate(0s)", "bad period `0s`: a period must be at least 1ms"),
            ("http_req_rate(10s", "close the parenthesis: `http_req_rate(10s)`"),
        ];
        for (text, want) in cases {
            let got = Counter::parse(text).unwrap_err().to_string();
            assert!(got.contains(want), "{text}:\n got  {got}\n want {want}");
        }
    }
}
