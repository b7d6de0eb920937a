//! Whether a plugin's deliveries may run: an operator's pause and the plugin's circuit
//! breaker, kept in the bus so that every host sharing it obeys the same state.
//!
//! Invariants: a plugin's [`PluginControl`] changes only by compare-and-set on its
//! revision ([`ControlStore::put_control`]), so of two hosts making a transition from the
//! same state (opening the breaker, taking the probe) exactly one succeeds; a plugin
//! never written has the default control (running, breaker closed) at revision 0.

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::{Deserialize, Serialize};

use super::BusError;

/// A plugin's shared delivery state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginControl {
    /// Set while an operator has paused the plugin: nothing is delivered, whatever the
    /// breaker says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<Paused>,
    /// The circuit breaker.
    #[serde(default)]
    pub breaker: Breaker,
}

/// An operator's pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    /// When it began, in milliseconds since the Unix epoch.
    pub since_ms: i64,
    /// What the operator said, if anything.
    pub reason: String,
}

/// A circuit breaker's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Breaker {
    /// Deliveries run.
    #[default]
    Closed,
    /// Nothing runs until `until_ms`, when one delivery may probe.
    Open {
        /// When it opened (this time), in milliseconds since the Unix epoch.
        since_ms: i64,
        /// When the probe may run.
        until_ms: i64,
        /// The cooldown this opening waits, in milliseconds (doubled by a failed probe).
        cooldown_ms: u64,
        /// Why: the failures that opened it, or the failed probe.
        reason: String,
    },
    /// One delivery, on one host, is probing; nothing else runs. A probe not settled by
    /// `until_ms` (its host died) may be taken over by another host.
    Probing {
        /// When the probe began.
        since_ms: i64,
        /// When another host may take the probe over.
        until_ms: i64,
        /// The cooldown of the opening this probe ends.
        cooldown_ms: u64,
        /// Why the breaker opened.
        reason: String,
    },
}

impl Breaker {
    /// `closed`, `open` or `probing`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::Probing { .. } => "probing",
        }
    }
}

impl PluginControl {
    /// Whether deliveries run without asking: not paused, breaker closed.
    pub fn flows(&self) -> bool {
        self.paused.is_none() && self.breaker == Breaker::Closed
    }
}

/// The bus's storage of plugin controls.
#[async_trait]
pub trait ControlStore: Send + Sync {
    /// The plugin's control and its revision (0 and the default when never written).
    async fn control(&self, plugin: &str) -> Result<(PluginControl, u64), BusError>;

    /// Stores `control` if the plugin's revision is still `revision`, returning the new
    /// revision; [`BusError::Conflict`] when another writer came first.
    async fn put_control(
        &self,
        plugin: &str,
        control: &PluginControl,
        revision: u64,
    ) -> Result<u64, BusError>;

    /// The plugins whose controls change from now on, as they change (on any host). An
    /// empty name means changes were missed: every plugin should be read again.
    async fn control_changes(&self) -> Result<BoxStream<'static, String>, BusError>;
}
