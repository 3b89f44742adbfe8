//! `mock-gateway`: the simulated Stripe (`payment_service::stripe_sim`) as a process of its own,
//! its state in SQLite. See `mock-gateway --help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use payment_service::gateway::webhook::WebhookSecret;
use payment_service::stripe_sim::webhooks::{WebhookConfig, deliveries};
use payment_service::stripe_sim::{Engine, Faults, SimConfig, SqliteStore, http};
use payment_service::{server, telemetry};

/// A simulated Stripe (PaymentIntents, refunds, idempotency keys) serving the subset of
/// Stripe's API the payment service's Stripe adapter uses, with injected faults.
#[derive(Debug, Parser)]
#[command(name = "mock-gateway", version, about)]
struct Args {
    /// Address to listen on (HTTP/1.1).
    #[arg(long, env = "MOCK_GATEWAY_BIND", default_value = "127.0.0.1:12111")]
    bind: SocketAddr,
    /// SQLite database holding intents, refunds and keys; kept across restarts. Unset, an
    /// in-memory database that dies with the process.
    #[arg(long, env = "MOCK_GATEWAY_DB")]
    db: Option<PathBuf>,
    /// Audit ledger: one JSON line per call received.
    #[arg(long, env = "MOCK_GATEWAY_LEDGER")]
    ledger: Option<PathBuf>,
    /// Milliseconds each call takes (a POST's key is in flight meanwhile).
    #[arg(long, env = "MOCK_GATEWAY_DELAY_MS", default_value_t = 0)]
    delay_ms: u64,
    /// Share of confirmations declined, 0 to 1.
    #[arg(long, env = "MOCK_GATEWAY_DECLINE_RATE", default_value_t = 0.0)]
    decline_rate: f64,
    /// Share of calls answered 500 or 429 before acting, 0 to 1.
    #[arg(long, env = "MOCK_GATEWAY_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    /// Share of calls acted on and recorded, then the connection closed without an answer.
    #[arg(long, env = "MOCK_GATEWAY_DROP_RESPONSE_RATE", default_value_t = 0.0)]
    drop_response_rate: f64,
    /// Share of calls accepted and never answered, before acting.
    #[arg(long, env = "MOCK_GATEWAY_HANG_RATE", default_value_t = 0.0)]
    hang_rate: f64,
    /// How long an idempotency key's first answer is kept (e.g. `24h`, `10s`).
    #[arg(long, env = "MOCK_GATEWAY_KEY_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    key_retention: Duration,
    /// The secret key requests must carry (`Authorization: Bearer <it>`); unset, any
    /// `sk_test_…` key is accepted.
    #[arg(long, env = "MOCK_GATEWAY_API_KEY")]
    api_key: Option<String>,
    /// How long a processing intent (customers `async-*`) takes to settle by itself.
    #[arg(long, env = "MOCK_GATEWAY_SETTLE_DELAY", default_value = "2s", value_parser = humantime::parse_duration)]
    settle_delay: Duration,
    /// Where to send webhooks for intents that settle by themselves (e.g. the payment
    /// service's `http://<ingress>/StripeWebhooks/Receive`); unset, none are sent.
    #[arg(long, env = "MOCK_GATEWAY_WEBHOOK_URL", requires = "webhook_secret")]
    webhook_url: Option<String>,
    /// The endpoint's signing secret (`whsec_…`), as the service's `STRIPE_WEBHOOK_SECRET`.
    #[arg(long, env = "MOCK_GATEWAY_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Fault injection: act on every call as if its key were new.
    #[cfg(feature = "fault-injection")]
    #[arg(long, env = "MOCK_GATEWAY_UNSAFE_IGNORE_IDEMPOTENCY_KEYS")]
    unsafe_ignore_idempotency_keys: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let faults = Faults {
        error_rate: args.error_rate,
        drop_response_rate: args.drop_response_rate,
        hang_rate: args.hang_rate,
    };
    faults.check()?;
    let config = SimConfig {
        decline_rate: args.decline_rate,
        key_retention: args.key_retention,
        #[cfg(feature = "fault-injection")]
        ignore_idempotency_keys: args.unsafe_ignore_idempotency_keys,
        #[cfg(not(feature = "fault-injection"))]
        ignore_idempotency_keys: false,
        settle_delay: args.settle_delay,
    };
    let db = args.db.clone().unwrap_or_else(|| PathBuf::from(":memory:"));
    let store = SqliteStore::open(&db, args.ledger.as_deref())?;
    let engine = Arc::new(Engine::new(store, config)?);
    let _settler = match (args.webhook_url.clone(), args.webhook_secret) {
        (Some(url), Some(secret)) => engine.spawn_settler(deliveries(WebhookConfig {
            url,
            secret: WebhookSecret::new(secret),
        })),
        _ => engine.spawn_settler(drop),
    };
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .with_context(|| format!("binding {}", args.bind))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        db = %db.display(),
        ledger = ?args.ledger,
        delay_ms = args.delay_ms,
        ?faults,
        webhook_url = args.webhook_url.as_deref(),
        settle_delay = %humantime::format_duration(args.settle_delay),
        key_retention = %humantime::format_duration(args.key_retention),
        "mock-gateway listening"
    );
    // The readiness line harnesses may wait for (or poll GET /healthz).
    println!("mock-gateway ready on http://{addr}");
    let serve = http::ServeConfig {
        delay: Duration::from_millis(args.delay_ms),
        faults,
        api_key: args.api_key,
    };
    http::serve(listener, engine, serve, server::shutdown_signal()).await;
    tracing::info!("mock-gateway stopped");
    Ok(())
}
