//! The status page's figures: how soon an open page shows data, and what keeping it open
//! costs the host, on a host with many plugins and dead letters. Needs Debian's
//! `chromium` and `chromedriver` (`scripts/setup.sh`).

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::browser::{Browser, DESKTOP};
use crate::client;
use crate::guests::Guest;
use crate::host::Process;
use crate::{Figure, Options};

/// CPU seconds (user and system) the process has used so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a /proc stat line")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // In USER_HZ ticks, which Linux fixes at 100 a second for /proc.
    Ok(ticks / 100.0)
}

pub async fn figures(options: &Options) -> anyhow::Result<Vec<Figure>> {
    let plugin_count = options.pick(500, 100);
    let dead_letters = options.pick(100_000, 10_000);
    let mut plugins: Vec<(String, Guest, Option<String>)> = (0..plugin_count)
        .map(|n| {
            let sidecar = format!("subscribe = [\"idle.p{n:03}\"]\n");
            (format!("p{n:03}"), Guest::Noop, Some(sidecar))
        })
        .collect();
    plugins.push((
        "rejecter".into(),
        Guest::Hostile,
        Some(
            "subscribe = [\"hostile.reject\"]\nconcurrency = 8\n[retry]\nmax_attempts = 1\n".into(),
        ),
    ));
    let host = Process::host(&plugins, None)?;
    client::post_batches(
        host.address,
        "hostile.reject",
        "r",
        dead_letters / 1000,
        1000,
    )
    .await?;
    host.wait_caught_up("rejecter", Duration::from_secs(300))
        .await?;

    let pid = host.pid();
    let window = options.pick(Duration::from_secs(30), Duration::from_secs(10));
    let before = cpu_seconds(pid)?;
    tokio::time::sleep(window).await;
    let idle = (cpu_seconds(pid)? - before) / window.as_secs_f64() * 100.0;

    let browser = Browser::start(DESKTOP).await;
    let mut first_data = Vec::new();
    for (view, path) in [
        ("overview", "/ui"),
        ("dead_letters", "/ui#/dlq"),
        ("plugin", "/ui#/plugins/p001"),
    ] {
        // A new document each time, so the data shown is this view's first.
        browser.goto("about:blank").await;
        let started = Instant::now();
        browser
            .goto(&format!("http://{}{path}", host.address))
            .await;
        browser.wait_for("main[data-loaded]").await;
        first_data.push((view, started.elapsed()));
    }
    browser.goto(&format!("http://{}/ui", host.address)).await;
    browser.wait_for("main[data-loaded]").await;
    let before = cpu_seconds(pid)?;
    tokio::time::sleep(window).await;
    let open = (cpu_seconds(pid)? - before) / window.as_secs_f64() * 100.0;
    browser.close().await;

    let mut figures: Vec<Figure> = first_data
        .into_iter()
        .map(|(view, took)| Figure {
            name: format!("ui.first_data.{view}"),
            value: took.as_secs_f64() * 1000.0,
            unit: "ms",
            baseline: None,
            baseline_name: "navigation to data shown",
            target: "",
        })
        .collect();
    figures.push(Figure {
        name: "ui.host_cpu_page_open".into(),
        value: open,
        unit: "% core",
        baseline: Some(idle),
        baseline_name: "the same host, no page open",
        target: "",
    });
    Ok(figures)
}
