//! Owner control next to TiDB: a candidate written the way tidb-server writes it (etcd
//! `concurrency.Election`: `/tidb/br-stream/owner/<lease hex>` = a UUID, bound to a lease,
//! created only if absent), then `owner show`, `owner evict`, `--take-over` and
//! `POST /owner/resign` against it, on a real etcd.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use streamhelper::etcd::{Cmp, Election, EtcdClient, EtcdProcess, KeySpan, Txn, TxnOp};
use streamhelper::meta::keys::OWNER_PREFIX;
use streamhelper::sim::{SimCluster, SimConfig};
use streamhelper::testing::{http_get, http_request};
use streamhelper::Config;
use streamhelper::{Daemon, DaemonConfig, DaemonHandle};
use support::wait_until;

const TIDB_ID: &str = "5b0b2f4e-9c1d-4a7e-8f3b-1d2c3e4f5a6b";

struct Fixture {
    etcd: EtcdProcess,
    sim: SimCluster,
    client: EtcdClient,
}

impl Fixture {
    fn new() -> Fixture {
        let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
        let sim = SimCluster::start(SimConfig::default()).unwrap();
        let client = EtcdClient::connect_plain([etcd.endpoint()]).unwrap();
        Fixture { etcd, sim, client }
    }

    /// Campaigns like tidb-server's owner manager: a 60 s session lease, then
    /// `Txn(CreateRevision(key) == 0, Put(key, id, lease))`. Returns (key, lease).
    fn tidb_campaigns(&self) -> (String, i64) {
        let lease = self.client.grant_lease(Duration::from_secs(60)).unwrap();
        let key = format!("{OWNER_PREFIX}/{lease:x}");
        let txn = Txn::new()
            .when([Cmp::absent(&key)])
            .and_then([TxnOp::put(key.clone(), TIDB_ID.as_bytes().to_vec(), lease)])
            .or_else([TxnOp::get(KeySpan::key(key.clone()), &Default::default())]);
        assert!(self.client.txn(txn).unwrap().succeeded);
        (key, lease)
    }

    fn candidates(&self) -> Vec<(String, String)> {
        Election::new(self.client.clone(), OWNER_PREFIX)
            .candidates()
            .unwrap()
            .into_iter()
            .map(|c| (String::from_utf8(c.key).unwrap(), String::from_utf8(c.value).unwrap()))
            .collect()
    }

    fn daemon(&self, take_over: bool) -> DaemonHandle {
        let advancer = Config {
            tick_interval: Duration::from_millis(200),
            backoff: Duration::from_millis(200),
            owner_ttl: Duration::from_secs(2),
            rpc_timeout: Duration::from_millis(500),
            ..Config::default()
        };
        Daemon::start(DaemonConfig {
            etcd_endpoints: vec![self.etcd.endpoint()],
            advancer,
            status_addr: Some("127.0.0.1:0".into()),
            take_over,
            ..DaemonConfig::new(vec![self.sim.pd_endpoint()])
        })
        .unwrap()
    }

    fn cli(&self, args: &[&str]) -> Output {
        let output = Command::new(env!("CARGO_BIN_EXE_streamhelper"))
            .args(args)
            .args(["--etcd", &self.etcd.endpoint()])
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        output
    }

    fn owner_show(&self) -> serde_json::Value {
        serde_json::from_slice(&self.cli(&["owner", "show", "--json"]).stdout).unwrap()
    }
}

#[test]
fn a_standby_behind_tidb_takes_over_after_owner_evict() {
    let f = Fixture::new();
    let (tidb_key, tidb_lease) = f.tidb_campaigns();
    let daemon = f.daemon(false);
    wait_until("our candidate behind TiDB's", || f.candidates().len() == 2);
    assert!(!daemon.is_owner(), "the older TiDB candidate leads");

    let shown = f.owner_show();
    assert_eq!(shown[0]["key"], tidb_key.as_str());
    assert_eq!(shown[0]["id"], TIDB_ID);
    assert_eq!(shown[0]["lease"], format!("{tidb_lease:x}"));
    assert_eq!((shown[0]["owner"].as_bool(), shown[0]["ours"].as_bool()), (Some(true), Some(false)));
    let ttl = shown[0]["ttl"].as_i64().unwrap();
    assert!((50..=60).contains(&ttl), "TTL left {ttl}");
    assert_eq!((shown[1]["owner"].as_bool(), shown[1]["ours"].as_bool()), (Some(false), Some(true)));
    let table = String::from_utf8(f.cli(&["owner", "show"]).stdout).unwrap();
    assert!(table.lines().nth(1).unwrap().starts_with("owner") && table.contains("tidb"), "{table}");

    let (_, status) = http_get(daemon.status_addr().unwrap(), "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["owner"]["key"], tidb_key.as_str(), "/status names the TiDB owner: {status}");
    assert_eq!(status["owner"]["ours"], false);

    let evicted = String::from_utf8(f.cli(&["owner", "evict"]).stdout).unwrap();
    assert!(evicted.contains(&tidb_key) && evicted.contains("owner"), "{evicted}");
    wait_until("the daemon to lead once TiDB's key is gone", || daemon.is_owner());
    // TiDB campaigns again with its session: at the back of the queue.
    let campaign_again = Txn::new().and_then([TxnOp::put(tidb_key.clone(), TIDB_ID.as_bytes().to_vec(), tidb_lease)]);
    f.client.txn(campaign_again).unwrap();
    let shown = f.owner_show();
    assert_eq!(shown[0]["ours"], true);
    assert_eq!(shown[1]["key"], tidb_key.as_str());
    let (_, status) = http_get(daemon.status_addr().unwrap(), "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["owner"]["this_advancer"], true, "{status}");

    // Evicting by name: a candidate that is not there is an error naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_streamhelper"))
        .args(["owner", "evict", "nobody", "--etcd", &f.etcd.endpoint()])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("nobody"));
    daemon.stop();
}

#[test]
fn take_over_evicts_tidb_and_resign_hands_ownership_back() {
    let f = Fixture::new();
    let (tidb_key, tidb_lease) = f.tidb_campaigns();
    let daemon = f.daemon(true);
    wait_until("--take-over to lead", || daemon.is_owner());
    let candidates = f.candidates();
    assert_eq!(candidates.len(), 1, "TiDB's key was evicted: {candidates:?}");
    assert!(streamhelper::is_our_owner_id(candidates[0].1.as_bytes()));

    // TiDB re-campaigns behind us; the owner resigns on request and TiDB leads.
    let put = Txn::new().and_then([TxnOp::put(tidb_key.clone(), TIDB_ID.as_bytes().to_vec(), tidb_lease)]);
    f.client.txn(put).unwrap();
    let addr = daemon.status_addr().unwrap();
    assert_eq!(http_get(addr, "/owner/resign").unwrap().0, 405, "resigning takes a POST");
    let (code, body) = http_request(addr, "POST", "/owner/resign").unwrap();
    assert_eq!((code, body.contains("\"resigned\":true")), (200, true), "{body}");
    wait_until("the daemon to stand by", || !daemon.is_owner());
    wait_until("TiDB to lead and us to queue behind it", || {
        let c = f.candidates();
        c.len() == 2 && c[0].0 == tidb_key
    });
    assert!(!daemon.is_owner(), "take-over is off after a resignation");
    let (code, body) = http_request(addr, "POST", "/owner/resign").unwrap();
    assert_eq!(code, 409, "a standby has nothing to resign: {body}");
    daemon.stop();
}

#[test]
fn advancer_command_takes_over_only_with_the_flag() {
    let f = Fixture::new();
    let (tidb_key, _) = f.tidb_campaigns();
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamhelper"))
        .args(["advancer", "-u", &f.sim.pd_endpoint(), "--etcd", &f.etcd.endpoint(), "--take-over"])
        .args(["--owner-ttl", "2s", "--backoff-time", "200ms", "--tick-interval", "200ms"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the advancer command to lead", || {
        let c = f.candidates();
        c.len() == 1 && c[0].0 != tidb_key && streamhelper::is_our_owner_id(c[0].1.as_bytes())
    });
    // SIGTERM: it resigns and exits 0.
    let pid = child.id() as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + support::DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the advancer did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert!(f.candidates().is_empty(), "it resigned on exit");
}
