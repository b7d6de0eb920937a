//! The host's one clock and its time formats.
//!
//! The bus stores times as integers since the Unix epoch: microseconds for ingest times
//! (fine enough to measure delivery latency), milliseconds for retry, dead-letter and
//! load times. Answers and events carry RFC 3339 timestamps in UTC with millisecond
//! precision. All of it goes through `jiff`, the one time crate of the host; a clock set
//! before 1970 reads as the epoch rather than failing.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: the clock of ingest times.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch: the clock of retry, dead-letter and load times.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The current time as an RFC 3339 timestamp with millisecond precision, in UTC.
pub fn now_rfc3339() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// Milliseconds since the Unix epoch as an RFC 3339 timestamp with millisecond precision,
/// in UTC. Times outside what a timestamp can hold read as the epoch.
pub fn rfc3339_ms(ms: i64) -> String {
    let time = jiff::Timestamp::from_millisecond(ms.max(0)).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    format!("{time:.3}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_has_millisecond_precision_in_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(-5), "1970-01-01T00:00:00.000Z");
        let now = now_rfc3339();
        assert!(
            now.ends_with('Z') && now.len() == "1970-01-01T00:00:00.000Z".len(),
            "{now}"
        );
    }
}
