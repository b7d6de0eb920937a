//! Scheduled events on JetStream: the server's message schedules (nats-server 2.12)
//! keep the time, the hosts append.
//!
//! Stream `P-schedules` (schedules allowed, no age limit, so a schedule a year ahead
//! outlives the event stream's `max_age`):
//! - `P.schedule.<token>`: the pending event with id `<token>`'s source (a hash of the
//!   id), sent with `Nats-Schedule: @at <due>` and `Nats-Schedule-Target: P.due.<token>`.
//!   One message per id: the server keeps one schedule per subject. A repeat is dropped
//!   by `Nats-Msg-Id`, and a schedule is created only where none is pending
//!   (`Nats-Expected-Last-Subject-Sequence: 0`), so a later event with a pending one's
//!   id (after the dedupe window, or from another source) is the same event sent again,
//!   as on the embedded log: the first stays.
//! - `P.due.<token>`: what the server stores there at the due time (the same payload and
//!   headers), removing the schedule in the same step.
//! - the durable consumer `P-scheduler` on `P.due.>`, shared by every host (competing
//!   consumers): a host's scheduler pulls due events, appends each to the log like any
//!   event (`Nats-Msg-Id` on its `(source, id)`), then acknowledges the due message,
//!   which the stream then drops (work-queue retention: pending schedules match no
//!   consumer and stay). A host that dies in between leaves it unacknowledged; another
//!   host gets it after `ack_wait` and its append is dropped as a duplicate. So each due
//!   event reaches the log once, over all hosts.
//!
//! A cancellation purges the schedule's subject: after that the server has nothing to
//! fire, and one that fired first leaves nothing to purge (`false`).
//!
//! A plugin's cancellation is part of its attempt's commit, and the commit cannot hold
//! the purge (no batch spans two streams), so the purge comes first, as a claim
//! ([`Shared::claim_cancels`]): each schedule the attempt cancels is read, copied into
//! the delivery's entry `<plugin>.<sequence>.cancels` of `P-attempts`, then purged. A
//! purge that finds nothing means the event fired since the attempt looked: the commit
//! conflicts and the attempt runs again, seeing it fired. A commit that then does not go
//! through publishes the copies again ([`Shared::release_claims`]), with their due
//! times (a time already past fires at once); so does the next host to get the delivery
//! when the one that claimed died before its commit, unless the commit record shows the
//! commit went through. So a scheduled event is either cancelled by a committed attempt
//! or fires, never both. (A host stalled past `ack_wait` in the middle of its commit, while
//! another host that got the delivery publishes the copies again, can still see one fire;
//! the commit record then cancels it again, unless it was due already.)
//!
//! A listing reads every pending schedule (up to [`MAX_LISTING_SCAN`]) and sorts them by
//! due time. The stream takes no consumer beside the scheduler's (work-queue retention),
//! so it reads them by batched direct gets, 256 a request, or one by one from a
//! replicated stream's leader.
//!
//! Why the server's schedules rather than a schedule stream with leases: the server
//! fires at the due time (within its quarter-second tick) whether or not a host runs,
//! survives restarts with the stream, and needs no lease to keep two hosts from firing
//! one event twice; the competing consumer does that for the append.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::messages::{decode_event, encode_event, header, message_id, subject_token};
use super::streams::wrong_last_sequence;
use super::{MARKER_TTL, NatsBus, Shared, nats_error};
use crate::bus::{BusError, Fired, ScheduledEvent, ScheduledQuery, Schedules};
use crate::clock::{now_ms, rfc3339_ms};
use crate::event::Event;
use crate::schedule::{self, DELIVER_AT};

/// Header with a scheduled event's due time, in milliseconds since the Unix epoch.
const DUE_AT: &str = "Switchyard-Due-Ms";
/// Header with when an event was scheduled, in milliseconds since the Unix epoch.
const SCHEDULED_AT: &str = "Switchyard-Scheduled-Ms";
/// Most pending schedules one listing looks at.
const MAX_LISTING_SCAN: usize = 100_000;
/// Longest a scheduler's pull waits for due events (a long poll: the server fires them
/// into the consumer).
const PULL_WAIT: Duration = Duration::from_millis(250);

/// A pending schedule's message as an attempt's commit claimed it, to publish again if
/// the commit does not go through.
#[derive(Serialize, Deserialize)]
struct ClaimedSchedule {
    subject: String,
    /// The payload, in base64.
    payload: String,
    headers: Vec<(String, String)>,
}

impl ClaimedSchedule {
    fn of(message: &async_nats::jetstream::message::StreamMessage) -> Self {
        let headers = message
            .headers
            .iter()
            // Conditions and the dedupe id belong to the first publish, not to this one.
            .filter(|(name, _)| {
                let name = name.to_string();
                name != "Nats-Msg-Id" && !name.starts_with("Nats-Expected")
            })
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |value| (name.to_string(), value.as_str().to_owned()))
            })
            .collect();
        Self {
            subject: message.subject.to_string(),
            payload: BASE64.encode(&message.payload),
            headers,
        }
    }
}

/// The key of a delivery's claimed schedules in `P-attempts`.
fn claims_key(plugin: &str, sequence: u64) -> String {
    format!("{plugin}.{sequence}.cancels")
}

impl Shared {
    /// Takes the pending scheduled events `ids` off the schedule for the commit of the
    /// delivery `(plugin, sequence)`, keeping copies in its journal first (see the module
    /// docs). A conflict if one is no longer pending; then nothing stays claimed.
    pub(super) async fn claim_cancels(
        &self,
        plugin: &str,
        sequence: u64,
        ids: &[String],
    ) -> Result<(), BusError> {
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(message) = self.pending_schedule(id).await? else {
                return Err(BusError::Conflict(format!(
                    "scheduled event `{id}` (no longer pending)"
                )));
            };
            claimed.push(ClaimedSchedule::of(&message));
        }
        let body = serde_json::to_vec(&claimed).map_err(|e| BusError::Storage(e.to_string()))?;
        self.attempts
            .put(claims_key(plugin, sequence), Bytes::from(body))
            .await
            .map_err(storage!("recording the scheduled events a commit cancels"))?;
        for (index, id) in ids.iter().enumerate() {
            if !self.cancel(id).await? {
                self.restore_schedules(claimed.get(..index).unwrap_or_default())
                    .await?;
                self.forget_claims(plugin, sequence).await;
                return Err(BusError::Conflict(format!(
                    "scheduled event `{id}` (it fired first)"
                )));
            }
        }
        Ok(())
    }

    /// Publishes again the schedules the delivery `(plugin, sequence)` claimed for a
    /// commit that did not go through, and forgets the claim. The caller has checked that
    /// the delivery's commit record does not exist.
    pub(super) async fn release_claims(&self, plugin: &str, sequence: u64) -> Result<(), BusError> {
        let Some(body) = self
            .attempts
            .get(claims_key(plugin, sequence))
            .await
            .map_err(storage!("reading the scheduled events a commit cancels"))?
        else {
            return Ok(());
        };
        let claimed: Vec<ClaimedSchedule> = serde_json::from_slice(&body).map_err(|error| {
            BusError::Storage(format!(
                "the claimed schedules of a delivery are unreadable: {error}"
            ))
        })?;
        self.restore_schedules(&claimed).await?;
        self.forget_claims(plugin, sequence).await;
        Ok(())
    }

    /// Forgets the delivery's claimed schedules (its commit went through, or they are
    /// back on the schedule).
    pub(super) async fn forget_claims(&self, plugin: &str, sequence: u64) {
        if let Err(error) = self
            .attempts
            .purge_with_ttl(claims_key(plugin, sequence), MARKER_TTL)
            .await
        {
            tracing::warn!(%plugin, sequence, %error, "cannot delete the record of claimed schedules");
        }
    }

    /// Publishes claimed schedules again, each only where nothing is pending under its id
    /// (another event scheduled since with that id stays).
    async fn restore_schedules(&self, claimed: &[ClaimedSchedule]) -> Result<(), BusError> {
        for schedule in claimed {
            let payload = BASE64.decode(&schedule.payload).map_err(|error| {
                BusError::Storage(format!("a claimed schedule is unreadable: {error}"))
            })?;
            let mut headers = HeaderMap::new();
            for (name, value) in &schedule.headers {
                headers.append(name.as_str(), value.as_str());
            }
            headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
            let publish = PublishMessage::build()
                .payload(Bytes::from(payload))
                .headers(headers);
            let answer = self
                .jetstream
                .send_publish(schedule.subject.clone(), publish)
                .await
                .map_err(storage!("restoring a scheduled event"))?
                .await;
            match answer {
                Ok(_) => {}
                Err(error) if wrong_last_sequence(&error) => {}
                Err(error) => return Err(storage!("restoring a scheduled event")(error)),
            }
        }
        Ok(())
    }

    fn schedule_subject(&self, id: &str) -> String {
        format!("{}.schedule.{}", self.options.prefix, subject_token(id))
    }

    fn due_subject(&self, id: &str) -> String {
        format!("{}.due.{}", self.options.prefix, subject_token(id))
    }

    /// The message that schedules an event carrying `deliverat`: its subject, the
    /// message, and the due time.
    pub(super) fn schedule_message(
        &self,
        event: &Event,
    ) -> Result<(String, PublishMessage, i64), BusError> {
        let mut pending = event.clone();
        let due = pending
            .extensions
            .remove(DELIVER_AT)
            .ok_or_else(|| BusError::Invalid(format!("`{DELIVER_AT}` is missing")))?;
        let due_at_ms = schedule::parse_rfc3339_ms(&due).map_err(BusError::Invalid)?;
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Schedule",
            format!("@at {}", rfc3339_ms(due_at_ms)).as_str(),
        );
        headers.insert("Nats-Schedule-Target", self.due_subject(&event.id).as_str());
        headers.insert(
            "Nats-Msg-Id",
            format!("schedule-{}", message_id(event)).as_str(),
        );
        headers.insert(DUE_AT, due_at_ms.to_string().as_str());
        headers.insert(SCHEDULED_AT, now_ms().to_string().as_str());
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        let publish = PublishMessage::build()
            .payload(encode_event(&pending))
            .headers(headers);
        Ok((self.schedule_subject(&event.id), publish, due_at_ms))
    }

    /// Cancels a pending scheduled event; whether there was one.
    pub(super) async fn cancel(&self, id: &str) -> Result<bool, BusError> {
        let purged = self
            .schedules
            .purge()
            .filter(self.schedule_subject(id))
            .await
            .map_err(storage!("cancelling a scheduled event"))?;
        Ok(purged.purged > 0)
    }

    /// The message of the pending scheduled event with this id, if one is pending.
    async fn pending_schedule(
        &self,
        id: &str,
    ) -> Result<Option<async_nats::jetstream::message::StreamMessage>, BusError> {
        match self
            .schedules
            .get_last_raw_message_by_subject(&self.schedule_subject(id))
            .await
        {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(error) => Err(nats_error("reading the schedules")(&error)),
        }
    }

    /// When the pending scheduled event with this id is due, if one is.
    pub(super) async fn pending_due_ms(&self, id: &str) -> Result<Option<i64>, BusError> {
        Ok(self
            .pending_schedule(id)
            .await?
            .and_then(|message| header(Some(&message.headers), DUE_AT)))
    }

    /// Whether a scheduled event with this id is pending.
    pub(super) async fn is_scheduled(&self, id: &str) -> Result<bool, BusError> {
        Ok(self.pending_schedule(id).await?.is_some())
    }

    /// The scheduler's consumer, created (or looked up) on first use and after a failed
    /// pull.
    async fn scheduler(&self) -> Result<PullConsumer, BusError> {
        let mut cached = self.scheduler.lock().await;
        if let Some(consumer) = cached.as_ref() {
            return Ok(consumer.clone());
        }
        let name = format!("{}-scheduler", self.options.prefix);
        let consumer: PullConsumer = self
            .schedules
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("{}.due.>", self.options.prefix),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.options.ack_wait,
                    max_deliver: -1,
                    num_replicas: 0,
                    ..Default::default()
                },
            )
            .await
            .map_err(storage!("creating the scheduler's consumer"))?;
        *cached = Some(consumer.clone());
        Ok(consumer)
    }

    /// Forgets the scheduler's consumer after a failed pull: the next look finds or
    /// makes it again.
    async fn forget_scheduler(&self) {
        *self.scheduler.lock().await = None;
    }
}

/// A pending schedule as the listing shows it.
fn listed(message: &async_nats::jetstream::message::StreamMessage) -> Option<ScheduledEvent> {
    let headers = Some(&message.headers);
    Some(ScheduledEvent {
        due_at_ms: header(headers, DUE_AT)?,
        scheduled_at_ms: header(headers, SCHEDULED_AT).unwrap_or(0),
        event: decode_event(&message.payload).ok()?,
    })
}

#[async_trait]
impl Schedules for NatsBus {
    async fn list_scheduled(&self, query: ScheduledQuery) -> Result<Vec<ScheduledEvent>, BusError> {
        let shared = &self.shared;
        let filter = format!("{}.schedule.*", shared.options.prefix);
        let mut pending = Vec::new();
        shared
            .scan_subject(&shared.schedules, &filter, MAX_LISTING_SCAN, |message| {
                pending.extend(listed(message).filter(|entry| {
                    query
                        .event_type
                        .as_deref()
                        .is_none_or(|ty| entry.event.ty == ty)
                }));
            })
            .await?;
        pending.sort_by(|a, b| (a.due_at_ms, &a.event.id).cmp(&(b.due_at_ms, &b.event.id)));
        pending.truncate(query.limit.max(1));
        Ok(pending)
    }

    async fn scheduled_count(&self) -> Result<u64, BusError> {
        let filter = format!("{}.schedule.*", self.shared.options.prefix);
        let mut subjects = self
            .shared
            .schedules
            .info_with_subjects(&filter)
            .await
            .map_err(storage!("counting scheduled events"))?;
        let mut count = 0u64;
        while let Some(entry) = subjects.next().await {
            let (_, messages) = entry.map_err(storage!("counting scheduled events"))?;
            count += u64::try_from(messages).unwrap_or(0);
        }
        Ok(count)
    }

    async fn cancel_scheduled(&self, id: &str) -> Result<bool, BusError> {
        self.shared.cancel(id).await
    }

    async fn fire_due(&self, limit: usize) -> Result<Fired, BusError> {
        let shared = &self.shared;
        let consumer = shared.scheduler().await?;
        let mut messages = Vec::new();
        // A pull that fails is reported (the scheduler says it cannot fire, and tries
        // again), and the consumer is looked up again: it may have been deleted.
        let failed =
            |error: &dyn std::fmt::Display| nats_error("pulling the due scheduled events")(error);
        let pulled = tokio::time::timeout(
            PULL_WAIT * 10,
            consumer
                .batch()
                .max_messages(limit.max(1))
                .expires(PULL_WAIT)
                .messages(),
        )
        .await;
        let mut batch = match pulled {
            Ok(Ok(batch)) => batch,
            Ok(Err(error)) => {
                shared.forget_scheduler().await;
                return Err(failed(&error));
            }
            Err(_) => return Err(failed(&"the server did not answer")),
        };
        loop {
            match tokio::time::timeout(PULL_WAIT * 10, batch.next()).await {
                Ok(Some(Ok(message))) => messages.push(message),
                Ok(Some(Err(error))) if messages.is_empty() => {
                    shared.forget_scheduler().await;
                    return Err(failed(&error));
                }
                _ => break,
            }
        }
        let mut fired = Fired {
            more: messages.len() >= limit,
            // The pull itself waits for the server to fire: ask again at once.
            next_due_ms: Some(now_ms()),
            ..Fired::default()
        };
        let mut due = Vec::with_capacity(messages.len());
        let mut events = Vec::with_capacity(messages.len());
        for message in messages {
            match decode_event(&message.payload) {
                Ok(event) => {
                    let due_at_ms: i64 =
                        header(message.headers.as_ref(), DUE_AT).unwrap_or_else(now_ms);
                    events.push(event);
                    due.push((message, due_at_ms));
                }
                Err(_) => {
                    tracing::error!(subject = %message.subject, "dropping a due event that cannot be read");
                    let _ = message.ack_with(AckKind::Term).await;
                }
            }
        }
        if events.is_empty() {
            return Ok(fired);
        }
        // One store for the lot: plain events go without waiting for each other. Left
        // unacknowledged on an error, they come back after `ack_wait`, and what was
        // stored of them is then dropped as a duplicate.
        shared.store_events(&events, false).await?;
        let appended_at = now_ms();
        for (message, due_at_ms) in due {
            fired
                .lags_ms
                .push(u64::try_from(appended_at.saturating_sub(due_at_ms)).unwrap_or(0));
            // A lost acknowledgement means one more append, which `Nats-Msg-Id` drops;
            // an acknowledged one removes the due message (work-queue retention).
            let _ = message.ack().await;
        }
        Ok(fired)
    }
}
