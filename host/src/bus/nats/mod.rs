//! The distributed bus on NATS JetStream: many hosts share one event stream, one durable
//! pull consumer per plugin (competing consumers), a dead-letter stream and one KV bucket
//! per plugin. Hosts keep no state of their own beyond their plugin directory.
//!
//! Names (`P` is `[bus] prefix`):
//! - stream `P-events`, subjects `P.events.<type>` (the event type's dot-separated words,
//!   each made subject-safe; events without a CloudEvents subject),
//!   `P.streams.<token>.<type>` (events with one: `<token>` stands for the subject, so a
//!   subject's stream is one wildcard, see `streams.rs`), `P.replay.<plugin>` (dead
//!   letters sent back to one plugin), `P.commits.<token>.<sequence>` (records of commits
//!   with stream conditions) and `P.guards` (their conditions on streams read);
//! - durable consumer `P-<plugin>` on it, filtering on the plugin's patterns (made
//!   disjoint, as the server requires) under `P.events.` and `P.streams.*.`, and its
//!   replay subject; the host still matches each event's type against the patterns, as
//!   the filter may be wider;
//! - stream `P-schedules` (a work queue with the server's message schedules): pending
//!   scheduled events `P.schedule.<id token>`, fired into `P.due.<id token>`, and the
//!   durable consumer `P-scheduler` every host's scheduler pulls from (`schedules.rs`);
//! - stream `P-dead-letters`, subjects `P.dlq.<plugin>`: one JSON record per dead letter,
//!   its id the record's stream sequence;
//! - KV buckets `P-kv-<plugin>` (plugin state; its stream also holds the plugin's commit
//!   records, subjects `P-kv-<plugin>.commit.<sequence>`) and `P-attempts` (errors of
//!   earlier attempts, key `<plugin>.<sequence>`).
//!
//! How the [`Bus`] contract maps onto JetStream, and where it is weaker than the embedded
//! log (the README's table of guarantees says the same for operators):
//! - **Append** publishes each event with `Nats-Msg-Id` = SHA-256 of `(source, id)`; the
//!   stream drops a copy sent again within `duplicate_window` and answers with the
//!   original's sequence. A batch is not atomic: on an error some events may be stored,
//!   and the producer's retry of the batch is absorbed by the dedupe; a batch holding an
//!   `expectedversion` is one atomic batch. An event with a subject is appended on the
//!   condition that its stream has not moved since its version was read (`streams.rs`).
//! - **Delivery**: a retry is a `Nak` with the backoff's delay; a dead letter is a record
//!   in the dead-letter stream followed by the acknowledgement. The server's own
//!   `max_deliver` is left unlimited because the server drops a message silently when it
//!   runs out; the host instead dead-letters an event handed out [`UNSETTLED_LIMIT`] times
//!   without any settlement (hosts crashing on it), so nothing is dropped unrecorded.
//!   While a host works on a delivery it tells the server so every `ack_wait / 3`;
//!   deliveries of a host that died go to another host after `ack_wait`.
//! - **Effects**: JetStream has no transaction across streams. A settlement with no KV
//!   writes checks its reads and publishes its emits (their ids derive from the handled
//!   event, so `Nats-Msg-Id` absorbs a repeat). One with KV writes stores its writes and
//!   a commit record in one atomic batch on the plugin's KV stream, every message
//!   conditional on the revisions the attempt read or overwrites; the record stays for a
//!   day. `commit.rs` states the protocol, its invariants, and what a crash leaves for
//!   the next host to finish.
//!
//! Every guarantee above rests on JetStream's compare-and-set
//! (`Nats-Expected-Last-Subject-Sequence`) and atomic batches; [`setup`] refuses
//! servers older than its `MIN_SERVER_VERSION`. A replicated stream reports a failed
//! compare-and-set with another error code than a single server (see
//! [`compare_and_set_failed`]).
//!
//! Files:
//! - `mod.rs`: the options, the bus and its shared state, publishing and reading events,
//!   and the [`Bus`] calls;
//! - `setup.rs`: connecting, and creating or checking the streams and buckets at start;
//! - `messages.rs`: how an event becomes a message (subject, `Nats-Msg-Id`, payload,
//!   replay headers) and back;
//! - `streams.rs`: subject streams (versions, conditional appends, pages) and storing
//!   events, the one path of ingest, emits and the scheduler; commits with stream
//!   conditions;
//! - `schedules.rs`: scheduled events on the server's message schedules;
//! - `commit.rs`: the commit protocol (atomic, conditional batches and commit records);
//! - `consumer.rs`: a plugin's consumer on one host: pulling, keep-alive, settling, and
//!   the errors of earlier attempts;
//! - `dead_letters.rs`: the dead-letter records and the [`DeadLetters`](super::DeadLetters) calls;
//! - `scan.rs`: reading a subject filter's messages in order (direct gets for a few, an
//!   ordered consumer for more), for pages of the log and of dead letters;
//! - `schemas.rs`: the schemas bucket `P-schemas`, settlement notices on
//!   `P.notices.<key>` (core NATS, kept by the stream `P-notices`) and reading the
//!   latest events of a type;
//! - `controls.rs`: the plugin controls bucket `P-controls` (pause and breaker);
//! - `kv.rs`: the plugin KV buckets, their key encoding and the [`KvSource`](crate::kv::KvSource)
//!   reads.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::context::Context as JetStream;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use self::consumer::NatsConsumer;
use self::messages::decode_event;
use super::{
    Appended, Bus, BusError, Consumer, ConsumerSpec, ConsumerStats, LogPage, LogQuery, Reach,
    StoredEvent,
};
use crate::event::Event;

/// `events` less the `streamversion` of those without a subject: the host gives an event
/// its version as it joins its subject's stream, and one that joins none has none (as
/// on the embedded log).
fn without_unearned_versions(mut events: Vec<Event>) -> Vec<Event> {
    for event in events.iter_mut().filter(|e| e.subject.is_none()) {
        event.extensions.remove(crate::stream::STREAM_VERSION);
    }
    events
}

/// Times an event may be handed out without any settlement (the hosts holding it died or
/// stalled) before the host dead-letters it instead of running it again.
pub const UNSETTLED_LIMIT: i64 = 10;

/// Bytes of `max_payload` kept for message headers.
pub(super) const HEADER_ROOM: usize = 4096;

/// How long the marker a KV delete or purge leaves stays in its bucket: the server's
/// least time to live. Reading the key finds nothing either way, so markers kept for good
/// would only grow the bucket by one message per key ever deleted (as on the embedded
/// log, where a deleted row simply goes). An attempt that read a marker which expires
/// before its commit conflicts, and runs again.
const MARKER_TTL: Duration = Duration::from_secs(1);

/// How the NATS backend is set up; see `[bus]` in the host config.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Server URLs, comma-separated.
    pub url: String,
    /// Prefix of every stream, subject, consumer and bucket.
    pub prefix: String,
    /// Copies of each stream and bucket.
    pub replicas: usize,
    /// Oldest event the stream keeps.
    pub max_age: Option<Duration>,
    /// Most bytes the stream keeps.
    pub max_bytes: Option<u64>,
    /// Retention rules that differ by type: each event's own time to live
    /// ([`crate::retention::message_ttl`]); empty when `max_age` covers every type.
    pub per_type_retention: Vec<crate::retention::RetentionRule>,
    /// How long a resent `(source, id)` is recognised.
    pub duplicate_window: Duration,
    /// Oldest dead letter the dead-letter stream keeps; `None`: every one until deleted.
    pub dead_letter_max_age: Option<Duration>,
    /// How long a delivery may go without word before another host gets it.
    pub ack_wait: Duration,
}

fn nats_error(what: &str) -> impl Fn(&dyn Display) -> BusError + '_ {
    move |error| BusError::Storage(format!("NATS JetStream: {what}: {error}"))
}

/// Whether a JetStream answer is a failed compare-and-set (`Nats-Expected-Last-Subject-
/// Sequence` did not hold). A single server answers code 10071; a replicated stream
/// answers 10164, which async-nats 0.51 does not classify, so the cause chain is read.
fn compare_and_set_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(api) = current.downcast_ref::<jetstream::Error>() {
            return [
                jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE,
                jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT,
            ]
            .contains(&api.error_code());
        }
        cause = current.source();
    }
    false
}

macro_rules! storage {
    ($what:expr) => {
        |error| nats_error($what)(&error)
    };
}

// Declared after `storage!` so that its files can use it.
mod commit;
mod consumer;
mod controls;
mod dead_letters;
mod kv;
mod messages;
mod scan;
mod schedules;
mod schemas;
mod setup;
mod streams;

/// The NATS JetStream bus.
#[derive(Clone)]
pub struct NatsBus {
    shared: Arc<Shared>,
}

struct Shared {
    client: async_nats::Client,
    jetstream: JetStream,
    options: NatsOptions,
    events: stream::Stream,
    dead_letters: stream::Stream,
    /// Scheduled events (see `schedules.rs`).
    schedules: stream::Stream,
    /// The scheduler's consumer on `schedules`, created on first use and again after a
    /// pull failed (it may have been deleted, or the stream restored).
    scheduler: tokio::sync::Mutex<Option<PullConsumer>>,
    attempts: jetstream::kv::Store,
    plugin_kv: Mutex<HashMap<String, Arc<jetstream::kv::Store>>>,
    /// Per plugin bucket, the queue of this host's committer (see `commit.rs`).
    committers: Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<commit::Pending>>>,
    /// The schemas bucket, opened when first used.
    schemas: tokio::sync::OnceCell<jetstream::kv::Store>,
    /// The plugin controls bucket, opened when first used.
    controls: tokio::sync::OnceCell<jetstream::kv::Store>,
    /// Settlement notices for the publisher task (see `schemas.rs`).
    notices: tokio::sync::mpsc::Sender<(String, Bytes)>,
    /// The stream that keeps the notices published (see `schemas.rs`).
    recorded_notices: stream::Stream,
    /// Since when the connection to the server has been lost, if it is.
    outage: Arc<Outage>,
}

impl Shared {
    /// Whether stream reads may be direct gets (see `next_message`).
    fn direct(&self) -> bool {
        self.options.replicas == 1
    }

    /// The next messages at or after `from` whose subjects match `subject`, oldest first:
    /// up to [`DIRECT_BATCH`] in one request from a single copy ([`next_messages`]), the
    /// next one alone from a replicated stream's leader. Empty when there are none.
    async fn messages_from(
        &self,
        stream: &stream::Stream,
        subject: &str,
        from: u64,
    ) -> Result<Vec<jetstream::message::StreamMessage>, BusError> {
        if self.direct() {
            next_messages(&self.client, stream, subject, from).await
        } else {
            Ok(next_message(stream, false, subject, from)
                .await?
                .into_iter()
                .collect())
        }
    }

    /// Hands `take` every message whose subject matches `subject`, oldest first, until
    /// there are none left or `limit` have been read (checked between requests of
    /// [`Shared::messages_from`]).
    async fn scan_subject(
        &self,
        stream: &stream::Stream,
        subject: &str,
        limit: usize,
        mut take: impl FnMut(&jetstream::message::StreamMessage),
    ) -> Result<(), BusError> {
        let mut from = 1;
        let mut scanned = 0;
        while scanned < limit {
            let messages = self.messages_from(stream, subject, from).await?;
            let Some(last) = messages.last() else {
                break;
            };
            from = last.sequence + 1;
            scanned += messages.len();
            messages.iter().for_each(&mut take);
        }
        Ok(())
    }

    /// Refuses a message the server would not take (its `max_payload`, less room for
    /// headers), before anything is sent.
    fn check_size(&self, what: impl Fn() -> String, bytes: usize) -> Result<(), BusError> {
        let limit = self.client.max_payload().saturating_sub(HEADER_ROOM);
        if bytes > limit {
            return Err(BusError::TooLarge {
                what: what(),
                bytes,
                limit,
            });
        }
        Ok(())
    }

    fn journal_key(plugin: &str, sequence: u64) -> String {
        format!("{plugin}.{sequence}")
    }

    /// Refuses at once an append made after the connection has been lost for longer than
    /// an append waits for its acknowledgement ([`PUBLISH_PATIENCE`]). A shorter break is
    /// ridden out: the client holds the publish and sends it on reconnecting. A longer
    /// one would hold every producer's request (and its place in flight) for the whole
    /// wait, only to refuse it then.
    fn check_reachable(&self) -> Result<(), BusError> {
        match self.outage.lasted() {
            Some(lasted) if lasted > PUBLISH_PATIENCE => Err(BusError::Storage(format!(
                "not connected to the NATS server for {} s; reconnecting",
                lasted.as_secs()
            ))),
            _ => Ok(()),
        }
    }
}

/// How long a publish waits for the server's acknowledgement: the JetStream context's
/// default timeout, which the backend does not change.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(5);

/// When the connection to the server was lost, kept by the client's event callback (its
/// events arrive in order: a loss, then the reconnection).
pub(super) struct Outage {
    /// The origin of `lost_at`.
    epoch: std::time::Instant,
    /// Milliseconds from `epoch` to the loss, plus one; 0 while connected.
    lost_at: std::sync::atomic::AtomicU64,
}

impl Outage {
    pub(super) fn new() -> Self {
        Self {
            epoch: std::time::Instant::now(),
            lost_at: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(super) fn observe(&self, event: &async_nats::Event) {
        use std::sync::atomic::Ordering::Relaxed;
        match event {
            async_nats::Event::Disconnected => {
                let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                // A second loss before a reconnection keeps the first one's time.
                let _ = self
                    .lost_at
                    .compare_exchange(0, now.saturating_add(1), Relaxed, Relaxed);
            }
            async_nats::Event::Connected => self.lost_at.store(0, Relaxed),
            _ => {}
        }
    }

    /// How long the connection has been lost, or `None` while connected.
    pub(super) fn lasted(&self) -> Option<Duration> {
        match self.lost_at.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            lost_at => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(lost_at - 1)),
            ),
        }
    }
}

/// The first message at or after `from` whose subject matches `subject`, or `None`:
/// a direct get on a single copy, the stream leader's answer with replicas.
async fn next_message(
    stream: &stream::Stream,
    direct: bool,
    subject: &str,
    from: u64,
) -> Result<Option<jetstream::message::StreamMessage>, BusError> {
    if direct {
        match stream
            .direct_get_next_for_subject(subject, Some(from))
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(nats_error("reading a stream")(&error)),
        }
    } else {
        match stream.get_first_raw_message_by_subject(subject, from).await {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(nats_error("reading a stream")(&error)),
        }
    }
}

/// Most messages one [`next_messages`] request brings.
const DIRECT_BATCH: usize = 256;

/// How long [`next_messages`] waits for each message of its answer.
const DIRECT_BATCH_PATIENCE: Duration = Duration::from_secs(10);

/// The messages at or after `from` whose subjects match `subject`, oldest first, at most
/// [`DIRECT_BATCH`] of them, in one request: a batched direct get (nats-server 2.11 and
/// later) on a stream that allows direct gets. Empty when there are none. The server
/// sends them to an inbox one by one and ends with an end-of-batch status (204), or
/// answers 404 when nothing matches.
async fn next_messages(
    client: &async_nats::Client,
    stream: &stream::Stream,
    subject: &str,
    from: u64,
) -> Result<Vec<jetstream::message::StreamMessage>, BusError> {
    let failed = |what: &str| nats_error("reading a stream")(&what);
    let inbox = client.new_inbox();
    let mut answer = client
        .subscribe(inbox.clone())
        .await
        .map_err(storage!("reading a stream"))?;
    let request = serde_json::json!({"seq": from, "next_by_subj": subject, "batch": DIRECT_BATCH});
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{}", stream.cached_info().config.name),
            inbox,
            Bytes::from(request.to_string()),
        )
        .await
        .map_err(storage!("reading a stream"))?;
    let mut messages = Vec::new();
    while messages.len() <= DIRECT_BATCH {
        let Ok(Some(message)) = tokio::time::timeout(DIRECT_BATCH_PATIENCE, answer.next()).await
        else {
            return Err(failed("no answer to a batched direct get"));
        };
        match (message.status, message.description.as_deref()) {
            // A message of the batch carries no status line of its own.
            (None, _) | (Some(async_nats::StatusCode::OK), None) => messages.push(
                jetstream::message::StreamMessage::try_from(message)
                    .map_err(storage!("reading a stream"))?,
            ),
            (Some(async_nats::StatusCode::NOT_FOUND), _) => break,
            (Some(status), _) if status.as_u16() == 204 => break,
            (Some(status), description) => {
                return Err(failed(&format!(
                    "a batched direct get answered {status}: {}",
                    description.unwrap_or("")
                )));
            }
        }
    }
    Ok(messages)
}

/// The newest message whose subject matches `subject`, or `None`, read as
/// [`next_message`] reads.
async fn last_message(
    stream: &stream::Stream,
    direct: bool,
    subject: &str,
) -> Result<Option<jetstream::message::StreamMessage>, BusError> {
    if direct {
        match stream.direct_get_last_for_subject(subject).await {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(error) => Err(nats_error("reading a stream")(&error)),
        }
    } else {
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(error) => Err(nats_error("reading a stream")(&error)),
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn reach(&self) -> Reach {
        let connects = self
            .shared
            .client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        Reach {
            connected: self.shared.client.connection_state()
                == async_nats::connection::State::Connected,
            reconnects: connects.saturating_sub(1),
        }
    }

    async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>, BusError> {
        self.shared
            .store_events(&without_unearned_versions(events), false)
            .await
    }

    async fn append_watched(&self, events: Vec<Event>) -> Result<Vec<Appended>, BusError> {
        self.shared
            .store_events(&without_unearned_versions(events), true)
            .await
    }

    async fn read_log(&self, query: LogQuery) -> Result<LogPage, BusError> {
        let limit = query.limit.max(1);
        let prefix = &self.shared.options.prefix;
        // A subject's events are under its stream's wildcard: the server skips the rest.
        let filter = match &query.subject {
            Some(subject) => messages::stream_filter(prefix, subject),
            None => format!("{prefix}.>"),
        };
        let logged = [format!("{prefix}.events."), format!("{prefix}.streams.")];
        let mut page = LogPage {
            events: Vec::new(),
            scanned_to: query.after,
        };
        // Bounded scan, as the embedded log's: at most this many messages per request.
        let budget = limit.max(10_000);
        let sparse = query.pattern.is_some() || query.caused_by.is_some();
        let mut messages = self
            .shared
            .scan(
                &self.shared.events,
                filter,
                query.after.saturating_add(1),
                if sparse { budget } else { limit },
            )
            .await?;
        for _ in 0..budget {
            let Some(message) = messages.next().await? else {
                break;
            };
            page.scanned_to = message.sequence;
            if !logged
                .iter()
                .any(|head| message.subject.starts_with(head.as_str()))
            {
                continue; // a replay, a commit record or a guard
            }
            let event = decode_event(&message.payload)?;
            if query.wants(&event) {
                page.events.push(StoredEvent {
                    sequence: message.sequence,
                    ingested_at_us: message.stored_at_us,
                    event,
                });
                if page.events.len() == limit {
                    break;
                }
            }
        }
        Ok(page)
    }

    async fn head(&self) -> Result<u64, BusError> {
        let info = self
            .shared
            .events
            .get_info()
            .await
            .map_err(storage!("reading the stream's state"))?;
        Ok(info.state.last_sequence)
    }

    async fn recent_events(
        &self,
        event_type: &str,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, BusError> {
        self.recent_of_type(event_type, limit).await
    }

    async fn consumer(
        &self,
        plugin: &str,
        spec: ConsumerSpec,
    ) -> Result<Arc<dyn Consumer>, BusError> {
        // A serving plugin's bucket is opened (made, the first time) here, so its own
        // reads find it at hand; reads of a bucket no plugin has make none.
        self.shared.plugin_store(plugin).await?;
        Ok(Arc::new(
            NatsConsumer::open(&self.shared, plugin, spec).await?,
        ))
    }

    async fn consumer_stats(&self, plugin: &str) -> Result<ConsumerStats, BusError> {
        let name = format!("{}-{plugin}", self.shared.options.prefix);
        // Read before the consumer: a consumer with nothing pending then has settled
        // every event up to this head that its filter lets through.
        let head = self.head().await?;
        // A plugin that never served against this server (its first load failed) has no
        // consumer yet: nothing read, nothing pending, but perhaps dead letters.
        let info = match self.shared.events.consumer_info(&name).await {
            Ok(info) => Some(info),
            Err(error) if matches!(error.kind(), ConsumerInfoErrorKind::NotFound) => None,
            Err(error) => return Err(nats_error("reading the consumer's state")(&error)),
        };
        let subject = format!("{}.dlq.{plugin}", self.shared.options.prefix);
        let mut dead = self
            .shared
            .dead_letters
            .info_with_subjects(&subject)
            .await
            .map_err(storage!("counting dead letters"))?;
        let mut dead_letters = 0;
        while let Some(entry) = dead.next().await {
            let (_, count) = entry.map_err(storage!("counting dead letters"))?;
            dead_letters += u64::try_from(count).unwrap_or(0);
        }
        let Some(info) = info else {
            return Ok(ConsumerStats {
                cursor: 0,
                lag: 0,
                pending_retries: 0,
                dead_letters,
            });
        };
        let caught_up = info.num_pending == 0 && info.num_ack_pending == 0;
        Ok(ConsumerStats {
            // The ack floor is the last event the filter let through; past it, the events
            // up to the head are not the plugin's.
            cursor: if caught_up {
                head.max(info.ack_floor.stream_sequence)
            } else {
                info.ack_floor.stream_sequence
            },
            lag: info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(0),
            pending_retries: u64::try_from(info.num_redelivered).unwrap_or(0),
            dead_letters,
        })
    }

    async fn plugins_with_consumers(&self) -> Result<Vec<String>, BusError> {
        // Durable consumers `P-<plugin>`; the ordered consumers of reads have other names.
        let own = format!("{}-", self.shared.options.prefix);
        let mut names = self.shared.events.consumer_names();
        let mut plugins = Vec::new();
        while let Some(name) = names.next().await {
            let name = name.map_err(storage!("listing the consumers"))?;
            if let Some(plugin) = name.strip_prefix(&own) {
                plugins.push(plugin.to_owned());
            }
        }
        plugins.sort();
        Ok(plugins)
    }

    async fn forget_plugin(&self, plugin: &str) -> Result<(), BusError> {
        let shared = &self.shared;
        let prefix = &shared.options.prefix;
        let name = format!("{prefix}-{plugin}");
        match shared.events.consumer_info(&name).await {
            // A host that serves the plugin keeps a pull waiting, or holds deliveries.
            Ok(info) if info.num_waiting > 0 || info.num_ack_pending > 0 => {
                return Err(BusError::Conflict(format!(
                    "plugin `{plugin}` is served by a host ({} pulls waiting, {} deliveries \
                     held): remove its file from every host's plugin directory first",
                    info.num_waiting, info.num_ack_pending
                )));
            }
            Ok(_) => {
                shared
                    .events
                    .delete_consumer(&name)
                    .await
                    .map_err(storage!("deleting the plugin's consumer"))?;
            }
            Err(error) if matches!(error.kind(), ConsumerInfoErrorKind::NotFound) => {}
            Err(error) => return Err(nats_error("reading the consumer's state")(&error)),
        }
        let kept = [
            (
                &shared.events,
                format!("{prefix}.replay.{plugin}"),
                "replays",
            ),
            (
                &shared.dead_letters,
                format!("{prefix}.dlq.{plugin}"),
                "dead letters",
            ),
            (
                &shared.attempts.stream,
                format!("{}{plugin}.>", shared.attempts.prefix),
                "attempts",
            ),
        ];
        for (stream, subjects, what) in kept {
            stream
                .purge()
                .filter(subjects)
                .await
                .map_err(|error| nats_error(&format!("deleting the plugin's {what}"))(&error))?;
        }
        shared.forget_bucket(plugin).await?;
        shared.reset_control(plugin).await
    }

    async fn consumer_lag(&self, plugin: &str) -> Result<u64, BusError> {
        let name = format!("{}-{plugin}", self.shared.options.prefix);
        match self.shared.events.consumer_info(&name).await {
            Ok(info) => Ok(info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(0)),
            Err(error) if matches!(error.kind(), ConsumerInfoErrorKind::NotFound) => Ok(0),
            Err(error) => Err(nats_error("reading the consumer's state")(&error)),
        }
    }

    async fn backup_ready(&self) -> Result<(), BusError> {
        Err(BusError::Unsupported(format!(
            "this host runs on NATS JetStream, which keeps the events, KV and dead letters: \
             back up the server's streams with the NATS tools (`nats account backup`, or \
             `nats stream backup` for each stream named `{prefix}-…` or `KV_{prefix}-…`)",
            prefix = self.shared.options.prefix
        )))
    }

    async fn close(&self) -> Result<(), BusError> {
        self.shared
            .client
            .flush()
            .await
            .map_err(storage!("flushing to the server"))
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    use async_nats::jetstream::kv::{CreateError, UpdateError};

    use super::*;

    fn api_error(code: u64) -> jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": code, "description": "wrong last sequence"
        }))
        .unwrap()
    }

    #[test]
    fn both_forms_of_a_failed_compare_and_set_are_recognised_through_the_kv_errors() {
        for code in [10071, 10164] {
            let publish = PublishError::with_source(PublishErrorKind::Other, api_error(code));
            let create = CreateError::from(UpdateError::from(publish));
            assert!(compare_and_set_failed(&create), "code {code}");
        }
        let other = PublishError::with_source(PublishErrorKind::Other, api_error(10077));
        assert!(!compare_and_set_failed(&UpdateError::from(other)));
        assert!(!compare_and_set_failed(&PublishError::new(
            PublishErrorKind::TimedOut
        )));
    }
}
