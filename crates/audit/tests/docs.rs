//! The worked example in `docs/audit.md` is real: its lines verify, and its hashes are the ones
//! the code computes.

use portcullis_audit::{chain, files, verify};
use std::path::Path;

fn example_lines() -> Vec<String> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/audit.md");
    let text = std::fs::read_to_string(&doc).unwrap();
    let start = text.find("```jsonl\n").expect("a ```jsonl block") + "```jsonl\n".len();
    let end = start + text[start..].find("```").unwrap();
    text[start..end].lines().map(String::from).collect()
}

#[test]
fn the_worked_example_verifies() {
    let lines = example_lines();
    assert_eq!(lines.len(), 2);
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join(files::file_name(1));
    std::fs::write(&f, lines.join("\n") + "\n").unwrap();
    let r = verify(&[f]).unwrap();
    assert_eq!((r.records, r.first_seq, r.last_seq), (2, 1, 2));

    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let hash = chain::record_hash(first.as_object().unwrap());
    assert_eq!(first["hash"], hash.as_str());
    assert_eq!(chain::canonical(&first), lines[0].as_bytes());
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/audit.md"))
            .unwrap();
    assert!(
        doc.contains(&format!("{hash}  -")),
        "the sha256sum output in the doc"
    );
}
