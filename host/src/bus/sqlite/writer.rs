//! The writer thread: the only connection that writes, group-committing the jobs the bus
//! and its consumers send it.
//!
//! Protocol:
//! - Batching. The thread blocks for a first job, sleeps `group_commit_max_delay` if one
//!   is set and the group is not yet full, then takes the jobs already waiting until the
//!   group weighs `group_commit_max_events` (an append weighs its events, an
//!   acknowledgement one plus its emits, any other job one). Past that delay it waits
//!   for nothing: an idle log commits each job as it comes.
//! - One transaction per group. Each job runs inside its own savepoint of it; a job that
//!   fails rolls back to its savepoint and answers its own error, and the rest of the
//!   group still commits.
//! - Replies after the commit. No job is answered before the group's commit returns, so
//!   an acknowledged append or settlement is in the log. Under [`Durability::Full`] a
//!   group holding a job that promises durability (anything but a settlement or a cursor
//!   move) is committed with `synchronous = FULL`, so its answer also waits for the
//!   fsync; a group of settlements only is committed without it. If the fsync mode
//!   cannot be switched on, the whole group is answered with the error and nothing of it
//!   runs.
//! - A failed commit turns every answer of the group into a storage error: what the
//!   group held is rolled back together.
//! - After a commit that added events or made retries due, the bus's generation counter
//!   is bumped so waiting consumers look again. A close is answered after the commit
//!   of its group; the thread then stops and marks the bus closed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::ops::{
    append_events, cancel_scheduled, delete_dead_letters, exec, expire_dead_letters, fire_due,
    forget_plugin, move_cursor, open_cursor, put_control, put_schema, replay, settle,
};
use super::retention::{self, Candidate, Deleted};
use super::{Durability, Inner, SqliteOptions, storage};
use crate::bus::{
    Appended, BusError, DeadLetterSelection, Fired, Settled, Settlement, StartPosition,
};
use crate::event::Event;

/// Page cache of the writer's connection, in KiB.
const WRITER_CACHE_KIB: i64 = 16 * 1024;
/// Prepared statements the writer keeps: more than the distinct statements it runs.
const WRITER_STATEMENTS: usize = 64;

pub(super) type Reply<T> = oneshot::Sender<Result<T, BusError>>;

pub(super) enum Job {
    Append {
        events: Vec<Event>,
        reply: Reply<Vec<Appended>>,
    },
    OpenCursor {
        plugin: String,
        start: StartPosition,
        /// The consumer's subscriptions, as `retention::patterns_json` writes them.
        patterns: String,
        reply: Reply<u64>,
    },
    Settle(Box<SettleJob>),
    MoveCursor {
        plugin: String,
        cursor: u64,
    },
    Replay {
        which: DeadLetterSelection,
        reply: Reply<u64>,
    },
    /// Deletes at most `limit` of the selected dead letters.
    DeleteDeadLetters {
        which: DeadLetterSelection,
        limit: usize,
        reply: Reply<u64>,
    },
    /// Retention: deletes at most `limit` of the oldest dead letters dead-lettered before
    /// `before_ms`.
    ExpireDeadLetters {
        before_ms: i64,
        limit: usize,
        reply: Reply<u64>,
    },
    PutSchema {
        event_type: String,
        latest: u32,
        schema: String,
        registered_at_ms: i64,
        reply: Reply<u64>,
    },
    PutControl {
        plugin: String,
        control: String,
        revision: u64,
        reply: Reply<u64>,
    },
    /// An operator forgets a plugin removed for good (see `ops::forget_plugin`).
    Forget {
        plugin: String,
        control: String,
        reply: Reply<u64>,
    },
    /// Retention: deletes events a walk found deletable (see `retention.rs`).
    Retain {
        candidates: Vec<Candidate>,
        sweep: bool,
        /// The plugins whose retries hold nothing, as a JSON array.
        released: String,
        reply: Reply<Deleted>,
    },
    /// Retention: gives up to `pages` free pages back to the file system.
    Vacuum {
        pages: u64,
        reply: Reply<u64>,
    },
    /// The scheduler: appends the scheduled events due by `now`.
    FireDue {
        now_ms: i64,
        limit: usize,
        reply: Reply<Fired>,
    },
    CancelScheduled {
        id: String,
        reply: Reply<u64>,
    },
    Close {
        reply: Reply<()>,
    },
}

pub(super) struct SettleJob {
    pub(super) plugin: String,
    pub(super) seq: u64,
    pub(super) is_retry: bool,
    /// The new cursor, for settlements of main-stream deliveries.
    pub(super) cursor: u64,
    pub(super) settlement: Settlement,
    pub(super) reply: Reply<Settled>,
}

impl Job {
    /// Whether the job's answer promises durability: appends (a `202`), operator actions
    /// and closing. Settlements may be lost to a power cut and redelivered.
    fn must_be_durable(&self) -> bool {
        // Retention's jobs promise nothing either: a lost delete is repeated.
        !matches!(
            self,
            Job::Settle(_)
                | Job::MoveCursor { .. }
                | Job::Retain { .. }
                | Job::Vacuum { .. }
                | Job::FireDue { .. }
        )
    }

    fn weight(&self) -> usize {
        match self {
            Job::Append { events, .. } => events.len(),
            Job::FireDue { limit, .. } => *limit,
            Job::Retain { candidates, .. } => candidates.len(),
            Job::Settle(job) => match &job.settlement {
                Settlement::Ack(effects) => 1 + effects.emits.len(),
                _ => 1,
            },
            _ => 1,
        }
    }
}

/// Tunes the writer's connection and starts the writer thread on it.
pub(super) fn start(
    conn: Connection,
    options: &SqliteOptions,
    inner: Arc<Inner>,
    receiver: mpsc::UnboundedReceiver<Job>,
) -> Result<(), BusError> {
    // Every append searches the `(source, id)` index; with SQLite's default 2 MiB
    // cache a large log reads its pages back from the file at every commit.
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB.saturating_neg())
        .map_err(storage)?;
    conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
    let writer = Writer {
        conn,
        durability: options.durability,
        syncing: options.durability == Durability::Full,
        inner,
        max_events: options.group_commit_max_events.max(1),
        max_delay: options.group_commit_max_delay,
    };
    std::thread::Builder::new()
        .name("switchyard-log-writer".to_owned())
        .spawn(move || writer.run(receiver))
        .map_err(|e| BusError::Storage(format!("cannot start the log writer: {e}")))?;
    Ok(())
}

/// The writer thread.
struct Writer {
    conn: Connection,
    durability: Durability,
    /// Whether the connection is set to `synchronous = FULL` now.
    syncing: bool,
    inner: Arc<Inner>,
    max_events: usize,
    max_delay: Duration,
}

/// What a job will answer once the group commits.
enum Answer {
    Appended(Reply<Vec<Appended>>, Result<Vec<Appended>, BusError>, usize),
    Position(Reply<u64>, Result<u64, BusError>),
    Count(Reply<u64>, Result<u64, BusError>),
    Deleted(Reply<Deleted>, Result<Deleted, BusError>),
    Fired(Reply<Fired>, Result<Fired, BusError>),
    Settled(Reply<Settled>, Result<Settled, BusError>),
    Done(Reply<()>, Result<(), BusError>),
    Nothing,
}

impl Answer {
    /// The job's error, if it failed.
    fn error(&self) -> Option<&BusError> {
        match self {
            Answer::Appended(_, result, _) => result.as_ref().err(),
            Answer::Position(_, result) | Answer::Count(_, result) => result.as_ref().err(),
            Answer::Deleted(_, result) => result.as_ref().err(),
            Answer::Fired(_, result) => result.as_ref().err(),
            Answer::Settled(_, result) => result.as_ref().err(),
            Answer::Done(_, result) => result.as_ref().err(),
            Answer::Nothing => None,
        }
    }

    fn fail(self, error: &BusError) -> Self {
        let again = || match error {
            BusError::Storage(message) => BusError::Storage(message.clone()),
            other => BusError::Storage(other.to_string()),
        };
        match self {
            Answer::Appended(reply, _, n) => Answer::Appended(reply, Err(again()), n),
            Answer::Position(reply, _) => Answer::Position(reply, Err(again())),
            Answer::Count(reply, _) => Answer::Count(reply, Err(again())),
            Answer::Deleted(reply, _) => Answer::Deleted(reply, Err(again())),
            Answer::Fired(reply, _) => Answer::Fired(reply, Err(again())),
            Answer::Settled(reply, _) => Answer::Settled(reply, Err(again())),
            Answer::Done(reply, _) => Answer::Done(reply, Err(again())),
            Answer::Nothing => Answer::Nothing,
        }
    }

    fn send(self, inner: &Inner) {
        match self {
            Answer::Appended(reply, result, n) => {
                inner.pending_events.fetch_sub(n, Ordering::AcqRel);
                let _ = reply.send(result);
            }
            Answer::Position(reply, result) | Answer::Count(reply, result) => {
                let _ = reply.send(result);
            }
            Answer::Done(reply, result) => {
                let _ = reply.send(result);
            }
            Answer::Deleted(reply, result) => {
                let _ = reply.send(result);
            }
            Answer::Fired(reply, result) => {
                let _ = reply.send(result);
            }
            Answer::Settled(reply, result) => {
                let _ = reply.send(result);
            }
            Answer::Nothing => {}
        }
    }
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Job>) {
        while let Some(first) = receiver.blocking_recv() {
            let mut weight = first.weight();
            let mut batch = vec![first];
            if !self.max_delay.is_zero() && weight < self.max_events {
                std::thread::sleep(self.max_delay);
            }
            while weight < self.max_events {
                match receiver.try_recv() {
                    Ok(job) => {
                        weight += job.weight();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            let closing = self.commit_group(batch);
            if closing {
                break;
            }
        }
        self.inner.closed.store(true, Ordering::Release);
    }

    /// Runs a group of jobs in one transaction; returns whether a close was asked for.
    fn commit_group(&mut self, batch: Vec<Job>) -> bool {
        let sync = self.durability == Durability::Full && batch.iter().any(Job::must_be_durable);
        if let Err(error) = self.set_syncing(sync) {
            tracing::error!(error = %error, "cannot switch the log's fsync mode");
            if sync {
                // Committing without the fsync the answers promise is not an option.
                refuse_all(&self.inner, batch, &error);
                return false;
            }
        }
        // IMMEDIATE: the write lock is taken at BEGIN, where the busy timeout applies. A
        // deferred transaction reads first and takes the lock at its first write; SQLite
        // fails such an upgrade at once ("database is locked") rather than waiting when
        // it cannot have the lock, which the benchmark saw as failed settlements.
        let tx = match self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        {
            Ok(tx) => tx,
            Err(error) => {
                // Every job is answered, so no caller waits forever and appends leave
                // the pending count; a close asked for here is answered with the error.
                let error = storage(error);
                tracing::error!(error = %error, "cannot begin a log transaction");
                refuse_all(&self.inner, batch, &error);
                return false;
            }
        };
        let mut answers = Vec::with_capacity(batch.len());
        let mut closing = false;
        let mut wake = false;
        let mut jobs = batch.into_iter();
        while let Some(job) = jobs.next() {
            let answer = match job {
                Job::Close { reply } => {
                    closing = true;
                    Answer::Done(reply, Ok(()))
                }
                job => run_in_savepoint(&tx, job, &mut wake),
            };
            answers.push(answer);
            // An I/O error or a full disk in the middle of a statement makes SQLite roll
            // back the whole transaction, not the job's savepoint. A later job would then
            // run in a transaction of its own and commit, while its answer said it failed:
            // everything in the group is answered as failed and nothing more runs.
            if tx.is_autocommit() {
                let cause = answers
                    .last()
                    .and_then(Answer::error)
                    .map_or_else(|| "a storage error".to_owned(), ToString::to_string);
                let error = BusError::Storage(format!(
                    "the log rolled back a group of writes after {cause}"
                ));
                tracing::error!(error = %error, "log transaction lost");
                for answer in answers {
                    answer.fail(&error).send(&self.inner);
                }
                for job in jobs {
                    closing |= matches!(job, Job::Close { .. });
                    answer_error(job, &error).send(&self.inner);
                }
                return closing;
            }
        }
        match tx.commit().map_err(storage) {
            Ok(()) => {
                for answer in answers {
                    answer.send(&self.inner);
                }
                if wake {
                    self.inner.generation.send_modify(|g| *g += 1);
                }
            }
            Err(error) => {
                tracing::error!(error = %error, "log commit failed");
                for answer in answers {
                    answer.fail(&error).send(&self.inner);
                }
            }
        }
        closing
    }
}

impl Writer {
    /// Switches between fsyncing every commit and leaving it to the next one that does.
    fn set_syncing(&mut self, sync: bool) -> Result<(), BusError> {
        if self.syncing != sync {
            let level = if sync { "FULL" } else { "NORMAL" };
            self.conn
                .pragma_update(None, "synchronous", level)
                .map_err(storage)?;
            self.syncing = sync;
        }
        Ok(())
    }
}

/// Runs one job inside its own savepoint of the group's transaction, so a failing job
/// rolls back alone.
fn run_in_savepoint(savepoint: &Connection, job: Job, wake: &mut bool) -> Answer {
    if let Err(e) = exec(savepoint, "SAVEPOINT job", []) {
        return answer_error(job, &storage(e));
    }
    let (answer, ok) = match job {
        Job::Append { events, reply } => {
            let n = events.len();
            let result = append_events(savepoint, &events);
            let ok = result.is_ok();
            *wake |= ok;
            (Answer::Appended(reply, result, n), ok)
        }
        Job::OpenCursor {
            plugin,
            start,
            patterns,
            reply,
        } => {
            let result = open_cursor(savepoint, &plugin, start).and_then(|position| {
                retention::record_subscription(savepoint, &plugin, &patterns).map(|()| position)
            });
            let ok = result.is_ok();
            (Answer::Position(reply, result.map_err(storage)), ok)
        }
        Job::Settle(job) => {
            let SettleJob {
                plugin,
                seq,
                is_retry,
                cursor,
                settlement,
                reply,
            } = *job;
            let adds_events = matches!(&settlement, Settlement::Ack(e) if !e.emits.is_empty());
            let result = settle(savepoint, &plugin, seq, is_retry, cursor, settlement);
            let ok = result.is_ok();
            *wake |= ok && adds_events;
            (Answer::Settled(reply, result), ok)
        }
        Job::MoveCursor { plugin, cursor } => {
            let ok = move_cursor(savepoint, &plugin, cursor).is_ok();
            (Answer::Nothing, ok)
        }
        Job::Replay { which, reply } => {
            let result = replay(savepoint, &which);
            let ok = result.is_ok();
            *wake |= ok;
            (Answer::Count(reply, result), ok)
        }
        Job::DeleteDeadLetters {
            which,
            limit,
            reply,
        } => {
            let result = delete_dead_letters(savepoint, &which, limit);
            let ok = result.is_ok();
            (Answer::Count(reply, result), ok)
        }
        Job::ExpireDeadLetters {
            before_ms,
            limit,
            reply,
        } => {
            let result = expire_dead_letters(savepoint, before_ms, limit);
            let ok = result.is_ok();
            (Answer::Count(reply, result), ok)
        }
        Job::PutSchema {
            event_type,
            latest,
            schema,
            registered_at_ms,
            reply,
        } => {
            let result = put_schema(savepoint, &event_type, latest, &schema, registered_at_ms);
            let ok = result.is_ok();
            (Answer::Count(reply, result), ok)
        }
        Job::PutControl {
            plugin,
            control,
            revision,
            reply,
        } => {
            let result = put_control(savepoint, &plugin, &control, revision);
            let ok = result.is_ok();
            (Answer::Count(reply, result), ok)
        }
        Job::Retain {
            candidates,
            sweep,
            released,
            reply,
        } => {
            let result = retention::delete(savepoint, &candidates, sweep, &released);
            let ok = result.is_ok();
            (Answer::Deleted(reply, result), ok)
        }
        Job::Vacuum { pages, reply } => {
            let result = retention::vacuum(savepoint, pages);
            let ok = result.is_ok();
            (Answer::Count(reply, result), ok)
        }
        Job::FireDue {
            now_ms,
            limit,
            reply,
        } => {
            let result = fire_due(savepoint, now_ms, limit);
            let ok = result.is_ok();
            *wake |= result.as_ref().is_ok_and(|f| !f.lags_ms.is_empty());
            (Answer::Fired(reply, result), ok)
        }
        Job::Forget {
            plugin,
            control,
            reply,
        } => {
            let result = forget_plugin(savepoint, &plugin, &control);
            let ok = result.is_ok();
            (Answer::Count(reply, result), ok)
        }
        Job::CancelScheduled { id, reply } => {
            let result = cancel_scheduled(savepoint, &id);
            let ok = result.is_ok();
            (Answer::Count(reply, result), ok)
        }
        Job::Close { reply } => (Answer::Done(reply, Ok(())), true),
    };
    if ok {
        if let Err(e) = exec(savepoint, "RELEASE job", []) {
            return answer.fail(&storage(e));
        }
    } else if let Err(e) =
        exec(savepoint, "ROLLBACK TO job", []).and_then(|_| exec(savepoint, "RELEASE job", []))
    {
        // The group's commit reports what is wrong with the transaction.
        tracing::error!(error = %e, "cannot roll back a failed log job");
    }
    answer
}

/// Answers every job of a group that cannot run with `error`.
fn refuse_all(inner: &Inner, batch: Vec<Job>, error: &BusError) {
    for job in batch {
        answer_error(job, error).send(inner);
    }
}

fn answer_error(job: Job, error: &BusError) -> Answer {
    let answer = match job {
        Job::Append { events, reply } => Answer::Appended(reply, Ok(Vec::new()), events.len()),
        Job::OpenCursor { reply, .. } => Answer::Position(reply, Ok(0)),
        Job::Settle(job) => Answer::Settled(job.reply, Ok(Settled::default())),
        Job::Replay { reply, .. }
        | Job::DeleteDeadLetters { reply, .. }
        | Job::ExpireDeadLetters { reply, .. }
        | Job::PutSchema { reply, .. }
        | Job::PutControl { reply, .. }
        | Job::Forget { reply, .. } => Answer::Count(reply, Ok(0)),
        Job::Close { reply } => Answer::Done(reply, Ok(())),
        Job::MoveCursor { .. } => Answer::Nothing,
        Job::Retain { reply, .. } => Answer::Deleted(reply, Ok(Deleted::default())),
        Job::Vacuum { reply, .. } | Job::CancelScheduled { reply, .. } => {
            Answer::Count(reply, Ok(0))
        }
        Job::FireDue { reply, .. } => Answer::Fired(reply, Ok(Fired::default())),
    };
    answer.fail(error)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::bus::Bus;
    use crate::bus::sqlite::test_event as event;
    use crate::bus::sqlite::{SqliteBus, SqliteOptions};

    /// A full disk in the middle of a statement rolls the whole group back: every job of
    /// the group is answered as failed and none is stored (the jobs after the failing one
    /// must not commit on their own), and the next group goes through.
    #[tokio::test]
    async fn a_group_rolled_back_mid_statement_stores_nothing_and_answers_every_job() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = SqliteOptions::new(dir.path().join("log.db"));
        options.group_commit_max_delay = Duration::from_millis(200);
        let bus = SqliteBus::open_tuned(options, |conn| {
            let pages: i64 = conn.query_row("PRAGMA page_count", [], |row| row.get(0))?;
            conn.pragma_update(None, "max_page_count", pages + 64)
        })
        .unwrap();
        let sizes = [10, 10, 4 << 20, 10, 10];
        let answers = futures_util::future::join_all(
            sizes
                .iter()
                .enumerate()
                .map(|(n, bytes)| bus.append(vec![event(&format!("e{n}"), *bytes)])),
        )
        .await;
        for (n, answer) in answers.iter().enumerate() {
            assert!(answer.is_err(), "job {n} answered {answer:?}");
        }
        assert_eq!(bus.head().await.unwrap(), 0, "nothing was stored");
        let stored = bus.append(vec![event("after", 10)]).await.unwrap();
        assert_eq!(stored[0].sequence, 1);
    }
}
