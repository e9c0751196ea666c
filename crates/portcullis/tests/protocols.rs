//! Protocol behaviour of the real binary against real TCP origins: WebSocket upgrades, h2
//! end to end with trailers (gRPC-like), streaming large bodies in bounded memory, request
//! body limits, and the headers the proxy adds, removes and rewrites on the way upstream.
mod common;
use common::*;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

type TestBody = UnsyncBoxBody<Bytes, Infallible>;

/// A real HTTP/1.1 + h2c origin whose handler may return any streaming body (the common
/// `Origin` only returns `Full` bodies, which cannot stream or carry trailers).
struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<F, Fut>(f: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let f = Arc::new(f);
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let f = f.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let fut = f(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Server { addr, task }
}

fn full_body(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).boxed_unsync()
}

/// A body of `left` bytes produced from one shared chunk, so gigabytes can be streamed without
/// ever being held in memory. With `exact` it declares its length (Content-Length), otherwise
/// it is sent chunked.
struct Pattern {
    left: u64,
    chunk: Bytes,
    exact: bool,
}

impl Pattern {
    fn new(len: u64, exact: bool) -> Self {
        let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        Pattern {
            left: len,
            chunk: Bytes::from(chunk),
            exact,
        }
    }
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.left)
        } else {
            SizeHint::default()
        }
    }
}

/// A streaming body fed frame by frame from a channel (data frames, then trailers).
struct ChanBody(tokio::sync::mpsc::Receiver<Frame<Bytes>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// Reads a body to its end, counting bytes without keeping them.
async fn count_body(mut body: Incoming) -> Result<u64, String> {
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| e.to_string())?;
        if let Some(d) = f.data_ref() {
            n += d.len() as u64;
        }
    }
    Ok(n)
}

fn listener_yaml() -> &'static str {
    "listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]\n"
}

/// Peak resident set size of a process, from /proc/<pid>/status, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc status");
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Opens an HTTP/1.1 connection to the proxy with hyper's low-level client.
async fn h1_conn<B>(port: u16) -> hyper::client::conn::http1::SendRequest<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

// ---------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------

/// A WebSocket client connected through the proxy gets its text and binary messages echoed by
/// a real WebSocket origin, and the origin sees the upgrade request as forwarded by the proxy.
#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let seen2 = seen.clone();
    let origin = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen2.clone();
            tokio::spawn(async move {
                // The error type is tungstenite's, not ours.
                #[allow(clippy::result_large_err)]
                let cb = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                          resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    let xff = req
                        .headers()
                        .get("x-forwarded-for")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    seen.lock().unwrap().push((req.uri().path().to_string(), xff));
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() {
                        return;
                    }
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });

    let p = Proxy::start(&format!(
        "{}backends:\n  - {{ name: ws, servers: [{{ address: \"{origin_addr}\" }}] }}\nroutes:\n  - {{ name: ws, match: {{ path_prefix: /ws }}, backend: ws, public: true }}\n",
        listener_yaml()
    ))
    .await;

    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws/chat", p.port)),
    )
    .await
    .expect("websocket handshake timed out")
    .unwrap_or_else(|e| {
        panic!(
            "websocket handshake through the proxy failed: {e}\n{}",
            p.log_text()
        )
    });
    assert_eq!(resp.status(), 101);
    assert!(resp.headers().contains_key("sec-websocket-accept"));

    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let sent = vec![
        Message::text("hello through portcullis"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::binary(big),
        Message::text("last"),
    ];
    for m in &sent {
        ws.send(m.clone()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("echo timed out")
            .expect("stream ended")
            .expect("websocket error");
        assert_eq!(&back, m);
    }
    ws.close(None).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0, "/ws/chat");
    assert_eq!(
        seen[0].1, "127.0.0.1",
        "the upgrade request went through the proxy's header handling"
    );
    origin.abort();
}

// ---------------------------------------------------------------------------------------
// h2 and trailers
// ---------------------------------------------------------------------------------------

/// An h2c gRPC-like origin: streams its response in two data frames and ends with trailers.
/// When the request has `x-gate: 1`, the second frame waits for `gate`, which proves the first
/// frame reached the client while the origin was still sending.
async fn grpc_origin(gate: Arc<tokio::sync::Notify>) -> Server {
    serve(move |req: Request<Incoming>| {
        let gate = gate.clone();
        async move {
            let version = format!("{:?}", req.version());
            let te = req
                .headers()
                .get("te")
                .map(|v| v.to_str().unwrap_or("?").to_string())
                .unwrap_or_default();
            let ct = req
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap_or("?").to_string())
                .unwrap_or_default();
            let gated = req.headers().get("x-gate").is_some();
            let path = req.uri().path().to_string();
            let received = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                let _ = tx
                    .send(Frame::data(Bytes::from_static(
                        b"\x00\x00\x00\x00\x05first",
                    )))
                    .await;
                if gated {
                    gate.notified().await;
                }
                let _ = tx
                    .send(Frame::data(Bytes::from(format!(
                        "\x00\x00\x00\x00\x06second|{}",
                        received.len()
                    ))))
                    .await;
                let mut t = HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                t.insert("grpc-message", "ok".parse().unwrap());
                let _ = tx.send(Frame::trailers(t)).await;
            });
            let mut r = Response::new(ChanBody(rx).boxed_unsync());
            let h = r.headers_mut();
            h.insert("content-type", "application/grpc".parse().unwrap());
            h.insert("x-origin-version", version.parse().unwrap());
            h.insert("x-origin-te", te.parse().unwrap());
            h.insert("x-origin-content-type", ct.parse().unwrap());
            h.insert("x-origin-path", path.parse().unwrap());
            r
        }
    })
    .await
}

/// gRPC-like exchange: an h2 (prior knowledge) client through the proxy to an h2c origin
/// (`protocol: http2`). The response streams (the first frame arrives before the origin sends
/// the rest), and the trailers (`grpc-status: 0`) reach the client. An HTTP/1.1 client can use
/// the same h2 upstream.
#[tokio::test]
async fn h2_end_to_end_with_trailers_and_h1_client_to_h2_upstream() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let origin = grpc_origin(gate.clone()).await;
    let p = Proxy::start(&format!(
        "{}backends:\n  - {{ name: grpc, protocol: http2, servers: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: grpc, match: {{ path_prefix: /pkg.Echo/ }}, backend: grpc, public: true }}\n",
        listener_yaml(),
        origin.addr
    ))
    .await;

    // h2 prior knowledge to the proxy.
    let tcp = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{}/pkg.Echo/Say", p.port))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-gate", "1")
        .body(Full::new(Bytes::from_static(b"\x00\x00\x00\x00\x05hello")))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), h2.send_request(req))
        .await
        .expect("h2 response timed out")
        .unwrap_or_else(|e| panic!("h2 request failed: {e}\n{}", p.log_text()));
    assert_eq!(resp.status(), 200, "{}", p.log_text());
    assert_eq!(resp.version(), Version::HTTP_2);
    let h = resp.headers();
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(
        h["x-origin-version"], "HTTP/2.0",
        "backend protocol http2 must reach the origin over h2"
    );
    assert_eq!(
        h["x-origin-te"], "trailers",
        "`te: trailers` must be forwarded to an h2 upstream"
    );
    assert_eq!(h["x-origin-content-type"], "application/grpc");
    assert_eq!(h["x-origin-path"], "/pkg.Echo/Say");

    let mut body = resp.into_body();
    // The first frame arrives while the origin still holds the rest back: the proxy streams.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first data frame was not streamed through before the origin finished")
        .expect("body ended early")
        .expect("body error");
    let mut data = first.into_data().expect("first frame is data").to_vec();
    assert_eq!(data, b"\x00\x00\x00\x00\x05first");
    gate.notify_one();
    let mut trailers = None;
    while let Some(f) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("body timed out")
    {
        let f = f.expect("body error");
        match f.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = Some(f.into_trailers().expect("trailers frame")),
        }
    }
    assert_eq!(
        data,
        b"\x00\x00\x00\x00\x05first\x00\x00\x00\x00\x06second|10"
    );
    let trailers = trailers.expect("trailers reach the h2 client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");

    // A second stream on the same client connection works too (the h2 upstream is shared).
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{}/pkg.Echo/Again", p.port))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\x00\x00\x00\x00\x00")))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let c = resp.into_body().collect().await.unwrap();
    assert_eq!(c.trailers().expect("trailers")["grpc-status"], "0");
    assert_eq!(
        &c.to_bytes()[..],
        b"\x00\x00\x00\x00\x05first\x00\x00\x00\x00\x06second|5"
    );

    // HTTP/1.1 client → h2 upstream.
    let r = client()
        .post(p.url("/pkg.Echo/FromH1"))
        .header("content-type", "application/grpc")
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", p.log_text());
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.headers()["x-origin-version"], "HTTP/2.0");
    assert_eq!(r.headers()["x-origin-path"], "/pkg.Echo/FromH1");
    assert_eq!(
        r.headers()["x-origin-te"],
        "",
        "an h1 client that did not ask for trailers sends no TE"
    );
    assert_eq!(
        &r.bytes().await.unwrap()[..],
        b"\x00\x00\x00\x00\x05first\x00\x00\x00\x00\x06second|3"
    );
}

// ---------------------------------------------------------------------------------------
// Large bodies, bounded memory
// ---------------------------------------------------------------------------------------

/// 1 GiB up and 1 GiB down stream through the proxy without being buffered: the origin counts
/// every uploaded byte, the client counts every downloaded byte, and the proxy's peak resident
/// memory stays far below the body size. (Bodies are generated in chunks on the fly; the test
/// never holds them either.) The upload declares Content-Length; the download is chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_gigabyte_each_way_in_bounded_memory() {
    const SIZE: u64 = 1 << 30;
    const RSS_LIMIT: u64 = 150 << 20;
    let counted = Arc::new(AtomicU64::new(0));
    let c2 = counted.clone();
    let origin = serve(move |req: Request<Incoming>| {
        let counted = c2.clone();
        async move {
            if req.uri().path() == "/big/download" {
                return Response::new(Pattern::new(SIZE, false).boxed_unsync());
            }
            match count_body(req.into_body()).await {
                Ok(n) => {
                    counted.store(n, Ordering::SeqCst);
                    Response::new(full_body(n.to_string()))
                }
                Err(e) => {
                    let mut r = Response::new(full_body(e));
                    *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
                    r
                }
            }
        }
    })
    .await;
    // The response timeout runs from the start of the request to the response headers, which
    // includes the upload, so it is raised for a slow debug build.
    let p = Proxy::start(&format!(
        "{}backends:\n  - {{ name: big, timeouts: {{ response: 120s }}, servers: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: big, match: {{ path_prefix: /big }}, backend: big, public: true }}\n",
        listener_yaml(),
        origin.addr
    ))
    .await;
    let pid = p.child.id();
    let base = peak_rss(pid);

    // Upload.
    let started = Instant::now();
    let mut s = h1_conn::<Pattern>(p.port).await;
    let req = Request::builder()
        .method("PUT")
        .uri("/big/upload")
        .header("host", "big.test")
        .body(Pattern::new(SIZE, true))
        .unwrap();
    let resp = s
        .send_request(req)
        .await
        .unwrap_or_else(|e| panic!("upload failed: {e}\n{}", p.log_text()));
    assert_eq!(resp.status(), 200, "{}", p.log_text());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        body,
        SIZE.to_string(),
        "the origin answered with the byte count it received"
    );
    assert_eq!(counted.load(Ordering::SeqCst), SIZE);
    let up = started.elapsed();

    // Download.
    let started = Instant::now();
    let mut s = h1_conn::<Full<Bytes>>(p.port).await;
    let req = Request::builder()
        .uri("/big/download")
        .header("host", "big.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let n = count_body(resp.into_body())
        .await
        .unwrap_or_else(|e| panic!("download failed: {e}\n{}", p.log_text()));
    assert_eq!(n, SIZE);
    let down = started.elapsed();

    let peak = peak_rss(pid);
    eprintln!(
        "upload {:?}, download {:?}, proxy peak RSS {} MiB (at start {} MiB)",
        up,
        down,
        peak >> 20,
        base >> 20
    );
    assert!(
        peak < RSS_LIMIT,
        "proxy peak RSS {} MiB exceeds {} MiB",
        peak >> 20,
        RSS_LIMIT >> 20
    );
}

// ---------------------------------------------------------------------------------------
// Body size limit
// ---------------------------------------------------------------------------------------

/// Bodies over the route's `max_body_size` get 413, whether the size is declared up front
/// (Content-Length: refused before anything reaches the origin) or only discovered while
/// streaming (chunked). Bodies within the limit pass.
#[tokio::test]
async fn body_over_max_body_size_gets_413() {
    let origin = Origin::start(|req| async move {
        let n = count_body(req.into_body()).await.unwrap_or(u64::MAX);
        hyper::Response::new(Full::new(Bytes::from(n.to_string())))
    })
    .await;
    let p = Proxy::start(&format!(
        "{}backends:\n  - {{ name: b, servers: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: small, match: {{ path_prefix: /upload }}, backend: b, max_body_size: 1KiB, public: true }}\n",
        listener_yaml(),
        origin.address()
    ))
    .await;

    let post_len = |n: usize| {
        let mut v = format!("POST /upload HTTP/1.1\r\nHost: x.test\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n").into_bytes();
        v.extend(vec![b'a'; n]);
        v
    };
    let post_chunked = |chunks: usize, size: usize| {
        let mut v = b"POST /upload HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        for _ in 0..chunks {
            v.extend(format!("{size:x}\r\n").into_bytes());
            v.extend(vec![b'b'; size]);
            v.extend(b"\r\n");
        }
        v.extend(b"0\r\n\r\n");
        v
    };

    // Within the limit, both ways.
    let r = raw(p.port, &post_len(1024)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("\r\n\r\n1024"), "{r}");
    let r = raw(p.port, &post_chunked(2, 500)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("\r\n\r\n1000"), "{r}");
    let hits = origin.hits();
    assert_eq!(hits, 2);

    // Declared too large: refused up front; the origin never sees it.
    let r = raw(p.port, &post_len(1025)).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    let r = raw(p.port, &post_len(64 * 1024)).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert_eq!(
        origin.hits(),
        hits,
        "the origin must not see a request whose declared body is too large"
    );

    // Chunked, too large only once streamed (after the origin got the first chunk), and
    // chunked with a first chunk that is already too large.
    let r = raw(p.port, &post_chunked(8, 1000)).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}\n{}", p.log_text());
    let r = raw(p.port, &post_chunked(1, 4096)).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}\n{}", p.log_text());

    // The same through a streaming client body with no declared length.
    let chunks: Vec<Result<Bytes, Infallible>> =
        (0..16).map(|_| Ok(Bytes::from(vec![b'c'; 4096]))).collect();
    let r = client()
        .post(p.url("/upload"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 413),
        // The proxy may answer and close before the whole body is sent; that is allowed, but
        // only if it answered 413, which the raw checks above already pin down.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------

/// An origin answering with the request it received (method, path, version, headers as
/// name → list of values) as JSON.
async fn header_echo() -> Origin {
    Origin::start(|req| async move {
        let mut headers = serde_json::Map::new();
        for (k, v) in req.headers() {
            let e = headers
                .entry(k.as_str())
                .or_insert_with(|| Value::Array(vec![]));
            e.as_array_mut()
                .unwrap()
                .push(Value::String(v.to_str().unwrap_or("<binary>").to_string()));
        }
        let doc = serde_json::json!({
            "path": req.uri().path(),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        hyper::Response::new(Full::new(Bytes::from(doc.to_string())))
    })
    .await
}

/// Sends a raw request (with `Connection: close`) and returns the response head and the
/// origin's JSON echo.
async fn raw_echo(port: u16, request: &str) -> (String, Value) {
    let r = raw(port, request.as_bytes()).await;
    let (head, body) = r
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response: {r}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{r}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (head.to_string(), v)
}

/// The single value of a header the origin saw, or None.
fn seen(v: &Value, name: &str) -> Option<String> {
    let a = v["headers"].get(name)?.as_array()?;
    assert_eq!(a.len(), 1, "{name} seen more than once: {a:?}");
    Some(a[0].as_str().unwrap().to_string())
}

fn response_header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

const SPOOFING_REQUEST: &str = "GET /plain/x HTTP/1.1\r\n\
Host: App.Test:8080\r\n\
Connection: close, X-Hop-Custom\r\n\
X-Hop-Custom: secret\r\n\
Keep-Alive: timeout=5\r\n\
Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
Proxy-Connection: keep-alive\r\n\
TE: trailers\r\n\
Trailer: X-Checksum\r\n\
X-Forwarded-For: 6.6.6.6\r\n\
X-Forwarded-Proto: https\r\n\
X-Forwarded-Host: evil.test\r\n\
X-Request-Id: client-supplied-id\r\n\
X-Keep-Me: yes\r\n\
\r\n";

fn headers_yaml(origin: &Origin, trusted: bool) -> String {
    format!(
        "{}{}backends:\n  - {{ name: plain, servers: [{{ address: \"{o}\" }}] }}\n  - {{ name: internal, host: internal.example, servers: [{{ address: \"{o}\" }}] }}\nroutes:\n  - {{ name: plain, match: {{ path_prefix: /plain }}, backend: plain, public: true }}\n  - {{ name: internal, match: {{ path_prefix: /internal }}, backend: internal, public: true }}\n",
        listener_yaml(),
        if trusted { "trusted_proxies: [\"127.0.0.1/32\"]\n" } else { "" },
        o = origin.address()
    )
}

/// Hop-by-hop headers (including ones the client lists in Connection) never reach the origin;
/// X-Forwarded-For/Proto/Host and X-Request-Id are set by the proxy, and client-supplied ones
/// from an untrusted peer are replaced; Host is kept unless the backend sets `host`.
#[tokio::test]
async fn headers_from_an_untrusted_client() {
    let origin = header_echo().await;
    let p = Proxy::start(&headers_yaml(&origin, false)).await;

    let (head, v) = raw_echo(p.port, SPOOFING_REQUEST).await;
    assert_eq!(v["path"], "/plain/x");
    for h in [
        "connection",
        "x-hop-custom",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(
            v["headers"].get(h).is_none(),
            "hop-by-hop header `{h}` reached the origin: {v}"
        );
    }
    assert_eq!(seen(&v, "x-keep-me").as_deref(), Some("yes"));
    assert_eq!(
        seen(&v, "host").as_deref(),
        Some("app.test:8080"),
        "Host is forwarded in its canonical form (lower case, port kept)"
    );
    assert_eq!(
        seen(&v, "x-forwarded-for").as_deref(),
        Some("127.0.0.1"),
        "spoofed XFF replaced"
    );
    assert_eq!(seen(&v, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        seen(&v, "x-forwarded-host").as_deref(),
        Some("app.test:8080")
    );
    let rid = seen(&v, "x-request-id").unwrap();
    assert_ne!(
        rid, "client-supplied-id",
        "an untrusted client's X-Request-Id is replaced"
    );
    assert!(
        rid.len() >= 16 && rid.bytes().all(|b| b.is_ascii_graphic()),
        "{rid}"
    );
    assert_eq!(
        response_header(&head, "x-request-id").as_deref(),
        Some(rid.as_str()),
        "{head}"
    );

    // No X-Request-Id from the client: one is generated, unique per request.
    let plain = "GET /plain/y HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";
    let (head1, v1) = raw_echo(p.port, plain).await;
    let (_, v2) = raw_echo(p.port, plain).await;
    let rid1 = seen(&v1, "x-request-id").expect("generated request id");
    assert_eq!(
        response_header(&head1, "x-request-id").as_deref(),
        Some(rid1.as_str())
    );
    assert_ne!(Some(rid1), seen(&v2, "x-request-id"));
    assert_eq!(seen(&v1, "x-forwarded-host").as_deref(), Some("app.test"));

    // Backend `host:` rewrites Host; X-Forwarded-Host keeps the client's.
    let (_, v) = raw_echo(
        p.port,
        "GET /internal/z HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(seen(&v, "host").as_deref(), Some("internal.example"));
    assert_eq!(seen(&v, "x-forwarded-host").as_deref(), Some("app.test"));
}

/// From a peer in `trusted_proxies`, X-Forwarded-For is appended to, X-Forwarded-Proto/Host
/// and a valid X-Request-Id are propagated; hop-by-hop headers are still removed.
#[tokio::test]
async fn headers_from_a_trusted_proxy() {
    let origin = header_echo().await;
    let p = Proxy::start(&headers_yaml(&origin, true)).await;

    let (head, v) = raw_echo(p.port, SPOOFING_REQUEST).await;
    for h in [
        "connection",
        "x-hop-custom",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            v["headers"].get(h).is_none(),
            "hop-by-hop header `{h}` reached the origin: {v}"
        );
    }
    assert_eq!(
        seen(&v, "x-forwarded-for").as_deref(),
        Some("6.6.6.6, 127.0.0.1")
    );
    assert_eq!(seen(&v, "x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(seen(&v, "x-forwarded-host").as_deref(), Some("evil.test"));
    assert_eq!(
        seen(&v, "x-request-id").as_deref(),
        Some("client-supplied-id")
    );
    assert_eq!(
        response_header(&head, "x-request-id").as_deref(),
        Some("client-supplied-id")
    );

    // Without a client XFF, the trusted peer's address is the whole chain.
    let (_, v) = raw_echo(
        p.port,
        "GET /plain/y HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(seen(&v, "x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(seen(&v, "x-forwarded-proto").as_deref(), Some("http"));
    assert!(seen(&v, "x-request-id").is_some_and(|r| !r.is_empty()));
}

/// A WebSocket echo origin on a loopback port.
async fn ws_echo_origin() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Whether `ws` still echoes a message (false once the tunnel is closed).
async fn echoes(ws: &mut Ws) -> bool {
    if ws.send(Message::text("ping")).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ws.next()).await,
        Ok(Some(Ok(m))) if m == Message::text("ping")
    )
}

/// Tunnels get the listener's grace period, and no more: on SIGTERM an open WebSocket keeps
/// working through the drain (it was cut at once before) and is closed when `shutdown_grace`
/// ends; on a reload that removes its listener, the tunnel and a request still in flight on
/// that listener are closed when the grace ends (they went on, under the old config, for as
/// long as they lasted).
#[tokio::test]
async fn tunnels_and_connections_last_their_listeners_grace_and_no_longer() {
    let (ws_addr, _ws) = ws_echo_origin().await;
    let slow = Origin::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(8)).await;
        Response::new(Full::new(Bytes::from("late")))
    })
    .await;
    let extra = free_port();
    let yaml = |listeners: &str| {
        format!(
            "shutdown_grace: 1500ms\nlisteners:\n{listeners}backends:\n  - {{ name: ws, servers: [{{ address: \"{ws_addr}\" }}] }}\n  - {{ name: slow, servers: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: ws, match: {{ path_prefix: /ws }}, backend: ws, public: true }}\n  - {{ name: slow, match: {{ path_prefix: /slow }}, backend: slow, public: true }}\n",
            slow.address()
        )
    };
    let both = format!(
        "  - {{ name: web, bind: \"127.0.0.1:{{port}}\" }}\n  - {{ name: extra, bind: \"127.0.0.1:{extra}\" }}\n"
    );
    let mut p = Proxy::start(&yaml(&both)).await;
    let web = p.port;
    let connect = |port: u16| async move {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws/x"))
            .await
            .expect("websocket through the proxy");
        ws
    };

    // A reload removes `extra`: its tunnel and its slow request end with its grace.
    let mut on_extra = connect(extra).await;
    assert!(echoes(&mut on_extra).await);
    let url = format!("http://127.0.0.1:{extra}/slow");
    let in_flight = tokio::spawn(async move { client().get(url).send().await });
    assert!(eventually(Duration::from_secs(5), || async { slow.hits() == 1 }).await);
    p.write_config(&yaml("  - { name: web, bind: \"127.0.0.1:{port}\" }\n"));
    let (status, body) = p.admin(reqwest::Method::POST, "/api/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let removed = Instant::now();
    assert!(echoes(&mut on_extra).await, "cut before the grace ended");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        !echoes(&mut on_extra).await,
        "the removed listener's tunnel outlived its grace"
    );
    let r = tokio::time::timeout(Duration::from_secs(3), in_flight)
        .await
        .expect("the removed listener's request outlived its grace")
        .unwrap();
    assert!(r.is_err(), "{r:?}");
    assert!(removed.elapsed() < Duration::from_secs(6));

    // SIGTERM: the tunnel on `web` works through the drain, then ends with the grace.
    let mut on_web = connect(web).await;
    assert!(echoes(&mut on_web).await);
    let sent = Instant::now();
    p.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        echoes(&mut on_web).await,
        "the tunnel was cut at once on SIGTERM"
    );
    let code = loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            break st;
        }
        assert!(sent.elapsed() < Duration::from_secs(6), "{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        sent.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(code.code(), Some(0), "{}", p.log_text());
}

/// portcullis's own answers to HEAD (a 404, a 400) carry no content on h2 either: as DATA
/// frames, clients reset the stream (`PROTOCOL_ERROR`) instead of reading the status. The
/// `Content-Length` is what GET gets.
#[tokio::test]
async fn local_answers_to_head_over_h2_have_no_content() {
    let p = Proxy::start(
        "listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]\n\
         backends: [{ name: echo, servers: [{ address: builtin:echo }] }]\n\
         routes: [{ name: app, match: { host: app.test }, backend: echo, public: true }]\n",
    )
    .await;
    let tcp = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for (target, status) in [
        ("http://nowhere.test/x", 404),
        ("http://app.test/a/%2e%2e%2f", 400),
    ] {
        let mut lengths = Vec::new();
        for method in [hyper::Method::GET, hyper::Method::HEAD] {
            let req = Request::builder()
                .method(method.clone())
                .uri(target)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = send.send_request(req).await.unwrap();
            assert_eq!(r.status().as_u16(), status, "{method} {target}");
            let len = r.headers().get("content-length").cloned();
            let body = r.into_body().collect().await;
            let body = body.unwrap_or_else(|e| panic!("{method} {target}: {e}"));
            if method == hyper::Method::HEAD {
                assert!(body.to_bytes().is_empty(), "{target}: content on HEAD");
            } else {
                assert!(!body.to_bytes().is_empty(), "{target}");
            }
            lengths.push(len);
        }
        assert_eq!(lengths[0], lengths[1], "{target}: content-length");
        assert!(lengths[0].is_some(), "{target}");
    }
}

/// A WebSocket tunnel is still a client connection for its listener's `max_connections`:
/// with `max_connections: 1` and a tunnel open, the next client waits until it closes.
#[tokio::test]
async fn a_tunnel_counts_against_its_listeners_max_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() || ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let p = Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\", max_connections: 1 }}]\n\
         backends:\n  - {{ name: ws, servers: [{{ address: \"{origin_addr}\" }}] }}\n\
         routes:\n  - {{ name: ws, match: {{ path_prefix: / }}, backend: ws, public: true }}\n"
    ))
    .await;
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", p.port)),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake");
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    // The tunnel is open: a second client is not served...
    let second = tokio::spawn(tokio_tungstenite::connect_async(format!(
        "ws://127.0.0.1:{}/ws",
        p.port
    )));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !second.is_finished(),
        "a second connection was served while the tunnel held the only slot"
    );
    // ... until the tunnel closes.
    ws.close(None).await.unwrap();
    drop(ws);
    let (mut ws2, _) = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("served once the tunnel closed")
        .unwrap()
        .expect("handshake");
    ws2.send(Message::text("again")).await.unwrap();
    assert_eq!(ws2.next().await.unwrap().unwrap(), Message::text("again"));
}
