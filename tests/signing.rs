//! Request signing: with identity keys configured, the service serves only requests signed by
//! the Restate server (which holds the private key), and refuses everything else with 401.

mod common;

use common::owned::OwnedStack;
use common::unique_id;
use reqwest::blocking::Client;
use serde_json::json;

/// A key pair for tests only: `tests/fixtures/test-identity-key.pem` and its public key
/// (`scripts/identity-public-key.sh tests/fixtures/test-identity-key.pem`).
const TEST_PUBLIC_KEY: &str = "publickeyv1_41KQusDeMPAQCL7k6NVrHvGygMr4ro9QcwSjE2Ka9vA4";

fn private_key_path() -> String {
    format!(
        "{}/tests/fixtures/test-identity-key.pem",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn signed_calls_succeed_and_unsigned_ones_are_refused() {
    let stack = OwnedStack::start_with(
        &[(
            "RESTATE_WORKER__INVOKER__REQUEST_IDENTITY_PRIVATE_KEY_PEM_FILE",
            private_key_path(),
        )],
        &[
            ("IDENTITY_KEYS", TEST_PUBLIC_KEY.to_owned()),
            ("GATEWAY_DECLINE_RATE", "0".to_owned()),
            ("GATEWAY_DELAY_MS", "1".to_owned()),
        ],
    )
    .expect("starting the stack (registration is itself a signed call)");
    let app = &stack.app;

    // Through Restate: signed, served.
    let id = unique_id("signed");
    let (status, answer) = app.create_payment(&id, &json!({"amount": 100, "customerId": "c"}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "completed", "{answer}");

    // Straight to the service, around Restate: refused.
    let direct = Client::builder().http2_prior_knowledge().build().unwrap();
    let discover = direct
        .get(format!("{}/discover", app.service_url))
        .header("accept", "application/vnd.restate.endpointmanifest.v3+json")
        .send()
        .unwrap();
    assert_eq!(discover.status().as_u16(), 401);

    let forged = direct
        .post(format!(
            "{}/invoke/PaymentService/CreatePayment",
            app.service_url
        ))
        .header("content-type", "application/vnd.restate.invocation.v5")
        .header("x-restate-signature-scheme", "v1")
        .header("x-restate-jwt-v1", "eyJhbGciOiJFZERTQSJ9.e30.c2lnbmF0dXJl")
        .body(Vec::new())
        .send()
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
}
