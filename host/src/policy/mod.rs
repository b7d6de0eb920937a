//! A plugin's delivery policy: the keys a sidecar shares with the host's
//! `[plugin_defaults]` table, their merge ([`PolicyTable::apply_to`]) and the rules a
//! merged policy must follow.
//!
//! Both the sidecar parser ([`crate::plugins`]) and the host config ([`crate::config`])
//! build on this module, and the dispatcher reads the resolved [`PluginPolicy`]; it
//! depends only on the layers below (patterns, units, the runtime's limit types).
//!
//! Invariant: a [`PluginDefaults`] or [`PluginPolicy`] is always valid — every merge goes
//! through [`PolicyTable::apply_to`], which refuses a bad value and names its key as a
//! sidecar would (`retry.max_attempts`).

pub mod batch;
pub mod breaker;
pub mod retry;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::retry::{Backoff, RetryPolicy};
use crate::pattern::Pattern;
use crate::runtime::{EffectBounds, Isolation, PluginLimits, PluginSettings};
use crate::units::deser;

/// Why a sidecar (or the host's `[plugin_defaults]`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not valid TOML, an unknown key, or a value of the wrong type or unit. The message
    /// is toml's: it names the key and shows the line.
    #[error("{0}")]
    Syntax(String),
    /// A value that parsed but is not allowed, alone or with the defaults merged in.
    #[error("`{key}` {reason}")]
    Invalid {
        /// The key, dotted for keys in tables (`retry.max_attempts`).
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
}

impl ManifestError {
    pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Whether deliveries to one plugin keep an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Events are handled in parallel, up to `concurrency`, in no particular order.
    #[default]
    None,
    /// Events with the same key are handled one at a time, in log order; different keys
    /// still run in parallel up to `concurrency`. The key is the event's `partitionkey`
    /// extension, or its `subject` when it has none.
    Key,
}

/// Where a plugin seen for the first time starts reading the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// Only events ingested after the plugin first loads.
    #[default]
    Latest,
    /// The whole log, from its first event.
    Earliest,
}

/// How instances of a plugin are used (the key `instance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// A fresh instance for every call: nothing leaks from one event to the next, except
    /// between the events of one batch (`[batch]`), which share their call's instance.
    #[default]
    PerEvent,
    /// Warm instances serve many events; recycled after a trap or limit hit, and after
    /// `max_calls` calls.
    Reuse,
}

/// `[retry]`: when and how often a failed delivery is retried. Traps, fuel exhaustion,
/// memory-limit hits, timeouts and `retry(...)` errors are retried; `reject(...)` goes
/// straight to the dead letters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryTable {
    /// Attempts in all, counting the first delivery; `1` means never retry. At least 1.
    /// After the last one the event is dead-lettered as `exhausted`.
    ///
    /// Default: 5.
    pub max_attempts: Option<u32>,

    /// The backoff curve: `"constant"` (every retry waits `initial`), `"linear"` (`initial`,
    /// 2×, 3×, …) or `"exponential"` (`initial`, 2×, 4×, 8×, …).
    ///
    /// Default: `"exponential"`.
    pub backoff: Option<Backoff>,

    /// Delay before the first retry, and the unit of the curve. A duration such as
    /// `"200ms"`; at most `max`.
    ///
    /// Default: `"200ms"`.
    #[serde(default, deserialize_with = "deser::opt_duration")]
    pub initial: Option<Duration>,

    /// Longest delay between attempts; the curve stops growing here.
    ///
    /// Default: `"60s"`.
    #[serde(default, deserialize_with = "deser::opt_duration")]
    pub max: Option<Duration>,

    /// Whether each delay is drawn at random between half and all of it, so that events
    /// failing together do not retry together.
    ///
    /// Default: `true`.
    pub jitter: Option<bool>,

    /// Oldest an event may be, counted from ingest, and still be retried; an event that is
    /// older, or would be by the time of its next retry, is dead-lettered as `expired`.
    /// A duration, or `"none"` for no limit.
    ///
    /// Default: `"24h"`.
    #[serde(default, deserialize_with = "deser::opt_max_age")]
    pub max_age: Option<Option<Duration>>,
}

/// `[limits]`: resources one invocation may use. Exceeding any of them stops the
/// invocation, discards its effects and counts as a retryable failure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsTable {
    /// Fuel one invocation may burn (roughly, WebAssembly instructions). At least 1.
    ///
    /// Default: 1000000000.
    pub fuel: Option<u64>,

    /// Largest linear memory an instance may grow to: bytes, or a size such as `"64MiB"`.
    /// More than 0; the host's `[runtime] max_memory` is a ceiling for every plugin.
    ///
    /// Default: `"64MiB"`.
    #[serde(default, deserialize_with = "deser::opt_size")]
    pub memory: Option<u64>,

    /// Wall-clock time one invocation may take, including time in host calls. A duration
    /// such as `"5s"`, more than 0; the resolution is about 10ms.
    ///
    /// Default: `"5s"`.
    #[serde(default, deserialize_with = "deser::opt_duration")]
    pub timeout: Option<Duration>,
}

/// `[effects]`: how much one invocation may buffer in emits and KV writes. Going over
/// stops the invocation like a trap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EffectsTable {
    /// Follow-up events one invocation may emit.
    ///
    /// Default: 100.
    pub max_emits: Option<usize>,

    /// Total size of the events one invocation emits (their data, type, subject, content
    /// type and extensions): bytes, or a size such as `"1MiB"`.
    ///
    /// Default: `"1MiB"`.
    #[serde(default, deserialize_with = "deser::opt_size_usize")]
    pub max_emit_bytes: Option<usize>,

    /// KV writes and deletes one invocation may buffer.
    ///
    /// Default: 1000.
    pub max_kv_writes: Option<usize>,

    /// Longest KV key: bytes, or a size such as `"512B"`.
    ///
    /// Default: 512.
    #[serde(default, deserialize_with = "deser::opt_size_usize")]
    pub max_kv_key_bytes: Option<usize>,

    /// Largest KV value: bytes, or a size such as `"1MiB"`.
    ///
    /// Default: `"1MiB"`.
    #[serde(default, deserialize_with = "deser::opt_size_usize")]
    pub max_kv_value_bytes: Option<usize>,

    /// Total size of the keys and values one invocation writes: bytes, or a size such as
    /// `"16MiB"`.
    ///
    /// Default: `"16MiB"`.
    #[serde(default, deserialize_with = "deser::opt_size_usize")]
    pub max_kv_bytes: Option<usize>,

    /// Longest chain of follow-up events: an emit from a handler of an event that is
    /// already this many emits away from a producer's event is stopped, and the event is
    /// dead-lettered as a `loop` (a plugin re-emitting what it subscribes to).
    ///
    /// Default: 16.
    pub max_causation_depth: Option<u32>,
}

/// The policy keys a sidecar shares with the host's `[plugin_defaults]` table: everything
/// but `subscribe`, `[config]`, `[breaker]` and `[batch]`. This is also how
/// `[plugin_defaults]` is parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTable {
    /// See [`Manifest::concurrency`](crate::plugins::manifest::Manifest::concurrency).
    pub concurrency: Option<usize>,
    /// See [`Manifest::ordering`](crate::plugins::manifest::Manifest::ordering).
    pub ordering: Option<Ordering>,
    /// See [`Manifest::start`](crate::plugins::manifest::Manifest::start).
    pub start: Option<Start>,
    /// See [`Manifest::instance`](crate::plugins::manifest::Manifest::instance).
    pub instance: Option<InstanceMode>,
    /// See [`Manifest::max_calls`](crate::plugins::manifest::Manifest::max_calls).
    pub max_calls: Option<u64>,
    /// See [`RetryTable`].
    #[serde(default)]
    pub retry: RetryTable,
    /// See [`LimitsTable`].
    #[serde(default)]
    pub limits: LimitsTable,
    /// See [`EffectsTable`].
    #[serde(default)]
    pub effects: EffectsTable,
}

/// A plugin's resolved, validated policy: its sidecar over the host's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginPolicy {
    /// Subscriptions from the sidecar; `None` means use what `describe()` returns.
    pub subscribe: Option<Vec<Pattern>>,
    /// Invocations in flight at once; at least 1.
    pub concurrency: usize,
    /// Whether deliveries keep an order per key.
    pub ordering: Ordering,
    /// Where a new plugin starts reading the log.
    pub start: Start,
    /// Retry policy; `max_attempts >= 1` and `initial <= max`.
    pub retry: RetryPolicy,
    /// The circuit breaker, when the sidecar has a `[breaker]` table.
    pub breaker: Option<breaker::BreakerPolicy>,
    /// Batch delivery, when the sidecar has a `[batch]` table.
    pub batch: Option<batch::BatchPolicy>,
    /// Limits, isolation mode, effect bounds and `[config]` for the runtime.
    pub settings: PluginSettings,
}

/// The policy every plugin gets for the keys its sidecar does not set: the resolved
/// `[plugin_defaults]` table. Always valid (checked like a sidecar when parsed).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "PolicyTable")]
pub struct PluginDefaults {
    /// Invocations in flight per plugin; at least 1. Default: 4.
    pub concurrency: usize,
    /// Ordering of deliveries. Default: `"none"`.
    pub ordering: Ordering,
    /// Where a new plugin starts reading the log. Default: `"latest"`.
    pub start: Start,
    /// Instance mode. Default: `"per-event"`.
    pub instance: InstanceMode,
    /// Calls per instance in reuse mode; at least 1. Default: 10000.
    pub max_calls: u64,
    /// `[plugin_defaults.retry]`. Default: [`RetryPolicy::default`].
    pub retry: RetryPolicy,
    /// `[plugin_defaults.limits]`. Default: [`PluginLimits::default`].
    pub limits: PluginLimits,
    /// `[plugin_defaults.effects]`. Default: [`EffectBounds::default`].
    pub effects: EffectBounds,
}

impl PluginDefaults {
    /// The runtime's isolation mode for `instance` and `max_calls`.
    pub fn isolation(&self) -> Isolation {
        match self.instance {
            InstanceMode::PerEvent => Isolation::PerEvent,
            InstanceMode::Reuse => Isolation::Reuse {
                max_calls: self.max_calls,
            },
        }
    }
}

impl Default for PluginDefaults {
    fn default() -> Self {
        Self {
            concurrency: 4,
            ordering: Ordering::None,
            start: Start::Latest,
            instance: InstanceMode::PerEvent,
            max_calls: 10_000,
            retry: RetryPolicy::default(),
            limits: PluginLimits::default(),
            effects: EffectBounds::default(),
        }
    }
}

impl TryFrom<PolicyTable> for PluginDefaults {
    type Error = ManifestError;

    fn try_from(table: PolicyTable) -> Result<Self, ManifestError> {
        table
            .apply_to(&PluginDefaults::default())
            .map_err(|error| match error {
                ManifestError::Invalid { key, reason } => ManifestError::Invalid {
                    key: format!("plugin_defaults.{key}"),
                    reason,
                },
                other => other,
            })
    }
}

impl PolicyTable {
    /// The keys set here over `base`, validated; an error names the offending key.
    pub fn apply_to(&self, base: &PluginDefaults) -> Result<PluginDefaults, ManifestError> {
        let merged = PluginDefaults {
            concurrency: self.concurrency.unwrap_or(base.concurrency),
            ordering: self.ordering.unwrap_or(base.ordering),
            start: self.start.unwrap_or(base.start),
            instance: self.instance.unwrap_or(base.instance),
            max_calls: self.max_calls.unwrap_or(base.max_calls),
            retry: self.retry.apply_to(&base.retry),
            limits: self.limits.apply_to(&base.limits),
            effects: self.effects.apply_to(&base.effects),
        };
        validate(&merged)?;
        Ok(merged)
    }
}

impl RetryTable {
    /// The keys set here over `base`.
    pub fn apply_to(&self, base: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            backoff: self.backoff.unwrap_or(base.backoff),
            initial: self.initial.unwrap_or(base.initial),
            max: self.max.unwrap_or(base.max),
            jitter: self.jitter.unwrap_or(base.jitter),
            max_age: self.max_age.unwrap_or(base.max_age),
        }
    }
}

impl LimitsTable {
    /// The keys set here over `base`.
    pub fn apply_to(&self, base: &PluginLimits) -> PluginLimits {
        PluginLimits {
            fuel: self.fuel.unwrap_or(base.fuel),
            memory_bytes: self.memory.unwrap_or(base.memory_bytes),
            timeout: self.timeout.unwrap_or(base.timeout),
        }
    }
}

impl EffectsTable {
    /// The keys set here over `base`.
    pub fn apply_to(&self, base: &EffectBounds) -> EffectBounds {
        EffectBounds {
            max_emits: self.max_emits.unwrap_or(base.max_emits),
            max_emit_bytes: self.max_emit_bytes.unwrap_or(base.max_emit_bytes),
            max_kv_writes: self.max_kv_writes.unwrap_or(base.max_kv_writes),
            max_kv_key_bytes: self.max_kv_key_bytes.unwrap_or(base.max_kv_key_bytes),
            max_kv_value_bytes: self.max_kv_value_bytes.unwrap_or(base.max_kv_value_bytes),
            max_kv_bytes: self.max_kv_bytes.unwrap_or(base.max_kv_bytes),
            max_causation_depth: self.max_causation_depth.unwrap_or(base.max_causation_depth),
        }
    }
}

/// Checks the rules a merged policy must follow; keys are named as in a sidecar.
fn validate(policy: &PluginDefaults) -> Result<(), ManifestError> {
    let at_least_one = |key: &str, value: u64| {
        if value == 0 {
            Err(ManifestError::invalid(key, "must be at least 1"))
        } else {
            Ok(())
        }
    };
    at_least_one("concurrency", policy.concurrency as u64)?;
    at_least_one("max_calls", policy.max_calls)?;
    at_least_one("retry.max_attempts", u64::from(policy.retry.max_attempts))?;
    at_least_one("limits.fuel", policy.limits.fuel)?;
    if policy.limits.memory_bytes == 0 {
        return Err(ManifestError::invalid(
            "limits.memory",
            "must be more than 0",
        ));
    }
    if policy.limits.timeout.is_zero() {
        return Err(ManifestError::invalid(
            "limits.timeout",
            "must be more than 0",
        ));
    }
    if policy.retry.initial > policy.retry.max {
        return Err(ManifestError::invalid(
            "retry.initial",
            format!(
                "({}) must not be longer than `max` ({})",
                humantime::format_duration(policy.retry.initial),
                humantime::format_duration(policy.retry.max),
            ),
        ));
    }
    Ok(())
}
