//! The one error type of the audit crate. Verification failures have their own struct,
//! [`crate::VerifyError`], because they carry a location in the chain rather than a cause.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while writing or searching the audit trail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The queue is full and `audit.on_overload` is `fail_closed`: the request must be refused
    /// rather than go unrecorded.
    #[error("the audit queue is full (audit.on_overload: fail_closed)")]
    Overloaded,
    /// The writer thread has stopped (it panicked, or the process is shutting down).
    #[error("the audit writer has stopped")]
    Closed,
    /// Writing, flushing or syncing a record failed. The record may be missing from the
    /// trail; the caller must treat it as not recorded.
    #[error("audit write failed: {0}")]
    Write(String),
    /// A file or directory could not be read, created or opened.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process holds the audit directory.
    #[error("audit directory {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    /// A complete line in an audit file is not a valid audit record.
    #[error("{}:{line}: {reason}", file.display())]
    Corrupt {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    /// `--since` was neither a duration (`1h`, `30m`) nor an RFC 3339 time.
    #[error("invalid --since `{input}`: {reason}")]
    Since { input: String, reason: String },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_place() {
        let e = Error::Corrupt {
            file: PathBuf::from("/a/audit-0000000000000001.jsonl"),
            line: 3,
            reason: "not JSON".into(),
        };
        assert_eq!(e.to_string(), "/a/audit-0000000000000001.jsonl:3: not JSON");
        let e = Error::io("/x", io::Error::new(io::ErrorKind::NotFound, "gone"));
        assert_eq!(e.to_string(), "/x: gone");
        assert!(Error::Overloaded.to_string().contains("fail_closed"));
    }
}
