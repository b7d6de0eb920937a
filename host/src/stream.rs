//! Subject streams: the vocabulary every layer shares about them.
//!
//! Every event with a `subject` belongs to that subject's stream. The bus numbers a
//! stream's events densely (1, 2, 3 …) in the same commit that stores them and writes the
//! number into the event's [`STREAM_VERSION`] extension, so the version travels with the
//! event wherever it is delivered or read. A stream is an index over the log, not a second
//! log.
//!
//! An event may carry [`EXPECTED_VERSION`]: the bus stores it only if its subject's stream
//! is at that version just before it (`0`: the stream must not exist yet), and never
//! stores the extension itself. A call that read a stream records a [`StreamRead`]; the
//! bus commits the call's effects only if the stream's version is still the one read.
//!
//! Invariants: versions are assigned only by the bus; a stream's version never goes back,
//! even when retention deletes its oldest events.

use crate::event::Event;

/// Extension attribute with an event's position in its subject's stream.
pub const STREAM_VERSION: &str = "streamversion";
/// Extension attribute of a conditional append: the version the subject's stream must be
/// at for the event to be stored.
pub const EXPECTED_VERSION: &str = "expectedversion";

/// A page of one subject's stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPage {
    /// Events after the requested version, oldest first.
    pub events: Vec<Event>,
    /// The stream's current version; `0` when the subject has no event.
    pub version: u64,
}

/// A stream version one call observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRead {
    /// The subject.
    pub subject: String,
    /// The committed version the call saw.
    pub version: u64,
}

/// Why an event's expected version does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stream of subject `{subject}` is at version {current}, not {expected}")]
pub struct VersionConflict {
    /// The subject.
    pub subject: String,
    /// The version the event expected.
    pub expected: u64,
    /// The version the stream is at.
    pub current: u64,
}

/// An event's position in its stream, if it has one.
pub fn stream_version(event: &Event) -> Option<u64> {
    event.extension(STREAM_VERSION)?.parse().ok()
}

/// The version an event expects of its stream: `Ok(None)` for an unconditional event, an
/// error message for a malformed or subject-less condition.
pub fn expected_version(event: &Event) -> Result<Option<u64>, String> {
    let Some(value) = event.extension(EXPECTED_VERSION) else {
        return Ok(None);
    };
    let version = value.parse::<u64>().map_err(|_| {
        format!("`{EXPECTED_VERSION}` must be a non-negative integer, not `{value}`")
    })?;
    if event.subject.is_none() {
        return Err(format!(
            "`{EXPECTED_VERSION}` needs a `subject`: it is a condition on the subject's stream"
        ));
    }
    Ok(Some(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(subject: Option<&str>, expected: Option<&str>) -> Event {
        let mut event = Event {
            id: "1".into(),
            source: "/s".into(),
            ty: "a.b".into(),
            subject: subject.map(str::to_owned),
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: Vec::new(),
            extensions: Default::default(),
        };
        if let Some(expected) = expected {
            event
                .extensions
                .insert(EXPECTED_VERSION.into(), expected.into());
        }
        event
    }

    #[test]
    fn expected_versions_need_a_subject_and_a_number() {
        assert_eq!(expected_version(&event(Some("s"), None)), Ok(None));
        assert_eq!(expected_version(&event(Some("s"), Some("0"))), Ok(Some(0)));
        assert!(expected_version(&event(Some("s"), Some("-1"))).is_err());
        assert!(expected_version(&event(None, Some("3"))).is_err());
    }
}
