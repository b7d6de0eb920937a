//! One host per embedded log: the lock a host takes on its log file before it opens it.
//!
//! SQLite lets several processes open one database, but the embedded log's delivery
//! bookkeeping is one host's: each plugin's consumer keeps its position and the
//! deliveries it holds in memory, so a second host on the same file would deliver every
//! event again and run each plugin twice. Several hosts share events through NATS
//! JetStream instead.
//!
//! Invariants:
//! - The lock is an advisory `flock` on `<log>.lock`, held as long as the [`LogLock`]
//!   lives; the kernel releases it when the process ends however it ends (SIGKILL
//!   included), so a lock file left behind never blocks a restart.
//! - The file holds the holder's process id, written once it holds the lock, only to
//!   name it in the refusal.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use crate::bus::BusError;

/// The lock on an embedded log; the log is free again when it is dropped.
#[derive(Debug)]
pub struct LogLock {
    _file: File,
}

/// The lock file of the log at `log`.
pub fn lock_path(log: &Path) -> PathBuf {
    super::with_suffix(log, ".lock")
}

/// Takes the lock on the log at `log`, creating its directory if needed; refused when
/// another process holds it.
pub fn lock_log(log: &Path) -> Result<LogLock, BusError> {
    let path = lock_path(log);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| unusable(dir, &e))?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| unusable(path.parent().unwrap_or(&path), &e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_owned(),
                pid => format!("another process (pid {pid})"),
            };
            return Err(BusError::Storage(format!(
                "the log {} is in use by {holder}: one host runs on an embedded log at a \
                 time. Stop that host, or give this one another data directory; several \
                 hosts share events through NATS JetStream ([bus] kind = \"nats\")",
                log.display()
            )));
        }
        Err(TryLockError::Error(e)) => {
            return Err(BusError::Storage(format!(
                "cannot lock {}: {e}",
                path.display()
            )));
        }
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(pid.as_bytes()))
        .map_err(|e| unusable(path.parent().unwrap_or(&path), &e))?;
    Ok(LogLock { _file: file })
}

/// The data directory cannot hold the log, in words an operator acts on.
fn unusable(dir: &Path, error: &std::io::Error) -> BusError {
    match error.kind() {
        ErrorKind::ReadOnlyFilesystem => BusError::Storage(format!(
            "the log's storage is read-only: {} cannot be written ({error})",
            dir.display()
        )),
        _ => BusError::Storage(format!("cannot use {}: {error}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_log_is_refused_naming_its_holder_and_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("data").join("switchyard.db");
        let held = lock_log(&log).unwrap();
        assert_eq!(
            std::fs::read_to_string(lock_path(&log)).unwrap(),
            format!("{}\n", std::process::id())
        );
        // `flock` locks belong to an open file, so a second open in this process is
        // refused as another host's would be.
        let Err(BusError::Storage(message)) = lock_log(&log) else {
            panic!("a second lock on a held log was granted");
        };
        assert!(
            message.contains(&format!(
                "in use by another process (pid {})",
                std::process::id()
            )),
            "{message}"
        );
        drop(held);
        assert!(lock_log(&log).is_ok());
    }
}
