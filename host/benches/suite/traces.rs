//! What trace export costs: the same ingest and delivery figures with `[telemetry]` off
//! (no span made) and with spans exported over OTLP/HTTP to a sink that answers at once
//! (the bare HTTP server's `202` route), every trace and one in a hundred, in one run.

use std::sync::Arc;
use std::time::Duration;

use crate::client::{self, Single};
use crate::figures::{quantile, subtract_histograms};
use crate::guests::Guest;
use crate::host::{self, Process};
use crate::{Figure, Options};

/// Ingest throughput and delivery start latency of one host.
struct Measured {
    ingest: f64,
    start_p50: f64,
    start_p99: f64,
    ack_p99: f64,
}

async fn measure(options: &Options, config: Option<&str>) -> anyhow::Result<Measured> {
    const RATE: f64 = 5_000.0;
    let host = Process::host(&[("probe".into(), Guest::Noop, None)], config)?;
    let deadline = options.deadline();
    let single = |prefix: &str| -> Arc<dyn client::Request> {
        Arc::new(Single {
            prefix: prefix.to_owned(),
        })
    };
    client::saturate(host.address, 8, 2_000, deadline, single("warm")).await?;
    let ingest = client::saturate(
        host.address,
        64,
        options.pick(60_000, 15_000),
        deadline,
        single("s"),
    )
    .await?
    .per_second;
    host.wait_caught_up("probe", Duration::from_secs(120))
        .await?;
    let before = host.metrics().await?;
    let duration = options.pick(Duration::from_secs(10), Duration::from_secs(3));
    let mut acks = client::paced(host.address, 64, RATE, duration, "e2e").await?;
    host.wait_caught_up("probe", Duration::from_secs(120))
        .await?;
    let after = host.metrics().await?;
    acks.sort();
    let series = "switchyard_delivery_start_latency_seconds";
    let started = subtract_histograms(&after, &before, series);
    Ok(Measured {
        ingest,
        start_p50: host::histogram_quantile(&started, series, 0.5)? * 1000.0,
        start_p99: host::histogram_quantile(&started, series, 0.99)? * 1000.0,
        ack_p99: quantile(&acks, 0.99),
    })
}

pub async fn figures(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let off = measure(options, None).await?;
    let sink = Process::bare_http()?;
    let config = format!(
        "[telemetry]\notlp_endpoint = \"{}\"\n",
        sink.url("/v1/events")
    );
    let on = measure(options, Some(&config)).await?;
    let sampled = measure(options, Some(&format!("{config}sample_ratio = 0.01\n"))).await?;
    let figure = |name: &str, on: f64, off: f64, unit: &'static str| Figure {
        name: format!("traces.{name}"),
        value: on,
        unit,
        baseline: Some(off),
        baseline_name: "the same host, traces off",
        target: "",
    };
    Ok(vec![
        figure("ingest.single", on.ingest, off.ingest, "events/s"),
        figure("e2e.start.p50", on.start_p50, off.start_p50, "ms"),
        figure("e2e.start.p99", on.start_p99, off.start_p99, "ms"),
        figure("e2e.ack.p99", on.ack_p99, off.ack_p99, "ms"),
        figure(
            "sampled_1pct.ingest.single",
            sampled.ingest,
            off.ingest,
            "events/s",
        ),
        figure(
            "sampled_1pct.e2e.start.p99",
            sampled.start_p99,
            off.start_p99,
            "ms",
        ),
    ])
}
