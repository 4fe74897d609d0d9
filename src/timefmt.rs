//! Text forms of times and durations: RFC 3339 (what TiDB writes in pause values), the dates
//! BR prints and accepts (`2026-05-11 01:42:23.5 +0800`) and Go-style durations (`12s`,
//! `1.5h`, `1h30m`, `300us`): the one parser every command and the config file use.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's
/// civil-from-days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2024-05-01T12:00:00Z`, second precision, UTC.
pub fn format_rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Parses a date-time with a mandatory zone: RFC 3339 (`2024-05-01T12:00:00Z`,
/// `+08:00`) and the forms BR prints and accepts (`2024-05-01 12:00:00.5+0800`, a space or
/// `T` between date and time, a space before the zone, `±HHMM` or `±HH:MM`).
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    let bad = |why: &str| {
        format!(
            "{text:?} is not a date-time with a zone ({why}); examples: 2024-05-01T12:00:00Z, 2024-05-01 20:00:00+0800"
        )
    };
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad("expected YYYY-MM-DD HH:MM:SS and a zone"));
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        text.get(range).and_then(|s| s.parse::<i64>().ok()).ok_or_else(|| bad("bad number"))
    };
    let (year, month, day) = (num(0..4)?, num(5..7)? as u32, num(8..10)? as u32);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return Err(bad("field out of range"));
    }
    // Byte offsets below are only taken through `get`: text comes from etcd and users, and a
    // multi-byte character must be an error, not a panic.
    let mut rest = text.get(19..).ok_or_else(|| bad("expected YYYY-MM-DDTHH:MM:SS"))?;
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("empty fraction"));
        }
        let scaled = format!("{:0<9}", &frac[..digits.min(9)]);
        nanos = scaled.parse().map_err(|_| bad("bad fraction"))?;
        rest = &frac[digits..];
    }
    let offset_secs = parse_zone(rest.trim_start()).ok_or_else(|| bad("expected Z, ±HH:MM or ±HHMM at the end"))?;
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    if secs < 0 {
        return Err(bad("before 1970"));
    }
    Ok(UNIX_EPOCH + Duration::new(secs as u64, nanos))
}

/// `Z`, `±HH:MM` or `±HHMM` → seconds east of UTC (byte offsets through `get` only).
fn parse_zone(zone: &str) -> Option<i64> {
    if zone.eq_ignore_ascii_case("z") {
        return Some(0);
    }
    let sign = match zone.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (hours, minutes) = match zone.len() {
        6 if zone.get(3..4) == Some(":") => (zone.get(1..3)?, zone.get(4..6)?),
        5 => (zone.get(1..3)?, zone.get(3..5)?),
        _ => return None,
    };
    let number = |digits: &str| digits.bytes().all(|b| b.is_ascii_digit()).then(|| digits.parse::<i64>().ok())?;
    let (hours, minutes) = (number(hours)?, number(minutes)?);
    (hours <= 23 && minutes <= 59).then_some(sign * (hours * 3600 + minutes * 60))
}

/// The local zone's offset east of UTC at `t`, in seconds (what `TZ` or /etc/localtime says).
pub fn local_offset_secs(t: SystemTime) -> i64 {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as libc::time_t).unwrap_or(0);
    // SAFETY: localtime_r only reads `secs` and writes the `tm` we own.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&secs, &mut tm).is_null() {
            return 0;
        }
        tm
    };
    #[allow(clippy::useless_conversion)] // c_long is i64 on 64-bit targets only
    i64::from(tm.tm_gmtoff)
}

/// A time the way BR prints dates (Go layout `2006-01-02 15:04:05.999999999 -0700`) in the
/// zone `offset_secs` east of UTC: trailing zeros of the fraction dropped.
pub fn format_br_date(t: SystemTime, offset_secs: i64) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64 + offset_secs;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    let fraction = format!("{:09}", since.subsec_nanos());
    let fraction = fraction.trim_end_matches('0');
    let dot = if fraction.is_empty() { "" } else { "." };
    let (sign, abs) = if offset_secs < 0 { ('-', -offset_secs) } else { ('+', offset_secs) };
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}{dot}{fraction} {sign}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        abs / 3600,
        abs % 3600 / 60
    )
}

/// Parses a duration the way Go's `time.ParseDuration` does (what BR's flags take): a
/// sequence of numbers with units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h` and fractions, as in
/// `1h30m`, `1.5h`, `500ms`, `300us`. Extensions: `d` for days and a bare number of seconds.
/// Every duration of every command and of the config file goes through here.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("{text:?} is not a duration ({why}); examples: 12s, 500ms, 1.5h, 1h30m, 300us");
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    if text.is_empty() {
        return Err(bad("empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(|c| c.is_ascii_digit() || *c == b'.').count();
        let value: f64 = rest[..digits].parse().map_err(|_| bad("expected a number"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let nanos_per_unit: f64 = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "d" => 86_400e9,
            "" => return Err(bad("a unit is missing")),
            _ => return Err(bad("unknown unit")),
        };
        rest = &rest[unit_len..];
        let nanos = value * nanos_per_unit;
        if !nanos.is_finite() || nanos > u64::MAX as f64 {
            return Err(bad("too long"));
        }
        total = total.checked_add(Duration::from_nanos(nanos.round() as u64)).ok_or_else(|| bad("too long"))?;
    }
    Ok(total)
}

/// `1h2m3s`-style text, the way Go prints durations (used in pause messages).
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{}s", s),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_honours_offsets() {
        let t = UNIX_EPOCH + Duration::from_secs(1_714_564_800);
        assert_eq!(format_rfc3339(t), "2024-05-01T12:00:00Z");
        assert_eq!(parse_rfc3339("2024-05-01T12:00:00Z").unwrap(), t);
        assert_eq!(parse_rfc3339("2024-05-01T20:00:00+08:00").unwrap(), t);
        assert_eq!(parse_rfc3339("2024-05-01T12:00:00.5Z").unwrap(), t + Duration::from_millis(500));
        assert_eq!(format_rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
        for bad in ["2024-05-01", "2024-13-01T00:00:00Z", "2024-05-01T12:00:00", "2024-05-01T12:00:00+08"] {
            assert!(parse_rfc3339(bad).unwrap_err().contains(bad));
        }
    }

    #[test]
    fn br_date_forms_parse_and_print() {
        let t = UNIX_EPOCH + Duration::from_secs(1_778_435_000) + Duration::from_millis(500);
        for text in [
            "2026-05-11 01:43:20.5+0800",
            "2026-05-11 01:43:20.5 +0800",
            "2026-05-11T01:43:20.5+08:00",
            "2026-05-10 17:43:20.5Z",
        ] {
            assert_eq!(parse_rfc3339(text).unwrap(), t, "{text}");
        }
        assert_eq!(format_br_date(t, 8 * 3600), "2026-05-11 01:43:20.5 +0800");
        assert_eq!(format_br_date(t - Duration::from_millis(500), -5 * 3600 - 1800), "2026-05-10 12:13:20 -0530");
        assert_eq!(local_offset_secs(t).abs() % 60, 0);
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("12s").unwrap(), Duration::from_secs(12));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("48h").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2h45m30.5s").unwrap(), Duration::from_millis(9_930_500));
        assert_eq!(parse_duration("300us").unwrap(), Duration::from_micros(300));
        assert_eq!(parse_duration("300\u{b5}s").unwrap(), Duration::from_micros(300));
        assert_eq!(parse_duration("42ns").unwrap(), Duration::from_nanos(42));
        assert_eq!(parse_duration("1m0.001s").unwrap(), Duration::from_millis(60_001));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        for bad in ["12 parsecs", "", "1h30", "h", "1.2.3s", "-5s", "1y"] {
            assert!(parse_duration(bad).unwrap_err().contains(&format!("{bad:?}")), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
