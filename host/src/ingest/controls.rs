//! Pausing and resuming a plugin by hand (`POST /v1/plugins/{name}/pause|resume`), and
//! how a plugin's pause and breaker show in its status.
//!
//! Both routes change the control every host sharing the bus obeys (see
//! `crate::dispatch::valve`); they answer with the state in force afterwards. Pausing a
//! paused plugin, or resuming a running one, changes nothing and says so with the same
//! answer.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::error::code;
use super::{ApiError, ApiPath, AppState};
use crate::bus::{Breaker, BusError, PluginControl};
use crate::clock::rfc3339_ms;

/// A plugin's delivery state, as status shows it.
#[derive(Debug, Serialize)]
pub(super) struct DeliveryView {
    /// `running`, `paused` (by an operator), `breaker-open` or `probing`.
    pub(super) state: &'static str,
    /// Since when the state in force holds (absent while running).
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
    /// Why (absent while running).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The circuit breaker, also while paused.
    breaker: BreakerView,
}

#[derive(Debug, Serialize)]
struct BreakerView {
    /// `closed`, `open` or `probing`.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
    /// When the next probe may run (open), or the probe's lease ends (probing).
    #[serde(skip_serializing_if = "Option::is_none")]
    until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cooldown: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl From<&PluginControl> for DeliveryView {
    fn from(control: &PluginControl) -> Self {
        let breaker = match &control.breaker {
            Breaker::Closed => BreakerView {
                state: "closed",
                since: None,
                until: None,
                cooldown: None,
                reason: None,
            },
            Breaker::Open {
                since_ms,
                until_ms,
                cooldown_ms,
                reason,
            }
            | Breaker::Probing {
                since_ms,
                until_ms,
                cooldown_ms,
                reason,
            } => BreakerView {
                state: control.breaker.name(),
                since: Some(rfc3339_ms(*since_ms)),
                until: Some(rfc3339_ms(*until_ms)),
                cooldown: Some(
                    humantime::format_duration(std::time::Duration::from_millis(*cooldown_ms))
                        .to_string(),
                ),
                reason: Some(reason.clone()),
            },
        };
        let (state, since, reason) = match (&control.paused, &control.breaker) {
            (Some(paused), _) => (
                "paused",
                Some(rfc3339_ms(paused.since_ms)),
                Some(paused.reason.clone()),
            ),
            (None, Breaker::Closed) => ("running", None, None),
            (None, Breaker::Open { .. }) => (
                "breaker-open",
                breaker.since.clone(),
                breaker.reason.clone(),
            ),
            (None, Breaker::Probing { .. }) => {
                ("probing", breaker.since.clone(), breaker.reason.clone())
            }
        };
        Self {
            state,
            since,
            reason,
            breaker,
        }
    }
}

/// The optional body of `POST /v1/plugins/{name}/pause`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    /// Shown in status and the log.
    #[serde(default)]
    reason: String,
}

/// The answer of both routes.
#[derive(Debug, Serialize)]
pub(super) struct Changed {
    plugin: String,
    delivery: DeliveryView,
}

fn known(state: &AppState, name: &str) -> Result<(), ApiError> {
    let plugins = state
        .plugins
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if plugins.contains_key(name) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("plugin `{name}`")))
    }
}

fn stored(error: BusError) -> ApiError {
    match error {
        BusError::Conflict(message) => ApiError::new(
            axum::http::StatusCode::CONFLICT,
            code::CONFLICT,
            format!("{message}; another host kept changing it, try again"),
        ),
        other => ApiError::internal(other),
    }
}

/// `POST /v1/plugins/{name}/pause`, with an optional JSON body `{"reason": "…"}`.
pub(super) async fn pause(
    State(state): State<Arc<AppState>>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Changed>, ApiError> {
    known(&state, &name)?;
    let body = super::events::read_json_body(&state, &headers, body, &["application/json"]).await?;
    let body: PauseBody = if body.iter().all(u8::is_ascii_whitespace) {
        PauseBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| {
            ApiError::bad_request(
                code::MALFORMED_JSON,
                format!("the body must be JSON such as {{\"reason\": \"maintenance\"}}: {error}"),
            )
        })?
    };
    let control = state
        .valves
        .pause(&name, body.reason)
        .await
        .map_err(stored)?;
    Ok(Json(Changed {
        plugin: name,
        delivery: DeliveryView::from(&control),
    }))
}

/// `POST /v1/plugins/{name}/resume`: ends a pause and closes an open breaker.
pub(super) async fn resume(
    State(state): State<Arc<AppState>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Changed>, ApiError> {
    known(&state, &name)?;
    let control = state.valves.resume(&name).await.map_err(stored)?;
    Ok(Json(Changed {
        plugin: name,
        delivery: DeliveryView::from(&control),
    }))
}
