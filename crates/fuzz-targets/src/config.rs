//! Config targets: the loader and validator, from the bytes of a root YAML file to a config or
//! its diagnostics, and `${env:}`/`${file:}` expansion.
//!
//! The loader reads files the config names (app bundles, policies, secrets, certificates).
//! Each input is written as the root file of a scratch directory holding a copy of the
//! repository's `examples/`, so the examples' relative paths resolve. Inputs that name files
//! outside that directory are skipped: an absolute path, `..` or a recursive glob could read
//! `/dev/zero` or walk the whole disk, a hang that says nothing about the parser.

use crate::support::{copy_tree, examples_dir, scratch, text};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Whether a string of the config may name a file outside the scratch directory.
fn escapes(s: &str) -> bool {
    s.starts_with('/')
        || s.contains("..")
        || s.contains("${file:/")
        || s.contains("**")
        || s.matches('*').count() > 2
        || s.contains('\0')
}

/// Whether any key or string of `v` may name a file outside the scratch directory.
fn names_outside(v: &serde_yaml_ng::Value) -> bool {
    use serde_yaml_ng::Value as Y;
    match v {
        Y::String(s) => escapes(s),
        Y::Sequence(list) => list.iter().any(names_outside),
        Y::Mapping(m) => m.iter().any(|(k, v)| names_outside(k) || names_outside(v)),
        Y::Tagged(t) => names_outside(&t.value),
        _ => false,
    }
}

/// The scratch directory of the config target, with the examples copied in once.
fn config_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("config");
        if let Some(ex) = examples_dir() {
            copy_tree(&ex, &dir);
        }
        dir
    })
}

/// A root config file: loaded and validated. Every problem must be located at a line and
/// column (1-based), and a config that loads must load again the same.
pub fn config(data: &[u8]) {
    let Some(text) = text(data) else {
        return;
    };
    // Read as YAML first, to see every string as the loader will (escapes decoded). When it
    // is not YAML, the loader stops at the root file too.
    if let Ok(v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
        if names_outside(&v) {
            return;
        }
    }
    let root = config_dir().join("fuzz-root.yaml");
    std::fs::write(&root, data).expect("writing the scratch config");
    match portcullis_config::load(&root) {
        Ok(cfg) => {
            for r in &cfg.routes {
                assert!(
                    cfg.backends.iter().any(|b| b.id == r.backend_id),
                    "route `{}` names backend `{}`, which is not defined",
                    r.id,
                    r.backend_id
                );
            }
            let again = portcullis_config::load(&root).expect("a config that loaded loads again");
            assert_eq!(
                cfg.version, again.version,
                "the same files, another version"
            );
            assert_eq!(cfg.routes.len(), again.routes.len());
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "an error with no diagnostic");
            for d in &e.0 {
                assert!(
                    d.line >= 1 && d.col >= 1,
                    "diagnostic without a position: {d}"
                );
                assert!(!d.message.is_empty(), "diagnostic without a message: {d}");
            }
            let _ = e.to_string();
        }
    }
}

/// The scratch directory of the expansion target: a secret with a trailing newline, one with
/// CRLF, and an empty one.
fn expand_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("expand");
        for (name, body) in [
            ("token", "s3cret\n"),
            ("crlf", "line\r\n"),
            ("empty", ""),
            ("nested", "${env:PORTCULLIS_FUZZ_VAR}"),
        ] {
            std::fs::write(dir.join(name), body).expect("writing a scratch secret");
        }
        std::fs::create_dir_all(dir.join("sub")).expect("a scratch subdirectory");
        std::fs::write(dir.join("sub/key"), "k").expect("writing a scratch secret");
        // Set once, before any expansion reads the environment.
        std::env::set_var("PORTCULLIS_FUZZ_VAR", "value");
        std::env::set_var("PORTCULLIS_FUZZ_EMPTY", "");
        dir
    })
}

/// `${env:NAME}` and `${file:PATH}` expansion. A string without `${` comes back unchanged, an
/// error always says something, and nothing expanded is expanded again.
pub fn expand(data: &[u8]) {
    let Some(s) = text(data) else {
        return;
    };
    if s.contains("${file:/") || s.contains("..") || s.contains('\0') {
        return;
    }
    let dir = expand_dir();
    match portcullis_config::expand(s, dir) {
        Ok(out) => {
            if !s.contains("${") {
                assert_eq!(out, s, "a string without references changed");
            }
            // The file `nested` holds a reference: it is copied, never expanded.
            if s.contains("${file:nested}") {
                assert!(out.contains("${env:PORTCULLIS_FUZZ_VAR}"), "{out}");
            }
        }
        Err(e) => assert!(!e.is_empty(), "an empty error"),
    }
}
