//! `streamhelper demo`: a local etcd, a simulated cluster and an advancer, with faults
//! injected on a schedule, while the uploaded checkpoint is checked against the sim's
//! ground truth every second. Exits non-zero if the checkpoint ever over-claims or regresses.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;

use super::advancer::termination_flag;
use crate::advancer::Config;
use crate::daemon::{Daemon, DaemonConfig};
use crate::error::{Error, Result};
use crate::etcd::{EtcdClient, EtcdProcess};
use crate::meta::{parse_storage_url, AdvancerExt, MetaDataClient, TaskInfo};
use crate::sim::{SimCluster, SimConfig};
use crate::timefmt::{format_duration, parse_duration};
use crate::types::{ts_distance, KeyRange, Ts};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// TiKV stores in the simulated cluster.
    #[arg(long, default_value_t = 3)]
    stores: usize,
    /// Regions in the simulated cluster.
    #[arg(long, default_value_t = 64)]
    regions: usize,
    /// How long to run.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the simulated cluster's randomness.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Serve /metrics and /status here.
    #[arg(long, default_value = "127.0.0.1:0")]
    status_addr: String,
}

/// A fault injected at a moment of the run.
struct Step {
    at: Duration,
    what: &'static str,
    apply: fn(&SimCluster) -> Result<()>,
}

fn schedule() -> Vec<Step> {
    fn first_store(sim: &SimCluster) -> u64 {
        sim.store_ids()[0]
    }
    fn last_store(sim: &SimCluster) -> u64 {
        *sim.store_ids().last().expect("at least one store")
    }
    vec![
        Step {
            at: Duration::from_secs(6),
            what: "split three regions",
            apply: |sim| {
                for region in sim.regions().iter().take(3) {
                    let mut key = region.range.start.clone();
                    key.extend_from_slice(b"\x80split");
                    sim.split(&key)?;
                }
                Ok(())
            },
        },
        Step {
            at: Duration::from_secs(10),
            what: "scatter leaders",
            apply: |sim| {
                sim.scatter();
                Ok(())
            },
        },
        Step {
            at: Duration::from_secs(14),
            what: "hang the first store",
            apply: |sim| {
                sim.hang_store(first_store(sim));
                Ok(())
            },
        },
        Step {
            at: Duration::from_secs(20),
            what: "resume the first store",
            apply: |sim| {
                sim.resume_store(first_store(sim));
                Ok(())
            },
        },
        Step {
            at: Duration::from_secs(24),
            what: "restart the last store on a new address",
            apply: |sim| sim.restart_store(last_store(sim)).map(drop),
        },
        Step {
            at: Duration::from_secs(28),
            what: "turn subscriptions off on the first store",
            apply: |sim| {
                sim.set_subscription_supported(first_store(sim), false);
                Ok(())
            },
        },
        Step {
            at: Duration::from_secs(32),
            what: "merge two regions",
            apply: |sim| {
                let regions = sim.regions();
                sim.merge(regions[4].id, regions[5].id).map(drop)
            },
        },
    ]
}

pub fn run(args: DemoArgs) -> Result<()> {
    let terminate = termination_flag()?;
    let etcd = EtcdProcess::start()?;
    println!("etcd (real, temporary): {}", etcd.endpoint());
    let sim = SimCluster::start(SimConfig {
        stores: args.stores,
        regions: args.regions,
        seed: args.seed,
        flush_interval: Some(Duration::from_secs(1)),
        ..SimConfig::default()
    })?;
    println!("simulated PD: {} with {} stores and {} regions", sim.pd_endpoint(), args.stores, args.regions);

    let meta = MetaDataClient::new(EtcdClient::connect_plain([etcd.endpoint()])?);
    let start_ts = sim.now_ts();
    let task = TaskInfo::new("demo")
        .from_ts(start_ts)
        .to_storage(parse_storage_url("noop://")?)
        .with_table_filter(["*.*"])
        .with_range(KeyRange::full().start, KeyRange::full().end)
        .check()?;
    meta.put_task(&task)?;
    println!("task demo added at ts {start_ts}");

    let advancer = Config {
        tick_interval: Duration::from_secs(1),
        try_advance_threshold: Duration::from_secs(3),
        owner_ttl: Duration::from_secs(5),
        backoff: Duration::from_secs(1),
        rpc_timeout: Duration::from_millis(800),
        dial_timeout: Duration::from_millis(800),
        ..Config::default()
    };
    let daemon = Daemon::start(DaemonConfig {
        etcd_endpoints: vec![etcd.endpoint()],
        advancer,
        status_addr: Some(args.status_addr.clone()),
        ..DaemonConfig::new(vec![sim.pd_endpoint()])
    })?;
    if let Some(addr) = daemon.status_addr() {
        println!("status: http://{addr}/status  metrics: http://{addr}/metrics");
    }

    let ext = AdvancerExt::new(meta);
    let started = Instant::now();
    let mut steps = schedule().into_iter().peekable();
    let mut last: Ts = 0;
    let mut advances = 0;
    let mut violation = None;
    while started.elapsed() < args.duration && !terminate.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(1));
        while let Some(step) = steps.next_if(|s| s.at <= started.elapsed()) {
            println!("  >> {}", step.what);
            if let Err(e) = (step.apply)(&sim) {
                println!("  >> {} failed: {e}", step.what);
            }
        }
        let truth = sim.true_checkpoint(&KeyRange::full());
        let stored = ext.get_global_checkpoint("demo")?;
        if stored > truth {
            violation = Some(format!("uploaded checkpoint {stored} is above the true checkpoint {truth}"));
        } else if stored < last {
            violation = Some(format!("uploaded checkpoint went back from {last} to {stored}"));
        }
        if stored > last {
            advances += 1;
            last = stored;
        }
        let elapsed = started.elapsed().as_secs();
        if stored == 0 {
            println!("t={elapsed:>3}s  no checkpoint uploaded yet  role {}", daemon.status().role);
        } else {
            println!(
                "t={elapsed:>3}s  checkpoint {stored}  lag {:>6}  behind truth {:>6}  role {}",
                format_duration(ts_distance(sim.now_ts(), stored)),
                format_duration(ts_distance(truth, stored)),
                daemon.status().role,
            );
        }
        if let Some(v) = &violation {
            println!("SAFETY VIOLATION: {v}");
            break;
        }
    }
    daemon.stop();
    match violation {
        Some(v) => Err(Error::SafetyViolation(format!("demo failed: {v}"))),
        None => {
            println!("demo finished: the checkpoint advanced {advances} times, never above the truth, never backwards");
            Ok(())
        }
    }
}
