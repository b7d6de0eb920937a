//! The SQL the writer runs for each job, inside that job's savepoint of the group's
//! transaction.
//!
//! Nothing here commits or answers anyone: an error only makes the writer roll the job's
//! savepoint back. Invariants the operations keep together, since each settlement is one
//! savepoint:
//! - an event's `(source, id)` is stored once; a repeat answers with the first sequence;
//! - an acknowledgement commits only if every KV read, stream version and pending
//!   schedule it saw is still what is stored, and then lands with its emitted events
//!   (expected stream versions checked), cancellations and KV writes;
//! - a subject's stream is numbered densely: `streams` holds each subject's last version
//!   (kept when retention deletes its events), `stream_events` maps versions to
//!   sequences; a conditional append whose expected version does not hold fails its job;
//! - an event with `deliverat` goes to `scheduled` (one pending event per id), never into
//!   the log until the scheduler moves it;
//! - a cursor only moves forward, and `acked` keeps only sequences above it;
//! - a settlement records one outcome — acknowledged, a `retries` row, or a dead letter —
//!   and a settled retry leaves `retries`; a main-stream settlement also moves the
//!   cursor, and records its sequence in `acked` when it lies above the new cursor;
//! - a replay moves dead letters back into `retries`, due now with a fresh attempt count.

use std::borrow::Cow;

use rusqlite::{Connection, OptionalExtension, params};

use super::{errors_json, storage, to_i64, to_u64};
use crate::bus::{
    Appended, BusError, DeadLetterReason, DeadLetterSelection, Fired, Settled, Settlement,
    StartPosition,
};
use crate::clock::{now_ms, now_us};
use crate::effects::Effects;
use crate::event::Event;
use crate::kv::{KvRead, keys_digest, value_digest};
use crate::schedule::{self, DELIVER_AT};
use crate::stream::{self, EXPECTED_VERSION, STREAM_VERSION, VersionConflict};

/// Runs one statement through the connection's statement cache: the writer runs the
/// same few statements for every job, and parsing them each time would cost more than
/// running them.
pub(super) fn exec(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// Stores events in order: each one into the log (its subject's stream version assigned)
/// or, when it carries [`DELIVER_AT`], into the schedule. An event whose expected stream
/// version does not hold fails the whole job, so its savepoint stores nothing.
pub(super) fn append_events(
    conn: &Connection,
    events: &[Event],
) -> Result<Vec<Appended>, BusError> {
    let mut appended = Vec::with_capacity(events.len());
    for event in events {
        let one = if event.extensions.contains_key(DELIVER_AT) {
            schedule_event(conn, event)?
        } else {
            append_event(conn, event)?
        };
        appended.push(one);
    }
    Ok(appended)
}

fn append_event(conn: &Connection, event: &Event) -> Result<Appended, BusError> {
    let expected = stream::expected_version(event).map_err(BusError::Invalid)?;
    let existing = |conn: &Connection| -> rusqlite::Result<Option<i64>> {
        conn.prepare_cached("SELECT seq FROM events WHERE source = ?1 AND id = ?2")?
            .query_row(params![event.source, event.id], |r| r.get(0))
            .optional()
    };
    let mut stored = Cow::Borrowed(event);
    let mut stream_version = None;
    if let Some(subject) = &event.subject {
        // A repeat of a conditional append that was stored is answered as a duplicate,
        // not as a conflict with itself.
        if expected.is_some()
            && let Some(sequence) = existing(conn).map_err(storage)?
        {
            return duplicate_of(conn, sequence);
        }
        let current = stream_head(conn, subject).map_err(storage)?;
        if let Some(expected) = expected
            && expected != current
        {
            return Err(BusError::VersionConflict(VersionConflict {
                subject: subject.clone(),
                expected,
                current,
            }));
        }
        let version = current + 1;
        let event = stored.to_mut();
        event.extensions.remove(EXPECTED_VERSION);
        event
            .extensions
            .insert(STREAM_VERSION.to_owned(), version.to_string());
        stream_version = Some(version);
    } else if event.extensions.contains_key(STREAM_VERSION) {
        stored.to_mut().extensions.remove(STREAM_VERSION);
    }
    let event = &*stored;
    let extensions: Cow<'_, str> = if event.extensions.is_empty() {
        Cow::Borrowed("{}")
    } else {
        Cow::Owned(serde_json::to_string(&event.extensions).unwrap_or_else(|_| "{}".to_owned()))
    };
    // The unique index finds a duplicate during the insert itself, so a fresh event (the
    // common case) costs one index search instead of a lookup and then an insert.
    let inserted = exec(
        conn,
        "INSERT INTO events (id, source, type, subject, time, datacontenttype, dataschema, data, extensions, ingested_at_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (source, id) DO NOTHING",
        params![
            event.id,
            event.source,
            event.ty,
            event.subject,
            event.time,
            event.datacontenttype,
            event.dataschema,
            event.data,
            extensions,
            now_us()
        ],
    )
    .map_err(storage)?
        == 1;
    if !inserted {
        let sequence = existing(conn)
            .map_err(storage)?
            .ok_or_else(|| BusError::Storage(format!("event `{}` vanished", event.id)))?;
        return duplicate_of(conn, sequence);
    }
    let sequence = conn.last_insert_rowid();
    if let (Some(subject), Some(version)) = (&event.subject, stream_version) {
        exec(
            conn,
            "INSERT INTO streams (subject, version) VALUES (?1, ?2)
             ON CONFLICT (subject) DO UPDATE SET version = excluded.version",
            params![subject, to_i64(version)],
        )
        .and_then(|_| {
            exec(
                conn,
                "INSERT INTO stream_events (subject, version, seq) VALUES (?1, ?2, ?3)",
                params![subject, to_i64(version), sequence],
            )
        })
        .map_err(storage)?;
    }
    Ok(Appended {
        sequence: to_u64(sequence),
        duplicate: false,
        stream_version,
        due_at_ms: None,
    })
}

/// The answer for an event stored before at `sequence`.
fn duplicate_of(conn: &Connection, sequence: i64) -> Result<Appended, BusError> {
    let extensions: String = conn
        .prepare_cached("SELECT extensions FROM events WHERE seq = ?1")
        .and_then(|mut s| s.query_row([sequence], |r| r.get(0)))
        .map_err(storage)?;
    let stream_version =
        serde_json::from_str::<std::collections::BTreeMap<String, String>>(&extensions)
            .ok()
            .and_then(|e| e.get(STREAM_VERSION)?.parse().ok());
    Ok(Appended {
        sequence: to_u64(sequence),
        duplicate: true,
        stream_version,
        due_at_ms: None,
    })
}

/// Appends up to `limit` scheduled events due by `now` and forgets them, soonest first.
pub(super) fn fire_due(conn: &Connection, now: i64, limit: usize) -> Result<Fired, BusError> {
    let due: Vec<(String, i64, String)> = conn
        .prepare_cached(
            "SELECT id, due_at, event FROM scheduled WHERE due_at <= ?1 ORDER BY due_at LIMIT ?2",
        )
        .and_then(|mut s| {
            s.query_map(
                params![now, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?
            .collect()
        })
        .map_err(storage)?;
    let mut fired = Fired {
        more: due.len() >= limit,
        ..Fired::default()
    };
    for (id, due_at, record) in due {
        exec(conn, "DELETE FROM scheduled WHERE id = ?1", [&id]).map_err(storage)?;
        match serde_json::from_str::<Event>(&record) {
            Ok(event) => {
                append_event(conn, &event)?;
                fired
                    .lags_ms
                    .push(u64::try_from(now_ms().saturating_sub(due_at)).unwrap_or(0));
            }
            // Only this host writes the records; one it cannot read is dropped, loudly,
            // rather than blocking every event due after it.
            Err(error) => {
                tracing::error!(%id, %error, "dropping a scheduled event that cannot be read")
            }
        }
    }
    fired.next_due_ms = conn
        .prepare_cached("SELECT MIN(due_at) FROM scheduled")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(storage)?;
    Ok(fired)
}

/// Forgets a pending scheduled event; whether there was one.
pub(super) fn cancel_scheduled(conn: &Connection, id: &str) -> Result<u64, BusError> {
    exec(conn, "DELETE FROM scheduled WHERE id = ?1", [id])
        .map(|n| n as u64)
        .map_err(storage)
}

/// The version of a subject's stream: `0` when it has no event.
pub(super) fn stream_head(conn: &Connection, subject: &str) -> rusqlite::Result<u64> {
    let version: Option<i64> = conn
        .prepare_cached("SELECT version FROM streams WHERE subject = ?1")?
        .query_row([subject], |r| r.get(0))
        .optional()?;
    Ok(version.map_or(0, to_u64))
}

/// Keeps an event aside until its due time; a pending event with the same id is the
/// same event sent again.
fn schedule_event(conn: &Connection, event: &Event) -> Result<Appended, BusError> {
    let mut event = event.clone();
    let due = event
        .extensions
        .remove(DELIVER_AT)
        .ok_or_else(|| BusError::Invalid(format!("`{DELIVER_AT}` is missing")))?;
    let due_at_ms = schedule::parse_rfc3339_ms(&due).map_err(BusError::Invalid)?;
    let record = serde_json::to_string(&event).map_err(|e| BusError::Storage(e.to_string()))?;
    let inserted = exec(
        conn,
        "INSERT INTO scheduled (id, due_at, type, event, scheduled_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO NOTHING",
        params![event.id, due_at_ms, event.ty, record, now_ms()],
    )
    .map_err(storage)?
        == 1;
    let due_at_ms = if inserted {
        due_at_ms
    } else {
        conn.prepare_cached("SELECT due_at FROM scheduled WHERE id = ?1")
            .and_then(|mut s| s.query_row([&event.id], |r| r.get(0)))
            .map_err(storage)?
    };
    Ok(Appended {
        sequence: 0,
        duplicate: !inserted,
        stream_version: None,
        due_at_ms: Some(due_at_ms),
    })
}

pub(super) fn open_cursor(
    conn: &Connection,
    plugin: &str,
    start: StartPosition,
) -> rusqlite::Result<u64> {
    let existing: Option<i64> = conn
        .query_row(
            "SELECT position FROM cursors WHERE plugin = ?1",
            [plugin],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(position) = existing {
        return Ok(to_u64(position));
    }
    let position: i64 = match start {
        StartPosition::Earliest => 0,
        StartPosition::Latest => {
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?
        }
    };
    exec(
        conn,
        "INSERT INTO cursors (plugin, position) VALUES (?1, ?2)",
        params![plugin, position],
    )?;
    Ok(to_u64(position))
}

pub(super) fn move_cursor(conn: &Connection, plugin: &str, cursor: u64) -> rusqlite::Result<()> {
    exec(
        conn,
        "UPDATE cursors SET position = MAX(position, ?2) WHERE plugin = ?1",
        params![plugin, to_i64(cursor)],
    )?;
    exec(
        conn,
        "DELETE FROM acked WHERE plugin = ?1 AND seq <= ?2",
        params![plugin, to_i64(cursor)],
    )?;
    Ok(())
}

/// Stores an acknowledgement's effects; where each emitted event landed.
fn apply_effects(
    conn: &Connection,
    plugin: &str,
    effects: &Effects,
) -> Result<Vec<Appended>, BusError> {
    // An emit's expected version that does not hold is `VersionConflict`: the dispatcher
    // runs the attempt again on the stream as it is now.
    let appended = append_events(conn, &effects.emits)?;
    for id in &effects.cancels {
        exec(conn, "DELETE FROM scheduled WHERE id = ?1", [id]).map_err(storage)?;
    }
    apply_kv_writes(conn, plugin, effects).map_err(storage)?;
    Ok(appended)
}

fn apply_kv_writes(conn: &Connection, plugin: &str, effects: &Effects) -> rusqlite::Result<()> {
    let mut set = conn.prepare_cached(
        "INSERT INTO kv (plugin, key, value) VALUES (?1, ?2, ?3)
         ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value",
    )?;
    let mut delete = conn.prepare_cached("DELETE FROM kv WHERE plugin = ?1 AND key = ?2")?;
    for write in &effects.kv_writes {
        match &write.value {
            Some(value) => set.execute(params![plugin, write.key, value])?,
            None => delete.execute(params![plugin, write.key])?,
        };
    }
    Ok(())
}

/// Checks that the stream versions and pending schedules an attempt saw still hold.
fn check_stream_and_schedule_reads(conn: &Connection, effects: &Effects) -> Result<(), BusError> {
    for read in &effects.stream_reads {
        let current = stream_head(conn, &read.subject).map_err(storage)?;
        if current != read.version {
            return Err(BusError::Conflict(format!(
                "the stream of `{}` (read at version {}, now {current})",
                read.subject, read.version
            )));
        }
    }
    for read in &effects.schedule_reads {
        let pending = is_scheduled(conn, &read.id).map_err(storage)?;
        if pending != read.pending {
            return Err(BusError::Conflict(format!("scheduled event `{}`", read.id)));
        }
    }
    Ok(())
}

/// Whether a scheduled event with this id is pending.
pub(super) fn is_scheduled(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM scheduled WHERE id = ?1")?
        .query_row([id], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
}

/// Checks that what an attempt read of its plugin's KV is still what is committed.
fn check_reads(conn: &Connection, plugin: &str, reads: &[KvRead]) -> Result<(), BusError> {
    let mut value = conn
        .prepare_cached("SELECT value FROM kv WHERE plugin = ?1 AND key = ?2")
        .map_err(storage)?;
    let mut keys = conn
        .prepare_cached("SELECT key FROM kv WHERE plugin = ?1 AND key >= ?2 ORDER BY key")
        .map_err(storage)?;
    for read in reads {
        match read {
            KvRead::Value { key, digest } => {
                let current: Option<Vec<u8>> = value
                    .query_row(params![plugin, key], |r| r.get(0))
                    .optional()
                    .map_err(storage)?;
                if current.as_deref().map(value_digest) != *digest {
                    return Err(BusError::Conflict(format!("KV `{key}`")));
                }
            }
            KvRead::Keys { prefix, digest } => {
                let mut rows = keys.query(params![plugin, prefix]).map_err(storage)?;
                let mut current = Vec::new();
                while let Some(row) = rows.next().map_err(storage)? {
                    let key: String = row.get(0).map_err(storage)?;
                    if !key.starts_with(prefix.as_str()) {
                        break;
                    }
                    current.push(key);
                }
                if keys_digest(current.iter().map(String::as_str)) != *digest {
                    return Err(BusError::Conflict(format!("KV keys `{prefix}*`")));
                }
            }
        }
    }
    Ok(())
}

/// Ends a delivery in the savepoint: checks an acknowledgement's KV reads, then records
/// its effects, the retry or the dead letter, and moves the cursor.
pub(super) fn settle(
    conn: &Connection,
    plugin: &str,
    seq: u64,
    is_retry: bool,
    cursor: u64,
    settlement: Settlement,
) -> Result<Settled, BusError> {
    let mut settled = Settled::default();
    if let Settlement::Ack(effects) = &settlement {
        check_reads(conn, plugin, &effects.kv_reads)?;
        check_stream_and_schedule_reads(conn, effects)?;
        settled = Settled::of(&apply_effects(conn, plugin, effects)?);
    }
    let record = || -> rusqlite::Result<()> {
        let now = now_ms();
        // A retry that ends leaves the schedule; one rescheduled is updated below.
        if is_retry && !matches!(settlement, Settlement::Retry { .. }) {
            exec(
                conn,
                "DELETE FROM retries WHERE plugin = ?1 AND seq = ?2",
                params![plugin, to_i64(seq)],
            )?;
            exec(
                conn,
                "DELETE FROM replays WHERE plugin = ?1 AND seq = ?2",
                params![plugin, to_i64(seq)],
            )?;
        }
        match &settlement {
            Settlement::Ack(_) => {}
            Settlement::Retry { delay, errors } => {
                let due = now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                let attempt = i64::try_from(errors.len()).unwrap_or(i64::MAX) + 1;
                exec(
                    conn,
                    "INSERT INTO retries (plugin, seq, attempt, due_at, errors) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (plugin, seq) DO UPDATE SET attempt = excluded.attempt, due_at = excluded.due_at, errors = excluded.errors",
                    params![plugin, to_i64(seq), attempt, due, errors_json(errors)],
                )?;
            }
            Settlement::DeadLetter { reason, errors } => {
                // An event retention deleted while a delivery held it (`delete_unsettled`)
                // has nothing left to replay or show: no dead letter points at nothing.
                exec(
                    conn,
                    "INSERT INTO dead_letters (plugin, seq, reason, errors, dead_at)
                     SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM events WHERE seq = ?2)",
                    params![
                        plugin,
                        to_i64(seq),
                        reason.as_str(),
                        errors_json(errors),
                        now
                    ],
                )?;
            }
        }
        if !is_retry {
            move_cursor(conn, plugin, cursor)?;
            if seq > cursor {
                exec(
                    conn,
                    "INSERT OR IGNORE INTO acked (plugin, seq) VALUES (?1, ?2)",
                    params![plugin, to_i64(seq)],
                )?;
            }
        }
        Ok(())
    };
    record().map_err(storage)?;
    Ok(settled)
}

/// Dead letters a selection takes, as `(id, plugin, seq)`, oldest first, at most `limit`:
/// those whose event is still in the log, as the list shows them (a replay of one whose
/// event retention deleted would wait for it for ever).
fn selected_dead_letters(
    conn: &Connection,
    which: &DeadLetterSelection,
    limit: usize,
) -> Result<Vec<(i64, String, i64)>, BusError> {
    let (id, plugin, reason) = match which {
        DeadLetterSelection::One(id) => (Some(to_i64(*id)), None, None),
        DeadLetterSelection::Plugin { plugin, reason } => (
            None,
            Some(plugin.as_str()),
            reason.map(DeadLetterReason::as_str),
        ),
    };
    let mut select = conn
        .prepare_cached(
            "SELECT id, plugin, seq FROM dead_letters
             WHERE (?1 IS NULL OR id = ?1) AND (?2 IS NULL OR plugin = ?2)
               AND (?3 IS NULL OR reason = ?3)
               AND EXISTS (SELECT 1 FROM events WHERE events.seq = dead_letters.seq)
             ORDER BY id LIMIT ?4",
        )
        .map_err(storage)?;
    let rows = select
        .query_map(params![id, plugin, reason, to_i64(limit as u64)], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(storage)?;
    let rows: Vec<_> = rows.collect::<rusqlite::Result<_>>().map_err(storage)?;
    match which {
        DeadLetterSelection::One(id) if rows.is_empty() => {
            Err(BusError::NotFound(format!("dead letter {id}")))
        }
        _ => Ok(rows),
    }
}

pub(super) fn replay(conn: &Connection, which: &DeadLetterSelection) -> Result<u64, BusError> {
    let rows = selected_dead_letters(conn, which, usize::MAX)?;
    let now = now_ms();
    for (dead_id, plugin, seq) in &rows {
        exec(
            conn,
            "INSERT INTO retries (plugin, seq, attempt, due_at, errors) VALUES (?1, ?2, 1, ?3, '[]')
             ON CONFLICT (plugin, seq) DO UPDATE SET attempt = 1, due_at = excluded.due_at, errors = '[]'",
            params![plugin, seq, now],
        )
        .map_err(storage)?;
        exec(
            conn,
            "INSERT OR REPLACE INTO replays (plugin, seq, at) VALUES (?1, ?2, ?3)",
            params![plugin, seq, now],
        )
        .map_err(storage)?;
        exec(conn, "DELETE FROM dead_letters WHERE id = ?1", [dead_id]).map_err(storage)?;
    }
    Ok(rows.len() as u64)
}

/// Deletes at most `limit` of the selected dead letters, oldest first; returns how many.
pub(super) fn delete_dead_letters(
    conn: &Connection,
    which: &DeadLetterSelection,
    limit: usize,
) -> Result<u64, BusError> {
    let rows = selected_dead_letters(conn, which, limit)?;
    for (dead_id, _, _) in &rows {
        exec(conn, "DELETE FROM dead_letters WHERE id = ?1", [dead_id]).map_err(storage)?;
    }
    Ok(rows.len() as u64)
}

/// Deletes at most `limit` of the oldest dead letters (by id) that were dead-lettered
/// before `before_ms`; returns how many.
pub(super) fn expire_dead_letters(
    conn: &Connection,
    before_ms: i64,
    limit: usize,
) -> Result<u64, BusError> {
    exec(
        conn,
        "DELETE FROM dead_letters WHERE id IN
           (SELECT id FROM dead_letters ORDER BY id LIMIT ?2) AND dead_at < ?1",
        params![before_ms, to_i64(limit as u64)],
    )
    .map(|n| n as u64)
    .map_err(storage)
}

/// Stores the next version of a type's schema if its latest is still `latest`; answers
/// the new version.
pub(super) fn put_schema(
    conn: &Connection,
    event_type: &str,
    latest: u32,
    schema: &str,
    registered_at_ms: i64,
) -> Result<u64, BusError> {
    let current: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schemas WHERE event_type = ?1",
            [event_type],
            |r| r.get(0),
        )
        .map_err(storage)?;
    if current != i64::from(latest) {
        return Err(BusError::Conflict(format!(
            "schema of `{event_type}` (now at version {current})"
        )));
    }
    let version = i64::from(latest) + 1;
    exec(
        conn,
        "INSERT INTO schemas (event_type, version, schema, registered_at) VALUES (?1, ?2, ?3, ?4)",
        params![event_type, version, schema, registered_at_ms],
    )
    .map_err(storage)?;
    Ok(to_u64(version))
}

/// Deletes everything kept for `plugin` (its cursor, retries, replays, dead letters and
/// KV) and sets its control to `control`, one revision on, so that a host still holding
/// the old revision reads the new one; the rows deleted.
pub(super) fn forget_plugin(
    conn: &Connection,
    plugin: &str,
    control: &str,
) -> Result<u64, BusError> {
    let mut deleted = 0;
    for table in [
        "cursors",
        "acked",
        "retries",
        "replays",
        "dead_letters",
        "dead_letter_counts",
        "kv",
        "subscriptions",
    ] {
        deleted += exec(
            conn,
            &format!("DELETE FROM {table} WHERE plugin = ?1"),
            [plugin],
        )
        .map_err(storage)?;
    }
    exec(
        conn,
        "UPDATE controls SET control = ?2, revision = revision + 1 WHERE plugin = ?1",
        params![plugin, control],
    )
    .map_err(storage)?;
    Ok(u64::try_from(deleted).unwrap_or(u64::MAX))
}

/// Stores a plugin's control if its revision is still `revision`; the new revision.
pub(super) fn put_control(
    conn: &Connection,
    plugin: &str,
    control: &str,
    revision: u64,
) -> Result<u64, BusError> {
    let current: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(revision), 0) FROM controls WHERE plugin = ?1",
            [plugin],
            |r| r.get(0),
        )
        .map_err(storage)?;
    if to_u64(current) != revision {
        return Err(BusError::Conflict(format!(
            "the control of plugin `{plugin}` (now at revision {current})"
        )));
    }
    let next = current + 1;
    exec(
        conn,
        "INSERT INTO controls (plugin, control, revision) VALUES (?1, ?2, ?3)
         ON CONFLICT (plugin) DO UPDATE SET control = excluded.control, revision = excluded.revision",
        params![plugin, control, next],
    )
    .map_err(storage)?;
    Ok(to_u64(next))
}

#[cfg(test)]
mod tests {
    use crate::bus::sqlite::{SqliteBus, SqliteOptions};
    use crate::bus::{Appended, Bus};
    use crate::event::Event;

    fn event(source: &str, id: &str) -> Event {
        Event {
            id: id.to_owned(),
            source: source.to_owned(),
            ty: "t.x".to_owned(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: Vec::new(),
            extensions: std::collections::BTreeMap::new(),
        }
    }

    fn sequences(appended: &[Appended]) -> Vec<(u64, bool)> {
        appended.iter().map(|a| (a.sequence, a.duplicate)).collect()
    }

    #[tokio::test]
    async fn a_repeated_source_and_id_is_answered_with_its_first_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(SqliteOptions::new(dir.path().join("log.db"))).unwrap();
        let first = bus
            .append(vec![event("/a", "1"), event("/b", "1")])
            .await
            .unwrap();
        assert_eq!(sequences(&first), [(1, false), (2, false)]);
        // One already stored, one repeated inside the batch, one new.
        let second = bus
            .append(vec![event("/b", "1"), event("/a", "2"), event("/a", "2")])
            .await
            .unwrap();
        assert_eq!(sequences(&second), [(2, true), (3, false), (3, true)]);
        assert_eq!(bus.head().await.unwrap(), 3);
        bus.close().await.unwrap();
    }

    fn in_stream(id: &str, subject: &str, expected: Option<u64>) -> Event {
        let mut event = event("/s", id);
        event.subject = Some(subject.to_owned());
        if let Some(expected) = expected {
            event
                .extensions
                .insert(crate::stream::EXPECTED_VERSION.into(), expected.to_string());
        }
        event
    }

    #[tokio::test]
    async fn streams_stay_dense_when_retention_deletes_and_a_conflict_stores_nothing() {
        use crate::bus::BusError;
        use crate::kv::KvSource as _;

        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(SqliteOptions::new(dir.path().join("log.db"))).unwrap();
        let appended = bus
            .append(vec![
                in_stream("1", "a", Some(0)),
                in_stream("2", "b", None),
                in_stream("3", "a", Some(1)),
            ])
            .await
            .unwrap();
        let versions: Vec<Option<u64>> = appended.iter().map(|a| a.stream_version).collect();
        assert_eq!(versions, [Some(1), Some(1), Some(2)]);
        let conflict = bus
            .append(vec![
                in_stream("4", "c", None),
                in_stream("5", "a", Some(1)),
            ])
            .await;
        assert!(matches!(
            conflict,
            Err(BusError::VersionConflict(ref c)) if c.current == 2 && c.expected == 1
        ));
        assert_eq!(bus.read_stream("c", 0, 10).await.unwrap().version, 0);
        let page = bus.read_stream("a", 1, 10).await.unwrap();
        assert_eq!(page.version, 2);
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.events[0].id, "3");
        assert_eq!(crate::stream::stream_version(&page.events[0]), Some(2));
        assert!(
            page.events[0]
                .extension(crate::stream::EXPECTED_VERSION)
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_scheduled_event_waits_aside_until_due_and_a_cancelled_one_never_fires() {
        use crate::bus::{ScheduledQuery, Schedules as _};

        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(SqliteOptions::new(dir.path().join("log.db"))).unwrap();
        let mut now = event("/s", "now");
        now.extensions.insert(
            crate::schedule::DELIVER_AT.into(),
            crate::clock::rfc3339_ms(crate::clock::now_ms() - 1),
        );
        let mut later = event("/s", "later");
        later.extensions.insert(
            crate::schedule::DELIVER_AT.into(),
            crate::clock::rfc3339_ms(crate::clock::now_ms() + 3_600_000),
        );
        let mut gone = later.clone();
        gone.id = "gone".into();
        let appended = bus.append(vec![now, later, gone]).await.unwrap();
        assert!(
            appended
                .iter()
                .all(|a| a.sequence == 0 && a.due_at_ms.is_some())
        );
        assert_eq!(
            bus.head().await.unwrap(),
            0,
            "nothing enters the log before it is due"
        );
        assert!(bus.cancel_scheduled("gone").await.unwrap());
        assert!(!bus.cancel_scheduled("gone").await.unwrap());
        let fired = bus.fire_due(100).await.unwrap();
        assert_eq!(fired.lags_ms.len(), 1);
        assert!(fired.next_due_ms.is_some());
        assert_eq!(bus.head().await.unwrap(), 1);
        assert!(
            bus.fire_due(100).await.unwrap().lags_ms.is_empty(),
            "fired twice"
        );
        let pending = bus
            .list_scheduled(ScheduledQuery {
                event_type: None,
                limit: 10,
            })
            .await
            .unwrap();
        let ids: Vec<&str> = pending.iter().map(|p| p.event.id.as_str()).collect();
        assert_eq!(ids, ["later"]);
        assert_eq!(bus.scheduled_count().await.unwrap(), 1);
    }
}
