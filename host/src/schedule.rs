//! Scheduled events: the vocabulary every layer shares about them.
//!
//! An event carrying [`DELIVER_AT`] (an RFC 3339 time) is not stored in the log when it is
//! appended or committed: the bus keeps it aside, pending, and one scheduler per backend
//! appends it to the log when it is due, without the extension. A pending event is named
//! by its id alone (the id `emit` returned, or the producer's), so an operator or another
//! plugin can cancel it; two pending events never share an id.
//!
//! A call that cancels records a [`ScheduledRead`] of what it saw; the bus commits the
//! call only if each scheduled event it looked at is still pending or still absent, as it
//! does for KV reads.
//!
//! Invariants: the due time is fixed when the event is scheduled (`delay` counts from
//! then); a due event is appended exactly once, or not at all if it was cancelled first.

use std::time::Duration;

use crate::clock;

/// Extension attribute of a scheduled event: when it is due, RFC 3339.
pub const DELIVER_AT: &str = "deliverat";

/// The longest a producer or plugin may schedule ahead.
pub const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

/// When an event is due, as a plugin or producer asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// This long from now.
    After(Duration),
    /// At this RFC 3339 time.
    At(String),
}

/// The due time, in milliseconds since the Unix epoch, of `due`; a time in the past is
/// due now. Refuses malformed times and times beyond [`MAX_DELAY`].
pub fn due_ms(due: &Due) -> Result<i64, String> {
    let now = clock::now_ms();
    let at = match due {
        Due::After(delay) => {
            if *delay > MAX_DELAY {
                return Err(too_far());
            }
            now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
        }
        Due::At(at) => parse_rfc3339_ms(at)?,
    };
    let limit = now.saturating_add(i64::try_from(MAX_DELAY.as_millis()).unwrap_or(i64::MAX));
    if at > limit {
        return Err(too_far());
    }
    Ok(at.max(now))
}

/// The due time of `due` as the value of [`DELIVER_AT`].
pub fn due_time(due: &Due) -> Result<String, String> {
    due_ms(due).map(clock::rfc3339_ms)
}

/// Milliseconds since the Unix epoch of an RFC 3339 time.
pub fn parse_rfc3339_ms(at: &str) -> Result<i64, String> {
    if !clock::is_rfc3339(at) {
        return Err(format!(
            "`{at}` is not an RFC 3339 time such as 2026-12-24T18:00:00Z"
        ));
    }
    at.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|e| format!("`{at}`: {e}"))
}

fn too_far() -> String {
    format!(
        "a scheduled event may be due at most {} ahead",
        humantime::format_duration(MAX_DELAY)
    )
}

/// Whether one scheduled event was pending, as one call saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRead {
    /// The scheduled event's id.
    pub id: String,
    /// Whether it was pending.
    pub pending: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times() {
        let now = clock::now_ms();
        let soon = due_ms(&Due::After(Duration::from_secs(60))).unwrap();
        assert!((now + 59_000..now + 61_000).contains(&soon));
        assert!(due_ms(&Due::At("2000-01-01T00:00:00Z".into())).unwrap() >= now);
        assert!(due_ms(&Due::At("tomorrow".into())).is_err());
        assert!(due_ms(&Due::After(MAX_DELAY + Duration::from_secs(1))).is_err());
        assert!(due_ms(&Due::At("9999-01-01T00:00:00Z".into())).is_err());
        assert_eq!(
            parse_rfc3339_ms("2023-11-14T22:13:20.123Z"),
            Ok(1_700_000_000_123)
        );
    }
}
