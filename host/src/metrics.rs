//! Prometheus metrics of the host, rendered as text for `GET /metrics`.
//!
//! Counters live in memory and start from zero at every start, as Prometheus expects;
//! gauges that the bus knows (lag, pending retries) are read at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::runtime::CacheStats;

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

/// A cumulative histogram over the fixed upper bounds `BOUNDS`.
struct Histogram<const N: usize> {
    buckets: [u64; N],
    count: u64,
    sum: f64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Self {
            buckets: [0; N],
            count: 0,
            sum: 0.0,
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&mut self, bounds: &[f64; N], value: Duration) {
        let seconds = value.as_secs_f64();
        for (bucket, bound) in self.buckets.iter_mut().zip(bounds) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(
        &self,
        out: &mut String,
        name: &str,
        plugin: &str,
        bounds: &[f64; N],
    ) -> std::fmt::Result {
        for (bound, n) in bounds.iter().zip(self.buckets) {
            writeln!(
                out,
                "{name}_bucket{{plugin=\"{plugin}\",le=\"{bound}\"}} {n}"
            )?;
        }
        writeln!(
            out,
            "{name}_bucket{{plugin=\"{plugin}\",le=\"+Inf\"}} {}",
            self.count
        )?;
        writeln!(out, "{name}_sum{{plugin=\"{plugin}\"}} {}", self.sum)?;
        writeln!(out, "{name}_count{{plugin=\"{plugin}\"}} {}", self.count)
    }
}

#[derive(Default)]
struct PluginCounters {
    loads: u64,
    load_failures: u64,
    deliveries: BTreeMap<&'static str, u64>,
    duration: Histogram<{ DURATION_BUCKETS.len() }>,
    start_latency: Histogram<{ LATENCY_BUCKETS.len() }>,
    commit_latency: Histogram<{ LATENCY_BUCKETS.len() }>,
    fuel: u64,
    retries: u64,
    dead_letters: BTreeMap<&'static str, u64>,
}

/// A per-plugin gauge value read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct PluginGauges {
    /// Events in the log after the plugin's cursor.
    pub lag: u64,
    /// Deliveries waiting for a retry.
    pub pending_retries: u64,
    /// Deliveries being handled now.
    pub in_flight: u64,
}

/// The host's metrics.
#[derive(Default)]
pub struct Metrics {
    events_ingested: AtomicU64,
    ingest_rejected: Mutex<BTreeMap<&'static str, u64>>,
    plugins: Mutex<BTreeMap<String, PluginCounters>>,
}

impl Metrics {
    /// Counts events made durable by ingest (duplicates not included).
    pub fn events_ingested(&self, n: u64) {
        self.events_ingested.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts an ingest request refused with `code`.
    pub fn ingest_rejected(&self, code: &'static str) {
        let mut map = self
            .ingest_rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *map.entry(code).or_default() += 1;
    }

    fn with_plugin(&self, plugin: &str, update: impl FnOnce(&mut PluginCounters)) {
        let mut plugins = self.plugins.lock().unwrap_or_else(PoisonError::into_inner);
        match plugins.get_mut(plugin) {
            Some(counters) => update(counters),
            None => update(plugins.entry(plugin.to_owned()).or_default()),
        }
    }

    /// Records one invocation: its outcome (`ok` or a failure kind), duration and fuel.
    pub fn delivery(&self, plugin: &str, outcome: &'static str, duration: Duration, fuel: u64) {
        self.with_plugin(plugin, |c| {
            *c.deliveries.entry(outcome).or_default() += 1;
            c.duration.observe(&DURATION_BUCKETS, duration);
            c.fuel = c.fuel.saturating_add(fuel);
        });
    }

    /// Records how long after ingest a first attempt started, and when its outcome was
    /// committed.
    pub fn delivery_latency(&self, plugin: &str, start: Duration, commit: Duration) {
        self.with_plugin(plugin, |c| {
            c.start_latency.observe(&LATENCY_BUCKETS, start);
            c.commit_latency.observe(&LATENCY_BUCKETS, commit);
        });
    }

    /// Counts a version of a plugin that loaded and took over.
    pub fn plugin_loaded(&self, plugin: &str) {
        self.with_plugin(plugin, |c| c.loads += 1);
    }

    /// Counts a plugin file that failed to load.
    pub fn plugin_load_failed(&self, plugin: &str) {
        self.with_plugin(plugin, |c| c.load_failures += 1);
    }

    /// Counts a retry scheduled for a plugin.
    pub fn retry_scheduled(&self, plugin: &str) {
        self.with_plugin(plugin, |c| c.retries += 1);
    }

    /// Counts a dead letter of a plugin.
    pub fn dead_lettered(&self, plugin: &str, reason: &'static str) {
        self.with_plugin(plugin, |c| *c.dead_letters.entry(reason).or_default() += 1);
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self, gauges: &BTreeMap<String, PluginGauges>, cache: CacheStats) -> String {
        let mut out = String::new();
        let _ = self.render_into(&mut out, gauges, cache);
        out
    }

    fn render_into(
        &self,
        out: &mut String,
        gauges: &BTreeMap<String, PluginGauges>,
        cache: CacheStats,
    ) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP switchyard_compile_cache_hits_total Plugins loaded from the compiled-code cache."
        )?;
        writeln!(out, "# TYPE switchyard_compile_cache_hits_total counter")?;
        writeln!(out, "switchyard_compile_cache_hits_total {}", cache.hits)?;
        writeln!(
            out,
            "# HELP switchyard_compile_cache_misses_total Plugins compiled."
        )?;
        writeln!(out, "# TYPE switchyard_compile_cache_misses_total counter")?;
        writeln!(
            out,
            "switchyard_compile_cache_misses_total {}",
            cache.misses
        )?;
        writeln!(
            out,
            "# HELP switchyard_events_ingested_total Events made durable by ingest."
        )?;
        writeln!(out, "# TYPE switchyard_events_ingested_total counter")?;
        writeln!(
            out,
            "switchyard_events_ingested_total {}",
            self.events_ingested.load(Ordering::Relaxed)
        )?;
        writeln!(
            out,
            "# HELP switchyard_ingest_rejected_total Ingest requests refused, by error code."
        )?;
        writeln!(out, "# TYPE switchyard_ingest_rejected_total counter")?;
        for (code, n) in self
            .ingest_rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            writeln!(
                out,
                "switchyard_ingest_rejected_total{{code=\"{code}\"}} {n}"
            )?;
        }

        let plugins = self.plugins.lock().unwrap_or_else(PoisonError::into_inner);
        writeln!(
            out,
            "# HELP switchyard_plugin_loads_total Plugin versions loaded and serving."
        )?;
        writeln!(out, "# TYPE switchyard_plugin_loads_total counter")?;
        for (plugin, c) in plugins.iter() {
            writeln!(
                out,
                "switchyard_plugin_loads_total{{plugin=\"{plugin}\"}} {}",
                c.loads
            )?;
        }
        writeln!(
            out,
            "# HELP switchyard_plugin_load_failures_total Plugin files that failed to load."
        )?;
        writeln!(out, "# TYPE switchyard_plugin_load_failures_total counter")?;
        for (plugin, c) in plugins.iter() {
            writeln!(
                out,
                "switchyard_plugin_load_failures_total{{plugin=\"{plugin}\"}} {}",
                c.load_failures
            )?;
        }
        writeln!(
            out,
            "# HELP switchyard_deliveries_total Handler invocations by plugin and outcome."
        )?;
        writeln!(out, "# TYPE switchyard_deliveries_total counter")?;
        for (plugin, c) in plugins.iter() {
            for (outcome, n) in &c.deliveries {
                writeln!(
                    out,
                    "switchyard_deliveries_total{{plugin=\"{plugin}\",outcome=\"{outcome}\"}} {n}"
                )?;
            }
        }
        writeln!(
            out,
            "# HELP switchyard_handler_duration_seconds Duration of handler invocations."
        )?;
        writeln!(out, "# TYPE switchyard_handler_duration_seconds histogram")?;
        for (plugin, c) in plugins.iter() {
            c.duration.render(
                out,
                "switchyard_handler_duration_seconds",
                plugin,
                &DURATION_BUCKETS,
            )?;
        }
        writeln!(
            out,
            "# HELP switchyard_delivery_start_latency_seconds Time from ingest to the start of \
             an event's first attempt."
        )?;
        writeln!(
            out,
            "# TYPE switchyard_delivery_start_latency_seconds histogram"
        )?;
        for (plugin, c) in plugins.iter() {
            c.start_latency.render(
                out,
                "switchyard_delivery_start_latency_seconds",
                plugin,
                &LATENCY_BUCKETS,
            )?;
        }
        writeln!(
            out,
            "# HELP switchyard_delivery_commit_latency_seconds Time from ingest to the commit of \
             the outcome of an event's first attempt."
        )?;
        writeln!(
            out,
            "# TYPE switchyard_delivery_commit_latency_seconds histogram"
        )?;
        for (plugin, c) in plugins.iter() {
            c.commit_latency.render(
                out,
                "switchyard_delivery_commit_latency_seconds",
                plugin,
                &LATENCY_BUCKETS,
            )?;
        }
        writeln!(
            out,
            "# HELP switchyard_fuel_used_total Fuel burned by handler invocations."
        )?;
        writeln!(out, "# TYPE switchyard_fuel_used_total counter")?;
        for (plugin, c) in plugins.iter() {
            writeln!(
                out,
                "switchyard_fuel_used_total{{plugin=\"{plugin}\"}} {}",
                c.fuel
            )?;
        }
        writeln!(
            out,
            "# HELP switchyard_retries_scheduled_total Retries scheduled."
        )?;
        writeln!(out, "# TYPE switchyard_retries_scheduled_total counter")?;
        for (plugin, c) in plugins.iter() {
            writeln!(
                out,
                "switchyard_retries_scheduled_total{{plugin=\"{plugin}\"}} {}",
                c.retries
            )?;
        }
        writeln!(
            out,
            "# HELP switchyard_dead_letters_total Events moved to the dead letters."
        )?;
        writeln!(out, "# TYPE switchyard_dead_letters_total counter")?;
        for (plugin, c) in plugins.iter() {
            for (reason, n) in &c.dead_letters {
                writeln!(
                    out,
                    "switchyard_dead_letters_total{{plugin=\"{plugin}\",reason=\"{reason}\"}} {n}"
                )?;
            }
        }
        drop(plugins);

        writeln!(
            out,
            "# HELP switchyard_plugin_lag_events Events in the log after the plugin's cursor."
        )?;
        writeln!(out, "# TYPE switchyard_plugin_lag_events gauge")?;
        for (plugin, g) in gauges {
            writeln!(
                out,
                "switchyard_plugin_lag_events{{plugin=\"{plugin}\"}} {}",
                g.lag
            )?;
        }
        writeln!(
            out,
            "# HELP switchyard_plugin_pending_retries Deliveries waiting for a retry."
        )?;
        writeln!(out, "# TYPE switchyard_plugin_pending_retries gauge")?;
        for (plugin, g) in gauges {
            writeln!(
                out,
                "switchyard_plugin_pending_retries{{plugin=\"{plugin}\"}} {}",
                g.pending_retries
            )?;
        }
        writeln!(
            out,
            "# HELP switchyard_plugin_in_flight Deliveries being handled now."
        )?;
        writeln!(out, "# TYPE switchyard_plugin_in_flight gauge")?;
        for (plugin, g) in gauges {
            writeln!(
                out,
                "switchyard_plugin_in_flight{{plugin=\"{plugin}\"}} {}",
                g.in_flight
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let metrics = Metrics::default();
        metrics.events_ingested(3);
        metrics.delivery("ticketing", "ok", Duration::from_micros(300), 1000);
        metrics.delivery("ticketing", "trap", Duration::from_millis(2), 500);
        metrics.dead_lettered("ticketing", "rejected");
        metrics.delivery_latency(
            "ticketing",
            Duration::from_micros(700),
            Duration::from_micros(2_200),
        );
        let mut gauges = BTreeMap::new();
        gauges.insert(
            "ticketing".to_owned(),
            PluginGauges {
                lag: 7,
                ..Default::default()
            },
        );
        let text = metrics.render(&gauges, CacheStats { hits: 2, misses: 1 });
        assert!(text.contains("switchyard_events_ingested_total 3\n"));
        assert!(
            text.contains("switchyard_deliveries_total{plugin=\"ticketing\",outcome=\"ok\"} 1\n")
        );
        assert!(
            text.contains("switchyard_deliveries_total{plugin=\"ticketing\",outcome=\"trap\"} 1\n")
        );
        assert!(text.contains(
            "switchyard_handler_duration_seconds_bucket{plugin=\"ticketing\",le=\"0.0005\"} 1\n"
        ));
        assert!(text.contains(
            "switchyard_handler_duration_seconds_bucket{plugin=\"ticketing\",le=\"+Inf\"} 2\n"
        ));
        assert!(text.contains(
            "switchyard_delivery_start_latency_seconds_bucket{plugin=\"ticketing\",le=\"0.0005\"} 0\n"
        ));
        assert!(text.contains(
            "switchyard_delivery_start_latency_seconds_bucket{plugin=\"ticketing\",le=\"0.00075\"} 1\n"
        ));
        assert!(text.contains(
            "switchyard_delivery_commit_latency_seconds_bucket{plugin=\"ticketing\",le=\"0.002\"} 0\n"
        ));
        assert!(text.contains(
            "switchyard_delivery_commit_latency_seconds_bucket{plugin=\"ticketing\",le=\"0.0025\"} 1\n"
        ));
        assert!(text.contains("switchyard_fuel_used_total{plugin=\"ticketing\"} 1500\n"));
        assert!(text.contains(
            "switchyard_dead_letters_total{plugin=\"ticketing\",reason=\"rejected\"} 1\n"
        ));
        assert!(text.contains("switchyard_plugin_lag_events{plugin=\"ticketing\"} 7\n"));
        assert!(text.contains("switchyard_compile_cache_hits_total 2\n"));
    }
}
