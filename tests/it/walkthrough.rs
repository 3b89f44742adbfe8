//! Happy paths and idempotency: the seed README walkthrough, duplicate and concurrent
//! CreatePayments, refund idempotency, and the stored state.

use payment_service::payment::{
    CreatePaymentBody, Payment, PaymentResult, PaymentStatus, Refund, RefundStatus,
};
use serde_json::json;
use testkit::client::{Answer, CREATE, GET, REFUND};
use testkit::ledger::{LedgerEntry, LedgerOp, LedgerOutcome};

use crate::helpers::{
    all_at_once, assert_utc, ok, refund_body, seed_payment, spawn_app, state_of, unique_id,
};

fn charges(entries: &[LedgerEntry]) -> Vec<&LedgerEntry> {
    entries
        .iter()
        .filter(|e| e.op == LedgerOp::Charge)
        .collect()
}

fn refunds(entries: &[LedgerEntry]) -> Vec<&LedgerEntry> {
    entries
        .iter()
        .filter(|e| e.op == LedgerOp::Refund)
        .collect()
}

/// The charge ID of a completed payment, which must have one.
#[track_caller]
fn charge_id(paid: &PaymentResult) -> String {
    let id = paid.charge_id.clone().unwrap_or_default();
    assert!(!id.is_empty(), "no chargeId: {paid:?}");
    id
}

/// Asserts the ledger of `id` shows exactly one succeeded charge (not a replay) of `amount`
/// and `refund_count` refunds; the entries (none without a ledger).
#[track_caller]
fn assert_ledger(id: &str, amount: u64, refund_count: usize) -> Vec<LedgerEntry> {
    let Some(entries) = spawn_app().ledger(id) else {
        return Vec::new();
    };
    let charges = charges(&entries);
    assert_eq!(
        charges.len(),
        1,
        "{id}: not exactly one charge: {entries:#?}"
    );
    let charge = charges[0];
    assert!(!charge.replay, "{id}: the charge is a replay: {charge:?}");
    assert_eq!(charge.amount, amount, "{id}: {charge:?}");
    assert_eq!(charge.outcome, LedgerOutcome::Succeeded, "{id}: {charge:?}");
    assert!(!charge.idempotency_key.is_empty(), "{id}: {charge:?}");
    assert_eq!(
        refunds(&entries).len(),
        refund_count,
        "{id}: unexpected refund lines: {entries:#?}"
    );
    entries
}

/// The seed README, step by step (with a unique payment ID).
#[test]
fn seed_readme_walkthrough() {
    let app = spawn_app();
    let id = unique_id("payment-001");

    // Create Payment
    let created = ok("CreatePayment", app.create_payment(&id, &seed_payment()));
    assert_eq!(created.payment_id, id, "{created:?}");
    assert_eq!(created.status, PaymentStatus::Completed, "{created:?}");
    assert_eq!(
        created.message, "Payment processed successfully",
        "{created:?}"
    );
    let charge_id = charge_id(&created);

    // Test Idempotency (Duplicate Request)
    let duplicate = ok(
        "duplicate CreatePayment",
        app.create_payment(&id, &seed_payment()),
    );
    assert_eq!(
        duplicate,
        PaymentResult {
            message: "Payment already processed".into(),
            ..created.clone()
        }
    );

    // Get Payment Status: with `-d '{}'` and with no body at all.
    let payment = app.payment(&id);
    assert_eq!(payment.payment_id, id, "{payment:?}");
    assert_eq!(payment.amount.minor_units(), 10000, "{payment:?}");
    assert_eq!(payment.currency.as_str(), "USD", "{payment:?}");
    assert_eq!(payment.description, "Premium subscription", "{payment:?}");
    assert_eq!(payment.customer_id, "cust-alice", "{payment:?}");
    assert_eq!(payment.status, PaymentStatus::Completed, "{payment:?}");
    assert_eq!(payment.charge_id.as_deref(), Some(charge_id.as_str()));
    let created_at = payment.created_at.expect("createdAt");
    let completed_at = payment.completed_at.expect("completedAt");
    assert_utc("createdAt", created_at);
    assert_utc("completedAt", completed_at);
    assert!(
        completed_at >= created_at,
        "completedAt before createdAt: {payment:?}"
    );
    assert_eq!(payment.error_msg, None, "{payment:?}");

    let (status, no_body) = app.call_raw(&id, GET, None, &[]);
    assert_eq!(status, 200, "GetPayment without a body: {no_body}");
    let no_body: Payment = serde_json::from_value(no_body).expect("a payment");
    assert_eq!(
        no_body, payment,
        "GetPayment answers differ with and without a body"
    );

    // Refund Payment
    let refund = ok(
        "RefundPayment",
        app.refund(&id, &refund_body("Customer request", Some(10000))),
    );
    assert!(
        refund.refund_id.as_deref().is_some_and(|id| !id.is_empty()),
        "{refund:?}"
    );
    assert_eq!(refund.status, RefundStatus::Completed, "{refund:?}");
    assert_eq!(refund.amount.minor_units(), 10000, "{refund:?}");
    assert_eq!(
        refund.message, "Refund processed successfully",
        "{refund:?}"
    );

    // Only the status changes, and the refunded amount, with the refund listed.
    let refunded = app.payment(&id);
    assert_eq!(
        refunded,
        Payment {
            status: PaymentStatus::Refunded,
            amount_refunded: 10000,
            refunds: vec![refund.clone()],
            ..payment
        }
    );

    // The gateway saw one charge and one refund, with the IDs we were given.
    let entries = assert_ledger(&id, 10000, 1);
    if !entries.is_empty() {
        let charge = charges(&entries)[0];
        assert_eq!(charge.id.as_deref(), Some(charge_id.as_str()), "{charge:?}");
        let line = refunds(&entries)[0];
        assert_eq!(line.outcome, LedgerOutcome::Succeeded, "{line:?}");
        assert_eq!(line.amount, 10000, "{line:?}");
        assert!(!line.replay, "{line:?}");
        assert_eq!(line.id.as_deref(), refund.refund_id.as_deref(), "{line:?}");
    }
}

#[test]
fn sequential_duplicate_returns_the_same_result_and_charges_once() {
    let app = spawn_app();
    let id = unique_id("dup-seq");
    let body = CreatePaymentBody {
        amount: 4200,
        currency: Some("EUR".into()),
        description: Some("Book".into()),
        customer_id: Some("cust-bob".into()),
        capture: None,
    };

    let first = ok("CreatePayment", app.create_payment(&id, &body));
    assert_eq!(first.status, PaymentStatus::Completed, "{first:?}");
    charge_id(&first);
    let already = PaymentResult {
        message: "Payment already processed".into(),
        ..first.clone()
    };

    for attempt in 1..=2 {
        let again = ok(
            &format!("duplicate #{attempt}"),
            app.create_payment(&id, &body),
        );
        assert_eq!(again, already, "duplicate #{attempt}");
    }

    // Only the description differs: still a retry, answered with the stored payment.
    let relabelled = CreatePaymentBody {
        description: Some("other".into()),
        ..body.clone()
    };
    assert_eq!(
        ok("relabelled", app.create_payment(&id, &relabelled)),
        already
    );

    // Other money-moving fields: another payment under a taken ID, refused, nothing changed.
    let other = CreatePaymentBody {
        amount: 999,
        currency: Some("USD".into()),
        description: Some("other".into()),
        customer_id: Some("cust-eve".into()),
        capture: None,
    };
    let conflict = app
        .create_payment(&id, &other)
        .refused()
        .expect("a refusal");
    assert_eq!(conflict.status, 422, "{conflict:?}");
    assert!(
        conflict
            .message
            .contains("different amount, currency, customerId"),
        "{conflict:?}"
    );
    let payment = app.payment(&id);
    assert_eq!(payment.amount.minor_units(), 4200, "{payment:?}");
    assert_eq!(payment.currency.as_str(), "EUR", "{payment:?}");
    assert_eq!(payment.customer_id, "cust-bob", "{payment:?}");
    assert_eq!(payment.description, "Book", "{payment:?}");

    assert_ledger(&id, 4200, 0);
}

#[test]
fn concurrent_duplicates_charge_exactly_once() {
    const CALLERS: usize = 5;
    let app = spawn_app();
    let id = unique_id("dup-concurrent");
    let body = CreatePaymentBody::new(1500, "cust-carol").described("Concurrent");

    let answers: Vec<PaymentResult> = all_at_once(CALLERS, || {
        ok("CreatePayment", app.create_payment(&id, &body))
    });

    let charge_id = charge_id(&answers[0]);
    for answer in &answers {
        assert_eq!(answer.status, PaymentStatus::Completed, "{answer:?}");
        assert_eq!(
            answer.charge_id.as_deref(),
            Some(charge_id.as_str()),
            "different charges: {answers:#?}"
        );
    }
    let fresh = answers
        .iter()
        .filter(|a| a.message == "Payment processed successfully")
        .count();
    assert_eq!(
        fresh, 1,
        "not exactly one caller processed it: {answers:#?}"
    );

    let entries = assert_ledger(&id, 1500, 0);
    if !entries.is_empty() {
        assert_eq!(
            entries.len(),
            1,
            "gateway called more than once: {entries:#?}"
        );
    }
}

#[test]
fn currency_defaults_to_usd() {
    let app = spawn_app();
    let id = unique_id("default-currency");
    // No currency field at all, as the seed's clients may send.
    let created: PaymentResult = ok(
        "CreatePayment",
        app.call(
            &id,
            CREATE,
            &json!({"amount": 250, "description": "No currency", "customerId": "cust-dan"}),
        ),
    );
    assert_eq!(created.status, PaymentStatus::Completed, "{created:?}");
    assert_eq!(app.payment(&id).currency.as_str(), "USD");
}

#[test]
fn the_largest_allowed_amount_is_accepted() {
    let app = spawn_app();
    let id = unique_id("max-amount");
    let body = CreatePaymentBody::new(1_000_000_000_000, "cust-max")
        .in_currency("JPY")
        .described("Max");
    let created = ok(
        "amount 10^12 must be accepted",
        app.create_payment(&id, &body),
    );
    assert_eq!(created.status, PaymentStatus::Completed, "{created:?}");
    assert_eq!(app.payment(&id).amount.minor_units(), 1_000_000_000_000);
}

#[test]
fn refunding_twice_returns_the_same_refund() {
    let app = spawn_app();
    let id = unique_id("refund-twice");
    app.completed_payment(&id, 10000);

    // No amount field at all: a full refund.
    let no_amount = json!({"reason": "Customer request"});
    let first: Refund = ok("RefundPayment", app.call(&id, REFUND, &no_amount));
    assert_eq!(first.status, RefundStatus::Completed, "{first:?}");
    assert_eq!(
        first.amount.minor_units(),
        10000,
        "no amount means a full refund: {first:?}"
    );
    assert_eq!(first.message, "Refund processed successfully", "{first:?}");
    assert!(
        first.refund_id.as_deref().is_some_and(|id| !id.is_empty()),
        "{first:?}"
    );

    let second: Refund = ok("RefundPayment", app.call(&id, REFUND, &no_amount));
    assert_eq!(
        second, first,
        "the second refund must return the stored one"
    );

    assert_eq!(app.payment(&id).status, PaymentStatus::Refunded);

    let entries = assert_ledger(&id, 10000, 1);
    if let Some(line) = refunds(&entries).first() {
        assert!(!line.replay, "{line:?}");
        assert_eq!(line.amount, 10000, "{line:?}");
        assert_eq!(line.id.as_deref(), first.refund_id.as_deref(), "{line:?}");
    }
}

#[test]
fn amount_zero_is_a_full_refund() {
    let app = spawn_app();
    let id = unique_id("refund-zero");
    app.completed_payment(&id, 7700);
    let refund = ok(
        "RefundPayment",
        app.refund(&id, &refund_body("Duplicate order", Some(0))),
    );
    assert_eq!(refund.status, RefundStatus::Completed, "{refund:?}");
    assert_eq!(refund.amount.minor_units(), 7700, "{refund:?}");
}

#[test]
fn partial_refund_then_larger_request_returns_the_first_refund() {
    let app = spawn_app();
    let id = unique_id("refund-partial");
    app.completed_payment(&id, 10000);

    let partial = ok(
        "RefundPayment",
        app.refund(&id, &refund_body("Partial", Some(2500))),
    );
    assert_eq!(partial.status, RefundStatus::Completed, "{partial:?}");
    assert_eq!(partial.amount.minor_units(), 2500, "{partial:?}");
    assert!(
        partial
            .refund_id
            .as_deref()
            .is_some_and(|id| !id.is_empty()),
        "{partial:?}"
    );

    assert_eq!(app.payment(&id).status, PaymentStatus::PartiallyRefunded);

    for body in [
        refund_body("The rest", Some(10000)),
        refund_body("Everything", None),
        refund_body("Less", Some(100)),
    ] {
        let again = ok(&format!("{body:?}"), app.refund(&id, &body));
        assert_eq!(
            again, partial,
            "{body:?}: the stored refund must come back unchanged"
        );
    }

    let entries = assert_ledger(&id, 10000, 1);
    if let Some(line) = refunds(&entries).first() {
        assert_eq!(line.amount, 2500, "{line:?}");
        assert_eq!(line.id.as_deref(), partial.refund_id.as_deref(), "{line:?}");
    }
}

#[test]
fn state_keys_hold_readable_json() {
    let app = spawn_app();
    let id = unique_id("state");
    app.completed_payment(&id, 3100);

    assert_eq!(
        state_of::<Payment>(app, &id, "payment"),
        Some(app.payment(&id)),
        "state key `payment` must hold the GetPayment answer"
    );
    assert_eq!(
        state_of::<Refund>(app, &id, "refund"),
        None,
        "refund state before any refund"
    );

    let refund = ok(
        "RefundPayment",
        app.refund(&id, &refund_body("State check", Some(1000))),
    );
    let mut payment = app.payment(&id);
    assert_eq!(
        payment.status,
        PaymentStatus::PartiallyRefunded,
        "{payment:?}"
    );
    assert_eq!(payment.amount_refunded, 1000, "{payment:?}");
    // GetPayment lists the payment's one refund; state key `payment` does not hold it.
    assert_eq!(payment.refunds, std::slice::from_ref(&refund));
    payment.refunds.clear();
    assert_eq!(
        state_of::<Payment>(app, &id, "payment"),
        Some(payment),
        "state key `payment` after the refund"
    );
    assert_eq!(
        state_of::<Refund>(app, &id, "refund"),
        Some(refund),
        "state key `refund` must hold the RefundPayment answer"
    );
}

#[test]
fn payments_are_isolated_per_key() {
    let app = spawn_app();
    let (a, b) = (unique_id("iso-a"), unique_id("iso-b"));
    let first = app.completed_payment(&a, 100);
    let second = app.completed_payment(&b, 100);
    assert_ne!(
        first.charge_id, second.charge_id,
        "two payments share a charge"
    );
    assert!(matches!(
        app.refund(&a, &refund_body("only a", None)),
        Answer::Ok(_)
    ));
    assert_eq!(app.payment(&a).status, PaymentStatus::Refunded);
    assert_eq!(app.payment(&b).status, PaymentStatus::Completed);
}
