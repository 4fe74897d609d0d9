//! Dropping a simulated cluster ends every thread it started. A binary of its own, so that
//! no other test's threads come and go while the process's threads are counted.

use std::time::{Duration, Instant};

use streamhelper::sim::{SimCluster, SimConfig};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn busy_sim() -> SimCluster {
    let config =
        SimConfig { stores: 3, regions: 64, flush_interval: Some(Duration::from_millis(20)), ..SimConfig::default() };
    let sim = SimCluster::start(config).unwrap();
    // Exercise the reply thread with parked and delayed work before dropping.
    sim.hang_store(1);
    sim.set_store_delay(2, Duration::from_millis(50));
    sim
}

#[test]
fn dropping_the_sim_ends_its_threads() {
    // The first sim also starts gRPC's process-wide completion-queue threads.
    drop(busy_sim());
    let baseline = threads();
    for _ in 0..3 {
        let sim = busy_sim();
        assert!(threads() > baseline, "the sim runs threads of its own");
        drop(sim);
        let deadline = Instant::now() + Duration::from_secs(5);
        while threads() > baseline {
            assert!(Instant::now() < deadline, "{} threads left after drop, {baseline} before", threads());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
