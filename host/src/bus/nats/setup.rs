//! Setting the backend up at start: connecting, then creating the streams and buckets
//! every host shares, or checking the ones that exist. A cluster still electing its
//! JetStream leader is waited for, up to [`SETUP_PATIENCE`]; a misconfiguration fails
//! at once.
//!
//! Invariants:
//! - An existing stream is used only when it has exactly the subjects this prefix gives
//!   it (otherwise another deployment owns it); its replicas and limits are brought to
//!   the configuration.
//! - A bucket made here has the config of a KV bucket with reads served by the stream
//!   leader, never by a replica that may be behind; an existing bucket is used as it is.
//! - The event stream's dedupe window is never longer than it keeps events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::Context as JetStream;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};

use super::commit::commit_subjects;
use super::{NatsBus, NatsOptions, Shared, nats_error};
use crate::bus::BusError;

impl NatsBus {
    /// Connects, then creates the streams and buckets or checks the existing ones.
    pub async fn connect(options: NatsOptions) -> Result<Self, BusError> {
        let urls: Vec<async_nats::ServerAddr> = options
            .url
            .split(',')
            .map(|url| url.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|error| {
                BusError::Storage(format!("bad NATS URL in `{}`: {error}", options.url))
            })?;
        let outage = Arc::new(super::Outage::new());
        let observed = outage.clone();
        let client = async_nats::ConnectOptions::new()
            .name("switchyard")
            .event_callback(move |event| {
                observed.observe(&event);
                async {}
            })
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .connect(urls)
            .await
            .map_err(|error| {
                BusError::Storage(format!(
                    "cannot reach the NATS server at {}: {error}",
                    options.url
                ))
            })?;
        check_server_version(&client.server_info().version, &options.url)?;
        let jetstream = jetstream::new(client.clone());
        // A cluster that is still electing its JetStream leader (hosts started together
        // with it) answers setup requests with errors for a while: wait for it, bounded.
        let deadline = tokio::time::Instant::now() + SETUP_PATIENCE;
        let Opened {
            events,
            dead_letters,
            schedules,
            attempts,
            recorded_notices,
        } = loop {
            match open_streams(&jetstream, &options).await {
                Ok(opened) => break opened,
                Err(Setup::Unavailable(error)) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(%error, "JetStream is not ready; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(Setup::Unavailable(error) | Setup::Fatal(error)) => return Err(error),
            }
        };
        let (notices, queue) = tokio::sync::mpsc::channel(super::schemas::NOTICE_QUEUE);
        tokio::spawn(super::schemas::publish_notices(client.clone(), queue));
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                jetstream,
                options,
                events,
                dead_letters,
                schedules,
                scheduler: tokio::sync::Mutex::new(None),
                attempts,
                plugin_kv: Mutex::new(HashMap::new()),
                committers: Mutex::new(HashMap::new()),
                schemas: tokio::sync::OnceCell::new(),
                controls: tokio::sync::OnceCell::new(),
                notices,
                recorded_notices,
                outage,
            }),
        })
    }
}

/// The oldest nats-server this backend runs on: commits are atomic batches (2.12), their
/// records expire by per-message TTL (2.11), scheduled events are the server's message
/// schedules (2.12), and each plugin's consumer filters on several subjects (2.10).
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 12, 0);

/// Refuses a server older than [`MIN_SERVER_VERSION`], as its `INFO` reports itself
/// (such as `2.12.8` or `2.11.0-RC.1`); a version that cannot be read is refused too.
fn check_server_version(version: &str, url: &str) -> Result<(), BusError> {
    let (major, minor, patch) = MIN_SERVER_VERSION;
    let numbers: Vec<u64> = version
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .take(3)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    if let [found_major, found_minor, found_patch] = numbers[..]
        && (found_major, found_minor, found_patch) >= MIN_SERVER_VERSION
    {
        return Ok(());
    }
    Err(BusError::Storage(format!(
        "the NATS server at {url} is nats-server {version}; Switchyard needs \
         {major}.{minor}.{patch} or later (atomic batch publish)"
    )))
}

/// How long a starting host waits for JetStream to answer its setup requests.
const SETUP_PATIENCE: Duration = Duration::from_secs(30);

/// A setup step's failure: worth waiting out, or a misconfiguration.
enum Setup {
    Unavailable(BusError),
    Fatal(BusError),
}

/// The streams and buckets every host shares.
struct Opened {
    events: stream::Stream,
    dead_letters: stream::Stream,
    schedules: stream::Stream,
    attempts: kv::Store,
    recorded_notices: stream::Stream,
}

/// Creates or checks the streams and buckets every host shares.
async fn open_streams(jetstream: &JetStream, options: &NatsOptions) -> Result<Opened, Setup> {
    let prefix = &options.prefix;
    // The server refuses a dedupe window longer than the stream keeps events.
    let duplicate_window = match options.max_age {
        Some(max_age) => options.duplicate_window.min(max_age),
        None => options.duplicate_window,
    };
    let events = ensure_stream(
        jetstream,
        stream::Config {
            name: format!("{prefix}-events"),
            subjects: event_subjects(prefix),
            max_age: options.max_age.unwrap_or_default(),
            max_bytes: options
                .max_bytes
                .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            duplicate_window,
            // Conditional appends of several events, and commits with stream conditions,
            // are atomic batches; their commit records and guards expire by TTL.
            allow_atomic_publish: true,
            allow_message_ttl: true,
            // A subject's head message replaces the one before (`Nats-Rollup: sub`).
            allow_rollup: true,
            ..stream_defaults(options)
        },
    )
    .await?;
    let schedules = ensure_stream(
        jetstream,
        stream::Config {
            name: format!("{prefix}-schedules"),
            subjects: vec![format!("{prefix}.schedule.*"), format!("{prefix}.due.*")],
            duplicate_window: options.duplicate_window,
            // A due message goes once the scheduler acknowledges it (its only consumer);
            // pending schedules match no consumer and stay.
            retention: RetentionPolicy::WorkQueue,
            allow_message_schedules: true,
            // The server requires both of a stream with schedules.
            allow_rollup: true,
            deny_purge: false,
            ..stream_defaults(options)
        },
    )
    .await?;
    let dead_letters = ensure_stream(
        jetstream,
        stream::Config {
            name: format!("{prefix}-dead-letters"),
            subjects: vec![format!("{prefix}.dlq.*")],
            max_age: options.dead_letter_max_age.unwrap_or_default(),
            duplicate_window: options
                .dead_letter_max_age
                .map_or(options.duplicate_window, |age| {
                    options.duplicate_window.min(age)
                }),
            ..stream_defaults(options)
        },
    )
    .await?;
    let attempts = ensure_bucket(jetstream, options, &format!("{prefix}-attempts"))
        .await
        .map_err(Setup::Unavailable)?;
    // The notices of events a producer waited for, published as core messages: kept as
    // long as a resend of the event is recognised, for a resend with `?wait=`.
    let recorded_notices = ensure_stream(
        jetstream,
        stream::Config {
            name: format!("{prefix}-notices"),
            subjects: vec![format!("{prefix}.notices.*")],
            max_age: duplicate_window,
            max_messages_per_subject: i64::try_from(super::schemas::MAX_NOTICES_PER_EVENT)
                .unwrap_or(i64::MAX),
            ..stream_defaults(options)
        },
    )
    .await?;
    Ok(Opened {
        events,
        dead_letters,
        schedules,
        attempts,
        recorded_notices,
    })
}

/// The subjects of the event stream: events without and with a CloudEvents subject,
/// the heads of subject streams, replays, conditional commit records and their stream
/// guards.
fn event_subjects(prefix: &str) -> Vec<String> {
    vec![
        format!("{prefix}.events.>"),
        format!("{prefix}.streams.>"),
        format!("{prefix}.heads.*"),
        format!("{prefix}.replay.*"),
        format!("{prefix}.commits.>"),
        format!("{prefix}.guards"),
    ]
}

fn stream_defaults(options: &NatsOptions) -> stream::Config {
    stream::Config {
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        num_replicas: options.replicas,
        // As the server reports "no limit", so that an unchanged stream compares equal.
        max_bytes: -1,
        // With replicas, direct gets may be answered by a replica that is behind; reads
        // then go to the leader instead (see `next_message`).
        allow_direct: options.replicas == 1,
        ..Default::default()
    }
}

/// Creates the stream, or checks that the existing one has the same subjects and updates
/// the limits the config sets.
async fn ensure_stream(
    jetstream: &JetStream,
    config: stream::Config,
) -> Result<stream::Stream, Setup> {
    match jetstream.get_stream(&config.name).await {
        Ok(existing) => {
            let current = existing.cached_info().config.clone();
            // A stream made by an earlier version of the host has some of the subjects:
            // it takes the others. One with subjects of its own belongs to someone else.
            let foreign = current
                .subjects
                .iter()
                .any(|subject| !config.subjects.contains(subject));
            if foreign {
                return Err(Setup::Fatal(BusError::Storage(format!(
                    "the NATS stream `{}` exists with subjects {:?}, not {:?}: another \
                     deployment uses this `[bus] prefix`",
                    config.name, current.subjects, config.subjects
                ))));
            }
            let differs = current.subjects.len() != config.subjects.len()
                || current.num_replicas != config.num_replicas
                || current.max_age != config.max_age
                || current.max_bytes != config.max_bytes
                || current.duplicate_window != config.duplicate_window
                || current.allow_direct != config.allow_direct
                || current.allow_atomic_publish != config.allow_atomic_publish
                || current.allow_message_ttl != config.allow_message_ttl
                || current.allow_rollup != config.allow_rollup
                || current.allow_message_schedules != config.allow_message_schedules;
            if differs {
                jetstream.update_stream(&config).await.map_err(|error| {
                    Setup::Fatal(BusError::Storage(format!(
                        "cannot update the NATS stream `{}` to the configured replicas and \
                         limits: {error}",
                        config.name
                    )))
                })?;
            }
            jetstream
                .get_stream(&config.name)
                .await
                .map_err(|error| Setup::Unavailable(nats_error("opening the stream")(&error)))
        }
        Err(error) if is_not_found(&error) => jetstream
            .create_stream(config.clone())
            .await
            .map_err(|error| {
                Setup::Unavailable(BusError::Storage(format!(
                    "cannot create the NATS stream `{}` (is JetStream enabled, `nats-server \
                     -js`?): {error}",
                    config.name
                )))
            }),
        Err(error) => Err(Setup::Unavailable(BusError::Storage(format!(
            "cannot look up the NATS stream `{}` (is JetStream enabled, `nats-server -js`?): \
             {error}",
            config.name
        )))),
    }
}

pub(super) fn is_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(e)
            if e.error_code() == ErrorCode::STREAM_NOT_FOUND
    )
}

/// Opens a KV bucket, creating its stream first when missing, and gives an existing one
/// what the commit protocol needs. The stream is made here rather than by
/// `create_key_value`: besides the config of a KV bucket it has the bucket's commit
/// subjects (see `commit.rs`), atomic batches and per-message TTLs.
pub(super) async fn ensure_bucket(
    jetstream: &JetStream,
    options: &NatsOptions,
    bucket: &str,
) -> Result<kv::Store, BusError> {
    let open = |error: &dyn std::fmt::Display| {
        BusError::Storage(format!(
            "cannot open the NATS KV bucket `{bucket}`: {error}"
        ))
    };
    if let Ok(store) = jetstream.get_key_value(bucket).await {
        let mut config = store.stream.cached_info().config.clone();
        let commits = commit_subjects(bucket);
        if config.subjects.contains(&commits)
            && config.allow_atomic_publish
            && config.allow_message_ttl
        {
            return Ok(store);
        }
        // A bucket made before commits were atomic batches.
        if !config.subjects.contains(&commits) {
            config.subjects.push(commits);
        }
        config.allow_atomic_publish = true;
        config.allow_message_ttl = true;
        jetstream
            .update_stream(&config)
            .await
            .map_err(|error| open(&error))?;
        return jetstream
            .get_key_value(bucket)
            .await
            .map_err(|error| open(&error));
    }
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>"), commit_subjects(bucket)],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        // Reads go to the stream leader: a replica answering a direct get may be behind,
        // and a stale revision would undo the checks of a commit.
        allow_direct: false,
        discard: DiscardPolicy::New,
        storage: StorageType::File,
        num_replicas: options.replicas,
        allow_atomic_publish: true,
        allow_message_ttl: true,
        ..Default::default()
    };
    jetstream.create_stream(config).await.map_err(|error| {
        BusError::Storage(format!(
            "cannot create the NATS KV bucket `{bucket}`: {error}"
        ))
    })?;
    jetstream
        .get_key_value(bucket)
        .await
        .map_err(|error| open(&error))
}

#[cfg(test)]
mod tests {
    use super::check_server_version;

    #[test]
    fn servers_older_than_the_minimum_are_refused_with_the_minimum_named() {
        for fine in ["2.12.0", "2.12.8", "2.14.0-RC.1", "v2.15.1", "3.0.0"] {
            assert!(check_server_version(fine, "nats://x").is_ok(), "{fine}");
        }
        for old in ["2.9.10", "2.11.9", "1.4.1", "", "unknown"] {
            let error = check_server_version(old, "nats://x")
                .unwrap_err()
                .to_string();
            assert!(error.contains("needs 2.12.0 or later"), "{old}: {error}");
        }
    }
}
