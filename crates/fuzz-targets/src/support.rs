//! Helpers shared by the targets: driving a future that never waits on I/O, a scratch
//! directory that lives as long as the process, splitting an input into sections, and a
//! deterministic way to cut a byte stream into reads.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

fn noop_raw() -> RawWaker {
    fn clone(_: *const ()) -> RawWaker {
        noop_raw()
    }
    fn noop(_: *const ()) {}
    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, noop, noop, noop);
    RawWaker::new(std::ptr::null(), &VTABLE)
}

/// A waker that does nothing: the futures driven here never wait on anything.
pub fn noop_waker() -> Waker {
    // SAFETY: the vtable's functions ignore the (null) data pointer and do nothing.
    unsafe { Waker::from_raw(noop_raw()) }
}

/// Runs a future that does no I/O (such as token validation against an inline key set) to
/// completion. Still pending after many polls means it waits for something that will never
/// come: a hang, and a finding.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut f = pin!(f);
    for _ in 0..1000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("a future that does no I/O is still pending after 1000 polls");
}

/// A directory for this process's scratch files, removed never (the OS cleans it); each
/// target works in its own subdirectory, created on first use. In memory (`/dev/shm`) where
/// the machine has it: targets that write a file per input (`audit_records`) then run at the
/// speed of their parser, not of the disk.
pub fn scratch(target: &str) -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let mut b = tempfile::Builder::new();
        b.prefix("portcullis-fuzz-");
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            b.tempdir_in(shm).or_else(|_| b.tempdir())
        } else {
            b.tempdir()
        }
        .expect("a scratch directory");
        // Kept for the life of the process: every iteration reuses it.
        dir.keep()
    });
    let dir = root.join(target);
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).expect("a scratch subdirectory");
    }
    dir
}

/// Copies the files of `from` (recursively, regular files only) into `to`.
pub fn copy_tree(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    let _ = std::fs::create_dir_all(to);
    for e in entries.flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        match e.file_type() {
            Ok(t) if t.is_dir() => copy_tree(&src, &dst),
            Ok(t) if t.is_file() => {
                let _ = std::fs::copy(&src, &dst);
            }
            _ => {}
        }
    }
}

/// The repository's `examples/` directory, when the crate is built from the repository.
pub fn examples_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    dir.is_dir().then_some(dir)
}

/// Splits `data` at each line `---` (`\n---\n`), into at most `n` sections; the last one
/// keeps the rest.
pub fn sections(data: &[u8], n: usize) -> Vec<&[u8]> {
    const SEP: &[u8] = b"\n---\n";
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// Cuts `data` into reads whose sizes follow from `seed` (1 to 16 bytes, then repeating), so
/// that a target can compare what a parser makes of one read with what it makes of many.
pub fn reads(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut state = u32::from(seed) | 1;
    let mut rest = data;
    while !rest.is_empty() {
        // A small LCG: deterministic for a given seed, varied enough to cut anywhere.
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) % 16 + 1) as usize;
        let n = n.min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// The text of `data` when it is UTF-8.
pub fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_split_at_dashes() {
        assert_eq!(
            sections(b"a\n---\nb\n---\nc", 2),
            vec![&b"a"[..], b"b\n---\nc"]
        );
        assert_eq!(sections(b"a", 3), vec![&b"a"[..]]);
    }

    #[test]
    fn reads_cover_the_input() {
        let data: Vec<u8> = (0..=255).collect();
        for seed in [0, 1, 7, 255] {
            assert_eq!(reads(&data, seed).concat(), data);
        }
    }
}
