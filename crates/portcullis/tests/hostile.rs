//! Hostile clients, on raw TCP: request smuggling shapes, malformed requests, oversized heads
//! and bodies, slowloris, idle connections and a flood of garbage. Each case gets the right
//! status (or a closed connection), never reaches the origin, and never panics the proxy.
mod common;
use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = "\
listeners:
  - name: web
    bind: \"127.0.0.1:{port}\"
    max_header_size: 8KiB
    max_headers: 30
    timeouts: { client_header: CLIENT_HEADER, idle: IDLE }
backends:
  - { name: b, servers: [{ name: s1, address: \"ADDR\" }] }
routes:
  - { name: r, match: { path_prefix: /app }, backend: b, max_body_size: 1KiB, public: true }
  - { name: only-good, match: { host: good.example, path_prefix: /good }, backend: b, public: true }
";

async fn setup_with(client_header: &str, idle: &str) -> (Origin, Proxy) {
    // Reads the whole request body before answering, as most origins do.
    let o = Origin::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let _ = req.into_body().collect().await;
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("origin")))
    })
    .await;
    let yaml = CONFIG
        .replace("ADDR", &o.address())
        .replace("CLIENT_HEADER", client_header)
        .replace("IDLE", idle);
    let p = Proxy::start(&yaml).await;
    (o, p)
}

async fn setup() -> (Origin, Proxy) {
    setup_with("1s", "2s").await
}

/// The status code of a raw HTTP/1.1 response, or 0 when the connection closed without one.
fn status_of(resp: &str) -> u16 {
    resp.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sends `req` on a new connection and expects `status` without the origin being reached.
async fn expect_refused(p: &Proxy, o: &Origin, name: &str, req: &[u8], status: u16) -> String {
    let before = o.hits();
    let resp = raw(p.port, req).await;
    assert_eq!(status_of(&resp), status, "{name}: got\n{resp}");
    assert_eq!(o.hits(), before, "{name}: the origin was reached");
    resp
}

/// The proxy still answers a normal request, and nothing panicked.
async fn still_healthy(p: &Proxy, o: &Origin) {
    let before = o.hits();
    let resp = raw(
        p.port,
        b"GET /app HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert!(resp.ends_with("origin"), "{resp}");
    assert_eq!(o.hits(), before + 1);
    let log = p.log_text();
    assert!(!log.contains("panicked"), "the proxy panicked:\n{log}");
}

#[tokio::test]
async fn framing_attacks_get_400_and_never_reach_the_origin() {
    let (o, p) = setup().await;
    // Sanity: the same shape of request, well-formed, reaches the origin.
    still_healthy(&p, &o).await;

    expect_refused(
        &p,
        &o,
        "two different Content-Length values",
        b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "Content-Length list",
        b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "invalid chunk size",
        b"POST /app HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "chunked not last",
        b"POST /app HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    )
    .await;
    still_healthy(&p, &o).await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_gets_400() {
    let (o, p) = setup().await;
    expect_refused(
        &p,
        &o,
        "Content-Length with Transfer-Encoding",
        b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "Transfer-Encoding with Content-Length",
        b"POST /app HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
    )
    .await;
    still_healthy(&p, &o).await;
}

/// The classic CL.TE and TE.CL shapes: the first request is refused, and the request hidden
/// behind it is never parsed as a request of its own.
#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle() {
    let (o, p) = setup().await;
    let inner = "GET /app/smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\nx=1";
    let te_cl = format!(
        "POST /app HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
        inner.len()
    );
    for (name, req) in [
        (
            "CL.TE",
            &b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /app/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        ),
        ("TE.CL", te_cl.as_bytes()),
    ] {
        let before = o.hits();
        let resp = raw(p.port, req).await;
        let answers = resp.matches("HTTP/1.1 ").count();
        assert_eq!(answers, 1, "{name}: expected exactly one response:\n{resp}");
        assert_eq!(status_of(&resp), 400, "{name}:\n{resp}");
        assert_eq!(o.hits(), before, "{name}: the origin was reached");
    }
    let log = p.access_log_text();
    assert!(
        !log.contains("/app/smuggled"),
        "a smuggled request was logged:\n{log}"
    );
    still_healthy(&p, &o).await;
}

/// A request the smuggling guard cannot follow past (an upgrade that opens no tunnel, a
/// CONNECT) is the connection's last: its answer closes it, so a request after it cannot get
/// past the guard (a Content-Length beside chunked would reach the origin) or dribble its
/// head forever (the header timeout lives in the guard too).
#[tokio::test]
async fn a_request_after_an_upgrade_without_a_tunnel_is_never_served() {
    let (o, p) = setup().await;
    let smuggled = "POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    for (name, first, status) in [
        (
            "an upgrade portcullis does not forward",
            "GET /app HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n",
            200,
        ),
        (
            "a WebSocket upgrade the origin refuses",
            "GET /app HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            200,
        ),
        (
            "h2c",
            "GET /app HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
            200,
        ),
        ("CONNECT", "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", 405),
    ] {
        let before = o.hits();
        let resp = raw(p.port, format!("{first}{smuggled}").as_bytes()).await;
        assert_eq!(status_of(&resp), status, "{name}:\n{resp}");
        assert_eq!(
            resp.matches("HTTP/1.1 ").count(),
            1,
            "{name}: the request after it was served:\n{resp}"
        );
        assert!(
            resp.to_ascii_lowercase().contains("connection: close"),
            "{name}:\n{resp}"
        );
        assert_eq!(o.hits(), before + usize::from(status == 200), "{name}");

        // Nor can a slow head follow it: the connection closes after the answer.
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
            .await
            .unwrap();
        s.write_all(first.as_bytes()).await.unwrap();
        s.write_all(b"GET /app HTTP/1.1\r\nHo").await.unwrap();
        let (resp, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert_eq!(status_of(&resp), status, "{name}:\n{resp}");
        assert!(closed.is_some(), "{name}: the connection stayed open");
    }
    still_healthy(&p, &o).await;
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let (o, p) = setup().await;
    expect_refused(&p, &o, "garbage request line", b"GARBAGE\r\n\r\n", 400).await;
    expect_refused(
        &p,
        &o,
        "binary request line",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        400,
    )
    .await;
    expect_refused(&p, &o, "missing Host", b"GET /app HTTP/1.1\r\n\r\n", 400).await;
    expect_refused(
        &p,
        &o,
        "two Host headers",
        b"GET /app HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "Host with a path",
        b"GET /app HTTP/1.1\r\nHost: a.example/evil\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "dot segments",
        b"GET /app/../admin HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "encoded dot segments",
        b"GET /app/%2e%2E/admin HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "a/../b",
        b"GET /a/../b HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "asterisk-form GET",
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "CONNECT tunnel",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
        405,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "authority-form GET",
        b"GET a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
        400,
    )
    .await;
    still_healthy(&p, &o).await;

    // Each refusal is counted by reason; the log names the client once a minute, not per
    // refusal.
    let metrics = client()
        .get(p.admin_url("/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (reason, n) in [("dot_segment", 3), ("connect", 1), ("not_absolute", 2)] {
        let line = format!(
            "portcullis_requests_refused_total{{listener=\"web\",reason=\"{reason}\"}} {n}"
        );
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    let logged = p
        .log_text()
        .lines()
        .filter(|l| l.contains("request refused for its form"))
        .count();
    assert_eq!(logged, 1, "{}", p.log_text());
}

#[tokio::test]
async fn absolute_form_targets_are_routed_by_their_authority() {
    let (o, p) = setup().await;
    // RFC 9112 §3.2.2: the target's authority wins over the Host header.
    expect_refused(
        &p,
        &o,
        "userinfo in the authority",
        b"GET http://user:pw@good.example/good HTTP/1.1\r\nHost: good.example\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "authority with a bad port",
        b"GET http://good.example:99999999/good HTTP/1.1\r\nHost: good.example\r\n\r\n",
        400,
    )
    .await;
    expect_refused(
        &p,
        &o,
        "authority for another host",
        b"GET http://evil.example/good HTTP/1.1\r\nHost: good.example\r\n\r\n",
        404,
    )
    .await;
    // The well-formed version reaches the origin.
    let before = o.hits();
    let resp = raw(
        p.port,
        b"GET http://good.example/good HTTP/1.1\r\nHost: good.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert_eq!(o.hits(), before + 1);
    still_healthy(&p, &o).await;
}

#[tokio::test]
async fn oversized_heads_get_431_and_bodies_413() {
    let (o, p) = setup().await;
    let mut big = b"GET /app HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 12 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    expect_refused(&p, &o, "12KiB header section", &big, 431).await;

    let mut many = b"GET /app HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..60 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    expect_refused(&p, &o, "60 headers", &many, 431).await;

    // Just under the limits still works.
    let mut ok = b"GET /app HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    for i in 0..20 {
        ok.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    ok.extend_from_slice(b"X-Big: ");
    ok.extend(std::iter::repeat_n(b'a', 4 * 1024));
    ok.extend_from_slice(b"\r\n\r\n");
    let before = o.hits();
    let resp = raw(p.port, &ok).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert_eq!(o.hits(), before + 1);

    let mut body = b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'b', 2048));
    let resp = expect_refused(&p, &o, "declared body over max_body_size", &body, 413).await;
    assert!(resp.contains("too large"), "{resp}");

    // A chunked body that grows past the limit is cut off with 413 as well.
    let mut chunked =
        b"POST /app HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend(std::iter::repeat_n(b'c', 0x200));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(p.port, &chunked).await;
    assert_eq!(status_of(&resp), 413, "{resp}");
    // The head of that request did reach the origin; let it settle before counting again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    still_healthy(&p, &o).await;
}

/// Writes `head` and then `body_len` bytes of body in full, and only then reads: what a client
/// without `Expect: 100-continue` does (Python's http.client, many SDKs). Returns whether the
/// whole body could be written, and what was read.
async fn write_all_then_read(port: u16, head: &str, body_len: usize) -> (bool, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut req = head.as_bytes().to_vec();
    req.extend(std::iter::repeat_n(b'u', body_len));
    let wrote = s.write_all(&req).await.is_ok();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    (wrote, String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn an_early_answer_reaches_a_client_that_writes_its_whole_body_first() {
    let (o, p) = setup().await;
    // 8 MiB: far more than the socket buffers hold, so the client is still writing when the
    // proxy answers. Closing with its bytes unread would reset the connection, and the
    // answer with it; the proxy shuts its side and reads on (a lingering close).
    const BIG: usize = 8 << 20;
    for (name, head, status) in [
        (
            "over max_body_size",
            format!("POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: {BIG}\r\n\r\n"),
            413,
        ),
        (
            "no route",
            format!("PUT /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: {BIG}\r\n\r\n"),
            404,
        ),
        (
            "a chunked body on no route",
            "POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800000\r\n"
                .to_string(),
            404,
        ),
    ] {
        let before = o.hits();
        let (wrote, resp) = write_all_then_read(p.port, &head, BIG).await;
        assert!(wrote, "{name}: the client's body was reset");
        assert_eq!(status_of(&resp), status, "{name}: got\n{resp}");
        assert_eq!(o.hits(), before, "{name}: the origin was reached");
    }
    still_healthy(&p, &o).await;
}

#[tokio::test]
async fn unrouted_paths_get_a_short_404() {
    let (o, p) = setup().await;
    let resp = expect_refused(
        &p,
        &o,
        "unrouted",
        b"GET /nothing/here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        404,
    )
    .await;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(body, "no route\n", "{resp}");
    assert!(resp.len() < 512, "{resp}");
    // Route matching is on the host too.
    expect_refused(
        &p,
        &o,
        "wrong host",
        b"GET /good HTTP/1.1\r\nHost: bad.example\r\nConnection: close\r\n\r\n",
        404,
    )
    .await;
    still_healthy(&p, &o).await;
}

/// Reads until the peer closes (or errors). Returns what was read and how long it took.
async fn read_until_closed(
    s: &mut tokio::net::TcpStream,
    limit: Duration,
) -> (String, Option<Duration>) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), None),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    Some(start.elapsed()),
                )
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `head` one byte every 200 ms (for at most 6 s) until the proxy answers or closes.
/// Returns when that happened, after checking that an answer is a 408 followed by a close.
async fn dribble(s: &mut tokio::net::TcpStream, head: &[u8]) -> Option<Duration> {
    let start = Instant::now();
    for b in head {
        if s.write_all(&[*b]).await.is_err() {
            return Some(start.elapsed());
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(n)) if n > 0 => {
                let r = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(
                    r.starts_with("HTTP/1.1 408"),
                    "unexpected answer to a slow client: {r}"
                );
                let (_, c) = read_until_closed(s, Duration::from_secs(2)).await;
                assert!(c.is_some(), "408 but the connection stayed open");
                return Some(start.elapsed());
            }
            Ok(_) => return Some(start.elapsed()),
        }
        if start.elapsed() > Duration::from_secs(6) {
            break;
        }
    }
    None
}

#[tokio::test]
async fn slowloris_is_cut_off_after_client_header_timeout() {
    let (o, p) = setup_with("1s", "30s").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .unwrap();
    // The head would take ~20 s to arrive.
    let head = b"GET /app HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let closed_at = dribble(&mut s, head)
        .await
        .expect("a byte-by-byte client was never cut off");
    assert!(
        closed_at >= Duration::from_millis(800) && closed_at < Duration::from_millis(3000),
        "cut off after {closed_at:?}"
    );
    assert_eq!(o.hits(), 0);
    still_healthy(&p, &o).await;
}

#[tokio::test]
async fn keep_alive_waits_are_not_cut_by_the_header_timeout_but_slow_heads_are() {
    let (o, p) = setup_with("1s", "10s").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .unwrap();
    // Twice: a request, then 2.5 s of silence (longer than client_header, shorter than idle).
    for _ in 0..2 {
        s.write_all(b"GET /app HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    assert_eq!(o.hits(), 2);
    // A third head, dribbled, is cut off about 1 s after its first byte.
    let head = b"GET /app HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let closed_at = dribble(&mut s, head)
        .await
        .expect("a slow later head was never cut off");
    assert!(
        closed_at >= Duration::from_millis(800) && closed_at < Duration::from_millis(3000),
        "cut off after {closed_at:?}"
    );
    assert_eq!(o.hits(), 2);
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_idle_timeout() {
    let (o, p) = setup_with("10s", "1s").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .unwrap();
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(6)).await;
    let closed = closed.unwrap_or_else(|| panic!("a silent connection stayed open; read {got:?}"));
    assert!(
        closed >= Duration::from_millis(800),
        "closed too early: {closed:?}"
    );
    assert!(
        closed < Duration::from_millis(3500),
        "closed only after {closed:?}"
    );

    // An idle keep-alive connection after a response is closed the same way.
    let mut s = kept_alive(p.port, "/app").await;
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(6)).await;
    let closed = closed.expect("an idle keep-alive connection stayed open");
    assert!(
        closed < Duration::from_millis(3500),
        "closed only after {closed:?}"
    );
    assert_eq!(o.hits(), 1);
    still_healthy(&p, &o).await;
}

#[tokio::test]
async fn a_flood_of_garbage_connections_does_not_take_it_down() {
    let (o, p) = setup().await;
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let port = p.port;
        tasks.push(tokio::spawn(async move {
            // xorshift, seeded per connection: reproducible garbage.
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let mut bytes = Vec::with_capacity(2048);
            let len = 64 + (i as usize * 37) % 4000;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            // Some of them look like the start of a request.
            if i % 4 == 0 {
                let mut v = b"POST /app HTTP/1.1\r\nHost: x\r\n".to_vec();
                v.extend(bytes);
                bytes = v;
            }
            let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return;
            };
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(o.hits(), 0, "garbage reached the origin");
    still_healthy(&p, &o).await;
    let (st, _) = p
        .admin(reqwest::Method::GET, "/api/v1/backends", None)
        .await;
    assert_eq!(st, 200);
}

/// A body that trickles in (each piece within `timeouts.client_body`) past the backend's
/// response timeout is the client's delay: 408, and the server is not blamed. Before, the
/// attempt timed out as the server's (504), and a few such clients got a healthy server
/// ejected (here, with `outlier: { consecutive_5xx: 2 }`, the only one).
#[tokio::test]
async fn a_trickling_body_is_the_clients_delay_not_the_servers() {
    let o = Origin::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let _ = req.into_body().collect().await;
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("origin")))
    })
    .await;
    let p = Proxy::start(&format!(
        "listeners:\n  - {{ name: web, bind: \"127.0.0.1:{{port}}\", timeouts: {{ client_body: 5s }} }}\n\
         backends:\n  - name: b\n    timeouts: {{ response: 1s }}\n    outlier: {{ consecutive_5xx: 2, eject_for: 60s }}\n    servers: [{{ name: s1, address: \"{}\" }}]\n\
         routes:\n  - {{ name: r, match: {{ path_prefix: /app }}, backend: b, public: true }}\n",
        o.address()
    ))
    .await;
    let trickle = || async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
            .await
            .unwrap();
        s.write_all(
            b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        // A byte every 300 ms, well within the body timeout, for longer than the response
        // timeout.
        for _ in 0..8 {
            if s.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let (resp, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        status_of(&resp)
    };
    let (a, b, c) = tokio::join!(trickle(), trickle(), trickle());
    assert_eq!([a, b, c], [408, 408, 408]);
    // The server was not blamed: a whole request is served.
    let resp = raw(
        p.port,
        b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
}

/// With an HTTP/2 backend, the request body is sent by the origin connection's own task, and
/// the attempt sees only the stream reset a failed body causes. A body that grows past
/// `max_body_size`, one that stalls past `timeouts.client_body`, and one its client cuts
/// short are still the client's doing: 413 and 408 as with an HTTP/1.1 backend, and the
/// server is not blamed. Before, each was a 502 counted against the server, and three got a
/// healthy server ejected (`outlier: { consecutive_5xx: 2 }`): every client then got 503.
#[tokio::test]
async fn an_h2_backend_is_not_blamed_for_a_body_its_client_spoiled() {
    let origin = Origin::start(|req: hyper::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let n = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes().len())
            .unwrap_or(0);
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(n.to_string())))
    })
    .await;
    let p = Proxy::start(&format!(
        "listeners:\n  - {{ name: web, bind: \"127.0.0.1:{{port}}\", timeouts: {{ client_body: 1s }} }}\n\
         backends:\n  - name: b\n    protocol: http2\n    outlier: {{ consecutive_5xx: 2, eject_for: 60s }}\n    retries: {{ attempts: 0 }}\n    servers: [{{ name: s1, address: \"{}\" }}]\n\
         routes:\n  - {{ name: r, match: {{ path_prefix: /up }}, backend: b, max_body_size: 1KiB, public: true }}\n",
        origin.address()
    ))
    .await;
    // Over the limit only once streamed: the origin has the first chunk by then.
    let too_large = || async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
            .await
            .unwrap();
        let mut req =
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n200\r\n"
                .to_vec();
        req.extend(vec![b'a'; 0x200]);
        req.extend(b"\r\n");
        s.write_all(&req).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut more = b"400\r\n".to_vec();
        more.extend(vec![b'b'; 0x400]);
        more.extend(b"\r\n0\r\n\r\n");
        let _ = s.write_all(&more).await;
        let (resp, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
        status_of(&resp)
    };
    // Ten bytes of a hundred, then nothing.
    let stalled = || async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
            .await
            .unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n0123456789")
            .await
            .unwrap();
        let (resp, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
        status_of(&resp)
    };
    // Ten bytes of a hundred, then the client goes.
    let cut = || async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
            .await
            .unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(s);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for _ in 0..3 {
        assert_eq!(too_large().await, 413, "{}", p.log_text());
    }
    for _ in 0..2 {
        assert_eq!(stalled().await, 408, "{}", p.log_text());
    }
    for _ in 0..3 {
        cut().await;
    }
    let log = p.log_text();
    assert!(!log.contains("ejected"), "{log}");
    // The server still serves, on the connection it had.
    let resp = raw(
        p.port,
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}\n{}", p.log_text());
    assert!(resp.ends_with("\r\n\r\n2"), "{resp}");
}

/// A listener's `max_connections`: at the limit, a new client waits in the kernel's accept
/// queue (it is not refused, and not served) until a connection closes, as with HAProxy's
/// `maxconn`; then it is served.
#[tokio::test]
async fn a_listener_at_max_connections_accepts_the_next_client_when_one_closes() {
    let o = Origin::start(|_req: hyper::Request<hyper::body::Incoming>| async move {
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("origin")))
    })
    .await;
    let yaml = CONFIG
        .replace("ADDR", &o.address())
        .replace("CLIENT_HEADER", "5s")
        .replace("IDLE", "30s")
        .replace(
            "    max_headers: 30\n",
            "    max_headers: 30\n    max_connections: 2\n",
        );
    let p = Proxy::start(&yaml).await;
    let ask = b"GET /app HTTP/1.1\r\nHost: x\r\n\r\n";
    async fn answer(s: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => None,
        }
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
            .await
            .unwrap();
        s.write_all(ask).await.unwrap();
        let got = answer(&mut s, Duration::from_secs(5))
            .await
            .expect("served");
        assert_eq!(status_of(&got), 200, "{got}");
        held.push(s);
    }
    // The third connects (the kernel queues it) but gets no answer while two are open.
    let mut third = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .unwrap();
    third.write_all(ask).await.unwrap();
    assert!(
        answer(&mut third, Duration::from_millis(700))
            .await
            .is_none(),
        "a third connection was served past max_connections: 2"
    );
    drop(held.pop());
    let got = answer(&mut third, Duration::from_secs(5))
        .await
        .expect("served once a connection closed");
    assert_eq!(status_of(&got), 200, "{got}");
}
