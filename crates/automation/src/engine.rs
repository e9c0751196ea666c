//! The trigger engine: events in, [`Firing`]s out. Pure and single-threaded: the caller owns
//! it (behind a mutex, or on one task), passes `now` to every call, and runs what comes out.
//!
//! # Semantics
//!
//! * **Time.** An event counts at its own `time`, or at `now` if that is earlier (a clock
//!   ahead of ours). Events older than [`EngineOptions::max_event_age`] are ignored, so a
//!   replay after a restart does not act on stale news. Cooldowns, inhibition and rate caps
//!   run on `now`.
//! * **Duplicates.** An event whose `(source, id)` the engine saw among the last
//!   [`EngineOptions::recent_event_ids`] is ignored: delivery is at least once.
//! * **Groups.** `for_each` names the field whose value is the group; without it every event
//!   is in group `""`. An event that lacks the field (or whose value is over
//!   [`MAX_GROUP_LEN`] bytes) is not counted. Each trigger keeps at most
//!   [`EngineOptions::max_groups_per_trigger`] groups and evicts the least recently used one,
//!   with its window, cooldown and pending wait (counted in `evicted_groups`).
//! * **Reactive.** Per group, the engine keeps the times of the last `threshold` matching
//!   events that lie within `within` of the newest; when it holds `threshold` of them, the
//!   trigger fires and the window empties. `window_start` is the oldest counted event's time.
//! * **Proactive.** The first matching event in a group starts a wait of `within`; an `expect`
//!   event for the same group whose time is within the wait ends it quietly; otherwise
//!   [`Engine::tick`] fires the trigger once the wait is over. Further matching events during
//!   a wait do not extend it. `window_start` is the time of the event that started the wait,
//!   and the actions are rendered from that event.
//! * **Cooldown.** A group that fired less than `cooldown` ago does not fire; its window keeps
//!   counting, so the trigger fires on the first matching event after the cooldown if the
//!   condition still holds.
//! * **Inhibition.** When trigger A fires for group G, each trigger in A's `inhibit` list is
//!   muted for G for A's `cooldown` ([`DEFAULT_INHIBIT`] if A has none). Triggers are
//!   evaluated inhibitors first (the config may not have inhibit cycles), so a muting trigger
//!   that fires on the same event mutes the other before it is considered. A dry-run firing
//!   mutes only dry-run triggers: a trigger that changes nothing cannot stop one that does.
//! * **Loops.** An event with `causedby` (or `hops` > 0) is ignored unless the trigger sets
//!   `automation_events.allow`. A firing's hop is the event's [hops](EventView::automation_hops)
//!   plus 1, and a firing above the trigger's `max_hops` does not happen. Whatever the
//!   firing's actions cause must carry `causedby` = [`Firing::cause_event_id`] and
//!   `hops` = [`Firing::hop`].
//! * **Rate caps.** A firing whose actions would take the trigger over its
//!   `max_actions_per_minute`, or all enforcing triggers together over
//!   [`EngineOptions::max_actions_per_minute`], in the last 60 seconds, does not happen
//!   (all of its actions or none). Dry-run firings count only against their own trigger's cap.
//! * **Exactly once.** [`Firing::idempotency_key`] is `trigger|group|origin`, where `origin`
//!   names the event that opened the window (reactive: the oldest counted; proactive: the one
//!   that started the wait) by a digest of its `(source, id)`, never by its time: an event
//!   without `time` is stamped when it is received, so a redelivery would get a new time. The
//!   caller claims the key in a [`FiringStore`](crate::FiringStore) before running the
//!   actions; the same events seen again after a restart, or by a replica reading the same
//!   event stream, give the same key.

use crate::config::{Action, Posture, TriggerCfg};
use crate::event::EventView;
use crate::guard::MaxUnavailable;
use crate::template::Scope;
use crate::time::Timestamp;
use crate::validate::{compile, Compiled};
use crate::Error;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

/// How long a firing mutes the triggers it inhibits when it has no `cooldown`.
pub const DEFAULT_INHIBIT: Duration = Duration::from_secs(300);
/// The longest group value counted; longer ones are ignored (`no_group`).
pub const MAX_GROUP_LEN: usize = 512;
const MINUTE: Duration = Duration::from_secs(60);

/// Limits that are not per trigger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Groups kept per trigger before the least recently used is evicted. Default 10 000.
    pub max_groups_per_trigger: usize,
    /// Actions per rolling minute across all enforcing triggers. Default 120.
    pub max_actions_per_minute: u32,
    /// Events older than this (by their `time`, against `now`) are ignored. Default 10 min.
    pub max_event_age: Duration,
    /// How many recent `(source, id)` pairs are remembered to drop duplicates. Default 4096.
    pub recent_event_ids: usize,
    /// `max_unavailable` for triggers that do not set it. Default 50%.
    pub max_unavailable: MaxUnavailable,
}

impl Default for EngineOptions {
    fn default() -> EngineOptions {
        EngineOptions {
            max_groups_per_trigger: 10_000,
            max_actions_per_minute: 120,
            max_event_age: Duration::from_secs(600),
            recent_event_ids: 4096,
            max_unavailable: MaxUnavailable::default(),
        }
    }
}

/// A decision to act: what the caller claims (by `idempotency_key`), audits and runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Firing {
    /// The trigger's name.
    pub trigger: String,
    /// Who acts: `Portcullis::Trigger::"<trigger>"`, the Cedar principal.
    pub principal: String,
    /// The group (the `for_each` value; `""` without one).
    pub group: String,
    /// The start of the window that fired (see the module docs).
    pub window_start: Timestamp,
    /// When the engine decided (`now`).
    pub at: Timestamp,
    /// `trigger|group|origin` (see the module docs): claim it before acting.
    pub idempotency_key: String,
    /// The event that made the trigger fire (proactive: the one that started the wait).
    pub cause_event_id: String,
    /// The actions, templates resolved, in order. Empty if `error` is set.
    pub actions: Vec<Action>,
    /// Why the actions could not be rendered (a placeholder the event lacks), naming the
    /// action and field. The firing still counts (cooldown, inhibition); audit it as failed.
    pub error: Option<String>,
    /// `false`: dry run. Record `would_act`; change nothing.
    pub enforce: bool,
    /// 1 for a firing on an event nobody automated, one more per automation in between.
    pub hop: u32,
    /// The limit for `set_server_state` to `drain` or `maint` ([`crate::guard::may_take_out`]).
    pub max_unavailable: MaxUnavailable,
}

impl Firing {
    /// The Cedar principal of the trigger `name`.
    pub fn principal_of(name: &str) -> String {
        format!("Portcullis::Trigger::\"{name}\"")
    }
}

/// Counters for one trigger, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TriggerStats {
    /// Events that matched `match` (before loop protection and grouping).
    pub matched: u64,
    pub fired: u64,
    /// Firings dropped because the group was cooling down.
    pub cooldown: u64,
    /// Firings dropped because another trigger muted the group.
    pub inhibited: u64,
    /// Firings dropped by this trigger's `max_actions_per_minute`.
    pub rate_limited: u64,
    /// Firings dropped by the engine's global cap.
    pub global_rate_limited: u64,
    /// Matching events ignored because automation caused them.
    pub automation_ignored: u64,
    /// Matching events ignored because the firing would exceed `max_hops`.
    pub hop_limited: u64,
    /// Matching events without the `for_each` field (or with one too long).
    pub no_group: u64,
    /// Groups evicted to stay within `max_groups_per_trigger`.
    pub evicted_groups: u64,
    /// Firings whose actions could not be rendered.
    pub template_errors: u64,
    /// Proactive waits ended by their `expect` event.
    pub expected_arrived: u64,
}

/// Counters for the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub events: u64,
    pub duplicates: u64,
    pub stale: u64,
    /// Per trigger, in config order.
    pub triggers: Vec<(String, TriggerStats)>,
}

#[derive(Clone, Debug)]
struct Pending {
    start: Timestamp,
    /// [`origin`] of the event that started the wait.
    origin: String,
    deadline: Timestamp,
    cause: String,
    hop: u32,
    actions: Result<Vec<Action>, String>,
}

#[derive(Clone, Debug, Default)]
struct GroupState {
    touch: u64,
    /// The counted events' times, oldest first, with their [`origin`]s.
    window: VecDeque<(Timestamp, String)>,
    pending: Option<Pending>,
    last_fired: Option<Timestamp>,
    muted_until: Option<Timestamp>,
}

#[derive(Clone, Debug, Default)]
struct TriggerState {
    groups: HashMap<String, GroupState>,
    lru: BTreeMap<u64, String>,
    deadlines: BTreeSet<(Timestamp, String)>,
    rate: VecDeque<(Timestamp, u32)>,
    stats: TriggerStats,
}

impl TriggerState {
    /// The group's state, created (evicting the least recently used group) if absent.
    fn group(&mut self, key: &str, seq: &mut u64, cap: usize) -> &mut GroupState {
        *seq += 1;
        let touch = *seq;
        if !self.groups.contains_key(key) {
            while self.groups.len() >= cap.max(1) {
                let Some((_, old)) = self.lru.pop_first() else {
                    break;
                };
                if let Some(g) = self.groups.remove(&old) {
                    if let Some(p) = g.pending {
                        self.deadlines.remove(&(p.deadline, old));
                    }
                }
                self.stats.evicted_groups += 1;
            }
            self.groups.insert(key.to_string(), GroupState::default());
        }
        let g = self.groups.entry(key.to_string()).or_default();
        self.lru.remove(&g.touch);
        g.touch = touch;
        self.lru.insert(touch, key.to_string());
        g
    }
}

/// Actions in the last minute, summed, after dropping older entries.
fn recent_actions(rate: &mut VecDeque<(Timestamp, u32)>, now: Timestamp) -> u64 {
    let since = now.minus(MINUTE);
    while rate.front().is_some_and(|(t, _)| *t <= since) {
        rate.pop_front();
    }
    rate.iter().map(|(_, n)| u64::from(*n)).sum()
}

/// Runs triggers over events. See the module docs for the semantics.
#[derive(Debug)]
pub struct Engine {
    triggers: Vec<Compiled>,
    states: Vec<TriggerState>,
    /// Evaluation order: each trigger before the ones it inhibits.
    order: Vec<usize>,
    opts: EngineOptions,
    seq: u64,
    global_rate: VecDeque<(Timestamp, u32)>,
    recent: HashSet<(String, String)>,
    recent_order: VecDeque<(String, String)>,
    events: u64,
    duplicates: u64,
    stale: u64,
}

impl Engine {
    /// An engine for `cfgs` with the default [`EngineOptions`]; fails with every problem
    /// [`crate::validate`] finds.
    pub fn new(cfgs: Vec<TriggerCfg>) -> Result<Engine, Error> {
        Engine::with_options(cfgs, EngineOptions::default())
    }

    pub fn with_options(cfgs: Vec<TriggerCfg>, opts: EngineOptions) -> Result<Engine, Error> {
        let (triggers, order) = compile(&cfgs).map_err(Error::Invalid)?;
        let states = vec![TriggerState::default(); triggers.len()];
        Ok(Engine {
            triggers,
            states,
            order,
            opts,
            seq: 0,
            global_rate: VecDeque::new(),
            recent: HashSet::new(),
            recent_order: VecDeque::new(),
            events: 0,
            duplicates: 0,
            stale: 0,
        })
    }

    /// Swaps in a new config (a reload), keeping what the engine knows: a trigger with the
    /// same name and the same config keeps all its state; one whose config changed keeps its
    /// cooldowns and mutes but starts its windows and waits afresh. On error nothing changes.
    pub fn replace_config(&mut self, cfgs: Vec<TriggerCfg>) -> Result<(), Error> {
        let (triggers, order) = compile(&cfgs).map_err(Error::Invalid)?;
        let mut old: HashMap<String, (TriggerCfg, TriggerState)> = self
            .triggers
            .drain(..)
            .zip(self.states.drain(..))
            .map(|(c, s)| (c.cfg.name.clone(), (c.cfg, s)))
            .collect();
        self.states = triggers
            .iter()
            .map(|c| match old.remove(&c.cfg.name) {
                Some((cfg, s)) if cfg == c.cfg => s,
                Some((_, mut s)) => {
                    for g in s.groups.values_mut() {
                        g.window.clear();
                        g.pending = None;
                    }
                    s.deadlines.clear();
                    s
                }
                None => TriggerState::default(),
            })
            .collect();
        self.triggers = triggers;
        self.order = order;
        Ok(())
    }

    /// The trigger configs, in config order.
    pub fn configs(&self) -> impl Iterator<Item = &TriggerCfg> {
        self.triggers.iter().map(|c| &c.cfg)
    }

    /// Feeds one event; returns the firings it causes, inhibitors first.
    pub fn on_event(&mut self, ev: &EventView<'_>, now: Timestamp) -> Vec<Firing> {
        self.events += 1;
        let id = (ev.source.to_string(), ev.id.to_string());
        if self.recent.contains(&id) {
            self.duplicates += 1;
            return Vec::new();
        }
        if self.opts.recent_event_ids > 0 {
            while self.recent_order.len() >= self.opts.recent_event_ids {
                if let Some(old) = self.recent_order.pop_front() {
                    self.recent.remove(&old);
                }
            }
            self.recent.insert(id.clone());
            self.recent_order.push_back(id);
        }
        if now.since(ev.time) > self.opts.max_event_age {
            self.stale += 1;
            return Vec::new();
        }
        let at = ev.time.min(now);
        let hops = ev.automation_hops();
        let mut out = Vec::new();
        for oi in 0..self.order.len() {
            let i = self.order[oi];
            self.expect_arrived(i, ev, at);
            if !self.triggers[i].matcher.matches(ev) {
                continue;
            }
            let c = &self.triggers[i];
            let st = &mut self.states[i].stats;
            st.matched += 1;
            if hops > 0 && !c.cfg.automation_events.allow {
                st.automation_ignored += 1;
                continue;
            }
            let hop = hops.saturating_add(1);
            if hop > c.cfg.automation_events.hop_limit() {
                st.hop_limited += 1;
                continue;
            }
            let group = match group_of(c, ev) {
                Some(g) => g,
                None => {
                    st.no_group += 1;
                    continue;
                }
            };
            let posture = c.cfg.posture;
            match posture {
                Posture::Reactive => {
                    if let Some(f) = self.count(i, &group, ev, at, now, hop) {
                        out.push(f);
                    }
                }
                Posture::Proactive => self.arm(i, &group, ev, at, hop),
            }
        }
        out
    }

    /// Fires the proactive triggers whose wait ended at or before `now` without the expected
    /// event. Call it on a timer, ideally at [`Engine::next_deadline`].
    pub fn tick(&mut self, now: Timestamp) -> Vec<Firing> {
        let mut out = Vec::new();
        for oi in 0..self.order.len() {
            let i = self.order[oi];
            loop {
                let due = match self.states[i].deadlines.first() {
                    Some((d, _)) if *d <= now => self.states[i].deadlines.pop_first(),
                    _ => None,
                };
                let Some((_, group)) = due else { break };
                let Some(p) = self.states[i]
                    .groups
                    .get_mut(&group)
                    .and_then(|g| g.pending.take())
                else {
                    continue;
                };
                if self.gate(i, &group, now) {
                    let opened = (p.start, p.origin);
                    out.push(self.commit(i, &group, now, opened, p.cause, p.hop, p.actions));
                }
            }
        }
        out
    }

    /// When the next proactive wait ends, if any is running.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.states
            .iter()
            .filter_map(|s| s.deadlines.first().map(|(d, _)| *d))
            .min()
    }

    /// Counters, for metrics.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            events: self.events,
            duplicates: self.duplicates,
            stale: self.stale,
            triggers: self
                .triggers
                .iter()
                .zip(&self.states)
                .map(|(c, s)| (c.cfg.name.clone(), s.stats))
                .collect(),
        }
    }

    /// One trigger's counters.
    pub fn trigger_stats(&self, name: &str) -> Option<TriggerStats> {
        self.triggers
            .iter()
            .position(|c| c.cfg.name == name)
            .map(|i| self.states[i].stats)
    }

    /// How many groups a trigger holds now.
    pub fn groups(&self, name: &str) -> Option<usize> {
        self.triggers
            .iter()
            .position(|c| c.cfg.name == name)
            .map(|i| self.states[i].groups.len())
    }

    /// Ends a proactive wait if `ev` is the expected event for its group, in time.
    fn expect_arrived(&mut self, i: usize, ev: &EventView<'_>, at: Timestamp) {
        let c = &self.triggers[i];
        let Some(expect) = &c.expect else { return };
        if !expect.matches(ev) {
            return;
        }
        let Some(group) = group_of(c, ev) else { return };
        let st = &mut self.states[i];
        let Some(g) = st.groups.get_mut(&group) else {
            return;
        };
        if let Some(p) = &g.pending {
            if at >= p.start && at <= p.deadline {
                st.deadlines.remove(&(p.deadline, group));
                g.pending = None;
                st.stats.expected_arrived += 1;
            }
        }
    }

    /// Counts a matching event for a reactive trigger; fires if the threshold is reached.
    fn count(
        &mut self,
        i: usize,
        group: &str,
        ev: &EventView<'_>,
        at: Timestamp,
        now: Timestamp,
        hop: u32,
    ) -> Option<Firing> {
        let c = &self.triggers[i];
        let threshold = c.cfg.threshold.max(1) as usize;
        let within = c.within;
        let g = self.states[i].group(group, &mut self.seq, self.opts.max_groups_per_trigger);
        let pos = g.window.partition_point(|(t, _)| *t <= at);
        g.window.insert(pos, (at, origin(ev)));
        if let (Some(w), Some((newest, _))) = (within, g.window.back()) {
            let oldest_ok = newest.minus(w);
            while g.window.front().is_some_and(|(t, _)| *t < oldest_ok) {
                g.window.pop_front();
            }
        }
        while g.window.len() > threshold {
            g.window.pop_front();
        }
        if g.window.len() < threshold {
            return None;
        }
        let (start, first) = g.window.front().cloned()?;
        if !self.gate(i, group, now) {
            return None;
        }
        if let Some(g) = self.states[i].groups.get_mut(group) {
            g.window.clear();
        }
        let actions = self.render(i, group, ev);
        let cause = (start, first);
        Some(self.commit(i, group, now, cause, ev.id.to_string(), hop, actions))
    }

    /// Starts a proactive wait for the group, unless one is running.
    fn arm(&mut self, i: usize, group: &str, ev: &EventView<'_>, at: Timestamp, hop: u32) {
        let within = self.triggers[i].within.unwrap_or(Duration::ZERO);
        let running = self.states[i]
            .groups
            .get(group)
            .is_some_and(|g| g.pending.is_some());
        if running {
            self.states[i].group(group, &mut self.seq, self.opts.max_groups_per_trigger);
            return;
        }
        let actions = self.render(i, group, ev);
        let deadline = at.plus(within);
        let st = &mut self.states[i];
        let g = st.group(group, &mut self.seq, self.opts.max_groups_per_trigger);
        g.pending = Some(Pending {
            start: at,
            origin: origin(ev),
            deadline,
            cause: ev.id.to_string(),
            hop,
            actions,
        });
        st.deadlines.insert((deadline, group.to_string()));
    }

    fn render(&self, i: usize, group: &str, ev: &EventView<'_>) -> Result<Vec<Action>, String> {
        let c = &self.triggers[i];
        let scope = Scope {
            event: ev,
            group,
            trigger: &c.cfg.name,
        };
        c.cfg
            .actions
            .iter()
            .enumerate()
            .map(|(j, a)| a.render(&scope).map_err(|e| format!("actions[{j}].{e}")))
            .collect()
    }

    /// Whether trigger `i` may fire for `group` now; counts the reason if not.
    fn gate(&mut self, i: usize, group: &str, now: Timestamp) -> bool {
        let c = &self.triggers[i];
        let n = c.cfg.actions.len() as u64;
        let st = &mut self.states[i];
        let (muted, cooling) = match st.groups.get(group) {
            Some(g) => (
                g.muted_until.is_some_and(|u| now < u),
                match (g.last_fired, c.cooldown) {
                    (Some(last), Some(cd)) => now < last.plus(cd),
                    _ => false,
                },
            ),
            None => (false, false),
        };
        if muted {
            st.stats.inhibited += 1;
            return false;
        }
        if cooling {
            st.stats.cooldown += 1;
            return false;
        }
        if let Some(cap) = c.cfg.max_actions_per_minute {
            if recent_actions(&mut st.rate, now) + n > u64::from(cap) {
                st.stats.rate_limited += 1;
                return false;
            }
        }
        if c.cfg.enforce
            && recent_actions(&mut self.global_rate, now) + n
                > u64::from(self.opts.max_actions_per_minute)
        {
            st.stats.global_rate_limited += 1;
            return false;
        }
        true
    }

    /// Records that trigger `i` fired for `group` and builds the firing.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        i: usize,
        group: &str,
        now: Timestamp,
        (window_start, origin): (Timestamp, String),
        cause: String,
        hop: u32,
        actions: Result<Vec<Action>, String>,
    ) -> Firing {
        let cap = self.opts.max_groups_per_trigger;
        let c = &self.triggers[i];
        let enforce = c.cfg.enforce;
        let n = u32::try_from(c.cfg.actions.len()).unwrap_or(u32::MAX);
        let mute_until = now.plus(c.cooldown.unwrap_or(DEFAULT_INHIBIT));
        let st = &mut self.states[i];
        st.group(group, &mut self.seq, cap).last_fired = Some(now);
        st.stats.fired += 1;
        if c.cfg.max_actions_per_minute.is_some() {
            st.rate.push_back((now, n));
        }
        if enforce {
            self.global_rate.push_back((now, n));
        }
        let (actions, error) = match actions {
            Ok(a) => (a, None),
            Err(e) => {
                st.stats.template_errors += 1;
                (Vec::new(), Some(e))
            }
        };
        for &k in &c.inhibits {
            if enforce || !self.triggers[k].cfg.enforce {
                let g = self.states[k].group(group, &mut self.seq, cap);
                g.muted_until = Some(g.muted_until.map_or(mute_until, |u| u.max(mute_until)));
            }
        }
        let name = &c.cfg.name;
        Firing {
            trigger: name.clone(),
            principal: Firing::principal_of(name),
            group: group.to_string(),
            window_start,
            at: now,
            idempotency_key: format!("{name}|{group}|{origin}"),
            cause_event_id: cause,
            actions,
            error,
            enforce,
            hop,
            max_unavailable: c.cfg.max_unavailable.unwrap_or(self.opts.max_unavailable),
        }
    }
}

/// What names an event in an idempotency key: the first 16 bytes of the SHA-256 of its
/// `source` and `id` (unique together, by CloudEvents), in hex.
fn origin(ev: &EventView<'_>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(ev.source.as_bytes());
    h.update([0]);
    h.update(ev.id.as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The event's group for trigger `c`: the `for_each` value, or `""` without one.
fn group_of(c: &Compiled, ev: &EventView<'_>) -> Option<String> {
    match &c.group_by {
        None => Some(String::new()),
        Some(f) => f
            .text(ev)
            .filter(|g| g.len() <= MAX_GROUP_LEN)
            .map(|g| g.into_owned()),
    }
}
