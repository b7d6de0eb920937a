//! Reading a stream's messages of one subject filter in order, from a sequence on: a few
//! by direct gets (a round trip each), more through one ordered consumer (one request).
//! Not for a work-queue stream, which takes no consumer beside its own.
//!
//! Invariants:
//! - A streamed scan ends at the newest matching message there was when it began, so
//!   messages stored meanwhile are left out and the scan cannot run on for ever.
//! - A message deleted while the scan streams (a retention limit, another host's
//!   deletion) is skipped; a scan that hears nothing for [`SCAN_PATIENCE`] takes the rest
//!   as gone.
//! - An ordered consumer that cannot be made or fails (a cluster node lost under it) does
//!   not fail the scan: it goes on by direct gets from the next message it had not read.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream;
use bytes::Bytes;
use futures_util::StreamExt as _;

use super::messages::micros;
use super::{Shared, last_message, next_message};
use crate::bus::BusError;

/// Scans of up to this many messages read them by direct gets, one round trip each;
/// longer ones through an ordered consumer.
const DIRECT_READS: usize = 16;

/// How long a [`Scan`] waits for the next message before it takes the rest as gone.
const SCAN_PATIENCE: Duration = Duration::from_secs(2);

/// A message a [`Scan`] read.
pub(super) struct Scanned {
    pub(super) sequence: u64,
    pub(super) subject: String,
    pub(super) payload: Bytes,
    /// When the server stored it, in microseconds since the Unix epoch.
    pub(super) stored_at_us: i64,
}

/// The messages of one subject filter of a stream, oldest first, from a sequence on.
pub(super) struct Scan<'a> {
    shared: &'a Shared,
    stream: &'a stream::Stream,
    subject: String,
    source: Source,
    ended: bool,
}

/// Where a [`Scan`] reads.
enum Source {
    /// A direct get (or the leader's answer) per message: the next at or after `from`.
    OneByOne { from: u64 },
    /// One ordered consumer streaming every message up to `last`; `next` is where
    /// direct gets would go on.
    Streamed {
        messages: Box<pull::Ordered>,
        last: u64,
        next: u64,
    },
}

impl Shared {
    /// A scan of `stream`'s messages on `subject` from `from` on, expected to read about
    /// `wanted` of them.
    pub(super) async fn scan<'a>(
        &'a self,
        stream: &'a stream::Stream,
        subject: String,
        from: u64,
        wanted: usize,
    ) -> Result<Scan<'a>, BusError> {
        let mut scan = Scan {
            shared: self,
            stream,
            subject,
            source: Source::OneByOne { from },
            ended: false,
        };
        if wanted <= DIRECT_READS {
            return Ok(scan);
        }
        let last = last_message(stream, self.direct(), &scan.subject).await?;
        let Some(last) = last.filter(|last| last.sequence >= from) else {
            scan.ended = true;
            return Ok(scan);
        };
        let ordered = async {
            stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: scan.subject.clone(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: from.max(1),
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?
                .messages()
                .await
                .map_err(|e| e.to_string())
        };
        match ordered.await {
            Ok(messages) => {
                scan.source = Source::Streamed {
                    messages: Box::new(messages),
                    last: last.sequence,
                    next: from,
                };
            }
            Err(error) => {
                tracing::debug!(%error, "cannot stream a stream's messages; reading them one by one");
            }
        }
        Ok(scan)
    }
}

impl Scan<'_> {
    /// The next message, or `None` at the end.
    pub(super) async fn next(&mut self) -> Result<Option<Scanned>, BusError> {
        if self.ended {
            return Ok(None);
        }
        if let Source::Streamed {
            messages,
            last,
            next,
        } = &mut self.source
        {
            let Ok(Some(message)) = tokio::time::timeout(SCAN_PATIENCE, messages.next()).await
            else {
                self.ended = true;
                return Ok(None);
            };
            match message.map_err(|e| e.to_string()).and_then(streamed) {
                Ok((scanned, pending)) => {
                    *next = scanned.sequence + 1;
                    // Past the last one there was, or nothing left on the subject (the
                    // last one may have gone meanwhile).
                    self.ended = scanned.sequence >= *last || pending == 0;
                    return Ok((scanned.sequence <= *last).then_some(scanned));
                }
                Err(error) => {
                    tracing::debug!(%error, "a stream's ordered consumer failed; reading on message by message");
                    let from = *next;
                    self.source = Source::OneByOne { from };
                }
            }
        }
        let Source::OneByOne { from } = &mut self.source else {
            return Ok(None);
        };
        let Some(message) =
            next_message(self.stream, self.shared.direct(), &self.subject, *from).await?
        else {
            self.ended = true;
            return Ok(None);
        };
        *from = message.sequence + 1;
        Ok(Some(Scanned {
            sequence: message.sequence,
            subject: message.subject.to_string(),
            payload: message.payload,
            stored_at_us: micros(message.time),
        }))
    }
}

/// A message of an ordered consumer as scanned, with how many of the subject's messages
/// are left after it.
fn streamed(message: async_nats::jetstream::Message) -> Result<(Scanned, u64), String> {
    let info = message.info().map_err(|e| e.to_string())?;
    let (sequence, stored_at_us, pending) =
        (info.stream_sequence, micros(info.published), info.pending);
    Ok((
        Scanned {
            sequence,
            subject: message.subject.to_string(),
            payload: message.payload.clone(),
            stored_at_us,
        },
        pending,
    ))
}
