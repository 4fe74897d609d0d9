//! The chaos test: a seeded random schedule of faults against two daemons (an owner and a
//! standby) over a real etcd and the simulated cluster. Besides the cluster's faults (splits,
//! merges, scatter, leader moves, hung, slow and restarted stores, never-flushing regions,
//! subscriptions off, crashed transactions) it deletes and re-creates tasks under the same
//! name with an earlier or a later start ts, compacts and restarts etcd, black-holes PD and
//! kills the owner. After every step each task incarnation's stored checkpoint is checked
//! against that incarnation's truth, a deleted task must have no checkpoint or pause key, and
//! the GC safepoint must stay below every adopted incarnation's truth; once the faults stop,
//! every live task must pass the time they stopped within [`CATCH_UP`].
//!
//! `CHAOS_SEED=n` replays one schedule (decimal or `0x` hex), `CHAOS_SEEDS=n` runs n seeds in
//! a row from there (the long run), `CHAOS_STEPS=n` lengthens each schedule. A failure prints
//! its seed and the steps that led to it.

mod support;

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use streamhelper::meta::keys;
use streamhelper::sim::TxnSpec;
use streamhelper::testing::Rng;
use streamhelper::{Daemon, DaemonHandle, KeyRange, Ts};
use support::{Fixture, TcpProxy, DEADLINE};

const DEFAULT_SEED: u64 = 0x00c0_ffee;
const DEFAULT_STEPS: u64 = 40;
/// How long every live task may take to catch up once the faults stop, on a loaded 2-core
/// machine.
const CATCH_UP: Duration = Duration::from_secs(20);
/// The task that lives through the whole schedule; the others are deleted and re-created.
const STEADY: &str = "t1";
const CHURNED: [&str; 2] = ["t2", "t3"];
/// The service GC safepoint the advancer holds in PD.
const GC_SERVICE: &str = "log-backup-coordinator";

#[test]
fn random_faults_never_break_safety() {
    let first = env_number("CHAOS_SEED").unwrap_or(DEFAULT_SEED);
    let seeds = env_number("CHAOS_SEEDS").unwrap_or(1);
    let steps = env_number("CHAOS_STEPS").unwrap_or(DEFAULT_STEPS);
    let began = Instant::now();
    for seed in first..first + seeds {
        let mut log = Vec::new();
        let one = Instant::now();
        if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| run(seed, steps, &mut log))) {
            eprintln!(
                "chaos seed {seed} failed; replay with CHAOS_SEED={seed} CHAOS_STEPS={steps}. Steps:\n  {}",
                log.join("\n  ")
            );
            panic::resume_unwind(panic);
        }
        println!("chaos seed {seed}: {steps} steps passed in {:.1?}", one.elapsed());
    }
    println!("chaos: {seeds} seeds passed in {:.1?}", began.elapsed());
}

/// A number from the environment, decimal or `0x` hex; a malformed one fails the test naming it.
fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={text:?} is not a number (decimal or 0x hex): {e}")))
}

fn run(seed: u64, steps: u64, log: &mut Vec<String>) {
    let mut chaos = Chaos::start(seed);
    for step in 0..steps {
        let action = chaos.step(step);
        log.push(format!("step {step}: {action}"));
        chaos.f.sim.flush_all();
        std::thread::sleep(Duration::from_millis(50 + chaos.rng.below(250)));
        chaos.check(&format!("after step {step} ({action})"));
    }
    log.push("heal everything".into());
    chaos.heal();
    chaos.catch_up();
    assert_eq!(chaos.f.sim.txn_violations(), Vec::<String>::new());
}

/// One life of a task, from its creation to its deletion, and what may be claimed for it.
struct Incarnation {
    start: Ts,
    /// The create revision of its info key: every write for it comes later.
    created: i64,
    /// The highest checkpoint stored for this incarnation so far (0: none yet). Once there is
    /// one, the advancer has adopted the incarnation and the GC safepoint must cover it.
    last: Ts,
}

impl Incarnation {
    /// Writes the task as BR does and reads back where its life begins.
    fn put(f: &Fixture, name: &str, start: Ts, range: &KeyRange) -> Incarnation {
        support::put_task(&f.meta, name, start, range.clone(), "noop://");
        let info = retry("a read of the new task", || f.meta.etcd().get(keys::task_of(name)));
        let created = info.expect("the task just written").get_create_revision();
        Incarnation { start, created, last: 0 }
    }
}

struct Task {
    name: &'static str,
    range: KeyRange,
    /// `None` while deleted.
    life: Option<Incarnation>,
    /// Incarnations so far, for the messages.
    lives: u32,
    /// The last checkpoint of the previous incarnation: where an earlier start goes below.
    previous: Ts,
}

struct Chaos {
    /// The only way to PD. Dropped first, so that a failing run's daemons stop against a PD
    /// that refuses instead of one that hangs.
    pd_proxy: TcpProxy,
    pd_black_holed: bool,
    /// The owner and the standby (in no particular order).
    daemons: Vec<DaemonHandle>,
    tasks: Vec<Task>,
    rng: Rng,
    f: Fixture,
}

impl Chaos {
    fn start(seed: u64) -> Chaos {
        let f = Fixture::new(4, 24);
        let regions = f.sim.regions();
        let middle = regions[regions.len() / 2].range.start.clone();
        let ranges = [KeyRange::new(b"t".to_vec(), Vec::new()), KeyRange::full(), KeyRange::new(Vec::new(), middle)];
        let tasks = [STEADY, CHURNED[0], CHURNED[1]]
            .into_iter()
            .zip(ranges)
            .map(|(name, range)| {
                let life = Incarnation::put(&f, name, f.sim.now_ts(), &range);
                Task { name, range, life: Some(life), lives: 1, previous: 0 }
            })
            .collect();
        let pd_proxy = TcpProxy::start(&f.sim.pd_endpoint());
        f.sim.advertise_pd_at(&pd_proxy.endpoint());
        let daemons = vec![f.daemon(), Daemon::start(f.daemon_config()).unwrap()];
        let mut chaos = Chaos { pd_proxy, pd_black_holed: false, daemons, tasks, rng: Rng::new(seed), f };
        chaos.wait_for("every task's first checkpoint", DEADLINE, |chaos| {
            chaos.tasks.iter().all(|t| t.life.as_ref().is_some_and(|life| life.last > life.start))
        });
        chaos
    }

    /// Runs one random fault and says what it did.
    fn step(&mut self, step: u64) -> String {
        let f = &self.f;
        let regions = f.sim.regions();
        let region = &regions[self.rng.index(regions.len())];
        let stores = f.sim.store_ids();
        let store = stores[self.rng.index(stores.len())];
        match self.rng.below(17) {
            0 => {
                let key = [region.range.start.as_slice(), &[0x60, step as u8]].concat();
                format!("split: {:?}", f.sim.split(&key).map(drop))
            }
            1 if regions.len() > 2 => {
                let i = self.rng.index(regions.len() - 1);
                format!("merge: {:?}", f.sim.merge(regions[i].id, regions[i + 1].id).map(drop))
            }
            2 => {
                f.sim.scatter();
                "scatter".into()
            }
            3 => format!("transfer {} to {store}: {:?}", region.id, f.sim.transfer_leader(region.id, store)),
            4 => {
                f.sim.hang_store(store);
                format!("hang {store}")
            }
            5 => {
                f.sim.resume_store(store);
                format!("resume {store}")
            }
            6 => format!("restart {store}: {:?}", f.sim.restart_store(store).map(drop)),
            7 => {
                let never = self.rng.coin();
                f.sim.set_never_flush(region.id, never);
                format!("never-flush {} = {never}", region.id)
            }
            8 => {
                let supported = self.rng.coin();
                f.sim.set_subscription_supported(store, supported);
                format!("subscription {store} = {supported}")
            }
            9 => {
                let other = &regions[self.rng.index(regions.len())];
                let keys = [&region.range.start, &other.range.start]
                    .map(|start| [start.as_slice(), &[0x61, step as u8]].concat())
                    .to_vec();
                let txn = f.sim.begin_txn(&TxnSpec { ttl: Duration::from_millis(200), ..TxnSpec::new(keys) });
                if let Ok(txn) = txn {
                    f.sim.crash_txn(txn);
                }
                format!("crashed transaction: {txn:?}")
            }
            10 | 11 => self.delete_or_recreate(),
            12 => {
                let revision = retry("a put before the compaction", || f.meta.etcd().put("/chaos/compact", "", 0));
                retry("the compaction", || f.meta.etcd().compact(revision));
                format!("compact etcd at {revision}, then {}", self.restart_etcd())
            }
            13 => self.restart_etcd(),
            14 => self.toggle_pd_black_hole(),
            15 => self.kill_owner(),
            _ => {
                // Slow answers stretch ticks, so deletions and kills land inside them.
                let delay = Duration::from_millis([0, 50, 150, 300][self.rng.index(4)]);
                f.sim.set_store_delay(store, delay);
                format!("delay {store} by {delay:?}")
            }
        }
    }

    /// Deletes a live churned task the way `br log stop` does, or re-creates a deleted one
    /// with a start ts below its previous checkpoint or at the current time.
    fn delete_or_recreate(&mut self) -> String {
        let task = &mut self.tasks[1 + self.rng.index(CHURNED.len())];
        let f = &self.f;
        let name = task.name;
        match task.life.take() {
            Some(life) => {
                retry("the task deletion", || f.meta.delete_task(name));
                task.previous = life.last.max(life.start);
                format!("delete {name} (incarnation {}, checkpoint {})", task.lives, life.last)
            }
            None => {
                let (floor, previous) = (f.sim.start_ts(), task.previous);
                let (start, when) = if self.rng.coin() && previous > floor {
                    (floor + self.rng.below(previous - floor), "earlier")
                } else {
                    (f.sim.now_ts(), "later")
                };
                task.life = Some(Incarnation::put(f, name, start, &task.range));
                task.lives += 1;
                format!(
                    "re-create {name} (incarnation {}) at {start}, {when} than the checkpoint {previous}",
                    task.lives
                )
            }
        }
    }

    /// SIGKILL and start again on the same data: every watch and lease keep-alive breaks.
    fn restart_etcd(&mut self) -> String {
        self.f.etcd.kill();
        self.f.sim.flush_all();
        self.f.etcd.restart().expect("etcd restarts on its data");
        "restart etcd".into()
    }

    /// PD, reached only through its proxy, stops answering: new connections are accepted and
    /// never answered, and open ones either hang (a host that froze) or drop (one that
    /// restarted into the hang). The next toggle heals it.
    fn toggle_pd_black_hole(&mut self) -> String {
        self.pd_black_holed = !self.pd_black_holed;
        if !self.pd_black_holed {
            self.heal_pd();
            "PD answers again".into()
        } else if self.rng.coin() {
            self.pd_proxy.black_hole();
            "black-hole PD, open connections hang".into()
        } else {
            self.pd_proxy.stall();
            "black-hole PD, open connections dropped".into()
        }
    }

    /// The held connections are reset, as when the hung host comes back from a restart: the
    /// proxy dropped what they carried meanwhile, and TCP never resumes a stream with a gap.
    fn heal_pd(&mut self) {
        self.pd_proxy.cut();
        self.pd_proxy.heal();
    }

    /// Crashes the owner (no resignation, its lease left to expire) and starts a new standby
    /// in its place.
    fn kill_owner(&mut self) -> String {
        let Some(owner) = self.daemons.iter().position(DaemonHandle::is_owner) else {
            return "kill the owner: none owns right now".into();
        };
        self.daemons.swap_remove(owner).crash();
        self.daemons.push(Daemon::start(self.f.daemon_config()).expect("a new standby starts"));
        "kill the owner, start a new standby".into()
    }

    /// Safety of every incarnation, read stored value first and truth second (truth only
    /// grows, so a stored value above a later truth is a real over-claim):
    /// - a live incarnation's checkpoint was written in its own life (not left by an earlier
    ///   one), is at most its truth (the oracle's over its ranges, or its start ts: everything
    ///   below the start is the task's by definition) and never goes back;
    /// - a deleted task has neither a checkpoint nor a pause key;
    /// - the GC safepoint is below the truth of every incarnation the advancer adopted.
    fn check(&mut self, what: &str) {
        let f = &self.f;
        let safe_point =
            f.sim.gc_safe_points().into_iter().find_map(|(service, ts)| (service == GC_SERVICE).then_some(ts));
        for task in &mut self.tasks {
            let name = task.name;
            let Some(life) = &mut task.life else {
                for key in [keys::global_checkpoint_of(name), keys::pause_of(name)] {
                    let found = retry("a read of a deleted task's keys", || f.meta.etcd().get(key.clone()));
                    assert!(found.is_none(), "{what}: {key} written for the deleted task {name}");
                }
                continue;
            };
            let incarnation = format!("task {name} (incarnation {}, start {})", task.lives, life.start);
            let stored = match retry("the stored checkpoint", || f.meta.etcd().get(keys::global_checkpoint_of(name))) {
                Some(kv) => {
                    assert!(
                        kv.get_mod_revision() >= life.created,
                        "{what}: {incarnation}: its checkpoint was written at revision {}, before the task was created \
                         at {}: a write for an earlier incarnation outlived its deletion",
                        kv.get_mod_revision(),
                        life.created
                    );
                    keys::decode_u64(kv.get_value()).expect("a checkpoint is 8 bytes")
                }
                None => 0,
            };
            let truth = f.sim.true_checkpoint(&task.range).max(life.start);
            assert!(stored <= truth, "{what}: {incarnation}: uploaded {stored} is above its true checkpoint {truth}");
            assert!(stored >= life.last, "{what}: {incarnation}: checkpoint went back from {} to {stored}", life.last);
            life.last = stored;
            if let Some(safe_point) = safe_point.filter(|_| stored > 0) {
                assert!(
                    safe_point < truth,
                    "{what}: GC safepoint {safe_point} is not below {incarnation}'s truth {truth}"
                );
            }
        }
    }

    /// Flushes and checks until `done` holds, failing after `within`.
    fn wait_for(&mut self, what: &str, within: Duration, mut done: impl FnMut(&Chaos) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            self.f.sim.flush_all();
            self.check(what);
            if done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends every fault that outlives its step.
    fn heal(&mut self) {
        self.pd_black_holed = false;
        self.heal_pd();
        for store in self.f.sim.store_ids() {
            self.f.sim.resume_store(store);
            self.f.sim.set_store_delay(store, Duration::ZERO);
            self.f.sim.set_subscription_supported(store, true);
        }
        for region in self.f.sim.regions() {
            self.f.sim.set_never_flush(region.id, false);
        }
    }

    /// Liveness: every live task's checkpoint passes the time the faults stopped within
    /// [`CATCH_UP`], which takes every region flushing again and every crashed transaction's
    /// locks resolved.
    fn catch_up(&mut self) {
        let healed = self.f.sim.now_ts();
        let began = Instant::now();
        self.wait_for("every live task to pass the time the faults stopped", CATCH_UP, |chaos| {
            chaos.tasks.iter().filter_map(|task| task.life.as_ref()).all(|life| life.last > healed)
        });
        println!("caught up {:.1?} after healing", began.elapsed());
    }
}

/// Retries `call` until it succeeds: etcd may be restarting or PD's port changing hands.
fn retry<T, E: std::fmt::Display>(what: &str, mut call: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match call() {
            Ok(value) => return value,
            Err(e) if Instant::now() < deadline => {
                log::debug!("{what} failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{what} kept failing for {DEADLINE:?}: {e}"),
        }
    }
}
