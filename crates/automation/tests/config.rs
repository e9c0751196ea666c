//! The trigger config: the YAML shape users write, and validation messages that name the path
//! (for file:line:col) and say the fix.

mod common;

use common::{problems, triggers};
use portcullis_automation::config::{AutomationEvents, Block};
use portcullis_automation::{validate, Action, Dur, MaxUnavailable, Posture};

/// Asserts that some problem is at `path` and its message contains `says`.
fn has(problems: &[(String, String)], path: &str, says: &str) {
    assert!(
        problems.iter().any(|(p, m)| p == path && m.contains(says)),
        "no problem at `{path}` saying `{says}` in {problems:#?}"
    );
}

#[test]
fn the_documented_shape_parses() {
    let t = triggers(
        r#"
- name: drain-flapping
  match:
    type: dev.portcullis.server.down
    subject: "billing/*"
    data: { reason: "!maintenance", "$.check.code": 503 }
  threshold: 3
  within: 1m
  for_each: subject
  cooldown: 10m
  inhibit: [page]
  automation_events: { allow: true, max_hops: 3 }
  enforce: false
  max_actions_per_minute: 10
  max_unavailable: 25%
  actions:
    - set_server_state: { backend: billing/billing-v2, server: "{data.server}", state: drain }
    - set_server_weight: { backend: billing/billing-v2, server: "{data.server}", weight: 1 }
    - switch_route: { route: billing/billing-api, backend: billing-standby }
    - restore_route: { route: billing/billing-api }
    - set_table: { table: per_ip, key: "{data.key}", gpc0: 1 }
    - set_table: { table: per_ip, key: "{data.key}", tag: suspicious }
    - clear_table: { table: per_ip, key: "{data.key}" }
    - block: { table: per_ip, key: "{data.key}", for: 10m }
    - revoke_sessions: { principal: "{data.principal}" }
    - reload: {}
    - emit: { type: com.example.drained, subject: "{group}", data: { server: "{data.server}" } }
    - webhook: { url: "https://hooks.example/portcullis/{group}" }
    - start_workflow: { name: recover-billing, input: "{data}" }
- name: page
  posture: proactive
  match: { type: dev.portcullis.server.down }
  expect: { type: dev.portcullis.server.up }
  within: 2m
  for_each: subject
  actions: [{ webhook: { url: "https://pager.example/hook" } }]
"#,
    );
    let d = &t[0];
    assert_eq!(d.threshold, 3);
    assert_eq!(d.within, Some(Dur::secs(60)));
    assert_eq!(
        d.automation_events,
        AutomationEvents {
            allow: true,
            max_hops: Some(3)
        }
    );
    assert_eq!(d.max_unavailable, Some(MaxUnavailable::Percent(25)));
    assert!(!d.enforce);
    assert_eq!(d.actions.len(), 13);
    assert!(matches!(&d.actions[7], Action::Block(Block { for_, .. }) if *for_ == Dur::secs(600)));
    assert_eq!(d.match_.data["$.check.code"].0, "503");
    assert_eq!(t[1].posture, Posture::Proactive);
    assert!(t[1].enforce, "enforce defaults to true");
    assert_eq!(t[1].threshold, 1, "threshold defaults to 1");
    // What serializes (as JSON) parses back to the same config.
    let back = portcullis_automation::parse_triggers(&serde_json::to_value(&t).unwrap());
    assert_eq!(back, Ok(t));
}

#[test]
fn structural_mistakes_name_the_path_and_the_fix() {
    let p = problems(
        r#"
- name: a
  match: { type: x, subjekt: "b/*" }
  cooldwn: 5m
  actions:
    - drain: { backend: b, server: s }
    - set_server_state: { backend: b, server: s, state: drained }
    - switch_route: { route: r, towards: standby }
    - { reload: {}, emit: { type: t } }
    - set_server_weight: { backend: b, server: s, weight: -1 }
- name: b
  match: { type: x }
  within: 5
  actions: reload
"#,
    );
    has(&p, "triggers[0].match.subjekt", "did you mean `subject`?");
    has(&p, "triggers[0].cooldwn", "did you mean `cooldown`?");
    has(&p, "triggers[0].actions[0].drain", "unknown action `drain`");
    has(&p, "triggers[0].actions[0].drain", "state: drain");
    has(
        &p,
        "triggers[0].actions[1].set_server_state.state",
        "use `ready`, `drain` or `maint`",
    );
    has(
        &p,
        "triggers[0].actions[2].switch_route.towards",
        "unknown field `towards`",
    );
    has(&p, "triggers[0].actions[2].switch_route", "needs `backend`");
    has(&p, "triggers[0].actions[3]", "its own list item");
    has(
        &p,
        "triggers[0].actions[4].set_server_weight.weight",
        "whole number",
    );
    has(&p, "triggers[1].within", "`5s`");
    has(&p, "triggers[1].actions", "list of actions");
    assert_eq!(
        problems("- name: x\n  actions: []\n")[0],
        (
            "triggers[0]".to_string(),
            "a trigger needs `match`: add `match: { type: dev.portcullis.server.down }`"
                .to_string()
        )
    );
}

#[test]
fn meaning_mistakes_name_the_path_and_the_fix() {
    let p = problems(
        r#"
- name: lonely-proactive
  posture: proactive
  match: { type: dev.portcullis.server.down }
  actions: [{ reload: {} }]
- name: bad-inhibit
  match: { type: "a*", subject: "!", data: { "x..y": "1" } }
  inhibit: [nobody, bad-inhibit]
  threshold: 5
  for_each: data.server
  actions:
    - set_server_weight: { backend: b, server: "{data.server}", weight: 0 }
    - set_table: { table: t, key: "{data.key}" }
    - emit: { type: dev.portcullis.server.down }
    - webhook: { url: "https://{data.host}/hook" }
    - switch_route: { route: "{data.route", backend: "{server}" }
- name: ungrouped
  match: { type: a }
  inhibit: [bad-inhibit]
  automation_events: { max_hops: 3 }
  max_actions_per_minute: 0
  actions: [{ emit: { type: com.example.x, subject: "{group}" } }]
- name: ungrouped
  match: { type: a }
  actions: [{ reload: {} }]
"#,
    );
    has(&p, "triggers[0]", "add `expect: { type: ... }`");
    has(&p, "triggers[0]", "needs `within`");
    has(&p, "triggers[1].match.subject", "`!` needs a pattern");
    has(&p, "triggers[1].match.data.x..y", "single dots");
    has(&p, "triggers[1].inhibit[0]", "no trigger named `nobody`");
    has(&p, "triggers[1].inhibit[1]", "cannot inhibit itself");
    has(&p, "triggers[1].threshold", "needs `within`");
    has(
        &p,
        "triggers[1].actions[0].set_server_weight.weight",
        "from 1 to 1000",
    );
    has(
        &p,
        "triggers[1].actions[1].set_table",
        "exactly one of `gpc0`",
    );
    has(&p, "triggers[1].actions[2].emit.type", "may not forge");
    has(
        &p,
        "triggers[1].actions[3].webhook.url",
        "only after the host",
    );
    has(
        &p,
        "triggers[1].actions[4].switch_route.route",
        "unclosed `{`",
    );
    has(
        &p,
        "triggers[1].actions[4].switch_route.backend",
        "data.<field>",
    );
    has(&p, "triggers[2].inhibit[0]", "same `for_each`");
    has(
        &p,
        "triggers[2].automation_events.max_hops",
        "only with `allow: true`",
    );
    has(&p, "triggers[2].max_actions_per_minute", "at least 1");
    has(
        &p,
        "triggers[2].actions[0].emit.subject",
        "`{group}` is the value of `for_each`",
    );
    has(&p, "triggers[3].name", "duplicate trigger name `ungrouped`");
}

#[test]
fn inhibit_cycles_are_rejected() {
    let cfgs = triggers(
        r#"
- { name: a, match: { type: x }, actions: [{ reload: {} }] }
- { name: b, match: { type: x }, actions: [{ reload: {} }] }
"#,
    );
    let mut cyc = cfgs.clone();
    cyc[0].inhibit = vec!["b".into()];
    cyc[1].inhibit = vec!["a".into()];
    let p = validate(&cyc);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].0.starts_with("triggers[") && p[0].1.contains("inhibit each other"),
        "{p:#?}"
    );
    assert!(validate(&cfgs).is_empty());
    assert!(portcullis_automation::Engine::new(cyc).is_err());
}

/// The design page's shape, `switch_route: { route, to }`, reads as `backend`.
#[test]
fn switch_route_takes_to_as_the_design_page_writes_it() {
    let t = triggers(
        r#"
- name: failover-billing
  match: { type: dev.portcullis.backend.unhealthy, subject: "billing/*" }
  cooldown: 5m
  actions: [{ switch_route: { route: billing/billing-api, to: billing-standby } }]
"#,
    );
    match &t[0].actions[0] {
        Action::SwitchRoute(s) => assert_eq!(
            (s.route.as_str(), s.backend.as_str()),
            ("billing/billing-api", "billing-standby")
        ),
        other => panic!("{other:?}"),
    }
}
