//! The process's logs and traces: the log lines on standard error (text or JSON), and,
//! when `[telemetry] otlp_endpoint` is set, the spans of each event's path exported over
//! OTLP/HTTP.
//!
//! Spans of the event path (`ingest.receive`, `log.append`, `dispatch.deliver`,
//! `runtime.invoke`, `dispatch.commit`) use the target [`FLOW`]. The log layer never
//! takes that target and the export layer exists only with an endpoint, so without one
//! no layer is interested in those spans: their macros return a disabled span after one
//! cached check, and tracing costs nothing.
//!
//! Trace context travels with events as the CloudEvents distributed-tracing extension
//! `traceparent` (W3C trace context): [`set_parent`] continues a trace from it and
//! [`traceparent_of`] names a span for the events it causes.
//!
//! Export never holds up events: at most [`EXPORT_QUEUE`] spans wait for it, and every
//! span not exported (the queue full, or its export failed) is counted
//! ([`spans_dropped`], `switchyard_trace_spans_dropped_total`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider, SpanProcessor,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The target of the event path's spans.
pub const FLOW: &str = "switchyard::flow";

/// The CloudEvents extension (and HTTP header) carrying W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The CloudEvents extension (and HTTP header) carrying the vendors' part of W3C trace
/// context, which travels unchanged with its `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// Whether `value` may travel as a `tracestate`: at most 512 characters of printable
/// ASCII, as W3C Trace Context (section 3.3) has a propagator keep it. Its list members
/// are the vendors' to read; the host only carries them.
pub fn valid_tracestate(value: &str) -> bool {
    value.len() <= 512 && value.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// Whether spans are exported (set once, at [`init`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Spans waiting for export at most; more are dropped, and counted.
const EXPORT_QUEUE: usize = 2048;

/// Spans dropped because [`EXPORT_QUEUE`] spans were already waiting for export.
static DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);

/// Spans in exports that failed.
static LOST_IN_EXPORT: AtomicU64 = AtomicU64::new(0);

/// Spans not exported since the process started, by reason (`queue_full`,
/// `export_failed`); empty without export.
pub fn spans_dropped() -> Vec<(&'static str, u64)> {
    if !exporting() {
        return Vec::new();
    }
    vec![
        ("queue_full", DROPPED_QUEUE_FULL.load(Ordering::Relaxed)),
        ("export_failed", LOST_IN_EXPORT.load(Ordering::Relaxed)),
    ]
}

/// The share of traces starting here that are recorded, as `f64` bits (set at [`init`]).
static SAMPLE_RATIO: AtomicU64 = AtomicU64::new(0);

/// Whether this process exports traces; when not, no span of the event path exists.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Whether the path of an event with this trace context is recorded: never without
/// export; else the sampled flag of its `traceparent`, or, for a trace that starts here,
/// a draw at `sample_ratio`. An unrecorded path makes no span at all, so sampling saves
/// the spans' whole cost, not only their export.
pub fn sampled(traceparent: Option<&str>) -> bool {
    if !exporting() {
        return false;
    }
    match traceparent.and_then(trace_flags) {
        Some(flags) => flags & 1 == 1,
        None => rand::random::<f64>() < f64::from_bits(SAMPLE_RATIO.load(Ordering::Relaxed)),
    }
}

/// Whether `value` is a `traceparent` as W3C Trace Context (level 1, section 3.2) has a
/// receiver accept; one that is not is ignored, as if absent, and a new trace starts.
pub fn valid_traceparent(value: &str) -> bool {
    trace_flags(value).is_some()
}

/// The flags of a valid W3C `traceparent` (`VERSION-TRACE-PARENT-FLAGS`): lower-case hex
/// fields of 2, 32, 16 and 2 digits, neither id all zeros, and a version other than
/// `ff`; version `00` has exactly those four fields, a later one may add more.
fn trace_flags(traceparent: &str) -> Option<u8> {
    let hex = |field: &str, digits: usize| {
        field.len() == digits
            && field
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let nonzero = |field: &str| field.bytes().any(|b| b != b'0');
    let mut parts = traceparent.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let well_formed = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2);
    well_formed
        .then(|| u8::from_str_radix(flags, 16).ok())
        .flatten()
}

/// A new trace context marked not sampled, for a trace that starts here and was not drawn:
/// its events and their follow-ups carry the decision, so none of them makes spans.
pub fn unsampled_traceparent() -> String {
    let trace = rand::random::<u128>().max(1);
    let span = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-00")
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the fields as keys.
    Json,
}

/// What must be flushed before the process exits.
#[must_use = "shut down to export the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Longest the last export may take at exit.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The log filter: `RUST_LOG`, or `info`; never the event path's spans.
fn log_filter() -> EnvFilter {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match format!("{FLOW}=off").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Installs the process's logging, and trace export to the OTLP/HTTP `endpoint` if any,
/// as `service` (default `switchyard`). An exporter that cannot be built is reported on
/// standard error and left out.
pub fn init(format: LogFormat, export: Option<&Export>) -> Telemetry {
    let log = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(log_filter())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(log_filter())
            .boxed(),
    };
    let provider = export.and_then(|export| match provider(export) {
        Ok(provider) => Some(provider),
        Err(error) => {
            eprintln!(
                "error: cannot export traces to {}: {error}",
                export.endpoint
            );
            None
        }
    });
    let exporting = provider.as_ref().map(|provider| {
        // The event path's spans, and warnings and errors within them as span events.
        let exported = Targets::new()
            .with_target(FLOW, tracing::Level::TRACE)
            .with_target("switchyard_host", tracing::Level::WARN);
        // Only what a trace of the event path needs: no source locations, thread names or
        // busy/idle times, whose bookkeeping runs on every poll of an instrumented future.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("switchyard"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(exported)
    });
    let installed = tracing_subscriber::registry()
        .with(log)
        .with(exporting)
        .try_init()
        .is_ok();
    EXPORTING.store(installed && provider.is_some(), Ordering::Relaxed);
    if let Some(export) = export {
        SAMPLE_RATIO.store(export.sample_ratio.to_bits(), Ordering::Relaxed);
    }
    Telemetry { provider }
}

/// Where and how much to export.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    /// The OTLP/HTTP traces endpoint.
    pub endpoint: String,
    /// The `service.name` of the spans.
    pub service: String,
    /// The share of traces started here that are recorded, from 0 to 1; a trace
    /// continued from a producer's `traceparent` follows the producer's decision.
    pub sample_ratio: f64,
}

fn provider(export: &Export) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(&export.endpoint)
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    // The host draws at `sample_ratio` before it makes a trace's first span ([`sampled`]),
    // so every root span it makes is one to record: drawn again here, the share recorded
    // would be the ratio squared.
    let sampler = Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
    let queued = Arc::new(AtomicUsize::new(0));
    let batches = BatchSpanProcessor::builder(Reporting::new(
        exporter,
        &export.endpoint,
        Arc::clone(&queued),
    ))
    .with_batch_config(
        BatchConfigBuilder::default()
            .with_max_queue_size(EXPORT_QUEUE)
            .build(),
    )
    .build();
    Ok(SdkTracerProvider::builder()
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(export.service.clone())
                .build(),
        )
        .with_sampler(sampler)
        .with_span_processor(Bounded {
            inner: batches,
            queued,
        })
        .build())
}

/// The batch processor behind a count of the spans waiting for export, which drops (and
/// counts) a span that finds [`EXPORT_QUEUE`] waiting: the SDK drops such spans too, but
/// tells only its own internal log. A span leaves the count when its batch goes to the
/// exporter, a little after it leaves the SDK's queue, so this drops first.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: opentelemetry_sdk::trace::SpanData) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= EXPORT_QUEUE {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            DROPPED_QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// The log target of the exporter's own warnings: not one the export layer takes, so a
/// warning about exporting is never itself a span event to export.
const EXPORTER_LOG: &str = "switchyard::exporter";

/// Longest the exporter stays silent about failing exports.
const EXPORT_FAILURE_REPORT: Duration = Duration::from_secs(60);

/// An exporter that says when its exports fail: the SDK reports them only through its
/// own internal logs, which the host does not build, so a collector refusing every span
/// (a wrong path, a proxy's error page) would otherwise go unnoticed. The first failure
/// is logged at once, later ones at most once a minute with their count.
#[derive(Debug)]
struct Reporting<E> {
    inner: E,
    endpoint: String,
    /// Failed exports not reported yet, and when the last report was.
    unreported: std::sync::Mutex<(u64, u64, Option<std::time::Instant>)>,
    /// [`Bounded`]'s count of the spans waiting, which an export takes its batch off.
    queued: Arc<AtomicUsize>,
}

impl<E> Reporting<E> {
    fn new(inner: E, endpoint: &str, queued: Arc<AtomicUsize>) -> Self {
        Self {
            inner,
            endpoint: endpoint.to_owned(),
            unreported: std::sync::Mutex::new((0, 0, None)),
            queued,
        }
    }

    fn report(&self, spans: usize, error: &opentelemetry_sdk::error::OTelSdkError) {
        LOST_IN_EXPORT.fetch_add(spans as u64, Ordering::Relaxed);
        let mut unreported = self
            .unreported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (exports, lost, last) = &mut *unreported;
        *exports += 1;
        *lost += spans as u64;
        if last.is_some_and(|at| at.elapsed() < EXPORT_FAILURE_REPORT) {
            return;
        }
        tracing::warn!(
            target: EXPORTER_LOG,
            endpoint = %self.endpoint,
            failed_exports = *exports,
            spans_lost = *lost,
            "cannot export traces: {error}"
        );
        *last = Some(std::time::Instant::now());
        *exports = 0;
        *lost = 0;
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Reporting<E>
{
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let spans = batch.len();
        self.queued.fetch_sub(spans, Ordering::AcqRel);
        let exported = self.inner.export(batch).await;
        if let Err(error) = &exported {
            self.report(spans, error);
        }
        exported
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

impl Telemetry {
    /// Exports the spans not sent yet and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The exporter blocks its caller on its own thread's work.
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(error) = provider.shutdown() {
                eprintln!("error: exporting the last traces: {error}");
            }
        })
        .await;
    }
}

/// Continues the trace `traceparent` names in `span` (before the span is first entered);
/// a malformed value, or a disabled span, leaves it as it is.
pub fn set_parent(span: &Span, traceparent: &str, tracestate: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let mut carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    if let Some(tracestate) = tracestate {
        carrier.insert(TRACESTATE.to_owned(), tracestate.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}

/// The `traceparent` naming `span`, for the events it causes; `None` when the span is
/// disabled (no trace export).
pub fn traceparent_of(span: &Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let mut carrier = HashMap::<String, String>::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_flags_are_read_from_a_well_formed_traceparent_only() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let parent = "00f067aa0ba902b7";
        assert_eq!(trace_flags(&format!("00-{id}-{parent}-01")), Some(1));
        assert_eq!(trace_flags(&format!("00-{id}-{parent}-00")), Some(0));
        assert_eq!(trace_flags(&unsampled_traceparent()), Some(0));
        // A later version is read by the fields this one knows.
        assert_eq!(
            trace_flags(&format!("cc-{id}-{parent}-01-what-comes")),
            Some(1)
        );
        let zeros = "0".repeat(32);
        for invalid in [
            "00-short-00f067aa0ba902b7-01".to_owned(),
            format!("00-{id}-{parent}-01-x"),
            format!("ff-{id}-{parent}-01"),
            format!("0-{id}-{parent}-01"),
            format!("00-{zeros}-{parent}-01"),
            format!("00-{id}-0000000000000000-01"),
            format!("00-{}-{parent}-01", id.to_uppercase()),
            format!("00-{id}-{}-01", "00F067AA0BA902B7"),
            format!("00-{id}-{parent}-1"),
            format!("00-{id}-{parent}-+1"),
            format!("00-{id}-{parent}-0g"),
            format!("00-{}-{parent}-01", "z".repeat(32)),
            "abc".to_owned(),
        ] {
            assert_eq!(trace_flags(&invalid), None, "{invalid}");
            assert!(!valid_traceparent(&invalid), "{invalid}");
        }
    }
}
