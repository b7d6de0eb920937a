//! The figures of the suite, each measured beside its baseline in the same run.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use switchyard_host::bus::sqlite::{SqliteBus, SqliteOptions};
use switchyard_host::bus::{
    Appended, Bus, BusError, Consumer, ConsumerSpec, ConsumerStats, ControlStore, DeadLetter,
    DeadLetterPage, DeadLetterQuery, DeadLetterSelection, DeadLetters, Delivery, Fired, LogPage,
    LogQuery, Notice, Notices, PluginControl, ScheduledEvent, ScheduledQuery, Schedules,
    SchemaStore, Settled, Settlement, StoredEvent, StoredSchema,
};
use switchyard_host::dispatch::valve::Valves;
use switchyard_host::dispatch::{DispatchState, Dispatcher, Target};
use switchyard_host::event::Event;
use switchyard_host::metrics::Metrics;
use switchyard_host::pattern::Pattern;
use switchyard_host::plugins::manifest::Manifest;
use switchyard_host::runtime::{self, Plugin, Runtime, RuntimeConfig};
use switchyard_host::schema::Schemas;
use switchyard_host::stream::StreamPage;
use switchyard_host::{EmptyKv, KvError, KvSource};
use switchyard_host::{PluginDefaults, PluginPolicy};
use tokio::sync::Notify;

use crate::client::{self, Batch, Single};
use crate::guests::{self, Guest};
use crate::host::{self, Process};
use crate::{Figure, Options, bare};

/// Runs every figure the options select, in order.
pub async fn run_all(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let wanted = |name: &str| {
        options
            .only
            .as_deref()
            .is_none_or(|only| name.contains(only))
    };
    let mut figures = Vec::new();
    let one_mode = |section: &str| {
        options
            .only
            .as_deref()
            .is_some_and(|only| only.starts_with(section))
    };
    if wanted("dispatch") || one_mode("dispatch.") || one_mode("runtime.") {
        figures.extend(dispatch(options).await.context("dispatch")?);
    }
    if wanted("log") {
        figures.extend(log_append(options).await.context("log")?);
    }
    if wanted("ingest") || wanted("memory") {
        figures.extend(ingest(options).await.context("ingest")?);
    }
    if wanted("e2e") {
        figures.extend(end_to_end(options).await.context("e2e")?);
    }
    if wanted("memory") {
        figures.extend(idle_memory(options).await.context("memory")?);
    }
    if wanted("polyglot") {
        figures.extend(
            crate::polyglot::figures(options)
                .await
                .context("polyglot")?,
        );
    }
    if wanted("swap") {
        figures.extend(hot_swap(options).await.context("swap")?);
    }
    if wanted("neighbours") {
        figures.extend(neighbours(options).await.context("neighbours")?);
    }
    if wanted("wait") || wanted("schema") {
        figures.extend(
            crate::producers::figures(options)
                .await
                .context("producers")?,
        );
    }
    if wanted("ui") {
        figures.extend(crate::ui::figures(options).await.context("ui")?);
    }
    if wanted("dlq") {
        figures.extend(
            crate::dead_letters::figures(options)
                .await
                .context("dead letters")?,
        );
    }
    if wanted("peer") {
        figures.extend(crate::peers::figures(options).await.context("peers")?);
    }
    if wanted("traces") {
        figures.extend(crate::traces::figures(options).await.context("traces")?);
    }
    if wanted("nats") || one_mode("nats.") {
        figures.extend(crate::nats::figures(options).await.context("nats")?);
    }
    if wanted("sourcing") || wanted("scheduled") {
        figures.extend(
            crate::sourcing::figures(options)
                .await
                .context("sourcing")?,
        );
    }
    Ok(figures)
}

fn bench_event(n: u64) -> Event {
    Event {
        id: format!("e{n}"),
        source: "/bench".into(),
        ty: "bench.tick".into(),
        subject: None,
        time: None,
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        data: b"{}".to_vec(),
        extensions: Default::default(),
    }
}

// ---------------------------------------------------------------------------------------
// 1. Dispatch

/// A bus that hands out a fixed set of deliveries and counts settlements, so the
/// dispatcher and runtime are measured without storage. Like the real buses, it has at
/// most the consumer's window of deliveries out and unsettled; settlements free room in
/// batches of half a window, as the log's group commits do, rather than one at a time.
struct MemoryBus {
    pending: Mutex<VecDeque<Delivery>>,
    settled: AtomicUsize,
    total: usize,
    done: Notify,
    handed_out: AtomicUsize,
    room: Notify,
}

struct MemoryConsumer {
    bus: Arc<MemoryBus>,
    window: usize,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&self, max: usize) -> Result<Vec<Delivery>, BusError> {
        let bus = &self.bus;
        let room = bus.room.notified();
        let batch: Vec<Delivery> = {
            let mut pending = bus.pending.lock().unwrap();
            let out = bus.handed_out.load(Ordering::Acquire) - bus.settled.load(Ordering::Acquire);
            let n = max.min(pending.len()).min(self.window.saturating_sub(out));
            bus.handed_out.fetch_add(n, Ordering::AcqRel);
            pending.drain(..n).collect()
        };
        if batch.is_empty() {
            let _ = tokio::time::timeout(Duration::from_millis(5), room).await;
        }
        Ok(batch)
    }

    async fn settle(
        &self,
        _delivery: &Delivery,
        settlement: Settlement,
    ) -> Result<Settled, BusError> {
        self.settle_one(&settlement)
    }

    async fn settle_all(
        &self,
        items: &[(&Delivery, &Settlement)],
    ) -> Vec<Result<Settled, BusError>> {
        items
            .iter()
            .map(|(_, settlement)| self.settle_one(settlement))
            .collect()
    }
}

impl MemoryConsumer {
    fn settle_one(&self, settlement: &Settlement) -> Result<Settled, BusError> {
        if !matches!(settlement, Settlement::Ack(_)) {
            return Err(BusError::Storage("a benchmark call failed".into()));
        }
        let settled = self.bus.settled.fetch_add(1, Ordering::AcqRel) + 1;
        if settled == self.bus.total {
            self.bus.done.notify_one();
        }
        if self.bus.handed_out.load(Ordering::Acquire) - settled <= self.window / 2 {
            self.bus.room.notify_one();
        }
        Ok(Settled::default())
    }
}

struct SharedMemoryBus(Arc<MemoryBus>);

#[async_trait]
impl KvSource for SharedMemoryBus {
    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        EmptyKv.get(plugin, key).await
    }

    async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        EmptyKv.keys(plugin, prefix).await
    }

    async fn read_stream(
        &self,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<StreamPage, KvError> {
        EmptyKv.read_stream(subject, after, limit).await
    }

    async fn scheduled(&self, id: &str) -> Result<bool, KvError> {
        EmptyKv.scheduled(id).await
    }
}

#[async_trait]
impl Schedules for SharedMemoryBus {
    async fn list_scheduled(
        &self,
        _query: ScheduledQuery,
    ) -> Result<Vec<ScheduledEvent>, BusError> {
        Ok(Vec::new())
    }
    async fn scheduled_count(&self) -> Result<u64, BusError> {
        Ok(0)
    }
    async fn cancel_scheduled(&self, _id: &str) -> Result<bool, BusError> {
        Ok(false)
    }
    async fn fire_due(&self, _limit: usize) -> Result<Fired, BusError> {
        Ok(Fired::default())
    }
}

#[async_trait]
impl Bus for SharedMemoryBus {
    async fn append(&self, _events: Vec<Event>) -> Result<Vec<Appended>, BusError> {
        Err(BusError::Storage(
            "the benchmark bus takes no appends".into(),
        ))
    }
    async fn read_log(&self, _query: LogQuery) -> Result<LogPage, BusError> {
        Err(BusError::NotFound("log".into()))
    }
    async fn head(&self) -> Result<u64, BusError> {
        Ok(self.0.total as u64)
    }
    async fn recent_events(
        &self,
        _event_type: &str,
        _limit: usize,
    ) -> Result<Vec<StoredEvent>, BusError> {
        Ok(Vec::new())
    }
    async fn consumer(
        &self,
        _plugin: &str,
        spec: ConsumerSpec,
    ) -> Result<Arc<dyn Consumer>, BusError> {
        Ok(Arc::new(MemoryConsumer {
            bus: Arc::clone(&self.0),
            window: spec.window,
        }))
    }
    async fn plugins_with_consumers(&self) -> Result<Vec<String>, BusError> {
        Ok(Vec::new())
    }

    async fn forget_plugin(&self, _plugin: &str) -> Result<(), BusError> {
        Err(BusError::Unsupported(
            "the benchmark's bus keeps no plugin state".to_owned(),
        ))
    }

    async fn consumer_stats(&self, _plugin: &str) -> Result<ConsumerStats, BusError> {
        Ok(ConsumerStats::default())
    }
    async fn close(&self) -> Result<(), BusError> {
        Ok(())
    }
}

#[async_trait]
impl DeadLetters for SharedMemoryBus {
    async fn dead_letters(&self, _query: DeadLetterQuery) -> Result<DeadLetterPage, BusError> {
        Ok(DeadLetterPage::default())
    }
    async fn dead_letter(&self, id: u64) -> Result<DeadLetter, BusError> {
        Err(BusError::NotFound(format!("dead letter {id}")))
    }
    async fn replay_dead_letters(&self, _which: &DeadLetterSelection) -> Result<u64, BusError> {
        Ok(0)
    }
    async fn delete_dead_letters(&self, _which: &DeadLetterSelection) -> Result<u64, BusError> {
        Ok(0)
    }
}

#[async_trait]
impl SchemaStore for SharedMemoryBus {
    async fn put_schema(
        &self,
        _event_type: &str,
        _latest: u32,
        _schema: String,
    ) -> Result<StoredSchema, BusError> {
        Err(BusError::Storage(
            "the benchmark bus keeps no schemas".into(),
        ))
    }
    async fn schema_versions(&self, _event_type: &str) -> Result<Vec<StoredSchema>, BusError> {
        Ok(Vec::new())
    }
    async fn latest_schemas(&self) -> Result<Vec<StoredSchema>, BusError> {
        Ok(Vec::new())
    }
    async fn schema_changes(&self) -> Result<BoxStream<'static, String>, BusError> {
        Ok(futures_util::stream::pending().boxed())
    }
}

#[async_trait]
impl ControlStore for SharedMemoryBus {
    // Never paused, no breaker: the default control, which the dispatcher reads once.
    async fn control(&self, _plugin: &str) -> Result<(PluginControl, u64), BusError> {
        Ok((PluginControl::default(), 0))
    }
    async fn put_control(
        &self,
        _plugin: &str,
        _control: &PluginControl,
        _revision: u64,
    ) -> Result<u64, BusError> {
        Err(BusError::Storage(
            "the benchmark bus keeps no controls".into(),
        ))
    }
    async fn control_changes(&self) -> Result<BoxStream<'static, String>, BusError> {
        Ok(futures_util::stream::pending().boxed())
    }
}

#[async_trait]
impl Notices for SharedMemoryBus {
    // As the embedded log does when nobody waits: nothing to build or send.
    fn notify(&self, _source: &str, _id: &str, _make: &dyn Fn() -> Notice) {}
    async fn listen(
        &self,
        _source: &str,
        _id: &str,
    ) -> Result<BoxStream<'static, Notice>, BusError> {
        Ok(futures_util::stream::pending().boxed())
    }
    async fn recorded(&self, _source: &str, _id: &str) -> Result<Vec<Notice>, BusError> {
        Ok(Vec::new())
    }
}

/// A plugin file loaded with the policy of `sidecar` over the default policy.
async fn load(
    runtime: &Runtime,
    path: &Path,
    sidecar: &str,
) -> anyhow::Result<(PluginPolicy, Plugin)> {
    let policy = Manifest::parse(sidecar)?.resolve(&PluginDefaults::default())?;
    let plugin = runtime.load_file(path, policy.settings.clone()).await?;
    Ok((policy, plugin))
}

/// Calls per second through the dispatcher and runtime, one call at a time.
async fn through_dispatcher(
    runtime: &Runtime,
    path: &Path,
    sidecar: &str,
    calls: usize,
) -> anyhow::Result<f64> {
    let (policy, plugin) = load(runtime, path, sidecar).await?;
    let plugin = Arc::new(plugin);
    let pending = (1..=calls as u64)
        .map(|n| Delivery {
            stored: StoredEvent {
                sequence: n,
                ingested_at_us: switchyard_host::now_us(),
                event: bench_event(n),
            },
            attempt: 1,
            errors: Vec::new(),
            watched: false,
            replayed_at_us: None,
        })
        .collect();
    let bus = Arc::new(MemoryBus {
        pending: Mutex::new(pending),
        settled: AtomicUsize::new(0),
        total: calls,
        done: Notify::new(),
        handed_out: AtomicUsize::new(0),
        room: Notify::new(),
    });
    let memory_bus: Arc<dyn Bus> = Arc::new(SharedMemoryBus(Arc::clone(&bus)));
    let target = Target {
        valve: Valves::new(Arc::clone(&memory_bus), Arc::new(Metrics::default())).valve("bench"),
        schemas: Schemas::new(Arc::clone(&memory_bus)),
        name: "bench".into(),
        plugin,
        policy,
        subscriptions: vec![Pattern::parse(">")?],
        state: Arc::new(DispatchState::default()),
    };
    let started = Instant::now();
    let done = bus.done.notified();
    let dispatcher = Dispatcher::start(memory_bus, Arc::new(Metrics::default()), target).await?;
    tokio::time::timeout(Duration::from_secs(120), done)
        .await
        .context("the dispatcher did not finish")?;
    let elapsed = started.elapsed();
    dispatcher.shutdown(Duration::from_secs(5)).await;
    Ok(calls as f64 / elapsed.as_secs_f64())
}

/// Calls per second of `Plugin::invoke` in a plain loop: the runtime alone.
async fn through_runtime(
    runtime: &Runtime,
    path: &Path,
    sidecar: &str,
    calls: usize,
) -> anyhow::Result<f64> {
    let (_, plugin) = load(runtime, path, sidecar).await?;
    let kv: Arc<dyn KvSource> = Arc::new(EmptyKv);
    let event = bench_event(0);
    let started = Instant::now();
    for n in 0..calls as u64 {
        let delivery = runtime::Delivery {
            attempt: 1,
            max_attempts: 1,
            sequence: n,
        };
        if let Err(failure) = plugin
            .invoke(&event, delivery, Arc::clone(&kv))
            .await
            .result
        {
            anyhow::bail!("call {n} failed: {failure}");
        }
    }
    Ok(calls as f64 / started.elapsed().as_secs_f64())
}

/// `Plugin::invoke_batch` in a loop, batches of 64: the runtime's batch path alone.
async fn through_runtime_batches(
    runtime: &Runtime,
    path: &Path,
    sidecar: &str,
    calls: usize,
) -> anyhow::Result<f64> {
    const BATCH: usize = 64;
    let (_, plugin) = load(runtime, path, sidecar).await?;
    let kv: Arc<dyn KvSource> = Arc::new(EmptyKv);
    let events: Vec<Event> = (0..BATCH as u64).map(bench_event).collect();
    let batches = calls.div_ceil(BATCH);
    let started = Instant::now();
    for round in 0..batches as u64 {
        let items: Vec<(&Event, runtime::Delivery)> = events
            .iter()
            .enumerate()
            .map(|(i, event)| {
                let delivery = runtime::Delivery {
                    attempt: 1,
                    max_attempts: 1,
                    sequence: round * BATCH as u64 + i as u64,
                };
                (event, delivery)
            })
            .collect();
        let outcome = plugin.invoke_batch(&items, Arc::clone(&kv)).await;
        if let Some(failed) = outcome
            .items
            .iter()
            .find(|item| !matches!(item, Some(Ok(_))))
        {
            anyhow::bail!("batch {round} had an item that was not acknowledged: {failed:?}");
        }
    }
    Ok((batches * BATCH) as f64 / started.elapsed().as_secs_f64())
}

async fn dispatch(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let path = guests::path(Guest::Noop);
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let mut figures = Vec::new();
    for (mode, sidecar, calls) in [
        (
            "per-event",
            "concurrency = 1\n",
            options.pick(20_000, 3_000),
        ),
        (
            "reuse",
            "concurrency = 1\ninstance = \"reuse\"\nmax_calls = 1000000\n",
            options.pick(100_000, 20_000),
        ),
        // Against the bare reused per-call loop: one call per event.
        (
            "batch",
            "concurrency = 1\ninstance = \"reuse\"\nmax_calls = 1000000\n\
             [batch]\nmax_size = 64\nlinger = \"0ms\"\n",
            options.pick(200_000, 40_000),
        ),
    ] {
        // `--only dispatch.batch` (or `runtime.invoke.reuse`) runs one mode.
        if let Some(only) = options.only.as_deref().filter(|only| only.contains('.')) {
            let names = [format!("dispatch.{mode}"), format!("runtime.invoke.{mode}")];
            if !names.iter().any(|name| name.contains(only)) {
                continue;
            }
        }
        // Warm up code paths and the pooling allocator's slots, then alternate the three
        // loops so that a busy moment of the machine does not land on one of them only.
        bare::wasmtime_loop(&path, 200, mode == "per-event").await?;
        let (mut bare_rates, mut dispatched, mut invoked) = (Vec::new(), Vec::new(), Vec::new());
        for _round in 0..options.pick(5, 3) {
            bare_rates.push(bare::wasmtime_loop(&path, calls as u32, mode == "per-event").await?);
            dispatched.push(through_dispatcher(&runtime, &path, sidecar, calls).await?);
            invoked.push(if mode == "batch" {
                through_runtime_batches(&runtime, &path, sidecar, calls).await?
            } else {
                through_runtime(&runtime, &path, sidecar, calls).await?
            });
        }
        let (baseline, dispatched) = (median(bare_rates), median(dispatched));
        figures.push(Figure {
            name: format!("dispatch.{mode}"),
            value: dispatched,
            unit: if mode == "batch" {
                "events/s"
            } else {
                "calls/s"
            },
            baseline: Some(baseline),
            baseline_name: "bare wasmtime loop",
            target: match mode {
                "per-event" => "ratio >= 0.9",
                "reuse" => "ratio >= 0.5",
                _ => "ratio >= 1.0 (batches of 64 against one call per event)",
            },
        });
        let invoked = median(invoked);
        figures.push(Figure {
            name: format!("runtime.invoke.{mode}"),
            value: invoked,
            unit: if mode == "batch" {
                "events/s"
            } else {
                "calls/s"
            },
            baseline: Some(baseline),
            baseline_name: "bare wasmtime loop",
            target: "",
        });
    }
    Ok(figures)
}

/// The middle value (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

// ---------------------------------------------------------------------------------------
// 2. Log append

async fn log_append(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let dir = tempfile::tempdir()?;
    let payload = br#"{"amount":1200,"currency":"EUR","customer":"c-1042","order":"o-99"}"#;
    let deadline = options.deadline();
    let mut figures = Vec::new();
    for (label, appenders, per_append, events, baseline_name) in [
        (
            "log.append.single",
            64,
            1,
            options.pick(40_000, 8_000),
            "bare SQLite, 64 rows per commit",
        ),
        (
            "log.append.batch100",
            4,
            100,
            options.pick(400_000, 60_000),
            "bare SQLite, 400 rows per commit",
        ),
    ] {
        let bare_dir = tempfile::tempdir_in(dir.path())?;
        // The log's writer commits whatever appends wait for it as one group with one
        // fsync, and each appender waits for its own append, so a group holds at most
        // `appenders × per_append` events. The bare loop commits rows in groups of that
        // size, over as many rows as the host is given, so that the ratio compares
        // storage work for storage work rather than grouped commits against one fsync
        // per row.
        let bare_per_commit = appenders * per_append;
        let baseline = {
            let path = bare_dir.path().to_owned();
            tokio::task::spawn_blocking(move || {
                bare::sqlite_loop(&path, events, bare_per_commit, payload, deadline)
            })
            .await??
        };
        let bus = Arc::new(SqliteBus::open(SqliteOptions::new(
            dir.path().join(format!("{label}.db")),
        ))?);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for a in 0..appenders {
            let bus = Arc::clone(&bus);
            tasks.push(tokio::spawn(async move {
                let mut appended = 0usize;
                let mut n = a * per_append;
                while n < events && started.elapsed() < deadline {
                    let batch = (n..n + per_append)
                        .map(|i| Event {
                            data: payload.to_vec(),
                            ..bench_event(i as u64)
                        })
                        .collect();
                    appended += bus.append(batch).await?.len();
                    n += appenders * per_append;
                }
                anyhow::Ok(appended)
            }));
        }
        let mut appended = 0;
        for task in tasks {
            appended += task.await??;
        }
        let rate = appended as f64 / started.elapsed().as_secs_f64();
        bus.close().await?;
        figures.push(Figure {
            name: label.to_owned(),
            value: rate,
            unit: "events/s",
            baseline: Some(baseline),
            baseline_name,
            target: "",
        });
    }
    Ok(figures)
}

// ---------------------------------------------------------------------------------------
// 3. HTTP ingest, and 5. memory under its load

async fn ingest(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let deadline = options.deadline();
    let single_requests = options.pick(120_000, 20_000);
    let batch_requests = options.pick(4_000, 800);
    let single = |prefix: &str| -> Arc<dyn client::Request> {
        Arc::new(Single {
            prefix: prefix.to_owned(),
        })
    };
    let batch = |prefix: &str| -> Arc<dyn client::Request> {
        Arc::new(Batch {
            prefix: prefix.to_owned(),
            size: 100,
        })
    };

    let bare = Process::bare_http()?;
    client::saturate(bare.address, 8, 2_000, deadline, single("warm")).await?;
    let bare_single = client::saturate(bare.address, 64, single_requests, deadline, single("s"))
        .await?
        .per_second;
    let bare_batch = client::saturate(bare.address, 8, batch_requests, deadline, batch("b"))
        .await?
        .per_second;
    let (_, bare_peak) = bare.memory_mib()?;
    drop(bare);

    let host = Process::host(&[], None)?;
    client::saturate(host.address, 8, 2_000, deadline, single("warm")).await?;
    let host_single = client::saturate(host.address, 64, single_requests, deadline, single("s"))
        .await?
        .per_second;
    let host_batch = client::saturate(host.address, 8, batch_requests, deadline, batch("b"))
        .await?
        .per_second;
    let (_, host_peak) = host.memory_mib()?;

    Ok(vec![
        Figure {
            name: "ingest.single".into(),
            value: host_single,
            unit: "events/s",
            baseline: Some(bare_single),
            baseline_name: "bare axum 202 route",
            target: ">= 30000 events/s",
        },
        Figure {
            name: "ingest.batch100".into(),
            value: host_batch,
            unit: "events/s",
            baseline: Some(bare_batch),
            baseline_name: "bare axum 202 route",
            target: ">= 300000 events/s",
        },
        Figure {
            name: "memory.peak_under_ingest".into(),
            value: host_peak,
            unit: "MiB",
            baseline: Some(bare_peak),
            baseline_name: "bare axum server, same load",
            target: "",
        },
    ])
}

// ---------------------------------------------------------------------------------------
// 4. End to end at a fixed offered rate

/// The index of the nearest-rank quantile `q` among `len` sorted values: the smallest
/// value with at least a share `q` of the values at or below it (`q = 1` is the largest).
fn nearest_rank(len: usize, q: f64) -> usize {
    ((len as f64 * q).ceil() as usize).clamp(1, len) - 1
}

/// The nearest-rank quantile `q` of sorted durations, in milliseconds.
pub fn quantile(sorted: &[Duration], q: f64) -> f64 {
    sorted[nearest_rank(sorted.len(), q)].as_secs_f64() * 1000.0
}

/// The nearest-rank quantile `q` of sorted values (milliseconds that may be negative,
/// which a [`Duration`] cannot hold), the same rank as [`quantile`].
pub fn quantile_ms(sorted: &[f64], q: f64) -> f64 {
    sorted[nearest_rank(sorted.len(), q)]
}

async fn end_to_end(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let mut figures = paced_end_to_end(options, "e2e", None).await?;
    // The same with batches on: the linger is part of the start latency.
    let batched = "[batch]\nmax_size = 64\nlinger = \"1ms\"\n".to_owned();
    figures.extend(paced_end_to_end(options, "e2e.batch", Some(batched)).await?);
    Ok(figures)
}

/// Latencies at 5,000 events/s into the no-op plugin with `sidecar`, named `prefix.…`.
async fn paced_end_to_end(
    options: &Options,
    prefix: &str,
    sidecar: Option<String>,
) -> anyhow::Result<Vec<Figure>> {
    const RATE: f64 = 5_000.0;
    let duration = options.pick(Duration::from_secs(10), Duration::from_secs(3));
    let host = Process::host(&[("probe".into(), Guest::Noop, sidecar)], None)?;
    // Warm up the connections and the plugin's first instances.
    client::paced(host.address, 64, RATE, Duration::from_millis(500), "warm").await?;
    host.wait_caught_up("probe", Duration::from_secs(60))
        .await?;
    let warm_metrics = host.metrics().await?;
    let mut acks = client::paced(host.address, 64, RATE, duration, "e2e").await?;
    host.wait_caught_up("probe", Duration::from_secs(120))
        .await?;
    let metrics = host.metrics().await?;
    acks.sort();
    let mut figures = Vec::new();
    for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
        figures.push(Figure {
            name: format!("{prefix}.ack.{label}"),
            value: quantile(&acks, q),
            unit: "ms",
            baseline: None,
            baseline_name: "client: due time to 202",
            target: "",
        });
    }
    // The host's histograms run from the event's `ingested_at_us`, stamped when the log's
    // writer inserts its row (before that group's commit and fsync): they leave out the
    // HTTP request and the wait in the writer's queue, which `ack` includes.
    for (stage, series, measured_from, target) in [
        (
            "start",
            "switchyard_delivery_start_latency_seconds",
            "log insert to handler start",
            "p99 <= 5 ms",
        ),
        (
            "commit",
            "switchyard_delivery_commit_latency_seconds",
            "log insert to outcome commit",
            "",
        ),
    ] {
        let measured = subtract_histograms(&metrics, &warm_metrics, series);
        for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            figures.push(Figure {
                name: format!("{prefix}.{stage}.{label}"),
                value: host::histogram_quantile(&measured, series, q)? * 1000.0,
                unit: "ms",
                baseline: None,
                baseline_name: measured_from,
                target: if label == "p99" { target } else { "" },
            });
        }
    }
    Ok(figures)
}

/// The buckets of `series` in `after` minus those in `before`, as metrics text, so the
/// warm-up is left out of the quantiles.
pub fn subtract_histograms(after: &str, before: &str, series: &str) -> String {
    let prefix = format!("{series}_bucket{{");
    let counts = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    };
    let earlier = counts(before);
    counts(after)
        .into_iter()
        .map(|(name, value)| {
            let old = earlier
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0.0, |(_, v)| *v);
            format!("{name} {}\n", value - old)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// 5. Idle memory with 50 plugins

/// `wasm` (a core module or a component) with a custom section `name` holding `payload`
/// appended: different bytes, and so a different sha256, with the same behaviour.
fn with_custom_section(wasm: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut content = Vec::new();
    leb128(name.len(), &mut content);
    content.extend_from_slice(name.as_bytes());
    content.extend_from_slice(payload);
    let mut out = wasm.to_vec();
    out.push(0); // the custom section's id
    leb128(content.len(), &mut out);
    out.extend_from_slice(&content);
    out
}

async fn idle_memory(_options: &Options) -> anyhow::Result<Vec<Figure>> {
    let empty = Process::host(&[], None)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (empty_rss, _) = empty.memory_mib()?;
    drop(empty);

    // Fifty distinct components: `noop` with a custom section of its own appended to each
    // copy. The compile cache is keyed by the file's sha256, so identical copies would be
    // one compile and 49 cache hits; these are fifty compiles into an empty cache.
    let noop = std::fs::read(guests::path(Guest::Noop))?;
    let dir = tempfile::tempdir()?;
    let plugin_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugin_dir)?;
    for n in 0..50 {
        let name = format!("p{n:02}");
        std::fs::write(
            plugin_dir.join(format!("{name}.wasm")),
            with_custom_section(&noop, "switchyard-bench", name.as_bytes()),
        )?;
    }
    let started = Instant::now();
    let full = Process::serve(dir, None)?;
    let startup = started.elapsed();
    let listed = full.get_json("/v1/plugins").await?;
    let running = listed["plugins"]
        .as_array()
        .map_or(0, |p| p.iter().filter(|p| p["status"] == "running").count());
    anyhow::ensure!(running == 50, "{running} of 50 plugins running: {listed}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, _) = full.memory_mib()?;
    Ok(vec![
        Figure {
            name: "memory.idle_50_plugins".into(),
            value: rss,
            unit: "MiB",
            baseline: Some(empty_rss),
            baseline_name: "idle host, no plugins",
            target: "<= 150 MiB",
        },
        Figure {
            name: "startup.50_plugins".into(),
            value: startup.as_secs_f64() * 1000.0,
            unit: "ms",
            baseline: None,
            baseline_name: "spawn to listening, 50 compiles",
            target: "",
        },
    ])
}

// ---------------------------------------------------------------------------------------
// 6. Hot swap

async fn hot_swap(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let host = Process::host(&[("swap".into(), Guest::Noop, None)], None)?;
    let versions = [
        std::fs::read(guests::path(Guest::Hostile))?,
        std::fs::read(guests::path(Guest::Noop))?,
    ];
    let mut latencies = Vec::new();
    let mut current = host.get_json("/v1/plugins/swap").await?["sha256"].clone();
    for round in 0..options.pick(6, 4) {
        let started = Instant::now();
        host::deploy(&host.plugins_dir(), "swap.wasm", &versions[round % 2])?;
        loop {
            let status = host.get_json("/v1/plugins/swap").await?;
            if status["sha256"] != current && status["status"] == "running" {
                current = status["sha256"].clone();
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "the swap did not happen: {status}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    // Only the first round compiles (`hostile`; `noop` was compiled when the host
    // started); every later round loads its component from the compile cache.
    let median = latencies[latencies.len() / 2];
    // No measured baseline: the watcher's quiet period (250 ms by default) is a floor by
    // design, not a measurement, so it is named here rather than given as a ratio.
    Ok(vec![Figure {
        name: "swap.median".into(),
        value: median.as_secs_f64() * 1000.0,
        unit: "ms",
        baseline: None,
        baseline_name: "rename to serving, incl. 250 ms quiet",
        target: "",
    }])
}

// ---------------------------------------------------------------------------------------
// Well-behaved plugin beside hostile ones

async fn neighbours(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let events = options.pick(3_000, 600);
    let good = (
        "good".to_owned(),
        Guest::Hostile,
        Some("subscribe = [\"work.>\"]\n[config]\nbehaviour = \"hostile.ok\"\n".to_owned()),
    );
    let hostile = |behaviour: &str| {
        (
            behaviour.to_owned(),
            Guest::Hostile,
            Some(format!(
                "subscribe = [\"work.>\"]\n[retry]\nmax_attempts = 1\n\
                 [config]\nbehaviour = \"hostile.{behaviour}\"\n"
            )),
        )
    };
    let solo = handled_per_second(std::slice::from_ref(&good), events, options).await?;
    let crowded = handled_per_second(
        &[good, hostile("loop"), hostile("memory"), hostile("panic")],
        events,
        options,
    )
    .await?;
    Ok(vec![Figure {
        name: "neighbours.good_plugin".into(),
        value: crowded,
        unit: "events/s",
        baseline: Some(solo),
        baseline_name: "the same plugin alone",
        target: "ratio >= 0.25",
    }])
}

/// Sends `events` events of type `work.item` in batches and returns how many per second
/// the plugin `good` handled, from the first send to its catching up; fails unless it
/// handled every one (catching up alone would also pass dead-lettered events).
async fn handled_per_second(
    plugins: &[(String, Guest, Option<String>)],
    events: usize,
    options: &Options,
) -> anyhow::Result<f64> {
    let host = Process::host(plugins, None)?;
    let batches = events / 100;
    let sent = batches * 100;
    let started = Instant::now();
    client::post_batches(host.address, "work.item", "w", batches, 100).await?;
    let done = host.wait_caught_up("good", options.deadline() * 4).await?;
    Process::ensure_all_handled(&[&host], "good", 0, sent as u64).await?;
    Ok(sent as f64 / (done - started).as_secs_f64())
}
