//! A loaded plugin and the lifecycle of its instances.
//!
//! Lifecycle:
//! - Load: the component is compiled once and pre-instantiated ([`PluginPre`]); a fresh
//!   instance answers `describe()` and is dropped.
//! - `per-event`: every invocation instantiates a fresh store and instance and drops
//!   both afterwards, so nothing a handler does survives its event.
//! - `reuse`: invocations take a warm instance from the pool (or make one) and put it
//!   back afterwards, unless the invocation trapped or hit a limit (fuel, memory,
//!   timeout, effects, host failure) or the instance has served `max_calls` events — then
//!   it is dropped ("recycled") and the next invocation gets a fresh one. A handler that
//!   returns `retry` or `reject` leaves a healthy instance and it is kept. A run
//!   ([`Plugin::invoke_run`]) calls several events on one warm instance, one call each,
//!   with each call's limits as if it were invoked alone.
//!
//! Every invocation gets the plugin's full fuel budget and an epoch deadline; a timer
//! over the whole invocation (registered once the call first waits) catches time spent
//! waiting inside host calls (for example a guest sleeping), where epochs cannot
//! interrupt it. Calls longer than one timeslice take turns at the runtime's CPU gate.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::{Instrument, Span};
use wasmtime::{
    AsContextMut, PoolConcurrencyLimitError, Store, StoreContextMut, Trap, UpdateDeadline,
};
use wasmtime_wasi::WasiCtxBuilder;

use super::artifacts::ArtifactLease;
use super::bindings::{Exports, HandlerError, PluginPre};
use super::fair::{CallClock, CpuShare, Fair};
use super::host::{HostState, HostTrap, PluginIdentity, begin_run_item};
use super::limits::{HANDLES_EXHAUSTED, MAX_HANDLES, MemoryLimiter};
use super::outcome::{Failure, Outcome};
use super::sandbox::Refusals;
use super::settings::{Isolation, PluginLimits, PluginSettings};
use super::stdio::{PluginOutput, StderrTail};
use super::validate::Import;
use super::{EPOCH_TICK, LoadError, LoadErrorReason, Runtime, validate};
use crate::effects::Effects;
use crate::event::Event;
use crate::failure::FailureKind;
use crate::kv::KvSource;
use crate::pattern::Pattern;

/// Where an invocation stands in the delivery of its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Which attempt this is, starting at 1.
    pub attempt: u32,
    /// How many attempts the retry policy allows.
    pub max_attempts: u32,
    /// The event's position in the log.
    pub sequence: u64,
}

/// What a plugin said about itself in `describe()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// The plugin's own name for itself.
    pub name: String,
    /// The plugin's version string.
    pub version: String,
    /// Its default subscriptions.
    pub subscriptions: Vec<Pattern>,
    /// The contract version it was built against, such as `0.2.0`.
    pub contract: &'static str,
    /// Every import of the component, with what the host gives it.
    pub imports: Vec<Import>,
}

/// What one batch call produced, item by item.
///
/// Invariant, as for [`Outcome`]: an item has effects only if it was acknowledged.
#[derive(Debug)]
pub struct BatchOutcome {
    /// Each item's outcome, in order: its effects, why it failed, or `None` for an item
    /// not handled (after the call failed in an earlier item, or one the handler left
    /// out), which runs again alone without counting an attempt.
    pub items: Vec<Option<Result<Effects, Failure>>>,
    /// Fuel the call burned.
    pub fuel_used: u64,
    /// When the call started.
    pub started: Instant,
    /// Wall-clock time of the call.
    pub duration: Duration,
    /// Time the guest ran on a thread.
    pub cpu: Duration,
    /// A run's calls' own costs, in order, one for each call that ended (a batch's items
    /// share one call and have none; nor has a run cut off at its time limit).
    pub calls: Vec<CallCost>,
}

/// What one call of a run cost on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallCost {
    /// From the call's start to its end.
    pub duration: Duration,
    /// Fuel it burned.
    pub fuel: u64,
}

/// Counters of a plugin's instances, for status and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InstanceStats {
    /// Instances created for invocations.
    pub created: u64,
    /// Warm instances dropped after a failure or after `max_calls`.
    pub recycled: u64,
    /// Warm instances idle in the pool now.
    pub idle: usize,
}

/// A compiled, validated plugin, ready to handle events. Cheap to share behind an `Arc`.
pub struct Plugin {
    runtime: Runtime,
    identity: Arc<PluginIdentity>,
    pre: PluginPre,
    info: PluginInfo,
    settings: PluginSettings,
    sha256: String,
    warm: Mutex<Vec<Instance>>,
    cpu: CpuShare,
    created: AtomicU64,
    recycled: AtomicU64,
    /// Keeps the compiled file in the cache while the plugin lives.
    _artifact: Option<ArtifactLease>,
}

struct Instance {
    store: Store<HostState>,
    exports: Exports,
    calls: u64,
}

impl Runtime {
    /// Compiles, validates and describes a plugin.
    ///
    /// `name` is the plugin's identity in the host (its file stem); `origin` names the
    /// bytes in errors (usually the file path). Compilation runs on a blocking thread.
    pub async fn load(
        &self,
        name: &str,
        origin: &str,
        bytes: Vec<u8>,
        settings: PluginSettings,
    ) -> Result<Plugin, LoadError> {
        let fail = |reason| LoadError {
            origin: origin.to_owned(),
            reason,
        };
        validate::check_header(&bytes).map_err(fail)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let runtime = self.clone();
        let hash = sha256.clone();
        let (pre, world, artifact) =
            tokio::task::spawn_blocking(move || runtime.prepare(&hash, &bytes))
                .await
                .map_err(|e| {
                    fail(LoadErrorReason::Invalid(format!(
                        "compiler thread failed: {e}"
                    )))
                })?
                .map_err(fail)?;
        let identity = Arc::new(PluginIdentity {
            name: Arc::from(name),
            refusals: Refusals::default(),
            log_budget: Arc::default(),
            bounds: settings.bounds,
            config: settings.config.clone(),
        });
        let mut plugin = Plugin {
            runtime: self.clone(),
            identity,
            pre,
            info: PluginInfo {
                name: String::new(),
                version: String::new(),
                subscriptions: Vec::new(),
                contract: world.contract.as_str(),
                imports: world.imports,
            },
            settings,
            sha256,
            warm: Mutex::new(Vec::new()),
            cpu: CpuShare::default(),
            created: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
            _artifact: artifact,
        };
        plugin.info = plugin.describe().await.map_err(fail)?;
        Ok(plugin)
    }

    /// Reads and loads a plugin file; its name is the file stem.
    pub async fn load_file(
        &self,
        path: &std::path::Path,
        settings: PluginSettings,
    ) -> Result<Plugin, LoadError> {
        let origin = path.display().to_string();
        let bytes = tokio::fs::read(path).await.map_err(|e| LoadError {
            origin: origin.clone(),
            reason: LoadErrorReason::Io(e),
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| origin.clone());
        self.load(&name, &origin, bytes, settings).await
    }

    /// Compiles and checks a component; CPU-heavy, so callers run it off the async threads.
    fn prepare(
        &self,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<(PluginPre, validate::World, Option<ArtifactLease>), LoadErrorReason> {
        let (component, lease) = self.compile(sha256, bytes)?;
        let world = validate::check_world(self.engine(), &component)?;
        let pre = self
            .linker()
            .instantiate_pre(&component)
            .map_err(|e| LoadErrorReason::Link(format!("{e:#}")))?;
        let pre = PluginPre::new(world.contract, world.batch, pre)
            .map_err(|e| LoadErrorReason::Link(format!("{e:#}")))?;
        Ok((pre, world, lease))
    }
}

impl Plugin {
    /// The plugin's name in the host.
    pub fn name(&self) -> &str {
        &self.identity.name
    }

    /// The plugin's attempts to reach outside its sandbox, refused since it was loaded.
    pub fn refusals(&self) -> &Refusals {
        &self.identity.refusals
    }

    /// What `describe()` returned.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// The settings the plugin runs with.
    pub fn settings(&self) -> &PluginSettings {
        &self.settings
    }

    /// Hex SHA-256 of the plugin file.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Instance counters.
    pub fn instance_stats(&self) -> InstanceStats {
        InstanceStats {
            created: self.created.load(Ordering::Relaxed),
            recycled: self.recycled.load(Ordering::Relaxed),
            idle: self.warm_pool().len(),
        }
    }

    fn warm_pool(&self) -> std::sync::MutexGuard<'_, Vec<Instance>> {
        self.warm.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Handles one event. Effects are returned, never applied; see [`Outcome`].
    pub async fn invoke(
        &self,
        event: &Event,
        delivery: Delivery,
        kv: Arc<dyn KvSource>,
    ) -> Outcome {
        // Only inside a recorded delivery: a span here without one would start a trace.
        let span = if crate::telemetry::exporting() && !Span::current().is_disabled() {
            tracing::info_span!(
                target: crate::telemetry::FLOW,
                "runtime.invoke",
                plugin = %self.identity.name,
                event_id = %event.id,
                attempt = delivery.attempt
            )
        } else {
            Span::none()
        };
        let limits = self.settings.limits;
        let clock = CallClock::start();
        let mut slot = self.warm_instance();
        let attempt = self
            .attempt(&mut slot, event, delivery, kv)
            .instrument(span);
        let (result, timed_out) = match self.guarded(attempt, &clock, limits).await {
            Some(result) => (result, false),
            None => (Err(timeout_failure(limits)), true),
        };
        // A call cut off by the timeout leaves the store mid-call: never reuse it.
        let healthy = !timed_out && result.as_ref().err().is_none_or(leaves_instance_healthy);
        let fuel_used = self.put_back(slot, limits, healthy, 1);
        Outcome {
            result,
            fuel_used,
            started: clock.started(),
            duration: call_duration(&clock, timed_out),
            cpu: clock.cpu(),
        }
    }

    /// A guest call as every call runs: taking turns at the CPU gate, timed by `clock`,
    /// and cut off at the overall timeout (`None`).
    fn guarded<'a, F: Future>(
        &'a self,
        call: F,
        clock: &'a CallClock,
        limits: PluginLimits,
    ) -> Within<'a, Fair<'a, F>> {
        Within::new(
            Fair::new(self.runtime.gate(), &self.cpu, clock, call),
            clock,
            limits,
        )
    }

    /// Whether the plugin exports the batch handler (`switchyard:plugin/batch-handler`).
    pub fn takes_batches(&self) -> bool {
        self.pre.has_batch_handler()
    }

    /// Handles several events in one call of the batch handler. Each item gets the
    /// plugin's fuel and time, as it would alone (host waits are bound by the time of all
    /// items together), and so does the call's code before its first item; see
    /// [`BatchOutcome`] for what comes back. A plugin without a batch handler handles
    /// none of them.
    pub async fn invoke_batch(
        &self,
        items: &[(&Event, Delivery)],
        kv: Arc<dyn KvSource>,
    ) -> BatchOutcome {
        self.invoke_batch_traced(items, &[], kv).await
    }

    /// [`Plugin::invoke_batch`], where `traceparents[i]` is the trace context of item
    /// `i`'s delivery: what the events it emits continue (by default, the context of the
    /// event it handles).
    pub async fn invoke_batch_traced(
        &self,
        items: &[(&Event, Delivery)],
        traceparents: &[Option<String>],
        kv: Arc<dyn KvSource>,
    ) -> BatchOutcome {
        let count = u32::try_from(items.len().max(1)).unwrap_or(u32::MAX);
        // The host-side guard's bound; the epoch deadline and the fuel are one item's.
        let limits = PluginLimits {
            timeout: self.settings.limits.timeout.saturating_mul(count),
            ..self.settings.limits
        };
        let clock = CallClock::start();
        let mut slot = self.warm_instance();
        let call = self.batch_attempt(&mut slot, items, traceparents, kv);
        let ((outcomes, failed), timed_out) = match self.guarded(call, &clock, limits).await {
            Some(called) => (called, false),
            None => ((cut_off(&mut slot, items.len(), limits), true), true),
        };
        // A store whose call failed cannot be entered again, whatever the items say.
        let healthy = !failed
            && outcomes
                .iter()
                .all(|outcome| !matches!(outcome, Some(Err(failure)) if !leaves_instance_healthy(failure)));
        let fuel_used = self.put_back(slot, limits, healthy, 1);
        BatchOutcome::of(outcomes, fuel_used, &clock, timed_out)
    }

    async fn batch_attempt(
        &self,
        slot: &mut Option<Instance>,
        items: &[(&Event, Delivery)],
        traceparents: &[Option<String>],
        kv: Arc<dyn KvSource>,
    ) -> (Vec<Option<Result<Effects, Failure>>>, bool) {
        let limits = self.settings.limits;
        let instance = match self.armed_instance(slot).await {
            Ok(instance) => instance,
            Err(failure) => return (first_failed(items.len(), failure), true),
        };
        let events: Vec<&Event> = items.iter().map(|(event, _)| *event).collect();
        instance.store.data_mut().begin_batch(
            &events,
            traceparents,
            &kv,
            limits.timeout,
            limits.fuel,
        );
        let called = instance
            .exports
            .handle_batch(&mut instance.store, items)
            .await;
        let failure = match called {
            Some(Err(error)) => Some(classify(&error, instance.store.data(), limits)),
            Some(Ok(())) | None => None,
        };
        let failed = failure.is_some();
        let (outcomes, outside_items) = instance.store.data_mut().end_batch(failure);
        if let Some(failure) = outside_items {
            tracing::warn!(
                plugin = %self.identity.name,
                kind = %failure.kind,
                "the batch call failed outside its items ({}); the items it handled keep \
                 their outcomes, the others run again alone",
                failure.message
            );
        }
        (outcomes, failed)
    }

    /// Handles several events on one instance, one call of `handle` each, as if each were
    /// invoked alone after the ones before it had committed: each call gets the plugin's
    /// fuel and time, and reads what the acknowledged calls before it wrote and emitted,
    /// as a batch's items do. What a run saves over invoking each event alone is the
    /// work around the calls: taking the instance and putting it back, the turn at the
    /// CPU gate, the guard and the clocks.
    ///
    /// The run starts no call once `budget` has passed since it began, past the
    /// instance's `max_calls`, or after a call that leaves the instance unfit (a trap, a
    /// limit, a timeout); the items it did not call come back `None` and have not been
    /// attempted. The first item is always called. A `per-event` plugin's instance serves
    /// one call, so its run calls the first item only.
    pub async fn invoke_run(
        &self,
        items: &[(&Event, Delivery)],
        kv: Arc<dyn KvSource>,
        budget: Duration,
    ) -> BatchOutcome {
        // Each call of the run moves the guard's deadline on to its own (see `Within`).
        let limits = self.settings.limits;
        let clock = CallClock::start();
        let mut slot = self.warm_instance();
        let run = self.run_attempt(&mut slot, items, kv, budget, &clock);
        let ((outcomes, failed, costs), timed_out) = match self.guarded(run, &clock, limits).await {
            Some(ran) => (ran, false),
            None => (
                (cut_off(&mut slot, items.len(), limits), true, Vec::new()),
                true,
            ),
        };
        // A run cut off at its time limit was in a call; its instance is dropped.
        let calls = if timed_out {
            1
        } else {
            u64::try_from(costs.len()).unwrap_or(u64::MAX)
        };
        let fuel_used = self.put_back(slot, limits, !failed, calls);
        let mut outcome = BatchOutcome::of(outcomes, fuel_used, &clock, timed_out);
        outcome.calls = costs;
        outcome
    }

    /// The calls of a run (see [`Plugin::invoke_run`]): each item's outcome, whether the
    /// instance is unfit for more calls, and what each call it served cost.
    async fn run_attempt(
        &self,
        slot: &mut Option<Instance>,
        items: &[(&Event, Delivery)],
        kv: Arc<dyn KvSource>,
        budget: Duration,
        clock: &CallClock,
    ) -> (Vec<Option<Result<Effects, Failure>>>, bool, Vec<CallCost>) {
        let limits = self.settings.limits;
        let instance = match self.armed_instance(slot).await {
            Ok(instance) => instance,
            Err(failure) => return (first_failed(items.len(), failure), true, Vec::new()),
        };
        let calls_left = match self.settings.isolation {
            Isolation::Reuse { max_calls } => max_calls.saturating_sub(instance.calls).max(1),
            Isolation::PerEvent => 1,
        };
        instance
            .store
            .data_mut()
            .begin_run(items.len(), limits.timeout, limits.fuel);
        let mut failure = None;
        let mut costs = Vec::with_capacity(items.len());
        // Each call's end is the next one's start: one clock read per call.
        let mut now = Instant::now();
        for (index, (event, delivery)) in items.iter().enumerate() {
            // `index` calls made so far.
            if u64::try_from(index).unwrap_or(u64::MAX) >= calls_left
                || (index > 0 && now.saturating_duration_since(clock.started()) >= budget)
            {
                break;
            }
            // Host waits are cut off at the call's own time (epochs cannot reach them).
            clock.move_deadline(now + overall_timeout(limits));
            let called =
                match begin_run_item(instance.store.as_context_mut(), index, event, &kv, now) {
                    Ok(()) => {
                        instance
                            .exports
                            .handle(&mut instance.store, event, *delivery)
                            .await
                    }
                    Err(error) => Err(error),
                };
            let ended = called.and_then(|answer| instance.store.data_mut().end_run_item(answer));
            let end = Instant::now();
            // Each call starts with the whole budget (`begin_run_item`).
            let left = instance.store.get_fuel().unwrap_or(0);
            costs.push(CallCost {
                duration: end.saturating_duration_since(now),
                fuel: limits.fuel.saturating_sub(left),
            });
            now = end;
            if let Err(error) = ended {
                failure = Some(classify(&error, instance.store.data(), limits));
                break;
            }
        }
        let failed = failure.is_some();
        let (mut outcomes, outside_items) = instance.store.data_mut().end_batch(failure);
        // Only a failure to begin a call is outside every call: it is that call's.
        let last = costs.len().checked_sub(1);
        if let Some(failure) = outside_items
            && let Some(outcome) = last.and_then(|last| outcomes.get_mut(last))
        {
            *outcome = Some(Err(failure));
        }
        (outcomes, failed, costs)
    }

    /// The call's instance, made now if it has none, armed with a full fuel budget and
    /// one item's epoch deadline (whose callback moves it on to each next item's, see
    /// `next_deadline`).
    async fn armed_instance<'s>(
        &self,
        slot: &'s mut Option<Instance>,
    ) -> Result<&'s mut Instance, Failure> {
        if slot.is_none() {
            self.created.fetch_add(1, Ordering::Relaxed);
            *slot = Some(self.instantiate().await?);
        }
        let instance = slot
            .as_mut()
            .ok_or_else(|| Failure::new(FailureKind::Host, "no instance"))?;
        arm(&mut instance.store, self.settings.limits)?;
        Ok(instance)
    }

    async fn attempt(
        &self,
        slot: &mut Option<Instance>,
        event: &Event,
        delivery: Delivery,
        kv: Arc<dyn KvSource>,
    ) -> Result<Effects, Failure> {
        let limits = self.settings.limits;
        if slot.is_none() {
            self.created.fetch_add(1, Ordering::Relaxed);
            *slot = Some(self.instantiate().await?);
        }
        let Some(instance) = slot.as_mut() else {
            return Err(Failure::new(FailureKind::Host, "no instance"));
        };
        arm(&mut instance.store, limits)?;
        instance.store.data_mut().begin_call(event, kv);
        let called = instance
            .exports
            .handle(&mut instance.store, event, delivery)
            .await;
        // Ending the call drops the buffers whatever happened; only success keeps them.
        let effects = instance.store.data_mut().end_call();
        match called {
            Ok(Ok(())) => Ok(effects),
            Ok(Err(HandlerError::Retry(message))) => Err(Failure::new(FailureKind::Retry, message)),
            Ok(Err(HandlerError::Reject(message))) => {
                Err(Failure::new(FailureKind::Reject, message))
            }
            Err(error) => Err(classify(&error, instance.store.data(), limits)),
        }
    }

    /// Creates a fresh store and instance with the plugin's limits armed.
    async fn instantiate(&self) -> Result<Instance, Failure> {
        let limits = self.settings.limits;
        let stderr_tail = StderrTail::default();
        let wasi = WasiCtxBuilder::new()
            .stdout(PluginOutput::stdout(
                Arc::clone(&self.identity.name),
                Arc::clone(&self.identity.log_budget),
            ))
            .stderr(PluginOutput::stderr(
                Arc::clone(&self.identity.name),
                Arc::clone(&self.identity.log_budget),
                stderr_tail.clone(),
            ))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState::new(
            wasi,
            MemoryLimiter::new(limits.memory_bytes),
            stderr_tail,
            Arc::clone(&self.identity),
        );
        let mut store = Store::new(self.runtime.engine(), state);
        store.limiter(|state| &mut state.limiter);
        store.set_hostcall_fuel(self.identity.bounds.max_hostcall_bytes());
        store.set_max_component_handles(MAX_HANDLES);
        store.epoch_deadline_callback(next_deadline);
        // Guests run on the host's async worker threads: a CPU-bound call must hand its
        // thread and its turn back now and then, or busy plugins would stall ingest and
        // every other plugin.
        store
            .fuel_async_yield_interval(Some(FUEL_PER_TIMESLICE))
            .map_err(|e| Failure::new(FailureKind::Host, format!("cannot set yielding: {e}")))?;
        arm(&mut store, limits)?;
        match self.pre.instantiate_async(&mut store).await {
            Ok(exports) => Ok(Instance {
                store,
                exports,
                calls: 0,
            }),
            Err(error) => Err(classify(&error, store.data(), limits)),
        }
    }

    /// A warm instance from the pool in `reuse` mode.
    fn warm_instance(&self) -> Option<Instance> {
        match self.settings.isolation {
            Isolation::Reuse { .. } => self.warm_pool().pop(),
            Isolation::PerEvent => None,
        }
    }

    /// Puts an instance back (or drops it) after it served `calls` calls, and returns the
    /// fuel they burned.
    fn put_back(
        &self,
        slot: Option<Instance>,
        limits: PluginLimits,
        healthy: bool,
        calls: u64,
    ) -> u64 {
        let Some(mut instance) = slot else {
            return 0;
        };
        let fuel_used = limits
            .fuel
            .saturating_add(instance.store.data().fuel_refilled())
            .saturating_sub(instance.store.get_fuel().unwrap_or(0));
        instance.calls += calls;
        self.release(instance, healthy);
        fuel_used
    }

    fn release(&self, instance: Instance, healthy: bool) {
        if let Isolation::Reuse { max_calls } = self.settings.isolation {
            if healthy && instance.calls < max_calls {
                self.warm_pool().push(instance);
            } else {
                self.recycled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Calls `describe()` on a fresh instance and checks what it returns.
    async fn describe(&self) -> Result<PluginInfo, LoadErrorReason> {
        let limits = self.settings.limits;
        let describe = async {
            let mut instance = self.instantiate().await?;
            let info = instance
                .exports
                .describe(&mut instance.store)
                .await
                .map_err(|e| classify(&e, instance.store.data(), limits))?;
            Ok::<_, Failure>(info)
        };
        let info = tokio::time::timeout(overall_timeout(limits), describe)
            .await
            .map_err(|_| LoadErrorReason::Describe(timeout_failure(limits)))?
            .map_err(LoadErrorReason::Describe)?;
        let subscriptions = info
            .subscriptions
            .iter()
            .map(|p| Pattern::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PluginInfo {
            name: info.name,
            version: info.version,
            subscriptions,
            contract: self.info.contract,
            imports: self.info.imports.clone(),
        })
    }
}

pin_project_lite::pin_project! {
    /// `inner` cut off at `deadline`, like `tokio::time::timeout`, but the timer is only
    /// registered once `inner` has to wait: most calls finish in their first poll and
    /// then cost no timer at all. A run moves the deadline on for each of its calls
    /// ([`CallClock::move_deadline`]).
    struct Within<'a, F> {
        #[pin]
        inner: F,
        deadline: tokio::time::Instant,
        clock: &'a CallClock,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<'a, F> Within<'a, F> {
    /// `inner` cut off at the plugin's overall timeout after the call's start.
    fn new(inner: F, clock: &'a CallClock, limits: PluginLimits) -> Self {
        Self {
            inner,
            deadline: tokio::time::Instant::from_std(clock.started()) + overall_timeout(limits),
            clock,
            timer: None,
        }
    }
}

/// Outcomes of several items whose first failed before any ran (the instance could not be
/// made or armed): the others run again alone.
fn first_failed(count: usize, failure: Failure) -> Vec<Option<Result<Effects, Failure>>> {
    let mut outcomes = vec![None; count];
    if let Some(first) = outcomes.first_mut() {
        *first = Some(Err(failure));
    }
    outcomes
}

/// Outcomes of a batch or a run cut off by the timeout mid-call: the item it was in
/// timed out; the ones before it stand.
fn cut_off(
    slot: &mut Option<Instance>,
    count: usize,
    limits: PluginLimits,
) -> Vec<Option<Result<Effects, Failure>>> {
    match slot {
        Some(instance) => {
            instance
                .store
                .data_mut()
                .end_batch(Some(timeout_failure(limits)))
                .0
        }
        None => vec![None; count],
    }
}

impl BatchOutcome {
    fn of(
        items: Vec<Option<Result<Effects, Failure>>>,
        fuel_used: u64,
        clock: &CallClock,
        timed_out: bool,
    ) -> Self {
        Self {
            items,
            fuel_used,
            started: clock.started(),
            duration: call_duration(clock, timed_out),
            cpu: clock.cpu(),
            calls: Vec::new(),
        }
    }
}

/// A call's wall-clock time: up to the end of its last poll, or, for a call cut off by
/// the timeout (whose last poll ended before the cut), up to now.
fn call_duration(clock: &CallClock, timed_out: bool) -> Duration {
    if timed_out {
        clock.started().elapsed()
    } else {
        clock.elapsed()
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.inner.poll(cx) {
            return Poll::Ready(Some(output));
        }
        let deadline = match this.clock.moved_deadline() {
            Some(moved) => (*this.deadline).max(tokio::time::Instant::from_std(moved)),
            None => *this.deadline,
        };
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() < deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Fuel a guest burns before it yields its worker thread and its turn at the CPU gate:
/// about a tenth of a millisecond of compiled code, the longest one guest holds a worker
/// thread at a stretch.
const FUEL_PER_TIMESLICE: u64 = 100_000;

/// Gives a store a full fuel budget and a fresh epoch deadline.
fn arm(store: &mut Store<HostState>, limits: PluginLimits) -> Result<(), Failure> {
    store
        .set_fuel(limits.fuel)
        .map_err(|e| Failure::new(FailureKind::Host, format!("cannot set fuel: {e}")))?;
    store.set_epoch_deadline(deadline_ticks(limits.timeout));
    Ok(())
}

/// At a call's epoch deadline: a batch item that has time left (an earlier item's
/// deadline passed while this one runs) goes on until its own; anything else is stopped
/// as timed out.
fn next_deadline(store: StoreContextMut<'_, HostState>) -> wasmtime::Result<UpdateDeadline> {
    match store.data().batch_item_time_left() {
        Some(left) if !left.is_zero() => Ok(UpdateDeadline::Continue(deadline_ticks(left))),
        _ => Err(Trap::Interrupt.into()),
    }
}

fn deadline_ticks(timeout: Duration) -> u64 {
    let ticks = timeout.as_nanos().div_ceil(EPOCH_TICK.as_nanos());
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

/// Whether an instance is fit for another call after a call failed this way: only the
/// handler's own errors leave it as it was.
fn leaves_instance_healthy(failure: &Failure) -> bool {
    matches!(failure.kind, FailureKind::Retry | FailureKind::Reject)
}

/// The tokio timeout sits two ticks past the epoch deadline, so CPU-bound guests are
/// stopped by the epoch (leaving a clean trap) and only host-side waits hit this one.
fn overall_timeout(limits: PluginLimits) -> Duration {
    limits.timeout + EPOCH_TICK * 2
}

fn timeout_failure(limits: PluginLimits) -> Failure {
    Failure::new(
        FailureKind::Timeout,
        format!(
            "did not finish within {}",
            humantime::format_duration(limits.timeout)
        ),
    )
}

/// How wasmtime says a call into the host carried more than the hostcall fuel allows.
const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

/// Turns a wasmtime error from instantiation or a call into a failure kind and message.
fn classify(error: &wasmtime::Error, state: &HostState, limits: PluginLimits) -> Failure {
    if state.limiter.hit() {
        return Failure::new(
            FailureKind::Memory,
            format!(
                "memory limit of {} bytes exceeded",
                state.limiter.max_bytes()
            ),
        );
    }
    if let Some(trap) = error.downcast_ref::<HostTrap>() {
        return match trap {
            HostTrap::Effects(message) => Failure::new(FailureKind::Effects, message.clone()),
            HostTrap::Loop(message) => Failure::new(FailureKind::Loop, message.clone()),
            HostTrap::Host(message) => Failure::new(FailureKind::Host, message.clone()),
        };
    }
    let text = format!("{error:#}");
    // wasmtime's own refusal of a call into the host that carries more than the store's
    // hostcall fuel; its error type is private, its text is not.
    if text.contains(HOSTCALL_FUEL_EXHAUSTED) {
        return Failure::new(
            FailureKind::Effects,
            format!(
                "a call into the host carried more than {} bytes (the largest emit or KV \
                 value allowed, and 1 MiB for names)",
                state.max_hostcall_bytes()
            ),
        );
    }
    if HANDLES_EXHAUSTED
        .iter()
        .any(|exhausted| text.contains(exhausted))
    {
        return Failure::new(
            FailureKind::Memory,
            format!(
                "more than {MAX_HANDLES} handles (WASI timers, streams and other resources) \
                 held at once"
            ),
        );
    }
    if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
        return Failure::new(FailureKind::Host, format!("no instance available: {error}"));
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Failure::new(
            FailureKind::Fuel,
            format!("fuel budget of {} exhausted", limits.fuel),
        ),
        Some(Trap::Interrupt) => timeout_failure(limits),
        Some(trap) => Failure::new(FailureKind::Trap, with_stderr(trap.to_string(), state)),
        None => Failure::new(FailureKind::Trap, with_stderr(text, state)),
    }
}

/// Appends the last lines the plugin wrote to stderr, where a panic message lands.
fn with_stderr(message: String, state: &HostState) -> String {
    let tail = state.stderr_tail.take();
    if let Some(report) = uncaught_exception(&tail) {
        return report;
    }
    // Rust's panic hook adds a hint about RUST_BACKTRACE, which means nothing in a plugin.
    let last: Vec<&str> = tail
        .lines()
        .rev()
        .filter(|line| !line.starts_with("note: run with `RUST_BACKTRACE"))
        .take(2)
        .collect();
    if last.is_empty() {
        return message;
    }
    let last: Vec<&str> = last.into_iter().rev().collect();
    format!("{message} (stderr: {})", last.join(" / "))
}

/// Lines the Python and JavaScript runtimes print after an uncaught exception's report,
/// on their way to the trap; they say nothing to the plugin's author.
const RUNTIME_NOISE: &[&str] = &[
    "thread '<unnamed>'",
    "Python function threw an unexpected exception",
    "note: run with `RUST_BACKTRACE",
    "invalid variant tag value",
    "Stack:",
    "Redirecting call to abort()",
];

/// The report of an uncaught Python or JavaScript exception in what the call printed to
/// stderr: `uncaught <type>: <message>` followed by the traceback or stack. Python's
/// runtime prints a `Traceback (most recent call last):` block; the JavaScript SDK
/// prints `Uncaught <type>: <message>` and the stack.
fn uncaught_exception(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr.lines().collect();
    let start = lines.iter().rposition(|line| {
        line.starts_with("Traceback (most recent call last):") || line.starts_with("Uncaught ")
    })?;
    let report: Vec<&str> = lines[start..]
        .iter()
        .copied()
        .take_while(|line| !RUNTIME_NOISE.iter().any(|noise| line.starts_with(noise)))
        .filter(|line| !line.trim().is_empty())
        .collect();
    let (summary, body) = match report.first()?.strip_prefix("Uncaught ") {
        Some(summary) => (summary, &report[1..]),
        // Python's summary is the first line after the frames (which are indented), such
        // as `KeyError: 'missing'`; a message of several lines, or notes, follow it.
        None => {
            let after_frames = report
                .iter()
                .rposition(|line| line.starts_with(' '))
                .map_or(1, |last_frame| last_frame + 1);
            (*report.get(after_frames)?, &report[..])
        }
    };
    Some(
        format!("uncaught {summary}\n{}", body.join("\n"))
            .trim_end()
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn uncaught_exceptions_are_reported_without_the_runtimes_noise() {
        let python = "Traceback (most recent call last):\n  File \"/0/app.py\", line 18, in handle\nKeyError: 'missing'\n\nthread '<unnamed>' (1) panicked at runtime/src/lib.rs:1293:29:\nPython function threw an unexpected exception\n";
        assert_eq!(
            super::uncaught_exception(python).as_deref(),
            Some(
                "uncaught KeyError: 'missing'\nTraceback (most recent call last):\n  File \"/0/app.py\", line 18, in handle\nKeyError: 'missing'"
            )
        );
        let js = "Uncaught TypeError: order is null\nhandle@app.js:17:48\ninvalid variant tag value `undefined`\nStack:\nRedirecting call to abort() to mozalloc_abort\n";
        assert_eq!(
            super::uncaught_exception(js).as_deref(),
            Some("uncaught TypeError: order is null\nhandle@app.js:17:48")
        );
        assert_eq!(
            super::uncaught_exception("thread 'main' panicked at src/lib.rs:1:1:\nboom\n"),
            None
        );
        // A message of several lines is summarised by its first.
        let lines = "Traceback (most recent call last):\n  File \"/0/app.py\", line 3, in handle\n    raise ValueError(\"bad\\ndetail\")\nValueError: bad\ndetail\n";
        assert_eq!(
            super::uncaught_exception(lines)
                .as_deref()
                .and_then(|r| r.lines().next()),
            Some("uncaught ValueError: bad")
        );
    }
}
