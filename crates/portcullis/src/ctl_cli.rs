//! `portcullis ctl`: the runtime CLI, HAProxy's runtime API with names. Every command is one
//! call to a running proxy's admin API (`--admin http://host:port`, default
//! `http://127.0.0.1:9901`):
//!
//! * servers: `servers [BACKEND]`, `drain|ready|maint [APP/]BACKEND/SERVER`,
//!   `weight [APP/]BACKEND/SERVER N`;
//! * stick tables: `tables`, `table NAME [--top N] [--by COUNTER]`, `clear TABLE (KEY | --all)`;
//! * events: `events [--types P1,P2] --follow` (the live stream; there is no history);
//! * workflows: `workflows`, `history EXEC`, `approve TOKEN [--output JSON]`,
//!   `reject TOKEN [--error E] [--cause C]`;
//! * the config and sessions: `reload`, `revoke-sessions PROVIDER/SUBJECT`.
//!
//! It prints aligned tables for people, and with `--json` the API's answer for scripts (for
//! `events`, one CloudEvent per line).
//!
//! **Credentials.** A static token of `admin.tokens` from `--token-file` or the
//! `PORTCULLIS_ADMIN_TOKEN` environment variable, a JWT of one of `admin.auth`'s providers from
//! `--bearer-file` (both sent as `Authorization: Bearer`), or an API key of one of them from
//! `--api-key-file` (sent as `X-API-Key`). Never from a flag, which `ps` would show.
//!
//! **Exit codes.** 0 on success; 1 when the API refuses the call (its `error` and the HTTP
//! status are printed; 401 is "bad or missing token", 403 "forbidden" with the policy's
//! reasons) or cannot be reached; 2 on bad usage or without credentials.
//!
//! The admin listener speaks plain HTTP/1.1; the client here is a small one of its own, since
//! it must send `X-API-Key` and read the server-sent event stream as it comes.

use clap::{ArgGroup, Args, Subcommand};
use http::{Method, Uri};
use portcullis_proxy::admin_tables::client::segment;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::table_cli::{columns, plain, tables_text, top_text, TOKEN_ENV};
use crate::workflow_cli::{events_text, json_arg, time_text};

/// How long one call may take, connect to last byte (for `events --follow`: to the answer's
/// head).
const TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read (the admin API's are far smaller).
const MAX_ANSWER: usize = 64 << 20;
/// The largest answer head read.
const MAX_HEAD: usize = 64 << 10;

#[derive(Args)]
pub struct CtlArgs {
    /// The admin API's address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// A file holding a static admin token of `admin.tokens` (else the PORTCULLIS_ADMIN_TOKEN
    /// environment variable).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A file holding a JWT of one of `admin.auth`'s identity providers, sent as a bearer
    /// token; `admin.policies` decide each call.
    #[arg(long, global = true, value_name = "FILE")]
    bearer_file: Option<PathBuf>,
    /// A file holding an API key of one of `admin.auth`'s identity providers, sent as
    /// `X-API-Key`; `admin.policies` decide each call.
    #[arg(long, global = true, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Print JSON for scripts: the API's answer (for `events`, one CloudEvent per line).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Every server of every backend (or of BACKEND: its id `app/name` or its name), with
    /// its state, health, weight and load.
    Servers { backend: Option<String> },
    /// Drain a server: no new traffic; requests sticky to it still reach it.
    Drain {
        /// `APP/BACKEND/SERVER`, or `BACKEND/SERVER` when the backend's name is unique.
        server: String,
    },
    /// Put a server back into service.
    Ready {
        /// `APP/BACKEND/SERVER`, or `BACKEND/SERVER` when the backend's name is unique.
        server: String,
    },
    /// Put a server into maintenance: no traffic at all, no health checks.
    Maint {
        /// `APP/BACKEND/SERVER`, or `BACKEND/SERVER` when the backend's name is unique.
        server: String,
    },
    /// Set a server's weight (1..1000) until a restart, over the config's.
    Weight {
        /// `APP/BACKEND/SERVER`, or `BACKEND/SERVER` when the backend's name is unique.
        server: String,
        weight: u32,
    },
    /// Every stick table: key, size, expiry, entries, memory, what it stores.
    Tables,
    /// A stick table's top entries.
    Table {
        name: String,
        /// How many entries (1..1000).
        #[arg(long, default_value_t = 20)]
        top: usize,
        /// The counter to sort by (default the table's first).
        #[arg(long, value_name = "COUNTER")]
        by: Option<String>,
    },
    /// Forget one entry of a stick table (KEY in the text form `table` shows), or with
    /// `--all` every entry.
    #[command(
        group(ArgGroup::new("what").required(true).args(["key", "all"])),
        override_usage = "portcullis ctl clear [OPTIONS] TABLE (KEY | --all)"
    )]
    Clear {
        /// The stick table.
        table: String,
        /// The entry's key, like `192.0.2.7` or `["192.0.2.7","acme"]`.
        key: Option<String>,
        /// Every entry of the table.
        #[arg(long)]
        all: bool,
    },
    /// Watch the events the proxy publishes, live, one per line, until interrupted
    /// (`--follow` is required: the admin API keeps no history of events).
    Events {
        /// Only these types: comma-separated patterns with `*`, like
        /// `dev.portcullis.server.*,com.example.*`.
        #[arg(long, value_delimiter = ',', value_name = "PATTERNS")]
        types: Vec<String>,
        /// Keep reading the live stream.
        #[arg(long, short)]
        follow: bool,
    },
    /// Workflow executions, newest first: id, workflow, name, status, start, current states.
    Workflows {
        /// Only this workflow's executions.
        #[arg(long)]
        workflow: Option<String>,
        /// Only executions with this status (RUNNING, SUCCEEDED, FAILED, TIMED_OUT, ABORTED).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// An execution's history events, one per line.
    History {
        /// The execution's id.
        exec: String,
    },
    /// Approve a waiting `portcullis:wait_for_callback` task: it succeeds with OUTPUT.
    Approve {
        /// The task's token (`$$.Task.Token`).
        token: String,
        /// The task's result: JSON, or @FILE.
        #[arg(long, default_value = "{}")]
        output: String,
    },
    /// Reject a waiting `portcullis:wait_for_callback` task: it fails (Retry and Catch apply).
    Reject {
        /// The task's token (`$$.Task.Token`).
        token: String,
        /// The error name (default `TaskFailed`).
        #[arg(long)]
        error: Option<String>,
        #[arg(long)]
        cause: Option<String>,
    },
    /// Reload the config from disk; a rejected config keeps the running one.
    Reload,
    /// End every browser session of a principal (`provider/subject`) opened until now.
    RevokeSessions { principal: String },
}

/// Runs `portcullis ctl …`.
pub fn run(args: CtlArgs) -> ExitCode {
    let call = match request(&args.command) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cred = match credential(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let target = match Target::parse(&args.admin) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
    if matches!(args.command, CtlCommand::Events { .. }) {
        return rt.block_on(follow(&target, &cred, &call.1, args.json));
    }
    let answer = rt.block_on(async {
        tokio::time::timeout(TIMEOUT, async {
            let (status, body) = send(&target, &cred, &call, "application/json").await?;
            Ok::<_, String>((status, body.text().await?))
        })
        .await
        .map_err(|_| {
            format!(
                "{}: no answer within {}s",
                target.authority,
                TIMEOUT.as_secs()
            )
        })?
    });
    let (status, text) = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if !(200..300).contains(&status) {
        eprintln!("error: {}", api_error(status, &text));
        return ExitCode::from(1);
    }
    let v: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("error: the answer is not JSON ({e}): {text}");
                return ExitCode::from(1);
            }
        }
    };
    match output(&args.command, &v, args.json) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Requests

/// One admin API call: method, path and query, JSON body.
type Call = (Method, String, Option<Value>);

/// The path of a server's `what` (`state` or `weight`) from `APP/BACKEND/SERVER` or
/// `BACKEND/SERVER`; the backend's id goes in one segment, its `/` as `%2F`.
fn server_path(target: &str, what: &str) -> Result<String, String> {
    let parts: Vec<&str> = target.split('/').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "`{target}`: name the server as APP/BACKEND/SERVER (like `billing/api/b1`), or \
             BACKEND/SERVER when the backend's name is unique across apps"
        ));
    }
    let (backend, server) = target.rsplit_once('/').unwrap_or_default();
    Ok(format!(
        "/api/v1/backends/{}/servers/{}/{what}",
        segment(backend),
        segment(server)
    ))
}

/// `?a=1&b=2` of the given parameters (values percent-encoded), or nothing.
fn query(params: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", segment(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// The admin API call of a command; `Err` on bad usage.
fn request(cmd: &CtlCommand) -> Result<Call, String> {
    let state = |server: &str, s: &str| -> Result<Call, String> {
        Ok((
            Method::POST,
            server_path(server, "state")?,
            Some(json!({ "state": s })),
        ))
    };
    Ok(match cmd {
        CtlCommand::Servers { .. } => (Method::GET, "/api/v1/backends".into(), None),
        CtlCommand::Drain { server } => state(server, "drain")?,
        CtlCommand::Ready { server } => state(server, "ready")?,
        CtlCommand::Maint { server } => state(server, "maint")?,
        CtlCommand::Weight { server, weight } => (
            Method::PUT,
            server_path(server, "weight")?,
            Some(json!({ "weight": weight })),
        ),
        CtlCommand::Tables => (Method::GET, "/api/v1/tables".into(), None),
        CtlCommand::Table { name, top, by } => (
            Method::GET,
            format!(
                "/api/v1/tables/{}{}",
                segment(name),
                query(&[("top", Some(top.to_string())), ("by", by.clone())])
            ),
            None,
        ),
        CtlCommand::Clear {
            table, key: None, ..
        } => (
            Method::DELETE,
            format!("/api/v1/tables/{}", segment(table)),
            None,
        ),
        CtlCommand::Clear {
            table,
            key: Some(k),
            ..
        } => (
            Method::DELETE,
            format!("/api/v1/tables/{}/entries/{}", segment(table), segment(k)),
            None,
        ),
        CtlCommand::Events { types, follow } => {
            if !follow {
                return Err(
                    "only `ctl events --follow` is supported: the admin API keeps no \
                            history of events, it streams them as they happen (past events \
                            are in the event sinks and the audit trail)"
                        .into(),
                );
            }
            let types: Vec<&str> = types
                .iter()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
                .collect();
            let types = (!types.is_empty()).then(|| types.join(","));
            (
                Method::GET,
                format!("/api/v1/events/stream{}", query(&[("types", types)])),
                None,
            )
        }
        CtlCommand::Workflows {
            workflow,
            status,
            limit,
        } => (
            Method::GET,
            format!(
                "/api/v1/executions{}",
                query(&[
                    ("workflow", workflow.clone()),
                    ("status", status.as_ref().map(|s| s.to_uppercase())),
                    ("limit", limit.map(|l| l.to_string())),
                ])
            ),
            None,
        ),
        CtlCommand::History { exec } => (
            Method::GET,
            format!("/api/v1/executions/{}/history", segment(exec)),
            None,
        ),
        CtlCommand::Approve { token, output } => (
            Method::POST,
            "/api/v1/callbacks/success".into(),
            Some(json!({ "token": token, "output": json_arg("--output", output)? })),
        ),
        CtlCommand::Reject {
            token,
            error,
            cause,
        } => {
            let mut b = Map::new();
            b.insert("token".into(), json!(token));
            if let Some(e) = error {
                b.insert("error".into(), json!(e));
            }
            if let Some(c) = cause {
                b.insert("cause".into(), json!(c));
            }
            (
                Method::POST,
                "/api/v1/callbacks/failure".into(),
                Some(Value::Object(b)),
            )
        }
        CtlCommand::Reload => (Method::POST, "/api/v1/reload".into(), None),
        CtlCommand::RevokeSessions { principal } => (
            Method::POST,
            "/api/v1/sessions/revoke".into(),
            Some(json!({ "principal": principal })),
        ),
    })
}

// ---------------------------------------------------------------------------------------
// Credentials

/// How the caller proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Credential {
    /// A static token, or an identity provider's JWT: `Authorization: Bearer`.
    Bearer(String),
    /// An identity provider's API key: `X-API-Key`.
    ApiKey(String),
}

/// The secret in `file`, trimmed; `flag` names it in errors.
fn secret_file(flag: &str, file: &Path) -> Result<String, String> {
    let t = std::fs::read_to_string(file).map_err(|e| format!("{flag} {}: {e}", file.display()))?;
    secret(&format!("{flag} {}", file.display()), &t)
}

/// A secret, trimmed: not empty, and fit for an HTTP header.
fn secret(from: &str, text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err(format!("{from}: the credential is empty"));
    }
    if !t.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(format!(
            "{from}: the credential holds characters a header cannot carry (one line of \
             printable ASCII is expected)"
        ));
    }
    Ok(t.to_string())
}

/// The caller's credential: from one of the `--*-file` flags, else from [`TOKEN_ENV`].
fn credential(a: &CtlArgs) -> Result<Credential, String> {
    let given: Vec<&str> = [
        (a.token_file.is_some(), "--token-file"),
        (a.bearer_file.is_some(), "--bearer-file"),
        (a.api_key_file.is_some(), "--api-key-file"),
    ]
    .into_iter()
    .filter_map(|(on, f)| on.then_some(f))
    .collect();
    if given.len() > 1 {
        return Err(format!("give one credential, not {}", given.join(" and ")));
    }
    if let Some(f) = &a.token_file {
        return secret_file("--token-file", f).map(Credential::Bearer);
    }
    if let Some(f) = &a.bearer_file {
        return secret_file("--bearer-file", f).map(Credential::Bearer);
    }
    if let Some(f) = &a.api_key_file {
        return secret_file("--api-key-file", f).map(Credential::ApiKey);
    }
    match std::env::var(TOKEN_ENV) {
        Ok(t) => secret(TOKEN_ENV, &t).map(Credential::Bearer),
        Err(_) => Err(format!(
            "no credentials: give the admin token with --token-file FILE or the {TOKEN_ENV} \
             environment variable, an identity provider's JWT with --bearer-file FILE, or its \
             API key with --api-key-file FILE"
        )),
    }
}

// ---------------------------------------------------------------------------------------
// A small HTTP/1.1 client

/// Where the admin API is.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// `host:port`, for `Host` and messages.
    authority: String,
    host: String,
    port: u16,
    /// A path prefix (a proxy in front of the admin listener), without a trailing `/`.
    prefix: String,
}

impl Target {
    /// `http://host:port[/prefix]`.
    fn parse(base: &str) -> Result<Target, String> {
        let uri: Uri = base.parse().map_err(|e| format!("--admin `{base}`: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(s) => {
                return Err(format!(
                    "--admin `{base}`: scheme `{s}` is not supported; the admin listener \
                     speaks plain HTTP (`http://127.0.0.1:9901`)"
                ))
            }
            None => return Err(format!("--admin `{base}`: give it as `http://host:port`")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("--admin `{base}` has no host"))?;
        Ok(Target {
            authority: authority.as_str().to_string(),
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: authority.port_u16().unwrap_or(80),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

/// The request's bytes.
fn request_bytes(t: &Target, cred: &Credential, call: &Call, accept: &str) -> Vec<u8> {
    let (method, path, body) = call;
    let mut head = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: {accept}\r\nConnection: close\r\nUser-Agent: portcullis-ctl/{}\r\n",
        t.prefix,
        t.authority,
        env!("CARGO_PKG_VERSION")
    );
    match cred {
        Credential::Bearer(b) => head.push_str(&format!("Authorization: Bearer {b}\r\n")),
        Credential::ApiKey(k) => head.push_str(&format!("X-API-Key: {k}\r\n")),
    }
    let payload = body.as_ref().map(Value::to_string).unwrap_or_default();
    if body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if body.is_some() || *method != Method::GET {
        head.push_str(&format!("Content-Length: {}\r\n", payload.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(payload.as_bytes());
    out
}

/// How an answer's body ends.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// After this many more bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`: `left` bytes remain of the current chunk; `done` after
    /// the last.
    Chunked { left: u64, done: bool },
    /// When the server closes the connection.
    Close,
}

/// An answer's body, read as it comes.
struct Body<R> {
    r: BufReader<R>,
    framing: Framing,
    authority: String,
}

impl<R: AsyncRead + Unpin> Body<R> {
    /// Reads the answer's head: the status, and the body that follows.
    async fn read_head(r: R, authority: &str, head_only: bool) -> Result<(u16, Body<R>), String> {
        let mut r = BufReader::new(r);
        let io = |e: std::io::Error| format!("{authority}: {e}");
        let mut line = String::new();
        let mut read = 0;
        let mut status = None;
        let (mut length, mut chunked) = (None, false);
        loop {
            line.clear();
            let n = r.read_line(&mut line).await.map_err(io)?;
            read += n;
            if n == 0 {
                return Err(format!(
                    "{authority}: the connection closed before an answer"
                ));
            }
            if read > MAX_HEAD {
                return Err(format!("{authority}: the answer's head is too large"));
            }
            let l = line.trim_end_matches(['\r', '\n']);
            let Some(code) = status else {
                // `HTTP/1.1 200 OK`; an interim 1xx answer is skipped with its headers.
                let code = l
                    .strip_prefix("HTTP/1.")
                    .and_then(|rest| rest.split_whitespace().nth(1))
                    .and_then(|c| c.parse::<u16>().ok())
                    .ok_or_else(|| format!("{authority}: not an HTTP answer: {l}"))?;
                status = Some(code);
                continue;
            };
            if l.is_empty() {
                if (100..200).contains(&code) {
                    status = None;
                    continue;
                }
                break;
            }
            if let Some((name, value)) = l.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                    chunked = true;
                } else if name == "content-length" {
                    length = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| format!("{authority}: a bad Content-Length: {value}"))?,
                    );
                }
            }
        }
        let code = status.unwrap_or_default();
        let framing = if head_only || code == 204 || code == 304 {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked {
                left: 0,
                done: false,
            }
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        Ok((
            code,
            Body {
                r,
                framing,
                authority: authority.to_string(),
            },
        ))
    }

    /// The next bytes of the body, or `None` at its end.
    async fn chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let authority = self.authority.clone();
        let io = |e: std::io::Error| format!("{authority}: {e}");
        let early = || format!("{authority}: the connection closed in the middle of the answer");
        let mut buf = vec![0u8; 16 << 10];
        match &mut self.framing {
            Framing::Length(0) => Ok(None),
            Framing::Length(left) => {
                let want = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                let n = self.r.read(&mut buf[..want]).await.map_err(io)?;
                if n == 0 {
                    return Err(early());
                }
                *left -= n as u64;
                buf.truncate(n);
                Ok(Some(buf))
            }
            Framing::Close => {
                let n = self.r.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
            Framing::Chunked { done: true, .. } => Ok(None),
            Framing::Chunked { left, done } => {
                if *left == 0 {
                    let mut line = String::new();
                    if self.r.read_line(&mut line).await.map_err(io)? == 0 {
                        return Err(early());
                    }
                    let size = line.trim().split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size, 16)
                        .map_err(|_| format!("{authority}: a bad chunk size: {}", line.trim()))?;
                    if size == 0 {
                        // The trailer, up to its blank line.
                        loop {
                            line.clear();
                            let n = self.r.read_line(&mut line).await.map_err(io)?;
                            if n == 0 || line.trim().is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(None);
                    }
                    *left = size;
                }
                let want = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                let n = self.r.read(&mut buf[..want]).await.map_err(io)?;
                if n == 0 {
                    return Err(early());
                }
                *left -= n as u64;
                if *left == 0 {
                    // The chunk's CRLF.
                    let mut crlf = String::new();
                    self.r.read_line(&mut crlf).await.map_err(io)?;
                }
                buf.truncate(n);
                Ok(Some(buf))
            }
        }
    }

    /// The whole body as text.
    async fn text(mut self) -> Result<String, String> {
        let mut out = Vec::new();
        while let Some(c) = self.chunk().await? {
            out.extend_from_slice(&c);
            if out.len() > MAX_ANSWER {
                return Err(format!(
                    "{}: the answer is over {MAX_ANSWER} bytes",
                    self.authority
                ));
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Sends `call` and reads the answer's head.
async fn send(
    t: &Target,
    cred: &Credential,
    call: &Call,
    accept: &str,
) -> Result<(u16, Body<tokio::net::TcpStream>), String> {
    let mut stream = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", t.authority))?;
    stream
        .write_all(&request_bytes(t, cred, call, accept))
        .await
        .map_err(|e| format!("{}: {e}", t.authority))?;
    Body::read_head(stream, &t.authority, call.0 == Method::HEAD).await
}

/// What to print for an answer that is not 2xx: the API's `error` (with a 403's reasons and
/// a rejected reload's serving version) or its text, and the status.
fn api_error(status: u16, text: &str) -> String {
    let v = serde_json::from_str::<Value>(text).ok();
    let mut msg = match v.as_ref().and_then(|v| v["error"].as_str()) {
        Some(e) => e.to_string(),
        None => text.trim().to_string(),
    };
    if let Some(reasons) = v.as_ref().and_then(|v| v["reasons"].as_array()) {
        let r: Vec<String> = reasons.iter().map(plain).collect();
        if !r.is_empty() {
            msg = format!("{msg}: {}", r.join("; "));
        }
    }
    if let Some(s) = v.as_ref().and_then(|v| v["serving_version"].as_str()) {
        msg = format!("{msg}; still serving version {s}");
    }
    let msg = match status {
        401 if msg.is_empty() => "bad or missing token".to_string(),
        401 => format!("bad or missing token: {msg}"),
        403 if msg.is_empty() => "forbidden".to_string(),
        403 => format!("forbidden: {msg}"),
        _ => msg,
    };
    if msg.is_empty() {
        format!("{status}")
    } else {
        format!("{msg} ({status})")
    }
}

// ---------------------------------------------------------------------------------------
// Output

/// What a command prints for the API's answer `v` (null for an empty one).
fn output(cmd: &CtlCommand, v: &Value, as_json: bool) -> Result<String, String> {
    let pretty = |v: &Value| format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default());
    if let CtlCommand::Servers {
        backend: Some(name),
    } = cmd
    {
        // The API lists every backend; keep the one asked for (by id, or by name in any app).
        let all = v["backends"].as_array().map_or(&[][..], Vec::as_slice);
        let mine: Vec<Value> = all
            .iter()
            .filter(|b| {
                let id = b["name"].as_str().unwrap_or_default();
                id == name || id.rsplit_once('/').is_some_and(|(_, n)| n == name)
            })
            .cloned()
            .collect();
        if mine.is_empty() {
            let known: Vec<String> = all.iter().map(|b| plain(&b["name"])).collect();
            return Err(format!(
                "no backend `{name}`; the backends are {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
        let v = json!({ "backends": mine });
        return Ok(if as_json {
            pretty(&v)
        } else {
            servers_text(&v)
        });
    }
    if let CtlCommand::Clear { table, key, .. } = cmd {
        // 204: nothing to print but what was done.
        return Ok(match (key, as_json) {
            (Some(k), true) => pretty(&json!({ "result": "cleared", "table": table, "key": k })),
            (None, true) => pretty(&json!({ "result": "cleared", "table": table, "all": true })),
            (Some(k), false) => format!("cleared {k} in {table}\n"),
            (None, false) => format!("cleared every entry of {table}\n"),
        });
    }
    if as_json {
        return Ok(pretty(v));
    }
    Ok(match cmd {
        CtlCommand::Servers { .. } => servers_text(v),
        CtlCommand::Drain { .. } | CtlCommand::Ready { .. } | CtlCommand::Maint { .. } => {
            format!(
                "{}/{}: {}\n",
                plain(&v["backend"]),
                plain(&v["server"]),
                plain(&v["state"])
            )
        }
        CtlCommand::Weight { .. } => format!(
            "{}/{}: weight {}\n",
            plain(&v["backend"]),
            plain(&v["server"]),
            plain(&v["weight"])
        ),
        CtlCommand::Tables => {
            if v["tables"].as_array().is_some_and(Vec::is_empty) {
                "no stick tables\n".into()
            } else {
                tables_text(v)
            }
        }
        CtlCommand::Table { .. } => top_text(v),
        CtlCommand::Workflows { .. } => executions_text(v),
        CtlCommand::History { .. } => events_text(v),
        CtlCommand::Approve { .. } => {
            format!("approved: execution {} resumes\n", plain(&v["execution"]))
        }
        CtlCommand::Reject { error, .. } => format!(
            "rejected: the task of execution {} fails with {}\n",
            plain(&v["execution"]),
            error.as_deref().unwrap_or("TaskFailed")
        ),
        CtlCommand::Reload => format!("reloaded: serving version {}\n", plain(&v["version"])),
        CtlCommand::RevokeSessions { principal } => {
            let at = v["revoked_at"]
                .as_i64()
                .map_or_else(|| "now".into(), |s| time_text(&json!(s * 1000)));
            format!("revoked the sessions of {principal} opened until {at}\n")
        }
        CtlCommand::Clear { .. } | CtlCommand::Events { .. } => String::new(),
    })
}

/// `ctl servers`: one line per server.
fn servers_text(v: &Value) -> String {
    let mut rows = vec![[
        "BACKEND", "SERVER", "ADDRESS", "STATE", "HEALTH", "EJECTED", "WEIGHT", "ACTIVE", "QUEUED",
        "TOTAL",
    ]
    .map(String::from)
    .to_vec()];
    for b in v["backends"].as_array().into_iter().flatten() {
        for s in b["servers"].as_array().into_iter().flatten() {
            rows.push(vec![
                plain(&b["name"]),
                plain(&s["name"]),
                plain(&s["address"]),
                plain(&s["state"]),
                plain(&s["health"]),
                match s["ejected"].as_bool() {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
                plain(&s["weight"]),
                plain(&s["active"]),
                plain(&s["queued"]),
                plain(&s["total_requests"]),
            ]);
        }
    }
    if rows.len() == 1 {
        return "no servers\n".into();
    }
    columns(&rows)
}

/// `ctl workflows`: one line per execution.
fn executions_text(v: &Value) -> String {
    let list = v["executions"].as_array().map_or(&[][..], Vec::as_slice);
    if list.is_empty() {
        return "no executions\n".into();
    }
    let mut rows = vec![["ID", "WORKFLOW", "NAME", "STATUS", "STARTED", "STATES"]
        .map(String::from)
        .to_vec()];
    for e in list {
        rows.push(vec![
            plain(&e["executionId"]),
            plain(&e["workflow"]),
            plain(&e["name"]),
            plain(&e["status"]),
            time_text(&e["startedAt"]),
            match &e["currentStates"] {
                Value::Array(a) if a.is_empty() => "-".into(),
                s => plain(s),
            },
        ]);
    }
    columns(&rows)
}

// ---------------------------------------------------------------------------------------
// Events

/// A server-sent event stream read line by line (the parts of the format the admin API
/// uses: `event`, `data`, `id` and comments).
#[derive(Default)]
struct Sse {
    event: String,
    data: Vec<String>,
}

impl Sse {
    /// Takes one line (without its end); at a blank line, the event it ends, as its type
    /// (`message` when unnamed) and data.
    fn line(&mut self, line: &str) -> Option<(String, String)> {
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            if data.is_empty() {
                return None;
            }
            let event = if event.is_empty() {
                "message".into()
            } else {
                event
            };
            return Some((event, data.join("\n")));
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = value.to_string(),
            "data" => self.data.push(value.to_string()),
            _ => {}
        }
        None
    }
}

/// One line for a CloudEvent: `time type subject data` (`-` for no subject; no data when it
/// has none).
fn event_line(e: &Value) -> String {
    let mut line = format!(
        "{} {} {}",
        plain(&e["time"]),
        plain(&e["type"]),
        plain(&e["subject"])
    );
    match &e["data"] {
        Value::Null => {}
        d => {
            line.push(' ');
            line.push_str(&d.to_string());
        }
    }
    line
}

/// What to print for one event of the stream: the line for stdout, or a note for stderr.
fn event_output(event: &str, data: &str, as_json: bool) -> Result<Option<String>, String> {
    match event {
        "cloudevent" => {
            let v: Value = serde_json::from_str(data)
                .map_err(|e| format!("an event that is not JSON ({e}): {data}"))?;
            Ok(Some(if as_json {
                v.to_string()
            } else {
                event_line(&v)
            }))
        }
        "lagged" => {
            let missed = serde_json::from_str::<Value>(data)
                .ok()
                .map_or_else(|| "some".to_string(), |v| plain(&v["missed"]));
            Err(format!(
                "warning: this watcher fell behind and missed {missed} events"
            ))
        }
        _ => Ok(None),
    }
}

/// `ctl events --follow`: prints each event as it comes, until interrupted (0 when stdout
/// is closed) or the stream ends (1).
async fn follow(t: &Target, cred: &Credential, path: &str, as_json: bool) -> ExitCode {
    let call = (Method::GET, path.to_string(), None);
    let head = tokio::time::timeout(TIMEOUT, send(t, cred, &call, "text/event-stream")).await;
    let (status, mut body) = match head {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
        Err(_) => {
            eprintln!(
                "error: {}: no answer within {}s",
                t.authority,
                TIMEOUT.as_secs()
            );
            return ExitCode::from(1);
        }
    };
    if !(200..300).contains(&status) {
        let text = tokio::time::timeout(TIMEOUT, body.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        eprintln!("error: {}", api_error(status, &text));
        return ExitCode::from(1);
    }
    let mut sse = Sse::default();
    let mut pending: Vec<u8> = Vec::new();
    let stdout = std::io::stdout();
    loop {
        let bytes = match body.chunk().await {
            Ok(Some(b)) => b,
            Ok(None) => {
                eprintln!("error: the admin API closed the event stream");
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        };
        pending.extend_from_slice(&bytes);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=i).collect();
            let line = String::from_utf8_lossy(&raw);
            let Some((event, data)) = sse.line(line.trim_end_matches(['\r', '\n'])) else {
                continue;
            };
            match event_output(&event, &data, as_json) {
                Ok(Some(out)) => {
                    let mut o = stdout.lock();
                    if writeln!(o, "{out}").and_then(|()| o.flush()).is_err() {
                        // The reader went away (`| head`): done.
                        return ExitCode::SUCCESS;
                    }
                }
                Ok(None) => {}
                Err(note) => eprintln!("{note}"),
            }
        }
        if pending.len() > MAX_ANSWER {
            eprintln!("error: an event stream line is over {MAX_ANSWER} bytes");
            return ExitCode::from(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        c: CtlArgs,
    }

    fn parse(args: &[&str]) -> Result<CtlArgs, String> {
        let mut all = vec!["ctl"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .map(|c| c.c)
            .map_err(|e| e.to_string())
    }

    fn req(args: &[&str]) -> Result<Call, String> {
        request(&parse(args)?.command)
    }

    #[test]
    fn commands_make_the_apis_requests() {
        assert_eq!(
            req(&["drain", "billing/api-v2/b1"]).unwrap(),
            (
                Method::POST,
                "/api/v1/backends/billing%2Fapi-v2/servers/b1/state".into(),
                Some(json!({ "state": "drain" }))
            )
        );
        assert_eq!(
            req(&["maint", "api-v2/b1"]).unwrap(),
            (
                Method::POST,
                "/api/v1/backends/api-v2/servers/b1/state".into(),
                Some(json!({ "state": "maint" }))
            )
        );
        assert_eq!(
            req(&["weight", "a/b/c", "50"]).unwrap(),
            (
                Method::PUT,
                "/api/v1/backends/a%2Fb/servers/c/weight".into(),
                Some(json!({ "weight": 50 }))
            )
        );
        for bad in ["b1", "a/b/c/d", "a//c", "/b/c", "a/b/"] {
            let e = req(&["ready", bad]).unwrap_err();
            assert!(e.contains("APP/BACKEND/SERVER"), "{bad}: {e}");
        }
        assert_eq!(req(&["servers"]).unwrap().1, "/api/v1/backends");
        assert_eq!(req(&["tables"]).unwrap().1, "/api/v1/tables");
        assert_eq!(
            req(&["table", "per_ip", "--by", "http_req_rate(10s)"])
                .unwrap()
                .1,
            "/api/v1/tables/per_ip?top=20&by=http_req_rate%2810s%29"
        );
        assert_eq!(
            req(&["clear", "per_net", "192.0.2.0/24"]).unwrap(),
            (
                Method::DELETE,
                "/api/v1/tables/per_net/entries/192.0.2.0%2F24".into(),
                None
            )
        );
        assert_eq!(
            req(&["clear", "per_net", "--all"]).unwrap().1,
            "/api/v1/tables/per_net"
        );
        assert!(parse(&["clear", "per_net"]).is_err());
        assert!(parse(&["clear", "per_net", "k", "--all"]).is_err());
        assert_eq!(
            req(&["events", "--follow", "--types", "a.*,b.c"])
                .unwrap()
                .1,
            "/api/v1/events/stream?types=a.%2A%2Cb.c"
        );
        assert_eq!(req(&["events", "-f"]).unwrap().1, "/api/v1/events/stream");
        assert!(req(&["events"]).unwrap_err().contains("--follow"));
        assert_eq!(
            req(&["workflows", "--status", "running", "--limit", "3"])
                .unwrap()
                .1,
            "/api/v1/executions?status=RUNNING&limit=3"
        );
        assert_eq!(
            req(&["history", "e/1"]).unwrap().1,
            "/api/v1/executions/e%2F1/history"
        );
        assert_eq!(
            req(&["approve", "t.1", "--output", r#"{"ok":true}"#]).unwrap(),
            (
                Method::POST,
                "/api/v1/callbacks/success".into(),
                Some(json!({ "token": "t.1", "output": { "ok": true } }))
            )
        );
        assert!(req(&["approve", "t", "--output", "yes"])
            .unwrap_err()
            .contains("--output is not JSON"));
        assert_eq!(
            req(&["reject", "t", "--cause", "no"]).unwrap().2,
            Some(json!({ "token": "t", "cause": "no" }))
        );
        assert_eq!(
            req(&["reload"]).unwrap(),
            (Method::POST, "/api/v1/reload".into(), None)
        );
        assert_eq!(
            req(&["revoke-sessions", "dev/alice"]).unwrap().2,
            Some(json!({ "principal": "dev/alice" }))
        );
        // The shared flags go before or after the command.
        let a = parse(&["--json", "servers", "--admin", "http://h:1"]).unwrap();
        assert!(a.json && a.admin == "http://h:1");
    }

    #[test]
    fn credentials_come_from_one_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "abc\n").unwrap();
        let f = f.to_str().unwrap();
        let c = |args: &[&str]| credential(&parse(args).unwrap());
        assert_eq!(
            c(&["--api-key-file", f, "tables"]),
            Ok(Credential::ApiKey("abc".into()))
        );
        assert_eq!(
            c(&["--bearer-file", f, "tables"]),
            Ok(Credential::Bearer("abc".into()))
        );
        let e = c(&["--bearer-file", f, "--token-file", f, "tables"]).unwrap_err();
        assert!(e.contains("one credential"), "{e}");
        assert!(secret("x", "a\r\nEvil: 1").is_err());
        assert!(secret("x", "  \n").unwrap_err().contains("empty"));
    }

    #[test]
    fn errors_say_what_the_api_said() {
        assert_eq!(
            api_error(401, "invalid token\n"),
            "bad or missing token: invalid token (401)"
        );
        assert_eq!(
            api_error(
                403,
                r#"{"error":"dev/carol may not server.set_state here","reasons":["no policy permits it (deny by default)"]}"#
            ),
            "forbidden: dev/carol may not server.set_state here: no policy permits it (deny by default) (403)"
        );
        assert_eq!(api_error(404, "no backend `x`\n"), "no backend `x` (404)");
        assert_eq!(
            api_error(
                422,
                r#"{"result":"rejected","error":"bad","serving_version":"abc"}"#
            ),
            "bad; still serving version abc (422)"
        );
        assert_eq!(api_error(502, ""), "502");
    }

    #[test]
    fn admin_urls_are_plain_http() {
        let t = Target::parse("http://[::1]:9/p/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str()),
            ("::1", 9, "/p")
        );
        assert!(Target::parse("https://h:1")
            .unwrap_err()
            .contains("plain HTTP"));
        let req = request_bytes(
            &Target::parse("http://h:1").unwrap(),
            &Credential::ApiKey("k".into()),
            &(Method::POST, "/x".into(), Some(json!({ "a": 1 }))),
            "application/json",
        );
        let req = String::from_utf8(req).unwrap();
        assert!(
            req.starts_with("POST /x HTTP/1.1\r\nHost: h:1\r\n"),
            "{req}"
        );
        assert!(req.contains("X-API-Key: k\r\n") && !req.contains("Authorization"));
        assert!(req.ends_with("Content-Length: 7\r\n\r\n{\"a\":1}"), "{req}");
    }

    #[tokio::test]
    async fn answers_are_read_with_each_framing() {
        let chunked: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n";
        let (s, b) = Body::read_head(chunked, "h", false).await.unwrap();
        assert_eq!((s, b.text().await.unwrap().as_str()), (200, "abcdefg"));
        let sized: &[u8] = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabcdef";
        let (s, b) = Body::read_head(sized, "h", false).await.unwrap();
        assert_eq!((s, b.text().await.unwrap().as_str()), (404, "abc"));
        let closed: &[u8] = b"HTTP/1.0 200 OK\r\n\r\nto the end";
        let (_, b) = Body::read_head(closed, "h", false).await.unwrap();
        assert_eq!(b.text().await.unwrap(), "to the end");
        let none: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
        let (s, b) = Body::read_head(none, "h", false).await.unwrap();
        assert_eq!((s, b.text().await.unwrap().as_str()), (204, ""));
        let cut: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc";
        let (_, b) = Body::read_head(cut, "h", false).await.unwrap();
        assert!(b.text().await.unwrap_err().contains("closed"));
        assert!(Body::read_head(&b"SSH-2.0\r\n"[..], "h", false)
            .await
            .is_err());
    }

    #[test]
    fn the_event_stream_is_read_into_lines() {
        let mut sse = Sse::default();
        let text = ": keep-alive\n\nevent: cloudevent\nid: e-1\ndata: {\"specversion\":\"1.0\",\"id\":\"e-1\",\"source\":\"/ci\",\"type\":\"com.example.deploy\",\"time\":\"2026-01-02T03:04:05Z\",\"subject\":\"web\",\"data\":{\"v\":2}}\n\nevent: lagged\ndata: {\"missed\":3}\n\n";
        let got: Vec<(String, String)> = text.lines().filter_map(|l| sse.line(l)).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            event_output(&got[0].0, &got[0].1, false).unwrap(),
            Some(r#"2026-01-02T03:04:05Z com.example.deploy web {"v":2}"#.into())
        );
        let raw = event_output(&got[0].0, &got[0].1, true).unwrap().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&raw).unwrap()["id"],
            json!("e-1")
        );
        assert!(event_output(&got[1].0, &got[1].1, false)
            .unwrap_err()
            .contains("missed 3"));
        assert_eq!(event_line(&json!({ "time": "t", "type": "x" })), "t x -");
    }

    #[test]
    fn servers_and_executions_print_as_tables() {
        let v = json!({ "backends": [{ "name": "billing/api", "in_flight": 0, "servers": [
            { "name": "b1", "address": "10.0.0.11:8080", "state": "drain", "health": "up", "ejected": false,
              "weight": 10, "config_weight": 10, "active": 2, "queued": 0, "total_requests": 1042 },
            { "name": "b2", "address": "10.0.0.12:8080", "state": "ready", "health": "down", "ejected": true,
              "weight": 50, "config_weight": 10, "active": 0, "queued": 1, "total_requests": 7 }
        ]}]});
        assert_eq!(
            servers_text(&v),
            "BACKEND      SERVER  ADDRESS         STATE  HEALTH  EJECTED  WEIGHT  ACTIVE  QUEUED  TOTAL\n\
             billing/api  b1      10.0.0.11:8080  drain  up      no       10      2       0       1042\n\
             billing/api  b2      10.0.0.12:8080  ready  down    yes      50      0       1       7\n"
        );
        assert_eq!(servers_text(&json!({ "backends": [] })), "no servers\n");
        let cmd = parse(&["servers", "api"]).unwrap().command;
        assert!(output(&cmd, &v, false).unwrap().contains("b2"));
        let cmd = parse(&["servers", "web"]).unwrap().command;
        assert!(output(&cmd, &v, false)
            .unwrap_err()
            .contains("no backend `web`; the backends are billing/api"));
        let v = json!({ "executions": [
            { "executionId": "e-1", "workflow": "approve", "name": "n", "status": "RUNNING",
              "startedAt": "2026-01-02T03:04:05.000Z", "currentStates": ["Ask"] }
        ]});
        assert_eq!(
            executions_text(&v),
            "ID   WORKFLOW  NAME  STATUS   STARTED                   STATES\n\
             e-1  approve   n     RUNNING  2026-01-02T03:04:05.000Z  Ask\n"
        );
    }
}
