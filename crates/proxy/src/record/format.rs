//! The layouts of an access log line: JSON, the Combined Log Format and HAProxy's httplog.
//! They run on the writer thread, never on a request's. A line is built in a reused buffer
//! from the record's fields, and the text of a date is reused while its second lasts.
//!
//! ```text
//! json     {"time":"Sat, 21 Nov 2026 19:35:01 GMT","request_id":"…","listener":"web",…}
//! clf      192.0.2.7 - alice [21/Nov/2026:19:35:01 +0000] "GET /api/cart/42 HTTP/1.1" 503 18 "-" "curl/8.5.0"
//! haproxy  192.0.2.7:52114 [21/Nov/2026:19:35:01.123] web shop/carts/carts-1 0/0/1/63/64 503 18 - - ---- 0/0/0/0/2 0/0 "GET /api/cart/42 HTTP/1.1"
//! ```

use super::AccessRecord;
use portcullis_config::AccessLogFormat;
use std::borrow::Cow;
use std::io::Write;
use std::time::{Duration, SystemTime};

/// The most bytes of a client's text (a path, a `User-Agent`, a `Referer`) an access log
/// line, an audit record or a log line keeps. Anyone may send a 60 KiB path with a
/// request that is refused at once; written whole, each such request would cost the disk
/// twice its size (audit and access log), and one connection could fill it at tens of
/// megabytes a second. HAProxy keeps 1 KiB of a logged URI (`tune.http.logurilen`).
pub const MAX_LOGGED: usize = 2048;

/// `text`, or when it is longer than [`MAX_LOGGED`], its first bytes (up to a character
/// boundary) followed by `…[+N bytes, sha256:<16 hex digits of the whole>]`: what was cut
/// is counted, and two long values can still be told apart.
pub fn bounded(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_LOGGED {
        return Cow::Borrowed(text);
    }
    let mut end = MAX_LOGGED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!(
        "{}{}",
        &text[..end],
        cut_note(text.as_bytes(), end)
    ))
}

/// `bytes`, bounded as [`bounded`] bounds a string (for header values, which may not be
/// UTF-8).
fn bounded_bytes(bytes: &[u8]) -> Cow<'_, [u8]> {
    if bytes.len() <= MAX_LOGGED {
        return Cow::Borrowed(bytes);
    }
    let mut v = bytes[..MAX_LOGGED].to_vec();
    v.extend_from_slice(cut_note(bytes, MAX_LOGGED).as_bytes());
    Cow::Owned(v)
}

fn cut_note(whole: &[u8], kept: usize) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(whole);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("…[+{} bytes, sha256:{hex}]", whole.len() - kept)
}

/// Writes lines of one format.
pub struct Formatter {
    format: AccessLogFormat,
    /// The Unix second `date` is the text of, as `21/Nov/2026:19:35:01` (`clf`, `haproxy`)
    /// or as an HTTP date, `Sat, 21 Nov 2026 19:35:01 GMT` (`json`).
    second: u64,
    date: String,
}

impl Formatter {
    pub fn new(format: AccessLogFormat) -> Formatter {
        Formatter {
            format,
            second: 0,
            date: String::new(),
        }
    }

    /// Appends the line of `r`, with its newline, to `out`.
    pub fn write(&mut self, r: &AccessRecord, out: &mut Vec<u8>) {
        match self.format {
            AccessLogFormat::Json => self.json(r, out),
            AccessLogFormat::Clf => self.clf(r, out),
            AccessLogFormat::Haproxy => self.haproxy(r, out),
        }
        out.push(b'\n');
    }

    /// One JSON object: the fields of [`AccessRecord`] in its order, with the empty ones
    /// it skips left out, byte for byte what `serde_json` writes for the record (a test
    /// checks it). Written by hand, without serde, because the line is written for every
    /// request: the date is formatted once per second, and a string with nothing to escape
    /// is copied as it is.
    fn json(&mut self, r: &AccessRecord, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        self.date(r.time.max(SystemTime::UNIX_EPOCH), out);
        out.extend_from_slice(b"\",\"request_id\":");
        json_str(out, &r.request_id);
        out.extend_from_slice(b",\"listener\":");
        json_str(out, &r.listener);
        out.extend_from_slice(b",\"client\":\"");
        // An IP address has nothing to escape.
        let _ = write!(out, "{}", r.client.ip());
        out.extend_from_slice(b"\",\"method\":");
        json_str(out, r.method.as_str());
        out.extend_from_slice(b",\"host\":");
        json_str(out, &r.host);
        out.extend_from_slice(b",\"path\":");
        json_str(out, &bounded(&r.path));
        out.extend_from_slice(b",\"protocol\":");
        json_str(out, r.protocol);
        out.extend_from_slice(b",\"status\":");
        number(out, r.status);
        out.extend_from_slice(b",\"route\":");
        json_str(out, &r.route);
        out.extend_from_slice(b",\"backend\":");
        json_str(out, &r.backend);
        out.extend_from_slice(b",\"server\":");
        json_str(out, &r.server);
        for (key, v) in [
            (&b",\"user\":"[..], r.user.as_str()),
            (b",\"provider\":", &r.provider),
            (b",\"decision\":", r.decision),
        ] {
            if !v.is_empty() {
                out.extend_from_slice(key);
                json_str(out, v);
            }
        }
        out.extend_from_slice(b",\"attempts\":");
        number(out, r.attempts);
        out.extend_from_slice(b",\"bytes_in\":");
        number(out, r.bytes_in);
        out.extend_from_slice(b",\"bytes_out\":");
        number(out, r.bytes_out);
        out.extend_from_slice(b",\"total_ms\":");
        json_f64(out, r.total_ms);
        out.extend_from_slice(b",\"connect_ms\":");
        json_f64(out, r.connect_ms);
        out.extend_from_slice(b",\"first_byte_ms\":");
        json_f64(out, r.first_byte_ms);
        if let Some(e) = &r.error {
            out.extend_from_slice(b",\"error\":");
            json_str(out, e);
        }
        if !r.limit.is_empty() {
            out.extend_from_slice(b",\"limit\":");
            json_str(out, &r.limit);
        }
        out.push(b'}');
    }

    /// NCSA combined: `host ident authuser [date] "request" status bytes "referer" "agent"`.
    fn clf(&mut self, r: &AccessRecord, out: &mut Vec<u8>) {
        let _ = write!(out, "{} - ", r.client.ip());
        token(out, r.user.as_bytes(), Style::Clf);
        out.extend_from_slice(b" [");
        self.date(arrival(r), out);
        out.extend_from_slice(b" +0000] \"");
        request(out, r, Style::Clf);
        out.extend_from_slice(b"\" ");
        number(out, r.status);
        out.push(b' ');
        if r.bytes_out == 0 {
            out.push(b'-');
        } else {
            number(out, r.bytes_out);
        }
        for h in [&r.referer, &r.user_agent] {
            out.extend_from_slice(b" \"");
            match h {
                Some(v) if !v.is_empty() => {
                    escape(out, &bounded_bytes(v.as_bytes()), Style::Clf, false)
                }
                _ => out.push(b'-'),
            }
            out.push(b'"');
        }
    }

    /// HAProxy's `option httplog`: `client_ip:port [accept_date] frontend backend/server
    /// TR/Tw/Tc/Tr/Ta status bytes - - ---- actconn/feconn/beconn/srv_conn/retries
    /// srv_queue/backend_queue "request"`.
    fn haproxy(&mut self, r: &AccessRecord, out: &mut Vec<u8>) {
        let _ = write!(out, "{}:", r.client.ip());
        number(out, r.client.port());
        out.extend_from_slice(b" [");
        let at = arrival(r);
        self.date(at, out);
        let ms = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_millis());
        let _ = write!(out, ".{ms:03}] ");
        token(out, r.listener.as_bytes(), Style::Haproxy);
        out.push(b' ');
        // Before routing, HAProxy names the frontend as the backend; with no server,
        // `<NOSRV>`.
        let backend = if r.backend.is_empty() {
            r.listener.as_bytes()
        } else {
            r.backend.as_bytes()
        };
        token(out, backend, Style::Haproxy);
        out.push(b'/');
        if r.server.is_empty() {
            out.extend_from_slice(b"<NOSRV>");
        } else {
            token(out, r.server.as_bytes(), Style::Haproxy);
        }
        // TR and Tw are not measured (0); Tc and Tr are -1 when no server answered.
        let (tc, tr) = if r.server.is_empty() {
            (-1, -1)
        } else if r.first_byte_ms <= 0.0 {
            (millis(r.connect_ms), -1)
        } else {
            let tc = millis(r.connect_ms);
            (tc, (millis(r.first_byte_ms) - tc).max(0))
        };
        out.extend_from_slice(b" 0/0/");
        number(out, tc);
        out.push(b'/');
        number(out, tr);
        out.push(b'/');
        number(out, millis(r.total_ms));
        out.push(b' ');
        number(out, r.status);
        out.push(b' ');
        number(out, r.bytes_out);
        // No captured cookies, no termination state, no connection counts, no queues;
        // the retries are the attempts after the first.
        out.extend_from_slice(b" - - ---- 0/0/0/0/");
        number(out, r.attempts.saturating_sub(1));
        out.extend_from_slice(b" 0/0 \"");
        request(out, r, Style::Haproxy);
        out.push(b'"');
    }

    /// Appends the date of `t` in this format's layout, computed once per second: an HTTP
    /// date, `Sat, 21 Nov 2026 19:35:01 GMT`, for `json`; `21/Nov/2026:19:35:01` (UTC) for
    /// `clf` and `haproxy`.
    fn date(&mut self, t: SystemTime, out: &mut Vec<u8>) {
        let second = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.date.is_empty() || second != self.second {
            self.date = match self.format {
                AccessLogFormat::Json => httpdate::fmt_http_date(t),
                AccessLogFormat::Clf | AccessLogFormat::Haproxy => log_date(second),
            };
            self.second = second;
        }
        out.extend_from_slice(self.date.as_bytes());
    }
}

/// `21/Nov/2026:19:35:01`, the UTC date of a Unix second as Apache and HAProxy write it.
fn log_date(second: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let d = i64::try_from(second)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:02}/{}/{:04}:{:02}:{:02}:{:02}",
        d.day(),
        MONTHS[usize::from(u8::from(d.month())) - 1],
        d.year(),
        d.hour(),
        d.minute(),
        d.second()
    )
}

/// When the request arrived: the end of its answer less its total time.
fn arrival(r: &AccessRecord) -> SystemTime {
    let total = Duration::try_from_secs_f64(r.total_ms / 1000.0).unwrap_or_default();
    r.time.checked_sub(total).unwrap_or(r.time)
}

fn millis(ms: f64) -> i64 {
    ms.round() as i64
}

/// A JSON string. Most fields have nothing to escape and are copied as they are; the
/// others are written by `serde_json`, so that escapes are exactly its own.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// A JSON number as `serde_json` writes an `f64` (`null` when not finite).
fn json_f64(out: &mut Vec<u8>, x: f64) {
    let _ = serde_json::to_writer(&mut *out, &x);
}

fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// How bytes that would break a line's fields are written: Apache's `\"`, `\\` and `\xhh`,
/// or HAProxy's `#hh`.
#[derive(Clone, Copy, PartialEq)]
enum Style {
    Clf,
    Haproxy,
}

/// Appends `s`, escaping control bytes, bytes above ASCII, `"`, the style's own escape
/// character, and (for a field that is not quoted, or the parts of the request line)
/// spaces.
fn escape(out: &mut Vec<u8>, s: &[u8], style: Style, space: bool) {
    let special = match style {
        Style::Clf => b'\\',
        Style::Haproxy => b'#',
    };
    for &b in s {
        let plain = (0x21..0x7f).contains(&b) && b != b'"' && b != special || (b == b' ' && !space);
        if plain {
            out.push(b);
            continue;
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        match (style, b) {
            (Style::Clf, b'"' | b'\\') => out.extend_from_slice(&[b'\\', b]),
            (Style::Clf, _) => out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]),
            // HAProxy writes its escapes in upper case.
            (Style::Haproxy, _) => {
                let _ = write!(out, "#{b:02X}");
            }
        }
    }
}

/// A field without quotes: `-` when empty.
fn token(out: &mut Vec<u8>, s: &[u8], style: Style) {
    if s.is_empty() {
        out.push(b'-');
    } else {
        escape(out, s, style, true);
    }
}

/// `METHOD path protocol`, without the query (which is never logged). HTTP/2 is written
/// `HTTP/2.0`, as Apache, nginx and HAProxy write it.
fn request(out: &mut Vec<u8>, r: &AccessRecord, style: Style) {
    escape(out, r.method.as_str().as_bytes(), style, true);
    out.push(b' ');
    escape(out, bounded(&r.path).as_bytes(), style, true);
    out.push(b' ');
    out.extend_from_slice(match r.protocol {
        "HTTP/2" => b"HTTP/2.0",
        "" => b"HTTP/1.1",
        p => p.as_bytes(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    /// 2026-11-21 19:35:01.1235 UTC, when the request below arrived.
    fn arrived() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_289_701_123_500)
    }

    /// A request that went to a server and back, retried twice.
    fn record() -> AccessRecord {
        AccessRecord {
            time: arrived() + Duration::from_micros(64_180),
            request_id: "6ef7eb1f5ee64b14a4b12b87184a13d7".into(),
            listener: "web".into(),
            client: "192.0.2.7:52114".parse().unwrap(),
            method: http::Method::GET,
            host: "shop.example.com".into(),
            path: "/api/cart/42".into(),
            protocol: "HTTP/1.1",
            status: 503,
            route: "shop/cart-api".into(),
            backend: "shop/carts".into(),
            server: "carts-1".into(),
            user: "alice".into(),
            provider: "corp".into(),
            decision: "allow",
            attempts: 3,
            bytes_in: 0,
            bytes_out: 18,
            total_ms: 64.18,
            connect_ms: 0.46,
            first_byte_ms: 64.11,
            error: None,
            limit: String::new(),
            referer: Some(http::HeaderValue::from_static("https://shop.example.com/")),
            user_agent: Some(http::HeaderValue::from_static("curl/8.5.0")),
        }
    }

    /// A request refused before routing: no route, no server, no identity.
    fn refused() -> AccessRecord {
        AccessRecord {
            time: arrived() + Duration::from_micros(250),
            request_id: "73c04e478e10409890f85932969fcaa9".into(),
            listener: "web".into(),
            client: "[2001:db8::7]:40000".parse().unwrap(),
            method: http::Method::POST,
            path: "/nowhere".into(),
            protocol: "HTTP/2",
            status: 404,
            total_ms: 0.25,
            error: Some("no route".into()),
            ..Default::default()
        }
    }

    fn line(format: AccessLogFormat, r: &AccessRecord) -> String {
        let mut out = Vec::new();
        Formatter::new(format).write(r, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_keeps_its_fields_and_their_order() {
        assert_eq!(
            line(AccessLogFormat::Json, &record()),
            concat!(
                r#"{"time":"Sat, 21 Nov 2026 19:35:01 GMT","request_id":"6ef7eb1f5ee64b14a4b12b87184a13d7","listener":"web","client":"192.0.2.7","#,
                r#""method":"GET","host":"shop.example.com","path":"/api/cart/42","protocol":"HTTP/1.1","status":503,"route":"shop/cart-api","#,
                r#""backend":"shop/carts","server":"carts-1","user":"alice","provider":"corp","decision":"allow","attempts":3,"bytes_in":0,"#,
                r#""bytes_out":18,"total_ms":64.18,"connect_ms":0.46,"first_byte_ms":64.11}"#,
                "\n"
            )
        );
        assert_eq!(
            line(AccessLogFormat::Json, &refused()),
            concat!(
                r#"{"time":"Sat, 21 Nov 2026 19:35:01 GMT","request_id":"73c04e478e10409890f85932969fcaa9","listener":"web","client":"2001:db8::7","#,
                r#""method":"POST","host":"","path":"/nowhere","protocol":"HTTP/2","status":404,"route":"","backend":"","server":"","#,
                r#""attempts":0,"bytes_in":0,"bytes_out":0,"total_ms":0.25,"connect_ms":0.0,"first_byte_ms":0.0,"error":"no route"}"#,
                "\n"
            )
        );
    }

    /// A client's long path, `User-Agent` or `Referer` is kept to MAX_LOGGED bytes, with the
    /// length cut and a digest of the whole, in every format.
    #[test]
    fn long_client_text_is_bounded() {
        let long = format!("/{}é{}", "a".repeat(MAX_LOGGED - 2), "b".repeat(60_000));
        let cut = bounded(&long);
        // `é` straddles the limit: cut before it, never inside a character.
        assert!(cut.starts_with(&long[..MAX_LOGGED - 1]), "{}", &cut[..40]);
        let note = &cut[MAX_LOGGED - 1..];
        assert!(
            note.starts_with(&format!(
                "…[+{} bytes, sha256:",
                long.len() - MAX_LOGGED + 1
            )),
            "{note}"
        );
        assert_eq!(
            note.len(),
            "…[+60003 bytes, sha256:0123456789abcdef]".len(),
            "{note}"
        );
        assert_ne!(
            bounded(&long.replace('b', "c")),
            cut,
            "another value, another digest"
        );
        assert_eq!(bounded("/short"), "/short");
        let mut r = record();
        r.path = long.clone();
        r.user_agent = Some(http::HeaderValue::from_str(&"u".repeat(50_000)).unwrap());
        for f in [
            AccessLogFormat::Json,
            AccessLogFormat::Clf,
            AccessLogFormat::Haproxy,
        ] {
            let l = line(f, &r);
            assert!(l.len() < 3 * MAX_LOGGED + 500, "{f:?}: {} bytes", l.len());
            assert!(l.contains("sha256:"), "{f:?}");
        }
    }

    #[test]
    fn clf_is_the_combined_log_format() {
        assert_eq!(
            line(AccessLogFormat::Clf, &record()),
            "192.0.2.7 - alice [21/Nov/2026:19:35:01 +0000] \"GET /api/cart/42 HTTP/1.1\" 503 18 \"https://shop.example.com/\" \"curl/8.5.0\"\n"
        );
        // No user, no body, no headers: `-`; HTTP/2 as `HTTP/2.0`.
        assert_eq!(
            line(AccessLogFormat::Clf, &refused()),
            "2001:db8::7 - - [21/Nov/2026:19:35:01 +0000] \"POST /nowhere HTTP/2.0\" 404 - \"-\" \"-\"\n"
        );
    }

    #[test]
    fn haproxy_is_the_httplog_layout() {
        assert_eq!(
            line(AccessLogFormat::Haproxy, &record()),
            "192.0.2.7:52114 [21/Nov/2026:19:35:01.123] web shop/carts/carts-1 0/0/0/64/64 503 18 - - ---- 0/0/0/0/2 0/0 \"GET /api/cart/42 HTTP/1.1\"\n"
        );
        // Refused before routing: the frontend as the backend, no server, no timers.
        assert_eq!(
            line(AccessLogFormat::Haproxy, &refused()),
            "2001:db8::7:40000 [21/Nov/2026:19:35:01.123] web web/<NOSRV> 0/0/-1/-1/0 404 0 - - ---- 0/0/0/0/0 0/0 \"POST /nowhere HTTP/2.0\"\n"
        );
        // A server was tried but never answered.
        let mut r = record();
        r.first_byte_ms = 0.0;
        r.connect_ms = 3.4;
        r.status = 502;
        assert!(
            line(AccessLogFormat::Haproxy, &r).contains("/carts-1 0/0/3/-1/64 502 "),
            "{}",
            line(AccessLogFormat::Haproxy, &r)
        );
    }

    /// Nothing a client sends can add a field or end a line.
    #[test]
    fn what_a_client_sends_is_escaped() {
        let mut r = record();
        r.path = "/a\"b\\c d#e".into();
        r.user = "CN=Alice Smith, O=Ex".into();
        r.user_agent = Some(http::HeaderValue::from_bytes(b"Mozilla \"x\"\t\xc3\xa9").unwrap());
        r.referer = Some(http::HeaderValue::from_static(""));
        let clf = line(AccessLogFormat::Clf, &r);
        assert_eq!(
            clf,
            "192.0.2.7 - CN=Alice\\x20Smith,\\x20O=Ex [21/Nov/2026:19:35:01 +0000] \"GET /a\\\"b\\\\c\\x20d#e HTTP/1.1\" 503 18 \"-\" \"Mozilla \\\"x\\\"\\x09\\xc3\\xa9\"\n"
        );
        let ha = line(AccessLogFormat::Haproxy, &r);
        assert!(
            ha.ends_with(" \"GET /a#22b\\c#20d#23e HTTP/1.1\"\n"),
            "{ha}"
        );
        assert_eq!(ha.matches('\n').count(), 1);
    }

    /// The date is formatted once per second and stays right across seconds.
    #[test]
    fn dates_are_reused_within_their_second() {
        let mut f = Formatter::new(AccessLogFormat::Clf);
        let mut r = refused();
        for (after_ms, want) in [
            (0, "[21/Nov/2026:19:35:01 +0000]"),
            (500, "[21/Nov/2026:19:35:01 +0000]"),
            (900, "[21/Nov/2026:19:35:02 +0000]"),
            (86_400_000, "[22/Nov/2026:19:35:01 +0000]"),
        ] {
            r.time = arrived() + Duration::from_micros(250) + Duration::from_millis(after_ms);
            let mut out = Vec::new();
            f.write(&r, &mut out);
            let l = String::from_utf8(out).unwrap();
            assert!(l.contains(want), "{after_ms}: {l}");
        }
    }

    /// The hand-written JSON line is what `serde_json` writes for the record: for full
    /// and empty records, strings that need escapes (quotes, backslashes, control bytes,
    /// non-ASCII), IPv6 clients, dates before and after a second changes, and odd floats.
    #[test]
    fn the_json_line_is_what_serde_writes() {
        let mut f = Formatter::new(AccessLogFormat::Json);
        let mut records = vec![record(), refused(), AccessRecord::default()];
        let mut odd = record();
        odd.request_id = "a\"b\\c\u{1}d\n\te\u{7f}".into();
        odd.host = "h\u{e9}llo.example\u{2028}".into();
        odd.path = "/p\u{0}ath/\"q\"".into();
        odd.user = "\u{1F600} user".into();
        odd.provider = String::new();
        odd.decision = "";
        odd.error = Some("bad \"thing\"\r\n".into());
        odd.limit = "plan:gold".into();
        odd.total_ms = 1e-7;
        odd.connect_ms = 123_456_789.125;
        odd.first_byte_ms = f64::NAN;
        odd.time = SystemTime::UNIX_EPOCH;
        records.push(odd);
        let mut later = refused();
        later.time += Duration::from_millis(1500);
        later.total_ms = 0.0;
        later.first_byte_ms = f64::INFINITY;
        records.push(later);
        for r in &records {
            let mut out = Vec::new();
            f.write(r, &mut out);
            let mut want = serde_json::to_vec(r).unwrap();
            want.push(b'\n');
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
    }

    /// What formatting a line costs, per format, on the writer thread:
    /// `cargo test --release -p portcullis-proxy format_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn format_cost() {
        let records: Vec<AccessRecord> = (0..1000u64)
            .map(|i| {
                let mut r = record();
                r.time += Duration::from_millis(i * 7);
                r.client = SocketAddr::from(([192, 0, 2, (i % 250) as u8], 40000 + i as u16));
                r
            })
            .collect();
        for format in [
            AccessLogFormat::Json,
            AccessLogFormat::Clf,
            AccessLogFormat::Haproxy,
        ] {
            let mut f = Formatter::new(format);
            let mut out = Vec::with_capacity(1024);
            let rounds = 300;
            let t = std::time::Instant::now();
            for _ in 0..rounds {
                for r in &records {
                    out.clear();
                    f.write(r, &mut out);
                    std::hint::black_box(&out);
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / (rounds * records.len()) as f64;
            println!("{format:?}: {ns:.0} ns per line, {} bytes", out.len());
        }
        // The same JSON line from the record's serde derive, for comparison.
        let mut out = Vec::with_capacity(1024);
        let t = std::time::Instant::now();
        for _ in 0..300 {
            for r in &records {
                out.clear();
                let _ = serde_json::to_writer(&mut out, r);
                out.push(b'\n');
                std::hint::black_box(&out);
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / (300 * records.len()) as f64;
        println!(
            "Json through serde: {ns:.0} ns per line, {} bytes",
            out.len()
        );
    }
}
