//! Durability through restarts of the real binary: after a graceful restart and after
//! repeated SIGKILLs mid-stream, every event that got `202` is handled by every subscribed
//! plugin with its effects committed once, and cursors resume without redelivering what
//! was committed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

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
    host.wait_caught_up("counter", Duration::from_secs(60))
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
    let counted = crate::support::counted_ids(&log);
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

/// Waits for `host` to answer `/readyz` with `503`.
async fn unready(host: &Host) {
    host.wait_for("/readyz to answer 503", Duration::from_secs(2), || async {
        let ready = reqwest::get(host.url("/readyz")).await.ok()?;
        (ready.status() == 503).then_some(())
    })
    .await;
}

/// With `shutdown_drain`, a host told to stop first answers `/readyz` with `503` while it
/// still takes events, so a load balancer moves producers away before connections fail;
/// then it stops as usual, its events handled.
#[tokio::test]
async fn a_host_told_to_stop_drains_as_unready_before_it_stops_accepting() {
    let mut host = Host::new();
    host.plugin("counter", Guest::Hostile, Some(COUNTER));
    host.config("shutdown_drain = \"3s\"\n");
    host.start();
    let ready = reqwest::get(host.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let mut acked = send_stream(&host, "d1", 20).await;
    let told = std::time::Instant::now();
    host.terminate();
    unready(&host).await;
    acked.extend(send_stream(&host, "d2", 20).await);
    assert!(
        told.elapsed() < Duration::from_secs(3),
        "the drain was over"
    );
    host.wait_stopped(Duration::from_secs(30));
    assert!(told.elapsed() >= Duration::from_secs(3), "it did not drain");
    host.start();
    assert_eq!(acked.len(), 40);
    assert_all_handled_once(&host, &acked).await;
    // A second signal ends the drain at once.
    let told = std::time::Instant::now();
    host.terminate();
    unready(&host).await;
    host.terminate();
    host.wait_stopped(Duration::from_secs(30));
    assert!(told.elapsed() < Duration::from_secs(3), "it drained on");
}

/// A second host started on a running host's data directory would deliver every event
/// again: it is refused before it listens, naming the log and the running host, which goes
/// on serving. A host killed with SIGKILL leaves its lock file behind but not its lock.
#[tokio::test]
async fn a_second_host_on_the_same_log_is_refused_and_a_killed_hosts_lock_is_released() {
    let mut host = Host::new();
    host.plugin("counter", Guest::Hostile, Some(COUNTER));
    host.start();
    let mut acked = send_stream(&host, "l1", 20).await;
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--plugins"])
        .arg(host.plugins_dir())
        .arg("--data")
        .arg(host.data_dir())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            second.kill().unwrap();
            panic!("a second host started on a log another host holds");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(second.stdout.is_empty(), "it never listened: {stderr}");
    let pid = host.pid().unwrap();
    assert!(
        stderr.contains(&format!("is in use by another process (pid {pid})")),
        "{stderr}"
    );
    assert!(stderr.contains("switchyard.db"), "{stderr}");
    acked.extend(send_stream(&host, "l2", 20).await);
    host.kill();
    assert!(host.data_dir().join("switchyard.db.lock").exists());
    host.start();
    acked.extend(send_stream(&host, "l3", 20).await);
    assert_eq!(acked.len(), 60);
    assert_all_handled_once(&host, &acked).await;
}

/// The crash test's two subscribers: each records every `crash.*` event under its tag.
pub(crate) fn crash_counter(tag: &str) -> String {
    format!(
        "subscribe = [\"crash.>\"]\nconcurrency = 8\n[config]\nbehaviour = \"hostile.count\"\ntag = \"{tag}\"\n"
    )
}

/// A producer that keeps going across host crashes: every event is retried with the same
/// id until it gets `202` (dedupe makes that safe), following the host to its new address
/// after each restart. Returns the ids that got `202`.
pub(crate) async fn send_through_crashes(
    http: reqwest::Client,
    mut url: watch::Receiver<String>,
    ids: Vec<String>,
    acked_so_far: Arc<AtomicUsize>,
) -> BTreeSet<String> {
    let mut acked = BTreeSet::new();
    for id in ids {
        for _attempt in 0..200 {
            let base = url.borrow_and_update().clone();
            let sent = http
                .post(format!("{base}/v1/events/crash.tick"))
                .header("ce-id", &id)
                .json(&json!({"id": id}))
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            if matches!(&sent, Ok(response) if response.status() == 202) {
                acked.insert(id.clone());
                acked_so_far.fetch_add(1, Ordering::Relaxed);
                break;
            }
            // The host is down or restarting: wait for its next address, or retry soon.
            let _ = tokio::time::timeout(Duration::from_millis(50), url.changed()).await;
        }
    }
    acked
}

/// A small xorshift generator, seeded from the clock and printed, so a failing run's kill
/// points can be told apart.
pub(crate) struct Xorshift(pub(crate) u64);

impl Xorshift {
    pub(crate) fn next_below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[tokio::test]
async fn repeated_sigkills_lose_and_duplicate_nothing_acknowledged() {
    const EVENTS: usize = 2400;
    const CLIENTS: usize = 6;
    const KILLS: usize = 5;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut random = Xorshift(seed);
    let mut host = Host::new();
    host.plugin("alpha", Guest::Hostile, Some(&crash_counter("alpha")));
    host.plugin("beta", Guest::Hostile, Some(&crash_counter("beta")));
    host.start();
    let (publish_url, url) = watch::channel(host.url(""));
    let acked_so_far = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let ids = (client..EVENTS)
                .step_by(CLIENTS)
                .map(|n| format!("c-{n}"))
                .collect();
            tokio::spawn(send_through_crashes(
                host.http.clone(),
                url.clone(),
                ids,
                Arc::clone(&acked_so_far),
            ))
        })
        .collect();

    // Each kill lands at a random point inside its own slice of the stream, so all of them
    // hit a host under full load.
    let slice = EVENTS / (KILLS + 1);
    let mut kills = 0;
    for k in 0..KILLS {
        let at = k * slice + slice / 4 + random.next_below(slice as u64 / 2) as usize;
        host.wait_for(
            "the stream to progress",
            Duration::from_secs(120),
            || async { (acked_so_far.load(Ordering::Relaxed) >= at).then_some(()) },
        )
        .await;
        host.kill();
        kills += 1;
        host.start();
        publish_url.send_replace(host.url(""));
    }
    let mut acked = BTreeSet::new();
    for sender in senders {
        acked.extend(sender.await.unwrap());
    }

    let audit = Audit::of(&host, &acked, &["alpha", "beta"]).await;
    println!(
        "crash test (seed {seed}): sent {EVENTS}, acknowledged {}, kills {kills}, {audit}",
        acked.len()
    );
    assert_eq!(kills, KILLS);
    audit.assert_whole(EVENTS, &acked);
}

/// What the `crash.*` counters of some plugins committed, once they caught up.
pub(crate) struct Audit {
    lost: usize,
    lost_ids: Vec<String>,
    duplicated: usize,
    half_appeared: usize,
    stored: usize,
    counted_by_first: u64,
}

impl std::fmt::Display for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lost {} {:?}, duplicated effects {}, stored without a handler {}",
            self.lost, self.lost_ids, self.duplicated, self.half_appeared
        )
    }
}

impl Audit {
    /// Asserts that all `sent` events were acknowledged, stored once, and handled by
    /// every plugin.
    pub(crate) fn assert_nothing_lost(&self, sent: usize, acked: &BTreeSet<String>) {
        assert_eq!(acked.len(), sent, "every event eventually got 202");
        assert_eq!(self.lost, 0, "acknowledged events were lost");
        assert_eq!(self.half_appeared, 0, "stored events were left unhandled");
        assert_eq!(self.stored, sent, "an event appeared that nobody sent");
    }

    /// Waits for every plugin to reach the head of the log, then counts effects.
    pub(crate) async fn of(host: &Host, acked: &BTreeSet<String>, plugins: &[&str]) -> Self {
        for plugin in plugins {
            host.wait_caught_up(plugin, Duration::from_secs(120)).await;
        }
        let log = host.log().await;
        let stored: Vec<String> = log
            .iter()
            .filter(|e| e["event"]["type"] == "crash.tick")
            .map(|e| e["event"]["id"].as_str().unwrap().to_owned())
            .collect();
        let stored_set: BTreeSet<&String> = stored.iter().collect();
        let mut effects: BTreeMap<(String, String), usize> = BTreeMap::new();
        for event in log
            .iter()
            .filter(|e| e["event"]["type"] == "hostile.counted")
        {
            let data = &event["event"]["data"];
            let key = (
                data["tag"].as_str().unwrap().to_owned(),
                data["id"].as_str().unwrap().to_owned(),
            );
            *effects.entry(key).or_default() += 1;
        }
        let mut lost = 0;
        let mut lost_ids = Vec::new();
        for id in acked {
            for plugin in plugins {
                let handled = effects.contains_key(&((*plugin).to_owned(), id.clone()))
                    && host.kv(plugin, &format!("seen/{id}")).await.is_some();
                if !handled {
                    lost += 1;
                    lost_ids.push(format!("{plugin}/{id}"));
                }
            }
        }
        let duplicated: usize =
            effects.values().map(|n| n - 1).sum::<usize>() + (stored.len() - stored_set.len());
        // An event stored without a 202 (the host died between commit and answer) must
        // still be whole: handled by every plugin, like any other.
        let half_appeared = stored_set
            .iter()
            .filter(|id| {
                plugins
                    .iter()
                    .any(|plugin| !effects.contains_key(&((*plugin).to_owned(), (**id).clone())))
            })
            .count();
        let mut counted_by_first = 0u64;
        for shard in 0..16 {
            if let Some(total) = host.kv(plugins[0], &format!("total/{shard}")).await {
                counted_by_first += total.parse::<u64>().unwrap();
            }
        }
        Self {
            lost,
            lost_ids,
            duplicated,
            half_appeared,
            stored: stored_set.len(),
            counted_by_first,
        }
    }

    /// Asserts that all `sent` events were acknowledged, stored once and handled once
    /// (no effect twice), and that the read-modify-write counters add up exactly.
    pub(crate) fn assert_whole(&self, sent: usize, acked: &BTreeSet<String>) {
        self.assert_nothing_lost(sent, acked);
        assert_eq!(self.duplicated, 0, "effects were committed twice");
        assert_eq!(
            self.counted_by_first, sent as u64,
            "the read-modify-write counters saw a repeat"
        );
    }
}
