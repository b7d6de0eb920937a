//! The plugins of a host: loading the plugin directory (`NAME.wasm` plus an optional
//! operator sidecar `NAME.toml`) into a table of loaded and failed plugins.
//!
//! A plugin's identity is its NAME (the file stem); its consumer position, retries, dead
//! letters and KV belong to that name. A file that fails to load is kept in the table as
//! failed, with its error, so status shows it; it never takes down the others.

pub mod manifest;
mod registry;
mod watcher;

pub use self::registry::{PluginTable, Registry};
pub use self::watcher::{EventWatcher, watch, watch_with};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bus::BusError;
use crate::dispatch::DispatchState;
use crate::pattern::Pattern;
use crate::policy::{ManifestError, PluginDefaults, PluginPolicy};
use crate::runtime::{LoadError, Plugin, Runtime};

use self::manifest::Manifest;

/// Why a plugin's files could not be put into service. Cheap to clone: status keeps it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginLoadError {
    /// The file stem is not a valid plugin name.
    #[error("{}: a plugin name must be 1 to 64 of A-Z, a-z, 0-9, `_` and `-`", file.display())]
    InvalidName {
        /// The `.wasm` file.
        file: PathBuf,
    },
    /// The sidecar could not be read.
    #[error("{}: cannot read: {error}", sidecar.display())]
    SidecarUnreadable {
        /// The sidecar.
        sidecar: PathBuf,
        /// The I/O error.
        error: Arc<std::io::Error>,
    },
    /// The sidecar was refused.
    #[error("{}: {error}", sidecar.display())]
    Sidecar {
        /// The sidecar.
        sidecar: PathBuf,
        /// What is wrong with it.
        error: ManifestError,
    },
    /// The `.wasm` file could not be read.
    #[error("{}: cannot read the file: {error}", file.display())]
    Unreadable {
        /// The `.wasm` file.
        file: PathBuf,
        /// The I/O error.
        error: Arc<std::io::Error>,
    },
    /// The component was refused by the runtime.
    #[error(transparent)]
    Component(Arc<LoadError>),
    /// The plugin's consumer could not be opened on the bus.
    #[error("cannot open the plugin's consumer: {0}")]
    Consumer(Arc<BusError>),
}

/// A plugin that loaded and is serving.
pub struct LoadedPlugin {
    /// The compiled plugin.
    pub plugin: Arc<Plugin>,
    /// Its resolved policy.
    pub policy: PluginPolicy,
    /// What it receives: the sidecar's `subscribe`, else what `describe()` returned.
    pub subscriptions: Vec<Pattern>,
    /// Live dispatch state.
    pub state: Arc<DispatchState>,
}

/// One entry of the plugin table.
pub struct PluginEntry {
    /// The plugin's name.
    pub name: String,
    /// Its `.wasm` file.
    pub file: PathBuf,
    /// When the entry was made, in milliseconds since the Unix epoch.
    pub loaded_at_ms: i64,
    /// The plugin, or why it failed to load.
    pub status: Result<LoadedPlugin, PluginLoadError>,
    /// Why the latest load of its files failed, when it did (a working version may
    /// still be serving).
    pub load_error: Option<PluginLoadError>,
    /// The latest loads of its files, oldest first, at most [`RELOAD_HISTORY`].
    pub history: Vec<Reload>,
}

/// Loads of a plugin's files kept in its [`PluginEntry::history`].
pub const RELOAD_HISTORY: usize = 20;

/// One load of a plugin's files: the version that took over, or why none did.
#[derive(Debug, Clone)]
pub struct Reload {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The version serving since, as `describe()` named it, with its file's SHA-256.
    pub loaded: Option<(String, String)>,
    /// Why the files did not load.
    pub error: Option<String>,
}

/// Whether a file stem may name a plugin: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn is_valid_plugin_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Loads one plugin: its sidecar (if any), then its component.
pub async fn load_plugin(
    runtime: &Runtime,
    name: &str,
    file: &Path,
    defaults: &PluginDefaults,
) -> Result<LoadedPlugin, PluginLoadError> {
    let policy = plugin_policy(runtime, name, file, defaults).await?;
    let bytes = tokio::fs::read(file)
        .await
        .map_err(|error| PluginLoadError::Unreadable {
            file: file.to_owned(),
            error: Arc::new(error),
        })?;
    let plugin = runtime
        .load(
            name,
            &file.display().to_string(),
            bytes,
            policy.settings.clone(),
        )
        .await
        .map_err(|error| PluginLoadError::Component(Arc::new(error)))?;
    let subscriptions = policy
        .subscribe
        .clone()
        .unwrap_or_else(|| plugin.info().subscriptions.clone());
    Ok(LoadedPlugin {
        plugin: Arc::new(plugin),
        policy,
        subscriptions,
        state: Arc::new(DispatchState::default()),
    })
}

/// What a host would run plugin `name` of `file` with: the name checked, then its sidecar
/// (`NAME.toml` beside the file, if any) read and merged over `defaults`, within the
/// runtime's memory ceiling. `switchyard check` and `invoke` use it too, so they refuse
/// what a host refuses.
pub async fn plugin_policy(
    runtime: &Runtime,
    name: &str,
    file: &Path,
    defaults: &PluginDefaults,
) -> Result<PluginPolicy, PluginLoadError> {
    if !is_valid_plugin_name(name) {
        return Err(PluginLoadError::InvalidName {
            file: file.to_owned(),
        });
    }
    let sidecar = file.with_extension("toml");
    let manifest = match tokio::fs::read_to_string(&sidecar).await {
        Ok(text) => Manifest::parse(&text).map_err(|error| PluginLoadError::Sidecar {
            sidecar: sidecar.clone(),
            error,
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
        Err(error) => {
            return Err(PluginLoadError::SidecarUnreadable {
                sidecar,
                error: Arc::new(error),
            });
        }
    };
    manifest
        .resolve(defaults)
        .and_then(|policy| {
            let (memory, ceiling) = (policy.settings.limits.memory_bytes, runtime.max_memory_bytes());
            if memory > ceiling {
                return Err(ManifestError::invalid(
                    "limits.memory",
                    format!("({memory} bytes) is above the host's `runtime.max_memory` ({ceiling} bytes)"),
                ));
            }
            Ok(policy)
        })
        .map_err(|error| PluginLoadError::Sidecar { sidecar, error })
}
