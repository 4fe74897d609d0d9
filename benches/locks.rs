//! One lock-resolution round at scale against the simulated cluster: a crashed transaction
//! in 1 % of the regions, the frontier polled as the ticker would, the targets taken from it
//! as the resolver takes them, then one round. Prints the RPCs sent, the time, and the share
//! of regions scanned (which must be the lagging ones only).
//! Sizes: `LOCKS_BENCH_REGIONS` (default 100 000), `LOCKS_BENCH_STORES` (default 20),
//! `LOCKS_BENCH_LAGGING_PERCENT` (default 1).
//!
//! `cargo bench --bench locks`

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use streamhelper::advancer::Advancer;
use streamhelper::cluster::{collect_checkpoints, ClusterMeta, CollectorConfig, KvClients};
use streamhelper::locks::{run_round, target_bound, RoundEnv, RoundRequest, ROUND_REGIONS};
use streamhelper::proto::brpb::StreamBackupTaskInfo;
use streamhelper::sim::{Outcome, SimCluster, SimConfig, TxnSpec};
use streamhelper::Config;
use streamhelper::KeyRange;
use streamhelper::StopToken;
use support::InterceptedPd;

fn env_size(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let regions = env_size("LOCKS_BENCH_REGIONS", 100_000);
    let stores = env_size("LOCKS_BENCH_STORES", 20);
    let percent = env_size("LOCKS_BENCH_LAGGING_PERCENT", 1).max(1);
    let interval = Duration::from_millis(500);
    let sim = SimCluster::start(SimConfig { stores, regions, seed: 3, ..SimConfig::default() }).expect("sim");
    let (pd, clients) = support::connect_clients(&sim);

    // One crashed transaction per lagging region, every (100 / percent)-th region.
    let all = sim.regions();
    let mut txns = Vec::new();
    for region in all.iter().step_by(100 / percent) {
        let key = [region.range.start.as_slice(), b"_crashed"].concat();
        let spec = TxnSpec { ttl: Duration::from_millis(10), ..TxnSpec::new(vec![key]) };
        let txn = sim.begin_txn(&spec).expect("begin");
        sim.crash_txn(txn);
        txns.push(txn);
    }
    std::thread::sleep(interval);
    sim.flush_all();

    // The frontier as the ticker builds it: one full poll.
    let mut info = StreamBackupTaskInfo::new();
    info.set_name("bench".into());
    info.set_start_ts(sim.start_ts());
    let mut core = Advancer::new(Config { resolve_lock_interval: interval, ..Config::default() });
    core.add_task(info, 1, &[KeyRange::full()], false, 0);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(8).build().expect("pool");
    let collector = CollectorConfig { rpc_timeout: Duration::from_secs(60), ..CollectorConfig::default() };
    let polled =
        collect_checkpoints(pd.as_ref(), clients.as_ref(), &pool, &[KeyRange::full()], &collector).expect("poll");
    core.on_poll_result("bench", polled.advanced.iter().map(|(r, ts)| (r, *ts)));
    core.finish_tick(sim.now_ts());
    let checkpoint = core.status()[0].checkpoint;
    let now = sim.now_ts();
    let started = Instant::now();
    let targets = core.oldest_spans("bench", target_bound(checkpoint, interval, now), ROUND_REGIONS);
    let planned = started.elapsed();

    let stop = StopToken::never();
    let deadline = Instant::now() + Duration::from_secs(120);
    let scans = AtomicUsize::new(0);
    let counting = InterceptedPd {
        pd: pd.clone(),
        intercept: |_: &[u8], _: &[u8], _| {
            scans.fetch_add(1, Ordering::Relaxed);
            None
        },
    };
    let env = RoundEnv::new(
        &counting as &dyn ClusterMeta,
        clients.as_ref() as &dyn KvClients,
        Duration::from_secs(30),
        deadline,
        &stop,
    );
    let request = RoundRequest::new(vec!["bench".into()], targets.clone(), deadline);
    let report = run_round(&env, &pool, &request);

    let rolled_back = txns.iter().filter(|t| sim.txn_outcome(**t) == Some(Outcome::RolledBack)).count();
    println!("lock resolution benchmark: {regions} regions over {stores} stores, {} lagging ({percent} %)", txns.len());
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| target pieces from the frontier | {} (planned in {:.2} ms) |",
        targets.len(),
        planned.as_secs_f64() * 1e3
    );
    println!("| regions scanned | {} |", report.regions_scanned);
    println!("| share of regions scanned | {:.2} % |", report.regions_scanned as f64 * 100.0 / regions as f64);
    println!("| locks found | {} |", report.locks_found);
    println!("| transactions rolled back | {rolled_back} |");
    println!("| TiKV RPCs (ScanLock + CheckTxnStatus + ResolveLock) | {} |", report.rpcs);
    println!("| RPCs per lagging region | {:.2} |", report.rpcs as f64 / txns.len() as f64);
    println!("| PD region scans (locating) | {} |", scans.load(Ordering::Relaxed));
    println!("| round time | {:.1} ms |", report.elapsed.as_secs_f64() * 1e3);
    println!("| errors | {} |", report.errors.len());
    assert!(report.errors.is_empty(), "{:?}", report.errors.first());
    assert_eq!(report.regions_scanned, txns.len(), "only the lagging regions are scanned");
    assert_eq!(rolled_back, txns.len());
    assert!(sim.txn_violations().is_empty(), "{:?}", sim.txn_violations());
}
