//! One resolve round against the cluster: scan the target ranges' regions for locks on
//! their leaders, then settle each transaction through its primary the way TiKV's clients
//! do. Bounded by a deadline and the stop token; every failure is reported with the region,
//! store and key, and left for a later round.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use grpcio::CallOption;
use rayon::prelude::*;

use super::plan::{
    decide, decide_async, group_by_txn, lowered_max_version, scan_max_version, AsyncDecision, Decision, FoundLock,
    PrimaryStatus, SecondaryAnswer, LOCKED_RETRIES, SCAN_PAGE,
};
use crate::cluster::{ClusterMeta, KvClients, RegionWithLeader};
use crate::error::{Error, Result};
use crate::proto::errorpb;
use crate::proto::kvrpcpb::{
    CheckSecondaryLocksRequest, CheckSecondaryLocksResponse, CheckTxnStatusRequest, CheckTxnStatusResponse, Context,
    KeyError, ResolveLockRequest, ResolveLockResponse, ScanLockRequest, ScanLockResponse,
};
use crate::proto::tikvpb_grpc::TikvClient;
use crate::spans::collapse;
use crate::types::{DisplayKey, KeyRange, Ts};
use crate::worker::StopToken;

/// A region error sends the request to a freshly located region at most this often.
const REGION_ATTEMPTS: u32 = 4;
const REGION_BACKOFF: Duration = Duration::from_millis(50);
/// Regions located per PD scan while walking a target range.
const LOCATE_PAGE: usize = 64;

/// What to resolve: the lagging pieces of the stuck tasks.
#[derive(Debug, Clone)]
pub struct RoundRequest {
    pub tasks: Vec<String>,
    pub targets: Vec<(KeyRange, Ts)>,
    pub deadline: Instant,
    /// Regions the advancer already knows to hold the targets (its region cache): scanned
    /// without asking PD where they are. A stale one costs a region error and a PD lookup.
    pub known_regions: Vec<RegionWithLeader>,
    /// The round scans at most this many regions: a stuck checkpoint over a cluster whose
    /// polls fall behind makes every region a target (a million ScanLock calls a round).
    pub max_regions: usize,
}

impl RoundRequest {
    /// A round over `targets` that locates every region through PD and scans them all.
    pub fn new(tasks: Vec<String>, targets: Vec<(KeyRange, Ts)>, deadline: Instant) -> Self {
        RoundRequest { tasks, targets, deadline, known_regions: Vec::new(), max_regions: usize::MAX }
    }
}

/// How a round went. `locks` counts locks by outcome: `committed`, `rolled-back`, `alive`
/// (left alone) and `failed` (retried on a later round).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundReport {
    pub tasks: Vec<String>,
    pub regions_scanned: usize,
    /// The round stopped at its `max_regions`; the rest waits for a later round.
    pub regions_capped: bool,
    pub locks_found: usize,
    pub locks: BTreeMap<&'static str, usize>,
    pub rpcs: usize,
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

/// The I/O of a round, shared by its parallel parts.
pub struct RoundEnv<'a> {
    pub meta: &'a dyn ClusterMeta,
    pub kv: &'a dyn KvClients,
    pub rpc_timeout: Duration,
    pub deadline: Instant,
    pub stop: &'a StopToken,
    rpcs: AtomicUsize,
}

/// The parts of TiKV's answers a round looks at, the same for every response type.
trait KvResponse {
    fn region_error(&self) -> Option<&errorpb::Error>;
    fn key_error(&self) -> Option<&KeyError>;
}

macro_rules! kv_response {
    ($($response:ty),*) => {$(
        impl KvResponse for $response {
            fn region_error(&self) -> Option<&errorpb::Error> {
                self.has_region_error().then(|| self.get_region_error())
            }
            fn key_error(&self) -> Option<&KeyError> {
                self.has_error().then(|| self.get_error())
            }
        }
    )*};
}

kv_response!(ScanLockResponse, CheckTxnStatusResponse, CheckSecondaryLocksResponse, ResolveLockResponse);

fn context_of(region: &RegionWithLeader) -> Context {
    let mut context = Context::new();
    context.set_region_id(region.id);
    context.mut_region_epoch().set_version(region.epoch_version);
    context.mut_region_epoch().set_conf_ver(region.conf_ver);
    context.mut_peer().set_id(region.leader_peer_id);
    context.mut_peer().set_store_id(region.leader_store.unwrap_or_default());
    context
}

/// The regions a round may scan: those known beforehand, and how many are left to scan.
struct RoundRegions<'a> {
    /// In key order, not overlapping.
    known: &'a [RegionWithLeader],
    left: AtomicUsize,
    /// Some scan wanted a region when none was left.
    ran_out: AtomicBool,
}

impl RoundRegions<'_> {
    fn known_at(&self, key: &[u8]) -> Option<RegionWithLeader> {
        let after = self.known.partition_point(|r| r.range.start.as_slice() <= key);
        after.checked_sub(1).map(|i| &self.known[i]).filter(|r| r.range.contains(key)).cloned()
    }

    /// Takes one region from what is left; false once none is.
    fn take_one(&self) -> bool {
        let taken = self.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| left.checked_sub(1)).is_ok();
        if !taken {
            self.ran_out.store(true, Ordering::Relaxed);
        }
        taken
    }
}

/// `[from, to)` clipped to the region.
fn end_within(to: &[u8], region: &RegionWithLeader) -> Vec<u8> {
    match (to.is_empty(), region.range.end.is_empty()) {
        (true, _) => region.range.end.clone(),
        (_, true) => to.to_vec(),
        _ => to.min(region.range.end.as_slice()).to_vec(),
    }
}

fn located_error(what: &str, region: Option<&RegionWithLeader>, key: &[u8], error: impl std::fmt::Display) -> String {
    match region {
        Some(r) => format!(
            "{what} in region {} (store {}) at key {}: {error}",
            r.id,
            r.leader_store.map_or("none".into(), |s| s.to_string()),
            DisplayKey(key)
        ),
        None => format!("{what} at key {}: {error}", DisplayKey(key)),
    }
}

impl<'a> RoundEnv<'a> {
    pub fn new(
        meta: &'a dyn ClusterMeta,
        kv: &'a dyn KvClients,
        rpc_timeout: Duration,
        deadline: Instant,
        stop: &'a StopToken,
    ) -> Self {
        RoundEnv { meta, kv, rpc_timeout, deadline, stop, rpcs: AtomicUsize::new(0) }
    }

    fn time_left(&self) -> Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if self.stop.is_stopped() {
            return Err(Error::Stopped("the lock resolver is stopping".into()));
        }
        if left.is_zero() {
            return Err(Error::Timeout("the resolve round ran out of time".into()));
        }
        Ok(left)
    }

    /// The region holding `key`, with a leader.
    fn locate(&self, key: &[u8]) -> Result<RegionWithLeader> {
        let mut end = key.to_vec();
        end.push(0);
        let region = self.meta.region_scan(key, &end, 1)?.into_iter().next().ok_or_else(|| Error::RegionScan {
            range: KeyRange::new(key, end.clone()),
            reason: "PD returned no region".into(),
        })?;
        if region.leader_store.is_none() {
            return Err(Error::Region { region_id: region.id, reason: "PD knows no leader".into() });
        }
        Ok(region)
    }

    /// Sends a request to the region holding `key` (`hint` first, if any), locating the
    /// region afresh through PD after each region error.
    fn on_region<R: KvResponse>(
        &self,
        what: &'static str,
        key: &[u8],
        mut hint: Option<RegionWithLeader>,
        send: impl Fn(&TikvClient, &RegionWithLeader, CallOption) -> grpcio::Result<R>,
    ) -> std::result::Result<(RegionWithLeader, R), String> {
        let mut last = String::new();
        for attempt in 0..REGION_ATTEMPTS {
            let region = match hint.take() {
                Some(region) => region,
                None => self.locate(key).map_err(|e| located_error(what, None, key, e))?,
            };
            let fail = |e: &dyn std::fmt::Display| located_error(what, Some(&region), key, e);
            let left = self.time_left().map_err(|e| fail(&e))?;
            let store = region.leader_store.ok_or_else(|| fail(&"no leader"))?;
            let client = self.kv.kv_client(store).map_err(|e| fail(&e))?;
            self.rpcs.fetch_add(1, Ordering::Relaxed);
            let response =
                send(&client, &region, CallOption::default().timeout(self.rpc_timeout.min(left))).map_err(|e| {
                    self.kv.forget(store);
                    fail(&e)
                })?;
            match response.region_error() {
                None => return Ok((region, response)),
                Some(error) => {
                    last = fail(&error.get_message());
                    log::debug!("{last}; locating the region again");
                    if self.stop.sleep(REGION_BACKOFF * 2u32.pow(attempt)) {
                        break;
                    }
                }
            }
        }
        Err(format!("{last} (gave up after {REGION_ATTEMPTS} attempts)"))
    }

    /// Sends one request per region holding some of `keys` (sorted), each with the keys
    /// inside it; `hint` may know a key's region already.
    fn per_region<R: KvResponse>(
        &self,
        what: &'static str,
        keys: &[Vec<u8>],
        hint: impl Fn(&[u8]) -> Option<RegionWithLeader>,
        send: impl Fn(&TikvClient, &RegionWithLeader, &[Vec<u8>], CallOption) -> grpcio::Result<R>,
    ) -> std::result::Result<Vec<(usize, R)>, String> {
        let mut answers = Vec::new();
        let mut next = 0;
        while next < keys.len() {
            let inside =
                |region: &RegionWithLeader| keys[next..].iter().take_while(|k| region.range.contains(k)).count();
            let (region, response) =
                self.on_region(what, &keys[next], hint(&keys[next]), |client, region, option| {
                    send(client, region, &keys[next..next + inside(region).max(1)], option)
                })?;
            let count = inside(&region).max(1);
            if let Some(error) = response.key_error() {
                return Err(located_error(what, Some(&region), &keys[next], format!("{error:?}")));
            }
            answers.push((count, response));
            next += count;
        }
        Ok(answers)
    }

    /// Every lock with start ts below `max_version` in `range`, region by region on their
    /// leaders, in pages. Errors leave the rest of the range for a later round.
    fn scan_range(
        &self,
        range: &KeyRange,
        max_version: Ts,
        floor: Ts,
        allowed: &RoundRegions<'_>,
    ) -> (Vec<FoundLock>, usize, Vec<String>) {
        let (mut found, mut regions, mut errors) = (Vec::new(), 0, Vec::new());
        let mut located: std::collections::VecDeque<RegionWithLeader> = Default::default();
        let mut from = range.start.clone();
        let mut version = max_version;
        let mut locked_retries = 0;
        let mut taken = false;
        while range.end.is_empty() || from < range.end {
            if !taken && !allowed.take_one() {
                break;
            }
            taken = true;
            let hint = match allowed.known_at(&from) {
                Some(region) => Some(region),
                None => {
                    located.retain(|r| r.range.contains(&from) || r.range.start > from);
                    if located.front().map_or(true, |r| !r.range.contains(&from)) {
                        match self.meta.region_scan(&from, &range.end, LOCATE_PAGE) {
                            Ok(page) => located = page.into_iter().filter(|r| r.leader_store.is_some()).collect(),
                            Err(e) => {
                                errors.push(located_error("locating regions for KvScanLock", None, &from, e));
                                break;
                            }
                        }
                    }
                    located.front().filter(|r| r.range.contains(&from)).cloned()
                }
            };
            let answer = self.on_region("KvScanLock", &from, hint, |client, region, option| {
                let mut request = ScanLockRequest::new();
                request.set_context(context_of(region));
                request.set_max_version(version);
                request.set_start_key(from.clone());
                request.set_end_key(end_within(&range.end, region));
                request.set_limit(SCAN_PAGE);
                client.kv_scan_lock_opt(&request, option)
            });
            let (region, mut response) = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    errors.push(e);
                    break;
                }
            };
            if located.front().map(|r| r.id) != Some(region.id) {
                // Located afresh after a region error: the rest of the page is stale too.
                located.clear();
            }
            if let Some(error) = response.key_error() {
                let lowered = lowered_max_version(version, floor).filter(|_| locked_retries < LOCKED_RETRIES);
                match lowered {
                    Some(lower) if error.has_locked() => {
                        log::info!(
                            "KvScanLock in region {} met a lock at {}: retrying with max version {lower}",
                            region.id,
                            error.get_locked().get_lock_version()
                        );
                        version = lower;
                        locked_retries += 1;
                        continue;
                    }
                    _ => errors.push(located_error("KvScanLock", Some(&region), &from, format!("{error:?}"))),
                }
            } else {
                let locks = response.take_locks().into_vec();
                let full_page = locks.len() >= SCAN_PAGE as usize;
                if let Some(last) = locks.last().filter(|_| full_page) {
                    let mut after = last.get_key().to_vec();
                    after.push(0);
                    found.extend(locks.into_iter().map(|l| found_lock(l, &region)));
                    from = after;
                    continue;
                }
                found.extend(locks.into_iter().map(|l| found_lock(l, &region)));
            }
            regions += 1;
            taken = false;
            version = max_version;
            locked_retries = 0;
            if region.range.end.is_empty() {
                break;
            }
            from = region.range.end.clone();
        }
        (found, regions, errors)
    }

    /// `CheckTxnStatus` on the primary; `None` when the primary is not found and the lock
    /// has not expired (its transaction may still be writing it).
    fn check_txn_status(
        &self,
        lock: &FoundLock,
        current_ts: Ts,
        force_sync_commit: bool,
    ) -> std::result::Result<Option<PrimaryStatus>, String> {
        let mut rollback_if_not_exist = false;
        loop {
            let (region, response) =
                self.on_region("KvCheckTxnStatus", &lock.primary, None, |client, region, option| {
                    let mut request = CheckTxnStatusRequest::new();
                    request.set_context(context_of(region));
                    request.set_primary_key(lock.primary.clone());
                    request.set_lock_ts(lock.start_ts);
                    request.set_caller_start_ts(0);
                    request.set_current_ts(current_ts);
                    request.set_rollback_if_not_exist(rollback_if_not_exist);
                    request.set_force_sync_commit(force_sync_commit);
                    request.set_verify_is_primary(true);
                    client.kv_check_txn_status_opt(&request, option)
                })?;
            if let Some(error) = response.key_error() {
                if error.has_txn_not_found() && !rollback_if_not_exist {
                    if !lock.expired(current_ts) {
                        return Ok(None);
                    }
                    rollback_if_not_exist = true;
                    continue;
                }
                return Err(located_error("KvCheckTxnStatus", Some(&region), &lock.primary, format!("{error:?}")));
            }
            let info = response.get_lock_info();
            return Ok(Some(if response.get_commit_version() > 0 {
                PrimaryStatus::Committed(response.get_commit_version())
            } else if response.get_lock_ttl() > 0 {
                PrimaryStatus::Locked {
                    ttl_ms: response.get_lock_ttl(),
                    async_commit: info.get_use_async_commit(),
                    min_commit_ts: info.get_min_commit_ts(),
                    secondaries: info.get_secondaries().to_vec(),
                }
            } else {
                PrimaryStatus::RolledBack
            }));
        }
    }

    fn check_secondaries(&self, keys: &[Vec<u8>], start_ts: Ts) -> std::result::Result<Vec<SecondaryAnswer>, String> {
        let answers = self.per_region(
            "KvCheckSecondaryLocks",
            keys,
            |_| None,
            |client, region, keys, option| {
                let mut request = CheckSecondaryLocksRequest::new();
                request.set_context(context_of(region));
                request.set_keys(keys.to_vec().into());
                request.set_start_version(start_ts);
                client.kv_check_secondary_locks_opt(&request, option)
            },
        )?;
        Ok(answers
            .into_iter()
            .map(|(asked, response)| SecondaryAnswer {
                asked,
                locks: response.get_locks().iter().map(|l| (l.get_min_commit_ts(), l.get_use_async_commit())).collect(),
                commit_ts: response.get_commit_ts(),
            })
            .collect())
    }

    /// `ResolveLock` for a transaction: per region holding `keys`; naming the keys only for
    /// async commit (otherwise TiKV resolves every lock of the transaction in the region).
    fn resolve(
        &self,
        keys: &[Vec<u8>],
        hint: impl Fn(&[u8]) -> Option<RegionWithLeader>,
        start_ts: Ts,
        commit_ts: Ts,
        name_keys: bool,
    ) -> std::result::Result<(), String> {
        self.per_region("KvResolveLock", keys, hint, |client, region, keys, option| {
            let mut request = ResolveLockRequest::new();
            request.set_context(context_of(region));
            request.set_start_version(start_ts);
            request.set_commit_version(commit_ts);
            if name_keys {
                request.set_keys(keys.to_vec().into());
            }
            client.kv_resolve_lock_opt(&request, option)
        })
        .map(|_| ())
    }

    /// Settles one transaction whose locks (sorted by key) a scan found. Returns the
    /// outcome label.
    fn settle(&self, locks: &[FoundLock], current_ts: Ts) -> std::result::Result<&'static str, String> {
        let Some(first) = locks.first() else { return Err("a transaction without locks to settle".into()) };
        let scanned: Vec<Vec<u8>> = locks.iter().map(|l| l.key.clone()).collect();
        let scanned_region = |key: &[u8]| locks.iter().find(|l| l.key == key).map(|l| l.region.clone());
        let Some(status) = self.check_txn_status(first, current_ts, false)? else { return Ok("alive") };
        let (commit_ts, keys, by_key) = match decide(status, first.start_ts, current_ts) {
            Decision::LeaveAlive => return Ok("alive"),
            Decision::Commit(ts) => (ts, scanned, false),
            Decision::RollBack => (0, scanned, false),
            Decision::CheckSecondaries { min_commit_ts, secondaries } => {
                let mut all = secondaries;
                all.push(first.primary.clone());
                all.sort();
                all.dedup();
                let answers = self.check_secondaries(&all, first.start_ts)?;
                match decide_async(min_commit_ts, &answers) {
                    AsyncDecision::Commit(ts) => (ts, all, true),
                    AsyncDecision::RollBack => (0, all, true),
                    AsyncDecision::FallBackToSync => {
                        match self
                            .check_txn_status(first, current_ts, true)?
                            .map(|s| decide(s, first.start_ts, current_ts))
                        {
                            Some(Decision::Commit(ts)) => (ts, scanned, false),
                            Some(Decision::RollBack) => (0, scanned, false),
                            _ => return Ok("alive"),
                        }
                    }
                }
            }
        };
        self.resolve(&keys, scanned_region, first.start_ts, commit_ts, by_key)?;
        Ok(if commit_ts == 0 { "rolled-back" } else { "committed" })
    }
}

fn found_lock(mut info: crate::proto::kvrpcpb::LockInfo, region: &RegionWithLeader) -> FoundLock {
    FoundLock {
        key: info.take_key(),
        primary: info.take_primary_lock(),
        start_ts: info.get_lock_version(),
        ttl_ms: info.get_lock_ttl(),
        async_commit: info.get_use_async_commit(),
        region: region.clone(),
    }
}

/// Runs one round: scans the targets' ranges in parallel on `pool`, then settles the
/// transactions found, in parallel too.
pub fn run_round(env: &RoundEnv<'_>, pool: &rayon::ThreadPool, request: &RoundRequest) -> RoundReport {
    fail::fail_point!("in-lock-round");
    let started = Instant::now();
    let mut report = RoundReport { tasks: request.tasks.clone(), ..RoundReport::default() };
    let ranges: Vec<KeyRange> = collapse(&request.targets.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>());
    let max_version = scan_max_version(&request.targets);
    let floor = request.targets.iter().map(|(_, ts)| *ts).min().unwrap_or(0);
    let current_ts = match env.meta.fetch_current_ts() {
        Ok(ts) => ts,
        Err(e) => {
            report.errors.push(format!("cannot fetch the current ts from PD, so no lock can be judged: {e}"));
            return report;
        }
    };
    let allowed = RoundRegions {
        known: &request.known_regions,
        left: AtomicUsize::new(request.max_regions),
        ran_out: AtomicBool::new(false),
    };
    let scans: Vec<_> =
        pool.install(|| ranges.par_iter().map(|r| env.scan_range(r, max_version, floor, &allowed)).collect());
    report.regions_capped = allowed.ran_out.load(Ordering::Relaxed);
    let mut found = Vec::new();
    for (locks, regions, errors) in scans {
        found.extend(locks);
        report.regions_scanned += regions;
        report.errors.extend(errors);
    }
    report.locks_found = found.len();
    let txns: Vec<Vec<FoundLock>> = group_by_txn(found).into_values().collect();
    let settled: Vec<_> =
        pool.install(|| txns.par_iter().map(|locks| (locks.len(), env.settle(locks, current_ts))).collect());
    for (count, outcome) in settled {
        let label = match outcome {
            Ok(label) => label,
            Err(e) => {
                report.errors.push(e);
                "failed"
            }
        };
        *report.locks.entry(label).or_default() += count;
    }
    report.rpcs = env.rpcs.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    report
}
