//! The live plugin table: brings what runs in line with what is in the plugin directory.
//!
//! [`Registry::reconcile`] scans the directory and, for every `NAME.wasm` whose file or
//! sidecar changed since it was last seen, loads it (compiling off the async threads)
//! and swaps it in:
//! - the new version loaded: the old dispatcher stops taking events, its in-flight calls
//!   finish on the old version and settle (within the shutdown grace), then a new
//!   dispatcher resumes from the plugin's durable cursor with the new version and policy.
//!   Every event is handled by exactly one version; none is skipped, because the cursor
//!   only passes settled events.
//! - the load failed: a working version keeps serving and the error is shown in its
//!   status (`load_error`); a plugin that never loaded is listed as failed.
//! - the file is gone: its dispatcher drains and stops; the cursor, retries, dead letters
//!   and KV stay in the bus under its name, so adding it back resumes where it stopped.
//!
//! A file written within the last moment is left for the next round, so a copy in
//! progress is not picked up half-way (and a truncated component fails validation anyway).
//! One reconcile runs at a time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::{LoadedPlugin, PluginEntry, PluginLoadError, RELOAD_HISTORY, Reload, load_plugin};
use crate::bus::Bus;
use crate::clock::now_ms;
use crate::dispatch::valve::Valves;
use crate::dispatch::{Dispatcher, Target};
use crate::metrics::Metrics;
use crate::policy::PluginDefaults;
use crate::runtime::Runtime;
use crate::schema::Schemas;

/// How recently a file may have changed and still be left for the next round.
const SETTLE_TIME: Duration = Duration::from_millis(100);

/// What was seen of one plugin's files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    wasm: FileStamp,
    sidecar: Option<FileStamp>,
}

/// One file as last seen. Size and modification time alone miss an edit that keeps the
/// size where a tool keeps the time (`cp -p`, `rsync -a`, files whose time is fixed);
/// the inode (a file renamed into place) and the status-change time, which no tool can
/// set, do not.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: SystemTime,
    inode: u64,
    changed: SystemTime,
}

impl Stamp {
    /// When the files last changed, by the status-change time: the host's clock set it,
    /// so a modification time copied from another machine (even one in the future)
    /// cannot make a file look still written, or long settled.
    fn newest(&self) -> SystemTime {
        match &self.sidecar {
            Some(sidecar) => sidecar.changed.max(self.wasm.changed),
            None => self.wasm.changed,
        }
    }
}

/// The plugin table shared with the HTTP API.
pub type PluginTable = Arc<RwLock<BTreeMap<String, PluginEntry>>>;

#[derive(Default)]
struct Running {
    dispatchers: HashMap<String, Dispatcher>,
    stamps: HashMap<String, Stamp>,
    /// The `.toml` files beside no plugin file, each reported once.
    stray_sidecars: BTreeSet<String>,
}

/// The plugins of a running host.
pub struct Registry {
    runtime: Runtime,
    bus: Arc<dyn Bus>,
    schemas: Arc<Schemas>,
    valves: Arc<Valves>,
    metrics: Arc<Metrics>,
    defaults: PluginDefaults,
    dir: PathBuf,
    grace: Duration,
    table: PluginTable,
    running: tokio::sync::Mutex<Running>,
}

fn stamp_of(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    let changed = u64::try_from(meta.ctime())
        .ok()
        .map(|seconds| {
            SystemTime::UNIX_EPOCH
                + Duration::new(seconds, u32::try_from(meta.ctime_nsec()).unwrap_or(0))
        })
        .unwrap_or(SystemTime::UNIX_EPOCH);
    meta.is_file().then(|| FileStamp {
        len: meta.len(),
        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        inode: meta.ino(),
        changed,
    })
}

/// The `NAME.wasm` files of `dir` and their stamps, and the `.toml` files beside no
/// `NAME.wasm` (a sidecar misnamed, or left from a removed plugin).
fn scan(dir: &Path) -> std::io::Result<(BTreeMap<String, Stamp>, BTreeSet<String>)> {
    let mut found = BTreeMap::new();
    let mut sidecars = BTreeSet::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml")
            && let Some(file) = path.file_name().and_then(|f| f.to_str())
            && !file.starts_with('.')
        {
            sidecars.insert(file.to_owned());
        }
        if path.extension().is_none_or(|e| e != "wasm") {
            continue;
        }
        let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        // Editors' and copy tools' temporary files (`.name.wasm`, `name.wasm~`) are not plugins.
        if name.starts_with('.') {
            continue;
        }
        if let Some(wasm) = stamp_of(&path) {
            let sidecar = stamp_of(&path.with_extension("toml"));
            found.insert(name, Stamp { wasm, sidecar });
        }
    }
    sidecars.retain(|file| {
        file.strip_suffix(".toml")
            .is_none_or(|name| !found.contains_key(name))
    });
    Ok((found, sidecars))
}

impl Registry {
    /// An empty registry over `dir`; call [`Registry::reconcile`] to load it.
    pub fn new(
        runtime: Runtime,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        defaults: PluginDefaults,
        dir: PathBuf,
        grace: Duration,
    ) -> Self {
        Self {
            runtime,
            schemas: Schemas::new(Arc::clone(&bus)),
            valves: Valves::new(Arc::clone(&bus), Arc::clone(&metrics)),
            bus,
            metrics,
            defaults,
            dir,
            grace,
            table: Arc::default(),
            running: tokio::sync::Mutex::default(),
        }
    }

    /// Checks emitted events against these schemas (by default none are known).
    pub fn with_schemas(mut self, schemas: Arc<Schemas>) -> Self {
        self.schemas = schemas;
        self
    }

    /// Obeys (and shares) these plugin pauses and breakers (by default, valves that
    /// learn only of the changes this registry's dispatchers make).
    pub fn with_valves(mut self, valves: Arc<Valves>) -> Self {
        self.valves = valves;
        self
    }

    /// The plugin table.
    pub fn table(&self) -> PluginTable {
        Arc::clone(&self.table)
    }

    /// Loads every plugin of the directory as it is now; for start-up, before the host
    /// accepts events (a plugin that starts at the `latest` event must not miss any).
    pub async fn load_all(&self) -> std::io::Result<()> {
        self.scan_and_apply(Duration::ZERO).await
    }

    /// Loads, swaps and stops plugins until the table matches the directory, leaving
    /// files written in the last moment for the next round.
    pub async fn reconcile(&self) -> std::io::Result<()> {
        self.scan_and_apply(SETTLE_TIME).await
    }

    async fn scan_and_apply(&self, settle_time: Duration) -> std::io::Result<()> {
        let mut running = self.running.lock().await;
        tokio::fs::create_dir_all(&self.dir).await?;
        let dir = self.dir.clone();
        let (found, strays) = tokio::task::spawn_blocking(move || scan(&dir))
            .await
            .map_err(std::io::Error::other)??;
        for stray in strays.difference(&running.stray_sidecars) {
            tracing::warn!(
                file = %stray,
                "`{stray}` is beside no plugin file of the same name (`NAME.toml` configures \
                 `NAME.wasm`); it is not read"
            );
        }
        running.stray_sidecars = strays;
        let now = SystemTime::now();
        for (name, stamp) in &found {
            if running.stamps.get(name) == Some(stamp) {
                continue;
            }
            // A change time ahead of the clock (the clock was set back) says nothing of
            // a write in progress.
            let age = now.duration_since(stamp.newest()).unwrap_or(settle_time);
            if age < settle_time {
                continue; // still being written: the next round takes it
            }
            self.apply(&mut running, name, stamp.clone()).await;
        }
        let gone: Vec<String> = running
            .stamps
            .keys()
            .filter(|name| !found.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.remove(&mut running, &name).await;
        }
        Ok(())
    }

    /// A plugin is named by its file; the name its `describe` gives is for people. When
    /// they differ, or another file serves the described name, the operator likely
    /// deployed one plugin under two names (both then receive its events), or renamed a
    /// file (a new cursor, KV and dead letters): say so.
    fn warn_of_a_second_name(&self, name: &str, described: &str) {
        if described == name {
            return;
        }
        let table = self
            .table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let others: Vec<&str> = table
            .iter()
            .filter(|(other, entry)| {
                other.as_str() != name
                    && entry
                        .status
                        .as_ref()
                        .is_ok_and(|loaded| loaded.plugin.info().name == described)
            })
            .map(|(other, _)| other.as_str())
            .collect();
        if others.is_empty() {
            tracing::warn!(
                plugin = %name,
                "`{name}.wasm` describes itself as `{described}`; the host names a plugin by \
                 its file, so its cursor, KV and dead letters are `{name}`'s"
            );
        } else {
            tracing::warn!(
                plugin = %name,
                "`{name}.wasm` describes itself as `{described}`, like {}: each file is a \
                 plugin of its own and receives every event it subscribes to",
                others
                    .iter()
                    .map(|other| format!("`{other}.wasm`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }

    async fn apply(&self, running: &mut Running, name: &str, stamp: Stamp) {
        let file = self.dir.join(format!("{name}.wasm"));
        running.stamps.insert(name.to_owned(), stamp);
        let loaded = load_plugin(&self.runtime, name, &file, &self.defaults).await;
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                self.metrics.plugin_load_failed(name);
                let mut table = self
                    .table
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let failed = Reload {
                    at_ms: now_ms(),
                    loaded: None,
                    error: Some(error.to_string()),
                };
                match table.get_mut(name) {
                    Some(entry) if entry.status.is_ok() => {
                        tracing::error!(plugin = %name, "new version failed to load; the running version keeps serving: {error}");
                        entry.load_error = Some(error);
                        remember(&mut entry.history, failed);
                    }
                    _ => {
                        tracing::error!(plugin = %name, "plugin failed to load: {error}");
                        put_entry(&mut table, name, file, Err(error), failed);
                    }
                }
                return;
            }
        };
        self.warn_of_a_second_name(name, &loaded.plugin.info().name);
        let replacing = running.dispatchers.remove(name);
        let replaced = replacing.is_some();
        if let Some(old) = replacing {
            old.shutdown(self.grace).await;
        }
        let status = match Dispatcher::start(
            Arc::clone(&self.bus),
            Arc::clone(&self.metrics),
            target(name, &loaded, &self.schemas, &self.valves),
        )
        .await
        {
            Ok(dispatcher) => {
                if replaced {
                    self.retire(name);
                }
                running.dispatchers.insert(name.to_owned(), dispatcher);
                tracing::info!(
                    plugin = %name,
                    version = %loaded.plugin.info().version,
                    sha256 = %loaded.plugin.sha256(),
                    "plugin serving"
                );
                self.metrics.plugin_loaded(name);
                Ok(loaded)
            }
            Err(error) => {
                let error = PluginLoadError::Consumer(Arc::new(error));
                if replaced && self.resume(running, name, &error).await {
                    return;
                }
                tracing::error!(plugin = %name, "{error}; trying again at the next scan");
                // Nothing serves the plugin now: the next scan loads it again, so a consumer
                // that could not start (the bus out of reach) starts once it can.
                running.stamps.remove(name);
                Err(error)
            }
        };
        let reload = Reload {
            at_ms: now_ms(),
            loaded: status.as_ref().ok().map(|loaded| {
                let plugin = &loaded.plugin;
                (plugin.info().version.clone(), plugin.sha256().to_owned())
            }),
            error: status.as_ref().err().map(ToString::to_string),
        };
        let mut table = self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        put_entry(&mut table, name, file, status, reload);
    }

    /// Starts again the version of `name` in the table, whose dispatcher was stopped for a
    /// new version that could not start: a failed load never replaces a working version.
    /// Whether it serves again.
    async fn resume(&self, running: &mut Running, name: &str, error: &PluginLoadError) -> bool {
        let serving = {
            let table = self
                .table
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match table.get(name).map(|entry| &entry.status) {
                Some(Ok(loaded)) => target(name, loaded, &self.schemas, &self.valves),
                _ => return false,
            }
        };
        let Ok(dispatcher) =
            Dispatcher::start(Arc::clone(&self.bus), Arc::clone(&self.metrics), serving).await
        else {
            return false;
        };
        running.dispatchers.insert(name.to_owned(), dispatcher);
        tracing::error!(plugin = %name, "new version cannot start; the running version serves again: {error}");
        let mut table = self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = table.get_mut(name) {
            entry.load_error = Some(error.clone());
            remember(
                &mut entry.history,
                Reload {
                    at_ms: now_ms(),
                    loaded: None,
                    error: Some(error.to_string()),
                },
            );
        }
        true
    }

    /// Hands the metrics what the version of `name` in the table counted, once its
    /// dispatcher has stopped and before another version takes its place.
    fn retire(&self, name: &str) {
        let table = self
            .table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(Ok(loaded)) = table.get(name).map(|entry| &entry.status) {
            let refused = loaded.plugin.refusals().counts().map(|(_, count)| count);
            self.metrics.plugin_version_retired(name, refused);
        }
    }

    async fn remove(&self, running: &mut Running, name: &str) {
        running.stamps.remove(name);
        if let Some(dispatcher) = running.dispatchers.remove(name) {
            dispatcher.shutdown(self.grace).await;
            self.retire(name);
        }
        self.table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        self.metrics.forget(name);
        tracing::info!(plugin = %name, "plugin removed; its cursor, retries, dead letters and KV are kept until `DELETE /v1/plugins/{name}` forgets them");
    }

    /// Stops every dispatcher, letting in-flight calls finish within the grace.
    pub async fn shutdown(&self) {
        let mut running = self.running.lock().await;
        let stops: Vec<_> = running
            .dispatchers
            .drain()
            .map(|(_, dispatcher)| dispatcher.shutdown(self.grace))
            .collect();
        let mut set = tokio::task::JoinSet::new();
        for stop in stops {
            set.spawn(stop);
        }
        while set.join_next().await.is_some() {}
    }
}

fn target(name: &str, loaded: &LoadedPlugin, schemas: &Arc<Schemas>, valves: &Valves) -> Target {
    Target {
        valve: valves.valve(name),
        schemas: Arc::clone(schemas),
        name: name.to_owned(),
        plugin: Arc::clone(&loaded.plugin),
        policy: loaded.policy.clone(),
        subscriptions: loaded.subscriptions.clone(),
        state: Arc::clone(&loaded.state),
    }
}

/// Puts a new entry for `name` in the table, keeping the history of the one it replaces.
fn put_entry(
    table: &mut BTreeMap<String, PluginEntry>,
    name: &str,
    file: PathBuf,
    status: Result<LoadedPlugin, PluginLoadError>,
    reload: Reload,
) {
    let mut history = table
        .remove(name)
        .map(|entry| entry.history)
        .unwrap_or_default();
    remember(&mut history, reload);
    let load_error = status.as_ref().err().cloned();
    table.insert(
        name.to_owned(),
        PluginEntry {
            name: name.to_owned(),
            file,
            loaded_at_ms: now_ms(),
            status,
            load_error,
            history,
        },
    );
}

/// Adds a load to a plugin's history, dropping the oldest beyond [`RELOAD_HISTORY`].
fn remember(history: &mut Vec<Reload>, reload: Reload) {
    history.push(reload);
    let excess = history.len().saturating_sub(RELOAD_HISTORY);
    history.drain(..excess);
}
