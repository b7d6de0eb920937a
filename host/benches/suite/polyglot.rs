//! Plugins in Python and JavaScript beside the Rust no-op: calls per second through the
//! runtime with a fresh instance per event and with a reused one, the idle memory of a
//! host with ten Python plugins loaded from a cold and from a warm compile cache, and how
//! long `switchyard check` takes per file once the cache is warm.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use switchyard_host::PluginDefaults;
use switchyard_host::event::Event;
use switchyard_host::plugins::manifest::Manifest;
use switchyard_host::runtime::{self, Runtime, RuntimeConfig};
use switchyard_host::{EmptyKv, KvSource};

use crate::guests::{self, Guest, Polyglot};
use crate::host::Process;
use crate::{Figure, Options};

fn event(ty: &str, data: serde_json::Value) -> Event {
    Event {
        id: "e1".into(),
        source: "/bench".into(),
        ty: ty.into(),
        subject: None,
        time: None,
        datacontenttype: Some("application/json".into()),
        dataschema: None,
        data: serde_json::to_vec(&data).unwrap_or_default(),
        extensions: Default::default(),
    }
}

/// Calls per second of `calls` invocations of the plugin at `path` with `sidecar`.
async fn calls_per_second(
    runtime: &Runtime,
    path: &Path,
    sidecar: &str,
    event: &Event,
    calls: u64,
) -> anyhow::Result<f64> {
    let policy = Manifest::parse(sidecar)?.resolve(&PluginDefaults::default())?;
    let plugin = runtime.load_file(path, policy.settings.clone()).await?;
    let kv: Arc<dyn KvSource> = Arc::new(EmptyKv);
    let delivery = |sequence| runtime::Delivery {
        attempt: 1,
        max_attempts: 1,
        sequence,
    };
    // One call to warm the instance pool and, for `reuse`, to start the instance.
    if let Err(failure) = plugin
        .invoke(event, delivery(0), Arc::clone(&kv))
        .await
        .result
    {
        anyhow::bail!("{}: {failure}", path.display());
    }
    let started = Instant::now();
    for n in 1..=calls {
        if let Err(failure) = plugin
            .invoke(event, delivery(n), Arc::clone(&kv))
            .await
            .result
        {
            anyhow::bail!("{} call {n}: {failure}", path.display());
        }
    }
    Ok(calls as f64 / started.elapsed().as_secs_f64())
}

pub async fn figures(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let payment = event(
        "payment.completed",
        serde_json::json!({"order_id": "o-1", "email": "fan@example.com", "quantity": 2}),
    );
    let tickets = event(
        "tickets.generated",
        serde_json::json!({"order_id": "o-1", "email": "fan@example.com", "tickets": ["o-1-1"]}),
    );
    let noop = guests::path(Guest::Noop);
    let loyalty = guests::polyglot_path(Polyglot::Loyalty);
    let receipts = guests::polyglot_path(Polyglot::Receipts);
    for (mode, sidecar, rust_calls, calls) in [
        (
            "per-event",
            "",
            options.pick(5_000, 1_000),
            options.pick(300, 60),
        ),
        (
            "reuse",
            "instance = \"reuse\"\nmax_calls = 1000000\n",
            options.pick(50_000, 10_000),
            options.pick(3_000, 600),
        ),
    ] {
        let rust = calls_per_second(&runtime, &noop, sidecar, &payment, rust_calls).await?;
        for (language, path, event) in [("python", &loyalty, &payment), ("js", &receipts, &tickets)]
        {
            let rate = calls_per_second(&runtime, path, sidecar, event, calls).await?;
            figures.push(Figure {
                name: format!("polyglot.{language}.{mode}"),
                value: rate,
                unit: "calls/s",
                baseline: Some(rust),
                baseline_name: "the Rust no-op, same mode",
                target: "",
            });
        }
    }
    figures.extend(idle_memory().await?);
    figures.push(check_time(&loyalty, options)?);
    Ok(figures)
}

/// Resident memory of a host once `plugins` Python plugins are running.
async fn settled_rss(host: &Process, plugins: usize) -> anyhow::Result<f64> {
    for _ in 0..1200 {
        let listed = host.get_json("/v1/plugins").await?;
        let running = listed["plugins"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["status"] == "running").count());
        if running == plugins {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            return Ok(host.memory_mib()?.0);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("{plugins} plugins did not all start within 5 minutes")
}

async fn idle_memory() -> anyhow::Result<Vec<Figure>> {
    const PLUGINS: usize = 10;
    let empty = Process::host(&[], None)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (empty_rss, _) = empty.memory_mib()?;
    drop(empty);

    let dir = tempfile::tempdir()?;
    let plugin_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugin_dir)?;
    let loyalty = guests::polyglot_path(Polyglot::Loyalty);
    for n in 0..PLUGINS {
        std::fs::copy(&loyalty, plugin_dir.join(format!("py{n:02}.wasm")))?;
    }
    let cold = Process::serve(dir, None)?;
    let cold_rss = settled_rss(&cold, PLUGINS).await?;
    let dir = cold.stop()?;
    // The same data folder again: every plugin comes from the compile cache.
    let warm = Process::serve(dir, None)?;
    let warm_rss = settled_rss(&warm, PLUGINS).await?;
    drop(warm);
    Ok([("cold", cold_rss), ("warm", warm_rss)]
        .into_iter()
        .map(|(cache, rss)| Figure {
            name: format!("memory.idle_10_python.{cache}"),
            value: rss,
            unit: "MiB",
            baseline: Some(empty_rss),
            baseline_name: "idle host, no plugins",
            target: "<= 40 MiB per plugin over the empty host",
        })
        .collect())
}

/// Seconds `switchyard check` takes for one Python plugin, median of five runs once the
/// compile cache is warm; the first (cold) run is the baseline.
fn check_time(path: &Path, options: &Options) -> anyhow::Result<Figure> {
    let cache = tempfile::tempdir()?;
    let run = || -> anyhow::Result<f64> {
        let started = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("check")
            .arg(path)
            .env("SWITCHYARD_CACHE_DIR", cache.path())
            .output()
            .context("running switchyard check")?;
        anyhow::ensure!(
            output.status.success(),
            "check failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(started.elapsed().as_secs_f64())
    };
    let cold = run()?;
    let mut warm: Vec<f64> = (0..options.pick(5, 3))
        .map(|_| run())
        .collect::<anyhow::Result<_>>()?;
    warm.sort_by(f64::total_cmp);
    Ok(Figure {
        name: "check.python_warm".into(),
        value: warm[warm.len() / 2],
        unit: "s",
        baseline: Some(cold),
        baseline_name: "the same check, cold cache",
        target: "< 0.5 s",
    })
}
