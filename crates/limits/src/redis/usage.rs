//! Usage-plan usage across a fleet: each replica adds its daily request counts to Redis, and
//! any replica (or `portcullis usage`) reads the fleet's totals back, with each quota's use.
//! Off the request path: the proxy sends its counts every sync interval, and reports are
//! admin calls.
//!
//! # Keys in Redis
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `{prefix}:u:{plan}:{day}` | hash | field: a caller's [`StoredKey::to_bytes`]; value: its requests that UTC day (`YYYY-MM-DD`) | [`USAGE_RETENTION_DAYS`] after the day |
//! | `{prefix}:u` | set | the names of the plans that have usage | never |
//! | `{prefix}:uf:{batch}` | string | a batch that has been added | [`BATCH_MEMORY`] |
//!
//! # Exactly once
//!
//! Counts go in [`UsageBatch`]es of at most [`BATCH_ROWS`] rows, each with a random id. One
//! Lua call adds a batch and remembers its id, atomically, and adds nothing for an id it has
//! seen. So a caller that did not hear the answer (a timeout after Redis ran it, a dropped
//! connection) sends the same batch again, and it is counted once. A batch that never reached
//! Redis is sent again the same way. What a process had not sent when it crashed is lost:
//! at most one sync interval of counting, as with the embedded store.
//!
//! # Reading
//!
//! [`RedisStore::usage`] reads one hash per plan and day (`HGETALL`, or `HGET` for one
//! caller), pipelined; a year of one plan is 366 commands. [`RedisStore::quota_used`] reads
//! the quota counters the check script keeps (`{prefix}:q:…`, see the [parent](super)) with
//! `MGET`. With local batching, a quota's count includes the tokens replicas have leased and
//! not yet spent: at most the lease size per replica and caller more than was used.

use super::{push_name, quota_key, RedisStore, Req, StoreError, ADMIN_TIMEOUT};
use crate::quota::{day_string, StoredKey};
use ::redis::Value;
use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Days a day's usage is kept in Redis after it ends: a report covers at most 366 days.
pub const USAGE_RETENTION_DAYS: i64 = 400;
/// Rows (plan, caller, day) in one batch, at most.
pub const BATCH_ROWS: usize = 5_000;
/// How long Redis remembers a batch it has added (and ignores it if sent again).
pub const BATCH_MEMORY: Duration = Duration::from_secs(86_400);
/// Commands in one pipeline of a report.
const READ_CHUNK: usize = 500;

/// Adds a batch once (see the module docs). KEYS: the batch's marker, the set of plans, then
/// one hash per plan and day. ARGV: the marker's lifetime in seconds; per hash, its expiry
/// (Unix seconds) and its plan; then per row, the hash's index, the field and the count.
const ADD: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local h = #KEYS - 2
for i = 1, h do redis.call('SADD', KEYS[2], ARGV[2 * i + 1]) end
local a = 2 * h + 2
while a + 2 <= #ARGV do
  redis.call('HINCRBY', KEYS[2 + tonumber(ARGV[a])], ARGV[a + 1], ARGV[a + 2])
  a = a + 3
end
for i = 1, h do redis.call('EXPIREAT', KEYS[2 + i], ARGV[2 * i]) end
return 1
";

/// Requests of one caller on one plan and UTC day (days since 1970-01-01).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    pub plan: String,
    pub key: StoredKey,
    pub day: i64,
    pub count: u64,
}

/// Counts to add, with the id that makes adding them idempotent.
#[derive(Clone, Debug)]
pub struct UsageBatch {
    id: String,
    rows: Vec<UsageRecord>,
}

impl UsageBatch {
    /// `rows` in batches of at most [`BATCH_ROWS`], each with a new random id.
    pub fn split(rows: Vec<UsageRecord>) -> Vec<UsageBatch> {
        let mut out = Vec::with_capacity(rows.len().div_ceil(BATCH_ROWS));
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            out.push(UsageBatch {
                id: batch_id(),
                rows: rows.by_ref().take(BATCH_ROWS).collect(),
            });
        }
        out
    }

    pub fn rows(&self) -> &[UsageRecord] {
        &self.rows
    }
}

/// 128 random bits as hex: two hashes of a counter under std's randomly keyed hasher
/// (no random-number crate is a dependency, and these need only be unique).
fn batch_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Relaxed);
    let (a, b) = (RandomState::new(), RandomState::new());
    format!("{:016x}{:016x}", a.hash_one(n), b.hash_one(n))
}

/// `{prefix}:u:{plan}:`, the start of a plan's day hashes.
fn day_key(prefix: &[u8], plan: &str, day: i64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + plan.len() + 16);
    k.extend_from_slice(prefix);
    k.extend_from_slice(b":u:");
    push_name(&mut k, plan);
    k.push(b':');
    k.extend_from_slice(day_string(day).as_bytes());
    k
}

fn plans_key(prefix: &[u8]) -> Vec<u8> {
    [prefix, b":u"].concat()
}

fn bad(what: &str, v: &Value) -> StoreError {
    StoreError::Protocol(format!("bad {what} reply: {v:?}"))
}

/// A count as Redis returns it: an integer, or its decimal text; nothing is 0.
fn count(v: &Value) -> Option<u64> {
    match v {
        Value::Nil => Some(0),
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

impl RedisStore {
    /// Adds `batch` to the fleet's daily usage, once however often it is sent (see the
    /// module docs). Returns whether this call added it (false: it was added before).
    pub async fn add_usage(&self, batch: &UsageBatch) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let prefix = inner.cfg.prefix.as_bytes();
        let mut hashes: BTreeMap<(&str, i64), usize> = BTreeMap::new();
        for r in &batch.rows {
            let n = hashes.len();
            hashes.entry((r.plan.as_str(), r.day)).or_insert(n + 1);
        }
        let mut order: Vec<(&(&str, i64), &usize)> = hashes.iter().collect();
        order.sort_by_key(|(_, i)| **i);
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(ADD).arg(2 + order.len());
        let mut marker = prefix.to_vec();
        let _ = write!(super::HexOut(&mut marker), ":uf:{}", batch.id);
        cmd.arg(marker).arg(plans_key(prefix));
        for ((plan, day), _) in &order {
            cmd.arg(day_key(prefix, plan, *day));
        }
        cmd.arg(BATCH_MEMORY.as_secs());
        for ((plan, day), _) in &order {
            let expire = (day + 1 + USAGE_RETENTION_DAYS) * crate::quota::SECS_PER_DAY;
            cmd.arg(expire).arg(*plan);
        }
        for r in &batch.rows {
            cmd.arg(hashes[&(r.plan.as_str(), r.day)])
                .arg(r.key.to_bytes())
                .arg(r.count);
        }
        let v = inner.round_trip(Req::Cmd(&cmd), ADMIN_TIMEOUT * 5).await?;
        match v {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            other => Err(bad("usage add", &other)),
        }
    }

    /// The fleet's requests per plan, caller and day from `from_day` to `to_day` (both
    /// included): of `plan`, or of every plan with usage; of `key`, or of every caller.
    /// Sorted by plan, caller and day.
    pub async fn usage(
        &self,
        plan: Option<&str>,
        key: Option<&StoredKey>,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let inner = &self.inner;
        let prefix = inner.cfg.prefix.as_bytes();
        let timeout = inner.admin_timeout();
        let plans: Vec<String> = match plan {
            Some(p) => vec![p.to_string()],
            None => {
                let mut cmd = ::redis::cmd("SMEMBERS");
                cmd.arg(plans_key(prefix));
                let v = inner.round_trip(Req::Cmd(&cmd), timeout).await?;
                let names = match &v {
                    Value::Array(items) | Value::Set(items) => items,
                    other => return Err(bad("SMEMBERS", other)),
                };
                let mut out = names
                    .iter()
                    .map(|n| match n {
                        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
                        other => Err(bad("SMEMBERS", other)),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                out.sort();
                out
            }
        };
        let asks: Vec<(&str, i64)> = plans
            .iter()
            .flat_map(|p| (from_day..=to_day).map(move |d| (p.as_str(), d)))
            .collect();
        let field = key.map(StoredKey::to_bytes);
        let mut out = Vec::new();
        for chunk in asks.chunks(READ_CHUNK) {
            let mut pipe = ::redis::pipe();
            for (plan, day) in chunk {
                let k = day_key(prefix, plan, *day);
                match &field {
                    Some(f) => pipe.cmd("HGET").arg(k).arg(f.as_slice()),
                    None => pipe.cmd("HGETALL").arg(k),
                };
            }
            let v = inner.round_trip(Req::Pipe(&pipe), timeout).await?;
            let Value::Array(replies) = v else {
                return Err(bad("usage read", &v));
            };
            if replies.len() != chunk.len() {
                return Err(StoreError::Protocol("short usage read reply".into()));
            }
            for ((plan, day), reply) in chunk.iter().zip(replies) {
                let mut push = |field: &[u8], n: &Value| -> Result<(), StoreError> {
                    let n = count(n).ok_or_else(|| bad("usage count", n))?;
                    let key = StoredKey::from_bytes(field).ok_or_else(|| {
                        StoreError::Protocol(format!("not a stored key in usage: {field:?}"))
                    })?;
                    if n > 0 {
                        out.push(UsageRecord {
                            plan: plan.to_string(),
                            key,
                            day: *day,
                            count: n,
                        });
                    }
                    Ok(())
                };
                match (&field, &reply) {
                    (Some(f), n) => push(f, n)?,
                    (None, Value::Array(items)) => {
                        for pair in items.chunks(2) {
                            match pair {
                                [Value::BulkString(f), n] => push(f, n)?,
                                _ => return Err(bad("HGETALL", &reply)),
                            }
                        }
                    }
                    (None, Value::Map(pairs)) => {
                        for (f, n) in pairs {
                            let Value::BulkString(f) = f else {
                                return Err(bad("HGETALL", &reply));
                            };
                            push(f, n)?;
                        }
                    }
                    (None, other) => return Err(bad("HGETALL", other)),
                }
            }
        }
        out.sort_by(|a, b| (&a.plan, &a.key, a.day).cmp(&(&b.plan, &b.key, b.day)));
        Ok(out)
    }

    /// Each of `keys`' use of `plan`'s quota in the period that starts at `period_start`
    /// (Unix seconds), as the check script counts it: in the order of `keys`.
    pub async fn quota_used(
        &self,
        plan: &str,
        period_start: i64,
        keys: &[StoredKey],
    ) -> Result<Vec<u64>, StoreError> {
        let inner = &self.inner;
        let prefix = inner.cfg.prefix.as_bytes();
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(super::FLUSH_CHUNK) {
            let mut cmd = ::redis::cmd("MGET");
            for k in chunk {
                cmd.arg(quota_key(prefix, plan, &k.key(), period_start));
            }
            let v = inner
                .round_trip(Req::Cmd(&cmd), inner.admin_timeout())
                .await?;
            let Value::Array(items) = &v else {
                return Err(bad("MGET", &v));
            };
            if items.len() != chunk.len() {
                return Err(bad("MGET", &v));
            }
            for item in items {
                out.push(count(item).ok_or_else(|| bad("quota count", item))?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Key;

    #[test]
    fn day_hashes_name_the_plan_and_the_day() {
        assert_eq!(
            day_key(b"pc", "a:b", crate::quota::parse_day("2026-12-06").unwrap()),
            b"pc:u:a%3Ab:2026-12-06"
        );
        assert_eq!(plans_key(b"pc"), b"pc:u");
    }

    #[test]
    fn batches_split_at_their_size_with_ids_of_their_own() {
        let row = |i: usize| UsageRecord {
            plan: "p".into(),
            key: StoredKey::of(&Key::from(format!("k/{i}").as_str())),
            day: 1,
            count: 1,
        };
        let batches = UsageBatch::split((0..BATCH_ROWS * 2 + 1).map(row).collect());
        let sizes: Vec<usize> = batches.iter().map(|b| b.rows().len()).collect();
        assert_eq!(sizes, [BATCH_ROWS, BATCH_ROWS, 1]);
        assert_ne!(batches[0].id, batches[1].id);
        assert_eq!(batches[0].id.len(), 32);
        assert!(UsageBatch::split(Vec::new()).is_empty());
    }

    #[test]
    fn counts_read_from_every_reply_form() {
        assert_eq!(count(&Value::Nil), Some(0));
        assert_eq!(count(&Value::Int(7)), Some(7));
        assert_eq!(count(&Value::BulkString(b"42".to_vec())), Some(42));
        assert_eq!(count(&Value::Int(-1)), None);
        assert_eq!(count(&Value::BulkString(b"x".to_vec())), None);
    }
}
