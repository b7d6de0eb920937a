//! Dead letters in bulk: how fast an operator replays, then deletes, one kind of a
//! plugin's dead letters (`POST /v1/dlq/replay?plugin=&reason=`, `DELETE /v1/dlq?…`),
//! beside a client listing the same dead letters over `GET /v1/dlq` in pages of 1,000 on
//! the same host; on the embedded log, then on NATS.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::guests::Guest;
use crate::host::Process;
use crate::nats_server::NatsServer;
use crate::sourcing::post_batch;
use crate::{Figure, Options};

/// Events per producer request.
const BATCH: usize = 500;

/// The plugin's dead letters now.
async fn held(host: &Process) -> anyhow::Result<u64> {
    host.get_json("/v1/plugins/picky").await?["dead_letters"]
        .as_u64()
        .context("the plugin's dead letters")
}

async fn wait_held(host: &Process, count: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while held(host).await? != count {
        if Instant::now() > deadline {
            bail!(
                "the plugin holds {} dead letters, not {count}",
                held(host).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Dead letters per second: (replayed, deleted, listed) for `rejected` ones of a plugin
/// that also holds a quarter as many `exhausted` ones, interleaved.
async fn bulk(rejected: usize, config: Option<&str>) -> anyhow::Result<(f64, f64, f64)> {
    let sidecar = "subscribe = [\"hostile.reject\", \"hostile.needs-fix\"]\nconcurrency = 16\n\
                   [retry]\nmax_attempts = 1\n";
    let host = Process::host(
        &[("picky".into(), Guest::Hostile, Some(sidecar.into()))],
        config,
    )?;
    let event = |ty: &str, id: String| json!({"specversion": "1.0", "id": id, "source": "/bench", "type": ty, "data": {}});
    let events: Vec<Value> = (0..rejected)
        .flat_map(|n| {
            let mut some = vec![event("hostile.reject", format!("junk-{n}"))];
            if n % 4 == 3 {
                some.push(event("hostile.needs-fix", format!("job-{n}")));
            }
            some
        })
        .collect();
    let total = events.len() as u64;
    for chunk in events.chunks(BATCH) {
        post_batch(&host, chunk).await?;
    }
    wait_held(&host, total).await?;

    let started = Instant::now();
    let mut listed = 0;
    let mut after = 0;
    loop {
        let page = host
            .get_json(&format!(
                "/v1/dlq?plugin=picky&reason=rejected&limit=1000&after={after}"
            ))
            .await?;
        let letters = page["dead_letters"].as_array().cloned().unwrap_or_default();
        let Some(last) = letters.last() else { break };
        after = last["id"].as_u64().context("a dead letter's id")?;
        listed += letters.len();
    }
    let listing = listed as f64 / started.elapsed().as_secs_f64();
    if listed != rejected {
        bail!("listed {listed} rejected dead letters of {rejected}");
    }

    let call = async |method: reqwest::Method, path: &str, field: &str| {
        let started = Instant::now();
        let answer: Value = host
            .http
            .request(method, host.url(path))
            .send()
            .await?
            .json()
            .await?;
        let rate = answer[field].as_u64().unwrap_or(0) as f64 / started.elapsed().as_secs_f64();
        if answer[field] != rejected {
            bail!("{path} answered {answer}, not {rejected}");
        }
        anyhow::Ok(rate)
    };
    let replaying = call(
        reqwest::Method::POST,
        "/v1/dlq/replay?plugin=picky&reason=rejected",
        "replayed",
    )
    .await?;
    // Each replay is rejected again.
    wait_held(&host, total).await?;
    let deleting = call(
        reqwest::Method::DELETE,
        "/v1/dlq?plugin=picky&reason=rejected",
        "deleted",
    )
    .await?;
    Ok((replaying, deleting, listing))
}

pub async fn figures(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let rejected = options.pick(20_000, 2_000);
    let server = NatsServer::start();
    let nats = format!(
        "[bus]\nkind = \"nats\"\nurl = \"{}\"\nprefix = \"dlq\"\n",
        server.url()
    );
    let mut figures = Vec::new();
    for (backend, config) in [("", None), (".nats", Some(nats.as_str()))] {
        let (replaying, deleting, listing) = bulk(rejected, config)
            .await
            .with_context(|| format!("dead letters{backend}"))?;
        for (name, value) in [("replay_kind", replaying), ("delete_kind", deleting)] {
            figures.push(Figure {
                name: format!("dlq.{name}{backend}"),
                value,
                unit: "letters/s",
                baseline: Some(listing),
                baseline_name: "GET /v1/dlq, pages of 1,000",
                target: "",
            });
        }
    }
    Ok(figures)
}
