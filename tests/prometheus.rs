//! The shipped alerts (`docs/alerts.yml`) and dashboard (`docs/grafana-dashboard.json`)
//! against a real Prometheus (Debian's `prometheus`, with `promtool`) scraping a running
//! advancer over the simulated cluster and the sim's stores (`tikv_log_backup_task_status`,
//! `tikv_gcworker_autogc_safe_point`). Scrapes and rule evaluation run every second; the
//! rules' thresholds are scaled from minutes and hours to seconds, nothing else changes.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use streamhelper::etcd::{EtcdClient, EtcdProcess};
use streamhelper::meta::{AdvancerExt, MetaDataClient, PauseV2, Severity};
use streamhelper::sim::{SimCluster, SimConfig, TaskState};
use streamhelper::KeyRange;
use streamhelper::{Daemon, DaemonConfig};

const ALERTS: &str = include_str!("../docs/alerts.yml");
const DASHBOARD: &str = include_str!("../docs/grafana-dashboard.json");
const WAIT: Duration = Duration::from_secs(40);

/// The rules with their thresholds in seconds: each replacement must apply, so an edited
/// rule file fails here rather than being tested half.
fn scaled_rules() -> String {
    let scales = [
        ("/ 60 > 10 ", "/ 60 > 0.1 "),       // RPO 10 min → 6 s
        ("/ 60 > 30 ", "/ 60 > 0.2 "),       // RPO 30 min → 12 s
        ("/ 3600 > 2 ", "/ 3600 > 0.001 "),  // paused 2 h → 3.6 s
        ("/ 3600 > 12 ", "/ 3600 > 0.002 "), // paused 12 h → 7.2 s
        ("for: 1m", "for: 2s"),
    ];
    let mut rules = ALERTS.to_string();
    for (from, to) in scales {
        assert!(rules.contains(from), "docs/alerts.yml no longer contains {from:?}");
        rules = rules.replace(from, to);
    }
    rules
}

/// A Prometheus on a free loopback port with its data in a temporary directory; killed when
/// dropped.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(rules: &str, advancer: &str, stores: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
        let targets = |addrs: &[String]| addrs.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: [rules.yml]\n\
             scrape_configs:\n\
             - job_name: streamhelper\n  static_configs: [{{targets: [{}], labels: {{tidb_cluster: test}}}}]\n\
             - job_name: tikv\n  static_configs: [{{targets: [{}], labels: {{tidb_cluster: test}}}}]\n",
            targets(&[advancer.to_string()]),
            targets(stores)
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        check_config(dir.path());
        // The port may be taken between probing and binding: try a few.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = format!("127.0.0.1:{port}");
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("prometheus is installed by scripts/deps.sh");
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if ureq::get(&format!("http://{addr}/-/ready")).call().is_ok() {
                    return Prometheus { child, addr, _dir: dir };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("prometheus did not start");
    }

    fn get(&self, path: &str, query: Option<&str>) -> Value {
        let mut request = ureq::get(&format!("http://{}{path}", self.addr)).timeout(Duration::from_secs(5));
        if let Some(query) = query {
            request = request.query("query", query);
        }
        let text = request.call().unwrap_or_else(|e| panic!("{path} {query:?}: {e}")).into_string().unwrap();
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// How many series an instant query returns now.
    fn series(&self, query: &str) -> usize {
        self.get("/api/v1/query", Some(query))["result"].as_array().map_or(0, Vec::len)
    }

    /// Firing alerts as `(alertname, task)`.
    fn firing(&self) -> Vec<(String, String)> {
        let data = self.get("/api/v1/alerts", None);
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                let labels = &a["labels"];
                (labels["alertname"].as_str().unwrap().to_string(), labels["task"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }

    fn wait(&self, what: &str, mut cond: impl FnMut(&Prometheus) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; firing: {:?}", self.firing());
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn is_firing(&self, alert: &str, task: &str) -> bool {
        self.firing().iter().any(|(a, t)| a == alert && t == task)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool").args(args).output().expect("promtool comes with prometheus");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_config(dir: &Path) {
    promtool(&["check", "config", dir.join("prometheus.yml").to_str().unwrap()]);
}

/// Every query of the dashboard, with Grafana's variables filled in as a user would.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(DASHBOARD).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let filled = expr.replace("$tidb_cluster", "test").replace("$__rate_interval", "10s");
            assert!(!filled.contains('$'), "an unknown variable in {expr}");
            queries.push((panel["title"].as_str().unwrap().to_string(), filled));
        }
    }
    queries
}

#[test]
fn the_shipped_rules_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    let scaled = dir.path().join("scaled.yml");
    std::fs::write(&scaled, scaled_rules()).unwrap();
    // The checkout's path at run time: a cached test binary may come from another clone.
    let shipped =
        std::path::Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("docs/alerts.yml");
    promtool(&["check", "rules", shipped.to_str().unwrap(), scaled.to_str().unwrap()]);
}

#[test]
fn alerts_and_dashboard_queries_work_against_a_live_advancer() {
    let etcd = EtcdProcess::start().expect("a real etcd is needed for this test");
    let sim_config = SimConfig {
        stores: 3,
        regions: 24,
        seed: 7,
        flush_interval: Some(Duration::from_millis(300)),
        ..SimConfig::default()
    };
    let sim = SimCluster::start(sim_config).unwrap();
    let meta = MetaDataClient::new(EtcdClient::connect_plain([etcd.endpoint()]).unwrap());
    let ext = AdvancerExt::new(meta.clone());
    // t1 runs, t2 gets paused, t3 is one its stores report failed.
    let tasks = ["t1", "t2", "t3"];
    let start = sim.now_ts();
    for name in tasks {
        support::put_task(&meta, name, start, KeyRange::full(), "noop://");
        sim.set_task_state(name, Some(TaskState::Running));
    }
    let daemon = Daemon::start(DaemonConfig {
        etcd_endpoints: vec![etcd.endpoint()],
        advancer: support::fast_config(),
        status_addr: Some("127.0.0.1:0".into()),
        ..DaemonConfig::new(vec![sim.pd_endpoint()])
    })
    .unwrap();
    support::wait_until("the daemon to own and every task to advance", || {
        daemon.is_owner() && tasks.iter().all(|t| ext.get_global_checkpoint(t).unwrap() > start)
    });
    meta.pause_task("t2", &PauseV2::now(Severity::Manual)).unwrap();
    sim.set_task_state("t2", Some(TaskState::Paused));
    sim.set_task_state("t3", Some(TaskState::Error));
    // A leaderless region and a hung store for a moment: region and store failures get
    // series, and the stuck checkpoint starts a lock-resolution round.
    let region = sim.regions()[3].clone();
    sim.remove_leader(region.id);
    sim.hang_store(2);

    let stores: Vec<String> = sim.store_ids().into_iter().map(|id| sim.store_status_address(id)).collect();
    let prometheus = Prometheus::start(&scaled_rules(), &daemon.status_addr().unwrap().to_string(), &stores);
    let leader = region.peer_stores[0];
    prometheus.wait("region failures to be scraped", |p| {
        p.series("tidb_log_backup_region_request_failure{reason=\"no-leader\"}") > 0
    });
    prometheus.wait("store failures to be scraped", |p| p.series("streamhelper_store_failures_total{store=\"2\"}") > 0);
    sim.transfer_leader(region.id, leader).unwrap();
    sim.resume_store(2);

    for (panel, query) in dashboard_queries() {
        prometheus.wait(&format!("panel {panel:?} to show data ({query})"), |p| p.series(&query) > 0);
    }

    prometheus.wait("the paused and failed tasks' alerts", |p| {
        p.is_firing("LogBackupPausingMoreThan2h", "t2")
            && p.is_firing("LogBackupPausingMoreThan12h", "t2")
            && p.is_firing("LogBackupFailed", "t3")
    });
    prometheus.wait("the healthy task to raise nothing", |p| !p.firing().iter().any(|(_, t)| t == "t1"));

    // A region that stops flushing holds t1 back: its lag alerts fire, then clear when it
    // flushes again.
    let stuck = sim.regions()[10].id;
    sim.set_never_flush(stuck, true);
    prometheus.wait("the lag alerts of t1", |p| {
        p.is_firing("LogBackupRunningRPOMoreThan10m", "t1") && p.is_firing("LogBackupRunningRPOMoreThan30m", "t1")
    });
    assert!(
        prometheus.series(&format!("streamhelper_task_blocker_lag_seconds{{task=\"t1\",region=\"{stuck}\"}}")) > 0,
        "the blocker gauge names the stuck region"
    );
    sim.set_never_flush(stuck, false);
    prometheus.wait("the lag alerts of t1 to clear", |p| !p.firing().iter().any(|(_, t)| t == "t1"));

    // GC past the lowest checkpoint (t2's, held by its pause).
    sim.set_gc_safe_point(sim.now_ts());
    prometheus.wait("the GC alert", |p| p.is_firing("LogBackupGCSafePointExceedsCheckpoint", ""));
    let upstream =
        "min(tidb_log_backup_last_checkpoint) by (instance) - max(tikv_gcworker_autogc_safe_point) by (instance) < 0";
    assert_eq!(prometheus.series(upstream), 0, "the rule as published matches on instance and cannot fire");

    // No advancer left while tasks exist.
    assert!(!prometheus.is_firing("LogBackupNoAdvancerOwner", ""));
    daemon.stop();
    prometheus.wait("the no-owner alert", |p| p.is_firing("LogBackupNoAdvancerOwner", ""));
}
