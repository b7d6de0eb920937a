//! Ingest (`POST /v1/events`, `POST /v1/events/{type}`) and reading the log
//! (`GET /v1/events`).
//!
//! Invariant: `202` is sent only after the bus says the events are durable. A body over
//! the limit is refused before it is read whole; a refused request stores nothing: an
//! event whose data fails its type's schema refuses the whole request, and so does one
//! whose stream is not at its `expectedversion` (`409`). An event with `deliverat` (or
//! any event of a request with `?delay=`) is scheduled instead of appended. With
//! `?wait=`, the answer waits for the plugins' outcomes after the append (see `wait.rs`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::cloudevents::{self, ParseLimits};
use super::error::code;
use super::{ApiError, ApiPath, ApiQuery, AppState, wait};
use crate::bus::{BusError, LogQuery};
use crate::clock::rfc3339_ms;
use crate::event::Event;
use crate::pattern::Pattern;
use crate::schedule::{self, DELIVER_AT, Due};
use crate::schema::Violation;
use crate::stream::{self, EXPECTED_VERSION, VersionConflict};
use crate::telemetry;
use tracing::Instrument as _;

/// Reads a request body up to the configured limit.
pub(super) async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<bytes::Bytes, ApiError> {
    let limit = state.config.ingest.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let too_large =
            std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(|e| e.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::bad_request(
                code::BAD_REQUEST,
                format!("cannot read the request body: {error}"),
            )
        }
    })
}

/// Reads a JSON request body (not a CloudEvent) up to the configured limit. A declared
/// `Content-Type` must be a JSON one (`415` naming `accepted` otherwise); a body without
/// one is read as JSON.
pub(super) async fn read_json_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    accepted: &[&str],
) -> Result<bytes::Bytes, ApiError> {
    if let Some(declared) = headers.get(header::CONTENT_TYPE) {
        let json = declared
            .to_str()
            .is_ok_and(|value| cloudevents::is_json_media_type(cloudevents::media_type(value)));
        if !json {
            let lossy = String::from_utf8_lossy(declared.as_bytes());
            return Err(ApiError::unsupported_media_type(Some(&lossy), accepted));
        }
    }
    read_body(state, headers, body).await
}

fn limits(state: &AppState) -> ParseLimits {
    ParseLimits {
        max_event_bytes: state.config.ingest.max_event_bytes,
        max_batch_events: state.config.ingest.max_batch_events,
    }
}

/// Maps a bus failure on the ingest path to a 503 that tells the producer when to retry.
pub(super) fn unavailable(state: &AppState, error: BusError) -> ApiError {
    let retry_after = state.config.ingest.retry_after.as_secs().max(1);
    match error {
        BusError::Saturated { .. } => {
            ApiError::unavailable("the log writer is saturated; retry later", retry_after)
        }
        BusError::Closed => ApiError::unavailable("the host is shutting down", retry_after),
        BusError::TooLarge { limit, .. } => ApiError::payload_too_large(limit),
        BusError::Storage(cause) => {
            tracing::error!(error = %cause, "append failed");
            ApiError::unavailable(
                format!("the log cannot store events right now: {cause}"),
                retry_after,
            )
        }
        other => {
            tracing::error!(error = %other, "append failed");
            ApiError::unavailable("the log cannot store events right now", retry_after)
        }
    }
}

/// `400 schema_violation` for event `index` of `count`.
fn schema_violation(index: usize, count: usize, violation: &Violation) -> ApiError {
    let error = ApiError::bad_request(code::SCHEMA_VIOLATION, violation.to_string()).with_details(
        serde_json::json!({
            "type": violation.event_type,
            "version": violation.version,
            "pointer": violation.pointer,
            "rule": violation.rule,
        }),
    );
    if count > 1 {
        error.context(format_args!("event {index}"))
    } else {
        error
    }
}

/// Checks the events against their schemas (all or none are stored), appends them and
/// answers `202`, or with their outcomes when the producer waits. The request's trace
/// context (its `traceparent` header) goes with each event that has none of its own.
async fn append(
    state: &AppState,
    mut events: Vec<Event>,
    wait: Option<Duration>,
    delay: Option<Duration>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    check_conditions_and_schedules(&mut events, delay)
        .and_then(|()| {
            let scheduled = events.iter().any(|e| e.extensions.contains_key(DELIVER_AT));
            if wait.is_some() && scheduled {
                return Err(ApiError::bad_request(
                    code::INVALID_QUERY,
                    format!(
                        "`wait` cannot be used for a scheduled event (`?delay=` or \
                         `{DELIVER_AT}`): its plugins run when it is due"
                    ),
                ));
            }
            Ok(())
        })
        .inspect_err(|error| state.metrics.ingest_rejected(error.code()))?;
    // An invalid header is ignored, as W3C Trace Context has it: the trace starts here.
    let traceparent = headers
        .get(telemetry::TRACEPARENT)
        .and_then(|value| value.to_str().ok())
        .filter(|value| telemetry::valid_traceparent(value));
    let sampled = telemetry::sampled(traceparent);
    let span = if sampled {
        tracing::info_span!(
            target: telemetry::FLOW,
            "ingest.receive",
            events = events.len(),
            event_id = events.first().map_or("", |e| e.id.as_str())
        )
    } else {
        tracing::Span::none()
    };
    // The vendors' part travels with the producer's context, unchanged; without a valid
    // `traceparent` there is nothing for it to go with.
    let tracestate = traceparent.and_then(|_| {
        headers
            .get(telemetry::TRACESTATE)
            .and_then(|value| value.to_str().ok())
            .filter(|value| !value.is_empty() && telemetry::valid_tracestate(value))
    });
    if let Some(traceparent) = traceparent {
        telemetry::set_parent(&span, traceparent, tracestate);
    }
    let request_context = telemetry::traceparent_of(&span)
        .or(traceparent.map(str::to_owned))
        .or_else(|| telemetry::exporting().then(telemetry::unsampled_traceparent));
    if let Some(context) = request_context {
        for event in &mut events {
            if event.extensions.contains_key(telemetry::TRACEPARENT) {
                continue;
            }
            event
                .extensions
                .insert(telemetry::TRACEPARENT.to_owned(), context.clone());
            if let Some(tracestate) = tracestate {
                event
                    .extensions
                    .insert(telemetry::TRACESTATE.to_owned(), tracestate.to_owned());
            }
        }
    }
    append_checked(state, events, wait).instrument(span).await
}

async fn append_checked(
    state: &AppState,
    mut events: Vec<Event>,
    wait: Option<Duration>,
) -> Result<Response, ApiError> {
    if events.is_empty() {
        // An empty batch is allowed (CloudEvents HTTP binding, 3.3.2) and stores nothing.
        let accepted = AcceptedBody {
            accepted: Vec::new(),
        };
        return Ok((StatusCode::ACCEPTED, Json(accepted)).into_response());
    }
    let count = events.len();
    for (index, event) in events.iter_mut().enumerate() {
        state.schemas.check(event).map_err(|violation| {
            state.metrics.ingest_rejected(code::SCHEMA_VIOLATION);
            schema_violation(index, count, &violation)
        })?;
    }
    let ids: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.id.clone(), e.source.clone()))
        .collect();
    let waiting = match wait {
        Some(wait) => Some(wait::listen(state, &events, wait).await?),
        None => None,
    };
    let logged = if tracing::Span::current().is_disabled() {
        tracing::Span::none()
    } else {
        tracing::info_span!(target: telemetry::FLOW, "log.append", events = count)
    };
    let appended = if waiting.is_some() {
        state.bus.append_watched(events).instrument(logged).await
    } else {
        state.bus.append(events).instrument(logged).await
    };
    let appended = appended.map_err(|e| {
        let error = match e {
            BusError::VersionConflict(conflict) => version_conflict(&conflict),
            BusError::Invalid(message) => ApiError::bad_request(code::INVALID_EVENT, message),
            other => unavailable(state, other),
        };
        state.metrics.ingest_rejected(error.code());
        error
    })?;
    let fresh = appended.iter().filter(|a| !a.duplicate).count();
    state.metrics.events_ingested(fresh as u64);
    if let Some(waiting) = waiting {
        return Ok(wait::answer(state, waiting, &ids, &appended).await);
    }
    let accepted = ids
        .iter()
        .zip(appended)
        .map(|((id, source), a)| Accepted {
            id,
            source,
            sequence: a.due_at_ms.is_none().then_some(a.sequence),
            duplicate: a.duplicate,
            streamversion: a.stream_version,
            scheduled: a.due_at_ms.map(rfc3339_ms),
        })
        .collect();
    Ok((StatusCode::ACCEPTED, Json(AcceptedBody { accepted })).into_response())
}

/// Query of the ingest routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IngestParams {
    /// Wait up to this long for the plugins' outcomes (`5s`, `250ms`).
    wait: Option<String>,
    /// Schedule the events this long from now (`15m`) instead of appending them now.
    delay: Option<String>,
}

impl IngestParams {
    fn delay(&self, state: &AppState) -> Result<Option<Duration>, ApiError> {
        self.delay
            .as_deref()
            .map(|text| {
                crate::units::parse_duration(text).map_err(|e| {
                    ApiError::bad_request(code::INVALID_QUERY, format!("`delay`: {e}"))
                })
            })
            .transpose()
            .inspect_err(|error| state.metrics.ingest_rejected(error.code()))
    }

    fn wait(&self, state: &AppState) -> Result<Option<Duration>, ApiError> {
        self.wait
            .as_deref()
            .map(|text| wait::parse_wait(state, text))
            .transpose()
            .inspect_err(|error| state.metrics.ingest_rejected(error.code()))
    }
}

/// The answer to an accepted append, one entry per event in the order sent.
#[derive(Serialize)]
struct AcceptedBody<'a> {
    accepted: Vec<Accepted<'a>>,
}

#[derive(Serialize)]
struct Accepted<'a> {
    id: &'a str,
    source: &'a str,
    /// Absent for an event scheduled for later: it has no place in the log yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence: Option<u64>,
    duplicate: bool,
    /// The event's position in its subject's stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    streamversion: Option<u64>,
    /// When a scheduled event is due.
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduled: Option<String>,
}

/// Checks each event's stream condition (`expectedversion`), schedule (`deliverat`, or
/// the request's `?delay=`) and trace context (`traceparent`, the CloudEvents tracing
/// extension, a W3C `traceparent`) and writes the due time in one form; the first bad
/// one refuses the request.
fn check_conditions_and_schedules(
    events: &mut [Event],
    delay: Option<Duration>,
) -> Result<(), ApiError> {
    let count = events.len();
    for (index, event) in events.iter_mut().enumerate() {
        let checked = (|| {
            if let Some(context) = event.extensions.get(telemetry::TRACEPARENT)
                && !telemetry::valid_traceparent(context)
            {
                return Err(format!(
                    "`{}` is `{context}`, not a W3C trace context such as \
                     `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`",
                    telemetry::TRACEPARENT
                ));
            }
            if let Some(state) = event.extensions.get(telemetry::TRACESTATE)
                && !telemetry::valid_tracestate(state)
            {
                return Err(format!(
                    "`{}` must be at most 512 characters of printable ASCII",
                    telemetry::TRACESTATE
                ));
            }
            let expected = stream::expected_version(event)?;
            let due = match (event.extensions.get(DELIVER_AT), delay) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "`{DELIVER_AT}` and `?delay=` both say when the event is due; send one"
                    ));
                }
                (Some(at), None) => Some(Due::At(at.clone())),
                (None, Some(delay)) => Some(Due::After(delay)),
                (None, None) => None,
            };
            if let Some(due) = due {
                if expected.is_some() {
                    return Err(format!(
                        "a scheduled event cannot carry `{EXPECTED_VERSION}`: its stream is \
                         only known when it is due"
                    ));
                }
                let at = schedule::due_time(&due).map_err(|e| format!("`{DELIVER_AT}`: {e}"))?;
                event.extensions.insert(DELIVER_AT.to_owned(), at);
            }
            Ok(())
        })();
        checked.map_err(|message| {
            let error = ApiError::bad_request(code::INVALID_EVENT, message);
            if count > 1 {
                error.context(format_args!("event {index}"))
            } else {
                error
            }
        })?;
    }
    Ok(())
}

/// `409 version_conflict`: the stream of one event is not at the version it expected;
/// nothing of the request was stored.
fn version_conflict(conflict: &VersionConflict) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        code::VERSION_CONFLICT,
        format!("{conflict}; nothing of the request was stored"),
    )
    .with_details(serde_json::json!({
        "subject": conflict.subject,
        "expectedversion": conflict.expected,
        "currentversion": conflict.current,
    }))
}

/// Reads the body and parses it with `parse`; a refusal at either step is counted.
async fn parse_body<T>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    parse: impl FnOnce(&[u8], &ParseLimits) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let parsed = match read_body(state, headers, body).await {
        Ok(body) => parse(&body, &limits(state)),
        Err(error) => Err(error),
    };
    parsed.inspect_err(|error| state.metrics.ingest_rejected(error.code()))
}

/// `POST /v1/events`: binary, structured or batched CloudEvents.
pub(super) async fn ingest(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<IngestParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let wait = params.wait(&state)?;
    let delay = params.delay(&state)?;
    let events = parse_body(&state, &headers, body, |body, limits| {
        cloudevents::parse_events(&headers, body, limits)
    })
    .await?;
    append(&state, events, wait, delay, &headers).await
}

/// `POST /v1/events/{type}`: a plain JSON body as the data of one event.
pub(super) async fn ingest_typed(
    State(state): State<Arc<AppState>>,
    ApiPath(ty): ApiPath<String>,
    ApiQuery(params): ApiQuery<IngestParams>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let wait = params.wait(&state)?;
    let delay = params.delay(&state)?;
    let event = parse_body(&state, &headers, body, |body, limits| {
        cloudevents::parse_typed_event(&ty, &headers, body, limits)
    })
    .await?;
    append(&state, vec![event], wait, delay, &headers).await
}

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogParams {
    #[serde(rename = "type")]
    ty: Option<String>,
    subject: Option<String>,
    /// Only the events caused by the event with this id.
    causationid: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// An event of the log as `GET /v1/events` shows it.
#[derive(Debug, Serialize)]
struct StoredEventView {
    sequence: u64,
    ingested_at: String,
    event: cloudevents::Rendered,
}

/// A page of `GET /v1/events`.
#[derive(Debug, Serialize)]
struct LogPageView {
    events: Vec<StoredEventView>,
    next_after: Option<u64>,
}

/// Most events one `GET /v1/events` returns.
const MAX_PAGE: usize = 1000;

/// `GET /v1/events?type=&subject=&after=&limit=`: a page of matching events and
/// `next_after`, the `after` of the next page (`null` at the end of the log). A sparse
/// filter may return fewer events than `limit`, even none, with a `next_after` to go on.
pub(super) async fn read_log(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<LogParams>,
) -> Result<Response, ApiError> {
    let pattern = params
        .ty
        .as_deref()
        .map(Pattern::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request(code::INVALID_QUERY, format!("`type`: {e}")))?;
    let limit = params.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let after = params.after.unwrap_or(0);
    let page = state
        .bus
        .read_log(LogQuery {
            after,
            pattern,
            subject: params.subject,
            caused_by: params.causationid,
            limit,
        })
        .await
        .map_err(ApiError::internal)?;
    // Where to continue: past everything this read looked at, matching or not; `null`
    // once the end of the log is reached.
    let next_after = (page.scanned_to > after).then_some(page.scanned_to);
    let events = page
        .events
        .iter()
        .map(|stored| StoredEventView {
            sequence: stored.sequence,
            ingested_at: rfc3339_ms(stored.ingested_at_us / 1000),
            event: cloudevents::to_json(&stored.event),
        })
        .collect();
    Ok(Json(LogPageView { events, next_after }).into_response())
}
