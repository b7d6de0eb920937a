//! Transactional effects: emits and KV writes are buffered, returned only on success,
//! read back by the call that made them, and dropped when the attempt fails.

use std::sync::Arc;

use switchyard_host::runtime::{Isolation, PluginSettings};

use crate::support::guests::Guest;
use crate::support::{
    BrokenKv, MemoryKv, delivery, effects, event, failure, invoke, load, runtime,
};

#[tokio::test]
async fn a_failed_attempt_leaves_no_effects_behind() {
    let runtime = runtime();
    for isolation in [Isolation::PerEvent, Isolation::Reuse { max_calls: 100 }] {
        let settings = PluginSettings {
            isolation,
            ..PluginSettings::default()
        };
        let plugin = load(&runtime, Guest::Hostile, settings).await;
        for (ty, kind, message) in [
            (
                "hostile.effects-then-retry",
                "retry",
                "failed after effects",
            ),
            ("hostile.effects-then-trap", "trap", "trap after effects"),
        ] {
            let outcome = invoke(&plugin, &event(ty, serde_json::json!({}))).await;
            let (got_kind, got_message) = failure(&outcome);
            assert_eq!(got_kind, kind, "{ty}");
            assert!(got_message.contains(message), "{ty}: {got_message}");
            // The next call on the same plugin (the same warm instance in reuse mode)
            // starts from an empty buffer.
            let next = invoke(&plugin, &event("hostile.ok", serde_json::json!({}))).await;
            assert!(effects(&next).emits.is_empty(), "{ty} in {isolation:?}");
            assert!(effects(&next).kv_writes.is_empty(), "{ty} in {isolation:?}");
        }
    }
}

#[tokio::test]
async fn reads_see_the_calls_own_writes_and_the_last_write_wins() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    let outcome = invoke(
        &plugin,
        &event("hostile.kv-read-own-write", serde_json::json!({})),
    )
    .await;
    let writes = &effects(&outcome).kv_writes;
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].key, "k");
    assert_eq!(writes[0].value.as_deref(), Some(&b"v2"[..]));
}

#[tokio::test]
async fn config_comes_from_the_plugin_settings() {
    let runtime = runtime();
    let mut settings = PluginSettings::default();
    settings
        .config
        .insert("greeting".to_owned(), "hello".to_owned());
    let plugin = load(&runtime, Guest::Hostile, settings).await;
    let outcome = invoke(&plugin, &event("hostile.config", serde_json::json!({}))).await;
    assert_eq!(failure(&outcome), ("reject", "greeting=Some(\"hello\")"));

    let bare = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    let outcome = invoke(&bare, &event("hostile.config", serde_json::json!({}))).await;
    assert_eq!(failure(&outcome), ("reject", "greeting=None"));
}

#[tokio::test]
async fn the_delivery_reaches_the_handler() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    let kv = Arc::new(MemoryKv::default());
    let fail_until = event("hostile.fail-until", serde_json::json!({}));
    for attempt in 1..=2 {
        let outcome = plugin
            .invoke(&fail_until, delivery(attempt), kv.clone())
            .await;
        assert_eq!(
            failure(&outcome),
            ("retry", format!("attempt {attempt} fails").as_str())
        );
    }
    effects(&plugin.invoke(&fail_until, delivery(3), kv).await);
}

/// What a plugin receives is the event exactly as the host holds it, every field, alone
/// and as an item of a batch: present and absent optional fields, an empty string,
/// characters outside ASCII, data that is not UTF-8, and extensions.
#[tokio::test]
async fn a_plugin_receives_every_field_of_the_event() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    let mut full = event("hostile.mirror", serde_json::json!({}));
    full.source = "/tests/größe/日本".to_owned();
    full.subject = Some(String::new());
    full.time = Some("2026-12-07T10:00:00Z".to_owned());
    full.datacontenttype = None;
    full.dataschema = Some("https://example.com/schemas/mirror.json".to_owned());
    full.data = vec![0, 159, 146, 150, 255, b'{'];
    for (name, value) in [("zeta", "last"), ("alpha", ""), ("partitionkey", "kéy-7")] {
        full.extensions.insert(name.to_owned(), value.to_owned());
    }
    let mut bare = event("hostile.mirror", serde_json::json!({"n": 1}));
    bare.datacontenttype = None;
    let delivery = |attempt: u32, sequence: u64| switchyard_host::runtime::Delivery {
        attempt,
        max_attempts: 7,
        sequence,
    };
    let expected = |event: &switchyard_host::event::Event,
                    delivery: switchyard_host::runtime::Delivery| {
        serde_json::json!({
            "id": event.id,
            "source": event.source,
            "type": event.ty,
            "subject": event.subject,
            "time": event.time,
            "datacontenttype": event.datacontenttype,
            "dataschema": event.dataschema,
            "data": event.data,
            "extensions": event.extensions.iter().collect::<Vec<_>>(),
            "attempt": delivery.attempt,
            "max_attempts": delivery.max_attempts,
            "sequence": delivery.sequence,
        })
    };
    let mirrored = |effects: &switchyard_host::Effects| {
        assert_eq!(effects.emits.len(), 1, "{effects:?}");
        serde_json::from_slice::<serde_json::Value>(&effects.emits[0].data)
            .expect("the mirror emits JSON")
    };
    for sent in [&full, &bare] {
        let outcome = plugin
            .invoke(sent, delivery(2, 9), Arc::new(switchyard_host::EmptyKv))
            .await;
        assert_eq!(mirrored(effects(&outcome)), expected(sent, delivery(2, 9)));
    }
    let items = [
        (&full, delivery(3, u64::MAX)),
        (&bare, delivery(1, 1 << 40)),
        (&full, delivery(4, 12)),
    ];
    let outcome = plugin
        .invoke_batch(&items, Arc::new(switchyard_host::EmptyKv))
        .await;
    assert_eq!(outcome.items.len(), 3);
    for ((sent, delivery), item) in items.iter().zip(&outcome.items) {
        let Some(Ok(effects)) = item else {
            panic!("a batch item failed: {item:?}");
        };
        assert_eq!(mirrored(effects), expected(sent, *delivery));
    }
}

#[tokio::test]
async fn emitted_events_carry_causation_correlation_and_stable_ids() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Ticketing, PluginSettings::default()).await;
    let mut payment = event(
        "payment.completed",
        serde_json::json!({"order_id": "o-7", "amount_cents": 500, "email": "a@example.com", "quantity": 1}),
    );
    let first = invoke(&plugin, &payment).await;
    let emitted = &effects(&first).emits[0];
    assert_eq!(emitted.extension("causationid"), Some(payment.id.as_str()));
    assert_eq!(
        emitted.extension("correlationid"),
        Some(payment.id.as_str())
    );
    assert_eq!(emitted.source, "/switchyard/plugins/ticketing");
    assert!(emitted.time.is_some());

    // A retry of the same event emits the same id, so it cannot be published twice.
    let again = invoke(&plugin, &payment).await;
    assert_eq!(effects(&again).emits[0].id, emitted.id);

    // A correlation id already on the event flows through.
    payment
        .extensions
        .insert("correlationid".to_owned(), "flow-1".to_owned());
    let correlated = invoke(&plugin, &payment).await;
    let emitted = &effects(&correlated).emits[0];
    assert_eq!(emitted.extension("correlationid"), Some("flow-1"));
    assert_eq!(emitted.extension("causationid"), Some(payment.id.as_str()));
}

#[tokio::test]
async fn a_schedule_cancelled_in_its_own_call_is_dropped_and_its_id_not_reused() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    let outcome = invoke(
        &plugin,
        &event("hostile.schedule-cancel", serde_json::json!({})),
    )
    .await;
    let effects = effects(&outcome);
    let types: Vec<&str> = effects.emits.iter().map(|e| e.ty.as_str()).collect();
    assert_eq!(types, ["hostile.after-cancel"]);
    assert!(effects.cancels.is_empty(), "nothing stored to cancel");
}

#[tokio::test]
async fn an_unavailable_kv_store_is_a_host_failure() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Ticketing, PluginSettings::default()).await;
    let payment = event(
        "payment.completed",
        serde_json::json!({"order_id": "o-8", "amount_cents": 500, "email": "a@example.com"}),
    );
    let outcome = plugin
        .invoke(&payment, delivery(1), Arc::new(BrokenKv))
        .await;
    assert_eq!(
        failure(&outcome),
        ("host", "kv-get `order/o-8`: store unavailable")
    );
}
