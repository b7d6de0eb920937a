//! Fuzzes the CloudEvents HTTP binding, `switchyard_host::ingest::cloudevents`: binary,
//! structured and batched `POST /v1/events` through `parse_events`, and
//! `POST /v1/events/{type}` through `parse_typed_event`.
//!
//! An input reads like an HTTP request, so seeds can be written by hand:
//!
//! ```text
//! POST /v1/events                                (or /v1/events/TYPE: parse_typed_event)
//! content-type: application/cloudevents+json     (header lines up to an empty line)
//!
//! {"specversion": "1.0", ...}                    (the rest is the body)
//! ```
//!
//! The content mode follows from the headers as in the host: `Content-Type`
//! `application/cloudevents+json` is structured, `application/cloudevents-batch+json`
//! batched, otherwise a `ce-specversion` header is binary. Lines end in `\n`, an `\r`
//! before it is dropped; a header line without `:`, or with a name or value HTTP does not
//! allow, is skipped. Repeated headers are kept, as a request can carry them.
//!
//! Besides never panicking, every accepted event must meet the module's documented
//! invariants and survive a round trip through `to_json` and structured mode.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use switchyard_host::event::{Event, is_valid_extension_name, validate_event_type};
use switchyard_host::ingest::cloudevents::{
    ParseLimits, RESERVED_NAMES, STRUCTURED_CONTENT_TYPE, encoded_size, is_rfc3339, parse_events,
    parse_typed_event, to_json,
};

/// Small limits, so that inputs of a few KiB reach the `413` paths too.
const LIMITS: ParseLimits = ParseLimits {
    max_event_bytes: 2048,
    max_batch_events: 8,
};

/// For the round trip: the JSON rendering may be larger than what was parsed.
const NO_LIMITS: ParseLimits = ParseLimits {
    max_event_bytes: usize::MAX,
    max_batch_events: usize::MAX,
};

fuzz_target!(|input: &[u8]| {
    let (request_line, rest) = split_line(input);
    let (headers, body) = parse_head(rest);
    let path = request_line.strip_prefix(b"POST ").unwrap_or(request_line);
    match path.strip_prefix(b"/v1/events/") {
        Some(ty) => {
            let Ok(ty) = std::str::from_utf8(ty) else {
                return;
            };
            if let Ok(event) = parse_typed_event(ty, &headers, body, &LIMITS) {
                assert_eq!(event.ty, ty);
                assert!(event.time.is_some(), "a typed event always has a time");
                check(&event);
            }
        }
        None => {
            if let Ok(events) = parse_events(&headers, body, &LIMITS) {
                assert!(events.len() <= LIMITS.max_batch_events);
                // Only a batch may be empty (HTTP binding 3.3.2).
                let batched = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.to_ascii_lowercase().contains("cloudevents-batch"));
                assert!(batched || events.len() == 1, "{} events", events.len());
                events.iter().for_each(check);
            }
        }
    }
});

/// The first line (without its `\r\n` or `\n`) and the rest.
fn split_line(input: &[u8]) -> (&[u8], &[u8]) {
    match input.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let line = &input[..end];
            (line.strip_suffix(b"\r").unwrap_or(line), &input[end + 1..])
        }
        None => (input, &[]),
    }
}

/// Header lines up to the first empty line, and the body after it.
fn parse_head(mut rest: &[u8]) -> (HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    while !rest.is_empty() {
        let (line, after) = split_line(rest);
        rest = after;
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    (headers, rest)
}

/// The invariants of an accepted event, and its round trip through the JSON format.
fn check(event: &Event) {
    assert!(!event.id.is_empty() && !event.source.is_empty());
    assert!(validate_event_type(&event.ty).is_ok());
    assert!(event.time.as_deref().is_none_or(is_rfc3339));
    assert!(event.subject.as_deref().is_none_or(|s| !s.is_empty()));
    assert!(event.dataschema.as_deref().is_none_or(|s| !s.is_empty()));
    for name in event.extensions.keys() {
        assert!(is_valid_extension_name(name) && !RESERVED_NAMES.contains(&name.as_str()));
    }
    assert!(encoded_size(event) <= LIMITS.max_event_bytes);

    let json = to_json(event);
    let body = serde_json::to_vec(&json).expect("an event renders as JSON");
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(STRUCTURED_CONTENT_TYPE),
    );
    let back = match parse_events(&headers, &body, &NO_LIMITS) {
        Ok(mut events) if events.len() == 1 => events.remove(0),
        other => panic!("to_json of {event:?} does not parse back: {other:?}"),
    };
    assert_eq!(
        (&back.id, &back.source, &back.ty, &back.subject, &back.time),
        (
            &event.id,
            &event.source,
            &event.ty,
            &event.subject,
            &event.time
        )
    );
    assert_eq!(
        (&back.datacontenttype, &back.dataschema, &back.extensions),
        (&event.datacontenttype, &event.dataschema, &event.extensions)
    );
    // JSON data is written out as stored: it comes back whole, less the whitespace
    // around it.
    assert!(
        back.data == event.data || back.data == event.data.trim_ascii(),
        "data changed in the round trip of {event:?}: {back:?}"
    );
}
