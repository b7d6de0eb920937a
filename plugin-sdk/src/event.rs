//! Inherent helpers on the generated [`Event`], [`Delivery`] and [`HandlerError`] types.

use std::fmt::Display;

use serde::de::DeserializeOwned;

use crate::{Delivery, Event, HandlerError};

impl Event {
    /// Decodes the event's `data` as JSON into `T`.
    ///
    /// Unknown fields are ignored unless `T` says otherwise. Data that does not decode is a
    /// permanent failure, so the error is [`HandlerError::Reject`] with the message
    /// `invalid data for <type>: <serde error>`; `?` passes it straight to the host.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.data)
            .map_err(|e| HandlerError::Reject(format!("invalid data for {}: {e}", self.type_)))
    }

    /// The value of the CloudEvents extension attribute `name` (such as `partitionkey`),
    /// if the event has it. Names are compared exactly; CloudEvents names are lowercase.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `correlationid` extension: the id shared by every event of one causal chain.
    pub fn correlation_id(&self) -> Option<&str> {
        self.extension("correlationid")
    }

    /// The `causationid` extension: the id of the event whose handler emitted this one.
    pub fn causation_id(&self) -> Option<&str> {
        self.extension("causationid")
    }

    /// The `partitionkey` extension, which the host uses for per-key ordering.
    pub fn partition_key(&self) -> Option<&str> {
        self.extension("partitionkey")
    }

    /// The event's position in its subject's stream (the `streamversion` extension), for
    /// an event with a subject.
    pub fn stream_version(&self) -> Option<u64> {
        self.extension("streamversion")?.parse().ok()
    }
}

impl Delivery {
    /// Whether this is the last attempt the plugin's retry policy allows; a
    /// [`HandlerError::retry`] now sends the event to the dead letters.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

impl HandlerError {
    /// A transient failure: the host retries the event later, with backoff.
    pub fn retry(message: impl Display) -> Self {
        Self::Retry(message.to_string())
    }

    /// A permanent failure: the host moves the event to the dead letters at once.
    pub fn reject(message: impl Display) -> Self {
        Self::Reject(message.to_string())
    }

    /// The message, whichever kind of failure this is.
    pub fn message(&self) -> &str {
        match self {
            Self::Retry(m) | Self::Reject(m) => m,
        }
    }

    /// Whether the host will retry the event (`true`) or dead-letter it (`false`).
    pub fn is_retry(&self) -> bool {
        matches!(self, Self::Retry(_))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    fn event(data: &[u8]) -> Event {
        Event {
            id: "1".into(),
            source: "test".into(),
            type_: "payment.completed".into(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: data.to_vec(),
            extensions: vec![
                ("correlationid".into(), "c-1".into()),
                ("causationid".into(), "e-0".into()),
                ("partitionkey".into(), "o-1".into()),
            ],
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Payment {
        order_id: String,
        amount_cents: i64,
    }

    #[test]
    fn json_decodes_and_ignores_unknown_fields() {
        let e = event(br#"{"order_id":"o-1","amount_cents":5,"extra":true}"#);
        assert_eq!(
            e.json::<Payment>(),
            Ok(Payment {
                order_id: "o-1".into(),
                amount_cents: 5
            })
        );
    }

    #[test]
    fn bad_json_is_a_reject_naming_the_type() {
        let err = event(b"{").json::<Payment>().unwrap_err();
        assert!(!err.is_retry());
        assert!(
            err.message()
                .starts_with("invalid data for payment.completed: "),
            "{err:?}"
        );
    }

    #[test]
    fn extensions() {
        let e = event(b"{}");
        assert_eq!(e.correlation_id(), Some("c-1"));
        assert_eq!(e.causation_id(), Some("e-0"));
        assert_eq!(e.partition_key(), Some("o-1"));
        assert_eq!(e.extension("nope"), None);
    }

    #[test]
    fn error_constructors() {
        assert_eq!(
            HandlerError::retry(format_args!("a{}", 1)),
            HandlerError::Retry("a1".into())
        );
        assert_eq!(HandlerError::reject("b"), HandlerError::Reject("b".into()));
        let as_error: &dyn std::error::Error = &HandlerError::reject("b");
        assert!(as_error.to_string().contains('b'));
    }

    #[test]
    fn last_attempt() {
        let d = Delivery {
            attempt: 3,
            max_attempts: 3,
            sequence: 9,
        };
        assert!(d.is_last_attempt());
    }
}
