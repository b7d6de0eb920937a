//! Quick throughput measurements (the full benchmark suite is separate work).
//!
//! `cargo run --release -p switchyard-host --example measure -- runtime PLUGIN.wasm`
//!   invokes a plugin in `per-event` and `reuse` mode and prints calls per second.
//! `cargo run --release -p switchyard-host --example measure -- ingest URL`
//!   POSTs events to a running host over loopback, single events from 32 connections and
//!   batches of 100, and prints events per second.
//!
//! Every loop is bounded by a count.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use switchyard_host::event::Event;
use switchyard_host::runtime::{
    Delivery, EmptyKv, Isolation, PluginSettings, Runtime, RuntimeConfig,
};

const CALLS: u32 = 5_000;
const SINGLE_EVENTS: usize = 20_000;
const CONNECTIONS: usize = 32;
const BATCHES: usize = 400;
const BATCH_SIZE: usize = 100;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [what, file] if what == "runtime" => runtime(file).await,
        [what, url] if what == "ingest" => ingest(url).await,
        _ => anyhow::bail!("usage: measure runtime PLUGIN.wasm | measure ingest URL"),
    }
}

async fn runtime(file: &str) -> anyhow::Result<()> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let event = Event {
        id: "e".into(),
        source: "/measure".into(),
        ty: "measure.tick".into(),
        subject: None,
        time: None,
        datacontenttype: None,
        dataschema: None,
        data: b"{}".to_vec(),
        extensions: Default::default(),
    };
    for (label, isolation) in [
        ("per-event", Isolation::PerEvent),
        (
            "reuse",
            Isolation::Reuse {
                max_calls: u64::MAX,
            },
        ),
    ] {
        let settings = PluginSettings {
            isolation,
            ..PluginSettings::default()
        };
        let plugin = runtime
            .load_file(std::path::Path::new(file), settings)
            .await
            .context("loading the plugin")?;
        let kv = Arc::new(EmptyKv);
        let started = Instant::now();
        for n in 0..CALLS {
            let delivery = Delivery {
                attempt: 1,
                max_attempts: 1,
                sequence: u64::from(n),
            };
            let outcome = plugin.invoke(&event, delivery, kv.clone()).await;
            if let Err(failure) = outcome.result {
                anyhow::bail!("call {n} failed: {failure}");
            }
        }
        let elapsed = started.elapsed();
        println!(
            "{label:>9}: {CALLS} calls in {:.3}s = {:.0} calls/s ({:.1} µs/call)",
            elapsed.as_secs_f64(),
            f64::from(CALLS) / elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 / f64::from(CALLS)
        );
    }
    Ok(())
}

async fn ingest(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let single = format!("{}/v1/events/measure.tick", url.trim_end_matches('/'));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for connection in 0..CONNECTIONS {
        let client = client.clone();
        let single = single.clone();
        tasks.push(tokio::spawn(async move {
            for n in (connection..SINGLE_EVENTS).step_by(CONNECTIONS) {
                let response = client
                    .post(&single)
                    .header("content-type", "application/json")
                    .body(format!("{{\"n\":{n}}}"))
                    .send()
                    .await?;
                anyhow::ensure!(response.status() == 202, "status {}", response.status());
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    println!(
        "single POSTs: {SINGLE_EVENTS} events, {CONNECTIONS} connections, {:.3}s = {:.0} events/s",
        elapsed.as_secs_f64(),
        SINGLE_EVENTS as f64 / elapsed.as_secs_f64()
    );

    let batch_url = format!("{}/v1/events", url.trim_end_matches('/'));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for connection in 0..8 {
        let client = client.clone();
        let batch_url = batch_url.clone();
        tasks.push(tokio::spawn(async move {
            for b in (connection..BATCHES).step_by(8) {
                let events: Vec<serde_json::Value> = (0..BATCH_SIZE)
                    .map(|i| {
                        serde_json::json!({
                            "specversion": "1.0", "id": format!("b{b}-{i}"), "source": "/measure",
                            "type": "measure.batch", "data": {"i": i}
                        })
                    })
                    .collect();
                let response = client
                    .post(&batch_url)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(serde_json::to_vec(&events)?)
                    .send()
                    .await?;
                anyhow::ensure!(response.status() == 202, "status {}", response.status());
            }
            Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let total = BATCHES * BATCH_SIZE;
    println!(
        "batches: {total} events in {BATCHES} batches of {BATCH_SIZE}, 8 connections, {:.3}s = {:.0} events/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
