//! A misbehaving plugin is contained, reported with its own failure kind and exact
//! message, and the runtime serves the next invocation normally — in both isolation modes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use switchyard_host::runtime::{Isolation, PluginLimits, PluginSettings};

use crate::support::guests::Guest;
use crate::support::{effects, event, failure, invoke, load, runtime};

const MIB: u64 = 1024 * 1024;

struct Case {
    behaviour: &'static str,
    limits: PluginLimits,
    kind: &'static str,
    message: &'static str,
}

fn limits(fuel: u64, memory_bytes: u64, timeout_ms: u64) -> PluginLimits {
    PluginLimits {
        fuel,
        memory_bytes,
        timeout: Duration::from_millis(timeout_ms),
    }
}

fn cases() -> Vec<Case> {
    let generous = limits(u64::MAX / 4, 64 * MIB, 10_000);
    vec![
        Case {
            behaviour: "hostile.loop",
            limits: limits(10_000_000, 64 * MIB, 10_000),
            kind: "fuel",
            message: "fuel budget of 10000000 exhausted",
        },
        Case {
            behaviour: "hostile.loop",
            limits: limits(u64::MAX / 4, 64 * MIB, 200),
            kind: "timeout",
            message: "did not finish within 200ms",
        },
        Case {
            behaviour: "hostile.sleep",
            limits: limits(u64::MAX / 4, 64 * MIB, 200),
            kind: "timeout",
            message: "did not finish within 200ms",
        },
        Case {
            behaviour: "hostile.memory",
            limits: limits(u64::MAX / 4, 16 * MIB, 10_000),
            kind: "memory",
            message: "memory limit of 16777216 bytes exceeded",
        },
        Case {
            behaviour: "hostile.env",
            limits: generous,
            kind: "reject",
            message: "environment is empty",
        },
        Case {
            behaviour: "hostile.retry",
            limits: generous,
            kind: "retry",
            message: "try again later",
        },
        Case {
            behaviour: "hostile.reject",
            limits: generous,
            kind: "reject",
            message: "bad event",
        },
        Case {
            behaviour: "hostile.emit-flood",
            limits: generous,
            kind: "effects",
            message: "emit: more than 100 events emitted in one call",
        },
        Case {
            behaviour: "hostile.emit-huge",
            limits: generous,
            kind: "effects",
            message: "emit: more than 1048576 bytes of events (data, type, subject, content \
                      type and extensions) emitted in one call",
        },
        Case {
            behaviour: "hostile.emit-wide",
            limits: generous,
            kind: "effects",
            message: "emit: more than 1048576 bytes of events (data, type, subject, content \
                      type and extensions) emitted in one call",
        },
        Case {
            behaviour: "hostile.emit-aliased",
            limits: generous,
            kind: "effects",
            message: "a call into the host carried more than 2097152 bytes (the largest emit \
                      or KV value allowed, and 1 MiB for names)",
        },
        Case {
            behaviour: "hostile.kv-huge",
            limits: generous,
            kind: "effects",
            message: "kv-set `big`: value of 1572864 bytes is larger than the limit of 1048576 bytes",
        },
        Case {
            behaviour: "hostile.kv-many",
            limits: generous,
            kind: "effects",
            message: "kv-set: more than 16777216 bytes of KV keys and values written in one call",
        },
        Case {
            behaviour: "hostile.read-many",
            limits: generous,
            kind: "effects",
            message: "kv-get: more than 10000 reads (KV keys, key listings, streams and \
                      scheduled ids), or 4194304 bytes of their names, in one call",
        },
    ]
}

async fn run_cases(isolation: Isolation) {
    let runtime = runtime();
    for case in cases() {
        let settings = PluginSettings {
            limits: case.limits,
            isolation,
            ..PluginSettings::default()
        };
        let plugin = load(&runtime, Guest::Hostile, settings).await;
        let outcome = invoke(&plugin, &event(case.behaviour, serde_json::json!({}))).await;
        assert_eq!(
            failure(&outcome),
            (case.kind, case.message),
            "{} in {isolation:?}",
            case.behaviour
        );
        // The same plugin keeps serving: the next event succeeds with no leftovers.
        let next = invoke(&plugin, &event("hostile.ok", serde_json::json!({}))).await;
        assert_eq!(
            effects(&next),
            &Default::default(),
            "after {}",
            case.behaviour
        );
    }
}

#[tokio::test]
async fn failures_are_contained_per_event() {
    run_cases(Isolation::PerEvent).await;
}

#[tokio::test]
async fn failures_are_contained_with_reuse() {
    run_cases(Isolation::Reuse { max_calls: 1000 }).await;
}

#[tokio::test]
async fn a_panic_is_a_trap_that_carries_the_panic_message() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    let outcome = invoke(&plugin, &event("hostile.panic", serde_json::json!({}))).await;
    let (kind, message) = failure(&outcome);
    assert_eq!(kind, "trap");
    assert!(
        message.starts_with("wasm trap: wasm `unreachable` instruction executed"),
        "{message}"
    );
    assert!(
        message.contains("hostile plugin panicked on purpose"),
        "{message}"
    );
    assert!(!message.contains("RUST_BACKTRACE"), "{message}");
}

#[tokio::test]
async fn a_sleeping_plugin_is_stopped_near_its_timeout() {
    let runtime = runtime();
    let settings = PluginSettings {
        limits: limits(u64::MAX / 4, 64 * MIB, 300),
        ..PluginSettings::default()
    };
    let plugin = load(&runtime, Guest::Hostile, settings).await;
    let outcome = invoke(&plugin, &event("hostile.sleep", serde_json::json!({}))).await;
    assert_eq!(failure(&outcome).0, "timeout");
    // Bounded both ways: it waited for its timeout, and not for the hour it asked for.
    assert!(
        outcome.duration >= Duration::from_millis(300),
        "{:?}",
        outcome.duration
    );
    assert!(
        outcome.duration < Duration::from_secs(30),
        "{:?}",
        outcome.duration
    );
}

#[tokio::test]
async fn fuel_use_is_reported() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    let outcome = invoke(&plugin, &event("hostile.ok", serde_json::json!({}))).await;
    effects(&outcome);
    assert!(outcome.fuel_used > 0);
    assert!(outcome.fuel_used < PluginSettings::default().limits.fuel);
    let outcome = invoke(&plugin, &event("hostile.loop", serde_json::json!({}))).await;
    assert_eq!(failure(&outcome).0, "fuel");
    assert_eq!(outcome.fuel_used, PluginSettings::default().limits.fuel);
}

/// A CPU-bound guest yields its thread: on a single-threaded runtime, another task keeps
/// running while the loop burns its fuel. Without yielding, the ticker could not advance
/// until the call ended.
#[test]
fn a_cpu_bound_guest_yields_its_thread_to_other_tasks() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let runtime = runtime();
        let settings = PluginSettings {
            limits: limits(200_000_000, 64 * MIB, 10_000),
            ..PluginSettings::default()
        };
        let plugin = load(&runtime, Guest::Hostile, settings).await;
        let ticks = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(true));
        let ticker = {
            let ticks = Arc::clone(&ticks);
            let running = Arc::clone(&running);
            tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    ticks.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        let outcome = invoke(&plugin, &event("hostile.loop", serde_json::json!({}))).await;
        running.store(false, Ordering::Relaxed);
        ticker.await.unwrap();
        assert_eq!(failure(&outcome).0, "fuel");
        // 200 million fuel in slices of one million: the ticker ran between them.
        let ticks = ticks.load(Ordering::Relaxed);
        assert!(ticks >= 100, "the ticker ran {ticks} times during the loop");
    });
}

/// Each item of a batch as `kind` (`ok`, a failure kind and its message, or `-` for an
/// item not handled).
fn batch_kinds(outcome: &switchyard_host::runtime::BatchOutcome) -> Vec<String> {
    outcome
        .items
        .iter()
        .map(|item| match item {
            Some(Ok(_)) => "ok".to_owned(),
            Some(Err(failure)) => format!("{}: {}", failure.kind.as_str(), failure.message),
            None => "-".to_owned(),
        })
        .collect()
}

async fn invoke_batch(
    plugin: &switchyard_host::runtime::Plugin,
    events: &[switchyard_host::event::Event],
) -> switchyard_host::runtime::BatchOutcome {
    let items: Vec<_> = events
        .iter()
        .map(|e| (e, crate::support::delivery(1)))
        .collect();
    plugin
        .invoke_batch(&items, Arc::new(switchyard_host::EmptyKv))
        .await
}

async fn invoke_run(
    plugin: &switchyard_host::runtime::Plugin,
    events: &[switchyard_host::event::Event],
    budget: Duration,
) -> switchyard_host::runtime::BatchOutcome {
    let items: Vec<_> = events
        .iter()
        .map(|e| (e, crate::support::delivery(1)))
        .collect();
    plugin
        .invoke_run(&items, Arc::new(switchyard_host::EmptyKv), budget)
        .await
}

fn events_of(types: &[&str]) -> Vec<switchyard_host::event::Event> {
    types
        .iter()
        .map(|ty| event(ty, serde_json::json!({})))
        .collect()
}

/// A reused instance's settings for runs: ample fuel, 64 MiB, a `timeout_ms` per call.
fn reused(timeout_ms: u64) -> PluginSettings {
    PluginSettings {
        limits: limits(u64::MAX / 64, 64 * MIB, timeout_ms),
        isolation: Isolation::Reuse { max_calls: 1000 },
        ..PluginSettings::default()
    }
}

/// A run calls each event alone on one instance: each outcome is its own, a handler's
/// `retry` or `reject` leaves the instance to the next call, and a trap ends the run
/// there: the events after it are not called, and the instance is dropped.
#[tokio::test]
async fn a_run_calls_each_event_alone_until_its_instance_is_unfit() {
    let runtime = runtime();
    let settings = reused(10_000);
    let plugin = load(&runtime, Guest::Hostile, settings).await;
    let types = [
        "hostile.ok",
        "hostile.retry",
        "hostile.reject",
        "hostile.ok",
        "hostile.panic",
        "hostile.ok",
    ];
    let outcome = invoke_run(&plugin, &events_of(&types), Duration::from_secs(10)).await;
    let kinds = batch_kinds(&outcome);
    assert_eq!(
        kinds[..4],
        ["ok", "retry: try again later", "reject: bad event", "ok"]
    );
    assert!(
        kinds[4].starts_with("trap: ") && kinds[4].contains("hostile plugin panicked on purpose"),
        "{}",
        kinds[4]
    );
    assert_eq!(kinds[5], "-");
    let stats = plugin.instance_stats();
    assert_eq!((stats.created, stats.recycled, stats.idle), (1, 1, 0));
    // The next run starts on a fresh instance.
    let outcome = invoke_run(&plugin, &events_of(&["hostile.ok"]), Duration::ZERO).await;
    assert_eq!(batch_kinds(&outcome), ["ok"]);
    assert_eq!(plugin.instance_stats().created, 2);
}

/// A call of a run reads what the acknowledged calls before it wrote, as it would if
/// each were invoked alone after the earlier ones' commits.
#[tokio::test]
async fn a_run_reads_what_its_earlier_calls_wrote() {
    let runtime = runtime();
    let settings = PluginSettings {
        isolation: Isolation::Reuse { max_calls: 1000 },
        ..PluginSettings::default()
    };
    let plugin = load(&runtime, Guest::Hostile, settings).await;
    // The same event three times: each call adds one to the same counter.
    let events = vec![event("hostile.count", serde_json::json!({})); 3];
    let outcome = invoke_run(&plugin, &events, Duration::from_secs(10)).await;
    let totals: Vec<String> = outcome
        .items
        .iter()
        .map(|item| {
            let effects = item
                .as_ref()
                .and_then(|r| r.as_ref().ok())
                .expect("acknowledged");
            let total = effects
                .kv_writes
                .iter()
                .find(|w| w.key.starts_with("total/"))
                .and_then(|w| w.value.clone())
                .expect("a counter written");
            String::from_utf8(total).unwrap()
        })
        .collect();
    assert_eq!(totals, ["1", "2", "3"]);
}

/// A run calls no more than the instance's `max_calls`, and starts no call once its
/// time budget has passed; the events it did not call come back unhandled.
#[tokio::test]
async fn a_run_stops_at_max_calls_and_at_its_budget() {
    let runtime = runtime();
    let settings = PluginSettings {
        isolation: Isolation::Reuse { max_calls: 3 },
        ..PluginSettings::default()
    };
    let plugin = load(&runtime, Guest::Hostile, settings).await;
    let outcome = invoke_run(
        &plugin,
        &events_of(&["hostile.instance-calls"; 5]),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        batch_kinds(&outcome),
        [
            "reject: calls=1",
            "reject: calls=2",
            "reject: calls=3",
            "-",
            "-"
        ]
    );
    assert_eq!(plugin.instance_stats().recycled, 1);
    let outcome = invoke_run(&plugin, &events_of(&["hostile.ok"; 3]), Duration::ZERO).await;
    assert_eq!(batch_kinds(&outcome), ["ok", "-", "-"]);
}

/// A run reports what each of its calls cost on its own: a call that burns a lot of fuel
/// and time between two that burn little is not averaged with them.
#[tokio::test]
async fn a_run_reports_each_calls_own_duration_and_fuel() {
    let runtime = runtime();
    let settings = reused(10_000);
    let plugin = load(&runtime, Guest::Hostile, settings).await;
    let events: Vec<_> = [10_u64, 3_000_000, 10]
        .iter()
        .map(|n| event("hostile.burn", serde_json::json!(n)))
        .collect();
    let outcome = invoke_run(&plugin, &events, Duration::from_secs(10)).await;
    assert_eq!(batch_kinds(&outcome), ["ok", "ok", "ok"]);
    let calls = &outcome.calls;
    assert_eq!(calls.len(), 3, "{calls:?}");
    let fuel: Vec<u64> = calls.iter().map(|call| call.fuel).collect();
    assert!(
        fuel[1] > 1000 * fuel[0] && fuel[1] > 1000 * fuel[2],
        "fuel per call {fuel:?}"
    );
    assert_eq!(fuel.iter().sum::<u64>(), outcome.fuel_used);
    assert!(
        calls[1].duration > calls[0].duration && calls[1].duration > calls[2].duration,
        "{calls:?}"
    );
    let total: Duration = calls.iter().map(|call| call.duration).sum();
    assert!(
        total <= outcome.duration,
        "{total:?} of {:?}",
        outcome.duration
    );
}

/// A call of a run that waits in the host (a guest sleeping) is cut off after its own
/// time, not after the whole run's, and a later call gets its own time too.
#[tokio::test]
async fn a_sleeping_call_of_a_run_is_stopped_after_its_own_time() {
    let runtime = runtime();
    let settings = reused(300);
    let plugin = load(&runtime, Guest::Hostile, settings).await;
    let mut types = vec!["hostile.ok", "hostile.sleep"];
    types.extend(["hostile.ok"; 8]);
    let outcome = invoke_run(&plugin, &events_of(&types), Duration::from_secs(10)).await;
    let kinds = batch_kinds(&outcome);
    assert_eq!(kinds[..2], ["ok", "timeout: did not finish within 300ms"]);
    assert!(kinds[2..].iter().all(|kind| kind == "-"), "{kinds:?}");
    // Cut off at its own deadline, not ten calls' time (3 s).
    assert!(
        outcome.duration < Duration::from_secs(2),
        "the run took {:?}",
        outcome.duration
    );
    // Nor is a later call cut off by an earlier call's deadline: each of these waits
    // 200 ms in the host, within its own 300 ms.
    let slow = PluginSettings {
        config: [("sleep_ms".to_owned(), "200".to_owned())].into(),
        ..reused(300)
    };
    let plugin = load(&runtime, Guest::Hostile, slow).await;
    let outcome = invoke_run(
        &plugin,
        &events_of(&["hostile.ok"; 3]),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(batch_kinds(&outcome), ["ok", "ok", "ok"]);
}

/// A looping item of a batch gets its own time, not the time of all the items: the batch
/// call is not held for the whole batch's worth of timeouts.
#[tokio::test]
async fn a_looping_batch_item_is_stopped_after_its_own_time() {
    let runtime = runtime();
    let settings = PluginSettings {
        limits: limits(u64::MAX / 64, 64 * MIB, 300),
        ..PluginSettings::default()
    };
    let plugin = load(&runtime, Guest::Hostile, settings).await;
    let types = ["hostile.ok", "hostile.ok", "hostile.loop", "hostile.ok"];
    let events: Vec<_> = types
        .iter()
        .map(|ty| event(ty, serde_json::json!({})))
        .collect();
    let outcome = invoke_batch(&plugin, &events).await;
    assert_eq!(
        batch_kinds(&outcome),
        ["ok", "ok", "timeout: did not finish within 300ms", "-"]
    );
}

/// A batch call that fails before its first item (its events do not fit the memory cap
/// when copied in) charges no item: none ran, so each runs again alone, where it is
/// judged by itself. A `reuse` instance that failed is not kept: the next call runs on a
/// fresh one.
#[tokio::test]
async fn a_batch_that_fails_between_items_is_reported_and_its_instance_dropped() {
    let runtime = runtime();
    let settings = PluginSettings {
        limits: limits(u64::MAX / 64, 4 * MIB, 10_000),
        isolation: Isolation::Reuse { max_calls: 1000 },
        ..PluginSettings::default()
    };
    let plugin = load(&runtime, Guest::Hostile, settings).await;
    let big = serde_json::json!({ "padding": "x".repeat(MIB as usize) });
    let events: Vec<_> = (0..6).map(|_| event("hostile.ok", big.clone())).collect();
    let outcome = invoke_batch(&plugin, &events).await;
    assert_eq!(batch_kinds(&outcome), ["-", "-", "-", "-", "-", "-"]);
    let next = invoke(
        &plugin,
        &event("hostile.instance-calls", serde_json::json!({})),
    )
    .await;
    assert_eq!(failure(&next), ("reject", "calls=1"));
}

/// Each item of a batch gets the plugin's whole fuel budget, as it would alone: items that
/// each fit the budget all succeed, however many share the call, and the call's fuel is
/// what they burned together.
#[tokio::test]
async fn each_batch_item_gets_the_whole_fuel_budget() {
    let runtime = runtime();
    let burn = |n: u64| event("hostile.burn", serde_json::json!(n));
    // What one item burning `n` costs alone, to set a budget it fits in twice but not
    // three times.
    let probe = load(
        &runtime,
        Guest::Hostile,
        PluginSettings {
            limits: limits(u64::MAX / 64, 64 * MIB, 10_000),
            ..PluginSettings::default()
        },
    )
    .await;
    let alone = crate::support::invoke(&probe, &burn(2_000_000)).await;
    assert!(alone.result.is_ok(), "{:?}", alone.result);
    let budget = alone.fuel_used * 5 / 2;
    let plugin = load(
        &runtime,
        Guest::Hostile,
        PluginSettings {
            limits: limits(budget, 64 * MIB, 10_000),
            ..PluginSettings::default()
        },
    )
    .await;
    let events: Vec<_> = (0..4).map(|_| burn(2_000_000)).collect();
    let outcome = invoke_batch(&plugin, &events).await;
    assert_eq!(batch_kinds(&outcome), ["ok", "ok", "ok", "ok"]);
    assert!(
        outcome.fuel_used > budget * 3 / 2,
        "the call burned {} for four items of about {}",
        outcome.fuel_used,
        alone.fuel_used
    );
    // An item over the budget alone fails by itself, and the items around it stand.
    let events = [burn(2_000_000), burn(10_000_000), burn(2_000_000)];
    let outcome = invoke_batch(&plugin, &events).await;
    assert_eq!(
        batch_kinds(&outcome),
        [
            "ok".to_owned(),
            format!("fuel: fuel budget of {budget} exhausted"),
            "-".to_owned()
        ]
    );
}

/// A plugin may set an emitted event's `traceparent` (to continue a trace of its own
/// choosing), but only to a context that ingest would accept: anything else fails the
/// call as an effects error instead of starting an unrelated trace downstream.
#[tokio::test]
async fn an_emitted_traceparent_must_be_a_trace_context() {
    let runtime = runtime();
    let plugin = load(&runtime, Guest::Hostile, PluginSettings::default()).await;
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let kept = invoke(
        &plugin,
        &event("hostile.emit-traceparent", serde_json::json!(valid)),
    )
    .await;
    let emitted = &effects(&kept).emits;
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].extension("traceparent"), Some(valid));
    for invalid in [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    ] {
        let refused = invoke(
            &plugin,
            &event("hostile.emit-traceparent", serde_json::json!(invalid)),
        )
        .await;
        let (kind, message) = failure(&refused);
        assert_eq!(kind, "effects", "{invalid}: {message}");
        assert!(message.contains("not a W3C trace context"), "{message}");
    }
}

/// What a plugin's WASI calls make (timers, streams) lives in the host's memory, outside
/// the plugin's memory cap: an instance holds at most 10,000 such handles at once. One
/// that keeps making them is stopped, as for memory, and the plugin goes on serving; one
/// that holds a few thousand is served.
#[tokio::test]
async fn a_plugin_cannot_fill_the_host_with_wasi_resources() {
    let runtime = runtime();
    for isolation in [Isolation::PerEvent, Isolation::Reuse { max_calls: 1000 }] {
        let settings = PluginSettings {
            isolation,
            ..PluginSettings::default()
        };
        let plugin = load(&runtime, Guest::Hostile, settings).await;
        let many = event("hostile.wasi-resources", serde_json::json!(20_000));
        assert_eq!(
            failure(&invoke(&plugin, &many).await),
            (
                "memory",
                "more than 10000 handles (WASI timers, streams and other resources) held at once"
            ),
            "{isolation:?}"
        );
        let some = event("hostile.wasi-resources", serde_json::json!(5_000));
        effects(&invoke(&plugin, &some).await);
    }
}
