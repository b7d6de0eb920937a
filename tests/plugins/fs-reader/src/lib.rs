//! Test plugin that tries to read a host file (`/etc/passwd`) on every event.
//!
//! It always rejects: with `read host file` if the read succeeded (a sandbox escape), or
//! with `denied: <error>` if it failed. Because it uses `std::fs`, the component imports
//! `wasi:filesystem`, which a host that grants no filesystem may refuse to load at all.

use switchyard_sdk::{Delivery, Event, HandlerError, handler};

/// Tries to read `/etc/passwd` and reports how it went.
#[handler(subscribe = [">"])]
fn handle(_event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
    match std::fs::read_to_string("/etc/passwd") {
        Ok(_) => Err(HandlerError::reject("read host file")),
        Err(e) => Err(HandlerError::reject(format!("denied: {e}"))),
    }
}
