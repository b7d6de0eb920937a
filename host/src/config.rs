//! The host config file, `switchyard.toml`: what [`Config`] holds, its defaults, and the
//! checks a config must pass before the host uses it.
//!
//! Every key is optional and has a default, so an empty file (or none) is a working
//! loopback-only setup. An unknown key at any level is an error naming it, as is a value
//! of the wrong type or unit. The doc comment of each field is the reference for its key.
//!
//! Invariant: [`Config::parse`] and [`Config::load`] return only configs that pass
//! [`Config::validate`]; in particular the host never listens beyond loopback without
//! both ingest and admin tokens. Code that changes a config afterwards (a command-line
//! override, say) must call [`Config::validate`] again.
//!
//! Durations are humantime strings (`"200ms"`, `"10s"`, `"24h"`); sizes are a number of
//! bytes or a string with a unit (`"4MiB"`, `"1GB"`), see
//! [`parse_size`](crate::units::parse_size). Relative paths are relative to
//! the host's working directory.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! data_dir = "./data"
//! plugins_dir = "./plugins.d"
//! shutdown_drain = "0s"
//! shutdown_grace = "10s"
//!
//! [auth]
//! ingest_tokens = []
//! admin_tokens = []
//!
//! [http]
//! header_timeout = "10s"
//! request_timeout = "30s"
//! max_concurrent_requests = 1024
//!
//! [ingest]
//! max_body_bytes = "4MiB"
//! max_event_bytes = "1MiB"
//! max_batch_events = 10000
//! max_pending_events = 100000
//! retry_after = "1s"
//! max_wait = "30s"
//! max_waiters = 1000
//! public_url = "http://127.0.0.1:8080"   # default: the address the host listens on
//!
//! [bus]
//! kind = "embedded"            # or "nats"
//! url = "nats://127.0.0.1:4222"
//! prefix = "switchyard"
//! replicas = 1
//! duplicate_window = "10m"
//! ack_wait = "30s"
//!
//! [log]
//! group_commit_max_events = 4096
//! group_commit_max_delay = "0ms"
//! synchronous = "full"
//! max_bytes = "10GiB"          # default: no size limit
//! retention_interval = "1s"
//! absent_plugin_hold = "forever"
//! dead_letter_max_age = "forever"
//! [[log.retention]]            # default: no rules
//! types = "order.>"
//! max_age = "forever"
//! [[log.retention]]
//! types = ">"
//! max_age = "7d"
//!
//! [runtime]
//! max_instances = 1000
//! max_memory = "1GiB"
//! guest_threads = 1            # default: CPU cores minus one, at least 1
//! compile_cache_max_unused = "30d"
//! compile_cache_max_bytes = "2GiB"
//!
//! [watch]
//! mode = "events"
//! poll_interval = "2s"
//! quiet_period = "250ms"
//!
//! [plugin_defaults]
//! concurrency = 4
//! ordering = "none"
//! start = "latest"
//! instance = "per-event"
//! max_calls = 10000
//! [plugin_defaults.retry]
//! max_attempts = 5
//! [plugin_defaults.limits]
//! fuel = 1_000_000_000
//! [plugin_defaults.effects]
//! max_emits = 100
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::PluginDefaults;
use crate::retention::{RetentionRule, StreamLimits, stream_limits};
use crate::runtime::{CacheLimits, RuntimeConfig};
use crate::units::deser;

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type or unit. The message
    /// is toml's: it names the key and shows the line.
    #[error("{0}")]
    Syntax(String),
    /// A value that parsed but is not allowed.
    #[error("`{key}` {reason}")]
    Invalid {
        /// The key, dotted for keys in tables (`auth.ingest_tokens`).
        key: String,
        /// What is wrong, and what to set instead.
        reason: String,
    },
    /// A [`ConfigError::Syntax`] or [`ConfigError::Invalid`] in a file.
    #[error("config file {}: {error}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: Box<ConfigError>,
    },
}

impl ConfigError {
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The host configuration (`switchyard.toml`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port the HTTP server (ingest, admin, metrics) listens on. Listening
    /// beyond loopback (for example `"0.0.0.0:8080"`) requires both `[auth]` token lists.
    ///
    /// Default: `"127.0.0.1:8080"`.
    pub listen: SocketAddr,

    /// Directory for the host's own state: the event log, cursors, retry schedule, dead
    /// letters and plugin KV. Created if missing.
    ///
    /// Default: `"./data"`.
    pub data_dir: PathBuf,

    /// Directory watched for plugins: `NAME.wasm` with an optional sidecar `NAME.toml`.
    ///
    /// Default: `"./plugins.d"`.
    pub plugins_dir: PathBuf,

    /// On shutdown, how long the host goes on serving requests with `/readyz` answering
    /// `503` before it stops accepting them, so a load balancer polling `/readyz` takes it
    /// out of rotation before its connections are refused. A second SIGINT/SIGTERM ends the
    /// drain at once. Set it a little above the load balancer's check interval times its
    /// failure threshold.
    ///
    /// Default: `"0s"` (stop accepting at once).
    #[serde(deserialize_with = "deser::duration")]
    pub shutdown_drain: Duration,

    /// On shutdown, how long in-flight invocations and pending commits may take to finish
    /// before the host exits anyway. Unfinished deliveries are redelivered on restart.
    ///
    /// Default: `"10s"`.
    #[serde(deserialize_with = "deser::duration")]
    pub shutdown_grace: Duration,

    /// `[auth]`: bearer tokens for the HTTP API.
    pub auth: AuthSection,

    /// `[http]`: limits on connections and requests of the HTTP API.
    pub http: HttpSection,

    /// `[ingest]`: limits and backpressure for `POST /v1/events`.
    pub ingest: IngestSection,

    /// `[bus]`: where events, consumer positions, dead letters and plugin KV live.
    pub bus: BusSection,

    /// `[log]`: how the embedded event log commits appends, and what retention deletes.
    pub log: LogSection,

    /// `[runtime]`: engine-wide limits of the WebAssembly runtime.
    pub runtime: RuntimeSection,

    /// `[watch]`: how the host notices plugin files being added, replaced or removed.
    pub watch: WatchSection,

    /// `[telemetry]`: where traces go.
    pub telemetry: TelemetrySection,

    /// `[plugin_defaults]`: the policy of every plugin whose sidecar does not set a key.
    /// Takes the keys of a sidecar except `subscribe`, `[config]`, `[breaker]` and
    /// `[batch]` (which a plugin opts into by itself):
    /// `concurrency`, `ordering`, `start`, `instance`, `max_calls` and the tables
    /// `[plugin_defaults.retry]`, `[plugin_defaults.limits]`, `[plugin_defaults.effects]`
    /// (see [`crate::plugins::manifest`] for each key).
    pub plugin_defaults: PluginDefaults,
}

/// `[auth]`: bearer tokens (`Authorization: Bearer TOKEN`) for the HTTP API. With both
/// lists empty there is no authentication, which is allowed only when `listen` is a
/// loopback address.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// Tokens accepted on the ingest routes (`POST /v1/events…`). Any one of them is
    /// enough. Empty means ingest needs no token.
    ///
    /// Default: `[]`.
    pub ingest_tokens: Vec<String>,

    /// Tokens accepted on the admin routes (`/v1/plugins…`, `/v1/dlq…`). Any one of them is
    /// enough. Empty means admin routes need no token.
    ///
    /// Default: `[]`.
    pub admin_tokens: Vec<String>,
}

impl fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are secrets: never print them.
        f.debug_struct("AuthSection")
            .field("ingest_tokens", &Redacted(self.ingest_tokens.len()))
            .field("admin_tokens", &Redacted(self.admin_tokens.len()))
            .finish()
    }
}

struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} redacted>", self.0)
    }
}

/// `[ingest]`: limits and backpressure for `POST /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSection {
    /// Largest request body: bytes, or a size such as `"4MiB"`. Bigger requests get `413`.
    ///
    /// Default: `"4MiB"`.
    #[serde(deserialize_with = "deser::size_usize")]
    pub max_body_bytes: usize,

    /// Largest single event (its `data` plus attributes): bytes, or a size such as
    /// `"1MiB"`. A bigger event gets `413`.
    ///
    /// Default: `"1MiB"`.
    #[serde(deserialize_with = "deser::size_usize")]
    pub max_event_bytes: usize,

    /// Most events in one batch-mode request. At least 1.
    ///
    /// Default: 10000.
    pub max_batch_events: usize,

    /// Most events waiting for the log writer. Above this, ingest answers `503` with
    /// `Retry-After` instead of queueing more. At least 1.
    ///
    /// Default: 100000.
    pub max_pending_events: usize,

    /// How long a refused producer is told to wait (the `Retry-After` header) under
    /// backpressure.
    ///
    /// Default: `"1s"`.
    #[serde(deserialize_with = "deser::duration")]
    pub retry_after: Duration,

    /// Longest `?wait=` a producer may ask for on `POST /v1/events`: the time the host
    /// holds the request open for the event's outcome. A longer one is `400`.
    ///
    /// Default: `"30s"`.
    #[serde(deserialize_with = "deser::duration")]
    pub max_wait: Duration,

    /// Most events whose outcomes are waited for (`?wait=`) at once on this host: a
    /// request that would go over is answered `503` with `Retry-After`, and one with more
    /// events than this `400`. At least 1.
    ///
    /// Default: 1000.
    pub max_waiters: usize,

    /// The URL producers reach this host at, as the start of the `dataschema` of events
    /// checked against a registered schema (`<public_url>/v1/schemas/<type>/<version>`).
    ///
    /// Default: `http://` and the address the host listens on.
    pub public_url: Option<String>,
}

/// How durable a commit of the embedded log is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit: an acknowledged event survives power loss.
    #[default]
    Full,
    /// fsync only at checkpoints: faster; an acknowledged event survives a crash of the
    /// host process, but the last commits may be lost on power loss or an OS crash.
    Normal,
}

/// Which backend holds the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// The embedded log: one SQLite file in `data_dir`, one host.
    #[default]
    Embedded,
    /// NATS JetStream: many hosts share the streams, consumers and KV buckets.
    Nats,
}

/// `[bus]`: the backend of the bus. The embedded log needs nothing more (see `[log]`);
/// the other keys configure the NATS JetStream backend and are ignored by the embedded
/// one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusSection {
    /// `"embedded"` or `"nats"`. The command line's `--bus nats://HOST:PORT` sets
    /// `"nats"` and `url`.
    ///
    /// Default: `"embedded"`.
    pub kind: BusKind,

    /// NATS server URLs, comma-separated (`"nats://10.0.0.1:4222,nats://10.0.0.2:4222"`);
    /// the client reconnects to any of them.
    ///
    /// Default: `"nats://127.0.0.1:4222"`.
    pub url: String,

    /// Prefix of every stream, subject, consumer and KV bucket the hosts use, so several
    /// deployments can share one NATS account. 1 to 32 of A-Z, a-z, 0-9, `_` and `-`.
    ///
    /// Default: `"switchyard"`.
    pub prefix: String,

    /// Copies JetStream keeps of the event stream, the dead-letter stream and the KV
    /// buckets (1 to 5; more than 1 needs a JetStream cluster). Checked against existing
    /// streams at start.
    ///
    /// Default: 1.
    pub replicas: usize,

    /// How long the NATS event stream keeps events; absent keeps them until `max_bytes`.
    /// The same limit as a `[[log.retention]]` rule for `>` with a `max_age`, which may be
    /// written instead (not both), and the only one the embedded log takes.
    ///
    /// Default: absent.
    #[serde(deserialize_with = "deser::opt_duration")]
    pub max_age: Option<Duration>,

    /// Most bytes the NATS event stream keeps, dropping the oldest beyond it; absent: no
    /// limit. The same limit as `log.max_bytes`, which may be written instead (not both),
    /// and the only one the embedded log takes.
    ///
    /// Default: absent.
    #[serde(deserialize_with = "deser::opt_size")]
    pub max_bytes: Option<u64>,

    /// How long JetStream remembers an event's `(source, id)` to drop a resent copy
    /// (`Nats-Msg-Id`). A copy resent later than this is stored again.
    ///
    /// Default: `"10m"`.
    #[serde(deserialize_with = "deser::duration")]
    pub duplicate_window: Duration,

    /// How long a delivery may go without word from its host before JetStream hands it to
    /// another host. Running hosts keep their deliveries alive, so this is how soon the
    /// deliveries of a host that died are taken over.
    ///
    /// Default: `"30s"`.
    #[serde(deserialize_with = "deser::duration")]
    pub ack_wait: Duration,
}

impl Default for BusSection {
    fn default() -> Self {
        Self {
            kind: BusKind::Embedded,
            url: "nats://127.0.0.1:4222".to_owned(),
            prefix: "switchyard".to_owned(),
            replicas: 1,
            max_age: None,
            max_bytes: None,
            duplicate_window: Duration::from_secs(600),
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// `[log]`: how the embedded event log commits appends (producers get `202` only after
/// the commit that holds their event), and what retention deletes from it. On NATS the
/// retention keys become the event stream's limits where they can
/// ([`Config::nats_stream_limits`]); the commit keys are the embedded log's alone.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// Most appends in one commit (group commit). At least 1.
    ///
    /// Default: 4096.
    pub group_commit_max_events: usize,

    /// How long the writer may wait for more appends before committing a group. `"0ms"`
    /// commits as soon as the writer is free; a few milliseconds trade latency for fewer
    /// fsyncs under light load.
    ///
    /// Default: `"0ms"`.
    #[serde(deserialize_with = "deser::duration")]
    pub group_commit_max_delay: Duration,

    /// `"full"`: fsync at every commit. `"normal"`: fsync only at checkpoints (faster, but
    /// the last commits may be lost on power loss).
    ///
    /// Default: `"full"`.
    pub synchronous: Synchronous,

    /// Most bytes the log's database file should use: bytes, or a size such as
    /// `"10GiB"`. Above it, retention deletes the oldest events that may go (see
    /// `retention`) until the log is back under it; events every plugin has not settled,
    /// that a dead letter refers to, or that a rule keeps forever are kept even so, and
    /// the host then says so in its log and in `switchyard_log_retention_blocked`. The
    /// file may exceed it by what is appended in one `retention_interval`. At least
    /// `"1MiB"`. On NATS it is the event stream's `max_bytes`, which deletes whatever
    /// consumers have settled (see the README).
    ///
    /// Default: absent (no size limit).
    #[serde(deserialize_with = "deser::opt_size")]
    pub max_bytes: Option<u64>,

    /// How often retention checks the log's size and age limits. Deleting happens in
    /// batches of 1,000 events, each its own short commit, beside the appends.
    ///
    /// Default: `"1s"`.
    #[serde(deserialize_with = "deser::duration")]
    pub retention_interval: Duration,

    /// How long a plugin that is not loaded (its file removed, or failing to load) still
    /// holds back the events it subscribes to and has not settled: a duration, or
    /// `"forever"`. Counted from when the host started at the earliest. A plugin that
    /// comes back after that resumes at its cursor, without what retention deleted
    /// meanwhile.
    ///
    /// Default: `"forever"` (a plugin's cursor holds its events until the plugin settles
    /// them).
    #[serde(deserialize_with = "crate::retention::deser::duration_or_forever")]
    pub absent_plugin_hold: Option<Duration>,

    /// How long a dead letter is kept: a duration, or `"forever"`. Counted from when the
    /// delivery was dead-lettered; an older one is deleted as an operator's `DELETE`
    /// would, and the event it held back is then free for the rules below. On NATS it
    /// is the dead-letter stream's `max_age`.
    ///
    /// Default: `"forever"` (a dead letter stays until it is replayed or deleted).
    #[serde(deserialize_with = "crate::retention::deser::duration_or_forever")]
    pub dead_letter_max_age: Option<Duration>,

    /// `[[log.retention]]`: which events may be deleted, and after how long, by event
    /// type; the first rule whose `types` match an event decides for it, and an event
    /// no rule matches is deleted only to meet `max_bytes`. Keys: `types`, `max_age`
    /// (a duration or `"forever"`), `delete_unsettled`, `delete_dead_lettered`; see
    /// [`RetentionRule`].
    ///
    /// Default: no rules.
    pub retention: Vec<RetentionRule>,
}

/// `[runtime]`: engine-wide limits of the WebAssembly runtime, fixed while the host runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSection {
    /// Plugin instances that may exist at once over all plugins; sizes the instance pool.
    /// At least 1.
    ///
    /// Default: 1000.
    pub max_instances: u32,

    /// Ceiling on any plugin's `limits.memory`: bytes, or a size such as `"1GiB"`. Sizes
    /// the pool's memory slots (virtual address space, not resident memory).
    ///
    /// Default: `"1GiB"`.
    #[serde(deserialize_with = "deser::size")]
    pub max_memory: u64,

    /// Long plugin calls that execute at the same moment, over all plugins. A call's
    /// first timeslice (100,000 fuel) starts at once; a call that needs more waits for
    /// each further timeslice until fewer than this many run, the plugin that has used
    /// the least CPU first, so busy plugins take turns and cannot crowd out quick ones.
    /// Calls waiting for I/O do not count. At least 1.
    ///
    /// Default: the number of CPU cores minus one (at least 1), which leaves a core to
    /// ingest and the log.
    pub guest_threads: usize,

    /// How long compiled code in `DATA_DIR/compile-cache` that no loaded plugin uses is
    /// kept (a duration, or `"forever"`): the versions hot reload replaced, removed
    /// plugins, other host versions'. Checked at start and every hour; a file in use is
    /// never removed.
    ///
    /// Default: `"30d"`.
    #[serde(deserialize_with = "crate::retention::deser::duration_or_forever")]
    pub compile_cache_max_unused: Option<Duration>,

    /// Most bytes the compile cache keeps: above it, the least recently used files no
    /// loaded plugin uses go first. What loaded plugins use is kept even beyond it.
    ///
    /// Default: `"2GiB"`.
    #[serde(deserialize_with = "deser::size")]
    pub compile_cache_max_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            data_dir: PathBuf::from("./data"),
            plugins_dir: PathBuf::from("./plugins.d"),
            shutdown_drain: Duration::ZERO,
            shutdown_grace: Duration::from_secs(10),
            auth: AuthSection::default(),
            http: HttpSection::default(),
            ingest: IngestSection::default(),
            bus: BusSection::default(),
            log: LogSection::default(),
            runtime: RuntimeSection::default(),
            watch: WatchSection::default(),
            telemetry: TelemetrySection::default(),
            plugin_defaults: PluginDefaults::default(),
        }
    }
}

/// The `[telemetry]` section: traces of each event's path (W3C trace context), exported
/// over OTLP. Off unless an endpoint is set, and then free: no span is made.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// The OTLP/HTTP traces endpoint spans are sent to as JSON, such as
    /// `"http://127.0.0.1:4318/v1/traces"` (used as given).
    ///
    /// Default: none (no traces).
    pub otlp_endpoint: Option<String>,

    /// The `service.name` the spans carry.
    ///
    /// Default: `"switchyard"`.
    pub service_name: Option<String>,

    /// The share of traces that start at this host (a request without `traceparent`)
    /// that are recorded and exported, from 0 to 1. A trace continued from a producer's
    /// `traceparent` follows the producer's sampled flag.
    ///
    /// Default: 1 (every trace).
    pub sample_ratio: Option<f64>,
}

impl TelemetrySection {
    /// What to export, when an endpoint is set.
    pub fn export(&self) -> Option<crate::telemetry::Export> {
        self.otlp_endpoint
            .as_ref()
            .map(|endpoint| crate::telemetry::Export {
                endpoint: endpoint.clone(),
                service: self
                    .service_name
                    .clone()
                    .unwrap_or_else(|| "switchyard".to_owned()),
                sample_ratio: self.sample_ratio.unwrap_or(1.0),
            })
    }
}

/// The `[http]` section: what one client may hold of the API, so that a slow or greedy
/// client cannot take the port from the others.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Longest a client may take to send a request's line and headers. A connection that
    /// is slower (a client trickling its headers) is closed without an answer. More than 0.
    ///
    /// Default: `"10s"`.
    #[serde(deserialize_with = "deser::duration")]
    pub header_timeout: Duration,

    /// Longest a request may take, reading its body included; a slower one is answered
    /// `408` (`request_timeout`). An event whose append was already under way may still
    /// be stored: a producer that retries with the same `source` and `id` stores it once.
    /// A backup and a replay or deletion of all of a plugin's dead letters have no limit.
    /// More than 0.
    ///
    /// Default: `"30s"`.
    #[serde(deserialize_with = "deser::duration")]
    pub request_timeout: Duration,

    /// Most API requests served at once; more are answered `503` with `Retry-After`
    /// (`ingest.retry_after`). `/healthz`, `/readyz` and `/metrics` are not counted, so
    /// probes and scrapes still answer under load. At least 1.
    ///
    /// Default: 1024.
    pub max_concurrent_requests: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 1024,
        }
    }
}

/// How plugin-directory changes are noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchMode {
    /// File-system events (inotify and the like), with `poll_interval` as a safety net.
    #[default]
    Events,
    /// Scan the directory every `poll_interval`: for file systems without events
    /// (network mounts, some containers).
    Poll,
    /// Load the directory once at start only.
    Off,
}

/// The `[watch]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WatchSection {
    /// `"events"`, `"poll"` or `"off"`.
    ///
    /// Default: `"events"`.
    pub mode: WatchMode,

    /// How often the directory is scanned in `poll` mode (and, as a safety net, in
    /// `events` mode).
    ///
    /// Default: `"2s"`.
    #[serde(deserialize_with = "deser::duration")]
    pub poll_interval: Duration,

    /// How long the directory must be quiet after a change before it is scanned, so a
    /// deploy that writes several files is taken as one change.
    ///
    /// Default: `"250ms"`.
    #[serde(deserialize_with = "deser::duration")]
    pub quiet_period: Duration,
}

impl Default for WatchSection {
    fn default() -> Self {
        Self {
            mode: WatchMode::Events,
            poll_interval: Duration::from_secs(2),
            quiet_period: Duration::from_millis(250),
        }
    }
}

impl Default for IngestSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_event_bytes: 1 << 20,
            max_batch_events: 10_000,
            max_pending_events: 100_000,
            retry_after: Duration::from_secs(1),
            max_wait: Duration::from_secs(30),
            max_waiters: 1000,
            public_url: None,
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            group_commit_max_events: 4096,
            group_commit_max_delay: Duration::ZERO,
            synchronous: Synchronous::Full,
            max_bytes: None,
            retention_interval: Duration::from_secs(1),
            absent_plugin_hold: None,
            dead_letter_max_age: None,
            retention: Vec::new(),
        }
    }
}

impl Default for RuntimeSection {
    fn default() -> Self {
        let engine = RuntimeConfig::default();
        Self {
            max_instances: engine.max_instances,
            max_memory: engine.max_memory_bytes,
            guest_threads: engine.guest_threads,
            compile_cache_max_unused: engine.compile_cache_limits.max_unused,
            compile_cache_max_bytes: engine.compile_cache_limits.max_bytes.unwrap_or(u64::MAX),
        }
    }
}

impl RuntimeSection {
    /// The runtime's engine-wide settings.
    pub fn runtime_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            max_instances: self.max_instances,
            max_memory_bytes: self.max_memory,
            compile_cache: None,
            compile_cache_limits: CacheLimits {
                max_unused: self.compile_cache_max_unused,
                max_bytes: Some(self.compile_cache_max_bytes),
            },
            compiler: None,
            guest_threads: self.guest_threads,
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file; errors name the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text).map_err(|error| ConfigError::InFile {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    /// Parses and validates a config file's text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Whether the listen address is beyond loopback, so the API must be guarded by tokens.
    pub fn requires_tokens(&self) -> bool {
        !is_loopback(self.listen.ip())
    }

    /// Checks the rules no single key can: the host refuses to listen beyond loopback
    /// unless both token lists are set, and limits must be usable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.requires_tokens() {
            for (key, tokens) in [
                ("auth.ingest_tokens", &self.auth.ingest_tokens),
                ("auth.admin_tokens", &self.auth.admin_tokens),
            ] {
                if tokens.is_empty() {
                    return Err(ConfigError::invalid(
                        key,
                        format!(
                            "is empty, but `listen` ({}) is not a loopback address: set both \
                             `ingest_tokens` and `admin_tokens` under [auth], or listen on \
                             127.0.0.1 or [::1]",
                            self.listen
                        ),
                    ));
                }
            }
        }
        for (key, tokens) in [
            ("auth.ingest_tokens", &self.auth.ingest_tokens),
            ("auth.admin_tokens", &self.auth.admin_tokens),
        ] {
            if tokens.iter().any(|t| t.trim().is_empty()) {
                return Err(ConfigError::invalid(key, "holds an empty token"));
            }
            if tokens.iter().any(|t| t.chars().any(char::is_whitespace)) {
                return Err(ConfigError::invalid(
                    key,
                    "holds a token with whitespace, which no `Authorization` header can carry",
                ));
            }
        }
        for (key, value) in [
            ("ingest.max_body_bytes", self.ingest.max_body_bytes),
            ("ingest.max_event_bytes", self.ingest.max_event_bytes),
            ("ingest.max_batch_events", self.ingest.max_batch_events),
            ("ingest.max_pending_events", self.ingest.max_pending_events),
            ("ingest.max_waiters", self.ingest.max_waiters),
            (
                "log.group_commit_max_events",
                self.log.group_commit_max_events,
            ),
            ("runtime.max_instances", self.runtime.max_instances as usize),
            ("runtime.guest_threads", self.runtime.guest_threads),
            (
                "http.max_concurrent_requests",
                self.http.max_concurrent_requests,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        for (key, value) in [
            ("http.header_timeout", self.http.header_timeout),
            ("http.request_timeout", self.http.request_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::invalid(key, "must be more than 0"));
            }
        }
        self.validate_log()?;
        if let Some(ratio) = self.telemetry.sample_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            return Err(ConfigError::invalid(
                "telemetry.sample_ratio",
                format!("is {ratio}; it must be from 0 to 1"),
            ));
        }
        self.validate_bus()?;
        for (key, url) in [
            ("telemetry.otlp_endpoint", &self.telemetry.otlp_endpoint),
            ("ingest.public_url", &self.ingest.public_url),
        ] {
            if let Some(url) = url {
                check_http_url(key, url)?;
            }
        }
        if self.plugin_defaults.limits.memory_bytes > self.runtime.max_memory {
            return Err(ConfigError::invalid(
                "plugin_defaults.limits.memory",
                format!(
                    "({} bytes) is above `runtime.max_memory` ({} bytes)",
                    self.plugin_defaults.limits.memory_bytes, self.runtime.max_memory
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_log(&self) -> Result<(), ConfigError> {
        let log = &self.log;
        if log.retention_interval < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "log.retention_interval",
                "must be at least 10ms",
            ));
        }
        if log
            .dead_letter_max_age
            .is_some_and(|age| age < Duration::from_secs(1))
        {
            return Err(ConfigError::invalid(
                "log.dead_letter_max_age",
                "must be at least 1s, or \"forever\"",
            ));
        }
        if log.max_bytes.is_some_and(|bytes| bytes < 1 << 20) {
            return Err(ConfigError::invalid(
                "log.max_bytes",
                "must be at least 1MiB: the log's tables and indexes take some room even \
                 when it holds no events",
            ));
        }
        for (index, rule) in log.retention.iter().enumerate() {
            if let Some(problem) = rule.problem() {
                return Err(ConfigError::invalid(
                    &format!("log.retention[{index}]"),
                    problem,
                ));
            }
        }
        Ok(())
    }

    /// The limits of the NATS event stream: `[log]`'s retention settings mapped by
    /// [`stream_limits`], and `[bus] max_age`/`max_bytes`, which set the same limits (one
    /// or the other may set each). Errors name the key that cannot be honoured.
    pub fn nats_stream_limits(&self) -> Result<StreamLimits, ConfigError> {
        let mut limits = stream_limits(&self.log.retention, self.log.max_bytes)
            .map_err(|e| ConfigError::invalid(&e.key, e.reason))?;
        if let Some(age) = self.bus.max_age {
            if limits.max_age.is_some() || limits.keeps_forever || !limits.per_type.is_empty() {
                return Err(ConfigError::invalid(
                    "bus.max_age",
                    "sets the event stream's age limit, which `[[log.retention]]` sets too: \
                     keep one of them",
                ));
            }
            limits.max_age = Some(age);
        }
        if let Some(bytes) = self.bus.max_bytes {
            if limits.max_bytes.is_some() || limits.keeps_forever {
                return Err(ConfigError::invalid(
                    "bus.max_bytes",
                    "sets the event stream's size limit, which `log.max_bytes` sets too (or a \
                     rule keeps every event forever): keep one of them",
                ));
            }
            limits.max_bytes = Some(bytes);
        }
        Ok(limits)
    }

    fn validate_bus(&self) -> Result<(), ConfigError> {
        let bus = &self.bus;
        let prefix_ok = (1..=32).contains(&bus.prefix.len())
            && bus
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !prefix_ok {
            return Err(ConfigError::invalid(
                "bus.prefix",
                "must be 1 to 32 of A-Z, a-z, 0-9, `_` and `-`",
            ));
        }
        if !(1..=5).contains(&bus.replicas) {
            return Err(ConfigError::invalid("bus.replicas", "must be 1 to 5"));
        }
        if bus.ack_wait < Duration::from_secs(1) {
            return Err(ConfigError::invalid("bus.ack_wait", "must be at least 1s"));
        }
        if bus.duplicate_window < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "bus.duplicate_window",
                "must be at least 1s",
            ));
        }
        if bus.duplicate_window <= bus.ack_wait {
            // A host that dies after storing an event (an emit, a due timer) and before
            // acknowledging the delivery that made it has the delivery taken over after
            // `ack_wait`; the event it stores again must still be known as a copy.
            return Err(ConfigError::invalid(
                "bus.duplicate_window",
                format!(
                    "must be longer than `bus.ack_wait` ({}), or a delivery taken over from a \
                     host that died could store its events twice",
                    humantime::format_duration(bus.ack_wait)
                ),
            ));
        }
        if bus.kind != BusKind::Nats {
            // These size the NATS event stream; the embedded log would ignore them.
            let (key, same) = match (bus.max_age, bus.max_bytes) {
                (Some(_), _) => (
                    "bus.max_age",
                    "a `[[log.retention]]` rule for `types = \">\"`",
                ),
                (None, Some(_)) => ("bus.max_bytes", "`log.max_bytes`"),
                (None, None) => return Ok(()),
            };
            return Err(ConfigError::invalid(
                key,
                format!("limits the NATS event stream; on the embedded log write {same} instead"),
            ));
        }
        {
            self.nats_stream_limits()?;
            let urls: Vec<&str> = bus.url.split(',').map(str::trim).collect();
            if urls.iter().any(|u| u.is_empty()) {
                return Err(ConfigError::invalid(
                    "bus.url",
                    "must list NATS server URLs such as `nats://127.0.0.1:4222`, \
                     separated by commas",
                ));
            }
        }
        Ok(())
    }
}

/// Refuses a value of `key` that is not an absolute `http://` or `https://` URL with a host.
fn check_http_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|error| ConfigError::invalid(key, format!("`{url}` is not a URL: {error}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ConfigError::invalid(
            key,
            format!("`{url}` must be an http:// or https:// URL with a host"),
        ));
    }
    Ok(())
}

fn is_loopback(ip: IpAddr) -> bool {
    // `::ffff:127.0.0.1` is loopback too.
    ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::retry::{Backoff, RetryPolicy};
    use crate::policy::{InstanceMode, Ordering, Start};
    use crate::runtime::{EffectBounds, Isolation, PluginLimits};

    fn syntax_error(text: &str) -> String {
        match Config::parse(text) {
            Err(ConfigError::Syntax(message)) => message,
            other => panic!("expected a syntax error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.data_dir, Path::new("./data"));
        assert_eq!(config.plugins_dir, Path::new("./plugins.d"));
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
        assert!(config.auth.ingest_tokens.is_empty() && config.auth.admin_tokens.is_empty());
        assert_eq!(config.ingest.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(config.ingest.max_event_bytes, 1024 * 1024);
        assert_eq!(config.ingest.max_batch_events, 10_000);
        assert_eq!(config.ingest.max_pending_events, 100_000);
        assert_eq!(config.ingest.retry_after, Duration::from_secs(1));
        assert_eq!(config.log.group_commit_max_events, 4096);
        assert_eq!(config.log.group_commit_max_delay, Duration::ZERO);
        assert_eq!(config.log.synchronous, Synchronous::Full);
        assert_eq!(config.runtime.max_instances, 1000);
        assert_eq!(config.runtime.max_memory, 1 << 30);
        assert_eq!(config.runtime.runtime_config(), RuntimeConfig::default());
        let defaults = &config.plugin_defaults;
        assert_eq!(defaults.concurrency, 4);
        assert_eq!(defaults.ordering, Ordering::None);
        assert_eq!(defaults.start, Start::Latest);
        assert_eq!(defaults.isolation(), Isolation::PerEvent);
        assert_eq!(defaults.max_calls, 10_000);
        assert_eq!(defaults.retry, RetryPolicy::default());
        assert_eq!(defaults.limits, PluginLimits::default());
        assert_eq!(defaults.effects, EffectBounds::default());
        assert!(!config.requires_tokens());
        config.validate().unwrap();
    }

    #[test]
    fn full_file() {
        let config = Config::parse(
            r#"
            listen = "0.0.0.0:9000"
            data_dir = "/var/lib/switchyard"
            plugins_dir = "/etc/switchyard/plugins"
            shutdown_drain = "5s"
            shutdown_grace = "30s"

            [auth]
            ingest_tokens = ["in-1", "in-2"]
            admin_tokens = ["admin"]

            [ingest]
            max_body_bytes = "8MiB"
            max_event_bytes = 65536
            max_batch_events = 500
            max_pending_events = 1000
            retry_after = "2s"
            max_wait = "5s"
            max_waiters = 10
            public_url = "https://events.example.com"

            [log]
            group_commit_max_events = 128
            group_commit_max_delay = "2ms"
            synchronous = "normal"

            [runtime]
            max_instances = 50
            max_memory = "512MiB"
            guest_threads = 3
            compile_cache_max_unused = "7d"
            compile_cache_max_bytes = "100MiB"

            [plugin_defaults]
            concurrency = 16
            ordering = "key"
            start = "earliest"
            instance = "reuse"
            max_calls = 500

            [plugin_defaults.retry]
            max_attempts = 3
            backoff = "constant"
            initial = "1s"
            max = "10s"
            jitter = false
            max_age = "none"

            [plugin_defaults.limits]
            fuel = 1_000_000
            memory = "16MiB"
            timeout = "1s"

            [plugin_defaults.effects]
            max_emits = 5
            max_emit_bytes = "64KiB"
            max_kv_writes = 10
            max_kv_key_bytes = 128
            max_kv_value_bytes = "4KiB"
            "#,
        )
        .unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.data_dir, Path::new("/var/lib/switchyard"));
        assert_eq!(config.plugins_dir, Path::new("/etc/switchyard/plugins"));
        assert_eq!(config.shutdown_drain, Duration::from_secs(5));
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));
        assert_eq!(config.auth.ingest_tokens, ["in-1", "in-2"]);
        assert_eq!(config.auth.admin_tokens, ["admin"]);
        assert_eq!(
            config.ingest,
            IngestSection {
                max_body_bytes: 8 << 20,
                max_event_bytes: 65536,
                max_batch_events: 500,
                max_pending_events: 1000,
                retry_after: Duration::from_secs(2),
                max_wait: Duration::from_secs(5),
                max_waiters: 10,
                public_url: Some("https://events.example.com".into()),
            }
        );
        assert_eq!(
            config.log,
            LogSection {
                group_commit_max_events: 128,
                group_commit_max_delay: Duration::from_millis(2),
                synchronous: Synchronous::Normal,
                ..LogSection::default()
            }
        );
        assert_eq!(
            config.runtime.runtime_config(),
            RuntimeConfig {
                max_instances: 50,
                max_memory_bytes: 512 << 20,
                compile_cache: None,
                compile_cache_limits: CacheLimits {
                    max_unused: Some(Duration::from_secs(7 * 86_400)),
                    max_bytes: Some(100 << 20),
                },
                compiler: None,
                guest_threads: 3,
            }
        );
        assert_eq!(
            config.plugin_defaults,
            PluginDefaults {
                concurrency: 16,
                ordering: Ordering::Key,
                start: Start::Earliest,
                instance: InstanceMode::Reuse,
                max_calls: 500,
                retry: RetryPolicy {
                    max_attempts: 3,
                    backoff: Backoff::Constant,
                    initial: Duration::from_secs(1),
                    max: Duration::from_secs(10),
                    jitter: false,
                    max_age: None,
                },
                limits: PluginLimits {
                    fuel: 1_000_000,
                    memory_bytes: 16 << 20,
                    timeout: Duration::from_secs(1),
                },
                effects: EffectBounds {
                    max_emits: 5,
                    max_emit_bytes: 64 << 10,
                    max_kv_writes: 10,
                    max_kv_key_bytes: 128,
                    max_kv_value_bytes: 4 << 10,
                    max_kv_bytes: 16 << 20,
                    max_causation_depth: 16,
                },
            }
        );
        assert_eq!(
            config.plugin_defaults.isolation(),
            Isolation::Reuse { max_calls: 500 }
        );
        assert!(config.requires_tokens());
    }

    #[test]
    fn partial_plugin_defaults_keep_the_other_defaults() {
        let config = Config::parse("[plugin_defaults.retry]\nmax_attempts = 2").unwrap();
        assert_eq!(
            config.plugin_defaults,
            PluginDefaults {
                retry: RetryPolicy {
                    max_attempts: 2,
                    ..RetryPolicy::default()
                },
                ..PluginDefaults::default()
            }
        );
    }

    #[test]
    fn sidecars_resolve_over_the_configured_defaults() {
        use crate::plugins::manifest::Manifest;
        let config = Config::parse(
            "[plugin_defaults]\nconcurrency = 12\n[plugin_defaults.limits]\nfuel = 99",
        )
        .unwrap();
        let policy = Manifest::parse("[limits]\ntimeout = \"1s\"")
            .unwrap()
            .resolve(&config.plugin_defaults)
            .unwrap();
        assert_eq!(policy.concurrency, 12);
        assert_eq!(policy.settings.limits.fuel, 99);
        assert_eq!(policy.settings.limits.timeout, Duration::from_secs(1));
    }

    #[test]
    fn unknown_keys_are_named_at_every_level() {
        for (text, key) in [
            ("lisen = \"127.0.0.1:1\"", "lisen"),
            ("[auth]\ningest_token = []", "ingest_token"),
            ("[ingest]\nmax_body = 1", "max_body"),
            ("[log]\nsync = \"full\"", "sync"),
            ("[runtime]\nmax_instance = 1", "max_instance"),
            ("[plugin_defaults]\nsubscribe = [\"a\"]", "subscribe"),
            ("[plugin_defaults.retry]\nattempts = 1", "attempts"),
            ("[plugin_defaults.limits]\nmem = 1", "mem"),
            ("[plugin_defaults.effects]\nemits = 1", "emits"),
            ("[plugin_defaults.config]\na = 1", "config"),
            ("[metrics]\nenabled = true", "metrics"),
        ] {
            let message = syntax_error(text);
            assert!(message.contains(&format!("`{key}`")), "{text:?}: {message}");
            assert!(message.contains("unknown field"), "{text:?}: {message}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, needle) in [
            ("shutdown_grace = \"10\"", "invalid duration `10`"),
            ("shutdown_grace = 10", "a duration string"),
            (
                "[ingest]\nretry_after = \"1 fortnight\"",
                "invalid duration",
            ),
            (
                "[log]\ngroup_commit_max_delay = \"-1ms\"",
                "invalid duration",
            ),
            ("[ingest]\nmax_body_bytes = \"4 MiBs\"", "unknown unit"),
            ("[ingest]\nmax_event_bytes = \"1.5MiB\"", "fractions"),
            ("[runtime]\nmax_memory = -1", "a number of bytes"),
            ("[log]\nsynchronous = \"off\"", "off"),
            ("listen = \"localhost\"", "listen"),
            ("[plugin_defaults.retry]\nbackoff = \"random\"", "random"),
        ] {
            let message = syntax_error(text);
            assert!(message.contains(needle), "{text:?}: {message}");
            assert!(
                message.contains("line"),
                "{text:?} should name the line: {message}"
            );
        }
    }

    #[test]
    fn invalid_plugin_defaults_name_the_key() {
        for (text, key) in [
            (
                "[plugin_defaults]\nconcurrency = 0",
                "`plugin_defaults.concurrency`",
            ),
            (
                "[plugin_defaults.retry]\nmax_attempts = 0",
                "`plugin_defaults.retry.max_attempts`",
            ),
            (
                "[plugin_defaults.retry]\ninitial = \"2m\"",
                "`plugin_defaults.retry.initial`",
            ),
            (
                "[plugin_defaults.limits]\ntimeout = \"0s\"",
                "`plugin_defaults.limits.timeout`",
            ),
        ] {
            let message = syntax_error(text);
            assert!(message.contains(key), "{text:?}: {message}");
        }
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (text, key) in [
            ("[ingest]\nmax_batch_events = 0", "ingest.max_batch_events"),
            (
                "[ingest]\nmax_pending_events = 0",
                "ingest.max_pending_events",
            ),
            (
                "[log]\ngroup_commit_max_events = 0",
                "log.group_commit_max_events",
            ),
            ("[runtime]\nmax_instances = 0", "runtime.max_instances"),
            ("[runtime]\nguest_threads = 0", "runtime.guest_threads"),
            (
                "[runtime]\nmax_memory = \"32MiB\"",
                "plugin_defaults.limits.memory",
            ),
            ("[auth]\ningest_tokens = [\"\"]", "auth.ingest_tokens"),
            ("[auth]\nadmin_tokens = [\"a b\"]", "auth.admin_tokens"),
            (
                "[http]\nmax_concurrent_requests = 0",
                "http.max_concurrent_requests",
            ),
            ("[http]\nheader_timeout = \"0s\"", "http.header_timeout"),
            ("[http]\nrequest_timeout = \"0ms\"", "http.request_timeout"),
            (
                "[telemetry]\notlp_endpoint = \"localhost:4318\"",
                "telemetry.otlp_endpoint",
            ),
            (
                "[telemetry]\notlp_endpoint = \"http//collector:4318/v1/traces\"",
                "telemetry.otlp_endpoint",
            ),
            (
                "[ingest]\npublic_url = \"events.example.com\"",
                "ingest.public_url",
            ),
            (
                "[ingest]\npublic_url = \"ftp://events.example.com\"",
                "ingest.public_url",
            ),
        ] {
            match Config::parse(text) {
                Err(ConfigError::Invalid { key: found, .. }) => assert_eq!(found, key, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn non_loopback_listen_needs_both_token_lists() {
        for listen in [
            "0.0.0.0:8080",
            "10.1.2.3:80",
            "[::]:8080",
            "[2001:db8::1]:80",
        ] {
            let bare = format!("listen = \"{listen}\"");
            let error = Config::parse(&bare).unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(&error, ConfigError::Invalid { key, .. } if key == "auth.ingest_tokens"),
                "{listen}: {message}"
            );
            assert!(
                message.contains("ingest_tokens") && message.contains("admin_tokens"),
                "{message}"
            );
            assert!(message.contains(listen), "{message}");

            let only_ingest = format!("{bare}\n[auth]\ningest_tokens = [\"t\"]");
            assert!(
                matches!(Config::parse(&only_ingest), Err(ConfigError::Invalid { key, .. }) if key == "auth.admin_tokens")
            );
            let only_admin = format!("{bare}\n[auth]\nadmin_tokens = [\"t\"]");
            assert!(
                matches!(Config::parse(&only_admin), Err(ConfigError::Invalid { key, .. }) if key == "auth.ingest_tokens")
            );

            let both = format!("{bare}\n[auth]\ningest_tokens = [\"i\"]\nadmin_tokens = [\"a\"]");
            let config = Config::parse(&both).unwrap();
            assert!(config.requires_tokens());
        }
    }

    #[test]
    fn loopback_listen_needs_no_tokens() {
        for listen in [
            "127.0.0.1:8080",
            "127.9.9.9:1",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
        ] {
            let config = Config::parse(&format!("listen = \"{listen}\"")).unwrap();
            assert!(!config.requires_tokens(), "{listen}");
        }
    }

    #[test]
    fn validate_rechecks_a_changed_config() {
        let mut config = Config {
            listen: "0.0.0.0:8080".parse().unwrap(),
            ..Config::default()
        };
        assert!(config.validate().is_err());
        config.auth.ingest_tokens = vec!["i".into()];
        config.auth.admin_tokens = vec!["a".into()];
        config.validate().unwrap();
    }

    #[test]
    fn tokens_are_not_printed() {
        let config = Config::parse("[auth]\ningest_tokens = [\"s3cret\"]").unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("<1 redacted>"), "{debug}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchyard.toml");

        let missing = Config::load(&path).unwrap_err().to_string();
        assert!(missing.contains("switchyard.toml"), "{missing}");

        std::fs::write(&path, "[log]\nsynchronus = \"full\"\n").unwrap();
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(message.contains("switchyard.toml"), "{message}");
        assert!(message.contains("`synchronus`"), "{message}");
        assert!(message.contains("line 2"), "{message}");

        std::fs::write(&path, "listen = \"0.0.0.0:1\"").unwrap();
        let message = Config::load(&path).unwrap_err().to_string();
        assert!(
            message.contains("switchyard.toml") && message.contains("auth"),
            "{message}"
        );

        std::fs::write(&path, "shutdown_grace = \"1m\"").unwrap();
        assert_eq!(
            Config::load(&path).unwrap().shutdown_grace,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn the_bus_section_selects_nats_and_refuses_unusable_values() {
        let config = Config::parse(
            "[bus]\nkind = \"nats\"\nurl = \"nats://10.0.0.1:4222,nats://10.0.0.2:4222\"\n\
             prefix = \"shop-a\"\nreplicas = 3\nmax_age = \"7d\"\nmax_bytes = \"1GiB\"\n\
             duplicate_window = \"2m\"\nack_wait = \"10s\"\n",
        )
        .unwrap();
        assert_eq!(config.bus.kind, BusKind::Nats);
        assert_eq!(config.bus.replicas, 3);
        assert_eq!(config.bus.max_age, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(config.bus.max_bytes, Some(1 << 30));
        assert_eq!(config.bus.ack_wait, Duration::from_secs(10));
        assert_eq!(Config::default().bus.kind, BusKind::Embedded);

        for (text, key) in [
            ("[bus]\nprefix = \"a.b\"\n", "`bus.prefix`"),
            ("[bus]\nprefix = \"\"\n", "`bus.prefix`"),
            ("[bus]\nreplicas = 0\n", "`bus.replicas`"),
            ("[bus]\nreplicas = 7\n", "`bus.replicas`"),
            ("[bus]\nack_wait = \"10ms\"\n", "`bus.ack_wait`"),
            (
                "[bus]\nduplicate_window = \"20s\"\n",
                "must be longer than `bus.ack_wait` (30s)",
            ),
            (
                "[bus]\nkind = \"nats\"\nurl = \"nats://a:1,\"\n",
                "`bus.url`",
            ),
            // The NATS stream's limits would do nothing on the embedded log.
            ("[bus]\nmax_age = \"7d\"\n", "`bus.max_age`"),
            ("[bus]\nmax_bytes = \"1GiB\"\n", "`log.max_bytes`"),
        ] {
            let message = Config::parse(text).unwrap_err().to_string();
            assert!(message.contains(key), "{text}: {message}");
        }
        let message = Config::parse("[bus]\nkind = \"kafka\"\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("kafka"), "{message}");
    }

    #[test]
    fn the_log_section_takes_retention_rules_and_refuses_unusable_ones() {
        use crate::retention::Keep;
        let config = Config::parse(
            "[log]\nmax_bytes = \"2GiB\"\nretention_interval = \"250ms\"\n\
             absent_plugin_hold = \"7d\"\ndead_letter_max_age = \"30d\"\n\
             [[log.retention]]\ntypes = [\"account.>\", \"order.>\"]\nmax_age = \"forever\"\n\
             [[log.retention]]\ntypes = \">\"\nmax_age = \"7d\"\ndelete_dead_lettered = true\n",
        )
        .unwrap();
        let log = &config.log;
        assert_eq!(log.max_bytes, Some(2 << 30));
        assert_eq!(log.retention_interval, Duration::from_millis(250));
        assert_eq!(
            log.absent_plugin_hold,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            log.dead_letter_max_age,
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(log.retention.len(), 2);
        assert_eq!(log.retention[0].max_age, Keep::Forever);
        assert_eq!(
            log.retention[1].max_age,
            Keep::For(Duration::from_secs(7 * 86_400))
        );
        assert!(log.retention[1].delete_dead_lettered);
        let defaults = Config::default().log;
        assert_eq!(defaults.max_bytes, None);
        assert_eq!(defaults.absent_plugin_hold, None);
        assert_eq!(defaults.dead_letter_max_age, None);
        assert!(defaults.retention.is_empty());
        let forever = Config::parse("[log]\nabsent_plugin_hold = \"forever\"\n").unwrap();
        assert_eq!(forever.log.absent_plugin_hold, None);

        for (text, needle) in [
            (
                "[[log.retention]]\ntypes = \">\"\nmaxage = \"1d\"\n",
                "unknown field `maxage`",
            ),
            (
                "[[log.retention]]\ntypes = \"a.>.b\"\n",
                "invalid type pattern `a.>.b`",
            ),
            (
                "[[log.retention]]\ntypes = \">\"\nmax_age = \"a week\"\n",
                "invalid duration",
            ),
            (
                "[[log.retention]]\nmax_age = \"1d\"\n",
                "missing field `types`",
            ),
            ("[log]\nmax_bytes = \"lots\"\n", "invalid size"),
        ] {
            let message = syntax_error(text);
            assert!(message.contains(needle), "{text:?}: {message}");
            assert!(message.contains("line"), "{text:?}: {message}");
        }
        for (text, key) in [
            ("[log]\nmax_bytes = 1000\n", "log.max_bytes"),
            (
                "[log]\ndead_letter_max_age = \"0s\"\n",
                "log.dead_letter_max_age",
            ),
            (
                "[log]\nretention_interval = \"1ms\"\n",
                "log.retention_interval",
            ),
            (
                "[[log.retention]]\ntypes = \">\"\nmax_age = \"1d\"\n\
                 [[log.retention]]\ntypes = \"a.>\"\nmax_age = \"forever\"\n\
                 delete_unsettled = true\n",
                "log.retention[1]",
            ),
        ] {
            match Config::parse(text) {
                Err(ConfigError::Invalid { key: found, .. }) => assert_eq!(found, key, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn on_nats_retention_maps_onto_the_event_stream_or_is_refused() {
        let nats = "[bus]\nkind = \"nats\"\n";
        let config = Config::parse(&format!(
            "{nats}[log]\nmax_bytes = \"1GiB\"\n[[log.retention]]\ntypes = \">\"\nmax_age = \"3d\"\n"
        ))
        .unwrap();
        let limits = config.nats_stream_limits().unwrap();
        assert_eq!(limits.max_age, Some(Duration::from_secs(3 * 86_400)));
        assert_eq!(limits.max_bytes, Some(1 << 30));
        assert!(!limits.warnings.is_empty());

        let legacy = Config::parse(&format!("{nats}max_age = \"1d\"\n")).unwrap();
        let limits = legacy.nats_stream_limits().unwrap();
        assert_eq!(limits.max_age, Some(Duration::from_secs(86_400)));
        assert!(limits.warnings.is_empty());

        // Rules that differ by type become each event's time to live.
        let per_type = Config::parse(&format!(
            "{nats}[[log.retention]]\ntypes = \"order.>\"\nmax_age = \"forever\"\n\
             [[log.retention]]\ntypes = \">\"\nmax_age = \"1d\"\n"
        ))
        .unwrap()
        .nats_stream_limits()
        .unwrap();
        assert_eq!(per_type.max_age, Some(Duration::from_secs(86_400)));
        assert_eq!(per_type.per_type.len(), 2);

        for (text, key) in [
            (
                "[log]\nmax_bytes = \"1GiB\"\n[[log.retention]]\ntypes = \"order.>\"\n\
                 max_age = \"forever\"\n[[log.retention]]\ntypes = \">\"\nmax_age = \"1d\"\n",
                "log.max_bytes",
            ),
            (
                "max_age = \"1d\"\n[[log.retention]]\ntypes = \"order.>\"\nmax_age = \"2d\"\n",
                "bus.max_age",
            ),
            (
                "max_age = \"1d\"\n[[log.retention]]\ntypes = \">\"\nmax_age = \"2d\"\n",
                "bus.max_age",
            ),
            (
                "max_bytes = \"1GiB\"\n[log]\nmax_bytes = \"2GiB\"\n",
                "bus.max_bytes",
            ),
        ] {
            match Config::parse(&format!("{nats}{text}")) {
                Err(ConfigError::Invalid { key: found, reason }) => {
                    assert_eq!(found, key, "{text:?}: {reason}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        // The embedded log takes per-type rules.
        Config::parse("[[log.retention]]\ntypes = \"order.>\"\nmax_age = \"forever\"\n").unwrap();
    }
}
