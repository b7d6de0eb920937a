//! Shared helpers for the integration tests: the guest plugins (built once per test
//! process), runtimes, events and an in-memory KV store that commits effects.

pub mod browser;
pub mod guests;
pub mod host;
pub mod nats;

/// Turns each `async fn NAME(backend: Backend)` into two tests, `NAME::embedded` and
/// `NAME::nats` (which starts its own `nats-server`), so both backends pass the same
/// end-to-end checks.
#[macro_export]
macro_rules! on_both_backends {
    (multi_thread: $($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$name($crate::support::host::Backend::Embedded).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn nats() {
                    let server = $crate::support::nats::NatsServer::start();
                    super::$name($crate::support::host::Backend::Nats(server.url())).await;
                }
            }
        )*
    };
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn embedded() {
                    super::$name($crate::support::host::Backend::Embedded).await;
                }

                #[tokio::test]
                async fn nats() {
                    let server = $crate::support::nats::NatsServer::start();
                    super::$name($crate::support::host::Backend::Nats(server.url())).await;
                }
            }
        )*
    };
}

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use switchyard_host::event::Event;
use switchyard_host::runtime::{Delivery, Outcome, Plugin, PluginSettings, Runtime, RuntimeConfig};
use switchyard_host::stream::StreamPage;
use switchyard_host::{Effects, EmptyKv, KvError, KvSource};

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The ids of the events the `hostile.count` behaviour handled, in log order: one
/// `hostile.counted` follow-up per committed attempt.
pub fn counted_ids(log: &[serde_json::Value]) -> Vec<&str> {
    log.iter()
        .filter(|e| e["event"]["type"] == "hostile.counted")
        .map(|e| e["event"]["data"]["id"].as_str().unwrap())
        .collect()
}

/// A runtime with default settings.
pub fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("the runtime starts")
}

/// Loads a guest with the given settings, panicking with the load error.
pub async fn load(runtime: &Runtime, guest: guests::Guest, settings: PluginSettings) -> Plugin {
    let path = guests::path(guest);
    match runtime.load_file(&path, settings).await {
        Ok(plugin) => plugin,
        Err(error) => panic!("loading {}: {error}", path.display()),
    }
}

/// An event of the given type with JSON data and a unique id.
pub fn event(ty: &str, data: serde_json::Value) -> Event {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    Event {
        id: format!("evt-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        source: "/tests".to_owned(),
        ty: ty.to_owned(),
        subject: None,
        time: None,
        datacontenttype: Some("application/json".to_owned()),
        dataschema: None,
        data: serde_json::to_vec(&data).expect("JSON serialises"),
        extensions: BTreeMap::new(),
    }
}

/// Attempt `attempt` of sequence 1 with five attempts allowed.
pub fn delivery(attempt: u32) -> Delivery {
    Delivery {
        attempt,
        max_attempts: 5,
        sequence: 1,
    }
}

/// Invokes a plugin (first attempt) with an empty KV store.
pub async fn invoke(plugin: &Plugin, event: &Event) -> Outcome {
    plugin.invoke(event, delivery(1), Arc::new(EmptyKv)).await
}

/// The failure of an outcome as `(kind, message)`, panicking on success.
pub fn failure(outcome: &Outcome) -> (&'static str, &str) {
    match &outcome.result {
        Ok(effects) => panic!("expected a failure, got success with {effects:?}"),
        Err(failure) => (failure.kind.as_str(), failure.message.as_str()),
    }
}

/// The effects of an outcome, panicking on failure.
pub fn effects(outcome: &Outcome) -> &Effects {
    match &outcome.result {
        Ok(effects) => effects,
        Err(failure) => panic!("expected success, got {failure}"),
    }
}

/// Committed KV state of several plugins, in memory, the way the bus would hold it.
#[derive(Default)]
pub struct MemoryKv {
    entries: Mutex<BTreeMap<(String, String), Vec<u8>>>,
}

impl MemoryKv {
    /// Commits a successful invocation's KV writes for `plugin`.
    pub fn commit(&self, plugin: &str, effects: &Effects) {
        let mut entries = self.entries.lock().unwrap();
        for write in &effects.kv_writes {
            let key = (plugin.to_owned(), write.key.clone());
            match &write.value {
                Some(value) => {
                    entries.insert(key, value.clone());
                }
                None => {
                    entries.remove(&key);
                }
            }
        }
    }

    /// Reads a committed value.
    pub fn value(&self, plugin: &str, key: &str) -> Option<Vec<u8>> {
        self.entries
            .lock()
            .unwrap()
            .get(&(plugin.to_owned(), key.to_owned()))
            .cloned()
    }

    /// Reads a committed value as UTF-8 text.
    pub fn text(&self, plugin: &str, key: &str) -> Option<String> {
        self.value(plugin, key)
            .map(|v| String::from_utf8(v).expect("value is UTF-8"))
    }

    /// Number of committed keys of `plugin`.
    pub fn len(&self, plugin: &str) -> usize {
        self.entries
            .lock()
            .unwrap()
            .keys()
            .filter(|(p, _)| p == plugin)
            .count()
    }
}

#[async_trait::async_trait]
impl KvSource for MemoryKv {
    async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.value(plugin, key))
    }

    async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        Ok(self
            .entries
            .lock()
            .unwrap()
            .keys()
            .filter(|(p, k)| p == plugin && k.starts_with(prefix))
            .map(|(_, k)| k.clone())
            .collect())
    }

    async fn read_stream(&self, _: &str, _: u64, _: usize) -> Result<StreamPage, KvError> {
        Ok(StreamPage::default())
    }

    async fn scheduled(&self, _id: &str) -> Result<bool, KvError> {
        Ok(false)
    }
}

/// A KV source that always fails, as an unavailable store would.
pub struct BrokenKv;

#[async_trait::async_trait]
impl KvSource for BrokenKv {
    async fn get(&self, _plugin: &str, _key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Err(KvError::new("store unavailable"))
    }

    async fn keys(&self, _plugin: &str, _prefix: &str) -> Result<Vec<String>, KvError> {
        Err(KvError::new("store unavailable"))
    }

    async fn read_stream(&self, _: &str, _: u64, _: usize) -> Result<StreamPage, KvError> {
        Err(KvError::new("store unavailable"))
    }

    async fn scheduled(&self, _id: &str) -> Result<bool, KvError> {
        Err(KvError::new("store unavailable"))
    }
}
