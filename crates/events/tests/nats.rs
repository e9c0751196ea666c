//! The NATS sink against a real `nats-server` (started by the test on a free loopback port,
//! with JetStream in a temporary directory): events arrive on their subjects as structured
//! CloudEvents, and JetStream publishes are acked, stored and deduplicated by event id.

mod support;

use futures_util::StreamExt;
use portcullis_events::{types, Bus, Event, EventsCfg, ServerChange, ServerData, Source};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `nats-server` child, killed on drop.
struct NatsServer {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nats_server_binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")]);
    for dir in candidates {
        let bin = dir.join("nats-server");
        if bin.is_file() {
            return bin;
        }
    }
    panic!(
        "nats-server is not installed: these tests need a real NATS server. Install it with \
         `apt-get install nats-server` (Debian), or run scripts/test.sh, which does"
    );
}

fn start_nats() -> NatsServer {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let child = Command::new(nats_server_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nats-server did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    NatsServer {
        child,
        url: format!("nats://127.0.0.1:{port}"),
        _dir: dir,
    }
}

fn config(url: &str, subject: &str, jetstream: bool) -> EventsCfg {
    serde_yaml_ng::from_str(&format!(
        r#"
sinks:
  - name: bus
    nats: {{ url: "{url}", subject: "{subject}", jetstream: {jetstream}, timeout: 2s }}
"#
    ))
    .unwrap()
}

fn server(change: ServerChange, n: u32) -> Event {
    Source::new("portcullis://nats-test").server(
        change,
        ServerData::new("api", format!("10.0.0.{n}:80"), "test", 1, 2),
    )
}

#[tokio::test]
async fn core_nats_receives_events_on_their_subjects() {
    let nats = start_nats();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut sub = client.subscribe("portcullis.events.>").await.unwrap();
    client.flush().await.unwrap();

    let bus = Bus::from_config(&config(&nats.url, "portcullis.events.{type}", false), None)
        .await
        .unwrap();
    let sent = [server(ServerChange::Down, 1), server(ServerChange::Up, 1)];
    for e in &sent {
        bus.publish(e.clone());
    }
    for e in &sent {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a message within 10 s")
            .unwrap();
        assert_eq!(
            msg.subject.as_str(),
            format!("portcullis.events.{}", e.type_)
        );
        let got = Event::from_json(&msg.payload, 1 << 20).unwrap();
        assert_eq!(&got, e);
        let headers = msg.headers.unwrap();
        assert_eq!(
            headers.get("Content-Type").unwrap().as_str(),
            "application/cloudevents+json"
        );
    }
    assert!(bus.shutdown(Duration::from_secs(5)).await);
    assert_eq!(bus.sink_stats("bus").unwrap().delivered, 2);
}

#[tokio::test]
async fn jetstream_acks_stores_and_dedups_by_event_id() {
    let nats = start_nats();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "PORTCULLIS".into(),
            subjects: vec!["portcullis.js.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    let bus = Bus::from_config(&config(&nats.url, "portcullis.js.{type}", true), None)
        .await
        .unwrap();
    let down = server(ServerChange::Down, 7);
    bus.publish(down.clone());
    bus.publish(server(ServerChange::Up, 7));
    bus.publish(down.clone()); // Redelivered: the same id.
    support::wait_until(Duration::from_secs(10), "three acks", || {
        bus.sink_stats("bus").unwrap().delivered == 3
    })
    .await;
    assert_eq!(bus.sink_stats("bus").unwrap().failed, 0);
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        2,
        "the duplicate was dropped"
    );
    let first = stream.get_raw_message(1).await.unwrap();
    assert_eq!(
        first.subject.as_str(),
        format!("portcullis.js.{}", types::SERVER_DOWN)
    );
    assert_eq!(Event::from_json(&first.payload, 1 << 20).unwrap(), down);
}

#[tokio::test]
async fn jetstream_without_a_stream_counts_failures_and_never_blocks_publish() {
    let nats = start_nats();
    let mut cfg = config(&nats.url, "nowhere.{type}", true);
    if let portcullis_events::SinkKind::Nats(n) = &mut cfg.sinks[0].kind {
        n.timeout = Duration::from_millis(300);
    }
    let bus = Bus::from_config(&cfg, None).await.unwrap();
    let start = Instant::now();
    bus.publish(server(ServerChange::Down, 1));
    assert!(start.elapsed() < Duration::from_millis(50));
    support::wait_until(Duration::from_secs(10), "the failure", || {
        bus.sink_stats("bus").unwrap().failed == 1
    })
    .await;
}
