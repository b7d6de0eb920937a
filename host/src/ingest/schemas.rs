//! The schema registry's routes (admin): `PUT /v1/schemas/{type}` registers the type's
//! next version, `GET /v1/schemas`, `GET /v1/schemas/{type}` and
//! `GET /v1/schemas/{type}/{version}` (the document itself, which is what the
//! `dataschema` of a checked event points at).
//!
//! Invariant: a refused registration stores nothing; a stored version never changes.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::code;
use super::{ApiError, ApiPath, ApiQuery, AppState};
use crate::bus::{BusError, StoredSchema};
use crate::clock::rfc3339_ms;
use crate::event::validate_event_type;
use crate::schema::RegisterError;

fn checked_type(event_type: &str) -> Result<(), ApiError> {
    validate_event_type(event_type)
        .map_err(|e| ApiError::bad_request(code::BAD_REQUEST, format!("event type: {e}")))
}

fn summary(state: &AppState, stored: &StoredSchema) -> Value {
    json!({
        "type": stored.event_type,
        "version": stored.version,
        "registered_at": rfc3339_ms(stored.registered_at_ms),
        "dataschema": state.schemas.uri(&stored.event_type, stored.version),
    })
}

fn document(stored: &StoredSchema) -> Value {
    serde_json::from_str(&stored.schema).unwrap_or(Value::Null)
}

/// Query of `PUT /v1/schemas/{type}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterParams {
    /// Register even if recent events of the type fail the new version.
    #[serde(default)]
    force: bool,
}

/// `PUT /v1/schemas/{type}[?force=true]`: the body is the next version's JSON Schema
/// (`201` with its `Location`), or the latest version's again (`200`, nothing changes),
/// so a retried request does not make a version of its own.
pub(super) async fn register(
    State(state): State<Arc<AppState>>,
    ApiPath(event_type): ApiPath<String>,
    ApiQuery(params): ApiQuery<RegisterParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    checked_type(&event_type)?;
    let body = super::events::read_json_body(
        &state,
        &headers,
        body,
        &["application/schema+json", "application/json"],
    )
    .await?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request(code::INVALID_SCHEMA, "the schema is not UTF-8 JSON"))?;
    let registered = match state
        .schemas
        .register(&event_type, text, params.force)
        .await
    {
        Ok(registered) => registered,
        Err(RegisterError::Invalid(why)) => {
            return Err(ApiError::bad_request(code::INVALID_SCHEMA, why));
        }
        Err(incompatible @ RegisterError::Incompatible { .. }) => {
            let message = format!("{incompatible}; fix them or register with `?force=true`");
            let RegisterError::Incompatible {
                checked,
                failing,
                refused,
                ..
            } = incompatible
            else {
                return Err(ApiError::internal("unreachable"));
            };
            let events: Vec<Value> = refused
                .iter()
                .map(|(refused, violation)| {
                    json!({
                        "id": refused.event.id,
                        "source": refused.event.source,
                        "sequence": refused.sequence,
                        "scheduled": refused.sequence.is_none(),
                        "pointer": violation.pointer,
                        "rule": violation.rule,
                        "message": violation.message,
                    })
                })
                .collect();
            return Err(
                ApiError::new(StatusCode::CONFLICT, code::CONFLICT, message).with_details(
                    json!({ "checked": checked, "failing": failing, "events": events }),
                ),
            );
        }
        Err(RegisterError::Bus(BusError::Conflict(what))) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                code::CONFLICT,
                format!("another version of the {what} was registered meanwhile; send it again"),
            ));
        }
        Err(RegisterError::Bus(BusError::TooLarge { what, bytes, limit })) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                code::PAYLOAD_TOO_LARGE,
                format!(
                    "{what} would be {bytes} bytes with this version, over the {limit} bytes \
                     the bus stores in one message (the NATS server's `max_payload`)"
                ),
            ));
        }
        Err(RegisterError::Bus(error)) => return Err(ApiError::internal(error)),
    };
    let stored = &registered.schema;
    let status = if registered.new {
        tracing::info!(event_type = %stored.event_type, version = stored.version, forced = params.force, "schema registered");
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let location = format!("/v1/schemas/{}/{}", stored.event_type, stored.version);
    let mut response = (status, Json(summary(&state, stored))).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// `GET /v1/schemas`: every type with a schema, and its latest version.
pub(super) async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let latest = state
        .bus
        .latest_schemas()
        .await
        .map_err(ApiError::internal)?;
    let schemas: Vec<Value> = latest.iter().map(|s| summary(&state, s)).collect();
    Ok(Json(json!({ "schemas": schemas })).into_response())
}

/// Every version of a valid event type's schema, oldest first.
async fn versions_of(state: &AppState, event_type: &str) -> Result<Vec<StoredSchema>, ApiError> {
    checked_type(event_type)?;
    state
        .bus
        .schema_versions(event_type)
        .await
        .map_err(ApiError::internal)
}

/// `GET /v1/schemas/{type}`: the type's versions and its latest document.
pub(super) async fn show(
    State(state): State<Arc<AppState>>,
    ApiPath(event_type): ApiPath<String>,
) -> Result<Response, ApiError> {
    let versions = versions_of(&state, &event_type).await?;
    let Some(latest) = versions.last() else {
        return Err(ApiError::not_found(format!("schema of `{event_type}`")));
    };
    Ok(Json(json!({
        "type": event_type,
        "latest": latest.version,
        "schema": document(latest),
        "versions": versions.iter().map(|s| summary(&state, s)).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `GET /v1/schemas/{type}/{version}`: the document itself, `application/schema+json`.
pub(super) async fn version(
    State(state): State<Arc<AppState>>,
    ApiPath((event_type, version)): ApiPath<(String, u32)>,
) -> Result<Response, ApiError> {
    let versions = versions_of(&state, &event_type).await?;
    let Some(stored) = versions.into_iter().find(|s| s.version == version) else {
        return Err(ApiError::not_found(format!(
            "version {version} of the schema of `{event_type}`"
        )));
    };
    Ok((
        [(header::CONTENT_TYPE, "application/schema+json")],
        stored.schema,
    )
        .into_response())
}
