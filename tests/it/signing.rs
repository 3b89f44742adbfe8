//! Request signing: with identity keys configured, the service serves only requests signed by
//! the Restate server (which holds the private key), and refuses everything else with 401.

use std::time::Duration;

use payment_service::gateway::MockConfig;
use payment_service::payment::{CreatePaymentBody, PaymentStatus};
use reqwest::blocking::Client;
use testkit::stack::Stack;

use crate::helpers::{ok, own_stack, unique_id};

/// A key pair for tests only: `tests/fixtures/test-identity-key.pem` and its public key
/// (`scripts/identity-public-key.sh tests/fixtures/test-identity-key.pem`).
const TEST_PUBLIC_KEY: &str = "publickeyv1_41KQusDeMPAQCL7k6NVrHvGygMr4ro9QcwSjE2Ka9vA4";

#[test]
fn signed_calls_succeed_and_unsigned_ones_are_refused() {
    // Starting it is itself a test: the registration is a signed call.
    let app = own_stack(
        Stack::builder()
            .server_env(
                "RESTATE_WORKER__INVOKER__REQUEST_IDENTITY_PRIVATE_KEY_PEM_FILE",
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/test-identity-key.pem"
                ),
            )
            .identity_keys(vec![TEST_PUBLIC_KEY.to_owned()])
            .gateway(MockConfig {
                decline_rate: 0.0,
                delay: Duration::from_millis(1),
                ..MockConfig::default()
            }),
    );
    let service = app.stack().service_url();

    // Through Restate: signed, served.
    let id = unique_id("signed");
    let answer = ok(
        "CreatePayment",
        app.create_payment(&id, &CreatePaymentBody::new(100, "c")),
    );
    assert_eq!(answer.status, PaymentStatus::Completed, "{answer:?}");

    // Straight to the service, around Restate: refused.
    let direct = Client::builder().http2_prior_knowledge().build().unwrap();
    let discover = direct
        .get(format!("{service}/discover"))
        .header("accept", "application/vnd.restate.endpointmanifest.v3+json")
        .send()
        .unwrap();
    assert_eq!(discover.status().as_u16(), 401);

    let forged = direct
        .post(format!("{service}/invoke/PaymentService/CreatePayment"))
        .header("content-type", "application/vnd.restate.invocation.v5")
        .header("x-restate-signature-scheme", "v1")
        .header("x-restate-jwt-v1", "eyJhbGciOiJFZERTQSJ9.e30.c2lnbmF0dXJl")
        .body(Vec::new())
        .send()
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401);
}
