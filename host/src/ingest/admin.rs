//! Operator routes: plugin status and KV, dead letters, metrics and health.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, cloudevents, rfc3339_ms};
use crate::bus::{AttemptError, BusError, DeadLetter, DeadLetterQuery};
use crate::metrics::PluginGauges;
use crate::plugins::PluginEntry;
use crate::runtime::Isolation;

fn bus_error(error: BusError) -> ApiError {
    match error {
        BusError::NotFound(what) => ApiError::not_found(what),
        other => ApiError::internal(other),
    }
}

fn attempt_json(error: &AttemptError) -> Value {
    json!({
        "attempt": error.attempt,
        "kind": error.kind,
        "message": error.message,
        "at": rfc3339_ms(error.at_ms),
    })
}

/// Snapshot of what status needs from one entry, taken under the table's lock.
struct EntryView {
    json: Value,
    loaded: bool,
    in_flight: u64,
}

fn entry_view(entry: &PluginEntry) -> EntryView {
    let base = json!({
        "name": entry.name,
        "file": entry.file.display().to_string(),
        "loaded_at": rfc3339_ms(entry.loaded_at_ms),
    });
    let Value::Object(mut map) = base else {
        return EntryView {
            json: Value::Null,
            loaded: false,
            in_flight: 0,
        };
    };
    map.insert("load_error".into(), json!(entry.load_error));
    match &entry.status {
        Err(error) => {
            map.insert("status".into(), json!("failed"));
            map.insert("error".into(), json!(error));
            EntryView {
                json: Value::Object(map),
                loaded: false,
                in_flight: 0,
            }
        }
        Ok(loaded) => {
            let plugin = &loaded.plugin;
            let settings = plugin.settings();
            let policy = &loaded.policy;
            let (instance, max_calls) = match settings.isolation {
                Isolation::PerEvent => ("per-event", None),
                Isolation::Reuse { max_calls } => ("reuse", Some(max_calls)),
            };
            map.insert("status".into(), json!("running"));
            map.insert("sha256".into(), json!(plugin.sha256()));
            map.insert(
                "describe".into(),
                json!({"name": plugin.info().name, "version": plugin.info().version}),
            );
            map.insert("version".into(), json!(plugin.info().version));
            map.insert(
                "subscriptions".into(),
                json!(
                    loaded
                        .subscriptions
                        .iter()
                        .map(|p| p.as_str())
                        .collect::<Vec<_>>()
                ),
            );
            map.insert(
                "limits".into(),
                json!({
                    "fuel": settings.limits.fuel,
                    "memory_bytes": settings.limits.memory_bytes,
                    "timeout_ms": settings.limits.timeout.as_millis() as u64,
                }),
            );
            map.insert(
                "policy".into(),
                json!({
                    "concurrency": policy.concurrency,
                    "ordering": policy.ordering,
                    "start": policy.start,
                    "instance": instance,
                    "max_calls": max_calls,
                    "retry": {
                        "max_attempts": policy.retry.max_attempts,
                        "backoff": policy.retry.backoff,
                        "initial_ms": policy.retry.initial.as_millis() as u64,
                        "max_ms": policy.retry.max.as_millis() as u64,
                        "jitter": policy.retry.jitter,
                        "max_age_ms": policy.retry.max_age.map(|d| d.as_millis() as u64),
                    },
                }),
            );
            let in_flight = loaded.state.in_flight();
            map.insert("in_flight".into(), json!(in_flight));
            map.insert(
                "last_error".into(),
                loaded
                    .state
                    .last_error()
                    .as_ref()
                    .map_or(Value::Null, attempt_json),
            );
            EntryView {
                json: Value::Object(map),
                loaded: true,
                in_flight,
            }
        }
    }
}

fn views(state: &AppState, name: Option<&str>) -> Vec<(String, EntryView)> {
    let plugins = state
        .plugins
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    plugins
        .values()
        .filter(|e| name.is_none_or(|n| n == e.name))
        .map(|e| (e.name.clone(), entry_view(e)))
        .collect()
}

async fn with_consumer_stats(
    state: &AppState,
    name: &str,
    mut view: EntryView,
) -> Result<Value, ApiError> {
    let stats = state.bus.consumer_stats(name).await.map_err(bus_error)?;
    if let Value::Object(map) = &mut view.json {
        if view.loaded {
            map.insert("cursor".into(), json!(stats.cursor));
            map.insert("lag".into(), json!(stats.lag));
        }
        map.insert("pending_retries".into(), json!(stats.pending_retries));
        map.insert("dead_letters".into(), json!(stats.dead_letters));
    }
    Ok(view.json)
}

/// `GET /v1/plugins`.
pub(super) async fn list_plugins(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let mut plugins = Vec::new();
    for (name, view) in views(&state, None) {
        plugins.push(with_consumer_stats(&state, &name, view).await?);
    }
    Ok(Json(json!({ "plugins": plugins })).into_response())
}

/// `GET /v1/plugins/{name}`.
pub(super) async fn show_plugin(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let Some((name, view)) = views(&state, Some(&name)).into_iter().next() else {
        return Err(ApiError::not_found(format!("plugin `{name}`")));
    };
    Ok(Json(with_consumer_stats(&state, &name, view).await?).into_response())
}

/// `GET /v1/plugins/{name}/kv/{key}`: the raw value.
pub(super) async fn read_kv(
    State(state): State<Arc<AppState>>,
    Path((name, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let value = state
        .bus
        .get(&name, &key)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("key `{key}` of plugin `{name}`")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response())
}

fn dead_letter_json(letter: &DeadLetter) -> Value {
    json!({
        "id": letter.id,
        "plugin": letter.plugin,
        "reason": letter.reason.as_str(),
        "sequence": letter.stored.sequence,
        "dead_at": rfc3339_ms(letter.dead_at_ms),
        "attempts": letter.errors.len(),
        "errors": letter.errors.iter().map(attempt_json).collect::<Vec<_>>(),
        "event": cloudevents::to_json(&letter.stored.event),
    })
}

/// Query of `GET /v1/dlq`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeadLetterParams {
    plugin: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/dlq?plugin=&after=&limit=`.
pub(super) async fn list_dead_letters(
    State(state): State<Arc<AppState>>,
    Query(params): Query<DeadLetterParams>,
) -> Result<Response, ApiError> {
    let letters = state
        .bus
        .dead_letters(DeadLetterQuery {
            plugin: params.plugin,
            after: params.after.unwrap_or(0),
            limit: params.limit.unwrap_or(100).clamp(1, 1000),
        })
        .await
        .map_err(bus_error)?;
    let next_after = letters.last().map(|l| l.id);
    Ok(Json(json!({
        "dead_letters": letters.iter().map(dead_letter_json).collect::<Vec<_>>(),
        "next_after": next_after,
    }))
    .into_response())
}

/// `GET /v1/dlq/{id}`.
pub(super) async fn show_dead_letter(
    State(state): State<Arc<AppState>>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    let letter = state.bus.dead_letter(id).await.map_err(bus_error)?;
    Ok(Json(dead_letter_json(&letter)).into_response())
}

/// `POST /v1/dlq/{id}/replay`.
pub(super) async fn replay_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    let replayed = state
        .bus
        .replay_dead_letters(Some(id), None)
        .await
        .map_err(bus_error)?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "replayed": replayed }))).into_response())
}

/// Query of `POST /v1/dlq/replay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayParams {
    plugin: Option<String>,
}

/// `POST /v1/dlq/replay?plugin=NAME`: every dead letter of one plugin.
pub(super) async fn replay_plugin(
    State(state): State<Arc<AppState>>,
    Query(params): Query<ReplayParams>,
) -> Result<Response, ApiError> {
    let Some(plugin) = params.plugin else {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`plugin` is required: POST /v1/dlq/replay?plugin=NAME",
        ));
    };
    let replayed = state
        .bus
        .replay_dead_letters(None, Some(&plugin))
        .await
        .map_err(bus_error)?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "replayed": replayed }))).into_response())
}

/// `DELETE /v1/dlq/{id}`.
pub(super) async fn delete_dead_letter(
    State(state): State<Arc<AppState>>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    state.bus.delete_dead_letter(id).await.map_err(bus_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /healthz`: the process is up.
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: plugins are loaded and dispatching.
pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    if state.ready.load(Ordering::Acquire) {
        Ok(Json(json!({ "status": "ready" })))
    } else {
        Err(ApiError::unavailable("starting or shutting down", 1))
    }
}

/// `GET /metrics`: Prometheus text.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut gauges = BTreeMap::new();
    for (name, view) in views(&state, None) {
        if !view.loaded {
            continue;
        }
        let stats = state.bus.consumer_stats(&name).await.unwrap_or_default();
        gauges.insert(
            name,
            PluginGauges {
                lag: stats.lag,
                pending_retries: stats.pending_retries,
                in_flight: view.in_flight,
            },
        );
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(
            &gauges,
            state
                .runtime
                .as_ref()
                .map(|r| r.cache_stats())
                .unwrap_or_default(),
        ),
    )
        .into_response()
}
