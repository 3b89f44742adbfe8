//! The one error type of the payment domain.
//!
//! Every variant is a business outcome the client must see as-is: none of them is worth
//! retrying, so the Restate boundary turns each into a terminal error with a 4xx code
//! (see `service::to_terminal`).

use super::{Amount, CaptureMethod, PaymentStatus};

/// Why a request was refused by the domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    /// The request body is not acceptable: malformed JSON, a missing or out-of-range field.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No payment is stored under this payment ID.
    #[error("payment {payment_id} not found")]
    NotFound { payment_id: String },
    /// The payment ID is already taken by a payment with other money-moving fields: the
    /// request is another payment, not a retry of this one.
    #[error(
        "payment {payment_id} already exists with a different {}: a payment ID identifies one payment; use a new ID for a new payment",
        fields.join(", ")
    )]
    Conflict {
        payment_id: String,
        fields: Vec<&'static str>,
    },
    /// What is stored under a state key does not decode (written by an older build, or before
    /// a bound was tightened): retrying cannot help, an operator must look at it.
    #[error(
        "the stored `{key}` of payment {payment_id} does not decode: {problem}; it needs an operator (restate kv get PaymentService {payment_id})"
    )]
    CorruptState {
        payment_id: String,
        key: &'static str,
        problem: String,
    },
    /// The payment exists but is in a status that forbids the operation.
    #[error(
        "cannot refund payment {payment_id} with status {status}: only completed or partially refunded payments can be refunded"
    )]
    NotRefundable {
        payment_id: String,
        status: PaymentStatus,
    },
    /// A refund of more than is left of the payment once its refunds (made or still being
    /// settled) are taken off.
    #[error(
        "cannot refund {requested} of payment {payment_id}: {left} of the {charged} charged is left to refund"
    )]
    RefundExceedsBalance {
        payment_id: String,
        requested: Amount,
        left: u64,
        charged: u64,
    },
    /// A capture or a release of a hold asked of a payment that holds none.
    #[error("{}", not_authorized(payment_id, action, *status, *capture))]
    NotAuthorized {
        payment_id: String,
        action: &'static str,
        status: PaymentStatus,
        capture: CaptureMethod,
    },
    /// A capture or a release asked while the other is being settled.
    #[error("cannot {action} payment {payment_id}: {pending} is being settled")]
    HoldBusy {
        payment_id: String,
        action: &'static str,
        pending: &'static str,
    },
    /// A capture of more than is held.
    #[error("cannot capture {requested} of payment {payment_id}: it holds {held}")]
    CaptureExceedsHold {
        payment_id: String,
        requested: Amount,
        held: Amount,
    },
    /// The gateway refused a capture or a release and did nothing.
    #[error("the gateway refused to {action} payment {payment_id}: {reason}")]
    HoldRejected {
        payment_id: String,
        action: &'static str,
        reason: String,
    },
    /// A payment has at most this many refunds made with refund keys.
    #[error(
        "payment {payment_id} has {max} refunds with refund keys already, the most it can have"
    )]
    TooManyRefunds { payment_id: String, max: usize },
    /// The gateway refused the refund and did nothing; the payment stays as it was.
    #[error("the gateway refused to refund payment {payment_id}: {reason}")]
    RefundRejected { payment_id: String, reason: String },
}

/// Names the state and why it has no hold to act on.
fn not_authorized(
    payment_id: &str,
    action: &str,
    status: PaymentStatus,
    capture: CaptureMethod,
) -> String {
    let why = match capture {
        CaptureMethod::Automatic => {
            "it was not created with \"capture\": \"manual\", so there is no hold"
        }
        CaptureMethod::Manual => "only an authorized payment has a hold",
    };
    format!("cannot {action} payment {payment_id} with status {status}: {why}")
}

impl PaymentError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidRequest(message.into())
    }
}
