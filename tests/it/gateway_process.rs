//! The stack with the gateway as a process of its own (`StackBuilder::gateway_process`): the
//! service reaches `mock-gateway` as it would Stripe, the stack's ledger is the gateway's, and
//! the gateway can be SIGKILLed and started again on its database.

use std::time::Duration;

use payment_service::payment::{CreatePaymentBody, PaymentStatus};
use testkit::ledger::{LedgerOp, LedgerOutcome};
use testkit::stack::wait_until;

use crate::helpers::{gateway_process_stack, ok, own_stack, seed_payment, unique_id};

#[test]
fn the_gateway_process_charges_survives_a_kill_and_its_unknowns_are_settled() {
    let app = own_stack(
        gateway_process_stack()
            // Short rounds: a payment left pending while the gateway is down settles soon after.
            .service_env("GATEWAY_ATTEMPT_TIMEOUT", "1s")
            .service_env("SETTLE_FIRST_DELAY", "200ms")
            .service_env("SETTLE_MAX_DELAY", "500ms"),
    );
    let stack = app.stack();
    assert!(stack.gateway_url().is_some());
    let ledger = stack.ledger().expect("the gateway's ledger").to_owned();
    assert!(
        ledger.ends_with("mock-gateway-ledger.jsonl"),
        "{}",
        ledger.display()
    );

    // Charged through the process: the charge ID is the gateway's intent, in its ledger.
    let first = unique_id("gwp");
    let done = ok("create", app.create_payment(&first, &seed_payment()));
    assert_eq!(done.status, PaymentStatus::Completed, "{done:?}");
    let charge_id = done.charge_id.expect("a charge ID");
    assert!(charge_id.starts_with("pi_"), "{charge_id}");
    let lines = app.ledger(&first).unwrap();
    assert!(
        lines.iter().any(|e| e.op == LedgerOp::Charge
            && e.outcome == LedgerOutcome::Succeeded
            && e.id.as_deref() == Some(charge_id.as_str())),
        "{lines:?}"
    );

    // Declines read as with the in-process mock.
    let declined = unique_id("gwp-decline");
    let body = CreatePaymentBody {
        customer_id: Some("decline-cust".into()),
        ..seed_payment()
    };
    let failed = ok("decline", app.create_payment(&declined, &body));
    assert_eq!(failed.status, PaymentStatus::Failed, "{failed:?}");
    assert_eq!(failed.message, "insufficient funds");

    // The gateway down: the outcome is unknown, the payment pending, the client answered.
    assert!(stack.kill_gateway().unwrap());
    assert_eq!(stack.gateway_pid(), None);
    let second = unique_id("gwp-down");
    let pending = ok(
        "create while down",
        app.create_payment(&second, &seed_payment()),
    );
    assert_eq!(pending.status, PaymentStatus::Pending, "{pending:?}");
    let seen = app.payment(&second);
    assert!(seen.attempts > 0 && seen.last_error.is_some(), "{seen:?}");

    // Up again on its database: the service settles it by itself, charged once.
    stack.start_gateway().unwrap();
    wait_until(Duration::from_secs(60), "the payment to settle", || {
        Ok(app.payment(&second).status != PaymentStatus::Pending)
    })
    .unwrap();
    let settled = app.payment(&second);
    assert_eq!(settled.status, PaymentStatus::Completed, "{settled:?}");
    let charges: Vec<_> = app
        .ledger(&second)
        .unwrap()
        .into_iter()
        .filter(|e| e.acted() && e.op == LedgerOp::Charge)
        .collect();
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(charges[0].id, settled.charge_id);
    // The first payment is still known after the restart: a duplicate is answered as stored.
    let again = ok("duplicate", app.create_payment(&first, &seed_payment()));
    assert_eq!(again.charge_id.as_deref(), Some(charge_id.as_str()));
}
