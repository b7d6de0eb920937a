//! The memory cap of one plugin instance, and the cap on the handles it holds.
//!
//! The cap holds for all of an instance's linear memories together: a component made of
//! several core modules, each with a memory of its own, gets the cap once, not once per
//! memory. Growth past it stops the instance with a trap at once (rather than letting
//! `memory.grow` fail, which a Rust guest turns into an abort that looks like any other
//! trap), and the limiter remembers that it fired so the failure is reported as `memory`.
//!
//! What a plugin's WASI calls make (timers, streams, their pollables) lives in the host's
//! memory, outside the cap, one entry of the host's resource table and one handle of the
//! instance each: an instance holds at most [`MAX_HANDLES`] of them at once (wasmtime's
//! own default is 100,000 per store, about 30 MB of the host's memory for timers).

use wasmtime::ResourceLimiter;

/// Most table elements an instance may have; far above what real components use.
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// Most handles (WASI resources and other component-model handles) an instance holds
/// at once; a handler keeps a few dozen.
pub(crate) const MAX_HANDLES: usize = 10_000;

/// How wasmtime and its WASI tables say a cap on handles was reached; their error types
/// are private or lose their type on the way, their text does not.
pub(crate) const HANDLES_EXHAUSTED: [&str; 2] = [
    "store handle limit exceeded",
    "resource table has no free keys",
];

/// Caps the linear memories of one instance at `max_bytes` in total.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    /// The sizes of the instance's memories, added up (each memory's creation is a
    /// growth from 0).
    total_bytes: usize,
    hit: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            total_bytes: 0,
            hit: false,
        }
    }

    /// Whether a growth request has been refused since this instance was created.
    pub(crate) fn hit(&self) -> bool {
        self.hit
    }

    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .total_bytes
            .saturating_add(desired.saturating_sub(current));
        if total > self.max_bytes {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes exceeded (asked for {total} in all)",
                self.max_bytes
            )));
        }
        self.total_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_for_all_memories_together() {
        let mut limiter = MemoryLimiter::new(100);
        assert!(limiter.memory_growing(0, 60, None).unwrap());
        assert!(limiter.memory_growing(60, 70, None).unwrap());
        // A second memory of 40 would make 110.
        assert!(limiter.memory_growing(0, 40, None).is_err());
        assert!(limiter.hit());
        assert!(limiter.memory_growing(0, 30, None).unwrap());
    }
}
