//! portcullis automation: triggers over events, and the guard rails around what they do.
//! Pure: no proxy types and no I/O. Time comes in as `now` arguments, actions go out as
//! values (or through the caller's [`Control`]), and claimed firings are kept behind
//! [`FiringStore`], which the embedded store implements.
//!
//! * [`config`]: the `triggers:` config ([`TriggerCfg`], [`Action`]) and its YAML shape;
//!   [`parse_triggers`] checks a raw value with path-named errors, [`validate`] the meaning.
//! * [`engine`]: the [`Engine`]: `on_event` and `tick` turn events into [`Firing`]s, with
//!   thresholds, grouping, cooldown, inhibition, loop protection, rate caps and bounded memory.
//! * [`event`], [`pattern`], [`template`]: what triggers read from an event ([`EventView`]),
//!   how they match it (`*`, `!`), and how actions quote it (`{data.server}`).
//! * [`store`], [`execute`](mod@execute): exactly-once firing by idempotency key, and running a
//!   firing's actions through [`Control`].
//! * [`guard`]: `max_unavailable`, checked before taking a server out.
//!
//! ```
//! use portcullis_automation::{parse_triggers, Engine, EventView, MemoryFiringStore, FiringStore, Timestamp};
//! use serde_json::json;
//!
//! let cfg: serde_json::Value = serde_yaml_ng::from_str(r#"
//! - name: failover-billing
//!   match: { type: dev.portcullis.backend.unhealthy, subject: "billing/*" }
//!   cooldown: 5m
//!   actions: [{ switch_route: { route: billing/billing-api, backend: billing-standby } }]
//! "#).unwrap();
//! let mut engine = Engine::new(parse_triggers(&cfg).unwrap()).unwrap();
//!
//! let now = Timestamp::from_secs(1_700_000_000);
//! let down = EventView { subject: Some("billing/billing-v2"),
//!     ..EventView::new("ev-1", "dev.portcullis.backend.unhealthy", now) };
//! let firings = engine.on_event(&down, now);
//! assert_eq!(firings.len(), 1);
//! let store = MemoryFiringStore::new();
//! assert!(store.claim(&firings[0].idempotency_key).unwrap());   // run it
//! assert!(!store.claim(&firings[0].idempotency_key).unwrap());  // a retry does not
//! ```

pub mod config;
pub mod engine;
pub mod event;
pub mod execute;
pub mod guard;
pub mod pattern;
mod schema;
pub mod store;
mod suggest;
pub mod template;
pub mod time;
mod validate;
pub mod workflow;

pub use config::{Action, MatchCfg, Posture, ServerState, TriggerCfg};
pub use engine::{Engine, EngineOptions, EngineStats, Firing, TriggerStats};
pub use event::EventView;
pub use execute::{execute, ActionError, Control, Execution, Outcome};
pub use guard::{may_take_out, MaxUnavailable, Refusal, ServerView};
pub use schema::parse_triggers;
pub use store::{FiringStore, MemoryFiringStore};
pub use time::{Clock, Dur, ManualClock, SystemClock, Timestamp};
pub use validate::{validate, MAX_THRESHOLD};

/// A config problem: its path (`triggers[2].actions[0].set_server_state.state`) and a message
/// that says what is wrong and how to fix it.
pub type Problem = (String, String);

/// The error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The trigger config is invalid; every problem, with its path.
    #[error("invalid triggers: {}", .0.iter().map(|(p, m)| format!("{p}: {m}")).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
    /// The firing store failed; the firing must not run.
    #[error("firing store: {0}")]
    Store(String),
}
