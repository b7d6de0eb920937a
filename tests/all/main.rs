//! The integration tests of Switchyard: one test binary, one module per area.
//!
//! Guest plugins are built once per test process (see `support::guests`).

// A test binary: failing loudly is how helpers report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod backup;
mod batches;
mod check_cli;
mod cloudevents_sdk;
mod distributed;
mod event_sourcing;
mod examples;
mod hot_reload;
mod polyglot;
mod producers;
mod retention;
mod runtime_effects;
mod runtime_failures;
mod runtime_isolation;
mod scheduled;
mod serve_controls;
mod serve_disk;
mod serve_flow;
mod serve_hostile;
mod serve_http;
mod serve_limits;
mod serve_recovery;
mod serve_retries;
mod traces;
mod ui;
mod validation;
mod watch_fallback;
