//! The commit protocol: how an attempt's effects (KV writes and emits) are stored with
//! its acknowledgement on JetStream, which has no transaction across streams and
//! buckets.
//!
//! Records, in the bucket `P-intents`: the plugin's commit lock under `<plugin>.lock`
//! (a [`LockRecord`]: holder, end of lease, the intent it commits) and one intent per
//! delivery under `<plugin>.<sequence>` (an [`Intent`]: each write with the revision its
//! key must still have, and the emits as the event stream stores them). The bucket drops
//! an entry [`COMMIT_RECORD_AGE`] after its last write.
//!
//! Effects without KV writes take no lock and leave no record: the reads are checked,
//! the emits published; the emits' ids derive from the handled event, so `Nats-Msg-Id`
//! drops what a repeat publishes again within the stream's dedupe window.
//!
//! Effects with KV writes ([`Shared::commit_effects`]), step by step (a host's own
//! commits of one plugin first queue for their turn in the host, so that only hosts, not
//! the calls of one host, compete for the lock through the server):
//! 1. **Lock.** Read `<plugin>.lock`. It is free when absent, deleted or unreadable,
//!    when its lease has run out, or when this host holds it for this same intent (a
//!    retried settlement). When a lease that ran out names another intent, finish that
//!    intent (step 7) first. Take the lock by compare-and-set on the entry's revision,
//!    naming this delivery's intent, with a lease of `ack_wait` that is never renewed.
//!    While others hold the lock, or win the race for it, try again (1 ms, doubling to
//!    50 ms) for `max(3 × ack_wait, LOCK_PATIENCE)`, then fail with a storage error.
//! 2. **Earlier intent.** An intent already stored for this delivery (an earlier try of
//!    this settlement stopped part way, or another host ran the event too) is the
//!    commit: finish it (step 7, which publishes its emits) and release the lock as in
//!    step 6, without checking the reads, which the intent's own writes would fail.
//! 3. **Reads.** Check each read against the bucket now: a value by its digest, a key
//!    listing by the digest of the keys; a difference is a conflict. The last write to
//!    each key wins; each write expects the revision its key has now (0: no entry).
//! 4. **Intent.** Store the intent if none exists (refused as too large past the
//!    server's `max_payload` less `HEADER_ROOM`). If one appeared meanwhile, finish it
//!    instead, or report a conflict when it is gone again.
//! 5. **Writes.** Apply each write by compare-and-set on its expected revision. When one
//!    fails, withdraw the intent by a purge expecting the revision it was stored with,
//!    then put the old value back under each key this commit already stored a value in,
//!    last first, expecting the revision it wrote (a delete it applied is not undone; a
//!    failed undo is logged), and report a conflict. If the withdrawal fails because a
//!    finisher has claimed the intent, the commit stands and reports success.
//! 6. **Emits, unlock.** Publish the emits; release the lock by a delete expecting the
//!    revision taken (a lock taken over after its lease stays with its new holder).
//!    After a storage error the lock is kept; after any other outcome it is released.
//!    The consumer then acknowledges without waiting for the server's word, and the
//!    intent stays as the delivery's commit record.
//! 7. **Finishing** an intent ([`Shared::finish_intent`]): claim it by writing it again
//!    unchanged, expecting its revision, so that its writer can no longer withdraw it
//!    (losing that race to another finisher is harmless; to a withdrawal, there is
//!    nothing to finish). Then apply each write whose key still has the expected
//!    revision (one that moved on was written by this intent already, or since) and
//!    publish the emits.
//!
//! A delivery handed out again whose intent exists ([`Shared::finish_left_intent`]) is
//! finished under the lock (kept if finishing fails) and acknowledged, never given to
//! the plugin.
//!
//! Invariants:
//! - An intent is stored before any of its writes, and every write of a commit or a
//!   finish is a compare-and-set against the revision the intent records (an undo in
//!   step 5, against the revision the commit wrote); so an intent applied twice, by two
//!   finishers or by a finisher and its writer, writes each key once.
//! - While a lease lasts, nobody else takes the plugin's lock, and no commit writes
//!   before the intent named by a lease that ran out is finished: no commit overtakes a
//!   half-applied one. The exclusion ends with the lease: a commit that outlasts
//!   `ack_wait` can be overtaken, and then only the compare-and-set of its writes
//!   protects it, not the checks of keys it read without writing.
//! - A stored intent is its delivery's commit: the settlement's retry, the redelivery and
//!   the next holder of a lock that names it all finish it rather than run or commit the
//!   event again. Only its writer withdraws it, and only before anyone claims it;
//!   otherwise it stays for [`COMMIT_RECORD_AGE`].
//! - Finishing repeats safely: the writes are conditional, and the emits' copies carry
//!   their `Nats-Msg-Id` (after the dedupe window they are stored again).
//!
//! What a host that dies leaves behind (its lease runs out `ack_wait` after it was
//! taken; its delivery goes to another host after `ack_wait`):
//! - before the intent is stored: nothing but perhaps the lock, which holds the plugin's
//!   other commits up until the lease runs out; the next holder finds no intent to
//!   finish, and the redelivered event runs again.
//! - after the intent is stored, with none, some or all writes applied and the emits
//!   published or not: the lock names the intent. The next commit of the plugin after
//!   the lease (step 1) and the redelivery both finish it, the first doing the work;
//!   the redelivery is then acknowledged without running the event.
//! - during the undo of step 5: the intent is withdrawn, so nobody finishes or undoes
//!   the writes still in place; the redelivered event runs again on top of them.
//! - after releasing the lock, before the acknowledgement (or with the acknowledgement
//!   lost): the redelivery finds the commit record, finishes it again (nothing left to
//!   write; the emits are dropped as copies) and acknowledges. A redelivery later than
//!   [`COMMIT_RECORD_AGE`] finds no record and runs the event again.
//!
//! A storage error rather than a death keeps the lock (step 6) so that no other commit
//! overtakes a half-applied intent: the retried settlement takes the lock again (same
//! host, same intent) and finishes its intent in step 2; without a retry, the lease runs
//! out and the next commit of the plugin (step 1) or the redelivery finishes it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::kv::{current, decode_key, encode_key, list_keys};
use super::messages::{decode_event, encode_event};
use super::{Shared, compare_and_set_failed, nats_error};
use crate::bus::BusError;
use crate::clock::now_ms;
use crate::effects::Effects;
use crate::event::Event;
use crate::kv::{KvRead, keys_digest, value_digest};

/// A plugin's commit lock, as the intents bucket keeps it under `<plugin>.lock`.
#[derive(Serialize, Deserialize)]
struct LockRecord {
    /// The host holding it.
    owner: String,
    /// When the lease runs out, in milliseconds since the Unix epoch.
    until_ms: i64,
    /// The journal key of the intent the holder commits.
    intent: String,
}

/// How long a commit record (an intent, kept after its commit) marks its delivery as
/// committed: a copy of the delivery that turns up later than this (a host stalled for a
/// day) would run again.
pub(super) const COMMIT_RECORD_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Least time a commit waits for its plugin's commit lock before reporting a storage
/// error (and being tried again).
const LOCK_PATIENCE: Duration = Duration::from_secs(30);

/// What a settlement with KV writes is about to commit; see the module docs.
#[derive(Serialize, Deserialize)]
struct Intent {
    writes: Vec<IntentWrite>,
    /// The emits, each as the event stream stores it, in base64.
    emits: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct IntentWrite {
    /// The encoded key.
    key: String,
    /// The value in base64; `None` deletes the key.
    value: Option<String>,
    /// The revision the key had when the attempt's reads were checked (0: no entry).
    expected: u64,
}

impl IntentWrite {
    /// Writes (or deletes) the key if it still has the expected revision; see
    /// [`put_expecting`].
    async fn apply(&self, store: &kv::Store) -> Result<Option<u64>, WriteError> {
        let value = self
            .value
            .as_deref()
            .map(|text| BASE64.decode(text))
            .transpose()
            .map_err(|error| {
                WriteError::Storage(BusError::Storage(format!(
                    "a commit intent is unreadable: {error}"
                )))
            })?;
        put_expecting(store, &self.key, value.map(Bytes::from), self.expected).await
    }
}

impl Intent {
    fn emits(&self) -> Result<Vec<Event>, BusError> {
        self.emits
            .iter()
            .map(|text| {
                let bytes = BASE64.decode(text).map_err(|error| {
                    BusError::Storage(format!("a commit intent is unreadable: {error}"))
                })?;
                decode_event(&bytes)
            })
            .collect()
    }
}

impl Shared {
    /// Commits an attempt's effects (see the module docs). Returns once the writes and
    /// emits are stored; the caller acknowledges.
    pub(super) async fn commit_effects(
        &self,
        plugin: &str,
        sequence: u64,
        effects: Effects,
    ) -> Result<(), BusError> {
        if effects.kv_writes.is_empty() {
            // Nothing to make atomic: the reads are checked, and the emits' ids make a
            // repeat harmless.
            self.check_reads(plugin, &effects.kv_reads).await?;
            self.publish_events(&effects.emits).await?;
            return Ok(());
        }
        let journal = Self::journal_key(plugin, sequence);
        let turn = self.commit_turn(plugin);
        let _turn = turn.lock().await;
        let lock = self.lock(plugin, &journal).await?;
        let committed = self.commit_locked(plugin, sequence, effects).await;
        // A storage failure may leave the intent half applied: the lock stays taken so
        // that no other commit overtakes it. The retry of this settlement takes it again
        // (same host, same intent); if none comes, the lease runs out and the next commit
        // of the plugin finishes the intent first.
        if !matches!(committed, Err(BusError::Storage(_))) {
            self.unlock(plugin, lock).await;
        }
        committed
    }

    /// Checks that what an attempt read is still committed; returns the revision and
    /// value of each key it read.
    async fn check_reads(
        &self,
        plugin: &str,
        reads: &[KvRead],
    ) -> Result<HashMap<String, (u64, Option<Bytes>)>, BusError> {
        let store = self.plugin_store(plugin).await?;
        let mut revisions: HashMap<String, (u64, Option<Bytes>)> = HashMap::new();
        for read in reads {
            match read {
                KvRead::Value { key, digest } => {
                    let encoded = encode_key(key);
                    let (revision, value) = current(&store, &encoded).await?;
                    if value.as_deref().map(value_digest) != *digest {
                        return Err(BusError::Conflict(key.clone()));
                    }
                    revisions.insert(encoded, (revision, value));
                }
                KvRead::Keys { prefix, digest } => {
                    let keys = list_keys(&store, prefix).await?;
                    if keys_digest(keys.iter().map(String::as_str)) != *digest {
                        return Err(BusError::Conflict(format!("{prefix}*")));
                    }
                }
            }
        }
        Ok(revisions)
    }

    /// Commits effects with KV writes, under the plugin's commit lock.
    async fn commit_locked(
        &self,
        plugin: &str,
        sequence: u64,
        effects: Effects,
    ) -> Result<(), BusError> {
        // An intent already written for this delivery (an earlier try of this settlement
        // failed part way, or another host ran the event too) is the commit: finish it.
        // Checking the reads first would report the intent's own writes as a conflict.
        let journal = Self::journal_key(plugin, sequence);
        if self.finish_intent(plugin, &journal).await? {
            return Ok(());
        }
        let store = self.plugin_store(plugin).await?;
        let mut revisions = self.check_reads(plugin, &effects.kv_reads).await?;
        // The last write to each key wins.
        let mut last: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        for write in effects.kv_writes {
            last.insert(encode_key(&write.key), write.value);
        }
        let mut writes = Vec::with_capacity(last.len());
        let mut before = HashMap::new();
        for (key, value) in last {
            let (expected, old) = match revisions.remove(&key) {
                Some(seen) => seen,
                None => current(&store, &key).await?,
            };
            before.insert(key.clone(), old);
            writes.push(IntentWrite {
                key,
                value: value.map(|bytes| BASE64.encode(bytes)),
                expected,
            });
        }
        let intent = Intent {
            writes,
            emits: effects
                .emits
                .iter()
                .map(|event| BASE64.encode(encode_event(event)))
                .collect(),
        };
        let body = serde_json::to_vec(&intent).unwrap_or_default();
        self.check_size(
            || "the attempt's effects (KV writes and emits)".to_owned(),
            body.len(),
        )?;
        let intent_revision = match self.intents.create(&journal, Bytes::from(body)).await {
            Ok(revision) => revision,
            Err(error)
                if error.kind() == kv::CreateErrorKind::AlreadyExists
                    || compare_and_set_failed(&error) =>
            {
                // An earlier try of this settlement (or another host holding this
                // delivery) wrote its intent: finish that one rather than commit twice.
                return if self.finish_intent(plugin, &journal).await? {
                    Ok(())
                } else {
                    Err(BusError::Conflict(journal))
                };
            }
            Err(error) => return Err(nats_error("writing the commit intent")(&error)),
        };
        let mut applied: Vec<(String, u64)> = Vec::new();
        for write in &intent.writes {
            match write.apply(&store).await {
                Ok(Some(revision)) => applied.push((write.key.clone(), revision)),
                Ok(None) => {}
                Err(WriteError::Conflict) => {
                    // Another call of this plugin committed to this key since the reads
                    // were checked: withdraw the intent, undo what this commit applied,
                    // then report it. A host that claimed the intent first is finishing
                    // it; then it stands and nothing is undone.
                    if let Err(error) = self
                        .intents
                        .purge_expect_revision(&journal, Some(intent_revision))
                        .await
                    {
                        if error.kind() == kv::UpdateErrorKind::WrongLastRevision
                            || compare_and_set_failed(&error)
                        {
                            return Ok(());
                        }
                        return Err(nats_error("withdrawing a commit intent")(&error));
                    }
                    for (key, revision) in applied.iter().rev() {
                        let old = before.get(key).cloned().flatten();
                        if let Err(error) = put_expecting(&store, key, old, *revision).await {
                            tracing::warn!(%plugin, key = %key, ?error, "cannot undo a KV write after a conflict");
                        }
                    }
                    return Err(BusError::Conflict(
                        decode_key(&write.key).unwrap_or_else(|| write.key.clone()),
                    ));
                }
                Err(WriteError::Storage(error)) => return Err(error),
            }
        }
        self.publish_events(&intent.emits()?).await?;
        Ok(())
    }

    /// This host's turn at the plugin's commit lock: the host's own commits of a plugin
    /// queue here, in order, rather than race each other for the lock through the
    /// server and back off.
    fn commit_turn(&self, plugin: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self
            .commit_turns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(turns.entry(plugin.to_owned()).or_default())
    }

    /// Takes the plugin's commit lock for the intent `journal`, waiting while another
    /// host holds a live lease. A lease that ran out belonged to a host that died (or
    /// stalled) mid-commit: its intent is finished first, which is exact because no
    /// other commit of the plugin could write in between. Returns the lock's revision.
    async fn lock(&self, plugin: &str, journal: &str) -> Result<u64, BusError> {
        let key = format!("{plugin}.lock");
        let lease = i64::try_from(self.options.ack_wait.as_millis()).unwrap_or(i64::MAX);
        let patience = (self.options.ack_wait * 3).max(LOCK_PATIENCE);
        let deadline = tokio::time::Instant::now() + patience;
        let mut wait = Duration::from_millis(1);
        loop {
            let entry = self
                .intents
                .entry(&key)
                .await
                .map_err(storage!("reading the commit lock"))?;
            let (revision, holder) = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => (
                    entry.revision,
                    serde_json::from_slice::<LockRecord>(&entry.value).ok(),
                ),
                Some(entry) => (entry.revision, None),
                None => (0, None),
            };
            let free = holder.as_ref().is_none_or(|held| {
                held.until_ms < now_ms() || (held.owner == self.owner && held.intent == journal)
            });
            if free {
                // A lease that ran out names an intent its holder may have left half
                // applied: finish it before any other commit of the plugin can write.
                if let Some(dead) = holder.as_ref().filter(|held| held.intent != journal) {
                    self.finish_intent(plugin, &dead.intent).await?;
                }
                let record = LockRecord {
                    owner: self.owner.clone(),
                    until_ms: now_ms().saturating_add(lease),
                    intent: journal.to_owned(),
                };
                let body = Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
                match self.intents.update(&key, body, revision).await {
                    Ok(taken) => return Ok(taken),
                    Err(error)
                        if error.kind() == kv::UpdateErrorKind::WrongLastRevision
                            || compare_and_set_failed(&error) => {}
                    Err(error) => return Err(nats_error("taking the commit lock")(&error)),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BusError::Storage(format!(
                    "the KV commit lock of plugin `{plugin}` stayed taken for {patience:?}"
                )));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
        }
    }

    async fn unlock(&self, plugin: &str, revision: u64) {
        let key = format!("{plugin}.lock");
        if let Err(error) = self
            .intents
            .delete_expect_revision(&key, Some(revision))
            .await
        {
            // The lease ran out and another host took the lock: nothing to release.
            tracing::debug!(%plugin, %error, "commit lock not released");
        }
    }

    /// Finishes an intent left behind: claims it (a new revision, so that the host that
    /// wrote it can no longer withdraw it), applies each write whose key still has the
    /// expected revision (a key that moved on was written by this intent already, or
    /// since), then publishes the emits. Returns `false` when there is no intent (none
    /// was written, or its host withdrew it).
    async fn finish_intent(&self, plugin: &str, journal: &str) -> Result<bool, BusError> {
        let entry = self
            .intents
            .entry(journal)
            .await
            .map_err(storage!("reading a commit intent"))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(false);
        };
        match self
            .intents
            .update(journal, entry.value.clone(), entry.revision)
            .await
        {
            Ok(_) => {}
            Err(error)
                if error.kind() == kv::UpdateErrorKind::WrongLastRevision
                    || compare_and_set_failed(&error) =>
            {
                // Withdrawn meanwhile, or claimed by another host finishing it too (which
                // is harmless: writes are conditional and emits deduplicated).
                let still_there = self
                    .intents
                    .get(journal)
                    .await
                    .map_err(storage!("reading a commit intent"))?
                    .is_some();
                if !still_there {
                    return Ok(false);
                }
            }
            Err(error) => return Err(nats_error("claiming a commit intent")(&error)),
        }
        let intent: Intent = serde_json::from_slice(&entry.value).map_err(|error| {
            BusError::Storage(format!(
                "the commit intent {journal} is unreadable: {error}"
            ))
        })?;
        let store = self.plugin_store(plugin).await?;
        for write in &intent.writes {
            match write.apply(&store).await {
                Ok(_) | Err(WriteError::Conflict) => {}
                Err(WriteError::Storage(error)) => return Err(error),
            }
        }
        self.publish_events(&intent.emits()?).await?;
        Ok(true)
    }

    /// Finishes, under the plugin's commit lock, the intent a delivery's earlier holder
    /// left; `false` when there is none.
    pub(super) async fn finish_left_intent(
        &self,
        plugin: &str,
        sequence: u64,
    ) -> Result<bool, BusError> {
        let journal = Self::journal_key(plugin, sequence);
        let exists = self
            .intents
            .get(&journal)
            .await
            .map_err(storage!("reading a commit intent"))?
            .is_some();
        if !exists {
            return Ok(false);
        }
        let turn = self.commit_turn(plugin);
        let _turn = turn.lock().await;
        let lock = self.lock(plugin, &journal).await?;
        let finished = self.finish_intent(plugin, &journal).await;
        if finished.is_ok() {
            self.unlock(plugin, lock).await;
        }
        finished
    }
}

#[derive(Debug)]
enum WriteError {
    Conflict,
    Storage(BusError),
}

/// Writes (or deletes) a key if it still has the expected revision; returns the new
/// revision, or `None` when a delete found nothing to delete.
async fn put_expecting(
    store: &kv::Store,
    key: &str,
    value: Option<Bytes>,
    expected: u64,
) -> Result<Option<u64>, WriteError> {
    let result = match value {
        Some(value) => store.update(key, value, expected).await.map(Some),
        None if expected == 0 => return Ok(None),
        None => store
            .delete_expect_revision(key, Some(expected))
            .await
            .map(|()| None),
    };
    result.map_err(|error| {
        if error.kind() == kv::UpdateErrorKind::WrongLastRevision || compare_and_set_failed(&error)
        {
            WriteError::Conflict
        } else {
            WriteError::Storage(nats_error("writing KV")(&error))
        }
    })
}
