//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`: one line per outcome,
//! and `debug` adds each step), and silent while a handler replays its journal, so each event
//! is logged once however often Restate replays.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
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
                .with_ansi(std::io::stderr().is_terminal())
                .event_format(EventLine)
                .with_filter(restate_sdk::filter::ReplayAwareFilter),
        )
        .init();
}

/// `<time> <level> <message> <fields>`: the default format's line without its span prefix,
/// which here would be the SDK's invocation span with every replay flag it ever recorded.
/// Lines about a payment name it in their own `payment_id` field.
struct EventLine;

impl<S, N> FormatEvent<S, N> for EventLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        SystemTime.format_time(&mut writer)?;
        write!(writer, " {:>5} ", event.metadata().level())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
