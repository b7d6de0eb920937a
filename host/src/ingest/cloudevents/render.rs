//! The CloudEvents JSON event format for answers: [`to_json`] renders an [`Event`] for
//! `GET` answers and dead letters, and [`encoded_size`] is the size an event counts for
//! against the event size limit.
//!
//! Invariants: for every event the parsers return, structured mode reads what [`to_json`]
//! renders back as the same event (data bytes, attributes and extensions); a core
//! attribute always wins over an extension of the same name; [`encoded_size`] depends only
//! on the event, so the size limit is the same whichever mode an event came in by.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{SPEC_VERSION, is_json_media_type, media_type};
use crate::event::Event;

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
/// [`parse_events`](super::parse_events) never produces) are overwritten by the core attribute.
///
/// JSON data is checked and written out as it is stored, never built into a tree: a
/// page of large events costs its bytes, not many times them.
pub fn to_json(event: &Event) -> Rendered {
    let mut obj = BTreeMap::new();
    for (name, value) in &event.extensions {
        obj.insert(name.clone(), Member::Text(value.clone()));
    }
    let mut put = |name: &str, value: &str| {
        obj.insert(name.to_owned(), Member::Text(value.to_owned()));
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
            .and_then(|_| serde_json::from_slice::<&RawValue>(&event.data).ok())
            .filter(|raw| raw.get() != "null")
            .and_then(|raw| RawValue::from_string(raw.get().to_owned()).ok());
        let as_text = || {
            media
                .filter(|m| {
                    // A string `data` with a JSON type would be read back as a JSON value.
                    !is_json_media_type(m)
                        && m.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("text/"))
                })
                .and_then(|_| std::str::from_utf8(&event.data).ok())
        };
        if let Some(raw) = as_json {
            obj.insert("data".to_owned(), Member::Json(raw));
        } else if let Some(text) = as_text() {
            obj.insert("data".to_owned(), Member::Text(text.to_owned()));
        } else {
            obj.insert(
                "data_base64".to_owned(),
                Member::Text(base64_encode(&event.data)),
            );
        }
    }
    Rendered(obj)
}

/// An event in the CloudEvents JSON format, ready to be written into an answer.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Rendered(BTreeMap<String, Member>);

/// One member of a [`Rendered`] event: a string, or JSON data as it is stored.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Member {
    /// An attribute, an extension, text data or `data_base64`.
    Text(String),
    /// JSON data, checked and written out unchanged.
    Json(Box<RawValue>),
}

/// The size an event counts for against
/// [`ParseLimits::max_event_bytes`](super::ParseLimits::max_event_bytes): its data bytes
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

/// The `data_base64` spelling: the standard alphabet with `=` padding (RFC 4648, section 4),
/// as the JSON format asks for.
pub(super) fn base64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;
    use serde_json::json;

    use super::super::test_support::*;
    use super::super::{parse_events, parse_typed_event};
    use super::*;

    /// The rendering as a JSON value.
    fn rendered(event: &Event) -> serde_json::Value {
        serde_json::to_value(to_json(event)).expect("renders")
    }

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
        let output = rendered(&event);
        assert_eq!(output, input);
        let again = structured_value(&output).expect("parses again");
        assert_eq!(again.extensions, event.extensions);
        assert_eq!(rendered(&again), input);
    }

    #[test]
    fn to_json_chooses_the_data_encoding() {
        let mut event = structured_value(&minimal()).expect("parses");
        assert_eq!(rendered(&event), minimal(), "no data, no data member");

        event.datacontenttype = Some("text/plain; charset=utf-8".into());
        event.data = "héllo".as_bytes().to_vec();
        assert_eq!(rendered(&event)["data"], json!("héllo"));

        event.datacontenttype = Some("application/cloudevents+json".into());
        event.data = br#"{"a":1}"#.to_vec();
        assert_eq!(rendered(&event)["data"], json!({"a": 1}));

        event.datacontenttype = Some("text/json".into());
        assert_eq!(rendered(&event)["data"], json!({"a": 1}));

        // JSON type, but the bytes are not JSON: base64 keeps them intact.
        event.datacontenttype = Some("application/json".into());
        event.data = b"{not json".to_vec();
        let out = rendered(&event);
        assert_eq!(out["data_base64"], json!("e25vdCBqc29u"));
        assert!(out.get("data").is_none());

        event.datacontenttype = Some("application/octet-stream".into());
        event.data = vec![0, 1, 2, 255];
        assert_eq!(rendered(&event)["data_base64"], json!("AAEC/w=="));

        event.datacontenttype = None;
        event.data = b"hi".to_vec();
        assert_eq!(rendered(&event)["data_base64"], json!("aGk="));

        event.datacontenttype = Some("text/plain".into());
        event.data = vec![0xff, 0xfe];
        assert_eq!(rendered(&event)["data_base64"], json!("//4="));
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
        let again = structured_value(&rendered(&event)).expect("parses");
        assert_eq!(again, event);

        let h = binary(&[("content-type", "text/plain")]);
        let event = parse_events(&h, "ünïcode".as_bytes(), &LIMITS)
            .expect("parses")
            .remove(0);
        assert_eq!(rendered(&event)["data"], json!("ünïcode"));
        let again = structured_value(&rendered(&event)).expect("parses");
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
            // Ingest refuses such a body now; a plugin's emit can still carry one.
            let h = binary(&[("content-type", "text/plain")]);
            let mut event = parse_events(&h, b"21.5 degrees", &LIMITS)
                .expect("parses")
                .remove(0);
            event.datacontenttype = Some(content_type.to_owned());
            let out = rendered(&event);
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
        let out = rendered(&event);
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
        let out = rendered(&event);
        assert_eq!(out["id"], json!("evt-1"));
        assert!(out.get("data").is_none());
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
