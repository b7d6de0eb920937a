//! Plugin KV: the vocabulary every layer shares about a plugin's key-value store.
//!
//! Each plugin owns one store, named after the plugin, so a new version of it keeps its
//! state. The runtime buffers a call's writes ([`KvWrite`]) and fingerprints what the call
//! read of the committed state ([`KvRead`]); the bus commits the writes with the
//! acknowledgement only if those reads still hold (optimistic concurrency), and serves
//! committed reads through [`KvSource`].
//!
//! Invariant: a [`KvSource`] sees only committed state; a call's own buffered writes are
//! layered over it by the runtime, never stored by the source.

use async_trait::async_trait;

use crate::stream::StreamPage;

/// Why committed KV state could not be read. The cause is the bus's error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct KvError(Box<dyn std::error::Error + Send + Sync>);

impl KvError {
    /// An error with this cause.
    pub fn new(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(cause.into())
    }
}

/// A fingerprint of committed KV state that one call observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvRead {
    /// `kv-get` of `key` saw a value with this SHA-256 digest, or no value.
    Value {
        /// The key.
        key: String,
        /// Digest of the value seen, `None` when the key was absent.
        digest: Option<[u8; 32]>,
    },
    /// `kv-keys` of `prefix` saw a key list with this SHA-256 digest.
    Keys {
        /// The prefix.
        prefix: String,
        /// Digest of the keys seen, in order, each followed by a NUL byte.
        digest: [u8; 32],
    },
}

/// SHA-256 of a KV value, as [`KvRead::Value`] records it.
pub fn value_digest(value: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(value).into()
}

/// SHA-256 of a key list, as [`KvRead::Keys`] records it.
pub fn keys_digest<'a>(keys: impl IntoIterator<Item = &'a str>) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for key in keys {
        hasher.update(key.as_bytes());
        hasher.update([0u8]);
    }
    hasher.finalize().into()
}

/// One buffered write to a plugin's KV store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvWrite {
    /// The key.
    pub key: String,
    /// The new value, or `None` to delete the key.
    pub value: Option<Vec<u8>>,
}

/// Committed KV state of plugins, as the bus stores it.
#[async_trait]
pub trait KvSource: Send + Sync {
    /// Reads one key of one plugin's store.
    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Lists one plugin's keys that start with `prefix`, in ascending order.
    async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, KvError>;

    /// Reads up to `limit` events of `subject`'s stream after version `after`, with the
    /// stream's current version. Streams are shared by every plugin.
    async fn read_stream(
        &self,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<StreamPage, KvError>;

    /// Whether a scheduled event with this id is pending (see [`crate::schedule`]).
    async fn scheduled(&self, id: &str) -> Result<bool, KvError>;
}

/// A KV source holding one plugin's values in memory, whatever the plugin's name, and no
/// streams or scheduled events: the store of a call made outside a host
/// (`switchyard invoke`).
#[derive(Debug, Default, Clone)]
pub struct MemoryKv {
    values: std::collections::BTreeMap<String, Vec<u8>>,
}

impl MemoryKv {
    /// A store holding `values`.
    pub fn new(values: std::collections::BTreeMap<String, Vec<u8>>) -> Self {
        Self { values }
    }
}

#[async_trait]
impl KvSource for MemoryKv {
    async fn get(&self, _plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.values.get(key).cloned())
    }

    async fn keys(&self, _plugin: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        Ok(self
            .values
            .range(prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, _)| key.clone())
            .collect())
    }

    async fn read_stream(&self, _: &str, _: u64, _: usize) -> Result<StreamPage, KvError> {
        Ok(StreamPage::default())
    }

    async fn scheduled(&self, _id: &str) -> Result<bool, KvError> {
        Ok(false)
    }
}

/// A KV source with nothing in it, for invocations that have no store behind them.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmptyKv;

#[async_trait]
impl KvSource for EmptyKv {
    async fn get(&self, _plugin: &str, _key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(None)
    }

    async fn keys(&self, _plugin: &str, _prefix: &str) -> Result<Vec<String>, KvError> {
        Ok(Vec::new())
    }

    async fn read_stream(&self, _: &str, _: u64, _: usize) -> Result<StreamPage, KvError> {
        Ok(StreamPage::default())
    }

    async fn scheduled(&self, _id: &str) -> Result<bool, KvError> {
        Ok(false)
    }
}
