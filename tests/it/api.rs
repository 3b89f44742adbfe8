//! Beyond the seed: Restate's `idempotency-key` header, the published schemas, and a fuzz run
//! of malformed and edge-case requests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use payment_service::payment::{CreatePaymentBody, Payment, PaymentResult, PaymentStatus, Refund};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use testkit::admin::{Invocation, sql_str};
use testkit::client::{CREATE, GET, REFUND, SERVICE};
use testkit::ledger::LedgerOp;

use crate::helpers::{TestApp, all_at_once, refund_body, spawn_app, unique_id};

/// `handler` of payment `id` with an `idempotency-key` header; the 200 answer.
#[track_caller]
fn call_with_key<T: DeserializeOwned>(
    app: &TestApp,
    id: &str,
    handler: &str,
    body: &impl Serialize,
    key: &str,
) -> T {
    let body = Bytes::from(serde_json::to_vec(body).expect("a JSON body"));
    let (status, answer) = app.call_raw(id, handler, Some(body), &[("idempotency-key", key)]);
    assert_eq!(status, 200, "{handler} {id} with key {key}: {answer}");
    serde_json::from_value(answer.clone())
        .unwrap_or_else(|e| panic!("{handler} {id}: not the answer type ({e}): {answer}"))
}

/// Invocations of one payment that carried the given idempotency key.
fn invocations_with_key(app: &TestApp, payment_id: &str, key: &str) -> Vec<Invocation> {
    app.admin()
        .invocations(&format!(
            "target_service_key = {} AND idempotency_key = {}",
            sql_str(payment_id),
            sql_str(key)
        ))
        .expect("querying sys_invocation")
}

#[test]
fn idempotency_key_replays_the_first_answer_of_create_and_refund() {
    let app = spawn_app();
    let id = unique_id("idem-key");
    let body = CreatePaymentBody::new(7000, "cust-kim").described("Key");

    let first: PaymentResult = call_with_key(app, &id, CREATE, &body, "create-7000-kim");
    assert_eq!(first.message, "Payment processed successfully", "{first:?}");
    // The same key: Restate answers the first invocation's response, it does not run again
    // (a new run would answer "Payment already processed").
    let replayed: PaymentResult = call_with_key(app, &id, CREATE, &body, "create-7000-kim");
    assert_eq!(replayed, first);
    // Another key is another invocation: the handler's state check answers it.
    let other: PaymentResult = call_with_key(app, &id, CREATE, &body, "another");
    assert_eq!(other.message, "Payment already processed", "{other:?}");
    assert_eq!(other.charge_id, first.charge_id, "{other:?}");
    assert_eq!(invocations_with_key(app, &id, "create-7000-kim").len(), 1);

    let refund = refund_body("r", Some(1000));
    let refunded: Refund = call_with_key(app, &id, REFUND, &refund, "refund-once");
    let again: Refund = call_with_key(app, &id, REFUND, &refund, "refund-once");
    assert_eq!(again, refunded);
    assert_eq!(invocations_with_key(app, &id, "refund-once").len(), 1);

    if let Some(entries) = app.ledger(&id) {
        let count = |op| entries.iter().filter(|e| e.op == op).count();
        assert_eq!(
            (count(LedgerOp::Charge), count(LedgerOp::Refund)),
            (1, 1),
            "{entries:#?}"
        );
    }
}

#[test]
fn requests_with_one_key_in_flight_together_run_once() {
    const CALLERS: usize = 4;
    let app = spawn_app();
    let id = unique_id("idem-inflight");
    let body = CreatePaymentBody::new(3100, "cust-lee");
    let answers: Vec<PaymentResult> = all_at_once(CALLERS, || {
        call_with_key(app, &id, CREATE, &body, "inflight")
    });
    // Every caller got the one invocation's answer: had any run on its own after the first,
    // it would have answered "Payment already processed".
    for answer in &answers {
        assert_eq!(answer, &answers[0], "{answers:#?}");
        assert_eq!(
            answer.message, "Payment processed successfully",
            "{answers:#?}"
        );
    }
    assert_eq!(invocations_with_key(app, &id, "inflight").len(), 1);
    if let Some(entries) = app.ledger(&id) {
        assert_eq!(entries.len(), 1, "{entries:#?}");
    }
}

#[test]
fn openapi_describes_every_field() {
    let app = spawn_app();
    let text = app
        .admin()
        .openapi()
        .expect("the OpenAPI document")
        .to_string();
    for handler in [CREATE, GET, REFUND] {
        assert!(
            text.contains(&format!("/PaymentService/{{key}}/{handler}")),
            "{handler} missing: {text}"
        );
    }
    // Request fields, with their bounds, and answer fields, by name.
    for needle in [
        r#""amount""#,
        r#""currency""#,
        r#""description""#,
        r#""customerId""#,
        r#""reason""#,
        r#""pattern":"^[A-Z]{3}$""#,
        r#""maximum":1000000000000"#,
        r#""paymentId""#,
        r#""chargeId""#,
        r#""createdAt""#,
        r#""completedAt""#,
        r#""errorMsg""#,
        r#""refundId""#,
        r#""refundedAt""#,
        r#""message""#,
        r#""format":"date-time""#,
        r#""pending""#,
        r#""refunded""#,
    ] {
        assert!(text.contains(needle), "OpenAPI lacks {needle}: {text}");
    }
}

// ---- fuzzing -----------------------------------------------------------------------------

/// Requests the fuzz test sends, at least.
const FUZZ_REQUESTS: usize = 1200;
const FUZZ_THREADS: usize = 6;
/// The ingress's body limit (`restate/restate.toml`, `[ingress] request-size-limit`).
const INGRESS_BODY_LIMIT: usize = 64 * 1024;

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// A value of a random JSON type, often odd.
fn odd_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..14) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1.5),
        5 => json!(1e300),
        6 => json!(u64::MAX),
        7 => json!(i64::MIN),
        8 => json!("100"),
        9 => json!(""),
        10 => json!("\u{0}\u{202e}💳 Zürich ﷽"),
        11 => json!("x".repeat(rng.random_range(900..5000))),
        12 => json!([1, "two", {"three": 3}]),
        _ => json!({"nested": {"amount": 1}}),
    }
}

/// A CreatePayment body: mostly the right shape with one or more fields broken.
fn create_body(rng: &mut StdRng) -> Value {
    let mut body = serde_json::Map::new();
    let amounts = [
        json!(1),
        json!(10000),
        json!(1_000_000_000_000u64),
        json!(1_000_000_000_001u64),
        json!(0),
        json!(-10000),
        json!(10.5),
        json!(10.0),
        json!("10000"),
    ];
    if rng.random_bool(0.9) {
        let amount = if rng.random_bool(0.7) {
            pick(rng, &amounts).clone()
        } else {
            odd_value(rng)
        };
        body.insert("amount".into(), amount);
    }
    let currencies = [
        json!("USD"),
        json!("EUR"),
        json!("usd"),
        json!("US"),
        json!("EURO"),
        json!(""),
        json!("ÜSD"),
        json!(840),
    ];
    for (field, good) in [
        ("currency", None),
        ("description", Some(json!("Premium subscription"))),
        ("customerId", Some(json!("cust-fuzz"))),
    ] {
        if rng.random_bool(0.8) {
            let value = match (field, rng.random_range(0..3)) {
                ("currency", 0 | 1) => pick(rng, &currencies).clone(),
                (_, 0 | 1) if good.is_some() => good.clone().unwrap(),
                _ => odd_value(rng),
            };
            body.insert(field.into(), value);
        }
    }
    if rng.random_bool(0.2) {
        body.insert("extra\u{7f}field".into(), odd_value(rng));
    }
    Value::Object(body)
}

fn refund_fuzz_body(rng: &mut StdRng) -> Value {
    let mut body = serde_json::Map::new();
    if rng.random_bool(0.7) {
        let amount = if rng.random_bool(0.5) {
            json!(rng.random_range(-5000i64..20000))
        } else {
            odd_value(rng)
        };
        body.insert("amount".into(), amount);
    }
    if rng.random_bool(0.7) {
        body.insert("reason".into(), odd_value(rng));
    }
    Value::Object(body)
}

/// A body that is not the expected JSON object at all.
fn raw_body(rng: &mut StdRng) -> Option<Bytes> {
    let bodies: [&'static [u8]; 10] = [
        b"",
        b"{",
        b"[]",
        b"null",
        b"\"just a string\"",
        b"12",
        b"{\"amount\": 100,}",
        b"\xff\xfe\x00garbage",
        b"{\"amount\": 1e}",
        b"{\"amount\": 100} trailing",
    ];
    match rng.random_range(0..12) {
        10 => Some(format!("{}{}", "[".repeat(2000), "]".repeat(2000)).into()),
        11 => Some(format!("{{\"description\": \"{}\"}}", "y".repeat(200_000)).into()),
        i => Some(Bytes::from_static(bodies[i])),
    }
}

fn json_bytes(value: &Value) -> Option<Bytes> {
    Some(value.to_string().into())
}

/// A URL path segment decoded: the payment ID the service sees (and names in its 404).
fn percent_decode(key: &str) -> String {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Some(why)` if a 200 answer of `handler` is not a correct one.
fn wrong_200(handler: &str, answer: &Value) -> Option<&'static str> {
    let parsed = |answer: &Value| serde_json::from_value::<PaymentResult>(answer.clone());
    match handler {
        CREATE => match parsed(answer) {
            // A new payment settles completed or failed; a retry of a refunded one answers
            // it as it is.
            Ok(paid) => match paid.status {
                PaymentStatus::Completed | PaymentStatus::Failed => None,
                PaymentStatus::Refunded | PaymentStatus::PartiallyRefunded
                    if paid.message == "Payment already processed" =>
                {
                    None
                }
                _ => Some("200 without a settled payment"),
            },
            Err(_) => Some("200 without a payment result"),
        },
        REFUND => serde_json::from_value::<Refund>(answer.clone())
            .err()
            .map(|_| "200 without a refund"),
        _ => serde_json::from_value::<Payment>(answer.clone())
            .err()
            .map(|_| "200 without a payment"),
    }
}

/// The fuzz run: a seeded stream of odd requests against fresh IDs, odd IDs and stored
/// payments. Each must answer 200 or 4xx; refused requests must change nothing; nothing may be
/// left running. The seed is printed; `FUZZ_SEED=<n>` replays a run.
#[test]
fn fuzzed_requests_answer_4xx_or_a_correct_200_and_change_nothing_when_refused() {
    let app = spawn_app();
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz: seed {seed} (replay with FUZZ_SEED={seed})");
    let run = unique_id("fuzz");

    // Stored payments the fuzzer aims refunds and creates at.
    let stored: Vec<String> = (0..4).map(|i| format!("{run}-stored-{i}")).collect();
    for id in &stored {
        app.completed_payment(id, 10000);
    }
    let before: HashMap<String, Payment> = stored
        .iter()
        .map(|id| (id.clone(), app.payment(id)))
        .collect();

    // Keys as they go into the URL (percent-encoded where odd); all start with the run's ID
    // so the invocation check below finds them.
    let mut keys: Vec<String> = stored.clone();
    keys.extend(
        [
            "%00nul",
            "line%0Abreak",
            "%F0%9F%92%B3card",
            "sp%20ace",
            "slash%2Finside",
            "quote%22",
            "%E2%80%AEbidi",
        ]
        .iter()
        .map(|odd| format!("{run}-{odd}")),
    );
    keys.push(format!("{run}-{}", "k".repeat(300)));

    let answered: Mutex<BTreeMap<u16, usize>> = Mutex::new(BTreeMap::new());
    let accepted_refunds: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let per_thread = FUZZ_REQUESTS.div_ceil(FUZZ_THREADS);
    std::thread::scope(|s| {
        for t in 0..FUZZ_THREADS {
            let (keys, answered, accepted_refunds, failures) =
                (&keys, &answered, &accepted_refunds, &failures);
            let run = &run;
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(t as u64));
                for n in 0..per_thread {
                    let key = if rng.random_bool(0.3) {
                        format!("{run}-fresh-{t}-{n}")
                    } else {
                        pick(&mut rng, keys).clone()
                    };
                    let (handler, body) = match rng.random_range(0..10) {
                        0..=3 => (CREATE, json_bytes(&create_body(&mut rng))),
                        4..=6 => (REFUND, json_bytes(&refund_fuzz_body(&mut rng))),
                        7 => (GET, json_bytes(&odd_value(&mut rng))),
                        8 => (*pick(&mut rng, &[CREATE, REFUND]), raw_body(&mut rng)),
                        _ => (*pick(&mut rng, &[CREATE, REFUND, GET]), None),
                    };
                    let fail = |why: String| {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{handler} {key}: {why}"))
                    };
                    // The ingress refuses a body over its limit without reading it and closes
                    // the connection after the 413; a client that pooled that connection sent
                    // the next request into it ("connection closed before message completed").
                    let close = body.as_ref().is_some_and(|b| b.len() > INGRESS_BODY_LIMIT);
                    let headers: &[(&str, &str)] = if close {
                        &[("connection", "close")]
                    } else {
                        &[]
                    };
                    let id = percent_decode(&key);
                    let call = app
                        .api()
                        .call_object_raw(0, SERVICE, &key, &id, handler, body, headers);
                    let (status, answer) = match app.run(call) {
                        Ok(answer) => answer,
                        Err(e) => {
                            fail(format!("neither 200 nor 4xx: {e}"));
                            continue;
                        }
                    };
                    *answered.lock().unwrap().entry(status).or_default() += 1;
                    match status {
                        200 => {
                            if let Some(why) = wrong_200(handler, &answer) {
                                fail(format!("{why}: {answer}"));
                            }
                            if handler == REFUND {
                                accepted_refunds.lock().unwrap().push(key.clone());
                            }
                        }
                        400..=499 => {
                            let has_message =
                                answer["message"].as_str().is_some_and(|m| !m.is_empty())
                                    || answer.as_str().is_some_and(|m| !m.is_empty());
                            if !has_message {
                                fail(format!("4xx without a message: {status} {answer}"));
                            }
                        }
                        _ => fail(format!("neither 200 nor 4xx: {status} {answer}")),
                    }
                }
            });
        }
    });
    let answered = answered.into_inner().unwrap();
    eprintln!("fuzz: answers by status {answered:?}");
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} bad answers, e.g. {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(answered.values().sum::<usize>() >= 1000);

    // A stored payment changes only by an accepted refund, and then only its status, its
    // refunded amount (what its refunds add up to, at most the payment) and its refunds.
    let refunded = accepted_refunds.into_inner().unwrap();
    for id in &stored {
        let mut expected = before[id].clone();
        let now = app.payment(id);
        if refunded.contains(id) {
            let total: u64 = now.refunds.iter().map(|r| r.amount.minor_units()).sum();
            assert!(
                now.amount_refunded == total && total <= now.amount.minor_units(),
                "{now:?}"
            );
            expected.status = if total == now.amount.minor_units() {
                PaymentStatus::Refunded
            } else {
                PaymentStatus::PartiallyRefunded
            };
            expected.amount_refunded = total;
            expected.refunds = now.refunds.clone();
        }
        assert_eq!(now, expected, "payment {id} changed by a refused request");
    }

    // Nothing left running or retrying.
    let unfinished = app
        .admin()
        .invocations(&format!(
            "target_service_key LIKE {} AND status <> 'completed'",
            sql_str(&format!("{run}%"))
        ))
        .expect("querying sys_invocation");
    assert!(unfinished.is_empty(), "left unfinished: {unfinished:#?}");
}
