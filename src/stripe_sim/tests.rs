//! The engine's rules, on the in-memory store with a clock the tests move.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

struct Sim {
    engine: Arc<Engine<MemoryStore>>,
    now: Arc<AtomicU64>,
}

fn sim(config: SimConfig) -> Sim {
    let now = Arc::new(AtomicU64::new(1_800_000_000_000));
    let clock_now = Arc::clone(&now);
    let clock: Clock = Arc::new(move || clock_now.load(Ordering::SeqCst));
    Sim {
        engine: Arc::new(Engine::with_clock(MemoryStore::new(), config, clock).unwrap()),
        now,
    }
}

fn create(payment: &str, amount: u64, confirm: bool, pm: &str) -> Post {
    Post::CreateIntent(CreateIntent {
        amount,
        currency: Currency::parse("usd").unwrap(),
        confirm,
        payment_method: Some(pm.into()),
        payment_method_types: vec!["card".into()],
        metadata: Metadata::new(vec![("payment_id".into(), payment.into())]),
        capture_manual: false,
    })
}

fn refund(intent: &str, amount: Option<u64>) -> Post {
    Post::CreateRefund(CreateRefund {
        payment_intent: intent.into(),
        amount,
        metadata: Metadata::default(),
    })
}

impl Sim {
    /// Until a call holds its key (the spawned call has run to its delay), without a guessed
    /// sleep.
    async fn wait_in_flight(&self) {
        while self.engine.lock().in_flight.is_empty() {
            tokio::task::yield_now().await;
        }
    }

    async fn post(&self, key: &str, post: Post) -> Reply {
        self.engine
            .post(Some(key.into()), post, Duration::ZERO, false)
            .await
            .unwrap()
    }

    async fn charge(&self, key: &str, payment: &str, amount: u64) -> Box<Intent> {
        match self
            .post(key, create(payment, amount, true, "pm_card_visa"))
            .await
            .body
        {
            Body::Intent(i) => i,
            other => panic!("{other:?}"),
        }
    }
}

fn error(reply: &Reply) -> &ApiError {
    match &reply.body {
        Body::Error(e) => e,
        other => panic!("not an error: {other:?}"),
    }
}

#[tokio::test]
async fn a_key_replays_its_first_answer_even_after_the_intent_changed() {
    let s = sim(SimConfig::default());
    let first = s.post("k", create("p", 100, false, "pm_card_visa")).await;
    let Body::Intent(intent) = &first.body else {
        panic!("{first:?}")
    };
    assert_eq!(intent.status, IntentStatus::RequiresConfirmation);
    let cancel = s
        .post(
            "k:cancel",
            Post::Cancel {
                intent: intent.id(),
            },
        )
        .await;
    assert!(matches!(&cancel.body, Body::Intent(i) if i.status == IntentStatus::Canceled));
    let again = s.post("k", create("p", 100, false, "pm_card_visa")).await;
    assert!(again.replay);
    assert_eq!(again.body, first.body, "the first answer, as it was");
}

#[tokio::test]
async fn a_key_with_other_parameters_is_an_idempotency_error() {
    let s = sim(SimConfig::default());
    s.charge("k", "p", 100).await;
    let other = s.post("k", create("p", 100, false, "pm_card_visa")).await;
    assert_eq!(error(&other).kind, "idempotency_error");
    assert_eq!(error(&other).status, 400);
    let amount = s.post("k", create("p", 200, true, "pm_card_visa")).await;
    assert_eq!(error(&amount).kind, "idempotency_error");
    // Neither acted: one intent.
    assert_eq!(s.engine.search("p".into()).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_key_whose_first_request_runs_is_in_use_and_freed_if_it_is_dropped() {
    let s = sim(SimConfig::default());
    let engine = Arc::clone(&s.engine);
    let slow = tokio::spawn(async move {
        engine
            .post(
                Some("k".into()),
                create("p", 100, true, "pm_card_visa"),
                Duration::from_millis(300),
                false,
            )
            .await
            .unwrap()
    });
    s.wait_in_flight().await;
    let r = s.post("k", create("p", 100, true, "pm_card_visa")).await;
    assert_eq!(
        (error(&r).status, error(&r).code),
        (409, Some("idempotency_key_in_use"))
    );
    let first = slow.await.unwrap();
    assert!(matches!(first.body, Body::Intent(_)));
    assert!(
        s.post("k", create("p", 100, true, "pm_card_visa"))
            .await
            .replay
    );

    // A call dropped (a caller's timeout) while its key is in flight frees the key.
    let engine = Arc::clone(&s.engine);
    let dropped = tokio::spawn(async move {
        engine
            .post(
                Some("k2".into()),
                create("p2", 1, true, "pm_card_visa"),
                Duration::from_secs(60),
                false,
            )
            .await
    });
    s.wait_in_flight().await;
    let r = s.post("k2", create("p2", 1, true, "pm_card_visa")).await;
    assert_eq!(error(&r).status, 409);
    dropped.abort();
    let _ = dropped.await;
    let after = s.post("k2", create("p2", 1, true, "pm_card_visa")).await;
    assert!(
        matches!(after.body, Body::Intent(_)) && !after.replay,
        "{after:?}"
    );
}

#[tokio::test]
async fn keys_are_forgotten_after_the_retention() {
    let s = sim(SimConfig {
        key_retention: Duration::from_secs(10),
        ..SimConfig::default()
    });
    let first = s.charge("k", "p", 100).await;
    s.now.fetch_add(9_000, Ordering::SeqCst);
    assert!(
        s.post("k", create("p", 100, true, "pm_card_visa"))
            .await
            .replay
    );
    s.now.fetch_add(1_000, Ordering::SeqCst);
    let later = s.charge("k", "p", 100).await;
    assert_ne!(later.id, first.id, "a forgotten key acts again");
    assert_eq!(s.engine.search("p".into()).await.unwrap().len(), 2);
}

#[tokio::test]
async fn refunds_are_capped_at_what_is_left_and_listed() {
    let s = sim(SimConfig::default());
    let pi = s.charge("c", "p", 100).await.id();
    let r1 = s.post("r1", refund(&pi, Some(60))).await;
    assert!(matches!(&r1.body, Body::Refund(r) if r.amount == 60));
    let over = s.post("r2", refund(&pi, Some(41))).await;
    assert_eq!(error(&over).code, Some("amount_too_large"));
    // The refusal is the key's answer: replayed, even with room made meanwhile? No room is
    // made by refunds; the rest is refundable under a new key.
    assert!(s.post("r2", refund(&pi, Some(41))).await.replay);
    let rest = s.post("r3", refund(&pi, None)).await;
    assert!(matches!(&rest.body, Body::Refund(r) if r.amount == 40));
    let none_left = s.post("r4", refund(&pi, Some(1))).await;
    assert_eq!(error(&none_left).code, Some("charge_already_refunded"));
    let listed = s.engine.refunds(pi.clone()).await.unwrap().unwrap();
    assert_eq!(
        listed.iter().map(|r| r.amount).collect::<Vec<_>>(),
        vec![40, 60]
    );
    // An intent that did not succeed has nothing to refund.
    let open = s.post("o", create("q", 5, false, "pm_card_visa")).await;
    let Body::Intent(open) = open.body else {
        panic!()
    };
    let e = s.post("r5", refund(&open.id(), None)).await;
    assert_eq!(error(&e).code, Some("payment_intent_unexpected_state"));
}

#[tokio::test]
async fn declines_by_payment_method_customer_and_rate() {
    let s = sim(SimConfig::default());
    let pm = s
        .post("a", create("p", 1, true, DECLINING_PAYMENT_METHODS[0]))
        .await;
    let e = error(&pm);
    assert_eq!(
        (e.status, e.decline_code),
        (402, Some("insufficient_funds"))
    );
    assert_eq!(
        e.payment_intent.as_ref().unwrap().status,
        IntentStatus::RequiresPaymentMethod
    );
    let customer = Post::CreateIntent(CreateIntent {
        metadata: Metadata::new(vec![("customer_id".into(), "decline-bob".into())]),
        ..match create("q", 1, true, "pm_card_visa") {
            Post::CreateIntent(c) => c,
            _ => unreachable!(),
        }
    });
    assert_eq!(error(&s.post("b", customer).await).status, 402);
    let always = sim(SimConfig {
        decline_rate: 1.0,
        ..SimConfig::default()
    });
    assert_eq!(
        error(&always.post("c", create("r", 1, true, "pm_card_visa")).await).status,
        402
    );
}

#[tokio::test]
async fn void_both_ways_cancel_an_unconfirmed_intent_or_refuse_a_succeeded_one() {
    let s = sim(SimConfig::default());
    // The charge never arrived: the key is claimed unconfirmed, the intent cancelled.
    let claim = s.post("k1", create("p1", 100, false, "pm_card_visa")).await;
    let Body::Intent(i) = claim.body else {
        panic!()
    };
    let c = s.post("k1:cancel", Post::Cancel { intent: i.id() }).await;
    assert!(matches!(&c.body, Body::Intent(i) if i.status == IntentStatus::Canceled));
    // The late charge is refused: the key is spent on another request.
    let late = s.post("k1", create("p1", 100, true, "pm_card_visa")).await;
    assert_eq!(error(&late).kind, "idempotency_error");
    // A cancel of a cancelled intent, under a new key: unexpected state, with the intent.
    let again = s.post("other", Post::Cancel { intent: i.id() }).await;
    assert_eq!(error(&again).code, Some("payment_intent_unexpected_state"));
    // The charge arrived first: the claim is refused, the cancel of a succeeded intent too.
    let charged = s.charge("k2", "p2", 100).await;
    let claim = s.post("k2", create("p2", 100, false, "pm_card_visa")).await;
    assert_eq!(error(&claim).kind, "idempotency_error");
    let c = s
        .post(
            "k2:cancel",
            Post::Cancel {
                intent: charged.id(),
            },
        )
        .await;
    assert_eq!(error(&c).code, Some("payment_intent_unexpected_state"));
}

#[tokio::test]
async fn search_finds_a_payments_intents_and_confirm_moves_an_open_one() {
    let s = sim(SimConfig::default());
    assert!(s.engine.search("p".into()).await.unwrap().is_empty());
    let open = s.post("a", create("p", 7, false, "pm_card_visa")).await;
    let Body::Intent(open) = open.body else {
        panic!()
    };
    s.charge("b", "other", 7).await;
    let confirmed = s
        .post(
            "c",
            Post::Confirm {
                intent: open.id(),
                payment_method: None,
            },
        )
        .await;
    assert!(matches!(&confirmed.body, Body::Intent(i) if i.status == IntentStatus::Succeeded));
    let found = s.engine.search("p".into()).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].id, found[0].status),
        (open.id, IntentStatus::Succeeded)
    );
    let missing = s
        .post(
            "d",
            Post::Confirm {
                intent: "pi_nope".into(),
                payment_method: None,
            },
        )
        .await;
    assert_eq!(error(&missing).status, 404);
}

/// An engine over the in-process store of the ledger at `path`, rebuilt from it.
fn open_ledger(path: &std::path::Path) -> Arc<Engine<MemoryStore>> {
    Arc::new(
        Engine::new(
            MemoryStore::open(path, DEFAULT_KEY_RETENTION, (system_clock())()).unwrap(),
            SimConfig::default(),
        )
        .unwrap(),
    )
}

async fn post(e: &Arc<Engine<MemoryStore>>, key: &str, p: Post) -> Reply {
    e.post(Some(key.to_owned()), p, Duration::ZERO, false)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_ledger_rebuilds_keys_intents_and_refunds_and_marks_what_did_not_act() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let open = || open_ledger(&path);
    let e = open();
    let Body::Intent(i) = post(&e, "c", create("p", 100, true, "pm_card_visa"))
        .await
        .body
    else {
        panic!()
    };
    let r = post(&e, "r", refund(&i.id(), Some(30))).await;
    post(&e, "c", create("p", 999, true, "pm_card_visa")).await;
    drop(e);
    let e = open();
    // The same refund (what the ledger does not carry, its metadata, comes back empty).
    let (Body::Refund(first), Body::Refund(again)) =
        (r.body, post(&e, "r", refund(&i.id(), Some(30))).await.body)
    else {
        panic!("refunds expected")
    };
    assert_eq!((first.id(), first.amount), (again.id(), again.amount));
    let over = post(&e, "r2", refund(&i.id(), Some(71))).await;
    assert_eq!(error(&over).code, Some("amount_too_large"));
    let lines = crate::gateway::read_ledger(&path).unwrap().entries;
    let acted: Vec<_> = lines.iter().map(|l| (l.op, l.outcome, l.acted())).collect();
    use LedgerOp::*;
    use LedgerOutcome::*;
    assert_eq!(
        acted,
        vec![
            (Charge, Succeeded, true),
            (Refund, Succeeded, true),
            (Charge, Rejected, false),
            (Refund, Succeeded, false),
            (Refund, Rejected, false),
        ]
    );
    assert!(lines[3].replay);
    assert_eq!(lines[2].error.as_deref(), Some("idempotency_error"));
    assert_eq!(lines[1].intent.as_deref(), Some(i.id().as_str()));
}

fn hold(payment: &str, amount: u64) -> Post {
    match create(payment, amount, true, "pm_card_visa") {
        Post::CreateIntent(c) => Post::CreateIntent(CreateIntent {
            capture_manual: true,
            ..c
        }),
        _ => unreachable!(),
    }
}

fn capture(intent: &str, amount: Option<u64>) -> Post {
    Post::Capture {
        intent: intent.into(),
        amount_to_capture: amount,
    }
}

fn intent_of(reply: &Reply) -> &Intent {
    reply
        .intent()
        .unwrap_or_else(|| panic!("no intent: {reply:?}"))
}

#[tokio::test]
async fn a_hold_is_captured_once_refunded_up_to_the_capture_and_never_also_cancelled() {
    let s = sim(SimConfig::default());
    let held = s.post("h", hold("p", 1000)).await;
    let id = intent_of(&held).id();
    assert_eq!(intent_of(&held).status, IntentStatus::RequiresCapture);
    assert_eq!(intent_of(&held).amount_received(), 0);
    // Nothing taken yet: nothing to refund.
    let early = s.post("r0", refund(&id, None)).await;
    assert_eq!(error(&early).code, Some("payment_intent_unexpected_state"));
    // More than held: refused, and not kept under the key.
    let over = s.post("c", capture(&id, Some(1001))).await;
    assert_eq!(error(&over).code, Some("amount_too_large"));

    let captured = s.post("c", capture(&id, Some(600))).await;
    assert_eq!(intent_of(&captured).status, IntentStatus::Succeeded);
    assert_eq!(intent_of(&captured).amount_received(), 600);
    let again = s.post("c", capture(&id, Some(600))).await;
    assert!(again.replay && again.body == captured.body, "{again:?}");
    let twice = s.post("c2", capture(&id, None)).await;
    assert_eq!(error(&twice).code, Some("payment_intent_unexpected_state"));
    let cancel = s.post("x", Post::Cancel { intent: id.clone() }).await;
    assert_eq!(error(&cancel).code, Some("payment_intent_unexpected_state"));

    let too_much = s.post("r1", refund(&id, Some(601))).await;
    assert_eq!(error(&too_much).code, Some("amount_too_large"));
    assert!(
        matches!(s.post("r2", refund(&id, None)).await.body, Body::Refund(r) if r.amount == 600)
    );

    // Released: it cannot be captured after.
    let other = s.post("h2", hold("q", 500)).await;
    let other = intent_of(&other).id();
    let released = s
        .post(
            "x2",
            Post::Cancel {
                intent: other.clone(),
            },
        )
        .await;
    assert_eq!(intent_of(&released).status, IntentStatus::Canceled);
    let late = s.post("c3", capture(&other, None)).await;
    assert_eq!(error(&late).code, Some("payment_intent_unexpected_state"));
}

#[tokio::test]
async fn the_ledger_rebuilds_holds_and_their_captures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let open = || open_ledger(&path);
    let e = open();
    let a = intent_of(&post(&e, "ha", hold("a", 1000)).await).id();
    let b = intent_of(&post(&e, "hb", hold("b", 800)).await).id();
    post(&e, "ca", capture(&a, Some(400))).await;
    drop(e);

    let e = open();
    let a_now = e.retrieve(a.clone()).await.unwrap().unwrap();
    assert_eq!(
        (a_now.status, a_now.amount_received()),
        (IntentStatus::Succeeded, 400)
    );
    let b_now = e.retrieve(b.clone()).await.unwrap().unwrap();
    assert_eq!(b_now.status, IntentStatus::RequiresCapture);
    assert!(b_now.capture_manual);
    // The capture's key replays; the refund cap is the capture's.
    assert!(post(&e, "ca", capture(&a, Some(400))).await.replay);
    let over = post(&e, "ra", refund(&a, Some(401))).await;
    assert_eq!(error(&over).code, Some("amount_too_large"));
    assert!(
        matches!(post(&e, "cb", capture(&b, None)).await.body, Body::Intent(i) if i.amount_received() == 800)
    );

    let ops: Vec<_> = crate::gateway::read_ledger(&path)
        .unwrap()
        .entries
        .iter()
        .filter(|l| l.acted())
        .map(|l| (l.op, l.amount))
        .collect();
    use LedgerOp::*;
    assert_eq!(
        ops,
        vec![
            (Authorize, 1000),
            (Authorize, 800),
            (Capture, 400),
            (Capture, 800)
        ]
    );
}

fn cancel(intent: &str) -> Post {
    Post::Cancel {
        intent: intent.into(),
    }
}

fn for_customer(payment: &str, customer: &str, manual: bool) -> Post {
    Post::CreateIntent(CreateIntent {
        amount: 700,
        currency: Currency::parse("usd").unwrap(),
        confirm: true,
        payment_method: Some("pm_card_visa".into()),
        payment_method_types: vec!["card".into()],
        metadata: Metadata::new(vec![
            ("customer_id".into(), customer.into()),
            ("payment_id".into(), payment.into()),
        ]),
        capture_manual: manual,
    })
}

#[tokio::test]
async fn customers_that_pay_later_settle_once_by_themselves_and_replays_keep_the_first_word() {
    let s = sim(SimConfig {
        settle_delay: Duration::from_secs(1),
        ..SimConfig::default()
    });
    let paid = s.post("a", for_customer("a", "async-1", false)).await;
    let declined = s
        .post("d", for_customer("d", "async-decline-1", false))
        .await;
    let held = s.post("h", for_customer("h", "async-2", true)).await;
    let acting = s.post("x", for_customer("x", "action-1", false)).await;
    for reply in [&paid, &declined, &held] {
        assert_eq!(intent_of(reply).status, IntentStatus::Processing);
    }
    assert_eq!(intent_of(&acting).status, IntentStatus::RequiresAction);
    let three_ds = s
        .post(
            "3ds",
            create("3ds", 100, true, "pm_card_threeDSecure2Required"),
        )
        .await;
    assert_eq!(intent_of(&three_ds).status, IntentStatus::RequiresAction);
    // Money on its way cannot be stopped; a customer who has not acted can be.
    let stop = s.post("c1", cancel(&intent_of(&paid).id())).await;
    assert_eq!(error(&stop).code, Some("payment_intent_unexpected_state"));

    assert!(
        s.engine.settle_due().await.unwrap().is_empty(),
        "not due yet"
    );
    s.now.fetch_add(1000, Ordering::SeqCst);
    let mut settled: Vec<_> = s
        .engine
        .settle_due()
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            (
                e.intent.metadata.payment_id().to_owned(),
                e.event_type,
                e.intent.status,
            )
        })
        .collect();
    settled.sort_by_key(|(p, ..)| p.clone());
    assert_eq!(
        settled,
        vec![
            (
                "a".into(),
                "payment_intent.succeeded",
                IntentStatus::Succeeded
            ),
            (
                "d".into(),
                "payment_intent.payment_failed",
                IntentStatus::RequiresPaymentMethod
            ),
            (
                "h".into(),
                "payment_intent.amount_capturable_updated",
                IntentStatus::RequiresCapture
            ),
        ]
    );
    assert!(
        s.engine.settle_due().await.unwrap().is_empty(),
        "settled once"
    );
    // The key's replay answers the first word, as Stripe's does; a retrieve tells how it stands.
    let again = s.post("a", for_customer("a", "async-1", false)).await;
    assert!(again.replay);
    assert_eq!(intent_of(&again).status, IntentStatus::Processing);
    let now = s
        .engine
        .retrieve(intent_of(&paid).id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.status, IntentStatus::Succeeded);
    assert!(
        matches!(s.post("r", refund(&now.id(), None)).await.body, Body::Refund(r) if r.amount == 700)
    );

    s.now.fetch_add(3_600_000, Ordering::SeqCst);
    assert!(
        s.engine.settle_due().await.unwrap().is_empty(),
        "an action is never taken by itself"
    );
    let cancelled = s.post("c2", cancel(&intent_of(&acting).id())).await;
    assert_eq!(intent_of(&cancelled).status, IntentStatus::Canceled);
}

#[tokio::test]
async fn the_ledger_keeps_a_processing_intent_across_a_restart_and_its_settlement_takes_the_money()
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let open = || {
        Arc::new(
            Engine::new(
                MemoryStore::open(&path, DEFAULT_KEY_RETENTION, (system_clock())()).unwrap(),
                SimConfig {
                    settle_delay: Duration::ZERO,
                    ..SimConfig::default()
                },
            )
            .unwrap(),
        )
    };
    let e = open();
    let id = intent_of(&post(&e, "a", for_customer("a", "async-1", true)).await).id();
    drop(e);

    let e = open();
    assert_eq!(
        e.retrieve(id.clone()).await.unwrap().unwrap().status,
        IntentStatus::Processing
    );
    let settled = e.settle_due().await.unwrap();
    assert_eq!(settled.len(), 1, "it settles after the restart");
    assert!(
        post(&e, "a", for_customer("a", "async-1", true))
            .await
            .replay
    );
    drop(e);

    let e = open();
    assert_eq!(
        e.retrieve(id.clone()).await.unwrap().unwrap().status,
        IntentStatus::RequiresCapture
    );
    assert!(e.settle_due().await.unwrap().is_empty(), "and only once");
    let lines = crate::gateway::read_ledger(&path).unwrap().entries;
    let ops: Vec<_> = lines
        .iter()
        .map(|l| (l.op, l.outcome, l.acted(), l.idempotency_key.as_str()))
        .collect();
    use LedgerOp::*;
    use LedgerOutcome::*;
    assert_eq!(
        ops,
        vec![
            (Process, Succeeded, true, "a"),
            (Authorize, Succeeded, true, ""),
            (Process, Succeeded, false, "a"),
        ]
    );
    assert!(lines[0].manual_capture && lines[0].settles_at.is_some());
    assert_eq!(lines[1].id.as_deref(), Some(id.as_str()));
}
