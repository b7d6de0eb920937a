//! Subject streams and the box-office saga with the real binary, on both backends:
//! dense stream versions, conditional appends over HTTP (`409`, a batch stores nothing),
//! the aggregate that never oversells, the saga end to end through a SIGKILL, and a
//! plugin of the old contract beside the new ones.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

/// POSTs one event of `ty` with `subject` (and `expectedversion` when given).
async fn append(
    host: &Host,
    ty: &str,
    id: &str,
    subject: &str,
    expected: Option<u64>,
    data: Value,
) -> (u16, Value) {
    let mut request = host
        .http
        .post(host.url(&format!("/v1/events/{ty}")))
        .header("ce-id", id)
        .header("ce-subject", subject)
        .json(&data);
    if let Some(expected) = expected {
        request = request.header("ce-expectedversion", expected.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The stream versions of a subject's events, in the order the API lists them.
async fn versions(host: &Host, subject: &str) -> Vec<u64> {
    let stream = host
        .get_json(&format!("/v1/streams/{subject}?limit=1000"))
        .await;
    stream["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["streamversion"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// The status `GET /v1/streams/{subject}` answers.
async fn stream_status(host: &Host, subject: &str) -> reqwest::StatusCode {
    host.http
        .get(host.url(&format!("/v1/streams/{subject}")))
        .send()
        .await
        .unwrap()
        .status()
}

/// The events of the log of type `ty`.
async fn of_type(host: &Host, ty: &str) -> Vec<Value> {
    host.log()
        .await
        .into_iter()
        .filter(|e| e["event"]["type"] == ty)
        .collect()
}

async fn stream_versions_are_dense_and_stale_appends_are_refused(backend: Backend) {
    let mut host = Host::on(&backend);
    host.start();

    for (i, subject) in ["acct-1", "acct-2", "acct-1", "acct-1", "acct-2"]
        .iter()
        .enumerate()
    {
        let (status, body) = append(
            &host,
            "account.credited",
            &format!("c{i}"),
            subject,
            None,
            json!({"cents": i}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(versions(&host, "acct-1").await, [1, 2, 3]);
    assert_eq!(versions(&host, "acct-2").await, [1, 2]);
    let page = host.get_json("/v1/streams/acct-1?after=1&limit=1").await;
    assert_eq!(page["version"], 3);
    assert_eq!(page["events"][0]["id"], "c2");
    assert_eq!(page["next_after"], 2);
    // A conditional batch is one atomic batch on NATS, of at most 1,000 messages.
    let bulk: Vec<Value> = (0..1001)
        .map(|n| {
            let mut event = json!({
                "specversion": "1.0", "id": format!("bulk-{n}"), "source": "/tests/streams",
                "type": "account.bulk", "subject": "bulk", "data": {},
            });
            if n == 0 {
                event["expectedversion"] = json!("0");
            }
            event
        })
        .collect();
    let response = host.send_batch(&json!(bulk)).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    match backend {
        Backend::Embedded => assert_eq!(status, 202, "{body}"),
        Backend::Nats(_) => {
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["error"]["code"], "invalid_event");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("this one needs 1001"), "{message}");
            let stream = stream_status(&host, "bulk").await;
            assert_eq!(stream, 404, "nothing of it stored");
        }
    }
    // An event of no stream keeps no version its producer gave it.
    let forged = json!([{
        "specversion": "1.0", "id": "forged-1", "source": "/tests/streams",
        "type": "account.noted", "streamversion": "7", "data": {},
    }]);
    assert_eq!(host.send_batch(&forged).await.status(), 202);
    let noted = of_type(&host, "account.noted").await;
    assert_eq!(noted.len(), 1);
    assert!(
        noted[0]["event"].get("streamversion").is_none(),
        "{noted:?}"
    );

    // A stale expectation is refused with the current version, and stores nothing.
    let (status, body) = append(&host, "account.debited", "d1", "acct-1", Some(2), json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "version_conflict");
    assert_eq!(body["error"]["details"]["currentversion"], 3);
    assert_eq!(versions(&host, "acct-1").await, [1, 2, 3]);
    let (status, body) = append(&host, "account.debited", "d1", "acct-1", Some(3), json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"][0]["streamversion"], 4);
    // The producer's retry of an append that was stored is a duplicate, not a conflict.
    let (status, body) = append(&host, "account.debited", "d1", "acct-1", Some(3), json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"][0]["duplicate"], true);
    assert_eq!(body["accepted"][0]["streamversion"], 4);
    // `0`: the stream must not exist yet.
    let (status, _) = append(&host, "account.opened", "o3", "acct-3", Some(0), json!({})).await;
    assert_eq!(status, 202);
    let (status, _) = append(&host, "account.opened", "o3b", "acct-3", Some(0), json!({})).await;
    assert_eq!(status, 409);

    // One conflict in a batch stores nothing of it.
    let batch = json!([
        {"specversion": "1.0", "id": "b1", "source": "/test", "type": "account.debited",
         "subject": "acct-1", "expectedversion": "4", "data": {}},
        {"specversion": "1.0", "id": "b2", "source": "/test", "type": "account.opened",
         "subject": "acct-9", "expectedversion": "0", "data": {}},
        {"specversion": "1.0", "id": "b3", "source": "/test", "type": "account.debited",
         "subject": "acct-2", "expectedversion": "7", "data": {}},
    ]);
    assert_eq!(host.send_batch(&batch).await.status(), 409);
    assert_eq!(versions(&host, "acct-1").await, [1, 2, 3, 4]);
    let missing = stream_status(&host, "acct-9").await;
    assert_eq!(
        missing, 404,
        "a batch with a conflict stored part of itself"
    );
    assert!(host.log().await.iter().all(|e| e["event"]["id"] != "b1"));

    // A resend mixing a stored append with new ones: the stored one is its duplicate, the
    // new ones are stored all together or not at all.
    let resend = |conditions: &[(&str, &str, &str, u64)]| {
        let mut events = vec![json!({"specversion": "1.0", "id": "d1",
            "source": "/switchyard/http", "type": "account.debited", "subject": "acct-1",
            "expectedversion": "3", "data": {}})];
        for (id, ty, subject, expected) in conditions {
            events.push(
                json!({"specversion": "1.0", "id": id, "source": "/test", "type": ty,
                "subject": subject, "expectedversion": expected.to_string(), "data": {}}),
            );
        }
        Value::Array(events)
    };
    let failing = resend(&[
        ("m1", "account.opened", "acct-7", 0),
        ("m2", "account.debited", "acct-2", 7),
    ]);
    assert_eq!(host.send_batch(&failing).await.status(), 409);
    assert_eq!(
        stream_status(&host, "acct-7").await,
        404,
        "a resent batch with a conflict stored part of itself"
    );
    let holding = resend(&[("m1", "account.opened", "acct-7", 0)]);
    let response = host.send_batch(&holding).await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"][0]["duplicate"], true, "{body}");
    assert_eq!(body["accepted"][0]["streamversion"], 4, "{body}");
    assert_eq!(body["accepted"][1]["duplicate"], false, "{body}");
    assert_eq!(body["accepted"][1]["streamversion"], 1, "{body}");
    assert_eq!(versions(&host, "acct-1").await, [1, 2, 3, 4]);

    // An expectation needs a subject.
    let response = host
        .http
        .post(host.url("/v1/events/account.debited"))
        .header("ce-id", "x")
        .header("ce-expectedversion", "1")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let never = stream_status(&host, "never-written").await;
    assert_eq!(never, 404);
}

/// `GET /v1/events?subject=` finds a subject's events through its stream, not by reading
/// the log: 11,000 events of no subject between two of the subject's do not split them
/// across pages (a read scans at most about 10,000 events).
async fn the_log_read_by_subject_finds_its_events_past_many_others(backend: Backend) {
    let mut host = Host::on(&backend);
    host.start();
    let (status, _) = append(&host, "order.placed", "o-1", "order-7", None, json!({})).await;
    assert_eq!(status, 202);
    for batch in 0..11 {
        let events: Vec<Value> = (0..1000)
            .map(|n| {
                json!({"specversion": "1.0", "id": format!("noise-{batch}-{n}"),
                       "source": "/tests/log", "type": "noise.made", "data": {}})
            })
            .collect();
        assert_eq!(host.send_batch(&json!(events)).await.status(), 202);
    }
    let (status, _) = append(&host, "order.shipped", "o-2", "order-7", None, json!({})).await;
    assert_eq!(status, 202);
    let page = host.get_json("/v1/events?subject=order-7&limit=10").await;
    let ids: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["o-1", "o-2"], "{page}");
    let after = page["next_after"].as_u64().unwrap();
    let rest = host
        .get_json(&format!("/v1/events?subject=order-7&after={after}"))
        .await;
    assert_eq!(rest["events"], json!([]), "{rest}");
    assert_eq!(rest["next_after"], Value::Null, "{rest}");
}

/// The box office with `hold` as its sidecar's hold time.
fn box_office(host: &Host, hold: &str) {
    host.plugin(
        "box-office",
        Guest::BoxOffice,
        Some(&format!("[config]\nhold = \"{hold}\"\n")),
    );
}

async fn the_last_seats_go_to_exactly_as_many_reservations_as_fit(backend: Backend) {
    let mut host = Host::on(&backend);
    box_office(&host, "10m");
    host.start();
    let (status, _) = append(
        &host,
        "show.opened",
        "open",
        "show/s1",
        Some(0),
        json!({"seats": 5}),
    )
    .await;
    assert_eq!(status, 202);
    let ids: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    let requests = ids.iter().map(|id| {
        host.send(
            "reservation.requested",
            id,
            json!({"reservation_id": id, "show_id": "s1", "seats": 1, "email": "fan@example.com"}),
        )
    });
    for status in join_all(requests).await {
        assert_eq!(status, 202);
    }
    let decided = host
        .wait_for("20 decisions", Duration::from_secs(60), || async {
            let held = of_type(&host, "reservation.held").await.len();
            let rejected = of_type(&host, "reservation.rejected").await.len();
            (held + rejected == 20).then_some((held, rejected))
        })
        .await;
    assert_eq!(decided, (5, 15));
    for rejected in of_type(&host, "reservation.rejected").await {
        assert_eq!(rejected["event"]["data"]["reason"], "not enough seats");
    }
    // One `show.opened`, five `seats.reserved`: no gap, no duplicate.
    assert_eq!(versions(&host, "show/s1").await, [1, 2, 3, 4, 5, 6]);
    // A waiting producer sees the emitted event as stored: its condition is not in it,
    // the version it took in its stream is.
    let answer: Value = host
        .http
        .post(host.url("/v1/events/reservation.requested?wait=10s"))
        .header("ce-id", "late")
        .json(&json!({"reservation_id": "late", "show_id": "s1", "seats": 1, "email": "fan@example.com"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let emitted = &answer["accepted"][0]["plugins"][0]["emitted"][0];
    assert_eq!(emitted["type"], "reservation.rejected", "{answer}");
    assert!(emitted.get("expectedversion").is_none(), "{answer}");
    assert_eq!(emitted["subject"], "reservation/late", "{answer}");
    assert_eq!(emitted["streamversion"], "1", "{answer}");
    // And the version its own event took.
    let answer: Value = host
        .http
        .post(host.url("/v1/events/test.noted?wait=2s"))
        .header("ce-id", "noted-1")
        .header("ce-subject", "notes/1")
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["accepted"][0]["streamversion"], 1, "{answer}");
    let status = host.status("box-office").await.unwrap();
    assert_eq!(status["dead_letters"], 0, "{status}");
}

async fn the_saga_reserves_pays_expires_fails_and_refunds_through_a_sigkill(backend: Backend) {
    let mut host = Host::on(&backend);
    // On NATS, what the killed host held goes to the restarted one after `ack_wait`.
    host.config("[bus]\nack_wait = \"2s\"\n");
    box_office(&host, "3s");
    host.plugin("ticketing", Guest::Ticketing, None);
    host.plugin("notifier", Guest::Notifier, None);
    host.start();
    let reserve = |id: &'static str, seats: u32| json!({"reservation_id": id, "show_id": "s2", "seats": seats, "email": format!("{id}@example.com")});
    assert_eq!(
        append(
            &host,
            "show.opened",
            "open-s2",
            "show/s2",
            Some(0),
            json!({"seats": 10})
        )
        .await
        .0,
        202
    );
    for (id, seats) in [("paid", 2), ("unpaid", 3), ("failed", 1)] {
        assert_eq!(
            host.send(
                "reservation.requested",
                &format!("req-{id}"),
                reserve(id, seats)
            )
            .await,
            202
        );
    }
    host.wait_for("three holds", Duration::from_secs(30), || async {
        (of_type(&host, "reservation.held").await.len() == 3).then_some(())
    })
    .await;

    // The payment, then a SIGKILL before the saga can have finished its steps.
    assert_eq!(
        host.send(
            "reservation.paid",
            "pay-paid",
            json!({"reservation_id": "paid", "amount_cents": 5000})
        )
        .await,
        202
    );
    assert_eq!(
        host.send(
            "reservation.payment-failed",
            "fail-failed",
            json!({"reservation_id": "failed"})
        )
        .await,
        202
    );
    host.kill();
    host.start();

    host.wait_for(
        "the notification of the paid reservation",
        Duration::from_secs(30),
        || async { host.kv("notifier", "notified/paid").await },
    )
    .await;
    // The unpaid reservation's hold runs out; its seats come back.
    let released = host
        .wait_for("two releases", Duration::from_secs(30), || async {
            let released = of_type(&host, "seats.released").await;
            (released.len() == 2).then_some(released)
        })
        .await;
    let mut released: Vec<&str> = released
        .iter()
        .map(|e| e["event"]["data"]["reservation_id"].as_str().unwrap())
        .collect();
    released.sort_unstable();
    assert_eq!(released, ["failed", "unpaid"]);
    assert_eq!(
        of_type(&host, "reservation.expired").await.len(),
        1,
        "only the unpaid hold expires"
    );

    // A late payment for the expired hold is refunded; cancelling the show refunds the
    // paid order.
    assert_eq!(
        host.send(
            "reservation.paid",
            "pay-unpaid",
            json!({"reservation_id": "unpaid", "amount_cents": 100})
        )
        .await,
        202
    );
    assert_eq!(
        append(
            &host,
            "show.cancelled",
            "cancel-s2",
            "show/s2",
            None,
            json!({})
        )
        .await
        .0,
        202
    );
    let refunds = host
        .wait_for("two refunds", Duration::from_secs(30), || async {
            let refunds = of_type(&host, "refund.requested").await;
            (refunds.len() == 2).then_some(refunds)
        })
        .await;
    let mut refunded: Vec<(&str, &str)> = refunds
        .iter()
        .map(|e| {
            (
                e["event"]["data"]["reservation_id"].as_str().unwrap(),
                e["event"]["data"]["reason"].as_str().unwrap(),
            )
        })
        .collect();
    refunded.sort_unstable();
    assert_eq!(
        refunded,
        [
            ("paid", "the show was cancelled"),
            ("unpaid", "the reservation expired before payment")
        ]
    );
    for plugin in ["box-office", "ticketing", "notifier"] {
        host.wait_caught_up(plugin, Duration::from_secs(30)).await;
    }
    // Every effect once, whatever the SIGKILL interrupted.
    for (ty, count) in [
        ("seats.reserved", 3),
        ("reservation.held", 3),
        ("payment.completed", 1),
        ("tickets.generated", 1),
        ("seats.released", 2),
        ("reservation.expired", 1),
        ("refund.requested", 2),
    ] {
        assert_eq!(of_type(&host, ty).await.len(), count, "{ty}");
    }
    let show = versions(&host, "show/s2").await;
    assert_eq!(show, (1..=show.len() as u64).collect::<Vec<_>>());
    let scheduled = host.get_json("/v1/scheduled").await;
    assert_eq!(scheduled["pending"], 0, "{scheduled}");
}

async fn a_plugin_of_contract_0_1_runs_beside_plugins_of_0_2(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin("legacy", Guest::Contract01, None);
    box_office(&host, "10m");
    host.start();
    let plugins = host.get_json("/v1/plugins").await;
    let contracts: Vec<(String, String)> = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["contract"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        contracts.contains(&("legacy".into(), "0.1.0".into())),
        "{plugins}"
    );
    assert!(
        contracts.contains(&("box-office".into(), "0.2.0".into())),
        "{plugins}"
    );
    for i in 0..3 {
        assert_eq!(
            append(
                &host,
                "legacy.tick",
                &format!("t{i}"),
                "meter-1",
                None,
                json!({})
            )
            .await
            .0,
            202
        );
    }
    let count = host
        .wait_for(
            "the legacy plugin's count",
            Duration::from_secs(30),
            || async {
                host.kv("legacy", "count/meter-1")
                    .await
                    .filter(|count| count == "6")
            },
        )
        .await;
    // Three ticks and the three `legacy.counted` it emitted, all in the subject's stream.
    assert_eq!(count, "6");
    assert_eq!(versions(&host, "meter-1").await, [1, 2, 3, 4, 5, 6]);
}

/// KV writes and a conditional stream append in one call: one transaction on the
/// embedded log; on NATS two streams that no atomic batch spans, so the call is refused
/// with the reason, to the dead letters, rather than half committed.
async fn kv_writes_with_a_stream_condition_commit_together_or_are_refused(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "mixed",
        Guest::Hostile,
        Some("subscribe = [\"hostile.kv-and-stream\"]\n"),
    );
    host.start();
    assert_eq!(
        host.send("hostile.kv-and-stream", "m1", json!({})).await,
        202
    );
    match backend {
        Backend::Embedded => {
            let written = host
                .wait_for("the KV write", Duration::from_secs(30), || async {
                    host.kv("mixed", "mixed/m1").await
                })
                .await;
            assert_eq!(written, "1");
            assert_eq!(versions(&host, "ledger").await, [1]);
        }
        Backend::Nats(_) => {
            let letters = host
                .wait_dead_letters("mixed", Duration::from_secs(30))
                .await;
            assert_eq!(letters[0]["reason"], "effects", "{letters:?}");
            let errors = letters[0]["errors"].to_string();
            assert!(errors.contains("cannot both write KV"), "{errors}");
            assert_eq!(host.kv("mixed", "mixed/m1").await, None, "half committed");
            let stream = stream_status(&host, "ledger").await;
            assert_eq!(stream, 404, "half committed");
        }
    }
}

async fn an_emit_expecting_a_version_the_stream_has_left_is_dead_lettered(backend: Backend) {
    let mut host = Host::on(&backend);
    host.plugin(
        "commands",
        Guest::Hostile,
        Some("subscribe = [\"hostile.append-expecting\"]\nordering = \"key\"\n"),
    );
    host.start();
    let command = |id: &str| {
        json!({
            "specversion": "1.0", "id": id, "source": "/tests/commands",
            "type": "hostile.append-expecting", "partitionkey": "ledger",
            "data": { "expected": 0 },
        })
    };
    // The first takes the stream from 0 to 1; the second still expects 0, and running
    // it again cannot change what it expects.
    for id in ["first", "second"] {
        assert_eq!(host.send_batch(&json!([command(id)])).await.status(), 202);
    }
    let letters = host
        .wait_dead_letters("commands", Duration::from_secs(20))
        .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["event"]["id"], "second");
    assert_eq!(letters[0]["reason"], "effects");
    let message = letters[0]["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("`ledger` at version 0, and it is at 1"),
        "{message}"
    );
    assert_eq!(versions(&host, "ledger").await, [1]);
    // The key it held is free: a command expecting the version the stream is at goes in.
    let mut third = command("third");
    third["data"]["expected"] = json!(1);
    assert_eq!(host.send_batch(&json!([third])).await.status(), 202);
    host.wait_for("the third command", Duration::from_secs(20), || async {
        (versions(&host, "ledger").await == [1, 2]).then_some(())
    })
    .await;
}

async fn a_stream_whose_events_aged_out_goes_on_from_its_version(backend: Backend) {
    let mut host = Host::on(&backend);
    host.config(
        // Long enough for the steps that need an event still kept (a duplicate is
        // recognised while its original is, and within NATS's dedupe window, which
        // cannot exceed the stream's age) even on a loaded machine.
        "[log]\nretention_interval = \"100ms\"\n\n\
         [[log.retention]]\ntypes = \">\"\nmax_age = \"3s\"\n",
    );
    host.start();
    for (i, expected) in [None, Some(1)].into_iter().enumerate() {
        let id = format!("c{i}");
        let (status, body) = append(
            &host,
            "account.credited",
            &id,
            "acct-9",
            expected,
            json!({}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
    }
    assert_eq!(versions(&host, "acct-9").await, [1, 2]);
    // The embedded log keeps its newest event whatever its age: let it be another's.
    let (status, body) = append(&host, "account.opened", "o1", "acct-10", None, json!({})).await;
    assert_eq!(status, 202, "{body}");

    let page = aged_out(&host, "acct-9").await;
    assert_eq!(page["version"], 2, "{page}");

    // Its versions go on: the stream still exists, at version 2.
    let (status, body) = append(&host, "account.opened", "o2", "acct-9", Some(0), json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["details"]["currentversion"], 2);
    let (status, body) = append(&host, "account.debited", "d1", "acct-9", Some(2), json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"][0]["streamversion"], 3);
    let (status, body) = append(&host, "account.debited", "d2", "acct-9", None, json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"][0]["streamversion"], 4);
    // A producer's retry of a stored append is answered as the duplicate it is.
    let (status, body) = append(&host, "account.debited", "d2", "acct-9", None, json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"][0]["duplicate"], true, "{body}");
    assert_eq!(body["accepted"][0]["streamversion"], 4);
    assert_eq!(versions(&host, "acct-9").await, [3, 4]);

    // The duplicate took no version: once these age out too, the stream goes on at 5.
    let (status, body) = append(&host, "account.opened", "o3", "acct-11", None, json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(aged_out(&host, "acct-9").await["version"], 4);
    let (status, body) = append(&host, "account.debited", "d3", "acct-9", None, json!({})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"][0]["streamversion"], 5);
}

/// The page of `subject`'s stream once none of its events is kept.
async fn aged_out(host: &Host, subject: &str) -> Value {
    host.wait_for(
        "the stream's events to age out",
        Duration::from_secs(30),
        || async {
            let page = host
                .get_json(&format!("/v1/streams/{subject}?limit=10"))
                .await;
            (page["events"].as_array().map(Vec::len) == Some(0)).then_some(page)
        },
    )
    .await
}

/// `stream::read_at_most` keeps its limit when the first page already holds more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_stream_at_most_refuses_a_longer_one_from_its_first_page() {
    let mut host = Host::new();
    host.plugin(
        "folder",
        Guest::Hostile,
        Some("subscribe = [\"hostile.fold\"]\n[retry]\nmax_attempts = 1\n"),
    );
    host.start();
    for (n, expected) in [(1, "1"), (2, "2")] {
        assert_eq!(
            append(&host, "entry", &format!("e{n}"), "ledger", None, json!({}))
                .await
                .0,
            202
        );
        assert_eq!(
            host.send("hostile.fold", &format!("f{n}"), json!({})).await,
            202
        );
        let folded = host
            .wait_for("the fold", Duration::from_secs(30), || async {
                host.kv("folder", &format!("folded/f{n}")).await
            })
            .await;
        assert_eq!(folded, expected);
    }
    assert_eq!(
        append(&host, "entry", "e3", "ledger", None, json!({}))
            .await
            .0,
        202
    );
    assert_eq!(host.send("hostile.fold", "f3", json!({})).await, 202);
    let letters = host
        .wait_dead_letters("folder", Duration::from_secs(30))
        .await;
    let message = letters[0]["errors"][0]["message"].to_string();
    assert!(message.contains("holds more than 2 events"), "{letters:?}");
    assert_eq!(host.kv("folder", "folded/f3").await, None);
}

crate::on_both_backends!(
    the_log_read_by_subject_finds_its_events_past_many_others,
    an_emit_expecting_a_version_the_stream_has_left_is_dead_lettered,
    a_stream_whose_events_aged_out_goes_on_from_its_version,
    kv_writes_with_a_stream_condition_commit_together_or_are_refused,
    stream_versions_are_dense_and_stale_appends_are_refused,
    the_last_seats_go_to_exactly_as_many_reservations_as_fit,
    the_saga_reserves_pays_expires_fails_and_refunds_through_a_sigkill,
    a_plugin_of_contract_0_1_runs_beside_plugins_of_0_2,
);
