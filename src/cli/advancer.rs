//! `streamhelper advancer`: the daemon in the foreground until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::ClusterArgs;
use crate::advancer::Config;
use crate::daemon::{Daemon, DaemonConfig, DaemonHandle};
use crate::error::{Error, Result};

#[derive(Args, Debug)]
pub struct AdvancerArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    tuning: TuningArgs,
    /// Serve /metrics and /status on this address.
    #[arg(long)]
    status_addr: Option<String>,
}

/// Advancer options, as flags or `name = value` lines in `--config FILE` (flags win).
#[derive(Args, Debug, Default)]
pub struct TuningArgs {
    /// A config file of `name = value` lines (TOML subset), e.g. `tick-interval = "12s"`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How often to tick (default 12s).
    #[arg(long)]
    tick_interval: Option<String>,
    /// Poll spans older than this (default 4m).
    #[arg(long)]
    try_advance_threshold: Option<String>,
    /// Pause a task lagging more than this; 0 disables (default 48h).
    #[arg(long)]
    check_point_lag_limit: Option<String>,
    /// Wait before retrying a failed listener or subscription (default 5s).
    #[arg(long)]
    backoff_time: Option<String>,
    /// TTL of the owner lease (default 60s).
    #[arg(long)]
    owner_ttl: Option<String>,
    /// Deadline for dialing a TiKV store (default 8s).
    #[arg(long)]
    dial_timeout: Option<String>,
    /// Deadline of one RPC (default 10s).
    #[arg(long)]
    rpc_timeout: Option<String>,
}

impl TuningArgs {
    pub fn config(&self) -> Result<Config> {
        let mut config = Config::default();
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .map_err(|source| Error::Io { what: format!("reading config file {}", path.display()), source })?;
            config.apply_file_text(&text, &path.display().to_string())?;
        }
        let flags = [
            ("tick-interval", &self.tick_interval),
            ("try-advance-threshold", &self.try_advance_threshold),
            ("check-point-lag-limit", &self.check_point_lag_limit),
            ("backoff-time", &self.backoff_time),
            ("owner-ttl", &self.owner_ttl),
            ("dial-timeout", &self.dial_timeout),
            ("rpc-timeout", &self.rpc_timeout),
        ];
        for (name, value) in flags {
            if let Some(value) = value {
                config.set(name, value).map_err(|e| Error::Config(format!("--{name}: {e}")))?;
            }
        }
        Ok(config)
    }
}

/// SIGINT/SIGTERM as a flag the foreground loops poll.
pub fn termination_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, flag.clone())
            .map_err(|source| Error::Io { what: format!("installing the handler of signal {signal}"), source })?;
    }
    Ok(flag)
}

/// Waits for a signal, then stops the daemon (resigning ownership, joining threads).
pub fn run_until_signal(handle: DaemonHandle, terminate: &AtomicBool) {
    while !terminate.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    log::info!("signal received: resigning and stopping");
    handle.stop();
}

pub fn run(args: AdvancerArgs) -> Result<()> {
    let terminate = termination_flag()?;
    let config = DaemonConfig {
        pd_endpoints: if args.cluster.pd.is_empty() { args.cluster.etcd.clone() } else { args.cluster.pd.clone() },
        etcd_endpoints: args.cluster.etcd.clone(),
        security: args.cluster.security()?,
        advancer: args.tuning.config()?,
        status_addr: args.status_addr.clone(),
        owner_id: None,
    };
    let handle = Daemon::start(config)?;
    if let Some(addr) = handle.status_addr() {
        println!("status: http://{addr}/status  metrics: http://{addr}/metrics");
    }
    run_until_signal(handle, &terminate);
    Ok(())
}
