//! What the automation crate cannot check alone, because it knows no proxy config: that the
//! backends, servers, routes and stick tables a trigger's actions name exist (and that a table
//! stores what an action sets), and that no action is one this build does not run yet.
//!
//! Only fields written as fixed text are checked; a field with a placeholder (`{data.server}`)
//! is checked when the firing runs, by the control path, and a miss is audited as failed. The
//! names are looked up the way the control path looks them up: a backend or route by its full
//! id (`app/name`) or by a name unique across apps.

use portcullis_automation::config::Action;
use portcullis_automation::template::Template;
use portcullis_automation::{Problem, TriggerCfg};
use portcullis_config::Config;
use portcullis_limits::counter::{Counter, Kind};

/// Actions that the config accepts in shape but this build does not run.
pub const NOT_BUILT: &[(&str, &str)] = &[];

/// Every problem with what `cfgs` (the parsed `triggers:` of `config`) names, as
/// `(path, message)` with paths like `triggers[0].actions[1].switch_route.backend`.
pub fn check(config: &Config, cfgs: &[TriggerCfg]) -> Vec<Problem> {
    let mut p = Vec::new();
    for (i, t) in cfgs.iter().enumerate() {
        for (j, a) in t.actions.iter().enumerate() {
            let at = format!("triggers[{i}].actions[{j}].{}", a.name());
            action(config, a, &at, &mut p);
        }
    }
    p
}

/// Fixed text: the field as it will be used, or `None` when it has a placeholder.
fn fixed(text: &str) -> Option<String> {
    let t = Template::parse(text).ok()?;
    if !t.is_literal() {
        return None;
    }
    // A literal template renders to its text with `{{`/`}}` unescaped.
    Some(text.replace("{{", "{").replace("}}", "}"))
}

fn action(config: &Config, a: &Action, at: &str, p: &mut Vec<Problem>) {
    if let Some((_, why)) = NOT_BUILT.iter().find(|(n, _)| *n == a.name()) {
        p.push((at.to_string(), (*why).to_string()));
        return;
    }
    match a {
        Action::SetServerState(s) => server(config, &s.backend, &s.server, at, p),
        Action::SetServerWeight(s) => server(config, &s.backend, &s.server, at, p),
        Action::SwitchRoute(s) => {
            route(config, &s.route, at, p);
            backend(config, &s.backend, &format!("{at}.backend"), p);
        }
        Action::RestoreRoute(s) => route(config, &s.route, at, p),
        Action::SetTable(s) => {
            let kind = if s.gpc0.is_some() {
                Kind::Gpc0
            } else {
                Kind::Tags
            };
            table(config, &s.table, Some(kind), at, p);
        }
        Action::ClearTable(s) => table(config, &s.table, None, at, p),
        Action::Block(s) => table(config, &s.table, Some(Kind::Gpc0), at, p),
        Action::StartWorkflow(s) => workflow(config, &s.name, at, p),
        _ => {}
    }
}

/// The backend `name` names, or a problem at `at`.
fn backend<'c>(
    config: &'c Config,
    name: &str,
    at: &str,
    p: &mut Vec<Problem>,
) -> Option<&'c portcullis_config::BackendDef> {
    let name = fixed(name)?;
    if let Some(b) = config.backends.iter().find(|b| b.id == name) {
        return Some(b);
    }
    let by_name: Vec<_> = config
        .backends
        .iter()
        .filter(|b| b.id.rsplit_once('/').is_some_and(|(_, n)| n == name))
        .collect();
    match by_name.as_slice() {
        [b] => Some(b),
        [] => {
            let known = config
                .backends
                .iter()
                .map(|b| format!("`{}`", b.id))
                .collect::<Vec<_>>()
                .join(", ");
            p.push((
                at.to_string(),
                format!("no backend `{name}`; the backends are {known}"),
            ));
            None
        }
        many => {
            let ids = many
                .iter()
                .map(|b| format!("`{}`", b.id))
                .collect::<Vec<_>>()
                .join(", ");
            p.push((
                at.to_string(),
                format!("backend name `{name}` is ambiguous ({ids}): write the full id"),
            ));
            None
        }
    }
}

fn server(config: &Config, b: &str, s: &str, at: &str, p: &mut Vec<Problem>) {
    let Some(def) = backend(config, b, &format!("{at}.backend"), p) else {
        return;
    };
    let Some(s) = fixed(s) else { return };
    if !def.server_names.contains(&s) {
        let known = def
            .server_names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ");
        p.push((
            format!("{at}.server"),
            format!(
                "backend `{}` has no server `{s}`; its servers are {known}",
                def.id
            ),
        ));
    }
}

fn route(config: &Config, name: &str, at: &str, p: &mut Vec<Problem>) {
    let Some(name) = fixed(name) else { return };
    let at = format!("{at}.route");
    if config.routes.iter().any(|r| r.id == name) {
        return;
    }
    let by_name = config
        .routes
        .iter()
        .filter(|r| r.id.rsplit_once('/').is_some_and(|(_, n)| n == name))
        .count();
    match by_name {
        1 => {}
        0 => {
            let known = config
                .routes
                .iter()
                .map(|r| format!("`{}`", r.id))
                .collect::<Vec<_>>()
                .join(", ");
            p.push((at, format!("no route `{name}`; the routes are {known}")));
        }
        _ => p.push((
            at,
            format!("route name `{name}` is ambiguous: write the full id, `app/{name}`"),
        )),
    }
}

fn table(config: &Config, name: &str, needs: Option<Kind>, at: &str, p: &mut Vec<Problem>) {
    let Some(name) = fixed(name) else { return };
    let at = format!("{at}.table");
    let Some(t) = config.stick_tables.iter().find(|t| t.name == name) else {
        let known = config
            .stick_tables
            .iter()
            .map(|t| format!("`{}`", t.name))
            .collect::<Vec<_>>()
            .join(", ");
        let m = if known.is_empty() {
            format!("no stick table `{name}`: none is defined (see `stick_tables:`)")
        } else {
            format!("no stick table `{name}`; the tables are {known}")
        };
        p.push((at, m));
        return;
    };
    let Some(kind) = needs else { return };
    let stores = t
        .store
        .iter()
        .filter_map(|c| Counter::parse(c).ok())
        .any(|c| c.kind() == kind);
    if !stores {
        let what = if kind == Kind::Gpc0 { "gpc0" } else { "tags" };
        p.push((
            at,
            format!(
                "stick table `{name}` does not store `{what}`: add `{what}` to its `store` list"
            ),
        ));
    }
}

/// The triggers of `config`, or every problem in them located in the config: their shape and
/// meaning (`portcullis_automation::parse_triggers`), then what their actions name in this
/// config and whether this build runs them (`check`).
pub fn triggers(
    config: &Config,
) -> Result<Vec<portcullis_automation::TriggerCfg>, Vec<portcullis_config::Diagnostic>> {
    let located = |problems: Vec<portcullis_automation::Problem>| {
        problems
            .into_iter()
            .map(|(path, message)| config.root_loc(&path).diag(format!("{path}: {message}")))
            .collect::<Vec<_>>()
    };
    let cfgs = portcullis_automation::parse_triggers(&config.triggers).map_err(located)?;
    let problems = check(config, &cfgs);
    if problems.is_empty() {
        Ok(cfgs)
    } else {
        Err(located(problems))
    }
}

/// The workflow a `start_workflow` action names exists.
fn workflow(config: &Config, name: &str, at: &str, p: &mut Vec<Problem>) {
    let Some(name) = fixed(name) else { return };
    let known: Vec<String> = match &config.workflows {
        None => Vec::new(),
        Some(w) => w
            .files
            .iter()
            .map(|f| crate::workflows::load::name_of(f))
            .chain(w.inline.iter().map(|(n, _)| n.clone()))
            .collect(),
    };
    if !known.contains(&name) {
        let list = if known.is_empty() {
            "there are none: add `workflows:`".to_string()
        } else {
            format!("known: {}", known.join(", "))
        };
        p.push((
            format!("{at}.name"),
            format!("no workflow is called `{name}` ({list})"),
        ));
    }
}
