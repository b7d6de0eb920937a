//! Subscription patterns: which event types a plugin receives.
//!
//! A pattern is NATS subject syntax over event types: `.` separates segments, `*`
//! matches exactly one segment and `>` (only as the last segment) matches one or more
//! trailing segments. A [`Pattern`] is always valid once parsed.

use std::fmt;

use crate::event::MAX_EVENT_TYPE_LEN;

/// A parsed subscription pattern such as `order.*` or `payment.>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: String,
}

/// Why a subscription pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subscription pattern `{pattern}`: {reason}")]
pub struct PatternError {
    /// The rejected pattern.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Pattern {
    /// Parses and validates a pattern.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let fail = |reason| PatternError {
            pattern: text.to_owned(),
            reason,
        };
        if text.is_empty() {
            return Err(fail("it is empty"));
        }
        if text.len() > MAX_EVENT_TYPE_LEN {
            return Err(fail("it is longer than 255 bytes"));
        }
        let segments: Vec<&str> = text.split('.').collect();
        let last = segments.len() - 1;
        for (index, segment) in segments.iter().enumerate() {
            match *segment {
                "" => return Err(fail("it has an empty segment")),
                "*" => {}
                ">" if index == last => {}
                ">" => return Err(fail("`>` may only be the last segment")),
                s if s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
                _ => {
                    return Err(fail(
                        "segments may hold only A-Z, a-z, 0-9, `_`, `-`, or be `*` or `>`",
                    ));
                }
            }
        }
        Ok(Self {
            text: text.to_owned(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether an event type matches this pattern.
    pub fn matches(&self, event_type: &str) -> bool {
        let mut types = event_type.split('.');
        for segment in self.text.split('.') {
            match segment {
                ">" => return types.next().is_some(),
                "*" => {
                    if types.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if types.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        types.next().is_none()
    }
}

/// A pattern's segments.
fn segments(pattern: &Pattern) -> Vec<&str> {
    pattern.text.split('.').collect()
}

impl Pattern {
    /// Whether every type this pattern matches is also matched by `wider`.
    pub fn is_covered_by(&self, wider: &Pattern) -> bool {
        let (narrow, wide) = (segments(self), segments(wider));
        for index in 0.. {
            match (wide.get(index), narrow.get(index)) {
                (None, None) => return true,
                (Some(&">"), Some(_)) => return true,
                (Some(&"*"), Some(&segment)) if segment != ">" => {}
                (Some(a), Some(b)) if a == b && *a != ">" => {}
                _ => return false,
            }
        }
        false
    }

    /// Whether some type matches both patterns.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        let (a, b) = (segments(self), segments(other));
        for index in 0.. {
            match (a.get(index), b.get(index)) {
                (None, None) => return true,
                (None, _) | (_, None) => return false,
                (Some(&">"), _) | (_, Some(&">")) => return true,
                (Some(x), Some(y)) if *x == "*" || *y == "*" || x == y => {}
                _ => return false,
            }
        }
        false
    }

    /// The narrowest pattern of this form that covers both: equal segments kept, other
    /// single segments widened to `*`, the rest to `>`.
    fn widened_with(&self, other: &Pattern) -> Pattern {
        let (a, b) = (segments(self), segments(other));
        let mut out: Vec<&str> = Vec::new();
        for index in 0.. {
            match (a.get(index), b.get(index)) {
                (None, None) => break,
                (Some(x), Some(y)) if x == y && *x != ">" => out.push(x),
                (Some(x), Some(y)) if *x != ">" && *y != ">" => out.push("*"),
                _ => {
                    out.push(">");
                    break;
                }
            }
        }
        let widened = Pattern {
            text: out.join("."),
        };
        if self.is_covered_by(&widened) && other.is_covered_by(&widened) {
            widened
        } else {
            Pattern {
                text: ">".to_owned(),
            }
        }
    }
}

/// Patterns that no two of which overlap and that together match at least every type
/// `patterns` match (exactly those when no two of `patterns` partly overlap): duplicates
/// and patterns covered by another are dropped, and two that partly overlap (`a.*.c`,
/// `a.b.*`) are replaced by one that covers both (`a.*.*`). A NATS consumer refuses
/// overlapping filter subjects, so this is what a plugin's consumer filters on.
pub fn disjoint_cover(patterns: &[Pattern]) -> Vec<Pattern> {
    let mut cover: Vec<Pattern> = Vec::new();
    let mut pending: Vec<Pattern> = patterns.to_vec();
    while let Some(pattern) = pending.pop() {
        if cover.iter().any(|kept| pattern.is_covered_by(kept)) {
            continue;
        }
        cover.retain(|kept| !kept.is_covered_by(&pattern));
        match cover.iter().position(|kept| kept.overlaps(&pattern)) {
            Some(index) => {
                let kept = cover.swap_remove(index);
                pending.push(kept.widened_with(&pattern));
            }
            None => cover.push(pattern),
        }
    }
    cover.sort_by(|a, b| a.text.cmp(&b.text));
    cover
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, ty: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(ty)
    }

    #[test]
    fn matching() {
        assert!(matches("order.created", "order.created"));
        assert!(!matches("order.created", "order.created.v2"));
        assert!(matches("order.*", "order.created"));
        assert!(!matches("order.*", "order"));
        assert!(!matches("order.*", "order.created.v2"));
        assert!(matches("payment.>", "payment.completed"));
        assert!(matches("payment.>", "payment.completed.v2"));
        assert!(!matches("payment.>", "payment"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*.created", "order.created"));
    }

    fn parsed(texts: &[&str]) -> Vec<Pattern> {
        texts.iter().map(|t| Pattern::parse(t).unwrap()).collect()
    }

    fn cover(texts: &[&str]) -> Vec<String> {
        disjoint_cover(&parsed(texts))
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect()
    }

    #[test]
    fn covering_and_overlapping() {
        let p = |t| Pattern::parse(t).unwrap();
        assert!(p("order.created").is_covered_by(&p("order.*")));
        assert!(p("order.*").is_covered_by(&p("order.>")));
        assert!(p("order.a.b").is_covered_by(&p(">")));
        assert!(!p("order.>").is_covered_by(&p("order.*")));
        assert!(!p("order").is_covered_by(&p("order.>")));
        assert!(p("a.*.c").overlaps(&p("a.b.*")));
        assert!(p("a.>").overlaps(&p("*.b")));
        assert!(!p("a.b").overlaps(&p("a.b.c")));
        assert!(!p("a").overlaps(&p("a.>")));
        assert!(!p("a.*").overlaps(&p("b.*")));
    }

    #[test]
    fn a_disjoint_cover_drops_what_is_covered_and_widens_partial_overlaps() {
        assert_eq!(cover(&["a.b", "a.*", "a.b"]), ["a.*"]);
        assert_eq!(cover(&["a.b", "c.>", "c.d.e"]), ["a.b", "c.>"]);
        assert_eq!(cover(&["a.*.c", "a.b.*"]), ["a.*.*"]);
        assert_eq!(cover(&["a.*.c", "a.b.>"]), ["a.*.>"]);
        assert_eq!(cover(&["a.b", "a.b.c", "a"]), ["a", "a.b", "a.b.c"]);
        // Whatever the input, the cover has no overlap and matches all the input does.
        let inputs = ["x.*.z", "x.y.*", "*.y.z", "x.>", "q", "q.*", "*.*.*", "w.v"];
        let patterns = parsed(&inputs);
        let result = disjoint_cover(&patterns);
        for (i, a) in result.iter().enumerate() {
            for b in &result[i + 1..] {
                assert!(!a.overlaps(b), "{a} and {b} overlap");
            }
        }
        for pattern in &patterns {
            assert!(result.iter().any(|c| pattern.is_covered_by(c)), "{pattern}");
        }
    }

    #[test]
    fn invalid_patterns() {
        for bad in ["", "a..b", "a.>.b", "a.b c", "a.#", "a."] {
            assert!(Pattern::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
