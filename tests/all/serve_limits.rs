//! The `[http]` limits on the real binary: a client trickling its headers is cut off
//! while others are served, a request slower than `request_timeout` gets `408`, and
//! requests past `max_concurrent_requests` get `503` with `Retry-After` while probes
//! still answer. The HTTP layer is the same whatever the bus, so these run on the
//! embedded log only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::host::{Backend, Host};

fn host_with(config: &str) -> Host {
    let mut host = Host::on(&Backend::Embedded);
    host.config(config);
    host.start();
    host
}

/// A raw connection to the host, for clients that misbehave on purpose.
fn connect(host: &Host) -> TcpStream {
    let address = host.url("").trim_start_matches("http://").to_owned();
    let stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    stream
}

/// Reads what the host sent until it closes the connection or `limit` passes.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (bool, String) {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return (true, String::from_utf8_lossy(&received).into_owned()),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (true, String::from_utf8_lossy(&received).into_owned());
            }
            Err(_) => {} // read timeout: nothing yet
        }
    }
    (false, String::from_utf8_lossy(&received).into_owned())
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off_while_others_are_served() {
    let host = host_with("[http]\nheader_timeout = \"1s\"\n");
    let mut slow = connect(&host);
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n")
        .unwrap();
    let started = Instant::now();
    let mut cut_off = false;
    // One header line every 200 ms, for at most 20 s: far longer than the timeout.
    for n in 0..100 {
        if slow
            .write_all(format!("x-slow-{n}: 1\r\n").as_bytes())
            .is_err()
        {
            cut_off = true;
            break;
        }
        let (closed, answer) = read_until_closed(&mut slow, Duration::from_millis(200));
        assert!(
            !answer.contains("200 OK"),
            "a request never finished: {answer}"
        );
        if closed {
            cut_off = true;
            break;
        }
        if n == 2 {
            // Meanwhile another client is served as usual.
            let health = reqwest::get(host.url("/healthz")).await.unwrap();
            assert_eq!(health.status(), 200);
        }
    }
    assert!(cut_off, "the trickling client was never cut off");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "cut off only after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_request_slower_than_the_request_timeout_gets_408() {
    let host = host_with("[http]\nrequest_timeout = \"1s\"\n");
    let mut slow = connect(&host);
    // The body is announced as 100 bytes; 10 arrive, the rest never does.
    slow.write_all(
        b"POST /v1/events/order.placed HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"n\": 1, ",
    )
    .unwrap();
    let (_, answer) = read_until_closed(&mut slow, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(answer.contains("http.request_timeout"), "{answer}");
    // Nothing half-sent was stored, and the host goes on taking events.
    assert_eq!(
        host.send("order.placed", "after", json!({"n": 2})).await,
        202
    );
    let log = host.log().await;
    assert_eq!(log.len(), 1, "{log:?}");
}

#[tokio::test]
async fn requests_past_the_concurrency_limit_get_503_and_probes_still_answer() {
    let host = host_with("[http]\nmax_concurrent_requests = 1\nrequest_timeout = \"30s\"\n");
    // One ingest request holds the only place: its body never completes.
    let hold = || {
        let mut holder = connect(&host);
        holder
            .write_all(
                b"POST /v1/events/order.placed HTTP/1.1\r\nhost: localhost\r\n\
                  content-type: application/json\r\ncontent-length: 100\r\n\r\n{",
            )
            .unwrap();
        holder
    };
    let holder = std::sync::Mutex::new(hold());
    let client = reqwest::Client::new();
    let refused = host
        .wait_for(
            "the held request to take the place",
            Duration::from_secs(10),
            || async {
                let response = client
                    .post(host.url("/v1/events/order.placed"))
                    .json(&json!({"n": 1}))
                    .send()
                    .await
                    .unwrap();
                if response.status() == 503 {
                    return Some(response);
                }
                // A request admitted at the same moment as the holder's can take the
                // place first: the holder is then refused and holds nothing, so it asks
                // again.
                let mut held = holder.lock().unwrap();
                let mut answer = [0u8; 64];
                if matches!(held.read(&mut answer), Ok(n) if n > 0) {
                    *held = hold();
                }
                None
            },
        )
        .await;
    assert_eq!(
        refused.headers()["retry-after"].to_str().unwrap(),
        "1",
        "{:?}",
        refused.headers()
    );
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("http.max_concurrent_requests"),
        "{body}"
    );
    assert_eq!(
        client
            .get(host.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(host.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Once the holder goes away, its place is free again.
    drop(holder);
    let accepted = host
        .wait_for("the place to be free", Duration::from_secs(10), || async {
            let status = host.send("order.placed", "later", json!({"n": 2})).await;
            (status == 202).then_some(status)
        })
        .await;
    assert_eq!(accepted, 202);
}

/// A client that sends requests and reads none of the answers cannot hold them, and its
/// connection, for ever: a write that waits `request_timeout` for it closes the
/// connection, and the host serves others meanwhile.
#[tokio::test]
async fn a_client_that_reads_nothing_is_cut_off_after_the_request_timeout() {
    let host = host_with("[http]\nrequest_timeout = \"1s\"\nheader_timeout = \"60s\"\n");
    let mut greedy = connect(&host);
    // Far more answers (the page's script, about 30 KB each) than socket buffers hold.
    const ASKED: usize = 1000;
    let requests = "GET /ui/app.js HTTP/1.1\r\nhost: localhost\r\n\r\n".repeat(ASKED);
    greedy.write_all(requests.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(host.get_json("/healthz").await["status"], "ok");
    let (closed, received) = read_until_closed(&mut greedy, Duration::from_secs(30));
    let answers = received.matches("HTTP/1.1 200 OK").count();
    assert!(closed, "the connection stayed open");
    assert!(
        answers < ASKED,
        "every answer was held for a client that did not read ({answers})"
    );
}
