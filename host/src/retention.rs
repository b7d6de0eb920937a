//! Retention rules of the event log (`[[log.retention]]` in `switchyard.toml`): which
//! events may be deleted, after how long, and which are kept whatever the log's size.
//! Shared by the host config, the embedded log's retention worker
//! (`bus::sqlite::retention`) and the mapping onto a JetStream stream's limits
//! ([`stream_limits`]).
//!
//! Invariants:
//! - The first rule whose `types` match an event's type decides for it. An event no rule
//!   matches has no age limit: it is deleted only to bring the log under
//!   `[log] max_bytes`, oldest first.
//! - No rule lets retention delete an event that a plugin has not settled, or that a dead
//!   letter refers to, unless it says so in words (`delete_unsettled`,
//!   `delete_dead_lettered`).
//! - A rule that keeps its types forever says nothing else: such events are never
//!   deleted, not even to meet `max_bytes`.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use crate::pattern::Pattern;
use crate::units::parse_duration;

/// How long the events of a rule are kept (`max_age`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keep {
    /// No `max_age`: kept until the log needs the room (`[log] max_bytes`), oldest first.
    #[default]
    UntilFull,
    /// `max_age = "7d"`: deleted once older than this (since it was ingested).
    For(Duration),
    /// `max_age = "forever"`: never deleted, not even to meet `max_bytes`.
    Forever,
}

/// One `[[log.retention]]` rule.
///
/// ```toml
/// [[log.retention]]
/// types = ["account.>", "order.>"]   # event sourcing: keep these streams whole
/// max_age = "forever"
///
/// [[log.retention]]
/// types = "metrics.>"
/// max_age = "1h"
/// delete_unsettled = true            # stale samples are useless to a plugin that lags
///
/// [[log.retention]]
/// types = ">"                        # everything else
/// max_age = "7d"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// The event types this rule decides for: one pattern or a list, in subscription
    /// syntax (`"order.*"`, `"payment.>"`, `">"`). Required. Rules are tried in the
    /// order written and the first one that matches an event's type wins.
    #[serde(deserialize_with = "deser::patterns")]
    pub types: Vec<Pattern>,

    /// How long these events are kept after they were ingested: a duration such as
    /// `"7d"` or `"12h"`, or `"forever"` (never deleted, not even to meet
    /// `[log] max_bytes`). Without it there is no age limit and the events are deleted
    /// only when the log is above `max_bytes`, oldest first.
    ///
    /// Default: no age limit.
    #[serde(default, deserialize_with = "deser::keep")]
    pub max_age: Keep,

    /// Also delete these events when a plugin subscribed to them has not settled them
    /// yet (it is behind, paused or failing). Such a plugin never sees them: delivery
    /// becomes at-most-once for what it misses. Not allowed with `max_age = "forever"`.
    ///
    /// Default: `false`.
    #[serde(default)]
    pub delete_unsettled: bool,

    /// Also delete these events when a dead letter refers to them; the dead letters go
    /// with them. Not allowed with `max_age = "forever"`.
    ///
    /// Default: `false`.
    #[serde(default)]
    pub delete_dead_lettered: bool,
}

impl RetentionRule {
    /// Whether this rule decides for `event_type`.
    pub fn matches(&self, event_type: &str) -> bool {
        self.types.iter().any(|p| p.matches(event_type))
    }

    /// What is wrong with the rule as a whole, if anything (the keys parsed already).
    pub fn problem(&self) -> Option<&'static str> {
        if self.types.is_empty() {
            return Some("has an empty `types` list: name at least one pattern");
        }
        if self.max_age == Keep::Forever && (self.delete_unsettled || self.delete_dead_lettered) {
            return Some(
                "keeps its types forever (`max_age = \"forever\"`), so it cannot also \
                 delete them (`delete_unsettled`, `delete_dead_lettered`)",
            );
        }
        None
    }
}

/// The rule that decides for `event_type`: the first that matches.
pub fn rule_for<'a>(rules: &'a [RetentionRule], event_type: &str) -> Option<&'a RetentionRule> {
    rules.iter().find(|rule| rule.matches(event_type))
}

/// The limits of the one JetStream event stream that stand for the retention settings
/// on NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamLimits {
    /// The stream's `max_age`.
    pub max_age: Option<Duration>,
    /// The stream's `max_bytes`.
    pub max_bytes: Option<u64>,
    /// Whether the settings keep some events forever (a rule with
    /// `max_age = "forever"`), so no size limit may be set.
    pub keeps_forever: bool,
    /// Rules that differ by type: each event is stored with its own time to live
    /// ([`message_ttl`]), and the stream's `max_age` is the longest age of a rule, which
    /// ages out what was stored before. Empty when one rule covers every type.
    pub per_type: Vec<RetentionRule>,
    /// Where JetStream will do something else than the embedded log would, in words
    /// for the host's log at start.
    pub warnings: Vec<String>,
}

/// A retention setting that cannot be mapped onto a JetStream stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmappableRule {
    /// The key, dotted (`log.retention[1].types`).
    pub key: String,
    /// Why, and what to write instead.
    pub reason: String,
}

/// Maps `[[log.retention]]` rules and `[log] max_bytes` onto the limits of one JetStream
/// stream, which every event type shares. One rule for every type (`types = ">"`) is the
/// stream's `max_age`; rules that differ by type become each event's own time to live
/// ([`message_ttl`], set when the event is stored, so a rule changed later applies to
/// events stored after it) under the longest of their ages as the stream's. JetStream's
/// limits delete whether or not consumers have acknowledged, so: a `forever` rule beside
/// a size limit is refused (the size limit drops the oldest messages whatever they
/// are); an age or size limit that would delete events plugins have not settled is
/// allowed with a warning unless every rule whose events it may delete says
/// `delete_unsettled = true`. Dead letters are copies in their own stream on NATS, so
/// `delete_dead_lettered` has nothing to map to.
pub fn stream_limits(
    rules: &[RetentionRule],
    max_bytes: Option<u64>,
) -> Result<StreamLimits, UnmappableRule> {
    let mut limits = StreamLimits {
        max_bytes,
        ..StreamLimits::default()
    };
    if let Some(index) = rules.iter().position(|rule| rule.max_age == Keep::Forever)
        && max_bytes.is_some()
    {
        return Err(UnmappableRule {
            key: "log.max_bytes".to_owned(),
            reason: format!(
                "cannot be honoured on NATS beside `log.retention[{index}]`, which keeps its \
                 types forever: JetStream deletes the oldest events at the stream's size \
                 limit whatever keeps them"
            ),
        });
    }
    limits.keeps_forever = rules.iter().any(|rule| rule.max_age == Keep::Forever);
    let ages_apply = rules
        .iter()
        .any(|rule| matches!(rule.max_age, Keep::For(_)));
    // Every rule whose events a limit may delete says that unsettled ones may go.
    let says_unsettled_may_go = !rules.is_empty()
        && rules
            .iter()
            .filter(|rule| match rule.max_age {
                Keep::For(_) => true,
                Keep::UntilFull => max_bytes.is_some(),
                Keep::Forever => false,
            })
            .all(|rule| rule.delete_unsettled);
    match rules {
        [rule] if rule.types.iter().any(|p| p.as_str() == ">") => {
            if let Keep::For(age) = rule.max_age {
                limits.max_age = Some(age);
            }
        }
        [] => {}
        _ => {
            limits.per_type = rules.to_vec();
            limits.max_age = rules
                .iter()
                .filter_map(|rule| match rule.max_age {
                    Keep::For(age) => Some(age),
                    Keep::Forever | Keep::UntilFull => None,
                })
                .max();
        }
    }
    if (ages_apply || limits.max_bytes.is_some()) && !says_unsettled_may_go {
        limits.warnings.push(
            "on NATS the event stream's limits (retention max_age, max_bytes) delete events \
             whether or not every plugin has settled them (JetStream limits retention), \
             where the embedded log keeps unsettled events; a plugin further behind than \
             the limits misses what they delete. Set `delete_unsettled = true` on each \
             `[[log.retention]]` rule whose events a limit may delete to say this is \
             intended"
                .to_owned(),
        );
    }
    Ok(limits)
}

/// The time to live (`Nats-TTL`) an event of `event_type` is stored with on NATS under
/// rules that differ by type (none without them): its rule's age in whole seconds (at
/// least one, the server's least), or `never` when its rule keeps it (forever, or until
/// the size limit) or no rule matches, which exempts it from the stream's `max_age`.
pub fn message_ttl(per_type: &[RetentionRule], event_type: &str) -> Option<String> {
    if per_type.is_empty() {
        return None;
    }
    Some(
        match rule_for(per_type, event_type).map(|rule| rule.max_age) {
            Some(Keep::For(age)) => (age.as_secs_f64().ceil().max(1.0) as u64).to_string(),
            Some(Keep::Forever | Keep::UntilFull) | None => "never".to_owned(),
        },
    )
}

/// serde `deserialize_with` helpers for the rule's keys and `[log]`'s.
pub(crate) mod deser {
    use super::*;

    struct PatternsVisitor;

    fn parse<E: de::Error>(text: &str) -> Result<Pattern, E> {
        Pattern::parse(text).map_err(|e| {
            E::custom(format!(
                "invalid type pattern `{}`: {}; write a pattern such as \"order.*\", \
                 \"payment.>\" or \">\"",
                e.pattern, e.reason
            ))
        })
    }

    impl<'de> Visitor<'de> for PatternsVisitor {
        type Value = Vec<Pattern>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an event-type pattern such as \"order.>\", or a list of them")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<Pattern>, E> {
            parse(v).map(|p| vec![p])
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Pattern>, A::Error> {
            let mut patterns = Vec::new();
            while let Some(text) = seq.next_element::<String>()? {
                patterns.push(parse(&text)?);
            }
            Ok(patterns)
        }
    }

    /// One pattern or a list of them.
    pub(super) fn patterns<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Pattern>, D::Error> {
        d.deserialize_any(PatternsVisitor)
    }

    struct KeepVisitor;

    impl Visitor<'_> for KeepVisitor {
        type Value = Keep;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"7d\" or \"12h\", or \"forever\"")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Keep, E> {
            if v.trim().eq_ignore_ascii_case("forever") {
                return Ok(Keep::Forever);
            }
            parse_duration(v)
                .map(Keep::For)
                .map_err(|e| E::custom(format!("{e}, or \"forever\"")))
        }
    }

    /// A duration or `"forever"`.
    pub(super) fn keep<'de, D: Deserializer<'de>>(d: D) -> Result<Keep, D::Error> {
        d.deserialize_str(KeepVisitor)
    }

    /// A duration, or `"forever"` for `None`.
    pub(crate) fn duration_or_forever<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        match keep(d)? {
            Keep::For(duration) => Ok(Some(duration)),
            Keep::Forever | Keep::UntilFull => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Rules {
        rule: Vec<RetentionRule>,
    }

    fn parse(text: &str) -> Result<Vec<RetentionRule>, String> {
        toml::from_str::<Rules>(text)
            .map(|r| r.rule)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rules_parse_and_the_first_match_wins() {
        let rules = parse(
            "[[rule]]\ntypes = [\"account.>\", \"order.*\"]\nmax_age = \"forever\"\n\
             [[rule]]\ntypes = \"metrics.>\"\nmax_age = \"1h\"\ndelete_unsettled = true\n\
             [[rule]]\ntypes = \">\"\nmax_age = \"7d\"\n[[rule]]\ntypes = \"x.y\"\n",
        )
        .unwrap();
        assert_eq!(rules[0].max_age, Keep::Forever);
        assert_eq!(rules[1].max_age, Keep::For(Duration::from_secs(3600)));
        assert!(rules[1].delete_unsettled && !rules[1].delete_dead_lettered);
        assert_eq!(rules[2].max_age, Keep::For(Duration::from_secs(7 * 86_400)));
        assert_eq!(rules[3].max_age, Keep::UntilFull);
        let decides = |ty: &str| rules.iter().position(|r| Some(r) == rule_for(&rules, ty));
        assert_eq!(decides("account.opened.v2"), Some(0));
        assert_eq!(decides("order.paid"), Some(0));
        assert_eq!(decides("order.paid.late"), Some(2));
        assert_eq!(decides("metrics.cpu"), Some(1));
        assert_eq!(
            decides("x.y"),
            Some(2),
            "an earlier `>` wins over a later rule"
        );
        assert!(rules.iter().all(|r| r.problem().is_none()));
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (text, needle) in [
            ("[[rule]]\nmax_age = \"1h\"\n", "missing field `types`"),
            (
                "[[rule]]\ntypes = \"a..b\"\n",
                "invalid type pattern `a..b`",
            ),
            (
                "[[rule]]\ntypes = [\"a.>.b\"]\n",
                "invalid type pattern `a.>.b`",
            ),
            (
                "[[rule]]\ntypes = \">\"\nmax_age = \"7 days-ish\"\n",
                "or \"forever\"",
            ),
            (
                "[[rule]]\ntypes = \">\"\nmax_age = 7\n",
                "a duration such as",
            ),
            (
                "[[rule]]\ntypes = \">\"\nkeep = \"forever\"\n",
                "unknown field `keep`",
            ),
        ] {
            let message = parse(text).unwrap_err();
            assert!(message.contains(needle), "{text:?}: {message}");
        }
        let rules = parse(
            "[[rule]]\ntypes = \">\"\nmax_age = \"forever\"\ndelete_unsettled = true\n\
             [[rule]]\ntypes = []\n",
        )
        .unwrap();
        assert!(rules[0].problem().unwrap().contains("forever"));
        assert!(rules[1].problem().unwrap().contains("empty"));
    }

    #[test]
    fn nats_takes_one_rule_for_every_type() {
        let rules = parse("[[rule]]\ntypes = \">\"\nmax_age = \"7d\"\n").unwrap();
        let limits = stream_limits(&rules, Some(1 << 30)).unwrap();
        assert_eq!(limits.max_age, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(limits.max_bytes, Some(1 << 30));
        assert_eq!(
            limits.warnings.len(),
            1,
            "limits delete unsettled events on NATS"
        );
        assert!(limits.warnings[0].contains("delete_unsettled"));

        let explicit =
            parse("[[rule]]\ntypes = \">\"\nmax_age = \"1d\"\ndelete_unsettled = true\n").unwrap();
        assert!(stream_limits(&explicit, None).unwrap().warnings.is_empty());
        assert_eq!(stream_limits(&[], None).unwrap(), StreamLimits::default());

        let forever = parse("[[rule]]\ntypes = \">\"\nmax_age = \"forever\"\n").unwrap();
        assert!(stream_limits(&forever, None).unwrap().keeps_forever);
        assert_eq!(
            stream_limits(&forever, Some(1 << 20)).unwrap_err().key,
            "log.max_bytes"
        );
    }

    #[test]
    fn on_nats_rules_that_differ_by_type_become_each_events_time_to_live() {
        let rules = parse(
            "[[rule]]\ntypes = [\"account.>\", \"order.>\"]\nmax_age = \"forever\"\n\
             [[rule]]\ntypes = \"metrics.>\"\nmax_age = \"1500ms\"\ndelete_unsettled = true\n\
             [[rule]]\ntypes = \"audit.>\"\n\
             [[rule]]\ntypes = \">\"\nmax_age = \"7d\"\ndelete_unsettled = true\n",
        )
        .unwrap();
        let limits = stream_limits(&rules, None).unwrap();
        // The events' own ages; the longest ages out what was stored before.
        assert_eq!(limits.max_age, Some(Duration::from_secs(7 * 86_400)));
        assert!(limits.keeps_forever);
        assert_eq!(limits.per_type, rules);
        assert!(limits.warnings.is_empty(), "{:?}", limits.warnings);
        let ttl = |ty| message_ttl(&limits.per_type, ty);
        assert_eq!(ttl("account.opened").as_deref(), Some("never"));
        assert_eq!(
            ttl("metrics.cpu").as_deref(),
            Some("2"),
            "whole seconds, rounded up"
        );
        assert_eq!(
            ttl("audit.login").as_deref(),
            Some("never"),
            "kept until the size limit"
        );
        assert_eq!(ttl("payment.completed"), Some((7 * 86_400).to_string()));
        let unmatched = message_ttl(&limits.per_type[..1], "payment.completed");
        assert_eq!(unmatched.as_deref(), Some("never"), "no rule: no age limit");
        assert_eq!(message_ttl(&[], "payment.completed"), None);

        // A size limit drops the oldest messages whatever keeps them.
        let error = stream_limits(&rules, Some(1 << 30)).unwrap_err();
        assert_eq!(error.key, "log.max_bytes");
        assert!(
            error.reason.contains("log.retention[0]"),
            "{}",
            error.reason
        );

        // An age that would delete unsettled events without saying so is warned about.
        let silent = parse("[[rule]]\ntypes = \"metrics.>\"\nmax_age = \"1h\"\n").unwrap();
        let limits = stream_limits(&silent, None).unwrap();
        assert_eq!(limits.per_type, silent);
        assert_eq!(limits.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(limits.warnings.len(), 1);
    }
}
