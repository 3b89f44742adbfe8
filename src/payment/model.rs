//! The payment's life: what is stored, what is answered, and the transitions between states.
//!
//! ```text
//!   (none) ──create──▶ pending ──charged (or the look-up finds the charge)──▶ completed
//!                       │  ▲ │                                                     │ a refund of part
//!                       │  └─┘ outcome unknown, or processing at the gateway:        ▼
//!                       │      stays pending, settled later (webhook, look-up) partially_refunded
//!                       │                                                          │ the refunds reach the amount
//!                       │                                                          ▼ (or, from completed, a refund of all)
//!                       │                                                       refunded (final)
//!                       ├──declined, rejected, or the look-up finds no charge──▶ failed    (final)
//!                       ├──invocation cancelled: the charge voided or refunded──▶ canceled (final)
//!                       └──invocation cancelled, the gateway refused the charge's refund──▶ completed
//! ```
//!
//! Everything here is plain data and pure functions: the Restate handlers decide nothing
//! themselves, they read state, call these, and write state back.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::gateway::Awaiting;

use super::{
    Amount, CaptureMethod, Currency, NewPayment, PaymentError, PaymentId, RefundAmount, Timestamp,
    epoch_millis,
};

/// The message of a payment that was just charged.
pub const MSG_PROCESSED: &str = "Payment processed successfully";
/// The message of a `CreatePayment` that found the payment already settled.
pub const MSG_ALREADY_PROCESSED: &str = "Payment already processed";
/// The message of a refund.
pub const MSG_REFUNDED: &str = "Refund processed successfully";
/// The message of a payment whose charge's outcome is not known yet.
pub const MSG_PENDING: &str =
    "Payment pending: the gateway's answer is not known yet; the service settles it by itself";
/// The message of a payment the gateway is still processing.
pub const MSG_PROCESSING: &str = "Payment pending: the gateway accepted it and confirms it later; the service settles it by itself";
/// The reason a payment fails whose customer did not act by its confirmation deadline.
pub const REASON_NOT_CONFIRMED: &str =
    "not confirmed by the customer before its deadline: the gateway's intent is canceled";
/// The message of a payment whose money is held.
pub const MSG_AUTHORIZED: &str = "Payment authorized: the amount is held until CapturePayment, CancelPayment or the hold's expiry";
/// The message of a hold whose capture or release has an outcome not known yet.
pub const MSG_HOLD_ACTION_PENDING: &str = "Payment authorized: the gateway's answer to its capture or release is not known yet; the service settles it by itself";
/// The message of a refund whose outcome is not known yet.
pub const MSG_REFUND_PENDING: &str =
    "Refund pending: the gateway's answer is not known yet; the service settles it by itself";

/// Where a payment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
// Inline, one `enum` (see `string_enum`): restate-server copies a handler's schemas on every call.
#[schemars(inline, transform = crate::payment::types::string_enum)]
pub enum PaymentStatus {
    /// Stored, the charge not settled yet.
    Pending,
    /// Charged: `chargeId` names the charge at the gateway.
    Completed,
    /// Not charged, for good: the gateway declined or refused the charge, or, after its outcome
    /// stayed unknown, the gateway's records show it never charged. `errorMsg` says why.
    Failed,
    /// Charged, then refunded in full (`amountRefunded` is the amount).
    Refunded,
    /// Charged, then refunded in part: `amountRefunded` is less than the amount, and what is
    /// left can still be refunded.
    #[serde(rename = "partially_refunded")]
    PartiallyRefunded,
    /// Cancelled by an operator while the charge was unsettled, and voided: nothing charged, or
    /// the charge refunded in full (then `chargeId` names it and the stored refund holds it).
    /// Or a hold released uncaptured: by `CancelPayment`, or when its window ended
    /// (`errorMsg` says which).
    Canceled,
    /// Created with manual capture and held: the money is reserved at the gateway
    /// (`chargeId`), none taken yet, until `CapturePayment`, `CancelPayment` or `holdExpiresAt`.
    Authorized,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Refunded => "refunded",
            Self::PartiallyRefunded => "partially_refunded",
            Self::Canceled => "canceled",
            Self::Authorized => "authorized",
        }
    }
}

impl fmt::Display for PaymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The payment as stored under state key `payment` and answered by `GetPayment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Payment {
    pub payment_id: String,
    pub amount: Amount,
    pub currency: Currency,
    pub description: String,
    pub customer_id: String,
    pub status: PaymentStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_id: Option<String>,
    /// When the charge was submitted to the gateway, taken by the charge step and journaled
    /// with its result. A pending payment has none yet: no step before the charge reads the
    /// clock, because each `ctx.run` would be one more durable round trip per payment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_msg: Option<String>,
    /// Calls made to the gateway for the charge, when some ended without an answer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Why the charge's outcome is not known yet (a timeout, a 5xx, ...), while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Cancelled by an operator while the charge's outcome was unknown: the service voids the
    /// charge instead of completing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canceling: bool,
    /// Refund keys used up: by a refund the gateway rejected (it keeps a key's first answer, a
    /// refusal too) or one it had no record of once the key expired. The next refund uses a new key.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spent_refund_keys: u32,
    /// Minor units refunded so far, by every refund made (the payment's one refund and those
    /// made with refund keys).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub amount_refunded: u64,
    /// The refunds made with refund keys, oldest first, pending ones included. `GetPayment`
    /// lists the payment's one refund (state key `refund`) first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refunds: Vec<Refund>,
    /// Gateway keys numbered for refunds with refund keys so far (see
    /// `PaymentId::keyed_refund_key`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refund_keys_used: u32,
    /// `manual`: the charge placed a hold (absent: `automatic`, the money taken at once).
    #[serde(default, skip_serializing_if = "CaptureMethod::is_automatic")]
    pub capture: CaptureMethod,
    /// When the hold was placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorized_at: Option<Timestamp>,
    /// When the service releases a hold not captured by then (`--hold-expiry` after
    /// `authorizedAt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_expires_at: Option<Timestamp>,
    /// What a capture took (at most the amount); refunds are capped by it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub amount_captured: u64,
    /// A capture or a release of the hold whose outcome is not known yet: stored before the
    /// gateway is called, so that whatever cuts it off, it resumes as first requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_action: Option<PendingHoldAction>,
    /// A pending charge the gateway accepted without a final word (`chargeId` names it):
    /// `processing` (the money is on its way) or `requires_action` (the customer must act).
    /// The gateway's webhook settles it; at `confirmBy` the service looks it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<Awaiting>,
    /// When the service stops waiting for the webhook and looks the charge up
    /// (`--confirm-deadline` after it was accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_by: Option<Timestamp>,
}

/// What is done with a hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum HoldAction {
    /// Take `amount` of the hold.
    Capture { amount: Amount },
    /// Release the hold, taking nothing; `reason` is kept as the payment's `errorMsg`.
    Void { reason: String },
}

/// A [`HoldAction`] requested and not settled yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingHoldAction {
    #[serde(flatten)]
    pub action: HoldAction,
    /// Calls made to the gateway for it that ended without an answer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Why its outcome is not known yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// What a request to capture or release a hold finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldRequest {
    /// Done already: the payment answers as it is.
    Done,
    /// Stored now, or stored before and not settled (it resumes as first requested): the
    /// action to run.
    Run(HoldAction),
}

/// The reason stored when `CancelPayment` releases a hold.
pub const REASON_HOLD_CANCELED: &str = "canceled: the hold was released uncaptured";
/// The reason stored when the service releases a hold past its window.
pub const REASON_HOLD_EXPIRED: &str = "hold expired: released uncaptured";

/// The result of a hold's gateway step, journaled like [`ChargeStep`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldStep {
    #[serde(with = "epoch_millis")]
    pub started_at: Timestamp,
    #[serde(flatten)]
    pub result: HoldOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum HoldOutcome {
    Captured {
        amount: u64,
        #[serde(with = "epoch_millis")]
        at: Timestamp,
    },
    Voided,
    /// The gateway refused and did nothing, the hold still there.
    Rejected {
        reason: String,
    },
    /// A capture refused because the hold is gone at the gateway (released there, or expired):
    /// nothing was taken.
    Gone {
        reason: String,
    },
    Unknown {
        reason: String,
        attempts: u32,
    },
}

/// The most refunds with refund keys one payment can have: each is stored with the payment.
pub const MAX_KEYED_REFUNDS: usize = 100;

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// The charge step's result. It is the result of a journaled step, so it is recorded once and
/// replayed as recorded, clock readings included. One flat JSON object with timestamps in
/// epoch milliseconds, e.g. `{"startedAt":1795826813514,"outcome":"charged","chargeId":"ch_…",
/// "at":1795826813514}`: journal entries are internal, and each byte of them crosses
/// restate-server's log and storage several times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "JournaledChargeStep")]
pub struct ChargeStep {
    /// When the step began: the payment's `createdAt`.
    #[serde(with = "epoch_millis")]
    pub started_at: Timestamp,
    #[serde(flatten)]
    pub result: ChargeOutcome,
}

/// A [`ChargeStep`] as journaled, read field by field. Derived, a flattened and internally
/// tagged enum is read by buffering the whole object into serde's generic `Content` first,
/// twice over, and every payment reads its charge step back.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JournaledChargeStep {
    #[serde(with = "epoch_millis")]
    started_at: Timestamp,
    outcome: String,
    charge_id: Option<String>,
    /// Epoch milliseconds, as `epoch_millis` writes them.
    at: Option<i64>,
    reason: Option<String>,
    attempts: Option<u32>,
    awaiting: Option<Awaiting>,
}

impl TryFrom<JournaledChargeStep> for ChargeStep {
    type Error = String;

    fn try_from(step: JournaledChargeStep) -> Result<Self, String> {
        let JournaledChargeStep {
            started_at,
            outcome,
            charge_id,
            at: at_ms,
            reason,
            attempts,
            awaiting,
        } = step;
        let need = |field: &str| format!("charge step {outcome:?} without {field}");
        let at = |at: Option<i64>| {
            let millis = at.ok_or_else(|| need("at"))?;
            Timestamp::from_unix_millis(millis)
                .ok_or_else(|| format!("timestamp out of range: {millis} ms"))
        };
        let result = match outcome.as_str() {
            "charged" => ChargeOutcome::Charged {
                charge_id: charge_id.ok_or_else(|| need("chargeId"))?,
                at: at(at_ms)?,
            },
            "authorized" => ChargeOutcome::Authorized {
                charge_id: charge_id.ok_or_else(|| need("chargeId"))?,
                at: at(at_ms)?,
            },
            "declined" => ChargeOutcome::Declined {
                reason: reason.ok_or_else(|| need("reason"))?,
            },
            "rejected" => ChargeOutcome::Rejected {
                reason: reason.ok_or_else(|| need("reason"))?,
            },
            "notCharged" => ChargeOutcome::NotCharged {
                reason: reason.ok_or_else(|| need("reason"))?,
            },
            "processing" => ChargeOutcome::Processing {
                charge_id: charge_id.ok_or_else(|| need("chargeId"))?,
                awaiting: awaiting.ok_or_else(|| need("awaiting"))?,
                at: at(at_ms)?,
            },
            "unknown" => ChargeOutcome::Unknown {
                reason: reason.ok_or_else(|| need("reason"))?,
                attempts: attempts.ok_or_else(|| need("attempts"))?,
            },
            other => return Err(format!("unknown charge step outcome {other:?}")),
        };
        Ok(Self { started_at, result })
    }
}

/// What a charge step (a charge, or the final look-up) found. Written as part of a
/// [`ChargeStep`], and read back with it, field by field (`JournaledChargeStep`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum ChargeOutcome {
    /// The gateway took the money.
    #[serde(rename_all = "camelCase")]
    Charged {
        charge_id: String,
        #[serde(with = "epoch_millis")]
        at: Timestamp,
    },
    /// The gateway holds the money (manual capture).
    #[serde(rename_all = "camelCase")]
    Authorized {
        charge_id: String,
        #[serde(with = "epoch_millis")]
        at: Timestamp,
    },
    /// The gateway refused the charge (e.g. "insufficient funds").
    Declined { reason: String },
    /// The gateway refused the request itself and did nothing (e.g. its key check).
    Rejected { reason: String },
    /// The look-up, once the key could no longer settle it, found that no money moved.
    NotCharged { reason: String },
    /// The gateway accepted the charge without a final word: it settles later.
    #[serde(rename_all = "camelCase")]
    Processing {
        charge_id: String,
        awaiting: Awaiting,
        #[serde(with = "epoch_millis")]
        at: Timestamp,
    },
    /// No final word within the step's attempts: the payment stays pending.
    Unknown { reason: String, attempts: u32 },
}

/// What the gateway reported about a payment by itself (a verified webhook event): the body
/// of `Confirm`, which settles a payment still waiting on what the event says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayEvent {
    /// The gateway's event ID (Stripe's `evt_…`): deliveries of one event share it.
    pub event_id: String,
    /// The intent the event is about: the payment's `chargeId`.
    pub charge_id: String,
    /// When the gateway created the event.
    pub at: Timestamp,
    pub kind: GatewayEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum GatewayEventKind {
    /// The money was taken: `amountReceived` of it.
    #[serde(rename_all = "camelCase")]
    Succeeded {
        amount_received: u64,
    },
    /// A hold was placed.
    Authorized,
    /// The charge was declined, for `reason`.
    Failed {
        reason: String,
    },
    Canceled,
}

impl GatewayEvent {
    /// What the event settles of a charge whose outcome the service does not know yet, if
    /// anything: a cancel decides nothing (the service's own voids cancel intents), nor does an
    /// event of the other capture method.
    pub fn charge_outcome(&self, capture: CaptureMethod) -> Option<ChargeOutcome> {
        let (charge_id, at) = (self.charge_id.clone(), self.at);
        match (&self.kind, capture) {
            (GatewayEventKind::Succeeded { .. }, CaptureMethod::Automatic) => {
                Some(ChargeOutcome::Charged { charge_id, at })
            }
            (GatewayEventKind::Authorized, CaptureMethod::Manual) => {
                Some(ChargeOutcome::Authorized { charge_id, at })
            }
            (GatewayEventKind::Failed { reason }, _) => Some(ChargeOutcome::Declined {
                reason: reason.clone(),
            }),
            _ => None,
        }
    }

    /// What the event settles of a hold's capture or release whose outcome is not known yet.
    pub fn hold_outcome(&self, action: &HoldAction) -> Option<HoldOutcome> {
        match (&self.kind, action) {
            (GatewayEventKind::Succeeded { amount_received }, HoldAction::Capture { .. }) => {
                Some(HoldOutcome::Captured {
                    amount: *amount_received,
                    at: self.at,
                })
            }
            (GatewayEventKind::Canceled, HoldAction::Void { .. }) => Some(HoldOutcome::Voided),
            _ => None,
        }
    }
}

/// What voiding a cancelled payment's charge did, recorded once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum VoidOutcome {
    NothingCharged,
    #[serde(rename_all = "camelCase")]
    Refunded {
        charge_id: String,
        refund_id: String,
        #[serde(with = "epoch_millis")]
        at: Timestamp,
    },
    /// The charge had gone through and the gateway refused its refund: the charge stands.
    #[serde(rename_all = "camelCase")]
    Refused {
        charge_id: String,
        reason: String,
    },
    Unknown {
        reason: String,
        attempts: u32,
    },
}

/// The reason stored for a refund that voids a cancelled payment's charge.
pub const REASON_CANCELED: &str = "payment canceled";

impl Payment {
    /// A new payment, not yet charged.
    pub fn pending(id: &PaymentId, request: NewPayment) -> Self {
        Self {
            payment_id: id.as_str().to_owned(),
            amount: request.amount,
            currency: request.currency,
            description: request.description,
            customer_id: request.customer_id,
            status: PaymentStatus::Pending,
            charge_id: None,
            created_at: None,
            completed_at: None,
            error_msg: None,
            attempts: 0,
            last_error: None,
            canceling: false,
            spent_refund_keys: 0,
            amount_refunded: 0,
            refunds: Vec::new(),
            refund_keys_used: 0,
            capture: request.capture,
            authorized_at: None,
            hold_expires_at: None,
            amount_captured: 0,
            hold_action: None,
            awaiting: None,
            confirm_by: None,
        }
    }

    /// Records a charge step's result: `completed` with its charge ID, `failed` with why, or,
    /// when the outcome is unknown, still `pending` with the attempts and the last error.
    /// `createdAt` is the first step's start.
    pub fn settle(&mut self, step: ChargeStep) {
        debug_assert_eq!(self.status, PaymentStatus::Pending);
        self.created_at.get_or_insert(step.started_at);
        if !matches!(
            step.result,
            ChargeOutcome::Processing { .. } | ChargeOutcome::Unknown { .. }
        ) {
            self.awaiting = None;
            self.confirm_by = None;
        }
        match step.result {
            ChargeOutcome::Charged { charge_id, at } => {
                self.status = PaymentStatus::Completed;
                self.charge_id = Some(charge_id);
                self.completed_at = Some(at);
                self.last_error = None;
            }
            ChargeOutcome::Authorized { charge_id, at } => {
                self.status = PaymentStatus::Authorized;
                self.charge_id = Some(charge_id);
                self.authorized_at = Some(at);
                self.last_error = None;
            }
            ChargeOutcome::Declined { reason }
            | ChargeOutcome::Rejected { reason }
            | ChargeOutcome::NotCharged { reason } => {
                self.status = PaymentStatus::Failed;
                // Nothing charged: an intent accepted first and declined or cancelled later
                // is no charge.
                self.charge_id = None;
                self.error_msg = Some(reason);
                self.last_error = None;
            }
            ChargeOutcome::Unknown { reason, attempts } => {
                self.attempts += attempts;
                self.last_error = Some(reason);
            }
            ChargeOutcome::Processing {
                charge_id,
                awaiting,
                at: _,
            } => {
                self.charge_id = Some(charge_id);
                self.awaiting = Some(awaiting);
                self.last_error = None;
            }
        }
    }

    /// Whether the charge's outcome is not known yet (unknown, or processing at the gateway)
    /// and the service is settling it by itself.
    pub fn is_settling(&self) -> bool {
        self.status == PaymentStatus::Pending
            && (self.attempts > 0 || self.canceling || self.awaiting.is_some())
    }

    /// What a charge took: the amount, or for a hold, what its capture took.
    pub fn charged_amount(&self) -> u64 {
        match self.capture {
            CaptureMethod::Automatic => self.amount.minor_units(),
            CaptureMethod::Manual => self.amount_captured,
        }
    }

    /// A request to capture `amount` of the hold (`None`: all of it): stored as the pending
    /// action, resumed if one is stored, or done already; refused when the payment's state
    /// does not allow it.
    pub fn request_capture(&mut self, amount: Option<Amount>) -> Result<HoldRequest, PaymentError> {
        let captured = self.capture == CaptureMethod::Manual && self.amount_captured > 0;
        if captured {
            return Ok(HoldRequest::Done);
        }
        self.check_hold("capture")?;
        match self.hold_action.as_ref().map(|p| &p.action) {
            Some(action @ HoldAction::Capture { .. }) => {
                return Ok(HoldRequest::Run(action.clone()));
            }
            Some(HoldAction::Void { .. }) => {
                return Err(PaymentError::HoldBusy {
                    payment_id: self.payment_id.clone(),
                    action: "capture",
                    pending: "a release of its hold",
                });
            }
            None => {}
        }
        let amount = amount.unwrap_or(self.amount);
        if amount > self.amount {
            return Err(PaymentError::CaptureExceedsHold {
                payment_id: self.payment_id.clone(),
                requested: amount,
                held: self.amount,
            });
        }
        Ok(self.store_hold_action(HoldAction::Capture { amount }))
    }

    /// A request to release the hold, `reason` kept as `errorMsg`: like
    /// [`Payment::request_capture`].
    pub fn request_void(&mut self, reason: &str) -> Result<HoldRequest, PaymentError> {
        if self.capture == CaptureMethod::Manual && self.status == PaymentStatus::Canceled {
            return Ok(HoldRequest::Done);
        }
        self.check_hold("cancel")?;
        match self.hold_action.as_ref().map(|p| &p.action) {
            Some(action @ HoldAction::Void { .. }) => return Ok(HoldRequest::Run(action.clone())),
            Some(HoldAction::Capture { .. }) => {
                return Err(PaymentError::HoldBusy {
                    payment_id: self.payment_id.clone(),
                    action: "cancel",
                    pending: "a capture of its hold",
                });
            }
            None => {}
        }
        Ok(self.store_hold_action(HoldAction::Void {
            reason: reason.to_owned(),
        }))
    }

    fn check_hold(&self, action: &'static str) -> Result<(), PaymentError> {
        if self.status == PaymentStatus::Authorized {
            return Ok(());
        }
        Err(PaymentError::NotAuthorized {
            payment_id: self.payment_id.clone(),
            action,
            status: self.status,
            capture: self.capture,
        })
    }

    fn store_hold_action(&mut self, action: HoldAction) -> HoldRequest {
        self.hold_action = Some(PendingHoldAction {
            action: action.clone(),
            attempts: 0,
            last_error: None,
        });
        HoldRequest::Run(action)
    }

    /// Records a hold step's result: `completed` with what the capture took, `canceled` with
    /// why, or, unknown, the pending action with its attempts. A refusal clears the action
    /// (nothing was done) and is returned for the client.
    pub fn settle_hold(&mut self, step: HoldStep) -> Result<(), PaymentError> {
        debug_assert_eq!(self.status, PaymentStatus::Authorized);
        let Some(pending) = self.hold_action.as_mut() else {
            return Ok(());
        };
        match step.result {
            HoldOutcome::Captured { amount, at } => {
                self.status = PaymentStatus::Completed;
                self.amount_captured = amount;
                self.completed_at = Some(at);
                self.hold_expires_at = None;
                self.hold_action = None;
            }
            HoldOutcome::Voided => {
                if let HoldAction::Void { reason } = &pending.action {
                    self.error_msg = Some(reason.clone());
                }
                self.status = PaymentStatus::Canceled;
                self.hold_expires_at = None;
                self.hold_action = None;
            }
            HoldOutcome::Gone { reason } => {
                self.status = PaymentStatus::Canceled;
                self.error_msg = Some(reason);
                self.hold_expires_at = None;
                self.hold_action = None;
            }
            HoldOutcome::Rejected { reason } => {
                let action = match pending.action {
                    HoldAction::Capture { .. } => "capture",
                    HoldAction::Void { .. } => "release the hold of",
                };
                self.hold_action = None;
                return Err(PaymentError::HoldRejected {
                    payment_id: self.payment_id.clone(),
                    action,
                    reason,
                });
            }
            HoldOutcome::Unknown { reason, attempts } => {
                pending.attempts += attempts;
                pending.last_error = Some(reason);
            }
        }
        Ok(())
    }

    /// Records what voiding the charge did: `canceled`, with the refund if it had gone
    /// through (returned, to be stored as the payment's refund); `completed` if the gateway
    /// refused that refund (the money was taken and stays taken: the state says so, and why);
    /// or, unknown, still pending and `canceling`.
    pub fn cancel(&mut self, outcome: VoidOutcome) -> Option<Refund> {
        debug_assert_eq!(self.status, PaymentStatus::Pending);
        self.canceling = true;
        match outcome {
            VoidOutcome::NothingCharged => {
                self.status = PaymentStatus::Canceled;
                self.error_msg = Some("canceled: nothing was charged".into());
                self.last_error = None;
                None
            }
            VoidOutcome::Refunded {
                charge_id,
                refund_id,
                at,
            } => {
                self.status = PaymentStatus::Canceled;
                self.error_msg = Some(format!(
                    "canceled: the charge {charge_id} was refunded ({refund_id})"
                ));
                self.charge_id = Some(charge_id);
                self.last_error = None;
                self.amount_refunded = self.amount.minor_units();
                Some(Refund::completed(
                    refund_id,
                    at,
                    self.amount,
                    REASON_CANCELED.to_owned(),
                ))
            }
            VoidOutcome::Refused { charge_id, reason } => {
                self.status = PaymentStatus::Completed;
                self.error_msg = Some(format!(
                    "not canceled: the gateway refused to refund the charge {charge_id}: {reason}"
                ));
                self.charge_id = Some(charge_id);
                self.canceling = false;
                self.last_error = None;
                None
            }
            VoidOutcome::Unknown { reason, attempts } => {
                self.attempts += attempts;
                self.last_error = Some(reason);
                None
            }
        }
    }

    /// Checks that `request` is a retry of this payment and not another payment under the same
    /// ID: amount, currency, customer and capture must match (they decide what money moves). The
    /// description does not count: it is a label, and the stored one stays.
    pub fn check_retry(&self, request: &NewPayment) -> Result<(), PaymentError> {
        let mut fields = Vec::new();
        if self.amount != request.amount {
            fields.push("amount");
        }
        if self.currency != request.currency {
            fields.push("currency");
        }
        if self.customer_id != request.customer_id {
            fields.push("customerId");
        }
        if self.capture != request.capture {
            fields.push("capture");
        }
        if fields.is_empty() {
            Ok(())
        } else {
            Err(PaymentError::Conflict {
                payment_id: self.payment_id.clone(),
                fields,
            })
        }
    }

    /// How much a refund request takes from this payment, or why it cannot. `pending` is what
    /// refunds still being settled hold besides those under `refunds` (the payment's one
    /// refund, when the request has a refund key): it is taken as refunded until they settle.
    pub fn refundable_amount(
        &self,
        requested: RefundAmount,
        pending: u64,
    ) -> Result<Amount, PaymentError> {
        if !matches!(
            self.status,
            PaymentStatus::Completed | PaymentStatus::PartiallyRefunded
        ) {
            return Err(PaymentError::NotRefundable {
                payment_id: self.payment_id.clone(),
                status: self.status,
            });
        }
        let held = self.amount_refunded
            + pending
            + self
                .refunds
                .iter()
                .filter(|r| r.status == RefundStatus::Pending)
                .map(|r| r.amount.minor_units())
                .sum::<u64>();
        let charged = self.charged_amount();
        let left = charged.saturating_sub(held);
        let requested = match requested {
            RefundAmount::Partial(amount) if amount.minor_units() > charged => {
                return Err(PaymentError::invalid(format!(
                    "refund amount {amount} exceeds the amount charged {charged}"
                )));
            }
            RefundAmount::Partial(amount) => amount,
            RefundAmount::Full => match Amount::new(left) {
                Ok(all_left) => all_left,
                // Nothing left: refused below with what is left, 0.
                Err(_) => self.amount,
            },
        };
        if requested.minor_units() > left {
            return Err(PaymentError::RefundExceedsBalance {
                payment_id: self.payment_id.clone(),
                requested,
                left,
                charged,
            });
        }
        Ok(requested)
    }

    /// Records a refund of `amount` made: `refunded` once the refunds reach the amount,
    /// `partially_refunded` before.
    pub fn mark_refunded(&mut self, amount: Amount) {
        debug_assert!(matches!(
            self.status,
            PaymentStatus::Completed | PaymentStatus::PartiallyRefunded
        ));
        self.amount_refunded += amount.minor_units();
        self.status = if self.amount_refunded >= self.charged_amount() {
            PaymentStatus::Refunded
        } else {
            PaymentStatus::PartiallyRefunded
        };
    }

    /// The refund made with refund key `key`, if any.
    pub fn keyed_refund(&self, key: &str) -> Option<&Refund> {
        self.refunds
            .iter()
            .find(|r| r.refund_key.as_deref() == Some(key))
    }

    /// Stores a new refund with the client's refund key `key`, pending, under the next
    /// numbered gateway key; the stored refund. Refused past [`MAX_KEYED_REFUNDS`].
    pub fn add_keyed_refund(
        &mut self,
        id: &PaymentId,
        key: String,
        amount: Amount,
        reason: String,
    ) -> Result<Refund, PaymentError> {
        if self.refunds.len() >= MAX_KEYED_REFUNDS {
            return Err(PaymentError::TooManyRefunds {
                payment_id: self.payment_id.clone(),
                max: MAX_KEYED_REFUNDS,
            });
        }
        let mut refund = Refund::pending(amount, reason);
        refund.refund_key = Some(key);
        refund.gateway_key = Some(self.next_refund_gateway_key(id));
        self.refunds.push(refund.clone());
        Ok(refund)
    }

    /// The next numbered gateway key for a refund with a refund key.
    pub fn next_refund_gateway_key(&mut self, id: &PaymentId) -> String {
        self.refund_keys_used += 1;
        id.keyed_refund_key(self.refund_keys_used)
    }

    /// Stores `refund` (one with a refund key) over the stored one with its key.
    pub fn put_keyed_refund(&mut self, refund: Refund) {
        if let Some(stored) = self
            .refunds
            .iter_mut()
            .find(|r| r.refund_key == refund.refund_key)
        {
            *stored = refund;
        }
    }

    /// Drops the refund with refund key `key` (the gateway refused it: nothing was made).
    pub fn drop_keyed_refund(&mut self, key: &str) {
        self.refunds
            .retain(|r| r.refund_key.as_deref() != Some(key));
    }

    /// The refund key is used up (see `spent_refund_keys`): the next refund gets a new one.
    pub fn spend_refund_key(&mut self) {
        self.spent_refund_keys += 1;
    }
}

/// The answer to `CreatePayment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentResult {
    pub payment_id: String,
    pub status: PaymentStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_id: Option<String>,
    pub message: String,
}

impl PaymentResult {
    /// The answer of the invocation that settled the payment. A decline answers with its
    /// reason as the message, as the seed does.
    pub fn settled(payment: &Payment) -> Self {
        let message = match (&payment.status, &payment.error_msg) {
            (PaymentStatus::Failed | PaymentStatus::Canceled, Some(reason)) => reason.clone(),
            (PaymentStatus::Pending, _) if payment.awaiting.is_some() => MSG_PROCESSING.to_owned(),
            (PaymentStatus::Pending, _) => MSG_PENDING.to_owned(),
            (PaymentStatus::Authorized, _) => match &payment.hold_action {
                Some(p) if p.attempts > 0 => MSG_HOLD_ACTION_PENDING.to_owned(),
                _ => MSG_AUTHORIZED.to_owned(),
            },
            _ => MSG_PROCESSED.to_owned(),
        };
        Self::with_message(payment, message)
    }

    /// The answer to a duplicate `CreatePayment`: the stored outcome, unchanged.
    pub fn already_processed(payment: &Payment) -> Self {
        Self::with_message(payment, MSG_ALREADY_PROCESSED.to_owned())
    }

    fn with_message(payment: &Payment, message: String) -> Self {
        Self {
            payment_id: payment.payment_id.clone(),
            status: payment.status,
            charge_id: payment.charge_id.clone(),
            message,
        }
    }
}

/// The status of a refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RefundStatus {
    /// Stored, the gateway's answer not known yet: the service settles it with the same amount
    /// and key.
    Pending,
    Completed,
}

/// The refund, as stored under state key `refund` and answered by every `RefundPayment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Refund {
    /// The gateway's ID of the refund, once it is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_id: Option<String>,
    pub status: RefundStatus,
    pub amount: Amount,
    pub message: String,
    /// The reason the first refund request gave.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded_at: Option<Timestamp>,
    /// When the refund was first sent to the gateway under its current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<Timestamp>,
    /// Calls made to the gateway for the refund, when some ended without an answer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// Why the refund's outcome is not known yet, while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The client's refund key, for a refund made with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund_key: Option<String>,
    /// The idempotency key the gateway is sent, for a refund made with a refund key (stored
    /// before the call, so that every attempt sends the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_key: Option<String>,
}

/// What the refund step settled on, recorded once like [`ChargeOutcome`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum RefundOutcome {
    #[serde(rename_all = "camelCase")]
    Refunded {
        refund_id: String,
        #[serde(with = "epoch_millis")]
        at: Timestamp,
    },
    /// The gateway refused the refund and did nothing (e.g. more than is left of the charge).
    Rejected { reason: String },
    /// Once the key could no longer settle it, the gateway had no record of the refund.
    NotRefunded,
    /// No final word within the step's attempts: the refund stays pending.
    Unknown { reason: String, attempts: u32 },
}

/// The refund step's result, with when it began (the refund's `requestedAt` under a new key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefundStep {
    #[serde(with = "epoch_millis")]
    pub started_at: Timestamp,
    #[serde(flatten)]
    pub result: RefundOutcome,
}

impl Refund {
    /// A refund stored before the gateway is called, so that whatever cuts the call off, the
    /// refund resumes with this amount and reason.
    pub fn pending(amount: Amount, reason: String) -> Self {
        Self {
            refund_id: None,
            status: RefundStatus::Pending,
            amount,
            message: MSG_REFUND_PENDING.to_owned(),
            reason,
            refunded_at: None,
            requested_at: None,
            attempts: 0,
            last_error: None,
            refund_key: None,
            gateway_key: None,
        }
    }

    pub fn completed(refund_id: String, at: Timestamp, amount: Amount, reason: String) -> Self {
        Self {
            refund_id: Some(refund_id),
            status: RefundStatus::Completed,
            amount,
            message: MSG_REFUNDED.to_owned(),
            reason,
            refunded_at: Some(at),
            requested_at: None,
            attempts: 0,
            last_error: None,
            refund_key: None,
            gateway_key: None,
        }
    }

    /// Records a completed refund step. A rejection is not recorded here: the refund is then
    /// dropped (see `Payment::spend_refund_key`).
    pub fn settle(&mut self, refund_id: String, at: Timestamp) {
        self.refund_id = Some(refund_id);
        self.status = RefundStatus::Completed;
        self.message = MSG_REFUNDED.to_owned();
        self.refunded_at = Some(at);
        self.last_error = None;
    }

    pub fn unknown(&mut self, reason: String, attempts: u32) {
        self.attempts += attempts;
        self.last_error = Some(reason);
    }

    /// Whether the refund's outcome is unknown and the service is settling it by itself.
    pub fn is_settling(&self) -> bool {
        self.status == RefundStatus::Pending && self.attempts > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(amount: u64) -> NewPayment {
        NewPayment {
            amount: Amount::new(amount).unwrap(),
            currency: Currency::usd(),
            description: "Premium subscription".into(),
            customer_id: "cust-alice".into(),
            capture: CaptureMethod::Automatic,
        }
    }

    fn pending(amount: u64) -> Payment {
        let id = PaymentId::parse("payment-001").unwrap();
        Payment::pending(&id, request(amount))
    }

    fn step(result: ChargeOutcome) -> ChargeStep {
        ChargeStep {
            started_at: Timestamp::now(),
            result,
        }
    }

    fn completed(amount: u64) -> Payment {
        let mut p = pending(amount);
        p.settle(step(ChargeOutcome::Charged {
            charge_id: "ch_1".into(),
            at: Timestamp::now(),
        }));
        p
    }

    #[test]
    fn charge_completes() {
        let p = completed(10000);
        assert_eq!(p.status, PaymentStatus::Completed);
        assert_eq!(p.charge_id.as_deref(), Some("ch_1"));
        assert!(p.completed_at.is_some());
        assert_eq!(p.error_msg, None);
        let r = PaymentResult::settled(&p);
        assert_eq!(r.message, MSG_PROCESSED);
        assert_eq!(r.charge_id.as_deref(), Some("ch_1"));
    }

    #[test]
    fn a_charge_accepted_to_settle_later_stays_pending_naming_its_intent_until_it_settles() {
        let accepted = |p: &mut Payment| {
            p.settle(step(ChargeOutcome::Processing {
                charge_id: "pi_1".into(),
                awaiting: Awaiting::Processing,
                at: Timestamp::now(),
            }))
        };
        let mut p = pending(10000);
        accepted(&mut p);
        assert_eq!(p.status, PaymentStatus::Pending);
        assert_eq!(
            (p.charge_id.as_deref(), p.awaiting),
            (Some("pi_1"), Some(Awaiting::Processing))
        );
        assert!(p.is_settling(), "a duplicate answers it, charging nothing");
        assert_eq!(PaymentResult::settled(&p).message, MSG_PROCESSING);
        // Settled later: what it waited on is gone with the wait.
        p.settle(step(ChargeOutcome::Charged {
            charge_id: "pi_1".into(),
            at: Timestamp::now(),
        }));
        assert_eq!(p.status, PaymentStatus::Completed);
        assert_eq!((p.awaiting, p.confirm_by), (None, None));
        // Declined later, or cancelled unconfirmed: no charge, so no charge ID.
        let mut p = pending(10000);
        accepted(&mut p);
        p.settle(step(ChargeOutcome::NotCharged {
            reason: REASON_NOT_CONFIRMED.into(),
        }));
        assert_eq!(p.status, PaymentStatus::Failed);
        assert_eq!((p.charge_id.as_deref(), p.awaiting), (None, None));
        assert_eq!(p.error_msg.as_deref(), Some(REASON_NOT_CONFIRMED));
    }

    #[test]
    fn decline_fails_with_the_reason_as_message() {
        let mut p = pending(10000);
        p.settle(step(ChargeOutcome::Declined {
            reason: "insufficient funds".into(),
        }));
        assert_eq!(p.status, PaymentStatus::Failed);
        assert_eq!(p.error_msg.as_deref(), Some("insufficient funds"));
        assert_eq!(p.completed_at, None);
        let r = PaymentResult::settled(&p);
        assert_eq!(r.status, PaymentStatus::Failed);
        assert_eq!(r.message, "insufficient funds");
        assert_eq!(r.charge_id, None);
    }

    #[test]
    fn an_unknown_outcome_stays_pending_counting_attempts() {
        let mut p = pending(10000);
        for _ in 0..2 {
            p.settle(step(ChargeOutcome::Unknown {
                reason: "no answer within 5s".into(),
                attempts: 3,
            }));
        }
        assert_eq!(p.status, PaymentStatus::Pending);
        assert_eq!(p.attempts, 6);
        assert_eq!(p.last_error.as_deref(), Some("no answer within 5s"));
        assert!(p.is_settling());
        assert_eq!(PaymentResult::settled(&p).message, MSG_PENDING);
        p.settle(step(ChargeOutcome::Charged {
            charge_id: "ch_1".into(),
            at: Timestamp::now(),
        }));
        assert_eq!(p.status, PaymentStatus::Completed);
        assert_eq!((p.attempts, p.last_error), (6, None));
    }

    #[test]
    fn a_rejected_charge_fails_saying_why() {
        let mut p = pending(10000);
        p.settle(step(ChargeOutcome::Rejected {
            reason: "idempotency key reused".into(),
        }));
        assert_eq!(p.status, PaymentStatus::Failed);
        assert!(!p.is_settling());
    }

    #[test]
    fn a_voided_charge_is_canceled_with_its_refund() {
        let mut p = pending(10000);
        assert_eq!(p.cancel(VoidOutcome::NothingCharged), None);
        assert_eq!(p.status, PaymentStatus::Canceled);

        let mut p = pending(10000);
        let unknown = VoidOutcome::Unknown {
            reason: "reset".into(),
            attempts: 3,
        };
        assert_eq!(p.cancel(unknown), None);
        assert!(p.canceling && p.is_settling());
        let refund = p
            .cancel(VoidOutcome::Refunded {
                charge_id: "ch_1".into(),
                refund_id: "re_1".into(),
                at: Timestamp::now(),
            })
            .unwrap();
        assert_eq!(p.status, PaymentStatus::Canceled);
        assert_eq!(p.charge_id.as_deref(), Some("ch_1"));
        assert_eq!(p.amount_refunded, 10000, "the void refunded all of it");
        assert_eq!(
            (refund.amount, refund.status),
            (p.amount, RefundStatus::Completed)
        );
        assert_eq!(PaymentResult::settled(&p).status, PaymentStatus::Canceled);
    }

    #[test]
    fn a_void_whose_refund_the_gateway_refused_leaves_the_payment_charged_saying_why() {
        let mut p = pending(10000);
        let refused = VoidOutcome::Refused {
            charge_id: "ch_1".into(),
            reason: "charge_already_refunded".into(),
        };
        assert_eq!(p.cancel(refused), None, "no refund of ours to store");
        assert_eq!(p.status, PaymentStatus::Completed);
        assert_eq!(p.charge_id.as_deref(), Some("ch_1"));
        assert!(!p.canceling && !p.is_settling(), "settled: no more rounds");
        let why = p.error_msg.as_deref().unwrap();
        assert!(
            why.contains("ch_1") && why.contains("charge_already_refunded"),
            "{why}"
        );
        // Charged: a refund can still be asked for (the gateway says what it makes of it).
        assert!(p.refundable_amount(RefundAmount::Full, 0).is_ok());
    }

    #[test]
    fn duplicate_answers_the_stored_outcome() {
        let p = completed(10000);
        let r = PaymentResult::already_processed(&p);
        assert_eq!(r.message, MSG_ALREADY_PROCESSED);
        assert_eq!(r.charge_id.as_deref(), Some("ch_1"));
        assert_eq!(r.status, PaymentStatus::Completed);
    }

    #[test]
    fn a_retry_must_match_what_moves_money() {
        let p = completed(10000);
        assert_eq!(p.check_retry(&request(10000)), Ok(()));
        let relabelled = NewPayment {
            description: "another label".into(),
            ..request(10000)
        };
        assert_eq!(p.check_retry(&relabelled), Ok(()));

        let other = NewPayment {
            currency: Currency::parse("EUR").unwrap(),
            customer_id: "cust-eve".into(),
            ..request(999)
        };
        let err = p.check_retry(&other).unwrap_err();
        assert_eq!(
            err,
            PaymentError::Conflict {
                payment_id: "payment-001".into(),
                fields: vec!["amount", "currency", "customerId"],
            }
        );
        assert!(
            err.to_string()
                .contains("different amount, currency, customerId"),
            "{err}"
        );
    }

    #[test]
    fn refund_only_of_completed_payments() {
        for status in [
            PaymentStatus::Pending,
            PaymentStatus::Failed,
            PaymentStatus::Refunded,
            PaymentStatus::Canceled,
        ] {
            let mut p = pending(10000);
            p.status = status;
            let err = p.refundable_amount(RefundAmount::Full, 0).unwrap_err();
            assert!(err.to_string().contains(status.as_str()), "{err}");
            assert!(matches!(err, PaymentError::NotRefundable { .. }));
        }
    }

    #[test]
    fn refund_amounts_are_bounded_by_the_payment() {
        let p = completed(10000);
        let amount = |n| RefundAmount::Partial(Amount::new(n).unwrap());
        assert_eq!(
            p.refundable_amount(RefundAmount::Full, 0)
                .unwrap()
                .minor_units(),
            10000
        );
        assert_eq!(
            p.refundable_amount(amount(2500), 0).unwrap().minor_units(),
            2500
        );
        assert_eq!(
            p.refundable_amount(amount(10000), 0).unwrap().minor_units(),
            10000
        );
        let err = p.refundable_amount(amount(10001), 0).unwrap_err();
        assert!(matches!(err, PaymentError::InvalidRequest(_)), "{err}");
    }

    #[test]
    fn refunds_in_parts_never_exceed_the_payment_and_say_what_is_left() {
        let id = PaymentId::parse("payment-001").unwrap();
        let mut p = completed(10000);
        let amount = |n| RefundAmount::Partial(Amount::new(n).unwrap());
        let first = p.refundable_amount(amount(3000), 0).unwrap();
        let r1 = p
            .add_keyed_refund(&id, "a".into(), first, "part".into())
            .unwrap();
        assert_eq!(r1.gateway_key.as_deref(), Some("refund:payment-001:r1"));
        assert_eq!(p.keyed_refund("a"), Some(&r1));
        // Pending, it holds its amount: with the payment's one refund pending for 2000 besides,
        // 5000 is left.
        let err = p.refundable_amount(amount(5001), 2000).unwrap_err();
        assert!(
            matches!(err, PaymentError::RefundExceedsBalance { left: 5000, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("5000 of the 10000 charged"),
            "{err}"
        );
        assert_eq!(
            p.refundable_amount(RefundAmount::Full, 2000)
                .unwrap()
                .minor_units(),
            5000
        );

        let mut made = r1.clone();
        made.settle("re_1".into(), Timestamp::now());
        p.put_keyed_refund(made);
        p.mark_refunded(first);
        assert_eq!(p.status, PaymentStatus::PartiallyRefunded);
        assert_eq!(p.amount_refunded, 3000);
        let rest = p.refundable_amount(RefundAmount::Full, 0).unwrap();
        assert_eq!(rest.minor_units(), 7000);
        let r2 = p
            .add_keyed_refund(&id, "b".into(), rest, "rest".into())
            .unwrap();
        assert_eq!(r2.gateway_key.as_deref(), Some("refund:payment-001:r2"));
        p.mark_refunded(rest);
        assert_eq!(p.status, PaymentStatus::Refunded);
        let err = p.refundable_amount(amount(1), 0).unwrap_err();
        assert!(matches!(err, PaymentError::NotRefundable { .. }), "{err}");

        // A refused refund is dropped; its gateway number is not used again.
        let mut q = completed(10000);
        q.add_keyed_refund(&id, "x".into(), first, String::new())
            .unwrap();
        q.drop_keyed_refund("x");
        assert!(q.keyed_refund("x").is_none());
        let again = q
            .add_keyed_refund(&id, "x".into(), first, String::new())
            .unwrap();
        assert_eq!(again.gateway_key.as_deref(), Some("refund:payment-001:r2"));
    }

    #[test]
    fn a_payment_has_at_most_max_keyed_refunds() {
        let id = PaymentId::parse("payment-001").unwrap();
        let mut p = completed(10000);
        let one = Amount::new(1).unwrap();
        for i in 0..MAX_KEYED_REFUNDS {
            p.add_keyed_refund(&id, format!("k{i}"), one, String::new())
                .unwrap();
        }
        let err = p
            .add_keyed_refund(&id, "one-more".into(), one, String::new())
            .unwrap_err();
        assert!(matches!(err, PaymentError::TooManyRefunds { .. }), "{err}");
    }

    #[test]
    fn stored_json_is_camel_case_and_omits_empty_fields() {
        let p = pending(10000);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["paymentId"], "payment-001");
        assert_eq!(json["customerId"], "cust-alice");
        assert_eq!(json["status"], "pending");
        assert_eq!(json["amount"], 10000);
        assert!(json.get("chargeId").is_none());
        assert!(json.get("createdAt").is_none());
        assert!(json.get("completedAt").is_none());
        assert!(json.get("errorMsg").is_none());
        let back: Payment = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn settling_takes_created_at_from_the_charge_step() {
        let mut p = pending(10000);
        let started_at = Timestamp::now();
        p.settle(ChargeStep {
            started_at,
            result: ChargeOutcome::Declined {
                reason: "insufficient funds".into(),
            },
        });
        assert_eq!(p.created_at, Some(started_at));

        // A pending payment stored with a `createdAt` (by a version that read the clock in a
        // step of its own before the charge) keeps it.
        let mut resumed = pending(10000);
        let first = Timestamp::now();
        resumed.created_at = Some(first);
        resumed.settle(step(ChargeOutcome::Rejected {
            reason: "gateway rejected".into(),
        }));
        assert_eq!(resumed.created_at, Some(first));
    }

    #[test]
    fn charge_step_round_trips() {
        let s = step(ChargeOutcome::Charged {
            charge_id: "ch_1".into(),
            at: Timestamp::now(),
        });
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"outcome\":\"charged\""), "{json}");
        assert!(
            json.contains(&format!("\"startedAt\":{}", s.started_at.unix_millis())),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ChargeStep>(&json).unwrap(), s);

        // Every outcome reads back as written (the reader is not the derived one).
        let at = Timestamp::now();
        for result in [
            ChargeOutcome::Authorized {
                charge_id: "pi_1".into(),
                at,
            },
            ChargeOutcome::Declined {
                reason: "insufficient funds".into(),
            },
            ChargeOutcome::Rejected {
                reason: "bad key".into(),
            },
            ChargeOutcome::NotCharged {
                reason: "no charge".into(),
            },
            ChargeOutcome::Processing {
                charge_id: "pi_2".into(),
                awaiting: Awaiting::RequiresAction,
                at,
            },
            ChargeOutcome::Unknown {
                reason: "timeout".into(),
                attempts: 3,
            },
        ] {
            let s = step(result);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(
                serde_json::from_str::<ChargeStep>(&json).unwrap(),
                s,
                "{json}"
            );
        }
        // What is not a charge step is refused, not read as one.
        for json in [
            r#"{"startedAt":1,"outcome":"charged","at":1}"#,
            r#"{"startedAt":1,"outcome":"unknown","reason":"x"}"#,
            r#"{"startedAt":1,"outcome":"refunded","reason":"x"}"#,
            r#"{"outcome":"declined","reason":"x"}"#,
        ] {
            assert!(serde_json::from_str::<ChargeStep>(json).is_err(), "{json}");
        }
    }

    fn held(amount: u64) -> Payment {
        let mut p = pending(amount);
        p.capture = CaptureMethod::Manual;
        p.settle(step(ChargeOutcome::Authorized {
            charge_id: "pi_1".into(),
            at: Timestamp::now(),
        }));
        p
    }

    fn hold_step(result: HoldOutcome) -> HoldStep {
        HoldStep {
            started_at: Timestamp::now(),
            result,
        }
    }

    #[test]
    fn a_hold_is_captured_or_released_once_and_each_refuses_the_other_while_pending() {
        let mut p = held(10000);
        assert_eq!(p.status, PaymentStatus::Authorized);
        assert_eq!(p.charged_amount(), 0);
        let capture = p.request_capture(Amount::new(6000).ok()).unwrap();
        assert_eq!(
            capture,
            HoldRequest::Run(HoldAction::Capture {
                amount: Amount::new(6000).unwrap()
            })
        );
        // While the capture is unsettled: a cancel is refused, a capture resumes it as asked.
        assert!(matches!(
            p.request_void(REASON_HOLD_CANCELED),
            Err(PaymentError::HoldBusy { .. })
        ));
        assert_eq!(p.request_capture(None).unwrap(), capture);
        p.settle_hold(hold_step(HoldOutcome::Unknown {
            reason: "timeout".into(),
            attempts: 3,
        }))
        .unwrap();
        assert_eq!(p.status, PaymentStatus::Authorized);
        assert_eq!(p.hold_action.as_ref().map(|h| h.attempts), Some(3));

        p.settle_hold(hold_step(HoldOutcome::Captured {
            amount: 6000,
            at: Timestamp::now(),
        }))
        .unwrap();
        assert_eq!(p.status, PaymentStatus::Completed);
        assert_eq!(p.charged_amount(), 6000);
        assert_eq!(p.request_capture(None).unwrap(), HoldRequest::Done);
        assert!(matches!(
            p.request_void(REASON_HOLD_CANCELED),
            Err(PaymentError::NotAuthorized {
                status: PaymentStatus::Completed,
                ..
            })
        ));
        // Refunds stop at the capture.
        assert!(matches!(
            p.refundable_amount(RefundAmount::Partial(Amount::new(6001).unwrap()), 0),
            Err(PaymentError::InvalidRequest(_))
        ));
        assert_eq!(
            p.refundable_amount(RefundAmount::Full, 0)
                .unwrap()
                .minor_units(),
            6000
        );
    }

    #[test]
    fn a_hold_released_or_gone_is_canceled_and_a_refusal_leaves_it_held() {
        let mut p = held(500);
        assert!(matches!(
            p.request_capture(Amount::new(501).ok()),
            Err(PaymentError::CaptureExceedsHold { .. })
        ));
        assert!(p.hold_action.is_none());
        p.request_void(REASON_HOLD_EXPIRED).unwrap();
        assert!(matches!(
            p.request_capture(None),
            Err(PaymentError::HoldBusy { .. })
        ));
        let refused = p.settle_hold(hold_step(HoldOutcome::Rejected {
            reason: "no".into(),
        }));
        assert!(matches!(refused, Err(PaymentError::HoldRejected { .. })));
        assert_eq!(p.status, PaymentStatus::Authorized);
        assert!(p.hold_action.is_none());

        p.request_void(REASON_HOLD_EXPIRED).unwrap();
        p.settle_hold(hold_step(HoldOutcome::Voided)).unwrap();
        assert_eq!(p.status, PaymentStatus::Canceled);
        assert_eq!(p.error_msg.as_deref(), Some(REASON_HOLD_EXPIRED));
        assert_eq!(
            p.request_void(REASON_HOLD_CANCELED).unwrap(),
            HoldRequest::Done
        );

        let mut gone = held(500);
        gone.request_capture(None).unwrap();
        gone.settle_hold(hold_step(HoldOutcome::Gone {
            reason: "released at the gateway".into(),
        }))
        .unwrap();
        assert_eq!(gone.status, PaymentStatus::Canceled);

        // Without manual capture there is no hold to act on.
        let mut auto = pending(500);
        auto.settle(step(ChargeOutcome::Charged {
            charge_id: "ch_1".into(),
            at: Timestamp::now(),
        }));
        let refused = auto.request_capture(None).unwrap_err().to_string();
        assert!(refused.contains("no hold"), "{refused}");
    }

    #[test]
    fn a_gateway_event_settles_only_what_waits_on_it() {
        let event = |kind| GatewayEvent {
            event_id: "evt_1".into(),
            charge_id: "pi_1".into(),
            at: Timestamp::now(),
            kind,
        };
        let succeeded = event(GatewayEventKind::Succeeded {
            amount_received: 700,
        });
        assert!(matches!(
            succeeded.charge_outcome(CaptureMethod::Automatic),
            Some(ChargeOutcome::Charged { charge_id, .. }) if charge_id == "pi_1"
        ));
        // A hold's money taken is a capture, not a charge settled.
        assert_eq!(succeeded.charge_outcome(CaptureMethod::Manual), None);
        let capture = HoldAction::Capture {
            amount: Amount::new(700).unwrap(),
        };
        assert!(matches!(
            succeeded.hold_outcome(&capture),
            Some(HoldOutcome::Captured { amount: 700, .. })
        ));
        let authorized = event(GatewayEventKind::Authorized);
        assert!(matches!(
            authorized.charge_outcome(CaptureMethod::Manual),
            Some(ChargeOutcome::Authorized { .. })
        ));
        assert_eq!(authorized.charge_outcome(CaptureMethod::Automatic), None);
        let failed = event(GatewayEventKind::Failed {
            reason: "insufficient funds".into(),
        });
        assert!(matches!(
            failed.charge_outcome(CaptureMethod::Automatic),
            Some(ChargeOutcome::Declined { reason }) if reason == "insufficient funds"
        ));
        // A cancel decides nothing of a charge (the service's own voids cancel intents).
        let canceled = event(GatewayEventKind::Canceled);
        assert_eq!(canceled.charge_outcome(CaptureMethod::Automatic), None);
        assert_eq!(canceled.hold_outcome(&capture), None);
        let void = HoldAction::Void {
            reason: REASON_HOLD_CANCELED.into(),
        };
        assert_eq!(canceled.hold_outcome(&void), Some(HoldOutcome::Voided));
    }
}
