//! The schema registry: each event type may have a JSON Schema (draft 2020-12), in
//! numbered versions kept in the bus ([`SchemaStore`]). Ingest checks a producer's event
//! against its type's latest version and the dispatcher checks emitted events before
//! they commit; either way a checked event carries `dataschema` naming the version.
//!
//! Invariants:
//! - Checks never wait on the bus: [`Schemas`] keeps each type's latest version compiled
//!   in memory, follows the bus's changes (every host's) and reads a type again when it
//!   changes.
//! - Validation never touches the network or the disk: a schema whose `$ref` leaves the
//!   document is refused when registered ([`jsonschema`] built offline, without its
//!   HTTP and file resolvers).
//! - A new version is refused while one of the type's latest [`COMPATIBILITY_WINDOW`]
//!   events in the log, or of its events scheduled for later, fails it, unless forced.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;

use crate::bus::{Bus, BusError, ScheduledQuery, StoredSchema};
use crate::event::{Event, is_json_media_type, media_type};

/// How many of a type's most recent events a new version is checked against.
pub const COMPATIBILITY_WINDOW: usize = 1000;

/// Incompatible events a refused version names at most.
const EXAMPLES: usize = 5;

/// Why an event's data does not pass its type's schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The schema version it was checked against.
    pub version: u32,
    /// JSON pointer into the data where it fails (`""` is the whole data).
    pub pointer: String,
    /// The schema keyword that failed (`required`, `minimum`, …), or `json` when the data
    /// is not JSON at all.
    pub rule: String,
    /// The validator's words.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = if self.pointer.is_empty() {
            "the data".to_owned()
        } else {
            format!("data at `{}`", self.pointer)
        };
        write!(
            f,
            "{place} fails rule `{}` of schema `{}` version {}: {}",
            self.rule, self.event_type, self.version, self.message
        )
    }
}

/// Why a schema was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The document is not JSON, not a JSON Schema, or cannot be used offline.
    #[error("{0}")]
    Invalid(String),
    /// Recent events of the type fail the new version.
    #[error(
        "{failing} of the latest {checked} `{event_type}` events (scheduled ones included) fail the new schema"
    )]
    Incompatible {
        /// The type.
        event_type: String,
        /// How many recent events were checked.
        checked: usize,
        /// How many of them fail.
        failing: usize,
        /// The first few that fail, with why.
        refused: Vec<(Refused, Violation)>,
    },
    /// The bus failed, or another registration of the type won the race.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A version compiled for checking.
struct Compiled {
    version: u32,
    validator: jsonschema::Validator,
}

/// Compiles a schema document, or says in words why it cannot be used.
fn compile(text: &str) -> Result<jsonschema::Validator, String> {
    let document: Value =
        serde_json::from_str(text).map_err(|e| format!("the schema is not JSON: {e}"))?;
    if !matches!(document, Value::Object(_) | Value::Bool(_)) {
        return Err("the schema is not a JSON Schema: it must be an object or a boolean".into());
    }
    if let Err(error) = jsonschema::draft202012::meta::validate(&document) {
        return Err(format!(
            "the schema is not a valid JSON Schema (draft 2020-12): at `{}`: {error}",
            error.instance_path()
        ));
    }
    jsonschema::draft202012::options()
        .offline()
        .build(&document)
        .map_err(|e| format!("the schema cannot be used: {e} (references must stay inside the document; nothing is fetched)"))
}

/// The registry: the bus's schemas, their latest versions compiled.
pub struct Schemas {
    bus: Arc<dyn Bus>,
    latest: RwLock<HashMap<String, Arc<Compiled>>>,
    base_url: RwLock<String>,
}

impl fmt::Debug for Schemas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schemas").finish_non_exhaustive()
    }
}

impl Schemas {
    /// A registry that knows no schema yet; [`Schemas::start`] loads and follows the
    /// bus's.
    pub fn new(bus: Arc<dyn Bus>) -> Arc<Self> {
        Arc::new(Self {
            bus,
            latest: RwLock::default(),
            base_url: RwLock::new("http://127.0.0.1:8080".to_owned()),
        })
    }

    /// Loads every type's latest schema and follows changes from then on (a task that
    /// ends with the registry).
    pub async fn start(bus: Arc<dyn Bus>) -> Result<Arc<Self>, BusError> {
        let schemas = Self::new(Arc::clone(&bus));
        // Follow first, so a change made while loading is not missed.
        let changes = bus.schema_changes().await?;
        schemas.reload_all().await?;
        tokio::spawn(follow(Arc::downgrade(&schemas), changes));
        Ok(schemas)
    }

    /// Sets the URL `dataschema` values start with (the host's own, as producers reach it).
    pub fn set_base_url(&self, url: &str) {
        *self
            .base_url
            .write()
            .unwrap_or_else(PoisonError::into_inner) = url.trim_end_matches('/').to_owned();
    }

    /// The `dataschema` of events checked against `event_type`'s `version`.
    pub fn uri(&self, event_type: &str, version: u32) -> String {
        let base = self.base_url.read().unwrap_or_else(PoisonError::into_inner);
        format!("{base}/v1/schemas/{event_type}/{version}")
    }

    async fn reload_all(&self) -> Result<(), BusError> {
        let mut compiled = HashMap::new();
        for stored in self.bus.latest_schemas().await? {
            if let Some(checker) = compiled_or_log(&stored) {
                compiled.insert(stored.event_type.clone(), checker);
            }
        }
        *self.latest.write().unwrap_or_else(PoisonError::into_inner) = compiled;
        Ok(())
    }

    async fn reload(&self, event_type: &str) -> Result<(), BusError> {
        let latest = self.bus.schema_versions(event_type).await?.pop();
        self.install(event_type, latest.as_ref().and_then(compiled_or_log));
        Ok(())
    }

    /// Puts a compiled version in place unless a newer one is there already.
    fn install(&self, event_type: &str, checker: Option<Arc<Compiled>>) {
        let mut latest = self.latest.write().unwrap_or_else(PoisonError::into_inner);
        match checker {
            Some(checker) => {
                if latest
                    .get(event_type)
                    .is_none_or(|have| have.version <= checker.version)
                {
                    latest.insert(event_type.to_owned(), checker);
                }
            }
            None => {
                latest.remove(event_type);
            }
        }
    }

    fn checker(&self, event_type: &str) -> Option<Arc<Compiled>> {
        self.latest
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(event_type)
            .cloned()
    }

    /// Checks an event against its type's latest schema, if it has one, and then names
    /// that version in the event's `dataschema`.
    pub fn check(&self, event: &mut Event) -> Result<(), Violation> {
        let Some(checker) = self.checker(&event.ty) else {
            return Ok(());
        };
        violation(&checker, event)?;
        event.dataschema = Some(self.uri(&event.ty, checker.version));
        Ok(())
    }

    /// Registers `text` as the next version of `event_type`'s schema: refused when it is
    /// not a usable schema, or (unless `force`) when one of the type's latest events in
    /// the log fails it. The latest version's document again is that version.
    pub async fn register(
        &self,
        event_type: &str,
        text: String,
        force: bool,
    ) -> Result<Registered, RegisterError> {
        let validator = compile(&text).map_err(RegisterError::Invalid)?;
        let versions = self.bus.schema_versions(event_type).await?;
        let last = versions.last();
        // The latest version sent again (a retried PUT) is that version, not a new one.
        if let Some(last) = last
            && same_document(&last.schema, &text)
        {
            return Ok(Registered {
                schema: last.clone(),
                new: false,
            });
        }
        let latest = last.map_or(0, |s| s.version);
        let candidate = Compiled {
            version: latest + 1,
            validator,
        };
        if !force {
            let recent = self
                .bus
                .recent_events(event_type, COMPATIBILITY_WINDOW)
                .await?;
            // Events scheduled for later enter the log as they are now.
            let scheduled = self
                .bus
                .list_scheduled(ScheduledQuery {
                    event_type: Some(event_type.to_owned()),
                    limit: COMPATIBILITY_WINDOW,
                })
                .await?;
            let candidates = recent
                .into_iter()
                .map(|stored| Refused {
                    sequence: Some(stored.sequence),
                    event: stored.event,
                })
                .chain(scheduled.into_iter().map(|scheduled| Refused {
                    sequence: None,
                    event: scheduled.event,
                }));
            let (mut checked, mut failing, mut refused) = (0, 0, Vec::new());
            for candidate_event in candidates {
                checked += 1;
                if let Err(failed) = violation(&candidate, &candidate_event.event) {
                    failing += 1;
                    if refused.len() < EXAMPLES {
                        refused.push((candidate_event, failed));
                    }
                }
            }
            if failing > 0 {
                return Err(RegisterError::Incompatible {
                    event_type: event_type.to_owned(),
                    checked,
                    failing,
                    refused,
                });
            }
        }
        let stored = self.bus.put_schema(event_type, latest, text).await?;
        self.install(event_type, Some(Arc::new(candidate)));
        Ok(Registered {
            schema: stored,
            new: true,
        })
    }
}

/// An event of the type that a new version would refuse.
#[derive(Debug)]
pub struct Refused {
    /// The event.
    pub event: Event,
    /// Its position in the log; `None` for an event scheduled for later.
    pub sequence: Option<u64>,
}

/// What [`Schemas::register`] did.
#[derive(Debug)]
pub struct Registered {
    /// The version in force for the type.
    pub schema: StoredSchema,
    /// Whether it is a new version (else the document was already the latest one).
    pub new: bool,
}

/// Whether two schema documents are the same JSON value, however they are spaced.
fn same_document(stored: &str, sent: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(stored),
        serde_json::from_str::<serde_json::Value>(sent),
    ) {
        (Ok(stored), Ok(sent)) => stored == sent,
        _ => stored == sent,
    }
}

fn compiled_or_log(stored: &StoredSchema) -> Option<Arc<Compiled>> {
    match compile(&stored.schema) {
        Ok(validator) => Some(Arc::new(Compiled {
            version: stored.version,
            validator,
        })),
        Err(error) => {
            // Registered by a host that accepted it; this one cannot use it.
            tracing::error!(event_type = %stored.event_type, version = stored.version, %error, "cannot use a stored schema");
            None
        }
    }
}

/// The first way `event`'s data fails `checker`, if any. No data (or only whitespace) is
/// checked as `null`; data declared as another media type than JSON fails at once.
fn violation(checker: &Compiled, event: &Event) -> Result<(), Violation> {
    let failed = |pointer: String, rule: String, message: String| Violation {
        event_type: event.ty.clone(),
        version: checker.version,
        pointer,
        rule,
        message,
    };
    if let Some(declared) = event.datacontenttype.as_deref()
        && !is_json_media_type(media_type(declared))
    {
        return Err(failed(
            String::new(),
            "datacontenttype".to_owned(),
            format!("the type's schema checks JSON data; this event's data is `{declared}`"),
        ));
    }
    let data: Value = if event.data.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&event.data).map_err(|e| {
            failed(
                String::new(),
                "json".to_owned(),
                format!("the data is not JSON ({e})"),
            )
        })?
    };
    match checker.validator.iter_errors(&data).next() {
        None => Ok(()),
        Some(error) => {
            let rule = error.kind().keyword().to_owned();
            Err(failed(
                error.instance_path().as_str().to_owned(),
                rule,
                error.to_string(),
            ))
        }
    }
}

/// Follows the bus's schema changes into the registry until it is dropped; when the
/// changes end (the bus lost its connection), reloads everything and follows again.
async fn follow(
    schemas: Weak<Schemas>,
    mut changes: futures_util::stream::BoxStream<'static, String>,
) {
    loop {
        while let Some(event_type) = changes.next().await {
            let Some(schemas) = schemas.upgrade() else {
                return;
            };
            let reloaded = if event_type.is_empty() {
                schemas.reload_all().await
            } else {
                schemas.reload(&event_type).await
            };
            if let Err(error) = reloaded {
                tracing::warn!(%error, "cannot read a changed schema; reading all again soon");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = schemas.reload_all().await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(live) = schemas.upgrade() else {
            return;
        };
        match live.bus.schema_changes().await {
            Ok(again) => {
                changes = again;
                if let Err(error) = live.reload_all().await {
                    tracing::warn!(%error, "cannot read the schemas");
                }
            }
            Err(error) => tracing::warn!(%error, "cannot follow schema changes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> Event {
        Event {
            id: "1".into(),
            source: "/t".into(),
            ty: "order.created".into(),
            subject: None,
            time: None,
            datacontenttype: Some("application/json".into()),
            dataschema: None,
            data: data.as_bytes().to_vec(),
            extensions: Default::default(),
        }
    }

    fn checker(schema: &str) -> Compiled {
        Compiled {
            version: 3,
            validator: compile(schema).unwrap(),
        }
    }

    #[test]
    fn a_violation_names_the_pointer_and_the_rule() {
        let c = checker(
            r#"{"type": "object", "required": ["seats"],
                "properties": {"seats": {"type": "integer", "minimum": 1}}}"#,
        );
        assert_eq!(violation(&c, &event(r#"{"seats": 2}"#)), Ok(()));
        let v = violation(&c, &event(r#"{"seats": 0}"#)).unwrap_err();
        assert_eq!(
            (v.pointer.as_str(), v.rule.as_str(), v.version),
            ("/seats", "minimum", 3)
        );
        let v = violation(&c, &event("{}")).unwrap_err();
        assert_eq!((v.pointer.as_str(), v.rule.as_str()), ("", "required"));
        assert!(
            v.to_string().starts_with("the data fails rule `required`"),
            "{v}"
        );
        let v = violation(&c, &event("not json")).unwrap_err();
        assert_eq!(v.rule, "json");
    }

    #[test]
    fn data_is_checked_as_json_only_and_blank_data_as_null() {
        let null = checker(r#"{"type": "null"}"#);
        assert_eq!(violation(&null, &event("")), Ok(()));
        assert_eq!(violation(&null, &event(" \n")), Ok(()));
        // Text that reads as a number is not taken for one.
        let number = checker(r#"{"type": "integer"}"#);
        let mut text = event("42");
        text.datacontenttype = Some("text/plain; charset=utf-8".into());
        let v = violation(&number, &text).unwrap_err();
        assert_eq!(v.rule, "datacontenttype");
        assert!(v.message.contains("text/plain"), "{v}");
        let mut json = event("42");
        json.datacontenttype = Some("application/cloudevents+json".into());
        assert_eq!(violation(&number, &json), Ok(()));
        // The rule is the keyword that failed, also for a `false` subschema.
        let never = checker(r#"{"properties": {"v": false}}"#);
        let v = violation(&never, &event(r#"{"v": 1}"#)).unwrap_err();
        assert_eq!((v.pointer.as_str(), v.rule.as_str()), ("/v", "falseSchema"));
    }

    #[test]
    fn bad_schemas_are_refused_with_the_reason() {
        let not_json = compile("{").unwrap_err();
        assert!(not_json.contains("not JSON"), "{not_json}");
        let not_schema = compile(r#"{"type": 12}"#).unwrap_err();
        assert!(
            not_schema.contains("not a valid JSON Schema"),
            "{not_schema}"
        );
        let array = compile("[1]").unwrap_err();
        assert!(array.contains("object or a boolean"), "{array}");
        let remote = compile(r#"{"$ref": "https://example.com/order.json"}"#).unwrap_err();
        assert!(remote.contains("cannot be used"), "{remote}");
        assert!(compile(r##"{"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"}"##).is_ok());
    }
}
