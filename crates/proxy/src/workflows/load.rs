//! The workflow definitions of a config: each `workflows.include` file (`NAME.asl.json`, or
//! `NAME.asl.yaml` / `.yml`, named after the file) and each inline `workflows.definitions`
//! entry, parsed and validated. Every problem is located at its file:line:col: a syntax error
//! where the parser stopped, a semantic one (a dangling `Next`, an unreachable state) at the
//! key the problem's path names.

use portcullis_automation::workflow::runner::Loaded;
use portcullis_config::spans::SpanIndex;
use portcullis_config::{Config, Diagnostic};
use std::collections::HashSet;
use std::path::Path;

/// Every definition of `config`, or every problem.
pub fn definitions(config: &Config) -> Result<Vec<Loaded>, Vec<Diagnostic>> {
    let Some(w) = &config.workflows else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut names = HashSet::new();
    for f in &w.files {
        let name = name_of(f);
        if !names.insert(name.clone()) {
            problems.push(diag(
                f,
                1,
                1,
                format!("a second workflow is named `{name}`: rename the file"),
            ));
            continue;
        }
        match file(f, &name) {
            Ok(l) => out.push(l),
            Err(d) => problems.extend(d),
        }
    }
    for (name, json) in &w.inline {
        let at = format!("workflows.definitions.{name}");
        if !valid_name(name) {
            problems.push(config.root_loc(&at).diag(format!(
                "invalid workflow name `{name}`: use 1 to 64 letters, digits, `-`, `_` or `.`"
            )));
            continue;
        }
        if !names.insert(name.clone()) {
            problems.push(config.root_loc(&at).diag(format!(
                "a workflow file is also named `{name}`: rename one"
            )));
            continue;
        }
        match Loaded::new(name, json.clone()) {
            Ok(l) => out.push(l),
            Err(ps) => problems.extend(ps.into_iter().map(|(p, m)| {
                let path = if p.is_empty() {
                    at.clone()
                } else {
                    format!("{at}.{p}")
                };
                config
                    .root_loc(&path)
                    .diag(format!("workflow `{name}`: {m}"))
            })),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// A definition file's workflow name: its file name without `.asl.json` (or `.json`, `.yaml`…).
pub fn name_of(f: &Path) -> String {
    let n = f
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for ext in [
        ".asl.json",
        ".asl.yaml",
        ".asl.yml",
        ".json",
        ".yaml",
        ".yml",
    ] {
        if let Some(s) = n.strip_suffix(ext) {
            return s.to_string();
        }
    }
    n
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

fn diag(f: &Path, line: usize, col: usize, message: String) -> Diagnostic {
    Diagnostic {
        file: f.to_path_buf(),
        line,
        col,
        message,
    }
}

/// Reads, parses and validates one definition file.
pub fn file(f: &Path, name: &str) -> Result<Loaded, Vec<Diagnostic>> {
    if !valid_name(name) {
        return Err(vec![diag(f, 1, 1, format!("invalid workflow name `{name}` (from the file name): use 1 to 64 letters, digits, `-`, `_` or `.`"))]);
    }
    let text = std::fs::read_to_string(f).map_err(|e| {
        vec![diag(
            f,
            1,
            1,
            format!("cannot read the workflow definition: {e}"),
        )]
    })?;
    let json = parse_text(f, &text)?;
    Loaded::new(name, json).map_err(|ps| {
        let spans = SpanIndex::build(&text);
        ps.into_iter()
            .map(|(p, m)| {
                let pos = spans.pos(&p);
                diag(
                    f,
                    pos.line,
                    pos.col,
                    format!(
                        "workflow `{name}`: {}{m}",
                        if p.is_empty() {
                            String::new()
                        } else {
                            format!("{p}: ")
                        }
                    ),
                )
            })
            .collect()
    })
}

/// JSON for `.json` files, YAML otherwise; a syntax error at its line and column.
pub fn parse_text(f: &Path, text: &str) -> Result<serde_json::Value, Vec<Diagnostic>> {
    let is_json = f.extension().is_some_and(|e| e == "json");
    if is_json {
        let v = serde_json::from_str(text).map_err(|e| {
            vec![diag(
                f,
                e.line().max(1),
                e.column().max(1),
                format!("not valid JSON: {e}"),
            )]
        })?;
        let spans = SpanIndex::build(text);
        match spans.duplicates() {
            [] => Ok(v),
            dups => Err(dups
                .iter()
                .map(|(p, at)| diag(f, at.line, at.col, SpanIndex::duplicate_message(p)))
                .collect()),
        }
    } else {
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
            let (l, c) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            vec![diag(f, l, c, format!("not valid YAML: {e}"))]
        })?;
        serde_json::to_value(v).map_err(|e| {
            vec![diag(
                f,
                1,
                1,
                format!("not a JSON-compatible document: {e}"),
            )]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_named_after_itself_and_its_problems_are_located() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("drain.asl.json");
        std::fs::write(&f, "{\n  \"StartAt\": \"A\",\n  \"States\": {\n    \"A\": { \"Type\": \"Pass\", \"Next\": \"Nowhere\" }\n  }\n}\n").unwrap();
        assert_eq!(name_of(&f), "drain");
        let e = file(&f, "drain").unwrap_err();
        assert_eq!((e[0].line, e[0].file.clone()), (4, f.clone()), "{e:?}");
        assert!(e[0].message.contains("Nowhere"), "{e:?}");
        std::fs::write(&f, "{\n  \"StartAt\": \"A\",\n  \"States\": { oops }\n}\n").unwrap();
        let e = file(&f, "drain").unwrap_err();
        assert_eq!(e[0].line, 3, "{e:?}");
        assert!(e[0].message.contains("not valid JSON"), "{e:?}");
        let y = dir.path().join("ok.asl.yaml");
        std::fs::write(&y, "StartAt: A\nStates:\n  A: { Type: Succeed }\n").unwrap();
        assert_eq!(file(&y, "ok").unwrap().name, "ok");
    }

    /// A state named twice is refused where the second one is, in JSON (whose parser keeps
    /// the last) as in YAML (whose parser refuses it).
    #[test]
    fn a_state_named_twice_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("twice.asl.json");
        std::fs::write(&f, "{\n  \"StartAt\": \"A\",\n  \"States\": {\n    \"A\": { \"Type\": \"Succeed\" },\n    \"A\": { \"Type\": \"Fail\" }\n  }\n}\n").unwrap();
        let e = file(&f, "twice").unwrap_err();
        assert_eq!((e[0].line, e[0].col), (5, 5), "{e:?}");
        assert!(e[0].message.contains("`States.A` is given twice"), "{e:?}");
        let y = dir.path().join("twice.asl.yaml");
        std::fs::write(
            &y,
            "StartAt: A\nStates:\n  A: { Type: Succeed }\n  A: { Type: Fail }\n",
        )
        .unwrap();
        let e = file(&y, "twice").unwrap_err();
        assert!(e[0].message.contains("duplicate entry"), "{e:?}");
    }
}
