//! The HTTP listener: accepts connections and serves the API router on each with hyper's
//! HTTP/1 server, which — unlike `axum::serve` — can bound how long a client takes to
//! send a request's head.
//!
//! Lifecycle: every accepted connection runs in its own task. A connection whose request
//! line and headers do not arrive within `http.header_timeout` is closed without an
//! answer (hyper's header read timeout, driven by the tokio timer), so a client trickling
//! its headers cannot hold a connection. When `shutdown` resolves, the listener stops
//! accepting, every connection finishes the request it is serving and closes, and
//! [`serve_http`] returns once all of them have.
//!
//! Failure modes: an error accepting one connection (a reset, or the process out of file
//! descriptors) is logged and the loop goes on, pausing briefly when descriptors run
//! out; an error on one connection ends only that connection.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

/// How long the loop pauses after an accept error that is not about one connection
/// (file descriptors exhausted), so it does not spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` resolves and open connections finish.
pub async fn serve_http(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
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
                .header_read_timeout(header_timeout);
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

/// Errors that concern only the connection being accepted; the listener is fine.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
