//! Misbehaving plugins and bad plugin files inside the running host: each is contained
//! and reported, and a well-behaved plugin beside them handles every one of its events.

use std::time::Duration;

use serde_json::json;

use crate::support::guests::{self, Guest};
use crate::support::host::{Backend, Host};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn hostile_plugins_are_contained_while_a_good_one_handles_everything() {
    let mut host = Host::new();
    let hostile = |behaviour: &str, extra: &str| {
        format!(
            "subscribe = [\"work.item\"]\n[retry]\nmax_attempts = 2\nbackoff = \"constant\"\ninitial = \"10ms\"\njitter = false\n[limits]\nmemory = \"32MiB\"\n{extra}[config]\nbehaviour = \"{behaviour}\"\n"
        )
    };
    // Fuel high enough that the loop meets its timeout and the hoarder its memory cap; only
    // the plugins that are meant to run out of time get a short timeout, and the hoarder a
    // long one, since it shares the CPU with the loopers on a busy test machine.
    let roomy = "fuel = 100_000_000_000\ntimeout = \"60s\"\n";
    let short = "fuel = 100_000_000_000\ntimeout = \"300ms\"\n";
    for (name, behaviour, extra) in [
        ("looper", "hostile.loop", short),
        ("hoarder", "hostile.memory", roomy),
        ("crasher", "hostile.panic", ""),
        ("sleeper", "hostile.sleep", short),
        ("flooder", "hostile.emit-flood", ""),
        ("bloater", "hostile.emit-huge", ""),
        ("kv-hog", "hostile.kv-huge", ""),
        ("snoop", "hostile.env", ""),
    ] {
        host.plugin(name, Guest::Hostile, Some(&hostile(behaviour, extra)));
    }
    host.plugin(
        "good",
        Guest::AuditTrail,
        Some("subscribe = [\"work.item\"]\nconcurrency = 1\n"),
    );
    host.start();

    let events = 30;
    for n in 0..events {
        assert_eq!(
            host.send("work.item", &format!("work-{n}"), json!({"n": n}))
                .await,
            202
        );
    }
    host.wait_for("the good plugin to handle every event", WAIT, || async {
        let count: u64 = host.kv("good", "count/work.item").await?.parse().ok()?;
        (count == events).then_some(())
    })
    .await;

    // Every hostile plugin ends every event in its dead letters, with its own kind.
    for (name, reason, kind) in [
        ("looper", "exhausted", "timeout"),
        ("hoarder", "exhausted", "memory"),
        ("crasher", "exhausted", "trap"),
        ("sleeper", "exhausted", "timeout"),
        ("flooder", "effects", "effects"),
        ("bloater", "effects", "effects"),
        ("kv-hog", "effects", "effects"),
        ("snoop", "rejected", "reject"),
    ] {
        let letters = host
            .wait_for(&format!("{name}'s dead letters"), WAIT, || async {
                let list = host
                    .get_json(&format!("/v1/dlq?plugin={name}&limit=1000"))
                    .await;
                let letters = list["dead_letters"].as_array()?.clone();
                (letters.len() as u64 == events).then_some(letters)
            })
            .await;
        for letter in &letters {
            assert_eq!(letter["reason"], reason, "{name}: {letter}");
            let last = letter["errors"].as_array().unwrap().last().unwrap().clone();
            assert_eq!(last["kind"], kind, "{name}: {letter}");
        }
    }
    // The sandbox held: the plugin saw no environment.
    let snoop = host.get_json("/v1/dlq?plugin=snoop&limit=1").await;
    assert_eq!(
        snoop["dead_letters"][0]["errors"][0]["message"],
        "environment is empty"
    );
    // Nothing a hostile plugin emitted reached the log.
    let log = host.log().await;
    assert!(
        log.iter().all(|e| e["event"]["type"] == "work.item"),
        "only the producer's events"
    );
    assert_eq!(host.get_json("/healthz").await["status"], "ok");
}

async fn bad_plugin_files_are_refused_with_a_clear_status_and_the_host_keeps_serving(
    backend: Backend,
) {
    let mut host = Host::on(&backend);
    host.plugin("good", Guest::AuditTrail, None);
    host.start();
    let noop = std::fs::read(guests::path(Guest::Noop)).unwrap();
    let other_world = wat::parse_str(
        r#"(component (instance $i) (export "wasi:http/incoming-handler@0.2.0" (instance $i)))"#,
    )
    .unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "the file is empty"),
        (
            "truncated",
            noop[..noop.len() / 3].to_vec(),
            "invalid component",
        ),
        (
            "random",
            (0..2048u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
                .collect(),
            "not a WebAssembly file",
        ),
        (
            "core",
            b"\0asm\x01\0\0\0".to_vec(),
            "a core WebAssembly module",
        ),
        ("other-world", other_world, "not a Switchyard plugin"),
        (
            "secrets",
            wat::parse_str(
                r#"(component
                    (import "acme:secrets/vault@1.0.0" (instance))
                    (instance $i)
                    (export "switchyard:plugin/handler@0.2.0" (instance $i)))"#,
            )
            .unwrap(),
            "imports `acme:secrets/vault@1.0.0`, which the host does not provide",
        ),
    ];
    for (name, bytes, _) in &cases {
        host.deploy(&format!("{name}.wasm"), bytes);
    }
    for (name, _, reason) in &cases {
        let status = host
            .wait_for(&format!("{name} to be refused"), WAIT, || async {
                let status = host.status(name).await?;
                (status["status"] == "failed").then_some(status)
            })
            .await;
        let error = status["error"].as_str().unwrap();
        assert!(error.contains(reason), "{name}: {error}");
        assert!(
            error.contains(&format!("{name}.wasm")),
            "the error names the file: {error}"
        );
    }
    // A sidecar asking for more memory than any plugin may have names both settings.
    host.sidecar("greedy", Some("[limits]\nmemory = \"2GiB\"\n"));
    host.deploy("greedy.wasm", &noop);
    let status = host
        .wait_for("greedy to be refused", WAIT, || async {
            let status = host.status("greedy").await?;
            (status["status"] == "failed").then_some(status)
        })
        .await;
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("greedy.toml")
            && error.contains("limits.memory")
            && error.contains("runtime.max_memory"),
        "{error}"
    );
    // The list shows every plugin, those that never served included (on NATS they have
    // no consumer to read counters from).
    let list = host.get_json("/v1/plugins").await;
    let listed: Vec<(&str, &str)> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["status"].as_str().unwrap()))
        .collect();
    assert_eq!(listed.len(), cases.len() + 2, "{list}");
    assert!(
        listed
            .iter()
            .all(|(name, status)| (*status == "failed") == (*name != "good")),
        "{listed:?}"
    );
    let serving = |plugin: &str| format!("switchyard_plugin_serving{{plugin=\"{plugin}\"}}");
    assert_eq!(host.metric(&serving("greedy")).await, 0.0);
    assert_eq!(host.metric(&serving("good")).await, 1.0);
    assert_eq!(host.send("still.serving", "s-1", json!({})).await, 202);
    host.wait_for("the good plugin", WAIT, || async {
        host.kv("good", "count/still.serving").await
    })
    .await;
}

#[tokio::test]
async fn the_running_host_enforces_tokens_and_size_limits() {
    let mut host = Host::new();
    host.config(
        "[auth]\ningest_tokens = [\"in-secret\"]\nadmin_tokens = [\"admin-secret\"]\n\
         [ingest]\nmax_body_bytes = \"64KiB\"\n",
    );
    host.plugin("good", Guest::AuditTrail, None);
    host.start();
    let post = |token: Option<&str>, body: Vec<u8>| {
        let mut request = host
            .http
            .post(host.url("/v1/events/secure.event"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    for token in [None, Some("wrong"), Some("admin-secret")] {
        let response = post(token, b"{}".to_vec()).await.unwrap();
        assert_eq!(response.status(), 401, "{token:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    assert_eq!(
        post(Some("in-secret"), b"{}".to_vec())
            .await
            .unwrap()
            .status(),
        202
    );
    for path in [
        "/v1/plugins",
        "/v1/dlq",
        "/v1/events",
        "/v1/plugins/good/kv/x",
    ] {
        let response = host.http.get(host.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{path}");
        let response = host
            .http
            .get(host.url(path))
            .bearer_auth("in-secret")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path} with an ingest token");
    }
    let allowed = host
        .http
        .get(host.url("/v1/plugins"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);

    // A body over the limit is refused and stored nowhere.
    let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(128 * 1024));
    let response = post(Some("in-secret"), big.into_bytes()).await.unwrap();
    assert_eq!(response.status(), 413);
    // An oversized header block is refused by the HTTP layer before any handler runs.
    let response = host
        .http
        .post(host.url("/v1/events/secure.event"))
        .bearer_auth("in-secret")
        .header("x-padding", "y".repeat(1024 * 1024))
        .json(&json!({}))
        .send()
        .await;
    assert!(
        response.map_or(true, |r| r.status().is_client_error()),
        "a 1 MiB header must not be accepted"
    );
    let log = host
        .http
        .get(host.url("/v1/events"))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    assert_eq!(
        log["events"].as_array().unwrap().len(),
        1,
        "only the authorised event"
    );
}

crate::on_both_backends!(
    bad_plugin_files_are_refused_with_a_clear_status_and_the_host_keeps_serving
);
