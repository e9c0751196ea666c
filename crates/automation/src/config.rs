//! The trigger config: what users write under `triggers:`, as serde types. Unknown keys are
//! errors (`deny_unknown_fields`). For messages that name the exact path and say the fix (an
//! unknown key, an unknown action, a missing field), parse with [`crate::parse_triggers`]
//! instead of deserializing these types directly; the `validate` module checks the meaning.
//!
//! ```yaml
//! triggers:
//!   - name: drain-flapping                     # unique; letters, digits, `-`, `_`, `.`
//!     match:                                   # what counts: patterns with `*` and a leading `!`
//!       type: dev.portcullis.server.down
//!       subject: "billing/*"
//!       data: { reason: "!maintenance" }       # keys: dotted or `$.` paths inside `data`
//!     threshold: 3                             # N matching events ... (default 1)
//!     within: 1m                               # ... within this sliding window, per group
//!     for_each: subject                        # group by `subject`, `type`, `source` or `data.<field>`
//!     posture: reactive                        # or proactive: fire when `expect` does NOT follow within `within`
//!     cooldown: 10m                            # at most one firing per group per interval
//!     inhibit: [page-oncall]                   # while cooling down, mute these triggers for the same group
//!     automation_events: { allow: false }      # default: ignore events automation caused; or { allow: true, max_hops: 2 }
//!     enforce: true                            # false: dry run, the firing is recorded as `would_act`
//!     max_actions_per_minute: 10               # per-trigger cap (a global cap also applies)
//!     max_unavailable: 50%                     # or a count: servers a backend may have out (default 50%)
//!     actions:
//!       - set_server_state: { backend: "billing/billing-v2", server: "{data.server}", state: drain }
//!       - emit: { type: dev.example.drained, subject: "{subject}", data: { server: "{data.server}" } }
//! ```

use crate::guard::MaxUnavailable;
pub use crate::guard::ServerState;
use crate::template::{render_str, render_value, Scope};
use crate::time::Dur;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// One trigger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerCfg {
    /// Unique among triggers; the automation's principal is `Portcullis::Trigger::"<name>"`.
    pub name: String,
    /// Which events count.
    #[serde(rename = "match")]
    pub match_: MatchCfg,
    /// How many matching events (per group, within `within`) make a firing. Default 1.
    #[serde(default = "one")]
    pub threshold: u32,
    /// The sliding window for `threshold`, or (proactive) how long to wait for `expect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Dur>,
    /// The event field whose value forms the group (`subject`, `data.server`). Without it, all
    /// events form one group, the empty string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    #[serde(default)]
    pub posture: Posture,
    /// Proactive only: the event that must follow a matching one, for the same group, within
    /// `within`; if it does not, the trigger fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<MatchCfg>,
    /// At most one firing per group per interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<Dur>,
    /// Triggers that a firing of this one mutes for the same group, for this trigger's
    /// `cooldown` (or the engine's `DEFAULT_INHIBIT` without one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inhibit: Vec<String>,
    #[serde(default)]
    pub automation_events: AutomationEvents,
    /// `false`: dry run. Firings are produced with `enforce: false`; the caller records
    /// `would_act` and changes nothing.
    #[serde(default = "yes")]
    pub enforce: bool,
    /// At most this many actions per rolling minute for this trigger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_actions_per_minute: Option<u32>,
    /// How many of a backend's servers may be out (not ready, or unhealthy) after a
    /// `set_server_state` to `drain` or `maint`. Default: the engine's, 50%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<MaxUnavailable>,
    /// What a firing does, in order.
    pub actions: Vec<Action>,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

/// Which events a trigger counts (or, in `expect`, waits for). Every given part must match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchCfg {
    /// The event type pattern, like `dev.portcullis.server.down` or `dev.portcullis.server.*`.
    #[serde(rename = "type")]
    pub type_: PatternText,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<PatternText>,
    /// Patterns for values inside `data`, keyed by their path (`server`, `$.target.host`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, PatternText>,
}

impl MatchCfg {
    /// A match on the event type alone.
    pub fn type_(pattern: &str) -> MatchCfg {
        MatchCfg {
            type_: PatternText(pattern.to_string()),
            subject: None,
            data: BTreeMap::new(),
        }
    }
}

/// A pattern as written (see [`crate::pattern`]). YAML scalars like `503` or `true` are taken
/// as their text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatternText(pub String);

impl Serialize for PatternText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PatternText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PatternText, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PatternText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a pattern like `billing/*` or `!maintenance`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PatternText, E> {
                Ok(PatternText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PatternText, E> {
                Ok(PatternText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PatternText, E> {
                Ok(PatternText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PatternText, E> {
                Ok(PatternText(Value::from(v).to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<PatternText, E> {
                Ok(PatternText(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// When a trigger fires.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Posture {
    /// When `threshold` matching events arrive within `within`.
    #[default]
    Reactive,
    /// When a matching event is not followed by an `expect` event within `within`.
    Proactive,
}

/// Whether a trigger reacts to events that automation caused (`causedby` set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutomationEvents {
    /// Default `false`: such events are ignored, so no action can re-trigger itself.
    #[serde(default)]
    pub allow: bool,
    /// With `allow`, the highest [`hop`](crate::Firing::hop) a firing may have: a firing on an
    /// event nobody automated is hop 1, one on an event that hop 1 caused is hop 2, and so on.
    /// Default [`DEFAULT_MAX_HOPS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hops: Option<u32>,
}

/// The default `automation_events.max_hops`: react to events one firing caused, not deeper.
pub const DEFAULT_MAX_HOPS: u32 = 2;
/// The largest `automation_events.max_hops` the config accepts.
pub const MAX_HOPS_LIMIT: u32 = 16;

impl AutomationEvents {
    /// The highest hop a firing of this trigger may have.
    pub fn hop_limit(&self) -> u32 {
        if self.allow {
            self.max_hops.unwrap_or(DEFAULT_MAX_HOPS)
        } else {
            1
        }
    }
}

/// One action. In the config, a mapping with one key, the action's name. String fields are
/// templates (see [`crate::template`]); in a [`Firing`](crate::Firing) they are resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Put a server in `ready`, `drain` or `maint` (checked against `max_unavailable`).
    SetServerState(SetServerState),
    /// Override a server's weight (1..=1000).
    SetServerWeight(SetServerWeight),
    /// Send a route's traffic to another backend.
    SwitchRoute(SwitchRoute),
    /// Send a route's traffic back to its configured backend.
    RestoreRoute(RestoreRoute),
    /// Set a stick-table entry's `gpc0` or add a tag to it.
    SetTable(SetTable),
    /// Forget a stick-table entry.
    ClearTable(ClearTable),
    /// Block a key of a stick table for a duration.
    Block(Block),
    /// Revoke every session of a principal.
    RevokeSessions(RevokeSessions),
    /// Reload the config from disk.
    Reload(Reload),
    /// Emit an event (carrying `causedby` and the firing's hop).
    Emit(Emit),
    /// POST the firing to a URL, with the automation's signed assertion.
    Webhook(Webhook),
    /// Start a workflow execution.
    StartWorkflow(StartWorkflow),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetServerState {
    pub backend: String,
    pub server: String,
    pub state: ServerState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetServerWeight {
    pub backend: String,
    pub server: String,
    pub weight: u32,
}

/// The weights `set_server_weight` may set (the control path's range).
pub const WEIGHTS: std::ops::RangeInclusive<u32> = 1..=1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchRoute {
    pub route: String,
    /// The backend to send the route's traffic to (also written `to`).
    #[serde(alias = "to")]
    pub backend: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRoute {
    pub route: String,
}

/// Exactly one of `gpc0` and `tag`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTable {
    pub table: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpc0: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClearTable {
    pub table: String,
    pub key: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Block {
    pub table: String,
    pub key: String,
    #[serde(rename = "for")]
    pub for_: Dur,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeSessions {
    pub principal: String,
}

/// `reload: {}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reload {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Emit {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// `http://` or `https://`; placeholders only after the host.
    pub url: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartWorkflow {
    pub name: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
}

/// Every action name, as the config writes it.
pub const ACTION_NAMES: &[&str] = &[
    "set_server_state",
    "set_server_weight",
    "switch_route",
    "restore_route",
    "set_table",
    "clear_table",
    "block",
    "revoke_sessions",
    "reload",
    "emit",
    "webhook",
    "start_workflow",
];

impl Action {
    /// The action's name, as the config writes it.
    pub fn name(&self) -> &'static str {
        match self {
            Action::SetServerState(_) => "set_server_state",
            Action::SetServerWeight(_) => "set_server_weight",
            Action::SwitchRoute(_) => "switch_route",
            Action::RestoreRoute(_) => "restore_route",
            Action::SetTable(_) => "set_table",
            Action::ClearTable(_) => "clear_table",
            Action::Block(_) => "block",
            Action::RevokeSessions(_) => "revoke_sessions",
            Action::Reload(_) => "reload",
            Action::Emit(_) => "emit",
            Action::Webhook(_) => "webhook",
            Action::StartWorkflow(_) => "start_workflow",
        }
    }

    /// The action's text fields (each a template), with their names.
    pub fn text_fields(&self) -> Vec<(&'static str, &str)> {
        match self {
            Action::SetServerState(a) => vec![("backend", &a.backend), ("server", &a.server)],
            Action::SetServerWeight(a) => vec![("backend", &a.backend), ("server", &a.server)],
            Action::SwitchRoute(a) => vec![("route", &a.route), ("backend", &a.backend)],
            Action::RestoreRoute(a) => vec![("route", &a.route)],
            Action::SetTable(a) => {
                let mut v = vec![("table", a.table.as_str()), ("key", &a.key)];
                if let Some(t) = &a.tag {
                    v.push(("tag", t));
                }
                v
            }
            Action::ClearTable(a) => vec![("table", &a.table), ("key", &a.key)],
            Action::Block(a) => vec![("table", &a.table), ("key", &a.key)],
            Action::RevokeSessions(a) => vec![("principal", &a.principal)],
            Action::Reload(_) => vec![],
            Action::Emit(a) => {
                let mut v = vec![("type", a.type_.as_str())];
                if let Some(s) = &a.subject {
                    v.push(("subject", s));
                }
                v
            }
            Action::Webhook(a) => vec![("url", &a.url)],
            Action::StartWorkflow(a) => vec![("name", &a.name)],
        }
    }

    /// The action's JSON fields (every string inside is a template), with their names.
    pub fn json_fields(&self) -> Vec<(&'static str, &Value)> {
        match self {
            Action::Emit(a) => vec![("data", &a.data)],
            Action::StartWorkflow(a) => vec![("input", &a.input)],
            _ => vec![],
        }
    }

    /// This action with every template filled from `scope`. The error names the field.
    pub fn render(&self, scope: &Scope<'_, '_>) -> Result<Action, String> {
        let name = self.name();
        let s = |field: &str, text: &str| {
            render_str(text, scope).map_err(|e| format!("{name}.{field}: {e}"))
        };
        let j = |field: &str, v: &Value| {
            render_value(v, scope).map_err(|e| format!("{name}.{field}: {e}"))
        };
        Ok(match self {
            Action::SetServerState(a) => Action::SetServerState(SetServerState {
                backend: s("backend", &a.backend)?,
                server: s("server", &a.server)?,
                state: a.state,
            }),
            Action::SetServerWeight(a) => Action::SetServerWeight(SetServerWeight {
                backend: s("backend", &a.backend)?,
                server: s("server", &a.server)?,
                weight: a.weight,
            }),
            Action::SwitchRoute(a) => Action::SwitchRoute(SwitchRoute {
                route: s("route", &a.route)?,
                backend: s("backend", &a.backend)?,
            }),
            Action::RestoreRoute(a) => Action::RestoreRoute(RestoreRoute {
                route: s("route", &a.route)?,
            }),
            Action::SetTable(a) => Action::SetTable(SetTable {
                table: s("table", &a.table)?,
                key: s("key", &a.key)?,
                gpc0: a.gpc0,
                tag: a.tag.as_deref().map(|t| s("tag", t)).transpose()?,
            }),
            Action::ClearTable(a) => Action::ClearTable(ClearTable {
                table: s("table", &a.table)?,
                key: s("key", &a.key)?,
            }),
            Action::Block(a) => Action::Block(Block {
                table: s("table", &a.table)?,
                key: s("key", &a.key)?,
                for_: a.for_,
            }),
            Action::RevokeSessions(a) => Action::RevokeSessions(RevokeSessions {
                principal: s("principal", &a.principal)?,
            }),
            Action::Reload(r) => Action::Reload(r.clone()),
            Action::Emit(a) => Action::Emit(Emit {
                type_: s("type", &a.type_)?,
                subject: a.subject.as_deref().map(|t| s("subject", t)).transpose()?,
                data: j("data", &a.data)?,
            }),
            Action::Webhook(a) => Action::Webhook(Webhook {
                url: s("url", &a.url)?,
            }),
            Action::StartWorkflow(a) => Action::StartWorkflow(StartWorkflow {
                name: s("name", &a.name)?,
                input: j("input", &a.input)?,
            }),
        })
    }
}
