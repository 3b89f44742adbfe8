//! The crash test's oracle: what the gateway did (its ledger) against what Restate holds (the
//! final `GetPayment`, the stored refunds, the invocations) and what the clients were told.
//! Plain code over plain data: every [`Kind`] of violation has a unit test that feeds it a
//! synthetic ledger and end state and sees it caught.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use payment_service::gateway::{LedgerEntry, LedgerOp, LedgerOutcome};
use payment_service::payment::model::MSG_ALREADY_PROCESSED;
use payment_service::payment::{
    CaptureMethod, Payment, PaymentId, PaymentResult, PaymentStatus, REASON_HOLD_EXPIRED, Refund,
    RefundStatus,
};
use payment_service::stripe_sim::LedgerFault;

use super::plan::{HoldEnd, Params, PaymentPlan};
use crate::admin::Invocation;
use crate::client::{Answer, CANCEL, CAPTURE, REFUND};
use crate::stack::PROBE_PREFIX;

pub use crate::client::Reply;

/// What the clients of one payment got.
#[derive(Debug, Clone, Default)]
pub struct PaymentLog {
    pub creates: Vec<Reply<PaymentResult>>,
    /// (amount asked, answer)
    pub refunds: Vec<(Option<u64>, Reply<Refund>)>,
    /// (refund key, answer) of the refunds in parts.
    pub keyed_refunds: Vec<(String, Reply<Refund>)>,
    /// (handler, answer) of a hold's CapturePayment and CancelPayment calls.
    pub holds: Vec<(&'static str, Reply<Payment>)>,
    /// GetPayment right after the CreatePayment answers.
    pub get: Option<Reply<Payment>>,
}

/// The system once it has settled: what the audit reads.
#[derive(Debug, Clone, Default)]
pub struct EndState {
    /// The final GetPayment of each payment, in plan order.
    pub finals: Vec<Reply<Payment>>,
    /// The `refund` state key of each payment that has one.
    pub stored_refunds: BTreeMap<String, Refund>,
    /// `PaymentService` invocations not completed: there must be none.
    pub unfinished: Vec<Invocation>,
    /// `PaymentService` invocations that completed with a failure.
    pub failed_invocations: Vec<Invocation>,
    pub invocations: u64,
    pub ledger: Vec<LedgerEntry>,
}

/// What the kills did.
#[derive(Debug, Clone, Default)]
pub struct ChaosLog {
    pub service_kills: usize,
    /// Kills of the gateway process.
    pub gateway_kills: usize,
    /// restate-server kills, or node kills on a cluster.
    pub server_kills: usize,
    /// Kills of each node.
    pub node_kills: Vec<usize>,
    /// A restart that did not work, or a process that died by itself: the run is void.
    pub error: Option<String>,
}

/// One thing that must not happen, and the payment it happened to.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub payment: Option<String>,
    pub kind: Kind,
}

/// The kinds of violation.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// The gateway took the money more than once (succeeded, non-replay charges).
    ChargedTwice {
        charge_ids: Vec<String>,
    },
    RefundedTwice {
        refund_ids: Vec<String>,
    },
    /// The gateway decided the charge more than once (declined and charged, or declined twice).
    DecidedTwice {
        charged: usize,
        declined: usize,
    },
    /// A ledger line of an operation or outcome the gateway never produces.
    UnexpectedLedgerLine {
        line: String,
    },
    ChargedOtherAmount {
        charged: u64,
        planned: u64,
    },
    RefundWithoutCharge {
        line: String,
    },
    RefundAboveCharge {
        refunded: u64,
        charged: u64,
    },
    /// A refund of an amount no client asked for.
    RefundNotAsked {
        refunded: u64,
        asked: Vec<u64>,
    },
    /// No final GetPayment answer, or a refusal (a lost payment answers 404).
    NoFinalState {
        answer: String,
    },
    /// The stored payment is not what the clients asked for.
    NotWhatWasAsked {
        payment: String,
    },
    SettledWithoutCharge {
        status: PaymentStatus,
    },
    ChargeIdMismatch {
        state: Option<String>,
        gateway: Option<String>,
    },
    /// `failed` while the gateway took the money.
    FailedButCharged {
        charge_id: String,
    },
    /// `failed` although the gateway never declined nor refused it, and no look-up found it
    /// uncharged.
    FailedWithoutDecline,
    /// `canceled` with nothing charged, while the gateway took the money.
    CanceledButCharged {
        charge_id: String,
    },
    /// The refund that voids a cancelled payment's charge, on a payment not `canceled`.
    VoidRefundNotCanceled {
        status: PaymentStatus,
        line: String,
    },
    /// The stored refund is still `pending` once everything settled.
    RefundUnsettled {
        refund: String,
    },
    FailedWithChargeId {
        charge_id: String,
    },
    DeclinedButNotFailed {
        status: PaymentStatus,
    },
    /// Not settled (`pending`).
    Unsettled {
        status: PaymentStatus,
    },
    RefundedWithoutLedgerRefund,
    LedgerRefundButNotRefunded {
        status: PaymentStatus,
        line: String,
    },
    RefundedWithoutStoredRefund,
    StoredRefundMismatch {
        stored: String,
        gateway: String,
    },
    StoredRefundButNotRefunded {
        status: PaymentStatus,
    },
    /// The payment's refunded total (or its status) is not what the gateway's refunds add up to.
    RefundedTotalMismatch {
        status: PaymentStatus,
        state: u64,
        gateway: u64,
    },
    /// A CreatePayment client was told another outcome than the end state's.
    CreateToldOtherwise {
        told: String,
        status: PaymentStatus,
        charge_id: Option<String>,
    },
    CreateRefused {
        status: u16,
        message: String,
    },
    /// More than one client was told "processed successfully".
    SeveralFreshAnswers {
        n: usize,
    },
    RefundToldOtherwise {
        asked: Option<u64>,
        told: String,
        gateway: String,
        stored: String,
    },
    RefundRefused {
        asked: Option<u64>,
        status: u16,
        message: String,
        payment: PaymentStatus,
    },
    /// A client got no answer before the deadline.
    Unanswered {
        handler: &'static str,
        last: String,
    },
    GetAfterCreateMismatch {
        seen: String,
        end: String,
    },
    /// The gateway saw a payment no client asked for.
    UnknownPayment,
    InvocationUnfinished {
        invocation: String,
    },
    InvocationFailed {
        handler: String,
        failure: String,
    },
    /// The kills did not go as planned (a restart failed, a process died by itself).
    Chaos {
        error: String,
    },
    TooFewKills {
        service: usize,
        server: usize,
        planned: usize,
    },
    /// No gateway call ran again: no kill landed between the gateway acting and the journal
    /// recording it, so the run proved nothing.
    NothingReexecuted,
    /// The gateway's faults left no outcome unknown that the service then settled by itself
    /// (no payment or refund ended with `attempts` > 0): the run proved nothing about them.
    NoUnknownSettled,
    /// A hold captured more than once, or both captured and released.
    HoldSettledTwice {
        captures: usize,
        releases: usize,
    },
    /// A hold neither captured nor released at the gateway by the end.
    HoldLeft {
        line: String,
    },
    /// A charge the gateway accepted without a final word (processing, or waiting on the
    /// customer) that neither settled nor was cancelled by the end: money may still move.
    AcceptedLeft {
        line: String,
    },
    /// The payment's state disagrees with what the gateway did to its hold.
    HoldStateMismatch {
        status: PaymentStatus,
        amount_captured: u64,
        gateway: String,
    },
    /// A CapturePayment or CancelPayment answered with what did not happen, or refused when it
    /// should have been answered.
    HoldToldOtherwise {
        handler: &'static str,
        told: String,
        status: PaymentStatus,
    },
}

impl Kind {
    /// A short name per kind (the unit tests check that each one can be caught).
    pub fn name(&self) -> &'static str {
        match self {
            Kind::ChargedTwice { .. } => "charged-twice",
            Kind::RefundedTwice { .. } => "refunded-twice",
            Kind::RefundedTotalMismatch { .. } => "refunded-total-mismatch",
            Kind::DecidedTwice { .. } => "decided-twice",
            Kind::UnexpectedLedgerLine { .. } => "unexpected-ledger-line",
            Kind::ChargedOtherAmount { .. } => "charged-other-amount",
            Kind::RefundWithoutCharge { .. } => "refund-without-charge",
            Kind::RefundAboveCharge { .. } => "refund-above-charge",
            Kind::RefundNotAsked { .. } => "refund-not-asked",
            Kind::NoFinalState { .. } => "no-final-state",
            Kind::NotWhatWasAsked { .. } => "not-what-was-asked",
            Kind::SettledWithoutCharge { .. } => "settled-without-charge",
            Kind::ChargeIdMismatch { .. } => "charge-id-mismatch",
            Kind::FailedButCharged { .. } => "failed-but-charged",
            Kind::FailedWithoutDecline => "failed-without-decline",
            Kind::FailedWithChargeId { .. } => "failed-with-charge-id",
            Kind::DeclinedButNotFailed { .. } => "declined-but-not-failed",
            Kind::Unsettled { .. } => "unsettled",
            Kind::RefundedWithoutLedgerRefund => "refunded-without-ledger-refund",
            Kind::LedgerRefundButNotRefunded { .. } => "ledger-refund-but-not-refunded",
            Kind::RefundedWithoutStoredRefund => "refunded-without-stored-refund",
            Kind::StoredRefundMismatch { .. } => "stored-refund-mismatch",
            Kind::StoredRefundButNotRefunded { .. } => "stored-refund-but-not-refunded",
            Kind::CreateToldOtherwise { .. } => "create-told-otherwise",
            Kind::CreateRefused { .. } => "create-refused",
            Kind::SeveralFreshAnswers { .. } => "several-fresh-answers",
            Kind::RefundToldOtherwise { .. } => "refund-told-otherwise",
            Kind::RefundRefused { .. } => "refund-refused",
            Kind::Unanswered { .. } => "unanswered",
            Kind::GetAfterCreateMismatch { .. } => "get-after-create-mismatch",
            Kind::UnknownPayment => "unknown-payment",
            Kind::InvocationUnfinished { .. } => "invocation-unfinished",
            Kind::InvocationFailed { .. } => "invocation-failed",
            Kind::Chaos { .. } => "chaos",
            Kind::TooFewKills { .. } => "too-few-kills",
            Kind::NothingReexecuted => "nothing-reexecuted",
            Kind::CanceledButCharged { .. } => "canceled-but-charged",
            Kind::VoidRefundNotCanceled { .. } => "void-refund-not-canceled",
            Kind::RefundUnsettled { .. } => "refund-unsettled",
            Kind::NoUnknownSettled => "no-unknown-settled",
            Kind::HoldSettledTwice { .. } => "hold-settled-twice",
            Kind::HoldLeft { .. } => "hold-left",
            Kind::AcceptedLeft { .. } => "accepted-left",
            Kind::HoldStateMismatch { .. } => "hold-state-mismatch",
            Kind::HoldToldOtherwise { .. } => "hold-told-otherwise",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.payment {
            Some(id) => write!(f, "{id}: {} {:?}", self.kind.name(), self.kind),
            None => write!(f, "{} {:?}", self.kind.name(), self.kind),
        }
    }
}

/// What the audit found: figures and violations.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    pub ledger_charges: usize,
    pub ledger_refunds: usize,
    /// Calls whose key the ledger had seen before: a step that ran again.
    pub reexecuted: usize,
    /// Lines marked `replay` by the gateway (equal to `reexecuted` when keys are honoured).
    pub replays: usize,
    pub completed: usize,
    pub failed: usize,
    pub refunded: usize,
    pub other_status: usize,
    pub expected_409s: usize,
    pub probe_404s: usize,
    /// Calls the gateway answered with an injected fault: 5xx/429 and hangs before acting,
    /// answers dropped after acting.
    pub faults_error: usize,
    pub faults_hang: usize,
    pub faults_drop: usize,
    /// Payments and refunds whose outcome was unknown at some point (`attempts` > 0 at the
    /// end) and that the service settled by itself.
    pub settled_unknown_payments: usize,
    pub settled_unknown_refunds: usize,
    /// Clients answered `pending` (CreatePayment, RefundPayment) before the outcome was known.
    pub pending_answers: usize,
    /// Holds that ended captured, released by CancelPayment, and released when their window
    /// ended.
    pub holds_captured: usize,
    pub holds_canceled: usize,
    pub holds_expired: usize,
    /// Payments the gateway settled later (customers `async-*`, `action-*`), by how they ended.
    pub async_completed: usize,
    pub async_failed: usize,
    pub violations: Vec<Violation>,
}

impl Findings {
    fn violation(&mut self, id: &str, kind: Kind) {
        self.violations.push(Violation {
            payment: Some(id.to_owned()),
            kind,
        });
    }

    fn general(&mut self, kind: Kind) {
        self.violations.push(Violation {
            payment: None,
            kind,
        });
    }

    pub fn count(&self, name: &str) -> usize {
        self.violations
            .iter()
            .filter(|v| v.kind.name() == name)
            .count()
    }

    /// The payments with a violation, for the journal dump.
    pub fn suspects(&self) -> BTreeSet<String> {
        self.violations
            .iter()
            .filter_map(|v| v.payment.clone())
            .collect()
    }
}

/// A ledger line, short: `refund refund:p-1 2500 Succeeded re_… replay=false`.
pub fn show(e: &LedgerEntry) -> String {
    format!(
        "{:?} {} {} {:?} {} replay={}",
        e.op,
        e.idempotency_key,
        e.amount,
        e.outcome,
        e.id.as_deref().unwrap_or("-"),
        e.replay
    )
}

fn refund_of(r: &Refund) -> String {
    format!(
        "{} of {}",
        r.refund_id.as_deref().unwrap_or("(pending)"),
        r.amount
    )
}

/// What the gateway did for one payment, from its ledger lines.
struct GatewayView<'a> {
    /// The charge it made (the first, if it made several).
    charge_id: Option<String>,
    declined: bool,
    /// It refused a charge request for good (e.g. `idempotency_error`; not "key in use", which
    /// is an unknown outcome to the service).
    refused: bool,
    /// A charge accepted without a final word that the service cancelled uncharged (its
    /// customer never confirmed).
    unconfirmed_cancel: bool,
    /// The intent of the charge the gateway accepted without a final word, if it did.
    accepted: Option<String>,
    refund: Option<&'a LedgerEntry>,
    /// `refund` is the one that voids a cancelled payment's charge (key `void:<id>`).
    void_refund: bool,
    /// The refunds made with refund keys (gateway keys `refund:<id>:r<n>`), in ledger order.
    keyed: Vec<&'a LedgerEntry>,
    /// A hold's captures and releases (cancels of the held intent), acted.
    captures: Vec<&'a LedgerEntry>,
    releases: Vec<&'a LedgerEntry>,
}

impl<'a> GatewayView<'a> {
    /// Reads one payment's lines, and checks them on their own.
    fn of(plan: &PaymentPlan, lines: &[&'a LedgerEntry], f: &mut Findings) -> Self {
        let id = plan.id.as_str();
        let acted = |op: LedgerOp, outcome: LedgerOutcome| -> Vec<&'a LedgerEntry> {
            lines
                .iter()
                .copied()
                .filter(|e| e.op == op && e.outcome == outcome && !e.replay)
                .collect()
        };
        // A hold is the payment's charge here: its money is taken by its capture.
        let charged = [LedgerOp::Charge, LedgerOp::Authorize]
            .into_iter()
            .flat_map(|op| acted(op, LedgerOutcome::Succeeded))
            .collect::<Vec<_>>();
        let declined = [LedgerOp::Charge, LedgerOp::Authorize]
            .into_iter()
            .flat_map(|op| acted(op, LedgerOutcome::Declined))
            .collect::<Vec<_>>();
        let keyed_prefix = format!("refund:{id}:r");
        let (keyed, refunded): (Vec<&LedgerEntry>, Vec<&LedgerEntry>) =
            acted(LedgerOp::Refund, LedgerOutcome::Succeeded)
                .into_iter()
                .partition(|e| e.idempotency_key.starts_with(&keyed_prefix));
        let ids = |lines: &[&LedgerEntry]| lines.iter().filter_map(|e| e.id.clone()).collect();
        for e in lines {
            if e.op == LedgerOp::Refund && e.outcome == LedgerOutcome::Declined {
                f.violation(id, Kind::UnexpectedLedgerLine { line: show(e) });
            }
            if matches!(e.op, LedgerOp::Charge | LedgerOp::Authorize) && e.amount != plan.amount {
                f.violation(
                    id,
                    Kind::ChargedOtherAmount {
                        charged: e.amount,
                        planned: plan.amount,
                    },
                );
            }
        }
        if charged.len() > 1 {
            f.violation(
                id,
                Kind::ChargedTwice {
                    charge_ids: ids(&charged),
                },
            );
        }
        let mut keys: Vec<&str> = keyed.iter().map(|e| e.idempotency_key.as_str()).collect();
        keys.sort_unstable();
        let key_twice = keys.windows(2).any(|w| w[0] == w[1]);
        if refunded.len() > 1 || key_twice {
            f.violation(
                id,
                Kind::RefundedTwice {
                    refund_ids: ids(&refunded).into_iter().chain(ids(&keyed)).collect(),
                },
            );
        }
        // Refunds in parts, each under its own key, never above the charge together.
        let total: u64 = refunded.iter().chain(&keyed).map(|e| e.amount).sum();
        if !keyed.is_empty() && total > plan.amount {
            f.violation(
                id,
                Kind::RefundAboveCharge {
                    refunded: total,
                    charged: plan.amount,
                },
            );
        }
        if let Some(r) = keyed.first().filter(|_| charged.is_empty()) {
            f.violation(id, Kind::RefundWithoutCharge { line: show(r) });
        }
        if declined.len() > 1 || (!declined.is_empty() && !charged.is_empty()) {
            f.violation(
                id,
                Kind::DecidedTwice {
                    charged: charged.len(),
                    declined: declined.len(),
                },
            );
        }
        let refund = refunded.first().copied();
        let void_key = PaymentId::parse(id).map(|p| p.void_refund_key()).ok();
        let void_refund = refund.is_some_and(|r| Some(&r.idempotency_key) == void_key.as_ref());
        if let Some(r) = refund {
            if charged.is_empty() {
                f.violation(id, Kind::RefundWithoutCharge { line: show(r) });
            }
            let asked = plan.refund_amounts();
            if void_refund {
                // A void refunds the whole charge, whatever the clients asked.
                if r.amount != plan.amount {
                    f.violation(
                        id,
                        Kind::RefundAboveCharge {
                            refunded: r.amount,
                            charged: plan.amount,
                        },
                    );
                }
            } else if r.amount == 0 || r.amount > plan.amount {
                f.violation(
                    id,
                    Kind::RefundAboveCharge {
                        refunded: r.amount,
                        charged: plan.amount,
                    },
                );
            } else if !asked.contains(&r.amount) {
                f.violation(
                    id,
                    Kind::RefundNotAsked {
                        refunded: r.amount,
                        asked: asked.into_iter().collect(),
                    },
                );
            }
        }
        let charge_id = charged.first().and_then(|e| e.id.clone());
        let captures = acted(LedgerOp::Capture, LedgerOutcome::Succeeded);
        let releases: Vec<&LedgerEntry> = acted(LedgerOp::Cancel, LedgerOutcome::Succeeded)
            .into_iter()
            .filter(|e| charge_id.is_some() && e.intent == charge_id)
            .collect();
        if captures.len() > 1 || (!captures.is_empty() && !releases.is_empty()) {
            f.violation(
                id,
                Kind::HoldSettledTwice {
                    captures: captures.len(),
                    releases: releases.len(),
                },
            );
        }
        let held = charged.iter().find(|e| e.op == LedgerOp::Authorize);
        if let Some(held) = held.filter(|_| captures.is_empty() && releases.is_empty()) {
            f.violation(id, Kind::HoldLeft { line: show(held) });
        }
        // Every accepted charge ends at the gateway: settled by the gateway itself (a line with
        // no key naming its intent) or cancelled.
        let mut unconfirmed_cancel = false;
        for accepted in acted(LedgerOp::Process, LedgerOutcome::Succeeded) {
            let names = |e: &&&LedgerEntry| e.intent.is_some() && e.intent == accepted.id;
            let settled = lines.iter().filter(names).any(|e| {
                matches!(e.op, LedgerOp::Charge | LedgerOp::Authorize)
                    && e.idempotency_key.is_empty()
            });
            let cancelled = lines.iter().filter(names).any(|e| {
                e.op == LedgerOp::Cancel && e.outcome == LedgerOutcome::Succeeded && !e.replay
            });
            unconfirmed_cancel |= cancelled && !settled;
            if !settled && !cancelled {
                f.violation(
                    id,
                    Kind::AcceptedLeft {
                        line: show(accepted),
                    },
                );
            }
        }
        let refused = lines.iter().any(|e| {
            matches!(e.op, LedgerOp::Charge | LedgerOp::Authorize)
                && e.outcome == LedgerOutcome::Rejected
                && e.fault.is_none()
                && e.error.as_deref() != Some(KEY_IN_USE)
        });
        Self {
            charge_id,
            declined: !declined.is_empty(),
            refused,
            refund,
            void_refund,
            unconfirmed_cancel,
            accepted: acted(LedgerOp::Process, LedgerOutcome::Succeeded)
                .first()
                .and_then(|e| e.id.clone()),
            keyed,
            captures,
            releases,
        }
    }
}

/// A RefundPayment refusal, or no answer, that the payment's end does not explain (an answer
/// with a refund is checked by the caller).
fn wrong_refund_answer(
    id: &str,
    asked: Option<u64>,
    answer: &Reply<Refund>,
    payment: PaymentStatus,
    f: &mut Findings,
) {
    match answer {
        Ok(Answer::Ok(_)) => {}
        Ok(Answer::Refused(r)) => f.violation(
            id,
            Kind::RefundRefused {
                asked,
                status: r.status,
                message: r.message.clone(),
                payment,
            },
        ),
        Err(e) => f.violation(
            id,
            Kind::Unanswered {
                handler: "RefundPayment",
                last: e.to_string(),
            },
        ),
    }
}

/// Stripe's error code for a key whose first request is still running: an unknown outcome to
/// the caller, not a refusal.
const KEY_IN_USE: &str = "idempotency_key_in_use";

/// The ledger by payment. A line without a payment ID (a call naming only an intent, e.g. a
/// cancel the gateway refused) goes to the payment whose intent it names.
fn by_payment(ledger: &[LedgerEntry]) -> HashMap<&str, Vec<&LedgerEntry>> {
    let mut intents: HashMap<&str, &str> = HashMap::new();
    for e in ledger.iter().filter(|e| !e.payment_id.is_empty()) {
        for intent in [e.id.as_deref(), e.intent.as_deref()].into_iter().flatten() {
            intents.insert(intent, e.payment_id.as_str());
        }
    }
    let mut map: HashMap<&str, Vec<&LedgerEntry>> = HashMap::new();
    for e in ledger {
        let payment = match (e.payment_id.as_str(), e.intent.as_deref()) {
            ("", Some(intent)) => intents.get(intent).copied().unwrap_or(""),
            (payment, _) => payment,
        };
        map.entry(payment).or_default().push(e);
    }
    map
}

/// The whole audit: the ledger, every payment, the invocations, the kills.
pub fn audit(
    p: &Params,
    plans: &[PaymentPlan],
    logs: &[PaymentLog],
    end: &EndState,
    chaos: &ChaosLog,
) -> Findings {
    let mut f = Findings::default();
    let mut by_payment = by_payment(&end.ledger);
    let mut seen_keys = BTreeSet::new();
    for e in &end.ledger {
        f.reexecuted += usize::from(!seen_keys.insert(e.idempotency_key.as_str()));
        f.replays += usize::from(e.replay);
        f.ledger_charges += usize::from(e.op == LedgerOp::Charge);
        f.ledger_refunds += usize::from(e.op == LedgerOp::Refund);
        match e.fault {
            Some(LedgerFault::Error) => f.faults_error += 1,
            Some(LedgerFault::Hang) => f.faults_hang += 1,
            Some(LedgerFault::Drop) => f.faults_drop += 1,
            None => {}
        }
    }
    for (i, plan) in plans.iter().enumerate() {
        let lines = by_payment.remove(plan.id.as_str()).unwrap_or_default();
        let payment = PaymentAudit {
            plan,
            log: &logs[i],
            stored_refund: end.stored_refunds.get(&plan.id),
            gw: GatewayView::of(plan, &lines, &mut f),
        };
        match &end.finals[i] {
            Ok(Answer::Ok(state)) => payment.check(state, &mut f),
            other => {
                f.other_status += 1;
                f.violation(
                    &plan.id,
                    Kind::NoFinalState {
                        answer: format!("{other:?}"),
                    },
                );
            }
        }
    }
    for id in by_payment.keys() {
        f.violation(id, Kind::UnknownPayment);
    }
    audit_invocations(plans, end, &mut f);
    if let Some(error) = &chaos.error {
        f.general(Kind::Chaos {
            error: error.clone(),
        });
    }
    if chaos.service_kills == 0 || chaos.server_kills < p.server_kills {
        f.general(Kind::TooFewKills {
            service: chaos.service_kills,
            server: chaos.server_kills,
            planned: p.server_kills,
        });
    }
    if f.reexecuted == 0 {
        f.general(Kind::NothingReexecuted);
    }
    if p.gateway.any() && f.settled_unknown_payments + f.settled_unknown_refunds == 0 {
        f.general(Kind::NoUnknownSettled);
    }
    f
}

/// Nothing unfinished; no failure but the expected ones: the readiness probes' 404 and the
/// 409 of refunding a failed payment, or of a refund in parts for more than is left.
fn audit_invocations(plans: &[PaymentPlan], end: &EndState, f: &mut Findings) {
    for inv in &end.unfinished {
        f.violation(
            &inv.target_service_key,
            Kind::InvocationUnfinished {
                invocation: format!("{inv:?}"),
            },
        );
    }
    // Refunds in parts may ask for more than is left: a 409 for some of them is expected.
    let in_parts: BTreeSet<&str> = plans
        .iter()
        .filter(|p| !p.keyed_refunds.is_empty())
        .map(|p| p.id.as_str())
        .collect();
    let failed_payments: BTreeSet<&str> = plans
        .iter()
        .zip(&end.finals)
        .filter(
            |(_, answer)| matches!(answer, Ok(Answer::Ok(p)) if p.status == PaymentStatus::Failed),
        )
        .map(|(plan, _)| plan.id.as_str())
        .collect();
    // A hold's captures and cancels refuse each other, and a late one meets the expiry.
    let holds: BTreeSet<&str> = plans
        .iter()
        .filter(|p| p.hold.is_some())
        .map(|p| p.id.as_str())
        .collect();
    for inv in &end.failed_invocations {
        let key = inv.target_service_key.as_str();
        let failure = inv.completion_failure.as_deref().unwrap_or("?");
        let handler = inv.target_handler_name.as_str();
        if key.starts_with(PROBE_PREFIX) && failure.starts_with("[404]") {
            f.probe_404s += 1;
        } else if (handler == REFUND
            && failure.starts_with("[409]")
            && (failed_payments.contains(key) || in_parts.contains(key)))
            || (matches!(handler, CAPTURE | CANCEL)
                && failure.starts_with("[409]")
                && holds.contains(key))
        {
            f.expected_409s += 1;
        } else {
            f.violation(
                key,
                Kind::InvocationFailed {
                    handler: inv.target_handler_name.clone(),
                    failure: failure.to_owned(),
                },
            );
        }
    }
}

/// One payment's audit: its plan, what its clients got, the gateway's view of it.
struct PaymentAudit<'a> {
    plan: &'a PaymentPlan,
    log: &'a PaymentLog,
    stored_refund: Option<&'a Refund>,
    gw: GatewayView<'a>,
}

impl PaymentAudit<'_> {
    fn check(&self, end: &Payment, f: &mut Findings) {
        match end.status {
            PaymentStatus::Completed => f.completed += 1,
            PaymentStatus::Failed => f.failed += 1,
            PaymentStatus::Refunded | PaymentStatus::PartiallyRefunded => f.refunded += 1,
            PaymentStatus::Pending | PaymentStatus::Canceled | PaymentStatus::Authorized => {
                f.other_status += 1
            }
        }
        // Unknown at some point, and settled by the service itself (a pending one is a
        // violation of its own).
        if end.attempts > 0 && end.status != PaymentStatus::Pending {
            f.settled_unknown_payments += 1;
        }
        if let Some(r) = self.stored_refund {
            if r.attempts > 0 && r.status == RefundStatus::Completed {
                f.settled_unknown_refunds += 1;
            }
            if r.status == RefundStatus::Pending {
                f.violation(
                    &self.plan.id,
                    Kind::RefundUnsettled {
                        refund: format!("{r:?}"),
                    },
                );
            }
        }
        self.check_state(end, f);
        // A payment with refunds in parts has no refund of the other kind, but a void's.
        if self.plan.keyed_refunds.is_empty() || end.status == PaymentStatus::Canceled {
            self.check_refund(end, f);
        } else if let Some(r) = self.gw.refund {
            f.violation(
                &self.plan.id,
                Kind::LedgerRefundButNotRefunded {
                    status: end.status,
                    line: show(r),
                },
            );
        }
        self.check_keyed_refunds(end, f);
        self.check_hold(end, f);
        if self.plan.is_async() {
            match end.status {
                PaymentStatus::Failed => f.async_failed += 1,
                PaymentStatus::Pending => {}
                _ => f.async_completed += 1,
            }
        }
        self.check_creates(end, f);
        self.check_refund_clients(end, f);
        self.check_keyed_refund_clients(end, f);
        self.check_get(end, f);
    }

    /// The end state, as GetPayment tells it, against the ledger.
    fn check_state(&self, end: &Payment, f: &mut Findings) {
        let id = self.plan.id.as_str();
        if end.amount.minor_units() != self.plan.amount || end.customer_id != self.plan.customer {
            f.violation(
                id,
                Kind::NotWhatWasAsked {
                    payment: format!("{end:?}"),
                },
            );
        }
        let charged = &self.gw.charge_id;
        match end.status {
            PaymentStatus::Completed
            | PaymentStatus::Refunded
            | PaymentStatus::PartiallyRefunded
                if charged.is_none() =>
            {
                f.violation(id, Kind::SettledWithoutCharge { status: end.status })
            }
            PaymentStatus::Completed
            | PaymentStatus::Refunded
            | PaymentStatus::PartiallyRefunded
                if &end.charge_id != charged =>
            {
                f.violation(
                    id,
                    Kind::ChargeIdMismatch {
                        state: end.charge_id.clone(),
                        gateway: charged.clone(),
                    },
                )
            }
            PaymentStatus::Completed
            | PaymentStatus::Refunded
            | PaymentStatus::PartiallyRefunded => {}
            PaymentStatus::Failed => {
                if let Some(charge_id) = charged {
                    f.violation(
                        id,
                        Kind::FailedButCharged {
                            charge_id: charge_id.clone(),
                        },
                    );
                } else if !self.gw.declined
                    && !self.gw.refused
                    && !self.gw.unconfirmed_cancel
                    && !looked_up_uncharged(end)
                {
                    f.violation(id, Kind::FailedWithoutDecline);
                }
                if let Some(charge_id) = &end.charge_id {
                    f.violation(
                        id,
                        Kind::FailedWithChargeId {
                            charge_id: charge_id.clone(),
                        },
                    );
                }
            }
            // Canceled: nothing charged, or the charge refunded (the refund is checked with the
            // refunds).
            PaymentStatus::Canceled => match (&end.charge_id, charged) {
                (None, Some(charge_id)) => f.violation(
                    id,
                    Kind::CanceledButCharged {
                        charge_id: charge_id.clone(),
                    },
                ),
                (Some(_), _) if &end.charge_id != charged => f.violation(
                    id,
                    Kind::ChargeIdMismatch {
                        state: end.charge_id.clone(),
                        gateway: charged.clone(),
                    },
                ),
                _ => {}
            },
            // The plan places no holds: a payment held, or still pending, is unsettled.
            PaymentStatus::Pending | PaymentStatus::Authorized => {
                f.violation(id, Kind::Unsettled { status: end.status })
            }
        }
        if end.status != PaymentStatus::Failed && charged.is_none() && self.gw.declined {
            f.violation(id, Kind::DeclinedButNotFailed { status: end.status });
        }
    }

    /// The refund: ledger ⇔ status ⇔ stored refund.
    fn check_refund(&self, end: &Payment, f: &mut Findings) {
        let id = self.plan.id.as_str();
        // A canceled payment whose charge had gone through is refunded in full; a canceled hold
        // (its charge ID the hold released) took nothing to refund.
        let canceled = end.status == PaymentStatus::Canceled;
        let released = canceled && end.capture == CaptureMethod::Manual;
        let refunded = matches!(
            end.status,
            PaymentStatus::Refunded | PaymentStatus::PartiallyRefunded
        ) || (canceled && !released && end.charge_id.is_some());
        if let Some(r) = self.gw.refund.filter(|_| self.gw.void_refund && !canceled) {
            f.violation(
                id,
                Kind::VoidRefundNotCanceled {
                    status: end.status,
                    line: show(r),
                },
            );
        }
        match (refunded, self.gw.refund, self.stored_refund) {
            (true, None, _) => f.violation(id, Kind::RefundedWithoutLedgerRefund),
            (false, Some(r), _) => f.violation(
                id,
                Kind::LedgerRefundButNotRefunded {
                    status: end.status,
                    line: show(r),
                },
            ),
            (true, Some(_), None) => f.violation(id, Kind::RefundedWithoutStoredRefund),
            (true, Some(r), Some(s)) => {
                if s.refund_id.as_deref() != r.id.as_deref() || s.amount.minor_units() != r.amount {
                    f.violation(
                        id,
                        Kind::StoredRefundMismatch {
                            stored: refund_of(s),
                            gateway: show(r),
                        },
                    );
                }
            }
            (false, None, Some(_)) => {
                f.violation(id, Kind::StoredRefundButNotRefunded { status: end.status })
            }
            (false, None, None) => {}
        }
    }

    /// The refunds in parts: each stored one settled and made once by the gateway under its
    /// key, each the gateway made stored, and the total and the status what they add up to.
    fn check_keyed_refunds(&self, end: &Payment, f: &mut Findings) {
        let id = self.plan.id.as_str();
        let stored: Vec<&Refund> = end
            .refunds
            .iter()
            .filter(|r| r.refund_key.is_some())
            .collect();
        for r in &stored {
            if r.status == RefundStatus::Pending {
                f.violation(
                    id,
                    Kind::RefundUnsettled {
                        refund: format!("{r:?}"),
                    },
                );
                continue;
            }
            if r.attempts > 0 {
                f.settled_unknown_refunds += 1;
            }
            let made = self
                .gw
                .keyed
                .iter()
                .find(|e| r.gateway_key.as_deref() == Some(e.idempotency_key.as_str()));
            match made {
                None => f.violation(id, Kind::RefundedWithoutLedgerRefund),
                Some(e)
                    if e.id.as_deref() == r.refund_id.as_deref()
                        && e.amount == r.amount.minor_units() => {}
                Some(e) => f.violation(
                    id,
                    Kind::StoredRefundMismatch {
                        stored: refund_of(r),
                        gateway: show(e),
                    },
                ),
            }
        }
        for e in &self.gw.keyed {
            if !stored
                .iter()
                .any(|r| r.gateway_key.as_deref() == Some(e.idempotency_key.as_str()))
            {
                f.violation(
                    id,
                    Kind::LedgerRefundButNotRefunded {
                        status: end.status,
                        line: show(e),
                    },
                );
            }
        }
        // A canceled payment's total is its void's refund (checked with the refunds).
        if self.plan.keyed_refunds.is_empty() || end.status == PaymentStatus::Canceled {
            return;
        }
        let made: u64 = self.gw.keyed.iter().map(|e| e.amount).sum();
        let status_agrees = match end.status {
            PaymentStatus::Completed => made == 0,
            PaymentStatus::PartiallyRefunded => made > 0 && made < self.plan.amount,
            PaymentStatus::Refunded => made == self.plan.amount,
            _ => made == 0,
        };
        if end.amount_refunded != made || !status_agrees {
            f.violation(
                id,
                Kind::RefundedTotalMismatch {
                    status: end.status,
                    state: end.amount_refunded,
                    gateway: made,
                },
            );
        }
    }

    /// What the clients of the refunds in parts were told: the stored refund of their key
    /// (pending, if not known yet), or a 409 (more than is left, or not refundable) and then
    /// no refund under their key.
    fn check_keyed_refund_clients(&self, end: &Payment, f: &mut Findings) {
        let id = self.plan.id.as_str();
        for (key, answer) in &self.log.keyed_refunds {
            let stored = end
                .refunds
                .iter()
                .find(|r| r.refund_key.as_deref() == Some(key.as_str()));
            match answer {
                Ok(Answer::Ok(a))
                    if a.status == RefundStatus::Pending
                        && a.refund_id.is_none()
                        && stored.is_some_and(|s| s.amount == a.amount) =>
                {
                    f.pending_answers += 1;
                }
                Ok(Answer::Ok(a)) if stored == Some(a) => {}
                Ok(Answer::Ok(a)) => f.violation(
                    id,
                    Kind::RefundToldOtherwise {
                        asked: None,
                        told: refund_of(a),
                        gateway: format!("the refunds of key {key:?}"),
                        stored: stored.map_or("nothing".into(), refund_of),
                    },
                ),
                Ok(Answer::Refused(r)) if r.status == 409 && stored.is_none() => {}
                other => wrong_refund_answer(id, None, other, end.status, f),
            }
        }
    }

    /// What the CreatePayment clients were told.
    fn check_creates(&self, end: &Payment, f: &mut Findings) {
        let id = self.plan.id.as_str();
        // A refunded payment was completed when its creates were answered; a hold was
        // authorized (or, answered after it, as it ended).
        let told_status = match end.status {
            PaymentStatus::Refunded | PaymentStatus::PartiallyRefunded => PaymentStatus::Completed,
            status => status,
        };
        let hold = self.plan.hold.is_some() && end.status != PaymentStatus::Failed;
        let mut fresh = 0;
        for answer in &self.log.creates {
            match answer {
                // Told the truth at the time: not known yet (and no charge named, or the one the
                // gateway accepted without a final word).
                Ok(Answer::Ok(a))
                    if a.status == PaymentStatus::Pending
                        && (a.charge_id.is_none() || a.charge_id == self.gw.accepted) =>
                {
                    f.pending_answers += 1;
                }
                Ok(Answer::Ok(a)) => {
                    fresh += usize::from(a.message != MSG_ALREADY_PROCESSED);
                    let as_held = hold && a.status == PaymentStatus::Authorized;
                    if (a.status != told_status && !as_held) || a.charge_id != end.charge_id {
                        f.violation(
                            id,
                            Kind::CreateToldOtherwise {
                                told: format!("{a:?}"),
                                status: end.status,
                                charge_id: end.charge_id.clone(),
                            },
                        );
                    }
                }
                Ok(Answer::Refused(r)) => f.violation(
                    id,
                    Kind::CreateRefused {
                        status: r.status,
                        message: r.message.clone(),
                    },
                ),
                Err(e) => f.violation(
                    id,
                    Kind::Unanswered {
                        handler: "CreatePayment",
                        last: e.to_string(),
                    },
                ),
            }
        }
        if fresh > 1 {
            f.violation(id, Kind::SeveralFreshAnswers { n: fresh });
        }
    }

    /// A hold: the end state against what the gateway did to it (captured once, as asked, or
    /// released, never both), and what its clients were told.
    fn check_hold(&self, end: &Payment, f: &mut Findings) {
        let Some(hold) = &self.plan.hold else {
            return;
        };
        let id = self.plan.id.as_str();
        let (captures, releases) = (&self.gw.captures, &self.gw.releases);
        let asked = match hold.end {
            HoldEnd::Capture(amount) | HoldEnd::Race(amount) => amount.unwrap_or(self.plan.amount),
            HoldEnd::CancelPayment | HoldEnd::Expire => 0,
        };
        let agrees = match end.status {
            PaymentStatus::Completed => {
                f.holds_captured += 1;
                end.capture == CaptureMethod::Manual
                    && releases.is_empty()
                    && captures
                        .first()
                        .is_some_and(|c| c.amount == end.amount_captured)
                    && end.amount_captured == asked
            }
            PaymentStatus::Canceled => {
                if end.error_msg.as_deref() == Some(REASON_HOLD_EXPIRED) {
                    f.holds_expired += 1;
                } else {
                    f.holds_canceled += 1;
                }
                captures.is_empty() && !releases.is_empty()
            }
            // Declined (checked with the charge), or left held or pending (unsettled).
            PaymentStatus::Failed | PaymentStatus::Authorized | PaymentStatus::Pending => {
                captures.is_empty()
            }
            PaymentStatus::Refunded | PaymentStatus::PartiallyRefunded => false,
        };
        if !agrees {
            let lines: Vec<String> = captures.iter().chain(releases).map(|e| show(e)).collect();
            f.violation(
                id,
                Kind::HoldStateMismatch {
                    status: end.status,
                    amount_captured: end.amount_captured,
                    gateway: format!("asked {asked}; {}", lines.join("; ")),
                },
            );
        }
        for (handler, answer) in &self.log.holds {
            let won = if *handler == CAPTURE {
                PaymentStatus::Completed
            } else {
                PaymentStatus::Canceled
            };
            let told = |told: String| Kind::HoldToldOtherwise {
                handler,
                told,
                status: end.status,
            };
            match answer {
                Ok(Answer::Ok(p)) => {
                    // Answered before the gateway's answer was known: settled later.
                    let unknown = p.status == PaymentStatus::Authorized
                        && p.hold_action.as_ref().is_some_and(|h| h.attempts > 0);
                    let same = p.status == end.status && p.amount_captured == end.amount_captured;
                    if unknown {
                        f.pending_answers += 1;
                    } else if end.status != won || !same {
                        f.violation(id, told(format!("{:?} {}", p.status, p.amount_captured)));
                    }
                }
                // The other one won, the window ended first, or the payment was declined (the
                // invocation's 409 is counted with the invocations).
                Ok(Answer::Refused(r)) if r.status == 409 && end.status != won => {}
                Ok(Answer::Refused(r)) => {
                    f.violation(id, told(format!("HTTP {}: {}", r.status, r.message)));
                }
                Err(e) => f.violation(
                    id,
                    Kind::Unanswered {
                        handler,
                        last: e.to_string(),
                    },
                ),
            }
        }
    }

    /// What the RefundPayment clients were told.
    fn check_refund_clients(&self, end: &Payment, f: &mut Findings) {
        let id = self.plan.id.as_str();
        for (asked, answer) in &self.log.refunds {
            match answer {
                // Not known yet when answered: the same refund as the one that settled.
                Ok(Answer::Ok(a))
                    if a.status == RefundStatus::Pending
                        && a.refund_id.is_none()
                        && self.stored_refund.is_some_and(|s| s.amount == a.amount) =>
                {
                    f.pending_answers += 1;
                }
                Ok(Answer::Ok(a)) => {
                    let as_ledger = self.gw.refund.is_some_and(|r| {
                        r.id.as_deref() == a.refund_id.as_deref()
                            && r.amount == a.amount.minor_units()
                    });
                    if !as_ledger || self.stored_refund != Some(a) {
                        f.violation(
                            id,
                            Kind::RefundToldOtherwise {
                                asked: *asked,
                                told: refund_of(a),
                                gateway: self.gw.refund.map_or("nothing".into(), show),
                                stored: self.stored_refund.map_or("nothing".into(), refund_of),
                            },
                        );
                    }
                }
                Ok(Answer::Refused(r))
                    if r.status == 409 && end.status == PaymentStatus::Failed => {}
                other => wrong_refund_answer(id, *asked, other, end.status, f),
            }
        }
    }

    /// The GetPayment right after the creates: settled, with the end's charge.
    fn check_get(&self, end: &Payment, f: &mut Findings) {
        let id = self.plan.id.as_str();
        match &self.log.get {
            None => {}
            Some(Ok(Answer::Ok(seen)))
                if seen.status != PaymentStatus::Pending && seen.charge_id == end.charge_id => {}
            // Still being settled by the service (its outcome was unknown).
            Some(Ok(Answer::Ok(seen)))
                if seen.status == PaymentStatus::Pending
                    && seen.charge_id.is_none()
                    && (seen.attempts > 0 || seen.canceling) => {}
            // Accepted by the gateway without a final word, waiting on it.
            Some(Ok(Answer::Ok(seen)))
                if seen.status == PaymentStatus::Pending
                    && seen.awaiting.is_some()
                    && seen.charge_id.is_some()
                    && seen.charge_id == self.gw.accepted => {}
            Some(Err(e)) => f.violation(
                id,
                Kind::Unanswered {
                    handler: "GetPayment",
                    last: e.to_string(),
                },
            ),
            Some(other) => f.violation(
                id,
                Kind::GetAfterCreateMismatch {
                    seen: format!("{other:?}"),
                    end: format!("{end:?}"),
                },
            ),
        }
    }
}

/// `failed` because, its outcome unknown until the key's retention ran out, the look-up at the
/// gateway found no charge (the service's reason says so).
fn looked_up_uncharged(end: &Payment) -> bool {
    end.error_msg
        .as_deref()
        .is_some_and(|m| m.starts_with("the gateway never charged it"))
}

#[cfg(test)]
mod tests;
