//! The sandboxed plugin runtime: wasmtime components with fuel, memory and time limits.
//!
//! - [`Runtime`] owns the wasmtime [`Engine`] (pooling allocator, fuel metering, epoch
//!   interruption), the [`Linker`] with the host imports and WASI, and the thread that
//!   advances epochs.
//! - [`Runtime::load`] turns a file's bytes into a [`Plugin`]: header checks, compile
//!   (on a blocking thread), world and import validation ([`validate`]), pre-instantiation
//!   and a call to `describe()`. Every refusal is a [`LoadError`] naming the file.
//! - [`Plugin::invoke`] runs one event and returns an [`Outcome`];
//!   [`Plugin::invoke_batch`] runs several through the plugin's batch handler and returns
//!   each one's outcome ([`BatchOutcome`]); see [`plugin`] for the instance lifecycle in
//!   each [`Isolation`] mode.
//! - A plugin is bound to the contract version it was built against; every version's
//!   imports share one implementation ([`bindings`], [`host`]). Guest calls longer than one timeslice
//!   share the CPU through one gate that serves the least-served plugin first ([`fair`]).
//!
//! The runtime never applies effects: emits and KV writes come back in the outcome for
//! the caller to commit with the acknowledgement.

mod artifacts;
mod bindings;
mod fair;
mod host;
mod limits;
mod lowering;
mod outcome;
mod plugin;
mod sandbox;
mod settings;
mod stdio;
mod validate;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

pub use self::artifacts::Compiler;
pub use self::outcome::{Failure, Outcome};
pub use self::plugin::{BatchOutcome, Delivery, InstanceStats, Plugin, PluginInfo};
pub use self::sandbox::{Access, Refusals};
pub use self::settings::{EffectBounds, Isolation, PluginLimits, PluginSettings};
pub use self::validate::{CONTRACT_PACKAGE, CONTRACT_VERSIONS, Import};

use self::artifacts::{ArtifactLease, Artifacts};
pub use self::artifacts::{CacheLimits, Pruned};
use self::fair::CpuGate;
use self::host::HostState;

/// How often the epoch advances; the resolution of wall-clock timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Engine-wide settings, fixed for the life of a [`Runtime`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Component instances that may exist at once, over all plugins.
    pub max_instances: u32,
    /// Ceiling on any plugin's memory limit, in bytes; sizes the pooling allocator's slots.
    pub max_memory_bytes: u64,
    /// Directory of the compiled-code cache, keyed by the file's bytes and the engine's
    /// settings, so a restart or the same bytes again do not recompile, and compiled code
    /// is mapped rather than read into memory. `None`: no cache, compiled in memory.
    pub compile_cache: Option<std::path::PathBuf>,
    /// What the compile cache keeps of files no loaded plugin uses
    /// ([`Runtime::prune_compile_cache`]).
    pub compile_cache_limits: CacheLimits,
    /// Compile new plugins in a child process of this program (`compile-plugin`), so the
    /// compiler's peak memory is not kept by the host. Needs `compile_cache`.
    pub compiler: Option<Compiler>,
    /// Guest timeslices after a call's first that execute at the same moment over all
    /// plugins (calls waiting for I/O do not count); the others wait at the gate,
    /// least-served plugin first.
    pub guest_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_instances: 1000,
            max_memory_bytes: 1024 * 1024 * 1024,
            compile_cache: None,
            compile_cache_limits: CacheLimits::default(),
            compiler: None,
            guest_threads: default_guest_threads(),
        }
    }
}

/// One fewer than the cores (at least one): busy plugins then leave a core to ingest,
/// the log writer and the dispatchers, so producers and settlements are not held up by
/// guests.
pub fn default_guest_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

/// Hits and misses of the compiled-code cache since the runtime started, and its size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Components loaded from the cache without compiling.
    pub hits: u64,
    /// Components compiled (and stored in the cache).
    pub misses: u64,
    /// Bytes the cache held after its last prune ([`Runtime::prune_compile_cache`]).
    pub bytes: u64,
}

/// Errors setting up the runtime itself.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime refused the engine configuration.
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
    /// The host imports could not be linked.
    #[error("cannot link host imports: {0}")]
    Link(String),
    /// The epoch thread could not be started.
    #[error("cannot start the epoch thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Why a file could not be loaded as a plugin: the file (or other origin) and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {reason}")]
pub struct LoadError {
    /// Where the bytes came from, usually a file path.
    pub origin: String,
    /// What is wrong with them.
    pub reason: LoadErrorReason,
}

/// The reasons a plugin file is refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadErrorReason {
    /// The file could not be read.
    #[error("cannot read the file: {0}")]
    Io(#[from] std::io::Error),
    /// The file is empty.
    #[error("the file is empty")]
    Empty,
    /// The bytes do not start with the WebAssembly header.
    #[error("not a WebAssembly file (no `\\0asm` header)")]
    NotWasm,
    /// A core module rather than a component.
    #[error(
        "a core WebAssembly module, not a component; build the plugin for `wasm32-wasip2` with switchyard-sdk"
    )]
    CoreModule,
    /// The component failed to parse, validate or compile.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component does not export the handler interface.
    #[error(
        "not a Switchyard plugin: it must export `switchyard:plugin/handler@0.1.0` but exports {exports}"
    )]
    WrongWorld {
        /// What the component does export.
        exports: String,
    },
    /// Built against a contract version this host does not serve.
    #[error(
        "built against contract version {found} of `switchyard:plugin`; this host serves {}",
        CONTRACT_VERSIONS.join(", ")
    )]
    UnsupportedVersion {
        /// The version the component names.
        found: String,
    },
    /// Imports interfaces the host does not provide.
    #[error(
        "imports {}, which the host does not provide (it links the contract and WASI 0.2)",
        .0.iter().map(|name| format!("`{name}`")).collect::<Vec<_>>().join(", ")
    )]
    UnknownImports(Vec<String>),
    /// Linking against the host's imports failed.
    #[error("cannot link: {0}")]
    Link(String),
    /// `describe()` failed.
    #[error("describe() failed: {0}")]
    Describe(Failure),
    /// `describe()` returned a subscription that is not a valid pattern.
    #[error("describe() returned {0}")]
    Subscription(#[from] crate::pattern::PatternError),
}

/// The shared wasmtime engine and linker for all plugins.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<HostState>,
    artifacts: Option<Artifacts>,
    gate: CpuGate,
    max_memory_bytes: u64,
}

impl Runtime {
    /// The ceiling on any plugin's memory limit ([`RuntimeConfig::max_memory_bytes`]).
    pub fn max_memory_bytes(&self) -> u64 {
        self.inner.max_memory_bytes
    }

    /// Builds the engine, links the host imports and WASI, and starts the epoch thread.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let engine = Engine::new(&engine_config(&config))
            .map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let artifacts = match &config.compile_cache {
            Some(dir) => Some(Artifacts::new(&engine, dir, &config).map_err(|e| {
                RuntimeError::Engine(format!("compile cache in {}: {e}", dir.display()))
            })?),
            None => None,
        };
        let mut linker = Linker::new(&engine);
        let empty_root = sandbox::EmptyRoot::new().map_err(|e| {
            RuntimeError::Engine(format!("cannot make the plugins' empty root: {e}"))
        })?;
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
            .and_then(|()| sandbox::link(&mut linker, Arc::new(empty_root)))
            .map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        bindings::add_to_linker(&mut linker).map_err(|e| RuntimeError::Link(format!("{e:#}")))?;
        spawn_epoch_ticker(&engine)?;
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                artifacts,
                gate: CpuGate::new(config.guest_threads),
                max_memory_bytes: config.max_memory_bytes,
            }),
        })
    }

    /// Hits and misses of the compiled-code cache.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner
            .artifacts
            .as_ref()
            .map_or_else(CacheStats::default, Artifacts::stats)
    }

    /// Compiles a component for the engine `config` describes, into `out`: the work of
    /// the `compile-plugin` child process.
    pub fn compile_file(config: &RuntimeConfig, input: &Path, out: &Path) -> Result<(), LoadError> {
        let fail = |reason| LoadError {
            origin: input.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(input).map_err(|e| fail(LoadErrorReason::Io(e)))?;
        let engine = Engine::new(&engine_config(config))
            .map_err(|e| fail(LoadErrorReason::Invalid(format!("{e:#}"))))?;
        artifacts::compile_to_file(&engine, &bytes, out).map_err(fail)
    }

    /// The compiled component of `bytes`: from the compile cache when there is one, with
    /// the lease that keeps its file there while the plugin lives.
    pub(crate) fn compile(
        &self,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<(Component, Option<ArtifactLease>), LoadErrorReason> {
        match &self.inner.artifacts {
            Some(artifacts) => artifacts
                .load(&self.inner.engine, sha256, bytes)
                .map(|(component, lease)| (component, Some(lease))),
            None => Component::new(&self.inner.engine, bytes)
                .map(|component| (component, None))
                .map_err(|e| LoadErrorReason::Invalid(format!("{e:#}"))),
        }
    }

    /// Removes from the compile cache what no loaded plugin uses and its limits let go
    /// (see [`CacheLimits`]); `None` without a cache. Reads the disk: call it off the async
    /// threads.
    pub fn prune_compile_cache(&self) -> Option<std::io::Result<Pruned>> {
        self.inner.artifacts.as_ref().map(Artifacts::prune)
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub(crate) fn linker(&self) -> &Linker<HostState> {
        &self.inner.linker
    }

    pub(crate) fn gate(&self) -> &CpuGate {
        &self.inner.gate
    }
}

/// Most linear memories one plugin instance may have (see [`engine_config`]).
const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
/// Most core instances one plugin instance may have (see [`engine_config`]).
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 50;

fn engine_config(config: &RuntimeConfig) -> Config {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(config.max_instances)
        // A Rust component holds a few core instances (its code plus adapter shims) and
        // one memory; leave headroom for components built by other toolchains.
        .total_core_instances(config.max_instances.saturating_mul(4))
        .total_memories(config.max_instances.saturating_mul(2))
        .total_tables(config.max_instances.saturating_mul(4))
        .total_stacks(config.max_instances)
        // One instance must not take the pool's memories and instances from the others:
        // stock toolchains make components of one memory and at most about 15 core
        // instances (componentize-py's).
        .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .max_memory_size(usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX));
    pool_reuse(&mut pool);
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    wasm
}

/// How a freed instance slot is made clean for the next instance. Each `per-event`
/// call frees one, and by default the whole linear memory and table are decommitted with
/// `madvise`: a system call, page faults on every page the next instance touches, and,
/// with guests on several worker threads, TLB shootdowns across cores. Instead, the
/// pages that were touched (found with `PAGEMAP_SCAN` where the kernel has it) are reset
/// in place up to the sizes kept resident here; a handler that uses more memory than that
/// is decommitted as before.
pub fn pool_reuse(pool: &mut PoolingAllocationConfig) {
    pool.linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine) -> Result<(), RuntimeError> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("switchyard-epoch".to_owned())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
    Ok(())
}
