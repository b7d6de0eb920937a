//! A plugin's acknowledged KV writes whose commits are still in flight, so that the
//! plugin's next calls read them rather than the older committed values.
//!
//! A call's settlement commits after the call returns, while the plugin already runs its
//! next call. Reading only committed KV, that next call would see the value the previous
//! call replaced, and its commit would then fail the optimistic check: a conflict
//! between two calls that never ran at the same time. So when an attempt ends with KV
//! writes, the dispatcher registers them here ([`PendingWrites::begin`]) before the next
//! call starts, and keeps them until its settlement ends. A call that starts while some
//! are registered reads through an [`Overlay`]: a key with a pending write reads as that
//! write, and the call records the commit it read from. Before its own settlement, it
//! waits for those commits to end ([`Overlay::settled`]), so its reads are checked
//! against the state they came from.
//!
//! Invariants:
//! - a pending write is visible from its registration until its commit ends (stored,
//!   refused, or dropped at shutdown), then the committed state answers again;
//! - of several pending writes to one key, the latest registered is read;
//! - a commit waits only for commits registered before its call read them, so waits
//!   never form a cycle;
//! - a read of a write whose commit was refused fails the reader's check, which runs the
//!   reader again on the committed state, as any conflict does;
//! - a commit that writes a key that an earlier commit in flight writes, and that earlier
//!   commit is held back (it waits for commits it read from, or for others in turn),
//!   waits for it to end ([`PendingCommit::after_earlier_writes`]): otherwise the later
//!   call's commit could go first and the older value land last, even when neither call
//!   read the key (a blind write checks nothing at commit that would catch it). Earlier
//!   commits that are not held back go to the bus first, in the order the calls ended,
//!   as commits do; waiting for them too would take every blind write of a hot key out
//!   of the log's group commits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::kv::{KvError, KvSource, KvWrite};
use crate::stream::StreamPage;

/// One plugin's pending writes.
#[derive(Default)]
pub(super) struct PendingWrites {
    /// Commits registered and not ended, readable without the lock.
    in_flight: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_token: u64,
    /// Per key, the latest pending write.
    keys: BTreeMap<String, PendingWrite>,
}

/// A write waiting for its commit.
struct PendingWrite {
    /// The commit it belongs to.
    token: u64,
    /// The value, `None` for a deletion.
    value: Option<Vec<u8>>,
    /// Turns `true` when the commit ends.
    ended: watch::Receiver<bool>,
    /// Whether the commit waits for other commits before it goes to the bus.
    held: bool,
}

/// A registered commit; dropping it ends it.
pub(super) struct PendingCommit {
    writes: Arc<PendingWrites>,
    token: u64,
    keys: Vec<String>,
    ended: watch::Sender<bool>,
    /// The ends of the earlier commits in flight that write a key this one writes.
    after: Vec<watch::Receiver<bool>>,
}

impl PendingWrites {
    /// Registers an acknowledged attempt's KV writes until the returned commit is dropped;
    /// `None` when it wrote nothing. `read` is what its call read through, if anything.
    pub(super) fn begin(
        self: &Arc<Self>,
        writes: &[KvWrite],
        read: Option<&Overlay>,
    ) -> Option<PendingCommit> {
        if writes.is_empty() {
            return None;
        }
        let (ended, receiver) = watch::channel(false);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let token = state.next_token;
        state.next_token += 1;
        let after: Vec<watch::Receiver<bool>> = writes
            .iter()
            .filter_map(|write| state.keys.get(&write.key))
            .filter(|earlier| earlier.held && earlier.token != token)
            .map(|earlier| earlier.ended.clone())
            .collect();
        let held = !after.is_empty() || read.is_some_and(Overlay::read_in_flight);
        for write in writes {
            state.keys.insert(
                write.key.clone(),
                PendingWrite {
                    token,
                    value: write.value.clone(),
                    ended: receiver.clone(),
                    held,
                },
            );
        }
        drop(state);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(PendingCommit {
            writes: Arc::clone(self),
            token,
            keys: writes.iter().map(|w| w.key.clone()).collect(),
            ended,
            after,
        })
    }

    /// The KV a call starting now reads: the committed state with the pending writes
    /// over it, or the committed state alone when nothing is pending.
    pub(super) fn reader(
        self: &Arc<Self>,
        committed: &Arc<dyn KvSource>,
    ) -> (Arc<dyn KvSource>, Option<Arc<Overlay>>) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            return (Arc::clone(committed), None);
        }
        let overlay = Arc::new(Overlay {
            committed: Arc::clone(committed),
            writes: Arc::clone(self),
            read_from: Mutex::default(),
        });
        (Arc::clone(&overlay) as Arc<dyn KvSource>, Some(overlay))
    }
}

impl PendingCommit {
    /// Whether it must wait for earlier commits before its own goes.
    pub(super) fn follows_earlier_writes(&self) -> bool {
        !self.after.is_empty()
    }

    /// Waits until every earlier commit in flight that writes a key this one writes has
    /// ended.
    pub(super) async fn after_earlier_writes(&self) {
        for ended in &self.after {
            // An error means the commit's owner is gone: it has ended too.
            let _ = ended.clone().wait_for(|ended| *ended).await;
        }
    }
}

impl Drop for PendingCommit {
    fn drop(&mut self) {
        let mut state = self
            .writes
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for key in &self.keys {
            if state
                .keys
                .get(key)
                .is_some_and(|write| write.token == self.token)
            {
                state.keys.remove(key);
            }
        }
        drop(state);
        self.writes.in_flight.fetch_sub(1, Ordering::AcqRel);
        let _ = self.ended.send(true);
    }
}

/// One call's view of KV: pending writes over the committed state.
pub(super) struct Overlay {
    committed: Arc<dyn KvSource>,
    writes: Arc<PendingWrites>,
    /// The ends of the commits this call read from.
    read_from: Mutex<Vec<watch::Receiver<bool>>>,
}

impl Overlay {
    /// Waits until every commit this call read from has ended.
    pub(super) async fn settled(&self) {
        let waits: Vec<watch::Receiver<bool>> = std::mem::take(
            &mut *self
                .read_from
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for mut ended in waits {
            // An error means the commit's owner is gone: it has ended too.
            let _ = ended.wait_for(|ended| *ended).await;
        }
    }

    /// Whether the call read a write in flight, so that its own commit waits for that one.
    fn read_in_flight(&self) -> bool {
        !self
            .read_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    fn depend(&self, ended: &watch::Receiver<bool>) {
        let mut read_from = self
            .read_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A key read again and again adds no new commit to wait for.
        if !read_from.iter().any(|known| known.same_channel(ended)) {
            read_from.push(ended.clone());
        }
    }
}

#[async_trait]
impl KvSource for Overlay {
    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let pending = self
            .writes
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .get(key)
            .map(|write| (write.value.clone(), write.ended.clone()));
        match pending {
            Some((value, ended)) => {
                self.depend(&ended);
                Ok(value)
            }
            None => self.committed.get(plugin, key).await,
        }
    }

    async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        // The pending writes first, as `get` reads them: one whose commit ends meanwhile
        // is then in the committed listing, rather than in neither.
        let pending: Vec<(String, bool, watch::Receiver<bool>)> = self
            .writes
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .range(prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, write)| (key.clone(), write.value.is_some(), write.ended.clone()))
            .collect();
        let mut keys = self.committed.keys(plugin, prefix).await?;
        for (key, present, ended) in pending {
            self.depend(&ended);
            match (present, keys.binary_search(&key)) {
                (true, Err(at)) => keys.insert(at, key),
                (false, Ok(at)) => {
                    keys.remove(at);
                }
                _ => {}
            }
        }
        Ok(keys)
    }

    // Streams and schedules are read as committed: an in-flight commit that changes them
    // makes this call's commit conflict and run again, which is rarer than for KV (a
    // stream is usually appended to by many plugins' events, not by one plugin's calls).
    async fn read_stream(
        &self,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<StreamPage, KvError> {
        self.committed.read_stream(subject, after, limit).await
    }

    async fn scheduled(&self, id: &str) -> Result<bool, KvError> {
        self.committed.scheduled(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::EmptyKv;

    fn write(key: &str, value: Option<&str>) -> KvWrite {
        KvWrite {
            key: key.to_owned(),
            value: value.map(|v| v.as_bytes().to_vec()),
        }
    }

    #[tokio::test]
    async fn pending_writes_are_read_until_their_commit_ends() {
        let writes = Arc::new(PendingWrites::default());
        let committed: Arc<dyn KvSource> = Arc::new(EmptyKv);
        let (_, none) = writes.reader(&committed);
        assert!(none.is_none(), "nothing pending: the committed state alone");

        let first = writes.begin(&[write("count/a", Some("1")), write("gone", None)], None);
        let second = writes.begin(&[write("count/a", Some("2"))], None);
        let (kv, overlay) = writes.reader(&committed);
        let overlay = overlay.unwrap();
        assert_eq!(kv.get("p", "count/a").await.unwrap(), Some(b"2".to_vec()));
        assert_eq!(kv.get("p", "gone").await.unwrap(), None);
        assert_eq!(kv.keys("p", "count/").await.unwrap(), vec!["count/a"]);

        // The reader waits for the commits it read from.
        let waiting = tokio::spawn(async move { overlay.settled().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(second);
        drop(first);
        waiting.await.unwrap();

        let (kv, overlay) = writes.reader(&committed);
        assert!(overlay.is_none());
        assert_eq!(kv.get("p", "count/a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_older_commit_ending_keeps_a_newer_write_of_the_key() {
        let writes = Arc::new(PendingWrites::default());
        let committed: Arc<dyn KvSource> = Arc::new(EmptyKv);
        let first = writes.begin(&[write("k", Some("1"))], None);
        let _second = writes.begin(&[write("k", Some("2"))], None);
        drop(first);
        let (kv, _) = writes.reader(&committed);
        assert_eq!(kv.get("p", "k").await.unwrap(), Some(b"2".to_vec()));
    }

    /// A commit that overwrites a key written by an earlier commit in flight that is held
    /// back (it read a write in flight) goes after it, whether or not its call read the
    /// key: otherwise the older value could land last. One overwriting a commit that is
    /// not held back goes at once, after it in the bus's order.
    #[tokio::test]
    async fn a_commit_overwriting_a_held_back_write_waits_for_it() {
        let writes = Arc::new(PendingWrites::default());
        let committed: Arc<dyn KvSource> = Arc::new(EmptyKv);
        let source = writes.begin(&[write("x", Some("1"))], None);
        // A call that reads `x` in flight and writes `k`: held back until `source` ends.
        let (kv, read) = writes.reader(&committed);
        let read = read.unwrap();
        assert_eq!(kv.get("p", "x").await.unwrap(), Some(b"1".to_vec()));
        let held = writes.begin(&[write("k", Some("1"))], Some(&read));
        // A later call writing `k` without reading it.
        let (_, later_read) = writes.reader(&committed);
        let later = writes
            .begin(&[write("k", Some("2"))], later_read.as_deref())
            .unwrap();
        assert!(later.follows_earlier_writes());
        // Writing a key whose earlier commit is not held back needs no wait.
        let free = writes.begin(&[write("y", Some("1"))], None);
        let (_, free_read) = writes.reader(&committed);
        let after_free = writes
            .begin(&[write("y", Some("2"))], free_read.as_deref())
            .unwrap();
        assert!(!after_free.follows_earlier_writes());

        let waiting = tokio::spawn(async move {
            later.after_earlier_writes().await;
            later
        });
        tokio::task::yield_now().await;
        drop(source);
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "`k`'s earlier commit is still in flight"
        );
        drop(held);
        let later = waiting.await.unwrap();
        // Waiting leaves it registered: its own write is read until it ends.
        let (kv, _) = writes.reader(&committed);
        assert_eq!(kv.get("p", "k").await.unwrap(), Some(b"2".to_vec()));
        drop((later, free, after_free));
    }
}
