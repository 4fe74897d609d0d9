//! The cluster side of the advancer: PD (regions, stores, TSO, GC safe point) and TiKV's
//! log-backup service (checkpoint polling and flush-event subscription).
//!
//! The advancer sees the cluster only through the two traits below (upstream's
//! `TiKVClusterMeta` and `LogBackupService`), so its logic can be tested against in-memory
//! implementations and run against PD/TiKV or the simulated cluster alike.
//!
//! Keys are raw everywhere in this API: the PD client encodes them on the way out and decodes
//! region boundaries on the way back, exactly as TiDB's codec PD client does
//! (client-go `internal/locate/pd_codec.go`).

pub(crate) mod collector;
pub(crate) mod deadline;
pub(crate) mod lagging;
pub(crate) mod pd;
pub(crate) mod region_cache;
pub(crate) mod region_iter;
pub(crate) mod subscriber;
pub(crate) mod tikv;
pub(crate) mod warmup;

use crate::error::{Error, Result};
use crate::proto::logbackuppb_grpc::LogBackupClient;
use crate::proto::tikvpb_grpc::TikvClient;
use crate::types::{KeyRange, RegionId, StoreId, Ts};

pub(crate) use collector::plan_listing;
pub use collector::{
    collect_checkpoints, collect_checkpoints_cached, CollectResult, CollectorConfig, FailReason, FailedRange,
};
pub use lagging::most_lagging_within;
pub use pd::{PdClient, PdConfig};
pub use region_cache::RegionCache;
pub use region_iter::{check_region_consistency, RegionIter, ScanRetry};
pub use subscriber::{FlushBatch, FlushSubscriber, SubscriberConfig, EVENTS_PER_MESSAGE};
pub use tikv::{TikvClients, TikvConfig};
pub use warmup::{RegionWarmup, WarmupConfig};

/// The PD service-safe-point id under which the advancer blocks GC.
pub const GC_SERVICE_ID: &str = "log-backup-coordinator";

/// A TiKV store as the advancer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreInfo {
    pub id: StoreId,
    /// Where its gRPC services listen: `peer_address` if PD has one, else `address`.
    pub address: String,
    /// The store's start timestamp: a change means the store restarted.
    pub boot_at: i64,
}

/// A region as PD reported it, with boundaries decoded to raw keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionWithLeader {
    pub id: RegionId,
    pub range: KeyRange,
    pub epoch_version: u64,
    pub conf_ver: u64,
    /// `None` when PD knows no leader (for example right after a split or a leader loss).
    pub leader_store: Option<StoreId>,
    /// The leader's peer id (0 when unknown): TiKV checks it on transactional requests.
    pub leader_peer_id: u64,
    pub peer_stores: Vec<StoreId>,
}

/// Region and store metadata, GC blocking and time (upstream's `TiKVClusterMeta`).
pub trait ClusterMeta: Send + Sync {
    /// Up to `limit` regions overlapping `[start, end)` (raw keys, empty `end` = +∞), starting
    /// with the region that contains `start`.
    fn region_scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<RegionWithLeader>>;

    /// Every store that can lead regions: no tombstones, no TiFlash.
    fn stores(&self) -> Result<Vec<StoreInfo>>;

    /// One store, to resolve its address before dialing.
    fn store(&self, id: StoreId) -> Result<StoreInfo> {
        self.stores()?.into_iter().find(|s| s.id == id).ok_or_else(|| Error::Store {
            store_id: id,
            address: String::new(),
            reason: "not in PD's store list (removed, tombstone or TiFlash)".into(),
        })
    }

    /// Keeps GC from collecting anything newer than `safe_point`; fails when PD's minimal
    /// service safe point is already past it. Returns the safe point now in force.
    fn block_gc_until(&self, safe_point: Ts) -> Result<Ts>;

    /// Removes the advancer's service safe point.
    fn unblock_gc(&self) -> Result<()>;

    /// The current timestamp from PD's TSO.
    fn fetch_current_ts(&self) -> Result<Ts>;

    /// The HTTP status address (`host:port`) of every store that has one, for reading its
    /// configuration. None by default: thresholds then come from the flags alone.
    fn store_status_addresses(&self) -> Result<Vec<(StoreId, String)>> {
        Ok(Vec::new())
    }
}

/// Connections to the log-backup service of each store (upstream's `LogBackupService`).
pub trait LogBackupService: Send + Sync {
    /// A client for `store`, dialed once and cached until [`LogBackupService::clear_cache`].
    fn client(&self, store: StoreId) -> Result<LogBackupClient>;

    /// Forgets the cached connection, so the next [`LogBackupService::client`] resolves the
    /// store's address again and dials anew.
    fn clear_cache(&self, store: StoreId);
}

/// Connections to the transactional service of each store (`tikvpb.Tikv`), for lock
/// resolution; cached like [`LogBackupService`]'s.
pub trait KvClients: Send + Sync {
    fn kv_client(&self, store: StoreId) -> Result<TikvClient>;

    /// Forgets the cached connection after an RPC error (the store may have moved).
    fn forget(&self, store: StoreId);
}

#[cfg(test)]
pub(crate) mod testing {
    //! In-memory cluster metadata for unit tests of the pure logic.

    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use parking_lot::Mutex;

    use super::*;
    use crate::security::{grpc_env, Security};

    /// Regions built from boundary keys: the first starts at −∞ and the last ends at +∞,
    /// region `i` has id `i + 1` and is led by store `leaders[i % leaders.len()]`.
    pub fn regions_from_boundaries(boundaries: &[&[u8]], leaders: &[StoreId]) -> Vec<RegionWithLeader> {
        let mut keys: Vec<Vec<u8>> = vec![Vec::new()];
        keys.extend(boundaries.iter().map(|b| b.to_vec()));
        keys.push(Vec::new());
        keys.windows(2)
            .enumerate()
            .map(|(i, w)| RegionWithLeader {
                id: i as RegionId + 1,
                range: KeyRange::new(w[0].clone(), w[1].clone()),
                epoch_version: 1,
                conf_ver: 1,
                leader_store: Some(leaders[i % leaders.len()]),
                leader_peer_id: 0,
                peer_stores: leaders.to_vec(),
            })
            .collect()
    }

    /// The start, end and limit of one `region_scan` call.
    pub type Scan = (Vec<u8>, Vec<u8>, usize);

    /// A `ClusterMeta` over a fixed region list that answers scans like PD does. Scripted
    /// answers in `scripted` are returned first, one per call, to inject faults.
    #[derive(Default)]
    pub struct MemMeta {
        pub regions: Vec<RegionWithLeader>,
        pub stores: Mutex<Vec<StoreInfo>>,
        pub scripted: Mutex<VecDeque<Result<Vec<RegionWithLeader>>>>,
        pub scans: Mutex<Vec<Scan>>,
        /// GC safepoint calls in order: `Some(ts)` blocks GC until `ts`, `None` unblocks.
        pub gc: Mutex<Vec<Option<Ts>>>,
        /// How many of the next GC safepoint calls fail (not recorded in `gc`).
        pub failing_gc: Mutex<usize>,
        /// What the TSO answers; unset, it fails.
        pub now: Mutex<Option<Ts>>,
        /// Makes the TSO call panic, to test what a panicking caller does.
        pub tso_panics: bool,
        /// Runs once, inside the next TSO call: something that happens while a tick is in
        /// flight.
        pub during_tso: Mutex<Option<Box<dyn FnOnce() + Send>>>,
        /// Every call waits for the deadline in force (10 s without one), then fails: a PD
        /// that accepts requests and never answers.
        pub black_holed: AtomicBool,
        /// TSO calls made, answered or not.
        pub tso_calls: AtomicUsize,
    }

    impl MemMeta {
        pub fn new(regions: Vec<RegionWithLeader>) -> Self {
            MemMeta { regions, ..Default::default() }
        }

        pub fn with_stores(stores: Vec<StoreInfo>) -> Self {
            MemMeta { stores: Mutex::new(stores), ..Default::default() }
        }

        pub fn script(&self, answer: Result<Vec<RegionWithLeader>>) {
            self.scripted.lock().push_back(answer);
        }

        /// What a black-holed PD does to a call: nothing, until the caller gives up.
        fn black_hole(&self, call: &str) -> Result<()> {
            if !self.black_holed.load(Ordering::SeqCst) {
                return Ok(());
            }
            let until = deadline::Scope::current().deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(10));
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            Err(Error::Timeout(format!("the black-holed PD's {call}")))
        }

        fn gc_call_fails(&self) -> Result<()> {
            // As the real client: no call is started once the tick's deadline has passed.
            deadline::bounded(Duration::from_secs(10), "PD UpdateServiceGCSafePoint")?;
            self.black_hole("UpdateServiceGCSafePoint")?;
            let mut failing = self.failing_gc.lock();
            if *failing == 0 {
                return Ok(());
            }
            *failing -= 1;
            Err(crate::Error::Pd { endpoint: "mem".into(), reason: "GC safepoint call failed".into() })
        }
    }

    impl ClusterMeta for MemMeta {
        fn region_scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<RegionWithLeader>> {
            self.black_hole("ScanRegions")?;
            self.scans.lock().push((start.to_vec(), end.to_vec(), limit));
            if let Some(answer) = self.scripted.lock().pop_front() {
                return answer;
            }
            let wanted = KeyRange::new(start, end);
            Ok(self.regions.iter().filter(|r| r.range.overlaps(&wanted)).take(limit).cloned().collect())
        }

        fn stores(&self) -> Result<Vec<StoreInfo>> {
            self.black_hole("GetAllStores")?;
            Ok(self.stores.lock().clone())
        }

        fn block_gc_until(&self, safe_point: Ts) -> Result<Ts> {
            self.gc_call_fails()?;
            self.gc.lock().push(Some(safe_point));
            Ok(safe_point)
        }

        fn unblock_gc(&self) -> Result<()> {
            self.gc_call_fails()?;
            self.gc.lock().push(None);
            Ok(())
        }

        fn fetch_current_ts(&self) -> Result<Ts> {
            assert!(!self.tso_panics, "the test's TSO panics");
            self.tso_calls.fetch_add(1, Ordering::SeqCst);
            if let Some(event) = self.during_tso.lock().take() {
                event();
            }
            self.black_hole("Tso")?;
            self.now.lock().ok_or_else(|| Error::Timeout("the test's TSO".into()))
        }
    }

    /// Dials stores at fixed addresses; a store without one fails to dial. Records dials and
    /// cache clears.
    #[derive(Default)]
    pub struct FixedDialer {
        pub addresses: Mutex<HashMap<StoreId, String>>,
        pub dials: Mutex<Vec<StoreId>>,
        pub cleared: Mutex<Vec<StoreId>>,
    }

    impl FixedDialer {
        pub fn new(addresses: impl IntoIterator<Item = (StoreId, String)>) -> Self {
            FixedDialer { addresses: Mutex::new(addresses.into_iter().collect()), ..Default::default() }
        }

        pub fn dials_of(&self, store: StoreId) -> usize {
            self.dials.lock().iter().filter(|&&s| s == store).count()
        }
    }

    impl LogBackupService for FixedDialer {
        fn client(&self, store: StoreId) -> Result<LogBackupClient> {
            self.dials.lock().push(store);
            let address = self.addresses.lock().get(&store).cloned().ok_or_else(|| Error::Store {
                store_id: store,
                address: "127.0.0.1:9".into(),
                reason: "cannot connect: connection failed".into(),
            })?;
            Ok(LogBackupClient::new(Security::insecure().channel(grpc_env(), &address, Duration::from_secs(10))?))
        }

        fn clear_cache(&self, store: StoreId) {
            self.cleared.lock().push(store);
        }
    }
}
