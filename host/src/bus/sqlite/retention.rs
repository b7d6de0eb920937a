//! Retention on the embedded log: a worker thread that deletes old events in small
//! batches, off the hot path, and gives the space back; and the SQL of the writer jobs it
//! sends, kept here so that the protocol is in one file.
//!
//! Protocol:
//! - Every `interval` the worker reads the database's size (pages in use, free pages) on
//!   its own read connection, which WAL lets run beside the writer. It walks the log when
//!   the log uses more than `max_bytes`, or when a rule has an age limit.
//! - A walk reads events oldest first, from the end of the prefix that only holds events
//!   kept forever. The first rule matching an event's type decides its fate
//!   ([`crate::retention`]). An event goes when it is older than its rule's `max_age`, or
//!   while the log is above `max_bytes` (down to 15/16 of it, so that deleting does not
//!   start again at every append), unless it is protected:
//!   - unsettled: above the cursor of a plugin whose subscriptions (as its consumer last
//!     opened them, table `subscriptions`; every type when unknown) match its type;
//!   - retrying: a `retries` row refers to it;
//!   - dead-lettered: a `dead_letters` row refers to it;
//!
//!   unless its rule says `delete_unsettled` (the first two) or `delete_dead_lettered`
//!   (the last). A type kept forever is never deleted. The walk stops at the first event
//!   younger than every age limit once the size is met, at the end of the log, or after
//!   [`WALK_BUDGET`] (the next walk goes on from there).
//! - Which plugins hold events back: every plugin with a cursor, loaded or not, so a
//!   removed plugin file or a failed load never costs a plugin its backlog (adding the
//!   plugin back resumes it). With `absent_plugin_hold`, a plugin that has had no consumer
//!   open in this process for that long (counted from this process's start at the
//!   earliest) stops holding them, its retries included (no consumer will run them).
//! - Deleting: each batch of at most [`BATCH`] events is one writer job, so appends queue
//!   behind one small batch at most; the worker waits for its answer before reading on.
//!   The job checks again what may have changed since the walk read it (a replay turns a
//!   dead letter into a retry) and deletes with each event its entry in the `(source, id)`
//!   index — the dedupe window of the embedded log is how long the event is kept — and,
//!   where the rule allowed deleting them, its `retries`, `acked` and `dead_letters`
//!   rows. Cursors only move forward, so an event below every holding cursor when the
//!   walk read them stays settled. The newest event is never deleted: sequences are
//!   rowids, which SQLite hands out again above the highest row left, and a consumer
//!   whose cursor is past a reused sequence would skip the event that took it.
//! - Space: a log created by this version has `auto_vacuum = INCREMENTAL`; after a walk
//!   the worker sends `incremental_vacuum` jobs of at most [`VACUUM_STEP`] pages that
//!   shrink the file to about `max_bytes` (or keep an eighth of the used size free for new
//!   events without it). A log created before cannot shrink without a `VACUUM`: its free
//!   pages are reused by new events, so the file stops growing at its high-water mark.
//! - Dead letters: with `dead_letter_max_age`, each check first deletes the dead letters
//!   older than it (by when they were dead-lettered), oldest first, in writer jobs of at
//!   most [`BATCH`]; the events they held back then go by the rules like any other.
//! - Reporting: the [`RetentionObserver`] gets the deleted counts, the size, and whether
//!   the log is blocked (above `max_bytes` with nothing left that may go). Entering and
//!   leaving that state is logged once each, naming what holds the events.
//! - Cost: a walk re-reads the events kept at the start of the log (by a lagging plugin,
//!   say), so after a walk the next one waits up to [`WALK_SPACING`] times its duration,
//!   in proportion to the share of the events it read that it had to keep: a walk that
//!   deletes what it reads is followed at once, one that only re-reads kept events leaves
//!   the log alone four times as long as it took.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use super::ops::exec;
use super::schema::open_connection;
use super::writer::{Job, Reply};
use super::{Durability, Inner, storage, to_i64, to_u64};
use crate::bus::BusError;
use crate::clock::{now_ms, now_us};
use crate::pattern::Pattern;
use crate::retention::{Keep, RetentionRule, rule_for};

/// Events one writer job deletes at most.
const BATCH: usize = 1000;
/// Pages one vacuum job gives back at most (8 MiB with 4 KiB pages).
const VACUUM_STEP: u64 = 2048;
/// Free pages not worth giving back: new events will take them.
const VACUUM_MIN: u64 = 256;
/// Longest one walk runs before the worker checks the size again.
const WALK_BUDGET: Duration = Duration::from_secs(2);
/// A walk that kept everything it read is followed by this many times its own duration
/// without one.
const WALK_SPACING: f64 = 4.0;
/// Once deleting for size, down to `max_bytes` less this fraction of it.
const LOW_WATER_DIVISOR: u64 = 16;

/// Where the worker reports what it does: the host's metrics.
pub trait RetentionObserver: Send + Sync {
    /// Events deleted, and their approximate size in bytes.
    fn deleted(&self, events: u64, bytes: u64);
    /// The database's size: bytes of the pages in use, and of the whole file.
    fn size(&self, used_bytes: u64, file_bytes: u64);
    /// Whether the log is above `max_bytes` with nothing left that may be deleted.
    fn blocked(&self, blocked: bool);
}

/// An observer that reports nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl RetentionObserver for NoObserver {
    fn deleted(&self, _events: u64, _bytes: u64) {}
    fn size(&self, _used_bytes: u64, _file_bytes: u64) {}
    fn blocked(&self, _blocked: bool) {}
}

/// Retention settings of the embedded log (`[log]` in the host config).
#[derive(Clone)]
pub struct RetentionOptions {
    /// The rules; the first one matching an event's type decides for it.
    pub rules: Vec<RetentionRule>,
    /// Most bytes of database pages the log should use; `None`: no size limit.
    pub max_bytes: Option<u64>,
    /// How often the worker checks the size and the age limits.
    pub interval: Duration,
    /// How long a plugin with no consumer open still holds back its unsettled events;
    /// `None`: for as long as it has a cursor.
    pub absent_plugin_hold: Option<Duration>,
    /// How long a dead letter is kept; `None`: until it is replayed or deleted.
    pub dead_letter_max_age: Option<Duration>,
    /// Told what the worker does.
    pub observer: Arc<dyn RetentionObserver>,
}

impl Default for RetentionOptions {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            max_bytes: None,
            interval: Duration::from_secs(1),
            absent_plugin_hold: None,
            dead_letter_max_age: None,
            observer: Arc::new(NoObserver),
        }
    }
}

impl fmt::Debug for RetentionOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetentionOptions")
            .field("rules", &self.rules)
            .field("max_bytes", &self.max_bytes)
            .field("interval", &self.interval)
            .field("absent_plugin_hold", &self.absent_plugin_hold)
            .field("dead_letter_max_age", &self.dead_letter_max_age)
            .finish_non_exhaustive()
    }
}

impl RetentionOptions {
    /// Whether anything may ever be deleted: a size limit or an age limit.
    pub fn is_active(&self) -> bool {
        self.max_bytes.is_some() || self.min_age().is_some() || self.dead_letter_max_age.is_some()
    }

    /// The shortest age limit of any rule.
    fn min_age(&self) -> Option<Duration> {
        self.rules
            .iter()
            .filter_map(|rule| match rule.max_age {
                Keep::For(age) => Some(age),
                Keep::UntilFull | Keep::Forever => None,
            })
            .min()
    }
}

/// What retention shares with the rest of the bus: which plugins have a consumer open in
/// this process, and the worker's stop signal.
#[derive(Default)]
pub(super) struct Shared {
    presence: Mutex<HashMap<String, Presence>>,
    /// Dropped to stop the worker.
    stop: Mutex<Option<std_mpsc::Sender<()>>>,
}

#[derive(Debug, Clone, Copy)]
struct Presence {
    open: usize,
    /// When the last consumer closed, on the monotonic clock: a step of the wall clock
    /// must not make a plugin absent for longer than it was.
    closed_at: Option<Instant>,
}

impl Shared {
    /// Counts a consumer of `plugin` opened.
    pub(super) fn consumer_opened(&self, plugin: &str) {
        let mut presence = self.presence.lock().unwrap_or_else(PoisonError::into_inner);
        presence
            .entry(plugin.to_owned())
            .or_insert(Presence {
                open: 0,
                closed_at: None,
            })
            .open += 1;
    }

    /// Counts a consumer of `plugin` closed.
    pub(super) fn consumer_closed(&self, plugin: &str) {
        let mut presence = self.presence.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = presence.get_mut(plugin) {
            entry.open = entry.open.saturating_sub(1);
            entry.closed_at = Some(Instant::now());
        }
    }

    /// Stops the worker, if one runs.
    pub(super) fn stop(&self) {
        self.stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn presence(&self, plugin: &str) -> Option<Presence> {
        self.presence
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(plugin)
            .copied()
    }
}

/// Starts the worker when the options can delete anything.
pub(super) fn start(
    inner: &Arc<Inner>,
    path: &Path,
    options: &RetentionOptions,
) -> Result<(), BusError> {
    if !options.is_active() {
        return Ok(());
    }
    let conn = open_connection(path, Durability::Normal).map_err(storage)?;
    let worker = Worker::new(Arc::clone(inner), conn, options.clone(), Instant::now())?;
    if !worker.incremental {
        tracing::warn!(
            log = %path.display(),
            "the log was created without incremental auto-vacuum: space freed by retention is \
             reused for new events, but the file does not shrink. To let it shrink, stop the \
             host and run: sqlite3 {} 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM;'",
            path.display()
        );
    }
    let (stop, stopped) = std_mpsc::channel();
    *inner
        .retention
        .stop
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(stop);
    std::thread::Builder::new()
        .name("switchyard-log-retention".to_owned())
        .spawn(move || worker.run(&stopped))
        .map_err(|e| BusError::Storage(format!("cannot start log retention: {e}")))?;
    Ok(())
}

/// An event a walk found deletable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Candidate {
    seq: u64,
    /// Its approximate size.
    bytes: u64,
    /// Its rule allows deleting it unsettled (cursor, retries).
    unsettled_ok: bool,
    /// Its rule allows deleting it with its dead letters.
    dead_ok: bool,
}

/// What a delete job deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Deleted {
    pub(super) events: u64,
    pub(super) bytes: u64,
}

/// Writer job: deletes the candidates still deletable, with what refers to them; with
/// `sweep`, also drops retries whose event is gone (a retry in flight when its event was
/// deleted unsettled schedules itself again). The retries of the `released` plugins (a
/// JSON array of names: plugins absent for longer than `absent_plugin_hold`) hold
/// nothing.
pub(super) fn delete(
    conn: &Connection,
    candidates: &[Candidate],
    sweep: bool,
    released: &str,
) -> Result<Deleted, BusError> {
    let mut deleted = Deleted::default();
    let mut run = || -> rusqlite::Result<()> {
        for candidate in candidates {
            let seq = to_i64(candidate.seq);
            // Never the newest event: a sequence is the row's rowid, which SQLite would
            // hand out again after the highest row is deleted, and a consumer whose
            // cursor is past it would then skip the new event.
            let sql = match (candidate.unsettled_ok, candidate.dead_ok) {
                (false, false) => {
                    "DELETE FROM events WHERE seq = ?1
                     AND EXISTS (SELECT 1 FROM events WHERE seq > ?1)
                     AND NOT EXISTS (SELECT 1 FROM retries WHERE seq = ?1
                         AND plugin NOT IN (SELECT value FROM json_each(?2)))
                     AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE seq = ?1)"
                }
                (false, true) => {
                    "DELETE FROM events WHERE seq = ?1
                     AND EXISTS (SELECT 1 FROM events WHERE seq > ?1)
                     AND NOT EXISTS (SELECT 1 FROM retries WHERE seq = ?1
                         AND plugin NOT IN (SELECT value FROM json_each(?2)))"
                }
                (true, false) => {
                    "DELETE FROM events WHERE seq = ?1
                     AND EXISTS (SELECT 1 FROM events WHERE seq > ?1)
                     AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE seq = ?1)"
                }
                (true, true) => {
                    "DELETE FROM events WHERE seq = ?1
                     AND EXISTS (SELECT 1 FROM events WHERE seq > ?1)"
                }
            };
            let gone = if candidate.unsettled_ok {
                exec(conn, sql, [seq])?
            } else {
                exec(conn, sql, params![seq, released])?
            };
            if gone == 0 {
                continue;
            }
            deleted.events += 1;
            deleted.bytes += candidate.bytes;
            // The stream keeps its version (`streams`); only the deleted event's entry goes.
            exec(conn, "DELETE FROM stream_events WHERE seq = ?1", [seq])?;
            if candidate.dead_ok {
                exec(conn, "DELETE FROM dead_letters WHERE seq = ?1", [seq])?;
            }
            // The retries left wait for an event that is gone: those of a rule that deletes
            // unsettled events, or of plugins that hold nothing.
            // A replay's record lives only as long as its retry.
            if exec(conn, "DELETE FROM retries WHERE seq = ?1", [seq])? > 0 {
                exec(conn, "DELETE FROM replays WHERE seq = ?1", [seq])?;
            }
            if candidate.unsettled_ok {
                exec(conn, "DELETE FROM acked WHERE seq = ?1", [seq])?;
            }
        }
        if sweep {
            exec(
                conn,
                "DELETE FROM retries WHERE NOT EXISTS (SELECT 1 FROM events WHERE events.seq = retries.seq)",
                [],
            )?;
        }
        Ok(())
    };
    run().map_err(storage)?;
    Ok(deleted)
}

/// Writer job: gives up to `pages` free pages back to the file system; answers how many.
pub(super) fn vacuum(conn: &Connection, pages: u64) -> Result<u64, BusError> {
    let free = |conn: &Connection| -> rusqlite::Result<i64> {
        conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))
    };
    let before = free(conn).map_err(storage)?;
    // The pragma frees one page per step (each answers a row): step it to the end.
    let step = || -> rusqlite::Result<()> {
        let mut statement = conn.prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
        let mut rows = statement.query([])?;
        while rows.next()?.is_some() {}
        Ok(())
    };
    step().map_err(storage)?;
    let after = free(conn).map_err(storage)?;
    Ok(to_u64(before.saturating_sub(after)))
}

/// Writer job step: records the subscriptions `plugin`'s consumer opened with (a JSON
/// list of patterns), which decide the events its cursor holds back.
pub(super) fn record_subscription(
    conn: &Connection,
    plugin: &str,
    patterns: &str,
) -> rusqlite::Result<()> {
    exec(
        conn,
        "INSERT INTO subscriptions (plugin, patterns) VALUES (?1, ?2)
         ON CONFLICT (plugin) DO UPDATE SET patterns = excluded.patterns",
        params![plugin, patterns],
    )
    .map(drop)
}

/// The subscriptions of a consumer as stored in `subscriptions`.
pub(super) fn patterns_json(patterns: &[Pattern]) -> String {
    serde_json::to_string(&patterns.iter().map(Pattern::as_str).collect::<Vec<_>>())
        .unwrap_or_else(|_| "null".to_owned())
}

/// A plugin whose cursor holds back the events it has not settled.
#[derive(Debug)]
struct Holder {
    plugin: String,
    position: u64,
    /// `None`: every type (subscriptions unknown).
    patterns: Option<Vec<Pattern>>,
}

impl Holder {
    fn holds(&self, seq: u64, event_type: &str) -> bool {
        seq > self.position
            && self
                .patterns
                .as_ref()
                .is_none_or(|patterns| patterns.iter().any(|p| p.matches(event_type)))
    }
}

/// An event as a walk sees it.
struct Row {
    seq: u64,
    event_type: String,
    ingested_at_us: i64,
    bytes: u64,
}

/// What a walk read and deleted, and why it kept what it wanted gone (for the log).
#[derive(Debug, Default)]
struct Tally {
    read: u64,
    deleted: u64,
    unsettled: BTreeMap<String, u64>,
    retrying: u64,
    dead_lettered: u64,
    forever: u64,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .unsettled
            .iter()
            .map(|(plugin, n)| format!("{n} unsettled by plugin `{plugin}`"))
            .collect();
        for (n, what) in [
            (self.retrying, "waiting for a retry"),
            (self.dead_lettered, "dead-lettered"),
            (self.forever, "kept forever by a rule"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        if parts.is_empty() {
            parts.push("none".to_owned());
        }
        f.write_str(&parts.join(", "))
    }
}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WalkEnd {
    /// Nothing more is wanted gone.
    Done,
    /// It reached the end of the log.
    End,
    /// It ran out of time; the next one goes on from where it stopped.
    Budget,
}

/// The database's size in pages.
#[derive(Debug, Clone, Copy)]
struct Size {
    pages: u64,
    free: u64,
}

impl Size {
    fn used(self) -> u64 {
        self.pages.saturating_sub(self.free)
    }
}

/// The worker thread's state.
struct Worker {
    inner: Arc<Inner>,
    conn: Connection,
    options: RetentionOptions,
    min_age_us: Option<i64>,
    page_size: u64,
    /// Whether the database can give pages back (`auto_vacuum = INCREMENTAL`).
    incremental: bool,
    /// When this process started: no plugin counts as absent for longer.
    started: Instant,
    /// Every event up to here is kept forever.
    clean_upto: u64,
    /// Where the next walk goes on, when the last one ran out of time.
    resume_from: Option<u64>,
    next_walk: Instant,
    blocked: bool,
    last_error: Option<String>,
}

impl Worker {
    fn new(
        inner: Arc<Inner>,
        conn: Connection,
        options: RetentionOptions,
        started: Instant,
    ) -> Result<Self, BusError> {
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(storage)?;
        let auto_vacuum: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .map_err(storage)?;
        let min_age_us = options
            .min_age()
            .map(|age| i64::try_from(age.as_micros()).unwrap_or(i64::MAX));
        Ok(Self {
            inner,
            conn,
            options,
            min_age_us,
            page_size: to_u64(page_size).max(512),
            // 2 is INCREMENTAL (1 is FULL, which also gives pages back, at every commit).
            incremental: auto_vacuum == 2,
            started,
            clean_upto: 0,
            resume_from: None,
            next_walk: Instant::now(),
            blocked: false,
            last_error: None,
        })
    }

    fn run(mut self, stopped: &std_mpsc::Receiver<()>) {
        loop {
            match stopped.recv_timeout(self.options.interval) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
            match self.check() {
                Ok(()) => self.last_error = None,
                Err(BusError::Closed) => return,
                Err(error) => {
                    // Once per distinct failure: a full disk would otherwise log every check.
                    let message = error.to_string();
                    if self.last_error.as_deref() != Some(message.as_str()) {
                        tracing::warn!(error = %message, "log retention failed; trying again");
                        self.last_error = Some(message);
                    }
                }
            }
        }
    }

    /// One check: expired dead letters, the size, a walk if one is due, then giving
    /// space back.
    fn check(&mut self) -> Result<(), BusError> {
        self.expire_dead_letters()?;
        let size = self.size()?;
        self.options
            .observer
            .size(size.used() * self.page_size, size.pages * self.page_size);
        let over = self
            .options
            .max_bytes
            .is_some_and(|max| size.used() * self.page_size > max);
        let due = over || self.min_age_us.is_some() || self.resume_from.is_some();
        if due && Instant::now() >= self.next_walk {
            let began = Instant::now();
            let (end, kept) = self.walk()?;
            let kept_share = if kept.read == 0 {
                1.0
            } else {
                kept.read.saturating_sub(kept.deleted) as f64 / kept.read as f64
            };
            self.next_walk = Instant::now() + began.elapsed().mul_f64(WALK_SPACING * kept_share);
            match end {
                WalkEnd::End => {
                    let still_over = self.bytes_over(false)? > 0;
                    self.set_blocked(still_over, &kept)?;
                }
                WalkEnd::Done => self.set_blocked(false, &kept)?,
                WalkEnd::Budget => {}
            }
        } else if !over && self.blocked {
            self.set_blocked(false, &Tally::default())?;
        }
        self.give_back()
    }

    /// Deletes the dead letters older than `dead_letter_max_age`, oldest first, a writer
    /// job per [`BATCH`]; the events they held back are then free for the rules.
    fn expire_dead_letters(&self) -> Result<(), BusError> {
        let Some(age) = self.options.dead_letter_max_age else {
            return Ok(());
        };
        let before_ms = now_ms().saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        // Read on the worker's own connection first, so that a check with nothing to
        // expire costs the writer nothing. Ids grow with the time of dead-lettering.
        let due: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM dead_letters
                 WHERE id = (SELECT MIN(id) FROM dead_letters) AND dead_at < ?1)",
                [before_ms],
                |r| r.get(0),
            )
            .map_err(storage)?;
        if !due {
            return Ok(());
        }
        let mut expired = 0;
        loop {
            let deleted = self.job(|reply| Job::ExpireDeadLetters {
                before_ms,
                limit: BATCH,
                reply,
            })?;
            expired += deleted;
            if deleted < BATCH as u64 {
                tracing::info!(
                    expired,
                    "deleted dead letters older than `dead_letter_max_age`"
                );
                return Ok(());
            }
        }
    }

    fn size(&self) -> Result<Size, BusError> {
        let pragma = |name: &str| -> Result<u64, BusError> {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
                .map(to_u64)
                .map_err(storage)
        };
        Ok(Size {
            pages: pragma("page_count")?,
            free: pragma("freelist_count")?,
        })
    }

    /// Bytes in use above `max_bytes` (`sizing`: above its low-water mark); 0 or less
    /// when within.
    fn bytes_over(&self, sizing: bool) -> Result<i64, BusError> {
        let Some(max) = self.options.max_bytes else {
            return Ok(0);
        };
        let target = if sizing {
            max - max / LOW_WATER_DIVISOR
        } else {
            max
        };
        let used = self.size()?.used() * self.page_size;
        Ok(to_i64(used).saturating_sub(to_i64(target)))
    }

    /// The plugins whose cursors hold back what they have not settled, and (as a JSON
    /// array) those whose cursors no longer do (absent for longer than
    /// `absent_plugin_hold`).
    fn holders(&self) -> Result<(Vec<Holder>, String), BusError> {
        let rows: Vec<(String, i64, Option<String>)> = self
            .conn
            .prepare_cached(
                "SELECT c.plugin, c.position, s.patterns FROM cursors c
                 LEFT JOIN subscriptions s ON s.plugin = c.plugin",
            )
            .and_then(|mut select| {
                select
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(storage)?;
        let now = Instant::now();
        let (holding, released): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|(plugin, _, _)| self.still_holds(plugin, now));
        let released: Vec<String> = released.into_iter().map(|(plugin, _, _)| plugin).collect();
        let holders = holding
            .into_iter()
            .map(|(plugin, position, patterns)| Holder {
                plugin,
                position: to_u64(position),
                patterns: patterns.as_deref().and_then(parse_patterns),
            })
            .collect();
        let released = serde_json::to_string(&released)
            .map_err(|e| BusError::Storage(format!("naming the plugins that hold nothing: {e}")))?;
        Ok((holders, released))
    }

    /// Whether `plugin`'s cursor still holds events back: always, unless
    /// `absent_plugin_hold` is set and it has had no consumer open for that long.
    fn still_holds(&self, plugin: &str, now: Instant) -> bool {
        let Some(hold) = self.options.absent_plugin_hold else {
            return true;
        };
        let absent_since = match self.inner.retention.presence(plugin) {
            Some(presence) if presence.open > 0 => return true,
            Some(presence) => presence
                .closed_at
                .map_or(self.started, |closed| closed.max(self.started)),
            None => self.started,
        };
        now.saturating_duration_since(absent_since) < hold
    }

    fn rows_after(&self, after: u64) -> Result<Vec<Row>, BusError> {
        self.conn
            .prepare_cached(
                "SELECT seq, type, ingested_at_us,
                        length(id) * 2 + length(source) * 2 + length(type)
                        + COALESCE(length(subject), 0) + COALESCE(length(time), 0)
                        + COALESCE(length(datacontenttype), 0) + COALESCE(length(dataschema), 0)
                        + length(data) + length(extensions) + 32
                 FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .and_then(|mut select| {
                select
                    .query_map(params![to_i64(after), to_i64(BATCH as u64)], |r| {
                        Ok(Row {
                            seq: to_u64(r.get(0)?),
                            event_type: r.get(1)?,
                            ingested_at_us: r.get(2)?,
                            bytes: to_u64(r.get(3)?),
                        })
                    })?
                    .collect()
            })
            .map_err(storage)
    }

    /// Sequences between `lo` and `hi` that dead letters refer to.
    fn dead_lettered(&self, lo: u64, hi: u64) -> Result<HashSet<u64>, BusError> {
        self.sequences(
            "SELECT seq FROM dead_letters WHERE seq BETWEEN ?1 AND ?2",
            params![to_i64(lo), to_i64(hi)],
        )
    }

    /// Sequences between `lo` and `hi` that retries of plugins not `released` refer to.
    fn retrying(&self, lo: u64, hi: u64, released: &str) -> Result<HashSet<u64>, BusError> {
        self.sequences(
            "SELECT seq FROM retries WHERE seq BETWEEN ?1 AND ?2
             AND plugin NOT IN (SELECT value FROM json_each(?3))",
            params![to_i64(lo), to_i64(hi), released],
        )
    }

    fn sequences(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<HashSet<u64>, BusError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut select| {
                select
                    .query_map(params, |r| r.get::<_, i64>(0).map(to_u64))?
                    .collect()
            })
            .map_err(storage)
    }

    /// Sends a job to the writer and waits for its answer.
    fn job<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, BusError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .jobs
            .send(job(reply))
            .map_err(|_| BusError::Closed)?;
        answer.blocking_recv().map_err(|_| BusError::Closed)?
    }

    /// Walks the log oldest first, deleting what may go; see the module docs.
    fn walk(&mut self) -> Result<(WalkEnd, Tally), BusError> {
        let (holders, released) = self.holders()?;
        // Once a walk, with its first batch.
        let mut sweep = self.options.rules.iter().any(|r| r.delete_unsettled);
        let now = now_us();
        let sizing = self.bytes_over(false)? > 0;
        let mut to_free = if sizing { self.bytes_over(true)? } else { 0 };
        let mut from = self.resume_from.take().unwrap_or(self.clean_upto);
        let mut clean = from == self.clean_upto;
        let deadline = Instant::now() + WALK_BUDGET;
        let mut kept = Tally::default();
        loop {
            let rows = self.rows_after(from)?;
            let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                return Ok((WalkEnd::End, kept));
            };
            let retrying = self.retrying(first.seq, last.seq, &released)?;
            let dead = self.dead_lettered(first.seq, last.seq)?;
            let mut batch = Vec::new();
            let mut done = false;
            for row in &rows {
                if to_free <= 0 && self.min_age_us.is_none() {
                    // Only size wanted events gone, and the estimate says enough are;
                    // measure before going on.
                    break;
                }
                kept.read += 1;
                let rule = rule_for(&self.options.rules, &row.event_type);
                let keep = rule.map_or(Keep::UntilFull, |r| r.max_age);
                if keep == Keep::Forever {
                    if clean {
                        self.clean_upto = row.seq;
                    }
                    kept.forever += 1;
                    from = row.seq;
                    continue;
                }
                clean = false;
                let age = now.saturating_sub(row.ingested_at_us);
                let aged = matches!(keep, Keep::For(max)
                    if age >= i64::try_from(max.as_micros()).unwrap_or(i64::MAX));
                if !aged && to_free <= 0 {
                    // Events after this one are younger still: once it is younger than
                    // every age limit, nothing further is wanted gone.
                    if self.min_age_us.is_none_or(|min| age < min) {
                        done = true;
                        break;
                    }
                    from = row.seq;
                    continue;
                }
                from = row.seq;
                let unsettled_ok = rule.is_some_and(|r| r.delete_unsettled);
                let dead_ok = rule.is_some_and(|r| r.delete_dead_lettered);
                if !unsettled_ok {
                    if let Some(holder) = holders.iter().find(|h| h.holds(row.seq, &row.event_type))
                    {
                        *kept.unsettled.entry(holder.plugin.clone()).or_default() += 1;
                        continue;
                    }
                    if retrying.contains(&row.seq) {
                        kept.retrying += 1;
                        continue;
                    }
                }
                if !dead_ok && dead.contains(&row.seq) {
                    kept.dead_lettered += 1;
                    continue;
                }
                to_free = to_free.saturating_sub(to_i64(row.bytes));
                batch.push(Candidate {
                    seq: row.seq,
                    bytes: row.bytes,
                    unsettled_ok,
                    dead_ok,
                });
            }
            if !batch.is_empty() {
                let deleted = self.job(|reply| Job::Retain {
                    candidates: batch,
                    sweep,
                    released: released.clone(),
                    reply,
                })?;
                sweep = false;
                self.options.observer.deleted(deleted.events, deleted.bytes);
                kept.deleted += deleted.events;
                if sizing {
                    to_free = self.bytes_over(true)?;
                }
            }
            if done || (to_free <= 0 && self.min_age_us.is_none()) {
                return Ok((WalkEnd::Done, kept));
            }
            if Instant::now() >= deadline {
                self.resume_from = Some(from);
                return Ok((WalkEnd::Budget, kept));
            }
        }
    }

    /// Gives free pages back beyond what new events will soon take: down to about
    /// `max_bytes`, or to an eighth of the used size free without it.
    fn give_back(&self) -> Result<(), BusError> {
        if !self.incremental {
            return Ok(());
        }
        let size = self.size()?;
        let reserve = match self.options.max_bytes {
            Some(max) => (max / self.page_size).saturating_sub(size.used()),
            None => size.used() / 8,
        };
        let mut left = size.free.saturating_sub(reserve);
        if left < VACUUM_MIN {
            return Ok(());
        }
        while left > 0 {
            let pages = left.min(VACUUM_STEP);
            if self.job(|reply| Job::Vacuum { pages, reply })? == 0 {
                break;
            }
            left -= pages;
        }
        Ok(())
    }

    fn set_blocked(&mut self, blocked: bool, kept: &Tally) -> Result<(), BusError> {
        if blocked != self.blocked {
            let used = self.size()?.used() * self.page_size;
            let max = self.options.max_bytes.unwrap_or(0);
            if blocked {
                tracing::warn!(
                    used_bytes = used,
                    max_bytes = max,
                    "the log uses {used} bytes, more than `log.max_bytes` ({max}), and \
                     retention may delete none of the events left: {kept}. It grows until \
                     plugins settle their events, or a `[[log.retention]]` rule allows \
                     deleting them (`delete_unsettled`, `delete_dead_lettered`)"
                );
            } else {
                tracing::info!(
                    used_bytes = used,
                    max_bytes = max,
                    "the log is within `log.max_bytes` again"
                );
            }
            self.blocked = blocked;
        }
        self.options.observer.blocked(blocked);
        Ok(())
    }
}

/// A stored list of subscriptions; `None` (every type) when it cannot be read.
fn parse_patterns(text: &str) -> Option<Vec<Pattern>> {
    let texts: Vec<String> = serde_json::from_str(text).ok()?;
    texts.iter().map(|t| Pattern::parse(t).ok()).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;
    use crate::bus::sqlite::{SqliteBus, SqliteOptions};
    use crate::bus::{Bus, ConsumerSpec, DeadLetterReason, DeadLetters, Settlement, StartPosition};
    use crate::effects::Effects;
    use crate::event::Event;

    #[derive(Default)]
    struct Record {
        deleted: AtomicU64,
        blocked: AtomicBool,
    }

    impl RetentionObserver for Record {
        fn deleted(&self, events: u64, _bytes: u64) {
            self.deleted.fetch_add(events, Ordering::Relaxed);
        }
        fn size(&self, _used_bytes: u64, _file_bytes: u64) {}
        fn blocked(&self, blocked: bool) {
            self.blocked.store(blocked, Ordering::Relaxed);
        }
    }

    fn event(ty: &str, n: usize, bytes: usize) -> Event {
        Event {
            id: format!("{ty}-{n}"),
            source: "/test".to_owned(),
            ty: ty.to_owned(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: vec![b'x'; bytes],
            extensions: BTreeMap::new(),
        }
    }

    fn rule(types: &str, max_age: Keep) -> RetentionRule {
        RetentionRule {
            types: vec![Pattern::parse(types).unwrap()],
            max_age,
            delete_unsettled: false,
            delete_dead_lettered: false,
        }
    }

    fn spec(pattern: &str) -> ConsumerSpec {
        ConsumerSpec {
            patterns: vec![Pattern::parse(pattern).unwrap()],
            start: StartPosition::Earliest,
            window: 64,
            one_at_a_time: false,
        }
    }

    fn open() -> (tempfile::TempDir, SqliteBus) {
        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(SqliteOptions::new(dir.path().join("log.db"))).unwrap();
        (dir, bus)
    }

    /// One check of a worker with these options, on a blocking thread.
    fn two_minutes_ago() -> Instant {
        Instant::now()
            .checked_sub(Duration::from_secs(120))
            .unwrap()
    }

    async fn check(bus: &SqliteBus, options: RetentionOptions, started: Instant) {
        let inner = Arc::clone(&bus.inner);
        let path = bus.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let conn = open_connection(&path, Durability::Normal).unwrap();
            let mut worker = Worker::new(inner, conn, options, started).unwrap();
            worker.check().unwrap();
        })
        .await
        .unwrap();
    }

    async fn sequences(bus: &SqliteBus) -> Vec<u64> {
        bus.read_log(crate::bus::LogQuery {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .events
        .iter()
        .map(|e| e.sequence)
        .collect()
    }

    /// Events 1..=10 of `a.x`; plugin `p` (subscribed to `a.>`) acks 1, 2 and 5, puts 3
    /// in its retries and 4 in its dead letters, and has 6..=10 outstanding; plugin `q`
    /// (subscribed to `b.>`) has read nothing.
    async fn settle_some(bus: &SqliteBus) {
        bus.append((1..=10).map(|n| event("a.x", n, 10)).collect())
            .await
            .unwrap();
        let p = bus.consumer("p", spec("a.>")).await.unwrap();
        let _q = bus.consumer("q", spec("b.>")).await.unwrap();
        let deliveries = p.next(10).await.unwrap();
        assert_eq!(deliveries.len(), 10);
        for delivery in &deliveries[..5] {
            let settlement = match delivery.stored.sequence {
                3 => Settlement::Retry {
                    delay: Duration::from_secs(3600),
                    errors: Vec::new(),
                },
                4 => Settlement::DeadLetter {
                    reason: DeadLetterReason::Rejected,
                    errors: Vec::new(),
                },
                _ => Settlement::Ack(Effects::default()),
            };
            p.settle(delivery, settlement).await.unwrap();
        }
    }

    /// A plugin's dead letters are counted as they come and go, and a log from before the
    /// counts is counted when it opens.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letter_counts_follow_the_letters_and_an_older_log_is_counted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let bus = SqliteBus::open(SqliteOptions::new(&path)).unwrap();
        settle_some(&bus).await;
        let letters = |bus: &SqliteBus| {
            let bus = bus.clone();
            async move { bus.consumer_stats("p").await.unwrap().dead_letters }
        };
        assert_eq!(letters(&bus).await, 1);
        bus.close().await.unwrap();
        drop(bus);
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "DROP TRIGGER dead_letter_counted; DROP TRIGGER dead_letter_uncounted;
                 DROP TABLE dead_letter_counts;",
            )
            .unwrap();
        let bus = SqliteBus::open(SqliteOptions::new(&path)).unwrap();
        assert_eq!(letters(&bus).await, 1, "counted at open");
        let deleted = bus
            .delete_dead_letters(&crate::bus::DeadLetterSelection::Plugin {
                plugin: "p".into(),
                reason: None,
            })
            .await
            .unwrap();
        assert_eq!((deleted, letters(&bus).await), (1, 0));
        bus.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_what_every_plugin_settled_goes_unless_a_rule_says_otherwise() {
        let (_dir, bus) = open();
        settle_some(&bus).await;
        let record = Arc::new(Record::default());
        let options = RetentionOptions {
            rules: vec![rule(">", Keep::For(Duration::ZERO))],
            observer: record.clone(),
            ..RetentionOptions::default()
        };
        check(&bus, options, Instant::now()).await;
        // Retrying (3), dead-lettered (4) and unsettled (6..) stay; `q` holds none of it.
        assert_eq!(sequences(&bus).await, [3, 4, 6, 7, 8, 9, 10]);
        assert_eq!(record.deleted.load(Ordering::Relaxed), 3);

        let mut all = rule(">", Keep::For(Duration::ZERO));
        all.delete_unsettled = true;
        all.delete_dead_lettered = true;
        let options = RetentionOptions {
            rules: vec![all],
            ..RetentionOptions::default()
        };
        check(&bus, options, Instant::now()).await;
        assert_eq!(sequences(&bus).await, [10], "the newest event stays");
        let stats = bus.consumer_stats("p").await.unwrap();
        assert_eq!((stats.pending_retries, stats.dead_letters), (0, 0));
        bus.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_letter_keeps_its_event_until_a_rule_lets_both_go() {
        let (_dir, bus) = open();
        settle_some(&bus).await;
        let mut rule = rule(">", Keep::For(Duration::ZERO));
        rule.delete_dead_lettered = true;
        let options = RetentionOptions {
            rules: vec![rule],
            ..RetentionOptions::default()
        };
        check(&bus, options, Instant::now()).await;
        assert_eq!(sequences(&bus).await, [3, 6, 7, 8, 9, 10]);
        let letters = dead_letters(&bus).await;
        assert!(letters.is_empty());
        assert_eq!(bus.consumer_stats("p").await.unwrap().dead_letters, 0);
        bus.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_whose_event_was_deleted_under_it_leaves_no_dead_letter() {
        let (_dir, bus) = open();
        bus.append((1..=3).map(|n| event("a.x", n, 10)).collect())
            .await
            .unwrap();
        let p = bus.consumer("p", spec("a.>")).await.unwrap();
        let held = p.next(3).await.unwrap();
        assert_eq!(held.len(), 3);
        let mut all = rule(">", Keep::For(Duration::ZERO));
        all.delete_unsettled = true;
        let options = RetentionOptions {
            rules: vec![all],
            ..RetentionOptions::default()
        };
        check(&bus, options, Instant::now()).await;
        assert_eq!(sequences(&bus).await, [3], "the newest event stays");
        // Every held delivery is dead-lettered; only the event still in the log has
        // something to replay or show.
        for delivery in &held {
            let settlement = Settlement::DeadLetter {
                reason: DeadLetterReason::Rejected,
                errors: Vec::new(),
            };
            p.settle(delivery, settlement).await.unwrap();
        }
        let letters = dead_letters(&bus).await;
        let sequences: Vec<u64> = letters.iter().map(|l| l.stored.sequence).collect();
        assert_eq!(sequences, [3]);
        assert_eq!(bus.consumer_stats("p").await.unwrap().dead_letters, 1);
        let rows: i64 = bus
            .read(|conn| conn.query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(
            rows, 1,
            "no dead letter is stored for an event that is gone"
        );
        // One stored so by an older host is neither replayed nor deleted: it shows nowhere.
        let path = bus.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let conn = open_connection(&path, Durability::Normal).unwrap();
            conn.execute(
                "INSERT INTO dead_letters (plugin, seq, reason, errors, dead_at)
                 VALUES ('p', 1, 'rejected', '[]', 0)",
                [],
            )
            .unwrap();
        })
        .await
        .unwrap();
        let replayed = bus
            .replay_dead_letters(&crate::bus::DeadLetterSelection::Plugin {
                plugin: "p".into(),
                reason: None,
            })
            .await
            .unwrap();
        assert_eq!(replayed, 1, "only the letter of the event still there");
        bus.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_letter_older_than_its_age_limit_goes_and_frees_its_event() {
        let (_dir, bus) = open();
        settle_some(&bus).await;
        let options = RetentionOptions {
            rules: vec![rule(">", Keep::For(Duration::ZERO))],
            dead_letter_max_age: Some(Duration::from_secs(3600)),
            ..RetentionOptions::default()
        };
        let dead_letters = |bus: &SqliteBus| {
            let bus = bus.clone();
            async move { bus.consumer_stats("p").await.unwrap().dead_letters }
        };
        check(&bus, options.clone(), Instant::now()).await;
        assert_eq!(dead_letters(&bus).await, 1, "younger than the limit: kept");
        assert_eq!(sequences(&bus).await, [3, 4, 6, 7, 8, 9, 10]);

        // Dead-lettered two hours ago.
        let path = bus.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let conn = open_connection(&path, Durability::Normal).unwrap();
            conn.execute("UPDATE dead_letters SET dead_at = dead_at - 7200000", [])
                .unwrap();
        })
        .await
        .unwrap();
        check(&bus, options, Instant::now()).await;
        assert_eq!(dead_letters(&bus).await, 0);
        assert_eq!(
            sequences(&bus).await,
            [3, 6, 7, 8, 9, 10],
            "its event went by the rule, in the same check"
        );
        bus.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_bytes_deletes_the_oldest_settled_first_and_says_when_it_cannot() {
        let (_dir, bus) = open();
        // 400 events of 8 KiB, about 3.2 MiB; `ledger.x` (every fourth) is kept forever.
        let events: Vec<Event> = (0..400)
            .map(|n| event(if n % 4 == 0 { "ledger.x" } else { "bulk.x" }, n, 8192))
            .collect();
        bus.append(events).await.unwrap();
        let record = Arc::new(Record::default());
        let options = |max_bytes: u64| RetentionOptions {
            rules: vec![rule("ledger.>", Keep::Forever)],
            max_bytes: Some(max_bytes),
            observer: record.clone(),
            ..RetentionOptions::default()
        };
        check(&bus, options(2 << 20), Instant::now()).await;
        let left = sequences(&bus).await;
        // The oldest bulk events went; every ledger event stayed.
        assert_eq!(left.iter().filter(|s| (*s - 1) % 4 == 0).count(), 100);
        let bulk: Vec<u64> = left.iter().copied().filter(|s| (s - 1) % 4 != 0).collect();
        assert!(bulk.len() < 300 && !bulk.is_empty(), "{}", bulk.len());
        assert!(
            bulk.windows(2).all(|w| w[1] == w[0] + 1 || (w[0]) % 4 == 0),
            "only the oldest went: {bulk:?}"
        );
        assert!(!bulk.contains(&2), "the oldest bulk event went first");
        assert!(!record.blocked.load(Ordering::Relaxed));
        let size = used_bytes(&bus).await;
        assert!(size <= 2 << 20, "{size}");

        // Below what the kept-forever events need, it deletes every other and says so.
        check(&bus, options(512 << 10), Instant::now()).await;
        let left = sequences(&bus).await;
        assert_eq!(left.len(), 101);
        assert!(left[..100].iter().all(|s| (s - 1) % 4 == 0));
        assert_eq!(left[100], 400, "the newest event stays");
        assert!(record.blocked.load(Ordering::Relaxed));
        bus.close().await.unwrap();
    }

    async fn dead_letters(bus: &SqliteBus) -> Vec<crate::bus::DeadLetter> {
        bus.dead_letters(crate::bus::DeadLetterQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .letters
    }

    async fn used_bytes(bus: &SqliteBus) -> u64 {
        bus.read(|conn| {
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            Ok(to_u64((pages - free) * size))
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plugin_holds_only_its_own_types_and_an_absent_one_only_for_the_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        // An earlier process: `gone` subscribed to `a.>` and read nothing.
        let before = SqliteBus::open(SqliteOptions::new(&path)).unwrap();
        before
            .append(
                (1..=6)
                    .map(|n| event(if n % 2 == 0 { "b.x" } else { "a.x" }, n, 10))
                    .collect(),
            )
            .await
            .unwrap();
        drop(before.consumer("gone", spec("a.>")).await.unwrap());
        before.close().await.unwrap();

        let bus = SqliteBus::open(SqliteOptions::new(&path)).unwrap();
        let expire = || RetentionOptions {
            rules: vec![rule(">", Keep::For(Duration::ZERO))],
            ..RetentionOptions::default()
        };
        check(&bus, expire(), Instant::now()).await;
        assert_eq!(
            sequences(&bus).await,
            [1, 3, 5, 6],
            "only its own types are held, and the newest event stays"
        );

        // This process: `here` (subscribed to `b.>`) opened and closed just now.
        bus.append((7..=8).map(|n| event("b.x", n, 10)).collect())
            .await
            .unwrap();
        drop(bus.consumer("here", spec("b.>")).await.unwrap());
        let hold = || RetentionOptions {
            absent_plugin_hold: Some(Duration::from_secs(60)),
            ..expire()
        };
        // Absence counts from this process's start at the earliest...
        check(&bus, hold(), Instant::now()).await;
        assert_eq!(sequences(&bus).await, [1, 3, 5, 6, 7, 8]);
        // ...and from when the plugin's consumer closed.
        check(&bus, hold(), two_minutes_ago()).await;
        assert_eq!(sequences(&bus).await, [6, 7, 8]);
        // The newest event stayed, so no sequence is handed out twice.
        bus.append(vec![event("c.x", 9, 10)]).await.unwrap();
        assert_eq!(sequences(&bus).await, [6, 7, 8, 9]);
        bus.close().await.unwrap();
    }

    /// A plugin absent for longer than `absent_plugin_hold` holds nothing back through its
    /// retries either: no consumer will run them. Its dead letters stay, for operators.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_absent_plugins_retries_hold_nothing_once_its_hold_is_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        // An earlier process, where `p` last ran.
        let before = SqliteBus::open(SqliteOptions::new(&path)).unwrap();
        settle_some(&before).await;
        before.close().await.unwrap();

        let bus = SqliteBus::open(SqliteOptions::new(&path)).unwrap();
        let options = || RetentionOptions {
            rules: vec![rule(">", Keep::For(Duration::ZERO))],
            absent_plugin_hold: Some(Duration::from_secs(60)),
            ..RetentionOptions::default()
        };
        check(&bus, options(), Instant::now()).await;
        assert_eq!(sequences(&bus).await, [3, 4, 6, 7, 8, 9, 10], "still held");
        check(&bus, options(), two_minutes_ago()).await;
        assert_eq!(sequences(&bus).await, [4, 10]);
        let stats = bus.consumer_stats("p").await.unwrap();
        assert_eq!((stats.pending_retries, stats.dead_letters), (0, 1));
        bus.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_file_shrinks_and_a_new_plugin_starts_at_the_oldest_event_kept() {
        let (_dir, bus) = open();
        let auto_vacuum: i64 = bus
            .read(|conn| conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(auto_vacuum, 2, "a new log can give space back");
        bus.append((0..1000).map(|n| event("bulk.x", n, 4096)).collect())
            .await
            .unwrap();
        let file = |bus: &SqliteBus| {
            let path = bus.path().to_owned();
            async move {
                // The file shrinks at the checkpoint after the vacuum.
                let conn = Connection::open(&path).unwrap();
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .unwrap();
                std::fs::metadata(&path).unwrap().len()
            }
        };
        let before = file(&bus).await;
        assert!(before > 4 << 20, "{before}");
        let options = RetentionOptions {
            max_bytes: Some(1 << 20),
            ..RetentionOptions::default()
        };
        check(&bus, options, Instant::now()).await;
        let after = file(&bus).await;
        assert!(after <= (1 << 20) + (256 << 10), "{before} -> {after}");
        let kept = sequences(&bus).await;
        let oldest = kept[0];
        assert!(oldest > 1 && kept.len() < 1000);

        let late = bus.consumer("late", spec(">")).await.unwrap();
        let first = late.next(1).await.unwrap();
        assert_eq!(first[0].stored.sequence, oldest);
        bus.close().await.unwrap();
    }
}
