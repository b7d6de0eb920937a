//! The `switchyard` command line: argument parsing and the commands that run locally.
//!
//! Commands print results on stdout and errors on stderr, and exit non-zero on failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::event::{self, Event};
use crate::runtime::{Delivery, EmptyKv, Failure, Plugin, PluginSettings, Runtime, RuntimeConfig};

/// Switchyard: a host for event handlers written as WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate plugin files and print each one's name, version and subscriptions.
    Check {
        /// Plugin files (`.wasm` components).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run one event through a plugin file and print the outcome as JSON; nothing is
    /// stored and KV starts empty.
    Invoke {
        /// The plugin file.
        file: PathBuf,
        /// The event type.
        #[arg(long = "type")]
        ty: String,
        /// The event data, as JSON.
        #[arg(long, default_value = "{}")]
        data: String,
        /// Attempt number to report to the handler.
        #[arg(long, default_value_t = 1)]
        attempt: u32,
    },
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { files } => check(&files).await,
        Command::Invoke {
            file,
            ty,
            data,
            attempt,
        } => invoke(&file, ty, &data, attempt).await,
    }
}

fn runtime() -> anyhow::Result<Runtime> {
    Runtime::new(RuntimeConfig::default()).context("starting the WebAssembly runtime")
}

async fn check(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let runtime = runtime()?;
    let mut failed = false;
    for file in files {
        match runtime.load_file(file, PluginSettings::default()).await {
            Ok(plugin) => print!("{}", describe_plugin(file, &plugin)),
            Err(error) => {
                eprintln!("error: {error}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The text `check` prints for a valid plugin.
pub fn describe_plugin(file: &Path, plugin: &Plugin) -> String {
    let info = plugin.info();
    let subscriptions: Vec<&str> = info.subscriptions.iter().map(|p| p.as_str()).collect();
    format!(
        "{}: ok\n  name           {}\n  version        {}\n  subscriptions  {}\n  sha256         {}\n",
        file.display(),
        info.name,
        info.version,
        subscriptions.join(", "),
        plugin.sha256(),
    )
}

async fn invoke(file: &Path, ty: String, data: &str, attempt: u32) -> anyhow::Result<ExitCode> {
    event::validate_event_type(&ty)?;
    let json: serde_json::Value = serde_json::from_str(data).context("--data is not valid JSON")?;
    let runtime = runtime()?;
    let plugin = runtime.load_file(file, PluginSettings::default()).await?;
    let event = Event {
        id: uuid::Uuid::now_v7().to_string(),
        source: "/switchyard/cli".to_owned(),
        ty,
        subject: None,
        time: Some(crate::runtime::now_rfc3339()),
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
    let outcome = plugin.invoke(&event, delivery, Arc::new(EmptyKv)).await;
    let (status, body) = match &outcome.result {
        Ok(effects) => ("ok", effects_json(effects)),
        Err(Failure { kind, message }) => (
            "failed",
            serde_json::json!({ "kind": kind, "message": message }),
        ),
    };
    let report = serde_json::json!({
        "plugin": plugin.name(),
        "event_id": event.id,
        "status": status,
        "result": body,
        "fuel_used": outcome.fuel_used,
        "duration_us": outcome.duration.as_micros(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(if outcome.result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn effects_json(effects: &crate::runtime::Effects) -> serde_json::Value {
    let emits: Vec<serde_json::Value> = effects
        .emits
        .iter()
        .map(|e| {
            let data = serde_json::from_slice::<serde_json::Value>(&e.data).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&e.data).into_owned())
            });
            serde_json::json!({
                "id": e.id, "source": e.source, "type": e.ty, "subject": e.subject,
                "extensions": e.extensions, "data": data,
            })
        })
        .collect();
    let kv: serde_json::Map<String, serde_json::Value> = effects
        .kv_writes
        .iter()
        .map(|w| {
            let value = w.value.as_ref().map_or(serde_json::Value::Null, |v| {
                serde_json::Value::String(String::from_utf8_lossy(v).into_owned())
            });
            (w.key.clone(), value)
        })
        .collect();
    serde_json::json!({ "emits": emits, "kv_writes": kv })
}
