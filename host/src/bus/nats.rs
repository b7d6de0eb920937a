//! The distributed bus on NATS JetStream: many hosts share one event stream, one durable
//! pull consumer per plugin (competing consumers), a dead-letter stream and one KV bucket
//! per plugin. Hosts keep no state of their own beyond their plugin directory.
//!
//! Names (`P` is `[bus] prefix`):
//! - stream `P-events`, subjects `P.events.<type>` (the event type's dot-separated words,
//!   each made subject-safe) and `P.replay.<plugin>` (dead letters sent back to one plugin);
//! - durable consumer `P-<plugin>` on it, no filter subject: the host matches the plugin's
//!   patterns itself and acknowledges the rest, so a plugin with several patterns gets each
//!   matching event exactly once on servers before 2.10, whose consumers take one filter;
//! - stream `P-dead-letters`, subjects `P.dlq.<plugin>`: one JSON record per dead letter,
//!   its id the record's stream sequence;
//! - KV buckets `P-kv-<plugin>` (plugin state), `P-attempts` (errors of earlier attempts,
//!   key `<plugin>.<sequence>`) and `P-intents` (the commit journal, same keys).
//!
//! How the [`Bus`] contract maps onto JetStream, and where it is weaker than the embedded
//! log (the README's table of guarantees says the same for operators):
//! - **Append** publishes each event with `Nats-Msg-Id` = SHA-256 of `(source, id)`; the
//!   stream drops a copy sent again within `duplicate_window` and answers with the
//!   original's sequence. A batch is not atomic: on an error some events may be stored,
//!   and the producer's retry of the batch is absorbed by the dedupe.
//! - **Delivery**: a retry is a `Nak` with the backoff's delay; a dead letter is a record
//!   in the dead-letter stream followed by the acknowledgement. The server's own
//!   `max_deliver` is left unlimited because the server drops a message silently when it
//!   runs out; the host instead dead-letters an event handed out [`UNSETTLED_LIMIT`] times
//!   without any settlement (hosts crashing on it), so nothing is dropped unrecorded.
//!   While a host works on a delivery it tells the server so every `ack_wait / 3`;
//!   deliveries of a host that died go to another host after `ack_wait`.
//! - **Effects**: JetStream has no transaction across streams. A settlement with no KV
//!   writes checks its reads and publishes its emits (their ids derive from the handled
//!   event, so `Nats-Msg-Id` absorbs a repeat). One with KV writes takes the plugin's
//!   commit lock (`P-intents/<plugin>.lock`, a lease of `ack_wait` naming the intent it
//!   commits), checks its reads (optimistic concurrency, as the embedded log), stores its
//!   intent under `P-intents/<plugin>.<sequence>` (the writes, each with the revision it
//!   expects, and the emits), applies the writes with compare-and-set, publishes the
//!   emits, acknowledges and releases the lock. The intent stays for a day as the
//!   delivery's commit record: a settlement or redelivery that finds it finishes it
//!   instead of committing the event again. A host that dies mid-commit leaves the lock
//!   naming its intent; the next commit of the plugin finishes that intent before it
//!   writes anything, so no other commit overtakes a half-applied one. After a storage
//!   error the lock stays taken until the settlement is tried again (or the lease ends).
//!   Finishing first claims the intent (a new revision), so the host that wrote it can no
//!   longer withdraw it; a host withdraws its intent (and undoes its writes) only when a
//!   compare-and-set fails, which under the lock means its reads went stale.
//!
//! Every guarantee above rests on JetStream's compare-and-set
//! (`Nats-Expected-Last-Subject-Sequence`). nats-server 2.9 does not keep it on
//! replicated streams under concurrent writers (two writes expecting one revision can
//! both be stored), so on a 2.9 cluster concurrent KV updates can be lost; a single
//! server keeps them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::Context as JetStream;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind, ErrorCode, Message};
use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    Appended, Bus, BusError, Consumer, ConsumerSpec, ConsumerStats, DeadLetter, DeadLetterQuery,
    DeadLetterReason, DeadLetters, Delivery, LogPage, LogQuery, Settlement, StartPosition,
    StoredEvent,
};
use crate::clock::now_ms;
use crate::effects::Effects;
use crate::event::Event;
use crate::failure::{AttemptError, FailureKind};
use crate::kv::{KvError, KvRead, KvSource, keys_digest, value_digest};
use crate::pattern::Pattern;

/// Times an event may be handed out without any settlement (the hosts holding it died or
/// stalled) before the host dead-letters it instead of running it again.
pub const UNSETTLED_LIMIT: i64 = 10;

/// Bytes of `max_payload` kept for message headers.
const HEADER_ROOM: usize = 4096;

/// Header naming the log position of a replayed event.
const REPLAY_OF: &str = "Switchyard-Replay-Of";
/// Header carrying a replayed event's original ingest time, in microseconds.
const INGESTED_AT: &str = "Switchyard-Ingested-At-Us";

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
    /// How long a resent `(source, id)` is recognised.
    pub duplicate_window: Duration,
    /// How long a delivery may go without word before another host gets it.
    pub ack_wait: Duration,
}

fn nats_error(what: &str) -> impl Fn(&dyn Display) -> BusError + '_ {
    move |error| BusError::Storage(format!("NATS JetStream: {what}: {error}"))
}

macro_rules! storage {
    ($what:expr) => {
        |error| nats_error($what)(&error)
    };
}

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
    attempts: kv::Store,
    intents: kv::Store,
    plugin_kv: Mutex<HashMap<String, kv::Store>>,
    /// This host's name in commit locks.
    owner: String,
}

/// A plugin's commit lock, as the intents bucket keeps it under `<plugin>.lock`.
#[derive(Serialize, Deserialize)]
struct LockRecord {
    /// The host holding it.
    owner: String,
    /// When the lease runs out, in milliseconds since the Unix epoch.
    until_ms: i64,
    /// The journal key of the intent the holder commits.
    intent: String,
}

impl NatsBus {
    /// Connects, then creates the streams and buckets or checks the existing ones.
    pub async fn connect(options: NatsOptions) -> Result<Self, BusError> {
        let urls: Vec<async_nats::ServerAddr> = options
            .url
            .split(',')
            .map(|url| url.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|error| {
                BusError::Storage(format!("bad NATS URL in `{}`: {error}", options.url))
            })?;
        let client = async_nats::ConnectOptions::new()
            .name("switchyard")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .connect(urls)
            .await
            .map_err(|error| {
                BusError::Storage(format!(
                    "cannot reach the NATS server at {}: {error}",
                    options.url
                ))
            })?;
        let jetstream = jetstream::new(client.clone());
        // A cluster that is still electing its JetStream leader (hosts started together
        // with it) answers setup requests with errors for a while: wait for it, bounded.
        let deadline = tokio::time::Instant::now() + SETUP_PATIENCE;
        let (events, dead_letters, attempts, intents) = loop {
            match open_streams(&jetstream, &options).await {
                Ok(opened) => break opened,
                Err(Setup::Unavailable(error)) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(%error, "JetStream is not ready; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(Setup::Unavailable(error) | Setup::Fatal(error)) => return Err(error),
            }
        };
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                jetstream,
                options,
                events,
                dead_letters,
                attempts,
                intents,
                plugin_kv: Mutex::new(HashMap::new()),
                owner: uuid::Uuid::new_v4().to_string(),
            }),
        })
    }
}

/// How long a commit record (an intent, kept after its commit) marks its delivery as
/// committed: a copy of the delivery that turns up later than this (a host stalled for a
/// day) would run again.
const COMMIT_RECORD_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Least time a commit waits for its plugin's commit lock before reporting a storage
/// error (and being tried again).
const LOCK_PATIENCE: Duration = Duration::from_secs(30);

/// How long a starting host waits for JetStream to answer its setup requests.
const SETUP_PATIENCE: Duration = Duration::from_secs(30);

/// A setup step's failure: worth waiting out, or a misconfiguration.
enum Setup {
    Unavailable(BusError),
    Fatal(BusError),
}

/// Creates or checks the streams and buckets every host shares.
async fn open_streams(
    jetstream: &JetStream,
    options: &NatsOptions,
) -> Result<(stream::Stream, stream::Stream, kv::Store, kv::Store), Setup> {
    let prefix = &options.prefix;
    // The server refuses a dedupe window longer than the stream keeps events.
    let duplicate_window = match options.max_age {
        Some(max_age) => options.duplicate_window.min(max_age),
        None => options.duplicate_window,
    };
    let events = ensure_stream(
        jetstream,
        stream::Config {
            name: format!("{prefix}-events"),
            subjects: vec![format!("{prefix}.events.>"), format!("{prefix}.replay.*")],
            max_age: options.max_age.unwrap_or_default(),
            max_bytes: options
                .max_bytes
                .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            duplicate_window,
            ..stream_defaults(options)
        },
    )
    .await?;
    let dead_letters = ensure_stream(
        jetstream,
        stream::Config {
            name: format!("{prefix}-dead-letters"),
            subjects: vec![format!("{prefix}.dlq.*")],
            duplicate_window: options.duplicate_window,
            ..stream_defaults(options)
        },
    )
    .await?;
    let attempts = ensure_bucket(jetstream, options, &format!("{prefix}-attempts"))
        .await
        .map_err(Setup::Unavailable)?;
    let intents = ensure_bucket_with_age(
        jetstream,
        options,
        &format!("{prefix}-intents"),
        COMMIT_RECORD_AGE,
    )
    .await
    .map_err(Setup::Unavailable)?;
    Ok((events, dead_letters, attempts, intents))
}

fn stream_defaults(options: &NatsOptions) -> stream::Config {
    stream::Config {
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        num_replicas: options.replicas,
        // As the server reports "no limit", so that an unchanged stream compares equal.
        max_bytes: -1,
        // With replicas, direct gets may be answered by a replica that is behind; reads
        // then go to the leader instead (see `next_message`).
        allow_direct: options.replicas == 1,
        ..Default::default()
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

/// Creates the stream, or checks that the existing one has the same subjects and updates
/// the limits the config sets.
async fn ensure_stream(
    jetstream: &JetStream,
    config: stream::Config,
) -> Result<stream::Stream, Setup> {
    match jetstream.get_stream(&config.name).await {
        Ok(existing) => {
            let current = existing.cached_info().config.clone();
            let mut want = current.subjects.clone();
            let mut have = config.subjects.clone();
            want.sort();
            have.sort();
            if want != have {
                return Err(Setup::Fatal(BusError::Storage(format!(
                    "the NATS stream `{}` exists with subjects {:?}, not {:?}: another \
                     deployment uses this `[bus] prefix`",
                    config.name, current.subjects, config.subjects
                ))));
            }
            let differs = current.num_replicas != config.num_replicas
                || current.max_age != config.max_age
                || current.max_bytes != config.max_bytes
                || current.duplicate_window != config.duplicate_window
                || current.allow_direct != config.allow_direct;
            if differs {
                jetstream.update_stream(&config).await.map_err(|error| {
                    Setup::Fatal(BusError::Storage(format!(
                        "cannot update the NATS stream `{}` to the configured replicas and \
                         limits: {error}",
                        config.name
                    )))
                })?;
            }
            jetstream
                .get_stream(&config.name)
                .await
                .map_err(|error| Setup::Unavailable(nats_error("opening the stream")(&error)))
        }
        Err(error) if is_not_found(&error) => jetstream
            .create_stream(config.clone())
            .await
            .map_err(|error| {
                Setup::Unavailable(BusError::Storage(format!(
                    "cannot create the NATS stream `{}` (is JetStream enabled, `nats-server \
                     -js`?): {error}",
                    config.name
                )))
            }),
        Err(error) => Err(Setup::Unavailable(BusError::Storage(format!(
            "cannot look up the NATS stream `{}` (is JetStream enabled, `nats-server -js`?): \
             {error}",
            config.name
        )))),
    }
}

fn is_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == ErrorCode::STREAM_NOT_FOUND
    )
}

/// Opens a KV bucket, creating its stream first when missing. The stream is made here
/// rather than by `create_key_value`, whose account query servers before 2.10 do not
/// answer in the form it expects; the config is the one a KV bucket has.
async fn ensure_bucket(
    jetstream: &JetStream,
    options: &NatsOptions,
    bucket: &str,
) -> Result<kv::Store, BusError> {
    ensure_bucket_with_age(jetstream, options, bucket, Duration::ZERO).await
}

/// [`ensure_bucket`] whose entries expire after `max_age` (zero: never).
async fn ensure_bucket_with_age(
    jetstream: &JetStream,
    options: &NatsOptions,
    bucket: &str,
    max_age: Duration,
) -> Result<kv::Store, BusError> {
    if let Ok(store) = jetstream.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        allow_rollup: true,
        deny_delete: true,
        // Reads go to the stream leader: a replica answering a direct get may be behind,
        // and a stale commit intent or KV revision would undo the checks of a commit.
        allow_direct: false,
        discard: DiscardPolicy::New,
        storage: StorageType::File,
        num_replicas: options.replicas,
        ..Default::default()
    };
    jetstream.create_stream(config).await.map_err(|error| {
        BusError::Storage(format!(
            "cannot create the NATS KV bucket `{bucket}`: {error}"
        ))
    })?;
    jetstream.get_key_value(bucket).await.map_err(|error| {
        BusError::Storage(format!(
            "cannot open the NATS KV bucket `{bucket}`: {error}"
        ))
    })
}

/// The subject of an event: `P.events.` and the type's words, each kept to the
/// characters subjects allow. Routing never reads it back (the envelope has the type).
fn event_subject(prefix: &str, ty: &str) -> String {
    let mut subject = format!("{prefix}.events");
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
fn message_id(event: &Event) -> String {
    let mut hash = Sha256::new();
    hash.update(event.source.as_bytes());
    hash.update([0]);
    hash.update(event.id.as_bytes());
    hex::encode(hash.finalize())
}

/// Encodes a plugin's KV key into the characters NATS keys allow: A-Z, a-z, 0-9, `_`,
/// `-` and `/` stand for themselves; every other byte is `=` and two hex digits. The
/// encoding keeps prefixes (a key's prefix encodes to a prefix of the key's encoding).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("={byte:02X}"));
        }
    }
    out
}

fn decode_key(encoded: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut input = encoded.bytes();
    while let Some(byte) = input.next() {
        if byte == b'=' {
            let high = char::from(input.next()?).to_digit(16)?;
            let low = char::from(input.next()?).to_digit(16)?;
            bytes.push(u8::try_from(high * 16 + low).ok()?);
        } else {
            bytes.push(byte);
        }
    }
    String::from_utf8(bytes).ok()
}

/// The attributes of an event, stored as one JSON line before the data bytes.
#[derive(Serialize, Deserialize)]
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

/// A message payload: the envelope's JSON (which never holds a raw newline), `\n`, then
/// the data bytes as they are.
fn encode_event(event: &Event) -> Bytes {
    let envelope = Envelope {
        id: event.id.clone(),
        source: event.source.clone(),
        ty: event.ty.clone(),
        subject: event.subject.clone(),
        time: event.time.clone(),
        datacontenttype: event.datacontenttype.clone(),
        dataschema: event.dataschema.clone(),
        extensions: event.extensions.clone(),
    };
    let mut payload = serde_json::to_vec(&envelope).unwrap_or_default();
    payload.push(b'\n');
    payload.extend_from_slice(&event.data);
    Bytes::from(payload)
}

fn decode_event(payload: &[u8]) -> Result<Event, BusError> {
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

fn micros(time: async_nats::datetime::DateTime) -> i64 {
    i64::try_from(time.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

fn header<T: std::str::FromStr>(headers: Option<&HeaderMap>, name: &str) -> Option<T> {
    headers?.get(name)?.as_str().parse().ok()
}

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

/// What a settlement with KV writes is about to commit; see the module docs.
#[derive(Serialize, Deserialize)]
struct Intent {
    writes: Vec<IntentWrite>,
    /// The emits, each as the event stream stores it, in base64.
    emits: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct IntentWrite {
    /// The encoded key.
    key: String,
    /// The value in base64; `None` deletes the key.
    value: Option<String>,
    /// The revision the key had when the attempt's reads were checked (0: no entry).
    expected: u64,
}

impl IntentWrite {
    /// Writes (or deletes) the key if it still has the expected revision; see
    /// [`put_expecting`].
    async fn apply(&self, store: &kv::Store) -> Result<Option<u64>, WriteError> {
        let value = self
            .value
            .as_deref()
            .map(|text| BASE64.decode(text))
            .transpose()
            .map_err(|error| {
                WriteError::Storage(BusError::Storage(format!(
                    "a commit intent is unreadable: {error}"
                )))
            })?;
        put_expecting(store, &self.key, value.map(Bytes::from), self.expected).await
    }
}

impl Intent {
    fn emits(&self) -> Result<Vec<Event>, BusError> {
        self.emits
            .iter()
            .map(|text| {
                let bytes = BASE64.decode(text).map_err(|error| {
                    BusError::Storage(format!("a commit intent is unreadable: {error}"))
                })?;
                decode_event(&bytes)
            })
            .collect()
    }
}

impl Shared {
    /// Whether stream reads may be direct gets (see `next_message`).
    fn direct(&self) -> bool {
        self.options.replicas == 1
    }

    async fn plugin_store(&self, plugin: &str) -> Result<kv::Store, BusError> {
        if let Some(store) = self
            .plugin_kv
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(plugin)
        {
            return Ok(store.clone());
        }
        let bucket = format!("{}-kv-{plugin}", self.options.prefix);
        let store = ensure_bucket(&self.jetstream, &self.options, &bucket).await?;
        self.plugin_kv
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(plugin.to_owned(), store.clone());
        Ok(store)
    }

    /// Refuses a message the server would not take (its `max_payload`, less room for
    /// headers), before anything is sent.
    fn check_size(&self, what: impl Fn() -> String, bytes: usize) -> Result<(), BusError> {
        let limit = self
            .client
            .server_info()
            .max_payload
            .saturating_sub(HEADER_ROOM);
        if bytes > limit {
            return Err(BusError::TooLarge {
                what: what(),
                bytes,
                limit,
            });
        }
        Ok(())
    }

    /// Publishes events, all before awaiting any acknowledgement; none when one of them
    /// is too large.
    async fn publish_events(&self, events: &[Event]) -> Result<Vec<Appended>, BusError> {
        let payloads: Vec<Bytes> = events.iter().map(encode_event).collect();
        for (event, payload) in events.iter().zip(&payloads) {
            self.check_size(|| format!("event `{}`", event.id), payload.len())?;
        }
        let mut pending = Vec::with_capacity(events.len());
        for (event, payload) in events.iter().zip(payloads) {
            let publish = PublishMessage::build()
                .payload(payload)
                .message_id(message_id(event));
            pending.push(
                self.jetstream
                    .send_publish(event_subject(&self.options.prefix, &event.ty), publish)
                    .await
                    .map_err(storage!("publishing an event"))?,
            );
        }
        let mut appended = Vec::with_capacity(pending.len());
        for ack in pending {
            let ack = ack.await.map_err(storage!("storing an event"))?;
            appended.push(Appended {
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            });
        }
        Ok(appended)
    }

    fn journal_key(plugin: &str, sequence: u64) -> String {
        format!("{plugin}.{sequence}")
    }

    /// The errors of a delivery's earlier attempts (none recorded: a first attempt, or
    /// one whose host died before settling it).
    async fn attempt_errors(
        &self,
        plugin: &str,
        sequence: u64,
    ) -> Result<Vec<AttemptError>, BusError> {
        let recorded = self
            .attempts
            .get(Self::journal_key(plugin, sequence))
            .await
            .map_err(storage!("reading the errors of earlier attempts"))?;
        Ok(recorded
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default())
    }

    /// Commits an attempt's effects (see the module docs). Returns once the writes and
    /// emits are stored; the caller acknowledges.
    async fn commit_effects(
        &self,
        plugin: &str,
        sequence: u64,
        effects: Effects,
    ) -> Result<(), BusError> {
        if effects.kv_writes.is_empty() {
            // Nothing to make atomic: the reads are checked, and the emits' ids make a
            // repeat harmless.
            self.check_reads(plugin, &effects.kv_reads).await?;
            self.publish_events(&effects.emits).await?;
            return Ok(());
        }
        let journal = Self::journal_key(plugin, sequence);
        let lock = self.lock(plugin, &journal).await?;
        let committed = self.commit_locked(plugin, sequence, effects).await;
        // A storage failure may leave the intent half applied: the lock stays taken so
        // that no other commit overtakes it. The retry of this settlement takes it again
        // (same host, same intent); if none comes, the lease runs out and the next commit
        // of the plugin finishes the intent first.
        if !matches!(committed, Err(BusError::Storage(_))) {
            self.unlock(plugin, lock).await;
        }
        committed
    }

    /// Checks that what an attempt read is still committed; returns the revision and
    /// value of each key it read.
    async fn check_reads(
        &self,
        plugin: &str,
        reads: &[KvRead],
    ) -> Result<HashMap<String, (u64, Option<Bytes>)>, BusError> {
        let store = self.plugin_store(plugin).await?;
        let mut revisions: HashMap<String, (u64, Option<Bytes>)> = HashMap::new();
        for read in reads {
            match read {
                KvRead::Value { key, digest } => {
                    let encoded = encode_key(key);
                    let (revision, value) = current(&store, &encoded).await?;
                    if value.as_deref().map(value_digest) != *digest {
                        return Err(BusError::Conflict(key.clone()));
                    }
                    revisions.insert(encoded, (revision, value));
                }
                KvRead::Keys { prefix, digest } => {
                    let keys = list_keys(&store, prefix).await?;
                    if keys_digest(keys.iter().map(String::as_str)) != *digest {
                        return Err(BusError::Conflict(format!("{prefix}*")));
                    }
                }
            }
        }
        Ok(revisions)
    }

    /// Commits effects with KV writes, under the plugin's commit lock.
    async fn commit_locked(
        &self,
        plugin: &str,
        sequence: u64,
        effects: Effects,
    ) -> Result<(), BusError> {
        // An intent already written for this delivery (an earlier try of this settlement
        // failed part way, or another host ran the event too) is the commit: finish it.
        // Checking the reads first would report the intent's own writes as a conflict.
        let journal = Self::journal_key(plugin, sequence);
        if self.finish_intent(plugin, &journal).await? {
            return Ok(());
        }
        let store = self.plugin_store(plugin).await?;
        let mut revisions = self.check_reads(plugin, &effects.kv_reads).await?;
        // The last write to each key wins.
        let mut last: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for write in effects.kv_writes {
            last.insert(encode_key(&write.key), write.value);
        }
        let mut writes = Vec::with_capacity(last.len());
        let mut before = HashMap::new();
        for (key, value) in last {
            let (expected, old) = match revisions.remove(&key) {
                Some(seen) => seen,
                None => current(&store, &key).await?,
            };
            before.insert(key.clone(), old);
            writes.push(IntentWrite {
                key,
                value: value.map(|bytes| BASE64.encode(bytes)),
                expected,
            });
        }
        let intent = Intent {
            writes,
            emits: effects
                .emits
                .iter()
                .map(|event| BASE64.encode(encode_event(event)))
                .collect(),
        };
        let body = serde_json::to_vec(&intent).unwrap_or_default();
        self.check_size(
            || "the attempt's effects (KV writes and emits)".to_owned(),
            body.len(),
        )?;
        let intent_revision = match self.intents.create(&journal, Bytes::from(body)).await {
            Ok(revision) => revision,
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                // An earlier try of this settlement (or another host holding this
                // delivery) wrote its intent: finish that one rather than commit twice.
                return if self.finish_intent(plugin, &journal).await? {
                    Ok(())
                } else {
                    Err(BusError::Conflict(journal))
                };
            }
            Err(error) => return Err(nats_error("writing the commit intent")(&error)),
        };
        let mut applied: Vec<(String, u64)> = Vec::new();
        for write in &intent.writes {
            match write.apply(&store).await {
                Ok(Some(revision)) => applied.push((write.key.clone(), revision)),
                Ok(None) => {}
                Err(WriteError::Conflict) => {
                    // Another call of this plugin committed to this key since the reads
                    // were checked: withdraw the intent, undo what this commit applied,
                    // then report it. A host that claimed the intent first is finishing
                    // it; then it stands and nothing is undone.
                    if let Err(error) = self
                        .intents
                        .purge_expect_revision(&journal, Some(intent_revision))
                        .await
                    {
                        if error.kind() == kv::UpdateErrorKind::WrongLastRevision {
                            return Ok(());
                        }
                        return Err(nats_error("withdrawing a commit intent")(&error));
                    }
                    for (key, revision) in applied.iter().rev() {
                        let old = before.get(key).cloned().flatten();
                        if let Err(error) = put_expecting(&store, key, old, *revision).await {
                            tracing::warn!(%plugin, key = %key, ?error, "cannot undo a KV write after a conflict");
                        }
                    }
                    return Err(BusError::Conflict(
                        decode_key(&write.key).unwrap_or_else(|| write.key.clone()),
                    ));
                }
                Err(WriteError::Storage(error)) => return Err(error),
            }
        }
        self.publish_events(&intent.emits()?).await?;
        Ok(())
    }

    /// Takes the plugin's commit lock for the intent `journal`, waiting while another
    /// host holds a live lease. A lease that ran out belonged to a host that died (or
    /// stalled) mid-commit: its intent is finished first, which is exact because no
    /// other commit of the plugin could write in between. Returns the lock's revision.
    async fn lock(&self, plugin: &str, journal: &str) -> Result<u64, BusError> {
        let key = format!("{plugin}.lock");
        let lease = i64::try_from(self.options.ack_wait.as_millis()).unwrap_or(i64::MAX);
        let patience = (self.options.ack_wait * 3).max(LOCK_PATIENCE);
        let deadline = tokio::time::Instant::now() + patience;
        let mut wait = Duration::from_millis(1);
        loop {
            let entry = self
                .intents
                .entry(&key)
                .await
                .map_err(storage!("reading the commit lock"))?;
            let (revision, holder) = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => (
                    entry.revision,
                    serde_json::from_slice::<LockRecord>(&entry.value).ok(),
                ),
                Some(entry) => (entry.revision, None),
                None => (0, None),
            };
            let free = holder.as_ref().is_none_or(|held| {
                held.until_ms < now_ms() || (held.owner == self.owner && held.intent == journal)
            });
            if free {
                // A lease that ran out names an intent its holder may have left half
                // applied: finish it before any other commit of the plugin can write.
                if let Some(dead) = holder.as_ref().filter(|held| held.intent != journal) {
                    self.finish_intent(plugin, &dead.intent).await?;
                }
                let record = LockRecord {
                    owner: self.owner.clone(),
                    until_ms: now_ms().saturating_add(lease),
                    intent: journal.to_owned(),
                };
                let body = Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
                match self.intents.update(&key, body, revision).await {
                    Ok(taken) => return Ok(taken),
                    Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                    Err(error) => return Err(nats_error("taking the commit lock")(&error)),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BusError::Storage(format!(
                    "the KV commit lock of plugin `{plugin}` stayed taken for {patience:?}"
                )));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
        }
    }

    async fn unlock(&self, plugin: &str, revision: u64) {
        let key = format!("{plugin}.lock");
        if let Err(error) = self
            .intents
            .delete_expect_revision(&key, Some(revision))
            .await
        {
            // The lease ran out and another host took the lock: nothing to release.
            tracing::debug!(%plugin, %error, "commit lock not released");
        }
    }

    /// Finishes an intent left behind: claims it (a new revision, so that the host that
    /// wrote it can no longer withdraw it), applies each write whose key still has the
    /// expected revision (a key that moved on was written by this intent already, or
    /// since), then publishes the emits. Returns `false` when there is no intent (none
    /// was written, or its host withdrew it).
    async fn finish_intent(&self, plugin: &str, journal: &str) -> Result<bool, BusError> {
        let entry = self
            .intents
            .entry(journal)
            .await
            .map_err(storage!("reading a commit intent"))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(false);
        };
        match self
            .intents
            .update(journal, entry.value.clone(), entry.revision)
            .await
        {
            Ok(_) => {}
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Withdrawn meanwhile, or claimed by another host finishing it too (which
                // is harmless: writes are conditional and emits deduplicated).
                let still_there = self
                    .intents
                    .get(journal)
                    .await
                    .map_err(storage!("reading a commit intent"))?
                    .is_some();
                if !still_there {
                    return Ok(false);
                }
            }
            Err(error) => return Err(nats_error("claiming a commit intent")(&error)),
        }
        let intent: Intent = serde_json::from_slice(&entry.value).map_err(|error| {
            BusError::Storage(format!(
                "the commit intent {journal} is unreadable: {error}"
            ))
        })?;
        let store = self.plugin_store(plugin).await?;
        for write in &intent.writes {
            match write.apply(&store).await {
                Ok(_) | Err(WriteError::Conflict) => {}
                Err(WriteError::Storage(error)) => return Err(error),
            }
        }
        self.publish_events(&intent.emits()?).await?;
        Ok(true)
    }

    /// Finishes, under the plugin's commit lock, the intent a delivery's earlier holder
    /// left; `false` when there is none.
    async fn finish_left_intent(&self, plugin: &str, sequence: u64) -> Result<bool, BusError> {
        let journal = Self::journal_key(plugin, sequence);
        let exists = self
            .intents
            .get(&journal)
            .await
            .map_err(storage!("reading a commit intent"))?
            .is_some();
        if !exists {
            return Ok(false);
        }
        let lock = self.lock(plugin, &journal).await?;
        let finished = self.finish_intent(plugin, &journal).await;
        if finished.is_ok() {
            self.unlock(plugin, lock).await;
        }
        finished
    }

    async fn forget_attempts(&self, plugin: &str, sequence: u64) {
        if let Err(error) = self
            .attempts
            .purge(Self::journal_key(plugin, sequence))
            .await
        {
            tracing::warn!(%plugin, sequence, %error, "cannot delete attempt errors");
        }
    }

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

/// A key's revision (0 when it never existed) and value (`None` when absent or deleted).
async fn current(store: &kv::Store, key: &str) -> Result<(u64, Option<Bytes>), BusError> {
    let entry = store.entry(key).await.map_err(storage!("reading KV"))?;
    Ok(match entry {
        Some(entry) if entry.operation == kv::Operation::Put => (entry.revision, Some(entry.value)),
        Some(entry) => (entry.revision, None),
        None => (0, None),
    })
}

async fn list_keys(store: &kv::Store, prefix: &str) -> Result<Vec<String>, BusError> {
    let encoded_prefix = encode_key(prefix);
    let mut keys = store.keys().await.map_err(storage!("listing KV keys"))?;
    let mut found = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(storage!("listing KV keys"))?;
        if key.starts_with(&encoded_prefix)
            && let Some(decoded) = decode_key(&key)
        {
            found.push(decoded);
        }
    }
    found.sort();
    Ok(found)
}

#[derive(Debug)]
enum WriteError {
    Conflict,
    Storage(BusError),
}

/// Writes (or deletes) a key if it still has the expected revision; returns the new
/// revision, or `None` when a delete found nothing to delete.
async fn put_expecting(
    store: &kv::Store,
    key: &str,
    value: Option<Bytes>,
    expected: u64,
) -> Result<Option<u64>, WriteError> {
    let result = match value {
        Some(value) => store.update(key, value, expected).await.map(Some),
        None if expected == 0 => return Ok(None),
        None => store
            .delete_expect_revision(key, Some(expected))
            .await
            .map(|()| None),
    };
    result.map_err(|error| match error.kind() {
        kv::UpdateErrorKind::WrongLastRevision => WriteError::Conflict,
        _ => WriteError::Storage(nats_error("writing KV")(&error)),
    })
}

#[async_trait]
impl KvSource for NatsBus {
    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let store = self.shared.plugin_store(plugin).await?;
        Ok(current(&store, &encode_key(key))
            .await?
            .1
            .map(|value| value.to_vec()))
    }

    async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        let store = self.shared.plugin_store(plugin).await?;
        Ok(list_keys(&store, prefix).await?)
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>, BusError> {
        self.shared.publish_events(&events).await
    }

    async fn read_log(&self, query: LogQuery) -> Result<LogPage, BusError> {
        let limit = query.limit.max(1);
        let filter = format!("{}.events.>", self.shared.options.prefix);
        let mut page = LogPage {
            events: Vec::new(),
            scanned_to: query.after,
        };
        // Bounded scan, as the embedded log's: at most this many messages per request.
        for _ in 0..limit.max(10_000) {
            let Some(message) = next_message(
                &self.shared.events,
                self.shared.direct(),
                &filter,
                page.scanned_to + 1,
            )
            .await?
            else {
                break;
            };
            page.scanned_to = message.sequence;
            let event = decode_event(&message.payload)?;
            let wanted = query.pattern.as_ref().is_none_or(|p| p.matches(&event.ty))
                && query
                    .subject
                    .as_ref()
                    .is_none_or(|s| event.subject.as_ref() == Some(s));
            if wanted {
                page.events.push(StoredEvent {
                    sequence: message.sequence,
                    ingested_at_us: micros(message.time),
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

    async fn consumer(
        &self,
        plugin: &str,
        spec: ConsumerSpec,
    ) -> Result<Arc<dyn Consumer>, BusError> {
        let name = format!("{}-{plugin}", self.shared.options.prefix);
        let max_ack_pending = if spec.one_at_a_time {
            1
        } else {
            i64::try_from(spec.window.saturating_mul(16)).unwrap_or(i64::MAX)
        };
        let existing: Option<PullConsumer> = self.shared.events.get_consumer(&name).await.ok();
        let deliver_policy = match (&existing, spec.start) {
            (Some(consumer), _) => consumer.cached_info().config.deliver_policy,
            (None, StartPosition::Latest) => DeliverPolicy::New,
            (None, StartPosition::Earliest) => DeliverPolicy::All,
        };
        let config = pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.shared.options.ack_wait,
            max_deliver: -1,
            max_ack_pending,
            num_replicas: 0,
            ..Default::default()
        };
        let consumer = match existing {
            Some(consumer)
                if consumer.cached_info().config.max_ack_pending == max_ack_pending
                    && consumer.cached_info().config.ack_wait == self.shared.options.ack_wait =>
            {
                consumer
            }
            _ => self
                .shared
                .events
                .create_consumer(config)
                .await
                .map_err(storage!("creating the plugin's consumer"))?,
        };
        let outstanding: Arc<Mutex<HashMap<u64, Message>>> = Arc::default();
        let keep_alive = tokio::spawn(keep_alive(
            Arc::downgrade(&outstanding),
            self.shared.options.ack_wait / 3,
        ));
        Ok(Arc::new(NatsConsumer {
            shared: Arc::clone(&self.shared),
            plugin: plugin.to_owned(),
            patterns: spec.patterns,
            window: spec.window.max(1),
            one_at_a_time: spec.one_at_a_time,
            consumer,
            outstanding,
            room: tokio::sync::Notify::new(),
            keep_alive,
        }))
    }

    async fn consumer_stats(&self, plugin: &str) -> Result<ConsumerStats, BusError> {
        let name = format!("{}-{plugin}", self.shared.options.prefix);
        let mut consumer: PullConsumer = self
            .shared
            .events
            .get_consumer(&name)
            .await
            .map_err(|_| BusError::NotFound(format!("consumer of plugin `{plugin}`")))?;
        let info = consumer
            .info()
            .await
            .map_err(storage!("reading the consumer's state"))?
            .clone();
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
        Ok(ConsumerStats {
            cursor: info.ack_floor.stream_sequence,
            lag: info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(0),
            pending_retries: u64::try_from(info.num_redelivered).unwrap_or(0),
            dead_letters,
        })
    }

    async fn close(&self) -> Result<(), BusError> {
        self.shared
            .client
            .flush()
            .await
            .map_err(storage!("flushing to the server"))
    }
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
        while found.len() < query.limit.max(1) {
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
            found.push(to_dead_letter(message.sequence, &message.payload)?);
        }
        Ok(found)
    }

    async fn dead_letter(&self, id: u64) -> Result<DeadLetter, BusError> {
        self.shared.dead_letter_record(id).await
    }

    async fn replay_dead_letters(
        &self,
        id: Option<u64>,
        plugin: Option<&str>,
    ) -> Result<u64, BusError> {
        let letters = match id {
            Some(id) => vec![self.shared.dead_letter_record(id).await?],
            None => {
                let mut all = Vec::new();
                let mut after = 0;
                loop {
                    let page = self
                        .dead_letters(DeadLetterQuery {
                            plugin: plugin.map(str::to_owned),
                            after,
                            limit: 1000,
                        })
                        .await?;
                    let Some(last) = page.last() else { break };
                    after = last.id;
                    all.extend(page);
                }
                all
            }
        };
        let mut replayed = 0;
        for letter in letters {
            let subject = format!("{}.replay.{}", self.shared.options.prefix, letter.plugin);
            let publish = PublishMessage::build()
                .payload(encode_event(&letter.stored.event))
                .message_id(format!("replay-{}", letter.id))
                .header(REPLAY_OF, letter.stored.sequence.to_string())
                .header(INGESTED_AT, letter.stored.ingested_at_us.to_string());
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

/// Tells the server, every `every`, that the deliveries a host holds are still being
/// worked on, so none goes to another host while this one lives.
async fn keep_alive(outstanding: std::sync::Weak<Mutex<HashMap<u64, Message>>>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(outstanding) = outstanding.upgrade() else {
            return;
        };
        let held: Vec<Message> = outstanding
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

/// Longest a pull that should answer at once may take.
const PULL_TIMEOUT: Duration = Duration::from_millis(1500);
/// Longest `next` waits for settlements to free a quarter of the window before it pulls what
/// room there is (or returns empty when there is none).
const FULL_WINDOW_WAIT: Duration = Duration::from_millis(250);

/// Collects the messages of one pull request into `into`, logging a failed pull (the
/// caller tries again; the client reconnects by itself).
async fn collect<E: Display, F>(request: F, into: &mut Vec<Message>)
where
    F: std::future::Future<Output = Result<pull::Batch, E>>,
{
    let mut batch = match request.await {
        Ok(batch) => batch,
        Err(error) => {
            tracing::debug!(%error, "pull request failed");
            return;
        }
    };
    loop {
        // The server sends what it has in one go; one that stopped at the consumer's
        // `max_ack_pending` sends no end-of-batch status, so a pause also ends the pull.
        let next = if into.is_empty() {
            batch.next().await
        } else {
            match tokio::time::timeout(Duration::from_millis(20), batch.next()).await {
                Ok(next) => next,
                Err(_) => return,
            }
        };
        match next {
            Some(Ok(message)) => into.push(message),
            Some(Err(error)) => {
                tracing::debug!(%error, "pull ended with an error");
                return;
            }
            None => return,
        }
    }
}

/// One plugin's consumer on one host.
struct NatsConsumer {
    shared: Arc<Shared>,
    plugin: String,
    patterns: Vec<Pattern>,
    window: usize,
    one_at_a_time: bool,
    consumer: PullConsumer,
    /// Deliveries handed out and not yet settled, by log position.
    outstanding: Arc<Mutex<HashMap<u64, Message>>>,
    /// Signalled when a settlement frees room in the window.
    room: tokio::sync::Notify,
    keep_alive: tokio::task::JoinHandle<()>,
}

impl Drop for NatsConsumer {
    fn drop(&mut self) {
        self.keep_alive.abort();
        // Deliveries fetched but never settled (the dispatcher stopped for a reload or a
        // shutdown before running them) go back at once rather than after `ack_wait`.
        let unsettled: Vec<Message> = self.held().drain().map(|(_, message)| message).collect();
        if !unsettled.is_empty()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                for message in unsettled {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
            });
        }
    }
}

impl NatsConsumer {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Message>> {
        self.outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn pull(&self, max: usize) -> Result<Vec<Message>, BusError> {
        // Take what is there at once; only when nothing is, wait (briefly) for one. Each
        // pull is bounded in time as well: a server at the consumer's `max_ack_pending`
        // may leave a no-wait pull unanswered.
        let mut messages = Vec::new();
        let fetch = self.consumer.fetch().max_messages(max).messages();
        let _ = tokio::time::timeout(PULL_TIMEOUT, collect(fetch, &mut messages)).await;
        if messages.is_empty() {
            let wait = self
                .consumer
                .batch()
                .max_messages(1)
                .expires(Duration::from_secs(1))
                .messages();
            let _ = tokio::time::timeout(PULL_TIMEOUT * 2, collect(wait, &mut messages)).await;
        }
        Ok(messages)
    }

    /// Turns a message into a delivery for this plugin, or settles it at once when it is
    /// not one (another plugin's replay, a type the plugin does not receive, an intent to
    /// finish, an event no host manages to settle).
    async fn accept(&self, message: Message) -> Result<Option<Delivery>, BusError> {
        let (stream_sequence, delivered, published) = {
            let info = message
                .info()
                .map_err(|error| nats_error("reading delivery metadata")(&*error))?;
            (info.stream_sequence, info.delivered, micros(info.published))
        };
        let replay_prefix = format!("{}.replay.", self.shared.options.prefix);
        let (sequence, ingested_at_us, replayed) =
            match message.subject.as_str().strip_prefix(&replay_prefix) {
                Some(target) if target != self.plugin => {
                    let _ = message.ack().await;
                    return Ok(None);
                }
                Some(_) => (
                    header(message.headers.as_ref(), REPLAY_OF).unwrap_or(stream_sequence),
                    header(message.headers.as_ref(), INGESTED_AT).unwrap_or(published),
                    true,
                ),
                None => (stream_sequence, published, false),
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
            let _ = message.ack().await;
            return Ok(None);
        }
        let stored = StoredEvent {
            sequence,
            ingested_at_us,
            event,
        };
        if delivered > 1
            && self
                .shared
                .finish_left_intent(&self.plugin, sequence)
                .await?
        {
            message
                .double_ack()
                .await
                .map_err(storage!("acknowledging a finished commit"))?;
            return Ok(None);
        }
        let errors = if delivered > 1 {
            self.shared.attempt_errors(&self.plugin, sequence).await?
        } else {
            Vec::new()
        };
        let unsettled = delivered - i64::try_from(errors.len()).unwrap_or(0);
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
        self.held().insert(sequence, message);
        Ok(Some(Delivery {
            stored,
            attempt,
            errors,
        }))
    }

    async fn dead_letter(
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

#[async_trait]
impl Consumer for NatsConsumer {
    async fn next(&self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let cap = if self.one_at_a_time { 1 } else { max.max(1) };
        let room = || self.window.saturating_sub(self.held().len()).min(cap);
        // Every pull is a round trip to the server: with the window nearly full, wait
        // until a quarter of it is free (or a while) rather than pull one message at a
        // time. A settlement between the check and the wait leaves a permit, so none is
        // missed.
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
        let mut deliveries = Vec::new();
        for message in self.pull(room).await? {
            if let Some(delivery) = self.accept(message).await? {
                deliveries.push(delivery);
            }
        }
        Ok(deliveries)
    }

    async fn settle(&self, delivery: &Delivery, settlement: Settlement) -> Result<(), BusError> {
        let sequence = delivery.stored.sequence;
        let Some(message) = self.held().get(&sequence).cloned() else {
            // Settled already (a retried settlement whose first try got through).
            return Ok(());
        };
        match settlement {
            Settlement::Ack(effects) => {
                self.shared
                    .commit_effects(&self.plugin, sequence, effects)
                    .await?;
                // Not waiting for the server's word on the acknowledgement: one that
                // gets lost means a redelivery, which finds the commit record (KV
                // writes) or repeats emits that `Nats-Msg-Id` drops.
                if let Err(error) = message.ack().await {
                    tracing::warn!(plugin = %self.plugin, sequence, %error, "cannot acknowledge a committed delivery; it will be redelivered and recognised");
                    self.held().remove(&sequence);
                    self.room.notify_one();
                    return Ok(());
                }
                if delivery.attempt > 1 {
                    self.shared.forget_attempts(&self.plugin, sequence).await;
                }
            }
            Settlement::Retry { delay, errors } => {
                let body = serde_json::to_vec(&errors).unwrap_or_default();
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
                self.dead_letter(&message, &delivery.stored, reason, errors)
                    .await?;
            }
        }
        self.held().remove(&sequence);
        self.room.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_keep_prefixes() {
        for key in ["plain", "a.b c/é=", "count/x", "=", "ü"] {
            let encoded = encode_key(key);
            assert!(
                encoded
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-/=".contains(&b)),
                "{encoded}"
            );
            assert_eq!(decode_key(&encoded).as_deref(), Some(key));
        }
        assert!(encode_key("a.b c").starts_with(&encode_key("a.b")));
    }

    #[test]
    fn subjects_are_valid_whatever_the_type() {
        assert_eq!(
            event_subject("sy", "payment.completed"),
            "sy.events.payment.completed"
        );
        assert_eq!(event_subject("sy", "a..b*>"), "sy.events.a._.b__");
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
