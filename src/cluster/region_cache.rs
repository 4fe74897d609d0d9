//! The region cache: the regions earlier polls saw, so that a steady poll asks PD only about
//! what it does not hold (architecture.md "region cache").
//!
//! At 10^6 regions it is the advancer's largest structure, so it keeps each region in one
//! fixed-size entry (no peer list, no copy of its keys): the key space is cut at every cached
//! region's start, and a region's end is the next entry's start. Regions are handed out as
//! owned [`RegionWithLeader`] values built on demand.

use std::collections::{HashMap, HashSet};

use log::{debug, info};

use super::collector::FailedRange;
use super::RegionWithLeader;
use crate::types::{KeyRange, RegionId, StoreId};

/// The regions earlier polls saw, by start key, so that a steady tick asks PD nothing.
///
/// A stale entry cannot advance a range wrongly: every request carries the region's epoch
/// and TiKV fails a region that split or merged since (epoch not match, or not found), a
/// moved leader answers not-leader, a dead store fails its regions. A region that failed is
/// dropped, so the next poll scans its range afresh, except when its store only ran out of
/// time: a loaded store that misses one deadline still leads its regions, and re-scanning
/// them all made the next poll slower still. A store out of time
/// [`MISSES_BEFORE_RESCAN`] polls in a row has its regions dropped (a hung store's leaders
/// move away, and only PD knows where). A region PD had just placed whose leader answered
/// not-leader stays too, for a few polls (see [`RegionCache::await_flush`]). Holds at most
/// one entry per region of the ranges polled, and no peer lists: the regions it hands out
/// have empty `peer_stores`.
#[derive(Debug)]
pub struct RegionCache {
    /// The whole key space in key order, cut into stretches: entry i covers its start key up
    /// to entry i+1's (the last one up to +∞), and the first starts at the empty key. Kept in
    /// runs of at most [`RUN_LEN`] entries, so that an insert moves a few runs, never all.
    runs: Vec<Vec<Entry>>,
    /// How many entries hold a region.
    regions: usize,
    /// Polls in a row each store ran out of time in.
    misses: HashMap<StoreId, u32>,
    /// Regions PD had just placed whose leader answered not-leader, by the poll they did in
    /// (see [`RegionCache::await_flush`]).
    awaiting_flush: HashMap<RegionId, u64>,
    /// Polls begun with this cache.
    polls: u64,
}

/// How many polls a region awaiting its new leader's first flush is not looked up again for.
pub const AWAIT_FLUSH_POLLS: u64 = 3;

/// How many polls in a row a store may run out of time in before its regions are looked up
/// again: two, so that a store that missed one deadline under load is asked again at once,
/// and the leaders of a hung store are found again after a hung poll and one more.
pub const MISSES_BEFORE_RESCAN: u32 = 2;

/// Entries per run: an insert copies the runs it touches (32 KiB each), and a lookup
/// searches the runs' first keys, then one run. Tests cut runs short, so that even small
/// caches span several.
const RUN_LEN: usize = if cfg!(test) { 4 } else { 512 };

/// One stretch of the key space: a cached region, or a part no cached region covers.
#[derive(Debug)]
struct Entry {
    start: Box<[u8]>,
    kind: Kind,
    id: RegionId,
    epoch_version: u64,
    conf_ver: u64,
    leader_store: StoreId,
    leader_peer_id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// No region cached here.
    Gap,
    /// A region PD knew no leader of.
    Leaderless,
    /// A region led by `leader_store`.
    Led,
}

/// Where an entry is: (run, index in the run).
type Pos = (usize, usize);

/// What [`RegionCache::walk`] finds, in key order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Walked {
    Region(RegionWithLeader),
    /// A part of a range no cached region covers, and how many cache entries (regions, or
    /// uncached stretches outside the ranges) lie between the ranges walked since the last
    /// such part, counted up to the walk's limit at least, plus the regions walked and not
    /// handed out: none within one stretch.
    Gap {
        range: KeyRange,
        skipped: usize,
    },
}

impl Entry {
    fn gap(start: &[u8]) -> Entry {
        Entry {
            start: start.into(),
            kind: Kind::Gap,
            id: 0,
            epoch_version: 0,
            conf_ver: 0,
            leader_store: 0,
            leader_peer_id: 0,
        }
    }

    fn of(region: &RegionWithLeader) -> Entry {
        Entry {
            start: region.range.start.as_slice().into(),
            kind: if region.leader_store.is_some() { Kind::Led } else { Kind::Leaderless },
            id: region.id,
            epoch_version: region.epoch_version,
            conf_ver: region.conf_ver,
            leader_store: region.leader_store.unwrap_or_default(),
            leader_peer_id: region.leader_peer_id,
        }
    }

    fn is_gap(&self) -> bool {
        self.kind == Kind::Gap
    }
}

impl Default for RegionCache {
    fn default() -> Self {
        RegionCache {
            runs: vec![vec![Entry::gap(&[])]],
            regions: 0,
            misses: HashMap::new(),
            awaiting_flush: HashMap::new(),
            polls: 0,
        }
    }
}

impl RegionCache {
    /// The cached regions overlapping `range`, in key order, and the parts of it no cached
    /// region covers.
    pub fn cover(&self, range: &KeyRange) -> (Vec<RegionWithLeader>, Vec<KeyRange>) {
        let (mut regions, mut gaps) = (Vec::new(), Vec::<KeyRange>::new());
        for step in self.walk(std::slice::from_ref(range), 0, true) {
            match step {
                Walked::Region(region) => regions.push(region),
                Walked::Gap { range, .. } => gaps.push(range),
            }
        }
        (regions, gaps)
    }

    /// One ordered pass over `ranges` (in key order, apart, as `spans::collapse` leaves
    /// them): every cached region overlapping them, once (`with_regions`; else only
    /// counted, in the next part's `skipped`), and every part of them no cached region
    /// covers, in key order. Each range is found by a binary search and walked entry by
    /// entry; covering 87 082 fragmented ranges one `cover` each took 646 ms at 10^6 regions.
    pub(crate) fn walk(&self, ranges: &[KeyRange], count_up_to: usize, with_regions: bool) -> Vec<Walked> {
        let mut walked = Vec::new();
        let mut last: Option<Pos> = None;
        // Entries passed over between ranges since the last uncached part.
        let mut skipped = 0;
        for range in ranges {
            let mut at = Some(self.locate(&range.start));
            if let (Some(prev), Some(pos)) = (last, at) {
                if pos > prev {
                    skipped += self.entries_between(prev, pos, count_up_to);
                } else if !self.entry(pos).is_gap() {
                    // A region reaching into this range from the last one: already walked.
                    at = self.next(pos);
                }
            }
            while let Some(pos) = at {
                let entry = self.entry(pos);
                if !range.end.is_empty() && *entry.start >= *range.end {
                    break;
                }
                at = self.next(pos);
                last = Some(pos);
                if !entry.is_gap() {
                    if with_regions {
                        walked.extend(self.region(pos).map(Walked::Region));
                    } else {
                        skipped += 1;
                    }
                    continue;
                }
                let start = entry.start.as_ref().max(range.start.as_slice());
                let end = match at {
                    Some(next) if range.end.is_empty() || *self.entry(next).start < *range.end => {
                        &self.entry(next).start
                    }
                    _ => range.end.as_slice(),
                };
                match walked.last_mut() {
                    Some(Walked::Gap { range, .. }) if range.end == start => range.end = end.to_vec(),
                    _ => walked
                        .push(Walked::Gap { range: KeyRange::new(start, end), skipped: std::mem::take(&mut skipped) }),
                }
            }
        }
        walked
    }

    /// Whether some cached region overlaps `range` (gaps are never neighbours, so this looks
    /// at two entries at most).
    pub fn holds_region_in(&self, range: &KeyRange) -> bool {
        let mut at = Some(self.locate(&range.start));
        while let Some(pos) = at {
            let entry = self.entry(pos);
            if !range.end.is_empty() && *entry.start >= *range.end {
                return false;
            }
            if !entry.is_gap() {
                return true;
            }
            at = self.next(pos);
        }
        false
    }

    /// The cached region holding `key`.
    pub fn region_at(&self, key: &[u8]) -> Option<RegionWithLeader> {
        self.region(self.locate(key))
    }

    /// Adds a fresh scan (regions in key order, tiling their span but for PD's holes),
    /// replacing every entry that overlaps it: PD's answer is newer than anything cached. A
    /// scan out of order is not kept (it is asked about all the same, and looked up again).
    pub fn insert(&mut self, scanned: &[RegionWithLeader]) {
        let (Some(first), Some(last)) = (scanned.first(), scanned.last()) else { return };
        if !in_key_order(scanned) {
            debug!("not caching {} regions from {} that are out of key order or overlap", scanned.len(), first.range);
            return;
        }
        let from = self.locate(&first.range.start);
        let to = if last.range.end.is_empty() { self.last() } else { self.last_before(&last.range.end) };

        let mut replacement = Vec::with_capacity(scanned.len() + 2);
        let head = self.entry(from);
        if *head.start < *first.range.start {
            replacement.push(Entry::gap(&head.start));
        }
        let mut reached: &[u8] = &first.range.start;
        for region in scanned {
            if region.range.start.as_slice() > reached {
                replacement.push(Entry::gap(reached));
            }
            replacement.push(Entry::of(region));
            reached = &region.range.end;
        }
        let after = self.next(to).map(|next| &*self.entry(next).start);
        if !reached.is_empty() && after != Some(reached) {
            replacement.push(Entry::gap(reached));
        }
        self.regions += scanned.len();
        self.replace(from, to, replacement);
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

    /// Counts a poll begun; marks of [`RegionCache::await_flush`] older than
    /// [`AWAIT_FLUSH_POLLS`] polls lapse.
    pub(crate) fn begin_poll(&mut self) {
        self.polls += 1;
        let polls = self.polls;
        self.awaiting_flush.retain(|_, since| polls - *since <= AWAIT_FLUSH_POLLS);
    }

    /// The region PD just placed answered not-leader: a leader has nothing to report before
    /// its first flush (TiKV cannot tell that from not leading), so for the next few polls
    /// its not-leader answers are failures, not a reason to ask PD again (after a leader
    /// eviction at 10^5 regions, re-listing its 5 000 scattered regions at every poll until
    /// the new leaders flushed ran the polls out of time).
    pub(crate) fn await_flush(&mut self, id: RegionId) {
        self.awaiting_flush.insert(id, self.polls);
    }

    pub(crate) fn awaits_flush(&self, id: RegionId) -> bool {
        self.awaiting_flush.contains_key(&id)
    }

    /// Drops the failed region, so that its range is scanned again.
    pub(crate) fn forget(&mut self, failed: &FailedRange) {
        let pos = self.locate(&failed.range.start);
        let entry = self.entry(pos);
        if *entry.start != *failed.range.start || entry.is_gap() || Some(entry.id) != failed.region {
            return;
        }
        self.regions -= 1;
        let (run, i) = pos;
        self.runs[run][i] = Entry::gap(&failed.range.start);
        // Neighbouring gaps become one, so gaps never outnumber regions.
        if self.next(pos).is_some_and(|next| self.entry(next).is_gap()) {
            self.remove(self.next(pos).expect("just seen"));
        }
        if self.prev(pos).is_some_and(|prev| self.entry(prev).is_gap()) {
            self.remove(pos);
        }
    }

    pub fn len(&self) -> usize {
        self.regions
    }

    pub fn is_empty(&self) -> bool {
        self.regions == 0
    }

    /// The entry whose stretch holds `key`.
    fn locate(&self, key: &[u8]) -> Pos {
        // The first entry starts at the empty key, which every key is at or after.
        let run = self.runs.partition_point(|run| *run[0].start <= *key) - 1;
        (run, self.runs[run].partition_point(|e| *e.start <= *key) - 1)
    }

    /// The last entry starting before `key`, a non-empty key.
    fn last_before(&self, key: &[u8]) -> Pos {
        let run = self.runs.partition_point(|run| *run[0].start < *key) - 1;
        (run, self.runs[run].partition_point(|e| *e.start < *key) - 1)
    }

    fn last(&self) -> Pos {
        let run = self.runs.len() - 1;
        (run, self.runs[run].len() - 1)
    }

    fn entry(&self, (run, i): Pos) -> &Entry {
        &self.runs[run][i]
    }

    fn next(&self, (run, i): Pos) -> Option<Pos> {
        if i + 1 < self.runs[run].len() {
            Some((run, i + 1))
        } else {
            (run + 1 < self.runs.len()).then_some((run + 1, 0))
        }
    }

    fn prev(&self, (run, i): Pos) -> Option<Pos> {
        match (run, i) {
            (0, 0) => None,
            (run, 0) => Some((run - 1, self.runs[run - 1].len() - 1)),
            (run, i) => Some((run, i - 1)),
        }
    }

    /// How many entries lie strictly between `from` and `to` (`from` < `to`), counted up to
    /// `limit` at least (whole runs at a time).
    fn entries_between(&self, (from_run, from_i): Pos, (to_run, to_i): Pos, limit: usize) -> usize {
        if from_run == to_run {
            return to_i - from_i - 1;
        }
        let mut count = self.runs[from_run].len() - from_i - 1 + to_i;
        for run in &self.runs[from_run + 1..to_run] {
            if count >= limit {
                break;
            }
            count += run.len();
        }
        count
    }

    /// The region cached at `pos`, if any, with its end key from the next entry.
    fn region(&self, pos: Pos) -> Option<RegionWithLeader> {
        let entry = self.entry(pos);
        let leader_store = match entry.kind {
            Kind::Gap => return None,
            Kind::Leaderless => None,
            Kind::Led => Some(entry.leader_store),
        };
        let end = self.next(pos).map_or_else(Vec::new, |next| self.entry(next).start.to_vec());
        Some(RegionWithLeader {
            id: entry.id,
            range: KeyRange::new(entry.start.to_vec(), end),
            epoch_version: entry.epoch_version,
            conf_ver: entry.conf_ver,
            leader_store,
            leader_peer_id: entry.leader_peer_id,
            peer_stores: Vec::new(),
        })
    }

    /// Replaces the entries from `from` to `to` (both included) with `replacement`, whose
    /// regions are already counted, and re-cuts the runs they were in.
    fn replace(&mut self, from: Pos, to: Pos, replacement: Vec<Entry>) {
        let old: Vec<Vec<Entry>> = self.runs.drain(from.0..=to.0).collect();
        let last_run = old.len() - 1;
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for (k, run) in old.into_iter().enumerate() {
            for (i, entry) in run.into_iter().enumerate() {
                if k == 0 && i < from.1 {
                    before.push(entry);
                } else if k == last_run && i > to.1 {
                    after.push(entry);
                } else if !entry.is_gap() {
                    self.regions -= 1;
                }
            }
        }
        let mut entries = Vec::with_capacity(before.len() + replacement.len() + after.len());
        for entry in before.into_iter().chain(replacement).chain(after) {
            // Neighbouring gaps become one.
            if !(entry.is_gap() && entries.last().is_some_and(Entry::is_gap)) {
                entries.push(entry);
            }
        }
        let count = entries.len().div_ceil(RUN_LEN);
        let mut entries = entries.into_iter();
        let runs: Vec<Vec<Entry>> = (0..count)
            .map(|k| {
                let take = entries.len() / (count - k);
                entries.by_ref().take(take).collect()
            })
            .collect();
        self.runs.splice(from.0..from.0, runs);
    }

    /// Removes the entry at `pos` (not the first): the one before it now reaches further.
    fn remove(&mut self, (run, i): Pos) {
        self.runs[run].remove(i);
        if self.runs[run].is_empty() {
            self.runs.remove(run);
        }
    }
}

/// Whether `regions` follow each other in key order without overlapping (holes allowed).
fn in_key_order(regions: &[RegionWithLeader]) -> bool {
    regions.iter().all(|r| r.range.end.is_empty() || r.range.start < r.range.end)
        && regions.windows(2).all(|w| !w[0].range.end.is_empty() && w[0].range.end <= w[1].range.start)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::cluster::FailReason;

    /// A region at epoch 5 on stores 1-3 (shared with the collector's tests).
    pub(crate) fn region(id: RegionId, start: &str, end: &str, leader: Option<StoreId>) -> RegionWithLeader {
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

    pub(crate) fn failed(region: &RegionWithLeader, store: Option<StoreId>, reason: FailReason) -> FailedRange {
        FailedRange { range: region.range.clone(), region: Some(region.id), store, reason }
    }

    fn entries(cache: &RegionCache) -> usize {
        cache.runs.iter().map(Vec::len).sum()
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
    fn a_region_comes_out_as_it_went_in_without_its_peers() {
        let mut cache = RegionCache::default();
        let led = RegionWithLeader {
            id: 7,
            range: KeyRange::new("b", "d"),
            epoch_version: u64::MAX,
            conf_ver: 9,
            leader_store: Some(0),
            leader_peer_id: 1 << 40,
            peer_stores: vec![0, 4],
        };
        let leaderless = RegionWithLeader { id: 8, range: KeyRange::new("d", ""), leader_store: None, ..led.clone() };
        cache.insert(&[led.clone(), leaderless.clone()]);
        let without_peers = |r: &RegionWithLeader| RegionWithLeader { peer_stores: Vec::new(), ..r.clone() };
        assert_eq!(cache.region_at(b"c"), Some(without_peers(&led)), "store 0 is a store, not `no leader`");
        assert_eq!(cache.region_at(b"zzz"), Some(without_peers(&leaderless)));
        assert_eq!(cache.region_at(b"a"), None);
    }

    #[test]
    fn forgotten_regions_leave_one_gap_between_regions_not_one_each() {
        let mut cache = RegionCache::default();
        let keys: Vec<String> = (0..100).map(|i| format!("{i:03}")).collect();
        let regions: Vec<RegionWithLeader> =
            keys.windows(2).enumerate().map(|(i, w)| region(i as RegionId + 1, &w[0], &w[1], Some(1))).collect();
        cache.insert(&regions);
        assert_eq!((cache.len(), entries(&cache)), (99, 101), "a gap before and after");
        for region in &regions[10..20] {
            cache.forget(&failed(region, Some(1), FailReason::NotLeader));
        }
        assert_eq!((cache.len(), entries(&cache)), (89, 92));
        assert_eq!(cache.cover(&KeyRange::new("005", "025")).1, vec![KeyRange::new("010", "020")]);
        // A scan cut short keeps one gap after it too.
        cache.insert(&regions[12..14]);
        assert_eq!((cache.len(), entries(&cache)), (91, 95));
        assert_eq!(cache.cover(&KeyRange::full()).1.len(), 4);
    }

    #[test]
    fn a_scan_out_of_key_order_is_not_kept() {
        let mut cache = RegionCache::default();
        cache.insert(&[region(1, "c", "d", Some(1)), region(2, "b", "c", Some(1))]);
        cache.insert(&[region(1, "b", "", Some(1)), region(2, "c", "d", Some(1))]);
        cache.insert(&[region(3, "d", "b", Some(1))]);
        assert!(cache.is_empty());
        assert_eq!(entries(&cache), 1);
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

    /// The cache as it was before it was made compact, whole regions by start key: the
    /// compact one must answer exactly as it did (but for peer lists).
    #[derive(Default)]
    struct Reference {
        by_start: BTreeMap<Vec<u8>, RegionWithLeader>,
    }

    impl Reference {
        fn cover(&self, range: &KeyRange) -> (Vec<RegionWithLeader>, Vec<KeyRange>) {
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

        fn region_at(&self, key: &[u8]) -> Option<RegionWithLeader> {
            let (_, region) = self.by_start.range(..=key.to_vec()).next_back()?;
            region.range.contains(key).then(|| region.clone())
        }

        fn insert(&mut self, scanned: &[RegionWithLeader]) {
            let (Some(first), Some(last)) = (scanned.first(), scanned.last()) else { return };
            let span = KeyRange { start: first.range.start.clone(), end: last.range.end.clone() };
            if let Some((start, before)) = self.by_start.range(..span.start.clone()).next_back() {
                if before.range.end.is_empty() || before.range.end > span.start {
                    let start = start.clone();
                    self.by_start.remove(&start);
                }
            }
            self.by_start.retain(|start, _| *start < span.start || (!span.end.is_empty() && *start >= span.end));
            for region in scanned {
                self.by_start.insert(region.range.start.clone(), region.clone());
            }
        }

        fn forget(&mut self, failed: &FailedRange) {
            if self.by_start.get(&failed.range.start).is_some_and(|r| Some(r.id) == failed.region) {
                self.by_start.remove(&failed.range.start);
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A page of PD's answer: the regions between `bounds` (from -∞ and to +∞ when
        /// asked), less the holes, with leaders by `leaders`.
        Insert {
            bounds: BTreeSet<Vec<u8>>,
            from_start: bool,
            to_end: bool,
            holes: Vec<bool>,
            leaders: Vec<u8>,
        },
        /// The nth cached region failed (or, `wrong_id`, a region of another id at its start).
        Forget {
            nth: usize,
            wrong_id: bool,
        },
        Cover {
            start: Vec<u8>,
            end: Vec<u8>,
        },
        /// One walk over the ranges between every other pair of neighbouring `bounds`.
        Walk(BTreeSet<Vec<u8>>),
        At(Vec<u8>),
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(b'a'..b'f', 1..3)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (prop::collection::btree_set(key(), 1..8), any::<bool>(), any::<bool>(),
                  prop::collection::vec(prop::bool::weighted(0.2), 9), prop::collection::vec(0..4u8, 9))
                .prop_map(|(bounds, from_start, to_end, holes, leaders)| Op::Insert { bounds, from_start, to_end, holes, leaders }),
            1 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(nth, wrong_id)| Op::Forget { nth, wrong_id }),
            2 => (key(), prop_oneof![key(), Just(Vec::new())]).prop_map(|(start, end)| Op::Cover { start, end }),
            1 => key().prop_map(Op::At),
            1 => prop::collection::btree_set(key(), 2..9).prop_map(Op::Walk),
        ]
    }

    /// Regions as the cache hands them out: it keeps no peer lists.
    pub(crate) fn without_peers(regions: Vec<RegionWithLeader>) -> Vec<RegionWithLeader> {
        regions.into_iter().map(|r| RegionWithLeader { peer_stores: Vec::new(), ..r }).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        #[test]
        fn the_compact_cache_answers_as_whole_regions_by_start_key_did(ops in prop::collection::vec(op(), 1..40)) {
            let (mut cache, mut reference) = (RegionCache::default(), Reference::default());
            let mut next_id = 1;
            for op in ops {
                match op {
                    Op::Insert { bounds, from_start, to_end, holes, leaders } => {
                        let mut keys: Vec<Vec<u8>> = bounds.into_iter().collect();
                        if from_start {
                            keys.insert(0, Vec::new());
                        }
                        if to_end {
                            keys.push(Vec::new());
                        }
                        let page: Vec<RegionWithLeader> = keys
                            .windows(2)
                            .enumerate()
                            .filter(|(k, _)| !holes[*k])
                            .map(|(k, w)| {
                                next_id += 1;
                                RegionWithLeader {
                                    id: next_id,
                                    range: KeyRange::new(w[0].clone(), w[1].clone()),
                                    epoch_version: next_id * 3,
                                    conf_ver: k as u64,
                                    leader_store: (leaders[k] > 0).then_some(leaders[k] as StoreId),
                                    leader_peer_id: next_id * 7,
                                    peer_stores: vec![1, 2, 3],
                                }
                            })
                            .collect();
                        cache.insert(&page);
                        reference.insert(&page);
                    }
                    Op::Forget { nth, wrong_id } => {
                        let cached: Vec<&RegionWithLeader> = reference.by_start.values().collect();
                        if cached.is_empty() {
                            continue;
                        }
                        let region = cached[nth % cached.len()];
                        let id = if wrong_id { region.id + 1 } else { region.id };
                        let failed = FailedRange { region: Some(id), ..failed(region, None, FailReason::EpochNotMatch) };
                        cache.forget(&failed);
                        reference.forget(&failed);
                    }
                    Op::Cover { start, end } => {
                        if !end.is_empty() && end <= start {
                            continue;
                        }
                        let range = KeyRange::new(start, end);
                        let (regions, gaps) = reference.cover(&range);
                        prop_assert_eq!(cache.cover(&range), (without_peers(regions), gaps), "cover of {}", range);
                    }
                    Op::Walk(bounds) => {
                        let keys: Vec<Vec<u8>> = bounds.into_iter().collect();
                        let ranges: Vec<KeyRange> =
                            keys.windows(2).step_by(2).map(|w| KeyRange::new(w[0].clone(), w[1].clone())).collect();
                        let (mut regions, mut gaps) = (Vec::new(), Vec::new());
                        for range in &ranges {
                            let (covered, uncovered) = reference.cover(range);
                            regions.extend(covered);
                            gaps.extend(uncovered);
                        }
                        // A region reaching over two ranges is walked once.
                        regions.dedup();
                        let walked = cache.walk(&ranges, 4, true);
                        let walked_regions: Vec<RegionWithLeader> = walked.iter().filter_map(|w| match w {
                            Walked::Region(r) => Some(r.clone()),
                            Walked::Gap { .. } => None,
                        }).collect();
                        let walked_gaps: Vec<KeyRange> = walked.into_iter().filter_map(|w| match w {
                            Walked::Gap { range, .. } => Some(range),
                            Walked::Region(_) => None,
                        }).collect();
                        prop_assert_eq!(walked_regions, without_peers(regions));
                        prop_assert_eq!(walked_gaps, gaps);
                    }
                    Op::At(key) => {
                        prop_assert_eq!(cache.region_at(&key), reference.region_at(&key).map(|r| without_peers(vec![r]).remove(0)));
                    }
                }
                prop_assert_eq!(cache.len(), reference.by_start.len());
                let (regions, gaps) = reference.cover(&KeyRange::full());
                prop_assert_eq!(cache.cover(&KeyRange::full()), (without_peers(regions), gaps));
                prop_assert!(entries(&cache) <= 2 * cache.len() + 1 + cache.runs.len(), "gaps do not pile up");
            }
        }
    }
}
