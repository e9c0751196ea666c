//! Helpers shared by the tests: triggers from YAML, and owned events to view.

#![allow(dead_code)]

use portcullis_automation::{
    parse_triggers, Engine, EngineOptions, EventView, Timestamp, TriggerCfg,
};
use serde_json::Value;
use std::time::Duration;

/// The trigger list written in YAML (the value of `triggers:`).
pub fn triggers(yaml: &str) -> Vec<TriggerCfg> {
    let v: Value = serde_yaml_ng::from_str(yaml).expect("test YAML parses");
    match parse_triggers(&v) {
        Ok(t) => t,
        Err(p) => panic!("config problems: {p:#?}"),
    }
}

pub fn engine(yaml: &str) -> Engine {
    Engine::new(triggers(yaml)).expect("engine")
}

pub fn engine_with(yaml: &str, opts: EngineOptions) -> Engine {
    Engine::with_options(triggers(yaml), opts).expect("engine")
}

/// The problems `parse_triggers` finds in `yaml`.
pub fn problems(yaml: &str) -> Vec<(String, String)> {
    let v: Value = serde_yaml_ng::from_str(yaml).expect("test YAML parses");
    parse_triggers(&v).err().unwrap_or_default()
}

/// Seconds after a fixed start, as a timestamp.
pub fn t(secs: f64) -> Timestamp {
    Timestamp::from_secs(1_700_000_000).plus(Duration::from_secs_f64(secs))
}

/// An event the test owns; `view()` lends it to the engine.
#[derive(Clone, Debug)]
pub struct Ev {
    pub id: String,
    pub type_: String,
    pub subject: Option<String>,
    pub data: Value,
    pub causedby: Option<String>,
    pub hops: u32,
    pub time: Timestamp,
}

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Ev {
    /// An event of `type_` at `time`, with a fresh id.
    pub fn new(type_: &str, time: Timestamp) -> Ev {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ev {
            id: format!("ev-{n}"),
            type_: type_.to_string(),
            subject: None,
            data: Value::Null,
            causedby: None,
            hops: 0,
            time,
        }
    }

    pub fn subject(mut self, s: &str) -> Ev {
        self.subject = Some(s.to_string());
        self
    }

    pub fn data(mut self, d: Value) -> Ev {
        self.data = d;
        self
    }

    pub fn id(mut self, id: &str) -> Ev {
        self.id = id.to_string();
        self
    }

    pub fn caused_by(mut self, cause: &str, hops: u32) -> Ev {
        self.causedby = Some(cause.to_string());
        self.hops = hops;
        self
    }

    pub fn view(&self) -> EventView<'_> {
        EventView {
            id: &self.id,
            type_: &self.type_,
            source: "/portcullis/test",
            subject: self.subject.as_deref(),
            data: &self.data,
            causedby: self.causedby.as_deref(),
            hops: self.hops,
            time: self.time,
        }
    }
}
