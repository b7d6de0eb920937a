//! What a call reads on the embedded bus, through the read pool: plugin KV (the `kv`
//! table), subject streams (`streams`, `stream_events`) and pending schedules.
//!
//! They see only committed rows: all of it is written by the writer alone, in the
//! transaction of the acknowledgement that carries the writes, so an attempt never reads
//! another's uncommitted effects. A stream page and its version come from one snapshot.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::ops::{is_scheduled, stream_head};
use super::{SqliteBus, event_columns_of, row_to_stored, to_i64};
use crate::kv::{KvError, KvSource};
use crate::stream::StreamPage;

#[async_trait]
impl KvSource for SqliteBus {
    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let (plugin, key) = (plugin.to_owned(), key.to_owned());
        Ok(self
            .read(move |conn| {
                conn.prepare_cached("SELECT value FROM kv WHERE plugin = ?1 AND key = ?2")?
                    .query_row(params![plugin, key], |r| r.get(0))
                    .optional()
            })
            .await?)
    }

    async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        let (plugin, prefix) = (plugin.to_owned(), prefix.to_owned());
        Ok(self
            .read(move |conn| {
                let mut select = conn.prepare_cached(
                    "SELECT key FROM kv WHERE plugin = ?1 AND key >= ?2 ORDER BY key",
                )?;
                let mut rows = select.query(params![plugin, prefix])?;
                let mut keys = Vec::new();
                while let Some(row) = rows.next()? {
                    let key: String = row.get(0)?;
                    if !key.starts_with(&prefix) {
                        break;
                    }
                    keys.push(key);
                }
                Ok(keys)
            })
            .await?)
    }

    async fn read_stream(
        &self,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<StreamPage, KvError> {
        let subject = subject.to_owned();
        Ok(self
            .read(move |conn| {
                let snapshot = conn.unchecked_transaction()?;
                let version = stream_head(&snapshot, &subject)?;
                let events = if limit == 0 || after >= version {
                    Vec::new()
                } else {
                    let columns = event_columns_of("e");
                    snapshot
                        .prepare_cached(&format!(
                            "SELECT {columns} FROM stream_events s JOIN events e ON e.seq = s.seq
                             WHERE s.subject = ?1 AND s.version > ?2 ORDER BY s.version LIMIT ?3"
                        ))?
                        .query_map(
                            params![
                                subject,
                                to_i64(after),
                                i64::try_from(limit).unwrap_or(i64::MAX)
                            ],
                            row_to_stored,
                        )?
                        .map(|stored| stored.map(|s| s.event))
                        .collect::<rusqlite::Result<_>>()?
                };
                snapshot.finish()?;
                Ok(StreamPage { events, version })
            })
            .await?)
    }

    async fn scheduled(&self, id: &str) -> Result<bool, KvError> {
        let id = id.to_owned();
        Ok(self.read(move |conn| is_scheduled(conn, &id)).await?)
    }
}
