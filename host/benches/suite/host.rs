//! Real processes under test: the `switchyard` binary of this build and the bare HTTP
//! server, each with its own temporary directories, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::guests::{self, Guest};

/// A running server process.
pub struct Process {
    child: Child,
    /// Where it listens.
    pub address: SocketAddr,
    /// Its directories (for the host: `plugins/` and `data/`).
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// Reads the first line of a child's stdout and takes the address after `marker`.
fn announced_address(child: &mut Child, marker: &str) -> anyhow::Result<SocketAddr> {
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let address = line
        .trim()
        .strip_prefix(marker)
        .with_context(|| format!("unexpected first line: {line:?}"))?;
    Ok(address.trim_start_matches("http://").parse()?)
}

impl Process {
    /// Starts `switchyard serve` on loopback with `plugins` (name, guest, sidecar) and an
    /// optional `switchyard.toml`.
    pub fn host(
        plugins: &[(String, Guest, Option<String>)],
        config: Option<&str>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugin_dir)?;
        for (name, guest, sidecar) in plugins {
            std::fs::copy(
                guests::path(*guest),
                plugin_dir.join(format!("{name}.wasm")),
            )?;
            if let Some(text) = sidecar {
                std::fs::write(plugin_dir.join(format!("{name}.toml")), text)?;
            }
        }
        Self::serve(dir, config)
    }

    /// Starts `switchyard serve` on loopback in `dir`, with the plugins already in
    /// `dir/plugins` and the data (and compile cache) in `dir/data`.
    pub fn serve(dir: tempfile::TempDir, config: Option<&str>) -> anyhow::Result<Self> {
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugin_dir)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--plugins"])
            .arg(&plugin_dir)
            .arg("--data")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(text) = config {
            let path = dir.path().join("switchyard.toml");
            std::fs::write(&path, text)?;
            command.arg("--config").arg(path);
        }
        let mut child = command.spawn().context("starting switchyard")?;
        let address = announced_address(&mut child, "switchyard listening on ")?;
        Ok(Self {
            child,
            address,
            dir,
            http: reqwest::Client::new(),
        })
    }

    /// Stops the process and hands back its directories.
    pub fn stop(mut self) -> anyhow::Result<tempfile::TempDir> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(std::mem::replace(&mut self.dir, tempfile::tempdir()?))
    }

    /// Starts the bare HTTP server (this binary with [`crate::bare::SERVER_FLAG`]).
    pub fn bare_http() -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg(crate::bare::SERVER_FLAG)
            .stdout(Stdio::piped())
            .spawn()?;
        let address = announced_address(&mut child, "listening on ")?;
        Ok(Self {
            child,
            address,
            dir: tempfile::tempdir()?,
            http: reqwest::Client::new(),
        })
    }

    /// The plugin directory.
    pub fn plugins_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// GETs a JSON document.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let response = self.http.get(self.url(path)).send().await?;
        if !response.status().is_success() {
            bail!("GET {path}: {}", response.status());
        }
        Ok(response.json().await?)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(self.url("/metrics"))
            .send()
            .await?
            .text()
            .await?)
    }

    /// Waits until `plugin` has no lag and nothing in flight; returns when that was.
    pub async fn wait_caught_up(&self, plugin: &str, limit: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.get_json(&format!("/v1/plugins/{plugin}")).await?;
            if status["lag"] == 0 && status["in_flight"] == 0 {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("{plugin} did not catch up within {limit:?}: {status}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// How many invocations of `plugin` on this host have succeeded so far (its status's
    /// `handled`).
    pub async fn handled(&self, plugin: &str) -> anyhow::Result<u64> {
        let status = self.get_json(&format!("/v1/plugins/{plugin}")).await?;
        status["handled"]
            .as_u64()
            .with_context(|| format!("{plugin}'s status has no `handled`: {status}"))
    }

    /// Fails unless `plugin` has handled every one of `expected` events: `handled` on
    /// these hosts grew by at least `expected` from `before` (their `handled` added up
    /// before the events were sent), and the plugin holds no dead letters and no pending
    /// retries. [`Process::wait_caught_up`] alone also passes events that were
    /// dead-lettered or wait for a retry, so a figure that counts handled events checks
    /// this after it.
    pub async fn ensure_all_handled(
        hosts: &[&Process],
        plugin: &str,
        before: u64,
        expected: u64,
    ) -> anyhow::Result<()> {
        let mut handled = 0;
        let mut last = serde_json::Value::Null;
        for host in hosts {
            last = host.get_json(&format!("/v1/plugins/{plugin}")).await?;
            handled += last["handled"]
                .as_u64()
                .with_context(|| format!("{plugin}'s status has no `handled`: {last}"))?;
        }
        let field = |name: &str| last[name].as_u64().unwrap_or(u64::MAX);
        anyhow::ensure!(
            handled.saturating_sub(before) >= expected
                && field("dead_letters") == 0
                && field("pending_retries") == 0,
            "{plugin} handled {} of {expected} events; {} dead letters, {} pending retries \
             (status: {last})",
            handled.saturating_sub(before),
            last["dead_letters"],
            last["pending_retries"],
        );
        Ok(())
    }

    /// The resident set (`VmRSS`) and its peak (`VmHWM`), in MiB.
    pub fn memory_mib(&self) -> anyhow::Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| -> anyhow::Result<f64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("{name} missing"))?;
            let kib: f64 = line.split_whitespace().nth(1).context("value")?.parse()?;
            Ok(kib / 1024.0)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces `file` in `dir` the way deploy tools do: write a hidden file, then rename.
pub fn deploy(dir: &Path, file: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let temporary = dir.join(format!(".{file}.tmp"));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, dir.join(file))?;
    Ok(())
}

/// The quantile `q` of a Prometheus histogram series in `metrics` (named without
/// `_bucket`), interpolated linearly inside its bucket, in the histogram's unit. A quantile
/// that falls in the `+Inf` bucket, past the largest finite bound, is infinity: the
/// histogram says only that it is beyond that bound, not by how much, so no finite value
/// is made up for it (the table prints `inf`, the JSON `null`).
pub fn histogram_quantile(metrics: &str, series: &str, q: f64) -> anyhow::Result<f64> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(&format!("{series}_bucket{{")) else {
            continue;
        };
        let le = rest
            .split("le=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .context("le")?;
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        let count: f64 = rest.rsplit(' ').next().context("count")?.parse()?;
        buckets.push((bound, count));
    }
    let total = buckets.last().context("no buckets")?.1;
    if total == 0.0 {
        bail!("{series} is empty");
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for (bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Ok(f64::INFINITY);
            }
            let share = if count > previous.1 {
                (rank - previous.1) / (count - previous.1)
            } else {
                1.0
            };
            return Ok(previous.0 + (bound - previous.0) * share);
        }
        previous = (bound, count);
    }
    bail!("{series}: no bucket holds the {q} quantile (no `+Inf` bucket?)")
}
