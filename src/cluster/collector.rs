//! Polling region checkpoints (upstream's cluster collector,
//! tidb `br/pkg/streamhelper/collector.go`): the regions of the
//! requested ranges are grouped by leader store and asked for in batches of
//! GetLastFlushTSOfRegion; the answers become a list of span updates and failed ranges.
//!
//! Stores are dialed in parallel on the caller's rayon pool; then every batch of every store
//! is in flight at once, all sharing one deadline. So a store that hangs costs the collector
//! its deadline, never the other stores' answers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use grpcio::CallOption;
use log::{debug, info, warn};
use rayon::prelude::*;

use super::region_iter::{RegionIter, ScanRetry, DEFAULT_PAGE_SIZE};
use super::{deadline, ClusterMeta, LogBackupService, RegionWithLeader};
use crate::error::{Error, Result};
use crate::proto::errorpb;
use crate::proto::logbackuppb::{GetLastFlushTSOfRegionRequest, GetLastFlushTSOfRegionResponse, RegionIdentity};
use crate::proto::logbackuppb_grpc::LogBackupClient;
use crate::types::{ts_add, KeyRange, RegionId, StoreId, Ts};

#[derive(Clone, Debug)]
pub struct CollectorConfig {
    /// Regions per GetLastFlushTSOfRegion request.
    pub batch_size: usize,
    /// How long the stores have to answer, counted from when the requests are sent.
    pub rpc_timeout: Duration,
    /// Regions per ScanRegions page.
    pub page_size: usize,
    pub scan_retry: ScanRetry,
    /// The greatest checkpoint a store may answer: PD's current TSO (plus a little slack) at
    /// the tick. Nothing can be flushed past now, so a larger answer is a broken store.
    pub max_ts: Ts,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            batch_size: 1024,
            rpc_timeout: Duration::from_secs(3),
            page_size: DEFAULT_PAGE_SIZE,
            scan_retry: ScanRetry::default(),
            max_ts: Ts::MAX,
        }
    }
}

/// Why a region's range did not advance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailReason {
    /// PD knows no leader for the region, so no store was asked.
    NoLeader,
    /// TiKV answers this for a region it does not lead, does not know, or has not flushed
    /// since it became leader: it cannot tell these apart.
    NotLeader,
    /// The region split or merged since PD described it.
    EpochNotMatch,
    /// Another region error, with TiKV's message.
    RegionError(String),
    /// The store's answer carried no checkpoint for the region.
    NoCheckpoint,
    /// The store could not be dialed, failed the call or missed the deadline.
    StoreFailed,
    /// The store answered a checkpoint above the current time: impossible, so not trusted.
    FromFuture(Ts),
}

impl FailReason {
    /// The metric label (upstream's spelling where it has one).
    pub fn label(&self) -> &'static str {
        match self {
            FailReason::NoLeader => "no-leader",
            FailReason::NotLeader => "not-leader",
            FailReason::EpochNotMatch => "epoch-not-match",
            FailReason::RegionError(_) => "region-error",
            FailReason::NoCheckpoint => "no-checkpoint",
            FailReason::StoreFailed => "store-failed",
            FailReason::FromFuture(_) => "from-future",
        }
    }

    /// Whether the failure may come from where PD placed the region when it was described
    /// (a moved leader, a split or merge, a store gone from that address), so that asking
    /// PD again can find a region that answers.
    fn may_be_stale_location(&self) -> bool {
        matches!(
            self,
            FailReason::NoLeader
                | FailReason::NotLeader
                | FailReason::EpochNotMatch
                | FailReason::RegionError(_)
                | FailReason::StoreFailed
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FailedRange {
    pub range: KeyRange,
    pub region: Option<RegionId>,
    pub store: Option<StoreId>,
    pub reason: FailReason,
}

#[derive(Debug, Default)]
pub struct CollectResult {
    /// Whole region ranges, as PD described them when the request was built, with the
    /// checkpoint their leader flushed; sorted.
    pub advanced: Vec<(KeyRange, Ts)>,
    /// Every region asked about (or leaderless) that did not advance; sorted.
    pub failed: Vec<FailedRange>,
    /// One error per store that failed as a whole.
    pub store_errors: Vec<Error>,
    /// Regions per request sent (upstream's `batch_size{type="checkpoint"}`).
    pub batch_sizes: Vec<usize>,
    /// How long listing each range's regions took (upstream's `get-regions-in-range` step).
    pub range_scans: Vec<Duration>,
    /// Stores that only ran out of time (the deadline passed or the poll was stopped), as
    /// opposed to refusing, failing the call or not accepting a connection; sorted.
    pub out_of_time: Vec<StoreId>,
}

/// Asks the leaders of all regions overlapping `ranges` for their last flushed checkpoint.
/// Fails only when the regions cannot be listed; everything a store or region gets wrong is
/// reported in the result. Takes at most the scan, one dial deadline and
/// `config.rpc_timeout`, and no longer than the tick's deadline when one is in force
/// (the scope the ticker sets; see `docs/architecture.md`, "Lifecycle guarantees").
pub fn collect_checkpoints(
    meta: &dyn ClusterMeta,
    service: &dyn LogBackupService,
    pool: &rayon::ThreadPool,
    ranges: &[KeyRange],
    config: &CollectorConfig,
) -> Result<CollectResult> {
    collect_checkpoints_cached(meta, service, pool, &mut RegionCache::default(), ranges, config)
}

/// [`collect_checkpoints`] that asks PD only about the parts of `ranges` the cache does not
/// tile, and drops the regions that failed from the cache (see [`RegionCache`] for which).
///
/// A cached region that failed in a way PD's newer view may cure (its leader moved, it split
/// or merged, its store went) is looked up again and asked about once more within the same
/// deadline: a leader move must not cost its range a whole tick. Takes at most two scans,
/// two dial deadlines and `config.rpc_timeout`, and no longer than the tick's deadline.
pub fn collect_checkpoints_cached(
    meta: &dyn ClusterMeta,
    service: &dyn LogBackupService,
    pool: &rayon::ThreadPool,
    cache: &mut RegionCache,
    ranges: &[KeyRange],
    config: &CollectorConfig,
) -> Result<CollectResult> {
    let began = Instant::now();
    let mut result = CollectResult::default();
    // Half of what is left of the tick at most, so that the regions found are asked in time.
    let scan_by = deadline::Scope::current().deadline.map(|by| began + by.saturating_duration_since(began) / 2);
    let scanned = deadline::within(scan_by, || scan_regions(meta, cache, ranges, config, &mut result.range_scans));
    let (regions, cached) = match scanned {
        Ok(found) => found,
        // The pages scanned so far are cached: every cached region is asked, the rest waits
        // for the next poll. Failing the whole poll froze every range tick after tick while
        // the regions of evicted leaders were looked up (a rolling restart at 10^5 regions).
        Err(e) => {
            let cached = cached_regions(cache, ranges);
            warn!(
                "looking up regions: {e}; asking the {} regions cached, the rest waits for the next poll",
                cached.len()
            );
            let ids = cached.iter().map(|r| r.id).collect();
            (cached, ids)
        }
    };
    let region_count = regions.len();
    let asked: HashSet<StoreId> = regions.iter().filter_map(|r| r.leader_store).collect();
    let deadline = ask_leaders(service, pool, regions, config, None, began, &mut result);
    let kept = cache.note_misses(&asked, &result.out_of_time);
    let mut forgotten = Vec::new();
    for failed in std::mem::take(&mut result.failed) {
        if failed.reason == FailReason::StoreFailed && failed.store.is_some_and(|store| kept.contains(&store)) {
            result.failed.push(failed);
        } else {
            cache.forget(&failed);
            forgotten.push(failed);
        }
    }
    let (stale, failed): (Vec<FailedRange>, Vec<FailedRange>) = forgotten
        .into_iter()
        .partition(|f| f.region.is_some_and(|id| cached.contains(&id)) && f.reason.may_be_stale_location());
    result.failed.extend(failed);
    if !stale.is_empty() && Instant::now() < deadline {
        let mut stale_ranges: Vec<KeyRange> = stale.iter().map(|f| f.range.clone()).collect();
        stale_ranges.sort();
        // Looked up as gaps of the whole ranges, not one range each: a lost store's regions
        // are thousands of scattered ranges, which take a few pages rather than a call each.
        match scan_regions(meta, cache, ranges, config, &mut result.range_scans) {
            Ok((mut regions, _)) => {
                regions.retain(|r| overlaps_any(&stale_ranges, &r.range));
                let mut retried = CollectResult::default();
                ask_leaders(service, pool, regions, config, Some(deadline), began, &mut retried);
                // Out of time by now whatever the store: nothing of the retry is kept.
                for failed in &retried.failed {
                    cache.forget(failed);
                }
                result.out_of_time.extend(retried.out_of_time);
                result.advanced.extend(retried.advanced);
                result.failed.extend(retried.failed);
                result.store_errors.extend(retried.store_errors);
                result.batch_sizes.extend(retried.batch_sizes);
            }
            Err(e) => {
                warn!("looking up {} regions that failed again: {e}", stale.len());
                result.failed.extend(stale);
            }
        }
    } else {
        result.failed.extend(stale);
    }
    result.advanced.sort();
    result.failed.sort();
    result.out_of_time.sort();
    result.out_of_time.dedup();
    info!(
        "collected checkpoints of {region_count} regions in {} ranges: {} advanced, {} failed, {} stores failed",
        ranges.len(),
        result.advanced.len(),
        result.failed.len(),
        result.store_errors.len()
    );
    Ok(result)
}

/// Asks the leaders of `regions` for their checkpoints into `result`: every store dialed in
/// parallel, then every batch in flight at once until `deadline` (by default
/// `config.rpc_timeout` from when they are sent), which it returns.
fn ask_leaders(
    service: &dyn LogBackupService,
    pool: &rayon::ThreadPool,
    regions: Vec<RegionWithLeader>,
    config: &CollectorConfig,
    deadline: Option<Instant>,
    began: Instant,
    result: &mut CollectResult,
) -> Instant {
    let plans = plan_requests(regions, config.batch_size, &mut result.failed);
    // The tick's deadline and stop go along to the fan-out threads.
    let scope = deadline::Scope::current();
    let dialed: Vec<(StorePlan, Result<LogBackupClient>)> = pool.install(|| {
        plans
            .into_par_iter()
            .map(|plan| {
                let client = scope.clone().run(|| service.client(plan.store));
                (plan, client)
            })
            .collect()
    });

    // Past the tick's deadline nothing is waited for: every store's regions fail.
    let deadline = deadline.unwrap_or_else(|| {
        Instant::now() + deadline::bounded(config.rpc_timeout, "polling checkpoints").unwrap_or_default()
    });
    let in_flight: Vec<_> = dialed.into_iter().map(|(plan, client)| send_batches(plan, client, deadline)).collect();
    for store in &in_flight {
        if let Ok(sent) = &store.sent {
            result.batch_sizes.extend(sent.calls.iter().map(|(batch, _)| batch.len()));
        }
    }
    for store in in_flight {
        store.wait_into(service, config.max_ts, began, result);
    }
    deadline
}

/// The regions of all ranges, each once, and which of them the cache answered for. A region
/// seen twice (two ranges in one region, or a region that changed between pages) is asked
/// about in its newest epoch.
fn scan_regions(
    meta: &dyn ClusterMeta,
    cache: &mut RegionCache,
    ranges: &[KeyRange],
    config: &CollectorConfig,
    timings: &mut Vec<Duration>,
) -> Result<(Vec<RegionWithLeader>, HashSet<RegionId>)> {
    let mut by_id: HashMap<RegionId, RegionWithLeader> = HashMap::new();
    let mut cached = HashSet::new();
    for range in ranges {
        let started = Instant::now();
        let (mut regions, mut gaps) = cache.cover(range);
        if worth_scanning_across(gaps.len(), regions.len(), config.page_size) {
            let across = KeyRange { start: gaps[0].start.clone(), end: gaps[gaps.len() - 1].end.clone() };
            regions.retain(|r| !r.range.overlaps(&across));
            gaps = vec![across];
        }
        cached.extend(regions.iter().map(|r| r.id));
        for gap in gaps {
            let mut iter = RegionIter::new(meta, &gap);
            iter.page_size = config.page_size;
            iter.retry = config.scan_retry.clone();
            // Cached page by page: a scan the tick's deadline cuts short is not lost, and the
            // next poll's gaps start after what it got.
            while !iter.done() {
                let page = iter.next_page()?;
                cache.insert(&page);
                regions.extend(page);
            }
        }
        for region in regions {
            let newer = by_id.get(&region.id).map_or(true, |seen| seen.epoch_version < region.epoch_version);
            if newer {
                by_id.insert(region.id, region);
            }
        }
        timings.push(started.elapsed());
    }
    let mut regions: Vec<_> = by_id.into_values().collect();
    regions.sort_by(|a, b| a.range.cmp(&b.range));
    Ok((regions, cached))
}

/// The cached regions of all ranges, each once, in key order.
fn cached_regions(cache: &RegionCache, ranges: &[KeyRange]) -> Vec<RegionWithLeader> {
    let mut by_id: HashMap<RegionId, RegionWithLeader> = HashMap::new();
    for range in ranges {
        by_id.extend(cache.cover(range).0.into_iter().map(|r| (r.id, r)));
    }
    let mut regions: Vec<_> = by_id.into_values().collect();
    regions.sort_by(|a, b| a.range.cmp(&b.range));
    regions
}

/// Whether `range` overlaps one of `sorted`, ranges in key order that do not overlap.
fn overlaps_any(sorted: &[KeyRange], range: &KeyRange) -> bool {
    let first_ending_after_start = sorted.partition_point(|r| !r.end.is_empty() && r.end <= range.start);
    sorted.get(first_ending_after_start).is_some_and(|r| r.overlaps(range))
}

/// Up to this many gaps in one range are scanned one PD call each.
const GAPS_SCANNED_ONE_BY_ONE: usize = 32;

/// Whether one paged scan from a range's first gap to its last takes fewer PD calls than a
/// scan per gap: the cached regions between them (at most `cached`) are scanned again too.
/// A store that failed leaves its regions as thousands of scattered gaps, and a call each
/// made the next poll slower still.
fn worth_scanning_across(gaps: usize, cached: usize, page_size: usize) -> bool {
    gaps > GAPS_SCANNED_ONE_BY_ONE && gaps > cached / page_size.max(1) + 1
}

/// The regions earlier polls saw, by start key, so that a steady tick asks PD nothing.
///
/// A stale entry cannot advance a range wrongly: every request carries the region's epoch
/// and TiKV fails a region that split or merged since (epoch not match, or not found), a
/// moved leader answers not-leader, a dead store fails its regions. A region that failed is
/// dropped, so the next poll scans its range afresh, except when its store only ran out of
/// time: a loaded store that misses one deadline still leads its regions, and re-scanning
/// them all made the next poll slower still. A store out of time
/// [`MISSES_BEFORE_RESCAN`] polls in a row has its regions dropped (a hung store's leaders
/// move away, and only PD knows where). Holds at most one entry per region of the ranges
/// polled.
#[derive(Debug, Default)]
pub struct RegionCache {
    by_start: BTreeMap<Vec<u8>, RegionWithLeader>,
    /// Polls in a row each store ran out of time in.
    misses: HashMap<StoreId, u32>,
}

/// How many polls in a row a store may run out of time in before its regions are looked up
/// again: two, so that a store that missed one deadline under load is asked again at once,
/// and the leaders of a hung store are found again after a hung poll and one more.
pub const MISSES_BEFORE_RESCAN: u32 = 2;

impl RegionCache {
    /// The cached regions overlapping `range`, in key order, and the parts of it no cached
    /// region covers.
    fn cover(&self, range: &KeyRange) -> (Vec<RegionWithLeader>, Vec<KeyRange>) {
        let (mut regions, mut gaps) = (Vec::new(), Vec::new());
        let mut cursor = range.start.clone();
        loop {
            let containing = self.by_start.range(..=cursor.clone()).next_back().map(|(_, r)| r);
            let end = match containing.filter(|r| r.range.end.is_empty() || r.range.end > cursor) {
                Some(region) => {
                    regions.push(region.clone());
                    region.range.end.clone()
                }
                None => {
                    let next = self.by_start.range(cursor.clone()..).next().map(|(start, _)| start.clone());
                    let end = match next {
                        Some(next) if range.end.is_empty() || next < range.end => next,
                        _ => range.end.clone(),
                    };
                    gaps.push(KeyRange { start: cursor, end: end.clone() });
                    end
                }
            };
            if end.is_empty() || (!range.end.is_empty() && end >= range.end) {
                return (regions, gaps);
            }
            cursor = end;
        }
    }

    /// The cached region holding `key`.
    pub fn region_at(&self, key: &[u8]) -> Option<&RegionWithLeader> {
        let (_, region) = self.by_start.range(..=key.to_vec()).next_back()?;
        region.range.contains(key).then_some(region)
    }

    /// Adds a fresh scan (regions in key order, tiling their span), replacing every entry
    /// that overlaps it: PD's answer is newer than anything cached.
    pub fn insert(&mut self, scanned: &[RegionWithLeader]) {
        let (Some(first), Some(last)) = (scanned.first(), scanned.last()) else { return };
        let span = KeyRange { start: first.range.start.clone(), end: last.range.end.clone() };
        if let Some((start, before)) = self.by_start.range(..span.start.clone()).next_back() {
            if before.range.end.is_empty() || before.range.end > span.start {
                let start = start.clone();
                self.by_start.remove(&start);
            }
        }
        let inside: Vec<Vec<u8>> = self
            .by_start
            .range(span.start.clone()..)
            .take_while(|(start, _)| span.end.is_empty() || **start < span.end)
            .map(|(start, _)| start.clone())
            .collect();
        for start in inside {
            self.by_start.remove(&start);
        }
        for region in scanned {
            self.by_start.insert(region.range.start.clone(), region.clone());
        }
    }

    /// Counts the polls in a row each store asked ran out of time in, and returns the
    /// stores whose regions stay cached although they failed. A store that reaches
    /// [`MISSES_BEFORE_RESCAN`] starts counting again after its regions are looked up.
    fn note_misses(&mut self, asked: &HashSet<StoreId>, out_of_time: &[StoreId]) -> HashSet<StoreId> {
        // Most stores out of time at once is a poll that outgrew its deadline (10^6 regions
        // in a 2 s tick, or a starved machine), not hung stores: looking all their regions
        // up again would only make the next poll slower (seen at 10^6 polling only).
        if out_of_time.len() * 2 > asked.len() {
            return out_of_time.iter().copied().collect();
        }
        self.misses.retain(|store, _| asked.contains(store) && out_of_time.contains(store));
        let mut kept = HashSet::new();
        for &store in out_of_time {
            let misses = self.misses.entry(store).or_default();
            *misses += 1;
            if *misses < MISSES_BEFORE_RESCAN {
                kept.insert(store);
            } else {
                info!("store {store} ran out of time {misses} polls in a row; looking up its regions again");
                self.misses.remove(&store);
            }
        }
        kept
    }

    /// Drops the failed region, so that its range is scanned again.
    fn forget(&mut self, failed: &FailedRange) {
        if self.by_start.get(&failed.range.start).is_some_and(|r| Some(r.id) == failed.region) {
            self.by_start.remove(&failed.range.start);
        }
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }
}

/// The batches to send to one store.
#[derive(Debug, PartialEq)]
struct StorePlan {
    store: StoreId,
    batches: Vec<Batch>,
}

/// Groups regions by leader store in batches; leaderless regions fail right away.
fn plan_requests(regions: Vec<RegionWithLeader>, batch_size: usize, failed: &mut Vec<FailedRange>) -> Vec<StorePlan> {
    let mut by_store: BTreeMap<StoreId, Vec<RegionWithLeader>> = BTreeMap::new();
    let failed_before = failed.len();
    for region in regions {
        match region.leader_store {
            Some(store) => by_store.entry(store).or_default().push(region),
            None => {
                failed.push(FailedRange {
                    range: region.range,
                    region: Some(region.id),
                    store: None,
                    reason: FailReason::NoLeader,
                });
            }
        }
    }
    // One line per collection, however many regions lack a leader.
    if let Some(first) = failed.get(failed_before) {
        warn!(
            "{} regions have no leader (region {} {} among them); their ranges cannot advance this time",
            failed.len() - failed_before,
            first.region.unwrap_or_default(),
            first.range
        );
    }
    by_store
        .into_iter()
        .map(|(store, regions)| StorePlan {
            store,
            batches: regions.chunks(batch_size.max(1)).map(<[RegionWithLeader]>::to_vec).collect(),
        })
        .collect()
}

type Batch = Vec<RegionWithLeader>;
type PendingAnswer = Result<grpcio::ClientUnaryReceiver<GetLastFlushTSOfRegionResponse>>;

/// One store's requests: sent and not yet answered, or never sent because dialing failed.
struct StoreCalls {
    store: StoreId,
    sent: Result<InFlight, (Vec<Batch>, Error)>,
}

struct InFlight {
    /// Calls in flight fail with "Channel Destroyed" when the last client of their channel
    /// goes, so this one is kept until they are answered.
    _client: LogBackupClient,
    calls: Vec<(Batch, PendingAnswer)>,
}

fn send_batches(plan: StorePlan, client: Result<LogBackupClient>, deadline: Instant) -> StoreCalls {
    let store = plan.store;
    let sent = match client {
        Err(e) => Err((plan.batches, e)),
        Ok(client) => {
            let calls = plan
                .batches
                .into_iter()
                .map(|batch| {
                    let option = CallOption::default().timeout(deadline.saturating_duration_since(Instant::now()));
                    let call = client
                        .get_last_flush_ts_of_region_async_opt(&request_for(&batch), option)
                        .map_err(|e| rpc_error(store, e));
                    (batch, call)
                })
                .collect();
            Ok(InFlight { _client: client, calls })
        }
    };
    StoreCalls { store, sent }
}

impl StoreCalls {
    /// Waits for every answer of the store and merges it. The first failure becomes the
    /// store's error and drops its connection, so that the next use dials again.
    fn wait_into(self, service: &dyn LogBackupService, max_ts: Ts, began: Instant, result: &mut CollectResult) {
        let store = self.store;
        let first_error = match self.sent {
            Err((batches, e)) => {
                batches.into_iter().for_each(|batch| fail_batch(store, batch, result));
                Some(e)
            }
            Ok(in_flight) => {
                let mut first_error = None;
                for (batch, call) in in_flight.calls {
                    let answer = call.and_then(|receiver| {
                        deadline::block_on(receiver, "polling checkpoints")?.map_err(|e| rpc_error(store, e))
                    });
                    match answer {
                        Ok(answer) => apply_answer(store, batch, &answer, believable_after(max_ts, began), result),
                        Err(e) => {
                            fail_batch(store, batch, result);
                            first_error.get_or_insert(e);
                        }
                    }
                }
                first_error
            }
        };
        if let Some(e) = first_error {
            if is_out_of_time(&e) {
                result.out_of_time.push(store);
            }
            warn!("store {store} failed to report checkpoints: {e}");
            service.clear_cache(store);
            result.store_errors.push(e);
        }
    }
}

/// `max_ts` was the current time (plus slack) when the poll began; a store may answer with
/// a flush that happened since, so the bound moves on with the time that passed. A poll of a
/// million regions takes seconds: a fixed bound failed every region flushed meanwhile.
fn believable_after(max_ts: Ts, began: Instant) -> Ts {
    if max_ts == Ts::MAX {
        return max_ts;
    }
    ts_add(max_ts, began.elapsed()).max(max_ts)
}

fn request_for(batch: &[RegionWithLeader]) -> GetLastFlushTSOfRegionRequest {
    let mut req = GetLastFlushTSOfRegionRequest::default();
    for region in batch {
        let mut identity = RegionIdentity::default();
        identity.set_id(region.id);
        identity.set_epoch_version(region.epoch_version);
        req.mut_regions().push(identity);
    }
    req
}

fn rpc_error(store: StoreId, source: grpcio::Error) -> Error {
    Error::rpc("GetLastFlushTSOfRegion", format!("store {store}"), source)
}

fn fail_batch(store: StoreId, batch: Batch, result: &mut CollectResult) {
    result.failed.extend(batch.into_iter().map(|region| FailedRange {
        range: region.range,
        region: Some(region.id),
        store: Some(store),
        reason: FailReason::StoreFailed,
    }));
}

/// Merges one store's answer to one batch. Answers are matched by region id (TiKV answers
/// in any order, once per id) to the range the region had when the request was built.
/// Checkpoints above `max_ts` fail their region and are reported once per batch.
fn apply_answer(
    store: StoreId,
    batch: Batch,
    answer: &GetLastFlushTSOfRegionResponse,
    max_ts: Ts,
    result: &mut CollectResult,
) {
    let mut asked: HashMap<RegionId, RegionWithLeader> = batch.into_iter().map(|r| (r.id, r)).collect();
    let mut from_future = Vec::new();
    let mut unasked = Vec::new();
    for checkpoint in answer.get_checkpoints() {
        let id = checkpoint.get_region().get_id();
        let Some(region) = asked.remove(&id) else {
            unasked.push(id);
            continue;
        };
        let reason = if checkpoint.has_err() {
            let reason = fail_reason(checkpoint.get_err());
            debug!("store {store} region {id}: {reason:?}: {}", checkpoint.get_err().get_message());
            reason
        } else if checkpoint.get_checkpoint() == 0 {
            FailReason::NoCheckpoint
        } else if checkpoint.get_checkpoint() > max_ts {
            from_future.push(id);
            FailReason::FromFuture(checkpoint.get_checkpoint())
        } else {
            result.advanced.push((region.range, checkpoint.get_checkpoint()));
            continue;
        };
        result.failed.push(FailedRange { range: region.range, region: Some(id), store: Some(store), reason });
    }
    result.failed.extend(asked.into_values().map(|region| FailedRange {
        range: region.range,
        region: Some(region.id),
        store: Some(store),
        reason: FailReason::NoCheckpoint,
    }));
    // One line per batch, however many bogus ids a store sends.
    if let Some(first) = unasked.first() {
        warn!(
            "store {store} answered for {} regions it was not asked about (or twice), region {first} among them; \
             ignored",
            unasked.len()
        );
    }
    if let Some(first) = from_future.first() {
        warn!(
            "store {store} answered checkpoints above the current ts {max_ts} for {} regions (region {first} among \
             them); they are not trusted and their ranges do not advance",
            from_future.len()
        );
    }
}

/// The store did not refuse, it ran out of time: the call's deadline passed (ours or the
/// tick's), the poll was stopped, or the tick's time was gone before the store was dialed or
/// PD told its address. A store that cannot be connected to fails with `Error::Store`.
fn is_out_of_time(e: &Error) -> bool {
    matches!(e.root(), Error::Timeout(_) | Error::Stopped(_))
        || e.rpc_status() == Some(grpcio::RpcStatusCode::DEADLINE_EXCEEDED)
}

fn fail_reason(err: &errorpb::Error) -> FailReason {
    if err.has_epoch_not_match() {
        FailReason::EpochNotMatch
    } else if err.has_not_leader() {
        FailReason::NotLeader
    } else {
        FailReason::RegionError(err.get_message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::cluster::testing::{regions_from_boundaries, FixedDialer, MemMeta};
    use crate::proto::logbackuppb::RegionCheckpoint;
    use crate::testing::warnings_of;

    fn region(id: RegionId, start: &str, end: &str, leader: Option<StoreId>) -> RegionWithLeader {
        RegionWithLeader {
            id,
            range: KeyRange::new(start, end),
            epoch_version: 5,
            conf_ver: 1,
            leader_store: leader,
            leader_peer_id: 0,
            peer_stores: vec![1, 2, 3],
        }
    }

    fn failed(region: &RegionWithLeader, store: Option<StoreId>, reason: FailReason) -> FailedRange {
        FailedRange { range: region.range.clone(), region: Some(region.id), store, reason }
    }

    fn answer(id: RegionId, checkpoint: Ts, err: Option<errorpb::Error>) -> RegionCheckpoint {
        let mut cp = RegionCheckpoint::default();
        cp.mut_region().set_id(id);
        cp.set_checkpoint(checkpoint);
        if let Some(err) = err {
            cp.set_err(err);
        }
        cp
    }

    #[test]
    fn plan_groups_regions_by_leader_in_batches_and_fails_leaderless_ones() {
        let regions = vec![
            region(1, "", "b", Some(1)),
            region(2, "b", "c", Some(2)),
            region(3, "c", "d", Some(1)),
            region(4, "d", "e", None),
            region(5, "e", "", Some(1)),
        ];
        let mut failed_ranges = Vec::new();
        let plans = plan_requests(regions.clone(), 2, &mut failed_ranges);
        assert_eq!(
            plans,
            vec![
                StorePlan {
                    store: 1,
                    batches: vec![vec![regions[0].clone(), regions[2].clone()], vec![regions[4].clone()]]
                },
                StorePlan { store: 2, batches: vec![vec![regions[1].clone()]] },
            ]
        );
        assert_eq!(failed_ranges, vec![failed(&regions[3], None, FailReason::NoLeader)]);
        let req = request_for(&plans[0].batches[0]);
        let sent: Vec<(u64, u64)> = req.get_regions().iter().map(|r| (r.get_id(), r.get_epoch_version())).collect();
        assert_eq!(sent, vec![(1, 5), (3, 5)]);
    }

    #[test]
    fn answers_are_matched_by_region_id_to_the_range_that_was_asked_about() {
        let batch: Vec<_> = ["a", "b", "c", "d", "e", "f"]
            .windows(2)
            .enumerate()
            .map(|(i, w)| region(i as RegionId + 1, w[0], w[1], Some(7)))
            .collect();
        let mut not_leader = errorpb::Error::default();
        not_leader.set_message("the region 1 isn't in the region_manager of log backup".into());
        not_leader.mut_not_leader().set_region_id(1);
        let mut stale = errorpb::Error::default();
        stale.set_message("the region 2 has recorded version 6, but you sent 5".into());
        stale.mut_epoch_not_match();
        let mut busy = errorpb::Error::default();
        busy.set_message("busy".into());
        busy.mut_server_is_busy();

        let mut resp = GetLastFlushTSOfRegionResponse::default();
        // Out of order, with an id never asked about and a duplicate: both ignored.
        for cp in [
            answer(3, 30, None),
            answer(9, 90, None),
            answer(1, 0, Some(not_leader)),
            answer(2, 0, Some(stale)),
            answer(3, 31, None),
            answer(4, 0, None),
            answer(5, 0, Some(busy)),
        ] {
            resp.mut_checkpoints().push(cp);
        }
        let mut result = CollectResult::default();
        apply_answer(7, batch.clone(), &resp, Ts::MAX, &mut result);
        result.failed.sort();
        assert_eq!(result.advanced, vec![(KeyRange::new("c", "d"), 30)]);
        assert_eq!(
            result.failed,
            vec![
                failed(&batch[0], Some(7), FailReason::NotLeader),
                failed(&batch[1], Some(7), FailReason::EpochNotMatch),
                failed(&batch[3], Some(7), FailReason::NoCheckpoint),
                failed(&batch[4], Some(7), FailReason::RegionError("busy".into())),
            ]
        );
        assert!(result.store_errors.is_empty());
    }

    #[test]
    fn bogus_region_ids_and_leaderless_regions_are_logged_once_per_batch() {
        // 20 000 bogus ids once gave 100 000 log lines in 6 s.
        let batch = vec![region(1, "a", "b", Some(7))];
        let mut resp = GetLastFlushTSOfRegionResponse::default();
        for id in 100..2100 {
            resp.mut_checkpoints().push(answer(id, 5, None));
        }
        let mut result = CollectResult::default();
        let lines = warnings_of(|| apply_answer(7, batch, &resp, 100, &mut result));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("2000 regions") && lines[0].contains("region 100"), "{lines:?}");

        let leaderless: Vec<_> = (0..500).map(|i| region(i, "", "", None)).collect();
        let lines = warnings_of(|| drop(plan_requests(leaderless, 10, &mut Vec::new())));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("500 regions have no leader"), "{lines:?}");
    }

    #[test]
    fn a_checkpoint_above_now_fails_its_region_instead_of_advancing_it() {
        let batch = vec![region(1, "a", "b", Some(7)), region(2, "b", "c", Some(7)), region(3, "c", "d", Some(7))];
        let mut resp = GetLastFlushTSOfRegionResponse::default();
        for cp in [answer(1, 100, None), answer(2, 101, None), answer(3, u64::MAX, None)] {
            resp.mut_checkpoints().push(cp);
        }
        let mut result = CollectResult::default();
        apply_answer(7, batch.clone(), &resp, 100, &mut result);
        result.failed.sort();
        assert_eq!(result.advanced, vec![(KeyRange::new("a", "b"), 100)], "the bound itself is allowed");
        assert_eq!(
            result.failed,
            vec![
                failed(&batch[1], Some(7), FailReason::FromFuture(101)),
                failed(&batch[2], Some(7), FailReason::FromFuture(u64::MAX)),
            ]
        );
        assert_eq!(FailReason::FromFuture(1).label(), "from-future");
    }

    #[test]
    fn the_cache_covers_what_it_holds_and_names_the_gaps() {
        let mut cache = RegionCache::default();
        cache.insert(&[region(1, "b", "d", Some(1)), region(2, "d", "f", Some(1))]);
        cache.insert(&[region(3, "h", "", Some(1))]);
        let ids = |regions: Vec<RegionWithLeader>| regions.iter().map(|r| r.id).collect::<Vec<_>>();

        let (regions, gaps) = cache.cover(&KeyRange::new("c", "e"));
        assert_eq!((ids(regions), gaps), (vec![1, 2], vec![]));
        let (regions, gaps) = cache.cover(&KeyRange::full());
        assert_eq!(
            (ids(regions), gaps),
            (vec![1, 2, 3], vec![KeyRange::new("", "b"), KeyRange::new("f", "h")]),
            "regions reaching +∞ end the cover"
        );
        let (regions, gaps) = cache.cover(&KeyRange::new("e", "g"));
        assert_eq!((ids(regions), gaps), (vec![2], vec![KeyRange::new("f", "g")]));

        // A fresh scan replaces every entry it overlaps; a failed region is forgotten.
        cache.insert(&[region(4, "c", "e", Some(2))]);
        let (regions, gaps) = cache.cover(&KeyRange::new("b", "f"));
        assert_eq!((ids(regions), gaps), (vec![4], vec![KeyRange::new("b", "c"), KeyRange::new("e", "f")]));
        cache.forget(&failed(&region(3, "h", "", Some(1)), Some(1), FailReason::EpochNotMatch));
        cache.forget(&failed(&region(9, "c", "e", Some(1)), Some(1), FailReason::NotLeader));
        assert_eq!(cache.len(), 1, "only region 3 went: region 9 is not what the cache holds at c");
    }

    #[test]
    fn a_region_inside_two_ranges_is_asked_about_once() {
        let meta = MemMeta::new(regions_from_boundaries(&[b"b", b"d"], &[1]));
        let ranges = [KeyRange::new("a", "c"), KeyRange::new("c", "e")];
        let regions =
            scan_regions(&meta, &mut RegionCache::default(), &ranges, &CollectorConfig::default(), &mut Vec::new())
                .unwrap()
                .0;
        let got: Vec<_> = regions.iter().map(|r| (r.id, r.range.clone())).collect();
        assert_eq!(got, vec![(1, KeyRange::new("", "b")), (2, KeyRange::new("b", "d")), (3, KeyRange::new("d", ""))]);
    }

    #[test]
    fn many_scattered_gaps_are_scanned_in_pages_and_a_few_one_by_one() {
        let keys: Vec<Vec<u8>> = (0..9_999).map(|i| format!("{i:06}").into_bytes()).collect();
        let boundaries: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let meta = MemMeta::new(regions_from_boundaries(&boundaries, &[1, 2, 3]));
        let config = CollectorConfig::default();
        let scan = |cache: &mut RegionCache, ranges: &[KeyRange]| {
            let scans_before = meta.scans.lock().len();
            let (regions, cached) = scan_regions(&meta, cache, ranges, &config, &mut Vec::new()).unwrap();
            (regions, cached, meta.scans.lock().len() - scans_before)
        };
        let mut cache = RegionCache::default();
        let (all, _, cold_scans) = scan(&mut cache, &[KeyRange::full()]);
        assert_eq!((all.len(), cold_scans), (10_000, 5), "10 000 regions take five pages of 2048");

        // Every other region fails: 5 000 gaps between 5 000 cached regions.
        for region in all.iter().step_by(2) {
            cache.forget(&failed(region, region.leader_store, FailReason::EpochNotMatch));
        }
        let (regions, cached, scans) = scan(&mut cache, &[KeyRange::full()]);
        assert_eq!(regions, all, "the same regions as a fresh scan");
        assert_eq!(scans, 5, "pages, not one call per gap");
        assert_eq!(cached, HashSet::from([all[9_999].id]), "all but the one after the last gap came from PD again");
        assert_eq!(cache.len(), 10_000);

        // A few gaps are cheaper one by one than re-scanning the cached regions around them.
        let ranges = [KeyRange::new("001000", "002000")];
        for region in &all[1001..1001 + 2 * GAPS_SCANNED_ONE_BY_ONE][..] {
            cache.forget(&failed(region, region.leader_store, FailReason::NotLeader));
        }
        let (regions, cached, scans) = scan(&mut cache, &ranges);
        assert_eq!(regions, all[1001..2001].to_vec());
        assert_eq!((scans, cached.len()), (1, 1000 - 2 * GAPS_SCANNED_ONE_BY_ONE), "one contiguous gap");
        for region in all[1001..2001].iter().step_by(40) {
            cache.forget(&failed(region, region.leader_store, FailReason::NotLeader));
        }
        let (regions, _, scans) = scan(&mut cache, &ranges);
        assert_eq!((regions, scans), (all[1001..2001].to_vec(), 25), "25 gaps, 25 calls");
    }

    /// At 10^6 regions a re-scan did not fit one tick: cut short, it kept nothing, so every
    /// tick scanned the same first pages again and no poll ever ran.
    #[test]
    fn the_pages_of_a_scan_cut_short_are_kept_and_the_next_scan_goes_on_after_them() {
        let keys: Vec<Vec<u8>> = (0..9).map(|i| format!("{i}").into_bytes()).collect();
        let boundaries: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let all = regions_from_boundaries(&boundaries, &[1]);
        let meta = MemMeta::new(all.clone());
        let config = CollectorConfig {
            page_size: 4,
            scan_retry: ScanRetry { attempts: 1, ..ScanRetry::default() },
            ..Default::default()
        };
        meta.script(Ok(all[..4].to_vec()));
        meta.script(Err(Error::Timeout("ScanRegions (its deadline has passed)".into())));
        let mut cache = RegionCache::default();
        assert!(scan_regions(&meta, &mut cache, &[KeyRange::full()], &config, &mut Vec::new()).is_err());
        assert_eq!(cache.len(), 4, "the first page is kept");

        let scans_before = meta.scans.lock().len();
        let (regions, cached) = scan_regions(&meta, &mut cache, &[KeyRange::full()], &config, &mut Vec::new()).unwrap();
        assert_eq!(regions, all);
        assert_eq!(cached.len(), 4);
        assert_eq!(meta.scans.lock()[scans_before].0, all[4].range.start, "the next scan starts after the kept page");
    }

    /// In a rolling restart (10^5 regions, polling only) looking up the regions of the
    /// evicted leaders outlasted the tick, and the poll failed as a whole: every range
    /// lagged, tick after tick (93 s at load 14).
    #[test]
    fn regions_pd_cannot_list_in_time_wait_and_the_cached_ones_are_still_asked() {
        let (sim, pd, dialer, pool) = sim_cluster(40);
        let all = pd.region_scan(b"", b"", 100).unwrap();
        let meta = MemMeta::new(all.clone());
        meta.script(Err(Error::Timeout("PD ScanRegions (its deadline has passed)".into())));
        let mut cache = RegionCache::default();
        cache.insert(&all[..20]);
        sim.flush_all();
        let config =
            CollectorConfig { scan_retry: ScanRetry { attempts: 1, ..ScanRetry::default() }, ..Default::default() };
        let mut poll = || collect_checkpoints_cached(&meta, &dialer, &pool, &mut cache, &[KeyRange::full()], &config);
        let result = poll().unwrap();
        let advanced: Vec<&KeyRange> = result.advanced.iter().map(|(range, _)| range).collect();
        assert_eq!(advanced, all[..20].iter().map(|r| &r.range).collect::<Vec<_>>(), "the cached regions");
        for (range, ts) in &result.advanced {
            let truth = sim.region_at(&range.start).leader_store.and_then(|leader| sim.last_flush_ts(leader));
            assert!(truth.is_some_and(|truth| *ts <= truth), "{range} advanced to {ts}, truth {truth:?}");
        }
        assert_eq!(poll().unwrap().advanced.len(), 40, "the next poll looks the rest up");
    }

    #[test]
    fn a_poll_where_most_stores_run_out_of_time_keeps_every_region() {
        let mut cache = RegionCache::default();
        let asked: HashSet<StoreId> = [1, 2, 3].into();
        for _ in 0..3 {
            assert_eq!(cache.note_misses(&asked, &[1, 2, 3]), asked, "the poll outgrew its deadline");
            assert_eq!(cache.note_misses(&asked, &[1, 2]), [1, 2].into());
        }
        assert_eq!(cache.note_misses(&asked, &[3]), [3].into(), "one store late: it counts");
        assert_eq!(cache.note_misses(&asked, &[3]), HashSet::new(), "late twice in a row: looked up again");
    }

    #[test]
    fn failing_stores_fail_exactly_their_regions_and_a_hung_one_costs_only_the_deadline() {
        // Accepts TCP connections but never speaks HTTP/2: calls wait for their deadline.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut regions = regions_from_boundaries(&[b"b", b"c", b"d"], &[1, 2]);
        regions[3].leader_store = None;
        let meta = MemMeta::new(regions.clone());
        // Store 1 cannot be dialed.
        let dialer = FixedDialer::new([(2, silent.local_addr().unwrap().to_string())]);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let config = CollectorConfig { rpc_timeout: Duration::from_millis(500), ..Default::default() };

        let started = Instant::now();
        let result = collect_checkpoints(&meta, &dialer, &pool, &[KeyRange::full()], &config).unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(3),
            "took {took:?}: {:?}",
            result.store_errors
        );

        assert!(result.advanced.is_empty());
        assert_eq!(
            result.failed,
            vec![
                failed(&regions[0], Some(1), FailReason::StoreFailed),
                failed(&regions[1], Some(2), FailReason::StoreFailed),
                failed(&regions[2], Some(1), FailReason::StoreFailed),
                failed(&regions[3], None, FailReason::NoLeader),
            ]
        );
        let errors: Vec<String> = result.store_errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("store 1") && errors[0].contains("cannot connect"), "{errors:?}");
        assert!(errors[1].contains("store 2") && errors[1].contains("DEADLINE_EXCEEDED"), "{errors:?}");
        assert_eq!(*dialer.cleared.lock(), vec![1, 2]);
    }

    #[test]
    fn only_time_running_out_counts_as_out_of_time() {
        let status = |code| {
            Error::rpc("GetLastFlushTSOfRegion", "store 1", grpcio::Error::RpcFailure(grpcio::RpcStatus::new(code)))
        };
        let store_down = Error::Store { store_id: 1, address: "127.0.0.1:9".into(), reason: "cannot connect".into() };
        for (error, out_of_time) in [
            (status(grpcio::RpcStatusCode::DEADLINE_EXCEEDED), true),
            (Error::Timeout("PD GetStore (its deadline has passed)".into()).context("dialing store 1"), true),
            (Error::Stopped("polling checkpoints".into()), true),
            (status(grpcio::RpcStatusCode::UNAVAILABLE), false),
            (store_down, false),
        ] {
            assert_eq!(is_out_of_time(&error), out_of_time, "{error}");
        }
    }

    #[test]
    fn a_store_out_of_time_keeps_its_regions_until_it_misses_twice_in_a_row() {
        // Store 1 accepts calls and never answers; store 2 cannot be dialed.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let regions = regions_from_boundaries(&[b"b", b"c", b"d"], &[1, 2]);
        let meta = MemMeta::new(regions.clone());
        let dialer = FixedDialer::new([(1, silent.local_addr().unwrap().to_string())]);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let config = CollectorConfig { rpc_timeout: Duration::from_millis(200), ..Default::default() };
        let mut cache = RegionCache::default();
        let poll = |cache: &mut RegionCache| {
            let result =
                collect_checkpoints_cached(&meta, &dialer, &pool, cache, &[KeyRange::full()], &config).unwrap();
            assert!(result.advanced.is_empty(), "{:?}", result.advanced);
            let expected: Vec<_> = regions.iter().map(|r| failed(r, r.leader_store, FailReason::StoreFailed)).collect();
            assert_eq!(result.failed, expected);
            assert_eq!(result.out_of_time, vec![1]);
            let ids: Vec<RegionId> = cache.by_start.values().map(|r| r.id).collect();
            (meta.scans.lock().len(), ids)
        };
        // Store 1's regions (1 and 3) stay after one miss; store 2's are dropped at once.
        assert_eq!(poll(&mut cache), (1, vec![1, 3]));
        // Asked again without a PD call; the second miss in a row drops them too.
        assert_eq!(poll(&mut cache), (3, vec![]), "one scan for store 2's two gaps, none for store 1");
        assert_eq!(poll(&mut cache), (4, vec![1, 3]), "looked up afresh, the count starts again");
    }

    /// A simulated cluster of three stores, with PD and the stores dialed the advancer's way.
    fn sim_cluster(
        regions: usize,
    ) -> (crate::sim::SimCluster, crate::cluster::PdClient, FixedDialer, rayon::ThreadPool) {
        use crate::cluster::{PdClient, PdConfig};
        use crate::security::Security;
        use crate::sim::{SimCluster, SimConfig};

        let sim = SimCluster::start(SimConfig { stores: 3, regions, ..Default::default() }).unwrap();
        let pd = PdClient::connect(
            PdConfig { timeout: Duration::from_secs(2), ..PdConfig::new(vec![sim.pd_endpoint()]) },
            Security::insecure(),
        )
        .unwrap();
        let dialer = FixedDialer::new(sim.store_ids().into_iter().map(|s| (s, sim.store_address(s))));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        (sim, pd, dialer, pool)
    }

    #[test]
    fn a_hung_store_whose_leaders_moved_never_advances_them_past_the_new_leaders_flush() {
        let (sim, pd, dialer, pool) = sim_cluster(24);
        let config = CollectorConfig { rpc_timeout: Duration::from_millis(300), ..Default::default() };
        let mut cache = RegionCache::default();
        let poll = |cache: &mut RegionCache| {
            let result = collect_checkpoints_cached(&pd, &dialer, &pool, cache, &[KeyRange::full()], &config).unwrap();
            // The truth of a range: what its leader now has flushed.
            for (range, ts) in &result.advanced {
                let region = sim.region_at(&range.start);
                let truth = region.leader_store.and_then(|leader| sim.last_flush_ts(leader));
                assert!(truth.is_some_and(|truth| *ts <= truth), "{range} advanced to {ts}, truth {truth:?}");
            }
            result
        };
        sim.flush_all();
        let first = poll(&mut cache);
        assert!(first.failed.is_empty(), "{:?}", first.failed);

        let moved: Vec<KeyRange> =
            sim.regions().into_iter().filter(|r| r.leader_store == Some(1)).map(|r| r.range).collect();
        assert!(!moved.is_empty());
        sim.hang_store(1);
        assert_eq!(sim.fail_over(1).unwrap(), moved.len());
        sim.flush_all();
        let scans_before = sim.pd_scans().0;
        // Asked of the hung store (cached) until its second miss, then looked up again.
        for _ in 0..MISSES_BEFORE_RESCAN {
            let result = poll(&mut cache);
            assert_eq!(result.out_of_time, vec![1]);
            assert!(result.advanced.iter().all(|(range, _)| !moved.contains(range)));
        }
        assert_eq!(sim.pd_scans().0, scans_before, "no PD call while the store was only late");
        let found = poll(&mut cache);
        assert!(found.failed.is_empty(), "{:?}", found.failed);
        for range in &moved {
            assert!(found.advanced.iter().any(|(r, _)| r == range), "{range} not found at its new leader");
        }
        // The hung store wakes up and answers its parked calls: nothing moves backwards or past the truth.
        sim.resume_store(1);
        let after = poll(&mut cache);
        assert!(after.failed.is_empty(), "{:?}", after.failed);
    }

    #[test]
    fn a_lost_stores_scattered_regions_are_found_again_in_the_same_poll_with_pages_of_scans() {
        let (sim, pd, dialer, pool) = sim_cluster(600);
        let config = CollectorConfig { rpc_timeout: Duration::from_secs(5), page_size: 32, ..Default::default() };
        let mut cache = RegionCache::default();
        let mut poll = || collect_checkpoints_cached(&pd, &dialer, &pool, &mut cache, &[KeyRange::full()], &config);
        sim.flush_all();
        assert!(poll().unwrap().failed.is_empty());

        // Store 2 goes (it can no longer be dialed) and PD moves its leaders to the others.
        dialer.addresses.lock().remove(&2);
        let moved = sim.fail_over(2).unwrap();
        assert!(moved > 100, "{moved} regions moved");
        sim.flush_all();
        let scans_before = sim.pd_scans().0;
        let result = poll().unwrap();
        assert!(result.failed.is_empty(), "{:?}", result.failed);
        assert_eq!(result.advanced.len(), 600);
        let scans = sim.pd_scans().0 - scans_before;
        assert!(scans <= 600 / 32 + 1, "{scans} PD calls to find {moved} moved regions: a page of 32 each at most");
    }

    #[test]
    fn an_interrupt_ends_the_wait_on_a_hung_store_and_fails_its_regions() {
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let regions = regions_from_boundaries(&[b"b"], &[1]);
        let meta = MemMeta::new(regions.clone());
        let dialer = FixedDialer::new([(1, silent.local_addr().unwrap().to_string())]);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let config = CollectorConfig { rpc_timeout: Duration::from_secs(60), ..Default::default() };
        let interrupt = crate::worker::Interrupt::default();
        // Fired while the poll waits (or, on a slow machine, before it sends: the same end).
        let firing = {
            let interrupt = interrupt.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                interrupt.fire();
            })
        };
        let started = Instant::now();
        let scope = deadline::Scope { deadline: None, interrupt: Some(interrupt) };
        let result = scope.run(|| collect_checkpoints(&meta, &dialer, &pool, &[KeyRange::full()], &config)).unwrap();
        let took = started.elapsed();
        firing.join().unwrap();
        assert!(took < Duration::from_secs(10), "a stopped poll waited {took:?} on a hung store");
        assert!(result.advanced.is_empty());
        let expected: Vec<_> = regions.iter().map(|r| failed(r, Some(1), FailReason::StoreFailed)).collect();
        assert_eq!(result.failed, expected);
    }
}
