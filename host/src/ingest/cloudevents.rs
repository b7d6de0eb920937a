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

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

use axum::http::{HeaderMap, header};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::{ApiError, code};
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
        return parse_structured(body, limits).map(|event| vec![event]);
    }
    if media.is_some_and(|m| m.eq_ignore_ascii_case(BATCH_CONTENT_TYPE)) {
        return parse_batch(body, limits);
    }
    let other_format = media.is_some_and(|m| {
        m.get(..23)
            .is_some_and(|p| p.eq_ignore_ascii_case("application/cloudevents"))
    });
    if !other_format && headers.contains_key(CE_SPECVERSION) {
        return parse_binary(headers, content_type, body, limits).map(|event| vec![event]);
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
    validate(&event)?;
    check_size(&event, limits)?;
    Ok(event)
}

/// Renders an event in the CloudEvents JSON format (structured mode): `specversion`
/// `"1.0"`, the attributes, the extensions as top-level string members, and the data as
/// `data` or `data_base64`:
/// - JSON media types (`application/json`, `text/json`, `*/*+json`) whose bytes parse as
///   JSON other than `null` (which the JSON format reads as no data): `data` is that JSON
///   value;
/// - other `text/*` types that are valid UTF-8: `data` is a JSON string;
/// - anything else, including no `datacontenttype` and a JSON media type whose bytes are
///   not JSON: `data_base64`.
///
/// Empty data is left out. Extensions whose names collide with core attributes (which
/// [`parse_events`] never produces) are overwritten by the core attribute.
pub fn to_json(event: &Event) -> Value {
    let mut obj = Map::new();
    for (name, value) in &event.extensions {
        obj.insert(name.clone(), Value::String(value.clone()));
    }
    let mut put = |name: &str, value: &str| {
        obj.insert(name.to_owned(), Value::String(value.to_owned()));
    };
    put("specversion", SPEC_VERSION);
    put("id", &event.id);
    put("source", &event.source);
    put("type", &event.ty);
    let optional = [
        ("subject", &event.subject),
        ("time", &event.time),
        ("datacontenttype", &event.datacontenttype),
        ("dataschema", &event.dataschema),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            put(name, value);
        }
    }
    obj.remove("data");
    obj.remove("data_base64");
    if !event.data.is_empty() {
        let media = event.datacontenttype.as_deref().map(media_type);
        let as_json = media
            .filter(|m| is_json_media_type(m))
            .and_then(|_| serde_json::from_slice::<Value>(&event.data).ok())
            .filter(|value| !value.is_null());
        let as_text = || {
            media
                .filter(|m| {
                    // A string `data` with a JSON type would be read back as a JSON value.
                    !is_json_media_type(m)
                        && m.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("text/"))
                })
                .and_then(|_| std::str::from_utf8(&event.data).ok())
        };
        if let Some(value) = as_json {
            obj.insert("data".to_owned(), value);
        } else if let Some(text) = as_text() {
            obj.insert("data".to_owned(), Value::String(text.to_owned()));
        } else {
            obj.insert(
                "data_base64".to_owned(),
                Value::String(base64_encode(&event.data)),
            );
        }
    }
    Value::Object(obj)
}

/// The size an event counts for against [`ParseLimits::max_event_bytes`]: its data bytes
/// plus the lengths of every attribute value and extension name and value.
pub fn encoded_size(event: &Event) -> usize {
    let optional = [
        &event.subject,
        &event.time,
        &event.datacontenttype,
        &event.dataschema,
    ];
    event.data.len()
        + event.id.len()
        + event.source.len()
        + event.ty.len()
        + optional
            .iter()
            .filter_map(|v| v.as_ref())
            .map(String::len)
            .sum::<usize>()
        + event
            .extensions
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
}

/// Whether `s` is an RFC 3339 timestamp: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, with a
/// real calendar date (leap years included), hours 00–23, minutes 00–59, seconds 00–60
/// (leap second), at least one fraction digit after a `.`, and an offset of at most
/// 23:59. `T` and `Z` may be lower case, as RFC 3339 allows.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |range: Range<usize>| -> Option<u32> {
        let digits = b.get(range)?;
        digits.iter().try_fold(0u32, |acc, d| {
            d.is_ascii_digit().then(|| acc * 10 + u32::from(d - b'0'))
        })
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    let fields = (|| {
        let fixed = at(4, b"-") && at(7, b"-") && at(10, b"Tt") && at(13, b":") && at(16, b":");
        fixed.then_some(())?;
        Some((
            num(0..4)?,
            num(5..7)?,
            num(8..10)?,
            num(11..13)?,
            num(14..16)?,
            num(17..19)?,
        ))
    })();
    let Some((year, month, day, hour, minute, second)) = fields else {
        return false;
    };
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return false;
    }
    let mut i = 19;
    if at(i, b".") {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            i + 6 == b.len()
                && at(i + 3, b":")
                && num(i + 1..i + 3).is_some_and(|h| h <= 23)
                && num(i + 4..i + 6).is_some_and(|m| m <= 59)
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Modes

/// Binary mode: attributes from `ce-*` headers, `Content-Type` as `datacontenttype`, the
/// body as data.
fn parse_binary(
    headers: &HeaderMap,
    content_type: Option<&str>,
    body: &[u8],
    limits: &ParseLimits,
) -> Result<Event, ApiError> {
    if body.len() > limits.max_event_bytes {
        return Err(event_too_large(body.len(), limits));
    }
    let attrs = CeHeaders::collect(headers)?;
    let required = |value: Option<String>, name: &str| {
        value.ok_or_else(|| {
            invalid(format!(
                "missing required attribute `{name}` (header `ce-{name}`)"
            ))
        })
    };
    check_specversion(&required(attrs.specversion, "specversion")?)?;
    let event = Event {
        id: required(attrs.id, "id")?,
        source: required(attrs.source, "source")?,
        ty: required(attrs.ty, "type")?,
        subject: attrs.subject,
        time: attrs.time,
        datacontenttype: content_type.map(str::to_owned),
        dataschema: attrs.dataschema,
        data: body.to_vec(),
        extensions: attrs.extensions,
    };
    validate(&event)?;
    check_size(&event, limits)?;
    Ok(event)
}

/// Structured mode: the body is one event in the JSON format.
fn parse_structured(body: &[u8], limits: &ParseLimits) -> Result<Event, ApiError> {
    let Element::Object(members) = parse_json(body)? else {
        return Err(ApiError::bad_request(
            code::INVALID_EVENT,
            "a structured-mode body must be a JSON object",
        ));
    };
    let event = event_from_members(members)?;
    check_size(&event, limits)?;
    Ok(event)
}

/// Batched mode: the body is a JSON array of structured events.
fn parse_batch(body: &[u8], limits: &ParseLimits) -> Result<Vec<Event>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'[') {
        // Malformed JSON is reported as such before the shape is.
        parse_json::<IgnoredAny>(body)?;
        return Err(ApiError::bad_request(
            code::INVALID_EVENT,
            "a batch must be a JSON array of events",
        ));
    }
    let items: Vec<Element<'_>> = parse_json(body)?;
    if items.is_empty() {
        return Err(ApiError::bad_request(
            code::INVALID_EVENT,
            "the batch is empty; send at least one event",
        ));
    }
    if items.len() > limits.max_batch_events {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            code::PAYLOAD_TOO_LARGE,
            format!(
                "the batch has {} events; at most {} are allowed",
                items.len(),
                limits.max_batch_events
            ),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            batch_element(item, limits).map_err(|e| e.context(format_args!("event {index}")))
        })
        .collect()
}

/// One element of a batch.
fn batch_element(item: Element<'_>, limits: &ParseLimits) -> Result<Event, ApiError> {
    let members = match item {
        Element::Object(members) => members,
        Element::Other(described) => {
            return Err(ApiError::bad_request(
                code::INVALID_EVENT,
                format!("a batch element must be a JSON object, got {described}"),
            ));
        }
    };
    let event = event_from_members(members)?;
    check_size(&event, limits)?;
    Ok(event)
}

/// Builds an event from the members of one JSON-format object. JSON `data` is stored
/// exactly as the producer wrote it (member order, number spelling, big integers).
fn event_from_members(mut members: Members<'_>) -> Result<Event, ApiError> {
    match members.take("specversion") {
        None => return Err(missing("specversion")),
        Some(Value::String(version)) => check_specversion(&version)?,
        Some(other) => {
            return Err(invalid(format!(
                "attribute `specversion` must be \"{SPEC_VERSION}\", got {}",
                describe(&other)
            )));
        }
    }
    let id = members.required_string("id")?;
    let source = members.required_string("source")?;
    let ty = members.required_string("type")?;
    let subject = members.optional_string("subject")?;
    let time = members.optional_string("time")?;
    let datacontenttype = members.optional_string("datacontenttype")?;
    let dataschema = members.optional_string("dataschema")?;
    let data = members.data.filter(|raw| raw.get() != "null");
    let data_base64 = members.take("data_base64");

    let mut extensions = BTreeMap::new();
    for (name, value) in members.attributes {
        let value = match value {
            Value::Null => continue,
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(invalid(format!(
                    "extension attribute `{name}` must be a string, number or boolean, got {}",
                    describe(&other)
                )));
            }
        };
        check_extension_name(&name)?;
        extensions.insert(name.into_owned(), value);
    }

    let (data, datacontenttype) = match (data, data_base64, datacontenttype) {
        (Some(_), Some(_), _) => {
            return Err(invalid(
                "attributes `data` and `data_base64` are mutually exclusive; send one",
            ));
        }
        (Some(raw), None, Some(ct))
            if raw.get().starts_with('"') && !is_json_media_type(media_type(&ct)) =>
        {
            let text: String = serde_json::from_str(raw.get()).map_err(ApiError::internal)?;
            (text.into_bytes(), Some(ct))
        }
        (Some(raw), None, ct) => {
            let ct = ct.unwrap_or_else(|| JSON_CONTENT_TYPE.to_owned());
            (raw.get().as_bytes().to_vec(), Some(ct))
        }
        (None, Some(Value::String(encoded)), ct) => {
            let bytes = base64_decode(&encoded).ok_or_else(|| {
                invalid("attribute `data_base64` is not valid base64 (RFC 4648, standard alphabet)")
            })?;
            (bytes, ct)
        }
        (None, Some(other), _) => {
            return Err(invalid(format!(
                "attribute `data_base64` must be a base64 string, got {}",
                describe(&other)
            )));
        }
        (None, None, ct) => (Vec::new(), ct),
    };
    let event = Event {
        id,
        source,
        ty,
        subject,
        time,
        datacontenttype,
        dataschema,
        data,
        extensions,
    };
    validate(&event)?;
    Ok(event)
}

// ---------------------------------------------------------------------------------------
// Attributes

/// The CloudEvents attributes carried in `ce-*` headers, percent-decoded.
#[derive(Default)]
struct CeHeaders {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    ty: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    dataschema: Option<String>,
    extensions: BTreeMap<String, String>,
}

impl CeHeaders {
    /// Reads every `ce-*` header. Header names are lower case already, so extension names
    /// are too; each value is percent-decoded and must then be UTF-8. A header given more
    /// than once, `ce-datacontenttype` (binary mode carries it in `Content-Type`), `ce-data`
    /// and names that are not valid extension names are rejected.
    fn collect(headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut out = Self::default();
        for name in headers.keys() {
            let Some(attr) = name.as_str().strip_prefix("ce-") else {
                continue;
            };
            let mut values = headers.get_all(name).iter();
            let (Some(value), None) = (values.next(), values.next()) else {
                return Err(invalid(format!(
                    "attribute `{attr}`: header `{name}` is given more than once"
                )));
            };
            let value = percent_decode(value.as_bytes())
                .map_err(|why| invalid(format!("attribute `{attr}` (header `{name}`): {why}")))?;
            let slot = match attr {
                "specversion" => &mut out.specversion,
                "id" => &mut out.id,
                "source" => &mut out.source,
                "type" => &mut out.ty,
                "subject" => &mut out.subject,
                "time" => &mut out.time,
                "dataschema" => &mut out.dataschema,
                "datacontenttype" => {
                    return Err(invalid(
                        "attribute `datacontenttype` travels in the Content-Type header in \
                         binary mode, not in `ce-datacontenttype`",
                    ));
                }
                "data" | "data_base64" => {
                    return Err(invalid(format!(
                        "attribute `{attr}` cannot be a header; send the data as the body"
                    )));
                }
                extension => {
                    check_extension_name(extension)?;
                    out.extensions.insert(extension.to_owned(), value);
                    continue;
                }
            };
            *slot = Some(value);
        }
        Ok(out)
    }
}

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

/// `400 invalid_attribute` for a missing required attribute.
fn missing(name: &str) -> ApiError {
    invalid(format!("missing required attribute `{name}`"))
}

/// A JSON value as shown in an error message: scalars as JSON (long strings shortened),
/// containers by kind only.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => quote(s),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
        scalar => scalar.to_string(),
    }
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

/// The media type of a `Content-Type` value, without parameters or surrounding spaces.
fn media_type(content_type: &str) -> &str {
    content_type
        .split(';')
        .next()
        .unwrap_or(content_type)
        .trim()
}

/// `application/json`, `text/json` and any `*/*+json`, ignoring case.
fn is_json_media_type(media: &str) -> bool {
    let lower = media.to_ascii_lowercase();
    lower == "application/json" || lower == "text/json" || lower.ends_with("+json")
}

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

/// Decodes `%XX` escapes (HTTP binding, section 3.1.3.2) and checks the result is UTF-8.
fn percent_decode(raw: &[u8]) -> Result<String, &'static str> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&byte) = raw.get(i) {
        if byte == b'%' {
            let hex = |j: usize| raw.get(j).and_then(|c| (*c as char).to_digit(16));
            let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                return Err("invalid percent-encoding: `%` must be followed by two hex digits");
            };
            // Both digits are below 16, so this fits a byte.
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(byte);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the percent-decoded value is not valid UTF-8")
}

/// The standard base64 alphabet (RFC 4648, section 4).
const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes with the standard alphabet and `=` padding.
fn base64_encode(bytes: &[u8]) -> String {
    let symbol = |index: u32| char::from(BASE64_ALPHABET[(index & 63) as usize]);
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let group = (b(0) << 16) | (b(1) << 8) | b(2);
        out.push(symbol(group >> 18));
        out.push(symbol(group >> 12));
        out.push(if chunk.len() > 1 {
            symbol(group >> 6)
        } else {
            '='
        });
        out.push(if chunk.len() > 2 { symbol(group) } else { '=' });
    }
    out
}

/// Decodes the standard alphabet. Padding is optional but, when present, must make the
/// length a multiple of four; whitespace and the URL-safe alphabet are rejected.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let unpadded = bytes
        .strip_suffix(b"==")
        .or_else(|| bytes.strip_suffix(b"="))
        .unwrap_or(bytes);
    if unpadded.len() != bytes.len() && !bytes.len().is_multiple_of(4) {
        return None;
    }
    if unpadded.len() % 4 == 1 {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        Some(u32::from(v))
    };
    let mut out = Vec::with_capacity(unpadded.len() / 4 * 3 + 2);
    for chunk in unpadded.chunks(4) {
        let mut group = 0u32;
        for &c in chunk {
            group = (group << 6) | value(c)?;
        }
        group <<= 6 * (4 - chunk.len() as u32);
        let [_, b0, b1, b2] = group.to_be_bytes();
        out.push(b0);
        if chunk.len() > 2 {
            out.push(b1);
        }
        if chunk.len() > 3 {
            out.push(b2);
        }
    }
    Some(out)
}

/// The members of one JSON-format event object, read in one pass: attributes as JSON
/// values, and `data` as the exact text the producer sent. A name given twice keeps its
/// last value, as `serde_json` does for maps.
#[derive(Default)]
struct Members<'a> {
    attributes: Vec<(Cow<'a, str>, Value)>,
    data: Option<&'a RawValue>,
}

impl Members<'_> {
    /// Removes every member called `name` and returns the last one's value; JSON `null`
    /// counts as absent, as the JSON format specifies.
    fn take(&mut self, name: &str) -> Option<Value> {
        let mut found = None;
        self.attributes.retain_mut(|(key, value)| {
            if key != name {
                return true;
            }
            found = Some(std::mem::take(value));
            false
        });
        found.filter(|v| !v.is_null())
    }

    /// A required string attribute (emptiness is checked by [`validate`]).
    fn required_string(&mut self, name: &str) -> Result<String, ApiError> {
        self.optional_string(name)?.ok_or_else(|| missing(name))
    }

    /// An optional string attribute.
    fn optional_string(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(invalid(format!(
                "attribute `{name}` must be a string, got {}",
                describe(&other)
            ))),
        }
    }
}

/// A JSON value where an event object is expected: its members, or, for anything else,
/// what it is as shown in an error message.
enum Element<'a> {
    Object(Members<'a>),
    Other(String),
}

impl<'de> Deserialize<'de> for Element<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ElementVisitor)
    }
}

struct ElementVisitor;

impl<'de> Visitor<'de> for ElementVisitor {
    type Value = Element<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Members::default();
        while let Some(MemberName(name)) = map.next_key()? {
            if name == "data" {
                members.data = Some(map.next_value()?);
            } else {
                members.attributes.push((name, map.next_value()?));
            }
        }
        Ok(Element::Object(members))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Element::Other("an array".to_owned()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Element::Other(quote(v)))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Element::Other(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Element::Other(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Element::Other(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Element::Other(Value::from(v).to_string()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Element::Other("null".to_owned()))
    }
}

/// A member name, borrowed from the body unless it has escapes.
struct MemberName<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for MemberName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = MemberName<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MemberName(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderName, HeaderValue, StatusCode};
    use serde_json::json;

    use super::*;

    const LIMITS: ParseLimits = ParseLimits {
        max_event_bytes: 1024,
        max_batch_events: 3,
    };

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_str(value).expect("header value"),
            );
        }
        map
    }

    fn binary(extra: &[(&str, &str)]) -> HeaderMap {
        let mut pairs = vec![
            ("ce-specversion", "1.0"),
            ("ce-id", "evt-1"),
            ("ce-source", "/orders"),
            ("ce-type", "order.created"),
        ];
        pairs.extend_from_slice(extra);
        headers(&pairs)
    }

    fn without(mut map: HeaderMap, name: &str) -> HeaderMap {
        map.remove(name);
        map
    }

    fn structured_headers() -> HeaderMap {
        headers(&[("content-type", STRUCTURED_CONTENT_TYPE)])
    }

    fn batch_headers() -> HeaderMap {
        headers(&[("content-type", BATCH_CONTENT_TYPE)])
    }

    fn minimal() -> Value {
        json!({
            "specversion": "1.0",
            "id": "evt-1",
            "source": "/orders",
            "type": "order.created"
        })
    }

    fn with(mut value: Value, key: &str, member: Value) -> Value {
        if let Value::Object(obj) = &mut value {
            obj.insert(key.to_owned(), member);
        }
        value
    }

    fn with_removed(mut value: Value, key: &str) -> Value {
        if let Value::Object(obj) = &mut value {
            obj.remove(key);
        }
        value
    }

    fn structured(body: &[u8]) -> Result<Event, ApiError> {
        let mut events = parse_events(&structured_headers(), body, &LIMITS)?;
        assert_eq!(events.len(), 1);
        Ok(events.remove(0))
    }

    fn structured_value(value: &Value) -> Result<Event, ApiError> {
        structured(value.to_string().as_bytes())
    }

    fn err(result: Result<impl std::fmt::Debug, ApiError>) -> ApiError {
        result.expect_err("expected an error")
    }

    fn assert_invalid(result: Result<impl std::fmt::Debug, ApiError>, needle: &str) {
        let e = err(result);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{e}");
        assert_eq!(e.code(), code::INVALID_ATTRIBUTE, "{e}");
        assert!(
            e.message().contains(needle),
            "{:?} lacks {needle:?}",
            e.message()
        );
    }

    // ---- binary mode -----------------------------------------------------------------

    #[test]
    fn binary_mode_reads_headers_and_body() {
        let h = binary(&[
            ("content-type", "application/json; charset=utf-8"),
            ("ce-subject", "order-42"),
            ("ce-time", "2024-05-01T12:00:00.123+02:00"),
            ("ce-dataschema", "https://example.com/schema"),
        ]);
        let events = parse_events(&h, br#"{"a":1}"#, &LIMITS).expect("parses");
        assert_eq!(
            events,
            vec![Event {
                id: "evt-1".into(),
                source: "/orders".into(),
                ty: "order.created".into(),
                subject: Some("order-42".into()),
                time: Some("2024-05-01T12:00:00.123+02:00".into()),
                datacontenttype: Some("application/json; charset=utf-8".into()),
                dataschema: Some("https://example.com/schema".into()),
                data: br#"{"a":1}"#.to_vec(),
                extensions: BTreeMap::new(),
            }]
        );
    }

    #[test]
    fn binary_mode_without_content_type_or_body() {
        let events = parse_events(&binary(&[]), b"", &LIMITS).expect("parses");
        assert_eq!(events[0].datacontenttype, None);
        assert!(events[0].data.is_empty());
        assert_eq!(events[0].time, None);
    }

    #[test]
    fn binary_mode_extensions_are_lower_cased_and_percent_decoded() {
        let h = binary(&[
            ("CE-CorrelationId", "abc%20def"),
            ("ce-partitionkey", "caf%C3%A9"),
            ("ce-subject", "100%25%20sure"),
        ])
        .tap_insert("ce-source", "/a%2Fb");
        let event = parse_events(&h, b"x", &LIMITS).expect("parses").remove(0);
        assert_eq!(event.extension("correlationid"), Some("abc def"));
        assert_eq!(event.extension("partitionkey"), Some("café"));
        assert_eq!(event.subject.as_deref(), Some("100% sure"));
        assert_eq!(event.source, "/a/b");
        assert_eq!(event.extensions.len(), 2);
    }

    #[test]
    fn binary_mode_rejects_bad_percent_encoding() {
        assert_invalid(
            parse_events(&binary(&[("ce-subject", "50%off")]), b"", &LIMITS),
            "attribute `subject` (header `ce-subject`): invalid percent-encoding",
        );
        assert_invalid(
            parse_events(&binary(&[("ce-subject", "abc%")]), b"", &LIMITS),
            "invalid percent-encoding",
        );
        assert_invalid(
            parse_events(&binary(&[("ce-traceid", "%FF%FE")]), b"", &LIMITS),
            "attribute `traceid` (header `ce-traceid`): the percent-decoded value is not valid UTF-8",
        );
    }

    #[test]
    fn binary_mode_accepts_raw_utf8_header_values() {
        let mut h = binary(&[]);
        h.insert(
            "ce-subject",
            HeaderValue::from_bytes("café".as_bytes()).expect("value"),
        );
        let event = parse_events(&h, b"", &LIMITS).expect("parses").remove(0);
        assert_eq!(event.subject.as_deref(), Some("café"));

        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_bytes(b"text/\xff").expect("value"),
        );
        let e = err(parse_events(&h, b"", &LIMITS));
        assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn binary_mode_rejects_invalid_extension_names() {
        assert_invalid(
            parse_events(&binary(&[("ce-trace_id", "1")]), b"", &LIMITS),
            "extension attribute name \"trace_id\" is invalid",
        );
        assert_invalid(
            parse_events(&binary(&[("ce-", "1")]), b"", &LIMITS),
            "extension attribute name \"\" is invalid",
        );
        assert_invalid(
            parse_events(&binary(&[("ce-data", "1")]), b"", &LIMITS),
            "attribute `data` cannot be a header",
        );
        assert_invalid(
            parse_events(
                &binary(&[("ce-datacontenttype", "text/plain")]),
                b"",
                &LIMITS,
            ),
            "attribute `datacontenttype` travels in the Content-Type header",
        );
    }

    #[test]
    fn binary_mode_rejects_repeated_headers() {
        assert_invalid(
            parse_events(
                &binary(&[("ce-id", "second"), ("content-type", "text/plain")]),
                b"",
                &LIMITS,
            ),
            "attribute `id`: header `ce-id` is given more than once",
        );
    }

    #[test]
    fn binary_mode_requires_core_attributes() {
        for name in ["id", "source", "type"] {
            let h = without(binary(&[]), &format!("ce-{name}"));
            assert_invalid(
                parse_events(&h, b"", &LIMITS),
                &format!("missing required attribute `{name}` (header `ce-{name}`)"),
            );
        }
        assert_invalid(
            parse_events(&binary(&[]).tap_insert("ce-id", ""), b"", &LIMITS),
            "attribute `id` must not be empty",
        );
    }

    #[test]
    fn binary_mode_checks_specversion_type_and_time() {
        let e = err(parse_events(
            &binary(&[]).tap_insert("ce-specversion", "0.3"),
            b"",
            &LIMITS,
        ));
        assert_eq!(e.code(), code::INVALID_ATTRIBUTE);
        assert_eq!(
            e.message(),
            r#"attribute `specversion` must be "1.0", got "0.3""#
        );
        let e = err(parse_events(
            &binary(&[]).tap_insert("ce-type", "a..b"),
            b"",
            &LIMITS,
        ));
        assert_eq!(
            e.message(),
            "attribute `type`: event type `a..b` has an empty segment"
        );
        assert_invalid(
            parse_events(&binary(&[("ce-time", "yesterday")]), b"", &LIMITS),
            "attribute `time` must be an RFC 3339 timestamp",
        );
        assert_invalid(
            parse_events(&binary(&[("ce-subject", "")]), b"", &LIMITS),
            "attribute `subject` must not be empty",
        );
    }

    #[test]
    fn binary_mode_enforces_the_event_size() {
        let e = err(parse_events(&binary(&[]), &[b'x'; 1025], &LIMITS));
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.code(), code::PAYLOAD_TOO_LARGE);
        assert!(e.message().contains("at most 1024"), "{}", e.message());
        // The body fits but body plus attributes do not.
        let e = err(parse_events(&binary(&[]), &[b'x'; 1020], &LIMITS));
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(parse_events(&binary(&[]), &[b'x'; 900], &LIMITS).is_ok());
    }

    trait TapInsert {
        fn tap_insert(self, name: &'static str, value: &str) -> Self;
    }

    impl TapInsert for HeaderMap {
        fn tap_insert(mut self, name: &'static str, value: &str) -> Self {
            self.insert(name, HeaderValue::from_str(value).expect("value"));
            self
        }
    }

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

    // ---- structured mode -------------------------------------------------------------

    #[test]
    fn structured_mode_reads_every_attribute() {
        let body = br#"{
            "specversion": "1.0", "id": "evt-1", "source": "/orders",
            "type": "order.created", "subject": "order-42",
            "time": "2024-02-29T23:59:60Z", "datacontenttype": "application/json",
            "dataschema": "https://example.com/schema",
            "data": {"z": 1, "a": [true, null], "big": 123456789012345678901234567890}
        }"#;
        let event = structured(body).expect("parses");
        assert_eq!(event.id, "evt-1");
        assert_eq!(event.source, "/orders");
        assert_eq!(event.ty, "order.created");
        assert_eq!(event.subject.as_deref(), Some("order-42"));
        assert_eq!(event.time.as_deref(), Some("2024-02-29T23:59:60Z"));
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(
            event.dataschema.as_deref(),
            Some("https://example.com/schema")
        );
        // Stored exactly as sent: member order and the big integer survive.
        assert_eq!(
            std::str::from_utf8(&event.data).expect("utf-8"),
            r#"{"z": 1, "a": [true, null], "big": 123456789012345678901234567890}"#
        );
        assert!(event.extensions.is_empty());
    }

    #[test]
    fn structured_data_defaults_to_json_content_type() {
        let event = structured_value(&with(minimal(), "data", json!([1, 2]))).expect("parses");
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(event.data, b"[1,2]");
        let event = structured_value(&with(minimal(), "data", json!("hi"))).expect("parses");
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(event.data, br#""hi""#);
    }

    #[test]
    fn structured_string_data_with_text_type_is_raw_utf8() {
        let body = with(
            with(
                minimal(),
                "datacontenttype",
                json!("text/plain; charset=utf-8"),
            ),
            "data",
            json!("héllo \"world\"\n"),
        );
        let event = structured_value(&body).expect("parses");
        assert_eq!(event.data, "héllo \"world\"\n".as_bytes());
        // A JSON type keeps the string as JSON.
        let body = with(
            with(
                minimal(),
                "datacontenttype",
                json!("application/vnd.foo+json"),
            ),
            "data",
            json!("hi"),
        );
        assert_eq!(structured_value(&body).expect("parses").data, br#""hi""#);
    }

    #[test]
    fn structured_data_base64_is_decoded() {
        let body = with(
            with(
                minimal(),
                "datacontenttype",
                json!("application/octet-stream"),
            ),
            "data_base64",
            json!("AAEC/w=="),
        );
        let event = structured_value(&body).expect("parses");
        assert_eq!(event.data, [0, 1, 2, 255]);
        assert_eq!(
            event.datacontenttype.as_deref(),
            Some("application/octet-stream")
        );
        let event =
            structured_value(&with(minimal(), "data_base64", json!("aGk"))).expect("parses");
        assert_eq!(event.data, b"hi");
        assert_eq!(event.datacontenttype, None);
    }

    #[test]
    fn structured_data_errors() {
        let both = with(
            with(minimal(), "data", json!(1)),
            "data_base64",
            json!("AA=="),
        );
        assert_invalid(
            structured_value(&both),
            "attributes `data` and `data_base64` are mutually exclusive",
        );
        assert_invalid(
            structured_value(&with(minimal(), "data_base64", json!("not base64!"))),
            "attribute `data_base64` is not valid base64",
        );
        assert_invalid(
            structured_value(&with(minimal(), "data_base64", json!(12))),
            "attribute `data_base64` must be a base64 string, got 12",
        );
    }

    #[test]
    fn structured_null_members_are_absent() {
        let body = with(
            with(with(minimal(), "subject", Value::Null), "data", Value::Null),
            "traceid",
            Value::Null,
        );
        let event = structured_value(&body).expect("parses");
        assert_eq!(event.subject, None);
        assert!(event.data.is_empty());
        assert_eq!(event.datacontenttype, None);
        assert!(event.extensions.is_empty());
        assert_invalid(
            structured_value(&with(minimal(), "id", Value::Null)),
            "missing required attribute `id`",
        );
    }

    #[test]
    fn structured_extensions() {
        let body = with(
            with(
                with(minimal(), "correlationid", json!("c-1")),
                "attempts",
                json!(3),
            ),
            "urgent",
            json!(true),
        );
        let event = structured_value(&with(body, "ratio", json!(0.5))).expect("parses");
        assert_eq!(event.extension("correlationid"), Some("c-1"));
        assert_eq!(event.extension("attempts"), Some("3"));
        assert_eq!(event.extension("urgent"), Some("true"));
        assert_eq!(event.extension("ratio"), Some("0.5"));

        assert_invalid(
            structured_value(&with(minimal(), "nested", json!({"a": 1}))),
            "extension attribute `nested` must be a string, number or boolean, got an object",
        );
        assert_invalid(
            structured_value(&with(minimal(), "list", json!([1]))),
            "got an array",
        );
        assert_invalid(
            structured_value(&with(minimal(), "TraceId", json!("x"))),
            "extension attribute name \"TraceId\" is invalid",
        );
        assert_invalid(
            structured_value(&with(minimal(), "trace-id", json!("x"))),
            "extension attribute name \"trace-id\" is invalid",
        );
    }

    #[test]
    fn structured_required_attributes() {
        for name in ["specversion", "id", "source", "type"] {
            assert_invalid(
                structured_value(&with_removed(minimal(), name)),
                &format!("missing required attribute `{name}`"),
            );
        }
        for name in ["id", "source", "subject", "dataschema"] {
            assert_invalid(
                structured_value(&with(minimal(), name, json!(""))),
                &format!("attribute `{name}` must not be empty"),
            );
        }
        for name in [
            "id",
            "source",
            "type",
            "subject",
            "time",
            "datacontenttype",
            "dataschema",
        ] {
            assert_invalid(
                structured_value(&with(minimal(), name, json!(5))),
                &format!("attribute `{name}` must be a string, got 5"),
            );
        }
    }

    #[test]
    fn structured_specversion_type_and_time() {
        let e = err(structured_value(&with(
            minimal(),
            "specversion",
            json!("0.3"),
        )));
        assert_eq!(
            e.message(),
            r#"attribute `specversion` must be "1.0", got "0.3""#
        );
        let e = err(structured_value(&with(
            minimal(),
            "specversion",
            json!(1.0),
        )));
        assert_eq!(
            e.message(),
            r#"attribute `specversion` must be "1.0", got 1.0"#
        );
        let e = err(structured_value(&with(minimal(), "type", json!("a..b"))));
        assert_eq!(e.code(), code::INVALID_ATTRIBUTE);
        assert_eq!(
            e.message(),
            "attribute `type`: event type `a..b` has an empty segment"
        );
        assert_invalid(
            structured_value(&with(minimal(), "type", json!("order.*"))),
            "attribute `type`: event type `order.*` contains `*`",
        );
        assert_invalid(
            structured_value(&with(minimal(), "time", json!("2023-02-29T00:00:00Z"))),
            r#"attribute `time` must be an RFC 3339 timestamp such as 2024-05-01T12:00:00Z, got "2023-02-29T00:00:00Z""#,
        );
    }

    #[test]
    fn structured_shape_errors() {
        let e = err(structured(b"[1]"));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.code(), code::INVALID_EVENT);
        let e = err(structured(b"  \n"));
        assert_eq!(e.code(), code::MALFORMED_JSON);
        assert!(e.message().contains("empty"), "{}", e.message());
    }

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

    #[test]
    fn structured_event_size_is_enforced() {
        let body = with(minimal(), "data", json!("x".repeat(1000)));
        let e = err(structured_value(&body));
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.code(), code::PAYLOAD_TOO_LARGE);
        let body = with(minimal(), "data", json!("x".repeat(900)));
        assert!(structured_value(&body).is_ok());
    }

    // ---- batched mode ----------------------------------------------------------------

    fn numbered(n: usize) -> Value {
        with(
            with(minimal(), "id", json!(format!("evt-{n}"))),
            "data",
            json!({ "n": n, "s": "]}\"{[" }),
        )
    }

    #[test]
    fn batch_mode_parses_every_event_in_order() {
        let body = format!(
            "[ {} ,\n{}, {}]",
            numbered(0),
            numbered(1),
            with(minimal(), "id", json!("evt-2"))
        );
        let h = headers(&[(
            "content-type",
            "application/cloudevents-batch+json; charset=utf-8",
        )]);
        let events = parse_events(&h, body.as_bytes(), &LIMITS).expect("parses");
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].id, "evt-0");
        assert_eq!(events[0].data, br#"{"n":0,"s":"]}\"{["}"#);
        assert_eq!(events[1].data, br#"{"n":1,"s":"]}\"{["}"#);
        assert_eq!(events[2].id, "evt-2");
        assert!(events[2].data.is_empty());
    }

    #[test]
    fn batch_is_all_or_nothing_and_names_the_index() {
        let bad = with(numbered(1), "specversion", json!("0.3"));
        let body = json!([numbered(0), bad, numbered(2)]).to_string();
        let e = err(parse_events(&batch_headers(), body.as_bytes(), &LIMITS));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.code(), code::INVALID_ATTRIBUTE);
        assert_eq!(
            e.message(),
            r#"event 1: attribute `specversion` must be "1.0", got "0.3""#
        );

        let body = json!([numbered(0), numbered(1), 7]).to_string();
        let e = err(parse_events(&batch_headers(), body.as_bytes(), &LIMITS));
        assert_eq!(e.code(), code::INVALID_EVENT);
        assert_eq!(
            e.message(),
            "event 2: a batch element must be a JSON object, got 7"
        );
        for (element, described) in [
            ("\"x\"", "\"x\""),
            ("[1, {}]", "an array"),
            ("null", "null"),
            ("1.5", "1.5"),
            ("true", "true"),
        ] {
            let body = format!("[{}, {element}]", numbered(0));
            let e = err(parse_events(&batch_headers(), body.as_bytes(), &LIMITS));
            assert_eq!(
                e.message(),
                format!("event 1: a batch element must be a JSON object, got {described}")
            );
        }

        let big = with(minimal(), "data", json!("x".repeat(2000)));
        let body = json!([numbered(0), big]).to_string();
        let e = err(parse_events(&batch_headers(), body.as_bytes(), &LIMITS));
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            e.message().starts_with("event 1: the event is"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn batch_size_limits() {
        let e = err(parse_events(&batch_headers(), b" [ ] ", &LIMITS));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.code(), code::INVALID_EVENT);
        assert!(e.message().contains("empty"), "{}", e.message());

        let body = json!([numbered(0), numbered(1), numbered(2), numbered(3)]).to_string();
        let e = err(parse_events(&batch_headers(), body.as_bytes(), &LIMITS));
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.code(), code::PAYLOAD_TOO_LARGE);
        assert_eq!(e.message(), "the batch has 4 events; at most 3 are allowed");

        let e = err(parse_events(
            &batch_headers(),
            minimal().to_string().as_bytes(),
            &LIMITS,
        ));
        assert_eq!(e.code(), code::INVALID_EVENT);
        assert!(e.message().contains("JSON array"), "{}", e.message());
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

    // ---- to_json ---------------------------------------------------------------------

    #[test]
    fn round_trip_structured_event_json() {
        let input = json!({
            "specversion": "1.0",
            "id": "evt-1",
            "source": "/orders",
            "type": "order.created",
            "subject": "order-42",
            "time": "2024-05-01T12:00:00Z",
            "datacontenttype": "application/json",
            "dataschema": "https://example.com/schema",
            "correlationid": "c-1",
            "data": {"items": [1, 2, 3], "note": "ok"}
        });
        let event = structured_value(&input).expect("parses");
        let output = to_json(&event);
        assert_eq!(output, input);
        let again = structured_value(&output).expect("parses again");
        assert_eq!(again.extensions, event.extensions);
        assert_eq!(to_json(&again), input);
    }

    #[test]
    fn to_json_chooses_the_data_encoding() {
        let mut event = structured_value(&minimal()).expect("parses");
        assert_eq!(to_json(&event), minimal(), "no data, no data member");

        event.datacontenttype = Some("text/plain; charset=utf-8".into());
        event.data = "héllo".as_bytes().to_vec();
        assert_eq!(to_json(&event)["data"], json!("héllo"));

        event.datacontenttype = Some("application/cloudevents+json".into());
        event.data = br#"{"a":1}"#.to_vec();
        assert_eq!(to_json(&event)["data"], json!({"a": 1}));

        event.datacontenttype = Some("text/json".into());
        assert_eq!(to_json(&event)["data"], json!({"a": 1}));

        // JSON type, but the bytes are not JSON: base64 keeps them intact.
        event.datacontenttype = Some("application/json".into());
        event.data = b"{not json".to_vec();
        let out = to_json(&event);
        assert_eq!(out["data_base64"], json!("e25vdCBqc29u"));
        assert!(out.get("data").is_none());

        event.datacontenttype = Some("application/octet-stream".into());
        event.data = vec![0, 1, 2, 255];
        assert_eq!(to_json(&event)["data_base64"], json!("AAEC/w=="));

        event.datacontenttype = None;
        event.data = b"hi".to_vec();
        assert_eq!(to_json(&event)["data_base64"], json!("aGk="));

        event.datacontenttype = Some("text/plain".into());
        event.data = vec![0xff, 0xfe];
        assert_eq!(to_json(&event)["data_base64"], json!("//4="));
    }

    #[test]
    fn to_json_round_trips_binary_and_text_events() {
        let h = binary(&[
            ("content-type", "application/octet-stream"),
            ("ce-partitionkey", "p-1"),
        ]);
        let event = parse_events(&h, &[0, 159, 146, 150], &LIMITS)
            .expect("parses")
            .remove(0);
        let again = structured_value(&to_json(&event)).expect("parses");
        assert_eq!(again, event);

        let h = binary(&[("content-type", "text/plain")]);
        let event = parse_events(&h, "ünïcode".as_bytes(), &LIMITS)
            .expect("parses")
            .remove(0);
        assert_eq!(to_json(&event)["data"], json!("ünïcode"));
        let again = structured_value(&to_json(&event)).expect("parses");
        assert_eq!(again, event);
    }

    #[test]
    fn to_json_keeps_non_json_bytes_of_a_text_json_type_as_base64() {
        // Found by fuzzing (fuzz/fuzz_targets/cloudevents_http.rs): a `text/*` type that is
        // also a JSON type, with data that is not JSON, was rendered as a string `data`,
        // which structured mode reads back as the JSON string, quotes included.
        for content_type in [
            "text/json",
            "text/plainapplication/cloudevents-batch+json; charset=utf-8",
        ] {
            let h = binary(&[("content-type", content_type)]);
            let event = parse_events(&h, b"21.5 degrees", &LIMITS)
                .expect("parses")
                .remove(0);
            let out = to_json(&event);
            assert_eq!(
                out["data_base64"],
                json!("MjEuNSBkZWdyZWVz"),
                "{content_type}"
            );
            assert!(out.get("data").is_none());
            let again = structured_value(&out).expect("parses");
            assert_eq!(again, event);
        }
    }

    #[test]
    fn to_json_keeps_json_null_data_as_base64() {
        // Found by fuzzing (fuzz/fuzz_targets/cloudevents_http.rs): data that is JSON
        // `null` was rendered as `"data": null`, which structured mode reads as no data.
        let event =
            parse_typed_event("signed", &HeaderMap::new(), b"\tnull\n", &LIMITS).expect("parses");
        let out = to_json(&event);
        assert_eq!(out["data_base64"], json!("CW51bGwK"));
        assert!(out.get("data").is_none());
        let again = structured_value(&out).expect("parses");
        assert_eq!(again, event);
    }

    #[test]
    fn to_json_never_lets_an_extension_shadow_an_attribute() {
        let mut event = structured_value(&minimal()).expect("parses");
        event.extensions.insert("id".into(), "shadow".into());
        event.extensions.insert("data".into(), "shadow".into());
        let out = to_json(&event);
        assert_eq!(out["id"], json!("evt-1"));
        assert!(out.get("data").is_none());
    }

    // ---- helpers ---------------------------------------------------------------------

    #[test]
    fn rfc3339_validator() {
        for ok in [
            "2024-05-01T12:00:00Z",
            "2024-05-01t12:00:00z",
            "2024-05-01T12:00:00.1Z",
            "2024-05-01T12:00:00.123456789+05:30",
            "2024-05-01T23:59:60-00:00",
            "2024-02-29T00:00:00Z",
            "2000-02-29T00:00:00Z",
            "0000-01-01T00:00:00Z",
            &crate::clock::now_rfc3339(),
        ] {
            assert!(is_rfc3339(ok), "{ok} should be valid");
        }
        for bad in [
            "",
            "2024-05-01",
            "2024-05-01 12:00:00Z",
            "2024-05-01T12:00:00",
            "2024-05-01T12:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00+0530",
            "2024-05-01T12:00:00+05:30 ",
            "2024-05-01T12:00:00ZZ",
            "2024-13-01T12:00:00Z",
            "2024-00-01T12:00:00Z",
            "2024-04-31T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "1900-02-29T12:00:00Z",
            "2024-05-00T12:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:60:00Z",
            "2024-05-01T12:00:61Z",
            "2024-05-01T12:00:00+24:00",
            "2024-05-01T12:00:00+05:60",
            "+024-05-01T12:00:00Z",
            "2024-5-01T12:00:00Z",
            "２０２４-05-01T12:00:00Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..40u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(97)).collect();
            let encoded = base64_encode(&bytes);
            assert_eq!(base64_decode(&encoded), Some(bytes.clone()), "{encoded}");
            let unpadded = encoded.trim_end_matches('=');
            assert_eq!(base64_decode(unpadded), Some(bytes), "{unpadded}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        for bad in [
            "A", "AAAAA", "AA=", "A===", "AA==AA==", "AA AA", "-_-_", "AA=A",
        ] {
            assert_eq!(base64_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"plain"), Ok("plain".to_owned()));
        assert_eq!(percent_decode(b"%41%62%2f%2F"), Ok("Ab//".to_owned()));
        assert_eq!(percent_decode(b"%E2%82%AC"), Ok("€".to_owned()));
        assert!(percent_decode(b"%4").is_err());
        assert!(percent_decode(b"%zz").is_err());
        assert!(percent_decode(b"%C3").is_err());
    }

    #[test]
    fn repeated_and_escaped_member_names() {
        // Escaped key equal to "data", as serde_json reads it: the last one wins.
        let body = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"d\u0061ta":{"k" : 2}}"#;
        assert_eq!(structured(body).expect("parses").data, br#"{"k" : 2}"#);

        // A repeated attribute or extension keeps its last value, escaped or not.
        let body = br#"{"specversion":"1.0","id":"1","i\u0064":"2","source":"/s","type":"t","ext":"a","ext":"b","id":"3"}"#;
        let event = structured(body).expect("parses");
        assert_eq!(event.id, "3");
        assert_eq!(event.extensions.get("ext").map(String::as_str), Some("b"));

        // A repeated `id` whose last value is null is absent.
        let body = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","id":null}"#;
        assert_invalid(structured(body), "missing required attribute `id`");

        // Whitespace around `data` is not part of it; `null` data is no data.
        let body = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data" :  [1, 2]  }"#;
        assert_eq!(structured(body).expect("parses").data, b"[1, 2]");
        let body = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":null}"#;
        assert_eq!(structured(body).expect("parses").data, b"");
    }

    #[test]
    fn encoded_size_counts_data_and_attributes() {
        let mut event = structured_value(&minimal()).expect("parses");
        assert_eq!(encoded_size(&event), 5 + 7 + 13);
        event.data = vec![0; 10];
        event.subject = Some("abc".into());
        event.extensions.insert("k".into(), "vv".into());
        assert_eq!(encoded_size(&event), 5 + 7 + 13 + 10 + 3 + 3);
    }
}
