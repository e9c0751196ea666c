//! portcullis-events: what happens in the proxy, as [CloudEvents 1.0], published on a bus
//! whose sinks never hold up a request.
//!
//! * **Events** ([`Event`]): `id`, `source` (the instance), `type`
//!   (`dev.portcullis.server.down`, …), `time`, `subject` (the resource), JSON `data`, and
//!   the extension `causedby` (the id of the event that led to this one, so loops show).
//!   [`Source`] builds the proxy's events with typed constructors; [`types`] lists every
//!   type and documents the shape of its `data`.
//! * **Formats** ([`http`]): structured mode (`application/cloudevents+json`) and binary mode
//!   (`ce-*` headers, the body is `data`), both ways. [`inbound::parse`] reads what a client
//!   posts (either mode, a batch, or an [Alertmanager](alertmanager) webhook payload) with a
//!   clear [`ParseError`] and an HTTP status for each way it can be wrong.
//! * **Aggregation** ([`Aggregator`]): request-level happenings (denials, limit hits) are
//!   counted per key in a window and reported as one event per window and key.
//! * **The bus** ([`Bus`]): [`Bus::publish`] never blocks and never fails. Each sink has a
//!   bounded queue (full: the event is dropped for that sink and counted) and runs on its own
//!   task. Sinks: a signed [webhook](sinks::webhook) (Standard Webhooks, retries with backoff,
//!   a durable outbox in the embedded store), [NATS](sinks::nats) (core or JetStream), and
//!   [JSON lines](sinks::lines) to a file or stdout. In-process consumers (the automation
//!   engine) [subscribe](BusBuilder::subscribe) with a queue of their own.
//! * **Config** ([`config`]): the `events:` block, as plain serde structs.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use portcullis_events::{types, Bus, ServerChange, ServerData, Source, TypeFilter};
//!
//! let mut builder = Bus::builder();
//! let mut rx = builder.subscribe("automation", 1024, TypeFilter::any());
//! let bus = builder.build();
//!
//! let source = Source::new("portcullis://edge-1");
//! bus.publish(source.server(
//!     ServerChange::Down,
//!     ServerData::new("billing-v2", "10.0.0.11:8080", "3 failed health checks", 1, 2),
//! ));
//! let event = rx.recv().await.unwrap();
//! assert_eq!(event.type_, types::SERVER_DOWN);
//! assert_eq!(event.subject.as_deref(), Some("billing-v2/10.0.0.11:8080"));
//! # }
//! ```
//!
//! [CloudEvents 1.0]: https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md

pub mod aggregate;
pub mod alertmanager;
pub mod bus;
pub mod config;
mod error;
pub mod event;
pub mod http;
pub mod inbound;
pub mod signature;
pub mod sinks;
pub mod types;

pub use aggregate::{Aggregator, Tally};
pub use bus::{Bus, BusBuilder, Sink, SinkContext, SinkCounts, SinkStats, Tap, TypeFilter};
pub use config::{EventsCfg, SinkCfg, SinkKind};
pub use error::{EventsError, ParseError};
pub use event::{rfc3339, Event, Source};
pub use signature::WebhookSecret;
pub use types::{
    ActionResult, AuditOverload, AutomationAction, BackendData, CertificateExpiring,
    ConfigRejected, ConfigReloaded, JwksRefreshFailed, Limit, ServerChange, ServerData,
    WindowCount,
};
