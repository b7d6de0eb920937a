//! Scheduled events as the bus keeps them (see [`crate::schedule`] for what they are):
//! the operator's view and the scheduler's one call.
//!
//! Contract every backend keeps: a pending event is appended to the log by
//! [`Schedules::fire_due`] once it is due, exactly once even with several hosts calling it;
//! a cancelled event never is; both survive a restart.

use async_trait::async_trait;
use serde::Serialize;

use super::BusError;
use crate::event::Event;

/// A pending scheduled event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledEvent {
    /// When it is due, in milliseconds since the Unix epoch.
    pub due_at_ms: i64,
    /// When it was scheduled, in milliseconds since the Unix epoch.
    pub scheduled_at_ms: i64,
    /// The event, as it will be appended.
    pub event: Event,
}

/// A query over the pending scheduled events, soonest first.
#[derive(Debug, Clone, Default)]
pub struct ScheduledQuery {
    /// Only events of exactly this type.
    pub event_type: Option<String>,
    /// At most this many.
    pub limit: usize,
}

/// What one [`Schedules::fire_due`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Fired {
    /// How late each appended event was: from its due time to its append, in
    /// milliseconds.
    pub lags_ms: Vec<u64>,
    /// Whether more events were due than one call appends.
    pub more: bool,
    /// The due time of the next pending event, if any.
    pub next_due_ms: Option<i64>,
}

/// Pending scheduled events.
#[async_trait]
pub trait Schedules {
    /// Lists pending scheduled events, soonest first.
    async fn list_scheduled(&self, query: ScheduledQuery) -> Result<Vec<ScheduledEvent>, BusError>;

    /// How many events are pending.
    async fn scheduled_count(&self) -> Result<u64, BusError>;

    /// Cancels a pending scheduled event; `false` if none with this id is pending.
    async fn cancel_scheduled(&self, id: &str) -> Result<bool, BusError>;

    /// Appends to the log up to `limit` events that are due now, and forgets them.
    async fn fire_due(&self, limit: usize) -> Result<Fired, BusError>;
}
