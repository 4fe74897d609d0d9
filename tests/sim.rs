//! The simulated cluster seen through the generated gRPC clients: its answers decoded as a
//! real client would, checked against its own table and oracle, and every control observed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use futures_util::{SinkExt, StreamExt};
use grpcio::{RpcStatusCode, WriteFlags};

use streamhelper::cluster::RegionWithLeader;
use streamhelper::codec::{decode_boundary, encode_bytes, encode_end_key};
use streamhelper::proto::logbackuppb::{FlushNowRequest, RegionCheckpoint, SubscribeFlushEventRequest};
use streamhelper::proto::logbackuppb_grpc::LogBackupClient;
use streamhelper::proto::pdpb::{
    BatchScanRegionsRequest, GetAllStoresRequest, GetGCSafePointRequest, GetMembersRequest, GetRegionByIDRequest,
    GetRegionRequest, GetStoreRequest, KeyRange as PdKeyRange, ScanRegionsRequest, TsoRequest,
    UpdateServiceGCSafePointRequest,
};
use streamhelper::proto::pdpb_grpc::PdClient;
use streamhelper::sim::{record_key, SimCluster, SimConfig};
use streamhelper::testing::{
    call_option, header, last_flush_ts, log_backup_client, pd_client, scan_regions, wait_until,
};
use streamhelper::ts::compose_ts;
use streamhelper::{KeyRange, RegionId, StoreId, Ts};

const DEADLINE: Duration = Duration::from_secs(5);
const NOT_FLUSHED: &str = "isn't in the region_manager of log backup, maybe not leader or not flushed yet.";

fn sim(stores: usize, regions: usize, seed: u64) -> SimCluster {
    SimCluster::start(SimConfig { stores, regions, seed, ..SimConfig::default() }).expect("sim starts")
}

fn pd(sim: &SimCluster) -> PdClient {
    pd_client(&sim.pd_endpoint()).unwrap()
}

fn store(sim: &SimCluster, id: StoreId) -> LogBackupClient {
    log_backup_client(&sim.store_address(id)).unwrap()
}

fn rpc_code(err: &grpcio::Error) -> Option<RpcStatusCode> {
    match err {
        grpcio::Error::RpcFailure(status) => Some(status.code()),
        _ => None,
    }
}

/// Asks `store` about `regions` (current id and version) and indexes the answers by id.
fn ask(sim: &SimCluster, store_id: StoreId, regions: &[RegionWithLeader]) -> HashMap<RegionId, RegionCheckpoint> {
    let pairs: Vec<(RegionId, u64)> = regions.iter().map(|r| (r.id, r.epoch_version)).collect();
    ask_pairs(sim, store_id, &pairs)
}

fn ask_pairs(sim: &SimCluster, store_id: StoreId, pairs: &[(RegionId, u64)]) -> HashMap<RegionId, RegionCheckpoint> {
    let client = store(sim, store_id);
    let answers = last_flush_ts(&client, &sim.store_address(store_id), pairs, DEADLINE).unwrap();
    answers.into_iter().map(|c| (c.get_region().get_id(), c)).collect()
}

/// The store's answer for one region.
fn ask_one(sim: &SimCluster, store_id: StoreId, region: &RegionWithLeader) -> RegionCheckpoint {
    ask(sim, store_id, std::slice::from_ref(region)).remove(&region.id).expect("one answer per region")
}

fn assert_not_flushed(answer: &RegionCheckpoint, id: RegionId, asked_version: u64) {
    let err = answer.get_err();
    assert!(answer.has_err(), "region {id} should be an error: {answer:?}");
    assert_eq!(err.get_message(), format!("the region {id} {NOT_FLUSHED}"));
    assert_eq!(err.get_not_leader().get_region_id(), id);
    assert!(!err.get_not_leader().has_leader(), "log backup never names the leader");
    assert_eq!(answer.get_region().get_epoch_version(), asked_version, "echoed as requested");
    assert_eq!(answer.get_checkpoint(), 0);
}

/// A subscription's messages, read on a helper thread that ends with the stream.
fn subscribe(sim: &SimCluster, store_id: StoreId) -> Receiver<Result<Vec<(KeyRange, Ts)>, RpcStatusCode>> {
    let client = store(sim, store_id);
    let mut request = SubscribeFlushEventRequest::new();
    request.set_client_id("sim-test".into());
    let mut stream = client.subscribe_flush_event_opt(&request, call_option(Duration::from_secs(60))).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        let _client = client;
        while let Some(message) = futures_executor::block_on(stream.next()) {
            let decoded = message
                .map(|m| {
                    m.get_events()
                        .iter()
                        .map(|e| {
                            let range = KeyRange::new(
                                decode_boundary(e.get_start_key()).unwrap(),
                                decode_boundary(e.get_end_key()).unwrap(),
                            );
                            (range, e.get_checkpoint())
                        })
                        .collect()
                })
                .map_err(|e| rpc_code(&e).unwrap_or(RpcStatusCode::UNKNOWN));
            let failed = decoded.is_err();
            if tx.send(decoded).is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Events received within `within`, flattened, until `want` events arrived.
fn collect_events(
    rx: &Receiver<Result<Vec<(KeyRange, Ts)>, RpcStatusCode>>,
    want: usize,
    within: Duration,
) -> Vec<(KeyRange, Ts)> {
    let deadline = Instant::now() + within;
    let mut events = Vec::new();
    while events.len() < want {
        let message = rx.recv_deadline(deadline).expect("flush events in time");
        events.extend(message.expect("stream still open"));
    }
    events
}

fn led_by(sim: &SimCluster, store_id: StoreId) -> Vec<RegionWithLeader> {
    sim.regions().into_iter().filter(|r| r.leader_store == Some(store_id)).collect()
}

#[test]
fn scan_regions_pages_encoded_contiguous_regions_with_leaders() {
    let sim = sim(4, 300, 1);
    let client = pd(&sim);
    let scanned = scan_regions(&client, "pd", sim.cluster_id(), &KeyRange::full(), 64, DEADLINE).unwrap();
    let expected = sim.regions();
    assert_eq!(scanned.len(), 300);
    for (got, want) in scanned.iter().zip(&expected) {
        let region = got.get_region();
        assert_eq!(region.get_id(), want.id);
        assert_eq!(region.get_start_key(), encode_end_key(&want.range.start).as_slice(), "encoded, empty stays empty");
        assert_eq!(decode_boundary(region.get_end_key()).unwrap(), want.range.end);
        assert_eq!(region.get_region_epoch().get_version(), want.epoch_version);
        assert_eq!(region.get_peers().iter().map(|p| p.get_store_id()).collect::<Vec<_>>(), want.peer_stores);
        assert_eq!(Some(got.get_leader().get_store_id()), want.leader_store);
    }
    assert!(expected.first().unwrap().range.start.is_empty() && expected.last().unwrap().range.end.is_empty());
    for pair in expected.windows(2) {
        assert_eq!(pair[0].range.end, pair[1].range.start, "contiguous");
    }

    // A page in the middle: starts at the region containing the key, stops before `end`,
    // and fills the legacy fields in parallel.
    let (from, to) = (&expected[10], &expected[20]);
    let inside = [from.range.start.clone(), b"\0".to_vec()].concat();
    let mut request = ScanRegionsRequest::new();
    request.set_header(header(sim.cluster_id()));
    request.set_start_key(encode_bytes(&inside));
    request.set_end_key(encode_bytes(&to.range.start));
    let response = client.scan_regions_opt(&request, call_option(DEADLINE)).unwrap();
    let ids: Vec<RegionId> = response.get_regions().iter().map(|r| r.get_region().get_id()).collect();
    assert_eq!(ids, expected[10..20].iter().map(|r| r.id).collect::<Vec<_>>());
    assert_eq!(response.get_region_metas().len(), 10);
    assert_eq!(response.get_leaders()[0].get_store_id(), from.leader_store.unwrap());

    // TiDB encodes an empty start key (00x8 F7): the scan starts at the first region.
    request.set_start_key(encode_bytes(b""));
    request.set_end_key(Vec::new());
    request.set_limit(1);
    let response = client.scan_regions_opt(&request, call_option(DEADLINE)).unwrap();
    assert_eq!(response.get_regions()[0].get_region().get_id(), expected[0].id);

    // A raw (unencoded) key is refused loudly rather than misread.
    request.set_start_key(b"t".to_vec());
    let response = client.scan_regions_opt(&request, call_option(DEADLINE)).unwrap();
    assert!(response.get_header().get_error().get_message().contains("memcomparable"));
}

#[test]
fn batch_scan_and_point_lookups_agree_with_the_table() {
    let sim = sim(3, 50, 2);
    let client = pd(&sim);
    let regions = sim.regions();
    let range = |a: &RegionWithLeader, b: &RegionWithLeader| {
        let mut r = PdKeyRange::new();
        r.set_start_key(encode_bytes(&a.range.start));
        r.set_end_key(encode_end_key(&b.range.start));
        r
    };
    let mut request = BatchScanRegionsRequest::new();
    request.set_header(header(sim.cluster_id()));
    // Overlapping at region 5: reported once.
    request.mut_ranges().push(range(&regions[2], &regions[6]));
    request.mut_ranges().push(range(&regions[5], &regions[8]));
    let response = client.batch_scan_regions_opt(&request, call_option(DEADLINE)).unwrap();
    let ids: Vec<RegionId> = response.get_regions().iter().map(|r| r.get_region().get_id()).collect();
    assert_eq!(ids, regions[2..8].iter().map(|r| r.id).collect::<Vec<_>>());

    let key = record_key(100, 1);
    let mut by_key = GetRegionRequest::new();
    by_key.set_header(header(sim.cluster_id()));
    by_key.set_region_key(encode_bytes(&key));
    let response = client.get_region_opt(&by_key, call_option(DEADLINE)).unwrap();
    assert_eq!(response.get_region().get_id(), sim.region_at(&key).id);

    let mut by_id = GetRegionByIDRequest::new();
    by_id.set_header(header(sim.cluster_id()));
    by_id.set_region_id(regions[7].id);
    let response = client.get_region_by_id_opt(&by_id, call_option(DEADLINE)).unwrap();
    assert_eq!(decode_boundary(response.get_region().get_start_key()).unwrap(), regions[7].range.start);
    assert_eq!(response.get_leader().get_store_id(), regions[7].leader_store.unwrap());
}

#[test]
fn members_name_pd_and_a_foreign_cluster_id_is_refused() {
    let sim = sim(3, 4, 0);
    let client = pd(&sim);
    let members = client.get_members_opt(&GetMembersRequest::new(), call_option(DEADLINE)).unwrap();
    assert_eq!(members.get_header().get_cluster_id(), sim.cluster_id());
    assert_eq!(members.get_leader().get_client_urls(), [format!("http://{}", sim.pd_endpoint())]);

    let mut request = GetAllStoresRequest::new();
    request.set_header(header(sim.cluster_id() + 1));
    let err = client.get_all_stores_opt(&request, call_option(DEADLINE)).unwrap_err();
    assert_eq!(rpc_code(&err), Some(RpcStatusCode::FAILED_PRECONDITION), "{err}");
}

#[test]
fn restart_moves_the_store_and_bumps_its_start_timestamp() {
    let sim = sim(3, 8, 0);
    let client = pd(&sim);
    let stores = |client: &PdClient| {
        let mut request = GetAllStoresRequest::new();
        request.set_header(header(sim.cluster_id()));
        request.set_exclude_tombstone_stores(true);
        client.get_all_stores_opt(&request, call_option(DEADLINE)).unwrap().take_stores().into_vec()
    };
    let before = stores(&client);
    assert_eq!(before.iter().map(|s| s.get_id()).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(before.iter().all(|s| s.get_peer_address() == s.get_address()));
    let old_address = sim.store_address(2);

    sim.flush_all();
    let new_address = sim.restart_store(2).unwrap();
    assert_ne!(new_address, old_address);
    let after = stores(&client);
    assert_eq!(after[1].get_address(), new_address);
    assert!(after[1].get_start_timestamp() > before[1].get_start_timestamp());
    assert_eq!(after[0].get_start_timestamp(), before[0].get_start_timestamp());

    let mut one = GetStoreRequest::new();
    one.set_header(header(sim.cluster_id()));
    one.set_store_id(2);
    assert_eq!(client.get_store_opt(&one, call_option(DEADLINE)).unwrap().get_store().get_address(), new_address);
    one.set_store_id(9);
    let missing = client.get_store_opt(&one, call_option(DEADLINE)).unwrap();
    assert!(missing.get_header().get_error().get_message().contains("invalid store ID 9"));

    // The new process answers and has flushed nothing yet; the old port is closed.
    let led = led_by(&sim, 2);
    assert!(!led.is_empty());
    let answers = ask(&sim, 2, &led);
    assert!(answers.values().all(|a| a.has_err()));
    let old = log_backup_client(&old_address).unwrap();
    assert!(last_flush_ts(&old, &old_address, &[(led[0].id, 1)], Duration::from_secs(2)).is_err());
}

#[test]
fn tso_stream_is_strictly_increasing() {
    let sim = sim(1, 1, 0);
    let client = pd(&sim);
    let (mut tx, mut rx) = client.tso_opt(call_option(DEADLINE)).unwrap();
    let mut previous = sim.start_ts();
    for count in [1u32, 10, 1, 100] {
        let mut request = TsoRequest::new();
        request.set_header(header(sim.cluster_id()));
        request.set_count(count);
        futures_executor::block_on(tx.send((request, WriteFlags::default()))).unwrap();
        let response = futures_executor::block_on(rx.next()).unwrap().unwrap();
        assert_eq!(response.get_count(), count);
        let ts = response.get_timestamp();
        assert!(ts.get_logical() < 1 << 18);
        let last = compose_ts(ts.get_physical() as u64, ts.get_logical() as u64);
        assert!(last - u64::from(count) + 1 > previous, "the batch starts after every earlier ts");
        previous = last;
    }
    assert!(sim.now_ts() > previous, "one clock for the stream and the sim");
    // The server ends the stream with OK once we close our side; the close itself may
    // already see that status, so only the end of the stream is checked.
    let _ = futures_executor::block_on(tx.close());
    assert!(futures_executor::block_on(rx.next()).is_none());
}

#[test]
fn gc_safe_points_follow_pd_minimum_semantics() {
    let sim = sim(1, 1, 0);
    let client = pd(&sim);
    let update = |service: &str, safe_point: Ts, ttl: i64| {
        let mut request = UpdateServiceGCSafePointRequest::new();
        request.set_header(header(sim.cluster_id()));
        request.set_service_id(service.as_bytes().to_vec());
        request.set_TTL(ttl);
        request.set_safe_point(safe_point);
        let response = client.update_service_gc_safe_point_opt(&request, call_option(DEADLINE)).unwrap();
        (String::from_utf8(response.get_service_id().to_vec()).unwrap(), response.get_min_safe_point())
    };
    const LOG_BACKUP: &str = "log-backup-coordinator";
    assert_eq!(update(LOG_BACKUP, 500, 86400), ("gc_worker".to_string(), 0), "gc_worker at 0 is the minimum");
    assert_eq!(sim.gc_safe_points(), vec![(LOG_BACKUP.to_string(), 500)]);

    sim.set_gc_safe_point(1000);
    assert_eq!(update(LOG_BACKUP, 800, 86400), (LOG_BACKUP.to_string(), 800), "moving up from the minimum is fine");
    assert_eq!(update("other", 300, 86400), (LOG_BACKUP.to_string(), 800), "below the minimum: refused");
    assert_eq!(sim.gc_safe_points(), vec![(LOG_BACKUP.to_string(), 800)]);
    let mut request = GetGCSafePointRequest::new();
    request.set_header(header(sim.cluster_id()));
    assert_eq!(client.get_gc_safe_point_opt(&request, call_option(DEADLINE)).unwrap().get_safe_point(), 1000);

    update(LOG_BACKUP, u64::MAX, 0);
    assert!(sim.gc_safe_points().is_empty(), "TTL 0 removes the service");
    assert_eq!(update(LOG_BACKUP, 900, 86400), ("gc_worker".to_string(), 1000), "under the GC safe point: refused");
    assert!(sim.gc_safe_points().is_empty());
}

#[test]
fn checkpoints_follow_tikv_error_forms_before_and_after_a_flush() {
    let sim = sim(3, 20, 3);
    let leader = 1;
    let led = led_by(&sim, leader);
    assert!(!led.is_empty());
    for (id, answer) in ask(&sim, leader, &led) {
        let version = led.iter().find(|r| r.id == id).unwrap().epoch_version;
        assert_not_flushed(&answer, id, version);
    }

    sim.flush_all();
    let flush_ts = sim.last_flush_ts(leader).unwrap();
    let answers = ask(&sim, leader, &led);
    assert_eq!(answers.len(), led.len());
    for region in &led {
        let answer = &answers[&region.id];
        assert!(!answer.has_err(), "{answer:?}");
        assert_eq!(answer.get_checkpoint(), flush_ts);
        assert_eq!(answer.get_region().get_epoch_version(), region.epoch_version);
        assert!(answer.get_checkpoint() <= sim.true_checkpoint(&region.range));
    }

    // Another store does not lead them: NotLeader. Duplicates collapse.
    let other = led_by(&sim, 2);
    let pairs = [(led[0].id, led[0].epoch_version), (led[0].id, led[0].epoch_version)];
    let answers = last_flush_ts(&store(&sim, 2), "store 2", &pairs, DEADLINE).unwrap();
    assert_eq!(answers.len(), 1);
    assert_not_flushed(&answers[0], led[0].id, led[0].epoch_version);
    assert!(ask(&sim, 2, &other).values().all(|a| !a.has_err()));

    // A wrong version: EpochNotMatch, echoing the version the store recorded.
    let answers = ask_pairs(&sim, leader, &[(led[0].id, led[0].epoch_version + 7)]);
    let answer = &answers[&led[0].id];
    assert!(answer.get_err().has_epoch_not_match());
    assert!(answer.get_err().get_epoch_not_match().get_current_regions().is_empty());
    assert_eq!(answer.get_region().get_epoch_version(), led[0].epoch_version);
    assert_eq!(answer.get_checkpoint(), 0);
}

#[test]
fn leadership_moves_show_after_the_stores_flush() {
    let sim = sim(3, 6, 4);
    sim.flush_all();
    let region = sim.regions()[2].clone();
    let old = region.leader_store.unwrap();
    let new = sim.store_ids().into_iter().find(|&s| s != old).unwrap();
    sim.transfer_leader(region.id, new).unwrap();
    assert_eq!(sim.region(region.id).unwrap().leader_store, Some(new));

    // Until they flush again the old leader still reports its last map, the new one not.
    assert!(!ask_one(&sim, old, &region).has_err());
    assert_not_flushed(&ask_one(&sim, new, &region), region.id, region.epoch_version);

    sim.flush_all();
    let region = sim.region(region.id).unwrap();
    assert_not_flushed(&ask_one(&sim, old, &region), region.id, region.epoch_version);
    let answer = &ask_one(&sim, new, &region);
    assert_eq!(answer.get_checkpoint(), sim.last_flush_ts(new).unwrap());

    // Without a leader nobody flushes it, so its truth stays behind.
    sim.remove_leader(region.id);
    sim.flush_all();
    assert_eq!(sim.region(region.id).unwrap().leader_store, None);
    assert!(sim.true_checkpoint(&region.range) < sim.last_flush_ts(new).unwrap());
    assert!(ask_one(&sim, new, &region).has_err());
}

#[test]
fn split_and_merge_bump_epochs_seen_as_epoch_not_match_until_the_next_flush() {
    let sim = sim(3, 4, 5);
    sim.flush_all();
    let key = record_key(100, 5000);
    let before = sim.region_at(&key);
    let leader = before.leader_store.unwrap();
    let (left, right) = sim.split(&key).unwrap();
    assert_eq!(right, before.id);
    let left_region = sim.region(left).unwrap();
    let right_region = sim.region(right).unwrap();
    assert_eq!(left_region.range, KeyRange::new(before.range.start.clone(), key.clone()));
    assert_eq!(right_region.epoch_version, before.epoch_version + 1);

    let answers = ask(&sim, leader, &[left_region.clone(), right_region.clone()]);
    assert_not_flushed(&answers[&left], left, left_region.epoch_version);
    assert!(answers[&right].get_err().has_epoch_not_match());
    assert_eq!(answers[&right].get_region().get_epoch_version(), before.epoch_version, "recorded version echoed");

    sim.flush_all();
    let answers = ask(&sim, leader, &[left_region, right_region]);
    assert!(answers.values().all(|a| !a.has_err()));

    let merged = sim.merge(left, right).unwrap();
    assert_eq!(merged, left);
    let merged_region = sim.region(merged).unwrap();
    assert_eq!(merged_region.range, before.range);
    assert!(sim.region(right).is_none());
    assert!(ask(&sim, leader, &[merged_region])[&merged].get_err().has_epoch_not_match());
}

#[test]
fn never_flush_region_is_never_reported_and_holds_the_truth_back() {
    let sim = sim(3, 10, 6);
    let stuck = sim.regions()[4].clone();
    sim.set_never_flush(stuck.id, true);
    sim.flush_all();
    sim.flush_all();
    let leader = stuck.leader_store.unwrap();
    assert_not_flushed(&ask_one(&sim, leader, &stuck), stuck.id, stuck.epoch_version);
    assert_eq!(sim.true_checkpoint(&stuck.range), sim.start_ts());
    assert_eq!(sim.true_checkpoint(&KeyRange::full()), sim.start_ts());
    let elsewhere = sim.regions()[5].range.clone();
    assert!(sim.true_checkpoint(&elsewhere) > sim.start_ts());

    sim.set_never_flush(stuck.id, false);
    sim.flush_all();
    assert_eq!(ask_one(&sim, leader, &stuck).get_checkpoint(), sim.last_flush_ts(leader).unwrap());
}

#[test]
fn subscription_sends_the_snapshot_then_every_flush() {
    let sim = sim(3, 4000, 7);
    let leader = 1;
    let led = led_by(&sim, leader);
    assert!(led.len() > 1024, "the flush spans several messages");
    let early = subscribe(&sim, leader);
    assert!(early.recv_timeout(Duration::from_millis(200)).is_err(), "an empty map sends nothing");

    sim.flush_all();
    let first_ts = sim.last_flush_ts(leader).unwrap();
    let events = collect_events(&early, led.len(), DEADLINE);
    assert_eq!(events.len(), led.len());
    let want: Vec<(KeyRange, Ts)> = led.iter().map(|r| (r.range.clone(), first_ts)).collect();
    let mut got = events.clone();
    got.sort();
    assert_eq!(got, want, "one event per led region, keys decoded back to the raw ranges");

    // A new subscriber gets the snapshot, broadcast to the old one too.
    let late = subscribe(&sim, leader);
    assert_eq!(collect_events(&late, led.len(), DEADLINE).len(), led.len());
    assert_eq!(collect_events(&early, led.len(), DEADLINE).len(), led.len());

    sim.flush_store(leader);
    let second = collect_events(&early, led.len(), DEADLINE);
    let second_ts = sim.last_flush_ts(leader).unwrap();
    assert!(second_ts > first_ts && second.iter().all(|(_, ts)| *ts == second_ts));
    for (range, ts) in second {
        assert!(ts <= sim.true_checkpoint(&range));
    }
}

#[test]
fn disabled_subscription_answers_unimplemented_and_ends_open_streams() {
    let sim = sim(2, 40, 8);
    sim.flush_all();
    let open = subscribe(&sim, 1);
    assert!(open.recv_timeout(DEADLINE).unwrap().is_ok(), "snapshot");
    sim.set_subscription_supported(1, false);
    assert_eq!(open.recv_timeout(DEADLINE).unwrap(), Err(RpcStatusCode::UNIMPLEMENTED));
    assert_eq!(subscribe(&sim, 1).recv_timeout(DEADLINE).unwrap(), Err(RpcStatusCode::UNIMPLEMENTED));
    assert!(subscribe(&sim, 2).recv_timeout(DEADLINE).unwrap().is_ok(), "other stores unaffected");

    sim.set_subscription_supported(1, true);
    assert!(subscribe(&sim, 1).recv_timeout(DEADLINE).unwrap().is_ok());
}

#[test]
fn reset_ends_streams_with_unavailable() {
    let sim = sim(2, 40, 8);
    sim.flush_all();
    let open = subscribe(&sim, 2);
    assert!(open.recv_timeout(DEADLINE).unwrap().is_ok());
    sim.reset_subscriptions(2);
    assert_eq!(open.recv_timeout(DEADLINE).unwrap(), Err(RpcStatusCode::UNAVAILABLE));
}

#[test]
fn hung_store_accepts_but_never_answers_while_others_do() {
    let sim = sim(3, 12, 9);
    sim.flush_all();
    sim.hang_store(2);
    let led = led_by(&sim, 2);
    let pairs: Vec<(RegionId, u64)> = led.iter().map(|r| (r.id, r.epoch_version)).collect();
    let asked = Instant::now();
    let err = last_flush_ts(&store(&sim, 2), "store 2", &pairs, Duration::from_millis(500)).unwrap_err();
    assert_eq!(err.rpc_status(), Some(RpcStatusCode::DEADLINE_EXCEEDED), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(3));
    assert!(ask(&sim, 1, &led_by(&sim, 1)).values().all(|a| !a.has_err()));

    // A hung store does not flush either; it answers again once resumed.
    let frozen_ts = sim.last_flush_ts(2);
    sim.flush_all();
    assert_eq!(sim.last_flush_ts(2), frozen_ts);
    let client = store(&sim, 2);
    let pending = client.get_last_flush_ts_of_region_async_opt(
        &{
            let mut request = streamhelper::proto::logbackuppb::GetLastFlushTSOfRegionRequest::new();
            request.mut_regions().push(Default::default());
            request
        },
        call_option(DEADLINE),
    );
    sim.resume_store(2);
    assert!(futures_executor::block_on(pending.unwrap()).is_ok(), "the parked call is answered on resume");
    assert!(ask(&sim, 2, &led).values().all(|a| !a.has_err()));
}

#[test]
fn stopped_store_refuses_connections_and_keeps_its_leaders() {
    let sim = sim(3, 12, 10);
    sim.flush_all();
    let address = sim.store_address(3);
    let led = led_by(&sim, 3);
    sim.stop_store(3);
    let client = log_backup_client(&address).unwrap();
    let err =
        last_flush_ts(&client, &address, &[(led[0].id, led[0].epoch_version)], Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.rpc_status(), Some(RpcStatusCode::UNAVAILABLE), "{err}");
    assert_eq!(led_by(&sim, 3), led, "PD still names it leader");
    let truth = sim.true_checkpoint(&led[0].range);
    sim.flush_all();
    assert_eq!(sim.true_checkpoint(&led[0].range), truth, "a stopped store does not flush");
    sim.scatter();
    assert!(led_by(&sim, 3).is_empty(), "scatter elects leaders on live stores only");
}

#[test]
fn slow_store_answers_after_its_delay() {
    let sim = sim(2, 4, 11);
    sim.set_store_delay(1, Duration::from_millis(300));
    let asked = Instant::now();
    ask(&sim, 1, &led_by(&sim, 1));
    assert!(asked.elapsed() >= Duration::from_millis(300));
    let err = last_flush_ts(&store(&sim, 1), "store 1", &[(1, 1)], Duration::from_millis(100)).unwrap_err();
    assert_eq!(err.rpc_status(), Some(RpcStatusCode::DEADLINE_EXCEEDED));
    sim.set_store_delay(1, Duration::ZERO);
    let asked = Instant::now();
    ask(&sim, 1, &led_by(&sim, 1));
    assert!(asked.elapsed() < Duration::from_millis(300));
}

#[test]
fn flush_now_flushes_the_store() {
    let sim = sim(2, 4, 12);
    assert_eq!(sim.last_flush_ts(1), None);
    store(&sim, 1).flush_now_opt(&FlushNowRequest::new(), call_option(DEADLINE)).unwrap();
    assert!(sim.last_flush_ts(1).is_some());
    assert_eq!(sim.last_flush_ts(2), None);
}

#[test]
fn stopped_pd_comes_back_on_its_port() {
    let sim = sim(1, 2, 0);
    let endpoint = sim.pd_endpoint();
    let client = pd(&sim);
    sim.stop_pd();
    let err = client.get_members_opt(&GetMembersRequest::new(), call_option(Duration::from_secs(2))).unwrap_err();
    assert_eq!(rpc_code(&err), Some(RpcStatusCode::UNAVAILABLE), "{err}");
    sim.start_pd().unwrap();
    assert_eq!(sim.pd_endpoint(), endpoint);
    // The channel reconnects with backoff; give it a few attempts within the deadline.
    wait_until("PD to answer again", Duration::from_secs(10), || {
        client.get_members_opt(&GetMembersRequest::new(), call_option(Duration::from_secs(1))).is_ok()
    });
}

#[test]
fn timed_flushes_raise_the_truth_without_being_told() {
    let config =
        SimConfig { stores: 2, regions: 8, flush_interval: Some(Duration::from_millis(50)), ..SimConfig::default() };
    let sim = SimCluster::start(config).unwrap();
    wait_until("a timed flush", DEADLINE, || sim.last_flush_ts(1).is_some());
    let first = sim.last_flush_ts(1);
    wait_until("another timed flush", DEADLINE, || sim.last_flush_ts(1) != first);
    assert!(sim.true_checkpoint(&KeyRange::full()) > sim.start_ts());
}

/// A random history of controls; after every step, every checkpoint the stores report (by
/// poll and by subscription) is at most the oracle's truth for its range.
#[test]
fn reported_checkpoints_never_exceed_the_truth() {
    let sim = sim(4, 200, 13);
    let streams: Vec<_> = sim.store_ids().into_iter().map(|s| (s, subscribe(&sim, s))).collect();
    let mut pick = 0u64;
    for step in 0..30u64 {
        pick = pick.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let regions = sim.regions();
        let region = &regions[(pick >> 33) as usize % regions.len()];
        match step % 6 {
            0 => sim.flush_all(),
            1 => {
                let _ = sim.split(&[region.range.start.as_slice(), b"\x80"].concat());
            }
            2 => {
                if let Some(next) =
                    regions.iter().find(|r| r.range.start == region.range.end && !r.range.start.is_empty())
                {
                    sim.merge(region.id, next.id).unwrap();
                }
            }
            3 => sim.transfer_leader(region.id, 1 + (pick >> 40) % 4).unwrap(),
            4 => sim.scatter(),
            _ => sim.flush_store(1 + step % 4),
        }
        let regions = sim.regions();
        for store_id in sim.store_ids() {
            for (id, answer) in ask(&sim, store_id, &regions) {
                if !answer.has_err() {
                    let range = &regions.iter().find(|r| r.id == id).unwrap().range;
                    assert!(
                        answer.get_checkpoint() <= sim.true_checkpoint(range),
                        "step {step}: region {id} on store {store_id}"
                    );
                }
            }
        }
        for (store_id, stream) in &streams {
            while let Ok(message) = stream.try_recv() {
                for (range, ts) in message.unwrap() {
                    assert!(ts <= sim.true_checkpoint(&range), "step {step}: event {range} from store {store_id}");
                }
            }
        }
    }
    assert!(sim.true_checkpoint(&KeyRange::full()) > sim.start_ts());
}

fn history(seed: u64) -> Vec<Vec<RegionWithLeader>> {
    let sim = sim(5, 64, seed);
    let mut snapshots = vec![sim.regions()];
    sim.scatter();
    snapshots.push(sim.regions());
    sim.split(&record_key(100, 12345)).unwrap();
    sim.scatter();
    snapshots.push(sim.regions());
    let regions = sim.regions();
    sim.merge(regions[3].id, regions[4].id).unwrap();
    sim.scatter();
    snapshots.push(sim.regions());
    snapshots
}

#[test]
fn same_seed_same_history() {
    let a = history(42);
    assert_eq!(a, history(42));
    let b = history(43);
    assert_ne!(a[0], b[0], "another seed lays regions out differently");
    assert_ne!(a[1], a[0], "scatter moves leaders");
}

#[test]
fn text_controls_act_on_the_sim() {
    use streamhelper::sim::{parse_line, Control};
    let sim = sim(3, 8, 14);
    let apply = |line: &str| parse_line(line).unwrap().unwrap().apply(&sim);
    let key = record_key(100, 777);
    let region = sim.region_at(&key).id;
    assert!(apply("split t100_r777").unwrap().contains("split"));
    assert_eq!(sim.region_at(&key).range.start, key);
    apply(&format!("transfer-leader {region} 2")).unwrap();
    assert_eq!(sim.region(region).unwrap().leader_store, Some(2));
    apply("flush 2").unwrap();
    assert!(sim.last_flush_ts(2).is_some() && sim.last_flush_ts(1).is_none());
    apply("stop-store 3").unwrap();
    let address = sim.store_address(3);
    assert!(last_flush_ts(&log_backup_client(&address).unwrap(), &address, &[], Duration::from_secs(2)).is_err());
    assert!(apply("restart-store 3").unwrap().contains("127.0.0.1:"));
    apply("stop-store 1").unwrap();
    apply("fail-over 1").unwrap();
    assert!(apply("fail-over 2").unwrap().contains("leaders moved off"));
    assert!(sim.regions().iter().all(|r| r.leader_store == Some(3)), "every leader on 3, none on stopped 1");
    assert!(apply("fail-over 9").unwrap_err().to_string().contains('9'));
    assert!(apply("merge 1 2").unwrap_err().to_string().contains("region"));
    assert!(apply("status").unwrap().contains("store 3 at"));
    assert_eq!(parse_line("quit").unwrap(), Some(Control::Quit));
}

#[test]
fn the_sim_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<SimCluster>();
}
