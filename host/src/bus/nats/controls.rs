//! Plugin controls (pause and breaker) on NATS: the KV bucket `P-controls`, one key per
//! plugin (encoded as plugin keys are) holding its control as JSON. A change is a
//! compare-and-set on the key's revision, so of two hosts making the same transition
//! one wins; every host follows the bucket with a watch and obeys what it reads.

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;

use super::kv::{compare_and_set, encode_key, key_changes};
use super::setup::ensure_bucket;
use super::{NatsBus, Shared, nats_error};
use crate::bus::{BusError, ControlStore, PluginControl};

impl Shared {
    async fn control_store(&self) -> Result<&kv::Store, BusError> {
        self.controls
            .get_or_try_init(|| async {
                let bucket = format!("{}-controls", self.options.prefix);
                ensure_bucket(&self.jetstream, &self.options, &bucket).await
            })
            .await
    }
}

impl Shared {
    /// Puts a forgotten plugin's control back to running, one revision on (hosts that
    /// read the old revision take the new one).
    pub(super) async fn reset_control(&self, plugin: &str) -> Result<(), BusError> {
        let store = self.control_store().await?;
        let value = serde_json::to_vec(&PluginControl::default())
            .map_err(|e| BusError::Storage(e.to_string()))?;
        match store.entry(encode_key(plugin)).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => store
                .put(encode_key(plugin), Bytes::from(value))
                .await
                .map(drop)
                .map_err(storage!("resetting a plugin's control")),
            Err(error) => Err(nats_error("reading a plugin's control")(&error)),
        }
    }
}

#[async_trait]
impl ControlStore for NatsBus {
    async fn control(&self, plugin: &str) -> Result<(PluginControl, u64), BusError> {
        let store = self.shared.control_store().await?;
        let Some(entry) = store
            .entry(encode_key(plugin))
            .await
            .map_err(storage!("reading a plugin's control"))?
        else {
            return Ok((PluginControl::default(), 0));
        };
        if entry.operation != kv::Operation::Put || entry.value.is_empty() {
            return Ok((PluginControl::default(), entry.revision));
        }
        let control = serde_json::from_slice(&entry.value).map_err(|error| {
            BusError::Storage(format!(
                "the control of plugin `{plugin}` cannot be read: {error}"
            ))
        })?;
        Ok((control, entry.revision))
    }

    async fn put_control(
        &self,
        plugin: &str,
        control: &PluginControl,
        revision: u64,
    ) -> Result<u64, BusError> {
        let store = self.shared.control_store().await?;
        let value =
            Bytes::from(serde_json::to_vec(control).map_err(|e| BusError::Storage(e.to_string()))?);
        compare_and_set(
            store,
            &encode_key(plugin),
            value,
            revision,
            "storing a plugin's control",
            || BusError::Conflict(format!("the control of plugin `{plugin}`")),
        )
        .await
    }

    async fn control_changes(&self) -> Result<BoxStream<'static, String>, BusError> {
        key_changes(
            self.shared.control_store().await?,
            "watching plugin controls",
        )
        .await
    }
}
