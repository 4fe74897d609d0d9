//! The cluster side against the simulated cluster (real gRPC on 127.0.0.1): the PD client,
//! region iteration, the collector and the flush subscriber, healthy and under every fault
//! the advancer must survive. Each test asserts the exact spans that come out.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streamhelper::cluster::{
    collect_checkpoints, collect_checkpoints_cached, ClusterMeta, CollectResult, CollectorConfig, FailReason,
    FailedRange, FlushBatch, FlushSubscriber, LogBackupService, PdClient, PdConfig, RegionCache, RegionIter,
    RegionWithLeader, ScanRetry, StoreInfo, SubscriberConfig, GC_SERVICE_ID,
};
use streamhelper::sim::{SimCluster, SimConfig};
use streamhelper::Security;
use streamhelper::{KeyRange, RegionId, Result, StoreId, Ts};
use support::wait_until;

fn sim_config(stores: usize, regions: usize) -> SimConfig {
    SimConfig { stores, regions, seed: 7, ..Default::default() }
}

fn sim(stores: usize, regions: usize) -> SimCluster {
    SimCluster::start(sim_config(stores, regions)).unwrap()
}

fn pd_config(endpoints: Vec<String>) -> PdConfig {
    PdConfig { timeout: Duration::from_secs(2), ..PdConfig::new(endpoints) }
}

fn connect(sim: &SimCluster) -> Arc<PdClient> {
    Arc::new(PdClient::connect(pd_config(vec![sim.pd_endpoint()]), Security::insecure()).unwrap())
}

fn collector_config() -> CollectorConfig {
    CollectorConfig {
        rpc_timeout: Duration::from_secs(1),
        scan_retry: ScanRetry { attempts: 3, backoff: Duration::from_millis(50) },
        ..Default::default()
    }
}

fn collect_all(meta: &dyn ClusterMeta, service: &dyn LogBackupService) -> CollectResult {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    collect_checkpoints(meta, service, &pool, &[KeyRange::full()], &collector_config()).unwrap()
}

type Cluster = support::SimWithClients;

impl Cluster {
    fn start(stores: usize, regions: usize) -> Cluster {
        Cluster::connect(sim_config(stores, regions))
    }

    /// Polls every region of the key space.
    fn collect(&self) -> CollectResult {
        collect_all(self.pd.as_ref(), self.clients.as_ref())
    }

    fn subscriber(&self, config: SubscriberConfig) -> FlushSubscriber {
        let mut subscriber = FlushSubscriber::new(self.pd.clone(), self.clients.clone(), config);
        subscriber.update_store_topology().unwrap();
        subscriber
    }

    fn led_by(&self, stores: &[StoreId]) -> Vec<RegionWithLeader> {
        self.sim.regions().into_iter().filter(|r| r.leader_store.is_some_and(|l| stores.contains(&l))).collect()
    }

    /// What the collector must report for regions whose leader answers from its last flush.
    fn at_last_flush(&self, regions: &[RegionWithLeader]) -> Vec<(KeyRange, Ts)> {
        let mut expected: Vec<_> = regions
            .iter()
            .map(|r| (r.range.clone(), self.sim.last_flush_ts(r.leader_store.unwrap()).expect("the leader flushed")))
            .collect();
        expected.sort();
        expected
    }

    /// The flush events the stores' last flushes stand for: their leader regions at their ts.
    fn flushed_events(&self, stores: &[StoreId]) -> BTreeMap<KeyRange, (Ts, StoreId)> {
        self.led_by(stores)
            .into_iter()
            .map(|r| {
                let leader = r.leader_store.unwrap();
                (r.range, (self.sim.last_flush_ts(leader).unwrap(), leader))
            })
            .collect()
    }

    /// Every advanced span is backed by the truth: nothing claims more than was flushed.
    fn assert_never_ahead_of_truth(&self, result: &CollectResult) {
        for (range, ts) in &result.advanced {
            let truth = self.sim.true_checkpoint(range);
            assert!(*ts <= truth, "{range} reported at {ts}, truly flushed only to {truth}");
        }
    }
}

fn failed(regions: &[RegionWithLeader], reason: FailReason) -> Vec<FailedRange> {
    let mut failed: Vec<_> = regions
        .iter()
        .map(|r| FailedRange {
            range: r.range.clone(),
            region: Some(r.id),
            store: r.leader_store,
            reason: reason.clone(),
        })
        .collect();
    failed.sort();
    failed
}

// ---------------------------------------------------------------------------------------
// PD client and region iteration

#[test]
fn pd_client_serves_regions_stores_tso_and_gc_safe_point() {
    let sim = sim(3, 40);
    let pd = connect(&sim);
    assert_eq!(pd.cluster_id(), sim.cluster_id());

    // Small pages: the iterator stitches 40 regions from 7 pages, each checked to tile.
    let mut iter = RegionIter::new(pd.as_ref(), &KeyRange::full());
    iter.page_size = 6;
    let mut regions = Vec::new();
    while !iter.done() {
        regions.extend(iter.next_page().unwrap());
    }
    assert_eq!(regions, sim.regions());

    // The empty start key is sent encoded, and the region holding a key comes first.
    assert_eq!(pd.region_scan(b"", b"", 1).unwrap(), sim.regions()[..1].to_vec());
    let probe = sim.regions()[17].range.start.clone();
    let mut next = probe.clone();
    next.push(0);
    assert_eq!(pd.region_scan(&probe, &next, 1).unwrap(), vec![sim.region_at(&probe)]);

    let stores = pd.stores().unwrap();
    let expected: Vec<(StoreId, String)> = sim.store_ids().into_iter().map(|id| (id, sim.store_address(id))).collect();
    assert_eq!(stores.iter().map(|s| (s.id, s.address.clone())).collect::<Vec<_>>(), expected);
    assert!(stores.iter().all(|s| s.boot_at > 0));
    assert_eq!(pd.store(2).unwrap(), stores[1]);
    let err = pd.store(9).unwrap_err().to_string();
    assert!(err.contains("invalid store ID 9"), "{err}");

    let before = sim.now_ts();
    let ts = pd.fetch_current_ts().unwrap();
    assert!(before < ts && ts < sim.now_ts(), "PD's TSO is the sim's clock");
}

#[test]
fn gc_is_blocked_only_above_the_minimal_safe_point_and_unblocked() {
    let sim = sim(1, 2);
    let pd = connect(&sim);
    let target = sim.now_ts();
    assert_eq!(pd.block_gc_until(target).unwrap(), target);
    assert_eq!(sim.gc_safe_points(), vec![(GC_SERVICE_ID.to_string(), target)]);
    pd.unblock_gc().unwrap();
    assert!(sim.gc_safe_points().is_empty());

    // GC already ran past the target: PD refuses, and the error says by how much.
    sim.set_gc_safe_point(target + 100);
    let err = pd.block_gc_until(target + 50).unwrap_err().to_string();
    assert!(err.contains(&format!("minimal service safe point {} is already past it", target + 100)), "{err}");
    assert!(sim.gc_safe_points().is_empty(), "a refused update changes nothing");
    assert_eq!(pd.block_gc_until(target + 200).unwrap(), target + 200);
    assert_eq!(sim.gc_safe_points(), vec![(GC_SERVICE_ID.to_string(), target + 200)]);
}

#[test]
fn pd_client_skips_a_dead_endpoint_and_follows_the_leader_to_another_member() {
    // Two PDs of one cluster (same id and seed); a split only in `b` tells them apart.
    let a = sim(2, 8);
    let b = sim(2, 8);
    let mut split_at = b.regions()[3].range.start.clone();
    split_at.push(0);
    b.split(&split_at).unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();

    let pd = PdClient::connect(pd_config(vec![dead, a.pd_endpoint(), b.pd_endpoint()]), Security::insecure()).unwrap();
    assert_eq!(pd.leader_url(), Some(format!("http://{}", a.pd_endpoint())));
    let scan = |pd: &PdClient| RegionIter::new(pd, &KeyRange::full()).collect_all().unwrap();
    assert_eq!(scan(&pd), a.regions());

    // The leader goes away: the next call finds the member that answers and retries there.
    a.stop_pd();
    assert_eq!(scan(&pd), b.regions());
    assert_eq!(pd.leader_url(), Some(format!("http://{}", b.pd_endpoint())));
    assert!(pd.fetch_current_ts().is_ok());

    // With every member down, the error names every endpoint tried.
    b.stop_pd();
    let err = pd.stores().unwrap_err().to_string();
    assert!(err.contains(&a.pd_endpoint()) && err.contains(&b.pd_endpoint()), "{err}");

    // A member that comes back (on its old port) is found again.
    a.start_pd().unwrap();
    wait_until("PD to answer again", || pd.stores().is_ok());
    assert_eq!(pd.leader_url(), Some(format!("http://{}", a.pd_endpoint())));
}

// ---------------------------------------------------------------------------------------
// Collector

#[test]
fn every_region_advances_to_its_leaders_last_flush() {
    let c = Cluster::start(3, 50);
    c.sim.flush_all();
    let result = c.collect();
    assert_eq!(result.advanced, c.at_last_flush(&c.sim.regions()));
    assert!(result.failed.is_empty(), "{:?}", result.failed);
    assert!(result.store_errors.is_empty());
    c.assert_never_ahead_of_truth(&result);

    // Batches smaller than a store's share of regions change nothing.
    let config = CollectorConfig { batch_size: 4, ..collector_config() };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let batched = collect_checkpoints(c.pd.as_ref(), c.clients.as_ref(), &pool, &[KeyRange::full()], &config).unwrap();
    assert_eq!(batched.advanced, result.advanced);
}

#[test]
fn only_the_requested_ranges_regions_are_asked_about_whole() {
    let c = Cluster::start(2, 30);
    c.sim.flush_all();
    let regions = c.sim.regions();
    // From inside region 5 to inside region 9, and region 20 on its own.
    let mut start = regions[5].range.start.clone();
    start.push(1);
    let mut end = regions[9].range.start.clone();
    end.push(1);
    let ranges = [KeyRange::new(start, end), regions[20].range.clone()];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let result = collect_checkpoints(c.pd.as_ref(), c.clients.as_ref(), &pool, &ranges, &collector_config()).unwrap();
    let asked: Vec<RegionWithLeader> = regions[5..=9].iter().chain(&regions[20..=20]).cloned().collect();
    assert_eq!(result.advanced, c.at_last_flush(&asked), "whole regions, as PD gave them");
    assert!(result.failed.is_empty());
}

#[test]
fn a_store_that_is_down_fails_exactly_its_regions() {
    let c = Cluster::start(3, 40);
    c.sim.flush_all();
    c.sim.stop_store(2);

    let result = c.collect();
    assert_eq!(result.advanced, c.at_last_flush(&c.led_by(&[1, 3])));
    assert_eq!(result.failed, failed(&c.led_by(&[2]), FailReason::StoreFailed));
    let errors: Vec<String> = result.store_errors.iter().map(ToString::to_string).collect();
    assert!(errors.len() == 1 && errors[0].contains("store 2"), "{errors:?}");
}

#[test]
fn a_hung_store_costs_the_deadline_not_the_other_stores_answers() {
    let c = Cluster::start(3, 40);
    c.sim.flush_all();
    // Connected before it hangs: the hang is in answering, not in dialing.
    assert!(c.collect().failed.is_empty());
    c.sim.hang_store(3);

    let started = Instant::now();
    let result = c.collect();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "the 1 s deadline bounds the collector; took {took:?}");
    assert_eq!(result.advanced, c.at_last_flush(&c.led_by(&[1, 2])));
    assert_eq!(result.failed, failed(&c.led_by(&[3]), FailReason::StoreFailed));
    let errors: Vec<String> = result.store_errors.iter().map(ToString::to_string).collect();
    assert!(
        errors.len() == 1 && errors[0].contains("store 3") && errors[0].contains("DEADLINE_EXCEEDED"),
        "{errors:?}"
    );

    c.sim.resume_store(3);
    assert_eq!(c.collect().advanced, c.at_last_flush(&c.sim.regions()));
}

#[test]
fn a_slow_store_within_the_deadline_is_waited_for() {
    let c = Cluster::start(2, 10);
    c.sim.flush_all();
    c.sim.set_store_delay(1, Duration::from_millis(300));
    assert_eq!(c.collect().advanced, c.at_last_flush(&c.sim.regions()));
}

#[test]
fn leaderless_unflushed_and_moved_regions_fail_and_never_advance() {
    let c = Cluster::start(3, 30);
    let regions = c.sim.regions();
    let (leaderless, unflushed, moved) = (regions[2].id, regions[11].id, regions[23].id);
    c.sim.remove_leader(leaderless);
    c.sim.set_never_flush(unflushed, true);
    c.sim.flush_all();
    // A leader that moved after the flush: the new leader has not flushed the region yet.
    let new_leader = c.sim.store_ids().into_iter().find(|&s| Some(s) != regions[23].leader_store).unwrap();
    c.sim.transfer_leader(moved, new_leader).unwrap();

    let result = c.collect();
    let now = |id: RegionId| c.sim.region(id).unwrap();
    let normal: Vec<RegionWithLeader> =
        c.sim.regions().into_iter().filter(|r| ![leaderless, unflushed, moved].contains(&r.id)).collect();
    assert_eq!(result.advanced, c.at_last_flush(&normal));
    let mut expected = failed(&[now(leaderless)], FailReason::NoLeader);
    expected.extend(failed(&[now(unflushed), now(moved)], FailReason::NotLeader));
    expected.sort();
    assert_eq!(result.failed, expected);
    assert!(result.store_errors.is_empty(), "region errors are not store errors");
}

/// PD metadata that splits a region right after answering the first scan: the collector
/// then asks about the region as it was before the split.
struct SplitAfterScan<'a> {
    cluster: &'a Cluster,
    split_at: Vec<u8>,
    flush_after_split: bool,
    done: AtomicBool,
}

impl ClusterMeta for SplitAfterScan<'_> {
    fn region_scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<RegionWithLeader>> {
        let regions = self.cluster.pd.region_scan(start, end, limit)?;
        if !self.done.swap(true, Ordering::SeqCst) {
            self.cluster.sim.split(&self.split_at).unwrap();
            if self.flush_after_split {
                self.cluster.sim.flush_all();
            }
        }
        Ok(regions)
    }
    fn stores(&self) -> Result<Vec<StoreInfo>> {
        self.cluster.pd.stores()
    }
    fn block_gc_until(&self, safe_point: Ts) -> Result<Ts> {
        self.cluster.pd.block_gc_until(safe_point)
    }
    fn unblock_gc(&self) -> Result<()> {
        self.cluster.pd.unblock_gc()
    }
    fn fetch_current_ts(&self) -> Result<Ts> {
        self.cluster.pd.fetch_current_ts()
    }
}

#[test]
fn a_region_split_between_the_scan_and_the_request() {
    for flush_after_split in [false, true] {
        let c = Cluster::start(3, 20);
        c.sim.flush_all();
        let before = c.sim.regions();
        let victim = before[7].clone();
        let mut split_at = victim.range.start.clone();
        split_at.push(0);
        let meta = SplitAfterScan { cluster: &c, split_at, flush_after_split, done: AtomicBool::new(false) };

        let result = collect_all(&meta, c.clients.as_ref());
        if flush_after_split {
            // The store's map now holds the halves: the old epoch is refused and the old
            // range does not advance.
            let others: Vec<RegionWithLeader> = before.iter().filter(|r| r.id != victim.id).cloned().collect();
            assert_eq!(result.advanced, c.at_last_flush(&others));
            assert_eq!(result.failed, failed(&[victim], FailReason::EpochNotMatch));
        } else {
            // Until its next flush the store reports the region as it flushed it, which
            // covered the whole old range.
            assert_eq!(result.advanced, c.at_last_flush(&before));
            assert!(result.failed.is_empty());
        }
        c.assert_never_ahead_of_truth(&result);

        // The next round sees the halves.
        c.sim.flush_all();
        assert_eq!(c.sim.regions().len(), before.len() + 1);
        assert_eq!(c.collect().advanced, c.at_last_flush(&c.sim.regions()));
    }
}

#[test]
fn cached_regions_ask_pd_nothing_and_a_split_or_moved_one_is_looked_up_and_asked_again_in_the_same_poll() {
    let c = Cluster::start(3, 20);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mut cache = RegionCache::default();
    let mut collect = || {
        let full = [KeyRange::full()];
        let result = collect_checkpoints_cached(
            c.pd.as_ref(),
            c.clients.as_ref(),
            &pool,
            &mut cache,
            &full,
            &collector_config(),
        );
        c.assert_never_ahead_of_truth(&result);
        result
    };
    c.sim.flush_all();
    assert_eq!(collect().advanced, c.at_last_flush(&c.sim.regions()));
    let (calls, scanned) = c.sim.pd_scans();
    c.sim.flush_all();
    assert_eq!(collect().advanced, c.at_last_flush(&c.sim.regions()));
    assert_eq!(c.sim.pd_scans(), (calls, scanned), "a cached key space asks PD nothing");

    // One region splits, another's leader moves, and every store flushes.
    let before = c.sim.regions();
    let (split, moved) = (before[7].clone(), before[12].clone());
    let mut split_at = split.range.start.clone();
    split_at.push(0);
    c.sim.split(&split_at).unwrap();
    let to = c.sim.store_ids().into_iter().find(|&s| Some(s) != moved.leader_store).unwrap();
    c.sim.transfer_leader(moved.id, to).unwrap();
    c.sim.flush_all();
    // The stores find the stale entries out (epoch not match, not leader); PD is asked about
    // their gaps only, and the regions there are asked again at once.
    let fresh = collect();
    assert!(fresh.failed.is_empty(), "{:?}", fresh.failed);
    assert_eq!(fresh.advanced, c.at_last_flush(&c.sim.regions()));
    let rescanned = c.sim.pd_scans().1 - scanned;
    assert!((3..=5).contains(&rescanned), "only the gaps are scanned again: {rescanned} regions");

    // A region whose new leader has not flushed yet fails once more, and is looked up at most
    // once per poll.
    let moved_again = c.sim.regions()[3].clone();
    let to = c.sim.store_ids().into_iter().find(|&s| Some(s) != moved_again.leader_store).unwrap();
    c.sim.transfer_leader(moved_again.id, to).unwrap();
    c.sim.flush_store(moved_again.leader_store.unwrap()); // the old leader no longer reports it
    let scans_before = c.sim.pd_scans().0;
    let unflushed = collect();
    let failed: Vec<_> = unflushed.failed.iter().map(|f| (f.region, f.reason.clone())).collect();
    assert_eq!(failed, vec![(Some(moved_again.id), FailReason::NotLeader)]);
    assert_eq!(c.sim.pd_scans().0 - scans_before, 1, "one lookup of the failed region's gap");
}

#[test]
fn a_flush_during_a_slow_poll_is_believed_up_to_the_time_that_passed() {
    let c = Cluster::start(2, 8);
    c.sim.flush_all();
    for store in c.sim.store_ids() {
        c.sim.set_store_delay(store, Duration::from_millis(800));
    }
    // The bound a tick computes, without its slack: only the time that passes can lift it.
    let config = CollectorConfig { max_ts: c.sim.now_ts(), rpc_timeout: Duration::from_secs(5), ..collector_config() };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let result = std::thread::scope(|scope| {
        let poll = scope.spawn(|| {
            collect_checkpoints(c.pd.as_ref(), c.clients.as_ref(), &pool, &[KeyRange::full()], &config).unwrap()
        });
        // Inside the stores' delay: the answers carry this flush, above the bound at the start.
        std::thread::sleep(Duration::from_millis(200));
        c.sim.flush_all();
        poll.join().unwrap()
    });
    assert!(result.failed.is_empty(), "{:?}", result.failed);
    assert_eq!(result.advanced, c.at_last_flush(&c.sim.regions()));
    assert!(result.advanced.iter().all(|(_, ts)| *ts > config.max_ts), "the answers came from the later flush");
    c.assert_never_ahead_of_truth(&result);
}

#[test]
fn a_restarted_store_is_dialed_at_its_new_address() {
    let c = Cluster::start(3, 20);
    c.sim.flush_all();
    assert!(c.collect().failed.is_empty());
    let old = c.clients.cached_address(1).unwrap();

    let new = c.sim.restart_store(1).unwrap();
    assert_ne!(old, new);
    c.sim.flush_store(1);
    // The cached connection points at the old process: that round fails store 1 and drops it.
    let result = c.collect();
    assert_eq!(result.failed, failed(&c.led_by(&[1]), FailReason::StoreFailed));
    assert_eq!(c.clients.cached_address(1), None);
    assert_eq!(c.collect().advanced, c.at_last_flush(&c.sim.regions()));
    assert_eq!(c.clients.cached_address(1), Some(new));
}

// ---------------------------------------------------------------------------------------
// Flush subscriber

/// The regions of a batch: each event, neighbours joined by the subscriber, split back into
/// the ranges of `regions` that tile it exactly, or left whole when none do (it then matches
/// no region).
fn regions_in(batch: &FlushBatch, regions: &BTreeMap<KeyRange, (Ts, StoreId)>) -> Vec<(KeyRange, Ts)> {
    let ends: BTreeMap<&[u8], &[u8]> = regions.keys().map(|r| (r.start.as_slice(), r.end.as_slice())).collect();
    let mut out = Vec::new();
    for (start, end, ts) in batch.iter() {
        let (mut at, mut tiles) = (start, Vec::new());
        while let Some(&next) = ends.get(at) {
            tiles.push(KeyRange::new(at, next));
            if next == end || next.is_empty() {
                break;
            }
            at = next;
        }
        if tiles.last().is_some_and(|last| last.end == end) {
            out.extend(tiles.into_iter().map(|range| (range, ts)));
        } else {
            out.push((KeyRange::new(start, end), ts));
        }
    }
    out
}

/// Reads events until `expected` has all arrived (a later event for a range replaces an
/// earlier one), then checks that nothing else came.
fn assert_events(subscriber: &FlushSubscriber, expected: &BTreeMap<KeyRange, (Ts, StoreId)>) {
    let mut got: BTreeMap<KeyRange, (Ts, StoreId)> = BTreeMap::new();
    let deadline = Instant::now() + support::DEADLINE;
    let take = |got: &mut BTreeMap<KeyRange, (Ts, StoreId)>, batch: FlushBatch| {
        got.extend(regions_in(&batch, expected).into_iter().map(|(range, ts)| (range, (ts, batch.store))));
    };
    while expected.iter().any(|(range, value)| got.get(range) != Some(value)) {
        let batch = subscriber
            .events()
            .recv_deadline(deadline)
            .unwrap_or_else(|_| panic!("timed out; got {} of {} events", got.len(), expected.len()));
        take(&mut got, batch);
    }
    while let Ok(batch) = subscriber.events().try_recv() {
        take(&mut got, batch);
    }
    assert_eq!(&got, expected);
}

fn failing_stores(subscriber: &FlushSubscriber) -> Vec<StoreId> {
    subscriber.store_errors().into_iter().map(|(id, _)| id).collect()
}

#[test]
fn subscriber_delivers_each_flush_of_each_store() {
    let c = Cluster::start(3, 60);
    let subscriber = c.subscriber(SubscriberConfig::default());
    for _ in 0..3 {
        c.sim.flush_all();
        assert_events(&subscriber, &c.flushed_events(&[1, 2, 3]));
    }
    c.sim.flush_store(2);
    assert_events(&subscriber, &c.flushed_events(&[2]));
    assert!(subscriber.pending_errors().is_none());
}

#[test]
fn each_stream_message_arrives_whole_as_one_batch_of_its_store() {
    // More regions per store than one message holds (1024): a flush spans messages.
    let c = Cluster::start(2, 2600);
    let subscriber = c.subscriber(SubscriberConfig::default());
    c.sim.flush_all();
    assert_events(&subscriber, &c.flushed_events(&[1, 2]));
    subscriber.take_message_sizes();

    c.sim.flush_store(1);
    let expected = c.flushed_events(&[1]);
    let (mut got, mut sizes) = (BTreeMap::new(), Vec::new());
    let deadline = Instant::now() + support::DEADLINE;
    while got.len() < expected.len() {
        let batch = subscriber.events().recv_deadline(deadline).expect("store 1's flush within the deadline");
        assert_eq!(batch.store, 1);
        sizes.push(batch.len());
        for (range, ts) in regions_in(&batch, &expected) {
            assert!(got.insert(range, (ts, 1)).is_none(), "an event came twice");
        }
    }
    assert_eq!(got, expected);
    assert!(sizes.len() > 1 && sizes.iter().all(|&n| n <= 1024), "{sizes:?}");
    let messages: BTreeMap<StoreId, Vec<usize>> = subscriber.take_message_sizes().into_iter().collect();
    assert_eq!(messages[&1], sizes, "one batch per message, in order");
    assert!(subscriber.events().try_recv().is_err(), "nothing more");
}

#[test]
fn an_unsupported_store_is_reported_kept_off_and_resubscribed_after_it_restarts() {
    let c = Cluster::start(3, 40);
    c.sim.set_subscription_supported(2, false);
    let mut subscriber = c.subscriber(SubscriberConfig::default());
    wait_until("store 2 to report UNIMPLEMENTED", || failing_stores(&subscriber) == [2]);
    let err = subscriber.pending_errors().unwrap().to_string();
    assert!(err.contains("store 2") && err.contains("UNIMPLEMENTED"), "{err}");

    // Reopening a stream resets its state at once: an error still there was not retried.
    subscriber.handle_errors();
    assert_eq!(failing_stores(&subscriber), [2], "UNIMPLEMENTED is not retried");
    c.sim.flush_all();
    assert_events(&subscriber, &c.flushed_events(&[1, 3]));

    // Support comes back with a restart (a new start time): the topology update notices.
    c.sim.set_subscription_supported(2, true);
    subscriber.update_store_topology().unwrap();
    c.sim.flush_all();
    assert_events(&subscriber, &c.flushed_events(&[1, 2, 3]));
    assert!(subscriber.pending_errors().is_none());
}

#[test]
fn a_silent_stream_is_reopened_after_the_idle_timeout() {
    let c = Cluster::start(2, 10);
    let idle_timeout = Duration::from_millis(300);
    let mut subscriber = c.subscriber(SubscriberConfig { idle_timeout, ..Default::default() });
    // Nothing was ever flushed: the streams are open and silent.
    wait_until("both streams to time out", || failing_stores(&subscriber) == [1, 2]);
    let err = subscriber.pending_errors().unwrap().to_string();
    assert!(err.contains("no flush event for 300ms"), "{err}");

    subscriber.handle_errors();
    c.sim.flush_all();
    assert_events(&subscriber, &c.flushed_events(&[1, 2]));
}

#[test]
fn restarted_reset_and_stopped_stores_are_resubscribed() {
    let c = Cluster::start(3, 40);
    let mut subscriber =
        c.subscriber(SubscriberConfig { retry_backoff: Duration::from_millis(50), ..Default::default() });
    c.sim.flush_all();
    assert_events(&subscriber, &c.flushed_events(&[1, 2, 3]));

    // A restart on a new address: the topology update re-subscribes there.
    let new_address = c.sim.restart_store(1).unwrap();
    subscriber.update_store_topology().unwrap();
    c.sim.flush_store(1);
    assert_events(&subscriber, &c.flushed_events(&[1]));
    assert_eq!(c.clients.cached_address(1), Some(new_address));

    // A stream the store resets is reported, then reopened.
    c.sim.reset_subscriptions(2);
    wait_until("the reset to be reported", || failing_stores(&subscriber) == [2]);
    let err = subscriber.pending_errors().unwrap().to_string();
    assert!(err.contains("store 2") && err.contains("injected subscription reset"), "{err}");
    subscriber.handle_errors();
    c.sim.flush_store(2);
    assert_events(&subscriber, &c.flushed_events(&[2]));
    assert!(subscriber.pending_errors().is_none());

    // A store that is down stays reported while retries fail, and is back once restarted.
    c.sim.stop_store(3);
    wait_until("store 3's stream to fail", || failing_stores(&subscriber) == [3]);
    subscriber.handle_errors();
    wait_until("the retry to fail too", || failing_stores(&subscriber) == [3]);
    c.sim.restart_store(3).unwrap();
    subscriber.update_store_topology().unwrap();
    c.sim.flush_all();
    assert_events(&subscriber, &c.flushed_events(&[1, 2, 3]));
    assert!(subscriber.pending_errors().is_none());
}
