//! Dead letters: deliveries a plugin could not handle, kept whole for operators.
//!
//! Owns the [`DeadLetter`] record and why it exists ([`DeadLetterReason`]), the
//! operations every bus backend offers on them ([`DeadLetters`], a part of the `Bus`
//! trait), and the [`DeadLetterView`] the API and CLI show.
//!
//! Invariants every backend keeps:
//! - a dead letter is written in the same transaction as the settlement that ends the
//!   delivery, so an event is either still owed to the plugin or dead-lettered, never
//!   both and never neither;
//! - it keeps the whole event and every attempt's error, oldest first;
//! - a replay moves it back into its plugin's retry schedule, due now, with a fresh
//!   attempt count, and removes it from the dead letters in the same transaction.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{BusError, StoredEvent};
use crate::clock::rfc3339_ms;
use crate::failure::{AttemptError, AttemptView};

/// Why a delivery ends in the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeadLetterReason {
    /// The plugin rejected the event.
    Rejected,
    /// Every attempt the retry policy allows failed.
    Exhausted,
    /// The event grew older than the policy's maximum age.
    Expired,
    /// An attempt broke the host's rules on effects (too many or too large emits or
    /// KV writes); retrying would repeat it.
    Effects,
    /// An attempt emitted past the causation-depth limit: an endless chain of follow-ups.
    Loop,
    /// An attempt emitted an event whose data fails its type's schema; retrying would
    /// emit it again.
    Schema,
}

impl DeadLetterReason {
    /// The reason's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Exhausted => "exhausted",
            Self::Expired => "expired",
            Self::Effects => "effects",
            Self::Loop => "loop",
            Self::Schema => "schema",
        }
    }
}

/// A dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The dead letter's id.
    pub id: u64,
    /// The plugin that could not handle the event.
    pub plugin: String,
    /// The event and its log position.
    pub stored: StoredEvent,
    /// Why it is here.
    pub reason: DeadLetterReason,
    /// Every attempt's error, oldest first.
    pub errors: Vec<AttemptError>,
    /// When it was dead-lettered, in milliseconds since the Unix epoch.
    pub dead_at_ms: i64,
}

/// A page query over dead letters.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    /// Only this plugin's.
    pub plugin: Option<String>,
    /// Only ids after this one.
    pub after: u64,
    /// At most this many.
    pub limit: usize,
    /// Only those dead-lettered for this reason.
    pub reason: Option<DeadLetterReason>,
}

impl DeadLetter {
    /// The dead letter as the API shows it; `event` is the event in the CloudEvents JSON
    /// format, rendered by the caller that owns that format.
    pub fn view<E: Serialize>(&self, event: E) -> DeadLetterView<E> {
        DeadLetterView {
            id: self.id,
            plugin: self.plugin.clone(),
            reason: self.reason,
            sequence: self.stored.sequence,
            dead_at: rfc3339_ms(self.dead_at_ms),
            attempts: self.errors.len(),
            errors: self.errors.iter().map(AttemptView::from).collect(),
            event,
        }
    }
}

/// A dead letter as `GET /v1/dlq` and `GET /v1/dlq/{id}` answer it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetterView<E = serde_json::Value> {
    /// The dead letter's id.
    pub id: u64,
    /// The plugin that could not handle the event.
    pub plugin: String,
    /// Why it is here.
    pub reason: DeadLetterReason,
    /// The event's position in the log.
    pub sequence: u64,
    /// When it was dead-lettered.
    pub dead_at: String,
    /// How many attempts failed.
    pub attempts: usize,
    /// Every attempt's error, oldest first.
    pub errors: Vec<AttemptView>,
    /// The event, in the CloudEvents JSON format.
    pub event: E,
}

/// A page of dead letters.
#[derive(Debug, Default)]
pub struct DeadLetterPage {
    /// The letters, oldest first.
    pub letters: Vec<DeadLetter>,
    /// Set when the read stopped before `limit` letters and the end, having looked at
    /// every letter up to this id (a filter a backend applies by reading what it skips
    /// reads a bounded number per request): the next page starts after it.
    pub scanned_to: Option<u64>,
}

/// What a bus offers on dead letters.
#[async_trait]
pub trait DeadLetters: Send + Sync {
    /// Lists dead letters.
    async fn dead_letters(&self, query: DeadLetterQuery) -> Result<DeadLetterPage, BusError>;

    /// One dead letter.
    async fn dead_letter(&self, id: u64) -> Result<DeadLetter, BusError>;

    /// Moves the selected dead letters back into their plugins' retry schedules, due now,
    /// with a fresh attempt count; returns how many moved. A missing `One` is `NotFound`.
    async fn replay_dead_letters(&self, which: &DeadLetterSelection) -> Result<u64, BusError>;

    /// Deletes the selected dead letters; returns how many went. A missing `One` is
    /// `NotFound`.
    async fn delete_dead_letters(&self, which: &DeadLetterSelection) -> Result<u64, BusError>;
}

/// Which dead letters a replay or a deletion takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterSelection {
    /// The dead letter with this id.
    One(u64),
    /// Every dead letter of a plugin, or only those dead-lettered for `reason`.
    Plugin {
        /// The plugin.
        plugin: String,
        /// Only those with this reason.
        reason: Option<DeadLetterReason>,
    },
}

impl DeadLetterSelection {
    /// Whether `letter` is selected.
    pub fn takes(&self, letter: &DeadLetter) -> bool {
        match self {
            Self::One(id) => letter.id == *id,
            Self::Plugin { plugin, reason } => {
                letter.plugin == *plugin && reason.is_none_or(|reason| reason == letter.reason)
            }
        }
    }
}
