//! Subject streams and scheduled events over HTTP, for producers (ingest token) and
//! operators (admin token):
//! - `GET /v1/streams/{subject}?after=&limit=`: a subject's events in version order (the
//!   subject is the rest of the path, so it may hold `/`, as in `show/42`);
//! - `GET /v1/scheduled?type=&limit=`: pending scheduled events, soonest first;
//! - `DELETE /v1/scheduled/{id}`: cancels one (`204`, or `404` if none is pending).
//!
//! Appending to a stream (with `expectedversion`) and scheduling (`deliverat`, `?delay=`)
//! go through ingest (`events.rs`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiPath, ApiQuery, AppState, cloudevents};
use crate::bus::ScheduledQuery;
use crate::clock::rfc3339_ms;

/// Most events or scheduled entries one page holds.
const MAX_PAGE: usize = 1000;

/// Query of `GET /v1/streams/{subject}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamParams {
    /// Only events after this version.
    after: Option<u64>,
    limit: Option<usize>,
}

/// A page of a subject's stream.
#[derive(Debug, Serialize)]
struct StreamView {
    subject: String,
    /// The stream's current version.
    version: u64,
    /// The events, each with its `streamversion`.
    events: Vec<cloudevents::Rendered>,
    /// The `after` of the next page; `null` when this page reaches the current version.
    next_after: Option<u64>,
}

/// `GET /v1/streams/{subject}`; `404` for a subject never written.
pub(super) async fn read_stream(
    State(state): State<Arc<AppState>>,
    ApiPath(subject): ApiPath<String>,
    ApiQuery(params): ApiQuery<StreamParams>,
) -> Result<Response, ApiError> {
    let after = params.after.unwrap_or(0);
    let limit = params.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let page = state
        .bus
        .read_stream(&subject, after, limit)
        .await
        .map_err(ApiError::internal)?;
    if page.version == 0 {
        return Err(ApiError::not_found(format_args!(
            "stream of subject `{subject}`"
        )));
    }
    let last = page
        .events
        .last()
        .and_then(crate::stream::stream_version)
        .unwrap_or(after);
    let next_after = (last < page.version && !page.events.is_empty()).then_some(last);
    Ok(Json(StreamView {
        subject,
        version: page.version,
        events: page.events.iter().map(cloudevents::to_json).collect(),
        next_after,
    })
    .into_response())
}

/// Query of `GET /v1/scheduled`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScheduledParams {
    #[serde(rename = "type")]
    ty: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct ScheduledView {
    id: String,
    #[serde(rename = "type")]
    ty: String,
    source: String,
    due: String,
    scheduled_at: String,
    event: cloudevents::Rendered,
}

#[derive(Debug, Serialize)]
struct ScheduledList {
    /// Pending scheduled events in all, of every type.
    pending: u64,
    scheduled: Vec<ScheduledView>,
}

/// `GET /v1/scheduled?type=&limit=`.
pub(super) async fn list_scheduled(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<ScheduledParams>,
) -> Result<Response, ApiError> {
    let listed = state
        .bus
        .list_scheduled(ScheduledQuery {
            event_type: params.ty,
            limit: params.limit.unwrap_or(100).clamp(1, MAX_PAGE),
        })
        .await
        .map_err(ApiError::internal)?;
    let pending = state
        .bus
        .scheduled_count()
        .await
        .map_err(ApiError::internal)?;
    let scheduled = listed
        .into_iter()
        .map(|entry| ScheduledView {
            id: entry.event.id.clone(),
            ty: entry.event.ty.clone(),
            source: entry.event.source.clone(),
            due: rfc3339_ms(entry.due_at_ms),
            scheduled_at: rfc3339_ms(entry.scheduled_at_ms),
            event: cloudevents::to_json(&entry.event),
        })
        .collect();
    Ok(Json(ScheduledList { pending, scheduled }).into_response())
}

/// `DELETE /v1/scheduled/{id}`.
pub(super) async fn cancel_scheduled(
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let cancelled = state
        .bus
        .cancel_scheduled(&id)
        .await
        .map_err(ApiError::internal)?;
    if !cancelled {
        return Err(ApiError::not_found(format_args!(
            "pending scheduled event `{id}`"
        )));
    }
    state.metrics.scheduled_cancelled();
    Ok(StatusCode::NO_CONTENT.into_response())
}
