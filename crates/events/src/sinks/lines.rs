//! The JSON-lines sink: each event as one line of structured-mode JSON, appended to a file
//! or written to stdout.
//!
//! The file is opened (created with mode 0600: events name keys and principals) for each
//! batch, so a log rotator that renames it is followed without a signal. A batch is written
//! with one `write` call and then flushed.

use crate::bus::{BoxFuture, Sink, SinkContext, SinkStats};
use crate::error::EventsError;
use crate::event::Event;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// See the [module docs](self).
pub struct LinesSink {
    out: Out,
}

enum Out {
    File(PathBuf),
    Stdout,
}

async fn open(path: &Path) -> std::io::Result<tokio::fs::File> {
    let mut options = tokio::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path).await
}

impl LinesSink {
    /// Appends to `path`, which is opened once now to check it can be.
    pub async fn file(name: &str, path: &Path) -> Result<LinesSink, EventsError> {
        open(path).await.map_err(|source| EventsError::File {
            sink: name.to_owned(),
            path: path.to_path_buf(),
            source,
        })?;
        Ok(LinesSink {
            out: Out::File(path.to_path_buf()),
        })
    }

    /// Writes to standard output.
    pub fn stdout() -> LinesSink {
        LinesSink { out: Out::Stdout }
    }

    async fn write(&self, buf: &[u8]) -> std::io::Result<()> {
        match &self.out {
            Out::File(path) => {
                let mut f = open(path).await?;
                f.write_all(buf).await?;
                f.flush().await
            }
            Out::Stdout => {
                let mut out = tokio::io::stdout();
                out.write_all(buf).await?;
                out.flush().await
            }
        }
    }
}

impl Sink for LinesSink {
    fn send<'a>(
        &'a mut self,
        events: &'a [Arc<Event>],
        ctx: &'a SinkContext,
    ) -> BoxFuture<'a, Vec<usize>> {
        Box::pin(async move {
            let mut buf = Vec::with_capacity(events.len() * 512);
            for event in events {
                buf.extend_from_slice(&event.to_json());
                buf.push(b'\n');
            }
            match self.write(&buf).await {
                Ok(()) => {
                    SinkStats::add(&ctx.stats.delivered, events.len());
                    Vec::new()
                }
                Err(e) => {
                    SinkStats::add(&ctx.stats.failed, events.len());
                    let to = match &self.out {
                        Out::File(p) => p.display().to_string(),
                        Out::Stdout => "stdout".into(),
                    };
                    tracing::warn!(sink = %ctx.name, error = %e, events = events.len(),
                        "cannot write events to {to}");
                    (0..events.len()).collect()
                }
            }
        })
    }
}
