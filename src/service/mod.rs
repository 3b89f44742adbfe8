//! The Restate virtual object `PaymentService`, keyed by payment ID.
//!
//! Handlers are thin: they read state, call the domain ([`crate::payment`]), run the gateway
//! inside journaled steps, and write state back. Restate runs at most one exclusive handler
//! (`CreatePayment`, `RefundPayment`) per payment at a time, so concurrent duplicates queue up
//! and each finds what the first one stored.
//!
//! `CreatePayment`'s journal for a new payment, step by step (the seed's shape):
//!
//! | # | entry               | why                                                         |
//! |---|---------------------|-------------------------------------------------------------|
//! | 1 | get state `payment` | deduplication: a stored payment is answered as it is        |
//! | 2 | set state `payment` | `pending`, visible to `GetPayment` while the charge runs     |
//! | 3 | run `charge`        | the gateway call with key `charge:<id>`; its result carries  |
//! |   |                     | both clock readings, `createdAt` and `completedAt`          |
//! | 4 | set state `payment` | `completed`, `failed`, `authorized` (a hold), or still       |
//! |   |                     | `pending` (outcome unknown, or accepted to settle later)    |
//! | 5 | run `receipt`       | the seed's receipt, only after a successful charge          |
//! |   | or send `Settle`    | a delayed call to this object, when the outcome is unknown   |
//! |   |                     | (or at `confirmBy`, when the gateway settles it later)       |
//! |   | or send `ExpireHold`| a hold: the delayed call that releases it at its window's end |
//!
//! A duplicate is step 1 and nothing else. A charge whose outcome stays unknown after the
//! step's few attempts (a timeout, a reset, a 5xx) is never taken for a refusal: the payment stays
//! `pending` and `Settle`, a handler only the object calls, tries again with the same key later,
//! backing off, then, once the key nears the end of the gateway's retention, looks the payment up
//! at the gateway. Waiting happens between invocations, so the payment's lock is free meanwhile
//! (`GetPayment` never waits on it anyway).
//!
//! A payment created with manual capture ends its charge `authorized`: the gateway holds the
//! money until `CapturePayment`, `CancelPayment` or the hold's window ends ([`hold`]).
//!
//! A charge the gateway accepts without a final word (Stripe's `processing`, `requires_action`)
//! stays `pending` with its intent (`awaiting`, `confirmBy`): the gateway's webhook settles it
//! (`Confirm`), or at `confirmBy` a `Settle` looks the intent up, cancelling one still waiting on
//! its customer.
//!
//! An invocation cancelled by an operator while the charge is unsettled voids the charge
//! (`void`: the key spent on a request that moves no money, or the charge refunded) and ends
//! `canceled`. A refund is stored `pending` before the gateway is called and, whatever cuts it
//! off (a crash, a cancel, an unknown answer), resumes with the same amount and key. Every `ctx.run` is a durable round trip to
//! restate-server, so no step reads the clock on its own: the pending record has no
//! `createdAt` until the charge step records it.

mod body;
mod hold;
mod settle;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use restate_sdk::prelude::*;
use tracing::{debug, error, info, warn};

use crate::gateway::{
    Attempted, Awaiting, ChargeLookup, ChargeRequest, ChargeResponse, GatewayError, PaymentGateway,
    RefundRequest as GatewayRefund, VoidHoldRequest, VoidRequest, VoidResponse, void_as_found,
    with_retries,
};
use crate::payment::{
    CaptureMethod, CapturePaymentBody, ChargeOutcome, ChargeStep, CreatePaymentBody, GatewayEvent,
    NewPayment, NoInput, Payment, PaymentError, PaymentId, PaymentResult, PaymentStatus, Refund,
    RefundOutcome, RefundPaymentBody, RefundRequest, RefundStatus, RefundStep, Timestamp,
    VoidOutcome,
};

pub use body::JsonBody;
pub use settle::{SettlePolicy, SettleRound};
pub use webhook::{StripeEventBody, StripeWebhooks, WebhookReceipt};

/// State key of the stored [`Payment`].
pub const STATE_PAYMENT: &str = "payment";
/// State key of the stored [`Refund`].
pub const STATE_REFUND: &str = "refund";

/// The one mapping from domain errors to what the client sees. Terminal: a business error is
/// the same on every retry, so Restate must not retry it.
impl From<PaymentError> for TerminalError {
    fn from(error: PaymentError) -> Self {
        let code = match &error {
            PaymentError::InvalidRequest(_) => 400,
            PaymentError::NotFound { .. } => 404,
            // The IETF Idempotency-Key draft's code for a key reused with another payload (its
            // 409 means "the first request is still running", which Restate's queue absorbs).
            PaymentError::Conflict { .. } => 422,
            PaymentError::NotRefundable { .. }
            | PaymentError::RefundRejected { .. }
            | PaymentError::RefundExceedsBalance { .. }
            | PaymentError::TooManyRefunds { .. }
            | PaymentError::NotAuthorized { .. }
            | PaymentError::HoldBusy { .. }
            | PaymentError::CaptureExceedsHold { .. }
            | PaymentError::HoldRejected { .. } => 409,
            // Terminal all the same: a retry would decode the same bytes, forever, holding the
            // payment's lock.
            PaymentError::CorruptState { .. } => 500,
        };
        TerminalError::new_with_code(code, error.to_string())
    }
}

/// Whether an error from an await is the invocation being cancelled (the SDK's 409 "cancelled").
fn is_cancel(error: &TerminalError) -> bool {
    error.code() == 409 && error.message() == "cancelled"
}

/// The payment service: one virtual object per payment ID.
///
/// The client-facing handlers that act (`CreatePayment`, `RefundPayment`, `CapturePayment`,
/// `CancelPayment`) keep the answers of requests sent with an `idempotency-key` header for 7 days (Restate's default is 1 day; Stripe keeps keys 24 hours):
/// long enough for a client's retry queue to drain over a weekend. The payment itself is
/// deduplicated by its ID for as long as it is stored, key or no key.
pub struct PaymentService {
    gateway: Arc<dyn PaymentGateway>,
    policy: SettlePolicy,
    hold_expiry: Duration,
}

/// How long a hold waits for its capture by default: Stripe's card holds last 7 days.
pub const DEFAULT_HOLD_EXPIRY: Duration = Duration::from_secs(7 * 24 * 60 * 60);

impl PaymentService {
    /// `hold_expiry`: how long after it is placed a hold not captured is released.
    pub fn new(
        gateway: Arc<dyn PaymentGateway>,
        policy: SettlePolicy,
        hold_expiry: Duration,
    ) -> Self {
        Self {
            gateway,
            policy,
            hold_expiry,
        }
    }
}

#[restate_sdk::object(name = "PaymentService")]
impl PaymentService {
    /// Creates and charges a payment, once per payment ID.
    #[handler(name = "CreatePayment", idempotency_retention = "7 days")]
    async fn create_payment(
        &self,
        mut ctx: ObjectContext<'_>,
        body: JsonBody<CreatePaymentBody>,
    ) -> Result<Json<PaymentResult>, TerminalError> {
        let payment_id = ctx.key().to_owned();
        answered(&payment_id, self.create(&mut ctx, body).await)
    }

    /// The stored payment, read-only.
    #[handler(name = "GetPayment")]
    async fn get_payment(
        &self,
        ctx: SharedObjectContext<'_>,
        body: JsonBody<NoInput>,
    ) -> Result<Json<Payment>, TerminalError> {
        if let Err(e) = NoInput::parse(body.as_bytes()) {
            let result = Err(e.into());
            log_refusal(ctx.key(), &result);
            return result;
        }
        let result = match ctx.get(STATE_PAYMENT).await {
            Ok(stored) => match decode::<Payment>(ctx.key(), STATE_PAYMENT, stored) {
                // Never charged: no refund to list.
                Ok(Some(payment))
                    if matches!(
                        payment.status,
                        PaymentStatus::Pending | PaymentStatus::Failed | PaymentStatus::Authorized
                    ) =>
                {
                    Ok(Json(payment))
                }
                // Its refunds listed, the payment's one (or a cancel's) first.
                Ok(Some(mut payment)) => match ctx.get(STATE_REFUND).await {
                    Ok(refund) => match decode::<Refund>(ctx.key(), STATE_REFUND, refund) {
                        Ok(refund) => {
                            payment.refunds.splice(0..0, refund);
                            Ok(Json(payment))
                        }
                        Err(e) => Err(e.into()),
                    },
                    Err(e) => Err(e),
                },
                Ok(None) => Err(PaymentError::NotFound {
                    payment_id: ctx.key().to_owned(),
                }
                .into()),
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e),
        };
        log_refusal(ctx.key(), &result);
        result
    }

    /// Refunds a completed payment, once per payment ID.
    #[handler(name = "RefundPayment", idempotency_retention = "7 days")]
    async fn refund_payment(
        &self,
        mut ctx: ObjectContext<'_>,
        body: JsonBody<RefundPaymentBody>,
    ) -> Result<Json<Refund>, TerminalError> {
        let payment_id = ctx.key().to_owned();
        answered(&payment_id, self.refund(&mut ctx, body).await)
    }

    /// Captures the hold of an authorized payment, in full or in part, once.
    #[handler(name = "CapturePayment", idempotency_retention = "7 days")]
    async fn capture_payment(
        &self,
        mut ctx: ObjectContext<'_>,
        body: JsonBody<CapturePaymentBody>,
    ) -> Result<Json<Payment>, TerminalError> {
        let payment_id = ctx.key().to_owned();
        answered(&payment_id, self.capture(&mut ctx, body).await)
    }

    /// Releases the hold of an authorized payment, taking nothing.
    #[handler(name = "CancelPayment", idempotency_retention = "7 days")]
    async fn cancel_payment(
        &self,
        mut ctx: ObjectContext<'_>,
        body: JsonBody<NoInput>,
    ) -> Result<Json<Payment>, TerminalError> {
        let payment_id = ctx.key().to_owned();
        answered(&payment_id, self.cancel(&mut ctx, body).await)
    }

    /// Settles the payment from a verified gateway event (`StripeWebhooks` calls it, once per
    /// event ID), if the payment is still waiting on what the event says.
    #[handler(name = "Confirm", ingress_private, idempotency_retention = "7 days")]
    async fn confirm(
        &self,
        mut ctx: ObjectContext<'_>,
        event: Json<GatewayEvent>,
    ) -> Result<(), TerminalError> {
        let payment_id = ctx.key().to_owned();
        let result = self.confirm_event(&mut ctx, event.into_inner()).await;
        log_refusal(&payment_id, &result);
        result
    }

    /// Releases a hold still not captured when its window ends. Only the object calls it (a
    /// delayed call to itself, sent when the hold is placed), never a client.
    #[handler(name = "ExpireHold", ingress_private)]
    async fn expire_hold(&self, mut ctx: ObjectContext<'_>) -> Result<(), TerminalError> {
        let payment_id = ctx.key().to_owned();
        let result = self.expire(&mut ctx).await;
        log_refusal(&payment_id, &result);
        result
    }

    /// Settles a charge or a refund whose outcome stayed unknown. Only the object calls it (a
    /// delayed call to itself), never a client.
    #[handler(name = "Settle", ingress_private)]
    async fn settle(
        &self,
        mut ctx: ObjectContext<'_>,
        round: Json<SettleRound>,
    ) -> Result<(), TerminalError> {
        let Json(SettleRound { round }) = round;
        let payment_id = ctx.key().to_owned();
        let result = self.settle_round(&mut ctx, round).await;
        log_refusal(&payment_id, &result);
        result
    }
}

impl PaymentService {
    async fn create(
        &self,
        ctx: &mut ObjectContext<'_>,
        body: JsonBody<CreatePaymentBody>,
    ) -> Result<PaymentResult, TerminalError> {
        // Bad input is refused before anything is read or written, duplicate or not.
        let request = NewPayment::parse(body.as_bytes())?;
        let id = PaymentId::parse(ctx.key())?;

        let stored = decode::<Payment>(ctx.key(), STATE_PAYMENT, ctx.get(STATE_PAYMENT).await?)?;
        if let Some(stored) = &stored {
            stored.check_retry(&request)?;
        }
        let payment = match stored {
            Some(stored) if stored.status != PaymentStatus::Pending => {
                info!(payment_id = %id, status = %stored.status, "payment already processed");
                return Ok(PaymentResult::already_processed(&stored));
            }
            // `Settle` owns it: a duplicate answers at once, and charges nothing itself.
            Some(stored) if stored.is_settling() => {
                info!(payment_id = %id, attempts = stored.attempts, "payment pending, being settled");
                return Ok(PaymentResult::settled(&stored));
            }
            // Only an invocation stopped from outside leaves a payment pending with no attempt
            // recorded. Charging again is safe: the key makes the gateway answer the first
            // charge's result if there was one.
            Some(stored) => {
                warn!(payment_id = %id, "resuming a pending payment");
                stored
            }
            None => {
                debug!(
                    payment_id = %id,
                    amount = %request.amount,
                    currency = %request.currency,
                    customer_id = %request.customer_id.escape_debug(),
                    "creating payment"
                );
                let pending = Payment::pending(&id, request);
                set_state(ctx, STATE_PAYMENT, &pending);
                pending
            }
        };
        self.charge_and_store(ctx, &id, payment, 0).await
    }

    /// One charge step and what follows from it: the stored outcome, the receipt, or, unknown,
    /// the next `Settle` round. A cancellation during the step voids the charge.
    async fn charge_and_store(
        &self,
        ctx: &mut ObjectContext<'_>,
        id: &PaymentId,
        payment: Payment,
        round: u32,
    ) -> Result<PaymentResult, TerminalError> {
        let step = match self.charge(ctx, id, &payment).await {
            Ok(step) => step,
            Err(e) if is_cancel(&e) => {
                warn!(payment_id = %id, "cancelled during the charge: voiding it");
                // Boxed: only a cancel takes this path, and inline its state would make every
                // payment's future (allocated and moved whole) larger.
                Box::pin(self.void_and_store(ctx, id, payment, 0)).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.store_charge(ctx, id, payment, step, round).await
    }

    /// A charge step's result (from the step, or from a gateway event) stored, and what
    /// follows from it: the receipt, the hold's expiry timer, or the next `Settle` round.
    async fn store_charge(
        &self,
        ctx: &mut ObjectContext<'_>,
        id: &PaymentId,
        mut payment: Payment,
        step: ChargeStep,
        round: u32,
    ) -> Result<PaymentResult, TerminalError> {
        let was_accepted = payment.awaiting.is_some();
        let accepted_at = match &step.result {
            ChargeOutcome::Processing { at, .. } => Some(*at),
            _ => None,
        };
        payment.settle(step);
        let newly_accepted = !was_accepted && payment.awaiting.is_some();
        if newly_accepted {
            payment.confirm_by =
                accepted_at.and_then(|at| at.checked_add(self.policy.confirm_deadline));
        }
        if payment.status == PaymentStatus::Authorized {
            payment.hold_expires_at = payment
                .authorized_at
                .and_then(|at| at.checked_add(self.hold_expiry));
        }
        set_state(ctx, STATE_PAYMENT, &payment);

        match payment.status {
            PaymentStatus::Completed => {
                info!(
                    payment_id = %id,
                    amount = %payment.amount,
                    currency = %payment.currency,
                    customer_id = %payment.customer_id.escape_debug(),
                    charge_id = payment.charge_id.as_deref(),
                    "payment completed"
                );
                let (payment_id, customer_id) = (id.as_str(), payment.customer_id.as_str());
                ctx.run(|| async move {
                    // In production: an e-mail through a provider that takes an idempotency key.
                    debug!(%payment_id, customer_id = %customer_id.escape_debug(), "sending receipt");
                    Ok(())
                })
                .name("receipt")
                .await?;
            }
            PaymentStatus::Authorized => {
                let expires_at = payment.hold_expires_at.map(|at| at.to_string());
                info!(
                    payment_id = %id,
                    amount = %payment.amount,
                    currency = %payment.currency,
                    customer_id = %payment.customer_id.escape_debug(),
                    charge_id = payment.charge_id.as_deref(),
                    hold_expires_at = expires_at.as_deref(),
                    "payment authorized: held until captured, canceled or expired"
                );
                ctx.object_client::<PaymentServiceClient>(id.as_str())
                    .expire_hold()
                    .send_after(self.hold_expiry);
            }
            PaymentStatus::Pending if newly_accepted => {
                let confirm_by = payment.confirm_by.map(|at| at.to_string());
                info!(
                    payment_id = %id,
                    charge_id = payment.charge_id.as_deref(),
                    awaiting = payment.awaiting.map(Awaiting::as_str),
                    confirm_by = confirm_by.as_deref(),
                    "charge accepted without a final word: pending until the gateway's webhook, or the look-up at its deadline"
                );
                ctx.object_client::<PaymentServiceClient>(id.as_str())
                    .settle(Json(SettleRound { round: 0 }))
                    .send_after(self.policy.confirm_deadline);
            }
            PaymentStatus::Pending if payment.awaiting.is_some() => {
                info!(
                    payment_id = %id,
                    charge_id = payment.charge_id.as_deref(),
                    awaiting = payment.awaiting.map(Awaiting::as_str),
                    "charge still not settled at the gateway: looked up again later"
                );
                self.schedule(ctx, id, round);
            }
            PaymentStatus::Pending => {
                warn!(
                    payment_id = %id,
                    attempts = payment.attempts,
                    last_error = payment.last_error.as_deref(),
                    "charge outcome unknown: pending, settled later"
                );
                self.schedule(ctx, id, round);
            }
            _ => warn!(
                payment_id = %id,
                customer_id = %payment.customer_id.escape_debug(),
                error = payment.error_msg.as_deref(),
                "payment failed"
            ),
        }
        Ok(PaymentResult::settled(&payment))
    }

    /// The charge, as one journaled step: its outcome and both clock readings are recorded
    /// once and replayed as recorded. While the key is safe to send, the step charges with it;
    /// past that, it looks the payment up.
    async fn charge(
        &self,
        ctx: &ObjectContext<'_>,
        id: &PaymentId,
        payment: &Payment,
    ) -> Result<ChargeStep, TerminalError> {
        let request = charge_request(id, payment);
        let (gateway, policy) = (Arc::clone(&self.gateway), self.policy);
        let first = payment.created_at;
        // Accepted without a final word: the key's replay would answer that first word again,
        // so the charge is looked at as it stands now.
        let accepted = payment.charge_id.clone().zip(payment.awaiting);
        let (confirm_by, cancel_key) = (payment.confirm_by, id.unconfirmed_cancel_key());
        let Json(step) = ctx
            .run(|| async move {
                let started_at = Timestamp::now();
                let payment_id = request.payment_id.as_str();
                // A first charge is always sent: the look-up is only for a key sent before.
                let key_alive = first.is_none_or(|first| policy.key_alive(first, started_at));
                let result = if let Some((charge_id, _)) = accepted {
                    let past_deadline = confirm_by.is_none_or(|by| started_at >= by);
                    check_accepted(&*gateway, policy, payment_id, charge_id, past_deadline, cancel_key).await
                } else if key_alive {
                    debug!(%payment_id, idempotency_key = %request.idempotency_key, "charging through the gateway");
                    let Attempted { result, attempts } =
                        with_retries(policy.retry, payment_id, "charge", || {
                            gateway.charge(request.clone())
                        })
                        .await;
                    match result {
                        Ok(ChargeResponse::Succeeded { charge_id }) => ChargeOutcome::Charged {
                            charge_id,
                            at: Timestamp::now(),
                        },
                        Ok(ChargeResponse::Authorized { charge_id }) => {
                            ChargeOutcome::Authorized {
                                charge_id,
                                at: Timestamp::now(),
                            }
                        }
                        Ok(ChargeResponse::Declined { reason }) => {
                            ChargeOutcome::Declined { reason }
                        }
                        Ok(ChargeResponse::Processing {
                            charge_id,
                            awaiting,
                        }) => ChargeOutcome::Processing {
                            charge_id,
                            awaiting,
                            at: Timestamp::now(),
                        },
                        Err(GatewayError::Rejected(reason)) => ChargeOutcome::Rejected { reason },
                        Err(GatewayError::Unknown(reason)) => {
                            ChargeOutcome::Unknown { reason, attempts }
                        }
                    }
                } else {
                    info!(%payment_id, "the charge's key nears its expiry: looking the payment up");
                    let Attempted { result, attempts } =
                        with_retries(policy.retry, payment_id, "find charge", || {
                            gateway.find_charge(payment_id)
                        })
                        .await;
                    lookup_outcome(result, attempts)
                };
                Ok(Json(ChargeStep { started_at, result }))
            })
            .name("charge")
            .await?;
        Ok(step)
    }

    /// Voids the charge of a cancelled payment and stores what that did: `canceled`, or, if
    /// the void's outcome is unknown too, still pending and `canceling`, with a `Settle` round.
    async fn void_and_store(
        &self,
        ctx: &mut ObjectContext<'_>,
        id: &PaymentId,
        mut payment: Payment,
        round: u32,
    ) -> Result<(), TerminalError> {
        let outcome = match self.void(ctx, id, &payment).await {
            Ok(outcome) => outcome,
            // Cancelled again before the void ran: it is tried again shortly.
            Err(e) if is_cancel(&e) => {
                payment.canceling = true;
                ctx.set(STATE_PAYMENT, Json(payment));
                self.schedule(ctx, id, round);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if let Some(refund) = payment.cancel(outcome) {
            ctx.set(STATE_REFUND, Json(refund));
        }
        set_state(ctx, STATE_PAYMENT, &payment);
        if payment.status == PaymentStatus::Pending {
            warn!(payment_id = %id, last_error = payment.last_error.as_deref(), "void outcome unknown: settled later");
            self.schedule(ctx, id, round);
        } else if payment.status == PaymentStatus::Completed {
            error!(payment_id = %id, charge_id = payment.charge_id.as_deref(), error = payment.error_msg.as_deref(), "cancel failed: the gateway refused the refund, the charge stands");
        } else {
            info!(payment_id = %id, charge_id = payment.charge_id.as_deref(), error = payment.error_msg.as_deref(), "payment canceled");
        }
        Ok(())
    }

    /// The void, as one journaled step. Past the key's safe window, a look-up decides: a
    /// charge found is refunded (a second refund of it would exceed the charge, so the refund's
    /// own key expiring cannot refund twice).
    async fn void(
        &self,
        ctx: &ObjectContext<'_>,
        id: &PaymentId,
        payment: &Payment,
    ) -> Result<VoidOutcome, TerminalError> {
        let request = VoidRequest {
            charge: charge_request(id, payment),
            refund_key: id.void_refund_key(),
        };
        let (gateway, policy) = (Arc::clone(&self.gateway), self.policy);
        let first = payment.created_at;
        let Json(outcome) = ctx
            .run(|| async move {
                let now = Timestamp::now();
                let payment_id = request.charge.payment_id.as_str();
                let voided = if first.is_none_or(|first| policy.key_alive(first, now)) {
                    with_retries(policy.retry, payment_id, "void", || {
                        gateway.void(request.clone())
                    })
                    .await
                } else {
                    void_by_lookup(&*gateway, policy, &request).await
                };
                let Attempted { result, attempts } = voided;
                Ok(Json(match result {
                    Ok(VoidResponse::NothingCharged) => VoidOutcome::NothingCharged,
                    Ok(VoidResponse::Refunded {
                        charge_id,
                        refund_id,
                    }) => VoidOutcome::Refunded {
                        charge_id,
                        refund_id,
                        at: Timestamp::now(),
                    },
                    Ok(VoidResponse::RefundRefused { charge_id, reason }) => {
                        VoidOutcome::Refused { charge_id, reason }
                    }
                    Err(e) => VoidOutcome::Unknown {
                        reason: e.to_string(),
                        attempts,
                    },
                }))
            })
            .name("void")
            .await?;
        Ok(outcome)
    }

    async fn refund(
        &self,
        ctx: &mut ObjectContext<'_>,
        body: JsonBody<RefundPaymentBody>,
    ) -> Result<Refund, TerminalError> {
        let request = RefundRequest::parse(body.as_bytes())?;
        let stored = decode::<Refund>(ctx.key(), STATE_REFUND, ctx.get(STATE_REFUND).await?)?;
        // The seed's path: the payment's one refund answers every repeat, whatever it asks.
        if request.refund_key.is_none()
            && let Some(answer) = settled_or_settling(ctx.key(), stored.as_ref())
        {
            return Ok(answer);
        }
        let Some(mut payment) =
            decode::<Payment>(ctx.key(), STATE_PAYMENT, ctx.get(STATE_PAYMENT).await?)?
        else {
            return Err(PaymentError::NotFound {
                payment_id: ctx.key().to_owned(),
            }
            .into());
        };
        let id = PaymentId::parse(&payment.payment_id)?;
        let (refund, slot) = match request.refund_key {
            None => {
                let refund = match stored {
                    // Cut off before its outcome was stored: it resumes as first requested.
                    Some(refund) => {
                        warn!(payment_id = %id, amount = %refund.amount, "resuming a pending refund");
                        refund
                    }
                    None => {
                        let amount = payment.refundable_amount(request.amount, 0)?;
                        debug!(payment_id = %id, %amount, reason = %request.reason.escape_debug(), "refunding payment");
                        let refund = Refund::pending(amount, request.reason);
                        set_state(ctx, STATE_REFUND, &refund);
                        refund
                    }
                };
                (refund, RefundSlot::One)
            }
            Some(key) => match payment.keyed_refund(&key) {
                Some(existing) => {
                    if let Some(answer) = settled_or_settling(id.as_str(), Some(existing)) {
                        return Ok(answer);
                    }
                    warn!(payment_id = %id, refund_key = %key, amount = %existing.amount, "resuming a pending refund");
                    (existing.clone(), RefundSlot::Keyed(key))
                }
                None => {
                    // The payment's one refund, while pending, holds its amount too.
                    let pending = stored
                        .filter(|r| r.status == RefundStatus::Pending)
                        .map_or(0, |r| r.amount.minor_units());
                    let amount = payment.refundable_amount(request.amount, pending)?;
                    debug!(payment_id = %id, refund_key = %key, %amount, reason = %request.reason.escape_debug(), "refunding payment in part");
                    let refund =
                        payment.add_keyed_refund(&id, key.clone(), amount, request.reason)?;
                    set_state(ctx, STATE_PAYMENT, &payment);
                    (refund, RefundSlot::Keyed(key))
                }
            },
        };
        self.refund_and_store(ctx, &id, payment, refund, slot, 0)
            .await
    }

    /// One refund step and what follows from it. A cancellation does not undo a refund (the
    /// money may be on its way back): the refund is settled by `Settle` with its key.
    async fn refund_and_store(
        &self,
        ctx: &mut ObjectContext<'_>,
        id: &PaymentId,
        mut payment: Payment,
        mut refund: Refund,
        slot: RefundSlot,
        round: u32,
    ) -> Result<Refund, TerminalError> {
        let step = match self.refund_step(ctx, id, &payment, &refund).await {
            Ok(step) => step,
            Err(e) if is_cancel(&e) => {
                warn!(payment_id = %id, "cancelled during the refund: it is settled later with its key");
                refund.attempts = refund.attempts.max(1);
                slot.store(ctx, &mut payment, &refund);
                self.schedule(ctx, id, round);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        refund.requested_at.get_or_insert(step.started_at);
        match step.result {
            RefundOutcome::Refunded { refund_id, at } => {
                refund.settle(refund_id, at);
                payment.mark_refunded(refund.amount);
                slot.put(ctx, &mut payment, &refund);
                info!(
                    payment_id = %id,
                    amount = %refund.amount,
                    amount_refunded = payment.amount_refunded,
                    status = %payment.status,
                    reason = %refund.reason.escape_debug(),
                    refund_id = refund.refund_id.as_deref(),
                    "refund completed"
                );
                ctx.set(STATE_PAYMENT, Json(payment));
                Ok(refund)
            }
            RefundOutcome::Rejected { reason } => {
                match &slot {
                    RefundSlot::One => {
                        ctx.clear(STATE_REFUND);
                        payment.spend_refund_key();
                    }
                    // Its gateway number is spent with it: a new request makes a new one.
                    RefundSlot::Keyed(key) => payment.drop_keyed_refund(key),
                }
                ctx.set(STATE_PAYMENT, Json(payment));
                Err(PaymentError::RefundRejected {
                    payment_id: id.as_str().to_owned(),
                    reason,
                }
                .into())
            }
            // The key expired with no refund made under it: the refund is still owed, under a
            // new key.
            RefundOutcome::NotRefunded => {
                warn!(payment_id = %id, "no refund under the expired key: trying a new one");
                match &slot {
                    RefundSlot::One => payment.spend_refund_key(),
                    RefundSlot::Keyed(_) => {
                        refund.gateway_key = Some(payment.next_refund_gateway_key(id));
                    }
                }
                refund.requested_at = None;
                slot.put(ctx, &mut payment, &refund);
                ctx.set(STATE_PAYMENT, Json(payment));
                self.schedule(ctx, id, round);
                Ok(refund)
            }
            RefundOutcome::Unknown { reason, attempts } => {
                refund.unknown(reason, attempts);
                slot.store(ctx, &mut payment, &refund);
                warn!(payment_id = %id, attempts = refund.attempts, last_error = refund.last_error.as_deref(), "refund outcome unknown: pending, settled later");
                self.schedule(ctx, id, round);
                Ok(refund)
            }
        }
    }

    /// The refund, as one journaled step; past the key's safe window, a look-up.
    async fn refund_step(
        &self,
        ctx: &ObjectContext<'_>,
        id: &PaymentId,
        payment: &Payment,
        refund: &Refund,
    ) -> Result<RefundStep, TerminalError> {
        let call = GatewayRefund {
            // Stored with a refund made with a refund key; the payment's one refund derives it.
            idempotency_key: match &refund.gateway_key {
                Some(key) => key.clone(),
                None => id.refund_key(payment.spent_refund_keys),
            },
            payment_id: id.as_str().to_owned(),
            charge_id: payment.charge_id.clone().unwrap_or_default(),
            amount: refund.amount.minor_units(),
        };
        let (gateway, policy) = (Arc::clone(&self.gateway), self.policy);
        let first = refund.requested_at;
        let Json(step) = ctx
            .run(|| async move {
                let started_at = Timestamp::now();
                let payment_id = call.payment_id.as_str();
                let key_alive = first.is_none_or(|first| policy.key_alive(first, started_at));
                let result = if key_alive {
                    debug!(%payment_id, idempotency_key = %call.idempotency_key, "refunding through the gateway");
                    let Attempted { result, attempts } =
                        with_retries(policy.retry, payment_id, "refund", || {
                            gateway.refund(call.clone())
                        })
                        .await;
                    match result {
                        Ok(r) => RefundOutcome::Refunded {
                            refund_id: r.refund_id,
                            at: Timestamp::now(),
                        },
                        Err(GatewayError::Rejected(reason)) => RefundOutcome::Rejected { reason },
                        Err(GatewayError::Unknown(reason)) => {
                            RefundOutcome::Unknown { reason, attempts }
                        }
                    }
                } else {
                    let Attempted { result, attempts } =
                        with_retries(policy.retry, payment_id, "find refund", || {
                            gateway.find_refund(&call)
                        })
                        .await;
                    match result {
                        Ok(Some(r)) => RefundOutcome::Refunded {
                            refund_id: r.refund_id,
                            at: Timestamp::now(),
                        },
                        Ok(None) => RefundOutcome::NotRefunded,
                        Err(e) => RefundOutcome::Unknown {
                            reason: e.to_string(),
                            attempts,
                        },
                    }
                };
                Ok(Json(RefundStep { started_at, result }))
            })
            .name("refund")
            .await?;
        Ok(step)
    }

    /// One `Settle` round: whatever of the payment is still unsettled, tried once more.
    async fn settle_round(
        &self,
        ctx: &mut ObjectContext<'_>,
        round: u32,
    ) -> Result<(), TerminalError> {
        let id = PaymentId::parse(ctx.key())?;
        let Some(payment) =
            decode::<Payment>(ctx.key(), STATE_PAYMENT, ctx.get(STATE_PAYMENT).await?)?
        else {
            return Ok(());
        };
        let next = round.saturating_add(1);
        if payment.status == PaymentStatus::Authorized
            && let Some(pending) = &payment.hold_action
        {
            info!(payment_id = %id, round, "settling the hold's capture or release");
            let action = pending.action.clone();
            return self
                .hold_and_store(ctx, &id, payment, action, next)
                .await
                .map(drop);
        }
        if payment.status == PaymentStatus::Pending {
            info!(payment_id = %id, round, canceling = payment.canceling, "settling the charge");
            if payment.canceling {
                return self.void_and_store(ctx, &id, payment, next).await;
            }
            return self
                .charge_and_store(ctx, &id, payment, next)
                .await
                .map(drop);
        }
        let refund = decode::<Refund>(ctx.key(), STATE_REFUND, ctx.get(STATE_REFUND).await?)?;
        if let Some(refund) = refund.filter(|r| r.status == RefundStatus::Pending) {
            info!(payment_id = %id, round, "settling the refund");
            return self
                .refund_and_store(ctx, &id, payment, refund, RefundSlot::One, next)
                .await
                .map(drop);
        }
        // One a round; each pending refund scheduled a round of its own.
        let keyed = payment
            .refunds
            .iter()
            .find(|r| r.status == RefundStatus::Pending)
            .cloned();
        match keyed {
            Some(refund) => {
                let key = refund.refund_key.clone().unwrap_or_default();
                info!(payment_id = %id, round, refund_key = %key, "settling the refund");
                self.refund_and_store(ctx, &id, payment, refund, RefundSlot::Keyed(key), next)
                    .await
                    .map(drop)
            }
            None => {
                debug!(payment_id = %id, status = %payment.status, "nothing left to settle");
                Ok(())
            }
        }
    }

    /// Sends `Settle` to this payment after round `round`'s pause, with jitter.
    fn schedule(&self, ctx: &mut ObjectContext<'_>, id: &PaymentId, round: u32) {
        let jitter: f64 = rand::RngExt::random(ctx.rand());
        let delay = self.policy.delay(round, jitter);
        debug!(payment_id = %id, round, ?delay, "scheduling Settle");
        ctx.object_client::<PaymentServiceClient>(id.as_str())
            .settle(Json(SettleRound { round }))
            .send_after(delay);
    }
}

fn charge_request(id: &PaymentId, payment: &Payment) -> ChargeRequest {
    ChargeRequest {
        idempotency_key: id.charge_key(),
        payment_id: id.as_str().to_owned(),
        amount: payment.amount.minor_units(),
        currency: payment.currency.as_str().to_owned(),
        customer_id: payment.customer_id.clone(),
        manual_capture: payment.capture == CaptureMethod::Manual,
    }
}

/// What a look-up found, as a charge step's outcome.
fn lookup_outcome(found: Result<ChargeLookup, GatewayError>, attempts: u32) -> ChargeOutcome {
    let at = Timestamp::now();
    match found {
        Ok(ChargeLookup::Charged { charge_id }) => ChargeOutcome::Charged { charge_id, at },
        Ok(ChargeLookup::Authorized { charge_id }) => ChargeOutcome::Authorized { charge_id, at },
        Ok(ChargeLookup::Processing {
            charge_id,
            awaiting,
        }) => ChargeOutcome::Processing {
            charge_id,
            awaiting,
            at,
        },
        Ok(ChargeLookup::NotCharged { reason }) => ChargeOutcome::NotCharged {
            reason: format!("the gateway never charged it: {reason}"),
        },
        Err(e) => ChargeOutcome::Unknown {
            reason: e.to_string(),
            attempts,
        },
    }
}

/// A charge the gateway accepted without a final word, looked at as it stands now. Past its
/// deadline, one still waiting on the customer is cancelled (with `cancel_key`): the payment
/// fails, nothing charged. A cancel the gateway refuses (the customer acted meanwhile) leaves
/// the outcome to the next look-up.
async fn check_accepted(
    gateway: &dyn PaymentGateway,
    policy: SettlePolicy,
    payment_id: &str,
    charge_id: String,
    past_deadline: bool,
    cancel_key: String,
) -> ChargeOutcome {
    let found = with_retries(policy.retry, payment_id, "check charge", || {
        gateway.check_charge(&charge_id)
    })
    .await;
    let attempts = found.attempts;
    match found.result {
        Ok(ChargeLookup::Processing {
            charge_id,
            awaiting: Awaiting::RequiresAction,
        }) if past_deadline => {
            info!(%payment_id, %charge_id, "not confirmed by the customer before its deadline: cancelling it");
            let cancel = VoidHoldRequest {
                idempotency_key: cancel_key,
                payment_id: payment_id.to_owned(),
                charge_id,
            };
            let cancelled = with_retries(policy.retry, payment_id, "cancel unconfirmed", || {
                gateway.void_hold(cancel.clone())
            })
            .await;
            match cancelled.result {
                Ok(()) => ChargeOutcome::NotCharged {
                    reason: crate::payment::REASON_NOT_CONFIRMED.to_owned(),
                },
                Err(e) => ChargeOutcome::Unknown {
                    reason: e.to_string(),
                    attempts: attempts + cancelled.attempts,
                },
            }
        }
        found => lookup_outcome(found, attempts),
    }
}

/// A void once the charge's key nears its expiry: the gateway's records decide. Nothing is in
/// flight by then (every attempt has its own timeout, long over).
async fn void_by_lookup(
    gateway: &dyn PaymentGateway,
    policy: SettlePolicy,
    request: &VoidRequest,
) -> Attempted<VoidResponse> {
    let payment_id = request.charge.payment_id.as_str();
    let found = with_retries(policy.retry, payment_id, "find charge", || {
        gateway.find_charge(payment_id)
    })
    .await;
    let found_attempts = found.attempts;
    let found = match found.result {
        Ok(found) => found,
        Err(e) => {
            return Attempted {
                result: Err(e),
                attempts: found.attempts,
            };
        }
    };
    let voided = with_retries(policy.retry, payment_id, "void as found", || {
        void_as_found(gateway, request, found.clone())
    })
    .await;
    Attempted {
        result: voided.result,
        attempts: found_attempts + voided.attempts,
    }
}

/// Stores `value` under state key `key`, serialized from a borrow: `ctx.set(key, Json(value))`
/// takes the value, so a handler that goes on using it would clone it first.
fn set_state<T: serde::Serialize>(ctx: &ObjectContext<'_>, key: &'static str, value: &T) {
    // A stored payment is 250 to 400 bytes, unless it lists refunds: usually one allocation.
    let mut json = Vec::with_capacity(512);
    // Serializing into memory fails only on a map with keys that are not strings; no stored
    // type has one.
    serde_json::to_writer(&mut json, value).expect("stored state serializes to JSON");
    ctx.set(key, bytes::Bytes::from(json));
}

/// Decodes what state key `key` holds (read as bytes); a value that does not decode is a
/// terminal error naming the payment and the problem (the SDK's own decoding would fail the
/// invocation retryably, forever).
fn decode<T: serde::de::DeserializeOwned>(
    payment_id: &str,
    key: &'static str,
    stored: Option<bytes::Bytes>,
) -> Result<Option<T>, PaymentError> {
    stored
        .map(|bytes| serde_json::from_slice(&bytes))
        .transpose()
        .map_err(|e| PaymentError::CorruptState {
            payment_id: payment_id.to_owned(),
            key,
            problem: e.to_string(),
        })
}

/// Where a refund is stored: the payment's one refund under state key `refund` (the seed's), or
/// one made with a refund key, in the payment (by its key).
enum RefundSlot {
    One,
    Keyed(String),
}

impl RefundSlot {
    /// Puts `refund` where it belongs: written under `refund`, or into `payment`, which the
    /// caller writes.
    fn put(&self, ctx: &mut ObjectContext<'_>, payment: &mut Payment, refund: &Refund) {
        match self {
            Self::One => set_state(ctx, STATE_REFUND, refund),
            Self::Keyed(_) => payment.put_keyed_refund(refund.clone()),
        }
    }

    /// Writes `refund` where it belongs, and nothing else.
    fn store(&self, ctx: &mut ObjectContext<'_>, payment: &mut Payment, refund: &Refund) {
        self.put(ctx, payment, refund);
        if let Self::Keyed(_) = self {
            set_state(ctx, STATE_PAYMENT, payment);
        }
    }
}

/// The answer to a repeated refund request, when its refund needs nothing from this
/// invocation: made, or pending with `Settle` on it.
fn settled_or_settling(payment_id: &str, refund: Option<&Refund>) -> Option<Refund> {
    let refund = refund?;
    if refund.status == RefundStatus::Completed {
        info!(
            payment_id,
            refund_id = refund.refund_id.as_deref(),
            "refund already processed"
        );
        return Some(refund.clone());
    }
    if refund.is_settling() {
        info!(
            payment_id,
            attempts = refund.attempts,
            "refund pending, being settled"
        );
        return Some(refund.clone());
    }
    None
}

/// A client handler's answer, a refusal logged (the tail every one of them shares).
fn answered<T>(
    payment_id: &str,
    result: Result<T, TerminalError>,
) -> Result<Json<T>, TerminalError> {
    log_refusal(payment_id, &result);
    result.map(Json)
}

/// Logs a refused request once, with its status code, so a 4xx is never silent.
fn log_refusal<T>(payment_id: &str, result: &Result<T, TerminalError>) {
    if let Err(e) = result {
        // The key of a refused request may be anything a caller sent: escaped, it cannot forge a
        // line of its own.
        info!(payment_id = %payment_id.escape_debug(), code = e.code(), reason = e.message(), "request refused");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::gateway::{MockConfig, MockGateway};

    fn charge(payment: &str, customer: &str) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: format!("charge:{payment}"),
            payment_id: payment.into(),
            amount: 500,
            currency: "USD".into(),
            customer_id: customer.into(),
            manual_capture: false,
        }
    }

    fn void(charge: ChargeRequest) -> VoidRequest {
        VoidRequest {
            refund_key: format!("void:{}", charge.payment_id),
            charge,
        }
    }

    /// Past the key's window the void goes by the gateway's records: a charge found is
    /// refunded, one waiting on its customer cancelled, one processing left unknown (voided
    /// once it settles), and no charge is nothing to void.
    #[tokio::test]
    async fn a_void_by_look_up_acts_on_the_charge_as_it_stands() {
        let gateway = MockGateway::new(MockConfig {
            delay: Duration::ZERO,
            decline_rate: 0.0,
            settle_delay: Duration::from_secs(3600),
            ..MockConfig::default()
        })
        .unwrap();
        let policy = SettlePolicy {
            retry: crate::gateway::RetryPolicy {
                max_attempts: 1,
                ..Default::default()
            },
            ..SettlePolicy::default()
        };
        let by_look_up = |request: ChargeRequest| {
            let gateway = gateway.clone();
            async move {
                gateway.charge(request.clone()).await.unwrap();
                void_by_lookup(&gateway, policy, &void(request))
                    .await
                    .result
            }
        };
        assert!(matches!(
            by_look_up(charge("paid", "cust")).await,
            Ok(VoidResponse::Refunded { .. })
        ));
        assert_eq!(
            by_look_up(charge("waiting", "action-x")).await,
            Ok(VoidResponse::NothingCharged)
        );
        assert!(matches!(
            by_look_up(charge("processing", "async-x")).await,
            Err(GatewayError::Unknown(_))
        ));
        assert_eq!(
            void_by_lookup(&gateway, policy, &void(charge("never", "cust")))
                .await
                .result,
            Ok(VoidResponse::NothingCharged)
        );
    }
}
