//! `portcullis ctl`: the runtime CLI, HAProxy's runtime API with names. Every command is one
//! call to a running proxy's admin API (`--admin http://host:port`, or
//! `https://host:port` when `admin.tls` is set; default `http://127.0.0.1:9901`):
//!
//! * servers: `servers [BACKEND]`, `drain|ready|maint [APP/]BACKEND/SERVER`,
//!   `weight [APP/]BACKEND/SERVER N`;
//! * stick tables: `tables`, `table NAME [--top N] [--by COUNTER]`, `clear TABLE (KEY | --all)`;
//! * events: `events [--types P1,P2] --follow` (the live stream; there is no history);
//! * workflows: `workflows`, `history EXEC`, `approve TOKEN [--output JSON]`,
//!   `reject TOKEN [--error E] [--cause C]`;
//! * the config and sessions: `reload`, `revoke-sessions PROVIDER/SUBJECT`;
//! * signing in: `login --issuer URL --client-id ID`, the OIDC device authorization grant
//!   (RFC 8628) at the operator's own identity provider.
//!
//! It prints aligned tables for people, and with `--json` the API's answer for scripts (for
//! `events`, one CloudEvent per line).
//!
//! **Credentials.** A static token of `admin.tokens` from `--token-file` or the
//! `PORTCULLIS_ADMIN_TOKEN` environment variable, a JWT of one of `admin.auth`'s providers from
//! `--bearer-file` (both sent as `Authorization: Bearer`), or an API key of one of them from
//! `--api-key-file` (sent as `X-API-Key`). Never from a flag, which `ps` would show. Without
//! any of these, the ID token `ctl login` saved (`$XDG_CONFIG_HOME/portcullis/ctl.jwt`, else
//! `~/.config/portcullis/ctl.jwt`) is sent as a bearer token, once it is checked not to have
//! expired. Without that either, a client certificate (`--cert FILE --key FILE`, over
//! `https://`) is the credential on its own, for an `mtls` provider of `admin.auth`; given
//! with another credential, both are presented.
//!
//! **TLS.** Over `https://` the admin listener's certificate is verified against the CAs of
//! `--cacert FILE` (PEM), else the Mozilla roots (`webpki-roots`), for the URL's host (a DNS
//! name, or an IP address in the certificate's IP SANs). There is no way to skip the
//! verification.
//!
//! **Exit codes.** 0 on success; 1 when the API refuses the call (its `error` and the HTTP
//! status are printed; 401 is "bad or missing token", 403 "forbidden" with the policy's
//! reasons) or cannot be reached, or the saved sign-in has expired; 2 on bad usage or without
//! credentials, or when a `--cacert`, `--cert` or `--key` file cannot be read or used; a TLS
//! handshake that fails (an unknown CA, a client certificate required or refused) exits 1.
//! `ctl login` exits 1 when the sign-in is denied, expires or fails.
//!
//! The admin listener speaks HTTP/1.1, plain or over TLS; the client here is a small one of
//! its own, since it must send `X-API-Key` and read the server-sent event stream as it comes.

use clap::{ArgGroup, Args, Subcommand};
use http::{Method, Uri};
use portcullis_proxy::admin_tables::client::segment;
use serde_json::{json, Map, Value};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

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
    /// The admin API's address: `http://host:port[/prefix]`, or `https://host:port[/prefix]`
    /// (default port 443) when the admin listener has `admin.tls`.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// For `https://`: a PEM file of the CAs to trust for the admin listener's certificate
    /// (else the Mozilla roots, which a private CA is not among).
    #[arg(long, global = true, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// For `https://`: a PEM file of a client certificate (and its chain) to present, with
    /// `--key`; for an `mtls` provider of `admin.auth`, it is a credential of its own.
    #[arg(long = "cert", global = true, value_name = "FILE")]
    client_cert: Option<PathBuf>,
    /// The private key of `--cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "key", global = true, value_name = "FILE")]
    client_key: Option<PathBuf>,
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
    /// Sign in as yourself at an OpenID Provider (the device authorization grant: open the
    /// URL it prints, sign in there), and save the ID token for the next calls, which
    /// `admin.policies` then decide for you.
    Login(LoginArgs),
}

#[derive(Args)]
struct LoginArgs {
    /// The OpenID Provider's issuer (its discovery document is at
    /// URL/.well-known/openid-configuration): one of `admin.auth`'s `oidc` providers.
    #[arg(long, value_name = "URL")]
    issuer: String,
    /// The OAuth client to sign in with: the provider's `client_id` in the proxy's config
    /// (the ID token's audience). The identity provider must allow it the device grant.
    #[arg(long, value_name = "ID")]
    client_id: String,
    /// A file holding the client's secret (a confidential client, sent as HTTP Basic);
    /// without it, the client is public.
    #[arg(long, value_name = "FILE")]
    client_secret_file: Option<PathBuf>,
    /// The scopes to ask for (space-separated; `openid` gets the ID token).
    #[arg(long, default_value = "openid email groups")]
    scope: String,
    /// Where to save the ID token (mode 0600) [default: $XDG_CONFIG_HOME/portcullis/ctl.jwt,
    /// else $HOME/.config/portcullis/ctl.jwt, where later calls find it].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Runs `portcullis ctl …`.
pub fn run(args: CtlArgs) -> ExitCode {
    if let CtlCommand::Login(login) = &args.command {
        return run_login(login, args.json);
    }
    let call = match request(&args.command) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cred = match credential(
        &args,
        std::env::var(TOKEN_ENV).ok(),
        saved_login_file().as_deref(),
        unix_now(),
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", e.message);
            return ExitCode::from(e.code);
        }
    };
    let admin = match Admin::new(&args) {
        Ok(a) => a,
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
        return rt.block_on(follow(&admin, &cred, &call.1, args.json));
    }
    let answer = rt.block_on(async {
        tokio::time::timeout(TIMEOUT, async {
            // (A change made with a client certificate alone needs no CSRF token: ctl sends
            // no `Origin` and a JSON body, which the admin API knows for no browser's.)
            let (status, body) = send(&admin, &cred, &call, "application/json", &[]).await?;
            Ok::<_, String>((status, body.text().await?))
        })
        .await
        .map_err(|_| {
            format!(
                "{}: no answer within {}s",
                admin.target.authority,
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
        CtlCommand::Login(_) => {
            return Err("`ctl login` signs in at the identity provider, not the admin API".into())
        }
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
    /// Only the client certificate of `--cert` (presented in the TLS handshake): no header.
    ClientCert,
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

/// Why a call has no credential to send: what to say, and the exit code (2: bad usage; 1: the
/// saved sign-in has expired).
#[derive(Debug, PartialEq, Eq)]
struct NoCredential {
    code: u8,
    message: String,
}

impl From<String> for NoCredential {
    fn from(message: String) -> Self {
        NoCredential { code: 2, message }
    }
}

/// The caller's credential: from one of the `--*-file` flags, else from [`TOKEN_ENV`]
/// (`env_token`), else the ID token `ctl login` saved in `saved` (when that file exists, and
/// unless it expired before `now`, in Unix seconds), else the client certificate of `--cert`
/// alone ([`Credential::ClientCert`]). A client certificate is presented whenever it is given,
/// with any of the others too.
fn credential(
    a: &CtlArgs,
    env_token: Option<String>,
    saved: Option<&Path>,
    now: u64,
) -> Result<Credential, NoCredential> {
    match (&a.client_cert, &a.client_key) {
        (Some(_), None) => {
            return Err(
                "--cert needs --key: the file of the certificate's private key"
                    .to_string()
                    .into(),
            )
        }
        (None, Some(_)) => {
            return Err(
                "--key needs --cert: the file of the client certificate it is the key of"
                    .to_string()
                    .into(),
            )
        }
        _ => {}
    }
    let given: Vec<&str> = [
        (a.token_file.is_some(), "--token-file"),
        (a.bearer_file.is_some(), "--bearer-file"),
        (a.api_key_file.is_some(), "--api-key-file"),
    ]
    .into_iter()
    .filter_map(|(on, f)| on.then_some(f))
    .collect();
    if given.len() > 1 {
        return Err(format!("give one credential, not {}", given.join(" and ")).into());
    }
    if let Some(f) = &a.token_file {
        return Ok(secret_file("--token-file", f).map(Credential::Bearer)?);
    }
    if let Some(f) = &a.bearer_file {
        return Ok(secret_file("--bearer-file", f).map(Credential::Bearer)?);
    }
    if let Some(f) = &a.api_key_file {
        return Ok(secret_file("--api-key-file", f).map(Credential::ApiKey)?);
    }
    if let Some(t) = env_token {
        return Ok(secret(TOKEN_ENV, &t).map(Credential::Bearer)?);
    }
    if let Some(f) = saved.filter(|f| f.exists()) {
        let token = secret_file("the saved sign-in", f)?;
        if let Some(exp) = jwt_payload(&token).and_then(|c| c["exp"].as_u64()) {
            if exp <= now && a.client_cert.is_some() {
                // Expired, but the certificate given is a credential of its own.
                return Ok(Credential::ClientCert);
            }
            if exp <= now {
                return Err(NoCredential {
                    code: 1,
                    message: format!(
                        "your ctl login has expired: run `portcullis ctl login` again (the ID \
                         token in {} expired at {})",
                        f.display(),
                        time_text(&json!(exp.saturating_mul(1000)))
                    ),
                });
            }
        }
        return Ok(Credential::Bearer(token));
    }
    if a.client_cert.is_some() {
        return Ok(Credential::ClientCert);
    }
    Err(format!(
        "no credentials: give the admin token with --token-file FILE or the {TOKEN_ENV} \
         environment variable, an identity provider's JWT with --bearer-file FILE, its API \
         key with --api-key-file FILE, or (over https://) a client certificate with --cert \
         FILE --key FILE; or sign in as yourself with `portcullis ctl login`{}",
        saved.map_or_else(String::new, |f| format!(
            " (which saves the token in {})",
            f.display()
        ))
    )
    .into())
}

/// Where `ctl login` saves the ID token, under the user's config directory.
const LOGIN_FILE: &str = "portcullis/ctl.jwt";

/// `$XDG_CONFIG_HOME/portcullis/ctl.jwt`, else `$HOME/.config/portcullis/ctl.jwt` (only
/// absolute directories count, as the XDG spec says); `None` without either.
fn login_file(xdg_config_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(xdg_config_home)
        .map(|d| d.join(LOGIN_FILE))
        .or_else(|| absolute(home).map(|h| h.join(".config").join(LOGIN_FILE)))
}

/// [`login_file`] of this process's environment.
fn saved_login_file() -> Option<PathBuf> {
    login_file(
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A JWT's payload, decoded but NOT verified: only to show who signed in and until when (the
/// proxy verifies the token on every call). `None` when `token` is not a JWT.
fn jwt_payload(token: &str) -> Option<Value> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .filter(Value::is_object)
}

// ---------------------------------------------------------------------------------------
// Signing in: `ctl login`, the OAuth 2.0 device authorization grant (RFC 8628)

/// The grant type of the token requests.
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// How much longer to wait between polls after each `slow_down` (RFC 8628 §3.5).
const SLOW_DOWN: Duration = Duration::from_secs(5);
/// The wait between polls when the provider names none (RFC 8628 §3.2).
const DEFAULT_INTERVAL: u64 = 5;
/// The longest wait between polls after the token endpoint could not be reached.
const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// The lifetime of the device code when the provider names none, and the most waited in all.
const DEFAULT_EXPIRES_IN: u64 = 600;
const MAX_EXPIRES_IN: u64 = 3600;

/// The OAuth client `ctl login` signs in with.
struct OAuthClient {
    id: String,
    /// For a confidential client (`client_secret_basic`).
    secret: Option<String>,
}

/// What the device authorization endpoint answered.
#[derive(Debug, PartialEq, Eq)]
struct DeviceStart {
    device_code: String,
    user_code: String,
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: Duration,
    interval: Duration,
}

impl DeviceStart {
    fn parse(v: &Value) -> Result<DeviceStart, String> {
        let text = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).map(str::to_string);
        let missing = |k: &str| format!("the device authorization answer has no `{k}`");
        Ok(DeviceStart {
            device_code: text("device_code").ok_or_else(|| missing("device_code"))?,
            user_code: text("user_code").ok_or_else(|| missing("user_code"))?,
            // `verification_url`: what some providers (Google) call it.
            verification_uri: text("verification_uri")
                .or_else(|| text("verification_url"))
                .ok_or_else(|| missing("verification_uri"))?,
            verification_uri_complete: text("verification_uri_complete"),
            expires_in: Duration::from_secs(
                v["expires_in"]
                    .as_u64()
                    .filter(|s| *s > 0)
                    .unwrap_or(DEFAULT_EXPIRES_IN)
                    .min(MAX_EXPIRES_IN),
            ),
            interval: Duration::from_secs(
                v["interval"]
                    .as_u64()
                    .unwrap_or(DEFAULT_INTERVAL)
                    .clamp(1, MAX_INTERVAL.as_secs()),
            ),
        })
    }

    /// What to tell the person.
    fn prompt(&self) -> String {
        match &self.verification_uri_complete {
            Some(c) => format!(
                "To sign in, open {c} (or {} and enter {})",
                self.verification_uri, self.user_code
            ),
            None => format!(
                "To sign in, open {} and enter {}",
                self.verification_uri, self.user_code
            ),
        }
    }
}

/// What to do after one answer of the token endpoint.
#[derive(Debug, PartialEq)]
enum PollStep {
    /// Signed in: the token endpoint's answer.
    Done(Value),
    /// Not yet: poll again after the (maybe longer) interval.
    Wait,
    /// The endpoint could not be reached or failed: poll again, later; the note says why.
    Retry(String),
    /// The sign-in is over, and failed.
    Fail(String),
}

/// The polling of the token endpoint: the interval between polls and the end of the wait.
#[derive(Debug)]
struct Poller {
    interval: Duration,
    /// Added to `interval` on each `slow_down`.
    slow_down: Duration,
    deadline: Instant,
}

/// Said when the device code expired before the person signed in.
fn expired_note() -> String {
    "the sign-in was not completed in time (the code expired): run `portcullis ctl login` again"
        .into()
}

impl Poller {
    fn new(start: &DeviceStart, now: Instant) -> Poller {
        Poller {
            interval: start.interval,
            slow_down: SLOW_DOWN,
            deadline: now + start.expires_in,
        }
    }

    /// How long to wait before the next poll, or why polling is over (the code expired).
    fn wait(&self, now: Instant) -> Result<Duration, String> {
        match self.deadline.checked_duration_since(now) {
            Some(left) if !left.is_zero() => Ok(self.interval.min(left)),
            _ => Err(expired_note()),
        }
    }

    /// The next step after the token endpoint's `answer`: its status and JSON body (null when
    /// it is not JSON), or why there was none.
    fn step(&mut self, answer: Result<(u16, Value), String>) -> PollStep {
        let (status, v) = match answer {
            Ok(a) => a,
            Err(e) => {
                // RFC 8628 §3.5: back off on connection failures.
                self.interval = (self.interval * 2).min(MAX_INTERVAL);
                return PollStep::Retry(e);
            }
        };
        if (200..300).contains(&status) {
            return PollStep::Done(v);
        }
        match v["error"].as_str() {
            Some("authorization_pending") => PollStep::Wait,
            Some("slow_down") => {
                self.interval += self.slow_down;
                PollStep::Wait
            }
            Some("access_denied") => PollStep::Fail(format!(
                "the sign-in was denied at the identity provider{}",
                description(&v)
            )),
            Some("expired_token") => PollStep::Fail(expired_note()),
            _ if status >= 500 => {
                self.interval = (self.interval * 2).min(MAX_INTERVAL);
                PollStep::Retry(format!(
                    "the token endpoint failed: {}",
                    oauth_error(status, &v)
                ))
            }
            _ => PollStep::Fail(format!(
                "the identity provider refused the sign-in: {}",
                oauth_error(status, &v)
            )),
        }
    }
}

/// `: error_description` of an OAuth error answer, or nothing.
fn description(v: &Value) -> String {
    match v["error_description"].as_str() {
        Some(d) if !d.is_empty() => format!(": {d}"),
        _ => String::new(),
    }
}

/// An OAuth error answer in a line: `error: description (status)`.
fn oauth_error(status: u16, v: &Value) -> String {
    match v["error"].as_str() {
        Some(e) => format!("{e}{} ({status})", description(v)),
        None => format!("an answer that is not an OAuth error ({status})"),
    }
}

/// POSTs the form `params` to `url` as `client` (HTTP Basic for a confidential client, else
/// `client_id` in the form): the status and the JSON body (null when it is not JSON).
async fn post_form(
    http: &reqwest::Client,
    url: &str,
    client: &OAuthClient,
    params: &[(&str, &str)],
) -> Result<(u16, Value), String> {
    let mut form: Vec<(&str, &str)> = params.to_vec();
    let mut req = http.post(url).header("accept", "application/json");
    match &client.secret {
        // RFC 6749 §2.3.1: both form-urlencoded before the Basic encoding.
        Some(s) => req = req.basic_auth(segment(&client.id), Some(segment(s))),
        None => form.push(("client_id", &client.id)),
    }
    let resp = req
        .form(&form)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// Polls the token endpoint until the person signed in (the endpoint's answer), denied it, or
/// the code expired.
async fn poll_token(
    http: &reqwest::Client,
    token_endpoint: &str,
    client: &OAuthClient,
    device_code: &str,
    mut poller: Poller,
) -> Result<Value, String> {
    let params = [("grant_type", DEVICE_GRANT), ("device_code", device_code)];
    loop {
        tokio::time::sleep(poller.wait(Instant::now())?).await;
        poller.wait(Instant::now())?;
        let answer = post_form(http, token_endpoint, client, &params).await;
        match poller.step(answer) {
            PollStep::Done(v) => return Ok(v),
            PollStep::Wait => {}
            PollStep::Retry(note) => eprintln!(
                "warning: {note}; trying again in {}s",
                poller.interval.as_secs()
            ),
            PollStep::Fail(e) => return Err(e),
        }
    }
}

/// The device authorization grant at `a.issuer`: the ID token.
async fn device_login(a: &LoginArgs, client: &OAuthClient) -> Result<String, String> {
    let http = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .user_agent(concat!("portcullis-ctl/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let issuer = a.issuer.trim_end_matches('/');
    if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
        return Err(format!(
            "--issuer `{}`: give the provider's issuer URL, like https://idp.example.com",
            a.issuer
        ));
    }
    let discovery = format!("{issuer}/.well-known/openid-configuration");
    let resp = http
        .get(&discovery)
        .send()
        .await
        .map_err(|e| format!("{discovery}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{discovery}: {}", resp.status()));
    }
    let meta: Value = resp
        .json()
        .await
        .map_err(|e| format!("{discovery}: not a discovery document ({e})"))?;
    let named = meta["issuer"].as_str().unwrap_or_default();
    if named.trim_end_matches('/') != issuer {
        return Err(format!(
            "{discovery} names the issuer `{named}`, not `{}`: give --issuer exactly as the \
             provider names itself",
            a.issuer
        ));
    }
    let Some(device_endpoint) = meta["device_authorization_endpoint"].as_str() else {
        return Err(format!(
            "{issuer} offers no device authorization grant (no device_authorization_endpoint \
             in its discovery document): enable it at the identity provider, and allow the \
             grant type {DEVICE_GRANT} to client `{}`",
            client.id
        ));
    };
    let token_endpoint = meta["token_endpoint"]
        .as_str()
        .ok_or_else(|| format!("{discovery} has no token_endpoint"))?;

    let (status, v) = post_form(&http, device_endpoint, client, &[("scope", &a.scope)]).await?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "the identity provider refused to start the sign-in: {} (does client `{}` allow the \
             grant type {DEVICE_GRANT}?)",
            oauth_error(status, &v),
            client.id
        ));
    }
    let start = DeviceStart::parse(&v)?;
    eprintln!("{}", start.prompt());
    eprintln!(
        "Waiting for the sign-in (the code expires in {} minutes)...",
        start.expires_in.as_secs().div_ceil(60)
    );
    let poller = Poller::new(&start, Instant::now());
    let tokens = poll_token(&http, token_endpoint, client, &start.device_code, poller).await?;
    let Some(id_token) = tokens["id_token"].as_str() else {
        return Err(format!(
            "signed in, but the identity provider sent no ID token: ask for the `openid` \
             scope (--scope \"{}\")",
            a.scope
        ));
    };
    secret("the ID token", id_token)
}

/// Writes `token` to `path` with mode 0600 (replacing the file whole), creating its
/// directory with mode 0700 when it is missing.
fn save_token(path: &Path, token: &str) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let failed = |e: std::io::Error| format!("cannot save the token in {}: {e}", path.display());
    if !dir.exists() {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
        b.create(dir).map_err(failed)?;
    }
    let name = path
        .file_name()
        .map_or_else(|| "ctl.jwt".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let written = o.open(&tmp).and_then(|mut f| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(format!("{token}\n").as_bytes())?;
        f.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(failed(e))
        }
    }
}

/// Who signed in, from the ID token's payload: `sub <email>`.
fn who(claims: &Value) -> String {
    let sub = claims["sub"].as_str().unwrap_or("(no sub)");
    match claims["email"].as_str() {
        Some(e) if e != sub => format!("{sub} <{e}>"),
        _ => sub.to_string(),
    }
}

/// Runs `portcullis ctl login`.
fn run_login(a: &LoginArgs, as_json: bool) -> ExitCode {
    let Some(out) = a.out.clone().or_else(saved_login_file) else {
        eprintln!(
            "error: nowhere to save the token: neither XDG_CONFIG_HOME nor HOME is set; give \
             --out FILE"
        );
        return ExitCode::from(2);
    };
    let client = OAuthClient {
        id: a.client_id.clone(),
        secret: match &a.client_secret_file {
            Some(f) => match secret_file("--client-secret-file", f) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            },
            None => None,
        },
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
    let token = match rt.block_on(device_login(a, &client)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if let Err(e) = save_token(&out, &token) {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let claims = jwt_payload(&token).unwrap_or(Value::Null);
    let until = claims["exp"]
        .as_u64()
        .map(|exp| time_text(&json!(exp.saturating_mul(1000))));
    if as_json {
        println!(
            "{}",
            json!({
                "sub": claims["sub"],
                "email": claims["email"],
                "issuer": a.issuer,
                "expires_at": until,
                "file": out.display().to_string(),
            })
        );
    } else {
        println!(
            "Signed in as {} at {}; the ID token is saved in {}{}",
            who(&claims),
            a.issuer,
            out.display(),
            until.map_or_else(String::new, |u| format!(" (valid until {u})"))
        );
    }
    ExitCode::SUCCESS
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
    /// `https://`: over TLS.
    tls: bool,
}

impl Target {
    /// `http://host:port[/prefix]` (default port 80) or `https://host:port[/prefix]` (443).
    fn parse(base: &str) -> Result<Target, String> {
        let uri: Uri = base.parse().map_err(|e| format!("--admin `{base}`: {e}"))?;
        let (tls, default_port) = match uri.scheme_str() {
            Some("http") => (false, 80),
            Some("https") => (true, 443),
            Some(s) => {
                return Err(format!(
                    "--admin `{base}`: scheme `{s}` is not supported; the admin listener \
                     speaks HTTP (`http://127.0.0.1:9901`), or HTTPS with `admin.tls` \
                     (`https://127.0.0.1:9901`)"
                ))
            }
            None => {
                return Err(format!(
                    "--admin `{base}`: give it as `http://host:port` or `https://host:port`"
                ))
            }
        };
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
            port: authority.port_u16().unwrap_or(default_port),
            prefix: uri.path().trim_end_matches('/').to_string(),
            tls,
        })
    }
}

/// The admin API and how to reach it.
struct Admin {
    target: Target,
    /// For `https://`: the TLS client config, and the name the certificate must be valid for.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl Admin {
    /// From `--admin`, `--cacert`, `--cert` and `--key`; `Err` on bad usage (a TLS flag for
    /// `http://`, a file that cannot be read or used).
    fn new(a: &CtlArgs) -> Result<Admin, String> {
        let target = Target::parse(&a.admin)?;
        let client = a.client_cert.as_deref().zip(a.client_key.as_deref());
        if !target.tls {
            let flags: Vec<&str> = [
                (a.cacert.is_some(), "--cacert"),
                (a.client_cert.is_some(), "--cert"),
                (a.client_key.is_some(), "--key"),
            ]
            .into_iter()
            .filter_map(|(on, f)| on.then_some(f))
            .collect();
            if !flags.is_empty() {
                return Err(format!(
                    "{} are for an admin listener over TLS: give --admin as `https://…`",
                    flags.join(", ")
                ));
            }
            return Ok(Admin { target, tls: None });
        }
        let name = ServerName::try_from(target.host.clone()).map_err(|e| {
            format!(
                "--admin `{}`: `{}` is no name a certificate can be checked for: {e}",
                a.admin, target.host
            )
        })?;
        let cfg = tls_config(a.cacert.as_deref(), client)?;
        Ok(Admin {
            target,
            tls: Some((cfg, name)),
        })
    }
}

/// The certificates of the PEM file `f` (given with `flag`).
fn pem_certs(flag: &str, f: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(f).map_err(|e| format!("{flag} {}: {e}", f.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: bad PEM: {e}", f.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no certificate in it (PEM `BEGIN CERTIFICATE` blocks are expected)",
            f.display()
        ));
    }
    Ok(certs)
}

/// The private key of the PEM file `f` (`--key`): PKCS#8, PKCS#1 or SEC1.
fn pem_key(f: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(f).map_err(|e| format!("--key {}: {e}", f.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => format!(
            "--key {}: no private key in it (a PEM PKCS#8, PKCS#1 or SEC1 key is expected)",
            f.display()
        ),
        e => format!("--key {}: bad PEM: {e}", f.display()),
    })
}

/// The TLS client config for the admin listener: its certificate verified against the CAs of
/// `cacert`, else the Mozilla roots; `client`, a certificate and its key to present.
fn tls_config(
    cacert: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    match cacert {
        Some(f) => {
            for c in pem_certs("--cacert", f)? {
                roots.add(c).map_err(|e| {
                    format!(
                        "--cacert {}: a certificate that cannot be trusted: {e}",
                        f.display()
                    )
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = builder.with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(pem_certs("--cert", cert)?, pem_key(key)?)
            .map_err(|e| {
                format!(
                    "--cert {} with --key {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A connection to the admin API, plain or over TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

/// Connects to the admin API (and for `https://`, makes the TLS handshake).
async fn connect(a: &Admin) -> Result<Stream, String> {
    let t = &a.target;
    let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", t.authority))?;
    let Some((cfg, name)) = &a.tls else {
        return Ok(Box::new(tcp));
    };
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name.clone(), tcp)
        .await
        .map_err(|e| match tls_error(&e) {
            Some(_) => io_failure(&t.authority, &e),
            None => format!("TLS handshake with {} failed: {e}", t.authority),
        })?;
    Ok(Box::new(tls))
}

/// The TLS error inside an I/O error of a TLS stream.
fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// What to say of an I/O error talking to `authority`: for a TLS one, what failed and what
/// to do about it.
fn io_failure(authority: &str, e: &std::io::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C};
    let Some(tls) = tls_error(e) else {
        return format!("{authority}: {e}");
    };
    let (handshake, hint) = match tls {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => (
            true,
            "; pass the CA that issued the admin listener's certificate with --cacert FILE",
        ),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => (
            true,
            "; give --admin a host name or address the certificate is for",
        ),
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::PeerIncompatible(_) => (true, ""),
        // TLS 1.3: the server judges the client's certificate after the client's handshake
        // is done, and says so in an alert to the first read.
        rustls::Error::AlertReceived(A::CertificateRequired) => (
            true,
            "; the admin listener asks for a client certificate: pass one with --cert FILE \
             --key FILE",
        ),
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied,
        ) => (
            true,
            "; the admin listener does not accept the client certificate of --cert",
        ),
        rustls::Error::AlertReceived(A::HandshakeFailure | A::ProtocolVersion) => (true, ""),
        _ => (false, ""),
    };
    if handshake {
        format!("TLS handshake with {authority} failed: {tls}{hint}")
    } else {
        format!("TLS with {authority} failed: {tls}")
    }
}

/// The request's bytes, with the `extra` headers.
fn request_bytes(
    t: &Target,
    cred: &Credential,
    call: &Call,
    accept: &str,
    extra: &[(&str, &str)],
) -> Vec<u8> {
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
        Credential::ClientCert => {}
    }
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
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
        let io = |e: std::io::Error| io_failure(authority, &e);
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
        let io = |e: std::io::Error| io_failure(&authority, &e);
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

/// Sends `call` (with the `extra` headers) and reads the answer's head.
async fn send(
    a: &Admin,
    cred: &Credential,
    call: &Call,
    accept: &str,
    extra: &[(&str, &str)],
) -> Result<(u16, Body<Stream>), String> {
    let t = &a.target;
    let mut stream = connect(a).await?;
    let io = |e: std::io::Error| io_failure(&t.authority, &e);
    stream
        .write_all(&request_bytes(t, cred, call, accept, extra))
        .await
        .map_err(io)?;
    stream.flush().await.map_err(io)?;
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
        CtlCommand::Clear { .. } | CtlCommand::Events { .. } | CtlCommand::Login(_) => {
            String::new()
        }
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
async fn follow(a: &Admin, cred: &Credential, path: &str, as_json: bool) -> ExitCode {
    let t = &a.target;
    let call = (Method::GET, path.to_string(), None);
    let head = tokio::time::timeout(TIMEOUT, send(a, cred, &call, "text/event-stream", &[])).await;
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
        let c = |args: &[&str]| credential(&parse(args).unwrap(), None, None, 0);
        assert_eq!(
            c(&["--api-key-file", f, "tables"]),
            Ok(Credential::ApiKey("abc".into()))
        );
        assert_eq!(
            c(&["--bearer-file", f, "tables"]),
            Ok(Credential::Bearer("abc".into()))
        );
        let e = c(&["--bearer-file", f, "--token-file", f, "tables"]).unwrap_err();
        assert!(e.message.contains("one credential") && e.code == 2, "{e:?}");
        assert_eq!(
            credential(&parse(&["tables"]).unwrap(), Some("t".into()), None, 0),
            Ok(Credential::Bearer("t".into()))
        );
        let e = c(&["tables"]).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(
            e.message
                .starts_with("no credentials: give the admin token with --token-file")
                && e.message.contains("`portcullis ctl login`"),
            "{e:?}"
        );
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
    fn admin_urls_are_http_or_https() {
        let t = Target::parse("http://[::1]:9/p/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str(), t.tls),
            ("::1", 9, "/p", false)
        );
        assert_eq!(Target::parse("http://h").unwrap().port, 80);
        // HTTPS: port 443 unless given, a prefix kept.
        let t = Target::parse("https://admin.example").unwrap();
        assert_eq!(
            (
                t.authority.as_str(),
                t.host.as_str(),
                t.port,
                t.prefix.as_str()
            ),
            ("admin.example", "admin.example", 443, "")
        );
        assert!(t.tls);
        let t = Target::parse("https://127.0.0.1:9901/ops/admin/").unwrap();
        assert_eq!(
            (t.authority.as_str(), t.port, t.prefix.as_str(), t.tls),
            ("127.0.0.1:9901", 9901, "/ops/admin", true)
        );
        let t = Target::parse("https://[::1]/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str()),
            ("::1", 443, "")
        );
        let e = Target::parse("ftp://h:1").unwrap_err();
        assert!(e.contains("scheme `ftp` is not supported"), "{e}");
        let e = Target::parse("h:1").unwrap_err();
        assert!(e.contains("`https://host:port`"), "{e}");

        let req = request_bytes(
            &Target::parse("http://h:1").unwrap(),
            &Credential::ApiKey("k".into()),
            &(Method::POST, "/x".into(), Some(json!({ "a": 1 }))),
            "application/json",
            &[],
        );
        let req = String::from_utf8(req).unwrap();
        assert!(
            req.starts_with("POST /x HTTP/1.1\r\nHost: h:1\r\n"),
            "{req}"
        );
        assert!(req.contains("X-API-Key: k\r\n") && !req.contains("Authorization"));
        assert!(req.ends_with("Content-Length: 7\r\n\r\n{\"a\":1}"), "{req}");
        // The client certificate alone: no credential header; extra headers when given.
        let req = request_bytes(
            &Target::parse("https://h/p").unwrap(),
            &Credential::ClientCert,
            &(Method::POST, "/x".into(), None),
            "application/json",
            &[("X-Extra", "tok")],
        );
        let req = String::from_utf8(req).unwrap();
        assert!(
            req.starts_with("POST /p/x HTTP/1.1\r\nHost: h\r\n"),
            "{req}"
        );
        assert!(req.contains("X-Extra: tok\r\n"), "{req}");
        assert!(
            !req.contains("Authorization") && !req.contains("X-API-Key"),
            "{req}"
        );
    }

    #[test]
    fn a_client_certificate_is_a_credential_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("t");
        std::fs::write(&token, "abc\n").unwrap();
        let token = token.to_str().unwrap();
        let saved = dir.path().join("ctl.jwt");
        let now = 1_700_000_000;
        let c = |args: &[&str], env: Option<&str>| {
            let mut all = vec!["--admin", "https://h", "--cert", "c.pem", "--key", "c.key"];
            all.extend_from_slice(args);
            credential(
                &parse(&all).unwrap(),
                env.map(str::to_string),
                Some(&saved),
                now,
            )
        };
        // Alone, it is the credential; with another, the other is sent too.
        assert_eq!(c(&["servers"], None), Ok(Credential::ClientCert));
        assert_eq!(
            c(&["--token-file", token, "servers"], None),
            Ok(Credential::Bearer("abc".into()))
        );
        assert_eq!(
            c(&["servers"], Some("static")),
            Ok(Credential::Bearer("static".into()))
        );
        // A saved sign-in is sent with it; an expired one is left out.
        let live = jwt(json!({ "sub": "alice", "exp": now + 60 }));
        std::fs::write(&saved, &live).unwrap();
        assert_eq!(c(&["servers"], None), Ok(Credential::Bearer(live)));
        std::fs::write(&saved, jwt(json!({ "sub": "alice", "exp": now }))).unwrap();
        assert_eq!(c(&["servers"], None), Ok(Credential::ClientCert));

        // A certificate needs its key, and a key its certificate.
        let one = |args: &[&str]| credential(&parse(args).unwrap(), None, None, now);
        let e = one(&["--admin", "https://h", "--key", "c.key", "servers"]).unwrap_err();
        assert!(
            e.code == 2 && e.message.starts_with("--key needs --cert"),
            "{e:?}"
        );
        let e = one(&["--admin", "https://h", "--cert", "c.pem", "servers"]).unwrap_err();
        assert!(
            e.code == 2 && e.message.starts_with("--cert needs --key"),
            "{e:?}"
        );
        // Without any credential, the certificate is one of the ways named.
        let e = one(&["servers"]).unwrap_err();
        assert!(e.message.contains("--cert FILE --key FILE"), "{e:?}");
    }

    #[test]
    fn tls_flags_need_https_and_usable_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(d("ca.pem"), ca.cert.pem()).unwrap();
        std::fs::write(d("c.pem"), ca.cert.pem()).unwrap();
        std::fs::write(d("c.key"), ca.key_pair.serialize_pem()).unwrap();
        std::fs::write(d("other.key"), other.key_pair.serialize_pem()).unwrap();
        std::fs::write(d("empty.pem"), "not PEM at all\n").unwrap();
        let admin = |args: &[&str]| {
            let mut all = args.to_vec();
            all.push("servers");
            Admin::new(&parse(&all).unwrap())
        };

        let a = admin(&["--admin", "https://127.0.0.1:9901"]).unwrap();
        let (_, name) = a.tls.as_ref().unwrap();
        assert!(matches!(name, ServerName::IpAddress(_)), "{name:?}");
        let a = admin(&[
            "--admin",
            "https://localhost",
            "--cacert",
            &d("ca.pem"),
            "--cert",
            &d("c.pem"),
            "--key",
            &d("c.key"),
        ])
        .unwrap();
        let (cfg, name) = a.tls.as_ref().unwrap();
        assert_eq!(name, &ServerName::try_from("localhost").unwrap());
        assert!(cfg.client_auth_cert_resolver.has_certs());
        assert_eq!(cfg.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(admin(&["--admin", "http://h:1"]).unwrap().tls.is_none());

        let e = admin(&["--admin", "http://h:1", "--cacert", &d("ca.pem")])
            .err()
            .unwrap();
        assert!(
            e.contains("--cacert are for an admin listener over TLS"),
            "{e}"
        );
        let e = admin(&["--admin", "https://h", "--cacert", &d("nope.pem")])
            .err()
            .unwrap();
        assert!(
            e.starts_with(&format!("--cacert {}: ", d("nope.pem"))),
            "{e}"
        );
        let e = admin(&["--admin", "https://h", "--cacert", &d("empty.pem")])
            .err()
            .unwrap();
        assert!(e.contains("no certificate in it"), "{e}");
        let e = admin(&[
            "--admin",
            "https://h",
            "--cert",
            &d("c.pem"),
            "--key",
            &d("ca.pem"),
        ])
        .err()
        .unwrap();
        assert!(e.contains("no private key in it"), "{e}");
        let e = admin(&[
            "--admin",
            "https://h",
            "--cert",
            &d("c.pem"),
            "--key",
            &d("other.key"),
        ])
        .err()
        .unwrap();
        assert!(
            e.starts_with(&format!("--cert {} with --key", d("c.pem"))),
            "{e}"
        );
    }

    #[test]
    fn tls_failures_say_what_to_do() {
        let tls = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            io_failure(
                "127.0.0.1:9901",
                &tls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "TLS handshake with 127.0.0.1:9901 failed: invalid peer certificate: UnknownIssuer; \
             pass the CA that issued the admin listener's certificate with --cacert FILE"
        );
        let e = io_failure(
            "h:1",
            &tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateRequired,
            )),
        );
        assert!(
            e.starts_with(
                "TLS handshake with h:1 failed: received fatal alert: CertificateRequired"
            ) && e.ends_with("pass one with --cert FILE --key FILE"),
            "{e}"
        );
        let e = io_failure(
            "h:1",
            &tls(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA,
            )),
        );
        assert!(e.contains("does not accept the client certificate"), "{e}");
        assert_eq!(
            io_failure("h:1", &tls(rustls::Error::DecryptError)),
            "TLS with h:1 failed: cannot decrypt peer's message"
        );
        assert_eq!(
            io_failure(
                "h:1",
                &std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset")
            ),
            "h:1: reset"
        );
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

    // -----------------------------------------------------------------------------------
    // `ctl login`

    /// An unsigned JWT with `payload` (enough for what the CLI reads without verifying).
    fn jwt(payload: Value) -> String {
        use base64::Engine;
        let enc =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.c2ln", enc(&json!({ "alg": "RS256" })), enc(&payload))
    }

    #[test]
    fn the_saved_sign_in_is_found_in_the_config_directory() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            login_file(os("/x/cfg"), os("/home/a")),
            Some(PathBuf::from("/x/cfg/portcullis/ctl.jwt"))
        );
        assert_eq!(
            login_file(None, os("/home/a")),
            Some(PathBuf::from("/home/a/.config/portcullis/ctl.jwt"))
        );
        // The XDG spec: a relative or empty XDG_CONFIG_HOME is ignored.
        assert_eq!(
            login_file(os("rel"), os("/home/a")),
            Some(PathBuf::from("/home/a/.config/portcullis/ctl.jwt"))
        );
        assert_eq!(
            login_file(os(""), os("/home/a")),
            Some(PathBuf::from("/home/a/.config/portcullis/ctl.jwt"))
        );
        assert_eq!(login_file(None, None), None);
        assert_eq!(login_file(os("rel"), os("")), None);
    }

    #[test]
    fn the_saved_sign_in_is_sent_only_without_other_credentials_and_until_it_expires() {
        let xdg = tempfile::tempdir().unwrap();
        let saved = login_file(Some(xdg.path().into()), None).unwrap();
        let now = 1_700_000_000;
        let c = |args: &[&str], env: Option<&str>| {
            credential(
                &parse(args).unwrap(),
                env.map(str::to_string),
                Some(&saved),
                now,
            )
        };
        // No file yet: no credentials, and where `ctl login` would save one.
        let e = c(&["tables"], None).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(
            e.message.contains("no credentials")
                && e.message.contains("ctl login")
                && e.message.contains(saved.to_str().unwrap()),
            "{e:?}"
        );

        std::fs::create_dir_all(saved.parent().unwrap()).unwrap();
        let live = jwt(json!({ "sub": "alice", "exp": now + 60 }));
        std::fs::write(&saved, format!("{live}\n")).unwrap();
        assert_eq!(c(&["tables"], None), Ok(Credential::Bearer(live.clone())));
        // Anything given explicitly wins.
        assert_eq!(
            c(&["tables"], Some("static")),
            Ok(Credential::Bearer("static".into()))
        );
        let other = xdg.path().join("key");
        std::fs::write(&other, "k").unwrap();
        assert_eq!(
            c(&["--api-key-file", other.to_str().unwrap(), "tables"], None),
            Ok(Credential::ApiKey("k".into()))
        );
        // Not a JWT (or no `exp`): sent as it is, the proxy judges it.
        std::fs::write(&saved, "opaque").unwrap();
        assert_eq!(
            c(&["tables"], None),
            Ok(Credential::Bearer("opaque".into()))
        );

        // Expired: exit 1, and nothing is sent.
        std::fs::write(&saved, jwt(json!({ "sub": "alice", "exp": now }))).unwrap();
        let e = c(&["tables"], None).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(
            e.message
                .starts_with("your ctl login has expired: run `portcullis ctl login` again")
                && e.message.contains("2023-11-14T22:13:20"),
            "{e:?}"
        );
        // Empty: said, with the file.
        std::fs::write(&saved, "\n").unwrap();
        let e = c(&["tables"], None).unwrap_err();
        assert!(e.message.contains("empty") && e.code == 2, "{e:?}");
    }

    #[test]
    fn jwt_payloads_are_read_for_display() {
        let t = jwt(json!({ "sub": "alice", "email": "alice@example.com", "exp": 5 }));
        let c = jwt_payload(&t).unwrap();
        assert_eq!(who(&c), "alice <alice@example.com>");
        assert_eq!(who(&json!({ "sub": "bob" })), "bob");
        assert_eq!(jwt_payload("a.b"), None);
        assert_eq!(jwt_payload("a.b.c.d"), None);
        assert_eq!(jwt_payload("a.!!.c"), None);
        assert_eq!(
            jwt_payload(&format!("x.{}.y", "bnVsbA")),
            None,
            "null is no payload"
        );
    }

    #[test]
    fn the_device_authorization_answer_is_read() {
        let d = DeviceStart::parse(&json!({
            "device_code": "dc", "user_code": "ABCD-EFGH",
            "verification_uri": "https://idp/device",
            "verification_uri_complete": "https://idp/device?user_code=ABCD-EFGH",
            "expires_in": 600
        }))
        .unwrap();
        assert_eq!(d.interval, Duration::from_secs(5), "RFC 8628's default");
        assert_eq!(d.expires_in, Duration::from_secs(600));
        assert_eq!(
            d.prompt(),
            "To sign in, open https://idp/device?user_code=ABCD-EFGH (or https://idp/device and \
             enter ABCD-EFGH)"
        );
        let d = DeviceStart::parse(&json!({
            "device_code": "dc", "user_code": "X", "verification_url": "https://g/device",
            "interval": 0, "expires_in": 999_999
        }))
        .unwrap();
        assert_eq!(d.prompt(), "To sign in, open https://g/device and enter X");
        assert_eq!(d.interval, Duration::from_secs(1), "never a busy loop");
        assert_eq!(
            d.expires_in,
            Duration::from_secs(MAX_EXPIRES_IN),
            "a bounded wait"
        );
        let e = DeviceStart::parse(&json!({ "device_code": "dc", "verification_uri": "u" }))
            .unwrap_err();
        assert!(e.contains("user_code"), "{e}");
    }

    #[test]
    fn polling_waits_slows_down_and_stops_on_denial_or_expiry() {
        let t0 = Instant::now();
        let start = DeviceStart {
            device_code: "dc".into(),
            user_code: "u".into(),
            verification_uri: "v".into(),
            verification_uri_complete: None,
            expires_in: Duration::from_secs(30),
            interval: Duration::from_secs(5),
        };
        let mut p = Poller::new(&start, t0);
        let err = |s: u16, e: &str| Ok((s, json!({ "error": e, "error_description": "why" })));
        let secs = |p: &Poller| p.interval.as_secs();

        assert_eq!(p.step(err(400, "authorization_pending")), PollStep::Wait);
        assert_eq!(secs(&p), 5);
        assert_eq!(p.step(err(400, "slow_down")), PollStep::Wait);
        assert_eq!(secs(&p), 10, "slow_down: 5 seconds more");
        assert_eq!(p.step(err(400, "slow_down")), PollStep::Wait);
        assert_eq!(secs(&p), 15, "and 5 more on each");
        assert_eq!(p.step(err(400, "authorization_pending")), PollStep::Wait);
        assert_eq!(secs(&p), 15, "pending keeps the interval");

        // The wait: the interval, cut short at the code's expiry; none after it.
        assert_eq!(p.wait(t0), Ok(Duration::from_secs(15)));
        assert_eq!(
            p.wait(t0 + Duration::from_secs(25)),
            Ok(Duration::from_secs(5))
        );
        for late in [30, 31] {
            let e = p.wait(t0 + Duration::from_secs(late)).unwrap_err();
            assert!(e.contains("expired") && e.contains("ctl login"), "{e}");
        }

        // The endpoint unreachable or failing: retried, backing off, up to a minute.
        assert!(matches!(p.step(Err("refused".into())), PollStep::Retry(n) if n == "refused"));
        assert_eq!(secs(&p), 30);
        assert!(matches!(
            p.step(Ok((503, Value::Null))),
            PollStep::Retry(n) if n.contains("503")
        ));
        assert_eq!(secs(&p), 60);
        assert!(matches!(
            p.step(err(500, "server_error")),
            PollStep::Retry(_)
        ));
        assert_eq!(secs(&p), 60);

        // Over: denied, expired, any other error; or signed in.
        match p.step(err(400, "access_denied")) {
            PollStep::Fail(e) => {
                assert_eq!(e, "the sign-in was denied at the identity provider: why")
            }
            s => panic!("{s:?}"),
        }
        match p.step(err(400, "expired_token")) {
            PollStep::Fail(e) => assert!(e.contains("expired") && e.contains("again"), "{e}"),
            s => panic!("{s:?}"),
        }
        match p.step(err(401, "invalid_client")) {
            PollStep::Fail(e) => assert_eq!(
                e,
                "the identity provider refused the sign-in: invalid_client: why (401)"
            ),
            s => panic!("{s:?}"),
        }
        assert!(matches!(p.step(Ok((400, Value::Null))), PollStep::Fail(_)));
        assert_eq!(
            p.step(Ok((200, json!({ "id_token": "x" })))),
            PollStep::Done(json!({ "id_token": "x" }))
        );
    }

    /// A token endpoint on loopback that gives `answers` in turn: its URL, and each request
    /// it got (the time, the head and the body).
    async fn token_endpoint(
        answers: Vec<(u16, Value)>,
    ) -> (
        String,
        tokio::task::JoinHandle<Vec<(Instant, String, String)>>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", l.local_addr().unwrap());
        let seen = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = Vec::new();
                let (head, body_in) = loop {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if rest.len() >= len || n == 0 {
                            break (head.to_string(), rest.to_string());
                        }
                    }
                    assert!(n > 0, "the client went away");
                };
                seen.push((Instant::now(), head, body_in));
                let text = body.to_string();
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
                s.write_all(answer.as_bytes()).await.unwrap();
                let _ = s.shutdown().await;
            }
            seen
        });
        (url, seen)
    }

    fn fast_poller(interval_ms: u64, slow_down_ms: u64, expires_ms: u64) -> Poller {
        Poller {
            interval: Duration::from_millis(interval_ms),
            slow_down: Duration::from_millis(slow_down_ms),
            deadline: Instant::now() + Duration::from_millis(expires_ms),
        }
    }

    #[tokio::test]
    async fn the_token_endpoint_is_polled_until_the_sign_in_ends() {
        let http = reqwest::Client::new();
        let confidential = OAuthClient {
            id: "ctl".into(),
            secret: Some("s3cret".into()),
        };
        let pending = json!({ "error": "authorization_pending" });
        let (url, seen) = token_endpoint(vec![
            (400, pending.clone()),
            (400, json!({ "error": "slow_down" })),
            (400, pending.clone()),
            (200, json!({ "id_token": "h.p.s", "token_type": "Bearer" })),
        ])
        .await;
        let t0 = Instant::now();
        let v = poll_token(
            &http,
            &url,
            &confidential,
            "the-device-code",
            fast_poller(20, 300, 10_000),
        )
        .await
        .unwrap();
        assert_eq!(v["id_token"], "h.p.s");
        let seen = seen.await.unwrap();
        assert_eq!(seen.len(), 4);
        assert!(
            seen[0].0 - t0 >= Duration::from_millis(20),
            "it waits first"
        );
        assert!(
            seen[2].0 - seen[1].0 >= Duration::from_millis(320),
            "slow_down lengthens the wait: {:?}",
            seen[2].0 - seen[1].0
        );
        let (_, head, body) = &seen[0];
        // HTTP Basic for a confidential client: `ctl:s3cret`.
        assert!(
            head.to_ascii_lowercase().contains("authorization: basic ")
                && head.contains("Basic Y3RsOnMzY3JldA=="),
            "{head}"
        );
        assert_eq!(
            body,
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code=the-device-code"
        );

        // A public client names itself in the form; the person denies.
        let public = OAuthClient {
            id: "ctl".into(),
            secret: None,
        };
        let (url, seen) = token_endpoint(vec![
            (400, pending.clone()),
            (
                400,
                json!({ "error": "access_denied", "error_description": "End-User aborted interaction" }),
            ),
        ])
        .await;
        let e = poll_token(&http, &url, &public, "dc", fast_poller(10, 10, 10_000))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            "the sign-in was denied at the identity provider: End-User aborted interaction"
        );
        let seen = seen.await.unwrap();
        assert!(seen[0].2.ends_with("&client_id=ctl"), "{}", seen[0].2);
        assert!(!seen[0].1.to_ascii_lowercase().contains("authorization:"));

        // The provider says the code expired.
        let (url, _seen) = token_endpoint(vec![(400, json!({ "error": "expired_token" }))]).await;
        let e = poll_token(&http, &url, &public, "dc", fast_poller(10, 10, 10_000))
            .await
            .unwrap_err();
        assert!(e.contains("expired"), "{e}");

        // Or it keeps saying "pending" past the code's lifetime: the wait is bounded.
        let (url, _seen) = token_endpoint(vec![(400, pending.clone()); 100]).await;
        let t0 = Instant::now();
        let e = poll_token(&http, &url, &public, "dc", fast_poller(30, 10, 200))
            .await
            .unwrap_err();
        assert!(e.contains("expired"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }

    #[cfg(unix)]
    #[test]
    fn the_token_is_saved_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let home = tempfile::tempdir().unwrap();
        let file = home.path().join("cfg/portcullis/ctl.jwt");
        save_token(&file, "a.b.c").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "a.b.c\n");
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        assert_eq!(mode(&home.path().join("cfg")), 0o700);
        // A file readable by others is replaced whole, by one of mode 0600.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        save_token(&file, "d.e.f").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "d.e.f\n");
        assert_eq!(mode(&file), 0o600);
        // No temp file is left behind.
        assert_eq!(
            std::fs::read_dir(file.parent().unwrap()).unwrap().count(),
            1
        );
        // An existing directory is left as it is.
        let shared = home.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        save_token(&shared.join("t"), "x").unwrap();
        assert_eq!(mode(&shared), 0o755);
        let e = save_token(&home.path().join("cfg/portcullis/ctl.jwt/inside"), "x").unwrap_err();
        assert!(e.contains("cannot save the token"), "{e}");
    }
}
