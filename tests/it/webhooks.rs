//! Stripe's webhooks through the ingress (`POST /StripeWebhooks/Receive`): a signed event
//! settles the payment it names when the payment waits on it; forged, altered and stale events
//! are refused with a 400 and change nothing; every delivery of one event acts once, in any
//! order. On a stack whose gateway never answers, so that payments stay `pending` until an
//! event settles them.

use std::sync::OnceLock;
use std::time::Duration;

use payment_service::gateway::MockConfig;
use payment_service::gateway::webhook::{WebhookSecret, sign};
use payment_service::payment::{PaymentStatus, Timestamp};
use serde_json::{Value, json};
use testkit::stack::Stack;

use crate::helpers::{TestApp, ok, own_stack, seed_payment, spawn_app, unique_id};

pub(crate) const SECRET: &str = "whsec_test_webhooks";

/// The module's stack: every gateway call hangs (the payments stay pending, settled by events).
fn app() -> &'static TestApp {
    static APP: OnceLock<TestApp> = OnceLock::new();
    APP.get_or_init(|| {
        own_stack(
            Stack::builder()
                .gateway(MockConfig {
                    delay: Duration::ZERO,
                    decline_rate: 0.0,
                    hang_rate: 1.0,
                    ..MockConfig::default()
                })
                .service_env("STRIPE_WEBHOOK_SECRET", SECRET)
                .service_env("GATEWAY_ATTEMPT_TIMEOUT", "200ms")
                .service_env("GATEWAY_ATTEMPTS", "1")
                .service_env("SETTLE_FIRST_DELAY", "1s"),
        )
    })
}

pub(crate) fn now() -> i64 {
    Timestamp::now().unix_millis() / 1000
}

/// A PaymentIntent event as Stripe posts it.
pub(crate) fn event(id: &str, kind: &str, intent: &str, payment_id: &str, status: &str) -> Vec<u8> {
    let mut object = json!({
        "id": intent, "object": "payment_intent", "status": status, "amount": 10000,
        "amount_received": if status == "succeeded" { 10000 } else { 0 },
        "metadata": {"payment_id": payment_id},
    });
    if kind == "payment_intent.payment_failed" {
        object["last_payment_error"] = json!({"decline_code": "insufficient_funds",
            "message": "Your card has insufficient funds."});
    }
    serde_json::to_vec(&json!({
        "id": id, "object": "event", "type": kind, "created": now(),
        "data": {"object": object},
    }))
    .unwrap()
}

/// Posts `body` to the webhook endpoint with this `Stripe-Signature` (none: no header).
pub(crate) fn post(app: &TestApp, body: &[u8], signature: Option<String>) -> (u16, Value) {
    let url = format!(
        "{}/StripeWebhooks/Receive",
        app.stack().ingress_url(0).trim_end_matches('/')
    );
    let mut request = reqwest::blocking::Client::new()
        .post(url)
        .header("content-type", "application/json; charset=utf-8")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    let response = request.send().expect("the ingress answers");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

pub(crate) fn signed(body: &[u8], at: i64) -> Option<String> {
    Some(sign(body, &WebhookSecret::new(SECRET), at))
}

/// A payment left pending: the gateway never answers its charge.
fn pending_payment(app: &TestApp, prefix: &str) -> String {
    let id = unique_id(prefix);
    let answer = ok("create", app.create_payment(&id, &seed_payment()));
    assert_eq!(answer.status, PaymentStatus::Pending, "{answer:?}");
    id
}

/// `Confirm` invocations of one payment, counted by the admin API.
pub(crate) fn confirms(app: &TestApp, id: &str) -> usize {
    app.admin()
        .invocations_of(id)
        .unwrap()
        .iter()
        .filter(|i| i.target_handler_name == "Confirm")
        .count()
}

#[test]
fn forged_altered_unsigned_and_stale_events_are_refused_and_change_nothing() {
    let app = app();
    let id = pending_payment(app, "wh-forged");
    let body = event(
        "evt_forged",
        "payment_intent.succeeded",
        "pi_x",
        &id,
        "succeeded",
    );
    let forged = Some(sign(&body, &WebhookSecret::new("whsec_other"), now()));
    let mut altered = body.clone();
    altered.extend_from_slice(b" ");
    for (case, body, signature) in [
        ("forged", body.clone(), forged),
        ("altered", altered, signed(&body, now())),
        ("unsigned", body.clone(), None),
        ("stale", body.clone(), signed(&body, now() - 400)),
        ("from the future", body.clone(), signed(&body, now() + 400)),
    ] {
        let (status, answer) = post(app, &body, signature);
        assert_eq!(status, 400, "{case}: {answer}");
    }
    assert_eq!(app.payment(&id).status, PaymentStatus::Pending);
    assert_eq!(confirms(app, &id), 0);
}

#[test]
fn a_signed_event_settles_the_payment_once_whatever_comes_after() {
    let app = app();
    let id = pending_payment(app, "wh-settle");
    let succeeded = event(
        "evt_ok_1",
        "payment_intent.succeeded",
        "pi_ok_1",
        &id,
        "succeeded",
    );
    let (status, answer) = post(app, &succeeded, signed(&succeeded, now()));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["paymentId"], id.as_str());
    testkit::stack::wait_until(Duration::from_secs(30), "the event to settle it", || {
        Ok(app.payment(&id).status != PaymentStatus::Pending)
    })
    .unwrap();
    let settled = app.payment(&id);
    assert_eq!(settled.status, PaymentStatus::Completed, "{settled:?}");
    assert_eq!(settled.charge_id.as_deref(), Some("pi_ok_1"));

    // Delivered again (Stripe does), and a failure for it arriving late: nothing changes, and
    // the repeat is not run again.
    let (status, _) = post(app, &succeeded, signed(&succeeded, now()));
    assert_eq!(status, 200);
    let failed = event(
        "evt_late",
        "payment_intent.payment_failed",
        "pi_ok_1",
        &id,
        "requires_payment_method",
    );
    assert_eq!(post(app, &failed, signed(&failed, now())).0, 200);
    testkit::stack::wait_until(Duration::from_secs(30), "both events to be handled", || {
        let invocations = app.admin().invocations_of(&id)?;
        Ok(invocations
            .iter()
            .filter(|i| i.target_handler_name == "Confirm" && i.status == "completed")
            .count()
            >= 2)
    })
    .unwrap();
    assert_eq!(confirms(app, &id), 2, "one Confirm per event ID");
    assert_eq!(app.payment(&id), settled);
    assert_eq!(
        ok("create again", app.create_payment(&id, &seed_payment())).status,
        PaymentStatus::Completed
    );
}

#[test]
fn a_failure_event_fails_the_payment_and_other_events_are_acknowledged() {
    let app = app();
    let id = pending_payment(app, "wh-fail");
    let failed = event(
        "evt_fail_1",
        "payment_intent.payment_failed",
        "pi_f",
        &id,
        "requires_payment_method",
    );
    assert_eq!(post(app, &failed, signed(&failed, now())).0, 200);
    testkit::stack::wait_until(Duration::from_secs(30), "the event to settle it", || {
        Ok(app.payment(&id).status != PaymentStatus::Pending)
    })
    .unwrap();
    let end = app.payment(&id);
    assert_eq!(end.status, PaymentStatus::Failed, "{end:?}");
    assert_eq!(end.error_msg.as_deref(), Some("insufficient funds"));

    // Not ours, or of a type the service does not act on: acknowledged, so Stripe stops.
    let stranger = event(
        "evt_other",
        "payment_intent.succeeded",
        "pi_s",
        &unique_id("wh-none"),
        "succeeded",
    );
    assert_eq!(post(app, &stranger, signed(&stranger, now())).0, 200);
    let customer = serde_json::to_vec(&json!({"id": "evt_cus", "type": "customer.created",
        "created": now(), "data": {"object": {"id": "cus_1"}}}))
    .unwrap();
    let (status, answer) = post(app, &customer, signed(&customer, now()));
    assert_eq!(status, 200, "{answer}");
    assert!(answer.get("paymentId").is_none(), "{answer}");
}

#[test]
fn without_a_secret_every_event_is_refused() {
    let app = spawn_app();
    let Some(stack) = app.local_stack() else {
        return;
    };
    let body = event(
        "evt_x",
        "payment_intent.succeeded",
        "pi_x",
        "p",
        "succeeded",
    );
    let url = format!(
        "{}/StripeWebhooks/Receive",
        stack.ingress_url(0).trim_end_matches('/')
    );
    let response = reqwest::blocking::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header(
            "stripe-signature",
            sign(&body, &WebhookSecret::new(SECRET), now()).as_str(),
        )
        .body(body)
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
}
