//! Effects: what a successful attempt asks the bus to commit with its acknowledgement.
//!
//! The runtime fills an [`Effects`] only for a call that succeeded (a failed attempt's
//! buffered emits and KV writes are dropped inside the runtime); the dispatcher hands it
//! to the bus in the settlement; the bus stores the emits and KV writes and advances the
//! cursor in one transaction, provided the recorded KV and stream reads still hold. An
//! emitted event's expected stream version (see [`crate::stream`]) is checked in the same
//! transaction.

use crate::event::Event;
use crate::kv::{KvRead, KvWrite};
use crate::schedule::ScheduledRead;
use crate::stream::StreamRead;

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
    /// The stream versions the call read; like `kv_reads`, they must still hold.
    pub stream_reads: Vec<StreamRead>,
    /// Whether the scheduled events the call looked at were pending; they must still be.
    pub schedule_reads: Vec<ScheduledRead>,
    /// Ids of pending scheduled events the call cancels.
    pub cancels: Vec<String>,
}
