//! The limit phase: stick-table counters, rate limits and quotas, answering 429 with
//! `Retry-After` (or queueing) when a caller is over its limits. It runs after authorize, so
//! that it counts only callers that were let in, and sees their identity. Not built yet: every
//! request goes on.

use crate::exchange::{Exchange, Flow};

pub fn run(_x: &mut Exchange<'_>) -> Flow {
    Flow::Next
}
