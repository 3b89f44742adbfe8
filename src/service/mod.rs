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
//! | 4 | set state `payment` | `completed` or `failed`                                     |
//! | 5 | run `receipt`       | the seed's receipt, only after a successful charge          |
//!
//! A duplicate is step 1 and nothing else. Every `ctx.run` is a durable round trip to
//! restate-server, so no step reads the clock on its own: the pending record has no
//! `createdAt` until the charge step records it.

mod body;

use std::sync::Arc;

use restate_sdk::prelude::*;
use tracing::{debug, info, warn};

use crate::gateway::{
    ChargeRequest, ChargeResponse, PaymentGateway, RefundRequest as GatewayRefund, RetryPolicy,
    with_retries,
};
use crate::payment::{
    ChargeOutcome, ChargeStep, CreatePaymentBody, NewPayment, NoInput, Payment, PaymentError,
    PaymentId, PaymentResult, PaymentStatus, Refund, RefundOutcome, RefundPaymentBody,
    RefundRequest, Timestamp,
};

pub use body::JsonBody;

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
            PaymentError::NotRefundable { .. } => 409,
            // Terminal all the same: a retry would decode the same bytes, forever, holding the
            // payment's lock.
            PaymentError::CorruptState { .. } => 500,
        };
        TerminalError::new_with_code(code, error.to_string())
    }
}

/// The payment service: one virtual object per payment ID.
///
/// `CreatePayment` and `RefundPayment` keep the answers of requests sent with an
/// `idempotency-key` header for 7 days (Restate's default is 1 day; Stripe keeps keys 24 hours):
/// long enough for a client's retry queue to drain over a weekend. The payment itself is
/// deduplicated by its ID for as long as it is stored, key or no key.
pub struct PaymentService {
    gateway: Arc<dyn PaymentGateway>,
}

impl PaymentService {
    pub fn new(gateway: Arc<dyn PaymentGateway>) -> Self {
        Self { gateway }
    }
}

#[restate_sdk::object(name = "PaymentService")]
impl PaymentService {
    /// Creates and charges a payment, once per payment ID.
    #[handler(name = "CreatePayment", idempotency_retention = "7 days")]
    async fn create_payment(
        &self,
        ctx: ObjectContext<'_>,
        body: JsonBody<CreatePaymentBody>,
    ) -> Result<Json<PaymentResult>, TerminalError> {
        let payment_id = ctx.key().to_owned();
        let result = self.create(ctx, body).await;
        log_refusal(&payment_id, &result);
        result.map(Json)
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
                Ok(Some(payment)) => Ok(Json(payment)),
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
        ctx: ObjectContext<'_>,
        body: JsonBody<RefundPaymentBody>,
    ) -> Result<Json<Refund>, TerminalError> {
        let payment_id = ctx.key().to_owned();
        let result = self.refund(ctx, body).await;
        log_refusal(&payment_id, &result);
        result.map(Json)
    }
}

impl PaymentService {
    async fn create(
        &self,
        ctx: ObjectContext<'_>,
        body: JsonBody<CreatePaymentBody>,
    ) -> Result<PaymentResult, TerminalError> {
        // Bad input is refused before anything is read or written, duplicate or not.
        let request = NewPayment::parse(body.as_bytes())?;
        let id = PaymentId::parse(ctx.key())?;

        let stored = decode::<Payment>(ctx.key(), STATE_PAYMENT, ctx.get(STATE_PAYMENT).await?)?;
        if let Some(stored) = &stored {
            stored.check_retry(&request)?;
        }
        let mut payment = match stored {
            Some(stored) if stored.status != PaymentStatus::Pending => {
                info!(payment_id = %id, status = %stored.status, "payment already processed");
                return Ok(PaymentResult::already_processed(&stored));
            }
            // Only an invocation stopped from outside (e.g. cancelled by an operator) leaves a
            // payment pending. Charging again is safe: the key makes the gateway answer the
            // first charge's result if there was one.
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
                ctx.set(STATE_PAYMENT, Json(pending.clone()));
                pending
            }
        };

        let step = self.charge(&ctx, &id, &payment).await?;
        payment.settle(step);
        ctx.set(STATE_PAYMENT, Json(payment.clone()));

        if payment.status == PaymentStatus::Completed {
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
        } else {
            warn!(
                payment_id = %id,
                customer_id = %payment.customer_id.escape_debug(),
                error = payment.error_msg.as_deref(),
                "payment failed"
            );
        }
        Ok(PaymentResult::settled(&payment))
    }

    /// The charge, as one journaled step: its outcome and both clock readings are recorded
    /// once and replayed as recorded.
    async fn charge(
        &self,
        ctx: &ObjectContext<'_>,
        id: &PaymentId,
        payment: &Payment,
    ) -> Result<ChargeStep, TerminalError> {
        let request = ChargeRequest {
            idempotency_key: id.charge_key(),
            payment_id: id.as_str().to_owned(),
            amount: payment.amount.minor_units(),
            currency: payment.currency.as_str().to_owned(),
            customer_id: payment.customer_id.clone(),
        };
        let gateway = Arc::clone(&self.gateway);
        // The step never fails: a gateway that gives no final word within the retry budget
        // is an outcome too, recorded like any other, so replays settle the payment the same way.
        let Json(step) = ctx
            .run(|| async move {
                let started_at = Timestamp::now();
                let payment_id = request.payment_id.as_str();
                debug!(%payment_id, idempotency_key = %request.idempotency_key, "charging through the gateway");
                let response = with_retries(RetryPolicy::default(), payment_id, || {
                    gateway.charge(request.clone())
                })
                .await;
                let result = match response {
                    Ok(ChargeResponse::Succeeded { charge_id }) => ChargeOutcome::Charged {
                        charge_id,
                        at: Timestamp::now(),
                    },
                    Ok(ChargeResponse::Declined { reason }) => ChargeOutcome::Declined { reason },
                    Err(e) => ChargeOutcome::Failed {
                        reason: e.to_string(),
                    },
                };
                Ok(Json(ChargeStep { started_at, result }))
            })
            .name("charge")
            .await?;
        Ok(step)
    }

    async fn refund(
        &self,
        ctx: ObjectContext<'_>,
        body: JsonBody<RefundPaymentBody>,
    ) -> Result<Refund, TerminalError> {
        let request = RefundRequest::parse(body.as_bytes())?;

        if let Some(refund) =
            decode::<Refund>(ctx.key(), STATE_REFUND, ctx.get(STATE_REFUND).await?)?
        {
            info!(payment_id = ctx.key(), refund_id = %refund.refund_id, "refund already processed");
            return Ok(refund);
        }
        let Some(mut payment) =
            decode::<Payment>(ctx.key(), STATE_PAYMENT, ctx.get(STATE_PAYMENT).await?)?
        else {
            return Err(PaymentError::NotFound {
                payment_id: ctx.key().to_owned(),
            }
            .into());
        };
        let amount = payment.refundable_amount(request.amount)?;
        let charge_id = payment.charge_id.clone().unwrap_or_default();
        let id = PaymentId::parse(&payment.payment_id)?;
        debug!(payment_id = %id, %amount, reason = %request.reason.escape_debug(), "refunding payment");

        let call = GatewayRefund {
            idempotency_key: id.refund_key(),
            payment_id: id.as_str().to_owned(),
            charge_id,
            amount: amount.minor_units(),
        };
        let gateway = Arc::clone(&self.gateway);
        let Json(outcome) = ctx
            .run(|| async move {
                let payment_id = call.payment_id.as_str();
                debug!(%payment_id, idempotency_key = %call.idempotency_key, "refunding through the gateway");
                let response = with_retries(RetryPolicy::default(), payment_id, || {
                    gateway.refund(call.clone())
                })
                .await;
                Ok(Json(match response {
                    Ok(r) => RefundOutcome::Refunded {
                        refund_id: r.refund_id,
                        at: Timestamp::now(),
                    },
                    Err(e) => RefundOutcome::Failed {
                        reason: e.to_string(),
                    },
                }))
            })
            .name("refund")
            .await?;
        let (refund_id, refunded_at) = match outcome {
            RefundOutcome::Refunded { refund_id, at } => (refund_id, at),
            // Nothing is stored: the payment stays completed and a later RefundPayment tries
            // again, with the same key, so a refund the gateway did make is not made twice.
            RefundOutcome::Failed { reason } => {
                warn!(payment_id = %id, reason = %reason.escape_debug(), "refund not processed");
                return Err(TerminalError::new_with_code(
                    503,
                    format!("refund not processed, try again later: {reason}"),
                ));
            }
        };

        let refund = Refund::completed(refund_id, refunded_at, amount, request.reason);
        ctx.set(STATE_REFUND, Json(refund.clone()));
        payment.mark_refunded();
        ctx.set(STATE_PAYMENT, Json(payment));
        info!(
            payment_id = %id,
            amount = %refund.amount,
            reason = %refund.reason.escape_debug(),
            refund_id = %refund.refund_id,
            "refund completed"
        );
        Ok(refund)
    }
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

/// Logs a refused request once, with its status code, so a 4xx is never silent.
fn log_refusal<T>(payment_id: &str, result: &Result<T, TerminalError>) {
    if let Err(e) = result {
        // The key of a refused request may be anything a caller sent: escaped, it cannot forge a
        // line of its own.
        info!(payment_id = %payment_id.escape_debug(), code = e.code(), reason = e.message(), "request refused");
    }
}
