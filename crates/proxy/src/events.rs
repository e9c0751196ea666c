//! The proxy's events: the bus that carries them to the sinks of `events:` (webhooks with
//! their outbox, NATS, files), the instance's CloudEvents `source`, and the in-process
//! subscription that automation reads. Emitting never waits: a full queue drops the event
//! and counts it (see `portcullis_events::Bus`).
//!
//! The bus is built at start; a reload that changes `events:` takes effect at the next
//! restart (and says so in the log).

use portcullis_config::Config;
use portcullis_events::{Bus, Event, EventsCfg, Source, TypeFilter};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Events queued for automation at most; beyond that they are dropped and counted.
pub const AUTOMATION_QUEUE: usize = 10_000;

/// The bus and this instance's source.
pub struct Events {
    pub bus: Bus,
    pub source: Source,
}

impl Events {
    /// No sinks and no subscribers: emitting costs a check.
    pub fn off(source: Source) -> Events {
        Events {
            bus: Bus::builder().build(),
            source,
        }
    }

    /// The bus `config` describes, started, and (when the config has triggers) the
    /// subscription automation reads. `store` keeps durable webhooks' outboxes.
    pub async fn start(
        config: &Config,
        store: Option<&portcullis_store::Store>,
        source: Source,
    ) -> Result<(Events, Option<mpsc::Receiver<Arc<Event>>>), String> {
        let cfg = events_cfg(config).map_err(|d| d.to_string())?;
        let mut builder = Bus::builder_from_config(&cfg, store)
            .await
            .map_err(|e| e.to_string())?;
        let rx = (!config.triggers.is_null())
            .then(|| builder.subscribe("automation", AUTOMATION_QUEUE, TypeFilter::any()));
        Ok((
            Events {
                bus: builder.build(),
                source,
            },
            rx,
        ))
    }

    /// Publishes `event`; never blocks.
    pub fn emit(&self, event: Event) {
        self.bus.publish(event);
    }
}

/// `events:` as the events engine reads it (none when absent).
pub fn events_cfg(config: &Config) -> Result<EventsCfg, portcullis_config::Diagnostic> {
    if config.events.is_null() {
        return Ok(EventsCfg::default());
    }
    let at = config.root_loc("events");
    let cfg: EventsCfg = serde_json::from_value(config.events.clone())
        .map_err(|e| at.diag(format!("events: {e}")))?;
    cfg.validate()
        .map_err(|e| at.diag(format!("events: {e}")))?;
    Ok(cfg)
}

/// This instance's CloudEvents `source`: `portcullis://<hostname>`.
pub fn instance_source() -> Source {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("pid-{}", std::process::id()));
    Source::new(format!("portcullis://{host}"))
}
