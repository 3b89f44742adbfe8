//! The payment domain: plain Rust, no Restate.
//!
//! - [`types`]: value types that can only be built valid (amount, currency, payment ID, time);
//! - [`request`]: parsing client bodies into those types, with messages a client can act on;
//! - [`model`]: the stored payment and refund, the answers, and the state transitions;
//! - [`error`]: the one domain error enum.

pub mod error;
pub mod model;
pub mod request;
pub mod types;

pub use error::PaymentError;
pub use model::{
    Awaiting, ChargeOutcome, ChargeStep, GatewayEvent, GatewayEventKind, HoldAction, HoldOutcome,
    HoldRequest, HoldStep, Payment, PaymentResult, PaymentStatus, PendingHoldAction,
    REASON_HOLD_CANCELED, REASON_HOLD_EXPIRED, REASON_NOT_CONFIRMED, Refund, RefundOutcome,
    RefundStatus, RefundStep, VoidOutcome,
};
pub use request::{
    CaptureMethod, CapturePaymentBody, CaptureRequest, CreatePaymentBody, NewPayment, NoInput,
    RefundAmount, RefundPaymentBody, RefundRequest,
};
pub use types::{Amount, Currency, MAX_AMOUNT, PaymentId, Timestamp, epoch_millis};
