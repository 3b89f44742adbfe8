//! The harness of the integration tests, over `testkit`: the stack the whole binary shares
//! ([`spawn_app`]), a stack of one test's own ([`own_stack`]), typed calls, and the checks
//! several modules make.
//!
//! External mode, when `PAYMENT_TEST_INGRESS_URL`, `PAYMENT_TEST_ADMIN_URL` and
//! `PAYMENT_TEST_SERVICE_URL` are all set: the shared app starts nothing, registers the service
//! URL (as the Restate server sees it) through the admin API, and runs against that stack.
//! `PAYMENT_TEST_LEDGER` optionally names its gateway ledger; without it, [`TestApp::ledger`]
//! is `None` and the ledger assertions are skipped. Own stacks are always started here (a test
//! that kills processes needs processes of its own).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use payment_service::gateway::MockConfig;
use payment_service::payment::{
    CapturePaymentBody, CreatePaymentBody, Payment, PaymentResult, PaymentStatus, Refund,
    RefundPaymentBody, RefundStatus, Timestamp,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use testkit::admin::{Admin, Invocation, sql_str};
use testkit::client::{Answer, BlockingClient, CallError, PaymentClient, SERVICE};
use testkit::ledger::{LedgerEntry, LedgerOp, LedgerOutcome};
use testkit::stack::{PROBE_PREFIX, Stack, StackBuilder, wait_until};

/// How long a test waits for a payment or refund to settle by itself.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long an external stack may take to answer, to accept the registration, and to serve it.
const EXTERNAL_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A stack under test and typed calls to it.
pub struct TestApp {
    client: BlockingClient,
    admin: Admin,
    ledger: Option<PathBuf>,
    /// The stack this harness started; `None` for a stack started elsewhere.
    stack: Option<Stack>,
}

/// The stack the tests of this binary share, started on first use.
pub fn spawn_app() -> &'static TestApp {
    static APP: OnceLock<Result<TestApp, String>> = OnceLock::new();
    let app = APP.get_or_init(|| {
        let env = |name| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let started = match (
            env("PAYMENT_TEST_INGRESS_URL"),
            env("PAYMENT_TEST_ADMIN_URL"),
            env("PAYMENT_TEST_SERVICE_URL"),
        ) {
            (Some(ingress), Some(admin), Some(service)) => TestApp::external(
                &ingress,
                &admin,
                &service,
                env("PAYMENT_TEST_LEDGER").map(PathBuf::from),
            ),
            _ => start(Stack::builder().gateway(MockConfig {
                delay: Duration::from_millis(5),
                decline_rate: 0.0,
                ..MockConfig::default()
            }))
            .map(TestApp::local),
        };
        started.map_err(|e| format!("{e:#}"))
    });
    match app {
        Ok(app) => app,
        Err(e) => panic!("the shared test stack failed to start:\n{e}"),
    }
}

/// A stack of one test's own (`builder` says how it differs from the default one), for tests
/// that need other settings or kill processes.
pub fn own_stack(builder: StackBuilder) -> TestApp {
    TestApp::local(start(builder).expect("starting the test's own stack"))
}

/// A stack whose gateway is the `mock-gateway` process (the service reaching it as it would
/// Stripe), acting at once and declining none: add a test's own settings to it.
pub fn gateway_process_stack() -> StackBuilder {
    Stack::builder()
        .gateway(MockConfig {
            delay: Duration::from_millis(1),
            decline_rate: 0.0,
            ..MockConfig::default()
        })
        .gateway_process()
}

/// Starts a stack with this build's service.
fn start(builder: StackBuilder) -> anyhow::Result<Stack> {
    builder
        .service_bin(env!("CARGO_BIN_EXE_payment-service"))
        .start()
}

impl TestApp {
    fn local(stack: Stack) -> Self {
        eprintln!("test stack up in {}", stack.dir.display());
        Self {
            client: BlockingClient::new(stack.client()),
            admin: stack.live_admin(),
            ledger: stack.ledger().map(Path::to_owned),
            stack: Some(stack),
        }
    }

    fn external(
        ingress: &str,
        admin: &str,
        service_url: &str,
        ledger: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        eprintln!("external stack: ingress {ingress}, admin {admin}, service {service_url}");
        let admin = Admin::new(admin.trim_end_matches('/'));
        let client = BlockingClient::new(PaymentClient::new(vec![
            ingress.trim_end_matches('/').to_owned(),
        ]));
        wait_until(
            EXTERNAL_READY_TIMEOUT,
            "the admin API to be healthy",
            || Ok(admin.healthy()),
        )?;
        let mut last = String::new();
        wait_until(EXTERNAL_READY_TIMEOUT, "the registration", || {
            match admin.register(service_url) {
                Ok(_) => Ok(true),
                Err(e) => {
                    last = format!("{e:#}");
                    Ok(false)
                }
            }
        })
        .map_err(|e| e.context(last))?;
        // The ingress serves the service once the handler itself answers: its own 404.
        let probe = format!("{PROBE_PREFIX}it");
        wait_until(EXTERNAL_READY_TIMEOUT, "the ingress to serve", || {
            Ok(
                matches!(client.block_on(client.inner().get_payment(&probe)), Ok(Answer::Refused(r)) if r.status == 404),
            )
        })?;
        Ok(Self {
            client,
            admin,
            ledger,
            stack: None,
        })
    }

    /// The stack this harness started: a test's own ([`own_stack`]), to kill and restart.
    pub fn stack(&self) -> &Stack {
        self.stack
            .as_ref()
            .expect("a stack started elsewhere is not the test's own")
    }

    /// The stack this harness started, if it started one.
    pub fn local_stack(&self) -> Option<&Stack> {
        self.stack.as_ref()
    }

    // ---- the handlers -----------------------------------------------------------------------

    pub fn create_payment(&self, id: &str, body: &CreatePaymentBody) -> Answer<PaymentResult> {
        self.answered(id, self.run(self.api().create_payment(id, body)))
    }

    pub fn get_payment(&self, id: &str) -> Answer<Payment> {
        self.answered(id, self.run(self.api().get_payment(id)))
    }

    /// `GetPayment` of a payment that must exist.
    #[track_caller]
    pub fn payment(&self, id: &str) -> Payment {
        match self.get_payment(id) {
            Answer::Ok(payment) => payment,
            Answer::Refused(r) => panic!("GetPayment {id}: HTTP {}: {}", r.status, r.body),
        }
    }

    pub fn refund(&self, id: &str, body: &RefundPaymentBody) -> Answer<Refund> {
        self.answered(id, self.run(self.api().refund_payment(id, body)))
    }

    /// `CapturePayment` of `amount` (`None`: the whole hold).
    pub fn capture(&self, id: &str, amount: Option<u64>) -> Answer<Payment> {
        let body = CapturePaymentBody { amount };
        self.answered(id, self.run(self.api().capture_payment(id, &body)))
    }

    pub fn cancel(&self, id: &str) -> Answer<Payment> {
        self.answered(id, self.run(self.api().cancel_payment(id)))
    }

    /// Creates a payment of `amount` with manual capture that must be held; its answer.
    #[track_caller]
    pub fn authorized_payment(&self, id: &str, amount: u64) -> PaymentResult {
        let body = CreatePaymentBody::new(amount, "cust-test").held();
        match self.create_payment(id, &body) {
            Answer::Ok(held) if held.status == PaymentStatus::Authorized => held,
            other => panic!("CreatePayment {id} with manual capture: {other:?}"),
        }
    }

    /// A handler with a body the wire types cannot write (e.g. a field left out, not `null`).
    pub fn call<T: DeserializeOwned + std::fmt::Debug>(
        &self,
        id: &str,
        handler: &str,
        body: &Value,
    ) -> Answer<T> {
        self.answered(id, self.run(self.api().call(0, id, handler, body)))
    }

    /// A handler with raw body bytes (`None`: no body, no content type) and extra headers.
    pub fn call_raw(
        &self,
        id: &str,
        handler: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        self.answered(
            id,
            self.run(self.api().call_raw(0, id, handler, body, headers)),
        )
    }

    /// [`Self::call_raw`] with the key as it goes into the URL (percent-encoded); the answer,
    /// or no answer (e.g. a 5xx).
    pub fn call_raw_key(
        &self,
        url_key: &str,
        id: &str,
        handler: &str,
        body: Option<Bytes>,
    ) -> Result<(u16, Value), CallError> {
        self.run(
            self.api()
                .call_object_raw(0, SERVICE, url_key, id, handler, body, &[]),
        )
    }

    /// Creates a payment of `amount` that must complete; its answer.
    #[track_caller]
    pub fn completed_payment(&self, id: &str, amount: u64) -> PaymentResult {
        let mut body = CreatePaymentBody::new(amount, "cust-test");
        body.description = Some("test".into());
        match self.create_payment(id, &body) {
            Answer::Ok(paid) if paid.status == PaymentStatus::Completed => paid,
            other => panic!("CreatePayment {id}: {other:?}"),
        }
    }

    /// The answer, or a panic saying what the server knows of the payment's invocations (no
    /// answer usually means an invocation is being retried).
    #[track_caller]
    fn answered<T>(&self, id: &str, result: Result<T, CallError>) -> T {
        result.unwrap_or_else(|e| {
            let invocations = self.admin.invocations_of(id);
            panic!("no answer for {id}: {e}\ninvocations of {id}: {invocations:#?}")
        })
    }

    // ---- what the server and the gateway know ------------------------------------------------

    /// The async client itself, for answers the typed calls above take for a failure (e.g. a
    /// 503); [`Self::run`] runs its calls.
    pub fn api(&self) -> &PaymentClient {
        self.client.inner()
    }

    /// Runs a call of [`Self::api`] to its end.
    pub fn run<F: std::future::Future>(&self, call: F) -> F::Output {
        self.client.block_on(call)
    }

    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// The gateway ledger's entries of one payment, or `None` (saying so) without a ledger.
    pub fn ledger(&self, id: &str) -> Option<Vec<LedgerEntry>> {
        let Some(path) = &self.ledger else {
            eprintln!("no gateway ledger for this stack: skipping the ledger assertions for {id}");
            return None;
        };
        Some(testkit::ledger::of_payment(path, id).expect("reading the gateway ledger"))
    }

    /// The gateway's ledger lines for `id` that moved money: `op` calls that acted (not
    /// replays) and succeeded.
    pub fn moved_money(&self, id: &str, op: LedgerOp) -> Vec<LedgerEntry> {
        self.ledger(id)
            .expect("a stack with a gateway ledger")
            .into_iter()
            .filter(|e| e.op == op && !e.replay && e.outcome == LedgerOutcome::Succeeded)
            .collect()
    }

    /// The payment once it is no longer `pending` (polled, for as long as settling takes: the
    /// tests' settle rounds are short).
    #[track_caller]
    pub fn settled(&self, id: &str) -> Payment {
        wait_until(SETTLE_TIMEOUT, "the payment to settle", || {
            Ok(self.payment(id).status != PaymentStatus::Pending)
        })
        .unwrap();
        self.payment(id)
    }

    /// Waits until the payment is `refunded` or `partially_refunded` with no refund pending
    /// (its refunds settled, by the service itself if need be).
    #[track_caller]
    pub fn wait_refunded(&self, id: &str) {
        wait_until(SETTLE_TIMEOUT, "the refunds to settle", || {
            let payment = self.payment(id);
            Ok(matches!(
                payment.status,
                PaymentStatus::Refunded | PaymentStatus::PartiallyRefunded
            ) && payment
                .refunds
                .iter()
                .all(|r| r.status == RefundStatus::Completed))
        })
        .unwrap();
    }

    /// Asserts that every invocation of these payments has finished: completed, never retried,
    /// and a failure (if any) a terminal one with a 4xx code. The invocations.
    #[track_caller]
    pub fn assert_all_settled(&self, ids: &[String]) -> Vec<Invocation> {
        let keys: Vec<String> = ids.iter().map(|id| sql_str(id)).collect();
        let invocations = self
            .admin
            .invocations(&format!("target_service_key IN ({})", keys.join(", ")))
            .expect("querying sys_invocation");
        for inv in &invocations {
            assert_eq!(
                inv.status, "completed",
                "left unfinished (a bad request must fail terminally, not be retried): {inv:?}"
            );
            assert_eq!(inv.retry_count.unwrap_or(0), 0, "retried: {inv:?}");
            assert!(inv.last_failure.is_none(), "a failed attempt: {inv:?}");
            if inv.completion_result.as_deref() == Some("failure") {
                let failure = inv.completion_failure.as_deref().unwrap_or_default();
                assert!(
                    failure.starts_with("[4"),
                    "a non-4xx terminal error: {inv:?}"
                );
            }
        }
        invocations
    }
}

/// Runs `call` on `n` threads that start it together (a barrier); the answers in thread order.
pub fn all_at_once<T: Send>(n: usize, call: impl Fn() -> T + Sync) -> Vec<T> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    call()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A payment ID unique to this run: `<prefix>-<uuid>`.
pub fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The seed README's CreatePayment body.
pub fn seed_payment() -> CreatePaymentBody {
    CreatePaymentBody {
        amount: 10000,
        currency: Some("USD".into()),
        description: Some("Premium subscription".into()),
        customer_id: Some("cust-alice".into()),
        capture: None,
    }
}

pub fn refund_body(reason: &str, amount: Option<u64>) -> RefundPaymentBody {
    RefundPaymentBody {
        reason: Some(reason.into()),
        amount,
        refund_key: None,
    }
}

/// A refund of its own, under the client's refund key `key`.
pub fn keyed_refund_body(key: &str, reason: &str, amount: Option<u64>) -> RefundPaymentBody {
    RefundPaymentBody {
        refund_key: Some(key.into()),
        ..refund_body(reason, amount)
    }
}

/// Asserts an error answer: `status`, and a JSON body with a non-empty `message`; the message.
#[track_caller]
pub fn assert_error(case: &str, (status, body): &(u16, Value), expected: u16) -> String {
    assert_eq!(
        *status, expected,
        "{case}: expected HTTP {expected}: {body}"
    );
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{case}: an error without a message: {body}"));
    assert!(
        !message.trim().is_empty(),
        "{case}: an empty message: {body}"
    );
    message.to_owned()
}

/// [`assert_error`] of a typed call's answer.
#[track_caller]
pub fn assert_refused<T: std::fmt::Debug>(case: &str, answer: Answer<T>, expected: u16) -> String {
    match answer {
        Answer::Refused(r) => assert_error(case, &(r.status, r.body), expected),
        Answer::Ok(value) => panic!("{case}: expected HTTP {expected}, got 200: {value:?}"),
    }
}

/// The value of a 200 answer.
#[track_caller]
pub fn ok<T: std::fmt::Debug>(case: &str, answer: Answer<T>) -> T {
    match answer {
        Answer::Ok(value) => value,
        Answer::Refused(r) => panic!("{case}: HTTP {}: {}", r.status, r.body),
    }
}

/// Asserts a timestamp is in UTC as written on the wire (`Z`, not an offset).
#[track_caller]
pub fn assert_utc(what: &str, at: Timestamp) {
    let written = serde_json::to_value(at).expect("a timestamp serializes");
    let text = written.as_str().unwrap_or_default();
    assert!(text.ends_with('Z'), "{what} = {text:?} is not UTC");
}

/// A state value of one payment (`payment`, `refund`) read as `T`; `None` when absent.
#[track_caller]
pub fn state_of<T: DeserializeOwned>(app: &TestApp, id: &str, key: &str) -> Option<T> {
    let state = app.admin.state(id).expect("querying the state");
    state.get(key).map(|value| {
        serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("state {key} of {id} is not readable ({e}): {value}"))
    })
}
