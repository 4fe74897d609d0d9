//! The PD client: leader discovery and failover over several endpoints, and the calls the
//! advancer makes (kvproto `proto/pdpb.proto`): ScanRegions, GetAllStores, GetStore, Tso and
//! UpdateServiceGCSafePoint. Every call carries the cluster id and a deadline: its own
//! timeout, shortened to the tick's deadline when one is in force ([`super::deadline`]);
//! the tick's interrupt and [`PdClient::close`] end the calls in flight at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use grpcio::{CallOption, Environment, RpcStatusCode, WriteFlags};
use log::{info, warn};
use parking_lot::Mutex;

use super::{deadline, ClusterMeta, RegionWithLeader, StoreInfo, GC_SERVICE_ID};
use crate::codec::{decode_boundary, encode_bytes, encode_end_key};
use crate::error::{Error, Result, ResultExt};
use crate::proto::metapb;
use crate::proto::pdpb;
use crate::proto::pdpb_grpc::PdClient as PdGrpc;
use crate::security::{grpc_env, strip_scheme, Security};
use crate::types::{compose_ts, DisplayKey, KeyRange, StoreId, Ts};
use crate::worker::Interrupt;

/// How long the advancer's GC safe point lives if it is not renewed (upstream: 24 h).
const GC_TTL_SECONDS: i64 = 86_400;

#[derive(Clone, Debug)]
pub struct PdConfig {
    /// PD client URLs (`host:port`, optionally with `http://`); any member will do.
    pub endpoints: Vec<String>,
    /// Deadline of each call.
    pub timeout: Duration,
    pub keepalive: Duration,
}

impl PdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        PdConfig { endpoints, timeout: Duration::from_secs(3), keepalive: Duration::from_secs(10) }
    }
}

/// A synchronous PD client. It follows the PD leader: a call that fails because the member
/// it reached is gone or no longer leads makes it ask the members who leads now, and retry
/// once there.
pub struct PdClient {
    config: PdConfig,
    security: Security,
    env: Arc<Environment>,
    state: Mutex<State>,
    /// Fired by [`PdClient::close`].
    closed: Interrupt,
    /// PD answered BatchScanRegions with UNIMPLEMENTED (before v8.1): regions are listed
    /// with ScanRegions from then on.
    no_batch_scan: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Learned from the first GetMembers answer; every later answer must agree.
    cluster_id: u64,
    leader: Option<Leader>,
    /// Client URLs of every member seen, tried after the configured endpoints.
    member_urls: Vec<String>,
    /// One lazily connecting channel per URL, reused across discoveries.
    clients: HashMap<String, PdGrpc>,
}

#[derive(Clone)]
struct Leader {
    url: String,
    client: PdGrpc,
}

impl PdClient {
    /// Validates the endpoints and finds the PD leader.
    pub fn connect(config: PdConfig, security: Security) -> Result<Self> {
        let client = Self::new(config, security)?;
        client.discover()?;
        Ok(client)
    }

    /// Validates the endpoints only; the leader is found by the first call. For long-running
    /// users that must start while PD is briefly away.
    pub fn new(config: PdConfig, security: Security) -> Result<Self> {
        if config.endpoints.is_empty() {
            return Err(Error::Config("no PD endpoint given".into()));
        }
        for endpoint in &config.endpoints {
            strip_scheme(endpoint)?;
        }
        Ok(PdClient {
            config,
            security,
            env: grpc_env(),
            state: Mutex::default(),
            closed: Interrupt::default(),
            no_batch_scan: AtomicBool::new(false),
        })
    }

    /// Fails every call in flight and every later one at once: for shutting down, so that
    /// nothing waits on a PD that does not answer.
    pub fn close(&self) {
        self.closed.fire();
    }

    /// Waits for a call just started to end, unless the client is closed or the tick
    /// stopped first.
    fn wait<T, F>(&self, name: &'static str, url: &str, started: grpcio::Result<F>) -> Result<T>
    where
        F: Future<Output = grpcio::Result<T>>,
    {
        let answer = match started {
            Ok(call) => deadline::block_on(self.closed.guard(call), &format!("PD {name}"))?
                .ok_or_else(|| self.closed_error(name))?,
            Err(e) => Err(e),
        };
        answer.map_err(|source| Error::rpc(name, url, source))
    }

    fn closed_error(&self, name: &str) -> Error {
        Error::Stopped(format!("PD {name} (the client was closed)"))
    }

    /// The call's deadline: the configured timeout, cut to the tick's deadline; an error
    /// when that has passed or the client is closed.
    fn timeout(&self, name: &str) -> Result<Duration> {
        if self.closed.is_fired() {
            return Err(self.closed_error(name));
        }
        deadline::bounded(self.config.timeout, &format!("PD {name}"))
    }

    /// The cluster id every request carries.
    pub fn cluster_id(&self) -> u64 {
        self.state.lock().cluster_id
    }

    /// The URL of the member currently taken as leader, if one is known.
    pub fn leader_url(&self) -> Option<String> {
        self.state.lock().leader.as_ref().map(|l| l.url.clone())
    }

    fn client_for(&self, url: &str) -> Result<PdGrpc> {
        let mut state = self.state.lock();
        if let Some(client) = state.clients.get(url) {
            return Ok(client.clone());
        }
        // Creating a channel does no I/O: it connects on the first call.
        let channel = self.security.channel(self.env.clone(), url, self.config.keepalive)?;
        let client = PdGrpc::new(channel);
        state.clients.insert(url.to_string(), client.clone());
        Ok(client)
    }

    /// Asks the configured endpoints, then every member seen so far, who leads.
    fn discover(&self) -> Result<(Leader, u64)> {
        let candidates: Vec<String> = {
            let state = self.state.lock();
            let mut urls = self.config.endpoints.clone();
            // Members advertise URLs with a scheme; an endpoint is tried once however spelled.
            let same = |a: &str, b: &str| strip_scheme(a).ok() == strip_scheme(b).ok();
            for url in &state.member_urls {
                if !urls.iter().any(|known| same(known, url)) {
                    urls.push(url.clone());
                }
            }
            urls
        };
        let mut last = String::from("nothing tried");
        for url in &candidates {
            match self.members_from(url).and_then(|members| self.adopt_leader(url, &members)) {
                Ok(found) => return Ok(found),
                Err(e @ (Error::Stopped(_) | Error::Timeout(_))) => {
                    // Closed, or the tick's deadline passed: asking the others cannot help.
                    last = e.to_string();
                    break;
                }
                Err(e) => {
                    last = match (&e, self.timeout("diagnosis")) {
                        // gRPC only says it did not connect: find out why.
                        (Error::Rpc { .. }, Ok(timeout)) => format!("{e} ({})", self.security.diagnose(url, timeout)),
                        _ => e.to_string(),
                    };
                    warn!("PD endpoint {url} could not name the leader: {last}");
                }
            }
        }
        Err(Error::Unreachable { service: "PD", endpoints: candidates.join(","), last })
    }

    fn members_from(&self, url: &str) -> Result<pdpb::GetMembersResponse> {
        let cluster_id = self.cluster_id();
        let mut req = pdpb::GetMembersRequest::default();
        req.set_header(request_header(cluster_id));
        let option = CallOption::default().timeout(self.timeout("GetMembers")?);
        let resp = self.wait("GetMembers", url, self.client_for(url)?.get_members_async_opt(&req, option))?;
        check_header(url, cluster_id, resp)
    }

    fn adopt_leader(&self, asked: &str, members: &pdpb::GetMembersResponse) -> Result<(Leader, u64)> {
        let leader_url = members
            .get_leader()
            .get_client_urls()
            .first()
            .ok_or_else(|| Error::Pd { endpoint: asked.to_string(), reason: "no PD leader is elected yet".into() })?;
        let client = self.client_for(leader_url)?;
        let cluster_id = members.get_header().get_cluster_id();
        let mut state = self.state.lock();
        if state.cluster_id != 0 && state.cluster_id != cluster_id {
            return Err(Error::Pd {
                endpoint: asked.to_string(),
                reason: format!(
                    "belongs to cluster {cluster_id}, but the other endpoints to cluster {}: check the PD addresses",
                    state.cluster_id
                ),
            });
        }
        state.cluster_id = cluster_id;
        state.member_urls = members.get_members().iter().flat_map(|m| m.get_client_urls().iter().cloned()).collect();
        // Channels to members that left go with them.
        let State { member_urls, clients, .. } = &mut *state;
        clients.retain(|url, _| url == leader_url || self.config.endpoints.contains(url) || member_urls.contains(url));
        if state.leader.as_ref().map(|l| l.url.as_str()) != Some(leader_url.as_str()) {
            info!("PD leader is {leader_url} (cluster {cluster_id}, asked {asked})");
        }
        let leader = Leader { url: leader_url.clone(), client };
        state.leader = Some(leader.clone());
        Ok((leader, cluster_id))
    }

    fn leader(&self) -> Result<(Leader, u64)> {
        {
            let state = self.state.lock();
            if let Some(leader) = &state.leader {
                return Ok((leader.clone(), state.cluster_id));
            }
        }
        self.discover()
    }

    fn forget_leader(&self, url: &str) {
        let mut state = self.state.lock();
        if state.leader.as_ref().is_some_and(|l| l.url == url) {
            state.leader = None;
        }
    }

    /// Runs one call on the leader; when the leader is gone or no longer leads, finds the
    /// new leader and runs it once more there. A call cut short by the tick's deadline says
    /// nothing about the leader: it is not retried.
    fn call<Req: PdRequest, Resp: PdResponse, F>(
        &self,
        name: &'static str,
        mut req: Req,
        rpc: impl Fn(&PdGrpc, &Req, CallOption) -> grpcio::Result<F>,
    ) -> Result<Resp>
    where
        F: Future<Output = grpcio::Result<Resp>>,
    {
        let mut failed_on_old_leader = None;
        for _ in 0..2 {
            let timeout = self.timeout(name)?;
            let (leader, cluster_id) = self.leader()?;
            req.put_header(request_header(cluster_id));
            let outcome = self
                .wait(name, &leader.url, rpc(&leader.client, &req, CallOption::default().timeout(timeout)))
                .and_then(|resp| check_header(&leader.url, cluster_id, resp));
            match outcome {
                Err(e) if timeout < self.config.timeout && deadline::passed() => return Err(e),
                Err(e) if calls_for_failover(&e) => {
                    warn!("PD {name} on {} failed, looking for the leader again: {e}", leader.url);
                    self.forget_leader(&leader.url);
                    failed_on_old_leader = Some(e);
                }
                other => return other,
            }
        }
        Err(failed_on_old_leader.expect("the loop body ran"))
    }

    /// PD's `UpdateServiceGCSafePoint` for any service id (BR's `<task>_pause_safepoint`,
    /// `br-<uuid>`); TTL ≤ 0 removes it. Returns the minimal service safe point afterwards.
    pub fn update_service_safe_point(&self, service_id: &str, ttl: i64, safe_point: Ts) -> Result<Ts> {
        let mut req = pdpb::UpdateServiceGCSafePointRequest::default();
        req.set_service_id(service_id.as_bytes().to_vec());
        req.set_TTL(ttl);
        req.set_safe_point(safe_point);
        let resp = self
            .call("UpdateServiceGCSafePoint", req, |c, r, o| c.update_service_gc_safe_point_async_opt(r, o))
            .with_context(|| {
                format!("failed to set service GC safe point {service_id} to {safe_point} (TTL {ttl}s)")
            })?;
        Ok(resp.get_min_safe_point())
    }

    /// The cluster's GC safe point: versions below it may already be collected.
    pub fn gc_safe_point(&self) -> Result<Ts> {
        let resp = self.call("GetGCSafePoint", pdpb::GetGCSafePointRequest::default(), |c, r, o| {
            c.get_gc_safe_point_async_opt(r, o)
        })?;
        Ok(resp.get_safe_point())
    }
}

impl PdClient {
    /// One range's regions through BatchScanRegions, keys encoded as for ScanRegions.
    fn batch_scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<RegionWithLeader>> {
        let mut req = pdpb::BatchScanRegionsRequest::default();
        let mut range = pdpb::KeyRange::default();
        range.set_start_key(encode_bytes(start));
        range.set_end_key(encode_end_key(end));
        req.mut_ranges().push(range);
        req.set_limit(i32::try_from(limit).unwrap_or(i32::MAX));
        let resp = self.call("BatchScanRegions", req, |c, r, o| c.batch_scan_regions_async_opt(r, o))?;
        resp.get_regions()
            .iter()
            .map(|r| region_from_pb(r.get_region(), r.get_leader()))
            .collect::<Result<_, _>>()
            .map_err(|reason| Error::RegionScan { range: KeyRange::new(start, end), reason })
    }
}

impl ClusterMeta for PdClient {
    /// BatchScanRegions where PD serves it: it sends each region once, where ScanRegions
    /// also fills two legacy lists with the same regions and leaders, so listing 10^6
    /// regions cost PD and us twice the encoding and decoding.
    fn region_scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<RegionWithLeader>> {
        if !self.no_batch_scan.load(Ordering::Relaxed) {
            match self.batch_scan(start, end, limit) {
                Err(e) if e.rpc_status() == Some(RpcStatusCode::UNIMPLEMENTED) => {
                    if !self.no_batch_scan.swap(true, Ordering::Relaxed) {
                        info!("PD does not serve BatchScanRegions (older than v8.1): listing regions with ScanRegions");
                    }
                }
                answer => return answer,
            }
        }
        let mut req = pdpb::ScanRegionsRequest::default();
        // As TiDB's codec PD client: the start is always encoded (even when empty), the end
        // only when it is not +∞.
        req.set_start_key(encode_bytes(start));
        req.set_end_key(encode_end_key(end));
        req.set_limit(i32::try_from(limit).unwrap_or(i32::MAX));
        let resp = self.call("ScanRegions", req, |c, r, o| c.scan_regions_async_opt(r, o))?;
        regions_from_scan(&resp).map_err(|reason| Error::RegionScan { range: KeyRange::new(start, end), reason })
    }

    fn stores(&self) -> Result<Vec<StoreInfo>> {
        let mut req = pdpb::GetAllStoresRequest::default();
        req.set_exclude_tombstone_stores(true);
        let resp = self.call("GetAllStores", req, |c, r, o| c.get_all_stores_async_opt(r, o))?;
        Ok(resp.get_stores().iter().filter(|s| leads_regions(s)).map(store_info).collect())
    }

    fn store_status_addresses(&self) -> Result<Vec<(StoreId, String)>> {
        let mut req = pdpb::GetAllStoresRequest::default();
        req.set_exclude_tombstone_stores(true);
        let resp = self.call("GetAllStores", req, |c, r, o| c.get_all_stores_async_opt(r, o))?;
        Ok(resp
            .get_stores()
            .iter()
            .filter(|s| leads_regions(s) && !s.get_status_address().is_empty())
            .map(|s| (s.get_id(), s.get_status_address().to_string()))
            .collect())
    }

    fn store(&self, id: StoreId) -> Result<StoreInfo> {
        let mut req = pdpb::GetStoreRequest::default();
        req.set_store_id(id);
        let resp = self.call("GetStore", req, |c, r, o| c.get_store_async_opt(r, o))?;
        let store = resp.get_store();
        if store.get_id() != id || !leads_regions(store) {
            return Err(Error::Store {
                store_id: id,
                address: store.get_address().to_string(),
                reason: format!("PD has no such store that can lead regions (state {:?})", store.get_state()),
            });
        }
        Ok(store_info(store))
    }

    fn block_gc_until(&self, safe_point: Ts) -> Result<Ts> {
        let min = self.update_service_safe_point(GC_SERVICE_ID, GC_TTL_SECONDS, safe_point)?;
        if min > safe_point {
            return Err(Error::Pd {
                endpoint: self.leader_url().unwrap_or_default(),
                reason: format!(
                    "cannot block GC until {safe_point}: the minimal service safe point {min} is already past it"
                ),
            });
        }
        Ok(safe_point)
    }

    fn unblock_gc(&self) -> Result<()> {
        // TTL 0 removes the service safe point; PD wants the maximal value with it.
        self.update_service_safe_point(GC_SERVICE_ID, 0, u64::MAX).context("failed to unblock GC")?;
        Ok(())
    }

    fn fetch_current_ts(&self) -> Result<Ts> {
        let mut req = pdpb::TsoRequest::default();
        req.set_count(1);
        let resp = self.call("Tso", req, tso_once)?;
        let ts = resp.get_timestamp();
        if ts.get_physical() <= 0 || ts.get_logical() < 0 {
            return Err(Error::Pd {
                endpoint: self.leader_url().unwrap_or_default(),
                reason: format!("TSO answered an invalid timestamp {}/{}", ts.get_physical(), ts.get_logical()),
            });
        }
        Ok(compose_ts(ts.get_physical() as u64, ts.get_logical() as u64))
    }
}

/// One request on PD's bidirectional TSO stream, which ends with the call.
fn tso_once(
    client: &PdGrpc,
    req: &pdpb::TsoRequest,
    opt: CallOption,
) -> grpcio::Result<impl Future<Output = grpcio::Result<pdpb::TsoResponse>>> {
    let (mut sink, mut responses) = client.tso_opt(opt)?;
    let req = req.clone();
    Ok(async move {
        sink.send((req, WriteFlags::default())).await?;
        let resp = responses.next().await.unwrap_or(Err(grpcio::Error::RemoteStopped))?;
        // The answer is in hand; PD may end the call before our half-close completes, which
        // gRPC reports as an error that changes nothing.
        let _ = sink.close().await;
        Ok::<_, grpcio::Error>(resp)
    })
}

fn request_header(cluster_id: u64) -> pdpb::RequestHeader {
    let mut header = pdpb::RequestHeader::default();
    header.set_cluster_id(cluster_id);
    header.set_caller_component("streamhelper".into());
    header
}

/// Turns an application error in PD's response header into an error naming the endpoint.
fn check_header<Resp: PdResponse>(endpoint: &str, cluster_id: u64, resp: Resp) -> Result<Resp> {
    let header = resp.response_header();
    let error = header.get_error();
    if error.get_field_type() != pdpb::ErrorType::OK {
        return Err(Error::PdHeader {
            endpoint: endpoint.to_string(),
            kind: error.get_field_type(),
            message: error.get_message().to_string(),
        });
    }
    if cluster_id != 0 && header.get_cluster_id() != 0 && header.get_cluster_id() != cluster_id {
        return Err(Error::Pd {
            endpoint: endpoint.to_string(),
            reason: format!("answered for cluster {}, expected cluster {cluster_id}", header.get_cluster_id()),
        });
    }
    Ok(resp)
}

/// PD members that are down, cut off or no longer leading fail with these; another member
/// may answer.
fn calls_for_failover(e: &Error) -> bool {
    match (e.grpc_source(), e.root()) {
        (Some(grpcio::Error::RpcFailure(status)), _) => {
            matches!(status.code(), RpcStatusCode::UNAVAILABLE | RpcStatusCode::DEADLINE_EXCEEDED)
        }
        (Some(grpcio::Error::RemoteStopped | grpcio::Error::RpcFinished(_)), _) => true,
        // PD has no header error type for it: a follower says so in an UNKNOWN error.
        (_, Error::PdHeader { kind: pdpb::ErrorType::UNKNOWN, message, .. }) => message.contains("not leader"),
        _ => false,
    }
}

/// Regions from a ScanRegions answer: the `regions` list when PD fills it, else the legacy
/// parallel lists. A boundary that does not decode fails the whole page, as in TiDB.
fn regions_from_scan(resp: &pdpb::ScanRegionsResponse) -> Result<Vec<RegionWithLeader>, String> {
    if !resp.get_regions().is_empty() {
        return resp.get_regions().iter().map(|r| region_from_pb(r.get_region(), r.get_leader())).collect();
    }
    let leaders = resp.get_leaders();
    let unknown = metapb::Peer::default();
    resp.get_region_metas()
        .iter()
        .enumerate()
        .map(|(i, meta)| region_from_pb(meta, leaders.get(i).unwrap_or(&unknown)))
        .collect()
}

fn region_from_pb(region: &metapb::Region, leader: &metapb::Peer) -> Result<RegionWithLeader, String> {
    let leader_store = leader.get_store_id();
    let decode = |key: &[u8], which: &str| {
        decode_boundary(key)
            .map_err(|e| format!("region {} has an undecodable {which} key {}: {e}", region.get_id(), DisplayKey(key)))
    };
    Ok(RegionWithLeader {
        id: region.get_id(),
        range: KeyRange::new(decode(region.get_start_key(), "start")?, decode(region.get_end_key(), "end")?),
        epoch_version: region.get_region_epoch().get_version(),
        conf_ver: region.get_region_epoch().get_conf_ver(),
        // PD sends an empty peer for a region whose leader it does not know.
        leader_store: (leader_store != 0).then_some(leader_store),
        leader_peer_id: leader.get_id(),
        peer_stores: region.get_peers().iter().map(|p| p.get_store_id()).collect(),
    })
}

/// TiFlash stores hold columnar replicas and never lead the regions the advancer polls.
fn leads_regions(store: &metapb::Store) -> bool {
    store.get_state() != metapb::StoreState::Tombstone
        && !store
            .get_labels()
            .iter()
            .any(|l| l.get_key() == "engine" && matches!(l.get_value(), "tiflash" | "tiflash_compute"))
}

fn store_info(store: &metapb::Store) -> StoreInfo {
    let address = if store.get_peer_address().is_empty() { store.get_address() } else { store.get_peer_address() };
    StoreInfo { id: store.get_id(), address: address.to_string(), boot_at: store.get_start_timestamp() }
}

/// Requests that carry PD's request header.
trait PdRequest {
    fn put_header(&mut self, header: pdpb::RequestHeader);
}

/// Responses that carry PD's response header.
trait PdResponse {
    fn response_header(&self) -> &pdpb::ResponseHeader;
}

macro_rules! pd_messages {
    ($($req:ident => $resp:ident),* $(,)?) => {
        $(
            impl PdRequest for pdpb::$req {
                fn put_header(&mut self, header: pdpb::RequestHeader) {
                    self.set_header(header);
                }
            }
            impl PdResponse for pdpb::$resp {
                fn response_header(&self) -> &pdpb::ResponseHeader {
                    self.get_header()
                }
            }
        )*
    };
}

pd_messages! {
    GetMembersRequest => GetMembersResponse,
    GetAllStoresRequest => GetAllStoresResponse,
    GetStoreRequest => GetStoreResponse,
    ScanRegionsRequest => ScanRegionsResponse,
    BatchScanRegionsRequest => BatchScanRegionsResponse,
    TsoRequest => TsoResponse,
    UpdateServiceGCSafePointRequest => UpdateServiceGCSafePointResponse,
    GetGCSafePointRequest => GetGCSafePointResponse,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_region(id: u64, start: &[u8], end: &[u8], stores: &[u64]) -> metapb::Region {
        let mut region = metapb::Region::default();
        region.set_id(id);
        region.set_start_key(start.to_vec());
        region.set_end_key(end.to_vec());
        region.mut_region_epoch().set_version(7);
        region.mut_region_epoch().set_conf_ver(3);
        for &store_id in stores {
            let mut peer = metapb::Peer::default();
            peer.set_store_id(store_id);
            region.mut_peers().push(peer);
        }
        region
    }

    const LEADER_PEER: u64 = 77;

    fn leader(store_id: u64) -> metapb::Peer {
        let mut peer = metapb::Peer::default();
        peer.set_store_id(store_id);
        if store_id != 0 {
            peer.set_id(LEADER_PEER);
        }
        peer
    }

    #[test]
    fn scan_answers_decode_to_raw_keys_in_both_shapes() {
        let first = pb_region(1, b"", &encode_bytes(b"m"), &[1, 2]);
        let second = pb_region(2, &encode_bytes(b"m"), b"", &[2, 3]);

        let mut modern = pdpb::ScanRegionsResponse::default();
        for (region, leader_store) in [(&first, 2), (&second, 0)] {
            let mut r = pdpb::Region::default();
            r.set_region(region.clone());
            r.set_leader(leader(leader_store));
            modern.mut_regions().push(r);
        }
        let mut legacy = pdpb::ScanRegionsResponse::default();
        legacy.mut_region_metas().push(first.clone());
        legacy.mut_region_metas().push(second.clone());
        legacy.mut_leaders().push(leader(2));

        for resp in [modern, legacy] {
            let regions = regions_from_scan(&resp).unwrap();
            assert_eq!(
                regions,
                vec![
                    RegionWithLeader {
                        id: 1,
                        range: KeyRange::new("", "m"),
                        epoch_version: 7,
                        conf_ver: 3,
                        leader_store: Some(2),
                        leader_peer_id: LEADER_PEER,
                        peer_stores: vec![1, 2],
                    },
                    RegionWithLeader {
                        id: 2,
                        range: KeyRange::new("m", ""),
                        epoch_version: 7,
                        conf_ver: 3,
                        leader_store: None,
                        leader_peer_id: 0,
                        peer_stores: vec![2, 3],
                    },
                ]
            );
        }
    }

    #[test]
    fn an_undecodable_boundary_fails_the_page_and_names_the_region() {
        let mut resp = pdpb::ScanRegionsResponse::default();
        resp.mut_region_metas().push(pb_region(9, b"", b"raw-not-encoded", &[1]));
        let err = regions_from_scan(&resp).unwrap_err();
        assert!(err.contains("region 9") && err.contains("end key"), "{err}");
    }

    #[test]
    fn stores_skip_tombstones_and_tiflash_and_prefer_the_peer_address() {
        let mut tikv = metapb::Store::default();
        tikv.set_id(1);
        tikv.set_address("127.0.0.1:1".into());
        tikv.set_peer_address("127.0.0.1:2".into());
        tikv.set_start_timestamp(42);
        assert!(leads_regions(&tikv));
        assert_eq!(store_info(&tikv), StoreInfo { id: 1, address: "127.0.0.1:2".into(), boot_at: 42 });
        tikv.clear_peer_address();
        assert_eq!(store_info(&tikv).address, "127.0.0.1:1");

        let mut tombstone = tikv.clone();
        tombstone.set_state(metapb::StoreState::Tombstone);
        assert!(!leads_regions(&tombstone));
        for engine in ["tiflash", "tiflash_compute"] {
            let mut tiflash = tikv.clone();
            let mut label = metapb::StoreLabel::default();
            label.set_key("engine".into());
            label.set_value(engine.into());
            tiflash.mut_labels().push(label);
            assert!(!leads_regions(&tiflash), "{engine}");
        }
    }

    #[test]
    fn header_errors_and_foreign_clusters_are_rejected() {
        let mut resp = pdpb::GetAllStoresResponse::default();
        resp.mut_header().set_cluster_id(5);
        assert!(check_header("pd-a:2379", 5, resp.clone()).is_ok());
        assert!(check_header("pd-a:2379", 0, resp.clone()).is_ok(), "cluster id not learned yet");
        let err = check_header("pd-a:2379", 6, resp.clone()).err().unwrap().to_string();
        assert!(err.contains("pd-a:2379") && err.contains("cluster 5"), "{err}");

        resp.mut_header().mut_error().set_field_type(pdpb::ErrorType::NOT_BOOTSTRAPPED);
        resp.mut_header().mut_error().set_message("cluster is not bootstrapped".into());
        let err = check_header("pd-a:2379", 5, resp).err().unwrap();
        assert!(err.to_string().contains("NOT_BOOTSTRAPPED"), "{err}");
        assert!(!calls_for_failover(&err));
    }

    #[test]
    fn unavailable_members_and_followers_call_for_failover() {
        let rpc = |code| Error::rpc("ScanRegions", "pd", grpcio::Error::RpcFailure(grpcio::RpcStatus::new(code)));
        assert!(calls_for_failover(&rpc(RpcStatusCode::UNAVAILABLE)));
        assert!(calls_for_failover(&rpc(RpcStatusCode::DEADLINE_EXCEEDED).context("scanning")));
        assert!(!calls_for_failover(&rpc(RpcStatusCode::INVALID_ARGUMENT)));
        let mut follower = pdpb::GetAllStoresResponse::default();
        follower.mut_header().mut_error().set_field_type(pdpb::ErrorType::UNKNOWN);
        follower.mut_header().mut_error().set_message("not leader".into());
        let err = check_header("pd", 0, follower).err().unwrap();
        assert!(calls_for_failover(&err));
        assert!(!calls_for_failover(&Error::Pd { endpoint: "pd".into(), reason: "UNKNOWN: not leader".into() }));
    }

    #[test]
    fn channels_to_members_that_left_are_dropped() {
        let client = PdClient::new(PdConfig::new(vec!["127.0.0.1:1".into()]), Security::insecure()).unwrap();
        for port in 2..40 {
            let mut members = pdpb::GetMembersResponse::default();
            members.mut_header().set_cluster_id(1);
            let mut leader = pdpb::Member::default();
            leader.mut_client_urls().push(format!("http://127.0.0.1:{port}"));
            members.mut_members().push(leader.clone());
            members.set_leader(leader);
            client.adopt_leader("127.0.0.1:1", &members).unwrap();
        }
        let state = client.state.lock();
        assert_eq!(state.clients.keys().collect::<Vec<_>>(), ["http://127.0.0.1:39"], "one channel per member now");
    }

    #[test]
    fn regions_are_listed_with_batch_scan_regions_or_with_scan_regions_from_a_pd_without_it() {
        use crate::cluster::RegionIter;
        use crate::sim::{Faults, SimCluster, SimConfig};

        let sim = SimCluster::start(SimConfig { stores: 3, regions: 50, ..Default::default() }).unwrap();
        let config = PdConfig { timeout: Duration::from_secs(2), ..PdConfig::new(vec![sim.pd_endpoint()]) };
        let pd = PdClient::connect(config, Security::insecure()).unwrap();
        let list = |pd: &PdClient| {
            let mut iter = RegionIter::new(pd, &KeyRange::full());
            iter.page_size = 16;
            iter.collect_all()
        };
        assert_eq!(list(&pd).unwrap(), sim.regions());
        assert!(!pd.no_batch_scan.load(Ordering::Relaxed), "PD serves BatchScanRegions: no fallback");

        sim.set_faults(Faults { no_batch_scan: true, ..Faults::default() });
        assert_eq!(list(&pd).unwrap(), sim.regions(), "the same regions from ScanRegions");
        assert!(pd.no_batch_scan.load(Ordering::Relaxed));

        // PD's faults reach both calls: a page naming a region twice is refused either way.
        for no_batch_scan in [true, false] {
            let pd = PdClient::connect(
                PdConfig { timeout: Duration::from_secs(2), ..PdConfig::new(vec![sim.pd_endpoint()]) },
                Security::insecure(),
            )
            .unwrap();
            sim.set_faults(Faults { no_batch_scan, duplicated_regions: true, ..Faults::default() });
            let mut iter = RegionIter::new(&pd, &KeyRange::full());
            iter.retry = crate::cluster::ScanRetry { attempts: 1, backoff: Duration::ZERO };
            let err = iter.next_page().unwrap_err().to_string();
            assert!(err.contains("appears twice"), "{err}");
        }
    }

    #[test]
    fn connecting_to_dead_endpoints_names_them_all() {
        let dead = ["127.0.0.1:1".to_string(), "http://127.0.0.1:2".to_string()];
        let mut config = PdConfig::new(dead.to_vec());
        config.timeout = Duration::from_secs(2);
        let err = PdClient::connect(config, Security::insecure()).err().unwrap().to_string();
        assert!(err.contains("127.0.0.1:1") && err.contains("http://127.0.0.1:2"), "{err}");

        let err = PdClient::connect(PdConfig::new(vec!["no-port".into()]), Security::insecure()).err().unwrap();
        assert!(err.to_string().contains("no-port"), "{err}");
    }
}
