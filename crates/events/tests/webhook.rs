//! The webhook sink against a real HTTP receiver (tests/support): signed CloudEvents in
//! both modes, retries on 500 and on a timeout, no retry on a 4xx, dedup by id, the type
//! filter, and the outbox emptied once delivered.

mod support;

use portcullis_events::{
    types, Bus, ConfigRejected, ConfigReloaded, Event, EventsCfg, ServerChange, ServerData, Source,
};
use portcullis_store::Store;
use std::time::Duration;
use support::{wait_until, wait_until_async, Receiver, SECRET};

const LIMIT: Duration = Duration::from_secs(10);

fn config(yaml: &str) -> EventsCfg {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// One webhook sink named `hooks` with quick retries, plus `extra` YAML keys.
fn hook_config(url: &str, extra: &str) -> EventsCfg {
    config(&format!(
        r#"
sinks:
  - name: hooks
    webhook:
      url: "{url}"
      secret: "{SECRET}"
      timeout: 500ms
      backoff: {{ min: 20ms, max: 100ms }}
      {extra}
"#
    ))
}

fn source() -> Source {
    Source::new("portcullis://test")
}

fn server_down() -> Event {
    source().server(
        ServerChange::Down,
        ServerData::new(
            "billing-v2",
            "10.0.0.11:8080",
            "3 failed health checks",
            1,
            2,
        ),
    )
}

async fn outbox_empty(store: &Store, sink: &str) {
    wait_until_async(LIMIT, "the outbox to empty", || async {
        let (s, n) = (store.clone(), sink.to_owned());
        tokio::task::spawn_blocking(move || s.outbox_count(&n).unwrap())
            .await
            .unwrap()
            == 0
    })
    .await;
}

#[tokio::test]
async fn signed_cloudevents_arrive_in_both_modes() {
    let rx = Receiver::start(0).await;
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let cfg = config(&format!(
        r#"
sinks:
  - name: structured
    webhook: {{ url: "{s}", secret: "{SECRET}", mode: structured }}
  - name: binary
    webhook: {{ url: "{b}", secret: "{SECRET}", mode: binary }}
  - name: servers-only
    webhook: {{ url: "{o}", secret: "{SECRET}", mode: binary }}
    types: ["dev.portcullis.server.*"]
"#,
        s = rx.url("s"),
        b = rx.url("b"),
        o = rx.url("o"),
    ));
    let bus = Bus::from_config(&cfg, Some(&store)).await.unwrap();
    let published = vec![
        server_down(),
        source().config_reloaded(ConfigReloaded {
            generation: 2,
            trigger: "file".into(),
        }),
        // A subject that binary mode must percent-encode, and a cause.
        source()
            .event(
                "dev.portcullis.test",
                Some("café/ü 1%".into()),
                serde_json::json!([1, "two"]),
            )
            .caused_by("cause-1"),
    ];
    for e in &published {
        bus.publish(e.clone());
    }
    // 3 per mode, and the server event from `servers-only`.
    wait_until(LIMIT, "7 deliveries", || rx.log.lock().events.len() >= 7).await;
    let events = {
        let log = rx.log.lock();
        assert_eq!(
            (log.bad_signatures, log.duplicates, log.requests),
            (0, 0, 7)
        );
        log.events.clone()
    };
    for mode in ["structured", "binary"] {
        let got: Vec<_> = events
            .iter()
            .filter(|r| r.path == format!("/{}", &mode[..1]))
            .collect();
        let want: Vec<_> = published.iter().collect();
        assert_eq!(got.len(), want.len(), "{mode}: {got:#?}");
        for e in want {
            let r = got.iter().find(|r| r.id == e.id).expect("delivered");
            assert_eq!(r.mode, mode);
            assert_eq!(r.type_, e.type_);
            assert_eq!(r.source, e.source);
            assert_eq!(r.subject, e.subject, "{mode}");
            assert_eq!(r.data, e.data);
            assert_eq!(r.time, portcullis_events::rfc3339(e.time));
        }
    }
    let stats = |n| bus.sink_stats(n).unwrap();
    wait_until(LIMIT, "the counters", || {
        stats("servers-only").delivered == 1
    })
    .await;
    assert_eq!(
        stats("servers-only").published,
        1,
        "the filter took only server.down"
    );
    let only: Vec<_> = rx.events().into_iter().filter(|r| r.path == "/o").collect();
    assert_eq!(
        (only.len(), only[0].id.as_str()),
        (1, published[0].id.as_str())
    );
    wait_until(LIMIT, "the deliveries to be counted", || {
        (stats("structured").delivered, stats("binary").delivered) == (3, 3)
    })
    .await;
    for sink in ["structured", "binary", "servers-only"] {
        outbox_empty(&store, sink).await;
    }
    assert!(bus.shutdown(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_500_is_retried_then_delivered() {
    let rx = Receiver::start(0).await;
    rx.log.lock().fail_next = 2;
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let bus = Bus::from_config(&hook_config(&rx.url("hook"), ""), Some(&store))
        .await
        .unwrap();
    let event = server_down();
    bus.publish(event.clone());
    wait_until(LIMIT, "the delivery", || !rx.events().is_empty()).await;
    assert_eq!(rx.events()[0].id, event.id);
    assert_eq!(rx.log.lock().requests, 3, "two 500s, then a 2xx");
    // The receiver has the event a moment before the sink counts its answer.
    wait_until(LIMIT, "the delivery to be counted", || {
        bus.sink_stats("hooks").unwrap().delivered == 1
    })
    .await;
    let c = bus.sink_stats("hooks").unwrap();
    assert_eq!((c.retried, c.delivered, c.failed), (2, 1, 0));
    outbox_empty(&store, "hooks").await;
}

#[tokio::test]
async fn a_receiver_that_hangs_times_out_and_is_retried() {
    let rx = Receiver::start(0).await;
    rx.log.lock().hang_next = 1;
    let bus = Bus::from_config(&hook_config(&rx.url("hook"), "durable: false"), None)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    bus.publish(server_down());
    wait_until(LIMIT, "the delivery", || !rx.events().is_empty()).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    wait_until(LIMIT, "the delivery to be counted", || {
        bus.sink_stats("hooks").unwrap().delivered == 1
    })
    .await;
    let c = bus.sink_stats("hooks").unwrap();
    assert_eq!((c.retried, c.delivered), (1, 1));
}

#[tokio::test]
async fn a_4xx_is_dropped_without_retry() {
    let rx = Receiver::start(0).await;
    rx.log.lock().reject_types = vec![types::CONFIG_REJECTED.into()];
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let bus = Bus::from_config(&hook_config(&rx.url("hook"), ""), Some(&store))
        .await
        .unwrap();
    bus.publish(source().config_rejected(ConfigRejected {
        generation: 1,
        trigger: "api".into(),
        errors: vec!["portcullis.yaml:3:7: unknown key `listners`".into()],
    }));
    let ok = server_down();
    bus.publish(ok.clone());
    wait_until(LIMIT, "the second event", || !rx.events().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.log.lock().requests, 2, "the 422 was not retried");
    assert_eq!(rx.events()[0].id, ok.id);
    wait_until(LIMIT, "the delivery to be counted", || {
        bus.sink_stats("hooks").unwrap().delivered == 1
    })
    .await;
    let c = bus.sink_stats("hooks").unwrap();
    assert_eq!((c.failed, c.delivered, c.retried), (1, 1, 0));
    outbox_empty(&store, "hooks").await;
}

#[tokio::test]
async fn redelivery_keeps_the_id_so_the_receiver_dedups() {
    let rx = Receiver::start(0).await;
    let bus = Bus::from_config(&hook_config(&rx.url("hook"), "durable: false"), None)
        .await
        .unwrap();
    let event = server_down();
    bus.publish(event.clone());
    wait_until(LIMIT, "the first delivery", || rx.events().len() == 1).await;
    // Settled first: while a row is still in the outbox, the same id published again joins
    // it rather than making a second row (the receiver may have it already, the sink not
    // yet its answer; a loaded machine widens that moment).
    wait_until(LIMIT, "the first delivery to be counted", || {
        bus.sink_stats("hooks").unwrap().delivered == 1
    })
    .await;
    bus.publish(event.clone());
    wait_until(LIMIT, "the second delivery", || {
        rx.log.lock().duplicates == 1
    })
    .await;
    assert_eq!(rx.events().len(), 1);
    wait_until(LIMIT, "both deliveries to be counted", || {
        bus.sink_stats("hooks").unwrap().delivered == 2
    })
    .await;
}

#[tokio::test]
async fn out_of_attempts_an_event_is_dropped_and_counted() {
    let rx = Receiver::start(0).await;
    rx.log.lock().fail_next = 100;
    let bus = Bus::from_config(
        &hook_config(&rx.url("hook"), "durable: false\n      max_attempts: 3"),
        None,
    )
    .await
    .unwrap();
    bus.publish(server_down());
    wait_until(LIMIT, "giving up", || {
        bus.sink_stats("hooks").unwrap().failed == 1
    })
    .await;
    assert_eq!(rx.log.lock().requests, 3);
    assert_eq!(bus.sink_stats("hooks").unwrap().retried, 2);
}

#[tokio::test]
async fn a_durable_webhook_needs_the_store() {
    let err = Bus::from_config(&hook_config("http://127.0.0.1:9/", ""), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`hooks`") && err.contains("durable: false"),
        "{err}"
    );
}
