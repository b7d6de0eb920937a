//! The log's tables and their layout version, opening a connection, and the checks made
//! before the writer starts.
//!
//! Invariants: every connection runs in WAL mode, so reads never wait for the writer;
//! a log whose `user_version` is not [`SCHEMA_VERSION`] is refused rather than misread
//! (a new, empty file takes the current layout, with incremental auto-vacuum); tables
//! and indexes added since a version was shipped are created when a log of that version
//! opens (`IF NOT EXISTS`), so they need no new version; a directory that cannot take
//! writes is refused with a message that says so, before SQLite would report it in its
//! own words.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::{Durability, storage};
use crate::bus::BusError;

/// The layout version kept in `PRAGMA user_version`; a log of another version is refused
/// rather than misread.
pub(super) const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT,
    time TEXT,
    datacontenttype TEXT,
    dataschema TEXT,
    data BLOB NOT NULL,
    extensions TEXT NOT NULL,
    ingested_at_us INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_source_id ON events (source, id);
CREATE TABLE IF NOT EXISTS cursors (
    plugin TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS acked (
    plugin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (plugin, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retries (
    plugin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    errors TEXT NOT NULL,
    PRIMARY KEY (plugin, seq)
) WITHOUT ROWID;
-- When an operator replayed a plugin's dead letter: the replay's age counts from then.
CREATE TABLE IF NOT EXISTS replays (
    plugin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (plugin, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plugin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    errors TEXT NOT NULL,
    dead_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_plugin ON dead_letters (plugin, id);
CREATE TABLE IF NOT EXISTS schemas (
    event_type TEXT NOT NULL,
    version INTEGER NOT NULL,
    schema TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    PRIMARY KEY (event_type, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS controls (
    plugin TEXT PRIMARY KEY,
    control TEXT NOT NULL,
    revision INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    plugin TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (plugin, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    plugin TEXT PRIMARY KEY,
    patterns TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    subject TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream_events (
    subject TEXT NOT NULL,
    version INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (subject, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS stream_events_seq ON stream_events (seq);
CREATE TABLE IF NOT EXISTS scheduled (
    id TEXT PRIMARY KEY,
    due_at INTEGER NOT NULL,
    type TEXT NOT NULL,
    event TEXT NOT NULL,
    scheduled_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS scheduled_due ON scheduled (due_at);
CREATE INDEX IF NOT EXISTS retries_seq ON retries (seq);
CREATE INDEX IF NOT EXISTS dead_letters_seq ON dead_letters (seq);
-- How many dead letters each plugin holds, kept by the triggers below, so that reading it
-- costs one row however many letters there are.
CREATE TABLE IF NOT EXISTS dead_letter_counts (
    plugin TEXT PRIMARY KEY,
    letters INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS dead_letter_counted AFTER INSERT ON dead_letters BEGIN
    INSERT INTO dead_letter_counts (plugin, letters) VALUES (NEW.plugin, 1)
    ON CONFLICT (plugin) DO UPDATE SET letters = letters + 1;
END;
CREATE TRIGGER IF NOT EXISTS dead_letter_uncounted AFTER DELETE ON dead_letters BEGIN
    UPDATE dead_letter_counts SET letters = letters - 1 WHERE plugin = OLD.plugin;
END;
";

/// A connection that reads the log (the writer's is [`open_writer_connection`]).
pub(super) fn open_connection(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    configure(&conn, durability)?;
    Ok(conn)
}

/// The writer's connection, which also gives a new file its layout settings. Only the
/// writer sets them: setting `auto_vacuum` takes the log's write lock even when it changes
/// nothing, so a reader that set it would wait for the writer (and fail after the busy
/// timeout while the writer is busy).
pub(super) fn open_writer_connection(
    path: &Path,
    durability: Durability,
) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    configure(&conn, durability)?;
    // Takes effect only on a new, empty file, before WAL mode writes its first page: it
    // lets retention give freed pages back to the file system (`incremental_vacuum`). On
    // an existing file it changes nothing; converting an older log takes a `VACUUM` of
    // the whole file, which the operator runs while the host is stopped.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |row| {
        row.get::<_, String>(0)
    })?;
    Ok(conn)
}

fn configure(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    let synchronous = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "OFF")
}

/// Creates the tables of a new log, or checks that an existing one has this layout. One
/// transaction: a first open cut short (a crash, a full disk) leaves nothing half made,
/// which a later start would refuse as a log of another layout.
pub(super) fn check_schema(conn: &Connection, path: &Path) -> Result<(), BusError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)
        .map_err(storage)?;
    let conn = &*tx;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(storage)?;
    let existing: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'events'",
            [],
            |row| row.get(0),
        )
        .map_err(storage)?;
    if existing > 0 && version > SCHEMA_VERSION {
        return Err(BusError::Storage(format!(
            "the log {} was written by a newer Switchyard (layout version {version}; this \
             host reads version {SCHEMA_VERSION}): run that version on it, or restore a \
             backup this version made",
            path.display()
        )));
    }
    if existing > 0 && version != SCHEMA_VERSION {
        return Err(BusError::Storage(format!(
            "the log {} has layout version {version} and this host reads version \
             {SCHEMA_VERSION}; move it aside (keep it) and start with an empty data \
             directory",
            path.display()
        )));
    }
    let counted: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'dead_letter_counts'",
            [],
            |row| row.get(0),
        )
        .map_err(storage)?;
    conn.execute_batch(SCHEMA).map_err(storage)?;
    if counted == 0 {
        // A log from before the counts: count what it holds once (the host holds the log's
        // lock, so nothing is dead-lettered meanwhile).
        conn.execute_batch(
            "INSERT INTO dead_letter_counts (plugin, letters)
             SELECT plugin, COUNT(*) FROM dead_letters GROUP BY plugin
             ON CONFLICT (plugin) DO UPDATE SET letters = excluded.letters",
        )
        .map_err(storage)?;
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(storage)?;
    tx.commit().map_err(storage)
}

/// Fails with a clear message when the log's directory cannot take writes, which SQLite
/// would otherwise report as "unable to open database file" or only at the first append.
pub(super) fn check_writable(dir: &Path) -> Result<(), BusError> {
    let probe = dir.join(".switchyard-write-probe");
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
            Err(BusError::Storage(format!(
                "the data directory {} is on read-only storage",
                dir.display()
            )))
        }
        Err(e) => Err(BusError::Storage(format!(
            "the data directory {} is not writable: {e}",
            dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use crate::bus::BusError;
    use crate::bus::sqlite::{SqliteBus, SqliteOptions};

    #[test]
    fn a_log_of_another_layout_version_is_refused_and_a_current_one_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE events (seq INTEGER PRIMARY KEY, ingested_at INTEGER)",
            )
            .unwrap();
        }
        let Err(BusError::Storage(message)) = SqliteBus::open(SqliteOptions::new(&path)) else {
            panic!("an old layout opened");
        };
        assert!(message.contains("layout version 0"), "{message}");

        // A log from a newer host is not to be thrown away.
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let Err(BusError::Storage(message)) = SqliteBus::open(SqliteOptions::new(&path)) else {
            panic!("a newer layout opened");
        };
        assert!(
            message.contains("written by a newer Switchyard"),
            "{message}"
        );
        assert!(!message.contains("empty data directory"), "{message}");

        let fresh = dir.path().join("fresh.db");
        drop(SqliteBus::open(SqliteOptions::new(&fresh)).unwrap());
        assert!(SqliteBus::open(SqliteOptions::new(&fresh)).is_ok());
    }

    /// A reader's connection does not take the log's write lock, so opening one while the
    /// writer holds it does not wait for it.
    #[test]
    fn a_reader_opens_while_the_log_is_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        drop(SqliteBus::open(SqliteOptions::new(&path)).unwrap());
        let writer = Connection::open(&path).unwrap();
        writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        let reader = super::open_connection(&path, crate::bus::sqlite::Durability::Normal);
        assert!(reader.is_ok(), "{:?}", reader.err());
    }
}
