//! Events through the real binary: a health check's verdicts on a signed webhook, reloads
//! on a JSON-lines file, inbound CloudEvents and their refusals, a real Alertmanager posting
//! to the inbound endpoint, and request-level events aggregated into one per window.

mod common;
use base64::Engine;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HEAD: &str = "listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]\n";

/// The events of a JSON-lines sink so far.
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits up to `timeout` for an event that `f` accepts in the file.
async fn wait_line(path: &Path, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    eventually(timeout, || {
        found = lines(path).into_iter().find(|e| f(e));
        let ok = found.is_some();
        async move { ok }
    })
    .await;
    found.unwrap_or_else(|| panic!("no such event in {}:\n{:#?}", path.display(), lines(path)))
}

fn of_type<'a>(events: &'a [Value], t: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == t).collect()
}

// ---------------------------------------------------------------------------------------------
// Standard Webhooks signatures, checked independently of portcullis: HMAC-SHA256 by hand.
// ---------------------------------------------------------------------------------------------

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// `v1,<base64>` of `{id}.{timestamp}.{body}` under `whsec_<base64>`.
fn sign(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut msg = format!("{id}.{timestamp}.").into_bytes();
    msg.extend_from_slice(body);
    format!("v1,{}", b64.encode(hmac_sha256(&key, &msg)))
}

#[test]
fn the_signature_check_matches_the_standard_webhooks_example() {
    assert_eq!(
        sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#
        ),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
}

/// What a webhook receiver got: headers and body of each POST.
type Received = Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>;

async fn receiver() -> (Origin, Received) {
    let got: Received = Arc::default();
    let g = got.clone();
    let origin = Origin::start(move |req| {
        let g = g.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            g.lock().unwrap().push((parts.headers, body));
            hyper::Response::new(Full::new(Bytes::new()))
        }
    })
    .await;
    (origin, got)
}

/// The events received so far, each checked: its signature verifies, and `webhook-id` is
/// its CloudEvent id.
fn verified(got: &Received, secret: &str) -> Vec<Value> {
    got.lock()
        .unwrap()
        .iter()
        .map(|(h, body)| {
            let header = |n: &str| h[n].to_str().unwrap().to_owned();
            let (id, ts) = (header("webhook-id"), header("webhook-timestamp"));
            let want = sign(secret, &id, &ts, body);
            assert!(
                header("webhook-signature").split(' ').any(|s| s == want),
                "bad signature on {id}"
            );
            let ct = h["content-type"].to_str().unwrap();
            assert!(ct.starts_with("application/cloudevents+json"), "{ct}");
            let e: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(e["id"], id.as_str());
            e
        })
        .collect()
}

/// (a) A killed origin is `server.down` (and its backend `backend.unhealthy`) on a signed
/// webhook; back, it is `server.up`. The secret comes from a file through `${file:}`.
#[tokio::test]
async fn a_killed_origin_is_server_down_on_a_signed_webhook_then_server_up() {
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(b"a test secret, 32 bytes long...!")
    );
    let (hook, got) = receiver().await;
    let origin = Origin::named("api").await;
    let addr = origin.addr;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hook.key"), format!("{secret}\n")).unwrap();
    let yaml = format!(
        "{HEAD}events:
  sinks:
    - name: hooks
      webhook: {{ url: \"http://{hook}/hook\", secret: \"${{file:hook.key}}\", backoff: {{ min: 100ms, max: 1s }} }}
      types: [\"dev.portcullis.server.*\", \"dev.portcullis.backend.*\"]
backends:
  - name: api
    servers: [{{ name: s1, address: \"{addr}\" }}]
    health_check: {{ tcp: true, interval: 200ms, timeout: 200ms, rise: 1, fall: 2 }}
routes:
  - {{ name: r, match: {{ path_prefix: / }}, backend: api, public: true }}
",
        hook = hook.addr
    );
    let p = Proxy::start_in(dir, &yaml).await;
    let r = client().get(p.url("/")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "api");

    origin.stop();
    drop(origin);
    let down = |events: &[Value]| !of_type(events, "dev.portcullis.backend.unhealthy").is_empty();
    assert!(
        eventually(Duration::from_secs(10), || {
            let ok = down(&verified(&got, &secret));
            async move { ok }
        })
        .await,
        "no server.down and backend.unhealthy: {:#?}\n{}",
        verified(&got, &secret),
        p.log_text()
    );
    let events = verified(&got, &secret);
    let d = of_type(&events, "dev.portcullis.server.down");
    assert_eq!(d.len(), 1, "one verdict, one event: {events:#?}");
    assert_eq!(d[0]["subject"], "default/api/s1");
    assert_eq!(d[0]["data"]["backend"], "default/api");
    assert_eq!(d[0]["data"]["server"], "s1");
    assert_eq!(d[0]["data"]["address"], addr.to_string());
    assert_eq!(
        (&d[0]["data"]["healthy"], &d[0]["data"]["total"]),
        (&json!(0), &json!(1))
    );
    let reason = d[0]["data"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("2 failed health checks: connection refused"),
        "{reason}"
    );
    assert!(d[0]["source"]
        .as_str()
        .unwrap()
        .starts_with("portcullis://"));
    assert!(d[0].get("causedby").is_none());
    let u = of_type(&events, "dev.portcullis.backend.unhealthy");
    assert_eq!(u[0]["subject"], "default/api");

    // Back on the same port.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _back = Origin::start_on(listener, |_req| async {
        hyper::Response::new(Full::new(Bytes::from("api")))
    })
    .await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let ok = !of_type(&verified(&got, &secret), "dev.portcullis.server.up").is_empty();
            async move { ok }
        })
        .await,
        "no server.up: {:#?}",
        verified(&got, &secret)
    );
    let events = verified(&got, &secret);
    let u = of_type(&events, "dev.portcullis.server.up");
    assert_eq!(u[0]["data"]["healthy"], 1);
    assert_eq!(of_type(&events, "dev.portcullis.server.down").len(), 1);
}

/// A config with a JSON-lines sink at `{dir}/events.jsonl` and `more` after it.
fn file_config(more: &str) -> String {
    format!(
        "{HEAD}events:
  sinks:
    - {{ name: log, file: {{ path: \"{{dir}}/events.jsonl\" }} }}
{more}
backends:
  - {{ name: echo, servers: [{{ name: s1, address: \"builtin:echo\" }}] }}
routes:
  - {{ name: r, match: {{ path_prefix: / }}, backend: echo, public: true }}
"
    )
}

fn sink(p: &Proxy) -> PathBuf {
    p.dir.path().join("events.jsonl")
}

/// (b) A reload is `config.reloaded` with the new generation; a bad config is
/// `config.rejected` with its errors located. The sink's counts are scraped.
#[tokio::test]
async fn reloads_done_and_rejected_are_events_on_a_file() {
    let p = Proxy::start(&file_config("")).await;
    p.write_config(&format!(
        "{}  - {{ name: r2, match: {{ path_prefix: /two/ }}, backend: echo, public: true }}\n",
        file_config("")
    ));
    let (s, b) = p.admin(reqwest::Method::POST, "/api/v1/reload", None).await;
    assert_eq!(s, 200, "{b}");
    let e = wait_line(&sink(&p), Duration::from_secs(10), |e| {
        e["type"] == "dev.portcullis.config.reloaded"
    })
    .await;
    assert_eq!(e["data"]["generation"], 2);
    let trigger = e["data"]["trigger"].as_str().unwrap();
    // The admin API, or the file watcher when it saw the change first.
    assert!(trigger == "api" || trigger == "file", "{trigger}");

    p.write_config(&file_config("").replace("backend: echo", "backend: nope"));
    let (s, b) = p.admin(reqwest::Method::POST, "/api/v1/reload", None).await;
    assert_eq!(s, 422, "{b}");
    let e = wait_line(&sink(&p), Duration::from_secs(10), |e| {
        e["type"] == "dev.portcullis.config.rejected"
    })
    .await;
    assert_eq!(e["data"]["generation"], 2, "the running config stays");
    let errors = e["data"]["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|x| x.as_str().unwrap().contains("portcullis.yaml:")
                && x.as_str().unwrap().contains("nope")),
        "{errors:?}"
    );
    let reloaded = of_type(&lines(&sink(&p)), "dev.portcullis.config.reloaded").len();
    assert_eq!(
        reloaded, 1,
        "the second look at an unchanged config is no event"
    );

    let (s, metrics) = p.admin(reqwest::Method::GET, "/metrics", None).await;
    assert_eq!(s, 200);
    assert!(
        metrics.contains("portcullis_events_total{sink=\"log\",result=\"delivered\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_events_total{sink=\"log\",result=\"dropped\"} 0"),
        "{metrics}"
    );
}

async fn post(
    p: &Proxy,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
    token: bool,
) -> (u16, Value) {
    let mut r = client().post(p.admin_url("/api/v1/events")).body(body);
    if token {
        r = r.bearer_auth(ADMIN_TOKEN);
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

const STRUCTURED: (&str, &str) = ("content-type", "application/cloudevents+json");
const BATCH: (&str, &str) = ("content-type", "application/cloudevents-batch+json");

fn ce(id: &str, type_: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "https://ci.example.com", "type": type_,
           "subject": "billing", "data": {"version": "1.2.3"}})
}

/// The audit records of the inbound endpoint.
fn published_records(p: &Proxy) -> Vec<Value> {
    let mut out = Vec::new();
    for f in std::fs::read_dir(p.dir.path().join("audit")).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        for l in text.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            if v["detail"]["action"] == "publish_events" {
                out.push(v);
            }
        }
    }
    out
}

/// (c) Inbound: structured, binary and batch CloudEvents are taken (202, on the sink, one
/// audit record each request); malformed, incomplete, oversized, forged and unauthenticated
/// posts get their 4xx and leave nothing behind.
#[tokio::test]
async fn inbound_events_are_taken_or_refused_with_nothing_left_behind() {
    let p = Proxy::start(&file_config("")).await;
    let deploy = "com.example.deploy.finished";

    // Refusals first: were any of them published, they would reach the sink before the
    // accepted ones.
    let (s, b) = post(&p, &[STRUCTURED], "{\"id\": \"bad-json\",", true).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["error"].as_str().unwrap().contains("not JSON"), "{b}");
    let mut missing = ce("bad-missing", deploy);
    missing.as_object_mut().unwrap().remove("specversion");
    let (s, b) = post(&p, &[STRUCTURED], missing.to_string(), true).await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("`specversion` is missing"),
        "{b}"
    );
    let mut wrong = ce("bad-version", deploy);
    wrong["specversion"] = json!("0.3");
    let (s, b) = post(&p, &[STRUCTURED], wrong.to_string(), true).await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("specversion is `0.3`"),
        "{b}"
    );
    let mut big = ce("bad-big", deploy);
    big["data"] = json!({ "pad": "x".repeat(300 * 1024) });
    let (s, b) = post(&p, &[STRUCTURED], big.to_string(), true).await;
    assert_eq!(s, 413, "{b}");
    // Without a Content-Length too (chunked): refused once the limit is passed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..40).map(|_| Ok(vec![b' '; 8 * 1024])).collect();
    let stream = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let (s, b) = post(&p, &[STRUCTURED], stream, true).await;
    assert_eq!(s, 413, "{b}");
    let (s, b) = post(
        &p,
        &[STRUCTURED],
        ce("bad-forged", "dev.portcullis.server.down").to_string(),
        true,
    )
    .await;
    assert_eq!(s, 403, "{b}");
    assert!(b["error"].as_str().unwrap().contains("reserved"), "{b}");
    let batch = json!([
        ce("bad-batch-ok", deploy),
        ce("bad-batch-forged", "dev.portcullis.config.reloaded")
    ]);
    let (s, b) = post(&p, &[BATCH], batch.to_string(), true).await;
    assert_eq!(s, 403, "{b}");
    assert!(b["error"].as_str().unwrap().starts_with("event 1: "), "{b}");
    let (s, b) = post(
        &p,
        &[STRUCTURED],
        ce("bad-anonymous", deploy).to_string(),
        false,
    )
    .await;
    assert_eq!(s, 401, "{b}");
    let (s, b) = post(&p, &[("content-type", "text/plain")], "hello", true).await;
    assert_eq!(s, 415, "{b}");

    // Accepted: structured, binary, batch.
    let (s, b) = post(
        &p,
        &[STRUCTURED],
        ce("in-structured", deploy).to_string(),
        true,
    )
    .await;
    assert_eq!((s, &b["accepted"]), (202, &json!(["in-structured"])), "{b}");
    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "in-binary"),
        ("ce-source", "https://ci.example.com"),
        ("ce-type", "com.example.build.failed"),
        ("ce-subject", "billing"),
        ("content-type", "application/json"),
    ];
    let (s, b) = post(&p, &binary, "{\"job\": 7}", true).await;
    assert_eq!((s, &b["accepted"]), (202, &json!(["in-binary"])), "{b}");
    let batch = json!([ce("in-batch-1", deploy), ce("in-batch-2", deploy)]);
    let (s, b) = post(&p, &[BATCH], batch.to_string(), true).await;
    assert_eq!(
        (s, &b["accepted"]),
        (202, &json!(["in-batch-1", "in-batch-2"])),
        "{b}"
    );

    let ids = ["in-structured", "in-binary", "in-batch-1", "in-batch-2"];
    assert!(
        eventually(Duration::from_secs(10), || {
            let got = lines(&sink(&p));
            let ok = ids.iter().all(|id| got.iter().any(|e| e["id"] == *id));
            async move { ok }
        })
        .await,
        "{:#?}",
        lines(&sink(&p))
    );
    let got = lines(&sink(&p));
    assert_eq!(got.len(), 4, "only the accepted events: {got:#?}");
    let bin = got.iter().find(|e| e["id"] == "in-binary").unwrap();
    assert_eq!(bin["type"], "com.example.build.failed");
    assert_eq!(bin["data"], json!({"job": 7}));
    assert_eq!(bin["subject"], "billing");
    let records = published_records(&p);
    assert_eq!(
        records.len(),
        3,
        "one record per accepted request: {records:#?}"
    );
    let audited: Vec<&Value> = records
        .iter()
        .flat_map(|r| r["detail"]["args"]["events"].as_array().unwrap())
        .map(|e| &e["id"])
        .collect();
    assert_eq!(audited, ids.map(Value::from).iter().collect::<Vec<_>>());
    assert!(
        records[0]["principal"]["user"]
            .as_str()
            .unwrap()
            .starts_with("admin-token[0]@"),
        "{:#?}",
        records[0]
    );
}

/// The Alertmanager binary (Debian's `prometheus-alertmanager`).
fn alertmanager_binary() -> PathBuf {
    for name in ["prometheus-alertmanager", "alertmanager"] {
        for dir in std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .chain(["/usr/bin", "/usr/sbin"])
        {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "Alertmanager is not installed: `apt-get install prometheus-alertmanager` (scripts/test.sh \
         installs it), or put an `alertmanager` binary on PATH"
    );
}

/// A running Alertmanager, killed on drop.
struct Alertmanager(std::process::Child);

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (d) A real Alertmanager whose receiver is the inbound endpoint: an alert posted to it
/// becomes `dev.portcullis.alert.firing` on the sink.
#[tokio::test]
async fn a_real_alertmanager_posts_its_alerts_as_events() {
    let bin = alertmanager_binary();
    let p = Proxy::start(&file_config("")).await;
    let am_dir = tempfile::tempdir().unwrap();
    let am_port = free_port();
    let config = am_dir.path().join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            "route:
  receiver: portcullis
  group_by: [alertname]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: portcullis
    webhook_configs:
      - url: \"{}\"
        send_resolved: true
        http_config:
          authorization: {{ type: Bearer, credentials: \"{ADMIN_TOKEN}\" }}
",
            p.admin_url("/api/v1/events")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(am_dir.path().join("alertmanager.log")).unwrap();
    let _am = Alertmanager(
        std::process::Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                am_dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
            .arg("--cluster.listen-address=")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start alertmanager"),
    );
    let am = format!("http://127.0.0.1:{am_port}");
    let am_log =
        || std::fs::read_to_string(am_dir.path().join("alertmanager.log")).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(15), || {
            let url = format!("{am}/-/ready");
            async move {
                client()
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            }
        })
        .await,
        "alertmanager did not start:\n{}",
        am_log()
    );
    let alert = json!([{
        "labels": {"alertname": "OriginDown", "instance": "api-1", "severity": "page"},
        "annotations": {"summary": "api-1 is down"},
    }]);
    let r = client()
        .post(format!("{am}/api/v2/alerts"))
        .json(&alert)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let mut found = None;
    eventually(Duration::from_secs(15), || {
        found = lines(&sink(&p))
            .into_iter()
            .find(|e| e["type"] == "dev.portcullis.alert.firing");
        let ok = found.is_some();
        async move { ok }
    })
    .await;
    let e = found.unwrap_or_else(|| {
        panic!(
            "no alert.firing; alertmanager log:\n{}\nportcullis log:\n{}",
            am_log(),
            p.log_text()
        )
    });
    assert_eq!(e["subject"], "OriginDown/api-1");
    assert_eq!(e["data"]["labels"]["severity"], "page");
    assert_eq!(e["data"]["receiver"], "portcullis");
    assert!(e["id"].as_str().unwrap().starts_with("am-"), "{e}");
    // Audited as any publisher is (Alertmanager may post the group again: at least once).
    assert!(!published_records(&p).is_empty());
}

/// `portcullis token` for `user` in `groups`, signed by the proxy's dev_issuer.
fn mint(p: &Proxy, user: &str, groups: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["token", "--config"])
        .arg(&p.config)
        .args(["--provider", "dev", "--user", user, "--groups", groups])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// (e) Request-level events are counted, not sent one per request: a burst of 401s is one
/// `auth.failure_burst`, a burst of 403s one `auth.denial_burst`, a run of 429s one
/// `limit.exceeded`; a burst under `min_count` is none.
#[tokio::test]
async fn bursts_of_refusals_are_one_event_per_window_and_key() {
    let yaml = format!(
        "{HEAD}identity:
  providers:
    - {{ name: dev, kind: dev_issuer }}
events:
  sinks:
    - {{ name: log, file: {{ path: \"{{dir}}/events.jsonl\" }} }}
  aggregate:
    failure_burst: {{ window: 2s, min_count: 5 }}
    denial_burst: {{ window: 2s, min_count: 5 }}
    limit_exceeded: {{ window: 2s }}
stick_tables:
  - {{ name: per_ip, key: src, size: 100, store: [\"http_req_rate(10s)\"] }}
backends:
  - {{ name: echo, servers: [{{ name: s1, address: \"builtin:echo\" }}] }}
routes:
  - {{ name: api, match: {{ path_prefix: /api/ }}, backend: echo, auth: [dev], allow: [{{ groups: [eng] }}] }}
  - {{ name: quiet, match: {{ path_prefix: /quiet/ }}, backend: echo, auth: [dev] }}
  - name: limited
    match: {{ path_prefix: /limited/ }}
    backend: echo
    public: true
    limits:
      track: [per_ip]
      rules: [{{ table: per_ip, counter: \"http_req_rate(10s)\", above: 3 }}]
"
    );
    let p = Proxy::start(&yaml).await;
    let c = client();
    let bob = mint(&p, "bob", "sales");
    for _ in 0..20 {
        let r = c.get(p.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    for _ in 0..6 {
        let r = c
            .get(p.url("/api/x"))
            .bearer_auth(&bob)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    // Under `min_count`: no event.
    for _ in 0..4 {
        let r = c.get(p.url("/quiet/x")).send().await.unwrap();
        assert_eq!(r.status(), 401);
    }
    let mut limited = 0;
    for _ in 0..10 {
        let r = c.get(p.url("/limited/x")).send().await.unwrap();
        limited += usize::from(r.status() == 429);
    }
    assert_eq!(limited, 7);

    let path = sink(&p);
    for t in [
        "dev.portcullis.auth.failure_burst",
        "dev.portcullis.auth.denial_burst",
        "dev.portcullis.limit.exceeded",
    ] {
        wait_line(&path, Duration::from_secs(8), |e| e["type"] == t).await;
    }
    // Nothing more comes for these windows.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = lines(&path);
    let one = |t: &str| {
        let got = of_type(&events, t);
        assert_eq!(got.len(), 1, "{t}: {events:#?}");
        got[0].clone()
    };
    let f = one("dev.portcullis.auth.failure_burst");
    assert_eq!(f["subject"], "default/api");
    assert_eq!(f["data"]["key"], "127.0.0.1");
    assert_eq!(f["data"]["count"], 20);
    assert_eq!(f["data"]["window_ms"], 2000);
    let d = one("dev.portcullis.auth.denial_burst");
    assert_eq!(
        (&d["subject"], &d["data"]["count"]),
        (&json!("default/api"), &json!(6))
    );
    let l = one("dev.portcullis.limit.exceeded");
    assert_eq!(l["subject"], "per_ip");
    assert_eq!(l["data"]["key"], "127.0.0.1");
    assert_eq!(l["data"]["count"], 7);
    assert_eq!(events.len(), 3, "{events:#?}");
}
