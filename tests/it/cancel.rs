//! An operator cancels a CreatePayment or RefundPayment invocation in the middle of its gateway
//! step (Restate's admin API, as `restate invocations cancel` does). No money moves without the
//! state saying so: the charge is voided (refunded here, since the gateway had acted) and the
//! payment ends `canceled`; a refund, which cannot be taken back, is settled with its key.

use std::time::Duration;

use payment_service::gateway::MockConfig;
use payment_service::payment::{CreatePaymentBody, PaymentStatus, Refund, RefundStatus};
use testkit::ledger::LedgerOp;
use testkit::stack::{Stack, wait_until};

use crate::helpers::{SETTLE_TIMEOUT, TestApp, own_stack, refund_body, state_of, unique_id};

/// A gateway that acts at once and answers after `answer_after`, within the attempt's timeout:
/// the step is in the middle of its call for that long.
fn slow_answers(answer_after: Duration) -> TestApp {
    own_stack(
        Stack::builder()
            .gateway(MockConfig {
                decline_rate: 0.0,
                delay: Duration::from_millis(1),
                response_delay: answer_after,
                ..MockConfig::default()
            })
            .service_env("GATEWAY_ATTEMPT_TIMEOUT", "30s")
            .service_env("SETTLE_FIRST_DELAY", "200ms"),
    )
}

/// Waits until `handler`'s invocation for `id` runs and the gateway has acted for it (a ledger
/// line with `op`), then cancels it; the invocation's ID.
fn cancel_mid_call(app: &TestApp, id: &str, handler: &str, op: LedgerOp) -> String {
    let mut invocation = None;
    wait_until(
        SETTLE_TIMEOUT,
        "the invocation to be in its gateway call",
        || {
            invocation = app
                .admin()
                .invocations_of(id)?
                .into_iter()
                .find(|i| i.target_handler_name == handler && i.status == "running");
            Ok(invocation.is_some() && !app.moved_money(id, op).is_empty())
        },
    )
    .unwrap();
    let invocation = invocation.unwrap().id;
    app.admin().cancel(&invocation).unwrap();
    invocation
}

#[test]
fn a_create_payment_cancelled_mid_charge_ends_canceled_with_the_charge_refunded() {
    let app = slow_answers(Duration::from_secs(2));
    let id = unique_id("cancel-charge");
    let body = CreatePaymentBody::new(3300, "cust-cal");
    std::thread::scope(|s| {
        let call = s.spawn(|| app.create_payment(&id, &body));
        cancel_mid_call(&app, &id, "CreatePayment", LedgerOp::Charge);
        // The caller is told the invocation was cancelled, not that it was charged.
        let answer = call.join().unwrap();
        assert!(
            answer.refused().is_ok_and(|r| r.status == 409),
            "the client was told otherwise"
        );
    });
    wait_until(SETTLE_TIMEOUT, "the payment to end", || {
        Ok(app.payment(&id).status != PaymentStatus::Pending)
    })
    .unwrap();
    let end = app.payment(&id);
    let charges = app.moved_money(&id, LedgerOp::Charge);
    let refunds = app.moved_money(&id, LedgerOp::Refund);
    assert_eq!(charges.len(), 1, "{charges:#?}");
    assert_eq!(end.status, PaymentStatus::Canceled, "{end:?}");
    assert_eq!(end.charge_id, charges[0].id, "{end:?}");
    assert_eq!(refunds.len(), 1, "{refunds:#?}");
    assert_eq!(refunds[0].amount, 3300);
    assert!(
        refunds[0].idempotency_key.starts_with("void:"),
        "{refunds:#?}"
    );
    let stored: Refund = state_of(&app, &id, "refund").expect("the void's refund is stored");
    assert_eq!(stored.refund_id, refunds[0].id, "{stored:?}");
    // Canceled is final: a retry of the request answers it, and moves nothing.
    let again = app.create_payment(&id, &body).ok().unwrap();
    assert_eq!(again.status, PaymentStatus::Canceled, "{again:?}");
    assert_eq!(app.moved_money(&id, LedgerOp::Charge).len(), 1);
}

#[test]
fn a_refund_cancelled_mid_call_is_settled_with_its_amount_and_key() {
    let app = slow_answers(Duration::from_secs(2));
    let id = unique_id("cancel-refund");
    wait_until(SETTLE_TIMEOUT, "the payment to complete", || {
        Ok(app
            .create_payment(&id, &CreatePaymentBody::new(5000, "cust-rae"))
            .ok()?
            .status
            == PaymentStatus::Completed)
    })
    .unwrap();
    std::thread::scope(|s| {
        let call = s.spawn(|| app.refund(&id, &refund_body("cancel me", Some(1200))));
        cancel_mid_call(&app, &id, "RefundPayment", LedgerOp::Refund);
        let answer = call.join().unwrap();
        assert!(
            answer.refused().is_ok_and(|r| r.status == 409),
            "the client was told otherwise"
        );
    });
    app.wait_refunded(&id);
    let refunds = app.moved_money(&id, LedgerOp::Refund);
    assert_eq!(refunds.len(), 1, "{refunds:#?}");
    assert_eq!(refunds[0].amount, 1200);
    let stored: Refund = state_of(&app, &id, "refund").unwrap();
    assert_eq!(stored.status, RefundStatus::Completed, "{stored:?}");
    assert_eq!(stored.refund_id, refunds[0].id, "{stored:?}");
    assert_eq!(stored.amount.minor_units(), 1200);
}

/// A capture cancelled after the gateway took the hold's money: the payment stays `authorized`
/// with its capture stored, a cancel meanwhile is refused, and `Settle` ends it `completed`
/// with that one capture, under its key.
#[test]
fn a_capture_cancelled_mid_call_is_settled_with_its_key_and_no_release_gets_in() {
    let app = slow_answers(Duration::from_secs(2));
    let id = unique_id("cancel-capture");
    app.authorized_payment(&id, 5000);
    std::thread::scope(|s| {
        let call = s.spawn(|| app.capture(&id, Some(1200)));
        cancel_mid_call(&app, &id, "CapturePayment", LedgerOp::Capture);
        let answer = call.join().unwrap();
        assert!(
            answer.refused().is_ok_and(|r| r.status == 409),
            "the client was told otherwise"
        );
    });
    // The hold cannot be released: its capture is being settled (or, if `Settle` ran first,
    // is made).
    match app.cancel(&id) {
        testkit::client::Answer::Refused(r) => {
            assert_eq!(r.status, 409, "{r:?}");
            assert!(
                r.message.contains("a capture of its hold is being settled")
                    || r.message.contains("status completed"),
                "{r:?}"
            );
        }
        testkit::client::Answer::Ok(p) => panic!("released after a capture: {p:?}"),
    }
    wait_until(SETTLE_TIMEOUT, "the capture to settle", || {
        Ok(app.payment(&id).status != PaymentStatus::Authorized)
    })
    .unwrap();
    let end = app.payment(&id);
    assert_eq!(end.status, PaymentStatus::Completed, "{end:?}");
    assert_eq!(end.amount_captured, 1200);
    let captures = app.moved_money(&id, LedgerOp::Capture);
    assert_eq!(captures.len(), 1, "{captures:#?}");
    assert_eq!(captures[0].amount, 1200);
    assert!(app.moved_money(&id, LedgerOp::Cancel).is_empty());
}
