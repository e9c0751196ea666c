//! The trigger engine, driven by events and an injected clock: thresholds, grouping,
//! cooldown, inhibition, proactive waits, loop protection, patterns, templates, caps,
//! dry runs and bounded memory.

mod common;

use common::{engine, engine_with, t, Ev};
use portcullis_automation::config::{Emit, SetServerState, SwitchRoute};
use portcullis_automation::{Action, EngineOptions, ServerState};
use serde_json::json;

const DOWN: &str = "dev.portcullis.server.down";
const UP: &str = "dev.portcullis.server.up";

#[test]
fn threshold_counts_events_within_a_sliding_window() {
    let mut e = engine(
        r#"
- name: flapping
  match: { type: dev.portcullis.server.down }
  threshold: 3
  within: 1m
  actions: [{ reload: {} }]
"#,
    );
    let mut fire = |secs: f64| {
        let ev = Ev::new(DOWN, t(secs));
        e.on_event(&ev.view(), t(secs))
    };
    assert!(fire(0.0).is_empty());
    assert!(fire(20.0).is_empty());
    assert!(
        fire(90.0).is_empty(),
        "the events at 0s and 20s fell out of the window"
    );
    assert!(fire(100.0).is_empty());
    let f = fire(110.0);
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0].window_start,
        t(90.0),
        "the window starts at its oldest counted event"
    );
    let origin = f[0].idempotency_key.strip_prefix("flapping||").unwrap();
    assert_eq!(origin.len(), 32, "{}", f[0].idempotency_key);
    assert!(origin.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(
        fire(111.0).is_empty(),
        "a firing empties the window: 3 new events are needed"
    );
}

#[test]
fn for_each_counts_each_group_on_its_own() {
    let mut e = engine(
        r#"
- name: per-server
  match: { type: dev.portcullis.server.down }
  threshold: 2
  within: 1m
  for_each: data.server
  actions: [{ set_server_state: { backend: billing/v2, server: "{group}", state: drain } }]
"#,
    );
    let mut fire = |server: &str, secs: f64| {
        let ev = Ev::new(DOWN, t(secs)).data(json!({ "server": server }));
        e.on_event(&ev.view(), t(secs))
    };
    assert!(fire("s1", 0.0).is_empty());
    assert!(fire("s2", 1.0).is_empty());
    let f = fire("s1", 2.0);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].group, "s1");
    assert_eq!(
        f[0].actions,
        vec![Action::SetServerState(SetServerState {
            backend: "billing/v2".into(),
            server: "s1".into(),
            state: ServerState::Drain,
        })]
    );
    assert_eq!(fire("s2", 3.0)[0].group, "s2");
    // An event without the field belongs to no group and is not counted.
    let ev = Ev::new(DOWN, t(4.0));
    assert!(e.on_event(&ev.view(), t(4.0)).is_empty());
    assert_eq!(e.trigger_stats("per-server").unwrap().no_group, 1);
}

#[test]
fn cooldown_turns_ten_flaps_in_a_minute_into_one_firing() {
    let mut e = engine(
        r#"
- name: failover
  match: { type: dev.portcullis.server.down, subject: "billing/*" }
  for_each: subject
  cooldown: 1m
  actions: [{ switch_route: { route: billing/api, backend: billing-standby } }]
"#,
    );
    let mut firings = Vec::new();
    for i in 0..10 {
        let now = t(f64::from(i) * 5.9);
        let ev = Ev::new(DOWN, now).subject("billing/v2/s1");
        firings.extend(e.on_event(&ev.view(), now));
    }
    assert_eq!(firings.len(), 1);
    assert_eq!(
        firings[0].actions,
        vec![Action::SwitchRoute(SwitchRoute {
            route: "billing/api".into(),
            backend: "billing-standby".into(),
        })]
    );
    assert_eq!(e.trigger_stats("failover").unwrap().cooldown, 9);
    // After the cooldown, the next flap acts again.
    let ev = Ev::new(DOWN, t(61.0)).subject("billing/v2/s1");
    assert_eq!(e.on_event(&ev.view(), t(61.0)).len(), 1);
}

#[test]
fn an_inhibited_trigger_never_fires_for_the_muted_group() {
    // The muted trigger comes first in the config: inhibitors are evaluated first anyway.
    let mut e = engine(
        r#"
- name: page-per-server
  match: { type: dev.portcullis.server.down }
  for_each: data.backend
  actions: [{ webhook: { url: "https://pager.example/{group}" } }]
- name: backend-failover
  match: { type: "dev.portcullis.*", data: { healthy: 0 } }
  for_each: data.backend
  cooldown: 10m
  inhibit: [page-per-server]
  actions: [{ switch_route: { route: billing/api, backend: standby } }]
"#,
    );
    let mut names = Vec::new();
    for i in 0..10 {
        let now = t(f64::from(i) * 6.0);
        let ev = Ev::new(DOWN, now).data(json!({ "backend": "billing/v2", "healthy": 0 }));
        names.extend(e.on_event(&ev.view(), now).into_iter().map(|f| f.trigger));
    }
    assert_eq!(names, vec!["backend-failover"]);
    assert_eq!(e.trigger_stats("page-per-server").unwrap().inhibited, 10);
    // Another group is not muted.
    let ev = Ev::new(DOWN, t(61.0)).data(json!({ "backend": "shop/web", "healthy": 3 }));
    let f = e.on_event(&ev.view(), t(61.0));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].trigger, "page-per-server");
    assert!(
        matches!(&f[0].actions[0], Action::Webhook(w) if w.url == "https://pager.example/shop/web")
    );
    // The mute lasts the inhibitor's cooldown (10m) from its firing.
    let ev = Ev::new(DOWN, t(601.0)).data(json!({ "backend": "billing/v2", "healthy": 2 }));
    assert_eq!(
        e.on_event(&ev.view(), t(601.0))[0].trigger,
        "page-per-server"
    );
}

const PROACTIVE: &str = r#"
- name: still-down
  posture: proactive
  match: { type: dev.portcullis.server.down }
  expect: { type: dev.portcullis.server.up }
  within: 2m
  for_each: subject
  actions: [{ set_server_state: { backend: billing/v2, server: "{data.server}", state: maint } }]
"#;

#[test]
fn proactive_fires_when_the_expected_event_does_not_come() {
    let mut e = engine(PROACTIVE);
    let down = Ev::new(DOWN, t(0.0))
        .subject("billing/v2/s1")
        .data(json!({"server": "s1"}));
    assert!(e.on_event(&down.view(), t(0.0)).is_empty());
    assert_eq!(e.next_deadline(), Some(t(120.0)));
    // A second down during the wait does not extend it.
    let again = Ev::new(DOWN, t(60.0))
        .subject("billing/v2/s1")
        .data(json!({"server": "s1"}));
    assert!(e.on_event(&again.view(), t(60.0)).is_empty());
    assert!(e.tick(t(119.9)).is_empty());
    let f = e.tick(t(120.0));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].cause_event_id, down.id);
    assert_eq!(f[0].window_start, t(0.0));
    assert!(matches!(&f[0].actions[0], Action::SetServerState(s) if s.server == "s1"));
    assert!(e.tick(t(500.0)).is_empty(), "it fires once");
    assert_eq!(e.next_deadline(), None);
}

#[test]
fn proactive_stays_quiet_when_the_expected_event_comes_in_time() {
    let mut e = engine(PROACTIVE);
    let down = Ev::new(DOWN, t(0.0))
        .subject("billing/v2/s1")
        .data(json!({"server": "s1"}));
    e.on_event(&down.view(), t(0.0));
    let other = Ev::new(DOWN, t(1.0))
        .subject("billing/v2/s2")
        .data(json!({"server": "s2"}));
    e.on_event(&other.view(), t(1.0));
    // An automation-caused `up` still ends the wait: loop protection stops acting, not waiting.
    let up = Ev::new(UP, t(90.0))
        .subject("billing/v2/s1")
        .caused_by("x", 1);
    assert!(e.on_event(&up.view(), t(90.0)).is_empty());
    let f = e.tick(t(200.0));
    assert_eq!(f.len(), 1, "only the server whose up never came");
    assert_eq!(f[0].group, "billing/v2/s2");
    assert_eq!(e.trigger_stats("still-down").unwrap().expected_arrived, 1);
}

#[test]
fn an_expected_event_after_the_wait_is_too_late() {
    let mut e = engine(PROACTIVE);
    let down = Ev::new(DOWN, t(0.0))
        .subject("b/s1")
        .data(json!({"server": "s1"}));
    e.on_event(&down.view(), t(0.0));
    // The up happened at 121s; the tick runs late, at 130s: the trigger still fires.
    let up = Ev::new(UP, t(121.0)).subject("b/s1");
    e.on_event(&up.view(), t(125.0));
    assert_eq!(e.tick(t(130.0)).len(), 1);
}

const POKE_SELF: &str = r#"
- name: poke
  match: { type: com.example.poke }
  actions: [{ emit: { type: com.example.poke, subject: "{subject}" } }]
"#;

/// Feeds each firing's emitted events back as the control path would, and counts firings.
fn run_loop(e: &mut portcullis_automation::Engine, first: Ev) -> Vec<u32> {
    let mut hops = Vec::new();
    let mut queue = vec![first];
    let mut now = 0.0;
    while let Some(ev) = queue.pop() {
        now += 1.0;
        for f in e.on_event(&ev.view(), t(now)) {
            hops.push(f.hop);
            for a in &f.actions {
                if let Action::Emit(Emit { type_, subject, .. }) = a {
                    let mut next = Ev::new(type_, t(now)).caused_by(&f.cause_event_id, f.hop);
                    next.subject = subject.clone();
                    queue.push(next);
                }
            }
            assert!(hops.len() < 50, "a loop");
        }
    }
    hops
}

#[test]
fn an_action_whose_event_matches_its_own_trigger_does_not_fire_again() {
    let mut e = engine(POKE_SELF);
    let hops = run_loop(&mut e, Ev::new("com.example.poke", t(0.0)).subject("x"));
    assert_eq!(hops, vec![1]);
    assert_eq!(e.trigger_stats("poke").unwrap().automation_ignored, 1);
}

#[test]
fn opted_in_triggers_stop_at_max_hops() {
    let mut e = engine(
        r#"
- name: poke
  match: { type: com.example.poke }
  automation_events: { allow: true, max_hops: 2 }
  actions: [{ emit: { type: com.example.poke } }]
"#,
    );
    let hops = run_loop(&mut e, Ev::new("com.example.poke", t(0.0)));
    assert_eq!(hops, vec![1, 2]);
    assert_eq!(e.trigger_stats("poke").unwrap().hop_limited, 1);
}

#[test]
fn wildcards_and_negation_in_type_and_subject() {
    let mut e = engine(
        r#"
- name: not-billing
  match: { type: "dev.portcullis.server.*", subject: "!billing/*" }
  actions: [{ reload: {} }]
"#,
    );
    let mut hit = |ty: &str, subject: Option<&str>| {
        let mut ev = Ev::new(ty, t(0.0));
        ev.subject = subject.map(str::to_string);
        !e.on_event(&ev.view(), t(0.0)).is_empty()
    };
    assert!(hit(DOWN, Some("shop/web/s1")));
    assert!(hit(UP, Some("shop/web/s1")));
    assert!(!hit(DOWN, Some("billing/v2/s1")));
    assert!(!hit("dev.portcullis.route.switched", Some("shop/web")));
    assert!(hit(DOWN, None), "no subject is outside billing/");
}

#[test]
fn data_fields_match_by_dotted_and_jsonpath_keys() {
    let mut e = engine(
        r#"
- name: db-errors
  match:
    type: com.example.check
    data:
      status: 503
      "$.target.host": "db-*"
      reason: "!maintenance"
  actions: [{ reload: {} }]
"#,
    );
    let mut hit = |data: serde_json::Value| {
        let ev = Ev::new("com.example.check", t(0.0)).data(data);
        !e.on_event(&ev.view(), t(0.0)).is_empty()
    };
    assert!(hit(json!({"status": 503, "target": {"host": "db-1"}})));
    assert!(hit(
        json!({"status": "503", "target": {"host": "db-1"}, "reason": "timeout"})
    ));
    assert!(!hit(
        json!({"status": 503, "target": {"host": "db-1"}, "reason": "maintenance"})
    ));
    assert!(!hit(json!({"status": 502, "target": {"host": "db-1"}})));
    assert!(!hit(json!({"status": 503, "target": {"host": "web-1"}})));
    assert!(
        !hit(json!({"status": 503})),
        "a missing field matches no positive pattern"
    );
}

#[test]
fn templates_fill_actions_from_the_event() {
    let mut e = engine(
        r#"
- name: drain-and-tell
  match: { type: dev.portcullis.server.down }
  for_each: data.backend
  actions:
    - set_server_state: { backend: "{data.backend}", server: "{data.server}", state: drain }
    - emit:
        type: com.example.drained
        subject: "{group}/{data.server}"
        data: { cause: "{id}", trigger: "{trigger}", original: "{data}", code: "{data.code}", note: "code {data.code}" }
    - start_workflow: { name: recover, input: "{data}" }
"#,
    );
    let data = json!({"backend": "billing/v2", "server": "s1", "code": 503});
    let ev = Ev::new(DOWN, t(0.0)).data(data.clone());
    let f = e.on_event(&ev.view(), t(0.0)).remove(0);
    assert_eq!(f.error, None);
    assert!(
        matches!(&f.actions[0], Action::SetServerState(s) if s.backend == "billing/v2" && s.server == "s1")
    );
    let Action::Emit(emit) = &f.actions[1] else {
        panic!("emit")
    };
    assert_eq!(emit.subject.as_deref(), Some("billing/v2/s1"));
    assert_eq!(
        emit.data,
        json!({"cause": ev.id, "trigger": "drain-and-tell", "original": data, "code": 503, "note": "code 503"})
    );
    assert!(matches!(&f.actions[2], Action::StartWorkflow(w) if w.input == data));

    // An event without a field a template needs: the firing carries the error and no action.
    let ev = Ev::new(DOWN, t(1.0)).data(json!({"backend": "shop/web"}));
    let f = e.on_event(&ev.view(), t(1.0)).remove(0);
    assert!(f.actions.is_empty());
    let err = f.error.unwrap();
    assert!(
        err.starts_with("actions[0].set_server_state.server:"),
        "{err}"
    );
    assert!(err.contains("`{data.server}`"), "{err}");
}

#[test]
fn dry_run_firings_are_marked_not_enforced() {
    let mut e = engine(
        r#"
- name: try-it
  match: { type: dev.portcullis.server.down }
  enforce: false
  actions: [{ reload: {} }]
"#,
    );
    let ev = Ev::new(DOWN, t(0.0));
    let f = e.on_event(&ev.view(), t(0.0));
    assert_eq!(f.len(), 1);
    assert!(!f[0].enforce);
    assert_eq!(f[0].principal, r#"Portcullis::Trigger::"try-it""#);
}

#[test]
fn a_dry_run_trigger_does_not_mute_an_enforcing_one() {
    let mut e = engine(
        r#"
- name: dry
  match: { type: dev.portcullis.server.down }
  enforce: false
  inhibit: [real, other-dry]
  actions: [{ reload: {} }]
- name: real
  match: { type: dev.portcullis.server.down }
  actions: [{ reload: {} }]
- name: other-dry
  match: { type: dev.portcullis.server.down }
  enforce: false
  actions: [{ reload: {} }]
"#,
    );
    let ev = Ev::new(DOWN, t(0.0));
    let names: Vec<String> = e
        .on_event(&ev.view(), t(0.0))
        .into_iter()
        .map(|f| f.trigger)
        .collect();
    assert_eq!(names, vec!["dry", "real"]);
}

#[test]
fn rate_caps_per_trigger_and_global() {
    let mut e = engine_with(
        r#"
- name: capped
  match: { type: com.example.a }
  max_actions_per_minute: 2
  actions: [{ reload: {} }]
- name: busy
  match: { type: com.example.b }
  actions: [{ reload: {} }, { reload: {} }]
"#,
        EngineOptions {
            max_actions_per_minute: 5,
            ..EngineOptions::default()
        },
    );
    fn count(e: &mut portcullis_automation::Engine, ty: &str, secs: f64) -> usize {
        let ev = Ev::new(ty, t(secs));
        e.on_event(&ev.view(), t(secs)).len()
    }
    let a: usize = (0..5)
        .map(|i| count(&mut e, "com.example.a", f64::from(i)))
        .sum();
    assert_eq!(a, 2, "two actions per minute for `capped`");
    // 2 actions used globally; `busy` takes 2 per firing: one firing fits in the 5.
    let b: usize = (0..5)
        .map(|i| count(&mut e, "com.example.b", 10.0 + f64::from(i)))
        .sum();
    assert_eq!(b, 1);
    assert_eq!(e.trigger_stats("capped").unwrap().rate_limited, 3);
    assert_eq!(e.trigger_stats("busy").unwrap().global_rate_limited, 4);
    // A minute later the budget is back.
    assert_eq!(count(&mut e, "com.example.a", 61.0), 1);
}

#[test]
fn groups_are_bounded_and_evictions_counted() {
    let mut e = engine_with(
        r#"
- name: per-key
  match: { type: com.example.hit }
  threshold: 2
  within: 1m
  for_each: subject
  actions: [{ reload: {} }]
"#,
        EngineOptions {
            max_groups_per_trigger: 2,
            ..EngineOptions::default()
        },
    );
    for (i, k) in ["a", "b", "c"].iter().enumerate() {
        let ev = Ev::new("com.example.hit", t(i as f64)).subject(k);
        e.on_event(&ev.view(), t(i as f64));
    }
    assert_eq!(e.groups("per-key"), Some(2));
    assert_eq!(e.trigger_stats("per-key").unwrap().evicted_groups, 1);
    // `a` was evicted with its first event: one more is not enough.
    let ev = Ev::new("com.example.hit", t(4.0)).subject("a");
    assert!(e.on_event(&ev.view(), t(4.0)).is_empty());
    let ev = Ev::new("com.example.hit", t(5.0)).subject("c");
    assert_eq!(e.on_event(&ev.view(), t(5.0)).len(), 1);
}

#[test]
fn duplicate_and_stale_events_are_ignored() {
    let mut e = engine(
        r#"
- name: any
  match: { type: com.example.x }
  actions: [{ reload: {} }]
"#,
    );
    let ev = Ev::new("com.example.x", t(0.0)).id("same");
    assert_eq!(e.on_event(&ev.view(), t(0.0)).len(), 1);
    assert!(e.on_event(&ev.view(), t(1.0)).is_empty(), "redelivered");
    let old = Ev::new("com.example.x", t(0.0));
    assert!(
        e.on_event(&old.view(), t(601.0)).is_empty(),
        "older than max_event_age"
    );
    let s = e.stats();
    assert_eq!((s.events, s.duplicates, s.stale), (3, 1, 1));
}

#[test]
fn a_reload_keeps_cooldowns() {
    let yaml = r#"
- name: failover
  match: { type: dev.portcullis.server.down }
  cooldown: 5m
  actions: [{ reload: {} }]
"#;
    let mut e = engine(yaml);
    let ev = Ev::new(DOWN, t(0.0));
    assert_eq!(e.on_event(&ev.view(), t(0.0)).len(), 1);
    let mut changed = common::triggers(yaml);
    changed[0].match_.subject = Some(portcullis_automation::config::PatternText("*".into()));
    e.replace_config(changed).unwrap();
    let ev = Ev::new(DOWN, t(10.0)).subject("x");
    assert!(
        e.on_event(&ev.view(), t(10.0)).is_empty(),
        "still cooling down"
    );
    assert!(e.replace_config(common::triggers("[]")).is_ok());
    assert!(e.replace_config(vec![]).is_ok());
}
