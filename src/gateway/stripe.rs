//! The Stripe gateway: [`PaymentGateway`] over Stripe's REST API (PaymentIntents and Refunds),
//! through `async-stripe`'s client. The mapping is the one of the Stripe API subset the project
//! agreed on (charge, refund, void, look-ups, errors); Stripe's rules win where they differ.
//!
//! * Every POST carries the request's idempotency key in `Idempotency-Key` (the client's
//!   [`RequestStrategy::Idempotent`]); Stripe keeps the first answer for a key for 24 hours
//!   and replays it, so a retry of a call whose answer was lost cannot charge twice.
//! * The client sends each request once and sets no timeout of its own: retries and the
//!   per-attempt timeout are the service's, in one place (`gateway::with_retries`).
//! * Answers are read through narrow views ([`Intent`], `RefundView`) of the fields used
//!   here, not `async-stripe`'s full types, which require every field of API version
//!   2026-09-30.endive: a successful charge must not read as "unknown" because an answer
//!   lacks a field the adapter never reads (localstripe's objects lack several).
//! * An intent is created with its own request (not `CreatePaymentIntent`), so that the
//!   payment-method-types list can be left out for fakes that predate
//!   `allowed_payment_method_types` (see [`StripeConfig::allowed_payment_method_types`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use ::stripe::{ApiErrors, ApiErrorsType, Client, ClientBuilder, RequestStrategy, StripeError};
use ::stripe::{IdempotencyKey, StripeRequest as _};
use async_trait::async_trait;
use stripe_client_core::{RequestBuilder, StripeMethod};
use stripe_core::payment_intent::{
    CancelPaymentIntent, CapturePaymentIntent, RetrievePaymentIntent, SearchPaymentIntent,
};
use stripe_core::refund::{CreateRefund, ListRefund};
use uuid::Uuid;

use super::mock::DECLINE_REASON;
use super::{
    CaptureRequest, CaptureResponse, ChargeLookup, ChargeRequest, ChargeResponse, GatewayError,
    PaymentGateway, RefundRequest, RefundResponse, VoidHoldRequest, VoidRequest, VoidResponse,
    refund_in_full, void_charged,
};

/// Stripe's own API.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com";
/// Stripe's test payment method that always succeeds (test mode only).
pub const DEFAULT_PAYMENT_METHOD: &str = "pm_card_visa";
/// The longest idempotency key Stripe takes.
const MAX_KEY_LEN: usize = 255;
/// Page size of the look-ups (Stripe's maximum).
const PAGE: i64 = 100;
/// Pages a look-up reads at most: a payment has a handful of intents and refunds, never
/// thousands; a gateway that keeps paging is not to be followed forever.
const MAX_PAGES: usize = 20;

/// A Stripe secret key. Never printed: its `Debug` and `Display` show only its kind.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({self})")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // "sk_test_…" or "rk_live_…", no more.
        let kind = ["sk_test_", "sk_live_", "rk_test_", "rk_live_"]
            .into_iter()
            .find(|kind| self.0.starts_with(kind))
            .unwrap_or("");
        write!(f, "{kind}… (redacted)")
    }
}

impl FromStr for ApiKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("the Stripe API key must not be empty".to_owned());
        }
        Ok(Self(s.to_owned()))
    }
}

/// How to reach Stripe, and what to charge with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeConfig {
    pub api_key: ApiKey,
    /// Stripe's API (`https://api.stripe.com`), or a fake of it for tests.
    pub api_base: String,
    /// The payment method every charge uses (`pm_card_visa`, Stripe's test card, by default).
    pub payment_method: String,
    /// Sent as `allowed_payment_method_types[]` (`card` by default: a card confirmed on the
    /// server needs no redirect, so no `return_url`). Empty sends none: for fakes of older API
    /// versions that refuse the parameter, such as localstripe.
    pub allowed_payment_method_types: Vec<String>,
}

impl StripeConfig {
    /// Stripe's API with its test card; the key is all one must give.
    pub fn new(api_key: ApiKey) -> Self {
        Self {
            api_key,
            api_base: DEFAULT_API_BASE.to_owned(),
            payment_method: DEFAULT_PAYMENT_METHOD.to_owned(),
            allowed_payment_method_types: vec!["card".to_owned()],
        }
    }
}

/// [`PaymentGateway`] over Stripe's API (see the module doc).
#[derive(Debug, Clone)]
pub struct StripeGateway {
    client: Client,
    config: StripeConfig,
}

impl StripeGateway {
    pub fn new(config: StripeConfig) -> anyhow::Result<Self> {
        // The client appends `v1/...` to the base as it is: it must end with a slash.
        let mut base = config.api_base.clone();
        if !base.ends_with('/') {
            base.push('/');
        }
        let client = ClientBuilder::new(config.api_key.expose())
            .url(base)
            // One attempt per call, no timeout: the service retries and times out each
            // attempt itself. (`Once` is the client's default; said here so it stays so.)
            .request_strategy(RequestStrategy::Once)
            .build()
            .map_err(|e| anyhow::anyhow!("configuring the Stripe client: {e}"))?;
        Ok(Self { client, config })
    }

    /// `GET /v1/payment_intents/:id`.
    pub async fn retrieve_intent(&self, id: &str) -> Result<Intent, GatewayError> {
        RetrievePaymentIntent::new(id)
            .build()
            .customize::<Intent>()
            .send(&self.client)
            .await
            .map_err(|e| classify(&e))
    }

    /// `POST /v1/payment_intents` for `charge`, confirmed or not, with the charge's key.
    async fn create_intent(
        &self,
        charge: &ChargeRequest,
        confirm: bool,
    ) -> Result<Intent, StripeError> {
        let mut metadata = BTreeMap::from([("payment_id", charge.payment_id.as_str())]);
        if !charge.customer_id.is_empty() {
            metadata.insert("customer_id", charge.customer_id.as_str());
        }
        let params = CreateIntent {
            amount: charge.amount,
            currency: charge.currency.to_ascii_lowercase(),
            confirm,
            payment_method: &self.config.payment_method,
            allowed_payment_method_types: &self.config.allowed_payment_method_types,
            metadata,
            capture_method: charge.manual_capture.then_some("manual"),
        };
        RequestBuilder::new(StripeMethod::Post, "/payment_intents")
            .form(&params)
            .customize::<Intent>()
            .request_strategy(idempotent(&charge.idempotency_key))
            .send(&self.client)
            .await
    }

    async fn cancel_intent(&self, id: &str, key: &str) -> Result<Intent, StripeError> {
        CancelPaymentIntent::new(id)
            .build()
            .customize::<Intent>()
            .request_strategy(idempotent(key))
            .send(&self.client)
            .await
    }

    /// Cancels the unconfirmed intent `intent` that `void` spent the charge's key on.
    async fn cancel_unconfirmed(
        &self,
        request: &VoidRequest,
        intent: Intent,
    ) -> Result<VoidResponse, GatewayError> {
        match intent.status.as_str() {
            "canceled" => return Ok(VoidResponse::NothingCharged),
            // Not for an intent created unconfirmed, unless someone else confirmed it.
            "succeeded" => return refund_in_full(self, request, intent.id).await,
            _ => {}
        }
        // Cancelled as a hold is released: canceled already counts (an earlier void whose
        // cancel key has expired since).
        self.void_hold(VoidHoldRequest {
            idempotency_key: format!("{}:cancel", request.charge.idempotency_key),
            payment_id: request.charge.payment_id.clone(),
            charge_id: intent.id,
        })
        .await?;
        Ok(VoidResponse::NothingCharged)
    }
}

#[async_trait]
impl PaymentGateway for StripeGateway {
    async fn charge(&self, request: ChargeRequest) -> Result<ChargeResponse, GatewayError> {
        match self.create_intent(&request, true).await {
            Ok(intent) => ChargeResponse::of_status(intent.id, &intent.status),
            // 402: the card was declined (Stripe's card errors); the intent is left
            // `requires_payment_method` and took no money.
            Err(StripeError::Stripe(error, 402)) => Ok(ChargeResponse::Declined {
                reason: decline_reason(&error),
            }),
            Err(e) => Err(classify(&e)),
        }
    }

    async fn refund(&self, request: RefundRequest) -> Result<RefundResponse, GatewayError> {
        let metadata = HashMap::from([
            ("payment_id".to_owned(), request.payment_id.clone()),
            (
                "idempotency_key".to_owned(),
                request.idempotency_key.clone(),
            ),
        ]);
        let amount = i64::try_from(request.amount)
            .map_err(|_| GatewayError::Rejected(format!("amount {} too large", request.amount)))?;
        CreateRefund::new()
            .payment_intent(request.charge_id.as_str())
            .amount(amount)
            .metadata(metadata)
            .build()
            .customize::<RefundView>()
            .request_strategy(idempotent(&request.idempotency_key))
            .send(&self.client)
            .await
            .map(|refund| RefundResponse {
                refund_id: refund.id,
            })
            .map_err(|e| classify(&e))
    }

    async fn void(&self, request: VoidRequest) -> Result<VoidResponse, GatewayError> {
        // The charge's own key on a request that moves no money: if the charge has not
        // reached Stripe, its key is now spent and the charge is refused when it arrives.
        match self.create_intent(&request.charge, false).await {
            Ok(intent) => self.cancel_unconfirmed(&request, intent).await,
            // The key is taken by other parameters: the charge itself reached Stripe first.
            // Its first answer, replayed, tells what it did.
            Err(StripeError::Stripe(error, 400))
                if matches!(error.type_, ApiErrorsType::IdempotencyError) =>
            {
                let charged = self.charge(request.charge.clone()).await?;
                void_charged(self, &request, charged).await
            }
            Err(e) => Err(classify(&e)),
        }
    }

    async fn capture(&self, request: CaptureRequest) -> Result<CaptureResponse, GatewayError> {
        let amount = i64::try_from(request.amount)
            .map_err(|_| GatewayError::Rejected(format!("amount {} too large", request.amount)))?;
        let intent = CapturePaymentIntent::new(request.charge_id.as_str())
            .amount_to_capture(amount)
            .build()
            .customize::<Intent>()
            .request_strategy(idempotent(&request.idempotency_key))
            .send(&self.client)
            .await
            .map_err(|e| classify(&e))?;
        match intent.status.as_str() {
            "succeeded" => Ok(CaptureResponse {
                amount: intent.amount_received.unwrap_or(request.amount),
            }),
            other => Err(GatewayError::Unknown(format!(
                "payment intent {} is {other} after a capture",
                intent.id
            ))),
        }
    }

    async fn void_hold(&self, request: VoidHoldRequest) -> Result<(), GatewayError> {
        match self
            .cancel_intent(&request.charge_id, &request.idempotency_key)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match classify(&e) {
                unknown @ GatewayError::Unknown(_) => Err(unknown),
                // Released already under another key, or captured: its state tells.
                rejected => match self
                    .retrieve_intent(&request.charge_id)
                    .await?
                    .status
                    .as_str()
                {
                    "canceled" => Ok(()),
                    _ => Err(rejected),
                },
            },
        }
    }

    async fn find_charge(&self, payment_id: &str) -> Result<ChargeLookup, GatewayError> {
        // Stripe's search is eventually consistent (an intent is searchable within a minute,
        // up to an hour during outages): this is the last look-up, long after the charge.
        let query = search_query(payment_id);
        let mut seen = Vec::new();
        let mut page: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut search = SearchPaymentIntent::new(query.as_str()).limit(PAGE);
            if let Some(next) = page.take() {
                search = search.page(next);
            }
            let found = search
                .build()
                .customize::<SearchPage>()
                .send(&self.client)
                .await
                .map_err(|e| classify(&e))?;
            for intent in found.data {
                if intent.status == "succeeded" {
                    return Ok(ChargeLookup::Charged {
                        charge_id: intent.id,
                    });
                }
                seen.push(intent);
            }
            match found.next_page {
                Some(next) if found.has_more => page = Some(next),
                _ => return Ok(not_charged(payment_id, seen)),
            }
        }
        Err(GatewayError::Unknown(format!(
            "more than {MAX_PAGES} pages of payment intents for payment {payment_id:?}"
        )))
    }

    async fn check_charge(&self, charge_id: &str) -> Result<ChargeLookup, GatewayError> {
        let intent = self.retrieve_intent(charge_id).await?;
        Ok(ChargeLookup::of_status(intent.id, &intent.status))
    }

    async fn find_refund(
        &self,
        request: &RefundRequest,
    ) -> Result<Option<RefundResponse>, GatewayError> {
        let mut after: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut list = ListRefund::new()
                .payment_intent(request.charge_id.as_str())
                .limit(PAGE);
            if let Some(last) = after.take() {
                list = list.starting_after(last);
            }
            let found = list
                .build()
                .customize::<RefundPage>()
                .send(&self.client)
                .await
                .map_err(|e| classify(&e))?;
            let last = found.data.last().map(|r| r.id.clone());
            if let Some(refund) = found.data.into_iter().find(|r| {
                r.metadata
                    .as_ref()
                    .and_then(|m| m.get("idempotency_key"))
                    .is_some_and(|key| *key == request.idempotency_key)
            }) {
                return Ok(Some(RefundResponse {
                    refund_id: refund.id,
                }));
            }
            match last {
                Some(last) if found.has_more => after = Some(last),
                _ => return Ok(None),
            }
        }
        Err(GatewayError::Unknown(format!(
            "more than {MAX_PAGES} pages of refunds for {}",
            request.charge_id
        )))
    }
}

/// The parameters of `POST /v1/payment_intents`, form-encoded by the client
/// (`metadata[payment_id]=…`, `allowed_payment_method_types[0]=card`).
#[derive(serde::Serialize)]
struct CreateIntent<'a> {
    amount: u64,
    currency: String,
    confirm: bool,
    payment_method: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    allowed_payment_method_types: &'a [String],
    metadata: BTreeMap<&'static str, &'a str>,
    /// `manual` for a hold; left out (Stripe's `automatic`) otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    capture_method: Option<&'static str>,
}

/// A payment intent, as far as the adapter reads it.
#[derive(Debug, Clone, miniserde::Deserialize)]
pub struct Intent {
    pub id: String,
    pub status: String,
    pub amount: Option<u64>,
    /// What a capture took (Stripe's `amount_received`).
    pub amount_received: Option<u64>,
    pub metadata: Option<HashMap<String, String>>,
}

#[derive(miniserde::Deserialize)]
struct SearchPage {
    data: Vec<Intent>,
    has_more: bool,
    next_page: Option<String>,
}

/// A refund, as far as the adapter reads it.
#[derive(Debug, miniserde::Deserialize)]
struct RefundView {
    id: String,
    metadata: Option<HashMap<String, String>>,
}

#[derive(miniserde::Deserialize)]
struct RefundPage {
    data: Vec<RefundView>,
    has_more: bool,
}

/// The look-up of a payment none of whose intents `seen` succeeded: a hold, or one that may
/// still take money (not a "no"), speaks for it; else nothing was charged.
fn not_charged(payment_id: &str, seen: Vec<Intent>) -> ChargeLookup {
    let pending = seen
        .iter()
        .map(|i| ChargeLookup::of_status(i.id.clone(), &i.status))
        .filter(|l| !matches!(l, ChargeLookup::NotCharged { .. }))
        .min_by_key(ChargeLookup::rank);
    if let Some(pending) = pending {
        return pending;
    }
    let reason = if seen.is_empty() {
        format!("no payment intent for payment {payment_id:?}")
    } else {
        let intents: Vec<String> = seen
            .iter()
            .map(|i| format!("{} {}", i.id, i.status))
            .collect();
        format!(
            "no payment intent of payment {payment_id:?} succeeded ({})",
            intents.join(", ")
        )
    };
    ChargeLookup::NotCharged { reason }
}

/// Stripe's search query for the intents whose `metadata[payment_id]` is `payment_id`
/// (a quote or a backslash in the value escaped with a backslash).
fn search_query(payment_id: &str) -> String {
    let mut value = String::with_capacity(payment_id.len());
    for c in payment_id.chars() {
        if matches!(c, '\'' | '\\') {
            value.push('\\');
        }
        value.push(c);
    }
    format!("metadata['payment_id']:'{value}'")
}

/// The request strategy that sends `key` as `Idempotency-Key`, once.
fn idempotent(key: &str) -> RequestStrategy {
    RequestStrategy::Idempotent(idempotency_key(key))
}

/// `key` as Stripe takes it: as it is if it fits (at most 255 characters, visible ASCII: an
/// HTTP header), else a digest of it, the same for the same key (a payment ID may be 255
/// bytes of any script, and the service's keys add a prefix).
fn idempotency_key(key: &str) -> IdempotencyKey {
    let fits = key.len() <= MAX_KEY_LEN
        && !key.is_empty()
        && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    let key = if fits {
        key.to_owned()
    } else {
        // "charge:…" stays "charge:v5-<digest>", so the kind is still readable.
        let kind = key
            .split_once(':')
            .map(|(kind, _)| kind)
            .filter(|k| {
                !k.is_empty() && k.len() <= 32 && k.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .unwrap_or("key");
        format!(
            "{kind}:v5-{}",
            Uuid::new_v5(&Uuid::NAMESPACE_OID, key.as_bytes()).simple()
        )
    };
    IdempotencyKey::new(key).expect("a key of 1 to 255 characters")
}

/// The reason of a decline, as the service reports it: the seed's words for insufficient
/// funds, else Stripe's message.
fn decline_reason(error: &ApiErrors) -> String {
    match error.decline_code.as_deref() {
        Some("insufficient_funds") => DECLINE_REASON.to_owned(),
        _ => error
            .message
            .clone()
            .unwrap_or_else(|| describe(error, 402)),
    }
}

/// Unknown (the gateway may have acted: a retry with the same key, or a look-up, tells) or
/// rejected (final: the request was refused and did nothing).
fn classify(error: &StripeError) -> GatewayError {
    match error {
        StripeError::Stripe(api, status) => {
            let text = describe(api, *status);
            match status {
                // 401/403: the key is wrong or lacks rights; fixing the configuration lets
                // a later attempt through. 409: the key's first request is still running (or
                // another conflict); 429: rate limited; 5xx: Stripe's side.
                401 | 403 | 409 | 429 => GatewayError::Unknown(text),
                400..=499 => GatewayError::Rejected(text),
                _ => GatewayError::Unknown(text),
            }
        }
        // Refused or reset connections, timeouts, an answer that could not be read (its
        // status is lost with it): the request may have been carried out.
        StripeError::ClientError(_)
        | StripeError::Timeout
        | StripeError::JSONDeserialize(_)
        | StripeError::ConfigError(_) => GatewayError::Unknown(format!("stripe: {error}")),
    }
}

/// `402 card_error card_declined/insufficient_funds: Your card has insufficient funds.`
fn describe(error: &ApiErrors, status: u16) -> String {
    let mut text = format!("{status} {}", error.type_.as_str());
    if let Some(code) = &error.code {
        text.push(' ');
        text.push_str(code.as_str());
    }
    if let Some(decline) = &error.decline_code {
        text.push('/');
        text.push_str(decline);
    }
    if let Some(message) = &error.message {
        text.push_str(": ");
        text.push_str(message);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_fit_are_sent_as_they_are() {
        assert_eq!(
            idempotency_key("charge:payment-001").as_str(),
            "charge:payment-001"
        );
        let longest = "k".repeat(MAX_KEY_LEN);
        assert_eq!(idempotency_key(&longest).as_str(), longest);
    }

    #[test]
    fn keys_that_do_not_fit_become_a_stable_digest() {
        let long = format!("charge:{}", "p".repeat(255));
        let digest = idempotency_key(&long);
        assert!(digest.as_str().starts_with("charge:v5-"), "{digest:?}");
        assert!(digest.as_str().len() <= MAX_KEY_LEN);
        assert_eq!(digest, idempotency_key(&long));
        assert_ne!(digest, idempotency_key(&format!("{long}x")));
        let unicode = idempotency_key("refund:pagamento-€-ü");
        assert!(unicode.as_str().starts_with("refund:v5-"), "{unicode:?}");
        assert!(unicode.as_str().is_ascii());
        assert_ne!(
            idempotency_key("charge:pagamento-€-ü"),
            idempotency_key("charge:pagamento-€-ö")
        );
    }

    #[test]
    fn search_values_are_quoted_and_escaped() {
        assert_eq!(search_query("p-1"), r"metadata['payment_id']:'p-1'");
        assert_eq!(
            search_query(r"it's\x"),
            r"metadata['payment_id']:'it\'s\\x'"
        );
    }

    #[test]
    fn the_api_key_is_never_printed() {
        let key: ApiKey = "sk_test_51Hsecretsecret".parse().unwrap();
        let config = StripeConfig::new(key.clone());
        for shown in [format!("{key}"), format!("{key:?}"), format!("{config:?}")] {
            assert!(!shown.contains("secret"), "{shown}");
        }
        assert!(format!("{key}").starts_with("sk_test_"));
        assert!(!format!("{:?}", ApiKey::new("plainsecret")).contains("secret"));
        assert!("".parse::<ApiKey>().is_err());
    }
}
