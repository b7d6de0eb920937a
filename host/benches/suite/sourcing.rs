//! Event sourcing and scheduled events, on the embedded log and on NATS:
//! - `sourcing.stream_read`: events per second a handler (the box office deciding a
//!   reservation) reads and folds from a 10,000-event subject stream, beside a client
//!   reading the same stream through `GET /v1/streams`;
//! - `scheduled.fire_lag`: 10,000 timers due in the same second, from the due time to
//!   the append of each (p50, p99), read from the log's ingest times.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::figures::{median, quantile_ms};
use crate::guests::Guest;
use crate::host::Process;
use crate::nats_server::NatsServer;
use crate::{Figure, Options};

/// Events in the stream a handler reads.
const STREAM_EVENTS: usize = 10_000;
/// Timers due in the same second.
const TIMERS: usize = 10_000;
/// Events per producer request.
const BATCH: usize = 500;

/// POSTs `events` as one batch, refused unless `202`.
pub async fn post_batch(host: &Process, events: &[Value]) -> anyhow::Result<()> {
    let response = host
        .http
        .post(host.url("/v1/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .body(Value::Array(events.to_vec()).to_string())
        .send()
        .await?;
    if response.status() != 202 {
        bail!("a batch was refused: {}", response.text().await?);
    }
    Ok(())
}

/// Handler and API read rates (events/s) of one host.
async fn stream_read(options: &Options, bus: Option<&str>) -> anyhow::Result<(f64, f64)> {
    let sidecar = "[limits]\nfuel = 100_000_000_000\ntimeout = \"120s\"\nmemory = \"512MiB\"\n";
    let config = format!("{}[ingest]\nmax_wait = \"120s\"\n", bus.unwrap_or(""));
    let host = Process::host(
        &[("box-office".into(), Guest::BoxOffice, Some(sidecar.into()))],
        Some(&config),
    )?;
    let subject = "show/bench";
    let mut events = vec![
        json!({"specversion": "1.0", "id": "opened", "source": "/bench",
        "type": "show.opened", "subject": subject, "data": {"seats": 1_000_000}}),
    ];
    events.extend((1..STREAM_EVENTS).map(|i| {
        json!({"specversion": "1.0", "id": format!("note-{i}"), "source": "/bench",
            "type": "show.noted", "subject": subject, "data": {"note": i}})
    }));
    for chunk in events.chunks(BATCH) {
        post_batch(&host, chunk).await?;
    }
    let runs = options.pick(5, 2);
    let mut handler = Vec::new();
    for run in 0..runs {
        let started = Instant::now();
        let response = host
            .http
            .post(host.url("/v1/events/reservation.requested?wait=120s"))
            .header("ce-id", format!("bench-{run}"))
            .json(&json!({"reservation_id": format!("r{run}"), "show_id": "bench", "seats": 1, "email": "b@example.com"}))
            .send()
            .await?;
        let elapsed = started.elapsed();
        let answer: Value = response.json().await?;
        if answer["accepted"][0]["plugins"][0]["outcome"] != "ok" {
            bail!("the reservation was not handled: {answer}");
        }
        handler.push(STREAM_EVENTS as f64 / elapsed.as_secs_f64());
    }
    let mut api = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let mut after = 0u64;
        let mut read = 0usize;
        loop {
            let page = host
                .get_json(&format!("/v1/streams/{subject}?after={after}&limit=1000"))
                .await?;
            let got = page["events"].as_array().map_or(0, Vec::len);
            read += got;
            match page["next_after"].as_u64() {
                Some(next) if got > 0 => after = next,
                _ => break,
            }
        }
        if read < STREAM_EVENTS {
            bail!("the API read {read} events of the stream");
        }
        api.push(read as f64 / started.elapsed().as_secs_f64());
    }
    Ok((median(handler), median(api)))
}

/// Fire lags of [`TIMERS`] timers due in the same second: (p50, p99, max) in ms.
async fn fire_lag(config: Option<&str>) -> anyhow::Result<(f64, f64, f64)> {
    let host = Process::host(&[], config)?;
    let lead = Duration::from_secs(10);
    let due = jiff::Timestamp::now() + jiff::SignedDuration::try_from(lead)?;
    let due_text = format!("{due:.3}");
    let started = Instant::now();
    let timers: Vec<Value> = (0..TIMERS)
        .map(|i| {
            json!({"specversion": "1.0", "id": format!("timer-{i}"), "source": "/bench",
                "type": "timer.due", "deliverat": due_text, "data": {}})
        })
        .collect();
    for chunk in timers.chunks(BATCH) {
        post_batch(&host, chunk).await?;
    }
    if started.elapsed() >= lead {
        bail!("scheduling took {:?}, past the due time", started.elapsed());
    }
    let mut lags = Vec::with_capacity(TIMERS);
    let mut after = 0u64;
    let deadline = Instant::now() + lead + Duration::from_secs(120);
    while lags.len() < TIMERS {
        if Instant::now() > deadline {
            bail!("{} of {TIMERS} timers fired", lags.len());
        }
        let page = host
            .get_json(&format!(
                "/v1/events?type=timer.due&after={after}&limit=1000"
            ))
            .await?;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        for event in &events {
            let ingested: jiff::Timestamp = event["ingested_at"]
                .as_str()
                .context("ingested_at")?
                .parse()?;
            lags.push((ingested.as_millisecond() - due.as_millisecond()) as f64);
        }
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        if events.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    lags.sort_by(f64::total_cmp);
    // Nearest rank, as the suite's other quantiles of measured samples.
    let at = |q: f64| quantile_ms(&lags, q);
    Ok((at(0.5), at(0.99), at(1.0)))
}

pub async fn figures(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let server = NatsServer::start();
    let nats = |prefix: &str| {
        format!(
            "[bus]\nkind = \"nats\"\nurl = \"{}\"\nprefix = \"{prefix}\"\n",
            server.url()
        )
    };
    let mut figures = Vec::new();
    for (backend, config) in [("", None), (".nats", Some(nats("read")))] {
        let (handler, api) = stream_read(options, config.as_deref())
            .await
            .with_context(|| format!("stream read{backend}"))?;
        figures.push(Figure {
            name: format!("sourcing.stream_read{backend}"),
            value: handler,
            unit: "events/s",
            baseline: Some(api),
            baseline_name: "a client reading the stream over GET /v1/streams",
            target: "",
        });
    }
    for (backend, config) in [("", None), (".nats", Some(nats("timers")))] {
        let (p50, p99, max) = fire_lag(config.as_deref())
            .await
            .with_context(|| format!("fire lag{backend}"))?;
        for (quantile, value) in [("p50", p50), ("p99", p99), ("max", max)] {
            figures.push(Figure {
                name: format!("scheduled.fire_lag.{quantile}{backend}"),
                value,
                unit: "ms",
                baseline: None,
                baseline_name: "",
                target: "fire within 1 s of the due time",
            });
        }
    }
    Ok(figures)
}
