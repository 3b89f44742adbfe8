//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`: one line per outcome,
//! and `debug` adds each step), and silent while a handler replays its journal, so each event
//! is logged once however often Restate replays.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

const SDK_SPAN: &str = "restate_sdk::endpoint=info";

/// Installs the global subscriber. Call once, at the start of `main`.
pub fn init() {
    // The SDK's invocation span (target `restate_sdk::endpoint`, level info) carries the replay
    // flag that the replay filter reads: it stays on whatever RUST_LOG says, or a filter such
    // as `payment_service=debug` would log every replayed step again.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(SDK_SPAN.parse().expect("a valid directive"));
    // The level filter is global, so events below it cost a cached check and nothing more;
    // the replay filter has to look at each event's span, so it stays on the layer.
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(restate_sdk::filter::ReplayAwareFilter),
        )
        .init();
}
