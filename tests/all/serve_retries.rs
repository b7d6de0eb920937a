//! Retries, backoff and dead letters through the real binary.

use std::time::Duration;

use serde_json::json;

use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

/// A plugin whose `hostile.reject` events are `rejected` and `hostile.needs-fix` ones
/// `exhausted` after their one attempt: two kinds of dead letters.
const REJECTS_OR_FAILS_ONCE: &str = "subscribe = [\"hostile.reject\", \"hostile.needs-fix\"]\n\
                                     [retry]\nmax_attempts = 1\n";
const FAST_RETRY: &str = "[retry]\nbackoff = \"constant\"\ninitial = \"100ms\"\njitter = false\n";

async fn a_plugin_that_fails_twice_is_retried_with_backoff_and_its_effects_appear_once(
    backend: Backend,
) {
    let mut host = Host::on(&backend);
    host.plugin(
        "flaky",
        Guest::Hostile,
        Some(&format!(
            "subscribe = [\"hostile.fail-until\"]\n{FAST_RETRY}max_attempts = 5\n"
        )),
    );
    host.start();
    assert_eq!(
        host.send("hostile.fail-until", "flaky-1", json!({})).await,
        202
    );
    let attempt = host
        .wait_for("the third attempt", Duration::from_secs(20), || async {
            host.kv("flaky", "recovered/flaky-1").await
        })
        .await;
    assert_eq!(attempt, "3");

    let log = host.log().await;
    let recovered: Vec<_> = log
        .iter()
        .filter(|e| e["event"]["type"] == "hostile.recovered")
        .collect();
    assert_eq!(recovered.len(), 1, "the success's emit committed once");
    // Two waits of the constant 100 ms backoff separate the first and third attempts.
    let ingested = humantime::parse_rfc3339_weak(log[0]["ingested_at"].as_str().unwrap()).unwrap();
    let emitted =
        humantime::parse_rfc3339_weak(recovered[0]["ingested_at"].as_str().unwrap()).unwrap();
    assert!(
        emitted.duration_since(ingested).unwrap() >= Duration::from_millis(200),
        "retries waited for the backoff"
    );
    assert!(host.dead_letters("flaky").await.is_empty());
}

async fn a_plugin_that_always_fails_is_dead_lettered_after_max_attempts(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "doomed",
        Guest::Hostile,
        Some(&format!(
            "subscribe = [\"hostile.effects-then-retry\"]\n{FAST_RETRY}max_attempts = 3\n"
        )),
    );
    host.start();
    assert_eq!(
        host.send("hostile.effects-then-retry", "doomed-1", json!({}))
            .await,
        202
    );
    let letters = host
        .wait_dead_letters("doomed", Duration::from_secs(20))
        .await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter["reason"], "exhausted");
    assert_eq!(letter["event"]["id"], "doomed-1");
    let errors = letter["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{letter}");
    for (n, error) in errors.iter().enumerate() {
        assert_eq!(error["attempt"], n + 1);
        assert_eq!(error["kind"], "retry");
        assert_eq!(error["message"], "failed after effects");
    }
    // None of the failed attempts' emits or KV writes exist anywhere.
    assert!(host.kv("doomed", "written").await.is_none());
    assert!(
        host.log()
            .await
            .iter()
            .all(|e| e["event"]["type"] != "hostile.emitted")
    );
    let status = host.get_json("/v1/plugins/doomed").await;
    assert_eq!(status["dead_letters"], 1);
    assert_eq!(status["last_error"]["message"], "failed after effects");
}

async fn reject_dead_letters_after_one_attempt(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "picky",
        Guest::Hostile,
        Some("subscribe = [\"hostile.reject\"]\n"),
    );
    host.start();
    assert_eq!(host.send("hostile.reject", "picky-1", json!({})).await, 202);
    let letters = host
        .wait_dead_letters("picky", Duration::from_secs(20))
        .await;
    assert_eq!(letters[0]["reason"], "rejected");
    assert_eq!(letters[0]["errors"].as_array().unwrap().len(), 1);
    assert_eq!(letters[0]["errors"][0]["kind"], "reject");
    assert_eq!(letters[0]["errors"][0]["message"], "bad event");

    // Show and delete.
    let id = letters[0]["id"].as_u64().unwrap();
    let shown = host.get_json(&format!("/v1/dlq/{id}")).await;
    assert_eq!(shown["event"]["type"], "hostile.reject");
    let deleted = host
        .http
        .delete(host.url(&format!("/v1/dlq/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = host
        .http
        .get(host.url(&format!("/v1/dlq/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}

async fn replay_after_the_plugin_is_fixed_succeeds_and_empties_the_entry(backend: Backend) {
    let mut host = Host::on(&backend);
    let broken = format!("subscribe = [\"hostile.needs-fix\"]\n{FAST_RETRY}max_attempts = 2\n");
    host.plugin("mender", Guest::Hostile, Some(&broken));
    host.start();
    for id in ["fix-1", "fix-2"] {
        assert_eq!(host.send("hostile.needs-fix", id, json!({})).await, 202);
    }
    host.wait_for("two dead letters", Duration::from_secs(20), || async {
        (host.dead_letters("mender").await.len() == 2).then_some(())
    })
    .await;

    // Fix the plugin (its config) and restart the host.
    host.stop();
    host.sidecar(
        "mender",
        Some(&format!("{broken}[config]\nfixed = \"true\"\n")),
    );
    host.start();

    let first = host
        .dead_letters("mender")
        .await
        .iter()
        .find(|l| l["event"]["id"] == "fix-1")
        .and_then(|l| l["id"].as_u64())
        .unwrap();
    let replay = host
        .http
        .post(host.url(&format!("/v1/dlq/{first}/replay")))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 202);
    let fixed = host
        .wait_for("the replayed event", Duration::from_secs(20), || async {
            host.kv("mender", "fixed/fix-1").await
        })
        .await;
    assert_eq!(fixed, "yes");
    assert_eq!(host.dead_letters("mender").await.len(), 1);

    // Replay all of a plugin's.
    let replay = host
        .http
        .post(host.url("/v1/dlq/replay?plugin=mender"))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 202);
    assert_eq!(
        replay.json::<serde_json::Value>().await.unwrap()["replayed"],
        1
    );
    host.wait_for("the second replay", Duration::from_secs(20), || async {
        host.kv("mender", "fixed/fix-2").await
    })
    .await;
    assert!(host.dead_letters("mender").await.is_empty());
}

async fn an_endless_causation_chain_is_stopped_and_dead_lettered_as_a_loop(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "echo",
        Guest::Hostile,
        Some("subscribe = [\"echo.ping\"]\n[effects]\nmax_causation_depth = 5\n[config]\nbehaviour = \"hostile.echo\"\n"),
    );
    host.start();
    assert_eq!(host.send("echo.ping", "echo-0", json!({})).await, 202);
    let letters = host
        .wait_for(
            "the loop to be stopped",
            Duration::from_secs(20),
            || async {
                let letters = host.dead_letters("echo").await;
                (!letters.is_empty()).then_some(letters)
            },
        )
        .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["reason"], "loop");
    assert_eq!(
        letters[0]["errors"].as_array().unwrap().len(),
        1,
        "not retried"
    );
    assert_eq!(letters[0]["errors"][0]["kind"], "loop");
    assert_eq!(letters[0]["event"]["causationdepth"], "5");
    let pings: Vec<_> = host
        .log()
        .await
        .into_iter()
        .filter(|e| e["event"]["type"] == "echo.ping")
        .collect();
    assert_eq!(pings.len(), 6, "the producer's event and five follow-ups");
    for (depth, ping) in pings.iter().enumerate().skip(1) {
        assert_eq!(ping["event"]["causationdepth"], depth.to_string());
        assert_eq!(ping["event"]["correlationid"], "echo-0");
    }
}

/// Sends `method path` and answers the status and the JSON body.
async fn call(host: &Host, method: reqwest::Method, path: &str) -> (u16, serde_json::Value) {
    let response = host
        .http
        .request(method, host.url(path))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn a_plugins_dead_letters_are_deleted_in_bulk_by_kind(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin("picky", Guest::Hostile, Some(REJECTS_OR_FAILS_ONCE));
    host.plugin("other", Guest::Hostile, Some(REJECTS_OR_FAILS_ONCE));
    host.start();
    for n in 0..3 {
        let id = format!("junk-{n}");
        assert_eq!(host.send("hostile.reject", &id, json!({})).await, 202);
    }
    for n in 0..2 {
        let id = format!("job-{n}");
        assert_eq!(host.send("hostile.needs-fix", &id, json!({})).await, 202);
    }
    host.wait_for("ten dead letters", Duration::from_secs(30), || async {
        let counts = (
            host.dead_letters("picky").await.len(),
            host.dead_letters("other").await.len(),
        );
        (counts == (5, 5)).then_some(())
    })
    .await;

    // Leaving out the plugin, or naming no known kind, is refused and deletes nothing.
    let delete = reqwest::Method::DELETE;
    let (status, body) = call(&host, delete.clone(), "/v1/dlq").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`plugin` is required")
    );
    let (status, _) = call(&host, delete.clone(), "/v1/dlq?plugin=picky&reason=bored").await;
    assert_eq!(status, 400);
    assert_eq!(host.dead_letters("picky").await.len(), 5);

    let (status, body) = call(
        &host,
        delete.clone(),
        "/v1/dlq?plugin=picky&reason=rejected",
    )
    .await;
    assert_eq!((status, &body), (200, &json!({ "deleted": 3 })));
    let left = host.dead_letters("picky").await;
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|l| l["reason"] == "exhausted"), "{left:?}");
    assert_eq!(
        host.dead_letters("other").await.len(),
        5,
        "another plugin's stay"
    );

    // Replay takes a kind too: no rejected one is left to replay.
    let (status, body) = call(
        &host,
        reqwest::Method::POST,
        "/v1/dlq/replay?plugin=picky&reason=rejected",
    )
    .await;
    assert_eq!((status, &body), (202, &json!({ "replayed": 0 })));

    let (status, body) = call(&host, delete.clone(), "/v1/dlq?plugin=picky").await;
    assert_eq!((status, &body), (200, &json!({ "deleted": 2 })));
    assert!(host.dead_letters("picky").await.is_empty());
    let (status, body) = call(&host, delete, "/v1/dlq?plugin=picky").await;
    assert_eq!((status, &body), (200, &json!({ "deleted": 0 })));

    // The command line lists one kind, a page at a time, then deletes the other plugin's
    // exhausted ones.
    let url = host.url("");
    let list = |after: Option<u64>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command.args(["dlq", "list", "--plugin", "other", "--reason", "exhausted"]);
        command.args(["--limit", "1", "--url", url.trim_end_matches('/')]);
        if let Some(after) = after {
            command.args(["--after", &after.to_string()]);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let first = list(None);
    let second = list(first["next_after"].as_u64());
    assert_eq!(second["next_after"], serde_json::Value::Null, "{second}");
    let listed: Vec<&serde_json::Value> = [&first, &second]
        .iter()
        .flat_map(|page| page["dead_letters"].as_array().unwrap())
        .collect();
    let ids: Vec<&str> = listed
        .iter()
        .map(|letter| letter["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["job-0", "job-1"], "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|l| l["plugin"] == "other" && l["reason"] == "exhausted"),
        "{listed:?}"
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "dlq",
            "delete",
            "--plugin",
            "other",
            "--reason",
            "exhausted",
        ])
        .args(["--url", url.trim_end_matches('/')])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("\"deleted\": 2"));
    let left = host.dead_letters("other").await;
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|l| l["reason"] == "rejected"), "{left:?}");
    // Its counts follow.
    let status = host.status("other").await.unwrap();
    assert_eq!(status["dead_letters"], 3);
    let held = |plugin: &str| format!("switchyard_plugin_dead_letters{{plugin=\"{plugin}\"}}");
    assert_eq!(host.metric(&held("other")).await, 3.0);
    assert_eq!(host.metric(&held("picky")).await, 0.0);
}

/// Bulk operations over more dead letters than one page of their work (a few hundred):
/// every page is taken, letters of the other kind stay, and a replay leaves alone the
/// dead letters its own replays make.
async fn bulk_replay_and_deletion_take_every_page_of_one_kind(backend: Backend) {
    const EACH: usize = 300;
    let mut host = Host::on(&backend);
    host.plugin("picky", Guest::Hostile, Some(REJECTS_OR_FAILS_ONCE));
    host.start();
    // The two kinds interleaved in the log.
    let events: Vec<serde_json::Value> = (0..EACH)
        .flat_map(|n| {
            [("hostile.reject", "junk"), ("hostile.needs-fix", "job")].map(|(ty, name)| {
                json!({
                    "specversion": "1.0",
                    "id": format!("{name}-{n}"),
                    "source": "/tests/bulk",
                    "type": ty,
                    "data": {},
                })
            })
        })
        .collect();
    for chunk in events.chunks(200) {
        assert_eq!(host.send_batch(&json!(chunk)).await.status(), 202);
    }
    let held = || async { host.status("picky").await.unwrap()["dead_letters"].as_u64() };
    host.wait_for("every dead letter", Duration::from_secs(60), || async {
        (held().await == Some(2 * EACH as u64)).then_some(())
    })
    .await;

    let (status, body) = call(
        &host,
        reqwest::Method::POST,
        "/v1/dlq/replay?plugin=picky&reason=rejected",
    )
    .await;
    assert_eq!((status, &body), (202, &json!({ "replayed": EACH })));
    // Each replay is rejected again: as many rejected ones as before, new ones.
    host.wait_for(
        "the replays dead-lettered again",
        Duration::from_secs(60),
        || async { (held().await == Some(2 * EACH as u64)).then_some(()) },
    )
    .await;

    // A name no plugin can have takes nothing (NATS would read it as a wildcard).
    for plugin in ["*", ">", "pick%20y", ""] {
        let (status, body) = call(
            &host,
            reqwest::Method::DELETE,
            &format!("/v1/dlq?plugin={plugin}"),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{plugin}: {body}"
        );
    }
    assert_eq!(held().await, Some(2 * EACH as u64));
    let past_the_end = host.get_json(&format!("/v1/dlq?after={}", u64::MAX)).await;
    assert_eq!(
        past_the_end,
        json!({ "dead_letters": [], "next_after": null })
    );

    let (status, body) = call(
        &host,
        reqwest::Method::DELETE,
        "/v1/dlq?plugin=picky&reason=exhausted",
    )
    .await;
    assert_eq!((status, &body), (200, &json!({ "deleted": EACH })));
    assert_eq!(held().await, Some(EACH as u64));
    let left = host.get_json("/v1/dlq?plugin=picky&limit=1000").await["dead_letters"]
        .as_array()
        .cloned()
        .unwrap();
    assert_eq!(left.len(), EACH);
    assert!(left.iter().all(|l| l["reason"] == "rejected"));
    let mut ids: Vec<&str> = left
        .iter()
        .map(|l| l["event"]["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), EACH, "each rejected event once");
    // Every plugin's, in pages.
    let mut after = 0;
    let (mut listed, mut pages) = (0, 0);
    loop {
        let page = host
            .get_json(&format!("/v1/dlq?limit=128&after={after}"))
            .await;
        listed += page["dead_letters"].as_array().unwrap().len();
        pages += 1;
        // The last page says so: no request for an empty page after it.
        let Some(next) = page["next_after"].as_u64() else {
            break;
        };
        after = next;
    }
    assert_eq!((listed, pages), (EACH, EACH.div_ceil(128)));
}

async fn a_rejection_with_a_huge_message_is_dead_lettered_with_the_message_cut(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "loud",
        Guest::Hostile,
        Some("subscribe = [\"hostile.reject-loud\"]\n"),
    );
    host.start();
    assert_eq!(
        host.send("hostile.reject-loud", "loud-1", json!({})).await,
        202
    );
    let letters = host
        .wait_dead_letters("loud", Duration::from_secs(30))
        .await;
    let message = letters[0]["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.len() < 4200 && message.ends_with(&format!("… ({} bytes more)", (2 << 20) - 4096)),
        "{} bytes: …{}",
        message.len(),
        &message[message.len().saturating_sub(40)..]
    );
    let status = host.status("loud").await.unwrap();
    assert_eq!(status["last_error"]["message"].as_str(), Some(message));
}

async fn a_replayed_event_gets_every_attempt_however_old_it_is(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "later",
        Guest::Hostile,
        Some(&format!(
            "subscribe = [\"hostile.retry\"]\n{FAST_RETRY}max_attempts = 3\nmax_age = \"2s\"\n"
        )),
    );
    host.start();
    assert_eq!(host.send("hostile.retry", "old-1", json!({})).await, 202);
    let first = host
        .wait_for("the dead letter", Duration::from_secs(20), || async {
            host.dead_letters("later").await.into_iter().next()
        })
        .await;
    assert_eq!(first["reason"], "exhausted", "{first}");
    // Replayed once the event is older than `max_age`: a fresh start, not one attempt.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, _) = call(
        &host,
        reqwest::Method::POST,
        &format!("/v1/dlq/{}/replay", first["id"]),
    )
    .await;
    assert_eq!(status, 202);
    let again = host
        .wait_for(
            "the replay's dead letter",
            Duration::from_secs(20),
            || async { host.dead_letters("later").await.into_iter().next() },
        )
        .await;
    assert_eq!(again["reason"], "exhausted", "{again}");
    assert_eq!(again["errors"].as_array().unwrap().len(), 3, "{again}");
}

async fn a_kind_behind_many_letters_of_another_is_still_found_page_by_page(backend: Backend) {
    const AHEAD: usize = 10_050;
    let mut host = Host::on(&backend);
    host.plugin("picky", Guest::Hostile, Some(REJECTS_OR_FAILS_ONCE));
    host.start();
    let event = |ty: &str, id: String| json!({"specversion": "1.0", "id": id, "source": "/tests/kinds", "type": ty, "data": {}});
    let ahead: Vec<serde_json::Value> = (0..AHEAD)
        .map(|n| event("hostile.needs-fix", format!("job-{n}")))
        .collect();
    for chunk in ahead.chunks(1000) {
        assert_eq!(host.send_batch(&json!(chunk)).await.status(), 202);
    }
    host.wait_for(
        "every exhausted letter",
        Duration::from_secs(120),
        || async {
            let held = host.status("picky").await?["dead_letters"].as_u64()?;
            (held == AHEAD as u64).then_some(())
        },
    )
    .await;
    assert_eq!(
        host.send_batch(&json!([event("hostile.reject", "junk-1".into())]))
            .await
            .status(),
        202
    );
    host.wait_for("the rejected letter", Duration::from_secs(30), || async {
        let held = host.status("picky").await?["dead_letters"].as_u64()?;
        (held == AHEAD as u64 + 1).then_some(())
    })
    .await;
    // However far a backend reads per request, following `next_after` finds it.
    let (mut after, mut found, mut pages) = (0, Vec::new(), 0);
    loop {
        let page = host
            .get_json(&format!(
                "/v1/dlq?plugin=picky&reason=rejected&after={after}"
            ))
            .await;
        found.extend(page["dead_letters"].as_array().unwrap().clone());
        pages += 1;
        let Some(next) = page["next_after"].as_u64() else {
            break;
        };
        assert!(next > after && pages < 100, "{page}");
        after = next;
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["event"]["id"], "junk-1");
}

async fn dead_letters_older_than_their_age_limit_go(backend: Backend) {
    let mut host = Host::on(&backend);
    host.config("[log]\nretention_interval = \"100ms\"\ndead_letter_max_age = \"2s\"\n");
    host.plugin(
        "picky",
        Guest::Hostile,
        Some("subscribe = [\"hostile.reject\"]\n"),
    );
    host.start();
    assert_eq!(host.send("hostile.reject", "old-1", json!({})).await, 202);
    host.wait_for("the dead letter", Duration::from_secs(20), || async {
        (!host.dead_letters("picky").await.is_empty()).then_some(())
    })
    .await;
    host.wait_for("it to age out", Duration::from_secs(30), || async {
        host.dead_letters("picky").await.is_empty().then_some(())
    })
    .await;
    // The host goes on dead-lettering.
    assert_eq!(host.send("hostile.reject", "new-1", json!({})).await, 202);
    let letters = host
        .wait_for("the next dead letter", Duration::from_secs(20), || async {
            let letters = host.dead_letters("picky").await;
            (!letters.is_empty()).then_some(letters)
        })
        .await;
    assert_eq!(letters[0]["event"]["id"], "new-1");
}

/// A replay that fails again is retried and dead-lettered as a fresh delivery: each
/// replayed letter gets exactly its attempts again, and its new letter lists their errors,
/// whichever replay of a page ran first (a replay may run and fail while the rest of its
/// page is still being sent).
async fn a_replay_that_fails_again_keeps_the_errors_of_every_new_attempt(backend: Backend) {
    const LETTERS: usize = 256;
    let mut host = Host::on(&backend);
    host.plugin(
        "mender",
        Guest::Hostile,
        Some(
            "subscribe = [\"hostile.retry\"]\n\
             [retry]\nmax_attempts = 2\nbackoff = \"constant\"\ninitial = \"1ms\"\njitter = false\n",
        ),
    );
    host.start();
    let events: Vec<serde_json::Value> = (0..LETTERS)
        .map(|n| {
            json!({"specversion": "1.0", "id": format!("again-{n}"), "source": "/tests/replay",
                   "type": "hostile.retry", "data": {}})
        })
        .collect();
    assert_eq!(host.send_batch(&json!(events)).await.status(), 202);
    let failed = "switchyard_deliveries_total{plugin=\"mender\",outcome=\"retry\"}";
    let host = &host;
    let failures = |count: usize| async move {
        let done = host.metric_if_any(failed).await? >= count as f64
            && host.status("mender").await?["dead_letters"] == LETTERS;
        done.then_some(())
    };
    host.wait_for("every dead letter", Duration::from_secs(60), || {
        failures(2 * LETTERS)
    })
    .await;
    let (status, body) = call(host, reqwest::Method::POST, "/v1/dlq/replay?plugin=mender").await;
    assert_eq!((status, &body), (202, &json!({ "replayed": LETTERS })));
    host.wait_for(
        "the replays dead-lettered again",
        Duration::from_secs(60),
        || failures(4 * LETTERS),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        host.metric(failed).await,
        (4 * LETTERS) as f64,
        "attempts made again"
    );
    let letters = host.get_json("/v1/dlq?plugin=mender&limit=1000").await["dead_letters"]
        .as_array()
        .cloned()
        .unwrap();
    assert_eq!(letters.len(), LETTERS);
    for letter in &letters {
        let attempts: Vec<u64> = letter["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|error| error["attempt"].as_u64().unwrap())
            .collect();
        assert_eq!(attempts, [1, 2], "{letter}");
    }
}

crate::on_both_backends!(
    a_replay_that_fails_again_keeps_the_errors_of_every_new_attempt,
    a_kind_behind_many_letters_of_another_is_still_found_page_by_page,
    a_replayed_event_gets_every_attempt_however_old_it_is,
    a_rejection_with_a_huge_message_is_dead_lettered_with_the_message_cut,
    a_plugin_that_fails_twice_is_retried_with_backoff_and_its_effects_appear_once,
    a_plugin_that_always_fails_is_dead_lettered_after_max_attempts,
    reject_dead_letters_after_one_attempt,
    replay_after_the_plugin_is_fixed_succeeds_and_empties_the_entry,
    an_endless_causation_chain_is_stopped_and_dead_lettered_as_a_loop,
    a_plugins_dead_letters_are_deleted_in_bulk_by_kind,
    dead_letters_older_than_their_age_limit_go,
    bulk_replay_and_deletion_take_every_page_of_one_kind,
);
