//! `portcullis table`: stick tables at runtime through the admin API (HAProxy's `show table`,
//! `set table`, `clear table`). The token comes from `--token-file` or the
//! `PORTCULLIS_ADMIN_TOKEN` environment variable, never from a flag (which `ps` would show).
//! Keys are given and shown in the text form the admin API uses (see
//! `portcullis_proxy::admin_tables`).

use clap::{ArgGroup, Args, Subcommand};
use http::Method;
use portcullis_proxy::admin_tables::client;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

/// The environment variable the admin token can come from.
pub const TOKEN_ENV: &str = "PORTCULLIS_ADMIN_TOKEN";

#[derive(Args)]
pub struct TableArgs {
    /// The admin API's address.
    #[arg(long, default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// A file holding the admin token (else the PORTCULLIS_ADMIN_TOKEN environment variable).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print the API's JSON answer instead of a summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: TableCommand,
}

#[derive(Subcommand)]
enum TableCommand {
    /// Without NAME, every table; with NAME, its top entries.
    Show {
        name: Option<String>,
        /// How many entries (1..1000).
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// The counter to sort by (default the table's first).
        #[arg(long)]
        by: Option<String>,
    },
    /// One entry.
    Get { name: String, key: String },
    /// Set gpc0, add a tag or remove one (creating the entry, except to remove a tag).
    #[command(group(ArgGroup::new("change").required(true).multiple(true).args(["gpc0", "tag", "untag"])))]
    Set {
        name: String,
        key: String,
        #[arg(long)]
        gpc0: Option<u64>,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        untag: Option<String>,
    },
    /// Forget one entry, or with no KEY every entry of the table.
    Clear { name: String, key: Option<String> },
}

/// Runs `portcullis table …`: 0 on success, 1 when the API refuses or cannot be reached, 2
/// without a token.
pub fn run(args: TableArgs) -> ExitCode {
    let token = match token(args.token_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (method, path, body) = request(&args.command);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let answer = rt.block_on(client::call(
        &args.admin,
        &token,
        method,
        &path,
        body.as_ref(),
    ));
    let (status, text) = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if !(200..300).contains(&status) {
        eprintln!("error: {status}: {}", text.trim_end());
        return ExitCode::from(1);
    }
    if status == 204 {
        match &args.command {
            TableCommand::Clear { name, key: Some(k) } => println!("cleared {k} in {name}"),
            TableCommand::Clear { name, key: None } => println!("cleared every entry of {name}"),
            _ => {}
        }
        return ExitCode::SUCCESS;
    }
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: the answer is not JSON ({e}): {text}");
            return ExitCode::from(1);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or(text));
        return ExitCode::SUCCESS;
    }
    let out = match &args.command {
        TableCommand::Show { name: None, .. } => tables_text(&v),
        TableCommand::Show { name: Some(_), .. } => top_text(&v),
        _ => entries_text(std::slice::from_ref(&v)),
    };
    print!("{out}");
    ExitCode::SUCCESS
}

/// The token from `file` (trimmed), or else from [`TOKEN_ENV`].
fn token(file: Option<&std::path::Path>) -> Result<String, String> {
    let t = match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("--token-file {}: {e}", f.display()))?,
        None => std::env::var(TOKEN_ENV).map_err(|_| {
            format!("give the admin token with --token-file FILE or the {TOKEN_ENV} environment variable")
        })?,
    };
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err("the admin token is empty".into());
    }
    Ok(t)
}

/// The admin API request for a command.
fn request(cmd: &TableCommand) -> (Method, String, Option<Value>) {
    let seg = client::segment;
    match cmd {
        TableCommand::Show { name: None, .. } => (Method::GET, "/api/v1/tables".into(), None),
        TableCommand::Show {
            name: Some(n),
            top,
            by,
        } => {
            let mut path = format!("/api/v1/tables/{}?top={top}", seg(n));
            if let Some(by) = by {
                path.push_str(&format!("&by={}", seg(by)));
            }
            (Method::GET, path, None)
        }
        TableCommand::Get { name, key } => (
            Method::GET,
            format!("/api/v1/tables/{}/entries/{}", seg(name), seg(key)),
            None,
        ),
        TableCommand::Set {
            name,
            key,
            gpc0,
            tag,
            untag,
        } => {
            let mut body = json!({});
            if let Some(g) = gpc0 {
                body["gpc0"] = json!(g);
            }
            if let Some(t) = tag {
                body["tag"] = json!(t);
            }
            if let Some(t) = untag {
                body["untag"] = json!(t);
            }
            (
                Method::POST,
                format!("/api/v1/tables/{}/entries/{}", seg(name), seg(key)),
                Some(body),
            )
        }
        TableCommand::Clear { name, key: None } => (
            Method::DELETE,
            format!("/api/v1/tables/{}", seg(name)),
            None,
        ),
        TableCommand::Clear { name, key: Some(k) } => (
            Method::DELETE,
            format!("/api/v1/tables/{}/entries/{}", seg(name), seg(k)),
            None,
        ),
    }
}

/// A JSON value as plain text: strings without quotes, lists joined with `,`.
pub(crate) fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(plain).collect::<Vec<_>>().join(","),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Rows as aligned columns.
pub(crate) fn columns(rows: &[Vec<String>]) -> String {
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
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `portcullis table show`: one line per table.
pub(crate) fn tables_text(v: &Value) -> String {
    let mut rows = vec![[
        "NAME", "KEY", "SIZE", "EXPIRE", "ENTRIES", "MEMORY", "STORE",
    ]
    .map(String::from)
    .to_vec()];
    for t in v["tables"].as_array().into_iter().flatten() {
        rows.push(
            [
                "name",
                "key",
                "size",
                "expire",
                "entries",
                "memory_bytes",
                "store",
            ]
            .iter()
            .map(|f| plain(&t[*f]))
            .collect(),
        );
    }
    columns(&rows)
}

/// `portcullis table show NAME`: a summary line, then the entries.
pub(crate) fn top_text(v: &Value) -> String {
    let t = &v["table"];
    let head = format!(
        "table {}: key {}, {} of {} entries, expire {}, {} bytes; top by {}\n",
        plain(&t["name"]),
        plain(&t["key"]),
        plain(&t["entries"]),
        plain(&t["size"]),
        plain(&t["expire"]),
        plain(&t["memory_bytes"]),
        plain(&v["by"]),
    );
    head + &entries_text(v["entries"].as_array().map_or(&[][..], Vec::as_slice))
}

/// Entries as columns: the key, each counter, the tags (when stored), the time to expiry.
fn entries_text(entries: &[Value]) -> String {
    let Some(first) = entries.first() else {
        return "no entries\n".into();
    };
    // In the limits crate's order, whatever order the JSON object kept.
    const ORDER: [&str; 8] = [
        "http_req_rate",
        "http_req_cnt",
        "http_err_rate",
        "http_err_cnt",
        "conn_cur",
        "bytes_in_rate",
        "bytes_out_rate",
        "gpc0",
    ];
    let mut counters: Vec<String> = first["counters"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    counters.sort_by_key(|c| ORDER.iter().position(|o| o == c).unwrap_or(ORDER.len()));
    let tags = first.get("tags").is_some();
    let mut head = vec!["KEY".to_string()];
    head.extend(counters.iter().map(|c| c.to_uppercase()));
    if tags {
        head.push("TAGS".into());
    }
    head.push("EXPIRES_IN".into());
    let mut rows = vec![head];
    for e in entries {
        let mut r = vec![plain(&e["key"])];
        r.extend(counters.iter().map(|c| plain(&e["counters"][c])));
        if tags {
            r.push(plain(&e["tags"]));
        }
        r.push(
            e["expires_in_ms"]
                .as_u64()
                .map_or("-".into(), |ms| format!("{}s", ms / 1000)),
        );
        rows.push(r);
    }
    columns(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_encode_names_and_keys() {
        let (m, p, b) = request(&TableCommand::Get {
            name: "per_net".into(),
            key: "192.0.2.0/24".into(),
        });
        assert_eq!(
            (m, p.as_str(), b),
            (
                Method::GET,
                "/api/v1/tables/per_net/entries/192.0.2.0%2F24",
                None
            )
        );
        let (m, p, b) = request(&TableCommand::Set {
            name: "pair".into(),
            key: r#"["::1","a b"]"#.into(),
            gpc0: Some(1),
            tag: Some("blocked".into()),
            untag: None,
        });
        assert_eq!(m, Method::POST);
        assert_eq!(
            p,
            "/api/v1/tables/pair/entries/%5B%22%3A%3A1%22%2C%22a%20b%22%5D"
        );
        assert_eq!(b, Some(json!({ "gpc0": 1, "tag": "blocked" })));
        let (m, p, _) = request(&TableCommand::Show {
            name: Some("per_ip".into()),
            top: 5,
            by: Some("http_req_rate(10s)".into()),
        });
        assert_eq!(
            (m, p.as_str()),
            (
                Method::GET,
                "/api/v1/tables/per_ip?top=5&by=http_req_rate%2810s%29"
            )
        );
        let (m, p, _) = request(&TableCommand::Clear {
            name: "per_ip".into(),
            key: None,
        });
        assert_eq!((m, p.as_str()), (Method::DELETE, "/api/v1/tables/per_ip"));
    }

    #[test]
    fn entries_print_as_columns() {
        let v = json!({
            "table": { "name": "per_ip", "key": "src", "entries": 2, "size": 1000, "expire": "10m", "memory_bytes": 900 },
            "by": "http_req_rate",
            "entries": [
                { "key": "192.0.2.7", "counters": { "http_req_rate": 12, "gpc0": 1 }, "tags": ["blocked", "x"], "expires_in_ms": 599000 },
                { "key": "2001:db8::1", "counters": { "http_req_rate": 3, "gpc0": 0 }, "tags": [], "expires_in_ms": 1000 }
            ]
        });
        assert_eq!(
            top_text(&v),
            "table per_ip: key src, 2 of 1000 entries, expire 10m, 900 bytes; top by http_req_rate\n\
             KEY          HTTP_REQ_RATE  GPC0  TAGS       EXPIRES_IN\n\
             192.0.2.7    12             1     blocked,x  599s\n\
             2001:db8::1  3              0                1s\n"
        );
        assert_eq!(entries_text(&[]), "no entries\n");
    }
}
