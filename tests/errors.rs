//! Declines and every error answer (404 / 400 / 409): each is a terminal
//! error with a message, and leaves no invocation pending or retrying.

mod common;

use common::{assert_absent, assert_all_settled, assert_error, stack, unique_id};
use serde_json::json;

/// A valid CreatePayment body.
fn valid() -> serde_json::Value {
    json!({"amount": 10000, "currency": "USD", "description": "Premium subscription", "customerId": "cust-alice"})
}

#[test]
fn declined_payment_fails_and_stays_failed() {
    let app = stack();
    let id = unique_id("declined");
    let customer = unique_id("decline-cust");
    let body = json!({"amount": 5000, "currency": "USD", "description": "Declined", "customerId": customer});

    let (status, first) = app.create_payment(&id, &body);
    assert_eq!(status, 200, "a decline is an answer, not an error: {first}");
    assert_eq!(first["paymentId"], id.as_str(), "{first}");
    assert_eq!(first["status"], "failed", "{first}");
    assert_eq!(first["message"], "insufficient funds", "{first}");
    assert_absent(&first, "chargeId");

    // Retrying does not charge again and stays failed.
    let (status, retry) = app.create_payment(&id, &body);
    assert_eq!(status, 200, "{retry}");
    assert_eq!(retry["paymentId"], id.as_str(), "{retry}");
    assert_eq!(retry["status"], "failed", "{retry}");
    assert_absent(&retry, "chargeId");

    let (status, payment) = app.get_payment(&id);
    assert_eq!(status, 200, "{payment}");
    assert_eq!(payment["status"], "failed", "{payment}");
    assert_eq!(payment["customerId"], customer.as_str(), "{payment}");
    assert_absent(&payment, "chargeId");
    let error = payment["errorMsg"]
        .as_str()
        .unwrap_or_else(|| panic!("a failed payment needs errorMsg: {payment}"));
    assert!(error.contains("insufficient funds"), "{payment}");
    common::assert_utc_timestamp(&payment, "createdAt");

    let message = assert_error(
        "refund of a failed payment",
        &app.refund(&id, &json!({"reason": "Customer request"})),
        409,
    );
    assert!(
        message.contains("failed"),
        "409 must name the status: {message:?}"
    );
    assert_eq!(
        app.get_payment(&id).1["status"],
        "failed",
        "the refund attempt changed it"
    );

    if let Some(entries) = app.ledger_entries(&id) {
        assert_eq!(
            entries.len(),
            1,
            "one gateway call, no refund: {entries:#?}"
        );
        let charge = &entries[0];
        assert_eq!(charge.op, "charge", "{charge:?}");
        assert_eq!(charge.outcome, "declined", "{charge:?}");
        assert_eq!(charge.amount, 5000, "{charge:?}");
        assert!(!charge.replay, "{charge:?}");
        assert_eq!(charge.id, None, "a declined charge has no id: {charge:?}");
    }
    assert_all_settled(app, &[id]);
}

#[test]
fn unknown_payments_are_not_found() {
    let app = stack();
    let mut ids = Vec::new();

    let id = unique_id("missing-get");
    let message = assert_error(
        "GetPayment {} of an unknown payment",
        &app.get_payment(&id),
        404,
    );
    assert!(!message.is_empty());
    assert_error(
        "GetPayment (no body) of an unknown payment",
        &app.get_payment_no_body(&id),
        404,
    );
    assert!(app.state(&id).is_empty(), "GetPayment created state");
    ids.push(id);

    let id = unique_id("missing-refund");
    assert_error(
        "RefundPayment of an unknown payment",
        &app.refund(&id, &json!({"reason": "Customer request", "amount": 100})),
        404,
    );
    assert_error(
        "RefundPayment (no amount) of an unknown payment",
        &app.refund(&id, &json!({"reason": "Customer request"})),
        404,
    );
    assert!(app.state(&id).is_empty(), "RefundPayment created state");
    assert_error(
        "GetPayment after the refund attempt",
        &app.get_payment(&id),
        404,
    );
    ids.push(id);

    assert_all_settled(app, &ids);
}

#[test]
fn invalid_create_requests_are_rejected_terminally() {
    let app = stack();
    let cases: &[(&str, Option<&str>)] = &[
        (
            "amount missing",
            Some(r#"{"currency":"USD","description":"d","customerId":"c"}"#),
        ),
        (
            "amount null",
            Some(r#"{"amount":null,"currency":"USD","description":"d","customerId":"c"}"#),
        ),
        (
            "amount zero",
            Some(r#"{"amount":0,"currency":"USD","description":"d","customerId":"c"}"#),
        ),
        (
            "amount negative",
            Some(r#"{"amount":-100,"currency":"USD","description":"d","customerId":"c"}"#),
        ),
        (
            "amount fractional",
            Some(r#"{"amount":10.5,"currency":"USD","description":"d","customerId":"c"}"#),
        ),
        (
            "amount a string",
            Some(r#"{"amount":"100","currency":"USD","description":"d","customerId":"c"}"#),
        ),
        (
            "amount above 10^12",
            Some(r#"{"amount":1000000000001,"currency":"USD","description":"d","customerId":"c"}"#),
        ),
        (
            "amount beyond u64",
            Some(
                r#"{"amount":100000000000000000000,"currency":"USD","description":"d","customerId":"c"}"#,
            ),
        ),
        (
            "currency lower-case",
            Some(r#"{"amount":100,"currency":"usd","description":"d","customerId":"c"}"#),
        ),
        (
            "currency too short",
            Some(r#"{"amount":100,"currency":"US","description":"d","customerId":"c"}"#),
        ),
        (
            "currency too long",
            Some(r#"{"amount":100,"currency":"EURO","description":"d","customerId":"c"}"#),
        ),
        (
            "currency a number",
            Some(r#"{"amount":100,"currency":5,"description":"d","customerId":"c"}"#),
        ),
        (
            "malformed JSON",
            Some(r#"{"amount": 100, "currency": "USD","#),
        ),
        ("not JSON at all", Some("amount=100")),
        ("a JSON array", Some("[100, \"USD\"]")),
        ("empty body", Some("")),
        ("no body, no content-type", None),
    ];

    let mut ids = Vec::new();
    for (case, body) in cases {
        let id = unique_id("bad-create");
        let got = app.call_raw(&id, "CreatePayment", body.map(str::to_owned));
        assert_error(case, &got, 400);
        let (status, after) = app.get_payment(&id);
        assert_eq!(
            status, 404,
            "{case}: a rejected CreatePayment stored a payment: {after}"
        );
        ids.push(id);
    }

    // Rejected right away, and nothing left pending, backing off or paused.
    let invocations = assert_all_settled(app, &ids);
    let failed_creates = invocations
        .iter()
        .filter(|i| i.target_handler_name == "CreatePayment")
        .collect::<Vec<_>>();
    for inv in &failed_creates {
        assert_eq!(inv.completion_result.as_deref(), Some("failure"), "{inv:?}");
        let failure = inv.completion_failure.as_deref().unwrap_or_default();
        assert!(failure.starts_with("[400]"), "{inv:?}");
    }
    // At most the two body-less cases may have been refused by the ingress
    // before any invocation existed.
    assert!(
        failed_creates.len() + 2 >= cases.len(),
        "expected an invocation per rejected request: {invocations:#?}"
    );
    if let Some(path) = &app.ledger {
        for id in &ids {
            let entries = app.ledger_entries(id).unwrap_or_default();
            assert!(
                entries.is_empty(),
                "{id}: the gateway was called for a bad request ({}): {entries:#?}",
                path.display()
            );
        }
    }
}

#[test]
fn invalid_refund_requests_are_rejected_terminally() {
    let app = stack();
    let id = unique_id("bad-refund");
    let created = app.completed_payment(&id, 10000);

    let cases: &[(&str, &str)] = &[
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
        let got = app.call_raw(&id, "RefundPayment", Some((*body).to_owned()));
        assert_error(case, &got, 400);
    }

    // The bad requests changed nothing: still completed, no refund at the
    // gateway, and a valid refund still works.
    let (_, payment) = app.get_payment(&id);
    assert_eq!(payment["status"], "completed", "{payment}");
    assert_eq!(payment["chargeId"], created["chargeId"], "{payment}");
    assert!(
        !app.state(&id).contains_key("refund"),
        "a bad refund stored state"
    );
    if let Some(entries) = app.ledger_entries(&id) {
        assert!(
            entries.iter().all(|e| e.op != "refund"),
            "the gateway refunded on a bad request: {entries:#?}"
        );
    }

    let invocations = assert_all_settled(app, std::slice::from_ref(&id));
    let rejected = invocations
        .iter()
        .filter(|i| i.target_handler_name == "RefundPayment")
        .collect::<Vec<_>>();
    assert_eq!(rejected.len(), cases.len(), "{invocations:#?}");
    for inv in rejected {
        assert_eq!(inv.completion_result.as_deref(), Some("failure"), "{inv:?}");
        assert!(
            inv.completion_failure
                .as_deref()
                .unwrap_or_default()
                .starts_with("[400]"),
            "{inv:?}"
        );
    }

    let (status, refund) = app.refund(&id, &json!({"reason": "Customer request", "amount": 10000}));
    assert_eq!(status, 200, "{refund}");
    assert_eq!(refund["status"], "completed", "{refund}");
    assert_eq!(refund["amount"], 10000, "{refund}");
}

#[test]
fn refund_of_a_failed_payment_conflicts() {
    let app = stack();
    let id = unique_id("conflict");
    let (status, created) = app.create_payment(
        &id,
        &json!({"amount": 800, "currency": "USD", "description": "d", "customerId": "decline-conflict"}),
    );
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["status"], "failed", "{created}");

    for body in [
        json!({"reason": "Customer request"}),
        json!({"reason": "Customer request", "amount": 800}),
        json!({"reason": "Customer request", "amount": 0}),
    ] {
        let message = assert_error(
            &format!("refund {body} of a failed payment"),
            &app.refund(&id, &body),
            409,
        );
        assert!(
            message.contains("failed"),
            "409 must name the status: {message:?}"
        );
    }
    assert_all_settled(app, &[id]);
}

/// Valid requests settle too (guards the settledness check itself).
#[test]
fn valid_requests_settle_successfully() {
    let app = stack();
    let id = unique_id("settled");
    let (status, created) = app.create_payment(&id, &valid());
    assert_eq!(status, 200, "{created}");
    let invocations = assert_all_settled(app, std::slice::from_ref(&id));
    assert_eq!(invocations.len(), 1, "{invocations:#?}");
    assert_eq!(invocations[0].target_handler_name, "CreatePayment");
    assert_eq!(invocations[0].completion_result.as_deref(), Some("success"));
}
