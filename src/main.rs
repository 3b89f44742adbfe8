//! `payment-service`: parse the configuration, start logging, serve until a signal.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use payment_service::{config::Config, gateway::MockGateway, server, telemetry};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init();
    if let Err(refusal) = config.check_signing() {
        tracing::error!("{refusal}");
        anyhow::bail!(refusal);
    }
    server::runtime(config.worker_threads.into())
        .context("starting the async runtime")?
        .block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let gateway = MockGateway::new(config.mock_gateway()).context("starting the mock gateway")?;
    let listener =
        server::listen(config.bind).with_context(|| format!("binding {}", config.bind))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        gateway_delay_ms = config.gateway_delay_ms,
        gateway_decline_rate = config.gateway_decline_rate,
        worker_threads = config.worker_threads,
        "payment-service listening"
    );
    let endpoint = server::endpoint(
        Arc::new(gateway),
        config.settle_policy(),
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
