//! Per-plugin runtime settings: resource limits, isolation mode, effect bounds and the
//! operator's `[config]` table.
//!
//! These are the operator's: nothing a plugin does can raise them. Defaults: 1 G fuel,
//! 64 MiB memory, 5 s timeout, one fresh instance per event. Fuel is the guard against a
//! runaway loop, and the timeout the bound on a call: the default fuel lets ordinary
//! work in an interpreted language finish (decoding 10,000 small JSON objects costs
//! about 130 M fuel in Python and 90 M in JavaScript) and still stops a loop within
//! about half a second of CPU.

use std::collections::BTreeMap;
use std::time::Duration;

/// Resource limits for one invocation of a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginLimits {
    /// Fuel (roughly, WebAssembly instructions) one invocation may burn.
    pub fuel: u64,
    /// Largest linear memory, in bytes, an instance may grow to.
    pub memory_bytes: u64,
    /// Wall-clock time one invocation may take, including time spent waiting in host calls.
    pub timeout: Duration,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            fuel: 1_000_000_000,
            memory_bytes: 64 * 1024 * 1024,
            timeout: Duration::from_secs(5),
        }
    }
}

/// How instances are used across invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// A fresh store and instance for every event: no state leaks between events.
    #[default]
    PerEvent,
    /// Warm instances serve many events. An instance is dropped after any trap or limit
    /// hit, and after `max_calls` invocations.
    Reuse {
        /// Invocations one instance serves before it is recycled.
        max_calls: u64,
    },
}

/// What one invocation may buffer in effects before it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectBounds {
    /// Follow-up events one invocation may emit.
    pub max_emits: usize,
    /// Total bytes of the events one invocation emits: their data, type, subject,
    /// content type and extensions.
    pub max_emit_bytes: usize,
    /// KV writes and deletes one invocation may buffer.
    pub max_kv_writes: usize,
    /// Longest KV key, in bytes.
    pub max_kv_key_bytes: usize,
    /// Largest KV value, in bytes.
    pub max_kv_value_bytes: usize,
    /// Total bytes of the keys and values one invocation writes.
    pub max_kv_bytes: usize,
    /// Longest causation chain: an event emitted while handling an event that is already
    /// this many emits away from a producer's event stops the call as a loop.
    pub max_causation_depth: u32,
}

impl EffectBounds {
    /// Most bytes one call from the plugin into the host may carry (wasmtime's hostcall
    /// fuel): the largest emit or KV value, and room for its names. Without it a guest
    /// could make the host copy one string of its memory a million times in one call
    /// (a list whose entries all point at it).
    pub fn max_hostcall_bytes(&self) -> usize {
        self.max_emit_bytes
            .max(self.max_kv_value_bytes)
            .saturating_add(1024 * 1024)
    }
}

impl Default for EffectBounds {
    fn default() -> Self {
        Self {
            max_emits: 100,
            max_emit_bytes: 1024 * 1024,
            max_kv_writes: 1000,
            max_kv_key_bytes: 512,
            max_kv_value_bytes: 1024 * 1024,
            max_kv_bytes: 16 * 1024 * 1024,
            max_causation_depth: 16,
        }
    }
}

/// Everything the runtime needs to know about one plugin beyond its code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginSettings {
    /// Resource limits per invocation.
    pub limits: PluginLimits,
    /// Instance reuse policy.
    pub isolation: Isolation,
    /// Bounds on buffered effects per invocation.
    pub bounds: EffectBounds,
    /// The `[config]` table of the plugin's sidecar, read through `config-get`.
    pub config: BTreeMap<String, String>,
}
