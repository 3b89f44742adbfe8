//! Beyond the seed: Restate's `idempotency-key` header, the published schemas, and a fuzz run
//! of malformed and edge-case requests.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Barrier, Mutex};
use std::time::Duration;

use common::{TestApp, sql_str, stack, unique_id};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use reqwest::blocking::Client;
use serde_json::{Value, json};

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `POST /PaymentService/<key>/<handler>` with a raw key (already URL-encoded), optional body
/// bytes and extra headers; returns the status and the body parsed as JSON when it is JSON.
fn post(
    app: &TestApp,
    key: &str,
    handler: &str,
    body: Option<Vec<u8>>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let url = format!("{}/PaymentService/{key}/{handler}", app.ingress);
    let mut request = client().post(&url);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

fn json_bytes(value: &Value) -> Option<Vec<u8>> {
    Some(value.to_string().into_bytes())
}

/// Invocations of one payment that carried the given idempotency key.
fn invocations_with_key(app: &TestApp, payment_id: &str, key: &str) -> Vec<Value> {
    app.query(&format!(
        "SELECT id, status, target_handler_name FROM sys_invocation \
         WHERE target_service_name = 'PaymentService' AND target_service_key = {} \
         AND idempotency_key = {}",
        sql_str(payment_id),
        sql_str(key)
    ))
}

#[test]
fn idempotency_key_replays_the_first_answer_of_create_and_refund() {
    let app = stack();
    let id = unique_id("idem-key");
    let body =
        json!({"amount": 7000, "currency": "USD", "description": "Key", "customerId": "cust-kim"});
    let key = [("idempotency-key", "create-7000-kim")];

    let first = post(app, &id, "CreatePayment", json_bytes(&body), &key);
    assert_eq!(first.0, 200, "{}", first.1);
    assert_eq!(first.1["message"], "Payment processed successfully");
    // The same key: Restate answers the first invocation's response, it does not run again
    // (a new run would answer "Payment already processed").
    let replayed = post(app, &id, "CreatePayment", json_bytes(&body), &key);
    assert_eq!(replayed, first);
    // Another key is another invocation: the handler's state check answers it.
    let other = post(
        app,
        &id,
        "CreatePayment",
        json_bytes(&body),
        &[("idempotency-key", "another")],
    );
    assert_eq!(other.0, 200, "{}", other.1);
    assert_eq!(other.1["message"], "Payment already processed");
    assert_eq!(other.1["chargeId"], first.1["chargeId"]);
    assert_eq!(invocations_with_key(app, &id, "create-7000-kim").len(), 1);

    let refund_key = [("idempotency-key", "refund-once")];
    let refund = post(
        app,
        &id,
        "RefundPayment",
        json_bytes(&json!({"reason": "r", "amount": 1000})),
        &refund_key,
    );
    assert_eq!(refund.0, 200, "{}", refund.1);
    let again = post(
        app,
        &id,
        "RefundPayment",
        json_bytes(&json!({"reason": "r", "amount": 1000})),
        &refund_key,
    );
    assert_eq!(again, refund);
    assert_eq!(invocations_with_key(app, &id, "refund-once").len(), 1);

    if let Some(entries) = app.ledger_entries(&id) {
        let charges = entries.iter().filter(|e| e.op == "charge").count();
        let refunds = entries.iter().filter(|e| e.op == "refund").count();
        assert_eq!((charges, refunds), (1, 1), "{entries:#?}");
    }
}

#[test]
fn requests_with_one_key_in_flight_together_run_once() {
    const CALLERS: usize = 4;
    let app = stack();
    let id = unique_id("idem-inflight");
    let body = json!({"amount": 3100, "currency": "USD", "customerId": "cust-lee"});
    let barrier = Barrier::new(CALLERS);
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CALLERS)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    post(
                        app,
                        &id,
                        "CreatePayment",
                        json_bytes(&body),
                        &[("idempotency-key", "inflight")],
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Every caller got the one invocation's answer: had any run on its own after the first,
    // it would have answered "Payment already processed".
    for answer in &answers {
        assert_eq!(answer.0, 200, "{answers:?}");
        assert_eq!(answer.1, answers[0].1, "{answers:?}");
        assert_eq!(answer.1["message"], "Payment processed successfully");
    }
    assert_eq!(invocations_with_key(app, &id, "inflight").len(), 1);
    if let Some(entries) = app.ledger_entries(&id) {
        assert_eq!(entries.len(), 1, "{entries:#?}");
    }
}

#[test]
fn openapi_describes_every_field() {
    let app = stack();
    let url = format!("{}/services/PaymentService/openapi", app.admin);
    let response = client().get(&url).send().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let spec: Value = response.json().unwrap();
    let text = spec.to_string();
    for handler in ["CreatePayment", "GetPayment", "RefundPayment"] {
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

fn refund_body(rng: &mut StdRng) -> Value {
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
fn raw_body(rng: &mut StdRng) -> Option<Vec<u8>> {
    let bodies: [&[u8]; 10] = [
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
        10 => Some(format!("{}{}", "[".repeat(2000), "]".repeat(2000)).into_bytes()),
        11 => Some(format!("{{\"description\": \"{}\"}}", "y".repeat(200_000)).into_bytes()),
        i => Some(bodies[i].to_vec()),
    }
}

/// The fuzz run: a seeded stream of odd requests against fresh IDs, odd IDs and stored
/// payments. Each must answer 200 or 4xx; refused requests must change nothing; nothing may be
/// left running. The seed is printed; `FUZZ_SEED=<n>` replays a run.
#[test]
fn fuzzed_requests_answer_4xx_or_a_correct_200_and_change_nothing_when_refused() {
    let app = stack();
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
    let before: HashMap<String, Value> = stored
        .iter()
        .map(|id| (id.clone(), app.get_payment(id).1))
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
                        0..=3 => ("CreatePayment", json_bytes(&create_body(&mut rng))),
                        4..=6 => ("RefundPayment", json_bytes(&refund_body(&mut rng))),
                        7 => ("GetPayment", json_bytes(&odd_value(&mut rng))),
                        8 => (
                            *pick(&mut rng, &["CreatePayment", "RefundPayment"]),
                            raw_body(&mut rng),
                        ),
                        _ => (
                            *pick(&mut rng, &["CreatePayment", "RefundPayment", "GetPayment"]),
                            None,
                        ),
                    };
                    let (status, answer) = post(app, &key, handler, body, &[]);
                    *answered.lock().unwrap().entry(status).or_default() += 1;
                    let fail = |why: &str| {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{handler} {key}: {why}: {status} {answer}"))
                    };
                    match status {
                        200 => match handler {
                            "CreatePayment" => {
                                // A new payment settles completed or failed; a retry of a
                                // refunded one answers it as it is.
                                let settled = match answer["status"].as_str() {
                                    Some("completed" | "failed") => true,
                                    Some("refunded") => {
                                        answer["message"] == "Payment already processed"
                                    }
                                    _ => false,
                                };
                                if !settled || !answer["message"].is_string() {
                                    fail("200 without a settled payment");
                                }
                            }
                            "RefundPayment" => {
                                if !answer["refundId"].is_string() {
                                    fail("200 without a refund");
                                }
                                accepted_refunds.lock().unwrap().push(key.clone());
                            }
                            _ => {
                                if !answer["paymentId"].is_string() {
                                    fail("200 without a payment");
                                }
                            }
                        },
                        400..=499 => {
                            let has_message =
                                answer["message"].as_str().is_some_and(|m| !m.is_empty())
                                    || answer.as_str().is_some_and(|m| !m.is_empty());
                            if !has_message {
                                fail("4xx without a message");
                            }
                        }
                        _ => fail("neither 200 nor 4xx"),
                    }
                }
            });
        }
    });
    let answered = answered.into_inner().unwrap();
    eprintln!("fuzz: answers by status {answered:?}");
    assert!(answered.values().sum::<usize>() >= 1000);
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} bad answers, e.g. {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );

    // A stored payment changes only by an accepted refund, and then only its status.
    let refunded = accepted_refunds.into_inner().unwrap();
    for id in &stored {
        let (status, now) = app.get_payment(id);
        assert_eq!(status, 200, "{now}");
        let mut expected = before[id].clone();
        if refunded.contains(id) {
            expected["status"] = json!("refunded");
        }
        assert_eq!(now, expected, "payment {id} changed by a refused request");
    }

    // Nothing left running or retrying.
    let unfinished = app.query(&format!(
        "SELECT target_service_key, target_handler_name, status, retry_count FROM sys_invocation \
         WHERE target_service_name = 'PaymentService' AND target_service_key LIKE {} \
         AND status <> 'completed'",
        sql_str(&format!("{run}%"))
    ));
    assert!(unfinished.is_empty(), "left unfinished: {unfinished:#?}");
}
