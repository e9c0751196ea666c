//! Audit files on disk: their names (`audit-<16-digit seq of the first record>.jsonl`, so that
//! names sort in chain order), creating them with private permissions, the directory lock,
//! expanding and ordering the files given to `verify` and `search`, and resuming the chain
//! after a restart or a crash (a torn last line is truncated away).

use crate::chain::check_line;
use crate::Error;
use serde_json::Value;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

const PREFIX: &str = "audit-";
const SUFFIX: &str = ".jsonl";

/// The name of the file whose first record has `seq`.
pub fn file_name(seq: u64) -> String {
    format!("{PREFIX}{seq:016}{SUFFIX}")
}

/// The seq in an audit file name, if `name` is one.
pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The audit files in `dir`, sorted by the seq in their names.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if let Some(seq) = name.to_str().and_then(parse_name) {
            if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                out.push((seq, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Expands directories to their audit files, drops duplicates, and orders everything in chain
/// order: by the seq of each file's first record, or by the seq in its name when the first
/// line cannot be read.
pub(crate) fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut all = Vec::new();
    for p in paths {
        let meta = fs::metadata(p).map_err(|e| Error::io(p, e))?;
        if meta.is_dir() {
            all.extend(list_dir(p)?.into_iter().map(|(_, path)| path));
        } else {
            all.push(p.clone());
        }
    }
    let mut seen = HashSet::new();
    let mut keyed = Vec::new();
    for p in all {
        let id = fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
        if !seen.insert(id) {
            continue;
        }
        let first = first_line(&p)?
            .and_then(|l| serde_json::from_slice::<Value>(&l).ok())
            .and_then(|v| v.get("seq").and_then(Value::as_u64));
        let by_name = p.file_name().and_then(|n| n.to_str()).and_then(parse_name);
        keyed.push((first.or(by_name).unwrap_or(u64::MAX), p));
    }
    keyed.sort();
    Ok(keyed.into_iter().map(|(_, p)| p).collect())
}

/// The first complete line of a file (without its `\n`), if it has one.
pub(crate) fn first_line(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    BufReader::new(f)
        .read_until(b'\n', &mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.pop() == Some(b'\n') {
        Ok(Some(buf))
    } else {
        Ok(None)
    }
}

/// Creates `dir` (and its parents) with mode 0700 if missing.
pub(crate) fn create_dir(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(dir, e))
}

/// Takes an exclusive lock on `dir/.lock`, held while the returned file is open, so that two
/// processes never append to the same chain. The kernel releases it when a process dies.
pub(crate) fn lock_dir(dir: &Path) -> Result<File, Error> {
    let path = dir.join(".lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    // SAFETY: flock on a descriptor we own; it has no memory effects.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Err(Error::Locked {
                path: dir.to_path_buf(),
            });
        }
        return Err(Error::io(&path, err));
    }
    Ok(f)
}

/// Creates the file for a chain segment starting at `seq` (mode 0600), and syncs the directory
/// so that the new name survives a power cut.
pub(crate) fn create_file(dir: &Path, seq: u64) -> Result<(PathBuf, File), Error> {
    let path = dir.join(file_name(seq));
    let f = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    if let Err(e) = sync_dir(dir) {
        // Not left behind: a later attempt (a full disk is waited for) creates it again.
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok((path, f))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// The file the writer appends to after a restart.
#[derive(Debug)]
pub(crate) struct Current {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
    /// The time of the file's first record, for `rotate_age`.
    pub started: SystemTime,
}

/// Where the chain stands in a directory.
#[derive(Debug, Default)]
pub(crate) struct Resumed {
    /// The seq and hash of the last complete record, if there is one.
    pub last: Option<(u64, String)>,
    /// The file to continue.
    pub current: Option<Current>,
}

/// Where the chain stands in `dir`: the last complete record's seq and hash, and the file to
/// continue. Trailing empty files are removed, and a torn last line is truncated away.
pub(crate) fn resume(dir: &Path) -> Result<Resumed, Error> {
    let mut files = list_dir(dir)?;
    while let Some((named, path)) = files.pop() {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        let (good, last) = last_complete_line(&mut file, len).map_err(|e| Error::io(&path, e))?;
        if good < len {
            tracing::warn!(
                file = %path.display(),
                bytes = len - good,
                "audit: truncating a torn last line (the writer stopped mid-record)"
            );
            file.set_len(good)
                .and_then(|_| file.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
        let Some(line) = last else {
            tracing::warn!(file = %path.display(), "audit: removing an empty audit file");
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            sync_dir(dir)?;
            continue;
        };
        let (link, _) = check_line(&line).map_err(|bad| Error::Corrupt {
            file: path.clone(),
            line: count_lines(&path).unwrap_or(0),
            reason: format!(
                "the last record cannot continue the chain: {}; run `portcullis audit verify`",
                bad.reason
            ),
        })?;
        let first = first_line(&path)?.and_then(|l| serde_json::from_slice::<Value>(&l).ok());
        // The file to continue must be the one its name says: a file renamed (swapped with
        // another, restored under another name) would fork the chain, or make the next
        // rotation collide with an existing file and every audited request fail.
        let first_seq = first
            .as_ref()
            .and_then(|v| v.get("seq"))
            .and_then(Value::as_u64);
        if first_seq != Some(named) || link.seq < named {
            return Err(Error::Corrupt {
                file: path.clone(),
                line: 1,
                reason: format!(
                    "the file's name says its first record is seq {named}, but it holds seq {} to {}: it was renamed or replaced; run `portcullis audit verify`",
                    first_seq.map_or("?".into(), |s| s.to_string()),
                    link.seq
                ),
            });
        }
        let started = first
            .and_then(|v| {
                v.get("time")
                    .and_then(Value::as_str)
                    .and_then(|t| humantime::parse_rfc3339(t).ok())
            })
            .unwrap_or_else(SystemTime::now);
        let current = Current {
            path,
            file,
            len: good,
            started,
        };
        return Ok(Resumed {
            last: Some((link.seq, link.hash)),
            current: Some(current),
        });
    }
    Ok(Resumed::default())
}

fn count_lines(path: &Path) -> io::Result<usize> {
    let data = fs::read(path)?;
    Ok(data.iter().filter(|&&b| b == b'\n').count())
}

/// The length of the file up to its last `\n`, and the last complete line (without `\n`).
/// Reads backwards from the end in growing windows, so a large file costs little.
fn last_complete_line(f: &mut File, len: u64) -> io::Result<(u64, Option<Vec<u8>>)> {
    let mut window: u64 = 64 * 1024;
    loop {
        let start = len.saturating_sub(window);
        let mut buf = vec![0u8; (len - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf)?;
        match buf.iter().rposition(|&b| b == b'\n') {
            None if start == 0 => return Ok((0, None)),
            None => {}
            Some(end) => {
                let good = start + end as u64 + 1;
                match buf[..end].iter().rposition(|&b| b == b'\n') {
                    Some(q) => return Ok((good, Some(buf[q + 1..end].to_vec()))),
                    None if start == 0 => return Ok((good, Some(buf[..end].to_vec()))),
                    None => {}
                }
            }
        }
        window *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn names_sort_in_seq_order_and_parse_back() {
        assert_eq!(file_name(42), "audit-0000000000000042.jsonl");
        assert_eq!(parse_name("audit-0000000000000042.jsonl"), Some(42));
        assert_eq!(parse_name("audit-.jsonl"), None);
        assert_eq!(parse_name("audit-12x.jsonl"), None);
        assert_eq!(parse_name("other.jsonl"), None);
        assert!(file_name(9) < file_name(10));
    }

    #[test]
    fn last_complete_line_handles_torn_tails_and_long_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let long = "x".repeat(200_000);
        fs::write(&p, format!("a\n{long}\ntorn")).unwrap();
        let mut f = File::open(&p).unwrap();
        let len = f.metadata().unwrap().len();
        let (good, last) = last_complete_line(&mut f, len).unwrap();
        assert_eq!(good, len - 4);
        assert_eq!(last.unwrap(), long.as_bytes());

        fs::write(&p, "only\n").unwrap();
        let (good, last) = last_complete_line(&mut File::open(&p).unwrap(), 5).unwrap();
        assert_eq!((good, last.unwrap()), (5, b"only".to_vec()));

        fs::write(&p, "torn").unwrap();
        let (good, last) = last_complete_line(&mut File::open(&p).unwrap(), 4).unwrap();
        assert_eq!((good, last), (0, None));
    }

    #[test]
    fn files_and_dirs_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        create_dir(&dir).unwrap();
        let (path, mut f) = create_file(&dir, 1).unwrap();
        f.write_all(b"x").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert!(create_file(&dir, 1).is_err(), "never overwrite a file");
    }

    #[test]
    fn the_lock_is_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let held = lock_dir(tmp.path()).unwrap();
        assert!(matches!(lock_dir(tmp.path()), Err(Error::Locked { .. })));
        drop(held);
        lock_dir(tmp.path()).unwrap();
    }

    #[test]
    fn expand_orders_by_first_record_and_drops_duplicates() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::write(d.join(file_name(11)), "{\"seq\":11}\n").unwrap();
        fs::write(d.join(file_name(1)), "{\"seq\":1}\n").unwrap();
        fs::write(d.join("notes.txt"), "x").unwrap();
        let got = expand(&[d.join(file_name(11)), d.to_path_buf()]).unwrap();
        assert_eq!(got, vec![d.join(file_name(1)), d.join(file_name(11))]);
    }

    #[test]
    fn resume_in_an_empty_dir_starts_fresh() {
        let tmp = tempfile::tempdir().unwrap();
        let r = resume(tmp.path()).unwrap();
        assert!(r.last.is_none() && r.current.is_none());
    }
}
