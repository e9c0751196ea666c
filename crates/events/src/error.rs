//! The crate's errors: [`EventsError`] for setting up the bus and its sinks (each message
//! names the sink and says what to fix), and [`ParseError`] for an inbound event that is not
//! acceptable (each maps to the HTTP status the proxy answers with).

use std::path::PathBuf;

/// A bus or a sink that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// A config value that cannot work.
    #[error("events sink `{sink}`: {reason}")]
    Config { sink: String, reason: String },
    /// The `events:` block as a whole (two sinks with one name, …).
    #[error("events: {0}")]
    Events(String),
    /// The JSON-lines file cannot be opened for appending.
    #[error(
        "events sink `{sink}`: cannot open {} for appending: {source}; make its directory \
         writable by the user portcullis runs as, or choose another `path`",
        path.display()
    )]
    File {
        sink: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The NATS client cannot be set up.
    #[error("events sink `{sink}`: NATS at `{url}`: {reason}")]
    Nats {
        sink: String,
        url: String,
        reason: String,
    },
}

/// Why an inbound event (or an Alertmanager payload) was refused. [`ParseError::status`] is
/// the HTTP status to answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the body is {size} bytes, more than the {max} bytes allowed")]
    TooLarge { size: usize, max: usize },
    #[error(
        "Content-Type `{found}` is not an event: send a structured CloudEvent \
         (`application/cloudevents+json`), a batch (`application/cloudevents-batch+json`), \
         a binary-mode CloudEvent (`ce-specversion`, `ce-id`, `ce-source`, `ce-type` headers \
         with a JSON body), or an Alertmanager webhook payload (`application/json`)"
    )]
    ContentType { found: String },
    #[error("{what} is not JSON: {reason}")]
    NotJson { what: &'static str, reason: String },
    #[error("a structured CloudEvent is a JSON object, not {found}")]
    NotAnObject { found: &'static str },
    #[error("the required attribute `{0}` is missing")]
    Missing(&'static str),
    #[error("specversion is `{found}`, but only CloudEvents `1.0` is accepted")]
    SpecVersion { found: String },
    #[error("the attribute `{attribute}` {reason}")]
    Attribute { attribute: String, reason: String },
    #[error(
        "`{attribute}` is `{value}`, not an RFC 3339 time (like 2026-01-31T12:00:00Z): {reason}"
    )]
    Time {
        attribute: String,
        value: String,
        reason: String,
    },
    #[error(
        "datacontenttype `{found}` is not JSON: portcullis takes events whose data is JSON \
         (`application/json`)"
    )]
    DataContentType { found: String },
    #[error("`data_base64` (binary data) is not accepted: send the data as JSON in `data`")]
    DataBase64,
    #[error("event {index} of the batch: {error}")]
    InBatch {
        index: usize,
        error: Box<ParseError>,
    },
    #[error("an empty batch has no events")]
    EmptyBatch,
    #[error("not an Alertmanager webhook payload: {0}")]
    Alertmanager(String),
}

impl ParseError {
    /// The HTTP status for this refusal: 413 for a body too large, 415 for a content type
    /// that is not taken, 400 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            ParseError::TooLarge { .. } => 413,
            ParseError::ContentType { .. } | ParseError::DataContentType { .. } => 415,
            ParseError::InBatch { error, .. } => error.status(),
            _ => 400,
        }
    }
}
