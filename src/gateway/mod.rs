//! The payment gateway: the one external system that moves money.
//!
//! [`PaymentGateway`] is what a real integration implements: [`StripeGateway`] over Stripe's
//! API; [`MockGateway`] simulates one in the service's process. Every call carries an
//! idempotency key: the gateway must perform each key's operation at most once and answer
//! repeats with the original result. That, not the journal, is what makes a charge
//! exactly-once: a journaled step can run again if the process dies after the gateway acted but
//! before the step's result was recorded, and a call whose answer was lost is sent again.
//!
//! A call ends final (an answer, or [`GatewayError::Rejected`]) or unknown
//! ([`GatewayError::Unknown`]: the gateway may have acted). Only the same key again, or a
//! look-up ([`PaymentGateway::find_charge`], [`PaymentGateway::find_refund`]), settles an
//! unknown; the service never takes one for a refusal.

mod ledger;
mod mock;
mod retry;
pub mod stripe;
pub mod webhook;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::stripe::{ApiKey, Intent, StripeConfig, StripeGateway};
pub use ledger::{LedgerEntry, LedgerOp, LedgerOutcome, LedgerRead, read_ledger};
pub use mock::{DECLINE_CUSTOMER_PREFIX, MockConfig, MockGateway};
pub use retry::{Attempted, RetryPolicy, with_retries};

/// A request to take money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub idempotency_key: String,
    pub payment_id: String,
    pub amount: u64,
    pub currency: String,
    pub customer_id: String,
    /// Hold the money (Stripe's `capture_method=manual`) rather than take it: a capture takes
    /// it later, or a void releases it.
    pub manual_capture: bool,
}

/// The gateway's final word on a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeResponse {
    Succeeded {
        charge_id: String,
    },
    /// A charge with manual capture: the money is held, not taken.
    Authorized {
        charge_id: String,
    },
    Declined {
        reason: String,
    },
    /// Accepted, the outcome to come: the gateway settles it later and reports it by webhook
    /// (Stripe's `processing`, `requires_action`). A key's replay answers this first word
    /// even once the charge has settled: only [`PaymentGateway::check_charge`] tells how it
    /// stands now.
    Processing {
        charge_id: String,
        awaiting: Awaiting,
    },
}

impl ChargeResponse {
    /// The answer of a confirmed intent `charge_id` with Stripe's `status`: one reading for
    /// both adapters. Any other status has no final word: an unknown outcome.
    pub fn of_status(charge_id: String, status: &str) -> Result<Self, GatewayError> {
        match status {
            "succeeded" => Ok(Self::Succeeded { charge_id }),
            "requires_capture" => Ok(Self::Authorized { charge_id }),
            other => match Awaiting::parse(other) {
                Some(awaiting) => Ok(Self::Processing {
                    charge_id,
                    awaiting,
                }),
                None => Err(GatewayError::Unknown(format!(
                    "payment intent {charge_id} is {other}"
                ))),
            },
        }
    }
}

/// What a charge the gateway accepted without a final word waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
// Inline, one `enum` (see `string_enum`): restate-server copies a handler's schemas on every call.
#[schemars(inline, transform = crate::payment::types::string_enum)]
pub enum Awaiting {
    /// The gateway: the money is on its way (a bank debit) and cannot be stopped; it ends
    /// succeeded or declined by itself.
    Processing,
    /// The customer (e.g. 3-D Secure); cancelable until they act.
    RequiresAction,
}

impl Awaiting {
    /// Stripe's status word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processing => "processing",
            Self::RequiresAction => "requires_action",
        }
    }

    /// Reads Stripe's status word; `None` for any other status.
    pub fn parse(status: &str) -> Option<Self> {
        match status {
            "processing" => Some(Self::Processing),
            "requires_action" => Some(Self::RequiresAction),
            _ => None,
        }
    }
}

/// A request to take (part of) a held charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRequest {
    pub idempotency_key: String,
    pub payment_id: String,
    /// The hold as the gateway named it in [`ChargeResponse::Authorized`].
    pub charge_id: String,
    /// At most the amount held.
    pub amount: u64,
}

/// The gateway's final word on a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureResponse {
    /// What the capture took.
    pub amount: u64,
}

/// A request to release a hold, taking nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidHoldRequest {
    pub idempotency_key: String,
    pub payment_id: String,
    pub charge_id: String,
}

/// A request to give (part of) a charge back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub idempotency_key: String,
    pub payment_id: String,
    /// The charge as the gateway named it in [`ChargeResponse::Succeeded`].
    pub charge_id: String,
    pub amount: u64,
}

/// The gateway's final word on a refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundResponse {
    pub refund_id: String,
}

/// Compensation for a charge whose invocation was cancelled: make sure `charge` moves no money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidRequest {
    /// The charge exactly as it was sent, its idempotency key included.
    pub charge: ChargeRequest,
    /// The key of the refund, if the charge turns out to have gone through.
    pub refund_key: String,
}

/// What voiding a charge did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoidResponse {
    /// The charge's key is spent on a request that moves no money: a charge with it that is
    /// still on its way is refused when it arrives.
    NothingCharged,
    /// The charge had gone through; it is refunded in full.
    Refunded {
        charge_id: String,
        refund_id: String,
    },
    /// The charge had gone through and the gateway refused its refund (final, e.g. refunded
    /// already by someone else): the charge stands.
    RefundRefused { charge_id: String, reason: String },
}

/// The refund in full that voids `request.charge`, which went through as `charge_id`: one
/// place for both gateways and the service's look-up. A refusal is final, not an error to
/// retry: the charge stands, and the caller records it.
pub async fn refund_in_full<G: PaymentGateway + ?Sized>(
    gateway: &G,
    request: &VoidRequest,
    charge_id: String,
) -> Result<VoidResponse, GatewayError> {
    let refund = RefundRequest {
        idempotency_key: request.refund_key.clone(),
        payment_id: request.charge.payment_id.clone(),
        charge_id: charge_id.clone(),
        amount: request.charge.amount,
    };
    match gateway.refund(refund).await {
        Ok(refund) => Ok(VoidResponse::Refunded {
            charge_id,
            refund_id: refund.refund_id,
        }),
        Err(GatewayError::Rejected(reason)) => {
            Ok(VoidResponse::RefundRefused { charge_id, reason })
        }
        Err(unknown) => Err(unknown),
    }
}

/// The release that voids `request.charge`, which placed the hold `charge_id`: nothing is
/// taken. One place for both gateways and the service's look-up, as [`refund_in_full`].
pub async fn release_in_full<G: PaymentGateway + ?Sized>(
    gateway: &G,
    request: &VoidRequest,
    charge_id: String,
) -> Result<VoidResponse, GatewayError> {
    gateway
        .void_hold(VoidHoldRequest {
            idempotency_key: request.refund_key.clone(),
            payment_id: request.charge.payment_id.clone(),
            charge_id,
        })
        .await?;
    Ok(VoidResponse::NothingCharged)
}

/// The void of `request.charge`, which reached the gateway and first answered `charged`
/// (the key's replay): one place for both gateways. A charge that answered it is processing
/// is looked at as it stands now: voided as made or declined, cancelled while it waits on the
/// customer, or, while the money is on its way, an unknown outcome to try again later.
pub async fn void_charged<G: PaymentGateway + ?Sized>(
    gateway: &G,
    request: &VoidRequest,
    charged: ChargeResponse,
) -> Result<VoidResponse, GatewayError> {
    let now = match charged {
        ChargeResponse::Declined { .. } => return Ok(VoidResponse::NothingCharged),
        ChargeResponse::Succeeded { charge_id } => ChargeLookup::Charged { charge_id },
        ChargeResponse::Authorized { charge_id } => ChargeLookup::Authorized { charge_id },
        ChargeResponse::Processing { charge_id, .. } => gateway.check_charge(&charge_id).await?,
    };
    void_as_found(gateway, request, now).await
}

/// The void of `request.charge` as the gateway's records show it stands (`found`): refunded
/// if it took money, released if it holds it or waits on the customer, nothing if it never
/// charged, and, while the money is on its way, an unknown outcome to try again later. One
/// place for [`void_charged`] and the service's void by look-up.
pub async fn void_as_found<G: PaymentGateway + ?Sized>(
    gateway: &G,
    request: &VoidRequest,
    found: ChargeLookup,
) -> Result<VoidResponse, GatewayError> {
    match found {
        ChargeLookup::Charged { charge_id } => refund_in_full(gateway, request, charge_id).await,
        ChargeLookup::Authorized { charge_id }
        | ChargeLookup::Processing {
            charge_id,
            awaiting: Awaiting::RequiresAction,
        } => release_in_full(gateway, request, charge_id).await,
        ChargeLookup::NotCharged { .. } => Ok(VoidResponse::NothingCharged),
        ChargeLookup::Processing { charge_id, .. } => Err(GatewayError::Unknown(format!(
            "{charge_id} is processing: it cannot be cancelled before it settles"
        ))),
    }
}

/// What the gateway holds for a payment, found without an idempotency key (its keys may have
/// expired): the final look-up for a charge whose outcome stayed unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeLookup {
    Charged {
        charge_id: String,
    },
    /// A hold, not captured.
    Authorized {
        charge_id: String,
    },
    /// Accepted and not settled yet: no money taken so far, and some may still be.
    Processing {
        charge_id: String,
        awaiting: Awaiting,
    },
    /// No charge for the payment took money (none was made, or it was declined or cancelled).
    NotCharged {
        reason: String,
    },
}

impl ChargeLookup {
    /// How an intent `charge_id` with Stripe's `status` stands: one reading for both adapters.
    pub fn of_status(charge_id: String, status: &str) -> Self {
        match status {
            "succeeded" => Self::Charged { charge_id },
            "requires_capture" => Self::Authorized { charge_id },
            other => match Awaiting::parse(other) {
                Some(awaiting) => Self::Processing {
                    charge_id,
                    awaiting,
                },
                None => Self::NotCharged {
                    reason: format!("its intent {charge_id} is {other}"),
                },
            },
        }
    }

    /// Which of several intents' look-ups speaks for the payment: money taken first, then
    /// held, then what may still move; else nothing was charged.
    pub fn rank(&self) -> u8 {
        match self {
            Self::Charged { .. } => 0,
            Self::Authorized { .. } => 1,
            Self::Processing { .. } => 2,
            Self::NotCharged { .. } => 3,
        }
    }
}

/// A call that got no final word, or whose request the gateway refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The outcome is unknown: the gateway may or may not have acted (a timeout, a reset
    /// connection, a 5xx, a 429, a refused connection, the key's first request still running).
    /// Only a retry with the same idempotency key, or a look-up, settles it.
    #[error("gateway outcome unknown: {0}")]
    Unknown(String),
    /// Final: the gateway refused the request and did nothing (e.g. an idempotency key reused
    /// with other parameters, a refund above what is left of the charge).
    #[error("gateway rejected the request: {0}")]
    Rejected(String),
}

/// A payment gateway. Implementations must honour idempotency keys (see the module doc).
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    async fn charge(&self, request: ChargeRequest) -> Result<ChargeResponse, GatewayError>;
    async fn refund(&self, request: RefundRequest) -> Result<RefundResponse, GatewayError>;
    /// Makes sure `request.charge` moves no money: spends its key on a request that moves none
    /// if the charge has not reached the gateway, or refunds it (with `request.refund_key`) if
    /// it went through. Idempotent: a repeat answers the same.
    async fn void(&self, request: VoidRequest) -> Result<VoidResponse, GatewayError>;
    /// Takes `request.amount` of a hold, once per key. A hold released (or captured) already
    /// is [`GatewayError::Rejected`]: nothing is taken.
    async fn capture(&self, request: CaptureRequest) -> Result<CaptureResponse, GatewayError>;
    /// Releases a hold, taking nothing; a hold released already answers the same. A hold
    /// captured already is [`GatewayError::Rejected`].
    async fn void_hold(&self, request: VoidHoldRequest) -> Result<(), GatewayError>;
    /// Whether the gateway took money for `payment_id`, whatever key it was sent with.
    async fn find_charge(&self, payment_id: &str) -> Result<ChargeLookup, GatewayError>;
    /// How the charge `charge_id` stands now (its intent retrieved: no search, no key).
    async fn check_charge(&self, charge_id: &str) -> Result<ChargeLookup, GatewayError>;
    /// The refund made for `request` (matched by its idempotency key), if the gateway has one.
    async fn find_refund(
        &self,
        request: &RefundRequest,
    ) -> Result<Option<RefundResponse>, GatewayError>;
}
