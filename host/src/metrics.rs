//! Prometheus metrics of the host and their exposition for `GET /metrics`.
//!
//! This module owns every metric family the host exports: each is registered once in a
//! `prometheus-client` [`Registry`] under the `switchyard` prefix, and the library encodes
//! the Prometheus text format 0.0.4, served as [`CONTENT_TYPE`]. Invariants:
//!
//! - Names, types, label names and histogram bounds are a contract with dashboards and
//!   alerts. Counters are registered without `_total` because the encoder appends it
//!   (and debug builds refuse a counter registered with it), so every exported counter
//!   name ends in `_total` exactly once.
//! - Counters live in memory and start from zero at every start, as Prometheus expects.
//! - The first time a plugin is recorded, all its per-plugin series appear at zero, so
//!   failures and retries are `0` rather than absent until the first one happens.
//! - Values the host does not count itself (compile cache, lag, pending retries,
//!   in-flight deliveries) are written at scrape time by [`Metrics::render`], which holds
//!   one lock from writing them to encoding so that concurrent scrapes cannot interleave.
//! - The log's size and retention series are set by the embedded log's retention worker
//!   (this module's [`RetentionObserver`]) and absent until it first reports.
//! - The per-event paths take no mutex: a read lock on the map of cached per-plugin
//!   handles, then atomics, for counters and histograms alike ([`Durations`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};

use crate::bus::sqlite::RetentionObserver;
use crate::bus::{ConsumerStats, Reach};
use crate::runtime::{Access, CacheStats};

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Upper bounds of the handler duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0,
];

/// Upper bounds of the delivery latency histograms (from ingest to handler start, and to
/// the commit of the outcome), in seconds: fine steps up to 5 ms, where the target sits.
const LATENCY_BUCKETS: [f64; 20] = [
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

fn duration_histogram() -> Durations {
    Durations::new(&DURATION_BUCKETS)
}

fn latency_histogram() -> Durations {
    Durations::new(&LATENCY_BUCKETS)
}

/// A family of histograms, each built with its family's bounds.
type HistogramFamily = Family<PluginLabels, Durations>;

/// A Prometheus histogram of durations whose observations take no lock: each bucket is an
/// atomic counter, added up when scraped, and the sum is an `f64` of seconds updated by
/// compare-and-swap. (A sum of whole nanoseconds in a `u64` wraps after 585 years of
/// observed time: a few thousand start latencies of month-old events, which a plugin
/// starting from the earliest event observes, and a wrapped sum goes down.)
/// `prometheus-client`'s own histogram takes a lock per observation, and a delivery
/// makes three. A scrape during observations may see the sum and the buckets one
/// observation apart, which Prometheus tolerates.
#[derive(Debug, Clone)]
struct Durations(Arc<DurationCells>);

#[derive(Debug)]
struct DurationCells {
    /// Upper bounds in seconds, as exported.
    bounds: &'static [f64],
    /// The same in nanoseconds, as observed.
    bounds_ns: Box<[u64]>,
    /// Observations per bucket (not cumulative); the last is above every bound.
    counts: Box<[AtomicU64]>,
    /// The sum of the observations in seconds, as `f64` bits.
    sum_seconds: AtomicU64,
}

impl Durations {
    fn new(bounds: &'static [f64]) -> Self {
        Self(Arc::new(DurationCells {
            bounds,
            // Bounds are whole nanoseconds, well inside u64.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            bounds_ns: bounds
                .iter()
                .map(|seconds| (seconds * 1e9).round() as u64)
                .collect(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_seconds: AtomicU64::new(0f64.to_bits()),
        }))
    }

    fn observe(&self, value: Duration) {
        let ns = u64::try_from(value.as_nanos()).unwrap_or(u64::MAX);
        // The first bucket whose bound is at least the value (`le`).
        let bucket = self.0.bounds_ns.partition_point(|&bound| bound < ns);
        if let Some(count) = self.0.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let seconds = value.as_secs_f64();
        // The closure always answers `Some`, so the update cannot fail.
        let _ = self
            .0
            .sum_seconds
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + seconds).to_bits())
            });
    }

    /// The sum of every observation, in seconds.
    fn sum(&self) -> f64 {
        f64::from_bits(self.0.sum_seconds.load(Ordering::Relaxed))
    }
}

impl TypedMetric for Durations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Durations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // As `prometheus-client` hands its own to the encoder: each bucket's own count
        // (the encoder adds them up), the last one's bound infinite (`+Inf`).
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.0.counts.iter())
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        let total = buckets.iter().map(|(_, count)| count).sum();
        let sum = self.sum();
        encoder.encode_histogram::<NoLabelSet>(sum, total, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Gauges are read from the bus as unsigned counts.
type CountGauge = Gauge<u64, AtomicU64>;

// The name is shared by every series of a plugin rather than copied into each.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    plugin: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    plugin: Arc<str>,
    reason: &'static str,
}

/// The states a breaker transition goes into (`switchyard_breaker_transitions_total`).
const BREAKER_STATES: [&str; 3] = ["open", "probing", "closed"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    plugin: Arc<str>,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccessLabels {
    plugin: Arc<str>,
    access: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// Handles of the registered families; each shares its values with the registry.
struct Families {
    compile_cache_hits: Counter,
    compile_cache_misses: Counter,
    compile_cache_bytes: CountGauge,
    bus_connected: CountGauge,
    bus_reconnects: Counter,
    events_ingested: Counter,
    ingest_rejected: Family<CodeLabels, Counter>,
    plugin_loads: Family<PluginLabels, Counter>,
    plugin_load_failures: Family<PluginLabels, Counter>,
    deliveries: Family<OutcomeLabels, Counter>,
    handler_duration: HistogramFamily,
    start_latency: HistogramFamily,
    commit_latency: HistogramFamily,
    fuel_used: Family<PluginLabels, Counter>,
    plugin_cpu: Family<PluginLabels, Counter<f64, AtomicU64>>,
    retries_scheduled: Family<PluginLabels, Counter>,
    dead_letters: Family<ReasonLabels, Counter>,
    plugin_lag: Family<PluginLabels, CountGauge>,
    plugin_pending_retries: Family<PluginLabels, CountGauge>,
    plugin_dead_letters: Family<PluginLabels, CountGauge>,
    plugin_in_flight: Family<PluginLabels, CountGauge>,
    plugin_paused: Family<PluginLabels, CountGauge>,
    plugin_breaker_open: Family<PluginLabels, CountGauge>,
    plugin_serving: Family<PluginLabels, CountGauge>,
    plugin_refused: Family<AccessLabels, Counter>,
    breaker_transitions: Family<StateLabels, Counter>,
    batch_calls: Family<PluginLabels, Counter>,
    batch_events: Family<PluginLabels, Counter>,
    scheduled_pending: CountGauge,
    scheduled_fired: Counter,
    scheduled_cancelled: Counter,
    scheduled_fire_lag: Durations,
    trace_spans_dropped: Family<DropLabels, Counter>,
}

impl Families {
    /// Creates every family and registers it; the field order is the exposition's order.
    fn register(registry: &mut Registry) -> Self {
        Self {
            compile_cache_hits: registered(
                registry,
                "compile_cache_hits",
                "Plugins loaded from the compiled-code cache",
                Counter::default(),
            ),
            compile_cache_misses: registered(
                registry,
                "compile_cache_misses",
                "Plugins compiled",
                Counter::default(),
            ),
            compile_cache_bytes: registered(
                registry,
                "compile_cache_bytes",
                "Bytes of compiled code in the cache after its last prune (at start, then hourly)",
                CountGauge::default(),
            ),
            bus_connected: registered(
                registry,
                "bus_connected",
                "1 while the bus can be reached (always, for the embedded log), else 0",
                CountGauge::default(),
            ),
            bus_reconnects: registered(
                registry,
                "bus_reconnects",
                "Connections to the bus made again since the first",
                Counter::default(),
            ),
            events_ingested: registered(
                registry,
                "events_ingested",
                "Events made durable by ingest",
                Counter::default(),
            ),
            ingest_rejected: registered(
                registry,
                "ingest_rejected",
                "Ingest requests refused, by error code",
                Family::default(),
            ),
            plugin_loads: registered(
                registry,
                "plugin_loads",
                "Plugin versions loaded and serving",
                Family::default(),
            ),
            plugin_load_failures: registered(
                registry,
                "plugin_load_failures",
                "Plugin files that failed to load",
                Family::default(),
            ),
            deliveries: registered(
                registry,
                "deliveries",
                "Handler invocations by plugin and outcome",
                Family::default(),
            ),
            handler_duration: registered(
                registry,
                "handler_duration_seconds",
                "Duration of handler invocations",
                Family::new_with_constructor(duration_histogram),
            ),
            start_latency: registered(
                registry,
                "delivery_start_latency_seconds",
                "Time from ingest to the start of an event's first attempt",
                Family::new_with_constructor(latency_histogram),
            ),
            commit_latency: registered(
                registry,
                "delivery_commit_latency_seconds",
                "Time from ingest to the commit of the outcome of an event's first attempt",
                Family::new_with_constructor(latency_histogram),
            ),
            fuel_used: registered(
                registry,
                "fuel_used",
                "Fuel burned by handler invocations",
                Family::default(),
            ),
            plugin_cpu: registered(
                registry,
                "plugin_cpu_seconds",
                "Time the plugin's guests ran on the host's threads",
                Family::default(),
            ),
            retries_scheduled: registered(
                registry,
                "retries_scheduled",
                "Retries scheduled",
                Family::default(),
            ),
            dead_letters: registered(
                registry,
                "dead_letters",
                "Events moved to the dead letters",
                Family::default(),
            ),
            plugin_lag: registered(
                registry,
                "plugin_lag_events",
                "Events in the log after the plugin's cursor",
                Family::default(),
            ),
            plugin_pending_retries: registered(
                registry,
                "plugin_pending_retries",
                "Deliveries waiting for a retry",
                Family::default(),
            ),
            plugin_dead_letters: registered(
                registry,
                "plugin_dead_letters",
                "Dead letters the plugin has now (replayed, deleted and expired ones gone)",
                Family::default(),
            ),
            plugin_in_flight: registered(
                registry,
                "plugin_in_flight",
                "Deliveries being handled now",
                Family::default(),
            ),
            plugin_paused: registered(
                registry,
                "plugin_paused",
                "1 while an operator has paused the plugin",
                Family::default(),
            ),
            plugin_breaker_open: registered(
                registry,
                "plugin_breaker_open",
                "1 while the plugin's circuit breaker is open or probing",
                Family::default(),
            ),
            plugin_serving: registered(
                registry,
                "plugin_serving",
                "1 while a version of the plugin serves, 0 while its files failed to load and none does",
                Family::default(),
            ),
            plugin_refused: registered(
                registry,
                "plugin_refused",
                "Attempts of the plugin to reach outside its sandbox (a file, a socket, an HTTP request), refused",
                Family::default(),
            ),
            breaker_transitions: registered(
                registry,
                "breaker_transitions",
                "Circuit breaker transitions made by this host, by the state entered",
                Family::default(),
            ),
            batch_calls: registered(
                registry,
                "batch_calls",
                "Calls of the plugin's batch handler",
                Family::default(),
            ),
            batch_events: registered(
                registry,
                "batch_events",
                "Events handled by the plugin's batch handler (not those a call did not reach, which run again alone)",
                Family::default(),
            ),
            scheduled_pending: registered(
                registry,
                "scheduled_pending",
                "Scheduled events waiting for their due time",
                CountGauge::default(),
            ),
            scheduled_fired: registered(
                registry,
                "scheduled_fired",
                "Scheduled events this host appended to the log when due",
                Counter::default(),
            ),
            scheduled_cancelled: registered(
                registry,
                "scheduled_cancelled",
                "Scheduled events cancelled over HTTP before they were due",
                Counter::default(),
            ),
            scheduled_fire_lag: registered(
                registry,
                "scheduled_fire_lag_seconds",
                "From a scheduled event's due time to its append to the log",
                latency_histogram(),
            ),
            trace_spans_dropped: registered(
                registry,
                "trace_spans_dropped",
                "Spans not exported, by reason: `queue_full` (2048 were waiting for export) or `export_failed`; only with [telemetry] otlp_endpoint",
                Family::default(),
            ),
        }
    }
}

/// Registers `metric` and returns the handle that shares its values. `help` leaves out
/// the final period, which the registry adds.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// A plugin's counters split by a second label (outcome, reason). There are a few values
/// per plugin, so an event finds its counter by a short scan rather than by hashing the
/// whole label set under the family's lock.
#[derive(Default)]
struct ByLabel(Vec<(&'static str, Counter)>);

impl ByLabel {
    fn get(&self, value: &str) -> Option<&Counter> {
        self.0.iter().find(|(v, _)| *v == value).map(|(_, c)| c)
    }

    fn inc_or_insert_with(&mut self, value: &'static str, create: impl FnOnce() -> Counter) {
        self.add_or_insert_with(value, 1, create);
    }

    fn add_or_insert_with(
        &mut self,
        value: &'static str,
        n: u64,
        create: impl FnOnce() -> Counter,
    ) {
        match self.get(value) {
            Some(counter) => {
                counter.inc_by(n);
            }
            None => {
                let counter = create();
                counter.inc_by(n);
                self.0.push((value, counter));
            }
        }
    }
}

/// One plugin's series, taken from the families once so that an event touches the
/// series' own atomics and locks, never a family's map.
struct PluginSeries {
    labels: PluginLabels,
    deliveries: ByLabel,
    dead_letters: ByLabel,
    loads: Counter,
    load_failures: Counter,
    duration: Durations,
    start_latency: Durations,
    commit_latency: Durations,
    fuel: Counter,
    cpu: Counter<f64, AtomicU64>,
    retries: Counter,
    /// Refused attempts of the plugin's earlier versions, in the order of
    /// [`Access::ALL`]: each version counts from zero, the counter goes on.
    refused_before: [AtomicU64; 3],
}

impl PluginSeries {
    fn new(families: &Families, plugin: &str) -> Self {
        let labels = PluginLabels {
            plugin: Arc::from(plugin),
        };
        Self {
            loads: families.plugin_loads.get_or_create_owned(&labels),
            load_failures: families.plugin_load_failures.get_or_create_owned(&labels),
            duration: families.handler_duration.get_or_create_owned(&labels),
            start_latency: families.start_latency.get_or_create_owned(&labels),
            commit_latency: families.commit_latency.get_or_create_owned(&labels),
            fuel: families.fuel_used.get_or_create_owned(&labels),
            cpu: families.plugin_cpu.get_or_create_owned(&labels),
            retries: families.retries_scheduled.get_or_create_owned(&labels),
            deliveries: ByLabel::default(),
            dead_letters: ByLabel::default(),
            refused_before: Default::default(),
            labels,
        }
    }
}

/// What one invocation cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    /// Its wall-clock time.
    pub duration: Duration,
    /// The fuel it burned.
    pub fuel: u64,
    /// The time its guest ran on a thread, as the CPU gate charged it.
    pub cpu: Duration,
}

/// One acknowledged attempt, for [`Metrics::acknowledged`]: what it cost, and for a
/// first attempt how long after ingest it started and was committed.
#[derive(Debug, Clone, Copy)]
pub struct Handled {
    /// What the call cost.
    pub cost: Cost,
    /// Start and commit latency of a first attempt; `None` for a later one.
    pub latency: Option<(Duration, Duration)>,
}

/// A per-plugin gauge value read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct PluginGauges {
    /// The plugin's consumer counters (lag, pending retries, dead letters); `None` while
    /// the bus cannot be reached, and then those series are left out rather than shown
    /// as zero.
    pub consumer: Option<ConsumerStats>,
    /// Deliveries being handled now.
    pub in_flight: u64,
    /// Whether an operator has paused the plugin.
    pub paused: bool,
    /// Whether its circuit breaker is open or probing.
    pub breaker_open: bool,
    /// Whether a version of it serves (else its files failed to load).
    pub serving: bool,
    /// Attempts to reach outside the sandbox, refused, in the order of [`Access::ALL`].
    pub refused: [u64; 3],
}

/// Running totals read by the stats history ([`Metrics::totals`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Events made durable by ingest.
    pub ingested: u64,
    /// Per plugin.
    pub plugins: BTreeMap<String, PluginTotals>,
}

/// One plugin's running totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PluginTotals {
    /// Invocations by outcome (`ok` or a failure kind, `conflict` for reruns, `deferred`
    /// for a hand-back after conflicts that persisted).
    pub deliveries: BTreeMap<&'static str, u64>,
    /// Handler time of all invocations, in microseconds.
    pub duration_us: u64,
    /// Events moved to the dead letters.
    pub dead_lettered: u64,
}

impl PluginTotals {
    /// Invocations that succeeded.
    pub fn handled(&self) -> u64 {
        self.deliveries.get("ok").copied().unwrap_or(0)
    }

    /// Invocations that failed. A rerun after a KV conflict, and a hand-back after
    /// conflicts that persisted, are neither handled nor failed.
    pub fn failed(&self) -> u64 {
        self.deliveries
            .iter()
            .filter(|(outcome, _)| !matches!(**outcome, "ok" | "conflict" | "deferred"))
            .map(|(_, count)| count)
            .sum()
    }

    /// Every invocation, reruns included.
    pub fn calls(&self) -> u64 {
        self.deliveries.values().sum()
    }
}

/// The host's metrics.
pub struct Metrics {
    registry: Registry,
    families: Families,
    log: LogFamilies,
    plugins: RwLock<HashMap<Arc<str>, PluginSeries>>,
    scrape: Mutex<()>,
}

/// A label set of no labels: a family of one unlabelled series, which is exported only
/// once it is first set.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Unlabelled;

impl EncodeLabelSet for Unlabelled {
    fn encode(
        &self,
        _encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

/// The embedded log's size and retention. Absent until the retention worker first
/// reports, so a host without retention, or on NATS, does not export them.
struct LogFamilies {
    retention_deleted_events: Family<Unlabelled, Counter>,
    retention_deleted_bytes: Family<Unlabelled, Counter>,
    retention_blocked: Family<Unlabelled, CountGauge>,
    used_bytes: Family<Unlabelled, CountGauge>,
    file_bytes: Family<Unlabelled, CountGauge>,
}

impl LogFamilies {
    fn register(registry: &mut Registry) -> Self {
        Self {
            retention_deleted_events: registered(
                registry,
                "log_retention_deleted_events",
                "Events deleted from the log by retention",
                Family::default(),
            ),
            retention_deleted_bytes: registered(
                registry,
                "log_retention_deleted_bytes",
                "Approximate bytes of the events deleted from the log by retention",
                Family::default(),
            ),
            retention_blocked: registered(
                registry,
                "log_retention_blocked",
                "1 while the log is above log.max_bytes and retention may delete none of the \
                 events left (unsettled, dead-lettered or kept forever)",
                Family::default(),
            ),
            used_bytes: registered(
                registry,
                "log_used_bytes",
                "Bytes of the log's database pages in use",
                Family::default(),
            ),
            file_bytes: registered(
                registry,
                "log_file_bytes",
                "Bytes of the log's database file, free pages included",
                Family::default(),
            ),
        }
    }
}

impl RetentionObserver for Metrics {
    fn deleted(&self, events: u64, bytes: u64) {
        let log = &self.log;
        log.retention_deleted_events
            .get_or_create(&Unlabelled)
            .inc_by(events);
        log.retention_deleted_bytes
            .get_or_create(&Unlabelled)
            .inc_by(bytes);
    }

    fn size(&self, used_bytes: u64, file_bytes: u64) {
        self.log
            .used_bytes
            .get_or_create(&Unlabelled)
            .set(used_bytes);
        self.log
            .file_bytes
            .get_or_create(&Unlabelled)
            .set(file_bytes);
    }

    fn blocked(&self, blocked: bool) {
        self.log
            .retention_blocked
            .get_or_create(&Unlabelled)
            .set(u64::from(blocked));
        // A counter that was never bumped would otherwise be absent beside the gauge.
        self.deleted(0, 0);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let families = Families::register(&mut registry);
        let log = LogFamilies::register(&mut registry);
        Self {
            registry,
            families,
            log,
            plugins: RwLock::default(),
            scrape: Mutex::default(),
        }
    }
}

impl Metrics {
    /// The running totals the stats history samples.
    pub fn totals(&self) -> Totals {
        let plugins = self.plugins.read().unwrap_or_else(PoisonError::into_inner);
        Totals {
            ingested: self.families.events_ingested.get(),
            plugins: plugins
                .iter()
                .map(|(name, series)| {
                    let totals = PluginTotals {
                        deliveries: series
                            .deliveries
                            .0
                            .iter()
                            .map(|(o, c)| (*o, c.get()))
                            .collect(),
                        duration_us: Duration::try_from_secs_f64(series.duration.sum())
                            .map_or(u64::MAX, |sum| {
                                u64::try_from(sum.as_micros()).unwrap_or(u64::MAX)
                            }),
                        dead_lettered: series.dead_letters.0.iter().map(|(_, c)| c.get()).sum(),
                    };
                    (name.to_string(), totals)
                })
                .collect(),
        }
    }

    /// Counts events made durable by ingest (duplicates not included).
    pub fn events_ingested(&self, n: u64) {
        self.families.events_ingested.inc_by(n);
    }

    /// Counts a call of a plugin's batch handler that handled `events` events.
    pub fn batch_call(&self, plugin: &str, events: usize) {
        let labels = PluginLabels {
            plugin: Arc::from(plugin),
        };
        self.families.batch_calls.get_or_create(&labels).inc();
        self.families
            .batch_events
            .get_or_create(&labels)
            .inc_by(events as u64);
    }

    /// Records scheduled events appended when due, each with its lag in milliseconds.
    pub fn scheduled_fired(&self, lags_ms: &[u64]) {
        self.families.scheduled_fired.inc_by(lags_ms.len() as u64);
        for lag in lags_ms {
            self.families
                .scheduled_fire_lag
                .observe(Duration::from_millis(*lag));
        }
    }

    /// Sets how many scheduled events are pending.
    pub fn scheduled_pending(&self, pending: u64) {
        self.families.scheduled_pending.set(pending);
    }

    /// Counts a scheduled event cancelled over HTTP.
    pub fn scheduled_cancelled(&self) {
        self.families.scheduled_cancelled.inc();
    }

    /// Counts an ingest request refused with `code`.
    pub fn ingest_rejected(&self, code: &'static str) {
        self.families
            .ingest_rejected
            .get_or_create(&CodeLabels { code })
            .inc();
    }

    fn with_plugin<R>(&self, plugin: &str, update: impl FnOnce(&PluginSeries) -> R) -> R {
        let plugins = self.plugins.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = plugins.get(plugin) {
            return update(series);
        }
        drop(plugins);
        self.with_plugin_mut(plugin, |series, _| update(series))
    }

    /// The slow path of [`Self::with_plugin`], for a plugin or a label value seen first.
    fn with_plugin_mut<R>(
        &self,
        plugin: &str,
        update: impl FnOnce(&mut PluginSeries, &Families) -> R,
    ) -> R {
        let mut plugins = self.plugins.write().unwrap_or_else(PoisonError::into_inner);
        let series = plugins
            .entry(Arc::from(plugin))
            .or_insert_with(|| PluginSeries::new(&self.families, plugin));
        update(series, &self.families)
    }

    /// Records one invocation: its outcome (`ok` or a failure kind), duration and fuel.
    pub fn delivery(&self, plugin: &str, outcome: &'static str, cost: Cost) {
        self.deliveries(
            plugin,
            outcome,
            &[Handled {
                cost,
                latency: None,
            }],
        );
    }

    /// Records acknowledged attempts settled together, as [`Metrics::delivery`] with the
    /// outcome `ok` (and [`Metrics::delivery_latency`] for each first attempt) would one
    /// by one, under one look-up of the plugin's series.
    pub fn acknowledged(&self, plugin: &str, handled: &[Handled]) {
        self.deliveries(plugin, "ok", handled);
    }

    fn deliveries(&self, plugin: &str, outcome: &'static str, handled: &[Handled]) {
        if handled.is_empty() {
            return;
        }
        let count = handled.len() as u64;
        let counted = self.with_plugin(plugin, |series| {
            for item in handled {
                let cost = item.cost;
                series.duration.observe(cost.duration);
                series.fuel.inc_by(cost.fuel);
                series.cpu.inc_by(cost.cpu.as_secs_f64());
                if let Some((start, commit)) = item.latency {
                    series.start_latency.observe(start);
                    series.commit_latency.observe(commit);
                }
            }
            series
                .deliveries
                .get(outcome)
                .map(|counter| counter.inc_by(count))
                .is_some()
        });
        if !counted {
            self.with_plugin_mut(plugin, |series, families| {
                let labels = OutcomeLabels {
                    plugin: Arc::clone(&series.labels.plugin),
                    outcome,
                };
                series.deliveries.add_or_insert_with(outcome, count, || {
                    families.deliveries.get_or_create_owned(&labels)
                });
            });
        }
    }

    /// Records how long after ingest a first attempt started, and when its outcome was
    /// committed.
    pub fn delivery_latency(&self, plugin: &str, start: Duration, commit: Duration) {
        self.with_plugin(plugin, |series| {
            series.start_latency.observe(start);
            series.commit_latency.observe(commit);
        });
    }

    /// Counts a version of a plugin that loaded and took over.
    pub fn plugin_loaded(&self, plugin: &str) {
        self.with_plugin(plugin, |series| {
            series.loads.inc();
        });
    }

    /// Keeps the refused attempts of a version that stops serving (replaced or removed),
    /// in the order of [`Access::ALL`], so that `switchyard_plugin_refused_total` never
    /// goes down.
    pub fn plugin_version_retired(&self, plugin: &str, refused: [u64; 3]) {
        self.with_plugin(plugin, |series| {
            for (total, count) in series.refused_before.iter().zip(refused) {
                total.fetch_add(count, Ordering::Relaxed);
            }
        });
    }

    /// Counts a plugin file that failed to load.
    pub fn plugin_load_failed(&self, plugin: &str) {
        self.with_plugin(plugin, |series| {
            series.load_failures.inc();
        });
    }

    /// Counts a retry scheduled for a plugin.
    pub fn retry_scheduled(&self, plugin: &str) {
        self.with_plugin(plugin, |series| {
            series.retries.inc();
        });
    }

    /// Counts a dead letter of a plugin.
    pub fn dead_lettered(&self, plugin: &str, reason: &'static str) {
        let counted = self.with_plugin(plugin, |series| {
            series.dead_letters.get(reason).map(Counter::inc).is_some()
        });
        if !counted {
            self.with_plugin_mut(plugin, |series, families| {
                let labels = ReasonLabels {
                    plugin: Arc::clone(&series.labels.plugin),
                    reason,
                };
                series.dead_letters.inc_or_insert_with(reason, || {
                    families.dead_letters.get_or_create_owned(&labels)
                });
            });
        }
    }

    /// Drops every series of `plugin`, whose file was removed: a host that sees plugins
    /// come, go and get renamed over months exports only the ones it has. Its gauges go
    /// at the next scrape, as it is no longer among them.
    pub fn forget(&self, plugin: &str) {
        let series = self
            .plugins
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(plugin);
        let families = &self.families;
        let plugin = Arc::<str>::from(plugin);
        let labels = PluginLabels {
            plugin: Arc::clone(&plugin),
        };
        for family in [
            &families.plugin_loads,
            &families.plugin_load_failures,
            &families.fuel_used,
            &families.retries_scheduled,
            &families.batch_calls,
            &families.batch_events,
        ] {
            family.remove(&labels);
        }
        for family in [
            &families.handler_duration,
            &families.start_latency,
            &families.commit_latency,
        ] {
            family.remove(&labels);
        }
        families.plugin_cpu.remove(&labels);
        for state in BREAKER_STATES {
            families.breaker_transitions.remove(&StateLabels {
                plugin: Arc::clone(&plugin),
                state,
            });
        }
        let Some(series) = series else { return };
        for (outcome, _) in &series.deliveries.0 {
            families.deliveries.remove(&OutcomeLabels {
                plugin: Arc::clone(&plugin),
                outcome,
            });
        }
        for (reason, _) in &series.dead_letters.0 {
            families.dead_letters.remove(&ReasonLabels {
                plugin: Arc::clone(&plugin),
                reason,
            });
        }
    }

    /// Counts a circuit breaker transition this host made into `state`.
    pub fn breaker_transition(&self, plugin: &str, state: &'static str) {
        self.families
            .breaker_transitions
            .get_or_create(&StateLabels {
                plugin: Arc::from(plugin),
                state,
            })
            .inc();
    }

    /// Renders every metric in the Prometheus text format ([`CONTENT_TYPE`]), with the
    /// gauges, compile-cache counts and bus connection of this moment.
    pub fn render(
        &self,
        gauges: &BTreeMap<String, PluginGauges>,
        cache: CacheStats,
        bus: Reach,
    ) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        let families = &self.families;
        // The runtime keeps these counts; mirroring them keeps them typed as counters.
        families
            .compile_cache_hits
            .inner()
            .store(cache.hits, Ordering::Relaxed);
        families
            .compile_cache_misses
            .inner()
            .store(cache.misses, Ordering::Relaxed);
        families.compile_cache_bytes.set(cache.bytes);
        families.bus_connected.set(u64::from(bus.connected));
        families
            .bus_reconnects
            .inner()
            .store(bus.reconnects, Ordering::Relaxed);
        for (reason, spans) in crate::telemetry::spans_dropped() {
            families
                .trace_spans_dropped
                .get_or_create(&DropLabels { reason })
                .inner()
                .store(spans, Ordering::Relaxed);
        }
        // Plugins that are gone must drop out of the gauges, as they drop out of `gauges`.
        families.plugin_lag.clear();
        families.plugin_pending_retries.clear();
        families.plugin_dead_letters.clear();
        families.plugin_in_flight.clear();
        families.plugin_paused.clear();
        families.plugin_breaker_open.clear();
        families.plugin_serving.clear();
        families.plugin_refused.clear();
        for (plugin, g) in gauges {
            let labels = PluginLabels {
                plugin: Arc::from(plugin.as_str()),
            };
            if let Some(consumer) = g.consumer {
                families.plugin_lag.get_or_create(&labels).set(consumer.lag);
                families
                    .plugin_pending_retries
                    .get_or_create(&labels)
                    .set(consumer.pending_retries);
                families
                    .plugin_dead_letters
                    .get_or_create(&labels)
                    .set(consumer.dead_letters);
            }
            families
                .plugin_in_flight
                .get_or_create(&labels)
                .set(g.in_flight);
            families
                .plugin_paused
                .get_or_create(&labels)
                .set(u64::from(g.paused));
            families
                .plugin_breaker_open
                .get_or_create(&labels)
                .set(u64::from(g.breaker_open));
            families
                .plugin_serving
                .get_or_create(&labels)
                .set(u64::from(g.serving));
            // Read, not made: a scrape adds no series of its own.
            let before = self
                .plugins
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(plugin.as_str())
                .map_or([0; 3], |series| {
                    series
                        .refused_before
                        .each_ref()
                        .map(|count| count.load(Ordering::Relaxed))
                });
            for ((access, count), before) in Access::ALL.into_iter().zip(g.refused).zip(before) {
                families
                    .plugin_refused
                    .get_or_create(&AccessLabels {
                        plugin: Arc::clone(&labels.plugin),
                        access: access.as_str(),
                    })
                    .inner()
                    .store(count + before, Ordering::Relaxed);
            }
        }
        let mut out = String::new();
        // Writing to a `String` cannot fail; an encoder error would only cut the text short,
        // which a scraper reports as a parse error.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition with each family's series sorted by their labels, since a family
    /// lists them in hash order; a histogram's own lines keep their order.
    fn in_label_order(text: &str) -> String {
        let mut out = String::new();
        let mut block: Vec<&str> = Vec::new();
        let flush = |block: &mut Vec<&str>, out: &mut String| {
            block.sort_by_key(|line| {
                let labels = line.split_once('{').map_or("", |(_, rest)| rest);
                let labels = labels.split('}').next().unwrap_or(labels);
                if labels.starts_with("le=") {
                    return String::new(); // an unlabelled histogram's own line
                }
                labels.split(",le=").next().unwrap_or(labels).to_owned()
            });
            for line in block.drain(..) {
                out.push_str(line);
                out.push('\n');
            }
        };
        for line in text.lines() {
            if line.starts_with('#') {
                flush(&mut block, &mut out);
                out.push_str(line);
                out.push('\n');
            } else {
                block.push(line);
            }
        }
        flush(&mut block, &mut out);
        out
    }

    /// A call's cost, half of its time spent running.
    fn cost(duration: Duration, fuel: u64) -> Cost {
        Cost {
            duration,
            fuel,
            cpu: duration / 2,
        }
    }

    fn busy() -> String {
        let metrics = Metrics::default();
        metrics.events_ingested(3);
        metrics.ingest_rejected("unsupported_media_type");
        metrics.ingest_rejected("unauthorized");
        metrics.ingest_rejected("unauthorized");
        // `audit` is first seen by a delivery, `ticketing` by a load.
        metrics.delivery("audit", "ok", cost(Duration::from_millis(20), 7));
        metrics.plugin_loaded("audit");
        metrics.plugin_load_failed("audit");
        metrics.plugin_loaded("ticketing");
        metrics.delivery("ticketing", "ok", cost(Duration::from_micros(300), 1000));
        metrics.delivery("ticketing", "trap", cost(Duration::from_millis(2), 500));
        metrics.delivery("ticketing", "ok", cost(Duration::from_secs(12), 9));
        metrics.delivery_latency(
            "ticketing",
            Duration::from_micros(700),
            Duration::from_micros(2_200),
        );
        metrics.retry_scheduled("ticketing");
        metrics.dead_lettered("ticketing", "rejected");
        metrics.dead_lettered("ticketing", "exhausted");
        metrics.breaker_transition("ticketing", "open");
        metrics.scheduled_fired(&[250, 500]);
        metrics.scheduled_pending(5);
        metrics.scheduled_cancelled();
        let mut gauges = BTreeMap::new();
        gauges.insert(
            "ticketing".to_owned(),
            PluginGauges {
                consumer: Some(ConsumerStats {
                    lag: 7,
                    pending_retries: 1,
                    dead_letters: 2,
                    ..ConsumerStats::default()
                }),
                in_flight: 2,
                paused: false,
                breaker_open: true,
                serving: true,
                refused: [2, 0, 1],
            },
        );
        gauges.insert(
            "audit".to_owned(),
            PluginGauges {
                consumer: Some(ConsumerStats::default()),
                ..PluginGauges::default()
            },
        );
        metrics.render(
            &gauges,
            CacheStats {
                hits: 2,
                misses: 1,
                bytes: 4096,
            },
            Reach {
                connected: false,
                reconnects: 3,
            },
        )
    }

    #[test]
    fn a_latency_sum_keeps_growing_past_what_nanoseconds_in_a_u64_hold() {
        let latencies = latency_histogram();
        let month = Duration::from_secs(30 * 86_400);
        // 10,000 month-old events: 2.6e19 ns, more than a u64 holds.
        for _ in 0..10_000 {
            latencies.observe(month);
        }
        let expected = month.as_secs_f64() * 10_000.0;
        assert!(
            (latencies.sum() - expected).abs() < 1.0,
            "{}",
            latencies.sum()
        );
        latencies.observe(Duration::from_millis(1));
        assert!(latencies.sum() > expected);
    }

    #[test]
    fn a_removed_plugin_leaves_no_series_behind() {
        let metrics = Metrics::default();
        for plugin in ["gone", "kept"] {
            metrics.plugin_loaded(plugin);
            metrics.plugin_load_failed(plugin);
            metrics.delivery(plugin, "ok", cost(Duration::from_millis(2), 7));
            metrics.delivery(plugin, "trap", cost(Duration::from_millis(2), 7));
            metrics.delivery_latency(plugin, Duration::from_micros(700), Duration::from_millis(1));
            metrics.retry_scheduled(plugin);
            metrics.dead_lettered(plugin, "rejected");
            metrics.breaker_transition(plugin, "open");
            metrics.breaker_transition(plugin, "probing");
            metrics.breaker_transition(plugin, "closed");
            metrics.batch_call(plugin, 4);
        }
        metrics.forget("gone");
        let text = metrics.render(&BTreeMap::new(), CacheStats::default(), Reach::default());
        assert!(!text.contains("plugin=\"gone\""), "{text}");
        assert!(
            text.contains("switchyard_plugin_loads_total{plugin=\"kept\"} 1"),
            "{text}"
        );
        // A plugin added again under the name counts from nothing.
        metrics.plugin_loaded("gone");
        let text = metrics.render(&BTreeMap::new(), CacheStats::default(), Reach::default());
        assert!(
            text.contains("switchyard_plugin_loads_total{plugin=\"gone\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn renders_every_family_as_before() {
        assert_eq!(in_label_order(&busy()), EXPECTED);
    }

    /// The encoder leaves out a family with no series, `# HELP` and `# TYPE` included;
    /// such a family carries no samples for a scraper to keep.
    #[test]
    fn a_fresh_host_lists_only_its_unlabelled_families() {
        let text =
            Metrics::default().render(&BTreeMap::new(), CacheStats::default(), Reach::default());
        assert_eq!(
            text,
            "# HELP switchyard_compile_cache_hits_total Plugins loaded from the compiled-code cache.\n\
             # TYPE switchyard_compile_cache_hits_total counter\n\
             switchyard_compile_cache_hits_total 0\n\
             # HELP switchyard_compile_cache_misses_total Plugins compiled.\n\
             # TYPE switchyard_compile_cache_misses_total counter\n\
             switchyard_compile_cache_misses_total 0\n\
             # HELP switchyard_compile_cache_bytes Bytes of compiled code in the cache after its last prune (at start, then hourly).\n\
             # TYPE switchyard_compile_cache_bytes gauge\n\
             switchyard_compile_cache_bytes 0\n\
             # HELP switchyard_bus_connected 1 while the bus can be reached (always, for the embedded log), else 0.\n\
             # TYPE switchyard_bus_connected gauge\n\
             switchyard_bus_connected 1\n\
             # HELP switchyard_bus_reconnects_total Connections to the bus made again since the first.\n\
             # TYPE switchyard_bus_reconnects_total counter\n\
             switchyard_bus_reconnects_total 0\n\
             # HELP switchyard_events_ingested_total Events made durable by ingest.\n\
             # TYPE switchyard_events_ingested_total counter\n\
             switchyard_events_ingested_total 0\n\
             # HELP switchyard_scheduled_pending Scheduled events waiting for their due time.\n\
             # TYPE switchyard_scheduled_pending gauge\n\
             switchyard_scheduled_pending 0\n\
             # HELP switchyard_scheduled_fired_total Scheduled events this host appended to the log when due.\n\
             # TYPE switchyard_scheduled_fired_total counter\n\
             switchyard_scheduled_fired_total 0\n\
             # HELP switchyard_scheduled_cancelled_total Scheduled events cancelled over HTTP before they were due.\n\
             # TYPE switchyard_scheduled_cancelled_total counter\n\
             switchyard_scheduled_cancelled_total 0\n\
             # HELP switchyard_scheduled_fire_lag_seconds From a scheduled event's due time to its append to the log.\n\
             # TYPE switchyard_scheduled_fire_lag_seconds histogram\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.00025\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.0005\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.00075\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.001\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.0015\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.002\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.0025\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.003\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.004\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.005\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.0075\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.01\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.025\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.05\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.1\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.25\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"0.5\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"1\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"5\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"30\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_bucket{le=\"+Inf\"} 0\n\
             switchyard_scheduled_fire_lag_seconds_sum 0.0\n\
             switchyard_scheduled_fire_lag_seconds_count 0\n"
        );
    }

    #[test]
    fn refusals_go_on_counting_across_versions_of_a_plugin() {
        let metrics = Metrics::default();
        let scrape = |refused: [u64; 3]| {
            let gauges = BTreeMap::from([(
                "probe".to_owned(),
                PluginGauges {
                    refused,
                    ..Default::default()
                },
            )]);
            metrics.render(&gauges, CacheStats::default(), Reach::default())
        };
        let file = "switchyard_plugin_refused_total{plugin=\"probe\",access=\"file\"}";
        assert!(scrape([2, 0, 1]).contains(&format!("{file} 2\n")));
        // A new version counts from zero; the counter does not go down with it.
        metrics.plugin_version_retired("probe", [2, 0, 1]);
        let reloaded = scrape([0, 0, 0]);
        assert!(reloaded.contains(&format!("{file} 2\n")), "{reloaded}");
        assert!(reloaded.contains("access=\"http\"} 1\n"), "{reloaded}");
        assert!(scrape([1, 0, 0]).contains(&format!("{file} 3\n")));
    }

    #[test]
    fn gauges_follow_the_plugins_of_each_scrape() {
        let metrics = Metrics::default();
        let mut gauges = BTreeMap::new();
        gauges.insert(
            "old".to_owned(),
            PluginGauges {
                consumer: Some(ConsumerStats {
                    lag: 4,
                    ..ConsumerStats::default()
                }),
                ..Default::default()
            },
        );
        let first = metrics.render(&gauges, CacheStats::default(), Reach::default());
        assert!(first.contains("switchyard_plugin_lag_events{plugin=\"old\"} 4\n"));
        gauges.clear();
        gauges.insert(
            "new".to_owned(),
            PluginGauges {
                in_flight: 1,
                ..Default::default()
            },
        );
        let second = metrics.render(
            &gauges,
            CacheStats {
                hits: 5,
                ..CacheStats::default()
            },
            Reach::default(),
        );
        assert!(!second.contains("plugin=\"old\""), "{second}");
        assert!(second.contains("switchyard_plugin_in_flight{plugin=\"new\"} 1\n"));
        assert!(second.contains("switchyard_compile_cache_hits_total 5\n"));
    }

    #[test]
    fn log_retention_series_appear_once_retention_reports() {
        let metrics = Metrics::default();
        let before = metrics.render(&BTreeMap::new(), CacheStats::default(), Reach::default());
        assert!(!before.contains("switchyard_log_"), "{before}");
        metrics.size(4096, 8192);
        metrics.deleted(3, 300);
        metrics.blocked(true);
        let text = metrics.render(&BTreeMap::new(), CacheStats::default(), Reach::default());
        for line in [
            "switchyard_log_retention_deleted_events_total 3\n",
            "switchyard_log_retention_deleted_bytes_total 300\n",
            "switchyard_log_retention_blocked 1\n",
            "switchyard_log_used_bytes 4096\n",
            "switchyard_log_file_bytes 8192\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }

    #[test]
    fn plugin_names_are_escaped_in_labels() {
        let metrics = Metrics::default();
        metrics.plugin_loaded("a\"b");
        let text = metrics.render(&BTreeMap::new(), CacheStats::default(), Reach::default());
        assert!(text.contains("switchyard_plugin_loads_total{plugin=\"a\\\"b\"} 1\n"));
    }

    /// The exposition of [`busy`], series sorted by [`in_label_order`]: line for line what
    /// the host served before it used `prometheus-client`, except that a histogram sum of
    /// zero reads `0.0` (the encoder's float format) where it read `0`.
    const EXPECTED: &str = r#"# HELP switchyard_compile_cache_hits_total Plugins loaded from the compiled-code cache.
# TYPE switchyard_compile_cache_hits_total counter
switchyard_compile_cache_hits_total 2
# HELP switchyard_compile_cache_misses_total Plugins compiled.
# TYPE switchyard_compile_cache_misses_total counter
switchyard_compile_cache_misses_total 1
# HELP switchyard_compile_cache_bytes Bytes of compiled code in the cache after its last prune (at start, then hourly).
# TYPE switchyard_compile_cache_bytes gauge
switchyard_compile_cache_bytes 4096
# HELP switchyard_bus_connected 1 while the bus can be reached (always, for the embedded log), else 0.
# TYPE switchyard_bus_connected gauge
switchyard_bus_connected 0
# HELP switchyard_bus_reconnects_total Connections to the bus made again since the first.
# TYPE switchyard_bus_reconnects_total counter
switchyard_bus_reconnects_total 3
# HELP switchyard_events_ingested_total Events made durable by ingest.
# TYPE switchyard_events_ingested_total counter
switchyard_events_ingested_total 3
# HELP switchyard_ingest_rejected_total Ingest requests refused, by error code.
# TYPE switchyard_ingest_rejected_total counter
switchyard_ingest_rejected_total{code="unauthorized"} 2
switchyard_ingest_rejected_total{code="unsupported_media_type"} 1
# HELP switchyard_plugin_loads_total Plugin versions loaded and serving.
# TYPE switchyard_plugin_loads_total counter
switchyard_plugin_loads_total{plugin="audit"} 1
switchyard_plugin_loads_total{plugin="ticketing"} 1
# HELP switchyard_plugin_load_failures_total Plugin files that failed to load.
# TYPE switchyard_plugin_load_failures_total counter
switchyard_plugin_load_failures_total{plugin="audit"} 1
switchyard_plugin_load_failures_total{plugin="ticketing"} 0
# HELP switchyard_deliveries_total Handler invocations by plugin and outcome.
# TYPE switchyard_deliveries_total counter
switchyard_deliveries_total{plugin="audit",outcome="ok"} 1
switchyard_deliveries_total{plugin="ticketing",outcome="ok"} 2
switchyard_deliveries_total{plugin="ticketing",outcome="trap"} 1
# HELP switchyard_handler_duration_seconds Duration of handler invocations.
# TYPE switchyard_handler_duration_seconds histogram
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.0001"} 0
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.00025"} 0
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.0005"} 0
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.001"} 0
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.0025"} 0
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.005"} 0
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.01"} 0
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.025"} 1
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.05"} 1
switchyard_handler_duration_seconds_bucket{plugin="audit",le="0.1"} 1
switchyard_handler_duration_seconds_bucket{plugin="audit",le="1"} 1
switchyard_handler_duration_seconds_bucket{plugin="audit",le="10"} 1
switchyard_handler_duration_seconds_bucket{plugin="audit",le="+Inf"} 1
switchyard_handler_duration_seconds_sum{plugin="audit"} 0.02
switchyard_handler_duration_seconds_count{plugin="audit"} 1
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.0001"} 0
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.00025"} 0
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.0005"} 1
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.001"} 1
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.0025"} 2
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.005"} 2
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.01"} 2
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.025"} 2
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.05"} 2
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="0.1"} 2
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="1"} 2
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="10"} 2
switchyard_handler_duration_seconds_bucket{plugin="ticketing",le="+Inf"} 3
switchyard_handler_duration_seconds_sum{plugin="ticketing"} 12.0023
switchyard_handler_duration_seconds_count{plugin="ticketing"} 3
# HELP switchyard_delivery_start_latency_seconds Time from ingest to the start of an event's first attempt.
# TYPE switchyard_delivery_start_latency_seconds histogram
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.00025"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.0005"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.00075"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.001"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.0015"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.002"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.0025"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.003"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.004"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.005"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.0075"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.01"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.025"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.05"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.1"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.25"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="0.5"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="1"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="5"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="30"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="audit",le="+Inf"} 0
switchyard_delivery_start_latency_seconds_sum{plugin="audit"} 0.0
switchyard_delivery_start_latency_seconds_count{plugin="audit"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.00025"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.0005"} 0
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.00075"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.001"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.0015"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.002"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.0025"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.003"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.004"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.005"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.0075"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.01"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.025"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.05"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.1"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.25"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="0.5"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="1"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="5"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="30"} 1
switchyard_delivery_start_latency_seconds_bucket{plugin="ticketing",le="+Inf"} 1
switchyard_delivery_start_latency_seconds_sum{plugin="ticketing"} 0.0007
switchyard_delivery_start_latency_seconds_count{plugin="ticketing"} 1
# HELP switchyard_delivery_commit_latency_seconds Time from ingest to the commit of the outcome of an event's first attempt.
# TYPE switchyard_delivery_commit_latency_seconds histogram
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.00025"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.0005"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.00075"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.001"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.0015"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.002"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.0025"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.003"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.004"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.005"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.0075"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.01"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.025"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.05"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.1"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.25"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="0.5"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="1"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="5"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="30"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="audit",le="+Inf"} 0
switchyard_delivery_commit_latency_seconds_sum{plugin="audit"} 0.0
switchyard_delivery_commit_latency_seconds_count{plugin="audit"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.00025"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.0005"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.00075"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.001"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.0015"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.002"} 0
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.0025"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.003"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.004"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.005"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.0075"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.01"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.025"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.05"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.1"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.25"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="0.5"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="1"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="5"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="30"} 1
switchyard_delivery_commit_latency_seconds_bucket{plugin="ticketing",le="+Inf"} 1
switchyard_delivery_commit_latency_seconds_sum{plugin="ticketing"} 0.0022
switchyard_delivery_commit_latency_seconds_count{plugin="ticketing"} 1
# HELP switchyard_fuel_used_total Fuel burned by handler invocations.
# TYPE switchyard_fuel_used_total counter
switchyard_fuel_used_total{plugin="audit"} 7
switchyard_fuel_used_total{plugin="ticketing"} 1509
# HELP switchyard_plugin_cpu_seconds_total Time the plugin's guests ran on the host's threads.
# TYPE switchyard_plugin_cpu_seconds_total counter
switchyard_plugin_cpu_seconds_total{plugin="audit"} 0.01
switchyard_plugin_cpu_seconds_total{plugin="ticketing"} 6.00115
# HELP switchyard_retries_scheduled_total Retries scheduled.
# TYPE switchyard_retries_scheduled_total counter
switchyard_retries_scheduled_total{plugin="audit"} 0
switchyard_retries_scheduled_total{plugin="ticketing"} 1
# HELP switchyard_dead_letters_total Events moved to the dead letters.
# TYPE switchyard_dead_letters_total counter
switchyard_dead_letters_total{plugin="ticketing",reason="exhausted"} 1
switchyard_dead_letters_total{plugin="ticketing",reason="rejected"} 1
# HELP switchyard_plugin_lag_events Events in the log after the plugin's cursor.
# TYPE switchyard_plugin_lag_events gauge
switchyard_plugin_lag_events{plugin="audit"} 0
switchyard_plugin_lag_events{plugin="ticketing"} 7
# HELP switchyard_plugin_pending_retries Deliveries waiting for a retry.
# TYPE switchyard_plugin_pending_retries gauge
switchyard_plugin_pending_retries{plugin="audit"} 0
switchyard_plugin_pending_retries{plugin="ticketing"} 1
# HELP switchyard_plugin_dead_letters Dead letters the plugin has now (replayed, deleted and expired ones gone).
# TYPE switchyard_plugin_dead_letters gauge
switchyard_plugin_dead_letters{plugin="audit"} 0
switchyard_plugin_dead_letters{plugin="ticketing"} 2
# HELP switchyard_plugin_in_flight Deliveries being handled now.
# TYPE switchyard_plugin_in_flight gauge
switchyard_plugin_in_flight{plugin="audit"} 0
switchyard_plugin_in_flight{plugin="ticketing"} 2
# HELP switchyard_plugin_paused 1 while an operator has paused the plugin.
# TYPE switchyard_plugin_paused gauge
switchyard_plugin_paused{plugin="audit"} 0
switchyard_plugin_paused{plugin="ticketing"} 0
# HELP switchyard_plugin_breaker_open 1 while the plugin's circuit breaker is open or probing.
# TYPE switchyard_plugin_breaker_open gauge
switchyard_plugin_breaker_open{plugin="audit"} 0
switchyard_plugin_breaker_open{plugin="ticketing"} 1
# HELP switchyard_plugin_serving 1 while a version of the plugin serves, 0 while its files failed to load and none does.
# TYPE switchyard_plugin_serving gauge
switchyard_plugin_serving{plugin="audit"} 0
switchyard_plugin_serving{plugin="ticketing"} 1
# HELP switchyard_plugin_refused_total Attempts of the plugin to reach outside its sandbox (a file, a socket, an HTTP request), refused.
# TYPE switchyard_plugin_refused_total counter
switchyard_plugin_refused_total{plugin="audit",access="file"} 0
switchyard_plugin_refused_total{plugin="audit",access="http"} 0
switchyard_plugin_refused_total{plugin="audit",access="socket"} 0
switchyard_plugin_refused_total{plugin="ticketing",access="file"} 2
switchyard_plugin_refused_total{plugin="ticketing",access="http"} 1
switchyard_plugin_refused_total{plugin="ticketing",access="socket"} 0
# HELP switchyard_breaker_transitions_total Circuit breaker transitions made by this host, by the state entered.
# TYPE switchyard_breaker_transitions_total counter
switchyard_breaker_transitions_total{plugin="ticketing",state="open"} 1
# HELP switchyard_scheduled_pending Scheduled events waiting for their due time.
# TYPE switchyard_scheduled_pending gauge
switchyard_scheduled_pending 5
# HELP switchyard_scheduled_fired_total Scheduled events this host appended to the log when due.
# TYPE switchyard_scheduled_fired_total counter
switchyard_scheduled_fired_total 2
# HELP switchyard_scheduled_cancelled_total Scheduled events cancelled over HTTP before they were due.
# TYPE switchyard_scheduled_cancelled_total counter
switchyard_scheduled_cancelled_total 1
# HELP switchyard_scheduled_fire_lag_seconds From a scheduled event's due time to its append to the log.
# TYPE switchyard_scheduled_fire_lag_seconds histogram
switchyard_scheduled_fire_lag_seconds_bucket{le="0.00025"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.0005"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.00075"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.001"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.0015"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.002"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.0025"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.003"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.004"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.005"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.0075"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.01"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.025"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.05"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.1"} 0
switchyard_scheduled_fire_lag_seconds_bucket{le="0.25"} 1
switchyard_scheduled_fire_lag_seconds_bucket{le="0.5"} 2
switchyard_scheduled_fire_lag_seconds_bucket{le="1"} 2
switchyard_scheduled_fire_lag_seconds_bucket{le="5"} 2
switchyard_scheduled_fire_lag_seconds_bucket{le="30"} 2
switchyard_scheduled_fire_lag_seconds_bucket{le="+Inf"} 2
switchyard_scheduled_fire_lag_seconds_sum 0.75
switchyard_scheduled_fire_lag_seconds_count 2
"#;
}
