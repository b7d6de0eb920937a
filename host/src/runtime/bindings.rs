//! The one `bindgen!` of the host: Rust types and traits generated from `wit/`.
//!
//! Every host import is `async` (KV reads may wait on the bus) and `trappable` (a call
//! that breaks a host rule is stopped with a trap that carries a [`super::host::HostTrap`]).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "switchyard:plugin/plugin",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use self::switchyard::plugin::{host, types};
