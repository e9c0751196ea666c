//! The NATS sink through the real binary, against a real `nats-server` that the test starts on
//! a free loopback port (the Debian package `nats-server`, installed by scripts/test.sh):
//!
//! * core NATS: a health check's verdicts (`server.down`, `backend.unhealthy`, `server.up`)
//!   and an inbound CloudEvent arrive as structured CloudEvents on the subjects the config
//!   names, with their `type`, `source` and `id` (the same id as on the file sink), and a
//!   sink's `types` filter keeps the other types off its subjects;
//! * JetStream (`-js -sd <tempdir>`): every event is stored in the stream in order, with
//!   `Nats-Msg-Id` set to its id; the events a stopping portcullis still held are in the
//!   stream after a graceful stop (SIGTERM), what was stored stays across the restart, and the
//!   same event id published again by the next process is dropped by the stream's duplicate
//!   window;
//! * a NATS server that is down when portcullis starts is not an error: events flow once it
//!   is up.
//!
//! Without `nats-server` these tests fail, saying how to install it. Set
//! `PORTCULLIS_SKIP_NATS=1` to skip them instead, on a machine that cannot have it.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::Full;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HEAD: &str = "listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]\n";

// ---------------------------------------------------------------------------------------------
// The NATS server
// ---------------------------------------------------------------------------------------------

/// `nats-server` on PATH or where Debian puts it; `None` only when it is missing and
/// `PORTCULLIS_SKIP_NATS=1` says to skip (the test then says so on stderr).
fn nats_server() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nats-server"))
            .find(|p| p.is_file())
    });
    let found = on_path.or_else(|| {
        ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    });
    if found.is_some() {
        return found;
    }
    if std::env::var("PORTCULLIS_SKIP_NATS").as_deref() == Ok("1") {
        eprintln!(
            "SKIPPED: nats-server is not installed (PATH, /usr/sbin, /usr/bin) and \
             PORTCULLIS_SKIP_NATS=1 is set"
        );
        return None;
    }
    panic!(
        "nats-server not found on PATH, in /usr/sbin or /usr/bin: these tests need a real NATS \
         server. Install the Debian package nats-server (scripts/test.sh does), or set \
         PORTCULLIS_SKIP_NATS=1 to skip them"
    );
}

/// A `nats-server` on a loopback port, killed on drop; with JetStream, its store is a
/// temporary directory.
struct Nats {
    child: Option<Child>,
    port: u16,
    url: String,
    _store: Option<tempfile::TempDir>,
}

impl Nats {
    /// On a free port.
    fn start(bin: &PathBuf, jetstream: bool) -> Nats {
        for _ in 0..5 {
            if let Some(n) = Nats::start_on(bin, free_port(), jetstream) {
                return n;
            }
        }
        panic!("could not start nats-server");
    }

    /// On `port`; `None` when it exits (the port was taken) or does not listen within 10 s.
    fn start_on(bin: &PathBuf, port: u16, jetstream: bool) -> Option<Nats> {
        let mut cmd = Command::new(bin);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        let store = jetstream.then(|| tempfile::tempdir().unwrap());
        if let Some(dir) = &store {
            cmd.args(["-js", "-sd"]).arg(dir.path());
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let mut n = Nats {
            child: Some(child),
            port,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = n.child.as_mut().map(Child::try_wait) {
                return None;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(n);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        n.kill();
        None
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// What a subscriber got
// ---------------------------------------------------------------------------------------------

/// One message: its subject, the headers the sink sets, and the CloudEvent it carries.
#[derive(Clone, Debug)]
struct Got {
    subject: String,
    content_type: Option<String>,
    msg_id: Option<String>,
    event: Value,
}

type Inbox = Arc<Mutex<Vec<Got>>>;

/// A header name parsed as the client parses names off the wire. (`HeaderMap::get` with a
/// `&str` always looks up a custom name, so it misses `Nats-Msg-Id`, which the client reads
/// as its standard header.)
fn header_name(name: &str) -> async_nats::header::HeaderName {
    name.parse().unwrap()
}

/// Subscribes to `subject` (wildcards allowed) and collects every message in the background.
async fn subscribe(client: &async_nats::Client, subject: &str) -> Inbox {
    let mut sub = client.subscribe(subject.to_owned()).await.unwrap();
    client.flush().await.unwrap();
    let inbox: Inbox = Arc::default();
    let into = inbox.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let header = |n: async_nats::header::HeaderName| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(n))
                    .map(|v| v.as_str().to_owned())
            };
            // A payload that is not JSON is kept as text, so the assertion that reads it
            // shows it.
            let event = serde_json::from_slice(&m.payload)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&m.payload).into()));
            into.lock().unwrap().push(Got {
                subject: m.subject.to_string(),
                content_type: header(header_name("Content-Type")),
                msg_id: header(header_name("Nats-Msg-Id")),
                event,
            });
        }
    });
    inbox
}

fn got(inbox: &Inbox) -> Vec<Got> {
    inbox.lock().unwrap().clone()
}

fn of_type(inbox: &Inbox, t: &str) -> Vec<Got> {
    got(inbox)
        .into_iter()
        .filter(|g| g.event["type"] == t)
        .collect()
}

/// Waits up to `timeout` for a message that `f` accepts.
async fn wait_for(inbox: &Inbox, what: &str, timeout: Duration, f: impl Fn(&Got) -> bool) -> Got {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(g) = got(inbox).into_iter().find(|g| f(g)) {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {timeout:?}; got:\n{:#?}",
            got(inbox)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The CloudEvents `source` of portcullis's own events from process `p`
/// (`portcullis://$HOSTNAME`, or `portcullis://pid-<pid>` without one; see docs/events.md).
fn source_of(p: &Proxy) -> String {
    match std::env::var("HOSTNAME") {
        Ok(h) if !h.is_empty() => format!("portcullis://{h}"),
        _ => format!("portcullis://pid-{}", p.child.id()),
    }
}

/// The attributes every CloudEvent from portcullis has: structured mode on the wire, the
/// message id is the event id, and `time` is RFC 3339.
fn assert_cloudevent(g: &Got) {
    assert_eq!(
        g.content_type.as_deref(),
        Some("application/cloudevents+json"),
        "{g:#?}"
    );
    assert_eq!(g.event["specversion"], "1.0", "{g:#?}");
    let id = g.event["id"].as_str().expect("an id");
    assert!(!id.is_empty(), "{g:#?}");
    assert_eq!(g.msg_id.as_deref(), Some(id), "Nats-Msg-Id is the event id");
    let time = g.event["time"].as_str().expect("a time");
    time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("time `{time}` is not RFC 3339: {e}"));
}

/// A random UUID, as portcullis gives its own events.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// The events of the JSON-lines sink at `{dir}/events.jsonl`.
fn file_events(p: &Proxy) -> Vec<Value> {
    std::fs::read_to_string(p.dir.path().join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn post_events(p: &Proxy, content_type: &str, body: &Value) -> Value {
    let r = client()
        .post(p.admin_url("/api/v1/events"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(status, 202, "{text}\nlog:\n{}", p.log_text());
    serde_json::from_str(&text).unwrap()
}

fn ce(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "https://ci.example.com",
           "type": "com.example.deploy.finished", "subject": "billing",
           "data": {"version": "1.2.3"}})
}

/// A counter of `/metrics`, or 0 when it is not there.
async fn metric(p: &Proxy, series: &str) -> u64 {
    let (s, text) = p.admin(reqwest::Method::GET, "/metrics", None).await;
    assert_eq!(s, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A backend `api` with one server `s1` at `addr`, health-checked every 200ms (two failures
/// mark it down, one pass up), behind a public route.
fn backend(addr: &str) -> String {
    format!(
        "backends:
  - name: api
    servers: [{{ name: s1, address: \"{addr}\" }}]
    health_check: {{ tcp: true, interval: 200ms, timeout: 200ms, rise: 1, fall: 2 }}
routes:
  - {{ name: r, match: {{ path_prefix: / }}, backend: api, public: true }}
"
    )
}

async fn api_origin_on(listener: tokio::net::TcpListener) -> Origin {
    Origin::start_on(listener, |_req| async {
        hyper::Response::new(Full::new(Bytes::from("api")))
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Core NATS
// ---------------------------------------------------------------------------------------------

/// Two NATS sinks on one server: `bus` takes every event on `portcullis.events.{type}`, and
/// `health` only `dev.portcullis.server.*` on `ops.health.{type}`. An inbound CloudEvent and
/// a health check's verdicts on a killed (then restarted) origin arrive on those subjects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_gets_verdicts_and_inbound_events_on_the_configured_subjects() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin, false);
    let nc = async_nats::connect(&nats.url).await.unwrap();
    let bus = subscribe(&nc, "portcullis.events.>").await;
    let health = subscribe(&nc, "ops.health.>").await;
    let stray = subscribe(&nc, ">").await;

    let origin = Origin::named("api").await;
    let addr = origin.addr;
    let yaml = format!(
        "{HEAD}events:
  sinks:
    - {{ name: bus, nats: {{ url: \"{url}\" }} }}
    - name: health
      nats: {{ url: \"{url}\", subject: \"ops.health.{{type}}\" }}
      types: [\"dev.portcullis.server.*\"]
    - {{ name: log, file: {{ path: \"{{dir}}/events.jsonl\" }} }}
{}",
        backend(&addr.to_string()),
        url = nats.url
    );
    let p = Proxy::start(&yaml).await;
    let r = client().get(p.url("/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "api");

    // An inbound CloudEvent keeps its id, source, type, subject and data, on the subject of
    // its type.
    let accepted = post_events(&p, "application/cloudevents+json", &ce("deploy-4711")).await;
    assert_eq!(accepted, json!({"accepted": ["deploy-4711"]}));
    let g = wait_for(&bus, "the inbound event", Duration::from_secs(10), |g| {
        g.event["id"] == "deploy-4711"
    })
    .await;
    assert_cloudevent(&g);
    assert_eq!(g.subject, "portcullis.events.com.example.deploy.finished");
    assert_eq!(g.event["type"], "com.example.deploy.finished");
    assert_eq!(g.event["source"], "https://ci.example.com");
    assert_eq!(g.event["subject"], "billing");
    assert_eq!(g.event["data"], json!({"version": "1.2.3"}));

    // The origin dies: two failed checks are `server.down`, and the backend, with no server
    // left, `backend.unhealthy`.
    origin.stop();
    drop(origin);
    let down = wait_for(&bus, "server.down", Duration::from_secs(10), |g| {
        g.event["type"] == "dev.portcullis.server.down"
    })
    .await;
    assert_cloudevent(&down);
    assert_eq!(down.subject, "portcullis.events.dev.portcullis.server.down");
    assert_eq!(down.event["source"], source_of(&p).as_str());
    assert_eq!(down.event["subject"], "default/api/s1");
    let down_id = down.event["id"].as_str().unwrap().to_owned();
    assert!(is_uuid(&down_id), "{down_id}");
    assert!(down.event.get("causedby").is_none(), "{down:#?}");
    let data = &down.event["data"];
    assert_eq!(data["backend"], "default/api");
    assert_eq!(data["server"], "s1");
    assert_eq!(data["address"], addr.to_string());
    assert_eq!((&data["healthy"], &data["total"]), (&json!(0), &json!(1)));
    assert!(
        data["reason"]
            .as_str()
            .unwrap()
            .starts_with("2 failed health checks"),
        "{data}"
    );
    let unhealthy = wait_for(&bus, "backend.unhealthy", Duration::from_secs(10), |g| {
        g.event["type"] == "dev.portcullis.backend.unhealthy"
    })
    .await;
    assert_cloudevent(&unhealthy);
    assert_eq!(
        unhealthy.subject,
        "portcullis.events.dev.portcullis.backend.unhealthy"
    );
    assert_eq!(unhealthy.event["subject"], "default/api");
    assert_eq!(unhealthy.event["source"], source_of(&p).as_str());

    // The same event, with the same id, on the second sink's own subject.
    let h = wait_for(
        &health,
        "server.down on ops.health",
        Duration::from_secs(10),
        |g| g.event["type"] == "dev.portcullis.server.down",
    )
    .await;
    assert_eq!(h.subject, "ops.health.dev.portcullis.server.down");
    assert_eq!(h.event, down.event, "one event, two sinks");

    // Back on the same port: `server.up`, on both subjects.
    let _back = api_origin_on(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
    let up = wait_for(&bus, "server.up", Duration::from_secs(10), |g| {
        g.event["type"] == "dev.portcullis.server.up"
    })
    .await;
    assert_cloudevent(&up);
    assert_eq!(up.subject, "portcullis.events.dev.portcullis.server.up");
    assert_eq!(up.event["subject"], "default/api/s1");
    assert_eq!(up.event["source"], source_of(&p).as_str());
    assert_eq!(up.event["data"]["healthy"], 1);
    assert!(is_uuid(up.event["id"].as_str().unwrap()));
    assert_ne!(up.event["id"], down.event["id"]);
    wait_for(
        &health,
        "server.up on ops.health",
        Duration::from_secs(10),
        |g| g.event["type"] == "dev.portcullis.server.up" && g.event["id"] == up.event["id"],
    )
    .await;

    // Settle, then count: each event once per sink, each sink only on its subjects and
    // within its `types`, and the file sink saw the very same events.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on_bus = got(&bus);
    let types: Vec<&str> = on_bus
        .iter()
        .map(|g| g.event["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "com.example.deploy.finished",
            "dev.portcullis.server.down",
            "dev.portcullis.backend.unhealthy",
            "dev.portcullis.server.up"
        ],
        "{on_bus:#?}"
    );
    for g in &on_bus {
        assert_eq!(
            g.subject,
            format!("portcullis.events.{}", g.event["type"].as_str().unwrap())
        );
    }
    let on_health = got(&health);
    assert_eq!(on_health.len(), 2, "server.* only: {on_health:#?}");
    assert!(of_type(&health, "com.example.deploy.finished").is_empty());
    let everywhere = got(&stray);
    assert_eq!(
        everywhere.len(),
        on_bus.len() + on_health.len(),
        "nothing on other subjects: {everywhere:#?}"
    );
    let in_file = file_events(&p);
    let ids = |v: &mut dyn Iterator<Item = &Value>| -> Vec<String> {
        v.map(|e| e["id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(
        ids(&mut in_file.iter()),
        ids(&mut on_bus.iter().map(|g| &g.event)),
        "the file sink has the same events, ids and order"
    );
    for (f, n) in in_file.iter().zip(&on_bus) {
        assert_eq!(f, &n.event);
    }

    assert_eq!(
        metric(
            &p,
            "portcullis_events_total{sink=\"bus\",result=\"delivered\"}"
        )
        .await,
        4
    );
    assert_eq!(
        metric(
            &p,
            "portcullis_events_total{sink=\"health\",result=\"delivered\"}"
        )
        .await,
        2
    );
    for sink in ["bus", "health"] {
        for result in ["failed", "dropped"] {
            let series = format!("portcullis_events_total{{sink=\"{sink}\",result=\"{result}\"}}");
            assert_eq!(metric(&p, &series).await, 0, "{series}");
        }
    }
    drop(nats);
}

// ---------------------------------------------------------------------------------------------
// JetStream
// ---------------------------------------------------------------------------------------------

/// Every message of the stream, in sequence order, as (subject, Nats-Msg-Id, CloudEvent).
async fn stored(
    stream: &mut async_nats::jetstream::stream::Stream,
) -> Vec<(String, String, Value)> {
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        let id = m
            .headers
            .get(header_name("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let ct = m
            .headers
            .get(header_name("Content-Type"))
            .map(|v| v.as_str().to_owned());
        assert_eq!(ct.as_deref(), Some("application/cloudevents+json"));
        out.push((
            m.subject.to_string(),
            id,
            serde_json::from_slice(&m.payload).unwrap(),
        ));
    }
    out
}

async fn wait_stored(
    stream: &mut async_nats::jetstream::stream::Stream,
    what: &str,
    f: impl Fn(&[(String, String, Value)]) -> bool,
) -> Vec<(String, String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = stored(stream).await;
        if f(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the stream never had {what}: {now:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stored_ids(s: &[(String, String, Value)]) -> Vec<&str> {
    s.iter().map(|(_, id, _)| id.as_str()).collect()
}

/// With `jetstream: true`, each event is acked by the stream, which keeps it with its id as
/// `Nats-Msg-Id`. Events a stopping process still held are stored by its graceful stop; what
/// was stored stays across the restart; the next process's publish of an id already stored is
/// dropped by the stream's duplicate window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_stores_every_event_across_a_portcullis_restart() {
    let Some(bin) = nats_server() else { return };
    let nats = Nats::start(&bin, true);
    let nc = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(nc);
    let mut stream = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match js
                .create_stream(async_nats::jetstream::stream::Config {
                    name: "PORTCULLIS".into(),
                    subjects: vec!["portcullis.js.>".into()],
                    ..Default::default()
                })
                .await
            {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("JetStream not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot create the stream: {e}"),
            }
        }
    };

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let origin = api_origin_on(l).await;
    let yaml = format!(
        "{HEAD}events:
  sinks:
    - name: js
      nats: {{ url: \"{url}\", subject: \"portcullis.js.{{type}}\", jetstream: true, timeout: 2s }}
    - {{ name: log, file: {{ path: \"{{dir}}/events.jsonl\" }} }}
{}",
        backend(&addr.to_string()),
        url = nats.url
    );
    let p1 = Proxy::start(&yaml).await;
    let source1 = source_of(&p1);

    // A batch of three inbound events, then the origin's death and return.
    let batch = json!([ce("js-1"), ce("js-2"), ce("js-3")]);
    let accepted = post_events(&p1, "application/cloudevents-batch+json", &batch).await;
    assert_eq!(accepted, json!({"accepted": ["js-1", "js-2", "js-3"]}));
    origin.stop();
    drop(origin);
    wait_stored(&mut stream, "backend.unhealthy", |s| {
        s.iter()
            .any(|(_, _, e)| e["type"] == "dev.portcullis.backend.unhealthy")
    })
    .await;
    let _back = api_origin_on(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
    let s = wait_stored(&mut stream, "server.up", |s| {
        s.iter()
            .any(|(_, _, e)| e["type"] == "dev.portcullis.server.up")
    })
    .await;
    let types: Vec<&str> = s
        .iter()
        .map(|(_, _, e)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "com.example.deploy.finished",
            "com.example.deploy.finished",
            "com.example.deploy.finished",
            "dev.portcullis.server.down",
            "dev.portcullis.backend.unhealthy",
            "dev.portcullis.server.up"
        ],
        "{s:#?}"
    );
    assert_eq!(&stored_ids(&s)[..3], ["js-1", "js-2", "js-3"]);
    for (subject, id, e) in &s {
        assert_eq!(
            subject,
            &format!("portcullis.js.{}", e["type"].as_str().unwrap())
        );
        assert_eq!(e["id"], id.as_str(), "Nats-Msg-Id is the event id");
        assert_eq!(e["specversion"], "1.0");
        if e["type"].as_str().unwrap().starts_with("dev.portcullis.") {
            assert_eq!(e["source"], source1.as_str());
            assert!(is_uuid(id), "{id}");
        } else {
            assert_eq!(e["source"], "https://ci.example.com");
        }
    }
    assert_eq!(s[3].2["subject"], "default/api/s1");
    assert_eq!(s[4].2["subject"], "default/api");
    // The stream holds what the file sink wrote: the same events.
    assert!(
        eventually(Duration::from_secs(5), || {
            let n = file_events(&p1).len();
            async move { n >= 6 }
        })
        .await
    );
    let in_file = file_events(&p1);
    assert_eq!(
        in_file,
        s.iter().map(|(_, _, e)| e.clone()).collect::<Vec<_>>()
    );
    assert_eq!(
        metric(
            &p1,
            "portcullis_events_total{sink=\"js\",result=\"delivered\"}"
        )
        .await,
        6
    );
    assert_eq!(
        metric(
            &p1,
            "portcullis_events_total{sink=\"js\",result=\"failed\"}"
        )
        .await,
        0
    );

    // An event accepted just before a graceful stop is stored: the stop hands queued events
    // to their sinks, and the JetStream sink waits for the ack.
    post_events(&p1, "application/cloudevents+json", &ce("js-4")).await;
    p1.signal(libc::SIGTERM);
    let mut p1 = p1;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = p1.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "portcullis did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}\n{}", p1.log_text());
    let s = stored(&mut stream).await;
    assert_eq!(
        s.len(),
        7,
        "js-4 was stored before the process exited: {s:#?}"
    );
    assert_eq!(s[6].1, "js-4");
    drop(p1);

    // A new process: the stream still holds everything, and its publish of an id already
    // stored (a redelivery, as after a crash) is dropped by the duplicate window, while a new
    // event is stored after the old ones.
    let p2 = Proxy::start(&yaml).await;
    let batch = json!([ce("js-1"), ce("js-5")]);
    post_events(&p2, "application/cloudevents-batch+json", &batch).await;
    let s = wait_stored(&mut stream, "js-5", |s| stored_ids(s).contains(&"js-5")).await;
    assert_eq!(
        stored_ids(&s).iter().filter(|id| **id == "js-1").count(),
        1,
        "the duplicate was dropped: {s:#?}"
    );
    assert_eq!(s.len(), 8, "{s:#?}");
    assert_eq!(stored_ids(&s)[..3], ["js-1", "js-2", "js-3"]);
    assert_eq!(s[7].1, "js-5");
    // Both publishes were acked (a duplicate is acked too): delivered, nothing failed.
    assert_eq!(
        metric(
            &p2,
            "portcullis_events_total{sink=\"js\",result=\"delivered\"}"
        )
        .await,
        2
    );
    assert_eq!(
        metric(
            &p2,
            "portcullis_events_total{sink=\"js\",result=\"failed\"}"
        )
        .await,
        0
    );
    drop(nats);
}

// ---------------------------------------------------------------------------------------------
// A NATS server that is not there yet
// ---------------------------------------------------------------------------------------------

/// portcullis starts while nothing listens on the NATS port (not an error), takes events
/// without waiting, and delivers once the server is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_down_at_start_is_not_an_error() {
    let Some(bin) = nats_server() else { return };
    let port = free_port();
    let yaml = format!(
        "{HEAD}events:
  sinks:
    - {{ name: bus, nats: {{ url: \"nats://127.0.0.1:{port}\", timeout: 1s }} }}
backends:
  - {{ name: echo, servers: [{{ name: s1, address: \"builtin:echo\" }}] }}
routes:
  - {{ name: r, match: {{ path_prefix: / }}, backend: echo, public: true }}
"
    );
    let p = Proxy::start(&yaml).await;
    let started = Instant::now();
    post_events(&p, "application/cloudevents+json", &ce("early")).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the inbound endpoint waited on NATS"
    );

    let nats = Nats::start_on(&bin, port, false)
        .unwrap_or_else(|| panic!("nats-server could not take port {port}"));
    let nc = async_nats::connect(&nats.url).await.unwrap();
    let bus = subscribe(&nc, "portcullis.events.>").await;
    // The client reconnects with a backoff: post until one gets through.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        post_events(
            &p,
            "application/cloudevents+json",
            &ce(&format!("late-{n}")),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if got(&bus)
            .iter()
            .any(|g| g.event["id"].as_str().unwrap_or("").starts_with("late-"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing arrived within 30 s of the NATS server's start; log:\n{}",
            p.log_text()
        );
    }
    let g = got(&bus)
        .into_iter()
        .find(|g| g.event["id"].as_str().unwrap_or("").starts_with("late-"))
        .unwrap();
    assert_cloudevent(&g);
    assert_eq!(g.subject, "portcullis.events.com.example.deploy.finished");
    assert_eq!(g.event["source"], "https://ci.example.com");
    assert_eq!(nats.port, port);
}
