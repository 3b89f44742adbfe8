//! Each fault of a networked gateway, against the `mock-gateway` process (the service reaches it
//! with `--gateway stripe`, as it would Stripe): answers lost after the gateway acted, calls
//! that hang, 5xx before acting, a refund the gateway refuses, a cancel while the gateway holds
//! the charge. Whatever happens, the state ends as the gateway's own ledger says, with one
//! charge and at most one refund per payment.

use std::time::{Duration, Instant};

use payment_service::gateway::MockConfig;
use payment_service::payment::{CreatePaymentBody, PaymentStatus, Refund, RefundStatus};
use testkit::ledger::LedgerOp;
use testkit::stack::{GATEWAY_API_KEY, Stack, wait_until};

use crate::helpers::{
    SETTLE_TIMEOUT, TestApp, all_at_once, ok, own_stack, refund_body, state_of, unique_id,
};

/// A stack whose gateway is the `mock-gateway` process with `faults`, short attempts and
/// quick settle rounds.
fn gateway_with(faults: MockConfig) -> TestApp {
    own_stack(
        Stack::builder()
            .gateway(MockConfig {
                decline_rate: 0.0,
                delay: Duration::from_millis(1),
                ..faults
            })
            .gateway_process()
            .service_env("GATEWAY_ATTEMPT_TIMEOUT", "500ms")
            .service_env("SETTLE_FIRST_DELAY", "200ms")
            .service_env("SETTLE_MAX_DELAY", "500ms"),
    )
}

/// Pays `n` payments at once; each must end `completed` with the one charge the gateway made.
/// How many of them had an unknown outcome on the way.
fn all_completed_once(app: &TestApp, prefix: &str, n: usize) -> usize {
    let ids: Vec<String> = (0..n)
        .map(|i| unique_id(&format!("{prefix}-{i}")))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let answers = all_at_once(n, || {
        let id = &ids[next.fetch_add(1, std::sync::atomic::Ordering::SeqCst)];
        ok(
            "CreatePayment",
            app.create_payment(id, &CreatePaymentBody::new(1500, "cust-f")),
        )
    });
    assert!(
        answers
            .iter()
            .all(|a| matches!(a.status, PaymentStatus::Completed | PaymentStatus::Pending)),
        "{answers:#?}"
    );
    let mut unknown = 0;
    for id in &ids {
        let end = app.settled(id);
        let charges = app.moved_money(id, LedgerOp::Charge);
        assert_eq!(charges.len(), 1, "{id}: {charges:#?}");
        assert_eq!(end.status, PaymentStatus::Completed, "{end:?}");
        assert_eq!(end.charge_id, charges[0].id, "{end:?}");
        unknown += usize::from(end.attempts > 0);
    }
    unknown
}

#[test]
fn answers_dropped_after_the_gateway_acted_end_completed_with_one_charge() {
    // 8 answers in 10 lost: a step's 3 attempts all go unanswered half the time.
    let app = gateway_with(MockConfig {
        drop_response_rate: 0.8,
        ..MockConfig::default()
    });
    let unknown = all_completed_once(&app, "drop", 8);
    assert!(unknown > 0, "no answer was lost: the test proved nothing");
}

#[test]
fn a_hanging_gateway_is_answered_pending_promptly_and_settled() {
    let app = gateway_with(MockConfig {
        hang_rate: 0.7,
        ..MockConfig::default()
    });
    let id = unique_id("hang-one");
    let started = Instant::now();
    let answer = ok(
        "CreatePayment",
        app.create_payment(&id, &CreatePaymentBody::new(900, "cust-h")),
    );
    // 3 attempts of 500 ms and the pauses between them, whatever the gateway does.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            answer.status,
            PaymentStatus::Completed | PaymentStatus::Pending
        ),
        "{answer:?}"
    );
    let first = app.settled(&id);
    assert_eq!(first.status, PaymentStatus::Completed);
    // A payment's outcome stays unknown when all 3 of its attempts hang (0.7^3, about 1 in 3):
    // with 13 payments, that none does is about 1 run in 240 (6 made it 1 in 12).
    let unknown = all_completed_once(&app, "hang", 12) + usize::from(first.attempts > 0);
    assert!(unknown > 0, "nothing hung: the test proved nothing");
}

#[test]
fn errors_before_acting_are_retried_and_never_fail_a_payment() {
    let app = gateway_with(MockConfig {
        error_rate: 0.8,
        ..MockConfig::default()
    });
    let unknown = all_completed_once(&app, "error", 8);
    assert!(
        unknown > 0,
        "no error was injected: the test proved nothing"
    );
}

#[test]
fn a_refund_the_gateway_refuses_is_a_409_with_its_reason_and_changes_nothing() {
    let app = gateway_with(MockConfig::default());
    let id = unique_id("refused-refund");
    let paid = ok(
        "CreatePayment",
        app.create_payment(&id, &CreatePaymentBody::new(2000, "cust-r")),
    );
    let charge_id = paid.charge_id.expect("charged");
    // Refunded in full behind the service's back (Stripe's dashboard, say).
    let gateway = app.stack().gateway_url().unwrap().to_owned();
    let refunded = reqwest::blocking::Client::new()
        .post(format!("{gateway}/v1/refunds"))
        .bearer_auth(GATEWAY_API_KEY)
        .header("Idempotency-Key", format!("dashboard-{id}"))
        .form(&[("payment_intent", charge_id.as_str()), ("amount", "2000")])
        .send()
        .unwrap();
    assert_eq!(refunded.status(), 200, "{:?}", refunded.text());

    let refusal = app
        .refund(&id, &refund_body("too late", Some(500)))
        .refused()
        .unwrap();
    assert_eq!(refusal.status, 409, "{refusal:?}");
    assert!(refusal.message.contains("refuse"), "{refusal:?}");
    let payment = app.payment(&id);
    assert_eq!(payment.status, PaymentStatus::Completed, "{payment:?}");
    assert_eq!(payment.spent_refund_keys, 1, "{payment:?}");
    assert_eq!(state_of::<Refund>(&app, &id, "refund"), None);
    // Asked again, it is refused again (a new key, the same answer), never a "try again later".
    let again = app
        .refund(&id, &refund_body("again", Some(500)))
        .refused()
        .unwrap();
    assert_eq!(again.status, 409, "{again:?}");
    app.assert_all_settled(std::slice::from_ref(&id));
}

#[test]
fn a_refund_asked_again_with_another_amount_after_a_lost_answer_is_made_once_with_the_first() {
    let app = gateway_with(MockConfig {
        drop_response_rate: 0.8,
        ..MockConfig::default()
    });
    let id = unique_id("lost-refund");
    ok(
        "CreatePayment",
        app.create_payment(&id, &CreatePaymentBody::new(3000, "cust-l")),
    );
    assert_eq!(app.settled(&id).status, PaymentStatus::Completed);
    let first = ok(
        "RefundPayment",
        app.refund(&id, &refund_body("first", Some(1000))),
    );
    assert_eq!(first.amount.minor_units(), 1000, "{first:?}");
    let second = ok(
        "RefundPayment again",
        app.refund(&id, &refund_body("other", Some(2500))),
    );
    assert_eq!(second.amount.minor_units(), 1000, "{second:?}");
    app.wait_refunded(&id);
    let refunds = app.moved_money(&id, LedgerOp::Refund);
    assert_eq!(refunds.len(), 1, "{refunds:#?}");
    assert_eq!(refunds[0].amount, 1000);
    let stored: Refund = state_of(&app, &id, "refund").unwrap();
    assert_eq!(stored.status, RefundStatus::Completed, "{stored:?}");
    assert_eq!(stored.refund_id, refunds[0].id);
}

#[test]
fn a_charge_cancelled_while_the_gateway_holds_it_is_voided() {
    // The gateway takes 2 s before it acts; the operator cancels meanwhile.
    let app = own_stack(
        Stack::builder()
            .gateway(MockConfig {
                decline_rate: 0.0,
                delay: Duration::from_secs(2),
                ..MockConfig::default()
            })
            .gateway_process()
            .service_env("GATEWAY_ATTEMPT_TIMEOUT", "30s")
            .service_env("SETTLE_FIRST_DELAY", "200ms"),
    );
    let id = unique_id("cancel-held");
    let body = CreatePaymentBody::new(4400, "cust-c");
    std::thread::scope(|s| {
        let call = s.spawn(|| app.create_payment(&id, &body));
        let mut running = None;
        wait_until(SETTLE_TIMEOUT, "CreatePayment to be running", || {
            running = app
                .admin()
                .invocations_of(&id)?
                .into_iter()
                .find(|i| i.target_handler_name == "CreatePayment" && i.status == "running");
            Ok(running.is_some() && app.get_payment(&id).status() == 200)
        })
        .unwrap();
        app.admin().cancel(&running.unwrap().id).unwrap();
        let answer = call.join().unwrap();
        assert!(
            answer.refused().is_ok_and(|r| r.status == 409),
            "the client was told otherwise"
        );
    });
    let end = app.settled(&id);
    assert_eq!(end.status, PaymentStatus::Canceled, "{end:?}");
    let charges = app.moved_money(&id, LedgerOp::Charge);
    let refunds = app.moved_money(&id, LedgerOp::Refund);
    // Either the key was spent before the charge arrived (nothing charged), or the charge went
    // through and was refunded in full: never money taken and kept.
    match charges.as_slice() {
        [] => assert!(refunds.is_empty(), "{refunds:#?}"),
        [charge] => {
            assert_eq!(end.charge_id, charge.id, "{end:?}");
            assert_eq!(refunds.len(), 1, "{refunds:#?}");
            assert_eq!(refunds[0].amount, 4400);
        }
        more => panic!("charged more than once: {more:#?}"),
    }
}
