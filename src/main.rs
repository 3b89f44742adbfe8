//! `payment-service`: parse the configuration, start logging, serve until a signal.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use payment_service::{config::Config, gateway::MockGateway, server, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init();

    let gateway = MockGateway::new(config.mock_gateway()).context("starting the mock gateway")?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("binding {}", config.bind))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        gateway_delay_ms = config.gateway_delay_ms,
        gateway_decline_rate = config.gateway_decline_rate,
        "payment-service listening"
    );
    server::serve(
        listener,
        server::endpoint(Arc::new(gateway)),
        server::shutdown_signal(),
    )
    .await;
    tracing::info!("payment-service stopped");
    Ok(())
}
