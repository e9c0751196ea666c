//! Events about the proxy's own health, through the real binary: a listener certificate that
//! ends in 10 days is `certificate.expiring`, and an identity provider whose JWKS cannot be
//! fetched is `jwks.refresh_failed`, both written by a file sink.

mod common;

use common::{dead_address, Origin, Proxy};
use serde_json::Value;
use std::time::{Duration, Instant};

fn events(p: &Proxy) -> Vec<Value> {
    std::fs::read_to_string(p.dir.path().join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_certificate_and_a_failing_jwks_are_reported() {
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(80);
    params.not_after = now + time::Duration::days(10);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("soon.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("soon.key"), key.serialize_pem()).unwrap();
    let yaml = format!(
        r#"
listeners:
  - {{ name: web, bind: "127.0.0.1:{{port}}" }}
  - name: tls
    bind: "127.0.0.1:0"
    tls: {{ certificates: [{{ cert: soon.pem, key: soon.key }}] }}
identity:
  providers:
    - {{ name: corp, kind: jwt, issuer: "https://idp.example.test", audiences: [api], jwks_uri: "http://{dead}/jwks.json" }}
events:
  sinks:
    - {{ name: log, file: {{ path: "{{dir}}/events.jsonl" }} }}
backends: [{{ name: b, servers: [{{ name: s, address: "{o}" }}] }}]
routes:
  - {{ name: open, match: {{ path_prefix: / }}, backend: b, public: true }}
  - {{ name: api, match: {{ path_prefix: /api }}, backend: b, auth: [corp] }}
"#,
        dead = dead_address(),
        o = origin.address()
    );
    let p = Proxy::start_in(dir, &yaml).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut cert_ev, mut jwks_ev) = (None, None);
    while Instant::now() < deadline && (cert_ev.is_none() || jwks_ev.is_none()) {
        for e in events(&p) {
            match e["type"].as_str() {
                Some("dev.portcullis.certificate.expiring") => cert_ev = Some(e),
                Some("dev.portcullis.jwks.refresh_failed") => jwks_ev = Some(e),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = cert_ev.unwrap_or_else(|| {
        panic!(
            "no certificate.expiring: {:#?}\n{}",
            events(&p),
            p.log_text()
        )
    });
    assert!(c["subject"].as_str().unwrap().ends_with("soon.pem"), "{c}");
    let days = c["data"]["days_left"].as_i64().unwrap();
    assert!((9..=10).contains(&days), "{c}");
    assert_eq!(c["data"]["names"], serde_json::json!(["localhost"]));
    let j = jwks_ev.unwrap_or_else(|| panic!("no jwks.refresh_failed: {:#?}", events(&p)));
    assert_eq!(j["subject"], "corp");
    assert!(
        j["data"]["uri"].as_str().unwrap().ends_with("/jwks.json"),
        "{j}"
    );
    assert!(j["data"]["failures"].as_u64().unwrap() >= 1, "{j}");
    // The certificate is reported once a day, not at every look.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = events(&p)
        .iter()
        .filter(|e| e["type"] == "dev.portcullis.certificate.expiring")
        .count();
    assert_eq!(n, 1);
}
