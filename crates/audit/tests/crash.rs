//! kill -9 under load with `fsync: every_record`: a child process (this test binary, run again
//! with an environment variable) records in a loop and prints every acknowledged request id;
//! the parent kills it with SIGKILL, then checks that the chain verifies and that every
//! acknowledged record is in the files, and that a new writer continues the chain.

mod common;

use common::{cfg, rec};
use portcullis_audit::{search, verify, Auditor, Filter};
use portcullis_config::{Fsync, Size};
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHILD_DIR: &str = "PORTCULLIS_AUDIT_CRASH_CHILD_DIR";

/// The child's entry point; a no-op in a normal test run.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut c = cfg(dir.as_ref(), Fsync::EveryRecord);
        c.rotate_size = Size(16 * 1024);
        let a = Auditor::start(&c, "crash").unwrap();
        let mut tasks = Vec::new();
        for w in 0..8 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("w{w}-{i}");
                    a.record(rec(&id, "alice")).await.unwrap();
                    let mut out = std::io::stdout().lock();
                    out.write_all(format!("ack {id}\n").as_bytes()).unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR, tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut acked = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // A line cut by the kill has no newline: not a complete acknowledgement.
            if line.last() != Some(&b'\n') {
                break;
            }
            if let Some(id) = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.strip_prefix("ack "))
            {
                acked.push(id.trim_end().to_string());
                let _ = tx.send(());
            }
        }
        acked
    });

    // Let it run until it has acknowledged a good number of records (or for 5 s at most).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = 0;
    while seen < 1500 && Instant::now() < deadline {
        if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            seen += 1;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let acked = reader.join().unwrap();
    assert!(
        acked.len() >= 20,
        "only {} records acknowledged",
        acked.len()
    );

    let dir = [tmp.path().to_path_buf()];
    let report = verify(&dir).unwrap_or_else(|e| panic!("verify after kill -9: {e}"));
    let stored: HashSet<String> = search(&dir, &Filter::default())
        .unwrap()
        .into_iter()
        .filter_map(|v| v["request_id"].as_str().map(String::from))
        .collect();
    eprintln!(
        "{} acknowledged, {} in {} files, warnings: {:?}",
        acked.len(),
        report.records,
        report.files,
        report.warnings
    );
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but not in the files: {lost:?}"
    );
    assert!(report.records as usize >= acked.len());
    assert!(report.files >= 2, "rotation happened under load");

    // A new writer cuts off any torn line and continues the chain.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let a = Auditor::start(&cfg(tmp.path(), Fsync::EveryRecord), "after").unwrap();
        a.record(rec("after", "alice")).await.unwrap();
    });
    let again = verify(&dir).unwrap();
    assert_eq!(again.last_seq, report.last_seq + 1);
    assert!(
        again.warnings.iter().all(|w| !w.contains("torn")),
        "{:?}",
        again.warnings
    );
}
