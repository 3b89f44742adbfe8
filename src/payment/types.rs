//! Value types that can only hold valid values: parse, don't validate.
//!
//! Each type checks its invariant once, where it is built; the rest of the code can rely on it.
//! State read back from Restate is checked again on the way in (`serde(try_from)`), so a value
//! written by an older or buggy version cannot slip through unnoticed.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use super::PaymentError;

/// The largest amount accepted, in minor units: 10^12 (ten billion in a two-decimal currency).
pub const MAX_AMOUNT: u64 = 1_000_000_000_000;
/// The longest payment ID accepted, in bytes (the same bound Stripe puts on idempotency keys).
pub const MAX_PAYMENT_ID_LEN: usize = 255;

/// A positive amount of money in minor units (cents for USD), at most [`MAX_AMOUNT`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "u64", into = "u64")]
#[schemars(with = "u64")]
pub struct Amount(u64);

impl Amount {
    pub fn new(minor_units: u64) -> Result<Self, PaymentError> {
        match minor_units {
            0 => Err(PaymentError::invalid("amount must be positive, got 0")),
            n if n > MAX_AMOUNT => Err(PaymentError::invalid(format!(
                "amount must be at most {MAX_AMOUNT} minor units, got {n}"
            ))),
            n => Ok(Self(n)),
        }
    }

    pub fn minor_units(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for Amount {
    type Error = PaymentError;
    fn try_from(value: u64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Amount> for u64 {
    fn from(amount: Amount) -> Self {
        amount.0
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An ISO 4217-style currency code: exactly three upper-case ASCII letters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(String);

impl JsonSchema for Currency {
    fn schema_name() -> Cow<'static, str> {
        "Currency".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "ISO 4217 currency code, three upper-case letters.",
            "type": "string",
            "pattern": "^[A-Z]{3}$",
        })
    }
}

/// A string enum's schema as one `enum` with one `description`, instead of schemars' `oneOf` of
/// a `const` per documented variant: the same values and words in about a third of the JSON
/// nodes. Restate's ingress clones a handler's published schemas on every request it routes
/// (it resolves the handler's metadata by value), so their size is paid on every call; and
/// `enum` is what OpenAPI code generators read as an enumeration. For
/// `#[schemars(transform = string_enum)]` on enums of unit variants.
pub fn string_enum(schema: &mut Schema) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let Some(Value::Array(variants)) = object.get("oneOf") else {
        return;
    };
    let mut values = Vec::with_capacity(variants.len());
    let mut lines = Vec::with_capacity(variants.len());
    for variant in variants {
        let Some(value @ Value::String(name)) = variant.get("const") else {
            return;
        };
        values.push(value.clone());
        if let Some(words) = variant.get("description").and_then(Value::as_str) {
            lines.push(format!("- `{name}`: {}", words.replace('\n', " ")));
        }
    }
    let mut description = object
        .get("description")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_default();
    if !lines.is_empty() {
        if !description.is_empty() {
            description.push_str("\n\n");
        }
        description.push_str(&lines.join("\n"));
    }
    object.remove("oneOf");
    object.insert("type".to_owned(), Value::from("string"));
    object.insert("enum".to_owned(), Value::Array(values));
    if !description.is_empty() {
        object.insert("description".to_owned(), Value::String(description));
    }
}

impl Currency {
    /// The seed's default when the request names no currency.
    pub fn usd() -> Self {
        Self("USD".to_owned())
    }

    pub fn parse(code: &str) -> Result<Self, PaymentError> {
        if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(code.to_owned()))
        } else {
            Err(PaymentError::invalid(format!(
                "currency must be a 3-letter upper-case code such as \"USD\", got {code:?}"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Currency {
    type Error = PaymentError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Currency> for String {
    fn from(currency: Currency) -> Self {
        currency.0
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The payment ID: the virtual object key, chosen by the client, and the root of every
/// gateway idempotency key. Non-empty, at most [`MAX_PAYMENT_ID_LEN`] bytes, no control
/// characters (they would end up in logs and in the gateway's keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PaymentId(String);

impl PaymentId {
    pub fn parse(key: &str) -> Result<Self, PaymentError> {
        if key.is_empty() {
            return Err(PaymentError::invalid("payment ID must not be empty"));
        }
        if key.len() > MAX_PAYMENT_ID_LEN {
            return Err(PaymentError::invalid(format!(
                "payment ID must be at most {MAX_PAYMENT_ID_LEN} bytes, got {}",
                key.len()
            )));
        }
        if key.chars().any(char::is_control) {
            return Err(PaymentError::invalid(
                "payment ID must not contain control characters",
            ));
        }
        Ok(Self(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The gateway idempotency key of this payment's charge. Deterministic, so every attempt
    /// of the charge step, in any process, sends the same key; the `charge:` prefix keeps it
    /// apart from the refund key of the same payment.
    pub fn charge_key(&self) -> String {
        format!("charge:{}", self.0)
    }

    /// The gateway idempotency key of this payment's refund (a payment has at most one), after
    /// `rejected` refunds the gateway refused: it keeps a key's first answer, a refusal too.
    pub fn refund_key(&self, rejected: u32) -> String {
        match rejected {
            0 => format!("refund:{}", self.0),
            n => format!("refund:{}:{}", self.0, n + 1),
        }
    }

    /// The gateway idempotency key of this payment's `n`th refund made with a client's refund
    /// key (`RefundPayment` with `refundKey`). Numbered, not named after the client's key: a
    /// refund the gateway refused, or had no record of once the key expired, is tried again
    /// under the next number, and the number is stored before the call.
    pub fn keyed_refund_key(&self, n: u32) -> String {
        format!("refund:{}:r{n}", self.0)
    }

    /// The gateway idempotency key of the refund that voids a cancelled payment's charge.
    pub fn void_refund_key(&self) -> String {
        format!("void:{}", self.0)
    }

    /// The gateway idempotency key of this payment's capture (a hold is captured at most once).
    pub fn capture_key(&self) -> String {
        format!("capture:{}", self.0)
    }

    /// The gateway idempotency key of the release of this payment's hold.
    pub fn void_hold_key(&self) -> String {
        format!("void-hold:{}", self.0)
    }

    /// The gateway idempotency key of the cancel of a charge the customer did not confirm by
    /// its deadline.
    pub fn unconfirmed_cancel_key(&self) -> String {
        format!("cancel-unconfirmed:{}", self.0)
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A point in time, UTC, written as RFC 3339 with exactly three fractional digits
/// (`2026-11-27T18:04:05.120Z`, never `...05.12Z` nor `...05Z`).
///
/// Reading the clock is a side effect: [`Timestamp::now`] may only be called inside a
/// journaled `ctx.run` step, so that a replay sees the recorded value, never a new one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub struct Timestamp(
    #[serde(with = "rfc3339_millis")]
    #[schemars(with = "String")]
    OffsetDateTime,
);

impl Timestamp {
    /// The current time, truncated to milliseconds. Only inside a journaled step.
    pub fn now() -> Self {
        let now = OffsetDateTime::now_utc();
        let millis = now.millisecond();
        Self(now.replace_millisecond(millis).unwrap_or(now))
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_millis(self) -> i64 {
        (self.0.unix_timestamp_nanos() / 1_000_000) as i64
    }

    /// `self` plus `d`, truncated to milliseconds; `None` out of the representable range.
    pub fn checked_add(self, d: std::time::Duration) -> Option<Self> {
        let millis = i64::try_from(d.as_millis()).ok()?;
        Self::from_unix_millis(self.unix_millis().checked_add(millis)?)
    }

    /// Milliseconds from `earlier` to `self` (negative if `earlier` is later).
    pub fn millis_since(self, earlier: Timestamp) -> i64 {
        self.unix_millis() - earlier.unix_millis()
    }

    /// The inverse of [`Timestamp::unix_millis`]; `None` out of the representable range.
    pub fn from_unix_millis(millis: i64) -> Option<Self> {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
            .ok()
            .map(Self)
    }
}

/// RFC 3339 in UTC with milliseconds, always three digits: what clients read. Any RFC 3339
/// time is read back (in UTC, truncated to milliseconds).
mod rfc3339_millis {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use time::format_description::well_known::Rfc3339;
    use time::{OffsetDateTime, UtcOffset};

    pub fn serialize<S: Serializer>(at: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(crate::rfc3339::utc::<3>(*at).as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        let at = OffsetDateTime::parse(&text, &Rfc3339).map_err(D::Error::custom)?;
        let utc = at.to_offset(UtcOffset::UTC);
        Ok(utc.replace_millisecond(utc.millisecond()).unwrap_or(utc))
    }
}

/// A [`Timestamp`] as integer milliseconds since the Unix epoch (`#[serde(with = ...)]`): the
/// compact form for journaled step results, whose every byte crosses restate-server's log and
/// storage. Stored state and answers keep RFC 3339.
pub mod epoch_millis {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::Timestamp;

    pub fn serialize<S: Serializer>(ts: &Timestamp, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_i64(ts.unix_millis())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        let millis = i64::deserialize(deserializer)?;
        Timestamp::from_unix_millis(millis)
            .ok_or_else(|| D::Error::custom(format!("timestamp out of range: {millis} ms")))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(crate::rfc3339::utc::<3>(self.0).as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_enum_is_published_as_one_enum_with_each_value_described() {
        let schema = schemars::schema_for!(super::super::PaymentStatus).to_value();
        assert_eq!(schema.get("oneOf"), None, "{schema}");
        assert_eq!(schema["type"], "string");
        let values: Vec<&str> = schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            values,
            [
                "pending",
                "completed",
                "failed",
                "refunded",
                "partially_refunded",
                "canceled",
                "authorized"
            ]
        );
        let description = schema["description"].as_str().unwrap();
        assert!(description.starts_with("Where a payment is in its life.\n\n- `pending`: "));
        for value in values {
            assert!(description.contains(&format!("\n- `{value}`: ")), "{value}");
        }
        // Optional, it also allows null, in the one `enum`.
        let optional = schemars::schema_for!(Option<super::super::CaptureMethod>).to_value();
        assert_eq!(
            optional["enum"],
            serde_json::json!(["automatic", "manual", null])
        );
        assert_eq!(optional["type"], serde_json::json!(["string", "null"]));
    }

    #[test]
    fn a_schema_that_is_not_a_string_enum_is_left_as_it_is() {
        let mut mixed: Schema = json_schema!({"oneOf": [{"const": "a"}, {"type": "integer"}]});
        let before = mixed.clone();
        string_enum(&mut mixed);
        assert_eq!(mixed, before);
    }

    #[test]
    fn amount_bounds() {
        assert!(Amount::new(0).is_err());
        assert_eq!(Amount::new(1).unwrap().minor_units(), 1);
        assert_eq!(Amount::new(MAX_AMOUNT).unwrap().minor_units(), MAX_AMOUNT);
        assert!(Amount::new(MAX_AMOUNT + 1).is_err());
    }

    #[test]
    fn amount_rejects_invalid_state_on_deserialize() {
        assert!(serde_json::from_str::<Amount>("0").is_err());
        assert!(serde_json::from_str::<Amount>("-5").is_err());
        assert_eq!(
            serde_json::from_str::<Amount>("10000")
                .unwrap()
                .minor_units(),
            10000
        );
    }

    #[test]
    fn currency_codes() {
        for ok in ["USD", "EUR", "JPY"] {
            assert_eq!(Currency::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["usd", "US", "EURO", "", "U$D", "ÜSD", "12A"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn payment_id_rules() {
        assert!(PaymentId::parse("payment-001").is_ok());
        assert!(PaymentId::parse("pagamento-€-ü").is_ok());
        assert!(PaymentId::parse("").is_err());
        assert!(PaymentId::parse("a\u{0}b").is_err());
        assert!(PaymentId::parse("line\nbreak").is_err());
        assert!(PaymentId::parse(&"x".repeat(MAX_PAYMENT_ID_LEN)).is_ok());
        assert!(PaymentId::parse(&"x".repeat(MAX_PAYMENT_ID_LEN + 1)).is_err());
    }

    #[test]
    fn idempotency_keys_are_deterministic_and_distinct() {
        let id = PaymentId::parse("payment-001").unwrap();
        assert_eq!(
            id.charge_key(),
            PaymentId::parse("payment-001").unwrap().charge_key()
        );
        assert_ne!(id.charge_key(), id.refund_key(0));
        assert_ne!(id.refund_key(0), id.refund_key(1));
        let other = PaymentId::parse("payment-002").unwrap();
        assert_ne!(id.charge_key(), other.charge_key());
    }

    #[test]
    fn timestamp_is_rfc3339_utc_millis() {
        let ts = Timestamp::now();
        let json = serde_json::to_string(&ts).unwrap();
        assert!(json.ends_with("Z\""), "{json}");
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ts);
        assert_eq!(ts.0.nanosecond() % 1_000_000, 0);
    }

    #[test]
    fn timestamps_always_have_three_fractional_digits() {
        for (millis, text) in [
            (1_764_649_922_510, "2025-12-02T04:32:02.510Z"),
            (1_764_649_920_000, "2025-12-02T04:32:00.000Z"),
            (1_764_649_920_007, "2025-12-02T04:32:00.007Z"),
        ] {
            let ts = Timestamp::from_unix_millis(millis).unwrap();
            assert_eq!(ts.to_string(), text);
            assert_eq!(serde_json::to_string(&ts).unwrap(), format!("\"{text}\""));
            assert_eq!(
                serde_json::from_str::<Timestamp>(&format!("\"{text}\"")).unwrap(),
                ts
            );
        }
        // Any RFC 3339 time reads back, in UTC.
        let ts: Timestamp = serde_json::from_str("\"2025-12-02T05:32:02.51+01:00\"").unwrap();
        assert_eq!(ts.to_string(), "2025-12-02T04:32:02.510Z");
    }

    #[test]
    fn epoch_millis_round_trips_a_timestamp() {
        #[derive(Serialize, Deserialize)]
        struct Step(#[serde(with = "epoch_millis")] Timestamp);
        let ts = Timestamp::now();
        let json = serde_json::to_string(&Step(ts)).unwrap();
        assert_eq!(json, ts.unix_millis().to_string());
        assert_eq!(serde_json::from_str::<Step>(&json).unwrap().0, ts);
        assert_eq!(
            Timestamp::from_unix_millis(1_700_000_000_123)
                .unwrap()
                .to_string(),
            "2023-11-14T22:13:20.123Z"
        );
        assert!(serde_json::from_str::<Step>(&i64::MAX.to_string()).is_err());
    }
}
