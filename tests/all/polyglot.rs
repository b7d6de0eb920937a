//! Plugins written in Python and JavaScript, built with the stock toolchains
//! (componentize-py, componentize-js) and the SDKs in `plugin-sdk/`, run by the real
//! binary: hot-dropped into a running host, handling events, KV, emits, `retry`,
//! `reject`, a bug with its traceback, a loop stopped by fuel, and files, sockets and
//! HTTP refused inside the sandbox.

use std::time::Duration;

use serde_json::json;

use crate::support::guests::{self, Guest, Polyglot};
use crate::support::host::{Backend, Host};

/// Long enough for a first load, which compiles the interpreter's component: about 25 s
/// alone on two cores, and twice that beside another test compiling one.
const WAIT: Duration = Duration::from_secs(150);

/// Copies a built Python or JavaScript guest into the running host's plugin folder.
fn drop_in(host: &Host, name: &str, guest: Polyglot, sidecar: Option<&str>) {
    host.sidecar(name, sidecar);
    let staged = host.plugins_dir().join(format!(".{name}.wasm.part"));
    std::fs::copy(guests::polyglot_path(guest), &staged).unwrap();
    std::fs::rename(&staged, host.plugins_dir().join(format!("{name}.wasm"))).unwrap();
}

async fn wait_running(host: &Host, name: &str) {
    host.wait_for(&format!("{name} to be running"), WAIT, || async {
        let status = host.status(name).await?;
        (status["status"] == "running").then_some(())
    })
    .await;
}

async fn dead_letters(host: &Host, plugin: &str) -> Vec<serde_json::Value> {
    host.get_json(&format!("/v1/dlq?plugin={plugin}")).await["dead_letters"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The dead letter of event `id` for `plugin`, once it exists.
async fn dead_letter(host: &Host, plugin: &str, id: &str) -> serde_json::Value {
    host.wait_for(&format!("{plugin}'s dead letter of {id}"), WAIT, || async {
        dead_letters(host, plugin)
            .await
            .into_iter()
            .find(|letter| letter["event"]["id"] == id)
    })
    .await
}

/// The Python and JavaScript examples join the Rust ticketing flow: a payment earns
/// loyalty points (Python) and its tickets get a receipt (JavaScript).
async fn python_and_javascript_examples_take_part_in_the_flow(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin("ticketing", Guest::Ticketing, None);
    host.start();
    drop_in(&host, "loyalty", Polyglot::Loyalty, None);
    drop_in(&host, "receipts", Polyglot::Receipts, None);
    wait_running(&host, "loyalty").await;
    wait_running(&host, "receipts").await;

    for (id, order, quantity) in [("pay-1", "o-1", 2), ("pay-2", "o-2", 1)] {
        let data = json!({"order_id": order, "email": "fan@example.com", "quantity": quantity, "amount_cents": 4200});
        assert_eq!(host.send("payment.completed", id, data).await, 202);
    }
    let balance = host
        .wait_for("the loyalty balance", WAIT, || async {
            let points = host.kv("loyalty", "points/fan@example.com").await?;
            (points == "30").then_some(points)
        })
        .await;
    assert_eq!(balance, "30");
    let receipt = host
        .wait_for("the receipt of o-1", WAIT, || async {
            host.kv("receipts", "receipt/o-1").await
        })
        .await;
    let receipt: serde_json::Value = serde_json::from_str(&receipt).unwrap();
    assert_eq!(receipt["tickets"], json!(["o-1-1", "o-1-2"]));
    assert_eq!(receipt["email"], "fan@example.com");

    let log = host
        .wait_for("the examples' emits", WAIT, || async {
            let log = host.log().await;
            let count = |ty: &str| log.iter().filter(|e| e["event"]["type"] == ty).count();
            (count("loyalty.points-awarded") == 2 && count("receipt.issued") == 2).then_some(log)
        })
        .await;
    // The payments may be handled in either order; the balances add up either way.
    let mut awarded: Vec<(u64, u64)> = log
        .iter()
        .filter(|e| e["event"]["type"] == "loyalty.points-awarded")
        .map(|e| {
            let data = &e["event"]["data"];
            (
                data["balance"].as_u64().unwrap(),
                data["earned"].as_u64().unwrap(),
            )
        })
        .collect();
    awarded.sort_unstable();
    assert!(
        awarded == [(10, 10), (30, 20)] || awarded == [(20, 20), (30, 10)],
        "{awarded:?}"
    );
    // A payment without an email is a permanent failure of the Python handler.
    assert_eq!(
        host.send("payment.completed", "pay-bad", json!({"order_id": "o-3"}))
            .await,
        202
    );
    let letter = dead_letter(&host, "loyalty", "pay-bad").await;
    assert_eq!(letter["reason"], "rejected");
    assert_eq!(letter["errors"][0]["message"], "payment without an email");
}

crate::on_both_backends!(python_and_javascript_examples_take_part_in_the_flow);

const PROBE_SIDECAR: &str = "[limits]\nfuel = 20000000\n[retry]\nbackoff = \"constant\"\ninitial = \"100ms\"\njitter = false\nmax_attempts = 2\n";

/// Everything a handler team can do or get wrong, in both languages, against one host.
#[tokio::test]
async fn python_and_javascript_handlers_are_contained_and_their_failures_readable() {
    let mut host = Host::new();
    host.start();
    drop_in(&host, "py", Polyglot::PyProbe, Some(PROBE_SIDECAR));
    drop_in(&host, "js", Polyglot::JsProbe, Some(PROBE_SIDECAR));
    wait_running(&host, "py").await;
    wait_running(&host, "js").await;

    for n in 1..=3 {
        assert_eq!(
            host.send("probe.count", &format!("count-{n}"), json!({}))
                .await,
            202
        );
    }
    for kind in [
        "retry", "reject", "crash", "loop", "file", "socket", "fetch", "stdio", "async", "bad-json",
    ] {
        assert_eq!(
            host.send(&format!("probe.{kind}"), kind, json!({})).await,
            202
        );
    }

    for plugin in ["py", "js"] {
        // KV and emits.
        host.wait_for(&format!("{plugin}'s count"), WAIT, || async {
            (host.kv(plugin, "count").await.as_deref() == Some("3")).then_some(())
        })
        .await;
        // `Retry` is retried, then dead-lettered as exhausted.
        let retried = dead_letter(&host, plugin, "retry").await;
        assert_eq!(retried["reason"], "exhausted", "{retried}");
        assert_eq!(retried["errors"].as_array().unwrap().len(), 2, "{retried}");
        assert_eq!(retried["errors"][1]["kind"], "retry");
        assert_eq!(retried["errors"][1]["message"], "not yet");
        // `Reject` is dead-lettered at once.
        let rejected = dead_letter(&host, plugin, "reject").await;
        assert_eq!(rejected["reason"], "rejected");
        assert_eq!(rejected["errors"][0]["message"], "never");
        // Stored bytes that are not JSON are a reject, as in the Rust SDK, not a bug.
        let bad = dead_letter(&host, plugin, "bad-json").await;
        assert_eq!(bad["reason"], "rejected", "{bad}");
        let message = bad["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.starts_with("invalid JSON stored at key"),
            "{message}"
        );
        // A bug is a trap, retried, with the exception and its traceback.
        let crashed = dead_letter(&host, plugin, "crash").await;
        assert_eq!(crashed["errors"][0]["kind"], "trap", "{crashed}");
        let message = crashed["errors"][1]["message"].as_str().unwrap();
        let (summary, trace) = match plugin {
            "py" => ("uncaught KeyError: 'missing'", "app.py\", line"),
            _ => ("uncaught TypeError:", "handle@app.js:"),
        };
        assert!(message.starts_with(summary), "{message}");
        assert!(message.contains(trace), "{message}");
        // A loop is stopped by fuel.
        let looped = dead_letter(&host, plugin, "loop").await;
        assert_eq!(looped["errors"][0]["kind"], "fuel", "{looped}");
        host.wait_for(&format!("{plugin}'s stdio"), WAIT, || async {
            host.kv(plugin, "stdio").await
        })
        .await;
    }

    // Clocks and random work, and differ between calls.
    for plugin in ["py", "js"] {
        let stdio: serde_json::Value =
            serde_json::from_str(&host.kv(plugin, "stdio").await.unwrap()).unwrap();
        assert!(stdio["time"].as_f64().unwrap() > 1.7e9, "{stdio}");
        assert_ne!(stdio["random"][0], stdio["random"][1], "{stdio}");
    }
    // The last error names the bug too.
    let status = host.status("py").await.unwrap();
    assert!(
        host.get_json("/v1/plugins/py").await["recent_errors"]
            .to_string()
            .contains("KeyError"),
        "{status}"
    );

    // Files and sockets fail inside the Python handler with an ordinary OSError.
    let file = host
        .wait_for("py's file attempt", WAIT, || async {
            host.kv("py", "file").await
        })
        .await;
    assert!(file.starts_with("PermissionError"), "{file}");
    let socket = host
        .wait_for("py's socket attempt", WAIT, || async {
            host.kv("py", "socket").await
        })
        .await;
    assert!(socket.contains("Error"), "{socket}");
    assert_ne!(socket, "allowed");
    // A handler that returns a promise or a coroutine is a bug, not an acknowledgement:
    // its writes are not committed.
    for (plugin, what) in [("py", "a coroutine"), ("js", "a Promise")] {
        let returned = dead_letter(&host, plugin, "async").await;
        let expected = format!("handle returned {what}: handlers are synchronous");
        assert!(
            returned["errors"].as_array().unwrap().iter().all(|error| {
                error["kind"] == "trap" && error["message"].as_str().unwrap().contains(&expected)
            }),
            "{returned}"
        );
        assert_eq!(host.kv(plugin, "async").await, None);
    }
    // JavaScript's fetch never leaves the host.
    host.wait_for("js's fetch attempt", WAIT, || async {
        host.kv("js", "fetch-started").await
    })
    .await;

    // Each refusal is counted per plugin, in the status and the metrics.
    let refused = host
        .wait_for("the refusals", WAIT, || async {
            let py = host.get_json("/v1/plugins/py").await["refused"].clone();
            let js = host.get_json("/v1/plugins/js").await["refused"].clone();
            (py["file"].as_u64()? >= 1 && py["socket"].as_u64()? >= 1 && js["http"].as_u64()? >= 1)
                .then_some((py, js))
        })
        .await;
    assert_eq!(refused.0["http"], 0, "{refused:?}");
    assert_eq!(refused.1["file"], 0, "{refused:?}");
    assert_eq!(refused.1["socket"], 0, "{refused:?}");
    assert_eq!(
        host.metric("switchyard_plugin_refused_total{plugin=\"js\",access=\"http\"}")
            .await,
        1.0
    );
    assert!(
        host.metric("switchyard_plugin_refused_total{plugin=\"py\",access=\"socket\"}")
            .await
            >= 1.0
    );
    assert_eq!(host.get_json("/healthz").await["status"], "ok");
}

/// The Python and JavaScript SDKs carry their own copy of the contract; it must not
/// drift from the workspace's `wit/`.
#[test]
fn the_sdks_wit_copies_match_the_contract() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let contract = root.join("wit");
    let mut files: Vec<String> = std::fs::read_dir(&contract)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".wit"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "{files:?}");
    for sdk in ["plugin-sdk/python/wit", "plugin-sdk/js/wit"] {
        let copy = root.join(sdk);
        let mut copied: Vec<String> = std::fs::read_dir(&copy)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        copied.sort();
        assert_eq!(copied, files, "{sdk} holds other files than wit/");
        for file in &files {
            assert_eq!(
                std::fs::read_to_string(copy.join(file)).unwrap(),
                std::fs::read_to_string(contract.join(file)).unwrap(),
                "{sdk}/{file} differs from wit/{file}"
            );
        }
    }
}

/// A probe loaded into `runtime` with the default settings.
async fn load_probe(
    runtime: &switchyard_host::runtime::Runtime,
    guest: Polyglot,
) -> switchyard_host::runtime::Plugin {
    let path = guests::polyglot_path(guest);
    runtime
        .load_file(&path, switchyard_host::runtime::PluginSettings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The SDKs' batch export: each item keeps its own outcome; a later item reads what an
/// earlier acknowledged one wrote, and nothing of a failed item.
#[tokio::test]
async fn the_sdks_batch_export_gives_each_event_its_outcome() {
    let runtime = crate::support::runtime();
    for guest in [Polyglot::PyProbe, Polyglot::JsProbe] {
        let plugin = load_probe(&runtime, guest).await;
        let events = [
            crate::support::event("probe.count", json!({})),
            crate::support::event("probe.reject", json!({})),
            crate::support::event("probe.count", json!({})),
            crate::support::event("probe.retry", json!({})),
        ];
        let items: Vec<_> = events
            .iter()
            .map(|e| (e, crate::support::delivery(1)))
            .collect();
        let kv: std::sync::Arc<dyn switchyard_host::KvSource> =
            std::sync::Arc::new(switchyard_host::EmptyKv);
        let outcome = plugin.invoke_batch(&items, kv).await;
        let kinds: Vec<String> = outcome
            .items
            .iter()
            .map(|item| match item {
                Some(Ok(effects)) => format!(
                    "ok:{}",
                    String::from_utf8_lossy(
                        effects
                            .kv_writes
                            .iter()
                            .find(|w| w.key == "count")
                            .and_then(|w| w.value.as_deref())
                            .unwrap_or_default()
                    )
                ),
                Some(Err(failure)) => format!("{}:{}", failure.kind.as_str(), failure.message),
                None => "not handled".to_owned(),
            })
            .collect();
        assert_eq!(
            kinds,
            ["ok:1", "reject:never", "ok:2", "retry:not yet"],
            "{guest:?}"
        );
    }
}

/// Every option of the contract's outgoing event reaches the host from both SDKs.
#[tokio::test]
async fn the_sdks_emit_every_option_of_the_contract() {
    let runtime = crate::support::runtime();
    for guest in [Polyglot::PyProbe, Polyglot::JsProbe] {
        let plugin = load_probe(&runtime, guest).await;
        let outcome = crate::support::invoke(
            &plugin,
            &crate::support::event("probe.emit-options", json!({})),
        )
        .await;
        let emits = &crate::support::effects(&outcome).emits;
        assert_eq!(emits.len(), 3, "{guest:?}: {emits:?}");
        let plain = &emits[0];
        assert_eq!(plain.ty, "probe.plain");
        assert_eq!(plain.subject.as_deref(), Some("s-1"));
        assert_eq!(plain.data, [0u8, 1]);
        assert_eq!(
            plain.datacontenttype.as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(plain.extension("partitionkey"), Some("k-1"), "{guest:?}");
        assert_eq!(plain.extension("region"), Some("eu"), "{guest:?}");
        assert_eq!(plain.extension("expectedversion"), Some("3"), "{guest:?}");
        let later = &emits[1];
        assert_eq!(later.data, b"text");
        assert_eq!(later.datacontenttype.as_deref(), Some("text/plain"));
        assert!(
            later.extension("deliverat").is_some(),
            "{guest:?}: {later:?}"
        );
        let at = &emits[2];
        assert_eq!(at.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&at.data).unwrap(),
            json!({"a": 1})
        );
        // A day ahead: an aware `datetime` in Python, a `Date` in JavaScript.
        let due: jiff::Timestamp = at.extension("deliverat").unwrap().parse().unwrap();
        let ahead = due.duration_since(jiff::Timestamp::now()).as_secs();
        assert!(
            (86_000..=86_400).contains(&ahead),
            "{guest:?}: due {due}, {ahead} s ahead"
        );
    }
}

/// A KV source whose one stream, `ledger`, holds three events.
struct Ledger;

#[async_trait::async_trait]
impl switchyard_host::KvSource for Ledger {
    async fn get(
        &self,
        _plugin: &str,
        _key: &str,
    ) -> Result<Option<Vec<u8>>, switchyard_host::KvError> {
        Ok(None)
    }

    async fn keys(
        &self,
        _plugin: &str,
        _prefix: &str,
    ) -> Result<Vec<String>, switchyard_host::KvError> {
        Ok(Vec::new())
    }

    async fn read_stream(
        &self,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<switchyard_host::stream::StreamPage, switchyard_host::KvError> {
        let version = if subject == "ledger" { 3 } else { 0 };
        let events = (after + 1..=version)
            .take(limit)
            .map(|stream_version| {
                let mut event = crate::support::event("ledger.entry", json!({}));
                event.subject = Some(subject.to_owned());
                event
                    .extensions
                    .insert("streamversion".to_owned(), stream_version.to_string());
                event
            })
            .collect();
        Ok(switchyard_host::stream::StreamPage { events, version })
    }

    async fn scheduled(&self, _id: &str) -> Result<bool, switchyard_host::KvError> {
        Ok(false)
    }
}

/// The SDKs read a whole stream, and refuse one longer than asked with a `retry` (as the
/// Rust SDK's `read_at_most` does) rather than gathering it into memory.
#[tokio::test]
async fn the_sdks_read_a_stream_whole_and_refuse_one_longer_than_asked() {
    let runtime = crate::support::runtime();
    for guest in [Polyglot::PyProbe, Polyglot::JsProbe] {
        let plugin = load_probe(&runtime, guest).await;
        let kv: std::sync::Arc<dyn switchyard_host::KvSource> = std::sync::Arc::new(Ledger);
        let read = |ty: &'static str| {
            let kv = std::sync::Arc::clone(&kv);
            let plugin = &plugin;
            async move {
                let event = crate::support::event(ty, json!({}));
                plugin.invoke(&event, crate::support::delivery(1), kv).await
            }
        };
        let all = read("probe.read-all").await;
        let effects = crate::support::effects(&all);
        let count = effects.kv_writes.iter().find(|w| w.key == "read");
        assert_eq!(
            count.and_then(|w| w.value.as_deref()),
            Some(b"3".as_slice()),
            "{guest:?}"
        );
        let refused = read("probe.read-at-most").await;
        assert_eq!(
            crate::support::failure(&refused),
            ("retry", "the stream of `ledger` holds more than 2 events"),
            "{guest:?}"
        );
    }
}

/// The SDKs parse a config value as the Rust SDK's `config::get_parsed` does (a value the
/// parser refuses is a `reject` naming the key), read KV text, and refuse to store a value
/// JSON cannot encode (Python's `NaN`, JavaScript's `undefined`) with a `reject`.
#[tokio::test]
async fn the_sdks_parse_config_values_and_read_kv_text() {
    let runtime = crate::support::runtime();
    for guest in [Polyglot::PyProbe, Polyglot::JsProbe] {
        let settings = switchyard_host::runtime::PluginSettings {
            config: [("limit", "7"), ("bad", "seven")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Default::default()
        };
        let plugin = runtime
            .load_file(&guests::polyglot_path(guest), settings)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let event = crate::support::event("probe.config", json!({}));
        let read = crate::support::invoke(&plugin, &event).await;
        let effects = crate::support::effects(&read).clone();
        let stored = effects.kv_writes.iter().find(|w| w.key == "config");
        let stored: serde_json::Value =
            serde_json::from_slice(stored.and_then(|w| w.value.as_deref()).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{guest:?}: {e}"));
        assert_eq!(stored, json!([7, "héllo \u{fffd}"]), "{guest:?}");
        let refused = crate::support::invoke(
            &plugin,
            &crate::support::event("probe.bad-config", json!({})),
        )
        .await;
        let (kind, message) = crate::support::failure(&refused);
        assert_eq!(kind, "reject", "{guest:?}: {message}");
        assert!(
            message.starts_with("invalid config bad = "),
            "{guest:?}: {message}"
        );
        let unencodable = crate::support::invoke(
            &plugin,
            &crate::support::event("probe.bad-value", json!({})),
        )
        .await;
        let (kind, message) = crate::support::failure(&unencodable);
        assert_eq!(kind, "reject", "{guest:?}: {message}");
        assert!(
            message.starts_with("cannot serialise the value for key 'nan'")
                || message.starts_with("cannot serialise the value for key \"nan\""),
            "{guest:?}: {message}"
        );
    }
}
