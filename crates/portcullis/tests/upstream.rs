//! The HTTP/1.1 client to origins, against origins on real TCP sockets that answer with
//! hand-picked bytes (a well-behaved HTTP library cannot send the malformed or unusual
//! framings these tests need): chunked bodies with trailers, bodies delimited by close,
//! HTTP/1.0, interim 1xx responses, connection reuse, origins that close idle connections,
//! and responses whose framing is ambiguous.

mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a scripted origin does with one request.
struct Reply {
    bytes: Vec<u8>,
    /// Close the connection right after the reply.
    close: bool,
    /// Close the connection this long after the reply, if no request came meanwhile.
    close_idle_after: Option<Duration>,
}

fn reply(bytes: &str) -> Reply {
    Reply {
        bytes: bytes.as_bytes().to_vec(),
        close: false,
        close_idle_after: None,
    }
}

/// A TCP origin that reads request heads (and Content-Length bodies) and answers each with
/// `script(path, body)`. Counts the connections it accepted.
struct RawOrigin {
    addr: String,
    conns: Arc<AtomicUsize>,
}

impl RawOrigin {
    async fn start(script: fn(&str, &[u8]) -> Reply) -> RawOrigin {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut idle_limit: Option<Duration> = None;
                    loop {
                        // Read one request head and its body.
                        let (path, body_start, length) = loop {
                            let mut headers = [httparse::EMPTY_HEADER; 64];
                            let mut req = httparse::Request::new(&mut headers);
                            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                                let len = req
                                    .headers
                                    .iter()
                                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                                    .unwrap_or(0usize);
                                break (req.path.unwrap_or("/").to_string(), n, len);
                            }
                            let mut chunk = [0u8; 4096];
                            let read = match idle_limit {
                                Some(d) => {
                                    match tokio::time::timeout(d, s.read(&mut chunk)).await {
                                        Ok(r) => r,
                                        Err(_) => return, // idle: close
                                    }
                                }
                                None => s.read(&mut chunk).await,
                            };
                            match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        while buf.len() < body_start + length {
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body = buf[body_start..body_start + length].to_vec();
                        buf.drain(..body_start + length);
                        let r = script(&path, &body);
                        if s.write_all(&r.bytes).await.is_err() || r.close {
                            return;
                        }
                        idle_limit = r.close_idle_after;
                    }
                });
            }
        });
        RawOrigin { addr, conns }
    }
}

async fn proxy_to(origin: &RawOrigin) -> Proxy {
    proxy_to_addr(&origin.addr).await
}

async fn proxy_to_addr(addr: &str) -> Proxy {
    proxy_with_route_keys(addr, "").await
}

/// A proxy with one public route to `addr`, with `route_keys` (YAML lines, indented four
/// spaces) added to the route.
async fn proxy_with_route_keys(addr: &str, route_keys: &str) -> Proxy {
    Proxy::start(&format!(
        r#"
listeners:
  - name: web
    bind: "127.0.0.1:{{port}}"
backends:
  - name: raw
    servers:
      - {{ name: r1, address: "{}" }}
    retries: {{ attempts: 0 }}
routes:
  - name: all
    match: {{ path_prefix: / }}
    backend: raw
    public: true
{route_keys}"#,
        addr
    ))
    .await
}

fn framings(path: &str, body: &[u8]) -> Reply {
    match path {
        "/chunked" => reply(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n\
             5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n",
        ),
        "/close" => Reply {
            close: true,
            ..reply("HTTP/1.1 200 OK\r\nX-Kind: close\r\n\r\nuntil the end")
        },
        "/http10" => Reply {
            close: true,
            ..reply("HTTP/1.0 200 OK\r\n\r\nold style")
        },
        "/interim" => reply(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
        ),
        "/hop" => reply(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\n\
             X-Hop: secret\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
        ),
        "/no-content" => reply("HTTP/1.1 204 No Content\r\n\r\n"),
        "/no-content-with-body" => {
            reply("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nstray")
        }
        "/echo-body" => Reply {
            bytes: [
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
                body,
            ]
            .concat(),
            close: false,
            close_idle_after: None,
        },
        _ => reply("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain"),
    }
}

#[tokio::test]
async fn origin_framings_reach_the_client_intact() {
    let origin = RawOrigin::start(framings).await;
    let p = proxy_to(&origin).await;
    let c = client();

    let r = c.get(p.url("/chunked")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-kind"], "chunked");
    assert_eq!(r.text().await.unwrap(), "hello world");

    let r = c.get(p.url("/close")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "until the end");
    let r = c.get(p.url("/http10")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "old style");

    // Interim responses are skipped; the final one is passed on.
    let r = c.get(p.url("/interim")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "final");

    // Hop-by-hop fields, and those the Connection header names, stay at the proxy.
    let r = c.get(p.url("/hop")).send().await.unwrap();
    assert!(r.headers().get("x-hop").is_none(), "{:?}", r.headers());
    assert!(r.headers().get("keep-alive").is_none(), "{:?}", r.headers());
    assert_eq!(r.headers()["x-kept"], "yes");

    let r = c.get(p.url("/no-content")).send().await.unwrap();
    assert_eq!(r.status(), 204);

    // A HEAD response announces a length but carries no body.
    let r = c.head(p.url("/plain")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "5");

    // A request body with a length reaches the origin as sent.
    let r = c
        .post(p.url("/echo-body"))
        .body("sized body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "sized body");
}

/// An origin for one chunked upload: reads until the request's last chunk and its trailer
/// section have arrived, hands the raw bytes to the test, and answers 200 `ok`.
async fn capture_chunked_upload() -> (RawOrigin, tokio::sync::oneshot::Receiver<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        // Done when the body after the head has had its last chunk (`0`) and the trailer
        // section's end (the head alone can end in `0\r\n\r\n`: a request id ending in 0).
        let done = |g: &[u8]| {
            g.windows(4)
                .position(|w| w == b"\r\n\r\n")
                .is_some_and(|h| {
                    let body = &g[h + 4..];
                    let last_chunk =
                        body.starts_with(b"0\r\n") || body.windows(5).any(|w| w == b"\r\n0\r\n");
                    last_chunk && body.ends_with(b"\r\n\r\n")
                })
        };
        while !done(&got) {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
    });
    let origin = RawOrigin {
        addr,
        conns: Arc::new(AtomicUsize::new(0)),
    };
    (origin, rx)
}

#[tokio::test]
async fn chunked_uploads_are_framed_for_the_origin() {
    let (origin, seen) = capture_chunked_upload().await;
    let p = proxy_to(&origin).await;
    let stream = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"streamed ")),
        Ok(bytes::Bytes::from_static(b"body")),
    ]);
    let r = client()
        .post(p.url("/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let seen = seen.await.unwrap();
    assert!(seen.contains("transfer-encoding: chunked\r\n"), "{seen}");
    assert!(!seen.contains("content-length"), "{seen}");
    assert!(
        seen.ends_with("\r\n\r\n9\r\nstreamed \r\n4\r\nbody\r\n0\r\n\r\n"),
        "{seen:?}"
    );
}

/// Trailers reach the origin only on a route that asks for them (`request_trailers`), and
/// never one named like a header that only portcullis sets.
#[tokio::test]
async fn request_trailers_follow_a_chunked_upload() {
    let (origin, seen) = capture_chunked_upload().await;
    let p = proxy_to(&origin).await;
    let resp = raw(
        p.port,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: 7\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = seen.await.unwrap();
    assert!(
        seen.ends_with("5\r\nhello\r\n0\r\n\r\n"),
        "trailers are dropped by default: {seen:?}"
    );

    let (origin, seen) = capture_chunked_upload().await;
    let p = proxy_with_route_keys(&origin.addr, "    request_trailers: true\n").await;
    let resp = raw(
        p.port,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Checksum: 7\r\nX-Portcullis-Assertion: forged\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = seen.await.unwrap();
    assert!(seen.contains("transfer-encoding: chunked\r\n"), "{seen}");
    assert!(
        seen.ends_with("5\r\nhello\r\n0\r\nx-checksum: 7\r\n\r\n"),
        "the trailer section must reach the origin: {seen:?}"
    );
    assert!(!seen.contains("x-portcullis-assertion"), "{seen:?}");
}

/// An origin that reads each request head, then runs `answer` on the socket.
async fn head_origin<F, Fut>(answer: F) -> String
where
    F: Fn(tokio::net::TcpStream, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let n = loop {
                    let mut headers = [httparse::EMPTY_HEADER; 64];
                    if let Ok(httparse::Status::Complete(n)) =
                        httparse::Request::new(&mut headers).parse(&buf)
                    {
                        break n;
                    }
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                };
                answer(s, buf[n..].to_vec()).await;
            });
        }
    });
    addr
}

/// Sends `POST /up` with a `len`-byte body, written in the background, and returns what the
/// proxy answers within `limit` (the first 4 KiB), or None.
async fn upload(p: &Proxy, len: usize, limit: Duration) -> Option<String> {
    let s = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", p.port))
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let head = format!("POST /up HTTP/1.1\r\nHost: up.test\r\nContent-Length: {len}\r\n\r\n");
    wr.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len());
            if wr.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
        // Keep the write side open until the answer is read.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
        // The rest of a short body.
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), rd.read(&mut chunk)).await
        {
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    writer.abort();
    read.ok()?;
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn an_origin_that_refuses_an_upload_is_answered_at_once() {
    // The origin refuses the body without reading it, and keeps the connection open: the
    // upload can go no further than the socket buffers (a few MiB of the 64 MiB).
    let addr = head_origin(|mut s, _| async move {
        let _ = s
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\nX-From: origin\r\nContent-Length: 9\r\n\r\ntoo large")
            .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(s);
    })
    .await;
    let p = proxy_to_addr(&addr).await;
    let answer = upload(&p, 64 << 20, Duration::from_secs(10))
        .await
        .expect("the origin's refusal reaches the client while the upload is stuck");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("x-from: origin"),
        "{answer}"
    );
    assert!(answer.ends_with("too large"), "{answer}");
}

/// An origin that answers a request with a body from its head alone (a 401, a 413) and
/// keeps the connection open has left the body on it, to be read as its next request. The
/// connection is not reused: a body that spells a request for `/secret` is never what
/// answers the next client.
#[tokio::test]
async fn a_body_an_origin_refused_unread_never_answers_the_next_client() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let (n, method, path) = loop {
                        let mut headers = [httparse::EMPTY_HEADER; 64];
                        let mut req = httparse::Request::new(&mut headers);
                        if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                            break (
                                n,
                                req.method.unwrap().to_string(),
                                req.path.unwrap().to_string(),
                            );
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    };
                    // Only the head is taken: a body stays in `buf`, read as the next request.
                    buf.drain(..n);
                    let answer = if method == "POST" {
                        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 7\r\n\r\nrefused".to_string()
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                            path.len()
                        )
                    };
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let p = proxy_to_addr(&addr).await;
    let c = client();
    for _ in 0..5 {
        let smuggled = "GET /secret HTTP/1.1\r\nHost: a\r\nX-Ignore: ";
        let r = c.post(p.url("/login")).body(smuggled).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = c.get(p.url("/home")).send().await.unwrap();
        assert_eq!(
            r.text().await.unwrap(),
            "/home",
            "the next client got the answer to the refused body"
        );
    }
}

/// An origin's response trailers reach an HTTP/1.1 client that asks for them (`TE:
/// trailers`): `Trailer`, which names them, is end to end and kept.
#[tokio::test]
async fn response_trailers_reach_an_http1_client() {
    let addr = head_origin(|mut s, _| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: 42\r\n\r\n")
            .await;
    })
    .await;
    let p = proxy_to_addr(&addr).await;
    let mut c = tokio::net::TcpStream::connect(format!("127.0.0.1:{}", p.port))
        .await
        .unwrap();
    c.write_all(b"GET /t HTTP/1.1\r\nHost: up.test\r\nTE: trailers\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("x-checksum: 42"), "no trailer: {text}");
}

#[tokio::test]
async fn interim_responses_do_not_stop_an_upload() {
    // `100 Continue` at once, then the whole body is read and counted.
    let addr = head_origin(|mut s, early| async move {
        let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        let mut n = early.len();
        let mut chunk = vec![0u8; 64 * 1024];
        while n < 8 << 20 {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => n += k,
            }
        }
        let body = n.to_string();
        let _ = s
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
    })
    .await;
    let p = proxy_to_addr(&addr).await;
    let answer = upload(&p, 8 << 20, Duration::from_secs(20))
        .await
        .expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&(8 << 20).to_string()), "{answer}");
}

#[tokio::test]
async fn connections_are_reused_and_closed_ones_are_not() {
    let origin = RawOrigin::start(framings).await;
    let p = proxy_to(&origin).await;
    let c = client();
    for _ in 0..20 {
        let r = c.get(p.url("/plain")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "plain");
    }
    assert_eq!(
        origin.conns.load(Ordering::SeqCst),
        1,
        "one pooled connection"
    );
    // A response delimited by close cannot leave its connection for reuse: the first takes
    // the pooled connection, and each one after it needs a new one.
    for _ in 0..3 {
        let r = c.get(p.url("/close")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "until the end");
    }
    assert_eq!(origin.conns.load(Ordering::SeqCst), 3);

    // An origin that closes idle keep-alive connections after 50 ms: the pooled connection
    // is found closed when it is taken, and the next request opens a new one.
    fn closes_idle(_: &str, _: &[u8]) -> Reply {
        Reply {
            close_idle_after: Some(Duration::from_millis(50)),
            ..reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        }
    }
    let origin = RawOrigin::start(closes_idle).await;
    let p = proxy_to(&origin).await;
    for _ in 0..3 {
        let r = c.get(p.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(origin.conns.load(Ordering::SeqCst), 3);
}

/// A GET, HEAD or TRACE with a body gets 400 and reaches no origin: many origins answer such
/// a request without reading its body, then read the body as the next request on the
/// connection (a request portcullis never routed, spelling any identity headers it likes).
/// A route with `get_body: forward` sends it, on a connection that is not reused; so is one
/// after a DELETE with a body, and after a 204 that framed a body nobody reads.
#[tokio::test]
async fn bodies_on_get_are_refused_or_never_share_a_connection() {
    let origin = RawOrigin::start(framings).await;
    let p = proxy_to(&origin).await;
    let smuggled = "GET /admin HTTP/1.1\r\nHost: x\r\nX-User: admin\r\n\r\n";
    for method in ["GET", "HEAD", "TRACE"] {
        let declared = format!(
            "{method} /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{smuggled}",
            smuggled.len()
        );
        let chunked = format!(
            "{method} /echo-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        );
        for req in [declared, chunked] {
            let r = raw(p.port, req.as_bytes()).await;
            assert!(r.starts_with("HTTP/1.1 400"), "{method}: {r}");
        }
    }
    assert_eq!(
        origin.conns.load(Ordering::SeqCst),
        0,
        "nothing reached the origin"
    );
    // No body, said either way: served.
    for req in [
        "GET /plain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        "GET /plain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    ] {
        let r = raw(p.port, req.as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{req}: {r}");
    }
    let c = client();
    let conns = || origin.conns.load(Ordering::SeqCst);
    let plain = || async { c.get(p.url("/plain")).send().await.unwrap().status() };
    assert_eq!(plain().await, 200);
    let before = conns();
    assert_eq!(plain().await, 200);
    assert_eq!(conns(), before, "a plain GET reuses the pooled connection");
    // A DELETE with a body, and a 204 with a body: their connections are not reused.
    let r = c
        .delete(p.url("/echo-body"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "x");
    assert_eq!(plain().await, 200);
    assert_eq!(conns(), before + 1, "not reused after a DELETE with a body");
    let r = c.get(p.url("/no-content-with-body")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(plain().await, 200);
    assert_eq!(
        conns(),
        before + 2,
        "not reused after a 204 that framed a body"
    );

    let p = proxy_with_route_keys(&origin.addr, "    get_body: forward\n").await;
    let r = c
        .get(p.url("/echo-body"))
        .body("query")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "query");
    let before = conns();
    assert_eq!(c.get(p.url("/plain")).send().await.unwrap().status(), 200);
    assert_eq!(conns(), before + 1, "not reused after a GET with a body");
}

#[tokio::test]
async fn ambiguous_or_malformed_origin_responses_fail_closed() {
    fn bad(path: &str, _: &[u8]) -> Reply {
        match path {
            "/both" => reply(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
            "/two-lengths" => {
                reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc")
            }
            "/bad-head" => reply("HTTP/1.1 2000 Weird\r\n\r\n"),
            "/bad-chunk" => reply(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            ),
            "/short" => Reply {
                close: true,
                ..reply("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            },
            _ => reply("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        }
    }
    let origin = RawOrigin::start(bad).await;
    let p = proxy_to(&origin).await;
    let c = client();
    for path in ["/both", "/two-lengths", "/bad-head"] {
        let r = c.get(p.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 502, "{path}");
    }
    // A broken body aborts the response (before or after its head reached the client).
    for path in ["/bad-chunk", "/short"] {
        let complete = match c.get(p.url(path)).send().await {
            Ok(r) => r.text().await.is_ok(),
            Err(_) => false,
        };
        assert!(!complete, "{path} must not look complete");
    }
    // Every failure closed its connection; the origin is still served cleanly.
    let before = origin.conns.load(Ordering::SeqCst);
    let r = c.get(p.url("/fine")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(origin.conns.load(Ordering::SeqCst), before + 1);
}
