//! Benchmarks `spans::SpanFrontier` against a naive baseline (one `BTreeMap` from start key
//! to (end key, ts), scanned for its minimum) at 10^4, 10^5 and 10^6 region-like spans, and
//! prints markdown tables. Run with `cargo bench --bench spans`; `SPANS_BENCH_MAX=100000`
//! skips the larger sizes for a quick smoke run.
//!
//! Every operation is timed on its own; medians and means have the timer's own cost taken
//! off. Both structures receive the same operations and must end up equal.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::ops::Bound::{Excluded, Included, Unbounded};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use streamhelper::spans::SpanFrontier;
use streamhelper::testing::Rng;
use streamhelper::{KeyRange, Ts};

#[path = "common/counting.rs"]
mod counting;
use counting::{Counting, ALLOCATIONS, LIVE_BYTES};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What both structures must do.
trait Frontier {
    fn merge(&mut self, start: &[u8], end: &[u8], ts: Ts);
    fn min_ts(&self) -> Option<Ts>;
    /// Sums the ts of the pieces below `threshold`, visited in ascending (ts, start) order.
    fn below_sum(&self, threshold: Ts) -> Ts;
    fn snapshot(&self) -> Vec<(Vec<u8>, Vec<u8>, Ts)>;
    /// Merges a batch, through `merge_batch` when `batched` (the baseline always merges one
    /// by one).
    fn merge_many(&mut self, batch: &Batch, batched: bool) {
        let _ = batched;
        batch.items().for_each(|(start, end, ts)| self.merge(start, end, ts));
    }
}

/// Keys of a batch of same-boundary updates, computed before the batch is timed (the
/// buffer is reused, so timing allocates nothing).
struct Batch(Vec<([u8; 19], [u8; 19], bool, Ts)>);

impl Batch {
    const SIZE: usize = 1024;

    /// `SIZE` random regions of `n`, each reporting its own span at `ts0`, `ts0 + 1`, ...
    fn fill(&mut self, rng: &mut Rng, n: usize, ts0: Ts) {
        self.0.clear();
        for j in 0..Self::SIZE {
            let region = rng.index(n);
            self.0.push((region_key(region), region_key(region + 1), region + 1 < n, ts0 + j as Ts));
        }
    }

    fn items(&self) -> impl Iterator<Item = (&[u8], &[u8], Ts)> {
        self.0.iter().map(|(start, end, bounded, ts)| (&start[..], if *bounded { &end[..] } else { &[][..] }, *ts))
    }
}

impl Frontier for SpanFrontier {
    fn merge(&mut self, start: &[u8], end: &[u8], ts: Ts) {
        self.merge_keys(start, end, ts);
    }

    fn min_ts(&self) -> Option<Ts> {
        self.min().map(|span| span.ts)
    }

    fn below_sum(&self, threshold: Ts) -> Ts {
        self.below(threshold).map(|span| span.ts).sum()
    }

    fn snapshot(&self) -> Vec<(Vec<u8>, Vec<u8>, Ts)> {
        self.iter().map(|s| (s.start.to_vec(), s.end.to_vec(), s.ts)).collect()
    }

    fn merge_many(&mut self, batch: &Batch, batched: bool) {
        if batched {
            self.merge_batch(batch.items());
        } else {
            batch.items().for_each(|(start, end, ts)| self.merge_keys(start, end, ts));
        }
    }
}

/// The baseline: owned start and end keys in one `BTreeMap`; the minimum and the lagging
/// pieces are found by scanning everything.
struct Naive {
    map: BTreeMap<Vec<u8>, (Vec<u8>, Ts)>,
}

impl Naive {
    fn full(init: Ts) -> Self {
        Naive { map: BTreeMap::from([(Vec::new(), (Vec::new(), init))]) }
    }

    /// Joins equal-valued contiguous pieces among those from the one before `start` to the
    /// one at `end`.
    fn coalesce(&mut self, start: &[u8], end: &[u8]) {
        let first = self.map.range::<[u8], _>((Unbounded, Excluded(start))).next_back().map(|(k, _)| k.as_slice());
        let from = first.unwrap_or(start);
        let upto = if end.is_empty() { Unbounded } else { Included(end) };
        let keys: Vec<Vec<u8>> = self.map.range::<[u8], _>((Included(from), upto)).map(|(k, _)| k.clone()).collect();
        let mut left = &keys[0];
        for right in &keys[1..] {
            let (left_end, left_ts) = &self.map[left];
            let (right_end, right_ts) = self.map[right].clone();
            if left_end == right && *left_ts == right_ts {
                self.map.remove(right);
                self.map.get_mut(left).expect("left piece").0 = right_end;
            } else {
                left = right;
            }
        }
    }
}

impl Frontier for Naive {
    fn merge(&mut self, start: &[u8], end: &[u8], ts: Ts) {
        if let Some((piece_end, old)) = self.map.get_mut(start) {
            if piece_end.as_slice() == end {
                if ts > *old {
                    *old = ts;
                    self.coalesce(start, end);
                }
                return;
            }
        }
        let containing = self.map.range::<[u8], _>((Unbounded, Included(start))).next_back();
        let containing = containing.filter(|(_, (e, _))| before_end(start, e)).map(|(k, _)| k.clone());
        let after = self.map.range::<[u8], _>((Excluded(start), Unbounded)).take_while(|(k, _)| before_end(k, end));
        let starts: Vec<Vec<u8>> = containing.into_iter().chain(after.map(|(k, _)| k.clone())).collect();
        for key in starts {
            let (piece_end, old) = self.map.remove(&key).expect("piece");
            if old >= ts {
                self.map.insert(key, (piece_end, old));
                continue;
            }
            let low = key.as_slice().max(start).to_vec();
            let high = if end.is_empty() || (!piece_end.is_empty() && piece_end.as_slice() < end) {
                piece_end.clone()
            } else {
                end.to_vec()
            };
            if key < low {
                self.map.insert(key, (low.clone(), old));
            }
            if high != piece_end {
                self.map.insert(high.clone(), (piece_end, old));
            }
            self.map.insert(low, (high, ts));
        }
        self.coalesce(start, end);
    }

    fn min_ts(&self) -> Option<Ts> {
        self.map.iter().min_by_key(|(k, (_, ts))| (*ts, *k)).map(|(_, (_, ts))| *ts)
    }

    fn below_sum(&self, threshold: Ts) -> Ts {
        let mut lagging: Vec<(Ts, &[u8])> =
            self.map.iter().filter(|(_, (_, ts))| *ts < threshold).map(|(k, (_, ts))| (*ts, k.as_slice())).collect();
        lagging.sort_unstable();
        lagging.iter().map(|(ts, _)| ts).sum()
    }

    fn snapshot(&self) -> Vec<(Vec<u8>, Vec<u8>, Ts)> {
        self.map.iter().map(|(k, (e, ts))| (k.clone(), e.clone(), *ts)).collect()
    }
}

fn before_end(key: &[u8], end: &[u8]) -> bool {
    end.is_empty() || key < end
}

/// `t` + 8-byte big-endian table id + `_r` + 8-byte big-endian row id: 19 bytes. Keys are
/// computed when needed, as an update's keys arrive fresh off the wire; reading them from a
/// stored table would add that table's cache misses to every measured operation.
fn region_key(i: usize) -> [u8; 19] {
    let (table, row) = (100 + i as u64 / 1000, (i as u64 % 1000) << 20);
    let mut key = [0; 19];
    key[0] = b't';
    key[1..9].copy_from_slice(&table.to_be_bytes());
    key[9..11].copy_from_slice(b"_r");
    key[11..].copy_from_slice(&row.to_be_bytes());
    key
}

/// Reports `[start, end of region)` at `ts`: the region's end is the next region's start, or
/// +inf for the last one.
fn report(f: &mut dyn Frontier, n: usize, region: usize, start: &[u8], ts: Ts) {
    let end = region_key(region + 1);
    f.merge(start, if region + 1 < n { &end } else { &[] }, ts);
}

/// Per-operation times in ns, minus the timer's own cost.
struct Samples(Vec<u64>);

impl Samples {
    fn median(&mut self) -> u64 {
        let mid = self.0.len() / 2;
        *self.0.select_nth_unstable(mid).1
    }

    fn mean(&self) -> u64 {
        self.0.iter().sum::<u64>() / self.0.len() as u64
    }
}

/// Runs `count` iterations of `K` steps, `step(i, k)`, timing each step on its own (or, for
/// steps close to the timer's cost, `batch` of them at a time) and counting its allocations.
fn measure<const K: usize>(
    count: usize,
    batch: usize,
    overhead: u64,
    mut step: impl FnMut(usize, usize),
) -> [(Samples, f64); K] {
    let mut times: [Vec<u64>; K] = std::array::from_fn(|_| Vec::with_capacity(count));
    let mut allocations = [0; K];
    for i in 0..count {
        for k in 0..K {
            let before = ALLOCATIONS.load(Relaxed);
            let start = Instant::now();
            for j in 0..batch {
                step(i * batch + j, k);
            }
            times[k].push((start.elapsed().as_nanos() as u64).saturating_sub(overhead) / batch as u64);
            allocations[k] += ALLOCATIONS.load(Relaxed) - before;
        }
    }
    let per_op = |k: usize| allocations[k] as f64 / (count * batch) as f64;
    let mut times = times.into_iter();
    std::array::from_fn(|k| (Samples(times.next().expect("K sample sets")), per_op(k)))
}

/// The latency of one dependent random read from 64 MiB of memory (a structure of 10^6
/// spans is about that big): the unit in which a random update's cost is best read.
fn memory_latency() -> f64 {
    let n = 64 << 20 >> 3;
    // Sattolo's shuffle: one cycle through every slot, so each read depends on the last.
    let mut next: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(3);
    for i in (1..n).rev() {
        next.swap(i, rng.index(i));
    }
    let (steps, mut at) = (2_000_000, 0);
    let start = Instant::now();
    for _ in 0..steps {
        at = next[at];
    }
    black_box(at);
    start.elapsed().as_nanos() as f64 / steps as f64
}

fn timer_overhead() -> u64 {
    let [(mut samples, _)] = measure(100_000, 1, 0, |_, _| {});
    samples.median()
}

/// One operation's results for both structures.
struct Row {
    op: &'static str,
    ours: (Samples, f64),
    naive: (Samples, f64),
}

/// Builds a structure by reporting each of `n` regions once, in random order, each at a
/// distinct ts (so none coalesce); returns it with the heap bytes it holds.
fn build<F: Frontier>(n: usize, empty: impl FnOnce() -> F) -> (F, usize) {
    let live = LIVE_BYTES.load(Relaxed);
    let mut frontier = empty();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(7);
    for i in (1..n).rev() {
        order.swap(i, rng.index(i + 1));
    }
    for (ts, &region) in order.iter().enumerate() {
        report(&mut frontier, n, region, &region_key(region), ts as Ts + 1);
    }
    drop(order);
    (frontier, LIVE_BYTES.load(Relaxed) - live)
}

/// Runs the same seeded operations on both structures, ours first; every update is newer
/// than anything before it.
fn rows(n: usize, ours: &mut SpanFrontier, naive: &mut Naive, overhead: u64) -> Vec<Row> {
    const UPDATES: usize = 200_000;
    let scans = (20_000_000 / n).clamp(10, 20_000);
    let mut rows = Vec::new();
    let same = |f: &mut dyn Frontier| {
        let mut rng = Rng::new(1);
        measure(UPDATES, 1, overhead, |i, _| {
            let region = rng.index(n);
            report(f, n, region, &region_key(region), (2 * n + i) as Ts);
        })
    };
    let [ours_same] = same(ours);
    let [naive_same] = same(naive);
    rows.push(Row { op: "update, same boundaries", ours: ours_same, naive: naive_same });

    // Batches of random same-boundary updates, one by one through `merge_keys` and through
    // `merge_batch`, alternating, each batch its own regions. Only the merges are timed (the
    // keys are computed before); ns and allocations per update.
    let batches = |f: &mut dyn Frontier| {
        let (mut rng, mut batch) = (Rng::new(4), Batch(Vec::with_capacity(Batch::SIZE)));
        let mut times: [Vec<u64>; 2] = Default::default();
        let mut allocations = [0; 2];
        for i in 0..UPDATES / Batch::SIZE {
            for (k, batched) in [false, true].into_iter().enumerate() {
                batch.fill(&mut rng, n, (2 * n + UPDATES + (2 * i + k) * Batch::SIZE) as Ts);
                let before = ALLOCATIONS.load(Relaxed);
                let start = Instant::now();
                f.merge_many(black_box(&batch), batched);
                times[k].push(start.elapsed().as_nanos() as u64 / Batch::SIZE as u64);
                allocations[k] += ALLOCATIONS.load(Relaxed) - before;
            }
        }
        let count = (UPDATES / Batch::SIZE * Batch::SIZE) as f64;
        let [one, batched] = times;
        [(Samples(one), allocations[0] as f64 / count), (Samples(batched), allocations[1] as f64 / count)]
    };
    let [ours_one, ours_batched] = batches(ours);
    let [naive_one, naive_batched] = batches(naive);
    rows.push(Row { op: "batch of 1024 same-boundary updates, merge_keys each", ours: ours_one, naive: naive_one });
    rows.push(Row { op: "batch of 1024 same-boundary updates, merge_batch", ours: ours_batched, naive: naive_batched });

    // A region's first half reports (its piece splits), then the second half catches up at
    // the same ts (the halves coalesce again), so the piece count stays put.
    let split_then_join = |f: &mut dyn Frontier| {
        let (mut rng, mut region) = (Rng::new(2), 0);
        measure(UPDATES / 2, 1, overhead, |i, step| {
            let ts = (2 * n + 3 * UPDATES + i) as Ts;
            let mut mid = [0x80; 20];
            if step == 0 {
                region = rng.index(n);
            }
            mid[..19].copy_from_slice(&region_key(region));
            match step {
                0 => f.merge(&region_key(region), &mid, ts),
                _ => report(f, n, region, &mid, ts),
            }
        })
    };
    let [ours_split, ours_join] = split_then_join(ours);
    let [naive_split, naive_join] = split_then_join(naive);
    rows.push(Row { op: "update that splits", ours: ours_split, naive: naive_split });
    rows.push(Row { op: "update that coalesces", ours: ours_join, naive: naive_join });

    let min = |f: &dyn Frontier, count, batch| {
        let [result] = measure(count, batch, overhead, |_, _| {
            black_box(f.min_ts());
        });
        result
    };
    rows.push(Row { op: "min", ours: min(&*ours, 20_000, 100), naive: min(&*naive, scans, 1) });
    // The 100 most lagging pieces.
    let threshold = ours.below(Ts::MAX).nth(100).expect("more than 100 pieces").ts;
    let lagging = |f: &dyn Frontier, count| {
        let [result] = measure(count, 1, overhead, |_, _| {
            black_box(f.below_sum(threshold));
        });
        result
    };
    rows.push(Row { op: "lagging (100 of n)", ours: lagging(&*ours, 20_000), naive: lagging(&*naive, scans) });
    assert_eq!(ours.below_sum(threshold), naive.below_sum(threshold));
    assert_eq!(Frontier::min_ts(ours), naive.min_ts());
    rows
}

/// A new owner's first look at `n` regions: each led by one of 20 stores, each store
/// sending its regions in key order at its own ts, 1024 a message, the stores' messages
/// interleaved; merged into a frontier of one span one by one, in one `merge_batch`, and
/// in two (as the ticker merges once 2^19 events are kept). Milliseconds each.
fn snapshot_builds(n: usize) -> Vec<(&'static str, f64)> {
    const STORES: usize = 20;
    let mut rng = Rng::new(9);
    let leaders: Vec<usize> = (0..n).map(|_| rng.index(STORES)).collect();
    let of_store: Vec<Vec<usize>> =
        (0..STORES).map(|store| (0..n).filter(|&region| leaders[region] == store).collect()).collect();
    let mut events = Batch(Vec::with_capacity(n));
    for message in 0..n.div_ceil(1024) {
        for (store, regions) in of_store.iter().enumerate() {
            for &region in regions.iter().skip(message * 1024).take(1024) {
                events.0.push((region_key(region), region_key(region + 1), region + 1 < n, 1000 + store as Ts));
            }
        }
    }
    let items: Vec<(&[u8], &[u8], Ts)> = events.items().collect();
    let time = |merge: &dyn Fn(&mut SpanFrontier)| {
        let mut frontier = SpanFrontier::new(&[KeyRange::full()], 0);
        let start = Instant::now();
        merge(&mut frontier);
        let ms = start.elapsed().as_secs_f64() * 1e3;
        assert_eq!(frontier.min_ts(), Some(0), "the spans before the first region and after the last stay");
        black_box(frontier);
        ms
    };
    vec![
        ("merge_keys each", time(&|f| items.iter().for_each(|&(start, end, ts)| f.merge_keys(start, end, ts)))),
        ("one merge_batch", time(&|f| f.merge_batch(items.iter().copied()))),
        (
            "merge_batch of 2^19, then of the rest",
            time(&|f| {
                let (first, rest) = items.split_at(items.len().min(1 << 19));
                f.merge_batch(first.iter().copied());
                f.merge_batch(rest.iter().copied());
            }),
        ),
    ]
}

fn main() {
    let max: usize = std::env::var("SPANS_BENCH_MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let overhead = timer_overhead();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "timer overhead {overhead} ns (subtracted); random read from 64 MiB {:.0} ns; load average {}",
        memory_latency(),
        load.trim()
    );
    println!();
    println!("| n | op | ours median ns | ours mean ns | baseline median ns | baseline mean ns | speedup (median) | allocs/op ours | allocs/op baseline |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut memory = Vec::new();
    for n in [10_000, 100_000, 1_000_000].into_iter().filter(|&n| n <= max) {
        let (mut ours, ours_bytes) = build(n, || SpanFrontier::new(&[KeyRange::full()], 0));
        let (mut naive, naive_bytes) = build(n, || Naive::full(0));
        let pieces = ours.len();
        for mut row in rows(n, &mut ours, &mut naive, overhead) {
            let (ours_median, naive_median) = (row.ours.0.median(), row.naive.0.median());
            println!(
                "| {n} | {} | {ours_median} | {} | {naive_median} | {} | {:.1}x | {:.3} | {:.3} |",
                row.op,
                row.ours.0.mean(),
                row.naive.0.mean(),
                naive_median as f64 / ours_median.max(1) as f64,
                row.ours.1,
                row.naive.1,
            );
        }
        if n <= 100_000 {
            assert_eq!(Frontier::snapshot(&ours), naive.snapshot(), "ours and the baseline agree");
        }
        memory.push((n, pieces, ours_bytes as f64 / pieces as f64, naive_bytes as f64 / pieces as f64));
    }
    println!();
    println!("| n | build from 20 stores' snapshots | ms |");
    println!("|---|---|---:|");
    for n in [100_000, 1_000_000].into_iter().filter(|&n| n <= max) {
        for (how, ms) in snapshot_builds(n) {
            println!("| {n} | {how} | {ms:.0} |");
        }
    }
    let key = region_key(0).len() as f64;
    println!();
    println!("| n | pieces | key bytes/span | ours bytes/span | ours beyond keys | baseline bytes/span | baseline beyond keys |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (n, pieces, ours, naive) in memory {
        println!("| {n} | {pieces} | {key} | {ours:.1} | {:.1} | {naive:.1} | {:.1} |", ours - key, naive - key);
    }
}
