//! What one invocation of a plugin produced.
//!
//! Invariant: effects exist only on success. A failed attempt's buffered emits and KV
//! writes are dropped inside the runtime and cannot be reached through an [`Outcome`].

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::event::Event;

/// The result of one invocation.
#[derive(Debug)]
pub struct Outcome {
    /// The effects to commit with the acknowledgement, or why the attempt failed.
    pub result: Result<Effects, Failure>,
    /// Fuel the invocation burned (including instantiation in `per-event` mode).
    pub fuel_used: u64,
    /// Wall-clock time of the invocation.
    pub duration: Duration,
}

/// Effects a successful invocation asks the host to commit, in the order they were made.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// Follow-up events, complete with id, source, time, causation and correlation ids.
    pub emits: Vec<Event>,
    /// KV writes, the last write to each key winning; `None` deletes the key.
    pub kv_writes: Vec<KvWrite>,
    /// What the call read from the committed KV state. The bus commits the effects only
    /// if these still hold, so concurrent calls of one plugin cannot lose each other's
    /// updates (optimistic concurrency); otherwise the attempt runs again.
    pub kv_reads: Vec<KvRead>,
}

/// A fingerprint of committed KV state that one call observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvRead {
    /// `kv-get` of `key` saw a value with this SHA-256 digest, or no value.
    Value {
        /// The key.
        key: String,
        /// Digest of the value seen, `None` when the key was absent.
        digest: Option<[u8; 32]>,
    },
    /// `kv-keys` of `prefix` saw a key list with this SHA-256 digest.
    Keys {
        /// The prefix.
        prefix: String,
        /// Digest of the keys seen, in order, each followed by a NUL byte.
        digest: [u8; 32],
    },
}

/// SHA-256 of a KV value, as [`KvRead::Value`] records it.
pub fn value_digest(value: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(value).into()
}

/// SHA-256 of a key list, as [`KvRead::Keys`] records it.
pub fn keys_digest<'a>(keys: impl IntoIterator<Item = &'a str>) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for key in keys {
        hasher.update(key.as_bytes());
        hasher.update([0u8]);
    }
    hasher.finalize().into()
}

/// One buffered write to a plugin's KV store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvWrite {
    /// The key.
    pub key: String,
    /// The new value, or `None` to delete the key.
    pub value: Option<Vec<u8>>,
}

/// Why an invocation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure it was.
    pub kind: FailureKind,
    /// A human-readable explanation for operators.
    pub message: String,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Failure {}

/// The kinds of failure, each reported separately in status, metrics and dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
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
            Self::Host => "host",
        }
    }

    /// Whether another attempt may succeed. `reject` says it will not; an effects
    /// violation is a deterministic breach of the host's rules, so retrying only repeats it.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::Reject | Self::Effects | Self::Loop)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
