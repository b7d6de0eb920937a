//! The example plugins of the ticketing flow, run through the runtime with their
//! effects committed to an in-memory KV store as the bus would.

use std::sync::Arc;

use switchyard_host::runtime::PluginSettings;

use crate::support::guests::Guest;
use crate::support::{MemoryKv, delivery, effects, event, failure, load, runtime};

fn payment(order_id: &str, quantity: u32) -> switchyard_host::event::Event {
    event(
        "payment.completed",
        serde_json::json!({
            "order_id": order_id,
            "amount_cents": 4200,
            "email": "fan@example.com",
            "quantity": quantity,
            "currency": "EUR"
        }),
    )
}

#[tokio::test]
async fn a_payment_flows_to_tickets_and_a_notification() {
    let runtime = runtime();
    let ticketing = load(&runtime, Guest::Ticketing, PluginSettings::default()).await;
    let notifier = load(&runtime, Guest::Notifier, PluginSettings::default()).await;
    let kv = Arc::new(MemoryKv::default());

    let paid = payment("o-1", 2);
    let outcome = ticketing.invoke(&paid, delivery(1), kv.clone()).await;
    let ticket_effects = effects(&outcome).clone();
    assert_eq!(ticket_effects.emits.len(), 1);
    let generated = &ticket_effects.emits[0];
    assert_eq!(generated.ty, "tickets.generated");
    assert_eq!(generated.subject.as_deref(), Some("o-1"));
    assert_eq!(generated.extension("partitionkey"), Some("o-1"));
    let data: serde_json::Value = serde_json::from_slice(&generated.data).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"order_id": "o-1", "email": "fan@example.com", "tickets": ["o-1-1", "o-1-2"]})
    );
    kv.commit("ticketing", &ticket_effects);
    assert!(kv.value("ticketing", "order/o-1").is_some());

    let outcome = notifier.invoke(generated, delivery(1), kv.clone()).await;
    kv.commit("notifier", effects(&outcome));
    let notified: serde_json::Value =
        serde_json::from_slice(&kv.value("notifier", "notified/o-1").unwrap()).unwrap();
    assert_eq!(
        notified,
        serde_json::json!({"email": "fan@example.com", "tickets": 2, "from": "tickets@switchyard.local"})
    );
}

#[tokio::test]
async fn ticketing_is_idempotent_on_redelivery() {
    let runtime = runtime();
    let ticketing = load(&runtime, Guest::Ticketing, PluginSettings::default()).await;
    let kv = Arc::new(MemoryKv::default());
    let paid = payment("o-2", 1);
    let first = ticketing.invoke(&paid, delivery(1), kv.clone()).await;
    assert_eq!(effects(&first).emits.len(), 1);
    kv.commit("ticketing", effects(&first));

    let redelivered = ticketing.invoke(&paid, delivery(2), kv.clone()).await;
    assert!(effects(&redelivered).emits.is_empty());
    assert!(effects(&redelivered).kv_writes.is_empty());
}

#[tokio::test]
async fn quantity_defaults_to_one_and_bad_payments_are_rejected() {
    let runtime = runtime();
    let ticketing = load(&runtime, Guest::Ticketing, PluginSettings::default()).await;
    let kv = Arc::new(MemoryKv::default());
    let no_quantity = event(
        "payment.completed",
        serde_json::json!({"order_id": "o-3", "amount_cents": 1, "email": "x@example.com"}),
    );
    let outcome = ticketing
        .invoke(&no_quantity, delivery(1), kv.clone())
        .await;
    let data: serde_json::Value = serde_json::from_slice(&effects(&outcome).emits[0].data).unwrap();
    assert_eq!(data["tickets"], serde_json::json!(["o-3-1"]));

    for bad in [
        serde_json::json!({"amount_cents": 1, "email": "x@example.com"}),
        serde_json::json!("not an object"),
        serde_json::json!({"order_id": "o-4", "amount_cents": 1, "email": "x@example.com", "quantity": 0}),
    ] {
        let outcome = ticketing
            .invoke(
                &event("payment.completed", bad.clone()),
                delivery(1),
                kv.clone(),
            )
            .await;
        assert_eq!(failure(&outcome).0, "reject", "{bad}");
    }
}

#[tokio::test]
async fn the_notifier_rejects_malformed_data_and_reads_its_config() {
    let runtime = runtime();
    let mut settings = PluginSettings::default();
    settings
        .config
        .insert("sender".to_owned(), "box-office@example.com".to_owned());
    let notifier = load(&runtime, Guest::Notifier, settings).await;
    let kv = Arc::new(MemoryKv::default());

    let malformed = event("tickets.generated", serde_json::json!({"order_id": 12}));
    let outcome = notifier.invoke(&malformed, delivery(1), kv.clone()).await;
    let (kind, message) = failure(&outcome);
    assert_eq!(kind, "reject");
    assert!(message.contains("tickets.generated"), "{message}");

    let generated = event(
        "tickets.generated",
        serde_json::json!({"order_id": "o-5", "email": "e@example.com", "tickets": ["o-5-1"]}),
    );
    let outcome = notifier.invoke(&generated, delivery(1), kv.clone()).await;
    kv.commit("notifier", effects(&outcome));
    let notified: serde_json::Value =
        serde_json::from_slice(&kv.value("notifier", "notified/o-5").unwrap()).unwrap();
    assert_eq!(notified["from"], "box-office@example.com");
}

#[tokio::test]
async fn the_audit_trail_counts_every_type() {
    let runtime = runtime();
    let audit = load(&runtime, Guest::AuditTrail, PluginSettings::default()).await;
    assert_eq!(
        audit
            .info()
            .subscriptions
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>(),
        vec![">"]
    );
    let kv = Arc::new(MemoryKv::default());
    let mut last_id = String::new();
    for ty in [
        "payment.completed",
        "tickets.generated",
        "payment.completed",
    ] {
        let e = event(ty, serde_json::json!({}));
        let outcome = audit.invoke(&e, delivery(1), kv.clone()).await;
        kv.commit(audit.name(), effects(&outcome));
        last_id = e.id;
    }
    assert_eq!(
        kv.text(audit.name(), "count/payment.completed").as_deref(),
        Some("2")
    );
    assert_eq!(
        kv.text(audit.name(), "count/tickets.generated").as_deref(),
        Some("1")
    );
    assert_eq!(kv.text(audit.name(), "last-event-id"), Some(last_id));
    assert_eq!(kv.len(audit.name()), 3);
}

#[tokio::test]
async fn plugins_describe_themselves() {
    let runtime = runtime();
    for (guest, name, subscription) in [
        (Guest::AuditTrail, "audit-trail", ">"),
        (Guest::Ticketing, "ticketing", "payment.completed"),
        (Guest::Notifier, "notifier", "tickets.generated"),
    ] {
        let plugin = load(&runtime, guest, PluginSettings::default()).await;
        assert_eq!(plugin.name(), name.replace('-', "_"));
        assert_eq!(plugin.info().name, name);
        assert_eq!(plugin.info().version, "0.1.0");
        assert_eq!(plugin.info().subscriptions[0].as_str(), subscription);
        assert_eq!(plugin.sha256().len(), 64);
    }
}
