//! Watches the plugin directory and asks the registry to reconcile after changes.
//!
//! In `events` mode a file-system watcher (`notify`) signals changes; the watcher waits
//! until the directory has been quiet for the quiet period (debounce: a deploy that
//! writes a file in chunks, or a `.wasm` and its sidecar, is taken as one change) and
//! then reconciles. A scan every poll interval backs it up, and is all there is in
//! `poll` mode, for file systems without events.
//!
//! Failure modes: when the event watcher cannot start, or stops delivering, the loop
//! says so once in the log and goes on polling; it never waits on a source that has
//! gone. Whatever the mode, it returns as soon as `stop` turns true.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher as _;
use tokio::sync::{mpsc, watch};

use super::Registry;
use crate::config::{WatchMode, WatchSection};

/// Where change signals come from: a started event watcher, kept alive while the loop
/// runs (dropping it stops its events).
pub type EventWatcher = Box<dyn Send>;

/// Starts the platform's event watcher on `dir`, sending `()` on every change.
fn start_notify(dir: &Path, changed: mpsc::UnboundedSender<()>) -> notify::Result<EventWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = changed.send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(Box::new(watcher))
}

/// Runs until `stop` turns true.
pub async fn watch(
    registry: Arc<Registry>,
    dir: PathBuf,
    settings: WatchSection,
    stop: watch::Receiver<bool>,
) {
    watch_with(registry, dir, settings, stop, start_notify).await;
}

/// [`watch()`] with the event watcher started by `start_events`, so the fallback to polling
/// can be exercised where the platform's watcher works.
pub async fn watch_with(
    registry: Arc<Registry>,
    dir: PathBuf,
    settings: WatchSection,
    mut stop: watch::Receiver<bool>,
    start_events: impl FnOnce(&Path, mpsc::UnboundedSender<()>) -> notify::Result<EventWatcher>,
) {
    if settings.mode == WatchMode::Off {
        return;
    }
    let (changed, mut changes) = mpsc::unbounded_channel::<()>();
    let mut _watcher = None;
    let mut events = false;
    if settings.mode == WatchMode::Events {
        match start_events(&dir, changed) {
            Ok(watcher) => {
                _watcher = Some(watcher);
                events = true;
            }
            Err(error) => {
                tracing::warn!(
                    dir = %dir.display(),
                    %error,
                    every = %humantime::format_duration(settings.poll_interval),
                    "cannot watch the plugin directory for events; polling it instead"
                );
            }
        }
    }
    let mut poll = tokio::time::interval(settings.poll_interval.max(Duration::from_millis(50)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = poll.tick() => {}
            received = changes.recv(), if events => {
                if received.is_none() {
                    events = false;
                    tracing::warn!(dir = %dir.display(), "the plugin directory's event watcher stopped; polling it instead");
                    continue;
                }
                // Debounce: wait until nothing has changed for the quiet period.
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        more = tokio::time::timeout(settings.quiet_period, changes.recv()) => {
                            if !matches!(more, Ok(Some(()))) {
                                break;
                            }
                        }
                    }
                }
            }
        }
        if let Err(error) = registry.reconcile().await {
            tracing::error!(dir = %dir.display(), %error, "cannot scan the plugin directory");
        }
    }
}
