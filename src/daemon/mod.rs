//! The advancer daemon: the design card's threads around the core.
//!
//! ```text
//! owner thread    lease + election on /tidb/br-stream/owner ─ OwnerEvent ─┐
//! task listener   AdvancerExt::begin (list, then watch) ─── TaskEvent ────┤ bounded
//! subscribers     one SubscribeFlushEvent stream per store ─ FlushEvent ──┤ channels
//! ticker          select! { stop, tasks, owner, flushes, tick } ◄─────────┘
//!                 Mutex<Advancer> (never held across I/O), rayon fan-out per store
//! status          /metrics and /status from published snapshots
//! ```
//!
//! Embedding: `Daemon::start(config)` returns a [`DaemonHandle`] with `status()`,
//! `update_config()` and `stop()` (which resigns ownership and joins every thread).

mod owner;
mod ticker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use serde::Serialize;

use crate::advancer::metrics::Metrics;
use crate::advancer::status::{Handler, StatusServer};
use crate::advancer::{Advancer, Config};
use crate::cluster::{ClusterMeta, KvClients, LogBackupService, PdClient, PdConfig, TikvClients, TikvConfig};
use crate::error::{Error, Result};
use crate::etcd::{EtcdClient, EtcdConfig};
use crate::locks::{LockResolver, ResolverSettings};
use crate::meta::{AdvancerExt, MetaDataClient};
use crate::security::Security;
use crate::stop::{stop_pair, StopHandle, StopToken};
use crate::storage::CheckpointCopier;
use crate::types::{RegionId, StoreId, Ts};

pub use owner::{is_our_owner_id, new_owner_id, random_uuid};

/// Everything the daemon needs to run.
#[derive(Clone)]
pub struct DaemonConfig {
    pub pd_endpoints: Vec<String>,
    /// The metadata store; PD's own etcd when empty.
    pub etcd_endpoints: Vec<String>,
    pub security: Security,
    pub advancer: Config,
    /// `host:port` for `/metrics` and `/status`.
    pub status_addr: Option<String>,
    /// Written under the owner key; a fresh UUID when `None`.
    pub owner_id: Option<String>,
    /// Evict older owner candidates (TiDB's included) until this daemon leads.
    pub take_over: bool,
}

impl DaemonConfig {
    pub fn new(pd_endpoints: Vec<String>) -> Self {
        DaemonConfig {
            pd_endpoints,
            etcd_endpoints: Vec::new(),
            security: Security::insecure(),
            advancer: Config::default(),
            status_addr: None,
            owner_id: None,
            take_over: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RegionView {
    pub id: RegionId,
    pub leader_store: Option<StoreId>,
    pub epoch_version: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RegionHint {
    pub range: String,
    pub ts: Ts,
    pub region: Option<RegionView>,
}

/// One task as `/status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskView {
    pub name: String,
    pub checkpoint: Ts,
    pub checkpoint_time: String,
    pub uploaded: Option<Ts>,
    pub lag_seconds: u64,
    pub paused: bool,
    /// The span holding the checkpoint back and the region it starts in.
    pub slowest: Option<RegionHint>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DaemonStatus {
    pub id: String,
    pub role: &'static str,
    pub tasks: Vec<TaskView>,
}

/// State shared between the ticker, the handle and the status server.
pub struct Shared {
    pub advancer: Mutex<Advancer>,
    pub owner: AtomicBool,
    pub metrics: Metrics,
    pub tasks: Mutex<Vec<TaskView>>,
    pub id: String,
}

impl Shared {
    fn status(&self) -> DaemonStatus {
        DaemonStatus {
            id: self.id.clone(),
            role: if self.owner.load(Ordering::SeqCst) { "owner" } else { "standby" },
            tasks: self.tasks.lock().clone(),
        }
    }
}

pub struct Daemon;

/// Threads stopped and joined together.
struct Stage {
    stop: StopHandle,
    threads: Vec<JoinHandle<()>>,
}

/// A running daemon. Dropping it stops it too.
pub struct DaemonHandle {
    shared: Arc<Shared>,
    /// Stopped in order: the ticker and listener first, so no tick runs while the owner
    /// thread resigns; then the owner thread.
    stages: Vec<Stage>,
    status_server: Option<StatusServer>,
    resign: crossbeam_channel::Sender<()>,
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| Error::Io { what: format!("spawning the {name} thread"), source })
}

impl Daemon {
    /// Connects to PD and etcd, then starts the threads. Returns once they run; ownership
    /// and task listing happen in the background.
    pub fn start(config: DaemonConfig) -> Result<DaemonHandle> {
        config.advancer.validate()?;
        if config.pd_endpoints.is_empty() {
            return Err(Error::Config("at least one PD endpoint is required (--pd)".into()));
        }
        let etcd_endpoints =
            if config.etcd_endpoints.is_empty() { config.pd_endpoints.clone() } else { config.etcd_endpoints.clone() };
        let mut etcd_config = EtcdConfig::new(etcd_endpoints);
        etcd_config.security = config.security.clone();
        etcd_config.request_timeout = config.advancer.rpc_timeout;
        let etcd = EtcdClient::new(etcd_config)?;
        let mut pd_config = PdConfig::new(config.pd_endpoints.clone());
        pd_config.timeout = config.advancer.rpc_timeout;
        // PD may be briefly away (a rolling restart): every call finds the leader again, so
        // only bad addresses stop the start-up.
        let pd = PdClient::new(pd_config, config.security.clone())?;
        if let Err(e) = pd.fetch_current_ts() {
            log::warn!("PD is not answering yet, the advancer keeps trying: {e}");
        }
        let pd: Arc<dyn ClusterMeta> = Arc::new(pd);
        let tikv_config = TikvConfig { dial_timeout: config.advancer.dial_timeout, ..TikvConfig::default() };
        let clients = Arc::new(TikvClients::new(pd.clone(), config.security.clone(), tikv_config));
        let service: Arc<dyn LogBackupService> = clients.clone();
        let kv: Arc<dyn KvClients> = clients;
        let ext = AdvancerExt::new(MetaDataClient::new(etcd.clone()));
        let id = config.owner_id.clone().unwrap_or_else(new_owner_id);
        let shared = Arc::new(Shared {
            advancer: Mutex::new(Advancer::new(config.advancer.clone())),
            owner: AtomicBool::new(false),
            metrics: Metrics::default(),
            tasks: Mutex::new(Vec::new()),
            id: id.clone(),
        });
        let (work_stop_handle, stop) = stop_pair();
        let (owner_stop_handle, owner_stop) = stop_pair();
        let (task_tx, task_rx) = crossbeam_channel::bounded(1024);
        let (owner_tx, owner_rx) = crossbeam_channel::bounded(16);
        let (resign, resign_rx) = crossbeam_channel::bounded(1);

        let mut work = Vec::new();
        let listener = {
            let (ext, stop, backoff) = (ext.clone(), stop.clone(), config.advancer.backoff);
            spawn("task-listener", move || listen_tasks(ext, task_tx, backoff, stop))?
        };
        work.push(listener);
        let owner = owner::OwnerLoop {
            etcd: etcd.clone(),
            id,
            ttl: config.advancer.owner_ttl,
            backoff: config.advancer.backoff,
            events: owner_tx,
            resign: resign_rx,
            take_over: config.take_over,
            stop: owner_stop,
        };
        let owner_thread = spawn("owner", move || owner.run())?;
        let resolver_settings =
            ResolverSettings { rpc_timeout: config.advancer.rpc_timeout, ..ResolverSettings::default() };
        let storage = {
            let shared = shared.clone();
            CheckpointCopier::start(move |task, outcome| outcome.record(&shared.metrics, task))?
        };
        let ticker = ticker::Ticker {
            shared: shared.clone(),
            locks: LockResolver::start(pd.clone(), kv, resolver_settings)?,
            meta: pd,
            service,
            ext,
            pool: ticker::fan_out_pool(),
            tasks: task_rx,
            owner: owner_rx,
            stop,
            leadership: None,
            subscriber: None,
            storage,
            last_tso: None,
            future_stores: Default::default(),
        };
        work.push(spawn("ticker", move || ticker.run())?);
        let status_server = match &config.status_addr {
            Some(addr) => Some(StatusServer::start(addr, status_handler(shared.clone(), etcd, resign.clone()))?),
            None => None,
        };
        log::info!("begin advancer daemon {}", shared.id);
        let stages = vec![
            Stage { stop: work_stop_handle, threads: work },
            Stage { stop: owner_stop_handle, threads: vec![owner_thread] },
        ];
        Ok(DaemonHandle { shared, stages, status_server, resign })
    }
}

/// Lists and follows tasks, retrying the first listing with backoff until it works.
fn listen_tasks(
    ext: AdvancerExt,
    events: crossbeam_channel::Sender<crate::meta::TaskEvent>,
    backoff: std::time::Duration,
    stop: StopToken,
) {
    loop {
        match ext.begin(events.clone(), backoff) {
            Ok(watcher) => {
                let _ = stop.receiver().recv();
                drop(watcher);
                return;
            }
            Err(e) => {
                log::warn!("failed to begin listening, retrying in {backoff:?}: {e}");
                if stop.sleep(backoff) {
                    return;
                }
            }
        }
    }
}

fn status_handler(shared: Arc<Shared>, etcd: EtcdClient, resign: crossbeam_channel::Sender<()>) -> Handler {
    let election = crate::etcd::Election::new(etcd, crate::meta::keys::OWNER_PREFIX);
    Arc::new(move |method, path| match (method, path) {
        ("GET", "/metrics") => Some((200, "text/plain; version=0.0.4", shared.metrics.render())),
        ("GET", "/status") => {
            let mut status = serde_json::to_value(shared.status()).unwrap_or_default();
            status["owner"] = owner::owner_view(&election, &shared.id);
            Some((200, "application/json", serde_json::to_string_pretty(&status).unwrap_or_default()))
        }
        ("POST", "/owner/resign") => Some(owner::resign_reply(shared.owner.load(Ordering::SeqCst), &resign)),
        (_, "/metrics" | "/status" | "/owner/resign") => Some((405, "text/plain", format!("{method} {path}?\n"))),
        _ => None,
    })
}

impl DaemonHandle {
    pub fn status(&self) -> DaemonStatus {
        self.shared.status()
    }

    pub fn is_owner(&self) -> bool {
        self.shared.owner.load(Ordering::SeqCst)
    }

    pub fn config(&self) -> Config {
        self.shared.advancer.lock().config().clone()
    }

    /// Replaces the configuration of the running advancer (for example a higher lag limit
    /// so that a resumed task is not paused again).
    pub fn update_config(&self, config: Config) -> Result<()> {
        config.validate()?;
        self.shared.advancer.lock().update_config(config);
        Ok(())
    }

    /// Asks the owner thread to resign and campaign again; false when not the owner.
    pub fn resign_ownership(&self) -> bool {
        owner::resign_reply(self.is_owner(), &self.resign).0 == 200
    }

    pub fn status_addr(&self) -> Option<std::net::SocketAddr> {
        self.status_server.as_ref().map(StatusServer::addr)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Resigns ownership (a standby takes over at once) and joins every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.stages.is_empty() {
            return;
        }
        self.status_server.take();
        for stage in self.stages.drain(..) {
            stage.stop.stop();
            for thread in stage.threads {
                let name = thread.thread().name().unwrap_or("?").to_string();
                if thread.join().is_err() {
                    log::error!("daemon thread {name} panicked");
                }
            }
        }
        log::info!("daemon loop exits");
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
