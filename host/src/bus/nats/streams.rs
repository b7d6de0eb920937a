//! Subject streams on JetStream, and storing events: the one path that ingest, emits and
//! the scheduler take into the event stream.
//!
//! An event with a CloudEvents subject is stored under `P.streams.<token>.<type>` (the
//! token stands for the subject, see `messages.rs`), so its subject's stream is the
//! wildcard `P.streams.<token>.>`: the server finds the stream's newest message by that
//! wildcard, and checks a condition on it (`Nats-Expected-Last-Subject-Sequence` with
//! `…-Subject` set to the wildcard). An event's version is its stream's newest version
//! plus one; it is published on the condition that the newest message is still the one
//! read, so versions are dense however many hosts append: a publish that lost the race is
//! tried again on the new head, or refused as a [`VersionConflict`] when the event
//! expected a version.
//!
//! When events can go (the stream's `max_age` or `max_bytes`, or retention ages by
//! type), a stream whose events all went is empty under its wildcard. Each append then
//! also writes its stream's head, `P.heads.<token>`: the newest version, one message per
//! subject (`Nats-Rollup: sub`) that `max_age` never removes (`Nats-TTL: never`). An
//! empty stream takes its version from its head, so versions are never used twice:
//! - a lone append sends the head just before its event, both on the condition that the
//!   stream's newest event is still the one read (once moved on it never comes back), so
//!   no event is stored without its head before it (should the server fail the head
//!   alone, it follows the event). A head whose event was refused reserves a version no
//!   event took: the next append takes it while the stream has events, and an append to
//!   an empty stream skips it (a gap, never a version used twice). A resent copy,
//!   answered as a duplicate, puts the head back.
//! - an atomic batch carries the heads of its streams after its events.
//!
//! A stream written before heads were kept has none until its next append.
//!
//! Storing events ([`Shared::store_events`]):
//! - one with `deliverat` goes to the schedules (see `schedules.rs`);
//! - a batch holding an expected version is one atomic batch (every condition checked
//!   against the stream before it, so one conflict stores nothing); one whose events were
//!   all stored before is refused by the server as a whole (repeated `Nats-Msg-Id`) and is
//!   then stored event by event, which answers each as the duplicate it is;
//! - otherwise plain events are published without waiting for each other, and stream
//!   events one at a time.
//!
//! A repeat of a conditional append that was stored may be answered by a single-copy
//! stream as a failed condition rather than a duplicate (the server checks conditions
//! first there): the event at the expected version's successor is then looked at, and if
//! it is this one, the answer is "duplicate".
//!
//! An attempt whose effects hold conditions on streams (an expected version, a stream it
//! read) stores its emits as one atomic batch with a commit record
//! ([`Shared::commit_conditional`]), so a redelivery after a crash finishes the commit
//! instead of running the handler again, as KV commits do (`commit.rs`).

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::StreamExt as _;

use super::commit::{BatchError, COMMIT_RECORD_AGE, CommitRecord, Conditional, publish_batch};
use super::messages::{
    self, STREAM_VERSION, decode_event, encode_event, event_subject, header, message_id,
    stream_filter, stream_head_subject, subject_of, subject_token,
};
use super::{Shared, compare_and_set_failed, last_message, nats_error, next_message};
use crate::bus::{Appended, BusError, Settled};
use crate::effects::Effects;
use crate::event::Event;
use crate::retention::message_ttl;
use crate::schedule::DELIVER_AT;
use crate::stream::{self as streams, EXPECTED_VERSION, StreamPage, VersionConflict};

/// Times a stream append is tried again after other appends came first.
const APPEND_TRIES: usize = 1000;
/// Most messages the server takes in one atomic batch.
const MAX_BATCH_MESSAGES: usize = 1000;
/// Longest a stream page waits for its next message from the server.
const STREAM_READ_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);
/// Pages of up to this many events are read by direct gets, one round trip each; longer
/// ones through an ordered consumer. (A batched direct get that brought ten messages
/// took as long as ten single ones: the server's cost is per message.)
const DIRECT_READS: usize = 16;

/// Where a subject's stream stands.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Head {
    /// The sequence of its newest event in the event stream; 0 when none is kept.
    pub(super) sequence: u64,
    /// Its newest version: that event's, or, when its events aged out, its head
    /// message's; 0 for a stream never written.
    pub(super) version: u64,
}

/// The stream version a stored message carries.
fn version_of(message: &StreamMessage) -> u64 {
    header(Some(&message.headers), STREAM_VERSION)
        .or_else(|| {
            decode_event(&message.payload)
                .ok()
                .and_then(|event| streams::stream_version(&event))
        })
        .unwrap_or(0)
}

/// Whether a publish was refused on its condition.
pub(super) fn wrong_last_sequence(error: &PublishError) -> bool {
    error.kind() == PublishErrorKind::WrongLastSequence || compare_and_set_failed(error)
}

/// How an atomic batch that the server refused for a repeated `Nats-Msg-Id` is answered.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnRepeat {
    /// Store the events one by one, each answered as what it is.
    EventByEvent,
    /// The batch was committed before: nothing to do.
    Done,
}

/// An event as one message of a batch, and what its answer will say.
struct Planned {
    message: Conditional,
    stream_version: Option<u64>,
}

impl Shared {
    /// Where `subject`'s stream stands: its newest event, or when none is kept, its head
    /// message.
    pub(super) async fn stream_head(&self, subject: &str) -> Result<Head, BusError> {
        let prefix = &self.options.prefix;
        if let Some(newest) = self.last_message(&stream_filter(prefix, subject)).await? {
            return Ok(Head {
                sequence: newest.sequence,
                version: version_of(&newest),
            });
        }
        let head = self
            .last_message(&stream_head_subject(prefix, subject))
            .await?;
        Ok(Head {
            sequence: 0,
            version: head.map_or(0, |message| {
                std::str::from_utf8(&message.payload)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .unwrap_or(0)
            }),
        })
    }

    /// The newest message of the event stream whose subject matches `subject`.
    async fn last_message(&self, subject: &str) -> Result<Option<StreamMessage>, BusError> {
        last_message(&self.events, self.direct(), subject).await
    }

    /// Whether appends keep their streams' heads: only a stream whose events can go
    /// (`max_age`, `max_bytes`, ages by type) needs them.
    fn keeps_heads(&self) -> bool {
        self.options.max_age.is_some()
            || self.options.max_bytes.is_some()
            || !self.options.per_type_retention.is_empty()
    }

    /// The head message of a lone append: `version`, on the condition that the stream's
    /// newest event is still the one `head` read.
    fn stream_head_message(&self, subject: &str, version: u64, head: Head) -> Conditional {
        Conditional {
            expected: Some(head.sequence),
            condition_on: Some(stream_filter(&self.options.prefix, subject)),
            ..self.head_message(subject, version)
        }
    }

    /// The message that makes `version` the head of `subject`'s stream.
    fn head_message(&self, subject: &str, version: u64) -> Conditional {
        Conditional {
            subject: stream_head_subject(&self.options.prefix, subject),
            payload: Bytes::from(version.to_string()),
            expected: None,
            condition_on: None,
            headers: vec![
                ("Nats-Rollup", "sub".to_owned()),
                ("Nats-TTL", "never".to_owned()),
            ],
        }
    }

    /// The first message of the stream `filter` with a version of at least `version`, by
    /// bisecting the event stream's sequences up to `head` (versions grow with them).
    async fn seek(
        &self,
        filter: &str,
        version: u64,
        head: Head,
    ) -> Result<Option<StreamMessage>, BusError> {
        // Read from its start, a stream's first message is the one: no bisecting.
        if version <= 1 {
            let oldest = next_message(&self.events, self.direct(), filter, 1).await?;
            return Ok(oldest.filter(|message| message.sequence <= head.sequence));
        }
        let (mut low, mut high) = (1u64, head.sequence);
        let mut found = None;
        while low <= high {
            let middle = low + (high - low) / 2;
            match next_message(&self.events, self.direct(), filter, middle).await? {
                Some(message) if message.sequence <= high => {
                    if version_of(&message) >= version {
                        high = middle - 1;
                        found = Some(message);
                    } else {
                        low = message.sequence + 1;
                    }
                }
                _ => {
                    if middle == 0 {
                        break;
                    }
                    high = middle - 1;
                }
            }
        }
        Ok(found)
    }

    /// Up to `limit` events of `subject`'s stream after version `after`.
    pub(super) async fn read_stream_page(
        &self,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<StreamPage, BusError> {
        let filter = stream_filter(&self.options.prefix, subject);
        let head = self.stream_head(subject).await?;
        let mut page = StreamPage {
            events: Vec::new(),
            version: head.version,
        };
        if limit == 0 || after >= head.version {
            return Ok(page);
        }
        let Some(first) = self.seek(&filter, after + 1, head).await? else {
            return Ok(page);
        };
        let wanted = usize::try_from(head.version - after)
            .unwrap_or(usize::MAX)
            .min(limit);
        // A token is a hash: only events of this very subject belong to the page.
        let mut take = |payload: &[u8]| -> Result<bool, BusError> {
            let event = decode_event(payload)?;
            if event.subject.as_deref() == Some(subject) {
                page.events.push(event);
            }
            Ok(page.events.len() < limit)
        };
        if wanted <= DIRECT_READS {
            let mut next = Some(first);
            while let Some(message) = next {
                if message.sequence > head.sequence || !take(&message.payload)? {
                    break;
                }
                next = next_message(&self.events, self.direct(), &filter, message.sequence + 1)
                    .await?;
            }
        } else {
            // A longer page streams through an ordered consumer: one request, not one
            // round trip per event.
            let consumer = self
                .events
                .create_consumer(pull::OrderedConfig {
                    filter_subject: filter.clone(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: first.sequence,
                    },
                    ..Default::default()
                })
                .await
                .map_err(storage!("reading a stream"))?;
            let mut messages = consumer
                .messages()
                .await
                .map_err(storage!("reading a stream"))?;
            // Bounded: the head message can be deleted (retention) while the page streams.
            while let Ok(Some(message)) =
                tokio::time::timeout(STREAM_READ_PATIENCE, messages.next()).await
            {
                let message = message.map_err(storage!("reading a stream"))?;
                let sequence = message
                    .info()
                    .map(|info| info.stream_sequence)
                    .map_err(|error| nats_error("reading a stream")(&*error))?;
                if sequence > head.sequence || !take(&message.payload)? {
                    break;
                }
                if sequence == head.sequence {
                    break;
                }
            }
        }
        Ok(page)
    }

    /// Stores events in order (see the module docs); none when one of them is too large.
    pub(super) async fn store_events(
        &self,
        events: &[Event],
        watched: bool,
    ) -> Result<Vec<Appended>, BusError> {
        self.check_reachable()?;
        // Encoded once: a plain event is published as checked.
        let encoded: Vec<Bytes> = events.iter().map(encode_event).collect();
        for (event, payload) in events.iter().zip(&encoded) {
            self.check_size(|| format!("event `{}`", event.id), payload.len())?;
        }
        if events.len() > 1
            && events
                .iter()
                .any(|e| e.extensions.contains_key(EXPECTED_VERSION))
        {
            return self
                .store_atomically(events, watched, OnRepeat::EventByEvent)
                .await;
        }
        self.store_each(events, &encoded, watched).await
    }

    /// Stores events one by one: plain ones without waiting for each other's answers.
    /// `encoded` holds the events' payloads when the caller has them (else none).
    async fn store_each(
        &self,
        events: &[Event],
        encoded: &[Bytes],
        watched: bool,
    ) -> Result<Vec<Appended>, BusError> {
        let mut answers: Vec<Option<Appended>> = vec![None; events.len()];
        let mut pending = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let (subject, publish, due_at_ms) = if event.extensions.contains_key(DELIVER_AT) {
                let (subject, publish, due) = self.schedule_message(event)?;
                (subject, publish, Some(due))
            } else if event.subject.is_some() {
                answers[index] = Some(self.append_to_stream(event, watched).await?);
                continue;
            } else {
                let subject = event_subject(&self.options.prefix, &event.ty);
                let payload = encoded
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| encode_event(event));
                (subject, self.plain_message(event, payload, watched), None)
            };
            let ack = self
                .jetstream
                .send_publish(subject, publish)
                .await
                .map_err(storage!("publishing an event"))?;
            pending.push((index, ack, due_at_ms));
        }
        for (index, ack, due_at_ms) in pending {
            let ack = match (ack.await, due_at_ms) {
                (Ok(ack), _) => ack,
                // A schedule with this id is pending: this is the same event sent again.
                (Err(error), Some(due_at_ms)) if wrong_last_sequence(&error) => {
                    let pending = self.pending_due_ms(&events[index].id).await?;
                    answers[index] = Some(Appended {
                        sequence: 0,
                        duplicate: true,
                        stream_version: None,
                        due_at_ms: Some(pending.unwrap_or(due_at_ms)),
                    });
                    continue;
                }
                (Err(error), _) => return Err(storage!("storing an event")(error)),
            };
            answers[index] = Some(Appended {
                sequence: if due_at_ms.is_some() { 0 } else { ack.sequence },
                duplicate: ack.duplicate,
                stream_version: None,
                due_at_ms,
            });
        }
        Ok(answers.into_iter().flatten().collect())
    }

    fn plain_message(&self, event: &Event, payload: Bytes, watched: bool) -> PublishMessage {
        let mut publish = PublishMessage::build()
            .payload(payload)
            .message_id(message_id(event));
        if watched {
            publish = publish.header(messages::WATCHED, "1");
        }
        self.aged(publish, &event.ty)
    }

    /// `publish` with the `Nats-TTL` of an event of `event_type` when retention differs
    /// by type.
    pub(super) fn aged(&self, publish: PublishMessage, event_type: &str) -> PublishMessage {
        match self.time_to_live(event_type) {
            Some((name, value)) => publish.header(name, value),
            None => publish,
        }
    }

    /// The `Nats-TTL` header of an event of `event_type` when retention differs by type.
    fn time_to_live(&self, event_type: &str) -> Option<(&'static str, String)> {
        message_ttl(&self.options.per_type_retention, event_type).map(|ttl| ("Nats-TTL", ttl))
    }

    /// The event as its stream stores it: its version set, its condition taken off.
    fn versioned(event: &Event, version: u64) -> Event {
        let mut stored = event.clone();
        stored.extensions.remove(EXPECTED_VERSION);
        stored
            .extensions
            .insert(streams::STREAM_VERSION.to_owned(), version.to_string());
        stored
    }

    /// Appends one event to its subject's stream (see the module docs).
    async fn append_to_stream(&self, event: &Event, watched: bool) -> Result<Appended, BusError> {
        let subject = event.subject.clone().unwrap_or_default();
        let expected = streams::expected_version(event).map_err(BusError::Invalid)?;
        let filter = stream_filter(&self.options.prefix, &subject);
        for _ in 0..APPEND_TRIES {
            let head = self.stream_head(&subject).await?;
            if let Some(expected) = expected
                && expected != head.version
            {
                if let Some(stored) = self.stored_after(&filter, event, expected, head).await? {
                    return Ok(stored);
                }
                return Err(BusError::VersionConflict(VersionConflict {
                    subject,
                    expected,
                    current: head.version,
                }));
            }
            let version = head.version + 1;
            // Both messages are conditional on the stream's newest event as read: once
            // that has moved on it never comes back, so the head is refused whenever the
            // event is, and the head, sent first, is stored first.
            let reserved = if self.keeps_heads() {
                let message = self.stream_head_message(&subject, version, head);
                Some(self.publish(&message).await?)
            } else {
                None
            };
            let mut headers = vec![
                ("Nats-Msg-Id", message_id(event)),
                (STREAM_VERSION, version.to_string()),
            ];
            if watched {
                headers.push((messages::WATCHED, "1".to_owned()));
            }
            headers.extend(self.time_to_live(&event.ty));
            let appended = self
                .publish(&Conditional {
                    subject: subject_of(&self.options.prefix, event),
                    payload: encode_event(&Self::versioned(event, version)),
                    expected: Some(head.sequence),
                    condition_on: Some(filter.clone()),
                    headers,
                })
                .await?;
            // A head refused on its condition goes with an event refused too.
            let head_lost = match reserved {
                Some(reserved) => reserved.await.is_err_and(|e| !wrong_last_sequence(&e)),
                None => false,
            };
            match appended.await {
                Ok(ack) if ack.duplicate => {
                    if self.keeps_heads() {
                        // The head reserved a version this copy does not take: give the
                        // head back the stream's.
                        self.put_head(&subject, head.version, head).await?;
                    }
                    return self.duplicate_at(ack.sequence).await;
                }
                Ok(ack) => {
                    if head_lost {
                        // Stored without the head sent before it (the server failed that
                        // one): the head follows it, while it is the stream's newest.
                        let stored = Head {
                            sequence: ack.sequence,
                            version,
                        };
                        self.put_head(&subject, version, stored).await?;
                    }
                    return Ok(Appended {
                        sequence: ack.sequence,
                        duplicate: false,
                        stream_version: Some(version),
                        due_at_ms: None,
                    });
                }
                // Another append came first (or this one was stored before): look again.
                Err(error) if wrong_last_sequence(&error) => {}
                Err(error) => return Err(nats_error("storing an event")(&error)),
            }
        }
        Err(BusError::Storage(format!(
            "the stream of `{subject}` kept moving: {APPEND_TRIES} appends came first"
        )))
    }

    /// Makes `version` the head of `subject`'s stream if `newest` is still its newest
    /// event (otherwise a later append has written a newer head).
    async fn put_head(&self, subject: &str, version: u64, newest: Head) -> Result<(), BusError> {
        let message = self.stream_head_message(subject, version, newest);
        match self.publish(&message).await?.await {
            Ok(_) => Ok(()),
            Err(error) if wrong_last_sequence(&error) => Ok(()),
            Err(error) => Err(nats_error("storing a stream's head")(&error)),
        }
    }

    /// Sends one message to the event stream; the future answers once it is stored.
    async fn publish(&self, message: &Conditional) -> Result<PublishAckFuture, BusError> {
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .headers(message.headers());
        self.jetstream
            .send_publish(message.subject.clone(), publish)
            .await
            .map_err(storage!("publishing an event"))
    }

    /// The answer for an event found stored at `sequence` before.
    async fn duplicate_at(&self, sequence: u64) -> Result<Appended, BusError> {
        let stream_version = match self.events.get_raw_message(sequence).await {
            Ok(message) => Some(version_of(&message)).filter(|v| *v > 0),
            Err(_) => None,
        };
        Ok(Appended {
            sequence,
            duplicate: true,
            stream_version,
            due_at_ms: None,
        })
    }

    /// Whether `event` itself is stored in its stream right after version `after`: the
    /// repeat of an append that got through.
    async fn stored_after(
        &self,
        filter: &str,
        event: &Event,
        after: u64,
        head: Head,
    ) -> Result<Option<Appended>, BusError> {
        if head.version <= after {
            return Ok(None);
        }
        let Some(message) = self.seek(filter, after + 1, head).await? else {
            return Ok(None);
        };
        let stored = decode_event(&message.payload)?;
        Ok(
            (stored.id == event.id && stored.source == event.source).then(|| Appended {
                sequence: message.sequence,
                duplicate: true,
                stream_version: Some(version_of(&message)),
                due_at_ms: None,
            }),
        )
    }

    /// Each event of `events` that carries an expected version and is stored where it
    /// expected to be (sent before), as its duplicate's answer; `None` for the others.
    async fn stored_conditionals(
        &self,
        events: &[Event],
    ) -> Result<Vec<Option<Appended>>, BusError> {
        let mut stored = Vec::with_capacity(events.len());
        for event in events {
            let (Some(subject), Ok(Some(expected))) =
                (&event.subject, streams::expected_version(event))
            else {
                stored.push(None);
                continue;
            };
            let filter = stream_filter(&self.options.prefix, subject);
            let head = self.stream_head(subject).await?;
            stored.push(self.stored_after(&filter, event, expected, head).await?);
        }
        Ok(stored)
    }

    /// Plans `events` as one atomic batch: each stream event numbered after its stream's
    /// head (read now) and the events before it in the batch, the first of each stream
    /// conditional on that head; then the new head of each stream, to send after the
    /// events. Fails with the conflict of an expected version that does not hold.
    async fn plan_batch(
        &self,
        events: &[&Event],
        watched: bool,
    ) -> Result<(Vec<Planned>, Vec<Conditional>), BusError> {
        let prefix = &self.options.prefix;
        let mut heads: BTreeMap<&str, (Head, u64)> = BTreeMap::new();
        let mut planned = Vec::with_capacity(events.len());
        for event in events {
            let mut headers = vec![("Nats-Msg-Id", message_id(event))];
            if watched {
                headers.push((messages::WATCHED, "1".to_owned()));
            }
            headers.extend(self.time_to_live(&event.ty));
            let Some(subject) = &event.subject else {
                planned.push(Planned {
                    message: Conditional {
                        subject: event_subject(prefix, &event.ty),
                        payload: encode_event(event),
                        expected: None,
                        condition_on: None,
                        headers,
                    },
                    stream_version: None,
                });
                continue;
            };
            let filter = stream_filter(prefix, subject);
            let first = !heads.contains_key(subject.as_str());
            if first {
                let head = self.stream_head(subject).await?;
                heads.insert(subject, (head, head.version));
            }
            let Some((head, running)) = heads.get_mut(subject.as_str()) else {
                continue;
            };
            if let Some(expected) = streams::expected_version(event).map_err(BusError::Invalid)?
                && expected != *running
            {
                return Err(BusError::VersionConflict(VersionConflict {
                    subject: subject.clone(),
                    expected,
                    current: *running,
                }));
            }
            *running += 1;
            headers.push((STREAM_VERSION, running.to_string()));
            planned.push(Planned {
                message: Conditional {
                    subject: subject_of(prefix, event),
                    payload: encode_event(&Self::versioned(event, *running)),
                    // The batch is applied whole or not at all: one condition per stream,
                    // on the head before the batch, covers its events after the first.
                    expected: first.then_some(head.sequence),
                    condition_on: first.then_some(filter),
                    headers,
                },
                stream_version: Some(*running),
            });
        }
        let new_heads = if self.keeps_heads() {
            heads
                .into_iter()
                .map(|(subject, (_, version))| self.head_message(subject, version))
                .collect()
        } else {
            Vec::new()
        };
        Ok((planned, new_heads))
    }

    /// Stores `events` (a producer's batch) as one atomic batch; its scheduled events
    /// after it.
    async fn store_atomically(
        &self,
        events: &[Event],
        watched: bool,
        on_repeat: OnRepeat,
    ) -> Result<Vec<Appended>, BusError> {
        let logged: Vec<&Event> = events
            .iter()
            .filter(|e| !e.extensions.contains_key(DELIVER_AT))
            .collect();
        // Each event's stream may add its head to the batch.
        let streams: BTreeSet<&str> = logged.iter().filter_map(|e| e.subject.as_deref()).collect();
        let messages = logged.len() + if self.keeps_heads() { streams.len() } else { 0 };
        if messages > MAX_BATCH_MESSAGES {
            return Err(BusError::Invalid(format!(
                "a batch holding an `expectedversion` is stored on NATS JetStream as one \
                 atomic batch of at most {MAX_BATCH_MESSAGES} messages (its events, and a head \
                 for each subject with retention on), and this one needs {messages}: send \
                 it in smaller batches"
            )));
        }
        let mut stored = None;
        for _ in 0..APPEND_TRIES {
            let (planned, heads) = match self.plan_batch(&logged, watched).await {
                Err(BusError::VersionConflict(conflict)) if on_repeat == OnRepeat::EventByEvent => {
                    return self.store_repeat(events, watched, conflict).await;
                }
                other => other?,
            };
            let heads_sent = heads.len() as u64;
            let versions: Vec<Option<u64>> = planned.iter().map(|p| p.stream_version).collect();
            let messages: Vec<Conditional> = planned
                .into_iter()
                .map(|p| p.message)
                .chain(heads)
                .collect();
            match publish_batch(&self.client, messages.iter()).await {
                Ok(last) => {
                    // The heads follow the events.
                    stored = Some((last - heads_sent, versions));
                    break;
                }
                // A stream moved between the heads and the batch: plan again.
                Err(BatchError::Conflict) => {}
                Err(BatchError::Repeated) => {
                    if on_repeat == OnRepeat::Done {
                        return Ok(Vec::new());
                    }
                    return self.store_each(events, &[], watched).await;
                }
                Err(BatchError::Storage(error)) => return Err(error),
            }
        }
        let Some((last, versions)) = stored else {
            return Err(BusError::Storage(
                "the streams of a batch kept moving; nothing of it was stored".to_owned(),
            ));
        };
        // An atomic batch is stored in one piece: its messages hold the sequences up to
        // the last.
        let first = last + 1 - versions.len() as u64;
        let mut logged_answers = versions
            .into_iter()
            .enumerate()
            .map(|(i, version)| Appended {
                sequence: first + i as u64,
                duplicate: false,
                stream_version: version,
                due_at_ms: None,
            });
        let scheduled: Vec<Event> = events
            .iter()
            .filter(|e| e.extensions.contains_key(DELIVER_AT))
            .cloned()
            .collect();
        let mut scheduled_answers = self.store_each(&scheduled, &[], watched).await?.into_iter();
        let answers = events
            .iter()
            .filter_map(|event| {
                if event.extensions.contains_key(DELIVER_AT) {
                    scheduled_answers.next()
                } else {
                    logged_answers.next()
                }
            })
            .collect();
        Ok(answers)
    }

    /// A batch whose expected versions met its own events, sent before: those are answered
    /// as the duplicates they are, and the rest is stored as one atomic batch, all of it
    /// or none (as the embedded log's transaction skips a batch's stored events and
    /// stores the others or nothing). A batch with none of its events stored is the
    /// conflict it met.
    async fn store_repeat(
        &self,
        events: &[Event],
        watched: bool,
        conflict: VersionConflict,
    ) -> Result<Vec<Appended>, BusError> {
        let stored = self.stored_conditionals(events).await?;
        if stored.iter().all(Option::is_none) {
            return Err(BusError::VersionConflict(conflict));
        }
        let rest: Vec<Event> = events
            .iter()
            .zip(&stored)
            .filter(|(_, stored)| stored.is_none())
            .map(|(event, _)| event.clone())
            .collect();
        // Fewer events each time: the stored ones are left out.
        let mut rest_answers = if rest.is_empty() {
            Vec::new()
        } else {
            Box::pin(self.store_atomically(&rest, watched, OnRepeat::EventByEvent)).await?
        }
        .into_iter();
        stored
            .into_iter()
            .map(|stored| stored.or_else(|| rest_answers.next()))
            .collect::<Option<Vec<Appended>>>()
            .ok_or_else(|| BusError::Storage("a repeated batch was answered short".to_owned()))
    }

    /// Commits the effects of an attempt that hold stream conditions and write no KV: its
    /// emits, the stream versions it read and a commit record, as one atomic batch of the
    /// event stream; then its schedules and cancellations, which the record also holds so
    /// that a redelivery after a crash finishes them ([`Shared::finish_committed`]).
    pub(super) async fn commit_conditional(
        &self,
        plugin: &str,
        sequence: u64,
        effects: &Effects,
    ) -> Result<Settled, BusError> {
        let record = CommitRecord::of(effects);
        let body = serde_json::to_vec(&record).unwrap_or_default();
        self.check_size(
            || "the attempt's emits and commit record".to_owned(),
            body.len(),
        )?;
        let logged: Vec<&Event> = effects
            .emits
            .iter()
            .filter(|e| !e.extensions.contains_key(DELIVER_AT))
            .collect();
        for _ in 0..APPEND_TRIES {
            let mut batch = vec![Conditional {
                subject: self.record_subject(plugin, sequence),
                payload: Bytes::from(body.clone()),
                expected: Some(0),
                condition_on: None,
                headers: vec![("Nats-TTL", COMMIT_RECORD_AGE.as_secs().to_string())],
            }];
            // A stream the attempt read and appends nothing to still has to be where it
            // was read: a guard message on it, conditional on its head.
            for read in &effects.stream_reads {
                let filter = stream_filter(&self.options.prefix, &read.subject);
                let head = self.stream_head(&read.subject).await?;
                if head.version != read.version {
                    return Err(BusError::Conflict(format!(
                        "the stream of `{}` (read at version {}, now {})",
                        read.subject, read.version, head.version
                    )));
                }
                batch.push(Conditional {
                    subject: self.guard_subject(),
                    payload: Bytes::new(),
                    expected: Some(head.sequence),
                    condition_on: Some(filter),
                    headers: vec![("Nats-TTL", "60".to_owned())],
                });
            }
            let (planned, heads) = match self.plan_batch(&logged, false).await {
                Err(BusError::VersionConflict(conflict)) => {
                    if self.finish_committed(plugin, sequence).await? {
                        return Ok(Settled::default());
                    }
                    return Err(BusError::VersionConflict(conflict));
                }
                other => other?,
            };
            // The emits' versions, in their order: the scheduled ones take none.
            let mut versions = planned.iter().map(|p| p.stream_version);
            let settled = Settled {
                stream_versions: effects
                    .emits
                    .iter()
                    .map(|e| {
                        if e.extensions.contains_key(DELIVER_AT) {
                            None
                        } else {
                            versions.next().flatten()
                        }
                    })
                    .collect(),
            };
            batch.extend(planned.into_iter().map(|p| p.message));
            batch.extend(heads);
            if batch.len() > MAX_BATCH_MESSAGES {
                return Err(BusError::TooLarge {
                    what: "the attempt's emits and stream reads".to_owned(),
                    bytes: batch.len(),
                    limit: MAX_BATCH_MESSAGES,
                });
            }
            match publish_batch(&self.client, batch.iter()).await {
                Ok(_) => {
                    self.finish_schedules(&record).await?;
                    return Ok(settled);
                }
                Err(BatchError::Conflict | BatchError::Repeated) => {
                    // Committed by an earlier try (the record exists), or a stream moved.
                    if self.finish_committed(plugin, sequence).await? {
                        return Ok(Settled::default());
                    }
                }
                Err(BatchError::Storage(error)) => return Err(error),
            }
        }
        Err(BusError::Conflict(
            "the streams the attempt appends to kept moving".to_owned(),
        ))
    }

    /// Stores a commit record's scheduled events and cancellations (both idempotent).
    pub(super) async fn finish_schedules(&self, record: &CommitRecord) -> Result<(), BusError> {
        let scheduled: Vec<Event> = record
            .emits()?
            .into_iter()
            .filter(|e| e.extensions.contains_key(DELIVER_AT))
            .collect();
        self.store_each(&scheduled, &[], false).await?;
        for id in &record.cancels {
            self.cancel(id).await?;
        }
        Ok(())
    }

    /// Where a plugin's conditional commit records go in the event stream.
    pub(super) fn record_subject(&self, plugin: &str, sequence: u64) -> String {
        format!(
            "{}.commits.{}.{sequence}",
            self.options.prefix,
            subject_token(plugin)
        )
    }

    fn guard_subject(&self) -> String {
        format!("{}.guards", self.options.prefix)
    }
}

impl CommitRecord {
    /// The record of an attempt's emits and cancellations.
    pub(super) fn of(effects: &Effects) -> Self {
        Self {
            emits: effects
                .emits
                .iter()
                .map(|event| BASE64.encode(encode_event(event)))
                .collect(),
            cancels: effects.cancels.clone(),
        }
    }
}
