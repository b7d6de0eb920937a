//! The dead letters of the embedded bus: reading them from `dead_letters` (each joined
//! with its event from the log) and handing replays and deletions to the writer.
//!
//! Reads run on the read pool and see only committed rows; a replay is a writer job, so
//! it commits in one transaction and is answered only once committed. Deleting many
//! (a plugin's, say) takes one short writer job per thousand, each committed before the
//! next, so appends never wait behind a long deletion; one that fails part way leaves
//! the rest for a repeat.
//! A dead letter whose event is missing from the log is left out of what is read.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::writer::Job;
use super::{SqliteBus, load_event, parse_errors, to_i64, to_u64};
use crate::bus::{
    BusError, DeadLetter, DeadLetterPage, DeadLetterQuery, DeadLetterReason, DeadLetterSelection,
    DeadLetters, StoredEvent,
};

#[async_trait]
impl DeadLetters for SqliteBus {
    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<DeadLetterPage, BusError> {
        self.read(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT id, plugin, seq, reason, errors, dead_at FROM dead_letters
                 WHERE id > ?1 AND (?2 IS NULL OR plugin = ?2) AND (?4 IS NULL OR reason = ?4)
                   AND EXISTS (SELECT 1 FROM events WHERE events.seq = dead_letters.seq)
                 ORDER BY id LIMIT ?3",
            )?;
            let rows: Vec<(i64, String, i64, String, String, i64)> = select
                .query_map(
                    params![
                        to_i64(query.after),
                        query.plugin,
                        to_i64(query.limit.max(1) as u64),
                        query.reason.map(DeadLetterReason::as_str)
                    ],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                        ))
                    },
                )?
                .collect::<rusqlite::Result<_>>()?;
            let mut letters = Vec::with_capacity(rows.len());
            for (id, plugin, seq, reason, errors, dead_at) in rows {
                if let Some(stored) = load_event(conn, to_u64(seq))? {
                    letters.push(dead_letter(id, plugin, stored, &reason, &errors, dead_at));
                }
            }
            Ok(DeadLetterPage {
                letters,
                scanned_to: None,
            })
        })
        .await
    }

    async fn dead_letter(&self, id: u64) -> Result<DeadLetter, BusError> {
        let found = self
            .read(move |conn| {
                let row: Option<(String, i64, String, String, i64)> = conn
                    .query_row(
                        "SELECT plugin, seq, reason, errors, dead_at FROM dead_letters WHERE id = ?1",
                        [to_i64(id)],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )
                    .optional()?;
                let Some((plugin, seq, reason, errors, dead_at)) = row else {
                    return Ok(None);
                };
                Ok(load_event(conn, to_u64(seq))?.map(|stored| {
                    dead_letter(to_i64(id), plugin, stored, &reason, &errors, dead_at)
                }))
            })
            .await?;
        found.ok_or_else(|| BusError::NotFound(format!("dead letter {id}")))
    }

    async fn replay_dead_letters(&self, which: &DeadLetterSelection) -> Result<u64, BusError> {
        let which = which.clone();
        self.submit(|reply| Job::Replay { which, reply }).await
    }

    async fn delete_dead_letters(&self, which: &DeadLetterSelection) -> Result<u64, BusError> {
        // In writer jobs of at most `DELETE_STEP`, so appends wait for one short job at a
        // time however many go.
        let mut deleted = 0;
        loop {
            let which = which.clone();
            let step = self
                .submit(|reply| Job::DeleteDeadLetters {
                    which,
                    limit: DELETE_STEP,
                    reply,
                })
                .await?;
            deleted += step;
            if step < DELETE_STEP as u64 {
                return Ok(deleted);
            }
        }
    }
}

/// Dead letters one writer job deletes at most.
const DELETE_STEP: usize = 1000;

fn dead_letter(
    id: i64,
    plugin: String,
    stored: StoredEvent,
    reason: &str,
    errors: &str,
    dead_at: i64,
) -> DeadLetter {
    let reason = match reason {
        "rejected" => DeadLetterReason::Rejected,
        "expired" => DeadLetterReason::Expired,
        "effects" => DeadLetterReason::Effects,
        "loop" => DeadLetterReason::Loop,
        "schema" => DeadLetterReason::Schema,
        _ => DeadLetterReason::Exhausted,
    };
    DeadLetter {
        id: to_u64(id),
        plugin,
        stored,
        reason,
        errors: parse_errors(errors),
        dead_at_ms: dead_at,
    }
}
