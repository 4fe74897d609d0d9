//! The advancer process at scale, as an operator meets it: `streamhelper sim` in its own
//! process, the real `streamhelper advancer` process against it, each measured from `/proc`
//! and from its own counters, next to two floors run by this process with our own clients:
//!
//! - the RPC floor: every store asked for every region (batches of 1024, all in flight at
//!   once, fresh connections), with no PD scan and no frontier work;
//! - the decode floor: one `SubscribeFlushEvent` stream per store, only received and decoded.
//!
//! Sizes: `SCALE_BENCH_REGIONS` (comma-separated, default 10000), `SCALE_BENCH_STORES` (20),
//! `SCALE_BENCH_FLUSH` (flush interval, 5s), `SCALE_BENCH_TICK` (2s), `SCALE_BENCH_WINDOW`
//! (each steady-state window, 20s). Prints a table and rewrites its block in
//! `docs/benchmarks.md` (`SCALE_BENCH_NO_DOCS=1` leaves the file alone).
//!
//! `cargo bench --bench scale`; `SCALE_BENCH_REGIONS=10000,100000,1000000 cargo bench --bench scale`
//!
//! `SCALE_BENCH_FAULTS=1` runs fault recovery instead (issue 14 item 3), time scaled: by
//! default 10^5 regions, flush 3s, tick 1s, dial deadline 2s (`SCALE_BENCH_DIAL`), owner
//! lease 3s (`SCALE_BENCH_OWNER_TTL`), an owner and a standby advancer. The global
//! checkpoint's lag (from etcd) is sampled every 100 ms through each fault: a store stopped,
//! a store hung (each with its leaders elected elsewhere at once), a rolling restart of every
//! store (leaders evicted first, as tiup does) and the owner killed with SIGKILL, once with
//! flush subscriptions and once polling only (`SCALE_BENCH_SUBSCRIPTIONS=on|off|both`). Its
//! table has its own block in `docs/benchmarks.md`. `SCALE_BENCH_BIN` runs the processes from
//! another build of `streamhelper`.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use futures_executor::block_on;
use futures_util::StreamExt;
use grpcio::CallOption;
use parking_lot::Mutex;
use streamhelper::cluster::{ClusterMeta, LogBackupService, PdClient, PdConfig, RegionIter, TikvClients, TikvConfig};
use streamhelper::etcd::EtcdClient;
use streamhelper::format::parse_duration;
use streamhelper::meta::{AdvancerExt, MetaDataClient};
use streamhelper::proto::logbackuppb::{GetLastFlushTSOfRegionRequest, RegionIdentity, SubscribeFlushEventRequest};
use streamhelper::Security;
use streamhelper::{KeyRange, StoreId};

/// The `streamhelper` binary the processes run; `SCALE_BENCH_BIN` runs another build (an A/B
/// comparison of two commits).
fn bin() -> String {
    std::env::var("SCALE_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_streamhelper").to_string())
}
const BATCH: usize = 1024;
const TASK: &str = "scale";
/// How long the advancer gets to cover every region once before the run goes on without it.
const COLD_START_LIMIT: Duration = Duration::from_secs(300);
/// How often the cold start's end is looked for: a cold start seen in the same sample as
/// the ownership took less than this.
const COLD_START_SAMPLE: Duration = Duration::from_millis(50);
/// Where each mode's table goes in `docs/benchmarks.md`: (begin marker, end marker, the
/// heading a missing block is appended under).
const DOCS_STEADY: (&str, &str, &str) = (
    "<!-- scale bench results: begin (rewritten by `cargo bench --bench scale`) -->",
    "<!-- scale bench results: end -->",
    "## `scale`: the advancer process against its floors",
);
const DOCS_FAULTS: (&str, &str, &str) = (
    "<!-- scale bench fault results: begin (rewritten by `SCALE_BENCH_FAULTS=1 cargo bench --bench scale`) -->",
    "<!-- scale bench fault results: end -->",
    "### Fault recovery at scale",
);

struct Settings {
    faults: bool,
    sizes: Vec<usize>,
    stores: usize,
    flush: Duration,
    tick: Duration,
    threshold: Duration,
    window: Duration,
    dial: Duration,
    owner_ttl: Duration,
    /// Fault mode: run the script with subscriptions (`true`), polling only (`false`), or both.
    fault_modes: Vec<bool>,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let duration = |name: &str, default: &str| {
            let text = var(name).unwrap_or_else(|| default.into());
            parse_duration(&text).unwrap_or_else(|e| panic!("{name}={text}: {e}"))
        };
        let faults = var("SCALE_BENCH_FAULTS").is_some_and(|v| v != "0");
        // Fault recovery is time scaled: a flush of a few seconds, a tick of one.
        let (default_size, default_flush, default_tick) =
            if faults { ("100000", "3s", "1s") } else { ("10000", "5s", "2s") };
        let sizes = var("SCALE_BENCH_REGIONS").unwrap_or_else(|| default_size.into());
        let flush = duration("SCALE_BENCH_FLUSH", default_flush);
        let tick = duration("SCALE_BENCH_TICK", default_tick);
        Settings {
            faults,
            sizes: sizes
                .split(',')
                .map(|s| s.trim().parse().unwrap_or_else(|e| panic!("SCALE_BENCH_REGIONS={sizes}: {e}")))
                .collect(),
            stores: var("SCALE_BENCH_STORES").map_or(20, |s| s.parse().expect("SCALE_BENCH_STORES: a number")),
            flush,
            tick,
            // Faults: what the advancer learns from TiKV's /config (4/3 of the flush interval).
            threshold: if faults { flush * 4 / 3 } else { tick * 3 },
            window: duration("SCALE_BENCH_WINDOW", "20s"),
            dial: duration("SCALE_BENCH_DIAL", if faults { "2s" } else { "8s" }),
            owner_ttl: duration("SCALE_BENCH_OWNER_TTL", if faults { "3s" } else { "60s" }),
            fault_modes: match var("SCALE_BENCH_SUBSCRIPTIONS").as_deref() {
                None | Some("both") => vec![true, false],
                Some("on") => vec![true],
                Some("off") => vec![false],
                Some(other) => panic!("SCALE_BENCH_SUBSCRIPTIONS={other}: on, off or both"),
            },
        }
    }

    /// The goal for a store down or hung: a flush, two ticks and a dial deadline.
    fn store_bound(&self) -> Duration {
        self.flush + self.tick * 2 + self.dial
    }
}

/// A child process that is killed (by its own id) when dropped.
struct Process {
    child: Child,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    fn stop(mut self, grace: Duration) {
        unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `sim` process: its endpoints, its stdout lines and its control file.
struct Sim {
    process: Process,
    lines: Receiver<String>,
    control: PathBuf,
    pd: String,
    etcd: String,
    stores: Vec<StoreId>,
}

impl Sim {
    fn start(dir: &Path, regions: usize, settings: &Settings) -> Sim {
        let control = dir.join("control");
        std::fs::write(&control, "").expect("control file");
        let mut child = Command::new(bin())
            .args(["sim", "--stores", &settings.stores.to_string(), "--regions", &regions.to_string()])
            .args(["--flush-interval", &format!("{}ms", settings.flush.as_millis())])
            .args(["--control-file", control.to_str().expect("utf-8 path"), "--duration", "2h"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(std::env::temp_dir().join("scale-bench-sim.log")).expect("log")))
            .spawn()
            .expect("spawn sim");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut sim = Sim {
            process: Process { child },
            lines,
            control,
            pd: String::new(),
            etcd: String::new(),
            stores: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let line = sim.next_line(deadline).expect("the sim printed `ready`");
            if let Some(pd) = line.strip_prefix("pd: ") {
                sim.pd = pd.to_string();
            } else if let Some(etcd) = line.strip_prefix("etcd: ") {
                sim.etcd = etcd.to_string();
            } else if let Some(store) = line.strip_prefix("store ") {
                sim.stores.push(store.split(':').next().and_then(|id| id.parse().ok()).expect("store id"));
            } else if line.starts_with("regions: ") {
                println!("sim: {line}");
            } else if line == "ready" {
                return sim;
            }
        }
    }

    fn next_line(&self, deadline: Instant) -> Option<String> {
        self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).ok()
    }

    fn send(&self, line: &str) {
        let mut file = OpenOptions::new().append(true).open(&self.control).expect("control file");
        writeln!(file, "{line}").expect("control line");
    }

    /// Sends `line` and returns the first output line starting with `expect`.
    fn ask(&self, line: &str, expect: &str) -> String {
        while self.lines.try_recv().is_ok() {}
        self.send(line);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = self.next_line(deadline).unwrap_or_else(|| panic!("the sim answered {expect:?}"));
            if line.starts_with(expect) {
                return line;
            }
        }
    }

    /// PD's region scans so far: (calls, regions).
    fn pd_scans(&self) -> (u64, u64) {
        let line = self.ask("status", "PD region scans: ");
        let numbers: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
        (numbers[0], numbers[1])
    }

    /// Every store answers `SubscribeFlushEvent` with UNIMPLEMENTED and ends its streams:
    /// the advancer polls what lags.
    fn turn_subscriptions_off(&self) {
        for store in &self.stores {
            self.ask(&format!("subscription {store} off"), &format!("store {store} subscription supported"));
            self.ask(&format!("reset-subscriptions {store}"), &format!("store {store} subscriptions reset"));
        }
    }

    fn quit(self) {
        self.send("quit");
        self.process.stop(Duration::from_secs(30));
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// (current, peak) resident set of a process, in MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
    };
    (field("VmRSS:").unwrap_or(0.0) / 1024.0, field("VmHWM:").unwrap_or(0.0) / 1024.0)
}

fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().unwrap_or("?").to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of one sample line (`name{labels} value`) of a Prometheus page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `advancer` process and its status address.
struct Advancer {
    process: Process,
    status: String,
}

impl Advancer {
    /// `name` tells the log files apart: `$TMPDIR/scale-bench-advancer-<name>.log`.
    fn start(sim: &Sim, settings: &Settings, name: &str) -> Advancer {
        let status = format!("127.0.0.1:{}", free_port());
        let millis = |d: Duration| format!("{}ms", d.as_millis());
        let child = Command::new(bin())
            .args(["advancer", "-u", &sim.pd, "--etcd", &sim.etcd, "--status-addr", &status])
            .args(["--tick-interval", &millis(settings.tick)])
            .args(["--try-advance-threshold", &millis(settings.threshold)])
            .args(["--dial-timeout", &millis(settings.dial), "--owner-ttl", &millis(settings.owner_ttl)])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(std::env::temp_dir().join(format!("scale-bench-advancer-{name}.log")))
                    .expect("log"),
            ))
            .spawn()
            .expect("spawn advancer");
        Advancer { process: Process { child }, status }
    }

    fn metrics(&self) -> Option<String> {
        http_get(&self.status, "/metrics")
    }

    fn is_owner(&self) -> bool {
        self.metrics().is_some_and(|page| sample(&page, "tidb_log_backup_advancer_owner") == Some(1.0))
    }

    fn counters(&self) -> Counters {
        let page = self.metrics().expect("/metrics answers");
        Counters {
            at: Instant::now(),
            cpu: cpu_seconds(&self.process.pid().to_string()),
            ticks: sample(&page, "tidb_log_backup_advancer_tick_duration_sec_count{step=\"tick\"}").unwrap_or(0.0),
            polled: sample(&page, "streamhelper_regions_polled_total").unwrap_or(0.0),
            tick_cpu: sample(&page, "streamhelper_advancer_message_cpu_seconds_sum{message=\"tick\"}").unwrap_or(0.0),
            tick_messages: sample(&page, "streamhelper_advancer_message_cpu_seconds_count{message=\"tick\"}")
                .unwrap_or(0.0),
            checkpoint: sample(&page, &format!("tidb_log_backup_last_checkpoint{{task=\"{TASK}\"}}")).unwrap_or(0.0),
        }
    }
}

#[derive(Clone, Copy)]
struct Counters {
    at: Instant,
    cpu: f64,
    ticks: f64,
    polled: f64,
    /// The ticker thread's CPU on tick messages (flush merges are messages of their own).
    tick_cpu: f64,
    tick_messages: f64,
    checkpoint: f64,
}

/// One steady-state window of the advancer.
struct Steady {
    cpu_per_second: f64,
    cpu_per_tick: f64,
    tick_thread_cpu: f64,
    cpu_per_flush: f64,
    polled_per_tick: f64,
    pd_calls_per_tick: f64,
    pd_regions_per_tick: f64,
    checkpoint_lag: Duration,
    load: String,
    /// The advancer's RSS at the window's end and its peak so far, MiB.
    rss: (f64, f64),
}

fn measure_steady(sim: &Sim, advancer: &Advancer, settings: &Settings) -> Steady {
    let load = load_average();
    let before = advancer.counters();
    let scans_before = sim.pd_scans();
    std::thread::sleep(settings.window);
    let after = advancer.counters();
    let scans_after = sim.pd_scans();
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let cpu = after.cpu - before.cpu;
    let ticks = (after.ticks - before.ticks).max(1.0);
    let flushes = seconds / settings.flush.as_secs_f64();
    let physical_ms = (after.checkpoint as u64) >> 18;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64;
    Steady {
        cpu_per_second: cpu / seconds,
        cpu_per_tick: cpu / ticks,
        tick_thread_cpu: (after.tick_cpu - before.tick_cpu) / (after.tick_messages - before.tick_messages).max(1.0),
        cpu_per_flush: cpu / flushes,
        polled_per_tick: (after.polled - before.polled) / ticks,
        pd_calls_per_tick: (scans_after.0 - scans_before.0) as f64 / ticks,
        pd_regions_per_tick: (scans_after.1 - scans_before.1) as f64 / ticks,
        checkpoint_lag: Duration::from_millis(now_ms.saturating_sub(physical_ms)),
        load,
        rss: rss_mib(advancer.process.pid()),
    }
}

/// Every region of the cluster, grouped by leader store, in request batches.
fn batches_by_store(pd: &dyn ClusterMeta) -> BTreeMap<StoreId, Vec<GetLastFlushTSOfRegionRequest>> {
    let regions = RegionIter::new(pd, &KeyRange::full()).collect_all().expect("scan regions");
    let mut by_store: BTreeMap<StoreId, Vec<RegionIdentity>> = BTreeMap::new();
    for region in regions {
        let mut identity = RegionIdentity::default();
        identity.set_id(region.id);
        identity.set_epoch_version(region.epoch_version);
        by_store.entry(region.leader_store.expect("a leader")).or_default().push(identity);
    }
    by_store
        .into_iter()
        .map(|(store, ids)| {
            let requests = ids
                .chunks(BATCH)
                .map(|chunk| {
                    let mut request = GetLastFlushTSOfRegionRequest::default();
                    request.set_regions(chunk.to_vec().into());
                    request
                })
                .collect();
            (store, requests)
        })
        .collect()
}

/// The RPC floor: fresh connections to every store, then every batch in flight at once.
/// Returns the wall time and the checkpoints answered.
fn rpc_floor(
    pd: &Arc<dyn ClusterMeta>,
    batches: &BTreeMap<StoreId, Vec<GetLastFlushTSOfRegionRequest>>,
) -> (Duration, usize) {
    let started = Instant::now();
    let service = TikvClients::new(pd.clone(), Security::insecure(), TikvConfig::default());
    let service = &service;
    let clients: Vec<_> = std::thread::scope(|scope| {
        let dials: Vec<_> =
            batches.keys().map(|&store| scope.spawn(move || service.client(store).expect("dial"))).collect();
        dials.into_iter().map(|d| d.join().expect("dial thread")).collect()
    });
    let option = || CallOption::default().timeout(Duration::from_secs(120));
    let calls: Vec<_> = clients
        .iter()
        .zip(batches.values())
        .flat_map(|(client, requests)| {
            requests.iter().map(move |r| client.get_last_flush_ts_of_region_async_opt(r, option()).expect("call"))
        })
        .collect();
    let answered = calls.into_iter().map(|call| block_on(call).expect("answer").get_checkpoints().len()).sum();
    (started.elapsed(), answered)
}

/// The decode floor: one bare subscription per store, counting the flush events it decodes.
struct DecodeFloor {
    events: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DecodeFloor {
    fn start(service: &TikvClients, stores: &[StoreId]) -> DecodeFloor {
        let events = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = stores
            .iter()
            .map(|&store| {
                let client = service.client(store).expect("dial");
                let (events, stop) = (events.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut request = SubscribeFlushEventRequest::default();
                    request.set_client_id(format!("scale-bench-{store}"));
                    let mut stream =
                        client.subscribe_flush_event_opt(&request, CallOption::default()).expect("subscribe");
                    // Each flush sends a message, so the stop flag is seen within a flush interval.
                    while !stop.load(Ordering::Relaxed) {
                        match block_on(stream.next()) {
                            Some(Ok(message)) => {
                                events.fetch_add(message.get_events().len() as u64, Ordering::Relaxed);
                            }
                            _ => return,
                        }
                    }
                    stream.cancel();
                })
            })
            .collect();
        DecodeFloor { events, stop, threads }
    }

    fn wait_for(&self, events: u64, deadline: Instant) {
        while self.events.load(Ordering::Relaxed) < events {
            assert!(
                Instant::now() < deadline,
                "the decode floor saw {} of {events} events",
                self.events.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

struct Row {
    regions: usize,
    load_floors: String,
    rpc_floor: Duration,
    decode_cpu_per_flush: f64,
    load_cold: String,
    owner_after: Duration,
    /// `None`: not within `COLD_START_LIMIT`.
    cold_start: Option<Duration>,
    subscribed: Steady,
    polling: Steady,
}

fn tso_of(time: SystemTime) -> u64 {
    (time.duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64) << 18
}

/// `streamhelper task add` with a start ts one minute back, so every region must be heard
/// from before the checkpoint can move; returns the start ts.
fn add_task(sim: &Sim, dir: &Path) -> u64 {
    let start_ts = tso_of(SystemTime::now() - Duration::from_secs(60));
    let status = Command::new(bin())
        .args(["task", "add", TASK, "--storage", &format!("local://{}", dir.join("storage").display())])
        .args(["--start-ts", &start_ts.to_string(), "-u", &sim.pd, "--etcd", &sim.etcd])
        .stdout(Stdio::null())
        .status()
        .expect("task add");
    assert!(status.success(), "task add");
    start_ts
}

fn run_size(regions: usize, settings: &Settings) -> Row {
    let dir = tempfile::tempdir().expect("temp dir");
    let sim = Sim::start(dir.path(), regions, settings);
    let pd: Arc<dyn ClusterMeta> = Arc::new(
        PdClient::connect(
            PdConfig { timeout: Duration::from_secs(60), ..PdConfig::new(vec![sim.pd.clone()]) },
            Security::insecure(),
        )
        .expect("pd"),
    );
    let load_floors = load_average();
    let batches = batches_by_store(pd.as_ref());
    let mut floors: Vec<Duration> = (0..3)
        .map(|_| {
            let (took, answered) = rpc_floor(&pd, &batches);
            assert_eq!(answered, regions, "every region answered the floor");
            took
        })
        .collect();
    floors.sort();
    let rpc_floor = floors[1];

    let service = TikvClients::new(pd.clone(), Security::insecure(), TikvConfig::default());
    let floor = DecodeFloor::start(&service, &sim.stores);
    let generous = Instant::now() + settings.flush * 4 + Duration::from_secs(120);
    // The first flush after subscribing (or the snapshot sent on subscribe) settles the streams.
    floor.wait_for(regions as u64, generous);
    let (cpu_before, events_before, at) = (cpu_seconds("self"), floor.events.load(Ordering::Relaxed), Instant::now());
    floor.wait_for(events_before + 3 * regions as u64, generous + settings.flush * 4);
    let flushes = (floor.events.load(Ordering::Relaxed) - events_before) as f64 / regions as f64;
    let decode_cpu_per_flush = (cpu_seconds("self") - cpu_before) / flushes;
    println!("decode floor: {flushes:.1} flushes in {:?}", at.elapsed());
    floor.stop();
    drop(service);

    let start_ts = add_task(&sim, dir.path());
    let load_cold = load_average();
    let spawned = Instant::now();
    let advancer = Advancer::start(&sim, settings, "owner");
    let deadline = spawned + COLD_START_LIMIT;
    let mut owner_at = None;
    let covered_at = loop {
        if Instant::now() >= deadline {
            break None;
        }
        if let Some(page) = advancer.metrics() {
            // One instant per page: ownership and the upload seen on the same page are the
            // same sample, which `within_sample` shows as under one.
            let seen = Instant::now();
            if owner_at.is_none() && sample(&page, "tidb_log_backup_advancer_owner") == Some(1.0) {
                owner_at = Some(seen);
            }
            if sample(&page, &format!("tidb_log_backup_last_checkpoint{{task=\"{TASK}\"}}"))
                .is_some_and(|c| c > start_ts as f64)
            {
                break Some(seen);
            }
        }
        std::thread::sleep(COLD_START_SAMPLE);
    };
    let owner_at = owner_at.unwrap_or(spawned);

    std::thread::sleep(settings.flush * 2);
    let subscribed = measure_steady(&sim, &advancer, settings);
    sim.turn_subscriptions_off();
    std::thread::sleep(settings.flush * 2 + settings.threshold);
    let polling = measure_steady(&sim, &advancer, settings);
    advancer.process.stop(Duration::from_secs(30));
    sim.quit();
    Row {
        regions,
        load_floors,
        rpc_floor,
        decode_cpu_per_flush,
        load_cold,
        owner_after: owner_at.duration_since(spawned),
        cold_start: covered_at.map(|at| at.duration_since(owner_at)),
        subscribed,
        polling,
    }
}

/// How often the fault phase reads the global checkpoint.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long the lag gets to come back to its steady level after a fault ends.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);

/// One reading of the task's global checkpoint in etcd.
#[derive(Clone, Copy)]
struct LagSample {
    at: Instant,
    lag: Duration,
}

/// Reads the task's global checkpoint from etcd every [`SAMPLE_EVERY`] on its own thread,
/// counting values lower than one read before (the checkpoint must never regress).
struct Sampler {
    samples: Arc<Mutex<Vec<LagSample>>>,
    regressions: Arc<AtomicU64>,
    read_errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Sampler {
    fn start(meta: AdvancerExt) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let regressions = Arc::new(AtomicU64::new(0));
        let read_errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, regressions, read_errors, stop) =
                (samples.clone(), regressions.clone(), read_errors.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut highest = 0;
                while !stop.load(Ordering::Relaxed) {
                    let next = Instant::now() + SAMPLE_EVERY;
                    match meta.get_global_checkpoint(TASK) {
                        Ok(0) => {}
                        Ok(checkpoint) => {
                            if checkpoint < highest {
                                regressions.fetch_add(1, Ordering::Relaxed);
                            }
                            highest = highest.max(checkpoint);
                            samples.lock().push(LagSample { at: Instant::now(), lag: lag_of(checkpoint) });
                        }
                        Err(_) => {
                            read_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            })
        };
        Sampler { samples, regressions, read_errors, stop, thread }
    }

    fn between(&self, from: Instant, to: Instant) -> Vec<LagSample> {
        self.samples.lock().iter().filter(|s| s.at >= from && s.at <= to).copied().collect()
    }

    /// The first sample after `from` with a lag of at most `level`, waiting until `deadline`.
    fn wait_lag_at_most(&self, level: Duration, from: Instant, deadline: Instant) -> Option<Instant> {
        loop {
            let found = self.samples.lock().iter().find(|s| s.at >= from && s.lag <= level).map(|s| s.at);
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(SAMPLE_EVERY);
        }
    }

    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        (self.regressions.load(Ordering::Relaxed), self.read_errors.load(Ordering::Relaxed))
    }
}

/// The wall clock minus the physical part of a TSO.
fn lag_of(ts: u64) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    now.saturating_sub(Duration::from_millis(ts >> 18))
}

/// Max and p99 of the lags sampled in a window.
fn lag_stats(samples: &[LagSample]) -> (Duration, Duration) {
    let mut lags: Vec<Duration> = samples.iter().map(|s| s.lag).collect();
    lags.sort();
    let p99 = lags.get((lags.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or_default();
    (lags.last().copied().unwrap_or_default(), p99)
}

enum Fault {
    /// `lose` (a sim control) makes the store `state`; its leaders are elected elsewhere, and
    /// after a window `back` ends the fault.
    LoseStore {
        store: StoreId,
        state: &'static str,
        lose: &'static str,
        back: &'static str,
    },
    RollingRestart,
    OwnerKill,
}

struct FaultRow {
    fault: String,
    /// What the lag is held to, and how the bound is made.
    bound: Duration,
    bound_text: &'static str,
    max_lag: Duration,
    p99_lag: Duration,
    /// From the end of the fault to the lag's return to the steady maximum; `None`: not within
    /// [`RECOVERY_LIMIT`].
    recovery: Option<Duration>,
    note: String,
}

struct FaultRun {
    subscriptions: bool,
    load: String,
    steady_max: Duration,
    steady_p99: Duration,
    rows: Vec<FaultRow>,
    regressions: u64,
    read_errors: u64,
    /// Checks after each fault that the stored checkpoint is not above the sim's truth: (checks, failed).
    truth_checks: (usize, usize),
}

impl Sim {
    /// The oracle's true checkpoint of the whole key space (the task covers it).
    fn true_checkpoint(&self) -> u64 {
        let line = self.ask("status", "PD ");
        let words = line.rsplit_once("true checkpoint ").expect("status names the true checkpoint").1;
        words.trim().parse().expect("a TSO")
    }
}

/// The fault script against a fresh sim, with flush subscriptions or polling only.
fn run_faults(regions: usize, settings: &Settings, subscriptions: bool) -> FaultRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let sim = Sim::start(dir.path(), regions, settings);
    let start_ts = add_task(&sim, dir.path());
    let meta = AdvancerExt::new(MetaDataClient::new(EtcdClient::connect_plain([sim.etcd.clone()]).expect("etcd")));
    let mut owner = Some(Advancer::start(&sim, settings, "a"));
    let covered = Instant::now() + COLD_START_LIMIT;
    while meta.get_global_checkpoint(TASK).unwrap_or(0) <= start_ts {
        assert!(Instant::now() < covered, "no checkpoint covering every region within {COLD_START_LIMIT:?}");
        std::thread::sleep(SAMPLE_EVERY);
    }
    assert!(owner.as_ref().is_some_and(Advancer::is_owner), "the first advancer owns");
    let standby = Advancer::start(&sim, settings, "b");
    let up = Instant::now() + Duration::from_secs(60);
    while standby.metrics().is_none() {
        assert!(Instant::now() < up, "the standby's /metrics answers within a minute");
        std::thread::sleep(SAMPLE_EVERY);
    }
    if !subscriptions {
        sim.turn_subscriptions_off();
    }
    let sampler = Sampler::start(meta.clone());
    let load = load_average();
    std::thread::sleep(settings.flush * 2 + settings.threshold);
    let steady_from = Instant::now();
    std::thread::sleep(settings.window);
    let (steady_max, steady_p99) = lag_stats(&sampler.between(steady_from, Instant::now()));
    println!("steady: max lag {steady_max:?}, p99 {steady_p99:?}");

    let stores = sim.stores.clone();
    let faults = [
        Fault::LoseStore { store: stores[0], state: "down", lose: "stop-store", back: "restart-store" },
        Fault::LoseStore { store: stores[1], state: "hung", lose: "hang-store", back: "resume-store" },
        Fault::RollingRestart,
        Fault::OwnerKill,
    ];
    let mut rows = Vec::new();
    let mut truth_checks = (0, 0);
    for fault in faults {
        let started = Instant::now();
        let (name, bound, bound_text, note) = match fault {
            Fault::LoseStore { store, state, lose, back } => {
                sim.ask(&format!("{lose} {store}"), &format!("store {store} "));
                let moved = sim.ask(&format!("fail-over {store}"), &format!("store {store}: "));
                std::thread::sleep(settings.window);
                sim.ask(&format!("{back} {store}"), &format!("store {store} "));
                (format!("store {store} {state} {:?}", settings.window), settings.store_bound(), "F+2T+dial", moved)
            }
            Fault::RollingRestart => {
                for store in &stores {
                    sim.ask(&format!("fail-over {store}"), &format!("store {store}: "));
                    sim.ask(&format!("restart-store {store}"), &format!("store {store} restarted"));
                    std::thread::sleep(settings.flush);
                }
                let name = format!("rolling restart of {} stores, one per F", stores.len());
                (name, settings.store_bound(), "F+2T+dial", "leaders evicted before each restart".to_string())
            }
            Fault::OwnerKill => {
                drop(owner.take()); // SIGKILL: no resignation, the standby waits out the lease
                let deadline = Instant::now() + settings.owner_ttl * 4 + Duration::from_secs(30);
                while !standby.is_owner() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                // The fault lasts until the standby owns: the recovery is its own work.
                let note = if standby.is_owner() {
                    format!("standby owner {:.1} s after the kill", started.elapsed().as_secs_f64())
                } else {
                    "the standby did not take over".to_string()
                };
                (
                    "owner kill -9, standby takes over".to_string(),
                    settings.owner_ttl + settings.store_bound(),
                    "TTL+F+2T+dial",
                    note,
                )
            }
        };
        let ended = Instant::now();
        let recovered = sampler.wait_lag_at_most(steady_max, ended, ended + RECOVERY_LIMIT);
        let (max_lag, p99_lag) = lag_stats(&sampler.between(started, recovered.unwrap_or_else(Instant::now)));
        let stored = meta.get_global_checkpoint(TASK).expect("read the checkpoint");
        truth_checks.0 += 1;
        if stored > sim.true_checkpoint() {
            truth_checks.1 += 1;
        }
        println!(
            "{name}: max lag {max_lag:?}, p99 {p99_lag:?}, recovered after {:?}; {note}",
            recovered.map(|r| r - ended)
        );
        rows.push(FaultRow {
            fault: name,
            bound,
            bound_text,
            max_lag,
            p99_lag,
            recovery: recovered.map(|at| at.duration_since(ended)),
            note,
        });
        std::thread::sleep(settings.flush);
    }
    let (regressions, read_errors) = sampler.stop();
    standby.process.stop(Duration::from_secs(30));
    sim.quit();
    FaultRun { subscriptions, load, steady_max, steady_p99, rows, regressions, read_errors, truth_checks }
}

fn seconds(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

fn fault_table(regions: usize, run: &FaultRun, settings: &Settings) -> String {
    let (f, t, dial) = (seconds(settings.flush), seconds(settings.tick), seconds(settings.dial));
    let mut out = format!(
        "{regions} regions over {} stores, {}; flush F {f} s, tick T {t} s, dial deadline {dial} s, poll threshold {} s, \
         owner lease TTL {} s; lag = wall clock - the checkpoint in etcd, sampled every {} ms (load average {} at the start)\n\n",
        settings.stores,
        if run.subscriptions { "with flush subscriptions" } else { "subscriptions off (polling only)" },
        seconds(settings.threshold),
        seconds(settings.owner_ttl),
        SAMPLE_EVERY.as_millis(),
        run.load,
    );
    out.push_str("| fault | F s | T s | dial s | bound s | max lag s | p99 lag s | recovery after the fault ends s | max lag / F | verdict |\n");
    out.push_str("|---|---:|---:|---:|---|---:|---:|---:|---:|---|\n");
    out.push_str(&format!(
        "| none (steady, {:?}) | {f} | {t} | {dial} | - | {} | {} | - | {:.1} | - |\n",
        settings.window,
        seconds(run.steady_max),
        seconds(run.steady_p99),
        run.steady_max.as_secs_f64() / settings.flush.as_secs_f64(),
    ));
    for row in &run.rows {
        let verdict = if row.max_lag <= row.bound {
            "met".to_string()
        } else {
            format!("missed by {} s", seconds(row.max_lag - row.bound))
        };
        out.push_str(&format!(
            "| {} ({}) | {f} | {t} | {dial} | {} = {} | {} | {} | {} | {:.1} | {verdict} |\n",
            row.fault,
            row.note,
            row.bound_text,
            seconds(row.bound),
            seconds(row.max_lag),
            seconds(row.p99_lag),
            row.recovery.map_or(format!("> {}", seconds(RECOVERY_LIMIT)), seconds),
            row.max_lag.as_secs_f64() / settings.flush.as_secs_f64(),
        ));
    }
    out.push_str(&format!(
        "\nSafety over the run: {} regressions of the stored checkpoint between samples, {} of {} checks above \
         the sim's true checkpoint, {} failed etcd reads.\n",
        run.regressions, run.truth_checks.1, run.truth_checks.0, run.read_errors
    ));
    out
}

fn ms(seconds: f64) -> String {
    format!("{:.1}", seconds * 1e3)
}

/// `shown`, or "< sample" when the cold start ended within the sample that saw ownership.
fn within_sample(cold_start: Duration, shown: String) -> String {
    if cold_start.is_zero() {
        format!("< {}", if shown.ends_with('x') { shown } else { ms(COLD_START_SAMPLE.as_secs_f64()) })
    } else {
        shown
    }
}

fn ratio(value: f64, floor: f64) -> String {
    format!("{:.2}x", value / floor)
}

fn table(rows: &[Row], settings: &Settings) -> String {
    let mut out = format!(
        "{} stores, flush every {:?}, tick {:?}, poll threshold {:?}, steady windows of {:?}; \
         load average (1 min) beside each measurement\n\n",
        settings.stores, settings.flush, settings.tick, settings.threshold, settings.window
    );
    out.push_str("Cold start and floors:\n\n");
    out.push_str("| regions | load | RPC floor ms | owner after ms | cold start ms | cold / RPC floor (goal 1.5x) | decode floor CPU ms/flush |\n");
    out.push_str("|---:|---|---:|---:|---:|---:|---:|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} / {} | {} | {} | {} | {} | {} |\n",
            r.regions,
            r.load_floors,
            r.load_cold,
            ms(r.rpc_floor.as_secs_f64()),
            ms(r.owner_after.as_secs_f64()),
            r.cold_start.map_or(format!("> {COLD_START_LIMIT:?}"), |d| within_sample(d, ms(d.as_secs_f64()))),
            r.cold_start.map_or("-".into(), |d| within_sample(
                d,
                ratio(d.max(COLD_START_SAMPLE).as_secs_f64(), r.rpc_floor.as_secs_f64())
            )),
            ms(r.decode_cpu_per_flush),
        ));
    }
    out.push_str(
        "\nSteady state (advancer process; CPU from /proc, regions polled from its metrics, PD scans from the sim's \
         counters; a tick's own CPU is the ticker thread's on tick messages, from \
         `streamhelper_advancer_message_cpu_seconds`, apart from flush merges and from polls fanned out to other \
         threads):\n\n",
    );
    out.push_str("| regions | mode | load | CPU ms/s | CPU ms per tick interval | tick's own CPU ms (goal 50) | CPU ms/flush | / decode floor (goal 2x) | regions polled/tick | PD scan calls/tick | PD regions scanned/tick | checkpoint lag s | RSS MiB at the window's end / peak so far (goal 400) |\n");
    out.push_str("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        for (mode, s) in [("subscriptions", &r.subscribed), ("polling only", &r.polling)] {
            out.push_str(&format!(
                "| {} | {mode} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.0} / {:.0} |\n",
                r.regions,
                s.load,
                ms(s.cpu_per_second),
                ms(s.cpu_per_tick),
                ms(s.tick_thread_cpu),
                ms(s.cpu_per_flush),
                ratio(s.cpu_per_flush, r.decode_cpu_per_flush),
                s.polled_per_tick,
                s.pd_calls_per_tick,
                s.pd_regions_per_tick,
                s.checkpoint_lag.as_secs_f64(),
                s.rss.0,
                s.rss.1,
            ));
        }
    }
    out
}

fn write_docs(text: &str, (begin_marker, end_marker, heading): (&str, &str, &str)) {
    let path = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("docs/benchmarks.md");
    let docs = std::fs::read_to_string(&path).expect("docs/benchmarks.md");
    let block = format!("{begin_marker}\n\n{text}\n{end_marker}");
    let updated = match (docs.find(begin_marker), docs.find(end_marker)) {
        (Some(begin), Some(end)) if begin < end => {
            format!("{}{block}{}", &docs[..begin], &docs[end + end_marker.len()..])
        }
        _ => format!("{}\n{heading}\n\n{block}\n", docs.trim_end()),
    };
    std::fs::write(&path, updated).expect("write docs/benchmarks.md");
}

/// What the numbers ran on: CPU model and count, memory, and the commit measured.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let commit = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |c| c.trim().to_string());
    let binary = std::env::var("SCALE_BENCH_BIN").map_or_else(|_| format!("commit `{commit}`"), |b| format!("`{b}`"));
    format!("{model}, {cpus} CPUs, {memory_gib:.0} GiB, {binary}")
}

fn main() {
    let settings = Settings::from_env();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut text = String::new();
    let mut rows = Vec::new();
    for &regions in &settings.sizes {
        println!(
            "scale bench{}: {regions} regions over {} stores ({cpus} CPUs, load {})",
            if settings.faults { " (faults)" } else { "" },
            settings.stores,
            load_average()
        );
        if settings.faults {
            for subscriptions in settings.fault_modes.clone() {
                text.push_str(&fault_table(regions, &run_faults(regions, &settings, subscriptions), &settings));
                text.push('\n');
            }
        } else {
            rows.push(run_size(regions, &settings));
        }
    }
    if !settings.faults {
        text = table(&rows, &settings);
    }
    println!("\n{text}");
    if std::env::var_os("SCALE_BENCH_NO_DOCS").is_none() {
        write_docs(
            &format!("Run of {} on {}:\n\n{text}", streamhelper::format::format_rfc3339(SystemTime::now()), machine()),
            if settings.faults { DOCS_FAULTS } else { DOCS_STEADY },
        );
    }
}
