//! The metadata layer on a real etcd: exact keys and bytes, the seed's operations, the
//! monotonic checkpoint upload, and the task event stream under restarts and compaction.

mod support;

use std::time::Duration;

use crossbeam_channel::Receiver;
use protobuf::Message;
use streamhelper::etcd::{EtcdClient, EtcdProcess, Leadership};
use streamhelper::meta::{
    keys, parse_storage_url, AdvancerExt, CheckpointType, Fence, MetaDataClient, PausePayload, PauseState, PauseV2,
    Severity, TaskEvent, TaskInfo, UploadOutcome,
};
use streamhelper::proto::brpb::StreamBackupError;
use streamhelper::{Error, KeyRange};
use support::{TcpProxy, DEADLINE};

fn start() -> (EtcdProcess, MetaDataClient) {
    let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
    let client = EtcdClient::connect_plain([etcd.endpoint()]).unwrap();
    (etcd, MetaDataClient::new(client))
}

fn task(name: &str, start_ts: u64) -> TaskInfo {
    TaskInfo::new(name)
        .from_ts(start_ts)
        .to_storage(parse_storage_url("noop://").unwrap())
        .with_table_filter(["*.*"])
        .with_range("a", "c")
        .with_range(b"t\x00\xff/x".to_vec(), Vec::new())
        .check()
        .unwrap()
}

/// `StreamBackupTaskInfo{storage: {noop: {}}, start_ts: 42, name: "t1", table_filter: ["*.*"]}`
/// encoded by hand, field by field, the way BR's Go protobuf writes it.
const BR_TASK_BYTES: &[u8] = &[
    0x0a, 0x02, 0x0a, 0x00, // 1: storage { 1: noop {} }
    0x10, 0x2a, // 2: start_ts = 42
    0x22, 0x02, b't', b'1', // 4: name = "t1"
    0x2a, 0x03, b'*', b'.', b'*', // 5: table_filter = "*.*"
];

fn raw(client: &MetaDataClient, key: impl Into<Vec<u8>>) -> Option<Vec<u8>> {
    client.etcd().get(key).unwrap().map(|kv| kv.get_value().to_vec())
}

#[test]
fn keys_and_values_are_byte_for_byte_brs() {
    let (_etcd, client) = start();
    let t1 =
        TaskInfo::new("t1").from_ts(42).to_storage(parse_storage_url("noop://").unwrap()).with_table_filter(["*.*"]);
    client.put_task(&t1.with_range("a", "c").with_range(b"t\x00\xff/x".to_vec(), Vec::new()).pausing(true)).unwrap();

    assert_eq!(raw(&client, "/tidb/br-stream/info/t1").unwrap(), BR_TASK_BYTES);
    assert_eq!(raw(&client, "/tidb/br-stream/ranges/t1/a").unwrap(), b"c");
    assert_eq!(raw(&client, b"/tidb/br-stream/ranges/t1/t\x00\xff/x".to_vec()).unwrap(), b"");
    assert_eq!(raw(&client, "/tidb/br-stream/pause/t1").unwrap(), b"", "PutTask writes the legacy empty pause");

    // Bytes written by a newer BR, with a field we do not know, still decode and round-trip.
    let mut newer = BR_TASK_BYTES.to_vec();
    newer[9] = b'2';
    newer.extend_from_slice(&[0xa0, 0x06, 0x01]); // field 100 = 1
    client.etcd().put("/tidb/br-stream/info/t2", newer.clone(), 0).unwrap();
    let t2 = client.get_task("t2").unwrap();
    assert_eq!((t2.name(), t2.info.get_start_ts()), ("t2", 42));
    assert_eq!(t2.info.write_to_bytes().unwrap(), newer, "unknown fields survive a rewrite");

    client.etcd().put(keys::global_checkpoint_of("t1"), 0x0102u64.to_be_bytes().to_vec(), 0).unwrap();
    let ext = AdvancerExt::new(client.clone());
    assert_eq!(ext.get_global_checkpoint("t1").unwrap(), 0x0102);
    assert_eq!(ext.upload_global_checkpoint("t1", 0x0103, &Fence::default()).unwrap(), UploadOutcome::Written);
    assert_eq!(raw(&client, "/tidb/br-stream/checkpoint/t1/central_global").unwrap(), vec![0, 0, 0, 0, 0, 0, 1, 3]);
}

#[test]
fn seed_operations_end_to_end() {
    let (_etcd, client) = start();
    client.put_task(&task("t1", 100)).unwrap();
    client.put_task(&task("t10", 200)).unwrap();
    assert_eq!(client.get_task_count().unwrap(), 2);
    let (all, errors, revision) = client.get_all_tasks_with_revision().unwrap();
    assert!(errors.is_empty() && revision > 0);
    assert_eq!(all.iter().map(|t| t.name()).collect::<Vec<_>>(), ["t1", "t10"]);

    let t1 = client.get_task("t1").unwrap();
    assert_eq!(t1.ranges().unwrap(), vec![KeyRange::new("a", "c"), KeyRange::new(b"t\x00\xff/x".to_vec(), Vec::new())]);
    assert!(!t1.is_paused().unwrap());
    assert!(matches!(client.get_task("nope"), Err(Error::TaskNotFound(name)) if name == "nope"));

    t1.pause(&PauseV2::now(Severity::Manual).with_message("maintenance window")).unwrap();
    let (_, paused) = client.get_task_with_pause_status("t1").unwrap();
    assert!(paused);
    match t1.pause_state().unwrap() {
        Some(PauseState::V2(v2)) => {
            assert_eq!(v2.severity, Severity::Manual);
            assert_eq!(v2.operation_pid, i64::from(std::process::id()));
            assert_eq!(v2.payload().unwrap(), PausePayload::Text("maintenance window".into()));
        }
        other => panic!("expected a PauseV2 record, got {other:?}"),
    }
    t1.resume().unwrap();
    assert!(!t1.is_paused().unwrap());

    // TiKV's side effects: store checkpoints, storage checkpoints and last errors.
    let etcd = client.etcd();
    etcd.put(format!("{}store/1", keys::checkpoints_of("t1")), keys::encode_u64(150), 0).unwrap();
    etcd.put(format!("{}store/2", keys::checkpoints_of("t1")), keys::encode_u64(130), 0).unwrap();
    etcd.put(format!("{}/1", keys::storage_checkpoint_of("t1")), keys::encode_u64(120), 0).unwrap();
    etcd.put(format!("{}/1", keys::storage_checkpoint_of("t10")), keys::encode_u64(999), 0).unwrap();
    assert_eq!(t1.get_storage_checkpoint().unwrap(), 120, "t10's storage checkpoint must not leak into t1");
    assert_eq!(t1.get_global_checkpoint_ts().unwrap(), 130, "min over stores when there is no central_global");
    let list = t1.next_backup_ts_list().unwrap();
    assert_eq!(list.iter().map(|c| c.checkpoint_type()).collect::<Vec<_>>(), [CheckpointType::Store; 2]);
    t1.upload_global_checkpoint(140).unwrap();
    assert_eq!(t1.get_global_checkpoint_ts().unwrap(), 140, "central_global wins");

    let mut err = StreamBackupError::new();
    err.set_store_id(1);
    err.set_error_code("KV:LogBackup:RaftStore".into());
    etcd.put(format!("{}1", keys::last_error_prefix_of("t1")), err.write_to_bytes().unwrap(), 0).unwrap();
    assert_eq!(t1.last_error().unwrap().get(&1).unwrap().get_error_code(), "KV:LogBackup:RaftStore");
    client.clean_last_error_of_task("t1").unwrap();
    assert!(t1.last_error().unwrap().is_empty());

    client.delete_task("t1").unwrap();
    let (left, _) = etcd.scan_prefix(b"/tidb/br-stream/", 100).unwrap();
    let left: Vec<String> = left.iter().map(|kv| String::from_utf8_lossy(kv.get_key()).into_owned()).collect();
    assert!(left.iter().all(|k| !k.contains("/t1/") && !k.ends_with("/t1")), "every key of t1 is gone: {left:?}");
    assert!(left.contains(&"/tidb/br-stream/storage-checkpoint/t10/1".to_string()), "t10 is untouched: {left:?}");
    assert_eq!(client.get_all_tasks().unwrap().len(), 1);
}

#[test]
fn global_checkpoint_upload_never_lowers_and_respects_the_fence() {
    let (_etcd, client) = start();
    let ext = AdvancerExt::new(client.clone());
    assert_eq!(ext.get_global_checkpoint("t").unwrap(), 0);
    let none = Fence::default();
    assert_eq!(ext.upload_global_checkpoint("t", 100, &none).unwrap(), UploadOutcome::Written);
    assert_eq!(ext.upload_global_checkpoint("t", 50, &none).unwrap(), UploadOutcome::KeptHigher { stored: 100 });
    assert_eq!(ext.upload_global_checkpoint("t", 100, &none).unwrap(), UploadOutcome::Written, "equal = heartbeat");
    assert_eq!(ext.upload_global_checkpoint("t", 1 << 40, &none).unwrap(), UploadOutcome::Written);
    assert_eq!(ext.get_global_checkpoint("t").unwrap(), 1 << 40, "byte order compares like numbers");

    let created = client.etcd().put("/owner/me", "x", 0).unwrap();
    let term = |create_revision| Fence {
        owner: Some(Leadership { key: b"/owner/me".to_vec(), create_revision, lease: 0 }),
        incarnation: None,
    };
    let (holds, broken) = (term(created), term(created - 1));
    assert_eq!(ext.upload_global_checkpoint("t", (1 << 40) + 1, &broken).unwrap(), UploadOutcome::Fenced);
    assert_eq!(ext.get_global_checkpoint("t").unwrap(), 1 << 40);
    assert_eq!(ext.upload_global_checkpoint("t", (1 << 40) + 1, &holds).unwrap(), UploadOutcome::Written);
    assert_eq!(
        ext.upload_global_checkpoint("t", 7, &holds).unwrap(),
        UploadOutcome::KeptHigher { stored: (1 << 40) + 1 }
    );

    client.etcd().put(keys::global_checkpoint_of("bad"), "garbage!!", 0).unwrap();
    let err = ext.get_global_checkpoint("bad").unwrap_err().to_string();
    assert!(err.contains("task bad") && err.contains("central_global"), "{err}");
    ext.clear_global_checkpoint("t").unwrap();
    assert_eq!(ext.get_global_checkpoint("t").unwrap(), 0);
}

/// The next `n` events, as short strings, failing after the deadline.
fn next_events(events: &Receiver<TaskEvent>, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let event = events.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("event {i} of {n} did not arrive"));
            match event {
                TaskEvent::Add { info, ranges, paused, .. } => {
                    format!(
                        "Add({},{},{}{})",
                        info.get_name(),
                        info.get_start_ts(),
                        ranges.len(),
                        if paused { ",paused" } else { "" }
                    )
                }
                TaskEvent::Err { name, error } => format!("Err({})={error}", name.unwrap_or_default()),
                other => other.to_string(),
            }
        })
        .collect()
}

fn assert_quiet(events: &Receiver<TaskEvent>) {
    if let Ok(extra) = events.recv_timeout(Duration::from_millis(300)) {
        panic!("unexpected event {extra}");
    }
}

#[test]
fn task_events_follow_every_change_in_order() {
    let (_etcd, client) = start();
    client.put_task(&task("t1", 1)).unwrap();
    client.put_task(&task("t2", 2).pausing(true)).unwrap();
    let (tx, events) = crossbeam_channel::bounded(64);
    let _watcher = AdvancerExt::new(client.clone()).begin(tx, Duration::from_millis(100)).unwrap();
    assert_eq!(next_events(&events, 2), ["Add(t1,1,2)", "Add(t2,2,2,paused)"], "Begin lists pause state too");

    client.put_task(&task("t3", 3)).unwrap();
    client.pause_task("t1", &PauseV2::now(Severity::Error).with_message("lag")).unwrap();
    client.resume_task("t1").unwrap();
    client.delete_task("t2").unwrap();
    assert_eq!(next_events(&events, 4), ["Add(t3,3,2)", "Pause(t1)", "Resume(t1)", "Del(t2)"]);

    // Garbage: one task's info, a pause value we cannot read. Other tasks carry on.
    client.etcd().put(keys::task_of("t4"), b"\xff\xff not protobuf".to_vec(), 0).unwrap();
    client.etcd().put(keys::pause_of("t3"), b"{not json".to_vec(), 0).unwrap();
    client.put_task(&task("t5", 5)).unwrap();
    let got = next_events(&events, 3);
    assert!(got[0].starts_with("Err(t4)=task t4: bad value at etcd key /tidb/br-stream/info/t4"), "{got:?}");
    assert_eq!(got[1..], ["Pause(t3)", "Add(t5,5,2)"], "an unreadable pause value is still a pause");

    client.etcd().put(b"/tidb/br-stream/ranges/t6/z".to_vec(), b"a".to_vec(), 0).unwrap();
    client.etcd().put(keys::task_of("t6"), task("t6", 6).info.write_to_bytes().unwrap(), 0).unwrap();
    let got = next_events(&events, 1);
    assert!(
        got[0].contains("Err(t6)") && got[0].contains("ranges/t6/z") && got[0].contains("ends before it starts"),
        "{got:?}"
    );

    // A task without ranges is bad metadata, not an empty frontier.
    client.etcd().put(keys::task_of("t7"), task("t7", 7).info.write_to_bytes().unwrap(), 0).unwrap();
    let got = next_events(&events, 1);
    assert!(got[0].contains("Err(t7)") && got[0].contains("no key ranges"), "{got:?}");
    assert_quiet(&events);
}

#[test]
fn task_events_survive_an_etcd_restart() {
    let (mut etcd, client) = start();
    client.put_task(&task("t1", 1)).unwrap();
    let (tx, events) = crossbeam_channel::bounded(64);
    let _watcher = AdvancerExt::new(client.clone()).begin(tx, Duration::from_millis(100)).unwrap();
    assert_eq!(next_events(&events, 1), ["Add(t1,1,2)"]);
    etcd.kill();
    etcd.restart().unwrap();
    support::wait_until("etcd back", || client.put_task(&task("t2", 2)).is_ok());
    client.delete_task("t1").unwrap();
    assert_eq!(next_events(&events, 2), ["Add(t2,2,2)", "Del(t1)"]);
    assert_quiet(&events);
}

#[test]
fn a_compacted_watch_relists_and_reports_only_what_changed() {
    let (etcd, direct) = start();
    let proxy = TcpProxy::start(&etcd.endpoint());
    let proxied = MetaDataClient::new(EtcdClient::connect_plain([proxy.endpoint()]).unwrap());
    for (name, ts) in [("keep", 1), ("gone", 2), ("flip", 3), ("redefined", 4), ("reborn", 7)] {
        direct.put_task(&task(name, ts)).unwrap();
    }
    let (tx, events) = crossbeam_channel::bounded(64);
    let _watcher = AdvancerExt::new(proxied).begin(tx, Duration::from_millis(100)).unwrap();
    assert_eq!(next_events(&events, 5).len(), 5);

    // Partition the watcher away, change things and compact the history it would need.
    proxy.cut();
    direct.delete_task("gone").unwrap();
    direct.pause_task("flip", &PauseV2::now(Severity::Manual)).unwrap();
    direct.put_task(&task("redefined", 40)).unwrap();
    direct.put_task(&task("new", 5)).unwrap();
    // Same name, same bytes, a new incarnation: its old checkpoint and frontier are not its.
    direct.delete_task("reborn").unwrap();
    direct.put_task(&task("reborn", 7)).unwrap();
    // Replaying history would report these; a re-list sees no difference.
    direct.put_task(&task("keep", 1)).unwrap();
    direct.put_task(&task("temp", 6)).unwrap();
    direct.delete_task("temp").unwrap();
    let revision = direct.etcd().put("/unrelated", "x", 0).unwrap();
    direct.etcd().compact(revision).unwrap();
    proxy.heal();

    let mut got = next_events(&events, 5);
    got.sort();
    assert_eq!(
        got,
        ["Add(new,5,2)", "Add(reborn,7,2)", "Add(redefined,40,2)", "Del(gone)", "Pause(flip)"],
        "nothing for the unchanged task, a re-created one is new"
    );
    assert_quiet(&events);
    // Still following after the re-list.
    direct.resume_task("flip").unwrap();
    assert_eq!(next_events(&events, 1), ["Resume(flip)"]);
}
