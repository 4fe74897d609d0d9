//! The `streamhelper task` commands as a user runs them, against a real etcd and the sim's
//! PD (service GC safe points with PD's semantics).

use std::process::{Command, Output};

use protobuf::Message;
use streamhelper::etcd::{EtcdClient, EtcdProcess};
use streamhelper::meta::keys;
use streamhelper::proto::brpb::StreamBackupError;
use streamhelper::sim::{SimCluster, SimConfig};

fn run(args: &[&str]) -> Output {
    // A POSIX zone without tzdata: BR prints local dates, the goldens pin +0800.
    Command::new(env!("CARGO_BIN_EXE_streamhelper"))
        .args(args)
        .env("RUST_LOG", "error")
        .env("TZ", "CST-8")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

struct Cluster {
    etcd: EtcdProcess,
    sim: SimCluster,
}

impl Cluster {
    fn start() -> Cluster {
        let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
        Cluster { etcd, sim: SimCluster::start(SimConfig::default()).unwrap() }
    }

    /// `streamhelper task VERB ARGS... --pd PD --etcd ETCD`: flags after the verb, as BR.
    fn task(&self, verb_and_args: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["task"].iter().chain(verb_and_args).map(|s| s.to_string()).collect();
        args.extend(["-u".into(), self.sim.pd_endpoint(), "--etcd".into(), self.etcd.endpoint()]);
        args
    }

    fn ok(&self, verb_and_args: &[&str]) -> String {
        ok(&self.task(verb_and_args).iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn fails(&self, verb_and_args: &[&str]) -> String {
        fails(&self.task(verb_and_args).iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn safe_point(&self, service: &str) -> Option<u64> {
        self.sim.gc_safe_points().into_iter().find(|(id, _)| id == service).map(|(_, ts)| ts)
    }
}

#[test]
fn task_commands_round_trip() {
    let c = Cluster::start();
    // `task status` reads the storage: it must be one on this machine (here, a dead port).
    let dead_s3 = format!(
        "s3://bucket/logs?endpoint=http://127.0.0.1:{}&force-path-style=true",
        streamhelper::testing::free_port().unwrap()
    );
    let added =
        c.ok(&["add", "t1", "--storage", &dead_s3, "--start-ts", "2026-05-11 01:42:23+0800", "--range", "t\\x80", "u"]);
    assert!(added.contains("task t1 added") && added.contains("2026-05-10T17:42:23Z"), "{added}");
    assert!(c.fails(&["add", "t2", "--storage", "noop://"]).contains("one log backup task per cluster"));
    c.ok(&["add", "--task-name", "t2", "--storage", "noop://", "--allow-multiple"]);
    assert!(c.fails(&["add", "t1", "--storage", "noop://"]).contains("exists"));
    assert!(c.fails(&["add", "bad-name", "--storage", "noop://"]).contains("bad-name"));
    assert!(c.fails(&["add", "t3", "--storage", "ftp://x"]).contains("ftp://x"));
    assert!(c.fails(&["add", "t3", "--storage", "noop://", "--start-ts", "yesterday"]).contains("yesterday"));

    let listed: serde_json::Value = serde_json::from_str(&c.ok(&["list", "--json"])).unwrap();
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["t1", "t2"]);
    assert_eq!(listed[0]["start_ts"].as_u64().unwrap() >> 18, 1_778_434_943_000);
    assert!(c.ok(&["list"]).lines().next().unwrap().starts_with("NAME"));

    c.ok(&["pause", "t1", "--reason", "maintenance window"]);
    let status = c.ok(&["status", "--task-name", "t1"]);
    assert!(status.starts_with("● Total 1 Tasks.\n> #1 <\n"), "{status}");
    for line in [
        "name: t1",
        "status: ● PAUSE",
        "start: 2026-05-11 01:42:23 +0800",
        "storage: s3://bucket/logs",
        "checkpoint[global]: 2026-05-11 01:42:23 +0800; gap=",
        "checkpoint[storage]: external storage s3://bucket/logs at http://127.0.0.1:",
        "pause-payload: maintenance window",
    ] {
        assert!(status.lines().any(|l| l.trim_start().starts_with(line)), "missing {line:?} in\n{status}");
    }
    let all = c.ok(&["status"]);
    assert!(all.starts_with("● Total 2 Tasks.\n> #1 <\n") && all.contains("name: t2"), "{all}");
    let json: serde_json::Value = serde_json::from_str(&c.ok(&["status", "--json"])).unwrap();
    assert_eq!(json[0]["status"], "PAUSE");
    assert_eq!(json[1]["status"], "NORMAL");
    assert_eq!(json[0]["storage"], "s3://bucket/logs");
    assert!(json[0]["storage_checkpoint"].is_null() && json[0]["storage_checkpoint_note"].is_string(), "{json}");

    c.ok(&["resume", "t1"]);
    c.ok(&["delete", "t1"]);

    // A storage holding a copy: shown next to etcd's checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let local = format!("local://{}", dir.path().display());
    c.ok(&["add", "t3", "--storage", &local, "--allow-multiple"]);
    let status: serde_json::Value = serde_json::from_str(&c.ok(&["status", "t3", "--json"])).unwrap();
    assert_eq!(status[0]["storage_checkpoint_note"], "not written yet");
    let storage = streamhelper::storage::LocalStorage::new(dir.path().to_str().unwrap()).unwrap();
    streamhelper::storage::write_global_checkpoint(
        &storage,
        449_462_874_931_200_001,
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let status = c.ok(&["status", "t3"]);
    assert!(status.contains("checkpoint[storage]: 2024-05-01 20:00:00 +0800; gap="), "{status}");
    assert!(c.fails(&["add", "t4", "--storage", "s3://b/p?colour=red"]).contains("unknown S3 option"));
    assert!(c.fails(&["status", "t1"]).contains("task t1 not found"));
    assert!(c.fails(&["pause", "nope"]).contains("task nope not found"));
    assert!(ok(&["task", "list", "--json", "--etcd", &c.etcd.endpoint()]).contains("t2"), "--etcd alone reads");
}

#[test]
fn pause_resume_delete_follow_brs_gc_protocol() {
    let c = Cluster::start();
    let start = c.sim.now_ts();
    c.ok(&["start", "t1", "--storage", "noop://", "--start-ts", &start.to_string()]);
    let br_start: Vec<(String, u64)> =
        c.sim.gc_safe_points().into_iter().filter(|(id, _)| id.starts_with("br-")).collect();
    assert_eq!(br_start.len(), 1, "BR's start safe point br-<uuid>: {br_start:?}");
    assert_eq!(br_start[0].1, start - 1);

    // The advancer would have moved the checkpoint; the pause holds GC right there.
    let checkpoint = start + (1 << 18);
    let meta = EtcdClient::connect_plain([c.etcd.endpoint()]).unwrap();
    meta.put(keys::global_checkpoint_of("t1"), keys::encode_u64(checkpoint), 0).unwrap();
    assert!(c.fails(&["resume", "t1"]).contains("not paused"));
    c.ok(&["pause", "t1", "--gc-ttl", "1.5h"]);
    assert_eq!(c.safe_point("t1_pause_safepoint"), Some(checkpoint - 1));
    assert!(c.fails(&["pause", "t1"]).contains("paused already"));

    // A store error while paused: status says ERROR; resume clears it.
    let mut error = StreamBackupError::new();
    error.set_error_code("KV:LogBackup:Io".into());
    error.set_error_message("disk full".into());
    error.set_store_id(2);
    let error_key = format!("{}2", keys::last_error_prefix_of("t1"));
    meta.put(error_key.clone(), error.write_to_bytes().unwrap(), 0).unwrap();
    let status = c.ok(&["status", "t1"]);
    assert!(status.contains("status: ○ ERROR") && status.contains("error-message[store=2]: disk full"), "{status}");

    // GC went past the checkpoint: the logs cannot be produced; resume refuses.
    c.sim.set_gc_safe_point(checkpoint);
    let refused = c.fails(&["resume", "t1"]);
    assert!(refused.contains("garbage-collected") && refused.contains(&checkpoint.to_string()), "{refused}");
    c.sim.set_gc_safe_point(checkpoint - 10);
    c.ok(&["resume", "t1"]);
    assert!(meta.get(error_key).unwrap().is_none(), "resume cleans the stores' last errors");
    assert!(meta.get(keys::pause_of("t1")).unwrap().is_none());
    assert_eq!(c.safe_point("t1_pause_safepoint"), Some(checkpoint - 1), "re-set, shorter, as BR does");

    // Paused again, then deleted: the pause safe point goes with it (tidb#52082).
    c.ok(&["pause", "t1"]);
    c.ok(&["stop", "t1"]);
    assert_eq!(c.safe_point("t1_pause_safepoint"), None);

    // A pause safe point written by BR (same id) is removed by our delete too.
    c.ok(&["add", "t9", "--storage", "noop://"]);
    let pd = streamhelper::cluster::PdClient::connect(
        streamhelper::cluster::PdConfig::new(vec![c.sim.pd_endpoint()]),
        streamhelper::Security::insecure(),
    )
    .unwrap();
    pd.update_service_safe_point("t9_pause_safepoint", 86_400, checkpoint).unwrap();
    c.ok(&["delete", "t9"]);
    assert_eq!(c.safe_point("t9_pause_safepoint"), None);
    assert!(fails(&["task", "pause", "t9", "--etcd", &c.etcd.endpoint()]).contains("not found"));
}

/// What a careless or hostile writer can store in etcd never reaches the terminal raw: no
/// escape sequence, no extra line, no password.
#[test]
fn values_from_etcd_are_printed_escaped_and_without_credentials() {
    use protobuf::Message;
    use streamhelper::meta::{keys, parse_storage_url, MetaDataClient, TaskInfo};

    let c = Cluster::start();
    c.ok(&["add", "t1", "--storage", "hdfs://backup:s3cret@namenode:8020/logs"]);
    c.ok(&["pause", "t1", "--reason", "\u{1b}[2J\nFORGED: line"]);
    // A name BR would refuse, written behind the CLI's back.
    let client = MetaDataClient::new(streamhelper::etcd::EtcdClient::connect_plain([c.etcd.endpoint()]).unwrap());
    let mut info = TaskInfo::new("t1").to_storage(parse_storage_url("noop://").unwrap()).info;
    info.set_name("x\u{1b}]0;owned\u{7}".into());
    client.etcd().put(keys::task_of(info.get_name()), info.write_to_bytes().unwrap(), 0).unwrap();

    for out in [c.ok(&["status", "t1"]), c.ok(&["list"]), c.ok(&["status", "t1", "--json"])] {
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(!out.contains("s3cret") && out.contains("namenode:8020"), "{out}");
        assert!(!out.lines().any(|l| l.trim_start().starts_with("FORGED")), "{out}");
    }
    assert!(c.ok(&["status", "t1"]).contains("\\u{1b}[2J\\nFORGED: line"));
    assert!(c.ok(&["list"]).contains("x\\u{1b}]0;owned\\u{7}"));
}

#[test]
fn bad_endpoints_and_flags_are_named() {
    let dead = format!("127.0.0.1:{}", streamhelper::testing::free_port().unwrap());
    assert!(fails(&["task", "--pd", &dead, "list"]).contains(&dead));
    assert!(fails(&["task", "list", "-u", "no-port"]).contains("no-port"));
    assert!(fails(&["task", "list"]).contains("--pd"));
    assert!(fails(&["task", "--pd", "127.0.0.1:1", "--ca", "/missing/ca.pem", "list"]).contains("/missing/ca.pem"));
    assert!(fails(&["advancer", "--pd", "127.0.0.1:1", "--tick-interval", "soon"]).contains("tick-interval"));
    assert!(fails(&["advancer", "--pd", "127.0.0.1:1", "--config", "/missing.toml"]).contains("/missing.toml"));
    assert!(fails(&["advancer"]).contains("--pd"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("advancer.toml");
    std::fs::write(&config, "pd = \"127.0.0.1:1\"\n\n[advancer]\ntick-intervall = \"1s\"\n").unwrap();
    let err = fails(&["advancer", "--config", config.to_str().unwrap()]);
    assert!(err.contains(&format!("{}:4: tick-intervall: unknown key", config.display())), "{err}");
    let help = ok(&["task", "add", "--help"]);
    assert!(help.contains("lock file") && help.contains("schema snapshot"), "{help}");
}
