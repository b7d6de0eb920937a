//! A plugin's stdout and stderr, sent line by line to the host's log.
//!
//! Each line is logged with the plugin's name; a line longer than [`MAX_LINE`] is cut.
//! The tail of stderr is also kept per invocation so that a trap can be reported with
//! what the plugin printed last (a Rust panic prints its message there before trapping,
//! Python its traceback, the JavaScript SDK the exception and its stack).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Longest line logged; the rest of a longer line is dropped.
const MAX_LINE: usize = 4096;
/// How much of stderr's tail is kept for trap reports.
const MAX_TAIL: usize = 8192;

/// Which of the two output streams this is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// The last bytes a plugin wrote to stderr during the current invocation.
#[derive(Debug, Clone, Default)]
pub(crate) struct StderrTail(Arc<Mutex<Vec<u8>>>);

impl StderrTail {
    fn push(&self, bytes: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        tail.extend_from_slice(bytes);
        if tail.len() > MAX_TAIL {
            let excess = tail.len() - MAX_TAIL;
            tail.drain(..excess);
        }
    }

    /// Takes the tail's text, trimmed, leaving it empty for the next invocation.
    pub(crate) fn take(&self) -> String {
        let mut tail = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let text = String::from_utf8_lossy(&tail).trim().to_owned();
        tail.clear();
        text
    }
}

/// An output stream of one plugin instance.
#[derive(Clone)]
pub(crate) struct PluginOutput {
    plugin: Arc<str>,
    stream: Stream,
    tail: Option<StderrTail>,
}

impl PluginOutput {
    pub(crate) fn stdout(plugin: Arc<str>) -> Self {
        Self {
            plugin,
            stream: Stream::Stdout,
            tail: None,
        }
    }

    pub(crate) fn stderr(plugin: Arc<str>, tail: StderrTail) -> Self {
        Self {
            plugin,
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
        let text = String::from_utf8_lossy(&self.line);
        let plugin = &*self.output.plugin;
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
