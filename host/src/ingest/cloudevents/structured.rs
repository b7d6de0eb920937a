//! Structured content mode: one event in the CloudEvents JSON format, read in one pass.
//!
//! Owns the members deserializer ([`Element`], [`Members`]) that batched mode reuses for
//! each array element, [`event_from_members`], and the decoding of `data_base64`.
//!
//! Invariants: JSON `data` is kept exactly as the producer wrote it (member order, number
//! spelling, big integers), except that a JSON string with a non-JSON `datacontenttype`
//! becomes its raw UTF-8 text; a member given twice keeps its last value, as `serde_json`
//! does for maps, and JSON `null` counts as absent; an object with both `data` and
//! `data_base64` is refused.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, NO_PAD, PAD};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

use super::{
    JSON_CONTENT_TYPE, ParseLimits, SPEC_VERSION, check_extension_name, check_size,
    check_specversion, invalid, is_json_media_type, media_type, parse_json, quote, validate,
};
use crate::event::Event;
use crate::ingest::ApiError;
use crate::ingest::error::code;

/// Structured mode: the body is one event in the JSON format.
pub(super) fn parse_structured(body: &[u8], limits: &ParseLimits) -> Result<Event, ApiError> {
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

/// Builds an event from the members of one JSON-format object. JSON `data` is stored
/// exactly as the producer wrote it (member order, number spelling, big integers).
pub(super) fn event_from_members(mut members: Members<'_>) -> Result<Event, ApiError> {
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

/// Decodes `data_base64`: the standard alphabet (RFC 4648, section 4), with padding
/// optional but, when present, making the length a multiple of four. Whitespace and the
/// URL-safe alphabet are refused.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    // An engine's padding mode is all or nothing: `RequireCanonical` refuses unpadded text
    // and `Indifferent` takes a short pad such as `AA=`. So padded text goes to the engine
    // that wants the full pad, and the rest to the one that wants none. Stray low bits in
    // the last symbol carry no data; refusing them would turn away unambiguous bytes.
    const PADDED: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        PAD.with_decode_allow_trailing_bits(true),
    );
    const UNPADDED: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        NO_PAD.with_decode_allow_trailing_bits(true),
    );
    let engine = if text.ends_with('=') {
        &PADDED
    } else {
        &UNPADDED
    };
    engine.decode(text).ok()
}

/// The members of one JSON-format event object, read in one pass: attributes as JSON
/// values, and `data` as the exact text the producer sent. A name given twice keeps its
/// last value, as `serde_json` does for maps.
#[derive(Default)]
pub(super) struct Members<'a> {
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
pub(super) enum Element<'a> {
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
    use axum::http::StatusCode;
    use serde_json::json;

    use super::super::render::base64_encode;
    use super::super::test_support::*;
    use super::*;

    fn with_removed(mut value: Value, key: &str) -> Value {
        if let Value::Object(obj) = &mut value {
            obj.remove(key);
        }
        value
    }

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
    fn structured_event_size_is_enforced() {
        let body = with(minimal(), "data", json!("x".repeat(1000)));
        let e = err(structured_value(&body));
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.code(), code::PAYLOAD_TOO_LARGE);
        let body = with(minimal(), "data", json!("x".repeat(900)));
        assert!(structured_value(&body).is_ok());
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
}
