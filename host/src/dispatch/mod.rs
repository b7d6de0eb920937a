//! The dispatcher: one consumer per plugin, feeding its events into the runtime and
//! settling each attempt on the bus.
//!
//! Per plugin, a fetch task pulls deliveries from the plugin's [`Consumer`] into a
//! bounded channel. At most `concurrency` calls of the plugin run at once (a semaphore
//! held for the call, not for the settlement that follows; the consumer's window bounds
//! deliveries not yet settled). Plugins never share a consumer, a channel or a
//! semaphore, so a slow or failing plugin holds back no other.
//!
//! With `ordering = "none"`, `concurrency` lanes each take the next delivery, call the
//! plugin and drive the settlement while they call the next: a delivery costs no task
//! of its own. The fetch task hands each read of the consumer to the lanes as one chunk.
//! A lane gathers its acknowledged attempts that read no writes in flight while more
//! deliveries are ready (at most [`GROUP_MAX`], for at most a slice) and settles them
//! with one call of the bus ([`Consumer::settle_all`]) and one update of the metrics;
//! any other attempt (a failure, a read of writes in flight, a traced one) first ends the
//! group, then settles alone. The only lane of a plugin with a reused instance takes the
//! deliveries ready when it starts a call as one run ([`Plugin::invoke_run`]): one call
//! of `handle` each, as if each were invoked alone, for up to a slice; each then settles
//! as a batch item does, and those the run did not call are the lane's next. A lane
//! yields to its thread's other tasks after [`LANE_SLICE`] of calls back to back, so the
//! tasks its settlements woke are not held behind it. With `ordering = "key"`, a routing
//! loop keeps one delivery per key in flight, each in its own task, and parks later
//! events of that key in log order; a delivery waiting for its retry keeps its key held,
//! so a later event of the key cannot overtake it. (A retry
//! pending from before a restart does not hold its key: the restarted dispatcher learns
//! of it when it is due. Nor does one whose event retention deleted: the router asks the
//! consumer every [`RETRY_CHECK`] which of the retries it waits for may still come. On a
//! bus that hands out nothing else of the plugin until a retry is settled, on whichever
//! host, a retry lets its key go at once: NATS, where another host may take the retry.)
//!
//! With a `[batch]` table (and a plugin that exports the batch handler), a call takes a
//! batch: a lane gathers up to `max_size` deliveries, waiting up to `linger`, and the key
//! router gathers deliveries of distinct keys. Each item of a batch then settles like a
//! lone attempt ([`finish`]: a conflict runs that item again alone); items the call did
//! not handle (after a trap in an earlier item) run alone ([`handle`]).
//!
//! Before a call starts, the plugin's [`valve::Valve`] says whether it may: an
//! operator's pause or an open circuit breaker holds calls (and so the plugin's
//! deliveries) until it lets them through; see that module.
//!
//! KV is optimistic: an acknowledgement commits only if what the attempt read is still
//! committed. When another call of the same plugin changed it first, the attempt runs
//! again on the new state (up to a bound, then it counts as a failed attempt), so
//! concurrent calls never lose each other's updates. A call reads the writes of the
//! plugin's earlier acknowledged calls even while their commits are in flight, and
//! commits after them (see `pending`), so calls that never overlap never conflict.
//!
//! Each attempt ends in exactly one settlement: success commits the effects with the
//! acknowledgement; a retryable failure schedules a retry with the plugin's backoff, or
//! dead-letters the event when attempts or age run out; `reject` and effects violations
//! dead-letter at once. A settlement the bus cannot store is retried until it is, or
//! until shutdown (the event is then delivered again after restart: at-least-once).

mod pending;
pub mod valve;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::bus::{
    Bus, BusError, Consumer, ConsumerSpec, DeadLetterReason, Delivery, Notice, NoticeOutcome,
    Settled, Settlement, StartPosition,
};
use crate::clock::{now_ms, now_us};
use crate::effects::Effects;
use crate::event::PARTITION_KEY;
use crate::failure::{AttemptError, FailureKind};
use crate::kv::{KvError, KvSource};
use crate::metrics::{Cost, Handled, Metrics};
use crate::pattern::Pattern;
use crate::policy::batch::BatchPolicy;
use crate::policy::retry::RetryDecision;
use crate::policy::{Ordering, PluginPolicy, Start};
use crate::runtime::{self, Plugin};
use crate::schema::Schemas;
use crate::stream::{STREAM_VERSION, StreamPage, VersionConflict};
use crate::telemetry;

use self::pending::{Overlay, PendingCommit, PendingWrites};
use self::valve::Valve;

/// Live state of one plugin's dispatcher, for status and metrics.
#[derive(Debug, Default)]
pub struct DispatchState {
    in_flight: AtomicU64,
    last_error: Mutex<Option<AttemptError>>,
    recent_errors: Mutex<VecDeque<(String, AttemptError)>>,
}

/// Failed attempts a plugin's state remembers for its status.
pub const RECENT_ERRORS: usize = 20;

impl DispatchState {
    /// Deliveries being handled now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(AtomicOrdering::Relaxed)
    }

    /// The latest failed attempts with their events' ids, oldest first.
    pub fn recent_errors(&self) -> Vec<(String, AttemptError)> {
        self.recent_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// The most recent failed attempt.
    pub fn last_error(&self) -> Option<AttemptError> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What one plugin's dispatcher needs.
pub struct Target {
    /// The plugin's name; its consumer, retries, dead letters and KV belong to it.
    pub name: String,
    /// The loaded plugin.
    pub plugin: Arc<Plugin>,
    /// Its policy.
    pub policy: PluginPolicy,
    /// The patterns it receives.
    pub subscriptions: Vec<Pattern>,
    /// Shared live state.
    pub state: Arc<DispatchState>,
    /// The schema registry emitted events are checked against.
    pub schemas: Arc<Schemas>,
    /// The plugin's pause and breaker.
    pub valve: Arc<Valve>,
}

/// A running dispatcher of one plugin.
pub struct Dispatcher {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Dispatcher {
    /// Opens the plugin's consumer, then starts dispatching to it. Returns once the
    /// consumer exists, so a plugin that starts at the `latest` event sees every event
    /// appended after this returns.
    pub async fn start(
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
        target: Target,
    ) -> Result<Self, BusError> {
        let spec = ConsumerSpec {
            patterns: target.subscriptions.clone(),
            start: match target.policy.start {
                Start::Latest => StartPosition::Latest,
                Start::Earliest => StartPosition::Earliest,
            },
            window: window(&target.policy),
            one_at_a_time: target.policy.ordering == Ordering::Key,
        };
        // A probe's lease covers a whole attempt with its conflict reruns (or a whole
        // batch, whose items each have the plugin's time), whatever the plugin's timeout.
        let calls = target
            .policy
            .batch
            .map_or(0, |batch| u32::try_from(batch.max_size).unwrap_or(u32::MAX))
            .max(MAX_CONFLICT_RUNS);
        let probe_lease = target
            .policy
            .settings
            .limits
            .timeout
            .saturating_mul(calls)
            .saturating_add(Duration::from_secs(10));
        target
            .valve
            .serve(target.policy.breaker, probe_lease)
            .await?;
        let consumer = bus.consumer(&target.name, spec).await?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(bus, consumer, metrics, target, stopped));
        Ok(Self { stop, task })
    }

    /// Stops fetching, lets in-flight deliveries finish within `grace` and settles them.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// New deliveries a plugin's consumer may have out and unsettled.
fn window(policy: &PluginPolicy) -> usize {
    // Deep enough to keep calls busy while earlier settlements wait for a group commit,
    // and to pull from a remote log in large requests (whose commits then group well);
    // with batches, for a full batch to gather while the one before it settles.
    let batches = policy
        .batch
        .map_or(0, |batch| batch.max_size.saturating_mul(2));
    policy
        .concurrency
        .max(1)
        .saturating_mul(32)
        .max(256)
        .max(batches)
}

fn ordering_key(delivery: &Delivery) -> String {
    let event = &delivery.stored.event;
    event
        .extension(PARTITION_KEY)
        .or(event.subject.as_deref())
        .unwrap_or("")
        .to_owned()
}

/// Which key, if any, a finished delivery held, and whether it released it.
struct Finished {
    key: Option<String>,
    sequence: u64,
    released: bool,
}

async fn run(
    bus: Arc<dyn Bus>,
    consumer: Arc<dyn Consumer>,
    metrics: Arc<Metrics>,
    target: Target,
    stopped: watch::Receiver<bool>,
) {
    let concurrency = target.policy.concurrency.max(1);
    // Fetching a whole window at a time costs one log read per window rather than one
    // per delivery, and the channel takes it at once; the consumer's window bounds what
    // is fetched and not yet settled.
    let window = window(&target.policy);
    let (deliveries, incoming) = mpsc::channel::<Vec<Delivery>>(window);
    let fetcher = tokio::spawn(fetch(
        Arc::clone(&consumer),
        deliveries,
        window,
        stopped.clone(),
        target.name.clone(),
    ));

    let context = Arc::new(Context {
        kv: Arc::new(BusKv(Arc::clone(&bus))),
        bus,
        schemas: Arc::clone(&target.schemas),
        consumer,
        metrics,
        plugin: Arc::clone(&target.plugin),
        policy: target.policy.clone(),
        name: target.name.clone(),
        state: Arc::clone(&target.state),
        permits: Arc::new(Semaphore::new(concurrency)),
        rerun_turn: tokio::sync::Mutex::new(()),
        valve: Arc::clone(&target.valve),
        stopped: stopped.clone(),
        pending: Arc::default(),
    });
    let releasing = Arc::clone(&context.consumer);
    // A `[batch]` table is only followed for a plugin that exports the batch handler.
    let batch = target
        .policy
        .batch
        .filter(|_| context.plugin.takes_batches());
    if target.policy.batch.is_some() && batch.is_none() {
        tracing::warn!(plugin = %target.name, "the sidecar asks for batches, but the plugin exports no batch handler (switchyard:plugin/batch-handler): one event per call");
    }
    let batch = batch.filter(|_| !context.consumer.hands_out_one_at_a_time());
    if batch.is_none() && context.plugin.takes_batches() && target.policy.batch.is_some() {
        tracing::warn!(plugin = %target.name, "the sidecar asks for batches, but with `ordering = \"key\"` this bus hands out one event of the plugin at a time, so a batch would hold one event and only add its linger: one event per call");
    }
    if target.policy.ordering == Ordering::Key {
        route_by_key(context, incoming, stopped, batch).await;
    } else {
        let incoming = Incoming {
            chunks: incoming,
            ready: VecDeque::new(),
        };
        run_lanes(context, incoming, stopped, concurrency, batch).await;
    }
    // Only once the fetch task is gone: it could start a pull that takes back what is
    // released (NATS hands a released message to any pull request waiting).
    fetcher.abort();
    let _ = fetcher.await;
    // What was fetched and never run (held by a pause or an open breaker, or waiting in
    // the channel) goes back now rather than after the bus's lease on it runs out.
    releasing.release().await;
}

/// `ordering = "none"`: `concurrency` lanes, each taking the next delivery, calling the
/// plugin and settling while it calls the next. A lane drives its own settlements, so a
/// delivery costs no task of its own and no hand-off between tasks.
async fn run_lanes(
    context: Arc<Context>,
    incoming: Incoming,
    mut stopped: watch::Receiver<bool>,
    lanes: usize,
    batch: Option<BatchPolicy>,
) {
    let incoming = Arc::new(tokio::sync::Mutex::new(incoming));
    let mut running = JoinSet::new();
    for _ in 0..lanes {
        let (context, incoming, stopped) =
            (Arc::clone(&context), Arc::clone(&incoming), stopped.clone());
        match batch {
            Some(batch) => running.spawn(batch_lane(context, incoming, stopped, batch)),
            None => running.spawn(lane(context, incoming, stopped)),
        };
    }
    tokio::select! {
        _ = stopped.changed() => {}
        () = async { while running.join_next().await.is_some() {} } => return,
    }
    // Calls waiting for a permit (reruns) never start; the ones in flight finish and
    // settle (the caller bounds how long). Unsettled ones are delivered after restart.
    context.permits.close();
    while running.join_next().await.is_some() {}
}

/// Awaits `call` while driving a lane's settlements, so they go on meanwhile.
async fn driving<T, S: std::future::Future>(
    call: impl std::future::Future<Output = T>,
    settling: &mut FuturesUnordered<S>,
) -> T {
    tokio::pin!(call);
    loop {
        tokio::select! {
            biased;
            output = &mut call => return output,
            Some(_) = settling.next(), if !settling.is_empty() => {}
        }
    }
}

/// Longest a lane runs calls back to back before it lets the other tasks of its thread run.
const LANE_SLICE: Duration = Duration::from_micros(100);

/// The time a lane has run calls back to back, told by the start times its calls already
/// read, so that keeping it reads no clock.
#[derive(Default)]
struct Slice {
    started: Option<Instant>,
}

impl Slice {
    /// Counts a call (or a batch call) that started at `call_started`; whether the slice
    /// is over.
    fn count(&mut self, call_started: Instant) -> bool {
        let first = *self.started.get_or_insert(call_started);
        call_started.saturating_duration_since(first) >= LANE_SLICE
    }
}

/// Most acknowledged attempts a lane settles together.
const GROUP_MAX: usize = 64;

/// Deliveries fetched for a plugin's lanes. The fetch task sends what each read of the
/// consumer returned as one chunk, so a hand-off between tasks costs one message per read
/// rather than one per delivery; a lane takes deliveries one by one from the chunk.
struct Incoming {
    chunks: mpsc::Receiver<Vec<Delivery>>,
    ready: VecDeque<Delivery>,
}

impl Incoming {
    /// The next delivery, waiting for one; `None` once fetching has ended.
    async fn next(&mut self) -> Option<Delivery> {
        if let Some(delivery) = self.ready.pop_front() {
            return Some(delivery);
        }
        let chunk = self.chunks.recv().await?;
        self.ready.extend(chunk);
        self.ready.pop_front()
    }

    /// The next delivery if one is already fetched.
    fn try_next(&mut self) -> Option<Delivery> {
        if self.ready.is_empty() {
            let chunk = self.chunks.try_recv().ok()?;
            self.ready.extend(chunk);
        }
        self.ready.pop_front()
    }

    /// Moves deliveries already fetched into `run` until it holds one less than
    /// [`GROUP_MAX`] (the run's first is the lane's own).
    fn take_ready(&mut self, run: &mut VecDeque<Delivery>) {
        if self.ready.is_empty()
            && let Ok(chunk) = self.chunks.try_recv()
        {
            self.ready.extend(chunk);
        }
        let take = (GROUP_MAX - 1)
            .saturating_sub(run.len())
            .min(self.ready.len());
        run.extend(self.ready.drain(..take));
    }
}

type Settling = FuturesUnordered<futures_util::future::BoxFuture<'static, ()>>;

/// Drives whichever of a lane's settlements can go on, without waiting for any.
async fn drive_settling(settling: &mut Settling) {
    std::future::poll_fn(|cx| {
        while let std::task::Poll::Ready(Some(())) = settling.poll_next_unpin(cx) {}
        std::task::Poll::Ready(())
    })
    .await;
}

/// Starts settling a lane's group of acknowledged attempts, if it has any.
fn flush(context: &Arc<Context>, group: &mut Vec<(Delivery, Called)>, settling: &mut Settling) {
    if !group.is_empty() {
        settling.push(settle_group(Arc::clone(context), std::mem::take(group)).boxed());
    }
}

/// Settles a lane's attempt: an acknowledgement that read nothing in flight, overwrites no
/// held-back write (see `pending`) and is not traced joins the lane's group, which is
/// settled together ([`settle_group`]); any other first ends the group, so nothing it
/// holds waits behind it, and settles alone.
fn settle_lane_attempt(
    context: &Arc<Context>,
    delivery: Delivery,
    called: Called,
    group: &mut Vec<(Delivery, Called)>,
    settling: &mut Settling,
) {
    let joins_group = matches!(called.attempt.settlement, Settlement::Ack(_))
        && called.attempt.read.is_none()
        && !called
            .attempt
            .pending
            .as_ref()
            .is_some_and(PendingCommit::follows_earlier_writes)
        && called.span.is_disabled();
    if joins_group {
        group.push((delivery, called));
        if group.len() >= GROUP_MAX {
            flush(context, group, settling);
        }
    } else {
        flush(context, group, settling);
        settling.push(
            finish(Arc::clone(context), delivery, None, called, None)
                .map(drop)
                .boxed(),
        );
    }
}

async fn lane(
    context: Arc<Context>,
    incoming: Arc<tokio::sync::Mutex<Incoming>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut settling = Settling::new();
    let mut group = Vec::with_capacity(GROUP_MAX);
    let mut slice = Slice::default();
    let takes_runs = context.policy.concurrency <= 1
        && matches!(
            context.plugin.settings().isolation,
            runtime::Isolation::Reuse { .. }
        );
    // Deliveries this lane took for a run that the run did not call: the lane's next.
    let mut left: VecDeque<Delivery> = VecDeque::new();
    loop {
        drive_settling(&mut settling).await;
        if stopped.has_changed().unwrap_or(true) {
            break;
        }
        // Another lane holding the deliveries is waiting for the next chunk: nothing is
        // ready, and this lane must not wait for the lock outside the select below, which
        // also drives its settlements.
        let ready = left.pop_front().or_else(|| {
            incoming
                .try_lock()
                .ok()
                .and_then(|mut incoming| incoming.try_next())
        });
        let delivery = match ready {
            Some(delivery) => delivery,
            None => {
                // Nothing more to call now: settle what the lane holds before it waits.
                flush(&context, &mut group, &mut settling);
                let received = tokio::select! {
                    biased;
                    Some(()) = settling.next(), if !settling.is_empty() => continue,
                    _ = stopped.changed() => break,
                    received = async { incoming.lock().await.next().await } => received,
                };
                let Some(delivery) = received else { break };
                delivery
            }
        };
        // A paused plugin or an open breaker may hold the next call for long: what the
        // lane holds settles first rather than wait with it.
        if !context.valve.is_flowing() {
            flush(&context, &mut group, &mut settling);
        }
        // The only lane of a reused instance takes what else is ready in one run: one
        // call each, without the work around each call (see `Plugin::invoke_run`). Not
        // with several lanes: what a run leaves uncalled would wait for its lane while
        // the others idle. Nor with traces exported: each call is invoked alone, under
        // its own `runtime.invoke` span.
        let mut run = VecDeque::new();
        if takes_runs && !telemetry::exporting() {
            run.extend(left.drain(..left.len().min(GROUP_MAX - 1)));
            if let Ok(mut incoming) = incoming.try_lock() {
                incoming.take_ready(&mut run);
            }
        }
        let mut slice_over = false;
        if !run.is_empty() {
            run.push_front(delivery);
            let calling = batch_call(&context, run.make_contiguous(), Shape::Run);
            let Some(called) = driving(calling, &mut settling).await else {
                break;
            };
            slice_over = called
                .iter()
                .flatten()
                .next()
                .is_some_and(|called| slice.count(called.attempt.started));
            let mut not_called = Vec::new();
            for (delivery, called) in run.into_iter().zip(called) {
                match called {
                    Some(called) => {
                        settle_lane_attempt(&context, delivery, called, &mut group, &mut settling);
                    }
                    None => not_called.push(delivery),
                }
            }
            // Ahead of what the lane held back before: they came first.
            for delivery in not_called.into_iter().rev() {
                left.push_front(delivery);
            }
        } else if let Some(called) = driving(first_call(&context, &delivery), &mut settling).await {
            slice_over = slice.count(called.attempt.started);
            settle_lane_attempt(&context, delivery, called, &mut group, &mut settling);
        }
        // A lane with deliveries waiting never returns to the scheduler by itself, and a
        // task it woke on this thread (the bus client's connection, which carries its
        // acknowledgements and next pull) cannot be stolen by another thread: it waits
        // for the lane. So the lane steps aside every slice; every call would cost the
        // quick calls too much.
        if slice_over {
            flush(&context, &mut group, &mut settling);
            tokio::task::yield_now().await;
            slice = Slice::default();
        }
    }
    flush(&context, &mut group, &mut settling);
    while settling.next().await.is_some() {}
}

/// `ordering = "key"`: one delivery per key in flight, later ones parked in log order.
async fn route_by_key(
    context: Arc<Context>,
    mut incoming: mpsc::Receiver<Vec<Delivery>>,
    mut stopped: watch::Receiver<bool>,
    batch: Option<BatchPolicy>,
) {
    // Keys with a delivery in flight or waiting for its retry: the holder's sequence and
    // the later deliveries parked behind it.
    let mut held: HashMap<String, (u64, VecDeque<Delivery>)> = HashMap::new();
    // Keys whose holder waits for its retry. A retry whose event retention deleted never
    // comes, so the bus is asked now and then which still will; the others let go.
    let mut awaiting_retry: HashMap<String, u64> = HashMap::new();
    let mut retry_check = tokio::time::interval(RETRY_CHECK);
    retry_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks: JoinSet<Vec<Finished>> = JoinSet::new();
    // With `[batch]`: deliveries free to run (one per key), gathered into the next batch
    // until it is full or its linger ends.
    let mut ready: Vec<(Delivery, Option<String>)> = Vec::new();
    let mut linger_until = tokio::time::Instant::now();
    let start = |tasks: &mut JoinSet<Vec<Finished>>,
                 ready: &mut Vec<(Delivery, Option<String>)>,
                 delivery: Delivery,
                 key: String,
                 linger_until: &mut tokio::time::Instant| {
        match batch {
            None => {
                tasks.spawn(handle(Arc::clone(&context), delivery, Some(key)).map(|f| vec![f]));
            }
            Some(policy) => {
                if ready.is_empty() {
                    *linger_until = tokio::time::Instant::now() + policy.linger;
                }
                ready.push((delivery, Some(key)));
                if ready.len() >= policy.max_size {
                    tasks.spawn(run_batch(Arc::clone(&context), std::mem::take(ready)));
                }
            }
        }
    };

    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            () = tokio::time::sleep_until(linger_until), if !ready.is_empty() => {
                tasks.spawn(run_batch(Arc::clone(&context), std::mem::take(&mut ready)));
            }
            received = incoming.recv() => {
                let Some(chunk) = received else { break };
                for delivery in chunk {
                    let key = ordering_key(&delivery);
                    if awaiting_retry.get(&key) == Some(&delivery.stored.sequence) {
                        awaiting_retry.remove(&key);
                    }
                    match held.get_mut(&key) {
                        Some((holder, parked)) if *holder != delivery.stored.sequence => {
                            parked.push_back(delivery);
                            continue;
                        }
                        Some(_) => {}
                        None => {
                            held.insert(key.clone(), (delivery.stored.sequence, VecDeque::new()));
                        }
                    }
                    start(&mut tasks, &mut ready, delivery, key, &mut linger_until);
                }
            }
            Some(finished) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok(finished) = finished else { continue };
                for Finished { key, sequence, released } in finished {
                    let Some(key) = key else { continue };
                    if !released {
                        if held.get(&key).is_some_and(|(holder, _)| *holder == sequence) {
                            awaiting_retry.insert(key, sequence);
                        }
                        continue;
                    }
                    if let Some(next) = next_of_key(&mut held, &key, sequence) {
                        start(&mut tasks, &mut ready, next, key, &mut linger_until);
                    }
                }
            }
            _ = retry_check.tick(), if !awaiting_retry.is_empty() => {
                let sequences: Vec<u64> = awaiting_retry.values().copied().collect();
                let Ok(pending) = context.consumer.retries_pending(&sequences).await else {
                    continue;
                };
                let gone: Vec<(String, u64)> = awaiting_retry
                    .iter()
                    .filter(|(_, sequence)| !pending.contains(sequence))
                    .map(|(key, sequence)| (key.clone(), *sequence))
                    .collect();
                for (key, sequence) in gone {
                    awaiting_retry.remove(&key);
                    tracing::warn!(plugin = %context.name, sequence, "the event waiting for its retry is gone from the log (retention): the next events of its key go on");
                    if let Some(next) = next_of_key(&mut held, &key, sequence) {
                        start(&mut tasks, &mut ready, next, key, &mut linger_until);
                    }
                }
            }
        }
    }
    // Deliveries still waiting for a permit never start; the ones in flight finish and
    // settle (the caller bounds how long). Unsettled ones are delivered after restart.
    context.permits.close();
    while tasks.join_next().await.is_some() {}
}

/// How often a key router asks the bus whether the retries its keys wait for still come.
const RETRY_CHECK: Duration = Duration::from_secs(10);

/// `sequence` lets go of `key`: the next delivery parked behind it, which now holds the
/// key, or `None` (the key is free, or `sequence` did not hold it).
fn next_of_key(
    held: &mut HashMap<String, (u64, VecDeque<Delivery>)>,
    key: &str,
    sequence: u64,
) -> Option<Delivery> {
    let (holder, parked) = held.get_mut(key)?;
    if *holder != sequence {
        return None;
    }
    match parked.pop_front() {
        Some(next) => {
            *holder = next.stored.sequence;
            Some(next)
        }
        None => {
            held.remove(key);
            None
        }
    }
}

async fn fetch(
    consumer: Arc<dyn Consumer>,
    deliveries: mpsc::Sender<Vec<Delivery>>,
    batch: usize,
    mut stopped: watch::Receiver<bool>,
    plugin: String,
) {
    loop {
        let next = tokio::select! {
            _ = stopped.changed() => return,
            next = consumer.next(batch) => next,
        };
        match next {
            Ok(batch) if batch.is_empty() => {}
            Ok(batch) => {
                if deliveries.send(batch).await.is_err() {
                    return;
                }
            }
            Err(BusError::Closed) => return,
            Err(error) => {
                tracing::error!(%plugin, %error, "cannot read the plugin's next events; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

struct Context {
    kv: Arc<dyn KvSource>,
    /// For settlement notices.
    bus: Arc<dyn Bus>,
    schemas: Arc<Schemas>,
    consumer: Arc<dyn Consumer>,
    metrics: Arc<Metrics>,
    plugin: Arc<Plugin>,
    policy: PluginPolicy,
    name: String,
    state: Arc<DispatchState>,
    permits: Arc<Semaphore>,
    rerun_turn: tokio::sync::Mutex<()>,
    valve: Arc<Valve>,
    /// Ends a wait at the valve on shutdown.
    stopped: watch::Receiver<bool>,
    /// KV writes of acknowledged calls whose commits are in flight.
    pending: Arc<PendingWrites>,
}

/// How long ago `at_us` (microseconds since the Unix epoch) was; zero if in the future.
fn since(at_us: i64) -> Duration {
    between(at_us, now_us())
}

/// The time from `at_us` to `now_us`; zero if `at_us` is later.
fn between(at_us: i64, now_us: i64) -> Duration {
    Duration::from_micros(u64::try_from(now_us.saturating_sub(at_us)).unwrap_or(0))
}

/// Runs deliveries of distinct keys as one batch call and settles each.
async fn run_batch(
    context: Arc<Context>,
    deliveries: Vec<(Delivery, Option<String>)>,
) -> Vec<Finished> {
    let (deliveries, keys): (Vec<Delivery>, Vec<Option<String>>) = deliveries.into_iter().unzip();
    match batch_call(&context, &deliveries, Shape::Batch).await {
        Some(called) => settle_batch(context, deliveries, keys, called).await,
        None => deliveries
            .into_iter()
            .zip(keys)
            .map(|(delivery, key)| Finished {
                key,
                sequence: delivery.stored.sequence,
                released: false,
            })
            .collect(),
    }
}

/// Runs one attempt and settles it.
async fn handle(context: Arc<Context>, delivery: Delivery, key: Option<String>) -> Finished {
    match first_call(&context, &delivery).await {
        Some(called) => finish(context, delivery, key, called, None).await,
        None => Finished {
            key,
            sequence: delivery.stored.sequence,
            released: false,
        },
    }
}

/// An attempt that has run, how long after ingest it started, and its span.
struct Called {
    start_latency: Duration,
    attempt: Attempted,
    span: tracing::Span,
}

/// How an attempt ends, its outcome's name, what it cost, and its place among the
/// plugin's commits in flight.
struct Attempted {
    settlement: Settlement,
    outcome: &'static str,
    cost: Cost,
    /// When its call started.
    started: Instant,
    /// The pending writes it read (its commit waits for theirs to end).
    read: Option<Arc<Overlay>>,
    /// Its own KV writes, which the plugin's next calls read until its settlement ends.
    pending: Option<PendingCommit>,
}

/// Waits until the valve lets a call start; `None` when shutting down first.
async fn admitted(context: &Context) -> Option<valve::Admission> {
    if let Some(admission) = context.valve.admit().now_or_never() {
        return Some(admission);
    }
    let mut stopped = context.stopped.clone();
    tokio::select! {
        admission = context.valve.admit() => Some(admission),
        _ = stopped.wait_for(|stop| *stop) => None,
    }
}

/// Runs a delivery's first attempt once the valve lets it and under a call permit;
/// `None` when shutting down.
async fn first_call(context: &Context, delivery: &Delivery) -> Option<Called> {
    let admission = admitted(context).await?;
    let permit = match context.permits.try_acquire() {
        Ok(permit) => permit,
        Err(_) => context.permits.acquire().await.ok()?,
    };
    context
        .state
        .in_flight
        .fetch_add(1, AtomicOrdering::Relaxed);
    let start_latency = since(delivery.stored.ingested_at_us);
    let span = deliver_span(context, delivery);
    let attempt = attempt(context, delivery).instrument(span.clone()).await;
    // `concurrency` bounds calls of the plugin, not settlements waiting for the log:
    // the next call starts while this one commits (the consumer's window bounds those).
    drop(permit);
    context
        .valve
        .record(admission, failure_of(&attempt.settlement))
        .await;
    Some(Called {
        start_latency,
        attempt,
        span,
    })
}

/// How [`batch_call`] calls the plugin for several deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One call of the batch handler.
    Batch,
    /// A run: one call of `handle` per delivery on one instance
    /// ([`runtime::Plugin::invoke_run`]).
    Run,
}

/// Runs deliveries' first attempts as one batch call or one run of the plugin, once the
/// valve lets it and under one call permit. Each item comes back with its attempt, or
/// `None` when the call did not handle it (a batch's runs alone, [`handle`]; a run's was
/// not attempted and is called again); `None` for the whole batch when shutting down.
async fn batch_call(
    context: &Context,
    deliveries: &[Delivery],
    shape: Shape,
) -> Option<Vec<Option<Called>>> {
    let admission = admitted(context).await?;
    let permit = context.permits.acquire().await.ok()?;
    let count = deliveries.len();
    context
        .state
        .in_flight
        .fetch_add(count as u64, AtomicOrdering::Relaxed);
    let now = now_us();
    let start_latencies: Vec<Duration> = deliveries
        .iter()
        .map(|delivery| between(delivery.stored.ingested_at_us, now))
        .collect();
    let (kv, read) = context.pending.reader(&context.kv);
    let items: Vec<(&crate::event::Event, runtime::Delivery)> = deliveries
        .iter()
        .map(|delivery| (&delivery.stored.event, runtime_delivery(context, delivery)))
        .collect();
    // Each item's attempt span covers the call, and what the item emits continues it.
    let mut spans: Vec<tracing::Span> = deliveries
        .iter()
        .map(|delivery| deliver_span(context, delivery))
        .collect();
    let traceparents: Vec<Option<String>> = if telemetry::exporting() {
        spans.iter().map(telemetry::traceparent_of).collect()
    } else {
        Vec::new()
    };
    let outcome = match shape {
        Shape::Batch => {
            context
                .plugin
                .invoke_batch_traced(&items, &traceparents, kv)
                .await
        }
        Shape::Run => context.plugin.invoke_run(&items, kv, LANE_SLICE).await,
    };
    let started = outcome.started;
    drop(permit);
    // Only the items the call handled: the others run again alone, and count there.
    let handled = outcome.items.iter().flatten().count();
    if shape == Shape::Batch {
        context.metrics.batch_call(&context.name, handled);
    }
    // A run's call costs what it cost; an item of a batch call (or of a run cut off at its
    // time limit) costs its share of the call. A call's CPU time is the run's in
    // proportion to its duration: the guest's time on a thread is read per poll, not per
    // call.
    let share = |total: Duration| total / u32::try_from(handled.max(1)).unwrap_or(u32::MAX);
    let shared = Cost {
        duration: share(outcome.duration),
        fuel: outcome.fuel_used / handled.max(1) as u64,
        cpu: share(outcome.cpu),
    };
    let cost_of = |index: usize| match outcome.calls.get(index) {
        Some(call) => {
            let part = call.duration.as_secs_f64() / outcome.duration.as_secs_f64();
            Cost {
                duration: call.duration,
                fuel: call.fuel,
                cpu: if part.is_finite() {
                    outcome.cpu.mul_f64(part.clamp(0.0, 1.0))
                } else {
                    Duration::ZERO
                },
            }
        }
        None => shared,
    };
    let mut failures = Vec::with_capacity(count);
    let called: Vec<Option<Called>> = deliveries
        .iter()
        .zip(outcome.items)
        .zip(start_latencies)
        .zip(spans.iter_mut())
        .enumerate()
        .map(|(index, (((delivery, item), start_latency), span))| {
            let Some(result) = item else {
                // Not handled: it runs again alone, and counts itself in then.
                context
                    .state
                    .in_flight
                    .fetch_sub(1, AtomicOrdering::Relaxed);
                return None;
            };
            let cost = cost_of(index);
            let attempt = attempted(context, delivery, result, cost, started, read.clone());
            failures.push(failure_of(&attempt.settlement).cloned());
            Some(Called {
                start_latency,
                attempt,
                span: std::mem::replace(span, tracing::Span::none()),
            })
        })
        .collect();
    let failures: Vec<Option<&AttemptError>> = failures.iter().map(Option::as_ref).collect();
    context.valve.record_batch(admission, &failures).await;
    Some(called)
}

/// Settles a batch call's items: each handled one like a lone attempt ([`finish`]: a
/// conflict runs it again alone), each one the call did not handle by running it alone.
async fn settle_batch(
    context: Arc<Context>,
    deliveries: Vec<Delivery>,
    keys: Vec<Option<String>>,
    called: Vec<Option<Called>>,
) -> Vec<Finished> {
    let settling = deliveries
        .into_iter()
        .zip(keys)
        .zip(called)
        .map(|((delivery, key), called)| {
            let context = Arc::clone(&context);
            async move {
                match called {
                    Some(called) => finish(context, delivery, key, called, None).await,
                    None => handle(context, delivery, key).await,
                }
            }
        });
    futures_util::future::join_all(settling).await
}

/// Fills a batch that starts with `first`: as many more deliveries as are waiting, up to
/// `max_size`, waiting up to `linger` for them. The deliveries it holds are taken off
/// `incoming`, so it must run to its end: dropped halfway, it would lose them.
async fn fill_batch(
    mut incoming: tokio::sync::MutexGuard<'_, Incoming>,
    first: Delivery,
    batch: BatchPolicy,
) -> Vec<Delivery> {
    let mut deliveries = Vec::with_capacity(batch.max_size);
    deliveries.push(first);
    let deadline = tokio::time::Instant::now() + batch.linger;
    while deliveries.len() < batch.max_size {
        match incoming.try_next() {
            Some(delivery) => deliveries.push(delivery),
            None => match tokio::time::timeout_at(deadline, incoming.next()).await {
                Ok(Some(delivery)) => deliveries.push(delivery),
                Ok(None) | Err(_) => break,
            },
        }
    }
    deliveries
}

/// `[batch]` with `ordering = "none"`: as [`lane`], but each call takes a batch.
async fn batch_lane(
    context: Arc<Context>,
    incoming: Arc<tokio::sync::Mutex<Incoming>>,
    mut stopped: watch::Receiver<bool>,
    batch: BatchPolicy,
) {
    let mut settling = Settling::new();
    let mut group = Vec::with_capacity(batch.max_size);
    let mut slice = Slice::default();
    loop {
        // Waiting for a batch's first delivery may stop at any point, as a lane's wait
        // does; filling the batch then runs to its end, driving settlements meanwhile.
        let (taken, first) = tokio::select! {
            biased;
            Some(()) = settling.next(), if !settling.is_empty() => continue,
            _ = stopped.changed() => break,
            first = async {
                let mut incoming = incoming.lock().await;
                let first = incoming.next().await;
                (incoming, first)
            } => first,
        };
        let Some(first) = first else { break };
        let deliveries = driving(fill_batch(taken, first, batch), &mut settling).await;
        let called = driving(
            batch_call(&context, &deliveries, Shape::Batch),
            &mut settling,
        )
        .await;
        let Some(called) = called else { break };
        // The items of a call share its start.
        let slice_over = called
            .iter()
            .flatten()
            .next()
            .is_some_and(|called| slice.count(called.attempt.started));
        for (delivery, called) in deliveries.into_iter().zip(called) {
            match called {
                Some(called) => {
                    settle_lane_attempt(&context, delivery, called, &mut group, &mut settling);
                }
                // Not handled by the call: it runs again alone.
                None => settling.push(
                    handle(Arc::clone(&context), delivery, None)
                        .map(drop)
                        .boxed(),
                ),
            }
        }
        flush(&context, &mut group, &mut settling);
        // As a lane does, every slice.
        if slice_over {
            tokio::task::yield_now().await;
            slice = Slice::default();
        }
    }
    while settling.next().await.is_some() {}
}

/// Settles a group of acknowledged attempts that read nothing in flight with one call of
/// the bus ([`Consumer::settle_all`]), then accounts for them together. An item the bus
/// refused goes on alone, as any attempt would ([`finish`]): a conflict runs it again, a
/// storage failure is retried.
async fn settle_group(context: Arc<Context>, group: Vec<(Delivery, Called)>) {
    let settlements: Vec<(&Delivery, &Settlement)> = group
        .iter()
        .map(|(delivery, called)| (delivery, &called.attempt.settlement))
        .collect();
    let results = context.consumer.settle_all(&settlements).await;
    drop(settlements);
    let mut handled = Vec::with_capacity(group.len());
    let mut refused = Vec::new();
    // The group's outcomes were all committed by the one call above.
    let committed_at = now_us();
    for ((delivery, called), result) in group.into_iter().zip(results) {
        let stored = match result {
            Err(BusError::Closed) => Ok(Settled::default()),
            other => other,
        };
        match stored {
            Ok(stored) => {
                let latency = (delivery.attempt == 1).then(|| {
                    (
                        called.start_latency,
                        between(delivery.stored.ingested_at_us, committed_at),
                    )
                });
                handled.push(Handled {
                    cost: called.attempt.cost,
                    latency,
                });
                notify(&context, &delivery, &called.attempt.settlement, &stored);
            }
            Err(conflict @ (BusError::Conflict(_) | BusError::VersionConflict(_))) => {
                refused.push(finish(
                    Arc::clone(&context),
                    delivery,
                    None,
                    called,
                    Some(conflict),
                ));
            }
            Err(_) => refused.push(finish(Arc::clone(&context), delivery, None, called, None)),
        }
    }
    context.metrics.acknowledged(&context.name, &handled);
    context
        .state
        .in_flight
        .fetch_sub(handled.len() as u64, AtomicOrdering::Relaxed);
    futures_util::future::join_all(refused).await;
}

/// The span of a delivery's attempt (disabled unless traces are exported), continuing
/// the event's trace.
fn deliver_span(context: &Context, delivery: &Delivery) -> tracing::Span {
    let event = &delivery.stored.event;
    if !telemetry::sampled(event.extension(telemetry::TRACEPARENT)) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: telemetry::FLOW,
        "dispatch.deliver",
        plugin = %context.name,
        event_id = %event.id,
        attempt = delivery.attempt
    );
    if let Some(traceparent) = event.extension(telemetry::TRACEPARENT) {
        telemetry::set_parent(&span, traceparent, event.extension(telemetry::TRACESTATE));
    }
    span
}

/// Settles an attempt, running it again while its KV reads conflict.
///
/// `conflicted` is the conflict the bus already answered to the first attempt's
/// settlement, which is then not stored again.
async fn finish(
    context: Arc<Context>,
    delivery: Delivery,
    key: Option<String>,
    called: Called,
    mut conflicted: Option<BusError>,
) -> Finished {
    let sequence = delivery.stored.sequence;
    let start_latency = called.start_latency;
    let span = called.span;
    let mut first = Some(called.attempt);
    let mut runs = 1;
    // The last run's emit whose expected version did not hold: a rerun that expects the
    // same of a stream that has not moved can never commit.
    let mut stale_emit: Option<VersionConflict> = None;
    let released = loop {
        // Reruns after a conflict take turns, so a hot key cannot starve them.
        let _turn = if first.is_none() {
            Some(context.rerun_turn.lock().await)
        } else {
            None
        };
        let Attempted {
            settlement,
            outcome: outcome_name,
            cost,
            read,
            pending,
            ..
        } = match first.take() {
            Some(attempted) => attempted,
            None => {
                runs += 1;
                // Shutting down: the delivery stays unsettled and comes back after a restart.
                let Ok(permit) = context.permits.acquire().await else {
                    break None;
                };
                let attempted = attempt(&context, &delivery).instrument(span.clone()).await;
                drop(permit);
                attempted
            }
        };
        let released = releases_key(&context, &settlement);
        let commit = if span.is_disabled() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                target: telemetry::FLOW,
                parent: &span,
                "dispatch.commit",
                plugin = %context.name,
                event_id = %delivery.stored.event.id,
                attempt = delivery.attempt,
                outcome = outcome_name
            )
        };
        let settled = match conflicted.take() {
            Some(conflict) => Err(conflict),
            None => {
                async {
                    if let Some(read) = &read {
                        read.settled().await;
                    }
                    if let Some(pending) = &pending {
                        pending.after_earlier_writes().await;
                    }
                    settle(&context, &delivery, &settlement).await
                }
                .instrument(commit)
                .await
            }
        };
        // Stored or refused, the commit has ended: its writes are no longer pending (a
        // rerun must not read its own refused writes).
        drop(pending);
        match settled {
            Err(BusError::VersionConflict(conflict)) if stale_emit.as_ref() == Some(&conflict) => {
                let message = format!(
                    "an emit expects the stream of `{}` at version {}, and it is at {}; run \
                     again on the current stream the call expected the same, so it can never \
                     commit",
                    conflict.subject, conflict.expected, conflict.current
                );
                let failed = (FailureKind::Effects, message);
                break Some(conflict_failed(&context, &delivery, cost, failed).await);
            }
            Err(conflict) if runs < MAX_CONFLICT_RUNS => {
                if let BusError::VersionConflict(stale) = &conflict {
                    stale_emit = Some(stale.clone());
                }
                // Another call of this plugin changed what this one read: its effects
                // were not committed; run the same attempt again on the new state.
                context.metrics.delivery(&context.name, "conflict", cost);
                tracing::debug!(plugin = %context.name, event_id = %delivery.stored.event.id, %conflict, "rerunning after a KV conflict");
            }
            Err(conflict)
                if context
                    .policy
                    .retry
                    .max_age
                    .is_none_or(|max_age| since(delivery.age_from_us()) < max_age) =>
            {
                // The plugin's own calls keep changing what this one reads: nothing is
                // wrong with the handler. The event goes back for later, as the same
                // attempt, and records no error.
                context.metrics.delivery(&context.name, "deferred", cost);
                tracing::warn!(
                    plugin = %context.name,
                    event_id = %delivery.stored.event.id,
                    %conflict,
                    "still conflicting after {runs} runs; handing the event back for {} ms without counting an attempt",
                    CONFLICT_DEFERRAL.as_millis()
                );
                let settlement = Settlement::Retry {
                    delay: CONFLICT_DEFERRAL,
                    errors: delivery.errors.clone(),
                };
                // A retry reads nothing, so it cannot conflict.
                let _ = settle(&context, &delivery, &settlement).await;
                break Some(releases_key(&context, &settlement));
            }
            Err(conflict) => {
                let message = format!("{conflict}; still conflicting after {runs} runs");
                let failed = (FailureKind::Host, message);
                break Some(conflict_failed(&context, &delivery, cost, failed).await);
            }
            Ok(Stored {
                settled: stored,
                instead,
            }) => {
                // Effects the bus could never store went to the dead letters instead: that
                // is the outcome to count and tell.
                let (settlement, outcome_name) = match instead {
                    Some(dead) => (dead, FailureKind::Effects.as_str()),
                    None => (settlement, outcome_name),
                };
                context.metrics.delivery(&context.name, outcome_name, cost);
                if delivery.attempt == 1 {
                    // Later attempts wait out a backoff on purpose; only first attempts
                    // say how quickly the host delivers.
                    let commit_latency = since(delivery.stored.ingested_at_us);
                    context
                        .metrics
                        .delivery_latency(&context.name, start_latency, commit_latency);
                }
                count_settlement(&context, &settlement);
                notify(&context, &delivery, &settlement, &stored);
                break Some(released);
            }
        }
    };
    context
        .state
        .in_flight
        .fetch_sub(1, AtomicOrdering::Relaxed);
    Finished {
        key,
        sequence,
        released: released.unwrap_or(false),
    }
}

/// Ends an attempt whose commit conflicts for good as a failed attempt of `kind`;
/// whether the delivery's key is released.
async fn conflict_failed(
    context: &Context,
    delivery: &Delivery,
    cost: Cost,
    (kind, message): (FailureKind, String),
) -> bool {
    context.metrics.delivery(&context.name, "conflict", cost);
    let mut errors = delivery.errors.clone();
    errors.push(record_error(context, delivery, kind, message));
    let settlement = decide(context, delivery, kind, errors);
    count_settlement(context, &settlement);
    // A retry or dead letter reads nothing, so it cannot conflict.
    let _ = settle(context, delivery, &settlement).await;
    notify(context, delivery, &settlement, &Settled::default());
    releases_key(context, &settlement)
}

/// Whether a delivery settled so lets go of its ordering key: a retry keeps it, unless
/// the bus keeps every later event of the plugin back until the retry is settled, on
/// whichever host takes it (a key held here for a retry another host took would wait
/// for good).
fn releases_key(context: &Context, settlement: &Settlement) -> bool {
    !matches!(settlement, Settlement::Retry { .. }) || context.consumer.holds_retries_in_order()
}

/// The error of a failed attempt, `None` for a success.
fn failure_of(settlement: &Settlement) -> Option<&AttemptError> {
    match settlement {
        Settlement::Ack(_) => None,
        Settlement::Retry { errors, .. } | Settlement::DeadLetter { errors, .. } => errors.last(),
    }
}

/// Times one attempt may run again after KV conflicts before it counts as failed.
const MAX_CONFLICT_RUNS: u32 = 8;

/// How long an event whose KV reads kept conflicting waits before it is handed out again,
/// as the same attempt; until the retry policy's `max_age`, after which the conflict is a
/// failed attempt like any other.
const CONFLICT_DEFERRAL: Duration = Duration::from_millis(200);

/// Invokes the plugin once and decides how the attempt ends.
async fn attempt(context: &Context, delivery: &Delivery) -> Attempted {
    let (kv, read) = context.pending.reader(&context.kv);
    let outcome = context
        .plugin
        .invoke(
            &delivery.stored.event,
            runtime_delivery(context, delivery),
            kv,
        )
        .await;
    let cost = Cost {
        duration: outcome.duration,
        fuel: outcome.fuel_used,
        cpu: outcome.cpu,
    };
    attempted(
        context,
        delivery,
        outcome.result,
        cost,
        outcome.started,
        read,
    )
}

fn runtime_delivery(context: &Context, delivery: &Delivery) -> runtime::Delivery {
    runtime::Delivery {
        attempt: delivery.attempt,
        max_attempts: context.policy.retry.max_attempts,
        sequence: delivery.stored.sequence,
    }
}

/// How an attempt that ran ends: its emits checked against their schemas, its failure
/// decided, its KV writes registered as pending.
fn attempted(
    context: &Context,
    delivery: &Delivery,
    result: Result<Effects, runtime::Failure>,
    cost: Cost,
    started: Instant,
    read: Option<Arc<Overlay>>,
) -> Attempted {
    let checked = result.and_then(|mut effects| {
        for emit in &mut effects.emits {
            context
                .schemas
                .check(emit)
                .map_err(|violation| runtime::Failure {
                    kind: FailureKind::Schema,
                    message: format!("emitted event `{}`: {violation}", emit.id),
                })?;
        }
        Ok(effects)
    });
    let (settlement, name) = match checked {
        Ok(effects) => (Settlement::Ack(effects), "ok"),
        Err(failure) => {
            let name = failure.kind.as_str();
            let mut errors = delivery.errors.clone();
            errors.push(record_error(
                context,
                delivery,
                failure.kind,
                failure.message,
            ));
            (decide(context, delivery, failure.kind, errors), name)
        }
    };
    // Registered before the lane starts the plugin's next call.
    let pending = match &settlement {
        Settlement::Ack(effects) => context.pending.begin(&effects.kv_writes, read.as_deref()),
        _ => None,
    };
    Attempted {
        settlement,
        outcome: name,
        cost,
        started,
        read,
        pending,
    }
}

/// Logs a failed attempt, remembers it as the plugin's last error and returns its record.
fn record_error(
    context: &Context,
    delivery: &Delivery,
    kind: FailureKind,
    message: String,
) -> AttemptError {
    let error = AttemptError {
        attempt: delivery.attempt,
        kind,
        message: AttemptError::bounded(message, AttemptError::MAX_MESSAGE_BYTES),
        at_ms: now_ms(),
    };
    tracing::warn!(
        plugin = %context.name,
        event_id = %delivery.stored.event.id,
        attempt = delivery.attempt,
        kind = %error.kind,
        "{}",
        error.message
    );
    *context
        .state
        .last_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(error.clone());
    let mut recent = context
        .state
        .recent_errors
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if recent.len() == RECENT_ERRORS {
        recent.pop_front();
    }
    recent.push_back((delivery.stored.event.id.clone(), error.clone()));
    drop(recent);
    error
}

fn count_settlement(context: &Context, settlement: &Settlement) {
    match settlement {
        Settlement::Retry { .. } => context.metrics.retry_scheduled(&context.name),
        Settlement::DeadLetter { reason, .. } => {
            context
                .metrics
                .dead_lettered(&context.name, reason.as_str());
        }
        Settlement::Ack(_) => {}
    }
}

fn decide(
    context: &Context,
    delivery: &Delivery,
    kind: FailureKind,
    errors: Vec<AttemptError>,
) -> Settlement {
    if kind == FailureKind::Reject {
        return Settlement::DeadLetter {
            reason: DeadLetterReason::Rejected,
            errors,
        };
    }
    if kind == FailureKind::Loop {
        return Settlement::DeadLetter {
            reason: DeadLetterReason::Loop,
            errors,
        };
    }
    if kind == FailureKind::Effects {
        return Settlement::DeadLetter {
            reason: DeadLetterReason::Effects,
            errors,
        };
    }
    if kind == FailureKind::Schema {
        return Settlement::DeadLetter {
            reason: DeadLetterReason::Schema,
            errors,
        };
    }
    let age = since(delivery.age_from_us());
    match context
        .policy
        .retry
        .decide(delivery.attempt, age, &mut rand::rng())
    {
        RetryDecision::RetryAfter(delay) => Settlement::Retry { delay, errors },
        RetryDecision::Exhausted => Settlement::DeadLetter {
            reason: DeadLetterReason::Exhausted,
            errors,
        },
        RetryDecision::Expired => Settlement::DeadLetter {
            reason: DeadLetterReason::Expired,
            errors,
        },
    }
}

/// Tells waiters on the event (`?wait=`) how this plugin's attempt ended, with the
/// stream versions its emits took (`stored`).
fn notify(context: &Context, delivery: &Delivery, settlement: &Settlement, stored: &Settled) {
    if !delivery.watched {
        return;
    }
    let event = &delivery.stored.event;
    context.bus.notify(&event.source, &event.id, &|| {
        let (outcome, error, emitted) = match settlement {
            Settlement::Ack(effects) => {
                // As stored: an expected version is a condition, not part of the event;
                // the version it took is.
                let mut versions = stored.stream_versions.iter().copied();
                let emitted = effects
                    .emits
                    .iter()
                    .map(|emit| {
                        let mut emit = emit.clone();
                        emit.extensions.remove(crate::stream::EXPECTED_VERSION);
                        if let Some(version) = versions.next().flatten() {
                            emit.extensions
                                .insert(STREAM_VERSION.to_owned(), version.to_string());
                        }
                        emit
                    })
                    .collect();
                (NoticeOutcome::Ok, None, emitted)
            }
            Settlement::Retry { errors, .. } => {
                (NoticeOutcome::Retrying, errors.last().cloned(), Vec::new())
            }
            Settlement::DeadLetter { reason, errors } => {
                let outcome = if *reason == DeadLetterReason::Rejected {
                    NoticeOutcome::Rejected
                } else {
                    NoticeOutcome::DeadLettered
                };
                (outcome, errors.last().cloned(), Vec::new())
            }
        };
        Notice {
            plugin: context.name.clone(),
            outcome,
            attempt: delivery.attempt,
            error,
            emitted,
        }
    });
}

/// Stores a settlement, retrying storage failures until it is stored or the bus closes.
/// A KV conflict is returned to the caller: nothing was stored.
async fn settle(
    context: &Context,
    delivery: &Delivery,
    settlement: &Settlement,
) -> Result<Stored, BusError> {
    let mut wait = Duration::from_millis(50);
    loop {
        match context.consumer.settle(delivery, settlement.clone()).await {
            Ok(settled) => return Ok(Stored::as_asked(settled)),
            Err(BusError::Closed) => return Ok(Stored::as_asked(Settled::default())),
            Err(conflict @ (BusError::Conflict(_) | BusError::VersionConflict(_))) => {
                return Err(conflict);
            }
            Err(too_large @ (BusError::TooLarge { .. } | BusError::Invalid(_)))
                if matches!(settlement, Settlement::Ack(_)) =>
            {
                // Storing these effects can never succeed: the attempt broke the bus's
                // limit (or asked for what it cannot do) as it would break an effects
                // bound.
                let mut errors = delivery.errors.clone();
                errors.push(record_error(
                    context,
                    delivery,
                    FailureKind::Effects,
                    too_large.to_string(),
                ));
                let dead = Settlement::DeadLetter {
                    reason: DeadLetterReason::Effects,
                    errors,
                };
                let stored = Box::pin(settle(context, delivery, &dead)).await?;
                return Ok(Stored {
                    settled: stored.settled,
                    instead: Some(dead),
                });
            }
            Err(error) => {
                tracing::error!(plugin = %context.name, event_id = %delivery.stored.event.id, %error, "cannot settle; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What [`settle`] stored.
struct Stored {
    settled: Settled,
    /// The settlement stored instead of the one asked for: a dead letter for effects the
    /// bus can never store.
    instead: Option<Settlement>,
}

impl Stored {
    fn as_asked(settled: Settled) -> Self {
        Self {
            settled,
            instead: None,
        }
    }
}

/// KV reads through the bus, for the runtime.
struct BusKv(Arc<dyn Bus>);

#[async_trait::async_trait]
impl KvSource for BusKv {
    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.0.get(plugin, key).await
    }

    async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        self.0.keys(plugin, prefix).await
    }

    async fn read_stream(
        &self,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<StreamPage, KvError> {
        self.0.read_stream(subject, after, limit).await
    }

    async fn scheduled(&self, id: &str) -> Result<bool, KvError> {
        self.0.scheduled(id).await
    }
}
