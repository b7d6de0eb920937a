//! A plugin's stdout and stderr, sent line by line to the host's log.
//!
//! Each line is logged with the plugin's name; a line longer than [`MAX_LINE`] is cut.
//! A plugin's lines (these and its `log` calls) are limited to [`LOG_LINES_PER_SECOND`]
//! with bursts of [`LOG_BURST`] ([`LogBudget`]): a handler logging in a loop would otherwise
//! fill the host's log and its disk. What is dropped is counted and said.
//! The tail of stderr is also kept per invocation so that a trap can be reported with
//! what the plugin printed last (a Rust panic prints its message there before trapping,
//! Python its traceback, the JavaScript SDK the exception and its stack). A report longer
//! than the tail keeps its first lines too ([`REPORT_HEAD`]): they name the exception.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest line logged; the rest of a longer line is dropped.
const MAX_LINE: usize = 4096;
/// How much of stderr's tail is kept for trap reports.
const MAX_TAIL: usize = 8192;
/// How much of the start of an exception report is kept when the report outgrows the tail.
const REPORT_HEAD: usize = 2048;
/// Lines that start an exception report (Python's traceback, the JavaScript SDK's).
const REPORT_STARTS: [&[u8]; 2] = [b"Traceback (most recent call last):", b"Uncaught "];

/// Lines a plugin may log per second, over its bursts.
const LOG_LINES_PER_SECOND: f64 = 1000.0;
/// Lines a plugin may log at once.
const LOG_BURST: f64 = 5000.0;
/// How often a plugin whose lines are dropped is told about, at most.
const DROPS_SAID_EVERY: Duration = Duration::from_secs(10);

/// The log lines one plugin may still write: a token bucket shared by its instances.
#[derive(Debug)]
pub(crate) struct LogBudget(Mutex<Bucket>);

#[derive(Debug)]
struct Bucket {
    lines: f64,
    refilled: Instant,
    /// Lines dropped since the drops were last said.
    dropped: u64,
    said: Option<Instant>,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self(Mutex::new(Bucket {
            lines: LOG_BURST,
            refilled: Instant::now(),
            dropped: 0,
            said: None,
        }))
    }
}

impl LogBudget {
    /// Whether `plugin` may log one more line now; a drop is counted and, now and then,
    /// said in the host's own log.
    pub(crate) fn allow(&self, plugin: &str) -> bool {
        let mut bucket = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let earned = now.duration_since(bucket.refilled).as_secs_f64() * LOG_LINES_PER_SECOND;
        bucket.lines = (bucket.lines + earned).min(LOG_BURST);
        bucket.refilled = now;
        if bucket.lines >= 1.0 {
            bucket.lines -= 1.0;
            return true;
        }
        bucket.dropped += 1;
        if bucket
            .said
            .is_none_or(|said| now.duration_since(said) >= DROPS_SAID_EVERY)
        {
            tracing::warn!(
                plugin,
                dropped = bucket.dropped,
                "the plugin logs more than {LOG_LINES_PER_SECOND} lines a second; lines over \
                 that are dropped"
            );
            bucket.said = Some(now);
            bucket.dropped = 0;
        }
        false
    }
}

/// Which of the two output streams this is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// The last bytes a plugin wrote to stderr during the current invocation.
#[derive(Debug, Clone, Default)]
pub(crate) struct StderrTail(Arc<Mutex<Tail>>);

#[derive(Debug, Default)]
struct Tail {
    /// The start of the last exception report, once the report outgrew [`MAX_TAIL`].
    head: Vec<u8>,
    /// What followed `head` (or everything, without one), its last [`MAX_TAIL`] bytes.
    rest: Vec<u8>,
    /// Whether `rest` starts with an exception report's first line.
    report_at_start: bool,
}

impl StderrTail {
    fn push(&self, bytes: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let tail = &mut *tail;
        let bytes = match report_start(bytes) {
            // A new report: what came before it is not part of it.
            Some(start) => {
                tail.head.clear();
                tail.rest.clear();
                tail.report_at_start = true;
                &bytes[start..]
            }
            None => bytes,
        };
        tail.rest.extend_from_slice(bytes);
        if tail.rest.len() > MAX_TAIL {
            if tail.report_at_start {
                let cut = tail.rest[..REPORT_HEAD]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(REPORT_HEAD, |end| end + 1);
                tail.head = tail.rest[..cut].to_vec();
                tail.head.extend_from_slice(b"  ...\n");
                tail.report_at_start = false;
            }
            let excess = tail.rest.len() - MAX_TAIL;
            tail.rest.drain(..excess);
        }
    }

    /// Takes the tail's text, trimmed, leaving it empty for the next invocation.
    pub(crate) fn take(&self) -> String {
        let mut tail = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut bytes = std::mem::take(&mut tail.head);
        bytes.append(&mut tail.rest);
        tail.report_at_start = false;
        String::from_utf8_lossy(&bytes).trim().to_owned()
    }
}

/// Where in `bytes` the last line that starts an exception report begins.
fn report_start(bytes: &[u8]) -> Option<usize> {
    let mut start = None;
    let mut line = 0;
    for (index, byte) in bytes.iter().enumerate() {
        if index == line && REPORT_STARTS.iter().any(|s| bytes[line..].starts_with(s)) {
            start = Some(line);
        }
        if *byte == b'\n' {
            line = index + 1;
        }
    }
    start
}

/// An output stream of one plugin instance.
#[derive(Clone)]
pub(crate) struct PluginOutput {
    plugin: Arc<str>,
    budget: Arc<LogBudget>,
    stream: Stream,
    tail: Option<StderrTail>,
}

impl PluginOutput {
    pub(crate) fn stdout(plugin: Arc<str>, budget: Arc<LogBudget>) -> Self {
        Self {
            plugin,
            budget,
            stream: Stream::Stdout,
            tail: None,
        }
    }

    pub(crate) fn stderr(plugin: Arc<str>, budget: Arc<LogBudget>, tail: StderrTail) -> Self {
        Self {
            plugin,
            budget,
            stream: Stream::Stderr,
            tail: Some(tail),
        }
    }
}

impl IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            output: self.clone(),
            line: Vec::new(),
        })
    }
}

struct LineLogger {
    output: PluginOutput,
    line: Vec<u8>,
}

impl LineLogger {
    fn flush_line(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let plugin = &*self.output.plugin;
        if !self.output.budget.allow(plugin) {
            self.line.clear();
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        match self.output.stream {
            Stream::Stdout => {
                tracing::info!(target: "switchyard::plugin", plugin, stream = "stdout", "{text}")
            }
            Stream::Stderr => {
                tracing::warn!(target: "switchyard::plugin", plugin, stream = "stderr", "{text}")
            }
        }
        self.line.clear();
    }

    fn write_bytes(&mut self, bytes: &[u8]) {
        if let Some(tail) = &self.output.tail {
            tail.push(bytes);
        }
        for chunk in bytes.split_inclusive(|b| *b == b'\n') {
            let (content, ends_line) = match chunk.strip_suffix(b"\n") {
                Some(content) => (content, true),
                None => (chunk, false),
            };
            let room = MAX_LINE.saturating_sub(self.line.len());
            self.line
                .extend_from_slice(&content[..content.len().min(room)]);
            if ends_line {
                self.flush_line();
            }
        }
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().flush_line();
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        self.flush_line();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_lines_is_cut_to_the_budget() {
        let budget = LogBudget::default();
        let started = Instant::now();
        let allowed = (0..20_000).filter(|_| budget.allow("p")).count();
        let earned = started.elapsed().as_secs_f64() * LOG_LINES_PER_SECOND;
        assert!(allowed >= 5000, "{allowed}");
        assert!((allowed as f64) <= LOG_BURST + earned + 1.0, "{allowed}");
    }

    #[test]
    fn a_long_report_keeps_its_first_lines_and_its_end() {
        let tail = StderrTail::default();
        tail.push(b"noise before\n");
        tail.push(b"Traceback (most recent call last):\n");
        for n in 0..1000 {
            tail.push(format!("  File \"app.py\", line {n}, in f\n").as_bytes());
        }
        tail.push(b"RecursionError: maximum recursion depth exceeded\n");
        let text = tail.take();
        assert!(
            text.starts_with("Traceback (most recent call last):\n  File"),
            "{text}"
        );
        assert!(text.contains("  ...\n"), "{text}");
        assert!(text.ends_with("RecursionError: maximum recursion depth exceeded"));
        assert!(text.len() <= MAX_TAIL + REPORT_HEAD + 16, "{}", text.len());
        assert_eq!(tail.take(), "");
    }

    #[test]
    fn a_short_report_is_kept_whole_without_what_came_before() {
        let tail = StderrTail::default();
        tail.push(b"earlier\nUncaught TypeError: x is null\nhandle@app.js:1:1\n");
        assert_eq!(
            tail.take(),
            "Uncaught TypeError: x is null\nhandle@app.js:1:1"
        );
    }
}
