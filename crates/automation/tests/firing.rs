//! Running firings: exactly once through the firing store (retries, restarts, replicas), the
//! `max_unavailable` guard rail, policy denials and dry runs through a `Control`.

mod common;

use common::{engine, t, Ev};
use portcullis_automation::{
    execute, may_take_out, Action, ActionError, Control, Firing, FiringStore, MaxUnavailable,
    MemoryFiringStore, Outcome, ServerState, ServerView,
};
use serde_json::json;
use std::collections::HashMap;

const DRAIN: &str = r#"
- name: drain-on-errors
  match: { type: dev.portcullis.server.errors }
  threshold: 2
  within: 1m
  for_each: data.server
  actions:
    - set_server_state: { backend: billing/v2, server: "{group}", state: drain }
    - emit: { type: com.example.drained, subject: "{group}" }
"#;

fn errors(server: &str, secs: f64) -> Ev {
    Ev::new("dev.portcullis.server.errors", t(secs)).data(json!({ "server": server }))
}

#[test]
fn the_same_key_is_claimed_once() {
    let store = MemoryFiringStore::new();
    assert!(store.claim("drain|s1|1700000000000").unwrap());
    assert!(!store.claim("drain|s1|1700000000000").unwrap());
    assert!(store.claim("drain|s2|1700000000000").unwrap());
    assert_eq!(store.len(), 2);
}

#[test]
fn a_restart_or_a_replica_seeing_the_same_events_computes_the_same_key() {
    let events = [errors("s1", 0.0), errors("s1", 5.0)];
    let keys: Vec<String> = (0..2)
        .map(|_| {
            // A fresh engine: a second replica, or the same process after a restart that
            // replays the events from the outbox a little later.
            let mut e = engine(DRAIN);
            events
                .iter()
                .flat_map(|ev| {
                    e.on_event(&ev.view(), ev.time.plus(std::time::Duration::from_secs(3)))
                })
                .map(|f| f.idempotency_key)
                .collect::<Vec<_>>()
                .concat()
        })
        .collect();
    assert_eq!(keys[0], keys[1]);
    assert!(keys[0].starts_with("drain-on-errors|s1|"), "{}", keys[0]);
}

/// An event without `time` is stamped when it arrives, so a redelivery (a producer's retry
/// after a restart) comes with another time: the key names the event, not its time, and the
/// firing is not run again. Two events in the same millisecond are two firings.
#[test]
fn a_redelivered_event_without_time_gives_the_same_key() {
    const ONE: &str = r#"
- name: page
  match: { type: com.example.alarm }
  actions: [{ emit: { type: com.example.paged } }]
"#;
    let first = Ev::new("com.example.alarm", t(0.0)).id("alarm-1");
    let mut e = engine(ONE);
    let a = e.on_event(&first.view(), t(0.0));
    // A restart: a fresh engine, and the same event delivered again 30 s later.
    let mut again = first.clone();
    again.time = t(30.0);
    let mut e = engine(ONE);
    let b = e.on_event(&again.view(), t(30.0));
    assert_eq!(a[0].idempotency_key, b[0].idempotency_key);
    let store = MemoryFiringStore::new();
    assert!(store.claim(&a[0].idempotency_key).unwrap());
    assert!(
        !store.claim(&b[0].idempotency_key).unwrap(),
        "not run again"
    );
    // Another event at the very same millisecond is another firing.
    let other = Ev::new("com.example.alarm", t(30.0)).id("alarm-2");
    let c = e.on_event(&other.view(), t(30.0));
    assert_ne!(c[0].idempotency_key, b[0].idempotency_key);
}

/// A control path in memory: servers with states, a policy that may deny, and a log.
#[derive(Default)]
struct FakeControl {
    servers: HashMap<String, Vec<ServerView>>,
    deny: Option<&'static str>,
    applied: Vec<(String, String)>,
}

impl FakeControl {
    fn with_backend(names: &[&str]) -> FakeControl {
        let servers = names
            .iter()
            .map(|n| ServerView {
                name: n.to_string(),
                state: ServerState::Ready,
                healthy: true,
            })
            .collect();
        FakeControl {
            servers: HashMap::from([("billing/v2".to_string(), servers)]),
            ..FakeControl::default()
        }
    }
}

impl Control for FakeControl {
    fn servers(&mut self, backend: &str) -> Option<Vec<ServerView>> {
        self.servers.get(backend).cloned()
    }

    fn apply(&mut self, firing: &Firing, action: &Action) -> Result<(), ActionError> {
        if self.deny == Some(action.name()) {
            return Err(ActionError::Denied(format!(
                "{} may not {}",
                firing.principal,
                action.name()
            )));
        }
        if let Action::SetServerState(s) = action {
            if let Some(list) = self.servers.get_mut(&s.backend) {
                for v in list.iter_mut().filter(|v| v.name == s.server) {
                    v.state = s.state;
                }
            }
        }
        self.applied
            .push((firing.principal.clone(), action.name().to_string()));
        Ok(())
    }
}

fn fire(e: &mut portcullis_automation::Engine, server: &str, secs: f64) -> Firing {
    e.on_event(&errors(server, secs).view(), t(secs));
    e.on_event(&errors(server, secs + 1.0).view(), t(secs + 1.0))
        .remove(0)
}

#[test]
fn execute_runs_a_firing_once_as_the_automation_principal() {
    let mut e = engine(DRAIN);
    let store = MemoryFiringStore::new();
    let mut control = FakeControl::with_backend(&["s1", "s2", "s3", "s4"]);
    let f = fire(&mut e, "s1", 0.0);
    let run = execute(&f, &store, &mut control).unwrap();
    assert!(run.claimed);
    assert_eq!(
        run.outcomes
            .iter()
            .map(|(_, o)| o.clone())
            .collect::<Vec<_>>(),
        vec![Outcome::Done, Outcome::Done]
    );
    assert_eq!(
        control.applied[0].0,
        r#"Portcullis::Trigger::"drain-on-errors""#
    );
    // A retry of the same firing does nothing.
    let again = execute(&f, &store, &mut control).unwrap();
    assert!(!again.claimed && again.outcomes.is_empty());
    assert_eq!(control.applied.len(), 2);
}

#[test]
fn max_unavailable_stops_taking_out_more_than_half() {
    let mut e = engine(DRAIN);
    let store = MemoryFiringStore::new();
    let mut control = FakeControl::with_backend(&["s1", "s2", "s3", "s4"]);
    for (i, s) in ["s1", "s2"].iter().enumerate() {
        let f = fire(&mut e, s, f64::from(i as u32) * 10.0);
        assert_eq!(
            execute(&f, &store, &mut control).unwrap().outcomes[0].1,
            Outcome::Done
        );
    }
    let f = fire(&mut e, "s3", 30.0);
    let run = execute(&f, &store, &mut control).unwrap();
    let Outcome::Blocked(reason) = &run.outcomes[0].1 else {
        panic!("{:?}", run.outcomes)
    };
    assert!(reason.contains("3 of 4 servers out"), "{reason}");
    assert_eq!(
        run.outcomes[1].1,
        Outcome::Skipped,
        "later actions do not run"
    );
    assert_eq!(control.applied.len(), 4);
}

#[test]
fn may_take_out_counts_unhealthy_servers_and_rounds_down() {
    let s = |name: &str, state, healthy| ServerView {
        name: name.into(),
        state,
        healthy,
    };
    let three = [
        s("a", ServerState::Ready, true),
        s("b", ServerState::Ready, true),
        s("c", ServerState::Ready, false),
    ];
    let half = MaxUnavailable::Percent(50);
    // 1 of 3 is out (unhealthy); 50% of 3 is 1: no more may go.
    let r = may_take_out(&three, "a", half).unwrap_err();
    assert_eq!((r.out_after, r.total, r.allowed), (2, 3, 1));
    // Taking out a server that is already out changes nothing.
    assert!(may_take_out(&three, "c", half).is_ok());
    assert!(may_take_out(&three, "a", MaxUnavailable::Count(2)).is_ok());
    // A lone server never goes at 50%.
    assert!(may_take_out(&three[..1], "a", half).is_err());
    assert!(may_take_out(&three[..1], "a", MaxUnavailable::Percent(100)).is_ok());
    assert_eq!(
        MaxUnavailable::parse("25%"),
        Ok(MaxUnavailable::Percent(25))
    );
    assert!(MaxUnavailable::parse("150%").is_err());
}

#[test]
fn a_denied_action_is_reported_and_stops_the_rest() {
    let mut e = engine(DRAIN);
    let mut control = FakeControl {
        deny: Some("set_server_state"),
        ..FakeControl::with_backend(&["s1", "s2"])
    };
    let f = fire(&mut e, "s1", 0.0);
    let run = execute(&f, &MemoryFiringStore::new(), &mut control).unwrap();
    assert!(
        matches!(&run.outcomes[0].1, Outcome::Denied(r) if r.contains("may not set_server_state"))
    );
    assert_eq!(run.outcomes[1].1, Outcome::Skipped);
    assert!(control.applied.is_empty());
}

#[test]
fn a_dry_run_is_claimed_and_checked_but_changes_nothing() {
    let mut e = engine(&DRAIN.replace("  actions:", "  enforce: false\n  actions:"));
    let mut control = FakeControl::with_backend(&["s1", "s2"]);
    let f = fire(&mut e, "s1", 0.0);
    assert!(!f.enforce);
    let run = execute(&f, &MemoryFiringStore::new(), &mut control).unwrap();
    assert_eq!(
        run.outcomes
            .iter()
            .map(|(_, o)| o.clone())
            .collect::<Vec<_>>(),
        vec![Outcome::WouldAct, Outcome::WouldAct]
    );
    assert!(control.applied.is_empty());
    assert_eq!(
        serde_json::to_value(&run.outcomes[0].1).unwrap(),
        json!({ "result": "would_act" })
    );
}
