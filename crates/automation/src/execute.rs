//! Running a firing: [`execute`] claims its key, checks the guard rails, and hands each action
//! to the caller's [`Control`], which applies it through the audited control path as the
//! firing's principal (where Cedar policy may deny it). Callers that prefer to drive the
//! actions themselves can use the same steps: [`FiringStore::claim`], then
//! [`crate::guard::may_take_out`] before any `set_server_state` to `drain` or `maint`.
//!
//! Actions run in order and stop at the first that is blocked, denied or fails; the rest are
//! reported as skipped. A dry-run firing (`enforce: false`) is claimed and checked the same
//! way, but nothing is applied: each action is reported as `would_act`.

use crate::config::{Action, SetServerState};
use crate::engine::Firing;
use crate::guard::{may_take_out, ServerView};
use crate::store::FiringStore;
use crate::Error;
use serde::Serialize;

/// What automation acts through: the control path, implemented by the caller.
pub trait Control {
    /// The servers of `backend` as they are now, for `max_unavailable`; `None` if there is
    /// no such backend (then `apply` reports it).
    fn servers(&mut self, backend: &str) -> Option<Vec<ServerView>>;

    /// Applies one action of `firing`, as `firing.principal`. Effects that produce events
    /// (a state change, an emitted event) must give them `causedby = firing.cause_event_id`
    /// and `hops = firing.hop`.
    fn apply(&mut self, firing: &Firing, action: &Action) -> Result<(), ActionError>;
}

/// Why [`Control::apply`] did not apply an action.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Policy forbids the principal this action: recorded, not run.
    #[error("denied: {0}")]
    Denied(String),
    /// It was allowed but failed (unknown backend, invalid value, I/O).
    #[error("failed: {0}")]
    Failed(String),
}

/// What happened to one action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "reason", rename_all = "snake_case")]
pub enum Outcome {
    Done,
    /// Dry run: it would have been applied.
    WouldAct,
    /// A guard rail stopped it (`max_unavailable`).
    Blocked(String),
    Denied(String),
    Failed(String),
    /// An earlier action did not go through.
    Skipped,
}

/// The result of [`execute`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Execution {
    /// `false`: the key was claimed before (a retry, a restart, another replica); nothing ran.
    pub claimed: bool,
    /// One per action of the firing, in order (empty if not claimed or the firing has an
    /// `error`).
    pub outcomes: Vec<(Action, Outcome)>,
}

/// Claims `firing` in `store` and, if the claim is new, runs its actions through `control`.
/// A store error is returned and nothing runs.
pub fn execute(
    firing: &Firing,
    store: &dyn FiringStore,
    control: &mut dyn Control,
) -> Result<Execution, Error> {
    if !store.claim(&firing.idempotency_key)? {
        return Ok(Execution {
            claimed: false,
            outcomes: Vec::new(),
        });
    }
    let mut outcomes = Vec::with_capacity(firing.actions.len());
    let mut stopped = false;
    for a in &firing.actions {
        let outcome = if stopped {
            Outcome::Skipped
        } else if let Some(reason) = guard(firing, a, control) {
            Outcome::Blocked(reason)
        } else if !firing.enforce {
            Outcome::WouldAct
        } else {
            match control.apply(firing, a) {
                Ok(()) => Outcome::Done,
                Err(ActionError::Denied(r)) => Outcome::Denied(r),
                Err(ActionError::Failed(r)) => Outcome::Failed(r),
            }
        };
        stopped = !matches!(outcome, Outcome::Done | Outcome::WouldAct);
        outcomes.push((a.clone(), outcome));
    }
    Ok(Execution {
        claimed: true,
        outcomes,
    })
}

/// Why a guard rail stops `action`, if one does.
fn guard(firing: &Firing, action: &Action, control: &mut dyn Control) -> Option<String> {
    match action {
        Action::SetServerState(SetServerState {
            backend,
            server,
            state,
        }) if state.takes_out() => {
            let servers = control.servers(backend)?;
            may_take_out(&servers, server, firing.max_unavailable)
                .err()
                .map(|r| format!("backend `{backend}`: {r}"))
        }
        _ => None,
    }
}
