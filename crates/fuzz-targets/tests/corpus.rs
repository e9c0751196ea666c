//! Replays the committed fuzz inputs on the stable toolchain: every file of
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through its target's
//! function, so `cargo test` catches a regression without cargo-fuzz or a nightly compiler.
//! Also checks that every target has a `fuzz_target!` binary and a seed corpus.

use portcullis_fuzz_targets::TARGETS;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_target_has_a_binary_and_seeds() {
    let fuzz = fuzz_dir();
    for (name, _) in TARGETS {
        let bin = fuzz.join("fuzz_targets").join(format!("{name}.rs"));
        assert!(bin.is_file(), "{} is missing", bin.display());
        assert!(
            !files(&fuzz.join("corpus").join(name)).is_empty(),
            "fuzz/corpus/{name}/ has no seeds"
        );
    }
    for bin in files(&fuzz.join("fuzz_targets")) {
        let stem = bin.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        assert!(
            TARGETS.iter().any(|(n, _)| *n == stem),
            "{} is not in TARGETS",
            bin.display()
        );
    }
}

#[test]
fn corpora_and_regressions_replay() {
    let fuzz = fuzz_dir();
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (name, target) in TARGETS {
        for kind in ["corpus", "regressions"] {
            for file in files(&fuzz.join(kind).join(name)) {
                let data = std::fs::read(&file).expect("reading a fuzz input");
                replayed += 1;
                if let Err(e) = catch_unwind(AssertUnwindSafe(|| target(&data))) {
                    let why = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{name}: {}: {why}", file.display()));
                }
            }
        }
    }
    assert!(
        replayed > 0,
        "no fuzz inputs found under {}",
        fuzz.display()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
