//! The HTTP API (axum): ingest of CloudEvents, reading the log, plugin status, dead
//! letters, metrics and health.
//!
//! [`router`] builds the whole API from an [`AppState`], so tests drive it without a
//! socket. Every error is an [`ApiError`]: JSON `{"error": {"code", "message"}}` with
//! the right status. Ingest routes need an ingest token, the stream and schedule routes
//! an ingest or an admin token, and the rest of `/v1` an admin token when tokens are
//! configured; `/healthz`, `/readyz`, `/metrics` and the status
//! page's static files (`/ui`, which asks for the token itself) are open. `gate` holds
//! those checks and the `[http]` limits on requests in flight and time.

mod admin;
pub mod cloudevents;
mod controls;
pub mod error;
mod events;
mod gate;
mod origin;
mod schemas;
mod streams;
mod ui;
mod wait;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::middleware;
use axum::routing::{delete, get, post};

pub use self::error::ApiError;
use self::gate::{Gate, Guard};
use crate::bus::Bus;
use crate::config::Config;
use crate::dispatch::valve::Valves;
use crate::metrics::Metrics;
use crate::plugins::PluginTable;
use crate::schema::Schemas;
use crate::stats::Stats;

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
    /// The schema registry events are checked against.
    pub schemas: Arc<Schemas>,
    /// Permits of events waited for (`?wait=`), `[ingest] max_waiters` in all.
    pub waiters: Arc<tokio::sync::Semaphore>,
    /// The history the status page plots (empty unless a sampler fills it).
    pub stats: Arc<Stats>,
    /// Plugin pauses and breakers.
    pub valves: Arc<Valves>,
    /// The last `/metrics` page and when its making began (see `admin::metrics`).
    pub(crate) scrape: tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl AppState {
    /// The state of a host's API: no request waiting yet.
    pub fn new(
        bus: Arc<dyn Bus>,
        plugins: PluginTable,
        metrics: Arc<Metrics>,
        config: Arc<Config>,
        schemas: Arc<Schemas>,
    ) -> Self {
        Self {
            waiters: Arc::new(tokio::sync::Semaphore::new(config.ingest.max_waiters)),
            valves: Valves::new(Arc::clone(&bus), Arc::clone(&metrics)),
            bus,
            plugins,
            metrics,
            config,
            runtime: None,
            ready: AtomicBool::new(false),
            schemas,
            stats: Arc::default(),
            scrape: tokio::sync::Mutex::new(None),
        }
    }
}

/// Builds the HTTP API.
pub fn router(state: Arc<AppState>) -> Router {
    let in_flight = Arc::new(gate::Places::new(state.config.http.max_concurrent_requests));
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
    let producer = Router::new()
        .route("/v1/streams/{*subject}", get(streams::read_stream))
        .route("/v1/scheduled", get(streams::list_scheduled))
        .route("/v1/scheduled/{id}", delete(streams::cancel_scheduled))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            gate::reachable,
        ))
        .route_layer(middleware::from_fn_with_state(
            gate(Guard::Producer),
            gate::admit,
        ));
    let admin = Router::new()
        .route("/v1/events", get(events::read_log))
        .route("/v1/plugins", get(admin::list_plugins))
        .route(
            "/v1/plugins/{name}",
            get(admin::show_plugin).delete(admin::forget_plugin),
        )
        .route("/v1/plugins/{name}/pause", post(controls::pause))
        .route("/v1/plugins/{name}/resume", post(controls::resume))
        .route("/v1/plugins/{name}/kv", get(admin::list_kv))
        .route("/v1/plugins/{name}/kv/{*key}", get(admin::read_kv))
        .route("/v1/backup", get(admin::backup))
        .route(
            "/v1/dlq",
            get(admin::list_dead_letters).delete(admin::delete_plugin_dead_letters),
        )
        .route("/v1/dlq/replay", post(admin::replay_plugin))
        .route(
            "/v1/dlq/{id}",
            get(admin::show_dead_letter).delete(admin::delete_dead_letter),
        )
        .route("/v1/dlq/{id}/replay", post(admin::replay_one))
        .route("/v1/schemas", get(schemas::list))
        .route(
            "/v1/schemas/{type}",
            get(schemas::show).put(schemas::register),
        )
        .route("/v1/schemas/{type}/{version}", get(schemas::version))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            gate::reachable,
        ))
        // The history is the host's own: it answers while the bus cannot be reached.
        .route("/v1/stats", get(admin::stats))
        .route_layer(middleware::from_fn_with_state(
            gate(Guard::Admin),
            gate::admit,
        ));
    // `GET /v1/events` is admin, `POST /v1/events` ingest: merge keeps both methods.
    ingest
        .merge(producer)
        .merge(admin)
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index))
        .route("/ui/{asset}", get(ui::asset))
        .route("/healthz", get(admin::healthz))
        .route("/readyz", get(admin::readyz))
        .route("/metrics", get(admin::metrics))
        .fallback(|| async { ApiError::not_found("route") })
        // Called after every route is in, so it covers them all; the `Allow` header stays.
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                error::code::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed here; `Allow` lists the methods that are"),
            )
        })
        .layer(middleware::from_fn_with_state(
            Arc::new(origin::Exposure::of(&state.config)),
            origin::guard,
        ))
        .with_state(state)
}

/// The path parameters of a request, parsed. A value that cannot be what the route takes
/// (`/v1/dlq/abc`, where dead letters have numbers) names nothing: `404 not_found` in the
/// API's JSON error shape; other failures (a value that is not UTF-8 once decoded) are
/// `400 bad_request`. (axum's own `Path` answers both `400` in plain text.)
pub(crate) struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(PathRejection::FailedToDeserializePathParams(failure)) => match failure.kind() {
                ErrorKind::ParseErrorAtKey { value, .. }
                | ErrorKind::ParseErrorAtIndex { value, .. }
                | ErrorKind::ParseError { value, .. } => Err(ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    error::code::NOT_FOUND,
                    format!("nothing is found at `{value}`: that part of the path is a number"),
                )),
                _ => Err(ApiError::bad_request(
                    error::code::BAD_REQUEST,
                    failure.body_text(),
                )),
            },
            Err(rejection) => Err(ApiError::bad_request(
                error::code::BAD_REQUEST,
                rejection.body_text(),
            )),
        }
    }
}

/// The query string of a request, parsed; a bad one is `400 invalid_query` in the API's
/// JSON error shape, naming what is wrong (axum's own `Query` answers in plain text).
pub(crate) struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Self(value))
            .map_err(|rejection| {
                ApiError::bad_request(error::code::INVALID_QUERY, rejection.body_text())
            })
    }
}
