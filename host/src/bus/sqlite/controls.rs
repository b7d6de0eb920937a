//! Plugin controls (pause and breaker) on the embedded bus: rows of the `controls` table,
//! written by writer jobs (so a change commits before it is answered) and announced
//! within the process, which is the only one on this log.

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use rusqlite::OptionalExtension;

use super::SqliteBus;
use super::writer::Job;
use crate::bus::{BusError, ControlStore, PluginControl};

#[async_trait]
impl ControlStore for SqliteBus {
    async fn control(&self, plugin: &str) -> Result<(PluginControl, u64), BusError> {
        let name = plugin.to_owned();
        let row: Option<(String, i64)> = self
            .read(move |conn| {
                conn.prepare_cached("SELECT control, revision FROM controls WHERE plugin = ?1")?
                    .query_row([name], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .await?;
        let Some((control, revision)) = row else {
            return Ok((PluginControl::default(), 0));
        };
        let control = serde_json::from_str(&control).map_err(|error| {
            BusError::Storage(format!(
                "the control of plugin `{plugin}` cannot be read: {error}"
            ))
        })?;
        Ok((control, u64::try_from(revision).unwrap_or(0)))
    }

    async fn put_control(
        &self,
        plugin: &str,
        control: &PluginControl,
        revision: u64,
    ) -> Result<u64, BusError> {
        let text = serde_json::to_string(control).map_err(|e| BusError::Storage(e.to_string()))?;
        let revision = self
            .submit(|reply| Job::PutControl {
                plugin: plugin.to_owned(),
                control: text,
                revision,
                reply,
            })
            .await?;
        let _ = self.inner.control_changes.send(plugin.to_owned());
        Ok(revision)
    }

    async fn control_changes(&self) -> Result<BoxStream<'static, String>, BusError> {
        Ok(super::change_stream(self.inner.control_changes.subscribe()))
    }
}
