//! The host side of a plugin instance: its store data and the `host` imports.
//!
//! Invariants:
//! - `emit` and `kv-*` writes go only into the [`EffectBuffer`] of the current call;
//!   nothing leaves it unless the runtime turns a successful call into [`Effects`].
//! - Reads (`kv-get`, `kv-keys`) see the call's own buffered writes over the committed
//!   state from the [`KvSource`].
//! - A call that breaks an [`EffectBounds`] rule or cannot reach the KV source is stopped
//!   with a trap carrying a [`HostTrap`], so the plugin cannot ignore the failure.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

use super::bindings::{host, types};
use super::limits::MemoryLimiter;
use super::outcome::Failure;
use super::sandbox::{Access, Refusals};
use super::settings::EffectBounds;
use super::stdio::{LogBudget, StderrTail};
use crate::effects::Effects;
use crate::event::{self, CAUSATION_DEPTH, CAUSATION_ID, CORRELATION_ID, Event};
use crate::failure::{AttemptError, FailureKind};
use crate::kv::{KvError, KvRead, KvSource, KvWrite, keys_digest, value_digest};
use crate::schedule::{DELIVER_AT, Due, ScheduledRead};
use crate::stream::{EXPECTED_VERSION, STREAM_VERSION, StreamRead};
use crate::telemetry::{self, TRACEPARENT, TRACESTATE};

/// Longest log line a plugin may write through `log`; longer ones are cut.
const MAX_LOG_LINE: usize = 8192;
/// Most events one `read-stream` returns; a plugin pages through longer streams.
pub(crate) const MAX_STREAM_PAGE: usize = 1000;
/// Most reads one call may record for its commit's check (distinct KV keys read, key
/// listings, stream reads and scheduled ids looked at): each is checked again when the
/// call commits, on the log's single writer.
const MAX_READS: usize = 10_000;
/// Most bytes of names (keys, prefixes, subjects, ids) the reads of one call may hold.
const MAX_READ_BYTES: usize = 4 * 1024 * 1024;

/// Why the host stopped a call from inside one of its imports.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum HostTrap {
    /// The call broke an effects rule: a bound, or an invalid emitted event.
    #[error("{0}")]
    Effects(String),
    /// The call emitted past the causation-depth limit.
    #[error("{0}")]
    Loop(String),
    /// The host failed to serve an import; the plugin is not at fault.
    #[error("{0}")]
    Host(String),
}

/// What the host knows about the event being handled, to derive follow-up events.
struct CallContext {
    origin: Origin,
    /// Causation depth of the emits of this call.
    depth: u32,
    /// The trace context of the emits of this call: the call's span when traces are
    /// exported, else the event's own.
    traceparent: Option<String>,
    /// The cause's `tracestate`, which the emits carry on with its trace.
    tracestate: Option<String>,
    kv: Arc<dyn KvSource>,
    /// In a batch, what the items acknowledged before this one wrote and emitted.
    inherited: Option<Arc<Inherited>>,
    effects: EffectBuffer,
}

/// The handled event's identity, which its emits derive theirs from.
struct Origin {
    event_id: String,
    event_source: String,
    correlation_id: String,
}

impl Origin {
    fn of(event: &Event) -> Self {
        let mut origin = Self {
            event_id: String::new(),
            event_source: String::new(),
            correlation_id: String::new(),
        };
        origin.set(event);
        origin
    }

    /// Becomes `event`'s origin, in the strings' existing buffers: a reused instance's
    /// calls allocate none.
    fn set(&mut self, event: &Event) {
        self.event_id.clone_from(&event.id);
        self.event_source.clone_from(&event.source);
        self.correlation_id.clear();
        self.correlation_id
            .push_str(event.extension(CORRELATION_ID).unwrap_or(&event.id));
    }
}

/// Origins an instance keeps for reuse: a batch's worth.
const MAX_SPARE_ORIGINS: usize = 256;

/// What the acknowledged items of a batch left for the later ones: their KV writes (the
/// last to each key) and their emits that enter the log at commit.
#[derive(Default, Clone)]
struct Inherited {
    kv: BTreeMap<String, Option<Vec<u8>>>,
    emits: Vec<Event>,
}

/// A batch call in progress (see the WIT's `batch-handler`).
struct BatchCall {
    /// Each item's call context, taken when the item begins.
    items: Vec<Option<CallContext>>,
    /// The item being handled.
    current: Option<usize>,
    /// The lowest index `begin-item` may start.
    next: usize,
    inherited: Arc<Inherited>,
    /// Each item's outcome; `None` for an item not handled (yet).
    outcomes: Vec<Option<Result<Effects, Failure>>>,
    /// How long each item may take, and when the current one (or the call, before its
    /// first item) began: an item that loops is stopped after its own time, not after
    /// the whole batch's.
    item_timeout: std::time::Duration,
    item_started: std::time::Instant,
    /// The fuel each item gets, whatever the items before it burned.
    item_fuel: u64,
    /// A run: the host calls `handle` once per item and begins and ends each item itself,
    /// so the guest may not (see [`HostState::begin_run`]).
    run: bool,
}

/// Effects buffered by the current call, and what it read of the committed state.
#[derive(Default)]
struct EffectBuffer {
    emits: Vec<Event>,
    /// Emits made, cancelled ones included: an emit's id derives from its index, which a
    /// cancelled schedule must not hand out again.
    emit_count: usize,
    emit_bytes: usize,
    kv: BTreeMap<String, Option<Vec<u8>>>,
    kv_write_count: usize,
    /// Bytes of keys and values written, overwritten ones included.
    kv_write_bytes: usize,
    reads: Vec<KvRead>,
    /// The keys whose committed value `reads` holds: a key read again adds no read.
    keys_read: std::collections::HashSet<String>,
    /// Reads recorded (of every kind) and the bytes of their names.
    read_count: usize,
    read_bytes: usize,
    stream_reads: Vec<StreamRead>,
    schedule_reads: Vec<ScheduledRead>,
    cancels: Vec<String>,
}

/// Identity and settings shared by every instance of one plugin.
pub(crate) struct PluginIdentity {
    pub(crate) name: Arc<str>,
    /// Attempts to reach outside the sandbox, refused.
    pub(crate) refusals: Refusals,
    /// The log lines its instances may still write.
    pub(crate) log_budget: Arc<LogBudget>,
    pub(crate) bounds: EffectBounds,
    pub(crate) config: BTreeMap<String, String>,
}

/// The data of one plugin instance's store.
pub(crate) struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    http_hooks: DenyRequests,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) stderr_tail: StderrTail,
    identity: Arc<PluginIdentity>,
    call: Option<CallContext>,
    batch: Option<BatchCall>,
    /// Origins of ended calls, whose buffers the next calls reuse.
    spare: Vec<Origin>,
    /// Fuel given to a batch call's items as each began (see [`begin_item_in_store`]).
    fuel_refilled: u64,
}

impl HostState {
    pub(crate) fn new(
        wasi: WasiCtx,
        limiter: MemoryLimiter,
        stderr_tail: StderrTail,
        identity: Arc<PluginIdentity>,
    ) -> Self {
        Self {
            wasi,
            http: WasiHttpCtx::new(),
            http_hooks: DenyRequests(Arc::clone(&identity)),
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(super::limits::MAX_HANDLES);
                table
            },
            limiter,
            stderr_tail,
            identity,
            call: None,
            batch: None,
            spare: Vec::new(),
            fuel_refilled: 0,
        }
    }

    /// Starts buffering effects for a call that handles `event`.
    pub(crate) fn begin_call(&mut self, event: &Event, kv: Arc<dyn KvSource>) {
        self.batch = None;
        self.fuel_refilled = 0;
        // A warm instance's earlier calls printed what they printed; a trap of this call
        // is reported with this call's output only.
        self.stderr_tail.take();
        let origin = self.origin(event);
        self.call = Some(CallContext::new(origin, event, kv, None));
    }

    /// Starts a batch call over `events`; each item's effects are buffered between its
    /// `begin-item` and `end-item`.
    pub(crate) fn begin_batch(
        &mut self,
        events: &[&Event],
        traceparents: &[Option<String>],
        kv: &Arc<dyn KvSource>,
        item_timeout: std::time::Duration,
        item_fuel: u64,
    ) {
        let items = events
            .iter()
            .enumerate()
            .map(|(index, event)| {
                let origin = self.origin(event);
                let mut call = CallContext::new(origin, event, Arc::clone(kv), None);
                // The item's own span, which the call's (none: it serves several
                // traces) cannot give.
                if let Some(traceparent) = traceparents.get(index).cloned().flatten() {
                    call.traceparent = Some(traceparent);
                }
                Some(call)
            })
            .collect();
        self.begin_items(items, events.len(), item_timeout, item_fuel, false);
    }

    /// Starts a run of `count` calls of `handle` on this instance, which the host begins
    /// and ends as a batch's items ([`begin_run_item`], [`HostState::end_run_item`]), so
    /// that each call reads what the acknowledged ones before it wrote and emitted, as it
    /// would if each were invoked alone after the earlier ones' commits.
    pub(crate) fn begin_run(
        &mut self,
        count: usize,
        item_timeout: std::time::Duration,
        item_fuel: u64,
    ) {
        // Each call's context is made as it begins, from its event.
        self.begin_items(Vec::new(), count, item_timeout, item_fuel, true);
    }

    /// Starts a batch call or a run of `count` items.
    fn begin_items(
        &mut self,
        items: Vec<Option<CallContext>>,
        count: usize,
        item_timeout: std::time::Duration,
        item_fuel: u64,
        run: bool,
    ) {
        self.call = None;
        self.fuel_refilled = 0;
        // A warm instance's earlier calls printed what they printed; a trap is reported
        // with this call's output only.
        self.stderr_tail.take();
        self.batch = Some(BatchCall {
            items,
            outcomes: vec![None; count],
            current: None,
            next: 0,
            inherited: Arc::default(),
            item_timeout,
            item_started: std::time::Instant::now(),
            item_fuel,
            run,
        });
    }

    /// Ends the current item of a run with what its `handle` call returned.
    pub(crate) fn end_run_item(
        &mut self,
        outcome: Result<(), super::bindings::HandlerError>,
    ) -> wasmtime::Result<()> {
        self.end_item(outcome.map_err(|error| match error {
            super::bindings::HandlerError::Retry(message) => types::HandlerError::Retry(message),
            super::bindings::HandlerError::Reject(message) => types::HandlerError::Reject(message),
        }))
    }

    /// Refuses the guest's `begin-item` or `end-item` (`import`) in a run, whose items
    /// the host begins and ends itself.
    fn guest_may_drive_items(&self, import: &str) -> wasmtime::Result<()> {
        if self.batch.as_ref().is_some_and(|batch| batch.run) {
            return Err(effects_trap(format!(
                "`{import}` may only be called while handling a batch"
            )));
        }
        Ok(())
    }

    /// The fuel the current batch call's items were given on top of the call's own
    /// budget: what the call burned is its budget plus this, less what is left.
    pub(crate) fn fuel_refilled(&self) -> u64 {
        self.fuel_refilled
    }

    /// In a batch call, the time the current item (or the call before its first item)
    /// has left; `None` outside a batch, where the call's own deadline is the bound.
    pub(crate) fn batch_item_time_left(&self) -> Option<std::time::Duration> {
        let batch = self.batch.as_ref()?;
        Some(
            batch
                .item_timeout
                .saturating_sub(batch.item_started.elapsed()),
        )
    }

    /// Ends a batch call: each item's outcome, `None` for those not handled. `failure` is
    /// how the call itself failed: the outcome of the item it was in. A failure outside
    /// every item (copying the events in, the handler's own code between items, an
    /// import called there) is no item's doing: it is returned, and the items not
    /// handled yet run again alone, where each is judged by itself.
    pub(crate) fn end_batch(
        &mut self,
        failure: Option<Failure>,
    ) -> (Vec<Option<Result<Effects, Failure>>>, Option<Failure>) {
        self.call = None;
        let Some(mut batch) = self.batch.take() else {
            return (Vec::new(), failure);
        };
        let Some(failure) = failure else {
            return (batch.outcomes, None);
        };
        match batch
            .current
            .and_then(|index| batch.outcomes.get_mut(index))
        {
            Some(outcome) => {
                *outcome = Some(Err(failure));
                (batch.outcomes, None)
            }
            None => (batch.outcomes, Some(failure)),
        }
    }

    fn begin_item(&mut self, index: u32) -> wasmtime::Result<()> {
        let Some(batch) = self.batch.as_mut() else {
            return Err(effects_trap(
                "`begin-item` may only be called while handling a batch".to_owned(),
            ));
        };
        let index = usize::try_from(index).unwrap_or(usize::MAX);
        if batch.current.is_some() {
            return Err(effects_trap(
                "`begin-item` before the previous item ended with `end-item`".to_owned(),
            ));
        }
        let count = batch.items.len();
        let Some(mut call) = batch
            .items
            .get_mut(index)
            .filter(|_| index >= batch.next)
            .and_then(Option::take)
        else {
            return Err(effects_trap(format!(
                "`begin-item({index})`: items start in order, each once, below {count}"
            )));
        };
        batch.current = Some(index);
        batch.next = index + 1;
        batch.item_started = std::time::Instant::now();
        call.inherited = Some(Arc::clone(&batch.inherited));
        self.call = Some(call);
        Ok(())
    }

    fn end_item(&mut self, outcome: Result<(), types::HandlerError>) -> wasmtime::Result<()> {
        let Some(index) = self.batch.as_ref().and_then(|batch| batch.current) else {
            return Err(effects_trap(
                "`end-item` without an item begun by `begin-item`".to_owned(),
            ));
        };
        let effects = self.end_call();
        let Some(batch) = self.batch.as_mut() else {
            return Ok(());
        };
        batch.current = None;
        batch.outcomes[index] = Some(match outcome {
            Ok(()) => {
                // Later items read what this one wrote and emitted, as it would have.
                let inherited = Arc::make_mut(&mut batch.inherited);
                for write in &effects.kv_writes {
                    inherited.kv.insert(write.key.clone(), write.value.clone());
                }
                inherited.emits.extend(
                    effects
                        .emits
                        .iter()
                        .filter(|e| e.extension(DELIVER_AT).is_none())
                        .cloned(),
                );
                Ok(effects)
            }
            // Kept until the whole batch ends: cut now, as they will be when recorded.
            Err(types::HandlerError::Retry(message)) => Err(Failure::new(
                FailureKind::Retry,
                AttemptError::bounded(message, AttemptError::MAX_MESSAGE_BYTES),
            )),
            Err(types::HandlerError::Reject(message)) => Err(Failure::new(
                FailureKind::Reject,
                AttemptError::bounded(message, AttemptError::MAX_MESSAGE_BYTES),
            )),
        });
        Ok(())
    }
}

impl CallContext {
    fn new(
        origin: Origin,
        event: &Event,
        kv: Arc<dyn KvSource>,
        inherited: Option<Arc<Inherited>>,
    ) -> Self {
        let depth = event
            .extension(CAUSATION_DEPTH)
            .and_then(|d| d.parse::<u32>().ok())
            .unwrap_or(0)
            .saturating_add(1);
        let traceparent = if telemetry::exporting() {
            telemetry::traceparent_of(&tracing::Span::current())
        } else {
            None
        }
        .or_else(|| event.extension(TRACEPARENT).map(str::to_owned));
        CallContext {
            origin,
            depth,
            traceparent,
            tracestate: event.extension(TRACESTATE).map(str::to_owned),
            kv,
            inherited,
            effects: EffectBuffer::default(),
        }
    }
}

impl HostState {
    /// Ends the current call and hands back what it buffered.
    pub(crate) fn end_call(&mut self) -> Effects {
        let Some(call) = self.call.take() else {
            return Effects::default();
        };
        if self.spare.len() < MAX_SPARE_ORIGINS {
            self.spare.push(call.origin);
        }
        Effects {
            emits: call.effects.emits,
            kv_writes: call
                .effects
                .kv
                .into_iter()
                .map(|(key, value)| KvWrite { key, value })
                .collect(),
            kv_reads: call.effects.reads,
            stream_reads: call.effects.stream_reads,
            schedule_reads: call.effects.schedule_reads,
            cancels: call.effects.cancels,
        }
    }

    /// `event`'s origin, in a spare one's buffers if there is one.
    fn origin(&mut self, event: &Event) -> Origin {
        match self.spare.pop() {
            Some(mut origin) => {
                origin.set(event);
                origin
            }
            None => Origin::of(event),
        }
    }

    fn call(&mut self, import: &str) -> wasmtime::Result<&mut CallContext> {
        let in_batch = self.batch.is_some();
        self.call.as_mut().ok_or_else(|| {
            wasmtime::Error::new(HostTrap::Effects(if in_batch {
                format!("`{import}` called between a batch's items: only within `begin-item` and `end-item`")
            } else {
                format!("`{import}` may only be called while handling an event, not from describe()")
            }))
        })
    }

    fn plugin(&self) -> &str {
        &self.identity.name
    }

    /// Most bytes one call of the plugin into the host may carry.
    pub(crate) fn max_hostcall_bytes(&self) -> usize {
        self.identity.bounds.max_hostcall_bytes()
    }
}

fn effects_trap(message: String) -> wasmtime::Error {
    wasmtime::Error::new(HostTrap::Effects(message))
}

fn host_trap(message: String) -> wasmtime::Error {
    wasmtime::Error::new(HostTrap::Host(message))
}

/// A committed KV read, or a host trap naming the import and key when the store failed:
/// the plugin is not at fault and must not go on with a value it never got.
fn unavailable_kv<T>(import: &str, key: &str, read: Result<T, KvError>) -> wasmtime::Result<T> {
    read.map_err(|e| host_trap(format!("{import} `{key}`: {e:#}")))
}

/// The id of the `index`-th event emitted while handling one event: the same on every
/// attempt, so a retried attempt cannot publish the same follow-up twice under two ids.
fn emitted_event_id(plugin: &str, source: &str, id: &str, index: usize) -> String {
    let name = format!("{plugin}\n{source}\n{id}\n{index}");
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).to_string()
}

impl HostState {
    pub(crate) fn table_mut(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// Counts and logs an attempt of this plugin to reach outside its sandbox.
    pub(crate) fn refuse(&self, access: Access, what: &str) {
        self.identity.refuse(access, what);
    }
}

impl PluginIdentity {
    fn refuse(&self, access: Access, what: &str) {
        self.refusals.refuse(&self.name, access, what);
    }
}

/// Refuses every outgoing HTTP request, counting it against the plugin.
struct DenyRequests(Arc<PluginIdentity>);

impl WasiHttpHooks for DenyRequests {
    fn send_request(
        &mut self,
        request: hyper::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        hyper::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        self.0.refuse(
            Access::Http,
            &format!("{} {}", request.method(), request.uri()),
        );
        Box::new(async { Err(HttpError::HttpRequestDenied) })
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            hooks: &mut self.http_hooks,
            table: &mut self.table,
            ctx: &mut self.http,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    async fn log(&mut self, level: types::LogLevel, message: String) -> wasmtime::Result<()> {
        let plugin = self.plugin();
        if !self.identity.log_budget.allow(plugin) {
            return Ok(());
        }
        let message = truncate(&message, MAX_LOG_LINE);
        match level {
            types::LogLevel::Trace => {
                tracing::trace!(target: "switchyard::plugin", plugin, "{message}")
            }
            types::LogLevel::Debug => {
                tracing::debug!(target: "switchyard::plugin", plugin, "{message}")
            }
            types::LogLevel::Info => {
                tracing::info!(target: "switchyard::plugin", plugin, "{message}")
            }
            types::LogLevel::Warn => {
                tracing::warn!(target: "switchyard::plugin", plugin, "{message}")
            }
            types::LogLevel::Error => {
                tracing::error!(target: "switchyard::plugin", plugin, "{message}")
            }
        }
        Ok(())
    }

    async fn emit(&mut self, outgoing: types::OutgoingEvent) -> wasmtime::Result<String> {
        let plugin = Arc::clone(&self.identity.name);
        let bounds = self.identity.bounds;
        let call = self.call("emit")?;
        event::validate_event_type(&outgoing.type_)
            .map_err(|e| effects_trap(format!("emit: {e}")))?;
        if call.depth > bounds.max_causation_depth {
            return Err(wasmtime::Error::new(HostTrap::Loop(format!(
                "emit: `{}` would be {} emits away from the producer's event; the limit is {}",
                outgoing.type_, call.depth, bounds.max_causation_depth
            ))));
        }
        if call.effects.emit_count >= bounds.max_emits {
            return Err(effects_trap(format!(
                "emit: more than {} events emitted in one call",
                bounds.max_emits
            )));
        }
        let mut extensions = BTreeMap::new();
        for (name, value) in outgoing.extensions {
            if !event::is_valid_extension_name(&name) {
                return Err(effects_trap(format!(
                    "emit: extension name `{name}` must be lower-case letters and digits"
                )));
            }
            if HOST_SET_EXTENSIONS.contains(&name.as_str()) {
                return Err(effects_trap(format!(
                    "emit: extension `{name}` is set by the host{}",
                    match name.as_str() {
                        EXPECTED_VERSION => "; use the event's `expected-version`",
                        DELIVER_AT => "; use the event's `schedule`",
                        _ => "",
                    }
                )));
            }
            // A plugin may continue a trace of its own choosing, as a producer may, but
            // only with a context ingest would accept too.
            if name == TRACEPARENT && !telemetry::valid_traceparent(&value) {
                return Err(effects_trap(format!(
                    "emit: extension `traceparent` is not a W3C trace context: {:?}",
                    truncate(&value, 128)
                )));
            }
            if name == TRACESTATE && !telemetry::valid_tracestate(&value) {
                return Err(effects_trap(
                    "emit: extension `tracestate` must be at most 512 characters of printable ASCII"
                        .to_owned(),
                ));
            }
            extensions.insert(name, value);
        }
        if let Some(expected) = outgoing.expected_version {
            if outgoing.subject.is_none() {
                return Err(effects_trap(format!(
                    "emit: `{}` has an expected version but no subject; the version is \
                     a condition on the subject's stream",
                    outgoing.type_
                )));
            }
            if outgoing.schedule.is_some() {
                return Err(effects_trap(format!(
                    "emit: `{}` has both an expected version and a schedule; a scheduled \
                     event cannot be conditional",
                    outgoing.type_
                )));
            }
            extensions.insert(EXPECTED_VERSION.to_owned(), expected.to_string());
        }
        if let Some(schedule) = outgoing.schedule {
            let due = crate::schedule::due_time(&schedule_of(schedule))
                .map_err(|e| effects_trap(format!("emit: `{}`: {e}", outgoing.type_)))?;
            extensions.insert(DELIVER_AT.to_owned(), due);
        }
        extensions.insert(CAUSATION_ID.to_owned(), call.origin.event_id.clone());
        extensions.insert(
            CORRELATION_ID.to_owned(),
            call.origin.correlation_id.clone(),
        );
        extensions.insert(CAUSATION_DEPTH.to_owned(), call.depth.to_string());
        if let Some(traceparent) = &call.traceparent
            && !extensions.contains_key(TRACEPARENT)
        {
            extensions.insert(TRACEPARENT.to_owned(), traceparent.clone());
            // The vendors' part goes on with the trace, as the cause carried it.
            if let Some(tracestate) = &call.tracestate {
                extensions
                    .entry(TRACESTATE.to_owned())
                    .or_insert_with(|| tracestate.clone());
            }
        }
        let id = emitted_event_id(
            &plugin,
            &call.origin.event_source,
            &call.origin.event_id,
            call.effects.emit_count,
        );
        let emitted = Event {
            id: id.clone(),
            source: format!("/switchyard/plugins/{plugin}"),
            ty: outgoing.type_,
            subject: outgoing.subject,
            time: Some(crate::clock::now_rfc3339()),
            datacontenttype: Some(
                outgoing
                    .datacontenttype
                    .unwrap_or_else(|| "application/json".to_owned()),
            ),
            dataschema: None,
            data: outgoing.data,
            extensions,
        };
        let bytes = call
            .effects
            .emit_bytes
            .saturating_add(emitted_size(&emitted));
        if bytes > bounds.max_emit_bytes {
            return Err(effects_trap(format!(
                "emit: more than {} bytes of events (data, type, subject, content type and \
                 extensions) emitted in one call",
                bounds.max_emit_bytes
            )));
        }
        call.effects.emit_count += 1;
        call.effects.emits.push(emitted);
        call.effects.emit_bytes = bytes;
        Ok(id)
    }

    async fn kv_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let plugin = Arc::clone(&self.identity.name);
        let max_key_bytes = self.identity.bounds.max_kv_key_bytes;
        let call = self.call("kv-get")?;
        if key.is_empty() || key.len() > max_key_bytes {
            // No write can make such a key, so it has no value, now or at commit.
            return Ok(None);
        }
        if let Some(buffered) = call.effects.kv.get(&key) {
            return Ok(buffered.clone());
        }
        let inherited = call
            .inherited
            .as_ref()
            .and_then(|i| i.kv.get(&key))
            .cloned();
        let value = match inherited {
            // An earlier item's write: committed before this item, if all goes well, and
            // checked as such.
            Some(value) => value,
            None => unavailable_kv("kv-get", &key, call.kv.get(&plugin, &key).await)?,
        };
        // A key read again keeps its first read: if the value changed in between, the
        // first read fails the commit's check as the second would.
        if !call.effects.keys_read.contains(&key) {
            call.effects.count_read("kv-get", key.len())?;
            call.effects.keys_read.insert(key.clone());
            call.effects.reads.push(KvRead::Value {
                key,
                digest: value.as_deref().map(value_digest),
            });
        }
        Ok(value)
    }

    async fn kv_set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        let bounds = self.identity.bounds;
        if value.len() > bounds.max_kv_value_bytes {
            return Err(effects_trap(format!(
                "kv-set `{}`: value of {} bytes is larger than the limit of {} bytes",
                truncate(&key, 64),
                value.len(),
                bounds.max_kv_value_bytes
            )));
        }
        self.buffer_kv_write("kv-set", key, Some(value))
    }

    async fn kv_delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.buffer_kv_write("kv-delete", key, None)
    }

    async fn kv_keys(&mut self, prefix: String) -> wasmtime::Result<Vec<String>> {
        let plugin = Arc::clone(&self.identity.name);
        let max_key_bytes = self.identity.bounds.max_kv_key_bytes;
        let call = self.call("kv-keys")?;
        if prefix.len() > max_key_bytes {
            // No key is that long.
            return Ok(Vec::new());
        }
        call.effects.count_read("kv-keys", prefix.len())?;
        let committed = unavailable_kv("kv-keys", &prefix, call.kv.keys(&plugin, &prefix).await)?;
        let mut keys: std::collections::BTreeSet<String> = committed.into_iter().collect();
        if let Some(inherited) = &call.inherited {
            overlay_keys(&mut keys, &inherited.kv, &prefix);
        }
        call.effects.reads.push(KvRead::Keys {
            prefix: prefix.clone(),
            digest: keys_digest(keys.iter().map(String::as_str)),
        });
        overlay_keys(&mut keys, &call.effects.kv, &prefix);
        Ok(keys.into_iter().collect())
    }

    async fn config_get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.identity.config.get(&key).cloned())
    }

    async fn read_stream(
        &mut self,
        subject: String,
        after_version: u64,
        limit: u32,
    ) -> wasmtime::Result<types::StreamPage> {
        let call = self.call("read-stream")?;
        call.effects.count_read("read-stream", subject.len())?;
        let limit = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .min(MAX_STREAM_PAGE);
        let page = call
            .kv
            .read_stream(&subject, after_version, limit)
            .await
            .map_err(|e| host_trap(format!("read-stream `{subject}`: {e:#}")))?;
        let mut events: Vec<types::Event> = page.events.iter().map(to_wit_event).collect();
        // Earlier items' emits to this subject (in a batch), then the call's own, follow
        // the stored events, numbered as the commits will number them; what the call
        // read is the stream with the earlier items' appends, as it will be committed.
        let to_subject = |e: &&Event| {
            e.subject.as_deref() == Some(subject.as_str()) && e.extension(DELIVER_AT).is_none()
        };
        let earlier = call.inherited.clone();
        let inherited: Vec<&Event> = earlier
            .iter()
            .flat_map(|i| i.emits.iter())
            .filter(to_subject)
            .collect();
        let read_version = page.version + inherited.len() as u64;
        if !call
            .effects
            .stream_reads
            .iter()
            .any(|read| read.subject == subject && read.version == read_version)
        {
            call.effects.stream_reads.push(StreamRead {
                subject: subject.clone(),
                version: read_version,
            });
        }
        let mut version = page.version;
        for emitted in inherited
            .into_iter()
            .chain(call.effects.emits.iter().filter(to_subject))
        {
            version += 1;
            if version > after_version && events.len() < limit {
                let mut emitted = emitted.clone();
                emitted.extensions.remove(EXPECTED_VERSION);
                emitted
                    .extensions
                    .insert(STREAM_VERSION.to_owned(), version.to_string());
                events.push(to_wit_event(&emitted));
            }
        }
        Ok(types::StreamPage { events, version })
    }

    /// Shadowed in the linker by [`begin_item_in_store`], which also gives the item its
    /// fuel (see [`super::bindings::add_to_linker`]).
    fn begin_item(&mut self, index: u32) -> wasmtime::Result<()> {
        self.guest_may_drive_items("begin-item")?;
        HostState::begin_item(self, index)
    }

    fn end_item(&mut self, outcome: Result<(), types::HandlerError>) -> wasmtime::Result<()> {
        self.guest_may_drive_items("end-item")?;
        HostState::end_item(self, outcome)
    }

    async fn cancel_scheduled(&mut self, id: String) -> wasmtime::Result<bool> {
        let bounds = self.identity.bounds;
        let call = self.call("cancel-scheduled")?;
        call.effects.count_read("cancel-scheduled", id.len())?;
        if call.effects.schedule_reads.len() >= bounds.max_emits {
            return Err(effects_trap(format!(
                "cancel-scheduled: more than {} scheduled events looked at in one call",
                bounds.max_emits
            )));
        }
        let pending = call
            .kv
            .scheduled(&id)
            .await
            .map_err(|e| host_trap(format!("cancel-scheduled `{id}`: {e:#}")))?;
        let buffered = call
            .effects
            .emits
            .iter()
            .position(|e| e.id == id && e.extension(DELIVER_AT).is_some());
        if let Some(index) = buffered {
            // Scheduled by this very call: the schedule simply never commits.
            let removed = call.effects.emits.remove(index);
            call.effects.emit_bytes = call
                .effects
                .emit_bytes
                .saturating_sub(emitted_size(&removed));
            return Ok(true);
        }
        if call.effects.cancels.contains(&id) {
            return Ok(false);
        }
        call.effects.schedule_reads.push(ScheduledRead {
            id: id.clone(),
            pending,
        });
        if pending {
            call.effects.cancels.push(id);
        }
        Ok(pending)
    }
}

/// What an emitted event counts against `max_emit_bytes`: what the plugin chose of it
/// (the host's own extensions included, a few hundred bytes, for a measure that is the
/// same whenever it is taken).
fn emitted_size(event: &Event) -> usize {
    event.data.len()
        + event.ty.len()
        + event.subject.as_ref().map_or(0, String::len)
        + event.datacontenttype.as_ref().map_or(0, String::len)
        + event
            .extensions
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
}

/// Extensions a plugin may not set by name on an emitted event: the bus acts on them.
const HOST_SET_EXTENSIONS: &[&str] = &[STREAM_VERSION, EXPECTED_VERSION, DELIVER_AT];

fn schedule_of(schedule: types::Schedule) -> Due {
    match schedule {
        types::Schedule::DelayMs(ms) => Due::After(std::time::Duration::from_millis(ms)),
        types::Schedule::At(at) => Due::At(at),
    }
}

/// The host's event as the current contract's WIT record.
pub(crate) fn to_wit_event(event: &Event) -> types::Event {
    types::Event {
        id: event.id.clone(),
        source: event.source.clone(),
        type_: event.ty.clone(),
        subject: event.subject.clone(),
        time: event.time.clone(),
        datacontenttype: event.datacontenttype.clone(),
        dataschema: event.dataschema.clone(),
        data: event.data.clone(),
        extensions: event
            .extensions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

impl HostState {
    fn buffer_kv_write(
        &mut self,
        import: &str,
        key: String,
        value: Option<Vec<u8>>,
    ) -> wasmtime::Result<()> {
        let bounds = self.identity.bounds;
        if key.is_empty() || key.len() > bounds.max_kv_key_bytes {
            return Err(effects_trap(format!(
                "{import}: key must be 1 to {} bytes long, not {}",
                bounds.max_kv_key_bytes,
                key.len()
            )));
        }
        let call = self.call(import)?;
        if call.effects.kv_write_count >= bounds.max_kv_writes {
            return Err(effects_trap(format!(
                "{import}: more than {} KV writes in one call",
                bounds.max_kv_writes
            )));
        }
        let bytes = call
            .effects
            .kv_write_bytes
            .saturating_add(key.len() + value.as_ref().map_or(0, Vec::len));
        if bytes > bounds.max_kv_bytes {
            return Err(effects_trap(format!(
                "{import}: more than {} bytes of KV keys and values written in one call",
                bounds.max_kv_bytes
            )));
        }
        call.effects.kv_write_bytes = bytes;
        call.effects.kv_write_count += 1;
        call.effects.kv.insert(key, value);
        Ok(())
    }
}

impl EffectBuffer {
    /// Counts a read the commit will check, of a name `name_bytes` long, against
    /// [`MAX_READS`] and [`MAX_READ_BYTES`].
    fn count_read(&mut self, import: &str, name_bytes: usize) -> wasmtime::Result<()> {
        let bytes = self.read_bytes.saturating_add(name_bytes);
        if self.read_count >= MAX_READS || bytes > MAX_READ_BYTES {
            return Err(effects_trap(format!(
                "{import}: more than {MAX_READS} reads (KV keys, key listings, streams and \
                 scheduled ids), or {MAX_READ_BYTES} bytes of their names, in one call"
            )));
        }
        self.read_count += 1;
        self.read_bytes = bytes;
        Ok(())
    }
}

/// Applies the buffered writes under `prefix` to a key listing.
fn overlay_keys(
    keys: &mut std::collections::BTreeSet<String>,
    writes: &BTreeMap<String, Option<Vec<u8>>>,
    prefix: &str,
) {
    for (key, value) in writes.range(prefix.to_owned()..) {
        if !key.starts_with(prefix) {
            break;
        }
        if value.is_some() {
            keys.insert(key.clone());
        } else {
            keys.remove(key);
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `begin-item` as the linker serves it: [`HostState::begin_item`], then the item gets
/// the plugin's whole fuel budget, whatever the items before it burned, as it would alone.
/// What was burned before is kept (see [`HostState::fuel_refilled`]).
pub(crate) fn begin_item_in_store(
    mut store: wasmtime::StoreContextMut<'_, HostState>,
    index: u32,
) -> wasmtime::Result<()> {
    store.data().guest_may_drive_items("begin-item")?;
    store.data_mut().begin_item(index)?;
    refuel_item(store)
}

/// Begins call `index` of a run, which handles `event` and began `now`.
pub(crate) fn begin_run_item(
    mut store: wasmtime::StoreContextMut<'_, HostState>,
    index: usize,
    event: &Event,
    kv: &Arc<dyn KvSource>,
    now: std::time::Instant,
) -> wasmtime::Result<()> {
    let state = store.data_mut();
    let origin = state.origin(event);
    let Some(run) = state.batch.as_mut().filter(|batch| batch.run) else {
        return Err(host_trap("a run's call began outside a run".to_owned()));
    };
    let call = CallContext::new(
        origin,
        event,
        Arc::clone(kv),
        Some(Arc::clone(&run.inherited)),
    );
    run.current = Some(index);
    run.next = index + 1;
    run.item_started = now;
    state.call = Some(call);
    refuel_item(store)
}

/// Gives the item just begun the plugin's whole fuel budget, whatever the items before it
/// burned, as it would have alone; what they burned is kept (see
/// [`HostState::fuel_refilled`]).
fn refuel_item(mut store: wasmtime::StoreContextMut<'_, HostState>) -> wasmtime::Result<()> {
    let Some(item_fuel) = store.data().batch.as_ref().map(|batch| batch.item_fuel) else {
        return Ok(());
    };
    let left = store.get_fuel()?;
    store.set_fuel(item_fuel)?;
    let state = store.data_mut();
    state.fuel_refilled = state
        .fuel_refilled
        .saturating_add(item_fuel.saturating_sub(left));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emitted_ids_are_stable_per_event_and_index() {
        let a = emitted_event_id("p", "/src", "e1", 0);
        assert_eq!(a, emitted_event_id("p", "/src", "e1", 0));
        assert_ne!(a, emitted_event_id("p", "/src", "e1", 1));
        assert_ne!(a, emitted_event_id("q", "/src", "e1", 0));
        assert_ne!(a, emitted_event_id("p", "/src", "e2", 0));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
