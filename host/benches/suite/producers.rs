//! What producers pay for the producer features: the latency `?wait=` adds to a plain
//! `202` on the example flow, and ingest throughput with a schema to check against the
//! same ingest without one. Both compared in the same run on the same host.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::Figure;
use crate::Options;
use crate::client::{self, Request, Single};
use crate::figures::quantile;
use crate::guests::Guest;
use crate::host::Process;

/// `payment.completed` events of the example flow, each its own order.
struct Payment {
    prefix: String,
    wait: bool,
}

impl Request for Payment {
    fn build(&self, n: usize) -> (String, String, &'static str, Vec<u8>) {
        let query = if self.wait { "?wait=10s" } else { "" };
        (
            format!("/v1/events/payment.completed{query}"),
            format!("ce-id: {}-{n}\r\n", self.prefix),
            "application/json",
            format!(
                r#"{{"order_id":"{}-{n}","amount_cents":4500,"email":"fan@example.com","quantity":1}}"#,
                self.prefix
            )
            .into_bytes(),
        )
    }

    fn events(&self) -> usize {
        1
    }

    fn checks_answer(&self) -> bool {
        self.wait
    }

    /// A `200` says only that every subscribed plugin is done with the event; it counts
    /// only if each of them handled it (`ok`), not dead-lettered or rejected it.
    fn check_answer(&self, answer: &[u8]) -> anyhow::Result<()> {
        let answer: serde_json::Value =
            serde_json::from_slice(answer).context("the answer to a waiting POST")?;
        let plugins = answer["accepted"][0]["plugins"]
            .as_array()
            .with_context(|| format!("an answer without plugins: {answer}"))?;
        anyhow::ensure!(
            !plugins.is_empty() && plugins.iter().all(|p| p["outcome"] == "ok"),
            "the payment was not handled by every plugin: {answer}"
        );
        Ok(())
    }
}

pub async fn figures(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let mut figures = wait_latency(options).await.context("wait")?;
    figures.extend(schema_ingest(options).await.context("schema")?);
    Ok(figures)
}

/// p50/p99 of `?wait=` answers against plain `202`s at 1,000 requests/s, alternating
/// rounds so that a busy moment of the machine does not land on one of them only. Every
/// `200` must carry an `ok` from each subscribed plugin (see [`Payment::check_answer`]).
async fn wait_latency(options: &Options) -> anyhow::Result<Vec<Figure>> {
    const RATE: f64 = 1_000.0;
    let round = options.pick(Duration::from_secs(5), Duration::from_secs(2));
    // As the example deployment runs them (`scripts/demo.sh`): the audit trail one call
    // at a time, as its every event rewrites one hot counter.
    let audit_sidecar = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../plugins/audit-trail/sidecar.toml"
    ))?;
    let plugins = [
        ("ticketing".to_owned(), Guest::Ticketing, None),
        ("notifier".to_owned(), Guest::Notifier, None),
        (
            "audit-trail".to_owned(),
            Guest::AuditTrail,
            Some(audit_sidecar),
        ),
    ];
    let host = Process::host(&plugins, None)?;
    let payments =
        |prefix: String, wait: bool| -> Arc<dyn Request> { Arc::new(Payment { prefix, wait }) };
    client::paced_requests(
        host.address,
        32,
        RATE,
        round / 4,
        payments("warm".into(), true),
        200,
    )
    .await?;
    let (mut plain, mut waited) = (Vec::new(), Vec::new());
    for r in 0..options.pick(3, 1) {
        plain.extend(
            client::paced_requests(
                host.address,
                32,
                RATE,
                round,
                payments(format!("p{r}"), false),
                202,
            )
            .await?,
        );
        waited.extend(
            client::paced_requests(
                host.address,
                32,
                RATE,
                round,
                payments(format!("w{r}"), true),
                200,
            )
            .await?,
        );
    }
    plain.sort();
    waited.sort();
    let mut figures = Vec::new();
    for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
        figures.push(Figure {
            name: format!("wait.example_flow.{label}"),
            value: quantile(&waited, q),
            unit: "ms",
            baseline: Some(quantile(&plain, q)),
            baseline_name: "the same POST without wait (202)",
            target: "",
        });
    }
    Ok(figures)
}

/// Single-event ingest with a schema registered for the type, against the same host
/// before the schema was registered.
async fn schema_ingest(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let deadline = options.deadline();
    let requests = options.pick(60_000, 10_000);
    let host = Process::host(&[], None)?;
    let single = |prefix: &str| -> Arc<dyn Request> {
        Arc::new(Single {
            prefix: prefix.to_owned(),
        })
    };
    client::saturate(host.address, 8, 2_000, deadline, single("warm")).await?;
    let without = client::saturate(host.address, 64, requests, deadline, single("plain"))
        .await?
        .per_second;
    let schema = serde_json::json!({
        "type": "object",
        "required": ["n"],
        "properties": {"n": {"type": "integer", "minimum": 0}},
        "additionalProperties": false
    });
    let response = host
        .http
        .put(host.url("/v1/schemas/bench.tick"))
        .json(&schema)
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 201,
        "registering: {}",
        response.status()
    );
    let with = client::saturate(host.address, 64, requests, deadline, single("checked"))
        .await?
        .per_second;
    Ok(vec![Figure {
        name: "ingest.single_with_schema".into(),
        value: with,
        unit: "events/s",
        baseline: Some(without),
        baseline_name: "the same host, no schema",
        target: "",
    }])
}
