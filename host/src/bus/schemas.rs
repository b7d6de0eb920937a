//! Where event schemas are kept: every registered version of each event type's JSON
//! Schema, in the bus so that every host sharing it sees the same ones and they survive
//! restarts. Validation and caching are the `schema` module's; this is storage.
//!
//! Invariants: versions of a type are numbered 1, 2, 3 … without gaps, and a version
//! once stored never changes; [`SchemaStore::put_schema`] stores a version only if the
//! type's latest is still the one the caller checked against (compare-and-set), so two
//! hosts registering at once cannot both get the same number.

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};

use super::BusError;

/// One stored version of an event type's schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSchema {
    /// The event type it checks.
    pub event_type: String,
    /// Its version, from 1.
    pub version: u32,
    /// The JSON Schema document, as registered.
    pub schema: String,
    /// When it was registered, in milliseconds since the Unix epoch.
    pub registered_at_ms: i64,
}

/// The bus's schema storage.
#[async_trait]
pub trait SchemaStore: Send + Sync {
    /// Stores `schema` as version `latest + 1` of `event_type` if the type's latest
    /// version is still `latest` (0: none yet); [`BusError::Conflict`] otherwise.
    async fn put_schema(
        &self,
        event_type: &str,
        latest: u32,
        schema: String,
    ) -> Result<StoredSchema, BusError>;

    /// Every version of `event_type`, oldest first (empty when it has none).
    async fn schema_versions(&self, event_type: &str) -> Result<Vec<StoredSchema>, BusError>;

    /// The latest version of every type that has one, by type.
    async fn latest_schemas(&self) -> Result<Vec<StoredSchema>, BusError>;

    /// The types whose schemas change from now on, as they change (on any host). An
    /// empty name means changes were missed: every type should be read again.
    async fn schema_changes(&self) -> Result<BoxStream<'static, String>, BusError>;
}
