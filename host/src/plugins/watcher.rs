//! Watches the plugin directory and asks the registry to reconcile after changes.
//!
//! In `events` mode a file-system watcher (`notify`) signals changes; the watcher waits
//! until the directory has been quiet for the quiet period (debounce: a deploy that
//! writes a file in chunks, or a `.wasm` and its sidecar, is taken as one change) and
//! then reconciles. A scan every poll interval backs it up, and is all there is in
//! `poll` mode, for file systems without events. If the event watcher cannot start,
//! the watcher falls back to polling and says so.

use std::sync::Arc;
use std::time::Duration;

use notify::Watcher as _;
use tokio::sync::{mpsc, watch};

use super::Registry;
use crate::config::{WatchMode, WatchSection};

/// Runs until `stop` turns true.
pub async fn watch(
    registry: Arc<Registry>,
    dir: std::path::PathBuf,
    settings: WatchSection,
    mut stop: watch::Receiver<bool>,
) {
    if settings.mode == WatchMode::Off {
        return;
    }
    let (changed, mut changes) = mpsc::unbounded_channel::<()>();
    // Kept alive for as long as the loop runs; dropping it stops the events.
    let _watcher = match settings.mode {
        WatchMode::Events => {
            let watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    if event.is_ok() {
                        let _ = changed.send(());
                    }
                })
                .and_then(|mut watcher| {
                    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
                    Ok(watcher)
                });
            match watcher {
                Ok(watcher) => Some(watcher),
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "cannot watch the plugin directory for events; polling instead");
                    None
                }
            }
        }
        WatchMode::Poll | WatchMode::Off => None,
    };
    let mut poll = tokio::time::interval(settings.poll_interval.max(Duration::from_millis(50)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = poll.tick() => {}
            received = changes.recv() => {
                if received.is_none() {
                    // The event watcher is gone; the poll keeps going.
                    std::future::pending::<()>().await;
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
