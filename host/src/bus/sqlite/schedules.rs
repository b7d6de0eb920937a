//! Scheduled events on the embedded bus: the `scheduled` table, read through the pool and
//! changed by the writer (a scheduled event is stored by its append or its plugin's
//! acknowledgement, moved into the log by [`Schedules::fire_due`], or cancelled).

use async_trait::async_trait;
use rusqlite::params;

use super::writer::Job;
use super::{SqliteBus, to_u64};
use crate::bus::{BusError, Fired, ScheduledEvent, ScheduledQuery, Schedules};
use crate::clock::now_ms;

#[async_trait]
impl Schedules for SqliteBus {
    async fn list_scheduled(&self, query: ScheduledQuery) -> Result<Vec<ScheduledEvent>, BusError> {
        self.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT due_at, scheduled_at, event FROM scheduled
                 WHERE (?1 IS NULL OR type = ?1) ORDER BY due_at, id LIMIT ?2",
            )?;
            let rows = select.query_map(
                params![
                    query.event_type,
                    i64::try_from(query.limit.max(1)).unwrap_or(i64::MAX)
                ],
                |r| {
                    let record: String = r.get(2)?;
                    Ok((r.get(0)?, r.get(1)?, record))
                },
            )?;
            let mut listed = Vec::new();
            for row in rows {
                let (due_at_ms, scheduled_at_ms, record) = row?;
                if let Ok(event) = serde_json::from_str(&record) {
                    listed.push(ScheduledEvent {
                        due_at_ms,
                        scheduled_at_ms,
                        event,
                    });
                }
            }
            Ok(listed)
        })
        .await
    }

    async fn scheduled_count(&self) -> Result<u64, BusError> {
        self.read(|conn| {
            conn.query_row("SELECT count(*) FROM scheduled", [], |r| r.get::<_, i64>(0))
                .map(to_u64)
        })
        .await
    }

    async fn cancel_scheduled(&self, id: &str) -> Result<bool, BusError> {
        let id = id.to_owned();
        let cancelled = self
            .submit(|reply| Job::CancelScheduled { id, reply })
            .await?;
        Ok(cancelled > 0)
    }

    async fn fire_due(&self, limit: usize) -> Result<Fired, BusError> {
        self.submit(|reply| Job::FireDue {
            now_ms: now_ms(),
            limit: limit.max(1),
            reply,
        })
        .await
    }
}
