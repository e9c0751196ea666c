//! Durable workflows: an Amazon States Language (JSONPath mode) interpreter whose every
//! transition is committed to a [`WorkflowStore`] before its effects are visible.
//!
//! * [`definition`]: parsing and validating a state machine (with path-named problems).
//! * [`paths`], [`intrinsics`]: JSONPath selection, payload templates (`.$` keys), the
//!   context object `$$`, `Assign` variables and the `States.*` intrinsic functions.
//! * [`choice`]: Choice rules; [`retry`]: Retry and Catch.
//! * [`machine`]: the interpreter, pure: it advances an execution's state one transition at a
//!   time and says what to do (run a task, wake at a time).
//! * [`store`], [`memstore`]: persistence behind a trait, and an in-memory store.

pub mod choice;
pub mod definition;
pub mod intrinsics;
pub mod local;
pub mod machine;
pub mod memstore;
pub mod paths;
pub mod retry;
pub mod runner;
pub mod stamp;
pub mod store;
pub mod template;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An error as ASL names it: `Error` (`States.Timeout`, `Http.404`, …) and `Cause`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatesError {
    pub error: String,
    pub cause: String,
}

impl StatesError {
    pub fn new(error: impl Into<String>, cause: impl Into<String>) -> StatesError {
        StatesError {
            error: error.into(),
            cause: cause.into(),
        }
    }

    /// `States.Runtime`: an input or output could not be processed.
    pub fn runtime(cause: impl Into<String>) -> StatesError {
        StatesError::new(names::RUNTIME, cause)
    }

    /// The Error Output a Catch passes on: `{"Error": …, "Cause": …}`.
    pub fn output(&self) -> Value {
        serde_json::json!({ "Error": self.error, "Cause": self.cause })
    }
}

impl std::fmt::Display for StatesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.cause)
    }
}

/// The predefined error names of the ASL specification (Appendix A).
pub mod names {
    pub const ALL: &str = "States.ALL";
    pub const HEARTBEAT_TIMEOUT: &str = "States.HeartbeatTimeout";
    pub const TIMEOUT: &str = "States.Timeout";
    pub const TASK_FAILED: &str = "States.TaskFailed";
    pub const PERMISSIONS: &str = "States.Permissions";
    pub const RESULT_PATH_MATCH_FAILURE: &str = "States.ResultPathMatchFailure";
    pub const PARAMETER_PATH_FAILURE: &str = "States.ParameterPathFailure";
    pub const BRANCH_FAILED: &str = "States.BranchFailed";
    pub const NO_CHOICE_MATCHED: &str = "States.NoChoiceMatched";
    pub const INTRINSIC_FAILURE: &str = "States.IntrinsicFailure";
    pub const EXCEED_TOLERATED_FAILURE_THRESHOLD: &str = "States.ExceedToleratedFailureThreshold";
    pub const ITEM_READER_FAILED: &str = "States.ItemReaderFailed";
    pub const RESULT_WRITER_FAILED: &str = "States.ResultWriterFailed";
    pub const DATA_LIMIT_EXCEEDED: &str = "States.DataLimitExceeded";
    pub const RUNTIME: &str = "States.Runtime";
}

/// What a path or a payload template reads: the state's input (`$`), the context object
/// (`$$`) and the variables in scope (`$name`).
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub input: &'a Value,
    pub context: &'a Value,
    pub vars: &'a Map<String, Value>,
}

/// The largest input, output or result an execution passes between states (256 KiB, as
/// Step Functions).
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// The most history events one execution may have (as Step Functions).
pub const MAX_HISTORY: u64 = 25_000;

/// The largest number of seconds a `TimeoutSeconds`, `HeartbeatSeconds` or Wait may give
/// (99 999 999, about three years, as Step Functions), written or selected by a path.
pub const MAX_SECONDS: u64 = 99_999_999;

/// The time `ms` milliseconds after `now` (Unix milliseconds), saturating: a far deadline
/// stays far, and never wraps into the past.
pub fn after_ms(now: i64, ms: u64) -> i64 {
    now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// The time `secs` seconds after `now` (Unix milliseconds), saturating (see [`after_ms`]).
pub fn after_secs(now: i64, secs: u64) -> i64 {
    after_ms(now, secs.saturating_mul(1000))
}
