//! The CloudEvents 1.0 HTTP protocol binding: pure functions from request parts (headers
//! and body) to validated [`Event`]s, and the JSON event format for answers.
//!
//! Owns the binary, structured and batched content modes of `POST /v1/events`, the plain
//! JSON body of `POST /v1/events/{type}`, and [`to_json`], the structured rendering used by
//! `GET` answers and dead letters.
//!
//! Invariants:
//! - every [`Event`] returned has a non-empty `id` and `source`, a type that passes
//!   [`validate_event_type`], an RFC 3339 `time` if any ([`is_rfc3339`]), non-empty
//!   `subject`/`dataschema` if any, extension names that pass [`is_valid_extension_name`]
//!   and none that collides with a core attribute, and an [`encoded_size`] of at most
//!   [`ParseLimits::max_event_bytes`];
//! - a batch is all-or-nothing: either every event is returned or the error names the
//!   (0-based) index of the first bad one;
//! - every failure is an [`ApiError`] a client can act on: `400` (`malformed_json`,
//!   `invalid_attribute`, `invalid_event`), `413` or `415`. Nothing here logs or panics.
//!
//! Mode selection follows the HTTP binding: a `Content-Type` of
//! `application/cloudevents+json` means structured mode and
//! `application/cloudevents-batch+json` batched mode, even if `ce-*` headers are present;
//! otherwise a `ce-specversion` header means binary mode; anything else is `415`.
//!
//! Each mode has its own file: `binary` (`ce-*` headers), `structured` (one JSON-format
//! event), `batch` (an array of them) and `render` (the JSON format for answers). This
//! file chooses the mode, parses `POST /v1/events/{type}` and holds the checks every mode
//! shares, so an event is valid by the same rules whichever way it came in.

mod batch;
mod binary;
mod render;
mod structured;
#[cfg(test)]
mod test_support;

use axum::http::{HeaderMap, header};
use serde::Deserialize;
use serde_json::Value;

use self::binary::CeHeaders;
pub use self::render::{Rendered, encoded_size, to_json};
use super::error::{ApiError, code};
pub use crate::clock::is_rfc3339;
use crate::event::{Event, is_valid_extension_name, validate_event_type};

/// Media type of one event in structured mode.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Media type of a batch of structured events.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// Media type of the body of `POST /v1/events/{type}`, and of JSON data.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// The only CloudEvents `specversion` accepted.
pub const SPEC_VERSION: &str = "1.0";
/// `source` of an event posted to `POST /v1/events/{type}` without a `ce-source` header.
pub const DEFAULT_SOURCE: &str = "/switchyard/http";

/// Header that switches `POST /v1/events` to binary mode.
const CE_SPECVERSION: &str = "ce-specversion";
/// Core attribute names, plus the `data` members; none of them can be an extension.
pub const RESERVED_NAMES: [&str; 10] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
];
/// What `POST /v1/events` accepts, as listed in its `415` message.
const EVENTS_ACCEPTED: [&str; 3] = [
    STRUCTURED_CONTENT_TYPE,
    BATCH_CONTENT_TYPE,
    "any type with a ce-specversion header (binary mode)",
];
/// Longest attribute value quoted back in an error message, in characters.
const QUOTE_MAX_CHARS: usize = 64;

/// Size limits applied while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Largest [`encoded_size`] of one event; a larger one is `413`.
    pub max_event_bytes: usize,
    /// Most events in one batch; more is `413`.
    pub max_batch_events: usize,
}

/// Parses the body of `POST /v1/events` in binary, structured or batched mode (see the
/// module documentation for how the mode is chosen) into validated events, in order.
///
/// In a batch the first bad event fails the whole request and the error message starts
/// with `event N: ` where `N` is its 0-based index in the array.
pub fn parse_events(
    headers: &HeaderMap,
    body: &[u8],
    limits: &ParseLimits,
) -> Result<Vec<Event>, ApiError> {
    let content_type = content_type(headers, &EVENTS_ACCEPTED)?;
    let media = content_type.map(media_type);
    if media.is_some_and(|m| m.eq_ignore_ascii_case(STRUCTURED_CONTENT_TYPE)) {
        return structured::parse_structured(body, limits).map(|event| vec![event]);
    }
    if media.is_some_and(|m| m.eq_ignore_ascii_case(BATCH_CONTENT_TYPE)) {
        return batch::parse_batch(body, limits);
    }
    let other_format = media.is_some_and(|m| {
        m.get(..23)
            .is_some_and(|p| p.eq_ignore_ascii_case("application/cloudevents"))
    });
    if !other_format && headers.contains_key(CE_SPECVERSION) {
        return binary::parse_binary(headers, content_type, body, limits).map(|event| vec![event]);
    }
    Err(ApiError::unsupported_media_type(
        content_type,
        &EVENTS_ACCEPTED,
    ))
}
/// Parses the body of `POST /v1/events/{type}`: `body` must be one JSON value and becomes
/// the event's `data` byte for byte, with `datacontenttype` `application/json`.
///
/// `Content-Type`, if present, must be `application/json` (parameters allowed). The id is
/// a fresh UUIDv7 unless a `ce-id` header gives one (so a producer can retry
/// idempotently); `source` is the `ce-source` header or [`DEFAULT_SOURCE`]; `time` is the
/// `ce-time` header or now. Other `ce-*` headers follow the binary-mode rules: `ce-subject`
/// and `ce-dataschema` set those attributes, `ce-specversion` must be `1.0` and `ce-type`
/// must equal `ty`, and every other `ce-NAME` becomes extension `NAME`.
pub fn parse_typed_event(
    ty: &str,
    headers: &HeaderMap,
    body: &[u8],
    limits: &ParseLimits,
) -> Result<Event, ApiError> {
    validate_event_type(ty).map_err(|e| invalid(format!("attribute `type`: {e}")))?;
    if let Some(ct) = content_type(headers, &[JSON_CONTENT_TYPE])?
        && !media_type(ct).eq_ignore_ascii_case(JSON_CONTENT_TYPE)
    {
        return Err(ApiError::unsupported_media_type(
            Some(ct),
            &[JSON_CONTENT_TYPE],
        ));
    }
    if body.len() > limits.max_event_bytes {
        return Err(event_too_large(body.len(), limits));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            code::MALFORMED_JSON,
            "body is empty; expected a JSON value",
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(malformed_json)?;

    let attrs = CeHeaders::collect(headers)?;
    if let Some(version) = &attrs.specversion {
        check_specversion(version)?;
    }
    if let Some(header_ty) = &attrs.ty
        && header_ty != ty
    {
        return Err(invalid(format!(
            "attribute `type`: the ce-type header says {} but the path says {}",
            quote(header_ty),
            quote(ty)
        )));
    }
    let event = Event {
        id: attrs.id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        source: attrs.source.unwrap_or_else(|| DEFAULT_SOURCE.to_owned()),
        ty: ty.to_owned(),
        subject: attrs.subject,
        time: Some(attrs.time.unwrap_or_else(crate::clock::now_rfc3339)),
        datacontenttype: Some(JSON_CONTENT_TYPE.to_owned()),
        dataschema: attrs.dataschema,
        data: body.to_vec(),
        extensions: attrs.extensions,
    };
    checked(event, limits)
}

/// `event`, if it passes [`validate`] and fits the size limit.
fn checked(event: Event, limits: &ParseLimits) -> Result<Event, ApiError> {
    validate(&event)?;
    check_size(&event, limits)?;
    Ok(event)
}

// ---------------------------------------------------------------------------------------
// Checks every mode shares

/// Checks what every mode shares: non-empty `id`, `source`, `subject` and `dataschema`, a
/// valid `type` and an RFC 3339 `time`.
fn validate(event: &Event) -> Result<(), ApiError> {
    let non_empty = [
        ("id", Some(&event.id)),
        ("source", Some(&event.source)),
        ("subject", event.subject.as_ref()),
        ("dataschema", event.dataschema.as_ref()),
    ];
    for (name, value) in non_empty {
        if value.is_some_and(String::is_empty) {
            return Err(invalid(format!("attribute `{name}` must not be empty")));
        }
    }
    validate_event_type(&event.ty).map_err(|e| invalid(format!("attribute `type`: {e}")))?;
    if let Some(time) = &event.time
        && !is_rfc3339(time)
    {
        return Err(invalid(format!(
            "attribute `time` must be an RFC 3339 timestamp such as \
             2024-05-01T12:00:00Z, got {}",
            quote(time)
        )));
    }
    Ok(())
}

/// `specversion` must be exactly [`SPEC_VERSION`].
fn check_specversion(version: &str) -> Result<(), ApiError> {
    if version == SPEC_VERSION {
        Ok(())
    } else {
        Err(invalid(format!(
            "attribute `specversion` must be \"{SPEC_VERSION}\", got {}",
            quote(version)
        )))
    }
}

/// An extension name must be valid and must not shadow a core attribute.
fn check_extension_name(name: &str) -> Result<(), ApiError> {
    if RESERVED_NAMES.contains(&name) {
        return Err(invalid(format!(
            "attribute `{name}` is a core attribute and cannot be used as an extension"
        )));
    }
    if !is_valid_extension_name(name) {
        return Err(invalid(format!(
            "extension attribute name {} is invalid: names are lower-case ASCII letters \
             and digits",
            quote(name)
        )));
    }
    Ok(())
}

/// Rejects an event whose [`encoded_size`] exceeds the limit.
fn check_size(event: &Event, limits: &ParseLimits) -> Result<(), ApiError> {
    let size = encoded_size(event);
    if size > limits.max_event_bytes {
        return Err(event_too_large(size, limits));
    }
    Ok(())
}

/// `413` for one event of `size` bytes.
fn event_too_large(size: usize, limits: &ParseLimits) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        code::PAYLOAD_TOO_LARGE,
        format!(
            "the event is {size} bytes (data and attributes); at most {} are allowed",
            limits.max_event_bytes
        ),
    )
}

/// `400 invalid_attribute`.
fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code::INVALID_ATTRIBUTE, message)
}

/// `s` as a JSON string literal, shortened to [`QUOTE_MAX_CHARS`] characters.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", Value::String(s[..cut].to_owned())),
        None => Value::String(s.to_owned()).to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Encodings

/// The `Content-Type` header as a string, if present. A value that is not UTF-8 is `415`
/// listing `accepted`.
fn content_type<'h>(
    headers: &'h HeaderMap,
    accepted: &[&str],
) -> Result<Option<&'h str>, ApiError> {
    headers
        .get(header::CONTENT_TYPE)
        .map(|value| {
            std::str::from_utf8(value.as_bytes()).map_err(|_| {
                let lossy = String::from_utf8_lossy(value.as_bytes());
                ApiError::unsupported_media_type(Some(&lossy), accepted)
            })
        })
        .transpose()
}

pub(in crate::ingest) use crate::event::{is_json_media_type, media_type};

/// Parses a whole body as JSON, mapping syntax errors to `400 malformed_json`.
fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            code::MALFORMED_JSON,
            "body is empty; expected JSON",
        ));
    }
    serde_json::from_slice(body).map_err(malformed_json)
}

/// `400 malformed_json` naming serde's line and column.
fn malformed_json(err: serde_json::Error) -> ApiError {
    let full = err.to_string();
    let suffix = format!(" at line {} column {}", err.line(), err.column());
    let what = full.strip_suffix(&suffix).unwrap_or(&full);
    ApiError::bad_request(
        code::MALFORMED_JSON,
        format!(
            "malformed JSON at line {}, column {}: {what}",
            err.line(),
            err.column()
        ),
    )
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::json;

    use super::test_support::*;
    use super::*;

    // ---- mode selection --------------------------------------------------------------

    #[test]
    fn unsupported_content_types_are_415() {
        for h in [
            headers(&[]),
            headers(&[("content-type", "application/json")]),
            headers(&[("content-type", "text/plain")]),
            // Structured in another format: not binary even with ce-specversion.
            binary(&[("content-type", "application/cloudevents+xml")]),
        ] {
            let e = err(parse_events(&h, b"{}", &LIMITS));
            assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert_eq!(e.code(), code::UNSUPPORTED_MEDIA_TYPE);
            assert!(
                e.message().contains(STRUCTURED_CONTENT_TYPE)
                    && e.message().contains(BATCH_CONTENT_TYPE),
                "{}",
                e.message()
            );
        }
        let e = err(parse_events(&headers(&[]), b"{}", &LIMITS));
        assert!(
            e.message().starts_with("missing Content-Type"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn structured_content_type_wins_over_ce_headers() {
        let h = binary(&[(
            "content-type",
            "Application/CloudEvents+JSON; charset=UTF-8",
        )]);
        let body = with(minimal(), "id", json!("from-body"));
        let events = parse_events(&h, body.to_string().as_bytes(), &LIMITS).expect("parses");
        assert_eq!(events[0].id, "from-body");
    }

    // ---- POST /v1/events/{type} ------------------------------------------------------

    #[test]
    fn typed_event_fills_defaults() {
        let body = br#" {"amount": 10.50} "#;
        let event =
            parse_typed_event("payment.completed", &headers(&[]), body, &LIMITS).expect("parses");
        assert_eq!(event.ty, "payment.completed");
        assert_eq!(event.source, DEFAULT_SOURCE);
        assert_eq!(event.data, body);
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        let id = uuid::Uuid::parse_str(&event.id).expect("a UUID");
        assert_eq!(id.get_version_num(), 7);
        let time = event.time.expect("time");
        assert!(is_rfc3339(&time), "{time}");
        assert_eq!(event.subject, None);
        assert!(event.extensions.is_empty());
    }

    #[test]
    fn typed_event_takes_ce_headers() {
        let h = headers(&[
            ("content-type", "application/json; charset=utf-8"),
            ("ce-id", "retry-me"),
            ("ce-source", "/billing"),
            ("ce-subject", "inv%2042"),
            ("ce-correlationid", "c-1"),
            ("ce-time", "2024-05-01T12:00:00Z"),
            ("ce-specversion", "1.0"),
            ("ce-type", "payment.completed"),
        ]);
        let event = parse_typed_event("payment.completed", &h, b"{}", &LIMITS).expect("parses");
        assert_eq!(event.id, "retry-me");
        assert_eq!(event.source, "/billing");
        assert_eq!(event.subject.as_deref(), Some("inv 42"));
        assert_eq!(event.time.as_deref(), Some("2024-05-01T12:00:00Z"));
        assert_eq!(event.extension("correlationid"), Some("c-1"));
        assert_eq!(event.extensions.len(), 1);
    }

    #[test]
    fn typed_event_errors() {
        let e = err(parse_typed_event("a..b", &headers(&[]), b"{}", &LIMITS));
        assert_eq!(e.code(), code::INVALID_ATTRIBUTE);
        assert_eq!(
            e.message(),
            "attribute `type`: event type `a..b` has an empty segment"
        );
        for body in [&b""[..], b"  "] {
            let e = err(parse_typed_event("a", &headers(&[]), body, &LIMITS));
            assert_eq!(e.code(), code::MALFORMED_JSON);
            assert_eq!(e.message(), "body is empty; expected a JSON value");
        }
        let e = err(parse_typed_event("a", &headers(&[]), b"{\"a\":}", &LIMITS));
        assert_eq!(e.code(), code::MALFORMED_JSON);
        assert!(
            e.message()
                .starts_with("malformed JSON at line 1, column 6: "),
            "{}",
            e.message()
        );
        let e = err(parse_typed_event(
            "a",
            &headers(&[("content-type", "text/plain")]),
            b"{}",
            &LIMITS,
        ));
        assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            e.message(),
            "unsupported content type `text/plain`; accepted: application/json"
        );
        let e = err(parse_typed_event(
            "a",
            &headers(&[]),
            &[b' '; 1025],
            &LIMITS,
        ));
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_invalid(
            parse_typed_event("a", &headers(&[("ce-type", "b")]), b"1", &LIMITS),
            "attribute `type`: the ce-type header says \"b\" but the path says \"a\"",
        );
        assert_invalid(
            parse_typed_event("a", &headers(&[("ce-specversion", "0.3")]), b"1", &LIMITS),
            "attribute `specversion`",
        );
        assert_invalid(
            parse_typed_event("a", &headers(&[("ce-Bad_Name", "x")]), b"1", &LIMITS),
            "extension attribute name \"bad_name\" is invalid",
        );
        assert_invalid(
            parse_typed_event("a", &headers(&[("ce-id", "")]), b"1", &LIMITS),
            "attribute `id` must not be empty",
        );
        assert_invalid(
            parse_typed_event("a", &headers(&[("ce-time", "2024-05-01")]), b"1", &LIMITS),
            "attribute `time`",
        );
    }

    // ---- helpers ---------------------------------------------------------------------

    #[test]
    fn malformed_json_names_line_and_column() {
        let e = err(structured(br#"{"id": "x", "source" 1}"#));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.code(), code::MALFORMED_JSON);
        assert_eq!(
            e.message(),
            "malformed JSON at line 1, column 22: expected `:`"
        );
        let e = err(structured(b"{\n  \"id\": \"x\",\n"));
        assert_eq!(
            e.message(),
            "malformed JSON at line 3, column 0: EOF while parsing a value"
        );
        let e = err(parse_events(&batch_headers(), b"[{}, ", &LIMITS));
        assert_eq!(e.code(), code::MALFORMED_JSON);
    }
}
