//! Merging by rebuilding. A batch that would split most of the pieces it touches, and is
//! about as large as the frontier or larger (a new owner taking in its stores' snapshots:
//! 10^6 regions into one span per task), costs a split each when merged item by item: a key
//! order search, two record inserts and a coalesce, ~1 µs at 10^6. Here it is instead merged
//! in one ordered pass: the items sorted by start, swept together with the records in key
//! order, and the result written into a new table in one go, with the key order built from
//! the sorted ids and the heap ordered once. The result is the same canonical frontier (the
//! same pieces, equal neighbours joined) as merging the items one by one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::index::{self, KeyIndex};
use super::key::Key;
use super::mem::prefetch;
use super::order::Order;
use super::{is_empty_range, Rec, SpanFrontier, TsHeap, LOOK_AHEAD, NIL};
use crate::types::Ts;

/// A batch is judged every this many items by the share of them that split.
pub(super) const WINDOW: usize = 1024;

/// Fewer items left than this are always merged item by item: a rebuild allocates and
/// reads every record, and a few thousand splits cost less.
const MIN_ITEMS: usize = 4096;

/// What a split costs against writing one record in a rebuild (measured by `cargo bench
/// --bench spans`, "build" table: ~1.3 µs against ~0.35 µs per record at 10^6).
const SPLIT_COST: usize = 4;

/// A boundary of the rebuilt frontier: its key, the value from it to the next one (`None`:
/// an untracked gap), and the key's hash, taken while the key is in cache.
#[derive(Clone, Copy)]
pub(super) struct Boundary<'a> {
    key: &'a [u8],
    value: Option<Ts>,
    hash: u64,
}

impl<'a> Boundary<'a> {
    pub(super) fn new(key: &'a [u8], value: Option<Ts>) -> Self {
        Boundary { key, value, hash: index::hash(key) }
    }
}

impl SpanFrontier {
    /// Whether rebuilding beats merging the `left` items of a batch one by one, when
    /// `splits` of the last [`WINDOW`] items split (or walked) pieces: the splits expected
    /// cost [`SPLIT_COST`] records each, and a rebuild writes every record, old and new.
    pub(super) fn rebuilding_pays(&self, left: usize, splits: usize) -> bool {
        left >= MIN_ITEMS && left * splits / WINDOW * SPLIT_COST > self.live + left
    }

    /// Merges `items` (raw start, raw end, ts) by rebuilding the frontier, with the result
    /// of [`merge_keys`](Self::merge_keys) on each.
    pub(super) fn merge_rebuilding(&mut self, mut items: Vec<(&[u8], &[u8], Ts)>) {
        items.retain(|&(start, end, _)| !is_empty_range(start, end));
        items.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut ends: Vec<&[u8]> = items.iter().map(|&(_, end, _)| end).filter(|end| !end.is_empty()).collect();
        ends.sort_unstable();
        let old: Vec<u32> = self.order.in_key_order().collect();
        let boundaries = self.sweep(&old, &items, &ends);
        let mut rebuilt = SpanFrontier::from_boundaries(&boundaries);
        drop(boundaries);
        rebuilt.ranges = std::mem::take(&mut self.ranges);
        *self = rebuilt;
    }

    /// The boundaries of the merged frontier, in key order: at each key where a record, an
    /// item or an item's end starts, the record's value raised to the greatest ts of the
    /// items covering the key (an untracked gap stays one), kept where it differs from the
    /// previous boundary's.
    fn sweep<'a>(&'a self, old: &[u32], items: &[(&'a [u8], &'a [u8], Ts)], ends: &[&'a [u8]]) -> Vec<Boundary<'a>> {
        let mut out: Vec<Boundary<'a>> = Vec::with_capacity(old.len() + items.len() + 1);
        let (mut o, mut s, mut e) = (0, 0, 0);
        let mut base: Option<Ts> = None;
        // The items covering the key (ts first: the greatest on top); an item whose end has
        // passed is dropped once it reaches the top, and until then is below a greater one.
        let mut covering: BinaryHeap<(Ts, Reverse<&[u8]>)> = BinaryHeap::new();
        loop {
            if let Some(&ahead) = old.get(o + LOOK_AHEAD) {
                prefetch(&self.recs[ahead as usize]);
            }
            let next_old = old.get(o).map(|&id| self.key(id));
            let candidates = [next_old, items.get(s).map(|item| item.0), ends.get(e).copied()];
            let Some(key) = candidates.into_iter().flatten().min() else { break };
            if next_old == Some(key) {
                let rec = &self.recs[old[o] as usize];
                base = self.is_tracked(old[o]).then_some(rec.ts);
                o += 1;
            }
            while let Some(&(_, end, ts)) = items.get(s).filter(|item| item.0 == key) {
                covering.push((ts, Reverse(end)));
                s += 1;
            }
            while ends.get(e) == Some(&key) {
                e += 1;
            }
            while let Some(&(_, Reverse(end))) = covering.peek() {
                if end.is_empty() || key < end {
                    break;
                }
                covering.pop();
            }
            let value = base.map(|ts| covering.peek().map_or(ts, |&(raised, _)| ts.max(raised)));
            if out.last().and_then(|last| last.value) != value {
                out.push(Boundary::new(key, value));
            }
        }
        out
    }

    /// A frontier of exactly these records, sorted by key and already canonical (no two
    /// adjacent gaps, no two adjacent pieces of one value); the caller sets the ranges they
    /// cover.
    pub(super) fn from_boundaries(boundaries: &[Boundary<'_>]) -> SpanFrontier {
        let mut spans = SpanFrontier {
            recs: (0..index::GROUP).map(|_| Rec::free()).collect(),
            live: 0,
            first: NIL,
            index: KeyIndex::new(1, 0),
            order: Order::new(),
            heap: TsHeap::default(),
            ranges: Vec::new(),
        };
        spans.reserve(boundaries.len());
        spans.heap.defer();
        let mut ids = Vec::with_capacity(boundaries.len());
        let (mut last, mut prev_ts) = (NIL, 0);
        for (i, boundary) in boundaries.iter().enumerate() {
            // The slot's group and the key's bytes (in the old records or the batch) a few
            // boundaries ahead, so that neither waits on memory when placed.
            if let Some(ahead) = boundaries.get(i + LOOK_AHEAD) {
                spans.index.prefetch(&spans.recs, ahead.hash);
                prefetch(ahead.key);
            }
            let id = spans.index.place(&spans.recs, boundary.hash);
            let ts = boundary.value.unwrap_or_default();
            spans.recs[id as usize] = Rec { key: Key::new(boundary.key), ts, prev_ts, next: NIL, heap_pos: NIL };
            match last {
                NIL => spans.first = id,
                last => spans.recs[last as usize].next = id,
            }
            if boundary.value.is_some() {
                spans.heap.push(&mut spans.recs, id);
            }
            (last, prev_ts) = (id, ts);
            ids.push(id);
        }
        spans.live = ids.len();
        spans.order = Order::from_sorted(&spans.recs, &ids);
        spans.heap.restore(&mut spans.recs);
        spans
    }
}
