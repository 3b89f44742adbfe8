//! The HTTP endpoint Restate calls, and its graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use restate_sdk::endpoint::{Endpoint, ResponseBody};
use restate_sdk::hyper::HyperEndpoint;
use tokio::net::{TcpListener, TcpSocket};

use crate::gateway::PaymentGateway;
use crate::service::PaymentService;

/// The Restate endpoint with `PaymentService` bound to `gateway`. With `identity_keys`, the
/// endpoint serves only requests signed by a Restate server holding one of the private keys.
pub fn endpoint(
    gateway: Arc<dyn PaymentGateway>,
    identity_keys: &[String],
) -> anyhow::Result<Endpoint> {
    let mut builder = Endpoint::builder().bind(PaymentService::new(gateway));
    for key in identity_keys {
        builder = builder
            .identity_key(key)
            .map_err(|e| anyhow::anyhow!("invalid identity key {key:?}: {e}"))?;
    }
    Ok(builder.build())
}

/// The tokio runtime the endpoint runs on, with `worker_threads` threads for the handlers and
/// connections (see `Config::worker_threads`). Measured on 2 cores: one worker took the
/// service's CPU per payment from ~178 to ~149 µs and its context switches from ~8 to ~1 per
/// payment, as the handler and its HTTP/2 connection no longer wake each other across threads.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
}

/// Binds `addr` for the endpoint, with `TCP_NODELAY` set on the listening socket (Linux copies
/// it to every accepted connection; the SDK's `HttpServer` does not set it). Without it, an
/// answer written in two small HTTP/2 frames waits for the Restate server's delayed ACK: about
/// 40 ms more per request, measured by the benchmark at concurrency 1.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves `endpoint` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish (up to 10 s). Restate retries whatever is cut off, from its journal.
///
/// Not the SDK's `HttpServer`: its accept loop stops accepting for good after one accept error
/// (e.g. out of file descriptors). Here a failed accept is logged and retried, backing off from
/// 10 ms to 1 s, so the service serves again as soon as descriptors are free.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, shutdown: impl Future) {
    serve_version(listener, endpoint, None, shutdown).await
}

/// [`serve`], answering only requests under `/<version>/` when `version` is set (see
/// [`Versioned`]).
pub async fn serve_version(
    listener: TcpListener,
    endpoint: Endpoint,
    version: Option<&str>,
    shutdown: impl Future,
) {
    let endpoint = Versioned::new(HyperEndpoint::new(endpoint), version);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    let conn = http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), endpoint.clone());
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::warn!(%remote, error = %e, "error serving a connection");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "accepting a connection failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
            _ = &mut shutdown => break,
        }
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {
            tracing::warn!("timed out waiting for connections to close");
        }
    }
}

/// The endpoint of one build, registered as `http://<host>:<port>/<version>`. The SDK finds
/// the service and handler in the last segments of the path, whatever comes before them, so
/// without this check a build would also run the invocations Restate pinned to another
/// build's deployment (`/<old version>/invoke/...`), replaying their journals on code they
/// were not written by. Such a request is answered 404; Restate retries it until the build it
/// belongs to answers again.
#[derive(Clone)]
pub struct Versioned {
    endpoint: HyperEndpoint,
    /// `/<version>/`
    prefix: Option<Arc<str>>,
}

impl Versioned {
    pub fn new(endpoint: HyperEndpoint, version: Option<&str>) -> Self {
        Self {
            endpoint,
            prefix: version.map(|v| format!("/{v}/").into()),
        }
    }
}

impl Service<Request<Incoming>> for Versioned {
    type Response = Response<Either<ResponseBody, Full<Bytes>>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        if let Some(prefix) = &self.prefix
            && !req.uri().path().starts_with(&**prefix)
        {
            tracing::warn!(
                path = req.uri().path(),
                serves = &**prefix,
                "refused a request for another deployment's path"
            );
            let body = format!(
                "this build serves the deployment under {prefix}, not {}\n",
                req.uri().path()
            );
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
            *response.status_mut() = hyper::StatusCode::NOT_FOUND;
            return std::future::ready(Ok(response));
        }
        // The SDK's future is a ready one: its answer is there at once.
        let Ok(response) = self.endpoint.call(req).into_inner();
        std::future::ready(Ok(response.map(Either::Left)))
    }
}

const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what `docker stop` and Kubernetes send); the SDK's
/// own default waits for SIGINT only.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
    }
}
