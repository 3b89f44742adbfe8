//! Holds (`"capture": "manual"`): `authorized`, then captured once in full or in part
//! (`CapturePayment`), released (`CancelPayment`), or released by the service when the hold's
//! window ends; never both captured and released, whatever the interleaving. With the
//! in-process gateway (the shared stack) and with the Stripe adapter against `mock-gateway`.

use std::time::Duration;

use payment_service::payment::{
    CaptureMethod, CreatePaymentBody, PaymentStatus, REASON_HOLD_CANCELED, REASON_HOLD_EXPIRED,
};
use testkit::client::Answer;
use testkit::ledger::{LedgerEntry, LedgerOp, LedgerOutcome};
use testkit::stack::wait_until;

use crate::helpers::{
    TestApp, all_at_once, assert_refused, gateway_process_stack, keyed_refund_body, ok, own_stack,
    refund_body, spawn_app, unique_id,
};

/// The gateway's calls for `id` that acted and succeeded, as `(op, amount)`.
fn acted(app: &TestApp, id: &str) -> Vec<(LedgerOp, u64)> {
    app.ledger(id)
        .unwrap_or_default()
        .iter()
        .filter(|e: &&LedgerEntry| !e.replay && e.outcome == LedgerOutcome::Succeeded)
        .map(|e| (e.op, e.amount))
        .collect()
}

#[test]
fn a_hold_is_captured_once_in_part_and_refunds_stop_at_what_it_took() {
    let app = spawn_app();
    let id = unique_id("hold-capture");
    let held = app.authorized_payment(&id, 10000);
    assert!(held.charge_id.is_some(), "{held:?}");

    let stored = app.payment(&id);
    assert_eq!(stored.status, PaymentStatus::Authorized, "{stored:?}");
    assert_eq!(stored.capture, CaptureMethod::Manual);
    let (at, expires) = (
        stored.authorized_at.unwrap(),
        stored.hold_expires_at.unwrap(),
    );
    assert_eq!(expires.millis_since(at), 7 * 24 * 3600 * 1000, "{stored:?}");
    // Held, not taken: nothing to refund yet.
    let message = assert_refused(
        "refund a hold",
        app.refund(&id, &refund_body("r", None)),
        409,
    );
    assert!(message.contains("authorized"), "{message}");

    let captured = ok("capture 6000", app.capture(&id, Some(6000)));
    assert_eq!(captured.status, PaymentStatus::Completed, "{captured:?}");
    assert_eq!(captured.amount_captured, 6000);
    assert_eq!(captured.charge_id, held.charge_id);
    assert!(captured.hold_action.is_none() && captured.hold_expires_at.is_none());
    // Captured once: a repeat answers that capture, whatever it asks.
    assert_eq!(ok("capture again", app.capture(&id, None)), captured);
    let message = assert_refused("cancel after capture", app.cancel(&id), 409);
    assert!(message.contains("status completed"), "{message}");

    // Refunds stop at what the capture took, not at the amount held.
    let part = ok(
        "refund a part",
        app.refund(&id, &keyed_refund_body("a", "part", Some(2000))),
    );
    assert_eq!(part.amount.minor_units(), 2000, "{part:?}");
    let message = assert_refused(
        "refund beyond the capture",
        app.refund(&id, &keyed_refund_body("b", "too much", Some(5000))),
        409,
    );
    assert!(message.contains("4000 of the 6000 charged"), "{message}");
    let rest = ok(
        "refund the rest",
        app.refund(&id, &refund_body("rest", None)),
    );
    assert_eq!(rest.amount.minor_units(), 4000, "{rest:?}");
    let end = app.payment(&id);
    assert_eq!(end.status, PaymentStatus::Refunded, "{end:?}");
    assert_eq!(end.amount_refunded, 6000);

    assert_eq!(
        acted(app, &id),
        [
            (LedgerOp::Authorize, 10000),
            (LedgerOp::Capture, 6000),
            (LedgerOp::Refund, 2000),
            (LedgerOp::Refund, 4000)
        ]
    );
}

#[test]
fn a_released_hold_cannot_be_captured_and_a_payment_without_one_has_none_to_act_on() {
    let app = spawn_app();
    let id = unique_id("hold-cancel");
    app.authorized_payment(&id, 2500);
    let canceled = ok("cancel", app.cancel(&id));
    assert_eq!(canceled.status, PaymentStatus::Canceled, "{canceled:?}");
    assert_eq!(canceled.error_msg.as_deref(), Some(REASON_HOLD_CANCELED));
    assert_eq!(ok("cancel again", app.cancel(&id)), canceled);
    let message = assert_refused("capture after cancel", app.capture(&id, None), 409);
    assert!(message.contains("status canceled"), "{message}");
    assert_eq!(
        acted(app, &id),
        [(LedgerOp::Authorize, 2500), (LedgerOp::Cancel, 2500)]
    );

    // More than is held: refused, saying what is held; the hold stays.
    let big = unique_id("hold-big");
    app.authorized_payment(&big, 1000);
    let message = assert_refused("capture beyond", app.capture(&big, Some(1001)), 409);
    assert!(message.contains("it holds 1000"), "{message}");
    assert_eq!(app.payment(&big).status, PaymentStatus::Authorized);
    assert_eq!(
        ok("capture all", app.capture(&big, None)).amount_captured,
        1000
    );

    // A payment charged at once has no hold.
    let auto = unique_id("hold-auto");
    app.completed_payment(&auto, 500);
    let message = assert_refused("capture automatic", app.capture(&auto, None), 409);
    assert!(message.contains("not created with"), "{message}");
    assert_refused("cancel automatic", app.cancel(&auto), 409);
    // The same payment ID with manual capture is another payment.
    let body = CreatePaymentBody::new(500, "cust-test").held();
    let message = assert_refused("recreate held", app.create_payment(&auto, &body), 422);
    assert!(message.contains("capture"), "{message}");
    assert_refused(
        "capture unknown",
        app.capture(&unique_id("hold-none"), None),
        404,
    );
    assert_refused(
        "capture bad amount",
        app.call::<serde_json::Value>(&big, "CapturePayment", &serde_json::json!({"amount": -1})),
        400,
    );
}

#[test]
fn captures_and_cancels_sent_together_end_in_exactly_one_of_them() {
    let app = spawn_app();
    for round in 0..3 {
        let id = unique_id(&format!("hold-race-{round}"));
        app.authorized_payment(&id, 4000);
        let n = std::sync::atomic::AtomicUsize::new(0);
        let answers = all_at_once(6, || {
            if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                .is_multiple_of(2)
            {
                ("capture", app.capture(&id, Some(3000)))
            } else {
                ("cancel", app.cancel(&id))
            }
        });
        let end = app.payment(&id);
        let won = match end.status {
            PaymentStatus::Completed => "capture",
            PaymentStatus::Canceled => "cancel",
            other => panic!("{id} ended {other}: {end:?}"),
        };
        for (sent, answer) in &answers {
            match answer {
                Answer::Ok(payment) => {
                    assert_eq!(*sent, won, "{answers:?}");
                    assert_eq!(payment, &end);
                }
                Answer::Refused(r) => {
                    assert_ne!(*sent, won, "{answers:?}");
                    assert_eq!(r.status, 409, "{r:?}");
                }
            }
        }
        let ops: Vec<LedgerOp> = acted(app, &id).into_iter().map(|(op, _)| op).collect();
        let last = if won == "capture" {
            LedgerOp::Capture
        } else {
            LedgerOp::Cancel
        };
        assert_eq!(ops, [LedgerOp::Authorize, last], "{id}");
    }
}

/// Through the Stripe adapter and `mock-gateway`: the same flows, and a hold left alone
/// released by the service itself when its window ends.
#[test]
fn holds_through_the_stripe_adapter_and_one_released_when_its_window_ends() {
    let app = own_stack(gateway_process_stack().service_env("HOLD_EXPIRY", "3s"));
    let captured = unique_id("gwp-hold-capture");
    app.authorized_payment(&captured, 5000);
    let done = ok("capture", app.capture(&captured, Some(4000)));
    assert_eq!(done.status, PaymentStatus::Completed, "{done:?}");
    assert_eq!(done.amount_captured, 4000);
    let refund = ok("refund", app.refund(&captured, &refund_body("all", None)));
    assert_eq!(refund.amount.minor_units(), 4000, "{refund:?}");

    let canceled = unique_id("gwp-hold-cancel");
    app.authorized_payment(&canceled, 3000);
    assert_eq!(
        ok("cancel", app.cancel(&canceled)).status,
        PaymentStatus::Canceled
    );
    assert_refused("capture after cancel", app.capture(&canceled, None), 409);

    let expired = unique_id("gwp-hold-expire");
    app.authorized_payment(&expired, 2000);
    wait_until(Duration::from_secs(60), "the hold to expire", || {
        Ok(app.payment(&expired).status != PaymentStatus::Authorized)
    })
    .unwrap();
    let end = app.payment(&expired);
    assert_eq!(end.status, PaymentStatus::Canceled, "{end:?}");
    assert_eq!(end.error_msg.as_deref(), Some(REASON_HOLD_EXPIRED));
    assert_refused("capture after expiry", app.capture(&expired, None), 409);

    // The windows of the other two end too, and change nothing.
    let ids = [captured.clone(), canceled.clone(), expired.clone()];
    wait_until(
        Duration::from_secs(60),
        "every hold's window to end",
        || {
            let ended = app
                .admin()
                .invocations("target_handler_name = 'ExpireHold' AND status = 'completed'")?
                .into_iter()
                .filter(|inv| ids.contains(&inv.target_service_key))
                .count();
            Ok(ended == ids.len())
        },
    )
    .unwrap();
    app.assert_all_settled(&ids);
    assert_eq!(app.payment(&captured).status, PaymentStatus::Refunded);
    assert_eq!(
        app.payment(&canceled).error_msg.as_deref(),
        Some(REASON_HOLD_CANCELED)
    );

    assert_eq!(
        acted(&app, &captured),
        [
            (LedgerOp::Authorize, 5000),
            (LedgerOp::Capture, 4000),
            (LedgerOp::Refund, 4000)
        ]
    );
    assert_eq!(
        acted(&app, &canceled),
        [(LedgerOp::Authorize, 3000), (LedgerOp::Cancel, 3000)]
    );
    assert_eq!(
        acted(&app, &expired),
        [(LedgerOp::Authorize, 2000), (LedgerOp::Cancel, 2000)]
    );
}
