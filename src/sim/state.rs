//! Everything the fake servers read and the controls change, shared by the PD service,
//! every store's service and the `SimCluster` handle. Services hold no state of their own.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use grpcio::RpcStatus;
use parking_lot::{Mutex, RwLock};

use crate::types::{RegionId, StoreId, Ts};

use super::gate::ReplyGate;
use super::gc::GcSafePoints;
use super::mailbox::Outbox;
use super::model::{FlushedRegion, RegionTable};
use super::tikv::{flush_events, Push};
use super::tso::Tso;
use super::txn::TxnTable;

/// TiKV's default `log-backup.max-flush-interval`.
pub const DEFAULT_MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(180);

/// How long `flush_all` waits for subscribers to take a flush's events.
const DELIVERY_WAIT: Duration = Duration::from_secs(1);

/// A store's last completed flush: TiKV answers checkpoints from this map, which each flush
/// replaces wholesale (tikv `components/backup-stream/src/checkpoint_manager.rs`).
#[derive(Debug, Default)]
pub struct LastFlush {
    pub ts: Ts,
    /// Sorted by region id.
    pub regions: Vec<FlushedRegion>,
}

impl LastFlush {
    pub fn find(&self, region: RegionId) -> Option<&FlushedRegion> {
        self.regions.binary_search_by_key(&region, |r| r.id).ok().map(|i| &self.regions[i])
    }
}

/// The process-level facts of a store, as PD advertises them.
#[derive(Debug, Clone)]
pub struct StoreRun {
    pub address: String,
    /// Where its status HTTP server (`/config`) listens.
    pub status_address: String,
    /// Unix seconds; a change tells clients the store restarted (re-subscribe).
    pub start_timestamp: i64,
    /// The server is up (not stopped).
    pub up: bool,
    pub subscription_supported: bool,
    /// `log-backup.max-flush-interval` as the store's status `/config` reports it.
    pub max_flush_interval: Duration,
    /// Bumped by every stop and restart, so that a flush racing with one does not publish
    /// a map into the new incarnation.
    pub incarnation: u64,
    /// A broken store: reports this checkpoint for every region it flushed, in answers and
    /// flush events alike, whatever the truth.
    pub claimed_ts: Option<Ts>,
}

impl StoreRun {
    /// The store came back as a new process: clients must notice (TiDB re-subscribes when
    /// `start_timestamp` changes), even within the same second.
    pub fn reboot(&mut self) {
        self.start_timestamp = (self.start_timestamp + 1).max(unix_now());
    }
}

pub struct StoreState {
    pub id: StoreId,
    pub run: Mutex<StoreRun>,
    pub last_flush: RwLock<Arc<LastFlush>>,
    pub subscribers: Mutex<Vec<Outbox<Push>>>,
}

impl StoreState {
    fn new(id: StoreId) -> StoreState {
        StoreState {
            id,
            run: Mutex::new(StoreRun {
                address: String::new(),
                status_address: String::new(),
                start_timestamp: unix_now(),
                up: false,
                subscription_supported: true,
                max_flush_interval: DEFAULT_MAX_FLUSH_INTERVAL,
                incarnation: 0,
                claimed_ts: None,
            }),
            last_flush: RwLock::new(Arc::default()),
            subscribers: Mutex::new(Vec::new()),
        }
    }

    /// The last flush as the store reports it: the truth unless it claims another ts.
    pub fn reported_flush(&self) -> Arc<LastFlush> {
        let last = self.last_flush.read().clone();
        match self.run.lock().claimed_ts {
            Some(ts) => {
                let regions = last.regions.iter().map(|r| FlushedRegion { checkpoint: ts, ..r.clone() }).collect();
                Arc::new(LastFlush { ts, regions })
            }
            None => last,
        }
    }

    /// Sends the current flushed set to every subscriber (TiKV queues a new subscriber's
    /// snapshot as a broadcast too). Returns the subscribers that were sent to.
    pub fn broadcast(&self) -> Vec<Outbox<Push>> {
        let last = self.reported_flush();
        let mut subscribers = self.subscribers.lock();
        subscribers.retain(|s| !s.is_closed());
        if last.regions.is_empty() || subscribers.is_empty() {
            return Vec::new();
        }
        let messages: Vec<Push> = flush_events(&last).into_iter().map(Push::Events).collect();
        for subscriber in subscribers.iter() {
            if !subscriber.push_all(messages.clone()) {
                log::warn!("store {}: a subscriber's queue is full, flush events at ts {} dropped", self.id, last.ts);
            }
        }
        subscribers.clone()
    }

    /// Ends every subscription, with `status` or, when `None`, as a store going away.
    pub fn close_subscribers(&self, status: Option<RpcStatus>) {
        let subscribers = std::mem::take(&mut *self.subscribers.lock());
        if let Some(status) = status {
            for subscriber in &subscribers {
                subscriber.push_all(vec![Push::Fail(status.clone())]);
            }
        }
    }
}

pub struct SimState {
    pub cluster_id: u64,
    pub start_ts: Ts,
    pub tso: Tso,
    pub regions: RwLock<RegionTable>,
    /// Index `id - 1`: stores are never added or removed, only stopped and restarted.
    pub stores: Vec<StoreState>,
    pub gate: ReplyGate,
    pub gc: Mutex<GcSafePoints>,
    /// Locks and transactions. Lock order: `regions` before `txns`.
    pub txns: Mutex<TxnTable>,
    /// `127.0.0.1:port` of PD, for `GetMembers`.
    pub pd_address: Mutex<String>,
    pub faults: Mutex<Faults>,
    /// What PD was asked to scan, for benchmarks that measure an advancer's PD load.
    pub pd_scans: PdScanCounters,
    /// What every store reports of each task in `tikv_log_backup_task_status`.
    pub task_states: Mutex<BTreeMap<String, TaskState>>,
}

/// Ways the simulated PD and TiKV misbehave on purpose; each is off by default.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// PD's region scans list the first region of each answer twice.
    pub duplicated_regions: bool,
    /// PD's region scans give one region of each answer (one with both boundaries) an end
    /// before its start.
    pub inverted_regions: bool,
    /// PD is older than v8.1: BatchScanRegions answers UNIMPLEMENTED.
    pub no_batch_scan: bool,
    /// PD lists the first store twice, the second time at a dead address.
    pub duplicate_store: bool,
    /// Addresses PD advertises instead of the stores' own (NUL bytes, garbage).
    pub store_addresses: std::collections::HashMap<StoreId, String>,
    /// Every checkpoint answer carries this many more answers, for regions the store was
    /// not asked about (every other region first, then made-up ids), each claiming the
    /// latest TSO: a huge batch when large.
    pub unasked_answers: usize,
}

/// A log-backup task as TiKV reports it (`tikv_log_backup_task_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    Running = 0,
    Paused = 1,
    Error = 2,
}

/// `ScanRegions` and `BatchScanRegions` calls answered, and the regions they returned.
#[derive(Debug, Default)]
pub struct PdScanCounters {
    pub calls: AtomicU64,
    pub regions: AtomicU64,
}

impl PdScanCounters {
    pub fn count(&self, regions: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.regions.fetch_add(regions as u64, Ordering::Relaxed);
    }

    /// (calls, regions) so far.
    pub fn read(&self) -> (u64, u64) {
        (self.calls.load(Ordering::Relaxed), self.regions.load(Ordering::Relaxed))
    }
}

impl SimState {
    pub fn new(
        cluster_id: u64,
        tso: Tso,
        start_ts: Ts,
        regions: RegionTable,
        stores: usize,
        gate: ReplyGate,
    ) -> SimState {
        SimState {
            cluster_id,
            start_ts,
            tso,
            regions: RwLock::new(regions),
            stores: (1..=stores as StoreId).map(StoreState::new).collect(),
            gate,
            gc: Mutex::new(GcSafePoints::default()),
            txns: Mutex::new(TxnTable::default()),
            pd_address: Mutex::new(String::new()),
            faults: Mutex::default(),
            pd_scans: PdScanCounters::default(),
            task_states: Mutex::default(),
        }
    }

    pub fn store(&self, id: StoreId) -> Option<&StoreState> {
        id.checked_sub(1).and_then(|i| self.stores.get(i as usize))
    }

    /// One flush by each of `stores` that is up and not hung; each gets its own fresh TSO.
    /// With `wait_delivery`, waits (bounded) until subscribers took the events.
    pub fn flush(&self, stores: &[StoreId], wait_delivery: bool) {
        let mut flushing = Vec::new();
        let mut flush_ts = HashMap::new();
        for store in stores.iter().filter_map(|&id| self.store(id)) {
            let run = store.run.lock();
            if run.up && !self.gate.is_hung(store.id) {
                flushing.push((store, run.incarnation));
                flush_ts.insert(store.id, self.tso.next());
            }
        }
        if flushing.is_empty() {
            return;
        }
        // Taken after the flush ts: a lock written later has a larger start ts, so it cannot
        // hold back what this flush reports.
        let locks = self.txns.lock().lock_starts();
        let mut flushed = self.regions.write().flush(&flush_ts, &locks);
        let mut receivers = Vec::new();
        for (store, incarnation) in flushing {
            let mut regions = flushed.remove(&store.id).unwrap_or_default();
            regions.sort_unstable_by_key(|r| r.id);
            let last = Arc::new(LastFlush { ts: flush_ts[&store.id], regions });
            {
                let run = store.run.lock();
                if run.incarnation != incarnation {
                    continue;
                }
                *store.last_flush.write() = last;
            }
            receivers.extend(store.broadcast());
        }
        if wait_delivery {
            let deadline = Instant::now() + DELIVERY_WAIT;
            for receiver in receivers {
                receiver.wait_drained(deadline);
            }
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64
}
