//! The NATS sink: each event published as a structured CloudEvent (JSON payload,
//! `Content-Type: application/cloudevents+json`) on a subject built from a template
//! (`portcullis.events.{type}`).
//!
//! * **Core NATS** (default): fire and forget. An event counts as delivered once the client
//!   took it; if no server is reachable, the client buffers, then the sink's queue fills
//!   and drops (counted).
//! * **JetStream** (`jetstream: true`): each publish waits for the stream's ack, and is
//!   tried up to three times. The header `Nats-Msg-Id` is the event id, so JetStream's
//!   duplicate window drops a redelivered event.
//!
//! The client connects in the background and reconnects by itself, so a NATS server that
//! is down at start, or restarts, loses only what the queues could not hold.

use crate::bus::{BoxFuture, Sink, SinkContext, SinkStats};
use crate::config::NatsCfg;
use crate::error::EventsError;
use crate::event::{Event, STRUCTURED_CONTENT_TYPE};
use async_nats::jetstream;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// JetStream publishes per event before it counts as failed.
const JETSTREAM_TRIES: u32 = 3;

/// See the [module docs](self).
pub struct NatsSink {
    client: async_nats::Client,
    jetstream: Option<jetstream::Context>,
    subject: String,
    timeout: Duration,
}

/// The subject for `event`: `{type}` in `template` replaced by its type, with characters
/// NATS gives meaning to (space, `*`, `>`) replaced by `_`.
pub fn subject(template: &str, event: &Event) -> String {
    let safe: String = event
        .type_
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '*' || c == '>' {
                '_'
            } else {
                c
            }
        })
        .collect();
    template.replace("{type}", &safe)
}

impl NatsSink {
    /// Sets up the client (connecting in the background).
    pub async fn connect(name: &str, cfg: &NatsCfg) -> Result<NatsSink, EventsError> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("portcullis events sink {name}"))
            .connection_timeout(cfg.timeout)
            .retry_on_initial_connect()
            .connect(cfg.url.as_str())
            .await
            .map_err(|e| EventsError::Nats {
                sink: name.to_owned(),
                url: cfg.url.clone(),
                reason: e.to_string(),
            })?;
        let jetstream = cfg.jetstream.then(|| {
            let mut js = jetstream::new(client.clone());
            js.set_timeout(cfg.timeout);
            js
        });
        Ok(NatsSink {
            client,
            jetstream,
            subject: cfg.subject.clone(),
            timeout: cfg.timeout,
        })
    }

    async fn publish(&self, event: &Event) -> Result<(), String> {
        let subject = subject(&self.subject, event);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
        headers.insert("Nats-Msg-Id", event.id.as_str());
        let payload = Bytes::from(event.to_json());
        let Some(js) = &self.jetstream else {
            return tokio::time::timeout(
                self.timeout,
                self.client.publish_with_headers(subject, headers, payload),
            )
            .await
            .map_err(|_| format!("the client did not take it within {:?}", self.timeout))?
            .map_err(|e| e.to_string());
        };
        let mut last = String::new();
        for attempt in 1..=JETSTREAM_TRIES {
            let acked = tokio::time::timeout(self.timeout, async {
                js.publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
            match acked {
                Ok(Ok(_ack)) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("no ack within {:?}", self.timeout),
            }
            if attempt < JETSTREAM_TRIES {
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
        }
        Err(last)
    }
}

impl Sink for NatsSink {
    fn send<'a>(
        &'a mut self,
        events: &'a [Arc<Event>],
        ctx: &'a SinkContext,
    ) -> BoxFuture<'a, Vec<usize>> {
        Box::pin(async move {
            let mut lost = Vec::new();
            for (i, event) in events.iter().enumerate() {
                match self.publish(event).await {
                    Ok(()) => SinkStats::add(&ctx.stats.delivered, 1),
                    Err(reason) => {
                        SinkStats::add(&ctx.stats.failed, 1);
                        tracing::warn!(sink = %ctx.name, id = %event.id, %reason,
                            "cannot publish the event to NATS");
                        lost.push(i);
                    }
                }
            }
            lost
        })
    }

    fn close<'a>(&'a mut self, _ctx: &'a SinkContext) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = tokio::time::timeout(self.timeout, self.client.flush()).await;
        })
    }
}
