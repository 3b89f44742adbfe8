//! The simulated gateway's webhooks: each intent that settled by itself ([`super::Settled`]) is
//! reported to the configured endpoint as Stripe reports it, a signed event
//! (`Stripe-Signature`, signed anew for each attempt), retried with backoff until it is answered
//! 2xx, for up to three days as Stripe does. The deliveries waiting live in memory: a gateway
//! restarted meanwhile does not send them, and the service's deadline look-up settles those
//! payments instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use serde_json::{Value, json};

use super::Settled;
use super::http::intent_json;
use crate::gateway::webhook::{WebhookSecret, sign};

/// Where the events go, and the endpoint's signing secret (`whsec_…`).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: String,
    pub secret: WebhookSecret,
}

/// How long an event is retried, as Stripe retries live-mode events.
const RETRY_FOR: Duration = Duration::from_secs(3 * 24 * 60 * 60);

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The event Stripe sends for `settled`, as `id`, created at `created` (Unix seconds).
pub fn event_json(id: &str, created: i64, settled: &Settled) -> Value {
    json!({
        "id": id,
        "object": "event",
        "api_version": "2025-09-30.clover",
        "created": created,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": settled.event_type,
        "data": {"object": intent_json(&settled.intent)},
    })
}

/// A sink for [`super::Engine::spawn_settler`] that delivers each event on a task of its own.
pub fn deliveries(config: WebhookConfig) -> impl Fn(Settled) + Send + 'static {
    let client = reqwest::Client::new();
    move |settled| {
        tokio::spawn(deliver(client.clone(), config.clone(), settled));
    }
}

async fn deliver(client: reqwest::Client, config: WebhookConfig, settled: Settled) {
    let id = format!("evt_{}", super::new_id().simple());
    let body =
        serde_json::to_vec(&event_json(&id, now_secs(), &settled)).expect("an event serializes");
    let attempt = || async {
        let answer = client
            .post(&config.url)
            .header("content-type", "application/json")
            .header("stripe-signature", sign(&body, &config.secret, now_secs()))
            .body(body.clone())
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("{e}"))?;
        match answer.status() {
            s if s.is_success() => Ok(()),
            s => Err(format!("answered {s}")),
        }
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(RETRY_FOR));
    let intent = settled.intent.id();
    match attempt
        .retry(backoff)
        .notify(|error, pause| {
            tracing::warn!(event = %id, %intent, %error, retry_in = ?pause, "webhook not delivered, retrying");
        })
        .await
    {
        Ok(()) => tracing::info!(event = %id, %intent, kind = settled.event_type, "webhook delivered"),
        Err(error) => {
            tracing::error!(event = %id, %intent, %error, "webhook given up after three days")
        }
    }
}
