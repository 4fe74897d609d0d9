//! Lifecycle races that timing cannot reach reliably, made deterministic by failpoints (the
//! `failpoints` feature): a real etcd and the simulated cluster, a `CheckpointAdvancer`
//! driven by hand, and a task event landing exactly between a write's decision and its
//! transaction. Failpoints are process-wide, so each test holds a `FailScenario`.
#![cfg(feature = "failpoints")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use streamhelper::etcd::{Election, EtcdClient, EtcdProcess, Leadership, Txn, TxnOp};
use streamhelper::meta::{keys, AdvancerExt, MetaDataClient, TaskEvent};
use streamhelper::sim::{Outcome, SimCluster, SimConfig, TxnSpec};
use streamhelper::ts::ts_sub;
use streamhelper::Config;
use streamhelper::{CheckpointAdvancer, Daemon, DaemonConfig, Env};
use streamhelper::{KeyRange, Ts};
use support::{wait_until, DEADLINE};

const UPLOAD: &str = "before-upload-checkpoint";
const PAUSE: &str = "before-pause-write";
const RESIGN: &str = "between-resign-and-revoke";
const GC_CALL: &str = "before-gc-safepoint";
const LOCK_ROUND: &str = "in-lock-round";

struct Fixture {
    _etcd: EtcdProcess,
    sim: SimCluster,
    meta: MetaDataClient,
    advancer: CheckpointAdvancer,
}

impl Fixture {
    /// An owner (its own owner key) that never polls: the checkpoint moves only by what is
    /// stored and by task events, so each step's expected value is exact.
    fn new(config: Config) -> Fixture {
        let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
        let sim = SimCluster::start(SimConfig { stores: 1, regions: 4, seed: 7, ..SimConfig::default() }).unwrap();
        let meta = MetaDataClient::new(EtcdClient::connect_plain([etcd.endpoint()]).unwrap());
        let (pd, clients) = support::connect_clients(&sim);
        let env =
            Env { cluster: pd, service: clients.clone(), kv: clients, meta: Arc::new(AdvancerExt::new(meta.clone())) };
        let config = Config { try_advance_threshold: Duration::from_secs(3600), ..config };
        let mut advancer = CheckpointAdvancer::with_config(env, config).unwrap();
        advancer.on_start().unwrap();
        let key = b"/tidb/br-stream/owner/test".to_vec();
        let create_revision = meta.etcd().put(key.clone(), "me", 0).unwrap();
        advancer.on_become_owner(Leadership { key, create_revision, lease: 0 });
        Fixture { _etcd: etcd, sim, meta, advancer }
    }

    fn put_task(meta: &MetaDataClient, name: &str, start: Ts) {
        support::put_task(meta, name, start, KeyRange::full(), "noop://");
    }

    /// Applies task events until one for `name` matching `what` has been applied.
    fn apply_until(&mut self, what: &str, mut done: impl FnMut(&TaskEvent) -> bool) {
        loop {
            let event = self.advancer.task_events().recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("no {what}"));
            let matched = done(&event);
            self.advancer.on_task_event(event);
            if matched {
                return;
            }
        }
    }

    fn apply_add(&mut self, name: &str) {
        self.apply_until("Add", |e| matches!(e, TaskEvent::Add { info, .. } if info.get_name() == name));
    }

    fn stored(&self, task: &str) -> Option<Vec<u8>> {
        self.meta.etcd().get(keys::global_checkpoint_of(task)).unwrap().map(|kv| kv.get_value().to_vec())
    }

    fn checkpoint(&self, task: &str) -> Ts {
        self.advancer.status().into_iter().find(|s| s.name == task).expect("a tracked task").checkpoint
    }

    fn safepoint(&self) -> Option<Ts> {
        self.sim.gc_safe_points().into_iter().find(|(id, _)| id == "log-backup-coordinator").map(|(_, ts)| ts)
    }
}

#[test]
fn a_task_deleted_during_an_upload_is_not_written_again() {
    let _scenario = fail::FailScenario::setup();
    let mut f = Fixture::new(Config::default());
    let start = f.sim.now_ts();
    Fixture::put_task(&f.meta, "t", start);
    f.apply_add("t");
    let meta = f.meta.clone();
    fail::cfg_callback(UPLOAD, move || meta.delete_task("t").unwrap()).unwrap();
    f.advancer.on_tick();
    fail::remove(UPLOAD);
    assert_eq!(f.stored("t"), None, "the upload decided before the deletion must not re-create central_global");
    f.apply_until("Del", |e| matches!(e, TaskEvent::Del { .. }));
    f.advancer.on_tick();
    assert_eq!(f.stored("t"), None);
    assert_eq!(f.safepoint(), None, "no task, no safepoint");
}

#[test]
fn a_task_recreated_with_an_earlier_start_during_an_upload_starts_from_its_own_start() {
    let _scenario = fail::FailScenario::setup();
    let mut f = Fixture::new(Config::default());
    let earlier = ts_sub(f.sim.now_ts(), Duration::from_secs(600));
    Fixture::put_task(&f.meta, "t", f.sim.now_ts());
    f.apply_add("t");
    f.advancer.on_tick();
    let first = f.stored("t").expect("the first incarnation's upload");

    for round in 0..5 {
        let meta = f.meta.clone();
        fail::cfg_callback(UPLOAD, move || {
            meta.delete_task("t").unwrap();
            Fixture::put_task(&meta, "t", earlier);
        })
        .unwrap();
        // A heartbeat upload of the old incarnation, decided before the re-creation: the
        // shortest heartbeat allowed, waited out.
        let heartbeat = Duration::from_millis(100);
        f.advancer.update_config_with(|c| c.upload_heartbeat = heartbeat).unwrap();
        std::thread::sleep(heartbeat + Duration::from_millis(20));
        f.advancer.on_tick();
        fail::remove(UPLOAD);
        assert_eq!(f.stored("t"), None, "round {round}: the old incarnation's upload landed on the new one");
        f.apply_add("t");
        assert_eq!(f.checkpoint("t"), earlier, "round {round}: the new incarnation adopted an old checkpoint");
        f.advancer.on_tick();
        assert_eq!(f.stored("t").map(|v| keys::decode_u64(&v).unwrap()), Some(earlier), "round {round}");
        assert_eq!(f.safepoint(), Some(earlier - 1), "round {round}: the GC safepoint covers the new incarnation");
    }
    assert!(keys::decode_u64(&first).unwrap() > earlier);
}

#[test]
fn a_stored_checkpoint_of_an_earlier_incarnation_is_ignored_at_add() {
    let _scenario = fail::FailScenario::setup();
    let mut f = Fixture::new(Config::default());
    let earlier = ts_sub(f.sim.now_ts(), Duration::from_secs(600));
    // An orphan left by an older advancer: written before the task's info key was created.
    f.meta.etcd().put(keys::global_checkpoint_of("t"), keys::encode_u64(f.sim.now_ts()), 0).unwrap();
    Fixture::put_task(&f.meta, "t", earlier);
    f.apply_add("t");
    assert_eq!(f.checkpoint("t"), earlier);
    f.advancer.on_tick();
    assert_eq!(f.stored("t").map(|v| keys::decode_u64(&v).unwrap()), Some(earlier), "the orphan is overwritten");
    assert_eq!(f.safepoint(), Some(earlier - 1));
}

#[test]
fn a_task_deleted_before_its_lag_pause_is_written_leaves_no_pause_behind() {
    let _scenario = fail::FailScenario::setup();
    let mut f = Fixture::new(Config { lag_limit: Duration::from_secs(60), ..Config::default() });
    Fixture::put_task(&f.meta, "t", ts_sub(f.sim.now_ts(), Duration::from_secs(600)));
    f.apply_add("t");
    let meta = f.meta.clone();
    let paused_at = Arc::new(parking_lot::Mutex::new(0));
    let hits = paused_at.clone();
    fail::cfg_callback(PAUSE, move || {
        *hits.lock() += 1;
        meta.delete_task("t").unwrap();
    })
    .unwrap();
    f.advancer.on_tick();
    fail::remove(PAUSE);
    assert_eq!(*paused_at.lock(), 1, "the lag pause was decided");
    assert!(f.meta.etcd().get(keys::pause_of("t")).unwrap().is_none(), "an orphan pause/<task> was written");
}

/// A watcher through a proxy, its first listing's events drained.
fn relist_fixture(
    names: &[&str],
) -> (
    EtcdProcess,
    MetaDataClient,
    support::TcpProxy,
    streamhelper::meta::TaskWatcher,
    crossbeam_channel::Receiver<TaskEvent>,
) {
    let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
    let direct = MetaDataClient::new(EtcdClient::connect_plain([etcd.endpoint()]).unwrap());
    let proxy = support::TcpProxy::start(&etcd.endpoint());
    let proxied = MetaDataClient::new(EtcdClient::connect_plain([proxy.endpoint()]).unwrap());
    for name in names {
        Fixture::put_task(&direct, name, 1);
    }
    let (tx, events) = crossbeam_channel::bounded(64);
    let watcher = AdvancerExt::new(proxied).begin(tx, Duration::from_millis(100)).unwrap();
    for _ in names {
        assert!(matches!(events.recv_timeout(DEADLINE).unwrap(), TaskEvent::Add { .. }));
    }
    (etcd, direct, proxy, watcher, events)
}

/// Breaks the watch and compacts the history it would resume from, so that it re-lists.
fn force_relist(direct: &MetaDataClient, proxy: &support::TcpProxy) {
    proxy.cut();
    // Two revisions, so that the compaction passes the one the watch resumes from.
    direct.etcd().put("/unrelated", "x", 0).unwrap();
    let revision = direct.etcd().put("/unrelated", "y", 0).unwrap();
    direct.etcd().compact(revision).unwrap();
}

/// Events until `until` (the re-list finished) or the deadline, as strings.
fn events_until(events: &crossbeam_channel::Receiver<TaskEvent>, until: &str) -> Vec<String> {
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &String| e.starts_with(until)) {
        seen.push(events.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("no {until} after {seen:?}")).to_string());
    }
    seen
}

#[test]
fn a_transient_error_in_a_relist_is_retried_not_a_deletion() {
    let _scenario = fail::FailScenario::setup();
    let (_etcd, direct, proxy, _watcher, events) = relist_fixture(&["t1", "t2"]);
    force_relist(&direct, &proxy);
    // The next two task reads fail as a flaky etcd would.
    fail::cfg("read-task", "2*return").unwrap();
    Fixture::put_task(&direct, "marker", 1);
    proxy.heal();
    let seen = events_until(&events, "Add(marker");
    fail::remove("read-task");
    assert!(seen.iter().all(|e| !e.starts_with("Del(")), "a read error became a deletion: {seen:?}");
    assert!(seen.iter().all(|e| !e.starts_with("Add(t")), "unchanged tasks start over: {seen:?}");
}

#[test]
fn bad_metadata_of_one_task_in_a_relist_keeps_its_last_good_state() {
    let _scenario = fail::FailScenario::setup();
    let (_etcd, direct, proxy, _watcher, events) = relist_fixture(&["t1", "t2"]);
    force_relist(&direct, &proxy);
    // A range that ends before it starts: t1's metadata is bad, t1 is not gone.
    direct.etcd().put(format!("{}z", keys::ranges_of("t1")), "a".to_string(), 0).unwrap();
    direct.pause_task("t2", &streamhelper::meta::PauseV2::now(streamhelper::meta::Severity::Manual)).unwrap();
    proxy.heal();
    // The re-list reports its differences, then its errors.
    let seen = events_until(&events, "Err(t1");
    assert!(seen.iter().all(|e| !e.starts_with("Del(") && !e.starts_with("Add(")), "t1 was dropped: {seen:?}");
    assert!(seen.contains(&"Pause(t2)".to_string()), "the other task is unaffected: {seen:?}");
}

/// Two daemons over one flushing sim with task `t`: A owns, B stands by.
struct Pair {
    // Dropped last: the daemons go first.
    a: streamhelper::DaemonHandle,
    b: streamhelper::DaemonHandle,
    election: Election,
    meta: MetaDataClient,
    start: Ts,
    sim: SimCluster,
    etcd: EtcdProcess,
}

impl Pair {
    fn start() -> Pair {
        let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
        // Stores flush on their own, so whoever owns keeps uploading higher checkpoints.
        let flushing = SimConfig {
            stores: 1,
            regions: 4,
            seed: 7,
            flush_interval: Some(Duration::from_millis(100)),
            ..SimConfig::default()
        };
        let sim = SimCluster::start(flushing).unwrap();
        let meta = MetaDataClient::new(EtcdClient::connect_plain([etcd.endpoint()]).unwrap());
        let start = sim.now_ts();
        Fixture::put_task(&meta, "t", start);
        let config = DaemonConfig {
            etcd_endpoints: vec![etcd.endpoint()],
            advancer: support::fast_config(),
            ..DaemonConfig::new(vec![sim.pd_endpoint()])
        };
        let a = Daemon::start(config.clone()).unwrap();
        wait_until("A to own", || a.is_owner());
        let b = Daemon::start(config).unwrap();
        let election = Election::new(meta.etcd().clone(), keys::OWNER_PREFIX);
        wait_until("B to stand by", || election.candidates().unwrap().len() == 2);
        Pair { a, b, election, meta, start, sim, etcd }
    }
}

#[test]
fn a_standby_takes_over_while_the_old_owner_is_between_resign_and_revoke() {
    let _scenario = fail::FailScenario::setup();
    let Pair { sim: _sim, etcd: _etcd, meta, a, b, election, start } = Pair::start();
    let ext = AdvancerExt::new(meta.clone());
    let a_key = election.candidates().unwrap().remove(0);
    let a_term = Leadership { key: a_key.key.clone(), create_revision: a_key.create_revision, lease: a_key.lease };
    let stored = || ext.get_global_checkpoint("t").unwrap();
    wait_until("A to upload", || stored() > start);

    let (reached_tx, reached) = crossbeam_channel::bounded(1);
    let (release_tx, release) = crossbeam_channel::bounded::<()>(1);
    fail::cfg_callback(RESIGN, move || {
        let _ = reached_tx.try_send(());
        let _ = release.recv_timeout(DEADLINE);
    })
    .unwrap();
    assert!(a.resign_ownership());
    reached.recv_timeout(DEADLINE).expect("A resigns");
    // A is between the two: its key is gone while its lease is still renewed.
    assert!(meta.etcd().get(a_key.key.clone()).unwrap().is_none(), "the resignation deleted A's key");
    wait_until("A's ticker to give up ownership", || !a.is_owner());
    let left_by_a = stored();
    wait_until("B to own", || b.is_owner());
    wait_until("B to upload", || stored() > left_by_a);
    assert!(
        meta.etcd().lease_time_to_live(a_key.lease).unwrap().is_some(),
        "B took over while A's lease lived: the resignation let it in, not an expiry"
    );
    // Nothing of A's lands: its fence fails, and its ticker neither uploaded nor paused.
    let probe = Txn::new().when([a_term.fence()]).and_then([TxnOp::put("/probe", "a", 0)]);
    assert!(!meta.etcd().txn(probe).unwrap().succeeded, "A's writes are fenced off");
    assert!(
        !a.metrics().render().contains("tidb_log_backup_last_checkpoint{"),
        "A uploaded after it resigned: {}",
        a.metrics().render()
    );
    assert!(meta.etcd().get(keys::pause_of("t")).unwrap().is_none(), "nobody paused the task");

    fail::remove(RESIGN);
    release_tx.send(()).unwrap();
    wait_until("A to revoke its lease", || meta.etcd().lease_time_to_live(a_key.lease).unwrap().is_none());
    wait_until("A to campaign again behind B", || {
        let candidates = election.candidates().unwrap();
        candidates.len() == 2 && candidates[0].lease != a_key.lease && candidates[1].lease != a_key.lease
    });
    a.stop();
    assert!(b.is_owner(), "A's exit leaves B in charge");
    let after_a = stored();
    wait_until("B to keep uploading", || stored() > after_a);
    b.stop();
}

/// The key fences uploads and pauses, not PD calls: a resigning owner whose tick is still in
/// flight (about to set the GC safepoint) keeps its key until the tick is over, so no call of
/// its lands after a standby leads.
#[test]
fn a_resigning_owner_keeps_its_key_until_its_tick_in_flight_is_over() {
    let _scenario = fail::FailScenario::setup();
    let Pair { sim: _sim, etcd: _etcd, meta, a, b, election, .. } = Pair::start();
    let a_key = election.candidates().unwrap().remove(0).key;

    // Only the first tick to reach the GC call after this (A's: B does not own) is held.
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (reached_tx, reached) = crossbeam_channel::bounded(1);
    let (release_tx, release) = crossbeam_channel::bounded::<()>(1);
    let held = armed.clone();
    fail::cfg_callback(GC_CALL, move || {
        if held.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let _ = reached_tx.try_send(());
            let _ = release.recv_timeout(DEADLINE);
        }
    })
    .unwrap();
    reached.recv_timeout(DEADLINE).expect("A's tick reaches its GC call");
    assert!(a.resign_ownership());
    // Long enough for a resignation that does not wait to hand over (milliseconds).
    let until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < until {
        assert!(meta.etcd().get(a_key.clone()).unwrap().is_some(), "A resigned with its tick in flight");
        assert!(!b.is_owner(), "B leads while A's tick is in flight");
        std::thread::sleep(Duration::from_millis(50));
    }
    release_tx.send(()).unwrap();
    wait_until("A to resign once its tick is over", || meta.etcd().get(a_key.clone()).unwrap().is_none());
    wait_until("B to own", || b.is_owner());
    fail::remove(GC_CALL);
    a.stop();
    b.stop();
}

/// A panic inside a lock-resolution round (grpcio has unwraps of its own; one was seen in a
/// chaos run) fails that round only: the next round still resolves the locks.
#[test]
fn a_panicking_lock_round_fails_alone_and_the_next_one_resolves_the_locks() {
    let _scenario = fail::FailScenario::setup();
    let f = support::Fixture::new(3, 16);
    let start = f.add_task("t1", KeyRange::full());
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let panics = first.clone();
    fail::cfg_callback(LOCK_ROUND, move || {
        if panics.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("injected into a lock round");
        }
    })
    .unwrap();
    let _daemon = f.daemon();
    wait_until("a first upload", || {
        f.sim.flush_all();
        f.stored("t1") > start
    });
    let keys: Vec<Vec<u8>> = [5, 9].map(|i| [f.sim.regions()[i].range.start.as_slice(), b"_lock"].concat()).to_vec();
    let txn = f.sim.begin_txn(&TxnSpec { ttl: Duration::from_millis(100), ..TxnSpec::new(keys) }).unwrap();
    f.sim.crash_txn(txn);
    wait_until("the locks to be resolved despite the panic", || {
        f.sim.flush_all();
        f.sim.locks().is_empty()
    });
    assert!(!first.load(std::sync::atomic::Ordering::SeqCst), "a round panicked first");
    wait_until("the checkpoint to pass the rolled-back transaction", || {
        f.sim.flush_all();
        f.stored("t1") > txn
    });
    assert_eq!(f.sim.txn_outcome(txn), Some(Outcome::RolledBack));
    fail::remove(LOCK_ROUND);
}
