//! Stripe's webhooks, through the Restate ingress: `POST /StripeWebhooks/Receive`.
//!
//! `Receive` checks the `Stripe-Signature` header against the raw body (HMAC-SHA256 under the
//! endpoint's secret, `--stripe-webhook-secret`; 300 s of tolerance) in a journaled step, so
//! that a replay keeps the verdict it reached, and refuses a forged, altered or stale event
//! with a 400, as Stripe's guidance has it. A PaymentIntent event that names one of this
//! service's payments (`metadata[payment_id]`) goes on to that payment's `Confirm`, a one-way
//! call whose Restate idempotency key is the event ID: Stripe delivers an event at least once
//! and retries it for up to three days, and every delivery of one event runs `Confirm` once
//! (the key is kept 7 days). Events arrive in any order: `Confirm` acts only on a payment still
//! waiting on what the event says (a charge or a hold's capture or release whose outcome is
//! unknown) and ignores the rest, so a late or repeated event changes nothing. Event IDs are
//! logged escaped, as every value a caller sends.

use std::time::Duration;

use restate_sdk::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::hold::stored_payment_if_any;
use super::{JsonBody, PaymentService, PaymentServiceClient};
use crate::gateway::webhook::{
    DEFAULT_TOLERANCE, IntentEventKind, WebhookSecret, parse_event, verify,
};
use crate::payment::{
    ChargeStep, GatewayEvent, GatewayEventKind, HoldStep, PaymentStatus, Timestamp,
};

/// The receiver of Stripe's webhooks (see the module doc).
pub struct StripeWebhooks {
    /// None: webhooks are not set up, and every event is refused.
    secret: Option<WebhookSecret>,
    tolerance: Duration,
}

impl StripeWebhooks {
    pub fn new(secret: Option<WebhookSecret>) -> Self {
        Self {
            secret,
            tolerance: DEFAULT_TOLERANCE,
        }
    }
}

/// A Stripe event (`id`, `type`, `created`, `data.object`), as Stripe posts it. Its signature
/// is checked over the bytes as they came.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct StripeEventBody {
    /// `evt_…`
    pub id: String,
    /// E.g. `payment_intent.succeeded`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix seconds.
    pub created: i64,
    /// `object`: the PaymentIntent, for the events the service acts on.
    pub data: serde_json::Value,
}

/// The answer to Stripe: any 2xx acknowledges the event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookReceipt {
    pub event_id: String,
    /// The payment it was passed on to; none for an event the service does not act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
}

#[restate_sdk::service(name = "StripeWebhooks")]
impl StripeWebhooks {
    /// Receives one Stripe event: verified, then passed on to the payment it names, once per
    /// event ID.
    #[handler(name = "Receive")]
    async fn receive(
        &self,
        ctx: Context<'_>,
        body: JsonBody<StripeEventBody>,
    ) -> Result<Json<WebhookReceipt>, TerminalError> {
        let Some(secret) = self.secret.clone() else {
            return Err(TerminalError::new_with_code(
                403,
                "webhooks are not set up: the service has no --stripe-webhook-secret",
            ));
        };
        let header = ctx.headers().get("stripe-signature").cloned();
        let payload = body.as_bytes().to_vec();
        let tolerance = self.tolerance;
        // The clock is read in a step: a replay keeps the verdict.
        let Json(refusal) = ctx
            .run(|| async move {
                let now = Timestamp::now().unix_millis() / 1000;
                let verdict = verify(header.as_deref(), &payload, &secret, now, tolerance);
                Ok(Json(verdict.err().map(|e| e.to_string())))
            })
            .name("verify")
            .await?;
        if let Some(reason) = refusal {
            warn!(reason = %reason, "webhook refused");
            return Err(TerminalError::new_with_code(400, reason));
        }
        let event = parse_event(body.as_bytes())
            .map_err(|e| TerminalError::new_with_code(400, format!("invalid request: {e}")))?;
        let Some(event) = event else {
            debug!("webhook of a type the service does not act on");
            return Ok(Json(WebhookReceipt {
                event_id: event_id_of(body.as_bytes()),
                payment_id: None,
            }));
        };
        let Some(payment_id) = event.payment_id.clone() else {
            debug!(event_id = %event.id.escape_debug(), "webhook for an intent of no payment of this service");
            return Ok(Json(WebhookReceipt {
                event_id: event.id,
                payment_id: None,
            }));
        };
        let confirm = GatewayEvent {
            event_id: event.id.clone(),
            charge_id: event.intent,
            at: Timestamp::from_unix_millis(event.created.saturating_mul(1000))
                .ok_or_else(|| TerminalError::new_with_code(400, "invalid request: created"))?,
            kind: match event.kind {
                IntentEventKind::Succeeded => GatewayEventKind::Succeeded {
                    amount_received: event.amount_received,
                },
                IntentEventKind::Authorized => GatewayEventKind::Authorized,
                IntentEventKind::Failed { reason } => GatewayEventKind::Failed { reason },
                IntentEventKind::Canceled => GatewayEventKind::Canceled,
            },
        };
        info!(payment_id = %payment_id.escape_debug(), event_id = %event.id.escape_debug(), "webhook received");
        ctx.object_client::<PaymentServiceClient>(payment_id.as_str())
            .confirm(Json(confirm))
            .idempotency_key(event.id.clone())
            .send();
        Ok(Json(WebhookReceipt {
            event_id: event.id,
            payment_id: Some(payment_id),
        }))
    }
}

/// The event's ID, for the answer to an event the service does not act on.
fn event_id_of(payload: &[u8]) -> String {
    serde_json::from_slice::<StripeEventBody>(payload)
        .map(|e| e.id)
        .unwrap_or_default()
}

impl PaymentService {
    /// Settles the payment from a gateway event, if the payment is still waiting on what it
    /// says (see the module doc).
    pub(super) async fn confirm_event(
        &self,
        ctx: &mut ObjectContext<'_>,
        event: GatewayEvent,
    ) -> Result<(), TerminalError> {
        let Some((id, payment)) = stored_payment_if_any(ctx).await? else {
            info!(event_id = %event.event_id.escape_debug(), "event for a payment not stored here: ignored");
            return Ok(());
        };
        let known = payment
            .charge_id
            .as_deref()
            .is_none_or(|c| c == event.charge_id);
        match payment.status {
            // A charge accepted without a final word names its intent: only that one's
            // events settle it.
            PaymentStatus::Pending if !payment.canceling && known => {
                if let Some(result) = event.charge_outcome(payment.capture) {
                    info!(payment_id = %id, event_id = %event.event_id.escape_debug(), "a gateway event settles the charge");
                    let step = ChargeStep {
                        started_at: event.at,
                        result,
                    };
                    self.store_charge(ctx, &id, payment, step, 0).await?;
                    return Ok(());
                }
            }
            PaymentStatus::Authorized if known => {
                let outcome = payment
                    .hold_action
                    .as_ref()
                    .and_then(|pending| event.hold_outcome(&pending.action));
                if let Some(result) = outcome {
                    info!(payment_id = %id, event_id = %event.event_id.escape_debug(), "a gateway event settles the hold");
                    let step = HoldStep {
                        started_at: event.at,
                        result,
                    };
                    return self.store_hold(ctx, &id, payment, step, 0).map(drop);
                }
            }
            _ => {}
        }
        debug!(payment_id = %id, event_id = %event.event_id.escape_debug(), status = %payment.status, "event for a payment not waiting on it: ignored");
        Ok(())
    }
}
