//! Transient gateway errors (timeouts, not declines): retried inside the journaled step with a
//! bounded backoff; when the budget runs out the payment ends `failed` saying why, and the
//! client gets an answer. Nothing is paused or retried forever.

use std::time::Duration;

use payment_service::gateway::MockConfig;
use payment_service::payment::{CreatePaymentBody, PaymentStatus};
use testkit::client::CallError;
use testkit::ledger::{LedgerEntry, LedgerOp, LedgerOutcome};
use testkit::stack::Stack;

use crate::helpers::{TestApp, ok, own_stack, refund_body, unique_id};

fn stack_failing(error_rate: f64) -> TestApp {
    own_stack(Stack::builder().gateway(MockConfig {
        error_rate,
        decline_rate: 0.0,
        delay: Duration::from_millis(1),
        ..MockConfig::default()
    }))
}

/// The ledger of a stack started here, which always has one.
fn ledger(app: &TestApp, id: &str) -> Vec<LedgerEntry> {
    app.ledger(id).expect("an own stack has a ledger")
}

/// Every invocation of these payments finished, and none was retried by Restate: the
/// gateway's errors were absorbed inside the step.
fn assert_finished_without_restate_retries(app: &TestApp, ids: &[String]) {
    for id in ids {
        for inv in app
            .admin()
            .invocations_of(id)
            .expect("querying sys_invocation")
        {
            assert_eq!(inv.status, "completed", "{inv:?}");
            assert_eq!(
                inv.retry_count.unwrap_or(0),
                0,
                "retried by Restate: {inv:?}"
            );
        }
    }
}

#[test]
fn a_gateway_that_always_fails_ends_the_payment_failed_with_the_reason() {
    let app = stack_failing(1.0);
    let id = unique_id("gw-down");
    let body = CreatePaymentBody::new(2500, "cust-dora");
    let answer = ok("CreatePayment", app.create_payment(&id, &body));
    assert_eq!(answer.status, PaymentStatus::Failed, "{answer:?}");
    assert!(answer.message.contains("gateway unavailable"), "{answer:?}");
    assert!(
        answer.message.contains("gave up after 5 attempts"),
        "{answer:?}"
    );
    assert_eq!(answer.charge_id, None, "{answer:?}");

    let payment = app.payment(&id);
    assert_eq!(payment.status, PaymentStatus::Failed, "{payment:?}");
    assert_eq!(payment.error_msg.as_deref(), Some(answer.message.as_str()));

    // Failed stays failed; the gateway never acted, so the ledger is empty.
    let again = ok("CreatePayment again", app.create_payment(&id, &body));
    assert_eq!(again.status, PaymentStatus::Failed, "{again:?}");
    assert_eq!(again.message, "Payment already processed", "{again:?}");
    let entries = ledger(&app, &id);
    assert!(entries.is_empty(), "{entries:#?}");
    assert_finished_without_restate_retries(&app, &[id]);
}

#[test]
fn a_gateway_that_fails_sometimes_still_settles_every_payment_once() {
    let app = stack_failing(0.5);
    let ids: Vec<String> = (0..16)
        .map(|i| unique_id(&format!("gw-flaky-{i}")))
        .collect();
    let mut completed = Vec::new();
    for id in &ids {
        let answer = ok(
            "CreatePayment",
            app.create_payment(id, &CreatePaymentBody::new(1000, "cust-flo")),
        );
        match answer.status {
            PaymentStatus::Completed => completed.push(id.clone()),
            // 0.5^5: about one payment in 32 exhausts its budget.
            PaymentStatus::Failed => assert!(answer.message.contains("gave up"), "{answer:?}"),
            _ => panic!("unexpected answer {answer:?}"),
        }
        let charges = ledger(&app, id);
        let expected = usize::from(answer.status == PaymentStatus::Completed);
        assert_eq!(charges.len(), expected, "{id}: {charges:#?}");
    }
    assert!(
        completed.len() >= 8,
        "too few completed: {}",
        completed.len()
    );

    // Refunds meet the same gateway: a refund that runs out of attempts answers 503 and
    // stores nothing; retried, it refunds exactly once.
    let body = refund_body("flaky", None);
    let mut saw_503 = false;
    for id in &completed {
        let mut refunded = None;
        for _ in 0..20 {
            // The client counts a 503 as no answer (transient), with the status in its error.
            match app.run(app.api().refund_payment(id, &body)) {
                Ok(answer) => {
                    refunded = Some(ok("RefundPayment", answer));
                    break;
                }
                Err(CallError::Silent(e)) if e.starts_with("HTTP 503") => saw_503 = true,
                Err(e) => panic!("refund {id}: {e}"),
            }
        }
        let refund = refunded.unwrap_or_else(|| panic!("refund {id} never went through"));
        assert_eq!(ok("RefundPayment again", app.refund(id, &body)), refund);
        let refunds: Vec<_> = ledger(&app, id)
            .into_iter()
            .filter(|e| e.op == LedgerOp::Refund)
            .collect();
        assert_eq!(refunds.len(), 1, "{id}: {refunds:#?}");
    }
    eprintln!("refund answered 503 at least once: {saw_503}");
    assert_finished_without_restate_retries(&app, &ids);
}

#[test]
fn a_decline_is_final_at_once_even_when_the_gateway_is_flaky() {
    let app = stack_failing(0.5);
    let id = unique_id("gw-decline");
    let answer = ok(
        "CreatePayment",
        app.create_payment(&id, &CreatePaymentBody::new(700, "decline-gus")),
    );
    // A decline is an answer, not an error: one gateway call decided it (the mock's
    // transient errors happen before it acts, so they leave no ledger line).
    let entries = ledger(&app, &id);
    if answer.message == "insufficient funds" {
        assert_eq!(entries.len(), 1, "{entries:#?}");
        assert_eq!(entries[0].outcome, LedgerOutcome::Declined);
    } else {
        assert!(answer.message.contains("gave up"), "{answer:?}");
        assert!(entries.is_empty(), "{entries:#?}");
    }
    assert_eq!(answer.status, PaymentStatus::Failed, "{answer:?}");
    assert_finished_without_restate_retries(&app, &[id]);
}
