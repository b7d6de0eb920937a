//! Example plugin: turns completed payments into tickets.
//!
//! Subscribes to `payment.completed` and emits one `tickets.generated` event per order,
//! with `subject` and the `partitionkey` extension set to the order id. Ticket ids are
//! deterministic (`<order_id>-1` … `<order_id>-<quantity>`), and the plugin is idempotent:
//! once it has emitted the tickets of an order it stores them at KV key `order/<order_id>`,
//! and a redelivered payment for that order emits nothing.

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Delivery, Emit, Event, HandlerError, handler, kv};

/// The most tickets one payment may ask for; more is rejected as malformed, because the
/// resulting event would not fit the host's bounds.
const MAX_QUANTITY: u32 = 1000;

/// The data of a `payment.completed` event.
#[derive(Debug, Deserialize)]
struct PaymentCompleted {
    order_id: String,
    #[allow(dead_code)] // part of the shape; the tickets do not depend on it
    amount_cents: i64,
    email: String,
    #[serde(default = "one")]
    quantity: u32,
}

fn one() -> u32 {
    1
}

/// The data of a `tickets.generated` event.
#[derive(Debug, Serialize, PartialEq)]
struct TicketsGenerated {
    order_id: String,
    email: String,
    tickets: Vec<String>,
}

/// Checks a payment and works out its tickets.
fn tickets_for(payment: PaymentCompleted) -> Result<TicketsGenerated, HandlerError> {
    if payment.order_id.is_empty() {
        return Err(HandlerError::reject(
            "payment.completed has an empty order_id",
        ));
    }
    if payment.quantity == 0 || payment.quantity > MAX_QUANTITY {
        return Err(HandlerError::reject(format!(
            "order {}: quantity {} is not between 1 and {MAX_QUANTITY}",
            payment.order_id, payment.quantity
        )));
    }
    let tickets = (1..=payment.quantity)
        .map(|n| format!("{}-{n}", payment.order_id))
        .collect();
    Ok(TicketsGenerated {
        order_id: payment.order_id,
        email: payment.email,
        tickets,
    })
}

/// Emits the tickets of a paid order, once.
#[handler(subscribe = ["payment.completed"])]
fn handle(event: Event, delivery: Delivery) -> Result<(), HandlerError> {
    let generated = tickets_for(event.json()?)?;
    let key = format!("order/{}", generated.order_id);
    if kv::get(&key).is_some() {
        switchyard_sdk::info!(
            "order {} already has tickets; ignoring event {} (attempt {})",
            generated.order_id,
            event.id,
            delivery.attempt
        );
        return Ok(());
    }
    kv::set_json(&key, &generated.tickets)?;
    let id = Emit::new("tickets.generated")
        .subject(generated.order_id.as_str())
        .partition_key(generated.order_id.as_str())
        .json(&generated)?
        .send();
    switchyard_sdk::info!(
        "order {}: {} ticket(s) in event {id}",
        generated.order_id,
        generated.tickets.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment(json: &str) -> PaymentCompleted {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn one_ticket_per_unit() {
        let t = tickets_for(payment(
            r#"{"order_id":"o-7","amount_cents":500,"email":"a@b","quantity":2,"x":1}"#,
        ))
        .unwrap();
        assert_eq!(t.tickets, ["o-7-1", "o-7-2"]);
        assert_eq!(t.email, "a@b");
    }

    #[test]
    fn quantity_defaults_to_one() {
        let t = tickets_for(payment(r#"{"order_id":"o","amount_cents":1,"email":"e"}"#)).unwrap();
        assert_eq!(t.tickets, ["o-1"]);
    }

    #[test]
    fn rejects_bad_orders() {
        for json in [
            r#"{"order_id":"o","amount_cents":1,"email":"e","quantity":0}"#,
            r#"{"order_id":"","amount_cents":1,"email":"e"}"#,
            r#"{"order_id":"o","amount_cents":1,"email":"e","quantity":1001}"#,
        ] {
            let err = tickets_for(payment(json)).unwrap_err();
            assert!(!err.is_retry(), "{json}");
        }
        assert!(
            serde_json::from_str::<PaymentCompleted>(r#"{"amount_cents":1,"email":"e"}"#).is_err()
        );
    }
}
