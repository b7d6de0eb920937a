//! Batch delivery with the real binary, on both backends: a batch with mixed outcomes
//! commits exactly the acknowledged events' effects and runs the others down their own
//! paths, alone (and so does a run of `handle` calls on a reused instance); a batch
//! being filled keeps what it took. (Ordering by key with batches is
//! in `serve_flow.rs`.)

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

/// How the plugin of [`mixed_outcomes_commit_exactly_the_acknowledged_events`] takes
/// events that reach it together.
enum Taken {
    /// Through its batch handler.
    InBatches,
    /// One `handle` call each, in runs on its reused instance.
    InRuns,
}

async fn a_batch_with_mixed_outcomes_commits_exactly_the_acknowledged_events(backend: Backend) {
    mixed_outcomes_commit_exactly_the_acknowledged_events(backend, Taken::InBatches).await;
}

crate::on_both_backends!(a_batch_with_mixed_outcomes_commits_exactly_the_acknowledged_events);

/// The same events taken by the only lane of a reused instance without a batch table:
/// each is its own call, the lane runs the ones ready together on the instance, and a
/// trap ends the run there, leaving the rest for the next.
async fn a_run_with_mixed_outcomes_commits_exactly_the_acknowledged_events(backend: Backend) {
    mixed_outcomes_commit_exactly_the_acknowledged_events(backend, Taken::InRuns).await;
}

crate::on_both_backends!(a_run_with_mixed_outcomes_commits_exactly_the_acknowledged_events);

async fn mixed_outcomes_commit_exactly_the_acknowledged_events(backend: Backend, taken: Taken) {
    let mut host = Host::on(&backend);
    host.config("[bus]\nack_wait = \"2s\"\n");
    let how = match taken {
        Taken::InBatches => "[batch]\nmax_size = 16\nlinger = \"300ms\"\n",
        Taken::InRuns => "instance = \"reuse\"\nmax_calls = 1000\n",
    };
    host.plugin(
        "mixed",
        Guest::Hostile,
        Some(&format!(
            "subscribe = [\"hostile.count\", \"hostile.effects-then-retry\", \"hostile.reject\", \"hostile.effects-then-trap\"]\n\
             concurrency = 1\n\
             {how}\
             [retry]\nmax_attempts = 2\nbackoff = \"constant\"\ninitial = \"100ms\"\njitter = false\n"
        )),
    );
    host.start();
    // One request, so the events reach the plugin together: counting events around a
    // retry, a reject and a trap, each after effects of its own.
    let kinds = [
        ("c1", "hostile.count"),
        ("c2", "hostile.count"),
        ("r", "hostile.effects-then-retry"),
        ("c3", "hostile.count"),
        ("j", "hostile.reject"),
        ("c4", "hostile.count"),
        ("t", "hostile.effects-then-trap"),
        ("c5", "hostile.count"),
        ("c6", "hostile.count"),
    ];
    let batch: Vec<Value> = kinds
        .iter()
        .map(|(id, ty)| json!({"specversion": "1.0", "id": id, "source": "/test", "type": ty, "data": {}}))
        .collect();
    let response = host.send_batch(&Value::Array(batch)).await;
    assert_eq!(response.status(), 202);
    let letters = host
        .wait_for("three dead letters", Duration::from_secs(60), || async {
            let letters = host.get_json("/v1/dlq?plugin=mixed").await;
            let letters = letters["dead_letters"].as_array()?.clone();
            (letters.len() == 3).then_some(letters)
        })
        .await;
    let mut dead: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            (
                l["event"]["id"].as_str().unwrap().to_owned(),
                l["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        [
            ("j".to_owned(), "rejected".to_owned()),
            ("r".to_owned(), "exhausted".to_owned()),
            ("t".to_owned(), "exhausted".to_owned()),
        ]
    );
    host.wait_caught_up("mixed", Duration::from_secs(30)).await;
    // Every counting event's effects once; none of the failed events' effects.
    let log = host.log().await;
    let mut counted: Vec<String> = log
        .iter()
        .filter(|e| e["event"]["type"] == "hostile.counted")
        .map(|e| e["event"]["data"]["id"].as_str().unwrap().to_owned())
        .collect();
    counted.sort();
    assert_eq!(counted, ["c1", "c2", "c3", "c4", "c5", "c6"]);
    assert!(
        log.iter().all(|e| e["event"]["type"] != "hostile.emitted"),
        "a failed event's emit was committed"
    );
    let mut total = 0u64;
    for shard in 0..16 {
        if let Some(value) = host.kv("mixed", &format!("total/{shard}")).await {
            total += value.parse::<u64>().unwrap();
        }
    }
    assert_eq!(total, 6, "the counters hold each acknowledged event once");
    assert_eq!(
        host.kv("mixed", "written").await,
        None,
        "a failed event's KV write was committed"
    );
    let batches = host
        .metric_if_any("switchyard_batch_calls_total{plugin=\"mixed\"}")
        .await;
    let in_batches = host
        .metric_if_any("switchyard_batch_events_total{plugin=\"mixed\"}")
        .await;
    let (batches, in_batches) = (batches.unwrap_or(0.0), in_batches.unwrap_or(0.0));
    match taken {
        // The events went through the batch handler, in fewer calls than events.
        Taken::InBatches => {
            assert!(
                batches >= 1.0 && in_batches >= 9.0 && batches < in_batches,
                "{batches} calls, {in_batches} events"
            );
        }
        // A run is no batch call.
        Taken::InRuns => assert_eq!((batches, in_batches), (0.0, 0.0)),
    }
}

/// Events arriving one by one while the previous batch's settlement is in flight: the
/// batch being filled (waiting out its linger) keeps what it took. Events here arrive
/// faster than a batch lingers, so the next batch is filling when the last one's
/// settlement finishes; one that dropped what it held then would leave events taken and
/// never handled.
async fn events_arriving_while_a_batch_settles_are_all_handled(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "steady",
        Guest::Hostile,
        Some(
            "subscribe = [\"hostile.count\"]\n\
             concurrency = 1\n\
             ordering = \"none\"\n\
             [batch]\nmax_size = 16\nlinger = \"30ms\"\n",
        ),
    );
    host.start();
    const EVENTS: usize = 60;
    for n in 0..EVENTS {
        assert_eq!(
            host.send("hostile.count", &format!("s{n}"), json!({}))
                .await,
            202
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.wait_caught_up("steady", Duration::from_secs(30)).await;
    let counted = host
        .log()
        .await
        .iter()
        .filter(|e| e["event"]["type"] == "hostile.counted")
        .count();
    assert_eq!(counted, EVENTS, "every event handled once");
}

crate::on_both_backends!(events_arriving_while_a_batch_settles_are_all_handled);
