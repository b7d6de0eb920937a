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

use std::fmt::Display;

use async_nats::jetstream::Message;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream;
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::consumer::NatsConsumer;
use super::messages::{INGESTED_AT, REPLAY_OF, decode_event, encode_event};
use super::{NatsBus, Shared, nats_error, next_message};
use crate::bus::{
    BusError, DeadLetter, DeadLetterQuery, DeadLetterReason, DeadLetterSelection, DeadLetters,
    StoredEvent,
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
        let record = DeadLetterRecord {
            plugin: self.plugin.clone(),
            sequence: stored.sequence,
            ingested_at_us: stored.ingested_at_us,
            reason,
            errors,
            dead_at_ms: now_ms(),
        };
        let mut payload = serde_json::to_vec(&record).unwrap_or_default();
        payload.push(b'\n');
        payload.extend_from_slice(&encode_event(&stored.event));
        let delivered_as = message
            .info()
            .map(|info| info.stream_sequence)
            .unwrap_or(stored.sequence);
        let publish = PublishMessage::build()
            .payload(Bytes::from(payload))
            .message_id(format!("{}-{delivered_as}", self.plugin));
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
    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<Vec<DeadLetter>, BusError> {
        let prefix = &self.shared.options.prefix;
        let subject = match &query.plugin {
            Some(plugin) => format!("{prefix}.dlq.{plugin}"),
            None => format!("{prefix}.dlq.*"),
        };
        let mut found = Vec::new();
        let mut after = query.after;
        // A filter on the reason reads the records it skips: bounded per request.
        let mut scan = DEAD_LETTER_SCAN;
        while found.len() < query.limit.max(1) && scan > 0 {
            scan -= 1;
            let Some(message) = next_message(
                &self.shared.dead_letters,
                self.shared.direct(),
                &subject,
                after + 1,
            )
            .await?
            else {
                break;
            };
            after = message.sequence;
            let letter = to_dead_letter(message.sequence, &message.payload)?;
            if query.reason.is_none_or(|reason| reason == letter.reason) {
                found.push(letter);
            }
        }
        Ok(found)
    }

    async fn dead_letter(&self, id: u64) -> Result<DeadLetter, BusError> {
        self.shared.dead_letter_record(id).await
    }

    async fn replay_dead_letters(&self, which: &DeadLetterSelection) -> Result<u64, BusError> {
        let mut replayed = 0;
        for letter in self.selected(which).await? {
            let subject = format!("{}.replay.{}", self.shared.options.prefix, letter.plugin);
            let publish = PublishMessage::build()
                .payload(encode_event(&letter.stored.event))
                .message_id(format!("replay-{}", letter.id))
                .header(REPLAY_OF, letter.stored.sequence.to_string())
                .header(INGESTED_AT, letter.stored.ingested_at_us.to_string());
            // A replay is kept as long as an event of its type.
            let publish = self.shared.aged(publish, &letter.stored.event.ty);
            self.shared
                .jetstream
                .send_publish(subject, publish)
                .await
                .map_err(storage!("replaying a dead letter"))?
                .await
                .map_err(storage!("replaying a dead letter"))?;
            self.shared
                .forget_attempts(&letter.plugin, letter.stored.sequence)
                .await;
            self.delete_dead_letter(letter.id).await?;
            replayed += 1;
        }
        Ok(replayed)
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
            DeadLetterSelection::Plugin { .. } => {
                let mut deleted = 0;
                for letter in self.selected(which).await? {
                    match self.delete_dead_letter(letter.id).await {
                        // Deleted meanwhile, by another request or host.
                        Ok(()) | Err(BusError::NotFound(_)) => deleted += 1,
                        Err(error) => return Err(error),
                    }
                }
                Ok(deleted)
            }
        }
    }
}

impl NatsBus {
    /// The dead letters a selection takes, oldest first (every one of a plugin's is read).
    async fn selected(&self, which: &DeadLetterSelection) -> Result<Vec<DeadLetter>, BusError> {
        let plugin = match which {
            DeadLetterSelection::One(id) => {
                return Ok(vec![self.shared.dead_letter_record(*id).await?]);
            }
            DeadLetterSelection::Plugin { plugin, .. } => plugin,
        };
        let subject = format!("{}.dlq.{plugin}", self.shared.options.prefix);
        let mut all = Vec::new();
        let mut after = 0;
        while let Some(message) = next_message(
            &self.shared.dead_letters,
            self.shared.direct(),
            &subject,
            after + 1,
        )
        .await?
        {
            after = message.sequence;
            let letter = to_dead_letter(message.sequence, &message.payload)?;
            if which.takes(&letter) {
                all.push(letter);
            }
        }
        Ok(all)
    }

    /// Deletes one dead letter.
    async fn delete_dead_letter(&self, id: u64) -> Result<(), BusError> {
        match self.shared.dead_letters.delete_message(id).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(BusError::NotFound(format!("dead letter {id}"))),
            Err(error) => {
                // The server answers "no message found" as an error.
                if error.to_string().contains("no message found") {
                    Err(BusError::NotFound(format!("dead letter {id}")))
                } else {
                    Err(nats_error("deleting a dead letter")(&error))
                }
            }
        }
    }
}
