//! The simulated Stripe over HTTP/1.1: the endpoints of docs' stripe-subset (form-encoded
//! requests, `Authorization: Bearer <secret key>`, Stripe's JSON objects and error shape,
//! `Idempotency-Key` / `Idempotent-Replayed`), with injected faults: errors (5xx or 429) and
//! hangs before acting, and answers dropped (the connection closed) after acting.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::model::{self, ApiError, Body, Currency, Intent, Metadata, RefundView, Reply};
use super::{CreateIntent, CreateRefund, Engine, Faults, LedgerFault, Post, Store};

/// The largest request body read (Stripe's own limit is far above what this subset sends).
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, Clone, Default)]
pub struct ServeConfig {
    /// Time each call takes (a POST with its key in flight).
    pub delay: Duration,
    pub faults: Faults,
    /// The secret key requests must carry; unset, any `sk_test_…` key is accepted.
    pub api_key: Option<String>,
}

struct Ctx<S> {
    engine: Arc<Engine<S>>,
    config: ServeConfig,
}

/// The answer was lost on purpose: hyper closes the connection without a response.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("answer dropped (fault injection)")
    }
}

impl std::error::Error for Dropped {}

type Answer = Response<Full<Bytes>>;

/// Serves `listener` until `shutdown` completes; then stops accepting and returns (calls in
/// progress are cut off with the process; what they committed is committed).
pub async fn serve<S: Store>(
    listener: TcpListener,
    engine: Arc<Engine<S>>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) {
    let ctx = Arc::new(Ctx { engine, config });
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little and go on.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let ctx = Arc::clone(&ctx);
                async move { handle(ctx, req, peer).await }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

fn json_answer(status: u16, body: &Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(
        "request-id",
        HeaderValue::from_str(&format!("req_{}", super::new_id().simple())).expect("ASCII"),
    );
    r
}

fn error_answer(e: &ApiError) -> Answer {
    json_answer(e.status, &error_json(e))
}

fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
    ApiError::invalid(param.map(|_| "parameter_missing"), param, message.into())
}

async fn handle<S: Store>(
    ctx: Arc<Ctx<S>>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Answer, Dropped> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if method == Method::GET && path == "/healthz" {
        return Ok(json_answer(200, &json!({"ok": true})));
    }
    if let Err(e) = authorize(&ctx.config, &req) {
        return Ok(error_answer(&e));
    }
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return Ok(error_answer(&invalid(
                format!("unreadable body: {e}"),
                None,
            )));
        }
    };
    let fault = ctx.config.faults.roll();
    let route = route(&method, &path, &body, &query);
    tracing::debug!(%peer, %method, %path, key = key.as_deref().unwrap_or("-"), ?fault, "request");
    let answer = match route {
        Err(e) => error_answer(&e),
        Ok(Route::Post(post)) => {
            if let Some(f @ (LedgerFault::Error | LedgerFault::Hang)) = fault {
                if let Err(e) = ctx.engine.record_fault(key.clone(), post, f).await {
                    tracing::error!("recording a fault: {e:#}");
                }
                if f == LedgerFault::Hang {
                    tracing::info!(%path, "hanging (fault injection)");
                    std::future::pending::<()>().await;
                }
                return Ok(injected_error());
            }
            let dropped = fault == Some(LedgerFault::Drop);
            match ctx
                .engine
                .post(key.clone(), post, ctx.config.delay, dropped)
                .await
            {
                Ok(reply) => {
                    tracing::info!(
                        %method, %path,
                        key = key.as_deref().unwrap_or("-"),
                        status = reply.status(),
                        replay = reply.replay,
                        dropped,
                        "call"
                    );
                    reply_answer(&reply, key.as_deref())
                }
                Err(e) => {
                    tracing::error!("store failed: {e:#}");
                    error_answer(&api_error(format!("{e:#}")))
                }
            }
        }
        Ok(get) => {
            match fault {
                Some(LedgerFault::Error) => return Ok(injected_error()),
                Some(LedgerFault::Hang) => std::future::pending::<()>().await,
                _ => {}
            }
            if !ctx.config.delay.is_zero() {
                tokio::time::sleep(ctx.config.delay).await;
            }
            match lookup(&ctx.engine, get).await {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::error!("store failed: {e:#}");
                    error_answer(&api_error(format!("{e:#}")))
                }
            }
        }
    };
    if fault == Some(LedgerFault::Drop) {
        tracing::info!(%path, "dropping the answer (fault injection)");
        return Err(Dropped);
    }
    Ok(answer)
}

fn api_error(message: String) -> ApiError {
    ApiError {
        status: 500,
        kind: "api_error",
        ..ApiError::invalid(None, None, message)
    }
}

/// An injected error: a 500 or a 429, half and half.
fn injected_error() -> Answer {
    if rand::random::<bool>() {
        error_answer(&api_error(
            "An unknown error occurred (fault injection)".into(),
        ))
    } else {
        error_answer(&ApiError {
            status: 429,
            ..ApiError::invalid(
                Some("rate_limit"),
                None,
                "Too many requests hit the API too quickly (fault injection).".into(),
            )
        })
    }
}

fn authorize(config: &ServeConfig, req: &Request<Incoming>) -> Result<(), ApiError> {
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let unauthorized = |message: String| ApiError {
        status: 401,
        ..ApiError::invalid(None, None, message)
    };
    match (given, &config.api_key) {
        (None, _) => Err(unauthorized(
            "You did not provide an API key. You need to provide your API key in the \
             Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
                .into(),
        )),
        (Some(key), Some(expected)) if key == expected => Ok(()),
        (Some(key), None) if key.starts_with("sk_test_") => Ok(()),
        (Some(key), _) => Err(unauthorized(format!(
            "Invalid API Key provided: {}",
            mask(key)
        ))),
    }
}

fn mask(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!(
        "{}{tail}",
        "*".repeat(key.chars().count().saturating_sub(4).min(20))
    )
}

enum Route {
    Post(Post),
    Retrieve(String),
    Search(String),
    Refunds(String),
}

fn route(method: &Method, path: &str, body: &[u8], query: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let form = || {
        form_urlencoded::parse(body)
            .into_owned()
            .collect::<Vec<_>>()
    };
    let query = || {
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect::<Vec<_>>()
    };
    match (method, segments.as_slice()) {
        (&Method::POST, ["v1", "payment_intents"]) => create_intent(&form()).map(Route::Post),
        (&Method::POST, ["v1", "payment_intents", id, "confirm"]) => {
            let form = form();
            Ok(Route::Post(Post::Confirm {
                intent: (*id).to_owned(),
                payment_method: param(&form, "payment_method").map(str::to_owned),
            }))
        }
        (&Method::POST, ["v1", "payment_intents", id, "cancel"]) => Ok(Route::Post(Post::Cancel {
            intent: (*id).to_owned(),
        })),
        (&Method::POST, ["v1", "payment_intents", id, "capture"]) => {
            Ok(Route::Post(Post::Capture {
                intent: (*id).to_owned(),
                amount_to_capture: amount(&form(), "amount_to_capture")?,
            }))
        }
        (&Method::GET, ["v1", "payment_intents", "search"]) => {
            let query = query();
            let q = param(&query, "query")
                .ok_or_else(|| invalid("Missing required param: query.", Some("query")))?;
            parse_search(q).map(Route::Search)
        }
        (&Method::GET, ["v1", "payment_intents", id]) => Ok(Route::Retrieve((*id).to_owned())),
        (&Method::POST, ["v1", "refunds"]) => create_refund(&form()).map(Route::Post),
        (&Method::GET, ["v1", "refunds"]) => {
            let query = query();
            let pi = param(&query, "payment_intent").ok_or_else(|| {
                invalid(
                    "This mock lists refunds by payment_intent only.",
                    Some("payment_intent"),
                )
            })?;
            Ok(Route::Refunds(pi.to_owned()))
        }
        _ => Err(ApiError {
            status: 404,
            ..ApiError::invalid(
                None,
                None,
                format!("Unrecognized request URL ({method}: {path})."),
            )
        }),
    }
}

fn param<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn metadata(form: &[(String, String)]) -> Metadata {
    Metadata::new(
        form.iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix("metadata[")?.strip_suffix(']')?;
                Some((key.to_owned(), v.clone()))
            })
            .collect(),
    )
}

/// The positive integer `name` (an amount), if given.
fn amount(form: &[(String, String)], name: &'static str) -> Result<Option<u64>, ApiError> {
    param(form, name)
        .map(|a| {
            a.parse::<u64>()
                .ok()
                .filter(|&a| a > 0)
                .ok_or_else(|| invalid(format!("Invalid positive integer: {a}"), Some(name)))
        })
        .transpose()
}

fn create_intent(form: &[(String, String)]) -> Result<Post, ApiError> {
    let amount = amount(form, "amount")?
        .ok_or_else(|| invalid("Missing required param: amount.", Some("amount")))?;
    let currency = param(form, "currency")
        .ok_or_else(|| invalid("Missing required param: currency.", Some("currency")))?;
    let currency = Currency::parse(currency)
        .ok_or_else(|| invalid(format!("Invalid currency: {currency}."), Some("currency")))?;
    let confirm = match param(form, "confirm") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(invalid(
                format!("Invalid boolean: {other}"),
                Some("confirm"),
            ));
        }
    };
    let payment_method = param(form, "payment_method").map(str::to_owned);
    if confirm && payment_method.is_none() {
        return Err(invalid(
            "You cannot confirm this PaymentIntent because it's missing a payment method.",
            Some("payment_method"),
        ));
    }
    let capture_manual = match param(form, "capture_method") {
        None | Some("automatic" | "automatic_async") => false,
        Some("manual") => true,
        Some(other) => {
            return Err(invalid(
                format!(
                    "Invalid capture_method: must be one of automatic, automatic_async or manual, not {other}"
                ),
                Some("capture_method"),
            ));
        }
    };
    let payment_method_types = form
        .iter()
        .filter(|(k, _)| k.starts_with("payment_method_types["))
        .map(|(_, v)| v.clone())
        .collect();
    Ok(Post::CreateIntent(CreateIntent {
        amount,
        currency,
        confirm,
        payment_method,
        payment_method_types,
        metadata: metadata(form),
        capture_manual,
    }))
}

fn create_refund(form: &[(String, String)]) -> Result<Post, ApiError> {
    let payment_intent = param(form, "payment_intent")
        .or_else(|| param(form, "charge"))
        .ok_or_else(|| {
            invalid(
                "One of the following params should be provided for this request: payment_intent or charge.",
                Some("payment_intent"),
            )
        })?;
    Ok(Post::CreateRefund(CreateRefund {
        payment_intent: payment_intent.to_owned(),
        amount: amount(form, "amount")?,
        metadata: metadata(form),
    }))
}

/// Reads the one search this mock knows: `metadata['payment_id']:'<id>'` (either quotes).
fn parse_search(q: &str) -> Result<String, ApiError> {
    let unsupported = || {
        invalid(
            format!("This mock searches by metadata['payment_id'] only, not: {q}"),
            Some("query"),
        )
    };
    let rest = q.trim().strip_prefix("metadata[").ok_or_else(unsupported)?;
    let (field, rest) = rest.split_once("]:").ok_or_else(unsupported)?;
    let unquote = |s: &str| {
        let s = s.trim();
        ['\'', '"']
            .iter()
            .find_map(|&q| s.strip_prefix(q)?.strip_suffix(q).map(str::to_owned))
    };
    if unquote(field).as_deref() != Some("payment_id") {
        return Err(unsupported());
    }
    unquote(rest).ok_or_else(unsupported)
}

async fn lookup<S: Store>(engine: &Arc<Engine<S>>, route: Route) -> anyhow::Result<Answer> {
    Ok(match route {
        Route::Post(_) => unreachable!("posts are not look-ups"),
        Route::Retrieve(id) => match engine.retrieve(id.clone()).await? {
            Some(intent) => json_answer(200, &intent_json(&intent)),
            None => error_answer(&ApiError::missing("payment_intent", &id, None)),
        },
        Route::Search(payment_id) => {
            let data: Vec<Value> = engine
                .search(payment_id)
                .await?
                .iter()
                .rev()
                .map(intent_json)
                .collect();
            json_answer(
                200,
                &json!({
                    "object": "search_result",
                    "url": "/v1/payment_intents/search",
                    "data": data,
                    "has_more": false,
                    "next_page": null,
                }),
            )
        }
        Route::Refunds(pi) => match engine.refunds(pi.clone()).await? {
            Some(refunds) => json_answer(
                200,
                &json!({
                    "object": "list",
                    "url": "/v1/refunds",
                    "data": refunds.iter().map(refund_json).collect::<Vec<_>>(),
                    "has_more": false,
                }),
            ),
            None => error_answer(&ApiError::missing(
                "payment_intent",
                &pi,
                Some("payment_intent"),
            )),
        },
    })
}

fn reply_answer(reply: &Reply, key: Option<&str>) -> Answer {
    let mut answer = match &reply.body {
        Body::Intent(i) => json_answer(200, &intent_json(i)),
        Body::Refund(r) => json_answer(200, &refund_json(r)),
        Body::Error(e) => error_answer(e),
    };
    if reply.replay {
        answer
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if let Some(key) = key.and_then(|k| HeaderValue::from_str(k).ok()) {
        answer.headers_mut().insert("idempotency-key", key);
    }
    answer
}

fn metadata_json(m: &Metadata) -> Value {
    Value::Object(
        m.pairs()
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

/// A PaymentIntent as Stripe renders it (the fields of this subset, the rest null or empty).
pub fn intent_json(i: &Intent) -> Value {
    let id = i.id();
    let succeeded = i.status == model::IntentStatus::Succeeded;
    let held = i.status == model::IntentStatus::RequiresCapture;
    let charged = succeeded || held || !i.refunds.is_empty();
    json!({
        "id": id,
        "object": "payment_intent",
        "amount": i.amount,
        "amount_capturable": if held { i.amount } else { 0 },
        "amount_details": {"tip": {}},
        "amount_received": i.amount_received(),
        "application": null,
        "application_fee_amount": null,
        "automatic_payment_methods": null,
        "canceled_at": i.canceled_at,
        "cancellation_reason": null,
        "capture_method": if i.capture_manual { "manual" } else { "automatic" },
        "client_secret": format!("{id}_secret_mock"),
        "confirmation_method": "automatic",
        "created": i.created,
        "currency": i.currency.as_str(),
        "customer": null,
        "description": null,
        "last_payment_error": if i.declined { decline_json(i) } else { Value::Null },
        "latest_charge": if charged { Value::String(model::charge_id(&i.id)) } else { Value::Null },
        "livemode": false,
        "metadata": metadata_json(&i.metadata),
        "next_action": null,
        "on_behalf_of": null,
        "payment_method": i.payment_method.as_deref(),
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "processing": null,
        "receipt_email": null,
        "review": null,
        "setup_future_usage": null,
        "shipping": null,
        "source": null,
        "statement_descriptor": null,
        "statement_descriptor_suffix": null,
        "status": i.status.as_str(),
        "transfer_data": null,
        "transfer_group": null,
    })
}

fn decline_json(i: &Intent) -> Value {
    json!({
        "type": "card_error",
        "code": "card_declined",
        "decline_code": "insufficient_funds",
        "message": model::INSUFFICIENT_FUNDS_MESSAGE,
        "charge": model::charge_id(&i.id),
        // Stripe expands the payment method here; async-stripe then reads a whole one, and a
        // partial object would make it read the decline as an unreadable answer. Left out.
    })
}

pub fn refund_json(r: &RefundView) -> Value {
    json!({
        "id": r.id(),
        "object": "refund",
        "amount": r.amount,
        "balance_transaction": null,
        "charge": model::charge_id(&r.intent),
        "created": r.created,
        "currency": r.currency.as_str(),
        "destination_details": null,
        "metadata": metadata_json(&r.metadata),
        "payment_intent": model::intent_id(&r.intent),
        "reason": null,
        "receipt_number": null,
        "source_transfer_reversal": null,
        "status": "succeeded",
        "transfer_reversal": null,
    })
}

pub fn error_json(e: &ApiError) -> Value {
    let mut error = serde_json::Map::new();
    error.insert("type".into(), e.kind.into());
    error.insert("message".into(), e.message.clone().into());
    if let Some(code) = e.code {
        error.insert("code".into(), code.into());
        error.insert(
            "doc_url".into(),
            format!(
                "https://stripe.com/docs/error-codes/{}",
                code.replace('_', "-")
            )
            .into(),
        );
    }
    if let Some(decline) = e.decline_code {
        error.insert("decline_code".into(), decline.into());
    }
    if let Some(param) = e.param {
        error.insert("param".into(), param.into());
    }
    if let Some(i) = &e.payment_intent {
        if e.kind == "card_error" {
            error.insert("charge".into(), model::charge_id(&i.id).into());
        }
        error.insert("payment_intent".into(), intent_json(i));
    }
    json!({ "error": error })
}
