//! `portcullis workflow`: durable workflows (Amazon States Language, JSONPath mode).
//!
//! Two commands work on files alone:
//! * `validate FILE...` parses each definition (`.json`, or `.yaml`/`.yml` with the same
//!   structure) and prints every problem as `FILE:LINE:COL: message`, located in the file's
//!   text by the problem's path (`States.Drain.Next`);
//! * `run --definition FILE --input JSON` runs an execution in memory, with canned task
//!   results (`--task-result STATE=JSON`, `--task-failure STATE=ERROR[:CAUSE]`) and virtual
//!   time, and prints its outcome (and with `--history` its history).
//!
//! The others talk to a running proxy's admin API, with the conventions of
//! `portcullis table`: `--admin http://host:port`, and the token from `--token-file` or the
//! `PORTCULLIS_ADMIN_TOKEN` environment variable, never from a flag (which `ps` would show).
//!
//! Exit codes: 0 on success; 1 when a definition is invalid, an execution does not succeed,
//! or the API refuses or cannot be reached; 2 when the command line is wrong (an input that
//! is not JSON, a malformed `--task-result`, no admin token).

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Subcommand};
use http::Method;
use portcullis_automation::workflow::definition::{Definition, Kind};
use portcullis_automation::workflow::local::{self, Answers};
use portcullis_automation::workflow::machine::{format_timestamp, Outcome};
use portcullis_automation::workflow::store::HistoryRow;
use portcullis_automation::workflow::MAX_PAYLOAD;
use portcullis_config::spans::SpanIndex;
use portcullis_proxy::admin_tables::client;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::table_cli::TOKEN_ENV;

/// The most transitions `workflow run` makes before it gives up on a definition that loops.
pub const MAX_TRANSITIONS: usize = 100_000;

/// The statuses `workflow list --status` takes.
const STATUSES: [&str; 5] = ["RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED"];

#[derive(Args)]
pub struct WorkflowArgs {
    /// The admin API's address (for start, list, describe, history, stop, send-*).
    #[arg(long, global = true, default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// A file holding the admin token (else the PORTCULLIS_ADMIN_TOKEN environment variable).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Print JSON: the API's answer as it is, or `validate`'s problems as a list.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: WorkflowCommand,
}

#[derive(Subcommand)]
enum WorkflowCommand {
    /// Check definition files (ASL JSON, or the same structure in YAML): every problem as
    /// FILE:LINE:COL; exit 1 if any.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run a definition in memory, with canned task results and virtual time: prints the
    /// outcome as JSON; exit 0 when it succeeds, 1 otherwise.
    Run(RunArgs),
    /// The workflows of the running config (what `start` can start).
    Definitions,
    /// Start an execution of a configured workflow; prints its id.
    Start {
        workflow: String,
        /// The execution's name, unique within the workflow (default: its id).
        #[arg(long)]
        name: Option<String>,
        /// The execution's input: JSON, or @FILE (default `{}`).
        #[arg(long)]
        input: Option<String>,
    },
    /// Executions, newest first.
    List {
        /// Only this workflow's executions.
        #[arg(long)]
        workflow: Option<String>,
        /// Only executions with this status.
        #[arg(long, ignore_case = true, value_parser = clap::builder::PossibleValuesParser::new(STATUSES))]
        status: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// One execution, with its input, output or error.
    Describe { id: String },
    /// An execution's history events, one per line.
    History {
        id: String,
        /// Only the events after this id.
        #[arg(long)]
        after: Option<u64>,
        /// At most this many events.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Stop a running execution: it ends ABORTED.
    Stop {
        id: String,
        #[arg(long)]
        error: Option<String>,
        #[arg(long)]
        cause: Option<String>,
    },
    /// Answer a waiting `portcullis:wait_for_callback` task: it succeeds with OUTPUT.
    SendSuccess {
        token: String,
        /// The task's result: JSON, or @FILE.
        #[arg(long, default_value = "{}")]
        output: String,
    },
    /// Answer a waiting `portcullis:wait_for_callback` task: it fails (Retry and Catch apply).
    SendFailure {
        token: String,
        #[arg(long)]
        error: Option<String>,
        #[arg(long)]
        cause: Option<String>,
    },
    /// Tell a waiting task that its worker is alive (restarts its HeartbeatSeconds).
    SendHeartbeat { token: String },
}

#[derive(Args)]
struct RunArgs {
    /// The definition: ASL JSON, or the same structure in YAML.
    #[arg(long)]
    definition: PathBuf,
    /// The execution's input: JSON, or @FILE.
    #[arg(long, default_value = "{}")]
    input: String,
    #[command(flatten)]
    answers: AnswerArgs,
    /// Print the history events too, one per line: `id type +Nms details`.
    #[arg(long)]
    history: bool,
}

/// One canned answer, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AnswerSpec {
    /// `--task-result STATE=JSON` (or `STATE=silent`).
    Result(String),
    /// `--task-failure STATE=ERROR[:CAUSE]`.
    Failure(String),
}

impl AnswerSpec {
    fn text(&self) -> &str {
        match self {
            AnswerSpec::Result(s) | AnswerSpec::Failure(s) => s,
        }
    }
    fn flag(&self) -> &'static str {
        match self {
            AnswerSpec::Result(_) => "--task-result",
            AnswerSpec::Failure(_) => "--task-failure",
        }
    }
}

/// `--task-result` and `--task-failure`, in the order they were given: a state given several
/// answers gets them one per attempt, so `--task-failure Check=Http.503 --task-result
/// Check='{}'` fails once, then succeeds. (Two derived `Vec`s would lose that order.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct AnswerArgs {
    specs: Vec<AnswerSpec>,
}

impl FromArgMatches for AnswerArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut all: Vec<(usize, AnswerSpec)> = Vec::new();
        for (id, make) in [
            (
                "task_result",
                AnswerSpec::Result as fn(String) -> AnswerSpec,
            ),
            ("task_failure", AnswerSpec::Failure),
        ] {
            if let (Some(values), Some(at)) = (m.get_many::<String>(id), m.indices_of(id)) {
                all.extend(at.zip(values.map(|v| make(v.clone()))));
            }
        }
        all.sort_by_key(|(i, _)| *i);
        Ok(AnswerArgs {
            specs: all.into_iter().map(|(_, s)| s).collect(),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = AnswerArgs::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for AnswerArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.arg(
            Arg::new("task_result")
                .long("task-result")
                .value_name("STATE=JSON")
                .action(ArgAction::Append)
                .help(
                    "A Task state's canned result (repeatable: one per attempt, the last one \
                     again after). `STATE=silent` gives no answer: the task runs into its \
                     timeout or heartbeat.",
                ),
        )
        .arg(
            Arg::new("task_failure")
                .long("task-failure")
                .value_name("STATE=ERROR[:CAUSE]")
                .action(ArgAction::Append)
                .help("A Task state's canned failure, like `Check=Http.503:down` (repeatable)."),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        AnswerArgs::augment_args(cmd)
    }
}

/// Runs `portcullis workflow …`.
pub fn run(args: WorkflowArgs) -> ExitCode {
    match args.command {
        WorkflowCommand::Validate { files } => validate(&files, args.json),
        WorkflowCommand::Run(r) => run_local(r),
        cmd => remote(&args.admin, args.token_file.as_deref(), args.json, &cmd),
    }
}

// ---------------------------------------------------------------------------------------
// Definitions from files

/// A problem located in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Located {
    line: usize,
    col: usize,
    /// The path in the definition (`States.Drain.Next`), empty for a syntax error.
    path: String,
    message: String,
}

impl Located {
    fn text(&self, file: &Path) -> String {
        let what = if self.path.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        };
        format!("{}:{}:{}: {what}", file.display(), self.line, self.col)
    }

    fn json(&self, file: &Path) -> Value {
        json!({
            "file": file.display().to_string(),
            "line": self.line,
            "col": self.col,
            "path": self.path,
            "message": self.message,
        })
    }
}

/// Whether `path` names a YAML file (else JSON).
fn is_yaml(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => true,
        Some("json") => false,
        _ => !text.trim_start().starts_with('{'),
    }
}

/// The definition's text as JSON, or the parser's complaint at its line and column.
fn parse_text(path: &Path, text: &str) -> Result<Value, Located> {
    if is_yaml(path, text) {
        serde_yaml_ng::from_str::<Value>(text).map_err(|e| {
            let (line, col) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            Located {
                line,
                col,
                path: String::new(),
                message: format!("not valid YAML: {}", strip_position(&e.to_string())),
            }
        })
    } else {
        let v = serde_json::from_str::<Value>(text).map_err(|e| Located {
            line: e.line().max(1),
            col: e.column().max(1),
            path: String::new(),
            message: format!("not valid JSON: {}", strip_position(&e.to_string())),
        })?;
        match SpanIndex::build(text).duplicates().first() {
            None => Ok(v),
            Some((p, at)) => Err(Located {
                line: at.line,
                col: at.col,
                path: p.clone(),
                message: SpanIndex::duplicate_message(p),
            }),
        }
    }
}

/// A parser's message without its trailing ` at line L column C` (given apart).
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Parses and validates the definition in `text`: the definition, or every problem located.
fn definition_of(path: &Path, text: &str) -> Result<Definition, Vec<Located>> {
    let value = parse_text(path, text).map_err(|l| vec![l])?;
    Definition::parse(&value).map_err(|problems| {
        let spans = SpanIndex::build(text);
        let mut out: Vec<Located> = problems
            .into_iter()
            .map(|(at, message)| {
                let pos = spans.pos(&at);
                Located {
                    line: pos.line,
                    col: pos.col,
                    path: at,
                    message,
                }
            })
            .collect();
        out.sort_by_key(|l| (l.line, l.col));
        out
    })
}

/// Reads and parses the definition file `path`.
fn load(path: &Path) -> Result<Definition, Vec<Located>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Located {
            line: 1,
            col: 1,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }]
    })?;
    definition_of(path, &text)
}

/// `workflow validate`: 0 when every file is valid.
fn validate(files: &[PathBuf], as_json: bool) -> ExitCode {
    let mut bad = 0;
    let mut report = Vec::new();
    for f in files {
        match load(f) {
            Ok(def) => {
                let n = def.states().count();
                if as_json {
                    report.push(json!({ "file": f.display().to_string(), "valid": true, "states": n, "problems": [] }));
                } else {
                    println!("{}: valid, {n} states", f.display());
                }
            }
            Err(problems) => {
                bad += 1;
                if as_json {
                    let list: Vec<Value> = problems.iter().map(|p| p.json(f)).collect();
                    report.push(json!({ "file": f.display().to_string(), "valid": false, "problems": list }));
                } else {
                    for p in &problems {
                        println!("{}", p.text(f));
                    }
                }
            }
        }
    }
    if as_json {
        println!("{}", Value::Array(report));
    } else if bad > 0 {
        eprintln!("{bad} of {} file(s) invalid", files.len());
    }
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

// ---------------------------------------------------------------------------------------
// Running in memory

/// A JSON argument: the text itself, or with `@FILE` the file's content.
pub(crate) fn json_arg(flag: &str, text: &str) -> Result<Value, String> {
    let (body, from) = match text.strip_prefix('@') {
        Some(file) => (
            std::fs::read_to_string(file).map_err(|e| format!("{flag} @{file}: {e}"))?,
            format!(" (from {file})"),
        ),
        None => (text.to_string(), String::new()),
    };
    serde_json::from_str(&body).map_err(|e| {
        format!(
            "{flag}{from} is not JSON: {e}; give a JSON value such as '{{\"backend\": \"web\"}}' \
             (quote it for the shell), or @FILE"
        )
    })
}

/// An execution input: JSON, at most the payload cap.
fn input_arg(flag: &str, text: &str) -> Result<Value, String> {
    let v = json_arg(flag, text)?;
    let n = v.to_string().len();
    if n > MAX_PAYLOAD {
        return Err(format!(
            "{flag} is {n} bytes, over the {MAX_PAYLOAD}-byte limit of an execution's input"
        ));
    }
    Ok(v)
}

/// The canned answers, checked against the definition's Task states.
fn answers_of(def: &Definition, specs: &[AnswerSpec]) -> Result<Answers, String> {
    let mut tasks: Vec<&str> = def
        .states()
        .filter(|s| matches!(s.kind, Kind::Task { .. }))
        .map(|s| s.name.as_str())
        .collect();
    tasks.sort_unstable();
    let mut answers = Answers::new();
    for spec in specs {
        let text = spec.text();
        if let Some((state, _)) = text.split_once('=') {
            if !tasks.contains(&state) {
                let known = if tasks.is_empty() {
                    "it has none".to_string()
                } else {
                    tasks
                        .iter()
                        .map(|t| format!("`{t}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(format!(
                    "{} {text}: `{state}` is not a Task state of the definition (its Task states: {known})",
                    spec.flag()
                ));
            }
        }
        let r = match spec {
            AnswerSpec::Result(s) => answers.add_result(s),
            AnswerSpec::Failure(s) => answers.add_failure(s),
        };
        r.map_err(|e| format!("{} {e}", spec.flag()))?;
    }
    Ok(answers)
}

/// An outcome as `workflow run` prints it.
fn outcome_json(o: &Outcome) -> Value {
    match o {
        Outcome::Succeeded(v) => json!({ "status": "SUCCEEDED", "output": v }),
        Outcome::Failed(e) | Outcome::TimedOut(e) | Outcome::Aborted(e) => {
            json!({ "status": o.status().as_str(), "error": e.error, "cause": e.cause })
        }
    }
}

/// One history event of a local run: `id type +Nms details`, N from the execution's start.
fn history_line(row: &HistoryRow, start_ms: i64) -> String {
    format!(
        "{} {} +{}ms {}",
        row.id,
        row.kind,
        row.timestamp_ms - start_ms,
        row.details
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `workflow run`: 0 when the execution succeeds.
fn run_local(a: RunArgs) -> ExitCode {
    let input = match input_arg("--input", &a.input) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let def = match load(&a.definition) {
        Ok(d) => d,
        Err(problems) => {
            for p in &problems {
                eprintln!("{}", p.text(&a.definition));
            }
            eprintln!("{}: invalid definition, not run", a.definition.display());
            return ExitCode::from(1);
        }
    };
    let mut answers = match answers_of(&def, &a.answers.specs) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let start = now_ms();
    let r = match local::run(&def, input, &mut answers, start, MAX_TRANSITIONS) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    println!("{}", outcome_json(&r.outcome));
    if a.history {
        for h in &r.history {
            println!("{}", history_line(h, start));
        }
    }
    if matches!(r.outcome, Outcome::Succeeded(_)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

// ---------------------------------------------------------------------------------------
// The admin API

/// The token from `file` (trimmed), or else from [`TOKEN_ENV`] (as `portcullis table`).
fn token(file: Option<&Path>) -> Result<String, String> {
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

/// `?a=1&b=2` of the given parameters (values percent-encoded), or nothing.
fn query(params: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", client::segment(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// `{...}` with the fields that are given.
fn body(fields: Vec<(&str, Option<Value>)>) -> Value {
    let m: Map<String, Value> = fields
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect();
    Value::Object(m)
}

/// The admin API request for a remote command; `Err` when an argument is wrong.
fn request(cmd: &WorkflowCommand) -> Result<(Method, String, Option<Value>), String> {
    let seg = client::segment;
    let text = |s: &Option<String>| s.clone().map(Value::String);
    Ok(match cmd {
        WorkflowCommand::Start {
            workflow,
            name,
            input,
        } => {
            let input = match input {
                Some(i) => Some(input_arg("--input", i)?),
                None => None,
            };
            (
                Method::POST,
                format!("/api/v1/workflows/{}/executions", seg(workflow)),
                Some(body(vec![("name", text(name)), ("input", input)])),
            )
        }
        WorkflowCommand::List {
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
        WorkflowCommand::Definitions => (Method::GET, "/api/v1/workflows".into(), None),
        WorkflowCommand::Describe { id } => {
            (Method::GET, format!("/api/v1/executions/{}", seg(id)), None)
        }
        WorkflowCommand::History { id, after, limit } => (
            Method::GET,
            format!(
                "/api/v1/executions/{}/history{}",
                seg(id),
                query(&[
                    ("after", after.map(|a| a.to_string())),
                    ("limit", limit.map(|l| l.to_string())),
                ])
            ),
            None,
        ),
        WorkflowCommand::Stop { id, error, cause } => (
            Method::POST,
            format!("/api/v1/executions/{}/stop", seg(id)),
            Some(body(vec![("error", text(error)), ("cause", text(cause))])),
        ),
        WorkflowCommand::SendSuccess { token, output } => (
            Method::POST,
            "/api/v1/callbacks/success".into(),
            Some(json!({ "token": token, "output": json_arg("--output", output)? })),
        ),
        WorkflowCommand::SendFailure {
            token,
            error,
            cause,
        } => (
            Method::POST,
            "/api/v1/callbacks/failure".into(),
            Some(body(vec![
                ("token", Some(Value::String(token.clone()))),
                ("error", text(error)),
                ("cause", text(cause)),
            ])),
        ),
        WorkflowCommand::SendHeartbeat { token } => (
            Method::POST,
            "/api/v1/callbacks/heartbeat".into(),
            Some(json!({ "token": token })),
        ),
        WorkflowCommand::Validate { .. } | WorkflowCommand::Run(_) => {
            return Err("not an admin API command".into())
        }
    })
}

/// What to print for an answer that is not 2xx: the API's `{"error": …}`, else the status and
/// the body.
fn api_error(status: u16, text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if v["error"].is_string() => {
            format!("{} ({status})", v["error"].as_str().unwrap_or_default())
        }
        _ if text.trim().is_empty() => format!("{status}"),
        _ => format!("{status}: {}", text.trim_end()),
    }
}

/// Runs a remote command: 0 on a 2xx answer, 1 when refused or unreachable, 2 on bad
/// arguments or without a token.
fn remote(
    admin: &str,
    token_file: Option<&Path>,
    as_json: bool,
    cmd: &WorkflowCommand,
) -> ExitCode {
    let (method, path, body) = match request(cmd) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let token = match token(token_file) {
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
    let answer = rt.block_on(client::call(admin, &token, method, &path, body.as_ref()));
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
    if as_json {
        if !v.is_null() {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or(text));
        }
        return ExitCode::SUCCESS;
    }
    match cmd {
        WorkflowCommand::Start { .. } => {
            // The id alone on stdout, for `ID=$(portcullis workflow start …)`.
            eprintln!("{}", start_note(&v));
            println!("{}", plain(&v["executionId"]));
        }
        WorkflowCommand::Definitions => print!("{}", definitions_text(&v)),
        WorkflowCommand::List { .. } => print!("{}", executions_text(&v)),
        WorkflowCommand::Describe { .. } => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or(text))
        }
        WorkflowCommand::History { .. } => print!("{}", events_text(&v)),
        WorkflowCommand::Stop { id, .. } => match v["status"].as_str() {
            Some(s) => println!("stopped {id}: {s}"),
            None => println!("stopped {id}"),
        },
        WorkflowCommand::SendSuccess { .. } => println!("sent success: the task resumes"),
        WorkflowCommand::SendFailure { .. } => println!("sent failure: the task fails"),
        WorkflowCommand::SendHeartbeat { .. } => println!("sent heartbeat"),
        WorkflowCommand::Validate { .. } | WorkflowCommand::Run(_) => {}
    }
    ExitCode::SUCCESS
}

/// A JSON value as plain text: strings without quotes, lists joined with `,`, times of Unix
/// milliseconds as RFC 3339.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(plain).collect::<Vec<_>>().join(","),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A time as the API gives it: RFC 3339 text as it is, Unix milliseconds as RFC 3339.
pub(crate) fn time_text(v: &Value) -> String {
    match v.as_i64() {
        Some(ms) => format_timestamp(ms),
        None => plain(v),
    }
}

/// What `workflow start` says on stderr.
fn start_note(v: &Value) -> String {
    let (name, wf, status) = (
        plain(&v["name"]),
        plain(&v["workflow"]),
        plain(&v["status"]),
    );
    if v["started"] == Value::Bool(false) {
        format!(
            "execution `{name}` of `{wf}` was already running with the same input ({status}): \
             not started again"
        )
    } else {
        format!("started execution `{name}` of `{wf}` ({status})")
    }
}

/// Rows as aligned columns.
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

/// `workflow definitions`: one line per workflow.
fn definitions_text(v: &Value) -> String {
    let list = v["workflows"].as_array().map_or(&[][..], Vec::as_slice);
    if list.is_empty() {
        return "no workflows\n".into();
    }
    let mut rows = vec![["NAME", "STATES", "VERSION"].map(String::from).to_vec()];
    for w in list {
        rows.push(vec![
            plain(&w["name"]),
            plain(&w["states"]),
            plain(&w["version"]),
        ]);
    }
    columns(&rows)
}

/// `workflow list`: one line per execution.
fn executions_text(v: &Value) -> String {
    let list = v["executions"].as_array().map_or(&[][..], Vec::as_slice);
    if list.is_empty() {
        return "no executions\n".into();
    }
    let mut rows = vec![[
        "ID", "WORKFLOW", "NAME", "STATUS", "STARTED", "STOPPED", "BY", "STATES",
    ]
    .map(String::from)
    .to_vec()];
    for e in list {
        rows.push(vec![
            plain(&e["executionId"]),
            plain(&e["workflow"]),
            plain(&e["name"]),
            plain(&e["status"]),
            time_text(&e["startedAt"]),
            time_text(&e["stoppedAt"]),
            plain(&e["startedBy"]),
            match &e["currentStates"] {
                Value::Array(a) if a.is_empty() => "-".into(),
                s => plain(s),
            },
        ]);
    }
    columns(&rows)
}

/// `workflow history`: `id type timestamp details`, one event per line.
pub(crate) fn events_text(v: &Value) -> String {
    let mut out = String::new();
    for e in v["events"].as_array().into_iter().flatten() {
        let mut details = e.as_object().cloned().unwrap_or_default();
        for k in ["id", "previousEventId", "timestamp", "type"] {
            details.remove(k);
        }
        // The details nested under `details`, or beside the event's own fields.
        if let (1, Some(Value::Object(d))) = (details.len(), details.get("details")) {
            details = d.clone();
        }
        let mut line = format!(
            "{} {} {}",
            plain(&e["id"]),
            plain(&e["type"]),
            time_text(&e["timestamp"])
        );
        if !details.is_empty() {
            line.push(' ');
            line.push_str(&Value::Object(details).to_string());
        }
        out.push_str(&line);
        out.push('\n');
    }
    if out.is_empty() {
        out.push_str("no events\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        w: WorkflowArgs,
    }

    fn parse(args: &[&str]) -> WorkflowArgs {
        let mut all = vec!["workflow"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap_or_else(|e| panic!("{e}")).w
    }

    fn parse_err(args: &[&str]) -> String {
        let mut all = vec!["workflow"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all) {
            Ok(_) => panic!("{args:?} parsed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn canned_answers_keep_their_order_across_both_flags() {
        let a = parse(&[
            "run",
            "--definition",
            "d.json",
            "--task-failure",
            "Check=Http.503:down",
            "--task-result",
            "Drain={}",
            "--task-failure",
            "Check=Http.503",
            "--task-result",
            "Check={\"status\":200}",
            "--history",
        ]);
        let WorkflowCommand::Run(r) = a.command else {
            panic!("not run")
        };
        assert_eq!(
            r.answers.specs,
            vec![
                AnswerSpec::Failure("Check=Http.503:down".into()),
                AnswerSpec::Result("Drain={}".into()),
                AnswerSpec::Failure("Check=Http.503".into()),
                AnswerSpec::Result("Check={\"status\":200}".into()),
            ]
        );
        assert!(r.history);
        assert_eq!(r.input, "{}");
        assert!(parse_err(&["run"]).contains("--definition"));
    }

    #[test]
    fn admin_flags_go_before_or_after_the_subcommand() {
        let a = parse(&["--admin", "http://127.0.0.1:1", "list"]);
        assert_eq!(a.admin, "http://127.0.0.1:1");
        let a = parse(&[
            "describe",
            "x",
            "--admin",
            "http://h:2",
            "--token-file",
            "t",
            "--json",
        ]);
        assert_eq!(
            (a.admin.as_str(), a.token_file, a.json),
            ("http://h:2", Some(PathBuf::from("t")), true)
        );
        assert_eq!(parse(&["list"]).admin, "http://127.0.0.1:9901");
        assert!(parse_err(&["validate"]).contains("FILES"));
        assert!(parse_err(&["list", "--status", "DONE"]).contains("RUNNING"));
    }

    #[test]
    fn remote_commands_make_the_api_requests() {
        let req = |args: &[&str]| request(&parse(args).command).unwrap();
        assert_eq!(
            req(&[
                "start",
                "drain restore",
                "--name",
                "n1",
                "--input",
                r#"{"a":1}"#
            ]),
            (
                Method::POST,
                "/api/v1/workflows/drain%20restore/executions".into(),
                Some(json!({ "name": "n1", "input": { "a": 1 } }))
            )
        );
        assert_eq!(req(&["start", "w"]).2, Some(json!({})));
        assert_eq!(
            req(&[
                "list",
                "--workflow",
                "w/x",
                "--status",
                "timed_out",
                "--limit",
                "5"
            ]),
            (
                Method::GET,
                "/api/v1/executions?workflow=w%2Fx&status=TIMED_OUT&limit=5".into(),
                None
            )
        );
        assert_eq!(req(&["list"]).1, "/api/v1/executions");
        assert_eq!(req(&["definitions"]).1, "/api/v1/workflows");
        assert_eq!(req(&["describe", "a/b"]).1, "/api/v1/executions/a%2Fb");
        assert_eq!(
            req(&["history", "e1", "--after", "10", "--limit", "2"]).1,
            "/api/v1/executions/e1/history?after=10&limit=2"
        );
        assert_eq!(req(&["history", "e1"]).1, "/api/v1/executions/e1/history");
        assert_eq!(
            req(&["stop", "e1", "--error", "Ops", "--cause", "by hand"]),
            (
                Method::POST,
                "/api/v1/executions/e1/stop".into(),
                Some(json!({ "error": "Ops", "cause": "by hand" }))
            )
        );
        assert_eq!(req(&["stop", "e1"]).2, Some(json!({})));
        assert_eq!(
            req(&[
                "send-success",
                "tok.1",
                "--output",
                r#"{"approval":{"approved":true}}"#
            ]),
            (
                Method::POST,
                "/api/v1/callbacks/success".into(),
                Some(json!({ "token": "tok.1", "output": { "approval": { "approved": true } } }))
            )
        );
        assert_eq!(
            req(&["send-success", "t"]).2,
            Some(json!({ "token": "t", "output": {} }))
        );
        assert_eq!(
            req(&["send-failure", "t", "--error", "Denied"]),
            (
                Method::POST,
                "/api/v1/callbacks/failure".into(),
                Some(json!({ "token": "t", "error": "Denied" }))
            )
        );
        assert_eq!(
            req(&["send-heartbeat", "t"]),
            (
                Method::POST,
                "/api/v1/callbacks/heartbeat".into(),
                Some(json!({ "token": "t" }))
            )
        );
    }

    #[test]
    fn inputs_that_are_not_json_are_refused_clearly() {
        let e = request(&parse(&["start", "w", "--input", "{backend: web}"]).command).unwrap_err();
        assert!(e.starts_with("--input is not JSON"), "{e}");
        let e = request(&parse(&["send-success", "t", "--output", "yes"]).command).unwrap_err();
        assert!(e.starts_with("--output is not JSON"), "{e}");
        let big = format!("\"{}\"", "x".repeat(MAX_PAYLOAD));
        assert!(input_arg("--input", &big).unwrap_err().contains("over the"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("in.json");
        std::fs::write(&f, r#"{"from": "file"}"#).unwrap();
        assert_eq!(
            json_arg("--input", &format!("@{}", f.display())).unwrap(),
            json!({ "from": "file" })
        );
    }

    #[test]
    fn api_errors_print_the_apis_message() {
        assert_eq!(
            api_error(409, r#"{"error": "ExecutionAlreadyExists: n1"}"#),
            "ExecutionAlreadyExists: n1 (409)"
        );
        assert_eq!(api_error(502, "bad gateway\n"), "502: bad gateway");
        assert_eq!(api_error(404, ""), "404");
    }

    #[test]
    fn problems_are_located_in_json_and_yaml() {
        let json_text = "{\n  \"StartAt\": \"A\",\n  \"States\": {\n    \"A\": {\n      \"Type\": \"Pass\",\n      \"Next\": \"Missing\"\n    },\n    \"P\": { \"Type\": \"Parallel\", \"End\": true, \"Branches\": [\n      { \"StartAt\": \"X\", \"States\": { \"X\": { \"Type\": \"Pass\", \"Next\": \"Nope\" } } }\n    ] }\n  }\n}\n";
        let p = definition_of(Path::new("d.asl.json"), json_text).unwrap_err();
        let at = |path: &str| p.iter().find(|l| l.path == path).map(|l| (l.line, l.col));
        assert_eq!(at("States.A.Next"), Some((6, 15)), "{p:?}");
        // The branch is unreachable (P is never entered), so its dangling Next is not
        // reported; P itself is.
        assert_eq!(at("States.P").map(|x| x.0), Some(8), "{p:?}");
        let yaml_text = "StartAt: A\nStates:\n  A:\n    Type: Pass\n    Next: Missing\n";
        let p = definition_of(Path::new("d.asl.yaml"), yaml_text).unwrap_err();
        assert_eq!(
            (p[0].line, p[0].path.as_str()),
            (5, "States.A.Next"),
            "{p:?}"
        );
        assert_eq!(
            p[0].text(Path::new("d.asl.yaml")),
            format!("d.asl.yaml:5:11: States.A.Next: {}", p[0].message)
        );
        // A state named twice (serde_json would keep the last).
        let twice = "{\"StartAt\": \"A\", \"States\": {\n  \"A\": {\"Type\": \"Succeed\"},\n  \"A\": {\"Type\": \"Fail\"}}}";
        let p = definition_of(Path::new("t.asl.json"), twice).unwrap_err();
        assert_eq!((p[0].line, p[0].path.as_str()), (3, "States.A"), "{p:?}");
    }

    #[test]
    fn problems_inside_branches_are_located() {
        let text = r#"{"StartAt": "P", "States": {
  "P": {"Type": "Parallel", "End": true, "Branches": [
    {"StartAt": "X", "States": {
      "X": {"Type": "Pass", "Next": "Out"}}}]},
  "Out": {"Type": "Succeed"}}}"#;
        let p = definition_of(Path::new("p.json"), text).unwrap_err();
        let l = p
            .iter()
            .find(|l| l.path == "States.P.Branches[0].States.X.Next")
            .unwrap_or_else(|| panic!("{p:?}"));
        assert_eq!((l.line, l.col), (4, 37));
    }

    #[test]
    fn syntax_errors_give_the_parsers_position() {
        let p = definition_of(
            Path::new("x.json"),
            "{\n  \"StartAt\": \"A\",\n  \"States\": {,}\n}",
        )
        .unwrap_err();
        assert_eq!((p.len(), p[0].line, p[0].col), (1, 3, 14), "{p:?}");
        assert!(p[0].message.starts_with("not valid JSON: "), "{p:?}");
        assert!(!p[0].message.contains(" at line "), "{p:?}");
        let p = definition_of(Path::new("x.yaml"), "StartAt: A\nStates: [\n").unwrap_err();
        assert!(p[0].message.starts_with("not valid YAML: "), "{p:?}");
        assert!(p[0].line >= 2, "{p:?}");
        // No known extension: JSON when it starts with `{`.
        assert!(is_yaml(Path::new("f"), "StartAt: A"));
        assert!(!is_yaml(Path::new("f"), "  {\"StartAt\": 1}"));
    }

    #[test]
    fn canned_answers_must_name_task_states() {
        let def = definition_of(
            Path::new("d.json"),
            r#"{"StartAt": "T", "States": {"T": {"Type": "Task", "Resource": "portcullis:http", "Next": "S"}, "S": {"Type": "Succeed"}}}"#,
        )
        .unwrap();
        let e = answers_of(&def, &[AnswerSpec::Result("S={}".into())])
            .err()
            .unwrap();
        assert!(
            e.contains("`S` is not a Task state") && e.contains("`T`"),
            "{e}"
        );
        let e = answers_of(&def, &[AnswerSpec::Result("T=nope".into())])
            .err()
            .unwrap();
        assert!(
            e.starts_with("--task-result `T=nope`: the result after `=` is not JSON"),
            "{e}"
        );
        assert!(answers_of(&def, &[AnswerSpec::Failure("T=Http.503:down".into())]).is_ok());
    }

    #[test]
    fn outcomes_and_history_print_as_documented() {
        use portcullis_automation::workflow::StatesError;
        assert_eq!(
            outcome_json(&Outcome::Succeeded(json!({ "ok": true }))).to_string(),
            r#"{"status":"SUCCEEDED","output":{"ok":true}}"#
        );
        assert_eq!(
            outcome_json(&Outcome::TimedOut(StatesError::new(
                "States.Timeout",
                "late"
            ))),
            json!({ "status": "TIMED_OUT", "error": "States.Timeout", "cause": "late" })
        );
        let row = HistoryRow {
            id: 4,
            previous: 3,
            timestamp_ms: 10_003_000,
            kind: "TaskScheduled".into(),
            details: r#"{"resource":"portcullis:http"}"#.into(),
        };
        assert_eq!(
            history_line(&row, 10_000_000),
            r#"4 TaskScheduled +3000ms {"resource":"portcullis:http"}"#
        );
    }

    #[test]
    fn executions_print_as_a_table() {
        let v = json!({ "executions": [
            { "executionId": "e-1", "workflow": "drain-restore", "name": "drain-b1", "status": "RUNNING",
              "startedAt": 1_700_000_000_000_i64, "stoppedAt": null, "startedBy": "Portcullis::Trigger::\"t\"",
              "currentStates": ["LetConnectionsFinish"] },
            { "executionId": "e-2", "workflow": "agent-access", "name": "e-2", "status": "SUCCEEDED",
              "startedAt": "2026-01-02T03:04:05.000Z", "stoppedAt": "2026-01-02T03:04:06.000Z",
              "startedBy": "Portcullis::Admin::\"alice\"", "currentStates": [] }
        ]});
        assert_eq!(
            executions_text(&v),
            "ID   WORKFLOW       NAME      STATUS     STARTED                   STOPPED                   BY                          STATES\n\
             e-1  drain-restore  drain-b1  RUNNING    2023-11-14T22:13:20.000Z  -                         Portcullis::Trigger::\"t\"    LetConnectionsFinish\n\
             e-2  agent-access   e-2       SUCCEEDED  2026-01-02T03:04:05.000Z  2026-01-02T03:04:06.000Z  Portcullis::Admin::\"alice\"  -\n"
        );
        assert_eq!(
            executions_text(&json!({ "executions": [] })),
            "no executions\n"
        );
    }

    #[test]
    fn definitions_print_as_a_table() {
        let v = json!({ "workflows": [
            { "name": "drain-restore", "version": "0a1b2c", "states": 7, "definition": {} },
            { "name": "agent-access", "version": "3d4e5f", "states": 6, "definition": {} }
        ]});
        assert_eq!(
            definitions_text(&v),
            "NAME           STATES  VERSION\n\
             drain-restore  7       0a1b2c\n\
             agent-access   6       3d4e5f\n"
        );
        assert_eq!(
            definitions_text(&json!({ "workflows": [] })),
            "no workflows\n"
        );
    }

    #[test]
    fn events_print_one_per_line() {
        let v = json!({ "events": [
            { "id": 1, "previousEventId": 0, "timestamp": "2026-01-02T03:04:05.000Z", "type": "ExecutionStarted", "input": {} },
            { "id": 2, "previousEventId": 1, "timestamp": 1_700_000_000_000_i64, "type": "WaitStateExited" },
            { "id": 3, "previousEventId": 2, "timestamp": "2026-01-02T03:04:06.000Z", "type": "TaskScheduled",
              "details": { "resource": "portcullis:http" } }
        ]});
        assert_eq!(
            events_text(&v),
            "1 ExecutionStarted 2026-01-02T03:04:05.000Z {\"input\":{}}\n\
             2 WaitStateExited 2023-11-14T22:13:20.000Z\n\
             3 TaskScheduled 2026-01-02T03:04:06.000Z {\"resource\":\"portcullis:http\"}\n"
        );
        assert_eq!(events_text(&json!({ "events": [] })), "no events\n");
    }

    #[test]
    fn start_says_whether_it_started() {
        let v = json!({ "executionId": "e", "name": "n", "workflow": "w", "status": "RUNNING", "started": false });
        assert!(start_note(&v).contains("already running"));
        let v = json!({ "executionId": "e", "name": "n", "workflow": "w", "status": "RUNNING", "started": true });
        assert_eq!(start_note(&v), "started execution `n` of `w` (RUNNING)");
    }
}
