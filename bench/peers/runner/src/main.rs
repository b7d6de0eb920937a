//! `peer-runner NOOP_WASM [--quick]`: the Extism peer of Switchyard's dispatch figures,
//! in one run.
//!
//! First it runs Switchyard's own `dispatch.per-event` and `dispatch.reuse` figures
//! (`cargo bench -p switchyard-host --bench suite -- --only dispatch --json`, from the
//! repository root), then the same no-op handler on Extism, one call at a time as the
//! dispatcher's figures are:
//! - `extism.fresh`: a new plug-in instance from the compiled module for every event
//!   (`Plugin::new_from_compiled`), the peer of `per-event`;
//! - `extism.pooled`: instances from an `extism::Pool` of one, the peer of `reuse`.
//!
//! Each Extism loop first makes [`WARM_UP`] calls that are not measured, as the dispatch
//! figures warm up with 200 calls of their bare loop before measuring. Every loop is
//! bounded by a count and a deadline. The table puts each of our figures beside its peer
//! with the ratio (ours / peer).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use extism::{CompiledPlugin, Plugin, PluginBuilder, Pool};

/// The event each call gets: the fields the dispatch figures deliver as a WIT record (id
/// `e<n>`, source `/bench`, type `bench.tick`, content type `application/json`, data
/// `{}`), as compact JSON, Extism's usual input: 96 bytes, where the record's fields come
/// to about 40.
const EVENT: &[u8] = br#"{"id":"e1","source":"/bench","type":"bench.tick","datacontenttype":"application/json","data":{}}"#;

/// Longest one loop runs.
const DEADLINE: Duration = Duration::from_secs(60);

/// Calls each loop makes before it is measured.
const WARM_UP: usize = 200;

/// Calls per second of `call`, run `count` times or until the deadline.
fn rate(count: usize, mut call: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut done = 0;
    while done < count && started.elapsed() < DEADLINE {
        call()?;
        done += 1;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// Our figure `name` and its bare baseline, from the suite's JSON lines.
fn ours(lines: &str, name: &str) -> anyhow::Result<(f64, f64)> {
    for line in lines.lines() {
        let Ok(figure) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if figure["name"] == name {
            let value = figure["value"].as_f64().context("a figure without value")?;
            let baseline = figure["baseline"].as_f64().unwrap_or(f64::NAN);
            return Ok((value, baseline));
        }
    }
    bail!("the suite printed no `{name}`")
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let wasm_path = args
        .next()
        .context("usage: peer-runner NOOP_WASM [--quick]")?;
    let quick = args.any(|a| a == "--quick");
    let pick = |full: usize, short: usize| if quick { short } else { full };

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..");
    let mut suite = Command::new("cargo");
    suite
        .current_dir(&root)
        .args(["bench", "-p", "switchyard-host", "--bench", "suite", "--"])
        .args(["--only", "dispatch", "--json"]);
    if quick {
        suite.arg("--quick");
    }
    let output = suite.output().context("running Switchyard's suite")?;
    if !output.status.success() {
        bail!(
            "Switchyard's suite failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let lines = String::from_utf8(output.stdout)?;
    let (per_event, bare_per_event) = ours(&lines, "dispatch.per-event")?;
    let (reuse, bare_reuse) = ours(&lines, "dispatch.reuse")?;

    let wasm = std::fs::read(&wasm_path).with_context(|| format!("reading {wasm_path}"))?;
    let compiled = CompiledPlugin::new(PluginBuilder::new(wasm).with_wasi(false))
        .context("compiling the Extism plug-in")?;
    let mut fresh_call = || -> anyhow::Result<()> {
        let mut plugin = Plugin::new_from_compiled(&compiled)?;
        plugin.call::<&[u8], &[u8]>("handle", EVENT)?;
        Ok(())
    };
    rate(WARM_UP, &mut fresh_call)?;
    let fresh = rate(pick(20_000, 4_000), &mut fresh_call)?;
    let source = CompiledPlugin::new(PluginBuilder::new(std::fs::read(&wasm_path)?))?;
    let pool = Pool::new(move || Plugin::new_from_compiled(&source));
    let mut pooled_call = || -> anyhow::Result<()> {
        let mut plugin = pool
            .get(Duration::from_secs(1))?
            .context("no pooled instance")?;
        plugin.call::<&[u8], Vec<u8>>("handle", EVENT)?;
        Ok(())
    };
    // The warm-up also makes the pool's one instance, which the measured loop then reuses.
    rate(WARM_UP, &mut pooled_call)?;
    let pooled = rate(pick(400_000, 50_000), &mut pooled_call)?;

    println!(
        "{:<24} {:>14} {:>14} {:>7}   {:<36}",
        "figure", "ours calls/s", "peer calls/s", "ratio", "peer (ours' bare loop calls/s)"
    );
    for (name, ours, peer, peer_name, bare) in [
        (
            "dispatch.per-event",
            per_event,
            fresh,
            "extism fresh instance",
            bare_per_event,
        ),
        (
            "dispatch.reuse",
            reuse,
            pooled,
            "extism pool of one",
            bare_reuse,
        ),
    ] {
        println!(
            "{name:<24} {ours:>14.0} {peer:>14.0} {:>7.2}   {peer_name} ({bare:.0})",
            ours / peer
        );
    }
    Ok(())
}
