//! `switchyard serve`: wires the runtime, the bus, the plugins, their dispatchers and
//! the HTTP API together, and takes them down in order on SIGINT/SIGTERM.
//!
//! HTTP is served by `http` (hyper, with a header timeout). Shutdown order: answer
//! `/readyz` with `503` while still serving for `shutdown_drain`, stop accepting HTTP
//! requests and finish the ones in flight (their appends commit), stop the dispatchers
//! and let in-flight invocations finish and settle within `shutdown_grace`, then close
//! the bus so the last commits are durable.
//!
//! On the embedded log the host takes the log's lock first and holds it until it stops,
//! so a second host started on the same data directory is refused before it starts.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;

mod http;

use self::http::{Deadlines, serve_http};
use crate::bus::Bus;
use crate::bus::nats::{NatsBus, NatsOptions};
use crate::bus::sqlite::{
    Durability, RetentionObserver, RetentionOptions, SqliteBus, SqliteOptions, lock_log,
};
use crate::config::{BusKind, Config, Synchronous};
use crate::dispatch::valve::Valves;
use crate::ingest::{AppState, router};
use crate::metrics::Metrics;
use crate::plugins::Registry;
use crate::runtime::{Compiler, Runtime, RuntimeConfig};
use crate::schema::Schemas;

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "switchyard.db";
/// The compiled-code cache inside the data directory.
pub const COMPILE_CACHE_DIR: &str = "compile-cache";

/// Runs the host until a shutdown signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    config.validate()?;
    let config = Arc::new(config);
    // Held until the host stops, before anything is compiled or started.
    let _log_lock = match config.bus.kind {
        BusKind::Embedded => Some(
            lock_log(&config.data_dir.join(DATABASE_FILE)).context("opening the embedded log")?,
        ),
        BusKind::Nats => None,
    };
    let cache_dir = std::path::absolute(config.data_dir.join(COMPILE_CACHE_DIR))
        .context("locating the data directory")?;
    let runtime = Runtime::new(RuntimeConfig {
        compile_cache: Some(cache_dir),
        // New plugins compile in a child process: the compiler's peak memory (hundreds of
        // megabytes for an interpreter's component) then never stays with the host.
        compiler: std::env::current_exe()
            .ok()
            .map(|program| Compiler { program }),
        ..config.runtime.runtime_config()
    })
    .context("starting the WebAssembly runtime")?;
    let metrics = Arc::new(Metrics::default());
    let bus = open_bus(&config, &metrics).await?;

    let schemas = Schemas::start(Arc::clone(&bus))
        .await
        .context("reading the event schemas")?;
    let valves = Valves::start(Arc::clone(&bus), Arc::clone(&metrics))
        .await
        .context("following plugin pauses and breakers")?;
    let registry = Arc::new(
        Registry::new(
            runtime.clone(),
            Arc::clone(&bus),
            Arc::clone(&metrics),
            config.plugin_defaults.clone(),
            config.plugins_dir.clone(),
            config.shutdown_grace,
        )
        .with_schemas(Arc::clone(&schemas))
        .with_valves(Arc::clone(&valves)),
    );
    // Consumers exist before the host accepts events, so `start = "latest"` means every
    // event ingested from now on.
    registry.load_all().await.with_context(|| {
        format!(
            "reading the plugin directory {}",
            config.plugins_dir.display()
        )
    })?;
    let (stop_watching, watching) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(crate::plugins::watch(
        Arc::clone(&registry),
        config.plugins_dir.clone(),
        config.watch.clone(),
        watching,
    ));
    let scheduler = tokio::spawn(crate::scheduler::run(
        Arc::clone(&bus),
        Arc::clone(&metrics),
        stop_watching.subscribe(),
    ));
    // Once the plugins are loaded, so that what they use is known to be in use.
    let housekeeping = tokio::spawn(keep_compile_cache(
        runtime.clone(),
        stop_watching.subscribe(),
    ));
    let (loaded, failed) = {
        let table = registry.table();
        let table = table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let loaded = table.values().filter(|e| e.status.is_ok()).count();
        (loaded, table.len() - loaded)
    };
    warn_of_absent_plugins(&*bus, &registry, &config).await;

    let stats =
        crate::stats::Stats::start(Arc::clone(&metrics), Arc::clone(&bus), registry.table());
    let state = Arc::new(AppState {
        runtime: Some(runtime),
        stats,
        valves,
        ..AppState::new(
            Arc::clone(&bus),
            registry.table(),
            metrics,
            Arc::clone(&config),
            Arc::clone(&schemas),
        )
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let address: SocketAddr = listener.local_addr()?;
    if config.ingest.public_url.is_none() && address.ip().is_unspecified() {
        tracing::warn!(
            %address,
            "events checked against a schema will name it at http://{address}/v1/schemas/…, which no client can reach: set `[ingest] public_url` to the address producers use"
        );
    }
    schemas.set_base_url(
        config
            .ingest
            .public_url
            .as_deref()
            .unwrap_or(&format!("http://{address}")),
    );
    let shutdown = draining(
        Signals::register()?,
        config.shutdown_drain,
        Arc::clone(&state),
    );
    state.ready.store(true, Ordering::Release);
    tracing::info!(%address, plugins = loaded, failed, "switchyard is serving");
    // Scripts and tests read this line to learn the port (`--listen 127.0.0.1:0`).
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "switchyard listening on http://{address}");
    let _ = stdout.flush();

    serve_http(
        listener,
        router(Arc::clone(&state)),
        Deadlines {
            header: config.http.header_timeout,
            write: config.http.request_timeout,
        },
        shutdown,
    )
    .await;

    state.ready.store(false, Ordering::Release);
    tracing::info!("shutting down: finishing in-flight deliveries");
    let _ = stop_watching.send(true);
    let _ = watcher.await;
    let _ = scheduler.await;
    let _ = housekeeping.await;
    registry.shutdown().await;
    bus.close().await.context("closing the log")?;
    tracing::info!("stopped");
    Ok(())
}

/// Says which plugins the bus keeps a consumer for that no file here serves: a plugin
/// renamed or removed leaves its cursor, which holds back the events of its types from
/// retention (for good, unless `[log] absent_plugin_hold` is set).
async fn warn_of_absent_plugins(bus: &dyn Bus, registry: &Registry, config: &Config) {
    let Ok(with_consumers) = bus.plugins_with_consumers().await else {
        return;
    };
    let table = registry.table();
    let absent: Vec<String> = {
        let table = table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        with_consumers
            .into_iter()
            .filter(|plugin| !table.contains_key(plugin))
            .collect()
    };
    if absent.is_empty() {
        return;
    }
    let plugins = absent.join(", ");
    if config.bus.kind == BusKind::Nats {
        tracing::warn!(
            %plugins,
            "the server keeps the consumers of plugins no file here serves (renamed or removed, or served by other hosts only?); each resumes where it stopped if its file comes back"
        );
        return;
    }
    let holds = match config.log.absent_plugin_hold {
        None => "for good (`[log] absent_plugin_hold` is not set)".to_owned(),
        Some(hold) => format!(
            "until it has been gone for `[log] absent_plugin_hold` ({})",
            humantime::format_duration(hold)
        ),
    };
    tracing::warn!(
        %plugins,
        "the log keeps the cursors of plugins no file here serves (renamed or removed?); each holds back the events of its types from retention {holds}, and resumes where it stopped if its file comes back"
    );
}

/// How often the compile cache is pruned while the host runs.
const COMPILE_CACHE_PRUNE_EVERY: Duration = Duration::from_secs(60 * 60);

/// Prunes the compile cache now and every [`COMPILE_CACHE_PRUNE_EVERY`] until `stopped`.
async fn keep_compile_cache(runtime: Runtime, mut stopped: tokio::sync::watch::Receiver<bool>) {
    loop {
        let pruning = runtime.clone();
        match tokio::task::spawn_blocking(move || pruning.prune_compile_cache()).await {
            Ok(Some(Ok(pruned))) if pruned.files > 0 => tracing::info!(
                files = pruned.files,
                bytes = pruned.bytes,
                kept_bytes = pruned.kept_bytes,
                "removed compiled code no loaded plugin used from the compile cache"
            ),
            Ok(Some(Err(error))) => {
                tracing::warn!(%error, "cannot prune the compile cache; trying again later");
            }
            _ => {}
        }
        tokio::select! {
            _ = stopped.changed() => return,
            () = tokio::time::sleep(COMPILE_CACHE_PRUNE_EVERY) => {}
        }
    }
}

/// Opens the configured backend of the bus, with retention reporting to `metrics`.
async fn open_bus(config: &Config, metrics: &Arc<Metrics>) -> anyhow::Result<Arc<dyn Bus>> {
    Ok(match config.bus.kind {
        BusKind::Embedded => Arc::new(
            SqliteBus::open(SqliteOptions {
                path: config.data_dir.join(DATABASE_FILE),
                durability: match config.log.synchronous {
                    Synchronous::Full => Durability::Full,
                    Synchronous::Normal => Durability::Normal,
                },
                group_commit_max_events: config.log.group_commit_max_events,
                group_commit_max_delay: config.log.group_commit_max_delay,
                max_pending_events: config.ingest.max_pending_events,
                retention: RetentionOptions {
                    rules: config.log.retention.clone(),
                    max_bytes: config.log.max_bytes,
                    interval: config.log.retention_interval,
                    absent_plugin_hold: config.log.absent_plugin_hold,
                    dead_letter_max_age: config.log.dead_letter_max_age,
                    observer: Arc::clone(metrics) as Arc<dyn RetentionObserver>,
                },
            })
            .context("opening the embedded log")?,
        ),
        BusKind::Nats => {
            let bus = &config.bus;
            // `[log]` retention becomes the event stream's limits where JetStream can
            // honour it (the config refuses what it cannot); say where it differs.
            let limits = config.nats_stream_limits()?;
            for warning in &limits.warnings {
                tracing::warn!("{warning}");
            }
            Arc::new(
                NatsBus::connect(NatsOptions {
                    url: bus.url.clone(),
                    prefix: bus.prefix.clone(),
                    replicas: bus.replicas,
                    max_age: limits.max_age,
                    max_bytes: limits.max_bytes,
                    per_type_retention: limits.per_type,
                    duplicate_window: bus.duplicate_window,
                    dead_letter_max_age: config.log.dead_letter_max_age,
                    ack_wait: bus.ack_wait,
                })
                .await
                .context("opening the NATS JetStream bus")?,
            )
        }
    })
}

/// The shutdown signals (SIGINT, SIGTERM), registered at once, so that a signal arriving
/// right after the host announces its address stops it gracefully rather than by the
/// default action.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())
                    .context("installing the SIGINT handler")?,
                terminate: signal(SignalKind::terminate())
                    .context("installing the SIGTERM handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Resolves when the next signal arrives.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {},
            _ = self.terminate.recv() => {},
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves when HTTP should stop accepting requests: at the first signal, or `drain`
/// after it. While it drains, `/readyz` answers `503` and requests are still served, so
/// a load balancer takes the host out of rotation before its connections are refused.
/// A second signal ends the drain at once.
async fn draining(mut signals: Signals, drain: Duration, state: Arc<AppState>) {
    signals.next().await;
    state.ready.store(false, Ordering::Release);
    if drain.is_zero() {
        return;
    }
    tracing::info!(
        drain = %humantime::format_duration(drain),
        "shutting down: not ready, still serving requests while load balancers notice"
    );
    tokio::select! {
        () = tokio::time::sleep(drain) => {}
        () = signals.next() => tracing::info!("a second signal: the drain ends now"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::SystemTime;

    use super::*;

    /// A compiled file of another engine that nothing has used for 40 days.
    fn stale(cache: &Path, name: &str) -> PathBuf {
        let path = cache.join("another-engine").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"compiled").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        let forty_days = Duration::from_secs(40 * 24 * 60 * 60);
        file.set_modified(SystemTime::now() - forty_days).unwrap();
        path
    }

    /// When `path` is gone, waiting in steps of a (paused) minute, at most three hours.
    async fn gone(path: &Path) -> tokio::time::Instant {
        for _ in 0..180 {
            if !path.exists() {
                return tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        panic!("{} is still in the compile cache", path.display());
    }

    #[tokio::test(start_paused = true)]
    async fn the_compile_cache_is_pruned_at_start_and_every_hour_after() {
        let cache = tempfile::tempdir().unwrap();
        let runtime = Runtime::new(RuntimeConfig {
            compile_cache: Some(cache.path().to_owned()),
            ..RuntimeConfig::default()
        })
        .unwrap();
        let started = tokio::time::Instant::now();
        let first = stale(cache.path(), "first.cwasm");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let keeping = tokio::spawn(keep_compile_cache(runtime, stopped));
        assert!(gone(&first).await - started < COMPILE_CACHE_PRUNE_EVERY);

        // A file that goes stale once the host runs goes at a later prune.
        let second = stale(cache.path(), "second.cwasm");
        assert!(gone(&second).await - started >= COMPILE_CACHE_PRUNE_EVERY);
        stop.send(true).unwrap();
        keeping.await.unwrap();
    }
}
