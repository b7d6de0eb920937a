//! Whether a plugin's next call may start: the operator's pause and the circuit breaker,
//! obeyed by every host from the state the bus keeps (see `crate::bus::controls`).
//!
//! One [`Valve`] per plugin name, kept by the host's [`Valves`] across reloads. Each
//! holds the plugin's control as last read, a count of this host's failed attempts in a
//! row, and a flag that says "deliveries flow", so a call of a healthy plugin pays one
//! atomic load to start and one to report its success.
//!
//! Transitions (each written by compare-and-set, so among hosts exactly one makes it, and
//! logged once, by the host that made it):
//! - closed → open: this host saw `failures` counted failures in a row;
//! - open → probing: the cooldown ran out and this host took the one probe;
//! - probing → closed: the probe did not fail; probing → open: it failed, and the
//!   cooldown doubles up to `max_cooldown`; a probe whose host went away is taken over
//!   by another host once its lease runs out;
//! - paused ↔ running: an operator's pause or resume. Resume also closes the breaker.
//!
//! While a plugin is paused or its breaker open, calls wait before they start: the
//! deliveries stay unsettled (kept alive on NATS), nothing is attempted, retried or
//! dead-lettered, and events wait in the log behind them. Shutdown does not wait for
//! them (the dispatcher stops waiting), so they come back after a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::bus::{Breaker, Bus, BusError, Paused, PluginControl};
use crate::clock::now_ms;
use crate::failure::AttemptError;
use crate::metrics::Metrics;
use crate::policy::breaker::{BreakerPolicy, counts_against};

/// How often a waiting call reads the control again even without a change notice (one
/// lost to a dropped watch), and bound on how long a waiting call sleeps at once.
const REREAD: Duration = Duration::from_secs(5);

/// Times a transition is tried again after losing a compare-and-set.
const CAS_TRIES: usize = 3;

/// How a call was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Deliveries flow.
    Flowing,
    /// This call is the breaker's probe.
    Probe,
}

/// The valves of a host's plugins, by name.
pub struct Valves {
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    valves: Mutex<HashMap<String, Arc<Valve>>>,
}

impl Valves {
    /// Valves that learn of changes only when they make them (tests, a host without a
    /// running dispatcher); see [`Valves::start`].
    pub fn new(bus: Arc<dyn Bus>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            bus,
            metrics,
            valves: Mutex::default(),
        })
    }

    /// Valves that follow changes made by any host sharing the bus.
    pub async fn start(bus: Arc<dyn Bus>, metrics: Arc<Metrics>) -> Result<Arc<Self>, BusError> {
        let changes = bus.control_changes().await?;
        let valves = Self::new(bus, metrics);
        tokio::spawn(follow(Arc::downgrade(&valves), changes));
        Ok(valves)
    }

    /// The valve of `plugin`, made on first use (flowing until it reads the bus).
    pub fn valve(&self, plugin: &str) -> Arc<Valve> {
        let mut valves = self.valves.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(valves.entry(plugin.to_owned()).or_insert_with(|| {
            Arc::new(Valve {
                plugin: plugin.to_owned(),
                bus: Arc::clone(&self.bus),
                metrics: Arc::clone(&self.metrics),
                flowing: AtomicBool::new(true),
                failures: AtomicU32::new(0),
                settings: Mutex::new(None),
                probe_taken_ms: Mutex::new(None),
                current: Mutex::new((PluginControl::default(), 0)),
                changed: tokio::sync::Notify::new(),
            })
        }))
    }

    /// The plugin's control: as this host last read it, or from the bus for a plugin
    /// without a valve here.
    pub async fn control(&self, plugin: &str) -> Result<PluginControl, BusError> {
        let known = self
            .valves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(plugin)
            .map(|valve| valve.current().0);
        match known {
            Some(control) => Ok(control),
            None => Ok(self.bus.control(plugin).await?.0),
        }
    }

    /// Pauses the plugin on every host.
    pub async fn pause(&self, plugin: &str, reason: String) -> Result<PluginControl, BusError> {
        let (control, changed) = self
            .valve(plugin)
            .change(|control| {
                control.paused.is_none().then(|| PluginControl {
                    paused: Some(Paused {
                        since_ms: now_ms(),
                        reason: reason.clone(),
                    }),
                    breaker: control.breaker.clone(),
                })
            })
            .await?;
        if changed {
            tracing::warn!(plugin, reason = %reason, "plugin paused by an operator: deliveries stop on every host");
        }
        Ok(control)
    }

    /// Resumes the plugin on every host, closing its breaker too.
    pub async fn resume(&self, plugin: &str) -> Result<PluginControl, BusError> {
        let valve = self.valve(plugin);
        let (control, changed) = valve
            .change(|control| (!control.flows()).then(PluginControl::default))
            .await?;
        valve.failures.store(0, Ordering::Relaxed);
        if changed {
            tracing::warn!(
                plugin,
                "plugin resumed by an operator: deliveries run again"
            );
        }
        Ok(control)
    }

    async fn refresh(&self, plugin: Option<&str>) {
        let valves: Vec<Arc<Valve>> = {
            let valves = self.valves.lock().unwrap_or_else(PoisonError::into_inner);
            match plugin {
                Some(name) => valves.get(name).cloned().into_iter().collect(),
                None => valves.values().cloned().collect(),
            }
        };
        for valve in valves {
            if let Err(error) = valve.refresh().await {
                tracing::warn!(plugin = %valve.plugin, %error, "cannot read the plugin's control");
            }
        }
    }
}

/// Reads again each control that changes, until the valves are dropped.
async fn follow(valves: Weak<Valves>, mut changes: BoxStream<'static, String>) {
    while let Some(plugin) = changes.next().await {
        let Some(valves) = valves.upgrade() else {
            return;
        };
        valves
            .refresh((!plugin.is_empty()).then_some(plugin.as_str()))
            .await;
    }
}

/// One plugin's valve.
pub struct Valve {
    plugin: String,
    bus: Arc<dyn Bus>,
    metrics: Arc<Metrics>,
    /// `current.flows()`, readable without the lock.
    flowing: AtomicBool,
    /// This host's counted failures in a row.
    failures: AtomicU32,
    /// The breaker of the version serving now, and how long its probe may take.
    settings: Mutex<Option<(BreakerPolicy, Duration)>>,
    /// When this host took the probe now running here: the `since_ms` it wrote, which
    /// tells its probe from one another host took over after the lease ran out.
    probe_taken_ms: Mutex<Option<i64>>,
    /// The control as last read or written, with its revision.
    current: Mutex<(PluginControl, u64)>,
    changed: tokio::sync::Notify,
}

impl Valve {
    /// Sets the breaker of the version now serving (none: the plugin has no breaker) and
    /// reads the shared state. `probe_lease` bounds how long a probe may run before
    /// another host may take it over.
    pub async fn serve(
        &self,
        breaker: Option<BreakerPolicy>,
        probe_lease: Duration,
    ) -> Result<(), BusError> {
        *self.settings.lock().unwrap_or_else(PoisonError::into_inner) =
            breaker.map(|policy| (policy, probe_lease));
        self.failures.store(0, Ordering::Relaxed);
        self.refresh().await
    }

    /// The control as last read, with its revision.
    pub fn current(&self) -> (PluginControl, u64) {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether calls start now, with no pause and no breaker in the way.
    pub fn is_flowing(&self) -> bool {
        self.flowing.load(Ordering::Acquire)
    }

    /// Waits until a call may start. Cancel-safe: dropping the future takes nothing.
    pub async fn admit(&self) -> Admission {
        loop {
            if self.flowing.load(Ordering::Acquire) {
                return Admission::Flowing;
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (control, revision) = self.current();
            let now = now_ms();
            let due = match (&control.paused, &control.breaker) {
                (None, Breaker::Closed) => continue,
                (Some(_), _) => None,
                (None, Breaker::Open { until_ms, .. } | Breaker::Probing { until_ms, .. })
                    if now < *until_ms =>
                {
                    Some(*until_ms)
                }
                (
                    None,
                    Breaker::Open {
                        cooldown_ms,
                        reason,
                        ..
                    }
                    | Breaker::Probing {
                        cooldown_ms,
                        reason,
                        ..
                    },
                ) => {
                    if self
                        .take_probe(&control, revision, *cooldown_ms, reason)
                        .await
                    {
                        return Admission::Probe;
                    }
                    continue;
                }
            };
            let wait = due.map_or(REREAD, |due| {
                Duration::from_millis(u64::try_from(due - now).unwrap_or(0)).min(REREAD)
            });
            tokio::select! {
                () = &mut changed => {}
                () = tokio::time::sleep(wait) => {
                    if let Err(error) = self.refresh().await {
                        tracing::warn!(plugin = %self.plugin, %error, "cannot read the plugin's control");
                    }
                }
            }
        }
    }

    /// Reports how an admitted batch call's handled items ended, in their order: each is
    /// an attempt, as a lone call is, so a success among them ends a run of failures. A
    /// batch taken as the probe fails it only if every handled item failed: one that
    /// succeeded shows the plugin working again.
    pub async fn record_batch(&self, admission: Admission, failures: &[Option<&AttemptError>]) {
        if admission == Admission::Probe {
            let all_failed = failures
                .iter()
                .all(|failure| failure.is_some_and(|error| counts_against(error.kind)));
            let failed = if all_failed {
                failures.last().copied().flatten()
            } else {
                None
            };
            self.end_probe(failed).await;
            return;
        }
        for failure in failures {
            self.record(Admission::Flowing, *failure).await;
        }
    }

    /// Reports how an admitted call ended: `failure` is its error when it failed.
    pub async fn record(&self, admission: Admission, failure: Option<&AttemptError>) {
        let counted = failure.filter(|error| counts_against(error.kind));
        if admission == Admission::Probe {
            self.end_probe(counted).await;
            return;
        }
        let Some(error) = counted else {
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
            return;
        };
        let in_a_row = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let Some((policy, _)) = self.settings() else {
            return;
        };
        if in_a_row < policy.failures {
            return;
        }
        self.failures.store(0, Ordering::Relaxed);
        let cooldown = policy.cooldown;
        let reason = format!(
            "{in_a_row} failed attempts in a row; the last: {}: {}",
            error.kind, error.message
        );
        let opened = self
            .change(|control| {
                (control.breaker == Breaker::Closed).then(|| PluginControl {
                    paused: control.paused.clone(),
                    breaker: open(now_ms(), cooldown, reason.clone()),
                })
            })
            .await;
        if let Ok((_, true)) = opened {
            self.metrics.breaker_transition(&self.plugin, "open");
            tracing::warn!(
                plugin = %self.plugin,
                cooldown = %humantime::format_duration(cooldown),
                "circuit breaker opened after {reason}; deliveries stop until a probe succeeds"
            );
        }
    }

    fn settings(&self) -> Option<(BreakerPolicy, Duration)> {
        *self.settings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tries to move an open (or abandoned probing) breaker to probing by this host.
    async fn take_probe(
        &self,
        seen: &PluginControl,
        revision: u64,
        cooldown_ms: u64,
        reason: &str,
    ) -> bool {
        let lease = self
            .settings()
            .map_or(REREAD, |(_, lease)| lease)
            .max(Duration::from_millis(cooldown_ms));
        let now = now_ms();
        let probing = PluginControl {
            paused: None,
            breaker: Breaker::Probing {
                since_ms: now,
                until_ms: now.saturating_add(millis(lease)),
                cooldown_ms,
                reason: reason.to_owned(),
            },
        };
        if self.write(&probing, revision).await.is_err() {
            return false;
        }
        *self
            .probe_taken_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(now);
        self.metrics.breaker_transition(&self.plugin, "probing");
        tracing::info!(plugin = %self.plugin, after = ?seen.breaker.name(), "circuit breaker: one delivery probes the plugin");
        true
    }

    /// Closes the breaker after a probe that did not fail, or opens it again for longer.
    async fn end_probe(&self, failure: Option<&AttemptError>) {
        let policy = self.settings().map(|(policy, _)| policy);
        let taken_ms = self
            .probe_taken_ms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let mut closed = false;
        let mut reopened = None;
        let ended = self
            .change(|control| {
                // A probe that outlived its lease was taken over by another host (or
                // ended by an operator): its outcome is that host's to record.
                let Breaker::Probing {
                    cooldown_ms,
                    since_ms,
                    ..
                } = &control.breaker
                else {
                    return None;
                };
                if Some(*since_ms) != taken_ms {
                    return None;
                }
                match (failure, policy) {
                    (Some(error), Some(policy)) => {
                        let cooldown = policy.next_cooldown(Duration::from_millis(*cooldown_ms));
                        reopened = Some(cooldown);
                        Some(PluginControl {
                            paused: control.paused.clone(),
                            breaker: open(
                                now_ms(),
                                cooldown,
                                format!("the probe failed: {}: {}", error.kind, error.message),
                            ),
                        })
                    }
                    // A probe that did not fail, or a plugin whose new version has no
                    // breaker, closes it.
                    _ => {
                        closed = true;
                        Some(PluginControl {
                            paused: control.paused.clone(),
                            breaker: Breaker::Closed,
                        })
                    }
                }
            })
            .await;
        match ended {
            Ok((_, true)) => {}
            Ok((_, false)) => return,
            Err(error) => {
                tracing::error!(plugin = %self.plugin, %error, "cannot store the end of the breaker's probe");
                return;
            }
        }
        if let Some(cooldown) = reopened {
            self.metrics.breaker_transition(&self.plugin, "open");
            tracing::warn!(
                plugin = %self.plugin,
                cooldown = %humantime::format_duration(cooldown),
                "circuit breaker opened again: the probe failed"
            );
        } else if closed {
            self.failures.store(0, Ordering::Relaxed);
            self.metrics.breaker_transition(&self.plugin, "closed");
            tracing::warn!(plugin = %self.plugin, "circuit breaker closed: the probe succeeded; deliveries run again");
        }
    }

    /// Applies `make` to the current control and stores the result by compare-and-set,
    /// trying again on a lost race; `make` returning `None` means nothing to change.
    /// Returns the control in force afterwards and whether this call changed it.
    async fn change(
        &self,
        mut make: impl FnMut(&PluginControl) -> Option<PluginControl>,
    ) -> Result<(PluginControl, bool), BusError> {
        let mut last = None;
        for _ in 0..CAS_TRIES {
            let (control, revision) = self.current();
            let Some(next) = make(&control) else {
                return Ok((control, false));
            };
            match self.write(&next, revision).await {
                Ok(()) => return Ok((next, true)),
                Err(conflict @ BusError::Conflict(_)) => last = Some(conflict),
                Err(error) => return Err(error),
            }
        }
        Err(last.unwrap_or(BusError::Closed))
    }

    /// Stores `control` if the revision is still `revision`; on any failure, reads the
    /// control again so the next decision starts from what is stored.
    async fn write(&self, control: &PluginControl, revision: u64) -> Result<(), BusError> {
        match self.bus.put_control(&self.plugin, control, revision).await {
            Ok(stored) => {
                self.keep(control.clone(), stored);
                Ok(())
            }
            Err(error) => {
                if let Err(reading) = self.refresh().await {
                    tracing::warn!(plugin = %self.plugin, error = %reading, "cannot read the plugin's control");
                }
                Err(error)
            }
        }
    }

    /// Reads the control from the bus.
    async fn refresh(&self) -> Result<(), BusError> {
        let (control, revision) = self.bus.control(&self.plugin).await?;
        self.keep(control, revision);
        Ok(())
    }

    /// Keeps `control` unless a later revision is already known, and wakes waiting calls.
    fn keep(&self, control: PluginControl, revision: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if revision < current.1 {
            return;
        }
        self.flowing.store(control.flows(), Ordering::Release);
        *current = (control, revision);
        drop(current);
        self.changed.notify_waiters();
    }
}

fn open(now: i64, cooldown: Duration, reason: String) -> Breaker {
    Breaker::Open {
        since_ms: now,
        until_ms: now.saturating_add(millis(cooldown)),
        cooldown_ms: u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX),
        reason,
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::sqlite::{SqliteBus, SqliteOptions};

    #[tokio::test]
    async fn a_probe_taken_over_by_another_host_is_ended_by_that_host_only() {
        let dir = tempfile::tempdir().unwrap();
        let bus: Arc<dyn Bus> =
            Arc::new(SqliteBus::open(SqliteOptions::new(dir.path().join("log.db"))).unwrap());
        let opened = PluginControl {
            paused: None,
            breaker: open(now_ms() - 10, Duration::from_millis(1), "failing".into()),
        };
        bus.put_control("p", &opened, 0).await.unwrap();
        let policy = BreakerPolicy {
            failures: 1,
            cooldown: Duration::from_millis(1),
            max_cooldown: Duration::from_millis(1),
        };
        let lease = Duration::from_millis(20);
        // Two hosts sharing the bus.
        let slow = Valves::new(Arc::clone(&bus), Arc::new(Metrics::default())).valve("p");
        let other = Valves::new(Arc::clone(&bus), Arc::new(Metrics::default())).valve("p");
        slow.serve(Some(policy), lease).await.unwrap();
        other.serve(Some(policy), lease).await.unwrap();

        assert_eq!(slow.admit().await, Admission::Probe);
        // The slow host's probe outlives its lease: the other host takes it over.
        tokio::time::sleep(lease * 2).await;
        other.refresh().await.unwrap();
        assert_eq!(other.admit().await, Admission::Probe);
        let (taken_over, _) = bus.control("p").await.unwrap();

        // The slow probe ends well: that must not end the other host's probe.
        slow.record(Admission::Probe, None).await;
        assert_eq!(bus.control("p").await.unwrap().0, taken_over);

        // The other host's probe fails: the breaker opens again.
        let failure = AttemptError {
            attempt: 1,
            kind: crate::failure::FailureKind::Trap,
            message: "trapped".into(),
            at_ms: now_ms(),
        };
        other.record(Admission::Probe, Some(&failure)).await;
        let (control, _) = bus.control("p").await.unwrap();
        assert_eq!(control.breaker.name(), "open");
    }

    /// A batch's items count as as many attempts: a success among them ends the run of
    /// failures, so one failing item per batch never opens a breaker of three.
    #[tokio::test]
    async fn a_batch_counts_its_items_as_attempts_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let bus: Arc<dyn Bus> =
            Arc::new(SqliteBus::open(SqliteOptions::new(dir.path().join("log.db"))).unwrap());
        let policy = BreakerPolicy {
            failures: 3,
            cooldown: Duration::from_secs(60),
            max_cooldown: Duration::from_secs(60),
        };
        let valve = Valves::new(Arc::clone(&bus), Arc::new(Metrics::default())).valve("p");
        valve
            .serve(Some(policy), Duration::from_secs(1))
            .await
            .unwrap();
        let failure = AttemptError {
            attempt: 1,
            kind: crate::failure::FailureKind::Trap,
            message: "trapped".into(),
            at_ms: now_ms(),
        };
        let breaker = || async { bus.control("p").await.unwrap().0.breaker.name() };
        // Ten batches of ten with one failure each, anywhere in the batch.
        for batch in 0..10 {
            let items: Vec<Option<&AttemptError>> = (0..10)
                .map(|item| (item == batch).then_some(&failure))
                .collect();
            assert_eq!(valve.admit().await, Admission::Flowing);
            valve.record_batch(Admission::Flowing, &items).await;
        }
        assert_eq!(breaker().await, "closed");
        // Two failures ending one batch and one starting the next are three in a row.
        valve
            .record_batch(Admission::Flowing, &[None, Some(&failure), Some(&failure)])
            .await;
        assert_eq!(breaker().await, "closed");
        valve
            .record_batch(Admission::Flowing, &[Some(&failure), None])
            .await;
        assert_eq!(breaker().await, "open");
    }
}
