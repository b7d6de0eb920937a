//! The HTTP API driven without a socket (`Router::oneshot`) over a real embedded log:
//! ingest modes, validation errors with their statuses, auth, limits, dedupe and
//! all-or-nothing batches.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use switchyard_host::bus::sqlite::{SqliteBus, SqliteOptions};
use switchyard_host::config::Config;
use switchyard_host::ingest::{AppState, router};
use switchyard_host::metrics::Metrics;
use switchyard_host::schema::Schemas;
use tower::ServiceExt;

struct Api {
    state: Arc<AppState>,
    dir: tempfile::TempDir,
}

impl Api {
    fn new(config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bus = SqliteBus::open(SqliteOptions::new(dir.path().join("log.db"))).unwrap();
        let bus: Arc<dyn switchyard_host::Bus> = Arc::new(bus);
        let state = Arc::new(AppState::new(
            Arc::clone(&bus),
            Arc::new(RwLock::new(BTreeMap::new())),
            Arc::new(Metrics::default()),
            Arc::new(config),
            Schemas::new(bus),
        ));
        state
            .ready
            .store(true, std::sync::atomic::Ordering::Release);
        Self { state, dir }
    }

    async fn call(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = router(Arc::clone(&self.state))
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, json)
    }

    async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<Body>,
    ) -> (StatusCode, Value) {
        self.call(
            Request::post(path)
                .header(header::CONTENT_TYPE, content_type)
                .body(body.into())
                .unwrap(),
        )
        .await
    }

    async fn stored(&self) -> u64 {
        self.state.bus.head().await.unwrap()
    }
}

fn structured(id: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/shop", "type": "order.created", "data": {"n": 1}})
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn binary_structured_and_batch_modes_are_accepted() {
    let api = Api::new(Config::default());
    let (status, body) = api
        .call(
            Request::post("/v1/events")
                .header("ce-specversion", "1.0")
                .header("ce-id", "b-1")
                .header("ce-source", "/shop")
                .header("ce-type", "order.created")
                .header("ce-partitionkey", "customer-9")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"n":1}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["accepted"][0]["sequence"], 1);

    let (status, _) = api
        .post(
            "/v1/events",
            "application/cloudevents+json; charset=utf-8",
            structured("s-1").to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let batch = json!([structured("k-1"), structured("k-2")]);
    let (status, body) = api
        .post(
            "/v1/events",
            "application/cloudevents-batch+json",
            batch.to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["accepted"].as_array().unwrap().len(), 2);
    assert_eq!(api.stored().await, 4);

    let (status, log) = api
        .call(
            Request::get("/v1/events?type=order.*&limit=10")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log["events"][0]["event"]["partitionkey"], "customer-9");
    assert_eq!(log["events"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn the_same_source_and_id_is_stored_once() {
    let api = Api::new(Config::default());
    let body = structured("dup-1").to_string();
    let (_, first) = api
        .post("/v1/events", "application/cloudevents+json", body.clone())
        .await;
    let (status, second) = api
        .post("/v1/events", "application/cloudevents+json", body)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(second["accepted"][0]["duplicate"], true);
    assert_eq!(
        second["accepted"][0]["sequence"],
        first["accepted"][0]["sequence"]
    );
    assert_eq!(api.stored().await, 1);
}

#[tokio::test]
async fn invalid_events_are_400_naming_the_attribute_and_store_nothing() {
    let api = Api::new(Config::default());
    let cases = [
        (
            json!({"specversion": "1.0", "source": "/s", "type": "a.b"}),
            "`id`",
        ),
        (
            json!({"specversion": "1.0", "id": "x", "type": "a.b"}),
            "`source`",
        ),
        (
            json!({"specversion": "0.3", "id": "x", "source": "/s", "type": "a.b"}),
            "`specversion`",
        ),
        (
            json!({"specversion": "1.0", "id": "x", "source": "/s", "type": "a..b"}),
            "`type`",
        ),
        (
            json!({"specversion": "1.0", "id": "x", "source": "/s"}),
            "`type`",
        ),
    ];
    for (event, attribute) in cases {
        let (status, body) = api
            .post(
                "/v1/events",
                "application/cloudevents+json",
                event.to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{event}");
        assert_eq!(error_code(&body), "invalid_attribute", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(attribute),
            "{body}"
        );
    }
    let (status, body) = api
        .post(
            "/v1/events",
            "application/cloudevents+json",
            r#"{"specversion": "1.0", "id": }"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "malformed_json");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1, column"),
        "{body}"
    );
    assert_eq!(api.stored().await, 0);
}

#[tokio::test]
async fn a_batch_with_one_bad_event_stores_nothing() {
    let api = Api::new(Config::default());
    let mut bad = structured("bad");
    bad["specversion"] = json!("2.0");
    let batch = json!([structured("ok-1"), bad, structured("ok-2")]);
    let (status, body) = api
        .post(
            "/v1/events",
            "application/cloudevents-batch+json",
            batch.to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("event 1: "),
        "{body}"
    );
    assert_eq!(api.stored().await, 0);
}

#[tokio::test]
async fn unknown_content_types_are_415() {
    let api = Api::new(Config::default());
    let (status, body) = api.post("/v1/events", "text/plain", "hello").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error_code(&body), "unsupported_media_type");
    let (status, _) = api
        .post("/v1/events/order.created", "text/plain", "hello")
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(api.stored().await, 0);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let mut config = Config::default();
    config.ingest.max_body_bytes = 1024;
    let api = Api::new(config);
    let big = json!({"blob": "x".repeat(4096)}).to_string();
    let (status, body) = api
        .post("/v1/events/order.created", "application/json", big.clone())
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(&body), "payload_too_large");
    // Without a Content-Length the limit still holds while streaming.
    let stream = Body::new(Unsized(Some(bytes::Bytes::from(big))));
    let (status, _) = api
        .call(
            Request::post("/v1/events/order.created")
                .header(header::CONTENT_TYPE, "application/json")
                .body(stream)
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(api.stored().await, 0);
}

/// A body that arrives as one chunk with no declared length.
struct Unsized(Option<bytes::Bytes>);

impl http_body::Body for Unsized {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(self.0.take().map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_writer_answers_503_with_retry_after_and_stores_nothing_it_refused() {
    let mut config = Config::default();
    config.ingest.max_pending_events = 1000;
    let api = Api::new(config);
    // Keep the writer busy with one large append (admitted because nothing was waiting)...
    let big: Vec<_> = (0..100_000)
        .map(|n| switchyard_host::event::Event {
            id: format!("big-{n}"),
            source: "/load".to_owned(),
            ty: "load.big".to_owned(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: b"{}".to_vec(),
            extensions: BTreeMap::new(),
        })
        .collect();
    let bus = Arc::clone(&api.state.bus);
    let writing = tokio::spawn(async move { bus.append(big).await.unwrap().len() });
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    // ...so a producer arriving meanwhile is told to come back later.
    let response = router(Arc::clone(&api.state))
        .oneshot(
            Request::post("/v1/events/load.tick")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(error_code(&body), "unavailable");
    assert_eq!(writing.await.unwrap(), 100_000);
    assert_eq!(
        api.stored().await,
        100_000,
        "the refused event was not stored"
    );
    // Once the writer has caught up, the same request is accepted.
    let (status, _) = api
        .post("/v1/events/load.tick", "application/json", "{}")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn tokens_guard_ingest_and_admin_routes() {
    let mut config = Config::default();
    config.auth.ingest_tokens = vec!["in-secret".to_owned()];
    config.auth.admin_tokens = vec!["admin-secret".to_owned()];
    let api = Api::new(config);
    let event = structured("auth-1").to_string();
    for token in [None, Some("wrong"), Some("admin-secret")] {
        let mut request = Request::post("/v1/events")
            .header(header::CONTENT_TYPE, "application/cloudevents+json");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let (status, body) = api
            .call(request.body(Body::from(event.clone())).unwrap())
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(error_code(&body), "unauthorized");
    }
    // The scheme's name is case-insensitive (RFC 9110 §11.1).
    let (status, _) = api
        .call(
            Request::post("/v1/events")
                .header(header::CONTENT_TYPE, "application/cloudevents+json")
                .header(header::AUTHORIZATION, "bearer in-secret")
                .body(Body::from(event))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    for path in [
        "/v1/plugins",
        "/v1/dlq",
        "/v1/events",
        "/v1/schemas",
        "/v1/backup",
    ] {
        let (status, _) = api
            .call(Request::get(path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, _) = api
            .call(
                Request::get(path)
                    .header(header::AUTHORIZATION, "Bearer admin-secret")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    // A copy of the whole log is the operators' alone.
    let (status, _) = api
        .call(
            Request::get("/v1/backup")
                .header(header::AUTHORIZATION, "Bearer in-secret")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // So is deleting dead letters in bulk.
    let (status, _) = api
        .call(
            Request::delete("/v1/dlq?plugin=any")
                .header(header::AUTHORIZATION, "Bearer in-secret")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Registering a schema is an admin action, not an ingest one.
    let (status, _) = api
        .call(
            Request::put("/v1/schemas/order.created")
                .header(header::AUTHORIZATION, "Bearer in-secret")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api
        .call(Request::get("/healthz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_backup_is_the_log_as_an_sqlite_file() {
    let api = Api::new(Config::default());
    for n in 0..3 {
        let (status, _) = api
            .post(
                "/v1/events",
                "application/cloudevents+json",
                structured(&format!("copy-{n}")).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let response = router(Arc::clone(&api.state))
        .oneshot(Request::get("/v1/backup").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/vnd.sqlite3"
    );
    let length: usize = response.headers()[header::CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(bytes.len(), length);
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    std::fs::write(&copy, &bytes).unwrap();
    let summary = switchyard_host::bus::sqlite::inspect_backup(&copy).unwrap();
    assert_eq!((summary.events, summary.last_sequence), (3, 3));
    // The copy left nothing behind in the data directory.
    let left: Vec<_> = std::fs::read_dir(api.dir.path())
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("backup"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // HEAD says what a GET would get without taking a copy: a copy would know its length.
    let response = router(Arc::clone(&api.state))
        .oneshot(Request::head("/v1/backup").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/vnd.sqlite3"
    );
    assert!(
        !response.headers().contains_key(header::CONTENT_LENGTH),
        "{:?}",
        response.headers()
    );
}

#[tokio::test]
async fn metrics_count_ingest_and_unknown_routes_are_json_404() {
    let api = Api::new(Config::default());
    api.post("/v1/events/order.created", "application/json", "{}")
        .await;
    api.post("/v1/events", "text/plain", "x").await;
    let response = router(Arc::clone(&api.state))
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("switchyard_events_ingested_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("switchyard_ingest_rejected_total{code=\"unsupported_media_type\"} 1\n"),
        "{text}"
    );
    let (status, body) = api
        .call(Request::get("/nope").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "not_found");
}

#[tokio::test]
async fn paging_a_sparse_filter_walks_the_whole_log() {
    let api = Api::new(Config::default());
    let filler: Vec<_> = (0..12_000)
        .map(|n| switchyard_host::event::Event {
            id: format!("fill-{n}"),
            source: "/load".to_owned(),
            ty: "load.filler".to_owned(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            data: Vec::new(),
            extensions: BTreeMap::new(),
        })
        .collect();
    api.state.bus.append(filler).await.unwrap();
    api.post("/v1/events/rare.event", "application/json", "{}")
        .await;

    let (mut after, mut found, mut pages) = (0u64, Vec::new(), 0);
    loop {
        let (status, page) = api
            .call(
                Request::get(format!("/v1/events?type=rare.*&after={after}&limit=10"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        found.extend(page["events"].as_array().unwrap().iter().cloned());
        pages += 1;
        assert!(pages < 10, "paging must reach the end");
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["event"]["type"], "rare.event");
    assert_eq!(found[0]["sequence"], 12_001);
}

#[tokio::test]
async fn every_error_is_json_and_the_binding_and_http_conventions_hold() {
    let api = Api::new(Config::default());
    // A route with another method: 405, `Allow`, and the JSON error shape.
    let response = router(Arc::clone(&api.state))
        .oneshot(Request::put("/v1/events").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let allow = response.headers()[header::ALLOW]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error_code(&body), "method_not_allowed", "{body}");
    // A path part that cannot name anything: 404 in the same shape, not plain text.
    for path in ["/v1/dlq/abc", "/v1/dlq/-1"] {
        let (status, body) = api
            .call(Request::get(path).body(Body::empty()).unwrap())
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(error_code(&body), "not_found", "{path}: {body}");
    }
    // "The batch MAY be empty" (HTTP binding, 3.3.2): accepted, nothing stored.
    let (status, body) = api
        .post("/v1/events", "application/cloudevents-batch+json", "[]")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["accepted"], json!([]));
    assert_eq!(api.stored().await, 0);
    // Quoted header values are unquoted before they are percent-decoded (3.1.3.2).
    let (status, body) = api
        .call(
            Request::post("/v1/events")
                .header("ce-specversion", "\"1.0\"")
                .header("ce-id", "quoted-1")
                .header("ce-source", "/shop")
                .header("ce-type", "order.created")
                .header("ce-subject", "\"order%2042\"")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (_, log) = api
        .call(Request::get("/v1/events").body(Body::empty()).unwrap())
        .await;
    assert_eq!(log["events"][0]["event"]["subject"], "order 42", "{log}");
    // An event's own trace context must be one (the CloudEvents tracing extension).
    let (status, body) = api
        .call(
            Request::post("/v1/events/order.created")
                .header(
                    "ce-traceparent",
                    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("W3C trace context"),
        "{body}"
    );
    // A wait cannot be kept for an event that runs later.
    let (status, body) = api
        .post(
            "/v1/events/order.created?wait=5s&delay=15m",
            "application/json",
            "{}",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "invalid_query", "{body}");
    assert_eq!(api.stored().await, 1);
    // A web page of another site cannot change anything on a host without tokens, and
    // a host open on loopback answers only names of its own (DNS rebinding).
    let from_a_page = |site: &str, origin: &str| {
        Request::post("/v1/events/order.created")
            .header(header::HOST, "127.0.0.1:8080")
            .header("sec-fetch-site", site)
            .header(header::ORIGIN, origin)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap()
    };
    for (site, origin) in [
        ("cross-site", "https://evil.example"),
        ("same-site", "http://127.0.0.1:3000"),
    ] {
        let (status, body) = api.call(from_a_page(site, origin)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(error_code(&body), "forbidden", "{body}");
    }
    assert_eq!(api.stored().await, 1);
    let (status, body) = api
        .call(from_a_page("same-origin", "http://127.0.0.1:8080"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = api
        .call(
            Request::get("/v1/dlq")
                .header(header::HOST, "rebound.example:8080")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`rebound.example`"),
        "{body}"
    );
}

#[tokio::test]
async fn a_bad_wait_is_400_and_stores_nothing_and_a_wait_with_no_plugin_answers_at_once() {
    let api = Api::new(Config::default());
    let typed = "/v1/events/order.created";
    for (query, expected) in [
        ("?wait=soon", "`wait`: "),
        ("?wait=2m", "this host waits at most 30s"),
        ("?whatever=1", "unknown field `whatever`"),
    ] {
        let (status, body) = api
            .post(&format!("{typed}{query}"), "application/json", "{}")
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{query}: {message}");
    }
    assert_eq!(api.stored().await, 0);
    // No plugin is subscribed: every outcome is known at once.
    let (status, body) = api
        .post(&format!("{typed}?wait=10s"), "application/json", "{}")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["accepted"][0]["complete"], true);
    assert_eq!(body["accepted"][0]["plugins"], json!([]));
    assert_eq!(api.stored().await, 1);
}

#[tokio::test]
async fn schemas_that_cannot_be_used_are_400_with_the_reason_and_unknown_ones_404() {
    let api = Api::new(Config::default());
    let put = |body: &'static str| {
        Request::put("/v1/schemas/order.created")
            .header(header::CONTENT_TYPE, "application/schema+json")
            .body(Body::from(body))
            .unwrap()
    };
    for (body, expected) in [
        ("{", "the schema is not JSON"),
        (r#"{"type": "no-such-type"}"#, "not a valid JSON Schema"),
        (
            r#"{"$ref": "https://example.com/s.json"}"#,
            "nothing is fetched",
        ),
        (r#"{"$ref": "file:///etc/passwd"}"#, "nothing is fetched"),
    ] {
        let (status, answer) = api.call(put(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(error_code(&answer), "invalid_schema");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{body}: {message}");
    }
    let (status, _) = api.call(put(r#"{"type": "object"}"#)).await;
    assert_eq!(status, StatusCode::CREATED);
    // The same document again (a retried PUT) is that version, not a new one.
    let (status, answer) = api.call(put(r#"{ "type" : "object" }"#)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["version"], 1, "{answer}");
    let (status, answer) = api
        .call(
            Request::put("/v1/schemas/order.created")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(r#"{"type": "string"}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("application/schema+json"),
        "{answer}"
    );
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    for path in [
        "/v1/schemas/order.updated",
        "/v1/schemas/order.created/2",
        "/v1/schemas/order.created/0",
        "/v1/schemas/order.created/latest",
    ] {
        let (status, answer) = api.call(get(path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {answer}");
        assert_eq!(error_code(&answer), "not_found", "{path}: {answer}");
    }
    let (status, answer) = api.call(get("/v1/schemas/order..created")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (status, answer) = api.call(get("/v1/schemas/order.created")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["latest"], 1);
    assert_eq!(answer["versions"][0]["version"], 1);
}

#[tokio::test]
async fn the_status_page_and_its_data_routes_answer_without_a_browser() {
    let api = Api::new(Config::default());
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let response = router(Arc::clone(&api.state))
        .oneshot(get("/ui"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let csp = response.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    for asset in ["app.js", "app.css", "uPlot.iife.min.js", "uPlot.min.css"] {
        let response = router(Arc::clone(&api.state))
            .oneshot(get(&format!("/ui/{asset}")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
    }
    let (status, _) = api.call(get("/ui/secrets.txt")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, stats) = api.call(get("/v1/stats?window=5m&top=3")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["interval_ms"], 1000);
    assert!(stats["t"].is_array() && stats["lag"].is_object(), "{stats}");
    let (status, body) = api.call(get("/v1/stats?window=soon")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = api.call(get("/v1/dlq?reason=bored")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = api.call(get("/v1/dlq?reason=schema")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, page) = api.call(get("/v1/plugins?limit=10")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (page["total"].as_u64(), page["next_after"].is_null()),
        (Some(0), true)
    );
}

/// A request counts as in flight until its answer is sent: an answer a client does not
/// read keeps its place, so such clients cannot pile up answers in memory.
#[tokio::test]
async fn an_answer_not_yet_read_keeps_its_place_in_flight() {
    let mut config = Config::default();
    config.http.max_concurrent_requests = 1;
    let api = Api::new(config);
    // One router, as a server has: its requests share the places in flight.
    let app = router(Arc::clone(&api.state));
    let get = || Request::get("/v1/plugins").body(Body::empty()).unwrap();
    let unread = app.clone().oneshot(get()).await.unwrap();
    assert_eq!(unread.status(), StatusCode::OK);
    let refused = app.clone().oneshot(get()).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = axum::body::to_bytes(refused.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_concurrent_requests"),
        "{body}"
    );
    // Read to its end, the answer gives its place back.
    axum::body::to_bytes(unread.into_body(), usize::MAX)
        .await
        .unwrap();
    let again = app.oneshot(get()).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
}
