//! A plugin's consumer on one host: it pulls from the plugin's durable consumer as far
//! as its window has room (the server filters on the plugin's subscription patterns and
//! its replay subject, so only what the plugin receives comes over the wire), turns each
//! message into a delivery or settles it at once when it is not one for the plugin,
//! keeps the deliveries it holds alive, and settles them.
//! It also keeps the errors of earlier attempts (`P-attempts/<plugin>.<sequence>`), from
//! which a redelivery learns its attempt number.
//!
//! Invariants:
//! - `outstanding` holds exactly the deliveries handed out and not yet settled, at most
//!   the window; only they are kept alive, so a host that dies stops vouching for them
//!   and they go to another host after `ack_wait`.
//! - A redelivered message whose commit record exists is finished and acknowledged, never
//!   handed to the plugin again (see `commit.rs`).
//! - The server's `max_deliver` is unlimited; an event handed out more than
//!   [`UNSETTLED_LIMIT`] times beyond its recorded retries is dead-lettered instead.
//! - A consumer dropped with deliveries it never settled gives them back at once, and
//!   counts each in its journal as a deferral (no attempt, no crash).
//! - A pull request is read until it ends, across calls of `next` (see [`OpenPull`]):
//!   every message the server sends for it reaches the consumer, none waits out
//!   `ack_wait` in an inbox nobody reads. Giving back what the consumer holds first
//!   reads its last pull to the end.
//! - Opening the consumer sets its filter to this host's patterns in place: its position
//!   and pending acknowledgements stay, so a subscription change by hot reload neither
//!   repeats nor skips events the plugin receives before and after.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::{AckKind, Message};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use super::messages::{INGESTED_AT, REPLAY_OF, WATCHED, decode_event, header, micros};
use super::{MARKER_TTL, Shared, UNSETTLED_LIMIT, nats_error};
use crate::bus::{
    BusError, Consumer, ConsumerSpec, DeadLetterReason, Delivery, Settled, Settlement,
    StartPosition, StoredEvent,
};
use crate::clock::now_ms;
use crate::failure::{AttemptError, FailureKind};
use crate::pattern::{Pattern, disjoint_cover};

/// Tells the server, every `every`, that the deliveries a host holds are still being
/// worked on, so none goes to another host while this one lives.
async fn keep_alive(outstanding: std::sync::Weak<Mutex<Held>>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(outstanding) = outstanding.upgrade() else {
            return;
        };
        let held: Vec<Arc<Message>> = outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        drop(outstanding);
        for message in held {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }
}

/// How long a pull request waits at the server for the messages it asked for and has not
/// got yet; the server then ends it (`408`). It bounds how long a pull is kept open, and so
/// how long giving back what a consumer holds waits for its last pull to end.
const PULL_EXPIRES: Duration = Duration::from_millis(500);
/// How long past [`PULL_EXPIRES`] a pull that has not ended is still waited for: one the
/// server forgot (it restarted) never ends by itself.
const PULL_GRACE: Duration = Duration::from_secs(1);
/// Longest `next` waits for settlements to free a quarter of the window before it pulls what
/// room there is (or returns empty when there is none).
const FULL_WINDOW_WAIT: Duration = Duration::from_millis(250);

/// A pull request the server may still answer. It is read until it ends (every message it
/// asked for came, or the server ended it), never dropped before: the server sends a
/// pull's messages to its inbox until the client unsubscribes, and each one sent to an
/// inbox nobody reads any more would wait out `ack_wait` on no host.
struct OpenPull {
    messages: pull::Batch,
    /// Past it, a pull that has not ended is taken for one the server forgot.
    given_up_at: tokio::time::Instant,
}

/// The consumer's pull in progress, and the messages it brought that `next` has not
/// taken yet; kept in the consumer, so that `next` cancelled halfway loses none of them.
#[derive(Default)]
struct Pulling {
    open: Option<OpenPull>,
    arrived: std::collections::VecDeque<Message>,
}

impl Pulling {
    fn is_empty(&self) -> bool {
        self.open.is_none() && self.arrived.is_empty()
    }

    /// Reads what the open pull brings: waits for its first message (until the pull ends),
    /// then takes those already there, without waiting for more: the pull stays open for
    /// them. Cancel-safe: each message is in `arrived` as soon as it is read.
    async fn read(&mut self) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let mut next = tokio::time::timeout_at(open.given_up_at, open.messages.next())
            .await
            .unwrap_or(None);
        loop {
            match next {
                Some(Ok(message)) => self.arrived.push_back(message),
                Some(Err(error)) => {
                    tracing::debug!(%error, "pull ended with an error");
                    self.open = None;
                    return;
                }
                // Ended by the server, or forgotten by it (nothing came in time).
                None => {
                    self.open = None;
                    return;
                }
            }
            match open.messages.next().now_or_never() {
                Some(ready) => next = ready,
                None => return,
            }
        }
    }

    /// Reads the open pull to its end: what is still to come of it, with what it brought
    /// before, is then in `arrived`.
    async fn finish(&mut self) {
        while let Some(open) = self.open.as_mut() {
            match tokio::time::timeout_at(open.given_up_at, open.messages.next()).await {
                Ok(Some(Ok(message))) => self.arrived.push_back(message),
                Ok(Some(Err(_)) | None) | Err(_) => self.open = None,
            }
        }
    }
}

/// What a plugin's consumer filters on: `cover`, the [`disjoint_cover`] of its patterns
/// (the server refuses overlapping filters) under `P.events.` and under every subject
/// stream (`P.streams.*.`), and its replay subject.
fn filter_subjects(prefix: &str, plugin: &str, cover: &[Pattern]) -> Vec<String> {
    let mut subjects: Vec<String> = cover
        .iter()
        .flat_map(|pattern| {
            [
                format!("{prefix}.events.{pattern}"),
                format!("{prefix}.streams.*.{pattern}"),
            ]
        })
        .collect();
    subjects.push(format!("{prefix}.replay.{plugin}"));
    subjects
}

/// The type's words of an event's subject (`P.events.<words>` or
/// `P.streams.<token>.<words>`).
fn type_words<'s>(prefix: &str, subject: &'s str) -> Option<&'s str> {
    let rest = subject.strip_prefix(prefix)?;
    if let Some(words) = rest.strip_prefix(".events.") {
        return Some(words);
    }
    rest.strip_prefix(".streams.")?
        .split_once('.')
        .map(|(_, words)| words)
}

fn same_subjects(a: &[String], b: &[String]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// Deliveries handed out and not yet settled, by log position; shared, so that settling
/// or keeping one alive takes no copy of the message.
type Held = HashMap<u64, Arc<Message>>;

/// One plugin's consumer on one host.
pub(super) struct NatsConsumer {
    pub(super) shared: Arc<Shared>,
    pub(super) plugin: String,
    patterns: Vec<Pattern>,
    /// What the consumer filters on when this host opens it (see [`filter_subjects`]).
    cover: Vec<Pattern>,
    /// `P.replay.`: the subjects of replays, one per plugin.
    replay_prefix: String,
    window: usize,
    one_at_a_time: bool,
    consumer: PullConsumer,
    /// When the server made the consumer, which tells it from an earlier consumer of the
    /// same name (a plugin forgotten and added again): its dead letters' message ids hold
    /// it, so the server's dedupe does not take a new letter for a copy of an old one.
    pub(super) generation: i128,
    /// Deliveries handed out and not yet settled, by log position.
    outstanding: Arc<Mutex<Held>>,
    /// Signalled when a settlement frees room in the window.
    room: tokio::sync::Notify,
    /// The pull in progress and what it brought that `next` has not taken yet.
    pulling: tokio::sync::Mutex<Pulling>,
    /// Held deliveries that were handed back before without counting an attempt (see
    /// [`Journal`]), by log position, with how often.
    deferred: Mutex<HashMap<u64, i64>>,
    keep_alive: tokio::task::JoinHandle<()>,
}

impl Drop for NatsConsumer {
    fn drop(&mut self) {
        self.keep_alive.abort();
        // Deliveries fetched but never settled (the dispatcher stopped for a reload or a
        // shutdown before running them), and what the last pull brings, go back at once
        // rather than after `ack_wait`.
        let unsettled: Vec<Arc<Message>> =
            self.held().drain().map(|(_, message)| message).collect();
        let pulling = std::mem::take(self.pulling.get_mut());
        if (!unsettled.is_empty() || !pulling.is_empty())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let shared = Arc::clone(&self.shared);
            let plugin = self.plugin.clone();
            let replay_prefix = self.replay_prefix.clone();
            runtime.spawn(async move {
                give_back_pulled(&shared, &plugin, &replay_prefix, pulling).await;
                for message in unsettled {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
            });
        }
    }
}

/// Whose message it is: `None` for another plugin's replay; else the log position it
/// delivers to this plugin (a replay's is its original event's) and whether it is a replay.
fn addressed(
    message: &Message,
    stream_sequence: u64,
    replay_prefix: &str,
    plugin: &str,
) -> Option<(u64, bool)> {
    match message.subject.as_str().strip_prefix(replay_prefix) {
        Some(target) if target != plugin => None,
        Some(_) => Some((
            header(message.headers.as_ref(), REPLAY_OF).unwrap_or(stream_sequence),
            true,
        )),
        None => Some((stream_sequence, false)),
    }
}

/// Reads a consumer's last pull to its end and gives back every message it brought that
/// did not become a delivery. One handed out for the first time is counted in its journal
/// as a deferral (as [`Consumer::release`] counts a delivery given back): it ran no
/// attempt. A redelivery is not looked at (its commit may be done, and its journal gone
/// for good), so it counts as one more hand-out.
async fn give_back_pulled(
    shared: &Shared,
    plugin: &str,
    replay_prefix: &str,
    mut pulling: Pulling,
) {
    pulling.finish().await;
    for message in pulling.arrived {
        let Ok(info) = message.info() else { continue };
        // Another plugin's replay has nothing of this plugin's to count.
        let sequence = addressed(&message, info.stream_sequence, replay_prefix, plugin)
            .filter(|_| info.delivered == 1)
            .map(|(sequence, _)| sequence);
        if let Some(sequence) = sequence
            && let Err(error) = shared.defer(plugin, sequence).await
        {
            tracing::warn!(%plugin, sequence, %error, "cannot record a delivery given back");
        }
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

impl NatsConsumer {
    /// Creates the plugin's durable consumer, or keeps the existing one when its window
    /// and `ack_wait` still fit, and starts keeping this host's deliveries alive.
    pub(super) async fn open(
        shared: &Arc<Shared>,
        plugin: &str,
        spec: ConsumerSpec,
    ) -> Result<Self, BusError> {
        let name = format!("{}-{plugin}", shared.options.prefix);
        let max_ack_pending = if spec.one_at_a_time {
            1
        } else {
            i64::try_from(spec.window.saturating_mul(16)).unwrap_or(i64::MAX)
        };
        let existing: Option<PullConsumer> = shared.events.get_consumer(&name).await.ok();
        let deliver_policy = match (&existing, spec.start) {
            (Some(consumer), _) => consumer.cached_info().config.deliver_policy,
            (None, StartPosition::Latest) => DeliverPolicy::New,
            (None, StartPosition::Earliest) => DeliverPolicy::All,
        };
        let cover = disjoint_cover(&spec.patterns);
        let filter_subjects = filter_subjects(&shared.options.prefix, plugin, &cover);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            filter_subjects: filter_subjects.clone(),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: shared.options.ack_wait,
            max_deliver: -1,
            max_ack_pending,
            num_replicas: 0,
            ..Default::default()
        };
        let consumer = match existing {
            Some(consumer)
                if consumer.cached_info().config.max_ack_pending == max_ack_pending
                    && consumer.cached_info().config.ack_wait == shared.options.ack_wait
                    && same_subjects(
                        &consumer.cached_info().config.filter_subjects,
                        &filter_subjects,
                    ) =>
            {
                consumer
            }
            _ => shared
                .events
                .create_consumer(config)
                .await
                .map_err(storage!("creating the plugin's consumer"))?,
        };
        let generation = consumer.cached_info().created.unix_timestamp_nanos();
        let outstanding: Arc<Mutex<Held>> = Arc::default();
        let keep_alive = tokio::spawn(keep_alive(
            Arc::downgrade(&outstanding),
            shared.options.ack_wait / 3,
        ));
        Ok(Self {
            shared: Arc::clone(shared),
            plugin: plugin.to_owned(),
            cover,
            patterns: spec.patterns,
            replay_prefix: format!("{}.replay.", shared.options.prefix),
            window: spec.window.max(1),
            one_at_a_time: spec.one_at_a_time,
            consumer,
            generation,
            outstanding,
            room: tokio::sync::Notify::new(),
            pulling: tokio::sync::Mutex::default(),
            deferred: Mutex::default(),
            keep_alive,
        })
    }

    fn deferrals(&self) -> std::sync::MutexGuard<'_, HashMap<u64, i64>> {
        self.deferred.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Settles a message the consumer's filter let through but the plugin's patterns do
    /// not match. Within this host's own filter it is the slack of a widened filter, or
    /// of a type whose characters the subject replaced: skipped. Outside it, another host
    /// runs a version of the plugin with other subscriptions (a rolling change; the
    /// consumer filters on the patterns of the host that opened it last): handed back for
    /// such a host, and skipped after [`UNSETTLED_LIMIT`] hand-outs so that it cannot
    /// circulate forever.
    async fn pass_on(&self, message: &Message, ty: &str, delivered: i64) {
        let in_own_filter = type_words(&self.shared.options.prefix, &message.subject)
            .is_some_and(|words| self.cover.iter().any(|p| p.matches(words)));
        if !in_own_filter && delivered <= UNSETTLED_LIMIT {
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
            return;
        }
        if !in_own_filter {
            tracing::warn!(plugin = %self.plugin, event_type = %ty, "skipping an event no host running this plugin subscribes to");
        }
        let _ = message.ack().await;
    }

    /// Turns a message into a delivery for this plugin, or settles it at once when it is
    /// not one (another plugin's replay, a type the plugin does not receive, a commit to
    /// finish, an event no host manages to settle).
    async fn accept(&self, message: Message) -> Result<Option<Delivery>, BusError> {
        let (stream_sequence, delivered, published) = {
            let info = message
                .info()
                .map_err(|error| nats_error("reading delivery metadata")(&*error))?;
            (info.stream_sequence, info.delivered, micros(info.published))
        };
        let Some((sequence, replayed)) =
            addressed(&message, stream_sequence, &self.replay_prefix, &self.plugin)
        else {
            let _ = message.ack().await;
            return Ok(None);
        };
        let ingested_at_us = if replayed {
            header(message.headers.as_ref(), INGESTED_AT).unwrap_or(published)
        } else {
            published
        };
        let event = match decode_event(&message.payload) {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(plugin = %self.plugin, stream_sequence, %error, "skipping an unreadable message");
                let _ = message.ack_with(AckKind::Term).await;
                return Ok(None);
            }
        };
        if !replayed && !self.patterns.iter().any(|p| p.matches(&event.ty)) {
            self.pass_on(&message, &event.ty, delivered).await;
            return Ok(None);
        }
        let stored = StoredEvent {
            sequence,
            ingested_at_us,
            event,
        };
        if delivered > 1 {
            if self.shared.finish_committed(&self.plugin, sequence).await? {
                self.shared.forget_claims(&self.plugin, sequence).await;
                message
                    .double_ack()
                    .await
                    .map_err(storage!("acknowledging a finished commit"))?;
                return Ok(None);
            }
            // A host that died in the middle of a commit may have left scheduled events
            // claimed for it: they go back before the event runs again.
            self.shared.release_claims(&self.plugin, sequence).await?;
        }
        let Journal { errors, deferrals } = if delivered > 1 {
            self.shared.journal(&self.plugin, sequence).await?
        } else {
            Journal::default()
        };
        if deferrals > 0 {
            self.deferrals().insert(sequence, deferrals);
        }
        let unsettled = delivered - i64::try_from(errors.len()).unwrap_or(0) - deferrals;
        if unsettled > UNSETTLED_LIMIT {
            let mut errors = errors;
            errors.push(AttemptError {
                attempt: u32::try_from(errors.len() + 1).unwrap_or(u32::MAX),
                kind: FailureKind::Host,
                message: format!(
                    "handed to hosts {unsettled} times without being settled: the hosts \
                     holding it crashed or stalled"
                ),
                at_ms: now_ms(),
            });
            self.dead_letter(&message, &stored, DeadLetterReason::Exhausted, errors)
                .await?;
            return Ok(None);
        }
        let attempt = u32::try_from(errors.len() + 1).unwrap_or(u32::MAX);
        let watched = header::<String>(message.headers.as_ref(), WATCHED).is_some();
        self.held().insert(sequence, Arc::new(message));
        Ok(Some(Delivery {
            stored,
            attempt,
            errors,
            watched,
            // A replay is published when the operator asked for it.
            replayed_at_us: replayed.then_some(published),
        }))
    }
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn next(&self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let mut pulling = self.pulling.lock().await;
        if pulling.arrived.is_empty() {
            if pulling.open.is_none() {
                let cap = if self.one_at_a_time { 1 } else { max.max(1) };
                let room = || self.window.saturating_sub(self.held().len()).min(cap);
                // Every pull is a round trip to the server: with the window nearly full,
                // wait until a quarter of it is free (or a while) rather than pull one
                // message at a time. A settlement between the check and the wait leaves a
                // permit, so none is missed.
                let enough = (self.window / 4).clamp(1, cap);
                let deadline = tokio::time::Instant::now() + FULL_WINDOW_WAIT;
                while room() < enough
                    && tokio::time::timeout_at(deadline, self.room.notified())
                        .await
                        .is_ok()
                {}
                let room = room();
                if room == 0 {
                    return Ok(Vec::new());
                }
                // The server answers at once with what it has and sends the rest of the
                // request's messages as they come, until it expires.
                let request = self
                    .consumer
                    .batch()
                    .max_messages(room)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await;
                match request {
                    Ok(messages) => {
                        pulling.open = Some(OpenPull {
                            messages,
                            given_up_at: tokio::time::Instant::now() + PULL_EXPIRES + PULL_GRACE,
                        });
                    }
                    Err(error) => {
                        // The client reconnects by itself; the next call asks again.
                        tracing::debug!(%error, "pull request failed");
                        tokio::time::sleep(PULL_EXPIRES).await;
                        return Ok(Vec::new());
                    }
                }
            }
            pulling.read().await;
        }
        let mut deliveries = Vec::new();
        let mut failed = None;
        // One at a time out of `arrived`: cancelled halfway, the rest are still there.
        while let Some(message) = pulling.arrived.pop_front() {
            if failed.is_some() {
                // Not looked at: back to the server for a later pull (held by no one, it
                // would otherwise wait out `ack_wait`).
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                continue;
            }
            match self.accept(message).await {
                Ok(Some(delivery)) => deliveries.push(delivery),
                Ok(None) => {}
                // The message that failed is not held: the server hands it out again.
                Err(error) => failed = Some(error),
            }
        }
        // The deliveries accepted before a failure are held and kept alive: they must
        // reach the dispatcher, or nothing would ever settle them.
        match failed {
            Some(error) if deliveries.is_empty() => Err(error),
            Some(error) => {
                tracing::warn!(plugin = %self.plugin, %error, "a pulled message could not be taken yet; it comes back");
                Ok(deliveries)
            }
            None => Ok(deliveries),
        }
    }

    fn holds_retries_in_order(&self) -> bool {
        // One message of the consumer pending at a time (`max_ack_pending` 1), and a
        // `Nak` keeps it pending until some host settles its retry.
        self.one_at_a_time
    }

    fn hands_out_one_at_a_time(&self) -> bool {
        self.one_at_a_time
    }

    async fn release(&self) {
        // The last pull first: until it ends, the server could hand what is given back
        // below to it again.
        let pulling = std::mem::take(&mut *self.pulling.lock().await);
        give_back_pulled(&self.shared, &self.plugin, &self.replay_prefix, pulling).await;
        let unsettled: Vec<(u64, Arc<Message>)> = self.held().drain().collect();
        // A delivery given back (a hot reload, a shutdown, a paused plugin's held window)
        // ran no attempt and its host did not crash: the journal counts it as a deferral,
        // so that rolling restarts cannot take it for one hosts kept failing to settle.
        let releases = unsettled.iter().map(|(sequence, message)| async move {
            if let Err(error) = self.shared.defer(&self.plugin, *sequence).await {
                tracing::warn!(plugin = %self.plugin, sequence, %error, "cannot record a delivery given back");
            }
            let _ = message.ack_with(AckKind::Nak(None)).await;
        });
        futures_util::future::join_all(releases).await;
    }

    async fn settle(
        &self,
        delivery: &Delivery,
        settlement: Settlement,
    ) -> Result<Settled, BusError> {
        let sequence = delivery.stored.sequence;
        let Some(message) = self.held().get(&sequence).cloned() else {
            // Settled already (a retried settlement whose first try got through).
            return Ok(Settled::default());
        };
        let mut settled = Settled::default();
        match settlement {
            Settlement::Ack(effects) => {
                settled = self
                    .shared
                    .commit_effects(&self.plugin, sequence, effects)
                    .await?;
                // Not waiting for the server's word on the acknowledgement: one that
                // gets lost means a redelivery, which finds the commit record (KV
                // writes) or repeats emits that `Nats-Msg-Id` drops.
                if let Err(error) = message.ack().await {
                    tracing::warn!(plugin = %self.plugin, sequence, %error, "cannot acknowledge a committed delivery; it will be redelivered and recognised");
                    self.held().remove(&sequence);
                    self.room.notify_one();
                    return Ok(settled);
                }
                let deferred = self.deferrals().remove(&sequence).is_some();
                if delivery.attempt > 1 || deferred {
                    self.shared.forget_attempts(&self.plugin, sequence).await;
                }
            }
            Settlement::Retry { delay, errors } => {
                // A retry that adds no error hands the delivery back without counting an
                // attempt (a conflict that persisted): the journal counts it, so that it
                // is not taken for a hand-out to a host that crashed.
                let earlier = self.deferrals().remove(&sequence).unwrap_or(0);
                let deferrals = earlier + i64::from(errors.len() == delivery.errors.len());
                let body = Journal { errors, deferrals }.to_json();
                self.shared
                    .attempts
                    .put(
                        Shared::journal_key(&self.plugin, sequence),
                        Bytes::from(body),
                    )
                    .await
                    .map_err(storage!("recording the attempt's error"))?;
                message
                    .ack_with(AckKind::Nak(Some(delay)))
                    .await
                    .map_err(storage!("scheduling the retry"))?;
            }
            Settlement::DeadLetter { reason, errors } => {
                self.deferrals().remove(&sequence);
                self.dead_letter(&message, &delivery.stored, reason, errors)
                    .await?;
            }
        }
        self.held().remove(&sequence);
        self.room.notify_one();
        Ok(settled)
    }
}

/// A delivery's record in the attempts bucket: the errors of its failed attempts, and how
/// often it was handed back without counting an attempt. Stored as the bare list of
/// errors while there is no deferral, the form hosts have always written and read.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Journal {
    errors: Vec<AttemptError>,
    #[serde(default)]
    deferrals: i64,
}

impl Journal {
    fn parse(bytes: &[u8]) -> Self {
        match serde_json::from_slice::<Vec<AttemptError>>(bytes) {
            Ok(errors) => Self {
                errors,
                deferrals: 0,
            },
            Err(_) => serde_json::from_slice(bytes).unwrap_or_default(),
        }
    }

    fn to_json(&self) -> Vec<u8> {
        let written = if self.deferrals == 0 {
            serde_json::to_vec(&self.errors)
        } else {
            serde_json::to_vec(self)
        };
        written.unwrap_or_default()
    }
}

impl Shared {
    /// What is recorded of a delivery's earlier hand-outs (nothing: a first attempt, or
    /// one whose host died before settling it).
    async fn journal(&self, plugin: &str, sequence: u64) -> Result<Journal, BusError> {
        let recorded = self
            .attempts
            .get(Self::journal_key(plugin, sequence))
            .await
            .map_err(storage!("reading the errors of earlier attempts"))?;
        Ok(recorded
            .map(|bytes| Journal::parse(&bytes))
            .unwrap_or_default())
    }

    /// Counts one more hand-back of a delivery without an attempt in its journal.
    async fn defer(&self, plugin: &str, sequence: u64) -> Result<(), BusError> {
        let mut journal = self.journal(plugin, sequence).await?;
        journal.deferrals += 1;
        self.attempts
            .put(
                Self::journal_key(plugin, sequence),
                Bytes::from(journal.to_json()),
            )
            .await
            .map_err(storage!("recording a delivery given back"))?;
        Ok(())
    }

    /// Drops a delivery's journal once it is settled. The purge's marker, which a plain
    /// purge leaves in the bucket for good (one per delivery that ever failed), expires
    /// at once: nothing reads the journal's history.
    pub(super) async fn forget_attempts(&self, plugin: &str, sequence: u64) {
        if let Err(error) = self
            .attempts
            .purge_with_ttl(Self::journal_key(plugin, sequence), MARKER_TTL)
            .await
        {
            tracing::warn!(%plugin, sequence, %error, "cannot delete attempt errors");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(attempt: u32) -> AttemptError {
        AttemptError {
            attempt,
            kind: FailureKind::Retry,
            message: "later".to_owned(),
            at_ms: 1,
        }
    }

    #[test]
    fn a_journal_without_deferrals_is_the_bare_list_hosts_have_always_written() {
        let journal = Journal {
            errors: vec![error(1)],
            deferrals: 0,
        };
        let bytes = journal.to_json();
        let list: Vec<AttemptError> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(Journal::parse(&bytes).errors.len(), 1);

        let deferred = Journal {
            errors: vec![error(1), error(2)],
            deferrals: 3,
        };
        let parsed = Journal::parse(&deferred.to_json());
        assert_eq!((parsed.errors.len(), parsed.deferrals), (2, 3));
        assert_eq!(Journal::parse(b"not json").errors.len(), 0);
    }
}
