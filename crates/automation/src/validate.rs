//! What a trigger config means, checked: [`validate`] returns every problem with its config
//! path and the fix, and the engine compiles the same config through [`compile`], so what
//! validates is exactly what runs.

use crate::config::{Action, MatchCfg, Posture, TriggerCfg, MAX_HOPS_LIMIT, WEIGHTS};
use crate::event::{DataPath, EventView, Field};
use crate::pattern::Pattern;
use crate::template::{json_strings, Template, Var};
use crate::Problem;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// The largest `threshold`: the engine keeps this many event times per group.
pub const MAX_THRESHOLD: u32 = 1_000;

/// Checks what `cfgs` (the list under `triggers:`) means. Each problem is
/// `(path, message)`, the path like `triggers[2].actions[0].set_server_state.state`.
pub fn validate(cfgs: &[TriggerCfg]) -> Vec<Problem> {
    match compile(cfgs) {
        Ok(_) => Vec::new(),
        Err(p) => p,
    }
}

/// A compiled `match`: every part must match.
#[derive(Clone, Debug)]
pub(crate) struct Matcher {
    type_: Pattern,
    subject: Option<Pattern>,
    data: Vec<(DataPath, Pattern)>,
}

impl Matcher {
    pub fn matches(&self, ev: &EventView<'_>) -> bool {
        self.type_.matches(Some(ev.type_))
            && self
                .subject
                .as_ref()
                .map_or(true, |p| p.matches(ev.subject))
            && self.data.iter().all(|(path, p)| {
                p.matches(
                    path.resolve(ev.data)
                        .and_then(crate::event::value_text)
                        .as_deref(),
                )
            })
    }
}

/// A trigger ready to run.
#[derive(Clone, Debug)]
pub(crate) struct Compiled {
    pub cfg: TriggerCfg,
    pub matcher: Matcher,
    pub expect: Option<Matcher>,
    pub group_by: Option<Field>,
    /// Indexes of the triggers this one inhibits.
    pub inhibits: Vec<usize>,
    pub within: Option<Duration>,
    pub cooldown: Option<Duration>,
}

/// Compiles `cfgs`, or returns every problem. On success, also the order to evaluate them
/// in: a trigger before every trigger it inhibits.
pub(crate) fn compile(cfgs: &[TriggerCfg]) -> Result<(Vec<Compiled>, Vec<usize>), Vec<Problem>> {
    let mut p = Vec::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, t) in cfgs.iter().enumerate() {
        let at = format!("triggers[{i}].name");
        if let Err(e) = check_name(&t.name) {
            p.push((at, e));
        } else if let Some(first) = names.insert(&t.name, i) {
            names.insert(&t.name, first);
            p.push((
                at,
                format!(
                    "duplicate trigger name `{}` (also triggers[{first}]): names must be unique",
                    t.name
                ),
            ));
        }
    }
    let mut out = Vec::with_capacity(cfgs.len());
    for (i, t) in cfgs.iter().enumerate() {
        if let Some(c) = compile_one(t, i, cfgs, &names, &mut p) {
            out.push(c);
        }
    }
    let order = match inhibit_order(cfgs, &names, &mut p) {
        Some(o) if p.is_empty() => o,
        _ => return Err(p),
    };
    Ok((out, order))
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid trigger name `{name}`: use 1 to 128 letters, digits, `-`, `_` or `.`, like `failover-billing`"
        ))
    }
}

fn compile_match(m: &MatchCfg, at: &str, p: &mut Vec<Problem>) -> Option<Matcher> {
    let before = p.len();
    let pat = |text: &str, path: String, p: &mut Vec<Problem>| match Pattern::parse(text) {
        Ok(x) => Some(x),
        Err(e) => {
            p.push((path, e));
            None
        }
    };
    let type_ = pat(&m.type_.0, format!("{at}.type"), p);
    let subject = m
        .subject
        .as_ref()
        .and_then(|s| pat(&s.0, format!("{at}.subject"), p));
    let mut data = Vec::new();
    for (k, v) in &m.data {
        let path = format!("{at}.data.{k}");
        let key = match DataPath::parse(k) {
            Ok(d) if d.0.is_empty() => {
                p.push((
                    path.clone(),
                    "match a field inside `data`, like `server` or `$.target.host`".to_string(),
                ));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                p.push((
                    path.clone(),
                    format!("the key is not a field of `data`: {e}"),
                ));
                None
            }
        };
        if let (Some(k), Some(v)) = (key, pat(&v.0, path, p)) {
            data.push((k, v));
        }
    }
    if p.len() > before {
        return None;
    }
    Some(Matcher {
        type_: type_?,
        subject,
        data,
    })
}

fn compile_one(
    t: &TriggerCfg,
    i: usize,
    cfgs: &[TriggerCfg],
    names: &HashMap<&str, usize>,
    p: &mut Vec<Problem>,
) -> Option<Compiled> {
    let at = format!("triggers[{i}]");
    let before = p.len();
    let matcher = compile_match(&t.match_, &format!("{at}.match"), p);
    let within = t.within.map(|d| d.0);
    if within == Some(Duration::ZERO) {
        p.push((
            format!("{at}.within"),
            "`within` must be longer than 0, like `1m`".to_string(),
        ));
    }
    if t.threshold == 0 {
        p.push((
            format!("{at}.threshold"),
            "threshold must be at least 1 event".to_string(),
        ));
    } else if t.threshold > MAX_THRESHOLD {
        p.push((
            format!("{at}.threshold"),
            format!(
                "threshold {} is over the limit of {MAX_THRESHOLD} events",
                t.threshold
            ),
        ));
    }
    let group_by = t.for_each.as_ref().and_then(|f| match Field::parse(f) {
        Ok(Field::Id) => {
            p.push((
                format!("{at}.for_each"),
                "grouping by `id` puts every event in a group of its own: group by `subject` or `data.<field>`".to_string(),
            ));
            None
        }
        Ok(x) => Some(x),
        Err(e) => {
            p.push((format!("{at}.for_each"), e.replace("`source`, `id` or", "`source` or")));
            None
        }
    });
    let mut expect = None;
    match t.posture {
        Posture::Reactive => {
            if t.expect.is_some() {
                p.push((
                    format!("{at}.expect"),
                    "`expect` is for `posture: proactive` (fire when the expected event does not follow): add `posture: proactive` or remove `expect`".to_string(),
                ));
            }
            if t.threshold > 1 && within.is_none() {
                p.push((
                    format!("{at}.threshold"),
                    format!(
                        "threshold {} needs `within`, the window the events must fall in, like `within: 1m`",
                        t.threshold
                    ),
                ));
            }
            if t.threshold == 1 && within.is_some() {
                p.push((
                    format!("{at}.within"),
                    "`within` has no effect with threshold 1: remove it, or set `threshold` above 1".to_string(),
                ));
            }
        }
        Posture::Proactive => {
            match &t.expect {
                Some(m) => expect = compile_match(m, &format!("{at}.expect"), p),
                None => p.push((
                    at.clone(),
                    "a proactive trigger fires when an expected event does not follow a matching one: add `expect: { type: ... }`, like `expect: { type: dev.portcullis.server.up }`".to_string(),
                )),
            }
            if within.is_none() {
                p.push((
                    at.clone(),
                    "a proactive trigger needs `within`: how long to wait for the `expect` event, like `within: 2m`".to_string(),
                ));
            }
            if t.threshold != 1 {
                p.push((
                    format!("{at}.threshold"),
                    "a proactive trigger starts waiting at the first matching event: remove `threshold`".to_string(),
                ));
            }
        }
    }
    let ae = &t.automation_events;
    match (ae.allow, ae.max_hops) {
        (false, Some(_)) => p.push((
            format!("{at}.automation_events.max_hops"),
            "`max_hops` applies only with `allow: true`: add it, or remove `max_hops`".to_string(),
        )),
        (true, Some(h)) if !(2..=MAX_HOPS_LIMIT).contains(&h) => p.push((
            format!("{at}.automation_events.max_hops"),
            format!(
                "max_hops must be from 2 to {MAX_HOPS_LIMIT}: a firing on an event nobody automated is hop 1, so {h} would {}",
                if h < 2 { "never react to an automation event; use `allow: false` instead" } else { "allow long loops" }
            ),
        )),
        _ => {}
    }
    if t.max_actions_per_minute == Some(0) {
        p.push((
            format!("{at}.max_actions_per_minute"),
            "0 lets the trigger do nothing: set at least 1, or `enforce: false` for a dry run"
                .to_string(),
        ));
    }
    let mut inhibits = Vec::new();
    let mut seen = HashSet::new();
    for (j, n) in t.inhibit.iter().enumerate() {
        let path = format!("{at}.inhibit[{j}]");
        match names.get(n.as_str()) {
            None => {
                let known: Vec<&str> = cfgs
                    .iter()
                    .map(|c| c.name.as_str())
                    .filter(|c| *c != t.name)
                    .collect();
                p.push((
                    path,
                    format!(
                        "no trigger named `{n}`: `inhibit` lists other triggers to mute{}",
                        if known.is_empty() {
                            String::new()
                        } else {
                            format!(" (the others are: {})", known.join(", "))
                        }
                    ),
                ));
            }
            Some(&k) if k == i => p.push((
                path,
                "a trigger cannot inhibit itself: `cooldown` already mutes it".to_string(),
            )),
            Some(&k) => {
                if !seen.insert(k) {
                    p.push((path, format!("`{n}` is listed twice")));
                } else if cfgs[k].for_each != t.for_each {
                    p.push((
                        path,
                        format!(
                            "`{n}` groups by {} and this trigger by {}: inhibition mutes the same group, so both need the same `for_each`",
                            show_group(&cfgs[k].for_each),
                            show_group(&t.for_each)
                        ),
                    ));
                } else {
                    inhibits.push(k);
                }
            }
        }
    }
    if t.actions.is_empty() {
        p.push((
            format!("{at}.actions"),
            "a trigger needs at least one action; to watch without acting, list the actions and set `enforce: false`".to_string(),
        ));
    }
    for (j, a) in t.actions.iter().enumerate() {
        check_action(
            a,
            &format!("{at}.actions[{j}].{}", a.name()),
            t.for_each.is_some(),
            p,
        );
    }
    if p.len() > before {
        return None;
    }
    Some(Compiled {
        cfg: t.clone(),
        matcher: matcher?,
        expect,
        group_by,
        inhibits,
        within,
        cooldown: t.cooldown.map(|d| d.0).filter(|d| !d.is_zero()),
    })
}

fn show_group(f: &Option<String>) -> String {
    match f {
        Some(f) => format!("`{f}`"),
        None => "nothing (no `for_each`)".to_string(),
    }
}

fn check_template(text: &str, at: &str, grouped: bool, p: &mut Vec<Problem>) -> Option<Template> {
    match Template::parse(text) {
        Ok(t) => {
            if !grouped && t.vars().any(|v| *v == Var::Group) {
                p.push((
                    at.to_string(),
                    "`{group}` is the value of `for_each`, and this trigger has none: add `for_each` or use an event field like `{subject}`".to_string(),
                ));
            }
            Some(t)
        }
        Err(e) => {
            p.push((at.to_string(), e));
            None
        }
    }
}

fn check_action(a: &Action, at: &str, grouped: bool, p: &mut Vec<Problem>) {
    for (field, text) in a.text_fields() {
        let path = format!("{at}.{field}");
        if text.trim().is_empty() {
            p.push((path, format!("`{field}` is empty")));
            continue;
        }
        check_template(text, &path, grouped, p);
    }
    for (field, v) in a.json_fields() {
        let mut strings = Vec::new();
        json_strings(v, &format!("{at}.{field}"), &mut strings);
        for (path, s) in strings {
            check_template(s, &path, grouped, p);
        }
    }
    match a {
        Action::SetServerWeight(w) if !WEIGHTS.contains(&w.weight) => p.push((
            format!("{at}.weight"),
            format!(
                "weight must be from {} to {}; to stop traffic, use `set_server_state` with `drain` or `maint`",
                WEIGHTS.start(),
                WEIGHTS.end()
            ),
        )),
        Action::SetTable(s) if s.gpc0.is_some() == s.tag.is_some() => p.push((
            at.to_string(),
            "set_table sets exactly one of `gpc0` (a number) and `tag` (text)".to_string(),
        )),
        Action::Block(b) if b.for_.0.is_zero() => p.push((
            format!("{at}.for"),
            "a block needs a duration longer than 0, like `for: 10m`".to_string(),
        )),
        Action::Emit(e) => {
            let path = format!("{at}.type");
            if e.type_.contains(['{', '}']) {
                p.push((path, "the emitted event's type must be fixed text, not a template, so triggers can match it".to_string()));
            } else if e.type_.starts_with("dev.portcullis.") && !e.type_.starts_with("dev.portcullis.automation.") {
                p.push((
                    path,
                    format!(
                        "`{}` is in the namespace of events portcullis reports itself, which automation may not forge: use your own prefix, like `com.example.`, or `dev.portcullis.automation.`",
                        e.type_
                    ),
                ));
            }
        }
        Action::Webhook(w) => {
            let path = format!("{at}.url");
            match w.url.split_once("://") {
                Some(("http" | "https", rest)) => {
                    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
                    if authority.is_empty() {
                        p.push((
                            path,
                            format!("`{}` has no host", portcullis_config::redact_url(&w.url)),
                        ));
                    } else if authority.contains(['{', '}']) {
                        p.push((
                            path,
                            "placeholders may appear only after the host, so an event cannot choose where the webhook goes".to_string(),
                        ));
                    }
                }
                _ => p.push((
                    path,
                    format!(
                        "`{}` is not an http(s) URL: write `https://host/path`",
                        portcullis_config::redact_url(&w.url)
                    ),
                )),
            }
        }
        _ => {}
    }
}

/// A topological order of the inhibit graph (inhibitors first), or `None` after reporting
/// each cycle.
fn inhibit_order(
    cfgs: &[TriggerCfg],
    names: &HashMap<&str, usize>,
    p: &mut Vec<Problem>,
) -> Option<Vec<usize>> {
    let edges: Vec<Vec<(usize, usize)>> = cfgs
        .iter()
        .map(|t| {
            t.inhibit
                .iter()
                .enumerate()
                .filter_map(|(j, n)| names.get(n.as_str()).map(|&k| (j, k)))
                .collect()
        })
        .collect();
    // 0: unvisited, 1: on the stack, 2: done.
    let mut mark = vec![0u8; cfgs.len()];
    let mut post = Vec::with_capacity(cfgs.len());
    let mut cyclic = false;
    for start in 0..cfgs.len() {
        if mark[start] != 0 {
            continue;
        }
        let mut stack = vec![(start, 0usize)];
        mark[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some(&(j, k)) = edges[node].get(*next) {
                *next += 1;
                match mark[k] {
                    0 => {
                        mark[k] = 1;
                        stack.push((k, 0));
                    }
                    1 if k != node => {
                        cyclic = true;
                        p.push((
                            format!("triggers[{node}].inhibit[{j}]"),
                            format!(
                                "`{}` and `{}` inhibit each other (directly or through others), so neither could be sure to fire: remove one of the inhibitions",
                                cfgs[node].name, cfgs[k].name
                            ),
                        ));
                    }
                    _ => {}
                }
            } else {
                mark[node] = 2;
                post.push(node);
                stack.pop();
            }
        }
    }
    if cyclic {
        return None;
    }
    post.reverse();
    Some(post)
}
