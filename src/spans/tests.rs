use super::mem::grow_push;
use super::*;
use crate::rng::Rng;

fn kr(start: &str, end: &str) -> KeyRange {
    KeyRange::new(start, end)
}

fn v(start: &str, end: &str, ts: Ts) -> Valued {
    Valued::new(start, end, ts)
}

fn full_with(merges: &[(&str, &str, Ts)]) -> SpanFrontier {
    tracked_with(&[kr("", "")], merges)
}

fn tracked_with(ranges: &[KeyRange], merges: &[(&str, &str, Ts)]) -> SpanFrontier {
    let mut spans = SpanFrontier::new(ranges, 0);
    for &(start, end, ts) in merges {
        spans.merge(&kr(start, end), ts);
        spans.check();
    }
    spans
}

fn below(spans: &SpanFrontier, threshold: Ts) -> Vec<Valued> {
    spans.below(threshold).map(|span| span.to_valued()).collect()
}

const SEQ_55: &[(&str, &str, Ts)] = &[("0001", "0002", 1), ("0002", "0003", 2)];
const SEQ_56: &[(&str, &str, Ts)] = &[("0001", "0002", 1), ("0002", "0003", 2), ("0001", "0003", 4)];
const SEQ_57: &[(&str, &str, Ts)] = &[("0001", "0004", 3), ("0004", "0008", 5), ("0001", "0007", 4), ("", "0002", 2)];

// Upstream test vectors 55-67 (spans' value-sorted set and `ValuedSetEquals`).

/// 55.
#[test]
fn merge_adjacent_updates() {
    let spans = full_with(SEQ_55);
    assert_eq!(spans.snapshot(), [v("", "0001", 0), v("0001", "0002", 1), v("0002", "0003", 2), v("0003", "", 0)]);
}

/// 56.
#[test]
fn merge_covering_update_coalesces() {
    let spans = full_with(SEQ_56);
    assert_eq!(spans.snapshot(), [v("", "0001", 0), v("0001", "0003", 4), v("0003", "", 0)]);
}

/// 57.
#[test]
fn merge_never_lowers() {
    let spans = full_with(SEQ_57);
    assert_eq!(spans.snapshot(), [v("", "0001", 2), v("0001", "0004", 4), v("0004", "0008", 5), v("0008", "", 0)]);
}

/// 58.
#[test]
fn merge_splits_around_higher_piece() {
    let spans = full_with(&[("0001", "0004", 3), ("0004", "0008", 5), ("0001", "0009", 4)]);
    assert_eq!(
        spans.snapshot(),
        [v("", "0001", 0), v("0001", "0004", 4), v("0004", "0008", 5), v("0008", "0009", 4), v("0009", "", 0)]
    );
}

/// 59, 60.
#[test]
fn merge_clips_to_tracked_ranges() {
    let tracked = [kr("0001", "0004"), kr("0008", "")];
    let spans = tracked_with(&tracked, &[("0001", "0007", 42), ("0000", "0009", 41), ("0002", "0005", 43)]);
    assert_eq!(
        spans.snapshot(),
        [v("0001", "0002", 42), v("0002", "0004", 43), v("0008", "0009", 41), v("0009", "", 0)]
    );

    let spans = tracked_with(&tracked, &[("", "", 42)]);
    assert_eq!(spans.snapshot(), [v("0001", "0004", 42), v("0008", "", 42)]);
}

/// 61, 62.
#[test]
fn merge_keeps_gaps_apart() {
    let tracked = [kr("0001", "0004"), kr("0005", "0008")];
    let spans = tracked_with(
        &tracked,
        &[("0001", "0002", 42), ("0002", "0008", 43), ("0004", "0007", 45), ("0000", "00015", 48)],
    );
    assert_eq!(
        spans.snapshot(),
        [
            v("0001", "00015", 48),
            v("00015", "0002", 42),
            v("0002", "0004", 43),
            v("0005", "0007", 45),
            v("0007", "0008", 43)
        ]
    );

    let spans = tracked_with(
        &tracked,
        &[("0004", "0008", 32), ("00041", "0007", 33), ("0004", "00041", 99999), ("0005", "0006", 34)],
    );
    assert_eq!(
        spans.snapshot(),
        [v("0001", "0004", 0), v("0005", "0006", 34), v("0006", "0007", 33), v("0007", "0008", 32)]
    );
}

/// 63-66.
#[test]
fn below_lists_lagging_pieces_by_value() {
    let spans = full_with(SEQ_55);
    assert_eq!(below(&spans, 10), [v("", "0001", 0), v("0003", "", 0), v("0001", "0002", 1), v("0002", "0003", 2)]);

    let spans = full_with(SEQ_56);
    assert_eq!(below(&spans, 1), [v("", "0001", 0), v("0003", "", 0)]);

    let mut spans = full_with(SEQ_57);
    assert_eq!(below(&spans, 5), [v("0008", "", 0), v("", "0001", 2), v("0001", "0004", 4)]);

    spans.merge_all([v("0001", "0004", 5), v("0008", "", 10), v("", "0001", 20)]);
    assert_eq!(below(&spans, 11), [v("0001", "0008", 5), v("0008", "", 10)]);
    assert_eq!(spans.below(11).take(1).count(), 1, "the walk stops early");
}

/// 67.
#[test]
fn valued_sets_compare_as_functions() {
    let split = [v("b", "c", 1), v("a", "b", 1), v("c", "", 2)];
    assert!(valued_set_equals(&split, &[v("a", "c", 1), v("c", "", 2)]), "adjacent equal pieces join");
    assert!(valued_set_equals(&split, &[v("c", "", 2), v("a", "c", 1)]), "order does not matter");
    assert!(!valued_set_equals(&split, &[v("a", "c", 1), v("c", "", 3)]), "values matter");
    assert!(!valued_set_equals(&[v("a", "b", 1), v("c", "d", 1)], &[v("a", "d", 1)]), "gaps matter");
    assert!(!valued_set_equals(&[v("a", "", 1)], &[v("a", "b", 1)]), "an empty end is +inf");
    assert!(valued_set_equals(&[v("a", "a", 7), v("a", "b", 1)], &[v("a", "b", 1)]), "empty pieces are nothing");
}

#[test]
fn collapse_joins_overlapping_and_touching() {
    let ranges = [
        kr("c", "d"),
        kr("a", "b"),
        kr("b", "c"),
        kr("e", "f"),
        kr("x", "x"),
        kr("ee", "g"),
        kr("h", ""),
        kr("i", "j"),
    ];
    assert_eq!(collapse(&ranges), [kr("a", "d"), kr("e", "g"), kr("h", "")]);
    assert_eq!(collapse(&[kr("a", "b"), kr("", "")]), [kr("", "")]);
    assert_eq!(collapse(&[]), []);
}

#[test]
fn same_boundary_update_coalesces_both_sides() {
    let mut spans = full_with(&[("a", "b", 3), ("b", "c", 2), ("c", "d", 3)]);
    assert_eq!(spans.len(), 5);
    spans.merge(&kr("b", "c"), 1);
    assert_eq!(spans.len(), 5, "an older report changes nothing");
    spans.merge(&kr("b", "c"), 3);
    spans.check();
    assert_eq!(spans.snapshot(), [v("", "a", 0), v("a", "d", 3), v("d", "", 0)]);
}

#[test]
fn min_prefers_smallest_start_among_ties() {
    let mut spans = full_with(&[("a", "b", 1), ("c", "d", 1)]);
    assert_eq!(spans.min().map(|s| s.to_valued()), Some(v("", "a", 0)));
    spans.merge(&kr("", "a"), 1);
    spans.merge(&kr("b", "c"), 2);
    spans.merge(&kr("d", ""), 2);
    assert_eq!(spans.min().map(|s| s.to_valued()), Some(v("", "b", 1)));
    assert_eq!(spans.min_ts(), Some(1));
    spans.merge(&kr("", ""), 9);
    assert_eq!(spans.snapshot(), [v("", "", 9)]);
    assert_eq!(spans.len(), 1);
}

#[test]
fn nothing_tracked() {
    let mut spans = SpanFrontier::new(&[kr("b", "b")], 5);
    spans.merge(&kr("", ""), 7);
    spans.check();
    assert!(spans.is_empty() && spans.min().is_none() && spans.min_ts().is_none());
    assert_eq!(spans.below(Ts::MAX).count(), 0);
    assert_eq!(spans.below_unordered(Ts::MAX).count(), 0);
    assert!(spans.tracked_ranges().is_empty());
}

#[test]
fn empty_and_inverted_updates_are_ignored() {
    let mut spans = full_with(&[("b", "b", 5), ("c", "a", 5), ("c", "c", 5)]);
    spans.merge(&kr("d", "d"), 6);
    assert_eq!(spans.snapshot(), [v("", "", 0)]);
}

#[test]
fn long_keys_are_stored_out_of_line() {
    let long = "k".repeat(40);
    let longer = format!("{long}x");
    let mut spans = SpanFrontier::new(&[KeyRange::new(long.clone(), "")], 1);
    spans.merge(&KeyRange::new(longer.clone(), ""), 2);
    spans.check();
    assert_eq!(spans.snapshot(), [Valued::new(long.clone(), longer.clone(), 1), Valued::new(longer, "", 2)]);
}

#[test]
fn display_spans() {
    let spans = full_with(&[("a\x01", "b", 3)]);
    assert_eq!(format!("{:?}", spans), "[[, a\\x01)@0, [a\\x01, b)@3, [b, +inf)@0]");
}

#[test]
fn growth_moves_items_into_huge_page_blocks() {
    // Past 2 MiB, growing copies into a fresh block advised for huge pages.
    let mut v: Vec<u64> = Vec::new();
    for i in 0..1_000_000 {
        grow_push(&mut v, i);
        assert!(v.capacity() <= v.len() + v.len() / 8 + 4, "at most 1/9 slack");
    }
    assert!(v.iter().copied().eq(0..1_000_000), "growth keeps the items in order");
}

// ---- Property tests against a naive model ----

/// Every key's value is the max of the merges covering it. Keys are grouped into the
/// elementary intervals between consecutive boundaries of a fixed key pool; all tracked and
/// merged ranges use pool keys, so each interval is wholly in or out of every range.
struct Model {
    intervals: Vec<KeyRange>,
    values: Vec<Option<Ts>>,
}

impl Model {
    fn new(pool: &[Vec<u8>], tracked: &[KeyRange], init: Ts) -> Self {
        let mut bounds: Vec<Vec<u8>> = pool.iter().cloned().chain([Vec::new()]).collect();
        bounds.sort();
        bounds.dedup();
        let intervals: Vec<KeyRange> = (0..bounds.len())
            .map(|i| KeyRange::new(bounds[i].clone(), bounds.get(i + 1).cloned().unwrap_or_default()))
            .collect();
        let values = intervals.iter().map(|iv| tracked.iter().any(|r| covers(r, iv)).then_some(init)).collect();
        Model { intervals, values }
    }

    fn merge(&mut self, range: &KeyRange, ts: Ts) {
        for (iv, value) in self.intervals.iter().zip(&mut self.values) {
            if let Some(value) = value.as_mut().filter(|_| covers(range, iv)) {
                *value = (*value).max(ts);
            }
        }
    }

    /// The canonical pieces: maximal runs of tracked intervals with equal values.
    fn pieces(&self) -> Vec<Valued> {
        let mut out: Vec<Valued> = Vec::new();
        let mut contiguous = false;
        for (iv, value) in self.intervals.iter().zip(&self.values) {
            match (*value, out.last_mut()) {
                (Some(ts), Some(last)) if contiguous && last.ts == ts => last.range.end = iv.end.clone(),
                (Some(ts), _) => out.push(Valued { range: iv.clone(), ts }),
                (None, _) => {}
            }
            contiguous = value.is_some();
        }
        out
    }
}

fn covers(range: &KeyRange, interval: &KeyRange) -> bool {
    range.start <= interval.start
        && cmp_end(&interval.end, &range.end) != Ordering::Greater
        && !is_empty_range(&range.start, &range.end)
}

/// The value of each of the model's intervals according to `spans` (`None`: untracked).
fn values_at(spans: &SpanFrontier, model: &Model) -> Vec<Option<Ts>> {
    let pieces = spans.snapshot();
    model.intervals.iter().map(|iv| pieces.iter().find(|p| p.range.contains(&iv.start)).map(|p| p.ts)).collect()
}

/// Keys chosen so that boundaries collide: the empty key, "\0" (the key right after it),
/// prefixes of each other, and keys too long to be stored inline.
fn key_pool() -> Vec<Vec<u8>> {
    let long = |tail: &[u8]| [b"a".repeat(24).as_slice(), tail].concat();
    vec![
        b"".to_vec(),
        b"\0".to_vec(),
        b"a".to_vec(),
        b"a\0".to_vec(),
        b"aa".to_vec(),
        b"ab".to_vec(),
        b"b".to_vec(),
        b"ba".to_vec(),
        b"c".to_vec(),
        b"\xff".to_vec(),
        long(b""),
        long(b"\0"),
        long(b"b"),
    ]
}

/// A few neighbouring intervals of the sorted `keys`, or one time in `wide` any two keys
/// (possibly inverted); running past the last key gives +inf.
fn random_range(rng: &mut Rng, keys: &[Vec<u8>], wide: u64) -> KeyRange {
    let n = keys.len() as u64;
    let i = rng.below(n);
    let j = if rng.below(wide) == 0 { rng.below(n) } else { i + 1 + rng.below(3) };
    KeyRange::new(keys[i as usize].clone(), keys.get(j as usize).cloned().unwrap_or_default())
}

/// Checks `spans` against `model` and its own invariants; returns its values per interval.
fn check_against(spans: &SpanFrontier, model: &Model, rng: &mut Rng, max_ts: Ts) -> Vec<Option<Ts>> {
    spans.check();
    let expected = model.pieces();
    assert_eq!(spans.snapshot(), expected);
    assert!(valued_set_equals(&spans.snapshot(), &expected));
    assert_eq!(spans.len(), expected.len());
    let min = expected.iter().min_by(|a, b| (a.ts, &a.range.start).cmp(&(b.ts, &b.range.start)));
    assert_eq!(spans.min().map(|span| span.to_valued()).as_ref(), min);
    assert_eq!(spans.min_ts(), min.map(|m| m.ts));
    let threshold = rng.below(max_ts + 2);
    let mut lagging: Vec<Valued> = expected.into_iter().filter(|p| p.ts < threshold).collect();
    lagging.sort_by(|a, b| (a.ts, &a.range.start).cmp(&(b.ts, &b.range.start)));
    assert_eq!(below(spans, threshold), lagging, "below {threshold}");
    let mut unordered: Vec<Valued> = spans.below_unordered(threshold).map(|span| span.to_valued()).collect();
    unordered.sort_by(|a, b| (a.ts, &a.range.start).cmp(&(b.ts, &b.range.start)));
    assert_eq!(unordered, lagging, "below_unordered {threshold}");
    values_at(spans, model)
}

/// One random case: tracked ranges and merges drawn from the sorted `keys`, checked after
/// every merge; the merged ts drift up to `max_ts` like checkpoints, with late (lower)
/// reports mixed in. Returns the largest number of pieces seen.
fn run_case(seed: u64, keys: &[Vec<u8>], ops: usize, max_ts: Ts, wide: u64) -> usize {
    let mut rng = Rng::new(seed);
    let tracked: Vec<KeyRange> =
        (0..rng.below(4)).map(|_| KeyRange::new(rng.pick(keys).clone(), rng.pick(keys).clone())).collect();
    let init = rng.below(3);
    let mut spans = SpanFrontier::new(&tracked, init);
    let mut model = Model::new(keys, &tracked, init);
    assert_eq!(spans.tracked_ranges(), collapse(&tracked).as_slice());
    let mut before = check_against(&spans, &model, &mut rng, max_ts);
    let mut most = spans.len();
    for step in 0..ops as u64 {
        // Half of the merges reuse an existing piece's exact bounds, the allocation-free path.
        let range = match spans.snapshot() {
            pieces if !pieces.is_empty() && rng.below(2) == 0 => rng.pick(&pieces).range.clone(),
            _ => random_range(&mut rng, keys, wide),
        };
        let ts = (step * max_ts / ops as u64).saturating_sub(rng.below(max_ts / 4 + 2));
        spans.merge(&range, ts);
        model.merge(&range, ts);
        let after = check_against(&spans, &model, &mut rng, max_ts);
        for (old, new) in before.iter().zip(&after) {
            assert_eq!(old.is_some(), new.is_some(), "seed {seed}: tracked keys never change");
            assert!(old <= new, "seed {seed}: values never decrease");
        }
        before = after;
        most = most.max(spans.len());
    }
    most
}

#[test]
fn random_merges_match_model() {
    for (seed, keys) in small_key_sets(3000, 0xA5A5) {
        run_case(seed, &keys, 40, 6, 3);
    }
}

/// `count` small sorted sets of colliding keys from [`key_pool`], each with its seed.
fn small_key_sets(count: u64, salt: u64) -> impl Iterator<Item = (u64, Vec<Vec<u8>>)> {
    let pool = key_pool();
    (0..count).map(move |seed| {
        let mut rng = Rng::new(seed ^ salt);
        let mut keys: Vec<Vec<u8>> = (0..3 + rng.below(6)).map(|_| rng.pick(&pool).clone()).collect();
        keys.sort();
        (seed, keys)
    })
}

/// `n` region-like keys, `per_table` to a table, in order.
fn region_keys(n: u64, per_table: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| [b"t".as_slice(), &(i / per_table).to_be_bytes(), b"_r", &(i % per_table).to_be_bytes()].concat())
        .collect()
}

#[test]
fn random_merges_match_model_at_scale() {
    // Region-like keys, many pieces: exercises chunk splits and merges, table growth and
    // backward-shift deletion, and deep heaps.
    let keys = region_keys(400, 50);
    let most = (0..6).map(|seed| run_case(seed, &keys, 1500, 1000, 100)).max();
    assert!(most > Some(200), "the cases reach many pieces: {most:?}");
}

/// Random batches through `merge_batch` must leave exactly what the same merges one by one
/// through `merge_keys` leave: exact pieces (some repeated within the batch, at the same or
/// another ts), splits, coalesces, ranges over untracked gaps, empty and inverted ranges,
/// and batches shorter and longer than the look-ahead window. With `rebuild`, every other
/// batch is merged by rebuilding the frontier instead.
fn run_batch_case(seed: u64, keys: &[Vec<u8>], batches: usize, most: u64, max_ts: Ts, wide: u64, rebuild: bool) {
    let mut rng = Rng::new(seed);
    let tracked: Vec<KeyRange> =
        (0..rng.below(4)).map(|_| KeyRange::new(rng.pick(keys).clone(), rng.pick(keys).clone())).collect();
    let init = rng.below(3);
    let (mut batched, mut one_by_one) = (SpanFrontier::new(&tracked, init), SpanFrontier::new(&tracked, init));
    let mut model = Model::new(keys, &tracked, init);
    for step in 0..batches as u64 {
        let pieces = batched.snapshot();
        let mut batch: Vec<(KeyRange, Ts)> = Vec::new();
        for _ in 0..rng.below(most + 1) {
            let ts = (step * max_ts / batches as u64).saturating_sub(rng.below(max_ts / 4 + 2));
            let range = match rng.below(4) {
                0 | 1 if !pieces.is_empty() => rng.pick(&pieces).range.clone(),
                2 if !batch.is_empty() => rng.pick(&batch).0.clone(),
                _ => random_range(&mut rng, keys, wide),
            };
            batch.push((range, ts));
        }
        let items = batch.iter().map(|(r, ts)| (r.start.as_slice(), r.end.as_slice(), *ts));
        if rebuild && step % 2 == 0 {
            batched.merge_rebuilding(items.collect());
        } else {
            batched.merge_batch(items);
        }
        for (range, ts) in &batch {
            one_by_one.merge_keys(&range.start, &range.end, *ts);
            model.merge(range, *ts);
        }
        one_by_one.check();
        check_against(&batched, &model, &mut rng, max_ts);
        assert_eq!(batched.snapshot(), one_by_one.snapshot(), "seed {seed} step {step}");
        assert_eq!(batched.min(), one_by_one.min(), "seed {seed} step {step}");
    }
}

/// [`run_batch_case`] over small colliding key sets and over region-like keys.
fn batches_match_one_by_one(salt: u64, rebuild: bool) {
    for (seed, keys) in small_key_sets(1000, salt) {
        run_batch_case(seed, &keys, 8, 40, 6, 3, rebuild);
    }
    let keys = region_keys(400, 50);
    for seed in 0..4 {
        run_batch_case(seed, &keys, 40, 300, 1000, 100, rebuild);
    }
}

#[test]
fn merge_batch_matches_one_by_one() {
    batches_match_one_by_one(0x5A5A, false);
}

/// Merging by rebuilding leaves exactly what merging one by one leaves, on the same random
/// batches as above (overlapping items, ranges over gaps, late reports, empty and inverted
/// ranges), and the rebuilt frontier takes item-by-item merges after it.
#[test]
fn merge_rebuilding_matches_one_by_one() {
    batches_match_one_by_one(0x3C3C, true);
}

/// A new owner's snapshots: every region of 20 stores, each store's regions in key order,
/// the stores' messages interleaved, into a frontier of one span. Through `merge_batch` (which
/// rebuilds), the result is that of the same merges one by one, and later steady flushes
/// (exact pieces) still match.
#[test]
fn snapshot_sized_batch_matches_one_by_one() {
    let keys = region_keys(20_000, 64);
    let regions: Vec<KeyRange> = keys.windows(2).map(|pair| KeyRange::new(pair[0].clone(), pair[1].clone())).collect();
    let mut rng = Rng::new(20);
    let stores: Vec<u64> = regions.iter().map(|_| rng.below(20)).collect();
    let mut snapshot: Vec<(&[u8], &[u8], Ts)> = Vec::new();
    for message in regions.chunks(256) {
        for store in 0..20 {
            let ts = 1000 + store;
            let of_store = message.iter().zip(&stores).filter(|&(_, &s)| s == store);
            snapshot.extend(of_store.map(|(r, _)| (r.start.as_slice(), r.end.as_slice(), ts)));
        }
    }
    let tracked = [kr("", "")];
    let (mut batched, mut one_by_one) = (SpanFrontier::new(&tracked, 0), SpanFrontier::new(&tracked, 0));
    batched.merge_batch(snapshot.iter().copied());
    for &(start, end, ts) in &snapshot {
        one_by_one.merge_keys(start, end, ts);
    }
    batched.check();
    assert_eq!(batched.snapshot(), one_by_one.snapshot());
    assert_eq!(batched.min(), one_by_one.min());
    let steady: Vec<(&[u8], &[u8], Ts)> =
        regions.iter().map(|r| (r.start.as_slice(), r.end.as_slice(), 2000 + rng.below(50))).collect();
    batched.merge_batch(steady.iter().copied());
    for &(start, end, ts) in &steady {
        one_by_one.merge_keys(start, end, ts);
    }
    batched.check();
    assert_eq!(batched.snapshot(), one_by_one.snapshot());
}

/// A batch rebuilds only when what is left of it would split much of the frontier: not
/// when it is small against the frontier, nor when it splits little, nor when little is left.
#[test]
fn rebuilding_pays_only_for_large_splitting_batches() {
    let keys = region_keys(40_000, 64);
    let mut spans = SpanFrontier::new(&[kr("", "")], 0);
    assert!(spans.rebuilding_pays(100_000, bulk::WINDOW), "a snapshot into a new frontier");
    assert!(!spans.rebuilding_pays(1000, bulk::WINDOW), "too few left");
    spans.merge_batch(keys.windows(2).zip(1..).map(|(pair, ts)| (pair[0].as_slice(), pair[1].as_slice(), ts)));
    assert_eq!(spans.len(), keys.len() + 1, "a piece per region and one on each side");
    assert!(!spans.rebuilding_pays(5000, bulk::WINDOW), "small against the frontier");
    assert!(spans.rebuilding_pays(40_000, bulk::WINDOW), "as large as the frontier");
    assert!(!spans.rebuilding_pays(40_000, bulk::WINDOW / 10), "splitting little");
    assert!(!spans.rebuilding_pays(40_000, 0), "exact pieces");
}

impl SpanFrontier {
    /// Asserts every internal invariant.
    fn check(&self) {
        let mut live = Vec::new();
        let mut id = self.first;
        while id != NIL {
            live.push(id);
            id = self.recs[id as usize].next;
        }
        assert_eq!(live.len(), self.live, "live record count");
        let free = self.recs.iter().filter(|rec| rec.next == FREE).count();
        assert_eq!(live.len() + free, self.recs.len(), "every record is live or free");
        assert!(self.live * 100 <= self.index.capacity() * MAX_LOAD, "load bound");
        for pair in live.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(self.key(a) < self.key(b), "records sorted");
            assert_eq!(self.recs[b as usize].prev_ts, self.recs[a as usize].ts, "copy of the predecessor's ts");
            assert!(self.is_tracked(a) || self.is_tracked(b), "no two adjacent gaps");
            let equal = self.recs[a as usize].ts == self.recs[b as usize].ts;
            assert!(!(self.is_tracked(a) && self.is_tracked(b) && equal), "adjacent equal pieces coalesced");
        }
        let covered: Vec<KeyRange> = self.iter().map(|s| KeyRange::new(s.start, s.end)).collect();
        assert_eq!(collapse(&covered), self.ranges, "pieces cover exactly the tracked ranges");
        assert_eq!(collapse(&self.ranges), self.ranges);
        self.index.check(&self.recs, &live);
        self.order.check(&self.recs, &live);
        let tracked: Vec<u32> = live.iter().copied().filter(|&id| self.is_tracked(id)).collect();
        self.heap.check(&self.recs, &tracked);
    }
}

/// Flushes as the advancer receives them: each region led by one of `stores` stores, each
/// store's flush one batch raising all its regions to one ts (with a few late reports),
/// leaders moving between rounds. With few stores every batch is past the share at which
/// `merge_batch` defers the heap's order to its end, with many none is: either way the
/// result, the minimum and the lagging pieces after every batch are those of the same
/// merges one by one.
fn run_store_flushes(stores: u64, rounds: u64) {
    let keys = region_keys(2000, 64);
    let mut rng = Rng::new(stores);
    let regions: Vec<KeyRange> = keys.windows(2).map(|pair| KeyRange::new(pair[0].clone(), pair[1].clone())).collect();
    let mut leaders: Vec<u64> = regions.iter().map(|_| rng.below(stores)).collect();
    let tracked = [kr("", "")];
    let (mut batched, mut one_by_one) = (SpanFrontier::new(&tracked, 0), SpanFrontier::new(&tracked, 0));
    let mut model = Model::new(&keys, &tracked, 0);
    // A first poll gives every region a distinct ts: one piece each.
    let polled: Vec<(&KeyRange, Ts)> = regions.iter().zip(1..).collect();
    batched.merge_batch(polled.iter().map(|(r, ts)| (r.start.as_slice(), r.end.as_slice(), *ts)));
    for &(range, ts) in &polled {
        one_by_one.merge_keys(&range.start, &range.end, ts);
        model.merge(range, ts);
    }
    let max_ts = (rounds + 3) * 1000;
    let mut deferred_batches = 0;
    for round in 1..=rounds {
        for store in 0..stores {
            let ts = (round + 2) * 1000 + store;
            let batch: Vec<(&KeyRange, Ts)> = (regions.iter().zip(&leaders))
                .filter(|&(_, &leader)| leader == store)
                .map(|(range, _)| (range, if rng.below(50) == 0 { ts - 1500 } else { ts }))
                .collect();
            deferred_batches += usize::from(batch.len() > batched.len() / DEFER_SHARE);
            let items = batch.iter().map(|(r, ts)| (r.start.as_slice(), r.end.as_slice(), *ts));
            if store % 2 == 0 {
                batched.merge_batch(items);
            } else {
                // Of a size it cannot tell: the heap is ordered at each raise up to the share.
                batched.merge_batch_of(0, items);
            }
            for &(range, ts) in &batch {
                one_by_one.merge_keys(&range.start, &range.end, ts);
                model.merge(range, ts);
            }
            check_against(&batched, &model, &mut rng, max_ts);
            assert_eq!(batched.snapshot(), one_by_one.snapshot(), "round {round} store {store}");
            assert_eq!(batched.min(), one_by_one.min(), "round {round} store {store}");
        }
        for leader in leaders.iter_mut() {
            if rng.below(10) == 0 {
                *leader = rng.below(stores);
            }
        }
    }
    let all = (rounds * stores) as usize;
    assert_eq!(deferred_batches, if stores < DEFER_SHARE as u64 { all } else { 0 });
}

#[test]
fn whole_store_flushes_match_one_by_one() {
    run_store_flushes(3, 5);
    run_store_flushes(40, 2);
}

/// The exact-piece update is recognised by its start's record and its successor's key alone:
/// updates whose end is some other record's key, +inf where a gap follows, or +inf at the
/// last piece, each alone and in a batch past the share, give the values of the model.
#[test]
fn exact_pieces_are_told_apart_by_their_successor_alone() {
    let tracked = [kr("", "c"), kr("e", "")];
    let keys: Vec<Vec<u8>> = ["", "a", "b", "c", "d", "e", "f", "g"].iter().map(|k| k.as_bytes().to_vec()).collect();
    let updates: &[(&str, &str, Ts)] = &[
        ("a", "b", 3), // splits: the pieces [, a) [a, b) [b, c)
        ("", "b", 4),  // not a piece: its end is a record two along
        ("", "a", 5),  // the first piece, whose key is empty
        ("b", "", 6),  // not a piece: a gap [c, e) follows it
        ("f", "", 7),  // splits [e, +inf)
        ("f", "", 8),  // the last piece, to +inf
        ("e", "g", 9), // not a piece: g is no record
        ("a", "c", 9), // covers two pieces
    ];
    let mut one_by_one = SpanFrontier::new(&tracked, 1);
    let mut model = Model::new(&keys, &tracked, 1);
    for &(start, end, ts) in updates {
        one_by_one.merge_keys(start.as_bytes(), end.as_bytes(), ts);
        model.merge(&kr(start, end), ts);
        one_by_one.check();
        assert_eq!(one_by_one.snapshot(), model.pieces(), "after [{start}, {end})@{ts}");
    }
    let mut batched = SpanFrontier::new(&tracked, 1);
    batched.merge_batch(updates.iter().map(|&(start, end, ts)| (start.as_bytes(), end.as_bytes(), ts)));
    batched.check();
    assert_eq!(batched.snapshot(), model.pieces());
}
