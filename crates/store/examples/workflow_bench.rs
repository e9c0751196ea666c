//! Durable workflow transitions per second on the embedded store (BENCHMARKS.md, "Workflows"):
//! a Pass-only chain of `STATES` states, run by `EXECUTIONS` concurrent executions through the
//! real runner on a real SQLite file (WAL, `synchronous=FULL`), every transition committed
//! before the next (group commit: one transaction per round across executions). Then one
//! execution alone, for the latency of one committed transition.
//!
//! `cargo run --release -p portcullis-store --example workflow_bench [-- STATES EXECUTIONS]`

use portcullis_automation::workflow::memstore::MemoryWorkflowStore;
use portcullis_automation::workflow::runner::{Loaded, Runner, Starter};
use portcullis_automation::workflow::store::WorkflowStore;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

fn chain(n: usize) -> Value {
    let mut states = Map::new();
    for i in 0..n {
        let mut s = json!({ "Type": "Pass" });
        if i + 1 == n {
            s["End"] = json!(true);
        } else {
            s["Next"] = json!(format!("S{}", i + 1));
        }
        states.insert(format!("S{i}"), s);
    }
    json!({ "StartAt": "S0", "States": states })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Runs `executions` executions of the chain to the end: (transitions, seconds).
fn run(store: Arc<dyn WorkflowStore>, states: usize, executions: usize) -> (usize, f64) {
    let runner = Runner::new(store, vec![Loaded::new("chain", chain(states)).unwrap()]);
    let by = Starter {
        principal: "bench".into(),
        ..Starter::default()
    };
    for _ in 0..executions {
        runner
            .start("chain", None, json!({ "n": 1 }), &by, now_ms())
            .unwrap();
    }
    let t = Instant::now();
    let mut transitions = 0;
    let mut closed = 0;
    while closed < executions {
        let tick = runner.tick(now_ms(), executions).unwrap();
        transitions += tick.transitions;
        closed += tick.closed.len();
    }
    (transitions, t.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let states = args.first().copied().unwrap_or(1000);
    let executions = args.get(1).copied().unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn WorkflowStore> =
        Arc::new(portcullis_store::Store::open(dir.path()).unwrap());
    let (n, secs) = run(store, states, executions);
    println!("sqlite  {executions} executions x {states} Pass states: {n} committed transitions in {secs:.2} s = {:.0}/s", n as f64 / secs);
    let dir1 = tempfile::tempdir().unwrap();
    let store: Arc<dyn WorkflowStore> =
        Arc::new(portcullis_store::Store::open(dir1.path()).unwrap());
    let (n, secs) = run(store, states, 1);
    println!("sqlite  1 execution x {states} Pass states: {n} committed transitions in {secs:.2} s = {:.0}/s, {:.2} ms per transition", n as f64 / secs, secs * 1000.0 / n as f64);
    let (n, secs) = run(Arc::new(MemoryWorkflowStore::new()), states, executions);
    println!("memory  {executions} executions x {states} Pass states: {n} transitions in {secs:.2} s = {:.0}/s (the interpreter alone)", n as f64 / secs);
}
