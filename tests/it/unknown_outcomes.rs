//! Gateway calls whose outcome is unknown (no answer in time, an answer lost after the gateway
//! acted, a 5xx): never taken for a refusal. The payment or refund stays `pending`, the client
//! is answered promptly, and the service settles it by itself: the same key again, then, once the
//! key nears the end of its retention, a look-up at the gateway.
//!
//! The stacks here have a short key retention (`GATEWAY_KEY_RETENTION`) so that the look-up
//! comes within seconds.

use std::time::{Duration, Instant};

use payment_service::gateway::MockConfig;
use payment_service::payment::{CreatePaymentBody, PaymentStatus, RefundStatus};
use testkit::ledger::{LedgerOp, LedgerOutcome};
use testkit::stack::{Stack, StackBuilder, wait_until};

use crate::helpers::{SETTLE_TIMEOUT, ok, own_stack, refund_body, unique_id};

/// A stack whose gateway is `gateway`, with fast settle rounds, attempts of `timeout` each,
/// and keys kept `retention`.
fn stack(gateway: MockConfig, timeout: &str, retention: &str) -> StackBuilder {
    Stack::builder()
        .gateway(MockConfig {
            decline_rate: 0.0,
            delay: Duration::from_millis(1),
            ..gateway
        })
        .service_env("GATEWAY_ATTEMPT_TIMEOUT", timeout)
        .service_env("GATEWAY_KEY_RETENTION", retention)
        .service_env("SETTLE_FIRST_DELAY", "200ms")
        .service_env("SETTLE_MAX_DELAY", "500ms")
}

#[test]
fn a_gateway_that_never_answers_leaves_the_payment_pending_and_never_failed() {
    // Down for charges and look-ups alike: the key's window (about 1 s of an 8 s retention)
    // passes, and the look-ups find nothing out either.
    let app = own_stack(stack(
        MockConfig {
            error_rate: 1.0,
            ..MockConfig::default()
        },
        "500ms",
        "8s",
    ));
    let id = unique_id("unknown-down");
    let body = CreatePaymentBody::new(2500, "cust-dora");
    let started = Instant::now();
    let answer = ok("CreatePayment", app.create_payment(&id, &body));
    assert_eq!(answer.status, PaymentStatus::Pending, "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let pending = app.payment(&id);
    assert_eq!(pending.status, PaymentStatus::Pending, "{pending:?}");
    assert!(pending.attempts >= 3, "{pending:?}");
    assert!(pending.last_error.is_some(), "{pending:?}");
    // A duplicate is answered at once, from the state, and charges nothing itself.
    let again = ok("CreatePayment again", app.create_payment(&id, &body));
    assert_eq!(again.status, PaymentStatus::Pending, "{again:?}");

    // Five rounds of Settle later, past the key's window: still pending, never failed.
    wait_until(SETTLE_TIMEOUT, "Settle rounds", || {
        Ok(app.payment(&id).attempts >= 18)
    })
    .unwrap();
    let still = app.payment(&id);
    assert_eq!(still.status, PaymentStatus::Pending, "{still:?}");
    assert_eq!(still.error_msg, None, "{still:?}");
    assert!(app.moved_money(&id, LedgerOp::Charge).is_empty());
}

#[test]
fn a_charge_whose_answers_are_lost_ends_completed_with_its_one_charge() {
    // The gateway acts at once and answers after 3 s, past every attempt's 500 ms: each attempt
    // times out, the first having charged. Until the look-up, every call is a replay.
    let app = own_stack(stack(
        MockConfig {
            response_delay: Duration::from_secs(3),
            ..MockConfig::default()
        },
        "500ms",
        "12s",
    ));
    let id = unique_id("unknown-lost");
    let body = CreatePaymentBody::new(4100, "cust-lou");
    let answer = ok("CreatePayment", app.create_payment(&id, &body));
    assert_eq!(answer.status, PaymentStatus::Pending, "{answer:?}");

    let end = app.settled(&id);
    let charges = app.moved_money(&id, LedgerOp::Charge);
    assert_eq!(charges.len(), 1, "{charges:#?}");
    assert_eq!(charges[0].outcome, LedgerOutcome::Succeeded);
    assert_eq!(end.status, PaymentStatus::Completed, "{end:?}");
    assert_eq!(end.charge_id, charges[0].id, "{end:?}");
    assert!(end.attempts >= 3, "{end:?}");

    // The refund meets the same gateway: stored pending before the call, answered pending, a
    // second request with another amount answers that same refund, and it settles with the
    // first amount, refunded once.
    let refund = ok(
        "RefundPayment",
        app.refund(&id, &refund_body("lost", Some(1000))),
    );
    assert_eq!(refund.status, RefundStatus::Pending, "{refund:?}");
    assert_eq!(refund.amount.minor_units(), 1000);
    let other = ok(
        "RefundPayment again",
        app.refund(&id, &refund_body("other", Some(2000))),
    );
    assert_eq!(other.status, RefundStatus::Pending, "{other:?}");
    assert_eq!(other.amount.minor_units(), 1000, "{other:?}");
    app.wait_refunded(&id);
    let refunds = app.moved_money(&id, LedgerOp::Refund);
    assert_eq!(refunds.len(), 1, "{refunds:#?}");
    assert_eq!(refunds[0].amount, 1000);
    let done = ok(
        "RefundPayment after",
        app.refund(&id, &refund_body("after", None)),
    );
    assert_eq!(done.status, RefundStatus::Completed, "{done:?}");
    assert_eq!(done.refund_id, refunds[0].id, "{done:?}");
    app.assert_all_settled(std::slice::from_ref(&id));
}

#[test]
fn settle_is_not_callable_through_the_ingress() {
    let app = crate::helpers::spawn_app();
    let id = unique_id("settle-private");
    let (status, answer) = app.call_raw(
        &id,
        "Settle",
        Some(bytes::Bytes::from_static(br#"{"round":0}"#)),
        &[("content-type", "application/json")],
    );
    assert!((400..500).contains(&status), "{status} {answer}");
    assert_eq!(
        app.get_payment(&id).status(),
        404,
        "Settle created a payment"
    );
}
