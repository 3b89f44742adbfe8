//! One definition per wire type: the JSON schemas the service publishes, and what it accepts,
//! agree. A schema-driven fuzzer (`testkit::schema`) generates bodies on both sides of every
//! rule; `jsonschema` says whether the schema allows each; the service must accept exactly
//! those: its parsers (thousands of bodies) and the whole path through Restate's ingress, with
//! the schemas as Restate publishes them in its OpenAPI document (fewer, each a real call).
//!
//! `SCHEMA_SEED=<n>` replays a run; the seed is printed.

use bytes::Bytes;
use payment_service::payment::{
    CapturePaymentBody, CaptureRequest, CreatePaymentBody, MAX_AMOUNT, NewPayment, NoInput,
    PaymentError, RefundPaymentBody, RefundRequest,
};
use payment_service::service::JsonBody;
use restate_sdk::serde::PayloadMetadata;
use serde_json::Value;
use testkit::schema::{RequestSchema, fuzz};

use crate::helpers::{spawn_app, unique_id};

const SERVICE: &str = "PaymentService";

fn seed() -> u64 {
    let seed = std::env::var("SCHEMA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("schema fuzzer seed: {seed} (SCHEMA_SEED={seed} replays it)");
    seed
}

/// The schema the service hands Restate for a body of shape `S`, and whether it is required.
fn published<S>() -> RequestSchema
where
    JsonBody<S>: PayloadMetadata,
{
    let schema = JsonBody::<S>::json_schema().expect("every body publishes a schema");
    RequestSchema::new(schema, JsonBody::<S>::input_metadata().is_required).unwrap()
}

fn verdict(
    handler: &str,
    allowed: bool,
    accepted: bool,
    body: &[u8],
    why: &str,
) -> Result<(), String> {
    if allowed == accepted {
        return Ok(());
    }
    let (schema, service) = if allowed {
        ("allows", "refuses")
    } else {
        ("refuses", "accepts")
    };
    let text = String::from_utf8_lossy(body);
    let shown: String = text.chars().take(300).collect();
    Err(format!(
        "{handler}: the schema {schema} and the service {service} {shown:?} ({} bytes; {why})",
        body.len()
    ))
}

fn at_the_parser<T>(
    handler: &str,
    schema: RequestSchema,
    parse: impl Fn(&[u8]) -> Result<T, PaymentError>,
) {
    let seed = seed();
    fuzz(&schema, seed, 4000, |body| {
        let parsed = parse(body);
        let why = parsed.as_ref().err().map(ToString::to_string);
        verdict(
            handler,
            schema.allows(body),
            parsed.is_ok(),
            body,
            why.as_deref().unwrap_or("accepted"),
        )
    })
    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
}

#[test]
fn create_payment_parses_what_its_schema_allows() {
    assert!(published::<CreatePaymentBody>().required());
    at_the_parser(
        "CreatePayment",
        published::<CreatePaymentBody>(),
        NewPayment::parse,
    );
}

#[test]
fn refund_payment_parses_what_its_schema_allows() {
    at_the_parser(
        "RefundPayment",
        published::<RefundPaymentBody>(),
        RefundRequest::parse,
    );
}

#[test]
fn capture_payment_parses_what_its_schema_allows() {
    at_the_parser(
        "CapturePayment",
        published::<CapturePaymentBody>(),
        CaptureRequest::parse,
    );
}

#[test]
fn get_payment_parses_what_its_schema_allows() {
    at_the_parser("GetPayment", published::<NoInput>(), NoInput::parse);
}

/// Through the ingress, with the schemas from Restate's OpenAPI document: a 200 where the
/// schema allows the body, a 400 where it does not.
#[test]
fn the_ingress_answers_as_the_published_schemas_say() {
    let app = spawn_app();
    let openapi = app.admin().openapi().unwrap();
    let schema = |handler| RequestSchema::from_openapi(&openapi, SERVICE, handler).unwrap();
    let seed = seed();
    let call = |id: &str, handler: &str, body: &[u8]| {
        let body = (!body.is_empty()).then(|| Bytes::copy_from_slice(body));
        app.call_raw(id, handler, body, &[])
    };
    let check = |handler: &'static str, schema: &RequestSchema, id: &dyn Fn() -> String| {
        fuzz(schema, seed, 80, |body| {
            let (status, answer): (u16, Value) = call(&id(), handler, body);
            if !matches!(status, 200 | 400) {
                return Err(format!("{handler}: {status} {answer} for {body:?}"));
            }
            verdict(
                handler,
                schema.allows(body),
                status == 200,
                body,
                &answer.to_string(),
            )
        })
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    };

    let create = schema("CreatePayment");
    assert!(
        create.required(),
        "CreatePayment's body is published as optional"
    );
    check("CreatePayment", &create, &|| unique_id("schema-create"));

    // Each refund its own payment, of the largest amount: any refund amount the schema allows
    // fits it.
    check("RefundPayment", &schema("RefundPayment"), &|| {
        let id = unique_id("schema-refund");
        app.completed_payment(&id, MAX_AMOUNT);
        id
    });

    // Each capture and cancel its own hold, of the largest amount.
    let held = |prefix: &str| {
        let id = unique_id(prefix);
        app.authorized_payment(&id, MAX_AMOUNT);
        id
    };
    check("CapturePayment", &schema("CapturePayment"), &|| {
        held("schema-capture")
    });
    check("CancelPayment", &schema("CancelPayment"), &|| {
        held("schema-cancel")
    });

    let id = unique_id("schema-get");
    app.completed_payment(&id, 100);
    check("GetPayment", &schema("GetPayment"), &|| id.clone());
}
