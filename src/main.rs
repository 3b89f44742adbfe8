//! `payment-service`: parse the configuration, start logging, serve until a signal.

use anyhow::Context as _;
use clap::Parser;
use payment_service::config::{Config, GatewayKind};
use payment_service::{server, telemetry};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init();
    if let Err(refusal) = config.check_signing().and_then(|()| config.check_gateway()) {
        tracing::error!("{refusal}");
        anyhow::bail!(refusal);
    }
    server::runtime(config.worker_threads.into())
        .context("starting the async runtime")?
        .block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let gateway = config.gateway()?;
    let listener =
        server::listen(config.bind).with_context(|| format!("binding {}", config.bind))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        gateway = %config.gateway,
        gateway_delay_ms = config.gateway_delay_ms,
        gateway_decline_rate = config.gateway_decline_rate,
        worker_threads = config.worker_threads,
        "payment-service listening"
    );
    if config.gateway == GatewayKind::Stripe {
        tracing::info!(api_base = %config.stripe_api_base, "gateway: Stripe's API");
    }
    let endpoint = server::endpoint(
        gateway,
        config.settle_policy(),
        config.hold_expiry,
        config.stripe_webhook_secret.clone(),
        &config.identity_keys,
    )?;
    if config.identity_keys.is_empty() {
        tracing::info!("no identity keys: any caller that reaches this port can invoke handlers");
    }
    match &config.deployment_version {
        Some(version) => tracing::info!(%version, "serving only under /{version}/"),
        None => tracing::info!("no deployment version: serving under any path"),
    }
    server::serve(
        listener,
        endpoint,
        config.deployment_version.as_deref(),
        server::shutdown_signal(),
    )
    .await;
    tracing::info!("payment-service stopped");
    Ok(())
}
