//! Transient gateway errors (timeouts, not declines): retried inside the journaled step with a
//! bounded backoff; when the budget runs out the payment ends `failed` saying why, and the
//! client gets an answer. Nothing is paused or retried forever.

mod common;

use common::owned::OwnedStack;
use common::{TestApp, unique_id};
use serde_json::json;

fn stack_failing(rate: &str) -> OwnedStack {
    OwnedStack::start(&[
        ("GATEWAY_ERROR_RATE", rate.to_owned()),
        ("GATEWAY_DECLINE_RATE", "0".to_owned()),
        ("GATEWAY_DELAY_MS", "1".to_owned()),
    ])
    .expect("starting the stack")
}

/// Every invocation of these payments finished, and none was retried by Restate: the
/// gateway's errors were absorbed inside the step.
fn assert_finished_without_restate_retries(app: &TestApp, ids: &[String]) {
    for id in ids {
        for inv in app.invocations(id) {
            assert_eq!(inv.status, "completed", "{inv:?}");
            assert!(
                inv.retry_count.unwrap_or(0) == 0,
                "retried by Restate: {inv:?}"
            );
        }
    }
}

#[test]
fn a_gateway_that_always_fails_ends_the_payment_failed_with_the_reason() {
    let stack = stack_failing("1");
    let app = &stack.app;
    let id = unique_id("gw-down");
    let (status, answer) = app.create_payment(
        &id,
        &json!({"amount": 2500, "currency": "USD", "customerId": "cust-dora"}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "failed", "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains("gateway unavailable"), "{answer}");
    assert!(message.contains("gave up after 5 attempts"), "{answer}");
    assert!(answer.get("chargeId").is_none(), "{answer}");

    let (_, payment) = app.get_payment(&id);
    assert_eq!(payment["status"], "failed", "{payment}");
    assert_eq!(payment["errorMsg"], answer["message"], "{payment}");

    // Failed stays failed; the gateway never acted, so the ledger is empty.
    let (_, again) = app.create_payment(
        &id,
        &json!({"amount": 2500, "currency": "USD", "customerId": "cust-dora"}),
    );
    assert_eq!(again["status"], "failed", "{again}");
    assert_eq!(again["message"], "Payment already processed", "{again}");
    assert_eq!(app.ledger_entries(&id).unwrap_or_default().len(), 0);
    assert_finished_without_restate_retries(app, &[id]);
}

#[test]
fn a_gateway_that_fails_sometimes_still_settles_every_payment_once() {
    let stack = stack_failing("0.5");
    let app = &stack.app;
    let ids: Vec<String> = (0..16)
        .map(|i| unique_id(&format!("gw-flaky-{i}")))
        .collect();
    let mut completed = Vec::new();
    for id in &ids {
        let (status, answer) = app.create_payment(
            id,
            &json!({"amount": 1000, "currency": "USD", "customerId": "cust-flo"}),
        );
        assert_eq!(status, 200, "{answer}");
        match answer["status"].as_str() {
            Some("completed") => completed.push(id.clone()),
            // 0.5^5: about one payment in 32 exhausts its budget.
            Some("failed") => assert!(
                answer["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("gave up"),
                "{answer}"
            ),
            _ => panic!("unexpected answer {answer}"),
        }
        let charges = app.ledger_entries(id).unwrap_or_default();
        let expected = usize::from(answer["status"] == "completed");
        assert_eq!(charges.len(), expected, "{id}: {charges:#?}");
    }
    assert!(
        completed.len() >= 8,
        "too few completed: {}",
        completed.len()
    );

    // Refunds meet the same gateway: a refund that runs out of attempts answers 503 and
    // stores nothing; retried, it refunds exactly once.
    let mut saw_503 = false;
    for id in &completed {
        let mut refunded = None;
        for _ in 0..20 {
            let (status, answer) = app.refund(id, &json!({"reason": "flaky"}));
            match status {
                200 => {
                    refunded = Some(answer);
                    break;
                }
                503 => saw_503 = true,
                _ => panic!("refund {id}: {status} {answer}"),
            }
        }
        let refund = refunded.unwrap_or_else(|| panic!("refund {id} never went through"));
        let (_, again) = app.refund(id, &json!({"reason": "flaky"}));
        assert_eq!(again, refund);
        let refunds: Vec<_> = app
            .ledger_entries(id)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.op == "refund")
            .collect();
        assert_eq!(refunds.len(), 1, "{id}: {refunds:#?}");
    }
    eprintln!("refund answered 503 at least once: {saw_503}");
    assert_finished_without_restate_retries(app, &ids);
}

#[test]
fn a_decline_is_final_at_once_even_when_the_gateway_is_flaky() {
    let stack = stack_failing("0.5");
    let app = &stack.app;
    let id = unique_id("gw-decline");
    let (status, answer) = app.create_payment(
        &id,
        &json!({"amount": 700, "currency": "USD", "customerId": "decline-gus"}),
    );
    assert_eq!(status, 200, "{answer}");
    // A decline is an answer, not an error: one gateway call decided it (the mock's
    // transient errors happen before it acts, so they leave no ledger line).
    let entries = app.ledger_entries(&id).unwrap_or_default();
    if answer["message"] == "insufficient funds" {
        assert_eq!(entries.len(), 1, "{entries:#?}");
        assert_eq!(entries[0].outcome, "declined");
    } else {
        assert!(
            answer["message"]
                .as_str()
                .unwrap_or_default()
                .contains("gave up"),
            "{answer}"
        );
        assert!(entries.is_empty(), "{entries:#?}");
    }
    assert_eq!(answer["status"], "failed", "{answer}");
    assert_finished_without_restate_retries(app, &[id]);
}
