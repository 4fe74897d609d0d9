//! What a tick does, driven by hand against in-memory fakes: the cluster (`MemMeta`), the
//! stores' service (`FixedDialer`) and the metadata store (`MemStore`). Milliseconds each, no
//! etcd and no simulated cluster.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::checkpoint_advancer::{
    CheckpointAdvancer, Env, FailingStores, PollBudget, PollSummary, RepeatedWarning, MIN_POLL_REGIONS,
};
use super::owner::OwnerEvent;
use super::ticker::Ticker;
use super::{run_ticker, Shared};
use crate::advancer::{Config, PollPlan};
use crate::cluster::testing::{regions_from_boundaries, FixedDialer, MemMeta};
use crate::cluster::{FlushBatch, KvClients, StoreInfo};
use crate::etcd::Leadership;
use crate::meta::testing::MemStore;
use crate::meta::TaskEvent;
use crate::proto::brpb::StreamBackupTaskInfo;
use crate::proto::tikvpb_grpc::TikvClient;
use crate::types::{compose_ts, KeyRange, StoreId, Ts};
use crate::worker::{stop_pair, StopToken, Worker};

const MINUTE: u64 = 60_000;

/// A TSO `minutes` after an arbitrary epoch.
fn at(minutes: u64) -> Ts {
    compose_ts(1_700_000_000_000 + minutes * MINUTE, 0)
}

fn term(revision: i64) -> Leadership {
    Leadership { key: b"/tidb/br-stream/owner/1".to_vec(), create_revision: revision, lease: 1 }
}

/// Stores whose transactional service cannot be reached: no lock round gets anywhere.
struct NoKv;

impl KvClients for NoKv {
    fn kv_client(&self, store: StoreId) -> crate::Result<TikvClient> {
        Err(crate::Error::Store { store_id: store, address: String::new(), reason: "no kv service in tests".into() })
    }

    fn forget(&self, _: StoreId) {}
}

struct Fixture {
    cluster: Arc<MemMeta>,
    service: Arc<FixedDialer>,
    store: Arc<MemStore>,
    advancer: CheckpointAdvancer,
}

impl Fixture {
    /// No polls (the threshold is far), no lag limit: ticks are about what gets written.
    fn new() -> Fixture {
        Fixture::with_config(Config {
            try_advance_threshold: Duration::from_secs(3600),
            lag_limit: Duration::ZERO,
            ..Config::default()
        })
    }

    fn with_config(config: Config) -> Fixture {
        Fixture::with_cluster(config, MemMeta::default())
    }

    fn with_cluster(config: Config, cluster: MemMeta) -> Fixture {
        let cluster = Arc::new(cluster);
        let service = Arc::new(FixedDialer::default());
        let store = Arc::new(MemStore::default());
        let env = Env { cluster: cluster.clone(), service: service.clone(), kv: Arc::new(NoKv), meta: store.clone() };
        let advancer = CheckpointAdvancer::with_config(env, config).unwrap();
        Fixture { cluster, service, store, advancer }
    }

    fn add_task(&mut self, name: &str, start: Ts) {
        let mut info = StreamBackupTaskInfo::new();
        info.set_name(name.into());
        info.set_start_ts(start);
        let incarnation = 1;
        self.store.incarnations.lock().insert(name.to_string(), incarnation);
        self.advancer.on_task_event(TaskEvent::Add {
            info,
            incarnation,
            ranges: vec![KeyRange::full()],
            paused: false,
        });
    }

    /// Owner under term 1, which the store holds too.
    fn own(&mut self) {
        *self.store.owner.lock() = Some(term(1));
        self.advancer.on_become_owner(term(1));
    }

    fn tick_at(&mut self, now: Ts) {
        *self.cluster.now.lock() = Some(now);
        assert_eq!(self.advancer.on_tick(), Some(now), "an owner ticks");
    }

    /// A flush event over every key; `ts` must not be above the last tick's `now`.
    fn flushed(&mut self, ts: Ts) {
        self.flushed_by(1, &[("", "", ts)]);
    }

    /// One stream message of `store`: (start, end, ts) per event.
    fn flushed_by(&mut self, store: StoreId, events: &[(&str, &str, Ts)]) {
        let mut batch = FlushBatch::new(store);
        for &(start, end, ts) in events {
            batch.push(&KeyRange::new(start, end), ts);
        }
        self.advancer.on_flush_events(batch);
    }

    fn uploads(&self) -> Vec<(String, Ts)> {
        self.store.uploads.lock().clone()
    }

    fn checkpoint_gauge(&self, task: &str) -> Option<f64> {
        self.advancer.metrics().last_checkpoint.get([task])
    }
}

#[test]
fn an_owner_uploads_under_its_term_and_holds_gc_below_the_checkpoint() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    *f.cluster.now.lock() = Some(at(1));
    assert_eq!(f.advancer.on_tick(), None, "a standby does not tick");
    assert!(f.uploads().is_empty() && f.cluster.gc.lock().is_empty());

    f.own();
    f.tick_at(at(1));
    assert_eq!(f.store.stored("t1"), Some(at(0)), "the start ts is uploaded first");
    f.flushed(at(1));
    f.tick_at(at(3));
    assert_eq!(f.store.stored("t1"), Some(at(1)));
    assert_eq!(*f.cluster.gc.lock(), vec![Some(at(0) - 1), Some(at(1) - 1)]);
    assert_eq!(f.checkpoint_gauge("t1"), Some(at(1) as f64));
}

#[test]
fn a_fenced_upload_makes_the_advancer_stand_by_and_drops_the_rest_of_the_tick() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    f.own();
    // Another advancer won a newer term.
    *f.store.owner.lock() = Some(term(2));
    f.tick_at(at(1));
    assert!(!f.advancer.is_owner(), "fenced off: standing by");
    assert_eq!(f.store.stored("t1"), None);
    assert!(f.cluster.gc.lock().is_empty(), "no GC safepoint from a deposed owner");
    *f.cluster.now.lock() = Some(at(2));
    assert_eq!(f.advancer.on_tick(), None);
    assert_eq!(f.uploads().len(), 1, "nothing more is attempted");
}

#[test]
fn a_higher_stored_checkpoint_is_kept_adopted_and_shown() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    f.own();
    // Another writer got further after the task was added.
    f.store.checkpoints.lock().insert("t1".into(), at(5));
    f.tick_at(at(6));
    assert_eq!(f.store.stored("t1"), Some(at(5)), "never lowered");
    assert_eq!(f.advancer.status()[0].checkpoint, at(5), "the stored value is a true checkpoint too");
    assert_eq!(f.checkpoint_gauge("t1"), Some(at(5) as f64), "the gauge shows what etcd holds");
}

#[test]
fn a_task_lagging_past_the_limit_is_paused_once_and_no_longer_uploaded() {
    let mut f = Fixture::with_config(Config {
        try_advance_threshold: Duration::from_secs(3600),
        lag_limit: Duration::from_secs(60),
        ..Config::default()
    });
    f.add_task("t1", at(0));
    f.own();
    f.tick_at(at(10));
    let pauses = f.store.pauses.lock().clone();
    assert_eq!(pauses.len(), 1, "{pauses:?}");
    assert_eq!(pauses[0].0, "t1");
    f.tick_at(at(11));
    assert_eq!(f.store.pauses.lock().len(), 1, "paused once");
    assert_eq!(f.uploads(), vec![("t1".to_string(), at(0))], "a paused task is not uploaded");
}

#[test]
fn the_gc_safepoint_covers_every_task_and_is_released_with_the_last() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    f.add_task("t2", at(3));
    f.advancer.on_task_event(TaskEvent::Pause { name: "t1".into() });
    f.own();
    f.tick_at(at(4));
    assert_eq!(f.cluster.gc.lock().last(), Some(&Some(at(0) - 1)), "a paused task still holds GC");
    f.advancer.on_task_event(TaskEvent::Del { name: "t1".into() });
    f.tick_at(at(5));
    assert_eq!(f.cluster.gc.lock().last(), Some(&Some(at(3) - 1)));
    f.advancer.on_task_event(TaskEvent::Del { name: "t2".into() });
    *f.cluster.failing_gc.lock() = 2;
    f.tick_at(at(6));
    f.tick_at(at(7));
    assert_eq!(f.cluster.gc.lock().last(), Some(&Some(at(3) - 1)), "two failed removals");
    f.tick_at(at(8));
    f.tick_at(at(9));
    assert_eq!(
        f.cluster.gc.lock().iter().filter(|c| c.is_none()).count(),
        1,
        "retried until PD confirmed, then no more"
    );
    assert_eq!(f.cluster.gc.lock().last(), Some(&None));
}

#[test]
fn a_new_owner_with_no_task_removes_a_safepoint_it_never_set() {
    let mut f = Fixture::new();
    f.own();
    f.tick_at(at(1));
    assert_eq!(*f.cluster.gc.lock(), vec![None], "removed although this owner never blocked GC");
    f.tick_at(at(2));
    assert_eq!(*f.cluster.gc.lock(), vec![None], "once confirmed");
    f.advancer.on_lose_owner();
    f.own();
    f.tick_at(at(3));
    assert_eq!(*f.cluster.gc.lock(), vec![None, None], "checked again in a new term");
}

#[test]
fn a_deleted_task_is_never_written_again_and_its_gauge_goes() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    f.add_task("t2", at(0));
    f.own();
    f.tick_at(at(1));
    assert!(f.checkpoint_gauge("t1").is_some());
    f.advancer.on_task_event(TaskEvent::Del { name: "t1".into() });
    f.flushed(at(1));
    f.tick_at(at(3));
    let t1: Vec<Ts> = f.uploads().into_iter().filter(|(t, _)| t == "t1").map(|(_, ts)| ts).collect();
    assert_eq!(t1, vec![at(0)], "no upload for a task that is gone");
    assert_eq!(f.store.stored("t2"), Some(at(1)), "the other task goes on");
    assert_eq!(f.checkpoint_gauge("t1"), None);
}

#[test]
fn losing_ownership_joins_the_subscription_threads() {
    let mut f = Fixture::new();
    // A store that accepts connections and never answers keeps its stream thread waiting.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    *f.cluster.stores.lock() = vec![StoreInfo { id: 1, address: address.clone(), boot_at: 1 }];
    f.service.addresses.lock().insert(1, address);
    let idle = Arc::strong_count(&f.service);
    f.own();
    assert!(Arc::strong_count(&f.service) > idle + 1, "the subscriber and its stream thread hold the service");
    f.advancer.on_lose_owner();
    assert_eq!(Arc::strong_count(&f.service), idle, "every stream thread has ended");
    assert!(!f.advancer.is_owner());
}

#[test]
fn a_poll_counts_failed_regions_once_per_reason_and_a_failed_store_once() {
    let mut regions = regions_from_boundaries(&[b"b", b"c", b"d"], &[1]);
    regions[3].leader_store = None;
    let config =
        Config { try_advance_threshold: Duration::from_secs(60), lag_limit: Duration::ZERO, ..Config::default() };
    // Store 1 cannot be dialed: its three regions fail with it.
    let mut f = Fixture::with_cluster(config, MemMeta::new(regions));
    f.add_task("t1", at(0));
    f.own();
    f.tick_at(at(10));
    let m = f.advancer.metrics();
    assert_eq!(m.region_request_failure.get(["store-failed"]), 3);
    assert_eq!(m.region_request_failure.get(["no-leader"]), 1);
    assert_eq!(m.region_request.get(["fail"]), 4);
    assert_eq!(m.store_failures.get(["1"]), 1, "one failed store, not one per region");
    assert_eq!(f.store.stored("t1"), Some(at(0)), "nothing advanced past what was never answered");
}

#[test]
fn a_store_that_leaves_loses_its_series_and_connection() {
    let mut f = Fixture::new();
    *f.cluster.stores.lock() = vec![StoreInfo { id: 1, address: "127.0.0.1:9".into(), boot_at: 1 }];
    f.own();
    let failures = &f.advancer.metrics().store_failures;
    // Failures of store 1 and of an id PD never listed (a region naming a bogus leader).
    failures.inc_by(["1"], 1);
    failures.inc_by(["7"], 1);
    f.advancer.metrics().region_checkpoint_event.observe_value(["1"], 3.0);
    f.tick_at(at(1));
    let failures = &f.advancer.metrics().store_failures;
    assert_eq!((failures.get(["1"]), failures.get(["7"])), (1, 0), "only listed stores keep a series");
    f.cluster.stores.lock().clear();
    f.tick_at(at(2));
    let rendered = f.advancer.metrics().render();
    assert!(!rendered.contains("streamhelper_store_failures_total{"));
    assert!(!rendered.contains("tidb_log_backup_region_checkpoint_event_count{"), "{rendered}");
    assert!(f.service.cleared.lock().contains(&1), "the connection to the departed store is dropped");
}

#[test]
fn the_region_holding_a_task_back_is_shown_with_its_store_and_reason_and_cleared_with_ownership() {
    let regions = regions_from_boundaries(&[b"b"], &[1]);
    let config =
        Config { try_advance_threshold: Duration::from_secs(60), lag_limit: Duration::ZERO, ..Config::default() };
    let mut f = Fixture::with_cluster(config, MemMeta::new(regions));
    f.add_task("t1", at(0));
    f.own();
    f.tick_at(at(10));
    let m = f.advancer.metrics().clone();
    assert_eq!(m.task_blocker.series(), vec![(["t1", "1", "1", "store-failed"].map(String::from), 600.0)]);
    assert_eq!(m.last_region_id.get([]), Some(1.0));
    assert_eq!(m.last_region_leader_store_id.get([]), Some(1.0));
    assert_eq!(m.tick_duration.count(["get-regions-in-range"]), 1, "one range scanned");
    assert!(f.checkpoint_gauge("t1").is_some());

    f.advancer.on_lose_owner();
    assert_eq!(f.checkpoint_gauge("t1"), None, "a standby shows no checkpoint of its own");
    assert!(m.task_blocker.series().is_empty());
    assert_eq!(m.last_region_id.get([]), None);
    assert_eq!(m.last_region_leader_store_id.get([]), None);
    assert_eq!(m.owner.get([]), Some(0.0));
}

#[test]
fn a_failed_upload_is_counted() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    f.own();
    *f.store.failing.lock() = Some("etcd is down".into());
    f.flushed(at(1));
    f.tick_at(at(2));
    assert_eq!(f.advancer.metrics().upload_failures.get(["t1"]), 1);
    assert_eq!(f.checkpoint_gauge("t1"), None, "the gauge shows only what etcd holds");
}

#[test]
fn a_flush_from_the_future_is_dropped_and_counted() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    f.own();
    f.tick_at(at(1));
    f.flushed(at(30));
    f.tick_at(at(2));
    assert_eq!(f.advancer.metrics().future_checkpoints.get(["flush"]), 1);
    assert_eq!(f.store.stored("t1"), Some(at(0)), "a claim above now never becomes the checkpoint");
}

#[test]
fn flushes_received_before_a_task_was_added_never_reach_it() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    f.own();
    f.tick_at(at(2));
    // Received (and kept for the next tick's merge) before t2 existed: TiKV flushed
    // nothing of t2 there.
    f.flushed(at(2));
    f.add_task("t2", at(1));
    f.tick_at(at(3));
    assert_eq!(f.store.stored("t1"), Some(at(2)));
    assert_eq!(f.store.stored("t2"), Some(at(1)), "t2 starts from its own start ts");
}

#[test]
fn batches_of_two_stores_advance_the_checkpoint_only_where_believable_events_cover_it() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    f.own();
    f.tick_at(at(3));
    // Store 1 covers the left half; its claim about the right half is from the future.
    f.flushed_by(1, &[("", "g", at(2)), ("g", "m", at(3)), ("m", "", at(30))]);
    f.tick_at(at(4));
    assert_eq!(f.advancer.metrics().future_checkpoints.get(["flush"]), 1);
    assert_eq!(f.store.stored("t1"), Some(at(0)), "the right half was never heard from");

    f.flushed_by(2, &[("m", "", at(4))]);
    f.tick_at(at(5));
    assert_eq!(f.store.stored("t1"), Some(at(2)), "the slowest piece of the left half");
    // An older event of another store lowers nothing.
    f.flushed_by(2, &[("", "m", at(1))]);
    f.tick_at(at(6));
    assert_eq!(f.store.stored("t1"), Some(at(2)));
}

/// The ticker on its own thread, as the daemon runs it.
struct RunningTicker {
    owner: crossbeam_channel::Sender<OwnerEvent>,
    shared: Arc<Shared>,
    /// Signalled when the ticker tells the owner loop to resign.
    resigned: StopToken,
    _requests: crossbeam_channel::Sender<super::ticker::Request>,
    _worker: Worker,
}

fn spawn_ticker(advancer: CheckpointAdvancer, cluster: Arc<MemMeta>) -> RunningTicker {
    let shared = Arc::new(Shared {
        id: "test".into(),
        owner: AtomicBool::new(false),
        metrics: advancer.metrics().clone(),
        tasks: Mutex::default(),
        cluster,
    });
    let (owner_tx, owner) = crossbeam_channel::bounded(1);
    let (requests_tx, requests) = crossbeam_channel::bounded(1);
    let (resign, resigned) = stop_pair();
    let ticker_shared = shared.clone();
    let worker = Worker::spawn("sh-test-ticker", move |stop| {
        run_ticker(Ticker { advancer, shared: ticker_shared, owner, requests, stop }, Some(resign))
    })
    .unwrap();
    RunningTicker { owner: owner_tx, shared, resigned, _requests: requests_tx, _worker: worker }
}

#[test]
fn a_panicking_ticker_stands_down_and_makes_the_owner_resign() {
    let cluster = MemMeta { tso_panics: true, ..MemMeta::default() };
    let config = Config { tick_interval: Duration::from_millis(100), ..Config::default() };
    let Fixture { cluster, advancer, .. } = Fixture::with_cluster(config, cluster);
    let ticker = spawn_ticker(advancer, cluster);
    ticker.owner.send(OwnerEvent::Gained(term(1))).unwrap();
    // Nothing asks the ticker to stop: only its panic at the first tick can end it.
    assert!(ticker.resigned.sleep(Duration::from_secs(10)), "the owner loop is told to resign");
    assert!(!ticker.shared.owner.load(Ordering::SeqCst), "the daemon no longer claims ownership");
}

#[test]
fn a_new_owner_ticks_at_once_instead_of_after_an_interval() {
    let config = Config {
        tick_interval: Duration::from_secs(3600),
        try_advance_threshold: Duration::from_secs(3600),
        lag_limit: Duration::ZERO,
        ..Config::default()
    };
    let mut f = Fixture::with_config(config);
    f.add_task("t1", at(0));
    *f.cluster.now.lock() = Some(at(1));
    *f.store.owner.lock() = Some(term(1));
    let Fixture { cluster, store, advancer, .. } = f;
    let ticker = spawn_ticker(advancer, cluster);
    ticker.owner.send(OwnerEvent::Gained(term(1))).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.stored("t1").is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(store.stored("t1"), Some(at(0)), "the first upload came without waiting an hour-long interval");
}

#[test]
fn a_warning_repeated_every_tick_is_logged_once_then_summarised() {
    let mut w = RepeatedWarning::default();
    let warning = |line: &str| Some((line.to_string(), line.to_string()));
    let store_1 = || warning("store 1 has no subscription");
    let line = |l: &str| Some(l.to_string());
    assert_eq!(w.observe(store_1()), line("store 1 has no subscription"));
    assert_eq!(w.observe(store_1()), None);
    assert_eq!(w.observe(store_1()), None);
    assert_eq!(w.observe(None), line("resolved: store 1 has no subscription (seen in 3 ticks)"));
    assert_eq!(w.observe(None), None);
    assert_eq!(w.observe(store_1()), line("store 1 has no subscription"));
    assert_eq!(
        w.observe(warning("store 2 down")),
        line("store 2 down; before: store 1 has no subscription (seen in 1 ticks)")
    );
    // The same stores failing with another error text is the same warning.
    let mut w = RepeatedWarning::default();
    let failing = |why: &str| Some(("[1, 2]".to_string(), format!("stores 1 and 2: {why}")));
    assert_eq!(w.observe(failing("reset")), line("stores 1 and 2: reset"));
    assert_eq!(w.observe(failing("refused")), None);
    assert_eq!(w.observe(None), line("resolved: stores 1 and 2: reset (seen in 2 ticks)"));
}

/// Streams retrying drop out of the failing set and come back (19 and 20 of 20 stores while
/// the stores stream nothing): one warning, logged again only when another store fails, and
/// resolved once none does.
#[test]
fn subscriptions_failing_on_and_off_are_one_warning() {
    let (mut stores, mut w) = (FailingStores::default(), RepeatedWarning::default());
    let mut tick = |failing: &[u64]| {
        let key = stores.observe(failing.iter().copied());
        w.observe((!failing.is_empty()).then(|| (key, format!("stores {failing:?} failed"))))
    };
    assert_eq!(tick(&[1, 2, 3]), Some("stores [1, 2, 3] failed".to_string()));
    assert_eq!(tick(&[1, 3]), None, "store 2 retrying");
    assert_eq!(tick(&[1, 2, 3]), None);
    assert_eq!(tick(&[2]), None);
    let line = tick(&[2, 4]).expect("store 4 is news");
    assert!(line.starts_with("stores [2, 4] failed; before: stores [1, 2, 3] failed (seen in 4 ticks)"), "{line}");
    assert_eq!(tick(&[]), Some("resolved: stores [2, 4] failed (seen in 1 ticks)".to_string()));
    assert_eq!(tick(&[1]), Some("stores [1] failed".to_string()), "a new failure after all were healthy");
}

#[test]
fn an_upload_for_a_gone_incarnation_writes_nothing_and_keeps_ownership() {
    let mut f = Fixture::new();
    f.add_task("t1", at(0));
    f.add_task("t2", at(0));
    f.own();
    // t1 was deleted and re-created after the advancer last heard of it.
    f.store.incarnations.lock().insert("t1".into(), 2);
    f.tick_at(at(1));
    assert_eq!(f.store.stored("t1"), None, "nothing written for the gone incarnation");
    assert_eq!(f.store.stored("t2"), Some(at(0)), "the other task's upload still runs");
    assert!(f.advancer.is_owner(), "a gone task is not a lost ownership");
}

#[test]
fn a_failed_lag_pause_is_retried_every_tick_until_written() {
    let mut f = Fixture::with_config(Config {
        try_advance_threshold: Duration::from_secs(3600),
        lag_limit: Duration::from_secs(60),
        ..Config::default()
    });
    let second = |s| crate::types::ts_add(at(0), Duration::from_secs(s));
    f.add_task("t1", at(0));
    f.own();
    // Ticks 20 s apart: the first one's clock (a jump from the local clock) holds lag
    // verdicts for one limit; the checkpoint stays at the start.
    for s in [0, 20, 40, 60] {
        f.tick_at(second(s));
    }
    assert!(!f.advancer.status()[0].paused, "within the limit");
    *f.store.failing_pauses.lock() = 2;
    f.tick_at(second(80));
    assert!(f.store.pauses.lock().is_empty(), "the first pause write failed");
    assert!(!f.advancer.status()[0].paused, "not paused in memory only");
    f.tick_at(second(100));
    assert!(f.store.pauses.lock().is_empty(), "the second failed too");
    f.tick_at(second(120));
    assert_eq!(f.store.pauses.lock().len(), 1, "retried at the next tick");
    assert!(f.advancer.status()[0].paused);
    f.tick_at(second(140));
    assert_eq!(f.store.pauses.lock().len(), 1, "written once");
}

#[test]
fn a_deletion_that_comes_while_a_tick_is_in_flight_applies_before_its_uploads() {
    let mut f = Fixture::new();
    f.advancer.on_start().unwrap();
    f.add_task("t1", at(0));
    f.add_task("t2", at(0));
    f.own();
    f.tick_at(at(1));
    let listener = f.store.listener.lock().clone().expect("the advancer listens");
    // BR deletes t1 while the tick waits on PD.
    let store = f.store.clone();
    *f.cluster.during_tso.lock() = Some(Box::new(move || {
        store.incarnations.lock().remove("t1");
        listener.send(TaskEvent::Del { name: "t1".into() }).unwrap();
    }));
    f.flushed(at(1));
    f.tick_at(at(3));
    let t1: Vec<Ts> = f.uploads().into_iter().filter(|(t, _)| t == "t1").map(|(_, ts)| ts).collect();
    assert_eq!(t1, vec![at(0)], "the tick did not even try to write the deleted task");
    assert_eq!(f.store.stored("t2"), Some(at(1)), "the other task goes on");
    assert!(f.advancer.status().iter().all(|s| s.name != "t1"));
}

/// Every PD call of a tick hangs (a black-holed PD): the tick still ends by its deadline,
/// one tick interval, not after an RPC deadline per call; the range it could not poll keeps
/// its old value, so nothing above what the stores reported is uploaded; and the next tick,
/// with PD back, carries on.
#[test]
fn a_tick_cut_short_by_its_deadline_uploads_nothing_unchecked_and_the_next_one_recovers() {
    let tick = Duration::from_millis(300);
    let config = Config {
        tick_interval: tick,
        try_advance_threshold: Duration::from_secs(1),
        lag_limit: Duration::ZERO,
        ..Config::default()
    };
    let mut f = Fixture::with_cluster(config, MemMeta::new(regions_from_boundaries(&[b"m"], &[1])));
    f.add_task("t1", at(0));
    f.own();
    f.tick_at(at(1));
    let flushed = |f: &mut Fixture, start: &str, end: &str, ts: Ts| f.flushed_by(1, &[(start, end, ts)]);
    // The truth: [-∞, m) at 2, [m, +∞) at 1.
    flushed(&mut f, "", "m", at(1));
    flushed(&mut f, "m", "", at(1));
    f.tick_at(at(2));
    let gc_calls = f.cluster.gc.lock().len();
    flushed(&mut f, "", "m", at(2));

    f.cluster.black_holed.store(true, Ordering::SeqCst);
    let began = std::time::Instant::now();
    assert!(f.advancer.on_tick().is_some(), "the tick ran on the local clock");
    let took = began.elapsed();
    assert!(took < Duration::from_secs(3), "a tick of {tick:?} lasted {took:?}: its calls outlived its deadline");
    assert_eq!(f.store.stored("t1"), Some(at(1)), "only what the stores reported is uploaded");
    assert_eq!(f.cluster.gc.lock().len(), gc_calls, "the GC step of the cut tick failed");

    f.cluster.black_holed.store(false, Ordering::SeqCst);
    flushed(&mut f, "m", "", at(2));
    f.tick_at(at(3));
    assert_eq!(f.store.stored("t1"), Some(at(2)));
    assert_eq!(f.cluster.gc.lock().last(), Some(&Some(at(2) - 1)), "GC is held at the checkpoint again");
}

#[test]
fn a_pd_that_keeps_failing_is_warned_about_once_and_its_recovery_once() {
    let config =
        Config { try_advance_threshold: Duration::from_secs(3600), lag_limit: Duration::ZERO, ..Config::default() };
    let mut f = Fixture::with_cluster(config, MemMeta::new(regions_from_boundaries(&[b"m"], &[1])));
    f.add_task("t1", at(0));
    f.own();
    f.tick_at(at(1));
    *f.cluster.failing_gc.lock() = 3;
    let lines = crate::testing::warnings_of(|| {
        *f.cluster.now.lock() = None;
        for _ in 0..3 {
            f.advancer.on_tick();
        }
        f.tick_at(at(2));
    });
    let about = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
    assert_eq!(about("PD TSO unavailable"), 2, "once when it starts, once when it ends: {lines:?}");
    assert!(lines.iter().any(|l| l.starts_with("resolved: PD TSO unavailable") && l.contains("3 ticks")), "{lines:?}");
    assert_eq!(about("failed to update service GC safe point"), 2, "{lines:?}");
}

/// A store that cannot answer fails every poll: the collector and the advancer each warned
/// about it at every poll (38 pairs per store in one polling-only fault bench run).
#[test]
fn a_store_failing_every_poll_is_warned_about_once_while_it_lasts() {
    let config =
        Config { try_advance_threshold: Duration::from_secs(60), lag_limit: Duration::ZERO, ..Config::default() };
    // Neither store can be dialed.
    let mut f = Fixture::with_cluster(config, MemMeta::new(regions_from_boundaries(&[b"m"], &[1, 2])));
    f.add_task("t1", at(0));
    f.own();
    let lines = crate::testing::warnings_of(|| {
        for minute in 10..15 {
            f.tick_at(at(minute));
        }
    });
    assert_eq!(f.advancer.metrics().regions_polled.get([]), 10, "every tick polled both stores' regions");
    let about: Vec<&String> = lines.iter().filter(|l| l.contains("failed to report checkpoints")).collect();
    assert_eq!(about.len(), 1, "{lines:?}");
    assert!(about[0].starts_with("stores {1, 2} failed to report checkpoints, the first: task t1: "), "{about:?}");
    assert!(!lines.iter().any(|l| l.starts_with("task t1:") || l.starts_with("store 1")), "{lines:?}");
}

/// 300 tasks once took 25 s to load: each task event and each task's tick cost PD calls.
#[test]
fn pd_calls_per_tick_do_not_grow_with_the_number_of_tasks() {
    let pd_calls_per_tick = |tasks: usize| {
        let boundaries: Vec<Vec<u8>> = (1..tasks).map(|i| format!("k{i:04}").into_bytes()).collect();
        let boundaries: Vec<&[u8]> = boundaries.iter().map(Vec::as_slice).collect();
        let stores = vec![1; boundaries.len() + 1];
        let config =
            Config { try_advance_threshold: Duration::from_secs(3600), lag_limit: Duration::ZERO, ..Config::default() };
        let mut f = Fixture::with_cluster(config, MemMeta::new(regions_from_boundaries(&boundaries, &stores)));
        for i in 0..tasks {
            f.add_task(&format!("t{i}"), at(0));
        }
        assert_eq!(
            f.cluster.tso_calls.load(Ordering::SeqCst) + f.cluster.scans.lock().len(),
            0,
            "loading tasks asks PD nothing"
        );
        f.own();
        f.tick_at(at(1));
        f.flushed(at(1));
        f.tick_at(at(2));
        let before =
            (f.cluster.tso_calls.load(Ordering::SeqCst), f.cluster.scans.lock().len(), f.cluster.gc.lock().len());
        f.flushed(at(2));
        f.tick_at(at(3));
        assert_eq!(f.uploads().iter().filter(|(_, ts)| *ts == at(2)).count(), tasks, "every task advanced");
        let after =
            (f.cluster.tso_calls.load(Ordering::SeqCst), f.cluster.scans.lock().len(), f.cluster.gc.lock().len());
        (after.0 - before.0, after.1 - before.1, after.2 - before.2)
    };
    let one = pd_calls_per_tick(1);
    assert_eq!(one, (1, 0, 1), "one TSO, no scan (the region cache holds them), one GC safepoint update");
    assert_eq!(pd_calls_per_tick(300), one, "(TSO, region scans, GC safepoint) calls of a steady tick");
}

/// A store that accepts connections and never answers takes the whole poll budget of a
/// tick: the GC safepoint, a PD call after the polls, still moves with the checkpoint,
/// since polls stop short of the tick's end.
#[test]
fn a_poll_that_runs_out_of_time_leaves_the_tick_time_for_the_gc_safepoint() {
    // Its reserve (a fifth) is 200 ms: room for the in-memory GC call on a loaded machine.
    let tick = Duration::from_secs(1);
    let config = Config {
        tick_interval: tick,
        try_advance_threshold: Duration::from_millis(1),
        lag_limit: Duration::ZERO,
        ..Config::default()
    };
    let mut f = Fixture::with_cluster(config, MemMeta::new(regions_from_boundaries(&[b"m"], &[1, 2])));
    let hung = TcpListener::bind("127.0.0.1:0").unwrap();
    f.service.addresses.lock().insert(1, hung.local_addr().unwrap().to_string());
    f.add_task("t1", at(0));
    f.own();
    f.flushed_by(2, &[("m", "", at(1))]);
    let gc_calls = f.cluster.gc.lock().len();
    f.tick_at(at(2));
    assert_eq!(f.store.stored("t1"), Some(at(0)), "the hung store's region holds the checkpoint");
    assert_eq!(f.cluster.gc.lock().len(), gc_calls + 1, "the GC safepoint was updated after the polls ran out of time");
    assert_eq!(f.cluster.gc.lock().last(), Some(&Some(at(0) - 1)));
}

/// At 10^6 regions on a loaded machine a poll of every lagging region never finished within
/// its tick: nothing was answered in time, tick after tick, and the checkpoint stood still.
/// After such a poll a tick asks about the most lagging regions only, as many as were
/// answered (at least `MIN_POLL_REGIONS`), across its spans oldest first.
#[test]
fn after_a_poll_outgrows_its_tick_the_next_polls_ask_about_the_most_lagging_regions_first() {
    let (mut f, keys, _silent) = owner_of_regions_on_a_silent_store(1500);
    // The first 1000 regions are newer than the rest; both lag.
    f.flushed_by(1, &[("", "k1000", at(1))]);
    f.tick_at(at(10));
    assert_eq!(f.advancer.metrics().regions_polled.get([]), 1500, "every lagging region, none answered");

    let planned = f.advancer.planned_polls(at(11));
    let most_lagging = MIN_POLL_REGIONS - 500;
    let expected = vec![KeyRange::new("", keys[most_lagging - 1].clone()), KeyRange::new("k1000", "")];
    assert_eq!(planned, vec![PollPlan { task: "t1".into(), ranges: expected }], "the 500 oldest, then the next oldest");
    f.tick_at(at(11));
    assert_eq!(f.advancer.metrics().regions_polled.get([]), 1500 + MIN_POLL_REGIONS as u64);
    assert_eq!(f.store.stored("t1"), Some(at(0)), "nothing answered, nothing advanced");
}

fn poll(asked: usize, answered: usize, out_of_time: bool) -> PollSummary {
    PollSummary { asked, answered, out_of_time, ..PollSummary::default() }
}

/// An owner of task t1 (started at `at(0)`, 300 ms ticks, 60 s poll threshold) over `regions`
/// regions (bounded by the keys returned) led by store 1, which accepts connections and never
/// answers, so every call waits for its deadline; the listener must be kept.
fn owner_of_regions_on_a_silent_store(regions: usize) -> (Fixture, Vec<Vec<u8>>, TcpListener) {
    let keys: Vec<Vec<u8>> = (1..regions).map(|i| format!("k{i:04}").into_bytes()).collect();
    let boundaries: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = Config {
        tick_interval: TICK_ON_A_SILENT_STORE,
        try_advance_threshold: Duration::from_secs(60),
        lag_limit: Duration::ZERO,
        ..Config::default()
    };
    let mut f = Fixture::with_cluster(config, MemMeta::new(regions_from_boundaries(&boundaries, &[1])));
    f.service.addresses.lock().insert(1, silent.local_addr().unwrap().to_string());
    f.add_task("t1", at(0));
    f.own();
    (f, keys, silent)
}

const TICK_ON_A_SILENT_STORE: Duration = Duration::from_millis(300);

/// Choosing the most lagging regions costs a cache look-up per span, so a large budget can
/// take a loaded tick's whole time before any poll begins: nothing was asked, so the budget
/// never changed, and no poll began again (the 10^6 polling-only run that polled nothing per
/// tick). A tick whose polls never began halves it.
#[test]
fn a_tick_whose_polls_never_begin_halves_the_poll_budget() {
    let (mut f, keys, _silent) = owner_of_regions_on_a_silent_store(3000);
    f.tick_at(at(10));
    let planned =
        |f: &Fixture, now| f.advancer.planned_polls(now).into_iter().flat_map(|p| p.ranges).collect::<Vec<_>>();
    assert_eq!(planned(&f, at(11)), vec![KeyRange::new("", keys[1499].clone())], "half of the 3000 asked");

    // PD's clock takes the next tick's whole time.
    let tick = TICK_ON_A_SILENT_STORE;
    *f.cluster.during_tso.lock() = Some(Box::new(move || std::thread::sleep(tick + tick / 2)));
    f.tick_at(at(11));
    assert_eq!(f.advancer.metrics().regions_polled.get([]), 3000, "no poll began");
    assert_eq!(planned(&f, at(12)), vec![KeyRange::new("", keys[MIN_POLL_REGIONS - 1].clone())], "halved");
}

#[test]
fn the_poll_budget_follows_what_polls_get_answered_in_time() {
    let mut budget = PollBudget::default();
    budget.after_poll(&poll(10_000, 10_000, false));
    budget.after_poll(&poll(10_000, 9_000, true));
    assert_eq!(budget.regions, None, "a late store alone does not limit the polls");
    budget.after_poll(&poll(1_000_000, 300_000, true));
    assert_eq!(budget.regions, Some(500_000), "halved");
    budget.after_poll(&poll(500_000, 280_000, true));
    assert_eq!(budget.regions, Some(1_000_000), "doubled: a late store alone is no sign the poll was too big");
    budget.after_poll(&poll(0, 0, false));
    assert_eq!(budget.regions, Some(1_000_000), "a tick with nothing to poll says nothing");
    budget.after_poll(&poll(1_000_000, 0, true));
    assert_eq!(budget.regions, Some(500_000), "nothing answered (a stall): halved, not down to what was answered");
    for _ in 0..20 {
        budget.after_poll(&poll(budget.regions.unwrap(), 0, true));
    }
    assert_eq!(budget.regions, Some(MIN_POLL_REGIONS), "at least this many");
}

/// In the polling-only fault bench a store's loss left its regions lagging one by one; the
/// first poll after it asked a few hundred of them, its PD look-ups ran out of time, and the
/// budget fell to `MIN_POLL_REGIONS` while all 10^5 regions lagged together a tick later:
/// the checkpoint stood until the budget had doubled past them, a fault after a fault.
#[test]
fn only_a_poll_bigger_than_the_least_whose_stores_ran_out_of_time_limits_the_next_and_a_limit_goes_once_all_fits() {
    let mut budget = PollBudget::default();
    budget.after_poll(&poll(280, 51, true));
    assert_eq!(budget.regions, None, "no bigger than the least a tick polls: a limit would change nothing");
    budget.after_poll(&PollSummary { cut_short: true, ..poll(50_000, 1_000, true) });
    assert_eq!(budget.regions, None, "the region listing was cut short: PD, not the stores, ran out of time");
    budget.after_poll(&poll(100_000, 20_000, true));
    assert_eq!(budget.regions, Some(50_000));
    budget.after_poll(&poll(50_000, 50_000, false));
    assert_eq!(budget.regions, Some(100_000), "doubled while it holds the polls back");
    budget.after_poll(&poll(5_000, 5_000, false));
    assert_eq!(budget.regions, None, "everything lagging fitted and was answered: no limit");
}
