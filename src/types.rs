//! Small vocabulary shared by every module: timestamps and raw key ranges.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A TSO timestamp: `physical_ms << 18 | logical`.
pub type Ts = u64;
pub type StoreId = u64;
pub type RegionId = u64;

const LOGICAL_BITS: u32 = 18;

/// Builds a TSO from unix milliseconds and a logical counter.
pub fn compose_ts(physical_ms: u64, logical: u64) -> Ts {
    (physical_ms << LOGICAL_BITS) | (logical & ((1 << LOGICAL_BITS) - 1))
}

/// The unix-millisecond part of a TSO.
pub fn physical_ms(ts: Ts) -> u64 {
    ts >> LOGICAL_BITS
}

/// The TSO for a wall-clock instant (logical 0).
pub fn ts_from_system_time(t: SystemTime) -> Ts {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    compose_ts(ms, 0)
}

/// The wall-clock instant of a TSO (logical part dropped).
pub fn system_time_of(ts: Ts) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(physical_ms(ts))
}

/// The TSO `d` before `ts`, saturating at zero.
pub fn ts_sub(ts: Ts, d: Duration) -> Ts {
    compose_ts(physical_ms(ts).saturating_sub(d.as_millis() as u64), 0)
}

/// The TSO `d` after `ts`, saturating at the largest physical time.
pub fn ts_add(ts: Ts, d: Duration) -> Ts {
    let ms = physical_ms(ts).saturating_add(d.as_millis().try_into().unwrap_or(u64::MAX));
    compose_ts(ms.min(physical_ms(Ts::MAX)), 0)
}

/// The physical distance from `earlier` to `later`, zero if `later` is not after it.
pub fn ts_distance(later: Ts, earlier: Ts) -> Duration {
    Duration::from_millis(physical_ms(later).saturating_sub(physical_ms(earlier)))
}

/// The local clock as a TSO: the fallback when PD's TSO cannot be reached.
pub fn local_now_ts() -> Ts {
    ts_from_system_time(SystemTime::now())
}

/// A half-open range of raw keys `[start, end)`. An empty `end` means +∞ and an empty
/// `start` −∞.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

impl KeyRange {
    pub fn new(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        KeyRange { start: start.into(), end: end.into() }
    }

    /// The whole key space.
    pub fn full() -> Self {
        KeyRange::default()
    }

    /// True when `key` lies inside the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }

    /// True when the two ranges share at least one key (touching ranges do not).
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        let self_before_other_end = other.end.is_empty() || self.start < other.end;
        let other_before_self_end = self.end.is_empty() || other.start < self.end;
        self_before_other_end && other_before_self_end
    }

    /// The common part of two ranges, if any.
    pub fn intersect(&self, other: &KeyRange) -> Option<KeyRange> {
        if !self.overlaps(other) {
            return None;
        }
        let start = self.start.clone().max(other.start.clone());
        let end = match (self.end.is_empty(), other.end.is_empty()) {
            (true, _) => other.end.clone(),
            (_, true) => self.end.clone(),
            _ => self.end.clone().min(other.end.clone()),
        };
        Some(KeyRange { start, end })
    }
}

/// Keys print as escaped text so that logs and errors name them readably.
pub struct DisplayKey<'a>(pub &'a [u8]);

impl fmt::Display for DisplayKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if b.is_ascii_graphic() && b != b'\\' {
                write!(f, "{}", b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = if self.end.is_empty() { "+inf".to_string() } else { DisplayKey(&self.end).to_string() };
        write!(f, "[{}, {})", DisplayKey(&self.start), end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ts_round_trip() {
        let ts = compose_ts(1_700_000_000_000, 42);
        assert_eq!(physical_ms(ts), 1_700_000_000_000);
        assert_eq!(ts & 0x3FFFF, 42);
        assert_eq!(ts_distance(ts, ts_sub(ts, Duration::from_secs(60))), Duration::from_secs(60));
        assert_eq!(ts_sub(5, Duration::from_secs(1)), 0);
    }

    #[test]
    fn ranges_overlap_and_intersect() {
        let a = KeyRange::new("a", "c");
        let b = KeyRange::new("b", "");
        let c = KeyRange::new("c", "d");
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c), "touching ranges do not overlap");
        assert_eq!(a.intersect(&b), Some(KeyRange::new("b", "c")));
        assert_eq!(KeyRange::full().intersect(&c), Some(c.clone()));
        assert!(a.contains(b"a") && !a.contains(b"c") && b.contains(b"zzz"));
        assert_eq!(KeyRange::new("a\x01", "").to_string(), "[a\\x01, +inf)");
    }
}
