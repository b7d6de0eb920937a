//! Binary content mode: the attributes travel in `ce-*` headers, `datacontenttype` in
//! `Content-Type` and the data is the body, byte for byte.
//!
//! Owns reading the `ce-*` headers ([`CeHeaders`], shared with `POST /v1/events/{type}`)
//! and their percent-decoding (HTTP binding, section 3.1.3.2).
//!
//! Invariants: every header value is percent-decoded and valid UTF-8 before it becomes an
//! attribute; a body declared as JSON (`application/json`, `text/json`, `*/*+json`) is
//! JSON, or the event is refused naming the parse position; a body without a
//! `Content-Type` that is JSON is stored as `application/json`, as the JSON event format
//! reads an absent `datacontenttype` (structured mode does the same); a `ce-*` header given twice, `ce-datacontenttype`, `ce-data` and
//! `ce-data_base64` are refused rather than guessed at; the body is checked against the
//! size limit before any `ce-*` header is read.

use std::collections::BTreeMap;

use axum::http::HeaderMap;

use super::{
    JSON_CONTENT_TYPE, ParseLimits, check_extension_name, check_specversion, checked,
    event_too_large, invalid, is_json_media_type, malformed_json, media_type,
};
use crate::event::Event;
use crate::ingest::ApiError;

/// Binary mode: attributes from `ce-*` headers, `Content-Type` as `datacontenttype`, the
/// body as data.
pub(super) fn parse_binary(
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
    let datacontenttype = match content_type {
        Some(declared) => {
            let blank = body.iter().all(u8::is_ascii_whitespace);
            if is_json_media_type(media_type(declared)) && !blank {
                serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(malformed_json)?;
            }
            Some(declared.to_owned())
        }
        None => serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .is_ok()
            .then(|| JSON_CONTENT_TYPE.to_owned()),
    };
    let event = Event {
        id: required(attrs.id, "id")?,
        source: required(attrs.source, "source")?,
        ty: required(attrs.ty, "type")?,
        subject: attrs.subject,
        time: attrs.time,
        datacontenttype,
        dataschema: attrs.dataschema,
        data: body.to_vec(),
        extensions: attrs.extensions,
    };
    checked(event, limits)
}

/// The CloudEvents attributes carried in `ce-*` headers, percent-decoded.
#[derive(Default)]
pub(super) struct CeHeaders {
    pub(super) specversion: Option<String>,
    pub(super) id: Option<String>,
    pub(super) source: Option<String>,
    pub(super) ty: Option<String>,
    pub(super) subject: Option<String>,
    pub(super) time: Option<String>,
    pub(super) dataschema: Option<String>,
    pub(super) extensions: BTreeMap<String, String>,
}

impl CeHeaders {
    /// Reads every `ce-*` header. Header names are lower case already, so extension names
    /// are too; each value is percent-decoded and must then be UTF-8. A header given more
    /// than once, `ce-datacontenttype` (binary mode carries it in `Content-Type`), `ce-data`
    /// and names that are not valid extension names are rejected.
    pub(super) fn collect(headers: &HeaderMap) -> Result<Self, ApiError> {
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
            let value = unquote(value.as_bytes())
                .and_then(|unquoted| percent_decode(&unquoted))
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

/// Unescapes the double-quoted strings of a header value (RFC 9110 §5.6.4), which the
/// HTTP binding (section 3.1.3.2) has receivers do before percent-decoding, for senders
/// of earlier versions: `"1.0"` is `1.0`, and `\"` inside quotes is `"`.
fn unquote(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if !raw.contains(&b'"') {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    let mut quoted = false;
    while let Some(&byte) = bytes.next() {
        match (quoted, byte) {
            (_, b'"') => quoted = !quoted,
            (true, b'\\') => match bytes.next() {
                Some(&escaped) => out.push(escaped),
                None => break,
            },
            (_, other) => out.push(other),
        }
    }
    if quoted {
        return Err("a double-quoted string is not closed");
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use axum::http::{HeaderValue, StatusCode, header};

    use super::super::test_support::*;
    use super::super::{code, parse_events};
    use super::*;

    fn without(mut map: HeaderMap, name: &str) -> HeaderMap {
        map.remove(name);
        map
    }

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
    fn binary_mode_json_without_content_type_is_stored_as_json() {
        let event = parse_events(&binary(&[]), br#"{"a": [1, 2]}"#, &LIMITS)
            .expect("parses")
            .remove(0);
        assert_eq!(event.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(event.data, br#"{"a": [1, 2]}"#);
        let event = parse_events(&binary(&[]), b"\xff not json", &LIMITS)
            .expect("parses")
            .remove(0);
        assert_eq!(event.datacontenttype, None);
    }

    #[test]
    fn binary_mode_body_declared_json_must_be_json() {
        for content_type in ["application/json", "text/json", "application/vnd.a+json"] {
            let h = binary(&[("content-type", content_type)]);
            let e = parse_events(&h, br#"{"a": "#, &LIMITS).expect_err(content_type);
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            assert_eq!(e.code(), code::MALFORMED_JSON);
            assert_eq!(
                e.message(),
                "malformed JSON at line 1, column 6: EOF while parsing a value"
            );
        }
        let h = binary(&[("content-type", "application/json")]);
        assert!(
            parse_events(&h, b"", &LIMITS).expect("no data")[0]
                .data
                .is_empty()
        );
        let h = binary(&[("content-type", "text/plain")]);
        assert!(parse_events(&h, br#"{"a": "#, &LIMITS).is_ok());
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
    fn binary_mode_unquotes_values_before_percent_decoding() {
        let h = binary(&[
            ("ce-subject", "\"order%2042\""),
            ("ce-note", "\"say \\\"hi\\\"\"%21"),
        ])
        .tap_insert("ce-specversion", "\"1.0\"");
        let event = parse_events(&h, b"x", &LIMITS).expect("parses").remove(0);
        assert_eq!(event.subject.as_deref(), Some("order 42"));
        assert_eq!(event.extension("note"), Some("say \"hi\"!"));
        assert_invalid(
            parse_events(&binary(&[("ce-subject", "\"open")]), b"", &LIMITS),
            "attribute `subject` (header `ce-subject`): a double-quoted string is not closed",
        );
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

    #[test]
    fn unquoting() {
        assert_eq!(unquote(b"plain"), Ok(b"plain".to_vec()));
        assert_eq!(unquote(b"\"1.0\""), Ok(b"1.0".to_vec()));
        assert_eq!(unquote(br#"a"b\"c"d"#), Ok(br#"ab"cd"#.to_vec()));
        assert!(unquote(b"\"open").is_err());
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
}
