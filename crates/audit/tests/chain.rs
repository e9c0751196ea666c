//! The writer end to end: the chain continues across many records, restarts, torn lines and
//! rotation; acknowledged records are in the files; search finds them again.

mod common;

use common::{all_lines, audit_files, cfg, rec};
use portcullis_audit::{
    files, parse_since, search, verify, Auditor, Decision, Filter, Kind, Record,
};
use portcullis_config::{Dur, Fsync, Size};
use std::fs;
use std::time::{Duration, SystemTime};

/// Records `n` records concurrently, ids `{prefix}{i}`.
async fn record_many(a: &Auditor, prefix: &str, n: usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let a = a.clone();
        let id = format!("{prefix}{i}");
        tasks.push(tokio::spawn(
            async move { a.record(rec(&id, "alice")).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_continues_across_many_records_and_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), Fsync::Interval);
    let a = Auditor::start(&c, "i-1").unwrap();
    record_many(&a, "a", 300).await;
    assert_eq!(a.stats().last_seq, 300);
    assert_eq!(a.stats().written, 300);
    drop(a);

    let a = Auditor::start(&c, "i-1").unwrap();
    assert_eq!(a.stats().last_seq, 300, "resumed from the files");
    record_many(&a, "b", 100).await;
    drop(a);

    let r = verify(&[tmp.path().to_path_buf()]).unwrap();
    assert_eq!((r.records, r.first_seq, r.last_seq), (400, 1, 400));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let seqs: Vec<u64> = search(&[tmp.path().to_path_buf()], &Filter::default())
        .unwrap()
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
}

#[tokio::test]
async fn every_record_acknowledgement_means_the_record_is_in_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Auditor::start(&cfg(tmp.path(), Fsync::EveryRecord), "i").unwrap();
    for i in 0..20 {
        let id = format!("req-{i}");
        a.record(rec(&id, "alice")).await.unwrap();
        let text = fs::read_to_string(tmp.path().join(files::file_name(1))).unwrap();
        let last = text.lines().last().unwrap();
        assert!(last.contains(&format!("\"request_id\":\"{id}\"")), "{last}");
        assert!(text.ends_with('\n'));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path(), Fsync::EveryRecord);
    c.rotate_size = Size(2048);
    let a = Auditor::start(&c, "i").unwrap();
    record_many(&a, "r", 60).await;
    drop(a);
    // And after a restart, into the last file, then on to new ones.
    let a = Auditor::start(&c, "i").unwrap();
    record_many(&a, "s", 20).await;
    drop(a);

    let files = audit_files(tmp.path());
    assert!(files.len() >= 5, "{} files", files.len());
    let mut prev_hash: Option<String> = None;
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        assert!(
            text.len() <= 2048,
            "{} is {} bytes",
            f.display(),
            text.len()
        );
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap();
        assert_eq!(files::parse_name(name), first["seq"].as_u64(), "{name}");
        if let Some(h) = &prev_hash {
            assert_eq!(
                first["prev_hash"].as_str(),
                Some(h.as_str()),
                "{name} links back"
            );
        }
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        prev_hash = Some(last["hash"].as_str().unwrap().to_string());
    }
    let r = verify(&[tmp.path().to_path_buf()]).unwrap();
    assert_eq!((r.records, r.files, r.last_seq), (80, files.len(), 80));
}

#[tokio::test]
async fn rotation_by_age() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(tmp.path(), Fsync::Interval);
    c.rotate_age = Dur(Duration::ZERO);
    let a = Auditor::start(&c, "i").unwrap();
    for i in 0..4 {
        a.record(rec(&i.to_string(), "alice")).await.unwrap();
    }
    drop(a);
    assert_eq!(audit_files(tmp.path()).len(), 4);
    assert_eq!(verify(&[tmp.path().to_path_buf()]).unwrap().records, 4);
}

#[tokio::test]
async fn a_torn_last_line_is_cut_off_on_restart_and_the_chain_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), Fsync::EveryRecord);
    let a = Auditor::start(&c, "i").unwrap();
    for i in 0..5 {
        a.record(rec(&format!("a{i}"), "alice")).await.unwrap();
    }
    drop(a);
    let f = tmp.path().join(files::file_name(1));
    let mut data = fs::read(&f).unwrap();
    let good_len = data.len();
    data.extend_from_slice(br#"{"app":"billing","decision":"de"#);
    fs::write(&f, &data).unwrap();
    let r = verify(std::slice::from_ref(&f)).unwrap();
    assert_eq!(r.last_seq, 5);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);

    let a = Auditor::start(&c, "i").unwrap();
    assert_eq!(
        fs::metadata(&f).unwrap().len() as usize,
        good_len,
        "truncated"
    );
    for i in 0..5 {
        a.record(rec(&format!("b{i}"), "alice")).await.unwrap();
    }
    drop(a);
    let r = verify(&[tmp.path().to_path_buf()]).unwrap();
    assert_eq!((r.records, r.last_seq), (10, 10));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[tokio::test]
async fn an_empty_newest_file_left_by_a_crash_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), Fsync::EveryRecord);
    let a = Auditor::start(&c, "i").unwrap();
    a.record(rec("a", "alice")).await.unwrap();
    drop(a);
    fs::write(tmp.path().join(files::file_name(2)), b"").unwrap();
    let a = Auditor::start(&c, "i").unwrap();
    a.record(rec("b", "alice")).await.unwrap();
    drop(a);
    let r = verify(&[tmp.path().to_path_buf()]).unwrap();
    assert_eq!((r.records, r.files), (2, 1));
}

#[tokio::test]
async fn a_corrupt_last_record_stops_the_writer_from_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), Fsync::EveryRecord);
    let a = Auditor::start(&c, "i").unwrap();
    a.record(rec("a", "alice")).await.unwrap();
    drop(a);
    let f = tmp.path().join(files::file_name(1));
    let text = fs::read_to_string(&f).unwrap().replace("alice", "mallory");
    fs::write(&f, text).unwrap();
    let e = Auditor::start(&c, "i").unwrap_err();
    assert!(e.to_string().contains("hash mismatch"), "{e}");
}

#[tokio::test]
async fn search_filters_by_principal_decision_route_kind_and_time() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Auditor::start(&cfg(tmp.path(), Fsync::Interval), "i").unwrap();
    a.record(rec("1", "alice")).await.unwrap();
    a.record(rec("2", "bob")).await.unwrap();
    let mut allow = rec("3", "alice");
    allow.decision = Some(Decision::Allow);
    a.record(allow).await.unwrap();
    let mut other_route = rec("4", "alice");
    other_route.route = Some("admin".into());
    a.record(other_route).await.unwrap();
    a.record(Record {
        kind: Kind::Reload,
        detail: Some(serde_json::json!({"error": "bad policy"})),
        ..Record::default()
    })
    .await
    .unwrap();
    drop(a);

    let dir = [tmp.path().to_path_buf()];
    let ids = |f: Filter| -> Vec<String> {
        search(&dir, &f)
            .unwrap()
            .iter()
            .map(|v| v["request_id"].as_str().unwrap_or("-").to_string())
            .collect()
    };
    assert_eq!(
        ids(Filter {
            principal: Some("alice".into()),
            decision: Some(Decision::Deny),
            route: Some("api".into()),
            since: Some(parse_since("1h").unwrap()),
            ..Filter::default()
        }),
        ["1"]
    );
    assert_eq!(
        ids(Filter {
            principal: Some("sub-bob".into()),
            ..Filter::default()
        }),
        ["2"]
    );
    assert_eq!(
        ids(Filter {
            route: Some("billing/admin".into()),
            ..Filter::default()
        }),
        ["4"]
    );
    assert_eq!(
        ids(Filter {
            kind: Some(Kind::Reload),
            ..Filter::default()
        }),
        ["-"]
    );
    assert!(ids(Filter {
        since: Some(SystemTime::now() + Duration::from_secs(3600)),
        ..Filter::default()
    })
    .is_empty());
    assert_eq!(ids(Filter::default()).len(), 5);
    // Search reads what it is given, files or directories.
    let one = search(&audit_files(tmp.path()), &Filter::default()).unwrap();
    assert_eq!(one.len(), 5);
    assert_eq!(all_lines(tmp.path()).len(), 5);
}

#[tokio::test]
async fn no_query_values_or_secrets_reach_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Auditor::start(&cfg(tmp.path(), Fsync::EveryRecord), "i").unwrap();
    a.record(rec("1", "alice")).await.unwrap();
    drop(a);
    let (_, _, line) = &all_lines(tmp.path())[0];
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    for k in ["query", "headers", "cookie", "authorization", "token"] {
        assert!(!keys.contains(&k), "{k} in {line}");
    }
    assert_eq!(v["query_keys"], serde_json::json!(["page"]));
}
