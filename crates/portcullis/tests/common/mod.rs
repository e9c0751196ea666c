//! Test harness: starts the real `portcullis` binary on a generated config, real TCP origins
//! (hyper servers in the test process), and gives tests an HTTP client and admin helpers.
#![allow(dead_code)]

pub mod idp;
pub mod load;
pub mod pki;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

#[path = "../../../../tests/ports.rs"]
mod ports;
#[allow(unused_imports)] // not every test file that includes this module uses it
pub use ports::free_port;

/// A running `portcullis run` process. Killed on drop.
pub struct Proxy {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    pub access_log: PathBuf,
}

/// The proxy binary the tests run: this build's, or `PORTCULLIS_TEST_BIN` (a release build,
/// for figures: `PORTCULLIS_TEST_BIN=target/release/portcullis cargo test --test slow_clients`).
fn binary() -> PathBuf {
    match std::env::var_os("PORTCULLIS_TEST_BIN") {
        Some(p) if !p.is_empty() => p.into(),
        _ => env!("CARGO_BIN_EXE_portcullis").into(),
    }
}

/// The proxy's log filter: `debug` (the tests read its log), or `PORTCULLIS_TEST_LOG`.
fn log_filter() -> String {
    std::env::var("PORTCULLIS_TEST_LOG")
        .unwrap_or_else(|_| "debug,hyper=info,h2=info,rustls=info".into())
}

impl Proxy {
    /// Starts the proxy. In `yaml`, `{port}` and `{admin_port}` are replaced by free ports,
    /// `{dir}` by the temp dir. If the YAML has no `admin:` section, one is added with
    /// ADMIN_TOKEN; if it has no `access_log:`, one is written to `access.log` in the dir.
    pub async fn start(yaml: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, yaml).await
    }

    pub async fn start_in(dir: tempfile::TempDir, yaml: &str) -> Proxy {
        let mut dir = dir;
        // A free port may be taken by another test between the probe and the bind: start
        // again on new ports (the config is rendered anew each time).
        for _ in 0..3 {
            match Self::try_start_in(dir, yaml).await {
                Ok(p) => return p,
                Err(d) => dir = d,
            }
        }
        Self::try_start_in(dir, yaml)
            .await
            .unwrap_or_else(|_| panic!("portcullis could not bind free ports"))
    }

    async fn try_start_in(dir: tempfile::TempDir, yaml: &str) -> Result<Proxy, tempfile::TempDir> {
        let port = free_port();
        // Two probes may find the same free port.
        let admin_port = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let config = dir.path().join("portcullis.yaml");
        let log = dir.path().join("portcullis.log");
        let access_log = dir.path().join("access.log");
        let text = Self::render(yaml, port, admin_port, dir.path());
        std::fs::write(&config, text).unwrap();
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(&config)
            .env("PORTCULLIS_LOG", log_filter())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start portcullis");
        let mut p = Proxy {
            child,
            dir,
            port,
            admin_port,
            config,
            log,
            access_log,
        };
        if p.wait_ready().await {
            return Ok(p);
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
        let dir = std::mem::replace(&mut p.dir, tempfile::tempdir().unwrap());
        Err(dir)
    }

    pub fn render(yaml: &str, port: u16, admin_port: u16, dir: &Path) -> String {
        let mut text = yaml
            .replace("{port}", &port.to_string())
            .replace("{admin_port}", &admin_port.to_string())
            .replace("{dir}", &dir.display().to_string());
        if !text.contains("\nadmin:") && !text.starts_with("admin:") {
            text.push_str(&format!(
                "\nadmin:\n  bind: \"127.0.0.1:{admin_port}\"\n  tokens: [\"{ADMIN_TOKEN}\"]\n"
            ));
        }
        if !text.contains("access_log:") {
            text.push_str(&format!(
                "\naccess_log: {{ path: \"{}\" }}\n",
                dir.join("access.log").display()
            ));
        }
        text
    }

    /// Waits until the proxy is ready: false when it exited because a port was taken.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        // An admin listener with `tls:` (its certificate is the test's own) is asked over
        // HTTPS.
        let text = std::fs::read_to_string(&self.config).unwrap_or_default();
        let tls = text
            .find("\nadmin:")
            .is_some_and(|i| text[i..].contains("\n  tls:"));
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .build()
            .unwrap();
        let ready = if tls {
            format!("https://127.0.0.1:{}/readyz", self.admin_port)
        } else {
            self.admin_url("/readyz")
        };
        loop {
            if let Ok(r) = client.get(&ready).send().await {
                // Ours, not another test's proxy that holds the port ours failed to bind:
                // then ours has exited (or is about to) with the bind error.
                tokio::time::sleep(Duration::from_millis(30)).await;
                if r.status() == 200 && matches!(self.child.try_wait(), Ok(None)) {
                    return true;
                }
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                let log = self.log_text();
                if log.contains("Address already in use") || log.contains("is already bound by") {
                    return false;
                }
            }
            if Instant::now() > deadline {
                panic!("portcullis did not become ready; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    /// The process log so far. The proxy writes it from a thread of its own (so that a slow
    /// reader never holds up requests), a moment after what it records: this waits until
    /// the file has stopped growing for 20 ms (at most a second) before reading it.
    pub fn log_text(&self) -> String {
        let len = || std::fs::metadata(&self.log).map_or(0, |m| m.len());
        let mut last = len();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(20));
            let now = len();
            if now == last {
                break;
            }
            last = now;
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn access_log_text(&self) -> String {
        std::fs::read_to_string(&self.access_log).unwrap_or_default()
    }

    /// Rewrites the config (same placeholders as `start`).
    pub fn write_config(&self, yaml: &str) {
        let text = Self::render(yaml, self.port, self.admin_port, self.dir.path());
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn sighup(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGHUP);
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// An admin API request with the test token.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, String) {
        let c = reqwest::Client::new();
        let mut r = c
            .request(method, self.admin_url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    pub async fn backends(&self) -> serde_json::Value {
        let (s, b) = self
            .admin(reqwest::Method::GET, "/api/v1/backends", None)
            .await;
        assert_eq!(s, 200, "{b}");
        serde_json::from_str(&b).unwrap()
    }

    pub async fn config_status(&self) -> serde_json::Value {
        let (s, b) = self
            .admin(reqwest::Method::GET, "/api/v1/config", None)
            .await;
        assert_eq!(s, 200, "{b}");
        serde_json::from_str(&b).unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real TCP origin running in the test process.
pub struct Origin {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    /// Starts an HTTP/1.1 + h2 origin whose handler is `f`.
    pub async fn start<F, Fut>(f: F) -> Origin
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        Self::start_on(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            f,
        )
        .await
    }

    pub async fn start_on<F, Fut>(listener: tokio::net::TcpListener, f: F) -> Origin
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let f = Arc::new(f);
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let f = f.clone();
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let fut = f(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Origin { addr, hits, task }
    }

    /// An origin that answers 200 with its `name` as the body.
    pub async fn named(name: &'static str) -> Origin {
        Self::start(move |_req| async move { Response::new(Full::new(Bytes::from(name))) }).await
    }

    /// An origin that answers every request with `status`.
    pub async fn status(status: u16) -> Origin {
        Self::start(move |_req| async move {
            let mut r = Response::new(Full::new(Bytes::from(format!("status {status}"))));
            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
            r
        })
        .await
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address that refuses connections (bound then closed).
pub fn dead_address() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a connection, sends one keep-alive `GET path`, checks that it got a 200, and returns
/// the still-open connection.
pub async fn kept_alive(port: u16, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let got = String::from_utf8_lossy(&buf[..n]);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    s
}

/// Sends raw bytes on a new connection and returns what came back (until close or timeout).
pub async fn raw(port: u16, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}
