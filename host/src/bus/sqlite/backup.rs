//! Backups of the embedded log: a consistent copy taken while the host serves, checked
//! before it is trusted, and put in place of a data directory's log by a restore.
//!
//! Invariants:
//! - A copy is one read transaction of the log (`VACUUM INTO`): it holds every commit up
//!   to one point and nothing after it, while the writer goes on committing beside it.
//! - One copy is made at a time: backups asked for together take turns instead of
//!   reading the whole log side by side.
//! - The copy is written next to the log (same file system, so a full disk says so
//!   early) under a name of its own, opened, and unlinked before it is handed out: the
//!   caller reads an anonymous file that disappears with its handle. A host that dies
//!   mid-copy leaves `<log>.backup-*`, which the next open of the log removes.
//! - A file is trusted as a backup only if SQLite's `integrity_check` passes and it has
//!   this host's layout version.
//! - A restore replaces a log only under the log's lock (no host serves it), keeps the
//!   log it replaces with its WAL beside it, and renames the copy into place only once it
//!   is whole on disk.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::schema::SCHEMA_VERSION;
use super::{SqliteBus, storage, to_u64, with_suffix};
use crate::bus::BusError;
use crate::bus::sqlite::lock_log;

/// What a backup holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSummary {
    /// Events in its log.
    pub events: u64,
    /// The sequence of its last event (0 when empty).
    pub last_sequence: u64,
    /// Its size in bytes.
    pub bytes: u64,
}

/// What the name of a temporary copy adds to the log's, before a unique id.
const COPY: &str = ".backup-";

/// Removes the copies a host that died mid-backup left beside the log at `log`.
pub(super) fn remove_stale_copies(log: &Path) {
    let (Some(dir), Some(name)) = (log.parent(), log.file_name()) else {
        return;
    };
    let prefix = format!("{}{COPY}", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl SqliteBus {
    /// A consistent copy of the log, taken while it serves: an open file already
    /// unlinked from the data directory, and its size.
    pub async fn backup_file(&self) -> Result<(std::fs::File, u64), BusError> {
        let _one_at_a_time = self.inner.backup.lock().await;
        let log = self.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let copy = with_suffix(&log, &format!("{COPY}{}", uuid::Uuid::new_v4()));
            let taken = copy_log(&log, &copy);
            let opened = taken.and_then(|()| {
                std::fs::File::open(&copy)
                    .map_err(|e| BusError::Storage(format!("cannot read the backup: {e}")))
            });
            let _ = std::fs::remove_file(&copy);
            let file = opened?;
            let bytes = file
                .metadata()
                .map_err(|e| BusError::Storage(format!("cannot read the backup: {e}")))?
                .len();
            Ok((file, bytes))
        })
        .await
        .map_err(|e| BusError::Storage(format!("the backup task failed: {e}")))?
    }

    /// Whether the disk has room for a copy of the log now ([`BusError::NoRoom`] if not),
    /// found without making one.
    pub async fn backup_room(&self) -> Result<(), BusError> {
        let log = self.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let conn = Connection::open_with_flags(&log, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(storage)?;
            let dir = log.parent().unwrap_or(Path::new("."));
            room_for_copy(&conn, dir)
        })
        .await
        .map_err(|e| BusError::Storage(format!("the backup task failed: {e}")))?
    }
}

/// Room a copy needs beyond the log's pages in use, for the WAL to grow while the copy's
/// read transaction keeps it from being reset: a tenth of the pages, at least this.
const COPY_HEADROOM: u64 = 4 << 20;

fn copy_log(log: &Path, copy: &Path) -> Result<(), BusError> {
    let conn =
        Connection::open_with_flags(log, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(storage)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(storage)?;
    room_for_copy(&conn, copy.parent().unwrap_or(Path::new(".")))?;
    let target = copy.to_string_lossy().into_owned();
    conn.execute("VACUUM INTO ?1", [target]).map_err(storage)?;
    Ok(())
}

/// Refuses a copy of the log open on `conn` into `dir` when the disk has not room for it:
/// a copy that fills the disk would make the writer fail too, and producers with it, for
/// as long as the copy ran.
fn room_for_copy(conn: &Connection, dir: &Path) -> Result<(), BusError> {
    let pages = |pragma: &str| -> Result<u64, BusError> {
        conn.pragma_query_value(None, pragma, |row| row.get::<_, i64>(0))
            .map(to_u64)
            .map_err(storage)
    };
    let in_use = (pages("page_count")? - pages("freelist_count")?) * pages("page_size")?;
    if let Ok(disk) = rustix::fs::statvfs(dir) {
        check_room(in_use, disk.f_bavail.saturating_mul(disk.f_frsize), dir)?;
    }
    Ok(())
}

/// Refuses a copy of `in_use` bytes into `dir` with only `free` bytes free there.
fn check_room(in_use: u64, free: u64, dir: &Path) -> Result<(), BusError> {
    let needed = in_use + (in_use / 10).max(COPY_HEADROOM);
    if free < needed {
        return Err(BusError::NoRoom(format!(
            "a backup needs about {needed} bytes free beside the log ({in_use} in use, and room \
             for the log to grow meanwhile); {} has {free} free",
            dir.display()
        )));
    }
    Ok(())
}

/// Checks that the file at `path` is a whole log of this host's layout, and what it holds.
pub fn inspect_backup(path: &Path) -> Result<BackupSummary, BusError> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| BusError::Storage(format!("cannot read {}: {e}", path.display())))?
        .len();
    let not_a_log = |why: String| {
        BusError::Storage(format!(
            "{} is not a backup of a Switchyard log: {why}",
            path.display()
        ))
    };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| not_a_log(e.to_string()))?;
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .map_err(|e| not_a_log(e.to_string()))?;
    if integrity != "ok" {
        return Err(not_a_log(format!("the integrity check found: {integrity}")));
    }
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(storage)?;
    if version != SCHEMA_VERSION {
        return Err(not_a_log(format!(
            "its layout version is {version}, and this host reads version {SCHEMA_VERSION}"
        )));
    }
    let (events, last): (i64, Option<i64>) = conn
        .query_row("SELECT count(*), max(seq) FROM events", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .map_err(|e| not_a_log(e.to_string()))?;
    Ok(BackupSummary {
        events: to_u64(events),
        last_sequence: last.map_or(0, to_u64),
        bytes,
    })
}

/// Puts the backup at `backup` in place of the log at `log`, which no host may be serving.
/// A log already there is refused unless `replace`; it is then kept beside, with its WAL,
/// under a name that ends in `.replaced-<time>`, which is returned.
///
/// The backup is copied beside the log and flushed before the log is moved: a copy that
/// fails (a full disk) leaves the log where it was and removes the partial copy, so a
/// failed restore never leaves a host to start on an empty log. A WAL file without its
/// log is refused, as SQLite would apply it to the restored one. A backup with a WAL of
/// its own (a log a host left, a log kept by an earlier restore) is copied through SQLite,
/// so its commits still in the WAL come too; the copy is checked as restored.
pub fn restore_backup(
    backup: &Path,
    log: &Path,
    replace: bool,
) -> Result<(BackupSummary, Option<PathBuf>), BusError> {
    let summary = inspect_backup(backup)?;
    let _lock = lock_log(log)?;
    let io = |what: &str, e: std::io::Error| BusError::Storage(format!("cannot {what}: {e}"));
    if log.exists() && !replace {
        return Err(BusError::Storage(format!(
            "{} already holds a log; pass --replace to put the backup in its place (the \
             log there is kept beside it)",
            log.display()
        )));
    }
    if !log.exists()
        && let Some(stray) = ["-wal", "-shm"]
            .map(|ending| with_suffix(log, ending))
            .into_iter()
            .find(|file| file.exists())
    {
        return Err(BusError::Storage(format!(
            "{} is there without its log {}; SQLite would apply it to the restored log: \
             move it away first",
            stray.display(),
            log.display()
        )));
    }
    let partial = with_suffix(log, ".restoring");
    let copied = if with_suffix(backup, "-wal").exists() {
        copy_through_sqlite(backup, &partial)
    } else {
        std::fs::copy(backup, &partial)
            .map(drop)
            .map_err(|e| io("copy the backup", e))
    };
    let restored = copied
        .and_then(|()| {
            std::fs::File::open(&partial)
                .and_then(|file| file.sync_all())
                .map_err(|e| io("flush the restored log", e))
        })
        .and_then(|()| inspect_backup(&partial));
    let summary = match restored {
        Ok(restored) => BackupSummary {
            bytes: summary.bytes,
            ..restored
        },
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    let mut kept = None;
    if log.exists() {
        // The WAL keeps its place after the database's name, where SQLite looks for it.
        let suffix = format!(".replaced-{}", crate::clock::now_ms());
        for ending in ["", "-wal", "-shm"] {
            let from = with_suffix(log, ending);
            if from.exists() {
                std::fs::rename(&from, with_suffix(log, &format!("{suffix}{ending}")))
                    .map_err(|e| io("keep the log being replaced", e))?;
            }
        }
        kept = Some(with_suffix(log, &suffix));
    }
    std::fs::rename(&partial, log).map_err(|e| io("put the restored log in place", e))?;
    if let Some(dir) = log.parent() {
        let _ = std::fs::File::open(dir).and_then(|dir| dir.sync_all());
    }
    Ok((summary, kept))
}

/// Copies the log at `from`, with what its WAL holds, into a new file at `to`.
fn copy_through_sqlite(from: &Path, to: &Path) -> Result<(), BusError> {
    let target = to
        .to_str()
        .ok_or_else(|| BusError::Storage(format!("{} is not a UTF-8 path", to.display())))?;
    let conn = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| BusError::Storage(format!("cannot open {}: {e}", from.display())))?;
    conn.execute("VACUUM INTO ?1", [target])
        .map(drop)
        .map_err(|e| BusError::Storage(format!("cannot copy {}: {e}", from.display())))
}

#[cfg(test)]
mod tests {
    use crate::bus::Bus;
    use crate::bus::sqlite::{SqliteBus, SqliteOptions};

    /// A log a host left with commits still in its WAL restores whole.
    #[tokio::test]
    async fn a_backup_with_its_own_wal_is_restored_with_what_the_wal_holds() {
        let dir = tempfile::tempdir().unwrap();
        let left = dir.path().join("left.db");
        let bus = SqliteBus::open(SqliteOptions::new(dir.path().join("live.db"))).unwrap();
        let events = (0..5)
            .map(|n| crate::bus::sqlite::test_event(&format!("e{n}"), 2))
            .collect();
        bus.append(events).await.unwrap();
        // The files as a host that died now leaves them: the events are in the WAL.
        std::fs::copy(dir.path().join("live.db"), &left).unwrap();
        std::fs::copy(
            dir.path().join("live.db-wal"),
            dir.path().join("left.db-wal"),
        )
        .unwrap();
        drop(bus);

        let log = dir.path().join("restored.db");
        let (summary, _) = super::restore_backup(&left, &log, false).unwrap();
        assert_eq!((summary.events, summary.last_sequence), (5, 5));
        let restored = SqliteBus::open(SqliteOptions::new(&log)).unwrap();
        assert_eq!(restored.head().await.unwrap(), 5);
    }

    #[test]
    fn a_backup_wants_room_for_the_copy_and_for_the_log_to_grow() {
        let dir = std::path::Path::new("/data");
        let gib = 1u64 << 30;
        let refused = super::check_room(gib, gib + (64 << 20), dir).unwrap_err();
        assert!(
            matches!(refused, crate::bus::BusError::NoRoom(_)),
            "{refused}"
        );
        assert!(refused.to_string().contains("/data has"), "{refused}");
        assert!(super::check_room(gib, 2 * gib, dir).is_ok());
        assert!(super::check_room(1 << 20, 6 << 20, dir).is_ok());
        assert!(super::check_room(1 << 20, 4 << 20, dir).is_err());
    }

    #[test]
    fn opening_the_log_removes_copies_a_dead_backup_left_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("switchyard.db");
        let left = dir.path().join("switchyard.db.backup-0f1e");
        let other = dir.path().join("keep.db.backup-0f1e");
        std::fs::write(&left, b"half a copy").unwrap();
        std::fs::write(&other, b"not ours").unwrap();
        drop(SqliteBus::open(SqliteOptions::new(&log)).unwrap());
        assert!(!left.exists());
        assert!(other.exists());
    }
}
