//! The audit trail against the real binary: what each request, admin action and reload
//! leaves in the hash-chained files, that nothing secret is ever written, that `kill -9` under
//! load with `fsync: every_record` loses no record of an answered request, that the chain
//! continues across restarts and rotated files, and that `portcullis audit verify` and
//! `portcullis audit search` find tampering and records as documented in `docs/audit.md`.
//!
//! Identities come from a `dev_issuer` provider (`portcullis token`) and an `api_key` provider
//! (`portcullis apikey new`), minted with the binary as a user would.
mod common;
use common::*;

use reqwest::Method;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HEAD: &str = "\
listeners:
  - { name: web, bind: \"127.0.0.1:{port}\" }
identity:
  providers:
    - { name: dev, kind: dev_issuer }
";

/// Routes for every kind of decision: `api` allows group `eng`, `closed` denies by default,
/// `guarded` has an explicit `deny` rule for mallory, `trial` is in shadow mode.
const ROUTES: &str = r#"
backends:
  - { name: echo, servers: [{ name: s1, address: "builtin:echo" }] }
routes:
  - { name: api, match: { path_prefix: /api/ }, backend: echo, auth: [dev], allow: [{ groups: [eng] }] }
  - { name: closed, match: { path_prefix: /closed/ }, backend: echo, auth: [dev] }
  - name: guarded
    match: { path_prefix: /guarded/ }
    backend: echo
    auth: [dev]
    allow: [{ groups: [eng] }]
    deny: [{ users: [mallory] }]
  - name: trial
    match: { path_prefix: /trial/ }
    backend: echo
    auth: [dev]
    enforce: false
    allow: [{ groups: [admins] }]
  - { name: open, match: { path_prefix: /open/ }, backend: echo, public: true }
"#;

/// The config of most tests: `audit` as given, then [`ROUTES`].
fn config(audit: &str) -> String {
    format!("{HEAD}audit: {audit}\n{ROUTES}")
}

const EVERY_RECORD: &str = r#"{ dir: "{dir}/audit", fsync: every_record }"#;

fn portcullis(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `portcullis token` for `user` in `groups` (comma-separated), signed by the proxy's
/// dev_issuer.
fn mint(p: &Proxy, user: &str, groups: &str) -> String {
    let out = portcullis(&[
        "token",
        "--config",
        s(&p.config),
        "--provider",
        "dev",
        "--user",
        user,
        "--groups",
        groups,
    ]);
    assert!(
        out.status.success(),
        "portcullis token: {}",
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

/// `portcullis apikey new`: the key and its `keys_file` entry.
fn apikey_new(user: &str, groups: &str) -> (String, String) {
    let out = portcullis(&["apikey", "new", "--user", user, "--groups", groups]);
    let t = text(&out.stdout);
    assert!(out.status.success(), "apikey new: {t}");
    let key = t
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("pk_"))
        .unwrap_or_else(|| panic!("no key in:\n{t}"))
        .to_string();
    let entry = t
        .split_once("keys_file:\n\n")
        .unwrap_or_else(|| panic!("no entry in:\n{t}"))
        .1
        .trim_end()
        .to_string()
        + "\n";
    (key, entry)
}

fn audit_dir(p: &Proxy) -> PathBuf {
    p.dir.path().join("audit")
}

/// The `audit-*.jsonl` files of `dir`, in chain order.
fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("audit-") && n.ends_with(".jsonl")
        })
        .collect();
    v.sort();
    v
}

/// Every complete record in `dir` (a torn final line is left out), in chain order.
fn records(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for f in audit_files(dir) {
        let data = std::fs::read_to_string(&f).unwrap();
        let complete = match data.rfind('\n') {
            Some(i) => &data[..=i],
            None => "",
        };
        for l in complete.lines() {
            out.push(
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l}", f.display())),
            );
        }
    }
    out
}

/// Everything in the audit directory, as text, for the "never written" checks.
fn all_audit_text(dir: &Path) -> String {
    audit_files(dir)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect()
}

/// The records of one request.
fn by_rid<'a>(recs: &'a [Value], rid: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["request_id"] == rid).collect()
}

/// `portcullis audit verify ARGS…`: (exit code, stdout + stderr).
fn verify(args: &[&str]) -> (i32, String) {
    let mut a = vec!["audit", "verify"];
    a.extend_from_slice(args);
    let out = portcullis(&a);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout) + &text(&out.stderr),
    )
}

fn assert_verifies(dir: &Path) -> String {
    let (code, out) = verify(&[s(dir)]);
    assert_eq!(code, 0, "audit verify {}:\n{out}", dir.display());
    assert!(out.starts_with("OK:"), "{out}");
    out
}

/// Ends the proxy with `sig` and waits until it has exited.
fn stop(p: &mut Proxy, sig: i32) {
    p.signal(sig);
    let deadline = Instant::now() + Duration::from_secs(15);
    while p.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "portcullis did not exit on {sig}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A response as the test saw it.
struct Got {
    status: u16,
    rid: String,
    body: String,
}

/// A request with optional extra headers.
async fn send(p: &Proxy, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut r = client().request(method.parse().unwrap(), p.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let rid = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.text().await.unwrap();
    assert!(
        !rid.is_empty(),
        "{method} {path} ({status}): no x-request-id"
    );
    Got { status, rid, body }
}

async fn get_as(p: &Proxy, path: &str, token: &str) -> Got {
    let auth = format!("Bearer {token}");
    send(p, "GET", path, &[("authorization", &auth)]).await
}

async fn expect(p: &Proxy, path: &str, token: &str, status: u16) -> String {
    let g = get_as(p, path, token).await;
    assert_eq!(g.status, status, "GET {path}: {}", g.body);
    g.rid
}

fn is_hex64(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The chain fields every record carries.
fn assert_chained(r: &Value) {
    assert!(r["seq"].as_u64().is_some_and(|n| n >= 1), "{r}");
    assert!(is_hex64(&r["hash"]) && is_hex64(&r["prev_hash"]), "{r}");
    assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    assert!(r["instance"].as_str().is_some_and(|i| !i.is_empty()), "{r}");
}

// ---------------------------------------------------------------------------------------
// kill -9 under load
// ---------------------------------------------------------------------------------------

/// One load generator: requests of every kind in turn until `halt`, remembering the request
/// id and status of each one that got a response.
async fn load_client(
    base: String,
    n: usize,
    allowed: String,
    denied: String,
    halt: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(String, u16)>>>,
) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut i = n;
    while !halt.load(Ordering::Relaxed) {
        i += 1;
        let url = format!("{base}/api/load/{n}/{i}?k={i}");
        let r = match i % 4 {
            0 => c.get(&url).bearer_auth(&allowed),
            1 => c.get(&url).bearer_auth(&denied),
            2 => c.get(&url),
            _ => c.get(&url).bearer_auth("not-a-valid-token"),
        };
        match r.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let rid = resp
                    .headers()
                    .get("x-request-id")
                    .map(|v| v.to_str().unwrap_or("").to_string())
                    .unwrap_or_default();
                seen.lock().unwrap().push((rid, status));
            }
            // After the kill: refused or cut off, so never answered.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// `kill -9` while clients send allowed, denied and unauthenticated requests: the chain
/// verifies, and every request any client saw answered has its record on disk. A restart on
/// the same directory continues the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_no_answered_request() {
    let yaml = config(EVERY_RECORD);
    let mut p = Proxy::start(&yaml).await;
    let alice = mint(&p, "alice", "eng");
    let bob = mint(&p, "bob", "sales");
    let halt = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..8)
        .map(|n| {
            tokio::spawn(load_client(
                p.url(""),
                n,
                alice.clone(),
                bob.clone(),
                halt.clone(),
                seen.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop(&mut p, libc::SIGKILL);
    // Let the clients see their connections fail before they stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    halt.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());

    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for (_, st) in &seen {
        *by_status.entry(*st).or_default() += 1;
    }
    for st in [200, 401, 403] {
        assert!(
            by_status.get(&st).is_some_and(|&n| n >= 5),
            "too few {st} answers under load: {by_status:?}"
        );
    }
    assert_eq!(
        by_status
            .keys()
            .filter(|s| ![200, 401, 403].contains(*s))
            .count(),
        0,
        "unexpected statuses: {by_status:?}"
    );

    let dir = audit_dir(&p);
    let out = assert_verifies(&dir);
    eprintln!("kill -9 under load: answered {by_status:?}; verify: {out}");
    let recs = records(&dir);
    let recorded: HashSet<&str> = recs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    let missing: Vec<_> = seen
        .iter()
        .filter(|(rid, _)| rid.is_empty() || !recorded.contains(rid.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered requests have no audit record (first: {:?}); verify: {out}",
        missing.len(),
        seen.len(),
        &missing[..missing.len().min(5)]
    );
    // Each answered request has exactly one record.
    let mut count: HashMap<&str, usize> = HashMap::new();
    for r in &recs {
        if let Some(id) = r["request_id"].as_str() {
            *count.entry(id).or_default() += 1;
        }
    }
    assert!(count.values().all(|&n| n == 1), "a request recorded twice");
    let last_seq = recs.last().unwrap()["seq"].as_u64().unwrap();
    let last_hash = recs.last().unwrap()["hash"].clone();
    assert_eq!(last_seq, recs.len() as u64, "seq 1..n without gaps");

    // Restart on the same directory (a new temp dir takes the old one's place in `p`).
    let tmp = std::mem::replace(&mut p.dir, tempfile::tempdir().unwrap());
    drop(p);
    let mut p = Proxy::start_in(tmp, &yaml).await;
    let alice = mint(&p, "alice", "eng");
    let bob = mint(&p, "bob", "sales");
    let after = vec![
        expect(&p, "/api/again", &alice, 200).await,
        expect(&p, "/api/again", &bob, 403).await,
        send(&p, "GET", "/api/again", &[]).await.rid,
    ];
    stop(&mut p, libc::SIGTERM);
    let out = assert_verifies(&dir);
    let recs = records(&dir);
    for rid in &after {
        assert_eq!(
            by_rid(&recs, rid).len(),
            1,
            "{rid} after the restart: {out}"
        );
    }
    // The first record written after the restart links to the last one before it.
    let first_new = &recs[last_seq as usize];
    assert_eq!(first_new["seq"], last_seq + 1, "{first_new}");
    assert_eq!(first_new["prev_hash"], last_hash, "{first_new}");
    assert_eq!(recs.last().unwrap()["seq"], recs.len() as u64);
    assert!(
        out.contains(&format!("seq 1..{}", recs.len())),
        "one chain across the restart: {out}"
    );
}

// ---------------------------------------------------------------------------------------
// Tampering, through the CLI
// ---------------------------------------------------------------------------------------

/// A copy of the files of `dir` in a new temp dir.
fn copy_dir(dir: &Path) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for f in audit_files(dir) {
        std::fs::copy(&f, t.path().join(f.file_name().unwrap())).unwrap();
    }
    t
}

/// Rewrites the single audit file of `dir` with `f` applied to its lines.
fn edit_lines(dir: &Path, f: impl FnOnce(&mut Vec<String>)) -> PathBuf {
    let files = audit_files(dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let path = files[0].clone();
    let mut lines: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    f(&mut lines);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// `line` with its decision turned from deny to allow and its `hash` recomputed, as someone
/// who can write the files and knows the format would.
fn forge(line: &str) -> String {
    use sha2::{Digest, Sha256};
    let forged = line.replacen(r#""decision":"deny""#, r#""decision":"allow""#, 1);
    assert_ne!(forged, line, "not a denial: {line}");
    // Keys are sorted, so `hash` follows `decision` and is never first.
    let at = forged.find(r#","hash":""#).unwrap();
    let end = at + r#","hash":""#.len() + 64 + 1;
    let without = format!("{}{}", &forged[..at], &forged[end..]);
    let hash: String = Sha256::digest(without.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(r#"{},"hash":"{hash}"{}"#, &forged[..at], &forged[end..])
}

/// A changed byte, a deleted line and two swapped lines are each found at the right seq and
/// line, with exit code 1.
#[tokio::test]
async fn verify_finds_a_changed_byte_a_deleted_line_and_swapped_lines() {
    let mut p = Proxy::start(&config(EVERY_RECORD)).await;
    let alice = mint(&p, "alice", "eng");
    let bob = mint(&p, "bob", "sales");
    for i in 0..4 {
        expect(&p, &format!("/api/t{i}"), &alice, 200).await;
        expect(&p, &format!("/closed/t{i}"), &bob, 403).await;
    }
    stop(&mut p, libc::SIGTERM);
    let dir = audit_dir(&p);
    let out = assert_verifies(&dir);
    assert!(out.contains("OK: 8 records in 1 files, seq 1..8"), "{out}");

    // One byte of record 3 (GET becomes GEX).
    let t = copy_dir(&dir);
    let file = edit_lines(t.path(), |l| {
        assert!(l[2].contains(r#""method":"GET""#), "{}", l[2]);
        l[2] = l[2].replacen(r#""method":"GET""#, r#""method":"GEX""#, 1);
    });
    let (code, out) = verify(&[s(t.path())]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("{}:3: seq 3:", file.display())),
        "{out}"
    );
    assert!(out.contains("hash"), "{out}");
    // Given as a file rather than a directory, the same.
    let (code, out) = verify(&[s(&file)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":3: seq 3:"), "{out}");

    // Record 5 deleted: seq 5 is missing where record 6 now is (line 5).
    let t = copy_dir(&dir);
    let file = edit_lines(t.path(), |l| {
        l.remove(4);
    });
    let (code, out) = verify(&[s(t.path())]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("{}:5: seq 5:", file.display())),
        "{out}"
    );
    assert!(out.contains("missing"), "{out}");

    // Records 6 and 7 swapped: line 6 should be seq 6.
    let t = copy_dir(&dir);
    let file = edit_lines(t.path(), |l| l.swap(5, 6));
    let (code, out) = verify(&[s(t.path())]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("{}:6: seq 6:", file.display())),
        "{out}"
    );

    // Record 4 (a denial) replaced by a forged allow with a freshly computed hash: the
    // record checks out on its own, but record 5 no longer links to it.
    let t = copy_dir(&dir);
    let file = edit_lines(t.path(), |l| l[3] = forge(&l[3]));
    let forged: Value = serde_json::from_str(
        std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .nth(3)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(forged["decision"], "allow");
    let (code, out) = verify(&[s(t.path())]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("{}:5: seq 5:", file.display())),
        "{out}"
    );
    assert!(out.contains("replaced"), "{out}");

    // What verify cannot see, as documented: records cut off the end leave no gap, and the
    // oldest file's first prev_hash is trusted (archived records).
    let t = copy_dir(&dir);
    edit_lines(t.path(), |l| {
        l.pop();
        l.remove(0);
    });
    let (code, out) = verify(&[s(t.path())]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK: 6 records in 1 files, seq 2..7"), "{out}");

    // The untouched original still verifies, through --config too.
    let (code, out) = verify(&["--config", s(&p.config)]);
    assert_eq!(code, 0, "{out}");
}

/// With `rotate_size: 2KiB` the chain spans several files, each linking to the one before;
/// a missing middle file is named as a gap.
#[tokio::test]
async fn rotation_keeps_the_chain_and_a_missing_file_is_a_gap() {
    let mut p = Proxy::start(&config(
        r#"{ dir: "{dir}/audit", fsync: every_record, rotate_size: 2KiB }"#,
    ))
    .await;
    let alice = mint(&p, "alice", "eng");
    let bob = mint(&p, "bob", "sales");
    for i in 0..12 {
        expect(&p, &format!("/api/r{i}"), &alice, 200).await;
        expect(&p, &format!("/closed/r{i}"), &bob, 403).await;
    }
    stop(&mut p, libc::SIGTERM);
    let dir = audit_dir(&p);
    let files = audit_files(&dir);
    assert!(files.len() >= 4, "expected several files: {files:?}");
    let out = assert_verifies(&dir);
    assert!(
        out.contains(&format!(
            "OK: 24 records in {} files, seq 1..24",
            files.len()
        )),
        "{out}"
    );
    // Each file stays under the limit, is named after its first seq, and links to the last
    // record of the one before.
    let mut prev_last: Option<Value> = None;
    for f in &files {
        let data = std::fs::read_to_string(f).unwrap();
        assert!(
            data.len() <= 2048,
            "{} is {} bytes",
            f.display(),
            data.len()
        );
        let lines: Vec<Value> = data
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let first = &lines[0];
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            name,
            format!("audit-{:016}.jsonl", first["seq"].as_u64().unwrap())
        );
        if let Some(prev) = &prev_last {
            assert_eq!(first["prev_hash"], prev["hash"], "{name}");
            assert_eq!(first["seq"], prev["seq"].as_u64().unwrap() + 1, "{name}");
        }
        prev_last = Some(lines.last().unwrap().clone());
    }
    // Files given one by one, in any order, verify the same.
    let mut shuffled: Vec<&str> = files.iter().map(|f| s(f)).collect();
    shuffled.reverse();
    let (code, out) = verify(&shuffled);
    assert_eq!(code, 0, "{out}");

    // A middle file deleted: the gap is at the first record of the next file.
    let t = copy_dir(&dir);
    let gone = t.path().join(files[1].file_name().unwrap());
    let next = t.path().join(files[2].file_name().unwrap());
    let gone_seq: u64 = gone.file_name().unwrap().to_string_lossy()[6..22]
        .parse()
        .unwrap();
    std::fs::remove_file(&gone).unwrap();
    let (code, out) = verify(&[s(t.path())]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("{}:1: seq {gone_seq}:", next.display())),
        "{out}"
    );
    assert!(out.contains("missing"), "{out}");
}

// ---------------------------------------------------------------------------------------
// What a record says, and what it never says
// ---------------------------------------------------------------------------------------

/// Allowed, denied (default deny and an explicit rule), shadow-mode and refused requests each
/// leave exactly one record with the documented fields; query values, tokens, cookies and API
/// keys are never written.
#[tokio::test]
async fn each_decision_and_auth_failure_has_one_complete_record() {
    let (key, entry) = apikey_new("deploy-bot", "ci");
    let (bad_key, _) = apikey_new("nobody", "ci");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keys.yaml"), format!("keys:\n{entry}")).unwrap();
    let yaml = format!(
        "{HEAD}    - {{ name: agents, kind: api_key, keys_file: \"{{dir}}/keys.yaml\" }}\n\
         audit: {EVERY_RECORD}\n{ROUTES}"
    )
    .replace(
        "auth: [dev], allow: [{ groups: [eng] }]",
        "auth: [dev, agents], allow: [{ groups: [eng, ci] }]",
    );
    let p = Proxy::start_in(tmp, &yaml).await;
    let alice = mint(&p, "alice", "eng");
    let bob = mint(&p, "bob", "sales");
    let mallory = mint(&p, "mallory", "eng");
    let alice_auth = format!("Bearer {alice}");
    let cookie = "theme=dark; pc_session=cookie-secret-9f8e7d";

    // Allowed, with query values, a cookie and a host.
    let allowed = send(
        &p,
        "GET",
        "/api/items?color=vermilion42&size=xxlarge7&flag",
        &[
            ("authorization", &alice_auth),
            ("cookie", cookie),
            ("host", "app.example.com"),
        ],
    )
    .await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    // Default deny, and an explicit deny rule.
    let default_deny = send(
        &p,
        "POST",
        "/closed/doc?id=secret-doc-31",
        &[("authorization", &format!("Bearer {bob}"))],
    )
    .await;
    assert_eq!(default_deny.status, 403);
    assert!(
        default_deny.body.contains(&default_deny.rid),
        "the 403 names the request id: {}",
        default_deny.body
    );
    let rule_deny = get_as(&p, "/guarded/x", &mallory).await;
    assert_eq!(rule_deny.status, 403);
    // Shadow mode.
    let shadow = get_as(&p, "/trial/x", &bob).await;
    assert_eq!(shadow.status, 200, "shadow mode lets it through");
    // A bad token (alice's, with its signature changed), no credential, a bad API key, a
    // good API key.
    let mut forged = alice.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let bad_token = get_as(&p, "/api/x?token=zq-secret-77", &forged).await;
    assert_eq!(bad_token.status, 401);
    let anonymous = send(&p, "GET", "/api/anon", &[]).await;
    assert_eq!(anonymous.status, 401);
    let bad_api_key = send(&p, "GET", "/api/k", &[("x-api-key", &bad_key)]).await;
    assert_eq!(bad_api_key.status, 401);
    let agent = send(
        &p,
        "GET",
        "/api/k",
        &[("authorization", &format!("ApiKey {key}"))],
    )
    .await;
    assert_eq!(agent.status, 200, "{}", agent.body);
    // Public routes make no decision, so no record.
    let public = send(&p, "GET", "/open/x", &[]).await;
    assert_eq!(public.status, 200);

    let dir = audit_dir(&p);
    let recs = records(&dir);
    for r in &recs {
        assert_chained(r);
    }
    let one = |g: &Got| -> Value {
        let v = by_rid(&recs, &g.rid);
        assert_eq!(v.len(), 1, "records of {}: {v:?}", g.rid);
        v[0].clone()
    };
    assert!(by_rid(&recs, &public.rid).is_empty());

    let r = one(&allowed);
    assert_eq!(r["kind"], "decision", "{r}");
    assert_eq!(r["decision"], "allow", "{r}");
    assert_eq!(r["app"], "default", "{r}");
    assert_eq!(r["route"], "api", "{r}");
    assert_eq!(r["principal"]["user"], "alice", "{r}");
    assert_eq!(r["principal"]["provider"], "dev", "{r}");
    assert_eq!(r["principal"]["groups"], json!(["eng"]), "{r}");
    assert!(
        r["principal"]["subject"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{r}"
    );
    assert_eq!(r["client_ip"], "127.0.0.1", "{r}");
    assert_eq!(r["method"], "GET", "{r}");
    assert_eq!(r["host"], "app.example.com", "{r}");
    assert_eq!(r["path"], "/api/items", "{r}");
    assert_eq!(r["query_keys"], json!(["color", "size", "flag"]), "{r}");
    assert!(
        r["reasons"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().unwrap().contains("default/api/allow[1]"))),
        "{r}"
    );
    assert!(r["latency_us"].as_u64().is_some(), "{r}");

    let r = one(&default_deny);
    assert_eq!(
        (
            &r["kind"],
            &r["decision"],
            &r["route"],
            &r["method"],
            &r["path"]
        ),
        (
            &json!("decision"),
            &json!("deny"),
            &json!("closed"),
            &json!("POST"),
            &json!("/closed/doc")
        ),
        "{r}"
    );
    assert_eq!(r["principal"]["user"], "bob", "{r}");
    assert_eq!(r["principal"]["groups"], json!(["sales"]), "{r}");
    assert_eq!(r["query_keys"], json!(["id"]), "{r}");
    assert!(r["reasons"].to_string().contains("default deny"), "{r}");
    assert!(r["latency_us"].as_u64().is_some(), "{r}");

    let r = one(&rule_deny);
    assert_eq!(
        (&r["decision"], &r["route"]),
        (&json!("deny"), &json!("guarded")),
        "{r}"
    );
    assert_eq!(r["principal"]["user"], "mallory", "{r}");
    assert!(
        r["reasons"].to_string().contains("default/guarded/deny[1]"),
        "the reasons name the rule: {r}"
    );

    let r = one(&shadow);
    assert_eq!(
        (&r["kind"], &r["decision"], &r["route"]),
        (&json!("decision"), &json!("would_deny"), &json!("trial")),
        "{r}"
    );
    assert_eq!(r["principal"]["user"], "bob", "{r}");

    for (g, why) in [
        (&bad_token, "bad token"),
        (&anonymous, "no credential"),
        (&bad_api_key, "bad API key"),
    ] {
        let r = one(g);
        assert_eq!(r["kind"], "auth_failure", "{why}: {r}");
        assert_eq!(r["decision"], "deny", "{why}: {r}");
        assert_eq!(r["route"], "api", "{why}: {r}");
        assert_eq!(r["client_ip"], "127.0.0.1", "{why}: {r}");
        assert!(r.get("principal").is_none(), "{why}: {r}");
        assert!(
            r["reasons"].as_array().is_some_and(|a| !a.is_empty()),
            "{why}: {r}"
        );
    }
    assert_eq!(one(&bad_token)["query_keys"], json!(["token"]));
    assert!(one(&anonymous)["reasons"]
        .to_string()
        .contains("no credentials"));

    let r = one(&agent);
    assert_eq!(r["decision"], "allow", "{r}");
    assert_eq!(r["principal"]["user"], "deploy-bot", "{r}");
    assert_eq!(r["principal"]["provider"], "agents", "{r}");
    assert_eq!(r["principal"]["groups"], json!(["ci"]), "{r}");

    // Never written.
    let all = all_audit_text(&dir);
    for secret in [
        alice.as_str(),
        bob.as_str(),
        mallory.as_str(),
        forged.as_str(),
        // The signature alone, too.
        alice.rsplit('.').next().unwrap(),
        key.as_str(),
        bad_key.as_str(),
        "cookie-secret-9f8e7d",
        "vermilion42",
        "xxlarge7",
        "secret-doc-31",
        "zq-secret-77",
        ADMIN_TOKEN,
    ] {
        assert!(
            !all.contains(secret),
            "`{secret}` is in the audit files:\n{all}"
        );
    }
    assert_verifies(&dir);
}

// ---------------------------------------------------------------------------------------
// Admin actions and reloads
// ---------------------------------------------------------------------------------------

/// Admin actions and reloads (applied by SIGHUP, rejected, and through the admin API) are
/// recorded; the admin token never is.
#[tokio::test]
async fn admin_actions_and_reloads_are_recorded() {
    let yaml = config(EVERY_RECORD);
    let p = Proxy::start(&yaml).await;
    let dir = audit_dir(&p);

    let (st, body) = p
        .admin(
            Method::POST,
            "/api/v1/backends/echo/servers/s1/state",
            Some(json!({ "state": "drain" })),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = p
        .admin(
            Method::PUT,
            "/api/v1/backends/echo/servers/s1/weight",
            Some(json!({ "weight": 7 })),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = p
        .admin(
            Method::POST,
            "/api/v1/backends/default%2Fecho/servers/s1/state",
            Some(json!({ "state": "ready" })),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    // A refused call (wrong token) changes nothing and is not an action.
    let r = client()
        .post(p.admin_url("/api/v1/backends/echo/servers/s1/state"))
        .bearer_auth("wrong-token-000000000000")
        .json(&json!({ "state": "maint" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let recs = records(&dir);
    let admin: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "admin").collect();
    assert_eq!(admin.len(), 3, "{admin:?}");
    let a = admin[0];
    assert_chained(a);
    assert_eq!(a["detail"]["action"], "set_state", "{a}");
    assert_eq!(
        a["detail"]["args"],
        json!({ "backend": "default/echo", "server": "s1", "state": "drain" }),
        "{a}"
    );
    assert_eq!(a["principal"]["provider"], "admin", "{a}");
    assert!(
        a["principal"]["user"]
            .as_str()
            .is_some_and(|u| u.starts_with("admin-token[0]@127.0.0.1")),
        "who did it: {a}"
    );
    assert_eq!(admin[1]["detail"]["action"], "set_weight", "{}", admin[1]);
    assert_eq!(admin[1]["detail"]["args"]["weight"], 7, "{}", admin[1]);
    assert_eq!(admin[2]["detail"]["args"]["state"], "ready", "{}", admin[2]);
    // The chain links them, in order.
    assert_eq!(admin[1]["prev_hash"], admin[0]["hash"]);
    assert_eq!(admin[2]["seq"], admin[1]["seq"].as_u64().unwrap() + 1);

    // An applied reload (SIGHUP; the file watcher may see the change first).
    let reloads = |want: &str| -> Vec<Value> {
        records(&dir)
            .into_iter()
            .filter(|r| r["kind"] == "reload" && r["detail"]["result"] == want)
            .collect()
    };
    let changed = yaml.replace("/open/", "/opened/");
    p.write_config(&changed);
    p.sighup();
    assert!(
        eventually(Duration::from_secs(10), || async {
            !reloads("ok").is_empty()
        })
        .await,
        "no reload record: {:?}",
        records(&dir)
    );
    let ok = reloads("ok");
    assert_eq!(ok.len(), 1, "{ok:?}");
    // The record is written before the status is updated.
    let version = ok[0]["detail"]["version"].clone();
    assert!(
        eventually(Duration::from_secs(5), || async {
            p.config_status().await["version"] == version
        })
        .await,
        "the recorded version is the one serving: {}",
        ok[0]
    );
    assert!(ok[0]["detail"]["trigger"].as_str().is_some(), "{}", ok[0]);
    assert_chained(&ok[0]);
    let r = client().get(p.url("/opened/x")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the reload took effect");

    // A rejected reload: the old config keeps serving, and the error is recorded.
    p.write_config(&(changed.clone() + "\nbogus_key: 1\n"));
    p.sighup();
    assert!(
        eventually(Duration::from_secs(10), || async {
            !reloads("rejected").is_empty()
        })
        .await,
        "no rejected reload record: {:?}",
        records(&dir)
    );
    let bad = reloads("rejected");
    assert!(
        bad[0]["detail"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("bogus_key")),
        "{}",
        bad[0]
    );
    assert_eq!(p.config_status().await["version"], version);

    // Through the admin API, with a fixed config: the trigger names the admin.
    p.write_config(&changed.replace("/opened/", "/opened2/"));
    let (st, body) = p.admin(Method::POST, "/api/v1/reload", None).await;
    assert_eq!(st, 200, "{body}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            reloads("ok").len() >= 2
        })
        .await
    );
    let ok = reloads("ok");
    assert!(
        ok.iter().any(|r| r["detail"]["trigger"]
            .as_str()
            .is_some_and(|t| t.contains("admin"))),
        "{ok:?}"
    );

    let all = all_audit_text(&dir);
    assert!(
        !all.contains(ADMIN_TOKEN),
        "the admin token is in the audit files"
    );
    assert!(!all.contains("wrong-token-000000000000"));
    assert_verifies(&dir);
}

// ---------------------------------------------------------------------------------------
// Search
// ---------------------------------------------------------------------------------------

fn search(args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["audit", "search"];
    a.extend_from_slice(args);
    let out = portcullis(&a);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// The request ids of `search --json` output.
fn ids(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["request_id"].as_str().unwrap_or("").to_string()
        })
        .collect()
}

/// `audit search` by principal, decision, route, kind and time finds exactly the matching
/// records, by config or by directory.
#[tokio::test]
async fn search_finds_exactly_the_matching_records() {
    let p = Proxy::start(&config(EVERY_RECORD)).await;
    let alice = mint(&p, "alice", "eng");
    let bob = mint(&p, "bob", "sales");
    let a1 = expect(&p, "/closed/1", &alice, 403).await;
    expect(&p, "/api/1", &alice, 200).await;
    let a2 = expect(&p, "/closed/2", &alice, 403).await;
    expect(&p, "/closed/3", &bob, 403).await;
    expect(&p, "/guarded/1", &alice, 200).await;
    let would = expect(&p, "/trial/1", &alice, 200).await;
    send(&p, "GET", "/api/anon", &[]).await;
    let cfg = s(&p.config).to_string();
    let dir = audit_dir(&p);

    let (code, out, err) = search(&[
        "--config",
        &cfg,
        "--principal",
        "alice",
        "--decision",
        "deny",
        "--route",
        "closed",
        "--since",
        "1h",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ids(&out), vec![a1.clone(), a2.clone()], "{out}");
    // Each line is the stored record, chain fields included.
    for l in out.lines() {
        assert_chained(&serde_json::from_str(l).unwrap());
    }
    // `app/route` and the directory instead of --config find the same.
    let (code, out, err) = search(&[
        "--principal",
        "alice",
        "--decision",
        "deny",
        "--route",
        "default/closed",
        "--since",
        "1h",
        "--json",
        s(&dir),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ids(&out), vec![a1.clone(), a2.clone()], "{out}");
    // The text form: one line per record.
    let (code, out, err) = search(&[
        "--config",
        &cfg,
        "--principal",
        "alice",
        "--decision",
        "deny",
        "--route",
        "closed",
        "--since",
        "1h",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.contains(&"/closed/1".to_string()) && out.contains("user=alice"),
        "{out}"
    );
    assert!(err.contains("2 record(s)"), "{err}");

    // Other filters.
    // Authentication failures are denials too.
    let (_, out, _) = search(&["--config", &cfg, "--decision", "deny", "--json"]);
    assert_eq!(ids(&out).len(), 4, "{out}");
    let (_, out, _) = search(&[
        "--config",
        &cfg,
        "--decision",
        "deny",
        "--kind",
        "decision",
        "--json",
    ]);
    assert_eq!(ids(&out).len(), 3, "{out}");
    let (_, out, _) = search(&["--config", &cfg, "--decision", "would_deny", "--json"]);
    assert_eq!(ids(&out), vec![would], "{out}");
    let (_, out, _) = search(&["--config", &cfg, "--kind", "auth_failure", "--json"]);
    assert_eq!(ids(&out).len(), 1, "{out}");
    let (_, out, _) = search(&["--config", &cfg, "--principal", "alice", "--json"]);
    assert_eq!(ids(&out).len(), 5, "{out}");
    let (_, out, _) = search(&["--config", &cfg, "--route", "closed", "--json"]);
    assert_eq!(ids(&out).len(), 3, "{out}");
    let (code, out, _) = search(&[
        "--config",
        &cfg,
        "--principal",
        "alice",
        "--since",
        "2999-01-01T00:00:00Z",
        "--json",
    ]);
    assert_eq!((code, out.as_str()), (0, ""), "nothing in the future");
    let (code, _, err) = search(&["--config", &cfg, "--decision", "maybe"]);
    assert_eq!(code, 2, "{err}");
}

// ---------------------------------------------------------------------------------------
// Overload
// ---------------------------------------------------------------------------------------

/// `on_overload: fail_closed` with a one-record queue: under concurrent load some requests
/// find the queue full and are refused with 503 rather than go unrecorded; every request that
/// was answered otherwise has its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_closed_refuses_rather_than_answer_unrecorded() {
    let mut p = Proxy::start(&config(
        r#"{ dir: "{dir}/audit", fsync: every_record, queue: 1, on_overload: fail_closed }"#,
    ))
    .await;
    let alice = mint(&p, "alice", "eng");
    let bob = mint(&p, "bob", "sales");
    let halt = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..32)
        .map(|n| {
            tokio::spawn(load_client(
                p.url(""),
                n,
                alice.clone(),
                bob.clone(),
                halt.clone(),
                seen.clone(),
            ))
        })
        .collect();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == 503)
            .count()
            >= 3
        {
            break;
        }
    }
    halt.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    stop(&mut p, libc::SIGTERM);
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for (_, st) in &seen {
        *by_status.entry(*st).or_default() += 1;
    }
    eprintln!("fail_closed load: {by_status:?}");
    let dir = audit_dir(&p);
    assert_verifies(&dir);
    let recs = records(&dir);
    let recorded: HashSet<&str> = recs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    for (rid, st) in &seen {
        if *st == 503 {
            assert!(
                !recorded.contains(rid.as_str()),
                "a refused request was recorded"
            );
        } else {
            assert!(
                recorded.contains(rid.as_str()),
                "a {st} answer without a record ({by_status:?})"
            );
        }
    }
    assert!(
        by_status.get(&503).is_some_and(|&n| n > 0),
        "the one-record queue never overflowed: {by_status:?}"
    );
    assert!(p.log_text().contains("audit record not written"));
}

/// The record carries the canonical path and host, the ones that were routed and authorized
/// and that the origin received, not the spelling the client chose.
#[tokio::test]
async fn the_record_carries_the_canonical_target() {
    let p = Proxy::start(&config(EVERY_RECORD)).await;
    let alice = mint(&p, "alice", "eng");
    let got = send(
        &p,
        "GET",
        "/%61pi//it%65ms?x=%41",
        &[
            ("authorization", &format!("Bearer {alice}")),
            ("host", "App.Example.COM."),
        ],
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    let echo: Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(
        (&echo["path"], &echo["query"]),
        (&json!("/api/items"), &json!("x=%41")),
        "the origin got the canonical path and the query as sent: {echo}"
    );
    let recs = records(&audit_dir(&p));
    let r = by_rid(&recs, &got.rid);
    assert_eq!(r.len(), 1, "{recs:?}");
    assert_eq!(r[0]["path"], "/api/items", "{}", r[0]);
    assert_eq!(r[0]["host"], "app.example.com", "{}", r[0]);
}
