//! The host's `bindgen!`s, one per contract version it serves, and the adapters between
//! them and the host's own types.
//!
//! `wit/` holds the current contract (`0.2.0`); every earlier version is frozen in
//! `wit/<version>/`. The host state implements the current `host` interface
//! ([`super::host`]); an older version's imports are adapted onto it here, so there is one
//! implementation of every import. A loaded component is bound to the version it was
//! built against ([`PluginPre`], [`PluginWorld`]), and the runtime calls its exports
//! through them without knowing which version it is.
//!
//! Every host import but `begin-item` and `end-item` is `async` (KV and stream reads may
//! wait on the bus), and every one is `trappable` (a call that breaks a host rule is
//! stopped with a trap that carries a [`super::host::HostTrap`]).

use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

use super::host::HostState;
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

/// The `batch-plugin` world of `0.2.0`: the same imports and types (one implementation),
/// and the batch handler among the exports.
pub(crate) mod v0_2_batch {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "switchyard:plugin/batch-plugin@0.2.0",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "switchyard:plugin/types": super::v0_2::switchyard::plugin::types,
            "switchyard:plugin/host": super::v0_2::switchyard::plugin::host,
        },
    });
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

/// Adds the imports of every contract version to `linker` (the batch world's are the
/// current version's).
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    v0_2::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    v0_1::Plugin::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}

/// A component pre-instantiated against the bindings of its contract version (and
/// world: with or without the batch handler).
pub(crate) enum PluginPre {
    V0_1(v0_1::PluginPre<HostState>),
    V0_2(v0_2::PluginPre<HostState>),
    V0_2Batch(v0_2_batch::BatchPluginPre<HostState>),
}

impl PluginPre {
    pub(crate) fn new(
        version: ContractVersion,
        batch: bool,
        pre: InstancePre<HostState>,
    ) -> wasmtime::Result<Self> {
        Ok(match (version, batch) {
            (ContractVersion::V0_1, _) => Self::V0_1(v0_1::PluginPre::new(pre)?),
            (ContractVersion::V0_2, false) => Self::V0_2(v0_2::PluginPre::new(pre)?),
            (ContractVersion::V0_2, true) => Self::V0_2Batch(v0_2_batch::BatchPluginPre::new(pre)?),
        })
    }

    /// Whether the component exports the batch handler.
    pub(crate) fn has_batch_handler(&self) -> bool {
        matches!(self, Self::V0_2Batch(_))
    }

    pub(crate) async fn instantiate_async(
        &self,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<PluginWorld> {
        Ok(match self {
            Self::V0_1(pre) => PluginWorld::V0_1(pre.instantiate_async(store).await?),
            Self::V0_2(pre) => PluginWorld::V0_2(pre.instantiate_async(store).await?),
            Self::V0_2Batch(pre) => PluginWorld::V0_2Batch(pre.instantiate_async(store).await?),
        })
    }
}

/// An instance's exports, in the types of its contract version.
pub(crate) enum PluginWorld {
    V0_1(v0_1::Plugin),
    V0_2(v0_2::Plugin),
    V0_2Batch(v0_2_batch::BatchPlugin),
}

/// What `describe()` returned, whatever the version.
pub(crate) struct Described {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) subscriptions: Vec<String>,
}

/// Converts the host's event and delivery into one version's WIT records, and a
/// handler's answer back; the records are the same in every version so far.
macro_rules! wit_calls {
    ($version:ident, $store:expr, $plugin:expr, $event:expr, $delivery:expr) => {{
        use $version::types as wit;
        let event = wit::Event {
            id: $event.id.clone(),
            source: $event.source.clone(),
            type_: $event.ty.clone(),
            subject: $event.subject.clone(),
            time: $event.time.clone(),
            datacontenttype: $event.datacontenttype.clone(),
            dataschema: $event.dataschema.clone(),
            data: $event.data.clone(),
            extensions: $event
                .extensions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let delivery = wit::Delivery {
            attempt: $delivery.attempt,
            max_attempts: $delivery.max_attempts,
            sequence: $delivery.sequence,
        };
        $plugin
            .switchyard_plugin_handler()
            .call_handle($store, &event, delivery)
            .await
            .map(|answer| {
                answer.map_err(|error| match error {
                    wit::HandlerError::Retry(message) => HandlerError::Retry(message),
                    wit::HandlerError::Reject(message) => HandlerError::Reject(message),
                })
            })
    }};
}

/// A handler's own error, whatever the version.
pub(crate) enum HandlerError {
    Retry(String),
    Reject(String),
}

impl PluginWorld {
    /// Calls the handler's `handle`.
    pub(crate) async fn handle(
        &self,
        store: &mut Store<HostState>,
        event: &Event,
        delivery: Delivery,
    ) -> wasmtime::Result<Result<(), HandlerError>> {
        match self {
            Self::V0_1(plugin) => wit_calls!(v0_1, &mut *store, plugin, event, delivery),
            Self::V0_2(plugin) => wit_calls!(v0_2, &mut *store, plugin, event, delivery),
            Self::V0_2Batch(plugin) => wit_calls!(v0_2, &mut *store, plugin, event, delivery),
        }
    }

    /// Calls the batch handler's `handle-batch`; `None` for a plugin without one.
    pub(crate) async fn handle_batch(
        &self,
        store: &mut Store<HostState>,
        items: &[(&Event, Delivery)],
    ) -> Option<wasmtime::Result<()>> {
        let Self::V0_2Batch(plugin) = self else {
            return None;
        };
        let items: Vec<v0_2_batch::exports::switchyard::plugin::batch_handler::BatchItem> = items
            .iter()
            .map(|(event, delivery)| {
                v0_2_batch::exports::switchyard::plugin::batch_handler::BatchItem {
                    event: super::host::to_wit_event(event),
                    delivery: types::Delivery {
                        attempt: delivery.attempt,
                        max_attempts: delivery.max_attempts,
                        sequence: delivery.sequence,
                    },
                }
            })
            .collect();
        Some(
            plugin
                .switchyard_plugin_batch_handler()
                .call_handle_batch(store, &items)
                .await,
        )
    }

    /// Calls the handler's `describe`.
    pub(crate) async fn describe(
        &self,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<Described> {
        macro_rules! described {
            ($plugin:expr) => {{
                let info = $plugin
                    .switchyard_plugin_handler()
                    .call_describe(store)
                    .await?;
                Described {
                    name: info.name,
                    version: info.version,
                    subscriptions: info.subscriptions,
                }
            }};
        }
        Ok(match self {
            Self::V0_1(plugin) => described!(plugin),
            Self::V0_2(plugin) => described!(plugin),
            Self::V0_2Batch(plugin) => described!(plugin),
        })
    }
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
