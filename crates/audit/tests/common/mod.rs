//! Helpers shared by the integration tests: a config for a temporary directory, records that
//! are easy to find again, and reading the files back.

#![allow(dead_code)]

use portcullis_audit::{files, Decision, Kind, Principal, Record};
use portcullis_config::{AuditCfg, Dur, Fsync, Size};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn cfg(dir: &Path, fsync: Fsync) -> AuditCfg {
    AuditCfg {
        dir: dir.to_string_lossy().into_owned(),
        fsync,
        fsync_interval: Dur(Duration::from_millis(10)),
        rotate_size: Size(100 << 20),
        ..AuditCfg::default()
    }
}

/// A denied request by `user` on route `billing/api`, identified by `id`.
pub fn rec(id: &str, user: &str) -> Record {
    Record {
        kind: Kind::Decision,
        request_id: Some(id.to_string()),
        app: Some("billing".into()),
        route: Some("api".into()),
        principal: Some(Principal {
            user: user.into(),
            provider: "corp".into(),
            groups: vec!["eng".into()],
            subject: format!("sub-{user}"),
        }),
        client_ip: Some("192.0.2.7".into()),
        method: Some("GET".into()),
        host: Some("billing.example.com".into()),
        path: Some(format!("/api/items/{id}")),
        query_keys: vec!["page".into()],
        decision: Some(Decision::Deny),
        reasons: vec!["billing/api/deny[0]".into()],
        latency_us: Some(42),
        ..Record::default()
    }
}

/// The audit files in `dir`, oldest first.
pub fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(files::parse_name)
                .is_some()
        })
        .collect();
    v.sort();
    v
}

/// Every line of every audit file, in order, as (file, 1-based line, text).
pub fn all_lines(dir: &Path) -> Vec<(PathBuf, usize, String)> {
    let mut out = Vec::new();
    for f in audit_files(dir) {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, l) in text.lines().enumerate() {
            out.push((f.clone(), i + 1, l.to_string()));
        }
    }
    out
}
