//! The error type every HTTP route returns, and its JSON rendering.
//!
//! Owns [`ApiError`] and the vocabulary of machine-readable error codes ([`code`]).
//!
//! Invariants:
//! - every error renders as `Content-Type: application/json` with the body
//!   `{"error": {"code": "...", "message": "..."}}` and the status it was built with;
//! - `401` responses carry `WWW-Authenticate: Bearer`; `429` and `503` responses carry
//!   `Retry-After` (whole seconds);
//! - an internal error never shows its cause to the client: [`ApiError::internal`] logs the
//!   cause with `tracing::error!` and the client sees only `"internal error"`.

use std::fmt;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Machine-readable error codes, the `error.code` member of every error body.
pub mod code {
    /// The request was malformed in a way no more specific code describes (400).
    pub const BAD_REQUEST: &str = "bad_request";
    /// A query parameter is missing, unknown or has a bad value (400).
    pub const INVALID_QUERY: &str = "invalid_query";
    /// The body is not valid JSON (400).
    pub const MALFORMED_JSON: &str = "malformed_json";
    /// A CloudEvents attribute is missing, has the wrong type or an invalid value (400).
    pub const INVALID_ATTRIBUTE: &str = "invalid_attribute";
    /// The body is valid JSON but not the shape of an event or batch (400).
    pub const INVALID_EVENT: &str = "invalid_event";
    /// Missing or wrong credentials (401).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// A web page of another site or origin asked for a change, or a host open on
    /// loopback was addressed by a name not its own (403).
    pub const FORBIDDEN: &str = "forbidden";
    /// The addressed resource does not exist (404).
    pub const NOT_FOUND: &str = "not_found";
    /// The route exists but not with this method (405); `Allow` lists the methods.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// The client did not send its whole request within `http.request_timeout` (408).
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// The body, one event or a batch is larger than allowed (413).
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// The request's `Content-Type` is not one the route accepts (415).
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// The client is sending faster than it is allowed to (429).
    pub const TOO_MANY_REQUESTS: &str = "too_many_requests";
    /// The disk has not room for what was asked, such as a backup (507).
    pub const INSUFFICIENT_STORAGE: &str = "insufficient_storage";
    /// The host cannot take the request now, typically under backpressure (503).
    pub const UNAVAILABLE: &str = "unavailable";
    /// Something went wrong inside the host (500).
    pub const INTERNAL: &str = "internal";
    /// An event's data fails its type's registered schema (400); `details` names the
    /// JSON pointer, the rule and the schema version.
    pub const SCHEMA_VIOLATION: &str = "schema_violation";
    /// A schema document is not JSON, not a JSON Schema or cannot be used offline (400).
    pub const INVALID_SCHEMA: &str = "invalid_schema";
    /// The request conflicts with the current state (409), such as a schema version that
    /// recent events fail.
    pub const CONFLICT: &str = "conflict";
    /// An event's subject stream is not at its `expectedversion` (409); `details` has the
    /// subject, the expected and the current version. Nothing of the request was stored.
    pub const VERSION_CONFLICT: &str = "version_conflict";
}

/// An error answer of the HTTP API: a status, a stable machine-readable code, a message
/// for humans and, for `429`/`503`, how long the client should wait before retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    www_authenticate: bool,
    details: Option<serde_json::Value>,
}

impl ApiError {
    /// An error with any status, code and message. Prefer the named constructors.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            www_authenticate: false,
            details: None,
        }
    }

    /// Adds machine-readable details, shown as `error.details`.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// `400 Bad Request` with the given code (see [`code`]) and message.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// `401 Unauthorized` with `WWW-Authenticate: Bearer`.
    pub fn unauthorized() -> Self {
        Self {
            www_authenticate: true,
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                code::UNAUTHORIZED,
                "missing or invalid bearer token",
            )
        }
    }

    /// `404 Not Found`; `what` names the missing thing, e.g. ``plugin `billing` ``.
    pub fn not_found(what: impl fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!("{what} not found"),
        )
    }

    /// `413 Payload Too Large`: the body exceeds `limit_bytes`.
    pub fn payload_too_large(limit_bytes: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::PAYLOAD_TOO_LARGE,
            format!("payload exceeds the limit of {limit_bytes} bytes"),
        )
    }

    /// `415 Unsupported Media Type`: `content_type` (`None` when the header is missing)
    /// is not one of `accepted`, which the message lists.
    pub fn unsupported_media_type(content_type: Option<&str>, accepted: &[&str]) -> Self {
        let got = match content_type {
            Some(ct) => format!("unsupported content type `{ct}`"),
            None => "missing Content-Type".to_owned(),
        };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code::UNSUPPORTED_MEDIA_TYPE,
            format!("{got}; accepted: {}", accepted.join(", ")),
        )
    }

    /// `429 Too Many Requests` with `Retry-After: retry_after_secs`.
    pub fn too_many_requests(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            retry_after: Some(retry_after_secs),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                code::TOO_MANY_REQUESTS,
                message,
            )
        }
    }

    /// `503 Service Unavailable` with `Retry-After: retry_after_secs`.
    pub fn unavailable(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            retry_after: Some(retry_after_secs),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code::UNAVAILABLE, message)
        }
    }

    /// `500 Internal Server Error`. The cause is logged here and never sent to the
    /// client, which sees only `"internal error"`.
    pub fn internal(cause: impl fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error answering an HTTP request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code::INTERNAL,
            "internal error",
        )
    }

    /// Prefixes the message with `context` and `": "`, e.g. `event 3: ...` for one event
    /// of a batch. Status, code and headers stay as they are.
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code (see [`code`]).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The message for humans.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Seconds the client should wait before retrying, for `429` and `503`.
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }
}

/// The body of every error answer: `{"error": {"code", "message"}}`.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// What went wrong, for programs (`code`) and for people (`message`).
#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
                details: self.details.as_ref(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.www_authenticate {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders `err` and returns its status, headers and body parsed as JSON.
    async fn render(err: ApiError) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let response = err.into_response();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let body = serde_json::from_slice(&bytes).expect("JSON body");
        (status, headers, body)
    }

    fn body(code: &str, message: &str) -> serde_json::Value {
        serde_json::json!({ "error": { "code": code, "message": message } })
    }

    fn content_type(headers: &axum::http::HeaderMap) -> &str {
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn bad_request_renders_code_and_message() {
        let err = ApiError::bad_request(code::MALFORMED_JSON, "malformed JSON at line 1");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.code(), "malformed_json");
        assert_eq!(err.message(), "malformed JSON at line 1");
        let (status, headers, json) = render(err).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(content_type(&headers), "application/json");
        assert_eq!(json, body("malformed_json", "malformed JSON at line 1"));
        assert!(headers.get(header::RETRY_AFTER).is_none());
        assert!(headers.get(header::WWW_AUTHENTICATE).is_none());
    }

    #[tokio::test]
    async fn exact_body_bytes() {
        let response = ApiError::bad_request("x", "say \"hi\"").into_response();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        assert_eq!(
            &bytes[..],
            br#"{"error":{"code":"x","message":"say \"hi\""}}"#
        );
    }

    #[tokio::test]
    async fn unauthorized_sets_www_authenticate() {
        let (status, headers, json) = render(ApiError::unauthorized()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            headers
                .get(header::WWW_AUTHENTICATE)
                .map(HeaderValue::as_bytes),
            Some(&b"Bearer"[..])
        );
        assert_eq!(content_type(&headers), "application/json");
        assert_eq!(
            json,
            body("unauthorized", "missing or invalid bearer token")
        );
    }

    #[tokio::test]
    async fn not_found_names_the_thing() {
        let (status, _, json) = render(ApiError::not_found("plugin `billing`")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json, body("not_found", "plugin `billing` not found"));
    }

    #[tokio::test]
    async fn payload_too_large_names_the_limit() {
        let (status, _, json) = render(ApiError::payload_too_large(1_048_576)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            json,
            body(
                "payload_too_large",
                "payload exceeds the limit of 1048576 bytes"
            )
        );
    }

    #[tokio::test]
    async fn unsupported_media_type_lists_accepted_types() {
        let accepted = ["application/json", "application/cloudevents+json"];
        let (status, _, json) = render(ApiError::unsupported_media_type(
            Some("text/plain"),
            &accepted,
        ))
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            json,
            body(
                "unsupported_media_type",
                "unsupported content type `text/plain`; accepted: application/json, \
                 application/cloudevents+json"
            )
        );
        let (_, _, json) = render(ApiError::unsupported_media_type(None, &accepted)).await;
        assert_eq!(
            json,
            body(
                "unsupported_media_type",
                "missing Content-Type; accepted: application/json, application/cloudevents+json"
            )
        );
    }

    #[tokio::test]
    async fn unavailable_sets_retry_after() {
        let err = ApiError::unavailable("log is full", 2);
        assert_eq!(err.retry_after(), Some(2));
        let (status, headers, json) = render(err).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            headers.get(header::RETRY_AFTER).map(HeaderValue::as_bytes),
            Some(&b"2"[..])
        );
        assert_eq!(json, body("unavailable", "log is full"));
    }

    #[tokio::test]
    async fn too_many_requests_sets_retry_after() {
        let (status, headers, json) = render(ApiError::too_many_requests("slow down", 30)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            headers.get(header::RETRY_AFTER).map(HeaderValue::as_bytes),
            Some(&b"30"[..])
        );
        assert_eq!(json, body("too_many_requests", "slow down"));
    }

    #[tokio::test]
    async fn internal_hides_the_cause() {
        let err = ApiError::internal("sqlite: disk I/O error at /secret/path");
        assert_eq!(err.code(), "internal");
        let (status, headers, json) = render(err).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(content_type(&headers), "application/json");
        assert_eq!(json, body("internal", "internal error"));
    }

    #[test]
    fn context_prefixes_the_message() {
        let err = ApiError::bad_request(code::INVALID_ATTRIBUTE, "missing `id`").context("event 3");
        assert_eq!(err.message(), "event 3: missing `id`");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            err.to_string(),
            "400 Bad Request invalid_attribute: event 3: missing `id`"
        );
    }
}
