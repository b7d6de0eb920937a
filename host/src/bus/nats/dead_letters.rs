//! Dead letters on JetStream: each is a message on `P.dlq.<plugin>` in the stream
//! `P-dead-letters`, its id the message's stream sequence. This file writes them (when a
//! consumer gives a delivery up) and reads, replays and deletes them ([`DeadLetters`]).
//!
//! Invariants:
//! - A dead letter is stored before its delivery is acknowledged, so no event leaves its
//!   consumer unrecorded; its `Nats-Msg-Id` (`<plugin>-<stream sequence>`) keeps a
//!   repeated store from making a second record.
//! - A replay publishes the event on `P.replay.<plugin>`, which only that plugin's
//!   consumer hands out, with the original log position and ingest time in headers; its
//!   `Nats-Msg-Id` (`replay-<id>`) keeps a retried replay from sending it twice, and the
//!   dead letter is deleted only once the replay is stored.
//! - A bulk replay or deletion of one kind, and a list of more than a few, stream the
//!   letters through an ordered consumer ([`Scan`]) rather than a request per letter; a
//!   bulk operation works a page at a time with its requests in flight together, so it
//!   holds one page in memory however many letters there are. Letters are deleted
//!   without the server's erase (an overwrite on disk that made each deletion take
//!   milliseconds); a whole plugin's are one subject purge.

use std::fmt::Display;

use async_nats::jetstream::Message;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::consumer::NatsConsumer;
use super::messages::{INGESTED_AT, REPLAY_OF, decode_event, encode_event};
use super::scan::Scan;
use super::{HEADER_ROOM, NatsBus, Shared, nats_error};
use crate::bus::{
    BusError, DeadLetter, DeadLetterPage, DeadLetterQuery, DeadLetterReason, DeadLetterSelection,
    DeadLetters, StoredEvent,
};
use crate::clock::now_ms;
use crate::failure::AttemptError;

/// A dead letter as the dead-letter stream keeps it: this record as one JSON line, then
/// the event as the event stream stores it (so a dead letter is about as large as its
/// event).
#[derive(Serialize, Deserialize)]
struct DeadLetterRecord {
    plugin: String,
    sequence: u64,
    ingested_at_us: i64,
    reason: DeadLetterReason,
    errors: Vec<AttemptError>,
    dead_at_ms: i64,
}

impl NatsConsumer {
    pub(super) async fn dead_letter(
        &self,
        message: &Message,
        stored: &StoredEvent,
        reason: DeadLetterReason,
        errors: Vec<AttemptError>,
    ) -> Result<(), BusError> {
        let mut record = DeadLetterRecord {
            plugin: self.plugin.clone(),
            sequence: stored.sequence,
            ingested_at_us: stored.ingested_at_us,
            reason,
            errors,
            dead_at_ms: now_ms(),
        };
        let event = encode_event(&stored.event);
        let encode = |record: &DeadLetterRecord| {
            let mut payload = serde_json::to_vec(record).unwrap_or_default();
            payload.push(b'\n');
            payload.extend_from_slice(&event);
            payload
        };
        let mut payload = encode(&record);
        // The event fitted when it was stored; its errors may not fit beside it (many
        // attempts, each with a long message). Shorter messages first, then the last
        // error alone: a dead letter that cannot be stored would be retried for ever.
        let limit = self.shared.client.max_payload().saturating_sub(HEADER_ROOM);
        if payload.len() > limit {
            for error in &mut record.errors {
                error.message = AttemptError::bounded(std::mem::take(&mut error.message), 256);
            }
            payload = encode(&record);
        }
        if payload.len() > limit {
            let last = record.errors.pop();
            record.errors = last.into_iter().collect();
            payload = encode(&record);
        }
        let delivered_as = message
            .info()
            .map(|info| info.stream_sequence)
            .unwrap_or(stored.sequence);
        let publish = PublishMessage::build()
            .payload(Bytes::from(payload))
            .message_id(format!(
                "{}-{}-{delivered_as}",
                self.plugin, self.generation
            ));
        self.shared
            .jetstream
            .send_publish(
                format!("{}.dlq.{}", self.shared.options.prefix, self.plugin),
                publish,
            )
            .await
            .map_err(storage!("storing a dead letter"))?
            .await
            .map_err(storage!("storing a dead letter"))?;
        message
            .double_ack()
            .await
            .map_err(storage!("acknowledging a dead letter"))?;
        self.shared
            .forget_attempts(&self.plugin, stored.sequence)
            .await;
        Ok(())
    }
}

impl Shared {
    async fn dead_letter_record(&self, id: u64) -> Result<DeadLetter, BusError> {
        let message =
            self.dead_letters
                .direct_get(id)
                .await
                .map_err(|error| match error.kind() {
                    stream::DirectGetErrorKind::NotFound => {
                        BusError::NotFound(format!("dead letter {id}"))
                    }
                    _ => nats_error("reading a dead letter")(&error),
                })?;
        to_dead_letter(message.sequence, &message.payload)
    }
}

/// Dead-letter records one list request reads at most.
const DEAD_LETTER_SCAN: usize = 10_000;

fn to_dead_letter(id: u64, payload: &[u8]) -> Result<DeadLetter, BusError> {
    let unreadable =
        |error: &dyn Display| BusError::Storage(format!("dead letter {id} is unreadable: {error}"));
    let split = payload
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| unreadable(&"no record line"))?;
    let record: DeadLetterRecord =
        serde_json::from_slice(&payload[..split]).map_err(|error| unreadable(&error))?;
    let event = decode_event(&payload[split + 1..])?;
    Ok(DeadLetter {
        id,
        plugin: record.plugin,
        stored: StoredEvent {
            sequence: record.sequence,
            ingested_at_us: record.ingested_at_us,
            event,
        },
        reason: record.reason,
        errors: record.errors,
        dead_at_ms: record.dead_at_ms,
    })
}

#[async_trait]
impl DeadLetters for NatsBus {
    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<DeadLetterPage, BusError> {
        let prefix = &self.shared.options.prefix;
        let subject = match &query.plugin {
            Some(plugin) => format!("{prefix}.dlq.{plugin}"),
            None => format!("{prefix}.dlq.*"),
        };
        let limit = query.limit.max(1);
        let mut found = Vec::new();
        // A filter on the reason reads the records it skips: bounded per request.
        let mut scan = DEAD_LETTER_SCAN;
        let keep = |letter: &DeadLetter| query.reason.is_none_or(|reason| reason == letter.reason);
        let mut letters = self
            .shared
            .letters(subject, query.after.saturating_add(1), limit)
            .await?;
        let mut scanned_to = None;
        while found.len() < limit {
            let Some(letter) = letters.next().await? else {
                return Ok(DeadLetterPage {
                    letters: found,
                    scanned_to: None,
                });
            };
            scanned_to = Some(letter.id);
            if keep(&letter) {
                found.push(letter);
            }
            scan -= 1;
            if scan == 0 {
                break;
            }
        }
        Ok(DeadLetterPage {
            letters: found,
            scanned_to,
        })
    }

    async fn dead_letter(&self, id: u64) -> Result<DeadLetter, BusError> {
        self.shared.dead_letter_record(id).await
    }

    async fn replay_dead_letters(&self, which: &DeadLetterSelection) -> Result<u64, BusError> {
        match which {
            DeadLetterSelection::One(id) => {
                let letter = self.shared.dead_letter_record(*id).await?;
                self.replay_page(vec![letter]).await
            }
            DeadLetterSelection::Plugin { plugin, .. } => {
                self.page_by_page(plugin, which, Bulk::Replay).await
            }
        }
    }

    async fn delete_dead_letters(&self, which: &DeadLetterSelection) -> Result<u64, BusError> {
        match which {
            DeadLetterSelection::One(id) => self.delete_dead_letter(*id).await.map(|()| 1),
            // All of a plugin's are its subject's messages: one purge.
            DeadLetterSelection::Plugin {
                plugin,
                reason: None,
            } => self
                .shared
                .dead_letters
                .purge()
                .filter(format!("{}.dlq.{plugin}", self.shared.options.prefix))
                .await
                .map(|purged| purged.purged)
                .map_err(storage!("deleting dead letters")),
            DeadLetterSelection::Plugin { plugin, .. } => {
                self.page_by_page(plugin, which, Bulk::Delete).await
            }
        }
    }
}

/// What a bulk operation does with the dead letters it selects.
#[derive(Clone, Copy)]
enum Bulk {
    Replay,
    Delete,
}

/// Dead letters a bulk replay or deletion reads, then acts on, at a time.
const BULK_PAGE: usize = 256;

/// Requests a bulk replay or deletion has in flight at once.
const BULK_IN_FLIGHT: usize = 64;

/// The dead letters of one subject filter, oldest first, from an id on.
struct Letters<'a>(Scan<'a>);

impl Shared {
    /// The dead letters on `subject` from `from` on, expecting to read about `wanted`.
    async fn letters(
        &self,
        subject: String,
        from: u64,
        wanted: usize,
    ) -> Result<Letters<'_>, BusError> {
        Ok(Letters(
            self.scan(&self.dead_letters, subject, from, wanted).await?,
        ))
    }
}

impl Letters<'_> {
    /// The next dead letter, or `None` at the end.
    async fn next(&mut self) -> Result<Option<DeadLetter>, BusError> {
        match self.0.next().await? {
            Some(message) => to_dead_letter(message.sequence, &message.payload).map(Some),
            None => Ok(None),
        }
    }
}

impl NatsBus {
    /// Reads the dead letters of `plugin` that `which` takes, oldest first, through one
    /// ordered consumer, and replays or deletes them a page at a time; how many. Letters
    /// stored after the operation began are left alone, so a replay never takes the
    /// letters its own replays make.
    async fn page_by_page(
        &self,
        plugin: &str,
        which: &DeadLetterSelection,
        bulk: Bulk,
    ) -> Result<u64, BusError> {
        let act = async |page| match bulk {
            Bulk::Replay => self.replay_page(page).await,
            Bulk::Delete => self.delete_page(page).await,
        };
        let subject = format!("{}.dlq.{plugin}", self.shared.options.prefix);
        let mut letters = self.shared.letters(subject, 1, usize::MAX).await?;
        let mut page = Vec::with_capacity(BULK_PAGE);
        let mut done = 0;
        while let Some(letter) = letters.next().await? {
            if which.takes(&letter) {
                page.push(letter);
            }
            if page.len() == BULK_PAGE {
                done += act(std::mem::take(&mut page)).await?;
            }
        }
        if !page.is_empty() {
            done += act(page).await?;
        }
        Ok(done)
    }

    /// Replays dead letters: what is left of their attempt errors is deleted, their
    /// replays are sent in order and stored together, then each stored one's letter is
    /// deleted. A letter whose replay was not stored stays (the first such error is
    /// returned once the others are done). The errors go first: a replay may be taken,
    /// and fail, on another host at once, and its new errors must stay.
    async fn replay_page(&self, page: Vec<DeadLetter>) -> Result<u64, BusError> {
        let journals: Vec<(String, u64)> = page
            .iter()
            .map(|letter| (letter.plugin.clone(), letter.stored.sequence))
            .collect();
        futures_util::stream::iter(journals)
            .map(|(plugin, sequence)| async move {
                self.shared.forget_attempts(&plugin, sequence).await;
            })
            .buffer_unordered(BULK_IN_FLIGHT)
            .collect::<()>()
            .await;
        let mut sent = Vec::with_capacity(page.len());
        let mut failed = None;
        for letter in &page {
            let subject = format!("{}.replay.{}", self.shared.options.prefix, letter.plugin);
            let publish = PublishMessage::build()
                .payload(encode_event(&letter.stored.event))
                .message_id(format!("replay-{}", letter.id))
                .header(REPLAY_OF, letter.stored.sequence.to_string())
                .header(INGESTED_AT, letter.stored.ingested_at_us.to_string());
            // A replay is kept as long as an event of its type.
            let publish = self.shared.aged(publish, &letter.stored.event.ty);
            match self.shared.jetstream.send_publish(subject, publish).await {
                Ok(stored) => sent.push(stored),
                // The replays sent before it are still seen through.
                Err(error) => {
                    failed = Some(nats_error("replaying a dead letter")(&error));
                    break;
                }
            }
        }
        let stored =
            futures_util::future::join_all(sent.into_iter().map(IntoFuture::into_future)).await;
        let replayed: Vec<DeadLetter> = page
            .into_iter()
            .zip(stored)
            .filter_map(|(letter, stored)| match stored {
                Ok(_) => Some(letter),
                Err(error) => {
                    failed.get_or_insert_with(|| nats_error("replaying a dead letter")(&error));
                    None
                }
            })
            .collect();
        let (done, cleared) = self.delete_letters(replayed).await;
        match failed.or(cleared) {
            Some(error) => Err(error),
            None => Ok(done),
        }
    }

    /// Deletes dead letters, [`BULK_IN_FLIGHT`] at a time.
    async fn delete_page(&self, page: Vec<DeadLetter>) -> Result<u64, BusError> {
        match self.delete_letters(page).await {
            (deleted, None) => Ok(deleted),
            (_, Some(error)) => Err(error),
        }
    }

    /// Deletes `letters` ([`BULK_IN_FLIGHT`] at a time): how many are gone, counting those
    /// deleted meanwhile by another request or host, and the first error.
    async fn delete_letters(&self, letters: Vec<DeadLetter>) -> (u64, Option<BusError>) {
        let mut deleting = futures_util::stream::iter(letters)
            .map(|letter| async move { self.delete_dead_letter(letter.id).await })
            .buffer_unordered(BULK_IN_FLIGHT);
        let (mut deleted, mut failed) = (0, None);
        while let Some(outcome) = deleting.next().await {
            match outcome {
                Ok(()) | Err(BusError::NotFound(_)) => deleted += 1,
                Err(error) => {
                    failed.get_or_insert(error);
                }
            }
        }
        (deleted, failed)
    }

    /// Deletes one dead letter.
    async fn delete_dead_letter(&self, id: u64) -> Result<(), BusError> {
        // Without `no_erase` the server overwrites the message on disk first, which makes
        // a deletion several times slower; a dead letter's event stays in the event
        // stream anyway, and a purge never erases.
        let subject = format!(
            "STREAM.MSG.DELETE.{}",
            self.shared.dead_letters.cached_info().config.name
        );
        let answer: Response<DeleteAnswer> = self
            .shared
            .jetstream
            .request(subject, &serde_json::json!({ "seq": id, "no_erase": true }))
            .await
            .map_err(storage!("deleting a dead letter"))?;
        match answer {
            Response::Ok(DeleteAnswer { success: true }) => Ok(()),
            Response::Ok(DeleteAnswer { success: false }) => {
                Err(BusError::NotFound(format!("dead letter {id}")))
            }
            // The server answers "no message found" as an error.
            Response::Err { error } if error.to_string().contains("no message found") => {
                Err(BusError::NotFound(format!("dead letter {id}")))
            }
            Response::Err { error } => Err(nats_error("deleting a dead letter")(&error)),
        }
    }
}

/// The server's answer to a message deletion.
#[derive(Deserialize)]
struct DeleteAnswer {
    success: bool,
}
