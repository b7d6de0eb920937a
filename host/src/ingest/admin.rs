//! Operator routes: plugin status and KV, dead letters, metrics and health.
//!
//! Every answer is a `Serialize` view struct: the struct is the reference for the JSON
//! a client sees.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::controls::DeliveryView;
use super::error::code;
use super::{ApiError, ApiPath, ApiQuery, AppState, cloudevents};
use crate::bus::{
    Breaker, BusError, DeadLetter, DeadLetterQuery, DeadLetterReason, DeadLetterSelection,
    DeadLetterView,
};
use crate::clock::rfc3339_ms;
use crate::failure::AttemptView;
use crate::metrics::PluginGauges;
use crate::plugins::{LoadedPlugin, PluginEntry};
use crate::policy::retry::Backoff;
use crate::policy::{InstanceMode, Ordering, Start};
use crate::runtime::{Access, Isolation};

fn bus_error(error: BusError) -> ApiError {
    match error {
        BusError::NotFound(what) => ApiError::not_found(what),
        other => ApiError::internal(other),
    }
}

/// A plugin named in a request's path: a name no plugin file can have names nothing, and
/// never reaches the bus (where NATS would read `*` or `>` in it as a wildcard).
fn plugin_in_path(name: &str) -> Result<(), ApiError> {
    if crate::plugins::is_valid_plugin_name(name) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("plugin `{name}`")))
    }
}

/// A plugin named in a query: one no plugin file can have is `400 invalid_query`.
fn plugin_in_query(name: Option<&str>) -> Result<(), ApiError> {
    match name {
        Some(name) if !crate::plugins::is_valid_plugin_name(name) => Err(ApiError::bad_request(
            code::INVALID_QUERY,
            format!(
                "`plugin={name}` cannot name a plugin: names are 1 to 64 letters, digits, `-` or `_`"
            ),
        )),
        _ => Ok(()),
    }
}

/// A plugin as `GET /v1/plugins[/{name}]` answers it.
#[derive(Debug, Serialize)]
struct PluginView {
    name: String,
    file: String,
    loaded_at: String,
    load_error: Option<String>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(flatten)]
    running: Option<RunningView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lag: Option<u64>,
    pending_retries: u64,
    dead_letters: u64,
    /// Invocations on this host since it started that succeeded, and that failed.
    handled: u64,
    failed: u64,
    /// Whether deliveries run: the operator's pause and the circuit breaker.
    delivery: Option<DeliveryView>,
    /// The latest loads of its files, oldest first.
    history: Vec<ReloadView>,
}

/// One load of a plugin's files.
#[derive(Debug, Serialize)]
struct ReloadView {
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A recent failed attempt and its event.
#[derive(Debug, Serialize)]
struct RecentErrorView {
    event_id: String,
    #[serde(flatten)]
    error: AttemptView,
}

/// What only a serving plugin has.
#[derive(Debug, Serialize)]
struct RunningView {
    sha256: String,
    describe: DescribeView,
    version: String,
    /// The contract version the plugin was built against, such as `0.2.0`.
    contract: &'static str,
    subscriptions: Vec<String>,
    limits: LimitsView,
    policy: PolicyView,
    in_flight: u64,
    /// Attempts to reach outside the sandbox, refused, by kind (`file`, `socket`, `http`).
    refused: BTreeMap<&'static str, u64>,
    last_error: Option<AttemptView>,
    recent_errors: Vec<RecentErrorView>,
}

/// What the plugin's `describe()` returned.
#[derive(Debug, Serialize)]
struct DescribeView {
    name: String,
    version: String,
}

/// A plugin's limits.
#[derive(Debug, Serialize)]
struct LimitsView {
    fuel: u64,
    memory_bytes: u64,
    timeout_ms: u64,
}

/// A plugin's delivery policy.
#[derive(Debug, Serialize)]
struct PolicyView {
    concurrency: usize,
    ordering: Ordering,
    start: Start,
    instance: InstanceMode,
    max_calls: Option<u64>,
    retry: RetryView,
}

/// A plugin's retry policy, durations in milliseconds.
#[derive(Debug, Serialize)]
struct RetryView {
    max_attempts: u32,
    backoff: Backoff,
    initial_ms: u64,
    max_ms: u64,
    jitter: bool,
    max_age_ms: Option<u64>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RunningView {
    fn new(loaded: &LoadedPlugin) -> Self {
        let plugin = &loaded.plugin;
        let settings = plugin.settings();
        let policy = &loaded.policy;
        let (instance, max_calls) = match settings.isolation {
            Isolation::PerEvent => (InstanceMode::PerEvent, None),
            Isolation::Reuse { max_calls } => (InstanceMode::Reuse, Some(max_calls)),
        };
        Self {
            refused: plugin
                .refusals()
                .counts()
                .into_iter()
                .map(|(access, count)| (access.as_str(), count))
                .collect(),
            sha256: plugin.sha256().to_owned(),
            describe: DescribeView {
                name: plugin.info().name.clone(),
                version: plugin.info().version.clone(),
            },
            version: plugin.info().version.clone(),
            contract: plugin.info().contract,
            subscriptions: loaded
                .subscriptions
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            limits: LimitsView {
                fuel: settings.limits.fuel,
                memory_bytes: settings.limits.memory_bytes,
                timeout_ms: millis(settings.limits.timeout),
            },
            policy: PolicyView {
                concurrency: policy.concurrency,
                ordering: policy.ordering,
                start: policy.start,
                instance,
                max_calls,
                retry: RetryView {
                    max_attempts: policy.retry.max_attempts,
                    backoff: policy.retry.backoff,
                    initial_ms: millis(policy.retry.initial),
                    max_ms: millis(policy.retry.max),
                    jitter: policy.retry.jitter,
                    max_age_ms: policy.retry.max_age.map(millis),
                },
            },
            in_flight: loaded.state.in_flight(),
            last_error: loaded.state.last_error().as_ref().map(AttemptView::from),
            recent_errors: loaded
                .state
                .recent_errors()
                .iter()
                .map(|(event_id, error)| RecentErrorView {
                    event_id: event_id.clone(),
                    error: AttemptView::from(error),
                })
                .collect(),
        }
    }
}

/// Snapshot of one entry, taken under the table's lock; the bus's counters are added
/// after the lock is released.
fn entry_view(entry: &PluginEntry) -> PluginView {
    let (status, error, running) = match &entry.status {
        Err(error) => ("failed", Some(error.to_string()), None),
        Ok(loaded) => ("running", None, Some(RunningView::new(loaded))),
    };
    PluginView {
        name: entry.name.clone(),
        file: entry.file.display().to_string(),
        loaded_at: rfc3339_ms(entry.loaded_at_ms),
        load_error: entry.load_error.as_ref().map(ToString::to_string),
        status,
        error,
        running,
        cursor: None,
        lag: None,
        pending_retries: 0,
        dead_letters: 0,
        handled: 0,
        failed: 0,
        delivery: None,
        history: entry
            .history
            .iter()
            .map(|reload| ReloadView {
                at: rfc3339_ms(reload.at_ms),
                version: reload.loaded.as_ref().map(|(version, _)| version.clone()),
                sha256: reload.loaded.as_ref().map(|(_, sha)| sha.clone()),
                error: reload.error.clone(),
            })
            .collect(),
    }
}

fn views(state: &AppState, name: Option<&str>) -> Vec<PluginView> {
    let plugins = state
        .plugins
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let totals = state.metrics.totals();
    plugins
        .values()
        .filter(|e| name.is_none_or(|n| n == e.name))
        .map(|entry| {
            let mut view = entry_view(entry);
            if let Some(counts) = totals.plugins.get(&entry.name) {
                view.handled = counts.handled();
                view.failed = counts.failed();
            }
            view
        })
        .collect()
}

async fn with_consumer_stats(
    state: &AppState,
    mut view: PluginView,
) -> Result<PluginView, ApiError> {
    let stats = state
        .bus
        .consumer_stats(&view.name)
        .await
        .map_err(bus_error)?;
    if view.running.is_some() {
        view.cursor = Some(stats.cursor);
        view.lag = Some(stats.lag);
    }
    view.pending_retries = stats.pending_retries;
    view.dead_letters = stats.dead_letters;
    let control = state.valves.control(&view.name).await.map_err(bus_error)?;
    view.delivery = Some(DeliveryView::from(&control));
    Ok(view)
}

/// `GET /v1/plugins`: a page of plugins, by name.
#[derive(Debug, Serialize)]
struct PluginList {
    plugins: Vec<PluginView>,
    /// Plugins in the table, on every page.
    total: usize,
    /// The `after` of the next page, if there is one.
    next_after: Option<String>,
    /// The first [`ABSENT_SHOWN`] plugins by name that the bus keeps state for and no file
    /// here serves, on every page.
    absent: Vec<AbsentView>,
    /// How many such plugins there are.
    absent_total: usize,
}

/// A plugin the bus keeps a cursor for (with its retries, dead letters and KV) that no
/// file on this host serves: removed or renamed, or on NATS served by other hosts only.
/// `DELETE /v1/plugins/{name}` forgets one removed for good.
#[derive(Debug, Serialize)]
struct AbsentView {
    name: String,
    cursor: u64,
    lag: u64,
    pending_retries: u64,
    dead_letters: u64,
}

/// Most absent plugins one listing shows.
const ABSENT_SHOWN: usize = 100;

/// The plugins the bus keeps a cursor for that are not in this host's table, by name.
async fn absent_plugins(state: &AppState) -> Result<(Vec<AbsentView>, usize), ApiError> {
    use futures_util::{StreamExt, TryStreamExt};
    let mut names = state
        .bus
        .plugins_with_consumers()
        .await
        .map_err(bus_error)?;
    {
        let table = state
            .plugins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names.retain(|name| !table.contains_key(name));
    }
    names.sort();
    let total = names.len();
    names.truncate(ABSENT_SHOWN);
    let absent = futures_util::stream::iter(names)
        .map(|name| async move {
            let stats = state.bus.consumer_stats(&name).await.map_err(bus_error)?;
            Ok::<_, ApiError>(AbsentView {
                name,
                cursor: stats.cursor,
                lag: stats.lag,
                pending_retries: stats.pending_retries,
                dead_letters: stats.dead_letters,
            })
        })
        .buffered(STATS_READS)
        .try_collect()
        .await?;
    Ok((absent, total))
}

/// Query of `GET /v1/plugins`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PluginParams {
    /// Only plugins whose names sort after this one.
    after: Option<String>,
    /// At most this many (default: all).
    limit: Option<usize>,
}

/// Consumer counters read at once per page.
const STATS_READS: usize = 8;

/// `GET /v1/plugins?after=&limit=`.
pub(super) async fn list_plugins(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<PluginParams>,
) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    let all = views(&state, None);
    let total = all.len();
    let limit = params.limit.unwrap_or(usize::MAX).max(1);
    let mut page: Vec<PluginView> = all
        .into_iter()
        .filter(|v| params.after.as_ref().is_none_or(|after| &v.name > after))
        .take(limit.saturating_add(1))
        .collect();
    let next_after = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(|v| v.name.clone())
    });
    let plugins = futures_util::stream::iter(page)
        .map(|view| with_consumer_stats(&state, view))
        .buffered(STATS_READS)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let (absent, absent_total) = absent_plugins(&state).await?;
    Ok(Json(PluginList {
        plugins,
        total,
        next_after: next_after.flatten(),
        absent,
        absent_total,
    })
    .into_response())
}

/// `DELETE /v1/plugins/{name}`: forgets a plugin removed for good (its place in the log,
/// retries, dead letters, KV; see [`crate::bus::Bus::forget_plugin`]), so that it no
/// longer holds events back from retention. `409` while a plugin of that name is loaded
/// here, or (on NATS) served by another host.
pub(super) async fn forget_plugin(
    State(state): State<Arc<AppState>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    plugin_in_path(&name)?;
    let loaded = state
        .plugins
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains_key(&name);
    if loaded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            code::CONFLICT,
            format!(
                "plugin `{name}` is loaded on this host: remove its file from the plugin \
                 directory (of every host) first"
            ),
        ));
    }
    match state.bus.forget_plugin(&name).await {
        Ok(()) => {
            tracing::warn!(plugin = %name, "plugin forgotten by an operator: its cursor, retries, dead letters and KV are gone");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Err(BusError::Conflict(message)) => {
            Err(ApiError::new(StatusCode::CONFLICT, code::CONFLICT, message))
        }
        Err(error) => Err(bus_error(error)),
    }
}

/// `GET /v1/plugins/{name}`.
pub(super) async fn show_plugin(
    State(state): State<Arc<AppState>>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    let Some(view) = views(&state, Some(&name)).into_iter().next() else {
        return Err(ApiError::not_found(format!("plugin `{name}`")));
    };
    Ok(Json(with_consumer_stats(&state, view).await?).into_response())
}

/// Query of `GET /v1/plugins/{name}/kv`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeysParams {
    /// One key's value instead of a page of keys: for keys no path can name, such as
    /// `a/../b` (clients resolve `..` and `.` segments before they send a path).
    key: Option<String>,
    #[serde(default)]
    prefix: String,
    /// Only keys after this one, for the next page.
    after: Option<String>,
    limit: Option<usize>,
}

/// A page of a plugin's KV keys.
#[derive(Debug, Serialize)]
struct KeyPage {
    keys: Vec<String>,
    next_after: Option<String>,
}

/// `GET /v1/plugins/{name}/kv?prefix=&after=&limit=`: a page of keys, in order.
pub(super) async fn list_kv(
    State(state): State<Arc<AppState>>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(params): ApiQuery<KeysParams>,
) -> Result<Response, ApiError> {
    plugin_in_path(&name)?;
    if let Some(key) = params.key {
        return value_of(&state, &name, &key).await;
    }
    let limit = params.limit.unwrap_or(100).clamp(1, 1000);
    let mut keys = state
        .bus
        .keys(&name, &params.prefix)
        .await
        .map_err(ApiError::internal)?;
    keys.sort();
    let keys: Vec<String> = keys
        .into_iter()
        .filter(|key| params.after.as_ref().is_none_or(|after| key > after))
        .take(limit + 1)
        .collect();
    let more = keys.len() > limit;
    let keys: Vec<String> = keys.into_iter().take(limit).collect();
    let next_after = more.then(|| keys.last().cloned()).flatten();
    Ok(Json(KeyPage { keys, next_after }).into_response())
}

/// Query of `GET /v1/stats`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatsParams {
    /// How far back, such as `15m` (at most an hour).
    window: Option<String>,
    /// One plugin's series too.
    plugin: Option<String>,
    /// Lag series of this many plugins, the most behind first (default 8).
    top: Option<usize>,
}

/// `GET /v1/stats?window=15m&plugin=&top=`: the history the status page plots.
pub(super) async fn stats(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<StatsParams>,
) -> Result<Response, ApiError> {
    let window = match params.window.as_deref() {
        None => Duration::from_secs(15 * 60),
        Some(text) => crate::units::parse_duration(text)
            .map_err(|e| ApiError::bad_request(code::INVALID_QUERY, format!("`window`: {e}")))?,
    }
    .min(Duration::from_secs(3600));
    let view = state.stats.view(
        window,
        params.plugin.as_deref(),
        params.top.unwrap_or(8).min(50),
    );
    Ok(Json(view).into_response())
}

/// `GET /v1/plugins/{name}/kv/{key}`: the raw value.
pub(super) async fn read_kv(
    State(state): State<Arc<AppState>>,
    ApiPath((name, key)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    plugin_in_path(&name)?;
    value_of(&state, &name, &key).await
}

async fn value_of(state: &AppState, name: &str, key: &str) -> Result<Response, ApiError> {
    let value = state
        .bus
        .get(name, key)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found(format!("key `{key}` of plugin `{name}`")))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response())
}

fn dead_letter_view(letter: &DeadLetter) -> DeadLetterView<cloudevents::Rendered> {
    letter.view(cloudevents::to_json(&letter.stored.event))
}

/// `GET /v1/dlq`: a page of dead letters.
#[derive(Debug, Serialize)]
struct DeadLetterPage {
    dead_letters: Vec<DeadLetterView<cloudevents::Rendered>>,
    next_after: Option<u64>,
}

/// The answer of a replay.
#[derive(Debug, Serialize)]
struct Replayed {
    replayed: u64,
}

/// Query of `GET /v1/dlq`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeadLetterParams {
    plugin: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
    /// `rejected`, `exhausted`, `expired`, `effects`, `loop` or `schema`.
    reason: Option<DeadLetterReason>,
}

/// `GET /v1/dlq?plugin=&after=&limit=`.
pub(super) async fn list_dead_letters(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<DeadLetterParams>,
) -> Result<Response, ApiError> {
    plugin_in_query(params.plugin.as_deref())?;
    let limit = params.limit.unwrap_or(100).clamp(1, 1000);
    // One more than the page tells whether another page follows.
    let page = state
        .bus
        .dead_letters(DeadLetterQuery {
            plugin: params.plugin,
            after: params.after.unwrap_or(0),
            limit: limit + 1,
            reason: params.reason,
        })
        .await
        .map_err(bus_error)?;
    let mut letters = page.letters;
    let more = letters.len() > limit;
    letters.truncate(limit);
    // A read that stopped early (a reason filter on NATS reads a bounded number of
    // letters per request) goes on from where it stopped, even with no letter found.
    let next_after = if more {
        letters.last().map(|l| l.id)
    } else {
        page.scanned_to
    };
    Ok(Json(DeadLetterPage {
        dead_letters: letters.iter().map(dead_letter_view).collect(),
        next_after,
    })
    .into_response())
}

/// `GET /v1/dlq/{id}`.
pub(super) async fn show_dead_letter(
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Response, ApiError> {
    let letter = state.bus.dead_letter(id).await.map_err(bus_error)?;
    Ok(Json(dead_letter_view(&letter)).into_response())
}

/// `POST /v1/dlq/{id}/replay`.
pub(super) async fn replay_one(
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Response, ApiError> {
    replay(&state, DeadLetterSelection::One(id)).await
}

/// Replays dead letters (see `DeadLetters::replay_dead_letters`) and answers how many.
async fn replay(state: &AppState, which: DeadLetterSelection) -> Result<Response, ApiError> {
    let replayed = state
        .bus
        .replay_dead_letters(&which)
        .await
        .map_err(bus_error)?;
    Ok((StatusCode::ACCEPTED, Json(Replayed { replayed })).into_response())
}

/// Query of `POST /v1/dlq/replay` and `DELETE /v1/dlq`: one plugin's dead letters, or
/// only those dead-lettered for `reason`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PluginDeadLetters {
    plugin: Option<String>,
    reason: Option<DeadLetterReason>,
}

impl PluginDeadLetters {
    /// The selection; `plugin` is required, so that no request takes every plugin's at
    /// once by leaving it out.
    fn selection(self, route: &str) -> Result<DeadLetterSelection, ApiError> {
        plugin_in_query(self.plugin.as_deref())?;
        match self.plugin {
            Some(plugin) => Ok(DeadLetterSelection::Plugin {
                plugin,
                reason: self.reason,
            }),
            None => Err(ApiError::bad_request(
                code::INVALID_QUERY,
                format!("`plugin` is required: {route}?plugin=NAME[&reason=REASON]"),
            )),
        }
    }
}

/// `POST /v1/dlq/replay?plugin=NAME[&reason=]`: every dead letter of one plugin.
pub(super) async fn replay_plugin(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<PluginDeadLetters>,
) -> Result<Response, ApiError> {
    replay(&state, params.selection("POST /v1/dlq/replay")?).await
}

/// `DELETE /v1/dlq/{id}`.
pub(super) async fn delete_dead_letter(
    State(state): State<Arc<AppState>>,
    ApiPath(id): ApiPath<u64>,
) -> Result<Response, ApiError> {
    state
        .bus
        .delete_dead_letters(&DeadLetterSelection::One(id))
        .await
        .map_err(bus_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The answer of a deletion of many.
#[derive(Debug, Serialize)]
struct Deleted {
    deleted: u64,
}

/// `DELETE /v1/dlq?plugin=NAME[&reason=]`: every dead letter of one plugin; answers how
/// many went.
pub(super) async fn delete_plugin_dead_letters(
    State(state): State<Arc<AppState>>,
    ApiQuery(params): ApiQuery<PluginDeadLetters>,
) -> Result<Response, ApiError> {
    let which = params.selection("DELETE /v1/dlq")?;
    let deleted = state
        .bus
        .delete_dead_letters(&which)
        .await
        .map_err(bus_error)?;
    Ok(Json(Deleted { deleted }).into_response())
}

/// `GET /v1/backup`: a consistent copy of the embedded log, taken while the host serves,
/// as an SQLite file (`switchyard backup` fetches, checks and saves it). On NATS
/// JetStream the server keeps everything and its own tools back it up: `409`.
///
/// `HEAD` answers what a `GET` would (`409`, `507` for a disk without room, or the
/// headers) without taking a copy, so it has no `Content-Length`: the size is known only
/// once the copy is made (RFC 9110 §9.3.2).
pub(super) async fn backup(
    method: Method,
    State(state): State<Arc<AppState>>,
) -> Result<Response, ApiError> {
    let refused = |error| match error {
        BusError::Unsupported(why) => ApiError::new(StatusCode::CONFLICT, code::CONFLICT, why),
        BusError::NoRoom(why) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            code::INSUFFICIENT_STORAGE,
            why,
        ),
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code::INTERNAL,
            format!("the backup failed: {other}"),
        ),
    };
    let name = format!(
        "attachment; filename=\"switchyard-{}.db\"",
        crate::clock::now_rfc3339().replace(':', "-")
    );
    let described = [
        (header::CONTENT_TYPE, "application/vnd.sqlite3".to_owned()),
        (header::CONTENT_DISPOSITION, name),
        (header::CACHE_CONTROL, "no-store".to_owned()),
    ];
    if method == Method::HEAD {
        state.bus.backup_ready().await.map_err(refused)?;
        // A body of unknown length, so that no `Content-Length: 0` is made up for it.
        let nothing = futures_util::stream::empty::<Result<bytes::Bytes, std::io::Error>>();
        return Ok((described, axum::body::Body::from_stream(nothing)).into_response());
    }
    let (file, bytes) = state.bus.backup().await.map_err(refused)?;
    let chunks =
        futures_util::stream::try_unfold(tokio::fs::File::from_std(file), |mut file| async move {
            let mut chunk = vec![0; 256 << 10];
            let read = tokio::io::AsyncReadExt::read(&mut file, &mut chunk).await?;
            if read == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            chunk.truncate(read);
            Ok(Some((bytes::Bytes::from(chunk), file)))
        });
    Ok((
        described,
        [(header::CONTENT_LENGTH, bytes.to_string())],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

/// `GET /healthz`: the process is up.
pub(super) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The answer of `GET /healthz` and `GET /readyz`.
#[derive(Debug, Serialize)]
pub(super) struct Health {
    status: &'static str,
}

/// `GET /readyz`: plugins are loaded and dispatching, and the bus can be reached, so a
/// load balancer sends producers to another host while this one has lost its server.
pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    if !state.ready.load(std::sync::atomic::Ordering::Acquire) {
        return Err(ApiError::unavailable("starting or shutting down", 1));
    }
    if !state.bus.reach().connected {
        return Err(ApiError::unavailable(super::gate::UNREACHABLE, 1));
    }
    Ok(Json(Health { status: "ready" }))
}

/// `GET /metrics`: Prometheus text. A page costs a read of the bus per plugin and the
/// route takes no token, so one page is made at a time, and a scrape that waited while
/// one was made takes that page: a flood of scrapes costs the bus one page at a time,
/// and a scrape never sees a page made before it came.
pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let came = std::time::Instant::now();
    let mut last = state.scrape.lock().await;
    let page = match last.as_ref() {
        Some((made, page)) if *made >= came => page.clone(),
        _ => {
            let started = std::time::Instant::now();
            let page = render_metrics(&state).await;
            *last = Some((started, page.clone()));
            page
        }
    };
    drop(last);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], page).into_response()
}

async fn render_metrics(state: &AppState) -> String {
    // A scrape must answer while the bus is down, when it matters most: the gauges the
    // bus keeps are then left out rather than waited for.
    let bus = state.bus.reach();
    let mut gauges = BTreeMap::new();
    // A plugin whose files failed to load keeps its series: its dead letters and lag are
    // still there, and alerts on them must not clear as it fails.
    for view in views(state, None) {
        let running = view.running.as_ref();
        let consumer = if bus.connected {
            state.bus.consumer_stats(&view.name).await.ok()
        } else {
            None
        };
        let control = state.valves.control(&view.name).await.unwrap_or_default();
        gauges.insert(
            view.name.clone(),
            PluginGauges {
                consumer,
                in_flight: running.map_or(0, |running| running.in_flight),
                paused: control.paused.is_some(),
                breaker_open: control.breaker != Breaker::Closed,
                serving: running.is_some(),
                refused: Access::ALL.map(|access| {
                    running
                        .and_then(|running| running.refused.get(access.as_str()).copied())
                        .unwrap_or(0)
                }),
            },
        );
    }
    state.metrics.render(
        &gauges,
        state
            .runtime
            .as_ref()
            .map(|r| r.cache_stats())
            .unwrap_or_default(),
        bus,
    )
}
