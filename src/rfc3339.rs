//! RFC 3339 timestamps in UTC (`2026-11-27T18:04:05.120Z`), written digit by digit into a
//! buffer on the stack. `time`'s formatter interprets a format description on every call and
//! returns a `String`: several times the work, and a payment's record and log line write four
//! timestamps between them.

use time::{OffsetDateTime, UtcOffset};

/// The longest form: `-YYYYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const MAX_LEN: usize = 33;

/// `at` in UTC, as RFC 3339 with `FRACTION` fractional digits (1 to 9, truncated, never
/// trimmed). A year before 0000, which RFC 3339 cannot write, gets a minus sign, as `time`
/// writes it; no timestamp the service makes is that far off.
pub fn utc<const FRACTION: usize>(at: OffsetDateTime) -> Rfc3339 {
    const { assert!(FRACTION >= 1 && FRACTION <= 9) };
    let at = at.to_offset(UtcOffset::UTC);
    let mut out = Rfc3339 {
        bytes: [0; MAX_LEN],
        len: 0,
    };
    let year = at.year();
    if year < 0 {
        out.push(b"-");
    }
    let (hour, minute, second, nanos) = at.to_hms_nano();
    // Four digits, or more where `time` allows larger years.
    let year = year.unsigned_abs();
    out.digits(
        year,
        year.checked_ilog10().map_or(1, |d| d as usize + 1).max(4),
    );
    out.push(b"-");
    out.digits(u8::from(at.month()).into(), 2);
    out.push(b"-");
    out.digits(at.day().into(), 2);
    out.push(b"T");
    out.digits(hour.into(), 2);
    out.push(b":");
    out.digits(minute.into(), 2);
    out.push(b":");
    out.digits(second.into(), 2);
    out.push(b".");
    out.digits(nanos / 10u32.pow(9 - FRACTION as u32), FRACTION);
    out.push(b"Z");
    out
}

/// A timestamp written by [`utc`].
#[derive(Clone, Copy)]
pub struct Rfc3339 {
    bytes: [u8; MAX_LEN],
    len: usize,
}

impl Rfc3339 {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("RFC 3339 is ASCII")
    }

    fn push(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        self.bytes[self.len..end].copy_from_slice(bytes);
        self.len = end;
    }

    /// `value`'s last `width` decimal digits, zero-padded.
    fn digits(&mut self, mut value: u32, width: usize) {
        let mut digits = [b'0'; 9];
        for slot in digits[..width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
        self.push(&digits[..width]);
    }
}

#[cfg(test)]
mod tests {
    use time::format_description::well_known::Rfc3339 as Parse;
    use time::macros::{datetime, format_description};

    use super::*;

    /// What `time`'s own formatter writes for the same instant.
    fn by_time(at: OffsetDateTime, millis: bool) -> String {
        let at = at.to_offset(UtcOffset::UTC);
        if millis {
            at.format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
        } else {
            at.format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
            ))
        }
        .unwrap()
    }

    #[test]
    fn writes_what_times_formatter_writes() {
        let mut at = datetime!(1969-12-31 23:59:59.999_999_999 UTC);
        // A prime step in nanoseconds: every field takes many values, the fraction all widths.
        let step = time::Duration::new(7_919_777, 123_456_789);
        for _ in 0..20_000 {
            assert_eq!(utc::<3>(at).as_str(), by_time(at, true));
            assert_eq!(utc::<6>(at).as_str(), by_time(at, false));
            at += step;
        }
    }

    #[test]
    fn converts_to_utc_and_truncates() {
        let at = datetime!(2026-11-27 19:04:05.1209 +01:00);
        assert_eq!(utc::<3>(at).as_str(), "2026-11-27T18:04:05.120Z");
        assert_eq!(utc::<6>(at).as_str(), "2026-11-27T18:04:05.120900Z");
        assert_eq!(utc::<9>(at).as_str(), "2026-11-27T18:04:05.120900000Z");
        let back = OffsetDateTime::parse(utc::<3>(at).as_str(), &Parse).unwrap();
        assert_eq!(back, datetime!(2026-11-27 18:04:05.120 UTC));
    }

    #[test]
    fn years_rfc_3339_cannot_write_keep_their_sign() {
        let at = datetime!(-0001-01-02 03:04:05.6 UTC);
        assert_eq!(utc::<3>(at).as_str(), "-0001-01-02T03:04:05.600Z");
    }
}
