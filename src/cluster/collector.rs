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

use super::region_cache::{RegionCache, Walked};
use super::region_iter::{RegionIter, ScanRetry, DEFAULT_PAGE_SIZE};
use super::{deadline, ClusterMeta, LogBackupService, RegionWithLeader};
use crate::error::{Error, Result};
use crate::proto::errorpb;
use crate::proto::logbackuppb::{GetLastFlushTSOfRegionRequest, GetLastFlushTSOfRegionResponse, RegionIdentity};
use crate::proto::logbackuppb_grpc::LogBackupClient;
use crate::spans::collapse;
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
    /// The stores of `store_errors`; sorted.
    pub failed_stores: Vec<StoreId>,
    /// Regions per request sent (upstream's `batch_size{type="checkpoint"}`).
    pub batch_sizes: Vec<usize>,
    /// How long listing each range's regions from PD took (upstream's `get-regions-in-range`
    /// step); a range the cache tiles lists nothing.
    pub range_scans: Vec<Duration>,
    /// Stores that only ran out of time (the deadline passed or the poll was stopped), as
    /// opposed to refusing, failing the call or not accepting a connection; sorted.
    pub out_of_time: Vec<StoreId>,
    /// Why listing the ranges' regions stopped part way: the regions after the last page
    /// listed were not asked about (neither advanced nor failed).
    pub unlisted: Option<Error>,
}

/// Asks the leaders of all regions overlapping `ranges` for their last flushed checkpoint.
/// Fails only when the regions cannot all be listed; everything a store or region gets wrong
/// is reported in the result. Takes at most the scan, one dial deadline and
/// `config.rpc_timeout`, and no longer than the tick's deadline when one is in force
/// (the scope the ticker sets; see `docs/architecture.md`, "Lifecycle guarantees").
pub fn collect_checkpoints(
    meta: &dyn ClusterMeta,
    service: &dyn LogBackupService,
    pool: &rayon::ThreadPool,
    ranges: &[KeyRange],
    config: &CollectorConfig,
) -> Result<CollectResult> {
    let mut result = collect_checkpoints_cached(meta, service, pool, &mut RegionCache::default(), ranges, config);
    match result.unlisted.take() {
        Some(e) => Err(e),
        None => Ok(result),
    }
}

/// [`collect_checkpoints`] that asks PD only about the parts of `ranges` the cache does not
/// tile, and drops the regions that failed from the cache (see [`RegionCache`] for which).
///
/// The stores are asked while PD still lists: each page of regions goes out in batches as
/// they fill, so the listing and the stores' answers overlap (a cold start lists every region
/// of the cluster). A listing that fails or runs out of time part way leaves the rest of the
/// ranges unasked (`unlisted`); what was asked is answered as usual.
///
/// A cached region that failed in a way PD's newer view may cure (its leader moved, it split
/// or merged, its store went) is looked up again and asked about once more within the same
/// deadline: a leader move must not cost its range a whole tick. Takes at most two scans,
/// two dial deadlines and `config.rpc_timeout` after the last batch is sent, and no longer
/// than the tick's deadline.
pub fn collect_checkpoints_cached(
    meta: &dyn ClusterMeta,
    service: &dyn LogBackupService,
    pool: &rayon::ThreadPool,
    cache: &mut RegionCache,
    ranges: &[KeyRange],
    config: &CollectorConfig,
) -> CollectResult {
    let began = Instant::now();
    let mut result = CollectResult::default();
    cache.begin_poll();
    let first = ask_as_listed(meta, service, pool, cache, ranges, config, &|_| true, None, began, &mut result);
    let kept = cache.note_misses(&first.stores, &result.out_of_time);
    let mut forgotten = Vec::new();
    for failed in std::mem::take(&mut result.failed) {
        // A not-leader from the leader PD named this poll, or lately: not flushed yet.
        let fresh = failed.region.filter(|id| !first.cached.contains(id));
        let awaiting = failed.region.filter(|&id| Some(id) == fresh || cache.awaits_flush(id));
        if let (FailReason::NotLeader, Some(id)) = (&failed.reason, awaiting) {
            if fresh.is_some() {
                cache.await_flush(id);
            }
            result.failed.push(failed);
        } else if failed.reason == FailReason::StoreFailed && failed.store.is_some_and(|store| kept.contains(&store)) {
            result.failed.push(failed);
        } else {
            cache.forget(&failed);
            forgotten.push(failed);
        }
    }
    let (stale, failed): (Vec<FailedRange>, Vec<FailedRange>) = forgotten
        .into_iter()
        .partition(|f| f.region.is_some_and(|id| first.cached.contains(&id)) && f.reason.may_be_stale_location());
    result.failed.extend(failed);
    if !stale.is_empty() && Instant::now() < first.deadline {
        let mut stale_ranges: Vec<KeyRange> = stale.iter().map(|f| f.range.clone()).collect();
        stale_ranges.sort();
        // Looked up as gaps of the whole ranges, not one range each: a lost store's regions
        // are thousands of scattered ranges, which take a few pages rather than a call each.
        let mut retried = CollectResult::default();
        let wanted = |r: &RegionWithLeader| overlaps_any(&stale_ranges, &r.range);
        ask_as_listed(meta, service, pool, cache, ranges, config, &wanted, Some(first.deadline), began, &mut retried);
        // Out of time by now whatever the store: nothing of the retry is kept, but for the
        // leaders PD just named that have not flushed yet.
        for failed in &retried.failed {
            match failed.region {
                Some(id) if failed.reason == FailReason::NotLeader => cache.await_flush(id),
                _ => cache.forget(failed),
            }
        }
        if let Some(e) = retried.unlisted {
            warn!("looking up {} regions that failed again: {e}", stale.len());
            result.failed.extend(stale);
        }
        result.out_of_time.extend(retried.out_of_time);
        result.advanced.extend(retried.advanced);
        result.failed.extend(retried.failed);
        result.store_errors.extend(retried.store_errors);
        result.failed_stores.extend(retried.failed_stores);
        result.batch_sizes.extend(retried.batch_sizes);
    } else {
        result.failed.extend(stale);
    }
    result.advanced.sort();
    result.failed.sort();
    result.out_of_time.sort();
    result.out_of_time.dedup();
    result.failed_stores.sort();
    result.failed_stores.dedup();
    info!(
        "collected checkpoints of {} regions in {} ranges in {:?} (listed in {:?}): {} advanced, {} failed, {} stores \
         failed{}",
        first.regions,
        ranges.len(),
        began.elapsed(),
        first.listed_in,
        result.advanced.len(),
        result.failed.len(),
        result.store_errors.len(),
        if result.unlisted.is_some() { ", listing cut short" } else { "" }
    );
    result
}

/// What [`ask_as_listed`] saw.
struct Asked {
    /// Regions taken (asked about, or failed for want of a leader).
    regions: usize,
    /// The regions the cache answered for.
    cached: HashSet<RegionId>,
    /// The stores asked.
    stores: HashSet<StoreId>,
    /// The latest deadline a call was sent with.
    deadline: Instant,
    listed_in: Duration,
}

/// Lists the regions of `ranges` that are `wanted` and asks their leaders, into `result`:
/// every batch is sent as soon as it is full and its store dialed (stores are dialed in
/// parallel on `pool` the first time one of their regions comes), the rest once the
/// listing ends; then every answer is waited for. Calls get `deadline`, by default
/// `config.rpc_timeout` from when each is sent.
#[allow(clippy::too_many_arguments)]
fn ask_as_listed(
    meta: &dyn ClusterMeta,
    service: &dyn LogBackupService,
    pool: &rayon::ThreadPool,
    cache: &mut RegionCache,
    ranges: &[KeyRange],
    config: &CollectorConfig,
    wanted: &(dyn Fn(&RegionWithLeader) -> bool + Sync),
    deadline: Option<Instant>,
    began: Instant,
    result: &mut CollectResult,
) -> Asked {
    let started = Instant::now();
    let mut fanout = Fanout::new(config, deadline);
    let mut cached = HashSet::new();
    // The tick's deadline and stop go along to the dialing threads.
    let scope = deadline::Scope::current();
    let (dialed_tx, dialed_rx) = crossbeam_channel::unbounded();
    let listed_in = pool.in_place_scope(|threads| {
        let mut dialing = 0;
        let listed = list_regions(meta, cache, ranges, config, &mut result.range_scans, |regions, from_cache| {
            if from_cache {
                cached.extend(regions.iter().filter(|r| wanted(r)).map(|r| r.id));
            }
            fanout.add(regions.into_iter().filter(|r| wanted(r)));
            for store in fanout.to_dial.drain(..) {
                dialing += 1;
                let (dialed, scope) = (dialed_tx.clone(), scope.clone());
                threads.spawn(move |_| {
                    let _ = dialed.send((store, scope.run(|| service.client(store))));
                });
            }
            for (store, client) in dialed_rx.try_iter() {
                dialing -= 1;
                fanout.dialed(store, client);
            }
        });
        let listed_in = started.elapsed();
        if let Err(e) = listed {
            result.unlisted = Some(e);
        }
        drop(dialed_tx);
        // Each dial ends by its own deadline (and the tick's).
        while dialing > 0 {
            let Ok((store, client)) = dialed_rx.recv() else { break };
            dialing -= 1;
            fanout.dialed(store, client);
        }
        listed_in
    });
    let (calls, asked) = fanout.finish(result);
    for store in calls {
        store.wait_into(service, config.max_ts, began, result);
    }
    Asked { cached, listed_in, ..asked }
}

/// Hands `take` the regions of every range, a batch at a time: first those the cache holds
/// (`true`), then each page PD lists for the rest (`false`), each kept in the cache as it
/// arrives: a listing the tick's deadline cuts short is not lost, and the next poll's gaps
/// start after what it got. PD is asked for the next page on a thread of its own while the
/// last one is cached and handed out (at 10^6 regions, 490 pages one after another). Fails
/// when a page cannot be listed; the pages before it were taken.
fn list_regions(
    meta: &dyn ClusterMeta,
    cache: &mut RegionCache,
    ranges: &[KeyRange],
    config: &CollectorConfig,
    timings: &mut Vec<Duration>,
    mut take: impl FnMut(Vec<RegionWithLeader>, bool),
) -> Result<()> {
    // A poll's ranges come collapsed already (87 082 of them at 10^6 regions).
    let collapsed;
    let in_order = ranges.iter().all(|r| r.end.is_empty() || r.start < r.end)
        && ranges.windows(2).all(|w| !w[0].end.is_empty() && w[0].end <= w[1].start);
    let ranges = if in_order {
        ranges
    } else {
        collapsed = collapse(ranges);
        collapsed.as_slice()
    };
    let started = Instant::now();
    let (cached, scans) = plan_listing(cache, ranges, config.page_size, true);
    take(cached, true);
    // Ranges the cache tiles cost the listing thread nothing (and the step is still timed,
    // as upstream times every look-up: the cache is where a warmed-up owner gets them).
    if scans.is_empty() {
        timings.push(started.elapsed());
        return Ok(());
    }
    let (sender, pages) = crossbeam_channel::bounded(PAGES_AHEAD);
    let scope = deadline::Scope::current();
    std::thread::scope(|threads| {
        let scans = &scans;
        std::thread::Builder::new()
            .name("sh-region-list".into())
            .spawn_scoped(threads, move || scope.run(|| list_scans(meta, scans, config, &sender)))
            .map_err(|source| Error::Io { what: "starting the region listing thread".into(), source })?;
        // Ends when the lister has sent everything (or we stop taking, which ends it).
        for listed in pages {
            match listed {
                Listed::Page(page) => {
                    cache.insert(&page);
                    // A scan joined across ranges lists the regions between them too: cached,
                    // not asked about.
                    take(page.into_iter().filter(|r| overlaps_any(ranges, &r.range)).collect(), false);
                }
                Listed::All(took) => timings.push(took),
                Listed::Failed(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// Pages PD may list ahead of the one being taken.
const PAGES_AHEAD: usize = 2;

/// What the listing thread sends, in order.
enum Listed {
    Page(Vec<RegionWithLeader>),
    /// Every scan is listed, in this long.
    All(Duration),
    /// The last message.
    Failed(Error),
}

/// Lists each scan page by page into `pages`, until done, a page fails or nobody takes
/// them any more.
fn list_scans(
    meta: &dyn ClusterMeta,
    scans: &[KeyRange],
    config: &CollectorConfig,
    pages: &crossbeam_channel::Sender<Listed>,
) {
    let started = Instant::now();
    for scan in scans {
        let mut iter = RegionIter::new(meta, scan);
        iter.page_size = config.page_size;
        iter.retry = config.scan_retry.clone();
        while !iter.done() {
            let (listed, failed) = match iter.next_page() {
                Ok(page) => (Listed::Page(page), false),
                Err(e) => (Listed::Failed(e), true),
            };
            if pages.send(listed).is_err() || failed {
                return;
            }
        }
    }
    let _ = pages.send(Listed::All(started.elapsed()));
}

/// Whether `range` overlaps one of `sorted`, ranges in key order that do not overlap.
fn overlaps_any(sorted: &[KeyRange], range: &KeyRange) -> bool {
    let first_ending_after_start = sorted.partition_point(|r| !r.end.is_empty() && r.end <= range.start);
    sorted.get(first_ending_after_start).is_some_and(|r| r.overlaps(range))
}

/// Up to this many uncached parts in all are listed one PD call each.
const GAPS_SCANNED_ONE_BY_ONE: usize = 32;
/// Cached regions listed again rather than making one more PD call.
const RESCAN_RATHER_THAN_CALL: usize = 256;

/// Splits what `ranges` (in key order, apart) need into the regions the cache holds and the
/// ranges PD lists (what [`RegionCache::walk`] found uncovered). A few uncached parts are
/// listed one call each; more are joined into paged scans wherever fewer than a page (and
/// than [`RESCAN_RATHER_THAN_CALL`]) of cache entries lie between two of them, within one range or across ranges (the
/// cached regions in between are listed again). A lost store leaves thousands of scattered
/// regions uncached, in as many lagging ranges: a call each (a PD call per range at a
/// new owner's first polls, 4 752 a tick at 10^6 regions) made the next poll slower still.
/// So the calls are one per page of what is listed, or one per part at most when the
/// parts lie further apart. Without `with_regions`, the regions are only counted (none
/// returned).
pub(crate) fn plan_listing(
    cache: &RegionCache,
    ranges: &[KeyRange],
    page_size: usize,
    with_regions: bool,
) -> (Vec<RegionWithLeader>, Vec<KeyRange>) {
    // Joining never takes more calls below a page between; and about what one more call
    // costs, counted in regions listed again, is a few hundred.
    let rescan_below = page_size.clamp(1, RESCAN_RATHER_THAN_CALL);
    let walked = cache.walk(ranges, rescan_below, with_regions);
    let join = walked.iter().filter(|w| matches!(w, Walked::Gap { .. })).count() > GAPS_SCANNED_ONE_BY_ONE;
    let (mut cached, mut scans, mut since_scan) = (Vec::new(), Vec::<KeyRange>::new(), Vec::new());
    for step in walked {
        match step {
            Walked::Region(region) => since_scan.push(region),
            Walked::Gap { range, skipped } => match scans.last_mut() {
                Some(last) if join && since_scan.len() + skipped < rescan_below => {
                    last.end = range.end;
                    since_scan.clear();
                }
                _ => {
                    cached.append(&mut since_scan);
                    scans.push(range);
                }
            },
        }
    }
    cached.append(&mut since_scan);
    (cached, scans)
}

/// Regions on their way to their leaders: grouped by store in batches of
/// `config.batch_size`, each sent as soon as it is full and its store dialed, so that the
/// stores answer while PD still lists. Leaderless regions fail right away.
struct Fanout<'a> {
    config: &'a CollectorConfig,
    /// Every call's deadline (a retry within the first calls' time); `None`:
    /// `config.rpc_timeout` from when each call is sent.
    fixed_deadline: Option<Instant>,
    latest_deadline: Option<Instant>,
    stores: BTreeMap<StoreId, StoreFanout>,
    /// Stores seen for the first time, for the caller to dial.
    to_dial: Vec<StoreId>,
    /// A region inside two ranges is asked about once; one seen in two epochs (it changed
    /// between pages) in both, and the stale one fails.
    taken: HashSet<(RegionId, u64)>,
    failed: Vec<FailedRange>,
    batch_sizes: Vec<usize>,
}

/// One store's share of a [`Fanout`].
struct StoreFanout {
    link: Link,
    filling: Batch,
    /// Full batches waiting for the store to be dialed.
    unsent: Vec<Batch>,
    calls: Vec<(Batch, PendingAnswer)>,
}

enum Link {
    Dialing,
    Up(LogBackupClient),
    Down(Error),
}

impl<'a> Fanout<'a> {
    fn new(config: &'a CollectorConfig, fixed_deadline: Option<Instant>) -> Self {
        Fanout {
            config,
            fixed_deadline,
            latest_deadline: None,
            stores: BTreeMap::new(),
            to_dial: Vec::new(),
            taken: HashSet::new(),
            failed: Vec::new(),
            batch_sizes: Vec::new(),
        }
    }

    fn add(&mut self, regions: impl IntoIterator<Item = RegionWithLeader>) {
        for region in regions {
            if !self.taken.insert((region.id, region.epoch_version)) {
                continue;
            }
            let Some(store) = region.leader_store else {
                self.failed.push(FailedRange {
                    range: region.range,
                    region: Some(region.id),
                    store: None,
                    reason: FailReason::NoLeader,
                });
                continue;
            };
            let share = self.stores.entry(store).or_insert_with(|| {
                self.to_dial.push(store);
                StoreFanout { link: Link::Dialing, filling: Vec::new(), unsent: Vec::new(), calls: Vec::new() }
            });
            share.filling.push(region);
            if share.filling.len() >= self.config.batch_size.max(1) {
                share.unsent.push(std::mem::take(&mut share.filling));
                self.send_ready(store);
            }
        }
    }

    fn dialed(&mut self, store: StoreId, client: Result<LogBackupClient>) {
        let Some(share) = self.stores.get_mut(&store) else { return };
        share.link = match client {
            Ok(client) => Link::Up(client),
            Err(e) => Link::Down(e),
        };
        self.send_ready(store);
    }

    /// Sends the store's full batches if it is dialed.
    fn send_ready(&mut self, store: StoreId) {
        let share = self.stores.get_mut(&store).expect("a store of the fanout");
        let Link::Up(client) = &share.link else { return };
        for batch in share.unsent.drain(..) {
            // Past the tick's deadline nothing is waited for: the call fails at once.
            let deadline = self.fixed_deadline.unwrap_or_else(|| {
                Instant::now() + deadline::bounded(self.config.rpc_timeout, "polling checkpoints").unwrap_or_default()
            });
            self.latest_deadline = self.latest_deadline.max(Some(deadline));
            let option = CallOption::default().timeout(deadline.saturating_duration_since(Instant::now()));
            let call = client
                .get_last_flush_ts_of_region_async_opt(&request_for(&batch), option)
                .map_err(|e| rpc_error(store, e));
            self.batch_sizes.push(batch.len());
            share.calls.push((batch, call));
        }
    }

    /// Sends what is left (every dial has ended) and returns each store's calls, with what
    /// was taken; leaderless regions and batch sizes go to `result`.
    fn finish(mut self, result: &mut CollectResult) -> (Vec<StoreCalls>, Asked) {
        let stores: Vec<StoreId> = self.stores.keys().copied().collect();
        for &store in &stores {
            let share = self.stores.get_mut(&store).expect("listed");
            if !share.filling.is_empty() {
                share.unsent.push(std::mem::take(&mut share.filling));
            }
            self.send_ready(store);
        }
        // One line per collection, however many regions lack a leader.
        if let Some(first) = self.failed.first() {
            warn!(
                "{} regions have no leader (region {} {} among them); their ranges cannot advance this time",
                self.failed.len(),
                first.region.unwrap_or_default(),
                first.range
            );
        }
        let asked = Asked {
            regions: self.taken.len(),
            cached: HashSet::new(),
            stores: stores.iter().copied().collect(),
            deadline: self.latest_deadline.or(self.fixed_deadline).unwrap_or_else(|| {
                Instant::now() + deadline::bounded(self.config.rpc_timeout, "polling checkpoints").unwrap_or_default()
            }),
            listed_in: Duration::ZERO,
        };
        result.failed.append(&mut self.failed);
        result.batch_sizes.append(&mut self.batch_sizes);
        let calls = self
            .stores
            .into_iter()
            .map(|(store, share)| {
                let sent = match share.link {
                    Link::Up(client) => Ok(InFlight { _client: client, calls: share.calls }),
                    Link::Down(e) => Err((share.unsent, e)),
                    Link::Dialing => Err((share.unsent, Error::Stopped(format!("dialing store {store}")))),
                };
                StoreCalls { store, sent }
            })
            .collect();
        (calls, asked)
    }
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
            // The caller reports it (the advancer once while it repeats).
            debug!("store {store} failed to report checkpoints: {e}");
            service.clear_cache(store);
            result.store_errors.push(e);
            result.failed_stores.push(store);
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
    use crate::cluster::region_cache::tests::{failed, region, without_peers};
    use crate::cluster::region_cache::{AWAIT_FLUSH_POLLS, MISSES_BEFORE_RESCAN};
    use crate::cluster::testing::{regions_from_boundaries, FixedDialer, MemMeta};
    use crate::proto::logbackuppb::RegionCheckpoint;
    use crate::testing::warnings_of;

    fn answer(id: RegionId, checkpoint: Ts, err: Option<errorpb::Error>) -> RegionCheckpoint {
        let mut cp = RegionCheckpoint::default();
        cp.mut_region().set_id(id);
        cp.set_checkpoint(checkpoint);
        if let Some(err) = err {
            cp.set_err(err);
        }
        cp
    }

    /// The batches a fanout forms when no store can be dialed, by store, and what failed.
    fn undialed_batches(
        regions: Vec<RegionWithLeader>,
        batch_size: usize,
    ) -> (Vec<(StoreId, Vec<Batch>)>, CollectResult) {
        let config = CollectorConfig { batch_size, ..Default::default() };
        let mut fanout = Fanout::new(&config, None);
        fanout.add(regions);
        for store in std::mem::take(&mut fanout.to_dial) {
            fanout.dialed(store, Err(Error::Store { store_id: store, address: "-".into(), reason: "down".into() }));
        }
        let mut result = CollectResult::default();
        let (calls, _) = fanout.finish(&mut result);
        let batches = calls.into_iter().map(|c| (c.store, c.sent.err().expect("never sent").0)).collect();
        (batches, result)
    }

    #[test]
    fn regions_go_by_leader_in_batches_once_each_and_leaderless_ones_fail() {
        let regions = [
            region(1, "", "b", Some(1)),
            region(2, "b", "c", Some(2)),
            region(3, "c", "d", Some(1)),
            region(4, "d", "e", None),
            region(5, "e", "", Some(1)),
        ];
        // The second copy is a region inside two ranges: asked about once.
        let twice = regions.iter().chain(&regions[..1]).cloned().collect();
        let (batches, result) = undialed_batches(twice, 2);
        assert_eq!(
            batches,
            vec![
                (1, vec![vec![regions[0].clone(), regions[2].clone()], vec![regions[4].clone()]]),
                (2, vec![vec![regions[1].clone()]]),
            ]
        );
        assert_eq!(result.failed, vec![failed(&regions[3], None, FailReason::NoLeader)]);
        let req = request_for(&batches[0].1[0]);
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
        let lines = warnings_of(|| drop(undialed_batches(leaderless, 10)));
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

    /// The regions `list_regions` takes, in key order, and which came from the cache.
    fn scan_regions(
        meta: &dyn ClusterMeta,
        cache: &mut RegionCache,
        ranges: &[KeyRange],
        config: &CollectorConfig,
    ) -> Result<(Vec<RegionWithLeader>, HashSet<RegionId>)> {
        let (mut regions, mut cached) = (Vec::new(), HashSet::new());
        list_regions(meta, cache, ranges, config, &mut Vec::new(), |taken, from_cache| {
            if from_cache {
                cached.extend(taken.iter().map(|r| r.id));
            }
            regions.extend(taken);
        })?;
        regions.sort_by(|a, b| a.range.cmp(&b.range));
        Ok((regions, cached))
    }

    /// 10 000 regions over three stores, bounded by "000000" to "009998".
    fn ten_thousand_regions() -> MemMeta {
        let keys: Vec<Vec<u8>> = (0..9_999).map(|i| format!("{i:06}").into_bytes()).collect();
        let boundaries: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        MemMeta::new(regions_from_boundaries(&boundaries, &[1, 2, 3]))
    }

    #[test]
    fn many_scattered_gaps_are_scanned_in_pages_and_a_few_one_by_one() {
        let meta = ten_thousand_regions();
        let config = CollectorConfig::default();
        let scan = |cache: &mut RegionCache, ranges: &[KeyRange]| {
            let scans_before = meta.scans.lock().len();
            let (regions, cached) = scan_regions(&meta, cache, ranges, &config).unwrap();
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
        assert_eq!(without_peers(regions), without_peers(all.clone()), "the same regions as a fresh scan");
        assert_eq!(scans, 5, "pages, not one call per gap");
        assert_eq!(cached, HashSet::from([all[9_999].id]), "all but the one after the last gap came from PD again");
        assert_eq!(cache.len(), 10_000);

        // A few gaps are cheaper one by one than re-scanning the cached regions around them.
        let ranges = [KeyRange::new("001000", "002000")];
        for region in &all[1001..1001 + 2 * GAPS_SCANNED_ONE_BY_ONE][..] {
            cache.forget(&failed(region, region.leader_store, FailReason::NotLeader));
        }
        let (regions, cached, scans) = scan(&mut cache, &ranges);
        assert_eq!(without_peers(regions), without_peers(all[1001..2001].to_vec()));
        assert_eq!((scans, cached.len()), (1, 1000 - 2 * GAPS_SCANNED_ONE_BY_ONE), "one contiguous gap");
        for region in all[1001..2001].iter().step_by(40) {
            cache.forget(&failed(region, region.leader_store, FailReason::NotLeader));
        }
        let (regions, _, scans) = scan(&mut cache, &ranges);
        assert_eq!((without_peers(regions), scans), (without_peers(all[1001..2001].to_vec()), 25), "25 gaps, 25 calls");
    }

    /// A new owner's first polls ask about thousands of scattered lagging regions, each its
    /// own range: they were listed one PD call per range, with an empty cache and with one
    /// that a lost store left full of holes (1 238 and 4 752 calls a tick at 10^6 regions).
    #[test]
    fn scattered_ranges_are_listed_in_pages_across_ranges_unless_far_apart() {
        let meta = ten_thousand_regions();
        let all = meta.regions.clone();
        let config = CollectorConfig::default();
        let scan = |cache: &mut RegionCache, ranges: &[KeyRange]| {
            let scans_before = meta.scans.lock().len();
            let (regions, cached) = scan_regions(&meta, cache, ranges, &config).unwrap();
            (regions, cached, meta.scans.lock().len() - scans_before)
        };
        let every = |step: usize| -> Vec<&RegionWithLeader> { all.iter().skip(1).step_by(step).collect() };
        let ranges_of = |regions: &[&RegionWithLeader]| regions.iter().map(|r| r.range.clone()).collect::<Vec<_>>();

        // 1000 ranges, every tenth region, nothing cached: one paged scan, the rest cached.
        let tenth = every(10);
        let mut cache = RegionCache::default();
        let (regions, cached, scans) = scan(&mut cache, &ranges_of(&tenth));
        let owned = |regions: &[&RegionWithLeader]| regions.iter().map(|&r| r.clone()).collect::<Vec<_>>();
        assert_eq!(without_peers(regions), without_peers(owned(&tenth)), "only the ranges' regions are asked about");
        assert!(cached.is_empty());
        assert_eq!(scans, 5, "pages of 2048 from the first range to the last, not 1000 calls");
        assert_eq!(cache.len(), 9_991, "the regions between the ranges are cached too");

        // The cache full, those 1000 regions forgotten: pages again.
        cache.insert(&all);
        for region in &tenth {
            cache.forget(&failed(region, region.leader_store, FailReason::NotLeader));
        }
        let (regions, _, scans) = scan(&mut cache, &ranges_of(&tenth));
        assert_eq!(without_peers(regions), without_peers(owned(&tenth)));
        assert_eq!(scans, 5);

        // 33 ranges 303 regions apart: a call each, not a re-listing of what lies between.
        let apart = every(303);
        assert_eq!(apart.len(), GAPS_SCANNED_ONE_BY_ONE + 1);
        for region in &apart {
            cache.forget(&failed(region, region.leader_store, FailReason::NotLeader));
        }
        let (regions, _, scans) = scan(&mut cache, &ranges_of(&apart));
        assert_eq!(without_peers(regions), without_peers(owned(&apart)));
        assert_eq!(scans, apart.len());
    }

    /// After a store is lost its regions lag one by one between the others: each is a range
    /// of its own, and a scan per range (5 036 PD calls in the fault bench) ran the poll out
    /// of time before the stores were asked.
    #[test]
    fn many_ranges_with_a_gap_each_are_scanned_across_in_pages_taking_only_what_they_overlap() {
        let meta = ten_thousand_regions();
        let config = CollectorConfig::default();
        let mut cache = RegionCache::default();
        let (all, _) = scan_regions(&meta, &mut cache, &[KeyRange::full()], &config).unwrap();
        let lost: Vec<RegionWithLeader> = all.iter().skip(7).step_by(20).cloned().collect();
        for region in &lost {
            cache.forget(&failed(region, region.leader_store, FailReason::StoreFailed));
        }
        // Each lagging range is the lost region and the cached one after it.
        let ranges: Vec<KeyRange> = all
            .iter()
            .skip(7)
            .step_by(20)
            .zip(all.iter().skip(8).step_by(20))
            .map(|(lost, next)| KeyRange { start: lost.range.start.clone(), end: next.range.end.clone() })
            .collect();
        let wanted: Vec<RegionWithLeader> = all
            .iter()
            .skip(7)
            .step_by(20)
            .zip(all.iter().skip(8).step_by(20))
            .flat_map(|(a, b)| [a.clone(), b.clone()])
            .collect();

        let scans_before = meta.scans.lock().len();
        let mut timings = Vec::new();
        let mut taken = Vec::new();
        list_regions(&meta, &mut cache, &ranges, &config, &mut timings, |regions, _| taken.extend(regions)).unwrap();
        taken.sort_by(|a, b| a.range.cmp(&b.range));
        assert_eq!(without_peers(taken), without_peers(wanted), "exactly the regions of the ranges, once each");
        let scans = meta.scans.lock().len() - scans_before;
        assert_eq!((scans, timings.len()), (5, 1), "{} ranges listed in pages of 2048, as one", ranges.len());
        assert_eq!(cache.len(), 10_000, "what was listed between the ranges is cached too");

        // Ranges the cache tiles ask PD nothing, and cost no message per range: one timing.
        let scans_before = meta.scans.lock().len();
        let (mut timings, mut count) = (Vec::new(), 0);
        list_regions(&meta, &mut cache, &ranges, &config, &mut timings, |regions, _| count += regions.len()).unwrap();
        assert_eq!((meta.scans.lock().len() - scans_before, timings.len(), count), (0, 1, 1000));
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
        assert!(scan_regions(&meta, &mut cache, &[KeyRange::full()], &config).is_err());
        assert_eq!(cache.len(), 4, "the first page is kept");

        let scans_before = meta.scans.lock().len();
        let (regions, cached) = scan_regions(&meta, &mut cache, &[KeyRange::full()], &config).unwrap();
        assert_eq!(without_peers(regions), without_peers(all.clone()));
        assert_eq!(cached.len(), 4);
        assert_eq!(meta.scans.lock()[scans_before].0, all[4].range.start, "the next scan starts after the kept page");
    }

    #[test]
    fn the_next_page_is_asked_for_while_the_last_is_taken() {
        let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("{i:02}").into_bytes()).collect();
        let boundaries: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let meta = MemMeta::new(regions_from_boundaries(&boundaries, &[1]));
        let config = CollectorConfig { page_size: 4, ..Default::default() };
        let mut pages = 0;
        list_regions(&meta, &mut RegionCache::default(), &[KeyRange::full()], &config, &mut Vec::new(), |_, cached| {
            if cached {
                return;
            }
            pages += 1;
            // One page after another, the second would only be asked for once this returns.
            if pages == 1 {
                crate::testing::wait_until("PD asked for the second page", Duration::from_secs(10), || {
                    meta.scans.lock().len() >= 2
                });
            }
        })
        .unwrap();
        assert_eq!((pages, meta.scans.lock().len()), (6, 6), "21 regions in pages of 4, each asked for once");
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
            let result = collect_checkpoints_cached(&meta, &dialer, &pool, cache, &[KeyRange::full()], &config);
            assert!(result.advanced.is_empty(), "{:?}", result.advanced);
            let expected: Vec<_> = regions.iter().map(|r| failed(r, r.leader_store, FailReason::StoreFailed)).collect();
            assert_eq!(result.failed, expected);
            assert_eq!(result.out_of_time, vec![1]);
            let ids: Vec<RegionId> = cache.cover(&KeyRange::full()).0.iter().map(|r| r.id).collect();
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

    /// Every advanced range is one of `regions` at most at its leader's last flush.
    fn assert_at_most_last_flush(sim: &crate::sim::SimCluster, result: &CollectResult) {
        for (range, ts) in &result.advanced {
            let region = sim.region_at(&range.start);
            assert_eq!(&region.range, range);
            let truth = region.leader_store.and_then(|leader| sim.last_flush_ts(leader));
            assert!(truth.is_some_and(|truth| *ts <= truth), "{range} advanced to {ts}, truth {truth:?}");
        }
    }

    /// A flushed sim cluster whose regions PD's pages come from a `MemMeta` instead (counted,
    /// and scriptable), and the regions.
    fn flushed_sim_behind_mem_meta(
        regions: usize,
    ) -> (crate::sim::SimCluster, MemMeta, FixedDialer, rayon::ThreadPool, Vec<RegionWithLeader>) {
        let (sim, _pd, dialer, pool) = sim_cluster(regions);
        sim.flush_all();
        let regions = sim.regions();
        (sim, MemMeta::new(regions.clone()), dialer, pool, regions)
    }

    #[test]
    fn a_store_that_fails_fails_only_its_regions_while_every_later_page_is_asked() {
        let (sim, meta, dialer, pool, regions) = flushed_sim_behind_mem_meta(60);
        let down = regions[0].leader_store.unwrap();
        dialer.addresses.lock().remove(&down);
        let config = CollectorConfig { page_size: 8, batch_size: 3, ..Default::default() };
        let result = collect_checkpoints_cached(
            &meta,
            &dialer,
            &pool,
            &mut RegionCache::default(),
            &[KeyRange::full()],
            &config,
        );

        let (theirs, others): (Vec<_>, Vec<_>) = regions.iter().partition(|r| r.leader_store == Some(down));
        let expected: Vec<_> = theirs.iter().map(|r| failed(r, Some(down), FailReason::StoreFailed)).collect();
        assert_eq!(result.failed, expected);
        let advanced: Vec<&KeyRange> = result.advanced.iter().map(|(range, _)| range).collect();
        assert_eq!(advanced, others.iter().map(|r| &r.range).collect::<Vec<_>>(), "every other region, every page");
        assert_at_most_last_flush(&sim, &result);
        assert_eq!(result.store_errors.len(), 1, "{:?}", result.store_errors);
        assert!(result.unlisted.is_none());
        assert_eq!(meta.scans.lock().len(), regions.len().div_ceil(8), "one pass of pages");
        assert_eq!(dialer.dials_of(down), 1, "dialed once, however many of its batches filled");
    }

    #[test]
    fn a_listing_cut_short_by_the_deadline_still_answers_the_pages_asked_before() {
        let (sim, meta, dialer, pool, regions) = flushed_sim_behind_mem_meta(24);
        let cut_short = || Err(Error::Timeout("PD ScanRegions (its deadline has passed)".into()));
        meta.script(Ok(regions[..4].to_vec()));
        meta.script(Ok(regions[4..8].to_vec()));
        meta.script(cut_short());
        let config = CollectorConfig {
            page_size: 4,
            batch_size: 3,
            scan_retry: ScanRetry { attempts: 1, ..ScanRetry::default() },
            ..Default::default()
        };
        let mut cache = RegionCache::default();
        let result = collect_checkpoints_cached(&meta, &dialer, &pool, &mut cache, &[KeyRange::full()], &config);
        let unlisted = result.unlisted.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(unlisted.contains("deadline"), "{unlisted:?}");
        let advanced: Vec<&KeyRange> = result.advanced.iter().map(|(range, _)| range).collect();
        let listed: Vec<&KeyRange> = regions[..8].iter().map(|r| &r.range).collect();
        assert_eq!(advanced, listed, "the regions of the two pages listed, and no other");
        assert!(result.failed.is_empty(), "{:?}", result.failed);
        assert_at_most_last_flush(&sim, &result);
        assert_eq!(cache.len(), 8);

        // Without a cache to resume from, a partial listing is an error.
        meta.script(cut_short());
        let err = collect_checkpoints(&meta, &dialer, &pool, &[KeyRange::full()], &config).unwrap_err();
        assert!(err.to_string().contains("deadline"), "{err}");
    }

    #[test]
    fn asking_page_by_page_answers_what_listing_everything_first_does_after_splits() {
        let (sim, pd, dialer, pool) = sim_cluster(40);
        for region in sim.regions().iter().step_by(3) {
            let mut inside = region.range.start.clone();
            inside.push(7);
            sim.split(&inside).unwrap();
        }
        sim.flush_all();
        // Two ranges meeting inside a region: it is asked about once.
        let mut middle = sim.regions()[20].range.start.clone();
        middle.push(1);
        let ranges = [KeyRange::new(Vec::new(), middle.clone()), KeyRange::new(middle, Vec::new())];
        let poll = |page_size, batch_size| {
            let config = CollectorConfig { page_size, batch_size, ..Default::default() };
            collect_checkpoints(&pd, &dialer, &pool, &ranges, &config).unwrap()
        };
        // One page holding every region: the whole listing comes before the first call.
        let listed_first = poll(10_000, 1024);
        let paged = poll(4, 3);
        assert_eq!(paged.advanced, listed_first.advanced);
        assert_eq!(paged.failed, listed_first.failed);
        assert!(paged.failed.is_empty(), "{:?}", paged.failed);
        assert_eq!(paged.advanced.len(), sim.regions().len());
        assert_eq!(paged.batch_sizes.iter().sum::<usize>(), sim.regions().len(), "each region asked once");
        assert_at_most_last_flush(&sim, &paged);
    }

    #[test]
    fn a_hung_store_whose_leaders_moved_never_advances_them_past_the_new_leaders_flush() {
        let (sim, pd, dialer, pool) = sim_cluster(24);
        // Long enough that the healthy stores answer in time on a loaded machine: only the
        // hung one may run out of it.
        let config = CollectorConfig { rpc_timeout: Duration::from_secs(1), ..Default::default() };
        let mut cache = RegionCache::default();
        let poll = |cache: &mut RegionCache| {
            let result = collect_checkpoints_cached(&pd, &dialer, &pool, cache, &[KeyRange::full()], &config);
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
        assert!(poll().failed.is_empty());

        // Store 2 goes (it can no longer be dialed) and PD moves its leaders to the others.
        dialer.addresses.lock().remove(&2);
        let moved = sim.fail_over(2).unwrap();
        assert!(moved > 100, "{moved} regions moved");
        sim.flush_all();
        let scans_before = sim.pd_scans().0;
        let result = poll();
        assert!(result.failed.is_empty(), "{:?}", result.failed);
        assert_eq!(result.advanced.len(), 600);
        let scans = sim.pd_scans().0 - scans_before;
        assert!(scans <= 600 / 32 + 1, "{scans} PD calls to find {moved} moved regions: a page of 32 each at most");
    }

    /// After a leader eviction the new leaders answer not-leader until their first flush (TiKV
    /// cannot tell that from not leading): re-listing the evicted store's scattered regions at
    /// every poll until then ran the rolling restart's polls out of time.
    #[test]
    fn leaders_pd_just_named_that_have_not_flushed_are_not_looked_up_again_for_a_few_polls() {
        let (sim, pd, dialer, pool) = sim_cluster(600);
        let config = CollectorConfig { rpc_timeout: Duration::from_secs(5), page_size: 32, ..Default::default() };
        let mut cache = RegionCache::default();
        let mut poll = || {
            let scans_before = sim.pd_scans().0;
            let result = collect_checkpoints_cached(&pd, &dialer, &pool, &mut cache, &[KeyRange::full()], &config);
            assert_at_most_last_flush(&sim, &result);
            (result, sim.pd_scans().0 - scans_before)
        };
        sim.flush_all();
        assert!(poll().0.failed.is_empty());

        dialer.addresses.lock().remove(&2);
        let moved = sim.fail_over(2).unwrap();
        let (result, scans) = poll();
        assert_eq!(result.failed.len(), moved, "the new leaders have not flushed: {:?}", &result.failed[..3]);
        assert!(result.failed.iter().all(|f| f.reason == FailReason::NotLeader && f.store != Some(2)));
        assert!(scans > 0, "store 2's regions were looked up");
        for _ in 0..AWAIT_FLUSH_POLLS {
            let (result, scans) = poll();
            assert_eq!((result.failed.len(), scans), (moved, 0), "failed again, PD not asked");
        }
        let (result, scans) = poll();
        assert_eq!(result.failed.len(), moved);
        assert!(scans > 0, "looked up again once the polls awaiting a flush are over");
        sim.flush_all();
        let (result, scans) = poll();
        assert_eq!((result.advanced.len(), result.failed.len(), scans), (600, 0, 0), "{:?}", result.failed);
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
