//! The audit against synthetic runs: a clean one passes, and each kind of violation, planted
//! in a copy of it, is caught.

use serde_json::json;

use super::*;
use crate::client::{CallError, Refusal};

/// A clean run of two payments: one charged (a step re-executed: a replayed charge line) and
/// refunded, one declined whose refund was refused with 409.
struct World {
    params: Params,
    plans: Vec<PaymentPlan>,
    logs: Vec<PaymentLog>,
    end: EndState,
    chaos: ChaosLog,
}

const A: &str = "crash-0000";
const B: &str = "crash-0001";

fn plan(id: &str, amount: u64, customer: &str) -> PaymentPlan {
    PaymentPlan {
        keyed_refunds: Vec::new(),
        hold: None,
        id: id.into(),
        amount,
        customer: customer.into(),
        creates: 2,
        start: std::time::Duration::ZERO,
        refunds: vec![None],
        refund_pause: std::time::Duration::ZERO,
        ingresses: vec![0; 4],
    }
}

fn line(
    op: LedgerOp,
    id: &str,
    amount: u64,
    outcome: LedgerOutcome,
    gw_id: Option<&str>,
    replay: bool,
) -> LedgerEntry {
    let prefix = if op == LedgerOp::Charge {
        "charge"
    } else {
        "refund"
    };
    LedgerEntry {
        id: gw_id.map(str::to_owned),
        replay,
        ..LedgerEntry::new(op, format!("{prefix}:{id}"), id, amount, outcome)
    }
}

fn payment(
    id: &str,
    amount: u64,
    customer: &str,
    status: &str,
    charge_id: Option<&str>,
) -> Payment {
    serde_json::from_value(json!({
        "paymentId": id, "amount": amount, "currency": "USD", "description": "crash test",
        "customerId": customer, "status": status, "chargeId": charge_id,
        "createdAt": "2026-12-02T04:00:00.000Z",
    }))
    .unwrap()
}

fn result(id: &str, status: &str, charge_id: Option<&str>, message: &str) -> PaymentResult {
    serde_json::from_value(json!({
        "paymentId": id, "status": status, "chargeId": charge_id, "message": message,
    }))
    .unwrap()
}

fn refund(refund_id: &str, amount: u64) -> Refund {
    serde_json::from_value(json!({
        "refundId": refund_id, "status": "completed", "amount": amount,
        "message": "Refund processed successfully", "reason": "crash test refund",
        "refundedAt": "2026-12-02T04:00:01.000Z",
    }))
    .unwrap()
}

fn refused(status: u16) -> Answer<Refund> {
    Answer::Refused(Refusal {
        status,
        message: format!("HTTP {status}"),
        body: serde_json::Value::Null,
    })
}

fn invocation(key: &str, handler: &str, status: &str, failure: Option<&str>) -> Invocation {
    Invocation {
        id: format!("inv_{key}_{handler}"),
        target_service_key: key.into(),
        target_handler_name: handler.into(),
        status: status.into(),
        retry_count: None,
        last_failure: None,
        completion_result: failure.map(|_| "failure".into()),
        completion_failure: failure.map(str::to_owned),
    }
}

fn clean() -> World {
    use LedgerOp::{Charge, Refund as Ref};
    use LedgerOutcome::{Declined, Succeeded};
    let params = Params {
        server_kills: 1,
        ..Params::new(false, 1, 1)
    };
    let plans = vec![plan(A, 1000, "cust-1"), plan(B, 500, "decline-cust-1")];
    let completed = payment(A, 1000, "cust-1", "completed", Some("ch_a"));
    let mut failed = payment(B, 500, "decline-cust-1", "failed", None);
    failed.error_msg = Some("insufficient funds".into());
    let logs = vec![
        PaymentLog {
            creates: vec![
                Ok(Answer::Ok(result(
                    A,
                    "completed",
                    Some("ch_a"),
                    "Payment processed successfully",
                ))),
                Ok(Answer::Ok(result(
                    A,
                    "completed",
                    Some("ch_a"),
                    MSG_ALREADY_PROCESSED,
                ))),
            ],
            refunds: vec![(None, Ok(Answer::Ok(refund("re_a", 1000))))],
            keyed_refunds: Vec::new(),
            holds: Vec::new(),
            get: Some(Ok(Answer::Ok(completed))),
        },
        PaymentLog {
            creates: vec![
                Ok(Answer::Ok(result(B, "failed", None, "insufficient funds"))),
                Ok(Answer::Ok(result(B, "failed", None, MSG_ALREADY_PROCESSED))),
            ],
            refunds: vec![(None, Ok(refused(409)))],
            keyed_refunds: Vec::new(),
            holds: Vec::new(),
            get: Some(Ok(Answer::Ok(failed.clone()))),
        },
    ];
    let end = EndState {
        finals: vec![
            Ok(Answer::Ok(payment(
                A,
                1000,
                "cust-1",
                "refunded",
                Some("ch_a"),
            ))),
            Ok(Answer::Ok(failed)),
        ],
        stored_refunds: [(A.to_owned(), refund("re_a", 1000))].into(),
        unfinished: Vec::new(),
        failed_invocations: vec![
            invocation(B, REFUND, "completed", Some("[409] cannot refund")),
            invocation(
                "probe-node-1-0",
                "GetPayment",
                "completed",
                Some("[404] not found"),
            ),
        ],
        invocations: 8,
        ledger: vec![
            line(Charge, A, 1000, Succeeded, Some("ch_a"), false),
            line(Charge, A, 1000, Succeeded, Some("ch_a"), true),
            line(Ref, A, 1000, Succeeded, Some("re_a"), false),
            line(Charge, B, 500, Declined, None, false),
        ],
    };
    let chaos = ChaosLog {
        service_kills: 3,
        gateway_kills: 0,
        server_kills: 1,
        node_kills: vec![1],
        error: None,
    };
    World {
        params,
        plans,
        logs,
        end,
        chaos,
    }
}

/// `clean()` with payment A refunded in parts instead: `part-0` (300, sent twice), `part-1`
/// (800: refused, 700 left) and `part-2` (all that is left: 700).
fn in_parts() -> World {
    use crate::crash::plan::KeyedRefund;
    let mut w = clean();
    let part = |key: &str, amount, copies| KeyedRefund {
        key: key.into(),
        amount,
        copies,
    };
    w.plans[0].refunds.clear();
    w.plans[0].keyed_refunds = vec![
        part("part-0", Some(300), 2),
        part("part-1", Some(800), 1),
        part("part-2", None, 1),
    ];
    let keyed = |key: &str, n: u32, refund_id: &str, amount: u64| Refund {
        refund_key: Some(key.into()),
        gateway_key: Some(format!("refund:{A}:r{n}")),
        ..refund(refund_id, amount)
    };
    let (first, rest) = (
        keyed("part-0", 1, "re_1", 300),
        keyed("part-2", 2, "re_2", 700),
    );
    w.logs[0].refunds.clear();
    w.logs[0].keyed_refunds = vec![
        ("part-0".into(), Ok(Answer::Ok(first.clone()))),
        ("part-0".into(), Ok(Answer::Ok(first.clone()))),
        ("part-1".into(), Ok(refused(409))),
        ("part-2".into(), Ok(Answer::Ok(rest.clone()))),
    ];
    let end = final_mut(&mut w, 0);
    end.amount_refunded = 1000;
    end.refunds = vec![first, rest];
    w.end.stored_refunds.remove(A);
    w.end.ledger.retain(|e| e.op != LedgerOp::Refund);
    for (n, refund_id, amount) in [(1, "re_1", 300), (2, "re_2", 700)] {
        w.end.ledger.push(LedgerEntry {
            idempotency_key: format!("refund:{A}:r{n}"),
            ..line(
                LedgerOp::Refund,
                A,
                amount,
                LedgerOutcome::Succeeded,
                Some(refund_id),
                false,
            )
        });
    }
    w.end.failed_invocations.push(invocation(
        A,
        REFUND,
        "completed",
        Some("[409] cannot refund 800 of payment crash-0000: 700 of its 1000 is left to refund"),
    ));
    w
}

/// `clean()` with payment A a hold instead: a capture of 600 and a cancel sent together; the
/// capture won (its charge step re-executed: a replayed authorize line), the cancel got a 409.
fn held() -> World {
    use crate::crash::plan::{HoldEnd, HoldPlan};
    let mut w = clean();
    w.plans[0].refunds.clear();
    w.plans[0].hold = Some(HoldPlan {
        end: HoldEnd::Race(Some(600)),
        copies: 2,
    });
    let end = final_mut(&mut w, 0);
    end.status = PaymentStatus::Completed;
    end.capture = CaptureMethod::Manual;
    end.amount_captured = 600;
    let end = end.clone();
    let authorized = result(A, "authorized", Some("ch_a"), "Payment authorized: ...");
    w.logs[0] = PaymentLog {
        creates: vec![
            Ok(Answer::Ok(authorized.clone())),
            Ok(Answer::Ok(PaymentResult {
                message: MSG_ALREADY_PROCESSED.into(),
                ..authorized
            })),
        ],
        refunds: Vec::new(),
        keyed_refunds: Vec::new(),
        holds: vec![
            (CAPTURE, Ok(Answer::Ok(end.clone()))),
            (CANCEL, Ok(refused_hold(409))),
        ],
        get: Some(Ok(Answer::Ok(end))),
    };
    w.end.stored_refunds.remove(A);
    w.end.ledger.retain(|e| e.payment_id != A);
    w.end.ledger.extend([
        hold_line(LedgerOp::Authorize, 1000, false),
        hold_line(LedgerOp::Authorize, 1000, true),
        hold_line(LedgerOp::Capture, 600, false),
    ]);
    w.end.failed_invocations.push(invocation(
        A,
        CANCEL,
        "completed",
        Some("[409] cannot cancel payment crash-0000 with status completed"),
    ));
    w
}

/// A line of A's hold (intent `ch_a`) that acted.
/// The gateway accepting payment `id`'s charge as `intent`, to settle it later.
fn accepted_line(id: &str, amount: u64, intent: &str) -> LedgerEntry {
    LedgerEntry {
        id: Some(intent.into()),
        ..LedgerEntry::new(
            LedgerOp::Process,
            format!("charge:{id}"),
            id,
            amount,
            LedgerOutcome::Succeeded,
        )
    }
}

fn hold_line(op: LedgerOp, amount: u64, replay: bool) -> LedgerEntry {
    LedgerEntry {
        intent: Some("ch_a".into()),
        ..line(
            op,
            A,
            amount,
            LedgerOutcome::Succeeded,
            Some("ch_a"),
            replay,
        )
    }
}

fn refused_hold(status: u16) -> Answer<Payment> {
    Answer::Refused(Refusal {
        status,
        message: format!("HTTP {status}"),
        body: serde_json::Value::Null,
    })
}

fn run(w: &World) -> Findings {
    audit(&w.params, &w.plans, &w.logs, &w.end, &w.chaos)
}

fn final_mut(w: &mut World, i: usize) -> &mut Payment {
    match &mut w.end.finals[i] {
        Ok(Answer::Ok(p)) => p,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_clean_run_passes_with_its_figures() {
    let f = run(&clean());
    assert!(f.violations.is_empty(), "{:#?}", f.violations);
    assert_eq!((f.completed, f.failed, f.refunded), (0, 1, 1));
    assert_eq!((f.reexecuted, f.replays), (1, 1));
    assert_eq!((f.expected_409s, f.probe_404s), (1, 1));
    assert_eq!((f.ledger_charges, f.ledger_refunds), (3, 1));
}

/// Each kind, planted in a clean run.
#[allow(clippy::type_complexity)]
const CASES: &[(&str, fn(&mut World))] = &[
    ("charged-twice", |w| {
        w.end.ledger.push(line(
            LedgerOp::Charge,
            A,
            1000,
            LedgerOutcome::Succeeded,
            Some("ch_b"),
            false,
        ))
    }),
    ("refunded-twice", |w| {
        w.end.ledger.push(line(
            LedgerOp::Refund,
            A,
            1000,
            LedgerOutcome::Succeeded,
            Some("re_b"),
            false,
        ))
    }),
    ("decided-twice", |w| {
        w.end.ledger.push(line(
            LedgerOp::Charge,
            B,
            500,
            LedgerOutcome::Declined,
            None,
            false,
        ))
    }),
    ("unexpected-ledger-line", |w| {
        w.end.ledger.push(line(
            LedgerOp::Refund,
            B,
            500,
            LedgerOutcome::Declined,
            None,
            false,
        ))
    }),
    ("charged-other-amount", |w| w.end.ledger[1].amount = 999),
    ("refund-without-charge", |w| {
        w.end.ledger.push(line(
            LedgerOp::Refund,
            B,
            500,
            LedgerOutcome::Succeeded,
            Some("re_x"),
            false,
        ))
    }),
    ("refund-above-charge", |w| w.end.ledger[2].amount = 2000),
    ("refund-not-asked", |w| w.end.ledger[2].amount = 700),
    ("no-final-state", |w| {
        w.end.finals[0] = Ok(Answer::Refused(Refusal {
            status: 404,
            message: "payment crash-0000 not found".into(),
            body: serde_json::Value::Null,
        }))
    }),
    ("not-what-was-asked", |w| {
        final_mut(w, 0).customer_id = "cust-2".into()
    }),
    ("settled-without-charge", |w| {
        w.end
            .ledger
            .retain(|e| e.op != LedgerOp::Charge || e.payment_id != A)
    }),
    ("charge-id-mismatch", |w| {
        final_mut(w, 0).charge_id = Some("ch_z".into())
    }),
    ("failed-but-charged", |w| {
        let p = final_mut(w, 0);
        p.status = PaymentStatus::Failed;
        p.charge_id = None;
    }),
    ("failed-without-decline", |w| {
        w.end.ledger.retain(|e| e.payment_id != B)
    }),
    ("failed-with-charge-id", |w| {
        final_mut(w, 1).charge_id = Some("ch_q".into())
    }),
    ("declined-but-not-failed", |w| {
        final_mut(w, 1).status = PaymentStatus::Completed
    }),
    ("unsettled", |w| {
        final_mut(w, 1).status = PaymentStatus::Pending
    }),
    ("refunded-without-ledger-refund", |w| {
        w.end.ledger.retain(|e| e.op != LedgerOp::Refund)
    }),
    ("ledger-refund-but-not-refunded", |w| {
        final_mut(w, 0).status = PaymentStatus::Completed
    }),
    ("refunded-without-stored-refund", |w| {
        w.end.stored_refunds.clear()
    }),
    ("stored-refund-mismatch", |w| {
        w.end.stored_refunds.get_mut(A).unwrap().refund_id = Some("re_other".into())
    }),
    ("stored-refund-but-not-refunded", |w| {
        w.end.stored_refunds.insert(B.into(), refund("re_b", 500));
    }),
    ("create-told-otherwise", |w| {
        w.logs[0].creates[1] = Ok(Answer::Ok(result(
            A,
            "completed",
            Some("ch_other"),
            MSG_ALREADY_PROCESSED,
        )))
    }),
    ("create-refused", |w| {
        w.logs[0].creates[1] = Ok(Answer::Refused(Refusal {
            status: 409,
            message: "conflict".into(),
            body: serde_json::Value::Null,
        }))
    }),
    ("several-fresh-answers", |w| {
        w.logs[0].creates[1] = Ok(Answer::Ok(result(
            A,
            "completed",
            Some("ch_a"),
            "Payment processed successfully",
        )))
    }),
    ("refund-told-otherwise", |w| {
        w.logs[0].refunds[0].1 = Ok(Answer::Ok(refund("re_other", 1000)))
    }),
    ("refund-refused", |w| {
        w.logs[0].refunds[0].1 = Ok(refused(503))
    }),
    ("unanswered", |w| {
        w.logs[0].creates[0] = Err(CallError::Silent("timeout".into()))
    }),
    ("get-after-create-mismatch", |w| {
        w.logs[0].get = Some(Ok(Answer::Ok(payment(A, 1000, "cust-1", "pending", None))))
    }),
    ("unknown-payment", |w| {
        w.end.ledger.push(line(
            LedgerOp::Charge,
            "crash-9999",
            1,
            LedgerOutcome::Succeeded,
            Some("ch_9"),
            false,
        ))
    }),
    ("invocation-unfinished", |w| {
        w.end
            .unfinished
            .push(invocation(A, "RefundPayment", "backing-off", None))
    }),
    ("invocation-failed", |w| {
        w.end.failed_invocations.push(invocation(
            A,
            "CreatePayment",
            "completed",
            Some("[500] boom"),
        ))
    }),
    ("chaos", |w| {
        w.chaos.error = Some("payment-service exited by itself".into())
    }),
    ("too-few-kills", |w| w.chaos.server_kills = 0),
    ("nothing-reexecuted", |w| w.end.ledger.retain(|e| !e.replay)),
    ("canceled-but-charged", |w| {
        let p = final_mut(w, 0);
        p.status = PaymentStatus::Canceled;
        p.charge_id = None;
    }),
    ("void-refund-not-canceled", |w| {
        w.end.ledger[2].idempotency_key = format!("void:{A}")
    }),
    ("refund-unsettled", |w| {
        w.end.stored_refunds.get_mut(A).unwrap().status = RefundStatus::Pending
    }),
    ("no-unknown-settled", |w| {
        w.params = w.params.clone().with_gateway_process()
    }),
    ("refunded-total-mismatch", |w| {
        *w = in_parts();
        final_mut(w, 0).amount_refunded = 300;
    }),
    ("hold-settled-twice", |w| {
        *w = held();
        w.end.ledger.push(hold_line(LedgerOp::Cancel, 1000, false));
    }),
    ("hold-left", |w| {
        *w = held();
        w.end.ledger.retain(|e| e.op != LedgerOp::Capture);
    }),
    ("accepted-left", |w| {
        w.end.ledger.push(accepted_line(B, 500, "pi_later"))
    }),
    ("hold-state-mismatch", |w| {
        *w = held();
        final_mut(w, 0).amount_captured = 1000;
    }),
    ("hold-told-otherwise", |w| {
        *w = held();
        w.logs[0].holds[1] = (
            CANCEL,
            Ok(Answer::Ok(payment(
                A,
                1000,
                "cust-1",
                "canceled",
                Some("ch_a"),
            ))),
        );
    }),
];

#[test]
fn a_hold_captured_once_while_its_cancel_is_refused_passes() {
    let f = run(&held());
    assert!(f.violations.is_empty(), "{:#?}", f.violations);
    assert_eq!(
        (f.holds_captured, f.holds_canceled, f.holds_expired),
        (1, 0, 0)
    );
    assert_eq!(f.expected_409s, 2);
}

/// A hold left alone and released when its window ended: `canceled` with the hold's charge
/// ID, and no refund.
#[test]
fn a_hold_released_when_its_window_ended_passes() {
    use crate::crash::plan::HoldEnd;
    let mut w = held();
    w.plans[0].hold.as_mut().unwrap().end = HoldEnd::Expire;
    w.logs[0].holds.clear();
    w.end
        .failed_invocations
        .retain(|i| i.target_handler_name != CANCEL);
    w.end.ledger.retain(|e| e.op != LedgerOp::Capture);
    w.end.ledger.push(hold_line(LedgerOp::Cancel, 1000, false));
    let end = final_mut(&mut w, 0);
    end.status = PaymentStatus::Canceled;
    end.amount_captured = 0;
    end.error_msg = Some(REASON_HOLD_EXPIRED.into());
    let end = end.clone();
    w.logs[0].get = Some(Ok(Answer::Ok(end)));
    let f = run(&w);
    assert!(f.violations.is_empty(), "{:#?}", f.violations);
    assert_eq!(
        (f.holds_captured, f.holds_canceled, f.holds_expired),
        (0, 0, 1)
    );
}

#[test]
fn every_kind_of_violation_is_caught() {
    for (name, plant) in CASES {
        let mut w = clean();
        plant(&mut w);
        let f = run(&w);
        assert!(
            f.count(name) > 0,
            "{name} not caught; found {:#?}",
            f.violations
        );
    }
}

#[test]
fn the_cases_cover_every_kind_once() {
    let mut names: Vec<&str> = CASES.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CASES.len(), "a kind has two cases");
    // The number of `Kind` variants: keep in step when a kind is added.
    assert_eq!(CASES.len(), 45);
}

/// A payment answered `pending` (its outcome unknown), settled later by the service: the
/// pending answers are no violation, and it counts as an unknown settled.
#[test]
fn pending_answers_settled_later_pass_and_are_counted() {
    let mut w = clean();
    w.params = w.params.clone().with_gateway_process();
    let pending = result(A, "pending", None, "Payment pending: ...");
    w.logs[0].creates = vec![Ok(Answer::Ok(pending.clone())), Ok(Answer::Ok(pending))];
    let mut seen = payment(A, 1000, "cust-1", "pending", None);
    seen.attempts = 3;
    w.logs[0].get = Some(Ok(Answer::Ok(seen)));
    final_mut(&mut w, 0).attempts = 3;
    let f = run(&w);
    assert!(f.violations.is_empty(), "{:#?}", f.violations);
    assert_eq!((f.settled_unknown_payments, f.pending_answers), (1, 2));
}

/// A payment cancelled mid-charge whose charge had gone through: `canceled`, the charge
/// refunded in full under the void key, the refund stored.
#[test]
fn a_canceled_payment_with_its_void_refund_passes() {
    let mut w = clean();
    w.end.ledger[2].idempotency_key = format!("void:{A}");
    let p = final_mut(&mut w, 0);
    p.status = PaymentStatus::Canceled;
    let pending = result(A, "pending", None, "Payment pending: ...");
    w.logs[0] = PaymentLog {
        creates: vec![Ok(Answer::Ok(pending))],
        ..PaymentLog::default()
    };
    let f = run(&w);
    assert!(f.violations.is_empty(), "{:#?}", f.violations);
    // Nothing charged and nothing refunded: fine too; charged without a refund is not.
    let mut w2 = clean();
    w2.end
        .ledger
        .retain(|e| e.payment_id != A || e.op != LedgerOp::Refund);
    w2.end.stored_refunds.clear();
    final_mut(&mut w2, 0).status = PaymentStatus::Canceled;
    w2.logs[0] = PaymentLog::default();
    let f = run(&w2);
    assert!(
        f.count("refunded-without-ledger-refund") > 0,
        "{:#?}",
        f.violations
    );
}

/// Refunds in parts: each made once under its key and stored, one refused for more than was
/// left, the total the charge. Then what must be caught: a key refunded twice, parts above the
/// charge, a part the gateway made that the state lacks, a partial total called `refunded`.
#[test]
fn refunds_in_parts_pass_and_their_faults_are_caught() {
    let w = in_parts();
    let f = run(&w);
    assert!(f.violations.is_empty(), "{:#?}", f.violations);
    assert_eq!(f.expected_409s, 2, "the failed payment's and part-1's");

    let mut twice = in_parts();
    let again = twice.end.ledger.last().unwrap().clone();
    twice.end.ledger.push(LedgerEntry {
        id: Some("re_3".into()),
        ..again
    });
    let f = run(&twice);
    assert!(f.count("refunded-twice") > 0, "{:#?}", f.violations);
    assert!(f.count("refund-above-charge") > 0, "{:#?}", f.violations);

    let mut lost = in_parts();
    final_mut(&mut lost, 0).refunds.pop();
    let f = run(&lost);
    assert!(
        f.count("ledger-refund-but-not-refunded") > 0,
        "{:#?}",
        f.violations
    );

    let mut partial = in_parts();
    partial.end.ledger.pop();
    let end = final_mut(&mut partial, 0);
    end.refunds.pop();
    end.amount_refunded = 300;
    let f = run(&partial);
    assert!(
        f.count("refunded-total-mismatch") > 0,
        "{:#?}",
        f.violations
    );
}

/// `clean()` with payment B paid later: accepted (`pending`, its intent named), its customer
/// never confirms, and the service cancels it at the deadline: `failed`, nothing charged.
#[test]
fn a_charge_cancelled_at_its_deadline_passes_and_is_counted() {
    let mut w = clean();
    w.plans[1].customer = "action-cust-1".into();
    for answer in w.end.finals.iter_mut().chain(w.logs[1].get.iter_mut()) {
        if let Ok(Answer::Ok(p)) = answer
            && p.payment_id == B
        {
            p.customer_id = "action-cust-1".into();
        }
    }
    w.end.ledger.retain(|e| e.payment_id != B);
    w.end.ledger.push(accepted_line(B, 500, "pi_b"));
    w.logs[1].creates[0] = Ok(Answer::Ok(result(B, "pending", Some("pi_b"), "pending")));
    let f = run(&w);
    assert_eq!(f.count("accepted-left"), 1, "{:#?}", f.violations);
    assert!(f.count("failed-without-decline") > 0, "{:#?}", f.violations);

    w.end.ledger.push(LedgerEntry {
        intent: Some("pi_b".into()),
        ..LedgerEntry::new(
            LedgerOp::Cancel,
            format!("cancel-unconfirmed:{B}"),
            B,
            500,
            LedgerOutcome::Succeeded,
        )
    });
    let f = run(&w);
    assert!(f.violations.is_empty(), "{:#?}", f.violations);
    assert_eq!((f.async_completed, f.async_failed), (0, 1));
}
