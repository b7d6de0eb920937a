//! Hot reload through the real binary: plugin files dropped, replaced, broken, deleted
//! and half-copied while the host runs, sidecar changes applied live, swaps under load,
//! and a warm compile cache on restart.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;

use crate::support::guests::{self, Guest};
use crate::support::host::{Backend, Host};

const WAIT: Duration = Duration::from_secs(30);

fn bytes(guest: Guest) -> Vec<u8> {
    std::fs::read(guests::path(guest)).unwrap()
}

/// The same component with a custom section appended: different bytes, same behaviour.
fn variant(guest: Guest, label: &str) -> Vec<u8> {
    let mut component = bytes(guest);
    let name = b"switchyard-test";
    let mut payload = vec![u8::try_from(name.len()).unwrap()];
    payload.extend_from_slice(name);
    payload.extend_from_slice(label.as_bytes());
    component.push(0); // custom section id
    component.push(u8::try_from(payload.len()).unwrap()); // LEB128 size (< 128)
    component.extend_from_slice(&payload);
    component
}

async fn wait_serving(host: &Host, name: &str, sha256: Option<&str>) -> serde_json::Value {
    host.wait_for(&format!("{name} to serve"), WAIT, || async {
        let status = host.status(name).await?;
        let serving =
            status["status"] == "running" && sha256.is_none_or(|sha| status["sha256"] == sha);
        serving.then_some(status)
    })
    .await
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

async fn count(host: &Host, plugin: &str, ty: &str) -> Option<u64> {
    host.kv(plugin, &format!("count/{ty}")).await?.parse().ok()
}

#[tokio::test]
async fn dropped_plugins_serve_removed_ones_stop_and_re_added_ones_resume() {
    let mut host = Host::new();
    host.start();
    host.deploy("audit.wasm", &bytes(Guest::AuditTrail));
    wait_serving(&host, "audit", None).await;
    for n in 0..3 {
        assert_eq!(
            host.send("tick.one", &format!("one-{n}"), json!({})).await,
            202
        );
    }
    host.wait_for("three counted", WAIT, || async {
        (count(&host, "audit", "tick.one").await? == 3).then_some(())
    })
    .await;

    std::fs::remove_file(host.plugins_dir().join("audit.wasm")).unwrap();
    host.wait_for("the plugin to go", WAIT, || async {
        host.status("audit").await.is_none().then_some(())
    })
    .await;
    // Events keep arriving while it is gone; they wait in the log at its cursor.
    for n in 3..6 {
        assert_eq!(
            host.send("tick.one", &format!("one-{n}"), json!({})).await,
            202
        );
    }
    assert_eq!(count(&host, "audit", "tick.one").await, Some(3));
    // A host started then says whose cursor the log keeps with no file to serve it.
    host.stop();
    host.start();
    host.wait_for("the warning", WAIT, || async {
        let said = host.logged("no file here serves");
        said.iter().any(|line| line.contains("audit")).then_some(())
    })
    .await;

    host.deploy("audit.wasm", &bytes(Guest::AuditTrail));
    host.wait_for("the missed events, once each", WAIT, || async {
        (count(&host, "audit", "tick.one").await? == 6).then_some(())
    })
    .await;
    let status = wait_serving(&host, "audit", None).await;
    assert_eq!(status["lag"], 0);
}

#[tokio::test]
async fn polling_finds_changes_where_file_events_are_off() {
    let mut host = Host::new();
    host.config("[watch]\nmode = \"poll\"\npoll_interval = \"200ms\"\n");
    host.start();
    host.deploy("audit.wasm", &bytes(Guest::AuditTrail));
    wait_serving(&host, "audit", None).await;
    // A rename is a removal and an addition.
    std::fs::rename(
        host.plugins_dir().join("audit.wasm"),
        host.plugins_dir().join("ledger.wasm"),
    )
    .unwrap();
    wait_serving(&host, "ledger", None).await;
    host.wait_for("the old name to go", WAIT, || async {
        host.status("audit").await.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_broken_file_over_a_working_plugin_leaves_it_serving() {
    let mut host = Host::new();
    host.plugin("audit", Guest::AuditTrail, None);
    host.start();
    let working = wait_serving(&host, "audit", None).await;

    host.deploy("audit.wasm", b"\0asm\x0d\0\x01\0 this is not a component");
    let status = host
        .wait_for("the load error", WAIT, || async {
            let status = host.status("audit").await?;
            status["load_error"].is_string().then_some(status)
        })
        .await;
    assert_eq!(status["status"], "running");
    assert_eq!(
        status["sha256"], working["sha256"],
        "the old version still serves"
    );
    assert!(
        status["load_error"]
            .as_str()
            .unwrap()
            .contains("invalid component"),
        "{status}"
    );
    assert_eq!(
        host.metric("switchyard_plugin_load_failures_total{plugin=\"audit\"}")
            .await,
        1.0
    );
    assert_eq!(
        host.metric("switchyard_plugin_loads_total{plugin=\"audit\"}")
            .await,
        1.0
    );
    assert_eq!(host.send("still.served", "s-1", json!({})).await, 202);
    host.wait_for("the old version to handle it", WAIT, || async {
        count(&host, "audit", "still.served").await
    })
    .await;
}

#[tokio::test]
async fn a_half_copied_file_is_never_loaded() {
    let mut host = Host::new();
    host.plugin("audit", Guest::AuditTrail, None);
    host.start();
    let old = wait_serving(&host, "audit", None).await;
    let full = variant(Guest::AuditTrail, "v2");
    let half = &full[..full.len() / 2];

    // A copy in progress, over a working plugin and as a new one.
    std::fs::write(host.plugins_dir().join("audit.wasm"), half).unwrap();
    std::fs::write(host.plugins_dir().join("fresh.wasm"), half).unwrap();
    host.wait_for("the half file to be looked at", WAIT, || async {
        let fresh = host.status("fresh").await?;
        (fresh["status"] == "failed").then_some(())
    })
    .await;
    let status = host.status("audit").await.unwrap();
    assert_eq!(
        status["sha256"], old["sha256"],
        "the half file did not replace it"
    );

    // The copy completes.
    std::fs::write(host.plugins_dir().join("audit.wasm"), &full).unwrap();
    std::fs::write(host.plugins_dir().join("fresh.wasm"), &full).unwrap();
    let sha = sha256_hex(&full);
    wait_serving(&host, "audit", Some(&sha)).await;
    wait_serving(&host, "fresh", Some(&sha)).await;
}

#[tokio::test]
async fn sidecar_changes_to_concurrency_and_retry_policy_apply_live() {
    let mut host = Host::new();
    host.plugin(
        "picky",
        Guest::Hostile,
        Some("subscribe = [\"hostile.retry\"]\nconcurrency = 1\n[retry]\nmax_attempts = 5\ninitial = \"1h\"\nmax = \"1h\"\n"),
    );
    host.start();
    let status = wait_serving(&host, "picky", None).await;
    assert_eq!(status["policy"]["concurrency"], 1);

    host.deploy(
        "picky.toml",
        b"subscribe = [\"hostile.retry\"]\nconcurrency = 3\n[retry]\nmax_attempts = 2\nbackoff = \"constant\"\ninitial = \"50ms\"\njitter = false\n",
    );
    host.wait_for("the new policy", WAIT, || async {
        let status = host.status("picky").await?;
        (status["policy"]["concurrency"] == 3 && status["policy"]["retry"]["max_attempts"] == 2)
            .then_some(())
    })
    .await;
    // The new retry policy is the one deliveries follow: two attempts, 50 ms apart.
    assert_eq!(host.send("hostile.retry", "live-1", json!({})).await, 202);
    let letter = host
        .wait_for("the dead letter", WAIT, || async {
            let list = host.get_json("/v1/dlq?plugin=picky").await;
            list["dead_letters"].as_array()?.first().cloned()
        })
        .await;
    assert_eq!(letter["reason"], "exhausted");
    assert_eq!(letter["errors"].as_array().unwrap().len(), 2);

    // An edit that keeps the size, written in place with the old modification time kept
    // (as `cp -p` and `rsync -a` do), is seen.
    let sidecar = host.plugins_dir().join("picky.toml");
    let text = std::fs::read_to_string(&sidecar).unwrap();
    let modified = std::fs::metadata(&sidecar).unwrap().modified().unwrap();
    std::fs::write(
        &sidecar,
        text.replace("max_attempts = 2", "max_attempts = 4"),
    )
    .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&sidecar)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    host.wait_for("the same-size edit", WAIT, || async {
        let status = host.status("picky").await?;
        (status["policy"]["retry"]["max_attempts"] == 4).then_some(())
    })
    .await;
    // A file whose modification time is ahead of the host's clock (copied from a machine
    // whose clock runs ahead) is not taken for one still being written.
    let ahead = host.plugins_dir().join(".ahead.wasm.tmp");
    std::fs::copy(guests::path(Guest::Noop), &ahead).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&ahead)
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    std::fs::rename(&ahead, host.plugins_dir().join("ahead.wasm")).unwrap();
    wait_serving(&host, "ahead", None).await;
    // What the host does not read, or reads otherwise than its operator may think, it
    // says: a sidecar beside no plugin file, and a file describing another plugin's name.
    host.sidecar("ahaed", Some("concurrency = 2\n"));
    host.wait_for("the stray sidecar reported", WAIT, || async {
        let said = host.logged("`ahaed.toml` is beside no plugin file");
        (!said.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        host.logged("`ahead.wasm` describes itself as `noop`").len(),
        1
    );
    host.deploy(
        "also.wasm",
        &std::fs::read(guests::path(Guest::Noop)).unwrap(),
    );
    wait_serving(&host, "also", None).await;
    let said = host
        .wait_for("the second file reported", WAIT, || async {
            let said = host.logged("`also.wasm` describes itself as `noop`, like `ahead.wasm`");
            (!said.is_empty()).then_some(said)
        })
        .await;
    assert_eq!(said.len(), 1, "{said:?}");
}

#[tokio::test]
async fn a_warm_compile_cache_loads_plugins_without_compiling() {
    let mut host = Host::new();
    host.plugin("audit", Guest::AuditTrail, None)
        .plugin("ticketing", Guest::Ticketing, None)
        .plugin("notifier", Guest::Notifier, None);
    host.start();
    assert_eq!(
        host.metric("switchyard_compile_cache_misses_total").await,
        3.0
    );
    assert_eq!(
        host.metric("switchyard_compile_cache_hits_total").await,
        0.0
    );
    host.stop();
    host.start();
    assert_eq!(
        host.metric("switchyard_compile_cache_hits_total").await,
        3.0
    );
    assert_eq!(
        host.metric("switchyard_compile_cache_misses_total").await,
        0.0
    );
    // Dropping the same bytes again under another name does not compile either.
    host.deploy("audit-copy.wasm", &bytes(Guest::AuditTrail));
    wait_serving(&host, "audit-copy", None).await;
    assert_eq!(
        host.metric("switchyard_compile_cache_misses_total").await,
        0.0
    );
}

/// Compiled code is mapped from the cache; a cache file that does not deserialize (cut
/// short, overwritten) is compiled again rather than failing the plugin.
#[tokio::test]
async fn a_damaged_compiled_plugin_in_the_cache_is_compiled_again() {
    let mut host = Host::new();
    host.plugin("audit", Guest::AuditTrail, None);
    host.start();
    host.stop();
    let mut damaged = 0;
    for entry in walk(&host.data_dir().join("compile-cache")) {
        if entry.extension().is_some_and(|e| e == "cwasm") {
            std::fs::write(&entry, b"not compiled code").unwrap();
            damaged += 1;
        }
    }
    assert_eq!(damaged, 1, "one compiled plugin in the cache");
    host.start();
    wait_serving(&host, "audit", None).await;
    assert_eq!(
        host.metric("switchyard_compile_cache_misses_total").await,
        1.0
    );
    audit_counts_an_event(&host).await;
}

/// Compiled code nobody uses goes from the cache when the host starts: another engine's,
/// and a version no plugin is loaded from, once unused for `compile_cache_max_unused`;
/// the loaded plugin's stays, however old, and is marked used.
#[tokio::test]
async fn the_compile_cache_sheds_what_no_loaded_plugin_used_for_too_long() {
    let mut host = Host::new();
    host.config("[runtime]\ncompile_cache_max_unused = \"7d\"\n");
    host.plugin("audit", Guest::AuditTrail, None);
    host.start();
    host.stop();
    let cache = host.data_dir().join("compile-cache");
    let loaded = walk(&cache);
    assert_eq!(loaded.len(), 1, "{loaded:?}");
    let engine_dir = loaded[0].parent().unwrap().to_owned();
    let month_ago = std::time::SystemTime::now() - Duration::from_secs(30 * 86_400);
    let plant = |path: &std::path::Path| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"compiled code of an earlier version").unwrap();
    };
    let replaced = engine_dir.join(format!("{}.cwasm", "ab".repeat(32)));
    let other_engine = cache.join("00000000deadbeef");
    plant(&replaced);
    plant(&other_engine.join(format!("{}.cwasm", "cd".repeat(32))));
    let recent = engine_dir.join(format!("{}.cwasm", "ef".repeat(32)));
    plant(&recent);
    for path in walk(&cache).iter().filter(|path| **path != recent) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(month_ago).unwrap();
    }

    host.start();
    host.wait_for("the prune", Duration::from_secs(30), || async {
        (!replaced.exists() && !other_engine.exists()).then_some(())
    })
    .await;
    assert!(recent.exists(), "used within the limit: kept");
    let kept: u64 = walk(&cache)
        .iter()
        .map(|path| std::fs::metadata(path).unwrap().len())
        .sum();
    host.wait_for(
        "the cache's size in /metrics",
        Duration::from_secs(10),
        || async {
            let bytes = host.metric("switchyard_compile_cache_bytes").await;
            (bytes == kept as f64).then_some(())
        },
    )
    .await;
    let used = std::fs::metadata(&loaded[0]).unwrap().modified().unwrap();
    assert!(
        used > month_ago,
        "the loaded plugin's code is kept and marked used"
    );
    assert_eq!(
        host.metric("switchyard_compile_cache_hits_total").await,
        1.0
    );
    audit_counts_an_event(&host).await;
}

/// The `audit` plugin (audit-trail) handles an event: its code runs.
async fn audit_counts_an_event(host: &Host) {
    assert_eq!(host.send("audit.check", "a-1", json!({})).await, 202);
    host.wait_for("the event counted", Duration::from_secs(30), || async {
        host.kv("audit", "count/audit.check").await
    })
    .await;
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

async fn swapping_versions_under_load_handles_every_event_exactly_once(backend: Backend) {
    // Fewer on NATS: its commits with KV writes take the plugin's commit lock in turn.
    let events: usize = match backend {
        Backend::Embedded => 20_000,
        Backend::Nats(_) => 3_000,
    };
    let mut host = Host::on(&backend);
    let sidecar = |tag: &str| {
        format!(
            "subscribe = [\"load.>\"]\nconcurrency = 4\n[config]\nbehaviour = \"hostile.count\"\ntag = \"{tag}\"\n"
        )
    };
    host.plugin("swap", Guest::Hostile, Some(&sidecar("v1")));
    host.start();
    let v1 = bytes(Guest::Hostile);
    let v2 = variant(Guest::Hostile, "v2");

    let sender = {
        let url = host.url("/v1/events/load.tick");
        let http = host.http.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for client in 0..8 {
                let (url, http) = (url.clone(), http.clone());
                tasks.push(tokio::spawn(async move {
                    for n in (client..events).step_by(8) {
                        let status = http
                            .post(&url)
                            .header("ce-id", format!("swap-{n}"))
                            .json(&json!({}))
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
        })
    };
    // v1 -> v2 -> v1 -> v2 -> v1, each swap replacing the component and its sidecar.
    let mut swaps = 0;
    for (tag, component) in [("v2", &v2), ("v1", &v1), ("v2", &v2), ("v1", &v1)] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        host.deploy("swap.toml", sidecar(tag).as_bytes());
        host.deploy("swap.wasm", component);
        wait_serving(&host, "swap", Some(&sha256_hex(component))).await;
        swaps += 1;
    }
    sender.await.unwrap();

    let head = host.log().await.last().unwrap()["sequence"]
        .as_u64()
        .unwrap();
    host.wait_for(
        "every event to be handled",
        Duration::from_secs(120),
        || async {
            let status = host.status("swap").await?;
            (status["cursor"].as_u64()? >= head
                && status["in_flight"] == 0
                && status["pending_retries"] == 0)
                .then_some(())
        },
    )
    .await;

    let log = host.log().await;
    let mut tags: BTreeMap<String, String> = BTreeMap::new();
    for event in log
        .iter()
        .filter(|e| e["event"]["type"] == "hostile.counted")
    {
        let id = event["event"]["data"]["id"].as_str().unwrap().to_owned();
        let tag = event["event"]["data"]["tag"].as_str().unwrap().to_owned();
        assert!(tags.insert(id, tag).is_none(), "one follow-up per event");
    }
    let sent: BTreeSet<String> = (0..events).map(|n| format!("swap-{n}")).collect();
    let handled: BTreeSet<String> = tags.keys().cloned().collect();
    let missing: Vec<&String> = sent.difference(&handled).take(5).collect();
    let extra: Vec<&String> = handled.difference(&sent).take(5).collect();
    let dead = host.get_json("/v1/dlq?plugin=swap&limit=3").await;
    assert!(
        missing.is_empty() && extra.is_empty(),
        "every event handled, by exactly one version: {} of {} handled; missing {missing:?}, extra {extra:?}; dead letters {dead}",
        handled.len(),
        sent.len()
    );
    let versions: BTreeSet<&str> = tags.values().map(String::as_str).collect();
    assert_eq!(versions, BTreeSet::from(["v1", "v2"]));
    // The counters prove each event's KV effect committed exactly once.
    let mut total = 0;
    for shard in 0..16 {
        if let Some(n) = host.kv("swap", &format!("total/{shard}")).await {
            total += n.parse::<usize>().unwrap();
        }
    }
    assert_eq!(total, events, "exactly one committed effect per event");
    assert_eq!(swaps, 4);
}

crate::on_both_backends!(multi_thread: swapping_versions_under_load_handles_every_event_exactly_once);

/// A plugin removed for good is forgotten on request, and only once no host serves it:
/// its KV and dead letters go, and a plugin added later under its name starts afresh
/// (from the start of the log, as its sidecar asks, not at the old cursor).
async fn a_removed_plugin_is_forgotten_on_request(backend: Backend) {
    let mut host = Host::on(&backend);
    let sidecar = "subscribe = [\"hostile.count\", \"hostile.reject\"]\nstart = \"earliest\"\n";
    host.plugin("gone", Guest::Hostile, Some(sidecar));
    host.start();
    wait_serving(&host, "gone", None).await;
    assert_eq!(host.send("hostile.count", "c1", json!({})).await, 202);
    assert_eq!(host.send("hostile.reject", "r1", json!({})).await, 202);
    let letters = || async {
        let page = host.get_json("/v1/dlq?plugin=gone").await;
        page["dead_letters"].as_array().map(Vec::len)
    };
    host.wait_for("its KV and its dead letter", WAIT, || async {
        (host.kv("gone", "seen/c1").await.is_some() && letters().await? == 1).then_some(())
    })
    .await;
    let forget = || async {
        host.http
            .delete(host.url("/v1/plugins/gone"))
            .send()
            .await
            .unwrap()
    };
    let absent = || async {
        let list = host.get_json("/v1/plugins").await;
        list["absent"].as_array().unwrap().clone()
    };
    assert_eq!(
        absent().await,
        Vec::<serde_json::Value>::new(),
        "loaded here"
    );
    let refused = forget().await;
    assert_eq!(refused.status(), 409, "forgotten while loaded");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("remove its file"),
        "{body}"
    );

    std::fs::remove_file(host.plugins_dir().join("gone.wasm")).unwrap();
    host.wait_for("the plugin to go", WAIT, || async {
        host.status("gone").await.is_none().then_some(())
    })
    .await;
    // Its state stays, and the listing names it beside the plugins this host serves.
    let listed = absent().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "gone");
    assert_eq!(listed[0]["dead_letters"], 1);
    assert_eq!(host.get_json("/v1/plugins").await["absent_total"], 1);
    // On NATS the server counts a host's last pull until it expires.
    host.wait_for("the plugin to be forgotten", WAIT, || async {
        (forget().await.status() == 204).then_some(())
    })
    .await;
    assert_eq!(host.kv("gone", "seen/c1").await, None);
    assert_eq!(letters().await, Some(0));
    assert_eq!(absent().await, Vec::<serde_json::Value>::new(), "forgotten");

    // Added again: a fresh cursor at the start of the log handles both events again.
    host.plugin("gone", Guest::Hostile, Some(sidecar));
    host.wait_for("both events handled again", WAIT, || async {
        (host.kv("gone", "seen/c1").await.is_some() && letters().await? == 1).then_some(())
    })
    .await;
}

crate::on_both_backends!(a_removed_plugin_is_forgotten_on_request);
