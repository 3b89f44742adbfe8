//! The typed client of `PaymentService`, through Restate's ingress: requests and answers are
//! the service's own types, every HTTP outcome is classified in one place ([`classify`]), and
//! transient ones are retried with `backon` (exponential backoff with jitter), moving to the
//! next ingress that is up, until the client's deadline.
//!
//! ```ignore
//! let client = PaymentClient::new(vec![ingress]);
//! let answer = client.create_payment("p-1", &CreatePaymentBody::new(10_000, "cust-a")).await?;
//! let paid: PaymentResult = answer.ok()?;
//! ```
//!
//! [`BlockingClient`] is the same for tests written as plain `#[test]` functions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use payment_service::payment::{
    CapturePaymentBody, CreatePaymentBody, Payment, PaymentResult, Refund, RefundPaymentBody,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The Restate service name of the virtual object.
pub const SERVICE: &str = "PaymentService";
pub const CREATE: &str = "CreatePayment";
pub const GET: &str = "GetPayment";
pub const REFUND: &str = "RefundPayment";
pub const CAPTURE: &str = "CapturePayment";
pub const CANCEL: &str = "CancelPayment";

/// One HTTP attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A final answer of the service: its value, or a refusal (a 4xx with its message).
#[derive(Debug, Clone, PartialEq)]
pub enum Answer<T> {
    Ok(T),
    Refused(Refusal),
}

/// A non-2xx answer of the handler: the status and Restate's error body.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
    pub body: Value,
}

impl<T: std::fmt::Debug> Answer<T> {
    /// The value; a refusal is an error naming its status and message.
    pub fn ok(self) -> anyhow::Result<T> {
        match self {
            Answer::Ok(v) => Ok(v),
            Answer::Refused(r) => anyhow::bail!("HTTP {}: {}", r.status, r.message),
        }
    }

    /// The refusal; a value is an error.
    pub fn refused(self) -> anyhow::Result<Refusal> {
        match self {
            Answer::Refused(r) => Ok(r),
            Answer::Ok(v) => anyhow::bail!("expected a refusal, got {v:?}"),
        }
    }

    /// The status code: 200 for a value.
    pub fn status(&self) -> u16 {
        match self {
            Answer::Ok(_) => 200,
            Answer::Refused(r) => r.status,
        }
    }
}

/// A call's end: the service's answer, or none.
pub type Reply<T> = Result<Answer<T>, CallError>;

/// No final answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// Only transient outcomes (connection errors, timeouts, 5xx, an ingress that does not know
    /// the service yet) until the deadline; the last one.
    #[error("no answer: {0}")]
    Silent(String),
    /// A 2xx whose body is not the expected type.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

impl CallError {
    /// A short kind for reports, the same for every payment: `HTTP 503`, `timeout`, `refused`
    /// (no connection), `connection error` (one that broke), `unexpected answer`.
    pub fn kind(&self) -> String {
        match self {
            CallError::Unexpected(_) => "unexpected answer".to_owned(),
            CallError::Silent(last) => match last.strip_prefix("HTTP ") {
                Some(rest) => format!("HTTP {}", rest.split(':').next().unwrap_or(rest)),
                None => last.split(" (").next().unwrap_or(last).to_owned(),
            },
        }
    }
}

/// How one HTTP outcome counts (the one classification of the harness).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The service answered: 2xx, or a refusal by the handler.
    Final,
    /// Nothing was decided by the service, or nothing is known: retry with the same request.
    Transient,
}

/// Classifies an HTTP answer to a call on payment `id`. 408, 429 and 5xx are transient (a
/// handler's 503 says "try again later"), but for a handler's own 500 (`"source":
/// "invocation"`: a terminal error, the same on every retry); so is a 404 that is not the
/// handler's own (`payment <id> not found`): a restarted node's ingress answers 404 `service
/// not found` until it has loaded the registered services.
pub fn classify(status: u16, body: &Value, id: &str) -> Class {
    let transient = match status {
        408 | 429 => true,
        404 => !is_not_found(body, id),
        500 => body["source"] != "invocation",
        s => s >= 500,
    };
    if transient {
        Class::Transient
    } else {
        Class::Final
    }
}

/// The handler's own 404 for an unknown payment.
pub fn is_not_found(body: &Value, id: &str) -> bool {
    body["message"].as_str() == Some(format!("payment {id} not found").as_str())
}

/// What the clients of one [`PaymentClient`] did, for reports.
#[derive(Debug, Default)]
pub struct Counters {
    pub attempts: AtomicU64,
    pub retries: AtomicU64,
    /// Retries sent to another ingress than the attempt before.
    pub moved: AtomicU64,
    pub connection_errors: AtomicU64,
    pub timeouts: AtomicU64,
    /// Transient HTTP answers, by status.
    pub transient_statuses: Mutex<std::collections::BTreeMap<u16, u64>>,
    /// Per ingress: attempts and final answers.
    pub attempts_by_ingress: Vec<AtomicU64>,
    pub answers_by_ingress: Vec<AtomicU64>,
}

/// The async client (see the module doc). Cheap to clone; clones share counters and deadline.
#[derive(Clone)]
pub struct PaymentClient {
    http: reqwest::Client,
    ingresses: Arc<Vec<String>>,
    /// Which ingresses are up, as a load balancer's health checks would tell.
    up: Arc<Vec<AtomicBool>>,
    /// Transient outcomes are retried until then; `None`: one attempt only.
    deadline: Arc<Mutex<Option<Instant>>>,
    pub counters: Arc<Counters>,
}

impl PaymentClient {
    /// A client of these ingresses (one per node), every one up, one attempt per call.
    pub fn new(ingresses: Vec<String>) -> Self {
        let up = Arc::new(ingresses.iter().map(|_| AtomicBool::new(true)).collect());
        Self::with_up_flags(ingresses, up)
    }

    /// A client whose view of which ingresses are up is `up` (e.g. a cluster's readiness).
    pub fn with_up_flags(ingresses: Vec<String>, up: Arc<Vec<AtomicBool>>) -> Self {
        let n = ingresses.len();
        Self {
            http: http_client(ATTEMPT_TIMEOUT),
            ingresses: Arc::new(ingresses),
            up,
            deadline: Arc::new(Mutex::new(None)),
            counters: Arc::new(Counters {
                attempts_by_ingress: (0..n).map(|_| AtomicU64::new(0)).collect(),
                answers_by_ingress: (0..n).map(|_| AtomicU64::new(0)).collect(),
                ..Counters::default()
            }),
        }
    }

    /// This client with another per-attempt timeout (and its own HTTP connection pool).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.http = http_client(timeout);
        self
    }

    pub fn ingresses(&self) -> &[String] {
        &self.ingresses
    }

    /// From now on, transient outcomes are retried until `deadline` (`None`: never).
    pub fn retry_until(&self, deadline: Option<Instant>) {
        *crate::process::lock(&self.deadline) = deadline;
    }

    pub async fn create_payment(&self, id: &str, body: &CreatePaymentBody) -> Reply<PaymentResult> {
        self.call(0, id, CREATE, body).await
    }

    /// `GetPayment` with `{}`, as the seed sends it.
    pub async fn get_payment(&self, id: &str) -> Reply<Payment> {
        self.call(0, id, GET, &serde_json::json!({})).await
    }

    pub async fn refund_payment(&self, id: &str, body: &RefundPaymentBody) -> Reply<Refund> {
        self.call(0, id, REFUND, body).await
    }

    pub async fn capture_payment(&self, id: &str, body: &CapturePaymentBody) -> Reply<Payment> {
        self.call(0, id, CAPTURE, body).await
    }

    pub async fn cancel_payment(&self, id: &str) -> Reply<Payment> {
        self.call(0, id, CANCEL, &serde_json::json!({})).await
    }

    /// `handler` of payment `id` with a JSON body, first through ingress `first`; the answer
    /// parsed as `T`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        first: usize,
        id: &str,
        handler: &str,
        body: &impl Serialize,
    ) -> Result<Answer<T>, CallError> {
        let bytes = Bytes::from(serde_json::to_vec(body).expect("a JSON body"));
        let (status, value) = self.call_raw(first, id, handler, Some(bytes), &[]).await?;
        if (200..300).contains(&status) {
            serde_json::from_value(value.clone())
                .map(Answer::Ok)
                .map_err(|e| CallError::Unexpected(format!("{e}: {value}")))
        } else {
            Ok(Answer::Refused(Refusal {
                status,
                message: value["message"].as_str().unwrap_or_default().to_owned(),
                body: value,
            }))
        }
    }

    /// The same with raw body bytes (`None`: no body and no content type) and extra headers;
    /// the final status and the body as JSON (a body that is not JSON as a JSON string).
    pub async fn call_raw(
        &self,
        first: usize,
        id: &str,
        handler: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Value), CallError> {
        self.call_object_raw(first, SERVICE, &encode_key(id), id, handler, body, headers)
            .await
    }

    /// [`Self::call_raw`] on any virtual object (`PaymentService`, or e.g. the benchmark's
    /// floor), with the key as it goes into the URL (e.g. already percent-encoded).
    #[allow(clippy::too_many_arguments)]
    pub async fn call_object_raw(
        &self,
        first: usize,
        object: &str,
        url_key: &str,
        id: &str,
        handler: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Value), CallError> {
        let n = self.ingresses.len();
        let at = std::sync::atomic::AtomicUsize::new(first % n);
        let deadline = *crate::process::lock(&self.deadline);
        let attempt = || async {
            let i = at.load(Ordering::Relaxed);
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            self.counters.attempts_by_ingress[i].fetch_add(1, Ordering::Relaxed);
            let url = format!("{}/{object}/{url_key}/{handler}", self.ingresses[i]);
            let mut request = self.http.post(&url);
            if let Some(body) = &body {
                request = request
                    .header("content-type", "application/json")
                    .body(body.clone());
            }
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let answer = async {
                let response = request.send().await?;
                let status = response.status().as_u16();
                Ok::<_, reqwest::Error>((status, response.bytes().await?))
            }
            .await;
            match answer {
                Ok((status, bytes)) => {
                    let value = parse_body(&bytes);
                    match classify(status, &value, id) {
                        Class::Final => {
                            self.counters.answers_by_ingress[i].fetch_add(1, Ordering::Relaxed);
                            Ok((status, value))
                        }
                        Class::Transient => {
                            *crate::process::lock(&self.counters.transient_statuses)
                                .entry(status)
                                .or_default() += 1;
                            Err(format!("HTTP {status}: {value}"))
                        }
                    }
                }
                Err(e) => {
                    let (counter, kind) = if e.is_timeout() {
                        (&self.counters.timeouts, "timeout")
                    } else if e.is_connect() {
                        (&self.counters.connection_errors, "refused")
                    } else {
                        (&self.counters.connection_errors, "connection error")
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    // The causes too: reqwest's own message ("error sending request") says nothing
                    // of what broke.
                    let mut why = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(cause) = source {
                        why = format!("{why}: {cause}");
                        source = cause.source();
                    }
                    Err(format!("{kind} (POST {url}: {why})"))
                }
            }
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(RETRY_MIN)
            .with_max_delay(RETRY_MAX)
            .with_jitter()
            .without_max_times();
        attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|_| deadline.is_some_and(|d| Instant::now() + RETRY_MIN < d))
            .notify(|_, _| {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                let from = at.load(Ordering::Relaxed);
                let next = self.next_up(from);
                if next != from {
                    self.counters.moved.fetch_add(1, Ordering::Relaxed);
                    at.store(next, Ordering::Relaxed);
                }
            })
            .await
            .map_err(CallError::Silent)
    }

    /// The next ingress after `at` that is up (`at` itself when it is the only one); the next
    /// one anyway when none is.
    fn next_up(&self, at: usize) -> usize {
        let n = self.ingresses.len();
        (1..=n)
            .map(|k| (at + k) % n)
            .find(|&i| self.up[i].load(Ordering::SeqCst))
            .unwrap_or((at + 1) % n)
    }
}

fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .pool_max_idle_per_host(256)
        // Below hyper's 30 s header-read timeout, which Restate's ingress closes idle
        // connections by: a request sent on one just as it closes fails with "error sending
        // request" and nothing reaches the server (seen in the tests' shared stack).
        .pool_idle_timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTP client")
}

/// A payment ID as a URL path segment.
pub fn encode_key(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A body as JSON: empty is `null`, text that is not JSON is a JSON string.
pub fn parse_body(bytes: &[u8]) -> Value {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// [`PaymentClient`] for blocking code: `client.block_on(client.inner().get_payment(id))`, on a
/// runtime of its own.
#[derive(Clone)]
pub struct BlockingClient {
    inner: PaymentClient,
    rt: Arc<tokio::runtime::Runtime>,
}

impl BlockingClient {
    pub fn new(inner: PaymentClient) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Self {
            inner,
            rt: Arc::new(rt),
        }
    }

    pub fn inner(&self) -> &PaymentClient {
        &self.inner
    }

    /// Runs any future of the async client on this client's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_handlers_own_404_is_final() {
        let handler = json!({"code": 404, "message": "payment p-1 not found"});
        let ingress = json!({"message": "service 'PaymentService' not found", "source": "ingress"});
        assert_eq!(classify(404, &handler, "p-1"), Class::Final);
        assert_eq!(classify(404, &handler, "p-2"), Class::Transient);
        assert_eq!(classify(404, &ingress, "p-1"), Class::Transient);
        for s in [200, 400, 409, 422] {
            assert_eq!(classify(s, &Value::Null, "p"), Class::Final, "{s}");
        }
        for s in [408, 429, 500, 502, 503] {
            assert_eq!(classify(s, &Value::Null, "p"), Class::Transient, "{s}");
        }
        let terminal = json!({"code": 500, "message": "does not decode", "source": "invocation"});
        assert_eq!(classify(500, &terminal, "p"), Class::Final);
    }

    #[test]
    fn error_kinds_name_no_payment() {
        let http = CallError::Silent("HTTP 503: {\"message\":\"p-1\"}".into());
        assert_eq!(http.kind(), "HTTP 503");
        let refused = CallError::Silent("refused (POST http://x/PaymentService/p-1/Get: e)".into());
        assert_eq!(refused.kind(), "refused");
        assert_eq!(
            CallError::Unexpected("x".into()).kind(),
            "unexpected answer"
        );
    }

    #[test]
    fn keys_are_percent_encoded() {
        assert_eq!(encode_key("payment-001"), "payment-001");
        assert_eq!(encode_key("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_key("€"), "%E2%82%AC");
    }
}
