//! The Stripe adapter (`gateway::StripeGateway`) against localstripe, a fake of Stripe's API
//! that no one here wrote (`testkit::localstripe`): create and confirm, decline, refund,
//! retrieve, the refund look-up, void of a charge that never arrived, and the errors that
//! must read as unknown or rejected.
//!
//! What localstripe does not do is covered against `mock-gateway`: idempotency keys (it
//! ignores them: replays, `idempotency_error`, void of a charge that went through), search
//! (`find_charge`; here only the metadata it searches on), refunds capped at the charge.

use std::sync::OnceLock;

use payment_service::gateway::{
    ApiKey, CaptureRequest, ChargeRequest, ChargeResponse, GatewayError, PaymentGateway,
    RefundRequest, StripeConfig, StripeGateway, VoidHoldRequest, VoidRequest, VoidResponse,
};
use serde_json::Value;
use testkit::localstripe::{self, Localstripe};

/// One localstripe for the module's tests (each uses payment IDs of its own); stopped at exit.
fn localstripe() -> &'static Localstripe {
    static LOCALSTRIPE: OnceLock<Localstripe> = OnceLock::new();
    LOCALSTRIPE.get_or_init(|| {
        let dir = testkit::process::temp_dir("localstripe-").expect("a temporary folder");
        Localstripe::start(&dir).expect("starting localstripe")
    })
}

/// The adapter as the service configures it, pointed at localstripe.
fn config(payment_method: &str) -> StripeConfig {
    StripeConfig {
        api_base: localstripe().api_base(),
        payment_method: payment_method.to_owned(),
        // localstripe predates `allowed_payment_method_types` and refuses unknown parameters.
        allowed_payment_method_types: Vec::new(),
        ..StripeConfig::new(ApiKey::new(localstripe::API_KEY))
    }
}

fn gateway(payment_method: &str) -> StripeGateway {
    StripeGateway::new(config(payment_method)).expect("the Stripe client")
}

/// The adapter's calls are async; the harness's are blocking: each test runs the former here.
fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(future)
}

fn charge_request(amount: u64) -> ChargeRequest {
    let payment_id = format!("conf-{}", uuid::Uuid::new_v4().simple());
    ChargeRequest {
        idempotency_key: format!("charge:{payment_id}"),
        payment_id,
        amount,
        currency: "USD".to_owned(),
        customer_id: "cus-conformance".to_owned(),
        manual_capture: false,
    }
}

fn refund_request(charge: &ChargeRequest, charge_id: &str, amount: u64) -> RefundRequest {
    RefundRequest {
        idempotency_key: format!("refund:{}", charge.payment_id),
        payment_id: charge.payment_id.clone(),
        charge_id: charge_id.to_owned(),
        amount,
    }
}

fn succeeded(response: ChargeResponse) -> String {
    match response {
        ChargeResponse::Succeeded { charge_id } => charge_id,
        other => panic!("expected a successful charge, got {other:?}"),
    }
}

/// localstripe's intents, read with a plain HTTP client (not the adapter under test).
fn intents_of(payment_id: &str) -> Vec<Value> {
    let list: Value = reqwest::blocking::Client::new()
        .get(format!(
            "{}/v1/payment_intents?limit=100",
            localstripe().api_base()
        ))
        .bearer_auth(localstripe::API_KEY)
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .expect("listing localstripe's payment intents");
    list["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter(|i| i["metadata"]["payment_id"] == payment_id)
        .cloned()
        .collect()
}

#[test]
fn a_charge_creates_and_confirms_an_intent_that_carries_the_payment() {
    let gateway = gateway("pm_card_visa");
    let charge = charge_request(1234);
    let charge_id = succeeded(block_on(gateway.charge(charge.clone())).unwrap());
    assert!(charge_id.starts_with("pi_"), "{charge_id}");

    // Retrieved, the intent is the charge: its amount, succeeded, and the metadata that the
    // look-up (`find_charge`, Stripe's search) matches on.
    let intent = block_on(gateway.retrieve_intent(&charge_id)).unwrap();
    assert_eq!(intent.id, charge_id);
    assert_eq!(intent.status, "succeeded");
    assert_eq!(intent.amount, Some(1234));
    let metadata = intent.metadata.expect("metadata");
    assert_eq!(metadata["payment_id"], charge.payment_id);
    assert_eq!(metadata["customer_id"], charge.customer_id);

    // As localstripe lists it, with the currency in Stripe's lower case.
    let listed = intents_of(&charge.payment_id);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["currency"], "usd");
    assert_eq!(listed[0]["status"], "succeeded");
}

#[test]
fn a_declined_card_is_a_decline_with_stripes_message() {
    let gateway = gateway(localstripe::DECLINED_PAYMENT_METHOD);
    let charge = charge_request(500);
    match block_on(gateway.charge(charge.clone())).unwrap() {
        // localstripe gives no decline code, so the reason is Stripe's message.
        ChargeResponse::Declined { reason } => assert_eq!(reason, "Your card was declined."),
        other => panic!("expected a decline, got {other:?}"),
    }
    // The intent stays, with no money taken.
    let listed = intents_of(&charge.payment_id);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["status"], "requires_payment_method");
}

#[test]
fn a_refund_is_made_and_found_by_its_key() {
    let gateway = gateway("pm_card_visa");
    let charge = charge_request(2000);
    let charge_id = succeeded(block_on(gateway.charge(charge.clone())).unwrap());
    let refund = refund_request(&charge, &charge_id, 700);

    assert_eq!(block_on(gateway.find_refund(&refund)).unwrap(), None);
    let made = block_on(gateway.refund(refund.clone())).unwrap();
    assert!(made.refund_id.starts_with("re_"), "{made:?}");
    // Another refund of the same charge, under another key, is not taken for this one.
    let other = RefundRequest {
        idempotency_key: format!("{}-other", refund.idempotency_key),
        amount: 300,
        ..refund.clone()
    };
    let other_made = block_on(gateway.refund(other.clone())).unwrap();
    assert_ne!(other_made, made);
    assert_eq!(block_on(gateway.find_refund(&refund)).unwrap(), Some(made));
    assert_eq!(
        block_on(gateway.find_refund(&other)).unwrap(),
        Some(other_made)
    );
}

#[test]
fn a_refund_the_gateway_refuses_is_rejected() {
    let gateway = gateway("pm_card_visa");
    let charge = charge_request(100);
    // No such intent: 404. (localstripe does not cap refunds at the amount charged, so a
    // refund above the charge is covered against mock-gateway.)
    let refund = refund_request(&charge, "pi_doesnotexist", 100);
    match block_on(gateway.refund(refund)) {
        Err(GatewayError::Rejected(reason)) => assert!(reason.contains("404"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn a_void_before_the_charge_arrives_spends_the_key_on_a_canceled_intent() {
    let gateway = gateway("pm_card_visa");
    let charge = charge_request(900);
    let void = VoidRequest {
        refund_key: format!("void-refund:{}", charge.payment_id),
        charge: charge.clone(),
    };
    assert_eq!(
        block_on(gateway.void(void)).unwrap(),
        VoidResponse::NothingCharged
    );
    let listed = intents_of(&charge.payment_id);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["status"], "canceled");
    assert_eq!(listed[0]["amount"], 900);
}

#[test]
fn no_answer_or_a_refused_key_is_unknown_never_a_decline() {
    // Nothing listens there: a refused connection.
    let closed = testkit::ports::pick().unwrap();
    let unreachable = StripeGateway::new(StripeConfig {
        api_base: format!("http://127.0.0.1:{closed}"),
        ..config("pm_card_visa")
    })
    .unwrap();
    assert!(matches!(
        block_on(unreachable.charge(charge_request(100))),
        Err(GatewayError::Unknown(_))
    ));
    // localstripe answers 401 to a key that is not `sk_…`: a configuration to fix, not a no.
    let unauthorized = StripeGateway::new(StripeConfig {
        api_key: ApiKey::new("not-a-secret-key"),
        ..config("pm_card_visa")
    })
    .unwrap();
    match block_on(unauthorized.charge(charge_request(100))) {
        Err(GatewayError::Unknown(reason)) => assert!(reason.contains("401"), "{reason}"),
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
}

/// The service end to end through Restate with `--gateway stripe` at localstripe: a payment
/// completes as a succeeded intent that carries its ID, and its refund is a Stripe refund
/// under the service's refund key.
#[test]
fn the_service_charges_and_refunds_through_stripe() {
    use crate::helpers::own_stack;
    use payment_service::payment::{CreatePaymentBody, PaymentStatus, RefundPaymentBody};
    use testkit::client::Answer;
    use testkit::stack::Stack;

    let app = own_stack(Stack::builder().service_args(config("pm_card_visa").to_args()));
    let id = format!("e2e-{}", uuid::Uuid::new_v4().simple());
    let paid = match app.create_payment(&id, &CreatePaymentBody::new(4200, "cust-e2e")) {
        Answer::Ok(paid) => paid,
        other => panic!("CreatePayment {id}: {other:?}"),
    };
    assert_eq!(paid.status, PaymentStatus::Completed, "{paid:?}");
    let charge_id = paid.charge_id.expect("a charge ID");
    let listed = intents_of(&id);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], charge_id.as_str());
    assert_eq!(listed[0]["status"], "succeeded");
    assert_eq!(listed[0]["amount"], 4200);

    let body = RefundPaymentBody {
        amount: Some(1000),
        ..Default::default()
    };
    let refund = match app.refund(&id, &body) {
        Answer::Ok(refund) => refund,
        other => panic!("RefundPayment {id}: {other:?}"),
    };
    let refund_id = refund.refund_id.clone().expect("a refund ID");
    assert!(refund_id.starts_with("re_"), "{refund:?}");
    let refunds: Value = reqwest::blocking::Client::new()
        .get(format!(
            "{}/v1/refunds?payment_intent={charge_id}",
            localstripe().api_base()
        ))
        .bearer_auth(localstripe::API_KEY)
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .expect("listing localstripe's refunds");
    let refunds = refunds["data"].as_array().expect("a list");
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    assert_eq!(refunds[0]["id"], refund_id.as_str());
    assert_eq!(refunds[0]["amount"], 1000);
    assert_eq!(refunds[0]["metadata"]["payment_id"], id.as_str());
}

#[test]
fn a_hold_is_authorized_then_captured_in_part_or_released() {
    let gateway = gateway("pm_card_visa");
    let hold = ChargeRequest {
        manual_capture: true,
        ..charge_request(3000)
    };
    let charge_id = match block_on(gateway.charge(hold.clone())).unwrap() {
        ChargeResponse::Authorized { charge_id } => charge_id,
        other => panic!("expected a hold, got {other:?}"),
    };
    let intent = block_on(gateway.retrieve_intent(&charge_id)).unwrap();
    assert_eq!(intent.status, "requires_capture");
    let captured = block_on(gateway.capture(CaptureRequest {
        idempotency_key: format!("capture:{}", hold.payment_id),
        payment_id: hold.payment_id.clone(),
        charge_id: charge_id.clone(),
        amount: 2000,
    }))
    .unwrap();
    assert_eq!(captured.amount, 2000);
    let intent = block_on(gateway.retrieve_intent(&charge_id)).unwrap();
    assert_eq!(intent.status, "succeeded");
    // Captured: it cannot be released any more.
    let release = |hold: &ChargeRequest, charge_id: &str| VoidHoldRequest {
        idempotency_key: format!("void-hold:{}", hold.payment_id),
        payment_id: hold.payment_id.clone(),
        charge_id: charge_id.to_owned(),
    };
    assert!(matches!(
        block_on(gateway.void_hold(release(&hold, &charge_id))),
        Err(GatewayError::Rejected(_))
    ));

    let other = ChargeRequest {
        manual_capture: true,
        ..charge_request(1500)
    };
    let held = match block_on(gateway.charge(other.clone())).unwrap() {
        ChargeResponse::Authorized { charge_id } => charge_id,
        other => panic!("expected a hold, got {other:?}"),
    };
    block_on(gateway.void_hold(release(&other, &held))).unwrap();
    let intent = block_on(gateway.retrieve_intent(&held)).unwrap();
    assert_eq!(intent.status, "canceled");
}
