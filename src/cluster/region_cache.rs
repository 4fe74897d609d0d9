//! The region cache: the regions earlier polls saw, so that a steady poll asks PD only about
//! what it does not hold (architecture.md "region cache").

use std::collections::{BTreeMap, HashMap, HashSet};

use log::info;

use super::collector::FailedRange;
use super::RegionWithLeader;
use crate::types::{KeyRange, StoreId};

/// The regions earlier polls saw, by start key, so that a steady tick asks PD nothing.
///
/// A stale entry cannot advance a range wrongly: every request carries the region's epoch
/// and TiKV fails a region that split or merged since (epoch not match, or not found), a
/// moved leader answers not-leader, a dead store fails its regions. A region that failed is
/// dropped, so the next poll scans its range afresh, except when its store only ran out of
/// time: a loaded store that misses one deadline still leads its regions, and re-scanning
/// them all made the next poll slower still. A store out of time
/// [`MISSES_BEFORE_RESCAN`] polls in a row has its regions dropped (a hung store's leaders
/// move away, and only PD knows where). Holds at most one entry per region of the ranges
/// polled.
#[derive(Debug, Default)]
pub struct RegionCache {
    by_start: BTreeMap<Vec<u8>, RegionWithLeader>,
    /// Polls in a row each store ran out of time in.
    misses: HashMap<StoreId, u32>,
}

/// How many polls in a row a store may run out of time in before its regions are looked up
/// again: two, so that a store that missed one deadline under load is asked again at once,
/// and the leaders of a hung store are found again after a hung poll and one more.
pub const MISSES_BEFORE_RESCAN: u32 = 2;

impl RegionCache {
    /// The cached regions overlapping `range`, in key order, and the parts of it no cached
    /// region covers.
    pub(crate) fn cover(&self, range: &KeyRange) -> (Vec<RegionWithLeader>, Vec<KeyRange>) {
        let (mut regions, mut gaps) = (Vec::new(), Vec::new());
        let mut cursor = range.start.clone();
        loop {
            let containing = self.by_start.range(..=cursor.clone()).next_back().map(|(_, r)| r);
            let end = match containing.filter(|r| r.range.end.is_empty() || r.range.end > cursor) {
                Some(region) => {
                    regions.push(region.clone());
                    region.range.end.clone()
                }
                None => {
                    let next = self.by_start.range(cursor.clone()..).next().map(|(start, _)| start.clone());
                    let end = match next {
                        Some(next) if range.end.is_empty() || next < range.end => next,
                        _ => range.end.clone(),
                    };
                    gaps.push(KeyRange { start: cursor, end: end.clone() });
                    end
                }
            };
            if end.is_empty() || (!range.end.is_empty() && end >= range.end) {
                return (regions, gaps);
            }
            cursor = end;
        }
    }

    /// The cached region holding `key`.
    pub fn region_at(&self, key: &[u8]) -> Option<&RegionWithLeader> {
        let (_, region) = self.by_start.range(..=key.to_vec()).next_back()?;
        region.range.contains(key).then_some(region)
    }

    /// Adds a fresh scan (regions in key order, tiling their span), replacing every entry
    /// that overlaps it: PD's answer is newer than anything cached.
    pub fn insert(&mut self, scanned: &[RegionWithLeader]) {
        let (Some(first), Some(last)) = (scanned.first(), scanned.last()) else { return };
        let span = KeyRange { start: first.range.start.clone(), end: last.range.end.clone() };
        if let Some((start, before)) = self.by_start.range(..span.start.clone()).next_back() {
            if before.range.end.is_empty() || before.range.end > span.start {
                let start = start.clone();
                self.by_start.remove(&start);
            }
        }
        let inside: Vec<Vec<u8>> = self
            .by_start
            .range(span.start.clone()..)
            .take_while(|(start, _)| span.end.is_empty() || **start < span.end)
            .map(|(start, _)| start.clone())
            .collect();
        for start in inside {
            self.by_start.remove(&start);
        }
        for region in scanned {
            self.by_start.insert(region.range.start.clone(), region.clone());
        }
    }

    /// Counts the polls in a row each store asked ran out of time in, and returns the
    /// stores whose regions stay cached although they failed. A store that reaches
    /// [`MISSES_BEFORE_RESCAN`] starts counting again after its regions are looked up.
    pub(crate) fn note_misses(&mut self, asked: &HashSet<StoreId>, out_of_time: &[StoreId]) -> HashSet<StoreId> {
        // Most stores out of time at once is a poll that outgrew its deadline (10^6 regions
        // in a 2 s tick, or a starved machine), not hung stores: looking all their regions
        // up again would only make the next poll slower (seen at 10^6 polling only).
        if out_of_time.len() * 2 > asked.len() {
            return out_of_time.iter().copied().collect();
        }
        self.misses.retain(|store, _| asked.contains(store) && out_of_time.contains(store));
        let mut kept = HashSet::new();
        for &store in out_of_time {
            let misses = self.misses.entry(store).or_default();
            *misses += 1;
            if *misses < MISSES_BEFORE_RESCAN {
                kept.insert(store);
            } else {
                info!("store {store} ran out of time {misses} polls in a row; looking up its regions again");
                self.misses.remove(&store);
            }
        }
        kept
    }

    /// Drops the failed region, so that its range is scanned again.
    pub(crate) fn forget(&mut self, failed: &FailedRange) {
        if self.by_start.get(&failed.range.start).is_some_and(|r| Some(r.id) == failed.region) {
            self.by_start.remove(&failed.range.start);
        }
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::FailReason;
    use crate::types::RegionId;

    fn region(id: RegionId, start: &str, end: &str, leader: Option<StoreId>) -> RegionWithLeader {
        RegionWithLeader {
            id,
            range: KeyRange::new(start, end),
            epoch_version: 5,
            conf_ver: 1,
            leader_store: leader,
            leader_peer_id: 0,
            peer_stores: vec![1, 2, 3],
        }
    }

    fn failed(region: &RegionWithLeader, store: Option<StoreId>, reason: FailReason) -> FailedRange {
        FailedRange { range: region.range.clone(), region: Some(region.id), store, reason }
    }

    #[test]
    fn the_cache_covers_what_it_holds_and_names_the_gaps() {
        let mut cache = RegionCache::default();
        cache.insert(&[region(1, "b", "d", Some(1)), region(2, "d", "f", Some(1))]);
        cache.insert(&[region(3, "h", "", Some(1))]);
        let ids = |regions: Vec<RegionWithLeader>| regions.iter().map(|r| r.id).collect::<Vec<_>>();

        let (regions, gaps) = cache.cover(&KeyRange::new("c", "e"));
        assert_eq!((ids(regions), gaps), (vec![1, 2], vec![]));
        let (regions, gaps) = cache.cover(&KeyRange::full());
        assert_eq!(
            (ids(regions), gaps),
            (vec![1, 2, 3], vec![KeyRange::new("", "b"), KeyRange::new("f", "h")]),
            "regions reaching +∞ end the cover"
        );
        let (regions, gaps) = cache.cover(&KeyRange::new("e", "g"));
        assert_eq!((ids(regions), gaps), (vec![2], vec![KeyRange::new("f", "g")]));

        // A fresh scan replaces every entry it overlaps; a failed region is forgotten.
        cache.insert(&[region(4, "c", "e", Some(2))]);
        let (regions, gaps) = cache.cover(&KeyRange::new("b", "f"));
        assert_eq!((ids(regions), gaps), (vec![4], vec![KeyRange::new("b", "c"), KeyRange::new("e", "f")]));
        cache.forget(&failed(&region(3, "h", "", Some(1)), Some(1), FailReason::EpochNotMatch));
        cache.forget(&failed(&region(9, "c", "e", Some(1)), Some(1), FailReason::NotLeader));
        assert_eq!(cache.len(), 1, "only region 3 went: region 9 is not what the cache holds at c");
    }

    #[test]
    fn a_poll_where_most_stores_run_out_of_time_keeps_every_region() {
        let mut cache = RegionCache::default();
        let asked: HashSet<StoreId> = [1, 2, 3].into();
        for _ in 0..3 {
            assert_eq!(cache.note_misses(&asked, &[1, 2, 3]), asked, "the poll outgrew its deadline");
            assert_eq!(cache.note_misses(&asked, &[1, 2]), [1, 2].into());
        }
        assert_eq!(cache.note_misses(&asked, &[3]), [3].into(), "one store late: it counts");
        assert_eq!(cache.note_misses(&asked, &[3]), HashSet::new(), "late twice in a row: looked up again");
    }
}
