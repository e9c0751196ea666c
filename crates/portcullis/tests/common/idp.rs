//! The real OpenID Provider of the tests: `node tests/idp/server.mjs` (panva's
//! `oidc-provider`) on loopback, started and killed by the test.

use super::client;
use serde_json::Value;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

pub const CLIENT_ID: &str = "portcullis";
pub const CLIENT_SECRET: &str = "portcullis-test-secret";
/// A redirect URI for the tests' own client code (never fetched: the code is read from the
/// `Location` header).
pub const TEST_RP_CALLBACK: &str = "http://127.0.0.1:9/cb";

pub fn idp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/idp")
}

static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Installs the OP's npm packages once, if scripts/test.sh has not.
pub fn ensure_installed() {
    let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = idp_dir();
    if dir.join("node_modules/oidc-provider/package.json").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .expect("npm is needed to install tests/idp (or run `npm ci --prefix tests/idp`)");
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

/// Token lifetimes at the OP, in seconds.
#[derive(Clone, Copy)]
pub struct Ttls {
    pub access: u64,
    pub id: u64,
    /// Rotate refresh tokens on every use, with reuse detection.
    pub rotate_refresh: bool,
}

impl Default for Ttls {
    fn default() -> Self {
        Ttls {
            access: 3600,
            id: 3600,
            rotate_refresh: false,
        }
    }
}

/// A running `node tests/idp/server.mjs`. Killed on drop.
pub struct Idp {
    pub child: Child,
    _stdin: ChildStdin,
    pub issuer: String,
    pub control: String,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Idp {
    pub async fn start(ttl: Ttls) -> Idp {
        ensure_installed();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("idp.log");
        let node = if std::path::Path::new("/usr/bin/node").exists() {
            "/usr/bin/node"
        } else {
            "node"
        };
        let mut child = Command::new(node)
            .arg(idp_dir().join("server.mjs"))
            // Its own port from `free_port`, not the kernel's: the Provider is stopped and
            // resumed on it, and meanwhile no outgoing connection may take it.
            .args([
                "--port",
                &super::free_port().to_string(),
                "--control-port",
                "0",
            ])
            .env("IDP_CLIENT_ID", CLIENT_ID)
            .env("IDP_CLIENT_SECRET", CLIENT_SECRET)
            .env("IDP_REDIRECT_URIS", TEST_RP_CALLBACK)
            .env("IDP_ACCESS_TOKEN_TTL", ttl.access.to_string())
            .env("IDP_ID_TOKEN_TTL", ttl.id.to_string())
            .env("IDP_EXIT_ON_STDIN_EOF", "1")
            .env(
                "IDP_ROTATE_REFRESH_TOKENS",
                if ttl.rotate_refresh { "1" } else { "0" },
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start node tests/idp/server.mjs");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Hand over the ready line, then keep draining so the OP never blocks on stdout.
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ready ") {
                    let _ = tx.send(line);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = loop {
            if let Ok(l) = rx.try_recv() {
                break l;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "the OP exited ({st}) before it was ready:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the OP did not become ready:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let field = |k: &str| {
            ready
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in `{ready}`"))
                .to_string()
        };
        Idp {
            issuer: field("issuer"),
            control: field("control"),
            child,
            _stdin: stdin,
            _dir: dir,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn control(&self, path: &str, body: Option<Value>) -> Value {
        let c = client();
        let mut r = c.post(format!("{}{path}", self.control));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(
            status.is_success(),
            "OP control {path}: {v}\n{}",
            self.log_text()
        );
        v
    }
    /// A new signing key with a new `kid`; returns the kid.
    pub async fn rotate(&self, drop_old: bool) -> String {
        let q = if drop_old { "?drop_old=1" } else { "" };
        let v = self.control(&format!("/rotate{q}"), None).await;
        v["kid"].as_str().unwrap().to_string()
    }

    pub async fn stop(&self) {
        self.control("/stop", None).await;
    }

    pub async fn resume(&self) {
        self.control("/start", None).await;
    }

    pub async fn discovery(&self) -> Value {
        client()
            .get(format!("{}/.well-known/openid-configuration", self.issuer))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
