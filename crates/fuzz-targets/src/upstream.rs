//! Upstream targets: portcullis's own HTTP/1.1 client reads what origins send, with its own
//! response-head parser and chunked decoder (`upstream::h1`); an origin that is compromised or
//! confused must not be able to make it misframe a pooled connection.

use crate::support::reads;
use portcullis_proxy::upstream::h1::fuzz;

/// A chunked body as an origin sends it: the first byte chooses how it is cut into reads.
/// Cut or whole, it must decode the same; what decodes must leave the bytes after the body
/// untouched, and its data, chunked again, must decode back to itself.
pub fn chunked(data: &[u8]) {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let whole = fuzz::chunked(&[body]);
    let cut = fuzz::chunked(&reads(body, seed));
    match (&whole, &cut) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "one read and many decode differently"),
        (Err(_), Err(_)) => {}
        _ => panic!("one read and many disagree: {whole:?} / {cut:?}"),
    }
    if let Ok(Some((decoded, _, left))) = whole {
        assert!(body.ends_with(&left), "the bytes after the body changed");
        let mut again = Vec::new();
        for piece in decoded.chunks(7) {
            again.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            again.extend_from_slice(piece);
            again.extend_from_slice(b"\r\n");
        }
        again.extend_from_slice(b"0\r\n\r\n");
        let back = fuzz::chunked(&[&again]).expect("a body chunked here decodes");
        assert_eq!(back, Some((decoded, None, Vec::new())));
    }
}

/// Header fields that are about one connection: never passed on from an origin. (`Trailer`
/// is end to end, RFC 9110 §6.6.2: it names the trailers that follow, and is passed on.)
const HOP: [&str; 5] = [
    "connection",
    "transfer-encoding",
    "te",
    "keep-alive",
    "proxy-connection",
];

/// A response head from an origin: what parses frames its body one way only, passes on no
/// hop-by-hop field, and parses the same from a longer buffer; every shorter prefix of it is
/// still incomplete rather than an error (heads arrive in pieces).
pub fn h1_response(data: &[u8]) {
    let Ok(Some(h)) = fuzz::response_head(data) else {
        return;
    };
    assert!(h.consumed <= data.len());
    assert!((100..1000).contains(&h.status), "status {}", h.status);
    for name in HOP {
        if name == "connection" && h.status == 101 {
            // Kept on a 101: the tunnel needs it.
            continue;
        }
        assert!(
            !h.headers.contains_key(name),
            "hop-by-hop `{name}` passed on"
        );
    }
    if h.status != 101 {
        assert!(!h.headers.contains_key("upgrade"), "`upgrade` passed on");
    }
    let head = &data[..h.consumed];
    let mut longer = head.to_vec();
    longer.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    let again = fuzz::response_head(&longer)
        .expect("the same head, more bytes after it")
        .expect("complete");
    assert_eq!(again, h, "the bytes after the head changed it");
    // A sample of prefixes (all of them would cost a parse per byte).
    let step = (h.consumed / 16).max(1);
    for end in (0..h.consumed).step_by(step) {
        match fuzz::response_head(&head[..end]) {
            Ok(None) => {}
            other => panic!("prefix of {end} bytes of a good head: {other:?}"),
        }
    }
}
