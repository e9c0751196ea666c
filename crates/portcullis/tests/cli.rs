//! The command line: `check` with located errors, `version`, graceful shutdown on SIGTERM, and
//! every shipped example passing `check`.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn portcullis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .env_remove("PORTCULLIS_TEST_MISSING_VAR")
        .output()
        .expect("run portcullis")
}

fn check(path: &Path) -> (i32, String, String) {
    let out = portcullis(&["check", "--config", path.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p
}

const VALID: &str = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18080\" }
backends:
  - name: echo
    servers: [{ address: builtin:echo }]
routes:
  - { name: all, match: { path_prefix: / }, backend: echo, public: true }
";

#[test]
fn check_accepts_a_valid_config() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "portcullis.yaml", VALID);
    let (code, out, err) = check(&p);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn check_lists_every_error_with_its_position() {
    let d = tempfile::tempdir().unwrap();
    // Three unrelated problems, on lines 7, 11 and 13.
    let text = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18080\" }
backends:
  - name: echo
    servers:
      - address: builtin:echo
      - address: not-an-address
routes:
  - name: all
    match: { path_prefix: / }
    backend: missing
    public: true
  - { name: bad-prefix, match: { path_prefix: nope }, backend: echo, public: true }
";
    let p = write(d.path(), "portcullis.yaml", text);
    let (code, out, err) = check(&p);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    let file = p.display().to_string();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with(&file)).collect();
    assert_eq!(lines.len(), 3, "expected three located errors:\n{err}");
    let at = |needle: &str| -> String {
        let l = lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no error about `{needle}`:\n{err}"));
        let rest = &l[file.len() + 1..];
        let mut parts = rest.splitn(3, ':');
        format!("{}:{}", parts.next().unwrap(), parts.next().unwrap())
    };
    assert_eq!(at("not-an-address"), "7:18", "{err}");
    assert_eq!(at("backend `missing`"), "11:14", "{err}");
    assert_eq!(at("`nope` must start with `/`"), "13:47", "{err}");
    assert!(err.contains("3 error(s)"), "{err}");
}

#[test]
fn check_reads_the_files_the_proxy_needs() {
    let d = tempfile::tempdir().unwrap();
    for f in ["bad.pem", "bad-ca.pem", "dev.pem"] {
        write(d.path(), f, "not a PEM file\n");
    }
    write(d.path(), "keys/partner.json", "{\"keys\": [");
    write(d.path(), "api-keys.yaml", "keys: [ { id: k1 ");
    let text = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18443\", tls: { certificates: [{ cert: bad.pem, key: bad.pem }] } }
identity:
  providers:
    - { name: partner, kind: jwt, issuer: \"https://partner.example\", audiences: [api], jwks_file: keys/partner.json }
    - { name: agents, kind: api_key, keys_file: api-keys.yaml }
    - { name: dev, kind: dev_issuer, key_file: dev.pem }
backends:
  - name: echo
    servers: [{ address: builtin:echo }]
routes:
  - { name: all, match: { path_prefix: / }, backend: echo, public: true }
apps:
  include: [\"apps/*.yaml\"]
";
    let root = write(d.path(), "portcullis.yaml", text);
    let bundle = write(
        d.path(),
        "apps/billing.yaml",
        "name: billing\nbackends:\n  - { name: v2, servers: [{ address: \"127.0.0.1:9\" }], tls: { ca: ../bad-ca.pem } }\n",
    );
    let (code, out, err) = check(&root);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    // Each problem names its file and the line of the item it belongs to.
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    for (file, line, what) in [
        (&root, line_of("name: web"), "listener `web`"),
        (&root, line_of("name: partner"), "partner.json"),
        (&root, line_of("name: agents"), "api-keys.yaml"),
        (&root, line_of("name: dev"), "dev.pem"),
        (&bundle, 3, "backend `billing/v2`"),
    ] {
        let prefix = format!("{}:{line}:", file.display());
        assert!(
            err.lines()
                .any(|l| l.starts_with(&prefix) && l.contains(what)),
            "no error about {what} at {prefix}\n{err}"
        );
    }
    assert!(err.contains("5 error(s)"), "{err}");

    // A missing dev issuer key is fine (the proxy generates it), and `check` does not
    // create it.
    let fresh = d.path().join("fresh/dev.pem");
    let ok = VALID.to_string()
        + "identity:\n  providers:\n    - { name: dev, kind: dev_issuer, key_file: fresh/dev.pem }\n";
    let p = write(d.path(), "ok.yaml", &ok);
    let (code, out, err) = check(&p);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(!fresh.exists(), "check created {}", fresh.display());
}

#[test]
fn check_suggests_the_key_you_meant() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "portcullis.yaml",
        &VALID.replace("backend: echo,", "bakend: echo,"),
    );
    let (code, _, err) = check(&p);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{}:7:", p.display())), "{err}");
    assert!(err.contains("unknown field `bakend`"), "{err}");
    assert!(err.contains("did you mean `backend`"), "{err}");
}

#[test]
fn check_explains_a_missing_environment_variable() {
    let d = tempfile::tempdir().unwrap();
    let text = VALID.replace("builtin:echo", "\"${env:PORTCULLIS_TEST_MISSING_VAR}\"");
    let p = write(d.path(), "portcullis.yaml", &text);
    let (code, _, err) = check(&p);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{}:5:", p.display())), "{err}");
    assert!(err.contains("PORTCULLIS_TEST_MISSING_VAR"), "{err}");
    assert!(err.contains("is not set"), "{err}");

    // The same file passes once the variable is set.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "--config", p.to_str().unwrap()])
        .env("PORTCULLIS_TEST_MISSING_VAR", "127.0.0.1:9")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_points_into_app_bundles() {
    let d = tempfile::tempdir().unwrap();
    let root = write(
        d.path(),
        "portcullis.yaml",
        &format!("{VALID}apps:\n  include: [\"apps/*.yaml\"]\n"),
    );
    write(
        d.path(),
        "apps/billing.yaml",
        "name: billing\nbackends:\n  - name: v2\n    servers: [{ address: \"127.0.0.1:9\" }]\nroutes:\n  - { name: api, match: { path_prefix: /billing }, backend: v2, public: true }\n",
    );
    let (code, out, err) = check(&root);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 routes"), "{out}");

    // A semantic error in the bundle.
    let bundle = write(
        d.path(),
        "apps/billing.yaml",
        "name: billing\nbackends:\n  - name: v2\n    servers: [{ address: \"127.0.0.1:9\" }]\nroutes:\n  - { name: api, match: { path_prefix: /billing }, backend: v3, public: true }\n",
    );
    let (code, _, err) = check(&root);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{}:6:", bundle.display())), "{err}");
    assert!(err.contains("`v3`"), "{err}");

    // A syntax error (unknown key) in the bundle.
    write(
        d.path(),
        "apps/billing.yaml",
        "name: billing\nbackends:\n  - name: v2\n    servers: [{ address: \"127.0.0.1:9\" }]\n    balanse: round_robin\n",
    );
    let (code, _, err) = check(&root);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{}:5:", bundle.display())), "{err}");
    assert!(err.contains("did you mean `balance`"), "{err}");
}

/// A URL the config reads from a secret file (a webhook's, which may carry a password or a
/// token in its path) is never shown whole when it is wrong: `check` and `run` name its
/// scheme and host only.
#[test]
fn a_bad_secret_url_is_shown_without_its_secret() {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "hook.url",
        "http://svc:S3CRET-PASSWORD@hooks.example.com:99999/T0/B0/S3CRET-PATH\n",
    );
    let p = write(
        d.path(),
        "p.yaml",
        &format!(
            "{VALID}events:\n  sinks:\n    - name: hooks\n      webhook:\n        url: ${{file:hook.url}}\n"
        ),
    );
    let (code, out, err) = check(&p);
    assert_ne!(code, 0, "{out}{err}");
    let run = portcullis(&["run", "--config", p.to_str().unwrap()]);
    assert!(!run.status.success());
    let run_err = String::from_utf8_lossy(&run.stderr).into_owned();
    for text in [&out, &err, &run_err] {
        assert!(!text.contains("S3CRET"), "a secret was shown: {text}");
    }
    assert!(
        format!("{out}{err}").contains("hooks.example.com"),
        "the host is named: {out}{err}"
    );
}

/// A stick table's bad `size` or `expire` is located at that key, not at `store`.
#[test]
fn a_stick_tables_size_and_expire_are_located_at_their_keys() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "p.yaml",
        &format!(
            "{VALID}stick_tables:\n  - name: big\n    key: src\n    size: 4294967296\n    expire: 10m\n    store: [http_req_rate(10s)]\n  - name: never\n    key: src\n    size: 10\n    expire: 0s\n    store: [http_req_rate(10s)]\n"
        ),
    );
    let (code, out, err) = check(&p);
    assert_ne!(code, 0);
    let text = format!("{out}{err}");
    let file = p.display().to_string();
    // VALID has 7 lines; `size` of the first table is on line 11, `expire` of the second on 17.
    assert!(text.contains(&format!("{file}:11:11")), "{text}");
    assert!(text.contains(&format!("{file}:17:")), "{text}");
}

#[test]
fn version_is_printed() {
    let want = env!("CARGO_PKG_VERSION");
    for args in [&["version"][..], &["--version"][..]] {
        let out = portcullis(args);
        assert!(out.status.success(), "{args:?}");
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains(want), "{args:?}: {s}");
        assert!(s.starts_with("portcullis"), "{args:?}: {s}");
    }
}

#[test]
fn every_example_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let (code, out, err) = check(&path);
        assert_eq!(code, 0, "{}:\n{out}{err}", path.display());
        n += 1;
    }
    assert!(n >= 1, "no examples found in {}", dir.display());
}

/// A proxy with one public route to `origin` and the given `shutdown_grace`.
async fn public_proxy(grace: &str, origin: &Origin) -> Proxy {
    let yaml = "\
shutdown_grace: GRACE
listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]
backends:
  - { name: b, servers: [{ address: \"ADDR\" }] }
routes:
  - { name: r, match: { path_prefix: / }, backend: b, public: true }
"
    .replace("GRACE", grace)
    .replace("ADDR", &origin.address());
    Proxy::start(&yaml).await
}

/// Waits for the proxy to exit, by `deadline`, with status 0.
async fn exits_zero_by(p: &mut Proxy, deadline: Instant) {
    let code = loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "still running after SIGTERM:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code.code(), Some(0), "log:\n{}", p.log_text());
}

/// An idle keep-alive connection (HTTP/1.1, served without protocol detection) and one that
/// has sent nothing yet must not hold a shutdown for its whole grace period.
#[tokio::test]
async fn sigterm_closes_idle_connections_at_once() {
    use tokio::io::AsyncReadExt;
    let o = Origin::start(|_req| async {
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("ok")))
    })
    .await;
    let mut p = public_proxy("60s", &o).await;
    let mut kept = kept_alive(p.port, "/").await;
    let mut buf = vec![0u8; 4096];
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let sent = Instant::now();
    p.signal(libc::SIGTERM);
    for (name, s) in [("kept-alive", &mut kept), ("silent", &mut silent)] {
        // Well before the 10 s header timeout that would close the silent one anyway.
        let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "the {name} connection was not closed: {r:?}"
        );
    }
    exits_zero_by(&mut p, sent + Duration::from_secs(5)).await;
}

/// A proxy with `grace`, and one request in flight to an origin that answers `slow done`
/// after `secs` seconds: returned once the origin has it.
async fn one_in_flight(
    secs: u64,
    grace: &str,
) -> (
    Origin,
    Proxy,
    tokio::task::JoinHandle<Result<(u16, String), reqwest::Error>>,
) {
    let slow = Origin::start(move |_req| async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("slow done")))
    })
    .await;
    let p = public_proxy(grace, &slow).await;
    let url = p.url("/slow");
    let in_flight = tokio::spawn(async move {
        let r = client().get(url).send().await?;
        let status = r.status().as_u16();
        Ok::<_, reqwest::Error>((status, r.text().await?))
    });
    assert!(
        eventually(Duration::from_secs(5), || {
            let h = slow.hits();
            async move { h == 1 }
        })
        .await,
        "the request never reached the origin"
    );
    (slow, p, in_flight)
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let (_slow, mut p, in_flight) = one_in_flight(1, "5s").await;
    let sent = Instant::now();
    p.signal(libc::SIGTERM);

    // New connections are refused while the in-flight request finishes.
    let port = p.port;
    let refused = eventually(Duration::from_secs(3), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    })
    .await;
    assert!(refused, "the listener still accepts after SIGTERM");
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before the listener closed"
    );

    let (status, body) = in_flight
        .await
        .unwrap()
        .expect("the in-flight request failed");
    assert_eq!((status, body.as_str()), (200, "slow done"));

    exits_zero_by(&mut p, Instant::now() + Duration::from_secs(8)).await;
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?} to stop",
        sent.elapsed()
    );
    assert!(!p.log_text().contains("panicked"), "{}", p.log_text());
}

/// During the drain a reload is refused (it would bind the closed listeners again and serve
/// connections the shutdown never waits for), and a second SIGTERM stops at once, with 130.
#[tokio::test]
async fn the_drain_refuses_reloads_and_a_second_signal_stops_it() {
    let (_slow, mut p, _in_flight) = one_in_flight(20, "60s").await;
    p.signal(libc::SIGTERM);
    let port = p.port;
    let closed = || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    };
    assert!(eventually(Duration::from_secs(3), closed).await);
    let (status, body) = p.admin(reqwest::Method::POST, "/api/v1/reload", None).await;
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("shutting down"), "{status}: {body}");
    assert!(
        closed().await,
        "a reload during the drain opened the listener again"
    );
    let sent = Instant::now();
    p.signal(libc::SIGTERM);
    let code = loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "a second SIGTERM did not stop the drain:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code.code(), Some(130), "{}", p.log_text());
}

/// A command whose reader has gone (output piped into `head` or `true`) stops quietly, by
/// SIGPIPE as other tools do, instead of panicking with a backtrace.
#[test]
fn a_command_whose_reader_went_away_stops_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("version")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {err}",
        out.status
    );
}

/// A reader of stderr that takes nothing (a stuck log driver) does not hold up requests: the
/// process log is written by a thread of its own, and lines it cannot write are dropped and
/// counted, not waited for.
#[tokio::test]
async fn a_stderr_nobody_reads_does_not_stall_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let yaml = format!(
        "{}admin:\n  bind: \"127.0.0.1:{admin}\"\n  tokens: [\"{ADMIN_TOKEN}\"]\naudit: {{ sink: \"off\" }}\n",
        VALID.replace("127.0.0.1:18080", &format!("127.0.0.1:{port}"))
    );
    let config = write(dir.path(), "p.yaml", &yaml);
    // Each call with a bad token logs a warning of about 2 KiB (its path): the pipe's buffer
    // (64 KiB) is full after a few dozen, and then every write to it blocks.
    let (reader, writer) = std::io::pipe().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "--config"])
        .arg(&config)
        .env("PORTCULLIS_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/x");
    let until = Instant::now() + Duration::from_secs(20);
    while client.get(&url).send().await.is_err() {
        assert!(Instant::now() < until, "the proxy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = format!(
        "http://127.0.0.1:{admin}/api/v1/tables/{}",
        "p".repeat(2_000)
    );
    let served = tokio::time::timeout(Duration::from_secs(30), async {
        for _ in 0..500 {
            let r = client
                .get(&refused)
                .bearer_auth("wrong")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401);
            let r = client.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
        }
    })
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    drop(reader);
    assert!(served.is_ok(), "requests stalled behind an unread stderr");
}
