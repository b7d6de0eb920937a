//! The embedded bus: one SQLite database file in WAL mode.
//!
//! Tables (layout in `schema.rs`, its version in `PRAGMA user_version`):
//! - `events`: the log; an event's sequence is its rowid, and a unique `(source, id)`
//!   index makes a repeated append answer with the first sequence;
//! - `cursors`, `acked`, `retries`: each plugin's position (see below);
//! - `dead_letters`: deliveries given up on, by plugin; their ids are never reused;
//! - `kv`: each plugin's keys and values;
//! - `subscriptions`: the patterns each plugin's consumer last opened with, which decide
//!   the events its cursor holds back from retention;
//! - `streams`, `stream_events`: each subject's stream version and the sequences of its
//!   events by version (see [`crate::stream`]);
//! - `scheduled`: events waiting for their due time, by id (see [`crate::schedule`]).
//!
//! Writes go through ONE writer thread that group-commits: it takes every job waiting
//! (up to a bound), runs each inside its own savepoint of one transaction, commits once
//! and only then answers the jobs. So an append is acknowledged only after the commit that
//! holds it, a job that fails rolls back alone, and a settlement's effects, cursor move,
//! retry entry or dead letter land together.
//!
//! With [`Durability::Full`], a group that holds an append or an operator's action is
//! fsynced before it is answered. A group of settlements only is committed without waiting
//! for the disk: it becomes durable with the next fsynced commit or checkpoint. Losing such
//! a commit to a power cut loses an acknowledgement together with the effects committed
//! beside it, so the event is delivered again and its effects are applied once; waiting
//! for an fsync per settlement would instead cap a plugin at `concurrency` events per disk
//! flush.
//! Reads use a small pool of separate connections, which WAL lets run beside the writer.
//!
//! Consumer bookkeeping: a plugin's `cursor` is the highest sequence below which every
//! event is settled for it. Events settled out of order above the cursor are recorded in
//! `acked` until the cursor passes them, so a restart skips them. A retry or a dead
//! letter settles the event for the main stream too; retries live in `retries` until
//! they succeed or die.
//!
//! Files:
//! - `backup.rs`: consistent copies of the log while it serves, and restoring one;
//! - `mod.rs`: the options, [`SqliteBus`] with its read pool, the [`Bus`] impl, and what
//!   the other files share (storage errors, integer conversions, event rows, the
//!   encoding of attempt errors);
//! - `schema.rs`: the tables, their version, opening a connection, schema and
//!   writability checks;
//! - `writer.rs`: the writer thread, its jobs and its group-commit protocol;
//! - `ops.rs`: the SQL each writer job runs inside its savepoint;
//! - `consumer.rs`: a plugin's consumer, its in-memory position and the cursor it moves;
//! - `controls.rs`: the [`ControlStore`](super::ControlStore) impl (table `controls`);
//! - `dead_letters.rs`: the [`DeadLetters`](super::DeadLetters) impl;
//! - `kv.rs`: the [`KvSource`](crate::kv::KvSource) impl (KV, stream and schedule reads);
//! - `lock.rs`: the lock that keeps a second host off the log file;
//! - `schedules.rs`: the [`Schedules`](super::Schedules) impl;
//! - `schemas.rs`: the [`SchemaStore`](super::SchemaStore) impl (table `schemas`) and
//!   the process's settlement notices;
//! - `retention.rs`: the retention worker (deleting old events, giving space back) and
//!   the SQL of its writer jobs.

mod backup;
mod consumer;
mod controls;
mod dead_letters;
mod kv;
mod lock;
mod ops;
mod retention;
mod schedules;
mod schema;
mod schemas;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

pub use self::backup::{BackupSummary, inspect_backup, restore_backup};
pub use self::lock::{LogLock, lock_log};
pub use self::retention::{NoObserver, RetentionObserver, RetentionOptions};

use self::consumer::SqliteConsumer;
use self::schema::{check_schema, check_writable, open_connection, open_writer_connection};
use self::writer::{Job, Reply};
use super::{
    Appended, Bus, BusError, Consumer, ConsumerSpec, ConsumerStats, LocalNotices, LogPage,
    LogQuery, PluginControl, StoredEvent,
};
use crate::event::Event;
use crate::failure::AttemptError;

/// Rows scanned per read when looking for a consumer's next events.
const SCAN_CHUNK: i64 = 512;

/// How hard each commit is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// fsync at every commit: an acknowledged event survives power loss.
    #[default]
    Full,
    /// fsync at checkpoints only: survives a crash of the process, not of the machine.
    Normal,
}

/// Settings of the embedded bus.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// The database file.
    pub path: PathBuf,
    /// How hard commits are made durable.
    pub durability: Durability,
    /// Most events one group commit takes.
    pub group_commit_max_events: usize,
    /// How long the writer waits for more jobs after the first one of a group; zero
    /// commits as soon as the writer is free.
    pub group_commit_max_delay: Duration,
    /// Appends that may wait for the writer before new ones are refused.
    pub max_pending_events: usize,
    /// What retention deletes, and when; by default nothing.
    pub retention: RetentionOptions,
}

impl SqliteOptions {
    /// Defaults for a database at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::Full,
            group_commit_max_events: 4096,
            group_commit_max_delay: Duration::ZERO,
            max_pending_events: 100_000,
            retention: RetentionOptions::default(),
        }
    }
}

/// The embedded bus. Cheap to clone.
#[derive(Clone)]
pub struct SqliteBus {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    jobs: mpsc::UnboundedSender<Job>,
    pending_events: AtomicUsize,
    max_pending_events: usize,
    readers: Mutex<Vec<Connection>>,
    /// A counter bumped after every commit that adds events or due retries.
    generation: watch::Sender<u64>,
    closed: AtomicBool,
    /// Types whose schemas this process changed.
    schema_changes: tokio::sync::broadcast::Sender<String>,
    /// Plugins whose controls this process changed.
    control_changes: tokio::sync::broadcast::Sender<String>,
    notices: LocalNotices,
    /// Which plugins have a consumer open, and the retention worker's stop signal.
    retention: retention::Shared,
    /// Taken by a backup while it copies the log: one copy is made at a time.
    backup: tokio::sync::Mutex<()>,
}

/// Names the storage failures an operator can act on (a full disk, read-only storage) in
/// words, keeping SQLite's own message after them.
fn storage(error: rusqlite::Error) -> BusError {
    let condition = match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => "the disk holding the log is full",
        Some(rusqlite::ErrorCode::ReadOnly) => "the log's storage is read-only",
        Some(rusqlite::ErrorCode::SystemIoFailure) => "the log's storage failed an I/O",
        _ => return BusError::Storage(error.to_string()),
    };
    BusError::Storage(format!("{condition} ({error})"))
}

/// `path` with `suffix` added to its file name: the files that go with the log
/// (`.lock`, `.backup-…`, `.replaced-…`, and SQLite's own `-wal` and `-shm`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl SqliteBus {
    /// Opens (creating if needed) the database and starts the writer thread.
    pub fn open(options: SqliteOptions) -> Result<Self, BusError> {
        Self::open_tuned(options, |_| Ok(()))
    }

    /// [`SqliteBus::open`], with `tune` applied to the writer's connection first (tests
    /// give it a storage limit, to meet a full disk without one).
    fn open_tuned(
        options: SqliteOptions,
        tune: impl FnOnce(&Connection) -> rusqlite::Result<()>,
    ) -> Result<Self, BusError> {
        if let Some(dir) = options.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| BusError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        }
        if let Some(dir) = options.path.parent() {
            check_writable(dir)?;
        }
        backup::remove_stale_copies(&options.path);
        let conn = open_writer_connection(&options.path, options.durability).map_err(|e| {
            BusError::Storage(format!("cannot open {}: {e}", options.path.display()))
        })?;
        // SQLite falls back to a read-only open when it cannot write; refuse that up front
        // rather than failing every append later.
        if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false) {
            return Err(BusError::Storage(format!(
                "cannot open {} for writing: its storage is read-only",
                options.path.display()
            )));
        }
        check_schema(&conn, &options.path)?;
        tune(&conn).map_err(storage)?;
        let (jobs, receiver) = mpsc::unbounded_channel();
        let (generation, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            path: options.path.clone(),
            jobs,
            pending_events: AtomicUsize::new(0),
            max_pending_events: options.max_pending_events,
            readers: Mutex::new(Vec::new()),
            generation,
            closed: AtomicBool::new(false),
            schema_changes: tokio::sync::broadcast::channel(64).0,
            control_changes: tokio::sync::broadcast::channel(64).0,
            notices: LocalNotices::default(),
            retention: retention::Shared::default(),
            backup: tokio::sync::Mutex::new(()),
        });
        writer::start(conn, &options, Arc::clone(&inner), receiver)?;
        retention::start(&inner, &options.path, &options.retention)?;
        Ok(Self { inner })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn submit<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, BusError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .send(job(reply))
            .map_err(|_| BusError::Closed)?;
        answer.await.map_err(|_| BusError::Closed)?
    }

    /// Runs a read on a pooled connection on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, BusError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let pooled = inner
                .readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let conn = match pooled {
                Some(conn) => conn,
                None => open_connection(&inner.path, Durability::Normal).map_err(storage)?,
            };
            let result = query(&conn).map_err(storage);
            inner
                .readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
            result
        })
        .await
        .map_err(|e| BusError::Storage(format!("read task failed: {e}")))?
    }
}

fn row_to_stored(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    let extensions: String = row.get(9)?;
    Ok(StoredEvent {
        sequence: to_u64(row.get(0)?),
        event: Event {
            id: row.get(1)?,
            source: row.get(2)?,
            ty: row.get(3)?,
            subject: row.get(4)?,
            time: row.get(5)?,
            datacontenttype: row.get(6)?,
            dataschema: row.get(7)?,
            data: row.get(8)?,
            extensions: serde_json::from_str(&extensions).unwrap_or_default(),
        },
        ingested_at_us: row.get(10)?,
    })
}

const EVENT_COLUMNS: &str = "seq, id, source, type, subject, time, datacontenttype, dataschema, data, extensions, ingested_at_us";

/// [`EVENT_COLUMNS`] of the events table named `alias` in a join.
fn event_columns_of(alias: &str) -> String {
    EVENT_COLUMNS
        .split(", ")
        .map(|column| format!("{alias}.{column}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn load_event(conn: &Connection, seq: u64) -> rusqlite::Result<Option<StoredEvent>> {
    conn.query_row(
        &format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq = ?1"),
        [to_i64(seq)],
        row_to_stored,
    )
    .optional()
}

fn parse_errors(text: &str) -> Vec<AttemptError> {
    serde_json::from_str(text).unwrap_or_default()
}

fn errors_json(errors: &[AttemptError]) -> String {
    serde_json::to_string(errors).unwrap_or_else(|_| "[]".to_owned())
}

/// Names broadcast within the process (types whose schemas, or plugins whose controls,
/// changed) as a stream; an empty name after missed ones says "read every one again".
pub(super) fn change_stream(
    changes: tokio::sync::broadcast::Receiver<String>,
) -> futures_util::stream::BoxStream<'static, String> {
    use futures_util::StreamExt as _;
    futures_util::stream::unfold(changes, |mut changes| async move {
        match changes.recv().await {
            Ok(name) => Some((name, changes)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                Some((String::new(), changes))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    })
    .boxed()
}

#[async_trait]
impl Bus for SqliteBus {
    async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>, BusError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let n = events.len();
        let pending = self.inner.pending_events.fetch_add(n, Ordering::AcqRel);
        if pending + n > self.inner.max_pending_events && pending > 0 {
            self.inner.pending_events.fetch_sub(n, Ordering::AcqRel);
            return Err(BusError::Saturated { pending });
        }
        let (reply, answer) = oneshot::channel();
        if self.inner.jobs.send(Job::Append { events, reply }).is_err() {
            self.inner.pending_events.fetch_sub(n, Ordering::AcqRel);
            return Err(BusError::Closed);
        }
        answer.await.map_err(|_| BusError::Closed)?
    }

    async fn read_log(&self, query: LogQuery) -> Result<LogPage, BusError> {
        self.read(move |conn| {
            let limit = query.limit.max(1);
            let mut events = Vec::new();
            let mut after = to_i64(query.after);
            // A subject's events are found through its stream's index, however few of
            // the log's they are; its versions and sequences rise together.
            let mut select = conn.prepare_cached(&match query.subject {
                None => format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ),
                Some(_) => format!(
                    "SELECT {} FROM stream_events s JOIN events e ON e.seq = s.seq
                     WHERE s.seq > ?1 AND s.subject = ?3 ORDER BY s.version LIMIT ?2",
                    event_columns_of("e")
                ),
            })?;
            // Bounded scan: at most 20 chunks per request, however sparse the matches.
            for _ in 0..20 {
                let rows = match &query.subject {
                    None => select.query_map(params![after, SCAN_CHUNK], row_to_stored)?,
                    Some(subject) => {
                        select.query_map(params![after, SCAN_CHUNK, subject], row_to_stored)?
                    }
                };
                let chunk: Vec<StoredEvent> = rows.collect::<rusqlite::Result<_>>()?;
                let Some(last) = chunk.last() else { break };
                after = to_i64(last.sequence);
                for stored in chunk {
                    if query.wants(&stored.event) {
                        let sequence = stored.sequence;
                        events.push(stored);
                        if events.len() == limit {
                            return Ok(LogPage {
                                events,
                                scanned_to: sequence,
                            });
                        }
                    }
                }
            }
            Ok(LogPage {
                events,
                scanned_to: to_u64(after),
            })
        })
        .await
    }

    async fn head(&self) -> Result<u64, BusError> {
        self.read(|conn| {
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(to_u64)
        })
        .await
    }

    async fn recent_events(
        &self,
        event_type: &str,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, BusError> {
        let event_type = event_type.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&schemas::recent_events_sql())?
                .query_map(params![event_type, to_i64(limit as u64)], row_to_stored)?
                .collect()
        })
        .await
    }

    async fn consumer(
        &self,
        plugin: &str,
        spec: ConsumerSpec,
    ) -> Result<Arc<dyn Consumer>, BusError> {
        Ok(Arc::new(SqliteConsumer::open(self, plugin, spec).await?))
    }

    async fn consumer_stats(&self, plugin: &str) -> Result<ConsumerStats, BusError> {
        let plugin = plugin.to_owned();
        self.read(move |conn| {
            let cursor: i64 = conn
                .query_row(
                    "SELECT position FROM cursors WHERE plugin = ?1",
                    [&plugin],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            let head: i64 =
                conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
            let retries: i64 = conn.query_row(
                "SELECT COUNT(*) FROM retries WHERE plugin = ?1",
                [&plugin],
                |r| r.get(0),
            )?;
            let dead: i64 = conn
                .query_row(
                    "SELECT letters FROM dead_letter_counts WHERE plugin = ?1",
                    [&plugin],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            Ok(ConsumerStats {
                cursor: to_u64(cursor),
                lag: to_u64(head.saturating_sub(cursor)),
                pending_retries: to_u64(retries),
                dead_letters: to_u64(dead),
            })
        })
        .await
    }

    async fn plugins_with_consumers(&self) -> Result<Vec<String>, BusError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT plugin FROM cursors ORDER BY plugin")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn forget_plugin(&self, plugin: &str) -> Result<(), BusError> {
        let control = serde_json::to_string(&PluginControl::default())
            .map_err(|e| BusError::Storage(e.to_string()))?;
        self.submit(|reply| Job::Forget {
            plugin: plugin.to_owned(),
            control,
            reply,
        })
        .await?;
        let _ = self.inner.control_changes.send(plugin.to_owned());
        Ok(())
    }

    async fn consumer_lag(&self, plugin: &str) -> Result<u64, BusError> {
        let plugin = plugin.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT COALESCE(MAX(seq), 0) - COALESCE((SELECT position FROM cursors WHERE plugin = ?1), 0)
                 FROM events",
                [&plugin],
                |r| r.get::<_, i64>(0),
            )
            .map(to_u64)
        })
        .await
    }

    async fn backup_ready(&self) -> Result<(), BusError> {
        self.backup_room().await
    }

    async fn backup(&self) -> Result<(std::fs::File, u64), BusError> {
        self.backup_file().await
    }

    async fn close(&self) -> Result<(), BusError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.inner.retention.stop();
        self.submit(|reply| Job::Close { reply }).await
    }
}

/// An event of type `t.x` from `/test` with `bytes` bytes of data, for the log's tests.
#[cfg(test)]
pub(super) fn test_event(id: &str, bytes: usize) -> Event {
    Event {
        id: id.to_owned(),
        source: "/test".to_owned(),
        ty: "t.x".to_owned(),
        subject: None,
        time: None,
        datacontenttype: None,
        dataschema: None,
        data: vec![b'x'; bytes],
        extensions: std::collections::BTreeMap::new(),
    }
}
