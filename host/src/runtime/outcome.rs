//! What one invocation of a plugin produced.
//!
//! Invariant: effects exist only on success. A failed attempt's buffered emits and KV
//! writes are dropped inside the runtime and cannot be reached through an [`Outcome`].

use std::fmt;
use std::time::{Duration, Instant};

use crate::effects::Effects;
use crate::failure::FailureKind;

/// The result of one invocation.
#[derive(Debug)]
pub struct Outcome {
    /// The effects to commit with the acknowledgement, or why the attempt failed.
    pub result: Result<Effects, Failure>,
    /// Fuel the handler call burned. A fresh instance's start functions run on a budget
    /// of their own and are not counted here.
    pub fuel_used: u64,
    /// When the invocation started.
    pub started: Instant,
    /// Wall-clock time of the invocation.
    pub duration: Duration,
    /// Time the guest ran on a thread (its polls), as the CPU gate charges it.
    pub cpu: Duration,
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
