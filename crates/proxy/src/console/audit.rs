//! `GET /api/v1/audit?decision=deny&q=&limit=50`: the newest audit records, newest first,
//! for the console's audit panel. It reads the newest files of the audit directory (the
//! last [`FILES`]), so it stays cheap however long the trail is; `portcullis audit search`
//! reads it all. `q` keeps the records whose JSON contains it (case-insensitive).

use crate::Runtime;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How many of the newest audit files the panel reads.
const FILES: usize = 3;
const MAX_LIMIT: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    decision: Option<String>,
    q: Option<String>,
    limit: Option<usize>,
}

/// The newest `n` audit files of `dir`, oldest first.
fn newest(dir: &Path, n: usize) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(u64, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let seq = portcullis_audit::files::parse_name(e.file_name().to_str()?)?;
            Some((seq, e.path()))
        })
        .collect();
    files.sort();
    let skip = files.len().saturating_sub(n);
    files.into_iter().skip(skip).map(|(_, p)| p).collect()
}

/// The newest records of `dir` that pass `decision` and contain `q`, newest first.
pub fn recent(
    dir: &Path,
    decision: Option<portcullis_audit::Decision>,
    q: &str,
    limit: usize,
) -> Result<Vec<Value>, String> {
    let files = newest(dir, FILES);
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let filter = portcullis_audit::Filter {
        decision,
        ..Default::default()
    };
    let all = portcullis_audit::search(&files, &filter).map_err(|e| e.to_string())?;
    let q = q.to_lowercase();
    Ok(all
        .into_iter()
        .rev()
        .filter(|v| q.is_empty() || v.to_string().to_lowercase().contains(&q))
        .take(limit)
        .collect())
}

pub async fn handler(
    State(rt): State<Arc<Runtime>>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let bad = |m: String| (StatusCode::BAD_REQUEST, Json(json!({ "error": m }))).into_response();
    let Ok(Query(q)) = q else {
        return bad("the query takes `decision` (allow, deny, would_deny), `q` and `limit`".into());
    };
    let decision = match q.decision.as_deref().filter(|d| !d.is_empty()) {
        None => None,
        Some(d) => match serde_json::from_value::<portcullis_audit::Decision>(json!(d)) {
            Ok(d) => Some(d),
            Err(_) => {
                return bad(format!(
                    "`{d}` is not a decision: allow, deny or would_deny"
                ))
            }
        },
    };
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_LIMIT);
    let snap = rt.shared.snapshot.load_full();
    if snap.config.audit.sink != portcullis_config::AuditSink::File {
        return Json(json!({ "records": [], "note": "the audit trail is not kept in files here" }))
            .into_response();
    }
    let dir = PathBuf::from(&snap.config.audit.dir);
    let text = q.q.unwrap_or_default();
    match tokio::task::spawn_blocking(move || recent(&dir, decision, &text, limit)).await {
        Ok(Ok(records)) => Json(json!({ "records": records })).into_response(),
        Ok(Err(e)) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": e }))).into_response()
        }
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": "the search failed" })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_matching_records_come_first() {
        let tmp = tempfile::tempdir().unwrap();
        let line = |seq: u64, d: &str, user: &str| {
            json!({ "seq": seq, "decision": d, "principal": { "user": user } }).to_string() + "\n"
        };
        std::fs::write(
            tmp.path().join(portcullis_audit::files::file_name(1)),
            line(1, "deny", "alice") + &line(2, "allow", "bob"),
        )
        .unwrap();
        std::fs::write(
            tmp.path().join(portcullis_audit::files::file_name(3)),
            line(3, "deny", "carol") + &line(4, "deny", "Alice"),
        )
        .unwrap();
        std::fs::write(tmp.path().join("other.txt"), "not audit").unwrap();
        let deny = Some(portcullis_audit::Decision::Deny);
        let seqs = |v: Vec<Value>| {
            v.iter()
                .map(|r| r["seq"].as_u64().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            seqs(recent(tmp.path(), deny, "", 10).unwrap()),
            vec![4, 3, 1]
        );
        assert_eq!(
            seqs(recent(tmp.path(), deny, "alice", 10).unwrap()),
            vec![4, 1]
        );
        assert_eq!(seqs(recent(tmp.path(), None, "", 2).unwrap()), vec![4, 3]);
        assert!(recent(&tmp.path().join("none"), None, "", 5)
            .unwrap()
            .is_empty());
    }
}
