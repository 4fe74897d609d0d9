//! `streamhelper demo`: a private etcd, a simulated cluster of about 10 000 regions and two
//! advancers (an owner and a standby), with faults injected on a schedule while the uploaded
//! checkpoint is checked against the sim's ground truth every second. A full-screen view
//! (or, with `--plain` or when stdout is not a terminal, one line per second), then a
//! summary. Exits non-zero if the checkpoint ever over-claims or regresses.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;

use super::advancer::termination_flag;
use streamhelper::etcd::{EtcdClient, EtcdProcess};
use streamhelper::format::{format_rfc3339, parse_duration};
use streamhelper::meta::{parse_storage_url, AdvancerExt, MetaDataClient, TaskInfo};
use streamhelper::sim::{SimCluster, SimConfig, TaskState, TxnSpec};
use streamhelper::ts::{system_time_of, ts_distance};
use streamhelper::Config;
use streamhelper::{Daemon, DaemonConfig, DaemonHandle};
use streamhelper::{Error, Result};
use streamhelper::{KeyRange, StoreId, Ts};

const TASK: &str = "demo";
/// Lag samples shown in the sparkline.
const SPARK_WIDTH: usize = 48;
/// Events kept on screen.
const EVENTS_SHOWN: usize = 8;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// TiKV stores in the simulated cluster.
    #[arg(long, default_value_t = 3)]
    stores: usize,
    /// Regions in the simulated cluster.
    #[arg(long, default_value_t = 10_000)]
    regions: usize,
    /// How long to run.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the simulated cluster's randomness.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run without the fault script.
    #[arg(long)]
    no_faults: bool,
    /// One line per second instead of the full-screen view (chosen when stdout is not a
    /// terminal).
    #[arg(long)]
    plain: bool,
    /// Where the logs go (default: a new file in the temp directory, named at the start).
    #[arg(long)]
    log_file: Option<PathBuf>,
}

impl DemoArgs {
    /// The demo's log file: logs never go over the view.
    pub fn log_file(&self) -> PathBuf {
        self.log_file
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("streamhelper-demo-{}.log", std::process::id())))
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Split,
    Scatter,
    HangStore,
    ResumeStore,
    KillOwner,
    RestartAdvancer,
    StuckTransaction,
    RestartStore,
    SubscriptionsOff,
    Merge,
}

/// When each fault strikes, counted from the start.
const SCRIPT: &[(u64, Fault)] = &[
    (5, Fault::Split),
    (8, Fault::Scatter),
    (11, Fault::HangStore),
    (16, Fault::ResumeStore),
    (20, Fault::KillOwner),
    (26, Fault::RestartAdvancer),
    (30, Fault::StuckTransaction),
    (38, Fault::RestartStore),
    (42, Fault::SubscriptionsOff),
    (46, Fault::Merge),
];

#[derive(Clone, Copy, PartialEq)]
enum StoreShown {
    Up,
    Hung,
    Restarted,
    NoSubscription,
}

impl StoreShown {
    fn label(self) -> &'static str {
        match self {
            StoreShown::Up => "up",
            StoreShown::Hung => "hung",
            StoreShown::Restarted => "restarted",
            StoreShown::NoSubscription => "up, no subscription",
        }
    }
}

/// Counters summed over the advancers, to show what changed since the last second.
#[derive(Default, Clone, Copy)]
struct Activity {
    rpcs: u64,
    regions_asked: u64,
    flush_events: f64,
}

impl Activity {
    fn of(daemon: &DaemonHandle) -> Activity {
        let m = daemon.metrics();
        Activity {
            rpcs: m.batch_size.count(["checkpoint"]),
            regions_asked: m.region_request.get(["success"]) + m.region_request.get(["fail"]),
            flush_events: m.region_checkpoint_event.total(),
        }
    }
}

struct Demo {
    args: DemoArgs,
    etcd: EtcdProcess,
    sim: SimCluster,
    ext: AdvancerExt,
    /// The two advancers, "A" and "B"; `None` while one is down.
    advancers: [Option<DaemonHandle>; 2],
    /// Each advancer's counters at the last sample.
    activity: [Activity; 2],
    stores: Vec<(StoreId, StoreShown)>,
    started: Instant,
    events: VecDeque<String>,
    /// Events ever logged, for the plain output to print each once.
    events_total: usize,
    lags: Vec<f64>,
    last_checkpoint: Ts,
    owner: Option<usize>,
    owner_changes: u32,
    faults_survived: u32,
    violations: Vec<String>,
    /// The task's start ts: a checkpoint at or below it claims nothing (the sim's truth,
    /// what the stores flushed so far, trails the start by up to a flush interval).
    start_ts: Ts,
    /// The crashed transaction's start ts, until its locks are gone.
    stuck_txn: Option<Ts>,
}

fn advancer_config() -> Config {
    Config {
        tick_interval: Duration::from_secs(1),
        try_advance_threshold: Duration::from_secs(3),
        owner_ttl: Duration::from_secs(5),
        backoff: Duration::from_secs(1),
        rpc_timeout: Duration::from_millis(800),
        dial_timeout: Duration::from_millis(800),
        resolve_lock_interval: Duration::from_secs(3),
        explicit: ["try-advance-threshold", "resolve-lock-interval"].map(String::from).into(),
        ..Config::default()
    }
}

fn start_advancer(etcd: &EtcdProcess, sim: &SimCluster) -> Result<DaemonHandle> {
    Daemon::start(DaemonConfig {
        etcd_endpoints: vec![etcd.endpoint()],
        advancer: advancer_config(),
        status_addr: Some("127.0.0.1:0".into()),
        ..DaemonConfig::new(vec![sim.pd_endpoint()])
    })
}

const NAMES: [&str; 2] = ["A", "B"];

impl Demo {
    fn start(args: DemoArgs) -> Result<Demo> {
        let etcd = EtcdProcess::start()?;
        let sim = SimCluster::start(SimConfig {
            stores: args.stores,
            regions: args.regions,
            seed: args.seed,
            flush_interval: Some(Duration::from_secs(1)),
            ..SimConfig::default()
        })?;
        let meta = MetaDataClient::new(EtcdClient::connect_plain([etcd.endpoint()])?);
        let start_ts = sim.now_ts();
        let task = TaskInfo::new(TASK)
            .from_ts(start_ts)
            .to_storage(parse_storage_url("noop://")?)
            .with_table_filter(["*.*"])
            .with_range(KeyRange::full().start, KeyRange::full().end)
            .check()?;
        meta.put_task(&task)?;
        sim.set_task_state(TASK, Some(TaskState::Running));
        // A first, so that it campaigns first and owns; B stands by.
        let a = start_advancer(&etcd, &sim)?;
        let b = start_advancer(&etcd, &sim)?;
        let stores = sim.store_ids().into_iter().map(|id| (id, StoreShown::Up)).collect();
        let mut demo = Demo {
            args,
            etcd,
            sim,
            ext: AdvancerExt::new(meta),
            advancers: [Some(a), Some(b)],
            activity: [Activity::default(); 2],
            stores,
            started: Instant::now(),
            events: VecDeque::new(),
            events_total: 0,
            lags: Vec::new(),
            last_checkpoint: 0,
            owner: None,
            owner_changes: 0,
            faults_survived: 0,
            violations: Vec::new(),
            start_ts,
            stuck_txn: None,
        };
        demo.event(format!("task {TASK} added at ts {start_ts}; advancers A and B started"));
        Ok(demo)
    }

    fn event(&mut self, text: String) {
        log::info!("demo: {text}");
        let line = format!("t={:>3}s  {text}", self.started.elapsed().as_secs());
        if self.events.len() == EVENTS_SHOWN {
            self.events.pop_front();
        }
        self.events.push_back(line);
        self.events_total += 1;
    }

    fn set_store(&mut self, store: StoreId, shown: StoreShown) {
        if let Some(entry) = self.stores.iter_mut().find(|(id, _)| *id == store) {
            entry.1 = shown;
        }
    }

    fn inject(&mut self, fault: Fault) -> Result<String> {
        let first = self.stores[0].0;
        let last = self.stores[self.stores.len() - 1].0;
        Ok(match fault {
            Fault::Split => {
                for region in self.sim.regions().iter().take(3) {
                    let mut key = region.range.start.clone();
                    key.extend_from_slice(b"\x80split");
                    self.sim.split(&key)?;
                }
                "split three regions".into()
            }
            Fault::Scatter => {
                self.sim.scatter();
                "scattered every leader".into()
            }
            Fault::HangStore => {
                self.sim.hang_store(first);
                self.set_store(first, StoreShown::Hung);
                format!("store {first} hangs (answers nothing)")
            }
            Fault::ResumeStore => {
                self.sim.resume_store(first);
                self.set_store(first, StoreShown::Up);
                format!("store {first} answers again")
            }
            Fault::KillOwner => {
                let owner = self.owner.ok_or_else(|| Error::Stopped("no owner to kill".into()))?;
                if let Some(daemon) = self.advancers[owner].take() {
                    self.activity[owner] = Activity::default();
                    daemon.crash();
                }
                format!("owner {} killed (no resignation); the standby takes over when its lease expires", NAMES[owner])
            }
            Fault::RestartAdvancer => {
                let down = self.advancers.iter().position(Option::is_none).unwrap_or(0);
                if self.advancers[down].is_none() {
                    self.advancers[down] = Some(start_advancer(&self.etcd, &self.sim)?);
                }
                format!("advancer {} restarted as standby", NAMES[down])
            }
            Fault::StuckTransaction => {
                let regions = self.sim.regions();
                let keys = [regions.len() / 3, regions.len() * 2 / 3]
                    .map(|i| [regions[i].range.start.as_slice(), b"_demo"].concat())
                    .to_vec();
                let txn = self.sim.begin_txn(&TxnSpec { ttl: Duration::from_secs(1), ..TxnSpec::new(keys) })?;
                self.sim.crash_txn(txn);
                self.stuck_txn = Some(txn);
                format!("transaction {txn} crashed holding 2 locks: the checkpoint stalls until they are resolved")
            }
            Fault::RestartStore => {
                let address = self.sim.restart_store(last)?;
                self.set_store(last, StoreShown::Restarted);
                format!("store {last} restarted on {address}")
            }
            Fault::SubscriptionsOff => {
                self.sim.set_subscription_supported(first, false);
                self.set_store(first, StoreShown::NoSubscription);
                format!("store {first} drops flush subscriptions; its regions are polled")
            }
            Fault::Merge => {
                let regions = self.sim.regions();
                let merged = self.sim.merge(regions[4].id, regions[5].id)?;
                format!("merged regions {} and {} into {merged}", regions[4].id, regions[5].id)
            }
        })
    }

    /// One second's look: ownership, the checkpoint against the truth, and the faults due.
    fn sample(&mut self, script: &mut std::iter::Peekable<std::slice::Iter<'_, (u64, Fault)>>) -> Result<Sample> {
        while let Some((_, fault)) = script.next_if(|(at, _)| Duration::from_secs(*at) <= self.started.elapsed()) {
            match self.inject(*fault) {
                Ok(what) => {
                    self.faults_survived += 1;
                    self.event(what);
                }
                Err(e) => self.event(format!("{fault:?} failed: {e}")),
            }
        }
        if let Some(txn) = self.stuck_txn {
            if self.sim.locks().iter().all(|(_, start)| *start != txn) {
                self.stuck_txn = None;
                self.event(format!("the locks of transaction {txn} were resolved; the checkpoint moves on"));
            }
        }
        let owner = self.advancers.iter().position(|a| a.as_ref().is_some_and(DaemonHandle::is_owner));
        if owner.is_some() && owner != self.owner {
            if self.owner.is_some() {
                self.owner_changes += 1;
            }
            self.event(format!("advancer {} is the owner", NAMES[owner.unwrap_or(0)]));
            self.owner = owner;
        }
        // Stored first, truth second: truth only grows, so stored > truth is a real over-claim.
        let stored = self.ext.get_global_checkpoint(TASK)?;
        let truth = self.sim.true_checkpoint(&KeyRange::full());
        if stored > truth.max(self.start_ts) {
            self.violation(format!("uploaded checkpoint {stored} is above the true checkpoint {truth}"));
        } else if stored < self.last_checkpoint {
            self.violation(format!("uploaded checkpoint went back from {} to {stored}", self.last_checkpoint));
        }
        self.last_checkpoint = self.last_checkpoint.max(stored);
        let now = self.sim.now_ts();
        let lag = (stored > 0).then(|| ts_distance(now, stored).as_secs_f64());
        self.lags.extend(lag);
        let mut activity = Activity::default();
        for (slot, daemon) in self.advancers.iter().enumerate() {
            let Some(daemon) = daemon else { continue };
            let current = Activity::of(daemon);
            let before = self.activity[slot];
            activity.rpcs += current.rpcs.saturating_sub(before.rpcs);
            activity.regions_asked += current.regions_asked.saturating_sub(before.regions_asked);
            activity.flush_events += (current.flush_events - before.flush_events).max(0.0);
            self.activity[slot] = current;
        }
        let slowest = owner.and_then(|o| self.advancers[o].as_ref()).and_then(|daemon| {
            let series = daemon.metrics().task_blocker.series();
            let ([_, region, store, reason], lag) = series.into_iter().find(|(labels, _)| labels[0] == TASK)?;
            Some(format!("region {region} on store {store} ({reason}), {lag:.0}s behind"))
        });
        Ok(Sample { stored, truth, lag, activity, slowest })
    }

    fn violation(&mut self, text: String) {
        self.event(format!("SAFETY VIOLATION: {text}"));
        self.violations.push(text);
    }

    fn advancers_line(&self) -> String {
        let role = |slot: usize| match &self.advancers[slot] {
            None => "down".to_string(),
            Some(d) if d.is_owner() => "OWNER".to_string(),
            Some(_) => "standby".to_string(),
        };
        format!("A {}   B {}", role(0), role(1))
    }

    fn plain_line(&self, sample: &Sample) -> String {
        let elapsed = self.started.elapsed().as_secs();
        match sample.lag {
            None => format!("t={elapsed:>3}s  no checkpoint yet  {}", self.advancers_line()),
            Some(lag) => format!(
                "t={elapsed:>3}s  lag {lag:>5.1}s  behind truth {:>5.1}s  {}  rpcs {}  flush events {:.0}",
                ts_distance(sample.truth, sample.stored).as_secs_f64(),
                self.advancers_line(),
                sample.activity.rpcs,
                sample.activity.flush_events,
            ),
        }
    }

    fn screen(&self, sample: &Sample, log_file: &str) -> String {
        let mut s = String::new();
        let elapsed = self.started.elapsed().as_secs();
        let _ = writeln!(s, "streamhelper demo  {elapsed}s / {}s   Ctrl-C ends it", self.args.duration.as_secs());
        let _ = writeln!(s, "logs: {log_file}\n");
        let _ = writeln!(s, "advancers   {}   owner changes {}", self.advancers_line(), self.owner_changes);
        let checkpoint = match sample.stored {
            0 => "none yet".to_string(),
            ts => format_rfc3339(system_time_of(ts)),
        };
        let _ = writeln!(s, "task {TASK}   checkpoint {checkpoint}");
        if let Some(lag) = sample.lag {
            let _ = writeln!(s, "            lag {lag:.1}s  {}", sparkline(&self.lags));
        }
        let _ = writeln!(
            s,
            "truth       {}  (the oracle; the checkpoint is {:.1}s behind it)",
            format_rfc3339(system_time_of(sample.truth)),
            ts_distance(sample.truth, sample.stored.min(sample.truth)).as_secs_f64()
        );
        let stores: Vec<String> = self.stores.iter().map(|(id, shown)| format!("{id} {}", shown.label())).collect();
        let _ = writeln!(s, "cluster     {} regions; stores: {}", self.sim.region_count(), stores.join(", "));
        let _ = writeln!(
            s,
            "last tick   {} RPCs, {} regions asked, {:.0} flush events",
            sample.activity.rpcs, sample.activity.regions_asked, sample.activity.flush_events
        );
        let _ = writeln!(s, "slowest     {}", sample.slowest.as_deref().unwrap_or("-"));
        let _ = writeln!(s, "safety      {} violations", self.violations.len());
        let _ = writeln!(s, "\nevents");
        for event in &self.events {
            let _ = writeln!(s, "  {event}");
        }
        s
    }

    fn summary(&self) -> String {
        let mut lags = self.lags.clone();
        lags.sort_by(f64::total_cmp);
        let at = |q: f64| lags.get(((lags.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
        format!(
            "summary: {}s, {} regions, {} stores\n  lag min {:.1}s / median {:.1}s / p99 {:.1}s / max {:.1}s\n  \
             faults survived {}, owner changes {}, safety violations {}",
            self.started.elapsed().as_secs(),
            self.sim.region_count(),
            self.stores.len(),
            at(0.0),
            at(0.5),
            at(0.99),
            at(1.0),
            self.faults_survived,
            self.owner_changes,
            self.violations.len()
        )
    }
}

struct Sample {
    stored: Ts,
    truth: Ts,
    lag: Option<f64>,
    activity: Activity,
    slowest: Option<String>,
}

/// The last `SPARK_WIDTH` lags, each as one of eight bar heights scaled to the largest.
fn sparkline(lags: &[f64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let recent = &lags[lags.len().saturating_sub(SPARK_WIDTH)..];
    let max = recent.iter().copied().fold(0.0, f64::max).max(1.0);
    recent.iter().map(|lag| BARS[((lag / max) * 7.0).round() as usize]).collect()
}

/// Leaves the alternate screen however the demo ends.
struct FullScreen;

impl FullScreen {
    fn enter() -> FullScreen {
        print!("\x1b[?1049h\x1b[?25l");
        FullScreen
    }

    fn draw(&self, text: &str) {
        print!("\x1b[H\x1b[2J{text}");
        let _ = std::io::stdout().flush();
    }
}

impl Drop for FullScreen {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
    }
}

pub fn run(args: DemoArgs) -> Result<()> {
    let terminate = termination_flag()?;
    let plain = args.plain || !std::io::stdout().is_terminal();
    let log_file = args.log_file().display().to_string();
    let duration = args.duration;
    let faults = if args.no_faults { &[][..] } else { SCRIPT };
    println!("logs: {log_file}");
    let mut demo = Demo::start(args)?;
    println!("etcd: {} (data in {})", demo.etcd.endpoint(), demo.etcd.data_dir().display());
    println!("pd:   {} ({} regions on {} stores)", demo.sim.pd_endpoint(), demo.sim.region_count(), demo.stores.len());
    let mut script = faults.iter().peekable();
    let screen = (!plain).then(FullScreen::enter);
    let mut printed_events = 0;
    let mut tick = Instant::now();
    while demo.started.elapsed() < duration && !terminate.load(Ordering::SeqCst) {
        tick += Duration::from_secs(1);
        while Instant::now() < tick && !terminate.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let sample = demo.sample(&mut script)?;
        match &screen {
            Some(screen) => screen.draw(&demo.screen(&sample, &log_file)),
            None => {
                let new = demo.events_total - printed_events;
                for event in demo.events.iter().skip(demo.events.len().saturating_sub(new)) {
                    println!("  >> {event}");
                }
                printed_events = demo.events_total;
                println!("{}", demo.plain_line(&sample));
            }
        }
    }
    drop(screen);
    for daemon in demo.advancers.iter_mut().filter_map(Option::take) {
        daemon.stop();
    }
    println!("{}", demo.summary());
    match demo.violations.first() {
        Some(v) => Err(Error::SafetyViolation(format!("demo failed: {v}"))),
        None => Ok(()),
    }
}
