//! Embedding the advancer in an ordinary (non-async) program: start it from a config, read
//! its status, raise the lag limit on the fly, stop it (which resigns and joins threads).
//!
//! Runs against a throwaway local etcd and simulated cluster:
//! `cargo run --release --example embed`

use std::time::Duration;

use streamhelper::etcd::{EtcdClient, EtcdProcess};
use streamhelper::meta::{parse_storage_url, MetaDataClient, TaskInfo};
use streamhelper::sim::{SimCluster, SimConfig};
use streamhelper::{Config, Daemon, DaemonConfig};

fn main() -> streamhelper::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let etcd = EtcdProcess::start()?;
    let sim =
        SimCluster::start(SimConfig { flush_interval: Some(Duration::from_millis(500)), ..SimConfig::default() })?;
    let meta = MetaDataClient::new(EtcdClient::connect_plain([etcd.endpoint()])?);
    let task = TaskInfo::new("embedded")
        .from_ts(sim.now_ts())
        .to_storage(parse_storage_url("noop://")?)
        .with_table_filter(["*.*"])
        .with_range(Vec::new(), Vec::new())
        .check()?;
    meta.put_task(&task)?;

    let mut config = DaemonConfig::new(vec![sim.pd_endpoint()]);
    config.etcd_endpoints = vec![etcd.endpoint()];
    config.advancer = Config {
        tick_interval: Duration::from_millis(500),
        try_advance_threshold: Duration::from_secs(1),
        ..Config::default()
    };
    let handle = Daemon::start(config)?;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        let status = handle.status();
        for task in &status.tasks {
            println!(
                "{} ({}): task {} checkpoint {} lag {}s",
                status.id, status.role, task.name, task.checkpoint, task.lag_seconds
            );
        }
    }
    handle.update_config(Config { lag_limit: Duration::from_secs(72 * 3600), ..handle.config()? })?;
    println!("lag limit now {:?}", handle.config()?.lag_limit);
    handle.stop();
    Ok(())
}
