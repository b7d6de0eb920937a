//! The plugins' KV state: one bucket per plugin, `P-kv-<plugin>`, created when first
//! used and then kept open; the encoding of plugin keys into the characters NATS keys
//! allow; and the reads, for plugins ([`KvSource`]) and for the commit protocol's
//! checks. Every write goes through `commit.rs`.
//!
//! Invariants:
//! - The key encoding is reversible and keeps prefixes, so listing a prefix filters the
//!   encoded keys.
//! - Nothing is cached but the open bucket handles: every read asks the server.

use std::sync::{Arc, PoisonError};

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use super::setup::ensure_bucket;
use super::{NatsBus, Shared, compare_and_set_failed, nats_error};
use crate::bus::BusError;
use crate::kv::{KvError, KvSource};

/// Encodes a plugin's KV key into the characters NATS keys allow: A-Z, a-z, 0-9, `_`,
/// `-` and `/` stand for themselves; every other byte is `=` and two hex digits. The
/// encoding keeps prefixes (a key's prefix encodes to a prefix of the key's encoding).
pub(super) fn encode_key(key: &str) -> String {
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

pub(super) fn decode_key(encoded: &str) -> Option<String> {
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

impl Shared {
    /// The name of a plugin's KV bucket (its stream is `KV_` and this name).
    fn plugin_bucket(&self, plugin: &str) -> String {
        format!("{}-kv-{plugin}", self.options.prefix)
    }

    pub(super) async fn plugin_store(&self, plugin: &str) -> Result<Arc<kv::Store>, BusError> {
        if let Some(store) = self
            .plugin_kv
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(plugin)
        {
            return Ok(Arc::clone(store));
        }
        let bucket = self.plugin_bucket(plugin);
        let store = Arc::new(ensure_bucket(&self.jetstream, &self.options, &bucket).await?);
        self.plugin_kv
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(plugin.to_owned(), Arc::clone(&store));
        Ok(store)
    }

    /// Deletes a forgotten plugin's bucket (its KV and commit records), if it has one, and
    /// this host's handles on it.
    pub(super) async fn forget_bucket(&self, plugin: &str) -> Result<(), BusError> {
        let bucket = self.plugin_bucket(plugin);
        self.plugin_kv
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(plugin);
        self.committers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&bucket);
        let stream = format!("KV_{bucket}");
        match self.jetstream.get_stream(&stream).await {
            Err(error) if super::setup::is_not_found(&error) => Ok(()),
            Err(error) => Err(BusError::Storage(format!(
                "cannot look up the NATS stream `{stream}`: {error}"
            ))),
            Ok(_) => self
                .jetstream
                .delete_stream(&stream)
                .await
                .map(drop)
                .map_err(storage!("deleting the plugin's KV bucket")),
        }
    }

    /// A plugin's bucket to read, or `None` when it has none yet: a read makes no bucket
    /// (an admin reading the KV of a name no plugin ever had would otherwise leave one
    /// on the server for good).
    async fn existing_plugin_store(
        &self,
        plugin: &str,
    ) -> Result<Option<Arc<kv::Store>>, BusError> {
        let cached = self
            .plugin_kv
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(plugin)
            .cloned();
        if cached.is_some() {
            return Ok(cached);
        }
        let stream = format!("KV_{}", self.plugin_bucket(plugin));
        match self.jetstream.get_stream(&stream).await {
            Err(error) if super::setup::is_not_found(&error) => Ok(None),
            Err(error) => Err(BusError::Storage(format!(
                "cannot look up the NATS stream `{stream}`: {error}"
            ))),
            Ok(_) => self.plugin_store(plugin).await.map(Some),
        }
    }
}

/// A key's revision (0 when it never existed) and value (`None` when absent or deleted).
pub(super) async fn current(
    store: &kv::Store,
    key: &str,
) -> Result<(u64, Option<Bytes>), BusError> {
    let entry = store.entry(key).await.map_err(storage!("reading KV"))?;
    Ok(match entry {
        Some(entry) if entry.operation == kv::Operation::Put => (entry.revision, Some(entry.value)),
        Some(entry) => (entry.revision, None),
        None => (0, None),
    })
}

pub(super) async fn list_keys(store: &kv::Store, prefix: &str) -> Result<Vec<String>, BusError> {
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

/// Stores `value` under the (encoded) `key` if its revision is still `revision` (0: the
/// key must not exist yet), as the shared buckets (schemas, plugin controls) change;
/// `conflict()` when another writer came first.
pub(super) async fn compare_and_set(
    store: &kv::Store,
    key: &str,
    value: Bytes,
    revision: u64,
    what: &'static str,
    conflict: impl Fn() -> BusError,
) -> Result<u64, BusError> {
    if revision == 0 {
        store.create(key, value).await.map_err(|error| {
            if error.kind() == kv::CreateErrorKind::AlreadyExists || compare_and_set_failed(&error)
            {
                conflict()
            } else {
                nats_error(what)(&error)
            }
        })
    } else {
        store.update(key, value, revision).await.map_err(|error| {
            if compare_and_set_failed(&error) {
                conflict()
            } else {
                nats_error(what)(&error)
            }
        })
    }
}

/// The (decoded) keys of a shared bucket as they change, from now on; an empty name after
/// a broken watch says "read every key again".
pub(super) async fn key_changes(
    store: &kv::Store,
    what: &'static str,
) -> Result<futures_util::stream::BoxStream<'static, String>, BusError> {
    let watch = store.watch_all().await.map_err(storage!(what))?;
    Ok(watch
        .filter_map(move |entry| async move {
            match entry {
                Ok(entry) => decode_key(&entry.key),
                Err(error) => {
                    tracing::warn!(%error, "{what}");
                    Some(String::new())
                }
            }
        })
        .boxed())
}

#[async_trait]
impl KvSource for NatsBus {
    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let Some(store) = self.shared.existing_plugin_store(plugin).await? else {
            return Ok(None);
        };
        Ok(current(&store, &encode_key(key))
            .await?
            .1
            .map(|value| value.to_vec()))
    }

    async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        let Some(store) = self.shared.existing_plugin_store(plugin).await? else {
            return Ok(Vec::new());
        };
        Ok(list_keys(&store, prefix).await?)
    }

    async fn read_stream(
        &self,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<crate::stream::StreamPage, KvError> {
        Ok(self.shared.read_stream_page(subject, after, limit).await?)
    }

    async fn scheduled(&self, id: &str) -> Result<bool, KvError> {
        Ok(self.shared.is_scheduled(id).await?)
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
}
