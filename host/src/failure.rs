//! How an attempt fails: the [`FailureKind`] the runtime reports and the
//! [`AttemptError`] that deliveries, dead letters and status keep of it.
//!
//! The kinds are a closed set so that metrics, status and dead letters agree on them;
//! each has one name (`retry`, `trap`, `fuel`, …) used in logs, the API and storage.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The kinds of failure, each reported separately in status, metrics and dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The plugin returned `handler-error::retry`: a transient failure.
    Retry,
    /// The plugin returned `handler-error::reject`: redelivery will not help.
    Reject,
    /// The plugin trapped (a panic, `unreachable`, an out-of-bounds access, …).
    Trap,
    /// The invocation burned its whole fuel budget.
    Fuel,
    /// The instance tried to grow its memory past the plugin's cap.
    Memory,
    /// The invocation ran past the plugin's wall-clock timeout.
    Timeout,
    /// The invocation broke a rule on effects: too many or too large emits or KV
    /// writes, or an invalid emitted event.
    Effects,
    /// The call emitted an event whose data fails its type's registered schema.
    Schema,
    /// The call emitted an event past the causation-depth limit: a chain of follow-ups
    /// that does not end (a plugin re-emitting what it subscribes to).
    Loop,
    /// The host could not serve the invocation (KV store unavailable, instance pool
    /// exhausted); the plugin is not at fault.
    Host,
}

impl FailureKind {
    /// The name used in logs, metrics, status and dead letters.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Reject => "reject",
            Self::Trap => "trap",
            Self::Fuel => "fuel",
            Self::Memory => "memory",
            Self::Timeout => "timeout",
            Self::Effects => "effects",
            Self::Loop => "loop",
            Self::Schema => "schema",
            Self::Host => "host",
        }
    }

    /// Whether another attempt may succeed. `reject` says it will not; an effects
    /// violation is a deterministic breach of the host's rules, so retrying only repeats it.
    pub fn is_retryable(self) -> bool {
        !matches!(
            self,
            Self::Reject | Self::Effects | Self::Loop | Self::Schema
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of one failed attempt, as dead letters and status keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// Which attempt failed, from 1.
    pub attempt: u32,
    /// The failure kind.
    pub kind: FailureKind,
    /// The failure message.
    pub message: String,
    /// When it failed, in milliseconds since the Unix epoch.
    pub at_ms: i64,
}

impl AttemptError {
    /// The longest message kept, in bytes: a plugin's error text (a `reject` echoing a
    /// large event, say) is the plugin's to choose, and every attempt's is kept with the
    /// event's dead letter, which must still fit the bus's largest message.
    pub const MAX_MESSAGE_BYTES: usize = 4096;

    /// `message` cut to at most `max` bytes (at a character boundary), saying how much
    /// was left out.
    pub fn bounded(message: String, max: usize) -> String {
        if message.len() <= max {
            return message;
        }
        let mut end = max;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes more)", &message[..end], message.len() - end)
    }
}

/// An [`AttemptError`] as the API shows it, with an RFC 3339 time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptView {
    /// Which attempt failed, from 1.
    pub attempt: u32,
    /// The failure kind.
    pub kind: FailureKind,
    /// The failure message.
    pub message: String,
    /// When it failed.
    pub at: String,
}

impl From<&AttemptError> for AttemptView {
    fn from(error: &AttemptError) -> Self {
        Self {
            attempt: error.attempt,
            kind: error.kind,
            message: error.message.clone(),
            at: crate::clock::rfc3339_ms(error.at_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::AttemptError;

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary_and_says_how_much_went() {
        assert_eq!(AttemptError::bounded("short".into(), 8), "short");
        // `é` is two bytes: a cut after 3 bytes would split the second one.
        assert_eq!(AttemptError::bounded("éééé".into(), 3), "é… (6 bytes more)");
        let long = AttemptError::bounded("x".repeat(10_000), AttemptError::MAX_MESSAGE_BYTES);
        assert!(long.starts_with(&"x".repeat(AttemptError::MAX_MESSAGE_BYTES)));
        assert!(long.ends_with("… (5904 bytes more)"), "{long}");
    }
}
