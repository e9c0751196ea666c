//! portcullis-store: the embedded durable store. One SQLite file, `portcullis.db`, under the
//! state directory (`state_dir`), opened once at start and shared by everything that must
//! survive a restart on one machine: quotas and daily usage, the event outbox, trigger
//! firings and workflow executions (each adds a migration in [`schema`]).
//!
//! * **Durable on return.** The file is in WAL mode with `synchronous=FULL`: when a write
//!   call returns, its transaction is on disk and survives the process being killed, or the
//!   machine losing power. Nothing needs closing; dropping the last [`Store`] just closes
//!   the file.
//! * **Blocking.** Every call does file I/O (and `fsync` on write) while holding the one
//!   connection's lock. From async code, run it on a blocking thread
//!   (`tokio::task::spawn_blocking`), never on the reactor; the proxy's flusher batches a sync
//!   interval's changes into one [`Store::flush`] call.
//! * **One writer.** [`Store`] is a cheap `Clone` handle to one connection behind a mutex.
//!   Another process opening the same file waits up to [`BUSY_TIMEOUT`] for a lock.
//! * **Private.** The directory is created with mode 0700 and the file with 0600 (on Unix):
//!   usage counts say who called what.
//!
//! ```
//! use portcullis_store::{Store, UsageQuery};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! let key = b"\0alice".to_vec(); // portcullis_limits::StoredKey::to_bytes
//! let day = portcullis_store::parse_day("2026-12-06")?;
//! store.flush(
//!     &[("gold", &[(key.clone(), 1_796_515_200, 41)])],
//!     &[("gold", &[(key.clone(), day, 41)])],
//! )?;
//! drop(store);
//!
//! let store = Store::open(dir.path())?;
//! assert_eq!(store.load_quotas("gold", 0)?, vec![(key.clone(), 1_796_515_200, 41)]);
//! let rows = store.usage(&UsageQuery { plan: Some("gold"), key: None, from_day: day, to_day: day })?;
//! assert_eq!((rows[0].key.as_slice(), rows[0].count), (key.as_slice(), 41));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod firings;
mod outbox;
pub mod schema;
mod sessions;
mod usage;
mod workflows;
pub use firings::FollowUp;
pub use outbox::{Enqueued, OutboxRow};

pub use portcullis_limits::quota::{day_string, parse_day};
pub use schema::SCHEMA_VERSION;
pub use usage::{QuotaRow, UsageDelta, UsageQuery, UsageRow};

use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The database's file name in the state directory.
pub const FILE_NAME: &str = "portcullis.db";
/// How long a call waits for another process's lock on the file before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong with the store. Each message names the path, and the first four say
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {}: {source}; {fix}", path.display())]
    Dir {
        path: PathBuf,
        source: io::Error,
        fix: String,
    },
    #[error("state directory {} is not a directory; {fix}", path.display())]
    NotADirectory { path: PathBuf, fix: String },
    #[error("cannot open the database {}: {reason}; {fix}", path.display())]
    Open {
        path: PathBuf,
        reason: String,
        fix: String,
    },
    #[error(
        "the database {} has schema version {found}, but this portcullis knows versions up to \
         {known}: it was written by a newer portcullis. Run that version (or newer), or point \
         `state_dir` at another directory; downgrading a state directory is not supported",
        path.display()
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("the database {}: {what}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        what: &'static str,
        source: rusqlite::Error,
    },
}

/// The result of a store call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The open store: a cheap, `Send + Sync` handle to one SQLite connection. See the
/// [crate docs](crate).
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: Arc<Path>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens `dir/portcullis.db`, creating the directory (mode 0700) and the file (0600) if
    /// they do not exist, switching it to WAL, and bringing its schema up to date.
    pub fn open(dir: &Path) -> Result<Store> {
        prepare_dir(dir)?;
        let path = dir.join(FILE_NAME);
        prepare_file(&path)?;
        let mut conn = Connection::open(&path).map_err(|e| open_error(&path, e))?;
        configure(&conn).map_err(|e| open_error(&path, e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        match schema::migrate(&mut conn, now).map_err(|e| open_error(&path, e))? {
            schema::Outcome::Current { .. } => {}
            schema::Outcome::TooNew { found } => {
                return Err(StoreError::TooNew {
                    path,
                    found,
                    known: SCHEMA_VERSION,
                })
            }
        }
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.into(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<i64> {
        self.conn
            .lock()
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
            .map_err(|e| self.error("reading the schema version", e))
    }

    pub(crate) fn conn(&self) -> parking_lot::MutexGuard<'_, Connection> {
        self.conn.lock()
    }

    pub(crate) fn error(&self, what: &'static str, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.to_path_buf(),
            what,
            source,
        }
    }
}

/// Creates `dir` (and its parents) with mode 0700, or checks that it is a directory.
fn prepare_dir(dir: &Path) -> Result<()> {
    let dir_error = |e: io::Error| {
        let fix = if dir.ancestors().skip(1).any(Path::is_file) {
            "a file is in the way on its path: set `state_dir` elsewhere"
        } else if e.kind() == io::ErrorKind::PermissionDenied {
            "create it yourself, owned by the user portcullis runs as, or set `state_dir` to \
             a directory that user may write"
        } else {
            "set `state_dir` to a directory portcullis may create and write"
        };
        StoreError::Dir {
            path: dir.to_path_buf(),
            source: e,
            fix: fix.into(),
        }
    };
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(StoreError::NotADirectory {
                path: dir.to_path_buf(),
                fix: "it is a file: move it away, or set `state_dir` to a directory".into(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(dir_error(e)),
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(dir_error)
}

/// Creates the database file with mode 0600 if it is missing, and checks that it is a
/// writable file: SQLite's own message for either is "unable to open database file".
fn prepare_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(StoreError::Open {
            path: path.to_path_buf(),
            reason: "it is a directory".into(),
            fix: "move it away; portcullis keeps its state in a file of that name".into(),
        });
    }
    let mut options = fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop).map_err(|e| {
        let fix = if e.kind() == io::ErrorKind::PermissionDenied {
            "make the file and its directory writable by the user portcullis runs as (it also \
             creates `portcullis.db-wal` and `portcullis.db-shm` beside it)"
        } else {
            "check the state directory"
        };
        StoreError::Open {
            path: path.to_path_buf(),
            reason: e.to_string(),
            fix: fix.into(),
        }
    })
}

/// WAL, full sync, a busy timeout, foreign keys.
fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!(
                "the file system refused write-ahead logging (journal mode stayed `{mode}`)"
            )),
        ));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

fn open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    let fix = match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            "it is not a portcullis database: move it away (portcullis then starts a new one)"
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            "another process holds it: stop the other portcullis using this `state_dir`"
        }
        Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => {
            "make the state directory and its files writable by the user portcullis runs as, \
             on a local file system (WAL needs shared memory, which network file systems lack)"
        }
        Some(ErrorCode::DatabaseCorrupt) => {
            "the file is damaged: restore it from a backup, or move it away to start afresh"
        }
        _ => "check the state directory",
    };
    StoreError::Open {
        path: path.to_path_buf(),
        reason: e.to_string(),
        fix: fix.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}

    #[test]
    fn a_store_is_a_shared_handle() {
        assert_send_sync_clone::<Store>();
    }

    #[test]
    fn open_creates_a_private_directory_and_file_in_wal_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/nested");
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.path(), dir.join(FILE_NAME));
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let conn = store.conn();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join(FILE_NAME)), 0o600);
        }
    }

    #[test]
    fn reopening_runs_no_migration_again() {
        let tmp = tempfile::tempdir().unwrap();
        drop(Store::open(tmp.path()).unwrap());
        let store = Store::open(tmp.path()).unwrap();
        let applied: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(applied, SCHEMA_VERSION);
        // Two handles on one file at once are fine too.
        let again = Store::open(tmp.path()).unwrap();
        assert_eq!(again.schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn a_database_from_a_newer_portcullis_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        store
            .conn()
            .execute(
                "INSERT INTO schema_version VALUES (?1, 'outbox v9', 0)",
                [SCHEMA_VERSION + 8],
            )
            .unwrap();
        drop(store);
        let err = Store::open(tmp.path()).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found, .. } if found == SCHEMA_VERSION + 8));
        let msg = err.to_string();
        assert!(
            msg.contains(&tmp.path().join(FILE_NAME).display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("newer portcullis"), "{msg}");
    }

    #[test]
    fn wrong_kinds_of_path_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        // A file where the directory should be.
        let file = tmp.path().join("state");
        fs::write(&file, "not a dir").unwrap();
        let msg = Store::open(&file).unwrap_err().to_string();
        assert!(
            msg.contains("is not a directory") && msg.contains("state"),
            "{msg}"
        );
        // A file on the way to the directory.
        let msg = Store::open(&file.join("below")).unwrap_err().to_string();
        assert!(msg.contains("a file is in the way"), "{msg}");
        // A directory where the database should be.
        let dir = tmp.path().join("d");
        fs::create_dir_all(dir.join(FILE_NAME)).unwrap();
        let msg = Store::open(&dir).unwrap_err().to_string();
        assert!(
            msg.contains("is a directory") && msg.contains(FILE_NAME),
            "{msg}"
        );
        // Something that is not a database.
        let dir = tmp.path().join("e");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(FILE_NAME), vec![b'x'; 4096]).unwrap();
        let msg = Store::open(&dir).unwrap_err().to_string();
        assert!(msg.contains("not a portcullis database"), "{msg}");
    }

    #[cfg(unix)]
    #[test]
    fn a_directory_portcullis_may_not_write_is_a_clear_error() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("locked");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o500)).unwrap();
        if fs::write(dir.join("probe"), "").is_ok() {
            // Running as root: permissions do not apply, so there is nothing to test.
            return;
        }
        let msg = Store::open(&dir).unwrap_err().to_string();
        assert!(msg.contains(FILE_NAME) && msg.contains("writable"), "{msg}");
        let msg = Store::open(&dir.join("sub")).unwrap_err().to_string();
        assert!(msg.contains("create it yourself"), "{msg}");
    }
}
