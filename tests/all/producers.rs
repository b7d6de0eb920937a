//! What producers get beyond `202`, on both backends with the real binary: request/reply
//! (`?wait=`) with every subscribed plugin's outcome, and the schema registry checking
//! what is published and what plugins emit.

use std::time::Duration;

use serde_json::{Value, json};

use crate::on_both_backends;
use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

const SLOW_RETRY: &str = "[retry]\nbackoff = \"constant\"\ninitial = \"1s\"\njitter = false\n";

fn payment(order: &str, amount: u64) -> Value {
    json!({"order_id": order, "amount_cents": amount, "email": "fan@example.com", "quantity": 2})
}

/// POSTs `data` as an event of `ty` with `?wait=`; returns the status and the body.
async fn send_waiting(host: &Host, ty: &str, id: &str, data: &Value, wait: &str) -> (u16, Value) {
    let response = host
        .http
        .post(host.url(&format!("/v1/events/{ty}?wait={wait}")))
        .header("ce-id", id)
        .json(data)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn outcome<'a>(answer: &'a Value, plugin: &str) -> &'a Value {
    answer["accepted"][0]["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plugin"] == plugin)
        .unwrap_or_else(|| panic!("no outcome of {plugin} in {answer}"))
}

async fn a_wait_answers_with_every_subscribed_plugins_outcome_and_what_it_emitted(
    backend: Backend,
) {
    let mut host = Host::on(&backend);
    host.plugin("ticketing", Guest::Ticketing, None)
        .plugin("notifier", Guest::Notifier, None)
        .plugin("audit-trail", Guest::AuditTrail, None);
    host.start();

    let (status, answer) = send_waiting(
        &host,
        "payment.completed",
        "pay-1",
        &payment("A-1", 9000),
        "20s",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let accepted = &answer["accepted"][0];
    assert_eq!(accepted["id"], "pay-1");
    assert_eq!(accepted["complete"], true);
    // Subscribed to `payment.completed`: ticketing and the audit trail, not the notifier.
    let plugins: Vec<&str> = accepted["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["plugin"].as_str().unwrap())
        .collect();
    assert_eq!(plugins, ["audit-trail", "ticketing"]);
    let ticketing = outcome(&answer, "ticketing");
    assert_eq!(ticketing["outcome"], "ok");
    assert_eq!(ticketing["attempts"], 1);
    let emitted = ticketing["emitted"].as_array().unwrap();
    assert_eq!(emitted.len(), 1, "{ticketing}");
    assert_eq!(emitted[0]["type"], "tickets.generated");
    assert_eq!(emitted[0]["causationid"], "pay-1");
    assert_eq!(emitted[0]["data"]["order_id"], "A-1");
    assert_eq!(outcome(&answer, "audit-trail")["outcome"], "ok");
    // What the answer says was emitted is what the log holds.
    let log = host.log().await;
    assert!(log.iter().any(|e| e["event"]["id"] == emitted[0]["id"]));

    // Sent again (its answer lost, say): a duplicate, answered with what happened.
    let (status, again) = send_waiting(
        &host,
        "payment.completed",
        "pay-1",
        &payment("A-1", 9000),
        "5s",
    )
    .await;
    assert_eq!(status, 200, "{again}");
    let resent = &again["accepted"][0];
    assert_eq!(resent["duplicate"], true);
    assert_eq!(resent["complete"], true);
    assert_eq!(resent["sequence"], accepted["sequence"]);
    assert_eq!(outcome(&again, "ticketing"), ticketing, "{again}");
    assert_eq!(outcome(&again, "audit-trail")["outcome"], "ok");

    // The same from the command line, which prints the outcomes.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["send", "payment.completed", "--wait", "20s", "--url"])
        .arg(host.url(""))
        .args(["--data", &payment("A-2", 100).to_string()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(outcome(&printed, "ticketing")["outcome"], "ok");
    assert_eq!(
        outcome(&printed, "ticketing")["emitted"][0]["type"],
        "tickets.generated"
    );
}

async fn a_wait_that_ends_first_reports_the_retry_and_delivery_goes_on(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin("mender", Guest::Hostile, Some(SLOW_RETRY));
    host.start();

    // `fail-until` fails attempts 1 and 2 and succeeds at 3, a second apart.
    let (status, answer) =
        send_waiting(&host, "hostile.fail-until", "slow-1", &json!({}), "500ms").await;
    assert_eq!(status, 202, "{answer}");
    let accepted = &answer["accepted"][0];
    assert_eq!(accepted["complete"], false);
    assert!(accepted["sequence"].as_u64().unwrap() > 0);
    let mender = outcome(&answer, "mender");
    assert_eq!(mender["outcome"], "retrying", "{answer}");
    assert_eq!(mender["attempts"], 1);
    assert_eq!(mender["error"]["kind"], "retry");
    assert_eq!(mender["error"]["message"], "attempt 1 fails");

    // The wait ending changed nothing: the event is retried and then handled.
    let recovered = host
        .wait_for("the third attempt", Duration::from_secs(30), || async {
            host.kv("mender", "recovered/slow-1").await
        })
        .await;
    assert_eq!(recovered, "3");

    // The producer sends it again with a wait: the answer says how it ended.
    let (status, again) =
        send_waiting(&host, "hostile.fail-until", "slow-1", &json!({}), "5s").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["accepted"][0]["duplicate"], true);
    let mender = outcome(&again, "mender");
    assert_eq!(mender["outcome"], "ok", "{again}");
    assert_eq!(mender["attempts"], 3);
}

async fn waiting_requests_over_the_limit_are_answered_503(backend: Backend) {
    let mut host = Host::on(&backend);
    host.config("[ingest]\nmax_waiters = 1\n");
    host.plugin("mender", Guest::Hostile, Some(SLOW_RETRY));
    host.start();

    let first = async {
        host.http
            .post(host.url("/v1/events/hostile.retry?wait=3s"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status()
    };
    // The first request holds the only permit until its wait ends (`retry` never
    // succeeds, so it ends with `202`).
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        host.http
            .post(host.url("/v1/events/hostile.ok?wait=1s"))
            .json(&json!({}))
            .send()
            .await
            .unwrap()
    };
    let (first, refused) = tokio::join!(first, second);
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_waiters"),
        "{body}"
    );
    assert_eq!(first, 202);
    // Each event of a batch waits with a permit of its own: a batch of two can never fit.
    let pair = json!([
        {"specversion": "1.0", "id": "pair-1", "source": "/tests", "type": "hostile.ok", "data": {}},
        {"specversion": "1.0", "id": "pair-2", "source": "/tests", "type": "hostile.ok", "data": {}},
    ]);
    let response = host
        .http
        .post(host.url("/v1/events?wait=1s"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(pair.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_query", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this request has 2"),
        "{body}"
    );
    assert!(
        host.log()
            .await
            .iter()
            .all(|e| e["event"]["id"] != "pair-1"),
        "a refused batch stored nothing"
    );
    // Without `wait` nothing is limited, and once the permit is back a wait is served.
    assert_eq!(host.send("hostile.ok", "plain", json!({})).await, 202);
    let (status, _) = send_waiting(&host, "hostile.ok", "after", &json!({}), "10s").await;
    assert_eq!(status, 200);
}

async fn put_schema(host: &Host, ty: &str, schema: &Value, force: bool) -> (u16, Value) {
    let query = if force { "?force=true" } else { "" };
    let response = host
        .http
        .put(host.url(&format!("/v1/schemas/{ty}{query}")))
        .json(schema)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn schemas_check_what_is_published_and_emitted_and_survive_a_restart(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin("ticketing", Guest::Ticketing, None);
    host.start();

    let payment_schema = json!({
        "type": "object",
        "required": ["order_id", "amount_cents"],
        "properties": {
            "order_id": {"type": "string"},
            "amount_cents": {"type": "integer", "minimum": 1}
        }
    });
    let (status, registered) = put_schema(&host, "payment.completed", &payment_schema, false).await;
    assert_eq!(status, 201, "{registered}");
    assert_eq!(registered["version"], 1);
    let dataschema = registered["dataschema"].as_str().unwrap().to_owned();
    assert!(
        dataschema.ends_with("/v1/schemas/payment.completed/1"),
        "{dataschema}"
    );

    // A valid event is stored with `dataschema` naming the version it passed.
    assert_eq!(
        host.send("payment.completed", "ok-1", payment("B-1", 500))
            .await,
        202
    );
    let log = host.log().await;
    let stored = log.iter().find(|e| e["event"]["id"] == "ok-1").unwrap();
    assert_eq!(stored["event"]["dataschema"], dataschema.as_str());
    // ... and that URI serves the schema document.
    let document = reqwest::get(&dataschema).await.unwrap();
    assert_eq!(
        document.headers()["content-type"],
        "application/schema+json"
    );
    assert_eq!(document.json::<Value>().await.unwrap(), payment_schema);

    // An invalid one is refused naming the pointer and the rule; a batch holding one
    // stores nothing.
    let response = host
        .http
        .post(host.url("/v1/events/payment.completed"))
        .json(&payment("B-2", 0))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "schema_violation");
    assert_eq!(error["error"]["details"]["pointer"], "/amount_cents");
    assert_eq!(error["error"]["details"]["rule"], "minimum");
    assert_eq!(error["error"]["details"]["version"], 1);
    let event = |id: &str, amount: u64| {
        json!({"specversion": "1.0", "id": id, "source": "/shop", "type": "payment.completed",
               "data": payment("B-3", amount)})
    };
    let response = host
        .send_batch(&json!([event("batch-ok", 100), event("batch-bad", 0)]))
        .await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("event 1: data at `/amount_cents`"),
        "{error}"
    );
    assert!(
        !host
            .log()
            .await
            .iter()
            .any(|e| e["event"]["id"] == "batch-ok")
    );

    // A version that the type's recent events fail is refused, naming them...
    host.wait_caught_up("ticketing", Duration::from_secs(30))
        .await;
    let strict_tickets = json!({"type": "object", "required": ["venue"]});
    let (status, refused) = put_schema(&host, "tickets.generated", &strict_tickets, false).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "conflict");
    let named = &refused["error"]["details"]["events"][0];
    assert_eq!(named["pointer"], "");
    assert_eq!(named["rule"], "required");
    // Every failing event is counted, not only those named.
    let emitted = host
        .log()
        .await
        .iter()
        .filter(|e| e["event"]["type"] == "tickets.generated")
        .count();
    assert_eq!(refused["error"]["details"]["failing"], emitted, "{refused}");
    // An event scheduled for later is checked too: it enters the log as it is now.
    let response = host
        .http
        .post(host.url("/v1/events/payment.refunded?delay=1h"))
        .header("ce-id", "later-1")
        .json(&json!({"order_id": "B-9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let refund_schema = json!({"type": "object", "required": ["order_id", "reason"]});
    let (status, refused) = put_schema(&host, "payment.refunded", &refund_schema, false).await;
    assert_eq!(status, 409, "{refused}");
    let named = &refused["error"]["details"]["events"][0];
    assert_eq!(
        (named["id"].as_str(), named["scheduled"].as_bool()),
        (Some("later-1"), Some(true)),
        "{refused}"
    );
    assert_eq!(named["sequence"], Value::Null);
    assert_eq!(
        host.get_json("/v1/schemas").await["schemas"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // ... unless forced.
    let (status, forced) = put_schema(&host, "tickets.generated", &strict_tickets, true).await;
    assert_eq!(status, 201, "{forced}");

    // Now ticketing emits what the schema refuses: dead-lettered at once as `schema`.
    assert_eq!(
        host.send("payment.completed", "ok-2", payment("B-4", 700))
            .await,
        202
    );
    let letter = host
        .wait_for(
            "the schema dead letter",
            Duration::from_secs(30),
            || async {
                let page = host.get_json("/v1/dlq?plugin=ticketing").await;
                page["dead_letters"].as_array()?.first().cloned()
            },
        )
        .await;
    assert_eq!(letter["reason"], "schema", "{letter}");
    let errors = letter["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "retrying cannot fix it: {letter}");
    assert_eq!(errors[0]["kind"], "schema");
    let message = errors[0]["message"].as_str().unwrap();
    assert!(message.contains("fails rule `required`"), "{message}");

    // Schemas live in the bus: a restarted host has them and checks with them.
    host.stop();
    host.start();
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("schema")
            .args(args)
            .arg("--url")
            .arg(host.url(""))
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {output:?}");
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let listed = cli(&["list"]);
    let types: Vec<&str> = listed["schemas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["payment.completed", "tickets.generated"]);
    let shown = cli(&["get", "payment.completed"]);
    assert_eq!(shown["latest"], 1);
    assert_eq!(shown["schema"], payment_schema);
    assert_eq!(cli(&["get", "payment.completed", "1"]), payment_schema);
    let file = host.data_dir().with_extension("schema.json");
    std::fs::write(&file, json!({"type": "object"}).to_string()).unwrap();
    let registered = cli(&["put", "order.placed", file.to_str().unwrap()]);
    assert_eq!(registered["version"], 1);
    let response = host
        .http
        .post(host.url("/v1/events/payment.completed"))
        .json(&json!({"order_id": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // A version larger than the NATS server stores in one message says so.
    let huge = json!({"type": "object", "description": "x".repeat(1_100_000)});
    let (status, answer) = put_schema(&host, "bulk.loaded", &huge, false).await;
    match backend {
        Backend::Embedded => assert_eq!(status, 201, "{answer}"),
        Backend::Nats(_) => {
            assert_eq!(status, 413, "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains("max_payload"), "{message}");
        }
    }
}

on_both_backends!(
    a_wait_answers_with_every_subscribed_plugins_outcome_and_what_it_emitted,
    a_wait_that_ends_first_reports_the_retry_and_delivery_goes_on,
    waiting_requests_over_the_limit_are_answered_503,
    schemas_check_what_is_published_and_emitted_and_survive_a_restart,
);
