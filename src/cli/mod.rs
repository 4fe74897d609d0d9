//! The `streamhelper` command line: `task` (BR-style task management), `owner` (who runs
//! the advancer), `advancer` (the daemon in the foreground), `sim` (the simulated cluster)
//! and `demo` (all of it at once).

mod advancer;
#[cfg(feature = "sim")]
mod demo;
mod owner;
#[cfg(feature = "sim")]
mod sim;
mod status;
mod task;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use streamhelper::etcd::{EtcdClient, EtcdConfig};
use streamhelper::{Error, Result};
use streamhelper::{Security, SecurityConfig};

#[derive(Parser, Debug)]
#[command(name = "streamhelper", version, about = "Log-backup (PITR) checkpoint advancer for TiDB/TiKV")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage log-backup tasks, like `br log`.
    Task(task::TaskArgs),
    /// Show or evict the advancer owner candidates (TiDB servers and streamhelper daemons).
    Owner(owner::OwnerArgs),
    /// Run the checkpoint advancer in the foreground (stops on SIGINT/SIGTERM).
    Advancer(advancer::AdvancerArgs),
    #[cfg(feature = "sim")]
    /// Run a simulated TiKV/PD cluster on 127.0.0.1 (with a real etcd unless --etcd).
    Sim(sim::SimArgs),
    #[cfg(feature = "sim")]
    /// The whole thing locally: etcd, a simulated cluster, an advancer and injected faults.
    Demo(demo::DemoArgs),
}

/// Where the cluster is and how to reach it securely. Global, so that they go before or
/// after the verb, as in `br log status --pd ...`.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// PD endpoints (host:port, comma separated). PD serves its etcd on the same ports.
    #[arg(short = 'u', long, value_delimiter = ',', global = true)]
    pub pd: Vec<String>,
    /// etcd endpoints of the metadata store, when not the PD ones.
    #[arg(long, value_delimiter = ',', global = true)]
    pub etcd: Vec<String>,
    /// CA certificate (PEM) for TLS.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for TLS.
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for TLS.
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
}

impl ClusterArgs {
    pub fn security(&self) -> Result<Security> {
        Security::load(&SecurityConfig {
            ca_path: self.ca.clone(),
            cert_path: self.cert.clone(),
            key_path: self.key.clone(),
        })
    }

    /// A PD client, for the commands that need PD itself (GC safe points), not only its etcd.
    pub fn pd_client(&self) -> Result<streamhelper::cluster::PdClient> {
        if self.pd.is_empty() {
            return Err(Error::Config("this command needs PD: give --pd (-u)".into()));
        }
        streamhelper::cluster::PdClient::connect(
            streamhelper::cluster::PdConfig::new(self.pd.clone()),
            self.security()?,
        )
    }

    pub fn etcd_endpoints(&self) -> Vec<String> {
        if self.etcd.is_empty() {
            self.pd.clone()
        } else {
            self.etcd.clone()
        }
    }

    pub fn etcd_client(&self) -> Result<EtcdClient> {
        if self.pd.is_empty() && self.etcd.is_empty() {
            return Err(Error::Config("no cluster given: --pd (-u) or --etcd is required".into()));
        }
        let mut config = EtcdConfig::new(self.etcd_endpoints());
        config.security = self.security()?;
        EtcdClient::new(config)
    }
}

/// Where logs go instead of stderr: the demo's view owns the terminal.
pub fn log_file(cli: &Cli) -> Option<PathBuf> {
    match &cli.command {
        #[cfg(feature = "sim")]
        Command::Demo(args) => Some(args.log_file()),
        _ => None,
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Task(args) => task::run(args),
        Command::Owner(args) => owner::run(args),
        Command::Advancer(args) => advancer::run(args),
        #[cfg(feature = "sim")]
        Command::Sim(args) => sim::run_sim_command(args),
        #[cfg(feature = "sim")]
        Command::Demo(args) => demo::run(args),
    }
}
