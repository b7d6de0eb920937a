//! Scheduled events with the real binary, on both backends: a due event fires once and
//! on time, a cancelled one never, one due while the host was SIGKILLed fires after the
//! restart, once; bad schedules are refused; a plugin's cancellation commits with its
//! attempt or not at all. (The saga's schedules and cancellations are in
//! `event_sourcing.rs`; two hosts firing once in total in `distributed.rs`.)

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

/// POSTs one event of type `ty`, `?delay=` or `deliverat` when given; the answer.
pub(crate) async fn schedule(
    host: &Host,
    id: &str,
    delay: Option<&str>,
    deliver_at: Option<&str>,
) -> (u16, Value) {
    let path = match delay {
        Some(delay) => format!("/v1/events/reminder.due?delay={delay}"),
        None => "/v1/events/reminder.due".to_owned(),
    };
    let mut request = host
        .http
        .post(host.url(&path))
        .header("ce-id", id)
        .json(&json!({"id": id}));
    if let Some(at) = deliver_at {
        request = request.header("ce-deliverat", at);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The ids of a `GET /v1/scheduled` answer, soonest first.
pub(crate) fn scheduled_ids(listed: &Value) -> Vec<&str> {
    listed["scheduled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect()
}

/// How many times each event id is in the log.
pub(crate) async fn count_in_log(host: &Host, id: &str) -> usize {
    host.log()
        .await
        .iter()
        .filter(|e| e["event"]["id"] == id)
        .count()
}

fn millis(rfc3339: &str) -> i64 {
    rfc3339.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

async fn a_scheduled_event_fires_once_on_time_and_a_cancelled_one_never(backend: Backend) {
    let mut host = Host::on(&backend);
    host.start();
    let (status, body) = schedule(&host, "soon", Some("1500ms"), None).await;
    assert_eq!(status, 202, "{body}");
    let due = body["accepted"][0]["scheduled"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(body["accepted"][0].get("sequence").is_none(), "{body}");
    let later = jiff::Timestamp::now() + jiff::SignedDuration::from_millis(1500);
    let (status, body) = schedule(&host, "cancelled", None, Some(&format!("{later:.3}"))).await;
    assert_eq!(status, 202, "{body}");
    let listed = host.get_json("/v1/scheduled?type=reminder.due").await;
    assert_eq!(listed["pending"], 2, "{listed}");
    assert_eq!(scheduled_ids(&listed).len(), 2, "{listed}");
    // A pending event's id sent again from another source is that event sent again: the
    // first stays, due when it was, on both backends.
    let twin = |source: &'static str, delay: &'static str| {
        host.http
            .post(host.url(&format!("/v1/events/reminder.twin?delay={delay}")))
            .header("ce-id", "twin")
            .header("ce-source", source)
            .json(&json!({"from": source}))
            .send()
    };
    let first: Value = twin("/first", "1h").await.unwrap().json().await.unwrap();
    let again = twin("/second", "2h").await.unwrap();
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["accepted"][0]["duplicate"], true, "{again}");
    assert_eq!(
        again["accepted"][0]["scheduled"], first["accepted"][0]["scheduled"],
        "{first} {again}"
    );
    let twins = host.get_json("/v1/scheduled?type=reminder.twin").await;
    assert_eq!(scheduled_ids(&twins), ["twin"], "{twins}");
    assert_eq!(twins["scheduled"][0]["source"], "/first", "{twins}");
    assert_eq!(
        host.http
            .delete(host.url("/v1/scheduled/twin"))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let cancelled = host
        .http
        .delete(host.url("/v1/scheduled/cancelled"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 204);
    let again = host
        .http
        .delete(host.url("/v1/scheduled/cancelled"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    assert_eq!(
        count_in_log(&host, "soon").await,
        0,
        "fired before it was due"
    );

    let fired = host
        .wait_for("the due event", Duration::from_secs(10), || async {
            host.log()
                .await
                .into_iter()
                .find(|e| e["event"]["id"] == "soon")
        })
        .await;
    let lag = millis(fired["ingested_at"].as_str().unwrap()) - millis(&due);
    assert!(
        (0..1000).contains(&lag),
        "fired {lag} ms after its due time"
    );
    assert!(fired["event"].get("deliverat").is_none(), "{fired}");
    // Long enough for a second firing, or the cancelled one, to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count_in_log(&host, "soon").await, 1);
    assert_eq!(count_in_log(&host, "cancelled").await, 0);
    let listed = host.get_json("/v1/scheduled").await;
    assert_eq!(listed["pending"], 0, "{listed}");
    assert!(host.metric("switchyard_scheduled_fired_total").await >= 1.0);

    // Refusals: a bad time, both `delay` and `deliverat`, a time too far ahead, a
    // condition on a scheduled event.
    for (delay, at) in [
        (None, Some("tomorrow")),
        (Some("5s"), Some("2030-01-01T00:00:00Z")),
        (None, Some("9999-01-01T00:00:00Z")),
        (Some("soon"), None),
    ] {
        let (status, body) = schedule(&host, "bad", delay, at).await;
        assert_eq!(status, 400, "{delay:?} {at:?}: {body}");
    }
    let response = host
        .http
        .post(host.url("/v1/events/reminder.due?delay=1s"))
        .header("ce-id", "conditional")
        .header("ce-subject", "s")
        .header("ce-expectedversion", "0")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

async fn an_event_due_while_the_host_was_killed_fires_after_the_restart_once(backend: Backend) {
    let mut host = Host::on(&backend);
    host.config("[bus]\nack_wait = \"2s\"\n");
    host.start();
    let (status, _) = schedule(&host, "while-down", Some("500ms"), None).await;
    assert_eq!(status, 202);
    host.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restarted = Instant::now();
    host.start();
    host.wait_for(
        "the event due while the host was down",
        Duration::from_secs(20),
        || async { (count_in_log(&host, "while-down").await > 0).then_some(()) },
    )
    .await;
    assert!(
        restarted.elapsed() < Duration::from_secs(10),
        "{:?}",
        restarted.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count_in_log(&host, "while-down").await, 1);
}

/// More pending events than one read of the store brings (a batched direct get on NATS
/// brings 256): every one is listed, soonest first, and `type` and `limit` still hold.
async fn a_listing_of_many_scheduled_events_misses_none(backend: Backend) {
    const COUNT: usize = 700;
    let mut host = Host::on(&backend);
    host.start();
    let now = jiff::Timestamp::now();
    // Scheduled in an order other than their due times (`n` is due `offset(n)` seconds
    // after the first), and of two types.
    let offset = |n: usize| (n * 7919) % COUNT;
    let id = |n: usize| format!("many-{n}");
    let events: Vec<Value> = (0..COUNT)
        .map(|n| {
            let due = now + jiff::SignedDuration::from_secs(3600 + offset(n) as i64);
            json!({
                "specversion": "1.0",
                "id": id(n),
                "source": "/many",
                "type": if n % 2 == 0 { "reminder.even" } else { "reminder.odd" },
                "deliverat": format!("{due:.3}"),
                "data": {"n": n},
            })
        })
        .collect();
    for chunk in events.chunks(100) {
        let response = host
            .http
            .post(host.url("/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(serde_json::to_vec(chunk).unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    }
    let mut by_due: Vec<usize> = (0..COUNT).collect();
    by_due.sort_by_key(|&n| offset(n));
    let listed = host.get_json("/v1/scheduled?limit=1000").await;
    assert_eq!(listed["pending"], COUNT, "{}", listed["pending"]);
    let ids = scheduled_ids(&listed);
    assert_eq!(ids.len(), COUNT);
    assert_eq!(
        ids,
        by_due.iter().map(|&n| id(n)).collect::<Vec<_>>(),
        "not every event, or not soonest first"
    );
    let odd = host
        .get_json("/v1/scheduled?type=reminder.odd&limit=1000")
        .await;
    assert_eq!(scheduled_ids(&odd).len(), COUNT / 2);
    let first = host
        .get_json("/v1/scheduled?type=reminder.even&limit=3")
        .await;
    let first_even: Vec<String> = by_due
        .iter()
        .filter(|&&n| n % 2 == 0)
        .take(3)
        .map(|&n| id(n))
        .collect();
    assert_eq!(scheduled_ids(&first), first_even);
}

/// POSTs an event of `ty` with `id` and empty data, scheduled `delay` ahead.
async fn schedule_in(host: &Host, ty: &str, id: &str, delay: &str) -> u16 {
    host.http
        .post(host.url(&format!("/v1/events/{ty}?delay={delay}")))
        .header("ce-id", id)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A plugin's cancellation commits with its attempt or not at all: an attempt whose
/// commit conflicts (a KV value it read changed) leaves the scheduled event pending for
/// its next run, which cancels it; an attempt whose event came due while it ran runs
/// again and sees it fired. Never both cancelled and fired.
async fn a_plugins_cancellation_commits_with_its_attempt_or_not_at_all(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "saga",
        Guest::Hostile,
        Some(
            "subscribe = [\"hostile.cancel-slowly\", \"hostile.bump\", \"hostile.count\"]\n\
             concurrency = 2\n[limits]\ntimeout = \"10s\"\n[config]\ncancel_ms = \"1500\"\n",
        ),
    );
    host.start();
    let outcome = |timer: &'static str| {
        let host = &host;
        async move {
            host.wait_for("the cancelling call", Duration::from_secs(30), || async {
                host.kv("saga", &format!("cancel/{timer}")).await
            })
            .await
        }
    };

    // The cancelling call's commit conflicts with a bump made while it slept: the
    // schedule it claimed goes back, and its second run cancels it.
    assert_eq!(
        schedule_in(&host, "hostile.count", "expiry-1", "1h").await,
        202
    );
    assert_eq!(
        host.send("hostile.cancel-slowly", "pay-1", json!("expiry-1"))
            .await,
        202
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host.send("hostile.bump", "bump-1", json!({})).await, 202);
    assert_eq!(outcome("expiry-1").await, "cancelled");
    let conflicts = host
        .metric_if_any("switchyard_deliveries_total{plugin=\"saga\",outcome=\"conflict\"}")
        .await;
    assert!(
        conflicts.is_some_and(|n| n >= 1.0),
        "the first run conflicted: {conflicts:?}"
    );
    let listed = host.get_json("/v1/scheduled").await;
    assert_eq!(
        scheduled_ids(&listed),
        Vec::<&str>::new(),
        "cancelled for good"
    );

    // A call that cancels an event due before its commit: it runs again and finds it fired.
    assert_eq!(
        schedule_in(&host, "hostile.count", "expiry-2", "500ms").await,
        202
    );
    assert_eq!(
        host.send("hostile.cancel-slowly", "pay-2", json!("expiry-2"))
            .await,
        202
    );
    assert_eq!(outcome("expiry-2").await, "too-late");
    host.wait_for("the event that fired", Duration::from_secs(30), || async {
        host.kv("saga", "seen/expiry-2").await
    })
    .await;
    assert_eq!(count_in_log(&host, "expiry-2").await, 1);
    assert_eq!(
        host.kv("saga", "seen/expiry-1").await,
        None,
        "the cancelled one never fired"
    );
}

crate::on_both_backends!(
    a_plugins_cancellation_commits_with_its_attempt_or_not_at_all,
    a_listing_of_many_scheduled_events_misses_none,
    a_scheduled_event_fires_once_on_time_and_a_cancelled_one_never,
    an_event_due_while_the_host_was_killed_fires_after_the_restart_once,
);
