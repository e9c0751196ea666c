//! The bus: [`Bus::publish`] hands an event to every sink whose type filter matches, through
//! that sink's bounded queue, without waiting and without failing. A full queue drops the
//! event for that sink and counts it ([`SinkCounts::dropped`]); the other sinks still get it.
//!
//! Each sink runs on its own tokio task, which takes batches off its queue and hands them to
//! the [`Sink`]. In-process consumers (the automation engine) [subscribe](BusBuilder::subscribe)
//! instead: they get a receiver of their own bounded queue, with no task in between.
//!
//! [`Bus::shutdown`] stops the sinks: each hands on what is still queued (the webhook writes
//! it to its outbox) within a grace period. Dropping every handle to the bus stops them the
//! same way, without waiting.

use crate::event::Event;
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// A boxed future, as [`Sink`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The most events a sink task hands on at once.
pub const BATCH: usize = 256;

/// Where events go. Implementations count what happened to each event in
/// [`SinkContext::stats`] (`delivered`, `failed`, `retried`, `evicted`); the bus counts
/// `published` and `dropped`.
pub trait Sink: Send + 'static {
    /// Called once when the bus is built, inside the runtime: start background work here
    /// with [`SinkContext::spawn`] (the webhook's delivery loop).
    fn start(&mut self, _ctx: &SinkContext) {}

    /// Hands on a batch taken off the queue, and returns the positions (in `events`) of those
    /// it gave up on instead: a publisher waiting for them ([`Bus::publish_handed_on`]) is
    /// told they were not handed on. Returning is what lets the next batch come: a slow sink
    /// fills its own queue, and nothing else.
    fn send<'a>(
        &'a mut self,
        events: &'a [Arc<Event>],
        ctx: &'a SinkContext,
    ) -> BoxFuture<'a, Vec<usize>>;

    /// Called once after the last batch, at shutdown: flush.
    fn close<'a>(&'a mut self, _ctx: &'a SinkContext) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
}

/// What the bus counts for one sink. Sinks add to the fields directly.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Taken into the sink's queue.
    pub published: AtomicU64,
    /// Not taken: the queue was full (or the sink had stopped).
    pub dropped: AtomicU64,
    /// Delivered: a 2xx from the webhook, a publish (or JetStream ack) from NATS, a line
    /// written.
    pub delivered: AtomicU64,
    /// Given up on: refused by the receiver (4xx), out of attempts, or not writable.
    pub failed: AtomicU64,
    /// Delivery attempts that failed and were scheduled again.
    pub retried: AtomicU64,
    /// Evicted from a full outbox, oldest first.
    pub evicted: AtomicU64,
}

/// A snapshot of [`SinkStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkCounts {
    pub published: u64,
    pub dropped: u64,
    pub delivered: u64,
    pub failed: u64,
    pub retried: u64,
    pub evicted: u64,
}

impl SinkStats {
    pub fn snapshot(&self) -> SinkCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SinkCounts {
            published: get(&self.published),
            dropped: get(&self.dropped),
            delivered: get(&self.delivered),
            failed: get(&self.failed),
            retried: get(&self.retried),
            evicted: get(&self.evicted),
        }
    }

    /// Adds `n` to one of the counters.
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What a sink gets from the bus: its name, its counters, the shutdown signal, and a way to
/// spawn tasks the bus waits for at shutdown.
#[derive(Clone, Debug)]
pub struct SinkContext {
    pub name: Arc<str>,
    pub stats: Arc<SinkStats>,
    shutdown: watch::Receiver<bool>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl SinkContext {
    /// A receiver that turns `true` (or closes) when the bus shuts down:
    /// `shutdown.wait_for(|stop| *stop).await` returns then.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Whether the bus is shutting down (or gone).
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow() || self.shutdown.has_changed().is_err()
    }

    /// Spawns a background task of this sink; [`Bus::shutdown`] waits for it.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.lock().push(tokio::spawn(task));
    }
}

/// Which event types a sink takes: glob patterns (`dev.portcullis.server.*`); none means
/// every type.
#[derive(Clone, Debug, Default)]
pub struct TypeFilter(Vec<glob::Pattern>);

impl TypeFilter {
    /// Every type.
    pub fn any() -> TypeFilter {
        TypeFilter(Vec::new())
    }

    /// Types matching any of `patterns` (glob: `*`, `?`, `[...]`); an empty list takes all.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<TypeFilter, String> {
        patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p.as_ref())
                    .map_err(|e| format!("type pattern `{}`: {}", p.as_ref(), e.msg))
            })
            .collect::<Result<_, _>>()
            .map(TypeFilter)
    }

    pub fn matches(&self, type_: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| p.matches(type_))
    }
}

struct Outlet {
    name: Arc<str>,
    filter: TypeFilter,
    tx: mpsc::Sender<Arc<Event>>,
    stats: Arc<SinkStats>,
    /// A sink's queue (not an in-process subscriber's): what [`Bus::publish_handed_on`]
    /// waits for.
    sink: bool,
}

/// Publishers waiting for the sinks that took an event to hand it on (see
/// [`Bus::publish_handed_on`]), by the event's address: each entry keeps its event alive, so
/// the address is not reused while it waits.
#[derive(Default)]
struct Acks {
    /// Entries in `map`: the sink tasks take no lock while nobody waits.
    waiting: AtomicU64,
    map: Mutex<std::collections::HashMap<usize, Waiting>>,
}

struct Waiting {
    _event: Arc<Event>,
    /// Sinks yet to hand it on.
    left: usize,
    /// A sink did not take it, or gave up on it.
    lost: bool,
    /// Told whether every sink handed it on.
    done: Option<tokio::sync::oneshot::Sender<bool>>,
}

impl Acks {
    /// `n` sinks (of those that took `event`) are done with it: handed on, or (`lost`) not
    /// taken or given up on.
    fn settle(&self, event: &Arc<Event>, n: usize, lost: bool) {
        let key = Arc::as_ptr(event) as usize;
        let mut map = self.map.lock();
        let Some(w) = map.get_mut(&key) else { return };
        w.left = w.left.saturating_sub(n);
        w.lost |= lost;
        if w.left == 0 {
            if let Some(mut w) = map.remove(&key) {
                if let Some(done) = w.done.take() {
                    let _ = done.send(!w.lost);
                }
            }
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// A sink is done with `batch`, and gave up on the events at positions `lost`.
    fn handed_on(&self, batch: &[Arc<Event>], lost: &[usize]) {
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return;
        }
        for (i, e) in batch.iter().enumerate() {
            self.settle(e, 1, lost.contains(&i));
        }
    }
}

struct Inner {
    outlets: Vec<Outlet>,
    acks: Arc<Acks>,
    shutdown: watch::Sender<bool>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Live watchers (the admin API's event stream): a broadcast that drops for a watcher
    /// that falls behind, and how many there are (publishing costs nothing without any).
    taps: tokio::sync::broadcast::Sender<Arc<Event>>,
    tapped: std::sync::atomic::AtomicUsize,
}

/// A live watcher of every event published while it lives (see [`Bus::tap`]).
pub struct Tap {
    rx: tokio::sync::broadcast::Receiver<Arc<Event>>,
    inner: Arc<Inner>,
}

impl Tap {
    /// The next event; `Err(n)` when this watcher fell behind and missed `n` of them.
    pub async fn next(&mut self) -> Result<Arc<Event>, u64> {
        loop {
            match self.rx.recv().await {
                Ok(e) => return Ok(e),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => return Err(n),
                // The bus lives as long as this tap holds it: never closed.
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await
                }
            }
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.inner.tapped.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many events a live watcher may be behind before it misses some.
pub const TAP_QUEUE: usize = 1024;

/// The event bus: a cheap `Clone` handle. See the [module docs](self).
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.inner.outlets.iter().map(|o| &*o.name).collect();
        f.debug_struct("Bus").field("sinks", &names).finish()
    }
}

impl Default for Bus {
    /// A bus with no sinks: publishing does nothing.
    fn default() -> Bus {
        BusBuilder::default().build()
    }
}

impl Bus {
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
    }

    /// Offers `event` to every matching sink and live watcher. Never blocks, never fails.
    pub fn publish(&self, event: Event) {
        let tapped = self.inner.tapped.load(Ordering::Relaxed) > 0;
        if self.inner.outlets.is_empty() && !tapped {
            return;
        }
        self.offer(&Arc::new(event));
    }

    /// Offers `event` as [`Bus::publish`] does, and resolves once every sink that takes its
    /// type has handed it on (a webhook sink: written to its outbox, durable with a store):
    /// `true`, or `false` at once when a sink could not take it (its queue was full). For a
    /// publisher that answers its caller only once the event can no longer be lost to a
    /// crash (the admin API's inbound events). In-process subscribers and live watchers are
    /// not waited for.
    pub fn publish_handed_on(&self, event: Event) -> impl Future<Output = bool> + Send + 'static {
        let event = Arc::new(event);
        let sinks = self
            .inner
            .outlets
            .iter()
            .filter(|o| o.sink && o.filter.matches(&event.type_))
            .count();
        let (done, handed_on) = tokio::sync::oneshot::channel();
        let acks = &self.inner.acks;
        if sinks > 0 {
            acks.waiting.fetch_add(1, Ordering::Relaxed);
            acks.map.lock().insert(
                Arc::as_ptr(&event) as usize,
                Waiting {
                    _event: event.clone(),
                    left: sinks,
                    lost: false,
                    done: Some(done),
                },
            );
        } else {
            let _ = done.send(true);
        }
        let refused = self.offer(&event);
        if refused > 0 {
            acks.settle(&event, refused, true);
        }
        async move {
            // An error: the bus is gone, and with it what it held.
            refused == 0 && handed_on.await == Ok(true)
        }
    }

    /// Offers `event` to every matching sink, subscriber and live watcher; returns how many
    /// sinks did not take it (a full queue).
    fn offer(&self, event: &Arc<Event>) -> usize {
        if self.inner.tapped.load(Ordering::Relaxed) > 0 {
            let _ = self.inner.taps.send(event.clone());
        }
        let mut refused = 0;
        for outlet in &self.inner.outlets {
            if !outlet.filter.matches(&event.type_) {
                continue;
            }
            match outlet.tx.try_send(event.clone()) {
                Ok(()) => outlet.stats.published.fetch_add(1, Ordering::Relaxed),
                Err(_) => {
                    refused += usize::from(outlet.sink);
                    outlet.stats.dropped.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        refused
    }

    /// Whether any sink, subscriber or live watcher is attached (so emitters can skip
    /// building events).
    pub fn is_active(&self) -> bool {
        !self.inner.outlets.is_empty() || self.inner.tapped.load(Ordering::Relaxed) > 0
    }

    /// Watches every event published from now on, while the [`Tap`] lives.
    pub fn tap(&self) -> Tap {
        self.inner.tapped.fetch_add(1, Ordering::Relaxed);
        Tap {
            rx: self.inner.taps.subscribe(),
            inner: self.inner.clone(),
        }
    }

    /// Each sink's name and counters, in the order they were added.
    pub fn stats(&self) -> Vec<(Arc<str>, SinkCounts)> {
        self.inner
            .outlets
            .iter()
            .map(|o| (o.name.clone(), o.stats.snapshot()))
            .collect()
    }

    /// One sink's counters.
    pub fn sink_stats(&self, name: &str) -> Option<SinkCounts> {
        self.inner
            .outlets
            .iter()
            .find(|o| &*o.name == name)
            .map(|o| o.stats.snapshot())
    }

    /// A receiver that turns `true` when the bus shuts down (for tasks that feed it).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Stops every sink: each hands on what is queued, then closes. Waits up to `grace`,
    /// then aborts what is left; returns whether everything finished in time. Events
    /// published afterwards are dropped (and counted).
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        let mut clean = true;
        loop {
            // Tasks may spawn tasks while stopping: take until none are left.
            let handles = std::mem::take(&mut *self.inner.tasks.lock());
            if handles.is_empty() {
                return clean;
            }
            for mut handle in handles {
                if tokio::time::timeout_at(deadline, &mut handle)
                    .await
                    .is_err()
                {
                    handle.abort();
                    clean = false;
                }
            }
        }
    }
}

/// A sink added to a builder, waiting for its task.
struct PendingSink {
    sink: Box<dyn Sink>,
    rx: mpsc::Receiver<Arc<Event>>,
    name: Arc<str>,
    stats: Arc<SinkStats>,
}

/// Builds a [`Bus`]: add sinks and subscribers, then [`build`](BusBuilder::build) inside a
/// tokio runtime.
#[derive(Default)]
pub struct BusBuilder {
    outlets: Vec<Outlet>,
    sinks: Vec<PendingSink>,
}

impl BusBuilder {
    /// Adds a sink with a queue of `queue` events (at least 1) for the types `filter` takes.
    pub fn sink(
        &mut self,
        name: impl Into<String>,
        queue: usize,
        filter: TypeFilter,
        sink: Box<dyn Sink>,
    ) -> &mut Self {
        let (name, stats, rx) = self.outlet(name.into(), queue, filter, true);
        self.sinks.push(PendingSink {
            sink,
            rx,
            name,
            stats,
        });
        self
    }

    /// Adds an in-process subscriber: the returned receiver gets the events `filter` takes,
    /// through a queue of `queue`; when it is full (the consumer is behind), events are
    /// dropped for it and counted under `name`.
    pub fn subscribe(
        &mut self,
        name: impl Into<String>,
        queue: usize,
        filter: TypeFilter,
    ) -> mpsc::Receiver<Arc<Event>> {
        self.outlet(name.into(), queue, filter, false).2
    }

    fn outlet(
        &mut self,
        name: String,
        queue: usize,
        filter: TypeFilter,
        sink: bool,
    ) -> (Arc<str>, Arc<SinkStats>, mpsc::Receiver<Arc<Event>>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let name: Arc<str> = Arc::from(name);
        let stats = Arc::new(SinkStats::default());
        self.outlets.push(Outlet {
            name: name.clone(),
            filter,
            tx,
            stats: stats.clone(),
            sink,
        });
        (name, stats, rx)
    }

    /// Starts every sink's task and returns the bus. With sinks, this must run inside a
    /// tokio runtime.
    pub fn build(self) -> Bus {
        let (shutdown, _) = watch::channel(false);
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let acks = Arc::new(Acks::default());
        for PendingSink {
            mut sink,
            rx,
            name,
            stats,
        } in self.sinks
        {
            let ctx = SinkContext {
                name,
                stats,
                shutdown: shutdown.subscribe(),
                tasks: tasks.clone(),
            };
            sink.start(&ctx);
            let task = tokio::spawn(run(sink, rx, ctx, acks.clone()));
            tasks.lock().push(task);
        }
        Bus {
            inner: Arc::new(Inner {
                outlets: self.outlets,
                acks,
                shutdown,
                tasks,
                taps: tokio::sync::broadcast::channel(TAP_QUEUE).0,
                tapped: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }
}

/// Returns when `shutdown` turns `true` or its sender is gone (the bus was dropped).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// One sink's task: batches off the queue into the sink until shutdown (or every handle to
/// the bus is gone), then what is left, then `close`.
async fn run(
    mut sink: Box<dyn Sink>,
    mut rx: mpsc::Receiver<Arc<Event>>,
    ctx: SinkContext,
    acks: Arc<Acks>,
) {
    let mut shutdown = ctx.shutdown_signal();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    break;
                }
                let lost = sink.send(&batch, &ctx).await;
                acks.handed_on(&batch, &lost);
                batch.clear();
            }
            _ = crate::bus::stopped(&mut shutdown) => break,
        }
    }
    rx.close();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let lost = sink.send(&batch, &ctx).await;
        acks.handed_on(&batch, &lost);
        batch.clear();
    }
    sink.close(&ctx).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{SERVER_DOWN, SERVER_UP};
    use serde_json::Value;

    fn ev(type_: &str) -> Event {
        Event::new("test", type_, Value::Null)
    }

    /// `publish_handed_on` resolves only once every sink that took the event has handed it
    /// on; not for a sink whose type filter skips it, nor for a subscriber.
    #[tokio::test]
    async fn a_publisher_can_wait_until_the_sinks_have_handed_an_event_on() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let mut b = Bus::builder();
        b.sink(
            "gated",
            8,
            TypeFilter::any(),
            Box::new(Gated(gate.clone(), sent.clone())),
        );
        b.sink(
            "other-types",
            8,
            TypeFilter::new(&["other.*"]).unwrap(),
            Box::new(Gated(
                Arc::new(tokio::sync::Semaphore::new(0)),
                sent.clone(),
            )),
        );
        let _rx = b.subscribe("nobody-reads", 8, TypeFilter::any());
        let bus = b.build();
        let done = bus.publish_handed_on(ev(SERVER_DOWN));
        tokio::pin!(done);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut done)
                .await
                .is_err(),
            "resolved before the sink handed the event on"
        );
        gate.add_permits(1);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), &mut done)
                .await
                .expect("resolved once handed on"),
            "handed on"
        );
        assert_eq!(sent.lock().len(), 1);
        // No sink takes this type: resolved at once.
        let mut b = Bus::builder();
        b.sink(
            "other-types",
            8,
            TypeFilter::new(&["other.*"]).unwrap(),
            Box::new(Gated(
                Arc::new(tokio::sync::Semaphore::new(0)),
                sent.clone(),
            )),
        );
        let bus = b.build();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), bus.publish_handed_on(ev(SERVER_UP)))
                .await
                .expect("nothing to wait for")
        );
        // A sink whose queue is full did not take the event: `false`, at once.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let mut b = Bus::builder();
        b.sink(
            "one-place",
            1,
            TypeFilter::any(),
            Box::new(Gated(gate.clone(), sent.clone())),
        );
        let bus = b.build();
        let first = bus.publish_handed_on(ev(SERVER_UP));
        // The sink task takes the first off its queue and waits at the gate; the second
        // fills the queue; the third finds it full.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _second = bus.publish_handed_on(ev(SERVER_UP));
        let third =
            tokio::time::timeout(Duration::from_secs(1), bus.publish_handed_on(ev(SERVER_UP)))
                .await
                .expect("at once");
        assert!(!third, "a full queue's event counted as handed on");
        gate.add_permits(2);
        assert!(first.await);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_for_that_sink_only() {
        let mut b = Bus::builder();
        let mut slow = b.subscribe("slow", 2, TypeFilter::any());
        let mut roomy = b.subscribe("roomy", 100, TypeFilter::any());
        let bus = b.build();
        for _ in 0..10 {
            bus.publish(ev(SERVER_DOWN));
        }
        let counts = |n| bus.sink_stats(n).unwrap();
        assert_eq!((counts("slow").published, counts("slow").dropped), (2, 8));
        assert_eq!(
            (counts("roomy").published, counts("roomy").dropped),
            (10, 0)
        );
        assert!(slow.recv().await.is_some() && roomy.recv().await.is_some());
    }

    #[tokio::test]
    async fn filters_pick_types_by_glob() {
        let mut b = Bus::builder();
        let mut ups = b.subscribe("ups", 10, TypeFilter::new(&["*.server.up"]).unwrap());
        let bus = b.build();
        bus.publish(ev(SERVER_DOWN));
        bus.publish(ev(SERVER_UP));
        assert_eq!(ups.recv().await.unwrap().type_, SERVER_UP);
        assert!(ups.try_recv().is_err());
        assert!(TypeFilter::new(&["[bad"]).unwrap_err().contains("[bad"));
        assert!(TypeFilter::any().matches("anything"));
    }

    /// A sink that gives up on the events whose subject is `lose`.
    struct Losing;

    impl Sink for Losing {
        fn send<'a>(
            &'a mut self,
            events: &'a [Arc<Event>],
            _ctx: &'a SinkContext,
        ) -> BoxFuture<'a, Vec<usize>> {
            Box::pin(async move {
                (0..events.len())
                    .filter(|i| events[*i].subject.as_deref() == Some("lose"))
                    .collect()
            })
        }
    }

    /// An event a sink gave up on (a JetStream publish never acknowledged, an outbox that
    /// could not be written) was not handed on: its publisher is told so.
    #[tokio::test]
    async fn a_publisher_is_told_when_a_sink_gave_up_on_its_event() {
        let mut b = Bus::builder();
        b.sink("losing", 8, TypeFilter::any(), Box::new(Losing));
        b.sink(
            "fine",
            8,
            TypeFilter::any(),
            Box::new(Gated(
                Arc::new(tokio::sync::Semaphore::new(100)),
                Arc::default(),
            )),
        );
        let bus = b.build();
        let mut lost = ev(SERVER_DOWN);
        lost.subject = Some("lose".into());
        let wait = |e| tokio::time::timeout(Duration::from_secs(2), bus.publish_handed_on(e));
        assert!(!wait(lost).await.unwrap());
        assert!(wait(ev(SERVER_DOWN)).await.unwrap());
    }

    /// A sink that waits on a gate for each batch: the queue behind it fills.
    struct Gated(Arc<tokio::sync::Semaphore>, Arc<Mutex<Vec<String>>>);

    impl Sink for Gated {
        fn send<'a>(
            &'a mut self,
            events: &'a [Arc<Event>],
            ctx: &'a SinkContext,
        ) -> BoxFuture<'a, Vec<usize>> {
            Box::pin(async move {
                self.0.acquire().await.unwrap().forget();
                self.1.lock().extend(events.iter().map(|e| e.id.clone()));
                SinkStats::add(&ctx.stats.delivered, events.len());
                Vec::new()
            })
        }
    }

    #[tokio::test]
    async fn a_stuck_sink_never_blocks_publish_and_shutdown_drains_the_queue() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut b = Bus::builder();
        b.sink(
            "gated",
            4,
            TypeFilter::any(),
            Box::new(Gated(gate.clone(), seen.clone())),
        );
        let bus = b.build();
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            bus.publish(ev(SERVER_DOWN));
        }
        assert!(start.elapsed() < Duration::from_millis(500));
        let c = bus.sink_stats("gated").unwrap();
        assert_eq!(c.published + c.dropped, 1000);
        assert!(c.published <= 5, "{c:?}");
        gate.add_permits(1000);
        assert!(bus.shutdown(Duration::from_secs(5)).await);
        let c = bus.sink_stats("gated").unwrap();
        assert_eq!(c.delivered, c.published);
        assert_eq!(seen.lock().len() as u64, c.published);
        // After shutdown, publishing still returns at once; the event is counted as dropped.
        bus.publish(ev(SERVER_DOWN));
        assert_eq!(bus.sink_stats("gated").unwrap().dropped, c.dropped + 1);
    }

    #[test]
    fn a_bus_without_sinks_needs_no_runtime() {
        let bus = Bus::default();
        assert!(!bus.is_active());
        bus.publish(ev(SERVER_DOWN));
    }
}
