//! The simulated cluster: a fake PD and one fake TiKV per store, speaking the real gRPC
//! protocols on 127.0.0.1 ports, with controls to break them in every way the advancer must
//! survive, and a ground-truth oracle to check it against.
//!
//! Data flow: the region table (`model`) is what PD serves and what flushes walk; each
//! store's last flush (`state::LastFlush`) is what its log-backup service reports; the truth
//! kept in the table (`oracle`) only ever rises, at flushes, so every reported checkpoint is
//! at most the truth of its range.

mod gate;
mod gc;
mod kv;
mod mailbox;
mod model;
mod oracle;
mod pd;
pub(crate) mod probe;
mod server;
mod state;
mod tikv;
mod tso;
mod txn;

mod control;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{RpcStatus, RpcStatusCode};
use parking_lot::Mutex;

use crate::daemon::metrics::escape_label_value;
use crate::daemon::status::{Handler, Reply, StatusServer};
use crate::error::{Error, Result};
use crate::proto::logbackuppb_grpc::create_log_backup;
use crate::proto::pdpb_grpc::create_pd;
use crate::proto::tikvpb_grpc::create_tikv;
use crate::types::{KeyRange, RegionId, StoreId, Ts};
use crate::worker::Worker;

pub use control::{parse_line, Control};
pub use model::{record_key, table_prefix};
pub use state::{Faults, TaskState};
pub use txn::{Outcome, TxnSpec};

/// Region boundaries travel as TiKV stores them: memcomparable-encoded, except that the
/// empty key (−∞ as a start, +∞ as an end) stays empty.
use crate::codec::encode_end_key as encode_boundary;

use gate::ReplyGate;
use kv::KvService;
use model::{Key, RegionMeta, RegionTable};
use pd::PdService;
use server::RunningServer;
use state::SimState;
use tikv::LogBackupService;
use tso::Tso;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub stores: usize,
    pub regions: usize,
    /// Drives region boundaries, replica placement, leaders and `scatter`.
    pub seed: u64,
    /// `None`: stores flush only when told (`flush_all`, `flush_store`, `FlushNow`).
    pub flush_interval: Option<Duration>,
    pub cluster_id: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { stores: 3, regions: 16, seed: 0, flush_interval: None, cluster_id: 6_000_000_000_000_000_001 }
    }
}

/// A region as PD describes it, with raw keys: the same shape the cluster side decodes
/// (public as `cluster::RegionWithLeader`).
pub(crate) use crate::cluster::RegionWithLeader as SimRegion;

fn sim_region(start: &Key, meta: &RegionMeta) -> SimRegion {
    SimRegion {
        id: meta.id,
        range: KeyRange::new(start.to_vec(), meta.end.to_vec()),
        epoch_version: meta.version,
        conf_ver: meta.conf_ver,
        leader_store: meta.leader,
        leader_peer_id: meta.leader.map_or(0, |l| meta.peer_id(l)),
        peer_stores: meta.peers.as_slice().to_vec(),
    }
}

#[derive(Default)]
struct Servers {
    pd: Option<RunningServer>,
    stores: HashMap<StoreId, RunningServer>,
    /// Each store's status HTTP server (`/config`), up and down with its gRPC server.
    status: HashMap<StoreId, StatusServer>,
}

/// A running simulated cluster. Dropping it stops every server and thread it started.
pub struct SimCluster {
    state: Arc<SimState>,
    servers: Mutex<Servers>,
    /// PD keeps its port across `stop_pd`/`start_pd` when it can.
    pd_port: Mutex<u16>,
    flusher: Option<Worker>,
}

impl SimCluster {
    pub fn start(config: SimConfig) -> Result<SimCluster> {
        if config.stores == 0 {
            return Err(Error::Config("the sim needs at least one store".into()));
        }
        let began = Instant::now();
        let tso = Tso::default();
        let start_ts = tso.next();
        let table = RegionTable::build(config.stores, config.regions, config.seed, start_ts);
        let state =
            Arc::new(SimState::new(config.cluster_id, tso, start_ts, table, config.stores, ReplyGate::start()?));
        let mut cluster = SimCluster {
            state: state.clone(),
            servers: Mutex::new(Servers::default()),
            pd_port: Mutex::new(0),
            flusher: None,
        };
        cluster.start_pd()?;
        for id in cluster.store_ids() {
            cluster.serve_store(id)?;
        }
        if let Some(interval) = config.flush_interval {
            for id in cluster.store_ids() {
                cluster.set_store_flush_interval(id, interval);
            }
            cluster.flusher = Some(spawn_flusher(state, interval)?);
        }
        log::info!(
            "sim: {} regions over {} stores ready in {:?}, PD at {}",
            cluster.region_count(),
            config.stores,
            began.elapsed(),
            cluster.pd_endpoint()
        );
        Ok(cluster)
    }

    pub fn pd_endpoint(&self) -> String {
        self.state.pd_address.lock().clone()
    }

    /// Makes PD name `address` (a proxy in front of it) as its client URL, and
    /// [`SimCluster::pd_endpoint`] return it, so that clients following the PD leader stay
    /// behind the proxy; until PD restarts.
    pub fn advertise_pd_at(&self, address: &str) {
        *self.state.pd_address.lock() = address.to_string();
    }

    /// PD's `ScanRegions`/`BatchScanRegions` calls so far and the regions they returned.
    pub fn pd_scans(&self) -> (u64, u64) {
        self.state.pd_scans.read()
    }

    pub fn cluster_id(&self) -> u64 {
        self.state.cluster_id
    }

    pub fn store_ids(&self) -> Vec<StoreId> {
        self.state.stores.iter().map(|s| s.id).collect()
    }

    /// The address PD advertises for `store` (the last one, if it is stopped).
    pub fn store_address(&self, store: StoreId) -> String {
        self.state.store(store).map(|s| s.run.lock().address.clone()).unwrap_or_default()
    }

    pub fn region_count(&self) -> usize {
        self.state.regions.read().len()
    }

    /// Every region, in key order.
    pub fn regions(&self) -> Vec<SimRegion> {
        self.state.regions.read().iter().map(|(start, meta)| sim_region(start, meta)).collect()
    }

    pub fn region(&self, id: RegionId) -> Option<SimRegion> {
        self.state.regions.read().get(id).map(|(start, meta)| sim_region(start, meta))
    }

    pub fn region_at(&self, raw_key: &[u8]) -> SimRegion {
        let table = self.state.regions.read();
        let (start, meta) = table.region_at(raw_key);
        sim_region(start, meta)
    }

    /// A fresh TSO from the sim's clock (the one PD's `Tso` serves).
    pub fn now_ts(&self) -> Ts {
        self.state.tso.next()
    }

    /// The TSO at start: the initial truth of every key.
    pub fn start_ts(&self) -> Ts {
        self.state.start_ts
    }

    /// One flush round on every store that is up and not hung. Waits (up to a second) until
    /// subscribers took the events.
    pub fn flush_all(&self) {
        self.state.flush(&self.store_ids(), true);
    }

    pub fn flush_store(&self, store: StoreId) {
        self.state.flush(&[store], true);
    }

    /// The ts of `store`'s last flush since it (re)started, if any.
    pub fn last_flush_ts(&self, store: StoreId) -> Option<Ts> {
        let last = self.state.store(store)?.last_flush.read().clone();
        (last.ts != 0).then_some(last.ts)
    }

    pub fn split(&self, raw_key: &[u8]) -> Result<(RegionId, RegionId)> {
        self.state.regions.write().split(raw_key)
    }

    pub fn merge(&self, left: RegionId, right: RegionId) -> Result<RegionId> {
        self.state.regions.write().merge(left, right)
    }

    pub fn transfer_leader(&self, region: RegionId, to: StoreId) -> Result<()> {
        self.state.regions.write().transfer_leader(region, to)
    }

    /// Seeded random leader moves: every region gets a random leader among its replicas on
    /// stores that are up.
    pub fn scatter(&self) {
        let up: Vec<bool> = self.state.stores.iter().map(|s| s.run.lock().up).collect();
        self.state.regions.write().scatter(|store| up[store as usize - 1]);
    }

    pub fn remove_leader(&self, region: RegionId) {
        if let Err(e) = self.state.regions.write().remove_leader(region) {
            log::warn!("sim: remove_leader: {e}");
        }
    }

    pub fn set_never_flush(&self, region: RegionId, never: bool) {
        if let Err(e) = self.state.regions.write().set_never_flush(region, never) {
            log::warn!("sim: set_never_flush: {e}");
        }
    }

    /// Kills the store's server: its port refuses connections, streams and calls in flight
    /// fail. PD keeps advertising it (and its leaders) until told otherwise.
    pub fn stop_store(&self, store: StoreId) {
        let Some(store_state) = self.state.store(store) else {
            log::warn!("sim: stop_store: no store {store}");
            return;
        };
        {
            let mut run = store_state.run.lock();
            run.up = false;
            run.incarnation += 1;
        }
        store_state.close_subscribers(None);
        self.state.gate.discard(store);
        let (server, status) = {
            let mut servers = self.servers.lock();
            (servers.stores.remove(&store), servers.status.remove(&store))
        };
        drop(status);
        if let Some(server) = server {
            server.stop();
            log::info!("sim: store {store} stopped");
        }
    }

    /// Every region the store leads elects a leader on another of its replicas that is up,
    /// as Raft does once the store is lost (or PD's evict-leader before a restart); PD
    /// advertises the new leaders at once. Returns how many regions moved.
    pub fn fail_over(&self, store: StoreId) -> Result<usize> {
        self.state.store(store).ok_or_else(|| no_store(store))?;
        let up: Vec<bool> = self.state.stores.iter().map(|s| s.run.lock().up).collect();
        Ok(self.state.regions.write().move_leaders_off(store, |s| up[s as usize - 1]))
    }

    /// Freezes the store like SIGSTOP: connections are accepted, nothing is answered and it
    /// does not flush, until `resume_store` (or a stop or restart).
    pub fn hang_store(&self, store: StoreId) {
        self.state.gate.set_hung(store, true);
    }

    /// Unfreezes a hung store: parked calls are answered from its current state.
    pub fn resume_store(&self, store: StoreId) {
        self.state.gate.set_hung(store, false);
    }

    /// Restarts the store on a new port with a new `start_timestamp`; its flushed set is
    /// empty until its next flush. Returns the new address.
    pub fn restart_store(&self, store: StoreId) -> Result<String> {
        let store_state = self.state.store(store).ok_or_else(|| no_store(store))?;
        self.stop_store(store);
        {
            let mut run = store_state.run.lock();
            run.reboot();
            run.incarnation += 1;
        }
        *store_state.last_flush.write() = Arc::default();
        self.state.gate.set_hung(store, false);
        let address = self.serve_store(store)?;
        log::info!("sim: store {store} restarted at {address}");
        Ok(address)
    }

    /// `false`: new `SubscribeFlushEvent` calls get UNIMPLEMENTED (like a TiKV without the
    /// feature) and open streams end with it. A change counts as a reboot, as in upstream's
    /// fake cluster, so that clients re-subscribe when support comes back.
    pub fn set_subscription_supported(&self, store: StoreId, supported: bool) {
        let Some(store_state) = self.state.store(store) else {
            log::warn!("sim: set_subscription_supported: no store {store}");
            return;
        };
        let changed = {
            let mut run = store_state.run.lock();
            let changed = run.subscription_supported != supported;
            run.subscription_supported = supported;
            if changed {
                run.reboot();
            }
            changed
        };
        if changed && !supported {
            store_state.close_subscribers(Some(tikv::subscription_disabled(store)));
        }
    }

    /// PD's clock jumps `by` ahead (NTP gone wrong): TSOs, and so flushes, jump with it.
    pub fn jump_clock(&self, by: Duration) {
        self.state.tso.jump(by);
    }

    /// A broken store: from now on it reports `ts` (`None`: the truth again) as the
    /// checkpoint of every region it flushed, in answers and in flush events.
    pub fn set_claimed_ts(&self, store: StoreId, ts: Option<Ts>) {
        match self.state.store(store) {
            Some(store_state) => store_state.run.lock().claimed_ts = ts,
            None => log::warn!("sim: set_claimed_ts: no store {store}"),
        }
    }

    /// Makes PD and TiKV misbehave as `faults` says (`Faults::default()`: behave again).
    pub fn set_faults(&self, faults: Faults) {
        *self.state.faults.lock() = faults;
    }

    /// Ends the store's open subscription streams with UNAVAILABLE (an injected reset).
    pub fn reset_subscriptions(&self, store: StoreId) {
        if let Some(store_state) = self.state.store(store) {
            store_state.close_subscribers(Some(RpcStatus::with_message(
                RpcStatusCode::UNAVAILABLE,
                format!("store {store}: injected subscription reset"),
            )));
        }
    }

    /// Every reply of the store waits this long first (zero: none).
    pub fn set_store_delay(&self, store: StoreId, delay: Duration) {
        self.state.gate.set_delay(store, delay);
    }

    pub fn stop_pd(&self) {
        let server = self.servers.lock().pd.take();
        if let Some(server) = server {
            server.stop();
            log::info!("sim: PD stopped");
        }
    }

    /// Starts PD again, on its old port when that is still free.
    pub fn start_pd(&self) -> Result<()> {
        let mut servers = self.servers.lock();
        if servers.pd.is_some() {
            return Ok(());
        }
        let service = || create_pd(PdService { state: self.state.clone() });
        let mut port = self.pd_port.lock();
        let server = match RunningServer::start(vec![service()], *port, "PD") {
            Ok(server) => server,
            Err(e) if *port != 0 => {
                log::warn!("sim: PD cannot get its old port back ({e}); using a new one");
                RunningServer::start(vec![service()], 0, "PD")?
            }
            Err(e) => return Err(e),
        };
        *port = server.port();
        *self.state.pd_address.lock() = format!("127.0.0.1:{}", server.port());
        servers.pd = Some(server);
        Ok(())
    }

    /// Live service GC safe points, by service id (PD's own `gc_worker` aside).
    pub fn gc_safe_points(&self) -> Vec<(String, Ts)> {
        self.state.gc.lock().services(state::unix_now())
    }

    /// Moves the cluster GC safe point: services may no longer go below it.
    pub fn set_gc_safe_point(&self, ts: Ts) {
        self.state.gc.lock().set_gc_safe_point(ts);
    }

    /// Prewrites a transaction (an alive client: its TTL keeps being renewed). Returns its
    /// start ts.
    pub fn begin_txn(&self, spec: &TxnSpec) -> Result<Ts> {
        let mut txns = self.state.txns.lock();
        let start_ts = self.state.tso.next();
        txns.begin(spec, start_ts).map_err(Error::Config)?;
        Ok(start_ts)
    }

    /// The client commits (every key, or only the primary and then dies). Fails as TiKV's
    /// commit would when a resolver rolled the transaction back first. Returns the commit ts.
    pub fn commit_txn(&self, start_ts: Ts, primary_only: bool) -> Result<Ts> {
        let mut txns = self.state.txns.lock();
        let commit_ts = self.state.tso.next();
        txns.commit(start_ts, commit_ts, primary_only).map_err(Error::Config)?;
        Ok(commit_ts)
    }

    pub fn rollback_txn(&self, start_ts: Ts) {
        self.state.txns.lock().rollback(start_ts);
    }

    /// The client dies: its locks stay, with a TTL that now runs out.
    pub fn crash_txn(&self, start_ts: Ts) {
        self.state.txns.lock().crash(start_ts, self.state.tso.next());
    }

    pub fn txn_outcome(&self, start_ts: Ts) -> Option<Outcome> {
        self.state.txns.lock().outcome(start_ts)
    }

    /// Every lock, as `(raw key, start ts)` in key order: the oracle of what blocks flushes.
    pub fn locks(&self) -> Vec<(Vec<u8>, Ts)> {
        self.state.txns.lock().lock_starts().into_iter().map(|(k, ts)| (k.to_vec(), ts)).collect()
    }

    /// Resolutions that contradicted a transaction's fate (a committed or alive one rolled
    /// back, a wrong commit ts). Must stay empty.
    pub fn txn_violations(&self) -> Vec<String> {
        self.state.txns.lock().violations()
    }

    /// An in-memory lock at `ts` on `key` (`None` removes it): `ScanLock` over it answers
    /// "locked" for every max version at or above `ts`.
    pub fn set_memory_lock(&self, key: &[u8], ts: Option<Ts>) {
        self.state.txns.lock().set_memory_lock(key, ts);
    }

    /// What every store's status `/metrics` reports of `task` (`None`: the task is gone).
    pub fn set_task_state(&self, task: &str, state: Option<TaskState>) {
        let mut states = self.state.task_states.lock();
        match state {
            Some(state) => states.insert(task.to_string(), state),
            None => states.remove(task),
        };
    }

    /// Where the store's status HTTP server (`/config`, `/metrics`) listens.
    pub fn store_status_address(&self, store: StoreId) -> String {
        self.state.store(store).map(|s| s.run.lock().status_address.clone()).unwrap_or_default()
    }

    /// What the store's status `/config` reports as `log-backup.max-flush-interval`.
    pub fn set_store_flush_interval(&self, store: StoreId, interval: Duration) {
        if let Some(store_state) = self.state.store(store) {
            store_state.run.lock().max_flush_interval = interval;
        }
    }

    /// The oracle: the lowest ts up to which every key of `range` is truly flushed.
    pub fn true_checkpoint(&self, range: &KeyRange) -> Ts {
        self.state.regions.read().true_checkpoint(range)
    }

    fn serve_store(&self, store: StoreId) -> Result<String> {
        let store_state = self.state.store(store).ok_or_else(|| no_store(store))?;
        let services = vec![
            create_log_backup(LogBackupService { state: self.state.clone(), store }),
            create_tikv(KvService { state: self.state.clone(), store }),
        ];
        let server = RunningServer::start(services, 0, &format!("store {store}"))?;
        let address = format!("127.0.0.1:{}", server.port());
        let status = StatusServer::start("127.0.0.1:0", status_pages(self.state.clone(), store))?;
        {
            let mut run = store_state.run.lock();
            run.address = address.clone();
            run.status_address = status.addr().to_string();
            run.up = true;
        }
        let mut servers = self.servers.lock();
        servers.stores.insert(store, server);
        servers.status.insert(store, status);
        Ok(address)
    }
}

/// TiKV's status pages, reduced to what the advancer reads (`/config`) and what PingCAP's
/// log-backup alerts read (`/metrics`).
fn status_pages(state: Arc<SimState>, store: StoreId) -> Handler {
    Arc::new(move |method: &str, path: &str| match path {
        "/config" => {
            let Some(store) = state.store(store) else { return Reply::NotFound };
            let interval = store.run.lock().max_flush_interval;
            let body = serde_json::json!({ "log-backup": { "max-flush-interval": readable_duration(interval) } });
            Reply::get(method, || ("application/json", body.to_string()))
        }
        "/metrics" => Reply::get(method, || ("text/plain; version=0.0.4", tikv_metrics(&state))),
        _ => Reply::NotFound,
    })
}

fn tikv_metrics(state: &SimState) -> String {
    let mut out = String::from(
        "# HELP tikv_log_backup_task_status The status of tasks: 0 running, 1 paused, 2 error.\n\
         # TYPE tikv_log_backup_task_status gauge\n",
    );
    for (task, task_state) in state.task_states.lock().iter() {
        out += &format!("tikv_log_backup_task_status{{task=\"{}\"}} {}\n", escape_label_value(task), *task_state as u8);
    }
    out += &format!(
        "# HELP tikv_gcworker_autogc_safe_point The GC safe point the store's GC worker uses.\n\
         # TYPE tikv_gcworker_autogc_safe_point gauge\n\
         tikv_gcworker_autogc_safe_point {}\n",
        state.gc.lock().gc_safe_point()
    );
    out
}

/// A duration as TiKV's `ReadableDuration` prints it: `3m`, `1m30s`, `500ms`, `0s`.
fn readable_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    let parts = [(ms / 3_600_000, "h"), (ms / 60_000 % 60, "m"), (ms / 1000 % 60, "s"), (ms % 1000, "ms")];
    let text: String = parts.iter().filter(|(n, _)| *n > 0).map(|(n, unit)| format!("{n}{unit}")).collect();
    if text.is_empty() {
        "0s".into()
    } else {
        text
    }
}

fn no_store(store: StoreId) -> Error {
    Error::Store { store_id: store, address: String::new(), reason: "no such store in the sim".into() }
}

fn spawn_flusher(state: Arc<SimState>, interval: Duration) -> Result<Worker> {
    let stores: Vec<StoreId> = state.stores.iter().map(|s| s.id).collect();
    Worker::spawn("sh-sim-flusher", move |stop| {
        while !stop.sleep(interval) {
            state.flush(&stores, false);
        }
    })
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        if let Some(flusher) = self.flusher.take() {
            flusher.join();
        }
        for store in &self.state.stores {
            store.close_subscribers(None);
        }
        // Parked replies hold sinks and the state: drop them before the servers go.
        self.state.gate.shutdown();
        let servers = std::mem::take(&mut *self.servers.lock());
        drop(servers.status);
        for server in servers.pd.into_iter().chain(servers.stores.into_values()) {
            server.stop();
        }
    }
}

/// The resident memory of this process (`VmRSS`), for the sim's size reports.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
