//! The writer's disk: the two file system calls it makes on the audit file (append and
//! sync), which failures count as a full disk, and the pace at which `on_overload: wait`
//! tries again while the disk is full.
//!
//! * **A full disk** is `ENOSPC` (no space left on the device) or `EDQUOT` (the user's quota
//!   is used up). Both are cured by freeing space, so `on_overload: wait` holds the records
//!   and tries again. Every other error (`EIO`, `EROFS` after the kernel remounted the file
//!   system read-only, `EBADF`, ...) is reported at once, as with `fail_closed`: such disks
//!   rarely heal by themselves, and waiting would hang every audited request until shutdown.
//! * **The pace** of the attempts while the disk is full: 100 ms after the failure, then
//!   twice as long each time, up to one attempt a second.
//! * **The seam.** Outside tests [`Disk`] is zero-sized and calls the file system directly.
//!   Under test it can be told to fail like a full disk does (half of the bytes written, then
//!   `ENOSPC`), so that the wait, cut-back and retry path is tested without a full disk.

use std::fs::File;
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// The first pause after a write failed on a full disk...
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// ... and the longest, reached by doubling.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// Whether `e` means the disk (or the quota) is full, which freeing space cures.
pub(crate) fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// The file system calls the writer makes on the audit file.
#[derive(Default)]
pub(crate) struct Disk {
    #[cfg(test)]
    pub faults: std::sync::Arc<faults::Faults>,
}

impl Disk {
    /// Appends all of `buf` (the file is opened in append mode). On an error, part of
    /// `buf` may have reached the file: the caller cuts it back off.
    pub fn append(&self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if let Some(errno) = self.faults.write_fault() {
            // A write that runs out of space mid-way: the first half lands, then the error.
            file.write_all(&buf[..buf.len() / 2])?;
            return Err(io::Error::from_raw_os_error(errno));
        }
        file.write_all(buf)
    }

    /// Syncs the file's data.
    pub fn sync(&self, file: &File) -> io::Result<()> {
        #[cfg(test)]
        if let Some(errno) = self.faults.sync_fault() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        file.sync_data()
    }
}

/// The writer waiting for space: since when, how many records it holds, and the pause
/// before the next attempt.
pub(crate) struct Waiting {
    pub since: Instant,
    pub records: usize,
    pause: Duration,
}

impl Waiting {
    pub fn new(records: usize) -> Waiting {
        Waiting {
            since: Instant::now(),
            records,
            pause: FIRST_PAUSE,
        }
    }

    /// The pause before the next attempt: 100 ms, 200 ms, 400 ms, 800 ms, then 1 s.
    pub fn next_pause(&mut self) -> Duration {
        let p = self.pause;
        self.pause = (p * 2).min(MAX_PAUSE);
        p
    }
}

#[cfg(test)]
pub(crate) mod faults {
    //! Failures that tests switch on and off, as a disk fills up and is freed again.
    use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

    #[derive(Default)]
    pub struct Faults {
        /// While not 0, every append writes half of its bytes and fails with this errno.
        write_errno: AtomicI32,
        /// While not 0, every sync fails with this errno.
        sync_errno: AtomicI32,
        /// Failures injected so far.
        injected: AtomicU64,
    }

    impl Faults {
        pub fn fail_writes(&self, errno: i32) {
            self.write_errno.store(errno, Ordering::SeqCst);
        }
        pub fn fail_syncs(&self, errno: i32) {
            self.sync_errno.store(errno, Ordering::SeqCst);
        }
        pub fn injected(&self) -> u64 {
            self.injected.load(Ordering::SeqCst)
        }
        fn take(&self, errno: &AtomicI32) -> Option<i32> {
            let e = errno.load(Ordering::SeqCst);
            (e != 0).then(|| {
                self.injected.fetch_add(1, Ordering::SeqCst);
                e
            })
        }
        pub(super) fn write_fault(&self) -> Option<i32> {
            self.take(&self.write_errno)
        }
        pub(super) fn sync_fault(&self) -> Option<i32> {
            self.take(&self.sync_errno)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_full_disk_or_quota_is_waited_for() {
        assert!(is_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(is_full(&io::Error::from_raw_os_error(libc::EDQUOT)));
        assert!(!is_full(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(!is_full(&io::Error::from_raw_os_error(libc::EROFS)));
        assert!(!is_full(&io::Error::other("disk full")));
    }

    #[test]
    fn the_pause_doubles_up_to_a_second() {
        let mut w = Waiting::new(3);
        let got: Vec<u128> = (0..7).map(|_| w.next_pause().as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000, 1000]);
    }
}
