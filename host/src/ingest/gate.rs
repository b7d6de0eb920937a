//! What an API request must pass before and while its handler runs: the bearer token of
//! its group of routes, a place among the requests in flight, and a time limit. (The
//! probes `/healthz`, `/readyz` and `/metrics` pass none of them.)
//!
//! Invariants:
//! - a request without a valid token is refused before it takes a place in flight, so
//!   unauthenticated clients cannot crowd out authenticated ones;
//! - at most `http.max_concurrent_requests` API requests run at once; the next one is
//!   answered `503` with `Retry-After` at once rather than queued, so memory stays bounded;
//! - no API request runs longer than `http.request_timeout`: it is answered `408` and its
//!   handler dropped. (A client slow to send its headers is cut off earlier, by the
//!   connection's header timeout in `crate::server`.) The exceptions are the admin
//!   requests whose work grows with what is stored ([`takes_its_time`]): a backup, and a
//!   bulk replay or deletion of dead letters, which a cut-off would stop part way.
//! - a request that reads or changes what the bus keeps is answered `503` at once while
//!   the host cannot reach its bus ([`reachable`]), not after the bus client's own
//!   timeout; ingest is not, since the client holds a publish through a short break.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Semaphore;

use super::AppState;
use super::error::{ApiError, code};

/// Which tokens guard a group of routes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Guard {
    /// `[auth] ingest_tokens`; a refusal counts as a rejected ingest.
    Ingest,
    /// `[auth] admin_tokens`.
    Admin,
    /// Either: routes for producers and operators alike (streams, scheduled events).
    Producer,
}

/// The state of [`admit`]: the group's guard and the places in flight the whole API
/// shares.
#[derive(Clone)]
pub(super) struct Gate {
    pub(super) state: Arc<AppState>,
    pub(super) guard: Guard,
    pub(super) in_flight: Arc<Semaphore>,
}

/// Refuses a request without one of the guard's bearer tokens (when any are set), or
/// when the API already serves as many requests as it may.
pub(super) async fn admit(
    State(gate): State<Gate>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let state = &gate.state;
    let auth = &state.config.auth;
    let allowed = match gate.guard {
        Guard::Ingest => authorized(&request, &auth.ingest_tokens),
        Guard::Admin => authorized(&request, &auth.admin_tokens),
        Guard::Producer => {
            authorized(&request, &auth.ingest_tokens) || authorized(&request, &auth.admin_tokens)
        }
    };
    let refused = if !allowed {
        ApiError::unauthorized()
    } else if let Ok(_place) = gate.in_flight.try_acquire() {
        let limit = time_limit(state, &request);
        return within_time_limit(limit, next.run(request)).await;
    } else {
        ApiError::unavailable(
            format!(
                "the host is serving {} requests, the most `http.max_concurrent_requests` allows; retry later",
                state.config.http.max_concurrent_requests
            ),
            state.config.ingest.retry_after.as_secs().max(1),
        )
    };
    if let Guard::Ingest = gate.guard {
        state.metrics.ingest_rejected(refused.code());
    }
    Err(refused)
}

/// `http.request_timeout`, plus `[ingest] max_wait` for a request that asks to wait
/// for outcomes (`?wait=`, whose own bound is checked by its handler); none for the
/// requests that [`takes_its_time`].
fn time_limit(state: &AppState, request: &Request) -> Option<Duration> {
    if takes_its_time(request.method(), request.uri().path()) {
        return None;
    }
    let waits = request
        .uri()
        .query()
        .is_some_and(|query| query.split('&').any(|pair| pair.starts_with("wait=")));
    let limit = state.config.http.request_timeout;
    Some(if waits {
        limit + state.config.ingest.max_wait
    } else {
        limit
    })
}

/// Whether a request's work grows with what is stored, so that it has no time limit: a
/// backup copies the whole log, and a bulk replay or deletion goes through every dead
/// letter of a plugin.
fn takes_its_time(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET, "/v1/backup")
            | (&Method::DELETE, "/v1/dlq")
            | (&Method::POST, "/v1/dlq/replay")
    )
}

/// Answers `408` when the handler takes longer than `limit`.
async fn within_time_limit(
    limit: Option<Duration>,
    handled: impl Future<Output = Response>,
) -> Result<Response, ApiError> {
    let Some(limit) = limit else {
        return Ok(handled.await);
    };
    tokio::time::timeout(limit, handled).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            code::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {} (`http.request_timeout`)",
                humantime::format_duration(limit)
            ),
        )
    })
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(request: &Request, tokens: &[String]) -> bool {
    if tokens.is_empty() {
        return true;
    }
    let Some(presented) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    tokens.iter().fold(false, |ok, token| {
        ok | constant_time_eq(token.as_bytes(), presented.as_bytes())
    })
}

/// The message of a request refused because the bus cannot be reached.
pub(super) const UNREACHABLE: &str =
    "the bus cannot be reached (not connected to the NATS server); reconnecting";

/// Refuses, at once with `503`, a request that needs the bus while it cannot be reached.
pub(super) async fn reachable(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !state.bus.reach().connected {
        return Err(ApiError::unavailable(UNREACHABLE, 1));
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_backups_and_bulk_dead_letter_operations_go_without_a_time_limit() {
        assert!(takes_its_time(&Method::GET, "/v1/backup"));
        assert!(takes_its_time(&Method::DELETE, "/v1/dlq"));
        assert!(takes_its_time(&Method::POST, "/v1/dlq/replay"));
        for (method, path) in [
            (Method::DELETE, "/v1/dlq/7"),
            (Method::POST, "/v1/dlq/7/replay"),
            (Method::GET, "/v1/dlq"),
            (Method::POST, "/v1/events"),
            (Method::GET, "/v1/events"),
        ] {
            assert!(!takes_its_time(&method, path), "{method} {path}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
