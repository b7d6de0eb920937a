//! The peer of Switchyard's `noop` test plugin: an Extism plug-in whose `handle` takes an
//! event (as JSON bytes) and does nothing with it.

use extism_pdk::{FnResult, plugin_fn};

/// Handles one event.
#[plugin_fn]
pub fn handle(event: Vec<u8>) -> FnResult<()> {
    std::hint::black_box(event);
    Ok(())
}
