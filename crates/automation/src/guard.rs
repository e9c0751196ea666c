//! Guard rails the caller checks before applying an action: [`may_take_out`] keeps a backend
//! from losing more than `max_unavailable` of its servers (default 50%) to automation.
//!
//! A server counts as *out* when it is not `ready` or not healthy. Taking out a server that is
//! already out changes nothing and is always allowed. A percentage is rounded down, so a
//! backend with one server never lets automation take it out at 50%, and one with three lets
//! one go.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A server's administrative state, as `set_server_state` sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// Takes traffic.
    Ready,
    /// Takes no new traffic except sticky requests; health checks continue.
    Drain,
    /// Takes no traffic; health checks stop.
    Maint,
}

impl ServerState {
    /// Whether this state takes a server out of rotation (what `max_unavailable` limits).
    pub fn takes_out(self) -> bool {
        !matches!(self, ServerState::Ready)
    }
}

/// How many of a backend's servers may be out: `50%` or a count like `2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MaxUnavailable {
    /// 0..=100 percent of the backend's servers, rounded down.
    Percent(u8),
    /// A number of servers.
    Count(u32),
}

impl Default for MaxUnavailable {
    fn default() -> MaxUnavailable {
        MaxUnavailable::Percent(50)
    }
}

impl MaxUnavailable {
    /// Parses `50%` or `2`.
    pub fn parse(s: &str) -> Result<MaxUnavailable, String> {
        let t = s.trim();
        let bad = || {
            format!("invalid max_unavailable `{s}`: write a percentage like `50%` or a number of servers like `2`")
        };
        if let Some(p) = t.strip_suffix('%') {
            let n: u8 = p.trim().parse().map_err(|_| bad())?;
            if n > 100 {
                return Err(format!("max_unavailable `{s}` is over 100%"));
            }
            return Ok(MaxUnavailable::Percent(n));
        }
        t.parse().map(MaxUnavailable::Count).map_err(|_| bad())
    }

    /// How many of `total` servers may be out.
    pub fn allowed(self, total: usize) -> usize {
        match self {
            MaxUnavailable::Percent(p) => total * usize::from(p) / 100,
            MaxUnavailable::Count(n) => usize::try_from(n).unwrap_or(usize::MAX).min(total),
        }
    }
}

impl fmt::Display for MaxUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxUnavailable::Percent(p) => write!(f, "{p}%"),
            MaxUnavailable::Count(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for MaxUnavailable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxUnavailable::Percent(_) => s.collect_str(self),
            MaxUnavailable::Count(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for MaxUnavailable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MaxUnavailable, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = MaxUnavailable;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage like `50%` or a number of servers")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaxUnavailable, E> {
                MaxUnavailable::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaxUnavailable, E> {
                u32::try_from(v)
                    .map(MaxUnavailable::Count)
                    .map_err(|_| E::custom("max_unavailable is too large"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaxUnavailable, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("max_unavailable cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// One server of a backend, as the caller sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerView {
    pub name: String,
    /// Its administrative state.
    pub state: ServerState,
    /// Whether health checks (and outlier detection) consider it healthy.
    pub healthy: bool,
}

impl ServerView {
    /// Whether the server takes traffic: ready and healthy.
    pub fn available(&self) -> bool {
        self.state == ServerState::Ready && self.healthy
    }
}

/// Why taking a server out was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("taking out `{server}` would leave {out_after} of {total} servers out, over max_unavailable {limit} (at most {allowed})")]
pub struct Refusal {
    pub server: String,
    /// Servers out if the action ran.
    pub out_after: usize,
    pub total: usize,
    /// Servers the limit lets be out.
    pub allowed: usize,
    pub limit: MaxUnavailable,
}

/// Whether `server` of the backend whose servers are `servers` may be taken out (put in
/// `drain` or `maint`) under `limit`. A server not in the list, or already out, is allowed:
/// the action changes nothing the limit protects (the control path reports an unknown one).
pub fn may_take_out(
    servers: &[ServerView],
    server: &str,
    limit: MaxUnavailable,
) -> Result<(), Refusal> {
    match servers.iter().find(|s| s.name == server) {
        Some(s) if s.available() => {}
        _ => return Ok(()),
    }
    let total = servers.len();
    let out_after = servers.iter().filter(|s| !s.available()).count() + 1;
    let allowed = limit.allowed(total);
    if out_after <= allowed {
        Ok(())
    } else {
        Err(Refusal {
            server: server.to_string(),
            out_after,
            total,
            allowed,
            limit,
        })
    }
}
