//! What an API request must pass before and while its handler runs: the bearer token of
//! its group of routes, a place among the requests in flight, and a time limit. (The
//! probes `/healthz`, `/readyz` and `/metrics` pass none of them.)
//!
//! Invariants:
//! - a request without a valid token is refused before it takes a place in flight, so
//!   unauthenticated clients cannot crowd out authenticated ones;
//! - at most `http.max_concurrent_requests` API requests run at once, each counted until
//!   its answer is sent (an answer a client does not read holds memory); the next one is
//!   answered `503` with `Retry-After` at once rather than queued, so memory stays bounded;
//!   a share of the places is kept for admin requests ([`Places`]);
//! - no API request runs longer than `http.request_timeout`: it is answered, and its
//!   handler dropped: `408` when the client had not sent its whole body by then, `503`
//!   with `Retry-After` when the host was the slow one. (A client slow to send its
//!   headers is cut off earlier, by the connection's header timeout in
//!   `crate::server`.) The exceptions are the admin
//!   requests whose work grows with what is stored ([`takes_its_time`]): a backup, and a
//!   bulk replay or deletion of dead letters, which a cut-off would stop part way.
//! - a request that reads or changes what the bus keeps is answered `503` at once while
//!   the host cannot reach its bus ([`reachable`]), not after the bus client's own
//!   timeout; ingest is not, since the client holds a publish through a short break
//!   (the bus itself refuses an append at once when the break is longer).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
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
    pub(super) in_flight: Arc<Places>,
}

/// The API's places in flight, `http.max_concurrent_requests` in all. A share of them
/// ([`Places::reserve_of`]) is kept for operators: ingest and producer requests take
/// only the rest, so producers filling the host cannot lock its operators out.
pub(super) struct Places {
    shared: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
}

impl Places {
    pub(super) fn new(total: usize) -> Self {
        let reserved = Self::reserve_of(total);
        Self {
            shared: Arc::new(Semaphore::new(total - reserved)),
            reserved: Arc::new(Semaphore::new(reserved)),
        }
    }

    /// The places kept for admin requests: a sixteenth, at least 1 and at most 64, none
    /// when there is only one place.
    fn reserve_of(total: usize) -> usize {
        if total < 2 {
            0
        } else {
            (total / 16).clamp(1, 64)
        }
    }

    /// A place for a request of `guard`, if one is free.
    fn take(&self, guard: Guard) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.shared)
            .try_acquire_owned()
            .ok()
            .or_else(|| match guard {
                Guard::Admin => Arc::clone(&self.reserved).try_acquire_owned().ok(),
                Guard::Ingest | Guard::Producer => None,
            })
    }
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
    } else if let Some(place) = gate.in_flight.take(gate.guard) {
        let limit = time_limit(state, &request);
        let read = Arc::new(AtomicBool::new(false));
        let request = request.map(|body| {
            // A request without a body (most GETs) has sent all of it already.
            read.store(http_body::Body::is_end_stream(&body), Ordering::Release);
            Body::new(TrackedBody {
                inner: body,
                read: Some(Arc::clone(&read)),
                place: None,
            })
        });
        return within_time_limit(limit, next.run(request))
            .await
            .map(|response| {
                // The place is held until the answer is sent: a client that does not read
                // it keeps the answer in memory, and must count as in flight meanwhile.
                response.map(|body| {
                    Body::new(TrackedBody {
                        inner: body,
                        read: None,
                        place: Some(place),
                    })
                })
            })
            .map_err(|late| {
                late.answer(
                    read.load(Ordering::Acquire),
                    state.config.ingest.retry_after.as_secs().max(1),
                )
            });
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

/// A request that ran out of its time limit.
struct Late(Duration);

impl Late {
    /// `408` when the client had not sent its whole body by then; `503` with
    /// `Retry-After` when it had, and the host was slow to answer (a `408` would tell the
    /// client that it was too slow).
    fn answer(self, body_read: bool, retry_after_secs: u64) -> ApiError {
        let limit = humantime::format_duration(self.0);
        if body_read {
            ApiError::unavailable(
                format!(
                    "the host took longer than {limit} (`http.request_timeout`) to answer; retry later"
                ),
                retry_after_secs,
            )
        } else {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                code::REQUEST_TIMEOUT,
                format!("the request was not sent within {limit} (`http.request_timeout`)"),
            )
        }
    }
}

/// Fails with [`Late`] when the handler takes longer than `limit`.
async fn within_time_limit(
    limit: Option<Duration>,
    handled: impl Future<Output = Response>,
) -> Result<Response, Late> {
    let Some(limit) = limit else {
        return Ok(handled.await);
    };
    tokio::time::timeout(limit, handled)
        .await
        .map_err(|_| Late(limit))
}

pin_project_lite::pin_project! {
    /// A body that records when it has been read to its end (`read`, for a request's:
    /// at once for a request without one), or that holds its request's place in flight
    /// until it is sent or the connection drops it (`place`, for an answer's).
    struct TrackedBody {
        #[pin]
        inner: Body,
        read: Option<Arc<AtomicBool>>,
        place: Option<tokio::sync::OwnedSemaphorePermit>,
    }
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Some(read) = this.read
            && (matches!(polled, Poll::Ready(None)) || this.inner.is_end_stream())
        {
            read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if let Some(read) = &self.read
            && end
        {
            read.store(true, Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Compares two byte strings in time that depends on neither their contents nor their
/// lengths: their SHA-256 digests are compared, every byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn authorized(request: &Request, tokens: &[String]) -> bool {
    if tokens.is_empty() {
        return true;
    }
    let Some(presented) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
    else {
        return false;
    };
    tokens.iter().fold(false, |ok, token| {
        ok | constant_time_eq(token.as_bytes(), presented.as_bytes())
    })
}

/// The token of an `Authorization: Bearer TOKEN` value; the scheme's name is matched
/// without regard to case (RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
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

    #[tokio::test]
    async fn a_late_request_is_the_clients_fault_only_while_its_body_is_unread() {
        let read = Arc::new(AtomicBool::new(false));
        let body = TrackedBody {
            inner: Body::from("{\"n\": 1}"),
            read: Some(Arc::clone(&read)),
            place: None,
        };
        assert!(!read.load(Ordering::Acquire));
        let bytes = axum::body::to_bytes(Body::new(body), 1024).await.unwrap();
        assert_eq!(&bytes[..], b"{\"n\": 1}");
        assert!(read.load(Ordering::Acquire));
        let empty = Arc::new(AtomicBool::new(false));
        let body = TrackedBody {
            inner: Body::empty(),
            read: Some(Arc::clone(&empty)),
            place: None,
        };
        assert!(http_body::Body::is_end_stream(&body));
        assert!(empty.load(Ordering::Acquire));

        let slow_client = Late(Duration::from_secs(1)).answer(false, 2);
        assert_eq!(slow_client.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(slow_client.code(), code::REQUEST_TIMEOUT);
        assert_eq!(slow_client.retry_after(), None);
        let slow_host = Late(Duration::from_secs(1)).answer(true, 2);
        assert_eq!(slow_host.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(slow_host.retry_after(), Some(2));
        assert!(slow_host.message().contains("http.request_timeout"));
    }

    #[test]
    fn producers_cannot_take_the_places_kept_for_operators() {
        let places = Places::new(32);
        let producers: Vec<_> = std::iter::from_fn(|| places.take(Guard::Ingest)).collect();
        assert_eq!(producers.len(), 30);
        assert!(places.take(Guard::Producer).is_none());
        let operators: Vec<_> = std::iter::from_fn(|| places.take(Guard::Admin)).collect();
        assert_eq!(operators.len(), 2);
        drop(producers);
        assert!(places.take(Guard::Ingest).is_some());
        assert_eq!(Places::reserve_of(1), 0);
        assert_eq!(Places::reserve_of(1024), 64);
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for value in ["Bearer t0k", "bearer t0k", "BEARER t0k", "Bearer  t0k"] {
            assert_eq!(bearer_token(value), Some("t0k"), "{value}");
        }
        for value in ["Basic t0k", "Bearer", "Bearert0k", "t0k"] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
