//! The circuit breaker and pausing by hand, through the real binary on both backends.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

async fn dead_letters(host: &Host, plugin: &str) -> usize {
    host.get_json(&format!("/v1/dlq?plugin={plugin}")).await["dead_letters"]
        .as_array()
        .unwrap()
        .len()
}

async fn delivery(host: &Host, plugin: &str) -> Value {
    host.status(plugin).await.unwrap()["delivery"].clone()
}

const BROKEN: &str = "subscribe = [\"hostile.needs-fix\"]\nconcurrency = 1\n\
    [retry]\nmax_attempts = 100\nbackoff = \"constant\"\ninitial = \"50ms\"\njitter = false\n\
    [breaker]\nfailures = 3\ncooldown = \"1s\"\nmax_cooldown = \"2s\"\n";

async fn the_breaker_opens_probes_reopens_longer_and_closes_when_the_plugin_recovers(
    backend: Backend,
) {
    let mut host = Host::on(&backend);
    host.plugin("mender", Guest::Hostile, Some(BROKEN));
    host.start();
    for n in 0..5 {
        let id = format!("fix-{n}");
        assert_eq!(host.send("hostile.needs-fix", &id, json!({})).await, 202);
    }
    let opened = host
        .wait_for("the breaker to open", Duration::from_secs(20), || async {
            let delivery = delivery(&host, "mender").await;
            (delivery["state"] == "breaker-open").then_some(delivery)
        })
        .await;
    assert!(
        opened["reason"]
            .as_str()
            .unwrap()
            .starts_with("3 failed attempts in a row; the last: retry:"),
        "{opened}"
    );
    assert_eq!(opened["breaker"]["cooldown"], "1s");

    // The first probe fails: open again, for twice as long.
    let reopened = host
        .wait_for("a failed probe", Duration::from_secs(20), || async {
            let delivery = delivery(&host, "mender").await;
            (delivery["breaker"]["cooldown"] == "2s").then_some(delivery)
        })
        .await;
    assert!(
        reopened["reason"]
            .as_str()
            .unwrap()
            .starts_with("the probe failed: retry:"),
        "{reopened}"
    );
    // A second failed probe keeps the cooldown at its maximum.
    host.wait_for("a second failed probe", Duration::from_secs(20), || async {
        let opened = host
            .metric_if_any("switchyard_breaker_transitions_total{plugin=\"mender\",state=\"open\"}")
            .await?;
        (opened >= 3.0).then_some(())
    })
    .await;
    assert_eq!(delivery(&host, "mender").await["breaker"]["cooldown"], "2s");

    // While open, nothing but the probes ran: three failures opened it and each later
    // failure was a probe that opened it again. Nothing was dead-lettered.
    let status = host.status("mender").await.unwrap();
    let opens = host
        .metric("switchyard_breaker_transitions_total{plugin=\"mender\",state=\"open\"}")
        .await;
    let probes = host
        .metric("switchyard_breaker_transitions_total{plugin=\"mender\",state=\"probing\"}")
        .await;
    let failed = status["failed"].as_f64().unwrap();
    assert_eq!(failed, 3.0 + (opens - 1.0), "{status}");
    assert!(
        probes == opens - 1.0 || probes == opens,
        "{probes} probes, {opens} opens"
    );
    assert_eq!(status["handled"], 0);
    assert_eq!(dead_letters(&host, "mender").await, 0);

    // Fix the plugin and restart: the breaker is still open from the bus, the next probe
    // succeeds and closes it, and every event is handled, none dead-lettered.
    host.stop();
    host.sidecar(
        "mender",
        Some(&format!("{BROKEN}[config]\nfixed = \"true\"\n")),
    );
    host.start();
    for n in 0..5 {
        let key = format!("fixed/fix-{n}");
        let fixed = host
            .wait_for("each event handled", Duration::from_secs(20), || async {
                host.kv("mender", &key).await
            })
            .await;
        assert_eq!(fixed, "yes");
    }
    let closed = delivery(&host, "mender").await;
    assert_eq!(closed["state"], "running", "{closed}");
    assert_eq!(closed["breaker"]["state"], "closed", "{closed}");
    assert_eq!(dead_letters(&host, "mender").await, 0);
}

async fn an_operator_pauses_and_resumes_a_plugin(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "counter",
        Guest::Hostile,
        Some("subscribe = [\"hostile.count\"]\n"),
    );
    host.start();
    let paused = host
        .http
        .post(host.url("/v1/plugins/counter/pause"))
        .json(&json!({ "reason": "database upgrade" }))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    let paused: Value = paused.json().await.unwrap();
    assert_eq!(paused["delivery"]["state"], "paused");
    assert_eq!(paused["delivery"]["reason"], "database upgrade");
    assert_eq!(
        host.metric("switchyard_plugin_paused{plugin=\"counter\"}")
            .await,
        1.0
    );

    for n in 0..3 {
        let id = format!("held-{n}");
        assert_eq!(host.send("hostile.count", &id, json!({})).await, 202);
    }
    host.wait_for(
        "the events to wait in the log",
        Duration::from_secs(10),
        || async {
            let lag = host.status("counter").await.unwrap()["lag"].as_u64()?;
            (lag >= 3).then_some(())
        },
    )
    .await;
    // The status page's lag history samples the same lag.
    host.wait_for(
        "the lag in the history",
        Duration::from_secs(15),
        || async {
            let stats = host.get_json("/v1/stats?plugin=counter").await;
            let last = stats["plugin"]["lag"].as_array()?.last()?.as_u64()?;
            (last >= 3).then_some(())
        },
    )
    .await;
    assert_eq!(host.kv("counter", "seen/held-0").await, None);
    let status = host.status("counter").await.unwrap();
    assert_eq!(status["delivery"]["state"], "paused", "{status}");
    assert!(status["delivery"]["since"].is_string(), "{status}");
    assert_eq!(status["handled"], 0);
    assert_eq!(status["failed"], 0);
    // Hot reloads while paused give the held deliveries back, each time: that is no
    // attempt and no crash, and does not wear out the events (NATS counts every hand-out).
    for n in 0..12 {
        let before = host.status("counter").await.unwrap()["loaded_at"].clone();
        host.sidecar(
            "counter",
            Some(&format!("subscribe = [\"hostile.count\"]\n# reload {n}\n")),
        );
        host.wait_for("the reload", Duration::from_secs(20), || async {
            let status = host.status("counter").await?;
            (status["loaded_at"] != before && status["status"] != "failed").then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Resuming from the command line lets the waiting events through.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["plugins", "resume", "counter", "--url"])
        .arg(host.url(""))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["delivery"]["state"], "running");
    for n in 0..3 {
        let key = format!("seen/held-{n}");
        host.wait_for("each held event", Duration::from_secs(20), || async {
            host.kv("counter", &key).await
        })
        .await;
    }
    assert_eq!(host.status("counter").await.unwrap()["dead_letters"], 0);
    // A key no path can name (clients resolve `..`) is read by `?key=`.
    assert_eq!(host.send("hostile.count", "../odd", json!({})).await, 202);
    let odd = host
        .wait_for("the odd key", Duration::from_secs(20), || async {
            let response = host
                .http
                .get(host.url("/v1/plugins/counter/kv?key=seen/../odd"))
                .send()
                .await
                .ok()?;
            (response.status() == 200).then_some(response.text().await.ok()?)
        })
        .await;
    assert_eq!(odd, "1");
    assert_eq!(
        host.metric("switchyard_plugin_paused{plugin=\"counter\"}")
            .await,
        0.0
    );
    // The CPU gate charged the calls to the plugin.
    let cpu = host
        .metric("switchyard_plugin_cpu_seconds_total{plugin=\"counter\"}")
        .await;
    assert!(cpu > 0.0, "{cpu}");
    assert!(status_row(&host, "counter").contains(" running "));

    // Pausing from the command line, and what goes wrong.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["plugins", "pause", "counter", "--reason", "again", "--url"])
        .arg(host.url(""))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(delivery(&host, "counter").await["reason"], "again");
    let row = status_row(&host, "counter");
    assert!(row.contains(" paused "), "{row}");
    assert!(row.contains(" closed "), "{row}");
    let unknown = host
        .http
        .post(host.url("/v1/plugins/nobody/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let bad = host
        .http
        .post(host.url("/v1/plugins/counter/pause"))
        .body("reason: none")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let error: Value = bad.json().await.unwrap();
    assert_eq!(error["error"]["code"], "malformed_json");
    let not_json = host
        .http
        .post(host.url("/v1/plugins/counter/pause"))
        .header("content-type", "text/plain")
        .body("maintenance")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 415);
    let error: Value = not_json.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unsupported_media_type");

    // A pause outlives a restart.
    host.stop();
    host.start();
    assert_eq!(state_of(&host, "counter").await, "paused");
    assert_eq!(
        host.send("hostile.count", "after-restart", json!({})).await,
        202
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host.kv("counter", "seen/after-restart").await, None);
}

/// The plugin's row of `switchyard status`.
fn status_row(host: &Host, plugin: &str) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["status", "--url"])
        .arg(host.url(""))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.starts_with("PLUGIN  "), "{table}");
    table
        .lines()
        .find(|line| line.starts_with(&format!("{plugin} ")))
        .unwrap_or_else(|| panic!("no row of {plugin} in {table}"))
        .to_owned()
}

/// Pausing a busy plugin settles what it already handled: the acknowledged calls a lane
/// gathered to settle together do not wait out the pause with the call it holds back.
async fn a_pause_settles_what_was_already_handled(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "busy",
        Guest::Hostile,
        // Calls slower than fetching: the lane always has the next delivery ready, so it
        // gathers acknowledged calls to settle together until it holds a full group.
        Some("subscribe = [\"hostile.ok\"]\nconcurrency = 1\ninstance = \"reuse\"\n[config]\nsleep_ms = \"2\"\n"),
    );
    host.start();
    for batch in 0..10 {
        let events: Vec<Value> = (0..100)
            .map(|n| json!({"specversion": "1.0", "id": format!("b{batch}-{n}"), "source": "/t", "type": "hostile.ok", "data": {}}))
            .collect();
        assert_eq!(host.send_batch(&json!(events)).await.status(), 202);
    }
    host.wait_for("the plugin to be busy", Duration::from_secs(30), || async {
        (host.status("busy").await?["handled"].as_u64()? >= 100).then_some(())
    })
    .await;
    let paused = host
        .http
        .post(host.url("/v1/plugins/busy/pause"))
        .json(&json!({ "reason": "maintenance" }))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    let status = host
        .wait_for(
            "nothing in flight while paused",
            Duration::from_secs(10),
            || async {
                let status = host.status("busy").await?;
                (status["in_flight"] == 0).then_some(status)
            },
        )
        .await;
    assert_eq!(status["delivery"]["state"], "paused", "{status}");
    let handled = status["handled"].as_u64().unwrap();
    assert!(handled < 1000, "the pause came before the end: {status}");
}

async fn state_of(host: &Host, plugin: &str) -> String {
    delivery(host, plugin).await["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

crate::on_both_backends!(
    the_breaker_opens_probes_reopens_longer_and_closes_when_the_plugin_recovers,
    an_operator_pauses_and_resumes_a_plugin,
    a_pause_settles_what_was_already_handled,
);
