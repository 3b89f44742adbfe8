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

/// Unsigned is not the default: without identity keys the service refuses to listen where
/// others may reach it, and says why; loopback, or `--allow-unsigned`, it serves.
#[test]
fn unsigned_serving_on_an_open_address_is_refused_unless_allowed() {
    let bin = testkit::paths::payment_service().unwrap();
    let start = |extra: &[&str]| {
        let port = testkit::ports::pick().unwrap();
        let child = std::process::Command::new(&bin)
            .arg(format!("--bind=0.0.0.0:{port}"))
            .args(extra)
            .env_remove("IDENTITY_KEYS")
            .env_remove("ALLOW_UNSIGNED")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        (child, port)
    };
    let exited_within = |child: &mut std::process::Child, limit: Duration| {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    };

    let (mut refused, _) = start(&[]);
    let Some(status) = exited_within(&mut refused, Duration::from_secs(10)) else {
        refused.kill().unwrap();
        panic!("the service served 0.0.0.0 without identity keys");
    };
    let output = refused.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(!status.success(), "{said}");
    assert!(said.contains("without identity keys"), "{said}");
    assert!(said.contains("--allow-unsigned"), "{said}");

    let (mut allowed, port) = start(&["--allow-unsigned"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let listening = loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break true;
        }
        if allowed.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = allowed.kill();
    let output = allowed.wait_with_output().unwrap();
    assert!(
        listening,
        "did not listen with --allow-unsigned: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}
