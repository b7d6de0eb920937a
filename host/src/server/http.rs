//! The HTTP listener: accepts connections and serves the API router on each with hyper's
//! HTTP/1 server, which — unlike `axum::serve` — can bound how long a client takes to
//! send a request's head.
//!
//! Lifecycle: every accepted connection runs in its own task. A connection whose request
//! line and headers do not arrive within `http.header_timeout` is closed without an
//! answer (hyper's header read timeout, driven by the tokio timer), so a client trickling
//! its headers cannot hold a connection; nor can one that stops reading: a write that
//! makes no progress for `http.request_timeout` closes the connection ([`WriteDeadline`]). When `shutdown` resolves, the listener stops
//! accepting, every connection finishes the request it is serving and closes, and
//! [`serve_http`] returns once all of them have.
//!
//! Failure modes: an error accepting one connection (a reset, or the process out of file
//! descriptors) is logged and the loop goes on, pausing briefly when descriptors run
//! out; an error on one connection ends only that connection.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

/// How long the loop pauses after an accept error that is not about one connection
/// (file descriptors exhausted), so it does not spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How long a connection may take: to send a request's head, and to take a write.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// `http.header_timeout`.
    pub header: Duration,
    /// How long a write may wait for the client to read (`http.request_timeout`).
    pub write: Duration,
}

/// Serves `router` on `listener` until `shutdown` resolves and open connections finish.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    deadlines: Deadlines,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    // Connections watch `stop`; the loop waits for every clone of `done` to be dropped.
    let (stop, stopping) = watch::channel(false);
    let (all_done, done) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    if !is_connection_error(&error) {
                        tracing::error!(%error, "cannot accept a connection");
                        tokio::time::sleep(ACCEPT_PAUSE).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(
            router
                .clone()
                .map_request(|request: Request<Incoming>| request.map(Body::new)),
        );
        let mut stopping = stopping.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(deadlines.header);
            let stream = WriteDeadline {
                inner: stream,
                limit: deadlines.write,
                stalled: None,
            };
            let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
            let mut closing = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                        break;
                    }
                    changed = stopping.changed(), if !closing => {
                        closing = true;
                        if changed.is_ok() {
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            drop(done);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(stopping);
    drop(done);
    all_done.closed().await;
}

pin_project_lite::pin_project! {
    /// A connection whose writes fail once one has waited `limit` for the client to read:
    /// a client that sends requests and reads nothing would otherwise hold its answers,
    /// and the connection, for ever.
    struct WriteDeadline<S> {
        #[pin]
        inner: S,
        limit: Duration,
        stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<S: AsyncRead> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> WriteDeadline<S> {
    /// `polled` of a write, failed once writes have been pending for `limit`.
    fn deadline<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        polled: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let this = self.project();
        match polled(this.inner, cx) {
            Poll::Ready(done) => {
                *this.stalled = None;
                Poll::Ready(done)
            }
            Poll::Pending => {
                let limit = *this.limit;
                let stalled = this
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the client read nothing for {}",
                            humantime::format_duration(limit)
                        ),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.deadline(cx, |inner, cx| inner.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.deadline(cx, |inner, cx| inner.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.deadline(cx, AsyncWrite::poll_flush)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Errors that concern only the connection being accepted; the listener is fine.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
