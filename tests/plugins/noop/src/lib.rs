//! The trivial plugin: acknowledges every event and does nothing. Benchmarks use it to
//! measure the host's own overhead.

use switchyard_sdk::{Delivery, Event, HandlerError, handler};

/// Acknowledges the event.
#[handler(subscribe = [">"])]
fn handle(_event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
    Ok(())
}
