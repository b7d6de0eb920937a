//! The stats history: a bounded, in-memory record of the figures the status page plots,
//! sampled from the metrics' running totals and the bus's consumer positions.
//!
//! Invariants: memory is bounded by the number of plugins, never by the number of events:
//! one host-wide point per second for [`GLOBAL_POINTS`] seconds, and per plugin one point
//! every [`PLUGIN_EVERY`] for [`PLUGIN_POINTS`] points; a plugin that leaves the table
//! leaves the history at the next sample. Sampling reads counters (no locks held by the
//! dispatch path) and asks the bus for each plugin's lag once per [`PLUGIN_EVERY`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;

use crate::bus::Bus;
use crate::clock::now_ms;
use crate::metrics::{Metrics, Totals};
use crate::plugins::PluginTable;

/// Host-wide points kept: an hour at one a second.
pub const GLOBAL_POINTS: usize = 3600;
/// How often each plugin is sampled.
pub const PLUGIN_EVERY: Duration = Duration::from_secs(5);
/// Points kept per plugin: 15 minutes at one every 5 s.
pub const PLUGIN_POINTS: usize = 180;
/// Lag reads in flight at once while sampling.
const LAG_READS: usize = 16;

#[derive(Debug, Clone)]
struct GlobalPoint {
    at_ms: i64,
    ingested: f64,
    outcomes: BTreeMap<&'static str, f64>,
}

#[derive(Debug, Clone)]
struct PluginPoint {
    at_ms: i64,
    handled: f64,
    failed: f64,
    mean_ms: Option<f64>,
    lag: Option<u64>,
}

#[derive(Debug, Default)]
struct History {
    global: VecDeque<GlobalPoint>,
    plugins: HashMap<String, VecDeque<PluginPoint>>,
    last: Option<(i64, Totals)>,
    last_plugin: Option<(i64, Totals)>,
}

/// The history, shared by the sampler and the API.
#[derive(Debug, Default)]
pub struct Stats {
    history: Mutex<History>,
}

fn per_second(now: u64, before: u64, seconds: f64) -> f64 {
    now.saturating_sub(before) as f64 / seconds
}

impl Stats {
    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts sampling into a new history (a task that ends with the returned handle).
    pub fn start(metrics: Arc<Metrics>, bus: Arc<dyn Bus>, plugins: PluginTable) -> Arc<Self> {
        let stats = Arc::new(Self::default());
        let weak = Arc::downgrade(&stats);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let every = PLUGIN_EVERY.as_secs().max(1);
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                let Some(stats) = weak.upgrade() else { return };
                let totals = metrics.totals();
                stats.sample_global(now_ms(), &totals);
                if n.is_multiple_of(every) {
                    let lags = lags(&bus, &plugins).await;
                    stats.sample_plugins(now_ms(), totals, &lags);
                }
                n += 1;
            }
        });
        stats
    }

    fn sample_global(&self, at_ms: i64, totals: &Totals) {
        let mut history = self.history();
        if let Some((before_ms, before)) = &history.last {
            let seconds = ((at_ms - before_ms) as f64 / 1000.0).max(0.001);
            let mut outcomes: BTreeMap<&'static str, f64> = BTreeMap::new();
            for (name, plugin) in &totals.plugins {
                let earlier = before.plugins.get(name);
                for (outcome, count) in &plugin.deliveries {
                    let was = earlier
                        .and_then(|p| p.deliveries.get(outcome))
                        .copied()
                        .unwrap_or(0);
                    *outcomes.entry(outcome).or_default() += per_second(*count, was, seconds);
                }
            }
            let point = GlobalPoint {
                at_ms,
                ingested: per_second(totals.ingested, before.ingested, seconds),
                outcomes,
            };
            if history.global.len() == GLOBAL_POINTS {
                history.global.pop_front();
            }
            history.global.push_back(point);
        }
        history.last = Some((at_ms, totals.clone()));
    }

    /// One point per running plugin; `lags` has every running plugin, with `None` where
    /// its lag could not be read (the bus out of reach), which keeps its history.
    fn sample_plugins(&self, at_ms: i64, totals: Totals, lags: &BTreeMap<String, Option<u64>>) {
        let mut history = self.history();
        let previous = history.last_plugin.take();
        let seconds = previous.as_ref().map_or(1.0, |(before_ms, _)| {
            ((at_ms - before_ms) as f64 / 1000.0).max(0.001)
        });
        history.plugins.retain(|name, _| lags.contains_key(name));
        for name in lags.keys() {
            let now = totals.plugins.get(name).cloned().unwrap_or_default();
            let before = previous
                .as_ref()
                .and_then(|(_, t)| t.plugins.get(name).cloned())
                .unwrap_or_default();
            let calls = now.calls().saturating_sub(before.calls());
            let point = PluginPoint {
                at_ms,
                handled: per_second(now.handled(), before.handled(), seconds),
                failed: per_second(now.failed(), before.failed(), seconds),
                mean_ms: (calls > 0).then(|| {
                    now.duration_us.saturating_sub(before.duration_us) as f64
                        / calls as f64
                        / 1000.0
                }),
                lag: lags.get(name).copied().flatten(),
            };
            let series = history.plugins.entry(name.clone()).or_default();
            if series.len() == PLUGIN_POINTS {
                series.pop_front();
            }
            series.push_back(point);
        }
        history.last_plugin = Some((at_ms, totals));
    }

    /// The history of the last `window` as the API shows it: host-wide series, the lag of
    /// the `top` plugins by their latest lag, and one plugin's series if asked.
    pub fn view(&self, window: Duration, plugin: Option<&str>, top: usize) -> StatsView {
        let history = self.history();
        let since = now_ms() - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let global: Vec<&GlobalPoint> =
            history.global.iter().filter(|p| p.at_ms >= since).collect();
        let mut by_outcome: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        for point in &global {
            for outcome in point.outcomes.keys() {
                by_outcome.entry(outcome).or_default();
            }
        }
        for (outcome, values) in &mut by_outcome {
            *values = global
                .iter()
                .map(|p| p.outcomes.get(outcome).copied().unwrap_or(0.0))
                .collect();
        }
        let latest_lag =
            |series: &VecDeque<PluginPoint>| series.back().and_then(|p| p.lag).unwrap_or(0);
        let mut ranked: Vec<(&String, &VecDeque<PluginPoint>)> = history.plugins.iter().collect();
        ranked.sort_by(|a, b| latest_lag(b.1).cmp(&latest_lag(a.1)).then(a.0.cmp(b.0)));
        // Every plugin shown is plotted on one time axis: a plugin that came later has
        // no point (null) where the others have one.
        let shown = &ranked[..top.min(ranked.len())];
        let plugin_times: Vec<i64> = shown
            .iter()
            .flat_map(|(_, series)| series.iter().map(|p| p.at_ms))
            .filter(|at| *at >= since)
            .collect::<std::collections::BTreeSet<i64>>()
            .into_iter()
            .collect();
        let lag = shown
            .iter()
            .map(|(name, series)| {
                let by_time: HashMap<i64, Option<u64>> =
                    series.iter().map(|p| (p.at_ms, p.lag)).collect();
                let values = plugin_times
                    .iter()
                    .map(|at| by_time.get(at).copied().flatten())
                    .collect();
                ((*name).clone(), values)
            })
            .collect();
        let one = plugin.and_then(|name| {
            let series: Vec<&PluginPoint> = history
                .plugins
                .get(name)?
                .iter()
                .filter(|p| p.at_ms >= since)
                .collect();
            Some(PluginSeriesView {
                name: name.to_owned(),
                t: series.iter().map(|p| p.at_ms).collect(),
                handled_per_s: series.iter().map(|p| p.handled).collect(),
                failed_per_s: series.iter().map(|p| p.failed).collect(),
                mean_duration_ms: series.iter().map(|p| p.mean_ms).collect(),
                lag: series.iter().map(|p| p.lag).collect(),
            })
        });
        StatsView {
            interval_ms: 1000,
            plugin_interval_ms: u64::try_from(PLUGIN_EVERY.as_millis()).unwrap_or(u64::MAX),
            t: global.iter().map(|p| p.at_ms).collect(),
            ingested_per_s: global.iter().map(|p| p.ingested).collect(),
            deliveries_per_s: by_outcome,
            lag_t: plugin_times,
            lag,
            plugin: one,
        }
    }
}

/// Each running plugin's lag, read from the bus a few at a time; `None` for a plugin
/// whose read fails, and for all while the bus cannot be reached (a read would wait for
/// the connection).
async fn lags(bus: &Arc<dyn Bus>, plugins: &PluginTable) -> BTreeMap<String, Option<u64>> {
    let names: Vec<String> = plugins
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .filter(|entry| entry.status.is_ok())
        .map(|entry| entry.name.clone())
        .collect();
    if !bus.reach().connected {
        return names.into_iter().map(|name| (name, None)).collect();
    }
    futures_util::stream::iter(names)
        .map(|name| async move {
            let lag = bus.consumer_lag(&name).await.ok();
            (name, lag)
        })
        .buffer_unordered(LAG_READS)
        .collect()
        .await
}

/// `GET /v1/stats`: series of equal length share their time axis (`t` or `lag_t`, in
/// milliseconds since the Unix epoch).
#[derive(Debug, Serialize)]
pub struct StatsView {
    interval_ms: u64,
    plugin_interval_ms: u64,
    t: Vec<i64>,
    ingested_per_s: Vec<f64>,
    deliveries_per_s: BTreeMap<&'static str, Vec<f64>>,
    lag_t: Vec<i64>,
    /// `null` where the lag could not be read.
    lag: BTreeMap<String, Vec<Option<u64>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plugin: Option<PluginSeriesView>,
}

/// One plugin's series.
#[derive(Debug, Serialize)]
pub struct PluginSeriesView {
    name: String,
    t: Vec<i64>,
    handled_per_s: Vec<f64>,
    failed_per_s: Vec<f64>,
    mean_duration_ms: Vec<Option<f64>>,
    lag: Vec<Option<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::PluginTotals;

    fn totals(ingested: u64, ok: u64) -> Totals {
        let mut plugin = PluginTotals::default();
        plugin.deliveries.insert("ok", ok);
        plugin.duration_us = ok * 200;
        Totals {
            ingested,
            plugins: BTreeMap::from([("p".to_owned(), plugin)]),
        }
    }

    #[test]
    fn rates_come_from_differences_and_the_history_stays_bounded() {
        let stats = Stats::default();
        let start = now_ms() - 10_000_000;
        for second in 0..(GLOBAL_POINTS as i64 + 50) {
            stats.sample_global(
                start + second * 1000,
                &totals(second as u64 * 10, second as u64 * 4),
            );
        }
        let lags = BTreeMap::from([("p".to_owned(), Some(7))]);
        for n in 0..(PLUGIN_POINTS as i64 + 5) {
            stats.sample_plugins(start + n * 5000, totals(0, n as u64 * 50), &lags);
        }
        let history = stats.history();
        assert_eq!(history.global.len(), GLOBAL_POINTS);
        let last = history.global.back().unwrap();
        assert_eq!(last.ingested, 10.0);
        assert_eq!(last.outcomes["ok"], 4.0);
        let plugin = &history.plugins["p"];
        assert_eq!(plugin.len(), PLUGIN_POINTS);
        let point = plugin.back().unwrap();
        assert_eq!(
            (point.handled, point.failed, point.lag),
            (10.0, 0.0, Some(7))
        );
        assert_eq!(point.mean_ms, Some(0.2));
        drop(history);
        // A lag that cannot be read (the bus out of reach) is a gap, not the end.
        let unread = BTreeMap::from([("p".to_owned(), None)]);
        stats.sample_plugins(now_ms(), totals(0, 0), &unread);
        let history = stats.history();
        assert_eq!(history.plugins["p"].len(), PLUGIN_POINTS);
        assert_eq!(history.plugins["p"].back().unwrap().lag, None);
        drop(history);
        // A plugin that leaves the table leaves the history.
        stats.sample_plugins(now_ms(), totals(0, 0), &BTreeMap::new());
        assert!(stats.history().plugins.is_empty());
    }

    #[test]
    fn the_lags_shown_share_one_time_axis_with_gaps_for_a_plugin_that_came_later() {
        let stats = Stats::default();
        let start = now_ms() - 60_000;
        let early = BTreeMap::from([("a".to_owned(), Some(1))]);
        for n in 0..3 {
            stats.sample_plugins(start + n * 5000, totals(0, 0), &early);
        }
        // `b` comes later and is further behind: it ranks first.
        let both = BTreeMap::from([("a".to_owned(), Some(2)), ("b".to_owned(), Some(50))]);
        for n in 3..5 {
            stats.sample_plugins(start + n * 5000, totals(0, 0), &both);
        }
        let view = stats.view(Duration::from_secs(600), None, 8);
        assert_eq!(view.lag_t.len(), 5);
        assert_eq!(view.lag["a"], [Some(1), Some(1), Some(1), Some(2), Some(2)]);
        assert_eq!(view.lag["b"], [None, None, None, Some(50), Some(50)]);
    }
}
