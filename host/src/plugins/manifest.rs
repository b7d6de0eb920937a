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
//! The keys a sidecar shares with `[plugin_defaults]` (`[retry]`, `[limits]`,
//! `[effects]`, ordering, instance mode) and their merge live in `crate::policy`; sizes
//! and durations are written as `crate::units` parses them (`"64MiB"`, `"200ms"`).
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
//! fuel = 1_000_000_000
//! memory = "64MiB"
//! timeout = "5s"
//!
//! [batch]
//! max_size = 64
//! linger = "1ms"
//!
//! [effects]
//! max_emits = 100
//! max_emit_bytes = "1MiB"
//! max_kv_writes = 1000
//! max_kv_value_bytes = "1MiB"
//! max_kv_bytes = "16MiB"
//! max_causation_depth = 16
//!
//! [config]
//! greeting = "hello"
//! threshold = 10
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::pattern::Pattern;
pub use crate::policy::batch::BatchTable;
pub use crate::policy::breaker::BreakerTable;
pub use crate::policy::{
    EffectsTable, InstanceMode, LimitsTable, ManifestError, Ordering, PluginDefaults, PluginPolicy,
    PolicyTable, RetryTable, Start,
};
use crate::runtime::PluginSettings;

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

    /// `"per-event"`: a fresh instance for every event (with `[batch]`, for every batch:
    /// the events of one batch share it). `"reuse"`: warm instances serve many events
    /// (much faster, but a plugin's globals survive between events); an instance is
    /// dropped after any trap or limit hit and after `max_calls` calls (a batch is one).
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

    /// `[breaker]`: stop delivering to a plugin that keeps failing (see
    /// [`BreakerTable`]).
    ///
    /// Default: no breaker.
    pub breaker: Option<BreakerTable>,

    /// `[batch]`: several events in one call of the plugin's batch handler (see
    /// [`BatchTable`]).
    ///
    /// Default: one event per call.
    pub batch: Option<BatchTable>,

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
        let breaker = self
            .breaker
            .as_ref()
            .map(BreakerTable::resolve)
            .transpose()?;
        let batch = self.batch.as_ref().map(BatchTable::resolve).transpose()?;
        Ok(PluginPolicy {
            subscribe: self.subscribe,
            concurrency: merged.concurrency,
            ordering: merged.ordering,
            start: merged.start,
            retry: merged.retry,
            breaker,
            batch,
            settings: PluginSettings {
                limits: merged.limits,
                isolation: merged.isolation(),
                bounds: merged.effects,
                config: self.config,
            },
        })
    }
}

/// serde `deserialize_with` helpers for the keys only a sidecar has.
mod deser {
    use super::*;

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
    use std::time::Duration;

    use super::*;
    use crate::policy::retry::{Backoff, RetryPolicy};
    use crate::runtime::Isolation;
    use crate::runtime::{EffectBounds, PluginLimits};
    use crate::units::parse_size;

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
                breaker: None,
                batch: None,
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
                max_kv_bytes: 16 << 20,
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
