//! Schemas and settlement notices on the embedded bus: versions in the `schemas` table
//! (a new one is a writer job, so it commits before it is answered), and notices within
//! the process, which is the only one on this log.

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use rusqlite::params;

use super::SqliteBus;
use super::writer::Job;
use crate::bus::{BusError, Notice, Notices, SchemaStore, StoredSchema};
use crate::clock::now_ms;

fn row_to_schema(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredSchema> {
    Ok(StoredSchema {
        event_type: row.get(0)?,
        version: u32::try_from(row.get::<_, i64>(1)?).unwrap_or(u32::MAX),
        schema: row.get(2)?,
        registered_at_ms: row.get(3)?,
    })
}

#[async_trait]
impl SchemaStore for SqliteBus {
    async fn put_schema(
        &self,
        event_type: &str,
        latest: u32,
        schema: String,
    ) -> Result<StoredSchema, BusError> {
        let registered_at_ms = now_ms();
        let version = self
            .submit(|reply| Job::PutSchema {
                event_type: event_type.to_owned(),
                latest,
                schema: schema.clone(),
                registered_at_ms,
                reply,
            })
            .await?;
        let _ = self.inner.schema_changes.send(event_type.to_owned());
        Ok(StoredSchema {
            event_type: event_type.to_owned(),
            version: u32::try_from(version).unwrap_or(u32::MAX),
            schema,
            registered_at_ms,
        })
    }

    async fn schema_versions(&self, event_type: &str) -> Result<Vec<StoredSchema>, BusError> {
        let event_type = event_type.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT event_type, version, schema, registered_at FROM schemas
                 WHERE event_type = ?1 ORDER BY version",
            )?
            .query_map(params![event_type], row_to_schema)?
            .collect()
        })
        .await
    }

    async fn latest_schemas(&self) -> Result<Vec<StoredSchema>, BusError> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT event_type, version, schema, registered_at FROM schemas AS s
                 WHERE version = (SELECT MAX(version) FROM schemas WHERE event_type = s.event_type)
                 ORDER BY event_type",
            )?
            .query_map([], row_to_schema)?
            .collect()
        })
        .await
    }

    async fn schema_changes(&self) -> Result<BoxStream<'static, String>, BusError> {
        Ok(super::change_stream(self.inner.schema_changes.subscribe()))
    }
}

#[async_trait]
impl Notices for SqliteBus {
    fn notify(&self, source: &str, id: &str, make: &dyn Fn() -> Notice) {
        self.inner.notices.notify(source, id, make);
    }

    async fn listen(&self, source: &str, id: &str) -> Result<BoxStream<'static, Notice>, BusError> {
        self.inner.notices.listen(source, id).await
    }

    async fn recorded(&self, source: &str, id: &str) -> Result<Vec<Notice>, BusError> {
        self.inner.notices.recorded(source, id).await
    }
}

/// The most recent events of one type, newest first.
pub(super) fn recent_events_sql() -> String {
    format!(
        "SELECT {} FROM events WHERE type = ?1 ORDER BY seq DESC LIMIT ?2",
        super::EVENT_COLUMNS
    )
}
