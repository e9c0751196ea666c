//! The canonical form of a request's target, made once at the edge before routing: the path
//! (RFC 3986 §6.2.2), the host, and the rules a listener or route sets for encoded slashes,
//! method overrides and upgrades. Routing, identity, policy, audit and the origin all see
//! this one form, so a path that an origin would read as a protected resource cannot be
//! matched as another (docs/security.md, "Canonical requests").
//!
//! Everything here is a pure function of its input and the listener's [`Rules`]; a refusal
//! is a [`Refusal`], which the request path answers with 400 and counts.
//!
//! Written by hand: the crates that normalize URLs (`url`, `percent-encoding`) decode or
//! re-encode whole strings by the WHATWG rules, which resolve dot segments and backslashes
//! the way a browser does; here each of those is a refusal or a choice, and the common path
//! must cost one scan and no allocation.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use portcullis_config::{EscapedSlashes, Listener, MethodOverride, UnderscoresInHeaders};
use std::borrow::Cow;

/// Why a request was refused before routing (400). `reason` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotAbsolute,
    InvalidEscape,
    RawByte,
    Backslash,
    EncodedControl,
    InvalidUtf8,
    DotSegment,
    EscapedSlash,
    InvalidHost,
    MethodOverride,
    InvalidMethodOverride,
    UnderscoreHeader,
    MethodCase,
    /// An NTFS stream name in a segment (`admin::$INDEX_ALLOCATION`), which IIS serves as
    /// the name before it.
    StreamName,
    /// An absolute-form target (or h2 `:scheme`) other than `http` or `https`.
    Scheme,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NotAbsolute => "not_absolute",
            Refusal::InvalidEscape => "invalid_escape",
            Refusal::RawByte => "raw_byte",
            Refusal::Backslash => "backslash",
            Refusal::EncodedControl => "encoded_control",
            Refusal::InvalidUtf8 => "invalid_utf8",
            Refusal::DotSegment => "dot_segment",
            Refusal::EscapedSlash => "escaped_slash",
            Refusal::InvalidHost => "invalid_host",
            Refusal::MethodOverride => "method_override",
            Refusal::InvalidMethodOverride => "invalid_method_override",
            Refusal::UnderscoreHeader => "underscore_header",
            Refusal::MethodCase => "method_case",
            Refusal::StreamName => "stream_name",
            Refusal::Scheme => "scheme",
        }
    }

    /// The body of the 400 answer.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::NotAbsolute => "request target must be an absolute path\n",
            Refusal::InvalidEscape => "invalid percent-encoding in the request target\n",
            Refusal::RawByte => "control or non-ASCII byte in the request path\n",
            Refusal::Backslash => "backslash in the request path\n",
            Refusal::EncodedControl => "encoded control character in the request path\n",
            Refusal::InvalidUtf8 => "percent-encoded bytes in the path are not UTF-8\n",
            Refusal::DotSegment => "path has dot segments\n",
            Refusal::EscapedSlash => "encoded slash or backslash in the request path\n",
            Refusal::InvalidHost => "invalid Host header\n",
            Refusal::MethodOverride => "method override headers are not accepted\n",
            Refusal::InvalidMethodOverride => "invalid or conflicting method override headers\n",
            Refusal::UnderscoreHeader => {
                "header names with an underscore or other punctuation are not accepted\n"
            }
            Refusal::MethodCase => "method names are case-sensitive: send them in upper case\n",
            Refusal::StreamName => "NTFS stream name in the request path\n",
            Refusal::Scheme => "the request target's scheme must be http or https\n",
        }
    }
}

/// A listener's canonicalization rules, fixed when a connection is accepted.
#[derive(Debug, Clone)]
pub struct Rules {
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashes,
    pub method_override: MethodOverride,
    pub underscores_in_headers: UnderscoresInHeaders,
    /// Allowed upgrade protocol names, lower-case.
    pub upgrades: Vec<String>,
    /// The port that a `Host` for this listener's scheme may omit (80, or 443 with TLS).
    pub default_port: u16,
    /// The largest request head, in bytes (`max_header_size`).
    pub max_header_size: u64,
}

impl Rules {
    pub fn new(l: &Listener) -> Rules {
        Rules {
            merge_slashes: l.normalize.merge_slashes,
            escaped_slashes: l.normalize.escaped_slashes,
            method_override: l.method_override,
            underscores_in_headers: l.underscores_in_headers,
            upgrades: lower_all(&l.upgrades),
            default_port: if l.tls.is_some() { 443 } else { 80 },
            max_header_size: l.max_header_size.0,
        }
    }
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::Reject,
            method_override: MethodOverride::Strip,
            underscores_in_headers: UnderscoresInHeaders::Drop,
            upgrades: vec!["websocket".into()],
            default_port: 80,
            max_header_size: 64 * 1024,
        }
    }
}

/// Upgrade protocol names, lower-case, without `h2c` (which is never forwarded).
pub fn lower_all(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|u| u.to_ascii_lowercase())
        .filter(|u| u.split('/').next() != Some("h2c"))
        .collect()
}

/// A canonical path.
#[derive(Debug, PartialEq, Eq)]
pub struct Path<'a> {
    pub path: Cow<'a, str>,
    /// It holds an encoded slash or backslash, kept encoded (`%2F`, `%5C`).
    pub escaped_slash: bool,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// A byte that the quick scan passes as is: anything but `%`, `\`, `;`, `.` runs, and what
/// is refused. `.` and `/` are looked at by the scan itself.
fn plain(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'%' | b'\\' | b';')
}

/// The canonical form of `raw`, an absolute path (without the query), or why it is refused:
///
/// - escapes of unreserved characters are decoded, other escapes upper-cased; an invalid
///   escape, an encoded control character, or encoded bytes that are not UTF-8 (overlong
///   forms such as `%C0%AF`) are refused;
/// - a raw backslash, control character or non-ASCII byte is refused;
/// - repeated slashes are merged when `merge` is set;
/// - `%2F` and `%5C` are refused, kept encoded, or decoded to `/`, by `slashes`;
/// - a dot segment (`.` or `..`, also encoded, also before a `;` parameter, also between
///   kept encoded slashes) is refused.
pub fn path(raw: &str, merge: bool, slashes: EscapedSlashes) -> Result<Path<'_>, Refusal> {
    let p = path_forms(raw, merge, slashes)?;
    if stream_name(p.path.as_bytes()) {
        return Err(Refusal::StreamName);
    }
    Ok(p)
}

/// Whether a canonical path holds an NTFS stream name: `:$` with the `:` or `$` literal or
/// encoded (`admin::$INDEX_ALLOCATION`, `file.asp::$DATA`, `%3A%3A%24…`). IIS serves
/// `/admin::$INDEX_ALLOCATION/x` as `/admin/x`, past a route or rule for `/admin/`.
fn stream_name(p: &[u8]) -> bool {
    if memchr::memchr2(b':', b'%', p).is_none() {
        return false;
    }
    let s = p.to_ascii_uppercase();
    [&b":$"[..], b":%24", b"%3A$", b"%3A%24"]
        .iter()
        .any(|n| memchr::memmem::find(&s, n).is_some())
}

fn path_forms(raw: &str, merge: bool, slashes: EscapedSlashes) -> Result<Path<'_>, Refusal> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(Refusal::NotAbsolute);
    }
    // Quick scan: most paths are already canonical and borrow the input.
    let mut seg_start = 0;
    let mut quick = true;
    for (i, &c) in b.iter().enumerate() {
        if c == b'/' {
            if (merge && i > 0 && b[i - 1] == b'/') || is_dot(&b[seg_start..i]) {
                quick = false;
                break;
            }
            seg_start = i + 1;
        } else if !plain(c) {
            quick = false;
            break;
        }
    }
    if quick {
        if is_dot(&b[seg_start..]) {
            return Err(Refusal::DotSegment);
        }
        return Ok(Path {
            path: Cow::Borrowed(raw),
            escaped_slash: false,
        });
    }
    slow_path(b, merge, slashes).map(|(p, escaped_slash)| Path {
        path: Cow::Owned(p),
        escaped_slash,
    })
}

/// Where a segment's parameters start: at its first `;`, or at an encoded one (`%3B`),
/// which some origins decode before they drop parameters (Spring's path helper does).
fn params_at(seg: &[u8]) -> Option<usize> {
    // One pass (segments are short: a substring search costs more to set up than this).
    (0..seg.len()).find(|&i| {
        seg[i] == b';' || (seg[i] == b'%' && matches!(seg.get(i + 1..i + 3), Some(b"3B" | b"3b")))
    })
}

/// `.` or `..`, alone or before a `;` parameter (`;` or `%3B`); or any name of nothing but
/// dots and encoded spaces with a dot in it (`...`, `..%20`), which Windows (IIS) reads as
/// `.` or `..` once it drops a name's trailing dots and spaces.
fn is_dot(seg: &[u8]) -> bool {
    // A name that starts with neither can be no dot segment (most of them).
    if !matches!(seg.first(), Some(b'.' | b'%')) {
        return false;
    }
    let name = match params_at(seg) {
        Some(i) => &seg[..i],
        None => seg,
    };
    match name {
        b"." | b".." => true,
        [b'.' | b'%', ..] => {
            let mut n = name;
            let mut dots = false;
            loop {
                if let Some(r) = n.strip_prefix(b".") {
                    dots = true;
                    n = r;
                } else if let Some(r) = n.strip_prefix(b"%20") {
                    n = r;
                } else {
                    break;
                }
            }
            dots && n.is_empty()
        }
        _ => false,
    }
}

fn slow_path(b: &[u8], merge: bool, slashes: EscapedSlashes) -> Result<(String, bool), Refusal> {
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut escaped_slash = false;
    // Encoded bytes of 0x80 and up, waiting to be checked as UTF-8 once their run ends.
    let mut high: smallvec::SmallVec<[u8; 8]> = smallvec::SmallVec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let v = match (
                b.get(i + 1).and_then(|&x| hex(x)),
                b.get(i + 2).and_then(|&x| hex(x)),
            ) {
                (Some(h), Some(l)) => h << 4 | l,
                _ => return Err(Refusal::InvalidEscape),
            };
            i += 3;
            if v >= 0x80 {
                high.push(v);
                out.extend_from_slice(&[b'%', HEX[(v >> 4) as usize], HEX[(v & 15) as usize]]);
                continue;
            }
            end_run(&mut high)?;
            if unreserved(v) {
                out.push(v);
            } else if v < 0x20 || v == 0x7f {
                return Err(Refusal::EncodedControl);
            } else if v == b'/' || v == b'\\' {
                match slashes {
                    EscapedSlashes::Reject => return Err(Refusal::EscapedSlash),
                    EscapedSlashes::Keep => {
                        escaped_slash = true;
                        out.extend_from_slice(&[
                            b'%',
                            HEX[(v >> 4) as usize],
                            HEX[(v & 15) as usize],
                        ]);
                    }
                    EscapedSlashes::Decode => {
                        if !(merge && out.last() == Some(&b'/')) {
                            out.push(b'/');
                        }
                    }
                }
            } else {
                out.extend_from_slice(&[b'%', HEX[(v >> 4) as usize], HEX[(v & 15) as usize]]);
            }
            continue;
        }
        end_run(&mut high)?;
        match c {
            b'\\' => return Err(Refusal::Backslash),
            b'/' if merge && out.last() == Some(&b'/') => {}
            c if c.is_ascii_graphic() => out.push(c),
            _ => return Err(Refusal::RawByte),
        }
        i += 1;
    }
    end_run(&mut high)?;
    // Dot segments, between slashes and between kept encoded slashes alike: an origin that
    // decodes `%2F` before resolving dot segments must not climb out of a kept segment.
    for seg in out.split(|&c| c == b'/') {
        let mut rest = seg;
        loop {
            let cut = find_escaped_slash(rest);
            let (part, next) = match cut {
                Some(k) => (&rest[..k], Some(&rest[k + 3..])),
                None => (rest, None),
            };
            if is_dot(part) {
                return Err(Refusal::DotSegment);
            }
            match next {
                Some(n) => rest = n,
                None => break,
            }
        }
    }
    // Only ASCII was pushed.
    String::from_utf8(out)
        .map(|s| (s, escaped_slash))
        .map_err(|_| Refusal::RawByte)
}

fn find_escaped_slash(s: &[u8]) -> Option<usize> {
    s.windows(3)
        .position(|w| w[0] == b'%' && (w[1..] == *b"2F" || w[1..] == *b"5C"))
}

fn end_run(high: &mut smallvec::SmallVec<[u8; 8]>) -> Result<(), Refusal> {
    if high.is_empty() {
        return Ok(());
    }
    let ok = std::str::from_utf8(high).is_ok();
    high.clear();
    if ok {
        Ok(())
    } else {
        Err(Refusal::InvalidUtf8)
    }
}

/// The path routes are matched on: the canonical path without `;` parameters in its
/// segments (`/admin;v=1/x` is `/admin/x`), since origins such as Tomcat and Spring drop them
/// before they route; parameters after an encoded `;` (`/admin%3Bv=1/x`) too, since some
/// decode it first.
pub fn match_path(p: &str) -> Cow<'_, str> {
    if !needs_matching_form(p.as_bytes()) {
        return Cow::Borrowed(p);
    }
    let mut out = String::with_capacity(p.len());
    let segs: Vec<&str> = p.split('/').collect();
    for (i, seg) in segs.iter().enumerate() {
        let name = windows_name(&seg[..params_at(seg.as_bytes()).unwrap_or(seg.len())]);
        // A segment of parameters only (`/;x/admin`) is no segment to such an origin: it
        // reads `/admin`. A last one still ends the path with `/`.
        if i > 0 && name.is_empty() && !seg.is_empty() && i + 1 < segs.len() {
            continue;
        }
        if i > 0 {
            out.push('/');
        }
        out.push_str(name);
    }
    Cow::Owned(out)
}

/// Whether [`match_path`] changes `p`: a `;` (or `%3B`), or a segment that ends with a dot
/// or `%20`. One pass over the bytes (this runs on every request; most paths have none).
fn needs_matching_form(p: &[u8]) -> bool {
    p.iter().enumerate().any(|(i, &b)| match b {
        b';' => true,
        b'.' => matches!(p.get(i + 1), None | Some(b'/')),
        b'%' => {
            matches!(p.get(i + 1..i + 3), Some(b"3B" | b"3b")) || {
                p.get(i + 1..i + 3) == Some(b"20")
            }
        }
        _ => false,
    })
}

/// A segment's name as Windows (IIS) reads it: without trailing dots and spaces (`admin.`
/// and `admin%20` are `admin`), so that a route or a `deny` on `/admin/` also takes them. A
/// name of nothing but dots and spaces is left as it is.
fn windows_name(name: &str) -> &str {
    let mut n = name;
    loop {
        if let Some(r) = n.strip_suffix('.') {
            n = r;
        } else if let Some(r) = n.strip_suffix("%20") {
            n = r;
        } else {
            break;
        }
    }
    if n.is_empty() {
        name
    } else {
        n
    }
}

/// Checks the query's escapes; the query is otherwise forwarded as sent.
pub fn query(q: &str) -> Result<(), Refusal> {
    let b = q.as_bytes();
    let mut from = 0;
    while let Some(k) = memchr::memchr(b'%', &b[from..]) {
        let i = from + k;
        if b.get(i + 1).and_then(|&x| hex(x)).is_none()
            || b.get(i + 2).and_then(|&x| hex(x)).is_none()
        {
            return Err(Refusal::InvalidEscape);
        }
        from = i + 3;
    }
    Ok(())
}

/// A canonical host: `name` is what routes match (lower-case, no trailing dot, no port);
/// `authority` is what the origin is sent as `Host` (the name, and a port other than the
/// scheme's default).
#[derive(Debug, PartialEq, Eq)]
pub struct Host<'a> {
    pub name: Cow<'a, str>,
    pub authority: HeaderValue,
}

/// The canonical form of a `Host` header or an `:authority`, or None for a malformed one.
/// Allowed: a DNS-style name (letters, digits, `-`, `_`, non-empty labels, one trailing dot
/// dropped), an IPv4 address, or an IPv6 literal in brackets; then an optional decimal port.
/// A host already in canonical form is borrowed, not copied.
pub fn host(raw: &HeaderValue, default_port: u16) -> Option<Host<'_>> {
    let bytes = raw.as_bytes();
    if bytes.is_empty() || bytes.len() > 262 {
        return None;
    }
    // Split off the port: after `]` for an IPv6 literal, else after the last `:`.
    let (name, port) = if bytes[0] == b'[' {
        let end = memchr::memchr(b']', bytes)?;
        (&bytes[..=end], &bytes[end + 1..])
    } else {
        match memchr::memrchr(b':', bytes) {
            Some(i) => (&bytes[..i], &bytes[i..]),
            None => (bytes, &bytes[bytes.len()..]),
        }
    };
    let port: Option<u16> = match port.strip_prefix(b":") {
        // `host:` is allowed (RFC 3986 §3.2.3) and means the default port.
        Some([]) => Some(default_port),
        Some(p) if p.len() <= 5 && p.iter().all(u8::is_ascii_digit) => {
            Some(std::str::from_utf8(p).ok()?.parse().ok()?)
        }
        Some(_) => return None,
        None if port.is_empty() => None,
        None => return None,
    };
    let trailing_dot = name.len() > 1 && name.ends_with(b".") && name[0] != b'[';
    let name = if trailing_dot {
        &name[..name.len() - 1]
    } else {
        name
    };
    let ok = if name.first() == Some(&b'[') {
        let v6 = &name[1..name.len() - 1];
        !v6.is_empty()
            && v6
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
            && std::str::from_utf8(v6)
                .ok()
                .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
                .is_some()
    } else {
        !name.is_empty()
            && name.len() <= 253
            && name.split(|&b| b == b'.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            })
    };
    if !ok {
        return None;
    }
    // Checked above: ASCII only.
    let text = std::str::from_utf8(name).ok()?;
    // An IP address in its one standard form, as routes are written: `[0::1]` is `[::1]`;
    // a name whose last label is all digits is an IPv4 address, and only dotted decimal
    // without leading zeros is one (`10.000.0.5`, `10.5` or `0x0a.0.0.5` would each be read
    // as some address by some origin, and match no route written for it).
    let v6 = name[0] == b'['
        && text[1..text.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|a| format!("[{a}]"))
            .filter(|c| c != text)
            .is_some();
    let last = name.rsplit(|&b| b == b'.').next().unwrap_or(name);
    if name[0] != b'[' && numeric_label(last) && !dotted_decimal(name) {
        return None;
    }
    let upper = name.iter().any(u8::is_ascii_uppercase);
    if !upper && !trailing_dot && !v6 && port != Some(default_port) {
        return Some(Host {
            name: Cow::Borrowed(text),
            authority: raw.clone(),
        });
    }
    let name = match text[1..].strip_suffix(']') {
        Some(a) if name[0] == b'[' => format!("[{}]", a.parse::<std::net::Ipv6Addr>().ok()?),
        _ => text.to_ascii_lowercase(),
    };
    let authority = match port {
        Some(p) if p != default_port => HeaderValue::try_from(format!("{name}:{p}")).ok()?,
        _ => HeaderValue::try_from(name.as_str()).ok()?,
    };
    Some(Host {
        name: Cow::Owned(name),
        authority,
    })
}

/// Whether `name` is an IPv4 address in its one standard form: four decimal numbers up to
/// 255, without leading zeros (what parsing and printing it again would give, without the
/// formatting on every request to an IP host).
fn dotted_decimal(name: &[u8]) -> bool {
    let (mut parts, mut value, mut digits) = (1, 0u32, 0);
    for &b in name {
        match b {
            b'.' if digits > 0 && parts < 4 => (parts, value, digits) = (parts + 1, 0, 0),
            // No leading zero: a digit after a first `0` is refused.
            b'0'..=b'9' if digits < 3 && !(digits == 1 && value == 0) => {
                value = value * 10 + u32::from(b - b'0');
                digits += 1;
                if value > 255 {
                    return false;
                }
            }
            _ => return false,
        }
    }
    parts == 4 && digits > 0
}

/// Whether a host's last label makes it an IPv4 address to URL parsers (WHATWG's "ends in a
/// number"): all decimal digits, or `0x` and hex digits (`10.0.0.0x5` is 10.0.0.5 to some).
fn numeric_label(label: &[u8]) -> bool {
    match label {
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        _ => !label.is_empty() && label.iter().all(u8::is_ascii_digit),
    }
}

/// A request's canonical target.
#[derive(Debug)]
pub struct Target<'a> {
    /// None when the request named no host (HTTP/1.0 without `Host`).
    pub host: Option<Host<'a>>,
    pub path: Path<'a>,
    /// The query, as sent (its escapes checked).
    pub query: Option<&'a str>,
}

/// The canonical target of a request: `raw_host` is the host it named (`Host`, `:authority`
/// or an absolute-form target's authority), empty if none. Encoded slashes are kept opaque
/// (or decoded, when the listener says `decode`): whether they are refused is the route's
/// call, once it is known.
pub fn target<'a>(
    uri: &'a Uri,
    raw_host: &'a HeaderValue,
    rules: &Rules,
) -> Result<Target<'a>, Refusal> {
    // `ftp://host/x` is no request for this proxy (nor for any origin behind it).
    if uri
        .scheme_str()
        .is_some_and(|sc| !sc.eq_ignore_ascii_case("http") && !sc.eq_ignore_ascii_case("https"))
    {
        return Err(Refusal::Scheme);
    }
    let host = if raw_host.is_empty() {
        None
    } else {
        Some(host(raw_host, rules.default_port).ok_or(Refusal::InvalidHost)?)
    };
    let raw_path = match uri.path() {
        // An absolute-form target with no path (`http://a.example`) asks for `/`; an
        // authority-form one (`CONNECT a.example:443`) asks for no path at all.
        "" if uri.scheme().is_some() => "/",
        p => p,
    };
    let slashes = match rules.escaped_slashes {
        EscapedSlashes::Decode => EscapedSlashes::Decode,
        _ => EscapedSlashes::Keep,
    };
    let path = path(raw_path, rules.merge_slashes, slashes)?;
    let query = uri.query();
    if let Some(q) = query {
        self::query(q)?;
    }
    Ok(Target { host, path, query })
}

/// The size of a request head as `max_header_size` counts it: the request line, and each
/// field as its name, its value and 4 bytes (`: ` and CRLF).
pub fn head_size(method: &Method, uri: &Uri, headers: &HeaderMap) -> u64 {
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let fields: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    (method.as_str().len() + target + 12 + fields) as u64
}

static OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

fn is_override(k: &HeaderName) -> bool {
    OVERRIDES.iter().any(|o| o == k)
}

/// Applies a method-override rule to the request's headers: `strip` removes the headers,
/// `reject` refuses a request that has one, and `honor` returns the method they name (all
/// of them must name the same valid method), which policy and audit then see.
pub fn method_override(
    headers: &mut HeaderMap,
    mode: MethodOverride,
) -> Result<Option<Method>, Refusal> {
    if !headers.keys().any(is_override) {
        return Ok(None);
    }
    match mode {
        MethodOverride::Strip => {
            for n in &OVERRIDES {
                headers.remove(n);
            }
            Ok(None)
        }
        MethodOverride::Reject => Err(Refusal::MethodOverride),
        MethodOverride::Honor => {
            let mut found: Option<Method> = None;
            for v in OVERRIDES.iter().flat_map(|n| headers.get_all(n)) {
                let m = Method::from_bytes(&v.as_bytes().trim_ascii().to_ascii_uppercase())
                    .map_err(|_| Refusal::InvalidMethodOverride)?;
                if found.as_ref().is_some_and(|f| *f != m) {
                    return Err(Refusal::InvalidMethodOverride);
                }
                found = Some(m);
            }
            Ok(found)
        }
    }
}

/// Applies a method-override rule to the request's override headers and to its `_method`
/// query parameters ([`method_param`]): what [`method_override`] does to the headers, done
/// to the parameters too (`strip` removes them from the target the origin is sent). Under
/// `honor`, all must name the same method.
pub fn overrides(
    headers: &mut HeaderMap,
    uri: &mut Uri,
    mode: MethodOverride,
) -> Result<Option<Method>, Refusal> {
    let by_header = method_override(headers, mode)?;
    let by_param = method_param(uri, mode)?;
    match (by_header, by_param) {
        (Some(h), Some(p)) if h != p => Err(Refusal::InvalidMethodOverride),
        (h, p) => Ok(h.or(p)),
    }
}

/// Applies a method-override rule to the `_method` parameters of the query: Express's
/// `method-override` (`methodOverride('_method')`), Laravel and Symfony, and Spring's
/// `HiddenHttpMethodFilter` run the method such a parameter names, as the override headers
/// do. A parameter is one when its name, decoded as those frameworks decode it
/// ([`is_method_param`]), is `_method`. `strip` removes such parameters from the target
/// (the others are kept byte for byte), `reject` refuses the request, and `honor` returns
/// the method they name (all must name the same valid method).
pub fn method_param(uri: &mut Uri, mode: MethodOverride) -> Result<Option<Method>, Refusal> {
    let Some(q) = uri.query() else {
        return Ok(None);
    };
    // Most queries name no method at all, escaped or not: one scan.
    let b = q.as_bytes();
    if !b.contains(&b'%') && !b.windows(6).any(|w| w.eq_ignore_ascii_case(b"method")) {
        return Ok(None);
    }
    let params: Vec<&str> = q.split('&').collect();
    // A parameter, or a `;`-separated part of one (PHP with `arg_separator.input=";&"`,
    // Rack 2 split on `;` too), that names the method. A parameter with such a part goes as
    // a whole under `strip`.
    let is_override = |p: &&str| method_values(p).next().is_some();
    if !params.iter().any(is_override) {
        return Ok(None);
    }
    match mode {
        MethodOverride::Reject => Err(Refusal::MethodOverride),
        MethodOverride::Honor => {
            let mut found: Option<Method> = None;
            for v in params.iter().flat_map(|p| method_values(p)) {
                let v = form_decode(v.as_bytes());
                let m = Method::from_bytes(&v.trim_ascii().to_ascii_uppercase())
                    .map_err(|_| Refusal::InvalidMethodOverride)?;
                if found.as_ref().is_some_and(|f| *f != m) {
                    return Err(Refusal::InvalidMethodOverride);
                }
                found = Some(m);
            }
            Ok(found)
        }
        MethodOverride::Strip => {
            let kept: Vec<&str> = params.into_iter().filter(|p| !is_override(p)).collect();
            let pq = match (uri.path(), kept.is_empty()) {
                ("", true) => "/".to_string(),
                (path, true) => path.to_string(),
                (path, false) => format!("{path}?{}", kept.join("&")),
            };
            let mut parts = uri.clone().into_parts();
            parts.path_and_query = Some(pq.parse().map_err(|_| Refusal::InvalidEscape)?);
            *uri = Uri::from_parts(parts).map_err(|_| Refusal::InvalidEscape)?;
            Ok(None)
        }
    }
}

/// Whether a query parameter's name (as sent) reads as `_method` to an origin framework:
/// percent-escapes and `+` decoded (Express's `qs`, PHP, servlet containers), then PHP's
/// reading of leading spaces (dropped) and of `.` and ` ` (as `_`), in any case, with an
/// array suffix (`_method[]`) read as the name before it, and a name cut at a NUL as PHP cuts
/// it (`_method%00x`).
fn is_method_param(name: &str) -> bool {
    let decoded = form_decode(name.as_bytes());
    // PHP ends a name at a NUL: `_method%00x` is `_method` to it.
    let n = decoded.split(|&b| b == 0).next().unwrap_or(&decoded);
    let n = n.trim_ascii_start();
    let n = n.split(|&b| b == b'[').next().unwrap_or(n);
    n.len() == 7
        && n.iter()
            .map(|&b| match b {
                b'.' | b' ' => b'_',
                b => b.to_ascii_lowercase(),
            })
            .eq(b"_method".iter().copied())
}

/// The values of the parts of query parameter `p` (split at `;`) that name the method.
fn method_values(p: &str) -> impl Iterator<Item = &str> {
    p.split(';')
        .filter(|part| is_method_param(part.split_once('=').map_or(*part, |(k, _)| k)))
        .map(|part| part.split_once('=').map_or("", |(_, v)| v))
}

/// A query component decoded as HTML forms encode it: `+` is a space, then percent-escapes.
fn form_decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if !raw.contains(&b'%') && !raw.contains(&b'+') {
        return Cow::Borrowed(raw);
    }
    let spaced: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    Cow::Owned(percent_encoding::percent_decode(&spaced).collect())
}

/// Applies a listener's rule for request header names with a byte other than a letter, a
/// digit or `-` (`X_User`, `Transfer_Encoding`, `X.User`): `drop` removes them, `reject`
/// refuses the request, `allow` keeps them, less those that read as a field portcullis owns
/// ([`crate::fields`]). CGI-style origin servers read each such byte as `-`, so such a name
/// would carry, past portcullis, a header that it frames the request by, removes or sets
/// itself (docs/security.md). Under `allow`, the upstream head drops too a name that reads
/// as a field it carries (when it is built).
pub fn underscore_headers(
    headers: &mut HeaderMap,
    mode: UnderscoresInHeaders,
) -> Result<(), Refusal> {
    // One pass over the names, no allocation: most requests have none.
    let has = |k: &HeaderName| crate::fields::is_unusual(k.as_str());
    if !headers.keys().any(has) {
        return Ok(());
    }
    if mode == UnderscoresInHeaders::Reject {
        return Err(Refusal::UnderscoreHeader);
    }
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            (mode == UnderscoresInHeaders::Drop && has(k))
                || crate::fields::cgi_reading(k.as_str())
                    .is_some_and(|n| crate::fields::is_owned(&n))
        })
        .cloned()
        .collect();
    for n in doomed {
        headers.remove(n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass checks give what the plain definitions (parse and print again; the
    /// substring searches) give.
    #[test]
    fn the_fast_checks_agree_with_their_definitions() {
        let mut texts: Vec<String> = [
            "0.0.0.0",
            "10.0.0.5",
            "255.255.255.255",
            "256.0.0.1",
            "10.000.0.5",
            "10.5",
            "01.2.3.4",
            "1.2.3.4.5",
            "1.2.3.",
            ".1.2.3",
            "1..2.3",
            "1.2.3.04",
            "100.200.300.1",
            "9.99.199.249",
            "1.2.3.4a",
            "",
            "1234.1.1.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for a in [0u32, 1, 9, 10, 99, 100, 199, 200, 249, 250, 255, 256, 999] {
            texts.push(format!("{a}.{a}.0.{a}"));
            texts.push(format!("0{a}.1.1.1"));
        }
        for t in &texts {
            let want = t
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|a| a.to_string() == *t);
            assert_eq!(dotted_decimal(t.as_bytes()), want, "{t}");
        }
        for p in [
            "/", "/a/b", "/a.b/c", "/a./c", "/a.", "/x;y", "/x%3By", "/x%3by", "/a%20/b", "/a%20b",
            "/a%2", "/%", "/a%3", ".", "/..", "/a.b",
        ] {
            let want = p.ends_with('.')
                || p.contains("./")
                || p.contains("%20")
                || p.contains(';')
                || p.contains("%3B")
                || p.contains("%3b");
            assert_eq!(needs_matching_form(p.as_bytes()), want, "{p}");
        }
    }
    use EscapedSlashes::*;

    fn canon(raw: &str) -> Result<String, Refusal> {
        path(raw, true, Reject).map(|p| p.path.into_owned())
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for p in ["/", "/admin", "/a/b.c/d-e_f~g", "/a/..b/c.d", "/x/"] {
            assert!(
                matches!(path(p, true, Reject).unwrap().path, Cow::Borrowed(_)),
                "{p}"
            );
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        assert_eq!(canon("/%61dmin").unwrap(), "/admin");
        assert_eq!(canon("/%41DMIN").unwrap(), "/ADMIN");
        assert_eq!(canon("/a%2dz%7E").unwrap(), "/a-z~");
        assert_eq!(canon("/a%3fb%23c%25d").unwrap(), "/a%3Fb%23c%25d");
        assert_eq!(canon("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(canon("/a%20b").unwrap(), "/a%20b");
    }

    #[test]
    fn bad_escapes_and_bytes_are_refused() {
        assert_eq!(canon("/a%zz"), Err(Refusal::InvalidEscape));
        assert_eq!(canon("/a%4"), Err(Refusal::InvalidEscape));
        assert_eq!(canon("/a%"), Err(Refusal::InvalidEscape));
        assert_eq!(canon("/admin%00"), Err(Refusal::EncodedControl));
        assert_eq!(canon("/a%0d%0ab"), Err(Refusal::EncodedControl));
        assert_eq!(canon("/a%7f"), Err(Refusal::EncodedControl));
        assert_eq!(canon("/%c0%af..%c0%afadmin"), Err(Refusal::InvalidUtf8));
        assert_eq!(canon("/x%c0%afadmin"), Err(Refusal::InvalidUtf8));
        assert_eq!(canon("/%ff"), Err(Refusal::InvalidUtf8));
        assert_eq!(canon("/%c3x%a9"), Err(Refusal::InvalidUtf8));
        assert_eq!(canon("/x\\..\\admin"), Err(Refusal::Backslash));
        assert_eq!(canon("/a\0b"), Err(Refusal::RawByte));
        assert_eq!(canon("/caf\u{e9}"), Err(Refusal::RawByte));
        assert_eq!(canon("/a b"), Err(Refusal::RawByte));
        assert_eq!(canon("admin"), Err(Refusal::NotAbsolute));
        assert_eq!(canon("*"), Err(Refusal::NotAbsolute));
    }

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for p in [
            "/a/../admin",
            "/./x",
            "/a/..",
            "/a/.",
            "/a/%2e%2E/admin",
            "/a/.%2e/admin",
            "/%2e/admin",
            "/x/..;/admin",
            "/x/.;a=b/admin",
            "/x/%2e%2e;/admin",
            "/x/%2e%2e%3b/admin",
            "/x/..%3B/admin",
            "/x/.%3Ba/admin",
            // Names Windows (IIS) reads as `.` or `..` once it drops trailing dots and spaces.
            "/a/...",
            "/a/..%20/admin",
            "/a/.%20/admin",
            "/a/%20../admin",
            "/a/.%2E%20",
        ] {
            assert_eq!(canon(p), Err(Refusal::DotSegment), "{p}");
        }
        for p in [
            "/admin::$INDEX_ALLOCATION/x",
            "/admin:$i30:$INDEX_ALLOCATION/x",
            "/default.asp::$DATA",
            "/admin%3A%3A%24INDEX_ALLOCATION/x",
            "/admin%3a%3a%24index_allocation/x",
            "/admin:%24x",
        ] {
            assert_eq!(canon(p), Err(Refusal::StreamName), "{p}");
        }
        assert_eq!(canon("/a:b/c$d").unwrap(), "/a:b/c$d");
        assert_eq!(canon("/a/..b/c.d").unwrap(), "/a/..b/c.d");
        assert_eq!(canon("/a/%20/b").unwrap(), "/a/%20/b");
        assert_eq!(canon("/a/.hidden/b").unwrap(), "/a/.hidden/b");
    }

    #[test]
    fn slashes_are_merged_unless_told_not_to() {
        assert_eq!(canon("//admin").unwrap(), "/admin");
        assert_eq!(canon("///a//b/").unwrap(), "/a/b/");
        let kept = path("//a", false, Reject).unwrap();
        assert_eq!(kept.path, "//a");
    }

    #[test]
    fn escaped_slashes_follow_the_setting() {
        for p in ["/x%2f..%2fadmin", "/a%2Fb", "/a%5cb", "/%2Fadmin"] {
            assert_eq!(canon(p), Err(Refusal::EscapedSlash), "{p}");
        }
        let k = path("/repo/a%2fb", true, Keep).unwrap();
        assert_eq!(k.path, "/repo/a%2Fb");
        assert!(k.escaped_slash);
        // Kept slashes still bound dot segments.
        assert_eq!(
            path("/repo/x%2F..%2F..%2Fadmin", true, Keep),
            Err(Refusal::DotSegment)
        );
        assert_eq!(path("/a%2fb%5Cc", true, Decode).unwrap().path, "/a/b/c");
        assert_eq!(path("/%2Fadmin", true, Decode).unwrap().path, "/admin");
        assert_eq!(
            path("/x%2f..%2fadmin", true, Decode),
            Err(Refusal::DotSegment)
        );
    }

    #[test]
    fn parameters_are_dropped_for_matching_only() {
        assert_eq!(canon("/admin;x=1/y").unwrap(), "/admin;x=1/y");
        assert_eq!(match_path("/admin;x=1/y"), "/admin/y");
        assert_eq!(match_path("/;x/admin"), "/admin");
        assert_eq!(match_path("/;/admin"), "/admin");
        assert_eq!(match_path("/a;/admin"), "/a/admin");
        assert_eq!(match_path("/admin/;x"), "/admin/");
        assert_eq!(match_path("/plain"), "/plain");
        // An encoded `;` starts parameters too, for origins that decode it first.
        assert_eq!(match_path("/admin%3Bx=1/y"), "/admin/y");
        // Trailing dots and spaces, which Windows (IIS) drops from a name.
        assert_eq!(match_path("/admin./x"), "/admin/x");
        assert_eq!(match_path("/admin%20/x"), "/admin/x");
        assert_eq!(match_path("/admin.%20."), "/admin");
        assert_eq!(match_path("/a/.../b"), "/a/.../b");
        assert_eq!(match_path("/v1.2/x"), "/v1.2/x");
        assert!(matches!(match_path("/plain/path"), Cow::Borrowed(_)));
        assert_eq!(match_path("/%3Bx/admin"), "/admin");
        assert_eq!(match_path("/a%3Bb;c/d"), "/a/d");
    }

    #[test]
    fn queries_need_valid_escapes_only() {
        assert!(query("a=%41&b=c d").is_ok());
        assert!(query("a=%4").is_err());
        assert!(query("a=%gg").is_err());
        assert!(query("").is_ok());
    }

    #[test]
    fn hosts_are_canonical() {
        let h = |s: &str| {
            let v = HeaderValue::from_bytes(s.as_bytes()).ok()?;
            host(&v, 80).map(|h| {
                (
                    h.name.into_owned(),
                    h.authority.to_str().unwrap().to_string(),
                )
            })
        };
        let same = |s: &str| Some((s.to_string(), s.to_string()));
        assert_eq!(h("Example.COM"), same("example.com"));
        assert_eq!(h("b.example."), same("b.example"));
        assert_eq!(h("B.EXAMPLE.:80"), same("b.example"));
        assert_eq!(
            h("b.example.:8080"),
            Some(("b.example".into(), "b.example:8080".into()))
        );
        assert_eq!(h("example.com:"), same("example.com"));
        assert_eq!(h("[::1]:80"), same("[::1]"));
        assert_eq!(h("[::1]:443"), Some(("[::1]".into(), "[::1]:443".into())));
        assert_eq!(
            host(&HeaderValue::from_static("a.example:443"), 443).map(|h| h.authority),
            Some(HeaderValue::from_static("a.example"))
        );
        let plain = HeaderValue::from_static("a.example:8080");
        assert!(matches!(
            host(&plain, 80).unwrap().name,
            Cow::Borrowed("a.example")
        ));
        assert_eq!(h("my_service"), same("my_service"));
        // IP addresses in their one standard form.
        assert_eq!(h("10.0.0.5"), same("10.0.0.5"));
        assert_eq!(h("10.0.0.5.:80"), same("10.0.0.5"));
        assert_eq!(h("[0::1]"), same("[::1]"));
        assert_eq!(
            h("[0:0::ABCD]:8080"),
            Some(("[::abcd]".into(), "[::abcd]:8080".into()))
        );
        assert_eq!(h("a.example.123abc"), same("a.example.123abc"));
        for bad in [
            "10.000.0.5",
            "010.0.0.5",
            "10.5",
            "167772165",
            "0x0a.0.0.5",
            "10.0.0.0x5",
            "0x0a",
            "a.0X",
            "1.2.3.4.5",
            "256.0.0.1",
            "a b",
            "evil/..",
            "example.com:99999",
            "example.com:+80",
            "a:b",
            "a:1:2",
            "[::1]x",
            "[]:80",
            "[zz]",
            "user@example.com",
            "a..b",
            ".a",
            "b.example..",
            "",
            ":80",
            "a%2eb",
            "caf\u{e9}.example",
        ] {
            assert_eq!(h(bad), None, "{bad}");
        }
    }

    #[test]
    fn targets_are_canonical_or_refused() {
        let rules = Rules::default();
        let uri: Uri = "http://B.Example.:80".parse().unwrap();
        let host = HeaderValue::from_static("B.Example.:80");
        let t = target(&uri, &host, &rules).unwrap();
        assert_eq!(t.path.path, "/");
        assert_eq!(t.host.unwrap().name, "b.example");
        let uri: Uri = "/repo/a%2fb?x=%41".parse().unwrap();
        let none = HeaderValue::from_static("");
        let t = target(&uri, &none, &rules).unwrap();
        assert_eq!(t.path.path, "/repo/a%2Fb");
        assert!(t.path.escaped_slash && t.host.is_none());
        assert_eq!(t.query, Some("x=%41"));
        let uri: Uri = "b.example:443".parse().unwrap();
        assert_eq!(
            target(&uri, &none, &rules).unwrap_err(),
            Refusal::NotAbsolute
        );
        let uri: Uri = "/a?x=%4".parse().unwrap();
        assert_eq!(
            target(&uri, &none, &rules).unwrap_err(),
            Refusal::InvalidEscape
        );
        for other in [
            "ftp://b.example/x",
            "ws://b.example/x",
            "file://b.example/etc",
        ] {
            let uri: Uri = other.parse().unwrap();
            let host = HeaderValue::from_static("b.example");
            assert_eq!(target(&uri, &host, &rules).unwrap_err(), Refusal::Scheme);
        }
        for ok in ["HTTPS://b.example/x", "http://b.example/x"] {
            let uri: Uri = ok.parse().unwrap();
            let host = HeaderValue::from_static("b.example");
            assert!(target(&uri, &host, &rules).is_ok(), "{ok}");
        }
    }

    #[test]
    fn method_parameters_follow_the_rule_however_they_are_spelled() {
        let target = |u: &str, mode| {
            let mut uri: Uri = u.parse().unwrap();
            let r = method_param(&mut uri, mode);
            (r, uri.to_string())
        };
        // Spellings Express (qs), PHP and servlet containers read as `_method`.
        for q in [
            "_method=DELETE",
            "_METHOD=DELETE",
            "%5Fmethod=DELETE",
            "_%6Dethod=DELETE",
            ".method=DELETE",
            "+_method=DELETE",
            "_method[]=DELETE",
            "_method[0]=DELETE",
            // PHP ends a name at a NUL.
            "_method%00junk=DELETE",
            // `;` separates parameters for PHP (`arg_separator.input`) and Rack 2: the
            // parameter holding it goes as a whole.
            "x=1;_method=DELETE",
        ] {
            let u = format!("/api/items/1?a=1&{q}&b=%41");
            assert_eq!(
                target(&u, MethodOverride::Strip),
                (Ok(None), "/api/items/1?a=1&b=%41".to_string()),
                "{q}"
            );
            assert_eq!(
                target(&u, MethodOverride::Reject).0,
                Err(Refusal::MethodOverride),
                "{q}"
            );
            assert_eq!(
                target(&u, MethodOverride::Honor),
                (Ok(Some(Method::DELETE)), u.clone()),
                "{q}"
            );
        }
        // The only parameter: the query goes, the path stays as sent.
        assert_eq!(
            target("/a/%2e?_method=PUT", MethodOverride::Strip).1,
            "/a/%2e"
        );
        assert_eq!(
            target("http://app.test/x?_method=PUT&y", MethodOverride::Strip).1,
            "http://app.test/x?y"
        );
        // Not the parameter.
        for u in [
            "/x?method=DELETE",
            "/x?_methods=DELETE",
            "/x?x_method=DELETE",
            "/x?a=_method",
            "/x?%41=1",
            "/x",
        ] {
            assert_eq!(target(u, MethodOverride::Reject), (Ok(None), u.to_string()));
        }
        assert_eq!(
            target("/x?_method=PUT&_method=DELETE", MethodOverride::Honor).0,
            Err(Refusal::InvalidMethodOverride)
        );
        assert_eq!(
            target("/x?_method=DE%20LETE", MethodOverride::Honor).0,
            Err(Refusal::InvalidMethodOverride)
        );
        // A header and a parameter that disagree.
        let mut h = HeaderMap::new();
        h.insert("x-http-method-override", "PUT".parse().unwrap());
        let mut uri: Uri = "/x?_method=DELETE".parse().unwrap();
        assert_eq!(
            overrides(&mut h, &mut uri, MethodOverride::Honor),
            Err(Refusal::InvalidMethodOverride)
        );
        let mut uri: Uri = "/x?_method=put".parse().unwrap();
        assert_eq!(
            overrides(&mut h, &mut uri, MethodOverride::Honor),
            Ok(Some(Method::PUT))
        );
    }

    #[test]
    fn method_overrides_follow_the_rule() {
        let with = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        for name in [
            "X-HTTP-Method-Override",
            "X-HTTP-Method",
            "X-Method-Override",
        ] {
            let mut h = with(&[(name, "DELETE"), ("x-other", "1")]);
            assert_eq!(method_override(&mut h, MethodOverride::Strip), Ok(None));
            assert_eq!(h.len(), 1, "{name} stripped");
            let mut h = with(&[(name, "DELETE")]);
            assert_eq!(
                method_override(&mut h, MethodOverride::Reject),
                Err(Refusal::MethodOverride)
            );
            let mut h = with(&[(name, " delete ")]);
            assert_eq!(
                method_override(&mut h, MethodOverride::Honor),
                Ok(Some(Method::DELETE))
            );
            assert_eq!(h.len(), 1, "{name} kept when honored");
        }
        let mut h = with(&[("x-http-method", "DELETE"), ("x-method-override", "PUT")]);
        assert_eq!(
            method_override(&mut h, MethodOverride::Honor),
            Err(Refusal::InvalidMethodOverride)
        );
        let mut h = with(&[("x-http-method", "DE LETE")]);
        assert_eq!(
            method_override(&mut h, MethodOverride::Honor),
            Err(Refusal::InvalidMethodOverride)
        );
        let mut none = HeaderMap::new();
        assert_eq!(method_override(&mut none, MethodOverride::Reject), Ok(None));
    }

    #[test]
    fn header_names_with_underscores_follow_the_rule() {
        let request = || {
            let mut h = HeaderMap::new();
            for (k, v) in [
                ("Transfer_Encoding", "chunked"),
                ("Content_Length", "5"),
                ("X_Portcullis_User", "admin"),
                ("x_user", "alice"),
                ("x-user", "bob"),
                ("host", "a"),
            ] {
                h.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let mut h = request();
        assert_eq!(
            underscore_headers(&mut h, UnderscoresInHeaders::Drop),
            Ok(())
        );
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-user"]);
        let mut h = request();
        assert_eq!(
            underscore_headers(&mut h, UnderscoresInHeaders::Reject),
            Err(Refusal::UnderscoreHeader)
        );
        // `allow` keeps them, less those that read as a field portcullis owns.
        let mut h = request();
        h.insert("x_forwarded_for", "6.6.6.6".parse().unwrap());
        h.insert("x_http_method_override", "DELETE".parse().unwrap());
        assert_eq!(
            underscore_headers(&mut h, UnderscoresInHeaders::Allow),
            Ok(())
        );
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["host", "x-user", "x_user"]);
        // Without one, every rule leaves the request alone.
        for mode in [
            UnderscoresInHeaders::Drop,
            UnderscoresInHeaders::Reject,
            UnderscoresInHeaders::Allow,
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-user", "bob".parse().unwrap());
            assert_eq!(underscore_headers(&mut h, mode), Ok(()));
            assert_eq!(h.len(), 1);
        }
    }

    #[test]
    fn head_size_counts_line_and_fields() {
        let mut h = HeaderMap::new();
        h.insert("host", "a".parse().unwrap());
        let uri: Uri = "/ab".parse().unwrap();
        // "GET /ab HTTP/1.1\r\n" is 18 bytes; "host: a\r\n" is 9.
        assert_eq!(head_size(&Method::GET, &uri, &h), 3 + 3 + 12 + 9);
    }
}
