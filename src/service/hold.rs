//! Holds: a payment created with `"capture": "manual"` is `authorized` once its charge holds
//! the money, then captured (`CapturePayment`), released (`CancelPayment`), or released by the
//! service when its window ends (`ExpireHold`, a delayed call sent when the hold is placed).
//!
//! The three are exclusive handlers of the one object, so they never run at once; each stores
//! its action (`holdAction`) before the gateway call, and a capture and a release refuse each
//! other while one is pending. So whatever the interleaving, a hold is captured or released,
//! never both: the gateway would refuse the second anyway (an intent captured cannot be
//! cancelled, nor the reverse). An action whose outcome stays unknown is settled by `Settle`
//! with the same key.

use std::sync::Arc;

use restate_sdk::prelude::*;
use tracing::{debug, error, info, warn};

use super::{JsonBody, PaymentService, STATE_PAYMENT, decode, is_cancel, set_state};
use crate::gateway::{
    Attempted, CaptureRequest as GatewayCapture, ChargeLookup, GatewayError, VoidHoldRequest,
    with_retries,
};
use crate::payment::{
    CaptureRequest, HoldAction, HoldOutcome, HoldRequest, HoldStep, NoInput, Payment, PaymentError,
    PaymentId, PaymentStatus, REASON_HOLD_CANCELED, REASON_HOLD_EXPIRED, Timestamp,
};

impl PaymentService {
    pub(super) async fn capture(
        &self,
        ctx: &mut ObjectContext<'_>,
        body: JsonBody<crate::payment::CapturePaymentBody>,
    ) -> Result<Payment, TerminalError> {
        let request = CaptureRequest::parse(body.as_bytes())?;
        let (id, mut payment) = stored_payment(ctx).await?;
        let asked = payment.request_capture(request.amount)?;
        let done = self.run_request(ctx, &id, payment.clone(), asked).await?;
        Ok(done.unwrap_or(payment))
    }

    pub(super) async fn cancel(
        &self,
        ctx: &mut ObjectContext<'_>,
        body: JsonBody<NoInput>,
    ) -> Result<Payment, TerminalError> {
        NoInput::parse(body.as_bytes())?;
        let (id, mut payment) = stored_payment(ctx).await?;
        let asked = payment.request_void(REASON_HOLD_CANCELED)?;
        let done = self.run_request(ctx, &id, payment.clone(), asked).await?;
        Ok(done.unwrap_or(payment))
    }

    /// The hold's window ended: released if it is still there and nothing else is under way.
    pub(super) async fn expire(&self, ctx: &mut ObjectContext<'_>) -> Result<(), TerminalError> {
        let (id, mut payment) = stored_payment(ctx).await?;
        if payment.status != PaymentStatus::Authorized {
            debug!(payment_id = %id, status = %payment.status, "hold window ended: no hold left");
            return Ok(());
        }
        if payment.hold_action.is_some() {
            // A capture or release being settled decides the hold.
            info!(payment_id = %id, "hold window ended while its capture or release is settled");
            return Ok(());
        }
        info!(payment_id = %id, charge_id = payment.charge_id.as_deref(), "hold window ended: releasing the hold");
        let asked = payment.request_void(REASON_HOLD_EXPIRED)?;
        self.run_request(ctx, &id, payment, asked).await.map(drop)
    }

    /// Runs what a request asked of the hold; `None` when it was done already (the payment
    /// answers as stored).
    async fn run_request(
        &self,
        ctx: &mut ObjectContext<'_>,
        id: &PaymentId,
        payment: Payment,
        asked: HoldRequest,
    ) -> Result<Option<Payment>, TerminalError> {
        match asked {
            HoldRequest::Done => {
                info!(payment_id = %id, status = %payment.status, "hold already settled");
                Ok(None)
            }
            HoldRequest::Run(action) => {
                set_state(ctx, STATE_PAYMENT, &payment);
                self.hold_and_store(ctx, id, payment, action, 0)
                    .await
                    .map(Some)
            }
        }
    }

    /// One hold step and what follows from it: the payment `completed` or `canceled`, a
    /// refusal for the client, or, unknown, the next `Settle` round. A cancellation of the
    /// invocation leaves the action stored for `Settle`: the gateway may have acted.
    pub(super) async fn hold_and_store(
        &self,
        ctx: &mut ObjectContext<'_>,
        id: &PaymentId,
        mut payment: Payment,
        action: HoldAction,
        round: u32,
    ) -> Result<Payment, TerminalError> {
        let step = match self.hold_step(ctx, id, &payment, &action).await {
            Ok(step) => step,
            Err(e) if is_cancel(&e) => {
                warn!(payment_id = %id, "cancelled during the hold's capture or release: it is settled later with its key");
                if let Some(pending) = payment.hold_action.as_mut() {
                    pending.attempts = pending.attempts.max(1);
                }
                ctx.set(STATE_PAYMENT, Json(payment));
                self.schedule(ctx, id, round);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.store_hold(ctx, id, payment, step, round)
    }

    /// A hold step's result (from the step, or from a gateway event) stored, and what follows
    /// from it: the payment answered, a refusal for the client, or the next `Settle` round.
    pub(super) fn store_hold(
        &self,
        ctx: &mut ObjectContext<'_>,
        id: &PaymentId,
        mut payment: Payment,
        step: HoldStep,
        round: u32,
    ) -> Result<Payment, TerminalError> {
        let settled = payment.settle_hold(step);
        set_state(ctx, STATE_PAYMENT, &payment);
        settled?;
        match payment.status {
            PaymentStatus::Completed => info!(
                payment_id = %id,
                amount_captured = payment.amount_captured,
                charge_id = payment.charge_id.as_deref(),
                "hold captured"
            ),
            PaymentStatus::Canceled => info!(
                payment_id = %id,
                charge_id = payment.charge_id.as_deref(),
                error = payment.error_msg.as_deref(),
                "hold released"
            ),
            _ => {
                let pending = payment.hold_action.as_ref();
                warn!(
                    payment_id = %id,
                    attempts = pending.map(|p| p.attempts),
                    last_error = pending.and_then(|p| p.last_error.as_deref()),
                    "hold capture or release outcome unknown: settled later"
                );
                self.schedule(ctx, id, round);
            }
        }
        Ok(payment)
    }

    /// The capture or release, as one journaled step. A refusal is checked against the
    /// gateway's records: a capture refused because it was made already (an answer lost, then
    /// the key expired) is a capture, and a hold gone at the gateway is released.
    async fn hold_step(
        &self,
        ctx: &ObjectContext<'_>,
        id: &PaymentId,
        payment: &Payment,
        action: &HoldAction,
    ) -> Result<HoldStep, TerminalError> {
        let (gateway, policy) = (Arc::clone(&self.gateway), self.policy);
        let payment_id = id.as_str().to_owned();
        let charge_id = payment.charge_id.clone().unwrap_or_default();
        let action = action.clone();
        let name = match action {
            HoldAction::Capture { .. } => "capture",
            HoldAction::Void { .. } => "void hold",
        };
        let (capture_key, void_key) = (id.capture_key(), id.void_hold_key());
        let held = payment.amount.minor_units();
        let Json(step) = ctx
            .run(|| async move {
                let started_at = Timestamp::now();
                let payment_id = payment_id.as_str();
                let Attempted { result, attempts } = match &action {
                    HoldAction::Capture { amount } => {
                        let call = GatewayCapture {
                            idempotency_key: capture_key,
                            payment_id: payment_id.to_owned(),
                            charge_id,
                            amount: amount.minor_units(),
                        };
                        debug!(%payment_id, idempotency_key = %call.idempotency_key, amount = call.amount, "capturing through the gateway");
                        let done = with_retries(policy.retry, payment_id, "capture", || {
                            gateway.capture(call.clone())
                        })
                        .await;
                        Attempted {
                            result: done.result.map(|r| HoldOutcome::Captured {
                                amount: r.amount,
                                at: Timestamp::now(),
                            }),
                            attempts: done.attempts,
                        }
                    }
                    HoldAction::Void { .. } => {
                        let call = VoidHoldRequest {
                            idempotency_key: void_key,
                            payment_id: payment_id.to_owned(),
                            charge_id,
                        };
                        debug!(%payment_id, idempotency_key = %call.idempotency_key, "releasing the hold through the gateway");
                        let done = with_retries(policy.retry, payment_id, "void hold", || {
                            gateway.void_hold(call.clone())
                        })
                        .await;
                        Attempted {
                            result: done.result.map(|()| HoldOutcome::Voided),
                            attempts: done.attempts,
                        }
                    }
                };
                let result = match result {
                    Ok(outcome) => outcome,
                    Err(GatewayError::Unknown(reason)) => HoldOutcome::Unknown { reason, attempts },
                    Err(GatewayError::Rejected(reason)) => {
                        let found = with_retries(policy.retry, payment_id, "find charge", || {
                            gateway.find_charge(payment_id)
                        })
                        .await;
                        match (found.result, &action) {
                            (Ok(ChargeLookup::Authorized { .. }), _) => {
                                HoldOutcome::Rejected { reason }
                            }
                            (Ok(ChargeLookup::Charged { .. }), HoldAction::Capture { amount }) => {
                                HoldOutcome::Captured {
                                    amount: amount.minor_units(),
                                    at: Timestamp::now(),
                                }
                            }
                            (Ok(ChargeLookup::Charged { charge_id }), HoldAction::Void { .. }) => {
                                error!(%payment_id, %charge_id, "the hold was captured outside this service: recorded as captured in full");
                                HoldOutcome::Captured {
                                    amount: held,
                                    at: Timestamp::now(),
                                }
                            }
                            (Ok(ChargeLookup::NotCharged { .. }), HoldAction::Void { .. }) => {
                                HoldOutcome::Voided
                            }
                            (Ok(ChargeLookup::NotCharged { reason: why }), HoldAction::Capture { .. }) => {
                                HoldOutcome::Gone {
                                    reason: format!("the hold is gone at the gateway ({reason}; {why})"),
                                }
                            }
                            // Not a hold's state: asked again later.
                            (Ok(ChargeLookup::Processing { charge_id, awaiting }), _) => {
                                HoldOutcome::Unknown {
                                    reason: format!("{reason}; then {charge_id} is {}", awaiting.as_str()),
                                    attempts: attempts + found.attempts,
                                }
                            }
                            (Err(e), _) => HoldOutcome::Unknown {
                                reason: format!("{reason}; then {e}"),
                                attempts: attempts + found.attempts,
                            },
                        }
                    }
                };
                Ok(Json(HoldStep { started_at, result }))
            })
            .name(name)
            .await?;
        Ok(step)
    }
}

/// The stored payment and its ID, or 404.
async fn stored_payment(
    ctx: &mut ObjectContext<'_>,
) -> Result<(PaymentId, Payment), TerminalError> {
    stored_payment_if_any(ctx).await?.ok_or_else(|| {
        PaymentError::NotFound {
            payment_id: ctx.key().to_owned(),
        }
        .into()
    })
}

/// The stored payment and its ID, if there is one.
pub(super) async fn stored_payment_if_any(
    ctx: &mut ObjectContext<'_>,
) -> Result<Option<(PaymentId, Payment)>, TerminalError> {
    let id = PaymentId::parse(ctx.key())?;
    let stored = decode::<Payment>(ctx.key(), STATE_PAYMENT, ctx.get(STATE_PAYMENT).await?)?;
    Ok(stored.map(|payment| (id, payment)))
}
