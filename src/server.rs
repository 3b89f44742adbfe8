//! The HTTP endpoint Restate calls, and its graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::Service;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use restate_sdk::endpoint::{Endpoint, HandleOptions, ProtocolMode, ResponseBody};
use tokio::net::{TcpListener, TcpSocket};

use crate::gateway::PaymentGateway;
use crate::gateway::webhook::WebhookSecret;
use crate::service::{PaymentService, SettlePolicy, StripeWebhooks};

/// The Restate endpoint with `PaymentService` bound to `gateway`, and `StripeWebhooks`
/// checking events with `webhook_secret` (none: every event refused). With `identity_keys`,
/// the endpoint serves only requests signed by a Restate server holding one of the private keys.
pub fn endpoint(
    gateway: Arc<dyn PaymentGateway>,
    policy: SettlePolicy,
    hold_expiry: std::time::Duration,
    webhook_secret: Option<WebhookSecret>,
    identity_keys: &[String],
) -> anyhow::Result<Endpoint> {
    let mut builder = Endpoint::builder()
        .bind(PaymentService::new(gateway, policy, hold_expiry))
        .bind(StripeWebhooks::new(webhook_secret));
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
///
/// With a `version`, only requests under `/<version>/` are served (see [`Versioned`]).
pub async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    version: Option<&str>,
    shutdown: impl Future,
) {
    let endpoint = Versioned::new(endpoint, version);
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
    endpoint: Endpoint,
    /// `/<version>/`
    prefix: Option<Arc<str>>,
}

impl Versioned {
    pub fn new(endpoint: Endpoint, version: Option<&str>) -> Self {
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
            *response.status_mut() = StatusCode::NOT_FOUND;
            return std::future::ready(Ok(response));
        }
        std::future::ready(Ok(handle(&self.endpoint, req)))
    }
}

/// The most bytes the service reads of one request: an invocation's whole request stream (its
/// start message with the object's state, its input with the caller's headers, the journal
/// replayed on a retry, the notifications that follow). The SDK buffers a protocol message
/// whole, and nothing else bounds it (the protocol allows 4 GiB).
///
/// It must stay above the largest input Restate's ingress admits, as the SDK answers a stream
/// cut off here with a retryable error, and Restate would retry that invocation: a body of up
/// to 64 KiB (`request-size-limit` in restate/restate.toml) and up to ~512 KiB of headers
/// (measured: HTTP/1.1 headers of 520 KB were admitted, of 540 KB refused with 431), which
/// Restate forwards to the service with the input. 2 MiB is over 3x that; a PaymentService
/// stream takes a few KiB. So this bound is for callers that reach the service's port directly.
pub const MAX_REQUEST_BYTES: usize = 2 * 1024 * 1024;

/// The SDK's handling of `req` (as the SDK's `HyperEndpoint` does it) with the request body
/// bounded by [`MAX_REQUEST_BYTES`]: a body that says it is longer is refused with 413 before
/// a byte of it is read; one that turns out longer is read no further (the SDK has answered
/// 200 by then, as it streams; it ends that answer, and logs "Handler failure" naming the
/// bound).
fn handle(
    endpoint: &Endpoint,
    req: Request<Incoming>,
) -> Response<Either<ResponseBody, Full<Bytes>>> {
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > MAX_REQUEST_BYTES as u64) {
        tracing::warn!(
            content_length = len,
            "refused a request body over the bound"
        );
        let mut refused =
            Response::new(Either::Right(Full::new(Bytes::from(too_large(Some(len))))));
        *refused.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
        refused.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        return refused;
    }
    let req = req.map(|body| {
        Limited::new(body, MAX_REQUEST_BYTES).map_err(|e| {
            if e.is::<LengthLimitError>() {
                too_large(None).into()
            } else {
                e
            }
        })
    });
    let options = HandleOptions {
        protocol_mode: ProtocolMode::BidiStream,
    };
    endpoint.handle_with_options(req, options).map(Either::Left)
}

fn too_large(declared: Option<u64>) -> String {
    let size = declared.map_or("a request body".into(), |len| {
        format!("a request body of {len} bytes")
    });
    format!("{size} is over the service's bound of {MAX_REQUEST_BYTES} bytes")
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
