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
//! Invariants: a waiter that subscribed before its event was appended hears every notice
//! published after, on any host; each subscription holds a bounded queue and unregisters
//! itself when dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
}

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

/// Notices within one process: a map from event to the queues of its waiters.
#[derive(Default, Clone)]
pub struct LocalNotices {
    waiters: Arc<Mutex<Waiters>>,
    /// How many waiters are registered, read without the lock: settlements with nobody
    /// waiting (nearly all of them) cost one atomic load.
    listening: Arc<AtomicUsize>,
    next_id: Arc<AtomicU64>,
}

impl LocalNotices {
    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
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
        if self.listening.load(Ordering::Relaxed) == 0 {
            return;
        }
        let waiters = self.waiters();
        let key = notice_key(source, id);
        for (_, queue) in waiters.get(&key).into_iter().flatten() {
            if queue.try_send(make()).is_err() {
                tracing::debug!(event_id = %id, "a waiter's notice queue is full; notice dropped");
            }
        }
    }

    async fn listen(&self, source: &str, id: &str) -> Result<BoxStream<'static, Notice>, BusError> {
        let key = notice_key(source, id);
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
}
