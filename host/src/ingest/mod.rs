//! The HTTP API (axum): ingest of CloudEvents, reading the log, plugin status, dead
//! letters, metrics and health.
//!
//! [`router`] builds the whole API from an [`AppState`], so tests drive it without a
//! socket. Every error is an [`ApiError`]: JSON `{"error": {"code", "message"}}` with
//! the right status. Ingest routes need an ingest token and the rest of `/v1` an admin
//! token when tokens are configured; `/healthz`, `/readyz` and `/metrics` are open.
//! `gate` holds those checks and the `[http]` limits on requests in flight and time.

mod admin;
pub mod cloudevents;
pub mod error;
mod events;
mod gate;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::middleware;
use axum::routing::{get, post};
use tokio::sync::Semaphore;

pub use self::error::ApiError;
use self::gate::{Gate, Guard};
use crate::bus::Bus;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::plugins::PluginTable;

/// Everything the HTTP handlers share.
pub struct AppState {
    /// The bus.
    pub bus: Arc<dyn Bus>,
    /// The plugin table.
    pub plugins: PluginTable,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The host's config.
    pub config: Arc<Config>,
    /// The WebAssembly runtime, for its compile-cache counters (absent in tests that
    /// run the API alone).
    pub runtime: Option<crate::runtime::Runtime>,
    /// Whether plugins are loaded and dispatching.
    pub ready: AtomicBool,
}

/// Builds the HTTP API.
pub fn router(state: Arc<AppState>) -> Router {
    let in_flight = Arc::new(Semaphore::new(state.config.http.max_concurrent_requests));
    let gate = |guard| Gate {
        state: Arc::clone(&state),
        guard,
        in_flight: Arc::clone(&in_flight),
    };
    let ingest = Router::new()
        .route("/v1/events", post(events::ingest))
        .route("/v1/events/{type}", post(events::ingest_typed))
        .route_layer(middleware::from_fn_with_state(
            gate(Guard::Ingest),
            gate::admit,
        ));
    let admin = Router::new()
        .route("/v1/events", get(events::read_log))
        .route("/v1/plugins", get(admin::list_plugins))
        .route("/v1/plugins/{name}", get(admin::show_plugin))
        .route("/v1/plugins/{name}/kv/{*key}", get(admin::read_kv))
        .route("/v1/dlq", get(admin::list_dead_letters))
        .route("/v1/dlq/replay", post(admin::replay_plugin))
        .route(
            "/v1/dlq/{id}",
            get(admin::show_dead_letter).delete(admin::delete_dead_letter),
        )
        .route("/v1/dlq/{id}/replay", post(admin::replay_one))
        .route_layer(middleware::from_fn_with_state(
            gate(Guard::Admin),
            gate::admit,
        ));
    // `GET /v1/events` is admin, `POST /v1/events` ingest: merge keeps both methods.
    ingest
        .merge(admin)
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .fallback(|| async { ApiError::not_found("route") })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            gate::time_limit,
        ))
        .with_state(state)
}
