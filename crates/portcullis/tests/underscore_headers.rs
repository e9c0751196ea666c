//! Header names with an underscore (`Transfer_Encoding`, `Content_Length`, `X_Portcullis_User`)
//! or other punctuation (`X.Portcullis.User`, which lighttpd's CGI gateways read alike)
//! never reach an origin through a listener with the default `underscores_in_headers: drop`,
//! over HTTP/1.1 or h2: CGI-style origin frameworks would read them as `Transfer-Encoding`,
//! `Content-Length` and portcullis's own identity header. `reject` answers 400, and `allow`
//! forwards them, less those that read as a field portcullis owns (framing, forwarded
//! headers, method overrides, identity headers) or as a field of the request it forwards.
mod common;
use common::*;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

/// An origin that answers with the header names it received (lower case, as hyper reads
/// them) and the length of the body.
async fn names_echo() -> Origin {
    Origin::start(|req| async move {
        let names: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let doc = serde_json::json!({ "names": names, "body": body.len() });
        hyper::Response::new(Full::new(Bytes::from(doc.to_string())))
    })
    .await
}

/// Three listeners, one per rule: `drop` (the default, on `{port}`), `reject` and `allow`.
async fn start(origin: &Origin) -> (Proxy, u16, u16) {
    let (reject, allow) = (free_port(), free_port());
    let p = Proxy::start(&format!(
        "listeners:\n\
         \x20 - {{ name: web, bind: \"127.0.0.1:{{port}}\" }}\n\
         \x20 - {{ name: strict, bind: \"127.0.0.1:{reject}\", underscores_in_headers: reject }}\n\
         \x20 - {{ name: lax, bind: \"127.0.0.1:{allow}\", underscores_in_headers: allow }}\n\
         backends:\n  - {{ name: app, servers: [{{ address: \"{}\" }}] }}\n\
         routes:\n  - {{ name: app, match: {{ path_prefix: / }}, backend: app, public: true }}\n",
        origin.address()
    ))
    .await;
    (p, reject, allow)
}

/// An HTTP/1.1 request whose fields hyper reads as they are written, case and all.
const H1: &str = "POST /echo HTTP/1.1\r\n\
Host: app.test\r\n\
Transfer_Encoding: chunked\r\n\
Content_Length: 0\r\n\
X_Portcullis_User: admin\r\n\
X_Forwarded_For: 6.6.6.6\r\n\
X_HTTP_Method_Override: DELETE\r\n\
X_Kept: 2\r\n\
X_Custom: 1\r\n\
X.Portcullis.User: admin\r\n\
X~Forwarded~For: 6.6.6.6\r\n\
X.API.Key: stolen\r\n\
Front_End_Https: on\r\n\
X.Url.Scheme: https\r\n\
X!Kept: 3\r\n\
X.Custom.Dot: 1\r\n\
X-Kept: 1\r\n\
Content-Length: 5\r\n\
Connection: close\r\n\
\r\n\
hello";

/// The status and, for a 200, the origin's echo.
async fn h1(port: u16) -> (u16, Value) {
    let r = raw(port, H1.as_bytes()).await;
    let (head, body) = r
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response: {r}"));
    let status: u16 = head[9..12].parse().unwrap();
    let echo = if status == 200 {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    } else {
        Value::String(body.to_string())
    };
    (status, echo)
}

/// The same request over h2 (prior knowledge): names are lower case there.
async fn h2(port: u16) -> (u16, Value) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::post(format!("http://app.test:{port}/echo"))
        .header("transfer_encoding", "chunked")
        .header("content_length", "0")
        .header("x_portcullis_user", "admin")
        .header("x_forwarded_for", "6.6.6.6")
        .header("x_http_method_override", "DELETE")
        .header("x_kept", "2")
        .header("x_custom", "1")
        .header("x.portcullis.user", "admin")
        .header("x~forwarded~for", "6.6.6.6")
        .header("x.api.key", "stolen")
        .header("front_end_https", "on")
        .header("x.url.scheme", "https")
        .header("x!kept", "3")
        .header("x.custom.dot", "1")
        .header("x-kept", "1")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    let echo = if status == 200 {
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    } else {
        Value::String(body)
    };
    (status, echo)
}

fn names(echo: &Value) -> Vec<&str> {
    echo["names"]
        .as_array()
        .unwrap_or_else(|| panic!("{echo}"))
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn header_names_with_underscores_never_reach_the_origin_by_default() {
    let origin = names_echo().await;
    let (p, _, _) = start(&origin).await;
    for (proto, (status, echo)) in [("HTTP/1.1", h1(p.port).await), ("h2", h2(p.port).await)] {
        assert_eq!(status, 200, "{proto}: {echo}\n{}", p.log_text());
        let seen = names(&echo);
        // Nor any other punctuation, which lighttpd's CGI gateways read as `_` too.
        assert!(
            seen.iter()
                .all(|n| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')),
            "{proto}: the origin saw {seen:?}"
        );
        assert!(seen.contains(&"x-kept"), "{proto}: {seen:?}");
        assert!(!seen.contains(&"x-portcullis-user"), "{proto}: {seen:?}");
        // The body is framed by the real Content-Length (or h2's DATA), nothing else.
        assert_eq!(echo["body"], 5, "{proto}: {echo}");
    }
}

#[tokio::test]
async fn reject_answers_400_and_allow_forwards_all_but_lookalikes_of_owned_fields() {
    let origin = names_echo().await;
    let (p, reject, allow) = start(&origin).await;
    for (proto, (status, body)) in [("HTTP/1.1", h1(reject).await), ("h2", h2(reject).await)] {
        assert_eq!(status, 400, "{proto}: {body}");
        assert_eq!(
            body, "header names with an underscore or other punctuation are not accepted\n",
            "{proto}"
        );
    }
    assert_eq!(origin.hits(), 0);
    let (_, metrics) = p.admin(reqwest::Method::GET, "/metrics", None).await;
    assert!(
        metrics.contains(
            "portcullis_requests_refused_total{listener=\"strict\",reason=\"underscore_header\"} 2"
        ),
        "{metrics}"
    );

    for (proto, (status, echo)) in [("HTTP/1.1", h1(allow).await), ("h2", h2(allow).await)] {
        assert_eq!(status, 200, "{proto}: {echo}");
        let seen = names(&echo);
        for n in ["x_custom", "x.custom.dot", "x-kept", "x-forwarded-for"] {
            assert!(seen.contains(&n), "{proto}: {n} not in {seen:?}");
        }
        // What reads as a field portcullis frames the request by, sets or removes goes
        // whatever the rule, and so does what reads as a field the request already has.
        for n in [
            "transfer_encoding",
            "content_length",
            "x_portcullis_user",
            "x-portcullis-user",
            "x_forwarded_for",
            "x_http_method_override",
            "x_kept",
            "x.portcullis.user",
            "x~forwarded~for",
            "x.api.key",
            // Claims of how the request came in (CodeIgniter reads `HTTP_FRONT_END_HTTPS`).
            "front_end_https",
            "x.url.scheme",
            "x!kept",
        ] {
            assert!(!seen.contains(&n), "{proto}: {n} in {seen:?}");
        }
        assert_eq!(echo["body"], 5, "{proto}: {echo}");
    }
}
