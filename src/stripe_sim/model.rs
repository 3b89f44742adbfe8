//! The simulated gateway's objects and answers, independent of how they are served.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Payment methods that Stripe's test mode always declines with `insufficient_funds`.
pub const DECLINING_PAYMENT_METHODS: [&str; 2] = [
    "pm_card_visa_chargeDeclinedInsufficientFunds",
    "pm_card_chargeDeclinedInsufficientFunds",
];
/// Customers (`metadata[customer_id]`) whose ID starts with this are always declined.
pub const DECLINE_CUSTOMER_PREFIX: &str = "decline-";
/// Customers whose ID starts with this pay as a bank debit does: the confirmation answers
/// `processing`, and the intent settles later by itself (succeeded, or held for a manual
/// capture), reported by webhook.
pub const ASYNC_CUSTOMER_PREFIX: &str = "async-";
/// Customers whose ID starts with this are processing too, and then declined.
pub const ASYNC_DECLINE_CUSTOMER_PREFIX: &str = "async-decline-";
/// Stripe's test payment methods whose card asks for 3-D Secure on every payment: the
/// confirmation answers `requires_action`, as for customers `action-*`.
pub const ACTION_PAYMENT_METHODS: [&str; 2] = [
    "pm_card_threeDSecure2Required",
    "pm_card_authenticationRequired",
];
/// Customers whose ID starts with this must authenticate (3-D Secure) and never do: the
/// confirmation answers `requires_action`, and the intent stays so until it is cancelled.
pub const ACTION_CUSTOMER_PREFIX: &str = "action-";
/// Stripe's message for an `insufficient_funds` decline.
pub const INSUFFICIENT_FUNDS_MESSAGE: &str = "Your card has insufficient funds.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum IntentStatus {
    RequiresPaymentMethod = 0,
    RequiresConfirmation = 1,
    Succeeded = 2,
    Canceled = 3,
    /// Confirmed with manual capture: the money is held, not taken, until a capture.
    RequiresCapture = 4,
    /// Confirmed, the outcome not known yet (a bank debit): it settles by itself.
    Processing = 5,
    /// Confirmed, waiting on the customer (authentication); cancelable.
    RequiresAction = 6,
}

impl IntentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RequiresPaymentMethod => "requires_payment_method",
            Self::RequiresConfirmation => "requires_confirmation",
            Self::Succeeded => "succeeded",
            Self::Canceled => "canceled",
            Self::RequiresCapture => "requires_capture",
            Self::Processing => "processing",
            Self::RequiresAction => "requires_action",
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::RequiresPaymentMethod,
            1 => Self::RequiresConfirmation,
            2 => Self::Succeeded,
            3 => Self::Canceled,
            4 => Self::RequiresCapture,
            5 => Self::Processing,
            6 => Self::RequiresAction,
            _ => return None,
        })
    }

    /// Whether the intent can still be confirmed.
    pub fn open(self) -> bool {
        matches!(
            self,
            Self::RequiresPaymentMethod | Self::RequiresConfirmation
        )
    }

    /// Whether the intent can be cancelled: still open, waiting on the customer, or a hold
    /// not captured (a processing one cannot: the money is on its way).
    pub fn cancelable(self) -> bool {
        self.open() || matches!(self, Self::RequiresCapture | Self::RequiresAction)
    }
}

/// A three-letter ISO currency code, lowercase (as Stripe answers it), kept inline.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        (b.len() == 3 && b.iter().all(u8::is_ascii_alphabetic))
            .then(|| Self([b[0], b[1], b[2]].map(|c| c.to_ascii_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII letters get in (`parse`).
        std::str::from_utf8(&self.0).unwrap_or("usd")
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> Self {
        c.as_str().to_owned()
    }
}

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("not a currency: {s:?}"))
    }
}

/// Stripe's metadata: string pairs, sorted by key, few (a Vec, not a tree: two pairs cost
/// one small allocation plus their strings).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata(Vec<(String, String)>);

impl Metadata {
    pub fn new(mut pairs: Vec<(String, String)>) -> Self {
        pairs.sort();
        pairs.dedup_by(|a, b| a.0 == b.0);
        Self(pairs)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn payment_id(&self) -> &str {
        self.get("payment_id").unwrap_or("")
    }
}

/// A refund of (part of) an intent's charge. Its ID is the intent's and its index
/// ([`refund_id`]), so that a refund is found from its ID without an index of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub amount: u64,
    pub created: u64,
    pub metadata: Metadata,
}

/// A PaymentIntent and its refunds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub id: Uuid,
    pub amount: u64,
    pub currency: Currency,
    pub status: IntentStatus,
    pub payment_method: Option<Box<str>>,
    pub metadata: Metadata,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub canceled_at: Option<u64>,
    /// The last confirmation was declined (`last_payment_error`).
    pub declined: bool,
    pub refunds: Vec<Refund>,
    /// Created with `capture_method=manual`: a confirmation places a hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub capture_manual: bool,
    /// What a capture took, when it took less than the whole amount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_captured: Option<u64>,
    /// A processing intent: when it settles by itself (milliseconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settles_at: Option<u64>,
}

impl Intent {
    pub fn id(&self) -> String {
        intent_id(&self.id)
    }

    pub fn amount_refunded(&self) -> u64 {
        self.refunds.iter().map(|r| r.amount).sum()
    }

    /// What the intent took (Stripe's `amount_received`): the whole amount once succeeded,
    /// unless a capture took less.
    pub fn amount_received(&self) -> u64 {
        match self.status {
            IntentStatus::Succeeded => self.amount_captured.unwrap_or(self.amount),
            _ => 0,
        }
    }

    /// The intent as it was when an answer with `status` was given (for a replay).
    pub(crate) fn answered_with(mut self, status: IntentStatus, refunds: usize) -> Self {
        if status != IntentStatus::Canceled {
            self.canceled_at = None;
        }
        if status != IntentStatus::RequiresPaymentMethod && status != IntentStatus::Succeeded {
            self.declined = false;
        }
        self.status = status;
        self.refunds.truncate(refunds);
        self
    }
}

pub fn intent_id(id: &Uuid) -> String {
    format!("pi_{}", id.simple())
}

/// The charge of an intent: one per intent here, named after it.
pub fn charge_id(id: &Uuid) -> String {
    format!("ch_{}", id.simple())
}

pub fn refund_id(intent: &Uuid, n: u16) -> String {
    format!("re_{}{n:04x}", intent.simple())
}

/// Reads `pi_<32 hex>` (or the `ch_` of its charge).
pub fn parse_intent_id(id: &str) -> Option<Uuid> {
    let hex = id.strip_prefix("pi_").or_else(|| id.strip_prefix("ch_"))?;
    (hex.len() == 32)
        .then(|| Uuid::try_parse(hex).ok())
        .flatten()
}

/// Reads `re_<32 hex><4 hex>`: the intent and the refund's index.
pub fn parse_refund_id(id: &str) -> Option<(Uuid, u16)> {
    let hex = id.strip_prefix("re_")?;
    if hex.len() != 36 || !hex.is_ascii() {
        return None;
    }
    let intent = Uuid::try_parse(&hex[..32]).ok()?;
    let n = u16::from_str_radix(&hex[32..], 16).ok()?;
    Some((intent, n))
}

/// A refund as answered: its intent's data joined in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundView {
    pub intent: Uuid,
    pub n: u16,
    pub amount: u64,
    pub currency: Currency,
    pub created: u64,
    pub metadata: Metadata,
}

impl RefundView {
    pub fn of(intent: &Intent, n: u16) -> Option<Self> {
        let r = intent.refunds.get(usize::from(n))?;
        Some(Self {
            intent: intent.id,
            n,
            amount: r.amount,
            currency: intent.currency,
            created: r.created,
            metadata: r.metadata.clone(),
        })
    }

    pub fn id(&self) -> String {
        refund_id(&self.intent, self.n)
    }
}

/// Stripe's error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    /// `invalid_request_error`, `idempotency_error`, `card_error`, `api_error`.
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub decline_code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
    /// For a decline: the intent as it now is.
    pub payment_intent: Option<Box<Intent>>,
}

impl ApiError {
    /// Stripe's answer to an action the intent's status does not allow.
    pub fn unexpected_state(intent: &Intent, action: &str) -> Self {
        ApiError {
            payment_intent: Some(Box::new(intent.clone())),
            ..ApiError::invalid(
                Some("payment_intent_unexpected_state"),
                None,
                format!(
                    "You cannot {action} this PaymentIntent because it has a status of {}.",
                    intent.status.as_str()
                ),
            )
        }
    }

    pub fn invalid(
        code: Option<&'static str>,
        param: Option<&'static str>,
        message: String,
    ) -> Self {
        Self {
            status: 400,
            kind: "invalid_request_error",
            code,
            decline_code: None,
            param,
            message,
            payment_intent: None,
        }
    }

    pub fn missing(what: &str, id: &str, param: Option<&'static str>) -> Self {
        Self {
            status: if param.is_some() { 400 } else { 404 },
            ..Self::invalid(
                Some("resource_missing"),
                param,
                format!("No such {what}: '{id}'"),
            )
        }
    }
}

/// What a call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Intent(Box<Intent>),
    Refund(RefundView),
    Error(ApiError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub body: Body,
    /// The key's first answer, repeated (`Idempotent-Replayed: true`).
    pub replay: bool,
}

impl Reply {
    /// The intent answered with, or declined.
    pub fn intent(&self) -> Option<&Intent> {
        match &self.body {
            Body::Intent(i) => Some(i),
            Body::Error(e) => e.payment_intent.as_deref(),
            Body::Refund(_) => None,
        }
    }

    pub fn status(&self) -> u16 {
        match &self.body {
            Body::Error(e) => e.status,
            _ => 200,
        }
    }
}

/// What an idempotency key's first request answered, small enough to keep for every key (32
/// bytes): the object it answered with and the intent's status then. The answer's body is
/// rendered again from the object when the key is replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRecord {
    /// Digest of the first request's endpoint and parameters.
    pub fingerprint: u64,
    /// When the first request arrived, seconds since the Unix epoch.
    pub at: u32,
    pub kind: AnswerKind,
    /// The intent's status in the answer.
    pub status: IntentStatus,
    /// A refund's index; for an intent, how many refunds it had then.
    pub n: u16,
    /// The intent answered with (or refunded).
    pub intent: Uuid,
}

const _: () = assert!(std::mem::size_of::<KeyRecord>() == 32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AnswerKind {
    /// 200 with the intent.
    Intent = 0,
    /// 402: the confirmation was declined.
    Declined = 1,
    /// 200 with the refund.
    Refund = 2,
    /// 400: the refund asked more than was left.
    RefundTooLarge = 3,
    /// 400: the intent was not in a state for the call.
    UnexpectedState = 4,
}

impl AnswerKind {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Intent,
            1 => Self::Declined,
            2 => Self::Refund,
            3 => Self::RefundTooLarge,
            4 => Self::UnexpectedState,
            _ => return None,
        })
    }
}
