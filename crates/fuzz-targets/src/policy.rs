//! The shorthand target: route `allow:`/`deny:` rules compiled to Cedar. Whatever a rule
//! holds (any user name, group, claim or path glob a config can carry), the Cedar text it
//! compiles to must parse, and must fit the schema, or a config would be refused for a reason
//! its author never wrote.
//!
//! The input is a rule written one condition a line, `field value`:
//!
//! ```text
//! route billing/api
//! effect permit
//! groups eng
//! users alice
//! emails a@example.com
//! providers corp
//! methods GET
//! paths /api/**
//! cidrs 10.0.0.0/8
//! claims dept=ops
//! ```

use cedar_policy::{Policy, PolicySet, Schema, ValidationMode, Validator};
use portcullis_config::AllowRule;
use portcullis_policy::{schema, shorthand};
use std::sync::OnceLock;

fn validator() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| {
        let text = schema::schema_text(&[], &[]);
        let (schema, _) = Schema::from_cedarschema_str(&text).expect("portcullis's schema");
        Validator::new(schema)
    })
}

/// A rule, one condition a line (see the module doc): compiled, it parses and validates.
pub fn shorthand(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut rule = AllowRule::default();
    let mut route = "app/route".to_string();
    let mut effect = "permit";
    for line in text.split('\n') {
        let Some((field, value)) = line.split_once(' ') else {
            continue;
        };
        let value = value.to_string();
        match field {
            "route" => route = value,
            "effect" => {
                effect = if value == "forbid" {
                    "forbid"
                } else {
                    "permit"
                }
            }
            "groups" => rule.groups.push(value),
            "users" => rule.users.push(value),
            "emails" => rule.emails.push(value),
            "providers" => rule.providers.push(value),
            "methods" => rule.methods.push(value),
            "paths" => rule.paths.push(value),
            "cidrs" => {
                if let Ok(net) = value.parse() {
                    rule.cidrs.push(net);
                }
            }
            "claims" => {
                let (k, v) = value.split_once('=').unwrap_or((&value, ""));
                rule.claims.insert(k.to_string(), v.to_string());
            }
            _ => {}
        }
    }
    let cedar = shorthand::compile(&rule, effect, &route, false);
    let policy = Policy::parse(None, &cedar)
        .unwrap_or_else(|e| panic!("the compiled rule does not parse: {e}\n{cedar}"));
    let mut set = PolicySet::new();
    set.add(policy).expect("one policy");
    let result = validator().validate(&set, ValidationMode::Strict);
    let errors: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "the compiled rule does not fit the schema: {errors:?}\n{cedar}"
    );
}
