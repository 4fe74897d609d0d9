//! The advancer's hot paths at scale against the simulated cluster: one full poll of every
//! region (PD scan + per-store fan-out + merge into the frontier), a tick's own work (plan,
//! finish), and the subscription path (a flush of every store until the frontier has it).
//! Sizes: `ADVANCER_BENCH_REGIONS` (default 100 000) and `ADVANCER_BENCH_STORES` (default 20).
//!
//! `cargo bench --bench advancer`

use std::sync::Arc;
use std::time::{Duration, Instant};

use streamhelper::advancer::Advancer;
use streamhelper::cluster::{
    collect_checkpoints, ClusterMeta, CollectorConfig, FlushSubscriber, LogBackupService, PdClient, PdConfig,
    SubscriberConfig, TikvClients, TikvConfig,
};
use streamhelper::proto::brpb::StreamBackupTaskInfo;
use streamhelper::sim::{rss_bytes, SimCluster, SimConfig};
use streamhelper::Config;
use streamhelper::KeyRange;
use streamhelper::Security;

fn env_size(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn row(what: &str, count: usize, took: Duration) {
    println!("| {what} | {count} | {:.1} ms | {:.0} |", took.as_secs_f64() * 1e3, count as f64 / took.as_secs_f64());
}

fn main() {
    let regions = env_size("ADVANCER_BENCH_REGIONS", 100_000);
    let stores = env_size("ADVANCER_BENCH_STORES", 20);
    let sim = SimCluster::start(SimConfig { stores, regions, seed: 1, ..SimConfig::default() }).expect("sim");
    sim.flush_all();
    let flushed = sim.true_checkpoint(&KeyRange::full());

    let pd: Arc<dyn ClusterMeta> = Arc::new(
        PdClient::connect(
            PdConfig { timeout: Duration::from_secs(30), ..PdConfig::new(vec![sim.pd_endpoint()]) },
            Security::insecure(),
        )
        .expect("pd"),
    );
    let service: Arc<dyn LogBackupService> =
        Arc::new(TikvClients::new(pd.clone(), Security::insecure(), TikvConfig::default()));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(8).build().expect("pool");
    let mut info = StreamBackupTaskInfo::new();
    info.set_name("bench".into());
    info.set_start_ts(sim.start_ts());
    let mut advancer = Advancer::new(Config::default());
    advancer.add_task(info, 1, &[KeyRange::full()], false, 0);
    let collector = CollectorConfig { rpc_timeout: Duration::from_secs(60), ..CollectorConfig::default() };

    println!("advancer benchmark: {regions} regions over {stores} stores (RSS {} MiB)", rss_bytes().unwrap_or(0) >> 20);
    println!();
    println!("| step | items | time | items/s |");
    println!("|---|---:|---:|---:|");
    for round in 0..2 {
        let started = Instant::now();
        let result = collect_checkpoints(pd.as_ref(), service.as_ref(), &pool, &[KeyRange::full()], &collector)
            .expect("collect");
        let polled = started.elapsed();
        assert_eq!(result.advanced.len(), regions, "every region answers: {:?}", result.failed.first());
        row(&format!("full poll {round} (scan + fan-out)"), regions, polled);
        let started = Instant::now();
        advancer.on_poll_result("bench", result.advanced.iter().map(|(r, ts)| (r, *ts)));
        row(&format!("merge poll {round} into the frontier"), regions, started.elapsed());
    }
    let started = Instant::now();
    let actions = advancer.finish_tick(sim.now_ts());
    row("finish tick (min, upload decision)", 1, started.elapsed());
    assert!(advancer.status()[0].checkpoint >= flushed, "the poll reached the flushed ts: {actions:?}");
    let started = Instant::now();
    let plans = advancer.plan_polls(sim.now_ts());
    row("plan polls (spans below threshold)", plans.len(), started.elapsed());

    let mut subscriber = FlushSubscriber::new(pd.clone(), service.clone(), SubscriberConfig::default());
    subscriber.update_store_topology().expect("topology");
    // The snapshot every store sends on subscribe; merged as the ticker does, one batch per
    // stream message.
    let now = sim.now_ts();
    let mut received = 0;
    while received < regions {
        let batch = subscriber.events().recv_timeout(Duration::from_secs(60)).expect("snapshot events");
        advancer.on_flushes(batch.iter(), now);
        received += batch.len();
    }
    sim.flush_all();
    let (target, now) = (sim.true_checkpoint(&KeyRange::full()), sim.now_ts());
    let started = Instant::now();
    let mut merged = 0;
    while advancer.status()[0].slowest.as_ref().map_or(true, |(_, ts)| *ts < target) {
        let batch = subscriber.events().recv_timeout(Duration::from_secs(60)).expect("flush events");
        advancer.on_flushes(batch.iter(), now);
        merged += batch.len();
    }
    row("flush of every store → frontier (subscription)", merged, started.elapsed());
    println!();
    println!("RSS at the end: {} MiB", rss_bytes().unwrap_or(0) >> 20);
}
