//! Effects: what a successful attempt asks the bus to commit with its acknowledgement.
//!
//! The runtime fills an [`Effects`] only for a call that succeeded (a failed attempt's
//! buffered emits and KV writes are dropped inside the runtime); the dispatcher hands it
//! to the bus in the settlement; the bus stores the emits and KV writes and advances the
//! cursor in one transaction, provided the recorded KV reads still hold.

use crate::event::Event;
use crate::kv::{KvRead, KvWrite};

/// Effects a successful invocation asks the host to commit, in the order they were made.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// Follow-up events, complete with id, source, time, causation and correlation ids.
    pub emits: Vec<Event>,
    /// KV writes, the last write to each key winning; `None` deletes the key.
    pub kv_writes: Vec<KvWrite>,
    /// What the call read from the committed KV state. The bus commits the effects only
    /// if these still hold, so concurrent calls of one plugin cannot lose each other's
    /// updates (optimistic concurrency); otherwise the attempt runs again.
    pub kv_reads: Vec<KvRead>,
}
