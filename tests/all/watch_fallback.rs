//! The plugin-directory watcher when file-system events cannot be had: it polls instead,
//! picks up a plugin dropped in later, and stops promptly when asked.

use std::sync::Arc;
use std::time::Duration;

use switchyard_host::bus::sqlite::{SqliteBus, SqliteOptions};
use switchyard_host::config::{WatchMode, WatchSection};
use switchyard_host::metrics::Metrics;
use switchyard_host::plugins::{Registry, watch_with};
use switchyard_host::runtime::{Runtime, RuntimeConfig};
use switchyard_host::{Bus, PluginDefaults};

use crate::support;
use crate::support::guests::{self, Guest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_events_fall_back_to_polling_and_stop_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir_all(&plugins).unwrap();
    let bus: Arc<dyn Bus> =
        Arc::new(SqliteBus::open(SqliteOptions::new(dir.path().join("data/log.db"))).unwrap());
    let registry = Arc::new(Registry::new(
        Runtime::new(RuntimeConfig::default()).unwrap(),
        Arc::clone(&bus),
        Arc::new(Metrics::default()),
        PluginDefaults::default(),
        plugins.clone(),
        Duration::from_secs(5),
    ));
    registry.load_all().await.unwrap();
    let table = registry.table();
    assert!(table.read().unwrap().is_empty());

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let settings = WatchSection {
        mode: WatchMode::Events,
        poll_interval: Duration::from_millis(100),
        quiet_period: Duration::from_millis(50),
    };
    let watcher = tokio::spawn(watch_with(
        Arc::clone(&registry),
        plugins.clone(),
        settings,
        stopped,
        |_, _| Err(notify::Error::generic("no file-system events here")),
    ));

    std::fs::copy(guests::path(Guest::Noop), plugins.join("late.wasm")).unwrap();
    support::wait_for(
        "the polling watcher to load the dropped plugin",
        Duration::from_secs(30),
        || async {
            table
                .read()
                .unwrap()
                .get("late")
                .is_some_and(|entry| entry.status.is_ok())
                .then_some(())
        },
    )
    .await;

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the watcher stops when asked, without waiting on the missing events")
        .unwrap();
    registry.shutdown().await;
    bus.close().await.unwrap();
}
