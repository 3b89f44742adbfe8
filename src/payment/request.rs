//! Parsing client requests into domain values, with messages a client can act on.
//!
//! Bodies are parsed by hand from `serde_json::Value` rather than by a derived `Deserialize`:
//! a derive would answer `"invalid type: string \"100\", expected u64 at line 1 column 15"`,
//! where a payments API should say which field is wrong and what it expects.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Amount, Currency, PaymentError};

/// Longest `description` accepted, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1000;
/// Longest `customerId` accepted, in characters.
pub const MAX_CUSTOMER_ID_CHARS: usize = 255;
/// Longest refund `reason` accepted, in characters.
pub const MAX_REASON_CHARS: usize = 1000;
/// Longest `refundKey` accepted, in characters.
pub const MAX_REFUND_KEY_CHARS: usize = 100;

/// Whether a payment's charge takes the money at once or holds it for a capture.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
// Inline in the published schemas: Restate's OpenAPI document keeps no `$defs` of a body.
#[schemars(inline, transform = crate::payment::types::string_enum)]
pub enum CaptureMethod {
    /// The charge takes the money (the seed's).
    #[default]
    Automatic,
    /// The charge places a hold (`authorized`); `CapturePayment` takes it, `CancelPayment`
    /// releases it, and a hold not captured in time is released by the service.
    Manual,
}

impl CaptureMethod {
    pub fn is_automatic(&self) -> bool {
        *self == Self::Automatic
    }
}

/// A valid request to create (and charge) a payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPayment {
    pub amount: Amount,
    pub currency: Currency,
    pub description: String,
    pub customer_id: String,
    pub capture: CaptureMethod,
}

impl NewPayment {
    /// Parses a `CreatePayment` body: `amount` (required, integer minor units), `currency`
    /// (absent, null or empty means USD, as in the seed), `description`, `customerId`,
    /// `capture` (`automatic`, the default, or `manual`). Unknown fields are ignored.
    pub fn parse(body: &[u8]) -> Result<Self, PaymentError> {
        let mut fields = parse_object(
            body,
            false,
            ["amount", "currency", "description", "customerId", "capture"],
        )?;
        let amount = match fields.get("amount") {
            None | Some(Value::Null) => {
                return Err(PaymentError::invalid(
                    "amount is required: a positive integer of minor units (10000 = 100.00)",
                ));
            }
            Some(value) => Amount::new(whole_units(value)?)?,
        };
        let currency = match optional_string(&mut fields, "currency", 16)? {
            None => Currency::usd(),
            Some(code) if code.is_empty() => Currency::usd(),
            Some(code) => Currency::parse(&code)?,
        };
        Ok(Self {
            amount,
            currency,
            description: optional_string(&mut fields, "description", MAX_DESCRIPTION_CHARS)?
                .unwrap_or_default(),
            customer_id: no_control_characters(
                "customerId",
                optional_string(&mut fields, "customerId", MAX_CUSTOMER_ID_CHARS)?
                    .unwrap_or_default(),
            )?,
            capture: match optional_string(&mut fields, "capture", 16)?.as_deref() {
                None | Some("automatic") => CaptureMethod::Automatic,
                Some("manual") => CaptureMethod::Manual,
                Some(_) => {
                    return Err(PaymentError::invalid(
                        "capture must be \"automatic\" (the default) or \"manual\"",
                    ));
                }
            },
        })
    }
}

/// A valid request to capture a hold: how much of it, or all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureRequest {
    /// `None`: the whole hold.
    pub amount: Option<Amount>,
}

impl CaptureRequest {
    /// Parses a `CapturePayment` body: an optional `amount` (absent or null: the whole hold).
    /// An empty body captures the whole hold.
    pub fn parse(body: &[u8]) -> Result<Self, PaymentError> {
        let fields = parse_object(body, true, ["amount"])?;
        let amount = match fields.get("amount") {
            None | Some(Value::Null) => None,
            Some(value) => Some(Amount::new(whole_units(value)?)?),
        };
        Ok(Self { amount })
    }
}

/// How much of the payment a refund asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundAmount {
    /// `amount` absent, null or 0: the whole payment, as in the seed.
    Full,
    Partial(Amount),
}

/// A valid request to refund a payment. Whether the amount fits the payment is decided
/// against the stored payment (`Payment::refundable_amount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub reason: String,
    pub amount: RefundAmount,
    /// The client's key of a refund of its own; none for the payment's one refund (the seed's).
    pub refund_key: Option<String>,
}

impl RefundRequest {
    /// Parses a `RefundPayment` body: `reason` and optional `amount`. An empty body means a
    /// full refund with no reason.
    pub fn parse(body: &[u8]) -> Result<Self, PaymentError> {
        let mut fields = parse_object(body, true, ["amount", "refundKey", "reason"])?;
        let amount = match fields.get("amount") {
            None | Some(Value::Null) => RefundAmount::Full,
            Some(value) => match whole_units(value)? {
                0 => RefundAmount::Full,
                units => RefundAmount::Partial(Amount::new(units)?),
            },
        };
        let refund_key = optional_string(&mut fields, "refundKey", MAX_REFUND_KEY_CHARS)?;
        if let Some(key) = &refund_key
            && (key.is_empty() || !key.chars().all(is_refund_key_char))
        {
            return Err(PaymentError::invalid(format!(
                "refundKey must be 1 to {MAX_REFUND_KEY_CHARS} characters of A-Z, a-z, 0-9 and . _ : -"
            )));
        }
        Ok(Self {
            reason: optional_string(&mut fields, "reason", MAX_REASON_CHARS)?.unwrap_or_default(),
            amount,
            refund_key,
        })
    }
}

// The bodies' published JSON schemas come from the types below, with the bounds above; the
// parsers (`NewPayment::parse`, `RefundRequest::parse`, `NoInput::parse`) accept exactly what
// the schemas allow. tests/it/schema.rs holds them to it with a schema-driven fuzzer, both at
// the parsers and through Restate's ingress. The doc comments are published: they are for
// clients.

/// Creates and charges a payment. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatePaymentBody {
    /// Amount in minor units of the currency (10000 = 100.00 USD): an integer (`100.0` is 100).
    #[schemars(range(min = 1, max = super::MAX_AMOUNT))]
    pub amount: u64,
    /// ISO 4217 code, three upper-case letters; absent, null or empty means USD.
    #[schemars(regex(pattern = CURRENCY_OR_EMPTY))]
    pub currency: Option<String>,
    /// Free text, kept with the payment.
    #[schemars(length(max = MAX_DESCRIPTION_CHARS))]
    pub description: Option<String>,
    /// The customer's identifier: no control characters.
    #[schemars(length(max = MAX_CUSTOMER_ID_CHARS), regex(pattern = NO_CONTROL_CHARACTERS))]
    pub customer_id: Option<String>,
    /// `automatic` (absent or null: the default) takes the money at once; `manual` holds it
    /// (`authorized`) for `CapturePayment`, or `CancelPayment`, within the hold's window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureMethod>,
}

/// Captures an authorized payment's hold, in full or in part; an absent body captures it all.
/// Unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CapturePaymentBody {
    /// Minor units to capture, at most the amount held; absent or null captures all of it.
    #[schemars(range(min = 1, max = super::MAX_AMOUNT))]
    pub amount: Option<u64>,
}

/// Refunds a completed payment, in full or in part; an absent body refunds in full. Unknown
/// fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefundPaymentBody {
    /// Free text, kept with the refund.
    #[schemars(length(max = MAX_REASON_CHARS))]
    pub reason: Option<String>,
    /// Minor units to refund, at most what is left of the payment; absent, null or 0 refunds
    /// all that is left.
    #[schemars(range(max = super::MAX_AMOUNT))]
    pub amount: Option<u64>,
    /// The client's key of a refund of its own, for refunds in several parts: the same key
    /// answers the same refund, a new key makes a new one, and their total never exceeds the
    /// payment. Absent or null: the payment's one refund, which every repeat answers.
    #[schemars(length(min = 1, max = MAX_REFUND_KEY_CHARS), regex(pattern = REFUND_KEY))]
    pub refund_key: Option<String>,
}

/// A refund key's characters: [`is_refund_key_char`], as the schema states it.
const REFUND_KEY: &str = "^[A-Za-z0-9._:-]*$";

/// What a refund key may hold: enough for a UUID or an order number, nothing a log or a
/// gateway key could misread.
fn is_refund_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// A currency code as the schema states it: [`Currency::parse`]'s rule, or empty for USD.
const CURRENCY_OR_EMPTY: &str = "^([A-Z]{3})?$";
/// No Unicode control character (general category Cc: `char::is_control`).
const NO_CONTROL_CHARACTERS: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";

impl CreatePaymentBody {
    /// A body for `amount` minor units in USD from `customer_id`, without a description.
    pub fn new(amount: u64, customer_id: impl Into<String>) -> Self {
        Self {
            amount,
            currency: Some("USD".to_owned()),
            description: None,
            customer_id: Some(customer_id.into()),
            capture: None,
        }
    }

    /// The same body with manual capture: a hold.
    pub fn held(self) -> Self {
        Self {
            capture: Some(CaptureMethod::Manual),
            ..self
        }
    }

    /// The same body with this description.
    pub fn described(self, description: impl Into<String>) -> Self {
        Self {
            description: Some(description.into()),
            ..self
        }
    }

    /// The same body in this currency.
    pub fn in_currency(self, code: impl Into<String>) -> Self {
        Self {
            currency: Some(code.into()),
            ..self
        }
    }
}

/// Takes no input: no body, or a JSON object (the seed sends `{}`), whose fields are ignored.
#[derive(Debug, JsonSchema)]
pub struct NoInput {}

impl NoInput {
    /// Checks a `GetPayment` body: absent or a JSON object, as the schema says.
    pub fn parse(body: &[u8]) -> Result<Self, PaymentError> {
        parse_object(body, true, []).map(|_| Self {})
    }
}

/// The fields a parser reads, each holding the last value the body gave it (a repeated key
/// counts once, its last value, as in a parsed map). Any other field is parsed, so that the
/// body is valid JSON as a whole, and dropped.
struct Fields<const N: usize> {
    names: [&'static str; N],
    values: [Option<Value>; N],
}

impl<const N: usize> Fields<N> {
    fn get(&self, name: &str) -> Option<&Value> {
        let i = self.names.iter().position(|n| *n == name)?;
        self.values[i].as_ref()
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        let i = self.names.iter().position(|n| *n == name)?;
        self.values[i].take()
    }
}

/// The body must be a JSON object; no body at all is `{}` where `empty_ok`. Whitespace is not
/// "no body": it is not JSON. Only the fields named are kept: a body's other fields (ignored)
/// cost no map of their own.
fn parse_object<const N: usize>(
    body: &[u8],
    empty_ok: bool,
    names: [&'static str; N],
) -> Result<Fields<N>, PaymentError> {
    if body.is_empty() {
        return if empty_ok {
            Ok(Fields {
                names,
                values: std::array::from_fn(|_| None),
            })
        } else {
            Err(PaymentError::invalid(
                "request body is required: a JSON object with amount, currency, description and customerId",
            ))
        };
    }
    let mut json = serde_json::Deserializer::from_slice(body);
    let parsed = serde::de::DeserializeSeed::deserialize(Wanted(names), &mut json)
        .and_then(|top| json.end().map(|()| top));
    match parsed {
        Ok(TopLevel::Object(fields)) => Ok(fields),
        Ok(TopLevel::Other(json_type)) => Err(PaymentError::invalid(format!(
            "request body must be a JSON object, got {json_type}"
        ))),
        Err(e) => Err(PaymentError::invalid(format!(
            "request body is not valid JSON: {e}"
        ))),
    }
}

/// A body's top level: an object's wanted fields, or what else it is ([`json_type`]'s words).
enum TopLevel<const N: usize> {
    Object(Fields<N>),
    Other(&'static str),
}

/// Reads a body's top level, keeping the fields named.
struct Wanted<const N: usize>([&'static str; N]);

impl<'de, const N: usize> serde::de::DeserializeSeed<'de> for Wanted<N> {
    type Value = TopLevel<N>;

    fn deserialize<D: serde::Deserializer<'de>>(self, json: D) -> Result<Self::Value, D::Error> {
        json.deserialize_any(self)
    }
}

impl<'de, const N: usize> serde::de::Visitor<'de> for Wanted<N> {
    type Value = TopLevel<N>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields {
            names: self.0,
            values: std::array::from_fn(|_| None),
        };
        while let Some(wanted) = map.next_key_seed(FieldIndex(&fields.names))? {
            // Parsed as a map would parse it, wanted or not: the same JSON is refused.
            let value = map.next_value::<Value>()?;
            if let Some(i) = wanted {
                fields.values[i] = Some(value);
            }
        }
        Ok(TopLevel::Object(fields))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Value>()?.is_some() {}
        Ok(TopLevel::Other(json_type(&Value::Array(Vec::new()))))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(TopLevel::Other(json_type(&Value::Null)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(TopLevel::Other(json_type(&Value::Bool(false))))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(TopLevel::Other(json_type(&Value::from(0))))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(TopLevel::Other(json_type(&Value::from(0))))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(TopLevel::Other(json_type(&Value::from(0))))
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(TopLevel::Other(json_type(&Value::String(String::new()))))
    }
}

/// A key's position among the names wanted, if it is one of them.
struct FieldIndex<'a>(&'a [&'static str]);

impl<'de> serde::de::DeserializeSeed<'de> for FieldIndex<'_> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, json: D) -> Result<Self::Value, D::Error> {
        json.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FieldIndex<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

/// A count of minor units in `0..=MAX_AMOUNT`, written as a JSON integer. As in JSON Schema,
/// an integer is any number without a fractional part: `100`, `100.0` and `1e2` are all 100
/// (a client's JSON library may write whole numbers either way); `"100"` and `100.5` are not.
/// Exact: every integer up to `MAX_AMOUNT` is exact in an `f64`.
fn whole_units(value: &Value) -> Result<u64, PaymentError> {
    let Value::Number(n) = value else {
        return Err(PaymentError::invalid(format!(
            "amount must be an integer of minor units, got {}",
            json_type(value)
        )));
    };
    let units = match (n.as_u64(), n.as_f64()) {
        (Some(units), _) => units,
        (None, Some(f)) if f < 0.0 => {
            return Err(PaymentError::invalid(format!(
                "amount must be positive, got {n}"
            )));
        }
        (None, Some(f)) if f.fract() != 0.0 => {
            return Err(PaymentError::invalid(format!(
                "amount must be a whole number of minor units (10000 = 100.00), got {n}"
            )));
        }
        // Whole and at most 2^64 here; anything above MAX_AMOUNT saturates and is refused below.
        (None, Some(f)) => f as u64,
        (None, None) => {
            return Err(PaymentError::invalid(format!(
                "amount must be an integer of minor units, got {n}"
            )));
        }
    };
    if units > super::MAX_AMOUNT {
        return Err(PaymentError::invalid(format!(
            "amount must be at most {} minor units, got {n}",
            super::MAX_AMOUNT
        )));
    }
    Ok(units)
}

/// A string field that may be absent or null; any other JSON type is refused.
/// The field is taken out of `fields`: each parser reads a field once.
fn optional_string<const N: usize>(
    fields: &mut Fields<N>,
    name: &str,
    max_chars: usize,
) -> Result<Option<String>, PaymentError> {
    match fields.take(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() > max_chars => Err(PaymentError::invalid(
            format!("{name} must be at most {max_chars} characters"),
        )),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(PaymentError::invalid(format!(
            "{name} must be a string, got {}",
            json_type(&other)
        ))),
    }
}

/// An identifier has no use for control characters, and in a log line they could forge one.
fn no_control_characters(name: &str, value: String) -> Result<String, PaymentError> {
    if value.chars().any(char::is_control) {
        return Err(PaymentError::invalid(format!(
            "{name} must not contain control characters"
        )));
    }
    Ok(value)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_payment(json: &str) -> Result<NewPayment, PaymentError> {
        NewPayment::parse(json.as_bytes())
    }

    fn message(result: Result<impl std::fmt::Debug, PaymentError>) -> String {
        match result.unwrap_err() {
            PaymentError::InvalidRequest(m) => m,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_seed_request() {
        let p = new_payment(
            r#"{"amount": 10000, "currency": "USD", "description": "Premium subscription", "customerId": "cust-alice"}"#,
        )
        .unwrap();
        assert_eq!(p.amount.minor_units(), 10000);
        assert_eq!(p.currency.as_str(), "USD");
        assert_eq!(p.description, "Premium subscription");
        assert_eq!(p.customer_id, "cust-alice");
    }

    #[test]
    fn currency_defaults_to_usd() {
        for body in [
            r#"{"amount": 1}"#,
            r#"{"amount": 1, "currency": null}"#,
            r#"{"amount": 1, "currency": ""}"#,
        ] {
            assert_eq!(
                new_payment(body).unwrap().currency.as_str(),
                "USD",
                "{body}"
            );
        }
    }

    #[test]
    fn refuses_bad_amounts_with_a_reason() {
        let cases = [
            (r#"{}"#, "required"),
            (r#"{"amount": null}"#, "required"),
            (r#"{"amount": 0}"#, "positive"),
            (r#"{"amount": -5}"#, "positive"),
            (r#"{"amount": -5.5}"#, "positive"),
            (r#"{"amount": 10.5}"#, "whole number"),
            (r#"{"amount": "100"}"#, "got a string"),
            (r#"{"amount": true}"#, "got a boolean"),
            (r#"{"amount": [1]}"#, "got an array"),
            (r#"{"amount": 1000000000001}"#, "at most 1000000000000"),
            (r#"{"amount": 18446744073709551616}"#, "at most"),
            (r#"{"amount": 1e300}"#, "at most"),
        ];
        for (body, expected) in cases {
            let msg = message(new_payment(body));
            assert!(msg.contains(expected), "{body}: {msg}");
        }
        assert!(new_payment(r#"{"amount": 1000000000000}"#).is_ok());
    }

    #[test]
    fn whole_numbers_are_integers_as_in_json_schema() {
        for (body, units) in [
            (r#"{"amount": 16764429.0}"#, 16_764_429),
            (r#"{"amount": 1e2}"#, 100),
            (r#"{"amount": 1.0e12}"#, 1_000_000_000_000),
        ] {
            assert_eq!(
                new_payment(body).unwrap().amount.minor_units(),
                units,
                "{body}"
            );
        }
        let parse = |s: &str| RefundRequest::parse(s.as_bytes()).unwrap().amount;
        assert_eq!(parse(r#"{"amount": 0.0}"#), RefundAmount::Full);
        assert_eq!(parse(r#"{"amount": -0.0}"#), RefundAmount::Full);
        assert!(message(new_payment(r#"{"amount": -0.0}"#)).contains("positive"));
    }

    #[test]
    fn refuses_bad_currencies() {
        for body in [
            r#"{"amount": 1, "currency": "usd"}"#,
            r#"{"amount": 1, "currency": "US"}"#,
            r#"{"amount": 1, "currency": "EURO"}"#,
            r#"{"amount": 1, "currency": 5}"#,
        ] {
            assert!(message(new_payment(body)).contains("currency"), "{body}");
        }
    }

    #[test]
    fn refuses_malformed_bodies() {
        assert!(message(new_payment("")).contains("required"));
        // Whitespace is a body, and not JSON.
        assert!(message(new_payment("  ")).contains("not valid JSON"));
        assert!(message(RefundRequest::parse(b" \n")).contains("not valid JSON"));
        assert!(NoInput::parse(b"").is_ok() && NoInput::parse(b"{\"x\": 1}").is_ok());
        assert!(message(NoInput::parse(b"[1]")).contains("JSON object"));
        assert!(message(new_payment("{\"amount\": 1")).contains("not valid JSON"));
        assert!(message(new_payment("[1, 2]")).contains("JSON object"));
        assert!(message(new_payment("\"hello\"")).contains("JSON object"));
        assert!(message(new_payment(r#"{"amount": 1, "customerId": 7}"#)).contains("customerId"));
        let long = format!(r#"{{"amount": 1, "description": "{}"}}"#, "x".repeat(1001));
        assert!(message(new_payment(&long)).contains("at most 1000"));
    }

    #[test]
    fn identifiers_refuse_control_characters() {
        let forged = r#"{"amount": 1, "customerId": "x\n2026-12-02T03:40:00.000000Z  INFO payment completed payment_id=vip"}"#;
        assert!(message(new_payment(forged)).contains("control characters"));
        assert!(
            message(new_payment(r#"{"amount": 1, "customerId": "a\u0007b"}"#))
                .contains("customerId")
        );
        // Free text may hold a line break; it is escaped where it is logged.
        assert!(new_payment(r#"{"amount": 1, "description": "two\nlines"}"#).is_ok());
    }

    #[test]
    fn ignores_unknown_fields() {
        assert!(new_payment(r#"{"amount": 1, "extra": {"nested": true}}"#).is_ok());
    }

    #[test]
    fn refund_amounts() {
        let parse = |s: &str| RefundRequest::parse(s.as_bytes());
        assert_eq!(parse("").unwrap().amount, RefundAmount::Full);
        assert_eq!(parse("{}").unwrap().amount, RefundAmount::Full);
        assert_eq!(
            parse(r#"{"amount": 0}"#).unwrap().amount,
            RefundAmount::Full
        );
        assert_eq!(
            parse(r#"{"reason": "Customer request", "amount": 2500}"#).unwrap(),
            RefundRequest {
                reason: "Customer request".into(),
                amount: RefundAmount::Partial(Amount::new(2500).unwrap()),
                refund_key: None,
            }
        );
        assert_eq!(
            parse(r#"{"refundKey": "return-1.a_b:C"}"#)
                .unwrap()
                .refund_key
                .as_deref(),
            Some("return-1.a_b:C")
        );
        for bad in [r#""""#, r#""a b""#, r#""é""#, r#""a\nb""#, "1"] {
            let body = format!(r#"{{"refundKey": {bad}}}"#);
            assert!(message(parse(&body)).contains("refundKey"), "{body}");
        }
        let longest = "k".repeat(MAX_REFUND_KEY_CHARS);
        assert!(parse(&format!(r#"{{"refundKey": "{longest}"}}"#)).is_ok());
        assert!(parse(&format!(r#"{{"refundKey": "{longest}k"}}"#)).is_err());
        assert!(message(parse(r#"{"amount": -1}"#)).contains("positive"));
        assert!(message(parse(r#"{"amount": 1.5}"#)).contains("whole number"));
        assert!(message(parse(r#"{"reason": 3}"#)).contains("reason"));
        assert!(message(parse("nope")).contains("not valid JSON"));
    }
}
