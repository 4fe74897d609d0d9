//! Lock resolution rounds against the simulated cluster (real gRPC on 127.0.0.1): which
//! transactions end committed, rolled back or untouched, what is scanned, and how a round
//! survives region changes, "locked" scans and a hung store. The sim itself records every
//! resolution that contradicts a transaction's fate; each test asserts there is none.

mod support;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use streamhelper::cluster::{ClusterMeta, KvClients};
use streamhelper::locks::fetch_flush_interval;
use streamhelper::locks::{run_round, RoundEnv, RoundReport, RoundRequest};
use streamhelper::sim::{Outcome, SimCluster, SimConfig, TxnSpec};
use streamhelper::StopToken;
use streamhelper::{KeyRange, StoreId, Ts};
use support::InterceptedPd;

type Cluster = support::SimWithClients;

impl Cluster {
    fn start(stores: usize, regions: usize) -> Cluster {
        Cluster::connect(SimConfig { stores, regions, seed: 11, ..Default::default() })
    }

    /// A key inside the `i`-th region (by key order), past its start.
    fn key_in(&self, i: usize, suffix: u8) -> Vec<u8> {
        let mut key = self.sim.regions()[i].range.start.clone();
        key.extend_from_slice(&[0x5f, suffix]);
        key
    }

    fn region_range(&self, key: &[u8]) -> KeyRange {
        self.sim.region_at(key).range
    }

    /// Targets as the core hands them over: pieces with the ts they are stuck at.
    fn targets(&self, keys: &[&[u8]], ts: Ts) -> Vec<(KeyRange, Ts)> {
        keys.iter().map(|k| (self.region_range(k), ts)).collect()
    }

    fn round_with(&self, meta: &dyn ClusterMeta, targets: Vec<(KeyRange, Ts)>, budget: Duration) -> RoundReport {
        self.run(meta, RoundRequest::new(vec!["t".into()], targets, Instant::now() + budget))
    }

    fn run(&self, meta: &dyn ClusterMeta, request: RoundRequest) -> RoundReport {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let stop = StopToken::never();
        let clients = self.clients.as_ref() as &dyn KvClients;
        let env = RoundEnv::new(meta, clients, Duration::from_millis(500), request.deadline, &stop);
        run_round(&env, &pool, &request)
    }

    fn round(&self, targets: Vec<(KeyRange, Ts)>) -> RoundReport {
        self.round_with(self.pd.as_ref(), targets, Duration::from_secs(10))
    }

    fn crashed(&self, spec: TxnSpec) -> Ts {
        let start = self.sim.begin_txn(&spec).unwrap();
        self.sim.crash_txn(start);
        start
    }

    fn assert_no_violation(&self) {
        assert_eq!(self.sim.txn_violations(), Vec::<String>::new());
    }
}

fn spec(keys: Vec<Vec<u8>>, ttl_ms: u64) -> TxnSpec {
    TxnSpec { ttl: Duration::from_millis(ttl_ms), ..TxnSpec::new(keys) }
}

/// Waits until every crashed transaction's TTL (at most `ttl_ms`) ran out on the sim's clock.
fn wait_expired(sim: &SimCluster, since: Ts, ttl_ms: u64) {
    support::wait_until("the TTLs to run out", || {
        streamhelper::ts::physical_ms(sim.now_ts()) > streamhelper::ts::physical_ms(since) + ttl_ms
    });
}

#[test]
fn each_transaction_ends_as_its_fate_says() {
    let c = Cluster::start(3, 16);
    let (a, b, d, e) = (c.key_in(2, 1), c.key_in(5, 1), c.key_in(8, 1), c.key_in(11, 1));
    let crashed = c.crashed(spec(vec![a.clone(), b.clone()], 50));
    let alive = c.sim.begin_txn(&spec(vec![d.clone()], 50)).unwrap();
    let half_committed = c.sim.begin_txn(&spec(vec![c.key_in(3, 1), c.key_in(6, 1)], 50)).unwrap();
    let committed_ts = c.sim.commit_txn(half_committed, true).unwrap();
    let async_keys = vec![c.key_in(9, 1), c.key_in(12, 1), c.key_in(13, 1)];
    let async_complete = c.crashed(TxnSpec { async_commit: true, ..spec(async_keys, 50) });
    let partial = TxnSpec {
        async_commit: true,
        prewritten: Some(2),
        ..spec(vec![e.clone(), c.key_in(14, 1), c.key_in(15, 1)], 50)
    };
    let async_partial = c.crashed(partial);
    wait_expired(&c.sim, async_partial, 50);
    let stuck_at = c.sim.now_ts();
    let keys: Vec<Vec<u8>> = c.sim.locks().into_iter().map(|(k, _)| k).collect();
    let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let report = c.round(c.targets(&key_refs, stuck_at));
    c.assert_no_violation();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(c.sim.txn_outcome(crashed), Some(Outcome::RolledBack));
    assert_eq!(c.sim.txn_outcome(alive), Some(Outcome::Pending), "an alive transaction is never touched");
    assert_eq!(c.sim.txn_outcome(half_committed), Some(Outcome::Committed(committed_ts)));
    assert_eq!(c.sim.txn_outcome(async_complete), Some(Outcome::Committed(async_complete + 3)));
    assert_eq!(c.sim.txn_outcome(async_partial), Some(Outcome::RolledBack));
    assert_eq!(c.sim.locks(), vec![(d, alive)], "only the alive transaction's lock is left");
    assert_eq!(report.locks_found, keys.len());
    assert_eq!(report.locks.get("alive"), Some(&1));
}

#[test]
fn only_the_target_regions_are_scanned_and_locks_elsewhere_stay() {
    let c = Cluster::start(3, 16);
    let inside = c.key_in(4, 1);
    let outside = c.key_in(10, 1);
    let first = c.crashed(spec(vec![inside.clone()], 10));
    let second = c.crashed(spec(vec![outside.clone()], 10));
    wait_expired(&c.sim, second, 10);
    let report = c.round(c.targets(&[&inside], second + 1));
    c.assert_no_violation();
    assert_eq!(report.regions_scanned, 1);
    assert_eq!(report.locks_found, 1);
    assert_eq!(c.sim.txn_outcome(first), Some(Outcome::RolledBack));
    assert_eq!(c.sim.locks(), vec![(outside, second)]);

    // The max version keeps newer transactions out of view even inside the targets.
    let newer = c.crashed(spec(vec![c.key_in(4, 2)], 10));
    wait_expired(&c.sim, newer, 10);
    let report = c.round(c.targets(&[&inside], first));
    assert_eq!(report.locks_found, 0);
    assert_eq!(c.sim.txn_outcome(newer), Some(Outcome::Pending));
}

/// At 10^6 regions polling only, every region lagged, and a round located each target
/// through PD (56 000 PD scans a tick) and scanned 160 000 regions for locks.
#[test]
fn a_round_asks_pd_nothing_about_known_regions_and_scans_at_most_its_limit() {
    let c = Cluster::start(3, 64);
    let known = c.pd.region_scan(b"", b"", 1000).unwrap();
    let stuck = c.crashed(spec(vec![c.key_in(6, 1)], 10));
    wait_expired(&c.sim, stuck, 10);
    // Every other region lags: 32 targets, none adjacent.
    let keys: Vec<Vec<u8>> = (0..64).step_by(2).map(|i| c.key_in(i, 1)).collect();
    let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let targets = c.targets(&key_refs, stuck + 1);
    let request = |max_regions| RoundRequest {
        known_regions: known.clone(),
        max_regions,
        ..RoundRequest::new(vec!["t".into()], targets.clone(), Instant::now() + Duration::from_secs(10))
    };

    let (scans, _) = c.sim.pd_scans();
    let report = c.run(c.pd.as_ref(), request(usize::MAX));
    assert_eq!((report.regions_scanned, report.regions_capped), (32, false), "{report:?}");
    assert_eq!(report.locks.get("rolled-back"), Some(&1), "{report:?}");
    assert_eq!(c.sim.pd_scans().0 - scans, 1, "one PD call, locating the crashed transaction's primary");
    c.assert_no_violation();

    let report = c.run(c.pd.as_ref(), request(8));
    assert_eq!((report.regions_scanned, report.regions_capped), (8, true), "{report:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn a_transaction_that_commits_while_being_checked_ends_committed() {
    let c = Cluster::start(3, 16);
    let (primary, secondary) = (c.key_in(2, 1), c.key_in(7, 1));
    let txn = c.sim.begin_txn(&spec(vec![primary.clone(), secondary.clone()], 50)).unwrap();
    // CheckTxnStatus reaches the primary's store only after the client committed.
    let primary_store = c.sim.region_at(&primary).leader_store.unwrap();
    c.sim.set_store_delay(primary_store, Duration::from_millis(300));
    let targets = c.targets(&[&secondary], txn + 1);
    let report = std::thread::scope(|s| {
        let round = s.spawn(|| c.round(targets));
        let committed = c.sim.commit_txn(txn, true).unwrap();
        (round.join().unwrap(), committed)
    });
    c.sim.set_store_delay(primary_store, Duration::ZERO);
    c.assert_no_violation();
    assert_eq!(c.sim.txn_outcome(txn), Some(Outcome::Committed(report.1)));
    // Either the round saw it alive (and left the secondary) or committed (and resolved it).
    let left = c.sim.locks();
    match report.0.locks.get("committed") {
        Some(1) => assert!(left.is_empty(), "{left:?}"),
        _ => assert_eq!(left, vec![(secondary, txn)]),
    }
}

#[test]
fn a_lock_in_a_region_that_split_or_moved_during_the_round_is_resolved() {
    let c = Cluster::start(3, 8);
    let (left_key, right_key) = (c.key_in(3, 1), c.key_in(3, 9));
    let txn = c.crashed(spec(vec![left_key.clone(), right_key.clone()], 10));
    wait_expired(&c.sim, txn, 10);
    let before = c.pd.region_scan(&left_key, &[], 1).unwrap();
    let mut split_at = left_key.clone();
    split_at.push(0);
    c.sim.split(&split_at).unwrap();
    let region = c.sim.region_at(&right_key);
    let other = c.sim.store_ids().into_iter().find(|s| Some(*s) != region.leader_store).unwrap();
    c.sim.transfer_leader(region.id, other).unwrap();
    // The first scans answer from before the split and the move, as a PD client's cache would.
    let stale = Mutex::new(VecDeque::from([before.clone(), before]));
    let stale = InterceptedPd { pd: c.pd.clone(), intercept: move |_: &[u8], _: &[u8], _| stale.lock().pop_front() };
    let targets = vec![(KeyRange::new(left_key.clone(), c.region_range(&right_key).end), txn + 1)];
    let report = c.round_with(&stale, targets, Duration::from_secs(10));
    c.assert_no_violation();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(c.sim.txn_outcome(txn), Some(Outcome::RolledBack));
    assert!(c.sim.locks().is_empty(), "{:?}", c.sim.locks());
    assert_eq!(report.regions_scanned, 2, "both halves after the split");
    // 5 RPCs when nothing moved (2 scans, CheckTxnStatus, 2 ResolveLock): the stale
    // answers cost at least two more.
    assert!(report.rpcs >= 7, "{report:?}");
}

#[test]
fn locked_scans_retry_with_a_lower_max_version() {
    let c = Cluster::start(3, 8);
    let key = c.key_in(2, 1);
    let txn = c.crashed(spec(vec![key.clone()], 10));
    wait_expired(&c.sim, txn, 10);
    let high = txn + (10_000 << 18);
    // An in-memory lock above the crashed one: two halvings get below it.
    c.sim.set_memory_lock(&c.key_in(2, 7), Some(txn + (4_000 << 18)));
    let report = c.round(vec![(c.region_range(&key), txn), (KeyRange::new(b"zz".to_vec(), b"zzz".to_vec()), high)]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(c.sim.txn_outcome(txn), Some(Outcome::RolledBack));

    // One at the floor cannot be stepped under: the region is reported and left.
    let txn = c.crashed(spec(vec![c.key_in(2, 2)], 10));
    wait_expired(&c.sim, txn, 10);
    c.sim.set_memory_lock(&c.key_in(2, 7), Some(txn));
    let report = c.round(vec![(c.region_range(&key), txn), (KeyRange::new(b"zz".to_vec(), b"zzz".to_vec()), high)]);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(report.errors[0].contains("KvScanLock in region"), "{}", report.errors[0]);
    assert_eq!(c.sim.txn_outcome(txn), Some(Outcome::Pending));
    c.assert_no_violation();
}

#[test]
fn a_hung_store_costs_the_round_its_deadline_and_is_named() {
    let c = Cluster::start(3, 8);
    let key = c.key_in(2, 1);
    let txn = c.crashed(spec(vec![key.clone()], 10));
    wait_expired(&c.sim, txn, 10);
    let store: StoreId = c.sim.region_at(&key).leader_store.unwrap();
    c.sim.hang_store(store);
    let started = Instant::now();
    let report = c.round_with(c.pd.as_ref(), c.targets(&[&key], txn + 1), Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(report.errors[0].contains(&format!("(store {store})")), "{}", report.errors[0]);
    c.sim.resume_store(store);
    let report = c.round(c.targets(&[&key], txn + 1));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(c.sim.txn_outcome(txn), Some(Outcome::RolledBack));
    c.assert_no_violation();
}

#[test]
fn flush_intervals_are_read_from_every_store_and_the_largest_wins() {
    let c = Cluster::start(3, 4);
    assert_eq!(fetch_flush_interval(c.pd.as_ref()).unwrap(), (Duration::from_secs(180), vec![]), "TiKV's default");
    c.sim.set_store_flush_interval(1, Duration::from_secs(20));
    c.sim.set_store_flush_interval(2, Duration::from_secs(30));
    c.sim.set_store_flush_interval(3, Duration::from_millis(1500));
    let (largest, notes) = fetch_flush_interval(c.pd.as_ref()).unwrap();
    assert_eq!(largest, Duration::from_secs(30));
    assert!(notes[0].contains("disagree"), "{notes:?}");
    c.sim.stop_store(2);
    let (largest, notes) = fetch_flush_interval(c.pd.as_ref()).unwrap();
    assert_eq!(largest, Duration::from_secs(20), "a dead store is skipped");
    assert!(notes[0].contains("cannot read the config of store 2"), "{notes:?}");
    c.sim.stop_store(1);
    c.sim.stop_store(3);
    let err = fetch_flush_interval(c.pd.as_ref()).unwrap_err().to_string();
    assert!(err.contains("no TiKV config found"), "{err}");
}
