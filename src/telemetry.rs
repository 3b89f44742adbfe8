//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`: one line per outcome,
//! and `debug` adds each step), and silent while a handler replays its journal, so each event
//! is logged once however often Restate replays.

use std::cell::RefCell;
use std::io::Write as _;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::layer::Context;
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
        .with(EventLines.with_filter(restate_sdk::filter::ReplayAwareFilter))
        .init();
}

/// One line per event on stderr, `<time> <level> <message> <fields>`: the default format's
/// line without its span prefix, which here would be the SDK's invocation span with every
/// replay flag it ever recorded. Lines about a payment name it in their own `payment_id`
/// field. A layer of its own rather than `tracing_subscriber::fmt`'s, which formats the fields
/// of every span it sees (one per invocation) for a prefix never printed. Control characters
/// in values are escaped (`Writer`'s sanitizing), so no value starts a line of its own.
struct EventLines;

impl<S> Layer<S> for EventLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            let mut writer = Writer::new(line);
            let formatted = SystemTime
                .format_time(&mut writer)
                .and_then(|()| write!(writer, " {:>5} ", event.metadata().level()))
                .and_then(|()| DefaultFields::new().format_fields(writer.by_ref(), event))
                .and_then(|()| writeln!(writer));
            if formatted.is_ok() {
                // Nowhere to report a failed write to stderr.
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        });
    }
}
