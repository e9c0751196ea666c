//! Automation through the real binary: triggers are validated with the rest of the config.

use std::process::Command;

fn check(yaml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "p.yaml");
    (out.status.code(), text)
}

const BASE: &str = r#"listeners: [{ name: web, bind: "127.0.0.1:18080" }]
backends:
  - { name: o, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - { name: site, match: { path_prefix: / }, backend: o, public: true }
"#;

/// A trigger with an unknown field or action is a config error at its place, with the fix.
#[test]
fn check_locates_trigger_mistakes() {
    let (code, err) = check(&format!(
        "{BASE}triggers:
  - name: drain-on-errors
    match: {{ type: dev.portcullis.server.down }}
    cooldwn: 1m
    actions:
      - set_server_state: {{ backend: o, server: \"{{data.server}}\", state: drain }}
      - explode: {{}}
"
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("p.yaml:9:") && err.contains("did you mean `cooldown`?"),
        "{err}"
    );
    assert!(
        err.contains("p.yaml:12:") && err.contains("unknown action `explode`"),
        "{err}"
    );
    let (code, err) = check(&format!(
        "{BASE}triggers:
  - name: drain-on-errors
    match: {{ type: dev.portcullis.server.down }}
    cooldown: 1m
    actions:
      - set_server_state: {{ backend: o, server: \"{{data.server}}\", state: drain }}
"
    ));
    assert_eq!(code, Some(0), "{err}");
}
