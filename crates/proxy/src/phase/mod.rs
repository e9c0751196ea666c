//! The phases of the request path, in the order `pipeline` runs them:
//!
//! ```text
//! check → route → identify → authorize → limit → forward (balance per attempt) → record
//! ```
//!
//! Each phase is a function of the snapshot and the [`Exchange`](crate::exchange::Exchange)
//! that returns a [`Flow`](crate::exchange::Flow): go on, or answer now. They are called
//! statically, one after the other, with no dynamic dispatch and no allocation of their own.

pub mod authorize;
pub mod balance;
pub mod check;
pub mod forward;
pub mod identify;
pub mod limit;
pub mod route;
