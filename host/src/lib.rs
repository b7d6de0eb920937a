//! # switchyard-host
//!
//! The Switchyard host: it takes CloudEvents in, keeps them in a durable log and routes
//! each one into the sandboxed WebAssembly handler plugins subscribed to its type.
//!
//! - [`event`]: the CloudEvents model and event-type rules.
//! - [`pattern`]: subscription patterns (`order.*`, `payment.>`).
//! - [`runtime`]: the wasmtime runtime that loads, validates and invokes plugins with
//!   fuel, memory and time limits and transactional effects.
//! - [`cli`]: the `switchyard` command line.

pub mod bus;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod pattern;
pub mod plugins;
pub mod runtime;
pub mod server;
