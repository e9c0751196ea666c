//! HTTP/2 abuse against the real binary's listener, with raw frames that no well-behaved
//! client sends: rapid reset (CVE-2023-44487) and resets forced on the proxy, CONTINUATION
//! floods, HPACK bombs and table size abuse, SETTINGS, PING and empty DATA floods, a reader
//! that never opens its window, more streams than the listener allows, and h2 requests that
//! would be ambiguous once downgraded to HTTP/1.1 for an origin.
//!
//! Each flood runs while a normal h2 client keeps making requests through the same listener.
//! The test asserts that every normal request succeeds, that the normal client keeps a share
//! of the rate it had before the attack (see `FLOOR`: the attacker, the origin and the proxy
//! share two cores), and that the proxy's peak memory grows by less than 64 MiB. It prints
//! the figures it measured; docs/reliability.md quotes them. The attacks take turns (one
//! lock), so that one attack's load does not skew another's figures.
mod common;
use common::*;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------
// Frames (RFC 9113 §4.1, §6) and HPACK (RFC 7541), by hand
// ---------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const PROTOCOL_ERROR: u32 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// The listener's `max_concurrent_streams` (crates/proxy/src/edge/listen.rs).
const MAX_STREAMS: u32 = 256;

fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    let n = payload.len();
    out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

fn settings(out: &mut Vec<u8>, pairs: &[(u16, u32)]) {
    let mut p = Vec::new();
    for (id, v) in pairs {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(out, SETTINGS, 0, 0, &p);
}

fn rst_stream(out: &mut Vec<u8>, stream: u32, code: u32) {
    frame(out, RST_STREAM, 0, stream, &code.to_be_bytes());
}

/// An HPACK integer with an `n`-bit prefix; `flags` are the first byte's other bits.
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// A literal field without indexing, with a literal name, byte for byte (no Huffman): the
/// name or value may hold anything, CR, LF, `:` and upper case included.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// A literal field with incremental indexing: it enters the decoder's dynamic table.
fn literal_indexed(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x40);
    hpack_str(out, name);
    hpack_str(out, value);
}

fn indexed(out: &mut Vec<u8>, index: usize) {
    hpack_int(out, 0x80, 7, index);
}

fn table_size_update(out: &mut Vec<u8>, size: usize) {
    hpack_int(out, 0x20, 5, size);
}

/// A request's header block: the four pseudo-headers, then `fields` as literals.
fn request_block(method: &str, path: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    literal(&mut b, b":method", method.as_bytes());
    literal(&mut b, b":scheme", b"http");
    literal(&mut b, b":authority", b"localhost");
    literal(&mut b, b":path", path.as_bytes());
    for (k, v) in fields {
        literal(&mut b, k.as_bytes(), v.as_bytes());
    }
    b
}

fn get(out: &mut Vec<u8>, stream: u32, path: &str) {
    let block = request_block("GET", path, &[]);
    frame(out, HEADERS, END_HEADERS | END_STREAM, stream, &block);
}

struct Frame {
    ty: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    fn code(&self) -> u32 {
        let at = if self.ty == GOAWAY { 4 } else { 0 };
        self.payload
            .get(at..at + 4)
            .map_or(u32::MAX, |b| u32::from_be_bytes(b.try_into().unwrap()))
    }

    /// The header block fragment of a HEADERS frame, without padding and priority.
    fn block(&self) -> &[u8] {
        let mut p = &self.payload[..];
        let mut pad = 0;
        if self.flags & PADDED != 0 {
            pad = p[0] as usize;
            p = &p[1..];
        }
        if self.flags & PRIORITY_FLAG != 0 {
            p = &p[5..];
        }
        &p[..p.len() - pad]
    }
}

/// Takes one whole frame off the front of `buf`.
fn take_frame(buf: &mut Vec<u8>) -> Option<Frame> {
    if buf.len() < 9 {
        return None;
    }
    let n = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
    if buf.len() < 9 + n {
        return None;
    }
    let f = Frame {
        ty: buf[3],
        flags: buf[4],
        stream: u32::from_be_bytes(buf[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload: buf[9..9 + n].to_vec(),
    };
    buf.drain(..9 + n);
    Some(f)
}

/// Why no frame came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    Silent,
}

/// What became of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    Reset(u32),
    GoAway(u32),
    Closed,
    Silent,
}

/// A raw h2 client connection.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
    hpack: loona_hpack::Decoder<'static>,
    /// RST_STREAM error codes seen by `until_closed`, and how often.
    resets: BTreeMap<u32, usize>,
}

impl Raw {
    /// Connects, sends the preface and `pairs` as SETTINGS, acknowledges the proxy's SETTINGS,
    /// and waits until the proxy has acknowledged ours.
    async fn open(port: u16, pairs: &[(u16, u32)]) -> Raw {
        Self::try_open(port, pairs)
            .await
            .expect("an h2 connection to the proxy")
    }

    async fn try_open(port: u16, pairs: &[(u16, u32)]) -> Option<Raw> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let _ = tcp.set_nodelay(true);
        let mut r = Raw {
            tcp,
            buf: Vec::new(),
            hpack: loona_hpack::Decoder::new(),
            resets: BTreeMap::new(),
        };
        let mut out = PREFACE.to_vec();
        settings(&mut out, pairs);
        r.send(&out).await.ok()?;
        let (mut theirs, mut acked) = (false, false);
        while !(theirs && acked) {
            let f = r.next(Duration::from_secs(5)).await.ok()?;
            if f.ty == SETTINGS && f.flags & ACK != 0 {
                acked = true;
            } else if f.ty == SETTINGS {
                theirs = true;
                let mut ack = Vec::new();
                frame(&mut ack, SETTINGS, ACK, 0, &[]);
                r.send(&ack).await.ok()?;
            }
        }
        Some(r)
    }

    async fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.tcp.write_all(b).await
    }

    /// The next frame from the proxy.
    async fn next(&mut self, wait: Duration) -> Result<Frame, End> {
        let deadline = Instant::now() + wait;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(f) = take_frame(&mut self.buf) {
                return Ok(f);
            }
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                Ok(_) => return Err(End::Closed),
                Err(_) => return Err(End::Silent),
            }
        }
    }

    /// What became of stream `id`: its response's status, its reset, or the connection's
    /// end. PINGs and SETTINGS met on the way are answered; every header block is decoded,
    /// so the HPACK state stays in step with the proxy's.
    async fn outcome(&mut self, id: u32) -> Outcome {
        loop {
            let f = match self.next(Duration::from_secs(5)).await {
                Ok(f) => f,
                Err(End::Closed) => return Outcome::Closed,
                Err(End::Silent) => return Outcome::Silent,
            };
            match f.ty {
                HEADERS => {
                    assert!(f.flags & END_HEADERS != 0, "a response head in one frame");
                    let fields = self
                        .hpack
                        .decode(f.block())
                        .expect("the proxy's header block decodes");
                    if f.stream == id {
                        let status = fields
                            .iter()
                            .find(|(k, _)| k == b":status")
                            .map(|(_, v)| String::from_utf8_lossy(v).parse().unwrap())
                            .expect(":status");
                        return Outcome::Status(status);
                    }
                }
                RST_STREAM if f.stream == id => return Outcome::Reset(f.code()),
                GOAWAY => return Outcome::GoAway(f.code()),
                SETTINGS if f.flags & ACK == 0 => {
                    let mut ack = Vec::new();
                    frame(&mut ack, SETTINGS, ACK, 0, &[]);
                    let _ = self.send(&ack).await;
                }
                PING if f.flags & ACK == 0 => {
                    let mut pong = Vec::new();
                    frame(&mut pong, PING, ACK, 0, &f.payload);
                    let _ = self.send(&pong).await;
                }
                _ => {}
            }
        }
    }

    /// Reads until the proxy closes the connection (or is silent for `wait`): the GOAWAY
    /// code it sent, if any, and whether it closed.
    async fn until_closed(&mut self, wait: Duration) -> (Option<u32>, End) {
        let mut goaway = None;
        loop {
            match self.next(wait).await {
                Ok(f) if f.ty == GOAWAY => goaway = Some(f.code()),
                Ok(f) if f.ty == RST_STREAM => *self.resets.entry(f.code()).or_default() += 1,
                Ok(_) => {}
                Err(e) => return (goaway, e),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The attacker: many connections, one after the other, until a deadline
// ---------------------------------------------------------------------------------------

/// What the attacker's connections got from the proxy.
#[derive(Debug, Default)]
struct Seen {
    connections: usize,
    /// Connections that the proxy closed (after a GOAWAY or not) before the deadline.
    closed_by_proxy: usize,
    bytes_sent: u64,
    /// GOAWAY error codes, and how often.
    goaways: BTreeMap<u32, usize>,
    /// RST_STREAM error codes, and how often.
    resets: BTreeMap<u32, usize>,
    responses: usize,
    /// Bytes of response body (DATA payload).
    body_bytes: u64,
}

/// Reads and counts what the proxy sends on an attacker's connection, until it closes.
async fn drain(mut rd: OwnedReadHalf, mut buf: Vec<u8>, seen: Arc<Mutex<Seen>>) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some(f) = take_frame(&mut buf) {
            let mut s = seen.lock().unwrap();
            match f.ty {
                GOAWAY => *s.goaways.entry(f.code()).or_default() += 1,
                RST_STREAM => *s.resets.entry(f.code()).or_default() += 1,
                HEADERS => s.responses += 1,
                DATA => s.body_bytes += f.payload.len() as u64,
                _ => {}
            }
        }
        match rd.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
}

/// Attacks until `until`, on one fresh connection after the other (opened with `pairs` as
/// SETTINGS): `fill` writes the next batch of frames, given the connection's next stream id.
/// An empty batch means: hold the connection open, sending nothing more, until the deadline.
async fn flood(
    port: u16,
    pairs: Vec<(u16, u32)>,
    until: Instant,
    mut fill: impl FnMut(&mut u32, &mut Vec<u8>) + Send,
) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut out = Vec::with_capacity(256 * 1024);
    let mut readers = Vec::new();
    'connections: while Instant::now() < until {
        let Ok(Some(raw)) = tokio::time::timeout_at(until, Raw::try_open(port, &pairs)).await
        else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        seen.lock().unwrap().connections += 1;
        let (rd, mut wr) = raw.tcp.into_split();
        readers.push(tokio::spawn(drain(rd, raw.buf, seen.clone())));
        let reader = readers.last_mut().unwrap();
        let mut next_id = 1u32;
        loop {
            out.clear();
            fill(&mut next_id, &mut out);
            if out.is_empty() {
                // Hold: the connection stays open until the deadline or the proxy closes it.
                if tokio::time::timeout_at(until, &mut *reader).await.is_ok() {
                    seen.lock().unwrap().closed_by_proxy += 1;
                    continue 'connections;
                }
                break 'connections;
            }
            match tokio::time::timeout_at(until, wr.write_all(&out)).await {
                Ok(Ok(())) => seen.lock().unwrap().bytes_sent += out.len() as u64,
                Ok(Err(_)) => {
                    seen.lock().unwrap().closed_by_proxy += 1;
                    continue 'connections;
                }
                Err(_) => break 'connections,
            }
            if reader.is_finished() {
                seen.lock().unwrap().closed_by_proxy += 1;
                continue 'connections;
            }
        }
    }
    // Give the last connection's reader a moment to count what was in flight, then close.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for r in readers {
        r.abort();
    }
    Arc::try_unwrap(seen)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_else(|s| std::mem::take(&mut *s.lock().unwrap()))
}

// ---------------------------------------------------------------------------------------
// The proxy, its origin, and a normal client
// ---------------------------------------------------------------------------------------

/// One attack at a time: their figures are rates on a 2-core machine.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The large body of `/big`, made once.
fn big_body() -> Bytes {
    static BIG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BIG.get_or_init(|| Bytes::from(vec![b'x'; 8 << 20])).clone()
}

/// The origin: `/ok` answers at once, `/slow` after 3 s, `/sink` after reading the whole
/// request body, `/big` with 8 MiB.
async fn origin() -> Origin {
    Origin::start(|req| async move {
        let body = match req.uri().path() {
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Bytes::from_static(b"ok")
            }
            "/sink" => {
                let _ = req.into_body().collect().await;
                Bytes::from_static(b"ok")
            }
            "/big" => big_body(),
            _ => Bytes::from_static(b"ok"),
        };
        Response::new(Full::new(body))
    })
    .await
}

async fn proxy(origin: &Origin) -> Proxy {
    Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\n\
         backends:\n  - {{ name: app, servers: [{{ address: \"{}\" }}] }}\n\
         routes:\n  - {{ name: app, match: {{ path_prefix: / }}, backend: app, public: true }}\n",
        origin.address()
    ))
    .await
}

/// A field of /proc/<pid>/status in bytes (`VmRSS`, `VmHWM`).
fn proc_status(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"));
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

type Normal = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// A normal h2 client: hyper's, on its own connection.
async fn normal_client(port: u16) -> Normal {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Requests `/ok` one after the other for `dur`: how many succeeded, and what the others got.
async fn normal_requests(send: &mut Normal, port: u16, dur: Duration) -> (usize, Vec<String>) {
    let until = Instant::now() + dur;
    let (mut ok, mut failed) = (0, Vec::new());
    while Instant::now() < until {
        let req = Request::get(format!("http://127.0.0.1:{port}/ok"))
            .body(Empty::new())
            .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), async {
            let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body.to_bytes()))
        })
        .await;
        match r {
            Ok(Ok((s, b))) if s == 200 && &b[..] == b"ok" => ok += 1,
            Ok(Ok((s, b))) => failed.push(format!("{s}: {}", String::from_utf8_lossy(&b))),
            Ok(Err(e)) => failed.push(e),
            Err(_) => failed.push("timed out".into()),
        }
    }
    (ok, failed)
}

/// What one attack did to the normal client and to the proxy's memory.
#[derive(Debug)]
struct Figures {
    before_rps: f64,
    during_rps: f64,
    rss_before: u64,
    peak_after: u64,
    /// CPU time the proxy used while the attack ran, in seconds.
    proxy_cpu: f64,
    seen: Seen,
}

impl Figures {
    fn ratio(&self) -> f64 {
        self.during_rps / self.before_rps
    }

    /// How far the proxy's peak memory rose above its resident memory before the attack.
    fn growth(&self) -> u64 {
        self.peak_after.saturating_sub(self.rss_before)
    }
}

const BEFORE: Duration = Duration::from_millis(1000);
const RAMP: Duration = Duration::from_millis(200);
const DURING: Duration = Duration::from_millis(1500);
const MIB: f64 = 1024.0 * 1024.0;

/// The least share of its rate before the attack that the normal client must keep during it.
/// The attacker runs on the same two cores as the proxy, the origin and the normal client,
/// and the attacks that the proxy cuts off with GOAWAY reconnect hundreds of times a second,
/// so the share measured there is often near one half, and moves with any other load on the
/// machine. The bound catches a proxy that gives in (one that let the attacker's streams
/// through would leave the normal client a small fraction); the printed figures say more.
const FLOOR: f64 = 0.15;

/// The CPU time (user and system) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Measures a normal client's rate before and during `attack`, which runs until the deadline
/// it is given, and the proxy's memory. Asserts that every normal request succeeded (and a
/// request on a new connection too), at no less than `FLOOR` of the rate before, and that
/// the proxy's peak memory grew by less than 64 MiB.
async fn under_attack<F, Fut>(p: &Proxy, name: &str, attack: F) -> Figures
where
    F: FnOnce(Instant) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Seen>,
{
    let pid = p.child.id();
    let mut normal = normal_client(p.port).await;
    // Warm up: the upstream connection, the allocator's first arenas.
    let (_, failed) = normal_requests(&mut normal, p.port, Duration::from_millis(300)).await;
    assert!(failed.is_empty(), "{failed:?}");
    let rss_before = proc_status(pid, "VmRSS");
    let (before, failed) = normal_requests(&mut normal, p.port, BEFORE).await;
    assert!(failed.is_empty(), "{failed:?}");

    let cpu_before = cpu_seconds(pid);
    let until = Instant::now() + RAMP + DURING;
    // The attacker has a thread and a runtime of its own, as a remote attacker would have
    // its own machine: its tasks must not queue the normal client's or the origin's.
    let attacker = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(attack(until))
    });
    tokio::time::sleep(RAMP).await;
    // A new client connection is accepted and served during the attack too.
    let fresh = client().get(p.url("/ok")).send().await;
    let fresh = fresh
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string());
    let (during, failed) = normal_requests(&mut normal, p.port, DURING).await;
    let seen = attacker.await.unwrap();
    let f = Figures {
        before_rps: before as f64 / BEFORE.as_secs_f64(),
        during_rps: during as f64 / DURING.as_secs_f64(),
        rss_before,
        peak_after: proc_status(pid, "VmHWM"),
        proxy_cpu: cpu_seconds(pid) - cpu_before,
        seen,
    };
    eprintln!(
        "h2 abuse, {name}: normal client {:.0} req/s before, {:.0} during ({:.0} %); proxy \
         RSS {:.1} MiB before, peak {:.1} MiB after (+{:.1} MiB), CPU {:.2} s in {:.1} s; \
         attacker: {:?}",
        f.before_rps,
        f.during_rps,
        f.ratio() * 100.0,
        f.rss_before as f64 / MIB,
        f.peak_after as f64 / MIB,
        f.growth() as f64 / MIB,
        f.proxy_cpu,
        (RAMP + DURING).as_secs_f64(),
        f.seen,
    );
    assert_eq!(fresh, Ok(200), "a new connection during {name}");
    assert!(
        failed.is_empty(),
        "normal requests failed during {name}: {failed:?}\n{}",
        p.log_text()
    );
    assert!(
        f.ratio() >= FLOOR,
        "{name}: the normal client fell to {:.0} % of its rate",
        f.ratio() * 100.0
    );
    assert!(
        f.growth() < 64 << 20,
        "{name}: the proxy's memory grew by {:.1} MiB",
        f.growth() as f64 / MIB
    );
    f
}

/// Writes `batch` again and again, for `dur`, on a connection whose answers are never read:
/// how many bytes went out before the proxy stopped taking them, and how far the proxy's
/// resident memory grew meanwhile.
async fn unread(p: &Proxy, batch: &[u8], dur: Duration) -> (u64, u64) {
    let raw = Raw::open(p.port, &[]).await;
    let mut tcp = raw.tcp;
    let rss = proc_status(p.child.id(), "VmRSS");
    let until = Instant::now() + dur;
    let mut sent = 0;
    while let Ok(Ok(())) = tokio::time::timeout_at(until, tcp.write_all(batch)).await {
        sent += batch.len() as u64;
    }
    let grew = proc_status(p.child.id(), "VmRSS").saturating_sub(rss);
    (sent, grew)
}

// ---------------------------------------------------------------------------------------
// The attacks
// ---------------------------------------------------------------------------------------

/// Rapid reset (CVE-2023-44487): each stream is opened and cancelled at once, so it never
/// counts against the concurrent stream limit while the server starts work for it. The proxy
/// answers a connection that resets streams faster than it accepts them with GOAWAY
/// (ENHANCE_YOUR_CALM), and the normal client keeps its service while the attacker
/// reconnects and starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_normal_clients_keep_their_service() {
    let _turn = TURN.lock().await;
    let origin = origin().await;
    let p = proxy(&origin).await;

    // One connection, alone: 2,000 HEADERS + RST_STREAM pairs in one go.
    let mut raw = Raw::open(p.port, &[]).await;
    let mut out = Vec::new();
    for i in 0..2000u32 {
        get(&mut out, 1 + 2 * i, "/ok");
        rst_stream(&mut out, 1 + 2 * i, CANCEL);
    }
    let hits = origin.hits();
    let _ = raw.send(&out).await;
    let (goaway, end) = raw.until_closed(Duration::from_secs(5)).await;
    eprintln!(
        "rapid reset, one connection: GOAWAY {goaway:?}, {end:?}; {} of 2000 streams reached the origin",
        origin.hits() - hits
    );
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "{}", p.log_text());
    assert_eq!(end, End::Closed);

    let port = p.port;
    let f = under_attack(&p, "rapid reset", move |until| {
        flood(port, vec![], until, |id, out| {
            for _ in 0..100 {
                get(out, *id, "/ok");
                rst_stream(out, *id, CANCEL);
                *id += 2;
            }
        })
    })
    .await;
    assert!(f.seen.goaways.contains_key(&ENHANCE_YOUR_CALM), "{f:?}");
}

/// Streams the proxy must reset itself, each for a protocol error (here a connection-specific
/// header, which HTTP/2 forbids): the "MadeYouReset" class (CVE-2025-8671) of rapid reset,
/// where the server, not the client, resets. After 1024 such resets the proxy closes the
/// connection with GOAWAY (ENHANCE_YOUR_CALM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_proxy_must_reset_are_capped_per_connection() {
    let _turn = TURN.lock().await;
    let origin = origin().await;
    let p = proxy(&origin).await;
    let block = request_block("GET", "/ok", &[("connection", "close")]);

    // One connection, alone: 100 such streams at a time, each batch's resets read before
    // the next, until the proxy closes the connection.
    let mut raw = Raw::open(p.port, &[]).await;
    let mut sent = 0u32;
    let end = loop {
        let mut out = Vec::new();
        for _ in 0..100 {
            frame(
                &mut out,
                HEADERS,
                END_HEADERS | END_STREAM,
                1 + 2 * sent,
                &block,
            );
            sent += 1;
        }
        let _ = raw.send(&out).await;
        match raw.until_closed(Duration::from_millis(50)).await {
            (None, End::Silent) if sent < 3000 => continue,
            end => break end,
        }
    };
    let reset = raw.resets.get(&PROTOCOL_ERROR).copied().unwrap_or(0);
    eprintln!(
        "streams reset by the proxy, one connection: {end:?} after {sent} streams sent, {reset} \
         reset"
    );
    assert_eq!(end, (Some(ENHANCE_YOUR_CALM), End::Closed));
    assert!((1000..=1100).contains(&sent), "{sent}");
    assert!(reset <= 1024, "{:?}", raw.resets);
    assert_eq!(origin.hits(), 0);

    let port = p.port;
    let f = under_attack(&p, "streams reset by the proxy", move |until| {
        flood(port, vec![], until, move |id, out| {
            for _ in 0..100 {
                frame(out, HEADERS, END_HEADERS | END_STREAM, *id, &block);
                *id += 2;
            }
        })
    })
    .await;
    assert!(f.seen.goaways.contains_key(&ENHANCE_YOUR_CALM), "{f:?}");
}

/// CONTINUATION flood (CVE-2024-27316 and kin): a header block that never ends. The proxy
/// closes the connection after a few CONTINUATION frames, whether they are empty or full of
/// fields, and never holds more than the header list limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off() {
    let _turn = TURN.lock().await;
    let origin = origin().await;
    let p = proxy(&origin).await;

    // Empty CONTINUATION frames, endlessly.
    let mut raw = Raw::open(p.port, &[]).await;
    let mut out = Vec::new();
    let block = request_block("GET", "/ok", &[]);
    frame(&mut out, HEADERS, END_STREAM, 1, &block);
    for _ in 0..10_000 {
        frame(&mut out, CONTINUATION, 0, 1, &[]);
    }
    let _ = raw.send(&out).await;
    let empty = raw.until_closed(Duration::from_secs(5)).await;
    // CONTINUATION frames full of fields (16 KiB each).
    let mut raw = Raw::open(p.port, &[]).await;
    let mut out = Vec::new();
    frame(&mut out, HEADERS, END_STREAM, 1, &block);
    let mut fields = Vec::new();
    literal(&mut fields, b"x-flood", &[b'a'; 16_000]);
    for _ in 0..1000 {
        frame(&mut out, CONTINUATION, 0, 1, &fields);
    }
    let _ = raw.send(&out).await;
    let full = raw.until_closed(Duration::from_secs(5)).await;
    eprintln!("CONTINUATION flood, one connection: empty frames {empty:?}, full frames {full:?}");
    assert_eq!(empty, (Some(ENHANCE_YOUR_CALM), End::Closed));
    assert!(
        matches!(
            full,
            (Some(ENHANCE_YOUR_CALM | COMPRESSION_ERROR), End::Closed)
        ),
        "{full:?}"
    );
    assert_eq!(origin.hits(), 0);

    // Sustained: a header block of CONTINUATION frames full of fields on each connection,
    // one connection after the other.
    let port = p.port;
    let f = under_attack(&p, "CONTINUATION flood", move |until| {
        flood(port, vec![], until, move |id, out| {
            if *id == 1 {
                frame(out, HEADERS, END_STREAM, 1, &block);
                for _ in 0..8 {
                    frame(out, CONTINUATION, 0, 1, &fields);
                }
                *id = 3;
            }
        })
    })
    .await;
    assert!(f.seen.connections > 1, "{f:?}");
}

/// HPACK bombs: one 4 KB field put in the proxy's dynamic table, then referenced by a 1-byte
/// index again and again. Just over the header list limit it is a 431; far over it, the
/// proxy stops decoding and closes the connection. A dynamic table size update above the
/// proxy's SETTINGS_HEADER_TABLE_SIZE is a compression error. A client that allows a huge
/// (or no) table for the proxy's own encoder still gets its answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_bombs_and_table_size_abuse_are_refused() {
    let _turn = TURN.lock().await;
    let origin = origin().await;
    let p = proxy(&origin).await;
    let bomb = |refs: usize| {
        let mut b = request_block("GET", "/ok", &[]);
        literal_indexed(&mut b, b"x-bomb", &[b'a'; 4000]);
        for _ in 0..refs {
            indexed(&mut b, 62);
        }
        b
    };

    // 20 references: about 80 KB decoded, over the 64 KiB limit.
    let mut raw = Raw::open(p.port, &[]).await;
    let mut out = Vec::new();
    frame(&mut out, HEADERS, END_HEADERS | END_STREAM, 1, &bomb(20));
    get(&mut out, 3, "/ok");
    raw.send(&out).await.unwrap();
    let small = raw.outcome(1).await;
    let after_small = raw.outcome(3).await;
    // 12,000 references in a 12 KB frame: 48 MB decoded.
    let mut raw = Raw::open(p.port, &[]).await;
    let mut out = Vec::new();
    frame(
        &mut out,
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &bomb(12_000),
    );
    raw.send(&out).await.unwrap();
    let big = raw.until_closed(Duration::from_secs(5)).await;
    // A table size update to 1 GiB, over the proxy's 4,096 bytes.
    let mut raw = Raw::open(p.port, &[]).await;
    let mut block = Vec::new();
    table_size_update(&mut block, 1 << 30);
    block.extend_from_slice(&request_block("GET", "/ok", &[]));
    let mut out = Vec::new();
    frame(&mut out, HEADERS, END_HEADERS | END_STREAM, 1, &block);
    raw.send(&out).await.unwrap();
    let update = raw.until_closed(Duration::from_secs(5)).await;
    eprintln!(
        "HPACK bombs: 80 KB {small:?}, then the same connection {after_small:?}; 48 MB {big:?}; \
         table size update to 1 GiB {update:?}"
    );
    assert_eq!(small, Outcome::Status(431));
    assert_eq!(after_small, Outcome::Status(200));
    assert_eq!(big, (Some(ENHANCE_YOUR_CALM), End::Closed));
    assert!(
        matches!(
            update,
            (Some(COMPRESSION_ERROR | PROTOCOL_ERROR), End::Closed)
        ),
        "{update:?}"
    );

    // SETTINGS_HEADER_TABLE_SIZE of 4 GiB, and of 0: the proxy's encoder keeps to 4 KiB (or
    // none), and 200 answers each decode.
    for size in [u32::MAX, 0] {
        let mut raw = Raw::open(p.port, &[(SETTINGS_HEADER_TABLE_SIZE, size)]).await;
        for i in 0..200u32 {
            let mut out = Vec::new();
            get(&mut out, 1 + 2 * i, &format!("/ok?{i}"));
            raw.send(&out).await.unwrap();
            assert_eq!(raw.outcome(1 + 2 * i).await, Outcome::Status(200), "{size}");
        }
    }

    let port = p.port;
    let big_bomb = bomb(12_000);
    let f = under_attack(&p, "HPACK bomb", move |until| {
        flood(port, vec![], until, move |id, out| {
            if *id == 1 {
                frame(out, HEADERS, END_HEADERS | END_STREAM, 1, &big_bomb);
                *id = 3;
            }
        })
    })
    .await;
    assert!(f.seen.goaways.contains_key(&ENHANCE_YOUR_CALM), "{f:?}");
}

/// SETTINGS flood (CVE-2019-9515): the proxy acknowledges each SETTINGS frame, and reads
/// the next only once the last acknowledgement is written, so a client that never reads them
/// soon cannot send more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_flood_leaves_normal_clients_served() {
    let _turn = TURN.lock().await;
    let origin = origin().await;
    let p = proxy(&origin).await;
    let mut batch = Vec::new();
    for _ in 0..500 {
        settings(
            &mut batch,
            &[
                (SETTINGS_HEADER_TABLE_SIZE, 4096),
                (SETTINGS_INITIAL_WINDOW_SIZE, 65_535),
            ],
        );
    }
    // A client that never reads the acknowledgements: the proxy stops reading too.
    let (sent, grew) = unread(&p, &batch, Duration::from_millis(500)).await;
    eprintln!(
        "SETTINGS flood, answers never read: {:.1} MiB taken in 0.5 s, RSS +{:.1} MiB",
        sent as f64 / MIB,
        grew as f64 / MIB
    );
    assert!(sent < 32 << 20 && grew < 16 << 20, "{sent} {grew}");
    let port = p.port;
    under_attack(&p, "SETTINGS flood", move |until| {
        flood(port, vec![], until, move |_, out| {
            out.extend_from_slice(&batch)
        })
    })
    .await;
}

/// PING flood (CVE-2019-9512): each PING wants an acknowledgement; the proxy keeps at most
/// one pending, and a client that never reads them soon cannot send more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_leaves_normal_clients_served() {
    let _turn = TURN.lock().await;
    let origin = origin().await;
    let p = proxy(&origin).await;
    let mut batch = Vec::new();
    for i in 0..1000u64 {
        frame(&mut batch, PING, 0, 0, &i.to_be_bytes());
    }
    // A client that never reads the answers: the proxy stops reading too.
    let (sent, grew) = unread(&p, &batch, Duration::from_millis(500)).await;
    eprintln!(
        "PING flood, answers never read: {:.1} MiB taken in 0.5 s, RSS +{:.1} MiB",
        sent as f64 / MIB,
        grew as f64 / MIB
    );
    assert!(sent < 32 << 20 && grew < 16 << 20, "{sent} {grew}");
    let port = p.port;
    under_attack(&p, "PING flood", move |until| {
        flood(port, vec![], until, move |_, out| {
            out.extend_from_slice(&batch)
        })
    })
    .await;
}

/// Empty DATA frames on an open request body (CVE-2019-9518): they spend no flow control
/// window, so only a count stops them. The proxy closes the connection after a budget of
/// them, and no empty chunk (which would end an HTTP/1.1 chunked body early) reaches the
/// origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_data_flood_leaves_normal_clients_served() {
    let _turn = TURN.lock().await;
    let origin = origin().await;
    let p = proxy(&origin).await;
    let mut batch = Vec::new();
    for _ in 0..2000 {
        frame(&mut batch, DATA, 0, 1, &[]);
    }
    let open = request_block("POST", "/sink", &[]);

    // One connection, alone: 100,000 empty DATA frames on one request body.
    let mut raw = Raw::open(p.port, &[]).await;
    let mut out = Vec::new();
    frame(&mut out, HEADERS, END_HEADERS, 1, &open);
    for _ in 0..50 {
        out.extend_from_slice(&batch);
    }
    let _ = raw.send(&out).await;
    let one = raw.until_closed(Duration::from_secs(5)).await;
    eprintln!("empty DATA flood, one connection: {one:?}");
    assert_eq!(one, (Some(ENHANCE_YOUR_CALM), End::Closed));

    let port = p.port;
    let f = under_attack(&p, "empty DATA flood", move |until| {
        flood(port, vec![], until, move |id, out| {
            if *id == 1 {
                frame(out, HEADERS, END_HEADERS, 1, &open);
                *id = 3;
            }
            out.extend_from_slice(&batch);
        })
    })
    .await;
    // The origin was still reading the bodies when the attack ended: no response came.
    assert_eq!(f.seen.responses, 0, "{f:?}");
}

/// A reader that never opens its flow control window (SETTINGS_INITIAL_WINDOW_SIZE 0, no
/// WINDOW_UPDATE) asks for 100 bodies of 8 MiB: it gets the heads and no body byte, and the
/// proxy reads from the origin only as fast as the client takes, so its memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_readers_hold_no_response_bodies() {
    let _turn = TURN.lock().await;
    let origin = origin().await;
    let p = proxy(&origin).await;
    let port = p.port;
    let f = under_attack(&p, "zero window", move |until| {
        flood(
            port,
            vec![(SETTINGS_INITIAL_WINDOW_SIZE, 0)],
            until,
            |id, out| {
                if *id == 1 {
                    for _ in 0..100 {
                        get(out, *id, "/big");
                        *id += 2;
                    }
                }
            },
        )
    })
    .await;
    // 100 response heads, and no body byte.
    assert_eq!(f.seen.connections, 1, "{f:?}");
    assert_eq!(f.seen.responses, 100, "{f:?}");
    assert_eq!(f.seen.body_bytes, 0, "{f:?}");
}

/// More streams than SETTINGS_MAX_CONCURRENT_STREAMS: the extra ones are refused
/// (REFUSED_STREAM), so a client can retry them, and the rest are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_the_limit_are_refused() {
    let _turn = TURN.lock().await;
    let origin = origin().await;
    let p = proxy(&origin).await;
    let port = p.port;
    let f = under_attack(&p, "stream exhaustion", move |until| {
        flood(port, vec![], until, |id, out| {
            if *id == 1 {
                for _ in 0..MAX_STREAMS + 100 {
                    get(out, *id, "/slow");
                    *id += 2;
                }
            }
        })
    })
    .await;
    assert_eq!(f.seen.connections, 1, "{f:?}");
    assert_eq!(
        f.seen.resets.get(&REFUSED_STREAM).copied(),
        Some(100),
        "{f:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Downgrade smuggling: h2 requests that would be ambiguous as HTTP/1.1
// ---------------------------------------------------------------------------------------

/// One origin connection's bytes, as received.
#[derive(Default)]
struct Received {
    bytes: Vec<u8>,
    closed: bool,
}

/// An HTTP/1.1 origin that records the exact bytes of each connection, and answers each
/// complete request (Content-Length or chunked body) with `200 ok`.
struct Recorder {
    addr: std::net::SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Mutex<Received>>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Recorder {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<Arc<Mutex<Received>>>>> = Arc::default();
        let all = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let rec = Arc::new(Mutex::new(Received::default()));
                all.lock().unwrap().push(rec.clone());
                tokio::spawn(async move {
                    let mut chunk = vec![0u8; 64 * 1024];
                    let mut answered = 0;
                    loop {
                        let n = match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => n,
                            _ => break,
                        };
                        let whole = {
                            let mut r = rec.lock().unwrap();
                            r.bytes.extend_from_slice(&chunk[..n]);
                            match parse_requests(&r.bytes) {
                                Ok((reqs, _)) => reqs.len(),
                                Err(_) => break,
                            }
                        };
                        for _ in answered..whole {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok).await.is_err() {
                                break;
                            }
                        }
                        answered = whole;
                    }
                    rec.lock().unwrap().closed = true;
                });
            }
        });
        Recorder { addr, conns, task }
    }

    /// Every request the origin received, in full, and what is wrong with the bytes:
    /// unparsable bytes, or the incomplete rest of a request on a connection still open.
    fn requests(&self) -> (Vec<Req>, Vec<String>) {
        let (mut all, mut wrong) = (Vec::new(), Vec::new());
        for c in self.conns.lock().unwrap().iter() {
            let c = c.lock().unwrap();
            match parse_requests(&c.bytes) {
                Ok((reqs, rest)) => {
                    all.extend(reqs);
                    if rest > 0 && !c.closed {
                        wrong.push(format!(
                            "{rest} bytes of an unfinished request on an open connection: {:?}",
                            String::from_utf8_lossy(&c.bytes[c.bytes.len() - rest..])
                        ));
                    }
                }
                Err(e) => wrong.push(format!("{e}: {:?}", String::from_utf8_lossy(&c.bytes))),
            }
        }
        (all, wrong)
    }
}

/// A request as the origin read it.
#[derive(Debug)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Reads the requests in `b` strictly: a head that httparse accepts, with at most one
/// Content-Length, not both Content-Length and Transfer-Encoding, and a Transfer-Encoding
/// only if it is `chunked`. Returns the complete requests and how many bytes are left.
fn parse_requests(mut b: &[u8]) -> Result<(Vec<Req>, usize), String> {
    let mut out = Vec::new();
    loop {
        if b.is_empty() {
            return Ok((out, 0));
        }
        let mut fields = [httparse::EMPTY_HEADER; 100];
        let mut r = httparse::Request::new(&mut fields);
        let head = match r.parse(b) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok((out, b.len())),
            Err(e) => return Err(format!("unparsable head ({e})")),
        };
        let headers: Vec<(String, Vec<u8>)> = r
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect();
        let named = |n: &str| -> Vec<&[u8]> {
            headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| &v[..])
                .collect()
        };
        let (cl, te) = (named("content-length"), named("transfer-encoding"));
        if cl.len() > 1 || (!cl.is_empty() && !te.is_empty()) {
            return Err(format!("ambiguous framing: {headers:?}"));
        }
        if te.iter().any(|v| *v != b"chunked") || te.len() > 1 {
            return Err(format!("unexpected Transfer-Encoding: {headers:?}"));
        }
        let rest = &b[head..];
        let (body, used) = if !te.is_empty() {
            match dechunk(rest)? {
                Some(x) => x,
                None => return Ok((out, b.len())),
            }
        } else {
            let n: usize = cl
                .first()
                .map(|v| {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or("bad Content-Length")
                })
                .transpose()?
                .unwrap_or(0);
            if rest.len() < n {
                return Ok((out, b.len()));
            }
            (rest[..n].to_vec(), n)
        };
        out.push(Req {
            method: r.method.unwrap().to_string(),
            path: r.path.unwrap().to_string(),
            headers,
            body,
        });
        b = &b[head + used..];
    }
}

/// A chunked body: its data and its length on the wire, None if incomplete.
fn dechunk(mut b: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let start = b.len();
    let mut data = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| format!("bad chunk size {:?}", String::from_utf8_lossy(&b[..eol])))?;
        b = &b[eol + 2..];
        if size == 0 {
            // No trailers are expected here: the empty line ends the body.
            if b.len() < 2 {
                return Ok(None);
            }
            if &b[..2] != b"\r\n" {
                return Err("trailers after the last chunk".into());
            }
            return Ok(Some((data, start - b.len() + 2)));
        }
        if b.len() < size + 2 {
            return Ok(None);
        }
        data.extend_from_slice(&b[..size]);
        if &b[size..size + 2] != b"\r\n" {
            return Err("no CRLF after chunk data".into());
        }
        b = &b[size + 2..];
    }
}

/// An attack: a request (head fields, DATA frames) that a downgrade could make ambiguous.
struct Case {
    name: &'static str,
    method: &'static str,
    /// `:path`; `{n}` is replaced by the case's number.
    path: &'static str,
    fields: &'static [(&'static str, &'static str)],
    data: &'static [&'static [u8]],
}

/// A request hidden in a body or a header, which must never reach the origin as a request.
const HIDDEN: &str = "GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";
const BODY_WITH_HIDDEN: &[u8] = b"hello0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n";

const CASES: &[Case] = &[
    Case {
        name: "content-length shorter than DATA",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("content-length", "5")],
        data: &[BODY_WITH_HIDDEN],
    },
    Case {
        name: "content-length longer than DATA",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("content-length", "100")],
        data: &[b"hello"],
    },
    Case {
        name: "content-length: 0 with DATA",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("content-length", "0")],
        data: &[HIDDEN.as_bytes()],
    },
    Case {
        name: "two content-lengths, no body",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[("content-length", "0"), ("content-length", "40")],
        data: &[],
    },
    Case {
        name: "two equal content-lengths, no body",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[("content-length", "0"), ("content-length", "0")],
        data: &[],
    },
    Case {
        name: "two equal content-lengths, with body",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("content-length", "5"), ("content-length", "5")],
        data: &[b"hello"],
    },
    Case {
        name: "two content-lengths, with body",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("content-length", "5"), ("content-length", "45")],
        data: &[BODY_WITH_HIDDEN],
    },
    Case {
        name: "content-length list",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("content-length", "5, 45")],
        data: &[BODY_WITH_HIDDEN],
    },
    Case {
        name: "transfer-encoding: chunked",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("transfer-encoding", "chunked")],
        data: &[b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"],
    },
    Case {
        name: "transfer-encoding with content-length",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("content-length", "5"), ("transfer-encoding", "chunked")],
        data: &[b"0\r\n\r\n"],
    },
    Case {
        name: "te: chunked",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("te", "chunked")],
        data: &[b"hello"],
    },
    Case {
        name: "connection: keep-alive",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[("connection", "keep-alive")],
        data: &[],
    },
    Case {
        name: "keep-alive, proxy-connection, upgrade",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "h2c"),
        ],
        data: &[],
    },
    Case {
        name: "CRLF in a header value",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[("x-a", "1\r\ncontent-length: 40")],
        data: &[],
    },
    Case {
        name: "LF in a header value",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[("x-a", "1\ntransfer-encoding: chunked")],
        data: &[],
    },
    Case {
        name: "NUL in a header value",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[("x-a", "1\0x")],
        data: &[],
    },
    Case {
        name: "CRLF in a header name",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[("x-a\r\ncontent-length", "40")],
        data: &[],
    },
    Case {
        name: "colon in a header name",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[("content-length:40\r\nx-a", "1")],
        data: &[],
    },
    Case {
        name: "space in a header name",
        method: "GET",
        path: "/smuggle-{n}",
        fields: &[("content-length ", "40")],
        data: &[],
    },
    Case {
        name: "upper-case header name",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[("Transfer-Encoding", "chunked")],
        data: &[b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"],
    },
    Case {
        name: "underscores in header names",
        method: "POST",
        path: "/smuggle-{n}",
        fields: &[
            ("transfer_encoding", "chunked"),
            ("content_length", "0"),
            ("x_portcullis_user", "admin"),
        ],
        data: &[b"hello"],
    },
    Case {
        name: "CRLF in :path",
        method: "GET",
        path: "/smuggle-{n} HTTP/1.1\r\nhost: x\r\n\r\nGET /smuggled",
        fields: &[],
        data: &[],
    },
    Case {
        name: "request line in :method",
        method: "GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\nGET",
        path: "/smuggle-{n}",
        fields: &[],
        data: &[],
    },
];

/// Each case on its own h2 connection, then a normal request on a new one. The origin sees
/// each attack as at most one well-framed request, never the request hidden in it, and the
/// normal request after it as a request of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_to_http1_is_never_ambiguous() {
    let _turn = TURN.lock().await;
    let rec = Recorder::start().await;
    let p = Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\n\
         backends:\n  - {{ name: app, servers: [{{ address: \"{}\" }}] }}\n\
         routes:\n  - {{ name: app, match: {{ path_prefix: / }}, backend: app, public: true }}\n",
        rec.addr
    ))
    .await;
    let mut report = Vec::new();
    for (n, case) in CASES.iter().enumerate() {
        let mut raw = Raw::open(p.port, &[]).await;
        let path = case.path.replace("{n}", &n.to_string());
        let mut out = Vec::new();
        let block = request_block(case.method, &path, case.fields);
        let end = if case.data.is_empty() { END_STREAM } else { 0 };
        frame(&mut out, HEADERS, END_HEADERS | end, 1, &block);
        for (i, d) in case.data.iter().enumerate() {
            let last = i + 1 == case.data.len();
            frame(&mut out, DATA, if last { END_STREAM } else { 0 }, 1, d);
        }
        raw.send(&out).await.unwrap();
        let got = raw.outcome(1).await;

        let mut after = Raw::open(p.port, &[]).await;
        let mut out = Vec::new();
        get(&mut out, 1, &format!("/after-{n}"));
        after.send(&out).await.unwrap();
        assert_eq!(
            after.outcome(1).await,
            Outcome::Status(200),
            "the request after `{}`\n{}",
            case.name,
            p.log_text()
        );

        let (reqs, wrong) = rec.requests();
        let attack = format!("/smuggle-{n}");
        let seen: Vec<&Req> = reqs.iter().filter(|r| r.path == attack).collect();
        report.push(format!(
            "{}: client got {got:?}; origin saw {}",
            case.name,
            match seen.first() {
                Some(r) => format!(
                    "{} {} {:?} with {} body bytes",
                    r.method,
                    r.path,
                    r.headers.iter().map(|h| &h.0).collect::<Vec<_>>(),
                    r.body.len()
                ),
                None => "nothing".into(),
            }
        ));
        assert!(wrong.is_empty(), "`{}`: {wrong:?}", case.name);
        assert!(seen.len() <= 1, "`{}`: {seen:?}", case.name);
        assert!(
            !reqs.iter().any(|r| r.path.contains("smuggled")),
            "`{}`: the hidden request reached the origin: {reqs:?}",
            case.name
        );
        assert_eq!(
            reqs.iter()
                .filter(|r| r.path == format!("/after-{n}"))
                .count(),
            1,
            "`{}`: {reqs:?}",
            case.name
        );
        for r in &seen {
            assert!(
                r.headers.iter().all(|(k, _)| !k.contains('_')),
                "`{}`: {r:?}",
                case.name
            );
        }
    }
    eprintln!("downgrade cases:\n  {}", report.join("\n  "));
}
