//! Example plugin: keeps an audit trail of every event the host routes.
//!
//! Subscribes to `>` (every event type). For each event it increments a per-type counter at
//! KV key `count/<type>` (a decimal ASCII string such as `b"3"`) and records the event's id
//! at KV key `last-event-id`. Both writes commit only with the acknowledgement, so a
//! redelivered event after a failed attempt is never counted twice.

use switchyard_sdk::{Delivery, Event, HandlerError, handler, kv};

/// The KV key holding the id of the last event seen.
const LAST_EVENT_ID: &str = "last-event-id";

/// The KV key of the counter for events of type `ty`.
fn count_key(ty: &str) -> String {
    format!("count/{ty}")
}

/// Reads a stored counter. A missing key counts as zero; so does a value that is not a
/// decimal count (logged as a warning), so that one bad value cannot block a type forever.
fn parse_count(key: &str, stored: Option<Vec<u8>>) -> u64 {
    let Some(bytes) = stored else { return 0 };
    match std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(n) => n,
        None => {
            switchyard_sdk::warn!(
                "{key} holds {:?}, not a decimal count; starting again from 0",
                String::from_utf8_lossy(&bytes)
            );
            0
        }
    }
}

/// Counts the event and remembers its id.
#[handler(subscribe = [">"])]
fn handle(event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
    let key = count_key(&event.type_);
    let count = parse_count(&key, kv::get(&key)).saturating_add(1);
    kv::set(&key, count.to_string().as_bytes());
    kv::set(LAST_EVENT_ID, event.id.as_bytes());
    switchyard_sdk::debug!("{} #{count}: {}", event.type_, event.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_counts() {
        assert_eq!(count_key("payment.completed"), "count/payment.completed");
        assert_eq!(parse_count("k", None), 0);
        assert_eq!(parse_count("k", Some(b"41".to_vec())), 41);
    }
}
