//! `portcullis audit …`: check the audit trail's hash chain (`verify`) and find records
//! (`search`). Files may be given one by one or as directories; without any, the config's
//! `audit.dir` is used.

use std::path::PathBuf;
use std::process::ExitCode;

fn paths(files: Vec<PathBuf>, config: Option<PathBuf>) -> Result<Vec<PathBuf>, ExitCode> {
    if !files.is_empty() {
        return Ok(files);
    }
    let Some(c) = config else {
        eprintln!("error: give audit files or directories, or --config to use its audit.dir");
        return Err(ExitCode::from(2));
    };
    crate::load_config(&c).map(|cfg| vec![PathBuf::from(cfg.audit.dir)])
}

pub fn verify(files: Vec<PathBuf>, config: Option<PathBuf>) -> ExitCode {
    let files = match paths(files, config) {
        Ok(f) => f,
        Err(c) => return c,
    };
    match portcullis_audit::verify(&files) {
        Ok(r) => {
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "OK: {} records in {} files, seq {}..{}, last hash {}",
                r.records, r.files, r.first_seq, r.last_seq, r.last_hash
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("BROKEN: {e}");
            ExitCode::from(1)
        }
    }
}

pub struct SearchArgs {
    pub files: Vec<PathBuf>,
    pub config: Option<PathBuf>,
    pub principal: Option<String>,
    pub decision: Option<String>,
    pub route: Option<String>,
    pub since: Option<String>,
    pub kind: Option<String>,
    pub json: bool,
}

fn parse_enum<T: serde::de::DeserializeOwned>(what: &str, v: &str) -> Result<T, ExitCode> {
    serde_json::from_value(serde_json::Value::String(v.to_string())).map_err(|_| {
        eprintln!("error: invalid {what} `{v}`");
        ExitCode::from(2)
    })
}

pub fn search(a: SearchArgs) -> ExitCode {
    let files = match paths(a.files, a.config) {
        Ok(f) => f,
        Err(c) => return c,
    };
    let mut f = portcullis_audit::Filter {
        principal: a.principal,
        route: a.route,
        ..Default::default()
    };
    if let Some(d) = &a.decision {
        match parse_enum("decision (allow, deny or would_deny)", d) {
            Ok(d) => f.decision = Some(d),
            Err(c) => return c,
        }
    }
    if let Some(k) = &a.kind {
        match parse_enum("kind (auth_failure, decision, admin or reload)", k) {
            Ok(k) => f.kind = Some(k),
            Err(c) => return c,
        }
    }
    if let Some(s) = &a.since {
        match portcullis_audit::parse_since(s) {
            Ok(t) => f.since = Some(t),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let found = match portcullis_audit::search(&files, &f) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    for r in &found {
        if a.json {
            println!("{r}");
        } else {
            let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
            let user = r
                .get("principal")
                .and_then(|p| p.get("user"))
                .and_then(|u| u.as_str())
                .unwrap_or("-");
            println!(
                "{} seq={} {} {} user={} route={} {} {}{} reasons={}",
                s("time"),
                r.get("seq").map(|v| v.to_string()).unwrap_or_default(),
                s("kind"),
                s("decision"),
                user,
                s("route"),
                s("method"),
                s("host"),
                s("path"),
                r.get("reasons").map(|v| v.to_string()).unwrap_or_default()
            );
        }
    }
    eprintln!("{} record(s)", found.len());
    ExitCode::SUCCESS
}
