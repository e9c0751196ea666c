//! The store keeps what it flushed through a crash. A child process (this test binary, run
//! again with an environment variable telling it to be the child) opens the store, flushes,
//! prints "flushed" and waits; the parent kills it with SIGKILL (no destructor, no close, the
//! WAL not checkpointed), reopens the store and finds every row.

use portcullis_store::{Store, UsageQuery};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Set in the child to the state directory it should write.
const CHILD_ENV: &str = "PORTCULLIS_STORE_CRASH_CHILD";
const ROWS: i64 = 500;

fn key(i: i64) -> Vec<u8> {
    format!("\0key-{i}").into_bytes()
}

/// The child: flush, say so, then wait to be killed.
fn child(dir: &Path) -> ! {
    let store = Store::open(dir).expect("child opens the store");
    let quotas: Vec<_> = (0..ROWS).map(|i| (key(i), 1_000, i as u64 + 1)).collect();
    let usage: Vec<_> = (0..ROWS)
        .map(|i| (key(i), 20_000, 2 * i as u64 + 1))
        .collect();
    store
        .flush(&[("gold", &quotas)], &[("gold", &usage)])
        .expect("child flushes");
    // A second, separate commit, so more than one transaction sits in the WAL.
    store
        .add_usage("gold", &[(key(0), 20_001, 7)])
        .expect("child adds usage");
    println!("flushed");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn a_killed_process_loses_nothing_it_flushed() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut kid = Command::new(std::env::current_exe().unwrap())
        .args([
            "a_killed_process_loses_nothing_it_flushed",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD_ENV, tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Wait for "flushed" on another thread, so a child that hangs fails the test instead.
    let stdout = kid.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let flushed = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.trim() == "flushed");
        let _ = tx.send(flushed);
    });
    let flushed = rx.recv_timeout(Duration::from_secs(120)).unwrap_or(false);
    if !flushed {
        let _ = kid.kill();
        panic!("the child never said it flushed");
    }
    kid.kill().unwrap(); // SIGKILL
    let status = kid.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
    #[cfg(not(unix))]
    assert!(!status.success());

    // The WAL is still beside the database: nothing checkpointed or closed it.
    assert!(tmp.path().join("portcullis.db-wal").exists());
    let store = Store::open(tmp.path()).unwrap();
    let quotas = store.load_quotas("gold", 0).unwrap();
    assert_eq!(quotas.len(), ROWS as usize);
    assert!(quotas.contains(&(key(499), 1_000, 500)));
    let usage = store
        .usage(&UsageQuery {
            plan: Some("gold"),
            key: None,
            from_day: 20_000,
            to_day: 20_001,
        })
        .unwrap();
    assert_eq!(usage.len(), ROWS as usize + 1);
    let total: u64 = usage.iter().map(|r| r.count).sum();
    assert_eq!(total, (ROWS * ROWS) as u64 + 7);
}

#[test]
fn data_survives_a_store_that_is_never_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    store.save_quotas("gold", &[(key(1), 5, 5)]).unwrap();
    // Leak the handle: the connection is never closed, as after a crash.
    std::mem::forget(store);
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.load_quotas("gold", 0).unwrap(), vec![(key(1), 5, 5)]);
}
