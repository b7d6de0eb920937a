//! The memory cap of one plugin instance.
//!
//! Growth past the cap stops the instance with a trap at once (rather than letting
//! `memory.grow` fail, which a Rust guest turns into an abort that looks like any other
//! trap), and the limiter remembers that it fired so the failure is reported as `memory`.

use wasmtime::ResourceLimiter;

/// Most table elements an instance may have; far above what real components use.
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// Caps linear memory growth of one instance at `max_bytes`.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    hit: bool,
}

impl MemoryLimiter {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
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
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes exceeded (asked for {desired})",
                self.max_bytes
            )));
        }
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
