//! The sinks: a signed [`webhook`] with retries and an outbox, [`nats`] (core or
//! JetStream), and JSON [`lines`] to a file or stdout; and [`Bus::from_config`], which
//! builds a bus with the sinks of an `events:` block.

pub mod lines;
pub mod nats;
mod outbox;
pub mod webhook;

use crate::bus::{Bus, TypeFilter};
use crate::config::{EventsCfg, SinkKind};
use crate::error::EventsError;
use portcullis_store::Store;

impl Bus {
    /// Builds the bus `cfg` describes and starts its sinks; must run inside a tokio runtime.
    /// `store` is the embedded store, where durable webhooks keep their outbox (a durable
    /// webhook without one is an error). At start each durable webhook delivers what its
    /// outbox still holds from before.
    ///
    /// A NATS server that is down at start is not an error: the client keeps connecting in
    /// the background, and the sink's queue absorbs (then drops and counts) in the meantime.
    pub async fn from_config(cfg: &EventsCfg, store: Option<&Store>) -> Result<Bus, EventsError> {
        Ok(Bus::builder_from_config(cfg, store).await?.build())
    }

    /// The builder [`Bus::from_config`] builds, for a caller that adds in-process
    /// subscribers (automation) before it starts the bus.
    pub async fn builder_from_config(
        cfg: &EventsCfg,
        store: Option<&Store>,
    ) -> Result<crate::bus::BusBuilder, EventsError> {
        cfg.validate()?;
        let mut builder = Bus::builder();
        for s in &cfg.sinks {
            let filter = TypeFilter::new(&s.types).map_err(|reason| EventsError::Config {
                sink: s.name.clone(),
                reason,
            })?;
            let sink: Box<dyn crate::Sink> = match &s.kind {
                SinkKind::Webhook(w) => {
                    let store = match (w.durable, store) {
                        (false, _) => None,
                        (true, Some(store)) => Some(store.clone()),
                        (true, None) => {
                            return Err(EventsError::Config {
                                sink: s.name.clone(),
                                reason: "a durable webhook keeps its outbox in the embedded \
                                         store, and none is open: set `durable: false` to keep \
                                         it in memory (lost on restart)"
                                    .into(),
                            })
                        }
                    };
                    Box::new(webhook::WebhookSink::new(&s.name, w, store)?)
                }
                SinkKind::Nats(n) => Box::new(nats::NatsSink::connect(&s.name, n).await?),
                SinkKind::File(f) => Box::new(lines::LinesSink::file(&s.name, &f.path).await?),
                SinkKind::Stdout => Box::new(lines::LinesSink::stdout()),
            };
            builder.sink(s.name.clone(), s.queue, filter, sink);
        }
        Ok(builder)
    }
}
