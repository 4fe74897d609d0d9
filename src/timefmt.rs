//! Text forms of times and durations: RFC 3339 (what TiDB writes in pause values and what
//! users type for task start times) and Go-style durations (`12s`, `4m`, `1h30m`, `48h`).

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

/// Parses RFC 3339 with `Z` or a `±HH:MM` offset and optional fractional seconds.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    let bad = |why: &str| format!("{text:?} is not an RFC 3339 time ({why}); example: 2024-05-01T12:00:00+08:00");
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad("expected YYYY-MM-DDTHH:MM:SS"));
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
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) && rest.get(3..4) == Some(":") => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let digits = |range: std::ops::Range<usize>| -> Result<i64, String> {
                rest.get(range)
                    .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse().ok())
                    .ok_or_else(|| bad("bad offset"))
            };
            sign * (digits(1..3)? * 3600 + digits(4..6)? * 60)
        }
        _ => return Err(bad("expected Z or ±HH:MM at the end")),
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    if secs < 0 {
        return Err(bad("before 1970"));
    }
    Ok(UNIX_EPOCH + Duration::new(secs as u64, nanos))
}

/// The longest duration any option takes: far beyond every sensible setting, and far enough
/// from the limits of `Instant` and `SystemTime` arithmetic that adding it never panics.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Parses `1h30m`, `12s`, `500ms`, `2d`, or a bare number of seconds, up to [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration; examples: 12s, 500ms, 4m, 1h30m, 48h, 2d");
    let too_long = || format!("{text:?} is longer than the maximum of 365d");
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs)).filter(|d| *d <= MAX_DURATION).ok_or_else(too_long);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let (number, tail) =
            rest.split_at(rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len()));
        let value: f64 = number.parse().map_err(|_| bad())?;
        let (unit, tail) = tail.split_at(tail.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(tail.len()));
        let unit = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            _ => return Err(bad()),
        };
        rest = tail;
        let secs = value * unit;
        // Checked before converting: `Duration::from_secs_f64` panics on what does not fit.
        if secs > MAX_DURATION.as_secs_f64() {
            return Err(too_long());
        }
        total += Duration::from_secs_f64(secs);
        if total > MAX_DURATION {
            return Err(too_long());
        }
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
        for bad in ["2024-05-01", "2024-13-01T00:00:00Z", "2024-05-01T12:00:00", "2024-05-01T12:00:00+0800"] {
            assert!(parse_rfc3339(bad).unwrap_err().contains(bad));
        }
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("12s").unwrap(), Duration::from_secs(12));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("48h").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("12 parsecs").is_err() && parse_duration("").is_err());
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
