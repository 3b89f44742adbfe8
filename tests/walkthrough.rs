//! Happy paths and idempotency: the seed README walkthrough, duplicate and
//! concurrent CreatePayments, refund idempotency, and the stored state.

mod common;

use std::sync::Barrier;

use common::{
    LedgerEntry, assert_absent, assert_nonempty_str, assert_utc_timestamp, seed_payment, stack,
    unique_id,
};
use serde_json::{Value, json};

fn charges(entries: &[LedgerEntry]) -> Vec<&LedgerEntry> {
    entries.iter().filter(|e| e.op == "charge").collect()
}

fn refunds(entries: &[LedgerEntry]) -> Vec<&LedgerEntry> {
    entries.iter().filter(|e| e.op == "refund").collect()
}

/// Asserts the ledger of `id` shows exactly one charge (`outcome`, not a
/// replay, for `amount`) and `refund_count` refunds; returns the entries.
#[track_caller]
fn assert_ledger(id: &str, amount: i64, outcome: &str, refund_count: usize) -> Vec<LedgerEntry> {
    let Some(entries) = stack().ledger_entries(id) else {
        return Vec::new();
    };
    let charges = charges(&entries);
    assert_eq!(
        charges.len(),
        1,
        "{id}: expected exactly one charge: {entries:#?}"
    );
    let charge = charges[0];
    assert!(!charge.replay, "{id}: the charge is a replay: {charge:?}");
    assert_eq!(charge.amount, amount, "{id}: {charge:?}");
    assert_eq!(charge.outcome, outcome, "{id}: {charge:?}");
    assert!(!charge.idempotency_key.is_empty(), "{id}: {charge:?}");
    assert_eq!(
        refunds(&entries).len(),
        refund_count,
        "{id}: unexpected refund lines: {entries:#?}"
    );
    entries
}

/// The seed README, step by step (with a unique payment id).
#[test]
fn seed_readme_walkthrough() {
    let app = stack();
    let id = unique_id("payment-001");

    // Create Payment
    let (status, created) = app.create_payment(&id, &seed_payment());
    assert_eq!(status, 200, "CreatePayment: {created}");
    assert_eq!(created["paymentId"], id.as_str(), "{created}");
    assert_eq!(created["status"], "completed", "{created}");
    assert_eq!(
        created["message"], "Payment processed successfully",
        "{created}"
    );
    let charge_id = assert_nonempty_str(&created, "chargeId").to_owned();

    // Test Idempotency (Duplicate Request)
    let (status, duplicate) = app.create_payment(&id, &seed_payment());
    assert_eq!(status, 200, "duplicate CreatePayment: {duplicate}");
    assert_eq!(duplicate["paymentId"], id.as_str(), "{duplicate}");
    assert_eq!(duplicate["status"], "completed", "{duplicate}");
    assert_eq!(duplicate["chargeId"], charge_id.as_str(), "{duplicate}");
    assert_eq!(
        duplicate["message"], "Payment already processed",
        "{duplicate}"
    );

    // Get Payment Status: with `-d '{}'` and with no body at all.
    let (status, payment) = app.get_payment(&id);
    assert_eq!(status, 200, "GetPayment {{}}: {payment}");
    assert_eq!(payment["paymentId"], id.as_str(), "{payment}");
    assert_eq!(payment["amount"], 10000, "{payment}");
    assert_eq!(payment["currency"], "USD", "{payment}");
    assert_eq!(payment["description"], "Premium subscription", "{payment}");
    assert_eq!(payment["customerId"], "cust-alice", "{payment}");
    assert_eq!(payment["status"], "completed", "{payment}");
    assert_eq!(payment["chargeId"], charge_id.as_str(), "{payment}");
    let created_at = assert_utc_timestamp(&payment, "createdAt");
    let completed_at = assert_utc_timestamp(&payment, "completedAt");
    assert!(
        completed_at >= created_at,
        "completedAt before createdAt: {payment}"
    );
    assert_absent(&payment, "errorMsg");

    let (status, no_body) = app.get_payment_no_body(&id);
    assert_eq!(status, 200, "GetPayment without a body: {no_body}");
    assert_eq!(
        no_body, payment,
        "GetPayment answers differ with and without a body"
    );

    // Refund Payment
    let (status, refund) = app.refund(&id, &json!({"reason": "Customer request", "amount": 10000}));
    assert_eq!(status, 200, "RefundPayment: {refund}");
    let refund_id = assert_nonempty_str(&refund, "refundId").to_owned();
    assert_eq!(refund["status"], "completed", "{refund}");
    assert_eq!(refund["amount"], 10000, "{refund}");
    assert_eq!(
        refund["message"], "Refund processed successfully",
        "{refund}"
    );

    let (status, refunded) = app.get_payment(&id);
    assert_eq!(status, 200, "GetPayment after the refund: {refunded}");
    assert_eq!(refunded["status"], "refunded", "{refunded}");
    assert_eq!(refunded["chargeId"], charge_id.as_str(), "{refunded}");
    for field in [
        "paymentId",
        "amount",
        "currency",
        "description",
        "customerId",
        "createdAt",
    ] {
        assert_eq!(
            refunded[field], payment[field],
            "{field} changed by the refund"
        );
    }

    // The gateway saw one charge and one refund, with the ids we were given.
    let entries = assert_ledger(&id, 10000, "succeeded", 1);
    if !entries.is_empty() {
        let charge = charges(&entries)[0];
        assert_eq!(charge.id.as_deref(), Some(charge_id.as_str()), "{charge:?}");
        let refund_line = refunds(&entries)[0];
        assert_eq!(refund_line.outcome, "succeeded", "{refund_line:?}");
        assert_eq!(refund_line.amount, 10000, "{refund_line:?}");
        assert!(!refund_line.replay, "{refund_line:?}");
        assert_eq!(
            refund_line.id.as_deref(),
            Some(refund_id.as_str()),
            "{refund_line:?}"
        );
    }
}

#[test]
fn sequential_duplicate_returns_the_same_result_and_charges_once() {
    let app = stack();
    let id = unique_id("dup-seq");
    let body =
        json!({"amount": 4200, "currency": "EUR", "description": "Book", "customerId": "cust-bob"});

    let (status, first) = app.create_payment(&id, &body);
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "completed", "{first}");
    let charge_id = assert_nonempty_str(&first, "chargeId").to_owned();

    for attempt in 1..=2 {
        let (status, again) = app.create_payment(&id, &body);
        assert_eq!(status, 200, "duplicate #{attempt}: {again}");
        assert_eq!(again["paymentId"], id.as_str(), "{again}");
        assert_eq!(again["status"], "completed", "{again}");
        assert_eq!(again["chargeId"], charge_id.as_str(), "{again}");
        assert_eq!(again["message"], "Payment already processed", "{again}");
    }

    // Only the description differs: still a retry, answered with the stored payment.
    let (status, relabelled) = app.create_payment(
        &id,
        &json!({"amount": 4200, "currency": "EUR", "description": "other", "customerId": "cust-bob"}),
    );
    assert_eq!(status, 200, "{relabelled}");
    assert_eq!(relabelled["chargeId"], charge_id.as_str(), "{relabelled}");
    assert_eq!(
        relabelled["message"], "Payment already processed",
        "{relabelled}"
    );

    // Other money-moving fields: another payment under a taken ID, refused, nothing changed.
    let (status, conflict) = app.create_payment(
        &id,
        &json!({"amount": 999, "currency": "USD", "description": "other", "customerId": "cust-eve"}),
    );
    assert_eq!(status, 409, "{conflict}");
    let message = conflict["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("different amount, currency, customerId"),
        "{conflict}"
    );
    let (_, payment) = app.get_payment(&id);
    assert_eq!(payment["amount"], 4200, "{payment}");
    assert_eq!(payment["currency"], "EUR", "{payment}");
    assert_eq!(payment["customerId"], "cust-bob", "{payment}");
    assert_eq!(payment["description"], "Book", "{payment}");

    assert_ledger(&id, 4200, "succeeded", 0);
}

#[test]
fn concurrent_duplicates_charge_exactly_once() {
    const CALLERS: usize = 5;
    let app = stack();
    let id = unique_id("dup-concurrent");
    let body = json!({"amount": 1500, "currency": "USD", "description": "Concurrent", "customerId": "cust-carol"});

    let barrier = Barrier::new(CALLERS);
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CALLERS)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    app.create_payment(&id, &body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let charge_id = answers[0].1["chargeId"].clone();
    assert!(charge_id.is_string(), "no chargeId: {answers:?}");
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(answer["status"], "completed", "{answer}");
        assert_eq!(
            answer["chargeId"], charge_id,
            "different charges: {answers:?}"
        );
    }
    let fresh = answers
        .iter()
        .filter(|(_, a)| a["message"] == "Payment processed successfully")
        .count();
    assert_eq!(
        fresh, 1,
        "exactly one caller should have processed it: {answers:?}"
    );

    let entries = assert_ledger(&id, 1500, "succeeded", 0);
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
    let app = stack();
    let id = unique_id("default-currency");
    let (status, created) = app.create_payment(
        &id,
        &json!({"amount": 250, "description": "No currency", "customerId": "cust-dan"}),
    );
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["status"], "completed", "{created}");
    let (status, payment) = app.get_payment(&id);
    assert_eq!(status, 200, "{payment}");
    assert_eq!(payment["currency"], "USD", "{payment}");
}

#[test]
fn the_largest_allowed_amount_is_accepted() {
    let app = stack();
    let id = unique_id("max-amount");
    let (status, created) = app.create_payment(
        &id,
        &json!({"amount": 1_000_000_000_000_i64, "currency": "JPY", "description": "Max", "customerId": "cust-max"}),
    );
    assert_eq!(status, 200, "amount 10^12 must be accepted: {created}");
    assert_eq!(created["status"], "completed", "{created}");
    let (_, payment) = app.get_payment(&id);
    assert_eq!(payment["amount"], 1_000_000_000_000_i64, "{payment}");
}

#[test]
fn refunding_twice_returns_the_same_refund() {
    let app = stack();
    let id = unique_id("refund-twice");
    app.completed_payment(&id, 10000);

    let (status, first) = app.refund(&id, &json!({"reason": "Customer request"}));
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["status"], "completed", "{first}");
    assert_eq!(
        first["amount"], 10000,
        "no amount means a full refund: {first}"
    );
    assert_eq!(first["message"], "Refund processed successfully", "{first}");
    assert_nonempty_str(&first, "refundId");

    let (status, second) = app.refund(&id, &json!({"reason": "Customer request"}));
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        second, first,
        "the second refund must return the stored one"
    );

    let (_, payment) = app.get_payment(&id);
    assert_eq!(payment["status"], "refunded", "{payment}");

    let entries = assert_ledger(&id, 10000, "succeeded", 1);
    if let Some(line) = refunds(&entries).first() {
        assert!(!line.replay, "{line:?}");
        assert_eq!(line.amount, 10000, "{line:?}");
        assert_eq!(
            line.id,
            first["refundId"].as_str().map(str::to_owned),
            "{line:?}"
        );
    }
}

#[test]
fn amount_zero_is_a_full_refund() {
    let app = stack();
    let id = unique_id("refund-zero");
    app.completed_payment(&id, 7700);
    let (status, refund) = app.refund(&id, &json!({"reason": "Duplicate order", "amount": 0}));
    assert_eq!(status, 200, "{refund}");
    assert_eq!(refund["status"], "completed", "{refund}");
    assert_eq!(refund["amount"], 7700, "{refund}");
}

#[test]
fn partial_refund_then_larger_request_returns_the_first_refund() {
    let app = stack();
    let id = unique_id("refund-partial");
    app.completed_payment(&id, 10000);

    let (status, partial) = app.refund(&id, &json!({"reason": "Partial", "amount": 2500}));
    assert_eq!(status, 200, "{partial}");
    assert_eq!(partial["status"], "completed", "{partial}");
    assert_eq!(partial["amount"], 2500, "{partial}");
    let refund_id = assert_nonempty_str(&partial, "refundId").to_owned();

    let (_, payment) = app.get_payment(&id);
    assert_eq!(payment["status"], "refunded", "{payment}");

    for body in [
        json!({"reason": "The rest", "amount": 10000}),
        json!({"reason": "Everything"}),
        json!({"reason": "Less", "amount": 100}),
    ] {
        let (status, again) = app.refund(&id, &body);
        assert_eq!(status, 200, "{body} → {again}");
        assert_eq!(again["refundId"], refund_id.as_str(), "{body} → {again}");
        assert_eq!(again["amount"], 2500, "{body} → {again}");
        assert_eq!(
            again, partial,
            "{body}: the stored refund must come back unchanged"
        );
    }

    let entries = assert_ledger(&id, 10000, "succeeded", 1);
    if let Some(line) = refunds(&entries).first() {
        assert_eq!(line.amount, 2500, "{line:?}");
        assert_eq!(line.id.as_deref(), Some(refund_id.as_str()), "{line:?}");
    }
}

#[test]
fn state_keys_hold_readable_json() {
    let app = stack();
    let id = unique_id("state");
    app.completed_payment(&id, 3100);

    let state = app.state(&id);
    let (_, payment) = app.get_payment(&id);
    assert_eq!(
        state.get("payment"),
        Some(&payment),
        "state key `payment` must hold the GetPayment JSON; state: {state:?}"
    );
    assert!(
        !state.contains_key("refund"),
        "refund state before any refund: {state:?}"
    );

    let (status, refund) = app.refund(&id, &json!({"reason": "State check", "amount": 1000}));
    assert_eq!(status, 200, "{refund}");
    let state = app.state(&id);
    let (_, payment) = app.get_payment(&id);
    assert_eq!(payment["status"], "refunded", "{payment}");
    assert_eq!(
        state.get("payment"),
        Some(&payment),
        "state key `payment` after the refund; state: {state:?}"
    );
    assert_eq!(
        state.get("refund"),
        Some(&refund),
        "state key `refund` must hold the RefundPayment JSON; state: {state:?}"
    );
}

#[test]
fn payments_are_isolated_per_key() {
    let app = stack();
    let (a, b) = (unique_id("iso-a"), unique_id("iso-b"));
    let first = app.completed_payment(&a, 100);
    let second = app.completed_payment(&b, 100);
    assert_ne!(
        first["chargeId"], second["chargeId"],
        "two payments share a charge"
    );
    app.refund(&a, &json!({"reason": "only a"}));
    assert_eq!(app.get_payment(&a).1["status"], "refunded");
    assert_eq!(app.get_payment(&b).1["status"], "completed");
}
