//! The `events:` block as users write it (YAML), its errors, and buses built from it: the
//! JSON-lines file sink, and windowed counts flowing through the bus as one event per
//! window and key.

use portcullis_events::config::{NatsCfg, WebhookCfg};
use portcullis_events::http::Mode;
use portcullis_events::{types, Aggregator, Bus, Event, EventsCfg, SinkKind, Source, TypeFilter};
use std::sync::Arc;
use std::time::Duration;

fn parse(yaml: &str) -> Result<EventsCfg, String> {
    serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
}

#[test]
fn every_kind_of_sink_with_defaults_and_settings() {
    let cfg = parse(
        r#"
sinks:
  - name: hooks
    webhook:
      url: https://hooks.example/portcullis
      secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
      mode: binary
      timeout: 2s
      max_attempts: 5
      backoff: { min: 250ms, max: 1m }
      durable: false
      outbox_max: 50
    types: ["dev.portcullis.server.*"]
    queue: 100
  - { name: plain, webhook: { url: "http://127.0.0.1:8080/" } }
  - { name: bus, nats: { url: "nats://127.0.0.1:4222", jetstream: true } }
  - { name: log, file: { path: /tmp/events.jsonl } }
  - { name: console, stdout: {} }
"#,
    )
    .unwrap();
    cfg.validate().unwrap();
    let kinds: Vec<_> = cfg.sinks.iter().map(|s| &s.kind).collect();
    let SinkKind::Webhook(w) = kinds[0] else {
        panic!()
    };
    assert_eq!(
        (w.mode, w.timeout, w.max_attempts),
        (Mode::Binary, Duration::from_secs(2), 5)
    );
    assert_eq!(
        (w.backoff.min, w.backoff.max),
        (Duration::from_millis(250), Duration::from_secs(60))
    );
    assert!(!w.durable && w.secret.is_some() && w.outbox_max == 50);
    assert_eq!((cfg.sinks[0].queue, cfg.sinks[0].types.len()), (100, 1));
    let SinkKind::Webhook(w) = kinds[1] else {
        panic!()
    };
    let d = WebhookCfg::new("x");
    assert_eq!(
        (w.mode, w.timeout, w.max_attempts, w.durable),
        (d.mode, d.timeout, d.max_attempts, true)
    );
    assert_eq!(cfg.sinks[1].queue, portcullis_events::config::DEFAULT_QUEUE);
    let SinkKind::Nats(NatsCfg {
        subject, jetstream, ..
    }) = kinds[2]
    else {
        panic!()
    };
    assert_eq!(
        (subject.as_str(), *jetstream),
        ("portcullis.events.{type}", true)
    );
    assert!(matches!(kinds[3], SinkKind::File(f) if f.path.ends_with("events.jsonl")));
    assert!(matches!(kinds[4], SinkKind::Stdout));
    // The secret never shows in debug output.
    assert!(!format!("{cfg:?}").contains("MfKQ9r8"));
}

#[test]
fn mistakes_are_errors_that_say_what_is_wrong() {
    let err = |yaml: &str| parse(yaml).unwrap_err();
    let e = err("sinks: [{ name: a, webhook: { url: 'http://x/', retries: 3 } }]");
    assert!(e.contains("unknown field `retries`"), "{e}");
    let e = err("sinks: [{ name: a }]");
    assert!(
        e.contains("exactly one of `webhook`, `nats`, `file`, `stdout` (found 0)"),
        "{e}"
    );
    let e = err("sinks: [{ name: a, stdout: {}, file: { path: x } }]");
    assert!(e.contains("(found 2)"), "{e}");
    let e = err("sinks: [{ name: a, webhook: { url: 'http://x/', secret: hunter2 } }]");
    assert!(e.contains("whsec_"), "{e}");
    let e = err("sinks: [{ name: a, webhook: { url: 'http://x/', timeout: soon } }]");
    assert!(e.contains("`soon` is not a duration"), "{e}");
    let e = err("sinks: [{ name: a, webhook: { url: 'http://x/', mode: json } }]");
    assert!(e.contains("unknown variant `json`"), "{e}");
    let e = err("sinks: [{ name: a, stdout: {}, queue: 0 }]");
    assert!(e.contains("`queue` must be at least 1"), "{e}");

    let invalid = |yaml: &str| parse(yaml).unwrap().validate().unwrap_err().to_string();
    let e = invalid("sinks: [{ name: a, stdout: {} }, { name: a, file: { path: x } }]");
    assert!(e.contains("two sinks are named `a`"), "{e}");
    let e = invalid("sinks: [{ name: a, webhook: { url: 'ftp://x/' } }]");
    assert!(
        e.contains("events sink `a`") && e.contains("not http(s)"),
        "{e}"
    );
    let e = invalid("sinks: [{ name: a, webhook: { url: 'http://x/', max_attempts: 0 } }]");
    assert!(e.contains("`max_attempts` must be at least 1"), "{e}");
    let e = invalid("sinks: [{ name: a, stdout: {}, types: ['[oops'] }]");
    assert!(e.contains("type pattern `[oops`"), "{e}");
    let e = invalid("sinks: [{ name: a, nats: { url: 'nats://x', subject: 'a b' } }]");
    assert!(e.contains("without spaces"), "{e}");
}

#[tokio::test]
async fn the_file_sink_appends_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("events.jsonl");
    let cfg = parse(&format!(
        "sinks: [{{ name: log, file: {{ path: '{}' }}, types: ['dev.portcullis.config.*'] }}]",
        path.display()
    ))
    .unwrap();
    let bus = Bus::from_config(&cfg, None).await.unwrap();
    let src = Source::new("portcullis://t");
    let reloaded = src.config_reloaded(portcullis_events::ConfigReloaded {
        generation: 3,
        trigger: "signal".into(),
    });
    bus.publish(reloaded.clone());
    bus.publish(src.event(types::SERVER_UP, None, 1)); // filtered out
    assert!(bus.shutdown(Duration::from_secs(5)).await);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(
        Event::from_json(lines[0].as_bytes(), 1 << 20).unwrap(),
        reloaded
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // A directory that cannot hold the file is an error at start, naming the sink.
    let cfg = parse("sinks: [{ name: log, file: { path: /nonexistent/dir/e.jsonl } }]").unwrap();
    let e = Bus::from_config(&cfg, None).await.unwrap_err().to_string();
    assert!(
        e.contains("events sink `log`") && e.contains("/nonexistent/dir/e.jsonl"),
        "{e}"
    );
}

#[tokio::test]
async fn a_burst_of_denials_is_one_event_per_window_and_key() {
    let mut builder = Bus::builder();
    let mut rx = builder.subscribe("automation", 100, TypeFilter::any());
    let bus = builder.build();
    let agg = Arc::new(
        Aggregator::new(types::AUTH_DENIAL_BURST, Duration::from_millis(200), 1000).min_count(10),
    );
    let task = agg.clone().spawn(
        bus.clone(),
        Source::new("portcullis://t"),
        Duration::from_millis(20),
    );
    for _ in 0..1000 {
        agg.hit("billing/api", "User::\"mallory\"");
    }
    for _ in 0..3 {
        agg.hit("billing/api", "User::\"alice\""); // below min_count: no event
    }
    let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.type_, types::AUTH_DENIAL_BURST);
    assert_eq!(event.subject.as_deref(), Some("billing/api"));
    assert_eq!(event.data["key"], "User::\"mallory\"");
    assert_eq!(
        (
            event.data["count"].as_u64(),
            event.data["window_ms"].as_u64()
        ),
        (Some(1000), Some(200))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.try_recv().is_err(), "one event for 1003 denials");
    assert!(bus.shutdown(Duration::from_secs(1)).await);
    task.await.unwrap();
}

/// A sink without a name is named after its kind (the design page's shape).
#[test]
fn a_sink_without_a_name_is_named_after_its_kind() {
    let cfg = parse(
        "sinks: [{ webhook: { url: \"https://hooks.example/portcullis\", secret: \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\" } }]",
    )
    .unwrap();
    assert_eq!(cfg.sinks[0].name, "webhook");
    let two = parse("sinks: [{ stdout: {} }, { stdout: {} }]")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(two.contains("give each a `name`"), "{two}");
}
