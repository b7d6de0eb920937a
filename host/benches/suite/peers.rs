//! Peers: what a user would pick instead, measured in the same run as our figures.
//!
//! Durable ingest against NATS JetStream (`nats-server -js`, file storage, its default
//! settings, started by the bench on a free loopback port): `peer.jetstream.single` is 64
//! tasks each publishing one message at a time and awaiting its acknowledgement, as 64
//! connections POST one event at a time to our host; `peer.jetstream.batch100` is 8 tasks
//! each publishing 100 messages asynchronously and then awaiting their 100
//! acknowledgements, as 8 connections POST batches of 100. Every message carries a
//! `Nats-Msg-Id` (deduplication, as our `(source, id)`) and a payload the size of our
//! stored event. Each figure is ours, with the peer as its baseline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use async_nats::jetstream::{self, message::PublishMessage, stream};

use crate::client::{self, Batch, Single};
use crate::host::Process;
use crate::nats_server::NatsServer;
use crate::{Figure, Options};

/// Bytes of a stored event of the single-POST load, as the JetStream payload.
const PAYLOAD: usize = 160;

/// Messages per second from `tasks` tasks, each publishing `per_publish` messages at a
/// time and awaiting their acknowledgements before the next, `messages` in all.
async fn jetstream(
    server: &NatsServer,
    stream_name: &str,
    tasks: usize,
    per_publish: usize,
    messages: usize,
) -> anyhow::Result<f64> {
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: stream_name.into(),
        subjects: vec![format!("{stream_name}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut running = Vec::new();
    for _ in 0..tasks {
        let (js, payload, next) = (js.clone(), payload.clone(), Arc::clone(&next));
        let subject = format!("{stream_name}.tick");
        let id_prefix = stream_name.to_owned();
        running.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(per_publish, Ordering::Relaxed);
                if first >= messages {
                    return anyhow::Ok(());
                }
                let mut acks = Vec::with_capacity(per_publish);
                for n in first..(first + per_publish).min(messages) {
                    let publish = PublishMessage::build()
                        .payload(payload.clone())
                        .message_id(format!("{id_prefix}-{n}"));
                    acks.push(js.send_publish(subject.clone(), publish).await?);
                }
                for ack in acks {
                    ack.await?;
                }
            }
        }));
    }
    for task in running {
        task.await??;
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

pub async fn figures(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let deadline = options.deadline();
    let single_requests = options.pick(60_000, 15_000);
    let batch_requests = options.pick(2_000, 400);

    let host = Process::host(&[], None)?;
    let single = |prefix: &str| -> Arc<dyn client::Request> {
        Arc::new(Single {
            prefix: prefix.to_owned(),
        })
    };
    client::saturate(host.address, 8, 2_000, deadline, single("warm")).await?;
    let ours_single = client::saturate(host.address, 64, single_requests, deadline, single("s"))
        .await?
        .per_second;
    let batch = Arc::new(Batch {
        prefix: "b".to_owned(),
        size: 100,
    });
    let ours_batch = client::saturate(host.address, 8, batch_requests, deadline, batch)
        .await?
        .per_second;
    drop(host);

    let server = NatsServer::start();
    jetstream(&server, "warm", 8, 1, 2_000)
        .await
        .context("warming JetStream")?;
    let peer_single = jetstream(&server, "single", 64, 1, single_requests)
        .await
        .context("JetStream single publishes")?;
    let peer_batch = jetstream(&server, "batch", 8, 100, batch_requests * 100)
        .await
        .context("JetStream asynchronous batches")?;

    Ok(vec![
        Figure {
            name: "peer.jetstream.single".into(),
            value: ours_single,
            unit: "events/s",
            baseline: Some(peer_single),
            baseline_name: "JetStream, 64 sync publishers",
            target: "",
        },
        Figure {
            name: "peer.jetstream.batch100".into(),
            value: ours_batch,
            unit: "events/s",
            baseline: Some(peer_batch),
            baseline_name: "JetStream, 8 x 100 async publishes",
            target: "",
        },
    ])
}
