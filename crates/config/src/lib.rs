//! portcullis configuration: reads the root YAML file and its app bundles, expands
//! `${env:NAME}` and `${file:PATH}` references, and validates everything, so that the rest of
//! portcullis only ever sees a consistent [`Config`]. Every problem is reported as
//! `file:line:col: message`, and all semantic problems are reported at once.
//!
//! This crate depends on no other portcullis crate.

pub mod model;
pub mod spans;
pub mod units;
mod validate;

pub use model::*;
pub use units::{Dur, Rate, Size};

/// Request fields that say where a request came from (besides any `x-forwarded-*`), lower
/// case: portcullis believes them only from trusted proxies and sets or removes them for the
/// origin, and no authorizer is sent the client's (`send`). The proxy's list of the fields
/// it owns includes them.
pub const FORWARDED_FIELDS: [&str; 11] = [
    "forwarded",
    "via",
    // How it came in: Rails, IIS, Werkzeug, CodeIgniter and Tornado believe a request came
    // over TLS from these.
    "front-end-https",
    "x-url-scheme",
    "x-scheme",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
];

use spans::SpanIndex;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One problem, located in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Where a config item sits: its file and position, for problems found after loading
/// (`portcullis check` builds TLS settings and identity providers, which read files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loc {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl Loc {
    pub fn diag(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: self.file.clone(),
            line: self.line,
            col: self.col,
            message: message.into(),
        }
    }
}

/// The error of this crate: every problem found in the config.
#[derive(Debug, thiserror::Error)]
pub struct Error(pub Vec<Diagnostic>);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// A backend, with its app and fully qualified id (`app/name`).
#[derive(Debug, Clone)]
pub struct BackendDef {
    pub id: String,
    pub app: String,
    pub spec: Backend,
    /// Server names, parallel to `spec.servers`, unique within the backend.
    pub server_names: Vec<String>,
    /// Where the backend is defined.
    pub loc: Loc,
}

/// A route, with its app, qualified id and the qualified id of its backend.
#[derive(Debug, Clone)]
pub struct RouteDef {
    pub id: String,
    pub app: String,
    pub spec: Route,
    pub backend_id: String,
    /// Position in the config, used as the final tie-breaker between equally specific routes.
    pub order: usize,
    /// Cedar policy files of the route's app and of the route itself (absolute paths).
    pub policy_files: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct AdminDef {
    pub bind: String,
    /// Expanded bearer tokens, or their SHA-256 digests (`sha256:<64 hex>`). Never log these.
    pub tokens: Vec<String>,
    /// Identity providers the admin API accepts (see `admin.auth`).
    pub auth: Vec<String>,
    /// Which `tokens` are written in plaintext (for a warning).
    pub plaintext_tokens: Vec<usize>,
    /// Cedar policy files for commands by triggers and workflows (absolute paths).
    pub policies: Vec<PathBuf>,
    /// TLS for the admin listener (file paths resolved), with optional client certificates.
    pub tls: Option<model::ListenerTls>,
    /// The console's OIDC callback URL, when fixed.
    pub login_redirect_url: Option<String>,
}

/// The workflows' definitions as written: files (absolute paths) and inline ones.
#[derive(Debug, Clone, Default)]
pub struct WorkflowsDef {
    pub files: Vec<PathBuf>,
    /// Inline definitions by name, as JSON; located at `workflows.definitions.<name>`.
    pub inline: Vec<(String, serde_json::Value)>,
    pub retention: std::time::Duration,
}

/// A validated configuration. Paths are absolute; secrets are expanded.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: PathBuf,
    /// Positions of the root file's keys (`listeners[0].tls`, `identity.providers[1]`).
    pub root_spans: SpanIndex,
    /// Every file read, to be watched for changes.
    pub files: Vec<PathBuf>,
    /// Directories whose new files may change the config (include globs).
    pub watch_dirs: Vec<PathBuf>,
    /// A short fingerprint of all files' content.
    pub version: String,
    pub workers: usize,
    pub listeners: Vec<Listener>,
    pub admin: Option<AdminDef>,
    pub access_log: AccessLog,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub shutdown_grace: std::time::Duration,
    pub backends: Vec<BackendDef>,
    pub routes: Vec<RouteDef>,
    /// Identity providers with secrets expanded and paths made absolute.
    pub identity: Identity,
    /// Decoded session keys; the first encrypts, all decrypt.
    pub session_keys: Vec<[u8; 32]>,
    /// Global Cedar policy files (absolute paths).
    pub global_policies: Vec<PathBuf>,
    pub policy: PolicySettings,
    pub authorizers: Vec<AuthorizerCfg>,
    /// The audit settings, with `dir` made absolute.
    pub audit: AuditCfg,
    /// The embedded store's directory (absolute).
    pub state_dir: PathBuf,
    /// Where limit counters live.
    pub limits: LimitsCfg,
    /// Stick tables, by name (validated: unique names, known key parts).
    pub stick_tables: Vec<StickTable>,
    /// Usage plans, by name.
    pub usage_plans: Vec<UsagePlan>,
    /// `events:` as written (JSON null when absent), for the events engine to read.
    pub events: serde_json::Value,
    /// `triggers:` as written (JSON null when absent), for the automation engine to read.
    pub triggers: serde_json::Value,
    /// `workflows:`, for the workflow engine to parse; `None` when absent.
    pub workflows: Option<WorkflowsDef>,
    pub warnings: Vec<String>,
    /// Where each route is written, by route id (see [`Config::route_loc`]).
    route_srcs: HashMap<String, RouteSrc>,
}

/// Where a route is written: its file, its position under that file's `routes:`, and the
/// file's span index (shared by the file's routes).
#[derive(Debug, Clone)]
pub(crate) struct RouteSrc {
    pub file: PathBuf,
    pub index: usize,
    pub spans: Arc<SpanIndex>,
}

/// Reads and validates the config rooted at `path`.
pub fn load(path: &Path) -> Result<Config, Error> {
    validate::load(path)
}

impl Config {
    /// Locates `at`, a path of keys in the root file such as `listeners[0].tls`.
    pub fn root_loc(&self, at: &str) -> Loc {
        let p = self.root_spans.pos(at);
        Loc {
            file: self.root.clone(),
            line: p.line,
            col: p.col,
        }
    }

    /// Locates `at`, a path of keys inside the route `route_id` such as `allow[0]` (or `""`
    /// for the route itself), in the file that defines the route: the root file or its app
    /// bundle. For problems found after loading, like a shorthand rule that does not compile.
    /// An unknown route is located at the start of the root file.
    pub fn route_loc(&self, route_id: &str, at: &str) -> Loc {
        let Some(src) = self.route_srcs.get(route_id) else {
            return self.root_loc("");
        };
        let path = if at.is_empty() {
            format!("routes[{}]", src.index)
        } else {
            format!("routes[{}].{at}", src.index)
        };
        let p = src.spans.pos(&path);
        Loc {
            file: src.file.clone(),
            line: p.line,
            col: p.col,
        }
    }
}

/// A parsed file with its span index, for locating semantic errors.
pub(crate) struct Source {
    pub path: PathBuf,
    pub spans: Arc<SpanIndex>,
}

impl Source {
    pub fn diag(&self, at: &str, message: impl Into<String>) -> Diagnostic {
        let p = self.spans.pos(at);
        Diagnostic {
            file: self.path.clone(),
            line: p.line,
            col: p.col,
            message: message.into(),
        }
    }
}

/// A URL as a message or log may show it: its scheme and host (and port), without the
/// credentials, path and query that may carry secrets (a Redis password, a webhook's token
/// in its path, as chat services put it). Something that is not `scheme://…` is not shown.
pub fn redact_url(u: &str) -> String {
    let Some((scheme, rest)) = u.split_once("://") else {
        return "(not a URL)".into();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let user = if authority.contains('@') { "***@" } else { "" };
    let tail = if tail.is_empty() || tail == "/" {
        tail
    } else {
        "/…"
    };
    format!("{scheme}://{user}{host}{tail}")
}

/// Expands `${env:NAME}` and `${file:PATH}` in `s`. File paths are relative to `base`, and a
/// file's trailing newline is removed.
pub fn expand(s: &str, base: &Path) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            format!("unclosed `${{` in `{s}`: write `${{env:NAME}}` or `${{file:PATH}}`")
        })?;
        let inner = &after[..end];
        match inner.split_once(':') {
            Some(("env", name)) => {
                let v = std::env::var(name).map_err(|_| {
                    format!("environment variable `{name}` is not set: export it before starting portcullis")
                })?;
                out.push_str(&v);
            }
            Some(("file", p)) => {
                let full = base.join(p);
                let v = std::fs::read_to_string(&full)
                    .map_err(|e| format!("cannot read `{}`: {e}", full.display()))?;
                out.push_str(v.trim_end_matches(['\n', '\r']));
            }
            _ => {
                return Err(format!(
                    "unknown reference `${{{inner}}}`: write `${{env:NAME}}` or `${{file:PATH}}`"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redacted_url_keeps_its_scheme_and_host_only() {
        for (u, shown) in [
            ("redis://:s3cret@cache:6379/0", "redis://***@cache:6379/…"),
            (
                "https://hooks.chat.example/services/T0/B0/SECRET",
                "https://hooks.chat.example/…",
            ),
            (
                "http://svc:pw@hooks.example.com:99999/x?token=t",
                "http://***@hooks.example.com:99999/…",
            ),
            ("https://ops.example.com", "https://ops.example.com"),
            ("https://ops.example.com/", "https://ops.example.com/"),
            ("redis://a@b@host", "redis://***@host"),
            ("cache:6379", "(not a URL)"),
        ] {
            assert_eq!(redact_url(u), shown, "{u}");
        }
    }

    #[test]
    fn expands_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "s3cret\n").unwrap();
        std::env::set_var("PORTCULLIS_TEST_X", "abc");
        assert_eq!(
            expand("a-${env:PORTCULLIS_TEST_X}-${file:tok}", dir.path()).unwrap(),
            "a-abc-s3cret"
        );
        assert!(expand("${env:PORTCULLIS_NOPE_NOPE}", dir.path())
            .unwrap_err()
            .contains("not set"));
        assert!(expand("${vault:x}", dir.path()).is_err());
    }
}
