//! Retry policy: how long to wait before the next attempt at an event, and when to give up.
//!
//! A [`RetryPolicy`] is plain data (it comes from a plugin's sidecar over the host's
//! `[plugin_defaults]`, see [`crate::plugins::manifest`]). This module only computes:
//! [`RetryPolicy::delay`] for the backoff curve and [`RetryPolicy::decide`] for the whole
//! decision after a retryable failure. Scheduling, counting attempts and dead-lettering
//! belong to the dispatcher.
//!
//! Invariants:
//! - Attempts are numbered from 1 (the first delivery); attempt 2 is the first retry.
//! - Both functions are total: no overflow or panic for any attempt number or duration.
//!   Every delay is capped at `max`; a policy with `initial > max` (which the sidecar
//!   parser refuses) simply yields `max`, and `max_attempts = 0` behaves like 1.
//! - Randomness comes only from the caller's rng, so a seeded rng gives repeatable delays.

use std::time::Duration;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

/// The shape of the backoff curve between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    /// Every retry waits `initial`.
    Constant,
    /// Retry *n* waits `initial × n`: 1×, 2×, 3×, …
    Linear,
    /// Retry *n* waits `initial × 2^(n-1)`: 1×, 2×, 4×, 8×, …
    #[default]
    Exponential,
}

/// When and how often a failed delivery is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, counting the first delivery; 1 means never retry.
    pub max_attempts: u32,
    /// The backoff curve.
    pub backoff: Backoff,
    /// The delay before the first retry, and the unit of the curve.
    pub initial: Duration,
    /// No delay is longer than this.
    pub max: Duration,
    /// Whether each delay is drawn at random from `[delay / 2, delay]` ("equal jitter"),
    /// which spreads retries of many events failing together.
    pub jitter: bool,
    /// Oldest an event may be (since it was ingested) and still be retried; `None` means
    /// no limit.
    pub max_age: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Backoff::Exponential,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(60),
            jitter: true,
            max_age: Some(Duration::from_secs(24 * 60 * 60)),
        }
    }
}

/// What to do with an event after a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// `max_attempts` attempts have failed: dead-letter as `exhausted`.
    Exhausted,
    /// The event is older than `max_age`, or would be by the time of the retry:
    /// dead-letter as `expired`.
    Expired,
}

impl RetryPolicy {
    /// The delay before attempt `next_attempt` (2 = the first retry).
    ///
    /// `constant`: `initial`; `linear`: `initial × (next_attempt - 1)`; `exponential`:
    /// `initial × 2^(next_attempt - 2)`; always capped at `max`. With `jitter`, the result
    /// is uniform in `[delay / 2, delay]`, drawn from `rng`. Attempt numbers below 2 are
    /// treated as 2.
    pub fn delay(&self, next_attempt: u32, rng: &mut impl Rng) -> Duration {
        let retry = next_attempt.max(2) - 1; // 1 = the first retry
        let delay = match self.backoff {
            Backoff::Constant => self.initial,
            Backoff::Linear => self.initial.saturating_mul(retry),
            Backoff::Exponential => doubled(self.initial, retry - 1, self.max),
        }
        .min(self.max);
        if self.jitter {
            equal_jitter(delay, rng)
        } else {
            delay
        }
    }

    /// What to do after attempt `attempt` (1 = the first delivery) failed retryably, for an
    /// event that is `event_age` old now (time since it was ingested).
    ///
    /// Running out of attempts wins over expiry: the last attempt's failure is
    /// [`RetryDecision::Exhausted`] even for an old event. Otherwise the event is
    /// [`RetryDecision::Expired`] if it is already older than `max_age`, or would be when
    /// the retry is due.
    pub fn decide(&self, attempt: u32, event_age: Duration, rng: &mut impl Rng) -> RetryDecision {
        if attempt >= self.max_attempts.max(1) {
            return RetryDecision::Exhausted;
        }
        let delay = self.delay(attempt.saturating_add(1), rng);
        match self.max_age {
            Some(max_age) if event_age.saturating_add(delay) > max_age => RetryDecision::Expired,
            _ => RetryDecision::RetryAfter(delay),
        }
    }
}

/// `initial × 2^doublings`, or `max` if that is larger than `max` (or than any duration).
fn doubled(initial: Duration, doublings: u32, max: Duration) -> Duration {
    let nanos = initial.as_nanos();
    if nanos == 0 {
        return Duration::ZERO;
    }
    // `nanos << doublings` fits in a u128 only if it has that many leading zeros to spare.
    if doublings >= nanos.leading_zeros() {
        return max;
    }
    let scaled = nanos << doublings;
    if scaled >= max.as_nanos() {
        return max;
    }
    // Below `max`, so it fits a Duration.
    from_nanos(scaled).unwrap_or(max)
}

/// A uniformly random duration in `[delay / 2, delay]`.
fn equal_jitter(delay: Duration, rng: &mut impl Rng) -> Duration {
    // Durations beyond u64 nanoseconds (about 584 years) are not worth jittering.
    let Ok(nanos) = u64::try_from(delay.as_nanos()) else {
        return delay;
    };
    Duration::from_nanos(rng.random_range(nanos / 2..=nanos))
}

fn from_nanos(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    let subsec = u32::try_from(nanos % 1_000_000_000).ok()?;
    Some(Duration::new(secs, subsec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy(backoff: Backoff) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            backoff,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: false,
            max_age: None,
        }
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn delays(policy: &RetryPolicy, attempts: std::ops::RangeInclusive<u32>) -> Vec<u64> {
        let mut rng = rng();
        attempts
            .map(|n| policy.delay(n, &mut rng).as_millis() as u64)
            .collect()
    }

    #[test]
    fn defaults() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.backoff, Backoff::Exponential);
        assert_eq!(p.initial, Duration::from_millis(200));
        assert_eq!(p.max, Duration::from_secs(60));
        assert!(p.jitter);
        assert_eq!(p.max_age, Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn constant_backoff() {
        assert_eq!(
            delays(&policy(Backoff::Constant), 2..=5),
            [100, 100, 100, 100]
        );
    }

    #[test]
    fn linear_backoff_is_capped() {
        let p = policy(Backoff::Linear);
        assert_eq!(
            delays(&p, 2..=13),
            [
                100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1000, 1000
            ]
        );
    }

    #[test]
    fn exponential_backoff_is_capped() {
        let p = policy(Backoff::Exponential);
        assert_eq!(delays(&p, 2..=7), [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn attempt_numbers_below_two_mean_the_first_retry() {
        let p = policy(Backoff::Exponential);
        assert_eq!(delays(&p, 0..=2), [100, 100, 100]);
    }

    #[test]
    fn huge_attempts_do_not_overflow() {
        let mut rng = rng();
        for backoff in [Backoff::Constant, Backoff::Linear, Backoff::Exponential] {
            let mut p = policy(backoff);
            for max in [Duration::from_secs(1), Duration::MAX] {
                p.max = max;
                for attempt in [31, 32, 33, 64, 65, 127, 128, 129, 1000, u32::MAX] {
                    let d = p.delay(attempt, &mut rng);
                    assert!(d <= max, "{backoff:?} attempt {attempt}: {d:?}");
                    // Growing curves reach a 1s cap by attempt 31; only the exponential
                    // one reaches Duration::MAX (100ms × 2^68 is past it).
                    let capped = match backoff {
                        Backoff::Constant => false,
                        Backoff::Linear => max == Duration::from_secs(1),
                        Backoff::Exponential => max == Duration::from_secs(1) || attempt >= 72,
                    };
                    if capped {
                        assert_eq!(d, max, "{backoff:?} attempt {attempt}");
                    }
                }
            }
        }
        // A tiny unit under a huge cap still doubles exactly until it reaches the cap.
        let p = RetryPolicy {
            initial: Duration::from_nanos(1),
            max: Duration::from_secs(3600),
            ..policy(Backoff::Exponential)
        };
        assert_eq!(p.delay(34, &mut rng), Duration::from_nanos(1 << 32));
        assert_eq!(p.delay(2 + 42, &mut rng), Duration::from_secs(3600));
    }

    #[test]
    fn zero_initial_and_initial_above_max() {
        let mut rng = rng();
        let zero = RetryPolicy {
            initial: Duration::ZERO,
            ..policy(Backoff::Exponential)
        };
        assert_eq!(zero.delay(500, &mut rng), Duration::ZERO);
        let inverted = RetryPolicy {
            initial: Duration::from_secs(5),
            ..policy(Backoff::Constant)
        };
        assert_eq!(inverted.delay(2, &mut rng), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_half_to_full_delay() {
        let p = RetryPolicy {
            jitter: true,
            ..policy(Backoff::Exponential)
        };
        let mut rng = rng();
        for attempt in 2..=6 {
            let full = policy(Backoff::Exponential).delay(attempt, &mut rng);
            let mut seen = Vec::new();
            for _ in 0..200 {
                let d = p.delay(attempt, &mut rng);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempt}: {d:?} vs {full:?}"
                );
                seen.push(d);
            }
            seen.sort();
            seen.dedup();
            assert!(
                seen.len() > 100,
                "jitter should vary: {} distinct",
                seen.len()
            );
            // Both halves of the range are used.
            assert!(seen.iter().any(|d| *d < full * 3 / 4));
            assert!(seen.iter().any(|d| *d > full * 3 / 4));
        }
    }

    #[test]
    fn jitter_is_repeatable_with_a_seed() {
        let p = RetryPolicy::default();
        let run = || {
            let mut rng = StdRng::seed_from_u64(42);
            (2..10).map(|n| p.delay(n, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn retries_until_exhausted() {
        let p = RetryPolicy {
            max_attempts: 3,
            ..policy(Backoff::Exponential)
        };
        let mut rng = rng();
        let age = Duration::from_secs(1);
        assert_eq!(
            p.decide(1, age, &mut rng),
            RetryDecision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(2, age, &mut rng),
            RetryDecision::RetryAfter(Duration::from_millis(200))
        );
        assert_eq!(p.decide(3, age, &mut rng), RetryDecision::Exhausted);
        assert_eq!(p.decide(u32::MAX, age, &mut rng), RetryDecision::Exhausted);
    }

    #[test]
    fn one_or_zero_attempts_never_retry() {
        let mut rng = rng();
        for max_attempts in [0, 1] {
            let p = RetryPolicy {
                max_attempts,
                ..policy(Backoff::Constant)
            };
            assert_eq!(
                p.decide(1, Duration::ZERO, &mut rng),
                RetryDecision::Exhausted
            );
        }
    }

    #[test]
    fn expires_when_too_old_now_or_by_the_retry() {
        let p = RetryPolicy {
            max_age: Some(Duration::from_secs(10)),
            ..policy(Backoff::Constant)
        };
        let mut rng = rng();
        let decide =
            |age_ms: u64, rng: &mut StdRng| p.decide(1, Duration::from_millis(age_ms), rng);
        assert_eq!(
            decide(9_900, &mut rng),
            RetryDecision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(decide(9_901, &mut rng), RetryDecision::Expired);
        assert_eq!(decide(10_000, &mut rng), RetryDecision::Expired);
        assert_eq!(decide(u64::MAX, &mut rng), RetryDecision::Expired);
        // Exhaustion wins over expiry.
        assert_eq!(
            p.decide(10, Duration::from_secs(3600), &mut rng),
            RetryDecision::Exhausted
        );
        // Without max_age, age never matters.
        let forever = policy(Backoff::Constant);
        assert_eq!(
            forever.decide(1, Duration::MAX, &mut rng),
            RetryDecision::RetryAfter(Duration::from_millis(100))
        );
    }
}
