//! The `mock-gateway` process over HTTP: Stripe's wire format, keys and intents kept across
//! SIGKILL, answers dropped after acting, calls that hang.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use serde_json::Value;
use testkit::ledger::{LedgerOp, LedgerOutcome, read_ledger};
use testkit::process::{Restartable, temp_dir};

const KEY: &str = "sk_test_mockgw";

struct Gateway {
    proc: Restartable,
    url: String,
    dir: PathBuf,
    http: Client,
}

impl Gateway {
    /// Starts `mock-gateway` on a free port with its database and ledger in a folder of its own.
    fn start(name: &str, extra: &[&str]) -> Self {
        Self::start_in(temp_dir(&format!("mockgw-{name}")).unwrap(), name, extra)
    }

    /// Starts one over the database and ledger in `dir`.
    fn start_in(dir: PathBuf, name: &str, extra: &[&str]) -> Self {
        let port = testkit::ports::pick().unwrap();
        let bin = testkit::paths::mock_gateway().unwrap();
        let (d, extra): (PathBuf, Vec<String>) =
            (dir.clone(), extra.iter().map(|s| (*s).to_owned()).collect());
        let proc = Restartable::new(name, dir.join("mock-gateway.log"), move || {
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg(format!("--bind=127.0.0.1:{port}"))
                .arg(format!("--db={}", d.join("gateway.db").display()))
                .arg(format!("--ledger={}", d.join("ledger.jsonl").display()))
                .arg(format!("--api-key={KEY}"))
                .args(&extra);
            cmd
        });
        let gw = Self {
            proc,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            http: Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        };
        gw.up();
        gw
    }

    /// Starts the process and waits until it answers its health check.
    fn up(&self) {
        self.proc.start().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.url)).send()
                && r.status() == 200
            {
                return;
            }
            assert!(
                self.proc.died().is_none() && Instant::now() < deadline,
                "mock-gateway did not come up:\n{}",
                self.proc.tail(30)
            );
            std::thread::sleep(Duration::from_millis(20)); // a poll interval, not a readiness guess
        }
    }

    fn ledger(&self) -> PathBuf {
        self.dir.join("ledger.jsonl")
    }

    fn charge(&self, key: &str, payment: &str, timeout: Duration) -> reqwest::Result<Response> {
        self.http
            .post(format!("{}/v1/payment_intents", self.url))
            .bearer_auth(KEY)
            .header("Idempotency-Key", key)
            .timeout(timeout)
            .form(&[
                ("amount", "2500"),
                ("currency", "usd"),
                ("confirm", "true"),
                ("payment_method", "pm_card_visa"),
                ("payment_method_types[]", "card"),
                ("metadata[payment_id]", payment),
                ("metadata[customer_id]", "cust-1"),
            ])
            .send()
    }

    fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(KEY)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.json().unwrap()
    }
}

fn lines(path: &Path) -> Vec<testkit::ledger::LedgerEntry> {
    read_ledger(path).unwrap().entries
}

#[test]
fn keys_and_intents_survive_sigkill_and_the_wire_format_is_stripes() {
    let gw = Gateway::start("restart", &[]);
    let unauthorized = gw
        .http
        .post(format!("{}/v1/payment_intents", gw.url))
        .send()
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    let first = gw
        .charge("charge:p1", "p1", Duration::from_secs(5))
        .unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().unwrap();
    assert_eq!(first["object"], "payment_intent");
    assert_eq!(first["status"], "succeeded");
    assert_eq!(first["metadata"]["payment_id"], "p1");
    let id = first["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("pi_"), "{id}");

    assert!(gw.proc.kill(), "SIGKILL");
    gw.up();
    let again = gw
        .charge("charge:p1", "p1", Duration::from_secs(5))
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().unwrap()["id"], id.as_str());
    let found =
        gw.get("/v1/payment_intents/search?query=metadata%5B%27payment_id%27%5D%3A%27p1%27");
    assert_eq!(found["object"], "search_result");
    assert_eq!(found["data"][0]["id"], id.as_str());
    assert_eq!(
        gw.get(&format!("/v1/payment_intents/{id}"))["status"],
        "succeeded"
    );

    // A refund above the charge is refused; the rest is listed by intent.
    let refund = |key: &str, amount: &str| {
        gw.http
            .post(format!("{}/v1/refunds", gw.url))
            .bearer_auth(KEY)
            .header("Idempotency-Key", key)
            .form(&[
                ("payment_intent", id.as_str()),
                ("amount", amount),
                ("metadata[idempotency_key]", key),
            ])
            .send()
            .unwrap()
    };
    let over = refund("refund:p1:a", "2501");
    assert_eq!(over.status(), 400);
    assert_eq!(
        over.json::<Value>().unwrap()["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(refund("refund:p1:b", "1000").status(), 200);
    let list = gw.get(&format!("/v1/refunds?payment_intent={id}"));
    assert_eq!(list["object"], "list");
    assert_eq!(
        list["data"][0]["metadata"]["idempotency_key"],
        "refund:p1:b"
    );

    // The ledger: one charge and one refund acted; the replay and the refusal say so.
    let entries = lines(&gw.ledger());
    let acted: Vec<_> = entries.iter().filter(|e| e.acted()).map(|e| e.op).collect();
    assert_eq!(
        acted,
        vec![LedgerOp::Charge, LedgerOp::Refund],
        "{entries:#?}"
    );
    assert!(entries.iter().any(|e| e.replay));
    assert!(entries.iter().any(|e| e.outcome == LedgerOutcome::Rejected));
}

#[test]
fn a_dropped_answer_acted_and_was_recorded() {
    let gw = Gateway::start("drop", &["--drop-response-rate=1"]);
    let err = gw
        .charge("charge:d1", "d1", Duration::from_secs(5))
        .expect_err("the connection is closed without an answer");
    assert!(!err.is_timeout(), "closed, not hung: {err}");
    let entries = lines(&gw.ledger());
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert!(entries[0].acted() && entries[0].op == LedgerOp::Charge);
    assert_eq!(entries[0].fault, Some(testkit::ledger::LedgerFault::Drop));
    // What it did is there to be found, by a gateway over the same database that answers.
    assert!(gw.proc.kill());
    let gw = Gateway::start_in(gw.dir.clone(), "drop-after", &[]);
    let found =
        gw.get("/v1/payment_intents/search?query=metadata%5B%27payment_id%27%5D%3A%27d1%27");
    assert_eq!(found["data"][0]["status"], "succeeded");
}

#[test]
fn a_hung_call_gets_no_answer_and_does_not_act() {
    let gw = Gateway::start("hang", &["--hang-rate=1"]);
    let err = gw
        .charge("charge:h1", "h1", Duration::from_millis(500))
        .expect_err("no answer");
    assert!(err.is_timeout(), "{err}");
    let entries = lines(&gw.ledger());
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert!(!entries[0].acted());
    assert_eq!(entries[0].outcome, LedgerOutcome::Failed);
}

/// The Stripe adapter's void against the process (localstripe ignores keys, so this is where a
/// charge that went through is voided): refunded in full under the void's key, or, refunded
/// already by someone else, the refund refused for good: the charge stands and no round of
/// the service retries it.
#[test]
fn the_stripe_adapter_voids_a_charge_that_went_through_or_reports_its_refund_refused() {
    use payment_service::gateway::{
        ApiKey, ChargeRequest, ChargeResponse, PaymentGateway, RefundRequest, StripeConfig,
        StripeGateway, VoidRequest, VoidResponse,
    };

    let gw = Gateway::start("void", &[]);
    let adapter = StripeGateway::new(StripeConfig {
        api_base: gw.url.clone(),
        ..StripeConfig::new(ApiKey::new(KEY))
    })
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let charge = |payment_id: &str| ChargeRequest {
        idempotency_key: format!("charge:{payment_id}"),
        payment_id: payment_id.to_owned(),
        amount: 2500,
        currency: "USD".to_owned(),
        customer_id: "cust-1".to_owned(),
        manual_capture: false,
    };
    let void = |payment_id: &str| VoidRequest {
        charge: charge(payment_id),
        refund_key: format!("void:{payment_id}"),
    };
    let charged = |payment_id: &str| match runtime.block_on(adapter.charge(charge(payment_id))) {
        Ok(ChargeResponse::Succeeded { charge_id }) => charge_id,
        other => panic!("expected a charge, got {other:?}"),
    };

    let first = charged("void-1");
    match runtime.block_on(adapter.void(void("void-1"))).unwrap() {
        VoidResponse::Refunded { charge_id, .. } => assert_eq!(charge_id, first),
        other => panic!("expected the charge refunded, got {other:?}"),
    }

    let second = charged("void-2");
    runtime
        .block_on(adapter.refund(RefundRequest {
            idempotency_key: "refund:from-the-dashboard".to_owned(),
            payment_id: "void-2".to_owned(),
            charge_id: second.clone(),
            amount: 2500,
        }))
        .unwrap();
    match runtime.block_on(adapter.void(void("void-2"))).unwrap() {
        VoidResponse::RefundRefused { charge_id, reason } => {
            assert_eq!(charge_id, second);
            assert!(reason.contains("charge_already_refunded"), "{reason}");
        }
        other => panic!("expected the refund refused, got {other:?}"),
    }
    let refunds: Vec<_> = lines(&gw.ledger())
        .into_iter()
        .filter(|e| e.op == LedgerOp::Refund && e.acted())
        .map(|e| e.idempotency_key)
        .collect();
    assert_eq!(refunds, ["void:void-1", "refund:from-the-dashboard"]);
}
