//! The built-in echo origin (`address: builtin:echo`): answers with JSON describing the
//! request it received after portcullis processed it (method, path, query, headers, body
//! size), which makes the quickstart and header behaviour visible without running an origin.
//! The body is read and counted, never stored.

use crate::upstream::body::{full, ReqBody, RespBody};
use http::{header, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};

pub async fn respond(req: Request<ReqBody>, request_id: &str) -> Response<RespBody> {
    let (parts, mut body) = req.into_parts();
    let mut headers = Map::new();
    for (k, v) in &parts.headers {
        let v = Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned());
        match headers.get_mut(k.as_str()) {
            Some(Value::Array(a)) => a.push(v),
            Some(prev) => *prev = Value::Array(vec![prev.clone(), v]),
            None => {
                headers.insert(k.as_str().to_string(), v);
            }
        }
    }
    let mut body_bytes: u64 = 0;
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    body_bytes += d.len() as u64;
                }
            }
            Err(e) => {
                body_error = Some(e);
                break;
            }
        }
    }
    if let Some(e) = body_error {
        use crate::upstream::body::{SlowBody, TooLarge};
        let status = if e.is::<TooLarge>() {
            413
        } else if e.is::<SlowBody>() {
            408
        } else {
            400
        };
        let mut r = Response::new(full(format!("{e}\n")));
        *r.status_mut() =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_REQUEST);
        return r;
    }
    let doc = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
        "request_id": request_id,
    });
    let mut r = Response::new(full(serde_json::to_vec_pretty(&doc).unwrap_or_default()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}
