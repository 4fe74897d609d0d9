//! Service GC safe points, with PD's semantics: a service may not go below the current
//! minimum (which includes `gc_worker`, holding the cluster GC safe point forever), a TTL of
//! zero or less removes the service, and every answer reports the minimum after the update.

use std::collections::BTreeMap;

use crate::types::Ts;

/// The service PD keeps for the cluster's own GC safe point.
pub const GC_WORKER: &str = "gc_worker";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MinSafePoint {
    pub service_id: String,
    /// Seconds left before it expires.
    pub ttl: i64,
    pub safe_point: Ts,
}

#[derive(Debug, Default)]
pub struct GcSafePoints {
    /// service id → (safe point, expiry in unix seconds).
    services: BTreeMap<String, (Ts, i64)>,
    gc_safe_point: Ts,
}

impl GcSafePoints {
    pub fn gc_safe_point(&self) -> Ts {
        self.gc_safe_point
    }

    /// Moves the cluster GC safe point, as TiDB's GC worker would.
    pub fn set_gc_safe_point(&mut self, ts: Ts) {
        self.gc_safe_point = ts;
    }

    /// PD's `UpdateServiceGCSafePoint` at unix time `now`.
    pub fn update(&mut self, service_id: &str, safe_point: Ts, ttl: i64, now: i64) -> MinSafePoint {
        self.services.retain(|_, (_, expires)| *expires > now);
        if ttl <= 0 {
            self.services.remove(service_id);
            return self.min(now);
        }
        if safe_point >= self.min(now).safe_point {
            self.services.insert(service_id.to_string(), (safe_point, now.saturating_add(ttl)));
        }
        self.min(now)
    }

    /// Live service safe points (without `gc_worker`), by service id.
    pub fn services(&self, now: i64) -> Vec<(String, Ts)> {
        self.services.iter().filter(|(_, (_, expires))| *expires > now).map(|(id, (ts, _))| (id.clone(), *ts)).collect()
    }

    fn min(&self, now: i64) -> MinSafePoint {
        let gc_worker =
            MinSafePoint { service_id: GC_WORKER.into(), ttl: i64::MAX - now, safe_point: self.gc_safe_point };
        self.services
            .iter()
            .filter(|(_, (_, expires))| *expires > now)
            .map(|(id, (ts, expires))| MinSafePoint { service_id: id.clone(), ttl: expires - now, safe_point: *ts })
            .fold(gc_worker, |min, candidate| if candidate.safe_point < min.safe_point { candidate } else { min })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_pd() {
        let mut gc = GcSafePoints::default();
        let min = gc.update("a", 100, 60, 1000);
        assert_eq!((min.service_id.as_str(), min.safe_point), (GC_WORKER, 0), "gc_worker at 0 is the minimum");
        gc.set_gc_safe_point(50);
        let min = gc.update("b", 40, 60, 1000);
        assert_eq!((min.service_id.as_str(), min.safe_point), (GC_WORKER, 50), "below the minimum: refused");
        assert_eq!(gc.services(1000), vec![("a".to_string(), 100)]);
        gc.set_gc_safe_point(0);
        let min = gc.update("b", 40, 10, 1000);
        assert_eq!(min, MinSafePoint { service_id: GC_WORKER.into(), ttl: i64::MAX - 1000, safe_point: 0 });
        assert_eq!(gc.services(1005).len(), 2);
        assert_eq!(gc.services(1010), vec![("a".to_string(), 100)], "b expired");
        gc.update("a", u64::MAX, 0, 1011);
        assert!(gc.services(1011).is_empty(), "TTL 0 removes");
    }
}
