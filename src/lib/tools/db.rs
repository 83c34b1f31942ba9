//! The tool database: one SQLite file shared by `todos`, `notes` and `calendar`.
//!
//! Opened lazily, on the first call of a tool that needs it, so `time` and `calculator` never touch
//! the disk. Created with user-only permissions on Unix (directories 0700, file 0600), in WAL mode with a
//! busy timeout so concurrent `tb-tool` processes queue instead of failing, and migrated forward
//! inside one `BEGIN IMMEDIATE` transaction, so racing first opens create the schema exactly once.

use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use std::fs::{DirBuilder, OpenOptions};
#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Forward migrations; entry `i` takes the schema from version `i` to `i + 1`. Never edit a
/// shipped entry: add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: todos, notes (+ full-text index), calendar events.
    "CREATE TABLE todos (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        text TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        created TEXT NOT NULL,
        completed TEXT
     );
     CREATE TABLE notes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        created TEXT NOT NULL
     );
     CREATE VIRTUAL TABLE notes_fts USING fts5(
        title, body, tags, tokenize = 'porter unicode61 remove_diacritics 2'
     );
     CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL,
        start_ts INTEGER NOT NULL,
        end_ts INTEGER,
        note TEXT,
        created TEXT NOT NULL
     );
     CREATE INDEX events_start ON events(start_ts);",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The database file and, once opened, its connection.
pub struct Store {
    path: Result<PathBuf, String>,
    conn: Mutex<Option<Connection>>,
}

impl Store {
    /// A database at `path` (not opened yet).
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Store {
            path: Ok(path.into()),
            conn: Mutex::new(None),
        }
    }

    /// The database `TINYBIT_DB` names, else `$XDG_DATA_HOME/tinybit/tools.db`, else
    /// `~/.local/share/tinybit/tools.db`. If none can be found the tools that need it fail with a
    /// message saying so; the others still work.
    pub fn from_env() -> Self {
        Store {
            path: default_path(),
            conn: Mutex::new(None),
        }
    }

    pub fn path(&self) -> Result<&Path, String> {
        self.path.as_deref().map_err(Clone::clone)
    }

    /// Runs `f` on the connection, opening and migrating the database first if needed.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, String> {
        let path = self.path()?;
        // A panic in another thread's `f` leaves the connection usable (SQLite rolls back).
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(open(path)?);
        }
        // Cannot fail: the connection was opened just above when there was none.
        f(guard.as_mut().expect("opened above")).map_err(|e| describe(path, &e))
    }
}

fn default_path() -> Result<PathBuf, String> {
    let non_empty = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = non_empty("TINYBIT_DB") {
        return Ok(p);
    }
    crate::dirs::tinybit_dir(crate::dirs::Base::Data)
        .map(|d| d.join("tools.db"))
        .ok_or_else(|| {
        "no place for the tool database: HOME and XDG_DATA_HOME are unset; set TINYBIT_DB or pass --db".into()
    })
}

/// Opens (creating if needed) and migrates the database at `path`.
pub fn open(path: &Path) -> Result<Connection, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builder = DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        builder.mode(0o700);
        builder.create(dir).map_err(|e| {
            format!(
                "creating the tool database directory {}: {e}",
                dir.display()
            )
        })?;
    }
    // Create the file ourselves so it is 0600 from the first byte (SQLite gives its -wal and -shm
    // files the same permissions). No truncation: another process may be creating it right now.
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    options.mode(0o600);
    options
        .open(path)
        .map_err(|e| format!("opening the tool database {}: {e}", path.display()))?;
    retry_busy(|| setup(path)).map_err(|e| describe(path, &e))
}

fn setup(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(failure(
            rusqlite::ffi::SQLITE_CANTOPEN,
            format!(
                "cannot switch to WAL mode (journal_mode is '{mode}'); is it on a network filesystem?"
            ),
        ));
    }
    // In WAL mode NORMAL never corrupts the file; only a power cut can undo the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Brings the schema up to `SCHEMA_VERSION`. Refuses a database written by a newer tinybit.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?;
    if current > SCHEMA_VERSION {
        return Err(failure(
            rusqlite::ffi::SQLITE_MISMATCH,
            format!(
                "schema version {current} was written by a newer tinybit (this one knows up to {SCHEMA_VERSION}); \
                 upgrade tinybit or use another --db"
            ),
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql)?;
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [i as i64 + 1],
        )?;
    }
    tx.commit()
}

/// SQLite answers SQLITE_BUSY without calling the busy handler where waiting could deadlock; setup
/// is idempotent, so a first open racing other processes retries it instead of failing.
fn retry_busy<T>(mut f: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(2);
    loop {
        match f() {
            Err(e) if is_busy(&e) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn failure(code: std::ffi::c_int, msg: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(msg))
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// An SQLite error as a message that names the file and says what to do.
fn describe(path: &Path, e: &rusqlite::Error) -> String {
    let p = path.display();
    let hint = match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            "another process held it too long; try again"
        }
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
            "check that the file and its directory are writable by you, or choose another with --db"
        }
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
            "it is not a tinybit tool database (or is damaged); choose another with --db"
        }
        Some(ErrorCode::DiskFull) => "free some disk space",
        _ => "",
    };
    if hint.is_empty() {
        format!("tool database {p}: {e}")
    } else {
        format!("tool database {p}: {e}; {hint}")
    }
}
