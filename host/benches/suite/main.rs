//! The Switchyard benchmark suite: every figure next to the bare baseline that bounds it,
//! measured in the same run, so a noisy machine moves both.
//!
//! ```text
//! cargo bench -p switchyard-host --bench suite -- [--quick] [--json] [--only NAME]
//! ```
//!
//! It prints a table; `--json` prints one JSON object per figure instead
//! (`{"name", "value", "unit", "baseline", "ratio", ...}`); `--quick` runs reduced counts,
//! which still takes a few minutes (its fixed waits alone add up to about a minute: timers
//! due ten seconds ahead, twice; two 10 s CPU windows of the status page; the paced
//! latency runs); `--only NAME` runs the figures whose name contains `NAME`, and
//! a figure's full name of the `dispatch`, `runtime.invoke` or `nats` figures (such as
//! `dispatch.reuse` or `nats.hosts1`) runs that one with its baseline.
//! Every loop is bounded by a count and a deadline, and all traffic stays on loopback.
//! The host under test is the real `switchyard` binary of this build, started per figure
//! with its own temporary directories; the guest plugins come from `tests/plugins`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../tests/all/support/guests.rs"]
#[allow(dead_code)]
mod guests;

#[path = "../../../tests/all/support/nats.rs"]
#[allow(dead_code)]
mod nats_server;

#[path = "../../../tests/all/support/browser.rs"]
#[allow(dead_code)]
mod browser;

mod bare;
mod client;
mod dead_letters;
mod figures;
mod host;
mod nats;
mod peers;
mod polyglot;
mod producers;
mod sourcing;
mod traces;
mod ui;

use std::time::Duration;

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Reduced counts and shorter windows: a run of a few minutes instead of a long one.
    pub quick: bool,
    /// One JSON object per figure instead of a table.
    pub json: bool,
    /// Only figures whose name contains this.
    pub only: Option<String>,
}

impl Options {
    /// `full` in a normal run, `quick` with `--quick`.
    pub fn pick<T>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    /// The deadline of one measurement loop.
    pub fn deadline(&self) -> Duration {
        self.pick(Duration::from_secs(60), Duration::from_secs(10))
    }
}

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Figure {
    /// A stable name, such as `ingest.single`.
    pub name: String,
    /// The measured value.
    pub value: f64,
    /// Its unit, such as `events/s`.
    pub unit: &'static str,
    /// The bare baseline's value in the same unit, measured in the same run.
    pub baseline: Option<f64>,
    /// What the baseline is; for a figure without one, what the figure measures (and a
    /// floor by design, such as `swap.median`'s quiet period, which is no baseline).
    pub baseline_name: &'static str,
    /// The target, in words (empty when there is none). Targets are set in this suite's
    /// code where each figure is made (`figures.rs`, and `nats.rs`, `polyglot.rs` and
    /// `sourcing.rs` for theirs); docs/BENCHMARKS.md lists them.
    pub target: &'static str,
}

impl Figure {
    fn ratio(&self) -> Option<f64> {
        self.baseline.filter(|b| *b > 0.0).map(|b| self.value / b)
    }
}

fn parse_options() -> Options {
    let mut options = Options {
        quick: false,
        json: false,
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--json" => options.json = true,
            "--only" => options.only = args.next(),
            // `cargo bench` passes `--bench`; other harness flags mean nothing here.
            _ => {}
        }
    }
    options
}

fn print_table(figures: &[Figure]) {
    println!(
        "{:<34} {:>14} {:<9} {:>14} {:>7}  {:<34} target",
        "figure", "value", "unit", "baseline", "ratio", "baseline is"
    );
    for f in figures {
        let baseline = f.baseline.map_or_else(|| "-".to_owned(), format_value);
        let ratio = f
            .ratio()
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
        println!(
            "{:<34} {:>14} {:<9} {:>14} {:>7}  {:<34} {}",
            f.name,
            format_value(f.value),
            f.unit,
            baseline,
            ratio,
            f.baseline_name,
            f.target
        );
    }
}

fn format_value(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn print_json(figure: &Figure) {
    let line = serde_json::json!({
        "name": figure.name,
        "value": figure.value,
        "unit": figure.unit,
        "baseline": figure.baseline,
        "ratio": figure.ratio(),
        "baseline_is": figure.baseline_name,
        "target": figure.target,
    });
    println!("{line}");
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == bare::SERVER_FLAG) {
        return bare::serve_http();
    }
    let options = parse_options();
    let runtime = tokio::runtime::Runtime::new()?;
    let figures = runtime.block_on(figures::run_all(&options))?;
    if options.json {
        figures.iter().for_each(print_json);
    } else {
        print_table(&figures);
    }
    Ok(())
}
