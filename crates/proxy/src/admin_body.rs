//! The admin API's answer to a JSON body its extractor refused: 413 when it was too large
//! (as every endpoint answers), else 400 with what the endpoint takes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// `e`'s answer: 413 for a body too large, else 400 with `usage`.
pub fn refused(e: &axum::extract::rejection::JsonRejection, usage: &'static str) -> Response {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return (StatusCode::PAYLOAD_TOO_LARGE, "the body is too large\n").into_response();
    }
    (StatusCode::BAD_REQUEST, usage).into_response()
}
