//! # switchyard-host
//!
//! The Switchyard host: it takes CloudEvents in, keeps them in a durable log and routes
//! each one into the sandboxed WebAssembly handler plugins subscribed to its type.
//!
//! ## The path of an event
//!
//! 1. [`ingest`] (the axum router) parses a CloudEvent ([`event`]) and appends it to the
//!    [`bus`] — the embedded SQLite log or NATS JetStream — answering `202` once it is
//!    durable.
//! 2. [`plugins`] keeps the plugin directory loaded: each `NAME.wasm` with its sidecar
//!    ([`plugins::manifest`], resolved into a policy), hot-swapped as files change.
//! 3. [`dispatch`] runs one consumer per plugin: it takes the deliveries whose type
//!    matches the plugin's subscriptions ([`pattern`]) and calls the plugin through the
//!    [`runtime`] (wasmtime, with fuel, memory and time limits).
//! 4. The attempt's outcome is settled on the bus in one transaction: on success its
//!    effects (emits and KV writes) with the acknowledgement; on failure a retry after
//!    the policy's backoff, or a dead letter.
//!
//! ## Modules, from the bottom up
//!
//! Imports point down this list only; `scripts/check-layers.py` fails on a cycle.
//!
//! - Shared vocabulary: [`event`] (the CloudEvents model), [`pattern`] (subscription
//!   patterns), `clock` (the one clock and time format), `units` (sizes and durations),
//!   `kv` (plugin KV reads, writes and the [`KvSource`] trait), `effects` (what a
//!   successful attempt commits), `failure` (failure kinds and attempt errors),
//!   [`retention`] (which events of the log may be deleted, and when).
//! - [`runtime`]: loads, validates and invokes plugins.
//! - `policy`: a plugin's delivery policy and retry curve, shared by sidecars and the
//!   host config; [`config`]: the host config file.
//! - [`bus`]: the [`Bus`] trait, its two backends and dead letters.
//! - [`metrics`]: the Prometheus metrics.
//! - [`dispatch`], then [`plugins`]: consumers per plugin, and the plugin table that
//!   starts and swaps them.
//! - [`stats`]: the bounded history of rates and lags the status page plots.
//! - [`ingest`]: the HTTP API and the status page (`/ui`); `server`: wires it all into
//!   `switchyard serve`;
//!   [`cli`]: the `switchyard` command line.

pub mod bus;
pub mod cli;
mod clock;
pub mod config;
pub mod dispatch;
mod effects;
pub mod event;
mod failure;
pub mod ingest;
mod kv;
pub mod metrics;
pub mod pattern;
pub mod plugins;
mod policy;
pub mod retention;
pub mod runtime;
pub mod schedule;
mod scheduler;
pub mod schema;
mod server;
pub mod stats;
pub mod stream;
pub mod telemetry;
mod units;

pub use crate::bus::{Bus, BusError};
pub use crate::clock::{now_ms, now_us};
pub use crate::effects::Effects;
pub use crate::failure::{AttemptError, FailureKind};
pub use crate::kv::{EmptyKv, KvError, KvRead, KvSource, KvWrite};
pub use crate::policy::retry::{Backoff, RetryDecision, RetryPolicy};
pub use crate::policy::{
    InstanceMode, ManifestError, Ordering, PluginDefaults, PluginPolicy, PolicyTable, Start,
};
pub use crate::server::serve;
pub use crate::units::{ParseSizeError, parse_duration, parse_size};
