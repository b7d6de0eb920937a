//! Retention on the embedded log, through the real binary: 200,000 events ingested
//! without pause under a small `[log] max_bytes` keep the database file under a stated
//! bound, while the events of a paused plugin are all kept (and handled once it resumes)
//! and a type kept forever survives; a plugin added afterwards with `start = "earliest"`
//! starts at the oldest event kept.
//!
//! Rules that differ by type hold on both backends: on NATS each event is stored with
//! its rule's age as its own time to live.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

/// `[log] max_bytes`.
const MAX_BYTES: u64 = 8 << 20;
/// What the database file (without its WAL) may reach at any moment: `max_bytes` and
/// half again, for what ingest appends in one `retention_interval` before retention
/// catches up. Measured on a 2-core machine: about 9.1 MB (8.7 MiB) at most.
const FILE_BOUND: u64 = 12 << 20;
/// What the WAL beside it may reach: it is reused from the start after each checkpoint
/// that every reader has passed. Measured: about 4.5 MB at most.
const WAL_BOUND: u64 = 16 << 20;
/// Events ingested.
const EVENTS: usize = 200_000;
/// Events per batch request.
const BATCH: usize = 1000;
/// Most events `sink` may have left to settle before the next batch is sent.
const MAX_LAG: u64 = 4000;
/// Of every this many events, one is of the paused plugin's type and one of the type
/// kept forever; the rest are settled at once by `sink`.
const SPACING: usize = 200;

const CONFIG: &str = "[log]\nmax_bytes = \"8MiB\"\nretention_interval = \"100ms\"\n\
    [[log.retention]]\ntypes = \"ledger.>\"\nmax_age = \"forever\"\n";

/// The type of the `i`-th event of a batch.
fn event_type(i: usize) -> &'static str {
    match i % SPACING {
        0 => "held.order",
        n if n == SPACING / 2 => "ledger.entry",
        _ => "bulk.sample",
    }
}

fn batch(b: usize) -> String {
    let pad = "x".repeat(200);
    let events: Vec<Value> = (0..BATCH)
        .map(|i| {
            let n = b * BATCH + i;
            json!({"specversion": "1.0", "id": format!("e-{n}"), "source": "/retention",
                   "type": event_type(i), "data": {"n": n, "pad": pad}})
        })
        .collect();
    serde_json::to_string(&events).unwrap()
}

/// Samples the sizes of the database file and its WAL every few milliseconds, keeping
/// the largest, until dropped.
struct FileWatch {
    largest: Arc<(AtomicU64, AtomicU64)>,
    stop: Arc<AtomicBool>,
}

impl FileWatch {
    fn start(database: PathBuf) -> Self {
        let largest = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (sizes, stopped) = (Arc::clone(&largest), Arc::clone(&stop));
        std::thread::spawn(move || {
            let wal = PathBuf::from(format!("{}-wal", database.display()));
            while !stopped.load(Ordering::Relaxed) {
                sizes.0.fetch_max(size(&database), Ordering::Relaxed);
                sizes.1.fetch_max(size(&wal), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { largest, stop }
    }

    /// The largest database file and WAL seen so far.
    fn largest(&self) -> (u64, u64) {
        (
            self.largest.0.load(Ordering::Relaxed),
            self.largest.1.load(Ordering::Relaxed),
        )
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Every id of the events in the log whose type matches `pattern`.
async fn ids_in_log(host: &Host, pattern: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut after = 0u64;
    // Bounded: the log holds far fewer than this many pages.
    for _ in 0..1000 {
        let page = host
            .get_json(&format!(
                "/v1/events?type={pattern}&after={after}&limit=1000"
            ))
            .await;
        let events = page["events"].as_array().unwrap();
        let Some(last) = events.last() else {
            return ids;
        };
        after = last["sequence"].as_u64().unwrap();
        ids.extend(
            events
                .iter()
                .map(|e| e["event"]["id"].as_str().unwrap().to_owned()),
        );
    }
    panic!("the log did not end");
}

/// Every key of `plugin`'s KV under `prefix`.
async fn kv_keys(host: &Host, plugin: &str, prefix: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut after = String::new();
    for _ in 0..1000 {
        let page = host
            .get_json(&format!(
                "/v1/plugins/{plugin}/kv?prefix={prefix}&limit=1000&after={after}"
            ))
            .await;
        keys.extend(
            page["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_owned()),
        );
        match page["next_after"].as_str() {
            Some(next) => after = next.to_owned(),
            None => return keys,
        }
    }
    panic!("the keys did not end");
}

async fn post_control(host: &Host, plugin: &str, action: &str) {
    let response = host
        .http
        .post(host.url(&format!("/v1/plugins/{plugin}/{action}")))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{action} {plugin}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_max_bytes_bounds_the_file_and_keeps_what_is_unsettled_or_kept_forever() {
    let mut host = Host::new();
    host.plugin(
        "sink",
        Guest::Noop,
        Some("subscribe = [\"bulk.>\"]\nconcurrency = 4\ninstance = \"reuse\"\n"),
    );
    host.plugin(
        "held",
        Guest::Hostile,
        Some(
            "subscribe = [\"held.>\"]\nconcurrency = 2\n[config]\nbehaviour = \"hostile.count\"\n",
        ),
    );
    host.config(CONFIG);
    host.start();
    let watch = FileWatch::start(host.data_dir().join("switchyard.db"));

    // The operator pauses `held` before the events arrive: none of them is settled.
    post_control(&host, "held", "pause").await;

    let started = Instant::now();
    for b in 0..EVENTS / BATCH {
        // Ingest at the pace `sink` keeps: what it has not settled is kept, and would
        // measure the dispatcher's speed rather than retention.
        host.wait_for("sink to keep up", Duration::from_secs(30), || async {
            let lag = host.status("sink").await?["lag"].as_u64()?;
            (lag <= MAX_LAG).then_some(())
        })
        .await;
        let body = batch(b);
        // A full writer answers 503 with Retry-After: wait and send the batch again.
        let mut accepted = false;
        for _ in 0..200 {
            let response = host
                .http
                .post(host.url("/v1/events"))
                .header("content-type", "application/cloudevents-batch+json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            match response.status().as_u16() {
                202 => {
                    accepted = true;
                    break;
                }
                503 => tokio::time::sleep(Duration::from_millis(50)).await,
                other => panic!("batch {b}: {other} {}", response.text().await.unwrap()),
            }
        }
        assert!(accepted, "batch {b} was refused for 10 s");
    }
    let ingest = started.elapsed();
    host.wait_caught_up("sink", Duration::from_secs(60)).await;
    host.wait_for(
        "the log within max_bytes",
        Duration::from_secs(30),
        || async {
            let used = host.metric_if_any("switchyard_log_used_bytes").await?;
            (used <= MAX_BYTES as f64).then_some(())
        },
    )
    .await;
    let (largest_file, largest_wal) = watch.largest();
    let deleted = host
        .metric("switchyard_log_retention_deleted_events_total")
        .await;
    eprintln!(
        "{EVENTS} events ingested in {ingest:?}; largest database file {largest_file} bytes \
         (bound {FILE_BOUND}), largest WAL {largest_wal} bytes (bound {WAL_BOUND}); \
         {deleted} events deleted"
    );
    assert!(
        largest_file <= FILE_BOUND,
        "the database file reached {largest_file} bytes, above {FILE_BOUND}"
    );
    assert!(
        largest_wal <= WAL_BOUND,
        "the WAL reached {largest_wal} bytes, above {WAL_BOUND}"
    );
    assert!(deleted >= (EVENTS as f64) * 0.8, "{deleted} events deleted");
    assert_eq!(
        host.metric("switchyard_log_retention_blocked").await,
        0.0,
        "what the paused plugin and the ledger keep fits within max_bytes"
    );

    // Every event of the paused plugin is still in the log, none handled yet; every
    // ledger event survived.
    let held = ids_in_log(&host, "held.>").await;
    assert_eq!(held.len(), EVENTS / SPACING);
    assert!(kv_keys(&host, "held", "seen/").await.is_empty());
    let ledger = ids_in_log(&host, "ledger.>").await;
    assert_eq!(ledger.len(), EVENTS / SPACING);

    // Resumed, the plugin handles every one of them.
    post_control(&host, "held", "resume").await;
    let expected: BTreeSet<String> = held.iter().map(|id| format!("seen/{id}")).collect();
    host.wait_for(
        "the paused plugin's events handled",
        Duration::from_secs(60),
        || async { (kv_keys(&host, "held", "seen/").await == expected).then_some(()) },
    )
    .await;

    // A plugin added now with `start = "earliest"` starts at the oldest event kept: it
    // gets every ledger event, from the first one ingested.
    host.plugin(
        "late",
        Guest::Hostile,
        Some(
            "subscribe = [\"ledger.>\"]\nstart = \"earliest\"\nconcurrency = 4\n\
             [config]\nbehaviour = \"hostile.count\"\n",
        ),
    );
    let expected: BTreeSet<String> = ledger.iter().map(|id| format!("seen/{id}")).collect();
    host.wait_for(
        "the new plugin to handle every ledger event",
        Duration::from_secs(60),
        || async { (kv_keys(&host, "late", "seen/").await == expected).then_some(()) },
    )
    .await;
    assert_eq!(ids_in_log(&host, "ledger.>").await, ledger);
    let late = host.status("late").await.unwrap();
    assert_eq!(late["failed"], 0, "{late}");
}

/// A type kept forever, a type kept a second, and a type no rule matches.
async fn ages_by_type_keep_each_type_as_long_as_its_rule_says(backend: Backend) {
    let mut host = Host::on(&backend);
    host.config(
        "[log]\nretention_interval = \"100ms\"\n\n\
         [[log.retention]]\ntypes = \"ledger.>\"\nmax_age = \"forever\"\n\n\
         [[log.retention]]\ntypes = \"tick.>\"\nmax_age = \"1s\"\ndelete_unsettled = true\n",
    );
    host.start();
    let events: Vec<Value> = ["ledger.entry", "tick.a", "note.added", "tick.b"]
        .iter()
        .enumerate()
        .map(|(i, ty)| {
            json!({"specversion": "1.0", "id": format!("r{i}"), "source": "/retention",
                   "type": ty, "data": {}})
        })
        .collect();
    let response = host.send_batch(&Value::Array(events)).await;
    assert_eq!(response.status(), 202);
    // The embedded log keeps its newest event whatever its age: let it be a kept one.
    assert_eq!(host.send("note.added", "r4", json!({})).await, 202);

    host.wait_for("the ticks to age out", Duration::from_secs(30), || async {
        ids_in_log(&host, "tick.>").await.is_empty().then_some(())
    })
    .await;
    // The others outlive the longest age too (on NATS, the stream's `max_age`).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kept: Vec<String> = ids_in_log(&host, ">").await.into_iter().collect();
    assert_eq!(kept, ["r0", "r2", "r4"]);
}

/// With `ordering = "key"`, an event waiting for its retry holds its key; when a rule
/// deletes it unsettled meanwhile, its retry never comes, and the key's next events go on
/// instead of waiting behind it for good.
async fn a_key_whose_retrying_event_aged_out_goes_on(backend: Backend) {
    let mut host = Host::on(&backend);
    host.config(
        "[log]\nretention_interval = \"100ms\"\n\n\
         [[log.retention]]\ntypes = \"hostile.retry\"\nmax_age = \"1s\"\ndelete_unsettled = true\n",
    );
    host.plugin(
        "keyed",
        Guest::Hostile,
        Some(
            "subscribe = [\"hostile.>\"]\nordering = \"key\"\n\
             [retry]\nbackoff = \"constant\"\ninitial = \"3s\"\njitter = false\nmax_attempts = 100\n",
        ),
    );
    host.start();
    for (ty, id) in [("hostile.retry", "first"), ("hostile.count", "next")] {
        let status = host
            .http
            .post(host.url(&format!("/v1/events/{ty}")))
            .header("ce-id", id)
            .header("ce-subject", "order-1")
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 202);
    }
    host.wait_for(
        "the first event to age out",
        Duration::from_secs(30),
        || async {
            ids_in_log(&host, "hostile.retry")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    host.wait_for(
        "the next event of the key",
        Duration::from_secs(40),
        || async { host.kv("keyed", "seen/next").await },
    )
    .await;
}

crate::on_both_backends!(
    ages_by_type_keep_each_type_as_long_as_its_rule_says,
    a_key_whose_retrying_event_aged_out_goes_on,
);
