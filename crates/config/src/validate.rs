//! Loading and validation: parse each file (syntax and type errors carry serde's location),
//! resolve includes, expand secrets, then check every cross-reference and collect all
//! problems with their file:line:col.

use crate::model::*;
use crate::spans::SpanIndex;
use crate::{
    expand, AdminDef, BackendDef, Config, Diagnostic, Error, Loc, RouteDef, RouteSrc, Source,
    WorkflowsDef,
};
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| {
        Error(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            message: format!("cannot read config file: {e}"),
        }])
    })
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, Diagnostic> {
    serde_yaml_ng::from_str::<T>(text).map_err(|e| {
        let (line, col) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        let mut message = e.to_string();
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        Diagnostic {
            file: path.to_path_buf(),
            line,
            col,
            message: suggest(message),
        }
    })
}

/// Adds "did you mean" to serde's unknown-field message when a known key is close.
fn suggest(message: String) -> String {
    let Some(rest) = message.split("unknown field `").nth(1) else {
        return message;
    };
    let Some((bad, expected)) = rest.split_once('`') else {
        return message;
    };
    let best = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (levenshtein(bad, cand), cand))
        .min();
    match best {
        Some((d, cand)) if d <= 2 || cand.starts_with(bad) => {
            format!("{message} (did you mean `{cand}`?)")
        }
        _ => message,
    }
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

struct AppSrc {
    name: String,
    policies: Vec<PathBuf>,
    src: Source,
    backends: Vec<Backend>,
    routes: Vec<Route>,
}

pub(crate) fn load(path: &Path) -> Result<Config, Error> {
    let root_path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let base = root_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let text = read(&root_path)?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    let root: RootFile = parse(&root_path, &text).map_err(|d| Error(vec![d]))?;
    let root_src = Source {
        path: root_path.clone(),
        spans: Arc::new(SpanIndex::build(&text)),
    };

    let mut diags = Vec::new();
    let mut files = vec![root_path.clone()];
    let mut watch_dirs = Vec::new();

    // App bundles.
    let global_policies = expand_globs(&root_src, "policies", &root.policies, &base, &mut diags);
    let mut apps = vec![AppSrc {
        name: "default".into(),
        policies: Vec::new(),
        src: Source {
            path: root_path.clone(),
            spans: root_src.spans.clone(),
        },
        backends: root.backends.clone(),
        routes: root.routes.clone(),
    }];
    if let Some(inc) = &root.apps {
        for (i, pattern) in inc.include.iter().enumerate() {
            let at = format!("apps.include[{i}]");
            let full = base.join(pattern);
            if let Some(dir) = full.parent() {
                watch_dirs.push(dir.to_path_buf());
            }
            let entries = match glob::glob(&full.to_string_lossy()) {
                Ok(e) => e,
                Err(e) => {
                    diags.push(
                        root_src.diag(&at, format!("invalid include pattern `{pattern}`: {e}")),
                    );
                    continue;
                }
            };
            let mut matched: Vec<PathBuf> = entries.filter_map(Result::ok).collect();
            matched.sort();
            for file in matched {
                let t = match read(&file) {
                    Ok(t) => t,
                    Err(e) => {
                        diags.extend(e.0);
                        continue;
                    }
                };
                t.hash(&mut hasher);
                files.push(file.clone());
                match parse::<AppFile>(&file, &t) {
                    Ok(app) => {
                        let src = Source {
                            path: file.clone(),
                            spans: Arc::new(SpanIndex::build(&t)),
                        };
                        let abase = file
                            .parent()
                            .map(Path::to_path_buf)
                            .unwrap_or_else(|| base.clone());
                        apps.push(AppSrc {
                            policies: expand_globs(
                                &src,
                                "policies",
                                &app.policies,
                                &abase,
                                &mut diags,
                            ),
                            name: app.name,
                            src,
                            backends: app.backends,
                            routes: app.routes,
                        })
                    }
                    Err(d) => diags.push(d),
                }
            }
        }
    }

    check_limits(&root_src, &root, &mut diags);

    // Listeners.
    let mut listeners = root.listeners.clone();
    let mut binds: HashMap<SocketAddr, String> = HashMap::new();
    let mut listener_names = HashSet::new();
    for (i, l) in listeners.iter_mut().enumerate() {
        let at = format!("listeners[{i}]");
        listener_limits(&root_src, &at, l, &mut diags);
        if !valid_name(&l.name) {
            diags.push(root_src.diag(&format!("{at}.name"), name_msg("listener", &l.name)));
        }
        if !listener_names.insert(l.name.clone()) {
            diags.push(root_src.diag(
                &format!("{at}.name"),
                format!(
                    "duplicate listener name `{}`: listener names must be unique",
                    l.name
                ),
            ));
        }
        match expand(&l.bind, &base) {
            Ok(b) => l.bind = b,
            Err(e) => diags.push(root_src.diag(&format!("{at}.bind"), e)),
        }
        check_upgrades(
            &root_src,
            &format!("{at}.upgrades"),
            &l.upgrades,
            &mut diags,
        );
        check_bind(
            &root_src,
            &format!("{at}.bind"),
            &l.bind,
            &l.name,
            &mut binds,
            &mut diags,
        );
        if l.protocols.is_empty() {
            diags.push(root_src.diag(
                &format!("{at}.protocols"),
                "protocols is empty: list `http1`, `http2` or both",
            ));
        }
        if let Some(tls) = &mut l.tls {
            if tls.certificates.is_empty() {
                diags.push(root_src.diag(
                    &format!("{at}.tls.certificates"),
                    "a TLS listener needs at least one certificate: add `{ cert: FILE, key: FILE }`",
                ));
            }
            for (j, c) in tls.certificates.iter_mut().enumerate() {
                let cat = format!("{at}.tls.certificates[{j}]");
                resolve_file(
                    &root_src,
                    &format!("{cat}.cert"),
                    &mut c.cert,
                    &base,
                    &mut diags,
                );
                resolve_file(
                    &root_src,
                    &format!("{cat}.key"),
                    &mut c.key,
                    &base,
                    &mut diags,
                );
            }
            if let Some(ca) = &mut tls.client_auth {
                resolve_file(
                    &root_src,
                    &format!("{at}.tls.client_auth.ca"),
                    &mut ca.ca,
                    &base,
                    &mut diags,
                );
            }
        }
    }

    let admin = root.admin.as_ref().map(|a| {
        let mut bind = a.bind.clone();
        match expand(&bind, &base) {
            Ok(b) => bind = b,
            Err(e) => diags.push(root_src.diag("admin.bind", e)),
        }
        check_bind(&root_src, "admin.bind", &bind, "admin", &mut binds, &mut diags);
        let mut tokens = Vec::new();
        let mut plaintext_tokens = Vec::new();
        for (i, t) in a.tokens.iter().enumerate() {
            match expand(t, &base) {
                Ok(t) if t.starts_with("sha256:") => {
                    let hex = &t["sha256:".len()..];
                    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        tokens.push(t.to_ascii_lowercase());
                    } else {
                        diags.push(root_src.diag(
                            &format!("admin.tokens[{i}]"),
                            "a hashed admin token is `sha256:` and 64 hex digits: write the output of `portcullis admin hash-token`",
                        ));
                    }
                }
                Ok(t) if t.len() >= 16 => {
                    plaintext_tokens.push(i);
                    tokens.push(t)
                }
                Ok(_) => diags.push(root_src.diag(
                    &format!("admin.tokens[{i}]"),
                    "admin token is shorter than 16 characters: use a long random value, e.g. `openssl rand -hex 32`",
                )),
                Err(e) => diags.push(root_src.diag(&format!("admin.tokens[{i}]"), e)),
            }
        }
        let policies = expand_globs(&root_src, "admin.policies", &a.policies, &base, &mut diags);
        let mut tls = a.tls.clone();
        if let Some(tls) = &mut tls {
            if tls.certificates.is_empty() {
                diags.push(root_src.diag(
                    "admin.tls.certificates",
                    "a TLS admin listener needs a certificate: add `{ cert: FILE, key: FILE }`",
                ));
            }
            for (j, c) in tls.certificates.iter_mut().enumerate() {
                let cat = format!("admin.tls.certificates[{j}]");
                resolve_file(&root_src, &format!("{cat}.cert"), &mut c.cert, &base, &mut diags);
                resolve_file(&root_src, &format!("{cat}.key"), &mut c.key, &base, &mut diags);
            }
            if let Some(ca) = &mut tls.client_auth {
                resolve_file(&root_src, "admin.tls.client_auth.ca", &mut ca.ca, &base, &mut diags);
            }
        }
        if let Some(u) = &a.login_redirect_url {
            if !(u.starts_with("https://") || u.starts_with("http://")) || !u.ends_with("/login/callback") {
                diags.push(root_src.diag(
                    "admin.login_redirect_url",
                    "the console's callback is an absolute URL ending in `/login/callback`, e.g. `https://admin.example.com/login/callback`",
                ));
            }
        }
        AdminDef {
            bind,
            tokens,
            auth: a.auth.clone(),
            policies,
            plaintext_tokens,
            tls,
            login_redirect_url: a.login_redirect_url.clone(),
        }
    });
    let workflows = root.workflows.as_ref().map(|w| {
        let files = expand_globs(
            &root_src,
            "workflows.include",
            &w.include,
            &base,
            &mut diags,
        );
        for pat in &w.include {
            if let Some(dir) = base.join(pat).parent() {
                watch_dirs.push(dir.to_path_buf());
            }
        }
        WorkflowsDef {
            files,
            inline: w
                .definitions
                .iter()
                .map(|(k, v)| (k.clone(), as_json(Some(v))))
                .collect(),
            retention: w.retention.0,
        }
    });
    if let Some(w) = &workflows {
        files.extend(w.files.iter().cloned());
    }

    let mut authorizer_names = HashSet::new();
    for (i, a) in root.authorizers.iter().enumerate() {
        let at = format!("authorizers[{i}]");
        authorizer_timeout(&root_src, &at, a, &mut diags);
        if !valid_name(&a.name) {
            diags.push(root_src.diag(&format!("{at}.name"), name_msg("authorizer", &a.name)));
        }
        if !authorizer_names.insert(a.name.clone()) {
            diags.push(root_src.diag(
                &format!("{at}.name"),
                format!("duplicate authorizer name `{}`", a.name),
            ));
        }
        if !(a.url.starts_with("http://") || a.url.starts_with("https://")) {
            diags.push(root_src.diag(
                &format!("{at}.url"),
                format!(
                    "authorizer url `{}` must start with http:// or https://",
                    a.url
                ),
            ));
        }
        let headers = a
            .send
            .iter()
            .enumerate()
            .map(|(j, h)| (format!("{at}.send[{j}]"), h.as_str()));
        let keyed = a.cache.key.iter().enumerate().filter_map(|(j, k)| {
            Some((format!("{at}.cache.key[{j}]"), k.strip_prefix("header:")?))
        });
        for (place, h) in headers.chain(keyed) {
            if let Some(why) = unsendable(h) {
                diags
                    .push(root_src.diag(&place, format!("an authorizer is not sent `{h}`: {why}")));
            }
        }
        for (j, h) in a.upstream_headers.iter().enumerate() {
            let why = unsettable(h);
            if let Some(why) = why {
                diags.push(root_src.diag(
                    &format!("{at}.upstream_headers[{j}]"),
                    format!("an authorizer may not set `{h}`: {why}"),
                ));
            }
        }
        for (j, k) in a.cache.key.iter().enumerate() {
            let ok = ["header:", "query:", "claim:"]
                .iter()
                .any(|p| k.strip_prefix(p).is_some_and(|r| !r.is_empty()));
            if !ok {
                diags.push(root_src.diag(
                    &format!("{at}.cache.key[{j}]"),
                    format!("cache key `{k}` must be `header:NAME`, `query:NAME` or `claim:PATH`"),
                ));
            }
        }
    }
    let mut limits = root.limits.clone();
    if let LimitStore::Redis(r) = &mut limits.store {
        match expand(&r.url, &base) {
            Ok(u) => r.url = u,
            Err(e) => diags.push(root_src.diag("limits.store.redis.url", e)),
        }
    }
    check_store(&root_src, &limits, &mut diags);
    let mut audit = root.audit.clone();
    audit.dir = base.join(&audit.dir).to_string_lossy().into_owned();
    if audit.queue == 0 {
        diags.push(root_src.diag("audit.queue", "audit.queue must be at least 1"));
    }
    let mut identity = root.identity.clone();
    let session_keys = check_identity(&root_src, &mut identity, &base, &mut diags);
    let provider_kinds: HashMap<String, ProviderKind> = identity
        .providers
        .iter()
        .map(|p| (p.name.clone(), p.kind))
        .collect();

    if root.workers == Some(0) {
        diags.push(root_src.diag("workers", "workers must be at least 1"));
    } else if root.workers.is_some_and(|w| w > MAX_WORKERS) {
        diags.push(root_src.diag(
            "workers",
            format!("workers must be at most {MAX_WORKERS}: one per CPU core is the default, and more than a few per core only costs memory and switching"),
        ));
    }

    // Backends of every app.
    let mut app_names = HashSet::new();
    let mut backends = Vec::new();
    let mut backend_ids = HashSet::new();
    for app in &mut apps {
        if app.name != "default" || app_names.contains("default") {
            if !valid_name(&app.name) {
                diags.push(app.src.diag("name", name_msg("app", &app.name)));
            }
            if !app_names.insert(app.name.clone()) {
                diags.push(app.src.diag(
                    "name",
                    format!("duplicate app name `{}`: each app bundle needs its own name (`default` is the root file's)", app.name),
                ));
            }
        } else {
            app_names.insert("default".to_string());
        }
        let abase = app
            .src
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| base.clone());
        for (i, b) in app.backends.iter_mut().enumerate() {
            let at = format!("backends[{i}]");
            let id = format!("{}/{}", app.name, b.name);
            if !valid_name(&b.name) {
                diags.push(
                    app.src
                        .diag(&format!("{at}.name"), name_msg("backend", &b.name)),
                );
            }
            if !backend_ids.insert(id.clone()) {
                diags.push(app.src.diag(
                    &format!("{at}.name"),
                    format!("duplicate backend `{}` in app `{}`: backend names must be unique in an app", b.name, app.name),
                ));
            }
            let server_names = check_backend(&app.src, &at, b, &abase, &mut diags);
            let pos = app.src.spans.pos(&at);
            backends.push(BackendDef {
                id,
                app: app.name.clone(),
                spec: b.clone(),
                server_names,
                loc: Loc {
                    file: app.src.path.clone(),
                    line: pos.line,
                    col: pos.col,
                },
            });
        }
    }

    // Routes of every app.
    let mut routes = Vec::new();
    let mut route_srcs = HashMap::new();
    let mut route_ids = HashSet::new();
    let mut order = 0;
    // The identity headers portcullis sets (every route's `headers.upstream`), which it
    // removes from every request before routing: a route cannot match on them.
    let identity_headers: HashSet<String> = apps
        .iter()
        .flat_map(|a| &a.routes)
        .flat_map(|r| r.headers.upstream.keys())
        .map(|k| k.to_ascii_lowercase().replace('_', "-"))
        .collect();
    for app in &apps {
        for (i, r) in app.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            for name in r.matcher.headers.keys() {
                let n = name.to_ascii_lowercase().replace('_', "-");
                if n.starts_with("x-portcullis-") || identity_headers.contains(&n) {
                    diags.push(app.src.diag(
                        &format!("{at}.match.headers.{name}"),
                        format!("route `{}` matches on `{name}`, an identity header portcullis sets: it removes the client's before routing, so this never matches; match on something the client may send", r.name),
                    ));
                }
            }
            zero_timeouts(&app.src, &at, &[("timeout", r.timeout, "30s")], &mut diags);
            let id = format!("{}/{}", app.name, r.name);
            if !valid_name(&r.name) {
                diags.push(
                    app.src
                        .diag(&format!("{at}.name"), name_msg("route", &r.name)),
                );
            }
            if !route_ids.insert(id.clone()) {
                diags.push(app.src.diag(
                    &format!("{at}.name"),
                    format!(
                        "duplicate route `{}` in app `{}`: route names must be unique in an app",
                        r.name, app.name
                    ),
                ));
            }
            let backend_id = if r.backend.contains('/') {
                r.backend.clone()
            } else {
                format!("{}/{}", app.name, r.backend)
            };
            if !backend_ids.contains(&backend_id) {
                let known: Vec<&str> = backends
                    .iter()
                    .filter(|b| b.app == app.name)
                    .map(|b| b.spec.name.as_str())
                    .collect();
                diags.push(app.src.diag(
                    &format!("{at}.backend"),
                    format!(
                        "route `{}` names backend `{}`, which does not exist in app `{}`: define it under `backends:` or use one of [{}] (another app's backend is written `app/name`)",
                        r.name, r.backend, app.name, known.join(", ")
                    ),
                ));
            }
            if let Some(ls) = &r.listeners {
                for (j, l) in ls.iter().enumerate() {
                    if !listener_names.contains(l) {
                        diags.push(app.src.diag(
                            &format!("{at}.listeners[{j}]"),
                            format!("route `{}` names listener `{l}`, which does not exist: define it under `listeners:` in the root file", r.name),
                        ));
                    }
                }
            }
            check_match(&app.src, &format!("{at}.match"), &r.matcher, &mut diags);
            if let Some(u) = &r.upgrades {
                check_upgrades(&app.src, &format!("{at}.upgrades"), u, &mut diags);
            }
            check_route_identity(&app.src, &at, r, &provider_kinds, &mut diags);
            check_route_limits(&app.src, &at, r, &root, &mut diags);
            for (j, a) in r.authorize_with.iter().enumerate() {
                if !root.authorizers.iter().any(|x| &x.name == a) {
                    diags.push(app.src.diag(
                        &format!("{at}.authorize_with[{j}]"),
                        format!("route `{}` names authorizer `{a}`, which does not exist: define it under `authorizers:`", r.name),
                    ));
                }
            }
            if r.public
                && (!r.authorize_with.is_empty() || !r.policies.is_empty() || !r.deny.is_empty())
            {
                diags.push(app.src.diag(&at, format!("route `{}` is public: `policies`, `deny` and `authorize_with` need an identity", r.name)));
            }
            for (kind, rules) in [("allow", &r.allow), ("deny", &r.deny)] {
                for (j, rule) in rules.iter().enumerate() {
                    for (k, p) in rule.paths.iter().enumerate() {
                        if !p.starts_with('/') {
                            diags.push(app.src.diag(
                                &format!("{at}.{kind}[{j}].paths[{k}]"),
                                format!("path glob `{p}` must start with `/`"),
                            ));
                        } else if let Some(why) = uncanonical_path(&p.replace('*', "x")) {
                            diags.push(app.src.diag(
                                &format!("{at}.{kind}[{j}].paths[{k}]"),
                                format!("path glob `{p}` never matches: {why}"),
                            ));
                        }
                        if p.contains("**") && p.replace("**", "").contains('*') {
                            diags.push(app.src.diag(
                                &format!("{at}.{kind}[{j}].paths[{k}]"),
                                format!("path glob `{p}` mixes `*` (within a segment) and `**` (across segments): use one of them, or write a Cedar policy"),
                            ));
                        }
                    }
                    for (k, m) in rule.methods.iter().enumerate() {
                        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                            diags.push(app.src.diag(
                                &format!("{at}.{kind}[{j}].methods[{k}]"),
                                format!("invalid method `{m}`: write it in upper case, like `GET`"),
                            ));
                        }
                    }
                    for (p, k) in [(&rule.providers, "providers")] {
                        for (q, name) in p.iter().enumerate() {
                            if !provider_kinds.contains_key(name) {
                                diags.push(app.src.diag(
                                    &format!("{at}.{kind}[{j}].{k}[{q}]"),
                                    format!("unknown provider `{name}`"),
                                ));
                            }
                        }
                    }
                }
            }
            let rbase = app
                .src
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| base.clone());
            let mut policy_files = app.policies.clone();
            policy_files.extend(expand_globs(
                &app.src,
                &format!("{at}.policies"),
                &r.policies,
                &rbase,
                &mut diags,
            ));
            route_srcs.insert(
                id.clone(),
                RouteSrc {
                    file: app.src.path.clone(),
                    index: i,
                    spans: app.src.spans.clone(),
                },
            );
            routes.push(RouteDef {
                id,
                app: app.name.clone(),
                spec: r.clone(),
                backend_id,
                order,
                policy_files,
            });
            order += 1;
        }
    }

    let mut access_log = root.access_log.clone();
    if access_log.path != "stdout" && access_log.path != "off" {
        access_log.path = base.join(&access_log.path).to_string_lossy().into_owned();
    }
    if !(0.0..=1.0).contains(&access_log.sample) {
        diags.push(root_src.diag(
            "access_log.sample",
            format!(
                "access_log.sample is {}: write a fraction from 0 to 1, like `0.1` to log one successful request in ten (errors are always logged; 1, the default, logs every request)",
                access_log.sample
            ),
        ));
    }

    // A plan's overrides name routes of any file: checked once every route is known.
    for (i, p) in root.usage_plans.iter().enumerate() {
        for (j, o) in p.overrides.iter().enumerate() {
            for (k, name) in o.routes.iter().enumerate() {
                if !routes.iter().any(|r| &r.spec.name == name || &r.id == name) {
                    diags.push(root_src.diag(
                        &format!("usage_plans[{i}].overrides[{j}].routes[{k}]"),
                        format!("the override names route `{name}`, which does not exist: write a route's name, or its id (`app/name`) when names repeat across apps"),
                    ));
                }
            }
        }
    }
    if !diags.is_empty() {
        return Err(Error(diags));
    }
    if let Some(a) = &admin {
        for (j, name) in a.auth.iter().enumerate() {
            if !provider_kinds.contains_key(name) {
                let known: Vec<&str> = provider_kinds.keys().map(String::as_str).collect();
                diags.push(root_src.diag(
                    &format!("admin.auth[{j}]"),
                    format!("the admin API names provider `{name}`, which does not exist: define it under `identity.providers` ([{}])", known.join(", ")),
                ));
            }
        }
        if !a.auth.is_empty() && a.policies.is_empty() {
            diags.push(root_src.diag(
                "admin.auth",
                "`admin.auth` lets people call the admin API, and each call needs a Cedar permit: list the policy files under `admin.policies`",
            ));
        }
    }
    if !diags.is_empty() {
        return Err(Error(diags));
    }
    let mut warnings = dev_warnings(&listeners, &routes, &provider_kinds);
    if let Some(a) = &admin {
        for i in &a.plaintext_tokens {
            warnings.push(format!("admin.tokens[{i}] is the token itself: store its hash instead (`portcullis admin hash-token`), so the config does not hold the secret"));
        }
    }
    warnings.extend(path_warnings(&routes));
    warnings.extend(underscore_warnings(&listeners, &routes));
    // The version covers what the YAML points at too: expanded secrets and the TLS files
    // that are read once, so rotating a `${file:}` secret or a CA file and reloading
    // actually takes effect.
    if let Some(a) = &admin {
        a.tokens.hash(&mut hasher);
    }
    format!("{identity:?}").hash(&mut hasher);
    session_keys.hash(&mut hasher);
    let mut referenced: Vec<&str> = Vec::new();
    for l in &listeners {
        if let Some(t) = &l.tls {
            referenced.extend(t.client_auth.iter().map(|c| c.ca.as_str()));
        }
    }
    for b in &backends {
        if let Some(t) = &b.spec.tls {
            referenced.extend(
                [&t.ca, &t.client_cert, &t.client_key]
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            );
        }
    }
    for f in referenced {
        std::fs::read(f).unwrap_or_default().hash(&mut hasher);
    }
    // Cedar policy files are config too: editing one and reloading must take effect (and a
    // bad one must be rejected), and the file watcher must see them. (A new file that a glob
    // now matches changes the list hashed here, so an explicit reload picks it up.)
    // The admin API's policies too: a revocation written there must take effect at the
    // reload that follows it.
    let mut policy_files: Vec<&PathBuf> = global_policies
        .iter()
        .chain(routes.iter().flat_map(|r| r.policy_files.iter()))
        .chain(admin.iter().flat_map(|a| a.policies.iter()))
        .collect();
    policy_files.sort();
    policy_files.dedup();
    // Workflow definition files too: an edited definition must reach new executions at the
    // reload (and a bad one be refused then, not at the next start).
    policy_files.extend(workflows.iter().flat_map(|w| w.files.iter()));
    for f in policy_files {
        f.hash(&mut hasher);
        std::fs::read(f).unwrap_or_default().hash(&mut hasher);
        if !files.contains(f) {
            files.push(f.clone());
        }
    }
    let workers = root.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    Ok(Config {
        root: root_path,
        root_spans: (*root_src.spans).clone(),
        files,
        watch_dirs,
        version: format!("{:016x}", hasher.finish()),
        workers,
        listeners,
        admin,
        access_log,
        trusted_proxies: root.trusted_proxies.clone(),
        shutdown_grace: root.shutdown_grace.0,
        warnings,
        backends,
        routes,
        identity,
        session_keys,
        global_policies,
        policy: root.policy.clone(),
        authorizers: root.authorizers.clone(),
        audit,
        route_srcs,
        state_dir: base.join(&root.state_dir),
        limits,
        stick_tables: root.stick_tables.clone(),
        usage_plans: root.usage_plans.clone(),
        events: as_json(root.events.as_ref()),
        triggers: as_json(root.triggers.as_ref()),
        workflows,
    })
}

/// A YAML value as JSON (null when absent), for the engines that validate it themselves.
fn as_json(v: Option<&serde_yaml_ng::Value>) -> serde_json::Value {
    v.and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Expands policy file globs relative to `base`. A pattern that matches nothing is an error,
/// so a typo cannot silently drop policies.
fn expand_globs(
    src: &Source,
    at: &str,
    patterns: &[String],
    base: &Path,
    diags: &mut Vec<Diagnostic>,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (i, pat) in patterns.iter().enumerate() {
        let full = base.join(pat);
        match glob::glob(&full.to_string_lossy()) {
            Ok(entries) => {
                let mut found: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .filter(|p| p.is_file())
                    .collect();
                if found.is_empty() {
                    diags.push(src.diag(
                        &format!("{at}[{i}]"),
                        format!("`{pat}` matches no file (looked in {})", base.display()),
                    ));
                }
                found.sort();
                out.extend(found);
            }
            Err(e) => diags.push(src.diag(
                &format!("{at}[{i}]"),
                format!("invalid pattern `{pat}`: {e}"),
            )),
        }
    }
    out
}

const ALGORITHMS: [&str; 12] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256",
    "HS384", "HS512",
];

fn check_identity(
    src: &Source,
    id: &mut Identity,
    base: &Path,
    diags: &mut Vec<Diagnostic>,
) -> Vec<[u8; 32]> {
    use base64::Engine;
    let mut names = HashSet::new();
    let mut login = false;
    for (i, p) in id.providers.iter_mut().enumerate() {
        let at = format!("identity.providers[{i}]");
        if !valid_name(&p.name) {
            diags.push(src.diag(&format!("{at}.name"), name_msg("provider", &p.name)));
        }
        if !names.insert(p.name.clone()) {
            diags.push(src.diag(
                &format!("{at}.name"),
                format!(
                    "duplicate provider name `{}`: provider names must be unique",
                    p.name
                ),
            ));
        }
        let is_token = matches!(
            p.kind,
            ProviderKind::Oidc | ProviderKind::Jwt | ProviderKind::DevIssuer
        );
        let misplaced = |field: &str, present: bool, diags: &mut Vec<Diagnostic>| {
            if present {
                diags.push(src.diag(
                    &format!("{at}.{field}"),
                    format!(
                        "`{field}` does not apply to a provider of kind `{}`: remove it",
                        kind_name(p.kind)
                    ),
                ));
            }
        };
        for (j, a) in p.algorithms.iter().enumerate() {
            if a.eq_ignore_ascii_case("none") {
                diags.push(src.diag(
                    &format!("{at}.algorithms[{j}]"),
                    "algorithm `none` is never accepted: remove it",
                ));
            } else if !ALGORITHMS.contains(&a.as_str()) {
                diags.push(src.diag(
                    &format!("{at}.algorithms[{j}]"),
                    format!(
                        "unknown algorithm `{a}`: use one of {}",
                        ALGORITHMS.join(", ")
                    ),
                ));
            } else if a.starts_with("HS") && p.hs_secret.is_none() {
                diags.push(src.diag(
                    &format!("{at}.algorithms[{j}]"),
                    format!("`{a}` needs a shared secret: set `hs_secret` on this provider, or use an asymmetric algorithm"),
                ));
            }
        }
        for (field, v) in [
            ("hs_secret", &mut p.hs_secret),
            ("client_secret", &mut p.client_secret),
        ] {
            if let Some(v) = v {
                match expand(v, base) {
                    Ok(x) => *v = x,
                    Err(e) => diags.push(src.diag(&format!("{at}.{field}"), e)),
                }
            }
        }
        if let Some(secret) = &p.hs_secret {
            if secret.len() < 32 {
                diags.push(src.diag(
                    &format!("{at}.hs_secret"),
                    "hs_secret must be at least 32 bytes long",
                ));
            }
        }
        match p.kind {
            ProviderKind::Oidc => {
                if p.issuer.is_none() {
                    diags.push(src.diag(&at, format!("oidc provider `{}` needs `issuer` (the URL before /.well-known/openid-configuration)", p.name)));
                }
                if p.client_id.is_some() != p.client_secret.is_some() {
                    diags.push(src.diag(&at, format!("oidc provider `{}`: browser login needs both `client_id` and `client_secret`", p.name)));
                }
                if p.audiences.is_empty() {
                    match &p.client_id {
                        Some(c) => p.audiences.push(c.clone()),
                        None => diags.push(src.diag(&at, format!("oidc provider `{}` needs `audiences` (or a `client_id`, used as the audience)", p.name))),
                    }
                }
                login |= p.client_id.is_some();
                misplaced("jwks_file", p.jwks_file.is_some(), diags);
                misplaced("keys", p.keys.is_some(), diags);
            }
            ProviderKind::Jwt => {
                if p.issuer.is_none() {
                    diags.push(src.diag(&at, format!("jwt provider `{}` needs `issuer`: the exact `iss` of its tokens", p.name)));
                }
                if p.audiences.is_empty() {
                    diags.push(src.diag(&at, format!("jwt provider `{}` needs `audiences`", p.name)));
                }
                let sources = [p.jwks_uri.is_some(), p.jwks_file.is_some(), p.keys.is_some()]
                    .iter()
                    .filter(|x| **x)
                    .count();
                if sources > 1 || (sources == 0 && p.hs_secret.is_none()) {
                    diags.push(src.diag(&at, format!("jwt provider `{}` needs exactly one of `jwks_uri`, `jwks_file` or `keys`", p.name)));
                }
                if let Some(f) = &mut p.jwks_file {
                    resolve_file(src, &format!("{at}.jwks_file"), f, base, diags);
                }
                misplaced("client_id", p.client_id.is_some(), diags);
            }
            ProviderKind::DevIssuer => {
                if p.issuer.is_none() {
                    p.issuer = Some("https://dev.portcullis.invalid".into());
                }
                if p.audiences.is_empty() {
                    p.audiences.push("portcullis".into());
                }
                let f = p.key_file.clone().unwrap_or_else(|| format!(".portcullis/{}-issuer.pem", p.name));
                p.key_file = Some(base.join(f).to_string_lossy().into_owned());
            }
            ProviderKind::ApiKey => match &mut p.keys_file {
                Some(f) => resolve_file(src, &format!("{at}.keys_file"), f, base, diags),
                None => diags.push(src.diag(&at, format!("api_key provider `{}` needs `keys_file`: create one with `portcullis apikey new`", p.name))),
            },
            ProviderKind::Mtls => {
                for (j, f) in p.identity_from.iter().enumerate() {
                    if !["uri", "dns", "cn"].contains(&f.as_str()) {
                        diags.push(src.diag(&format!("{at}.identity_from[{j}]"), "identity_from entries are `uri`, `dns` or `cn`"));
                    }
                }
            }
        }
        if !is_token {
            misplaced("issuer", p.issuer.is_some(), diags);
            misplaced("jwks_uri", p.jwks_uri.is_some(), diags);
        }
    }
    let mut keys = Vec::new();
    for (i, k) in id.session.keys.iter().enumerate() {
        let at = format!("identity.session.keys[{i}]");
        let k = match expand(k, base) {
            Ok(k) => k,
            Err(e) => {
                diags.push(src.diag(&at, e));
                continue;
            }
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(k.trim())
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(k.trim()));
        match raw.ok().and_then(|r| <[u8; 32]>::try_from(r.as_slice()).ok()) {
            Some(b) => keys.push(b),
            None => diags.push(src.diag(&at, "a session key must be 32 random bytes in base64: generate one with `openssl rand -base64 32`")),
        }
    }
    if login && keys.is_empty() && id.session.keys.is_empty() {
        diags.push(src.diag(
            "identity",
            "browser login needs `identity.session.keys`: add `session: { keys: [\"${file:secrets/session.key}\"] }` with a key from `openssl rand -base64 32`",
        ));
    }
    keys
}

fn kind_name(k: ProviderKind) -> &'static str {
    match k {
        ProviderKind::Oidc => "oidc",
        ProviderKind::Jwt => "jwt",
        ProviderKind::ApiKey => "api_key",
        ProviderKind::Mtls => "mtls",
        ProviderKind::DevIssuer => "dev_issuer",
    }
}

fn check_route_identity(
    src: &Source,
    at: &str,
    r: &Route,
    kinds: &HashMap<String, ProviderKind>,
    diags: &mut Vec<Diagnostic>,
) {
    if !r.public && r.auth.is_empty() {
        diags.push(src.diag(
            at,
            format!("route `{}` has no `auth` and is not `public: true`: routes are closed by default, so list the identity providers that may call it (`auth: [name]`) or mark it `public: true`", r.name),
        ));
    }
    if r.public && !r.auth.is_empty() {
        diags.push(src.diag(
            &format!("{at}.public"),
            format!(
                "route `{}` is `public: true` and lists `auth`: choose one",
                r.name
            ),
        ));
    }
    for (j, a) in r.auth.iter().enumerate() {
        if !kinds.contains_key(a) {
            let known: Vec<&str> = kinds.keys().map(String::as_str).collect();
            diags.push(src.diag(
                &format!("{at}.auth[{j}]"),
                format!("route `{}` names provider `{a}`, which does not exist: define it under `identity.providers` ([{}])", r.name, known.join(", ")),
            ));
        }
    }
    if r.auth.is_empty() && !r.allow.is_empty() {
        diags.push(src.diag(
            &format!("{at}.allow"),
            format!(
                "route `{}` has `allow` rules but no `auth`: rules need an identity",
                r.name
            ),
        ));
    }
    if r.client_cert.is_some()
        && !r
            .auth
            .iter()
            .any(|a| kinds.get(a) == Some(&ProviderKind::Mtls))
    {
        diags.push(src.diag(
            &format!("{at}.client_cert"),
            "`client_cert` applies only to routes with an `mtls` provider in `auth`",
        ));
    }
    for (name, t) in &r.headers.upstream {
        if let Err(e) = check_template(t) {
            diags.push(src.diag(&format!("{at}.headers.upstream.{name}"), e));
        }
        if http_header_name_invalid(name) {
            diags.push(src.diag(
                &format!("{at}.headers.upstream.{name}"),
                format!("`{name}` is not a valid header name"),
            ));
        } else if name.contains('_') {
            // Origins that read headers the CGI way (WSGI, Rack, PHP) take `X-User` and
            // `X_User` for one name: a client's `-` spelling would stand beside, or for,
            // the identity portcullis sets.
            diags.push(src.diag(
                &format!("{at}.headers.upstream.{name}"),
                format!(
                    "identity header `{name}` has an underscore, which origins may read as a client's `{}`: spell it `{}`",
                    name.replace('_', "-"),
                    name.replace('_', "-")
                ),
            ));
        }
    }
    if r.auth.is_empty()
        && (!r.headers.upstream.is_empty() || r.headers.assertion || r.headers.pass_token)
    {
        diags.push(src.diag(
            &format!("{at}.headers"),
            format!(
                "route `{}` sends identity headers but has no `auth`: add providers",
                r.name
            ),
        ));
    }
}

fn http_header_name_invalid(n: &str) -> bool {
    n.is_empty()
        || !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks `{identity.user}`-style placeholders.
pub fn check_template(t: &str) -> Result<(), String> {
    let mut rest = t;
    while let Some(i) = rest.find('{') {
        let after = &rest[i + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in template `{t}`"))?;
        let var = &after[..end];
        let ok = matches!(
            var,
            "identity.user"
                | "identity.email"
                | "identity.groups"
                | "identity.provider"
                | "identity.subject"
        ) || var.strip_prefix("claims.").is_some_and(|p| !p.is_empty());
        if !ok {
            return Err(format!(
                "unknown placeholder `{{{var}}}`: use {{identity.user}}, {{identity.email}}, {{identity.groups}}, {{identity.provider}}, {{identity.subject}} or {{claims.<path>}}"
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// A route's match, reduced to what the path warnings compare: the host (lower-case, None for
/// any) and the path (exact or prefix, None for every path).
fn host_and_path(r: &RouteDef) -> (Option<String>, Option<(&str, bool)>) {
    let m = &r.spec.matcher;
    let host = m.host.as_ref().map(|h| h.to_ascii_lowercase());
    let path = match (&m.path, &m.path_prefix) {
        (Some(p), _) => Some((p.as_str(), true)),
        (None, Some(p)) if p != "/" => Some((p.as_str(), false)),
        _ => None,
    };
    (host, path)
}

/// Whether a route for host `outer` also receives requests for host `inner`.
fn host_covers(outer: &Option<String>, inner: &Option<String>) -> bool {
    match (outer, inner) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(o), Some(i)) if o == i => true,
        (Some(o), Some(i)) => o
            .strip_prefix('*')
            .is_some_and(|suffix| i.ends_with(suffix) && !i.starts_with('*')),
    }
}

/// Warnings about paths that a reader could take for separate when portcullis treats them as
/// one (routes that differ only by case), and about protected routes that a public route's
/// prefix covers: their protection rests on the canonical form of each request.
fn path_warnings(routes: &[RouteDef]) -> Vec<String> {
    let mut out = Vec::new();
    let keys: Vec<_> = routes.iter().map(host_and_path).collect();
    for (i, a) in routes.iter().enumerate() {
        for (j, b) in routes.iter().enumerate().skip(i + 1) {
            let (Some((pa, ea)), Some((pb, eb))) = (keys[i].1, keys[j].1) else {
                continue;
            };
            if keys[i].0 == keys[j].0 && ea == eb && pa != pb && pa.eq_ignore_ascii_case(pb) {
                out.push(format!(
                    "routes `{}` (`{pa}`) and `{}` (`{pb}`) differ only by case: paths match case-insensitively unless `match.case_sensitive: true`, so both match the same requests and `{}` is never chosen for them; rename one, or set `case_sensitive: true` on both",
                    a.id, b.id, b.id
                ));
            }
        }
    }
    for (i, public) in routes.iter().enumerate() {
        if !public.spec.public || public.spec.matcher.path_regex.is_some() {
            continue;
        }
        let (ph, pp) = &keys[i];
        let pp = match pp {
            Some((_, true)) => continue,
            Some((p, false)) => *p,
            None => "/",
        };
        for (j, protected) in routes.iter().enumerate() {
            let (qh, Some((qp, _))) = &keys[j] else {
                continue;
            };
            let longer = qp.len() > pp.len()
                && qp.as_bytes()[..pp.len()].eq_ignore_ascii_case(pp.as_bytes());
            if protected.spec.public || !host_covers(ph, qh) || !longer {
                continue;
            }
            out.push(format!(
                "public route `{}` (prefix `{pp}`) covers protected route `{}` (`{qp}`): a request for `{qp}` is protected only because portcullis matches and forwards one canonical form of its path and host; keep the listeners' `normalize` defaults and do not route this origin's paths around portcullis (docs/security.md, \"Canonical requests\")",
                public.id, protected.id
            ));
        }
    }
    out
}

/// A route that matches on a header whose name has an underscore (or another byte than a
/// letter, a digit or `-`) never sees it on a listener that drops or refuses such headers
/// (`underscores_in_headers`).
fn underscore_warnings(listeners: &[Listener], routes: &[RouteDef]) -> Vec<String> {
    let mut out = Vec::new();
    for r in routes {
        let unusual = |n: &&String| !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        for n in r.spec.matcher.headers.keys().filter(unusual) {
            for l in listeners {
                let on = r
                    .spec
                    .listeners
                    .as_ref()
                    .is_none_or(|ls| ls.contains(&l.name));
                if on && l.underscores_in_headers != UnderscoresInHeaders::Allow {
                    out.push(format!(
                        "route `{}` matches on header `{n}`, whose name has a character other than letters, digits and `-`: listener `{}` {} such headers (`underscores_in_headers`), so the route never matches it there; spell it with `-`, or set `underscores_in_headers: allow` on the listener",
                        r.id,
                        l.name,
                        match l.underscores_in_headers {
                            UnderscoresInHeaders::Reject => "refuses requests with",
                            _ => "drops",
                        }
                    ));
                }
            }
        }
    }
    out
}

/// The dev issuer signs any token asked of it: warn when it guards a non-loopback listener.
fn dev_warnings(
    listeners: &[Listener],
    routes: &[RouteDef],
    kinds: &HashMap<String, ProviderKind>,
) -> Vec<String> {
    let mut out = Vec::new();
    for r in routes {
        for a in &r.spec.auth {
            if kinds.get(a) != Some(&ProviderKind::DevIssuer) {
                continue;
            }
            for l in listeners {
                let on = r
                    .spec
                    .listeners
                    .as_ref()
                    .is_none_or(|ls| ls.contains(&l.name));
                let loopback = l
                    .bind
                    .parse::<SocketAddr>()
                    .is_ok_and(|a| a.ip().is_loopback());
                if on && !loopback {
                    out.push(format!(
                        "route `{}` accepts the dev_issuer provider `{a}` on listener `{}` ({}), which is not loopback: anyone with the dev key can mint tokens; use it only for local testing",
                        r.id, l.name, l.bind
                    ));
                }
            }
        }
    }
    out
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

fn name_msg(kind: &str, n: &str) -> String {
    format!("invalid {kind} name `{n}`: use 1 to 64 letters, digits, `-`, `_` or `.`")
}

fn check_bind(
    src: &Source,
    at: &str,
    bind: &str,
    owner: &str,
    binds: &mut HashMap<SocketAddr, String>,
    diags: &mut Vec<Diagnostic>,
) {
    match bind.parse::<SocketAddr>() {
        Ok(addr) => {
            let clash = binds.iter().find(|(a, _)| {
                a.port() == addr.port()
                    && (a.ip() == addr.ip()
                        || a.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            });
            if let Some((a, other)) = clash {
                diags.push(src.diag(
                    at,
                    format!("`{bind}` is already bound by `{other}` ({a}): give each listener its own port"),
                ));
            } else {
                binds.insert(addr, owner.to_string());
            }
        }
        Err(_) => diags.push(src.diag(
            at,
            format!(
                "invalid bind address `{bind}`: write IP:PORT, like `0.0.0.0:8080` or `[::]:8443`"
            ),
        )),
    }
}

fn resolve_file(
    src: &Source,
    at: &str,
    value: &mut String,
    base: &Path,
    diags: &mut Vec<Diagnostic>,
) {
    let expanded = match expand(value, base) {
        Ok(v) => v,
        Err(e) => {
            diags.push(src.diag(at, e));
            return;
        }
    };
    let full = base.join(&expanded);
    if !full.is_file() {
        diags.push(src.diag(
            at,
            format!("file `{}` does not exist or is not a file", full.display()),
        ));
    }
    *value = full.to_string_lossy().into_owned();
}

/// A listener's zero timeouts (see [`zero_timeouts`]).
fn listener_timeouts(
    src: &Source,
    at: &str,
    t: &crate::ListenerTimeouts,
    diags: &mut Vec<Diagnostic>,
) {
    let timeouts = [
        ("timeouts.client_header", Some(t.client_header), "10s"),
        ("timeouts.idle", Some(t.idle), "60s"),
        ("timeouts.client_body", Some(t.client_body), "30s"),
    ];
    zero_timeouts(src, at, &timeouts, diags);
}

/// The largest `max_header_size` a listener takes. The proxy follows HTTP/1.1 heads up to
/// this size to enforce `timeouts.client_header` (and to guard against request smuggling);
/// a larger head would be read with no header timeout at all.
pub const MAX_HEADER_SIZE: u64 = 256 * 1024;

/// A listener's timeouts (none 0), `max_header_size` (at most [`MAX_HEADER_SIZE`]) and
/// `max_connections` (not 0).
fn listener_limits(src: &Source, at: &str, l: &crate::Listener, diags: &mut Vec<Diagnostic>) {
    listener_timeouts(src, at, &l.timeouts, diags);
    let size = l.max_header_size.0;
    if size > MAX_HEADER_SIZE {
        diags.push(src.diag(
            &format!("{at}.max_header_size"),
            format!("`max_header_size` is {size} bytes, more than the 256KiB a request head may have (larger heads would escape `timeouts.client_header`): set 256KiB or less; 64KiB is the default"),
        ));
    }
    if l.max_connections == Some(0) {
        diags.push(src.diag(
            &format!("{at}.max_connections"),
            "`max_connections` is 0, which would accept no connection: set 1 or more, or leave it out for no limit".to_string(),
        ));
    }
}

/// An authorizer's zero timeout: with `on_error: allow`, it would let every request through
/// unasked.
fn authorizer_timeout(
    src: &Source,
    at: &str,
    a: &crate::AuthorizerCfg,
    diags: &mut Vec<Diagnostic>,
) {
    zero_timeouts(src, at, &[("timeout", Some(a.timeout), "200ms")], diags);
}

/// A backend's zero timeouts, its health check's included (see [`zero_timeouts`]).
fn backend_timeouts(src: &Source, at: &str, b: &Backend, diags: &mut Vec<Diagnostic>) {
    let timeouts = [
        ("timeouts.connect", Some(b.timeouts.connect), "1s"),
        ("timeouts.response", Some(b.timeouts.response), "30s"),
        ("retries.per_try_timeout", b.retries.per_try_timeout, "5s"),
    ];
    zero_timeouts(src, at, &timeouts, diags);
    if let Some(h) = &b.health_check {
        let timeouts = [
            ("interval", Some(h.interval), "5s"),
            ("timeout", Some(h.timeout), "2s"),
        ];
        zero_timeouts(src, &format!("{at}.health_check"), &timeouts, diags);
    }
}

/// A timeout of zero ends what it times before it can start (a response, a request head),
/// or, for some, by luck: refused, with a typical value to use instead.
fn zero_timeouts(
    src: &Source,
    at: &str,
    timeouts: &[(&str, Option<crate::units::Dur>, &str)],
    diags: &mut Vec<Diagnostic>,
) {
    for (name, d, typical) in timeouts {
        if d.is_some_and(|d| d.0.is_zero()) {
            diags.push(src.diag(
                &format!("{at}.{name}"),
                format!("`{name}` is 0, which would end every request before it could be answered: set a duration above zero, such as `{typical}`"),
            ));
        }
    }
}

fn check_backend(
    src: &Source,
    at: &str,
    b: &mut Backend,
    base: &Path,
    diags: &mut Vec<Diagnostic>,
) -> Vec<String> {
    if b.servers.is_empty() {
        diags.push(src.diag(
            &format!("{at}.servers"),
            format!(
                "backend `{}` has no servers: add at least one `{{ address: HOST:PORT }}`",
                b.name
            ),
        ));
    }
    backend_timeouts(src, at, b, diags);
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    for (j, s) in b.servers.iter_mut().enumerate() {
        let sat = format!("{at}.servers[{j}]");
        match expand(&s.address, base) {
            Ok(a) => s.address = a,
            Err(e) => diags.push(src.diag(&format!("{sat}.address"), e)),
        }
        if s.address != "builtin:echo" {
            let ok = s
                .address
                .rsplit_once(':')
                .map(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
                .unwrap_or(false);
            if !ok {
                diags.push(src.diag(
                    &format!("{sat}.address"),
                    format!("invalid server address `{}`: write HOST:PORT, like `10.0.0.11:8080`, or `builtin:echo`", s.address),
                ));
            }
        }
        if s.weight == 0 || s.weight > 1000 {
            diags.push(src.diag(
                &format!("{sat}.weight"),
                "weight must be between 1 and 1000 (use the admin API's `maint` state to take a server out)",
            ));
        }
        if s.max_connections == Some(0) {
            diags.push(src.diag(
                &format!("{sat}.max_connections"),
                "max_connections must be at least 1",
            ));
        }
        let name = s.name.clone().unwrap_or_else(|| s.address.clone());
        if !seen.insert(name.clone()) {
            diags.push(src.diag(
                &sat,
                format!(
                    "duplicate server `{name}` in backend `{}`: give each server a distinct `name`",
                    b.name
                ),
            ));
        }
        names.push(name);
    }
    if let Some(h) = &b.health_check {
        if h.http.is_some() && h.tcp {
            diags.push(src.diag(
                &format!("{at}.health_check"),
                "health_check has both `http` and `tcp`: choose one",
            ));
        }
        if h.rise == 0 || h.fall == 0 {
            diags.push(src.diag(
                &format!("{at}.health_check"),
                "rise and fall must be at least 1",
            ));
        }
        if let Some(http) = &h.http {
            if !http.path.starts_with('/') {
                diags.push(src.diag(
                    &format!("{at}.health_check.http.path"),
                    "health check path must start with `/`",
                ));
            }
        }
    }
    if let Some(o) = &b.outlier {
        if o.max_ejected_percent > 100 {
            diags.push(src.diag(
                &format!("{at}.outlier.max_ejected_percent"),
                "max_ejected_percent must be between 0 and 100",
            ));
        }
    }
    if b.retries.budget_percent > 100 {
        diags.push(src.diag(
            &format!("{at}.retries.budget_percent"),
            "budget_percent must be between 0 and 100",
        ));
    }
    if let Some(t) = &mut b.tls {
        if t.client_cert.is_some() != t.client_key.is_some() {
            diags.push(src.diag(
                &format!("{at}.tls"),
                "upstream mTLS needs both `client_cert` and `client_key`",
            ));
        }
        for (field, v) in [
            ("ca", &mut t.ca),
            ("client_cert", &mut t.client_cert),
            ("client_key", &mut t.client_key),
        ] {
            if let Some(v) = v {
                resolve_file(src, &format!("{at}.tls.{field}"), v, base, diags);
            }
        }
    }
    names
}

/// Stick tables and usage plans: unique valid names, a size, known key parts, a rate.
/// Counter names are checked by the limits engine (`portcullis check` runs it).
fn check_limits(src: &Source, root: &RootFile, diags: &mut Vec<Diagnostic>) {
    let mut names = HashSet::new();
    for (i, t) in root.stick_tables.iter().enumerate() {
        let at = format!("stick_tables[{i}]");
        if !valid_name(&t.name) {
            diags.push(src.diag(&format!("{at}.name"), name_msg("stick table", &t.name)));
        } else if !names.insert(t.name.as_str()) {
            diags.push(src.diag(
                &format!("{at}.name"),
                format!(
                    "duplicate stick table `{}`: table names must be unique",
                    t.name
                ),
            ));
        }
        if t.size == 0 {
            diags.push(src.diag(
                &format!("{at}.size"),
                "a stick table needs a size of at least 1 entry, like `size: 100000`",
            ));
        }
        if t.store.is_empty() {
            diags.push(src.diag(
                &format!("{at}.store"),
                "a stick table stores at least one counter, like `store: [http_req_rate(10s)]`",
            ));
        }
        if t.key.parts().is_empty() {
            diags.push(src.diag(&format!("{at}.key"), "a table key needs at least one part"));
        }
        for p in t.key.parts() {
            if let Err(e) = key_part(p) {
                diags.push(src.diag(&format!("{at}.key"), e));
            }
        }
    }
    let mut names = HashSet::new();
    for (i, p) in root.usage_plans.iter().enumerate() {
        let at = format!("usage_plans[{i}]");
        if !valid_name(&p.name) {
            diags.push(src.diag(&format!("{at}.name"), name_msg("usage plan", &p.name)));
        } else if !names.insert(p.name.as_str()) {
            diags.push(src.diag(
                &format!("{at}.name"),
                format!(
                    "duplicate usage plan `{}`: plan names must be unique",
                    p.name
                ),
            ));
        }
        if p.rate.count == 0 {
            diags.push(src.diag(
                &format!("{at}.rate"),
                "a plan's rate must be at least 1 request, like `10/s`; to block callers, use a policy",
            ));
        }
        if p.burst == Some(0) {
            diags.push(src.diag(
                &format!("{at}.burst"),
                "a burst of 0 lets nothing through: write at least 1, or leave it out (the rate's count)",
            ));
        }
        if let Some(q) = &p.quota {
            if q.limit == 0 {
                diags.push(src.diag(
                    &format!("{at}.quota.limit"),
                    "a quota of 0 lets nothing through: write at least 1, like `limit: 10000`",
                ));
            }
            too_large(src, &format!("{at}.quota.limit"), Some(q.limit), diags);
            if let Err(e) = reset_time(&q.reset, q.per == QuotaPer::Week) {
                diags.push(src.diag(&format!("{at}.quota.reset"), e));
            }
        }
        check_plan_overrides(src, &at, p, diags);
        for (j, who) in p.assign.principals.iter().enumerate() {
            if !who.contains('/') {
                diags.push(src.diag(
                    &format!("{at}.assign.principals[{j}]"),
                    format!("`{who}` is no principal: write `provider/subject`, like `agents/deploy-bot-1`"),
                ));
            }
        }
    }
}

/// A plan's overrides: each narrows by route or method, to routes that exist, with a rate.
/// A quota above [`crate::units::MAX_COUNT`], which no `RateLimit` header can carry.
fn too_large(src: &Source, at: &str, n: Option<u64>, diags: &mut Vec<Diagnostic>) {
    if n.is_some_and(|n| n > crate::units::MAX_COUNT) {
        diags.push(src.diag(
            at,
            format!(
                "at most {}, the largest integer a `RateLimit` header can carry",
                crate::units::MAX_COUNT_TEXT
            ),
        ));
    }
}

fn check_plan_overrides(src: &Source, at: &str, p: &UsagePlan, diags: &mut Vec<Diagnostic>) {
    for (j, o) in p.overrides.iter().enumerate() {
        let oat = format!("{at}.overrides[{j}]");
        if o.routes.is_empty() && o.methods.is_empty() {
            diags.push(src.diag(
                &oat,
                "an override applies to some `routes` or `methods`, like `methods: [POST]`; for every request, change the plan's own rate",
            ));
        }
        if o.rate.count == 0 {
            diags.push(src.diag(
                &format!("{oat}.rate"),
                "an override's rate must be at least 1 request, like `1/s`",
            ));
        }
        if o.burst == Some(0) {
            diags.push(src.diag(
                &format!("{oat}.burst"),
                "a burst of 0 lets nothing through: write at least 1, or leave it out",
            ));
        }
        for (k, m) in o.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                diags.push(src.diag(
                    &format!("{oat}.methods[{k}]"),
                    format!("`{m}` is no method: write it in capitals, like `POST`"),
                ));
            }
        }
    }
}

/// The Redis store's settings, and the sync interval.
fn check_store(src: &Source, l: &LimitsCfg, diags: &mut Vec<Diagnostic>) {
    if l.sync_interval.0.is_zero() || l.sync_interval.0 > std::time::Duration::from_secs(60) {
        diags.push(src.diag(
            "limits.sync_interval",
            "the sync interval is between 1ms and 60s, like `1s`",
        ));
    }
    if let LimitStore::Redis(r) = &l.store {
        if !(r.url.starts_with("redis://")
            || r.url.starts_with("redis+unix://")
            || r.url.starts_with("unix://"))
        {
            diags.push(src.diag(
                "limits.store.redis.url",
                format!("`{}` is no Redis URL: write `redis://host:port`, like `redis://127.0.0.1:6379`", crate::redact_url(&r.url)),
            ));
        }
        if r.timeout.0.is_zero() || r.timeout.0 > std::time::Duration::from_secs(5) {
            diags.push(src.diag(
                "limits.store.redis.timeout",
                "a Redis timeout is between 1ms and 5s, like `5ms`: the request waits this long at most",
            ));
        }
        if r.connections == 0 || r.connections > 64 {
            diags.push(src.diag(
                "limits.store.redis.connections",
                "connections are between 1 and 64, like `2`",
            ));
        }
        if r.sync_interval.0.is_zero() || r.sync_interval.0 > std::time::Duration::from_secs(60) {
            diags.push(src.diag(
                "limits.store.redis.sync_interval",
                "the sync interval is between 1ms and 60s, like `50ms`",
            ));
        }
        if r.batch
            .is_some_and(|b| b.0.is_zero() || b.0 > std::time::Duration::from_secs(10))
        {
            diags.push(src.diag(
                "limits.store.redis.batch",
                "the batch interval is between 1ms and 10s, like `100ms`; leave it out for one round trip per check",
            ));
        }
        if r.prefix.is_empty() {
            diags.push(src.diag(
                "limits.store.redis.prefix",
                "the prefix names portcullis's keys in Redis: write one, like `portcullis`",
            ));
        }
    }
}

/// A quota's reset time: `HH:MM`, optionally followed by ` UTC`; a weekly quota may name
/// the day its week starts first (`Sunday 00:00 UTC`; Monday by default).
fn reset_time(t: &str, week: bool) -> Result<(), String> {
    const DAYS: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let mut hm = t.trim().strip_suffix("UTC").map_or(t.trim(), str::trim_end);
    if let Some((day, rest)) = hm.split_once(' ') {
        let day = day.to_ascii_lowercase();
        let known = DAYS.iter().any(|d| *d == day || d[..3] == day);
        if !(week && known) {
            return Err(format!(
                "invalid quota reset `{t}`: only a weekly quota names a day (`Sunday 00:00 UTC`); write a UTC time of day, like `00:00 UTC`"
            ));
        }
        hm = rest.trim();
    }
    let ok = hm.split_once(':').is_some_and(|(h, m)| {
        h.len() == 2
            && m.len() == 2
            && h.parse::<u8>().is_ok_and(|h| h < 24)
            && m.parse::<u8>().is_ok_and(|m| m < 60)
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid quota reset `{t}`: write a UTC time of day, like `00:00 UTC` or `09:30 UTC`"
        ))
    }
}

/// One part of a stick table key.
fn key_part(p: &str) -> Result<(), String> {
    let fix = "use `src`, `src/<prefix bits>`, `principal`, `api_key`, `route`, `header:<name>` or `claim:<path>`, or a list of them";
    match p {
        "src" | "principal" | "api_key" | "route" => Ok(()),
        _ => {
            if let Some(bits) = p.strip_prefix("src/") {
                match bits.parse::<u8>() {
                    Ok(b) if (1..=128).contains(&b) => Ok(()),
                    _ => Err(format!(
                        "invalid key part `{p}`: the prefix length is 1 to 32 bits for IPv4 (`src/24`) and up to 128 for IPv6 (`src/64`)"
                    )),
                }
            } else if let Some(h) = p.strip_prefix("header:") {
                if http_header_name(h) {
                    Ok(())
                } else {
                    Err(format!(
                        "invalid key part `{p}`: `{h}` is not a header name"
                    ))
                }
            } else if let Some(c) = p.strip_prefix("claim:") {
                if c.is_empty() {
                    Err(format!(
                        "invalid key part `{p}`: name the claim, like `claim:tenant`"
                    ))
                } else {
                    Ok(())
                }
            } else {
                Err(format!("invalid key part `{p}`: {fix}"))
            }
        }
    }
}

fn http_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A route's `limits`: tracked tables exist, each rule reads a counter its table stores,
/// and the plan exists.
fn check_route_limits(
    src: &Source,
    at: &str,
    r: &Route,
    root: &RootFile,
    diags: &mut Vec<Diagnostic>,
) {
    let l = &r.limits;
    let table = |name: &str| root.stick_tables.iter().find(|t| t.name == name);
    let known = || {
        root.stick_tables
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (j, t) in l.track.iter().enumerate() {
        if table(t).is_none() {
            diags.push(src.diag(
                &format!("{at}.limits.track[{j}]"),
                format!("route `{}` tracks stick table `{t}`, which does not exist: define it under `stick_tables:` in the root file (known: [{}])", r.name, known()),
            ));
        }
    }
    for (j, rule) in l.rules.iter().enumerate() {
        let rat = format!("{at}.limits.rules[{j}]");
        if !l.track.contains(&rule.table) {
            diags.push(src.diag(
                &format!("{rat}.table"),
                format!("the rule reads stick table `{}`, which the route does not track: add it to `limits.track`", rule.table),
            ));
        } else if let Some(t) = table(&rule.table) {
            let norm = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
            if !t.store.iter().any(|c| norm(c) == norm(&rule.counter)) {
                diags.push(src.diag(
                    &format!("{rat}.counter"),
                    format!("stick table `{}` does not store `{}`: use one of [{}], or add it to the table's `store`", t.name, rule.counter, t.store.join(", ")),
                ));
            }
        }
        if let Some(s) = rule.status {
            if !(400..=599).contains(&s) {
                diags.push(src.diag(
                    &format!("{rat}.status"),
                    format!("status {s} is no refusal: use a 4xx or 5xx status, like 429"),
                ));
            }
        }
        match rule.action {
            LimitAction::Tarpit if rule.delay.is_none() => diags.push(src.diag(
                &rat,
                "a tarpit holds the request for `delay` before it answers: add `delay`, like `delay: 2s`",
            )),
            LimitAction::Queue if rule.max_wait.is_none() => diags.push(src.diag(
                &rat,
                "`queue` holds the request at most `max_wait` before it refuses it: add `max_wait`, like `max_wait: 2s`",
            )),
            LimitAction::Queue if rule.max_queue == 0 => diags.push(src.diag(
                &format!("{rat}.max_queue"),
                "a queue holds at least 1 request: leave `max_queue` out (1024) or write more",
            )),
            LimitAction::Mark if rule.header.as_deref().is_none_or(|h| !http_header_name(h)) => {
                diags.push(src.diag(
                    &rat,
                    "`mark` sets a header for the origin: add `header`, like `header: X-Rate-Warn`",
                ))
            }
            _ => {}
        }
    }
    if let Some(p) = &l.plan {
        if !root.usage_plans.iter().any(|u| &u.name == p) {
            diags.push(src.diag(
                &format!("{at}.limits.plan"),
                format!("route `{}` names usage plan `{p}`, which does not exist: define it under `usage_plans:` in the root file", r.name),
            ));
        }
    }
}

/// Upgrade protocols are tokens (RFC 9110 §7.8); `h2c` is never forwarded, since a tunnel
/// carries requests that no route or policy sees (h2c smuggling).
fn check_upgrades(src: &Source, at: &str, list: &[String], diags: &mut Vec<Diagnostic>) {
    for (i, u) in list.iter().enumerate() {
        let name = u.split('/').next().unwrap_or("");
        if name.eq_ignore_ascii_case("h2c") {
            diags.push(src.diag(
                &format!("{at}[{i}]"),
                "`h2c` cannot be allowed: an h2c tunnel would carry requests that no route or policy sees; remove it (clients that speak HTTP/2 use h2 on the listener instead)",
            ));
        } else if u.is_empty()
            || !u
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b))
        {
            diags.push(src.diag(
                &format!("{at}[{i}]"),
                format!(
                    "invalid upgrade protocol `{u}`: write a protocol name such as `websocket`"
                ),
            ));
        }
    }
}

/// The most worker threads a config may ask for (`workers`): far above any machine's cores,
/// and low enough that the runtime starts (a hundred million threads never would).
pub const MAX_WORKERS: usize = 1024;

/// Why a request header may not be sent to an external authorizer, or None: credentials
/// (portcullis verifies them; the authorizer decides on the identity), and where the request
/// came from as the client says it (which portcullis believes only from trusted proxies and
/// rewrites for the origin: an authorizer would decide on a forged address).
/// Why an authorizer may not declare `name` in `upstream_headers`, or None.
fn unsettable(name: &str) -> Option<&'static str> {
    let own = matches!(
        name.to_ascii_lowercase().as_str(),
        "host" | "content-length" | "transfer-encoding" | "connection" | "te" | "upgrade"
    );
    if http_header_name_invalid(name) {
        Some("it is not a valid header name")
    } else if name.contains('_') {
        Some("a name with `_` is read as its `-` spelling by CGI-style origins: spell it with `-`")
    } else if own || unsendable(name).is_some() {
        Some("portcullis sets or removes it itself")
    } else {
        None
    }
}

fn unsendable(name: &str) -> Option<&'static str> {
    let n = name.to_ascii_lowercase().replace('_', "-");
    if matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "x-api-key"
    ) {
        return Some("credentials are never sent; the authorizer is sent the verified identity");
    }
    if n.starts_with("x-forwarded-") || crate::FORWARDED_FIELDS.contains(&n.as_str()) {
        return Some(
            "a client may forge it; decide on the client address with a policy on `context.ip`",
        );
    }
    if n.starts_with("x-portcullis-") {
        return Some("it is portcullis's own, never the client's");
    }
    None
}

/// Why a route's `path` or `path_prefix` (or a rule's path glob) can never equal a request's
/// path as routes see it, or None. Requests are matched in canonical form (see the proxy's
/// `edge::canon`): escapes of unreserved characters decoded and other escapes upper-cased,
/// repeated slashes merged, no dot segments, no backslash, and `;` parameters removed; so a
/// value spelled otherwise would silently never match, and its traffic go to another route.
pub fn uncanonical_path(p: &str) -> Option<String> {
    let b = p.as_bytes();
    if p.contains(';') {
        return Some("routes match the path without `;` parameters (`/a;v=1/b` is `/a/b`): write it without them".into());
    }
    if p.contains('\\') || b.iter().any(|c| !c.is_ascii_graphic()) {
        return Some("a path has no backslash, space, control or non-ASCII character: percent-encode what is not ASCII".into());
    }
    if p.contains("//") {
        return Some("repeated slashes are merged before routing: write one `/`".into());
    }
    if p.split('/').any(|seg| seg == "." || seg == "..") {
        return Some(
            "dot segments are refused before routing: write the path they stand for".into(),
        );
    }
    let windows = |seg: &str| {
        let mut n = seg;
        while let Some(r) = n.strip_suffix('.').or_else(|| n.strip_suffix("%20")) {
            n = r;
        }
        !n.is_empty() && n.len() < seg.len()
    };
    if p.split('/').any(windows) {
        return Some("trailing dots and spaces of a segment are dropped before routing (as Windows reads names): write it without them".into());
    }
    let mut i = 0;
    while let Some(k) = b[i..].iter().position(|&c| c == b'%') {
        let at = i + k;
        let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
        let (Some(h), Some(l)) = (hex(b.get(at + 1)), hex(b.get(at + 2))) else {
            return Some(format!("invalid escape at byte {at}: write `%` as `%25`"));
        };
        let v = (h << 4 | l) as u8;
        let esc = &p[at..at + 3];
        if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
            return Some(format!(
                "`{esc}` is decoded to `{}` before routing: write `{}`",
                v as char, v as char
            ));
        }
        if esc != esc.to_ascii_uppercase() {
            return Some(format!(
                "escapes are upper-cased before routing: write `{}`",
                esc.to_ascii_uppercase()
            ));
        }
        i = at + 3;
    }
    None
}

/// Why a route's `host` (without a leading `*.`) can never equal a request's host as routes
/// see it (lower-case, no port, no trailing dot, IP addresses in their one standard form),
/// or None.
pub fn uncanonical_host(h: &str) -> Option<String> {
    if let Some(name) = h.strip_suffix('.') {
        return Some(format!(
            "the trailing dot is dropped before routing: write `{name}`"
        ));
    }
    if let Some(v6) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return match v6.parse::<std::net::Ipv6Addr>() {
            Ok(a) if a.to_string() == v6 => None,
            Ok(a) => Some(format!("write the address as `[{a}]`")),
            Err(_) => Some("invalid IPv6 address".into()),
        };
    }
    if h.contains(':') {
        return Some("the port is not part of the host routes match: write the name alone, and bind a listener to the port to tell ports apart".into());
    }
    // A name whose last label is all digits is an IPv4 address, which must be dotted
    // decimal without leading zeros (as requests must say it).
    let last = h.rsplit('.').next().unwrap_or(h);
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|r| r.bytes().all(|c| c.is_ascii_hexdigit()));
    if hex || (!last.is_empty() && last.bytes().all(|c| c.is_ascii_digit())) {
        match h.parse::<std::net::Ipv4Addr>() {
            Ok(a) if a.to_string() == h => {}
            _ => return Some("an IPv4 address is written as four decimal numbers without leading zeros, like `10.0.0.5`".into()),
        }
    }
    None
}

fn check_match(src: &Source, at: &str, m: &Match, diags: &mut Vec<Diagnostic>) {
    let n = [
        m.path.is_some(),
        m.path_prefix.is_some(),
        m.path_regex.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if n > 1 {
        diags.push(src.diag(
            at,
            "use only one of `path`, `path_prefix` and `path_regex` in a match",
        ));
    }
    for (k, v) in [("path", &m.path), ("path_prefix", &m.path_prefix)] {
        if let Some(v) = v {
            if !v.starts_with('/') {
                diags.push(src.diag(&format!("{at}.{k}"), format!("`{v}` must start with `/`")));
            } else if let Some(why) = uncanonical_path(v) {
                diags.push(src.diag(&format!("{at}.{k}"), format!("`{v}` never matches: {why}")));
            }
        }
    }
    if let Some(r) = &m.path_regex {
        if let Err(e) = regex::Regex::new(r) {
            diags.push(src.diag(&format!("{at}.path_regex"), format!("invalid regex: {e}")));
        }
    }
    if let Some(h) = &m.host {
        let body = h.strip_prefix("*.").unwrap_or(h);
        if body.is_empty()
            || body.contains('*')
            || body.contains('/')
            || h.chars().any(char::is_whitespace)
        {
            diags.push(src.diag(
                &format!("{at}.host"),
                format!("invalid host `{h}`: write an exact name like `api.example.com` or a wildcard like `*.example.com`"),
            ));
        } else if let Some(why) = uncanonical_host(body) {
            diags.push(src.diag(
                &format!("{at}.host"),
                format!("host `{h}` never matches: {why}"),
            ));
        }
    }
    if let Some(ms) = &m.methods {
        for (i, meth) in ms.iter().enumerate() {
            if meth.is_empty() || !meth.bytes().all(|b| b.is_ascii_uppercase()) {
                diags.push(src.diag(
                    &format!("{at}.methods[{i}]"),
                    format!("invalid method `{meth}`: write it in upper case, like `GET`"),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A root file up to its `routes:` list, with a `dev` provider.
    const GOOD_HEAD: &str = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18080\" }
identity:
  providers: [{ name: dev, kind: dev_issuer }]
backends:
  - name: echo
    servers: [{ address: builtin:echo }]
routes:
";

    const GOOD: &str = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18080\" }
backends:
  - name: echo
    servers: [{ address: builtin:echo }]
routes:
  - { name: all, match: { path_prefix: / }, backend: echo, public: true }
apps:
  include: [\"apps/*.yaml\"]
";

    #[test]
    fn loads_root_and_apps() {
        let d = tempfile::tempdir().unwrap();
        let root = write(d.path(), "p.yaml", GOOD);
        write(
            d.path(),
            "apps/billing.yaml",
            "name: billing\nbackends:\n  - name: v2\n    balance: { hash: header:x-tenant }\n    servers: [{ address: \"127.0.0.1:9\" }]\nroutes:\n  - { name: api, match: { host: billing.example.com }, backend: v2, public: true }\n",
        );
        let c = crate::load(&root).unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[1].id, "billing/api");
        assert_eq!(c.routes[1].backend_id, "billing/v2");
        assert_eq!(
            c.backends[1].spec.balance,
            Balance::Hash(HashOn::Header("x-tenant".into()))
        );
        assert_eq!(c.files.len(), 2);
    }

    /// `workers` is bounded: 0 or a hundred million is a located error (the runtime would
    /// never start with the latter).
    #[test]
    fn workers_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        for (w, msg) in [("0", "at least 1"), ("100000000", "at most 1024")] {
            let text = format!("workers: {w}\n{GOOD}");
            let root = write(d.path(), "p.yaml", &text);
            let e = crate::load(&root).unwrap_err().to_string();
            assert_reported(&e, &loc_of(&root, &text, &format!("workers: {w}"), w), msg);
        }
        let root = write(d.path(), "p.yaml", &format!("workers: 1024\n{GOOD}"));
        crate::load(&root).unwrap();
    }

    /// A workflow definition file is config: editing one changes the version, so a reload
    /// takes it (and checks it).
    #[test]
    fn a_workflow_file_is_part_of_the_version() {
        let d = tempfile::tempdir().unwrap();
        let wf = write(d.path(), "wf/hello.asl.json", "{\"StartAt\": \"A\"}");
        let root = write(
            d.path(),
            "p.yaml",
            "listeners: [{ name: web, bind: \"127.0.0.1:8080\" }]\n\
             workflows: { include: [\"wf/*.asl.json\"] }\n\
             backends: [{ name: b, servers: [{ address: \"127.0.0.1:9\" }] }]\n\
             routes: [{ name: r, match: { path_prefix: / }, backend: b, public: true }]\n",
        );
        let before = crate::load(&root).unwrap();
        std::fs::write(&wf, "{\"StartAt\": \"B\"}").unwrap();
        assert_ne!(crate::load(&root).unwrap().version, before.version);
    }

    /// The admin API's policy files are config: editing one changes the version (so a reload
    /// takes it), and the file watcher is told of them.
    #[test]
    fn an_admin_policy_file_is_part_of_the_version_and_watched() {
        let d = tempfile::tempdir().unwrap();
        let policy = write(
            d.path(),
            "admin.cedar",
            "permit (principal, action, resource);\n",
        );
        let root = write(
            d.path(),
            "p.yaml",
            "listeners: [{ name: web, bind: \"127.0.0.1:8080\" }]\n\
             admin: { bind: \"127.0.0.1:9901\", tokens: [\"0123456789abcdef0123\"], policies: [admin.cedar] }\n\
             backends: [{ name: b, servers: [{ address: \"127.0.0.1:9\" }] }]\n\
             routes: [{ name: r, match: { path_prefix: / }, backend: b, public: true }]\n",
        );
        let before = crate::load(&root).unwrap();
        assert!(
            before.files.iter().any(|f| f.ends_with("admin.cedar")),
            "{:?}",
            before.files
        );
        std::fs::write(
            &policy,
            "forbid (principal == Portcullis::User::\"alice\", action, resource);\n",
        )
        .unwrap();
        assert_ne!(crate::load(&root).unwrap().version, before.version);
    }

    /// A route's keys are located in the file that defines it, for problems found after
    /// loading (a shorthand rule that does not compile).
    #[test]
    fn route_keys_are_located_in_the_routes_own_file() {
        let d = tempfile::tempdir().unwrap();
        let root = write(
            d.path(),
            "p.yaml",
            &format!("{GOOD}identity:\n  providers: [{{ name: dev, kind: dev_issuer }}]\n"),
        );
        let app = write(
            d.path(),
            "apps/billing.yaml",
            "\
name: billing
backends:
  - { name: v2, servers: [{ address: \"127.0.0.1:9\" }] }
routes:
  - { name: open, match: { path_prefix: /open/ }, backend: v2, public: true }
  - name: api
    match: { host: billing.example.com }
    backend: v2
    auth: [dev]
    allow:
      - { groups: [eng] }
      - groups: [ops]
        methods: [GET]
",
        );
        let c = crate::load(&root).unwrap();
        let at = |route: &str, key: &str| {
            let l = c.route_loc(route, key);
            (l.file, l.line, l.col)
        };
        assert_eq!(at("billing/api", "allow[0]"), (app.clone(), 11, 9));
        assert_eq!(at("billing/api", "allow[1]"), (app.clone(), 12, 9));
        assert_eq!(at("billing/api", "allow[1].methods"), (app.clone(), 13, 18));
        assert_eq!(at("billing/api", ""), (app.clone(), 6, 5));
        assert_eq!(at("billing/open", "allow[0]"), (app.clone(), 5, 5));
        // The root file's routes are in the root file.
        assert_eq!(at("default/all", ""), (c.root.clone(), 7, 5));
        // An unknown route falls back to the root file.
        assert_eq!(at("nope/nope", "allow[0]"), (c.root.clone(), 1, 1));
    }

    #[test]
    fn unknown_key_is_located_with_a_suggestion() {
        let d = tempfile::tempdir().unwrap();
        let root = write(
            d.path(),
            "p.yaml",
            &GOOD.replace("backend: echo,", "bakend: echo,"),
        );
        let e = crate::load(&root).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("p.yaml:7:"), "{s}");
        assert!(s.contains("did you mean `backend`"), "{s}");
    }

    #[test]
    fn semantic_errors_are_all_reported_with_positions() {
        let d = tempfile::tempdir().unwrap();
        let text = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18080\" }
  - { name: web, bind: \"127.0.0.1:18080\" }
backends:
  - name: echo
    servers: [{ address: nope }]
routes:
  - name: all
    backend: missing
    listeners: [ghost]
";
        let root = write(d.path(), "p.yaml", text);
        let e = crate::load(&root).unwrap_err();
        let lines: Vec<String> =
            e.0.iter()
                .map(|d| format!("{}:{}", d.line, d.col))
                .collect();
        let s = e.to_string();
        assert!(s.contains("duplicate listener name `web`"), "{s}");
        assert!(s.contains("already bound"), "{s}");
        assert!(s.contains("invalid server address `nope`"), "{s}");
        assert!(s.contains("backend `missing`, which does not exist"), "{s}");
        assert!(s.contains("listener `ghost`"), "{s}");
        assert!(lines.contains(&"9:14".to_string()), "{lines:?}");
        assert!(lines.contains(&"3:13".to_string()), "{lines:?}");
    }

    #[test]
    fn zero_timeouts_are_refused_where_they_are_written() {
        let d = tempfile::tempdir().unwrap();
        let text = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18080\", timeouts: { idle: 0s } }
backends:
  - name: echo
    servers: [{ address: builtin:echo }]
    timeouts: { response: 0ms }
    retries: { per_try_timeout: 0s }
    queue_timeout: 0s
  - name: hc
    servers: [{ address: builtin:echo }]
    health_check: { tcp: true, interval: 0s, timeout: 0s }
routes:
  - { name: all, backend: echo, timeout: 0s, public: true }
authorizers:
  - { name: az, url: \"http://127.0.0.1:9/\", timeout: 0s, on_error: allow }
";
        let root = write(d.path(), "p.yaml", text);
        let e = crate::load(&root).unwrap_err();
        let s = e.to_string();
        for (name, at) in [
            ("timeouts.idle", "p.yaml:2:"),
            ("timeouts.response", "p.yaml:6:"),
            ("retries.per_try_timeout", "p.yaml:7:"),
            ("interval", "p.yaml:11:"),
            ("timeout", "p.yaml:11:"),
            ("timeout", "p.yaml:13:"),
            ("timeout", "p.yaml:15:"),
        ] {
            assert!(s.contains(&format!("`{name}` is 0")), "{name}: {s}");
            assert!(s.contains(at), "{at}: {s}");
        }
        // No queue at all is a choice: a full server answers 503 at once.
        assert!(!s.contains("queue_timeout"), "{s}");
    }

    #[test]
    fn a_header_size_past_what_the_header_timeout_covers_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let text = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18080\", max_header_size: 1MiB }
  - { name: ok, bind: \"127.0.0.1:18081\", max_header_size: 256KiB }
backends:
  - name: echo
    servers: [{ address: builtin:echo }]
routes:
  - { name: all, backend: echo, public: true }
";
        let root = write(d.path(), "p.yaml", text);
        let e = crate::load(&root).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        let s = e.to_string();
        assert!(s.contains("p.yaml:2:"), "{s}");
        assert!(s.contains("`max_header_size` is 1048576 bytes"), "{s}");
    }

    #[test]
    fn bad_duration_names_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let root = write(
            d.path(),
            "p.yaml",
            &GOOD.replace(
                "servers: [{ address: builtin:echo }]",
                "servers: [{ address: builtin:echo }]\n    timeouts: { connect: 10 }",
            ),
        );
        let s = crate::load(&root).unwrap_err().to_string();
        assert!(s.contains("has no unit"), "{s}");
        assert!(s.contains("p.yaml:6:"), "{s}");
    }

    const CANON: &str = "\
listeners:
  - name: web
    bind: \"127.0.0.1:18080\"
    normalize: { merge_slashes: true, escaped_slashes: reject }
    method_override: strip
    upgrades: [websocket]
identity:
  providers:
    - { name: dev, kind: dev_issuer }
backends:
  - name: echo
    servers: [{ address: builtin:echo }]
routes:
  - { name: site, match: { path_prefix: / }, backend: echo, public: true }
  - { name: admin, match: { path_prefix: /admin }, backend: echo, auth: [dev] }
  - name: argo
    match: { path_prefix: /repo/, case_sensitive: true }
    backend: echo
    public: true
    normalize: { escaped_slashes: keep }
    method_override: honor
    upgrades: []
    request_trailers: true
";

    #[test]
    fn canonicalization_settings_load() {
        let d = tempfile::tempdir().unwrap();
        let root = write(d.path(), "p.yaml", CANON);
        let c = crate::load(&root).unwrap();
        let l = &c.listeners[0];
        assert!(l.normalize.merge_slashes);
        assert_eq!(l.normalize.escaped_slashes, EscapedSlashes::Reject);
        assert_eq!(l.upgrades, vec!["websocket".to_string()]);
        let argo = &c.routes[2].spec;
        assert_eq!(argo.normalize.escaped_slashes, Some(EscapedSlashes::Keep));
        assert_eq!(argo.method_override, Some(MethodOverride::Honor));
        assert_eq!(argo.upgrades.as_deref(), Some(&[][..]));
        assert!(argo.request_trailers && argo.matcher.case_sensitive);
        // The public catch-all covers the protected /admin: `check` says why that is safe.
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("public route `default/site`") && w.contains("`default/admin`")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn h2c_and_bad_upgrades_are_refused_with_their_place() {
        let d = tempfile::tempdir().unwrap();
        let root = write(
            d.path(),
            "p.yaml",
            &CANON.replace("upgrades: []", "upgrades: [h2c]"),
        );
        let s = crate::load(&root).unwrap_err().to_string();
        assert!(s.contains("`h2c` cannot be allowed"), "{s}");
        assert!(s.contains("p.yaml:22:"), "{s}");
        let root = write(
            d.path(),
            "p.yaml",
            &CANON.replace("upgrades: [websocket]", "upgrades: [\"web socket\"]"),
        );
        let s = crate::load(&root).unwrap_err().to_string();
        assert!(s.contains("invalid upgrade protocol"), "{s}");
        let root = write(
            d.path(),
            "p.yaml",
            &CANON.replace("escaped_slashes: keep", "escaped_slashes: maybe"),
        );
        let s = crate::load(&root).unwrap_err().to_string();
        assert!(s.contains("p.yaml:20:"), "{s}");
        let root = write(
            d.path(),
            "p.yaml",
            &CANON.replace(
                "normalize: { escaped_slashes: keep }",
                "normalize: { merge_slashes: false }",
            ),
        );
        let s = crate::load(&root).unwrap_err().to_string();
        assert!(s.contains("merge_slashes"), "{s}");
    }

    /// A route `host` or path (or a rule's path glob) spelled otherwise than a request's
    /// canonical form never matches, and its traffic would go to another route: refused,
    /// located, with the spelling to write. So is a route that matches on an identity header.
    #[test]
    fn route_spellings_that_never_match_are_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            ("host: admin.example.com.", "write `admin.example.com`"),
            (
                "host: \"admin.example.com:8443\"",
                "the port is not part of the host",
            ),
            ("host: \"*.corp.example.\"", "write `corp.example`"),
            (
                "host: 10.000.0.5",
                "an IPv4 address is written as four decimal numbers",
            ),
            ("host: 10.5", "an IPv4 address is written"),
            ("host: 10.0.0.0x5", "an IPv4 address is written"),
            ("host: \"[0::1]\"", "write the address as `[::1]`"),
            (
                "path_prefix: /%61dmin/",
                "`%61` is decoded to `a` before routing",
            ),
            ("path_prefix: /ops//", "repeated slashes are merged"),
            ("path_prefix: /internal;", "without `;` parameters"),
            ("path: /a/%2fb", "write `%2F`"),
            ("path_prefix: /a/../b/", "dot segments"),
            ("path_prefix: /admin./", "trailing dots and spaces"),
        ];
        for (m, fix) in cases {
            let text = format!(
                "{GOOD_HEAD}  - {{ name: x, match: {{ {m} }}, backend: echo, public: true }}\n"
            );
            let root = write(d.path(), "p.yaml", &text);
            let e = crate::load(&root)
                .expect_err(&format!("`{m}` should be refused"))
                .to_string();
            let value = m.split_once(": ").unwrap().1;
            assert_reported(&e, &loc_of(&root, &text, m, value), fix);
        }
        for ok in [
            "host: api.example.com",
            "host: \"*.example.com\"",
            "host: 10.0.0.5",
            "host: \"[::1]\"",
            "path_prefix: \"/a%20b/\"",
            "path: /a/%2Fb",
        ] {
            let text = format!(
                "{GOOD_HEAD}  - {{ name: x, match: {{ {ok} }}, backend: echo, public: true }}\n"
            );
            let root = write(d.path(), "p.yaml", &text);
            crate::load(&root).unwrap_or_else(|e| panic!("`{ok}`: {e}"));
        }
        let text = format!(
            "{GOOD_HEAD}  - {{ name: x, match: {{ path_prefix: /x/ }}, backend: echo, public: true, allow: [], deny: [{{ paths: [\"/x;v/**\"] }}] }}\n"
        );
        let root = write(d.path(), "p.yaml", &text);
        let e = crate::load(&root).unwrap_err().to_string();
        assert!(e.contains("path glob `/x;v/**` never matches"), "{e}");

        let text = format!(
            "{GOOD_HEAD}  - {{ name: a, match: {{ path_prefix: /a/ }}, backend: echo, auth: [dev], headers: {{ upstream: {{ X-User: \"{{identity.user}}\" }} }} }}\n  - {{ name: b, match: {{ path_prefix: /a/, headers: {{ x_user: alice }} }}, backend: echo, public: true }}\n"
        );
        let root = write(d.path(), "p.yaml", &text);
        let e = crate::load(&root).unwrap_err().to_string();
        assert!(e.contains("matches on `x_user`, an identity header"), "{e}");

        let text = format!(
            "{GOOD_HEAD}  - {{ name: a, match: {{ path_prefix: /a/ }}, backend: echo, auth: [dev], headers: {{ upstream: {{ X_Remote_User: \"{{identity.user}}\" }} }} }}\n"
        );
        let root = write(d.path(), "p.yaml", &text);
        let e = crate::load(&root).unwrap_err().to_string();
        assert!(
            e.contains("p.yaml:")
                && e.contains("identity header `X_Remote_User` has an underscore")
                && e.contains("spell it `X-Remote-User`"),
            "{e}"
        );
    }

    /// An authorizer is sent neither credentials nor where the request came from as the
    /// client tells it.
    #[test]
    fn an_authorizer_may_not_be_sent_credentials_or_forgeable_addresses() {
        let d = tempfile::tempdir().unwrap();
        let text = format!(
            "authorizers: [{{ name: a, url: \"http://127.0.0.1:9/\", send: [x-tenant, cookie, X-Forwarded-For, x_real_ip, x-api-key], cache: {{ key: [\"header:authorization\"] }} }}]\n{GOOD_HEAD}  - {{ name: x, match: {{ path_prefix: / }}, backend: echo, public: true }}\n"
        );
        let root = write(d.path(), "p.yaml", &text);
        let e = crate::load(&root).unwrap_err().to_string();
        for (needle, why) in [
            ("cookie", "credentials are never sent"),
            ("X-Forwarded-For", "a client may forge it"),
            ("x_real_ip", "a client may forge it"),
            ("x-api-key", "credentials are never sent"),
            ("\"header:authorization\"", "credentials are never sent"),
        ] {
            assert_reported(&e, &loc_of(&root, &text, needle, needle), why);
        }
        assert!(!e.contains("`x-tenant`"), "{e}");

        // Nor may it set a name with `_`, or one portcullis sets itself.
        let text = format!(
            "authorizers: [{{ name: a, url: \"http://127.0.0.1:9/\", upstream_headers: [x-plan, x_tier, X-Real-IP, Host] }}]\n{GOOD_HEAD}  - {{ name: x, match: {{ path_prefix: / }}, backend: echo, public: true }}\n"
        );
        let root = write(d.path(), "p.yaml", &text);
        let e = crate::load(&root).unwrap_err().to_string();
        for (needle, why) in [
            ("x_tier", "spell it with `-`"),
            ("X-Real-IP", "portcullis sets or removes it itself"),
            ("Host", "portcullis sets or removes it itself"),
        ] {
            assert_reported(&e, &loc_of(&root, &text, needle, needle), why);
        }
        assert!(!e.contains("`x-plan`"), "{e}");
    }

    #[test]
    fn routes_that_differ_only_by_case_are_warned_about() {
        let d = tempfile::tempdir().unwrap();
        let root = write(
            d.path(),
            "p.yaml",
            &CANON.replace(
                "  - name: argo\n",
                "  - { name: admin2, match: { path_prefix: /Admin }, backend: echo, auth: [dev] }\n  - name: argo\n",
            ),
        );
        let c = crate::load(&root).unwrap();
        assert!(
            c.warnings.iter().any(|w| w.contains("differ only by case")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn underscores_in_headers_default_to_drop_and_a_route_that_needs_one_is_warned_about() {
        let d = tempfile::tempdir().unwrap();
        let root = write(d.path(), "p.yaml", CANON);
        let c = crate::load(&root).unwrap();
        assert_eq!(
            c.listeners[0].underscores_in_headers,
            UnderscoresInHeaders::Drop
        );
        assert!(!c.warnings.iter().any(|w| w.contains("underscore")));
        let tenant = CANON.replace(
            "match: { path_prefix: /repo/, case_sensitive: true }",
            "match: { path_prefix: /repo/, case_sensitive: true, headers: { x_tenant: \"*\" } }",
        );
        let root = write(d.path(), "p.yaml", &tenant);
        let c = crate::load(&root).unwrap();
        assert!(
            c.warnings.iter().any(|w| w.contains("`default/argo`")
                && w.contains("`x_tenant`")
                && w.contains("listener `web` drops")),
            "{:?}",
            c.warnings
        );
        let allowed = tenant.replace(
            "method_override: strip\n",
            "method_override: strip\n    underscores_in_headers: allow\n",
        );
        let root = write(d.path(), "p.yaml", &allowed);
        let c = crate::load(&root).unwrap();
        assert_eq!(
            c.listeners[0].underscores_in_headers,
            UnderscoresInHeaders::Allow
        );
        assert!(!c.warnings.iter().any(|w| w.contains("underscore")));
        let root = write(
            d.path(),
            "p.yaml",
            &allowed.replace(
                "underscores_in_headers: allow",
                "underscores_in_headers: keep",
            ),
        );
        let s = crate::load(&root).unwrap_err().to_string();
        assert!(
            s.contains("p.yaml:6:") && s.contains("unknown variant `keep`"),
            "{s}"
        );
    }

    /// A root file with every limits key: two stick tables (one keyed by a tuple), two
    /// plans, a protected route with rules of each action and a plan, and a public route
    /// with a plan.
    const LIMITS: &str = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18080\" }
identity:
  providers:
    - { name: dev, kind: dev_issuer }
limits: { store: local }
stick_tables:
  - { name: per_ip, key: src, size: 100000, expire: 10m, store: [http_req_rate(10s), http_err_rate(1m), conn_cur] }
  - name: per_caller
    key: [principal, \"header:X-Tenant\"]
    size: 1000
    store: [http_req_rate(1m), http_err_cnt]
usage_plans:
  - { name: agents, rate: 10/s, burst: 20 }
  - { name: trickle, rate: 600/m }
backends:
  - name: echo
    servers: [{ address: builtin:echo }]
routes:
  - name: api
    match: { path_prefix: /api/ }
    backend: echo
    auth: [dev]
    allow: [{}]
    limits:
      track: [per_ip, per_caller]
      rules:
        - { table: per_ip, counter: http_req_rate(10s), above: 100 }
        - { table: per_ip, counter: http_err_rate(1m), above: 20, action: tarpit, delay: 2s, status: 503 }
        - table: per_caller
          counter: http_req_rate(1m)
          above: 50
          action: mark
          header: X-Rate-Warn
      plan: agents
  - { name: site, match: { path_prefix: / }, backend: echo, public: true, limits: { track: [per_ip], plan: trickle } }
";

    /// `file:line:col` of `needle`, which must occur once inside `context`, which must
    /// occur once in `text`.
    fn loc_of(file: &Path, text: &str, context: &str, needle: &str) -> String {
        assert_eq!(text.matches(context).count(), 1, "`{context}` in:\n{text}");
        let in_ctx = context.find(needle).expect("needle inside its context");
        let at = text.find(context).unwrap() + in_ctx;
        let line = text[..at].matches('\n').count() + 1;
        let col = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("{}:{line}:{col}: ", file.display())
    }

    /// Asserts that one diagnostic is at `loc` and says `msg`.
    fn assert_reported(errors: &str, loc: &str, msg: &str) {
        assert!(
            errors
                .lines()
                .any(|l| l.starts_with(loc) && l.contains(msg)),
            "expected `{loc}…{msg}` in:\n{errors}"
        );
    }

    /// Loads `LIMITS` with `from` replaced by `to` and returns the error.
    fn limits_error(dir: &Path, from: &str, to: &str) -> (PathBuf, String, String) {
        assert_eq!(LIMITS.matches(from).count(), 1, "`{from}`");
        let text = LIMITS.replace(from, to);
        let root = write(dir, "p.yaml", &text);
        let e = crate::load(&root).expect_err("the config should be refused");
        (root, text, e.to_string())
    }

    #[test]
    fn limits_load_with_their_values() {
        use crate::Dur;
        use std::time::Duration;
        let d = tempfile::tempdir().unwrap();
        let root = write(d.path(), "p.yaml", LIMITS);
        let c = crate::load(&root).unwrap();
        assert_eq!(c.limits.store, LimitStore::Local);

        let [ip, caller] = &c.stick_tables[..] else {
            panic!("{:?}", c.stick_tables)
        };
        assert_eq!(ip.name, "per_ip");
        assert_eq!(ip.key, TableKey::One("src".into()));
        assert_eq!(ip.key.parts(), ["src".to_string()]);
        assert_eq!((ip.size, ip.expire.0), (100_000, Duration::from_secs(600)));
        assert_eq!(
            ip.store,
            ["http_req_rate(10s)", "http_err_rate(1m)", "conn_cur"]
        );
        assert_eq!(
            caller.key.parts(),
            ["principal".to_string(), "header:X-Tenant".to_string()]
        );
        // `expire` defaults to 10 minutes.
        assert_eq!(
            (caller.size, caller.expire.0),
            (1000, Duration::from_secs(600))
        );

        let [agents, trickle] = &c.usage_plans[..] else {
            panic!("{:?}", c.usage_plans)
        };
        assert_eq!((agents.name.as_str(), agents.burst), ("agents", Some(20)));
        assert_eq!(
            (agents.rate.count, agents.rate.per),
            (10, Duration::from_secs(1))
        );
        // No burst: the proxy uses the rate's count.
        assert_eq!((trickle.rate.count, trickle.burst), (600, None));
        assert_eq!(trickle.rate.per, Duration::from_secs(60));

        let api = &c.routes[0].spec.limits;
        assert_eq!(api.track, ["per_ip", "per_caller"]);
        assert_eq!(api.plan.as_deref(), Some("agents"));
        let [deny, tarpit, mark] = &api.rules[..] else {
            panic!("{:?}", api.rules)
        };
        assert_eq!(
            (deny.table.as_str(), deny.counter.as_str(), deny.above),
            ("per_ip", "http_req_rate(10s)", 100)
        );
        // `action` defaults to deny, and the status is left to the proxy (429).
        assert_eq!(
            (deny.action, deny.status, deny.delay),
            (LimitAction::Deny, None, None)
        );
        assert_eq!(tarpit.action, LimitAction::Tarpit);
        assert_eq!(tarpit.delay, Some(Dur(Duration::from_secs(2))));
        assert_eq!(tarpit.status, Some(503));
        assert_eq!(mark.action, LimitAction::Mark);
        assert_eq!(mark.header.as_deref(), Some("X-Rate-Warn"));
        assert_eq!(
            (mark.counter.as_str(), mark.above),
            ("http_req_rate(1m)", 50)
        );

        let site = &c.routes[1].spec.limits;
        assert_eq!(site.track, ["per_ip"]);
        assert!(site.rules.is_empty());
        assert_eq!(site.plan.as_deref(), Some("trickle"));

        // Without any limits keys: a local store, no tables, no plans, no route limits.
        let root = write(
            d.path(),
            "p.yaml",
            GOOD.replace("apps:\n  include: [\"apps/*.yaml\"]\n", "")
                .as_str(),
        );
        let c = crate::load(&root).unwrap();
        assert_eq!(c.limits.store, LimitStore::Local);
        assert!(c.stick_tables.is_empty() && c.usage_plans.is_empty());
        let l = &c.routes[0].spec.limits;
        assert!(l.track.is_empty() && l.rules.is_empty() && l.plan.is_none());
    }

    #[test]
    fn the_loc_helper_agrees_with_a_hand_count() {
        let p = Path::new("/x/p.yaml");
        assert_eq!(
            loc_of(p, LIMITS, "plan: agents", "agents"),
            "/x/p.yaml:35:13: "
        );
    }

    /// Each semantic limits error, at the key it is about, with what to write instead.
    #[test]
    fn limits_errors_are_located_with_their_fix() {
        let d = tempfile::tempdir().unwrap();
        // (replace, with, context of the location, the located text, the message)
        let cases: &[(&str, &str, &str, &str, &str)] = &[
            (
                "track: [per_ip, per_caller]",
                "track: [per_ip, per_caller, per_ghost]",
                "per_caller, per_ghost]",
                "per_ghost",
                "route `api` tracks stick table `per_ghost`, which does not exist: define it under `stick_tables:` in the root file (known: [per_ip, per_caller])",
            ),
            (
                "limits: { track: [per_ip], plan: trickle }",
                "limits: { track: [per_ip], rules: [{ table: per_caller, counter: http_err_cnt, above: 5 }], plan: trickle }",
                "table: per_caller, counter: http_err_cnt",
                "per_caller",
                "the rule reads stick table `per_caller`, which the route does not track: add it to `limits.track`",
            ),
            (
                "counter: http_req_rate(10s), above: 100",
                "counter: bytes_in_rate(10s), above: 100",
                "bytes_in_rate(10s), above: 100",
                "bytes_in_rate",
                "stick table `per_ip` does not store `bytes_in_rate(10s)`: use one of [http_req_rate(10s), http_err_rate(1m), conn_cur], or add it to the table's `store`",
            ),
            (
                // Another period of a stored counter is not stored either.
                "counter: http_req_rate(1m)\n          above: 50",
                "counter: http_req_rate(5m)\n          above: 50",
                "http_req_rate(5m)",
                "http_req_rate(5m)",
                "stick table `per_caller` does not store `http_req_rate(5m)`: use one of [http_req_rate(1m), http_err_cnt]",
            ),
            (
                "action: tarpit, delay: 2s,",
                "action: tarpit,",
                "{ table: per_ip, counter: http_err_rate(1m)",
                "{",
                "a tarpit holds the request for `delay` before it answers: add `delay`, like `delay: 2s`",
            ),
            (
                "          header: X-Rate-Warn\n",
                "",
                "- table: per_caller",
                "table",
                "`mark` sets a header for the origin: add `header`, like `header: X-Rate-Warn`",
            ),
            (
                "header: X-Rate-Warn",
                "header: \"X Rate Warn\"",
                "- table: per_caller",
                "table",
                "`mark` sets a header for the origin: add `header`",
            ),
            (
                "status: 503",
                "status: 200",
                "status: 200",
                "200",
                "status 200 is no refusal: use a 4xx or 5xx status, like 429",
            ),
            (
                "usage_plans:",
                "  - { name: per_ip, key: route, size: 10, store: [conn_cur] }\nusage_plans:",
                "name: per_ip, key: route",
                "per_ip",
                "duplicate stick table `per_ip`: table names must be unique",
            ),
            (
                "size: 1000\n",
                "size: 0\n",
                "size: 0",
                "0",
                "a stick table needs a size of at least 1 entry, like `size: 100000`",
            ),
            (
                "key: src,",
                "key: src/200,",
                "key: src/200",
                "src/200",
                "invalid key part `src/200`: the prefix length is 1 to 32 bits for IPv4 (`src/24`) and up to 128 for IPv6 (`src/64`)",
            ),
            (
                "\"header:X-Tenant\"",
                "\"header:bad name\"",
                "key: [principal",
                "[",
                "invalid key part `header:bad name`: `bad name` is not a header name",
            ),
            (
                "key: src,",
                "key: \"cookie:x\",",
                "\"cookie:x\"",
                "\"",
                "invalid key part `cookie:x`: use `src`, `src/<prefix bits>`, `principal`, `api_key`, `route`, `header:<name>` or `claim:<path>`, or a list of them",
            ),
            (
                "plan: agents",
                "plan: gold",
                "plan: gold",
                "gold",
                "route `api` names usage plan `gold`, which does not exist: define it under `usage_plans:` in the root file",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, quota: { limit: 5, per: day, reset: \"25:00\" } }",
                "\"25:00\"",
                "\"",
                "invalid quota reset `25:00`: write a UTC time of day, like `00:00 UTC` or `09:30 UTC`",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, quota: { limit: 5, per: day, reset: \"Sunday 00:00 UTC\" } }",
                "\"Sunday",
                "\"",
                "only a weekly quota names a day",
            ),
            (
                "limits: { store: local }",
                "limits: { store: { redis: { url: \"redis://cache:6379\", sync_interval: 0s } } }",
                "sync_interval: 0s",
                "0s",
                "the sync interval is between 1ms and 60s",
            ),
            (
                "limits: { store: local }",
                "limits: { store: { redis: { url: \"redis://cache:6379\", batch: 30s } } }",
                "batch: 30s",
                "30s",
                "the batch interval is between 1ms and 10s",
            ),
            (
                "limits: { store: local }",
                "limits: { store: { redis: { url: \"${env:PORTCULLIS_TEST_UNSET_REDIS_URL}\" } } }",
                "url: \"$",
                "\"",
                "PORTCULLIS_TEST_UNSET_REDIS_URL",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, quota: { limit: 0, per: month } }",
                "limit: 0",
                "0",
                "a quota of 0 lets nothing through",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, quota: { limit: 1000000000000000, per: month } }",
                "limit: 1000000000000000",
                "1000000000000000",
                "at most 999,999,999,999,999, the largest integer a `RateLimit` header can carry",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 18446744073709551615/s }",
                "rate: 18446744073709551615",
                "18446744073709551615",
                "counts more than 999,999,999,999,999",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, overrides: [{ rate: 1/s }] }",
                "{ rate: 1/s }",
                "{",
                "an override applies to some `routes` or `methods`",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, overrides: [{ methods: [post], rate: 1/s }] }",
                "[post]",
                "post",
                "`post` is no method: write it in capitals, like `POST`",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, overrides: [{ routes: [ghost], rate: 1/s }] }",
                "[ghost]",
                "ghost",
                "the override names route `ghost`, which does not exist",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, assign: { principals: [alice] } }",
                "[alice]",
                "alice",
                "`alice` is no principal: write `provider/subject`",
            ),
            (
                "action: tarpit, delay: 2s,",
                "action: queue,",
                "{ table: per_ip, counter: http_err_rate(1m)",
                "{",
                "`queue` holds the request at most `max_wait` before it refuses it: add `max_wait`, like `max_wait: 2s`",
            ),
            (
                "limits: { store: local }",
                "limits: { store: { redis: { url: \"http://:hunter2@cache:6379\" } } }",
                "url: \"http",
                "\"",
                "`http://***@cache:6379` is no Redis URL: write `redis://host:port`",
            ),
            (
                "limits: { store: local }",
                "limits: { store: { redis: { url: \"redis://cache:6379\", timeout: 10s } } }",
                "timeout: 10s",
                "10s",
                "a Redis timeout is between 1ms and 5s",
            ),
        ];
        for (from, to, context, needle, msg) in cases {
            let (root, text, errors) = limits_error(d.path(), from, to);
            assert_reported(&errors, &loc_of(&root, &text, context, needle), msg);
        }
    }

    /// A weekly quota may start on another day; the Redis URL takes `${env:}` like other
    /// secrets.
    #[test]
    fn a_weekly_reset_day_and_a_redis_url_from_the_environment_load() {
        let d = tempfile::tempdir().unwrap();
        std::env::set_var(
            "PORTCULLIS_TEST_REDIS_URL",
            "redis://:s3cret@127.0.0.1:6390/2",
        );
        let text = LIMITS
            .replace(
                "limits: { store: local }",
                "limits: { store: { redis: { url: \"${env:PORTCULLIS_TEST_REDIS_URL}\" } } }",
            )
            .replace(
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, quota: { limit: 5, per: week, reset: \"Sunday 06:00 UTC\" } }",
            );
        let c = crate::load(&write(d.path(), "p.yaml", &text)).unwrap();
        let LimitStore::Redis(r) = &c.limits.store else {
            panic!("{:?}", c.limits.store)
        };
        assert_eq!(r.url, "redis://:s3cret@127.0.0.1:6390/2");
    }

    /// Semantic errors are all reported at once, each at its own place.
    #[test]
    fn several_limits_errors_are_reported_together() {
        let d = tempfile::tempdir().unwrap();
        let text = LIMITS
            .replace("size: 1000\n", "size: 0\n")
            .replace("status: 503", "status: 200")
            .replace("plan: agents", "plan: gold");
        let root = write(d.path(), "p.yaml", &text);
        let e = crate::load(&root).unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
        let s = e.to_string();
        assert_reported(
            &s,
            &loc_of(&root, &text, "size: 0", "0"),
            "size of at least 1",
        );
        assert_reported(
            &s,
            &loc_of(&root, &text, "status: 200", "200"),
            "no refusal",
        );
        assert_reported(
            &s,
            &loc_of(&root, &text, "plan: gold", "gold"),
            "usage plan `gold`",
        );
    }

    /// Values that cannot be read at all stop parsing with the YAML parser's location.
    #[test]
    fn limits_parse_errors_are_located() {
        let d = tempfile::tempdir().unwrap();
        let cases: &[(&str, &str, &str, &str, &str)] = &[
            (
                "rate: 10/s,",
                "rate: 10/fortnight,",
                "10/fortnight",
                "10",
                "usage_plans[0].rate: invalid rate `10/fortnight`: write a count per unit, like `100/s`, `600/m` or `5000/h`",
            ),
            (
                "burst: 20 }",
                "burst: -5 }",
                "burst: -5",
                "-5",
                "usage_plans[0].burst: invalid type: integer `-5`, expected u32",
            ),
            (
                "    size: 1000\n",
                "    size: 1000\n    expiry: 5m\n",
                "expiry: 5m",
                "expiry",
                "stick_tables[1]: unknown field `expiry`, expected one of `name`, `key`, `size`, `expire`, `store` (did you mean `expire`?)",
            ),
            (
                "above: 100 }",
                "above: 100, limit: 5 }",
                "limit: 5",
                "limit",
                "unknown field `limit`, expected one of `table`, `counter`, `above`, `action`, `status`, `delay`, `header`, `max_wait`, `max_queue`",
            ),
            (
                "action: mark",
                "action: flag",
                "action: flag",
                "flag",
                "unknown variant `flag`, expected one of `deny`, `tarpit`, `mark`, `queue`",
            ),
            (
                "limits: { track: [per_ip], plan: trickle }",
                "limits: { track: [per_ip], plans: trickle }",
                "plans: trickle",
                "plans",
                "unknown field `plans`, expected one of `track`, `rules`, `plan` (did you mean `plan`?)",
            ),
            (
                "limits: { store: local }",
                "limits: { store: redis }",
                "store: redis",
                "redis",
                "unknown limit store `redis`: write `local` (the default) or `{ redis: { url: redis://127.0.0.1:6379 } }`",
            ),
            (
                "limits: { store: local }",
                "limits: { store: { redis: { url: \"redis://127.0.0.1:6379\", pool: 3 } } }",
                "pool: 3",
                "pool",
                "unknown field `pool`",
            ),
            (
                "limits: { store: local }",
                "limits: { store: local, on_store_error: panic }",
                "panic",
                "panic",
                "unknown variant `panic`, expected one of `allow`, `deny`, `local`",
            ),
            (
                "{ name: trickle, rate: 600/m }",
                "{ name: trickle, rate: 600/m, quota: { limit: 5, per: fortnight } }",
                "fortnight",
                "fortnight",
                "unknown variant `fortnight`, expected one of `day`, `week`, `month`",
            ),
        ];
        for (from, to, context, needle, msg) in cases {
            let (root, text, errors) = limits_error(d.path(), from, to);
            assert_eq!(errors.lines().count(), 1, "{errors}");
            assert_reported(&errors, &loc_of(&root, &text, context, needle), msg);
        }
    }

    /// The access log's `format` and `sample` load with their defaults, and a wrong one is
    /// located where it is written, with the fix.
    #[test]
    fn access_log_format_and_sample_are_checked_where_written() {
        let d = tempfile::tempdir().unwrap();
        let base = "\
listeners:
  - { name: web, bind: \"127.0.0.1:18080\" }
backends:
  - { name: echo, servers: [{ address: builtin:echo }] }
routes:
  - { name: all, match: { path_prefix: / }, backend: echo, public: true }
";
        let load = |log: &str| {
            let text = format!("{base}{log}\n");
            let root = write(d.path(), "p.yaml", &text);
            (root.clone(), text, crate::load(&root))
        };
        let (_, _, c) = load("access_log: { path: stdout }");
        let c = c.unwrap();
        assert_eq!(c.access_log.format, AccessLogFormat::Json);
        assert_eq!(c.access_log.sample, 1.0);
        let (_, _, c) = load("access_log: { path: \"off\", format: haproxy, sample: 0.25 }");
        let c = c.unwrap();
        assert_eq!(c.access_log.format, AccessLogFormat::Haproxy);
        assert_eq!(c.access_log.sample, 0.25);
        let (_, _, c) = load("access_log:\n  format: clf\n  sample: 0");
        let c = c.unwrap();
        assert_eq!(c.access_log.format, AccessLogFormat::Clf);
        assert_eq!(c.access_log.sample, 0.0);

        for (log, needle, msg) in [
            (
                "access_log: { path: stdout, format: apache }",
                "apache",
                "unknown access log format `apache`: write `json` (the default), `clf` (Combined Log Format) or `haproxy` (HAProxy's httplog)",
            ),
            (
                "access_log: { format: clf, sample: 1.5 }",
                "1.5",
                "access_log.sample is 1.5: write a fraction from 0 to 1, like `0.1` to log one successful request in ten (errors are always logged",
            ),
            (
                "access_log:\n  sample: -0.1",
                "-0.1",
                "access_log.sample is -0.1: write a fraction from 0 to 1",
            ),
            (
                "access_log: { sample: .nan }",
                ".nan",
                "access_log.sample is NaN: write a fraction from 0 to 1",
            ),
        ] {
            let (root, text, c) = load(log);
            let errors = c.expect_err(log).to_string();
            assert_eq!(errors.lines().count(), 1, "{errors}");
            assert_reported(&errors, &loc_of(&root, &text, log, needle), msg);
        }
    }

    /// A route in an app bundle is checked against the root file's tables and plans, and
    /// its problems are located in the bundle.
    #[test]
    fn limits_errors_in_an_app_bundle_are_located_in_the_bundle() {
        let d = tempfile::tempdir().unwrap();
        let root = write(
            d.path(),
            "p.yaml",
            &format!("{LIMITS}apps:\n  include: [\"apps/*.yaml\"]\n"),
        );
        let app_text = "\
name: agents
backends:
  - { name: echo, servers: [{ address: builtin:echo }] }
routes:
  - name: tools
    match: { host: tools.example.com }
    backend: echo
    auth: [dev]
    allow: [{}]
    limits:
      track: [per_caller]
      rules:
        - { table: per_ip, counter: conn_cur, above: 10 }
        - { table: per_caller, counter: http_err_rate(1m), above: 10 }
      plan: platinum
";
        let app = write(d.path(), "apps/agents.yaml", app_text);
        let e = crate::load(&root).unwrap_err();
        assert_eq!(e.0.len(), 3, "{e}");
        assert!(e.0.iter().all(|d| d.file == app), "{e}");
        let s = e.to_string();
        assert_reported(
            &s,
            &loc_of(&app, app_text, "table: per_ip", "per_ip"),
            "the rule reads stick table `per_ip`, which the route does not track",
        );
        assert_reported(
            &s,
            &loc_of(&app, app_text, "http_err_rate(1m)", "http_err_rate"),
            "stick table `per_caller` does not store `http_err_rate(1m)`",
        );
        assert_reported(
            &s,
            &loc_of(&app, app_text, "plan: platinum", "platinum"),
            "route `tools` names usage plan `platinum`, which does not exist",
        );
        assert!(s.contains(&format!("{}:13:20: ", app.display())), "{s}");

        // An unknown key inside a bundle's rule is the parser's error, in the bundle too.
        let bad = app_text.replace("above: 10 }", "above: 10, dealy: 1s }");
        write(d.path(), "apps/agents.yaml", &bad);
        let s = crate::load(&root).unwrap_err().to_string();
        assert_reported(
            &s,
            &loc_of(&app, &bad, "counter: conn_cur, above: 10, dealy", "dealy"),
            "unknown field `dealy`",
        );
        // Fixed, the bundle loads and keeps its limits.
        write(
            d.path(),
            "apps/agents.yaml",
            &app_text
                .replace("[per_caller]", "[per_ip, per_caller]")
                .replace("http_err_rate(1m)", "http_err_cnt")
                .replace("platinum", "agents"),
        );
        let c = crate::load(&root).unwrap();
        let tools = c.routes.iter().find(|r| r.id == "agents/tools").unwrap();
        assert_eq!(tools.spec.limits.plan.as_deref(), Some("agents"));
        assert_eq!(tools.spec.limits.rules.len(), 2);
    }
}
