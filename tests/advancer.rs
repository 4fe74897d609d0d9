//! The advancer end to end: a real etcd, the simulated cluster and the daemon. Every test
//! checks safety against the sim's oracle while it runs: the uploaded checkpoint never
//! exceeds the true checkpoint of the task's ranges and never goes down.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use streamhelper::etcd::EtcdProcess;
use streamhelper::meta::{keys, parse_storage_url, Fence, PauseState, Severity};
use streamhelper::sim::{Faults, Outcome, SimCluster, TxnSpec};
use streamhelper::storage::{self, read_global_checkpoint, GLOBAL_CHECKPOINT_FILE};
use streamhelper::testing::http_get;
use streamhelper::ts::{system_time_of, ts_add};
use streamhelper::Config;
use streamhelper::{Daemon, DaemonConfig, DaemonHandle};
use streamhelper::{KeyRange, Ts};
use support::s3::MotoServer;
use support::{fast_config, Fixture, TcpProxy, DEADLINE};

/// Watches one task's uploaded checkpoint against the truth.
struct Safety<'a> {
    fixture: &'a Fixture,
    task: &'a str,
    range: KeyRange,
    last: Ts,
}

impl<'a> Safety<'a> {
    fn new(fixture: &'a Fixture, task: &'a str, range: KeyRange) -> Self {
        Safety { fixture, task, range, last: 0 }
    }

    /// Reads the stored checkpoint first and the truth second: truth only grows, so a
    /// stored value above a later truth is a real over-claim.
    fn check(&mut self) -> Ts {
        let stored = self.fixture.stored(self.task);
        let truth = self.fixture.sim.true_checkpoint(&self.range);
        assert!(stored <= truth, "task {}: uploaded {stored} is above the true checkpoint {truth}", self.task);
        assert!(stored >= self.last, "task {}: checkpoint went back from {} to {stored}", self.task, self.last);
        self.last = stored;
        stored
    }

    /// Flushes and checks until the stored checkpoint passes `above`.
    fn advance_past(&mut self, above: Ts, what: &str) -> Ts {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.fixture.sim.flush_all();
            let stored = self.check();
            if stored > above {
                return stored;
            }
            assert!(Instant::now() < deadline, "{what}: checkpoint stuck at {stored}, wanted above {above}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Flushes and checks until `condition` holds.
    fn until(&mut self, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !condition() {
            self.fixture.sim.flush_all();
            self.check();
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Flushes until the storage copy passes `above`. The copy (read first) is never above
    /// what etcd holds (read second) and never goes back.
    fn copy_passes(&mut self, above: Ts, what: &str, copy: &StorageCopy) -> Ts {
        let mut seen = 0;
        let mut last = 0;
        self.until(what, || {
            seen = copy.read();
            let stored = self.fixture.stored(self.task);
            assert!(seen <= stored, "{what}: the storage copy {seen} is above etcd's {stored}");
            assert!(seen >= last, "{what}: the storage copy went back from {last} to {seen}");
            last = seen;
            seen > above
        });
        seen
    }

    /// Flushes and checks for a while, returning the highest checkpoint seen.
    fn hold_for(&mut self, d: Duration) -> Ts {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.fixture.sim.flush_all();
            self.check();
            std::thread::sleep(Duration::from_millis(100));
        }
        self.last
    }
}

#[test]
fn steady_state_advances_uploads_and_holds_gc() {
    let f = Fixture::new(3, 32);
    let start = f.add_task("t1", KeyRange::full());
    let daemon = f.daemon();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let first = safety.advance_past(start, "steady state");
    safety.advance_past(first, "steady state, again");

    support::wait_until("the GC safepoint to follow the checkpoint", || {
        let stored = f.stored("t1");
        f.sim
            .gc_safe_points()
            .iter()
            .any(|(service, sp)| service == "log-backup-coordinator" && *sp + 1 >= first && *sp < stored)
    });
    let addr = daemon.status_addr().unwrap();
    let (code, status) = http_get(addr, "/status").unwrap();
    assert_eq!(code, 200);
    assert!(status.contains("\"role\": \"owner\"") && status.contains("\"name\": \"t1\""), "{status}");
    let (_, metrics) = http_get(addr, "/metrics").unwrap();
    assert!(metrics.contains("tidb_log_backup_last_checkpoint{task=\"t1\"}"), "{metrics}");
    assert!(metrics.contains("tidb_log_backup_advancer_owner 1"), "{metrics}");
    daemon.stop();
    assert!(f.meta.etcd().scan_prefix(b"/tidb/br-stream/owner/", 10).unwrap().0.is_empty(), "stop resigns ownership");
}

#[test]
fn splits_merges_and_leader_moves_while_ticking() {
    let f = Fixture::new(4, 16);
    let range = KeyRange::new(b"t".to_vec(), b"u".to_vec());
    let start = f.add_task("t1", range.clone());
    let _daemon = f.daemon();
    let mut safety = Safety::new(&f, "t1", range);
    let mut last = safety.advance_past(start, "before churn");
    for round in 0..8u8 {
        let regions = f.sim.regions();
        let victim = &regions[usize::from(round) % regions.len()];
        let mut key = victim.range.start.clone();
        key.extend_from_slice(&[0x7f, round]);
        f.sim.split(&key).unwrap();
        f.sim.scatter();
        if round % 3 == 2 {
            let regions = f.sim.regions();
            f.sim.merge(regions[1].id, regions[2].id).unwrap();
        }
        last = safety.advance_past(last, &format!("churn round {round}"));
    }
}

/// Polling only, stores are lost and their leaders elected elsewhere while regions split and
/// merge: the collector looks refused regions up again within the same poll, and what the
/// second answers claim must be as safe as the first.
#[test]
fn leaders_failing_over_while_polling_only_never_break_safety() {
    let f = Fixture::new(4, 24);
    for store in f.sim.store_ids() {
        f.sim.set_subscription_supported(store, false);
    }
    let start = f.add_task("t1", KeyRange::full());
    let _daemon = f.daemon();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let mut last = safety.advance_past(start, "before the fail-overs");
    for round in 0..6 {
        let lost = f.sim.store_ids()[round % 4];
        f.sim.stop_store(lost);
        f.sim.fail_over(lost).unwrap();
        let regions = f.sim.regions();
        let mut key = regions[round].range.start.clone();
        key.extend_from_slice(&[0x7f, round as u8]);
        f.sim.split(&key).unwrap();
        if round % 2 == 1 {
            f.sim.merge(regions[round + 4].id, regions[round + 5].id).unwrap();
        }
        last = safety.advance_past(last, &format!("round {round}: store {lost} lost"));
        f.sim.restart_store(lost).unwrap();
    }
    safety.advance_past(last, "every store back");
}

#[test]
fn a_down_or_hung_store_delays_only_its_regions() {
    let f = Fixture::new(3, 24);
    let start = f.add_task("t1", KeyRange::full());
    let daemon = f.daemon();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let before = safety.advance_past(start, "before the faults");
    let hung = f.sim.store_ids()[0];
    f.sim.hang_store(hung);
    let ticks_before = daemon.metrics().render();
    safety.hold_for(Duration::from_secs(2));
    assert_ne!(daemon.metrics().render(), ticks_before, "ticks go on while a store hangs (tidb#39620)");
    f.sim.resume_store(hung);
    let after_hang = safety.advance_past(before, "after the store resumed");

    let down = f.sim.store_ids()[1];
    f.sim.stop_store(down);
    safety.hold_for(Duration::from_secs(1));
    f.sim.restart_store(down).unwrap();
    safety.advance_past(after_hang, "after the store came back on a new address");
}

#[test]
fn a_region_that_never_flushes_holds_the_checkpoint_back() {
    let f = Fixture::new(3, 12);
    let start = f.add_task("t1", KeyRange::full());
    let _daemon = f.daemon();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let before = safety.advance_past(start, "before");
    let stuck = f.sim.regions()[5].id;
    f.sim.set_never_flush(stuck, true);
    let held = safety.hold_for(Duration::from_secs(2));
    let stuck_truth = f.sim.true_checkpoint(&f.sim.region(stuck).unwrap().range);
    assert!(held <= stuck_truth, "the checkpoint passed a region that never flushed");
    f.sim.set_never_flush(stuck, false);
    safety.advance_past(held.max(before), "after the region flushes again");
}

#[test]
fn a_store_reporting_checkpoints_from_the_future_cannot_carry_the_checkpoint() {
    // One store answering u64::MAX once set the global checkpoint (and the GC safepoint) to
    // u64::MAX for good. Here the liar stops flushing while the others go on, so any trust
    // in its answers or its flush events would pass its true checkpoint.
    let f = Fixture::new(3, 12);
    let start = f.add_task("t1", KeyRange::full());
    let _daemon = f.daemon();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let before = safety.advance_past(start, "before the lie");
    let liar = f.sim.store_ids()[0];
    let honest: Vec<_> = f.sim.store_ids().into_iter().filter(|s| *s != liar).collect();
    let an_hour_ahead = ts_add(f.sim.now_ts(), Duration::from_secs(3600));
    for claimed in [u64::MAX, an_hour_ahead] {
        f.sim.set_claimed_ts(liar, Some(claimed));
        f.sim.flush_store(liar);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            honest.iter().for_each(|s| f.sim.flush_store(*s));
            safety.check();
            let safe_points = f.sim.gc_safe_points();
            let truth = f.sim.true_checkpoint(&KeyRange::full());
            for (service, safe_point) in safe_points {
                assert!(safe_point < truth, "GC safepoint of {service} at {safe_point}, above the truth {truth}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    f.sim.set_claimed_ts(liar, None);
    safety.advance_past(before.max(safety.last), "after the store tells the truth again");
}

#[test]
fn subscriptions_off_falls_back_to_polling() {
    let f = Fixture::new(3, 12);
    let start = f.add_task("t1", KeyRange::full());
    for store in f.sim.store_ids() {
        f.sim.set_subscription_supported(store, false);
    }
    let _daemon = f.daemon();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let first = safety.advance_past(start, "polling only");
    safety.advance_past(first, "polling only, again");
}

#[test]
fn the_advancer_survives_an_etcd_restart() {
    let mut f = Fixture::new(3, 12);
    let start = f.add_task("t1", KeyRange::full());
    let _daemon = Daemon::start(f.daemon_config()).unwrap();
    let first = {
        let mut safety = Safety::new(&f, "t1", KeyRange::full());
        safety.advance_past(start, "before the restart")
    };
    f.etcd.kill();
    f.sim.flush_all();
    f.etcd.restart().unwrap();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    safety.last = first;
    safety.advance_past(first, "after the etcd restart");
}

#[test]
fn tasks_can_be_added_paused_resumed_and_deleted_while_running() {
    let f = Fixture::new(3, 12);
    let start = f.add_task("t1", KeyRange::full());
    let _daemon = f.daemon();
    let mut t1 = Safety::new(&f, "t1", KeyRange::full());
    t1.advance_past(start, "t1");

    let range2 = KeyRange::new(b"t".to_vec(), b"u".to_vec());
    let start2 = f.add_task("t2", range2.clone());
    let mut t2 = Safety::new(&f, "t2", range2.clone());
    let running = t2.advance_past(start2, "t2 added while running");

    f.meta.pause_task("t2", &streamhelper::meta::PauseV2::now(Severity::Manual)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let paused_at = t2.check();
    t1.hold_for(Duration::from_secs(1));
    assert_eq!(t2.check(), paused_at, "a paused task is not uploaded");
    f.meta.resume_task("t2").unwrap();
    t2.advance_past(paused_at.max(running), "t2 resumed");

    // Garbage under another task's key touches nobody else.
    f.meta.etcd().put(keys::task_of("t3"), b"\x01garbage".to_vec(), 0).unwrap();
    let t1_now = t1.check();
    t1.advance_past(t1_now, "t1 next to a garbage task");

    f.meta.delete_task("t2").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(f.meta.etcd().get(keys::global_checkpoint_of("t2")).unwrap().is_none(), "a deleted task is not re-created");
}

#[test]
fn a_lagging_task_is_paused_and_runs_again_after_raising_the_limit() {
    let f = Fixture::new(3, 8);
    let start = f.add_task("t1", KeyRange::full());
    let daemon = f.daemon();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    safety.advance_past(start, "before the lag");
    f.sim.set_never_flush(f.sim.regions()[0].id, true);
    daemon.update_config(Config { lag_limit: Duration::from_secs(1), ..fast_config() }).unwrap();
    support::wait_until("the lagging task to be paused", || {
        f.sim.flush_all();
        safety.check();
        f.meta.get_task("t1").unwrap().is_paused().unwrap()
    });
    match f.meta.get_task("t1").unwrap().pause_state().unwrap() {
        Some(PauseState::V2(v2)) => assert_eq!(v2.severity, Severity::Error),
        other => panic!("expected a PauseV2 pause, got {other:?}"),
    }
    daemon.update_config(fast_config()).unwrap();
    f.sim.set_never_flush(f.sim.regions()[0].id, false);
    f.meta.resume_task("t1").unwrap();
    let stored = f.stored("t1");
    safety.advance_past(stored, "after resume with a higher limit");
    assert!(!f.meta.get_task("t1").unwrap().is_paused().unwrap());
}

#[test]
fn a_pd_clock_jumping_days_ahead_does_not_pause_a_healthy_task() {
    let f = Fixture::new(3, 8);
    let start = f.add_task("t1", KeyRange::full());
    let daemon = f.daemon();
    daemon.update_config(Config { lag_limit: Duration::from_secs(3), ..fast_config() }).unwrap();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let before = safety.advance_past(start, "before the jump");
    let jump = Duration::from_secs(3 * 24 * 3600);
    let jumped_from = f.sim.now_ts();
    f.sim.jump_clock(jump);
    // No flush for two upload heartbeats: the advancer sees the jumped time next to the
    // checkpoint from before the jump, as between two TiKV flushes.
    let quiet_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet_until {
        safety.check();
        assert!(!f.meta.get_task("t1").unwrap().is_paused().unwrap(), "a healthy task was paused by a clock jump");
        std::thread::sleep(Duration::from_millis(100));
    }
    safety.advance_past(ts_add(jumped_from, jump), "the checkpoint catches up with PD's new time");
    safety.hold_for(Duration::from_secs(4));
    assert!(!f.meta.get_task("t1").unwrap().is_paused().unwrap(), "a healthy task was paused after the jump");
    assert!(safety.last > before);
}

#[test]
fn a_crashed_owner_is_replaced_once_its_lease_expires() {
    let f = Fixture::new(3, 8);
    let start = f.add_task("t1", KeyRange::full());
    let owner = f.daemon();
    let standby = Daemon::start(f.daemon_config()).unwrap();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let before = safety.advance_past(start, "before the crash");
    let owner_keys = || f.meta.etcd().scan_prefix(b"/tidb/br-stream/owner/", 10).unwrap().0.len();
    assert_eq!(owner_keys(), 2);
    owner.crash();
    assert_eq!(owner_keys(), 2, "a crashed owner does not resign: its key stays until the lease expires");
    safety.until("the standby to take over", || standby.is_owner());
    assert_eq!(owner_keys(), 1, "the crashed owner's lease expired");
    safety.advance_past(before.max(safety.last), "after the takeover");
}

fn spawn_advancer(f: &Fixture, status_port: u16) -> Child {
    spawn_advancer_with(f, status_port, "500ms")
}

/// The binary, ticking fast, with each PD, TiKV and etcd call bounded by `rpc_timeout`.
fn spawn_advancer_with(f: &Fixture, status_port: u16, rpc_timeout: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_streamhelper"))
        .args(["advancer", "--pd", &f.sim.pd_endpoint(), "--etcd", &f.etcd.endpoint()])
        .args(["--tick-interval", "200ms", "--try-advance-threshold", "300ms", "--owner-ttl", "2s"])
        .args(["--backoff-time", "200ms", "--rpc-timeout", rpc_timeout, "--dial-timeout", "500ms"])
        .args(["--status-addr", &format!("127.0.0.1:{status_port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn role_of(port: u16) -> Option<String> {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_, body) = http_get(addr, "/status").ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    status["role"].as_str().map(String::from)
}

#[test]
fn a_standby_takes_over_when_the_owner_is_killed() {
    let f = Fixture::new(3, 12);
    let start = f.add_task("t1", KeyRange::full());
    let ports = [streamhelper::testing::free_port().unwrap(), streamhelper::testing::free_port().unwrap()];
    let mut a = spawn_advancer(&f, ports[0]);
    support::wait_until("advancer A to own", || role_of(ports[0]).as_deref() == Some("owner"));
    let mut b = spawn_advancer(&f, ports[1]);
    support::wait_until("advancer B to stand by", || role_of(ports[1]).as_deref() == Some("standby"));
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let before = safety.advance_past(start, "with A as owner");

    a.kill().unwrap(); // SIGKILL: no resignation, the lease must expire
    a.wait().unwrap();
    support::wait_until("advancer B to take over", || role_of(ports[1]).as_deref() == Some("owner"));
    safety.advance_past(before, "with B as owner");

    // A graceful stop resigns at once.
    sigterm(&b);
    let exited = Instant::now();
    support::wait_until("advancer B to exit", || b.try_wait().unwrap().is_some());
    assert!(exited.elapsed() < Duration::from_secs(10));
    assert!(b.wait().unwrap().success(), "SIGTERM exits 0");
    assert!(f.meta.etcd().scan_prefix(b"/tidb/br-stream/owner/", 10).unwrap().0.is_empty(), "B resigned");
}

/// Threads and resident memory (bytes) of process `pid`.
fn threads_and_rss(pid: u32) -> (usize, u64) {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
    (threads, kib.unwrap_or(0u64) * 1024)
}

/// The misbehaving peers of issue 17, one after the other against the running binary: no
/// panic, no checkpoint (or GC safepoint) above the truth, its threads and memory bounded,
/// the checkpoint moving on once PD and TiKV behave again, and a clean SIGTERM under every
/// fault at once.
#[test]
fn misbehaving_pd_and_tikv_never_break_safety_or_bounds() {
    let f = Fixture::new(3, 24);
    let start = f.add_task("t1", KeyRange::full());
    let port = streamhelper::testing::free_port().unwrap();
    let mut child = spawn_advancer(&f, port);
    support::wait_until("the binary to own", || role_of(port).as_deref() == Some("owner"));
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let mut last = safety.advance_past(start, "before any fault");
    let (threads, rss) = threads_and_rss(child.id());
    let store = f.sim.store_ids()[0];
    let nul = || Faults { store_addresses: [(store, "127.0.0.1:\0".into())].into(), ..Faults::default() };
    let faults = [
        ("answers for regions not asked about", Faults { unasked_answers: 48, ..Faults::default() }),
        ("a huge batch of bogus answers", Faults { unasked_answers: 20_000, ..Faults::default() }),
        ("duplicated regions from PD", Faults { duplicated_regions: true, ..Faults::default() }),
        ("inverted regions from PD", Faults { inverted_regions: true, ..Faults::default() }),
        ("a duplicate store id", Faults { duplicate_store: true, ..Faults::default() }),
        ("a NUL in a store address", nul()),
        (
            "a garbage store address",
            Faults { store_addresses: [(store, "\u{1b}[2J no:port".into())].into(), ..Faults::default() },
        ),
    ];
    for (what, fault) in faults {
        f.sim.set_faults(fault);
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            f.sim.flush_all();
            safety.check();
            let truth = f.sim.true_checkpoint(&KeyRange::full());
            for (service, safe_point) in f.sim.gc_safe_points() {
                assert!(
                    safe_point < truth,
                    "{what}: GC safepoint of {service} at {safe_point}, above the truth {truth}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(child.try_wait().unwrap().is_none(), "{what}: the advancer exited");
        assert_eq!(role_of(port).as_deref(), Some("owner"), "{what}: the advancer still owns");
        let (now_threads, now_rss) = threads_and_rss(child.id());
        // A margin for a reconnecting stream or two; never one thread per region or answer.
        assert!(now_threads <= threads + 8, "{what}: {now_threads} threads, {threads} before");
        let grown = now_rss.saturating_sub(rss);
        assert!(grown < 128 << 20, "{what}: the advancer grew by {grown} bytes");
        f.sim.set_faults(Faults::default());
        last = safety.advance_past(last, &format!("after {what}"));
    }

    f.sim.set_faults(Faults {
        unasked_answers: 20_000,
        duplicated_regions: true,
        inverted_regions: true,
        duplicate_store: true,
        ..nul()
    });
    safety.hold_for(Duration::from_secs(1));
    sigterm(&child);
    support::wait_until("the binary to exit", || child.try_wait().unwrap().is_some());
    assert!(child.wait().unwrap().success(), "SIGTERM exits 0 under every fault");
}

/// SIGTERM via the `kill` command (no libc in the dependency tree).
fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[test]
fn pd_down_at_start_or_while_running_only_delays_the_checkpoint() {
    let f = Fixture::new(3, 12);
    let start = f.add_task("t1", KeyRange::full());
    f.sim.stop_pd();
    let _daemon = Daemon::start(f.daemon_config()).expect("PD being away is no reason to exit");
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    safety.hold_for(Duration::from_millis(800));
    f.sim.start_pd().unwrap();
    let first = safety.advance_past(start, "after PD came up");
    f.sim.stop_pd();
    let held = safety.hold_for(Duration::from_secs(1));
    f.sim.start_pd().unwrap();
    safety.advance_past(held.max(first), "after PD came back");
}

/// A key inside the `i`-th region, past its start.
fn key_in(sim: &SimCluster, i: usize) -> Vec<u8> {
    [sim.regions()[i].range.start.as_slice(), b"_lock"].concat()
}

fn metric(daemon: &DaemonHandle, series: &str) -> u64 {
    let (_, body) = http_get(daemon.status_addr().unwrap(), "/metrics").unwrap();
    body.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn a_crashed_transaction_stalls_the_checkpoint_until_the_advancer_resolves_it() {
    let f = Fixture::new(3, 16);
    let start = f.add_task("t1", KeyRange::full());
    let daemon = f.daemon();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    safety.advance_past(start, "before the crash");
    let keys = vec![key_in(&f.sim, 5), key_in(&f.sim, 9)];
    let txn = f.sim.begin_txn(&TxnSpec { ttl: Duration::from_millis(100), ..TxnSpec::new(keys) }).unwrap();
    f.sim.crash_txn(txn);
    // Stalled: while the locks stay, nothing passes them.
    let stalled = Instant::now();
    while !f.sim.locks().is_empty() {
        f.sim.flush_all();
        assert!(safety.check() <= txn, "the checkpoint passed a lock that is still there");
        assert!(stalled.elapsed() < DEADLINE, "the locks were never resolved");
        std::thread::sleep(Duration::from_millis(50));
    }
    safety.advance_past(txn, "after the crashed transaction was rolled back");
    let interval = fast_config().resolve_lock_interval;
    let tick = fast_config().tick_interval;
    assert!(stalled.elapsed() < interval + tick * 10, "unstuck only after {:?}", stalled.elapsed());
    assert_eq!(f.sim.txn_outcome(txn), Some(Outcome::RolledBack));
    assert_eq!(f.sim.txn_violations(), Vec::<String>::new());
    assert_eq!(metric(&daemon, "streamhelper_resolve_lock_locks_total{outcome=\"rolled-back\"}"), 2);
}

#[test]
fn an_alive_transaction_is_never_resolved_and_holds_back_only_its_region() {
    let f = Fixture::new(3, 16);
    let locked = f.sim.regions()[5].range.clone();
    let elsewhere = KeyRange::new(f.sim.regions()[9].range.start.clone(), Vec::new());
    let start = f.add_task("t1", locked.clone());
    f.add_task("t2", elsewhere.clone());
    let daemon = f.daemon();
    let mut held = Safety::new(&f, "t1", locked);
    let mut free = Safety::new(&f, "t2", elsewhere);
    held.advance_past(start, "t1 before the transaction");
    let txn = f.sim.begin_txn(&TxnSpec::new(vec![key_in(&f.sim, 5)])).unwrap();
    let mut last = free.advance_past(txn, "t2 past the lock's ts");
    // Several resolve intervals: every round finds the transaction alive.
    support::wait_until("a resolve round to see the alive transaction", || {
        f.sim.flush_all();
        last = free.check();
        assert!(held.check() <= txn, "t1 passed an alive transaction's lock");
        metric(&daemon, "streamhelper_resolve_lock_locks_total{outcome=\"alive\"}") >= 2
    });
    free.advance_past(last, "t2 keeps advancing");
    assert_eq!(f.sim.txn_outcome(txn), Some(Outcome::Pending));
    let committed = f.sim.commit_txn(txn, false).unwrap();
    held.advance_past(committed, "t1 after the commit");
    assert_eq!(f.sim.txn_violations(), Vec::<String>::new());
}

#[test]
fn thresholds_follow_tikvs_flush_interval_unless_set_explicitly() {
    let f = Fixture::new(3, 4);
    for (store, ms) in [(1, 900), (2, 1200), (3, 1200)] {
        f.sim.set_store_flush_interval(store, Duration::from_millis(ms));
    }
    let mut config = f.daemon_config();
    config.advancer.explicit.remove("try-advance-threshold");
    config.advancer.explicit.remove("resolve-lock-interval");
    let daemon = Daemon::start(config).unwrap();
    support::wait_until("the TiKV flush interval to be applied", || {
        let config = daemon.config().unwrap();
        config.resolve_lock_interval == Duration::from_millis(1200)
            && config.try_advance_threshold == Duration::from_millis(1600)
    });
    assert_eq!(daemon.config().unwrap().degraded_threshold(), Duration::from_millis(720));
}

#[test]
fn a_hung_store_during_a_round_does_not_stall_ticks() {
    let f = Fixture::new(3, 16);
    let locked_region = f.sim.regions()[5].clone();
    let hung = locked_region.leader_store.unwrap();
    let healthy = f.sim.regions().into_iter().find(|r| r.leader_store != Some(hung)).unwrap();
    let start = f.add_task("t1", locked_region.range.clone());
    f.add_task("t2", healthy.range.clone());
    let _daemon = f.daemon();
    let mut held = Safety::new(&f, "t1", locked_region.range.clone());
    let mut free = Safety::new(&f, "t2", healthy.range.clone());
    held.advance_past(start, "t1 before the crash");
    let txn = f.sim.begin_txn(&TxnSpec { ttl: Duration::from_millis(100), ..TxnSpec::new(vec![key_in(&f.sim, 5)]) });
    let txn = txn.unwrap();
    f.sim.crash_txn(txn);
    f.sim.hang_store(hung);
    // Rounds wait on the hung store; ticks go on for the other task.
    let mut last = free.advance_past(txn, "t2 while a round waits on the hung store");
    for _ in 0..3 {
        last = free.advance_past(last, "t2 keeps advancing");
    }
    assert!(held.check() <= txn);
    f.sim.resume_store(hung);
    held.advance_past(txn, "t1 once the store answers again");
    assert_eq!(f.sim.txn_outcome(txn), Some(Outcome::RolledBack));
    assert_eq!(f.sim.txn_violations(), Vec::<String>::new());
}

/// Temporary directories and their `local://` URLs.
fn local_storages(n: usize) -> (Vec<tempfile::TempDir>, Vec<String>) {
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let urls = dirs.iter().map(|d| format!("local://{}", d.path().display())).collect();
    (dirs, urls)
}

/// Reads a task's checkpoint copy straight from its storage (0 while there is none).
struct StorageCopy(Box<dyn storage::ExternalStorage>);

impl StorageCopy {
    fn of(url: &str) -> StorageCopy {
        StorageCopy(storage::open(&parse_storage_url(url).unwrap()).unwrap())
    }

    fn read(&self) -> Ts {
        read_global_checkpoint(self.0.as_ref(), Duration::from_secs(5)).unwrap().unwrap_or(0)
    }
}

/// Issue 13: the checkpoint etcd holds is copied into each task's storage; a deleted task's
/// storage is not written again.
#[test]
fn the_checkpoint_is_copied_to_local_storage_until_the_task_is_deleted() {
    let f = Fixture::new(3, 16);
    let (dirs, urls) = local_storages(2);
    let start = f.add_task_stored_in("t1", KeyRange::full(), &urls[0]);
    f.add_task_stored_in("t2", KeyRange::full(), &urls[1]);
    let daemon = f.daemon();
    let (copy1, copy2) = (StorageCopy::of(&urls[0]), StorageCopy::of(&urls[1]));
    let mut t1 = Safety::new(&f, "t1", KeyRange::full());
    let first = t1.copy_passes(start, "t1's copy", &copy1);
    t1.copy_passes(first, "t1's copy, again", &copy1);
    let mut t2 = Safety::new(&f, "t2", KeyRange::full());
    let copied = t2.copy_passes(start, "t2's copy", &copy2);
    let metrics = daemon.metrics().render();
    assert!(metrics.contains("tidb_log_backup_external_storage_checkpoint{task=\"t1\"}"), "{metrics}");

    f.meta.delete_task("t1").unwrap();
    let t1_gauge = "tidb_log_backup_external_storage_checkpoint{task=\"t1\"}";
    t2.until("the deletion to reach the advancer", || !daemon.metrics().render().contains(t1_gauge));
    // The copier works one write at a time: once t2 is written again, no write for t1 is
    // in flight any more.
    let copied = t2.copy_passes(copied, "t2's copy after the deletion", &copy2);
    let file = dirs[0].path().join(GLOBAL_CHECKPOINT_FILE);
    std::fs::remove_file(&file).unwrap();
    let copied = t2.copy_passes(copied, "t2's copy, later", &copy2);
    t2.copy_passes(copied, "t2's copy, later again", &copy2);
    assert!(!file.exists(), "the deleted task's storage was written");
    assert_eq!(daemon.metrics().storage_write_failures.get(["t2"]), 0);
}

/// Issue 13: while the task's S3 is down, hung or refusing the credentials, etcd's
/// checkpoint keeps advancing and failures are counted; once it heals, the copy catches up.
#[test]
fn the_s3_copy_catches_up_after_the_storage_was_down_hung_or_refusing() {
    let f = Fixture::new(3, 16);
    let server = MotoServer::start();
    server.create_bucket("logs");
    let proxy = TcpProxy::start(&server.authority());
    let credentials = "access-key=AKIATASK&secret-access-key=task-secret";
    let via_proxy = format!("s3://logs/pitr?endpoint=http://{}&{credentials}", proxy.endpoint());
    let start = f.add_task_stored_in("t1", KeyRange::full(), &via_proxy);
    let daemon = f.daemon();
    let copy = StorageCopy::of(&format!("s3://logs/pitr?endpoint={}&{credentials}", server.endpoint()));
    let failures = || daemon.metrics().storage_write_failures.get(["t1"]);
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    let mut copied = safety.copy_passes(start, "the first copy", &copy);

    for fault in ["down", "hung", "refusing credentials"] {
        match fault {
            "down" => proxy.cut(),
            "hung" => proxy.stall(),
            _ => server.enforce_iam(true),
        }
        let before = failures();
        safety.until(&format!("failed writes while S3 is {fault}"), || failures() >= before + 2);
        let stored = safety.check();
        let advanced = safety.advance_past(stored, &format!("etcd's checkpoint while S3 is {fault}"));
        assert!(advanced > copied);
        proxy.heal();
        server.enforce_iam(false);
        copied = safety.copy_passes(advanced - 1, &format!("the copy after S3 was {fault}"), &copy);
    }
    // The gauge shows a written value: at least the copy read last, at most etcd's.
    let metrics = daemon.metrics().render();
    let gauge: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tidb_log_backup_external_storage_checkpoint{task=\"t1\"} "))
        .unwrap_or_else(|| panic!("no storage gauge: {metrics}"))
        .parse()
        .unwrap();
    assert!(copied as f64 <= gauge && gauge <= f.stored("t1") as f64, "{gauge} outside [{copied}, etcd]");
}

/// A checkpoint from the future that etcd holds (garbage, or written by a broken advancer)
/// is kept there but never copied into the storage, where restore would trust it.
#[test]
fn a_checkpoint_from_the_future_in_etcd_never_reaches_the_storage() {
    let f = Fixture::new(3, 12);
    let (_dirs, urls) = local_storages(2);
    f.add_task_stored_in("t1", KeyRange::full(), &urls[0]);
    let start = f.add_task_stored_in("t2", KeyRange::full(), &urls[1]);
    let an_hour_ahead = ts_add(f.sim.now_ts(), Duration::from_secs(3600));
    f.ext.upload_global_checkpoint("t1", an_hour_ahead, &Fence::default()).unwrap();
    let _daemon = f.daemon();
    let (copy1, copy2) = (StorageCopy::of(&urls[0]), StorageCopy::of(&urls[1]));
    let mut t2 = Safety::new(&f, "t2", KeyRange::full());
    let mut copied = start;
    for round in 0..3 {
        copied = t2.copy_passes(copied, &format!("t2's copy, round {round}"), &copy2);
        let truth = f.sim.true_checkpoint(&KeyRange::full());
        let t1_copy = copy1.read();
        assert!(t1_copy <= truth, "t1's storage holds {t1_copy}, above the true checkpoint {truth}");
    }
}

#[test]
fn a_safepoint_left_by_an_earlier_owner_is_removed_when_there_is_no_task() {
    use streamhelper::cluster::ClusterMeta;
    let f = Fixture::new(1, 4);
    // An earlier advancer blocked GC and went away (a restart, a failed removal).
    let (pd, _) = support::connect_clients(&f.sim);
    pd.block_gc_until(f.sim.now_ts()).unwrap();
    let ours = |f: &Fixture| f.sim.gc_safe_points().into_iter().any(|(id, _)| id == "log-backup-coordinator");
    assert!(ours(&f));
    let _daemon = f.daemon();
    support::wait_until("the leftover safepoint to be removed", || !ours(&f));
}

/// etcd's own count of started gRPC calls of `method` (its `/metrics`).
fn etcd_calls(etcd: &EtcdProcess, method: &str) -> u64 {
    let addr = etcd.endpoint().parse().unwrap();
    let (_, metrics) = http_get(addr, "/metrics").unwrap();
    let label = format!("grpc_method=\"{method}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("grpc_server_started_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn after_a_compaction_and_an_etcd_restart_nobody_spins_on_etcd() {
    let mut f = Fixture::new(1, 4);
    let start = f.add_task("t1", KeyRange::full());
    let _owner = f.daemon();
    let _standby = Daemon::start(f.daemon_config()).unwrap();
    let first = Safety::new(&f, "t1", KeyRange::full()).advance_past(start, "before the compaction");
    // History moves past every revision a watch started from, then is compacted away (PD
    // compacts hourly), and the restart breaks every stream.
    let mut revision = 0;
    for i in 0..20 {
        revision = f.meta.etcd().put("/unrelated", format!("{i}"), 0).unwrap();
    }
    f.meta.etcd().compact(revision).unwrap();
    f.etcd.kill();
    f.etcd.restart().unwrap();
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    safety.last = first;
    safety.advance_past(first, "after the etcd restart");
    let window = Duration::from_secs(3);
    let before = (etcd_calls(&f.etcd, "Range"), etcd_calls(&f.etcd, "Watch"));
    std::thread::sleep(window);
    let after = (etcd_calls(&f.etcd, "Range"), etcd_calls(&f.etcd, "Watch"));
    let per_second = |a: u64, b: u64| (b - a) as f64 / window.as_secs_f64();
    let (ranges, watches) = (per_second(before.0, after.0), per_second(before.1, after.1));
    println!("etcd calls per second after the restart: Range {ranges:.1}, Watch {watches:.1}");
    assert!(ranges < 50.0 && watches < 20.0, "spinning on etcd: {ranges:.1} Range/s, {watches:.1} Watch/s");
}

#[test]
fn tasks_deleted_while_slow_ticks_are_in_flight_leave_nothing_behind() {
    let f = Fixture::new(1, 4);
    let daemon = f.daemon();
    // No subscription, so every tick polls, and every poll waits on the store: deletions
    // keep landing inside a tick.
    let store = f.sim.store_ids()[0];
    f.sim.set_subscription_supported(store, false);
    f.sim.set_store_delay(store, Duration::from_millis(150));
    let tracked = |name: &str| daemon.status().tasks.iter().any(|t| t.name == name);
    for round in 0..8 {
        let start = f.add_task("t", KeyRange::full());
        support::wait_until("the task's first upload", || {
            f.sim.flush_all();
            f.stored("t") > start
        });
        // A flush the tick in flight polls: its checkpoint rises, so it means to upload.
        f.sim.flush_all();
        f.meta.delete_task("t").unwrap();
        support::wait_until("the advancer to drop the task", || !tracked("t"));
        // Two more ticks for any write decided before the deletion.
        std::thread::sleep(fast_config().tick_interval * 2);
        let orphan = f.meta.etcd().get(keys::global_checkpoint_of("t")).unwrap();
        assert!(orphan.is_none(), "round {round}: a deleted task's checkpoint was written again");
        assert!(f.meta.etcd().get(keys::pause_of("t")).unwrap().is_none(), "round {round}: an orphan pause");
    }
}

/// How long `condition` took to hold (it must within two minutes: the bound is asserted by
/// the caller, so that a failure says how long it took).
fn time_until(what: &str, mut condition: impl FnMut() -> bool) -> Duration {
    let began = Instant::now();
    while !condition() {
        assert!(began.elapsed() < Duration::from_secs(120), "{what}: not within two minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    began.elapsed()
}

/// PD black-holed (connections accepted, never answered, as behind a PD leader whose disk
/// hangs) with PD calls allowed their default 10 s: the tick's deadline, not the RPC's,
/// bounds how long a task deletion and a stop wait. In process and as the binary on SIGTERM,
/// the owner resigns on its way out.
#[test]
fn a_black_holed_pd_delays_neither_task_deletions_nor_stopping() {
    let f = Fixture::new(3, 8);
    let proxy = TcpProxy::start(&f.sim.pd_endpoint());
    f.sim.advertise_pd_at(&proxy.endpoint());
    let bound = Duration::from_secs(3);
    let owner_keys = || f.meta.etcd().scan_prefix(b"/tidb/br-stream/owner/", 10).unwrap().0.len();
    let black_hole = || {
        proxy.stall();
        // Ticks in flight now wait on PD.
        std::thread::sleep(Duration::from_secs(1));
    };

    let start = f.add_task("t1", KeyRange::full());
    f.add_task("t2", KeyRange::full());
    let config = DaemonConfig {
        advancer: Config { rpc_timeout: Duration::from_secs(10), ..fast_config() },
        ..f.daemon_config()
    };
    let daemon = Daemon::start(config).unwrap();
    support::wait_until("the daemon to become owner", || daemon.is_owner());
    let mut safety = Safety::new(&f, "t2", KeyRange::full());
    safety.advance_past(start, "before the black hole");
    black_hole();
    f.meta.delete_task("t2").unwrap();
    // The gauge goes with the task's state (a status read may spend a second on PD).
    let deletion = time_until("the deletion to be applied", || daemon.metrics().last_checkpoint.get(["t2"]).is_none());
    assert!(daemon.status().tasks.iter().all(|t| t.name != "t2"), "t2 is gone from the status");
    let stopping = Instant::now();
    daemon.stop();
    let stop = stopping.elapsed();
    println!("PD black-holed: deletion applied after {deletion:?}, stopped in {stop:?}");
    assert_eq!(owner_keys(), 0, "the daemon resigned on its way out");
    assert!(f.meta.etcd().get(keys::global_checkpoint_of("t2")).unwrap().is_none(), "t2 was written again");

    proxy.heal();
    let port = streamhelper::testing::free_port().unwrap();
    let mut child = spawn_advancer_with(&f, port, "10s");
    support::wait_until("the binary to own", || role_of(port).as_deref() == Some("owner"));
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    safety.advance_past(start, "with the binary as owner");
    black_hole();
    sigterm(&child);
    let exit = time_until("the binary to exit", || child.try_wait().unwrap().is_some());
    println!("PD black-holed: the binary exited {exit:?} after SIGTERM");
    assert!(deletion < bound, "the deletion waited {deletion:?} for a tick stuck on PD");
    assert!(stop < bound, "stopping took {stop:?}");
    assert!(exit < bound, "the binary took {exit:?} to exit on SIGTERM");
    assert!(child.wait().unwrap().success(), "SIGTERM exits 0");
    assert_eq!(owner_keys(), 0, "the binary resigned on its way out");
}

/// A 3 s lag limit and one region that stops flushing: the task is paused (its `pause/` key
/// written, and `task status` says so) within 8 s of its true lag crossing the limit, not at
/// the next upload heartbeat.
#[test]
fn a_task_past_a_3s_lag_limit_is_paused_within_8s() {
    let f = Fixture::new(3, 8);
    let start = f.add_task("t1", KeyRange::full());
    let limit = Duration::from_secs(3);
    let config = DaemonConfig { advancer: Config { lag_limit: limit, ..fast_config() }, ..f.daemon_config() };
    let daemon = Daemon::start(config).unwrap();
    support::wait_until("the daemon to become owner", || daemon.is_owner());
    let mut safety = Safety::new(&f, "t1", KeyRange::full());
    safety.advance_past(start, "before a region gets stuck");
    f.sim.set_never_flush(f.sim.regions()[0].id, true);
    let frozen = f.sim.true_checkpoint(&KeyRange::full());
    let crossed = system_time_of(frozen) + limit;
    support::wait_until("the lagging task to be paused", || {
        f.sim.flush_all();
        safety.check();
        f.meta.get_task("t1").unwrap().is_paused().unwrap()
    });
    let late = SystemTime::now().duration_since(crossed).unwrap_or_default();
    println!("paused {late:?} after the lag crossed its {limit:?} limit");
    assert!(late < Duration::from_secs(8), "paused only {late:?} after the lag crossed the limit");
    let status = Command::new(env!("CARGO_BIN_EXE_streamhelper"))
        .args(["task", "status", "t1", "--json", "-u", &f.etcd.endpoint()])
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(shown[0]["paused"], true, "task status: {shown}");
}

/// Task `t1` over every key, and a new owner whose stores have all flushed since every
/// piece lagged past the poll threshold: it subscribes, waits (boundedly) for their
/// snapshots, ticks, and has uploaded a checkpoint covering every region when this returns.
fn first_upload_after_a_flush(f: &Fixture) -> (DaemonHandle, Safety<'_>, Duration) {
    let start = f.add_task("t1", KeyRange::full());
    let threshold = Duration::from_secs(2);
    // Every piece lags past the threshold by the time the daemon starts; the flush does not.
    while f.sim.now_ts() <= ts_add(start, threshold + Duration::from_millis(100)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    f.sim.flush_all();
    let mut config = f.daemon_config();
    config.advancer.try_advance_threshold = threshold;
    // The snapshot wait's bound: one tick, on a loaded machine.
    config.advancer.tick_interval = Duration::from_secs(1);
    // No lock round: their PD calls are not what these tests count.
    config.advancer.resolve_lock_interval = Duration::from_secs(600);
    let daemon = Daemon::start(config).unwrap();
    let mut safety = Safety::new(f, "t1", KeyRange::full());
    support::wait_until("the first upload covering every region", || safety.check() > start);
    (daemon, safety, threshold)
}

/// A new owner takes in the checkpoints its stores send right after it subscribes (their
/// last flush) before its first tick, which then has nothing to poll: polling every region
/// first made a cold start at 10^6 regions wait a tick for those checkpoints (scale bench).
/// Leaders moved and regions split after that flush: the old leaders' snapshots name
/// regions they no longer lead (or that are no longer whole), and still never raise a
/// range above what is flushed there.
#[test]
fn a_new_owner_covers_every_region_from_the_subscription_snapshots_without_polling() {
    let f = Fixture::new(3, 64);
    let (daemon, mut safety, _) = first_upload_after_a_flush(&f);
    assert_eq!(daemon.metrics().regions_polled.get([]), 0, "the first tick polled regions the snapshots covered");
    daemon.stop();

    f.sim.flush_all();
    let regions = f.sim.regions();
    let stores = f.sim.store_ids();
    for region in regions.iter().step_by(3) {
        let leader = region.leader_store.unwrap();
        let other = *stores.iter().find(|&&s| s != leader).unwrap();
        f.sim.transfer_leader(region.id, other).unwrap();
    }
    for region in regions.iter().skip(1).step_by(5) {
        let mut inside = region.range.start.clone();
        inside.push(7);
        f.sim.split(&inside).unwrap();
    }
    let daemon = f.daemon();
    let moved_at = safety.check();
    safety.advance_past(moved_at, "after the leaders moved");
    daemon.stop();
}

/// A store whose subscription never sends a snapshot (here it has none) delays the first
/// tick by the snapshot wait's bound at most, and that tick polls its regions.
#[test]
fn a_store_that_sends_no_snapshot_is_polled_at_the_first_tick() {
    let f = Fixture::new(3, 48);
    let silent = f.sim.store_ids()[2];
    f.sim.set_subscription_supported(silent, false);
    let (daemon, _, _) = first_upload_after_a_flush(&f);
    let polled = daemon.metrics().regions_polled.get([]);
    let theirs = f.sim.regions().iter().filter(|r| r.leader_store == Some(silent)).count() as u64;
    assert!(polled >= theirs, "{polled} regions polled, the silent store leads {theirs}");
    daemon.stop();
}

/// After a new owner's first tick (nothing to poll: the snapshots covered everything) the
/// region cache is warmed up in the background, so that the scattered regions that lag
/// later are asked about without looking each up in PD (before, one PD call per region).
#[test]
fn after_the_warm_up_scattered_lagging_regions_are_polled_without_pd_calls() {
    let f = Fixture::new(3, 400);
    let (daemon, mut safety, threshold) = first_upload_after_a_flush(&f);
    assert_eq!(daemon.metrics().regions_polled.get([]), 0, "the first tick polled nothing");
    safety.until("the warm-up to list every region", || f.sim.pd_scans().1 >= 400);
    assert_eq!(daemon.metrics().regions_polled.get([]), 0, "the regions were listed by the warm-up, not by polls");

    // A transaction holds back 20 scattered regions: their polls answer, at its start ts.
    let lagging: Vec<_> = f.sim.regions().into_iter().step_by(20).collect();
    assert!(lagging.len() < 32, "fewer than the collector pages across");
    let keys = lagging.iter().map(|r| r.range.start.iter().copied().chain([1]).collect()).collect();
    let txn = f.sim.begin_txn(&TxnSpec { ttl: Duration::from_secs(60), ..TxnSpec::new(keys) }).unwrap();
    let scans_before = f.sim.pd_scans().0;
    let polled_before = daemon.metrics().regions_polled.get([]);
    // Past the threshold, every tick polls the lagging regions.
    let polling_from = Instant::now() + threshold;
    safety.until("five ticks polling the lagging regions", || {
        Instant::now() > polling_from + Duration::from_millis(2500)
    });
    let polled = daemon.metrics().regions_polled.get([]) - polled_before;
    assert!(polled >= lagging.len() as u64, "{polled} regions polled");
    let scans = f.sim.pd_scans().0 - scans_before;
    assert!(scans <= 2, "{scans} PD scans to poll {} scattered lagging regions known to the cache", lagging.len());
    f.sim.rollback_txn(txn);

    // The task goes: nothing is written for it again, warm cache or not.
    f.meta.delete_task("t1").unwrap();
    support::wait_until("the advancer to drop the task", || daemon.status().tasks.is_empty());
    std::thread::sleep(Duration::from_millis(1000));
    assert!(f.meta.etcd().get(keys::global_checkpoint_of("t1")).unwrap().is_none(), "a deleted task's checkpoint");
    daemon.stop();
}
