//! A plugin's circuit breaker: the sidecar's `[breaker]` table, the resolved policy,
//! and which failed attempts count against it.
//!
//! The state a breaker is in is shared through the bus (see `crate::bus::controls`) and
//! driven by the dispatcher (see `crate::dispatch::valve`); this module only holds the
//! numbers and the rules on them.
//!
//! Invariants: a [`BreakerPolicy`] has `failures >= 1`, `cooldown > 0` and
//! `max_cooldown >= cooldown`; [`BreakerPolicy::next_cooldown`] never exceeds
//! `max_cooldown` and never overflows.

use std::time::Duration;

use serde::Deserialize;

use super::ManifestError;
use crate::failure::FailureKind;
use crate::units::deser;

/// `[breaker]`: stop delivering to a plugin that keeps failing, and probe it now and
/// then until it works again. Without this table a plugin has no breaker.
///
/// After `failures` failed attempts in a row, the breaker opens: the plugin's deliveries
/// stop (its events wait in the log; nothing is attempted, retried or dead-lettered).
/// After `cooldown` one delivery runs as a probe: success closes the breaker, failure
/// opens it again for twice as long, up to `max_cooldown`. Failures that count are the
/// ones a retry may cure (`retry`, traps, fuel, memory and timeouts); a `reject`, an
/// effects or schema violation is the event's fault, not the plugin's, and counts as a
/// success.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerTable {
    /// Failed attempts in a row that open the breaker. At least 1.
    ///
    /// Default: 5.
    pub failures: Option<u32>,

    /// How long the breaker stays open before the first probe.
    ///
    /// Default: `"30s"`.
    #[serde(default, deserialize_with = "deser::opt_duration")]
    pub cooldown: Option<Duration>,

    /// Longest the breaker stays open as failed probes double the cooldown.
    ///
    /// Default: `"10m"`.
    #[serde(default, deserialize_with = "deser::opt_duration")]
    pub max_cooldown: Option<Duration>,
}

/// A plugin's resolved breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failed attempts in a row that open the breaker.
    pub failures: u32,
    /// The first cooldown.
    pub cooldown: Duration,
    /// The longest cooldown.
    pub max_cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures: 5,
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(600),
        }
    }
}

impl BreakerTable {
    /// The policy this table sets over the defaults, validated; an error names the key.
    pub fn resolve(&self) -> Result<BreakerPolicy, ManifestError> {
        let base = BreakerPolicy::default();
        let cooldown = self.cooldown.unwrap_or(base.cooldown);
        let policy = BreakerPolicy {
            failures: self.failures.unwrap_or(base.failures),
            cooldown,
            // A cooldown longer than the default maximum raises the maximum with it.
            max_cooldown: self.max_cooldown.unwrap_or(base.max_cooldown.max(cooldown)),
        };
        if policy.failures == 0 {
            return Err(ManifestError::invalid(
                "breaker.failures",
                "must be at least 1",
            ));
        }
        if policy.cooldown.is_zero() {
            return Err(ManifestError::invalid(
                "breaker.cooldown",
                "must be longer than zero",
            ));
        }
        if policy.max_cooldown < policy.cooldown {
            return Err(ManifestError::invalid(
                "breaker.max_cooldown",
                format!(
                    "must be at least `breaker.cooldown` ({})",
                    humantime::format_duration(policy.cooldown)
                ),
            ));
        }
        Ok(policy)
    }
}

impl BreakerPolicy {
    /// The cooldown after a failed probe that followed `current`: twice as long, at most
    /// `max_cooldown`.
    pub fn next_cooldown(&self, current: Duration) -> Duration {
        current
            .max(self.cooldown)
            .saturating_mul(2)
            .min(self.max_cooldown)
    }
}

/// Whether a failed attempt of this kind counts against the plugin's breaker.
pub fn counts_against(kind: FailureKind) -> bool {
    matches!(
        kind,
        FailureKind::Retry
            | FailureKind::Trap
            | FailureKind::Fuel
            | FailureKind::Memory
            | FailureKind::Timeout
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Result<BreakerPolicy, ManifestError> {
        toml::from_str::<BreakerTable>(text)
            .map_err(|e| ManifestError::Syntax(e.to_string()))
            .and_then(|table| table.resolve())
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(resolve("").unwrap(), BreakerPolicy::default());
        let policy = resolve("failures = 3\ncooldown = \"2s\"\nmax_cooldown = \"5s\"").unwrap();
        assert_eq!(policy.failures, 3);
        assert_eq!(policy.cooldown, Duration::from_secs(2));
        assert_eq!(policy.max_cooldown, Duration::from_secs(5));
        // A cooldown above the default maximum raises the maximum with it.
        let long = resolve("cooldown = \"1h\"").unwrap();
        assert_eq!(long.max_cooldown, Duration::from_secs(3600));
    }

    #[test]
    fn bad_values_name_their_key() {
        let refused = |text: &str| resolve(text).unwrap_err().to_string();
        assert!(refused("failures = 0").contains("`breaker.failures`"));
        assert!(refused("cooldown = \"0s\"").contains("`breaker.cooldown`"));
        assert!(
            refused("cooldown = \"10s\"\nmax_cooldown = \"5s\"").contains("`breaker.max_cooldown`")
        );
        assert!(refused("failure = 3").contains("unknown field"));
    }

    #[test]
    fn cooldown_doubles_up_to_the_maximum() {
        let policy = resolve("cooldown = \"1s\"\nmax_cooldown = \"5s\"").unwrap();
        let second = policy.next_cooldown(policy.cooldown);
        assert_eq!(second, Duration::from_secs(2));
        assert_eq!(policy.next_cooldown(second), Duration::from_secs(4));
        assert_eq!(
            policy.next_cooldown(Duration::from_secs(4)),
            Duration::from_secs(5)
        );
        assert_eq!(policy.next_cooldown(Duration::MAX), Duration::from_secs(5));
    }

    #[test]
    fn only_failures_a_retry_may_cure_count() {
        assert!(counts_against(FailureKind::Trap));
        assert!(counts_against(FailureKind::Retry));
        assert!(!counts_against(FailureKind::Reject));
        assert!(!counts_against(FailureKind::Schema));
        assert!(!counts_against(FailureKind::Host));
    }
}
