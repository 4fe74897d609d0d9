//! The fake PD: `pdpb.PD` over the sim's region table, with memcomparable-encoded region
//! keys like a real TiKV cluster's (kvproto `proto/pdpb.proto`; keys as client-go's
//! `internal/locate/pd_codec.go` expects them).

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use grpcio::{DuplexSink, RequestStream, RpcContext, RpcStatus, RpcStatusCode, UnarySink, WriteFlags};
use protobuf::RepeatedField;

use crate::codec::decode_boundary;
use crate::proto::metapb;
use crate::proto::pdpb::{
    self, BatchScanRegionsRequest, BatchScanRegionsResponse, ErrorType, GetAllStoresRequest, GetAllStoresResponse,
    GetGCSafePointRequest, GetGCSafePointResponse, GetMembersRequest, GetMembersResponse, GetRegionByIDRequest,
    GetRegionRequest, GetRegionResponse, GetStoreRequest, GetStoreResponse, RequestHeader, ResponseHeader,
    ScanRegionsRequest, ScanRegionsResponse, TsoRequest, TsoResponse, UpdateServiceGCSafePointRequest,
    UpdateServiceGCSafePointResponse,
};
use crate::proto::pdpb_grpc::Pd;
use crate::types::{physical_ms, DisplayKey};

use super::encode_boundary;
use super::model::{Key, RegionMeta, RegionTable};
use super::server::reply;
use super::state::{unix_now, Faults, SimState, StoreState};
use super::tso::logical;

const MEMBER_ID: u64 = 1;
/// What the sim's stores report as their TiKV version.
pub const STORE_VERSION: &str = "8.5.0";

/// An application error, reported in `header.error` as PD does.
type PdError = (ErrorType, String);

#[derive(Clone)]
pub struct PdService {
    pub state: Arc<SimState>,
}

trait PdResponse: protobuf::Message {
    fn header_mut(&mut self) -> &mut ResponseHeader;
}

macro_rules! pd_responses {
    ($($t:ty),* $(,)?) => {
        $(impl PdResponse for $t {
            fn header_mut(&mut self) -> &mut ResponseHeader {
                self.mut_header()
            }
        })*
    };
}

pd_responses!(
    GetMembersResponse,
    GetStoreResponse,
    GetAllStoresResponse,
    GetRegionResponse,
    ScanRegionsResponse,
    BatchScanRegionsResponse,
    GetGCSafePointResponse,
    UpdateServiceGCSafePointResponse,
    TsoResponse,
);

impl PdService {
    /// Real PD refuses a request for another cluster with FAILED_PRECONDITION.
    fn check_cluster(&self, header: &RequestHeader) -> Result<(), RpcStatus> {
        let got = header.get_cluster_id();
        if got == self.state.cluster_id {
            Ok(())
        } else {
            Err(RpcStatus::with_message(
                RpcStatusCode::FAILED_PRECONDITION,
                format!("mismatch cluster id, need {} but got {got}", self.state.cluster_id),
            ))
        }
    }

    fn answer<T: PdResponse>(
        &self,
        header: &RequestHeader,
        sink: UnarySink<T>,
        build: impl FnOnce(&SimState) -> Result<T, PdError>,
    ) {
        let answer = self.check_cluster(header).map(|()| {
            let mut response = build(&self.state).unwrap_or_else(|(kind, message)| {
                let mut response = T::new();
                let error = response.header_mut().mut_error();
                error.set_field_type(kind);
                error.set_message(message);
                response
            });
            response.header_mut().set_cluster_id(self.state.cluster_id);
            response
        });
        reply(sink, answer);
    }
}

fn region_proto(start: &Key, meta: &RegionMeta) -> metapb::Region {
    let mut region = metapb::Region::new();
    region.set_id(meta.id);
    region.set_start_key(encode_boundary(start));
    region.set_end_key(encode_boundary(&meta.end));
    region.mut_region_epoch().set_version(meta.version);
    region.mut_region_epoch().set_conf_ver(meta.conf_ver);
    for &store in meta.peers.as_slice() {
        region.mut_peers().push(peer_proto(meta, store));
    }
    region
}

fn peer_proto(meta: &RegionMeta, store: u64) -> metapb::Peer {
    let mut peer = metapb::Peer::new();
    peer.set_id(meta.peer_id(store));
    peer.set_store_id(store);
    peer
}

/// The leader, or the empty `Peer{}` PD sends for a region without one.
fn leader_proto(meta: &RegionMeta) -> metapb::Peer {
    meta.leader.map(|store| peer_proto(meta, store)).unwrap_or_default()
}

/// The legacy lists of a ScanRegions answer, beside its regions.
type LegacyLists<'a> = (&'a mut RepeatedField<metapb::Region>, &'a mut RepeatedField<metapb::Peer>);

/// Applies the region faults PD is told to have to one scan answer: its regions and, for
/// ScanRegions, the legacy lists.
fn misbehave(faults: &Faults, regions: &mut RepeatedField<pdpb::Region>, mut legacy: Option<LegacyLists>) {
    if faults.duplicated_regions && !regions.is_empty() {
        let first = regions[0].clone();
        regions.push(first);
        if let Some((metas, leaders)) = legacy.as_mut() {
            let (meta, leader) = (metas[0].clone(), leaders[0].clone());
            metas.push(meta);
            leaders.push(leader);
        }
    }
    if faults.inverted_regions {
        let bounded = |r: &metapb::Region| !r.get_start_key().is_empty() && !r.get_end_key().is_empty();
        if let Some(i) = regions.iter().position(|r| bounded(r.get_region())) {
            let invert = |region: &mut metapb::Region| {
                let (start, end) = (region.take_start_key(), region.take_end_key());
                region.set_start_key(end);
                region.set_end_key(start);
            };
            invert(regions[i].mut_region());
            if let Some((metas, _)) = legacy.as_mut() {
                invert(&mut metas[i]);
            }
        }
    }
}

fn pd_region(start: &Key, meta: &RegionMeta) -> pdpb::Region {
    let mut region = pdpb::Region::new();
    region.set_region(region_proto(start, meta));
    if meta.leader.is_some() {
        region.set_leader(leader_proto(meta));
    }
    region
}

/// A request key (memcomparable-encoded, empty = unbounded) as a raw key.
fn raw_key(encoded: &[u8], field: &str) -> Result<Vec<u8>, PdError> {
    decode_boundary(encoded).map_err(|e| {
        (
            ErrorType::UNKNOWN,
            format!(
                "{field} {} is not a memcomparable-encoded key ({e}); encode keys as TiDB does",
                DisplayKey(encoded)
            ),
        )
    })
}

/// Regions from the one containing `start` while they start before `end` (empty = +inf),
/// at most `limit` of them (`limit <= 0`: all).
fn scan<'a>(
    table: &'a RegionTable,
    start: &[u8],
    end: &'a [u8],
    limit: i32,
) -> impl Iterator<Item = (&'a Key, &'a RegionMeta)> {
    let limit = if limit <= 0 { usize::MAX } else { limit as usize };
    table.scan_from(start).take_while(move |(s, _)| end.is_empty() || s.as_ref() < end).take(limit)
}

pub fn store_proto(store: &StoreState) -> metapb::Store {
    let run = store.run.lock();
    let mut proto = metapb::Store::new();
    proto.set_id(store.id);
    proto.set_address(run.address.clone());
    proto.set_peer_address(run.address.clone());
    proto.set_status_address(run.status_address.clone());
    proto.set_state(metapb::StoreState::Up);
    proto.set_node_state(metapb::NodeState::Serving);
    proto.set_version(STORE_VERSION.into());
    proto.set_start_timestamp(run.start_timestamp);
    proto
}

impl Pd for PdService {
    fn get_members(&mut self, _ctx: RpcContext, _request: GetMembersRequest, sink: UnarySink<GetMembersResponse>) {
        let mut member = pdpb::Member::new();
        member.set_name("sim-pd".into());
        member.set_member_id(MEMBER_ID);
        let url = format!("http://{}", self.state.pd_address.lock());
        member.mut_client_urls().push(url.clone());
        member.mut_peer_urls().push(url);
        let mut response = GetMembersResponse::new();
        response.mut_header().set_cluster_id(self.state.cluster_id);
        response.mut_members().push(member.clone());
        response.set_etcd_leader(member.clone());
        response.set_leader(member);
        reply(sink, Ok(response));
    }

    fn tso(&mut self, ctx: RpcContext, mut requests: RequestStream<TsoRequest>, mut sink: DuplexSink<TsoResponse>) {
        let service = self.clone();
        ctx.spawn(async move {
            while let Some(Ok(request)) = requests.next().await {
                if let Err(status) = service.check_cluster(request.get_header()) {
                    let _ = sink.fail(status).await;
                    return;
                }
                let last = service.state.tso.next_batch(request.get_count());
                let mut response = TsoResponse::new();
                response.header_mut().set_cluster_id(service.state.cluster_id);
                response.set_count(request.get_count());
                response.mut_timestamp().set_physical(physical_ms(last) as i64);
                response.mut_timestamp().set_logical(logical(last) as i64);
                if sink.send((response, WriteFlags::default())).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
    }

    fn get_store(&mut self, _ctx: RpcContext, request: GetStoreRequest, sink: UnarySink<GetStoreResponse>) {
        self.answer(request.get_header(), sink, |state| {
            let id = request.get_store_id();
            let store =
                state.store(id).ok_or_else(|| (ErrorType::UNKNOWN, format!("invalid store ID {id}, not found")))?;
            let mut response = GetStoreResponse::new();
            response.set_store(store_proto(store));
            Ok(response)
        });
    }

    fn get_all_stores(
        &mut self,
        _ctx: RpcContext,
        request: GetAllStoresRequest,
        sink: UnarySink<GetAllStoresResponse>,
    ) {
        // The sim has no tombstone stores, so `exclude_tombstone_stores` changes nothing.
        self.answer(request.get_header(), sink, |state| {
            let mut response = GetAllStoresResponse::new();
            response.set_stores(state.stores.iter().map(store_proto).collect());
            let faults = state.faults.lock();
            for store in response.mut_stores().iter_mut() {
                if let Some(address) = faults.store_addresses.get(&store.get_id()) {
                    store.set_address(address.clone());
                    store.set_peer_address(address.clone());
                }
            }
            if faults.duplicate_store {
                if let Some(mut twin) = response.get_stores().first().cloned() {
                    twin.set_address("127.0.0.1:1".into());
                    twin.set_peer_address("127.0.0.1:1".into());
                    response.mut_stores().push(twin);
                }
            }
            Ok(response)
        });
    }

    fn get_region(&mut self, _ctx: RpcContext, request: GetRegionRequest, sink: UnarySink<GetRegionResponse>) {
        self.answer(request.get_header(), sink, |state| {
            let key = raw_key(request.get_region_key(), "region_key")?;
            let table = state.regions.read();
            let (start, meta) = table.region_at(&key);
            Ok(region_response(start, meta))
        });
    }

    fn get_region_by_id(
        &mut self,
        _ctx: RpcContext,
        request: GetRegionByIDRequest,
        sink: UnarySink<GetRegionResponse>,
    ) {
        self.answer(request.get_header(), sink, |state| {
            let table = state.regions.read();
            // PD answers an unknown id with an empty response, not an error.
            Ok(table.get(request.get_region_id()).map_or_else(GetRegionResponse::new, |(s, m)| region_response(s, m)))
        });
    }

    fn scan_regions(&mut self, _ctx: RpcContext, request: ScanRegionsRequest, sink: UnarySink<ScanRegionsResponse>) {
        self.answer(request.get_header(), sink, |state| {
            let start = raw_key(request.get_start_key(), "start_key")?;
            let end = raw_key(request.get_end_key(), "end_key")?;
            let table = state.regions.read();
            let mut response = ScanRegionsResponse::new();
            // Both the current and the legacy fields, as PD fills them (from one region each,
            // as PD does from its cache).
            for (s, meta) in scan(&table, &start, &end, request.get_limit()) {
                let region = pd_region(s, meta);
                response.mut_region_metas().push(region.get_region().clone());
                response.mut_leaders().push(leader_proto(meta));
                response.mut_regions().push(region);
            }
            let ScanRegionsResponse { regions, region_metas, leaders, .. } = &mut response;
            misbehave(&state.faults.lock(), regions, Some((region_metas, leaders)));
            state.pd_scans.count(response.get_regions().len());
            Ok(response)
        });
    }

    fn batch_scan_regions(
        &mut self,
        _ctx: RpcContext,
        request: BatchScanRegionsRequest,
        sink: UnarySink<BatchScanRegionsResponse>,
    ) {
        if self.state.faults.lock().no_batch_scan {
            let status =
                RpcStatus::with_message(RpcStatusCode::UNIMPLEMENTED, "unknown method BatchScanRegions".into());
            return reply(sink, Err(status));
        }
        // The table tiles the key space, so `contain_all_key_range` can never fail here.
        self.answer(request.get_header(), sink, |state| {
            let table = state.regions.read();
            let mut response = BatchScanRegionsResponse::new();
            let mut budget = if request.get_limit() <= 0 { i32::MAX } else { request.get_limit() };
            let mut last_id = None;
            for range in request.get_ranges() {
                let start = raw_key(range.get_start_key(), "start_key")?;
                let end = raw_key(range.get_end_key(), "end_key")?;
                for (s, meta) in scan(&table, &start, &end, budget) {
                    // Sorted ranges can share a region: report it once.
                    if last_id != Some(meta.id) {
                        response.mut_regions().push(pd_region(s, meta));
                        last_id = Some(meta.id);
                        budget -= 1;
                    }
                }
                if budget == 0 {
                    break;
                }
            }
            misbehave(&state.faults.lock(), response.mut_regions(), None);
            state.pd_scans.count(response.get_regions().len());
            Ok(response)
        });
    }

    fn get_gc_safe_point(
        &mut self,
        _ctx: RpcContext,
        request: GetGCSafePointRequest,
        sink: UnarySink<GetGCSafePointResponse>,
    ) {
        self.answer(request.get_header(), sink, |state| {
            let mut response = GetGCSafePointResponse::new();
            response.set_safe_point(state.gc.lock().gc_safe_point());
            Ok(response)
        });
    }

    fn update_service_gc_safe_point(
        &mut self,
        _ctx: RpcContext,
        request: UpdateServiceGCSafePointRequest,
        sink: UnarySink<UpdateServiceGCSafePointResponse>,
    ) {
        self.answer(request.get_header(), sink, |state| {
            let service = String::from_utf8_lossy(request.get_service_id()).into_owned();
            let min = state.gc.lock().update(&service, request.get_safe_point(), request.get_TTL(), unix_now());
            let mut response = UpdateServiceGCSafePointResponse::new();
            response.set_service_id(min.service_id.into_bytes());
            response.set_TTL(min.ttl);
            response.set_min_safe_point(min.safe_point);
            Ok(response)
        });
    }
}

fn region_response(start: &Key, meta: &RegionMeta) -> GetRegionResponse {
    let mut response = GetRegionResponse::new();
    response.set_region(region_proto(start, meta));
    if meta.leader.is_some() {
        response.set_leader(leader_proto(meta));
    }
    response
}
