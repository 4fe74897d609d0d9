//! The `streamhelper task` commands as a user runs them, against a real etcd.

use std::process::{Command, Output};

use streamhelper::etcd::EtcdProcess;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_streamhelper")).args(args).env("RUST_LOG", "error").output().unwrap()
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

#[test]
fn task_commands_round_trip() {
    let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
    let pd = etcd.endpoint();
    // `task status` reads the storage: it must be one on this machine (here, a dead port).
    let dead_s3 = format!(
        "s3://bucket/logs?endpoint=http://127.0.0.1:{}&force-path-style=true",
        streamhelper::etcd::process::free_port().unwrap()
    );
    let base = ["task", "--pd", pd.as_str()];
    let with = |more: &[&str]| -> Vec<String> { base.iter().chain(more).map(|s| s.to_string()).collect() };
    let ok_with = |more: &[&str]| ok(&with(more).iter().map(String::as_str).collect::<Vec<_>>());
    let fails_with = |more: &[&str]| fails(&with(more).iter().map(String::as_str).collect::<Vec<_>>());

    let added =
        ok_with(&["add", "t1", "--storage", &dead_s3, "--start-ts", "2024-05-01T12:00:00Z", "--range", "t\\x80", "u"]);
    assert!(added.contains("task t1 added") && added.contains("2024-05-01T12:00:00Z"), "{added}");
    ok_with(&["add", "t2", "--storage", "noop://"]);
    assert!(fails_with(&["add", "t1", "--storage", "noop://"]).contains("exists"));
    assert!(fails_with(&["add", "bad-name", "--storage", "noop://"]).contains("bad-name"));
    assert!(fails_with(&["add", "t3", "--storage", "ftp://x"]).contains("ftp://x"));
    assert!(fails_with(&["add", "t3", "--storage", "noop://", "--start-ts", "yesterday"]).contains("yesterday"));

    let listed: serde_json::Value = serde_json::from_str(&ok_with(&["list", "--json"])).unwrap();
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["t1", "t2"]);
    assert_eq!(listed[0]["start_ts"].as_u64().unwrap() >> 18, 1_714_564_800_000);
    assert!(ok_with(&["list"]).lines().next().unwrap().starts_with("NAME"));

    ok_with(&["pause", "t1", "--reason", "maintenance window"]);
    let status = ok_with(&["status", "t1"]);
    assert!(status.contains("paused (MANUAL)") && status.contains("maintenance window"), "{status}");
    assert!(status.contains("[t\\x80, u)") && status.contains("s3://bucket/logs"), "{status}");
    let in_storage = status.lines().find(|l| l.starts_with("in storage:")).unwrap_or_default();
    assert!(in_storage.contains("external storage s3://bucket/logs at http://127.0.0.1:"), "{status}");
    ok_with(&["resume", "t1"]);
    let status: serde_json::Value = serde_json::from_str(&ok_with(&["status", "t1", "--json"])).unwrap();
    assert_eq!(status["paused"], false);
    assert!(status["storage_checkpoint"].is_null() && status["storage_checkpoint_note"].is_string(), "{status}");
    ok_with(&["delete", "t1"]);

    // A storage holding a copy: shown next to etcd's checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let local = format!("local://{}", dir.path().display());
    ok_with(&["add", "t3", "--storage", &local]);
    let status: serde_json::Value = serde_json::from_str(&ok_with(&["status", "t3", "--json"])).unwrap();
    assert_eq!(status["storage_checkpoint_note"], "not written yet");
    let storage = streamhelper::storage::LocalStorage::new(dir.path().to_str().unwrap()).unwrap();
    streamhelper::storage::write_global_checkpoint(
        &storage,
        449_462_874_931_200_001,
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let status = ok_with(&["status", "t3"]);
    assert!(status.contains("in storage:   449462874931200001 (2024-05-01T12:00:00Z)"), "{status}");
    assert!(fails_with(&["add", "t4", "--storage", "s3://b/p?colour=red"]).contains("unknown S3 option"));
    assert!(fails_with(&["status", "t1"]).contains("task t1 not found"));
    assert!(fails_with(&["pause", "nope"]).contains("task nope not found"));
}

/// What a careless or hostile writer can store in etcd never reaches the terminal raw: no
/// escape sequence, no extra line, no password.
#[test]
fn values_from_etcd_are_printed_escaped_and_without_credentials() {
    use protobuf::Message;
    use streamhelper::meta::{keys, parse_storage_url, MetaDataClient, TaskInfo};

    let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
    let pd = etcd.endpoint();
    let task = |more: &[&str]| ok(&["task", "--pd", pd.as_str()].iter().chain(more).copied().collect::<Vec<_>>());
    task(&["add", "t1", "--storage", "hdfs://backup:s3cret@namenode:8020/logs"]);
    task(&["pause", "t1", "--reason", "\u{1b}[2J\nstate:        running"]);
    // A name BR would refuse, written behind the CLI's back.
    let client = MetaDataClient::new(streamhelper::etcd::EtcdClient::connect_plain([pd.clone()]).unwrap());
    let mut info = TaskInfo::new("t1").to_storage(parse_storage_url("noop://").unwrap()).info;
    info.set_name("x\u{1b}]0;owned\u{7}".into());
    client.etcd().put(keys::task_of(info.get_name()), info.write_to_bytes().unwrap(), 0).unwrap();

    for out in [task(&["status", "t1"]), task(&["list"]), task(&["status", "t1", "--json"])] {
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(!out.contains("s3cret") && out.contains("namenode:8020"), "{out}");
    }
    let status = task(&["status", "t1"]);
    assert_eq!(status.lines().filter(|l| l.starts_with("state:")).count(), 1, "{status}");
    assert!(status.contains("\\u{1b}[2J\\nstate:"), "{status}");
    assert!(task(&["list"]).contains("x\\u{1b}]0;owned\\u{7}"));
}

#[test]
fn bad_endpoints_and_flags_are_named() {
    let dead = format!("127.0.0.1:{}", streamhelper::etcd::process::free_port().unwrap());
    assert!(fails(&["task", "--pd", &dead, "list"]).contains(&dead));
    assert!(fails(&["task", "--pd", "no-port", "list"]).contains("no-port"));
    assert!(fails(&["task", "--pd", "127.0.0.1:1", "--ca", "/missing/ca.pem", "list"]).contains("/missing/ca.pem"));
    assert!(fails(&["advancer", "--pd", "127.0.0.1:1", "--tick-interval", "soon"]).contains("tick-interval"));
    assert!(fails(&["advancer", "--pd", "127.0.0.1:1", "--config", "/missing.toml"]).contains("/missing.toml"));
}
