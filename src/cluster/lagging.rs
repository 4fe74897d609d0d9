//! Choosing what to ask the stores about when not all of it fits: the most lagging spans
//! first, counted in the regions the region cache knows to hold them. A tick's poll and a
//! lock-resolution round both pick their work this way, so that a cluster whose ranges all
//! lag (10^6 regions polled in a 2 s tick) still moves its checkpoint every time.

use super::{RegionCache, RegionWithLeader};
use crate::types::{KeyRange, Ts};

/// The cached regions from the start of `range` on, in key order, up to the first part not
/// cached or `limit` regions.
pub fn leading_regions(cache: &RegionCache, range: &KeyRange, limit: usize) -> Vec<RegionWithLeader> {
    let mut regions = Vec::new();
    let mut key = range.start.clone();
    while regions.len() < limit {
        let Some(region) = cache.region_at(&key) else { break };
        let last = region.range.end.is_empty() || (!range.end.is_empty() && region.range.end >= range.end);
        key = region.range.end.clone();
        regions.push(region);
        if last {
            break;
        }
    }
    regions
}

/// The most lagging of `spans` (by value, oldest first) while the regions known to hold
/// them fit in `budget`; a span with none known counts as one region. A span holding more
/// regions than are left is cut after them, so the oldest span is always (partly) taken.
/// Returns the spans taken, in key order, and their known regions, in key order.
pub fn most_lagging_within(
    cache: &RegionCache,
    mut spans: Vec<(KeyRange, Ts)>,
    budget: usize,
) -> (Vec<(KeyRange, Ts)>, Vec<RegionWithLeader>) {
    spans.sort_by(|(a, a_ts), (b, b_ts)| a_ts.cmp(b_ts).then_with(|| a.cmp(b)));
    let (mut taken, mut known) = (Vec::new(), Vec::<RegionWithLeader>::new());
    let mut left = budget.max(1);
    for (mut span, ts) in spans {
        let regions = leading_regions(cache, &span, left.saturating_add(1));
        if regions.len() > left {
            span.end = regions[left - 1].range.end.clone();
            known.extend(regions.into_iter().take(left));
            taken.push((span, ts));
            break;
        }
        left -= regions.len().max(1);
        known.extend(regions);
        taken.push((span, ts));
        if left == 0 {
            break;
        }
    }
    known.sort_by(|a, b| a.range.start.cmp(&b.range.start));
    known.dedup_by_key(|r| r.id);
    taken.sort();
    (taken, known)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::region_cache::tests::without_peers;
    use crate::cluster::testing::regions_from_boundaries;

    #[test]
    fn the_oldest_spans_are_taken_while_their_known_regions_fit_and_the_last_is_cut() {
        // Two cached regions in [a, c), one in [e, f), nothing cached in [x, y).
        let all = regions_from_boundaries(&[b"a", b"b", b"c", b"e", b"f"], &[1]);
        let known = without_peers(vec![all[1].clone(), all[2].clone(), all[4].clone()]);
        let mut cache = RegionCache::default();
        cache.insert(&known[..2]);
        cache.insert(&known[2..]);
        let spans = vec![(KeyRange::new("a", "c"), 5), (KeyRange::new("e", "f"), 1), (KeyRange::new("x", "y"), 2)];
        let (taken, regions) = most_lagging_within(&cache, spans.clone(), 2);
        assert_eq!(taken, vec![spans[1].clone(), spans[2].clone()], "the two oldest, one region each");
        assert_eq!(regions, vec![known[2].clone()], "nothing is known of [x, y)");
        let (taken, regions) = most_lagging_within(&cache, spans.clone(), 4);
        assert_eq!(taken.len(), 3);
        assert_eq!(regions, known);
        let (taken, regions) = most_lagging_within(&cache, spans[..1].to_vec(), 1);
        assert_eq!(taken, vec![(KeyRange::new("a", "b"), 5)], "cut after the regions that fit");
        assert_eq!(regions, vec![known[0].clone()]);
    }
}
