//! Refunds in several parts (`RefundPayment` with `refundKey`): the same key answers the same
//! refund, a new key makes a new one under a gateway key of its own, and their total never
//! exceeds the payment; the seed's refund without a key keeps its contract beside them.

use std::time::Duration;

use payment_service::gateway::MockConfig;
use payment_service::payment::{CreatePaymentBody, PaymentStatus, RefundStatus};
use testkit::ledger::{LedgerEntry, LedgerOp};
use testkit::stack::Stack;

use crate::helpers::{
    assert_refused, keyed_refund_body, ok, own_stack, refund_body, spawn_app, state_of, unique_id,
};

/// The gateway key and amount of each refund the gateway made, in ledger order.
fn keys_and_amounts(made: &[LedgerEntry]) -> Vec<(String, u64)> {
    made.iter()
        .map(|e| (e.idempotency_key.clone(), e.amount))
        .collect()
}

#[test]
fn refunds_with_keys_are_made_once_each_and_never_exceed_the_payment() {
    let app = spawn_app();
    let id = unique_id("parts");
    app.completed_payment(&id, 10000);

    let first = ok(
        "refund a",
        app.refund(&id, &keyed_refund_body("a", "first part", Some(3000))),
    );
    assert_eq!(first.status, RefundStatus::Completed, "{first:?}");
    assert_eq!(first.refund_key.as_deref(), Some("a"));
    let paid = app.payment(&id);
    assert_eq!(paid.status, PaymentStatus::PartiallyRefunded, "{paid:?}");
    assert_eq!(paid.amount_refunded, 3000);

    // The same key answers the same refund, whatever it asks now.
    let again = ok(
        "refund a again",
        app.refund(&id, &keyed_refund_body("a", "other", Some(5000))),
    );
    assert_eq!(again, first);

    // Beyond what is left: refused, saying what is left, and nothing moves.
    let message = assert_refused(
        "refund b beyond",
        app.refund(&id, &keyed_refund_body("b", "too much", Some(8000))),
        409,
    );
    assert!(message.contains("7000 of the 10000 charged"), "{message}");
    assert_eq!(app.payment(&id).amount_refunded, 3000);

    // No amount: all that is left.
    let rest = ok(
        "refund b",
        app.refund(&id, &keyed_refund_body("b", "the rest", None)),
    );
    assert_eq!(rest.amount.minor_units(), 7000, "{rest:?}");
    let done = app.payment(&id);
    assert_eq!(done.status, PaymentStatus::Refunded, "{done:?}");
    assert_eq!(done.amount_refunded, 10000);
    let keys: Vec<_> = done.refunds.iter().map(|r| r.refund_key.clone()).collect();
    assert_eq!(keys, [Some("a".to_owned()), Some("b".to_owned())]);
    assert_eq!(done.refunds[0], first);
    assert_eq!(done.refunds[1], rest);

    // Refunded in full: a new key is refused naming the status.
    let message = assert_refused(
        "refund c",
        app.refund(&id, &keyed_refund_body("c", "more", Some(1))),
        409,
    );
    assert!(message.contains("refunded"), "{message}");

    let made = app.moved_money(&id, LedgerOp::Refund);
    assert_eq!(
        keys_and_amounts(&made),
        [
            (format!("refund:{id}:r1"), 3000),
            (format!("refund:{id}:r2"), 7000)
        ]
    );
    assert_eq!(
        made.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        [first.refund_id, rest.refund_id]
    );
}

#[test]
fn the_seeds_refund_keeps_its_contract_beside_refunds_with_keys() {
    let app = spawn_app();
    let id = unique_id("parts-seed");
    app.completed_payment(&id, 10000);
    let keyed = ok(
        "refund k",
        app.refund(&id, &keyed_refund_body("k", "first", Some(6000))),
    );
    // The payment's one refund takes at most what is left ...
    let message = assert_refused(
        "the one refund beyond",
        app.refund(&id, &refund_body("too much", Some(5000))),
        409,
    );
    assert!(message.contains("4000 of the 10000 charged"), "{message}");
    let one = ok(
        "the one refund",
        app.refund(&id, &refund_body("partial", Some(1000))),
    );
    assert_eq!(one.refund_key, None);
    // ... and, made, answers every repeat as the seed's does, whatever it asks.
    let repeat = ok(
        "the one refund again",
        app.refund(&id, &refund_body("all", None)),
    );
    assert_eq!(repeat, one);

    let payment = app.payment(&id);
    assert_eq!(payment.status, PaymentStatus::PartiallyRefunded);
    assert_eq!(payment.amount_refunded, 7000);
    // GetPayment lists the payment's one refund first; state key `refund` still holds it.
    assert_eq!(payment.refunds, [one.clone(), keyed]);
    assert_eq!(state_of(app, &id, "refund"), Some(one));
    assert_eq!(app.moved_money(&id, LedgerOp::Refund).len(), 2);
}

#[test]
fn a_bad_refund_key_is_a_400_and_changes_nothing() {
    let app = spawn_app();
    let id = unique_id("parts-bad");
    app.completed_payment(&id, 500);
    for key in ["", "two words", "naïve", &"k".repeat(101), "line\nbreak"] {
        let message = assert_refused(
            key,
            app.refund(&id, &keyed_refund_body(key, "bad", Some(100))),
            400,
        );
        assert!(message.contains("refundKey"), "{key:?}: {message}");
    }
    let payment = app.payment(&id);
    assert_eq!(payment.status, PaymentStatus::Completed, "{payment:?}");
    assert!(payment.refunds.is_empty());
}

#[test]
fn refunds_with_keys_whose_answers_are_lost_are_settled_each_with_its_amount() {
    // The gateway acts at once and answers after 3 s, past every attempt's 500 ms: each refund
    // stays pending, and the service settles each one by itself.
    let app = own_stack(
        Stack::builder()
            .gateway(MockConfig {
                decline_rate: 0.0,
                delay: Duration::from_millis(1),
                response_delay: Duration::from_secs(3),
                ..MockConfig::default()
            })
            .service_env("GATEWAY_ATTEMPT_TIMEOUT", "500ms")
            .service_env("GATEWAY_KEY_RETENTION", "12s")
            .service_env("SETTLE_FIRST_DELAY", "200ms")
            .service_env("SETTLE_MAX_DELAY", "1s"),
    );
    let id = unique_id("parts-lost");
    ok(
        "CreatePayment",
        app.create_payment(&id, &CreatePaymentBody::new(5000, "cust-pat")),
    );
    app.settled(&id);

    let a = ok(
        "refund a",
        app.refund(&id, &keyed_refund_body("a", "one", Some(1000))),
    );
    assert_eq!(a.status, RefundStatus::Pending, "{a:?}");
    // Pending, it holds its amount: 4000 is left, not 5000.
    let message = assert_refused(
        "refund b beyond",
        app.refund(&id, &keyed_refund_body("b", "too much", Some(4001))),
        409,
    );
    assert!(message.contains("4000 of the 5000 charged"), "{message}");
    let b = ok(
        "refund b",
        app.refund(&id, &keyed_refund_body("b", "two", Some(1500))),
    );
    assert_eq!(b.status, RefundStatus::Pending, "{b:?}");
    let a_again = ok(
        "refund a again",
        app.refund(&id, &keyed_refund_body("a", "other", Some(2000))),
    );
    assert_eq!(a_again.amount.minor_units(), 1000, "{a_again:?}");

    app.wait_refunded(&id);
    let end = app.payment(&id);
    assert_eq!(end.status, PaymentStatus::PartiallyRefunded, "{end:?}");
    assert_eq!(end.amount_refunded, 2500);
    let made = app.moved_money(&id, LedgerOp::Refund);
    assert_eq!(
        keys_and_amounts(&made),
        [
            (format!("refund:{id}:r1"), 1000),
            (format!("refund:{id}:r2"), 1500)
        ]
    );
    for (stored, line) in end.refunds.iter().zip(&made) {
        assert_eq!(stored.status, RefundStatus::Completed, "{stored:?}");
        assert!(stored.attempts > 0, "{stored:?}");
        assert_eq!(stored.refund_id, line.id, "{stored:?}");
    }
    app.assert_all_settled(std::slice::from_ref(&id));
}
