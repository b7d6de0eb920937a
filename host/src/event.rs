//! The CloudEvents 1.0 event model the host stores and routes, and the rules for event
//! types.
//!
//! Invariants: an [`Event`] built by the host always has a valid [`Event::ty`] (see
//! [`validate_event_type`]); extension names are lower-case ASCII letters and digits as
//! CloudEvents requires, kept sorted so that equal events compare and serialise equal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest event type the host accepts, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 255;

/// Extension attribute that carries the id of the event a follow-up was caused by.
pub const CAUSATION_ID: &str = "causationid";
/// Extension attribute shared by every event of one flow.
pub const CORRELATION_ID: &str = "correlationid";
/// Extension attribute the host sets on emitted events: how many emits away from a
/// producer's event this one is (a producer's event counts as 0).
pub const CAUSATION_DEPTH: &str = "causationdepth";
/// Extension attribute that groups events that must be handled in order.
pub const PARTITION_KEY: &str = "partitionkey";

/// One CloudEvents 1.0 event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Identifies the event; unique together with `source`.
    pub id: String,
    /// URI-reference naming the context in which the event happened.
    pub source: String,
    /// Dot-separated event type such as `payment.completed`.
    #[serde(rename = "type")]
    pub ty: String,
    /// Subject of the event within its source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// RFC 3339 timestamp of when the event happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Media type of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// URI of the schema `data` adheres to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    /// The payload.
    #[serde(default)]
    pub data: Vec<u8>,
    /// Extension attributes by name.
    #[serde(default)]
    pub extensions: BTreeMap<String, String>,
}

impl Event {
    /// Returns the value of an extension attribute.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).map(String::as_str)
    }
}

/// Why an event type is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventTypeError {
    /// The type is the empty string.
    #[error("event type is empty")]
    Empty,
    /// The type is longer than [`MAX_EVENT_TYPE_LEN`].
    #[error("event type is {0} bytes long; at most {MAX_EVENT_TYPE_LEN} are allowed")]
    TooLong(usize),
    /// Two dots in a row, or a dot at either end.
    #[error("event type `{0}` has an empty segment")]
    EmptySegment(String),
    /// A character outside `[A-Za-z0-9_-]` in a segment.
    #[error("event type `{ty}` contains `{ch}`; segments may hold only A-Z, a-z, 0-9, `_` and `-`")]
    BadCharacter {
        /// The rejected type.
        ty: String,
        /// The first offending character.
        ch: char,
    },
}

/// Checks an event type: dot-separated segments of `[A-Za-z0-9_-]`, no empty segment,
/// at most [`MAX_EVENT_TYPE_LEN`] bytes.
pub fn validate_event_type(ty: &str) -> Result<(), EventTypeError> {
    if ty.is_empty() {
        return Err(EventTypeError::Empty);
    }
    if ty.len() > MAX_EVENT_TYPE_LEN {
        return Err(EventTypeError::TooLong(ty.len()));
    }
    for segment in ty.split('.') {
        if segment.is_empty() {
            return Err(EventTypeError::EmptySegment(ty.to_owned()));
        }
        if let Some(ch) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(EventTypeError::BadCharacter {
                ty: ty.to_owned(),
                ch,
            });
        }
    }
    Ok(())
}

/// Checks a CloudEvents extension attribute name: lower-case letters and digits, at
/// most 20 characters by the spec's recommendation (not enforced) and at least one.
pub fn is_valid_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The media type of a `Content-Type` (or `datacontenttype`) value, without parameters
/// or surrounding spaces.
pub fn media_type(content_type: &str) -> &str {
    content_type
        .split(';')
        .next()
        .unwrap_or(content_type)
        .trim()
}

/// `application/json`, `text/json` and any `*/*+json`, ignoring case.
pub fn is_json_media_type(media: &str) -> bool {
    let lower = media.to_ascii_lowercase();
    lower == "application/json" || lower == "text/json" || lower.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types() {
        assert_eq!(validate_event_type("payment.completed"), Ok(()));
        assert_eq!(validate_event_type("a_b-C.9"), Ok(()));
        assert_eq!(validate_event_type(""), Err(EventTypeError::Empty));
        assert!(matches!(
            validate_event_type("a..b"),
            Err(EventTypeError::EmptySegment(_))
        ));
        assert!(matches!(
            validate_event_type(".a"),
            Err(EventTypeError::EmptySegment(_))
        ));
        assert!(matches!(
            validate_event_type("order.*"),
            Err(EventTypeError::BadCharacter { ch: '*', .. })
        ));
        assert!(matches!(
            validate_event_type(&"a".repeat(256)),
            Err(EventTypeError::TooLong(256))
        ));
        assert_eq!(validate_event_type(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn extension_names() {
        assert!(is_valid_extension_name("correlationid"));
        assert!(!is_valid_extension_name("Correlation"));
        assert!(!is_valid_extension_name(""));
    }
}
