//! How an event becomes a JetStream message and back: its subject, its `Nats-Msg-Id`,
//! its payload (a JSON envelope line, then the data bytes as they are), and the headers
//! a replayed event carries (its original log position and ingest time).
//!
//! Invariants:
//! - The payload gives back exactly the event it was made from: the envelope's JSON holds
//!   no raw newline, so the first `\n` ends it.
//! - An event's `Nats-Msg-Id` depends on `(source, id)` alone, so the stream's dedupe
//!   recognises the event sent again.
//! - A subject is valid whatever the type; nothing reads the type back from it.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bus::BusError;
use crate::event::Event;

/// Header naming the log position of a replayed event.
pub(super) const REPLAY_OF: &str = "Switchyard-Replay-Of";
/// Header carrying a replayed event's original ingest time, in microseconds.
pub(super) const INGESTED_AT: &str = "Switchyard-Ingested-At-Us";
/// Header of an event whose producer waits for the outcomes: only its settlements publish
/// notices. It rides on the message, not in the event.
pub(super) const WATCHED: &str = "Switchyard-Watched";

/// Header with a stream event's version (also in its envelope), read without decoding.
pub(super) const STREAM_VERSION: &str = "Switchyard-Stream-Version";

/// The subject of an event without a CloudEvents subject: `P.events.` and the type's
/// words, each kept to the characters subjects allow. Routing never reads it back (the
/// envelope has the type).
pub(super) fn event_subject(prefix: &str, ty: &str) -> String {
    type_words(format!("{prefix}.events"), ty)
}

/// The one subject token that stands for a CloudEvents subject: 32 hex digits of its
/// SHA-256, whatever characters the subject holds.
pub(super) fn subject_token(subject: &str) -> String {
    hex::encode(&Sha256::digest(subject.as_bytes())[..16])
}

/// What every event of one CloudEvents subject's stream is stored under:
/// `P.streams.<token>.>`.
pub(super) fn stream_filter(prefix: &str, subject: &str) -> String {
    format!("{prefix}.streams.{}.>", subject_token(subject))
}

/// Where a CloudEvents subject's stream keeps its newest version, `P.heads.<token>`: one
/// message per subject (each replaces the one before) that `max_age` never removes, so a
/// stream whose events all aged out goes on from its version.
pub(super) fn stream_head_subject(prefix: &str, subject: &str) -> String {
    format!("{prefix}.heads.{}", subject_token(subject))
}

/// The subject of an event with a CloudEvents subject: `P.streams.<token>.` and the
/// type's words, so its stream is one wildcard and its type still filters.
pub(super) fn stream_event_subject(prefix: &str, subject: &str, ty: &str) -> String {
    type_words(format!("{prefix}.streams.{}", subject_token(subject)), ty)
}

/// The subject an event is stored under.
pub(super) fn subject_of(prefix: &str, event: &Event) -> String {
    match &event.subject {
        Some(subject) => stream_event_subject(prefix, subject, &event.ty),
        None => event_subject(prefix, &event.ty),
    }
}

/// The type's words after `head`, each kept to the characters subjects allow.
fn type_words(mut subject: String, ty: &str) -> String {
    for word in ty.split('.') {
        subject.push('.');
        if word.is_empty() {
            subject.push('_');
        }
        subject.extend(word.chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        }));
    }
    subject
}

/// `Nats-Msg-Id` of an event: unique per `(source, id)` and safe in a header.
pub(super) fn message_id(event: &Event) -> String {
    let mut hash = Sha256::new();
    hash.update(event.source.as_bytes());
    hash.update([0]);
    hash.update(event.id.as_bytes());
    hex::encode(hash.finalize())
}

/// The attributes of an event, stored as one JSON line before the data bytes.
#[derive(Deserialize)]
struct Envelope {
    id: String,
    source: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dataschema: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    extensions: BTreeMap<String, String>,
}

/// [`Envelope`] as it is written: borrowed from the event, in the same order.
#[derive(Serialize)]
struct EnvelopeRef<'e> {
    id: &'e str,
    source: &'e str,
    #[serde(rename = "type")]
    ty: &'e str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'e str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'e str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    datacontenttype: Option<&'e str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dataschema: Option<&'e str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extensions: &'e BTreeMap<String, String>,
}

/// A message payload: the envelope's JSON (which never holds a raw newline), `\n`, then
/// the data bytes as they are.
pub(super) fn encode_event(event: &Event) -> Bytes {
    let envelope = EnvelopeRef {
        id: &event.id,
        source: &event.source,
        ty: &event.ty,
        subject: event.subject.as_deref(),
        time: event.time.as_deref(),
        datacontenttype: event.datacontenttype.as_deref(),
        dataschema: event.dataschema.as_deref(),
        extensions: &event.extensions,
    };
    let mut payload = Vec::with_capacity(256 + event.data.len());
    // Writing strings and a map of strings into a vector cannot fail.
    let _ = serde_json::to_writer(&mut payload, &envelope);
    payload.push(b'\n');
    payload.extend_from_slice(&event.data);
    Bytes::from(payload)
}

pub(super) fn decode_event(payload: &[u8]) -> Result<Event, BusError> {
    let split = payload
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| BusError::Storage("a message in the event stream has no envelope".into()))?;
    let envelope: Envelope = serde_json::from_slice(&payload[..split]).map_err(|error| {
        BusError::Storage(format!(
            "a message in the event stream has a bad envelope: {error}"
        ))
    })?;
    Ok(Event {
        id: envelope.id,
        source: envelope.source,
        ty: envelope.ty,
        subject: envelope.subject,
        time: envelope.time,
        datacontenttype: envelope.datacontenttype,
        dataschema: envelope.dataschema,
        data: payload[split + 1..].to_vec(),
        extensions: envelope.extensions,
    })
}

pub(super) fn micros(time: async_nats::datetime::DateTime) -> i64 {
    i64::try_from(time.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

pub(super) fn header<T: std::str::FromStr>(headers: Option<&HeaderMap>, name: &str) -> Option<T> {
    headers?.get(name)?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_valid_whatever_the_type() {
        assert_eq!(
            event_subject("sy", "payment.completed"),
            "sy.events.payment.completed"
        );
        assert_eq!(event_subject("sy", "a..b*>"), "sy.events.a._.b__");
        let token = subject_token("show/42 ü.*");
        assert_eq!(token.len(), 32);
        assert!(token.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            stream_event_subject("sy", "show/42 ü.*", "seat.reserved"),
            format!("sy.streams.{token}.seat.reserved")
        );
        assert_eq!(
            stream_filter("sy", "show/42 ü.*"),
            format!("sy.streams.{token}.>")
        );
    }

    #[test]
    fn events_round_trip_through_the_envelope() {
        let event = Event {
            id: "1".into(),
            source: "/s".into(),
            ty: "t.x".into(),
            subject: Some("line\nbreak".into()),
            time: None,
            datacontenttype: Some("application/octet-stream".into()),
            dataschema: None,
            data: vec![0, b'\n', 255],
            extensions: BTreeMap::from([("partitionkey".to_owned(), "k".to_owned())]),
        };
        let decoded = decode_event(&encode_event(&event)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(decoded, event);
    }
}
