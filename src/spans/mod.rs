//! Value-sorted span sets: for one log-backup task, non-overlapping spans covering exactly
//! the task's key ranges, each with the ts up to which it is known to be flushed.
//!
//! [`SpanFrontier`] is built from the task's ranges and only ever tracks keys inside them:
//! updates are clipped, so a region reported outside the task cannot freeze the checkpoint.
//! [`SpanFrontier::merge`] raises the covered part of every piece to the new ts (a late,
//! older report lowers nothing) and joins adjacent pieces that end up with equal values.
//!
//! Layout, chosen so that the common update (a region reporting the exact span it already
//! has) costs one round trip to memory and no allocation, and a span costs under 64 bytes
//! beyond its key:
//! - one record per boundary (`Rec`, 48 bytes, key inline up to 22 bytes), covering
//!   `[key, next record's key)`; the untracked gaps between the task's ranges are records
//!   too, so a piece's end is always the next record's start and is not stored;
//! - the records array is itself the exact-key hash table (`index.rs`): a record sits in the
//!   group of slots its key hashes to (or a later one), so a key's record is read without
//!   first reading a bucket; growing the table moves every record (all ids are rewritten);
//! - records link forward in key order, and are found by arbitrary key (and their
//!   predecessor) through chunked key order (`order.rs`);
//! - tracked records sit in an indexed 8-ary min-heap on (ts, start) (`heap.rs`): the minimum
//!   is its root and lagging pieces are a best-first walk from it.
//!
//! A batch that would split most of the pieces it touches, large against the frontier (a new
//! owner's snapshots), is merged by building the frontier anew in one sorted sweep
//! (`bulk.rs`) rather than by a split per item.
//!
//! The exact-piece update finds the piece by its start key and checks that its successor
//! starts at the end key; alone it asks for the hash groups of both keys at once, so the
//! piece's record and its successor's arrive in parallel, and in a batch it asks for the
//! successor's record alone once the piece's is cached. Each record keeps a copy of its
//! predecessor's ts, so deciding whether the piece now joins a neighbour reads no third
//! record.

mod bulk;
mod heap;
mod index;
mod key;
mod mem;
mod order;
#[cfg(test)]
mod tests;

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt;

use crate::types::{DisplayKey, KeyRange, Ts};
use heap::TsHeap;
use index::KeyIndex;
use key::Key;
use mem::{huge_vec, prefetch};
use order::Order;

/// The null record id.
const NIL: u32 = u32::MAX;
/// `next` of a free slot of the record table.
const FREE: u32 = u32::MAX - 1;
/// The record table grows when more than this share (in percent) of its slots is live...
const MAX_LOAD: usize = 87;
/// ... to this share: 48-byte records at load 0.74-0.87 take 55-65 bytes per record.
const GROWN_LOAD: usize = 74;

/// How many items [`SpanFrontier::merge_batch`] looks ahead. Enough to cover two memory
/// reads of ~150-250 ns each with exact-piece updates of ~30-60 ns of work once their
/// memory is cached; the window's items are ~LOOK_AHEAD * 100 bytes of cache.
const LOOK_AHEAD: usize = 16;

/// [`SpanFrontier::merge_batch`] orders the heap once at the end of a batch of this share
/// (1/n) of the pieces or more, instead of at each raise. A rebuild reads each piece's
/// record about once (every entry is some parent's child) plus the deeper sifts; a raise
/// to a new maximum reads 8 records at each level it sinks, a few of them uncached at 10^6:
/// by that count rebuilding wins from about a fifth of the pieces (docs/benchmarks.md).
const DEFER_SHARE: usize = 4;

/// An update with its start key's hash, computed once. (The end key is not looked up: the
/// piece starting at `start` ends there or the update is not an exact piece.)
#[derive(Clone, Copy)]
struct Pending<'a> {
    start: &'a [u8],
    end: &'a [u8],
    ts: Ts,
    hash: u64,
    /// The start key's record, looked up in its (prefetched) hash group (NIL: none), for the
    /// prefetches of its successor and heap entries.
    guess: u32,
}

impl<'a> Pending<'a> {
    fn new(start: &'a [u8], end: &'a [u8], ts: Ts) -> Self {
        Pending { start, end, ts, hash: index::hash(start), guess: NIL }
    }
}

/// One boundary: the record covers `[key, next record's key)`, the last one up to +∞. It is
/// a tracked piece when it is in the heap, an untracked gap otherwise.
struct Rec {
    key: Key,
    ts: Ts,
    /// The predecessor's `ts` (any value when there is none; gaps keep 0).
    prev_ts: Ts,
    next: u32,
    heap_pos: u32,
}

impl Rec {
    fn free() -> Rec {
        Rec { key: Key::default(), ts: 0, prev_ts: 0, next: FREE, heap_pos: NIL }
    }
}

// The bulk of the memory budget (64 bytes per span beyond the key).
const _: () = assert!(std::mem::size_of::<Rec>() == 48);

/// A span with its value: the owned form, for input and snapshots.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Valued {
    pub range: KeyRange,
    pub ts: Ts,
}

impl Valued {
    pub fn new(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>, ts: Ts) -> Self {
        Valued { range: KeyRange::new(start, end), ts }
    }
}

/// A tracked piece, borrowed from its [`SpanFrontier`]. An empty `end` means +∞.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SpanRef<'a> {
    pub start: &'a [u8],
    pub end: &'a [u8],
    pub ts: Ts,
}

impl SpanRef<'_> {
    pub fn to_valued(&self) -> Valued {
        Valued::new(self.start, self.end, self.ts)
    }
}

impl fmt::Display for SpanRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = if self.end.is_empty() { "+inf".to_string() } else { DisplayKey(self.end).to_string() };
        write!(f, "[{}, {})@{}", DisplayKey(self.start), end, self.ts)
    }
}

impl fmt::Debug for SpanRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The pieces of a task's key ranges with the ts each is flushed up to.
pub struct SpanFrontier {
    /// The records, at the slots the index gives their keys (see [`index`]).
    recs: Vec<Rec>,
    /// Live records (pieces and gaps).
    live: usize,
    /// The record with the smallest key. Coalescing removes the right one of two records, so
    /// this one never goes away.
    first: u32,
    index: KeyIndex,
    order: Order,
    heap: TsHeap,
    ranges: Vec<KeyRange>,
}

impl SpanFrontier {
    /// Tracks the union of `ranges` (see [`collapse`]), every key at `init`.
    pub fn new(ranges: &[KeyRange], init: Ts) -> Self {
        let ranges = collapse(ranges);
        let boundaries: Vec<_> = ranges
            .iter()
            .flat_map(|range| [(range.start.as_slice(), Some(init)), (range.end.as_slice(), None)])
            .filter(|&(key, ts)| ts.is_some() || !key.is_empty())
            .map(|(key, ts)| bulk::Boundary::new(key, ts))
            .collect();
        let mut spans = SpanFrontier::from_boundaries(&boundaries);
        spans.ranges = ranges;
        spans
    }

    /// Raises every tracked key of `range` to at least `ts`; keys outside the task are ignored.
    pub fn merge(&mut self, range: &KeyRange, ts: Ts) {
        self.merge_keys(&range.start, &range.end, ts);
    }

    /// [`merge`](Self::merge) on borrowed keys: updating a piece with exactly its own
    /// boundaries allocates nothing.
    pub fn merge_keys(&mut self, start: &[u8], end: &[u8], ts: Ts) {
        // The successor's record sits in the end key's hash group: asked for now, it arrives
        // while the start's is looked up.
        if !end.is_empty() {
            self.index.prefetch(&self.recs, index::hash(end));
        }
        self.merge_hashed(&Pending::new(start, end, ts));
    }

    /// [`merge_keys`](Self::merge_keys) on each item in turn, with exactly its result, but
    /// faster on large frontiers: while one item is merged, the memory the items after it
    /// will read is already on its way to the cache. At 10^6 pieces an exact-piece update
    /// waits for memory reads (its start key's hash group of records, then its successor's
    /// record); here the group of the item `LOOK_AHEAD` places ahead is prefetched, and,
    /// closer, its piece's successor record (found through its by then cached group) and the
    /// heap entries and records a raise of its piece would sift past.
    /// Prefetches are only hints: a guess made stale by the merges in between costs time,
    /// never correctness. Any iterator works; items are buffered a few at a time and nothing
    /// is allocated. On a frontier that fits in cache the bookkeeping costs a little per
    /// item; on one that does not, hiding the reads wins (figures in docs/benchmarks.md).
    ///
    /// A batch of 1/[`DEFER_SHARE`] of the pieces or more orders the heap once at its end
    /// instead of at each raise (see [`heap`]): a batch is never observed half-merged. Its
    /// size is taken from the iterator's `size_hint`; see [`merge_batch_of`](Self::merge_batch_of).
    pub fn merge_batch<'a>(&mut self, items: impl IntoIterator<Item = (&'a [u8], &'a [u8], Ts)>) {
        let items = items.into_iter();
        self.merge_batch_of(items.size_hint().0, items);
    }

    /// [`merge_batch`](Self::merge_batch) of about `expected` items, for iterators that
    /// cannot tell. Only a hint, with the same result either way: `expected` at or above the
    /// share orders the heap once at the end from the first item on; a batch found larger
    /// than expected switches to that once it has merged the share.
    ///
    /// A batch that turns out to split most of the pieces it touches, with enough of it left
    /// against the frontier's size (a new owner taking in its stores' snapshots), merges its
    /// rest by rebuilding the frontier in one ordered pass instead (see [`bulk`]); judged
    /// every [`bulk::WINDOW`] items from the last window's share of splits, with the same
    /// result.
    pub fn merge_batch_of<'a>(&mut self, expected: usize, items: impl IntoIterator<Item = (&'a [u8], &'a [u8], Ts)>) {
        let mut items = items.into_iter();
        let mut window = [Pending::new(&[], &[], 0); LOOK_AHEAD];
        let (mut taken, mut done, mut splits) = (0, 0, 0);
        let share = self.len() / DEFER_SHARE;
        let defer_after = if expected >= share { 0 } else { share };
        loop {
            while taken - done < LOOK_AHEAD {
                let Some((start, end, ts)) = items.next() else { break };
                let item = Pending::new(start, end, ts);
                self.index.prefetch(&self.recs, item.hash);
                window[taken % LOOK_AHEAD] = item;
                taken += 1;
            }
            if done == taken {
                self.heap.restore(&mut self.recs);
                return;
            }
            if done == defer_after {
                self.heap.defer();
            }
            self.prefetch_ahead(&mut window, done, taken, done < defer_after);
            if !self.merge_hashed(&window[done % LOOK_AHEAD]) {
                splits += 1;
            }
            done += 1;
            if done % bulk::WINDOW == 0 {
                let left = expected.saturating_sub(done);
                if self.rebuilding_pays(left, splits) {
                    let mut rest = Vec::with_capacity(left + LOOK_AHEAD);
                    rest.extend((done..taken).map(|i| window[i % LOOK_AHEAD]).map(|p| (p.start, p.end, p.ts)));
                    rest.extend(items);
                    return self.merge_rebuilding(rest);
                }
                splits = 0;
            }
        }
    }

    /// The later stages of [`merge_batch`](Self::merge_batch)'s look-ahead: the successor
    /// record of the item half the window ahead of `done`, and with `heap` (its order kept
    /// at each raise) what raising the pieces of the items closer ahead will read.
    fn prefetch_ahead(&self, window: &mut [Pending<'_>; LOOK_AHEAD], done: usize, taken: usize, heap: bool) {
        if done + LOOK_AHEAD / 2 < taken {
            let ahead = &mut window[(done + LOOK_AHEAD / 2) % LOOK_AHEAD];
            // Its group is cached by now: the exact lookup of its start is cheap.
            ahead.guess = self.index.get(&self.recs, ahead.start, ahead.hash).unwrap_or(NIL);
            if let Some(&Rec { next, .. }) = self.recs.get(ahead.guess as usize) {
                if let Some(successor) = self.recs.get(next as usize) {
                    prefetch(successor);
                }
            }
        }
        if !heap {
            return;
        }
        if done + LOOK_AHEAD / 4 < taken {
            self.heap.prefetch_children(&self.recs, window[(done + LOOK_AHEAD / 4) % LOOK_AHEAD].guess, false);
        }
        if done + LOOK_AHEAD / 8 < taken {
            self.heap.prefetch_children(&self.recs, window[(done + LOOK_AHEAD / 8) % LOOK_AHEAD].guess, true);
        }
    }

    /// Merges one item; false when it was not exactly one piece (it split or walked pieces).
    fn merge_hashed(&mut self, item: &Pending<'_>) -> bool {
        let Pending { start, end, ts, hash, .. } = *item;
        if is_empty_range(start, end) {
            return true;
        }
        // The usual case: `[start, end)` is exactly one piece, the successor starting at `end`
        // (only the first record's key is empty, so an empty `end` matches only no successor).
        let hit = self.index.get(&self.recs, start, hash);
        if let Some(id) = hit {
            if self.is_tracked(id) && self.end_of(id) == end {
                self.raise_piece(id, ts);
                return true;
            }
        }
        // Room for the (at most two) records a split adds, so that no id moves below.
        let hit = if self.reserve(2) { self.index.get(&self.recs, start, hash) } else { hit };
        // Otherwise walk the records from the one containing `start` up to `end`, skipping gaps
        // (that is the clipping) and pieces already at `ts` or above, and cutting the ones that
        // stick out of the range before raising them.
        let mut cur = hit.or_else(|| self.order.find(&self.recs, start)).unwrap_or(self.first);
        let mut changed = None;
        while cur != NIL && key_before_end(self.key(cur), end) {
            let old = self.recs[cur as usize].ts;
            if self.is_tracked(cur) && old < ts {
                if self.key(cur) < start {
                    cur = self.insert_after(cur, start, Some(old));
                }
                if cmp_end(self.end_of(cur), end) == Ordering::Greater {
                    self.insert_after(cur, end, Some(old));
                }
                self.set_ts(cur, ts);
                changed = Some((changed.map_or(cur, |(first, _)| first), cur));
            }
            cur = self.recs[cur as usize].next;
        }
        if let Some((first, last)) = changed {
            self.coalesce(first, last);
        }
        false
    }

    pub fn merge_all(&mut self, items: impl IntoIterator<Item = Valued>) {
        for item in items {
            self.merge(&item.range, item.ts);
        }
    }

    /// The number of pieces.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The smallest ts of any tracked key, in O(1); `None` when nothing is tracked.
    pub fn min_ts(&self) -> Option<Ts> {
        self.min().map(|span| span.ts)
    }

    /// The piece with the smallest ts (of those, the smallest start), in O(1).
    pub fn min(&self) -> Option<SpanRef<'_>> {
        (self.heap.len() > 0).then(|| self.span(self.heap.id(0)))
    }

    /// The pieces with ts below `threshold`, in ascending (ts, start) order. Lazy: taking the
    /// first k costs O(k log k) and reads nothing at or above the threshold beyond the ≤ 8k+1
    /// heap entries next to the ones returned, whatever the number of pieces.
    pub fn below(&self, threshold: Ts) -> Below<'_> {
        let mut below = Below { spans: self, threshold, pending: BinaryHeap::new() };
        if self.heap.len() > 0 {
            below.consider(0);
        }
        below
    }

    /// The pieces with ts below `threshold` in no particular order, in O(m) for m results:
    /// a walk of the heap that looks at each result's ≤ 8 children and nothing else. For
    /// callers that re-sort by key anyway, like the poll planner.
    pub fn below_unordered(&self, threshold: Ts) -> impl Iterator<Item = SpanRef<'_>> + '_ {
        let mut stack: Vec<usize> = Vec::new();
        if self.heap.len() > 0 {
            stack.push(0);
        }
        std::iter::from_fn(move || {
            while let Some(pos) = stack.pop() {
                let span = self.span(self.heap.id(pos));
                // A heap's subtree holds nothing smaller than its root: stop there.
                if span.ts < threshold {
                    stack.extend(self.heap.children(pos));
                    return Some(span);
                }
            }
            None
        })
    }

    /// The pieces in key order.
    pub fn iter(&self) -> impl Iterator<Item = SpanRef<'_>> + '_ {
        let first = Some(self.first).filter(|&id| id != NIL);
        std::iter::successors(first, move |&id| Some(self.recs[id as usize].next).filter(|&next| next != NIL))
            .filter(move |&id| self.is_tracked(id))
            .map(move |id| self.span(id))
    }

    /// The pieces in key order, owned.
    pub fn snapshot(&self) -> Vec<Valued> {
        self.iter().map(|span| span.to_valued()).collect()
    }

    /// The task's ranges as tracked: sorted, disjoint and not touching.
    pub fn tracked_ranges(&self) -> &[KeyRange] {
        &self.ranges
    }

    fn key(&self, id: u32) -> &[u8] {
        self.recs[id as usize].key.as_bytes()
    }

    /// The end of record `id`'s range, empty for +∞.
    fn end_of(&self, id: u32) -> &[u8] {
        match self.recs[id as usize].next {
            NIL => &[],
            next => self.key(next),
        }
    }

    fn is_tracked(&self, id: u32) -> bool {
        self.recs[id as usize].heap_pos != NIL
    }

    fn span(&self, id: u32) -> SpanRef<'_> {
        SpanRef { start: self.key(id), end: self.end_of(id), ts: self.recs[id as usize].ts }
    }

    /// The exact-piece update: reads only the piece's record and its successor's.
    fn raise_piece(&mut self, id: u32, ts: Ts) {
        if ts <= self.recs[id as usize].ts {
            return;
        }
        self.set_ts(id, ts);
        let next = self.recs[id as usize].next;
        let joins_next = next != NIL && self.is_tracked(next) && self.recs[next as usize].ts == ts;
        // `prev_ts` may match an absent or untracked predecessor; `coalesce` checks.
        if joins_next || self.recs[id as usize].prev_ts == ts {
            self.coalesce(id, id);
        }
    }

    fn set_ts(&mut self, id: u32, ts: Ts) {
        self.recs[id as usize].ts = ts;
        self.heap.raise(&mut self.recs, id);
        let next = self.recs[id as usize].next;
        if next != NIL {
            self.recs[next as usize].prev_ts = ts;
        }
    }

    /// Adds a record starting at `key` right after `pred` (NIL: first): a piece at `ts`, or
    /// a gap for `None`.
    fn insert_after(&mut self, pred: u32, key: &[u8], ts: Option<Ts>) -> u32 {
        let (next, prev_ts) = match pred {
            NIL => (self.first, 0),
            pred => (self.recs[pred as usize].next, self.recs[pred as usize].ts),
        };
        let rec = Rec { key: Key::new(key), ts: ts.unwrap_or_default(), prev_ts, next, heap_pos: NIL };
        assert!(self.live < self.index.capacity(), "room reserved for the record");
        let id = self.index.place(&self.recs, index::hash(key));
        self.recs[id as usize] = rec;
        self.live += 1;
        match pred {
            NIL => self.first = id,
            pred => self.recs[pred as usize].next = id,
        }
        if next != NIL {
            self.recs[next as usize].prev_ts = self.recs[id as usize].ts;
        }
        self.order.insert(&self.recs, pred, id);
        if ts.is_some() {
            self.heap.push(&mut self.recs, id);
        }
        id
    }

    /// Drops piece `id`, giving its range to its predecessor `prev`. (Gaps are never
    /// removed: they are fixed by the tracked ranges.)
    fn remove(&mut self, id: u32, prev: u32) {
        self.heap.remove(&mut self.recs, id);
        self.index.remove(index::hash(self.key(id)), id);
        self.order.remove(&self.recs, id);
        let next = self.recs[id as usize].next;
        self.recs[prev as usize].next = next;
        if next != NIL {
            self.recs[next as usize].prev_ts = self.recs[prev as usize].ts;
        }
        self.recs[id as usize] = Rec::free();
        self.live -= 1;
    }

    /// Makes room for `extra` more records, growing the table if they would take it past
    /// [`MAX_LOAD`]. Growing moves every record to a new slot (so every id changes: links,
    /// key order and heap are rewritten) and returns true.
    fn reserve(&mut self, extra: usize) -> bool {
        let need = self.live + extra;
        if need * 100 <= self.index.capacity() * MAX_LOAD {
            return false;
        }
        let groups = (need * 100 / GROWN_LOAD).div_ceil(index::GROUP).max(1);
        let slots = groups * index::GROUP + index::GROUP - 1;
        assert!(slots < FREE as usize, "span count overflows u32");
        let mut old = std::mem::replace(&mut self.recs, huge_vec(slots));
        let base = KeyIndex::align(self.recs.as_ptr());
        self.recs.resize_with(base + groups * index::GROUP, Rec::free);
        self.index = KeyIndex::new(groups, base);
        let mut moved = vec![NIL; old.len()];
        for (i, rec) in old.iter_mut().enumerate().filter(|(_, rec)| rec.next != FREE) {
            let id = self.index.place(&self.recs, index::hash(rec.key.as_bytes()));
            self.recs[id as usize] = std::mem::replace(rec, Rec::free());
            moved[i] = id;
        }
        drop(old);
        let map = |id: u32| if id == NIL { NIL } else { moved[id as usize] };
        for rec in self.recs.iter_mut().filter(|rec| rec.next != FREE) {
            rec.next = map(rec.next);
        }
        self.first = map(self.first);
        self.heap.remap(map);
        self.order.remap(map);
        true
    }

    /// Joins equal-valued neighbours after the values of records `first..=last` changed;
    /// every other adjacent pair already differed.
    fn coalesce(&mut self, first: u32, last: u32) {
        let next = self.recs[last as usize].next;
        // Looking up the predecessor costs a search; its ts copy says whether it may join.
        let rec = &self.recs[first as usize];
        let prev = if rec.prev_ts == rec.ts { self.order.prev(&self.recs, first) } else { None };
        let mut left = prev.unwrap_or(first);
        let stop = if next == NIL { last } else { next };
        while left != stop {
            let right = self.recs[left as usize].next;
            let equal = self.is_tracked(left)
                && self.is_tracked(right)
                && self.recs[left as usize].ts == self.recs[right as usize].ts;
            if !equal {
                left = right;
                continue;
            }
            self.remove(right, left);
            if right == stop {
                break;
            }
        }
    }
}

impl fmt::Debug for SpanFrontier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over the pieces below a threshold, from [`SpanFrontier::below`].
pub struct Below<'a> {
    spans: &'a SpanFrontier,
    threshold: Ts,
    /// Heap positions reached but not yet returned, smallest (ts, start) first.
    pending: BinaryHeap<Reverse<(Ts, &'a [u8], usize)>>,
}

impl Below<'_> {
    fn consider(&mut self, pos: usize) {
        let span = self.spans.span(self.spans.heap.id(pos));
        if span.ts < self.threshold {
            self.pending.push(Reverse((span.ts, span.start, pos)));
        }
    }
}

impl<'a> Iterator for Below<'a> {
    type Item = SpanRef<'a>;

    fn next(&mut self) -> Option<SpanRef<'a>> {
        let Reverse((_, _, pos)) = self.pending.pop()?;
        for child in self.spans.heap.children(pos) {
            self.consider(child);
        }
        Some(self.spans.span(self.spans.heap.id(pos)))
    }
}

/// The union of `ranges` as sorted, disjoint ranges, with overlapping or touching ones
/// joined and empty ones dropped.
pub fn collapse(ranges: &[KeyRange]) -> Vec<KeyRange> {
    let mut sorted: Vec<&KeyRange> = ranges.iter().filter(|r| !is_empty_range(&r.start, &r.end)).collect();
    sorted.sort_by(|a, b| a.start.cmp(&b.start).then_with(|| cmp_end(&a.end, &b.end)));
    let mut out: Vec<KeyRange> = Vec::with_capacity(sorted.len());
    for range in sorted {
        match out.last_mut() {
            Some(last) if key_before_end(&range.start, &last.end) || range.start == last.end => {
                if cmp_end(&range.end, &last.end) == Ordering::Greater {
                    last.end = range.end.clone();
                }
            }
            _ => out.push(range.clone()),
        }
    }
    out
}

/// True when `a` and `b` describe the same piecewise function: pieces may come in any order
/// and be split differently, but untracked gaps and values must match.
pub fn valued_set_equals(a: &[Valued], b: &[Valued]) -> bool {
    normalize(a) == normalize(b)
}

fn normalize(items: &[Valued]) -> Vec<Valued> {
    let mut sorted: Vec<&Valued> = items.iter().filter(|v| !is_empty_range(&v.range.start, &v.range.end)).collect();
    sorted.sort_by(|a, b| a.range.start.cmp(&b.range.start));
    let mut out: Vec<Valued> = Vec::with_capacity(sorted.len());
    for item in sorted {
        match out.last_mut() {
            Some(last) if last.ts == item.ts && !last.range.end.is_empty() && last.range.end == item.range.start => {
                last.range.end = item.range.end.clone();
            }
            _ => out.push(item.clone()),
        }
    }
    out
}

fn is_empty_range(start: &[u8], end: &[u8]) -> bool {
    !end.is_empty() && start >= end
}

/// `key < end`, an empty `end` being +∞.
fn key_before_end(key: &[u8], end: &[u8]) -> bool {
    end.is_empty() || key < end
}

/// Orders range ends, the empty end (+∞) last.
fn cmp_end(a: &[u8], b: &[u8]) -> Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.cmp(b),
    }
}
