//! Declines and every error answer (400 / 404 / 409 / 500): each is a terminal error with a message,
//! and leaves no invocation pending or retrying.

use bytes::Bytes;
use payment_service::payment::{
    CreatePaymentBody, PaymentResult, PaymentStatus, Refund, RefundStatus,
};
use serde_json::json;
use testkit::client::{CREATE, GET, REFUND};
use testkit::ledger::{LedgerOp, LedgerOutcome};

use std::time::Duration;

use testkit::stack::wait_until;

use crate::helpers::{
    assert_error, assert_refused, assert_utc, ok, refund_body, seed_payment, spawn_app, state_of,
    unique_id,
};

#[test]
fn declined_payment_fails_and_stays_failed() {
    let app = spawn_app();
    let id = unique_id("declined");
    let customer = unique_id("decline-cust");
    let body = CreatePaymentBody::new(5000, customer.clone()).described("Declined");

    let first = ok(
        "a decline is an answer, not an error",
        app.create_payment(&id, &body),
    );
    let declined = PaymentResult {
        payment_id: id.clone(),
        status: PaymentStatus::Failed,
        charge_id: None,
        message: "insufficient funds".into(),
    };
    assert_eq!(first, declined);

    // Retrying does not charge again and stays failed.
    let retry = ok("retry", app.create_payment(&id, &body));
    assert_eq!(retry.payment_id, id, "{retry:?}");
    assert_eq!(retry.status, PaymentStatus::Failed, "{retry:?}");
    assert_eq!(retry.charge_id, None, "{retry:?}");

    let payment = app.payment(&id);
    assert_eq!(payment.status, PaymentStatus::Failed, "{payment:?}");
    assert_eq!(payment.customer_id, customer, "{payment:?}");
    assert_eq!(payment.charge_id, None, "{payment:?}");
    let error = payment.error_msg.as_deref().unwrap_or_default();
    assert!(error.contains("insufficient funds"), "{payment:?}");
    assert_utc("createdAt", payment.created_at.expect("createdAt"));

    let message = assert_refused(
        "refund of a failed payment",
        app.refund(&id, &refund_body("Customer request", None)),
        409,
    );
    assert!(
        message.contains("failed"),
        "409 must name the status: {message:?}"
    );
    assert_eq!(
        app.payment(&id).status,
        PaymentStatus::Failed,
        "the refund attempt changed it"
    );

    if let Some(entries) = app.ledger(&id) {
        assert_eq!(
            entries.len(),
            1,
            "one gateway call, no refund: {entries:#?}"
        );
        let charge = &entries[0];
        assert_eq!(charge.op, LedgerOp::Charge, "{charge:?}");
        assert_eq!(charge.outcome, LedgerOutcome::Declined, "{charge:?}");
        assert_eq!(charge.amount, 5000, "{charge:?}");
        assert!(!charge.replay, "{charge:?}");
        assert_eq!(charge.id, None, "a declined charge has no ID: {charge:?}");
    }
    app.assert_all_settled(&[id]);
}

#[test]
fn unknown_payments_are_not_found() {
    let app = spawn_app();
    let no_state = |id: &str| {
        app.admin()
            .state(id)
            .expect("querying the state")
            .is_empty()
    };
    let mut ids = Vec::new();

    let id = unique_id("missing-get");
    assert_refused(
        "GetPayment {} of an unknown payment",
        app.get_payment(&id),
        404,
    );
    assert_error(
        "GetPayment (no body) of an unknown payment",
        &app.call_raw(&id, GET, None, &[]),
        404,
    );
    assert!(no_state(&id), "GetPayment created state");
    ids.push(id);

    let id = unique_id("missing-refund");
    assert_refused(
        "RefundPayment of an unknown payment",
        app.refund(&id, &refund_body("Customer request", Some(100))),
        404,
    );
    assert_refused(
        "RefundPayment (no amount) of an unknown payment",
        app.call::<Refund>(&id, REFUND, &json!({"reason": "Customer request"})),
        404,
    );
    assert!(no_state(&id), "RefundPayment created state");
    assert_refused(
        "GetPayment after the refund attempt",
        app.get_payment(&id),
        404,
    );
    ids.push(id);

    app.assert_all_settled(&ids);
}

#[test]
fn invalid_create_requests_are_rejected_terminally() {
    let app = spawn_app();
    let with = |field: &str, value: &str| {
        let mut body =
            json!({"amount": 100, "currency": "USD", "description": "d", "customerId": "c"});
        match value {
            "" => drop(body.as_object_mut().unwrap().remove(field)),
            raw => body[field] = serde_json::from_str(raw).unwrap(),
        }
        Some(body.to_string())
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("amount missing", with("amount", "")),
        ("amount null", with("amount", "null")),
        ("amount zero", with("amount", "0")),
        ("amount negative", with("amount", "-100")),
        ("amount fractional", with("amount", "10.5")),
        ("amount a string", with("amount", r#""100""#)),
        ("amount above 10^12", with("amount", "1000000000001")),
        (
            "amount beyond u64",
            Some(r#"{"amount":100000000000000000000,"customerId":"c"}"#.into()),
        ),
        ("currency lower-case", with("currency", r#""usd""#)),
        ("currency too short", with("currency", r#""US""#)),
        ("currency too long", with("currency", r#""EURO""#)),
        ("currency a number", with("currency", "5")),
        (
            "malformed JSON",
            Some(r#"{"amount": 100, "currency": "USD","#.into()),
        ),
        ("not JSON at all", Some("amount=100".into())),
        ("a JSON array", Some("[100, \"USD\"]".into())),
        ("empty body", Some(String::new())),
        ("no body, no content-type", None),
    ];

    let mut ids = Vec::new();
    for (case, body) in &cases {
        let id = unique_id("bad-create");
        let got = app.call_raw(&id, CREATE, body.clone().map(Bytes::from), &[]);
        assert_error(case, &got, 400);
        assert_refused(
            &format!("{case}: a rejected CreatePayment stored a payment"),
            app.get_payment(&id),
            404,
        );
        ids.push(id);
    }

    // Rejected right away, and nothing left pending, backing off or paused.
    let invocations = app.assert_all_settled(&ids);
    let failed_creates: Vec<_> = invocations
        .iter()
        .filter(|i| i.target_handler_name == CREATE)
        .collect();
    for inv in &failed_creates {
        assert_eq!(inv.completion_result.as_deref(), Some("failure"), "{inv:?}");
        let failure = inv.completion_failure.as_deref().unwrap_or_default();
        assert!(failure.starts_with("[400]"), "{inv:?}");
    }
    // At most the two body-less cases may have been refused by the ingress before any
    // invocation existed.
    assert!(
        failed_creates.len() + 2 >= cases.len(),
        "expected an invocation per rejected request: {invocations:#?}"
    );
    for id in &ids {
        if let Some(entries) = app.ledger(id) {
            assert!(
                entries.is_empty(),
                "{id}: the gateway was called for a bad request: {entries:#?}"
            );
        }
    }
}

#[test]
fn invalid_refund_requests_are_rejected_terminally() {
    let app = spawn_app();
    let id = unique_id("bad-refund");
    let created = app.completed_payment(&id, 10000);

    let cases: &[(&str, &'static str)] = &[
        ("refund amount negative", r#"{"reason":"r","amount":-1}"#),
        (
            "refund amount above the payment",
            r#"{"reason":"r","amount":10001}"#,
        ),
        (
            "refund amount far above the payment",
            r#"{"reason":"r","amount":1000000000000}"#,
        ),
        ("refund amount a string", r#"{"reason":"r","amount":"100"}"#),
        (
            "refund amount fractional",
            r#"{"reason":"r","amount":10.5}"#,
        ),
        ("refund malformed JSON", r#"{"reason": "r", "amount": "#),
    ];
    for (case, body) in cases {
        let got = app.call_raw(&id, REFUND, Some(Bytes::from_static(body.as_bytes())), &[]);
        assert_error(case, &got, 400);
    }

    // The bad requests changed nothing: still completed, no refund at the gateway, and a
    // valid refund still works.
    let payment = app.payment(&id);
    assert_eq!(payment.status, PaymentStatus::Completed, "{payment:?}");
    assert_eq!(payment.charge_id, created.charge_id, "{payment:?}");
    assert_eq!(
        state_of::<Refund>(app, &id, "refund"),
        None,
        "a bad refund stored state"
    );
    if let Some(entries) = app.ledger(&id) {
        assert!(
            entries.iter().all(|e| e.op != LedgerOp::Refund),
            "the gateway refunded on a bad request: {entries:#?}"
        );
    }

    let invocations = app.assert_all_settled(std::slice::from_ref(&id));
    let rejected: Vec<_> = invocations
        .iter()
        .filter(|i| i.target_handler_name == REFUND)
        .collect();
    assert_eq!(rejected.len(), cases.len(), "{invocations:#?}");
    for inv in rejected {
        assert_eq!(inv.completion_result.as_deref(), Some("failure"), "{inv:?}");
        let failure = inv.completion_failure.as_deref().unwrap_or_default();
        assert!(failure.starts_with("[400]"), "{inv:?}");
    }

    let refund = ok(
        "a valid refund",
        app.refund(&id, &refund_body("Customer request", Some(10000))),
    );
    assert_eq!(refund.status, RefundStatus::Completed, "{refund:?}");
    assert_eq!(refund.amount.minor_units(), 10000, "{refund:?}");
}

#[test]
fn refund_of_a_failed_payment_conflicts() {
    let app = spawn_app();
    let id = unique_id("conflict");
    let body = CreatePaymentBody::new(800, "decline-conflict").described("d");
    let created = ok("CreatePayment", app.create_payment(&id, &body));
    assert_eq!(created.status, PaymentStatus::Failed, "{created:?}");

    for amount in [None, Some(800), Some(0)] {
        let message = assert_refused(
            &format!("refund (amount {amount:?}) of a failed payment"),
            app.refund(&id, &refund_body("Customer request", amount)),
            409,
        );
        assert!(
            message.contains("failed"),
            "409 must name the status: {message:?}"
        );
    }
    app.assert_all_settled(&[id]);
}

/// Valid requests settle too (guards the settledness check itself).
#[test]
fn valid_requests_settle_successfully() {
    let app = spawn_app();
    let id = unique_id("settled");
    ok("CreatePayment", app.create_payment(&id, &seed_payment()));
    let invocations = app.assert_all_settled(std::slice::from_ref(&id));
    assert_eq!(invocations.len(), 1, "{invocations:#?}");
    assert_eq!(invocations[0].target_handler_name, CREATE);
    assert_eq!(invocations[0].completion_result.as_deref(), Some("success"));
}

/// Stored state that no longer decodes (here: an amount of 0, as if the bound had been
/// tightened after it was written) is a terminal 500 naming the payment and the problem, not
/// a retry that holds the payment's lock forever.
#[test]
fn stored_state_that_does_not_decode_is_a_terminal_error_naming_the_payment() {
    let app = spawn_app();
    let id = unique_id("corrupt");
    app.completed_payment(&id, 1000);
    let mut stored = app.admin().state(&id).expect("the state")["payment"].clone();
    stored["amount"] = json!(0);
    let bytes = stored.to_string().into_bytes();
    app.admin()
        .set_state(&id, &[("payment", &bytes)])
        .expect("changing the state");
    wait_until(Duration::from_secs(20), "the state change", || {
        Ok(app.admin().state(&id)?["payment"]["amount"] == json!(0))
    })
    .expect("the state change applied");

    for (handler, body) in [
        (GET, json!({})),
        (
            CREATE,
            json!({"amount": 1000, "currency": "USD", "customerId": "cust-test"}),
        ),
        (REFUND, json!({})),
    ] {
        let answer = app.call_raw(&id, handler, Some(Bytes::from(body.to_string())), &[]);
        let message = assert_error(handler, &answer, 500);
        assert!(
            message.contains(&id)
                && message.contains("does not decode")
                && message.contains("amount"),
            "{handler}: {message}"
        );
    }
    for inv in app.admin().invocations_of(&id).expect("the invocations") {
        assert_eq!(inv.status, "completed", "left retrying: {inv:?}");
    }
}
