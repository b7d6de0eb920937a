//! The bus: the durable log of events, each plugin's consumer position, retries, dead
//! letters and plugin KV — behind one [`Bus`] trait so that ingest, the dispatcher and
//! the operator tools never know which backend runs.
//!
//! Contract every backend keeps:
//! - [`Bus::append`] returns only once the events are durable; a batch is all-or-nothing;
//!   an event whose `(source, id)` was appended before is not stored again and answers
//!   with its original sequence. An event with a subject gets the next version of the
//!   subject's stream; one with an expected version is stored only if the stream is at it
//!   ([`crate::stream`]); one with a due time waits in [`Schedules`].
//! - A [`Consumer`] hands out each matching event at least once, and again after a
//!   crash unless it was settled. [`Consumer::settle`] commits, in ONE transaction, the
//!   plugin's effects (emitted events, KV writes) with the acknowledgement — or the retry
//!   schedule entry, or the dead letter. A settled delivery is never handed out again.
//! - KV reads ([`KvSource`]) see only committed state.
//! - Schemas ([`SchemaStore`]), settlement notices ([`Notices`]) and plugin controls
//!   ([`ControlStore`]: pause and breaker) are shared by every host on the bus.

mod controls;
mod dead_letters;
pub mod nats;
mod notices;
mod schedules;
mod schemas;
pub mod sqlite;

pub use self::controls::{Breaker, ControlStore, Paused, PluginControl};
pub use self::dead_letters::{
    DeadLetter, DeadLetterPage, DeadLetterQuery, DeadLetterReason, DeadLetterSelection,
    DeadLetterView, DeadLetters,
};
pub use self::notices::{LocalNotices, Notice, NoticeOutcome, Notices, notice_key};
pub use self::schedules::{Fired, ScheduledEvent, ScheduledQuery, Schedules};
pub use self::schemas::{SchemaStore, StoredSchema};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::effects::Effects;
use crate::event::Event;
use crate::failure::AttemptError;
use crate::kv::{KvError, KvSource};
use crate::pattern::Pattern;

/// Errors of a bus backend.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Too many appends are waiting for the writer; try again later.
    #[error("the log writer is saturated ({pending} events waiting)")]
    Saturated {
        /// Events waiting when the append was refused.
        pending: usize,
    },
    /// The storage failed (disk full, read-only, I/O error).
    #[error("storage error: {0}")]
    Storage(String),
    /// The bus is shutting down.
    #[error("the bus is shut down")]
    Closed,
    /// This bus does not do what was asked; the text says what to do instead.
    #[error("{0}")]
    Unsupported(String),
    /// The thing asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A message is larger than the backend can store (NATS `max_payload`); storing it
    /// again cannot succeed.
    #[error("{what} is {bytes} bytes, more than the bus stores in one message ({limit} bytes)")]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size.
        bytes: usize,
        /// The backend's limit.
        limit: usize,
    },
    /// A settlement's reads no longer hold: another attempt committed a change to what
    /// this one read (a KV key, a stream, a scheduled event). Nothing was committed; run
    /// it again. The text names what changed.
    #[error("conflict: {0} changed since it was read")]
    Conflict(String),
    /// An append's expected stream version does not hold; nothing of the append was stored.
    /// From a settlement: an emit's, and nothing of the settlement was stored (the
    /// dispatcher runs the attempt again, as for [`BusError::Conflict`]).
    #[error(transparent)]
    VersionConflict(#[from] crate::stream::VersionConflict),
    /// The request itself is malformed (a bad `deliverat` or `expectedversion`).
    #[error("{0}")]
    Invalid(String),
    /// The disk has not room for what was asked (a backup beside the log); nothing was
    /// written. The text says how much it needs and has.
    #[error("{0}")]
    NoRoom(String),
}

/// What storing a settlement tells its caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    /// For an acknowledgement, the version each emitted event took in its subject's
    /// stream, in the order of the emits: `None` for one without a subject, one scheduled
    /// for later, or one stored by an earlier try whose version was not read back. Empty
    /// for any other settlement.
    pub stream_versions: Vec<Option<u64>>,
}

impl Settled {
    /// The versions of `appended`, one per emitted event.
    pub fn of(appended: &[Appended]) -> Self {
        Self {
            stream_versions: appended.iter().map(|a| a.stream_version).collect(),
        }
    }
}

/// Where an appended event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Appended {
    /// The event's position in the log; `0` for an event scheduled for later.
    pub sequence: u64,
    /// Whether the event had been appended (or scheduled) before: same `source` and `id`,
    /// or for a scheduled event, the same id pending.
    pub duplicate: bool,
    /// Its position in its subject's stream, for an event with a subject.
    pub stream_version: Option<u64>,
    /// For a scheduled event, when it is due (milliseconds since the Unix epoch).
    pub due_at_ms: Option<i64>,
}

/// An event in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the log.
    pub sequence: u64,
    /// When the host made it durable, in microseconds since the Unix epoch (fine enough
    /// to measure delivery latency).
    pub ingested_at_us: i64,
    /// The event.
    pub event: Event,
}

/// A query over the log for `GET /v1/events`.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// Only events after this sequence.
    pub after: u64,
    /// Only events whose type matches this pattern.
    pub pattern: Option<Pattern>,
    /// Only events with this subject.
    pub subject: Option<String>,
    /// Only events caused by the event with this id (extension `causationid`).
    pub caused_by: Option<String>,
    /// At most this many events.
    pub limit: usize,
}

impl LogQuery {
    /// Whether `event` passes the filters other than the position.
    pub fn wants(&self, event: &Event) -> bool {
        self.pattern.as_ref().is_none_or(|p| p.matches(&event.ty))
            && self
                .subject
                .as_ref()
                .is_none_or(|s| event.subject.as_ref() == Some(s))
            && self
                .caused_by
                .as_deref()
                .is_none_or(|id| event.extension(crate::event::CAUSATION_ID) == Some(id))
    }
}

/// A page of the log.
#[derive(Debug, Clone, Default)]
pub struct LogPage {
    /// The matching events, in log order.
    pub events: Vec<StoredEvent>,
    /// The last sequence the read looked at, matching or not: where the next page starts.
    /// Equal to the query's `after` when the read reached the end of the log.
    pub scanned_to: u64,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartPosition {
    /// Only events appended after the consumer was first created.
    #[default]
    Latest,
    /// Every event in the log.
    Earliest,
}

/// One event handed to a plugin's dispatcher.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event and its log position.
    pub stored: StoredEvent,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// Errors of the earlier attempts, oldest first.
    pub errors: Vec<AttemptError>,
    /// Whether a producer may be waiting for its outcomes (`?wait=`); settlement notices
    /// are published only for these. A backend that can tell cheaply says `true` always.
    pub watched: bool,
    /// When an operator last replayed it from the dead letters, in microseconds since the
    /// Unix epoch; `None` for a delivery that never was.
    pub replayed_at_us: Option<i64>,
}

impl Delivery {
    /// Where its age starts for the retry policy's `max_age`: its ingest, or its replay
    /// (a replay is a fresh start, not the last attempt of a day-old event).
    pub fn age_from_us(&self) -> i64 {
        self.replayed_at_us
            .map_or(self.stored.ingested_at_us, |replayed| {
                replayed.max(self.stored.ingested_at_us)
            })
    }
}

/// How a delivery ends.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Success: commit these effects with the acknowledgement.
    Ack(Effects),
    /// A retryable failure: try again after `delay`.
    Retry {
        /// How long to wait before the next attempt.
        delay: Duration,
        /// Every attempt's error so far, the latest last.
        errors: Vec<AttemptError>,
    },
    /// A final failure: move the event to the dead letters.
    DeadLetter {
        /// Why.
        reason: DeadLetterReason,
        /// Every attempt's error, the latest last.
        errors: Vec<AttemptError>,
    },
}

/// Whether this host reaches its bus now, for readiness and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// The bus answers: always for a log in the host's own process; for a server, while
    /// the host is connected to it.
    pub connected: bool,
    /// Connections made again since the first (a server restarted, a network broke).
    pub reconnects: u64,
}

impl Default for Reach {
    fn default() -> Self {
        Self {
            connected: true,
            reconnects: 0,
        }
    }
}

/// Counters of one plugin's consumer, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConsumerStats {
    /// The consumer's committed position: every event up to it is settled.
    pub cursor: u64,
    /// Events in the log after the cursor (not all of them need match).
    pub lag: u64,
    /// Deliveries waiting for a retry.
    pub pending_retries: u64,
    /// Dead letters of this plugin.
    pub dead_letters: u64,
}

/// What a consumer delivers.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Event-type patterns; an event matching any of them is delivered once.
    pub patterns: Vec<Pattern>,
    /// Where a consumer created now starts.
    pub start: StartPosition,
    /// Most new events handed out and not yet settled; bounds the dispatcher's memory.
    /// Retries are handed out regardless, so a full window never blocks them.
    pub window: usize,
    /// At most one delivery of the plugin unsettled at a time over every host sharing
    /// the bus (`ordering = "key"` where hosts compete for deliveries). A backend with a
    /// single host leaves ordering to the dispatcher and ignores this.
    pub one_at_a_time: bool,
}

/// One plugin's view of the log.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// The next deliveries for this plugin: new matching events and retries that are due,
    /// at most `max`. Waits until at least one is available, or returns an empty batch
    /// after a short while so the caller can check for shutdown.
    async fn next(&self, max: usize) -> Result<Vec<Delivery>, BusError>;

    /// Ends a delivery; see the module docs for the transaction it commits.
    async fn settle(
        &self,
        delivery: &Delivery,
        settlement: Settlement,
    ) -> Result<Settled, BusError>;

    /// Ends several deliveries, each exactly as [`Consumer::settle`] would: one result per
    /// item, in order, and an item's failure leaves the others' settlements standing.
    async fn settle_all(
        &self,
        items: &[(&Delivery, &Settlement)],
    ) -> Vec<Result<Settled, BusError>> {
        futures_util::future::join_all(
            items
                .iter()
                .map(|(delivery, settlement)| self.settle(delivery, (*settlement).clone())),
        )
        .await
    }

    /// Gives back, at once, the deliveries handed out and never settled (fetched but not
    /// run when the dispatcher stopped), so they need not wait out a lease elsewhere.
    async fn release(&self) {}

    /// Whether the bus itself hands out nothing else of the plugin until a delivery
    /// settled with a retry comes back (a consumer opened `one_at_a_time` whose retries
    /// stay pending on the server, whichever host takes them): then a key need not wait
    /// for its retry on this host, where it may never come back.
    fn holds_retries_in_order(&self) -> bool {
        false
    }

    /// Whether the bus hands out one delivery of the plugin at a time, the next only once
    /// it is settled: a batch would then hold one event and only add its linger.
    fn hands_out_one_at_a_time(&self) -> bool {
        false
    }

    /// Of the events at `sequences`, each settled with a retry by this consumer, those
    /// whose retry may still come: one whose event is gone (deleted by retention) never
    /// will. A retry handed out and not settled yet is still to come. (Asked only of a
    /// bus that does not hold retries in order itself.)
    async fn retries_pending(&self, sequences: &[u64]) -> Result<Vec<u64>, BusError> {
        Ok(sequences.to_vec())
    }
}

/// The bus.
#[async_trait]
pub trait Bus:
    KvSource + DeadLetters + SchemaStore + Notices + ControlStore + Schedules + Send + Sync + 'static
{
    /// Appends events durably, all-or-nothing, deduplicating on `(source, id)`.
    async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>, BusError>;

    /// [`Bus::append`] for a producer that waits for the outcomes: their deliveries are
    /// marked [`Delivery::watched`].
    async fn append_watched(&self, events: Vec<Event>) -> Result<Vec<Appended>, BusError> {
        self.append(events).await
    }

    /// Reads the log.
    async fn read_log(&self, query: LogQuery) -> Result<LogPage, BusError>;

    /// The sequence of the last event in the log (0 when empty).
    async fn head(&self) -> Result<u64, BusError>;

    /// The most recent events of exactly `event_type`, at most `limit`, newest first.
    async fn recent_events(
        &self,
        event_type: &str,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, BusError>;

    /// Opens (creating on first use) the consumer of `plugin`. The position, retries and
    /// dead letters belong to the plugin's name, so a new version of the plugin resumes.
    async fn consumer(
        &self,
        plugin: &str,
        spec: ConsumerSpec,
    ) -> Result<Arc<dyn Consumer>, BusError>;

    /// Counters of one plugin's consumer.
    async fn consumer_stats(&self, plugin: &str) -> Result<ConsumerStats, BusError>;

    /// The plugins the bus keeps a consumer (a cursor) for, whether or not any host
    /// serves them now.
    async fn plugins_with_consumers(&self) -> Result<Vec<String>, BusError>;

    /// Forgets what the bus keeps for `plugin`: its place in the log, its retries and
    /// replays, its dead letters and its KV; its control goes back to running. For a plugin
    /// removed for good, once no host serves it ([`BusError::Conflict`] while one does, as
    /// far as the bus can tell); a plugin of that name added later starts afresh.
    async fn forget_plugin(&self, plugin: &str) -> Result<(), BusError>;

    /// [`ConsumerStats::lag`] alone, which a bus may read for less than all the counters
    /// (the dead letters are counted, not kept): the status page samples it every few
    /// seconds for as long as the host runs.
    async fn consumer_lag(&self, plugin: &str) -> Result<u64, BusError> {
        self.consumer_stats(plugin).await.map(|stats| stats.lag)
    }

    /// Makes everything committed so far durable and stops the writer.
    async fn close(&self) -> Result<(), BusError>;

    /// Whether the bus can be reached now.
    fn reach(&self) -> Reach {
        Reach::default()
    }

    /// Whether [`Bus::backup`] would take a copy now, found without taking it: a bus whose
    /// store is a server of its own is backed up with that server's tools
    /// ([`BusError::Unsupported`]); a disk without room for the copy is
    /// [`BusError::NoRoom`].
    async fn backup_ready(&self) -> Result<(), BusError> {
        Err(BusError::Unsupported(NO_BACKUP.into()))
    }

    /// A consistent copy of everything the bus keeps, taken while it serves: an open file
    /// that no directory lists, and its size in bytes. Refused as [`Bus::backup_ready`]
    /// says.
    async fn backup(&self) -> Result<(std::fs::File, u64), BusError> {
        self.backup_ready().await?;
        Err(BusError::Unsupported(NO_BACKUP.into()))
    }
}

const NO_BACKUP: &str = "this bus keeps no file of its own to back up";

impl From<BusError> for KvError {
    fn from(error: BusError) -> Self {
        KvError::new(error)
    }
}
