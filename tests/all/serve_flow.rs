//! End to end through the real binary: a payment flows from POST to `ticketing`, whose
//! emitted event reaches `notifier`, with causation and correlation ids right; a slow
//! plugin does not hold back a fast one.

use std::time::Duration;

use serde_json::json;

use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

async fn a_payment_becomes_tickets_and_a_notification(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin("ticketing", Guest::Ticketing, None)
        .plugin("notifier", Guest::Notifier, None)
        .plugin("audit-trail", Guest::AuditTrail, None);
    host.start();

    let status = host
        .send(
            "payment.completed",
            "pay-1",
            json!({"order_id": "A-1", "amount_cents": 900, "email": "fan@example.com", "quantity": 2}),
        )
        .await;
    assert_eq!(status, 202);

    let notified = host
        .wait_for("the notification", Duration::from_secs(20), || async {
            host.kv("notifier", "notified/A-1").await
        })
        .await;
    let notified: serde_json::Value = serde_json::from_str(&notified).unwrap();
    assert_eq!(notified["email"], "fan@example.com");
    assert_eq!(notified["tickets"], 2);

    let log = host.log().await;
    assert_eq!(log.len(), 2, "{log:#?}");
    let payment = &log[0]["event"];
    let tickets = &log[1]["event"];
    assert_eq!(tickets["type"], "tickets.generated");
    assert_eq!(tickets["causationid"], payment["id"]);
    assert_eq!(tickets["correlationid"], payment["id"]);
    assert_eq!(tickets["data"]["tickets"], json!(["A-1-1", "A-1-2"]));

    // The audit trail saw both, each exactly once.
    host.wait_for("the audit trail", Duration::from_secs(20), || async {
        let tickets = host.kv("audit-trail", "count/tickets.generated").await?;
        (tickets == "1").then_some(())
    })
    .await;
    assert_eq!(
        host.kv("audit-trail", "count/payment.completed")
            .await
            .as_deref(),
        Some("1")
    );

    let status = host.get_json("/v1/plugins/ticketing").await;
    assert_eq!(status["status"], "running");
    assert_eq!(status["subscriptions"], json!(["payment.completed"]));
    // (On NATS, a stream's head message may follow the event: the cursor passes it too.)
    assert!(
        status["cursor"].as_u64() >= log[1]["sequence"].as_u64(),
        "the cursor passed the event it does not match: {status}"
    );
}

async fn a_slow_plugin_does_not_hold_back_a_fast_one(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "slow",
        Guest::Hostile,
        Some("subscribe = [\"load.tick\"]\nconcurrency = 1\n[config]\nbehaviour = \"hostile.count\"\nsleep_ms = \"300\"\n"),
    )
    .plugin("fast", Guest::Hostile, Some("subscribe = [\"load.tick\"]\n[config]\nbehaviour = \"hostile.count\"\n"));
    host.start();

    let events = 40;
    for n in 0..events {
        assert_eq!(
            host.send("load.tick", &format!("tick-{n}"), json!({"n": n}))
                .await,
            202
        );
    }
    // The fast plugin handles every event while the slow one (one at a time, 300 ms
    // each) is still far behind: its lag does not hold the fast one back. Handled is
    // judged by the plugin's own records, not its cursor: the cursor counts log positions,
    // and the plugins' follow-up events take positions between the ticks.
    host.wait_for("the fast plugin", Duration::from_secs(30), || async {
        for n in 0..events {
            host.kv("fast", &format!("seen/tick-{n}")).await?;
        }
        Some(())
    })
    .await;
    for n in 0..events {
        assert!(host.kv("fast", &format!("seen/tick-{n}")).await.is_some());
    }
    let slow = host.get_json("/v1/plugins/slow").await;
    assert!(
        slow["cursor"].as_u64().unwrap() < events / 2,
        "the slow plugin should still be behind: {slow}"
    );
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("the switchyard binary runs")
}

async fn the_client_commands_talk_to_a_running_host(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "picky",
        Guest::Hostile,
        Some("subscribe = [\"hostile.reject\"]\n"),
    );
    host.start();
    let url = host.url("");

    let sent = cli(&[
        "send",
        "hostile.reject",
        "--data",
        "{\"n\":1}",
        "--id",
        "cli-1",
        "--url",
        &url,
    ]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&sent.stdout).unwrap();
    assert_eq!(answer["accepted"][0]["id"], "cli-1");

    host.wait_for("the dead letter", Duration::from_secs(20), || async {
        let list = host.get_json("/v1/dlq").await;
        (!list["dead_letters"].as_array()?.is_empty()).then_some(())
    })
    .await;
    let listed = cli(&["dlq", "list", "--plugin", "picky", "--url", &url]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["dead_letters"][0]["event"]["id"], "cli-1");
    let id = listed["dead_letters"][0]["id"].to_string();

    let plugins = cli(&["plugins", "picky", "--url", &url]);
    let plugins: serde_json::Value = serde_json::from_slice(&plugins.stdout).unwrap();
    assert_eq!(plugins["dead_letters"], 1);

    assert!(cli(&["dlq", "delete", &id, "--url", &url]).status.success());
    let missing = cli(&["dlq", "show", &id, "--url", &url]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("404 Not Found: dead letter"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    let bad = cli(&["send", "no..type", "--url", &url]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("400 Bad Request"));

    // A conditional append, its stale repeat, and a schedule.
    let send = |args: &[&str]| {
        let mut all = vec![
            "send",
            "ledger.entry",
            "--subject",
            "ledger-1",
            "--url",
            &url,
        ];
        all.extend_from_slice(args);
        cli(&all)
    };
    let first = send(&["--expected-version", "0"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(first["accepted"][0]["streamversion"], 1);
    let stale = send(&["--expected-version", "0"]);
    assert_eq!(stale.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("409 Conflict"),
        "{}",
        String::from_utf8_lossy(&stale.stderr)
    );
    let later = send(&["--delay", "1h", "--id", "cli-later"]);
    assert!(
        later.status.success(),
        "{}",
        String::from_utf8_lossy(&later.stderr)
    );
    let later: serde_json::Value = serde_json::from_slice(&later.stdout).unwrap();
    assert!(later["accepted"][0]["scheduled"].is_string(), "{later}");
}

#[test]
fn serve_refuses_a_public_address_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let output = cli(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--data",
        dir.path().join("data").to_str().unwrap(),
        "--plugins",
        dir.path().join("plugins").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("token"), "{stderr}");
    assert!(output.stdout.is_empty(), "it never listened");
}

async fn ordering_by_key_keeps_log_order_per_key_even_across_a_retry(backend: Backend) {
    keeps_log_order_per_key(backend, "").await;
}

/// On NATS a key-ordered plugin's consumer hands out one event at a time, so a batch
/// would hold one event and only add its linger: the host calls it one event per call
/// and says why.
async fn ordering_by_key_holds_with_batches(backend: Backend) {
    let nats = matches!(backend, Backend::Nats(_));
    let host = keeps_log_order_per_key(backend, "[batch]\nmax_size = 8\nlinger = \"20ms\"\n").await;
    let batches = host
        .metric_if_any("switchyard_batch_calls_total{plugin=\"sequencer\"}")
        .await
        .unwrap_or(0.0);
    if nats {
        assert_eq!(batches, 0.0);
        host.wait_for("the warning", Duration::from_secs(5), || async {
            (!host
                .logged("hands out one event of the plugin at a time")
                .is_empty())
            .then_some(())
        })
        .await;
    } else {
        assert!(batches >= 1.0, "{batches} batch calls");
    }
}

/// Sends steps of three keys, one failing once, to a plugin with `ordering = "key"` (and
/// `extra` in its sidecar), and checks each key's steps were handled in log order.
async fn keeps_log_order_per_key(backend: Backend, extra: &str) -> Host {
    let mut host = Host::on(&backend);
    host.plugin(
        "sequencer",
        Guest::Hostile,
        Some(&format!(
            "subscribe = [\"order.step\"]\nconcurrency = 8\nordering = \"key\"\n\
             [retry]\nbackoff = \"constant\"\ninitial = \"200ms\"\njitter = false\n\
             [config]\nbehaviour = \"hostile.sequence\"\n{extra}"
        )),
    );
    host.start();
    let keys = ["a", "b", "c"];
    let per_key = 12u64;
    for n in 0..per_key {
        for key in keys {
            let response = host
                .http
                .post(host.url("/v1/events/order.step"))
                .header("ce-id", format!("{key}-{n}"))
                .header("ce-partitionkey", key)
                // The third event of key `a` fails once; the later `a` events must wait.
                .json(&json!({"n": n, "fail_once": key == "a" && n == 2}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
        }
    }
    let expected: Vec<u64> = (0..per_key).collect();
    for key in keys {
        let list = host
            .wait_for("every step of the key", Duration::from_secs(30), || async {
                let text = host.kv("sequencer", &format!("order/{key}")).await?;
                let list: Vec<u64> = serde_json::from_str(&text).unwrap();
                (list.len() as u64 == per_key).then_some(list)
            })
            .await;
        assert_eq!(list, expected, "key {key}");
    }
    host
}

async fn a_new_plugin_starts_at_the_end_of_the_log_unless_told_earliest(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin("first", Guest::AuditTrail, None);
    host.start();
    for n in 0..5 {
        assert_eq!(
            host.send("early.event", &format!("early-{n}"), json!({}))
                .await,
            202
        );
    }
    host.stop();
    host.plugin(
        "replayer",
        Guest::AuditTrail,
        Some("start = \"earliest\"\n"),
    )
    .plugin("newcomer", Guest::AuditTrail, None);
    host.start();
    assert_eq!(host.send("late.event", "late-0", json!({})).await, 202);
    host.wait_for(
        "the replayer to see the whole log",
        Duration::from_secs(20),
        || async {
            let early = host.kv("replayer", "count/early.event").await?;
            let late = host.kv("replayer", "count/late.event").await?;
            (early == "5" && late == "1").then_some(())
        },
    )
    .await;
    host.wait_for(
        "the newcomer to see the late event",
        Duration::from_secs(20),
        || async { host.kv("newcomer", "count/late.event").await },
    )
    .await;
    assert_eq!(host.kv("newcomer", "count/early.event").await, None);
}

async fn concurrent_calls_of_one_plugin_never_lose_each_others_kv_updates(backend: Backend) {
    let mut host = Host::on(&backend);
    // Every call reads and rewrites the same counter, eight at a time.
    host.plugin("audit", Guest::AuditTrail, Some("concurrency = 8\n"));
    host.start();
    let events = 120;
    let mut tasks = Vec::new();
    for n in 0..events {
        let http = host.http.clone();
        let url = host.url("/v1/events/hot.counter");
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .header("ce-id", format!("hot-{n}"))
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 202);
    }
    let count = host
        .wait_for("the counter to settle", Duration::from_secs(60), || async {
            let status = host.get_json("/v1/plugins/audit").await;
            let settled = status["cursor"].as_u64()? >= events
                && status["in_flight"] == 0
                && status["pending_retries"] == 0;
            settled.then_some(())?;
            host.kv("audit", "count/hot.counter").await
        })
        .await;
    assert_eq!(count, events.to_string());
}

async fn overlapping_patterns_deliver_each_event_once_and_resends_are_deduplicated(
    backend: Backend,
) {
    let mut host = Host::on(&backend);
    // Three patterns that all match `multi.tick`: the plugin must still see it once (on
    // NATS, whose consumers refuse overlapping filter subjects, they filter as `multi.>`).
    host.plugin(
        "multi",
        Guest::Hostile,
        Some(
            "subscribe = [\"multi.*\", \"multi.tick\", \"multi.>\"]\n\
             [config]\nbehaviour = \"hostile.count\"\n",
        ),
    );
    host.start();
    let post = |id: String| {
        let http = host.http.clone();
        let url = host.url("/v1/events/multi.tick");
        async move {
            let response = http
                .post(url)
                .header("ce-id", id)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            response.json::<serde_json::Value>().await.unwrap()["accepted"][0].clone()
        }
    };
    let mut first = Vec::new();
    for n in 0..20 {
        first.push(post(format!("m-{n}")).await);
    }
    // The same ids again: stored once, answered with the original sequences.
    for (n, original) in first.iter().enumerate() {
        let again = post(format!("m-{n}")).await;
        assert_eq!(again["duplicate"], true);
        assert_eq!(again["sequence"], original["sequence"]);
        assert_eq!(original["duplicate"], false);
    }
    host.wait_caught_up("multi", Duration::from_secs(30)).await;
    let log = host.log().await;
    let ticks = log
        .iter()
        .filter(|e| e["event"]["type"] == "multi.tick")
        .count();
    let counted = log
        .iter()
        .filter(|e| e["event"]["type"] == "hostile.counted")
        .count();
    assert_eq!(ticks, 20, "resends were not stored again");
    assert_eq!(counted, 20, "each event handled once");
    let mut total = 0;
    for shard in 0..16 {
        if let Some(n) = host.kv("multi", &format!("total/{shard}")).await {
            total += n.parse::<usize>().unwrap();
        }
    }
    assert_eq!(total, 20);
}

async fn a_burst_into_a_one_at_a_time_plugin_never_conflicts_with_itself(backend: Backend) {
    let mut host = Host::on(&backend);
    // The example's own sidecar: one call at a time, every call rewriting one counter.
    let sidecar = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../plugins/audit-trail/sidecar.toml"
    ))
    .unwrap();
    host.plugin("audit", Guest::AuditTrail, Some(&sidecar));
    host.start();
    // 5,000 events in batches of 25 from 4 connections at once.
    let (connections, batches, size) = (4, 50, 25);
    let mut tasks = Vec::new();
    for connection in 0..connections {
        let http = reqwest::Client::new();
        let url = host.url("/v1/events");
        tasks.push(tokio::spawn(async move {
            for batch in 0..batches {
                let events: Vec<serde_json::Value> = (0..size)
                    .map(|n| {
                        json!({"specversion": "1.0", "id": format!("burst-{connection}-{batch}-{n}"),
                               "source": "/burst", "type": "burst.tick", "data": {}})
                    })
                    .collect();
                let status = http
                    .post(&url)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(serde_json::Value::from(events).to_string())
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(status, 202);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let events = connections * batches * size;
    let count = host
        .wait_for(
            "the counter to settle",
            Duration::from_secs(120),
            || async {
                let status = host.get_json("/v1/plugins/audit").await;
                let settled = status["cursor"].as_u64()? >= events
                    && status["in_flight"] == 0
                    && status["pending_retries"] == 0;
                settled.then_some(())?;
                host.kv("audit", "count/burst.tick").await
            },
        )
        .await;
    assert_eq!(count, events.to_string());
    let status = host.status("audit").await.unwrap();
    assert_eq!(status["failed"], 0, "{status}");
    assert_eq!(status["last_error"], serde_json::Value::Null, "{status}");
    let conflicts = host
        .metric_if_any("switchyard_deliveries_total{plugin=\"audit\",outcome=\"conflict\"}")
        .await;
    assert_eq!(conflicts, None, "no attempt ran again after a KV conflict");
}

/// A call whose KV read keeps being changed by the plugin's own other calls conflicts
/// past its reruns; that is not a failure of the handler: the event is handed back as the
/// same attempt, records no error, and completes once the other calls stop.
async fn a_conflict_that_persists_is_not_a_failed_attempt(backend: Backend) {
    let mut host = Host::on(&backend);
    // Bumps write without reading, so only the slow call conflicts: with every bump that
    // commits while it runs, in the other lane.
    host.plugin(
        "hot",
        Guest::Hostile,
        Some(
            "subscribe = [\"hostile.slow-read\", \"hostile.bump\"]\nconcurrency = 2\n[config]\nread_ms = \"40\"\n",
        ),
    );
    host.start();
    let event = |id: String, ty: &str, key: &str| {
        json!({"specversion": "1.0", "id": id, "source": "/tests", "type": ty,
               "partitionkey": key, "datacontenttype": "application/json", "data": {}})
    };
    // Bumps keep committing while the slow call runs and runs again: batches of 100, the
    // slow call in the second, a few hundred bumps ahead of the plugin at most, sent until
    // the slow call has been handed back. So the bumps outlast the slow call's reruns
    // however fast this machine drains them, without a backlog that takes minutes.
    let deferred_metric = "switchyard_deliveries_total{plugin=\"hot\",outcome=\"deferred\"}";
    let (max_batches, ahead) = (400, 300);
    let mut bumps = 0;
    let mut deferred = None;
    for batch in 0..max_batches {
        host.wait_for(
            "the plugin to come within a few hundred bumps",
            Duration::from_secs(120),
            || async {
                let handled = host.status("hot").await?["handled"].as_u64()?;
                (handled + ahead >= bumps).then_some(())
            },
        )
        .await;
        let mut events: Vec<serde_json::Value> = (0..100)
            .map(|n| event(format!("bump-{batch}-{n}"), "hostile.bump", "bumps"))
            .collect();
        bumps += events.len() as u64;
        if batch == 1 {
            events.insert(50, event("slow-1".to_owned(), "hostile.slow-read", "slow"));
        }
        assert_eq!(host.send_batch(&json!(events)).await.status(), 202);
        deferred = host.metric_if_any(deferred_metric).await;
        if deferred.is_some() {
            break;
        }
    }
    host.wait_for(
        "the slow call and every bump",
        Duration::from_secs(120),
        || async {
            host.kv("hot", "seen/slow-1").await?;
            let status = host.status("hot").await?;
            let settled = status["handled"] == bumps + 1
                && status["in_flight"] == 0
                && status["pending_retries"] == 0;
            settled.then_some(())
        },
    )
    .await;
    let conflicts = host
        .metric_if_any("switchyard_deliveries_total{plugin=\"hot\",outcome=\"conflict\"}")
        .await;
    assert!(
        deferred.is_some_and(|count| count >= 1.0),
        "the slow call did not conflict past its reruns within {bumps} bumps ({conflicts:?} conflicts)"
    );
    let status = host.status("hot").await.unwrap();
    assert_eq!(status["failed"], 0, "{status}");
    assert_eq!(status["last_error"], serde_json::Value::Null, "{status}");
    assert_eq!(status["dead_letters"], 0, "{status}");
}

crate::on_both_backends!(
    a_conflict_that_persists_is_not_a_failed_attempt,
    a_burst_into_a_one_at_a_time_plugin_never_conflicts_with_itself,
    overlapping_patterns_deliver_each_event_once_and_resends_are_deduplicated,
    a_payment_becomes_tickets_and_a_notification,
    a_slow_plugin_does_not_hold_back_a_fast_one,
    the_client_commands_talk_to_a_running_host,
    ordering_by_key_keeps_log_order_per_key_even_across_a_retry,
    ordering_by_key_holds_with_batches,
    a_new_plugin_starts_at_the_end_of_the_log_unless_told_earliest,
    concurrent_calls_of_one_plugin_never_lose_each_others_kv_updates,
);
