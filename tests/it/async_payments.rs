//! Payments the gateway accepts without a final word (Stripe's `processing` and
//! `requires_action`; the mock's customers `async-*` and `action-*`): the payment stays
//! `pending` without holding its lock, its webhook settles it once, and at its deadline the
//! service looks it up, cancelling one the customer never confirmed.

use std::sync::OnceLock;
use std::time::Duration;

use payment_service::gateway::{Awaiting, LedgerOp, LedgerOutcome, MockConfig};
use payment_service::payment::model::{MSG_PROCESSING, REASON_NOT_CONFIRMED};
use payment_service::payment::{CaptureMethod, CreatePaymentBody, PaymentResult, PaymentStatus};
use testkit::stack::{Stack, StackBuilder};

use crate::helpers::{
    TestApp, assert_refused, gateway_process_stack, ok, own_stack, refund_body, seed_payment,
    unique_id,
};
use crate::webhooks::{SECRET, confirms, event, now, post, signed};

/// The confirmation deadline of the stacks here: well past the mock's settle delay.
const DEADLINE: &str = "4s";

fn webhook_stack() -> StackBuilder {
    gateway_process_stack()
        .gateway(MockConfig {
            delay: Duration::from_millis(1),
            decline_rate: 0.0,
            settle_delay: Duration::from_millis(500),
            ..MockConfig::default()
        })
        .webhooks(SECRET)
        .service_env("CONFIRM_DEADLINE", DEADLINE)
        .service_env("SETTLE_FIRST_DELAY", "1s")
}

/// `mock-gateway` settling `async-*` charges after half a second and reporting them by webhook.
fn app() -> &'static TestApp {
    static APP: OnceLock<TestApp> = OnceLock::new();
    APP.get_or_init(|| own_stack(webhook_stack()))
}

fn paying_later(customer: &str, capture: Option<CaptureMethod>) -> CreatePaymentBody {
    CreatePaymentBody {
        customer_id: Some(customer.into()),
        capture,
        ..seed_payment()
    }
}

/// A new payment of `customer`, answered `pending` at once: its ID and the answer.
fn create_later(
    app: &TestApp,
    prefix: &str,
    customer: &str,
    capture: Option<CaptureMethod>,
) -> (String, PaymentResult) {
    let id = unique_id(prefix);
    let answer = ok(
        "create",
        app.create_payment(&id, &paying_later(customer, capture)),
    );
    assert_eq!(answer.status, PaymentStatus::Pending, "{answer:?}");
    (id, answer)
}

/// The line of the gateway accepting `id`'s charge to settle it later.
fn accepted(id: &str) -> (LedgerOp, LedgerOutcome, String) {
    (
        LedgerOp::Process,
        LedgerOutcome::Succeeded,
        format!("charge:{id}"),
    )
}

/// The ledger lines of `id` that acted, as (op, outcome, idempotency key).
fn acted(app: &TestApp, id: &str) -> Vec<(LedgerOp, LedgerOutcome, String)> {
    app.ledger(id)
        .expect("a ledger")
        .into_iter()
        .filter(|e| e.acted())
        .map(|e| (e.op, e.outcome, e.idempotency_key))
        .collect()
}

#[test]
fn a_processing_payment_waits_without_its_lock_and_its_webhook_settles_it_once() {
    let app = app();
    let (id, answer) = create_later(app, "async-ok", "async-alice", None);
    let body = paying_later("async-alice", None);
    assert_eq!(answer.message, MSG_PROCESSING);
    let charge_id = answer.charge_id.clone().expect("the intent is named");

    // Waiting, durably: the state says on what and until when, and the payment's lock is free
    // (an exclusive handler answers at once; a duplicate charges nothing).
    let waiting = app.payment(&id);
    if waiting.status == PaymentStatus::Pending {
        assert_eq!(waiting.awaiting, Some(Awaiting::Processing), "{waiting:?}");
        assert!(waiting.confirm_by > waiting.created_at, "{waiting:?}");
        assert_refused(
            "refund while pending",
            app.refund(&id, &refund_body("early", None)),
            409,
        );
    }
    let again = ok("duplicate", app.create_payment(&id, &body));
    assert_eq!(again.charge_id.as_deref(), Some(charge_id.as_str()));

    let settled = app.settled(&id);
    assert_eq!(settled.status, PaymentStatus::Completed, "{settled:?}");
    assert_eq!(settled.charge_id.as_deref(), Some(charge_id.as_str()));
    assert_eq!((settled.awaiting, settled.confirm_by), (None, None));
    assert_eq!(confirms(app, &id), 1, "one webhook, one Confirm");
    assert_eq!(
        acted(app, &id),
        vec![
            accepted(&id),
            (LedgerOp::Charge, LedgerOutcome::Succeeded, String::new()),
        ],
        "accepted once, charged once, by the gateway itself"
    );
    // Completed like any other payment: refundable.
    ok("refund", app.refund(&id, &refund_body("after", None)));
}

#[test]
fn a_payment_declined_later_fails_with_the_reason_and_a_hold_is_authorized_by_its_webhook() {
    let app = app();
    let (declined, _) = create_later(app, "async-no", "async-decline-bob", None);
    let failed = app.settled(&declined);
    assert_eq!(failed.status, PaymentStatus::Failed, "{failed:?}");
    assert_eq!(failed.error_msg.as_deref(), Some("insufficient funds"));

    let (held, _) = create_later(
        app,
        "async-hold",
        "async-carol",
        Some(CaptureMethod::Manual),
    );
    let authorized = app.settled(&held);
    assert_eq!(
        authorized.status,
        PaymentStatus::Authorized,
        "{authorized:?}"
    );
    assert!(authorized.hold_expires_at.is_some());
    let captured = ok("capture", app.capture(&held, Some(4000)));
    assert_eq!(
        (captured.status, captured.amount_captured),
        (PaymentStatus::Completed, 4000)
    );
}

#[test]
fn a_customer_who_never_acts_is_cancelled_at_the_deadline_and_a_late_event_changes_nothing() {
    let app = app();
    let (id, answer) = create_later(app, "async-action", "action-dave", None);
    let intent = answer.charge_id.expect("the intent is named");
    assert_eq!(app.payment(&id).awaiting, Some(Awaiting::RequiresAction));

    let failed = app.settled(&id);
    assert_eq!(failed.status, PaymentStatus::Failed, "{failed:?}");
    assert_eq!(failed.error_msg.as_deref(), Some(REASON_NOT_CONFIRMED));
    assert_eq!(
        acted(app, &id),
        vec![
            accepted(&id),
            (
                LedgerOp::Cancel,
                LedgerOutcome::Succeeded,
                format!("cancel-unconfirmed:{id}")
            ),
        ]
    );

    // The customer's confirmation, reported after the deadline's cancel: acknowledged, ignored.
    let late = event(
        &unique_id("evt_late"),
        "payment_intent.succeeded",
        &intent,
        &id,
        "succeeded",
    );
    assert_eq!(post(app, &late, signed(&late, now())).0, 200);
    testkit::stack::wait_until(
        Duration::from_secs(30),
        "the late event to be handled",
        || {
            Ok(app
                .admin()
                .invocations_of(&id)?
                .iter()
                .any(|i| i.target_handler_name == "Confirm" && i.status == "completed"))
        },
    )
    .unwrap();
    assert_eq!(app.payment(&id), failed);
}

/// Every answer of the gateway is lost, its webhooks are not: the service never learns that
/// the charge was accepted, and the event arrives while the payment is pending on an unknown
/// outcome, before it ever waited on it. The event alone settles it.
#[test]
fn a_webhook_arriving_before_the_payment_waits_on_it_settles_it() {
    let app = own_stack(
        webhook_stack()
            .gateway(MockConfig {
                delay: Duration::from_millis(1),
                decline_rate: 0.0,
                drop_response_rate: 1.0,
                settle_delay: Duration::from_millis(1500),
                ..MockConfig::default()
            })
            .service_env("GATEWAY_ATTEMPT_TIMEOUT", "300ms")
            .service_env("GATEWAY_ATTEMPTS", "1")
            .service_env("SETTLE_MAX_DELAY", "1s"),
    );
    let (id, answer) = create_later(&app, "async-early", "async-erin", None);
    assert_eq!(answer.charge_id, None, "no answer reached the service");

    let settled = app.settled(&id);
    assert_eq!(settled.status, PaymentStatus::Completed, "{settled:?}");
    assert!(
        settled.attempts > 0,
        "it was pending on an unknown outcome: {settled:?}"
    );
    assert_eq!(settled.awaiting, None);
    assert_eq!(confirms(&app, &id), 1);
    let charges: Vec<_> = acted(&app, &id)
        .into_iter()
        .filter(|(op, ..)| *op == LedgerOp::Charge)
        .collect();
    assert_eq!(charges.len(), 1, "charged once: {charges:?}");
}

/// In process there are no webhooks: the deadline's look-up settles the payment.
#[test]
fn in_process_the_deadline_look_up_settles_a_processing_payment() {
    let app = own_stack(
        Stack::builder()
            .gateway(MockConfig {
                delay: Duration::from_millis(1),
                decline_rate: 0.0,
                settle_delay: Duration::from_millis(500),
                ..MockConfig::default()
            })
            .service_env("CONFIRM_DEADLINE", "2s"),
    );
    let (id, _) = create_later(&app, "async-inproc", "async-frank", None);
    assert_eq!(app.payment(&id).awaiting, Some(Awaiting::Processing));
    let settled = app.settled(&id);
    assert_eq!(settled.status, PaymentStatus::Completed, "{settled:?}");
    let waited = settled
        .completed_at
        .zip(settled.created_at)
        .map(|(done, created)| done.millis_since(created));
    assert!(
        waited >= Some(1_900),
        "settled at the deadline, not before: {settled:?}"
    );
    assert_eq!(app.moved_money(&id, LedgerOp::Charge).len(), 1);
}
