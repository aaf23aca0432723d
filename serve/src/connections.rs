//! Accepting connections (HTTP/1.1, as vLLM's uvicorn): a stalled client cannot hold the server.
//!
//! - A connection must deliver a request's headers within the header timeout, counted from when
//!   it opens or its previous response ends (hyper starts the timer whenever it waits for a
//!   request), so the same timeout closes idle keep-alive connections. The body has its own
//!   deadline (`request_body`).
//! - On the shutdown signal the listener closes, idle connections close, and those with a request
//!   in flight finish it; whatever is still open after the shutdown timeout is dropped (a stream
//!   is cut, the engine frees its row) and the server stops anyway.
use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionTimeouts {
    /// For a request's headers, and so for an idle keep-alive connection.
    pub header: Duration,
    /// From the shutdown signal until the server stops, whatever the clients do.
    pub shutdown: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains the connections for at most
/// `timeouts.shutdown`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    timeouts: ConnectionTimeouts,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    let service = TowerToHyperService::new(app);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: the open connections go on; try again
                    // shortly (as axum::serve does).
                    eprintln!("overfill serve: accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            // A client that goes away or times out ends its connection; nothing to report.
            let _ = connection.await;
        });
    }
    drop(listener);
    let open = graceful.count();
    if tokio::time::timeout(timeouts.shutdown, graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!(
            "overfill serve: connections still open {} s after the shutdown signal (--shutdown-timeout; {open} were open at the signal): closing them",
            timeouts.shutdown.as_secs_f64()
        );
    }
    Ok(())
}
