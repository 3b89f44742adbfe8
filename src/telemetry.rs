//! Logging: `tracing` to stderr, filtered by `RUST_LOG` (default `info`: one line per outcome,
//! and `debug` adds each step), and silent while a handler replays its journal, so each event
//! is logged once however often Restate replays.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::io::Write as _;

use time::OffsetDateTime;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Filter};
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
    // The level filter is global, so events below it cost a cached check and nothing more.
    tracing_subscriber::registry()
        .with(filter)
        .with(EventLines)
        .init();
}

/// The SDK's replay filter, asked directly by [`EventLines`] rather than attached as a
/// per-layer filter: attached, it would look the SDK's span up on every enter and exit (every
/// poll of every invocation) only to learn that it is enabled.
const REPLAY: restate_sdk::filter::ReplayAwareFilter = restate_sdk::filter::ReplayAwareFilter;

/// One line per event on stderr, `<time> <level> <message> <field>=<value> ...`: the time in
/// UTC with microseconds, values as `Debug` writes them (strings quoted; `%` fields as
/// `Display` writes them). Lines about a payment name it in their own `payment_id` field.
/// Control characters in the message and in values are escaped (`\n`, `\x1b`, `\u{85}`), so
/// no input can start a line of its own or drive a terminal. Written by hand rather than by
/// `tracing_subscriber::fmt`, which formats the fields of every span it sees (one per
/// invocation) for a prefix never printed, and the time through a format description.
struct EventLines;

impl<S> Layer<S> for EventLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        Filter::on_new_span(&REPLAY, attrs, id, ctx);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        Filter::on_record(&REPLAY, id, values, ctx);
    }

    fn event_enabled(&self, event: &Event<'_>, ctx: Context<'_, S>) -> bool {
        Filter::event_enabled(&REPLAY, event, &ctx)
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            format_line(line, OffsetDateTime::now_utc(), event);
            // Nowhere to report a failed write to stderr.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        });
    }
}

/// Writes `event` as one line, newline included, into `line`.
fn format_line(line: &mut String, at: OffsetDateTime, event: &Event<'_>) {
    line.push_str(crate::rfc3339::utc::<6>(at).as_str());
    line.push_str(match *event.metadata().level() {
        Level::ERROR => " ERROR ",
        Level::WARN => "  WARN ",
        Level::INFO => "  INFO ",
        Level::DEBUG => " DEBUG ",
        Level::TRACE => " TRACE ",
    });
    event.record(&mut Fields { line, first: true });
    line.push('\n');
}

/// Writes an event's message and fields, space-separated, in the order they come.
struct Fields<'a> {
    line: &'a mut String,
    first: bool,
}

impl Fields<'_> {
    /// `name=` (nothing for the message), then whatever `value` writes, escaped.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut String) -> fmt::Result) {
        if !std::mem::take(&mut self.first) {
            self.line.push(' ');
        }
        if field.name() != "message" {
            let name = field.name();
            self.line.push_str(name.strip_prefix("r#").unwrap_or(name));
            self.line.push('=');
        }
        let start = self.line.len();
        // Writing into a `String` cannot fail; a `Debug` impl that fails leaves what it wrote.
        let _ = value(self.line);
        escape_controls(self.line, start);
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, |line| {
                line.push_str(value);
                Ok(())
            });
        } else {
            self.field(field, |line| write!(line, "{value:?}"));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |line| write!(line, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |line| write!(line, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |line| {
            line.push_str(if value { "true" } else { "false" });
            Ok(())
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |line| write!(line, "{value:?}"));
    }
}

/// Escapes, in place, every control character written from `start` on: C0 (line breaks
/// included), DEL and C1 (`char::is_control`). Nearly always the value is printable ASCII, and
/// a scan of its bytes is all it costs.
fn escape_controls(line: &mut String, start: usize) {
    let written = &line[start..];
    if written.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return;
    }
    let Some(first) = written.find(char::is_control) else {
        return;
    };
    let tail = line.split_off(start + first);
    for c in tail.chars() {
        match c {
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            c if c.is_control() => {
                // `\x1b` for C0 and DEL, `\u{85}` for C1: as `tracing_subscriber` escapes them.
                let _ = if (c as u32) < 0x80 {
                    write!(line, "\\x{:02x}", c as u32)
                } else {
                    write!(line, "\\u{{{:x}}}", c as u32)
                };
            }
            c => line.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use time::macros::datetime;
    use tracing_subscriber::registry;

    use super::*;

    /// The lines `log` writes, formatted as [`EventLines`] formats them, at a fixed time.
    fn lines(log: impl FnOnce()) -> Vec<String> {
        struct Capture(Arc<Mutex<Vec<String>>>);
        impl<S: Subscriber> Layer<S> for Capture {
            fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
                let mut line = String::new();
                format_line(&mut line, datetime!(2026-12-07 01:02:03.456789 UTC), event);
                self.0.lock().unwrap().push(line);
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(registry().with(Capture(Arc::clone(&seen))), log);
        Arc::try_unwrap(seen).unwrap().into_inner().unwrap()
    }

    #[test]
    fn a_line_is_time_level_message_and_fields_in_order() {
        let id = "pay-1";
        let lines = lines(|| {
            tracing::info!(
                payment_id = %id,
                amount = 10000_u64,
                delta = -3_i64,
                replay = false,
                charge_id = Some("pi_1"),
                missing = None::<&str>,
                "payment completed"
            );
            tracing::warn!(r#type = "x", "quoted");
        });
        assert_eq!(
            lines,
            [
                "2026-12-07T01:02:03.456789Z  INFO payment completed payment_id=pay-1 amount=10000 delta=-3 replay=false charge_id=\"pi_1\"\n",
                "2026-12-07T01:02:03.456789Z  WARN quoted type=\"x\"\n",
            ]
        );
    }

    #[test]
    fn no_value_or_message_can_start_a_line_or_drive_a_terminal() {
        let forged = "x\n2026-12-02T03:40:00.000000Z  INFO payment completed payment_id=vip";
        let lines = lines(|| {
            tracing::error!(customer = %forged, "refused {}", "a\r\x1b[31mred\u{85}\t!\x7f");
            tracing::debug!(quoted = forged, "");
        });
        assert_eq!(
            lines,
            [
                "2026-12-07T01:02:03.456789Z ERROR refused a\\r\\x1b[31mred\\u{85}\\t!\\x7f customer=x\\n2026-12-02T03:40:00.000000Z  INFO payment completed payment_id=vip\n",
                "2026-12-07T01:02:03.456789Z DEBUG  quoted=\"x\\n2026-12-02T03:40:00.000000Z  INFO payment completed payment_id=vip\"\n",
            ]
        );
        for line in lines {
            assert_eq!(line.matches('\n').count(), 1, "{line}");
        }
    }
}
