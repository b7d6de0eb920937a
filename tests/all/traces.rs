//! End-to-end traces: the example flow's spans reach an OTLP receiver the test runs on
//! loopback, as one trace with the parent of every span asserted; sampling decides once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::guests::Guest;
use crate::support::host::{Backend, Host};

/// An OTLP/HTTP (JSON) traces receiver on its own thread and runtime, so that a test
/// blocking its own threads (stopping the host) does not stall the exporter.
struct Receiver {
    endpoint: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start() -> Self {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&bodies);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let kept = Arc::clone(&kept);
                        async move {
                            kept.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                            axum::Json(json!({}))
                        }
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        Self { endpoint, bodies }
    }

    /// Every span received: name, ids, parent and attributes as strings.
    fn spans(&self) -> Vec<Span> {
        let mut spans = Vec::new();
        for body in self.bodies.lock().unwrap().iter() {
            for resource in body["resourceSpans"].as_array().unwrap() {
                for scope in resource["scopeSpans"].as_array().unwrap() {
                    for span in scope["spans"].as_array().unwrap() {
                        let attributes = span["attributes"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|a| {
                                let value = &a["value"];
                                let text = value["stringValue"]
                                    .as_str()
                                    .or(value["intValue"].as_str())
                                    .map(str::to_owned)
                                    .unwrap_or_else(|| value.to_string());
                                (a["key"].as_str().unwrap().to_owned(), text)
                            })
                            .collect();
                        spans.push(Span {
                            name: span["name"].as_str().unwrap().to_owned(),
                            trace: span["traceId"].as_str().unwrap().to_owned(),
                            id: span["spanId"].as_str().unwrap().to_owned(),
                            parent: span["parentSpanId"].as_str().unwrap_or("").to_owned(),
                            attributes,
                        });
                    }
                }
            }
        }
        spans
    }
}

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace: String,
    id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

impl Span {
    fn attribute(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

fn find<'a>(spans: &'a [Span], name: &str, plugin: &str, event_id: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| {
            s.name == name
                && (plugin.is_empty() || s.attribute("plugin") == plugin)
                && s.attribute("event_id") == event_id
        })
        .unwrap_or_else(|| panic!("no {name} span of {plugin} for {event_id} in {spans:#?}"))
}

fn children<'a>(spans: &'a [Span], parent: &Span, name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.parent == parent.id && s.name == name)
        .collect()
}

async fn the_example_flow_is_one_trace(backend: Backend) {
    let receiver = Receiver::start();
    let mut host = Host::on(&backend);
    host.config(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"switchyard-test\"\n",
        receiver.endpoint
    ));
    host.plugin("ticketing", Guest::Ticketing, None)
        .plugin("notifier", Guest::Notifier, None)
        .plugin("audit-trail", Guest::AuditTrail, None);
    host.start();

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let producer_span = "00f067aa0ba902b7";
    let sent = host
        .http
        .post(host.url("/v1/events/payment.completed"))
        .header("ce-id", "pay-1")
        .header("traceparent", format!("00-{trace}-{producer_span}-01"))
        .header("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        .json(&json!({"order_id": "A-1", "amount_cents": 100, "email": "fan@example.com", "quantity": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    let follow_up = host
        .wait_for("the follow-up", Duration::from_secs(20), || async {
            host.log()
                .await
                .into_iter()
                .find(|e| e["event"]["type"] == "tickets.generated")
        })
        .await;
    let follow_up_id = follow_up["event"]["id"].as_str().unwrap().to_owned();
    for plugin in ["ticketing", "notifier", "audit-trail"] {
        host.wait_caught_up(plugin, Duration::from_secs(20)).await;
    }
    // The producer's event keeps a trace context of the request's trace.
    let stored = host
        .log()
        .await
        .into_iter()
        .find(|e| e["event"]["id"] == "pay-1")
        .unwrap();
    let kept = stored["event"]["traceparent"].as_str().unwrap();
    assert!(kept.starts_with(&format!("00-{trace}-")), "{stored}");
    // The vendors' part travels unchanged with the trace, into the follow-ups too.
    let tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    assert_eq!(stored["event"]["tracestate"], tracestate, "{stored}");
    assert_eq!(follow_up["event"]["tracestate"], tracestate, "{follow_up}");
    // Stopping the host exports what is left.
    host.stop();

    let spans = receiver.spans();
    assert!(
        spans.iter().all(|s| s.trace == trace),
        "every span is in the producer's trace: {spans:#?}"
    );
    let receive = find(&spans, "ingest.receive", "", "pay-1");
    assert_eq!(receive.parent, producer_span);
    let append = children(&spans, receive, "log.append");
    assert_eq!(append.len(), 1, "{spans:#?}");
    // The follow-up's trace context names the handler's span.
    let follow_up_context = follow_up["event"]["traceparent"].as_str().unwrap();
    assert!(
        follow_up_context.starts_with(&format!("00-{trace}-")),
        "{follow_up}"
    );
    assert_eq!(kept, format!("00-{trace}-{}-01", receive.id));

    for plugin in ["ticketing", "audit-trail"] {
        let deliver = find(&spans, "dispatch.deliver", plugin, "pay-1");
        assert_eq!(deliver.parent, receive.id, "{deliver:?}");
        assert_eq!(deliver.attribute("attempt"), "1");
        let invoke = children(&spans, deliver, "runtime.invoke");
        assert_eq!(invoke.len(), 1, "{plugin}: {spans:#?}");
        assert_eq!(invoke[0].attribute("plugin"), plugin);
        let commit = children(&spans, deliver, "dispatch.commit");
        assert_eq!(commit.len(), 1, "{plugin}: {spans:#?}");
        assert_eq!(commit[0].attribute("event_id"), "pay-1");
    }
    let ticketing = find(&spans, "dispatch.deliver", "ticketing", "pay-1");
    let ticketing_invoke = children(&spans, ticketing, "runtime.invoke")[0];
    assert_eq!(
        follow_up_context,
        format!("00-{trace}-{}-01", ticketing_invoke.id)
    );
    for plugin in ["notifier", "audit-trail"] {
        let deliver = find(&spans, "dispatch.deliver", plugin, &follow_up_id);
        assert_eq!(deliver.parent, ticketing_invoke.id, "{deliver:?}");
    }
}

async fn a_trace_not_drawn_makes_no_span_and_its_follow_ups_inherit_the_decision(backend: Backend) {
    let receiver = Receiver::start();
    let mut host = Host::on(&backend);
    host.config(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nsample_ratio = 0.0\n",
        receiver.endpoint
    ));
    host.plugin("ticketing", Guest::Ticketing, None);
    host.start();
    let payment = |order: &str| json!({"order_id": order, "amount_cents": 100, "email": "fan@example.com", "quantity": 2});
    // A trace that starts here is not drawn at ratio 0; a producer's sampled one is kept.
    assert_eq!(
        host.send("payment.completed", "unsampled", payment("A-1"))
            .await,
        202
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sent = host
        .http
        .post(host.url("/v1/events/payment.completed"))
        .header("ce-id", "sampled")
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&payment("A-2"))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    // An event's own `tracestate` longer than a propagator keeps is refused.
    let refused = host
        .http
        .post(host.url("/v1/events/payment.completed"))
        .header("ce-id", "long-state")
        .header("ce-tracestate", format!("v={}", "x".repeat(600)))
        .json(&payment("A-9"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    // A header W3C Trace Context does not accept is ignored: the trace starts here.
    let invalid = format!("00-{}-00f067aa0ba902b7-00", "0".repeat(32));
    let sent = host
        .http
        .post(host.url("/v1/events/payment.completed"))
        .header("ce-id", "invalid")
        .header("traceparent", &invalid)
        .json(&payment("A-3"))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    host.wait_for("the follow-ups", Duration::from_secs(20), || async {
        let log = host.log().await;
        (log.iter()
            .filter(|e| e["event"]["type"] == "tickets.generated")
            .count()
            == 3)
            .then_some(())
    })
    .await;
    let log = host.log().await;
    let context = |id: &str| -> String {
        let event = log.iter().find(|e| e["event"]["id"] == id).unwrap();
        event["event"]["traceparent"].as_str().unwrap().to_owned()
    };
    let unsampled = context("unsampled");
    assert!(unsampled.ends_with("-00"), "{unsampled}");
    let replaced = context("invalid");
    assert_ne!(replaced, invalid);
    assert!(
        replaced.starts_with("00-") && replaced.ends_with("-00"),
        "{replaced}"
    );
    let follow_up = log
        .iter()
        .find(|e| e["event"]["causationid"] == "unsampled")
        .unwrap();
    let inherited = follow_up["event"]["traceparent"].as_str().unwrap();
    assert_eq!(inherited, unsampled, "the follow-up carries the decision");
    host.stop();

    let spans = receiver.spans();
    assert!(
        spans.iter().all(|s| s.trace == trace),
        "only the producer's sampled trace made spans: {spans:#?}"
    );
    find(&spans, "dispatch.deliver", "ticketing", "sampled");
}

/// An export the collector refuses (here: nothing listens) is reported in the host's log,
/// with the endpoint; the host goes on serving.
async fn a_failing_export_is_reported(backend: Backend) {
    let port = crate::support::nats::free_port();
    let mut host = Host::on(&backend);
    host.config(&format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{port}/v1/traces\"\n"
    ));
    host.plugin("ticketing", Guest::Ticketing, None);
    host.start();
    let payment =
        json!({"order_id": "A-1", "amount_cents": 100, "email": "fan@example.com", "quantity": 1});
    assert_eq!(host.send("payment.completed", "pay-1", payment).await, 202);
    host.wait_caught_up("ticketing", Duration::from_secs(20))
        .await;
    let warned = host
        .wait_for("the export warning", Duration::from_secs(30), || async {
            host.logged("cannot export traces").into_iter().next()
        })
        .await;
    assert!(warned.contains(&format!("127.0.0.1:{port}")), "{warned}");
    let dropped = |reason: &str| {
        let name = format!("switchyard_trace_spans_dropped_total{{reason=\"{reason}\"}}");
        let host = &host;
        async move { host.metric_if_any(&name).await }
    };
    let lost = dropped("export_failed").await;
    assert!(lost.is_some_and(|n| n >= 1.0), "{lost:?}");
    assert_eq!(dropped("queue_full").await, Some(0.0));
}

/// A collector that takes the connection and never answers holds each export for its
/// timeout: spans past the 2,048 waiting are dropped and counted, and the host goes on.
async fn spans_past_the_export_queue_are_dropped_and_counted(backend: Backend) {
    // Connections queue in the backlog of a socket nobody accepts on.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut host = Host::on(&backend);
    host.config(&format!(
        "[telemetry]\notlp_endpoint = \"http://{}/v1/traces\"\n",
        stalled.local_addr().unwrap()
    ));
    host.plugin("noop", Guest::Noop, Some("subscribe = [\"bench.tick\"]\n"));
    host.start();
    for batch in 0..20 {
        let events: Vec<Value> = (0..100)
            .map(|n| {
                json!({"specversion": "1.0", "id": format!("t-{batch}-{n}"), "source": "/test",
                       "type": "bench.tick", "data": {}})
            })
            .collect();
        assert_eq!(host.send_batch(&json!(events)).await.status(), 202);
    }
    host.wait_caught_up("noop", Duration::from_secs(60)).await;
    let name = "switchyard_trace_spans_dropped_total{reason=\"queue_full\"}";
    let dropped = host
        .wait_for("spans dropped", Duration::from_secs(30), || async {
            host.metric_if_any(name).await.filter(|n| *n > 0.0)
        })
        .await;
    assert!(dropped >= 1.0, "{dropped}");
    drop(stalled);
}

/// With batches, each item's `dispatch.deliver` span covers the batch call it ran in,
/// and what the item emits continues that span (the call itself serves several traces).
async fn a_batch_item_s_follow_up_continues_its_own_delivery(backend: Backend) {
    let receiver = Receiver::start();
    let mut host = Host::on(&backend);
    host.config(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\n",
        receiver.endpoint
    ));
    host.plugin(
        "ticketing",
        Guest::Ticketing,
        Some("[batch]\nmax_size = 8\nlinger = \"100ms\"\n"),
    );
    host.start();
    let payment = |id: &str| {
        json!({"specversion": "1.0", "id": id, "source": "/test", "type": "payment.completed",
               "data": {"order_id": id, "amount_cents": 100, "email": "fan@example.com", "quantity": 1}})
    };
    let response = host
        .send_batch(&json!([payment("pay-1"), payment("pay-2")]))
        .await;
    assert_eq!(response.status(), 202);
    let follow_ups = host
        .wait_for("the follow-ups", Duration::from_secs(20), || async {
            let log = host.log().await;
            let follow_ups: Vec<Value> = log
                .into_iter()
                .filter(|e| e["event"]["type"] == "tickets.generated")
                .collect();
            (follow_ups.len() == 2).then_some(follow_ups)
        })
        .await;
    host.wait_caught_up("ticketing", Duration::from_secs(20))
        .await;
    let batches = host
        .metric("switchyard_batch_calls_total{plugin=\"ticketing\"}")
        .await;
    assert!(batches >= 1.0, "{batches} batch calls");
    host.stop();

    let spans = receiver.spans();
    for follow_up in follow_ups {
        let cause = follow_up["event"]["causationid"].as_str().unwrap();
        let deliver = find(&spans, "dispatch.deliver", "ticketing", cause);
        let receive = find(&spans, "ingest.receive", "", "pay-1");
        assert_eq!(deliver.parent, receive.id, "{deliver:?}");
        assert_eq!(
            follow_up["event"]["traceparent"].as_str().unwrap(),
            format!("00-{}-{}-01", deliver.trace, deliver.id),
            "{cause}: {spans:#?}"
        );
    }
}

/// `sample_ratio` is the share of traces started here that are recorded: drawn once, by
/// the host, not drawn again by the exporter's sampler (which made it the ratio squared).
async fn the_sample_ratio_is_the_share_of_traces_recorded(backend: Backend) {
    let receiver = Receiver::start();
    let mut host = Host::on(&backend);
    host.config(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nsample_ratio = 0.5\n",
        receiver.endpoint
    ));
    host.start();
    const REQUESTS: usize = 300;
    for n in 0..REQUESTS {
        assert_eq!(
            host.send("sampling.probe", &format!("p{n}"), json!({}))
                .await,
            202
        );
    }
    let log = host.log().await;
    let recorded: Vec<&str> = log
        .iter()
        .filter(|e| {
            e["event"]["traceparent"]
                .as_str()
                .is_some_and(|t| t.ends_with("-01"))
        })
        .map(|e| e["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(log.len(), REQUESTS);
    // Half of 300 draws: 150, with a standard deviation of 8.7; at the ratio squared,
    // 75. The bounds are more than four deviations from 150.
    assert!(
        (110..=190).contains(&recorded.len()),
        "{} of {REQUESTS} traces recorded at sample_ratio 0.5",
        recorded.len()
    );
    host.stop();
    // Each recorded trace, and only those, reached the receiver.
    let mut exported: Vec<String> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.name == "ingest.receive")
        .map(|s| s.attribute("event_id").to_owned())
        .collect();
    exported.sort();
    let mut recorded: Vec<String> = recorded.into_iter().map(str::to_owned).collect();
    recorded.sort();
    assert_eq!(exported, recorded);
}

crate::on_both_backends!(
    the_example_flow_is_one_trace,
    a_trace_not_drawn_makes_no_span_and_its_follow_ups_inherit_the_decision,
    the_sample_ratio_is_the_share_of_traces_recorded,
    a_batch_item_s_follow_up_continues_its_own_delivery,
    a_failing_export_is_reported,
    spans_past_the_export_queue_are_dropped_and_counted,
);
