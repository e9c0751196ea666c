//! Stick tables at runtime through the real binary: the admin API's table endpoints (list, top
//! entries, one entry, set `gpc0` and tags, clear an entry or a table), their audit records,
//! their authentication, the `portcullis table` command, and banning a client at runtime with
//! a rule on `gpc0`.

mod common;

use common::{client, Origin, Proxy, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::Path;

/// A real TCP origin behind route `app` on `/app`, which tracks `per_ip` (keyed by client IP;
/// denies while its `gpc0` is above 0) and `per_tenant` (keyed by client IP and `X-Tenant`).
fn config(origin: &Origin) -> String {
    format!(
        r#"
listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
audit: {{ dir: "{{dir}}/audit", fsync: every_record }}
backends:
  - {{ name: o, servers: [{{ name: s1, address: "{origin}" }}] }}
stick_tables:
  - {{ name: per_ip, key: src, size: 1000, store: ["http_req_rate(10s)", http_req_cnt, gpc0, tags] }}
  - {{ name: per_tenant, key: [src, "header:x-tenant"], size: 100, store: [http_req_cnt] }}
routes:
  - name: app
    match: {{ path_prefix: /app }}
    backend: o
    public: true
    limits:
      track: [per_ip, per_tenant]
      rules: [{{ table: per_ip, counter: gpc0, above: 0 }}]
"#,
        origin = origin.address()
    )
}

async fn start() -> (Origin, Proxy) {
    let origin = Origin::named("origin").await;
    let p = Proxy::start(&config(&origin)).await;
    (origin, p)
}

/// `GET /app` as tenant `acme`: the status.
async fn visit(p: &Proxy) -> u16 {
    client()
        .get(p.url("/app/x"))
        .header("x-tenant", "acme")
        .send()
        .await
        .expect("a response")
        .status()
        .as_u16()
}

/// An admin call with the token: the status and the body as JSON (null when empty or not
/// JSON; the text is in the assertion messages).
async fn admin(p: &Proxy, m: Method, path: &str, body: Option<Value>) -> (u16, Value, String) {
    let (s, text) = p.admin(m, path, body).await;
    (s, serde_json::from_str(&text).unwrap_or(Value::Null), text)
}

/// The `admin` records of the audit trail.
fn admin_records(dir: &Path) -> Vec<Value> {
    let Ok(files) = std::fs::read_dir(dir.join("audit")) else {
        return Vec::new();
    };
    let mut files: Vec<_> = files.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "jsonl"))
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect::<Vec<_>>()
        })
        .filter(|r| r["kind"] == "admin")
        .collect()
}

#[tokio::test]
async fn tables_are_read_changed_and_cleared_over_the_admin_api_with_audit_records() {
    let (origin, p) = start().await;
    for _ in 0..3 {
        assert_eq!(visit(&p).await, 200);
    }
    assert_eq!(origin.hits(), 3);

    // Every table endpoint needs the token, and a refused call changes nothing.
    let c = reqwest::Client::new();
    let entry = p.admin_url("/api/v1/tables/per_ip/entries/127.0.0.1");
    for (m, url) in [
        (Method::GET, p.admin_url("/api/v1/tables")),
        (Method::GET, p.admin_url("/api/v1/tables/per_ip")),
        (Method::GET, entry.clone()),
        (Method::POST, entry.clone()),
        (Method::DELETE, entry.clone()),
        (Method::DELETE, p.admin_url("/api/v1/tables/per_ip")),
    ] {
        let r = c
            .request(m.clone(), &url)
            .json(&json!({ "gpc0": 1 }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{m} {url}");
        let r = c
            .request(m.clone(), &url)
            .bearer_auth("wrong-token")
            .json(&json!({ "gpc0": 1 }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{m} {url} with a wrong token");
    }

    // Every table, with its definition, entries and memory.
    let (s, v, text) = admin(&p, Method::GET, "/api/v1/tables", None).await;
    assert_eq!(s, 200, "{text}");
    let tables = v["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 2, "{v}");
    let per_ip = &tables[0];
    assert_eq!(per_ip["name"], "per_ip");
    assert_eq!(per_ip["key"], "src");
    assert_eq!(per_ip["size"], 1000);
    assert_eq!(per_ip["expire"], "10m");
    assert_eq!(per_ip["expire_ms"], 600_000);
    assert_eq!(
        per_ip["store"],
        json!(["http_req_rate(10s)", "http_req_cnt", "gpc0", "tags"])
    );
    assert_eq!(per_ip["entries"], 1);
    assert!(per_ip["memory_bytes"].as_u64().unwrap() > 0, "{per_ip}");
    assert_eq!(tables[1]["name"], "per_tenant");
    assert_eq!(tables[1]["key"], json!(["src", "header:x-tenant"]));
    assert_eq!(tables[1]["entries"], 1);

    // The top entries, by the first counter unless told.
    let (s, v, text) = admin(&p, Method::GET, "/api/v1/tables/per_ip?top=5", None).await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(v["by"], "http_req_rate");
    assert_eq!(v["table"]["name"], "per_ip");
    let e = &v["entries"][0];
    assert_eq!(e["key"], "127.0.0.1");
    assert_eq!(
        e["counters"],
        json!({ "http_req_rate": 3, "http_req_cnt": 3, "gpc0": 0 })
    );
    assert_eq!(e["tags"], json!([]));
    assert!(e["expires_in_ms"].as_u64().unwrap() > 590_000, "{e}");
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    let (s, v, _) = admin(
        &p,
        Method::GET,
        "/api/v1/tables/per_ip?by=http_req_cnt",
        None,
    )
    .await;
    assert_eq!((s, &v["by"]), (200, &json!("http_req_cnt")));

    // A tuple key is a JSON array, and names its entry.
    let (s, v, text) = admin(&p, Method::GET, "/api/v1/tables/per_tenant", None).await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(v["entries"][0]["key"], r#"["127.0.0.1","acme"]"#);
    let (s, v, text) = admin(
        &p,
        Method::GET,
        "/api/v1/tables/per_tenant/entries/%5B%22127.0.0.1%22%2C%22acme%22%5D",
        None,
    )
    .await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(v["counters"], json!({ "http_req_cnt": 3 }));
    assert_eq!(v["table"], "per_tenant");

    // Reads that cannot be answered.
    for (path, status, says) in [
        (
            "/api/v1/tables/nope",
            404,
            "no stick table `nope`; the tables are `per_ip`, `per_tenant`",
        ),
        ("/api/v1/tables/per_ip?top=5000", 400, "between 1 and 1000"),
        ("/api/v1/tables/per_ip?top=0", 400, "between 1 and 1000"),
        ("/api/v1/tables/per_ip?limit=5", 400, "the query takes"),
        (
            "/api/v1/tables/per_ip?by=conn_cur",
            409,
            "does not store `conn_cur`",
        ),
        (
            "/api/v1/tables/per_ip?by=tags",
            400,
            "not a counter to sort by",
        ),
        (
            "/api/v1/tables/per_ip/entries/192.0.2.1",
            404,
            "no entry `192.0.2.1`",
        ),
        (
            "/api/v1/tables/per_ip/entries/nope",
            400,
            "not an IP address",
        ),
    ] {
        let (s, _, text) = admin(&p, Method::GET, path, None).await;
        assert_eq!(s, status, "{path}: {text}");
        assert!(text.contains(says), "{path}: {text}");
    }

    // Set gpc0 and a tag, and see them.
    let path = "/api/v1/tables/per_ip/entries/127.0.0.1";
    let (s, v, text) = admin(
        &p,
        Method::POST,
        path,
        Some(json!({ "gpc0": 5, "tag": "watch" })),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(v["key"], "127.0.0.1");
    assert_eq!(v["counters"]["gpc0"], 5);
    assert_eq!(v["tags"], json!(["watch"]));
    let (s, v, _) = admin(&p, Method::GET, path, None).await;
    assert_eq!(
        (s, &v["counters"]["gpc0"], &v["tags"]),
        (200, &json!(5), &json!(["watch"]))
    );
    let (s, v, text) = admin(&p, Method::POST, path, Some(json!({ "untag": "watch" }))).await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(v["tags"], json!([]));

    // Changes that are refused: nothing changes, nothing is recorded.
    for (path, body, status, says) in [
        (
            "/api/v1/tables/per_tenant/entries/%5B%22127.0.0.1%22%2C%22acme%22%5D",
            json!({ "gpc0": 1 }),
            409,
            "does not store `gpc0`",
        ),
        (
            path,
            json!({ "gpc0": 1, "tag": "no spaces" }),
            400,
            "letters, digits",
        ),
        (path, json!({ "gpc0": -1 }), 400, "body must be JSON"),
        (path, json!({ "weight": 1 }), 400, "body must be JSON"),
        (path, json!({}), 400, "body must be JSON"),
        (
            "/api/v1/tables/nope/entries/127.0.0.1",
            json!({ "gpc0": 1 }),
            404,
            "no stick table",
        ),
        (
            "/api/v1/tables/per_ip/entries/192.0.2.9",
            json!({ "untag": "x" }),
            404,
            "no entry",
        ),
    ] {
        let (s, _, text) = admin(&p, Method::POST, path, Some(body.clone())).await;
        assert_eq!(s, status, "{path} {body}: {text}");
        assert!(text.contains(says), "{path} {body}: {text}");
    }
    let (_, v, _) = admin(&p, Method::GET, path, None).await;
    assert_eq!(v["counters"]["gpc0"], 5, "a refused call changed nothing");

    // Clear the entry, then the other table.
    let (s, _, text) = admin(&p, Method::DELETE, path, None).await;
    assert_eq!(s, 204, "{text}");
    let (s, _, _) = admin(&p, Method::GET, path, None).await;
    assert_eq!(s, 404);
    let (s, _, text) = admin(&p, Method::DELETE, "/api/v1/tables/per_tenant", None).await;
    assert_eq!(s, 204, "{text}");
    let (_, v, _) = admin(&p, Method::GET, "/api/v1/tables", None).await;
    assert_eq!(v["tables"][0]["entries"], 0, "{v}");
    assert_eq!(v["tables"][1]["entries"], 0, "{v}");
    let (s, _, _) = admin(&p, Method::DELETE, "/api/v1/tables/nope", None).await;
    assert_eq!(s, 404);

    // One record per change, each with the token's principal and the canonical arguments.
    let recs = admin_records(p.dir.path());
    let got: Vec<(&str, &Value)> = recs
        .iter()
        .map(|r| {
            (
                r["detail"]["action"].as_str().unwrap(),
                &r["detail"]["args"],
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "set_table_gpc",
                &json!({ "table": "per_ip", "key": "127.0.0.1", "value": 5 })
            ),
            (
                "set_table_tag",
                &json!({ "table": "per_ip", "key": "127.0.0.1", "tag": "watch" })
            ),
            (
                "remove_table_tag",
                &json!({ "table": "per_ip", "key": "127.0.0.1", "tag": "watch" })
            ),
            (
                "clear_table_key",
                &json!({ "table": "per_ip", "key": "127.0.0.1" })
            ),
            ("clear_table", &json!({ "table": "per_tenant" })),
        ],
        "{recs:#?}"
    );
    for r in &recs {
        let who = r["principal"]["user"].as_str().unwrap();
        assert!(who.starts_with("admin-token[0]@127.0.0.1:"), "{r}");
        assert_eq!(r["principal"]["provider"], "admin");
    }
    assert!(!p.log_text().contains(ADMIN_TOKEN));
}

#[tokio::test]
async fn an_operator_bans_a_client_by_setting_gpc0_and_clearing_the_key_lets_it_back_in() {
    let (origin, p) = start().await;
    assert_eq!(visit(&p).await, 200);

    let (s, _, text) = admin(
        &p,
        Method::POST,
        "/api/v1/tables/per_ip/entries/127.0.0.1",
        Some(json!({ "gpc0": 1 })),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let hits = origin.hits();
    for _ in 0..3 {
        let r = client().get(p.url("/app/x")).send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
    }
    assert_eq!(origin.hits(), hits, "a banned client reaches no origin");

    let (s, _, text) = admin(
        &p,
        Method::DELETE,
        "/api/v1/tables/per_ip/entries/127.0.0.1",
        None,
    )
    .await;
    assert_eq!(s, 204, "{text}");
    assert_eq!(visit(&p).await, 200);
    assert_eq!(origin.hits(), hits + 1);

    // Setting it back to 0 lifts a ban too, keeping the entry's counts.
    admin(
        &p,
        Method::POST,
        "/api/v1/tables/per_ip/entries/127.0.0.1",
        Some(json!({ "gpc0": 1 })),
    )
    .await;
    assert_eq!(visit(&p).await, 429);
    let (_, v, _) = admin(
        &p,
        Method::POST,
        "/api/v1/tables/per_ip/entries/127.0.0.1",
        Some(json!({ "gpc0": 0 })),
    )
    .await;
    assert_eq!(v["counters"]["gpc0"], 0);
    assert_eq!(v["counters"]["http_req_cnt"], 2, "{v}");
    assert_eq!(visit(&p).await, 200);
}

/// Runs `portcullis table --admin … ARGS` with the token in the environment (or a file, when
/// `token_file` is given). Returns the exit code, stdout and stderr.
fn table_cli(p: &Proxy, token_file: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(["table", "--admin", &p.admin_url("")]);
    match token_file {
        Some(f) => {
            cmd.arg("--token-file")
                .arg(f)
                .env_remove("PORTCULLIS_ADMIN_TOKEN");
        }
        None => {
            cmd.env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN);
        }
    }
    let out = cmd.args(args).output().expect("run portcullis table");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_table_command_shows_sets_and_clears_entries() {
    let (_origin, p) = start().await;
    for _ in 0..2 {
        assert_eq!(visit(&p).await, 200);
    }
    let file = p.dir.path().join("admin.token");
    std::fs::write(&file, format!("{ADMIN_TOKEN}\n")).unwrap();

    let (code, out, err) = table_cli(&p, Some(&file), &["show"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("NAME"), "{out}");
    assert!(out.contains("per_ip"), "{out}");
    assert!(out.contains("per_tenant"), "{out}");

    let (code, out, err) = table_cli(&p, None, &["show", "per_ip", "--top", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("top by http_req_rate"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("127.0.0.1"))
        .unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..4], ["127.0.0.1", "2", "2", "0"], "{out}");

    // Ban, see it, lift it.
    let (code, out, err) = table_cli(
        &p,
        None,
        &[
            "set",
            "per_ip",
            "127.0.0.1",
            "--gpc0",
            "1",
            "--tag",
            "banned",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("banned"), "{out}");
    assert_eq!(visit(&p).await, 429);
    let (code, out, err) = table_cli(&p, None, &["--json", "get", "per_ip", "127.0.0.1"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&v["counters"]["gpc0"], &v["tags"]),
        (&json!(1), &json!(["banned"]))
    );
    let (code, out, err) = table_cli(&p, None, &["clear", "per_ip", "127.0.0.1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "cleared 127.0.0.1 in per_ip");
    assert_eq!(visit(&p).await, 200);

    // A tuple key, given as its JSON array.
    let (code, out, err) = table_cli(&p, None, &["get", "per_tenant", r#"["127.0.0.1","acme"]"#]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#"["127.0.0.1","acme"]"#), "{out}");
    let (code, out, err) = table_cli(&p, None, &["clear", "per_tenant"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "cleared every entry of per_tenant");

    // Errors: the API's message, exit 1; no token, exit 2; a wrong token, 401.
    let (code, _, err) = table_cli(&p, None, &["get", "per_ip", "192.0.2.1"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("404") && err.contains("no entry `192.0.2.1`"),
        "{err}"
    );
    let (code, _, err) = table_cli(&p, None, &["set", "per_ip", "127.0.0.1"]);
    assert_eq!(code, 2, "one of --gpc0, --tag, --untag is required: {err}");
    let missing = p.dir.path().join("missing.token");
    let (code, _, err) = table_cli(&p, Some(&missing), &["show"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--token-file"), "{err}");
    std::fs::write(&file, "wrong-token").unwrap();
    let (code, _, err) = table_cli(&p, Some(&file), &["show"]);
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");

    // Each change the command made is recorded.
    let actions: Vec<String> = admin_records(p.dir.path())
        .iter()
        .map(|r| r["detail"]["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        actions,
        [
            "set_table_gpc",
            "set_table_tag",
            "clear_table_key",
            "clear_table"
        ]
    );
}

#[tokio::test]
async fn an_unreachable_admin_api_is_an_error() {
    let (code, _, err) = tokio::task::spawn_blocking(|| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["table", "--admin"])
            .arg(format!("http://{}", common::dead_address()))
            .arg("show")
            .env("PORTCULLIS_ADMIN_TOKEN", "t")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot connect"), "{err}");
}
