//! The host's one clock and its time formats.
//!
//! The bus stores times as integers since the Unix epoch: microseconds for ingest times
//! (fine enough to measure delivery latency), milliseconds for retry, dead-letter and
//! load times. Answers and events carry RFC 3339 timestamps in UTC with millisecond
//! precision; [`is_rfc3339`] is the one check of a timestamp a producer sends. All of it
//! goes through `jiff`, the one time crate of the host; a clock set
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

/// Whether `s` is an RFC 3339 timestamp: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`, with a
/// real calendar date (leap years included), hours 00–23, minutes 00–59, seconds 00–60
/// (leap second), at least one fraction digit after a `.`, and an offset of at most
/// 23:59. `T` and `Z` may be lower case, as RFC 3339 allows.
pub fn is_rfc3339(s: &str) -> bool {
    // jiff's parser takes more than RFC 3339 allows (a space for `T`, no seconds, `+0530`,
    // offsets up to 25:59, bracketed annotations) and fewer fraction digits (nine at most),
    // so the grammar is checked here and jiff judges the date and the time of day, leap
    // second included. It gets the civil date-time rather than a `Timestamp`, whose range
    // ends before 9999-12-31 that RFC 3339 still allows with any offset.
    let Some((date_time, rest)) = s.split_at_checked(19) else {
        return false;
    };
    let shape = b"0000-00-00T00:00:00";
    let date_time_shape = date_time.bytes().zip(shape).all(|(c, p)| match p {
        b'0' => c.is_ascii_digit(),
        b'T' => matches!(c, b'T' | b't'),
        _ => c == *p,
    });
    let offset = match rest.strip_prefix('.') {
        Some(fraction) => {
            let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return false;
            }
            &fraction[digits..]
        }
        None => rest,
    };
    let two_digits = |hi: u8, lo: u8| {
        (hi.is_ascii_digit() && lo.is_ascii_digit()).then(|| (hi - b'0') * 10 + (lo - b'0'))
    };
    let offset_ok = match *offset.as_bytes() {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            two_digits(h1, h2).is_some_and(|h| h <= 23)
                && two_digits(m1, m2).is_some_and(|m| m <= 59)
        }
        _ => false,
    };
    date_time_shape && offset_ok && date_time.parse::<jiff::civil::DateTime>().is_ok()
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

    #[test]
    fn rfc3339_validator() {
        for ok in [
            "2024-05-01T12:00:00Z",
            "2024-05-01t12:00:00z",
            "2024-05-01T12:00:00.1Z",
            "2024-05-01T12:00:00.123456789+05:30",
            "2024-05-01T23:59:60-00:00",
            "2024-02-29T00:00:00Z",
            "2000-02-29T00:00:00Z",
            "0000-01-01T00:00:00Z",
            &now_rfc3339(),
        ] {
            assert!(is_rfc3339(ok), "{ok} should be valid");
        }
        for bad in [
            "",
            "2024-05-01",
            "2024-05-01 12:00:00Z",
            "2024-05-01T12:00:00",
            "2024-05-01T12:00Z",
            "2024-05-01T12:00:00.Z",
            "2024-05-01T12:00:00+0530",
            "2024-05-01T12:00:00+05:30 ",
            "2024-05-01T12:00:00ZZ",
            "2024-13-01T12:00:00Z",
            "2024-00-01T12:00:00Z",
            "2024-04-31T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "1900-02-29T12:00:00Z",
            "2024-05-00T12:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:60:00Z",
            "2024-05-01T12:00:61Z",
            "2024-05-01T12:00:00+24:00",
            "2024-05-01T12:00:00+05:60",
            "+024-05-01T12:00:00Z",
            "2024-5-01T12:00:00Z",
            "２０２４-05-01T12:00:00Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad:?} should be invalid");
        }
    }
}
