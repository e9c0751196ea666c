//! A webhook's outbox, durable (rows in the embedded store, each call on a blocking thread)
//! or in memory (the same operations on a map, lost with the process), so one delivery loop
//! serves both.

use parking_lot::Mutex;
use portcullis_store::{Enqueued, OutboxRow, Store};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

#[derive(Clone)]
pub(crate) enum Outbox {
    Durable(Store),
    Memory(Arc<Mutex<Memory>>),
}

#[derive(Default)]
pub(crate) struct Memory {
    rows: BTreeMap<i64, MemRow>,
    ids: HashSet<String>,
    next_seq: i64,
}

struct MemRow {
    event_id: String,
    payload: String,
    attempts: u32,
    next_attempt_at: i64,
    created_at: i64,
}

/// Runs a store call on a blocking thread; errors become text (for the log).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> portcullis_store::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the store call did not finish: {e}")),
    }
}

impl Outbox {
    pub(crate) fn memory() -> Outbox {
        Outbox::Memory(Arc::default())
    }

    pub(crate) async fn enqueue(
        &self,
        sink: &Arc<str>,
        rows: Vec<(String, String)>,
        now: i64,
        max_rows: usize,
    ) -> Result<Enqueued, String> {
        match self {
            Outbox::Durable(store) => {
                let (store, sink) = (store.clone(), sink.clone());
                blocking(move || {
                    let refs: Vec<_> = rows.iter().map(|(i, p)| (i.as_str(), p.as_str())).collect();
                    store.outbox_enqueue(&sink, &refs, now, max_rows)
                })
                .await
            }
            Outbox::Memory(m) => {
                let mut m = m.lock();
                let mut put = Enqueued::default();
                for (event_id, payload) in rows {
                    if !m.ids.insert(event_id.clone()) {
                        continue;
                    }
                    let seq = m.next_seq;
                    m.next_seq += 1;
                    m.rows.insert(
                        seq,
                        MemRow {
                            event_id,
                            payload,
                            attempts: 0,
                            next_attempt_at: now,
                            created_at: now,
                        },
                    );
                    put.inserted += 1;
                }
                while m.rows.len() > max_rows {
                    if let Some((_, row)) = m.rows.pop_first() {
                        m.ids.remove(&row.event_id);
                        put.evicted += 1;
                    }
                }
                Ok(put)
            }
        }
    }

    pub(crate) async fn lease(
        &self,
        sink: &Arc<str>,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, String> {
        match self {
            Outbox::Durable(store) => {
                let (store, sink) = (store.clone(), sink.clone());
                blocking(move || store.outbox_lease(&sink, now, lease_until, limit)).await
            }
            Outbox::Memory(m) => {
                let mut m = m.lock();
                let mut out = Vec::new();
                for (seq, row) in m.rows.iter_mut() {
                    if out.len() == limit {
                        break;
                    }
                    if row.next_attempt_at <= now {
                        row.next_attempt_at = lease_until;
                        out.push(OutboxRow {
                            seq: *seq,
                            event_id: row.event_id.clone(),
                            payload: row.payload.clone(),
                            attempts: row.attempts,
                            created_at: row.created_at,
                        });
                    }
                }
                Ok(out)
            }
        }
    }

    /// Deletes `acks` and reschedules `later` (`(seq, attempts, next_attempt_at)`).
    pub(crate) async fn settle(
        &self,
        sink: &Arc<str>,
        acks: Vec<i64>,
        later: Vec<(i64, u32, i64)>,
    ) -> Result<(), String> {
        match self {
            Outbox::Durable(store) => {
                let (store, sink) = (store.clone(), sink.clone());
                blocking(move || {
                    store.outbox_ack(&sink, &acks)?;
                    store.outbox_reschedule(&sink, &later)
                })
                .await
            }
            Outbox::Memory(m) => {
                let mut m = m.lock();
                for seq in acks {
                    if let Some(row) = m.rows.remove(&seq) {
                        m.ids.remove(&row.event_id);
                    }
                }
                for (seq, attempts, next) in later {
                    if let Some(row) = m.rows.get_mut(&seq) {
                        row.attempts = attempts;
                        row.next_attempt_at = next;
                    }
                }
                Ok(())
            }
        }
    }

    /// Makes every row due at `now` (at start).
    pub(crate) async fn release(&self, sink: &Arc<str>, now: i64) -> Result<usize, String> {
        match self {
            Outbox::Durable(store) => {
                let (store, sink) = (store.clone(), sink.clone());
                blocking(move || store.outbox_release(&sink, now)).await
            }
            Outbox::Memory(m) => {
                let mut m = m.lock();
                m.rows.values_mut().for_each(|r| r.next_attempt_at = now);
                Ok(m.rows.len())
            }
        }
    }

    /// When the next row is due, if any.
    pub(crate) async fn next_due(&self, sink: &Arc<str>) -> Result<Option<i64>, String> {
        match self {
            Outbox::Durable(store) => {
                let (store, sink) = (store.clone(), sink.clone());
                blocking(move || store.outbox_next_due(&sink)).await
            }
            Outbox::Memory(m) => Ok(m.lock().rows.values().map(|r| r.next_attempt_at).min()),
        }
    }
}
