//! The value syntax shared by sidecars and the host config file: sizes and durations.
//!
//! Durations are humantime strings (`"200ms"`, `"5s"`, `"24h"`); sizes are a whole number
//! of bytes or a string with a unit ([`parse_size`]). The [`deser`] helpers plug these
//! parsers into serde, so a config struct never holds a size or duration that did not
//! parse, and a bad value's error names what was expected.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};

/// Why a size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size `{text}`: {reason}")]
pub struct ParseSizeError {
    /// The rejected text.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses a size: a whole number of bytes with an optional unit, case-insensitive, with
/// or without a space: `B`, `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024) or `KB`/`MB`/`GB`/`TB`
/// (powers of 1000). `"4096"`, `"64MiB"`, `"1 GB"`.
pub fn parse_size(text: &str) -> Result<u64, ParseSizeError> {
    let fail = |reason| ParseSizeError {
        text: text.to_owned(),
        reason,
    };
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(fail("it must start with a whole number, as in \"64MiB\""));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| fail("the number is too large"))?;
    if unit.starts_with(['.', ',']) {
        return Err(fail(
            "fractions are not supported; use a smaller unit, as in \"1536MiB\"",
        ));
    }
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(fail(
                "unknown unit; use B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)",
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| fail("it is too large"))
}

/// Parses a duration such as `"200ms"`, `"5s"`, `"1h 30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration `{text}`: {e}; write a number and a unit, as in \"200ms\", \"5s\" or \"24h\"")
    })
}

/// serde `deserialize_with` helpers for sizes and durations.
pub(crate) mod deser {
    use super::*;

    const DURATION: &str = "a duration string such as \"200ms\", \"5s\" or \"24h\"";

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(DURATION)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            parse_duration(v).map_err(E::custom)
        }
    }

    /// A humantime duration string.
    pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(DurationVisitor)
    }

    /// A humantime duration string, for an optional key.
    pub(crate) fn opt_duration<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        duration(d).map(Some)
    }

    struct MaxAgeVisitor;

    impl Visitor<'_> for MaxAgeVisitor {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{DURATION}, or \"none\" for no limit")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<Duration>, E> {
            if v.trim().eq_ignore_ascii_case("none") {
                Ok(None)
            } else {
                parse_duration(v)
                    .map(Some)
                    .map_err(|e| E::custom(format!("{e}, or \"none\" for no limit")))
            }
        }
    }

    /// A duration or `"none"`, for an optional key.
    pub(crate) fn opt_max_age<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<Duration>>, D::Error> {
        d.deserialize_str(MaxAgeVisitor).map(Some)
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of bytes, or a size string such as \"64MiB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }

    /// A size: an integer number of bytes or a string with a unit.
    pub(crate) fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    /// A size that must fit a `usize`.
    pub(crate) fn size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        let bytes = size(d)?;
        usize::try_from(bytes)
            .map_err(|_| de::Error::custom(format!("size {bytes} is too large for this machine")))
    }

    /// A size, for an optional key.
    pub(crate) fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        size(d).map(Some)
    }

    /// A size that must fit a `usize`, for an optional key.
    pub(crate) fn opt_size_usize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<usize>, D::Error> {
        size_usize(d).map(Some)
    }
}
