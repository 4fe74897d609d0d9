//! The advancer daemon: threads around a [`CheckpointAdvancer`].
//!
//! ```text
//! owner thread    lease + election on /tidb/br-stream/owner ─ OwnerEvent ─┐
//! task watcher    MetaStore::begin (list, then watch) ───── TaskEvent ────┤ bounded
//! subscribers     one SubscribeFlushEvent stream per store ─ FlushBatch ──┤ channels
//! handle          update_config / config requests ────────── Request ─────┤
//! ticker          select! { stop, tasks, owner, flushes, tick, requests } ◄┘
//!                 owns the CheckpointAdvancer; rayon fan-out per store
//! status          /metrics and /status from published snapshots
//! ```
//!
//! Embedding: `Daemon::start(config)` returns a [`DaemonHandle`] with `status()`,
//! `update_config()` and `stop()` (which resigns ownership and joins every thread). A host
//! program that wants its own thread drives a [`CheckpointAdvancer`] directly.

mod checkpoint_advancer;
mod memory;
pub mod metrics;
mod owner;
pub(crate) mod status;
#[cfg(test)]
mod tests;
mod ticker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use self::metrics::Metrics;
use self::status::{Handler, Reply, StatusServer};
use crate::advancer::Config;
use crate::cluster::{deadline, ClusterMeta, PdClient, PdConfig, TikvClients, TikvConfig};
use crate::error::{Error, Result};
use crate::etcd::{EtcdClient, EtcdConfig};
use crate::meta::{AdvancerExt, MetaDataClient};
use crate::security::Security;
use crate::types::{KeyRange, RegionId, StoreId, Ts};
use crate::worker::{catch_panic, Interrupt, StopHandle, Worker};

pub use checkpoint_advancer::{CheckpointAdvancer, Env};
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

/// A task as the ticker last published it, with the span holding its checkpoint back.
#[derive(Clone)]
struct PublishedTask {
    view: TaskView,
    slowest: Option<SlowestSpan>,
}

#[derive(Clone)]
struct SlowestSpan {
    range: KeyRange,
    ts: Ts,
}

/// State shared between the ticker (the only writer), the handle and the status server.
struct Shared {
    id: String,
    owner: AtomicBool,
    metrics: Arc<Metrics>,
    tasks: Mutex<Vec<PublishedTask>>,
    /// For the region of each slowest span, looked up when the status is read.
    cluster: Arc<dyn ClusterMeta>,
}

impl Shared {
    fn status(&self) -> DaemonStatus {
        let owner = self.owner.load(Ordering::SeqCst);
        // Copied out first: the lookups must not hold up the ticker's next publish.
        let published = self.tasks.lock().clone();
        // However many tasks, and whatever PD does, a status read is quick.
        let tasks = deadline::within(Some(Instant::now() + REGION_HINT_BUDGET), || {
            published
                .into_iter()
                .map(|PublishedTask { mut view, slowest }| {
                    view.slowest = slowest.map(|s| RegionHint {
                        range: s.range.to_string(),
                        ts: s.ts,
                        region: if owner { self.region_at(&s.range.start) } else { None },
                    });
                    view
                })
                .collect()
        });
        DaemonStatus { id: self.id.clone(), role: if owner { "owner" } else { "standby" }, tasks }
    }

    /// The region holding `key`, for the status page (best effort, one PD call within the
    /// read's budget).
    fn region_at(&self, key: &[u8]) -> Option<RegionView> {
        let mut end = key.to_vec();
        end.push(0);
        let region = self.cluster.region_scan(key, &end, 1).ok()?.into_iter().next()?;
        Some(RegionView { id: region.id, leader_store: region.leader_store, epoch_version: region.epoch_version })
    }
}

pub struct Daemon;

/// What one status read may spend asking PD for the regions of the slowest spans (upstream
/// gives its region hint 1 s).
const REGION_HINT_BUDGET: Duration = Duration::from_secs(1);

/// How long the handle waits for the ticker to take and answer a request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// A running daemon. Dropping it stops it too.
pub struct DaemonHandle {
    shared: Arc<Shared>,
    requests: crossbeam_channel::Sender<ticker::Request>,
    /// Stopped first, so no tick runs while the owner resigns.
    ticker: Option<Worker>,
    /// Stops when the ticker ends, however it ends: its stop handle is the ticker's.
    owner: Option<Worker>,
    status_server: Option<StatusServer>,
    /// Asks the owner loop to resign and campaign again (`POST /owner/resign`).
    resign_requests: crossbeam_channel::Sender<()>,
    /// Set by `crash`: the owner loop leaves without resigning or revoking its lease.
    crashed: Arc<AtomicBool>,
    /// Closed first on shutdown: a tick (or a `/status` request) waiting on PD ends at once.
    pd: Arc<PdClient>,
    /// Fired first on shutdown: the tick in flight waits on no store either.
    tick_interrupt: Interrupt,
}

/// Runs the ticker. However it ends (stopped, or a panic), ownership is given up: `resign`
/// is the owner loop's stop signal, so a standby takes over instead of this daemon staying an
/// owner that never ticks.
fn run_ticker(ticker: ticker::Ticker, resign: Option<StopHandle>) {
    let shared = ticker.shared.clone();
    if let Err(panic) = catch_panic(move || ticker.run()) {
        log::error!("the ticker panicked: {panic}; resigning ownership so that a standby takes over");
    }
    shared.owner.store(false, Ordering::SeqCst);
    drop(resign);
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
        let pd_client = Arc::new(PdClient::new(pd_config, config.security.clone())?);
        if let Err(e) = pd_client.fetch_current_ts() {
            log::warn!("PD is not answering yet, the advancer keeps trying: {e}");
        }
        let pd: Arc<dyn ClusterMeta> = pd_client.clone();
        let tikv_config = TikvConfig { dial_timeout: config.advancer.dial_timeout, ..TikvConfig::default() };
        let clients = Arc::new(TikvClients::new(pd.clone(), config.security.clone(), tikv_config));
        let env = Env {
            cluster: pd.clone(),
            service: clients.clone(),
            kv: clients,
            meta: Arc::new(AdvancerExt::new(MetaDataClient::new(etcd.clone()))),
        };
        let mut advancer = CheckpointAdvancer::with_config(env, config.advancer.clone())?;
        advancer.on_start()?;
        let tick_interrupt = advancer.tick_interrupt();
        let id = config.owner_id.clone().unwrap_or_else(new_owner_id);
        let shared = Arc::new(Shared {
            id: id.clone(),
            owner: AtomicBool::new(false),
            metrics: advancer.metrics().clone(),
            tasks: Mutex::new(Vec::new()),
            cluster: pd,
        });
        let (owner_tx, owner_rx) = crossbeam_channel::bounded(16);
        let (request_tx, request_rx) = crossbeam_channel::bounded(16);
        let (resign_requests, resign_rx) = crossbeam_channel::bounded(1);
        let status_etcd = etcd.clone();

        let (ttl, backoff, take_over) = (config.advancer.owner_ttl, config.advancer.backoff, config.take_over);
        let crashed = Arc::new(AtomicBool::new(false));
        let owner_crashed = crashed.clone();
        let mut owner = Worker::spawn("sh-owner", move |stop| {
            let (resign, crashed) = (resign_rx, owner_crashed);
            owner::OwnerLoop { etcd, id, ttl, backoff, events: owner_tx, resign, take_over, crashed, stop }.run()
        })?;
        let resign = owner.take_stop();
        let published = shared.clone();
        advancer.set_on_task_removed(Box::new(move |name| published.tasks.lock().retain(|t| t.view.name != name)));
        let ticker_shared = shared.clone();
        let ticker = Worker::spawn("sh-ticker", move |stop| {
            let ticker =
                ticker::Ticker { advancer, shared: ticker_shared, owner: owner_rx, requests: request_rx, stop };
            run_ticker(ticker, resign)
        })?;
        let status_server = match &config.status_addr {
            Some(addr) => {
                Some(StatusServer::start(addr, status_handler(shared.clone(), status_etcd, resign_requests.clone()))?)
            }
            None => None,
        };
        log::info!("begin advancer daemon {}", shared.id);
        Ok(DaemonHandle {
            shared,
            requests: request_tx,
            ticker: Some(ticker),
            owner: Some(owner),
            status_server,
            resign_requests,
            crashed,
            pd: pd_client,
            tick_interrupt,
        })
    }
}

fn status_handler(shared: Arc<Shared>, etcd: EtcdClient, resign: crossbeam_channel::Sender<()>) -> Handler {
    let election = crate::etcd::Election::new(etcd, crate::meta::keys::OWNER_PREFIX);
    Arc::new(move |method, path| match path {
        "/metrics" => Reply::get(method, || ("text/plain; version=0.0.4", shared.metrics.render())),
        "/status" => Reply::get(method, || {
            let mut status = serde_json::to_value(shared.status()).unwrap_or_default();
            status["owner"] = owner::owner_view(&election, &shared.id);
            ("application/json", serde_json::to_string_pretty(&status).unwrap_or_default())
        }),
        "/owner/resign" => Reply::post(method, || owner::resign_reply(shared.owner.load(Ordering::SeqCst), &resign)),
        _ => Reply::NotFound,
    })
}

impl DaemonHandle {
    pub fn status(&self) -> DaemonStatus {
        self.shared.status()
    }

    pub fn is_owner(&self) -> bool {
        self.shared.owner.load(Ordering::SeqCst)
    }

    /// The configuration the advancer runs with, asked of the ticker.
    pub fn config(&self) -> Result<Config> {
        self.ask("config", ticker::Request::Config)
    }

    /// Replaces the configuration of the running advancer (for example a higher lag limit
    /// so that a resumed task is not paused again); it applies from the next tick on.
    pub fn update_config(&self, config: Config) -> Result<()> {
        config.validate()?;
        self.ask("update-config", |reply| ticker::Request::UpdateConfig(config, reply))?
    }

    /// Sends a request to the ticker and waits for its answer: at most one tick, whose PD
    /// and TiKV calls end by the tick interval (its etcd writes have their own deadline).
    fn ask<T>(&self, what: &str, request: impl FnOnce(crossbeam_channel::Sender<T>) -> ticker::Request) -> Result<T> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let stopped = || Error::Stopped(format!("the advancer (asked for {what})"));
        self.requests.send_timeout(request(reply), REQUEST_DEADLINE).map_err(|_| stopped())?;
        answer.recv_timeout(REQUEST_DEADLINE).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => Error::Timeout(format!("the advancer answering {what}")),
            crossbeam_channel::RecvTimeoutError::Disconnected => stopped(),
        })
    }

    /// Asks the owner thread to resign and campaign again; false when not the owner.
    pub fn resign_ownership(&self) -> bool {
        matches!(owner::resign_reply(self.is_owner(), &self.resign_requests), Reply::Page { code: 200, .. })
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

    /// Stops the way a killed process does, as far as the cluster can tell: no resignation,
    /// and the lease left to expire, so a standby takes over only after the owner TTL. For
    /// demos and failover tests.
    pub fn crash(mut self) {
        self.crashed.store(true, Ordering::SeqCst);
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(ticker) = self.ticker.take() else { return };
        // Whatever PD and the stores do, no thread waits on them from here on; etcd is all
        // resigning needs.
        self.tick_interrupt.fire();
        self.pd.close();
        self.status_server.take();
        ticker.join();
        // The ticker's end told the owner loop to resign; wait for it.
        if let Some(owner) = self.owner.take() {
            owner.join();
        }
        log::info!("daemon loop exits");
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
