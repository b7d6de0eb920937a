//! The plugin sidecar: `NAME.toml` next to `NAME.wasm`, parsed into a [`Manifest`] and
//! resolved over the host's `[plugin_defaults]` into a [`PluginPolicy`].
//!
//! The sidecar belongs to the operator. It may override the plugin's subscriptions and
//! sets its delivery policy, retry policy, resource limits, effect bounds and the
//! `[config]` values the plugin reads through `config-get`. Limits are the operator's:
//! they come only from this file and the host config, never from the plugin, so a plugin
//! can never raise its own fuel, memory or timeout.
//!
//! Every key is optional; a missing key takes the host's `[plugin_defaults]` value. An
//! unknown key anywhere (a typo) is an error naming it, with the line, as is a value of
//! the wrong type or unit. [`Manifest::resolve`] validates the merged result and names the
//! offending key, so a [`PluginPolicy`] is always valid. A `Manifest` never holds a
//! pattern, duration or size that did not parse.
//!
//! This module also owns the value syntax shared with the host config file: durations
//! are humantime strings (`"200ms"`, `"5s"`, `"24h"`) and sizes are a number of bytes or
//! a string with a unit ([`parse_size`]).
//!
//! ```toml
//! subscribe = ["order.*"]
//! concurrency = 8
//! ordering = "key"
//! start = "earliest"
//! instance = "reuse"
//! max_calls = 10000
//!
//! [retry]
//! max_attempts = 5
//! backoff = "exponential"
//! initial = "200ms"
//! max = "60s"
//! jitter = true
//! max_age = "24h"
//!
//! [limits]
//! fuel = 50_000_000
//! memory = "64MiB"
//! timeout = "5s"
//!
//! [effects]
//! max_emits = 100
//! max_emit_bytes = "1MiB"
//! max_kv_writes = 1000
//! max_kv_value_bytes = "1MiB"
//! max_causation_depth = 16
//!
//! [config]
//! greeting = "hello"
//! threshold = 10
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::config::PluginDefaults;
use crate::dispatch::retry::{Backoff, RetryPolicy};
use crate::pattern::Pattern;
use crate::runtime::{EffectBounds, PluginLimits, PluginSettings};

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
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
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
    /// A fresh instance for every event: nothing leaks from one event to the next.
    #[default]
    PerEvent,
    /// Warm instances serve many events; recycled after a trap or limit hit, and after
    /// `max_calls` calls.
    Reuse,
}

/// A parsed sidecar. Every field is optional: `None` (or an empty table) means "use the
/// host's `[plugin_defaults]`". The doc comment of each field is the reference for its key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Event-type patterns the plugin receives, replacing the subscriptions its
    /// `describe()` returns. `.` separates segments, `*` matches one segment and a final
    /// `>` one or more (`"order.*"`, `"payment.>"`, `">"`). An empty list subscribes to
    /// nothing: the plugin stays loaded but receives no events.
    ///
    /// Default: the plugin's own subscriptions.
    #[serde(default, deserialize_with = "deser::opt_patterns")]
    pub subscribe: Option<Vec<Pattern>>,

    /// Invocations of this plugin in flight at once. At least 1.
    ///
    /// Default: `[plugin_defaults] concurrency` (4).
    pub concurrency: Option<usize>,

    /// `"none"`: events are handled in parallel in any order. `"key"`: events with the same
    /// `partitionkey` extension (or, without one, the same `subject`) are handled one at a
    /// time in log order.
    ///
    /// Default: `[plugin_defaults] ordering` (`"none"`).
    pub ordering: Option<Ordering>,

    /// Where a plugin seen for the first time starts: `"latest"` (only new events) or
    /// `"earliest"` (replay the whole log). Once the plugin has a cursor, it resumes there;
    /// changing this later has no effect.
    ///
    /// Default: `[plugin_defaults] start` (`"latest"`).
    pub start: Option<Start>,

    /// `"per-event"`: a fresh instance for every event. `"reuse"`: warm instances serve many
    /// events (much faster, but a plugin's globals survive between events); an instance is
    /// dropped after any trap or limit hit and after `max_calls` calls.
    ///
    /// Default: `[plugin_defaults] instance` (`"per-event"`).
    pub instance: Option<InstanceMode>,

    /// With `instance = "reuse"`: calls one instance serves before it is recycled. At
    /// least 1. Ignored with `"per-event"`.
    ///
    /// Default: `[plugin_defaults] max_calls` (10000).
    pub max_calls: Option<u64>,

    /// `[retry]`: how failed deliveries are retried.
    #[serde(default)]
    pub retry: RetryTable,

    /// `[limits]`: resources one invocation may use.
    #[serde(default)]
    pub limits: LimitsTable,

    /// `[effects]`: how much one invocation may emit and write.
    #[serde(default)]
    pub effects: EffectsTable,

    /// `[config]`: settings handed to the plugin through `config-get`. Values may be
    /// strings, numbers or booleans and reach the plugin as strings (`10` → `"10"`,
    /// `true` → `"true"`); tables, arrays and dates are refused.
    ///
    /// Default: empty.
    #[serde(default, deserialize_with = "deser::config_values")]
    pub config: BTreeMap<String, String>,
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
    /// Default: 50000000.
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

    /// Total size of the `data` of all events one invocation emits: bytes, or a size such
    /// as `"1MiB"`.
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

    /// Longest chain of follow-up events: an emit from a handler of an event that is
    /// already this many emits away from a producer's event is stopped, and the event is
    /// dead-lettered as a `loop` (a plugin re-emitting what it subscribes to).
    ///
    /// Default: 16.
    pub max_causation_depth: Option<u32>,
}

/// The policy keys a sidecar shares with the host's `[plugin_defaults]` table: everything
/// but `subscribe` and `[config]`. This is also how `[plugin_defaults]` is parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTable {
    /// See [`Manifest::concurrency`].
    pub concurrency: Option<usize>,
    /// See [`Manifest::ordering`].
    pub ordering: Option<Ordering>,
    /// See [`Manifest::start`].
    pub start: Option<Start>,
    /// See [`Manifest::instance`].
    pub instance: Option<InstanceMode>,
    /// See [`Manifest::max_calls`].
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
    /// Limits, isolation mode, effect bounds and `[config]` for the runtime.
    pub settings: PluginSettings,
}

impl Manifest {
    /// Parses a sidecar's text. Errors carry toml's message, which names the key and line.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        toml::from_str(text).map_err(|e| ManifestError::Syntax(e.to_string()))
    }

    /// The policy keys of this sidecar, without `subscribe` and `[config]`.
    pub fn policy_table(&self) -> PolicyTable {
        PolicyTable {
            concurrency: self.concurrency,
            ordering: self.ordering,
            start: self.start,
            instance: self.instance,
            max_calls: self.max_calls,
            retry: self.retry,
            limits: self.limits,
            effects: self.effects,
        }
    }

    /// Merges this sidecar over the host's defaults and validates the result; an error
    /// names the offending key.
    pub fn resolve(self, defaults: &PluginDefaults) -> Result<PluginPolicy, ManifestError> {
        let merged = self.policy_table().apply_to(defaults)?;
        Ok(PluginPolicy {
            subscribe: self.subscribe,
            concurrency: merged.concurrency,
            ordering: merged.ordering,
            start: merged.start,
            retry: merged.retry,
            settings: PluginSettings {
                limits: merged.limits,
                isolation: merged.isolation(),
                bounds: merged.effects,
                config: self.config,
            },
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

/// serde `deserialize_with` helpers for the value syntax of sidecars and the host config.
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

    /// A list of subscription patterns, each validated.
    pub(crate) fn opt_patterns<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<Pattern>>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .iter()
            .map(|text| {
                Pattern::parse(text).map_err(|e| de::Error::custom(format!("`subscribe`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// One `[config]` value, as the string the plugin will read.
    struct ConfigValue(String);

    struct ConfigValueVisitor;

    impl Visitor<'_> for ConfigValueVisitor {
        type Value = ConfigValue;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "a string, number or boolean ([config] values cannot be tables, arrays or dates)",
            )
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<ConfigValue, E> {
            Ok(ConfigValue(v.to_owned()))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<ConfigValue, E> {
            Ok(ConfigValue(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<ConfigValue, E> {
            Ok(ConfigValue(v.to_string()))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<ConfigValue, E> {
            Ok(ConfigValue(v.to_string()))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<ConfigValue, E> {
            Ok(ConfigValue(v.to_string()))
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<ConfigValue, E> {
            Ok(ConfigValue(v.to_string()))
        }
    }

    impl<'de> Deserialize<'de> for ConfigValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(ConfigValueVisitor)
        }
    }

    /// The `[config]` table: scalar values, stored as strings.
    pub(crate) fn config_values<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, String>, D::Error> {
        let values = BTreeMap::<String, ConfigValue>::deserialize(d)?;
        Ok(values.into_iter().map(|(k, v)| (k, v.0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Isolation;

    fn resolve(text: &str) -> Result<PluginPolicy, ManifestError> {
        Manifest::parse(text)?.resolve(&PluginDefaults::default())
    }

    fn syntax_error(text: &str) -> String {
        match Manifest::parse(text) {
            Err(ManifestError::Syntax(message)) => message,
            other => panic!("expected a syntax error for {text:?}, got {other:?}"),
        }
    }

    fn invalid_key(text: &str) -> String {
        match resolve(text) {
            Err(ManifestError::Invalid { key, .. }) => key,
            other => panic!("expected a validation error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn empty_sidecar_takes_the_defaults() {
        let manifest = Manifest::parse("").unwrap();
        assert_eq!(manifest, Manifest::default());
        let policy = manifest.resolve(&PluginDefaults::default()).unwrap();
        assert_eq!(
            policy,
            PluginPolicy {
                subscribe: None,
                concurrency: 4,
                ordering: Ordering::None,
                start: Start::Latest,
                retry: RetryPolicy::default(),
                settings: PluginSettings::default(),
            }
        );
    }

    #[test]
    fn full_sidecar() {
        let policy = resolve(
            r#"
            subscribe = ["order.*", "payment.>"]
            concurrency = 8
            ordering = "key"
            start = "earliest"
            instance = "reuse"
            max_calls = 250

            [retry]
            max_attempts = 7
            backoff = "linear"
            initial = "1s"
            max = "2m"
            jitter = false
            max_age = "1h 30m"

            [limits]
            fuel = 1_000
            memory = "32MiB"
            timeout = "250ms"

            [effects]
            max_emits = 3
            max_emit_bytes = "2KB"
            max_kv_writes = 0
            max_kv_key_bytes = 64
            max_kv_value_bytes = "1 KiB"

            [config]
            greeting = "hello"
            threshold = 10
            ratio = 0.5
            enabled = true
            "#,
        )
        .unwrap();
        let subscribe: Vec<&str> = policy
            .subscribe
            .as_ref()
            .unwrap()
            .iter()
            .map(Pattern::as_str)
            .collect();
        assert_eq!(subscribe, ["order.*", "payment.>"]);
        assert_eq!(policy.concurrency, 8);
        assert_eq!(policy.ordering, Ordering::Key);
        assert_eq!(policy.start, Start::Earliest);
        assert_eq!(
            policy.retry,
            RetryPolicy {
                max_attempts: 7,
                backoff: Backoff::Linear,
                initial: Duration::from_secs(1),
                max: Duration::from_secs(120),
                jitter: false,
                max_age: Some(Duration::from_secs(5400)),
            }
        );
        assert_eq!(
            policy.settings.limits,
            PluginLimits {
                fuel: 1_000,
                memory_bytes: 32 << 20,
                timeout: Duration::from_millis(250),
            }
        );
        assert_eq!(
            policy.settings.isolation,
            Isolation::Reuse { max_calls: 250 }
        );
        assert_eq!(
            policy.settings.bounds,
            EffectBounds {
                max_emits: 3,
                max_emit_bytes: 2000,
                max_kv_writes: 0,
                max_kv_key_bytes: 64,
                max_kv_value_bytes: 1024,
                max_causation_depth: 16,
            }
        );
        let config: Vec<(&str, &str)> = policy
            .settings
            .config
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            config,
            [
                ("enabled", "true"),
                ("greeting", "hello"),
                ("ratio", "0.5"),
                ("threshold", "10"),
            ]
        );
    }

    #[test]
    fn partial_tables_merge_key_by_key_over_the_defaults() {
        let defaults = PluginDefaults {
            max_calls: 77,
            retry: RetryPolicy {
                max_attempts: 9,
                ..RetryPolicy::default()
            },
            ..PluginDefaults::default()
        };
        let policy =
            Manifest::parse("instance = \"reuse\"\n[retry]\njitter = false\n[limits]\nfuel = 5")
                .unwrap()
                .resolve(&defaults)
                .unwrap();
        assert_eq!(
            policy.settings.isolation,
            Isolation::Reuse { max_calls: 77 }
        );
        assert_eq!(policy.retry.max_attempts, 9);
        assert!(!policy.retry.jitter);
        assert_eq!(policy.retry.initial, Duration::from_millis(200));
        assert_eq!(policy.settings.limits.fuel, 5);
        assert_eq!(policy.settings.limits.memory_bytes, 64 << 20);
    }

    #[test]
    fn max_age_none_means_no_limit() {
        let policy = resolve("[retry]\nmax_age = \"none\"").unwrap();
        assert_eq!(policy.retry.max_age, None);
    }

    #[test]
    fn per_event_ignores_max_calls() {
        let policy = resolve("instance = \"per-event\"\nmax_calls = 3").unwrap();
        assert_eq!(policy.settings.isolation, Isolation::PerEvent);
    }

    #[test]
    fn empty_subscribe_is_kept() {
        assert_eq!(resolve("subscribe = []").unwrap().subscribe, Some(vec![]));
    }

    #[test]
    fn unknown_keys_are_named_at_every_level() {
        for (text, key) in [
            ("concurrrency = 3", "concurrrency"),
            ("[retry]\nmax_attempt = 3", "max_attempt"),
            ("[limits]\nfeul = 3", "feul"),
            ("[effects]\nmax_emit = 3", "max_emit"),
            ("[limit]\nfuel = 3", "limit"),
        ] {
            let message = syntax_error(text);
            assert!(message.contains(&format!("`{key}`")), "{text:?}: {message}");
            assert!(message.contains("unknown field"), "{text:?}: {message}");
        }
    }

    #[test]
    fn bad_values_are_refused_with_the_line() {
        for (text, needle) in [
            ("ordering = \"sorted\"", "sorted"),
            ("instance = \"pooled\"", "pooled"),
            ("start = \"now\"", "now"),
            ("concurrency = -1", "concurrency"),
            ("[retry]\nbackoff = \"fibonacci\"", "fibonacci"),
            ("[retry]\ninitial = \"soon\"", "invalid duration `soon`"),
            ("[retry]\ninitial = 200", "a duration string"),
            ("[retry]\nmax_age = \"forever\"", "or \"none\" for no limit"),
            ("[limits]\nmemory = \"64 megs\"", "unknown unit"),
            ("[limits]\nmemory = -5", "a number of bytes"),
            ("[limits]\nmemory = true", "a number of bytes"),
            ("[limits]\ntimeout = \"5\"", "invalid duration `5`"),
            (
                "subscribe = [\"order..x\"]",
                "`subscribe`: invalid subscription pattern",
            ),
            ("subscribe = \"order.*\"", "subscribe"),
            ("[config]\nnested = { a = 1 }", "cannot be tables"),
            ("[config]\nlist = [1, 2]", "cannot be tables"),
            ("[config]\nwhen = 1979-05-27", "cannot be tables"),
        ] {
            let message = syntax_error(text);
            assert!(message.contains(needle), "{text:?}: {message}");
            assert!(
                message.contains("line"),
                "{text:?} should name the line: {message}"
            );
        }
    }

    #[test]
    fn invalid_values_name_the_key() {
        assert_eq!(invalid_key("concurrency = 0"), "concurrency");
        assert_eq!(
            invalid_key("instance = \"reuse\"\nmax_calls = 0"),
            "max_calls"
        );
        assert_eq!(
            invalid_key("[retry]\nmax_attempts = 0"),
            "retry.max_attempts"
        );
        assert_eq!(invalid_key("[limits]\nfuel = 0"), "limits.fuel");
        assert_eq!(invalid_key("[limits]\nmemory = 0"), "limits.memory");
        assert_eq!(invalid_key("[limits]\ntimeout = \"0s\""), "limits.timeout");
        assert_eq!(invalid_key("[retry]\ninitial = \"2m\""), "retry.initial");
        let message = resolve("[retry]\ninitial = \"2s\"\nmax = \"1s\"")
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "`retry.initial` (2s) must not be longer than `max` (1s)"
        );
        assert_eq!(
            resolve("concurrency = 0").unwrap_err().to_string(),
            "`concurrency` must be at least 1"
        );
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("12B", 12),
            ("1KiB", 1024),
            ("64MiB", 64 << 20),
            ("2GiB", 2 << 30),
            ("1TiB", 1 << 40),
            ("1KB", 1000),
            ("5MB", 5_000_000),
            ("3GB", 3_000_000_000),
            ("1TB", 1_000_000_000_000),
            (" 64 mib ", 64 << 20),
            ("10kb", 10_000),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
        }
        for (text, reason) in [
            ("", "whole number"),
            ("MiB", "whole number"),
            ("-1", "whole number"),
            ("1.5GiB", "fractions"),
            ("64M", "unknown unit"),
            ("64 mebibytes", "unknown unit"),
            ("64MiB!", "unknown unit"),
            ("99999999999999999999", "too large"),
            ("16777216TiB", "too large"),
        ] {
            let error = parse_size(text).unwrap_err();
            assert!(error.reason.contains(reason), "{text:?}: {error}");
            assert!(error.to_string().contains(&format!("`{text}`")), "{error}");
        }
    }

    #[test]
    fn sizes_in_toml_accept_integers_and_strings() {
        let m = Manifest::parse("[limits]\nmemory = 65536\n[effects]\nmax_emit_bytes = \"1MiB\"")
            .unwrap();
        assert_eq!(m.limits.memory, Some(65536));
        assert_eq!(m.effects.max_emit_bytes, Some(1 << 20));
    }
}
