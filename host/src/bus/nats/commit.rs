//! The commit protocol: how an attempt's effects (KV writes and emits) are stored with
//! its acknowledgement on JetStream, which has no transaction across streams.
//!
//! A plugin's KV bucket is a stream of its own (`KV_P-kv-<plugin>`) that also holds the
//! subjects `P-kv-<plugin>.commit.<sequence>` (one commit record per delivery whose
//! effects wrote KV, kept for [`COMMIT_RECORD_AGE`] by a per-message TTL) and
//! `P-kv-<plugin>.guard` (conditions, below; the stream keeps only the last). Everything
//! an attempt writes goes into that stream in one atomic batch (nats-server 2.12's
//! `allow_atomic`): the server stores all of it or none of it, and checks every
//! condition of the batch against the stream as it was just before, under its lock.
//!
//! Effects without KV writes: the reads are checked, the emits published; the emits' ids
//! derive from the handled event, so `Nats-Msg-Id` drops what a repeat publishes again
//! within the stream's dedupe window. No record, no batch.
//!
//! Effects with KV writes ([`Shared::commit_effects`]):
//! 1. **Reads.** Each value the attempt read is compared with the bucket now (by digest);
//!    a difference is a conflict. Its revision becomes a condition. A key listing is
//!    compared too (by the digest of the keys), after noting the last revision of the
//!    whole bucket, which becomes a condition on the whole bucket.
//! 2. **Batch.** One atomic batch, its messages conditional
//!    (`Nats-Expected-Last-Subject-Sequence`): the commit record, expecting none for the
//!    delivery (it holds the emits, to publish again if need be); each write (the last
//!    to each key wins) or delete (`KV-Operation: DEL`, a marker that expires at once, as
//!    a deleted row goes on the embedded log), expecting the revision the
//!    attempt read when it read the key (a blind write has no condition: it depends on
//!    nothing, and the last one wins, as on the embedded log); a
//!    guard message for each key read and not written, expecting its revision on the
//!    key's subject (`Nats-Expected-Last-Subject-Sequence-Subject`); and one for a
//!    listing, expecting the bucket's last revision on `$KV.<bucket>.>`. All but the last
//!    message go without a reply; the last commits, and its answer is the batch's.
//! 3. **Grouping.** The batch goes to the bucket's committer on this host
//!    ([`run_committer`]), which sends the commits waiting for it that touch no key in
//!    common as one atomic batch, one batch at a time. The server checks each condition
//!    against the stream as it was before the batch, so disjoint keys are what keeps a
//!    group equivalent to its commits one after the other. No commit joins a group ahead
//!    of an earlier commit of one of its keys that was left out, so each key's commits
//!    reach the server in the order they came. A group refused as a whole
//!    (it stored nothing) is sent again one commit a batch, each for its own outcome. A
//!    commit that listed keys goes alone.
//! 4. **Emits.** Published after the batch; the consumer then acknowledges.
//!
//! A batch refused on a condition is a conflict, unless the delivery's record exists: an
//! earlier try of this settlement, or another host holding the same delivery, committed
//! first, and the record is finished instead (its emits published again).
//!
//! Invariants:
//! - An attempt's writes and its commit record are stored together or not at all, and
//!   only if nothing the attempt read or wrote changed since it was checked: commits of
//!   one plugin conflict only when they touch the same keys (or one listed keys), and
//!   then one of them runs again. No lock, nothing to undo.
//! - No two commits in one batch touch the same key.
//! - A delivery commits at most once within [`COMMIT_RECORD_AGE`]: its record is created
//!   expecting none, in the same batch as its writes.
//! - A redelivered event whose record exists is finished (emits published, deduplicated
//!   by `Nats-Msg-Id`) and acknowledged, never run again ([`Shared::finish_committed`]).
//!
//! What a host that dies leaves behind:
//! - before the batch commits: nothing (the server drops an unfinished batch after 10 s);
//!   the redelivered event runs again.
//! - after the batch, before the emits are published or the acknowledgement sent: the
//!   record; the redelivery finishes it. A redelivery later than [`COMMIT_RECORD_AGE`]
//!   finds no record and runs the event again.
//!
//! A key listing's condition covers the whole bucket: a commit that listed keys conflicts
//! with any write to the bucket since its read, not only under its prefix (keys are one
//! subject token each, so a prefix is no subject wildcard).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{kv, stream};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::kv::{current, decode_key, encode_key, list_keys};
use super::messages::decode_event;
use super::{MARKER_TTL, Shared, nats_error};
use crate::bus::{BusError, Settled};
use crate::effects::Effects;
use crate::event::Event;
use crate::kv::{KvRead, keys_digest, value_digest};
use crate::stream::EXPECTED_VERSION;

/// How long a commit record marks its delivery as committed: a copy of the delivery that
/// turns up later than this (a host stalled for a day) would run again.
pub(super) const COMMIT_RECORD_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Most messages the server takes in one atomic batch.
const MAX_BATCH_MESSAGES: usize = 1000;

/// What a delivery's commit stored beside its writes: the emits, each as the event
/// stream stores it, in base64, and the scheduled events it cancels.
#[derive(Serialize, Deserialize)]
pub(super) struct CommitRecord {
    pub(super) emits: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) cancels: Vec<String>,
}

impl CommitRecord {
    pub(super) fn emits(&self) -> Result<Vec<Event>, BusError> {
        self.emits
            .iter()
            .map(|text| {
                let bytes = BASE64.decode(text).map_err(|error| {
                    BusError::Storage(format!("a commit record is unreadable: {error}"))
                })?;
                decode_event(&bytes)
            })
            .collect()
    }
}

/// The subjects of a plugin's bucket stream.
pub(super) fn commit_subjects(bucket: &str) -> String {
    format!("{bucket}.>")
}

fn record_subject(bucket: &str, sequence: u64) -> String {
    format!("{bucket}.commit.{sequence}")
}

/// One message of an atomic batch.
#[derive(Clone)]
pub(super) struct Conditional {
    pub(super) subject: String,
    pub(super) payload: Bytes,
    /// The revision the condition's subject must have (0: no message); `None`: no
    /// condition.
    pub(super) expected: Option<u64>,
    /// The subject the condition is on, when not the message's own.
    pub(super) condition_on: Option<String>,
    pub(super) headers: Vec<(&'static str, String)>,
}

impl Conditional {
    pub(super) fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(expected) = self.expected {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                expected.to_string().as_str(),
            );
        }
        if let Some(subject) = &self.condition_on {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence-Subject",
                subject.as_str(),
            );
        }
        for (name, value) in &self.headers {
            headers.insert(*name, value.as_str());
        }
        headers
    }
}

pub(super) enum BatchError {
    /// A condition did not hold; nothing was stored.
    Conflict,
    /// A message repeats the `Nats-Msg-Id` of one stored before; nothing was stored.
    Repeated,
    Storage(BusError),
}

#[derive(Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    error: Option<async_nats::jetstream::Error>,
    /// The sequence of the batch's last message.
    #[serde(default)]
    seq: u64,
}

/// The server's code for a batch that repeats a stored message's `Nats-Msg-Id`.
const BATCH_REPEATS_MESSAGE_ID: u64 = 10201;

impl Shared {
    /// Commits an attempt's effects (see the module docs). Returns once the writes and
    /// emits are stored; the caller acknowledges. The scheduled events the attempt
    /// cancels are claimed first and put back if the commit does not go through (see
    /// `schedules.rs`).
    pub(super) async fn commit_effects(
        &self,
        plugin: &str,
        sequence: u64,
        effects: Effects,
    ) -> Result<Settled, BusError> {
        self.check_schedule_reads(&effects).await?;
        if effects.cancels.is_empty() {
            return self.store_effects(plugin, sequence, effects).await;
        }
        self.claim_cancels(plugin, sequence, &effects.cancels)
            .await?;
        match self.store_effects(plugin, sequence, effects).await {
            Ok(settled) => {
                self.forget_claims(plugin, sequence).await;
                Ok(settled)
            }
            // A commit whose answer was lost leaves its record; otherwise nothing of it
            // was stored and the claimed schedules go back. If even that cannot be
            // read, the next host to get the delivery does it.
            Err(error) => match self.finish_committed(plugin, sequence).await {
                Ok(true) => {
                    self.forget_claims(plugin, sequence).await;
                    Ok(Settled::default())
                }
                Ok(false) => {
                    if let Err(restore) = self.release_claims(plugin, sequence).await {
                        tracing::warn!(%plugin, sequence, error = %restore, "cannot put back the scheduled events a failed commit claimed; the delivery's next attempt does");
                    }
                    Err(error)
                }
                Err(_) => Err(error),
            },
        }
    }

    /// Stores an attempt's emits and KV writes, its cancellations already claimed.
    async fn store_effects(
        &self,
        plugin: &str,
        sequence: u64,
        effects: Effects,
    ) -> Result<Settled, BusError> {
        let conditional = !effects.stream_reads.is_empty()
            || effects
                .emits
                .iter()
                .any(|e| e.extensions.contains_key(EXPECTED_VERSION));
        if effects.kv_writes.is_empty() {
            if !effects.kv_reads.is_empty() {
                let store = self.plugin_store(plugin).await?;
                for read in &effects.kv_reads {
                    check_read(&store, read).await?;
                }
            }
            if conditional {
                return self.commit_conditional(plugin, sequence, &effects).await;
            }
            // Nothing to make atomic: the emits' ids make a repeat harmless, and so do
            // the schedules'.
            let appended = self.store_events(&effects.emits, false).await?;
            return Ok(Settled::of(&appended));
        }
        if conditional {
            // The KV batch and the event stream are two streams: no batch holds both.
            return Err(BusError::Invalid(
                "on NATS, one attempt cannot both write KV and append to a subject stream on \
                 a condition (an expected version, or a stream it read): keep the state in \
                 the stream or in KV"
                    .to_owned(),
            ));
        }
        let store = self.plugin_store(plugin).await?;
        let bucket = store.name.clone();
        let key_subject = |key: &str| format!("{}{key}", store.prefix);
        let mut revisions: BTreeMap<String, u64> = BTreeMap::new();
        let mut bucket_revision = None;
        for read in &effects.kv_reads {
            if matches!(read, KvRead::Keys { .. }) && bucket_revision.is_none() {
                bucket_revision = Some(last_revision(&store.stream, &key_subject(">")).await?);
            }
            if let Some((key, revision)) = check_read(&store, read).await? {
                revisions.insert(key, revision);
            }
        }
        // The last write to each key wins.
        let record = CommitRecord::of(&effects);
        let mut writes: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for write in effects.kv_writes {
            writes.insert(encode_key(&write.key), write.value);
        }
        let body = serde_json::to_vec(&record).unwrap_or_default();
        self.check_size(
            || "the attempt's emits and commit record".to_owned(),
            body.len(),
        )?;
        let mut batch = vec![Conditional {
            subject: record_subject(&bucket, sequence),
            payload: Bytes::from(body),
            expected: Some(0),
            condition_on: None,
            headers: vec![("Nats-TTL", COMMIT_RECORD_AGE.as_secs().to_string())],
        }];
        let guard = format!("{bucket}.guard");
        for (key, value) in &writes {
            // A key the attempt read must still have the revision it read; one it only
            // wrote takes the write whatever it holds, as a blind write depends on nothing.
            let expected = revisions.remove(key);
            batch.push(match (value, expected) {
                (Some(value), _) => {
                    self.check_size(|| format!("KV key `{key}`"), value.len())?;
                    Conditional {
                        subject: key_subject(key),
                        payload: Bytes::from(value.clone()),
                        expected,
                        condition_on: None,
                        headers: Vec::new(),
                    }
                }
                // Deleting a key read as absent writes nothing, but its absence still
                // has to hold.
                (None, Some(0)) => Conditional {
                    subject: guard.clone(),
                    payload: Bytes::new(),
                    expected,
                    condition_on: Some(key_subject(key)),
                    headers: Vec::new(),
                },
                (None, _) => Conditional {
                    subject: key_subject(key),
                    payload: Bytes::new(),
                    expected,
                    condition_on: None,
                    headers: vec![
                        ("KV-Operation", "DEL".to_owned()),
                        ("Nats-TTL", MARKER_TTL.as_secs().to_string()),
                    ],
                },
            });
        }
        let guarded: Vec<String> = revisions.keys().cloned().collect();
        for (key, expected) in revisions {
            batch.push(Conditional {
                subject: guard.clone(),
                payload: Bytes::new(),
                expected: Some(expected),
                condition_on: Some(key_subject(&key)),
                headers: Vec::new(),
            });
        }
        if let Some(expected) = bucket_revision {
            batch.push(Conditional {
                subject: guard.clone(),
                payload: Bytes::new(),
                expected: Some(expected),
                condition_on: Some(key_subject(">")),
                headers: Vec::new(),
            });
        }
        if batch.len() > MAX_BATCH_MESSAGES {
            return Err(BusError::TooLarge {
                what: "the attempt's KV writes and reads".to_owned(),
                bytes: batch.len(),
                limit: MAX_BATCH_MESSAGES,
            });
        }
        let touched: BTreeSet<String> = writes.keys().chain(guarded.iter()).cloned().collect();
        match self
            .submit(
                &bucket,
                Pending {
                    messages: batch,
                    touched,
                    alone: bucket_revision.is_some(),
                    answer: None,
                },
            )
            .await
        {
            Ok(()) => {}
            Err(BatchError::Conflict | BatchError::Repeated) => {
                // This delivery's record exists when an earlier try of this settlement,
                // or another host holding the same delivery, committed first.
                if self.finish_committed(plugin, sequence).await? {
                    return Ok(Settled::default());
                }
                let keys: Vec<String> = writes
                    .keys()
                    .map(|key| decode_key(key).unwrap_or_else(|| key.clone()))
                    .collect();
                return Err(BusError::Conflict(format!("KV `{}`", keys.join("`, `"))));
            }
            Err(BatchError::Storage(error)) => return Err(error),
        }
        let appended = self.store_events(&effects.emits, false).await?;
        Ok(Settled::of(&appended))
    }

    /// Hands a commit's batch to the bucket's committer and waits for its outcome.
    async fn submit(&self, bucket: &str, mut pending: Pending) -> Result<(), BatchError> {
        let (answer, outcome) = oneshot::channel();
        pending.answer = Some(answer);
        let queue = {
            let mut committers = self
                .committers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match committers.get(bucket) {
                Some(queue) => queue.clone(),
                None => {
                    let (queue, incoming) = mpsc::unbounded_channel();
                    tokio::spawn(run_committer(self.client.clone(), incoming));
                    committers.insert(bucket.to_owned(), queue.clone());
                    queue
                }
            }
        };
        let closed = || BatchError::Storage(BusError::Storage("the committer stopped".into()));
        queue.send(pending).map_err(|_| closed())?;
        outcome.await.unwrap_or_else(|_| Err(closed()))
    }
    /// Finishes a delivery whose commit record exists: stores the record's emits again
    /// (their copies are dropped by `Nats-Msg-Id`) and its cancellations. `false` when
    /// there is none. A KV commit's record is in the plugin's bucket; a conditional
    /// commit's is in the event stream, with its emits, which need no second store.
    pub(super) async fn finish_committed(
        &self,
        plugin: &str,
        sequence: u64,
    ) -> Result<bool, BusError> {
        let subject = self.record_subject(plugin, sequence);
        if let Some(record) = read_record(&self.events, &subject).await? {
            self.finish_schedules(&record).await?;
            return Ok(true);
        }
        let store = self.plugin_store(plugin).await?;
        let subject = record_subject(&store.name, sequence);
        let Some(record) = read_record(&store.stream, &subject).await? else {
            return Ok(false);
        };
        self.store_events(&record.emits()?, false).await?;
        for id in &record.cancels {
            self.cancel(id).await?;
        }
        Ok(true)
    }

    /// Checks that the scheduled events the attempt looked at are still pending, or
    /// still not. (Between this check and the commit, a due event may still fire: the
    /// claim of its cancellation then finds nothing and the commit conflicts.)
    async fn check_schedule_reads(&self, effects: &Effects) -> Result<(), BusError> {
        for read in &effects.schedule_reads {
            if self.is_scheduled(&read.id).await? != read.pending {
                return Err(BusError::Conflict(format!("scheduled event `{}`", read.id)));
            }
        }
        Ok(())
    }
}

/// The commit record stored at `subject` of `stream`, if there is one.
async fn read_record(
    stream: &stream::Stream,
    subject: &str,
) -> Result<Option<CommitRecord>, BusError> {
    let message = match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => message,
        Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
            return Ok(None);
        }
        Err(error) => return Err(nats_error("reading a commit record")(&error)),
    };
    serde_json::from_slice(&message.payload)
        .map(Some)
        .map_err(|error| {
            BusError::Storage(format!(
                "the commit record {subject} is unreadable: {error}"
            ))
        })
}

impl Shared {}

/// Checks one read of an attempt against the bucket now; for a value read, returns the
/// encoded key and its revision.
async fn check_read(store: &kv::Store, read: &KvRead) -> Result<Option<(String, u64)>, BusError> {
    match read {
        KvRead::Value { key, digest } => {
            let encoded = encode_key(key);
            let (revision, value) = current(store, &encoded).await?;
            if value.as_deref().map(value_digest) != *digest {
                return Err(BusError::Conflict(format!("KV `{key}`")));
            }
            Ok(Some((encoded, revision)))
        }
        KvRead::Keys { prefix, digest } => {
            let keys = list_keys(store, prefix).await?;
            if keys_digest(keys.iter().map(String::as_str)) != *digest {
                return Err(BusError::Conflict(format!("KV keys `{prefix}*`")));
            }
            Ok(None)
        }
    }
}

/// The last revision among the subjects `subject` matches (0: none).
async fn last_revision(stream: &stream::Stream, subject: &str) -> Result<u64, BusError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(message.sequence),
        Err(error) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(error) => Err(nats_error("reading KV")(&error)),
    }
}

/// Sends `batch` as one atomic batch: every message but the last without a reply, the
/// last with the commit header, whose answer is the batch's.
pub(super) async fn publish_batch<'m>(
    client: &async_nats::Client,
    batch: impl ExactSizeIterator<Item = &'m Conditional>,
) -> Result<u64, BatchError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let last = batch.len();
    for (index, message) in batch.enumerate() {
        let mut headers = message.headers();
        headers.insert("Nats-Batch-Id", id.as_str());
        headers.insert("Nats-Batch-Sequence", (index + 1).to_string().as_str());
        if index + 1 < last {
            client
                .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
                .await
                .map_err(|error| BatchError::Storage(nats_error("sending a commit")(&error)))?;
            continue;
        }
        headers.insert("Nats-Batch-Commit", "1");
        let answer = client
            .request_with_headers(message.subject.clone(), headers, message.payload.clone())
            .await
            .map_err(|error| BatchError::Storage(nats_error("committing")(&error)))?;
        let answer: BatchAnswer = serde_json::from_slice(&answer.payload).map_err(|error| {
            BatchError::Storage(nats_error("reading the commit's answer")(&error))
        })?;
        return match answer.error {
            None => Ok(answer.seq),
            Some(error) if super::compare_and_set_failed(&error) => Err(BatchError::Conflict),
            Some(error) if error.error_code().0 == BATCH_REPEATS_MESSAGE_ID => {
                Err(BatchError::Repeated)
            }
            Some(error) => Err(BatchError::Storage(nats_error("committing")(&error))),
        };
    }
    Ok(0)
}

/// A commit waiting for its bucket's committer.
pub(super) struct Pending {
    messages: Vec<Conditional>,
    /// The encoded keys it writes or reads.
    touched: BTreeSet<String>,
    /// Whether it must go in a batch of its own (a listing's condition covers the whole
    /// bucket).
    alone: bool,
    answer: Option<oneshot::Sender<Result<(), BatchError>>>,
}

impl Pending {
    fn answer(&mut self, outcome: Result<(), BatchError>) {
        if let Some(answer) = self.answer.take() {
            let _ = answer.send(outcome);
        }
    }
}

/// Most commits a committer looks at, past the first, when it forms a group.
const GROUP_CANDIDATES: usize = 256;

/// A bucket's committer on this host: sends the commits waiting for it as one atomic
/// batch at a time, grouping those that touch no key in common (the server checks every
/// condition of a batch against the stream as it was before the batch, so two commits
/// of one key in one batch could both pass). A group refused as a whole is sent again
/// one commit a batch, so that each gets its own outcome; a refused batch stores nothing.
/// Grouping is what lets a plugin's commits go faster than one batch round trip each:
/// the server's answer to a batch costs it a fixed part (it stages each batch in a store
/// of its own) besides a part per message.
async fn run_committer(client: async_nats::Client, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(pending) => waiting.push_back(pending),
                None => return,
            }
        }
        while let Ok(pending) = queue.try_recv() {
            waiting.push_back(pending);
        }
        let mut group = next_group(&mut waiting);
        if group.len() > 1 {
            let messages: Vec<&Conditional> = group
                .iter()
                .flat_map(|pending| pending.messages.iter())
                .collect();
            if publish_batch(&client, messages.into_iter()).await.is_ok() {
                for pending in &mut group {
                    pending.answer(Ok(()));
                }
                continue;
            }
            // The group stored nothing: each commit goes again alone, for its own outcome.
        }
        for mut pending in group {
            let outcome = publish_batch(&client, pending.messages.iter()).await;
            pending.answer(outcome.map(|_| ()));
        }
    }
}

/// Takes the next group from `waiting` (not empty): the oldest commit, and after it those
/// that touch no key of the group or of a commit passed over, up to
/// [`MAX_BATCH_MESSAGES`]. A commit passed over (too large to fit, or touching a key of
/// the group) blocks its keys for the rest of the group, so that no commit overtakes an
/// earlier one of the same key. A commit that listed keys goes alone.
fn next_group(waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
    let Some(first) = waiting.pop_front() else {
        return Vec::new();
    };
    if first.alone {
        return vec![first];
    }
    let mut blocked = first.touched.clone();
    let mut size = first.messages.len();
    let mut group = vec![first];
    let mut passed = Vec::new();
    for _ in 0..GROUP_CANDIDATES {
        let Some(next) = waiting.pop_front() else {
            break;
        };
        let fits = !next.alone
            && size + next.messages.len() <= MAX_BATCH_MESSAGES
            && next.touched.is_disjoint(&blocked);
        blocked.extend(next.touched.iter().cloned());
        if fits {
            size += next.messages.len();
            group.push(next);
        } else {
            passed.push(next);
        }
    }
    while let Some(pending) = passed.pop() {
        waiting.push_front(pending);
    }
    group
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit of `messages` messages touching `keys`.
    fn commit(keys: &[&str], messages: usize, alone: bool) -> Pending {
        let message = Conditional {
            subject: "s".to_owned(),
            payload: Bytes::new(),
            expected: None,
            condition_on: None,
            headers: Vec::new(),
        };
        Pending {
            messages: vec![message; messages],
            touched: keys.iter().map(|key| (*key).to_owned()).collect(),
            alone,
            answer: None,
        }
    }

    fn keys(group: &[Pending]) -> Vec<Vec<String>> {
        group
            .iter()
            .map(|pending| pending.touched.iter().cloned().collect())
            .collect()
    }

    #[test]
    fn a_group_takes_disjoint_commits_and_none_overtakes_an_earlier_commit_of_its_keys() {
        let mut waiting: VecDeque<Pending> = [
            commit(&["a"], 3, false),
            commit(&["a"], 3, false),
            commit(&["b"], 3, false),
            commit(&["c"], MAX_BATCH_MESSAGES, false),
            commit(&["c", "d"], 3, false),
            commit(&["e"], 3, false),
        ]
        .into_iter()
        .collect();

        let first = next_group(&mut waiting);
        // The second `a` shares a key with the group; the big `c` does not fit, so the
        // later `c` may not go before it either.
        assert_eq!(keys(&first), [vec!["a"], vec!["b"], vec!["e"]]);
        assert_eq!(waiting.len(), 3);

        let second = next_group(&mut waiting);
        assert_eq!(keys(&second), [vec!["a"]]);
        let third = next_group(&mut waiting);
        assert_eq!(keys(&third), [vec!["c"]]);
        let fourth = next_group(&mut waiting);
        assert_eq!(keys(&fourth), [vec!["c", "d"]]);
        assert!(waiting.is_empty());
        assert!(next_group(&mut waiting).is_empty());
    }

    #[test]
    fn a_commit_that_listed_keys_goes_alone() {
        let mut waiting: VecDeque<Pending> = [
            commit(&["a"], 3, false),
            commit(&[], 2, true),
            commit(&["b"], 3, false),
        ]
        .into_iter()
        .collect();
        assert_eq!(keys(&next_group(&mut waiting)), [vec!["a"], vec!["b"]]);
        let alone = next_group(&mut waiting);
        assert_eq!(alone.len(), 1);
        assert!(alone[0].alone);
    }
}
