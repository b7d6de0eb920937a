//! Batched content mode: a JSON array of structured events, all accepted or none.
//!
//! Owns the array-level checks (shape, emptiness, the event count limit) and the
//! numbering of errors; each element is read by the structured-mode deserializer.
//!
//! Invariants: the whole array is parsed before any event is built, so malformed JSON
//! anywhere is `400 malformed_json` rather than a partial batch; the count limit is
//! checked before any element is, and elements past it are only counted, so a body of
//! millions of tiny elements costs no more memory than the limit's worth; the first bad
//! element fails the request and its error message starts with `event N: ` (0-based).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, SeqAccess, Visitor};

use super::structured::{Element, event_from_members};
use super::{ParseLimits, check_size, malformed_json, parse_json};
use crate::event::Event;
use crate::ingest::ApiError;
use crate::ingest::error::code;

/// Batched mode: the body is a JSON array of structured events.
pub(super) fn parse_batch(body: &[u8], limits: &ParseLimits) -> Result<Vec<Event>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'[') {
        // Malformed JSON is reported as such before the shape is.
        parse_json::<IgnoredAny>(body)?;
        return Err(ApiError::bad_request(
            code::INVALID_EVENT,
            "a batch must be a JSON array of events",
        ));
    }
    let mut reading = serde_json::Deserializer::from_slice(body);
    let Elements { items, count } = (AtMost(limits.max_batch_events))
        .deserialize(&mut reading)
        .and_then(|elements| reading.end().map(|()| elements))
        .map_err(malformed_json)?;
    if count > limits.max_batch_events {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            code::PAYLOAD_TOO_LARGE,
            format!(
                "the batch has {count} events; at most {} are allowed",
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

/// The elements of a batch array, at most the limit's worth kept, and how many it has.
struct Elements<'a> {
    items: Vec<Element<'a>>,
    count: usize,
}

/// Reads a batch array keeping at most this many elements.
struct AtMost(usize);

impl<'de> DeserializeSeed<'de> for AtMost {
    type Value = Elements<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for AtMost {
    type Value = Elements<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of events")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while items.len() < self.0 {
            match seq.next_element()? {
                Some(item) => items.push(item),
                None => {
                    let count = items.len();
                    return Ok(Elements { items, count });
                }
            }
        }
        // Past the limit only the count matters, for the error.
        let mut count = items.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok(Elements { items, count })
    }
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

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::{Value, json};

    use super::super::test_support::*;
    use super::super::{code, parse_events};

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
        // "The batch MAY be empty" (HTTP protocol binding, 3.3.2).
        let events = parse_events(&batch_headers(), b" [ ] ", &LIMITS).unwrap();
        assert!(events.is_empty());

        let body = json!([numbered(0), numbered(1), numbered(2), numbered(3)]).to_string();
        let e = err(parse_events(&batch_headers(), body.as_bytes(), &LIMITS));
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.code(), code::PAYLOAD_TOO_LARGE);
        assert_eq!(e.message(), "the batch has 4 events; at most 3 are allowed");
        // Elements past the limit are counted, not kept; malformed JSON after them is
        // still malformed.
        let tiny = format!("[{}0]", "0,".repeat(99_999));
        let e = err(parse_events(&batch_headers(), tiny.as_bytes(), &LIMITS));
        assert_eq!(
            e.message(),
            "the batch has 100000 events; at most 3 are allowed"
        );
        let broken = format!("[{}0", "0,".repeat(10));
        let e = err(parse_events(&batch_headers(), broken.as_bytes(), &LIMITS));
        assert_eq!(e.code(), code::MALFORMED_JSON, "{}", e.message());
        let trailing = err(parse_events(&batch_headers(), b"[] x", &LIMITS));
        assert_eq!(
            trailing.code(),
            code::MALFORMED_JSON,
            "{}",
            trailing.message()
        );

        let e = err(parse_events(
            &batch_headers(),
            minimal().to_string().as_bytes(),
            &LIMITS,
        ));
        assert_eq!(e.code(), code::INVALID_EVENT);
        assert!(e.message().contains("JSON array"), "{}", e.message());
    }
}
