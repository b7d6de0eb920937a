//! Plugin KV reads on the embedded bus, from the `kv` table through the read pool.
//!
//! They see only committed rows: KV is written by the writer alone, in the transaction of
//! the acknowledgement that carries the writes, so an attempt never reads another's
//! uncommitted effects.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::SqliteBus;
use crate::kv::{KvError, KvSource};

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
}
