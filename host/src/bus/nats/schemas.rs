//! Schemas, settlement notices and per-type reads on NATS.
//!
//! - Schemas live in the KV bucket `P-schemas`, one key per event type (encoded as plugin
//!   keys are) whose value is every version of it as a JSON array. A new version is a
//!   compare-and-set on that key's revision, so hosts registering at once cannot both
//!   take the same number; every host follows the bucket with a watch.
//! - Notices are core NATS messages on `P.notices.<key>`, the key a hash of the event's
//!   `(source, id)`: a waiter subscribes before its event is appended, on the connection
//!   that then appends it, so the server knows the subscription before any host can
//!   settle the event. The stream `P-notices` keeps them for the bus's
//!   `duplicate_window` (at most 256 an event), where a resend with `?wait=` reads them.
//!   Only events a producer waited for have notices, so the stream costs nothing to the
//!   others.
//! - The most recent events of a type are read backwards in windows of the stream, each
//!   window read forward on the type's own subject.

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use super::kv::{compare_and_set, decode_key, encode_key, key_changes};
use super::messages::{decode_event, event_subject, micros};
use super::setup::ensure_bucket;
use super::{NatsBus, Shared, nats_error};
use crate::bus::{BusError, Notice, Notices, SchemaStore, StoredEvent, StoredSchema, notice_key};
use crate::clock::now_ms;

/// Most notices kept of one event (a notice per plugin and attempt).
pub(super) const MAX_NOTICES_PER_EVENT: usize = 256;

/// Notices waiting for the publisher task.
pub(super) const NOTICE_QUEUE: usize = 4096;

/// Publishes the notices `notify` queues, on the host's connection, until the bus is
/// dropped.
pub(super) async fn publish_notices(
    client: async_nats::Client,
    mut queue: tokio::sync::mpsc::Receiver<(String, Bytes)>,
) {
    while let Some((subject, payload)) = queue.recv().await {
        if let Err(error) = client.publish(subject, payload).await {
            tracing::debug!(%error, "cannot publish a settlement notice");
        }
    }
}

impl Shared {
    async fn schema_store(&self) -> Result<&kv::Store, BusError> {
        self.schemas
            .get_or_try_init(|| async {
                let bucket = format!("{}-schemas", self.options.prefix);
                ensure_bucket(&self.jetstream, &self.options, &bucket).await
            })
            .await
    }

    fn notice_subject(&self, source: &str, id: &str) -> String {
        format!("{}.notices.{}", self.options.prefix, notice_key(source, id))
    }
}

/// The versions stored under one type's key, and the key's revision (0: no key).
async fn versions(
    store: &kv::Store,
    event_type: &str,
) -> Result<(Vec<StoredSchema>, u64), BusError> {
    let Some(entry) = store
        .entry(encode_key(event_type))
        .await
        .map_err(storage!("reading a schema"))?
    else {
        return Ok((Vec::new(), 0));
    };
    if entry.operation != kv::Operation::Put || entry.value.is_empty() {
        return Ok((Vec::new(), entry.revision));
    }
    let versions = serde_json::from_slice(&entry.value).map_err(|error| {
        BusError::Storage(format!(
            "the schemas of `{event_type}` cannot be read: {error}"
        ))
    })?;
    Ok((versions, entry.revision))
}

#[async_trait]
impl SchemaStore for NatsBus {
    async fn put_schema(
        &self,
        event_type: &str,
        latest: u32,
        schema: String,
    ) -> Result<StoredSchema, BusError> {
        let store = self.shared.schema_store().await?;
        let (mut stored, revision) = versions(store, event_type).await?;
        let current = stored.last().map_or(0, |s| s.version);
        let conflict = || {
            BusError::Conflict(format!(
                "schema of `{event_type}` (now at version {current})"
            ))
        };
        if current != latest {
            return Err(conflict());
        }
        let new = StoredSchema {
            event_type: event_type.to_owned(),
            version: latest + 1,
            schema,
            registered_at_ms: now_ms(),
        };
        stored.push(new.clone());
        let value =
            Bytes::from(serde_json::to_vec(&stored).map_err(|e| BusError::Storage(e.to_string()))?);
        self.shared
            .check_size(|| format!("the schemas of `{event_type}`"), value.len())?;
        compare_and_set(
            store,
            &encode_key(event_type),
            value,
            revision,
            "storing a schema",
            conflict,
        )
        .await?;
        Ok(new)
    }

    async fn schema_versions(&self, event_type: &str) -> Result<Vec<StoredSchema>, BusError> {
        let store = self.shared.schema_store().await?;
        Ok(versions(store, event_type).await?.0)
    }

    async fn latest_schemas(&self) -> Result<Vec<StoredSchema>, BusError> {
        let store = self.shared.schema_store().await?;
        let mut keys = match store.keys().await {
            Ok(keys) => keys.boxed(),
            Err(error) => return Err(nats_error("listing schemas")(&error)),
        };
        let mut types = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(storage!("listing schemas"))?;
            if let Some(event_type) = decode_key(&key) {
                types.push(event_type);
            }
        }
        types.sort();
        let mut latest = Vec::with_capacity(types.len());
        for event_type in types {
            if let Some(last) = versions(store, &event_type).await?.0.pop() {
                latest.push(last);
            }
        }
        Ok(latest)
    }

    async fn schema_changes(&self) -> Result<BoxStream<'static, String>, BusError> {
        key_changes(self.shared.schema_store().await?, "watching schemas").await
    }
}

#[async_trait]
impl Notices for NatsBus {
    fn notify(&self, source: &str, id: &str, make: &dyn Fn() -> Notice) {
        let subject = self.shared.notice_subject(source, id);
        let payload = match serde_json::to_vec(&make()) {
            Ok(payload) => Bytes::from(payload),
            Err(error) => {
                tracing::warn!(%error, "cannot encode a settlement notice");
                return;
            }
        };
        // The publisher task sends in order; a full queue (the connection is gone or
        // far behind) drops the notice, as a notice nobody hears would be.
        if self.shared.notices.try_send((subject, payload)).is_err() {
            tracing::debug!("the settlement notice queue is full; notice dropped");
        }
    }

    async fn listen(&self, source: &str, id: &str) -> Result<BoxStream<'static, Notice>, BusError> {
        let subscriber = self
            .shared
            .client
            .subscribe(self.shared.notice_subject(source, id))
            .await
            .map_err(storage!("listening for settlement notices"))?;
        Ok(subscriber
            .filter_map(|message| async move { serde_json::from_slice(&message.payload).ok() })
            .boxed())
    }

    async fn recorded(&self, source: &str, id: &str) -> Result<Vec<Notice>, BusError> {
        let shared = &self.shared;
        let subject = shared.notice_subject(source, id);
        let mut notices = Vec::new();
        shared
            .scan_subject(
                &shared.recorded_notices,
                &subject,
                MAX_NOTICES_PER_EVENT,
                |message| notices.extend(serde_json::from_slice(&message.payload).ok()),
            )
            .await?;
        Ok(notices)
    }
}

impl NatsBus {
    /// The most recent events of `event_type`, newest first: windows of the stream read
    /// backwards from the head, each forward on the type's subject, doubling in length.
    pub(super) async fn recent_of_type(
        &self,
        event_type: &str,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, BusError> {
        use crate::bus::Bus as _;
        // Events of the type without a subject, and in every subject's stream.
        let prefix = &self.shared.options.prefix;
        let subjects = [
            event_subject(prefix, event_type),
            event_subject(prefix, event_type).replacen(
                &format!("{prefix}.events."),
                &format!("{prefix}.streams.*."),
                1,
            ),
        ];
        let mut end = self.head().await?;
        let mut width = 1024u64;
        let mut newest_first = Vec::new();
        while newest_first.len() < limit && end > 0 {
            let start = end.saturating_sub(width) + 1;
            let mut window = Vec::new();
            for subject in &subjects {
                let mut from = start;
                'window: loop {
                    let messages = self
                        .shared
                        .messages_from(&self.shared.events, subject, from)
                        .await?;
                    if messages.is_empty() {
                        break;
                    }
                    for message in messages {
                        if message.sequence > end {
                            break 'window;
                        }
                        from = message.sequence + 1;
                        window.push(StoredEvent {
                            sequence: message.sequence,
                            ingested_at_us: micros(message.time),
                            event: decode_event(&message.payload)?,
                        });
                    }
                }
            }
            window.sort_by_key(|stored| stored.sequence);
            newest_first.extend(window.into_iter().rev());
            end = start - 1;
            width = width.saturating_mul(2);
        }
        newest_first.truncate(limit);
        Ok(newest_first)
    }
}
