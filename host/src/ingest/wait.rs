//! Request/reply over the bus: `POST /v1/events?wait=DURATION` answers with the outcome
//! of every plugin subscribed to each event when it was ingested.
//!
//! A waiting request takes a permit of the host's `max_waiters` per event it carries (not
//! enough left: `503` with `Retry-After`; more events than there are permits: `400`),
//! listens for settlement notices about its events *before* they are
//! appended (so no notice can come first), appends exactly as without `wait`, then
//! collects notices until every expected plugin has finished with every event or the
//! wait ends: `200` when all did, `202` with what is known otherwise. An event that is a
//! duplicate (sent before) starts from the notices the bus recorded about it
//! ([`crate::bus::Notices::recorded`]), so a producer who resends after a lost answer,
//! or after a wait that ended first, learns what happened.
//!
//! Invariants: a wait only observes. Delivery, retries and effects are the same whether
//! or not anyone waits, and a wait that ends (or a client that goes away) changes
//! nothing. Memory is bounded by the permits (one listener each) and each listener's
//! bounded queue.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::{BoxStream, SelectAll};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use super::cloudevents::to_json;
use super::{ApiError, AppState};
use crate::bus::{Appended, Notice, NoticeOutcome};
use crate::event::Event;
use crate::failure::AttemptError;

/// A request that will wait: its permit, the plugins it expects per event and the
/// notices it listens to.
pub(super) struct Waiting {
    _permit: OwnedSemaphorePermit,
    expected: Vec<Vec<String>>,
    notices: SelectAll<BoxStream<'static, (usize, Notice)>>,
    wait: Duration,
}

/// Parses `?wait=` (a duration such as `5s` or `250ms`), at most `[ingest] max_wait`.
pub(super) fn parse_wait(state: &AppState, text: &str) -> Result<Duration, ApiError> {
    let wait = crate::units::parse_duration(text).map_err(|e| {
        ApiError::bad_request(
            super::error::code::INVALID_QUERY,
            format!("`wait`: {e} (a duration such as `5s` or `250ms`)"),
        )
    })?;
    let max = state.config.ingest.max_wait;
    if wait > max {
        return Err(ApiError::bad_request(
            super::error::code::INVALID_QUERY,
            format!(
                "`wait` is {}; this host waits at most {} (`[ingest] max_wait`)",
                humantime::format_duration(wait),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(wait)
}

/// Takes a permit and starts listening for the notices of `events`; before the append.
pub(super) async fn listen(
    state: &AppState,
    events: &[Event],
    wait: Duration,
) -> Result<Waiting, ApiError> {
    let max = state.config.ingest.max_waiters;
    if events.len() > max {
        return Err(ApiError::bad_request(
            super::error::code::INVALID_QUERY,
            format!(
                "`wait` takes at most {max} events at once (`[ingest] max_waiters`); this \
                 request has {}: send it in smaller batches, or without `wait`",
                events.len()
            ),
        ));
    }
    let permit = u32::try_from(events.len())
        .ok()
        .and_then(|count| {
            Arc::clone(&state.waiters)
                .try_acquire_many_owned(count)
                .ok()
        })
        .ok_or_else(|| {
            state.metrics.ingest_rejected("waiters");
            ApiError::unavailable(
                format!(
                    "{max} events are already waited for (`[ingest] max_waiters`); \
                     retry later or send without `wait`"
                ),
                state.config.ingest.retry_after.as_secs().max(1),
            )
        })?;
    let table = Arc::clone(&state.plugins);
    let expected = {
        let table = table.read().unwrap_or_else(PoisonError::into_inner);
        events
            .iter()
            .map(|event| {
                table
                    .values()
                    .filter_map(|entry| {
                        let loaded = entry.status.as_ref().ok()?;
                        let subscribed = loaded.subscriptions.iter().any(|p| p.matches(&event.ty));
                        subscribed.then(|| entry.name.clone())
                    })
                    .collect()
            })
            .collect()
    };
    let mut notices = SelectAll::new();
    for (index, event) in events.iter().enumerate() {
        let heard = state
            .bus
            .listen(&event.source, &event.id)
            .await
            .map_err(|e| super::events::unavailable(state, e))?;
        notices.push(heard.map(move |notice| (index, notice)).boxed());
    }
    Ok(Waiting {
        _permit: permit,
        expected,
        notices,
        wait,
    })
}

/// What one plugin did with an event, as the answer shows it.
#[derive(Debug, Serialize)]
struct PluginOutcome {
    plugin: String,
    /// `ok`, `retrying`, `dead-lettered`, `rejected`, or `pending` (nothing heard yet).
    outcome: &'static str,
    /// Attempts made so far (0 while pending).
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<AttemptError>,
    /// The events it emitted, in the CloudEvents JSON format.
    emitted: Vec<super::cloudevents::Rendered>,
}

/// One accepted event with its plugins' outcomes.
#[derive(Debug, Serialize)]
struct WaitedEvent {
    id: String,
    source: String,
    sequence: u64,
    duplicate: bool,
    /// The event's position in its subject's stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    streamversion: Option<u64>,
    /// Whether every plugin subscribed to it has finished with it.
    complete: bool,
    plugins: Vec<PluginOutcome>,
}

fn outcome_name(outcome: NoticeOutcome) -> &'static str {
    match outcome {
        NoticeOutcome::Ok => "ok",
        NoticeOutcome::Retrying => "retrying",
        NoticeOutcome::DeadLettered => "dead-lettered",
        NoticeOutcome::Rejected => "rejected",
    }
}

/// Whether every one of `plugins` is done with the event (its latest notice is final).
fn all_final(plugins: &[String], notices: &BTreeMap<String, Notice>) -> bool {
    plugins
        .iter()
        .all(|p| notices.get(p).is_some_and(|n| n.outcome.is_final()))
}

/// Takes `notice` about the event at `index` into `heard` if its plugin is expected there
/// and it is not older than what was heard of that plugin.
fn take(
    heard: &mut [BTreeMap<String, Notice>],
    expected: &[Vec<String>],
    index: usize,
    notice: Notice,
) {
    let wanted = expected
        .get(index)
        .is_some_and(|plugins| plugins.contains(&notice.plugin));
    if let Some(notices) = heard.get_mut(index).filter(|_| wanted) {
        // Notices of one plugin may cross on the way, or be both recorded and heard;
        // the latest attempt counts.
        let newer = notices
            .get(&notice.plugin)
            .is_none_or(|have| have.attempt <= notice.attempt);
        if newer {
            notices.insert(notice.plugin.clone(), notice);
        }
    }
}

/// Collects notices until every expected plugin finished every event or the wait ends,
/// then answers: `200` when complete, `202` otherwise. A duplicate starts from the
/// notices recorded about its event (it was sent before, maybe with a wait whose answer
/// was lost), which were published before this request listened.
pub(super) async fn answer(
    state: &AppState,
    mut waiting: Waiting,
    events: &[(String, String)],
    appended: &[Appended],
) -> axum::response::Response {
    use axum::response::IntoResponse;

    let mut heard: Vec<BTreeMap<String, Notice>> = vec![BTreeMap::new(); events.len()];
    for (index, ((id, source), appended)) in events.iter().zip(appended).enumerate() {
        if !appended.duplicate {
            continue;
        }
        let recorded = state.bus.recorded(source, id).await.unwrap_or_else(|error| {
            tracing::warn!(event_id = %id, %error, "cannot read the recorded outcomes of a resent event");
            Vec::new()
        });
        for notice in recorded {
            take(&mut heard, &waiting.expected, index, notice);
        }
    }
    let finished = |heard: &[BTreeMap<String, Notice>], expected: &[Vec<String>]| {
        expected
            .iter()
            .zip(heard)
            .all(|(plugins, notices)| all_final(plugins, notices))
    };
    let deadline = tokio::time::Instant::now() + waiting.wait;
    while !finished(&heard, &waiting.expected) {
        let next = tokio::time::timeout_at(deadline, waiting.notices.next()).await;
        let Ok(Some((index, notice))) = next else {
            break;
        };
        take(&mut heard, &waiting.expected, index, notice);
    }
    let complete = finished(&heard, &waiting.expected);
    let accepted: Vec<WaitedEvent> = events
        .iter()
        .zip(appended)
        .zip(waiting.expected.iter().zip(&heard))
        .map(|(((id, source), appended), (names, notices))| {
            let plugins: Vec<PluginOutcome> = names
                .iter()
                .map(|plugin| match notices.get(plugin) {
                    Some(notice) => PluginOutcome {
                        plugin: plugin.clone(),
                        outcome: outcome_name(notice.outcome),
                        attempts: notice.attempt,
                        error: notice.error.clone(),
                        emitted: notice.emitted.iter().map(to_json).collect(),
                    },
                    None => PluginOutcome {
                        plugin: plugin.clone(),
                        outcome: "pending",
                        attempts: 0,
                        error: None,
                        emitted: Vec::new(),
                    },
                })
                .collect();
            WaitedEvent {
                id: id.clone(),
                source: source.clone(),
                sequence: appended.sequence,
                duplicate: appended.duplicate,
                streamversion: appended.stream_version,
                complete: all_final(names, notices),
                plugins,
            }
        })
        .collect();
    let status = if complete {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::ACCEPTED
    };
    #[derive(Serialize)]
    struct Body {
        accepted: Vec<WaitedEvent>,
    }
    (status, axum::Json(Body { accepted })).into_response()
}
