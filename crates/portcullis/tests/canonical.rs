//! The canonical request form (issue 12), against three real origins started by the tests on
//! loopback ports:
//!
//! - **nginx** (Debian's, `daemon off; master_process off;` on a generated config), which
//!   answers with its decoded, normalized `$uri` and `$host` next to the raw `$request_uri`
//!   and `Host`;
//! - a **raw origin** (`tests/origins/canonical_origin.py --mode raw`, a Python socket server
//!   that reads the request head byte for byte), which answers the target and `Host` exactly
//!   as it received them;
//! - a **case-insensitive origin** (the same script, `--mode ci`), which reads the path the way
//!   permissive routers do (percent-decode, overlong UTF-8, NUL ends the path, backslash is a
//!   slash, lower-case, `;params` dropped, slashes merged, dot segments resolved).
//!
//! Each origin sits behind its own proxy with a protected `admin` route (`path_prefix:
//! /admin`), a protected `b-host` route (`host: b.example`) and a public catch-all. Every
//! variant of the table is sent without credentials over raw HTTP/1.1 or raw h2 frames
//! (prior knowledge), so that any byte can be sent, and must give what the table says:
//!
//! - `Bad`: 400 from the proxy, and no origin contacted. Over h2 a stream reset also counts:
//!   the h2 layer refuses a `:path` that is not a URI path (a raw NUL) before the proxy
//!   sees the request.
//! - `Auth(target, host)`: 401 (the protected route's identity check), and no origin
//!   contacted; then, with a valid token, 200 and the origin receives exactly `target` and
//!   `Host: host` (the canonical forms of the contract).
//! - `Public(target, host)`: 200 from the public route, the origin receives exactly `target`
//!   and `host`, and no origin reads it as a protected resource (a path starting with
//!   `/admin` in any case, or host `b.example`).
//!
//! A failure names the variant; all failures of one origin are reported together.
mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PUB: &str = "public.example";

// ---------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    H1,
    H2,
}

/// What a variant must give. In `target` and `host`, `{port}` is the proxy's port.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Bad,
    Auth(&'static str, &'static str),
    Public(&'static str, &'static str),
}
use Expect::*;

struct Variant {
    via: Via,
    /// HTTP/1: the request target; h2: `:path`.
    target: &'static [u8],
    /// h2 only: `:authority`.
    authority: Option<&'static str>,
    /// The `Host` header.
    host: Option<&'static str>,
    expect: Expect,
}

impl Variant {
    fn name(&self, port: u16) -> String {
        let mut s = match self.via {
            Via::H1 => format!("HTTP/1.1 `GET {}`", fill(self.target, port).escape_ascii()),
            Via::H2 => format!("h2 `:path {}`", fill(self.target, port).escape_ascii()),
        };
        if let Some(a) = self.authority {
            s += &format!(" `:authority {}`", a.replace("{port}", &port.to_string()));
        }
        match self.host {
            Some(h) => s += &format!(" `Host: {}`", h.replace("{port}", &port.to_string())),
            None => s += " (no Host)",
        }
        s
    }
}

/// HTTP/1.1 with `Host: public.example`.
fn h1(target: &'static [u8], expect: Expect) -> Variant {
    h1_host(target, PUB, expect)
}

fn h1_host(target: &'static [u8], host: &'static str, expect: Expect) -> Variant {
    Variant {
        via: Via::H1,
        target,
        authority: None,
        host: Some(host),
        expect,
    }
}

/// h2 with `:authority public.example` and no `host` header.
fn h2(path: &'static [u8], expect: Expect) -> Variant {
    h2_with(path, Some(PUB), None, expect)
}

fn h2_with(
    path: &'static [u8],
    authority: Option<&'static str>,
    host: Option<&'static str>,
    expect: Expect,
) -> Variant {
    Variant {
        via: Via::H2,
        target: path,
        authority,
        host,
        expect,
    }
}

fn variants() -> Vec<Variant> {
    vec![
        // Baselines.
        h1(b"/admin", Auth("/admin", PUB)),
        h1(b"/admin/x", Auth("/admin/x", PUB)),
        h1(b"/x/admin", Public("/x/admin", PUB)),
        h1(b"/", Public("/", PUB)),
        // Percent-encoded letters, upper and lower hex.
        h1(b"/%61dmin", Auth("/admin", PUB)),
        h1(b"/%41DMIN", Auth("/ADMIN", PUB)),
        h1(b"/%61%64%6d%69%6e/x", Auth("/admin/x", PUB)),
        h1(b"/%61%64%6D%69%6E", Auth("/admin", PUB)),
        h1(b"/adm%49n", Auth("/admIn", PUB)),
        // Double encoding is one level only: `%25` is not unreserved and stays encoded.
        h1(b"/%2561dmin", Public("/%2561dmin", PUB)),
        h1(b"/%7eadmin", Public("/~admin", PUB)),
        // Other escapes are kept, in upper-case hex.
        h1(b"/caf%c3%a9", Public("/caf%C3%A9", PUB)),
        // Case: prefix matches ignore it; the path is forwarded as sent.
        h1(b"/ADMIN", Auth("/ADMIN", PUB)),
        h1(b"/Admin/x", Auth("/Admin/x", PUB)),
        // Encoded dots and slashes.
        h1(b"/x%2f..%2fadmin", Bad),
        h1(b"/X%2F..%2Fadmin", Bad),
        h1(b"/%2e%2e/admin", Bad),
        h1(b"/x/%2E%2E/admin", Bad),
        h1(b"/x/.%2e/admin", Bad),
        h1(b"/x/%2e./admin", Bad),
        h1(b"/%2Fadmin", Bad),
        h1(b"/%2fadmin", Bad),
        h1(b"/admin%2f", Bad),
        h1(b"/x%5c..%5cadmin", Bad),
        h1(b"/%5Cadmin", Bad),
        // Literal dot segments.
        h1(b"/x/../admin", Bad),
        h1(b"/./admin", Bad),
        h1(b"/admin/x/..", Bad),
        // Repeated slashes are merged.
        h1(b"//admin", Auth("/admin", PUB)),
        h1(b"///admin", Auth("/admin", PUB)),
        h1(b"//admin//x", Auth("/admin/x", PUB)),
        h1(b"/x//..//admin", Bad),
        // Backslashes.
        h1(b"/x\\..\\admin", Bad),
        h1(b"/\\admin", Bad),
        h1(b"/admin\\", Bad),
        // `;` parameters: dropped for matching (as Tomcat and Spring do), kept for the origin.
        h1(b"/admin;x=1", Auth("/admin;x=1", PUB)),
        h1(b"/admin;x=1/y", Auth("/admin;x=1/y", PUB)),
        h1(b"/ADMIN;jsessionid=1", Auth("/ADMIN;jsessionid=1", PUB)),
        h1(b"/x/..;/admin", Bad),
        h1(b"/x/.;/admin", Bad),
        h1(b"/%2e%2e;/admin", Bad),
        // Tomcat reads `/;/admin` as `/admin` (the empty segment's parameter dropped, then
        // the doubled slash merged), so the proxy must match it as `/admin` too.
        h1(b"/;/admin", Auth("/;/admin", PUB)),
        h1(b"/;x=1/admin", Auth("/;x=1/admin", PUB)),
        h1(b"/a;/admin", Public("/a;/admin", PUB)),
        // An encoded `;` starts parameters too, for origins that decode it before they drop
        // them (Spring): matched as `/admin`, sent as canonical.
        h1(b"/admin%3Bx=1/y", Auth("/admin%3Bx=1/y", PUB)),
        h1(b"/admin%3bx", Auth("/admin%3Bx", PUB)),
        h1(b"/x/..%3B/admin", Bad),
        h1(b"/x/%2e%2e%3b/admin", Bad),
        // Overlong and invalid UTF-8.
        h1(b"/%c0%af..%c0%afadmin", Bad),
        h1(b"/x%c0%afadmin", Bad),
        h1(b"/x%e0%80%afadmin", Bad),
        h1(b"/%c0%ae%c0%ae/admin", Bad),
        h1(b"/%ff/admin", Bad),
        // NUL, control characters, raw non-ASCII bytes, broken escapes.
        h1(b"/admin%00", Bad),
        h1(b"/admin%00.html", Bad),
        h1(b"/admin\0", Bad),
        h1(b"/admin%0d%0aX-Injected:%201", Bad),
        h1(b"/admin%7f", Bad),
        h1(b"/admin\xc3\xa9", Bad),
        h1(b"/admin%zz", Bad),
        h1(b"/admin%4", Bad),
        // The query is forwarded as sent, but its escapes must be valid.
        h1(b"/admin?x=1", Auth("/admin?x=1", PUB)),
        h1(b"/x?/admin", Public("/x?/admin", PUB)),
        h1(b"/x?q=%2e%2e/admin", Public("/x?q=%2e%2e/admin", PUB)),
        h1(b"/x?a=%zz", Bad),
        // Hosts: lower-cased, one trailing dot dropped, the default port dropped.
        h1_host(b"/", "b.example", Auth("/", "b.example")),
        h1_host(b"/", "B.EXAMPLE", Auth("/", "b.example")),
        h1_host(b"/", "b.example.", Auth("/", "b.example")),
        h1_host(b"/", "B.EXAMPLE.:{port}", Auth("/", "b.example:{port}")),
        h1_host(b"/", "b.example:{port}", Auth("/", "b.example:{port}")),
        h1_host(b"/", "b.example:80", Auth("/", "b.example")),
        h1_host(b"/", "B.Example.:80", Auth("/", "b.example")),
        h1_host(b"/%61dmin", "B.EXAMPLE.", Auth("/admin", "b.example")),
        h1_host(b"/", "b.example..", Bad),
        h1_host(b"/", "b..example", Bad),
        h1_host(b"/", ".b.example", Bad),
        h1_host(b"/", "b%2eexample", Bad),
        h1_host(b"/", "b.example.evil", Public("/", "b.example.evil")),
        h1_host(b"/", "xb.example", Public("/", "xb.example")),
        // Absolute-form targets: the authority wins over a mismatched Host.
        h1(b"http://b.example/", Auth("/", "b.example")),
        h1(b"http://B.EXAMPLE./admin", Auth("/admin", "b.example")),
        h1(b"http://b.example:{port}/x", Auth("/x", "b.example:{port}")),
        h1(b"http://b.example", Auth("/", "b.example")),
        h1_host(b"http://public.example/", "b.example", Public("/", PUB)),
        h1(b"http://public.example/%61dmin", Auth("/admin", PUB)),
        h1(b"http://public.example//admin", Auth("/admin", PUB)),
        h1(b"http://public.example/x/%2e%2e/admin", Bad),
        h1(b"http://b..example/", Bad),
        // The same over h2 (prior knowledge, raw frames).
        h2(b"/admin", Auth("/admin", PUB)),
        h2(b"/%61dmin", Auth("/admin", PUB)),
        h2(b"/%41DMIN", Auth("/ADMIN", PUB)),
        h2(b"/ADMIN", Auth("/ADMIN", PUB)),
        h2(b"/Admin/x", Auth("/Admin/x", PUB)),
        h2(b"//admin", Auth("/admin", PUB)),
        h2(b"///admin", Auth("/admin", PUB)),
        h2(b"/x%2f..%2fadmin", Bad),
        h2(b"/%2Fadmin", Bad),
        h2(b"/%2fadmin", Bad),
        h2(b"/x%5C..%5Cadmin", Bad),
        h2(b"/%2e%2e/admin", Bad),
        h2(b"/x/%2E%2E/admin", Bad),
        h2(b"/x/../admin", Bad),
        h2(b"/x\\..\\admin", Bad),
        h2(b"/\\admin", Bad),
        h2(b"/%5cadmin", Bad),
        h2(b"/admin;x=1", Auth("/admin;x=1", PUB)),
        h2(b"/admin?x=1", Auth("/admin?x=1", PUB)),
        h2(b"/x?a=%zz", Bad),
        h2(b"/x/..;/admin", Bad),
        h2(b"/;/admin", Auth("/;/admin", PUB)),
        h2(b"/%c0%af..%c0%afadmin", Bad),
        h2(b"/x%c0%afadmin", Bad),
        h2(b"/admin%00", Bad),
        // The h2 layer resets this stream itself (a NUL makes `:path` no URI path).
        h2(b"/admin\0", Bad),
        h2(b"/admin\xc3\xa9", Bad),
        h2(b"/x/admin", Public("/x/admin", PUB)),
        h2(b"/%2561dmin", Public("/%2561dmin", PUB)),
        h2_with(b"/", Some("b.example"), None, Auth("/", "b.example")),
        h2_with(b"/", Some("B.EXAMPLE."), None, Auth("/", "b.example")),
        h2_with(
            b"/",
            Some("B.EXAMPLE.:{port}"),
            None,
            Auth("/", "b.example:{port}"),
        ),
        h2_with(b"/", Some("b.example:80"), None, Auth("/", "b.example")),
        h2_with(
            b"/%61dmin",
            Some("b.example.:{port}"),
            None,
            Auth("/admin", "b.example:{port}"),
        ),
        // `:authority` wins over a mismatched `host` header.
        h2_with(b"/", Some("b.example"), Some(PUB), Auth("/", "b.example")),
        h2_with(b"/", Some(PUB), Some("b.example"), Public("/", PUB)),
        // Without `:authority`, the `host` header is the host.
        h2_with(b"/", None, Some("B.EXAMPLE."), Auth("/", "b.example")),
        h2_with(b"/", Some("b..example"), None, Bad),
    ]
}

/// `s` with `{port}` replaced.
fn fill(s: &[u8], port: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i..].starts_with(b"{port}") {
            out.extend_from_slice(port.to_string().as_bytes());
            i += 6;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

fn fill_str(s: &str, port: u16) -> String {
    s.replace("{port}", &port.to_string())
}

// ---------------------------------------------------------------------------------------
// The origins
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Nginx,
    Raw,
    CaseInsensitive,
}

/// An origin process, killed on drop. It logs one line per request to `log`.
struct RealOrigin {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    address: String,
    log: PathBuf,
}

impl RealOrigin {
    async fn start(kind: Kind) -> RealOrigin {
        match kind {
            Kind::Nginx => Self::nginx().await,
            Kind::Raw => Self::python("raw"),
            Kind::CaseInsensitive => Self::python("ci"),
        }
    }

    fn python(mode: &str) -> RealOrigin {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.jsonl");
        std::fs::write(&log, "").unwrap();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/origins/canonical_origin.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--mode", mode, "--log"])
            .arg(&log)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .expect("start python3 (tests/origins/canonical_origin.py)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "the python origin did not print its port: {line:?}; stderr:\n{}",
                std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            )
        });
        RealOrigin {
            child,
            port,
            _dir: dir,
            address: format!("127.0.0.1:{port}"),
            log,
        }
    }

    async fn nginx() -> RealOrigin {
        let bin = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .or_else(|| {
                let out = Command::new("sh")
                    .args(["-c", "command -v nginx"])
                    .output()
                    .ok()?;
                let p = String::from_utf8(out.stdout).ok()?.trim().to_string();
                (!p.is_empty()).then(|| PathBuf::from(p))
            })
            .expect("nginx is not installed: run ./scripts/test.sh (it installs nginx-light)");
        let version = Command::new(&bin).arg("-V").output().unwrap();
        let built = String::from_utf8_lossy(&version.stderr).into_owned();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let port = free_port();
        // Temp paths of the modules this build has, so that nothing outside `dir` is touched.
        let mut temps = format!("client_body_temp_path {d}/body;\n");
        for m in ["proxy", "fastcgi", "uwsgi", "scgi"] {
            if !built.contains(&format!("--without-http_{m}_module")) {
                temps += &format!("    {m}_temp_path {d}/{m};\n");
            }
        }
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    {temps}
    server {{
        listen 127.0.0.1:{port};
        server_name _;
        default_type text/plain;
        location / {{
            return 200 "$request_uri\n$http_host\n$host\n$uri";
        }}
    }}
}}
"#
        );
        let config = dir.path().join("nginx.conf");
        std::fs::write(&config, conf).unwrap();
        let log = dir.path().join("access.log");
        std::fs::write(&log, "").unwrap();
        let mut child = Command::new(&bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            let exited = child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "nginx did not start ({exited:?}); error log:\n{}\n{}",
                    std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default(),
                    std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        RealOrigin {
            child,
            port,
            _dir: dir,
            address: format!("127.0.0.1:{port}"),
            log,
        }
    }

    /// Requests the origin has answered (or refused) so far.
    fn hits(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (briefly) for the log to reach `n` lines: nginx writes its line after answering.
    async fn settle(&self, n: usize) -> usize {
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            let h = self.hits();
            if h >= n || Instant::now() > deadline {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RealOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an origin answered: the target and `Host` as received, and how it read them.
#[derive(Debug)]
struct Seen {
    target: String,
    host: String,
    host_read: String,
    path_read: String,
}

impl Seen {
    fn parse(body: &[u8]) -> Result<Seen, String> {
        let text = String::from_utf8_lossy(body);
        let mut it = text.splitn(4, '\n');
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(t), Some(h), Some(hr), Some(pr)) => Ok(Seen {
                target: t.to_string(),
                host: h.to_string(),
                host_read: hr.to_string(),
                path_read: pr.to_string(),
            }),
            _ => Err(format!(
                "the body is not an origin's report: {:?}",
                clip(&text)
            )),
        }
    }

    /// The origin read the request as a protected resource.
    fn protected(&self) -> bool {
        let host = self.host_read.to_ascii_lowercase();
        let host = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
            _ => host,
        };
        self.path_read.to_ascii_lowercase().starts_with("/admin")
            || host.trim_end_matches('.') == "b.example"
    }
}

fn clip(s: &str) -> String {
    let mut s: String = s.chars().take(300).collect();
    if s.len() == 300 {
        s.push('…');
    }
    s
}

// ---------------------------------------------------------------------------------------
// Clients: raw HTTP/1.1 and raw h2 frames, so that any byte can be sent
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Reply {
    status: Option<u16>,
    /// Why there is no status: the connection closed, or the h2 stream was reset.
    refused: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn describe(&self) -> String {
        match (self.status, &self.refused) {
            (Some(s), _) => format!(
                "{s} with body {:?}",
                clip(&String::from_utf8_lossy(&self.body))
            ),
            (None, Some(why)) => format!("no response ({why})"),
            (None, None) => "no response".into(),
        }
    }
}

async fn send(port: u16, v: &Variant, token: Option<&str>) -> Reply {
    let target = fill(v.target, port);
    let host = v.host.map(|h| fill_str(h, port));
    let fut = async {
        match v.via {
            Via::H1 => h1_send(port, &target, host.as_deref(), token).await,
            Via::H2 => {
                let authority = v.authority.map(|a| fill_str(a, port));
                h2_send(port, &target, authority.as_deref(), host.as_deref(), token).await
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(r) => r,
        Err(_) => Reply {
            refused: Some("timed out".into()),
            ..Reply::default()
        },
    }
}

async fn h1_send(port: u16, target: &[u8], host: Option<&str>, token: Option<&str>) -> Reply {
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(h) = host {
        req.extend_from_slice(format!("Host: {h}\r\n").as_bytes());
    }
    if let Some(t) = token {
        req.extend_from_slice(format!("Authorization: Bearer {t}\r\n").as_bytes());
    }
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    parse_h1(&out)
}

fn parse_h1(raw: &[u8]) -> Reply {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return Reply {
                refused: Some(format!(
                    "connection closed with {:?}",
                    clip(&String::from_utf8_lossy(raw))
                )),
                ..Reply::default()
            }
        }
    };
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let rest = &raw[head_len..];
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else if let Some(n) = header("content-length").and_then(|v| v.trim().parse().ok()) {
        rest[..rest.len().min(n)].to_vec()
    } else {
        rest.to_vec()
    };
    Reply {
        status: resp.code,
        refused: None,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = String::from_utf8_lossy(&b[..eol]);
        let size = size.split(';').next().unwrap_or("").trim();
        let Ok(n) = usize::from_str_radix(size, 16) else {
            return out;
        };
        if n == 0 || b.len() < eol + 2 + n {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[(eol + 4 + n).min(b.len())..];
    }
}

/// HPACK: an integer with an `n`-bit prefix, after the `flags` bits of the first byte.
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// HPACK: a literal header field without indexing, with a literal name, no Huffman coding;
/// the bytes go on the wire exactly as given.
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The `:status` of a response header block, which an h2 server encodes first: an indexed
/// field of the static table (200, 204, 206, 304, 400, 404, 500) or a literal with the
/// indexed name `:status` (the connection is new, so the dynamic table is empty).
fn hpack_status(block: &[u8]) -> Option<u16> {
    let mut b = block;
    // Dynamic table size updates.
    while let Some(&c) = b.first() {
        if c & 0xe0 != 0x20 {
            break;
        }
        let mut k = 1;
        if c & 0x1f == 0x1f {
            while b.get(k).is_some_and(|x| x & 0x80 != 0) {
                k += 1;
            }
            k += 1;
        }
        b = b.get(k..)?;
    }
    let c = *b.first()?;
    if c & 0x80 != 0 {
        return match c & 0x7f {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    let index = if c & 0x40 != 0 { c & 0x3f } else { c & 0x0f };
    if !(8..=14).contains(&index) {
        return None;
    }
    let s = *b.get(1)?;
    let len = (s & 0x7f) as usize;
    let raw = b.get(2..2 + len)?;
    let text = if s & 0x80 != 0 {
        huffman_digits(raw)?
    } else {
        String::from_utf8(raw.to_vec()).ok()?
    };
    text.parse().ok()
}

/// Decodes a Huffman-coded string of digits (RFC 7541 appendix B: `0`-`2` have 5-bit codes,
/// `3`-`9` 6-bit codes); None for anything else.
fn huffman_digits(raw: &[u8]) -> Option<String> {
    let bits: Vec<u8> = raw
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let take = |at: usize, n: usize| -> Option<u8> {
        (at + n <= bits.len()).then(|| bits[at..at + n].iter().fold(0, |a, &x| a << 1 | x))
    };
    let mut out = String::new();
    let mut at = 0;
    while bits.len() - at >= 5 {
        if let v @ 0..=2 = take(at, 5)? {
            out.push((b'0' + v) as char);
            at += 5;
            continue;
        }
        match take(at, 6) {
            Some(v @ 0b011001..=0b011111) => {
                out.push((b'3' + v - 0b011001) as char);
                at += 6;
            }
            _ => break,
        }
    }
    // What is left must be EOS padding (all ones).
    bits[at..].iter().all(|&x| x == 1).then_some(out)
}

/// One GET over a new h2 connection with prior knowledge. The header fields are sent as
/// literals, so `:path` and `:authority` reach the server byte for byte.
async fn h2_send(
    port: u16,
    path: &[u8],
    authority: Option<&str>,
    host: Option<&str>,
    token: Option<&str>,
) -> Reply {
    let mut block = Vec::new();
    hpack_literal(&mut block, b":method", b"GET");
    hpack_literal(&mut block, b":scheme", b"http");
    if let Some(a) = authority {
        hpack_literal(&mut block, b":authority", a.as_bytes());
    }
    hpack_literal(&mut block, b":path", path);
    if let Some(h) = host {
        hpack_literal(&mut block, b"host", h.as_bytes());
    }
    if let Some(t) = token {
        hpack_literal(
            &mut block,
            b"authorization",
            format!("Bearer {t}").as_bytes(),
        );
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    // HEADERS, END_STREAM | END_HEADERS, stream 1.
    out.extend(frame(1, 0x5, 1, &block));
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&out).await.unwrap();

    let mut reply = Reply::default();
    loop {
        let mut head = [0u8; 9];
        if s.read_exact(&mut head).await.is_err() {
            if reply.status.is_none() && reply.refused.is_none() {
                reply.refused = Some("connection closed".into());
            }
            return reply;
        }
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if s.read_exact(&mut payload).await.is_err() {
            reply.refused = Some("connection closed mid-frame".into());
            return reply;
        }
        // PADDED: the pad length first, the padding last.
        let unpad = |p: &[u8]| -> Vec<u8> {
            if flags & 0x8 != 0 && !p.is_empty() {
                let pad = p[0] as usize;
                p[1..p.len().saturating_sub(pad).max(1)].to_vec()
            } else {
                p.to_vec()
            }
        };
        match kind {
            // DATA
            0 if stream == 1 => {
                reply.body.extend(unpad(&payload));
                if flags & 0x1 != 0 {
                    return reply;
                }
            }
            // HEADERS
            1 if stream == 1 => {
                if reply.status.is_none() {
                    let mut p = unpad(&payload);
                    if flags & 0x20 != 0 {
                        p.drain(..5.min(p.len()));
                    }
                    reply.status = hpack_status(&p);
                    if reply.status.is_none() {
                        reply.refused = Some(format!(
                            "could not read :status from header block {:02x?}",
                            &p[..p.len().min(16)]
                        ));
                        return reply;
                    }
                }
                if flags & 0x1 != 0 {
                    return reply;
                }
            }
            // RST_STREAM
            3 if stream == 1 => {
                if reply.status.is_none() {
                    reply.refused = Some(format!("stream reset, error code {payload:02x?}"));
                }
                return reply;
            }
            // SETTINGS (not an ACK): acknowledge.
            4 if flags & 0x1 == 0 => {
                let _ = s.write_all(&frame(4, 0x1, 0, &[])).await;
            }
            // PING: answer.
            6 if flags & 0x1 == 0 => {
                let _ = s.write_all(&frame(6, 0x1, 0, &payload)).await;
            }
            // GOAWAY
            7 if reply.status.is_none() => {
                reply.refused = Some(format!(
                    "GOAWAY {:02x?} {:?}",
                    payload.get(4..8).unwrap_or_default(),
                    String::from_utf8_lossy(payload.get(8..).unwrap_or_default())
                ));
                return reply;
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------

const CONFIG: &str = r#"listeners:
  - { name: web, bind: "127.0.0.1:{port}" }
identity:
  providers:
    - { name: dev, kind: dev_issuer }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - { name: admin, match: { path_prefix: /admin }, backend: o, auth: [dev], allow: [{}] }
  - { name: b-host, match: { host: b.example }, backend: o, auth: [dev], allow: [{}] }
  - { name: public, match: { path_prefix: / }, backend: o, public: true }
"#;

/// A token of the proxy's `dev` issuer, from `portcullis token`.
fn token(p: &Proxy) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["token", "--config"])
        .arg(&p.config)
        .args([
            "--provider",
            "dev",
            "--user",
            "alice",
            "--groups",
            "eng",
            "--ttl",
            "1h",
        ])
        .output()
        .expect("run portcullis token");
    assert!(
        out.status.success(),
        "portcullis token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

// ---------------------------------------------------------------------------------------
// Running the table
// ---------------------------------------------------------------------------------------

/// Runs every variant against one origin and panics with every failure, each naming its
/// variant.
async fn run_table(kind: Kind) {
    let origin = RealOrigin::start(kind).await;
    let p = Proxy::start(&CONFIG.replace("@ORIGIN@", &origin.address)).await;
    let token = token(&p);
    let table = variants();
    assert!(table.len() >= 40, "the table has {} variants", table.len());

    let mut failures = Vec::new();
    let mut before = origin.hits();
    for v in &table {
        let name = v.name(p.port);
        let result = check(&p, &origin, v, &token).await;
        // Requests that should have reached the origin: the one with a token, or the public one.
        let expected = before + usize::from(!matches!(v.expect, Bad));
        let after = origin.settle(expected).await;
        match result {
            Err(why) => failures.push(format!("{name}: {why}")),
            Ok(()) if after != expected => failures.push(format!(
                "{name}: the origin received {} requests for it, {} expected",
                after - before,
                expected - before
            )),
            Ok(()) => {}
        }
        before = after;
    }
    if !failures.is_empty() {
        panic!(
            "{} of {} variants failed against the {kind:?} origin:\n\n{}\n",
            failures.len(),
            table.len(),
            failures.join("\n\n")
        );
    }
}

/// What the origin made of a request that should not have reached it.
fn leaked(r: &Reply) -> String {
    match Seen::parse(&r.body) {
        Ok(seen) if seen.protected() => format!(
            "; the origin read it as path {:?} host {:?}: A PROTECTED RESOURCE WITHOUT CREDENTIALS",
            seen.path_read, seen.host_read
        ),
        Ok(seen) => format!(
            "; the origin received {:?} Host {:?} and read path {:?} host {:?}",
            seen.target, seen.host, seen.path_read, seen.host_read
        ),
        Err(_) => String::new(),
    }
}

async fn check(p: &Proxy, origin: &RealOrigin, v: &Variant, token: &str) -> Result<(), String> {
    let before = origin.hits();
    let r = send(p.port, v, None).await;
    let not_reached = || {
        let after = origin.hits();
        if after > before {
            Err(format!(
                "the request reached the origin, though the proxy answered {}",
                r.describe()
            ))
        } else {
            Ok(())
        }
    };
    match v.expect {
        Bad => {
            // Over h2, a stream reset by the h2 layer is a refusal too.
            let reset = v.via == Via::H2 && r.status.is_none() && r.refused.is_some();
            if r.status != Some(400) && !reset {
                return Err(format!("expected 400, got {}{}", r.describe(), leaked(&r)));
            }
            if String::from_utf8_lossy(&r.body).contains("nginx") {
                return Err(format!(
                    "the 400 came from nginx, not the proxy: {}",
                    r.describe()
                ));
            }
            not_reached()
        }
        Auth(target, host) => {
            if r.status != Some(401) {
                return Err(format!(
                    "without credentials: expected 401, got {}{}",
                    r.describe(),
                    leaked(&r)
                ));
            }
            not_reached()?;
            let (target, host) = (fill_str(target, p.port), fill_str(host, p.port));
            let r = send(p.port, v, Some(token)).await;
            if r.status != Some(200) {
                return Err(format!("with a token: expected 200, got {}", r.describe()));
            }
            let seen = Seen::parse(&r.body).map_err(|e| format!("with a token: {e}"))?;
            if seen.target != target || seen.host != host {
                return Err(format!(
                    "with a token the origin received target {:?} Host {:?}; expected {target:?} Host {host:?}",
                    seen.target, seen.host
                ));
            }
            Ok(())
        }
        Public(target, host) => {
            let (target, host) = (fill_str(target, p.port), fill_str(host, p.port));
            if r.status != Some(200) {
                return Err(format!(
                    "expected 200 from the public route, got {}",
                    r.describe()
                ));
            }
            let seen = Seen::parse(&r.body)?;
            if seen.protected() {
                return Err(format!(
                    "the public route let it through and the origin read it as path {:?} host {:?}: A PROTECTED RESOURCE WITHOUT CREDENTIALS",
                    seen.path_read, seen.host_read
                ));
            }
            if seen.target != target || seen.host != host {
                return Err(format!(
                    "the origin received target {:?} Host {:?}; expected {target:?} Host {host:?}",
                    seen.target, seen.host
                ));
            }
            Ok(())
        }
    }
}

/// nginx, behind the proxy, never reads a request the proxy let through without
/// credentials as `/admin…` or as host `b.example`; refused requests never reach it.
#[tokio::test]
async fn nginx_never_reads_a_protected_resource_the_proxy_let_through() {
    run_table(Kind::Nginx).await;
}

/// A raw origin receives exactly the canonical target and `Host` of the contract.
#[tokio::test]
async fn a_raw_origin_receives_exactly_the_canonical_target_and_host() {
    run_table(Kind::Raw).await;
}

/// An origin that reads paths case-insensitively, decoding and resolving everything it can,
/// never reads a request the proxy let through without credentials as a protected resource.
#[tokio::test]
async fn a_case_insensitive_origin_never_reads_a_protected_resource_the_proxy_let_through() {
    run_table(Kind::CaseInsensitive).await;
}

// ---------------------------------------------------------------------------------------
// The access log and escaped slashes
// ---------------------------------------------------------------------------------------

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The access log records the canonical path of a decoded, merged request, refused or
/// allowed, and never its raw spelling.
#[tokio::test]
async fn the_access_log_records_the_canonical_path() {
    let origin = RealOrigin::start(Kind::Raw).await;
    let p = Proxy::start(&CONFIG.replace("@ORIGIN@", &origin.address)).await;
    let token = token(&p);
    let v = h1(b"/%61dmin//%7Ex", Auth("/admin/~x", PUB));

    let r = send(p.port, &v, None).await;
    assert_eq!(r.status, Some(401), "{}", r.describe());
    let r = send(p.port, &v, Some(&token)).await;
    assert_eq!(r.status, Some(200), "{}", r.describe());
    let seen = Seen::parse(&r.body).unwrap();
    assert_eq!(seen.target, "/admin/~x");

    let pr = &p;
    let logged = eventually(Duration::from_secs(5), || async move {
        let records = json_lines(&pr.access_log_text());
        [401, 200].iter().all(|s| {
            records
                .iter()
                .any(|r| r["status"] == *s && r["path"] == "/admin/~x")
        })
    })
    .await;
    let text = p.access_log_text();
    assert!(
        logged,
        "no 401 and 200 records with path `/admin/~x` in the access log:\n{text}"
    );
    for r in json_lines(&text) {
        let path = r["path"].as_str().unwrap_or_default();
        assert!(
            !path.contains("%61dmin") && !path.contains("%7E") && !path.contains("//"),
            "the access log has the raw spelling of the path: {r}"
        );
    }
}

/// A route with `normalize: { escaped_slashes: keep }` passes `%2F` and `%5C` through
/// (upper-cased) to the origin, while the listener's default refuses them with 400 on every
/// other route, without contacting the origin.
#[tokio::test]
async fn a_route_may_keep_escaped_slashes_that_the_listener_refuses() {
    let origin = RealOrigin::start(Kind::Raw).await;
    let yaml = r#"listeners:
  - { name: web, bind: "127.0.0.1:{port}" }
backends:
  - { name: o, servers: [{ address: "@ORIGIN@" }] }
routes:
  - { name: repo, match: { path_prefix: /repo/ }, backend: o, public: true, normalize: { escaped_slashes: keep } }
  - { name: public, match: { path_prefix: / }, backend: o, public: true }
"#;
    let p = Proxy::start(&yaml.replace("@ORIGIN@", &origin.address)).await;

    let kept: [(&[u8], Via, &str); 5] = [
        (b"/repo/a%2Fb", Via::H1, "/repo/a%2Fb"),
        (b"/repo/a%2fb", Via::H1, "/repo/a%2Fb"),
        (b"/repo/a%5cb", Via::H1, "/repo/a%5Cb"),
        (b"/repo/a%2Fb?x=%2f", Via::H1, "/repo/a%2Fb?x=%2f"),
        (b"/repo/a%2Fb", Via::H2, "/repo/a%2Fb"),
    ];
    let mut failures = Vec::new();
    for (target, via, want) in kept {
        let v = Variant {
            via,
            target,
            authority: (via == Via::H2).then_some(PUB),
            host: (via == Via::H1).then_some(PUB),
            expect: Public(want, PUB),
        };
        let r = send(p.port, &v, None).await;
        let got = Seen::parse(&r.body).map(|s| s.target);
        if r.status != Some(200) || got.as_deref() != Ok(want) {
            failures.push(format!(
                "{}: expected 200 and the origin to receive {want:?}, got {} ({got:?})",
                v.name(p.port),
                r.describe()
            ));
        }
    }
    let hits = origin.settle(kept.len()).await;
    let refused: [(&[u8], Via); 4] = [
        (b"/x%2Fb", Via::H1),
        (b"/x%2fb", Via::H1),
        (b"/x%5Cb", Via::H1),
        (b"/x%2Fb", Via::H2),
    ];
    for (target, via) in refused {
        let v = Variant {
            via,
            target,
            authority: (via == Via::H2).then_some(PUB),
            host: (via == Via::H1).then_some(PUB),
            expect: Bad,
        };
        let r = send(p.port, &v, None).await;
        if r.status != Some(400) {
            failures.push(format!(
                "{}: expected 400, got {}",
                v.name(p.port),
                r.describe()
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    if origin.hits() != hits {
        failures.push(format!(
            "a refused request reached the origin; its log:\n{}",
            origin.log_text()
        ));
    }
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
}

/// The check of public answers is not vacuous: sent straight to the origins, not through the
/// proxy, attacks of the table are read as protected resources.
#[tokio::test]
async fn the_origins_read_the_attacks_as_protected_resources_when_sent_directly() {
    let cases: [(Kind, &[u8], &str); 12] = [
        (Kind::Nginx, b"/%61dmin", PUB),
        (Kind::Nginx, b"/x/%2E%2E/admin", PUB),
        (Kind::Nginx, b"//ADMIN", PUB),
        (Kind::Nginx, b"/", "B.EXAMPLE."),
        (Kind::Raw, b"/Admin/x", PUB),
        (Kind::Raw, b"/", "b.example"),
        (Kind::CaseInsensitive, b"/;/admin", PUB),
        (Kind::CaseInsensitive, b"/x\\..\\ADMIN", PUB),
        (Kind::CaseInsensitive, b"/%c0%af..%c0%afadmin", PUB),
        (Kind::CaseInsensitive, b"/x%2f..%2fadmin", PUB),
        (Kind::CaseInsensitive, b"/admin%00.html", PUB),
        (Kind::CaseInsensitive, b"/", "B.EXAMPLE.:8080"),
    ];
    let mut failures = Vec::new();
    for kind in [Kind::Nginx, Kind::Raw, Kind::CaseInsensitive] {
        let origin = RealOrigin::start(kind).await;
        for (_, target, host) in cases.iter().filter(|c| c.0 == kind) {
            let r = h1_send(origin.port, target, Some(host), None).await;
            match Seen::parse(&r.body) {
                Ok(seen) if r.status == Some(200) && seen.protected() => {}
                got => failures.push(format!(
                    "{kind:?} origin, `GET {}` `Host: {host}`: expected it read as a protected resource, got {} ({got:?})",
                    target.escape_ascii(),
                    r.describe()
                )),
            }
        }
    }
    assert!(failures.is_empty(), "\n{}\n", failures.join("\n"));
}
