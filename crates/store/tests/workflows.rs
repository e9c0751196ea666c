//! The SQLite [`WorkflowStore`]: the conformance checks it shares with the in-memory store,
//! and what only a file shows: everything survives reopening, two handles on one file never
//! lease one execution at once, and the rate of group commits (printed, not asserted).

use portcullis_automation::workflow::memstore::conformance::{self, close, event, execution, step};
use portcullis_automation::workflow::store::{
    Commit, ListFilter, SignalKind, StartOutcome, Status, WorkflowStore,
};
use portcullis_store::Store;
use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

fn open() -> (tempfile::TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    (tmp, store)
}

fn started(s: &dyn WorkflowStore, id: &str, wake_at: Option<i64>) {
    let new = execution(id, "wf", id, "{}", 0, wake_at);
    assert_eq!(s.start(new).unwrap(), StartOutcome::Started(id.into()));
}

/// Rows in `table`, read straight from the file.
fn count(dir: &Path, table: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(portcullis_store::FILE_NAME)).unwrap();
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

#[test]
fn conforms() {
    for (name, check) in conformance::CHECKS {
        eprintln!("check: {name}");
        let (_tmp, store) = open();
        check(&store);
    }
}

#[test]
fn everything_survives_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    started(&store, "a", Some(0));
    started(&store, "b", None);
    started(&store, "c", Some(0));
    let stop = SignalKind::Stop {
        error: "Admin.Stop".into(),
        cause: "by \"alice\"".into(),
    };
    assert!(store.signal("b", stop.clone(), 10).unwrap());
    assert_eq!(store.lease("r", 20, 1_000, 10).unwrap().len(), 3);
    let mut done = close("c", "r", Status::Succeeded, 30, vec![event(2, 30, "Done")]);
    done.output = Some(r#"{"n":1}"#.into());
    let batch = [
        step(
            "a",
            "r",
            r#"{"at":"B"}"#,
            Some(500),
            vec![event(2, 25, "X")],
            900,
        ),
        done,
    ];
    assert_eq!(store.commit(&batch).unwrap(), [true, true]);
    let (a, c) = (store.get("a").unwrap(), store.get("c").unwrap());
    let history = store.history("a", 0, 0).unwrap();
    drop(store);

    let store = Store::open(tmp.path()).unwrap();
    assert_eq!(store.get("a").unwrap(), a);
    assert_eq!(store.get("c").unwrap(), c);
    assert_eq!(c.unwrap().output.as_deref(), Some(r#"{"n":1}"#));
    assert_eq!(store.history("a", 0, 0).unwrap(), history);
    assert_eq!(store.find("wf", "b").unwrap().unwrap().id, "b");
    assert_eq!(store.list(&ListFilter::default()).unwrap().len(), 3);
    // The leases survive too: r2 gets b (leased until 1020, woken at 10 by its signal) only
    // once that lease ends, and a (leased until 900, due at 500) once due and free.
    assert!(store.lease("r2", 899, 1_000, 10).unwrap().is_empty());
    let leased = store.lease("r2", 1_020, 1_000, 10).unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.row.id.as_str()).collect();
    assert_eq!(ids, ["b", "a"]);
    assert_eq!(leased[0].signals.len(), 1);
    assert_eq!(
        (leased[0].signals[0].at, &leased[0].signals[0].kind),
        (10, &stop)
    );
}

#[test]
fn prune_deletes_the_rows_of_history_and_signals() {
    let (tmp, s) = open();
    started(&s, "a", Some(0));
    started(&s, "b", Some(0));
    for id in ["a", "b"] {
        assert!(s
            .signal(id, SignalKind::Heartbeat { token: "t".into() }, 0)
            .unwrap());
    }
    s.lease("r", 0, 1_000, 10).unwrap();
    let closing = close("a", "r", Status::Failed, 5, vec![event(2, 5, "Failed")]);
    assert_eq!(s.commit(&[closing]).unwrap(), [true]);
    assert_eq!(count(tmp.path(), "workflow_history"), 3);
    assert_eq!(count(tmp.path(), "workflow_signals"), 2);
    assert_eq!(s.prune(10).unwrap(), 1);
    assert_eq!(count(tmp.path(), "workflow_executions"), 1);
    assert_eq!(count(tmp.path(), "workflow_history"), 1);
    assert_eq!(count(tmp.path(), "workflow_signals"), 1);
}

#[test]
fn errors_say_what_failed_and_where() {
    let (tmp, s) = open();
    started(&s, "a", Some(0));
    s.lease("r", 0, 1_000, 10).unwrap();
    let dup = step("a", "r", "{}", None, vec![event(1, 0, "Again")], 1_000);
    let msg = s.commit(&[dup]).unwrap_err().to_string();
    assert!(msg.starts_with("workflow store: "), "{msg}");
    assert!(msg.contains("committing workflow transitions"), "{msg}");
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
    // Another execution with an existing id.
    let new = execution("a", "wf", "other", "{}", 0, None);
    let msg = s.start(new).unwrap_err().to_string();
    assert!(msg.contains("starting a workflow execution"), "{msg}");
}

#[test]
fn two_handles_never_lease_one_execution_at_once() {
    const EXECUTIONS: usize = 120;
    const ROUNDS: i64 = 15;
    const ROUND_MS: i64 = 1_000_000;
    let tmp = tempfile::tempdir().unwrap();
    let stores = [
        Store::open(tmp.path()).unwrap(),
        Store::open(tmp.path()).unwrap(),
    ];
    let all: HashSet<String> = (0..EXECUTIONS).map(|i| format!("e{i:03}")).collect();
    for id in &all {
        started(&stores[0], id, Some(0));
    }
    for round in 1..=ROUNDS {
        // Every lease of the round before has ended by `now`; each handle takes a few at a
        // time until none is left.
        let now = round * ROUND_MS;
        let taken: Vec<Vec<String>> = std::thread::scope(|scope| {
            let runners: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(i, store)| {
                    scope.spawn(move || {
                        let mut mine = Vec::new();
                        for call in 0.. {
                            // An owner may lease its own again: each call is another owner.
                            let owner = format!("runner-{i}-{call}");
                            let leased = store.lease(&owner, now, ROUND_MS / 2, 3).unwrap();
                            if leased.is_empty() {
                                return mine;
                            }
                            mine.extend(leased.into_iter().map(|l| l.row.id));
                        }
                        unreachable!()
                    })
                })
                .collect();
            runners.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let (a, b): (HashSet<_>, HashSet<_>) = (
            taken[0].iter().cloned().collect(),
            taken[1].iter().cloned().collect(),
        );
        assert_eq!(a.len() + b.len(), EXECUTIONS, "round {round}: leased twice");
        assert!(a.is_disjoint(&b), "round {round}: {:?}", a.intersection(&b));
        assert_eq!(&a | &b, all, "round {round}");
    }
}

#[test]
fn group_commit_throughput() {
    const EXECUTIONS: usize = 100;
    const BATCHES: u64 = 100;
    let (_tmp, s) = open();
    let ids: Vec<String> = (0..EXECUTIONS).map(|i| format!("exec-{i:03}")).collect();
    for id in &ids {
        started(&s, id, Some(0));
    }
    assert_eq!(
        s.lease("runner", 0, 1 << 40, EXECUTIONS).unwrap().len(),
        EXECUTIONS
    );
    let state = format!(r#"{{"at":"Step","input":"{}"}}"#, "x".repeat(200));
    let batches: Vec<Vec<Commit>> = (0..BATCHES)
        .map(|b| {
            ids.iter()
                .map(|id| {
                    let first = 2 + 2 * b;
                    let t = b as i64;
                    let mut c = step(
                        id,
                        "runner",
                        &state,
                        Some(t + 1),
                        vec![
                            event(first, t, "TaskStateExited"),
                            event(first + 1, t, "TaskStateEntered"),
                        ],
                        1 << 40,
                    );
                    c.consumed_signals = Some(0);
                    c
                })
                .collect()
        })
        .collect();
    let began = Instant::now();
    for batch in &batches {
        let applied = s.commit(batch).unwrap();
        assert!(applied.iter().all(|a| *a));
    }
    let elapsed = began.elapsed();
    let transitions = EXECUTIONS as f64 * BATCHES as f64;
    println!(
        "group commit: {transitions} transitions ({} history rows) in {BATCHES} batches of \
         {EXECUTIONS}: {:.3} s, {:.0} transitions/s, {:.2} ms/batch",
        transitions * 2.0,
        elapsed.as_secs_f64(),
        transitions / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1_000.0 / BATCHES as f64,
    );
    let row = s.get(&ids[0]).unwrap().unwrap();
    assert_eq!(row.history_len, 1 + 2 * BATCHES);
    assert_eq!(
        s.history(&ids[0], 0, 0).unwrap().len() as u64,
        row.history_len
    );
}
