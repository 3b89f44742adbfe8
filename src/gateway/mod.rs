//! The payment gateway: the one external system that moves money.
//!
//! [`PaymentGateway`] is what a real integration (Stripe, Adyen, …) implements;
//! [`MockGateway`] simulates one. Every call carries an idempotency key: the gateway must
//! perform each key's operation at most once and answer repeats with the original result.
//! That, not the journal, is what makes a charge exactly-once: a journaled step can run again
//! if the process dies after the gateway acted but before the step's result was recorded.

mod ledger;
mod mock;
mod retry;

use async_trait::async_trait;

pub use ledger::{LedgerEntry, LedgerOp, LedgerOutcome, LedgerRead, read_ledger};
pub use mock::{DECLINE_CUSTOMER_PREFIX, MockConfig, MockGateway};
pub use retry::{RetryPolicy, with_retries};

/// A request to take money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRequest {
    pub idempotency_key: String,
    pub payment_id: String,
    pub amount: u64,
    pub currency: String,
    pub customer_id: String,
}

/// The gateway's final word on a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeResponse {
    Succeeded { charge_id: String },
    Declined { reason: String },
}

/// A request to give (part of) a charge back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub idempotency_key: String,
    pub payment_id: String,
    pub charge_id: String,
    pub amount: u64,
}

/// The gateway's final word on a refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundResponse {
    pub refund_id: String,
}

/// A call that got no final word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// Worth retrying with the same idempotency key: a timeout, a 5xx, a refused connection.
    #[error("gateway unavailable: {0}")]
    Unavailable(String),
    /// Not worth retrying: the gateway refused the request itself (e.g. an idempotency key
    /// reused with other parameters).
    #[error("gateway rejected the request: {0}")]
    Rejected(String),
}

/// A payment gateway. Implementations must honour idempotency keys (see the module doc).
#[async_trait]
pub trait PaymentGateway: Send + Sync + 'static {
    async fn charge(&self, request: ChargeRequest) -> Result<ChargeResponse, GatewayError>;
    async fn refund(&self, request: RefundRequest) -> Result<RefundResponse, GatewayError>;
}
