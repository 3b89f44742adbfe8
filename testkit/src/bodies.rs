//! Oversized request bodies: building them, sending them fast or slowly, how far they got before
//! they were refused, and `stackctl measure bodies`, the resident memory of the service and of
//! restate-server before, during and after each (README, "Limits").
//!
//! A body is sent as an [`Upload`]: its first bytes, then filler up to `total`, `chunk` bytes at
//! a time with `pace` between chunks, so that a 1 GiB body can be "sent" without ever being in
//! memory, and stops as soon as the server answers or cuts the stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use payment_service::server::MAX_REQUEST_BYTES;

use crate::client::{CREATE, SERVICE};
use crate::load::status_kb;
use crate::stack::Stack;

/// The 10 MB body of the README's limit ("a body of 10 MB ... refused").
pub const TEN_MB: u64 = 10 * 1000 * 1000;
/// The slow body of the README's limit: 1 GiB, if nothing stops it first.
pub const ONE_GIB: u64 = 1 << 30;
/// The content type of Restate's service protocol (what restate-server sends the service).
pub const PROTOCOL_CONTENT_TYPE: &str = "application/vnd.restate.invocation.v5";

/// The start of a valid CreatePayment body, its closing brace left out: followed by spaces
/// (an [`Upload`]'s filler) it is valid JSON up to its end, so a body refused for its size is
/// refused for nothing else.
pub fn padded_create_start() -> Bytes {
    Bytes::from_static(
        br#"{"amount":100,"currency":"USD","customerId":"cust-oversized","description":"padded""#,
    )
}

/// A CreatePayment body that is valid JSON and a valid payment, padded with whitespace to
/// `size` bytes: only its size is wrong.
pub fn padded_create_body(size: usize) -> Bytes {
    let start = padded_create_start();
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(&start);
    body.resize(size.saturating_sub(1), b' ');
    body.push(b'}');
    Bytes::from(body)
}

/// The 8-byte header of a service-protocol StartMessage (type 0x0000, no flags) that says
/// `len` bytes follow: what a caller of the service's port sends to make it buffer `len` bytes.
pub fn start_message_header(len: u32) -> Bytes {
    Bytes::copy_from_slice(&u64::from(len).to_be_bytes())
}

/// One body to send: `first`, then `filler` bytes up to `total` bytes.
#[derive(Debug, Clone)]
pub struct Upload {
    pub first: Bytes,
    pub filler: u8,
    pub total: u64,
    pub chunk: usize,
    /// Between chunks; zero sends as fast as the connection takes it.
    pub pace: Duration,
    /// Sends a `Content-Length` (the whole `total`); without, the body is streamed (HTTP/1.1
    /// chunked, or HTTP/2 DATA frames without a length).
    pub declare_length: bool,
}

impl Upload {
    /// `total` bytes at once, with a `Content-Length`.
    pub fn fast(first: Bytes, total: u64) -> Self {
        Self {
            first,
            filler: b' ',
            total,
            chunk: 256 * 1024,
            pace: Duration::ZERO,
            declare_length: true,
        }
    }

    /// `total` bytes streamed without a length, `chunk` bytes every `pace`.
    pub fn slow(first: Bytes, total: u64, chunk: usize, pace: Duration) -> Self {
        Self {
            first,
            filler: b' ',
            total,
            chunk,
            pace,
            declare_length: false,
        }
    }
}

/// What became of an [`Upload`].
#[derive(Debug, Clone)]
pub struct Sent {
    /// The answer's status, if one came.
    pub status: Option<u16>,
    /// The answer's body (lossy UTF-8), or the error that ended the exchange.
    pub body: String,
    /// Bytes handed to the HTTP client when the answer ended: at least what reached the server.
    pub sent: u64,
    pub total: u64,
    pub elapsed: Duration,
}

impl Sent {
    /// The server ended the exchange before the whole body was sent.
    pub fn refused_early(&self) -> bool {
        self.sent < self.total
    }
}

impl std::fmt::Display for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self
            .status
            .map_or("no answer".into(), |s| format!("HTTP {s}"));
        let body: String = self.body.chars().take(160).collect();
        write!(
            f,
            "{status} after {} of {} bytes sent ({:.2} s): {body:?}",
            self.sent,
            self.total,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Posts `upload` to `url` and waits for the answer to end (at most `timeout`); how far the
/// body got.
pub async fn send(
    http: &reqwest::Client,
    url: &str,
    content_type: &str,
    upload: &Upload,
    timeout: Duration,
) -> Sent {
    let sent = Arc::new(AtomicU64::new(0));
    let body = Paced {
        upload: upload.clone(),
        sent: Arc::clone(&sent),
        sleep: None,
    };
    let t0 = Instant::now();
    let exchange = async {
        let response = http
            .post(url)
            .header("content-type", content_type)
            .body(reqwest::Body::wrap(body))
            .send()
            .await?;
        let status = response.status().as_u16();
        // The service answers a protocol stream with 200 at once; it refuses by ending it.
        let bytes = response.bytes().await;
        Ok::<_, reqwest::Error>((status, bytes))
    };
    let (status, body) = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((status, Ok(bytes)))) => (Some(status), String::from_utf8_lossy(&bytes).into_owned()),
        Ok(Ok((status, Err(e)))) => (Some(status), format!("the answer's body failed: {e}")),
        Ok(Err(e)) => (None, format!("{e:?}")),
        Err(_) => (None, format!("no answer within {timeout:?}")),
    };
    Sent {
        status,
        body,
        sent: sent.load(Ordering::SeqCst),
        total: upload.total,
        elapsed: t0.elapsed(),
    }
}

/// The body of an [`Upload`], counting what it hands out.
struct Paced {
    upload: Upload,
    sent: Arc<AtomicU64>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for Paced {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(sleep) = self.sleep.as_mut() {
            std::task::ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        let sent = self.sent.load(Ordering::SeqCst);
        let left = self.upload.total - sent;
        if left == 0 {
            return Poll::Ready(None);
        }
        let size = left.min(self.upload.chunk as u64) as usize;
        let first = self.upload.first.len() as u64;
        let data = if sent < first {
            let end = first.min(sent + size as u64);
            self.upload.first.slice(sent as usize..end as usize)
        } else {
            Bytes::from(vec![self.upload.filler; size])
        };
        self.sent.fetch_add(data.len() as u64, Ordering::SeqCst);
        if !self.upload.pace.is_zero() {
            self.sleep = Some(Box::pin(tokio::time::sleep(self.upload.pace)));
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent.load(Ordering::SeqCst) >= self.upload.total
    }

    fn size_hint(&self) -> SizeHint {
        if self.upload.declare_length {
            SizeHint::with_exact(self.upload.total - self.sent.load(Ordering::SeqCst))
        } else {
            SizeHint::default()
        }
    }
}

/// A client speaking HTTP/2 without negotiation (h2c): what restate-server speaks to the
/// service, and what the ingress speaks too. Over HTTP/1.1, a server that answers before the
/// body's end and closes the connection (as the ingress does with a 413) leaves hyper's client
/// an error writing the rest, not the answer; HTTP/2 delivers the answer and resets the stream.
pub fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().http2_prior_knowledge().build()?)
}

/// The URL of a CreatePayment of `id` through the ingress at `ingress`.
pub fn create_url(ingress: &str, id: &str) -> String {
    format!("{ingress}/{SERVICE}/{id}/{CREATE}")
}

/// The URL of CreatePayment on the service's own port (as restate-server calls it).
pub fn service_create_url(service: &str) -> String {
    format!("{service}/invoke/{SERVICE}/{CREATE}")
}

// ---- stackctl measure bodies ----------------------------------------------------------------

/// Options of `stackctl measure bodies` (within `stackctl measure`'s own).
#[derive(Debug, Clone)]
pub struct BodiesArgs {
    /// The slow bodies' chunk, bytes.
    pub chunk: usize,
    /// Between the slow bodies' chunks.
    pub pace: Duration,
    /// How long one body may take to be answered.
    pub timeout: Duration,
}

/// One process's resident memory around one body, kB.
struct Memory {
    before: Option<u64>,
    peak: Option<u64>,
    after: Option<u64>,
}

/// Resets a process's VmHWM to its VmRSS (`/proc/<pid>/clear_refs`, "5"), so that VmHWM after
/// a body is the peak during it; false where the kernel refuses it.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The four bodies, one after the other, on `stack`: memory of the service and of
/// restate-server before, at the peak during, and 1 s after each; how far each body got.
pub fn measure(stack: &Stack, args: &BodiesArgs) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = client()?;
    let ingress = stack.ingress_url(0);
    let service = stack.service_url().to_owned();
    let cases: Vec<(&str, String, &str, Upload)> = vec![
        (
            "10 MB CreatePayment, Content-Length, through the ingress",
            create_url(&ingress, "oversized-fast"),
            "application/json",
            Upload::fast(padded_create_body(TEN_MB as usize), TEN_MB),
        ),
        (
            "1 GiB CreatePayment, streamed slowly, through the ingress",
            create_url(&ingress, "oversized-slow"),
            "application/json",
            Upload::slow(padded_create_start(), ONE_GIB, args.chunk, args.pace),
        ),
        (
            "10 MB protocol stream, Content-Length, to the service's port",
            service_create_url(&service),
            PROTOCOL_CONTENT_TYPE,
            Upload::fast(start_message_header(TEN_MB as u32 - 8), TEN_MB),
        ),
        (
            "1 GiB protocol stream, streamed slowly, to the service's port",
            service_create_url(&service),
            PROTOCOL_CONTENT_TYPE,
            Upload::slow(
                start_message_header((ONE_GIB - 8) as u32),
                ONE_GIB,
                args.chunk,
                args.pace,
            ),
        ),
    ];
    let pids = [
        ("payment-service", stack.service_pid()),
        ("restate-server", stack.node_pid(0)),
    ];
    let mut out = String::new();
    let pace_ms = args.pace.as_secs_f64() * 1000.0;
    out.push_str(&format!(
        "Oversized bodies (README, \"Limits\"): the service's bound {MAX_REQUEST_BYTES} bytes; \
         slow bodies {} KiB every {pace_ms:.0} ms.\n\
         Memory is VmRSS in MiB: before the body, the peak while it was sent (VmHWM, reset \
         before each body), and 1 s after its answer; delta = peak - before.\n",
        args.chunk / 1024
    ));
    for (label, url, content_type, upload) in cases {
        let before: Vec<Option<u64>> = pids
            .iter()
            .map(|&(_, pid)| pid.and_then(status_kb).map(|(rss, _)| rss))
            .collect();
        let exact = pids.iter().all(|&(_, pid)| pid.is_some_and(reset_peak));
        let sent = rt.block_on(send(&http, &url, content_type, &upload, args.timeout));
        let peaks: Vec<Option<u64>> = pids
            .iter()
            .map(|&(_, pid)| pid.and_then(status_kb).map(|(_, hwm)| hwm))
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        out.push_str(&format!("\n{label}\n  {sent}\n"));
        for (i, &(role, pid)) in pids.iter().enumerate() {
            let m = Memory {
                before: before[i],
                peak: peaks[i],
                after: pid.and_then(status_kb).map(|(rss, _)| rss),
            };
            out.push_str(&format!("  {role:<16} {}\n", m.line(exact)));
        }
    }
    Ok(out)
}

impl Memory {
    fn line(&self, exact: bool) -> String {
        let mib =
            |kb: Option<u64>| kb.map_or("?".into(), |kb| format!("{:.1}", kb as f64 / 1024.0));
        let delta = match (self.before, self.peak) {
            (Some(b), Some(p)) => format!("{:+.1}", (p as f64 - b as f64) / 1024.0),
            _ => "?".into(),
        };
        format!(
            "before {} MiB  peak {} MiB{}  after {} MiB  delta {delta} MiB",
            mib(self.before),
            mib(self.peak),
            if exact {
                ""
            } else {
                " (lifetime peak: clear_refs refused)"
            },
            mib(self.after)
        )
    }
}
