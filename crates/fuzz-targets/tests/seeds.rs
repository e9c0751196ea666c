//! Writes the generated seeds (signed tokens, sealed cookies, API key files, audit chains)
//! into `fuzz/corpus/<target>/`, and a few inputs that once failed into
//! `fuzz/regressions/<target>/`. Not part of the suite: run it when a target's input format
//! changes, with `cargo test -p portcullis-fuzz-targets --test seeds -- --ignored`.

use std::path::Path;

#[test]
#[ignore = "rewrites files under fuzz/corpus/"]
fn write_generated_seeds() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    for (target, name, bytes) in portcullis_fuzz_targets::seeds::generated() {
        let (kind, name) = match name.strip_prefix("regressions/") {
            Some(n) => ("regressions", n.to_string()),
            None => ("corpus", name),
        };
        let dir = fuzz.join(kind).join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
