//! A real `switchyard serve` process for end-to-end tests: its own plugin and data
//! directories, a free loopback port, and kill/restart.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::guests::{self, Guest};

/// Which bus a host runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The embedded log in the host's data directory.
    Embedded,
    /// NATS JetStream at this URL (a server the test started).
    Nats(String),
}

/// A running host and the directories it owns.
pub struct Host {
    child: Option<Child>,
    backend: Backend,
    dir: tempfile::TempDir,
    url: String,
    config: Option<String>,
    /// What the host logged (warnings and errors), every run's.
    logged: Arc<Mutex<Vec<String>>>,
    /// An HTTP client for talking to the host.
    pub http: reqwest::Client,
}

impl Host {
    /// A host on the embedded log with no plugins yet; call [`Host::plugin`] then
    /// [`Host::start`].
    pub fn new() -> Self {
        Self::on(&Backend::Embedded)
    }

    /// A host on the given bus with no plugins yet.
    pub fn on(backend: &Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        Self {
            child: None,
            backend: backend.clone(),
            dir,
            url: String::new(),
            config: None,
            logged: Arc::default(),
            http: reqwest::Client::new(),
        }
    }

    /// The plugin directory.
    pub fn plugins_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// The data directory the host is started with.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Installs `guest` as plugin `name`, with a sidecar if given.
    pub fn plugin(&self, name: &str, guest: Guest, sidecar: Option<&str>) -> &Self {
        std::fs::copy(
            guests::path(guest),
            self.plugins_dir().join(format!("{name}.wasm")),
        )
        .unwrap();
        self.sidecar(name, sidecar);
        self
    }

    /// Writes (or removes) the sidecar of plugin `name`.
    pub fn sidecar(&self, name: &str, sidecar: Option<&str>) {
        let path = self.plugins_dir().join(format!("{name}.toml"));
        match sidecar {
            Some(text) => std::fs::write(path, text).unwrap(),
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Replaces a file in the plugin directory the way deploy tools do: write a hidden
    /// temporary file, then rename it over the target.
    pub fn deploy(&self, file: &str, bytes: &[u8]) {
        let temporary = self.plugins_dir().join(format!(".{file}.tmp"));
        std::fs::write(&temporary, bytes).unwrap();
        std::fs::rename(&temporary, self.plugins_dir().join(file)).unwrap();
    }

    /// The status of one plugin, or `None` when the host does not list it.
    pub async fn status(&self, name: &str) -> Option<serde_json::Value> {
        let response = self
            .http
            .get(self.url(&format!("/v1/plugins/{name}")))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => Some(response.json().await.unwrap()),
            404 => None,
            other => panic!("GET /v1/plugins/{name}: {other}"),
        }
    }

    /// The value of a metric series, named with its labels as in the exposition text
    /// (`switchyard_plugin_loads_total{plugin="audit"}`).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metric_if_any(name)
            .await
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// [`Host::metric`], or `None` while the series does not exist yet.
    pub async fn metric_if_any(&self, name: &str) -> Option<f64> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .map(|value| value.parse().unwrap())
    }

    /// Uses this text as the host's `switchyard.toml`.
    pub fn config(&mut self, text: &str) -> &mut Self {
        self.config = Some(text.to_owned());
        self
    }

    /// Starts the host and waits until it listens.
    pub fn start(&mut self) -> &mut Self {
        assert!(self.child.is_none(), "already running");
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--plugins")
            .arg(self.plugins_dir())
            .arg("--data")
            .arg(self.data_dir())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Backend::Nats(url) = &self.backend {
            command.arg("--bus").arg(url);
        }
        if let Some(text) = &self.config {
            let path = self.dir.path().join("switchyard.toml");
            std::fs::write(&path, text).unwrap();
            command.arg("--config").arg(path);
        }
        let mut child = command.spawn().expect("the switchyard binary starts");
        forward_to_test_output(child.stderr.take().unwrap(), Arc::clone(&self.logged));
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("switchyard listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from serve: {line:?}"));
        self.url = url.to_owned();
        self.child = Some(child);
        self
    }

    /// The first page of `plugin`'s dead letters.
    pub async fn dead_letters(&self, plugin: &str) -> Vec<serde_json::Value> {
        self.get_json(&format!("/v1/dlq?plugin={plugin}")).await["dead_letters"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// `plugin`'s dead letters once it has any, waiting at most `limit`.
    pub async fn wait_dead_letters(&self, plugin: &str, limit: Duration) -> Vec<serde_json::Value> {
        self.wait_for("the dead letter", limit, || async {
            let letters = self.dead_letters(plugin).await;
            (!letters.is_empty()).then_some(letters)
        })
        .await
    }

    /// The lines the host logged so far that contain `text`.
    pub fn logged(&self, text: &str) -> Vec<String> {
        self.logged
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(text))
            .cloned()
            .collect()
    }

    /// The base URL, such as `http://127.0.0.1:43121`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The process id of the running host.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends SIGTERM and waits for a clean exit (status 0).
    pub fn stop(&mut self) {
        self.terminate();
        self.wait_stopped(Duration::from_secs(30));
    }

    /// Sends SIGTERM and returns at once.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let pid = child.id().to_string();
            let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            assert!(status.success());
        }
    }

    /// Waits at most `limit` for the host to exit, cleanly (status 0).
    pub fn wait_stopped(&mut self, limit: Duration) {
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "serve exited with {status}");
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "serve did not stop within {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// POSTs JSON data as an event of `ty` with the given id; returns the status.
    pub async fn send(&self, ty: &str, id: &str, data: serde_json::Value) -> reqwest::StatusCode {
        self.http
            .post(self.url(&format!("/v1/events/{ty}")))
            .header("ce-id", id)
            .json(&data)
            .send()
            .await
            .unwrap()
            .status()
    }

    /// POSTs `events` (a JSON array of CloudEvents) as one batch; the response.
    pub async fn send_batch(&self, events: &serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/events"))
            .header("content-type", "application/cloudevents-batch+json")
            .body(events.to_string())
            .send()
            .await
            .unwrap()
    }

    /// GETs a JSON document, asserting 200.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    /// Reads a plugin's KV value as text, if present.
    pub async fn kv(&self, plugin: &str, key: &str) -> Option<String> {
        let response = self
            .http
            .get(self.url(&format!("/v1/plugins/{plugin}/kv/{key}")))
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => Some(response.text().await.unwrap()),
            404 => None,
            other => panic!("GET kv {plugin}/{key}: {other}"),
        }
    }

    /// Every event in the log, in order.
    pub async fn log(&self) -> Vec<serde_json::Value> {
        let mut events = Vec::new();
        let mut after = 0u64;
        loop {
            let path = format!("/v1/events?after={after}&limit=1000");
            // A bus failing over (a NATS cluster electing a stream leader) may answer an
            // error for a moment: ask again, bounded.
            let page = self
                .wait_for(&format!("GET {path}"), Duration::from_secs(30), || async {
                    let response = self.http.get(self.url(&path)).send().await.ok()?;
                    if response.status() != 200 {
                        return None;
                    }
                    response.json::<serde_json::Value>().await.ok()
                })
                .await;
            let batch = page["events"].as_array().unwrap().clone();
            if batch.is_empty() {
                return events;
            }
            after = batch.last().unwrap()["sequence"].as_u64().unwrap();
            events.extend(batch);
        }
    }

    /// Waits until `plugin`'s cursor reaches what is now the head of the log and nothing
    /// of it is in flight.
    pub async fn wait_caught_up(&self, plugin: &str, limit: Duration) {
        let head = self
            .log()
            .await
            .last()
            .map_or(0, |e| e["sequence"].as_u64().unwrap());
        self.wait_for(&format!("{plugin} to catch up"), limit, || async {
            // A bus failing over (a NATS cluster electing a leader) may answer an error
            // for a moment: that is "not yet".
            let response = self
                .http
                .get(self.url(&format!("/v1/plugins/{plugin}")))
                .send()
                .await
                .ok()?;
            let status: serde_json::Value = response.json().await.ok()?;
            (status["cursor"].as_u64()? >= head && status["in_flight"] == 0).then_some(())
        })
        .await;
    }

    /// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, limit: Duration, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        super::wait_for(what, limit, check).await
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies the host's log into this test's captured output (shown when the test fails,
/// kept out of the run's output when it passes; a thread spawned from the test's thread
/// writes to that test's capture) and into `logged`.
fn forward_to_test_output(stderr: std::process::ChildStderr, logged: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            match line {
                Ok(line) => {
                    eprintln!("{line}");
                    logged.lock().unwrap().push(line);
                }
                Err(_) => break,
            }
        }
    });
}
