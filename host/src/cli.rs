//! The `switchyard` command line: argument parsing and the commands that run locally.
//!
//! Commands print results on stdout and errors on stderr, and exit non-zero on failure.

mod scaffold;
mod status;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::config::{Config, TelemetrySection};
use crate::effects::Effects;
use crate::event::{self, Event};
use crate::failure::FailureKind;
use crate::kv::MemoryKv;
use crate::policy::PluginDefaults;
use crate::runtime::{Delivery, Failure, Plugin, Runtime, RuntimeConfig};
use crate::telemetry::LogFormat;

/// Switchyard: a host for event handlers written as WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
pub struct Cli {
    /// How log lines on standard error are written.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Where `serve` sends traces: its config's `[telemetry]` (defaults for the other
    /// commands, and for a config that does not load, whose error `run` reports).
    pub fn telemetry(&self) -> TelemetrySection {
        match &self.command {
            Command::Serve {
                config: Some(path), ..
            } => Config::load(path)
                .map(|config| config.telemetry)
                .unwrap_or_default(),
            _ => TelemetrySection::default(),
        }
    }
}

/// Where the client commands find a running host.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Base URL of the host.
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Bearer token (ingest token for `send`, admin token otherwise).
    #[arg(long, global = true, env = "SWITCHYARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ClientArgs {
    /// A request to the host at `path`, with the bearer token if one is set, and its URL.
    fn request(&self, method: reqwest::Method, path: &str) -> (String, reqwest::RequestBuilder) {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut builder = reqwest::Client::new().request(method, &url);
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        (url, builder)
    }
}

/// Dead-letter subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        /// Only this plugin's.
        #[arg(long)]
        plugin: Option<String>,
        /// Only those dead-lettered for this reason: rejected, exhausted, expired,
        /// effects, loop or schema.
        #[arg(long)]
        reason: Option<String>,
        /// At most this many (up to 1,000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only those after this id: the `next_after` of the page before.
        #[arg(long)]
        after: Option<u64>,
    },
    /// Show one dead letter with its event and every attempt's error.
    Show {
        /// The dead letter's id.
        id: u64,
    },
    /// Replay one dead letter, or every dead letter of a plugin.
    Replay(DeadLetterTarget),
    /// Delete one dead letter, or every dead letter of a plugin.
    Delete(DeadLetterTarget),
}

/// `&key=value` for each pair with a value.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    pairs
        .iter()
        .filter_map(|(key, value)| value.as_ref().map(|value| format!("&{key}={value}")))
        .collect()
}

/// The dead letters `dlq replay` and `dlq delete` take.
#[derive(Debug, clap::Args)]
pub struct DeadLetterTarget {
    /// The dead letter's id.
    #[arg(conflicts_with = "plugin", required_unless_present = "plugin")]
    id: Option<u64>,
    /// All of this plugin's dead letters.
    #[arg(long)]
    plugin: Option<String>,
    /// With `--plugin`: only those dead-lettered for this reason.
    #[arg(long, requires = "plugin")]
    reason: Option<String>,
}

impl DeadLetterTarget {
    /// The route of one dead letter (`/v1/dlq/ID` and what follows), or the query of a
    /// plugin's (`?plugin=…`) after `many`.
    fn path(self, one: &str, many: &str) -> String {
        match self.id {
            Some(id) => format!("/v1/dlq/{id}{one}"),
            None => format!(
                "{many}?plugin={}{}",
                self.plugin.unwrap_or_default(),
                query(&[("reason", self.reason)])
            ),
        }
    }
}

/// `switchyard plugins pause|resume …`.
#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// Stop a plugin's deliveries on every host until it is resumed; its events wait in
    /// the log.
    Pause {
        /// The plugin's name.
        name: String,
        /// Why, shown in its status and the log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let a paused plugin's deliveries run again; also closes an open circuit breaker.
    Resume {
        /// The plugin's name.
        name: String,
    },
}

/// `switchyard schema …`.
#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Register a JSON Schema (draft 2020-12) as the next version of an event type's.
    Put {
        /// The event type.
        #[arg(value_name = "TYPE")]
        ty: String,
        /// The schema file (`-` reads standard input).
        file: PathBuf,
        /// Register even if recent events of the type fail it.
        #[arg(long)]
        force: bool,
    },
    /// Show an event type's schema: its versions and latest document, or one version.
    Get {
        /// The event type.
        #[arg(value_name = "TYPE")]
        ty: String,
        /// One version's document.
        version: Option<u32>,
    },
    /// List the event types that have a schema.
    List,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host: ingest over HTTP, the bus (the embedded log or NATS JetStream), and
    /// the plugins of the plugin directory.
    Serve {
        /// The config file; defaults apply when it is absent.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Listen address, overriding the config (`127.0.0.1:0` picks a free port).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Plugin directory, overriding the config.
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// Data directory, overriding the config.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Run on NATS JetStream at these server URLs (`nats://HOST:PORT`, comma-separated)
        /// instead of the config's `[bus]`.
        #[arg(long, value_name = "NATS_URL")]
        bus: Option<String>,
    },
    /// Send an event with JSON data to a running host.
    Send {
        /// The event type, such as `payment.completed`.
        #[arg(value_name = "TYPE")]
        ty: String,
        /// The event data, as JSON.
        #[arg(long, default_value = "{}")]
        data: String,
        /// The event id (default: a new UUIDv7); resending the same id is deduplicated.
        #[arg(long)]
        id: Option<String>,
        /// The event source.
        #[arg(long)]
        source: Option<String>,
        /// The event subject.
        #[arg(long)]
        subject: Option<String>,
        /// Wait up to this long (`5s`, `250ms`) for the outcome of every plugin
        /// subscribed to the event, and print them.
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
        /// Schedule the event this long from now (`15m`) instead of appending it now.
        #[arg(long, value_name = "DURATION", conflicts_with = "wait")]
        delay: Option<String>,
        /// Append only if the subject's stream is at this version (`0`: new stream).
        #[arg(long, value_name = "VERSION", requires = "subject")]
        expected_version: Option<u64>,
        /// Where the host is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Register, show and list the JSON Schemas events are checked against.
    Schema {
        /// What to do.
        #[command(subcommand)]
        command: SchemaCommand,
        /// Where the host is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show the plugins of a running host, or one of them; pause and resume one.
    #[command(args_conflicts_with_subcommands = true)]
    Plugins {
        /// Pause or resume.
        #[command(subcommand)]
        command: Option<PluginsCommand>,
        /// One plugin's name.
        name: Option<String>,
        /// Where the host is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One table of a running host's plugins: state, version, lag, the last minute's
    /// rates, breaker, retries waiting and dead letters.
    Status {
        /// Where the host is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Inspect, replay and delete dead letters of a running host.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        command: DlqCommand,
        /// Where the host is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Save a consistent copy of a running host's embedded log to a file, taken while it
    /// serves and checked before it is kept.
    Backup {
        /// The file to write; refused if it exists.
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Where the host is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Put a backup in place of a data directory's embedded log; no host may be serving
    /// that directory. Start `switchyard serve` on it afterwards.
    Restore {
        /// The backup file (from `switchyard backup`).
        file: PathBuf,
        /// The host's config file, for its `data_dir`.
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// The data directory, overriding the config (default `./data`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Replace a log that is already there; it is kept beside it, renamed.
        #[arg(long)]
        replace: bool,
    },
    /// Create a plugin project that builds with one command: a handler, a README, and
    /// for Python and JavaScript the SDK and the contract's WIT.
    New {
        /// The plugin's name: lowercase letters, digits and dashes.
        name: String,
        /// The language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: scaffold::Lang,
        /// Where to create the project folder (default: the current folder).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The Rust SDK crate (`plugin-sdk`) a Rust project depends on; found beside this
        /// binary when it was built in a checkout.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Compile a plugin for a host's engine into OUT (run by the host itself, in a child
    /// process, so that the compiler's memory is not kept by the host).
    #[command(hide = true)]
    CompilePlugin {
        /// The host's `[runtime] max_instances`.
        #[arg(long)]
        max_instances: u32,
        /// The host's `[runtime] max_memory`, in bytes.
        #[arg(long)]
        max_memory_bytes: u64,
        /// The component.
        input: PathBuf,
        /// Where to write the compiled code.
        out: PathBuf,
    },
    /// Validate plugin files and print each one's name, version, subscriptions and
    /// imports.
    Check {
        /// Plugin files (`.wasm` components).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run one event through a plugin file and print the outcome as JSON; nothing is
    /// stored, and KV holds only what `--kv` and `--kv-file` put there.
    Invoke {
        /// The plugin file.
        file: PathBuf,
        /// The event type.
        #[arg(long = "type")]
        ty: String,
        /// The event data, as JSON, or `@FILE` to read it from a file.
        #[arg(long, default_value = "{}")]
        data: String,
        /// The event's subject.
        #[arg(long)]
        subject: Option<String>,
        /// A KV value the plugin finds, as `KEY=VALUE` (the value stored as UTF-8 text);
        /// may be given several times.
        #[arg(long = "kv", value_name = "KEY=VALUE")]
        kv: Vec<String>,
        /// KV values the plugin finds, from a JSON object: a string is stored as its
        /// text, any other value as its JSON.
        #[arg(long, value_name = "FILE")]
        kv_file: Option<PathBuf>,
        /// Attempt number to report to the handler.
        #[arg(long, default_value_t = 1)]
        attempt: u32,
        /// The call's fuel budget (default: the host's default, 1,000,000,000).
        #[arg(long)]
        fuel: Option<u64>,
    },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            plugins,
            data,
            bus,
        } => {
            let mut config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::default(),
            };
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(plugins) = plugins {
                config.plugins_dir = plugins;
            }
            if let Some(data) = data {
                config.data_dir = data;
            }
            if let Some(url) = bus {
                config.bus.kind = crate::config::BusKind::Nats;
                config.bus.url = url;
            }
            crate::server::serve(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Send {
            ty,
            data,
            id,
            source,
            subject,
            wait,
            delay,
            expected_version,
            client,
        } => {
            let attributes = SendAttributes {
                id,
                source,
                subject,
                wait,
                delay,
                expected_version,
            };
            send(&client, &ty, &data, attributes).await
        }
        Command::Schema { command, client } => schema(&client, command).await,
        Command::Plugins {
            command: Some(PluginsCommand::Pause { name, reason }),
            client,
            ..
        } => {
            let body = serde_json::to_vec(&serde_json::json!({ "reason": reason }))?;
            let headers = vec![("content-type", "application/json".to_owned())];
            request(
                &client,
                reqwest::Method::POST,
                &format!("/v1/plugins/{name}/pause"),
                Some((headers, body)),
            )
            .await
        }
        Command::Plugins {
            command: Some(PluginsCommand::Resume { name }),
            client,
            ..
        } => {
            let path = format!("/v1/plugins/{name}/resume");
            request(&client, reqwest::Method::POST, &path, None).await
        }
        Command::Plugins {
            command: None,
            name,
            client,
        } => {
            let path = match name {
                Some(name) => format!("/v1/plugins/{name}"),
                None => "/v1/plugins".to_owned(),
            };
            request(&client, reqwest::Method::GET, &path, None).await
        }
        Command::Dlq { command, client } => {
            let (method, path) = match command {
                DlqCommand::List {
                    plugin,
                    reason,
                    limit,
                    after,
                } => (
                    reqwest::Method::GET,
                    format!(
                        "/v1/dlq?limit={limit}{}",
                        query(&[
                            ("plugin", plugin),
                            ("reason", reason),
                            ("after", after.map(|id| id.to_string())),
                        ])
                    ),
                ),
                DlqCommand::Show { id } => (reqwest::Method::GET, format!("/v1/dlq/{id}")),
                DlqCommand::Replay(target) => (
                    reqwest::Method::POST,
                    target.path("/replay", "/v1/dlq/replay"),
                ),
                DlqCommand::Delete(target) => (reqwest::Method::DELETE, target.path("", "/v1/dlq")),
            };
            request(&client, method, &path, None).await
        }
        Command::Status { client } => status::status(&client).await,
        Command::Backup { output, client } => backup(&client, &output).await,
        Command::Restore {
            file,
            config,
            data,
            replace,
        } => {
            let data = match (data, config) {
                (Some(data), _) => data,
                (None, Some(path)) => Config::load(&path)?.data_dir,
                (None, None) => Config::default().data_dir,
            };
            let log = data.join(crate::server::DATABASE_FILE);
            let (summary, kept) = tokio::task::spawn_blocking(move || {
                crate::bus::sqlite::restore_backup(&file, &log, replace)
            })
            .await
            .context("restoring")?
            .map_err(in_words)?;
            if let Some(kept) = kept {
                println!("the log that was there is kept as {}", kept.display());
            }
            println!(
                "restored {} events (last sequence {}) into {}; start `switchyard serve --data {}`",
                summary.events,
                summary.last_sequence,
                data.display(),
                data.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::New {
            name,
            lang,
            dir,
            sdk,
        } => {
            let project = scaffold::create(&dir, &name, lang, sdk.as_deref())?;
            println!(
                "created {}; its README.md has the build command",
                project.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::CompilePlugin {
            max_instances,
            max_memory_bytes,
            input,
            out,
        } => {
            let config = RuntimeConfig {
                max_instances,
                max_memory_bytes,
                ..RuntimeConfig::default()
            };
            Runtime::compile_file(&config, &input, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { files } => check(&files).await,
        Command::Invoke {
            file,
            ty,
            data,
            subject,
            kv,
            kv_file,
            attempt,
            fuel,
        } => {
            let store = seeded_kv(&kv, kv_file.as_deref())?;
            let event = Invocation {
                ty,
                data: &data,
                subject,
                attempt,
            };
            invoke(&file, event, store, fuel).await
        }
    }
}

/// Headers and bytes of a request body.
type RequestBody<'a> = (Vec<(&'a str, String)>, Vec<u8>);

/// Sends one request to a running host and prints the answer: JSON pretty-printed on
/// success, the API error's message on failure.
async fn request(
    client: &ClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<RequestBody<'_>>,
) -> anyhow::Result<ExitCode> {
    let (url, mut builder) = client.request(method, path);
    if let Some((headers, bytes)) = body {
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        builder = builder.body(bytes);
    }
    let response = builder
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let json: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    if status.is_success() {
        match json {
            Some(json) => println!("{}", serde_json::to_string_pretty(&json)?),
            None if text.is_empty() => println!("{status}"),
            None => println!("{text}"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    api_error(status, &text)
}

/// Prints an API error answer: its message, and its details when it has any.
fn api_error(status: reqwest::StatusCode, text: &str) -> anyhow::Result<ExitCode> {
    let json: Option<serde_json::Value> = serde_json::from_str(text).ok();
    let message = json
        .as_ref()
        .and_then(|j| j["error"]["message"].as_str())
        .map_or_else(|| text.to_owned(), str::to_owned);
    eprintln!("error: {status}: {message}");
    if let Some(details) = json
        .as_ref()
        .map(|j| &j["error"]["details"])
        .filter(|d| !d.is_null())
    {
        eprintln!("{}", serde_json::to_string_pretty(details)?);
    }
    Ok(ExitCode::FAILURE)
}

/// A storage error of the log as its message alone: the commands that handle log files
/// say what is wrong with the file in words of their own.
fn in_words(error: crate::bus::BusError) -> anyhow::Error {
    match error {
        crate::bus::BusError::Storage(message) => anyhow::anyhow!(message),
        other => other.into(),
    }
}

/// `switchyard backup`: fetches a copy of the host's log into `OUTPUT.partial`, checks
/// it is a whole log, then renames it to `output`, so a file at `output` is always whole.
async fn backup(client: &ClientArgs, output: &Path) -> anyhow::Result<ExitCode> {
    use tokio::io::AsyncWriteExt as _;

    if output.exists() {
        anyhow::bail!("{} already exists; choose another file", output.display());
    }
    let (url, builder) = client.request(reqwest::Method::GET, "/v1/backup");
    let mut response = builder
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return api_error(status, &text);
    }
    let mut name = output.as_os_str().to_owned();
    name.push(".partial");
    let partial = PathBuf::from(name);
    let received = async {
        let mut file = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("cannot create {}", partial.display()))?;
        while let Some(chunk) = response.chunk().await.context("receiving the backup")? {
            file.write_all(&chunk)
                .await
                .with_context(|| format!("cannot write {}", partial.display()))?;
        }
        file.sync_all()
            .await
            .with_context(|| format!("cannot write {}", partial.display()))?;
        let checked = partial.clone();
        tokio::task::spawn_blocking(move || crate::bus::sqlite::inspect_backup(&checked))
            .await
            .context("checking the backup")?
            .map_err(in_words)
    }
    .await;
    let summary = match received {
        Ok(summary) => summary,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    std::fs::rename(&partial, output).with_context(|| {
        format!(
            "cannot rename {} to {}",
            partial.display(),
            output.display()
        )
    })?;
    // The rename is durable only once its directory is: "backed up" must survive a power cut.
    let directory = match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(directory)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("cannot flush {}", directory.display()))?;
    println!(
        "backed up {} events (last sequence {}), {} bytes, to {}",
        summary.events,
        summary.last_sequence,
        summary.bytes,
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// What `switchyard send` sets besides the type and data.
struct SendAttributes {
    id: Option<String>,
    source: Option<String>,
    subject: Option<String>,
    wait: Option<String>,
    delay: Option<String>,
    expected_version: Option<u64>,
}

async fn send(
    client: &ClientArgs,
    ty: &str,
    data: &str,
    attributes: SendAttributes,
) -> anyhow::Result<ExitCode> {
    let json: serde_json::Value = serde_json::from_str(data).context("--data is not valid JSON")?;
    let mut headers = vec![("content-type", "application/json".to_owned())];
    for (name, value) in [
        ("ce-id", attributes.id),
        ("ce-source", attributes.source),
        ("ce-subject", attributes.subject),
        (
            "ce-expectedversion",
            attributes.expected_version.map(|v| v.to_string()),
        ),
    ] {
        if let Some(value) = value {
            headers.push((name, value));
        }
    }
    let query = match (attributes.wait, attributes.delay) {
        (Some(wait), _) => format!("?wait={wait}"),
        (None, Some(delay)) => format!("?delay={delay}"),
        (None, None) => String::new(),
    };
    request(
        client,
        reqwest::Method::POST,
        &format!("/v1/events/{ty}{query}"),
        Some((headers, serde_json::to_vec(&json)?)),
    )
    .await
}

async fn schema(client: &ClientArgs, command: SchemaCommand) -> anyhow::Result<ExitCode> {
    match command {
        SchemaCommand::Put { ty, file, force } => {
            let text = if file.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .context("reading the schema from standard input")?;
                text
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let query = if force { "?force=true" } else { "" };
            let headers = vec![("content-type", "application/schema+json".to_owned())];
            request(
                client,
                reqwest::Method::PUT,
                &format!("/v1/schemas/{ty}{query}"),
                Some((headers, text.into_bytes())),
            )
            .await
        }
        SchemaCommand::Get { ty, version } => {
            let path = match version {
                Some(version) => format!("/v1/schemas/{ty}/{version}"),
                None => format!("/v1/schemas/{ty}"),
            };
            request(client, reqwest::Method::GET, &path, None).await
        }
        SchemaCommand::List => request(client, reqwest::Method::GET, "/v1/schemas", None).await,
    }
}

/// The runtime of the one-shot commands (`check`, `invoke`): it shares a compile cache
/// across runs, so a plugin compiled once is checked again in a fraction of a second.
fn runtime() -> anyhow::Result<Runtime> {
    Runtime::new(RuntimeConfig {
        compile_cache: user_compile_cache(),
        ..RuntimeConfig::default()
    })
    .context("starting the WebAssembly runtime")
}

/// Prunes the user's compile cache, keeping the plugins loaded now (every build checked
/// leaves a file); a failure only leaves more on disk.
fn prune_compile_cache(runtime: &Runtime) {
    if let Some(Err(error)) = runtime.prune_compile_cache() {
        tracing::debug!(%error, "cannot prune the compile cache");
    }
}

/// `$SWITCHYARD_CACHE_DIR`, else `$XDG_CACHE_HOME/switchyard`, else
/// `~/.cache/switchyard`; `None` (no cache) when none is known.
fn user_compile_cache() -> Option<PathBuf> {
    let base = std::env::var_os("SWITCHYARD_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("switchyard")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/switchyard")))?;
    std::path::absolute(base.join(crate::server::COMPILE_CACHE_DIR)).ok()
}

async fn check(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let runtime = runtime()?;
    let mut failed = false;
    let mut loaded = Vec::new();
    for file in files {
        match load_as_served(&runtime, file, None).await {
            Ok(plugin) => {
                print!("{}", describe_plugin(file, &plugin));
                let sidecar = file.with_extension("toml");
                if sidecar.exists() {
                    println!("  sidecar        {}", sidecar.display());
                }
                loaded.push(plugin);
            }
            Err(error) => {
                eprintln!("error: {error}");
                failed = true;
            }
        }
    }
    prune_compile_cache(&runtime);
    drop(loaded);
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Loads `file` as a host would serve it: named after its file, with its sidecar (if
/// any) over the default policy, and `fuel` instead of the sidecar's when given.
async fn load_as_served(
    runtime: &Runtime,
    file: &Path,
    fuel: Option<u64>,
) -> anyhow::Result<Plugin> {
    let name = file
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    let policy =
        crate::plugins::plugin_policy(runtime, &name, file, &PluginDefaults::default()).await?;
    let mut settings = policy.settings;
    if let Some(fuel) = fuel {
        settings.limits.fuel = fuel;
    }
    Ok(runtime.load_file(file, settings).await?)
}

/// The text `check` prints for a valid plugin.
///
/// The name is the one the host gives the plugin, its file stem; the name the plugin
/// describes itself with follows when it differs.
pub fn describe_plugin(file: &Path, plugin: &Plugin) -> String {
    let info = plugin.info();
    let subscriptions: Vec<&str> = info.subscriptions.iter().map(|p| p.as_str()).collect();
    let described = if info.name == plugin.name() {
        String::new()
    } else {
        format!(" (describes itself as `{}`)", info.name)
    };
    let mut text = format!(
        "{}: ok\n  name           {}{described}\n  version        {}\n  contract       switchyard:plugin@{}\n  subscriptions  {}\n  sha256         {}\n  imports\n",
        file.display(),
        plugin.name(),
        info.version,
        info.contract,
        subscriptions.join(", "),
        plugin.sha256(),
    );
    let width = info.imports.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for import in &info.imports {
        text.push_str(&format!("    {:width$}  {}\n", import.name, import.grant));
    }
    text
}

/// The event `switchyard invoke` makes.
struct Invocation<'a> {
    ty: String,
    data: &'a str,
    subject: Option<String>,
    attempt: u32,
}

/// The KV values of `--kv KEY=VALUE` and `--kv-file FILE`; `--kv` wins for a key in both.
fn seeded_kv(pairs: &[String], file: Option<&Path>) -> anyhow::Result<MemoryKv> {
    let mut values = BTreeMap::new();
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading --kv-file {}", file.display()))?;
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("--kv-file {} is not a JSON object", file.display()))?;
        for (key, value) in object {
            let bytes = match value {
                serde_json::Value::String(text) => text.into_bytes(),
                other => other.to_string().into_bytes(),
            };
            values.insert(key, bytes);
        }
    }
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            anyhow::bail!("--kv `{pair}` is not KEY=VALUE");
        };
        values.insert(key.to_owned(), value.as_bytes().to_vec());
    }
    if values.contains_key("") {
        anyhow::bail!("a KV key cannot be empty");
    }
    Ok(MemoryKv::new(values))
}

async fn invoke(
    file: &Path,
    invocation: Invocation<'_>,
    store: MemoryKv,
    fuel: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let Invocation {
        ty,
        data,
        subject,
        attempt,
    } = invocation;
    event::validate_event_type(&ty)?;
    if subject.as_deref() == Some("") {
        anyhow::bail!("--subject cannot be empty");
    }
    let data: Cow<'_, str> = match data.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --data from {path}"))?
            .into(),
        None => data.into(),
    };
    let json: serde_json::Value =
        serde_json::from_str(&data).context("--data is not valid JSON")?;
    let runtime = runtime()?;
    let plugin = load_as_served(&runtime, file, fuel).await?;
    let event = Event {
        id: uuid::Uuid::now_v7().to_string(),
        source: "/switchyard/cli".to_owned(),
        ty,
        subject,
        time: Some(crate::clock::now_rfc3339()),
        datacontenttype: Some("application/json".to_owned()),
        dataschema: None,
        data: serde_json::to_vec(&json)?,
        extensions: Default::default(),
    };
    let delivery = Delivery {
        attempt,
        max_attempts: attempt.max(1),
        sequence: 1,
    };
    let outcome = plugin.invoke(&event, delivery, Arc::new(store)).await;
    let report = InvokeReport {
        plugin: plugin.name(),
        event_id: &event.id,
        status: if outcome.result.is_ok() {
            "ok"
        } else {
            "failed"
        },
        result: match &outcome.result {
            Ok(effects) => InvokeResult::Ok(EffectsView::new(effects)),
            Err(Failure { kind, message }) => InvokeResult::Failed {
                kind: *kind,
                message,
            },
        },
        fuel_used: outcome.fuel_used,
        duration_us: outcome.duration.as_micros(),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    prune_compile_cache(&runtime);
    Ok(if outcome.result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `switchyard invoke` prints.
#[derive(Serialize)]
struct InvokeReport<'a> {
    plugin: &'a str,
    event_id: &'a str,
    status: &'static str,
    result: InvokeResult<'a>,
    fuel_used: u64,
    duration_us: u128,
}

/// The effects of a successful call, or why it failed.
#[derive(Serialize)]
#[serde(untagged)]
enum InvokeResult<'a> {
    Ok(EffectsView<'a>),
    Failed { kind: FailureKind, message: &'a str },
}

/// A call's effects: the emitted events, and each KV write (`null` deletes the key).
#[derive(Serialize)]
struct EffectsView<'a> {
    emits: Vec<EmitView<'a>>,
    kv_writes: BTreeMap<&'a str, Option<Cow<'a, str>>>,
}

/// An emitted event, its data as JSON where it is JSON and as text otherwise.
#[derive(Serialize)]
struct EmitView<'a> {
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    ty: &'a str,
    subject: Option<&'a str>,
    extensions: &'a BTreeMap<String, String>,
    data: serde_json::Value,
}

impl<'a> EffectsView<'a> {
    fn new(effects: &'a Effects) -> Self {
        let emits = effects
            .emits
            .iter()
            .map(|e| EmitView {
                id: &e.id,
                source: &e.source,
                ty: &e.ty,
                subject: e.subject.as_deref(),
                extensions: &e.extensions,
                data: serde_json::from_slice(&e.data).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&e.data).into_owned())
                }),
            })
            .collect();
        let kv_writes = effects
            .kv_writes
            .iter()
            .map(|w| {
                (
                    w.key.as_str(),
                    w.value.as_deref().map(String::from_utf8_lossy),
                )
            })
            .collect();
        Self { emits, kv_writes }
    }
}
