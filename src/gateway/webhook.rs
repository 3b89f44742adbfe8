//! Stripe's webhook signatures: the `Stripe-Signature` header, `t=<unix seconds>,v1=<hex>`,
//! where `v1` is HMAC-SHA256, keyed by the endpoint's signing secret, over `<t>.<raw body>`.
//! An event is accepted only when one `v1` matches (compared in constant time: several appear
//! while a secret is rolled) and `t` is within the tolerance of now (300 s, as Stripe's own
//! libraries), so that a captured event cannot be replayed later.
//!
//! Not `async-stripe-webhook`: its check reads the wall clock itself and it decodes every
//! event type Stripe has; the service needs the check, with a clock it passes in, and a few
//! fields of one event type.

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a signature's timestamp may be from now, either way.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Why a webhook's signature was refused (each a 4xx to the sender).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header")]
    Missing,
    #[error("the Stripe-Signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error("no v1 signature of the Stripe-Signature header matches the body")]
    NoMatch,
    #[error(
        "the signature's timestamp is {off_secs} s away from now, past the tolerance of {tolerance_secs} s"
    )]
    OutsideTolerance { off_secs: u64, tolerance_secs: u64 },
}

/// A webhook endpoint's signing secret (`whsec_…`): never printed.
#[derive(Clone)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    fn mac(&self, timestamp: i64, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.0.as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        mac
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(…)")
    }
}

/// Checks `header` (the `Stripe-Signature` value, if any) against the raw `payload`, at
/// `now` (Unix seconds).
pub fn verify(
    header: Option<&str>,
    payload: &[u8],
    secret: &WebhookSecret,
    now: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        let (name, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed("a part without `=`"))?;
        match name {
            "t" => {
                let t = value
                    .parse::<i64>()
                    .map_err(|_| SignatureError::Malformed("the timestamp is not a number"))?;
                if timestamp.replace(t).is_some() {
                    return Err(SignatureError::Malformed("two timestamps"));
                }
            }
            // A signature that is not hex matches nothing; the others may still match.
            "v1" => signatures.extend(hex::decode(value).ok()),
            // Other schemes (`v0`, Stripe's test scheme) are not signatures of this kind.
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed("no timestamp"))?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed("no v1 signature"));
    }
    let mac = secret.mac(timestamp, payload);
    if !signatures
        .iter()
        .any(|s| mac.clone().verify_slice(s).is_ok())
    {
        return Err(SignatureError::NoMatch);
    }
    let off = now.abs_diff(timestamp);
    if off > tolerance.as_secs() {
        return Err(SignatureError::OutsideTolerance {
            off_secs: off,
            tolerance_secs: tolerance.as_secs(),
        });
    }
    Ok(())
}

/// The `Stripe-Signature` header Stripe would send for `payload` at `timestamp`: what the
/// mock gateway signs its webhooks with, and the tests.
pub fn sign(payload: &[u8], secret: &WebhookSecret, timestamp: i64) -> String {
    let tag = secret.mac(timestamp, payload).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(tag))
}

/// What a PaymentIntent event reports, as far as the service reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentEvent {
    /// `evt_…`: Stripe delivers an event at least once, so this is what repeats share.
    pub id: String,
    /// When Stripe created the event, Unix seconds.
    pub created: i64,
    pub kind: IntentEventKind,
    /// The intent (`pi_…`), the service's `chargeId`.
    pub intent: String,
    /// `metadata[payment_id]`: none for an intent this service did not create.
    pub payment_id: Option<String>,
    /// What the intent took (`amount_received`).
    pub amount_received: u64,
}

/// The PaymentIntent events the service acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntentEventKind {
    /// `payment_intent.succeeded`: the money was taken (a charge, or a hold captured).
    Succeeded,
    /// `payment_intent.amount_capturable_updated`: a hold was placed.
    Authorized,
    /// `payment_intent.payment_failed`, with the decline's message.
    Failed { reason: String },
    /// `payment_intent.canceled`.
    Canceled,
}

/// Reads a verified event's payload: `Ok(None)` for an event of another type (acknowledged,
/// and ignored); an error for a payload that is not an event.
pub fn parse_event(payload: &[u8]) -> Result<Option<IntentEvent>, String> {
    let event: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("the event is not JSON: {e}"))?;
    let text = |v: &serde_json::Value, what: &str| {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("the event has no {what}"))
    };
    let id = text(&event["id"], "id")?;
    let created = event["created"]
        .as_i64()
        .ok_or("the event has no created time")?;
    let object = &event["data"]["object"];
    let kind = match text(&event["type"], "type")?.as_str() {
        "payment_intent.succeeded" => IntentEventKind::Succeeded,
        "payment_intent.amount_capturable_updated" => IntentEventKind::Authorized,
        "payment_intent.payment_failed" => IntentEventKind::Failed {
            reason: match object["last_payment_error"]["decline_code"].as_str() {
                Some("insufficient_funds") => super::mock::DECLINE_REASON.to_owned(),
                _ => object["last_payment_error"]["message"]
                    .as_str()
                    .unwrap_or("the payment failed")
                    .to_owned(),
            },
        },
        "payment_intent.canceled" => IntentEventKind::Canceled,
        _ => return Ok(None),
    };
    Ok(Some(IntentEvent {
        id,
        created,
        kind,
        intent: text(&object["id"], "data.object.id")?,
        payment_id: object["metadata"]["payment_id"].as_str().map(str::to_owned),
        amount_received: object["amount_received"].as_u64().unwrap_or(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD: &[u8] = br#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;
    const T: i64 = 1_700_000_000;

    fn secret() -> WebhookSecret {
        WebhookSecret::new("whsec_test_secret")
    }

    fn check(header: &str, payload: &[u8], now: i64) -> Result<(), SignatureError> {
        verify(Some(header), payload, &secret(), now, DEFAULT_TOLERANCE)
    }

    #[test]
    fn a_signature_matches_an_independent_hmac_and_verifies() {
        // Python: hmac.new(b"whsec_test_secret", b"1700000000." + payload, sha256).hexdigest()
        let header = sign(PAYLOAD, &secret(), T);
        assert_eq!(
            header,
            "t=1700000000,v1=22d8dc182f5c588077683bd378368e29765bfe5df2560112b4f28fef120f0e31"
        );
        assert_eq!(check(&header, PAYLOAD, T), Ok(()));
    }

    #[test]
    fn forged_signatures_and_altered_bodies_are_refused() {
        let header = sign(PAYLOAD, &secret(), T);
        let other = sign(PAYLOAD, &WebhookSecret::new("whsec_other"), T);
        assert_eq!(check(&other, PAYLOAD, T), Err(SignatureError::NoMatch));
        let altered = br#"{"id":"evt_1","type":"payment_intent.succeedeD"}"#;
        assert_eq!(check(&header, altered, T), Err(SignatureError::NoMatch));
        // The timestamp is signed too: moving it breaks the signature.
        let moved = header.replace("t=1700000000", "t=1700000001");
        assert_eq!(check(&moved, PAYLOAD, T), Err(SignatureError::NoMatch));
        let flipped = header.replace("v1=22", "v1=23");
        assert_eq!(check(&flipped, PAYLOAD, T), Err(SignatureError::NoMatch));
    }

    #[test]
    fn old_or_future_timestamps_are_refused_past_the_tolerance() {
        let header = sign(PAYLOAD, &secret(), T);
        assert_eq!(check(&header, PAYLOAD, T + 300), Ok(()));
        assert_eq!(check(&header, PAYLOAD, T - 300), Ok(()));
        assert_eq!(
            check(&header, PAYLOAD, T + 301),
            Err(SignatureError::OutsideTolerance {
                off_secs: 301,
                tolerance_secs: 300
            })
        );
        assert!(matches!(
            check(&header, PAYLOAD, T - 3600),
            Err(SignatureError::OutsideTolerance { off_secs: 3600, .. })
        ));
    }

    #[test]
    fn one_matching_v1_among_several_is_enough_and_other_schemes_are_ignored() {
        let good = sign(PAYLOAD, &secret(), T);
        let v1 = good.split_once(",v1=").unwrap().1;
        let rolled = format!("t={T},v1={},v1=zz-not-hex,v0=abc,v1={v1}", "00".repeat(32));
        assert_eq!(check(&rolled, PAYLOAD, T), Ok(()));
        let only_v0 = format!("t={T},v0={v1}");
        assert_eq!(
            check(&only_v0, PAYLOAD, T),
            Err(SignatureError::Malformed("no v1 signature"))
        );
    }

    #[test]
    fn malformed_or_missing_headers_are_refused() {
        assert_eq!(
            verify(None, PAYLOAD, &secret(), T, DEFAULT_TOLERANCE),
            Err(SignatureError::Missing)
        );
        for (header, why) in [
            ("", "a part without `=`"),
            ("v1=00", "no timestamp"),
            ("t=soon,v1=00", "the timestamp is not a number"),
            ("t=1,t=2,v1=00", "two timestamps"),
            ("t=1700000000", "no v1 signature"),
        ] {
            assert_eq!(
                check(header, PAYLOAD, T),
                Err(SignatureError::Malformed(why)),
                "{header:?}"
            );
        }
    }

    #[test]
    fn the_secret_is_never_printed() {
        assert!(!format!("{:?}", secret()).contains("whsec"));
    }

    #[test]
    fn intent_events_are_read_and_other_types_ignored() {
        let event = br#"{"id":"evt_1","type":"payment_intent.payment_failed","created":1700000000,
            "data":{"object":{"id":"pi_1","amount_received":0,"metadata":{"payment_id":"p-1"},
            "last_payment_error":{"decline_code":"insufficient_funds","message":"Your card has insufficient funds."}}}}"#;
        assert_eq!(
            parse_event(event).unwrap(),
            Some(IntentEvent {
                id: "evt_1".into(),
                created: T,
                kind: IntentEventKind::Failed {
                    reason: "insufficient funds".into()
                },
                intent: "pi_1".into(),
                payment_id: Some("p-1".into()),
                amount_received: 0,
            })
        );
        let other = br#"{"id":"evt_2","type":"customer.created","created":1,"data":{"object":{}}}"#;
        assert_eq!(parse_event(other).unwrap(), None);
        assert!(parse_event(b"[]").is_err());
        assert!(
            parse_event(
                br#"{"id":"evt_3","type":"payment_intent.succeeded","created":1,"data":{}}"#
            )
            .is_err()
        );
    }
}
