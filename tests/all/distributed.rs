//! Distributed mode: several real hosts sharing one NATS JetStream, each test with its
//! own `nats-server` (or three-node cluster) on free loopback ports. Hosts compete for
//! each plugin's deliveries; the checks are those of the crash test: every acknowledged
//! event handled by every plugin, each effect committed once, counters exact.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::serve_recovery::{Audit, crash_counter, send_through_crashes};
use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};
use crate::support::nats::{NatsCluster, NatsServer, SlowLink, free_port};

/// A host on `url` with the crash test's two counting plugins. A short `ack_wait` lets
/// the survivors take over a dead host's deliveries quickly.
fn counting_host(url: &str, extra_bus_config: &str) -> Host {
    let mut host = Host::on(&Backend::Nats(url.to_owned()));
    host.plugin("alpha", Guest::Hostile, Some(&crash_counter("alpha")));
    host.plugin("beta", Guest::Hostile, Some(&crash_counter("beta")));
    host.config(&format!("[bus]\nack_wait = \"2s\"\n{extra_bus_config}"));
    host.start();
    host
}

/// Starts producers that spread `ids` over `clients` connections, all sending to the URL
/// on the returned channel; each retries an id until it gets `202`.
fn produce(
    http: &reqwest::Client,
    first_url: String,
    ids: &[String],
    clients: usize,
) -> (
    watch::Sender<String>,
    Arc<AtomicUsize>,
    Vec<tokio::task::JoinHandle<BTreeSet<String>>>,
) {
    let (publish_url, url) = watch::channel(first_url);
    let acked_so_far = Arc::new(AtomicUsize::new(0));
    let senders = (0..clients)
        .map(|client| {
            let ids = ids.iter().skip(client).step_by(clients).cloned().collect();
            tokio::spawn(send_through_crashes(
                http.clone(),
                url.clone(),
                ids,
                Arc::clone(&acked_so_far),
            ))
        })
        .collect();
    (publish_url, acked_so_far, senders)
}

async fn acked(senders: Vec<tokio::task::JoinHandle<BTreeSet<String>>>) -> BTreeSet<String> {
    let mut acked = BTreeSet::new();
    for sender in senders {
        acked.extend(sender.await.unwrap());
    }
    acked
}

async fn handled_ok(host: &Host, plugin: &str) -> f64 {
    host.metric(&format!(
        "switchyard_deliveries_total{{plugin=\"{plugin}\",outcome=\"ok\"}}"
    ))
    .await
}

async fn hosts_share_the_work(hosts: usize) {
    const EVENTS: usize = 600;
    let server = NatsServer::start();
    let fleet: Vec<Host> = (0..hosts)
        .map(|_| counting_host(&server.url(), ""))
        .collect();
    // Producers talk to every host: any host's ingest feeds the shared stream.
    let mut senders = Vec::new();
    for (index, host) in fleet.iter().enumerate() {
        let ids: Vec<String> = (0..EVENTS / hosts)
            .map(|n| format!("h{index}-{n}"))
            .collect();
        senders.extend(produce(&host.http, host.url(""), &ids, 2).2);
    }
    let acked = acked(senders).await;
    let audit = Audit::of(&fleet[0], &acked, &["alpha", "beta"]).await;
    let mut shares = Vec::new();
    for host in &fleet {
        shares.push(handled_ok(host, "alpha").await + handled_ok(host, "beta").await);
    }
    println!("{hosts} hosts: {audit}; deliveries per host {shares:?}");
    audit.assert_whole(EVENTS, &acked);
    assert!(
        shares.iter().all(|&n| n > 0.0),
        "every host took part: {shares:?}"
    );
    assert_eq!(shares.iter().sum::<f64>() as usize, 2 * EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_events_fire_after_the_schedulers_consumer_was_deleted() {
    let server = NatsServer::start();
    let mut host = Host::on(&Backend::Nats(server.url()));
    host.start();
    let (status, _) = crate::scheduled::schedule(&host, "before", Some("300ms"), None).await;
    assert_eq!(status, 202);
    host.wait_for("the first timer", Duration::from_secs(20), || async {
        (crate::scheduled::count_in_log(&host, "before").await == 1).then_some(())
    })
    .await;
    // An operator (or a restored stream) takes the consumer the scheduler pulls from.
    let client = async_nats::connect(server.url()).await.unwrap();
    let schedules = async_nats::jetstream::new(client)
        .get_stream("switchyard-schedules")
        .await
        .unwrap();
    schedules
        .delete_consumer("switchyard-scheduler")
        .await
        .unwrap();
    let (status, _) = crate::scheduled::schedule(&host, "after", Some("300ms"), None).await;
    assert_eq!(status, 202);
    host.wait_for("the timer set after", Duration::from_secs(20), || async {
        (crate::scheduled::count_in_log(&host, "after").await == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_one_jetstream_and_commit_each_effect_once() {
    hosts_share_the_work(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_share_one_jetstream_and_commit_each_effect_once() {
    hosts_share_the_work(3).await;
}

/// Sends `EVENTS` through `ingest`, running `disrupt` once a third of them got `202`;
/// returns the acknowledged ids.
async fn stream_with_disruption(
    ingest: &Host,
    events: usize,
    disrupt: impl FnOnce(),
) -> BTreeSet<String> {
    let ids: Vec<String> = (0..events).map(|n| format!("c-{n}")).collect();
    let (_url, acked_so_far, senders) = produce(&ingest.http, ingest.url(""), &ids, 4);
    ingest
        .wait_for(
            "a third of the stream",
            Duration::from_secs(120),
            || async { (acked_so_far.load(Ordering::Relaxed) >= events / 3).then_some(()) },
        )
        .await;
    disrupt();
    acked(senders).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_stream_loses_nothing_the_others_finish() {
    const EVENTS: usize = 1200;
    let server = NatsServer::start();
    let mut fleet: Vec<Host> = (0..3).map(|_| counting_host(&server.url(), "")).collect();
    let (victim, survivors) = fleet.split_at_mut(1);
    let acked = stream_with_disruption(&survivors[0], EVENTS, || victim[0].kill()).await;
    let audit = Audit::of(&survivors[1], &acked, &["alpha", "beta"]).await;
    println!("one of three hosts SIGKILLed mid-stream: {audit}");
    audit.assert_whole(EVENTS, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_restart_mid_stream_loses_nothing() {
    const EVENTS: usize = 1200;
    let mut server = NatsServer::start();
    let fleet: Vec<Host> = (0..2).map(|_| counting_host(&server.url(), "")).collect();
    let acked = stream_with_disruption(&fleet[0], EVENTS, || {
        server.kill();
        std::thread::sleep(Duration::from_secs(1));
        server.restart();
    })
    .await;
    let audit = Audit::of(&fleet[1], &acked, &["alpha", "beta"]).await;
    println!("nats-server restarted mid-stream: {audit}");
    audit.assert_whole(EVENTS, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_stream_keeps_serving_with_one_cluster_node_killed() {
    const EVENTS: usize = 900;
    let mut cluster = NatsCluster::start();
    let urls = cluster.urls();
    let fleet: Vec<Host> = (0..2)
        .map(|_| counting_host(&urls, "replicas = 3\n"))
        .collect();
    let acked = stream_with_disruption(&fleet[0], EVENTS, || cluster.nodes[0].kill()).await;
    let audit = Audit::of(&fleet[1], &acked, &["alpha", "beta"]).await;
    println!("one of three cluster nodes SIGKILLed mid-stream: {audit}");
    audit.assert_whole(EVENTS, &acked);
}

/// A host that has lost its NATS server says so: `/readyz` answers `503` (so a load balancer
/// sends producers elsewhere), `switchyard_bus_connected` drops to 0, scrapes still answer
/// and the API refuses what needs the bus at once, until the server is back; then the
/// reconnection is counted and events are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_connection_to_the_nats_server() {
    let mut server = NatsServer::start();
    let mut host = Host::on(&Backend::Nats(server.url()));
    host.plugin("sink", Guest::Noop, None);
    host.start();
    let readiness = || async {
        let response = reqwest::get(host.url("/readyz")).await.unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        (status, body)
    };
    assert_eq!(readiness().await.0, 200);
    // Reading the KV of a name no plugin has makes no bucket on the server.
    assert_eq!(
        host.get_json("/v1/plugins/nobody/kv").await["keys"],
        json!([])
    );
    let client = async_nats::connect(server.url()).await.unwrap();
    let made = async_nats::jetstream::new(client)
        .get_stream("KV_switchyard-kv-nobody")
        .await;
    assert!(made.is_err(), "a bucket was made for a read");
    assert_eq!(host.metric("switchyard_bus_connected").await, 1.0);
    assert_eq!(host.metric("switchyard_bus_reconnects_total").await, 0.0);

    server.kill();
    let body = host
        .wait_for(
            "the host to be unready",
            Duration::from_secs(20),
            || async {
                let (status, body) = readiness().await;
                (status == 503).then_some(body)
            },
        )
        .await;
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not connected to the NATS server"),
        "{body}"
    );
    assert_eq!(host.metric("switchyard_bus_connected").await, 0.0);
    // A scrape answers without the gauges the bus keeps, rather than zeros after a wait.
    let lag = "switchyard_plugin_lag_events{plugin=\"sink\"}";
    assert_eq!(host.metric_if_any(lag).await, None);
    let in_flight = "switchyard_plugin_in_flight{plugin=\"sink\"}";
    assert_eq!(host.metric_if_any(in_flight).await, Some(0.0));
    // What the bus keeps is refused at once; the host's own history is not.
    let response = reqwest::get(host.url("/v1/plugins")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let response = reqwest::get(host.url("/v1/stats")).await.unwrap();
    assert_eq!(response.status(), 200);
    // An event is held through a short break and refused after the acknowledgement's
    // wait; once the break has lasted longer than that wait, it is refused at once.
    let post = |id: &'static str, timeout: u64| {
        host.http
            .post(host.url("/v1/events/after.outage"))
            .header("ce-id", id)
            .timeout(Duration::from_secs(timeout))
            .json(&json!({}))
            .send()
    };
    let held = post("held", 30).await.unwrap();
    assert_eq!(held.status(), 503);
    assert!(held.headers().contains_key("retry-after"));
    let refused = post("refused", 3)
        .await
        .expect("an event posted after a long break is answered without the wait");
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("not connected to the NATS server for"),
        "{body}"
    );
    // The plugin's history goes on through the outage, its lag unknown.
    let stats = host.get_json("/v1/stats?plugin=sink").await;
    let lags = stats["plugin"]["lag"]
        .as_array()
        .expect("the plugin's series");
    assert_eq!(lags.last(), Some(&serde_json::Value::Null), "{stats}");

    server.restart();
    host.wait_for(
        "the host to be ready again",
        Duration::from_secs(30),
        || async { (readiness().await.0 == 200).then_some(()) },
    )
    .await;
    assert_eq!(host.metric("switchyard_bus_connected").await, 1.0);
    assert!(host.metric("switchyard_bus_reconnects_total").await >= 1.0);
    // The lag is known again. The client may have sent the held event once connected
    // again (its producer was answered 503 and would send it again, deduplicated by its
    // id), so the plugin may have one more event to handle first.
    host.wait_for(
        "the plugin's lag to be 0",
        Duration::from_secs(30),
        || async { (host.metric_if_any(lag).await == Some(0.0)).then_some(()) },
    )
    .await;
    assert_eq!(host.get_json("/v1/plugins/sink").await["lag"], 0);
    assert_eq!(host.send("after.return", "back-1", json!({})).await, 202);
}

/// A plugin changed while the server is down cannot start its consumer; it is loaded
/// again at the next scans and serves, with the change, once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_changed_while_the_nats_server_is_down_serves_once_it_is_back() {
    let mut server = NatsServer::start();
    let mut host = Host::on(&Backend::Nats(server.url()));
    host.plugin(
        "filtered",
        Guest::Hostile,
        Some(&counting_sidecar(&["crash.>"])),
    );
    host.start();
    send_all(&host, "crash.tick", ["c-0".to_owned()]).await;
    host.wait_caught_up("filtered", Duration::from_secs(30))
        .await;

    server.kill();
    host.deploy(
        "filtered.toml",
        counting_sidecar(&["crash.>", "other.>"]).as_bytes(),
    );
    // Nothing serves it while its consumer cannot start.
    let serving = "switchyard_plugin_serving{plugin=\"filtered\"}";
    host.wait_for("the reload to fail", Duration::from_secs(60), || async {
        (host.metric_if_any(serving).await == Some(0.0)).then_some(())
    })
    .await;

    server.restart();
    host.wait_for("the host to be ready", Duration::from_secs(30), || async {
        let ready = reqwest::get(host.url("/readyz")).await.ok()?;
        (ready.status() == 200).then_some(())
    })
    .await;
    host.wait_for(
        "the new version to serve",
        Duration::from_secs(60),
        || async {
            let status = host.status("filtered").await?;
            (status["status"] == "running" && status["subscriptions"].as_array()?.len() == 2)
                .then_some(())
        },
    )
    .await;
    send_all(&host, "other.tick", ["o-1".to_owned()]).await;
    host.wait_for(
        "the new subscription's event",
        Duration::from_secs(30),
        || async {
            host.log()
                .await
                .iter()
                .any(|e| {
                    e["event"]["type"] == "hostile.counted" && e["event"]["data"]["id"] == "o-1"
                })
                .then_some(())
        },
    )
    .await;
}

/// Runs `switchyard serve` against `url` until it exits; returns its exit code and stderr.
fn serve_until_refused(url: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--bus", url])
        .arg("--plugins")
        .arg(dir.path())
        .arg("--data")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(output.stdout.is_empty(), "it never announced an address");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn an_unreachable_nats_server_is_a_clear_error_at_start() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    let (code, stderr) = serve_until_refused(&url);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the NATS server at {url}")),
        "{stderr}"
    );
}

/// A server that introduces itself as nats-server 2.9.10 (the handshake only: `INFO`,
/// then `PONG` to the client's `PING`) is refused before anything is created on it.
#[test]
fn a_nats_server_older_than_the_minimum_is_refused_at_start_naming_the_minimum() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://{}", listener.local_addr().unwrap());
    let old_server = std::thread::spawn(move || {
        let (mut connection, _) = listener.accept().unwrap();
        connection
            .write_all(
                b"INFO {\"server_id\":\"old\",\"version\":\"2.9.10\",\"proto\":1,\
                  \"max_payload\":1048576,\"headers\":true,\"jetstream\":true}\r\n",
            )
            .unwrap();
        let mut heard = Vec::new();
        let mut chunk = [0u8; 4096];
        // Answers the client's PING; reads until the client hangs up.
        loop {
            match connection.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    heard.extend_from_slice(&chunk[..n]);
                    if chunk[..n].windows(4).any(|w| w == b"PING") {
                        let _ = connection.write_all(b"PONG\r\n");
                    }
                }
            }
        }
        String::from_utf8_lossy(&heard).into_owned()
    });
    let (code, stderr) = serve_until_refused(&url);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is nats-server 2.9.10; Switchyard needs 2.12.0 or later"),
        "{stderr}"
    );
    let heard = old_server.join().unwrap();
    assert!(
        !heard.contains("$JS.API"),
        "nothing was asked of JetStream: {heard}"
    );
}

#[tokio::test]
async fn what_the_server_cannot_store_is_refused_or_dead_lettered_not_retried_forever() {
    let server = NatsServer::start();
    let mut host = Host::on(&Backend::Nats(server.url()));
    // Effects bounds above the server's 1 MiB `max_payload`, so the bus is what refuses.
    host.plugin(
        "big",
        Guest::Hostile,
        Some(
            "subscribe = [\"hostile.emit-huge\", \"hostile.kv-huge\"]\n[effects]\n\
             max_emit_bytes = \"16MiB\"\nmax_kv_value_bytes = \"16MiB\"\n[limits]\nmemory = \"128MiB\"\n",
        ),
    );
    host.start();

    // Within the host's 1 MiB event limit, beyond what one message may carry.
    let response = host
        .http
        .post(host.url("/v1/events/big.event"))
        .header("ce-id", "too-big")
        .json(&json!({ "s": "x".repeat(1_046_000) }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("limit"),
        "{body}"
    );
    assert!(host.log().await.is_empty(), "nothing was stored");

    assert_eq!(
        host.send("hostile.emit-huge", "emit-1", json!({})).await,
        202
    );
    // A producer waiting for the outcome hears the dead letter, not the acknowledgement
    // the bus could not store.
    let waited = host
        .http
        .post(host.url("/v1/events/hostile.kv-huge?wait=30s"))
        .header("ce-id", "kv-1")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(waited.status(), 200);
    let waited: serde_json::Value = waited.json().await.unwrap();
    let outcome = &waited["accepted"][0]["plugins"][0];
    assert_eq!(outcome["outcome"], "dead-lettered", "{waited}");
    assert_eq!(outcome["emitted"], json!([]), "{waited}");
    let letters = host
        .wait_for(
            "both to be dead-lettered",
            Duration::from_secs(60),
            || async {
                let page = host.get_json("/v1/dlq?plugin=big").await;
                let letters = page["dead_letters"].as_array()?.clone();
                (letters.len() == 2).then_some(letters)
            },
        )
        .await;
    for letter in &letters {
        assert_eq!(letter["reason"], "effects", "{letter}");
        let message = letter["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("more than the bus stores in one message"),
            "{message}"
        );
    }
    // Nothing is left retrying: the calls end (a dead letter is visible a moment before
    // its call has finished) and no retry is pending.
    host.wait_for("the calls to end", Duration::from_secs(10), || async {
        let status = host.status("big").await?;
        (status["in_flight"] == 0 && status["pending_retries"] == 0).then_some(())
    })
    .await;
}

/// A link to the server that brings a pull's messages in pieces with pauses between them (a
/// slow or congested network) delays no delivery until `ack_wait`: the host reads every
/// pull to its end, so no message the server sent for one lands in an inbox it stopped
/// reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_to_the_server_leaves_no_delivery_waiting_out_ack_wait() {
    const EVENTS: usize = 400;
    let server = NatsServer::start();
    let link = SlowLink::to(server.port(), 2048, Duration::from_millis(30));
    let mut host = Host::on(&Backend::Nats(link.url()));
    host.plugin("sink", Guest::Noop, None);
    host.config("[bus]\nack_wait = \"60s\"\n");
    host.start();
    for first in (0..EVENTS).step_by(100) {
        let batch: Vec<serde_json::Value> = (first..first + 100)
            .map(|n| json!({"specversion": "1.0", "id": format!("slow-{n}"), "source": "/test", "type": "slow.tick", "data": {}}))
            .collect();
        assert_eq!(host.send_batch(&json!(batch)).await.status(), 202);
    }
    let started = std::time::Instant::now();
    // Well under `ack_wait`: a delivery lost in a dropped pull would come back only then.
    host.wait_for("every event handled", Duration::from_secs(30), || async {
        (handled_ok(&host, "sink").await as usize == EVENTS).then_some(())
    })
    .await;
    println!(
        "{EVENTS} events handled over the slow link in {:?}",
        started.elapsed()
    );
}

/// A sidecar for the counting guest subscribed to `patterns`.
fn counting_sidecar(patterns: &[&str]) -> String {
    format!(
        "subscribe = {patterns:?}\n[config]\nbehaviour = \"hostile.count\"\ntag = \"filtered\"\n"
    )
}

/// The plugin's durable consumer as the server describes it.
async fn consumer_info(url: &str, plugin: &str) -> async_nats::jetstream::consumer::Info {
    let client = async_nats::connect(url).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("switchyard-events")
        .await
        .unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&format!("switchyard-{plugin}"))
        .await
        .unwrap();
    consumer.info().await.unwrap().clone()
}

async fn send_all(host: &Host, ty: &str, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        assert_eq!(host.send(ty, &id, json!({})).await, 202, "{ty} {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_gets_only_its_patterns_and_a_reload_moves_its_filter_without_loss() {
    let server = NatsServer::start();
    let mut host = Host::on(&Backend::Nats(server.url()));
    host.plugin(
        "filtered",
        Guest::Hostile,
        Some(&counting_sidecar(&["crash.>"])),
    );
    host.start();

    // 40 events the plugin does not subscribe to, among 10 it does.
    send_all(&host, "other.tick", (0..40).map(|n| format!("early-{n}"))).await;
    send_all(&host, "crash.tick", (0..10).map(|n| format!("c-{n}"))).await;
    host.wait_caught_up("filtered", Duration::from_secs(30))
        .await;
    let info = consumer_info(&server.url(), "filtered").await;
    assert_eq!(
        info.delivered.consumer_sequence, 10,
        "the server handed out only the subscribed events: {info:?}"
    );
    // The pattern without a subject, the pattern in every subject stream, the replays.
    assert_eq!(info.config.filter_subjects.len(), 3, "{info:?}");

    // Subscribed events keep coming while the sidecar gains a pattern.
    let ticks = {
        let http = host.http.clone();
        let url = host.url("/v1/events/crash.tick");
        tokio::spawn(async move {
            for n in 10..60 {
                let sent = http
                    .post(&url)
                    .header("ce-id", format!("c-{n}"))
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(sent.status(), 202);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    host.deploy(
        "filtered.toml",
        counting_sidecar(&["crash.>", "other.>"]).as_bytes(),
    );
    host.wait_for("the new subscriptions", Duration::from_secs(30), || async {
        let status = host.status("filtered").await?;
        (status["subscriptions"].as_array()?.len() == 2).then_some(())
    })
    .await;
    ticks.await.unwrap();
    send_all(&host, "other.tick", (0..10).map(|n| format!("late-{n}"))).await;
    host.wait_caught_up("filtered", Duration::from_secs(30))
        .await;

    let mut handled: Vec<String> = host
        .log()
        .await
        .iter()
        .filter(|e| e["event"]["type"] == "hostile.counted")
        .map(|e| e["event"]["data"]["id"].as_str().unwrap().to_owned())
        .collect();
    handled.sort();
    let mut expected: Vec<String> = (0..60)
        .map(|n| format!("c-{n}"))
        .chain((0..10).map(|n| format!("late-{n}")))
        .collect();
    expected.sort();
    // Every subscribed event once, across the reload; the events before the new pattern
    // was loaded stay behind the consumer's position, as on the embedded log.
    assert_eq!(handled, expected);
    let info = consumer_info(&server.url(), "filtered").await;
    assert!(
        info.config
            .filter_subjects
            .contains(&"switchyard.events.other.>".to_owned()),
        "{info:?}"
    );
}

/// Handled-ok deliveries of `plugin` on `host` (0 before its first).
async fn ok_deliveries(host: &Host, plugin: &str) -> f64 {
    let series = format!("switchyard_deliveries_total{{plugin=\"{plugin}\",outcome=\"ok\"}}");
    host.metric_if_any(&series).await.unwrap_or(0.0)
}

#[tokio::test]
async fn a_wait_is_answered_by_the_host_it_reached_whichever_host_ran_the_plugin() {
    let server = NatsServer::start();
    let hosts: Vec<Host> = (0..2)
        .map(|_| {
            let mut host = Host::on(&Backend::Nats(server.url()));
            host.plugin("ticketing", Guest::Ticketing, None);
            host.start();
            host
        })
        .collect();
    // Every request goes to the first host; both hosts compete for the deliveries.
    let asked = &hosts[0];
    for n in 0..20 {
        let response = asked
            .http
            .post(asked.url("/v1/events/payment.completed?wait=20s"))
            .header("ce-id", format!("pay-{n}"))
            .json(&json!({"order_id": format!("W-{n}"), "amount_cents": 100, "email": "w@example.com", "quantity": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer: serde_json::Value = response.json().await.unwrap();
        let ticketing = &answer["accepted"][0]["plugins"][0];
        assert_eq!(ticketing["plugin"], "ticketing");
        assert_eq!(ticketing["outcome"], "ok", "{answer}");
        assert_eq!(ticketing["emitted"][0]["type"], "tickets.generated");
    }
    let ran_here = ok_deliveries(&hosts[0], "ticketing").await;
    let ran_there = ok_deliveries(&hosts[1], "ticketing").await;
    assert_eq!(ran_here + ran_there, 20.0);
    assert!(
        ran_there > 0.0,
        "the other host ran none of the 20 ({ran_here} here): the test proves nothing"
    );
}

/// `ordering = "key"` over two hosts whose retries either host may take: every event of
/// one key fails once, and the key's events are still handled in order, none left
/// waiting behind a retry that the other host settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_holds_across_hosts_when_the_other_host_takes_a_retry() {
    let server = NatsServer::start();
    let sidecar = "subscribe = [\"hostile.sequence\"]\nordering = \"key\"\n\
                   [retry]\nbackoff = \"constant\"\ninitial = \"100ms\"\njitter = false\n";
    let hosts: Vec<Host> = (0..2)
        .map(|_| {
            let mut host = Host::on(&Backend::Nats(server.url()));
            host.plugin("orderly", Guest::Hostile, Some(sidecar));
            host.start();
            host
        })
        .collect();
    for n in 0..20_u64 {
        let host = &hosts[usize::try_from(n % 2).unwrap()];
        let status = host
            .http
            .post(host.url("/v1/events/hostile.sequence"))
            .header("ce-id", format!("seq-{n}"))
            .header("ce-partitionkey", "k")
            .json(&json!({"n": n, "fail_once": true}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 202);
    }
    let order = hosts[0]
        .wait_for("the key's 20 events", Duration::from_secs(60), || async {
            let list: Vec<u64> =
                serde_json::from_str(&hosts[0].kv("orderly", "order/k").await?).ok()?;
            (list.len() >= 20).then_some(list)
        })
        .await;
    assert_eq!(order, (0..20).collect::<Vec<u64>>());
    let mut ran = 0.0;
    for host in &hosts {
        ran += ok_deliveries(host, "orderly").await;
    }
    assert_eq!(ran, 20.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_events_fire_once_in_total_across_two_hosts_one_of_them_killed() {
    let server = NatsServer::start();
    let start = || {
        let mut host = Host::on(&Backend::Nats(server.url()));
        host.config("[bus]\nack_wait = \"2s\"\n");
        host.start();
        host
    };
    let first = start();
    let mut second = start();
    let ids: Vec<String> = (0..200).map(|i| format!("timer-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let host = if i % 2 == 0 { &first } else { &second };
        let (status, body) = crate::scheduled::schedule(host, id, Some("1s"), None).await;
        assert_eq!(status, 202, "{body}");
    }
    // One scheduler goes away around the due time; the other fires everything.
    tokio::time::sleep(Duration::from_millis(900)).await;
    second.kill();
    first
        .wait_for("all 200 timers", Duration::from_secs(30), || async {
            let log = first.log().await;
            let fired = log
                .iter()
                .filter(|e| e["event"]["type"] == "reminder.due")
                .count();
            (fired >= 200).then_some(())
        })
        .await;
    // Long enough for a second copy of any timer to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = first.log().await;
    for id in &ids {
        let copies = log
            .iter()
            .filter(|e| e["event"]["id"] == id.as_str())
            .count();
        assert_eq!(copies, 1, "{id} fired {copies} times");
    }
    let listed = first.get_json("/v1/scheduled").await;
    assert_eq!(listed["pending"], 0, "{listed}");
}

/// Messages in the stream `name` now.
async fn stream_messages(url: &str, name: &str) -> u64 {
    let client = async_nats::connect(url).await.unwrap();
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(name)
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

/// The errors of a delivery's failed attempts are kept only until it is settled: a
/// plugin that fails now and then leaves nothing behind in the attempts bucket.
#[tokio::test]
async fn a_settled_deliverys_attempt_errors_leave_nothing_behind() {
    let server = NatsServer::start();
    let mut host = Host::on(&Backend::Nats(server.url()));
    host.plugin(
        "flaky",
        Guest::Hostile,
        Some(
            "subscribe = [\"hostile.fail-until\"]\n[retry]\nbackoff = \"constant\"\n\
             initial = \"100ms\"\njitter = false\nmax_attempts = 5\n",
        ),
    );
    host.start();
    for id in ["flaky-1", "flaky-2"] {
        assert_eq!(host.send("hostile.fail-until", id, json!({})).await, 202);
    }
    for id in ["flaky-1", "flaky-2"] {
        let attempt = host
            .wait_for("the third attempt", Duration::from_secs(20), || async {
                host.kv("flaky", &format!("recovered/{id}")).await
            })
            .await;
        assert_eq!(attempt, "3");
    }
    host.wait_for(
        "the attempts bucket to empty",
        Duration::from_secs(20),
        || async {
            (stream_messages(&server.url(), "KV_switchyard-attempts").await == 0).then_some(())
        },
    )
    .await;
}

/// A deleted KV key leaves nothing behind in the plugin's bucket either, as a deleted row
/// on the embedded log: the bucket does not grow with every key a plugin ever deleted.
#[tokio::test]
async fn a_deleted_kv_key_leaves_nothing_behind() {
    let server = NatsServer::start();
    let mut host = Host::on(&Backend::Nats(server.url()));
    host.plugin(
        "keeper",
        Guest::Hostile,
        Some("subscribe = [\"hostile.kv-pair\", \"hostile.kv-delete\"]\nordering = \"key\"\n"),
    );
    host.start();
    let bucket = "KV_switchyard-kv-keeper";
    assert_eq!(host.send("hostile.kv-pair", "x", json!({})).await, 202);
    host.wait_for("the pair", Duration::from_secs(20), || async {
        host.kv("keeper", "b/x").await
    })
    .await;
    // The pair and its commit record.
    assert_eq!(stream_messages(&server.url(), bucket).await, 3);
    assert_eq!(
        host.send("hostile.kv-delete", "del-x", json!({})).await,
        202
    );
    host.wait_for("the deletion", Duration::from_secs(20), || async {
        host.kv("keeper", "a/x").await.is_none().then_some(())
    })
    .await;
    host.wait_for("its marker to go", Duration::from_secs(20), || async {
        // `b/x` and the two commit records.
        (stream_messages(&server.url(), bucket).await == 3).then_some(())
    })
    .await;
    assert_eq!(host.kv("keeper", "b/x").await.as_deref(), Some("1"));
}
