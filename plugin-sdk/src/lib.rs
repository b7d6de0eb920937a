//! Write Switchyard event-handler plugins in Rust.
//!
//! A Switchyard plugin is a WebAssembly component that targets the `batch-plugin` world
//! of the WIT package `switchyard:plugin@0.2.0` (the `plugin` world with the batch
//! handler; the SDK runs a batch through the same function). This crate hides the bindings: a plugin is one
//! function marked with [`#[handler]`](handler), and the host's functions are plain Rust
//! functions and macros ([`emit_json`], [`kv`], [`config`], [`info!`], …).
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "ticketing"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! switchyard-sdk = { path = "../switchyard/plugin-sdk" }
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use switchyard_sdk::{handler, Delivery, Event, HandlerError};
//!
//! #[derive(Deserialize)]
//! struct Payment {
//!     order_id: String,
//!     email: String,
//!     #[serde(default = "one")]
//!     quantity: u32,
//! }
//!
//! fn one() -> u32 {
//!     1
//! }
//!
//! #[derive(Serialize)]
//! struct Tickets {
//!     order_id: String,
//!     email: String,
//!     tickets: Vec<String>,
//! }
//!
//! #[handler(subscribe = ["payment.completed"])]
//! fn handle(event: Event, delivery: Delivery) -> Result<(), HandlerError> {
//!     // Malformed data is a permanent failure: `HandlerError::Reject` with serde's message.
//!     let payment: Payment = event.json()?;
//!     switchyard_sdk::info!("order {} attempt {}", payment.order_id, delivery.attempt);
//!
//!     let key = format!("order/{}", payment.order_id);
//!     if switchyard_sdk::kv::get(&key).is_some() {
//!         return Ok(()); // already handled: stay idempotent
//!     }
//!     let tickets: Vec<String> = (1..=payment.quantity)
//!         .map(|n| format!("{}-{n}", payment.order_id))
//!         .collect();
//!     switchyard_sdk::kv::set_json(&key, &tickets)?;
//!     switchyard_sdk::Emit::new("tickets.generated")
//!         .subject(payment.order_id.as_str())
//!         .partition_key(payment.order_id.as_str())
//!         .json(&Tickets { order_id: payment.order_id, email: payment.email, tickets })?
//!         .send();
//!     Ok(())
//! }
//! # fn main() {}
//! ```
//!
//! # Building
//!
//! ```text
//! rustup target add wasm32-wasip2
//! cargo build --target wasm32-wasip2 --release
//! ```
//!
//! This produces one component, `target/wasm32-wasip2/release/ticketing.wasm`. Drop it into
//! the host's plugin directory (optionally next to a `ticketing.toml` sidecar) and the host
//! loads it.
//!
//! # Semantics worth knowing
//!
//! - Returning `Ok(())` acknowledges the event. [`HandlerError::retry`] asks for another
//!   attempt later (with backoff); [`HandlerError::reject`] sends the event straight to the
//!   dead letters. A panic traps the component and counts as a retryable failure.
//! - [`emit`] and the [`kv`] writes are transactional: they are buffered during the call and
//!   committed only if the handler returns `Ok(())`. Reads see the call's own writes.
//! - Delivery is at least once: the same event may reach the handler more than once, so
//!   handlers that emit should be idempotent (for example with a [`kv`] marker, as above).
//! - Every event with a subject belongs to that subject's stream ([`stream`]): read it to
//!   rebuild an aggregate, and append with [`Emit::expected_version`] so that two handlers
//!   deciding on the same state never both append. Reads are optimistic: when what a call
//!   read changes before it commits, the host runs the handler again on the new state.
//! - [`Emit::delay`] and [`Emit::deliver_at`] schedule an event for later (a timeout, a
//!   reminder); [`cancel_scheduled`] takes one back.
//! - A plugin has no filesystem, network, environment or clock beyond what the host grants;
//!   its stdout and stderr go to the host's log.
//! - Every plugin built with this SDK can also take its events in batches: the operator
//!   turns it on with a `[batch]` table in the sidecar, and the host then hands the
//!   plugin several events in one call, which the SDK runs through the same handler one
//!   by one. Each event keeps its own outcome: its effects commit only if it returns
//!   `Ok(())`, a failed event takes nothing of its effects along, and the events after it
//!   see what the acknowledged ones before them wrote.
//!
//! The SDK compiles on native targets too, so a plugin crate can be checked, linted and
//! unit-tested with plain `cargo`. There the host functions are stubs that abort the
//! process, so unit tests should exercise the pure parts of a handler (decoding, deciding)
//! rather than call [`emit`], [`kv`], [`config`] or the log macros.

#![deny(missing_docs)]

pub mod config;
mod emit;
mod event;
pub mod kv;
mod log;
pub mod stream;

pub use emit::{Emit, emit, emit_json};
pub use log::log;

/// Marks the function that handles events and turns the crate into a Switchyard plugin.
///
/// The function must take `(event: Event, delivery: Delivery)` and return
/// `Result<(), HandlerError>`; it is kept as written, so it can also be called from unit
/// tests.
///
/// Arguments:
///
/// - `subscribe = ["payment.completed", "order.*", "audit.>"]` (required): the event-type
///   patterns the plugin asks for. `.` separates segments, `*` matches exactly one segment
///   and `>` matches one or more trailing segments. The operator's sidecar file can override
///   them.
/// - `name = "..."` (optional): the plugin's name; defaults to the crate's package name.
/// - `version = "..."` (optional): the plugin's version; defaults to the crate's version.
///
/// ```
/// use switchyard_sdk::{handler, Delivery, Event, HandlerError};
///
/// #[handler(subscribe = ["order.*"], name = "orders", version = "1.2.0")]
/// fn on_order(event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
///     switchyard_sdk::debug!("got {}", event.id);
///     Ok(())
/// }
/// # fn main() {}
/// ```
///
/// A crate has exactly one handler. A wrong signature is a compile error that names the fix:
///
/// ```compile_fail
/// use switchyard_sdk::{handler, Event, HandlerError};
///
/// #[handler(subscribe = [">"])]
/// fn handle(event: Event) -> Result<(), HandlerError> { // error: the delivery is missing
///     Ok(())
/// }
/// # fn main() {}
/// ```
///
/// and so is a malformed subscription pattern:
///
/// ```compile_fail
/// use switchyard_sdk::{handler, Delivery, Event, HandlerError};
///
/// #[handler(subscribe = ["order..created"])] // error: empty segment
/// fn handle(_event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
///     Ok(())
/// }
/// # fn main() {}
/// ```
pub use switchyard_sdk_macros::handler;

/// The generated bindings and the pieces the [`handler`] attribute expands to.
///
/// Not part of the public API: its contents change without notice.
#[doc(hidden)]
pub mod __private {
    /// The bindings of the `switchyard:plugin/batch-plugin` world, generated by `wit-bindgen`.
    #[allow(
        unsafe_code,
        missing_docs,
        unreachable_pub,
        clippy::all,
        clippy::pedantic,
        clippy::nursery
    )]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "wit",
            world: "switchyard:plugin/batch-plugin@0.2.0",
            pub_export_macro: true,
            default_bindings_module: "::switchyard_sdk::__private::bindings",
            additional_derives: [PartialEq, Eq],
        });
    }

    pub use bindings::exports::switchyard::plugin::batch_handler::{
        BatchItem, Guest as BatchGuest,
    };
    pub use bindings::exports::switchyard::plugin::handler::Guest;
    pub use bindings::switchyard::plugin::host;

    use crate::{Delivery, Event, HandlerError};

    /// The batch handler every plugin exports: each item through the one handler, between
    /// `begin-item` and `end-item`, so its effects are the item's own.
    pub fn run_batch(
        items: Vec<BatchItem>,
        handler: fn(Event, Delivery) -> Result<(), HandlerError>,
    ) {
        for (index, item) in items.into_iter().enumerate() {
            host::begin_item(u32::try_from(index).unwrap_or(u32::MAX));
            let outcome = handler(item.event, item.delivery);
            host::end_item(outcome.as_ref().map(|_| ()));
        }
    }
}

pub use __private::bindings::switchyard::plugin::types::{
    Delivery, Event, HandlerError, LogLevel, OutgoingEvent, PluginInfo, Schedule, StreamPage,
};

/// Cancels a scheduled event that has not been published yet, by the id [`Emit::send`]
/// returned for it (in this plugin or another) or a producer gave it; returns whether it
/// was pending.
///
/// The cancellation commits with the call, like every effect. If the event is published
/// before the call commits, the host runs the handler again, and this then returns `false`.
pub fn cancel_scheduled(id: &str) -> bool {
    __private::host::cancel_scheduled(id)
}

#[cfg(test)]
mod tests {
    /// The SDK carries its own copy of the contract; it must not drift from the workspace's.
    #[test]
    fn wit_copy_matches_the_contract() {
        let pairs = [
            (
                include_str!("../wit/world.wit"),
                include_str!("../../wit/world.wit"),
            ),
            (
                include_str!("../wit/types.wit"),
                include_str!("../../wit/types.wit"),
            ),
            (
                include_str!("../wit/handler.wit"),
                include_str!("../../wit/handler.wit"),
            ),
            (
                include_str!("../wit/host.wit"),
                include_str!("../../wit/host.wit"),
            ),
        ];
        for (i, (ours, theirs)) in pairs.iter().enumerate() {
            assert_eq!(ours, theirs, "plugin-sdk/wit differs from wit/ (file {i})");
        }
    }

    #[test]
    fn wit_directories_list_the_same_files() {
        let names = |dir: &str| {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".wit"))
                .collect();
            v.sort();
            v
        };
        let root = env!("CARGO_MANIFEST_DIR");
        assert_eq!(
            names(&format!("{root}/wit")),
            names(&format!("{root}/../wit"))
        );
    }
}
