//! The writer: [`Auditor`] queues records for a dedicated thread, which seals them into the
//! hash chain, appends them to the sink, and acknowledges each one under the fsync policy.
//!
//! * **Group commit.** The thread takes every record waiting in the queue (up to
//!   [`MAX_BATCH`]), writes them with one `write`, and with `fsync: every_record` syncs once
//!   before acknowledging them all. With `fsync: interval` a record is acknowledged once it is
//!   written to the OS, and the file is synced no later than `fsync_interval` after the first
//!   unsynced write.
//! * **Backpressure.** The queue holds `audit.queue` records. When it is full, `record` waits
//!   (`on_overload: wait`) or returns [`Error::Overloaded`] at once (`fail_closed`). A record
//!   is never dropped silently: every call gets `Ok` only once the record is acknowledged, or
//!   an error.
//! * **Failures.** A failed write is cut back off the file and the chain does not advance, so
//!   the next record links to the last one really written. A failed sync reports an error to
//!   the callers whose records it covered.
//! * **A full disk with `on_overload: wait`.** When a write or sync of the `file` sink fails
//!   with `ENOSPC` or `EDQUOT` (see the `disk` module), the writer cuts the failed bytes back
//!   off (to the end of the last record fully written; with `every_record`, also when only the
//!   sync failed), keeps the records unacknowledged, and tries again, after 100 ms growing to
//!   1 s. Their requests wait; new records wait in the queue, and when it is full `record`
//!   waits for room as usual (the batch held, at most about [`MAX_BATCH`] records, is on top
//!   of the queue's `audit.queue`). One line is logged when the wait starts and one when it ends;
//!   [`Stats`] says whether it is waiting. Other errors, the `stdout` sink (a line half
//!   written to a stream cannot be taken back) and `fail_closed` fail the records at once.
//! * **Stopping.** When the last handle is dropped, the writer writes what is queued and
//!   stops. A writer waiting for space gives each record still held one more attempt, and
//!   fails those that still cannot be written (their callers were never acknowledged), so
//!   that stopping takes a bounded time.
//! * **Batching across threads.** Waking another thread costs a system call and usually a
//!   context switch, and on a busy core the woken thread runs at once, so waking the writer
//!   for every record made batches of one. When the auditor is started inside a tokio
//!   runtime, records go first to a task on that runtime, which gathers everything that
//!   arrived since it last ran, and keeps gathering for a few more turns of the runtime
//!   while each turn brings more (a lone record goes at once), then hands the lot to the
//!   thread as one batch; the thread hands each batch's acknowledgements back to another
//!   task there, which wakes the waiting requests locally. Two cross-thread wakes per batch
//!   instead of two per record; on a 2-vCPU VM a thread switch costs about 10 µs, so the
//!   batch size matters.
//! * **One pass per record.** The records of a batch share one seal time (one clock read),
//!   and each is serialized once, straight into the batch buffer, in canonical form.
//! * **Rotation.** Before a record would push the current file past `rotate_size`, or when the
//!   file's first record is older than `rotate_age`, the file is synced and closed and a new
//!   `audit-<seq>.jsonl` is started. The chain simply continues.

use crate::chain::Chain;
use crate::disk::{self, Disk, Waiting};
use crate::files::{self, Current};
use crate::record::{Decision, Kind, Record, Stats};
use crate::Error;
use portcullis_config::{AuditCfg, AuditSink, Fsync, Overload};
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// The most records written and synced together.
pub const MAX_BATCH: usize = 1024;

/// How many extra turns of the runtime the batching task waits for more records, as long
/// as each turn brings some, the batch size after which it stops waiting...
const GATHER_TURNS: usize = 16;
const GATHER_MAX: usize = 1024;
/// ... and the longest it waits, so that a runtime whose turns are long (thousands of busy
/// connections) does not hold records back for long.
#[cfg(not(test))]
const GATHER_FOR: Duration = Duration::from_millis(1);
/// Tests count hand-offs, which must not depend on how busy the machine is.
#[cfg(test)]
const GATHER_FOR: Duration = Duration::from_secs(5);

/// The largest batch buffer the writer keeps between batches.
const KEEP_BUF: usize = 1 << 20;

type Ack = oneshot::Sender<Result<(), Error>>;
type Acks = Vec<(Ack, Result<(), Error>)>;

/// Delivers a batch's acknowledgements: through the runtime's fan-out task when there is
/// one, directly otherwise (or when that task is gone).
fn deliver(fanout: &Option<tokio::sync::mpsc::UnboundedSender<Acks>>, acks: Acks) {
    if acks.is_empty() {
        return;
    }
    let acks = match fanout {
        Some(tx) => match tx.send(acks) {
            Ok(()) => return,
            Err(e) => e.0,
        },
        None => acks,
    };
    for (ack, r) in acks {
        let _ = ack.send(r);
    }
}

struct Msg {
    rec: Record,
    ack: Ack,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    queued: AtomicU64,
    last_seq: AtomicU64,
    /// Batches the runtime's task handed to the thread.
    handoffs: AtomicU64,
    /// The writer holds records until the disk has space again.
    waiting: AtomicBool,
    /// Times the writer started waiting for space.
    disk_waits: AtomicU64,
    /// Set when the last handle is dropped: a writer waiting for space stops waiting.
    stop: AtomicBool,
}

/// The handle to the audit trail. Cheap to clone; the writer stops (after a final sync) when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Auditor {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// Batches to the writer thread.
    tx: Option<mpsc::UnboundedSender<Vec<Msg>>>,
    /// Records to the runtime's batching task, when there is one.
    fanin: Option<mpsc::UnboundedSender<Msg>>,
    /// Room in the queue: one permit per record, taken by `record`, given back when the
    /// writer takes the record.
    room: Arc<tokio::sync::Semaphore>,
    overload: Overload,
    record_allows: bool,
    stats: Arc<Counters>,
    thread: Mutex<Option<JoinHandle<()>>>,
    #[cfg(test)]
    gate: Arc<test_gate::Gate>,
    #[cfg(test)]
    faults: Arc<disk::faults::Faults>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer's loop; wait for its final sync, so that a new
        // writer started on the same directory never overlaps with this one. A writer
        // waiting for disk space is woken, and stops waiting.
        self.stats.stop.store(true, Ordering::SeqCst);
        self.fanin.take();
        self.tx.take();
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("enabled", &self.inner.is_some())
            .field("stats", &self.stats())
            .finish()
    }
}

/// The task on the proxy's runtime that wakes the callers of each batch the thread
/// acknowledged.
fn spawn_fanout(h: &tokio::runtime::Handle) -> tokio::sync::mpsc::UnboundedSender<Acks> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Acks>();
    h.spawn(async move {
        while let Some(batch) = rx.recv().await {
            for (ack, r) in batch {
                let _ = ack.send(r);
            }
        }
    });
    tx
}

/// The task on the proxy's runtime that gathers records into batches for the thread (see
/// the module doc). It holds only a weak sender, so dropping the auditor (possibly on this
/// very runtime's thread, where the task cannot run) still closes the queue.
fn spawn_gatherer(
    h: &tokio::runtime::Handle,
    tx: &mpsc::UnboundedSender<Vec<Msg>>,
    stats: &Arc<Counters>,
) -> mpsc::UnboundedSender<Msg> {
    let (fanin, mut recs) = mpsc::unbounded_channel::<Msg>();
    let to_writer = tx.downgrade();
    let stats = stats.clone();
    h.spawn(async move {
        while let Some(first) = recs.recv().await {
            let mut batch = vec![first];
            // Gather for a few more turns of the runtime while records keep coming: each
            // hand-off to the thread costs two cross-thread wakes and a context switch or
            // two, whatever the size of the batch.
            let since = Instant::now();
            for _ in 0..GATHER_TURNS {
                let before = batch.len();
                while let Ok(m) = recs.try_recv() {
                    batch.push(m);
                }
                if batch.len() == before
                    || batch.len() >= GATHER_MAX
                    || since.elapsed() >= GATHER_FOR
                {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let Some(tx) = to_writer.upgrade() else {
                break;
            };
            stats.handoffs.fetch_add(1, Ordering::Relaxed);
            if tx.send(batch).is_err() {
                break;
            }
        }
    });
    fanin
}

impl Auditor {
    /// Starts the writer (a dedicated thread). Resumes the chain from existing files in
    /// `cfg.dir`: the next seq and prev_hash continue from the last complete record, and a
    /// torn (partial) last line left by a crash is truncated away first (with a warning).
    pub fn start(cfg: &AuditCfg, instance: &str) -> Result<Auditor, Error> {
        Self::start_inner(cfg, instance, None, false)
    }

    fn start_inner(
        cfg: &AuditCfg,
        instance: &str,
        stream: Option<Box<dyn Write + Send>>,
        paused: bool,
    ) -> Result<Auditor, Error> {
        #[cfg(not(test))]
        let _ = paused;
        let mut chain = Chain::new(instance);
        let out = match (cfg.sink, stream) {
            (_, Some(w)) => Out::Stream(w),
            (AuditSink::Off, None) => return Ok(Auditor { inner: None }),
            (AuditSink::Stdout, None) => Out::Stream(Box::new(io::stdout())),
            (AuditSink::File, None) => {
                let dir = PathBuf::from(&cfg.dir);
                files::create_dir(&dir)?;
                let lock = files::lock_dir(&dir)?;
                let resumed = files::resume(&dir)?;
                if let Some((seq, hash)) = resumed.last {
                    chain.next_seq = seq + 1;
                    chain.set_prev_hash(&hash);
                }
                Out::File(FileOut {
                    dir,
                    cur: resumed.current,
                    rotate_size: cfg.rotate_size.0.max(1),
                    rotate_age: cfg.rotate_age.0,
                    disk: Disk::default(),
                    torn: false,
                    _lock: lock,
                })
            }
        };
        #[cfg(test)]
        let faults = match &out {
            Out::File(fo) => fo.disk.faults.clone(),
            Out::Stream(_) => Arc::default(),
        };
        let stats = Arc::new(Counters::default());
        stats.last_seq.store(chain.next_seq - 1, Ordering::Relaxed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| Error::Write(format!("cannot start the audit writer: {e}")))?;
        let (tx, rx) = mpsc::unbounded_channel::<Vec<Msg>>();
        let room = Arc::new(tokio::sync::Semaphore::new(cfg.queue.max(1)));
        #[cfg(test)]
        let gate = Arc::new(test_gate::Gate::new(paused));
        let runtime = tokio::runtime::Handle::try_current().ok();
        let fanout = runtime.as_ref().map(spawn_fanout);
        let fanin = runtime.as_ref().map(|h| spawn_gatherer(h, &tx, &stats));
        let writer = Writer {
            waits_for_disk: cfg.on_overload == Overload::Wait && matches!(out, Out::File(_)),
            out,
            chain,
            fsync: cfg.fsync,
            interval: cfg.fsync_interval.0,
            dirty_since: None,
            stats: stats.clone(),
            fanout,
            room: room.clone(),
            buf: Vec::new(),
            sync_failures: 0,
            sync_failure_logged: None,
            #[cfg(test)]
            gate: gate.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx, rt))
            .map_err(|e| Error::Write(format!("cannot start the audit writer: {e}")))?;
        Ok(Auditor {
            inner: Some(Arc::new(Inner {
                tx: Some(tx),
                fanin,
                room,
                overload: cfg.on_overload,
                record_allows: cfg.record_allows,
                stats,
                thread: Mutex::new(Some(thread)),
                #[cfg(test)]
                gate,
                #[cfg(test)]
                faults,
            })),
        })
    }

    /// Queues a record and resolves once it is acknowledged under the fsync policy (see the
    /// module doc). With sink `off`, and for allowed decisions when `record_allows` is false,
    /// it returns `Ok` at once without recording. If the future is dropped after the record
    /// was queued, the record is still written. With `on_overload: wait` and a full disk it
    /// stays pending until there is space (the waiting is on the writer's thread; this
    /// future only awaits its acknowledgement).
    pub async fn record(&self, rec: Record) -> Result<(), Error> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        if !inner.record_allows
            && rec.kind == Kind::Decision
            && rec.decision == Some(Decision::Allow)
        {
            return Ok(());
        }
        let Some(tx) = &inner.tx else {
            return Err(Error::Closed);
        };
        let permit = match inner.overload {
            Overload::Wait => inner.room.acquire().await.map_err(|_| Error::Closed)?,
            Overload::FailClosed => inner.room.try_acquire().map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => Error::Overloaded,
                tokio::sync::TryAcquireError::Closed => Error::Closed,
            })?,
        };
        let (ack, done) = oneshot::channel();
        let msg = Msg { rec, ack };
        inner.stats.queued.fetch_add(1, Ordering::Relaxed);
        let sent = match &inner.fanin {
            Some(f) => f.send(msg).map_err(drop),
            None => tx.send(vec![msg]).map_err(drop),
        };
        if sent.is_err() {
            inner.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Closed);
        }
        // The writer gives the room back when it takes the record.
        permit.forget();
        done.await.map_err(|_| Error::Closed)?
    }

    /// Records written, records queued, the last seq written, and whether the writer waits
    /// for disk space.
    pub fn stats(&self) -> Stats {
        match &self.inner {
            None => Stats::default(),
            Some(i) => Stats {
                written: i.stats.written.load(Ordering::Relaxed),
                queued: i.stats.queued.load(Ordering::Relaxed),
                last_seq: i.stats.last_seq.load(Ordering::Relaxed),
                waiting_for_disk: i.stats.waiting.load(Ordering::Relaxed),
                disk_waits: i.stats.disk_waits.load(Ordering::Relaxed),
            },
        }
    }
}

enum Out {
    File(FileOut),
    /// Stdout (or, in tests, a buffer): flushed, never synced, never rotated.
    Stream(Box<dyn Write + Send>),
}

struct FileOut {
    dir: PathBuf,
    cur: Option<Current>,
    rotate_size: u64,
    rotate_age: Duration,
    disk: Disk,
    /// The current file may end with bytes of a failed write that could not be cut back
    /// off; nothing is appended until they are.
    torn: bool,
    _lock: File,
}

impl FileOut {
    /// Whether a line of `line` bytes, after `buffered` bytes not yet written, must go to a
    /// new file.
    fn needs_new_file(&self, buffered: usize, line: usize, now: SystemTime) -> bool {
        let Some(c) = &self.cur else {
            return true;
        };
        let used = c.len + buffered as u64;
        let old = now.duration_since(c.started).unwrap_or_default() >= self.rotate_age;
        used > 0 && (used + line as u64 > self.rotate_size || old)
    }

    fn open_new(&mut self, seq: u64) -> Result<(), Failure> {
        let (path, file) = files::create_file(&self.dir, seq).map_err(|e| {
            let full = matches!(&e, Error::Io { source, .. } if disk::is_full(source));
            Failure {
                error: Error::Write(e.to_string()),
                disk_full: full,
            }
        })?;
        self.cur = Some(Current {
            path,
            file,
            len: 0,
            started: SystemTime::now(),
        });
        self.torn = false;
        Ok(())
    }

    /// Cuts the current file back to `len` bytes, the end of the last record fully written.
    /// Until that succeeds, nothing more is appended to the file.
    fn cut_back(&mut self, len: u64) -> io::Result<()> {
        let Some(c) = self.cur.as_mut() else {
            return Ok(());
        };
        self.torn = true;
        c.file.set_len(len)?;
        c.len = len;
        self.torn = false;
        Ok(())
    }

    /// Appends `buf` to the current file, and syncs it if `sync`. Bytes of a failed write
    /// are cut back off. When only the sync fails, the bytes are cut back off too if
    /// `cut_unsynced` (and the failure is a full disk); otherwise they stay, unsynced.
    fn append(&mut self, buf: &[u8], sync: bool, cut_unsynced: bool) -> Result<(), Fail> {
        if self.torn {
            let len = self.cur.as_ref().map_or(0, |c| c.len);
            if let Err(e) = self.cut_back(len) {
                let msg = format!(
                    "the audit file ends with a failed write that cannot be cut back off: {e}"
                );
                return Err(Fail::NotWritten(Failure::other(msg)));
            }
        }
        let Some(c) = self.cur.as_mut() else {
            if buf.is_empty() {
                return Ok(());
            }
            return Err(Fail::NotWritten(Failure::other(
                "no audit file open".into(),
            )));
        };
        let from = c.len;
        if !buf.is_empty() {
            if let Err(e) = self.disk.append(&mut c.file, buf) {
                let mut f = Failure::io(&c.path, "write", &e);
                if let Err(e2) = self.cut_back(from) {
                    // Not waited for: the next write first tries to cut the bytes off again.
                    tracing::error!(error = %e2, "audit: cannot cut a failed write back off");
                    f.disk_full = false;
                }
                return Err(Fail::NotWritten(f));
            }
            c.len += buf.len() as u64;
        }
        if !sync {
            return Ok(());
        }
        let Err(e) = self.disk.sync(&c.file) else {
            return Ok(());
        };
        let mut f = Failure::io(&c.path, "fsync", &e);
        if !(cut_unsynced && f.disk_full) {
            return Err(Fail::Unsynced(f));
        }
        match self.cut_back(from) {
            Ok(()) => Err(Fail::NotWritten(f)),
            Err(e2) => {
                // The whole records stay in the file, unsynced: the chain moves on, and the
                // callers get the error (as without `cut_unsynced`).
                tracing::error!(error = %e2, "audit: cannot cut an unsynced write back off");
                self.torn = false;
                f.disk_full = false;
                Err(Fail::Unsynced(f))
            }
        }
    }
}

/// A failed write or sync: the error the callers get, and whether it is a full disk, which
/// `on_overload: wait` waits out.
struct Failure {
    error: Error,
    disk_full: bool,
}

impl Failure {
    fn io(path: &std::path::Path, what: &str, e: &io::Error) -> Failure {
        Failure {
            error: Error::Write(format!("{what} {}: {e}", path.display())),
            disk_full: disk::is_full(e),
        }
    }

    fn other(msg: String) -> Failure {
        Failure {
            error: Error::Write(msg),
            disk_full: false,
        }
    }
}

/// Why a write failed, and whether the bytes reached the file anyway.
enum Fail {
    /// Nothing was written (a partial write was cut back off).
    NotWritten(Failure),
    /// The bytes are in the file but the sync failed.
    Unsynced(Failure),
}

/// What became of a batch: the acknowledgements to deliver, and the records not written
/// (in order), with why, if a write failed.
type Handled = (Acks, Option<(Failure, Vec<Msg>)>);

struct Writer {
    out: Out,
    chain: Chain,
    fsync: Fsync,
    interval: Duration,
    /// When the first write not yet synced happened.
    dirty_since: Option<Instant>,
    stats: Arc<Counters>,
    fanout: Option<tokio::sync::mpsc::UnboundedSender<Acks>>,
    room: Arc<tokio::sync::Semaphore>,
    /// The batch buffer, kept between batches.
    buf: Vec<u8>,
    /// `on_overload: wait` with the file sink: a full disk is waited out.
    waits_for_disk: bool,
    /// Interval syncs that failed in a row, and when the last of them was logged.
    sync_failures: u64,
    sync_failure_logged: Option<Instant>,
    #[cfg(test)]
    gate: Arc<test_gate::Gate>,
}

/// While interval syncs keep failing, one line per this long says so (with the count).
const SYNC_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

impl Writer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Vec<Msg>>, rt: tokio::runtime::Runtime) {
        loop {
            #[cfg(test)]
            self.gate.wait();
            let due = match self.fsync {
                Fsync::Interval => self.dirty_since.map(|t| t + self.interval),
                Fsync::EveryRecord => None,
            };
            let first = match due {
                Some(deadline) => {
                    // The timer must be created inside the runtime.
                    let next = rt.block_on(async {
                        tokio::time::timeout_at(deadline.into(), rx.recv()).await
                    });
                    match next {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(_) => {
                            self.sync_logged();
                            continue;
                        }
                    }
                }
                None => match rx.blocking_recv() {
                    Some(m) => m,
                    None => break,
                },
            };
            let mut batch = first;
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(mut m) => batch.append(&mut m),
                    Err(_) => break,
                }
            }
            self.room.add_permits(batch.len());
            self.stats
                .queued
                .fetch_sub(batch.len() as u64, Ordering::Relaxed);
            self.commit(batch);
            self.sync_if_due();
        }
        self.sync_logged();
    }

    /// Writes a batch and acknowledges its records. A failed write fails the records it
    /// could not write, unless it failed on a full disk and the writer waits for disk space:
    /// then the records are held, and written again after a pause (see the module doc),
    /// until they are written, another error fails them, or the auditor is dropped.
    fn commit(&mut self, batch: Vec<Msg>) {
        let mut pending = batch;
        let mut waiting: Option<Waiting> = None;
        loop {
            let (mut acks, unwritten) = self.handle(pending);
            let Some((failure, held)) = unwritten else {
                // The wait ends before the held records are acknowledged, so that whoever
                // gets an acknowledgement sees the wait over.
                if let Some(w) = waiting {
                    self.end_wait(&w, None);
                }
                deliver(&self.fanout, acks);
                return;
            };
            let stopping = self.stats.stop.load(Ordering::SeqCst);
            if !(self.waits_for_disk && failure.disk_full && !stopping) || held.is_empty() {
                if let Some(w) = &waiting {
                    self.end_wait(w, Some((&failure.error, stopping)));
                }
                tracing::error!(error = %failure.error, "audit: records not recorded");
                acks.extend(
                    held.into_iter()
                        .map(|m| (m.ack, Err(write_error(&failure.error)))),
                );
                deliver(&self.fanout, acks);
                return;
            }
            // The records written before the failure are acknowledged now.
            deliver(&self.fanout, acks);
            let w = waiting.get_or_insert_with(|| self.start_wait(&failure.error, held.len()));
            w.records = w.records.max(held.len());
            let pause = w.next_pause();
            self.pause(pause);
            pending = held;
        }
    }

    fn start_wait(&self, error: &Error, records: usize) -> Waiting {
        self.stats.waiting.store(true, Ordering::Relaxed);
        self.stats.disk_waits.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            error = %error,
            records,
            "audit: the disk is full; on_overload: wait holds the records (their requests \
             wait, new ones queue) and tries again, every 100 ms growing to every 1 s, until \
             there is space"
        );
        Waiting::new(records)
    }

    /// Ends a wait for disk space: the held records were written (`failed` None), or they
    /// failed with an error, because the writer is stopping or because of another error.
    fn end_wait(&self, w: &Waiting, failed: Option<(&Error, bool)>) {
        self.stats.waiting.store(false, Ordering::Relaxed);
        let waited_ms = w.since.elapsed().as_millis() as u64;
        match failed {
            None => tracing::info!(
                waited_ms,
                records = w.records,
                "audit: disk space is back; the held records are written and acknowledged"
            ),
            Some((e, true)) => tracing::error!(
                error = %e,
                waited_ms,
                "audit: stopped waiting for disk space: the writer is stopping; the held \
                 records are not recorded, and their requests got no answer"
            ),
            Some((e, false)) => tracing::error!(
                error = %e,
                waited_ms,
                "audit: stopped waiting for disk space: the disk failed otherwise; the held \
                 records are not recorded"
            ),
        }
    }

    /// Sleeps `d` on the writer's thread (never a runtime thread), or less if the auditor
    /// is dropped meanwhile; records acknowledged earlier are synced when due.
    fn pause(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            self.sync_if_due();
            let now = Instant::now();
            if now >= until || self.stats.stop.load(Ordering::SeqCst) {
                return;
            }
            let next = match (self.fsync, self.dirty_since) {
                (Fsync::Interval, Some(t)) => until.min((t + self.interval).max(now)),
                _ => until,
            };
            std::thread::park_timeout(next - now);
        }
    }

    /// With `fsync: interval`, syncs when the oldest unsynced write is `fsync_interval` old.
    fn sync_if_due(&mut self) {
        if let (Fsync::Interval, Some(t)) = (self.fsync, self.dirty_since) {
            if t.elapsed() >= self.interval {
                self.sync_logged();
            }
        }
    }

    /// Syncs outside a batch (interval timer, shutdown); a failure can only be logged, since
    /// the records were acknowledged already.
    /// A failed sync is tried again one interval later (not at once, which would spin), and
    /// logged when it starts failing, then once per `SYNC_FAILURE_LOG_EVERY`.
    fn sync_logged(&mut self) {
        match self.sync() {
            Ok(()) => {
                if self.sync_failures > 0 {
                    tracing::warn!(failures = self.sync_failures, "audit: fsync works again");
                    self.sync_failures = 0;
                    self.sync_failure_logged = None;
                }
            }
            Err(e) => {
                self.sync_failures += 1;
                if self.dirty_since.is_some() {
                    self.dirty_since = Some(Instant::now());
                }
                let due = match self.sync_failure_logged {
                    None => true,
                    Some(t) => t.elapsed() >= SYNC_FAILURE_LOG_EVERY,
                };
                if due {
                    self.sync_failure_logged = Some(Instant::now());
                    tracing::error!(error = %e.error, failures = self.sync_failures, "audit: fsync failed; recent records may not survive a power cut");
                }
            }
        }
    }

    fn sync(&mut self) -> Result<(), Failure> {
        if self.dirty_since.is_none() {
            return Ok(());
        }
        if let Out::File(FileOut {
            cur: Some(c), disk, ..
        }) = &mut self.out
        {
            disk.sync(&c.file)
                .map_err(|e| Failure::io(&c.path, "fsync", &e))?;
        }
        self.dirty_since = None;
        Ok(())
    }

    /// Appends `buf` to the current file (or stream), then syncs if `sync`.
    fn write(&mut self, buf: &[u8], sync: bool) -> Result<(), Fail> {
        let cut_unsynced = self.waits_for_disk;
        let fo = match &mut self.out {
            Out::Stream(w) => {
                return w
                    .write_all(buf)
                    .and_then(|_| w.flush())
                    .map_err(|e| Fail::NotWritten(Failure::other(e.to_string())));
            }
            Out::File(fo) => fo,
        };
        let was_dirty = self.dirty_since.is_some();
        if !buf.is_empty() {
            self.dirty_since.get_or_insert_with(Instant::now);
        }
        match fo.append(buf, sync && (was_dirty || !buf.is_empty()), cut_unsynced) {
            Ok(()) if sync => {
                self.dirty_since = None;
                Ok(())
            }
            Ok(()) => Ok(()),
            Err(Fail::NotWritten(f)) => {
                if !was_dirty {
                    self.dirty_since = None;
                }
                Err(Fail::NotWritten(f))
            }
            Err(e) => Err(e),
        }
    }

    fn needs_new_file(&self, buffered: usize, line: usize, now: SystemTime) -> bool {
        match &self.out {
            Out::File(fo) => fo.needs_new_file(buffered, line, now),
            Out::Stream(_) => false,
        }
    }

    fn open_new(&mut self, seq: u64) -> Result<(), Failure> {
        match &mut self.out {
            Out::File(fo) => fo.open_new(seq),
            Out::Stream(_) => Ok(()),
        }
    }

    /// Writes the lines `bytes` of the sealed records `seg`, and syncs if `sync`. When they
    /// are written, the chain moves on to `chain` and they are acknowledged (into `acks`).
    /// When they are not, they stay in `seg` and the chain stays. When only the sync failed
    /// and the bytes stay in the file, the chain moves on but the callers get the error.
    fn write_seg(
        &mut self,
        bytes: &[u8],
        seg: &mut Vec<Msg>,
        chain: &Chain,
        sync: bool,
        acks: &mut Acks,
    ) -> Result<(), Failure> {
        let (result, failure) = match self.write(bytes, sync) {
            Ok(()) => (Ok(()), None),
            Err(Fail::NotWritten(f)) => return Err(f),
            Err(Fail::Unsynced(f)) => (Err(write_error(&f.error)), Some(f)),
        };
        if !seg.is_empty() {
            self.stats
                .last_seq
                .store(chain.next_seq - 1, Ordering::Relaxed);
            self.stats
                .written
                .fetch_add(seg.len() as u64, Ordering::Relaxed);
        }
        self.chain = chain.clone();
        acks.extend(seg.drain(..).map(|m| (m.ack, clone_result(&result))));
        failure.map_or(Ok(()), Err)
    }

    /// Seals and writes one batch. The records of a batch share one seal time (one clock
    /// read), and are sealed straight into one buffer. Returns the acknowledgements to
    /// deliver and, if a write failed, the records not written (the failed one and every
    /// one after it), for [`Writer::commit`] to fail or to hold.
    fn handle(&mut self, batch: Vec<Msg>) -> Handled {
        let every_record = self.fsync == Fsync::EveryRecord;
        let now = SystemTime::now();
        let time = humantime::format_rfc3339_millis(now).to_string();
        let mut work = self.chain.clone();
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        // Records sealed into `buf`, not yet written.
        let mut seg: Vec<Msg> = Vec::new();
        let mut acks: Acks = Vec::new();
        let mut failure: Option<Failure> = None;
        let mut rest = batch.into_iter();
        for msg in rest.by_ref() {
            let before = work.clone();
            let at = buf.len();
            let seq = match work.seal_into(&msg.rec, &time, &mut buf) {
                Ok(seq) => seq,
                Err(e) => {
                    acks.push((msg.ack, Err(e)));
                    continue;
                }
            };
            if self.needs_new_file(at, buf.len() - at, now) {
                // Close the current file: everything in it is written and synced.
                let closed = self
                    .write_seg(&buf[..at], &mut seg, &before, true, &mut acks)
                    .and_then(|()| self.open_new(seq));
                buf.drain(..at);
                if let Err(f) = closed {
                    failure = Some(f);
                    seg.push(msg);
                    break;
                }
            }
            seg.push(msg);
        }
        if failure.is_none() && !seg.is_empty() {
            failure = self
                .write_seg(&buf, &mut seg, &work, every_record, &mut acks)
                .err();
        }
        // Keep the buffer for the next batch, unless a burst made it large.
        if buf.capacity() <= KEEP_BUF {
            self.buf = buf;
        }
        let unwritten = failure.map(|f| {
            seg.extend(rest);
            (f, seg)
        });
        (acks, unwritten)
    }
}

fn clone_result(r: &Result<(), Error>) -> Result<(), Error> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(write_error(e)),
    }
}

/// `e` as the write error each record of a failed batch gets: its message once, not wrapped
/// again in "audit write failed: " when it already is a write error.
fn write_error(e: &Error) -> Error {
    match e {
        Error::Write(m) => Error::Write(m.clone()),
        other => Error::Write(other.to_string()),
    }
}

#[cfg(test)]
mod write_error_tests {
    use super::*;

    #[test]
    fn a_write_error_is_not_prefixed_twice() {
        let e = write_error(&Error::Write("disk full".into()));
        assert_eq!(e.to_string(), "audit write failed: disk full");
        let e = write_error(&Error::Closed);
        assert_eq!(
            e.to_string(),
            "audit write failed: the audit writer has stopped"
        );
        let r = clone_result(&Err(Error::Write("x".into())));
        assert_eq!(r.unwrap_err().to_string(), "audit write failed: x");
    }
}

#[cfg(test)]
mod test_gate {
    //! A switch that holds the writer before it takes the next batch, so that tests can fill
    //! the queue deterministically.
    use std::sync::{Condvar, Mutex};

    pub struct Gate {
        paused: Mutex<bool>,
        cv: Condvar,
    }

    impl Gate {
        pub fn new(paused: bool) -> Gate {
            Gate {
                paused: Mutex::new(paused),
                cv: Condvar::new(),
            }
        }
        pub fn set(&self, paused: bool) {
            *self.paused.lock().unwrap() = paused;
            self.cv.notify_all();
        }
        pub fn wait(&self) {
            let mut p = self.paused.lock().unwrap();
            while *p {
                p = self.cv.wait(p).unwrap();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::check_line;
    use portcullis_config::{Dur, Size};
    use serde_json::Value;
    use std::sync::Mutex as StdMutex;

    impl Auditor {
        fn start_for_test(
            cfg: &AuditCfg,
            stream: Option<Box<dyn Write + Send>>,
            paused: bool,
        ) -> Auditor {
            Auditor::start_inner(cfg, "test", stream, paused).unwrap()
        }
        fn gate(&self, paused: bool) {
            self.inner.as_ref().unwrap().gate.set(paused);
        }
        fn faults(&self) -> &disk::faults::Faults {
            &self.inner.as_ref().unwrap().faults
        }
    }

    /// Waits (up to 5 s) until `f` holds.
    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never: {what}");
    }

    fn file_len(dir: &std::path::Path) -> u64 {
        std::fs::metadata(dir.join(files::file_name(1)))
            .unwrap()
            .len()
    }

    /// With `on_overload: wait`, records whose write (or sync) fails on a full disk are held,
    /// their callers wait, the failed bytes are cut back off each time, and once there is
    /// space they are written and the chain verifies.
    async fn a_full_disk_is_waited_out(fill: fn(&disk::faults::Faults, i32)) {
        let tmp = tempfile::tempdir().unwrap();
        let a = Auditor::start_for_test(&cfg(tmp.path()), None, false);
        a.record(rec("r1")).await.unwrap();
        let len = file_len(tmp.path());
        fill(a.faults(), libc::ENOSPC);
        let held: Vec<_> = (2..=4)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move { a.record(rec(&format!("r{i}"))).await })
            })
            .collect();
        // The first attempt and the one 100 ms later both failed.
        until("two failed attempts", || {
            a.stats().waiting_for_disk && a.faults().injected() >= 2
        })
        .await;
        assert!(held.iter().all(|t| !t.is_finished()), "the callers wait");
        assert_eq!(file_len(tmp.path()), len, "failed writes are cut back off");
        let s = a.stats();
        assert_eq!((s.written, s.last_seq, s.disk_waits), (1, 1, 1));
        fill(a.faults(), 0);
        for t in held {
            t.await.unwrap().unwrap();
        }
        let s = a.stats();
        assert_eq!((s.written, s.last_seq), (4, 4));
        assert_eq!((s.waiting_for_disk, s.disk_waits), (false, 1));
        drop(a);
        let report = crate::verify(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!((report.records, report.last_seq), (4, 4));
    }

    /// With `fsync: interval`, a sync that keeps failing is tried again once per interval
    /// (20 ms here), not in a loop, and works again once the disk does.
    #[tokio::test]
    async fn a_failing_interval_sync_is_retried_once_per_interval() {
        let tmp = tempfile::tempdir().unwrap();
        let c = AuditCfg {
            fsync: Fsync::Interval,
            ..cfg(tmp.path())
        };
        let a = Auditor::start_for_test(&c, None, false);
        a.faults().fail_syncs(libc::EIO);
        // Acknowledged once written: the interval sync comes later.
        a.record(rec("r1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let tries = a.faults().injected();
        // About 20 tries in 400 ms; a loop would have made hundreds of thousands.
        assert!((2..=60).contains(&tries), "{tries} sync attempts");
        a.faults().fail_syncs(0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = a.faults().injected();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            a.faults().injected(),
            after,
            "no more failures once syncs work"
        );
        drop(a);
        let report = crate::verify(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(report.records, 1);
    }

    #[tokio::test]
    async fn wait_holds_records_while_writes_fail_on_a_full_disk() {
        a_full_disk_is_waited_out(disk::faults::Faults::fail_writes).await;
    }

    #[tokio::test]
    async fn wait_holds_records_while_syncs_fail_on_a_full_disk() {
        a_full_disk_is_waited_out(disk::faults::Faults::fail_syncs).await;
    }

    /// Errors other than a full disk fail the records at once, even with `wait`; and with
    /// `fail_closed` a full disk does too. The chain continues from the last record written.
    #[tokio::test]
    async fn other_errors_and_fail_closed_are_not_waited_for() {
        for (overload, errno) in [
            (Overload::Wait, libc::EIO),
            (Overload::FailClosed, libc::ENOSPC),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let mut c = cfg(tmp.path());
            c.on_overload = overload;
            let a = Auditor::start_for_test(&c, None, false);
            a.record(rec("r1")).await.unwrap();
            let len = file_len(tmp.path());
            a.faults().fail_writes(errno);
            let e = a.record(rec("lost")).await.unwrap_err();
            assert!(matches!(e, Error::Write(_)), "{e}");
            assert_eq!(a.faults().injected(), 1, "{errno}: no second attempt");
            assert_eq!(
                file_len(tmp.path()),
                len,
                "the failed write is cut back off"
            );
            a.faults().fail_writes(0);
            a.record(rec("r2")).await.unwrap();
            let s = a.stats();
            assert_eq!((s.written, s.last_seq, s.disk_waits), (2, 2, 0));
            drop(a);
            let text = std::fs::read_to_string(tmp.path().join(files::file_name(1))).unwrap();
            assert!(!text.contains("lost"));
            assert_eq!(
                crate::verify(&[tmp.path().to_path_buf()]).unwrap().records,
                2
            );
        }
    }

    /// A batch that spans several files (a small `rotate_size`) on a full disk: the records
    /// written before a failure are acknowledged, the rest are held, and the chain continues
    /// across the files once there is space.
    #[tokio::test]
    async fn a_full_disk_is_waited_out_across_rotations() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path());
        c.rotate_size = Size(1000);
        let a = Auditor::start_for_test(&c, None, true);
        a.faults().fail_writes(libc::ENOSPC);
        let held: Vec<_> = (1..=8)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move { a.record(rec(&format!("r{i}"))).await })
            })
            .collect();
        wait_queued(&a, 8).await;
        a.gate(false);
        until("two failed attempts", || a.faults().injected() >= 2).await;
        assert!(a.stats().waiting_for_disk);
        a.faults().fail_writes(0);
        for t in held {
            t.await.unwrap().unwrap();
        }
        assert_eq!(a.stats().last_seq, 8);
        drop(a);
        let report = crate::verify(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(report.records, 8);
        assert!(report.files >= 3, "{} files", report.files);
    }

    /// Another error while the writer waits for space (the disk now fails with EIO) ends the
    /// wait: the held records fail, and the writer takes new ones again.
    #[tokio::test]
    async fn another_error_while_waiting_fails_the_held_records() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Auditor::start_for_test(&cfg(tmp.path()), None, false);
        a.faults().fail_writes(libc::ENOSPC);
        let held = tokio::spawn({
            let a = a.clone();
            async move { a.record(rec("held")).await }
        });
        until("waiting", || a.stats().waiting_for_disk).await;
        a.faults().fail_writes(libc::EIO);
        let e = held.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("os error 5"), "{e}");
        assert!(!a.stats().waiting_for_disk);
        a.faults().fail_writes(0);
        a.record(rec("r1")).await.unwrap();
        drop(a);
        let report = crate::verify(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!((report.records, report.last_seq), (1, 1));
    }

    /// Dropping the auditor (shutdown) while the writer waits for space ends at once: the
    /// held record gets one more attempt, still fails, and is not written.
    #[tokio::test]
    async fn dropping_the_auditor_while_it_waits_for_space_ends_in_bounded_time() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Auditor::start_for_test(&cfg(tmp.path()), None, false);
        a.record(rec("r1")).await.unwrap();
        a.faults().fail_writes(libc::ENOSPC);
        let held = tokio::spawn({
            let a = a.clone();
            async move { a.record(rec("held")).await }
        });
        until("waiting", || a.stats().waiting_for_disk).await;
        // Its caller goes away (as the runtime drops requests at shutdown).
        held.abort();
        assert!(held.await.unwrap_err().is_cancelled());
        // Past the first pauses, so that the writer sleeps up to a second.
        until("four attempts", || a.faults().injected() >= 4).await;
        let started = Instant::now();
        drop(a);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "stopping took {took:?}");
        files::lock_dir(tmp.path()).unwrap();
        let text = std::fs::read_to_string(tmp.path().join(files::file_name(1))).unwrap();
        assert!(!text.contains("held"));
        assert_eq!(
            crate::verify(&[tmp.path().to_path_buf()]).unwrap().records,
            1
        );
    }

    fn cfg(dir: &std::path::Path) -> AuditCfg {
        AuditCfg {
            dir: dir.to_string_lossy().into_owned(),
            fsync: Fsync::EveryRecord,
            fsync_interval: Dur(Duration::from_millis(20)),
            rotate_size: Size(1 << 20),
            ..AuditCfg::default()
        }
    }

    fn rec(id: &str) -> Record {
        Record {
            request_id: Some(id.into()),
            decision: Some(Decision::Deny),
            ..Record::default()
        }
    }

    async fn wait_queued(a: &Auditor, n: u64) {
        for _ in 0..500 {
            if a.stats().queued == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("queue never reached {n}: {:?}", a.stats());
    }

    #[tokio::test]
    async fn fail_closed_refuses_when_the_queue_is_full() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path());
        c.queue = 2;
        c.on_overload = Overload::FailClosed;
        let a = Auditor::start_for_test(&c, None, true);
        let t1 = tokio::spawn({
            let a = a.clone();
            async move { a.record(rec("r1")).await }
        });
        let t2 = tokio::spawn({
            let a = a.clone();
            async move { a.record(rec("r2")).await }
        });
        wait_queued(&a, 2).await;
        assert!(matches!(a.record(rec("r3")).await, Err(Error::Overloaded)));
        assert_eq!(a.stats().queued, 2);
        a.gate(false);
        t1.await.unwrap().unwrap();
        t2.await.unwrap().unwrap();
        let s = a.stats();
        assert_eq!((s.written, s.queued, s.last_seq), (2, 0, 2));
        let text = std::fs::read_to_string(tmp.path().join(files::file_name(1))).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(!text.contains("r3"), "a refused record is not written");
    }

    #[tokio::test]
    async fn records_of_successive_runtime_turns_go_to_the_thread_together() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path());
        c.fsync = Fsync::Interval;
        let a = Auditor::start_for_test(&c, None, false);
        // Four waves of 50 requests, each wave one turn of the runtime after the one before.
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move {
                    for _ in 0..i % 4 {
                        tokio::task::yield_now().await;
                    }
                    a.record(rec(&format!("r{i}"))).await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let inner = a.inner.as_ref().unwrap();
        // One hand-off (GATHER_FOR is long under test, so a busy machine cannot split the
        // gathering); without gathering, one per wave.
        let handoffs = inner.stats.handoffs.load(Ordering::Relaxed);
        assert!(handoffs <= 2, "{handoffs} hand-offs for 4 waves");
        let s = a.stats();
        assert_eq!((s.written, s.last_seq), (200, 200));
        drop(a);
        let report = crate::verify(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(report.records, 200);
    }

    #[tokio::test]
    async fn wait_blocks_until_there_is_room() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path());
        c.queue = 1;
        let a = Auditor::start_for_test(&c, None, true);
        let t1 = tokio::spawn({
            let a = a.clone();
            async move { a.record(rec("r1")).await }
        });
        wait_queued(&a, 1).await;
        let mut t2 = tokio::spawn({
            let a = a.clone();
            async move { a.record(rec("r2")).await }
        });
        let early = tokio::time::timeout(Duration::from_millis(100), &mut t2).await;
        assert!(early.is_err(), "the second record waits for room");
        a.gate(false);
        t1.await.unwrap().unwrap();
        t2.await.unwrap().unwrap();
        assert_eq!(a.stats().written, 2);
    }

    /// A stream that records what it was given, and fails the writes it is told to.
    #[derive(Clone, Default)]
    struct Capture {
        data: Arc<StdMutex<Vec<u8>>>,
        fail_next: Arc<StdMutex<usize>>,
    }

    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut f = self.fail_next.lock().unwrap();
            if *f > 0 {
                *f -= 1;
                return Err(io::Error::other("disk full"));
            }
            self.data.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(c: &Capture) -> Vec<Value> {
        let data = c.data.lock().unwrap().clone();
        data.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| Value::Object(check_line(l).unwrap().1))
            .collect()
    }

    #[tokio::test]
    async fn stream_sink_writes_chained_json_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let cap = Capture::default();
        let a = Auditor::start_for_test(&cfg(tmp.path()), Some(Box::new(cap.clone())), false);
        a.record(rec("r1")).await.unwrap();
        a.record(rec("r2")).await.unwrap();
        let got = lines(&cap);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["request_id"], "r1");
        assert_eq!(got[1]["prev_hash"], got[0]["hash"]);
        assert_eq!(got[1]["seq"], 2);
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_and_the_chain_does_not_advance() {
        let tmp = tempfile::tempdir().unwrap();
        let cap = Capture::default();
        *cap.fail_next.lock().unwrap() = 1;
        let a = Auditor::start_for_test(&cfg(tmp.path()), Some(Box::new(cap.clone())), false);
        let e = a.record(rec("lost")).await.unwrap_err();
        assert!(
            matches!(e, Error::Write(ref m) if m.contains("disk full")),
            "{e}"
        );
        a.record(rec("r2")).await.unwrap();
        let got = lines(&cap);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["seq"], 1);
        assert_eq!(got[0]["prev_hash"], crate::chain::GENESIS);
        assert_eq!(a.stats().written, 1);
    }

    #[tokio::test]
    async fn off_and_filtered_allows_return_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path());
        c.sink = AuditSink::Off;
        let a = Auditor::start(&c, "i").unwrap();
        a.record(rec("r")).await.unwrap();
        assert_eq!(a.stats(), Stats::default());
        assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none());

        let mut c = cfg(tmp.path());
        c.record_allows = false;
        let cap = Capture::default();
        let a = Auditor::start_for_test(&c, Some(Box::new(cap.clone())), false);
        let allow = Record {
            decision: Some(Decision::Allow),
            ..Record::default()
        };
        a.record(allow).await.unwrap();
        a.record(rec("deny")).await.unwrap();
        let got = lines(&cap);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["decision"], "deny");
    }

    #[tokio::test]
    async fn interval_mode_acknowledges_and_stops_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = cfg(tmp.path());
        c.fsync = Fsync::Interval;
        let a = Auditor::start(&c, "i").unwrap();
        for i in 0..50 {
            a.record(rec(&format!("r{i}"))).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(a.stats().last_seq, 50);
        drop(a);
        // The lock was released by the writer's exit.
        files::lock_dir(tmp.path()).unwrap();
    }

    #[tokio::test]
    async fn a_second_writer_on_the_same_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Auditor::start(&cfg(tmp.path()), "i").unwrap();
        let b = Auditor::start(&cfg(tmp.path()), "j");
        assert!(matches!(b, Err(Error::Locked { .. })));
        drop(a);
    }
}
