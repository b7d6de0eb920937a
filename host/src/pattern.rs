//! Subscription patterns: which event types a plugin receives.
//!
//! A pattern is NATS subject syntax over event types: `.` separates segments, `*`
//! matches exactly one segment and `>` (only as the last segment) matches one or more
//! trailing segments. A [`Pattern`] is always valid once parsed.

use std::fmt;

use crate::event::MAX_EVENT_TYPE_LEN;

/// A parsed subscription pattern such as `order.*` or `payment.>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: String,
}

/// Why a subscription pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subscription pattern `{pattern}`: {reason}")]
pub struct PatternError {
    /// The rejected pattern.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Pattern {
    /// Parses and validates a pattern.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let fail = |reason| PatternError {
            pattern: text.to_owned(),
            reason,
        };
        if text.is_empty() {
            return Err(fail("it is empty"));
        }
        if text.len() > MAX_EVENT_TYPE_LEN {
            return Err(fail("it is longer than 255 bytes"));
        }
        let segments: Vec<&str> = text.split('.').collect();
        let last = segments.len() - 1;
        for (index, segment) in segments.iter().enumerate() {
            match *segment {
                "" => return Err(fail("it has an empty segment")),
                "*" => {}
                ">" if index == last => {}
                ">" => return Err(fail("`>` may only be the last segment")),
                s if s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
                _ => {
                    return Err(fail(
                        "segments may hold only A-Z, a-z, 0-9, `_`, `-`, or be `*` or `>`",
                    ));
                }
            }
        }
        Ok(Self {
            text: text.to_owned(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether an event type matches this pattern.
    pub fn matches(&self, event_type: &str) -> bool {
        let mut types = event_type.split('.');
        for segment in self.text.split('.') {
            match segment {
                ">" => return types.next().is_some(),
                "*" => {
                    if types.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if types.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        types.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, ty: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(ty)
    }

    #[test]
    fn matching() {
        assert!(matches("order.created", "order.created"));
        assert!(!matches("order.created", "order.created.v2"));
        assert!(matches("order.*", "order.created"));
        assert!(!matches("order.*", "order"));
        assert!(!matches("order.*", "order.created.v2"));
        assert!(matches("payment.>", "payment.completed"));
        assert!(matches("payment.>", "payment.completed.v2"));
        assert!(!matches("payment.>", "payment"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*.created", "order.created"));
    }

    #[test]
    fn invalid_patterns() {
        for bad in ["", "a..b", "a.>.b", "a.b c", "a.#", "a."] {
            assert!(Pattern::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
