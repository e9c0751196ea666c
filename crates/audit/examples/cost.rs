//! Measures the CPU the audit trail costs per record: 64 tasks on one runtime thread write
//! records like a request's through an [`Auditor`] (file sink, `fsync: interval`), each
//! waiting for its acknowledgement as a request does. Prints records per second and the
//! process's CPU time per record.
//!
//! `cargo run --release -p portcullis-audit --example cost [RECORDS]`

use portcullis_audit::{Auditor, Decision, Principal, Record};

/// The proxy's allocator: with glibc's, the figure would be mostly malloc's arena locks
/// between the runtime thread and the writer thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Instant;

fn cpu_us() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 * 1e6 + v.tv_usec as f64;
    t(u.ru_utime) + t(u.ru_stime)
}

fn record(i: u64) -> Record {
    Record {
        request_id: Some(format!("01JF3Z6Q8WJ4C1S0000000{i:06}")),
        app: Some("default".to_string()),
        route: Some("jwt".to_string()),
        client_ip: Some("127.0.0.1".to_string()),
        method: Some("GET".to_string()),
        host: Some("127.0.0.1:24685".to_string()),
        path: Some("/".to_string()),
        principal: Some(Principal {
            user: "bench-user".into(),
            provider: "bench".into(),
            groups: vec!["engineering".into()],
            subject: "bench-user".into(),
        }),
        decision: Some(Decision::Allow),
        reasons: vec!["policy0".into()],
        latency_us: Some(12),
        ..Record::default()
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300_000);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = portcullis_config::AuditCfg {
            dir: dir.path().to_string_lossy().into_owned(),
            ..Default::default()
        };
        let a = Auditor::start(&cfg, "bench").unwrap();
        let (t, c) = (Instant::now(), cpu_us());
        let tasks: Vec<_> = (0..64)
            .map(|k| {
                let a = a.clone();
                tokio::spawn(async move {
                    for i in (k..n).step_by(64) {
                        a.record(record(i)).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_us() - c);
        println!(
            "{n} records: {:.0}/s, {:.2} µs of CPU per record",
            n as f64 / wall,
            cpu / n as f64
        );
    });
}
