//! `portcullis ctl` over HTTPS, against the real binary with `admin.tls` and `client_auth`: the
//! admin listener's certificate verified against `--cacert` (by IP address and by name); the
//! static token over TLS (table and `--json`); a client certificate (`--cert`/`--key`) as the
//! only credential, for an `mtls` provider of `admin.auth` that `admin.policies` let read
//! backends and drain servers (a drain included); an intruder's certificate forbidden (1);
//! an unverifiable admin listener (no `--cacert`, the wrong CA) and a client certificate from
//! an unknown CA refused in the handshake (1); bad usage (2); and `events --follow` over TLS.

mod common;

use common::pki::{Ca, Leaf};
use common::{Origin, Proxy, ADMIN_TOKEN};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, SanType};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SPIFFE: &str = "spiffe://example.org/ns/prod/sa/billing";
const INTRUDER: &str = "spiffe://example.org/ns/prod/sa/intruder";

/// A workload certificate: SAN URI (the SPIFFE ID), a SAN DNS name and a CN.
fn workload(ca: &Ca, spiffe: &str) -> Leaf {
    let mut p = CertificateParams::new(vec!["billing.internal".to_string()]).unwrap();
    p.subject_alt_names
        .push(SanType::URI(spiffe.try_into().unwrap()));
    p.distinguished_name.push(DnType::CommonName, "billing");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    ca.sign(p)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, text).unwrap();
    f
}

/// A proxy whose admin listener speaks HTTPS and takes client certificates, and the files a
/// `ctl` caller holds.
struct Setup {
    p: Proxy,
    _origin: Origin,
    /// `https://127.0.0.1:PORT`.
    url: String,
    /// The PEM of the CA of the admin listener's certificate.
    ca_pem: String,
    ca: PathBuf,
    /// Another CA, which issued neither side's certificate.
    wrong_ca: PathBuf,
    token: PathBuf,
    billing: (PathBuf, PathBuf),
    intruder: (PathBuf, PathBuf),
    /// A client certificate from a CA the admin listener does not trust.
    stranger: (PathBuf, PathBuf),
}

async fn start() -> Setup {
    let server_ca = Ca::new("server CA");
    let clients_ca = Ca::new("clients CA");
    let other_ca = Ca::new("other CA");
    let server = server_ca.server(&["localhost", "127.0.0.1"]);
    let origin = Origin::named("o").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "server.pem", &server.cert_pem);
    write(d, "server.key", &server.key_pem);
    write(d, "clients-ca.pem", &clients_ca.pem());
    write(
        d,
        "admin.cedar",
        &format!(
            r#"permit(principal == Portcullis::Agent::"{SPIFFE}", action in [
  Portcullis::Admin::Action::"backends.read", Portcullis::Admin::Action::"server.set_state"],
  resource);"#
        ),
    );
    // The caller's files, outside of the proxy's directory.
    let mine = d.join("caller");
    std::fs::create_dir(&mine).unwrap();
    let ca = write(&mine, "ca.pem", &server_ca.pem());
    let wrong_ca = write(&mine, "wrong-ca.pem", &other_ca.pem());
    let token = write(&mine, "admin.token", &format!("{ADMIN_TOKEN}\n"));
    let billing = workload(&clients_ca, SPIFFE).write(&mine, "billing");
    let intruder = workload(&clients_ca, INTRUDER).write(&mine, "intruder");
    let stranger = workload(&other_ca, SPIFFE).write(&mine, "stranger");
    let yaml = format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
identity:
  providers:
    - {{ name: mesh, kind: mtls }}
backends:
  - {{ name: o, servers: [{{ name: s1, address: "{}" }}] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, backend: o, public: true }}
admin:
  bind: "127.0.0.1:{{admin_port}}"
  tokens: ["{ADMIN_TOKEN}"]
  auth: [mesh]
  policies: [admin.cedar]
  tls:
    certificates: [{{ cert: "{{dir}}/server.pem", key: "{{dir}}/server.key" }}]
    client_auth: {{ ca: "{{dir}}/clients-ca.pem", required: false }}
"#,
        origin.address()
    );
    let p = Proxy::start_in(dir, &yaml).await;
    Setup {
        url: format!("https://127.0.0.1:{}", p.admin_port),
        p,
        _origin: origin,
        ca_pem: server_ca.pem(),
        ca,
        wrong_ca,
        token,
        billing,
        intruder,
        stranger,
    }
}

/// `portcullis ctl ARGS`, with no credential but the ones in ARGS.
fn command(s: &Setup, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    c.arg("ctl");
    c.env_remove("PORTCULLIS_ADMIN_TOKEN");
    // No saved `ctl login` of the machine's user stands in for the credentials a test gives.
    c.env("XDG_CONFIG_HOME", s.p.dir.path().join("no-ctl-login"));
    c.args(args);
    c
}

/// Runs `portcullis ctl ARGS`: the exit code, stdout and stderr.
fn ctl(s: &Setup, args: &[&str]) -> (i32, String, String) {
    let out = command(s, args).output().expect("run portcullis ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `--admin URL --cacert CA --cert C --key K` of a client certificate.
fn with_cert<'a>(s: &'a Setup, cert: &'a (PathBuf, PathBuf)) -> Vec<&'a str> {
    vec![
        "--admin",
        &s.url,
        "--cacert",
        path(&s.ca),
        "--cert",
        path(&cert.0),
        "--key",
        path(&cert.1),
    ]
}

/// The cells of the table row whose first cells are `first`.
fn row(table: &str, first: &[&str]) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cells| cells.len() >= first.len() && cells[..first.len()] == *first)
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_speaks_https_with_a_token_or_a_client_certificate() {
    let s = start().await;
    let token = [
        "--admin",
        &s.url,
        "--cacert",
        path(&s.ca),
        "--token-file",
        path(&s.token),
    ];

    // The static token over TLS: the table, and JSON.
    let (code, out, err) = ctl(&s, &[&token[..], &["servers"]].concat());
    assert_eq!(code, 0, "{err}{out}");
    assert_eq!(row(&out, &["default/o", "s1"])[3], "ready", "{out}");
    let (code, out, err) = ctl(&s, &[&token[..], &["--json", "servers"]].concat());
    assert_eq!(code, 0, "{err}{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(v["backends"][0]["name"], "default/o", "{v}");
    assert_eq!(v["backends"][0]["servers"][0]["state"], "ready", "{v}");
    // By name: the certificate is checked for `localhost`.
    let by_name = format!("https://localhost:{}", s.p.admin_port);
    let (code, out, err) = ctl(
        &s,
        &[
            "--admin",
            &by_name,
            "--cacert",
            path(&s.ca),
            "--token-file",
            path(&s.token),
            "servers",
        ],
    );
    assert_eq!(code, 0, "{err}{out}");

    // The client certificate alone: the workload the policy permits reads, and drains.
    let billing = with_cert(&s, &s.billing);
    let (code, out, err) = ctl(&s, &[&billing[..], &["servers"]].concat());
    assert_eq!(code, 0, "{err}{out}");
    assert_eq!(row(&out, &["default/o", "s1"])[3], "ready", "{out}");
    let (code, out, err) = ctl(&s, &[&billing[..], &["drain", "o/s1"]].concat());
    assert_eq!((code, out.as_str()), (0, "default/o/s1: drain\n"), "{err}");
    let v = backends(&s).await;
    assert_eq!(v["backends"][0]["servers"][0]["state"], "drain", "{v}");
    let (code, out, err) = ctl(&s, &[&billing[..], &["--json", "ready", "o/s1"]].concat());
    assert_eq!(code, 0, "{err}{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        json!({ "backend": "default/o", "server": "s1", "state": "ready" })
    );
    // The certificate with the token: both are presented, and the call goes through.
    let (code, out, err) = ctl(
        &s,
        &[&billing[..], &["--token-file", path(&s.token), "servers"]].concat(),
    );
    assert_eq!(code, 0, "{err}{out}");

    // Another workload's certificate: known, but no policy permits it.
    let intruder = with_cert(&s, &s.intruder);
    let (code, out, err) = ctl(&s, &[&intruder[..], &["servers"]].concat());
    assert_eq!(code, 1, "{err}{out}");
    assert!(
        err.starts_with("error: forbidden") && err.contains(INTRUDER) && err.contains("(403)"),
        "{err}"
    );
    let (code, _, err) = ctl(&s, &[&intruder[..], &["drain", "o/s1"]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("error: forbidden") && !err.contains("CSRF"),
        "the policy refuses it, not the CSRF check: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_refuses_an_admin_listener_it_cannot_verify() {
    let s = start().await;
    let handshake = format!(
        "error: TLS handshake with 127.0.0.1:{} failed: ",
        s.p.admin_port
    );

    // Without --cacert (the Mozilla roots): the listener's private CA is unknown.
    let (code, out, err) = ctl(
        &s,
        &["--admin", &s.url, "--token-file", path(&s.token), "servers"],
    );
    assert_eq!(code, 1, "{err}{out}");
    assert!(
        err.starts_with(&handshake)
            && err.contains("UnknownIssuer")
            && err.contains("--cacert FILE"),
        "{err}"
    );
    // The wrong CA.
    let (code, _, err) = ctl(
        &s,
        &[
            "--admin",
            &s.url,
            "--cacert",
            path(&s.wrong_ca),
            "--token-file",
            path(&s.token),
            "servers",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "{handshake}invalid peer certificate: UnknownIssuer"
        )),
        "{err}"
    );
    // A client certificate from a CA the listener does not trust.
    let stranger = with_cert(&s, &s.stranger);
    let (code, _, err) = ctl(&s, &[&stranger[..], &["servers"]].concat());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with(&handshake) && err.contains("does not accept the client certificate"),
        "{err}"
    );

    // Bad usage: 2.
    let (code, _, err) = ctl(
        &s,
        &[
            "--admin",
            &s.url,
            "--cacert",
            path(&s.ca),
            "--key",
            path(&s.billing.1),
            "servers",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--key needs --cert"), "{err}");
    let missing = s.p.dir.path().join("caller/missing.pem");
    let (code, _, err) = ctl(
        &s,
        &[
            "--admin",
            &s.url,
            "--cacert",
            path(&missing),
            "--token-file",
            path(&s.token),
            "servers",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(path(&missing)), "{err}");
    let plain = format!("http://127.0.0.1:{}", s.p.admin_port);
    let (code, _, err) = ctl(
        &s,
        &[
            "--admin",
            &plain,
            "--cert",
            path(&s.billing.0),
            "--key",
            path(&s.billing.1),
            "servers",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give --admin as `https://…`"), "{err}");
    let (code, _, err) = ctl(&s, &["--admin", &s.url, "--cacert", path(&s.ca), "servers"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no credentials"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_followed_over_https() {
    let s = start().await;
    let mut child = command(
        &s,
        &[
            "--admin",
            &s.url,
            "--cacert",
            path(&s.ca),
            "--token-file",
            path(&s.token),
            "events",
            "--follow",
            "--types",
            "com.example.deploy.*",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start ctl events");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Publish until the watcher, which may not have connected yet, prints a line.
    let web = https_client(&s.ca_pem);
    let deadline = Instant::now() + Duration::from_secs(15);
    let line = loop {
        let ev = json!({ "specversion": "1.0", "id": "e-1", "source": "https://ci.example",
                         "type": "com.example.deploy.finished", "subject": "web",
                         "time": "2026-01-02T03:04:05Z", "data": { "n": 1 } });
        let r = web
            .post(format!("{}/api/v1/events", s.url))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/cloudevents+json")
            .body(ev.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            break line;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "ctl events printed nothing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    assert_eq!(
        line,
        r#"2026-01-02T03:04:05Z com.example.deploy.finished web {"n":1}"#
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A client trusting the admin listener's CA.
fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// `GET /api/v1/backends` over HTTPS with the admin token.
async fn backends(s: &Setup) -> Value {
    let r = https_client(&s.ca_pem)
        .get(format!("{}/api/v1/backends", s.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}
