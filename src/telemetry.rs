//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`), and silent while a
//! handler replays its journal, so each event is logged once however often Restate replays.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// Installs the global subscriber. Call once, at the start of `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(filter)
                .with_filter(restate_sdk::filter::ReplayAwareFilter),
        )
        .init();
}
