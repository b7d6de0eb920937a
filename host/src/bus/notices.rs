//! Settlement notices: word of how each plugin's attempt on an event ended, for the
//! producers waiting on it (`?wait=`). Notices only observe: publishing one never
//! changes delivery, and a notice nobody waits for is dropped.
//!
//! On the embedded log notices stay in the process ([`LocalNotices`]); on NATS they are
//! core messages on a subject derived from the event's `(source, id)`, so a waiter on any
//! host hears the plugins of every host, and only events appended with
//! [`Bus::append_watched`](super::Bus::append_watched) publish them (a message header
//! marks those), so settlements nobody waits for cost nothing.
//!
//! The notices of an event a producer waited for are also kept for a while
//! ([`Notices::recorded`]), so that a producer who resends it with `?wait=` (its first
//! answer lost, or cut short by the wait) is answered with what happened: on the embedded
//! log in memory, for [`RECORDED_FOR`] and at most [`RECORDED_BYTES`] (a restart forgets
//! them); on NATS in a stream that keeps them for the bus's `duplicate_window`.
//!
//! Invariants: a waiter that subscribed before its event was appended hears every notice
//! published after, on any host; each subscription holds a bounded queue and unregisters
//! itself when dropped. A waiter that listens before it reads the recorded notices misses
//! none: each one is recorded or heard, or both.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::BusError;
use crate::event::Event;
use crate::failure::AttemptError;

/// How a plugin's attempt on an event ended, as a waiter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoticeOutcome {
    /// Handled; its effects are committed.
    Ok,
    /// Failed; another attempt is scheduled.
    Retrying,
    /// Moved to the dead letters after failing (attempts or age ran out, or a rule broken).
    DeadLettered,
    /// The plugin rejected it; it is in the dead letters.
    Rejected,
}

impl NoticeOutcome {
    /// Whether the plugin is done with the event.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Retrying)
    }
}

/// One settled attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The plugin.
    pub plugin: String,
    /// How the attempt ended.
    pub outcome: NoticeOutcome,
    /// Which attempt, from 1.
    pub attempt: u32,
    /// The attempt's error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AttemptError>,
    /// The events it emitted, when it succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emitted: Vec<Event>,
}

/// Publishing and hearing notices.
#[async_trait]
pub trait Notices: Send + Sync {
    /// Publishes the notice `make` builds about the event `(source, id)` (built only if
    /// someone may hear it); never waits and never fails (a notice that cannot be sent is
    /// logged and dropped).
    fn notify(&self, source: &str, id: &str, make: &dyn Fn() -> Notice);

    /// Hears the notices about `(source, id)` published from now on, until dropped.
    async fn listen(&self, source: &str, id: &str) -> Result<BoxStream<'static, Notice>, BusError>;

    /// The notices published so far about `(source, id)`, oldest first, if a producer
    /// waited for it recently enough (see the module docs); none otherwise.
    async fn recorded(&self, source: &str, id: &str) -> Result<Vec<Notice>, BusError>;
}

/// How long the embedded log keeps the notices of an event a producer waited for.
pub const RECORDED_FOR: Duration = Duration::from_secs(600);

/// Most bytes of recorded events and their notices the embedded log keeps; the events
/// first waited for longest ago are forgotten first.
pub const RECORDED_BYTES: usize = 64 << 20;

/// Notices one waiter may have queued and unread; more are dropped (a waiter reads as
/// they come, and an event has few plugins and attempts within a wait).
pub const NOTICE_QUEUE: usize = 256;

/// A short, subject-safe name of the event `(source, id)`.
pub fn notice_key(source: &str, id: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(source.as_bytes());
    hash.update([0]);
    hash.update(id.as_bytes());
    hex::encode(&hash.finalize()[..16])
}

/// By event key, the queues of its waiters, each with the waiter's number.
type Waiters = HashMap<String, Vec<(u64, mpsc::Sender<Notice>)>>;

/// Notices within one process: a map from event to the queues of its waiters, and the
/// notices of the events waited for recently.
#[derive(Default, Clone)]
pub struct LocalNotices {
    waiters: Arc<Mutex<Waiters>>,
    /// How many waiters are registered, read without the lock: settlements with nobody
    /// waiting (nearly all of them) cost one atomic load.
    listening: Arc<AtomicUsize>,
    next_id: Arc<AtomicU64>,
    recorded: Arc<Mutex<Recorded>>,
    /// How many events `recorded` holds, read without its lock, as `listening` is.
    recording: Arc<AtomicUsize>,
}

/// The notices of the events waited for within [`RECORDED_FOR`], by event key.
#[derive(Default)]
struct Recorded {
    by_event: HashMap<String, Vec<Notice>>,
    /// The keys in the order their events were first waited for, with when: the oldest
    /// go first.
    order: VecDeque<(Instant, String)>,
    /// About the bytes the entries and their notices take.
    bytes: usize,
}

/// About the bytes an event's entry takes before its notices: its key twice, the map's
/// and the queue's slots.
const ENTRY_BYTES: usize = 160;

impl Recorded {
    fn forget_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_front()
            && let Some(notices) = self.by_event.remove(&key)
        {
            let bytes = ENTRY_BYTES + notices.iter().map(notice_bytes).sum::<usize>();
            self.bytes = self.bytes.saturating_sub(bytes);
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(since, _)| now.duration_since(*since) > RECORDED_FOR)
        {
            self.forget_oldest();
        }
        while self.bytes > RECORDED_BYTES && !self.order.is_empty() {
            self.forget_oldest();
        }
    }
}

/// About the bytes a recorded notice holds.
fn notice_bytes(notice: &Notice) -> usize {
    let emitted: usize = notice
        .emitted
        .iter()
        .map(|event| {
            event.data.len()
                + event.id.len()
                + event.source.len()
                + event.ty.len()
                + event
                    .extensions
                    .iter()
                    .map(|(name, value)| name.len() + value.len())
                    .sum::<usize>()
        })
        .sum();
    notice.plugin.len() + notice.error.as_ref().map_or(0, |e| e.message.len()) + emitted + 64
}

impl LocalNotices {
    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts recording the notices of the event `key` (a producer waits for it).
    fn record(&self, key: &str) {
        let now = Instant::now();
        let mut recorded = self.records();
        recorded.expire(now);
        if !recorded.by_event.contains_key(key) {
            recorded.by_event.insert(key.to_owned(), Vec::new());
            recorded.order.push_back((now, key.to_owned()));
            recorded.bytes += ENTRY_BYTES;
            recorded.expire(now);
        }
        self.recording
            .store(recorded.by_event.len(), Ordering::Relaxed);
    }
}

/// Takes a waiter's queue out of the map when its stream is dropped.
struct Unregister {
    notices: LocalNotices,
    key: String,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        self.notices.listening.fetch_sub(1, Ordering::Relaxed);
        let mut waiters = self.notices.waiters();
        if let Some(queues) = waiters.get_mut(&self.key) {
            queues.retain(|(id, _)| *id != self.id);
            if queues.is_empty() {
                waiters.remove(&self.key);
            }
        }
    }
}

#[async_trait]
impl Notices for LocalNotices {
    fn notify(&self, source: &str, id: &str, make: &dyn Fn() -> Notice) {
        if self.listening.load(Ordering::Relaxed) == 0
            && self.recording.load(Ordering::Relaxed) == 0
        {
            return;
        }
        let key = notice_key(source, id);
        {
            let mut recorded = self.records();
            if let Some(notices) = recorded.by_event.get_mut(&key) {
                let notice = make();
                let bytes = notice_bytes(&notice);
                notices.push(notice);
                recorded.bytes += bytes;
                recorded.expire(Instant::now());
                self.recording
                    .store(recorded.by_event.len(), Ordering::Relaxed);
            }
        }
        let waiters = self.waiters();
        for (_, queue) in waiters.get(&key).into_iter().flatten() {
            if queue.try_send(make()).is_err() {
                tracing::debug!(event_id = %id, "a waiter's notice queue is full; notice dropped");
            }
        }
    }

    async fn listen(&self, source: &str, id: &str) -> Result<BoxStream<'static, Notice>, BusError> {
        let key = notice_key(source, id);
        self.record(&key);
        let waiter = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(NOTICE_QUEUE);
        self.waiters()
            .entry(key.clone())
            .or_default()
            .push((waiter, sender));
        self.listening.fetch_add(1, Ordering::Relaxed);
        let guard = Unregister {
            notices: self.clone(),
            key,
            id: waiter,
        };
        Ok(Box::pin(futures_util::stream::unfold(
            (receiver, guard),
            |(mut receiver, guard)| async move {
                let notice = receiver.recv().await?;
                Some((notice, (receiver, guard)))
            },
        )))
    }

    async fn recorded(&self, source: &str, id: &str) -> Result<Vec<Notice>, BusError> {
        let key = notice_key(source, id);
        let mut recorded = self.records();
        recorded.expire(Instant::now());
        Ok(recorded.by_event.get(&key).cloned().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn notice(plugin: &str) -> Notice {
        Notice {
            plugin: plugin.to_owned(),
            outcome: NoticeOutcome::Ok,
            attempt: 1,
            error: None,
            emitted: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_listener_hears_its_event_only_and_unregisters_when_dropped() {
        let notices = LocalNotices::default();
        let mut heard = notices.listen("/s", "a").await.unwrap();
        notices.notify("/s", "b", &|| notice("other-event"));
        notices.notify("/s", "a", &|| notice("mine"));
        assert_eq!(heard.next().await.unwrap().plugin, "mine");
        drop(heard);
        assert!(notices.waiters().is_empty());
        assert_eq!(notices.listening.load(Ordering::Relaxed), 0);
        assert_ne!(notice_key("/s", "a"), notice_key("/s", "b"));
        assert_ne!(notice_key("/sa", ""), notice_key("/s", "a"));
    }

    #[tokio::test]
    async fn the_notices_of_an_event_waited_for_are_recorded_after_its_waiter_left() {
        let notices = LocalNotices::default();
        notices.notify("/s", "a", &|| notice("before anyone waited"));
        let heard = notices.listen("/s", "a").await.unwrap();
        drop(heard);
        notices.notify("/s", "a", &|| notice("first"));
        notices.notify("/s", "b", &|| notice("not waited for"));
        notices.notify("/s", "a", &|| notice("second"));
        let recorded = notices.recorded("/s", "a").await.unwrap();
        let plugins: Vec<&str> = recorded.iter().map(|n| n.plugin.as_str()).collect();
        assert_eq!(plugins, ["first", "second"]);
        assert_eq!(notices.recorded("/s", "b").await.unwrap(), Vec::new());
    }

    #[test]
    fn recorded_notices_are_forgotten_oldest_first_past_their_time_or_bytes() {
        let notices = LocalNotices::default();
        notices.record("old");
        notices.record("new");
        let mut recorded = notices.records();
        for key in ["old", "new"] {
            recorded.by_event.get_mut(key).unwrap().push(notice(key));
        }
        recorded.expire(Instant::now());
        assert_eq!(recorded.by_event.len(), 2);
        // Over by what the oldest event takes: that event alone goes.
        recorded.bytes = RECORDED_BYTES + ENTRY_BYTES + notice_bytes(&notice("old"));
        recorded.expire(Instant::now());
        assert!(!recorded.by_event.contains_key("old"));
        assert!(recorded.by_event.contains_key("new"));
        recorded.expire(Instant::now() + RECORDED_FOR + Duration::from_secs(1));
        assert!(recorded.by_event.is_empty() && recorded.order.is_empty());
    }
}
