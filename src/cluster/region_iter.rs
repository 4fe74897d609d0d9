//! Paging through the regions of a key range (upstream's `RegionIter`, tidb
//! `br/pkg/streamhelper/regioniter.go`), with every
//! page checked to tile its part of the range before it is used.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use log::debug;

use super::{deadline, ClusterMeta, RegionWithLeader};
use crate::error::{Error, Result};
use crate::types::{DisplayKey, KeyRange};

/// Regions per ScanRegions call.
pub const DEFAULT_PAGE_SIZE: usize = 2048;

/// How often, and how far apart, a page that fails or does not tile is asked for again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanRetry {
    pub attempts: usize,
    pub backoff: Duration,
}

impl Default for ScanRetry {
    fn default() -> Self {
        ScanRetry { attempts: 8, backoff: Duration::from_millis(500) }
    }
}

/// Iterates the regions overlapping a range, a page at a time. Regions come back whole, so
/// the first and last may reach beyond the range.
pub struct RegionIter<'a> {
    meta: &'a dyn ClusterMeta,
    range: KeyRange,
    /// Where the next page starts: the end of the last region returned.
    next_start: Vec<u8>,
    /// The last region returned reaches +∞.
    reached_key_space_end: bool,
    /// May be changed between pages.
    pub page_size: usize,
    pub retry: ScanRetry,
}

impl<'a> RegionIter<'a> {
    /// Upstream's `IterateRegion`.
    pub fn new(meta: &'a dyn ClusterMeta, range: &KeyRange) -> Self {
        RegionIter {
            meta,
            range: range.clone(),
            next_start: range.start.clone(),
            reached_key_space_end: false,
            page_size: DEFAULT_PAGE_SIZE,
            retry: ScanRetry::default(),
        }
    }

    pub fn done(&self) -> bool {
        self.reached_key_space_end || (!self.range.end.is_empty() && self.next_start >= self.range.end)
    }

    /// The next page of regions, retried while PD fails or answers a page that does not
    /// tile; the error after the last attempt wraps the last failure.
    pub fn next_page(&mut self) -> Result<Vec<RegionWithLeader>> {
        if self.done() {
            return Ok(Vec::new());
        }
        let attempts = self.retry.attempts.max(1);
        let mut attempt = 1;
        let last_error = loop {
            match self.scan_page() {
                Ok(regions) => {
                    let last_end = &regions.last().expect("a consistent page is not empty").range.end;
                    self.reached_key_space_end = last_end.is_empty();
                    self.next_start = last_end.clone();
                    return Ok(regions);
                }
                // Closed, or out of the tick's time: no retry can help.
                Err(e) if matches!(e.root(), Error::Stopped(_)) || deadline::passed() => break e,
                Err(e) if attempt < attempts => {
                    // The backoff, unless the tick's deadline comes first.
                    let Ok(backoff) = deadline::bounded(self.retry.backoff, "scanning regions") else { break e };
                    // The final failure is reported with the count; each retry only at debug.
                    debug!("{self}: scanning regions failed (attempt {attempt} of {attempts}), retrying: {e}");
                    if let Err(stopped) = deadline::sleep(backoff, "scanning regions") {
                        break stopped;
                    }
                    if deadline::passed() {
                        break e;
                    }
                    attempt += 1;
                }
                Err(e) => break e,
            }
        };
        Err(last_error.context(format!("{self}: scanning regions failed {attempts} times")))
    }

    /// Every remaining region.
    pub fn collect_all(mut self) -> Result<Vec<RegionWithLeader>> {
        let mut regions = Vec::new();
        while !self.done() {
            regions.extend(self.next_page()?);
        }
        Ok(regions)
    }

    fn scan_page(&self) -> Result<Vec<RegionWithLeader>> {
        let regions = self.meta.region_scan(&self.next_start, &self.range.end, self.page_size)?;
        // Only the part up to the page's last region has to be covered: the next page
        // continues from there.
        let page_end = regions.last().map_or(self.range.end.as_slice(), |r| r.range.end.as_slice());
        check_region_consistency(&self.next_start, page_end, &regions)?;
        Ok(regions)
    }
}

impl fmt::Display for RegionIter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region iterator over {} at {}", self.range, DisplayKey(&self.next_start))
    }
}

/// Upstream's `CheckRegionConsistency`: `regions` must tile `[start, end)` (raw keys, empty
/// `end` = +∞) in order, with no hole and no overlap, the first containing `start`. Beyond
/// upstream, every region must be non-empty and named once: an inverted region can hide an
/// overlap from the pairwise check (and so advance a range past its truth).
pub fn check_region_consistency(start: &[u8], end: &[u8], regions: &[RegionWithLeader]) -> Result<()> {
    let fail = |reason: String| Err(Error::RegionScan { range: KeyRange::new(start, end), reason });
    let (Some(first), Some(last)) = (regions.first(), regions.last()) else {
        return fail("PD returned no region".into());
    };
    let mut ids = HashSet::with_capacity(regions.len());
    for region in regions {
        if !region.range.end.is_empty() && region.range.end <= region.range.start {
            return fail(format!(
                "region {} is empty or inverted: it starts at {} and ends at {}",
                region.id,
                DisplayKey(&region.range.start),
                DisplayKey(&region.range.end)
            ));
        }
        if !ids.insert(region.id) {
            return fail(format!("region {} appears twice in one page", region.id));
        }
    }
    if first.range.start.as_slice() > start {
        return fail(format!(
            "hole at the start: the first region {} starts at {}",
            first.id,
            DisplayKey(&first.range.start)
        ));
    }
    if !first.range.end.is_empty() && first.range.end.as_slice() <= start {
        return fail(format!(
            "the first region {} ends at {}, before the scan starts",
            first.id,
            DisplayKey(&first.range.end)
        ));
    }
    if !last.range.end.is_empty() && (end.is_empty() || last.range.end.as_slice() < end) {
        return fail(format!("hole at the end: the last region {} ends at {}", last.id, DisplayKey(&last.range.end)));
    }
    for pair in regions.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        if prev.range.end != next.range.start {
            // An empty end is +∞, so a region after it always overlaps.
            let kind = if !prev.range.end.is_empty() && prev.range.end < next.range.start { "hole" } else { "overlap" };
            return fail(format!(
                "{kind} between region {} ending at {} and region {} starting at {}",
                prev.id,
                DisplayKey(&prev.range.end),
                next.id,
                DisplayKey(&next.range.start)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testing::{regions_from_boundaries, MemMeta};

    fn region(id: u64, start: &str, end: &str) -> RegionWithLeader {
        RegionWithLeader {
            id,
            range: KeyRange::new(start, end),
            epoch_version: 1,
            conf_ver: 1,
            leader_store: Some(1),
            leader_peer_id: 0,
            peer_stores: vec![1],
        }
    }

    fn ranges(regions: &[RegionWithLeader]) -> Vec<KeyRange> {
        regions.iter().map(|r| r.range.clone()).collect()
    }

    fn no_wait() -> ScanRetry {
        ScanRetry { attempts: 3, backoff: Duration::ZERO }
    }

    #[test]
    fn consistency_accepts_a_tiling_and_names_each_defect() {
        let tiling = [region(1, "", "b"), region(2, "b", "d"), region(3, "d", "")];
        check_region_consistency(b"", b"", &tiling).unwrap();
        check_region_consistency(b"a", b"c", &tiling[..2]).unwrap();

        // (scan start, scan end, page, what the error must say)
        type Case = (&'static [u8], &'static [u8], Vec<RegionWithLeader>, &'static str);
        let cases: Vec<Case> = vec![
            (b"a", b"c", vec![], "no region"),
            (b"a", b"c", vec![region(2, "b", "d")], "hole at the start: the first region 2"),
            (b"e", b"", vec![region(1, "a", "c")], "region 1 ends at c, before the scan"),
            (b"a", b"e", vec![region(1, "a", "c")], "hole at the end: the last region 1 ends at c"),
            (b"a", b"", vec![region(1, "a", "c")], "hole at the end"),
            (b"a", b"z", vec![region(1, "a", "c"), region(2, "d", "z")], "hole between region 1"),
            (b"a", b"z", vec![region(1, "a", "d"), region(2, "c", "z")], "overlap between region 1"),
            (b"a", b"", vec![region(1, "a", ""), region(2, "c", "")], "overlap between region 1"),
            // [b, c) twice, hidden from the pairwise check by an inverted region.
            (
                b"a",
                b"z",
                vec![region(1, "a", "c"), region(2, "c", "b"), region(3, "b", "z")],
                "region 2 is empty or inverted",
            ),
            (
                b"a",
                b"z",
                vec![region(1, "a", "c"), region(2, "c", "c"), region(3, "c", "z")],
                "region 2 is empty or inverted",
            ),
            (b"a", b"z", vec![region(1, "a", "c"), region(1, "c", "z")], "region 1 appears twice"),
        ];
        for (start, end, regions, expected) in cases {
            let err = check_region_consistency(start, end, &regions).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should say {expected}");
        }
    }

    // Upstream's cases, tidb `br/pkg/streamhelper/regioniter_test.go`.
    #[test]
    fn iterates_the_regions_overlapping_a_range() {
        let meta = MemMeta::new(regions_from_boundaries(&[b"0001", b"0003", b"0008", b"0078"], &[1]));
        let got = RegionIter::new(&meta, &KeyRange::new("0077", "0079")).collect_all().unwrap();
        assert_eq!(ranges(&got), vec![KeyRange::new("0008", "0078"), KeyRange::new("0078", "")]);

        let meta = MemMeta::new(regions_from_boundaries(&[b"0001", b"0005", b"0008", b"0097"], &[1]));
        let got = RegionIter::new(&meta, &KeyRange::new("0000", "0008")).collect_all().unwrap();
        let expected = [KeyRange::new("", "0001"), KeyRange::new("0001", "0005"), KeyRange::new("0005", "0008")];
        assert_eq!(ranges(&got), expected);
    }

    #[test]
    fn pages_cross_many_regions_without_gaps() {
        let keys: Vec<Vec<u8>> = (0..10_000).map(|i| format!("{i:06}").into_bytes()).collect();
        let boundaries: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let meta = MemMeta::new(regions_from_boundaries(&boundaries, &[1, 2, 3]));

        let got = RegionIter::new(&meta, &KeyRange::new("000001", "005000")).collect_all().unwrap();
        assert_eq!(got.len(), 4999);
        assert_eq!(got[0].range, KeyRange::new("000001", "000002"));
        assert_eq!(got[4998].range, KeyRange::new("004999", "005000"));
        assert_eq!(meta.scans.lock().len(), 3, "4999 regions take three pages of 2048");

        let got = RegionIter::new(&meta, &KeyRange::new("000100", "")).collect_all().unwrap();
        assert_eq!(got.len(), 9900);
        assert_eq!(got[0].range, KeyRange::new("000100", "000101"));
        assert_eq!(got.last().unwrap().range, KeyRange::new("009999", ""));

        let got = RegionIter::new(&meta, &KeyRange::new("", "003000")).collect_all().unwrap();
        assert_eq!(got.len(), 3001);
        assert_eq!(got[0].range, KeyRange::new("", "000000"));
        assert_eq!(got[3000].range, KeyRange::new("002999", "003000"));
    }

    #[test]
    fn page_size_may_change_between_pages() {
        let meta = MemMeta::new(regions_from_boundaries(&[b"b", b"c", b"d", b"e"], &[1]));
        let mut iter = RegionIter::new(&meta, &KeyRange::full());
        iter.page_size = 2;
        assert_eq!(ranges(&iter.next_page().unwrap()), [KeyRange::new("", "b"), KeyRange::new("b", "c")]);
        iter.page_size = 10;
        assert_eq!(iter.next_page().unwrap().len(), 3);
        assert!(iter.done());
        assert!(iter.next_page().unwrap().is_empty());
        let scans = meta.scans.lock();
        assert_eq!(*scans, vec![(b"".to_vec(), b"".to_vec(), 2), (b"c".to_vec(), b"".to_vec(), 10)]);
    }

    #[test]
    fn an_inconsistent_page_is_asked_for_again() {
        let meta = MemMeta::new(regions_from_boundaries(&[b"b", b"c"], &[1]));
        meta.script(Ok(vec![region(1, "", "b"), region(9, "bb", "")]));
        meta.script(Err(Error::Timeout("ScanRegions".into())));
        let mut iter = RegionIter::new(&meta, &KeyRange::full());
        iter.retry = no_wait();
        assert_eq!(iter.next_page().unwrap().len(), 3, "the third attempt answers the true page");
        assert_eq!(meta.scans.lock().len(), 3);
    }

    #[test]
    fn gives_up_after_the_configured_attempts_with_the_last_failure() {
        let meta = MemMeta::new(Vec::new());
        for _ in 0..3 {
            meta.script(Ok(vec![region(2, "b", "")]));
        }
        let mut iter = RegionIter::new(&meta, &KeyRange::new("a", ""));
        iter.retry = no_wait();
        let err = iter.next_page().unwrap_err().to_string();
        assert!(err.contains("failed 3 times") && err.contains("hole at the start"), "{err}");
        assert_eq!(meta.scans.lock().len(), 3);
        assert!(!iter.done(), "a failed page does not move the iterator");
    }
}
