//! The published request schemas as a test oracle, and a fuzzer driven by them.
//!
//! A handler's request body is allowed when it is absent and the body is optional, or when it
//! is JSON that its JSON schema validates (a validator no one here wrote: `jsonschema`). The
//! fuzzer reads the schema's properties, their types and bounds, and generates bodies on both
//! sides of each: integers at and around `minimum`/`maximum`, written as integers and as
//! whole or fractional floats; strings at and around `maxLength`, from alphabets with and
//! without control or multi-byte characters (short upper-case strings for `pattern`s); every
//! property absent, null or of the wrong type; unknown properties; and bodies that are empty,
//! whitespace, not JSON or not an object. A test then holds the service to the oracle.

use anyhow::{Context as _, anyhow};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Map, Value, json};

/// A handler's request body as published: its schema and whether a body is required.
pub struct RequestSchema {
    schema: Value,
    required: bool,
    validator: jsonschema::Validator,
}

impl RequestSchema {
    pub fn new(schema: Value, required: bool) -> anyhow::Result<Self> {
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| anyhow!("the schema does not compile: {e}"))?;
        Ok(Self {
            schema,
            required,
            validator,
        })
    }

    /// The request body of `service`'s `handler` in Restate's OpenAPI document (the admin
    /// API's `/services/<service>/openapi`), as the ingress publishes it.
    pub fn from_openapi(openapi: &Value, service: &str, handler: &str) -> anyhow::Result<Self> {
        let path = format!("/restate/call/{service}/{{key}}/{handler}");
        let body = openapi["paths"][&path]["post"]
            .get("requestBody")
            .with_context(|| format!("no request body for {path} in the OpenAPI document"))?;
        let mut schema = &body["content"]["application/json"]["schema"];
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            schema = openapi
                .pointer(reference.trim_start_matches('#'))
                .with_context(|| format!("{reference} is not in the OpenAPI document"))?;
        }
        Self::new(schema.clone(), body["required"].as_bool().unwrap_or(false))
    }

    pub fn schema(&self) -> &Value {
        &self.schema
    }

    pub fn required(&self) -> bool {
        self.required
    }

    /// Whether the schema allows `body` (empty: no body).
    pub fn allows(&self, body: &[u8]) -> bool {
        if body.is_empty() {
            return !self.required;
        }
        serde_json::from_slice::<Value>(body).is_ok_and(|value| self.validator.is_valid(&value))
    }

    /// Bodies on both sides of every rule of the schema (see the module's doc).
    pub fn bodies(&self) -> BoxedStrategy<Vec<u8>> {
        let object = object_for(&self.schema).prop_map(|fields| {
            serde_json::to_vec(&Value::Object(fields)).expect("a JSON value serializes")
        });
        let odd = prop::sample::select(vec![
            "", " ", "\n", "{}", "[]", "[1]", "null", "true", "\"x\"", "123", "{", "{\"a\":",
        ])
        .prop_map(|text| text.as_bytes().to_vec());
        prop_oneof![9 => object, 1 => odd].boxed()
    }
}

/// Runs `check` on `cases` bodies of `schema`'s fuzzer from `seed`; the first failure, with the
/// body that caused it (shrunk), as an error. The seed is the caller's to log.
pub fn fuzz(
    schema: &RequestSchema,
    seed: u64,
    cases: u32,
    mut check: impl FnMut(&[u8]) -> Result<(), String>,
) -> anyhow::Result<()> {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    // proptest takes a `Fn`; the check may count what it sees.
    let check = std::cell::RefCell::new(&mut check);
    runner
        .run(&schema.bodies(), |body| {
            (check.borrow_mut())(&body).map_err(proptest::test_runner::TestCaseError::fail)
        })
        .map_err(|e| anyhow!("{e}"))
}

/// Each declared property absent, or a value for it; now and then an unknown property.
fn object_for(schema: &Value) -> BoxedStrategy<Map<String, Value>> {
    let properties: Vec<(String, Value)> = schema["properties"]
        .as_object()
        .map(|p| p.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = properties
        .into_iter()
        .map(|(name, property)| {
            prop::option::weighted(0.85, value_for(&property))
                .prop_map(move |value| value.map(|v| (name.clone(), v)))
                .boxed()
        })
        .collect();
    let extra = prop::option::weighted(0.2, any_value()).prop_map(|v| v.map(|v| ("extra", v)));
    (fields, extra)
        .prop_map(|(fields, extra)| {
            let mut object: Map<String, Value> = fields.into_iter().flatten().collect();
            if let Some((name, value)) = extra {
                object.insert(name.to_owned(), value);
            }
            object
        })
        .boxed()
}

/// Values for one property: mostly of its declared types, around its bounds, and its
/// enumerated values; sometimes of any type.
fn value_for(property: &Value) -> BoxedStrategy<Value> {
    let types: Vec<&str> = match &property["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let mut typed: Vec<BoxedStrategy<Value>> = Vec::new();
    if types.contains(&"integer") || types.contains(&"number") {
        typed.push(numbers(property));
    }
    if types.contains(&"string") {
        typed.push(strings(property));
    }
    if types.contains(&"null") {
        typed.push(Just(Value::Null).boxed());
    }
    // An enumeration's own values, beside the strings around them that it refuses.
    if let Some(Value::Array(values)) = property.get("enum")
        && !values.is_empty()
    {
        typed.push(prop::sample::select(values.clone()).boxed());
    }
    if typed.is_empty() {
        return any_value();
    }
    prop_oneof![6 => prop::strategy::Union::new(typed), 1 => any_value()].boxed()
}

/// Integers inside, at and outside `minimum..=maximum`, as integers, whole floats (`100.0`)
/// and fractional ones, and numbers far out of range.
fn numbers(property: &Value) -> BoxedStrategy<Value> {
    let min = property["minimum"].as_f64().unwrap_or(-1e6) as i64;
    let max = property["maximum"].as_f64().unwrap_or(1e6) as i64;
    let edges = vec![min - 1, min, min + 1, max - 1, max, max + 1];
    let around = prop_oneof![
        prop::sample::select(edges),
        min - 2..=max + 2,
        -1000i64..1000
    ];
    prop_oneof![
        3 => (min..=max).prop_map(Value::from),
        1 => (min..=max).prop_map(|n| json!(n as f64)),
        1 => around.clone().prop_map(Value::from),
        1 => around.prop_map(|n| json!(n as f64 + 0.5)),
        1 => prop::sample::select(vec![-0.0, 1e300, -1e300, 18446744073709551616.0, 0.001])
            .prop_map(|f| json!(f)),
    ]
    .boxed()
}

/// Strings that match the `pattern` (when there is one), strings within `maxLength`, and
/// strings at and around it, from alphabets with and without control and multi-byte
/// characters.
fn strings(property: &Value) -> BoxedStrategy<Value> {
    let max = property["maxLength"].as_u64().unwrap_or(16) as usize;
    let matching = property["pattern"].as_str().and_then(|pattern| {
        // proptest generates from a regex without anchors; the schema's are implied by them.
        let bare = pattern.trim_start_matches('^').trim_end_matches('$');
        prop::string::string_regex(bare).ok()
    });
    let lengths = prop_oneof![
        0..=4usize,
        prop::sample::select(vec![max.saturating_sub(1), max, max + 1]),
        0..=max + 2,
    ];
    let alphabets: Vec<&'static str> = vec![
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 -_.:/\"\\",
        "abcdeéü€😀 \u{a0}\u{2028}",
        "ABCabc\n\r\t\u{0}\u{1b}\u{7f}\u{85}\u{9f}",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-\u{7f}",
    ];
    let any_length = (prop::sample::select(alphabets.clone()), lengths);
    let within = (prop::sample::select(alphabets[..3].to_vec()), 0..=max);
    let from = |(alphabet, len): (&'static str, usize)| {
        let chars: Vec<char> = alphabet.chars().collect();
        prop::collection::vec(any::<Index>(), len)
            .prop_map(move |picks| Value::String(picks.iter().map(|i| *i.get(&chars)).collect()))
    };
    let mut options = vec![
        (2, any_length.prop_flat_map(from).boxed()),
        (2, within.prop_flat_map(from).boxed()),
    ];
    if let Some(matching) = matching {
        options.push((3, matching.prop_map(Value::String).boxed()));
    }
    prop::strategy::Union::new_weighted(options).boxed()
}

/// A value of any JSON type.
fn any_value() -> BoxedStrategy<Value> {
    prop::sample::select(vec![
        Value::Null,
        json!(true),
        json!(0),
        json!(7),
        json!(-1),
        json!(2.5),
        json!(""),
        json!("USD"),
        json!([]),
        json!([1]),
        json!({}),
        json!({"nested": true}),
    ])
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amount_schema() -> RequestSchema {
        RequestSchema::new(
            json!({
                "type": "object",
                "properties": {
                    "amount": {"type": "integer", "minimum": 1, "maximum": 100},
                    "code": {"type": ["string", "null"], "pattern": "^[A-Z]{3}$", "maxLength": 3}
                },
                "required": ["amount"]
            }),
            true,
        )
        .unwrap()
    }

    #[test]
    fn the_oracle_follows_json_schema() {
        let s = amount_schema();
        for allowed in [
            r#"{"amount": 1}"#,
            r#"{"amount": 100.0}"#,
            r#"{"amount": 1e2, "code": "USD"}"#,
            r#"{"amount": 5, "code": null, "other": [1]}"#,
        ] {
            assert!(s.allows(allowed.as_bytes()), "{allowed}");
        }
        for refused in [
            "",
            " ",
            "[1]",
            r#"{}"#,
            r#"{"amount": 0}"#,
            r#"{"amount": 101}"#,
            r#"{"amount": 1.5}"#,
            r#"{"amount": "1"}"#,
            r#"{"amount": 1, "code": "usd"}"#,
        ] {
            assert!(!s.allows(refused.as_bytes()), "{refused}");
        }
        assert!(RequestSchema::new(json!({}), false).unwrap().allows(b""));
    }

    /// The fuzzer reaches both sides of the schema, and a parser that disagrees is caught.
    #[test]
    fn the_fuzzer_finds_both_sides_and_a_disagreeing_parser() {
        let s = amount_schema();
        let (mut allowed, mut refused) = (0, 0);
        fuzz(&s, 7, 500, |body| {
            if s.allows(body) {
                allowed += 1;
            } else {
                refused += 1;
            }
            Ok(())
        })
        .unwrap();
        assert!(
            allowed > 50 && refused > 50,
            "{allowed} allowed, {refused} refused"
        );

        // Refuses whole floats, as this service once did.
        let strict = |body: &[u8]| {
            let v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            let n = v["amount"].as_u64().ok_or("no integer amount")?;
            let code_ok = match &v["code"] {
                Value::Null => true,
                Value::String(c) => c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()),
                _ => false,
            };
            if (1..=100).contains(&n) && code_ok {
                Ok(())
            } else {
                Err("refused".to_owned())
            }
        };
        let found = fuzz(&s, 7, 500, |body| {
            if s.allows(body) == strict(body).is_ok() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(body).into_owned())
            }
        });
        let message = found.unwrap_err().to_string();
        assert!(message.contains(".0"), "{message}");
    }
}
