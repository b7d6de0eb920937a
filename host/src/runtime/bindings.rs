//! The host's `bindgen!`s, one per contract version it serves, and the adapters between
//! them and the host's own types.
//!
//! `wit/` holds the current contract (`0.2.0`); every earlier version is frozen in
//! `wit/<version>/`. The host state implements the current `host` interface
//! ([`super::host`]); an older version's imports are adapted onto it here, so there is one
//! implementation of every import.
//!
//! The exports are called without the generated bindings: the records the host passes
//! (the event, a batch's items) are lowered from views that borrow the host's own event
//! ([`super::lowering`]). A component's exports are found when it loads and type-checked
//! by its first instance ([`PluginPre`]); the records are the same in every contract
//! version so far, so one set of calls ([`Exports`]) serves them all.
//!
//! Every host import but `begin-item` and `end-item` is `async` (KV and stream reads may
//! wait on the bus), and every one is `trappable` (a call that breaks a host rule is
//! stopped with a trap that carries a [`super::host::HostTrap`]).

use std::sync::atomic::{AtomicBool, Ordering};

use wasmtime::Store;
use wasmtime::component::{ComponentExportIndex, Func, HasSelf, InstancePre, Linker, TypedFunc};

use super::host::HostState;
use super::lowering::{BatchItemView, EventView};
use super::plugin::Delivery;
use crate::event::Event;

/// The contract `switchyard:plugin@0.2.0`, the current one.
pub(crate) mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "switchyard:plugin/plugin@0.2.0",
        // Marking a batch's items never waits: a plain call costs a batch less per item.
        imports: {
            "switchyard:plugin/host.begin-item": trappable,
            "switchyard:plugin/host.end-item": trappable,
            default: async | trappable,
        },
        exports: { default: async },
    });

    pub(crate) use self::switchyard::plugin::{host, types};
}

/// The contract `switchyard:plugin@0.1.0`, frozen: what it lacks over `0.2.0` is simply
/// not offered to its plugins.
pub(crate) mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/0.1.0",
        world: "switchyard:plugin/plugin@0.1.0",
        imports: { default: async | trappable },
        exports: { default: async },
    });

    pub(crate) use self::switchyard::plugin::{host, types};
}

pub(crate) use v0_2::{host, types};

/// The contract version a component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContractVersion {
    V0_1,
    V0_2,
}

impl ContractVersion {
    /// Parses a version as it appears in a component's export names.
    pub(crate) fn parse(version: &str) -> Option<Self> {
        match version {
            "0.1.0" => Some(Self::V0_1),
            "0.2.0" => Some(Self::V0_2),
            _ => None,
        }
    }

    /// The version as written in the package name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::V0_1 => "0.1.0",
            Self::V0_2 => "0.2.0",
        }
    }
}

/// Adds the imports of every contract version to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    v0_2::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    // `begin-item` needs the store, to give each item of a batch its own fuel, which the
    // generated bindings' `Host` trait does not reach: it is defined again over them.
    linker.allow_shadowing(true);
    linker
        .instance("switchyard:plugin/host@0.2.0")?
        .func_wrap("begin-item", |store, (index,): (u32,)| {
            super::host::begin_item_in_store(store, index)
        })?;
    linker.allow_shadowing(false);
    v0_1::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}

fn wit_delivery(delivery: Delivery) -> types::Delivery {
    types::Delivery {
        attempt: delivery.attempt,
        max_attempts: delivery.max_attempts,
        sequence: delivery.sequence,
    }
}

/// `handle`'s parameters and results; the same in every contract version so far.
type HandleParams<'a> = (EventView<'a>, types::Delivery);
type HandleResults = (Result<(), types::HandlerError>,);
/// `handle-batch`'s.
type BatchParams<'a> = (&'a [BatchItemView<'a>],);
/// `describe`'s.
type DescribeResults = (types::PluginInfo,);

/// A component pre-instantiated, with where its handler's exports are. The exports are
/// found once, when the component loads, and type-checked once, by its first instance;
/// every later instance and call uses them as they are.
pub(crate) struct PluginPre {
    pre: InstancePre<HostState>,
    handle: ComponentExportIndex,
    describe: ComponentExportIndex,
    handle_batch: Option<ComponentExportIndex>,
    checked: AtomicBool,
}

impl PluginPre {
    pub(crate) fn new(
        version: ContractVersion,
        batch: bool,
        pre: InstancePre<HostState>,
    ) -> wasmtime::Result<Self> {
        let version = version.as_str();
        let component = pre.component();
        let export = |interface: &str, name: &str| {
            let interface = format!("switchyard:plugin/{interface}@{version}");
            component
                .get_export_index(None, &interface)
                .and_then(|index| component.get_export_index(Some(&index), name))
                .ok_or_else(|| wasmtime::format_err!("no export `{name}` in `{interface}`"))
        };
        Ok(Self {
            handle: export("handler", "handle")?,
            describe: export("handler", "describe")?,
            handle_batch: if batch {
                Some(export("batch-handler", "handle-batch")?)
            } else {
                None
            },
            pre,
            checked: AtomicBool::new(false),
        })
    }

    /// Whether the component exports the batch handler.
    pub(crate) fn has_batch_handler(&self) -> bool {
        self.handle_batch.is_some()
    }

    pub(crate) async fn instantiate_async(
        &self,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<Exports> {
        let instance = self.pre.instantiate_async(&mut *store).await?;
        let func = |store: &mut Store<HostState>, index: &ComponentExportIndex| {
            instance
                .get_func(store, index)
                .ok_or_else(|| wasmtime::format_err!("a handler export is not a function"))
        };
        let exports = Exports {
            handle: func(store, &self.handle)?,
            describe: func(store, &self.describe)?,
            handle_batch: match &self.handle_batch {
                Some(index) => Some(func(store, index)?),
                None => None,
            },
        };
        if !self.checked.load(Ordering::Acquire) {
            exports.check(store)?;
            self.checked.store(true, Ordering::Release);
        }
        Ok(exports)
    }
}

/// An instance's handler exports.
pub(crate) struct Exports {
    handle: Func,
    describe: Func,
    handle_batch: Option<Func>,
}

/// What `describe()` returned, whatever the version.
pub(crate) struct Described {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) subscriptions: Vec<String>,
}

/// A handler's own error, whatever the version.
pub(crate) enum HandlerError {
    Retry(String),
    Reject(String),
}

impl Exports {
    /// Checks that the exports have the types the calls below give them.
    fn check(&self, store: &Store<HostState>) -> wasmtime::Result<()> {
        self.handle
            .typed::<HandleParams<'static>, HandleResults>(store)?;
        self.describe.typed::<(), DescribeResults>(store)?;
        if let Some(handle_batch) = self.handle_batch {
            handle_batch.typed::<BatchParams<'static>, ()>(store)?;
        }
        Ok(())
    }

    /// Calls the handler's `handle`.
    pub(crate) async fn handle(
        &self,
        store: &mut Store<HostState>,
        event: &Event,
        delivery: Delivery,
    ) -> wasmtime::Result<Result<(), HandlerError>> {
        let (answer,) = typed_handle(self.handle)
            .call_async(store, (EventView::of(event), wit_delivery(delivery)))
            .await?;
        Ok(answer.map_err(|error| match error {
            types::HandlerError::Retry(message) => HandlerError::Retry(message),
            types::HandlerError::Reject(message) => HandlerError::Reject(message),
        }))
    }

    /// Calls the batch handler's `handle-batch`; `None` for a plugin without one.
    pub(crate) async fn handle_batch(
        &self,
        store: &mut Store<HostState>,
        items: &[(&Event, Delivery)],
    ) -> Option<wasmtime::Result<()>> {
        let handle_batch = self.handle_batch?;
        let items: Vec<BatchItemView<'_>> = items
            .iter()
            .map(|(event, delivery)| BatchItemView::of(event, wit_delivery(*delivery)))
            .collect();
        Some(
            typed_handle_batch(handle_batch)
                .call_async(store, (&items,))
                .await,
        )
    }

    /// Calls the handler's `describe`.
    pub(crate) async fn describe(
        &self,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<Described> {
        let (info,) = self
            .describe
            .typed::<(), DescribeResults>(&*store)?
            .call_async(store, ())
            .await?;
        Ok(Described {
            name: info.name,
            version: info.version,
            subscriptions: info.subscriptions,
        })
    }
}

/// `handle` as a typed function whose event borrows the host's.
#[allow(unsafe_code)]
fn typed_handle<'a>(func: Func) -> TypedFunc<HandleParams<'a>, HandleResults> {
    // SAFETY: `func` is an instance's `handle`, whose type `Exports::check` compared with
    // exactly these parameters and results when the component's first instance was
    // made; every instance of a component has the same types, and the lifetime of the
    // borrowed strings plays no part in a component type.
    unsafe { TypedFunc::new_unchecked(func) }
}

/// `handle-batch` as a typed function whose events borrow the host's.
#[allow(unsafe_code)]
fn typed_handle_batch<'a>(func: Func) -> TypedFunc<BatchParams<'a>, ()> {
    // SAFETY: as for `typed_handle`: `Exports::check` compared `handle-batch`'s type with
    // exactly these parameters and results.
    unsafe { TypedFunc::new_unchecked(func) }
}

impl v0_1::types::Host for HostState {}

/// `0.1.0`'s imports, adapted onto the current ones.
impl v0_1::host::Host for HostState {
    async fn log(&mut self, level: v0_1::types::LogLevel, message: String) -> wasmtime::Result<()> {
        use v0_1::types::LogLevel as Old;
        let level = match level {
            Old::Trace => types::LogLevel::Trace,
            Old::Debug => types::LogLevel::Debug,
            Old::Info => types::LogLevel::Info,
            Old::Warn => types::LogLevel::Warn,
            Old::Error => types::LogLevel::Error,
        };
        host::Host::log(self, level, message).await
    }

    async fn emit(&mut self, event: v0_1::types::OutgoingEvent) -> wasmtime::Result<String> {
        let event = types::OutgoingEvent {
            type_: event.type_,
            subject: event.subject,
            datacontenttype: event.datacontenttype,
            data: event.data,
            extensions: event.extensions,
            expected_version: None,
            schedule: None,
        };
        host::Host::emit(self, event).await
    }

    async fn kv_get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        host::Host::kv_get(self, key).await
    }

    async fn kv_set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        host::Host::kv_set(self, key, value).await
    }

    async fn kv_delete(&mut self, key: String) -> wasmtime::Result<()> {
        host::Host::kv_delete(self, key).await
    }

    async fn kv_keys(&mut self, prefix: String) -> wasmtime::Result<Vec<String>> {
        host::Host::kv_keys(self, prefix).await
    }

    async fn config_get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        host::Host::config_get(self, key).await
    }
}
