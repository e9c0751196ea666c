//! Tampering with the files is found, at the right seq, file and line: a changed byte (any
//! byte of a record), a deleted record, swapped or duplicated records, a missing file.

mod common;

use common::{all_lines, audit_files, cfg, rec};
use portcullis_audit::{verify, Auditor, VerifyError};
use portcullis_config::{Fsync, Size};
use std::fs;
use std::path::{Path, PathBuf};

/// A chain of 40 records over several files, written by the real writer.
fn copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path(), Fsync::Interval);
    c.rotate_size = Size(4096);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let a = Auditor::start(&c, "i").unwrap();
        for i in 1..=40 {
            a.record(rec(&format!("r{i}"), "alice")).await.unwrap();
        }
    });
    assert!(audit_files(tmp.path()).len() >= 3);
    tmp
}

/// The file and line that hold `seq`.
fn locate(dir: &Path, seq: u64) -> (PathBuf, usize) {
    let (f, l, _) = all_lines(dir)
        .into_iter()
        .find(|(_, _, t)| t.contains(&format!("\"seq\":{seq},")))
        .unwrap();
    (f, l)
}

fn edit(file: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    f(&mut lines);
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    fs::write(file, text).unwrap();
}

fn broken(dir: &Path) -> VerifyError {
    verify(&[dir.to_path_buf()]).expect_err("tampering must be found")
}

#[test]
fn the_untouched_chain_verifies() {
    let dir = copy();
    let r = verify(&[dir.path().to_path_buf()]).unwrap();
    assert_eq!((r.records, r.first_seq, r.last_seq), (40, 1, 40));
}

#[test]
fn any_changed_byte_is_found_at_its_seq() {
    let dir = copy();
    let (file, line) = locate(dir.path(), 12);
    let original = fs::read(&file).unwrap();
    let start: usize = original
        .split_inclusive(|&b| b == b'\n')
        .take(line - 1)
        .map(|l| l.len())
        .sum();
    let len = original[start..].iter().position(|&b| b == b'\n').unwrap();
    for i in start..start + len {
        let mut data = original.clone();
        data[i] = if data[i] == b'a' { b'b' } else { b'a' };
        fs::write(&file, &data).unwrap();
        let e = broken(dir.path());
        assert_eq!(
            (e.seq, e.file.as_path(), e.line),
            (12, file.as_path(), line),
            "byte {} of the line: {e}",
            i - start
        );
    }
}

#[test]
fn a_deleted_record_is_found_at_its_seq() {
    let dir = copy();
    let (file, line) = locate(dir.path(), 12);
    edit(&file, |l| {
        l.remove(line - 1);
    });
    let e = broken(dir.path());
    assert_eq!((e.seq, &e.file, e.line), (12, &file, line), "{e}");
    assert!(e.reason.contains("missing"), "{e}");
}

#[test]
fn swapped_records_are_found_at_the_first_one() {
    let dir = copy();
    let (file, line) = locate(dir.path(), 12);
    assert_eq!(locate(dir.path(), 13), (file.clone(), line + 1));
    edit(&file, |l| l.swap(line - 1, line));
    let e = broken(dir.path());
    assert_eq!((e.seq, &e.file, e.line), (12, &file, line), "{e}");
}

#[test]
fn a_duplicated_record_is_found() {
    let dir = copy();
    let (file, line) = locate(dir.path(), 12);
    edit(&file, |l| {
        let dup = l[line - 1].clone();
        l.insert(line, dup);
    });
    let e = broken(dir.path());
    assert_eq!((e.seq, &e.file, e.line), (13, &file, line + 1), "{e}");
}

#[test]
fn a_replaced_record_with_a_valid_hash_breaks_the_link() {
    // Re-hashing a forged record is easy; linking it to its neighbours is not.
    let dir = copy();
    let (file, line) = locate(dir.path(), 12);
    let forged = {
        let text = fs::read_to_string(&file).unwrap();
        let mut v: serde_json::Value =
            serde_json::from_str(text.lines().nth(line - 1).unwrap()).unwrap();
        v["principal"]["user"] = "mallory".into();
        v["prev_hash"] = "ab".repeat(32).into();
        let hash = portcullis_audit::chain::record_hash(v.as_object().unwrap());
        v["hash"] = hash.into();
        String::from_utf8(portcullis_audit::chain::canonical(&v)).unwrap()
    };
    edit(&file, |l| l[line - 1] = forged);
    let e = broken(dir.path());
    assert_eq!((e.seq, &e.file, e.line), (12, &file, line), "{e}");
    assert!(e.reason.contains("prev_hash"), "{e}");
}

#[test]
fn a_missing_file_is_found_at_the_first_missing_seq() {
    let dir = copy();
    let files = audit_files(dir.path());
    let gone = &files[1];
    let first_gone: u64 =
        portcullis_audit::files::parse_name(gone.file_name().unwrap().to_str().unwrap()).unwrap();
    fs::remove_file(gone).unwrap();
    let e = broken(dir.path());
    assert_eq!((e.seq, &e.file, e.line), (first_gone, &files[2], 1), "{e}");
    assert!(e.reason.contains("file is missing"), "{e}");
    // The same when the files are listed one by one, in any order.
    let mut given: Vec<PathBuf> = audit_files(dir.path());
    given.reverse();
    assert_eq!(verify(&given).unwrap_err(), e);
}

#[test]
fn a_record_deleted_at_the_end_of_an_older_file_is_found() {
    let dir = copy();
    let files = audit_files(dir.path());
    let next_first: u64 =
        portcullis_audit::files::parse_name(files[1].file_name().unwrap().to_str().unwrap())
            .unwrap();
    edit(&files[0], |l| {
        l.pop();
    });
    let e = broken(dir.path());
    assert_eq!(
        (e.seq, &e.file, e.line),
        (next_first - 1, &files[1], 1),
        "{e}"
    );
}

/// The writer does not continue a trail whose newest file was renamed (here, the last two
/// files' names swapped): it would fork the chain, or its next rotation would collide with
/// an existing file and fail every audited request. It refuses to start, and says why.
#[test]
fn the_writer_refuses_a_trail_whose_files_were_renamed() {
    let dir = copy();
    let files = audit_files(dir.path());
    let (a, b) = (&files[files.len() - 2], &files[files.len() - 1]);
    let tmp = dir.path().join("swap");
    fs::rename(a, &tmp).unwrap();
    fs::rename(b, a).unwrap();
    fs::rename(&tmp, b).unwrap();
    let c = cfg(dir.path(), Fsync::Interval);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let e = rt
        .block_on(async { Auditor::start(&c, "i").map(|_| ()) })
        .expect_err("a renamed trail must not be continued")
        .to_string();
    assert!(e.contains("renamed or replaced"), "{e}");
}
