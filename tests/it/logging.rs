//! Logs a person can follow across a crash: every line about a payment carries its ID, and a
//! handler replayed after a crash does not log its replayed steps again (the SDK's replay-aware
//! filter, which only works if the SDK's span is the current one when it flips its replay flag).

use std::thread;
use std::time::Duration;

use payment_service::gateway::MockConfig;
use payment_service::payment::{CreatePaymentBody, PaymentStatus};
use testkit::stack::{Stack, wait_until};

use crate::helpers::{ok, own_stack, unique_id};

/// A stack of the test's own whose service logs every step, with a gateway that never
/// declines and answers `response_delay` after it acted.
fn logging_every_step(response_delay: Duration) -> crate::helpers::TestApp {
    own_stack(
        Stack::builder()
            .service_env("RUST_LOG", "payment_service=debug")
            .gateway(MockConfig {
                decline_rate: 0.0,
                delay: Duration::ZERO,
                response_delay,
                ..MockConfig::default()
            }),
    )
}

#[test]
fn a_payment_replayed_after_a_crash_logs_each_step_once_with_its_id() {
    // The gateway acts, then takes this long to answer: the crash lands in between.
    let app = logging_every_step(Duration::from_millis(1500));
    let stack = app.stack();
    let id = unique_id("logs");
    let log_path = stack.dir.join("payment-service.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let answer = thread::scope(|s| {
        let create =
            s.spawn(|| app.create_payment(&id, &CreatePaymentBody::new(1200, "cust-logs")));
        // Kill the service once the gateway has charged (and said so in the log), before the
        // step's result is journaled.
        let charged = || {
            log()
                .lines()
                .any(|l| l.contains("gateway call") && l.contains(id.as_str()))
        };
        if let Err(e) = wait_until(Duration::from_secs(30), "the charge", || Ok(charged())) {
            panic!("{e}\n{}", stack.logs());
        }
        assert!(stack.kill_service(), "the service was not running");
        stack.start_service().expect("restarting the service");
        create.join().expect("the create call panicked")
    });
    let answer = ok("CreatePayment across the crash", answer);
    assert_eq!(answer.status, PaymentStatus::Completed, "{answer:?}");

    let log = log();
    let about: Vec<&str> = log.lines().filter(|l| l.contains(id.as_str())).collect();
    let count = |message: &str| about.iter().filter(|l| l.contains(message)).count();
    let tag = format!("payment_id={id}");

    // The crash cut the charge step before its result was journaled, so the step ran again and
    // the gateway answered the second call from its key.
    let ledger = app.ledger(&id).expect("an own stack has a ledger");
    let replays: Vec<bool> = ledger.iter().map(|e| e.replay).collect();
    assert_eq!(replays, [false, true], "{ledger:#?}");

    // Replayed on the restarted service: logged once, before the crash.
    assert_eq!(count("creating payment"), 1, "{about:#?}");
    // The step that ran again may or may not log again: the SDK flips its replay flag at the
    // next context call, so lines inside the re-run closure can still count as replayed.
    let charging = count("charging through the gateway");
    assert!((1..=2).contains(&charging), "{about:#?}");
    // After the replay: once.
    assert_eq!(count("payment completed"), 1, "{about:#?}");
    assert_eq!(count("sending receipt"), 1, "{about:#?}");
    // Every step's line names the payment.
    for message in [
        "creating payment",
        "charging through the gateway",
        "gateway call",
        "payment completed",
        "sending receipt",
    ] {
        let line = about
            .iter()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("no {message:?} line: {about:#?}"));
        assert!(line.contains(&tag), "{line}");
    }
}

/// No input can forge a log line: identifiers with control characters are refused, and free
/// text and refused keys are escaped where they are logged.
#[test]
fn no_input_forges_a_log_line() {
    const FORGED: &str = "2026-12-02T03:40:00.000000Z  INFO payment completed payment_id=vip";
    let app = logging_every_step(Duration::ZERO);
    let id = unique_id("forge");
    let refused = app.create_payment(&id, &CreatePaymentBody::new(100, format!("x\n{FORGED}")));
    let message = crate::helpers::assert_refused("a customerId with a line break", refused, 400);
    assert!(message.contains("control characters"), "{message}");

    ok(
        "CreatePayment",
        app.create_payment(&id, &CreatePaymentBody::new(100, "cust-forge")),
    );
    let refund = payment_service::payment::RefundPaymentBody {
        reason: Some(format!("changed mind\n{FORGED}")),
        ..Default::default()
    };
    ok("RefundPayment", app.refund(&id, &refund));
    // A key with a line break in it is refused (404) and logged.
    let key = format!("{id}\n{FORGED}");
    let (status, _) = app
        .call_raw_key(&testkit::client::encode_key(&key), &key, "GetPayment", None)
        .expect("an answer");
    assert_eq!(status, 404);

    let log_path = app.stack().dir.join("payment-service.log");
    let log = std::fs::read_to_string(&log_path).expect("the service's log");
    assert!(
        log.contains("changed mind\\n2026-12-02T03:40:00"),
        "the reason is not logged escaped:\n{log}"
    );
    let forged: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("2026-12-02T03:40:00"))
        .collect();
    assert!(forged.is_empty(), "forged lines: {forged:#?}");
}
