//! `portcullis audit verify`: checks that audit files form one unbroken hash chain, and names
//! the first broken seq, file and line.
//!
//! What is checked, record by record in chain order: the line is a JSON object in canonical
//! form whose `hash` matches its content (a changed byte); its `seq` is one more than the
//! previous record's (a deleted, reordered or duplicated record, or a missing file); and its
//! `prev_hash` is the previous record's `hash` (a replaced record).
//!
//! What cannot be checked from the files alone: the oldest file's first `prev_hash` is trusted
//! (older files may have been archived, so the chain may start at any seq; only seq 1 must link
//! to 64 zeros), and records cut off the *end* of the newest file leave no gap. Compare
//! `last_seq` and `last_hash` with a copy kept elsewhere (the writer's stats, a log shipped
//! off the host) to cover both. A torn last line at the very end of the newest file (a crash
//! mid-write, no trailing newline) is a warning, not an error: the writer never acknowledged
//! it, and cuts it off when it restarts.

use crate::chain::{check_line, Link, GENESIS};
use crate::files;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// A chain that verified.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// Files read.
    pub files: usize,
    /// The seq of the oldest record (0 if there were no records).
    pub first_seq: u64,
    /// The seq of the newest record (0 if there were no records).
    pub last_seq: u64,
    /// The hash of the newest record, to compare with a copy kept elsewhere.
    pub last_hash: String,
    /// Things that are not breaks in the chain but deserve a look: a torn final line, an empty
    /// file, a file whose name does not match its first record.
    pub warnings: Vec<String>,
}

/// The first place where the chain is broken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: seq {seq}: {reason}", file.display())]
pub struct VerifyError {
    /// The seq that should be at this place (0 if unknown).
    pub seq: u64,
    pub file: PathBuf,
    /// 1-based line number in `file` (0 if the file could not be read at all).
    pub line: usize,
    pub reason: String,
}

fn at(seq: u64, file: &Path, line: usize, reason: impl Into<String>) -> VerifyError {
    VerifyError {
        seq,
        file: file.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Verifies the chain across `paths`: audit files in any order, or directories (which stand
/// for the `audit-*.jsonl` files in them).
pub fn verify(paths: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    let files = files::expand(paths).map_err(|e| {
        let file = match &e {
            crate::Error::Io { path, .. } => path.clone(),
            _ => PathBuf::new(),
        };
        at(0, &file, 0, e.to_string())
    })?;
    let Some(newest) = files.last().cloned() else {
        let shown = paths.first().cloned().unwrap_or_default();
        return Err(at(0, &shown, 0, "no audit files found"));
    };
    let mut report = VerifyReport {
        files: files.len(),
        ..VerifyReport::default()
    };
    let mut prev: Option<Link> = None;
    for path in &files {
        let f = File::open(path).map_err(|e| at(0, path, 0, format!("cannot read: {e}")))?;
        let mut reader = BufReader::new(f);
        let mut buf = Vec::new();
        let mut line_no = 0usize;
        let mut first_in_file: Option<u64> = None;
        loop {
            buf.clear();
            let expected = prev.as_ref().map(|p| p.seq + 1);
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| at(expected.unwrap_or(0), path, line_no + 1, e.to_string()))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if buf.pop() != Some(b'\n') {
                if *path == newest {
                    report.warnings.push(format!(
                        "{}:{line_no}: torn final line ({n} bytes without a newline): the writer \
                         stopped mid-record; that record was never acknowledged",
                        path.display()
                    ));
                    break;
                }
                return Err(at(
                    expected.unwrap_or(0),
                    path,
                    line_no,
                    "incomplete line (no newline) at the end of a file that is not the newest",
                ));
            }
            let (link, _) = check_line(&buf)
                .map_err(|bad| at(expected.or(bad.seq).unwrap_or(0), path, line_no, bad.reason))?;
            match &prev {
                None => {
                    if link.seq == 1 && link.prev_hash != GENESIS {
                        return Err(at(
                            1,
                            path,
                            line_no,
                            "the first record must have prev_hash of 64 zeros",
                        ));
                    }
                    report.first_seq = link.seq;
                }
                Some(p) => {
                    let exp = p.seq + 1;
                    if link.seq > exp {
                        let reason = if line_no == 1 {
                            format!(
                                "seq {exp} is missing: this file starts at seq {}; a file is \
                                 missing (or records were deleted)",
                                link.seq
                            )
                        } else {
                            format!(
                                "seq {exp} is missing: found seq {} here (a record was deleted \
                                 or records were reordered)",
                                link.seq
                            )
                        };
                        return Err(at(exp, path, line_no, reason));
                    }
                    if link.seq < exp {
                        return Err(at(
                            exp,
                            path,
                            line_no,
                            format!(
                                "expected seq {exp}, found seq {} (records reordered or \
                                 duplicated)",
                                link.seq
                            ),
                        ));
                    }
                    if link.prev_hash != p.hash {
                        return Err(at(
                            exp,
                            path,
                            line_no,
                            format!(
                                "prev_hash does not match the hash of seq {} (a record was \
                                 replaced)",
                                p.seq
                            ),
                        ));
                    }
                }
            }
            first_in_file.get_or_insert(link.seq);
            report.records += 1;
            prev = Some(link);
        }
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(files::parse_name);
        match (first_in_file, named) {
            (None, _) => report
                .warnings
                .push(format!("{}: no records", path.display())),
            (Some(first), Some(named)) if first != named => report.warnings.push(format!(
                "{}: the name says the first record is seq {named}, but it is seq {first}",
                path.display()
            )),
            _ => {}
        }
    }
    if let Some(p) = prev {
        report.last_seq = p.seq;
        report.last_hash = p.hash;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Chain;
    use crate::record::Record;
    use std::fs;
    use std::time::SystemTime;

    /// Writes records `1..=n` into files of `per_file` records each, like the writer does.
    fn write_chain(dir: &Path, n: u64, per_file: u64) {
        let mut c = Chain::new("t");
        let mut data = Vec::new();
        let mut start = 1;
        for seq in 1..=n {
            let (_, line) = c.seal(&Record::default(), SystemTime::now()).unwrap();
            data.extend_from_slice(&line);
            if seq % per_file == 0 || seq == n {
                fs::write(dir.join(files::file_name(start)), &data).unwrap();
                data.clear();
                start = seq + 1;
            }
        }
    }

    fn lines(p: &Path) -> Vec<String> {
        fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn put(p: &Path, lines: &[String]) {
        fs::write(p, lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn a_good_chain_verifies_given_as_a_dir_or_files_in_any_order() {
        let tmp = tempfile::tempdir().unwrap();
        write_chain(tmp.path(), 10, 4);
        let r = verify(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(
            (r.records, r.files, r.first_seq, r.last_seq),
            (10, 3, 1, 10)
        );
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let mut given: Vec<PathBuf> = files::list_dir(tmp.path())
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        given.reverse();
        assert_eq!(verify(&given).unwrap(), r);
    }

    #[test]
    fn the_oldest_file_may_start_anywhere() {
        let tmp = tempfile::tempdir().unwrap();
        write_chain(tmp.path(), 10, 4);
        fs::remove_file(tmp.path().join(files::file_name(1))).unwrap();
        let r = verify(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!((r.first_seq, r.last_seq), (5, 10));
        // The oldest file lost its first lines: still fine.
        let p = tmp.path().join(files::file_name(5));
        let l = lines(&p);
        put(&p, &l[2..]);
        let r = verify(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(r.first_seq, 7);
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    }

    #[test]
    fn a_non_json_line_is_reported_at_its_seq() {
        let tmp = tempfile::tempdir().unwrap();
        write_chain(tmp.path(), 5, 10);
        let p = tmp.path().join(files::file_name(1));
        let mut l = lines(&p);
        l[2].truncate(10);
        put(&p, &l);
        let e = verify(std::slice::from_ref(&p)).unwrap_err();
        assert_eq!((e.seq, e.line), (3, 3));
        assert!(e.reason.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn a_torn_line_is_an_error_unless_it_ends_the_newest_file() {
        let tmp = tempfile::tempdir().unwrap();
        write_chain(tmp.path(), 6, 3);
        let old = tmp.path().join(files::file_name(1));
        let mut data = fs::read(&old).unwrap();
        data.pop();
        fs::write(&old, &data).unwrap();
        let e = verify(&[tmp.path().to_path_buf()]).unwrap_err();
        assert_eq!((e.seq, e.line), (3, 3));

        let tmp = tempfile::tempdir().unwrap();
        write_chain(tmp.path(), 6, 3);
        let new = tmp.path().join(files::file_name(4));
        let mut data = fs::read(&new).unwrap();
        data.extend_from_slice(b"{\"kind\":\"dec");
        fs::write(&new, &data).unwrap();
        let r = verify(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(r.last_seq, 6);
        assert!(
            r.warnings[0].contains("torn final line"),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn nothing_to_verify_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let e = verify(&[tmp.path().to_path_buf()]).unwrap_err();
        assert!(e.reason.contains("no audit files"));
        let e = verify(&[tmp.path().join("nope")]).unwrap_err();
        assert_eq!(e.file, tmp.path().join("nope"));
    }

    #[test]
    fn seq_one_must_link_to_zeros() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = Chain::new("t");
        c.set_prev_hash(&"ab".repeat(32));
        let (_, line) = c.seal(&Record::default(), SystemTime::now()).unwrap();
        let p = tmp.path().join(files::file_name(1));
        fs::write(&p, line).unwrap();
        let e = verify(&[p]).unwrap_err();
        assert_eq!(e.seq, 1);
    }
}
