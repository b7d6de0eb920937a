//! A plugin's consumer on the embedded bus: which events it is handed next, and the
//! cursor it moves as they are settled.
//!
//! The durable position is the plugin's row in `cursors` plus its `acked` rows; the rest
//! of `ConsumerState` lives in memory and is rebuilt from them when the consumer opens.
//! Invariants:
//! - the cursor sent to the writer is never above the lowest main-stream delivery still
//!   outstanding, so a crash redelivers every event not settled;
//! - a delivery stays outstanding (or its retry in flight) until its settlement commits,
//!   so a failed commit can be retried and a retry still due is not handed out twice;
//! - settlements and idle cursor moves are sent to the writer under the state lock, so
//!   they reach it in the order their cursors were computed;
//! - at most `window` main-stream deliveries are outstanding, and the read-ahead holds
//!   at most `MAX_PREFETCH_BYTES` of event data (with a fixed charge per event), or
//!   one event when that alone is larger.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;
use tokio::sync::oneshot;

use super::retention;
use super::writer::{Job, SettleJob};
use super::{
    EVENT_COLUMNS, SCAN_CHUNK, SqliteBus, load_event, parse_errors, row_to_stored, to_i64, to_u64,
};
use crate::bus::{BusError, Consumer, ConsumerSpec, Delivery, Settled, Settlement, StoredEvent};
use crate::clock::now_ms;
use crate::pattern::Pattern;

/// Most event data a consumer keeps read ahead of its deliveries.
const MAX_PREFETCH_BYTES: usize = 4 << 20;
/// Longest a consumer waits before returning an empty batch when nothing is committed
/// and no retry of its plugin falls due: a commit, a settlement and a retry's due time
/// each wake it sooner, so an idle consumer costs no reads.
const IDLE_WAIT: Duration = Duration::from_secs(5);

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
    /// When the plugin's next retry falls due (ms since the Unix epoch), as of the last
    /// read of its retries or its latest retry settlement; `None` when it has none.
    next_retry_ms: Option<i64>,
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

pub(super) struct SqliteConsumer {
    bus: SqliteBus,
    plugin: String,
    patterns: Vec<Pattern>,
    window: usize,
    state: Mutex<ConsumerState>,
    /// Signalled when a settlement frees room in the window.
    room: tokio::sync::Notify,
}

impl SqliteConsumer {
    /// Opens the plugin's cursor (at `spec.start` if it has none yet) and loads the
    /// events it settled above it.
    pub(super) async fn open(
        bus: &SqliteBus,
        plugin: &str,
        spec: ConsumerSpec,
    ) -> Result<Self, BusError> {
        let name = plugin.to_owned();
        let start = spec.start;
        let patterns = retention::patterns_json(&spec.patterns);
        let cursor = bus
            .submit(|reply| Job::OpenCursor {
                plugin: name,
                start,
                patterns,
                reply,
            })
            .await?;
        let name = plugin.to_owned();
        let skip: BTreeSet<u64> = bus
            .read(move |conn| {
                let mut select =
                    conn.prepare("SELECT seq FROM acked WHERE plugin = ?1 AND seq > ?2")?;
                let rows = select.query_map(params![name, to_i64(cursor)], |r| {
                    r.get::<_, i64>(0).map(to_u64)
                })?;
                rows.collect()
            })
            .await?;
        bus.inner.retention.consumer_opened(plugin);
        Ok(SqliteConsumer {
            bus: bus.clone(),
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
                next_retry_ms: None,
            }),
        })
    }

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
                    "SELECT r.seq, r.attempt, r.errors, p.at FROM retries r
                     LEFT JOIN replays p ON p.plugin = r.plugin AND p.seq = r.seq
                     WHERE r.plugin = ?1 AND r.due_at <= ?2 ORDER BY r.due_at, r.seq LIMIT ?3",
                )?;
                let rows: Vec<(i64, i64, String, Option<i64>)> = select
                    .query_map(params![plugin, now, limit], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let later: Option<i64> = conn
                    .prepare_cached(
                        "SELECT MIN(due_at) FROM retries WHERE plugin = ?1 AND due_at > ?2",
                    )?
                    .query_row(params![plugin, now], |r| r.get(0))?;
                let mut deliveries = Vec::new();
                for (seq, attempt, errors, replayed_at_ms) in rows {
                    let seq = to_u64(seq);
                    if in_flight.contains(&seq) {
                        continue;
                    }
                    if let Some(stored) = load_event(conn, seq)? {
                        deliveries.push(Delivery {
                            stored,
                            attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                            errors: parse_errors(&errors),
                            watched: true,
                            replayed_at_us: replayed_at_ms.map(|ms| ms.saturating_mul(1000)),
                        });
                    }
                }
                Ok((deliveries, later))
            })
            .await?;
        let (rows, later) = rows;
        let mut state = self.state();
        state.next_retry_ms = later;
        let mut taken = Vec::new();
        for delivery in rows.into_iter().take(max) {
            if state.retries_in_flight.insert(delivery.stored.sequence) {
                taken.push(delivery);
            }
        }
        Ok(taken)
    }

    /// Of `sequences`, those with a retry of this plugin whose event is still stored.
    async fn pending_retries_of(&self, sequences: &[u64]) -> Result<Vec<u64>, BusError> {
        let plugin = self.plugin.clone();
        let sequences = serde_json::to_string(sequences)
            .map_err(|e| BusError::Storage(format!("listing retries: {e}")))?;
        self.bus
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT r.seq FROM retries r JOIN events e ON e.seq = r.seq
                     WHERE r.plugin = ?1 AND r.seq IN (SELECT value FROM json_each(?2))",
                )?
                .query_map(params![plugin, sequences], |r| {
                    r.get::<_, i64>(0).map(to_u64)
                })?
                .collect()
            })
            .await
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
                watched: true,
                replayed_at_us: None,
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

impl Drop for SqliteConsumer {
    fn drop(&mut self) {
        // Retention counts how long a plugin has had no consumer open.
        self.bus.inner.retention.consumer_closed(&self.plugin);
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
            // Sleep until new events are committed, a settlement frees room or schedules a
            // retry, or the next retry falls due.
            let retry_due = self.state().next_retry_ms.map(|due| {
                let wait = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
                tokio::time::Instant::now() + Duration::from_millis(wait)
            });
            let deadline = retry_due.map_or(deadline, |due| due.min(deadline));
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

    async fn settle(
        &self,
        delivery: &Delivery,
        settlement: Settlement,
    ) -> Result<Settled, BusError> {
        let seq = delivery.stored.sequence;
        let retry_due = match &settlement {
            Settlement::Retry { delay, .. } => {
                Some(now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)))
            }
            _ => None,
        };
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
            if let Some(due) = retry_due {
                state.next_retry_ms = Some(state.next_retry_ms.map_or(due, |t| t.min(due)));
            }
            if is_retry {
                state.retries_in_flight.remove(&seq);
            } else {
                state.outstanding.remove(&seq);
            }
        }
        self.room.notify_one();
        result
    }

    async fn retries_pending(&self, sequences: &[u64]) -> Result<Vec<u64>, BusError> {
        self.pending_retries_of(sequences).await
    }
}
