//! The `webhook` action: one HTTP/1.1 POST of the firing, as JSON, to the action's URL, with
//! the automation's identity as the proxy's signed assertion.
//!
//! * **Body**: the firing (`trigger`, `principal`, `group`, `cause_event_id`,
//!   `idempotency_key`, the rendered `actions`, …), `Content-Type: application/json`.
//! * **Identity**: `X-Portcullis-Assertion`, the same short-lived ES256 JWT origins get for a
//!   route with `headers.assertion: true`, here with `sub` = the principal
//!   (`Portcullis::Trigger::"<trigger>"`), `user` = the trigger, `provider` =
//!   `automation`, and `aud` = the URL posted to. Receivers verify it against
//!   `/.well-known/portcullis/jwks.json` on any listener.
//! * **Dedup**: `Idempotency-Key` is the firing's key plus the action's place, the same on a
//!   retry by hand.
//! * **Delivery**: one attempt, with a 10 s timeout; a 2xx is success, anything else fails
//!   the action (and is audited so). For at-least-once delivery with retries and an outbox,
//!   use an `events:` webhook sink subscribed to `dev.portcullis.automation.action`.
//!   `https://` URLs are verified against the Mozilla root set.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, USER_AGENT};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// How long one POST may take, from connect to the response head.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// POSTs `body` (JSON) to `url` with `headers`; the response status, or why there is none.
pub async fn post(
    url: &str,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<u16, String> {
    request(http::Method::POST, url, headers, body, timeout, 0)
        .await
        .map(|(status, _)| status)
}

/// One HTTP/1.1 request with a JSON body (or none, when empty); the status and up to
/// `max_body` bytes of the response's body. Used by workflows' `portcullis:http` tasks too.
pub async fn request(
    method: http::Method,
    url: &str,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Vec<u8>,
    timeout: Duration,
    max_body: usize,
) -> Result<(u16, Bytes), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{}` is not a URL: {e}", portcullis_config::redact_url(url)))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "`{}` is not an http(s) URL",
                portcullis_config::redact_url(url)
            ))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("`{}` has no host", portcullis_config::redact_url(url)))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let authority = uri
        .authority()
        .map_or_else(|| host.clone(), |a| a.as_str().to_string());
    let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut builder = http::Request::builder()
        .method(method)
        .uri(target)
        .header(HOST, authority)
        .header(USER_AGENT, "portcullis-automation");
    if !body.is_empty() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let mut req = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("request: {e}"))?;
    for (k, v) in headers {
        req.headers_mut().insert(k, v);
    }
    let fut = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
        if !tls {
            return send(stream, req, max_body).await;
        }
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("TLS server name `{host}`: {e}"))?;
        let s = tokio_rustls::TlsConnector::from(client_config()?)
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake with {host}: {e}"))?;
        send(s, req, max_body).await
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
    }
}

fn client_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let cfg = rustls::ClientConfig::builder_with_provider(crate::edge::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

async fn send<T>(
    io: T,
    req: http::Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(u16, Bytes), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let c = tokio::spawn(conn);
    let method = req.method().clone();
    let r = s
        .send_request(req)
        .await
        .map_err(|e| format!("{method}: {e}"));
    let out = match r {
        Ok(resp) if max_body > 0 => {
            let status = resp.status().as_u16();
            let limited = http_body_util::Limited::new(resp.into_body(), max_body);
            match limited.collect().await {
                Ok(b) => Ok((status, b.to_bytes())),
                Err(e) => Err(format!("reading the response body: {e}")),
            }
        }
        Ok(resp) => Ok((resp.status().as_u16(), Bytes::new())),
        Err(e) => Err(e),
    };
    c.abort();
    out
}
