//! The embedded bus: one SQLite database file in WAL mode.
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

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Appended, Bus, BusError, Consumer, ConsumerSpec, ConsumerStats, DeadLetter, DeadLetterQuery,
    DeadLetterReason, DeadLetters, Delivery, LogPage, LogQuery, Settlement, StartPosition,
    StoredEvent,
};
use crate::clock::{now_ms, now_us};
use crate::effects::Effects;
use crate::event::Event;
use crate::failure::AttemptError;
use crate::kv::{KvError, KvRead, KvSource, keys_digest, value_digest};
use crate::pattern::Pattern;

/// Rows scanned per read when looking for a consumer's next events.
const SCAN_CHUNK: i64 = 512;
/// Most event data a consumer keeps read ahead of its deliveries.
const MAX_PREFETCH_BYTES: usize = 4 << 20;
/// Page cache of the writer's connection, in KiB.
const WRITER_CACHE_KIB: i64 = 16 * 1024;
/// Prepared statements the writer keeps: more than the distinct statements it runs.
const WRITER_STATEMENTS: usize = 64;
/// Longest a consumer waits before returning an empty batch.
const IDLE_WAIT: Duration = Duration::from_millis(250);

/// The layout version kept in `PRAGMA user_version`; a log of another version is refused
/// rather than misread.
const SCHEMA_VERSION: i64 = 2;

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
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plugin TEXT NOT NULL,
    seq INTEGER NOT NULL,
    reason TEXT NOT NULL,
    errors TEXT NOT NULL,
    dead_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_plugin ON dead_letters (plugin, id);
CREATE TABLE IF NOT EXISTS kv (
    plugin TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (plugin, key)
) WITHOUT ROWID;
";

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
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, BusError>>;

enum Job {
    Append {
        events: Vec<Event>,
        reply: Reply<Vec<Appended>>,
    },
    OpenCursor {
        plugin: String,
        start: StartPosition,
        reply: Reply<u64>,
    },
    Settle(Box<SettleJob>),
    MoveCursor {
        plugin: String,
        cursor: u64,
    },
    Replay {
        id: Option<u64>,
        plugin: Option<String>,
        reply: Reply<u64>,
    },
    DeleteDeadLetter {
        id: u64,
        reply: Reply<()>,
    },
    Close {
        reply: Reply<()>,
    },
}

struct SettleJob {
    plugin: String,
    seq: u64,
    is_retry: bool,
    /// The new cursor, for settlements of main-stream deliveries.
    cursor: u64,
    settlement: Settlement,
    reply: Reply<()>,
}

impl Job {
    /// Whether the job's answer promises durability: appends (a `202`), operator actions
    /// and closing. Settlements may be lost to a power cut and redelivered.
    fn must_be_durable(&self) -> bool {
        !matches!(self, Job::Settle(_) | Job::MoveCursor { .. })
    }

    fn weight(&self) -> usize {
        match self {
            Job::Append { events, .. } => events.len(),
            Job::Settle(job) => match &job.settlement {
                Settlement::Ack(effects) => 1 + effects.emits.len(),
                _ => 1,
            },
            _ => 1,
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

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn open_connection(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |row| {
        row.get::<_, String>(0)
    })?;
    let synchronous = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    Ok(conn)
}

/// Creates the tables of a new log, or checks that an existing one has this layout.
fn check_schema(conn: &Connection, path: &Path) -> Result<(), BusError> {
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
    if existing > 0 && version != SCHEMA_VERSION {
        return Err(BusError::Storage(format!(
            "the log {} has layout version {version} and this host reads version \
             {SCHEMA_VERSION}; start with an empty data directory",
            path.display()
        )));
    }
    conn.execute_batch(SCHEMA).map_err(storage)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(storage)
}

/// Fails with a clear message when the log's directory cannot take writes, which SQLite
/// would otherwise report as "unable to open database file" or only at the first append.
fn check_writable(dir: &Path) -> Result<(), BusError> {
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

impl SqliteBus {
    /// Opens (creating if needed) the database and starts the writer thread.
    pub fn open(options: SqliteOptions) -> Result<Self, BusError> {
        if let Some(dir) = options.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| BusError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        }
        if let Some(dir) = options.path.parent() {
            check_writable(dir)?;
        }
        let conn = open_connection(&options.path, options.durability).map_err(|e| {
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
        // Every append searches the `(source, id)` index; with SQLite's default 2 MiB
        // cache a large log reads its pages back from the file at every commit.
        conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB.saturating_neg())
            .map_err(storage)?;
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
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
        });
        let writer = Writer {
            conn,
            durability: options.durability,
            syncing: options.durability == Durability::Full,
            inner: Arc::clone(&inner),
            max_events: options.group_commit_max_events.max(1),
            max_delay: options.group_commit_max_delay,
        };
        std::thread::Builder::new()
            .name("switchyard-log-writer".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(|e| BusError::Storage(format!("cannot start the log writer: {e}")))?;
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

/// The writer thread.
struct Writer {
    conn: Connection,
    durability: Durability,
    /// Whether the connection is set to `synchronous = FULL` now.
    syncing: bool,
    inner: Arc<Inner>,
    max_events: usize,
    max_delay: Duration,
}

/// What a job will answer once the group commits.
enum Answer {
    Appended(Reply<Vec<Appended>>, Result<Vec<Appended>, BusError>, usize),
    Position(Reply<u64>, Result<u64, BusError>),
    Count(Reply<u64>, Result<u64, BusError>),
    Done(Reply<()>, Result<(), BusError>),
    Nothing,
}

impl Answer {
    fn fail(self, error: &BusError) -> Self {
        let again = || match error {
            BusError::Storage(message) => BusError::Storage(message.clone()),
            other => BusError::Storage(other.to_string()),
        };
        match self {
            Answer::Appended(reply, _, n) => Answer::Appended(reply, Err(again()), n),
            Answer::Position(reply, _) => Answer::Position(reply, Err(again())),
            Answer::Count(reply, _) => Answer::Count(reply, Err(again())),
            Answer::Done(reply, _) => Answer::Done(reply, Err(again())),
            Answer::Nothing => Answer::Nothing,
        }
    }

    fn send(self, inner: &Inner) {
        match self {
            Answer::Appended(reply, result, n) => {
                inner.pending_events.fetch_sub(n, Ordering::AcqRel);
                let _ = reply.send(result);
            }
            Answer::Position(reply, result) | Answer::Count(reply, result) => {
                let _ = reply.send(result);
            }
            Answer::Done(reply, result) => {
                let _ = reply.send(result);
            }
            Answer::Nothing => {}
        }
    }
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Job>) {
        while let Some(first) = receiver.blocking_recv() {
            let mut weight = first.weight();
            let mut batch = vec![first];
            if !self.max_delay.is_zero() && weight < self.max_events {
                std::thread::sleep(self.max_delay);
            }
            while weight < self.max_events {
                match receiver.try_recv() {
                    Ok(job) => {
                        weight += job.weight();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            let closing = self.commit_group(batch);
            if closing {
                break;
            }
        }
        self.inner.closed.store(true, Ordering::Release);
    }

    /// Runs a group of jobs in one transaction; returns whether a close was asked for.
    fn commit_group(&mut self, batch: Vec<Job>) -> bool {
        let sync = self.durability == Durability::Full && batch.iter().any(Job::must_be_durable);
        if let Err(error) = self.set_syncing(sync) {
            tracing::error!(error = %error, "cannot switch the log's fsync mode");
            if sync {
                // Committing without the fsync the answers promise is not an option.
                for job in batch {
                    answer_error(job, BusError::Storage(error.to_string())).send(&self.inner);
                }
                return false;
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut closing = false;
        let mut wake = false;
        let outcome = (|| -> Result<(), BusError> {
            let tx = self.conn.transaction().map_err(storage)?;
            for job in batch {
                let answer = match job {
                    Job::Close { reply } => {
                        closing = true;
                        Answer::Done(reply, Ok(()))
                    }
                    job => run_in_savepoint(&tx, job, &mut wake),
                };
                answers.push(answer);
            }
            tx.commit().map_err(storage)
        })();
        match outcome {
            Ok(()) => {
                for answer in answers {
                    answer.send(&self.inner);
                }
                if wake {
                    self.inner.generation.send_modify(|g| *g += 1);
                }
            }
            Err(error) => {
                tracing::error!(error = %error, "log commit failed");
                for answer in answers {
                    answer.fail(&error).send(&self.inner);
                }
            }
        }
        closing
    }
}

impl Writer {
    /// Switches between fsyncing every commit and leaving it to the next one that does.
    fn set_syncing(&mut self, sync: bool) -> Result<(), BusError> {
        if self.syncing != sync {
            let level = if sync { "FULL" } else { "NORMAL" };
            self.conn
                .pragma_update(None, "synchronous", level)
                .map_err(storage)?;
            self.syncing = sync;
        }
        Ok(())
    }
}

/// Runs one job inside its own savepoint of the group's transaction, so a failing job
/// rolls back alone.
fn run_in_savepoint(savepoint: &Connection, job: Job, wake: &mut bool) -> Answer {
    if let Err(e) = exec(savepoint, "SAVEPOINT job", []) {
        return answer_error(job, storage(e));
    }
    let (answer, ok) = match job {
        Job::Append { events, reply } => {
            let n = events.len();
            let result = append_events(savepoint, &events);
            let ok = result.is_ok();
            *wake |= ok;
            (Answer::Appended(reply, result.map_err(storage), n), ok)
        }
        Job::OpenCursor {
            plugin,
            start,
            reply,
        } => {
            let result = open_cursor(savepoint, &plugin, start);
            let ok = result.is_ok();
            (Answer::Position(reply, result.map_err(storage)), ok)
        }
        Job::Settle(job) => {
            let SettleJob {
                plugin,
                seq,
                is_retry,
                cursor,
                settlement,
                reply,
            } = *job;
            let adds_events = matches!(&settlement, Settlement::Ack(e) if !e.emits.is_empty());
            let result = settle(savepoint, &plugin, seq, is_retry, cursor, settlement);
            let ok = result.is_ok();
            *wake |= ok && adds_events;
            (Answer::Done(reply, result), ok)
        }
        Job::MoveCursor { plugin, cursor } => {
            let ok = move_cursor(savepoint, &plugin, cursor).is_ok();
            (Answer::Nothing, ok)
        }
        Job::Replay { id, plugin, reply } => {
            let result = replay(savepoint, id, plugin.as_deref());
            let ok = result.is_ok();
            *wake |= ok;
            (Answer::Count(reply, result), ok)
        }
        Job::DeleteDeadLetter { id, reply } => {
            let result = exec(
                savepoint,
                "DELETE FROM dead_letters WHERE id = ?1",
                [to_i64(id)],
            )
            .map_err(storage)
            .and_then(|n| {
                if n == 0 {
                    Err(BusError::NotFound(format!("dead letter {id}")))
                } else {
                    Ok(())
                }
            });
            let ok = result.is_ok();
            (Answer::Done(reply, result), ok)
        }
        Job::Close { reply } => (Answer::Done(reply, Ok(())), true),
    };
    if ok {
        if let Err(e) = exec(savepoint, "RELEASE job", []) {
            return answer.fail(&storage(e));
        }
    } else if let Err(e) =
        exec(savepoint, "ROLLBACK TO job", []).and_then(|_| exec(savepoint, "RELEASE job", []))
    {
        // The group's commit reports what is wrong with the transaction.
        tracing::error!(error = %e, "cannot roll back a failed log job");
    }
    answer
}

/// Runs one statement through the connection's statement cache: the writer runs the
/// same few statements for every job, and parsing them each time would cost more than
/// running them.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn answer_error(job: Job, error: BusError) -> Answer {
    let answer = match job {
        Job::Append { events, reply } => Answer::Appended(reply, Ok(Vec::new()), events.len()),
        Job::OpenCursor { reply, .. } => Answer::Position(reply, Ok(0)),
        Job::Settle(job) => Answer::Done(job.reply, Ok(())),
        Job::Replay { reply, .. } => Answer::Count(reply, Ok(0)),
        Job::DeleteDeadLetter { reply, .. } | Job::Close { reply } => Answer::Done(reply, Ok(())),
        Job::MoveCursor { .. } => Answer::Nothing,
    };
    answer.fail(&error)
}

fn append_events(conn: &Connection, events: &[Event]) -> rusqlite::Result<Vec<Appended>> {
    let now = now_us();
    // The unique index finds a duplicate during the insert itself, so a fresh event (the
    // common case) costs one index search instead of a lookup and then an insert.
    let mut insert = conn.prepare_cached(
        "INSERT INTO events (id, source, type, subject, time, datacontenttype, dataschema, data, extensions, ingested_at_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (source, id) DO NOTHING",
    )?;
    let mut appended = Vec::with_capacity(events.len());
    for event in events {
        let extensions: Cow<'_, str> = if event.extensions.is_empty() {
            Cow::Borrowed("{}")
        } else {
            Cow::Owned(serde_json::to_string(&event.extensions).unwrap_or_else(|_| "{}".to_owned()))
        };
        let inserted = insert.execute(params![
            event.id,
            event.source,
            event.ty,
            event.subject,
            event.time,
            event.datacontenttype,
            event.dataschema,
            event.data,
            extensions,
            now
        ])? == 1;
        let sequence = if inserted {
            conn.last_insert_rowid()
        } else {
            conn.prepare_cached("SELECT seq FROM events WHERE source = ?1 AND id = ?2")?
                .query_row(params![event.source, event.id], |r| r.get(0))?
        };
        appended.push(Appended {
            sequence: to_u64(sequence),
            duplicate: !inserted,
        });
    }
    Ok(appended)
}

fn open_cursor(conn: &Connection, plugin: &str, start: StartPosition) -> rusqlite::Result<u64> {
    let existing: Option<i64> = conn
        .query_row(
            "SELECT position FROM cursors WHERE plugin = ?1",
            [plugin],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(position) = existing {
        return Ok(to_u64(position));
    }
    let position: i64 = match start {
        StartPosition::Earliest => 0,
        StartPosition::Latest => {
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?
        }
    };
    exec(
        conn,
        "INSERT INTO cursors (plugin, position) VALUES (?1, ?2)",
        params![plugin, position],
    )?;
    Ok(to_u64(position))
}

fn move_cursor(conn: &Connection, plugin: &str, cursor: u64) -> rusqlite::Result<()> {
    exec(
        conn,
        "UPDATE cursors SET position = MAX(position, ?2) WHERE plugin = ?1",
        params![plugin, to_i64(cursor)],
    )?;
    exec(
        conn,
        "DELETE FROM acked WHERE plugin = ?1 AND seq <= ?2",
        params![plugin, to_i64(cursor)],
    )?;
    Ok(())
}

fn apply_effects(conn: &Connection, plugin: &str, effects: &Effects) -> rusqlite::Result<()> {
    append_events(conn, &effects.emits)?;
    let mut set = conn.prepare_cached(
        "INSERT INTO kv (plugin, key, value) VALUES (?1, ?2, ?3)
         ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
    )?;
    let mut delete = conn.prepare_cached("DELETE FROM kv WHERE plugin = ?1 AND key = ?2")?;
    for write in &effects.kv_writes {
        match &write.value {
            Some(value) => set.execute(params![plugin, write.key, value])?,
            None => delete.execute(params![plugin, write.key])?,
        };
    }
    Ok(())
}

/// Checks that what an attempt read of its plugin's KV is still what is committed.
fn check_reads(conn: &Connection, plugin: &str, reads: &[KvRead]) -> Result<(), BusError> {
    let mut value = conn
        .prepare_cached("SELECT value FROM kv WHERE plugin = ?1 AND key = ?2")
        .map_err(storage)?;
    let mut keys = conn
        .prepare_cached("SELECT key FROM kv WHERE plugin = ?1 AND key >= ?2 ORDER BY key")
        .map_err(storage)?;
    for read in reads {
        match read {
            KvRead::Value { key, digest } => {
                let current: Option<Vec<u8>> = value
                    .query_row(params![plugin, key], |r| r.get(0))
                    .optional()
                    .map_err(storage)?;
                if current.as_deref().map(value_digest) != *digest {
                    return Err(BusError::Conflict(key.clone()));
                }
            }
            KvRead::Keys { prefix, digest } => {
                let mut rows = keys.query(params![plugin, prefix]).map_err(storage)?;
                let mut current = Vec::new();
                while let Some(row) = rows.next().map_err(storage)? {
                    let key: String = row.get(0).map_err(storage)?;
                    if !key.starts_with(prefix.as_str()) {
                        break;
                    }
                    current.push(key);
                }
                if keys_digest(current.iter().map(String::as_str)) != *digest {
                    return Err(BusError::Conflict(format!("{prefix}*")));
                }
            }
        }
    }
    Ok(())
}

fn settle(
    conn: &Connection,
    plugin: &str,
    seq: u64,
    is_retry: bool,
    cursor: u64,
    settlement: Settlement,
) -> Result<(), BusError> {
    if let Settlement::Ack(effects) = &settlement {
        check_reads(conn, plugin, &effects.kv_reads)?;
    }
    settle_checked(conn, plugin, seq, is_retry, cursor, settlement).map_err(storage)
}

fn settle_checked(
    conn: &Connection,
    plugin: &str,
    seq: u64,
    is_retry: bool,
    cursor: u64,
    settlement: Settlement,
) -> rusqlite::Result<()> {
    let now = now_ms();
    match &settlement {
        Settlement::Ack(effects) => {
            apply_effects(conn, plugin, effects)?;
            if is_retry {
                exec(
                    conn,
                    "DELETE FROM retries WHERE plugin = ?1 AND seq = ?2",
                    params![plugin, to_i64(seq)],
                )?;
            }
        }
        Settlement::Retry { delay, errors } => {
            let due = now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
            let attempt = i64::try_from(errors.len()).unwrap_or(i64::MAX) + 1;
            exec(
            conn,
                "INSERT INTO retries (plugin, seq, attempt, due_at, errors) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (plugin, seq) DO UPDATE SET attempt = excluded.attempt, due_at = excluded.due_at, errors = excluded.errors",
                params![plugin, to_i64(seq), attempt, due, errors_json(errors)],
            )?;
        }
        Settlement::DeadLetter { reason, errors } => {
            if is_retry {
                exec(
                    conn,
                    "DELETE FROM retries WHERE plugin = ?1 AND seq = ?2",
                    params![plugin, to_i64(seq)],
                )?;
            }
            exec(
                conn,
                "INSERT INTO dead_letters (plugin, seq, reason, errors, dead_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    plugin,
                    to_i64(seq),
                    reason.as_str(),
                    errors_json(errors),
                    now
                ],
            )?;
        }
    }
    if !is_retry {
        move_cursor(conn, plugin, cursor)?;
        if seq > cursor {
            exec(
                conn,
                "INSERT OR IGNORE INTO acked (plugin, seq) VALUES (?1, ?2)",
                params![plugin, to_i64(seq)],
            )?;
        }
    }
    Ok(())
}

fn replay(conn: &Connection, id: Option<u64>, plugin: Option<&str>) -> Result<u64, BusError> {
    let rows: Vec<(i64, String, i64)> = {
        let mut select = conn
            .prepare(
                "SELECT id, plugin, seq FROM dead_letters
                 WHERE (?1 IS NULL OR id = ?1) AND (?2 IS NULL OR plugin = ?2)",
            )
            .map_err(storage)?;
        let rows = select
            .query_map(params![id.map(to_i64), plugin], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(storage)?;
        rows.collect::<rusqlite::Result<_>>().map_err(storage)?
    };
    if let (true, Some(id)) = (rows.is_empty(), id) {
        return Err(BusError::NotFound(format!("dead letter {id}")));
    }
    let now = now_ms();
    for (dead_id, plugin, seq) in &rows {
        exec(
            conn,
            "INSERT INTO retries (plugin, seq, attempt, due_at, errors) VALUES (?1, ?2, 1, ?3, '[]')
             ON CONFLICT (plugin, seq) DO UPDATE SET attempt = 1, due_at = excluded.due_at, errors = '[]'",
            params![plugin, seq, now],
        )
        .map_err(storage)?;
        exec(conn, "DELETE FROM dead_letters WHERE id = ?1", [dead_id]).map_err(storage)?;
    }
    Ok(rows.len() as u64)
}

#[async_trait]
impl KvSource for SqliteBus {
    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let (plugin, key) = (plugin.to_owned(), key.to_owned());
        Ok(self
            .read(move |conn| {
                conn.prepare_cached("SELECT value FROM kv WHERE plugin = ?1 AND key = ?2")?
                    .query_row(params![plugin, key], |r| r.get(0))
                    .optional()
            })
            .await?)
    }

    async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        let (plugin, prefix) = (plugin.to_owned(), prefix.to_owned());
        Ok(self
            .read(move |conn| {
                let mut select = conn.prepare_cached(
                    "SELECT key FROM kv WHERE plugin = ?1 AND key >= ?2 ORDER BY key",
                )?;
                let mut rows = select.query(params![plugin, prefix])?;
                let mut keys = Vec::new();
                while let Some(row) = rows.next()? {
                    let key: String = row.get(0)?;
                    if !key.starts_with(&prefix) {
                        break;
                    }
                    keys.push(key);
                }
                Ok(keys)
            })
            .await?)
    }
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
            let mut select = conn.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 AND (?2 IS NULL OR subject = ?2) ORDER BY seq LIMIT ?3"
            ))?;
            // Bounded scan: at most 20 chunks per request, however sparse the matches.
            for _ in 0..20 {
                let chunk: Vec<StoredEvent> = select
                    .query_map(params![after, query.subject, SCAN_CHUNK], row_to_stored)?
                    .collect::<rusqlite::Result<_>>()?;
                let Some(last) = chunk.last() else { break };
                after = to_i64(last.sequence);
                for stored in chunk {
                    if query.pattern.as_ref().is_none_or(|p| p.matches(&stored.event.ty)) {
                        let sequence = stored.sequence;
                        events.push(stored);
                        if events.len() == limit {
                            return Ok(LogPage { events, scanned_to: sequence });
                        }
                    }
                }
            }
            Ok(LogPage { events, scanned_to: to_u64(after) })
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

    async fn consumer(
        &self,
        plugin: &str,
        spec: ConsumerSpec,
    ) -> Result<Arc<dyn Consumer>, BusError> {
        let name = plugin.to_owned();
        let start = spec.start;
        let cursor = self
            .submit(|reply| Job::OpenCursor {
                plugin: name,
                start,
                reply,
            })
            .await?;
        let name = plugin.to_owned();
        let skip: BTreeSet<u64> = self
            .read(move |conn| {
                let mut select =
                    conn.prepare("SELECT seq FROM acked WHERE plugin = ?1 AND seq > ?2")?;
                let rows = select.query_map(params![name, to_i64(cursor)], |r| {
                    r.get::<_, i64>(0).map(to_u64)
                })?;
                rows.collect()
            })
            .await?;
        Ok(Arc::new(SqliteConsumer {
            bus: self.clone(),
            plugin: plugin.to_owned(),
            patterns: spec.patterns,
            window: spec.window.max(1),
            room: tokio::sync::Notify::new(),
            state: Mutex::new(ConsumerState {
                read_position: cursor,
                persisted_cursor: cursor,
                outstanding: BTreeSet::new(),
                skip,
                retries_in_flight: HashSet::new(),
                prefetched: VecDeque::new(),
            }),
        }))
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
            let dead: i64 = conn.query_row(
                "SELECT COUNT(*) FROM dead_letters WHERE plugin = ?1",
                [&plugin],
                |r| r.get(0),
            )?;
            Ok(ConsumerStats {
                cursor: to_u64(cursor),
                lag: to_u64(head.saturating_sub(cursor)),
                pending_retries: to_u64(retries),
                dead_letters: to_u64(dead),
            })
        })
        .await
    }

    async fn close(&self) -> Result<(), BusError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.submit(|reply| Job::Close { reply }).await
    }
}

#[async_trait]
impl DeadLetters for SqliteBus {
    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, BusError> {
        self.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT id, plugin, seq, reason, errors, dead_at FROM dead_letters
                 WHERE id > ?1 AND (?2 IS NULL OR plugin = ?2) ORDER BY id LIMIT ?3",
            )?;
            let rows: Vec<(i64, String, i64, String, String, i64)> = select
                .query_map(
                    params![
                        to_i64(query.after),
                        query.plugin,
                        to_i64(query.limit.max(1) as u64)
                    ],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    },
                )?
                .collect::<rusqlite::Result<_>>()?;
            let mut letters = Vec::with_capacity(rows.len());
            for (id, plugin, seq, reason, errors, dead_at) in rows {
                if let Some(stored) = load_event(conn, to_u64(seq))? {
                    letters.push(dead_letter(id, plugin, stored, &reason, &errors, dead_at));
                }
            }
            Ok(letters)
        })
        .await
    }

    async fn dead_letter(&self, id: u64) -> Result<DeadLetter, BusError> {
        let found = self
            .read(move |conn| {
                let row: Option<(String, i64, String, String, i64)> = conn
                    .query_row(
                        "SELECT plugin, seq, reason, errors, dead_at FROM dead_letters WHERE id = ?1",
                        [to_i64(id)],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )
                    .optional()?;
                let Some((plugin, seq, reason, errors, dead_at)) = row else {
                    return Ok(None);
                };
                Ok(load_event(conn, to_u64(seq))?.map(|stored| {
                    dead_letter(to_i64(id), plugin, stored, &reason, &errors, dead_at)
                }))
            })
            .await?;
        found.ok_or_else(|| BusError::NotFound(format!("dead letter {id}")))
    }

    async fn replay_dead_letters(
        &self,
        id: Option<u64>,
        plugin: Option<&str>,
    ) -> Result<u64, BusError> {
        let plugin = plugin.map(str::to_owned);
        self.submit(|reply| Job::Replay { id, plugin, reply }).await
    }

    async fn delete_dead_letter(&self, id: u64) -> Result<(), BusError> {
        self.submit(|reply| Job::DeleteDeadLetter { id, reply })
            .await
    }
}

fn dead_letter(
    id: i64,
    plugin: String,
    stored: StoredEvent,
    reason: &str,
    errors: &str,
    dead_at: i64,
) -> DeadLetter {
    let reason = match reason {
        "rejected" => DeadLetterReason::Rejected,
        "expired" => DeadLetterReason::Expired,
        "effects" => DeadLetterReason::Effects,
        "loop" => DeadLetterReason::Loop,
        _ => DeadLetterReason::Exhausted,
    };
    DeadLetter {
        id: to_u64(id),
        plugin,
        stored,
        reason,
        errors: parse_errors(errors),
        dead_at_ms: dead_at,
    }
}

/// In-memory position of one consumer; the durable part is in `cursors` and `acked`.
struct ConsumerState {
    /// Every event up to here has been looked at.
    read_position: u64,
    /// The cursor last written.
    persisted_cursor: u64,
    /// Main-stream deliveries handed out and not settled.
    outstanding: BTreeSet<u64>,
    /// Settled above the cursor before a restart: not handed out again.
    skip: BTreeSet<u64>,
    /// Retries handed out and not settled.
    retries_in_flight: HashSet<u64>,
    /// Events read from the log after `read_position` and not yet looked at: one scan
    /// feeds several calls instead of being read again for each window's worth.
    prefetched: VecDeque<StoredEvent>,
}

impl ConsumerState {
    fn cursor(&self) -> u64 {
        match self.outstanding.first() {
            Some(lowest) => lowest - 1,
            None => self.read_position,
        }
    }

    /// The cursor once `settled` is no longer outstanding.
    fn cursor_without(&self, settled: u64) -> u64 {
        match self.outstanding.iter().find(|&&seq| seq != settled) {
            Some(lowest) => lowest - 1,
            None => self.read_position,
        }
    }
}

struct SqliteConsumer {
    bus: SqliteBus,
    plugin: String,
    patterns: Vec<Pattern>,
    window: usize,
    state: Mutex<ConsumerState>,
    /// Signalled when a settlement frees room in the window.
    room: tokio::sync::Notify,
}

impl SqliteConsumer {
    fn state(&self) -> std::sync::MutexGuard<'_, ConsumerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn due_retries(&self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let plugin = self.plugin.clone();
        let in_flight: Vec<u64> = self.state().retries_in_flight.iter().copied().collect();
        let limit = to_i64((max + in_flight.len()) as u64);
        let now = now_ms();
        let rows = self
            .bus
            .read(move |conn| {
                let mut select = conn.prepare_cached(
                    "SELECT seq, attempt, errors FROM retries WHERE plugin = ?1 AND due_at <= ?2 ORDER BY due_at, seq LIMIT ?3",
                )?;
                let rows: Vec<(i64, i64, String)> = select
                    .query_map(params![plugin, now, limit], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let mut deliveries = Vec::new();
                for (seq, attempt, errors) in rows {
                    let seq = to_u64(seq);
                    if in_flight.contains(&seq) {
                        continue;
                    }
                    if let Some(stored) = load_event(conn, seq)? {
                        deliveries.push(Delivery {
                            stored,
                            attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                            errors: parse_errors(&errors),
                        });
                    }
                }
                Ok(deliveries)
            })
            .await?;
        let mut state = self.state();
        let mut taken = Vec::new();
        for delivery in rows.into_iter().take(max) {
            if state.retries_in_flight.insert(delivery.stored.sequence) {
                taken.push(delivery);
            }
        }
        Ok(taken)
    }

    async fn new_events(&self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let after = {
            let state = self.state();
            if state.outstanding.len() >= self.window {
                return Ok(Vec::new());
            }
            (state.prefetched.is_empty()).then_some(state.read_position)
        };
        if let Some(after) = after {
            let rows = self
                .bus
                .read(move |conn| {
                    conn.prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                    ))?
                    .query_map(params![to_i64(after), SCAN_CHUNK], row_to_stored)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .await?;
            let mut state = self.state();
            if state.read_position != after || !state.prefetched.is_empty() {
                // Another call moved on meanwhile; this one's view is stale.
                return Ok(Vec::new());
            }
            // Keep a bounded amount of event data per consumer; the rest is read again.
            let mut bytes = 0;
            state
                .prefetched
                .extend(rows.into_iter().take_while(|stored| {
                    let first = bytes == 0;
                    bytes += stored.event.data.len() + 256;
                    first || bytes <= MAX_PREFETCH_BYTES
                }));
        }
        let mut state = self.state();
        let room = max.min(self.window.saturating_sub(state.outstanding.len()));
        let mut taken = Vec::new();
        while taken.len() < room {
            let Some(stored) = state.prefetched.pop_front() else {
                break;
            };
            state.read_position = stored.sequence;
            if state.skip.remove(&stored.sequence)
                || !self.patterns.iter().any(|p| p.matches(&stored.event.ty))
            {
                continue;
            }
            state.outstanding.insert(stored.sequence);
            taken.push(Delivery {
                stored,
                attempt: 1,
                errors: Vec::new(),
            });
        }
        Ok(taken)
    }

    /// Records a cursor that moved over events this plugin does not match.
    fn persist_idle_cursor(&self) {
        let mut state = self.state();
        let cursor = state.cursor();
        if cursor > state.persisted_cursor {
            state.persisted_cursor = cursor;
            let _ = self.bus.inner.jobs.send(Job::MoveCursor {
                plugin: self.plugin.clone(),
                cursor,
            });
        }
    }
}

#[async_trait]
impl Consumer for SqliteConsumer {
    async fn next(&self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let max = max.max(1);
        let mut generation = self.bus.inner.generation.subscribe();
        let deadline = tokio::time::Instant::now() + IDLE_WAIT;
        let mut before = self.state().read_position;
        loop {
            generation.borrow_and_update();
            let mut batch = self.due_retries(max).await?;
            if batch.len() < max {
                batch.extend(self.new_events(max - batch.len()).await?);
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
            let scanned = self.state().read_position;
            if scanned > before {
                // The scan moved over events this plugin does not match: keep scanning
                // at once rather than waiting for the next commit.
                before = scanned;
                continue;
            }
            self.persist_idle_cursor();
            // Sleep until new events are committed, or re-check retries shortly.
            tokio::select! {
                changed = generation.changed() => {
                    if changed.is_err() {
                        return Err(BusError::Closed);
                    }
                }
                () = self.room.notified() => {}
                () = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            }
        }
    }

    async fn settle(&self, delivery: &Delivery, settlement: Settlement) -> Result<(), BusError> {
        let seq = delivery.stored.sequence;
        let (reply, answer) = oneshot::channel();
        let is_retry = {
            // Compute and enqueue under the lock so cursor moves reach the writer in order.
            // The delivery stays marked outstanding (or in flight) until its settlement
            // commits: a failed commit is retried by the caller, and a retry row that is
            // still due is not handed out twice meanwhile.
            let mut state = self.state();
            let is_retry = state.retries_in_flight.contains(&seq);
            let cursor = if is_retry {
                state.cursor()
            } else {
                state.cursor_without(seq)
            };
            if !is_retry {
                state.persisted_cursor = state.persisted_cursor.max(cursor);
            }
            self.bus
                .inner
                .jobs
                .send(Job::Settle(Box::new(SettleJob {
                    plugin: self.plugin.clone(),
                    seq,
                    is_retry,
                    cursor,
                    settlement,
                    reply,
                })))
                .map_err(|_| BusError::Closed)?;
            is_retry
        };
        let result = answer.await.map_err(|_| BusError::Closed)?;
        if result.is_ok() {
            let mut state = self.state();
            if is_retry {
                state.retries_in_flight.remove(&seq);
            } else {
                state.outstanding.remove(&seq);
            }
        }
        self.room.notify_one();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

        let fresh = dir.path().join("fresh.db");
        drop(SqliteBus::open(SqliteOptions::new(&fresh)).unwrap());
        assert!(SqliteBus::open(SqliteOptions::new(&fresh)).is_ok());
    }
    fn event(source: &str, id: &str) -> Event {
        Event {
            id: id.to_owned(),
            source: source.to_owned(),
            ty: "t.x".to_owned(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: Vec::new(),
            extensions: std::collections::BTreeMap::new(),
        }
    }

    fn sequences(appended: &[Appended]) -> Vec<(u64, bool)> {
        appended.iter().map(|a| (a.sequence, a.duplicate)).collect()
    }

    #[tokio::test]
    async fn a_repeated_source_and_id_is_answered_with_its_first_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(SqliteOptions::new(dir.path().join("log.db"))).unwrap();
        let first = bus
            .append(vec![event("/a", "1"), event("/b", "1")])
            .await
            .unwrap();
        assert_eq!(sequences(&first), [(1, false), (2, false)]);
        // One already stored, one repeated inside the batch, one new.
        let second = bus
            .append(vec![event("/b", "1"), event("/a", "2"), event("/a", "2")])
            .await
            .unwrap();
        assert_eq!(sequences(&second), [(2, true), (3, false), (3, true)]);
        assert_eq!(bus.head().await.unwrap(), 3);
        bus.close().await.unwrap();
    }
}
