//! Instance lifecycle: `per-event` makes a fresh instance every time; `reuse` keeps a
//! warm one, recycles it after a trap or limit hit and after `max_calls`, and keeps it
//! after a handler's own `retry`/`reject`. Linear memory starts fresh in every new
//! instance, however its slot was used before.

use std::sync::Arc;

use switchyard_host::EmptyKv;
use switchyard_host::runtime::{InstanceStats, Isolation, PluginSettings};

use crate::support::guests::Guest;
use crate::support::{delivery, effects, event, failure, invoke, load, runtime};

fn reuse(max_calls: u64) -> PluginSettings {
    PluginSettings {
        isolation: Isolation::Reuse { max_calls },
        ..PluginSettings::default()
    }
}

fn ok() -> switchyard_host::event::Event {
    event("hostile.ok", serde_json::json!({}))
}

#[tokio::test]
async fn per_event_makes_a_fresh_instance_for_every_event() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    for _ in 0..3 {
        effects(&invoke(&plugin, &ok()).await);
    }
    assert_eq!(
        plugin.instance_stats(),
        InstanceStats {
            created: 3,
            recycled: 0,
            idle: 0
        }
    );
}

/// The calls the instance that handled `outcome` had handled, as `hostile.instance-calls`
/// reports them.
fn instance_calls(outcome: &switchyard_host::runtime::Outcome) -> String {
    let (kind, message) = failure(outcome);
    assert_eq!(kind, "reject", "{message}");
    message.to_owned()
}

#[tokio::test]
async fn a_per_event_instance_sees_nothing_its_predecessors_left_in_memory() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    let calls = event("hostile.instance-calls", serde_json::json!({}));
    // Instance slots are reused: small writes are reset in place, a memory hoarder's
    // whole memory is given back; neither may show through to the next instance.
    for between in ["hostile.ok", "hostile.memory", "hostile.ok"] {
        assert_eq!(instance_calls(&invoke(&plugin, &calls).await), "calls=1");
        invoke(&plugin, &event(between, serde_json::json!({}))).await;
    }
    assert_eq!(instance_calls(&invoke(&plugin, &calls).await), "calls=1");
}

#[tokio::test]
async fn a_reused_instance_keeps_its_memory_between_calls() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, reuse(1000)).await;
    let calls = event("hostile.instance-calls", serde_json::json!({}));
    for n in 1..=3 {
        assert_eq!(
            instance_calls(&invoke(&plugin, &calls).await),
            format!("calls={n}")
        );
    }
}

#[tokio::test]
async fn a_reused_instance_is_recycled_after_a_trap() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, reuse(1000)).await;
    effects(&invoke(&plugin, &ok()).await);
    effects(&invoke(&plugin, &ok()).await);
    assert_eq!(
        plugin.instance_stats().created,
        1,
        "the warm instance served both"
    );

    let trapped = invoke(&plugin, &event("hostile.panic", serde_json::json!({}))).await;
    assert_eq!(failure(&trapped).0, "trap");
    let stats = plugin.instance_stats();
    assert_eq!(
        (stats.recycled, stats.idle),
        (1, 0),
        "the trapped instance is gone"
    );

    effects(&invoke(&plugin, &ok()).await);
    assert_eq!(
        plugin.instance_stats().created,
        2,
        "a fresh instance took over"
    );
}

#[tokio::test]
async fn limit_hits_recycle_but_handler_errors_do_not() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, reuse(1000)).await;
    for ty in ["hostile.retry", "hostile.reject"] {
        invoke(&plugin, &event(ty, serde_json::json!({}))).await;
    }
    assert_eq!(plugin.instance_stats().created, 1);
    assert_eq!(plugin.instance_stats().recycled, 0);

    let flood = invoke(&plugin, &event("hostile.emit-flood", serde_json::json!({}))).await;
    assert_eq!(failure(&flood).0, "effects");
    assert_eq!(plugin.instance_stats().recycled, 1);
}

#[tokio::test]
async fn a_reused_instance_is_recycled_after_max_calls() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, reuse(3)).await;
    for _ in 0..7 {
        effects(&invoke(&plugin, &ok()).await);
    }
    assert_eq!(
        plugin.instance_stats(),
        InstanceStats {
            created: 3,
            recycled: 2,
            idle: 1
        }
    );
}

#[tokio::test]
async fn concurrent_invocations_get_their_own_instances() {
    let runtime = runtime();
    let plugin = Arc::new(load(&runtime, Guest::Hostile, reuse(1000)).await);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let plugin = Arc::clone(&plugin);
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                let outcome = plugin.invoke(&ok(), delivery(1), Arc::new(EmptyKv)).await;
                effects(&outcome);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = plugin.instance_stats();
    assert!(stats.created >= 1 && stats.created <= 8, "{stats:?}");
    assert_eq!(stats.idle as u64, stats.created);
}
