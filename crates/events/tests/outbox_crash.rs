//! Events pending at a crash are delivered after it. A child process (this test binary,
//! run again with an environment variable telling it to be the child) publishes events to a
//! durable webhook whose receiver is down, waits until they are all in the outbox, says so
//! with their ids, and is killed with SIGKILL. The parent checks they are still in the
//! store, starts the receiver on the port the child used, opens a new bus over the same
//! store, and receives every event once, with its original id and a valid signature.

mod support;

use portcullis_events::{Bus, EventsCfg, ServerChange, ServerData, Source};
use portcullis_store::Store;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{wait_until, Receiver, SECRET};

/// In the child: `<state dir>|<receiver port>`.
const CHILD_ENV: &str = "PORTCULLIS_EVENTS_CRASH_CHILD";
const EVENTS: usize = 25;

fn config(port: u16) -> EventsCfg {
    serde_yaml_ng::from_str(&format!(
        r#"
sinks:
  - name: hooks
    webhook:
      url: "http://127.0.0.1:{port}/hook"
      secret: "{SECRET}"
      timeout: 500ms
      backoff: {{ min: 50ms, max: 200ms }}
"#
    ))
    .unwrap()
}

/// The child: publish with the receiver down, wait for the outbox, print the ids, hang.
fn child(dir: &Path, port: u16) -> ! {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(dir).unwrap();
        let bus = Bus::from_config(&config(port), Some(&store)).await.unwrap();
        let source = Source::new("portcullis://crash-child");
        let mut ids = Vec::new();
        for i in 0..EVENTS {
            let e = source.server(
                ServerChange::Down,
                ServerData::new("b", format!("10.0.0.{i}:80"), "down", 0, EVENTS as u32),
            );
            ids.push(e.id.clone());
            bus.publish(e);
        }
        wait_until(Duration::from_secs(10), "the outbox", || {
            store.outbox_count("hooks").unwrap() == EVENTS as u64
        })
        .await;
        // Let the delivery loop fail at least once, so rows carry attempts and backoff.
        wait_until(Duration::from_secs(10), "a failed attempt", || {
            bus.sink_stats("hooks").unwrap().retried > 0
        })
        .await;
        println!("ids {}", ids.join(","));
        println!("queued");
        std::future::pending::<()>().await;
    });
    unreachable!()
}

#[test]
fn events_pending_at_a_kill_are_delivered_after_a_restart() {
    if let Ok(arg) = std::env::var(CHILD_ENV) {
        let (dir, port) = arg.split_once('|').unwrap();
        child(Path::new(dir), port.parse().unwrap());
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let mut kid = Command::new(std::env::current_exe().unwrap())
        .args([
            "events_pending_at_a_kill_are_delivered_after_a_restart",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD_ENV, format!("{}|{port}", tmp.path().display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Read the child's lines on a thread, so a child that hangs fails the test instead.
    let stdout = kid.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ids = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(list) = line.strip_prefix("ids ") {
                ids = Some(list.split(',').map(str::to_owned).collect::<BTreeSet<_>>());
            }
            if line.trim() == "queued" {
                break;
            }
        }
        let _ = tx.send(ids);
    });
    let ids = rx
        .recv_timeout(Duration::from_secs(60))
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            let _ = kid.kill();
            panic!("the child never said it queued its events");
        });
    assert_eq!(ids.len(), EVENTS);
    kid.kill().unwrap(); // SIGKILL: no destructor, no flush, no shutdown.
    let status = kid.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }

    // Everything is still in the outbox.
    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.outbox_count("hooks").unwrap(), EVENTS as u64);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(restart(store, port, ids));
}

/// The parent, after the kill.
async fn restart(store: Store, port: u16, ids: BTreeSet<String>) {
    // The receiver comes up; a new bus over the same store delivers what is pending.
    let receiver = Receiver::start(port).await;
    let bus = Bus::from_config(&config(port), Some(&store)).await.unwrap();
    wait_until(Duration::from_secs(15), "every pending event", || {
        receiver.events().len() >= EVENTS
    })
    .await;
    let got: BTreeSet<_> = receiver.events().into_iter().map(|r| r.id).collect();
    assert_eq!(got, ids, "every event, with its original id");
    {
        let log = receiver.log.lock();
        assert_eq!((log.bad_signatures, log.duplicates), (0, 0));
        assert!(log
            .events
            .iter()
            .all(|r| r.source == "portcullis://crash-child" && r.data["backend"] == "b"));
    }
    wait_until(Duration::from_secs(5), "the outbox to empty", || {
        store.outbox_count("hooks").unwrap() == 0
    })
    .await;
    assert_eq!(bus.sink_stats("hooks").unwrap().delivered, EVENTS as u64);
    assert!(bus.shutdown(Duration::from_secs(5)).await);
}
