//! The live event stream of the admin API (`GET /api/v1/events/stream`), through the real
//! binary: a watcher gets the events published after it connected, filtered by type, as
//! server-sent events; without credentials it gets nothing.

mod common;

use common::{Origin, Proxy, ADMIN_TOKEN};
use futures_util::StreamExt;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_gets_the_events_it_asked_for_live() {
    let origin = Origin::named("o").await;
    let p = Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\nbackends: [{{ name: b, servers: [{{ name: s, address: \"{}\" }}] }}]\nroutes: [{{ name: r, match: {{ path_prefix: / }}, backend: b, public: true }}]\n",
        origin.address()
    ))
    .await;
    let c = reqwest::Client::new();
    let unauth = c
        .get(p.admin_url("/api/v1/events/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    let resp = c
        .get(p.admin_url("/api/v1/events/stream?types=com.example.wanted.*"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.bytes_stream();
    for (id, ty) in [
        ("e-1", "com.example.other"),
        ("e-2", "com.example.wanted.one"),
    ] {
        let ev = serde_json::json!({ "specversion": "1.0", "id": id, "source": "/t", "type": ty, "data": { "n": 1 } });
        let r = c
            .post(p.admin_url("/api/v1/events"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/cloudevents+json")
            .body(ev.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let mut text = String::new();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains("e-2") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(got, Ok(true), "{text}");
    assert!(
        text.contains("event: cloudevent") && text.contains("id: e-2"),
        "{text}"
    );
    assert!(
        !text.contains("e-1"),
        "a filtered-out type was sent: {text}"
    );
    let data = text.lines().find(|l| l.starts_with("data: ")).unwrap();
    let ev: serde_json::Value = serde_json::from_str(&data["data: ".len()..]).unwrap();
    assert_eq!(ev["type"], "com.example.wanted.one");
    assert_eq!(ev["data"]["n"], 1);
}
