//! The synchronous etcd client against a real etcd server (Debian `etcd-server`).

mod support;

use std::time::{Duration, Instant};

use streamhelper::etcd::{
    Cmp, CompareResult, Election, EtcdClient, EtcdConfig, EtcdProcess, EventKind, GetOptions, KeySpan, Txn, TxnOp,
    WatchBatch, WatchOptions, Watcher, WATCH_SILENT_INTERVALS,
};
use streamhelper::Error;
use streamhelper::{stop_pair, StopToken};
use support::{wait_until, TcpProxy, DEADLINE};

fn start_etcd() -> (EtcdProcess, EtcdClient) {
    let etcd = EtcdProcess::start().expect("a real etcd is needed for these tests");
    let client = EtcdClient::connect_plain([etcd.endpoint()]).unwrap();
    (etcd, client)
}

/// Reads watch events until `n` have arrived (or the deadline passes).
fn collect_events(watcher: &Watcher, n: usize) -> Vec<(EventKind, String, i64)> {
    let deadline = Instant::now() + DEADLINE;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let batch: WatchBatch = watcher
            .batches()
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("only {} of {n} events arrived: {out:?}", out.len()))
            .expect("watch error");
        for e in batch.events {
            out.push((e.kind, String::from_utf8(e.kv.get_key().to_vec()).unwrap(), e.kv.get_mod_revision()));
        }
    }
    out
}

fn keys(kvs: &[streamhelper::etcd::KeyValue]) -> Vec<String> {
    kvs.iter().map(|kv| String::from_utf8_lossy(kv.get_key()).into_owned()).collect()
}

#[test]
fn crud_and_prefix_semantics() {
    let (_etcd, client) = start_etcd();
    let first = client.put("/x/t1/a", "1", 0).unwrap();
    client.put("/x/t1/b", "2", 0).unwrap();
    client.put("/x/t10/a", "3", 0).unwrap();
    client.put("/x/t1", "bare", 0).unwrap();

    let subtree = client.range(KeySpan::prefix("/x/t1/"), &GetOptions::default()).unwrap();
    assert_eq!(keys(&subtree.kvs), ["/x/t1/a", "/x/t1/b"], "the /x/t1/ subtree must not include /x/t10");
    assert_eq!(client.get("/x/t1/a").unwrap().unwrap().get_value(), b"1");
    assert!(client.get("/x/none").unwrap().is_none());

    let limited = client.range(KeySpan::prefix("/x/"), &GetOptions { limit: 2, ..Default::default() }).unwrap();
    assert_eq!((limited.kvs.len(), limited.count, limited.more), (2, 4, true));
    let counted = client.range(KeySpan::prefix("/x/"), &GetOptions { count_only: true, ..Default::default() }).unwrap();
    assert!(counted.kvs.is_empty());
    assert_eq!(counted.count, 4);
    let keys_only =
        client.range(KeySpan::key("/x/t1/a"), &GetOptions { keys_only: true, ..Default::default() }).unwrap();
    assert!(keys_only.kvs[0].get_value().is_empty());

    client.put("/x/t1/a", "changed", 0).unwrap();
    let old = client.range(KeySpan::key("/x/t1/a"), &GetOptions { revision: first, ..Default::default() }).unwrap();
    assert_eq!(old.kvs[0].get_value(), b"1", "reading at an old revision sees the old value");

    let (all, revision) = client.scan_prefix(b"/x/", 1).unwrap();
    assert_eq!(keys(&all), ["/x/t1", "/x/t1/a", "/x/t1/b", "/x/t10/a"]);
    assert!(revision > first);

    assert_eq!(client.delete(KeySpan::prefix("/x/t1/")).unwrap(), 2);
    assert_eq!(keys(&client.range(KeySpan::prefix("/x/"), &GetOptions::default()).unwrap().kvs), ["/x/t1", "/x/t10/a"]);
}

#[test]
fn txn_compares_choose_the_branch() {
    let (_etcd, client) = start_etcd();
    let rev = client.put("k", "v1", 0).unwrap();
    let get_k = || TxnOp::get(KeySpan::key("k"), &GetOptions::default());

    let hit = client
        .txn(
            Txn::new()
                .when([Cmp::value("k", CompareResult::EQUAL, "v1")])
                .and_then([TxnOp::put("k", "v2", 0), get_k()]),
        )
        .unwrap();
    assert!(hit.succeeded);
    assert_eq!(hit.ranges[0].kvs[0].get_value(), b"v2");

    let miss = client
        .txn(
            Txn::new()
                .when([Cmp::value("k", CompareResult::EQUAL, "v1")])
                .and_then([TxnOp::put("k", "bad", 0)])
                .or_else([get_k()]),
        )
        .unwrap();
    assert!(!miss.succeeded);
    assert_eq!(miss.ranges[0].kvs[0].get_value(), b"v2");

    assert!(client.txn(Txn::new().when([Cmp::version("k", CompareResult::EQUAL, 2)])).unwrap().succeeded);
    assert!(client.txn(Txn::new().when([Cmp::create_revision("k", CompareResult::EQUAL, rev)])).unwrap().succeeded);
    assert!(!client.txn(Txn::new().when([Cmp::mod_revision("k", CompareResult::EQUAL, rev)])).unwrap().succeeded);
    assert!(client.txn(Txn::new().when([Cmp::absent("other")])).unwrap().succeeded);
    assert!(!client.txn(Txn::new().when([Cmp::absent("k")])).unwrap().succeeded);
    // Big-endian 8-byte values compare like the numbers they encode: the checkpoint upload relies on it.
    client.put("ts", 300u64.to_be_bytes().to_vec(), 0).unwrap();
    assert!(
        client
            .txn(Txn::new().when([Cmp::value("ts", CompareResult::LESS, 1000u64.to_be_bytes().to_vec())]))
            .unwrap()
            .succeeded
    );
    assert!(
        !client
            .txn(Txn::new().when([Cmp::value("ts", CompareResult::LESS, 200u64.to_be_bytes().to_vec())]))
            .unwrap()
            .succeeded
    );
}

#[test]
fn watch_delivers_history_from_a_revision() {
    let (_etcd, client) = start_etcd();
    let r1 = client.put("/w/a", "1", 0).unwrap();
    let r2 = client.put("/w/b", "2", 0).unwrap();
    let r3 = client.delete(KeySpan::key("/w/a")).map(|_| r2 + 1).unwrap();
    client.put("/other", "x", 0).unwrap();
    let watcher = client.watch(KeySpan::prefix("/w/"), WatchOptions { start_revision: r1, prev_kv: false }).unwrap();
    let events = collect_events(&watcher, 3);
    assert_eq!(
        events,
        vec![
            (EventKind::Put, "/w/a".to_string(), r1),
            (EventKind::Put, "/w/b".to_string(), r2),
            (EventKind::Delete, "/w/a".to_string(), r3)
        ]
    );
    let r4 = client.put("/w/c", "3", 0).unwrap();
    assert_eq!(collect_events(&watcher, 1), vec![(EventKind::Put, "/w/c".to_string(), r4)]);
}

#[test]
fn watch_survives_an_etcd_restart_without_loss_or_repeats() {
    let (mut etcd, client) = start_etcd();
    let base = client.put("/r/0", "base", 0).unwrap();
    let watcher =
        client.watch(KeySpan::prefix("/r/"), WatchOptions { start_revision: base + 1, prev_kv: false }).unwrap();
    let mut expected = Vec::new();
    for i in 1..=5 {
        expected.push(client.put(format!("/r/{i}"), "v", 0).unwrap());
    }
    let mut seen: Vec<i64> = collect_events(&watcher, 2).into_iter().map(|e| e.2).collect();
    etcd.kill();
    etcd.restart().unwrap();
    for i in 6..=10 {
        let mut attempts = 0;
        let rev = loop {
            match client.put(format!("/r/{i}"), "v", 0) {
                Ok(rev) => break rev,
                Err(e) => {
                    attempts += 1;
                    assert!(attempts < 50, "etcd did not come back: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        expected.push(rev);
    }
    while seen.len() < expected.len() {
        seen.extend(collect_events(&watcher, 1).into_iter().map(|e| e.2));
    }
    assert_eq!(seen, expected, "every event exactly once, in order");
    assert!(watcher.batches().recv_timeout(Duration::from_millis(300)).is_err(), "no repeats after the last event");
}

#[test]
fn watch_on_a_compacted_revision_is_a_typed_error() {
    let (_etcd, client) = start_etcd();
    let first = client.put("/c/a", "1", 0).unwrap();
    client.put("/c/a", "2", 0).unwrap();
    let last = client.put("/c/a", "3", 0).unwrap();
    client.compact(last).unwrap();
    let watcher = client.watch(KeySpan::prefix("/c/"), WatchOptions { start_revision: first, prev_kv: false }).unwrap();
    match watcher.batches().recv_timeout(DEADLINE).expect("an answer") {
        Err(Error::Compacted { compact_revision, requested, .. }) => {
            assert_eq!(compact_revision, last);
            assert_eq!(requested, first);
        }
        other => panic!("expected a compaction error, got {other:?}"),
    }
}

#[test]
fn lease_expiry_removes_keys_and_keep_alive_holds_them() {
    let (_etcd, client) = start_etcd();
    let ttl = Duration::from_secs(2);
    let short = client.grant_lease(ttl).unwrap();
    client.put("/l/short", "x", short).unwrap();
    let kept = client.grant_lease(ttl).unwrap();
    client.put("/l/kept", "x", kept).unwrap();
    let keeper = client.keep_alive(kept, ttl).unwrap();

    wait_until("the unrenewed key to expire", || client.get("/l/short").unwrap().is_none());
    std::thread::sleep(ttl);
    assert!(client.get("/l/kept").unwrap().is_some(), "a renewed lease keeps its key past the TTL");
    assert!(keeper.lost().try_recv().is_err());

    client.revoke_lease(kept).unwrap();
    assert!(client.get("/l/kept").unwrap().is_none());
    match keeper.lost().recv_timeout(DEADLINE) {
        Ok(Error::LeaseLost { lease_id, .. }) => assert_eq!(lease_id, kept),
        other => panic!("expected a lost-lease signal, got {other:?}"),
    }
}

#[test]
fn election_fails_over_when_the_leaders_lease_dies() {
    let (etcd, client_a) = start_etcd();
    let client_b = EtcdClient::connect_plain([etcd.endpoint()]).unwrap();
    let ttl = Duration::from_secs(2);
    let prefix = "/tidb/br-stream/owner";

    let lease_a = client_a.grant_lease(ttl).unwrap();
    let keeper_a = client_a.keep_alive(lease_a, ttl).unwrap();
    let election_a = Election::new(client_a.clone(), prefix);
    let leader_a = election_a.campaign(lease_a, b"advancer-a", &StopToken::never()).unwrap();
    assert_eq!(leader_a.key, format!("{prefix}/{lease_a:x}").into_bytes(), "owner keys are <prefix>/<lease hex>");
    assert_eq!(election_a.leader().unwrap().unwrap().get_value(), b"advancer-a");

    let lease_b = client_b.grant_lease(ttl).unwrap();
    let keeper_b = client_b.keep_alive(lease_b, ttl).unwrap();
    let (b_won_tx, b_won) = crossbeam_channel::bounded(1);
    let campaign_b = {
        let client_b = client_b.clone();
        std::thread::spawn(move || {
            let leadership = Election::new(client_b, prefix).campaign(lease_b, b"advancer-b", &StopToken::never());
            b_won_tx.send(leadership).unwrap();
        })
    };
    assert!(b_won.recv_timeout(Duration::from_secs(1)).is_err(), "B must wait while A leads");

    drop(keeper_a); // A stops renewing, as if its process froze.
    let leader_b = b_won.recv_timeout(DEADLINE).expect("B takes over").unwrap();
    campaign_b.join().unwrap();
    assert_eq!(election_a.leader().unwrap().unwrap().get_value(), b"advancer-b");
    assert!(!election_a.is_leader(&leader_a).unwrap());
    let fenced = client_a.txn(Txn::new().when([leader_a.fence()]).and_then([TxnOp::put("/fenced", "a", 0)])).unwrap();
    assert!(!fenced.succeeded, "a deposed owner's fenced write must not land");

    let watch =
        Election::new(client_b.clone(), prefix).watch_leadership(&leader_b, leader_b.create_revision + 1).unwrap();
    Election::new(client_b.clone(), prefix).resign(&leader_b).unwrap();
    assert_eq!(collect_events(&watch, 1)[0].0, EventKind::Delete, "resigning is observable as lost leadership");
    assert!(election_a.leader().unwrap().is_none());
    drop(keeper_b);
}

#[test]
fn campaign_stops_when_asked() {
    let (_etcd, client) = start_etcd();
    let ttl = Duration::from_secs(5);
    let lease_a = client.grant_lease(ttl).unwrap();
    let _keeper = client.keep_alive(lease_a, ttl).unwrap();
    let election = Election::new(client.clone(), "/owner");
    election.campaign(lease_a, b"a", &StopToken::never()).unwrap();
    let lease_b = client.grant_lease(ttl).unwrap();
    let (stop, token) = stop_pair();
    let waiting = std::thread::spawn(move || Election::new(client, "/owner").campaign(lease_b, b"b", &token));
    stop.stop();
    assert!(matches!(waiting.join().unwrap(), Err(Error::Stopped(_))));
}

#[test]
fn a_dead_endpoint_is_skipped_for_a_live_one() {
    let (etcd, _client) = start_etcd();
    let dead = format!("127.0.0.1:{}", streamhelper::testing::free_port().unwrap());
    let client = EtcdClient::connect_plain([dead.clone(), etcd.endpoint()]).unwrap();
    client.put("k", "v", 0).unwrap();
    assert_eq!(client.get("k").unwrap().unwrap().get_value(), b"v");

    let only_dead = EtcdClient::connect_plain([dead.clone()]).unwrap();
    let started = Instant::now();
    let err = only_dead.get("k").unwrap_err().to_string();
    assert!(err.contains(&dead), "the error names the endpoint: {err}");
    assert!(started.elapsed() < DEADLINE);
}

/// A client of `endpoints` whose watches ask for progress after `interval` of silence.
fn client_with_progress_interval(endpoints: Vec<String>, interval: Duration) -> EtcdClient {
    EtcdClient::new(EtcdConfig { watch_progress_interval: interval, ..EtcdConfig::new(endpoints) }).unwrap()
}

#[test]
fn a_watch_on_a_black_holed_member_is_reopened_on_the_next_one() {
    let (etcd, direct) = start_etcd();
    // One etcd behind two proxies: two endpoints, and a member can hang without the other.
    let proxies = [TcpProxy::start(&etcd.endpoint()), TcpProxy::start(&etcd.endpoint())];
    let interval = Duration::from_millis(200);
    let client = client_with_progress_interval(proxies.iter().map(TcpProxy::endpoint).collect(), interval);
    let base = direct.put("/h/base", "v", 0).unwrap();
    let watcher =
        client.watch(KeySpan::prefix("/h/"), WatchOptions { start_revision: base + 1, prev_kv: false }).unwrap();
    let before = direct.put("/h/before", "v", 0).unwrap();
    assert_eq!(collect_events(&watcher, 1), [(EventKind::Put, "/h/before".to_string(), before)], "through proxy 0");

    // Proxy 0 hangs with its connections open: no error reaches the client, only silence.
    proxies[0].black_hole();
    let during: Vec<i64> = (0..3).map(|i| direct.put(format!("/h/during/{i}"), "v", 0).unwrap()).collect();
    // Well below what the transport's own keepalive (10 s ping, 10 s timeout) would take.
    let bound = interval * WATCH_SILENT_INTERVALS + Duration::from_secs(3);
    let started = Instant::now();
    let mut seen = Vec::new();
    while seen.len() < during.len() {
        let left = bound.saturating_sub(started.elapsed());
        let batch = watcher.batches().recv_timeout(left).unwrap_or_else(|_| {
            panic!("the events put after the black hole did not arrive within {bound:?} (got {seen:?})")
        });
        seen.extend(batch.expect("no watch error").events.iter().map(|e| e.kv.get_mod_revision()));
    }
    assert_eq!(seen, during, "every event once, in order, none before them repeated");
    assert_eq!(watcher.silent_reopens(), 1, "reopened once, on proxy 1");
    let after = direct.put("/h/after", "v", 0).unwrap();
    assert_eq!(collect_events(&watcher, 1), [(EventKind::Put, "/h/after".to_string(), after)]);
    assert_eq!(watcher.silent_reopens(), 1, "the stream through proxy 1 stays");
}

#[test]
fn progress_requests_keep_an_idle_watch_open() {
    let (etcd, direct) = start_etcd();
    let proxy = TcpProxy::start(&etcd.endpoint());
    let interval = Duration::from_millis(100);
    let client = client_with_progress_interval(vec![proxy.endpoint()], interval);
    let base = direct.put("/i/base", "v", 0).unwrap();
    let watcher =
        client.watch(KeySpan::prefix("/i/"), WatchOptions { start_revision: base + 1, prev_kv: false }).unwrap();
    let first = direct.put("/i/first", "v", 0).unwrap();
    assert_eq!(collect_events(&watcher, 1), [(EventKind::Put, "/i/first".to_string(), first)]);
    // Idle for many times the silence that reopens a watch nobody answers.
    let idle = interval * WATCH_SILENT_INTERVALS * 6;
    assert!(watcher.batches().recv_timeout(idle).is_err(), "nothing happened, nothing is delivered");
    assert_eq!(watcher.silent_reopens(), 0, "the answers to progress requests count as life");
    let second = direct.put("/i/second", "v", 0).unwrap();
    assert_eq!(collect_events(&watcher, 1), [(EventKind::Put, "/i/second".to_string(), second)]);
}
