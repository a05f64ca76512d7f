//! Wall-clock time as stored in every table: integer epoch milliseconds, the one time
//! type that SQLite and PostgreSQL share through sqlx's `Any` driver.

use std::time::{SystemTime, UNIX_EPOCH};

/// Returns the current time in epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Formats epoch milliseconds as UTC RFC 3339, e.g. `2026-11-25T11:12:06.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

const DAY_MS: i64 = 86_400_000;

/// The start of the UTC day that holds `ms` (epoch milliseconds).
pub fn utc_day_start(ms: i64) -> i64 {
    ms - ms.rem_euclid(DAY_MS)
}

/// The start of the UTC day after the one that holds `ms`.
pub fn next_utc_day_start(ms: i64) -> i64 {
    utc_day_start(ms) + DAY_MS
}

/// The start of the UTC month that holds `ms`.
pub fn utc_month_start(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    days_from_civil(y, m, 1) * DAY_MS
}

/// The start of the UTC month after the one that holds `ms`.
pub fn next_utc_month_start(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * DAY_MS
}

/// The day count since 1970-01-01 of a proleptic Gregorian date (the inverse of
/// [`civil_from_days`], Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_605_126_123), "2026-11-25T11:12:06.123Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn utc_days_and_months_start_at_midnight() {
        // (a time, its day's start, the next day's, its month's start, the next month's)
        for (t, day, next_day, month, next_month) in [
            (
                1_795_605_126_123, // 2026-11-25T11:12:06.123Z
                "2026-11-25T00:00:00.000Z",
                "2026-11-26T00:00:00.000Z",
                "2026-11-01T00:00:00.000Z",
                "2026-12-01T00:00:00.000Z",
            ),
            (
                951_782_400_000, // 2000-02-29T00:00:00.000Z: a leap day, on the dot
                "2000-02-29T00:00:00.000Z",
                "2000-03-01T00:00:00.000Z",
                "2000-02-01T00:00:00.000Z",
                "2000-03-01T00:00:00.000Z",
            ),
            (
                1_798_761_599_999, // 2026-12-31T23:59:59.999Z: the year rolls over
                "2026-12-31T00:00:00.000Z",
                "2027-01-01T00:00:00.000Z",
                "2026-12-01T00:00:00.000Z",
                "2027-01-01T00:00:00.000Z",
            ),
            (
                -1,
                "1969-12-31T00:00:00.000Z",
                "1970-01-01T00:00:00.000Z",
                "1969-12-01T00:00:00.000Z",
                "1970-01-01T00:00:00.000Z",
            ),
        ] {
            assert_eq!(rfc3339(utc_day_start(t)), day, "{t}");
            assert_eq!(rfc3339(next_utc_day_start(t)), next_day, "{t}");
            assert_eq!(rfc3339(utc_month_start(t)), month, "{t}");
            assert_eq!(rfc3339(next_utc_month_start(t)), next_month, "{t}");
        }
        for days in [-800_000, -1, 0, 59, 11_016, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
