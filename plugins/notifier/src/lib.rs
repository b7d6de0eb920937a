//! Example plugin: notifies customers of their tickets.
//!
//! Subscribes to `tickets.generated`. Instead of sending mail it records the notification
//! it would send at KV key `notified/<order_id>` as JSON
//! `{"email": .., "tickets": <count>, "from": <sender>}`. The sender comes from the optional
//! config key `sender` (default `tickets@switchyard.local`). Recording is idempotent: a
//! redelivered event writes the same value again.

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Delivery, Event, HandlerError, config, handler, kv};

/// The sender used when the sidecar does not set `sender`.
const DEFAULT_SENDER: &str = "tickets@switchyard.local";

/// The data of a `tickets.generated` event.
#[derive(Debug, Deserialize)]
struct TicketsGenerated {
    order_id: String,
    email: String,
    tickets: Vec<String>,
}

/// What the plugin records for a notification.
#[derive(Debug, Serialize, PartialEq)]
struct Notification {
    email: String,
    tickets: usize,
    from: String,
}

/// Works out the notification for generated tickets.
fn notification(
    generated: TicketsGenerated,
    from: String,
) -> Result<(String, Notification), HandlerError> {
    if generated.order_id.is_empty() {
        return Err(HandlerError::reject(
            "tickets.generated has an empty order_id",
        ));
    }
    Ok((
        format!("notified/{}", generated.order_id),
        Notification {
            email: generated.email,
            tickets: generated.tickets.len(),
            from,
        },
    ))
}

/// Records the notification for an order's tickets.
#[handler(subscribe = ["tickets.generated"])]
fn handle(event: Event, _delivery: Delivery) -> Result<(), HandlerError> {
    let from = config::get("sender").unwrap_or_else(|| DEFAULT_SENDER.to_owned());
    let (key, sent) = notification(event.json()?, from)?;
    kv::set_json(&key, &sent)?;
    switchyard_sdk::info!("{key}: {} ticket(s) to {}", sent.tickets, sent.email);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_count_and_sender() {
        let generated: TicketsGenerated = serde_json::from_str(
            r#"{"order_id":"o-1","email":"a@b","tickets":["o-1-1","o-1-2"],"extra":0}"#,
        )
        .unwrap();
        let (key, n) = notification(generated, DEFAULT_SENDER.into()).unwrap();
        assert_eq!(key, "notified/o-1");
        assert_eq!(
            serde_json::to_value(&n).unwrap(),
            serde_json::json!({"email": "a@b", "tickets": 2, "from": "tickets@switchyard.local"})
        );
    }
}
