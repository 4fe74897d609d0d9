//! Bytes per cached region and the cost of filling and reading the region cache, against the
//! map it replaced (whole `RegionWithLeader` values by a copy of their start key), at 10^6
//! regions with TiDB's 19-byte record keys, filled in PD's pages of 2048 as a cold start
//! does. Prints a markdown table.
//!
//! `cargo bench --bench region_cache`; `REGION_CACHE_BENCH_REGIONS` sets the size.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use streamhelper::cluster::{RegionCache, RegionWithLeader};
use streamhelper::KeyRange;

#[path = "common/counting.rs"]
mod counting;
use counting::{Counting, LIVE_BYTES, LIVE_CHUNK_BYTES};

#[global_allocator]
static GLOBAL: Counting = Counting;

const PAGE: usize = 2048;

/// `t{table}_r{row}` as TiDB encodes a record key: 19 bytes.
fn record_key(i: u64) -> Vec<u8> {
    let mut key = b"t".to_vec();
    key.extend_from_slice(&((1u64 << 63) | (i / 10_000)).to_be_bytes());
    key.extend_from_slice(b"_r");
    key.extend_from_slice(&((1u64 << 63) | ((i % 10_000) * 1_000)).to_be_bytes());
    key
}

/// PD's answer in pages: regions tiling the key space, each with three peers.
fn pages(regions: usize) -> Vec<Vec<RegionWithLeader>> {
    let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
    keys.extend((1..regions as u64).map(record_key));
    keys.push(Vec::new());
    let all: Vec<RegionWithLeader> = keys
        .windows(2)
        .enumerate()
        .map(|(i, w)| RegionWithLeader {
            id: i as u64 + 2,
            range: KeyRange::new(w[0].clone(), w[1].clone()),
            epoch_version: 20,
            conf_ver: 5,
            leader_store: Some(i as u64 % 20 + 1),
            leader_peer_id: i as u64 * 3 + 100,
            peer_stores: vec![i as u64 % 20 + 1, (i as u64 + 1) % 20 + 1, (i as u64 + 2) % 20 + 1],
        })
        .collect();
    all.chunks(PAGE).map(<[RegionWithLeader]>::to_vec).collect()
}

struct Row {
    name: &'static str,
    bytes: usize,
    chunk_bytes: usize,
    fill: Duration,
    cover: Duration,
}

/// Fills a structure page by page and reads every region back, measuring what it keeps.
fn measure<T>(
    name: &'static str,
    pages: &[Vec<RegionWithLeader>],
    fill: impl Fn(&mut T, &[RegionWithLeader]),
    read: impl Fn(&T) -> usize,
    empty: impl Fn() -> T,
) -> Row {
    let (bytes, chunks) = (LIVE_BYTES.load(Relaxed), LIVE_CHUNK_BYTES.load(Relaxed));
    let started = Instant::now();
    let mut cache = empty();
    for page in pages {
        fill(&mut cache, page);
    }
    let fill_time = started.elapsed();
    let (bytes, chunk_bytes) = (LIVE_BYTES.load(Relaxed) - bytes, LIVE_CHUNK_BYTES.load(Relaxed) - chunks);
    let started = Instant::now();
    let regions = black_box(read(&cache));
    let cover = started.elapsed();
    assert_eq!(regions, pages.iter().map(Vec::len).sum::<usize>(), "{name} holds every region");
    drop(cache);
    Row { name, bytes, chunk_bytes, fill: fill_time, cover }
}

fn main() {
    let regions: usize =
        std::env::var("REGION_CACHE_BENCH_REGIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let pages = pages(regions);
    let rows = [
        measure(
            "whole regions by start key (before)",
            &pages,
            |map: &mut BTreeMap<Vec<u8>, RegionWithLeader>, page| {
                for region in page {
                    map.insert(region.range.start.clone(), region.clone());
                }
            },
            |map| map.values().cloned().collect::<Vec<_>>().len(),
            BTreeMap::new,
        ),
        measure(
            "RegionCache",
            &pages,
            RegionCache::insert,
            |cache| cache.cover(&KeyRange::full()).0.len(),
            RegionCache::default,
        ),
    ];
    println!("\n{regions} regions, 19-byte keys, filled in pages of {PAGE}:\n");
    println!("| structure | bytes/region asked | bytes/region in glibc chunks | MiB at this size | fill | read all |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} ms | {:.0} ms |",
            row.name,
            row.bytes as f64 / regions as f64,
            row.chunk_bytes as f64 / regions as f64,
            row.chunk_bytes as f64 / (1 << 20) as f64,
            row.fill.as_secs_f64() * 1e3,
            row.cover.as_secs_f64() * 1e3
        );
    }
}
