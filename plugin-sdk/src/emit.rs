//! Publishing follow-up events.

use serde::Serialize;

use crate::__private::host;
use crate::{HandlerError, OutgoingEvent, Schedule};

/// Asks the host to publish `event` once this call succeeds; returns the id it will have.
///
/// The host fills in `id`, `source`, `time`, `causationid` and `correlationid`. Nothing is
/// published if the handler fails; emitting past the host's bounds stops the call, and so
/// does an invalid event (a bad type or schedule, an expected version without a subject).
pub fn emit(event: OutgoingEvent) -> String {
    host::emit(&event)
}

/// Emits an event of type `ty` whose data is `value` as JSON; returns the new event's id.
///
/// A value that cannot be serialised is a [`HandlerError::Reject`].
pub fn emit_json<T: Serialize + ?Sized>(ty: &str, value: &T) -> Result<String, HandlerError> {
    Ok(Emit::new(ty).json(value)?.send())
}

/// Builds an [`OutgoingEvent`] step by step, then [`send`](Emit::send)s it.
///
/// ```no_run
/// # fn f() -> Result<(), switchyard_sdk::HandlerError> {
/// let id = switchyard_sdk::Emit::new("tickets.generated")
///     .subject("order-7")
///     .extension("partitionkey", "order-7")
///     .json(&serde_json::json!({"order_id": "order-7"}))?
///     .send();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "an `Emit` does nothing until `.send()` is called"]
pub struct Emit {
    event: OutgoingEvent,
}

impl Emit {
    /// Starts an event of type `ty` with empty data and no subject or extensions.
    pub fn new(ty: impl Into<String>) -> Self {
        Self {
            event: OutgoingEvent {
                type_: ty.into(),
                subject: None,
                datacontenttype: None,
                data: Vec::new(),
                extensions: Vec::new(),
                expected_version: None,
                schedule: None,
            },
        }
    }

    /// Sets the event's `subject`.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.event.subject = Some(subject.into());
        self
    }

    /// Sets an extension attribute (replacing an earlier value of the same name).
    pub fn extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        self.event.extensions.retain(|(n, _)| *n != name);
        self.event.extensions.push((name, value.into()));
        self
    }

    /// Sets the `partitionkey` extension, which the host uses for per-key ordering.
    pub fn partition_key(self, key: impl Into<String>) -> Self {
        self.extension("partitionkey", key)
    }

    /// Sets the data to raw bytes with the given media type, such as `text/plain`.
    pub fn bytes(mut self, content_type: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.event.datacontenttype = Some(content_type.into());
        self.event.data = data.into();
        self
    }

    /// Sets the data to `value` as JSON (media type `application/json`).
    ///
    /// A value that cannot be serialised is a [`HandlerError::Reject`].
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, HandlerError> {
        self.event.data = serde_json::to_vec(value).map_err(|e| {
            HandlerError::Reject(format!("cannot serialise {}: {e}", self.event.type_))
        })?;
        self.event.datacontenttype = None; // `none` means `application/json`
        Ok(self)
    }

    /// Appends the event only if its subject's stream is at `version` when the call
    /// commits (`0`: the stream must not exist yet). Needs a [`subject`](Emit::subject).
    ///
    /// Use the version a [`crate::stream::read`] returned: if another event reached the
    /// stream since, the host discards this call's effects and runs the handler again on
    /// the new state, so two handlers deciding on the same version never both append.
    pub fn expected_version(mut self, version: u64) -> Self {
        self.event.expected_version = Some(version);
        self
    }

    /// Publishes the event `delay` from now instead of when the call commits. The schedule
    /// commits with the call; the id [`send`](Emit::send) returns cancels it
    /// ([`crate::cancel_scheduled`]).
    pub fn delay(mut self, delay: std::time::Duration) -> Self {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.event.schedule = Some(Schedule::DelayMs(ms));
        self
    }

    /// Publishes the event at `time`, an RFC 3339 timestamp such as
    /// `2026-12-24T18:00:00Z` (a time in the past: as soon as the call commits).
    pub fn deliver_at(mut self, time: impl Into<String>) -> Self {
        self.event.schedule = Some(Schedule::At(time.into()));
        self
    }

    /// The event as built so far.
    pub fn into_event(self) -> OutgoingEvent {
        self.event
    }

    /// Publishes the event (see [`emit`]) and returns the id it will have.
    pub fn send(self) -> String {
        emit(self.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder() {
        let e = Emit::new("a.b")
            .subject("s")
            .extension("partitionkey", "1")
            .partition_key("2")
            .json(&[1, 2])
            .unwrap()
            .into_event();
        assert_eq!(e.type_, "a.b");
        assert_eq!(e.subject.as_deref(), Some("s"));
        assert_eq!(e.extensions, vec![("partitionkey".into(), "2".into())]);
        assert_eq!(e.data, b"[1,2]");
        assert_eq!(e.datacontenttype, None);
        assert_eq!(e.expected_version, None);
        assert_eq!(e.schedule, None);

        let e = Emit::new("seat.reserved")
            .subject("show-1")
            .expected_version(4)
            .into_event();
        assert_eq!(e.expected_version, Some(4));
        let e = Emit::new("reservation.expired")
            .delay(std::time::Duration::from_secs(90))
            .into_event();
        assert_eq!(e.schedule, Some(Schedule::DelayMs(90_000)));
        let e = Emit::new("show.starts")
            .deliver_at("2026-12-24T18:00:00Z")
            .into_event();
        assert_eq!(
            e.schedule,
            Some(Schedule::At("2026-12-24T18:00:00Z".into()))
        );

        let e = Emit::new("a.b").bytes("text/plain", "hi").into_event();
        assert_eq!(e.datacontenttype.as_deref(), Some("text/plain"));
        assert_eq!(e.data, b"hi");
    }

    #[test]
    fn unserialisable_json_is_a_reject() {
        let mut map = std::collections::HashMap::new();
        map.insert(vec![1u8], 1); // JSON object keys must be strings
        let err = Emit::new("a.b").json(&map).unwrap_err();
        assert!(!err.is_retry());
        assert!(err.message().starts_with("cannot serialise a.b: "));
    }
}
