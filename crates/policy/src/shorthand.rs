//! Shorthand rules (`allow:` and `deny:` on a route) compiled to Cedar. Each rule becomes one
//! policy, a `permit` for `allow` and a `forbid` for `deny`, scoped to the route, with an id
//! that names where it came from: `app/route/allow[1]` (1-based). Within a rule every listed
//! condition must hold; a list matches if any of its entries does.

use portcullis_config::AllowRule;

/// A Cedar string literal.
pub fn lit(s: &str) -> String {
    format!("\"{}\"", s.escape_default())
}

fn any(conds: Vec<String>) -> Option<String> {
    match conds.len() {
        0 => None,
        1 => conds.into_iter().next(),
        _ => Some(format!("({})", conds.join(" || "))),
    }
}

/// Cedar `like` patterns use `*` for any characters, `/` included. `"`, `\` and control
/// characters are escaped as in any Cedar string (a raw CR does not parse; found by fuzzing,
/// docs/reliability.md).
fn like_pattern(glob: &str) -> String {
    let g = glob.replace("**", "*");
    let mut out = String::with_capacity(g.len() + 2);
    out.push('"');
    for c in g.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path glob as a Cedar condition: `**` matches any characters, `*` any characters but
/// `/`. Cedar's `like` only knows "any characters", so a glob with a single `*` also pins the
/// number of `/` in the path: its literal slashes must be all the path has, which leaves
/// none for the `*`s to match. (Config validation rejects globs that mix `*` and `**`.)
///
/// It reads `context.route_path`, the path as the route matched it (without `;`
/// parameters, lower-case on a route that matches case-insensitively, with the glob
/// lower-cased to match): a `deny` on `/admin/**` also covers `/ADMIN/x` and
/// `/admin;v=1/x`, which the route takes and many origins serve as `/admin/x`.
pub fn path_condition(glob: &str, case_sensitive: bool) -> String {
    let glob = if case_sensitive {
        glob.to_string()
    } else {
        glob.to_ascii_lowercase()
    };
    let like = format!("context.route_path like {}", like_pattern(&glob));
    // A trailing `/**` also matches the directory itself (`/admin/**` matches `/admin`), as
    // Spring's and Ant's path patterns do: a `deny` on `/admin/**` must keep `/admin` too,
    // which origins serve as the directory's index.
    if let Some(dir) = glob.strip_suffix("/**").filter(|d| !d.contains('*')) {
        return format!("({like} || context.route_path == {})", like_pattern(dir));
    }
    if glob.contains("**") || !glob.contains('*') {
        return like;
    }
    let more_slashes = vec!["*"; glob.matches('/').count() + 2].join("/");
    format!("({like} && !(context.route_path like \"{more_slashes}\"))")
}

/// A method as a Cedar condition: its own action, or for a method without one (`PROPFIND`,
/// `PURGE`: they share the action `OTHER`), that action and this very method.
fn method_condition(m: &str) -> String {
    match crate::schema::action_for(m) {
        "OTHER" => format!(
            "(action == Portcullis::Action::\"OTHER\" && context.method == {})",
            lit(m)
        ),
        a => format!("action == Portcullis::Action::{}", lit(a)),
    }
}

/// The Cedar text of one rule, on a route that matches paths case-sensitively or not.
pub fn compile(rule: &AllowRule, effect: &str, route_id: &str, case_sensitive: bool) -> String {
    let mut conds = Vec::new();
    conds.extend(any(rule
        .groups
        .iter()
        .map(|g| format!("principal in Portcullis::Group::{}", lit(g)))
        .collect()));
    conds.extend(any(rule
        .users
        .iter()
        .map(|u| {
            format!(
                "(principal.user == {0} || principal.subject == {0})",
                lit(u)
            )
        })
        .collect()));
    conds.extend(any(rule
        .emails
        .iter()
        .map(|e| {
            format!(
                "(principal has email && principal.email == {})",
                lit(&e.to_ascii_lowercase())
            )
        })
        .collect()));
    conds.extend(any(rule
        .providers
        .iter()
        .map(|p| format!("principal.provider == {}", lit(p)))
        .collect()));
    conds.extend(any(rule
        .methods
        .iter()
        .map(|m| method_condition(m))
        .collect()));
    conds.extend(any(rule
        .paths
        .iter()
        .map(|p| path_condition(p, case_sensitive))
        .collect()));
    conds.extend(any(rule
        .cidrs
        .iter()
        .map(|c| format!("context.ip.isInRange(ip({}))", lit(&c.to_string())))
        .collect()));
    for (k, v) in &rule.claims {
        conds.push(format!(
            "(principal.hasTag({0}) && principal.getTag({0}) == {1})",
            lit(k),
            lit(v)
        ));
    }
    let head = format!(
        "{effect}(principal, action, resource == Portcullis::Route::{})",
        lit(route_id)
    );
    if conds.is_empty() {
        format!("{head};")
    } else {
        format!("{head} when {{ {} }};", conds.join(" && "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_compile_to_cedar() {
        let r = AllowRule {
            groups: vec!["eng".into(), "ops".into()],
            methods: vec!["GET".into()],
            paths: vec!["/api/**".into()],
            cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        };
        let t = compile(&r, "permit", "billing/api", false);
        assert_eq!(
            t,
            "permit(principal, action, resource == Portcullis::Route::\"billing/api\") when { (principal in Portcullis::Group::\"eng\" || principal in Portcullis::Group::\"ops\") && action == Portcullis::Action::\"GET\" && (context.route_path like \"/api/*\" || context.route_path == \"/api\") && context.ip.isInRange(ip(\"10.0.0.0/8\")) };"
        );
        cedar_policy::Policy::parse(None, &t).unwrap();
        let empty = compile(&AllowRule::default(), "forbid", "a/b", false);
        assert_eq!(
            empty,
            "forbid(principal, action, resource == Portcullis::Route::\"a/b\");"
        );
        let quote = compile(
            &AllowRule {
                users: vec!["x\"y".into()],
                ..Default::default()
            },
            "permit",
            "a/b",
            false,
        );
        cedar_policy::Policy::parse(None, &quote).unwrap();
    }

    #[test]
    fn single_star_stays_within_a_segment() {
        assert_eq!(
            path_condition("/api/**", true),
            "(context.route_path like \"/api/*\" || context.route_path == \"/api\")"
        );
        assert_eq!(
            path_condition("/a/**/b", true),
            "context.route_path like \"/a/*/b\""
        );
        assert_eq!(
            path_condition("/api/x", true),
            "context.route_path like \"/api/x\""
        );
        assert_eq!(
            path_condition("/api/*", true),
            "(context.route_path like \"/api/*\" && !(context.route_path like \"*/*/*/*\"))"
        );
        let r = AllowRule {
            paths: vec!["/files/*.pdf".into()],
            ..Default::default()
        };
        cedar_policy::Policy::parse(None, compile(&r, "permit", "a/b", false)).unwrap();
    }

    /// A route that matches case-insensitively gets a lower-case path, so its globs are
    /// lower-cased too; a case-sensitive route's are kept as written.
    #[test]
    fn globs_follow_the_routes_case() {
        assert_eq!(
            path_condition("/Admin/**", false),
            "(context.route_path like \"/admin/*\" || context.route_path == \"/admin\")"
        );
        assert_eq!(
            path_condition("/Admin/**", true),
            "(context.route_path like \"/Admin/*\" || context.route_path == \"/Admin\")"
        );
    }

    /// A method without an action of its own names itself: allowing `PROPFIND` does not
    /// allow every method that shares the action `OTHER`.
    #[test]
    fn a_method_without_its_own_action_is_named() {
        let r = AllowRule {
            methods: vec!["GET".into(), "PROPFIND".into()],
            ..Default::default()
        };
        let t = compile(&r, "permit", "a/b", false);
        assert!(
            t.contains("(action == Portcullis::Action::\"GET\" || (action == Portcullis::Action::\"OTHER\" && context.method == \"PROPFIND\"))"),
            "{t}"
        );
        cedar_policy::Policy::parse(None, &t).unwrap();
    }
}
