//! Distributed mode: events per second through one and two hosts on one NATS JetStream
//! server, beside a bare JetStream loop (publish with `Nats-Msg-Id`, then one pull
//! consumer fetching and acknowledging every message) on the same server in the same run;
//! and through one host whose plugin writes two KV keys per event, beside the same plugin
//! writing nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures_util::StreamExt;

use crate::client::{self, Batch, Single};
use crate::figures::median;
use crate::guests::Guest;
use crate::host::Process;
use crate::nats_server::NatsServer;
use crate::{Figure, Options};

/// The plugin every host of a figure runs: a guest and its sidecar.
struct Probe {
    guest: Guest,
    sidecar: String,
}

impl Probe {
    /// The no-op plugin.
    fn noop() -> Self {
        Self {
            guest: Guest::Noop,
            sidecar: "subscribe = [\"bench.>\"]\nconcurrency = 16\n".to_owned(),
        }
    }

    /// A plugin that writes two KV keys per event (`writes = "on"`), or the same plugin
    /// doing nothing (`"off"`).
    fn kv_pair(writes: &str) -> Self {
        Self {
            guest: Guest::Hostile,
            sidecar: format!(
                "subscribe = [\"bench.>\"]\nconcurrency = 16\n[config]\n\
                 behaviour = \"hostile.kv-pair\"\nwrites = \"{writes}\"\n"
            ),
        }
    }
}

/// Events per second through `hosts` hosts sharing one plugin, from the first request to
/// the plugin being caught up on every host. Only events that were sent count (the
/// producers stop at the deadline), and the figure fails unless the plugin handled every
/// one of them.
async fn through_hosts(
    server: &NatsServer,
    prefix: &str,
    hosts: usize,
    events: usize,
    probe: &Probe,
    options: &Options,
) -> anyhow::Result<f64> {
    let config = format!(
        "[bus]\nkind = \"nats\"\nurl = \"{}\"\nprefix = \"{prefix}\"\n",
        server.url()
    );
    let fleet: Vec<Process> = (0..hosts)
        .map(|_| {
            Process::host(
                &[("probe".into(), probe.guest, Some(probe.sidecar.clone()))],
                Some(&config),
            )
        })
        .collect::<anyhow::Result<_>>()?;
    // Warm the connections, the consumer and the plugin's instances on every host.
    for (index, host) in fleet.iter().enumerate() {
        let warm = Arc::new(Single {
            prefix: format!("{prefix}-warm-{index}"),
        });
        client::saturate(host.address, 4, 200, options.deadline(), warm).await?;
    }
    let mut handled_before = 0;
    for host in &fleet {
        host.wait_caught_up("probe", Duration::from_secs(60))
            .await?;
        handled_before += host.handled("probe").await?;
    }
    let started = Instant::now();
    let mut sending = Vec::new();
    // Batches of 100, so that the figure measures the bus rather than per-request HTTP
    // (which `ingest.single` measures).
    for (index, host) in fleet.iter().enumerate() {
        let request = Arc::new(Batch {
            prefix: format!("{prefix}-{index}"),
            size: 100,
        });
        sending.push(client::saturate(
            host.address,
            8,
            events / hosts / 100,
            options.deadline(),
            request,
        ));
    }
    // The events the producers sent: fewer than `events` if the deadline stopped them.
    let mut sent = 0;
    for result in futures_util::future::join_all(sending).await {
        sent += result?.events;
    }
    anyhow::ensure!(sent > 0, "no events were sent before the deadline");
    let mut done = started;
    for host in &fleet {
        done = host
            .wait_caught_up("probe", Duration::from_secs(120))
            .await?;
    }
    let every_host: Vec<&Process> = fleet.iter().collect();
    Process::ensure_all_handled(&every_host, "probe", handled_before, sent as u64).await?;
    Ok(sent as f64 / (done - started).as_secs_f64())
}

/// The bare loop: `events` publishes of the same size with message ids, acks awaited in
/// windows, then one durable pull consumer fetching and acknowledging them all.
async fn bare_loop(server: &NatsServer, events: usize) -> anyhow::Result<f64> {
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    let events_stream = js
        .create_stream(stream::Config {
            name: "bare".into(),
            subjects: vec!["bare.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let consumer: PullConsumer = events_stream
        .create_consumer(pull::Config {
            durable_name: Some("bare".into()),
            ..Default::default()
        })
        .await?;
    let payload = bytes::Bytes::from(vec![b'x'; 160]);
    let started = Instant::now();
    let mut pending = Vec::with_capacity(256);
    for n in 0..events {
        let publish = PublishMessage::build()
            .payload(payload.clone())
            .message_id(format!("bare-{n}"));
        pending.push(js.send_publish("bare.tick", publish).await?);
        if pending.len() == 256 {
            for ack in pending.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in pending {
        ack.await?;
    }
    let mut consumed = 0;
    while consumed < events {
        let mut batch = consumer
            .fetch()
            .max_messages(256)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        while let Some(message) = batch.next().await {
            message
                .map_err(|e| anyhow::anyhow!(e))?
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            consumed += 1;
        }
    }
    let rate = events as f64 / started.elapsed().as_secs_f64();
    // The next round starts from an empty stream.
    js.delete_stream("bare").await?;
    Ok(rate)
}

/// `nats.hosts1` and `nats.hosts2` beside the bare loop, and `nats.kv_writes2` beside its
/// plugin without writes: each the median of [`Options::pick`]`(3, 1)` rounds, a round
/// measuring a figure and its baseline one after the other, so that both see the machine
/// as it is then (the bare loop alone moves by a fifth from run to run).
pub async fn figures(options: &Options) -> anyhow::Result<Vec<Figure>> {
    // `--only nats.hosts1` (or another of the names below) measures that figure alone,
    // with its baseline.
    let wanted = |name: &str| {
        options
            .only
            .as_deref()
            .is_none_or(|only| !only.contains('.') || name.contains(only))
    };
    let events = options.pick(60_000, 4_000);
    // Fewer events: a KV-writing commit costs several round trips.
    let kv_events = options.pick(12_000, 1_000);
    let rounds = options.pick(3, 1);
    let server = NatsServer::start();
    let hosts_figures = [("nats.hosts1", 1), ("nats.hosts2", 2)]
        .into_iter()
        .filter(|(name, _)| wanted(name))
        .collect::<Vec<_>>();
    let kv_wanted = wanted("nats.kv_writes2");
    let mut bare = Vec::new();
    let mut through: Vec<Vec<f64>> = vec![Vec::new(); hosts_figures.len()];
    let (mut without_writes, mut with_writes) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if !hosts_figures.is_empty() {
            bare.push(
                bare_loop(&server, events)
                    .await
                    .context("bare JetStream loop")?,
            );
        }
        for ((_, hosts), values) in hosts_figures.iter().zip(&mut through) {
            values.push(
                through_hosts(
                    &server,
                    &format!("h{hosts}-{round}"),
                    *hosts,
                    events,
                    &Probe::noop(),
                    options,
                )
                .await
                .with_context(|| format!("{hosts} hosts"))?,
            );
        }
        if kv_wanted {
            for (writes, values) in [("off", &mut without_writes), ("on", &mut with_writes)] {
                values.push(
                    through_hosts(
                        &server,
                        &format!("kv-{writes}-{round}"),
                        1,
                        kv_events,
                        &Probe::kv_pair(writes),
                        options,
                    )
                    .await
                    .with_context(|| format!("the KV plugin, writes {writes}"))?,
                );
            }
        }
    }
    let mut figures = Vec::new();
    let bare = (!bare.is_empty()).then(|| median(bare));
    for ((name, hosts), values) in hosts_figures.into_iter().zip(through) {
        figures.push(Figure {
            name: name.into(),
            value: median(values),
            unit: "events/s",
            baseline: bare,
            baseline_name: "bare JetStream publish+consume",
            target: if hosts == 1 { "ratio >= 0.7" } else { "" },
        });
    }
    if kv_wanted {
        figures.push(Figure {
            name: "nats.kv_writes2".into(),
            value: median(with_writes),
            unit: "events/s",
            baseline: Some(median(without_writes)),
            baseline_name: "the same plugin, no KV writes",
            target: "ratio >= 0.5",
        });
    }
    Ok(figures)
}
