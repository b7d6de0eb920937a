//! Durability through restarts of the real binary: after a graceful restart and after
//! SIGKILL mid-stream, every event that got `202` is handled, and cursors resume without
//! redelivering what was committed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::support::guests::Guest;
use crate::support::host::Host;

const COUNTER: &str =
    "subscribe = [\"load.>\"]\nconcurrency = 8\n[config]\nbehaviour = \"hostile.count\"\n";

/// Sends `count` events from 4 concurrent clients; returns the ids that got 202.
async fn send_stream(host: &Host, prefix: &str, count: usize) -> BTreeSet<String> {
    let url = Arc::new(host.url("/v1/events/load.tick"));
    let mut tasks = Vec::new();
    for client in 0..4 {
        let url = Arc::clone(&url);
        let http = host.http.clone();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for n in (client..count).step_by(4) {
                let id = format!("{prefix}-{n}");
                let sent = http
                    .post(url.as_str())
                    .header("ce-id", &id)
                    .json(&json!({"n": n}))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status() == 202 => acked.push(id),
                    Ok(_) => {}
                    Err(_) => break, // the host went away
                }
            }
            acked
        }));
    }
    let mut acked = BTreeSet::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    acked
}

/// Waits until the counter plugin's cursor reaches the head of the log, then checks that
/// every acknowledged event was handled and every handled event's effect is there once.
async fn assert_all_handled_once(host: &Host, acked: &BTreeSet<String>) {
    let log = host.log().await;
    let ticks: Vec<&serde_json::Value> = log
        .iter()
        .filter(|e| e["event"]["type"] == "load.tick")
        .collect();
    let head = log.last().map_or(0, |e| e["sequence"].as_u64().unwrap());
    host.wait_for(
        "the counter to catch up",
        Duration::from_secs(60),
        || async {
            let status = host.get_json("/v1/plugins/counter").await;
            (status["cursor"].as_u64()? >= head && status["in_flight"] == 0).then_some(())
        },
    )
    .await;
    let log = host.log().await;
    let stored: BTreeSet<String> = ticks
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        acked.is_subset(&stored),
        "an acknowledged event is missing from the log"
    );
    for id in &stored {
        assert!(
            host.kv("counter", &format!("seen/{id}")).await.is_some(),
            "{id} not handled"
        );
    }
    // Exactly one follow-up per stored event: a redelivery after a committed attempt
    // would have emitted it again under a new sequence.
    let counted: Vec<&str> = log
        .iter()
        .filter(|e| e["event"]["type"] == "hostile.counted")
        .map(|e| e["event"]["data"]["id"].as_str().unwrap())
        .collect();
    let distinct: BTreeSet<&str> = counted.iter().copied().collect();
    assert_eq!(
        counted.len(),
        distinct.len(),
        "an effect was committed twice"
    );
    assert_eq!(distinct.len(), stored.len());
}

#[tokio::test]
async fn a_graceful_restart_loses_and_repeats_nothing() {
    let mut host = Host::new();
    host.plugin("counter", Guest::Hostile, Some(COUNTER));
    host.start();
    let mut acked = send_stream(&host, "g1", 200).await;
    host.stop();
    host.start();
    acked.extend(send_stream(&host, "g2", 200).await);
    assert_eq!(acked.len(), 400);
    assert_all_handled_once(&host, &acked).await;
}

#[tokio::test]
async fn sigkill_mid_stream_loses_no_acknowledged_event() {
    let mut host = Host::new();
    host.plugin("counter", Guest::Hostile, Some(COUNTER));
    host.start();
    let sender = {
        let url = host.url("");
        let http = host.http.clone();
        tokio::spawn(async move {
            let host = Host::attach(url, http);
            send_stream(&host, "k", 1500).await
        })
    };
    // Kill the host while the stream is in full flow.
    host.wait_for("events to flow", Duration::from_secs(30), || async {
        let status = host.get_json("/v1/plugins/counter").await;
        (status["cursor"].as_u64()? >= 100).then_some(())
    })
    .await;
    host.kill();
    let acked = sender.await.unwrap();
    assert!(
        !acked.is_empty() && acked.len() < 1500,
        "the kill landed mid-stream: {}",
        acked.len()
    );
    host.start();
    assert_all_handled_once(&host, &acked).await;
}
