//! Request integrity, against the real binary and real TCP origins: what an origin reads in a
//! forwarded request must be exactly what portcullis verified and decided on.
//!
//! Covered: identity headers that carry hostile identities (a group with a comma, a subject
//! with a NUL, edge whitespace or non-ASCII) read plainly by the origin as exactly the verified
//! identity; `Connection` naming identity headers; request trailers named like identity
//! headers; the portcullis cookies on public routes; `max_header_size`; the method-override
//! headers (`strip`, `reject`, `honor`); and upgrades (`h2c`, unlisted protocols, a 101 for
//! another protocol or with a wrong `Sec-WebSocket-Accept`, `upgrades: []`, a real WebSocket).
//!
//! Most origins here are raw TCP servers that record the bytes they receive, so nothing an
//! HTTP library would normalise, merge or drop is hidden from the assertions.
mod common;
use common::*;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An EC P-256 signing key (ES256) and its public JWK.
struct Key {
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

impl Key {
    fn new(kid: &str) -> Key {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw.len(), 65);
        Key {
            kid: kid.to_string(),
            enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65]),
            }),
        }
    }

    fn jwks(&self) -> String {
        json!({ "keys": [self.jwk] }).to_string()
    }

    /// A token for provider `a` (issuer `https://a.test`, audience `api`) with `sub` and
    /// `groups` exactly as given.
    fn token(&self, sub: &str, groups: &[&str]) -> String {
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid });
        let claims = json!({
            "iss": "https://a.test", "aud": "api", "sub": sub, "groups": groups,
            "iat": now(), "exp": now() + 600,
        });
        let msg = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &self.enc, Algorithm::ES256).unwrap();
        format!("{msg}.{sig}")
    }
}

/// The key's JWKS in `{dir}/a.json` of a fresh temp dir, for `Proxy::start_in`.
fn dir_with_jwks(key: &Key) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.json"), key.jwks()).unwrap();
    dir
}

const PROVIDER: &str = r#"
identity:
  providers:
    - { name: a, kind: jwt, issuer: "https://a.test", audiences: [api], jwks_file: "{dir}/a.json" }
"#;

/// Verifies an assertion against the proxy's published keys for route `aud`; its claims.
async fn verify_assertion(p: &Proxy, jwt: &str, aud: &str) -> Value {
    let doc: Value = client()
        .get(p.url("/.well-known/portcullis/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let h = jsonwebtoken::decode_header(jwt).unwrap();
    let jwk = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"].as_str() == h.kid.as_deref())
        .unwrap_or_else(|| panic!("assertion kid {:?} is not published: {doc}", h.kid))
        .clone();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk).unwrap();
    let mut v = Validation::new(h.alg);
    v.set_issuer(&["portcullis"]);
    v.set_audience(&[aud]);
    jsonwebtoken::decode::<Value>(jwt, &DecodingKey::from_jwk(&jwk).unwrap(), &v)
        .unwrap_or_else(|e| panic!("the assertion does not verify for aud {aud}: {e}"))
        .claims
}

// ---------------------------------------------------------------------------------------
// Raw connections
// ---------------------------------------------------------------------------------------

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// A TCP stream with a read buffer, for reading HTTP/1.1 messages by hand.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(s: TcpStream) -> Conn {
        Conn { s, buf: Vec::new() }
    }

    async fn open(port: u16) -> Conn {
        Conn::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap())
    }

    /// Writes, ignoring errors (the peer may already have answered and closed).
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes).await;
    }

    /// Reads more into the buffer; false at the end of the stream (or an error).
    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 16 * 1024];
        match self.s.read(&mut tmp).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    /// Bytes up to and including `pat`.
    async fn until(&mut self, pat: &[u8]) -> Option<Vec<u8>> {
        let mut from = 0;
        loop {
            if let Some(i) = find(&self.buf[from..], pat) {
                let end = from + i + pat.len();
                return Some(self.buf.drain(..end).collect());
            }
            from = self.buf.len().saturating_sub(pat.len() - 1);
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// Everything until the end of the stream.
    async fn rest(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// A chunked body: its data and its raw trailer section (field lines, without the final
    /// empty line).
    async fn chunked(&mut self) -> Option<(Vec<u8>, Vec<u8>)> {
        let (mut body, mut trailers) = (Vec::new(), Vec::new());
        loop {
            let line = self.until(b"\r\n").await?;
            let line = String::from_utf8_lossy(&line);
            let size = line.trim_end().split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).ok()?;
            if size == 0 {
                loop {
                    let l = self.until(b"\r\n").await?;
                    if l == b"\r\n" {
                        return Some((body, trailers));
                    }
                    trailers.extend_from_slice(&l);
                }
            }
            let d = self.exact(size + 2).await?;
            body.extend_from_slice(&d[..size]);
        }
    }

    /// Reads one response (within 10 s); None if the connection ended first.
    async fn response(&mut self) -> Option<Resp> {
        tokio::time::timeout(Duration::from_secs(10), self.response_inner())
            .await
            .unwrap_or(None)
    }

    async fn response_inner(&mut self) -> Option<Resp> {
        let head = self.until(b"\r\n\r\n").await?;
        let status: u16 = String::from_utf8_lossy(&head)
            .split(' ')
            .nth(1)?
            .parse()
            .ok()?;
        let chunked = fields(&head, "transfer-encoding")
            .iter()
            .any(|v| contains(&v.to_ascii_lowercase(), b"chunked"));
        let length = fields(&head, "content-length")
            .first()
            .and_then(|v| String::from_utf8_lossy(v).parse::<usize>().ok());
        let body = if (100..200).contains(&status) || status == 204 || status == 304 {
            Vec::new()
        } else if chunked {
            self.chunked().await?.0
        } else if let Some(n) = length {
            self.exact(n).await?
        } else {
            self.rest().await
        };
        Some(Resp { status, head, body })
    }
}

/// A response read off a raw connection.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: Vec<u8>,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&self.head),
            String::from_utf8_lossy(&self.body)
        )
    }

    fn header(&self, name: &str) -> Option<String> {
        fields(&self.head, name)
            .first()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// One request on a new connection; its response (None if the proxy closed without one).
async fn exchange(port: u16, request: &[u8]) -> Option<Resp> {
    let mut c = Conn::open(port).await;
    c.send(request).await;
    c.response().await
}

/// The values of every field line named `name` (any case) in a raw message head, with the
/// optional whitespace around them removed, as an origin's parser reads them. The first line
/// (the request or status line) is not a field.
fn fields(head: &[u8], name: &str) -> Vec<Vec<u8>> {
    head.split(|&b| b == b'\n')
        .skip(1)
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|&b| b == b':')?;
            if !line[..colon].eq_ignore_ascii_case(name.as_bytes()) {
                return None;
            }
            let mut v = &line[colon + 1..];
            while let [b' ' | b'\t', r @ ..] = v {
                v = r;
            }
            while let [r @ .., b' ' | b'\t'] = v {
                v = r;
            }
            Some(v.to_vec())
        })
        .collect()
}

/// Percent-decodes `v` (None if an escape is malformed).
fn percent_decode(v: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' {
            let hex = std::str::from_utf8(v.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------
// A raw origin
// ---------------------------------------------------------------------------------------

/// A request as the origin received it, byte for byte.
#[derive(Clone, Debug, Default)]
struct Seen {
    head: Vec<u8>,
    body: Vec<u8>,
    /// The raw trailer section of a chunked body (field lines only).
    trailers: Vec<u8>,
}

impl Seen {
    fn method(&self) -> String {
        self.line().split(' ').next().unwrap_or("").to_string()
    }

    fn target(&self) -> String {
        self.line().split(' ').nth(1).unwrap_or("").to_string()
    }

    fn line(&self) -> String {
        let end = find(&self.head, b"\r\n").unwrap_or(self.head.len());
        String::from_utf8_lossy(&self.head[..end]).into_owned()
    }

    fn fields(&self, name: &str) -> Vec<Vec<u8>> {
        fields(&self.head, name)
    }

    /// The single value of header `name` (panics if it is sent more than once).
    fn field(&self, name: &str) -> Option<Vec<u8>> {
        let v = self.fields(name);
        assert!(
            v.len() <= 1,
            "`{name}` reached the origin {} times: {self}",
            v.len()
        );
        v.into_iter().next()
    }

    fn trailer_names(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.trailers)
            .lines()
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(n, _)| n.trim().to_ascii_lowercase())
            })
            .collect()
    }

    /// Every cookie (`name=value`) in every Cookie header line.
    fn cookies(&self) -> Vec<String> {
        self.fields("cookie")
            .iter()
            .flat_map(|v| {
                String::from_utf8_lossy(v)
                    .split(';')
                    .map(|c| c.trim().to_string())
                    .filter(|c| !c.is_empty())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}\n[trailers]\n{}",
            String::from_utf8_lossy(&self.head).escape_debug(),
            String::from_utf8_lossy(&self.body).escape_debug(),
            String::from_utf8_lossy(&self.trailers).escape_debug()
        )
    }
}

/// How a raw origin answers a request that asks for an upgrade.
#[derive(Clone, Copy)]
enum On101 {
    /// 101 naming the protocol asked for, with the right `Sec-WebSocket-Accept`.
    Echo,
    /// 101 naming this protocol instead.
    Fixed(&'static str),
    /// 101 naming the protocol asked for, with a wrong `Sec-WebSocket-Accept`.
    BadAccept,
}

/// A raw TCP origin: reads HTTP/1.1 requests (Content-Length or chunked with trailers), records
/// them as received, and answers `200 ok`; a request with an `Upgrade` header is answered with
/// a 101 (see [`On101`]), after which every byte received is recorded in `tunneled` and echoed
/// back.
struct RawOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    tunneled: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawOrigin {
    async fn start(on101: On101) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let tunneled: Arc<Mutex<Vec<u8>>> = Arc::default();
        let (s2, t2) = (seen.clone(), tunneled.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, tunneled) = (s2.clone(), t2.clone());
                tokio::spawn(async move {
                    Self::serve(Conn::new(s), on101, seen, tunneled).await;
                });
            }
        });
        RawOrigin {
            addr,
            seen,
            tunneled,
            task,
        }
    }

    async fn serve(
        mut c: Conn,
        on101: On101,
        seen: Arc<Mutex<Vec<Seen>>>,
        tunneled: Arc<Mutex<Vec<u8>>>,
    ) {
        loop {
            let Some(head) = c.until(b"\r\n\r\n").await else {
                return;
            };
            let mut req = Seen {
                head,
                ..Seen::default()
            };
            let chunked = req
                .fields("transfer-encoding")
                .iter()
                .any(|v| contains(&v.to_ascii_lowercase(), b"chunked"));
            let length = req
                .fields("content-length")
                .first()
                .and_then(|v| String::from_utf8_lossy(v).parse::<usize>().ok());
            if chunked {
                let Some((body, trailers)) = c.chunked().await else {
                    seen.lock().unwrap().push(req);
                    return;
                };
                req.body = body;
                req.trailers = trailers;
            } else if let Some(n) = length {
                let Some(body) = c.exact(n).await else {
                    seen.lock().unwrap().push(req);
                    return;
                };
                req.body = body;
            }
            let upgrade = req.fields("upgrade").into_iter().next();
            let key = req.fields("sec-websocket-key").into_iter().next();
            seen.lock().unwrap().push(req);
            let Some(upgrade) = upgrade else {
                c.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                continue;
            };
            let asked = String::from_utf8_lossy(&upgrade).into_owned();
            let accept = key.as_deref().map(derive_accept_key);
            let (proto, accept) = match on101 {
                On101::Echo => (asked, accept),
                On101::Fixed(p) => (p.to_string(), accept),
                On101::BadAccept => (asked, Some(derive_accept_key(b"not the client's key"))),
            };
            let mut resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n"
            );
            if let Some(a) = accept {
                resp.push_str(&format!("Sec-WebSocket-Accept: {a}\r\n"));
            }
            resp.push_str("\r\n");
            c.send(resp.as_bytes()).await;
            // The tunnel: record and echo everything.
            let early = std::mem::take(&mut c.buf);
            if !early.is_empty() {
                tunneled.lock().unwrap().extend_from_slice(&early);
                c.send(&early).await;
            }
            while c.fill().await {
                let got = std::mem::take(&mut c.buf);
                tunneled.lock().unwrap().extend_from_slice(&got);
                c.send(&got).await;
            }
            return;
        }
    }

    fn address(&self) -> String {
        self.addr.to_string()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The last request whose target is `target`.
    fn request(&self, target: &str) -> Seen {
        self.seen()
            .into_iter()
            .rev()
            .find(|s| s.target() == target)
            .unwrap_or_else(|| {
                let all: Vec<String> = self.seen().iter().map(|s| s.line()).collect();
                panic!("the origin never received {target}; it received {all:?}")
            })
    }

    fn tunneled(&self) -> Vec<u8> {
        self.tunneled.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------------------
// Identity headers
// ---------------------------------------------------------------------------------------

/// Routes: /pub/ (public), /app/ (JWT, identity headers and the assertion) and /trail/ (the
/// same, with `request_trailers: true`), all to `origin`.
async fn identity_proxy(key: &Key, origin: &RawOrigin) -> Proxy {
    let yaml = "listeners: [{ name: web, bind: \"127.0.0.1:{port}\" }]\n".to_string()
        + PROVIDER
        + r#"
backends:
  - { name: o, servers: [{ address: "@O@" }] }
routes:
  - { name: pub, match: { path_prefix: /pub/ }, backend: o, public: true }
  - name: app
    match: { path_prefix: /app/ }
    backend: o
    auth: [a]
    allow: [{}]
    headers: { upstream: { X-User: "{identity.user}", X-Groups: "{identity.groups}" }, assertion: true }
  - name: trail
    match: { path_prefix: /trail/ }
    backend: o
    auth: [a]
    allow: [{}]
    request_trailers: true
    headers: { upstream: { X-User: "{identity.user}", X-Groups: "{identity.groups}" }, assertion: true }
"#;
    Proxy::start_in(dir_with_jwks(key), &yaml.replace("@O@", &origin.address())).await
}

/// Checks that what the origin read plainly in `X-User` and `X-Groups` (one field line each,
/// trimmed; groups split on `,` and trimmed) is exactly `want_user` / `want_groups` as the
/// contract encodes them, decodes to exactly the verified identity, and never reads as anyone
/// (or any group) in `never`.
fn check_identity_headers(
    case: &str,
    seen: &Seen,
    (sub, groups): (&str, &[&str]),
    (want_user, want_groups): (&str, &[&str]),
    never: &[&str],
) -> Result<(), String> {
    let exactly_one = |name: &str| -> Result<Vec<u8>, String> {
        let v = seen.fields(name);
        if v.len() != 1 {
            return Err(format!(
                "{case}: `{name}` reached the origin {} times: {seen}",
                v.len()
            ));
        }
        let v = v.into_iter().next().unwrap();
        if !v.iter().all(|b| (0x20..0x7f).contains(b)) {
            return Err(format!(
                "{case}: `{name}` carries bytes a header cannot carry exactly: {:?}",
                String::from_utf8_lossy(&v)
            ));
        }
        Ok(v)
    };

    let user = exactly_one("x-user")?;
    let user_s = String::from_utf8_lossy(&user).into_owned();
    if let Some(n) = never.iter().find(|n| **n == user_s) {
        return Err(format!(
            "{case}: the origin reads X-User as {n:?} (verified user {sub:?})"
        ));
    }
    if percent_decode(&user).as_deref() != Some(sub.as_bytes()) {
        return Err(format!(
            "{case}: X-User `{user_s}` does not decode to the verified user {sub:?}"
        ));
    }
    if user_s != want_user {
        return Err(format!(
            "{case}: X-User is `{user_s}`, the contract's encoding is `{want_user}`"
        ));
    }

    let g = exactly_one("x-groups")?;
    let g_s = String::from_utf8_lossy(&g).into_owned();
    let read: Vec<&str> = if g_s.is_empty() {
        Vec::new()
    } else {
        g_s.split(',')
            .map(|x| x.trim_matches([' ', '\t']))
            .collect()
    };
    if let Some(n) = never.iter().find(|n| read.contains(n)) {
        return Err(format!(
            "{case}: the origin reads X-Groups `{g_s}` as containing {n:?} (verified groups {groups:?})"
        ));
    }
    let decoded: Vec<Option<Vec<u8>>> = read.iter().map(|x| percent_decode(x.as_bytes())).collect();
    let verified: Vec<Option<Vec<u8>>> =
        groups.iter().map(|x| Some(x.as_bytes().to_vec())).collect();
    if decoded != verified {
        return Err(format!(
            "{case}: X-Groups `{g_s}` does not read as the verified groups {groups:?}"
        ));
    }
    if read != want_groups {
        return Err(format!(
            "{case}: X-Groups reads as {read:?}, the contract's encoding is {want_groups:?}"
        ));
    }
    Ok(())
}

/// One hostile identity, what the origin must read for it (the contract's encoding), and
/// readings that must never occur.
struct IdCase {
    case: &'static str,
    sub: &'static str,
    groups: &'static [&'static str],
    user_read: &'static str,
    groups_read: &'static [&'static str],
    never: &'static [&'static str],
}

/// Hostile identities (a group with a comma, a subject with a NUL, CR LF, edge whitespace or
/// non-ASCII) reach the origin as exactly one `X-User` and one `X-Groups` whose plain reading
/// is the verified identity, percent-encoded per the contract, never another user or another
/// set of groups; the assertion carries the identity unencoded. A token the proxy refuses is
/// refused with 401 and never reaches the origin.
#[tokio::test]
async fn identity_headers_read_plainly_are_exactly_the_verified_identity() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let p = identity_proxy(&key, &origin).await;

    let cases = [
        IdCase {
            case: "ordinary",
            sub: "alice",
            groups: &["eng", "ops"],
            user_read: "alice",
            groups_read: &["eng", "ops"],
            never: &[],
        },
        IdCase {
            case: "ordinary with an inner space",
            sub: "Alice Smith",
            groups: &["eng"],
            user_read: "Alice Smith",
            groups_read: &["eng"],
            never: &[],
        },
        IdCase {
            case: "a group containing a comma",
            sub: "alice",
            groups: &["eng,admins"],
            user_read: "alice",
            groups_read: &["eng%2Cadmins"],
            never: &["eng", "admins"],
        },
        IdCase {
            case: "groups with a comma and edge spaces",
            sub: "alice",
            groups: &["eng", " admins ", "a,b"],
            user_read: "alice",
            groups_read: &["eng", "%20admins%20", "a%2Cb"],
            never: &["admins", "a", "b"],
        },
        IdCase {
            case: "a group already percent-encoded",
            sub: "alice",
            groups: &["eng%2Cadmins"],
            user_read: "alice",
            groups_read: &["eng%252Cadmins"],
            never: &["eng%2Cadmins", "eng", "admins"],
        },
        IdCase {
            case: "a subject with a NUL",
            sub: "ad\u{0}min",
            groups: &["eng"],
            user_read: "ad%00min",
            groups_read: &["eng"],
            never: &["admin", "ad"],
        },
        IdCase {
            case: "a subject with CR LF and a header line",
            sub: "ad\r\nX-Groups: admins",
            groups: &["eng"],
            user_read: "ad%0D%0AX-Groups: admins",
            groups_read: &["eng"],
            never: &["ad", "admins"],
        },
        IdCase {
            case: "a subject with a leading space",
            sub: " admin",
            groups: &["eng"],
            user_read: "%20admin",
            groups_read: &["eng"],
            never: &["admin"],
        },
        IdCase {
            case: "a subject with a trailing tab",
            sub: "admin\t",
            groups: &["eng"],
            user_read: "admin%09",
            groups_read: &["eng"],
            never: &["admin"],
        },
        IdCase {
            case: "a subject with a percent",
            sub: "%61dmin",
            groups: &["eng"],
            user_read: "%2561dmin",
            groups_read: &["eng"],
            never: &["admin", "%61dmin"],
        },
        IdCase {
            case: "a non-ASCII subject",
            sub: "José Müller",
            groups: &["ingeniería"],
            user_read: "Jos%C3%A9 M%C3%BCller",
            groups_read: &["ingenier%C3%ADa"],
            never: &[],
        },
        IdCase {
            case: "a subject with a DEL and a C1 control",
            sub: "admin\u{7f}\u{85}",
            groups: &["eng"],
            user_read: "admin%7F%C2%85",
            groups_read: &["eng"],
            never: &["admin"],
        },
    ];

    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let (case, sub, groups) = (c.case, c.sub, c.groups);
        let path = format!("/app/id-{i}");
        let token = key.token(sub, groups);
        let hits = origin.hits();
        let r = exchange(
            p.port,
            format!(
                "GET {path} HTTP/1.1\r\nHost: app.test\r\nAuthorization: Bearer {token}\r\nX-User: mallory\r\nX-Groups: admins\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap_or_else(|| panic!("{case}: no response\n{}", p.log_text()));
        // The ordinary identities (nothing to encode, nothing to guard against) must pass.
        if r.status == 401 && c.never.is_empty() && c.sub.is_ascii() {
            failures.push(format!(
                "{case}: an ordinary identity was refused: {}",
                r.text()
            ));
            continue;
        }
        if r.status == 401 {
            // Refusing a hostile identity is allowed, if it is refused before the origin.
            if origin.hits() != hits {
                failures.push(format!("{case}: refused with 401 but reached the origin"));
            }
            eprintln!("{case}: refused with 401");
            continue;
        }
        if r.status != 200 {
            failures.push(format!("{case}: got {}", r.text()));
            continue;
        }
        let seen = origin.request(&path);
        if let Err(e) = check_identity_headers(
            case,
            &seen,
            (sub, groups),
            (c.user_read, c.groups_read),
            c.never,
        ) {
            failures.push(e);
            continue;
        }
        assert!(
            !contains(&seen.head, b"mallory"),
            "{case}: a spoofed value reached the origin: {seen}"
        );
        let a = seen
            .field("x-portcullis-assertion")
            .unwrap_or_else(|| panic!("{case}: no assertion reached the origin: {seen}"));
        let claims = verify_assertion(&p, &String::from_utf8_lossy(&a), "default/app").await;
        assert_eq!(claims["sub"], sub, "{case}: assertion {claims}");
        assert_eq!(
            claims["groups"],
            json!(groups),
            "{case}: assertion {claims}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A client naming identity headers in `Connection` cannot make a hop-by-hop-stripping step
/// after portcullis remove them: the origin still gets exactly the X-User, X-Groups and
/// assertion portcullis set, and no `Connection` header naming them.
#[tokio::test]
async fn connection_cannot_remove_identity_headers() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let p = identity_proxy(&key, &origin).await;
    let token = key.token("alice", &["eng"]);

    let connections = [
        "X-User",
        "X-Groups",
        "X-Portcullis-Assertion",
        "x-user, x-groups",
        "keep-alive, X-User, X-Groups, X-Portcullis-Assertion",
        "close, X-Portcullis-Assertion",
    ];
    for (i, conn) in connections.iter().enumerate() {
        let path = format!("/app/conn-{i}");
        let mut c = Conn::open(p.port).await;
        c.send(
            format!(
                "GET {path} HTTP/1.1\r\nHost: app.test\r\nAuthorization: Bearer {token}\r\nConnection: {conn}\r\nX-User: mallory\r\nX-Portcullis-Assertion: forged.jwt.x\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let r = c
            .response()
            .await
            .unwrap_or_else(|| panic!("Connection: {conn}: no response\n{}", p.log_text()));
        assert_eq!(r.status, 200, "Connection: {conn}: {}", r.text());
        let seen = origin.request(&path);
        assert_eq!(
            seen.field("x-user").as_deref(),
            Some(&b"alice"[..]),
            "Connection: {conn}: {seen}"
        );
        assert_eq!(
            seen.field("x-groups").as_deref(),
            Some(&b"eng"[..]),
            "Connection: {conn}: {seen}"
        );
        let a = seen
            .field("x-portcullis-assertion")
            .unwrap_or_else(|| panic!("Connection: {conn}: no assertion: {seen}"));
        let claims = verify_assertion(&p, &String::from_utf8_lossy(&a), "default/app").await;
        assert_eq!(claims["sub"], "alice");
        for v in seen.fields("connection") {
            let v = v.to_ascii_lowercase();
            for name in [&b"x-user"[..], b"x-groups", b"x-portcullis-assertion"] {
                assert!(
                    !contains(&v, name),
                    "Connection: {conn}: the origin got a Connection header naming an identity header: {seen}"
                );
            }
        }
    }
}

/// Request trailers named like identity headers, or like any field portcullis owns or sets
/// (forwarded headers, credentials, path and method overrides, the request id), never reach
/// the origin, on an authenticated route, a public route, and a route that forwards trailers
/// (`request_trailers: true`); other trailers reach the origin only on that route. The body arrives whole either way.
#[tokio::test]
async fn trailers_named_like_identity_headers_never_reach_the_origin() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let p = identity_proxy(&key, &origin).await;
    let token = key.token("alice", &["eng"]);

    for (path, forwards) in [
        ("/app/trailers", false),
        ("/pub/trailers", false),
        ("/trail/trailers", true),
    ] {
        let r = exchange(
            p.port,
            format!(
                "POST {path} HTTP/1.1\r\nHost: app.test\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\nTrailer: X-User, X-Groups, X-Portcullis-Assertion, X-Checksum\r\nConnection: close\r\n\r\n\
                 5\r\nhello\r\n6\r\n world\r\n0\r\nX-User: mallory\r\nX-Groups: admins\r\nX-Portcullis-Assertion: forged.jwt.x\r\nx-portcullis-user: mallory\r\nX_User: mallory\r\n\
                 X-Forwarded-For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nAuthorization: Bearer forged\r\nX-Original-URL: /admin\r\nX-HTTP-Method-Override: DELETE\r\nX-Request-Id: forged\r\nX-Checksum: abc\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap_or_else(|| panic!("{path}: no response\n{}", p.log_text()));
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let seen = origin.request(path);
        assert_eq!(seen.body, b"hello world", "{path}: {seen}");
        let names = seen.trailer_names();
        // Nor any that reads as a field portcullis owns or set: an origin that merges
        // trailers into the head would believe them.
        for n in [
            "x-user",
            "x-groups",
            "x-portcullis-assertion",
            "x-portcullis-user",
            "x_user",
            "x-forwarded-for",
            "x_real_ip",
            "authorization",
            "x-original-url",
            "x-http-method-override",
            "x-request-id",
        ] {
            assert!(
                !names.iter().any(|t| t == n),
                "{path}: trailer `{n}` reached the origin: {seen}"
            );
        }
        assert!(
            !contains(&seen.head, b"mallory") && !contains(&seen.head, b"forged"),
            "{path}: a trailer value reached the origin's head: {seen}"
        );
        assert_eq!(
            names.iter().any(|t| t == "x-checksum"),
            forwards,
            "{path}: trailer X-Checksum forwarded? {seen}"
        );
        if path.starts_with("/pub/") {
            assert!(seen.fields("x-user").is_empty(), "{path}: {seen}");
        } else {
            assert_eq!(seen.field("x-user").as_deref(), Some(&b"alice"[..]));
        }
    }
}

/// The session cookie, `portcullis_auth` and the console's cookies are removed from requests
/// to a public route (and to an authenticated one), whichever Cookie line carries them; other
/// cookies, including ones whose names merely contain theirs, are kept in order, in one field.
#[tokio::test]
async fn portcullis_cookies_are_removed_and_others_kept() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let p = identity_proxy(&key, &origin).await;
    let token = key.token("alice", &["eng"]);

    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "one line",
            &["a=1; portcullis_session=s3cr3t; b=2; portcullis_auth=st4te"],
            &["a=1", "b=2"],
        ),
        (
            "only portcullis cookies",
            &["portcullis_session=s3cr3t; portcullis_auth=st4te"],
            &[],
        ),
        (
            "several lines",
            &[
                "portcullis_session=s3cr3t",
                "keep=1",
                "portcullis_auth=st4te; other=2",
            ],
            &["keep=1", "other=2"],
        ),
        (
            "the console's cookies (another port of the same host)",
            &["portcullis_admin=s3cr3t; keep=1", "portcullis_admin_login=st4te"],
            &["keep=1"],
        ),
        (
            "look-alike names",
            &["xportcullis_session=1; portcullis_session_x=2; portcullis_session=s3cr3t; portcullis_authx=3"],
            &["xportcullis_session=1", "portcullis_session_x=2", "portcullis_authx=3"],
        ),
    ];
    for prefix in ["/pub/", "/app/"] {
        for (i, (case, lines, want)) in cases.iter().enumerate() {
            let path = format!("{prefix}cookies-{i}");
            let mut req = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n");
            if prefix == "/app/" {
                req.push_str(&format!("Authorization: Bearer {token}\r\n"));
            }
            for l in *lines {
                req.push_str(&format!("Cookie: {l}\r\n"));
            }
            req.push_str("\r\n");
            let r = exchange(p.port, req.as_bytes())
                .await
                .unwrap_or_else(|| panic!("{path} ({case}): no response\n{}", p.log_text()));
            assert_eq!(r.status, 200, "{path} ({case}): {}", r.text());
            let seen = origin.request(&path);
            assert_eq!(
                seen.cookies(),
                *want,
                "{path} ({case}): cookies the origin got: {seen}"
            );
            assert!(
                !contains(&seen.head, b"s3cr3t") && !contains(&seen.head, b"st4te"),
                "{path} ({case}): a portcullis cookie value reached the origin: {seen}"
            );
            // One Cookie field, as an HTTP/1.1 origin may read only one (RFC 9113 §8.2.3).
            assert!(
                fields(&seen.head, "cookie").len() <= 1,
                "{path} ({case}): several Cookie fields: {seen}"
            );
        }
    }
}

/// A request that names no host (HTTP/1.0 without `Host`, or HTTP/1.1 with an empty one) is
/// sent with an empty `Host`, as the client sent it: never a name it did not give.
#[tokio::test]
async fn a_request_without_a_host_reaches_the_origin_without_one() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let p = identity_proxy(&key, &origin).await;
    for (i, req) in [
        "GET /pub/nohost-0 HTTP/1.0\r\n\r\n",
        "GET /pub/nohost-1 HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
    ]
    .iter()
    .enumerate()
    {
        let r = exchange(p.port, req.as_bytes())
            .await
            .unwrap_or_else(|| panic!("{req}: no response\n{}", p.log_text()));
        assert_eq!(r.status, 200, "{req}: {}", r.text());
        let seen = origin.request(&format!("/pub/nohost-{i}"));
        assert_eq!(
            fields(&seen.head, "host"),
            [Vec::<u8>::new()],
            "{req}: the origin got {seen}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// max_header_size
// ---------------------------------------------------------------------------------------

/// With the default `max_header_size` (64 KiB), a request head over it gets 431 and never
/// reaches the origin, whether one header or many make it large; a 60 KB head passes whole.
#[tokio::test]
async fn a_request_head_over_max_header_size_gets_431() {
    let origin = RawOrigin::start(On101::Echo).await;
    let p = Proxy::start(&format!(
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\nbackends:\n  - {{ name: o, servers: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: pub, match: {{ path_prefix: /pub/ }}, backend: o, public: true }}\n",
        origin.address()
    ))
    .await;

    let one = |path: &str, n: usize| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: app.test\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(n)
        )
    };
    let many = |path: &str, count: usize, n: usize| {
        let mut r = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n");
        for i in 0..count {
            r.push_str(&format!("X-Big-{i}: {}\r\n", "b".repeat(n)));
        }
        r + "\r\n"
    };

    let r = exchange(p.port, one("/pub/60k", 60_000).as_bytes())
        .await
        .expect("no response to a 60 KB header");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = origin.request("/pub/60k");
    assert_eq!(seen.field("x-big").map(|v| v.len()), Some(60_000));
    let r = exchange(p.port, many("/pub/60k-many", 30, 2_000).as_bytes())
        .await
        .expect("no response to 60 KB of headers");
    assert_eq!(r.status, 200, "{}", r.text());

    let hits = origin.hits();
    for (case, req) in [
        ("one 100 KB header", one("/pub/100k", 100_000)),
        ("50 headers of 2 KB", many("/pub/100k-many", 50, 2_000)),
        ("one 65 KiB header", one("/pub/65k", 65 * 1024)),
    ] {
        let r = exchange(p.port, req.as_bytes())
            .await
            .unwrap_or_else(|| panic!("{case}: no response\n{}", p.log_text()));
        assert_eq!(r.status, 431, "{case}: {}", r.text());
    }
    assert_eq!(
        origin.hits(),
        hits,
        "a request over max_header_size reached the origin"
    );
}

// ---------------------------------------------------------------------------------------
// Method override
// ---------------------------------------------------------------------------------------

const OVERRIDES: [&str; 3] = [
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
];

/// Listener `web` (default `method_override: strip`) and `strict` (`reject`) on `strict_port`;
/// routes /pub/ (public), /rej/ (public, `method_override: reject`) and /hon/ (`honor`, group
/// `eng` may only GET).
async fn override_proxy(key: &Key, origin: &RawOrigin, strict_port: u16) -> Proxy {
    let yaml = format!(
        "listeners:\n  - {{ name: web, bind: \"127.0.0.1:{{port}}\" }}\n  - {{ name: strict, bind: \"127.0.0.1:{strict_port}\", method_override: reject }}\n"
    ) + PROVIDER
        + r#"
backends:
  - { name: o, servers: [{ address: "@O@" }] }
routes:
  - { name: pub, match: { path_prefix: /pub/ }, backend: o, public: true }
  - { name: rej, match: { path_prefix: /rej/ }, backend: o, public: true, method_override: reject }
  - name: hon
    match: { path_prefix: /hon/ }
    backend: o
    auth: [a]
    method_override: honor
    allow: [{ groups: [eng], methods: [GET] }]
"#;
    Proxy::start_in(dir_with_jwks(key), &yaml.replace("@O@", &origin.address())).await
}

async fn status_of(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut r = client().request(
        method.parse().unwrap(),
        format!("http://127.0.0.1:{port}{path}"),
    );
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap().status().as_u16()
}

/// By default every method-override header is removed before forwarding: the origin sees the
/// request's own method and none of them.
#[tokio::test]
async fn method_override_headers_are_stripped_by_default() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let p = override_proxy(&key, &origin, free_port()).await;

    let mut cases: Vec<Vec<(&str, &str)>> =
        OVERRIDES.iter().map(|h| vec![(*h, "DELETE")]).collect();
    cases.push(OVERRIDES.iter().map(|h| (*h, "PUT")).collect());
    for (i, headers) in cases.iter().enumerate() {
        let path = format!("/pub/strip-{i}");
        let s = status_of(p.port, "GET", &path, headers).await;
        assert_eq!(s, 200, "{headers:?}");
        let seen = origin.request(&path);
        assert_eq!(seen.method(), "GET", "{seen}");
        for h in OVERRIDES {
            assert!(
                seen.fields(h).is_empty(),
                "{headers:?}: `{h}` reached the origin: {seen}"
            );
        }
    }
}

/// `X-Original-URL` and `X-Rewrite-URL` make some origins (IIS, Symfony) serve another path
/// than the request line's: they never reach the origin, so what it serves is the path that
/// was routed and authorized.
#[tokio::test]
async fn path_override_headers_never_reach_the_origin() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let p = override_proxy(&key, &origin, free_port()).await;
    for (i, h) in ["X-Original-URL", "X-Rewrite-URL", "x-original-url"]
        .iter()
        .enumerate()
    {
        let path = format!("/pub/path-override-{i}");
        let s = status_of(p.port, "GET", &path, &[(h, "/admin")]).await;
        assert_eq!(s, 200, "{h}");
        let seen = origin.request(&path);
        for name in ["x-original-url", "x-rewrite-url"] {
            assert!(
                seen.fields(name).is_empty(),
                "`{h}` reached the origin as `{name}`: {seen}"
            );
        }
    }
}

/// A client that is no trusted proxy cannot name its own address to the origin in any of the
/// headers CDNs use for it.
#[tokio::test]
async fn client_address_claims_from_untrusted_peers_are_removed() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let p = override_proxy(&key, &origin, free_port()).await;
    let claims = [
        "X-Real-IP",
        "True-Client-IP",
        "X-Client-IP",
        "X-Cluster-Client-IP",
        "CF-Connecting-IP",
        "Fastly-Client-IP",
        "Forwarded",
        // Claims of how the client came in (Rack, Werkzeug, IIS read them).
        "X-Forwarded-Ssl",
        "X-Forwarded-Scheme",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "Front-End-Https",
        "X-Url-Scheme",
        // Tornado reads it before X-Forwarded-Proto.
        "X-Scheme",
    ];
    let headers: Vec<(&str, &str)> = claims.iter().map(|h| (*h, "10.9.8.7")).collect();
    assert_eq!(status_of(p.port, "GET", "/pub/claims", &headers).await, 200);
    let seen = origin.request("/pub/claims");
    for h in claims {
        assert!(
            seen.fields(&h.to_ascii_lowercase()).is_empty(),
            "`{h}` reached the origin: {seen}"
        );
    }
    assert_eq!(
        seen.fields("x-forwarded-for"),
        vec![b"127.0.0.1".to_vec()],
        "{seen}"
    );
    assert_eq!(seen.fields("x-forwarded-proto"), vec![b"http".to_vec()]);
}

/// Under `method_override: reject` (on the listener, or on the route) a request carrying any
/// method-override header gets 400 and never reaches the origin; without one it passes.
#[tokio::test]
async fn method_override_reject_refuses_with_400() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let strict = free_port();
    let p = override_proxy(&key, &origin, strict).await;

    assert_eq!(status_of(strict, "GET", "/pub/plain", &[]).await, 200);
    assert_eq!(status_of(p.port, "GET", "/rej/plain", &[]).await, 200);
    let hits = origin.hits();
    for h in OVERRIDES {
        for value in ["DELETE", "GET"] {
            let s = status_of(strict, "POST", "/pub/x", &[(h, value)]).await;
            assert_eq!(s, 400, "listener reject, `{h}: {value}`");
            let s = status_of(p.port, "POST", "/rej/x", &[(h, value)]).await;
            assert_eq!(s, 400, "route reject, `{h}: {value}`");
        }
    }
    assert_eq!(
        origin.hits(),
        hits,
        "a request with a method override reached the origin under `reject`"
    );
}

/// Under `method_override: honor` policy decides on the overridden method: a token allowed
/// only GET gets 403 for `GET` + `X-HTTP-Method-Override: DELETE` (and the other two names),
/// which never reaches the origin; an override to GET is allowed and forwarded.
#[tokio::test]
async fn method_override_honor_authorizes_the_overridden_method() {
    let key = Key::new("k1");
    let origin = RawOrigin::start(On101::Echo).await;
    let p = override_proxy(&key, &origin, free_port()).await;
    let auth = format!("Bearer {}", key.token("alice", &["eng"]));
    let auth = auth.as_str();

    // The rule itself: GET allowed, DELETE and POST not.
    assert_eq!(
        status_of(p.port, "GET", "/hon/x", &[("authorization", auth)]).await,
        200
    );
    assert_eq!(
        status_of(p.port, "DELETE", "/hon/x", &[("authorization", auth)]).await,
        403
    );
    let hits = origin.hits();
    for h in OVERRIDES {
        for value in ["DELETE", "delete", "POST"] {
            let s = status_of(
                p.port,
                "GET",
                "/hon/x",
                &[("authorization", auth), (h, value)],
            )
            .await;
            assert_eq!(s, 403, "GET + `{h}: {value}` under honor");
        }
    }
    assert_eq!(
        origin.hits(),
        hits,
        "a request whose overridden method is denied reached the origin"
    );

    for (i, h) in OVERRIDES.iter().enumerate() {
        let path = format!("/hon/get-{i}");
        let s = status_of(p.port, "GET", &path, &[("authorization", auth), (h, "GET")]).await;
        assert_eq!(s, 200, "GET + `{h}: GET` under honor");
        let seen = origin.request(&path);
        assert_eq!(
            seen.field(h).as_deref(),
            Some(&b"GET"[..]),
            "under honor the header is forwarded: {seen}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Upgrades
// ---------------------------------------------------------------------------------------

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn ws_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Upgrade origins: /ws/ answers 101 for whatever it is asked (a well-behaved origin),
/// /wrong/ answers a websocket request with `101 Upgrade: h2c`, /badaccept/ with a wrong
/// `Sec-WebSocket-Accept`, /noup/ is the well-behaved origin behind `upgrades: []`.
struct Upgrades {
    echo: RawOrigin,
    wrong: RawOrigin,
    bad_accept: RawOrigin,
    p: Proxy,
}

async fn upgrades_proxy() -> Upgrades {
    let echo = RawOrigin::start(On101::Echo).await;
    let wrong = RawOrigin::start(On101::Fixed("h2c")).await;
    let bad_accept = RawOrigin::start(On101::BadAccept).await;
    let yaml = format!(
        r#"listeners: [{{ name: web, bind: "127.0.0.1:{{port}}" }}]
backends:
  - {{ name: echo, servers: [{{ address: "{}" }}] }}
  - {{ name: wrong, servers: [{{ address: "{}" }}] }}
  - {{ name: bad, servers: [{{ address: "{}" }}] }}
routes:
  - {{ name: ws, match: {{ path_prefix: /ws/ }}, backend: echo, public: true }}
  - {{ name: wrong, match: {{ path_prefix: /wrong/ }}, backend: wrong, public: true }}
  - {{ name: bad, match: {{ path_prefix: /badaccept/ }}, backend: bad, public: true }}
  - {{ name: noup, match: {{ path_prefix: /noup/ }}, backend: echo, public: true, upgrades: [] }}
"#,
        echo.address(),
        wrong.address(),
        bad_accept.address()
    );
    let p = Proxy::start(&yaml).await;
    Upgrades {
        echo,
        wrong,
        bad_accept,
        p,
    }
}

/// The harness itself: a websocket handshake to the well-behaved raw origin gets its 101
/// with the right accept through the proxy, and bytes flow both ways through the tunnel.
#[tokio::test]
async fn a_valid_101_opens_a_tunnel() {
    let u = upgrades_proxy().await;
    let mut c = Conn::open(u.p.port).await;
    c.send(ws_request("/ws/ok").as_bytes()).await;
    let r = c
        .response()
        .await
        .unwrap_or_else(|| panic!("no response\n{}", u.p.log_text()));
    assert_eq!(r.status, 101, "{}", r.text());
    assert_eq!(
        r.header("sec-websocket-accept").as_deref(),
        Some(derive_accept_key(WS_KEY.as_bytes()).as_str())
    );
    c.send(b"ping through the tunnel").await;
    let back = tokio::time::timeout(Duration::from_secs(5), c.exact(23))
        .await
        .expect("tunnel echo timed out")
        .expect("tunnel closed");
    assert_eq!(back, b"ping through the tunnel");
}

/// `Upgrade: h2c` (with `HTTP2-Settings`) and an unlisted protocol (`foo/1`) are never
/// forwarded as upgrades: no 101, no tunnel, and the origin never receives an `Upgrade`
/// header naming them (the request may go on as a plain request). `upgrades: []` does the
/// same for websocket.
#[tokio::test]
async fn h2c_and_unlisted_upgrades_are_not_forwarded() {
    let u = upgrades_proxy().await;
    let cases = [
        (
            "h2c",
            "/ws/h2c",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            "h2c",
        ),
        (
            "H2C",
            "/ws/h2c-upper",
            "Connection: HTTP2-Settings, Upgrade\r\nUpgrade: H2C\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
            "h2c",
        ),
        (
            "foo/1",
            "/ws/foo",
            "Connection: Upgrade\r\nUpgrade: foo/1\r\n",
            "foo",
        ),
        (
            "websocket with upgrades: []",
            "/noup/ws",
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            "websocket",
        ),
    ];
    for (case, path, extra, proto) in cases {
        let mut c = Conn::open(u.p.port).await;
        c.send(format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n{extra}\r\n").as_bytes())
            .await;
        let r = c
            .response()
            .await
            .unwrap_or_else(|| panic!("{case}: no response\n{}", u.p.log_text()));
        assert_ne!(r.status, 101, "{case}: a tunnel was opened: {}", r.text());
        if let Some(seen) = u.echo.seen().into_iter().find(|s| s.target() == path) {
            for v in seen.fields("upgrade") {
                assert!(
                    !contains(&v.to_ascii_lowercase(), proto.as_bytes()),
                    "{case}: the origin received an Upgrade naming {proto}: {seen}"
                );
            }
            for v in seen.fields("connection") {
                assert!(
                    !contains(&v.to_ascii_lowercase(), b"upgrade"),
                    "{case}: the origin received `Connection: upgrade`: {seen}"
                );
            }
            assert!(
                seen.fields("http2-settings").is_empty(),
                "{case}: HTTP2-Settings reached the origin: {seen}"
            );
            assert_eq!(
                r.status,
                200,
                "{case}: forwarded as a plain request: {}",
                r.text()
            );
        } else {
            assert!(
                (400..500).contains(&r.status),
                "{case}: neither forwarded nor refused: {}",
                r.text()
            );
        }
        // No tunnel: the connection still speaks HTTP (if the proxy kept it open).
        if r.status == 200
            && !r
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            c.send(b"GET /ws/after HTTP/1.1\r\nHost: app.test\r\n\r\n")
                .await;
            if let Some(r2) = c.response().await {
                assert_eq!(r2.status, 200, "{case}: {}", r2.text());
            }
        }
    }
    assert!(
        u.echo.tunneled().is_empty(),
        "bytes reached the origin through a tunnel: {:?}",
        String::from_utf8_lossy(&u.echo.tunneled())
    );
}

/// A 101 that names another protocol than the one requested, or whose
/// `Sec-WebSocket-Accept` does not match the key, gets 502 and no tunnel: a request written
/// next on the same client connection never reaches the origin.
#[tokio::test]
async fn a_101_for_the_wrong_protocol_or_key_gets_502_and_no_tunnel() {
    let u = upgrades_proxy().await;
    for (case, origin, path) in [
        ("101 with Upgrade: h2c", &u.wrong, "/wrong/ws"),
        ("101 with a wrong accept", &u.bad_accept, "/badaccept/ws"),
    ] {
        let mut c = Conn::open(u.p.port).await;
        c.send(ws_request(path).as_bytes()).await;
        let r = c
            .response()
            .await
            .unwrap_or_else(|| panic!("{case}: no response\n{}", u.p.log_text()));
        // The origin did get the upgrade request (so the 101 really was sent).
        let seen = origin.request(path);
        assert_eq!(
            seen.field("upgrade").as_deref(),
            Some(&b"websocket"[..]),
            "{case}: {seen}"
        );
        assert_eq!(r.status, 502, "{case}: {}", r.text());
        c.send(b"GET /smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), c.response()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tunneled = origin.tunneled();
        assert!(
            !contains(&tunneled, b"smuggled"),
            "{case}: the next request went through a tunnel: {:?}",
            String::from_utf8_lossy(&tunneled)
        );
        assert!(
            !origin.seen().iter().any(|s| s.target() == "/smuggled"),
            "{case}: the next request reached the origin"
        );
    }
}

/// A real WebSocket client and origin still work through the proxy.
#[tokio::test]
async fn a_real_websocket_still_works() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let origin = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
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
        "listeners: [{{ name: web, bind: \"127.0.0.1:{{port}}\" }}]\nbackends:\n  - {{ name: ws, servers: [{{ address: \"{addr}\" }}] }}\nroutes:\n  - {{ name: ws, match: {{ path_prefix: /ws/ }}, backend: ws, public: true }}\n"
    ))
    .await;
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws/chat", p.port)),
    )
    .await
    .expect("websocket handshake timed out")
    .unwrap_or_else(|e| panic!("websocket handshake failed: {e}\n{}", p.log_text()));
    assert_eq!(resp.status(), 101);
    for m in [Message::text("hello"), Message::binary(vec![0u8, 1, 255])] {
        ws.send(m.clone()).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("echo timed out")
            .expect("stream ended")
            .expect("websocket error");
        assert_eq!(back, m);
    }
    ws.close(None).await.unwrap();
    origin.abort();
}
