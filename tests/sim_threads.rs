//! Dropping a simulated cluster ends every thread it started. A binary of its own, so that
//! no other test's sims come and go while threads are counted.

use std::time::{Duration, Instant};

use streamhelper::sim::{SimCluster, SimConfig};

/// The threads a sim starts itself (gRPC core starts and retires its own helper threads as
/// it pleases, so the process's total is no measure).
const SIM_THREADS: &[&str] = &["sh-sim-replies", "sh-sim-flusher"];

fn sim_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .map(|task| std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string())
        .filter(|name| SIM_THREADS.iter().any(|prefix| name.starts_with(prefix)))
        .collect()
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

/// Waits until the sim threads number `count`; a new thread names itself once it runs.
fn wait_for_sim_threads(count: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim_threads().len() != count {
        assert!(Instant::now() < deadline, "expected {count} sim threads, have {:?}", sim_threads());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn dropping_the_sim_ends_its_threads() {
    for _ in 0..3 {
        let sim = busy_sim();
        wait_for_sim_threads(2); // a reply thread and a flusher
        drop(sim);
        wait_for_sim_threads(0);
    }
}
