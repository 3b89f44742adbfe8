//! Bounded requests (README, "Limits"): an oversized body is refused with a 413 before it is
//! stored or invoked, whether it comes at once or slowly, through the ingress or straight to the
//! service's port; the service serves on. The memory figures are `stackctl measure bodies`'.

use std::time::Duration;

use payment_service::payment::PaymentStatus;
use payment_service::server::MAX_REQUEST_BYTES;
use testkit::bodies::{
    self, ONE_GIB, PROTOCOL_CONTENT_TYPE, Sent, TEN_MB, Upload, padded_create_body,
    padded_create_start, start_message_header,
};

use crate::helpers::{TestApp, refund_body, spawn_app, unique_id};

/// "A few MB": a refused body must have been refused before this much of it was handed to the
/// client (what reached the server is less: the client's and the kernel's buffers hold some).
const REFUSED_WITHIN: u64 = 4 << 20;
/// A slow body stops here if nothing refused it: past Restate's stock 32 MiB ingress limit, so
/// that a test on the stock setting fails on its size, not on its time.
const SLOW_CAP: u64 = 40 << 20;
const SLOW_CHUNK: usize = 64 * 1024;
const SLOW_PACE: Duration = Duration::from_millis(2);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn send(app: &TestApp, url: &str, content_type: &str, upload: &Upload) -> Sent {
    let http = bodies::client().expect("an HTTP/2 client");
    app.run(bodies::send(
        &http,
        url,
        content_type,
        upload,
        ANSWER_TIMEOUT,
    ))
}

fn ingress(app: &TestApp) -> String {
    app.api().ingresses()[0].clone()
}

/// Asserts that nothing of `id` was stored or invoked, and that the service still serves
/// payments.
#[track_caller]
fn assert_nothing_stored_and_still_serving(app: &TestApp, id: &str) {
    let invocations = app
        .admin()
        .invocations_of(id)
        .expect("querying invocations");
    assert!(
        invocations.is_empty(),
        "a refused body was invoked: {invocations:#?}"
    );
    let state = app.admin().state(id).expect("querying the state");
    assert!(state.is_empty(), "a refused body left state: {state:?}");
    let after = unique_id("after-oversized");
    assert_eq!(
        app.completed_payment(&after, 100).status,
        PaymentStatus::Completed
    );
}

#[test]
fn a_10_mb_create_payment_is_refused_with_413_and_nothing_is_stored() {
    let app = spawn_app();
    let id = unique_id("oversized-fast");
    // A valid payment padded with whitespace: only its size is wrong.
    let body = padded_create_body(TEN_MB as usize);
    let sent = send(
        app,
        &bodies::create_url(&ingress(app), &id),
        "application/json",
        &Upload::fast(body, TEN_MB),
    );
    assert_eq!(sent.status, Some(413), "{sent}");
    assert!(
        sent.body.contains("length limit exceeded"),
        "Restate's ingress names the limit it hit: {sent}"
    );
    assert!(sent.sent < REFUSED_WITHIN, "refused only late: {sent}");
    assert_nothing_stored_and_still_serving(app, &id);
}

#[test]
fn a_10_mb_refund_is_refused_with_413_and_the_payment_is_not_refunded() {
    let app = spawn_app();
    let id = unique_id("oversized-refund");
    app.completed_payment(&id, 100);
    let mut body = serde_json::to_vec(&refund_body("padded", None)).unwrap();
    body.pop(); // the closing brace, after the padding
    body.resize(TEN_MB as usize - 1, b' ');
    body.push(b'}');
    let url = format!("{}/PaymentService/{id}/RefundPayment", ingress(app));
    let sent = send(
        app,
        &url,
        "application/json",
        &Upload::fast(body.into(), TEN_MB),
    );
    assert_eq!(sent.status, Some(413), "{sent}");
    assert_eq!(app.payment(&id).status, PaymentStatus::Completed);
    let invocations = app
        .admin()
        .invocations_of(&id)
        .expect("querying invocations");
    assert!(
        invocations
            .iter()
            .all(|i| i.target_handler_name != "RefundPayment"),
        "the refund was invoked: {invocations:#?}"
    );
}

#[test]
fn a_slow_1_gib_create_payment_is_refused_before_a_few_mb_were_sent() {
    let app = spawn_app();
    let id = unique_id("oversized-slow");
    let upload = Upload::slow(padded_create_start(), SLOW_CAP, SLOW_CHUNK, SLOW_PACE);
    let sent = send(
        app,
        &bodies::create_url(&ingress(app), &id),
        "application/json",
        &upload,
    );
    assert_eq!(sent.status, Some(413), "{sent}");
    assert!(
        sent.body.contains("LengthLimitError"),
        "Restate's ingress names the limit it hit: {sent}"
    );
    assert!(
        sent.sent < REFUSED_WITHIN,
        "a slow body of up to {ONE_GIB} bytes must be refused within {REFUSED_WITHIN}: {sent}"
    );
    assert_nothing_stored_and_still_serving(app, &id);
}

/// The largest input the ingress admits (a body just under its 64 KiB limit, ~440 KB of
/// headers: HTTP/1.1 heads of 520 KB were admitted, of 540 KB refused with 431) reaches the
/// service, headers and all, and is served: under the service's own bound, which it would
/// otherwise hit on every retry. Headers and body stay under 520 KB together: when the ingress
/// reads the body before it has parsed the head (a busy machine), its read buffer holds both,
/// and ~495 KB of headers were then refused with 431 now and then.
#[test]
fn the_largest_input_the_ingress_admits_is_served_once() {
    let app = spawn_app();
    let id = unique_id("largest-admitted");
    let body = padded_create_body(60 * 1024);
    let names: Vec<String> = (0..80).map(|i| format!("x-padding-{i}")).collect();
    let value = "h".repeat(5_500);
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), value.as_str())).collect();
    let (status, answer) = app.call_raw(&id, "CreatePayment", Some(body), &headers);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "completed", "{answer}");
    app.assert_all_settled(std::slice::from_ref(&id));
}

/// The service's port, for callers that are not Restate: `None` (saying so) for a stack
/// started elsewhere.
fn service_url(app: &TestApp) -> Option<String> {
    let url = app.local_stack().map(|s| s.service_url().to_owned());
    if url.is_none() {
        eprintln!("a stack started elsewhere: skipping the service-port test");
    }
    url
}

#[test]
fn the_service_refuses_a_10_mb_body_on_its_own_port_with_413() {
    let app = spawn_app();
    let Some(service) = service_url(app) else {
        return;
    };
    let upload = Upload::fast(start_message_header(TEN_MB as u32 - 8), TEN_MB);
    let sent = send(
        app,
        &bodies::service_create_url(&service),
        PROTOCOL_CONTENT_TYPE,
        &upload,
    );
    assert_eq!(sent.status, Some(413), "{sent}");
    assert!(
        sent.body.contains(&format!(
            "over the service's bound of {MAX_REQUEST_BYTES} bytes"
        )),
        "{sent}"
    );
    assert!(sent.sent < REFUSED_WITHIN, "refused only late: {sent}");
    assert_eq!(
        app.completed_payment(&unique_id("after-direct"), 100)
            .status,
        PaymentStatus::Completed
    );
}

/// A protocol stream without a length (as restate-server sends one) whose first message says
/// 1 GiB follows: the service stops reading at its bound and ends the stream.
#[test]
fn the_service_stops_reading_a_slow_stream_at_its_bound() {
    let app = spawn_app();
    let Some(service) = service_url(app) else {
        return;
    };
    let upload = Upload::slow(
        start_message_header((ONE_GIB - 8) as u32),
        SLOW_CAP,
        SLOW_CHUNK,
        SLOW_PACE,
    );
    let sent = send(
        app,
        &bodies::service_create_url(&service),
        PROTOCOL_CONTENT_TYPE,
        &upload,
    );
    assert!(
        sent.refused_early() && sent.sent < REFUSED_WITHIN,
        "the service read on past its bound of {MAX_REQUEST_BYTES} bytes: {sent}"
    );
    assert_eq!(
        app.completed_payment(&unique_id("after-direct-slow"), 100)
            .status,
        PaymentStatus::Completed
    );
}
