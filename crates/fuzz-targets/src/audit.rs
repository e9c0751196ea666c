//! The audit target: the record parser that `portcullis audit verify` and `audit search`
//! share, over one audit file. Verify and search must agree on what the file holds, and a
//! search's filters only ever narrow what it finds.

use crate::support::scratch;
use portcullis_audit::record::{Decision, Kind};
use portcullis_audit::search::{self, Filter};
use portcullis_audit::verify;
use std::time::{Duration, UNIX_EPOCH};

/// The bytes of one audit file (JSON lines), verified and searched.
pub fn audit_records(data: &[u8]) {
    let dir = scratch("audit_records");
    let path = dir.join(portcullis_audit::files::file_name(1));
    std::fs::write(&path, data).expect("writing the scratch audit file");
    let paths = [path];
    let verified = verify::verify(&paths);
    let all = search::search(&paths, &Filter::default());
    let complete = data.iter().filter(|&&b| b == b'\n').count();
    match (&verified, &all) {
        (Ok(report), Ok(found)) => {
            assert_eq!(
                report.records as usize, complete,
                "verify passed but did not count every line"
            );
            assert_eq!(found.len(), complete, "search skipped a verified record");
        }
        (Ok(_), Err(e)) => panic!("verify passed a file search cannot read: {e}"),
        (Err(_), _) => {}
    }
    let Ok(all) = all else {
        return;
    };
    let filters = [
        Filter {
            principal: Some("alice".into()),
            ..Filter::default()
        },
        Filter {
            decision: Some(Decision::Deny),
            kind: Some(Kind::Decision),
            ..Filter::default()
        },
        Filter {
            route: Some("billing/api".into()),
            since: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            ..Filter::default()
        },
    ];
    for f in &filters {
        let some = search::search(&paths, f).expect("a file search read once reads again");
        assert!(
            some.len() <= all.len(),
            "a filter found more than no filter"
        );
        for v in &some {
            assert!(f.matches(v));
            assert!(all.contains(v), "a filter found a record no filter finds");
        }
    }
}
