//! Helpers for the chaos tests (tests/chaos.rs): a load generator that keeps a few clients
//! sending requests while a fault is injected and records every answer, a `redis-server` on
//! a loopback port, an origin whose listener can be stopped and started again on the same
//! port, a small tmpfs that can be filled, and `portcullis token` for the dev issuer.

use super::Proxy;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// The load generator
// ---------------------------------------------------------------------------------------

/// One answered (or failed) request of a [`Load`].
#[derive(Clone, Debug)]
pub struct Sample {
    /// The request's class, as the request maker named it.
    pub kind: &'static str,
    /// When it was sent, from the start of the load.
    pub at: Duration,
    pub latency: Duration,
    /// The status, or 0 when no response came (refused, reset, client timeout).
    pub status: u16,
    /// The response's `X-Request-Id`.
    pub request_id: Option<String>,
}

/// Builds client `client`'s `n`-th request: its class and the request.
pub type MakeRequest =
    dyn Fn(&reqwest::Client, usize, u64) -> (&'static str, reqwest::RequestBuilder) + Send + Sync;

/// A few concurrent clients, each sending one request after another (with `pause` between
/// them, so that the load does not take both cores) until [`Load::stop`].
pub struct Load {
    start: Instant,
    halt: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start<F>(clients: usize, pause: Duration, make: F) -> Load
    where
        F: Fn(&reqwest::Client, usize, u64) -> (&'static str, reqwest::RequestBuilder)
            + Send
            + Sync
            + 'static,
    {
        let start = Instant::now();
        let halt = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let make: Arc<MakeRequest> = Arc::new(make);
        let tasks = (0..clients)
            .map(|i| {
                let (halt, samples, make) = (halt.clone(), samples.clone(), make.clone());
                tokio::spawn(async move {
                    // A hung request shows as status 0 after 20 s, never as a hung test.
                    let c = reqwest::Client::builder()
                        .redirect(reqwest::redirect::Policy::none())
                        .timeout(Duration::from_secs(20))
                        .build()
                        .unwrap();
                    let mut n = 0u64;
                    while !halt.load(Ordering::Relaxed) {
                        let (kind, req) = make(&c, i, n);
                        n += 1;
                        let sent = Instant::now();
                        let (status, request_id) = match req.send().await {
                            Ok(r) => {
                                let rid = r
                                    .headers()
                                    .get("x-request-id")
                                    .and_then(|v| v.to_str().ok())
                                    .map(String::from);
                                let status = r.status().as_u16();
                                let _ = r.bytes().await;
                                (status, rid)
                            }
                            Err(_) => (0, None),
                        };
                        samples.lock().unwrap().push(Sample {
                            kind,
                            at: sent - start,
                            latency: sent.elapsed(),
                            status,
                            request_id,
                        });
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Load {
            start,
            halt,
            samples,
            tasks,
        }
    }

    /// Time since the load started: marks the phases of a test.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The answers so far.
    pub fn samples(&self) -> Samples {
        Samples(self.samples.lock().unwrap().clone())
    }

    /// Waits until `f` holds for the answers so far (checked every 50 ms), or `within`.
    pub async fn until(&self, within: Duration, f: impl Fn(&Samples) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if f(&self.samples()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the clients (each finishes the request it is sending) and returns every answer.
    pub async fn stop(self) -> Samples {
        self.halt.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let mut v = std::mem::take(&mut *self.samples.lock().unwrap());
        v.sort_by_key(|s| s.at);
        Samples(v)
    }
}

/// Answers of a [`Load`].
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// The answers of one class.
    pub fn of(&self, kind: &str) -> Samples {
        Samples(self.0.iter().filter(|s| s.kind == kind).cloned().collect())
    }

    /// The answers that arrived before `to`.
    pub fn answered_before(&self, to: Duration) -> Samples {
        Samples(
            self.0
                .iter()
                .filter(|s| s.at + s.latency < to)
                .cloned()
                .collect(),
        )
    }

    /// The answers to requests sent in `[from, to)`.
    pub fn sent_between(&self, from: Duration, to: Duration) -> Samples {
        Samples(
            self.0
                .iter()
                .filter(|s| s.at >= from && s.at < to)
                .cloned()
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many answers had each status.
    pub fn statuses(&self) -> BTreeMap<u16, usize> {
        let mut m = BTreeMap::new();
        for s in &self.0 {
            *m.entry(s.status).or_default() += 1;
        }
        m
    }

    pub fn count(&self, status: u16) -> usize {
        self.0.iter().filter(|s| s.status == status).count()
    }

    /// Answers with a status other than those in `ok` (0, no answer, included).
    pub fn other_than(&self, ok: &[u16]) -> Samples {
        Samples(
            self.0
                .iter()
                .filter(|s| !ok.contains(&s.status))
                .cloned()
                .collect(),
        )
    }

    /// Answers that were 5xx or no answer at all.
    pub fn failures(&self) -> usize {
        self.0
            .iter()
            .filter(|s| s.status == 0 || s.status >= 500)
            .count()
    }

    /// The latency that `pct` per cent of the answers did not exceed.
    pub fn latency_percentile(&self, pct: usize) -> Duration {
        let mut v: Vec<Duration> = self.0.iter().map(|s| s.latency).collect();
        v.sort();
        match v.len() {
            0 => Duration::ZERO,
            n => v[((n - 1) * pct.min(100)) / 100],
        }
    }

    pub fn max_latency(&self) -> Duration {
        self.0.iter().map(|s| s.latency).max().unwrap_or_default()
    }

    /// The first answer with `status` sent at or after `from`.
    pub fn first_from(&self, from: Duration, status: u16) -> Option<Sample> {
        self.0
            .iter()
            .filter(|s| s.at >= from && s.status == status)
            .min_by_key(|s| s.at)
            .cloned()
    }

    /// `200×412 401×12`, for the figures.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .statuses()
            .iter()
            .map(|(s, n)| {
                if *s == 0 {
                    format!("no-answer×{n}")
                } else {
                    format!("{s}×{n}")
                }
            })
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(" ")
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------

/// `portcullis token` for `user` in `groups` (comma-separated), signed by the proxy's
/// `dev_issuer` provider named `dev`.
pub fn mint(p: &Proxy, user: &str, groups: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["token", "--config"])
        .arg(&p.config)
        .args(["--provider", "dev", "--user", user, "--groups", groups])
        .output()
        .expect("run portcullis token");
    assert!(
        out.status.success(),
        "portcullis token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// A `redis-server` on a loopback port (no persistence), killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

fn redis_server() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("redis-server"))
            .find(|p| p.is_file())
    });
    match on_path {
        Some(p) => p,
        None if Path::new("/usr/bin/redis-server").is_file() => "/usr/bin/redis-server".into(),
        None => panic!("redis-server not found: install the Debian package redis-server (scripts/test.sh does)"),
    }
}

/// One RESP command (inline form) to the Redis on `port`; the raw answer.
pub fn redis_command(port: u16, command: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

impl Redis {
    pub fn start() -> Redis {
        for _ in 0..5 {
            if let Some(r) = Redis::start_on(super::free_port()) {
                return r;
            }
        }
        panic!("could not start redis-server");
    }

    /// Starts on `port`; None when it could not (the port is taken).
    pub fn start_on(port: u16) -> Option<Redis> {
        let child = Command::new(redis_server())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let mut r = Redis {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if redis_command(port, "PING").is_some_and(|a| a.starts_with("+PONG")) {
                return Some(r);
            }
            if let Some(Ok(Some(_))) = r.child.as_mut().map(Child::try_wait) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        r.kill();
        None
    }

    /// The number of keys (`DBSIZE`), or None when Redis does not answer.
    pub fn dbsize(&self) -> Option<u64> {
        redis_command(self.port, "DBSIZE")?
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// An origin that goes away and comes back
// ---------------------------------------------------------------------------------------

struct Listening {
    accept: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

/// An origin answering 200 with its name, whose listener can be closed ([`Flapping::down`]:
/// the port refuses connections and every open connection is dropped, as when the process
/// dies) and opened again on the same port ([`Flapping::up`]).
pub struct Flapping {
    pub addr: SocketAddr,
    name: &'static str,
    pub hits: Arc<AtomicUsize>,
    state: Mutex<Option<Listening>>,
}

impl Flapping {
    pub async fn start(name: &'static str) -> Flapping {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = Flapping {
            addr: listener.local_addr().unwrap(),
            name,
            hits: Arc::new(AtomicUsize::new(0)),
            state: Mutex::new(None),
        };
        f.serve(listener);
        f
    }

    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn is_up(&self) -> bool {
        self.state.lock().unwrap().is_some()
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (name, hits, c) = (self.name, self.hits.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let hits = hits.clone();
                let t = tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        hits.fetch_add(1, Ordering::Relaxed);
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name)))) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
                let mut c = c.lock().unwrap();
                c.retain(|h| !h.is_finished());
                c.push(t.abort_handle());
            }
        });
        *self.state.lock().unwrap() = Some(Listening { accept, conns });
    }

    /// Closes the listener and drops every open connection.
    pub fn down(&self) {
        if let Some(l) = self.state.lock().unwrap().take() {
            l.accept.abort();
            for c in l.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }

    /// Listens again on the same port.
    pub async fn up(&self) {
        if self.is_up() {
            return;
        }
        for _ in 0..100 {
            if let Ok(l) = tokio::net::TcpListener::bind(self.addr).await {
                self.serve(l);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("cannot listen on {} again", self.addr);
    }
}

impl Drop for Flapping {
    fn drop(&mut self) {
        self.down();
    }
}

// ---------------------------------------------------------------------------------------
// A small disk
// ---------------------------------------------------------------------------------------

/// A tmpfs mounted on a directory, unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (such as `1m`) on `path` (created if needed). Err with the
    /// reason when that is not possible (not root, no mount permission in a container).
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Writes `name` until the file system is full; returns the bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        let mut f = std::fs::File::create(self.path.join(name)).unwrap();
        let chunk = [0x55u8; 4096];
        let mut n = 0u64;
        // Whole pages first, then byte by byte into what is left of the last one.
        while f.write_all(&chunk).is_ok() {
            n += chunk.len() as u64;
        }
        while f.write_all(&chunk[..1]).is_ok() {
            n += 1;
        }
        n
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process has a file open): detach it now, freed when closed.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
