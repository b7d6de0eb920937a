//! Helpers shared by the tests of every content mode: header maps, a minimal valid
//! event in the JSON format, and assertions on [`ApiError`]s.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};

use super::{BATCH_CONTENT_TYPE, ParseLimits, STRUCTURED_CONTENT_TYPE, parse_events};
use crate::event::Event;
use crate::ingest::ApiError;
use crate::ingest::error::code;

pub(super) const LIMITS: ParseLimits = ParseLimits {
    max_event_bytes: 1024,
    max_batch_events: 3,
};

pub(super) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    map
}

pub(super) fn binary(extra: &[(&str, &str)]) -> HeaderMap {
    let mut pairs = vec![
        ("ce-specversion", "1.0"),
        ("ce-id", "evt-1"),
        ("ce-source", "/orders"),
        ("ce-type", "order.created"),
    ];
    pairs.extend_from_slice(extra);
    headers(&pairs)
}

pub(super) fn structured_headers() -> HeaderMap {
    headers(&[("content-type", STRUCTURED_CONTENT_TYPE)])
}

pub(super) fn batch_headers() -> HeaderMap {
    headers(&[("content-type", BATCH_CONTENT_TYPE)])
}

pub(super) fn minimal() -> Value {
    json!({
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/orders",
        "type": "order.created"
    })
}

pub(super) fn with(mut value: Value, key: &str, member: Value) -> Value {
    if let Value::Object(obj) = &mut value {
        obj.insert(key.to_owned(), member);
    }
    value
}

pub(super) fn structured(body: &[u8]) -> Result<Event, ApiError> {
    let mut events = parse_events(&structured_headers(), body, &LIMITS)?;
    assert_eq!(events.len(), 1);
    Ok(events.remove(0))
}

pub(super) fn structured_value(value: &Value) -> Result<Event, ApiError> {
    structured(value.to_string().as_bytes())
}

pub(super) fn err(result: Result<impl std::fmt::Debug, ApiError>) -> ApiError {
    result.expect_err("expected an error")
}

pub(super) fn assert_invalid(result: Result<impl std::fmt::Debug, ApiError>, needle: &str) {
    let e = err(result);
    assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e.code(), code::INVALID_ATTRIBUTE, "{e}");
    assert!(
        e.message().contains(needle),
        "{:?} lacks {needle:?}",
        e.message()
    );
}
