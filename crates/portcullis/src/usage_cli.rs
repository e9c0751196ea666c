//! `portcullis usage`: each caller's requests per usage plan and UTC day, read offline from
//! the embedded store in the config's `state_dir` (like `portcullis audit verify` reads the
//! audit files), or with `limits.store: redis` from Redis, where every replica sends its
//! counts: the fleet's usage. A running proxy may be writing the store meanwhile: the report is then at
//! most one `limits.sync_interval` behind. `GET /api/v1/usage` gives the same report, up to
//! the moment of the call. Keys are the text `portcullis_proxy::admin_usage` uses.

use clap::Args;
use portcullis_proxy::admin_usage::{self, Report, UsageParams};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct UsageArgs {
    /// The config whose `state_dir` holds the store.
    #[arg(short, long)]
    config: PathBuf,
    /// One caller: a principal (`dev/alice`), a client's IP address, or `sha256:…`.
    #[arg(long)]
    key: Option<String>,
    /// One usage plan.
    #[arg(long)]
    plan: Option<String>,
    /// The first day, YYYY-MM-DD (UTC); default 29 days before --to.
    #[arg(long)]
    from: Option<String>,
    /// The last day, YYYY-MM-DD (UTC); default today.
    #[arg(long)]
    to: Option<String>,
    /// Print the report as JSON, as `GET /api/v1/usage` answers.
    #[arg(long)]
    json: bool,
}

/// Runs `portcullis usage`: 0 with the report (also when nothing has been recorded yet), 1 on
/// config or store errors or an unknown plan, 2 on a bad day or key.
pub fn run(a: UsageArgs) -> ExitCode {
    let cfg = match crate::load_config(&a.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let params = UsageParams {
        key: a.key,
        plan: a.plan,
        from: a.from,
        to: a.to,
    };
    let req = match params.parse(portcullis_limits::quota::day_of(now)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}", flags(&e));
            return ExitCode::from(2);
        }
    };
    let fleet = match portcullis_proxy::limits::Fleet::of(&cfg) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: limits.store: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(f) = fleet {
        return match fleet_report(&f.store, &cfg, &req, now) {
            Ok(r) => {
                print_report(&r, a.json, true);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
    }
    let store = match admin_usage::open_store(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let source = admin_usage::Source::Local(store.as_ref());
    let report = match admin_usage::report(source, &cfg, &req, now, &|_| None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if store.is_none() {
        eprintln!(
            "nothing recorded yet: {} does not exist. The proxy creates it when it runs with \
             usage_plans, and writes the counts every limits.sync_interval and at shutdown.",
            admin_usage::store_path(&cfg).display()
        );
    }
    print_report(&report, a.json, store.is_some());
    ExitCode::SUCCESS
}

/// The fleet's report, read from the Redis of `limits.store` (every replica sends its counts
/// there every `limits.sync_interval`).
fn fleet_report(
    store: &portcullis_limits::RedisStore,
    cfg: &portcullis_config::Config,
    req: &admin_usage::UsageRequest,
    now: i64,
) -> Result<Report, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let counts = rt
        .block_on(admin_usage::FleetCounts::fetch(store, cfg, req, now))
        .map_err(|e| e.to_string())?;
    admin_usage::report(admin_usage::Source::Fleet(&counts), cfg, req, now, &|_| {
        None
    })
    .map_err(|e| e.to_string())
}

fn print_report(report: &Report, json: bool, recorded: bool) {
    if json {
        let v = report.to_json();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        );
    } else {
        print!("{}", table(report));
        if recorded && report.plans.values().all(|k| k.is_empty()) {
            eprintln!(
                "no requests recorded from {} to {}",
                portcullis_limits::quota::day_string(report.from_day),
                portcullis_limits::quota::day_string(report.to_day)
            );
        }
    }
}

/// The query's messages name the API's parameters; here they are flags.
fn flags(msg: &str) -> String {
    ["key", "plan", "from", "to"]
        .iter()
        .fold(msg.to_string(), |m, f| {
            m.replace(&format!("`{f}`"), &format!("`--{f}`"))
        })
}

/// `PLAN KEY DAY REQUESTS`, a `total` line after each key's days, then each key's quota use.
pub fn table(r: &Report) -> String {
    let mut rows = vec![vec![
        "PLAN".to_string(),
        "KEY".into(),
        "DAY".into(),
        "REQUESTS".into(),
    ]];
    for (plan, keys) in &r.plans {
        for (key, days) in keys {
            for (day, n) in days {
                rows.push(vec![
                    plan.clone(),
                    key.clone(),
                    portcullis_limits::quota::day_string(*day),
                    n.to_string(),
                ]);
            }
            let total = days.iter().fold(0u64, |t, (_, n)| t.saturating_add(*n));
            rows.push(vec![
                plan.clone(),
                key.clone(),
                "total".into(),
                total.to_string(),
            ]);
        }
    }
    let mut out = columns(&rows);
    if r.quota.values().any(|k| !k.is_empty()) {
        let mut rows = vec![vec![
            "PLAN".to_string(),
            "KEY".into(),
            "QUOTA".into(),
            "USED".into(),
            "REMAINING".into(),
            "PERIOD_START".into(),
        ]];
        for (plan, keys) in &r.quota {
            for (key, q) in keys {
                rows.push(vec![
                    plan.clone(),
                    key.clone(),
                    format!("{}/{}", q.limit, q.per),
                    q.used.to_string(),
                    q.remaining().to_string(),
                    admin_usage::rfc3339(q.period_start),
                ]);
            }
        }
        out.push('\n');
        out.push_str(&columns(&rows));
    }
    out
}

/// Rows as left-aligned columns two spaces apart.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 < r.len() {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            } else {
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
