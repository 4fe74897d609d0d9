//! The simulated cluster at scale: build time and memory of a big cluster, and how fast a
//! raw client loop gets answers from the fakes, to show they are not the bottleneck of the
//! advancer benchmarks. Sizes come from `SIM_BENCH_REGIONS` (default 1 000 000) and
//! `SIM_BENCH_STORES` (default 20); CI runs a small smoke size.
//!
//! `cargo bench --bench sim`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rayon::prelude::*;

use grpcio::ClientSStreamReceiver;
use streamhelper::proto::logbackuppb::{SubscribeFlushEventRequest, SubscribeFlushEventResponse};
use streamhelper::proto::logbackuppb_grpc::LogBackupClient;
use streamhelper::sim::{rss_bytes, SimCluster, SimConfig};
use streamhelper::testing::{call_option, last_flush_ts, log_backup_client, pd_client, scan_regions};
use streamhelper::{KeyRange, RegionId, StoreId};

const PAGE: i32 = 2048;
const BATCH: usize = 1024;
const DEADLINE: Duration = Duration::from_secs(120);

fn env_size(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("?".into(), |b| format!("{:.0} MiB", b as f64 / (1 << 20) as f64))
}

fn rate(count: usize, took: Duration) -> String {
    format!("{count} in {took:.2?} = {:.0}/s", count as f64 / took.as_secs_f64())
}

/// The sim's own threads (gRPC server queues, delayed replies, timed flushes).
const SIM_THREADS: &[&str] = &["sim-grpc", "sim-replies", "sim-flusher"];

/// CPU time used so far by this process's threads whose name starts with one of
/// `prefixes` (all threads for `[""]`), from /proc: it tells the fakes' share of a phase.
fn cpu_of_threads(prefixes: &[&str]) -> Duration {
    const TICKS_PER_SECOND: u64 = 100;
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !prefixes.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        ticks += fields.get(11).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        ticks += fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    }
    Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
}

/// Runs a phase and prints its wall time with the CPU the fakes' server threads spent.
fn measure<T>(what: &str, count: impl FnOnce(&T) -> usize, phase: impl FnOnce() -> T) -> T {
    let (sim_before, all_before) = (cpu_of_threads(SIM_THREADS), cpu_of_threads(&[""]));
    let began = Instant::now();
    let result = phase();
    let took = began.elapsed();
    let sim_cpu = cpu_of_threads(SIM_THREADS) - sim_before;
    let all_cpu = cpu_of_threads(&[""]) - all_before;
    println!("{what}: {}; CPU: fakes {sim_cpu:.2?}, whole process {all_cpu:.2?}", rate(count(&result), took));
    result
}

/// Polls every region at its leader, batch by batch; returns how many answered with a
/// checkpoint. `parallel` spreads stores over rayon's threads.
fn poll_leaders(sim: &SimCluster, by_store: &HashMap<StoreId, Vec<(RegionId, u64)>>, parallel: bool) -> usize {
    let poll_store = |(store, regions): (&StoreId, &Vec<(RegionId, u64)>)| {
        let address = sim.store_address(*store);
        let client = log_backup_client(&address).unwrap();
        regions
            .chunks(BATCH)
            .map(|batch| {
                let answers = last_flush_ts(&client, &address, batch, DEADLINE).unwrap();
                answers.iter().filter(|a| !a.has_err()).count()
            })
            .sum::<usize>()
    };
    if parallel {
        by_store.par_iter().map(poll_store).sum()
    } else {
        by_store.iter().map(poll_store).sum()
    }
}

/// Reads a subscription until `want` events arrived.
fn receive(stream: &mut ClientSStreamReceiver<SubscribeFlushEventResponse>, want: usize) -> usize {
    let mut got = 0;
    while got < want {
        got += futures_executor::block_on(stream.next()).unwrap().unwrap().get_events().len();
    }
    got
}

/// Subscribes to every store, takes the snapshots, then flushes once more and returns when
/// every event of that flush arrived.
fn flush_to_subscribers(sim: &SimCluster, by_store: &HashMap<StoreId, Vec<(RegionId, u64)>>) -> usize {
    let mut streams: Vec<(usize, LogBackupClient, ClientSStreamReceiver<SubscribeFlushEventResponse>)> = sim
        .store_ids()
        .into_iter()
        .map(|store| {
            let client = log_backup_client(&sim.store_address(store)).unwrap();
            let stream =
                client.subscribe_flush_event_opt(&SubscribeFlushEventRequest::new(), call_option(DEADLINE)).unwrap();
            (by_store.get(&store).map_or(0, Vec::len), client, stream)
        })
        .collect();
    // Each stream starts with the snapshot of the flush before.
    streams.par_iter_mut().for_each(|(want, _, stream)| {
        receive(stream, *want);
    });
    sim.flush_all();
    streams.par_iter_mut().map(|(want, _, stream)| receive(stream, *want)).sum()
}

fn main() {
    let regions = env_size("SIM_BENCH_REGIONS", 1_000_000);
    let stores = env_size("SIM_BENCH_STORES", 20);
    println!(
        "sim bench: {regions} regions over {stores} stores, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let before = rss_bytes();
    let began = Instant::now();
    let sim = SimCluster::start(SimConfig { stores, regions, seed: 1, ..SimConfig::default() }).unwrap();
    println!("build: {:.2?}, RSS {} (was {})", began.elapsed(), mib(rss_bytes()), mib(before));

    let began = Instant::now();
    sim.flush_all();
    println!("flush round (all stores, truth and flushed sets): {:.2?}, RSS {}", began.elapsed(), mib(rss_bytes()));

    let began = Instant::now();
    let truth = sim.true_checkpoint(&KeyRange::full());
    println!("oracle over the whole key space: {:.2?} (checkpoint {truth})", began.elapsed());

    let pd = pd_client(&sim.pd_endpoint()).unwrap();
    let scanned = measure(&format!("ScanRegions, pages of {PAGE}, regions"), Vec::len, || {
        scan_regions(&pd, &sim.pd_endpoint(), sim.cluster_id(), &KeyRange::full(), PAGE, DEADLINE).unwrap()
    });
    assert_eq!(scanned.len(), sim.region_count());

    let mut by_store: HashMap<StoreId, Vec<(RegionId, u64)>> = HashMap::new();
    for region in &scanned {
        let meta = region.get_region();
        by_store
            .entry(region.get_leader().get_store_id())
            .or_default()
            .push((meta.get_id(), meta.get_region_epoch().get_version()));
    }
    let total = scanned.len();
    drop(scanned);
    for parallel in [false, true] {
        let how = if parallel { "stores in parallel" } else { "one loop" };
        let answered = measure(
            &format!("GetLastFlushTSOfRegion, batches of {BATCH}, {how}, regions"),
            |n| *n,
            || poll_leaders(&sim, &by_store, parallel),
        );
        assert_eq!(answered, total);
    }

    let events =
        measure(&format!("flush to {stores} subscribers, events"), |n| *n, || flush_to_subscribers(&sim, &by_store));
    assert_eq!(events, total);
    println!("RSS at the end: {}", mib(rss_bytes()));
}
