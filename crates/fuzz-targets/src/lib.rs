//! The fuzz targets of portcullis, as a plain library: one function per parser that input can
//! reach, each taking the fuzzer's bytes (a few decode them into a structured case with
//! `arbitrary`, where raw bytes would never get past a signature or a decryption). A target
//! asserts only what must hold for every input: no panic, no hang, and, where it is true, a
//! parsed value that serializes and parses back equal, or a decision that agrees with an
//! independent reading of the same bytes. A failed assertion is a finding.
//!
//! `fuzz/` (cargo-fuzz) wraps each function in a `fuzz_target!`; `tests/corpus.rs` replays
//! every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through them, so
//! `cargo test` runs the corpora on the stable toolchain. [`TARGETS`] lists them by name.
//! How to run them is in docs/reliability.md ("Fuzzing").

pub mod audit;
pub mod config;
pub mod edge;
pub mod events;
pub mod identity;
pub mod limits;
pub mod policy;
#[doc(hidden)]
pub mod seeds;
pub mod upstream;
pub mod workflow;

mod support;

/// A fuzz target: its name (the `fuzz/` binary and corpus directory) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by the name of its `fuzz/fuzz_targets/<name>.rs` and corpus directory.
pub const TARGETS: &[Target] = &[
    ("config", config::config),
    ("expand", config::expand),
    ("jwt", identity::jwt),
    ("jwt_claims", identity::jwt_claims),
    ("jwks", identity::jwks),
    ("session_cookie", identity::session_cookie),
    ("apikey_file", identity::apikey_file),
    ("http1_head", edge::http1_head),
    ("smuggle_guard", edge::smuggle_guard),
    ("chunked", upstream::chunked),
    ("h1_response", upstream::h1_response),
    ("shorthand", policy::shorthand),
    ("cloudevents", events::cloudevents),
    ("alertmanager", events::alertmanager),
    ("asl_definition", workflow::asl_definition),
    ("asl_run", workflow::asl_run),
    ("jsonpath", workflow::jsonpath),
    ("intrinsics", workflow::intrinsics),
    ("audit_records", audit::audit_records),
    ("limits", limits::limits),
];
