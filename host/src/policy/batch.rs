//! Batch delivery: the sidecar's `[batch]` table and the resolved policy.
//!
//! Invariants: a [`BatchPolicy`] has `1 <= max_size <= MAX_BATCH_SIZE`; its `linger` is
//! at most [`MAX_LINGER`].

use std::time::Duration;

use serde::Deserialize;

use super::ManifestError;
use crate::units::deser;

/// Most events one batch may hold.
pub const MAX_BATCH_SIZE: usize = 1000;
/// Longest a batch may wait to fill.
pub const MAX_LINGER: Duration = Duration::from_secs(1);

/// `[batch]`: hand the plugin several events in one call of its batch handler (the
/// plugin must export `switchyard:plugin/batch-handler`; the Rust SDK's plugins do).
/// Without this table every event is its own call.
///
/// A batch holds up to `max_size` events; when fewer are waiting, it waits up to
/// `linger` for more before it goes. Each event keeps its own outcome, retries and dead
/// letter, and its effects commit only if it is acknowledged. With `ordering = "key"` a
/// batch holds one event per key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchTable {
    /// Most events in one call. 1 to 1000.
    ///
    /// Default: 64.
    pub max_size: Option<usize>,

    /// How long a batch waits to fill once its first event is there.
    ///
    /// Default: `"1ms"`.
    #[serde(default, deserialize_with = "deser::opt_duration")]
    pub linger: Option<Duration>,
}

/// A plugin's resolved batch settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most events in one call.
    pub max_size: usize,
    /// How long a batch waits to fill.
    pub linger: Duration,
}

impl BatchTable {
    /// The policy this table sets, validated; an error names the key.
    pub fn resolve(&self) -> Result<BatchPolicy, ManifestError> {
        let policy = BatchPolicy {
            max_size: self.max_size.unwrap_or(64),
            linger: self.linger.unwrap_or(Duration::from_millis(1)),
        };
        if !(1..=MAX_BATCH_SIZE).contains(&policy.max_size) {
            return Err(ManifestError::invalid(
                "batch.max_size",
                format!("must be between 1 and {MAX_BATCH_SIZE}"),
            ));
        }
        if policy.linger > MAX_LINGER {
            return Err(ManifestError::invalid(
                "batch.linger",
                format!("must be at most {}", humantime::format_duration(MAX_LINGER)),
            ));
        }
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bounds() {
        let policy = BatchTable::default().resolve().unwrap();
        assert_eq!(policy.max_size, 64);
        assert_eq!(policy.linger, Duration::from_millis(1));
        let too_big = BatchTable {
            max_size: Some(1001),
            linger: None,
        };
        assert!(
            too_big
                .resolve()
                .unwrap_err()
                .to_string()
                .contains("batch.max_size")
        );
        let too_long = BatchTable {
            max_size: None,
            linger: Some(Duration::from_secs(2)),
        };
        assert!(
            too_long
                .resolve()
                .unwrap_err()
                .to_string()
                .contains("batch.linger")
        );
    }
}
